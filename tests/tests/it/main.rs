//! End-to-end tests: real anvil, real `agora` processes, real HTTP on loopback.

mod artifacts;
mod compute;
mod contract_wallets;
mod dev;
mod flows;
mod indexer;
mod market_api;
mod mlflow;
mod node;
mod operator;
mod p2p;
mod publish;
mod registry;
mod serve;
mod signin;
mod wallet;
mod watermark;
