//! The Agora node: a marketplace of machine-learning models anchored on an EVM chain, and an
//! MLOps service (registry, deployments, monitoring) around it.
//!
//! One module per concern; dependencies point inwards. `api` (HTTP) and `cli` call the domain
//! services; the domain modules call `store` (RocksDB) and `chain` (RPC); nothing calls `api`.
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | one typed config: flags > `AGORA_*` environment > TOML file > defaults |
//! | [`store`] | RocksDB: typed tables, atomic batches, schema version |
//! | [`chain`] | RPC provider, chain health, the indexer, reorg rollback, state root |
//! | [`market`] | the market as indexed: models, licenses, balances, earnings |
//! | [`artifacts`] | content-addressed blobs: blake3, zstd, encryption at rest |
//! | [`audit`] | the hash-chained audit log of every mutating operation |
//! | [`registry`] | registered models, versions, stages, aliases, metrics; the artifact tree |
//! | [`serve`] | deployments: models served in-process, behind the license gate |
//! | [`signers`] | who signed a hash: keys, and contract wallets through ERC-1271 |
//! | [`api`] | axum routers, error mapping, OpenAPI |
//! | [`cli`] | `clap` commands |
//! | [`node`] | wiring the services together, shutdown |

pub mod api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod chain;
pub mod cli;
pub mod client;
pub mod compute;
pub mod config;
pub mod market;
pub mod node;
pub mod p2p;
pub mod registry;
pub mod secrets;
pub mod serve;
pub mod signers;
pub mod store;
pub mod telemetry;
pub mod tracking;
