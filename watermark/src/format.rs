//! Safetensors files as the scheme sees them: a validated header, tensors in offset order, and
//! which of them carry the mark.
//!
//! The header is parsed and checked by the `safetensors` crate (contiguous, non-overlapping
//! offsets that cover the file exactly, sizes that match dtype × shape); this module maps its
//! errors to ones that name the file and say what is wrong, and never panics on any input.

use std::{fs::File, path::Path};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::WatermarkError;

/// A tensor needs at least this many elements to carry the mark.
pub const MIN_TENSOR_ELEMENTS: usize = 65_536;

/// The float formats the scheme marks; every other dtype passes through untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatKind {
    Bf16,
    F16,
    F32,
}

impl FloatKind {
    fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F32 => Some(Self::F32),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    /// The name that seeds the tensor's streams.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Bf16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
        }
    }
}

/// One tensor of a file: where its bytes are and whether it is marked.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
    /// `Some` when the tensor is eligible: a float 2-D matrix of at least
    /// [`MIN_TENSOR_ELEMENTS`] that is not a norm, bias or position table.
    pub kind: Option<FloatKind>,
}

impl TensorEntry {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped, validated safetensors file.
pub struct ModelFile {
    pub map: Mmap,
    pub header_len: usize,
    /// In offset order.
    pub tensors: Vec<TensorEntry>,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<Self, WatermarkError> {
        let file = File::open(path).map_err(|source| WatermarkError::io(path, source))?;
        // SAFETY: the map is read-only; a file changed underneath by another process gives wrong
        // bytes (and a hash that will not match), never unsafety in this process's own memory
        // beyond what reading through `&[u8]` already accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| WatermarkError::io(path, source))?;
        let (header_len, tensors) =
            parse_header(&map).map_err(|reason| WatermarkError::Format { path: path.to_owned(), reason })?;
        Ok(Self { map, header_len, tensors })
    }

    pub fn bytes(&self, tensor: &TensorEntry) -> &[u8] {
        &self.map[tensor.start..tensor.end]
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Number of elements in eligible tensors.
    pub fn eligible_elements(&self) -> usize {
        self.tensors.iter().filter(|t| t.kind.is_some()).map(TensorEntry::elements).sum()
    }
}

/// Parses and validates a whole safetensors file's header against its bytes: the header's
/// length and the tensors in offset order, or what is wrong (the fuzz target drives this).
pub fn parse_header(file: &[u8]) -> Result<(usize, Vec<TensorEntry>), String> {
    let (header, metadata) = SafeTensors::read_metadata(file).map_err(describe)?;
    let header_len = 8 + header;
    let mut tensors: Vec<TensorEntry> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let kind = eligible(&name, info.dtype, &info.shape);
            TensorEntry {
                start: header_len + info.data_offsets.0,
                end: header_len + info.data_offsets.1,
                dtype: info.dtype,
                shape: info.shape.clone(),
                kind,
                name,
            }
        })
        .collect();
    tensors.sort_by_key(|t| t.start);
    Ok((header_len, tensors))
}

/// Which tensors carry the mark. Norms, biases and position tables are small, shared across
/// many models, and sensitive; 1-D and small tensors give too little signal to matter.
pub fn eligible(name: &str, dtype: Dtype, shape: &[usize]) -> Option<FloatKind> {
    let kind = FloatKind::of(dtype)?;
    let lower = name.to_ascii_lowercase();
    let excluded =
        ["norm", "bias", "position", "pos_emb", "wpe", "ln_"].iter().any(|word| lower.contains(word));
    let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    (shape.len() == 2 && elements >= MIN_TENSOR_ELEMENTS && !excluded).then_some(kind)
}

fn describe(error: SafeTensorError) -> String {
    use SafeTensorError::*;
    match error {
        HeaderTooSmall => "the file is shorter than the 8-byte header length".to_owned(),
        HeaderTooLarge | InvalidHeaderLength => {
            "the header length is larger than the file or the format allows (truncated or not safetensors)"
                .to_owned()
        }
        InvalidHeader(e) => format!("the header is not UTF-8: {e}"),
        InvalidHeaderDeserialization(e) | JsonError(e) => {
            format!("the header is not a safetensors header: {e}")
        }
        InvalidOffset(name) => {
            format!("tensor `{name}` has offsets that overlap, leave a gap or run backwards")
        }
        TensorInvalidInfo | InvalidTensorView(..) | MisalignedSlice | ValidationOverflow => {
            "a tensor's byte range does not match its dtype and shape".to_owned()
        }
        MetadataIncompleteBuffer => {
            "the header's offsets do not end where the file ends (truncated, or trailing bytes)".to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eligibility() {
        assert_eq!(
            eligible("layer.0.attention.self.query.weight", Dtype::BF16, &[384, 384]),
            Some(FloatKind::Bf16)
        );
        assert_eq!(eligible("layer.0.attention.self.query.bias", Dtype::F32, &[384, 384]), None);
        assert_eq!(eligible("embeddings.LayerNorm.weight", Dtype::F32, &[384, 384]), None);
        assert_eq!(eligible("embeddings.position_embeddings.weight", Dtype::F32, &[512, 384]), None);
        assert_eq!(eligible("small", Dtype::F32, &[16, 16]), None);
        assert_eq!(eligible("vector", Dtype::F32, &[1 << 20]), None);
        assert_eq!(eligible("ints", Dtype::I32, &[512, 512]), None);
        assert_eq!(eligible("huge", Dtype::F16, &[usize::MAX, 2]), None);
    }
}
