//! What crosses the network: gossip payloads (postcard) and request-response messages (CBOR,
//! but for blobs: postcard, and a chunk's bytes as they are; see [`BlobCodec`]).
//! Nothing here is trusted by its receiver: orders carry the seller's EIP-712 signature and
//! are checked against the local index, roots are signed by gossipsub with the author's peer
//! key, blobs are checked chunk by chunk against their blake3 hash.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// A signed order as gossiped on `agora/orders/1` and paged by `/agora/orders/1`: the
/// ABI-encoded `LicenseMarket.Order` and the seller's 65-byte signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOrder {
    pub order: ByteBuf,
    pub signature: ByteBuf,
}

impl SignedOrder {
    pub fn new(order: Vec<u8>, signature: Vec<u8>) -> Self {
        Self { order: ByteBuf::from(order), signature: ByteBuf::from(signature) }
    }
}

/// A compute offer and its provider's EIP-712 signature, gossiped on `agora/offers/1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOffer {
    pub offer: ByteBuf,
    pub signature: ByteBuf,
}

impl SignedOffer {
    pub fn new(offer: Vec<u8>, signature: Vec<u8>) -> Self {
        Self { offer: ByteBuf::from(offer), signature: ByteBuf::from(signature) }
    }
}

/// A node's index at one block, gossiped on `agora/roots/1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootAnnouncement {
    pub block: u64,
    pub hash: [u8; 32],
    pub state_root: [u8; 32],
}

/// `/agora/orders/1`: a page of the active orders (or, with `offers`, of the live compute
/// offers), in hash order after `after`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrdersRequest {
    pub after: Option<[u8; 32]>,
    pub limit: u32,
    /// Page the live compute offers instead of the orders.
    #[serde(default)]
    pub offers: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OrdersPage {
    pub orders: Vec<SignedOrder>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<[u8; 32]>,
    #[serde(default)]
    pub offers: Vec<SignedOffer>,
}

