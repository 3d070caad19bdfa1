//! Owner watermarks and per-license fingerprints in model weights.
//!
//! This crate holds the key hierarchy of the scheme (see the README's watermark section):
//! a node's master key, the commitment it publishes before a model's first sale, and the keys
//! derived from it per model, per purpose and per license. Every derivation uses
//! `blake3::derive_key` with a versioned context string, so a change of scheme changes every
//! key instead of silently reusing them.

mod keys;

pub use keys::{KeyError, LicenseKey, MasterKey, ModelKey, OwnerKey, PartitionKey, commitment};
