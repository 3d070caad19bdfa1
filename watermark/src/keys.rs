use std::fmt;

/// Context strings, one per derived key; the `v1` is the scheme version.
const CONTEXT_MODEL: &str = "agora watermark v1 model key";
const CONTEXT_OWNER: &str = "agora watermark v1 owner key";
const CONTEXT_PARTITION: &str = "agora watermark v1 partition key";
const CONTEXT_LICENSE: &str = "agora watermark v1 license key";
const CONTEXT_COIN: &str = "agora watermark v1 coin key";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a watermark master key is 32 bytes (64 hex characters); got {0} bytes")]
    Length(usize),
    #[error("a watermark master key is hex; it has a non-hex character at position {0}")]
    NotHex(usize),
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The raw key bytes; keep them inside the process.
            pub fn expose(&self) -> &[u8; 32] {
                &self.0
            }
        }

        // Key material never prints itself.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(***)"))
            }
        }
    };
}

secret_key!(
    /// The node's 32 random bytes; never exported.
    MasterKey
);
secret_key!(
    /// Per model: derived from the master key and the blake3 of the original file.
    ModelKey
);
secret_key!(
    /// Keys the owner mark (half A of the eligible weights).
    OwnerKey
);
secret_key!(
    /// Keys the partition of weights into half A (owner) and half B (fingerprints).
    PartitionKey
);
secret_key!(
    /// Keys the fingerprint of one license (half B).
    LicenseKey
);
secret_key!(
    /// Keys the byte per weight that decides whether its step is taken (the Metropolis
    /// acceptance that keeps the original's histogram of bit patterns).
    CoinKey
);

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let text = text.strip_prefix("0x").unwrap_or(text);
        if let Some(pos) = text.find(|c: char| !c.is_ascii_hexdigit()) {
            return Err(KeyError::NotHex(pos));
        }
        if text.len() != 64 {
            return Err(KeyError::Length(text.len() / 2));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex above");
        }
        Ok(Self(bytes))
    }

    /// The model key for the original file whose blake3 is `original_hash`.
    pub fn model_key(&self, original_hash: &[u8; 32]) -> ModelKey {
        let mut material = [0u8; 64];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(original_hash);
        ModelKey(blake3::derive_key(CONTEXT_MODEL, &material))
    }
}

impl ModelKey {
    pub fn owner(&self) -> OwnerKey {
        OwnerKey(blake3::derive_key(CONTEXT_OWNER, &self.0))
    }

    pub fn partition(&self) -> PartitionKey {
        PartitionKey(blake3::derive_key(CONTEXT_PARTITION, &self.0))
    }

    pub fn coin(&self) -> CoinKey {
        CoinKey(blake3::derive_key(CONTEXT_COIN, &self.0))
    }

    pub fn license(&self, license_id: u128) -> LicenseKey {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(&license_id.to_le_bytes());
        LicenseKey(blake3::derive_key(CONTEXT_LICENSE, &material))
    }
}

/// What the node publishes (and anchors with the version) before a model's first sale:
/// `blake3::keyed_hash(master, H_orig)`. It binds the node's key to the original file, which
/// defeats a later "I marked it first" claim without revealing the key.
pub fn commitment(master: &MasterKey, original_hash: &[u8; 32]) -> [u8; 32] {
    *blake3::keyed_hash(&master.0, original_hash).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::from_bytes([7; 32])
    }

    #[test]
    fn derivations_are_deterministic_and_separated() {
        let model = master().model_key(&[1; 32]);
        assert_eq!(model, master().model_key(&[1; 32]));
        assert_ne!(model, master().model_key(&[2; 32]), "another file, another key");
        assert_ne!(model.owner().expose(), model.partition().expose(), "purposes are separated");
        assert_ne!(model.license(1), model.license(2));
        assert_eq!(model.license(u128::MAX), model.license(u128::MAX));
        assert_ne!(model.owner().expose(), model.license(0).expose());
        assert_ne!(model.coin().expose(), model.partition().expose());
    }

    #[test]
    fn commitment_binds_key_and_file() {
        let c = commitment(&master(), &[1; 32]);
        assert_ne!(c, commitment(&master(), &[2; 32]));
        assert_ne!(c, commitment(&MasterKey::from_bytes([8; 32]), &[1; 32]));
        assert_eq!(c, *blake3::keyed_hash(&[7; 32], &[1; 32]).as_bytes());
    }

    #[test]
    fn keys_never_print_themselves() {
        let key = master();
        assert_eq!(format!("{key:?}"), "MasterKey(***)");
        assert_eq!(format!("{:?}", key.model_key(&[0; 32]).license(3)), "LicenseKey(***)");
    }

    #[test]
    fn hex_parsing() {
        let hex = "0707070707070707070707070707070707070707070707070707070707070707";
        assert_eq!(MasterKey::from_hex(hex).unwrap(), master());
        assert_eq!(MasterKey::from_hex(&format!(" 0x{hex}\n")).unwrap(), master());
        assert_eq!(MasterKey::from_hex("abcd"), Err(KeyError::Length(2)));
        assert_eq!(MasterKey::from_hex("zz"), Err(KeyError::NotHex(0)));
    }
}