/// `/agora/blob/2`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum BlobRequest {
    /// The blob's size and the chaining values of its chunks, which the fetcher checks
    /// against the blob's hash before trusting any chunk.
    Manifest { hash: [u8; 32] },
    /// `len` bytes from `offset`: one whole chunk.
    Range { hash: [u8; 32], offset: u64, len: u32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum BlobResponse {
    Manifest {
        size: u64,
        chunk_size: u32,
        chaining_values: ByteBuf,
    },
    Data(ByteBuf),
    /// The node does not share this blob (unknown, private, or refused).
    Refused(String),
}

impl BlobResponse {
    pub fn data(bytes: Vec<u8>) -> Self {
        Self::Data(ByteBuf::from(bytes))
    }

    pub fn manifest(size: u64, chaining_values: Vec<u8>) -> Self {
        Self::Manifest {
            size,
            chunk_size: super::blob::CHUNK as u32,
            chaining_values: ByteBuf::from(chaining_values),
        }
    }
}

/// The codec of `/agora/blob/2`. A request is postcard. An answer is one byte of kind, then
/// for a chunk its bytes as they are (the stream's end is theirs), for anything else postcard.
/// A chunk is written from the buffer it was read into and read into the buffer the fetcher
/// keeps: CBOR copied each 1 MiB chunk three times more between the store and the check
/// (encoding into a growing buffer, reading into another, decoding out of it).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlobCodec;

impl BlobCodec {
    const CHUNK: u8 = 0;
    const OTHER: u8 = 1;
    /// Requests are a hash and a range.
    const REQUEST_MAX: u64 = 1024;
    /// A manifest is 32 bytes a chunk: 10 MiB covers blobs of 320 GiB.
    const ANSWER_MAX: u64 = 10 << 20;
}

fn malformed(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a malformed blob {what}"))
}

impl libp2p::request_response::Codec for BlobCodec {
    type Protocol = libp2p::StreamProtocol;
    type Request = BlobRequest;
    type Response = BlobResponse;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<BlobRequest>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt;
        let mut bytes = Vec::new();
        io.take(Self::REQUEST_MAX).read_to_end(&mut bytes).await?;
        decode(&bytes).ok_or_else(|| malformed("request"))
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> std::io::Result<BlobResponse>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        use futures::AsyncReadExt;
        let mut kind = [0u8];
        io.read_exact(&mut kind).await?;
        match kind[0] {
            Self::CHUNK => {
                // One byte more than a chunk, so the end is found without growing the buffer,
                // and an answer longer than a chunk is refused, not read on.
                let most = super::blob::CHUNK as usize + 1;
                let mut data = Vec::with_capacity(most);
                io.take(most as u64).read_to_end(&mut data).await?;
                if data.len() == most {
                    return Err(malformed("chunk: longer than a chunk"));
                }
                Ok(BlobResponse::Data(ByteBuf::from(data)))
            }
            Self::OTHER => {
                let mut bytes = Vec::new();
                io.take(Self::ANSWER_MAX).read_to_end(&mut bytes).await?;
                decode(&bytes).ok_or_else(|| malformed("answer"))
            }
            other => Err(malformed(&format!("answer: kind {other}"))),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: BlobRequest,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt;
        io.write_all(&encode(&request)).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        answer: BlobResponse,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        use futures::AsyncWriteExt;
        match answer {
            BlobResponse::Data(data) => {
                io.write_all(&[Self::CHUNK]).await?;
                io.write_all(&data).await
            }
            other => {
                let mut bytes = vec![Self::OTHER];
                bytes.extend_from_slice(&encode(&other));
                io.write_all(&bytes).await
            }
        }
    }
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

/// `/agora/jobs/1`: what a buyer's node and a provider's node tell each other about a
/// training job on a reservation (reservation ids are big-endian uint256).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JobMessage {
    /// Buyer → provider: run this job on the reservation (signed by the reservation's holder).
    Start(JobStart),
    /// Provider → buyer: an epoch finished.
    Progress { reservation: [u8; 32], epoch: u32, loss: f64 },
    /// Provider → buyer: the trained weights, shared with the buyer by blake3.
    Done { reservation: [u8; 32], output: [u8; 32], losses: Vec<f64>, seconds: f64, hours_used: u64 },
    /// Provider → buyer: the job failed.
    Failed { reservation: [u8; 32], reason: String },
    /// Buyer → provider: the holder's signed usage statement, once the output is registered.
    Statement { reservation: [u8; 32], hours_used: u64, signature: ByteBuf },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobStart {
    pub reservation: [u8; 32],
    /// blake3 of the base weights, their config.json, and the dataset.
    pub base: [u8; 32],
    pub config: [u8; 32],
    pub dataset: [u8; 32],
    /// `csv` or `safetensors`.
    pub dataset_format: String,
    /// JSON.
    pub hyperparameters: String,
    /// `builtin` or `external`.
    pub executor: String,
    /// The holder's EIP-191 signature of [`JobStart::digest`].
    pub signature: ByteBuf,
}

impl JobStart {
    /// What the holder signs: every field but the signature.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("agora training job start v1");
        h.update(&self.reservation).update(&self.base).update(&self.config).update(&self.dataset);
        for text in [&self.dataset_format, &self.hyperparameters, &self.executor] {
            h.update(&(text.len() as u64).to_le_bytes()).update(text.as_bytes());
        }
        *h.finalize().as_bytes()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JobReply {
    Accepted,
    Ack,
    Refused(String),
    /// Not now (the provider's index has not seen the reservation yet): ask again.
    Later(String),
}

#[cfg(test)]
mod tests {
    use futures::{executor::block_on, io::Cursor};
    use libp2p::request_response::Codec;

    use super::*;
    use crate::p2p::net::BLOB_PROTOCOL;

    fn answer_bytes(answer: BlobResponse) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        block_on(BlobCodec.write_response(&BLOB_PROTOCOL, &mut out, answer)).unwrap();
        out.into_inner()
    }

    fn read_answer(bytes: Vec<u8>) -> std::io::Result<BlobResponse> {
        block_on(BlobCodec.read_response(&BLOB_PROTOCOL, &mut Cursor::new(bytes)))
    }

    #[test]
    fn blob_messages_cross_the_codec_unchanged() {
        let chunk: Vec<u8> = (0..crate::p2p::blob::CHUNK).map(|i| (i % 251) as u8).collect();
        let bytes = answer_bytes(BlobResponse::data(chunk.clone()));
        assert_eq!(bytes.len(), chunk.len() + 1, "a chunk goes as it is, after its kind");
        match read_answer(bytes).unwrap() {
            BlobResponse::Data(data) => assert_eq!(data.into_vec(), chunk),
            other => panic!("read back as {other:?}"),
        }
        match read_answer(answer_bytes(BlobResponse::manifest(5 << 20, vec![7; 32 * 5]))).unwrap() {
            BlobResponse::Manifest { size, chunk_size, chaining_values } => {
                assert_eq!((size, chunk_size, chaining_values.into_vec()), (5 << 20, 1 << 20, vec![7; 160]))
            }
            other => panic!("read back as {other:?}"),
        }
        match read_answer(answer_bytes(BlobResponse::Refused("not shared".into()))).unwrap() {
            BlobResponse::Refused(why) => assert_eq!(why, "not shared"),
            other => panic!("read back as {other:?}"),
        }
        match read_answer(answer_bytes(BlobResponse::data(Vec::new()))).unwrap() {
            BlobResponse::Data(data) => assert!(data.is_empty()),
            other => panic!("read back as {other:?}"),
        }
        let request = BlobRequest::Range { hash: [9; 32], offset: 3 << 20, len: 1 << 20 };
        let mut out = Cursor::new(Vec::new());
        block_on(BlobCodec.write_request(&BLOB_PROTOCOL, &mut out, request)).unwrap();
        let back =
            block_on(BlobCodec.read_request(&BLOB_PROTOCOL, &mut Cursor::new(out.into_inner()))).unwrap();
        match back {
            BlobRequest::Range { hash, offset, len } => {
                assert_eq!((hash, offset, len), ([9; 32], 3 << 20, 1 << 20))
            }
            other => panic!("read back as {other:?}"),
        }
    }

    #[test]
    fn malformed_blob_answers_are_errors() {
        let mut long = vec![BlobCodec::CHUNK];
        long.resize(crate::p2p::blob::CHUNK as usize + 2, 1);
        let error = read_answer(long).unwrap_err();
        assert!(error.to_string().contains("longer than a chunk"), "{error}");
        let error = read_answer(vec![7, 1, 2, 3]).unwrap_err();
        assert!(error.to_string().contains("kind 7"), "{error}");
        let error = read_answer(vec![BlobCodec::OTHER, 0xFF, 0xFF]).unwrap_err();
        assert!(error.to_string().contains("malformed blob answer"), "{error}");
        assert_eq!(read_answer(Vec::new()).unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        let garbage = block_on(BlobCodec.read_request(&BLOB_PROTOCOL, &mut Cursor::new(vec![9; 40])));
        assert!(garbage.unwrap_err().to_string().contains("malformed blob request"));
    }
}
