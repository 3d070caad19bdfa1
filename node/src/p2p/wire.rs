//! What crosses the network: gossip payloads (postcard) and request-response messages (CBOR).
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

/// `/agora/blob/1`.
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
