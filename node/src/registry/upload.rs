//! Checking a safetensors file while it streams past: the header is parsed as soon as it has
//! arrived, and the byte count is held to what the header describes, so a bad upload fails
//! inside the artifact store's write (which then keeps nothing) instead of after it.

use std::{
    collections::BTreeMap,
    io::{self, Read},
    sync::{Arc, Mutex},
};

use safetensors::tensor::Metadata;

/// safetensors' own limit on the header.
const MAX_HEADER: u64 = 100_000_000;

/// What the header says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderSummary {
    pub tensors: u64,
    pub parameters: u64,
    pub dtypes: BTreeMap<String, u64>,
}

/// Passes bytes through and fails (with `InvalidData`) as soon as they are not a safetensors
/// file: a short or oversized header, JSON that is not a valid tensor table, or a body longer
/// or shorter than the header says.
pub struct Checked<R> {
    inner: R,
    seen: u64,
    head: Vec<u8>,
    expected: Option<u64>,
    summary: Arc<Mutex<Option<HeaderSummary>>>,
}

impl<R: Read> Checked<R> {
    /// The reader and a handle that holds the summary once the header has been read.
    pub fn new(inner: R) -> (Self, Arc<Mutex<Option<HeaderSummary>>>) {
        let summary = Arc::new(Mutex::new(None));
        (Self { inner, seen: 0, head: Vec::new(), expected: None, summary: summary.clone() }, summary)
    }

    fn observe(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.seen += bytes.len() as u64;
        if let Some(expected) = self.expected {
            if self.seen > expected {
                return Err(invalid(format!(
                    "not a safetensors file: longer than the {expected} bytes its header describes"
                )));
            }
            return Ok(());
        }
        self.head.extend_from_slice(bytes);
        if self.head.len() < 8 {
            return Ok(());
        }
        let n = u64::from_le_bytes(self.head[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(invalid(format!(
                "not a safetensors file: a header of {n} bytes is over the limit of {MAX_HEADER}"
            )));
        }
        if (self.head.len() as u64) < 8 + n {
            return Ok(());
        }
        let metadata: Metadata = serde_json::from_slice(&self.head[8..8 + n as usize]).map_err(|e| {
            invalid(format!("not a safetensors file: its header is not a valid tensor table ({e})"))
        })?;
        let mut summary = HeaderSummary::default();
        for info in metadata.tensors().values() {
            let elements: u64 = info.shape.iter().map(|&d| d as u64).product();
            summary.tensors += 1;
            summary.parameters += elements;
            *summary.dtypes.entry(info.dtype.to_string()).or_default() += elements;
        }
        let expected = 8 + n + metadata.data_len() as u64;
        *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some(summary);
        self.expected = Some(expected);
        self.head = Vec::new();
        if self.seen > expected {
            return Err(invalid(format!(
                "not a safetensors file: longer than the {expected} bytes its header describes"
            )));
        }
        Ok(())
    }

    fn finish(&self) -> io::Result<()> {
        match self.expected {
            None if self.seen == 0 => Err(invalid("the file is empty".into())),
            None => Err(invalid(format!(
                "not a safetensors file: it ends inside its header ({} bytes)",
                self.seen
            ))),
            Some(expected) if self.seen < expected => Err(invalid(format!(
                "not a safetensors file: {} bytes, but its header describes {expected} (truncated?)",
                self.seen
            ))),
            Some(_) => Ok(()),
        }
    }
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.finish()?;
        } else {
            self.observe(&buf[..n])?;
        }
        Ok(n)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data_len: usize, extra: usize) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[2,{}],"data_offsets":[0,{}]}}}}"#,
            data_len / 8,
            data_len
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len + extra, 7);
        bytes
    }

    fn check(bytes: &[u8]) -> Result<HeaderSummary, String> {
        // Small reads, so the header arrives in pieces.
        let (mut reader, summary) = Checked::new(io::BufReader::with_capacity(5, bytes));
        let mut sink = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
        assert_eq!(sink, bytes);
        Ok(summary.lock().unwrap().clone().unwrap())
    }

    #[test]
    fn a_valid_file_passes_with_its_summary() {
        let summary = check(&file(64, 0)).unwrap();
        assert_eq!(summary.tensors, 1);
        assert_eq!(summary.parameters, 16);
        assert_eq!(summary.dtypes.get("F32"), Some(&16));
    }

    #[test]
    fn bad_files_fail_with_the_reason() {
        assert!(check(&file(64, 1)).unwrap_err().contains("longer than"));
        let mut short = file(64, 0);
        short.pop();
        assert!(check(&short).unwrap_err().contains("truncated"));
        assert!(check(b"").unwrap_err().contains("empty"));
        assert!(check(&[1, 0, 0]).unwrap_err().contains("inside its header"));
        let mut garbage = 4u64.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"nope");
        assert!(check(&garbage).unwrap_err().contains("not a valid tensor table"));
        assert!(check(&u64::MAX.to_le_bytes()).unwrap_err().contains("over the limit"));
    }
}
