//! Moving blobs over HTTP: request bodies streamed into the artifact store (a bounded channel
//! between the async side and the blocking writer, so memory stays flat), and blobs streamed
//! out with HTTP ranges.

use std::io::{self, Read};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::{
    artifacts::{ArtifactError, ArtifactStore, BlobInfo, hex},
    registry::upload::{Checked, HeaderSummary},
};

/// Reads what the async side sends; an error sent ends the read with that error.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Streams `body` into the store (at most `limit` bytes). With `safetensors`, the bytes are
/// checked as a safetensors file while they pass and the header's summary comes back. On any
/// failure nothing is stored.
pub async fn ingest<S, E>(
    artifacts: ArtifactStore,
    body: S,
    limit: u64,
    safetensors: bool,
) -> Result<(BlobInfo, Option<HeaderSummary>), ApiError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let writer = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader { rx, current: Bytes::new() };
        if safetensors {
            let (checked, summary) = Checked::new(reader);
            let blob = artifacts.put(checked, limit)?;
            let summary = summary.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok::<_, ArtifactError>((blob, summary))
        } else {
            Ok((artifacts.put(reader, limit)?, None))
        }
    });
    let mut body = std::pin::pin!(body);
    let mut refused = false;
    while let Some(item) = body.next().await {
        let item = item.map_err(|e| {
            io::Error::new(io::ErrorKind::ConnectionAborted, format!("the upload stream failed: {e}"))
        });
        let failed = item.is_err();
        // A closed channel means the writer stopped (too large, not safetensors): its error says why.
        if tx.send(item).await.is_err() {
            refused = true;
            break;
        }
        if failed {
            break;
        }
    }
    drop(tx);
    if refused {
        drain(body).await;
    }
    let result = writer
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    result.map_err(|e| upload_error(e, limit))
}

/// How long a refused upload's remaining bytes are read and dropped, so the client (still
/// sending) gets the answer instead of a reset connection; a longer upload is cut off.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of a refused body, for at most [`DRAIN`].
pub async fn drain<S, E>(body: S)
where
    S: Stream<Item = Result<Bytes, E>>,
{
    let mut body = std::pin::pin!(body);
    let _ = tokio::time::timeout(DRAIN, async { while let Some(Ok(_)) = body.next().await {} }).await;
}

fn upload_error(error: ArtifactError, limit: u64) -> ApiError {
    match error {
        ArtifactError::TooLarge { .. } => too_large(limit),
        ArtifactError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_artifact", e.to_string())
        }
        ArtifactError::Io(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
            ApiError::new(StatusCode::BAD_REQUEST, "upload_failed", e.to_string())
        }
        other => ApiError::from(other),
    }
}

pub fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the upload is larger than the limit of {limit} bytes (AGORA_MAX_UPLOAD)"),
    )
}

/// Refuses a request at once when its declared length is over the limit (plus `slack` for
/// multipart framing).
pub fn check_length(headers: &HeaderMap, limit: u64, slack: u64) -> Result<(), ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit.saturating_add(slack) => Err(too_large(limit)),
        _ => Ok(()),
    }
}

/// A single byte range asked for by `Range`, resolved against `size`: `Ok(None)` for the whole
/// blob (no header, or a form this server answers in full), `Err` when unsatisfiable.
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.split_once('-') else { return Ok(None) };
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let n: u64 = last.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size)
        }
        (false, _) => {
            let start: u64 = first.parse().map_err(|_| ())?;
            let end = if last.is_empty() {
                size
            } else {
                last.parse::<u64>().map_err(|_| ())?.saturating_add(1).min(size)
            };
            (start, end)
        }
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A source of a response body's bytes, read on a blocking thread: `None` at the end.
pub trait Chunks: Send + 'static {
    fn next_bytes(&mut self) -> io::Result<Option<Bytes>>;
}

impl Chunks for crate::artifacts::format::RangeReader<Box<dyn crate::artifacts::backend::ReadSeek>> {
    fn next_bytes(&mut self) -> io::Result<Option<Bytes>> {
        crate::artifacts::format::RangeReader::next_bytes(self)
    }
}

impl Chunks for crate::market::delivery::Follow {
    fn next_bytes(&mut self) -> io::Result<Option<Bytes>> {
        crate::market::delivery::Follow::next_bytes(self)
    }
}

/// Streams a blob (or the range asked for) with its length, ETag (the blake3) and
/// `Accept-Ranges`; 206 for a range, 416 for an unsatisfiable one.
pub fn serve_blob(
    artifacts: &ArtifactStore,
    hash: [u8; 32],
    size: u64,
    headers: &HeaderMap,
    filename: Option<&str>,
) -> Result<Response, ApiError> {
    serve_ranged(size, Some(&hash), headers, filename, |start, end| {
        Ok(artifacts.read_range(&hash, start, end)?)
    })
}

/// Streams `size` bytes (or the range asked for) that `open` reads from `start` to `end`, with
/// the length, `Accept-Ranges`, the blake3 as ETag when it is known; 206 for a range, 416 for
/// an unsatisfiable one.
pub fn serve_ranged<C: Chunks>(
    size: u64,
    hash: Option<&[u8; 32]>,
    headers: &HeaderMap,
    filename: Option<&str>,
    open: impl FnOnce(u64, u64) -> Result<C, ApiError>,
) -> Result<Response, ApiError> {
    let etag = hash.map(|hash| format!("\"{}\"", hex(hash)));
    let if_range = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok());
    let whole_ok = if_range.is_some_and(|v| etag.as_deref() != Some(v));
    let requested = if whole_ok { Ok(None) } else { range(headers, size) };
    let (status, start, end) = match requested {
        Ok(None) => (StatusCode::OK, 0, size),
        Ok(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Err(()) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range asked for is outside the {size} bytes of the artifact"),
            )
            .into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, value(&format!("bytes */{size}")));
            return Ok(response);
        }
    };
    let mut reader = open(start, end)?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        loop {
            match reader.next_bytes() {
                Ok(None) => break,
                Ok(Some(run)) => {
                    if tx.blocking_send(Ok(run)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(target: "agora::api", error = %e, "read failed mid-stream");
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, value(&(end - start).to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(etag) = etag {
        h.insert(header::ETAG, value(&etag));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, value(&format!("bytes {start}-{}/{size}", end - 1)));
    }
    if let Some(name) = filename {
        let safe: String = name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\').collect();
        h.insert(header::CONTENT_DISPOSITION, value(&format!("attachment; filename=\"{safe}\"")));
    }
    Ok(response)
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(range: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, range.parse().unwrap());
        h
    }

    #[test]
    fn ranges_resolve_against_the_size() {
        assert_eq!(range(&HeaderMap::new(), 100), Ok(None));
        assert_eq!(range(&with("bytes=0-9"), 100), Ok(Some((0, 10))));
        assert_eq!(range(&with("bytes=90-"), 100), Ok(Some((90, 100))));
        assert_eq!(range(&with("bytes=-5"), 100), Ok(Some((95, 100))));
        assert_eq!(range(&with("bytes=-500"), 100), Ok(Some((0, 100))));
        assert_eq!(range(&with("bytes=50-1000"), 100), Ok(Some((50, 100))));
        assert_eq!(range(&with("bytes=100-"), 100), Err(()));
        assert_eq!(range(&with("bytes=9-3"), 100), Err(()));
        assert_eq!(range(&with("bytes=x-3"), 100), Err(()));
        assert_eq!(range(&with("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(range(&with("items=0-1"), 100), Ok(None));
    }
}
