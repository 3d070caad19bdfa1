//! Every table of the database, declared in one place: its column family name, key type and
//! value type. Keys encode big-endian so that iteration follows numeric order.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A typed column family.
pub trait Table {
    const NAME: &'static str;
    type Key;
    type Value: Serialize + DeserializeOwned;

    fn encode_key(key: &Self::Key) -> Vec<u8>;
}

/// Column families, in creation order.
pub const NAMES: &[&str] = &[Meta::NAME];

/// Node-wide facts: schema version, the deployment this database indexes.
pub struct Meta;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    SchemaVersion,
    Deployment,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaValue {
    Version(u32),
    Text(String),
}

impl Table for Meta {
    const NAME: &'static str = "meta";
    type Key = MetaKey;
    type Value = MetaValue;

    fn encode_key(key: &MetaKey) -> Vec<u8> {
        match key {
            MetaKey::SchemaVersion => b"schema_version".to_vec(),
            MetaKey::Deployment => b"deployment".to_vec(),
        }
    }
}
