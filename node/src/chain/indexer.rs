//! The indexer: a stage that applies the contracts' logs block range by block range, and
//! unwinds when the chain reorganises.
//!
//! Each step takes the next range's logs and headers (the range doubles on success up to a cap
//! and halves on any RPC error; two ranges are fetched ahead while one is applied), checks the
//! logs against the headers, and
//! writes the range's effects, the blocks' hashes and undo records, the state root and the
//! cursor in one atomic batch: a crash at any instant leaves the index at a block boundary,
//! and a restart resumes from the cursor.
//!
//! Reorgs: with each range (and each poll when caught up) the stored cursor's hash is compared
//! with the chain's block at that height (so a reorg that happened while the node was down is
//! found at start-up).
//! On a mismatch the indexer walks back through the kept block hashes (the last
//! `max(128, confirmations)` blocks) to the common ancestor, applies the undo records newest
//! first, and re-indexes the canonical branch. A reorg deeper than the kept window stops the
//! indexer loudly: it never carries on with an index it cannot prove right. A head below the
//! cursor whose blocks still match is a lagging RPC replica, not a reorg: the indexer waits.

use std::{collections::BTreeMap, time::Duration};

use agora_contracts::Deployment;
use alloy::{
    eips::BlockNumberOrTag,
    primitives::B256,
    providers::{DynProvider, Provider},
    rpc::types::{Filter, Log},
};
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;

use super::{
    apply::{apply_log, describe},
    root::{LaneCache, StateRoot},
    writer::{IndexWriter, load_cursor, load_reorgs, load_root},
};
use crate::store::{
    Store, StoreError,
    tables::{Blocks, Cursor},
};

/// Blocks whose hashes and undo records are always kept.
pub const MIN_REORG_WINDOW: u64 = 128;

#[derive(Clone, Debug)]
pub struct IndexerConfig {
    /// Wait between polls when caught up.
    pub poll: Duration,
    /// Depth at which a block counts as final.
    pub confirmations: u64,
    /// Largest `eth_getLogs` range, in blocks.
    pub max_range: u64,
    /// Client-side timeout of one RPC call.
    pub rpc_timeout: Duration,
    /// Stop at this block (rebuilds); follow the head when `None`.
    pub to_block: Option<u64>,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(1_000),
            confirmations: 12,
            max_range: 10_000,
            rpc_timeout: Duration::from_secs(10),
            to_block: None,
        }
    }
}

impl IndexerConfig {
    pub fn window(&self) -> u64 {
        self.confirmations.max(MIN_REORG_WINDOW)
    }
}

/// What the indexer reports about itself.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct IndexStatus {
    /// Latest block of the chain.
    pub head: Option<u64>,
    /// Timestamp of the chain's latest block (chain time).
    pub head_timestamp: Option<u64>,
    /// Last block applied to the index.
    pub indexed_block: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub indexed_hash: Option<B256>,
    /// Newest block at `confirmations` depth.
    pub final_block: Option<u64>,
    pub confirmations: u64,
    /// Blocks between the head and the index.
    pub lag: Option<u64>,
    #[schema(value_type = String)]
    pub state_root: B256,
    pub reorgs: u64,
    pub last_reorg_depth: Option<u64>,
    pub events_applied: u64,
    pub decode_failures: u64,
    pub rpc_healthy: bool,
    pub rpc_error: Option<String>,
    /// Set when the indexer stopped and needs an operator (e.g. a reorg deeper than the window).
    pub fatal: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("chain RPC: {0}")]
    Rpc(String),
    #[error("the chain changed while a range was fetched ({0}); retrying")]
    Inconsistent(String),
    #[error("{0}")]
    Fatal(String),
}

enum Step {
    Advanced,
    Waiting,
}

/// Ranges fetched ahead of the one being applied.
const PREFETCH_DEPTH: usize = 2;

/// Attempts of one RPC call before its step fails.
const RPC_ATTEMPTS: u32 = 3;

/// One RPC call with the client-side timeout, retried a few times at short intervals, its
/// failure named after `what`. A step makes a dozen calls and fails when any one does; without
/// these retries an RPC that drops a few percent of requests fails most steps, and the step
/// backoff grows to its cap while the RPC is in fact up.
async fn with_timeout<T, E: std::fmt::Display, F: std::future::IntoFuture<Output = Result<T, E>>>(
    what: &str,
    timeout: Duration,
    call: impl Fn() -> F,
) -> Result<T, IndexError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match tokio::time::timeout(timeout, call().into_future()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => format!("{what}: {e}"),
            Err(_) => format!("{what}: no answer within {timeout:?}"),
        };
        metrics::counter!("agora_index_rpc_errors_total").increment(1);
        if attempt == RPC_ATTEMPTS {
            return Err(IndexError::Rpc(error));
        }
        tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
    }
}

/// A block header, as much of it as the indexer needs.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub hash: B256,
    pub parent_hash: B256,
    pub timestamp: u64,
}

impl Header {
    pub fn of(header: &alloy::rpc::types::Header) -> Self {
        Self { hash: header.hash, parent_hash: header.parent_hash, timestamp: header.timestamp }
    }
}

/// What applying a range did.
pub struct Applied {
    pub events: u64,
    pub decode_failures: u64,
    pub root: StateRoot,
    /// The index's new position: the range's last block.
    pub cursor: Cursor,
}

/// Applies a fetched range's logs (already checked against `headers`) to the index in one
/// atomic batch with the new cursor: effects, block hashes and undo records for the blocks at
/// or after `window_start`, the state root (with `lanes` of rewritten records kept from one
/// range to the next). `headers` must hold the range's last block.
#[allow(clippy::too_many_arguments)]
pub fn apply_range(
    store: &Store,
    lanes: &mut LaneCache,
    deployment: &Deployment,
    logs: &[Log],
    headers: &BTreeMap<u64, Header>,
    range: std::ops::RangeInclusive<u64>,
    window_start: u64,
    window: u64,
) -> Result<Applied, IndexError> {
    let (next, to) = (*range.start(), *range.end());
    let mut by_block: BTreeMap<u64, Vec<&Log>> = BTreeMap::new();
    for log in logs {
        let block = log.block_number.unwrap_or_default();
        if range.contains(&block) {
            by_block.entry(block).or_default().push(log);
        }
    }
    for block_logs in by_block.values_mut() {
        block_logs.sort_by_key(|l| l.log_index);
        block_logs.dedup_by_key(|l| l.log_index);
    }
    let mut blocks: Vec<u64> = by_block.keys().copied().collect();
    blocks.extend(headers.keys().copied().filter(|n| *n >= window_start && *n >= next));
    blocks.sort_unstable();
    blocks.dedup();

    let mut w = IndexWriter::new(store)?.with_lanes(lanes);
    let mut decode_failures = 0u64;
    for number in blocks {
        let keep = number >= window_start;
        w.begin_block(keep);
        for log in by_block.get(&number).map(Vec::as_slice).unwrap_or_default() {
            if let Err(e) = apply_log(&mut w, deployment, log) {
                if e.is_skippable() {
                    decode_failures += 1;
                    metrics::counter!("agora_index_decode_failures_total").increment(1);
                    tracing::warn!(target: "agora::indexer", log = %describe(log), error = %e, "skipping a log that does not decode");
                } else {
                    return Err(match e {
                        super::apply::ApplyError::Store(e) => IndexError::Store(e),
                        other => IndexError::Inconsistent(other.to_string()),
                    });
                }
            }
        }
        match headers.get(&number) {
            Some(h) => w.end_block(number, h.hash, h.parent_hash, h.timestamp, keep)?,
            None => w.end_block(number, B256::ZERO, B256::ZERO, 0, false)?,
        }
    }
    if to > window {
        w.prune_blocks_through(to - window - 1)?;
    }
    let events = w.events();
    let last = headers
        .get(&to)
        .ok_or_else(|| IndexError::Inconsistent(format!("no header of block {to}, the range's last")))?;
    let cursor = Cursor { number: to, hash: last.hash, timestamp: last.timestamp };
    let root = w.commit(Some(cursor), None)?;
    Ok(Applied { events, decode_failures, root, cursor })
}

/// A range's logs with the headers they are checked against, fetched together.
struct Fetched {
    logs: Vec<Log>,
    /// The cursor's block (when the range extends one), the range's ends, and every block of
    /// the range inside the reorg window; `None` where the RPC does not have the block yet.
    headers: BTreeMap<u64, Option<Header>>,
}

type RangeFetch = tokio::task::JoinHandle<Result<Fetched, IndexError>>;

async fn fetch_header(
    provider: &DynProvider,
    timeout: Duration,
    number: u64,
) -> Result<Option<Header>, IndexError> {
    let block = with_timeout("eth_getBlockByNumber", timeout, || {
        provider.get_block_by_number(BlockNumberOrTag::Number(number))
    })
    .await?;
    Ok(block.map(|b| Header::of(&b.header)))
}

/// Headers asked for in one JSON-RPC batch: what the indexer reads of a block.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchedHeader {
    hash: B256,
    parent_hash: B256,
    #[serde(with = "alloy::serde::quantity")]
    timestamp: u64,
}

/// Calls in one JSON-RPC batch. Public RPC services take batches of 100 or more; a smaller
/// batch keeps a failed one cheap to retry.
const HEADER_BATCH: usize = 64;

/// The headers of `numbers`, `HEADER_BATCH` to a JSON-RPC batch: one HTTP request for many
/// blocks costs the RPC a third of the CPU that as many single requests do. A batch that fails
/// (an RPC that takes no batches, a dropped connection, an error for any call in it) is not
/// retried as a batch: its headers are asked for one by one, each call with its retries.
async fn fetch_headers(
    provider: &DynProvider,
    timeout: Duration,
    numbers: &[u64],
) -> Result<Vec<(u64, Option<Header>)>, IndexError> {
    let batches = numbers.chunks(HEADER_BATCH).map(|chunk| async move {
        let batch = async {
            let mut batch = alloy::rpc::client::BatchRequest::new(provider.client());
            let waiters = chunk
                .iter()
                .map(|&n| {
                    batch.add_call::<_, Option<BatchedHeader>>(
                        "eth_getBlockByNumber",
                        &(BlockNumberOrTag::Number(n), false),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            batch.send().await?;
            futures::future::try_join_all(waiters).await
        };
        match tokio::time::timeout(timeout, batch).await {
            Ok(Ok(answers)) => Ok(chunk
                .iter()
                .zip(answers)
                .map(|(&n, h)| {
                    (n, h.map(|h| Header { hash: h.hash, parent_hash: h.parent_hash, timestamp: h.timestamp }))
                })
                .collect()),
            failed => {
                metrics::counter!("agora_index_rpc_errors_total").increment(1);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                tracing::debug!(target: "agora::index", error = %why, "a batch of headers failed; asking one by one");
                futures::stream::iter(chunk.to_vec())
                    .map(|n| async move { fetch_header(provider, timeout, n).await.map(|h| (n, h)) })
                    .buffer_unordered(16)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
            }
        }
    });
    Ok(futures::future::try_join_all(batches).await?.into_iter().flatten().collect())
}

pub struct Indexer {
    provider: DynProvider,
    deployment: Deployment,
    store: Store,
    config: IndexerConfig,
    range: u64,
    /// The next ranges, fetched while the current one is applied: (from, to, fetch), in order.
    prefetch: std::collections::VecDeque<(u64, u64, RangeFetch)>,
    /// The chain's head as last asked, and when: a backfill that is still behind it needs no
    /// fresh head before each range.
    known_head: Option<(u64, std::time::Instant)>,
    status: watch::Sender<IndexStatus>,
    subscribe: bool,
    /// Lanes of rewritten records for the state root, kept from one range to the next.
    lanes: LaneCache,
}

impl Indexer {
    pub fn new(
        provider: DynProvider,
        deployment: Deployment,
        store: Store,
        config: IndexerConfig,
        subscribe: bool,
    ) -> Result<(Self, watch::Receiver<IndexStatus>), StoreError> {
        let cursor = load_cursor(&store)?;
        let status = IndexStatus {
            indexed_block: cursor.map(|c| c.number),
            indexed_hash: cursor.map(|c| c.hash),
            confirmations: config.confirmations,
            state_root: load_root(&store)?.digest(),
            reorgs: load_reorgs(&store)?,
            ..IndexStatus::default()
        };
        let (tx, rx) = watch::channel(status);
        let range = config.max_range.clamp(1, 1_000);
        Ok((
            Self {
                provider,
                deployment,
                store,
                config,
                range,
                prefetch: Default::default(),
                known_head: None,
                status: tx,
                subscribe,
                lanes: LaneCache::new(),
            },
            rx,
        ))
    }

    /// Follows the chain until `shutdown` flips to true, or until a fatal error.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut heads = if self.subscribe {
            match self.provider.subscribe_blocks().await {
                Ok(sub) => Some(sub.into_stream()),
                Err(e) => {
                    tracing::warn!(target: "agora::indexer", error = %e, "cannot subscribe to new heads; polling instead");
                    None
                }
            }
        } else {
            None
        };
        loop {
            // A bug must not leave a node serving an index that silently stopped: a panic in a
            // step stops the indexer loudly, like a reorg deeper than the window.
            let step = tokio::select! {
                step = std::panic::AssertUnwindSafe(self.step()).catch_unwind() => step.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown panic");
                    Err(IndexError::Fatal(format!("the indexer crashed: {what}")))
                }),
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let wait = match step {
                Ok(Step::Advanced) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(Step::Waiting) => {
                    backoff = Duration::from_millis(100);
                    self.config.poll
                }
                Err(IndexError::Fatal(reason)) => {
                    tracing::error!(target: "agora::indexer", %reason, "indexer stopped");
                    self.status.send_modify(|s| s.fatal = Some(reason));
                    let _ = shutdown.wait_for(|stop| *stop).await;
                    return;
                }
                Err(e) => {
                    metrics::counter!("agora_index_step_failures_total").increment(1);
                    tracing::warn!(target: "agora::indexer", error = %e, retry_in = ?backoff, "indexer step failed");
                    if let IndexError::Rpc(message) = &e {
                        let message = message.clone();
                        self.status.send_modify(|s| {
                            s.rpc_healthy = false;
                            s.rpc_error = Some(message);
                        });
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Some(_) = async { match heads.as_mut() { Some(h) => h.next().await, None => None } } => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Indexes up to `to_block` (or the head) and returns the cursor there; for rebuilds.
    pub async fn sync(&mut self) -> Result<Option<Cursor>, IndexError> {
        let mut failures = 0u32;
        loop {
            match self.step().await {
                Ok(Step::Advanced) => failures = 0,
                Ok(Step::Waiting) => return Ok(load_cursor(&self.store)?),
                Err(e @ IndexError::Fatal(_)) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures > 20 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                }
            }
        }
    }

    async fn rpc<T, E: std::fmt::Display, F: std::future::IntoFuture<Output = Result<T, E>>>(
        &self,
        what: &str,
        call: impl Fn() -> F,
    ) -> Result<T, IndexError> {
        with_timeout(what, self.config.rpc_timeout, call).await
    }

    async fn header(&self, number: u64) -> Result<Option<Header>, IndexError> {
        fetch_header(&self.provider, self.config.rpc_timeout, number).await
    }

    /// The chain's head: asked afresh unless a backfill is still behind the one last seen
    /// (within a poll interval), which spares a round trip per range.
    async fn head(&mut self, next: u64) -> Result<u64, IndexError> {
        if let Some((head, at)) = self.known_head
            && next <= head
            && at.elapsed() < self.config.poll
        {
            return Ok(head);
        }
        let head = self.rpc("eth_blockNumber", || self.provider.get_block_number()).await?;
        self.known_head = Some((head, std::time::Instant::now()));
        Ok(head)
    }

    /// Fetches a range's logs and, at the same time, the headers they are checked against.
    fn fetch_range(
        &self,
        from: u64,
        to: u64,
        window_start: u64,
    ) -> impl std::future::Future<Output = Result<Fetched, IndexError>> + use<> {
        let mut contracts = vec![self.deployment.model_registry, self.deployment.license_market];
        if self.deployment.has_compute() {
            contracts.push(self.deployment.compute_market);
        }
        let filter = Filter::new().address(contracts).from_block(from).to_block(to);
        let mut wanted: Vec<u64> = vec![from, to];
        if from > self.deployment.deployment_block {
            wanted.push(from - 1);
        }
        wanted.extend(from.max(window_start)..=to);
        wanted.sort_unstable();
        wanted.dedup();
        let provider = self.provider.clone();
        let timeout = self.config.rpc_timeout;
        async move {
            let logs = with_timeout("eth_getLogs", timeout, || provider.get_logs(&filter));
            let headers = fetch_headers(&provider, timeout, &wanted);
            let (logs, headers) = futures::join!(logs, headers);
            Ok(Fetched { logs: logs?, headers: headers?.into_iter().collect() })
        }
    }

    /// Compares the cursor with the chain's block at its height: `Some(step)` when the step
    /// ends there (a lagging replica to wait for, or a reorg unwound).
    async fn check_cursor(
        &mut self,
        cursor: Cursor,
        chain: Option<Header>,
        head: u64,
    ) -> Result<Option<Step>, IndexError> {
        match chain {
            // A lagging replica: it has not seen our block yet.
            None => {
                self.publish_head(head, None, cursor);
                Ok(Some(Step::Waiting))
            }
            Some(h) if h.hash != cursor.hash => {
                self.abort_prefetch();
                self.known_head = None;
                self.unwind_reorg(cursor).await?;
                Ok(Some(Step::Advanced))
            }
            Some(_) => Ok(None),
        }
    }

    async fn step(&mut self) -> Result<Step, IndexError> {
        let cursor = load_cursor(&self.store)?;
        let window = self.config.window();
        let next = cursor.map(|c| c.number + 1).unwrap_or(self.deployment.deployment_block);
        let head = self.head(next).await?;
        let limit = self.config.to_block.map_or(head, |to| to.min(head));
        if next > limit {
            if let Some(cursor) = cursor {
                let chain = self.header(cursor.number).await?;
                if let Some(step) = self.check_cursor(cursor, chain, head).await? {
                    return Ok(step);
                }
                let head_timestamp = self.header(head).await?.map(|h| h.timestamp);
                self.publish_head(head, head_timestamp, cursor);
            }
            return Ok(Step::Waiting);
        }
        let window_start = head.saturating_sub(window);
        let prefetched = match self.prefetch.pop_front() {
            Some((from, to, fetch)) if from == next && to <= limit => Some((to, fetch)),
            Some((_, _, fetch)) => {
                fetch.abort();
                self.abort_prefetch();
                None
            }
            None => None,
        };
        let (to, fetched) = match prefetched {
            Some((to, fetch)) => {
                (to, fetch.await.unwrap_or_else(|e| Err(IndexError::Rpc(format!("eth_getLogs: {e}")))))
            }
            None => {
                let to = limit.min(next + self.range - 1);
                (to, self.fetch_range(next, to, window_start).await)
            }
        };
        let Fetched { logs, headers } = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                // too many results, a provider's range limit, or a failure: ask for less
                self.range = (self.range / 2).max(1);
                return Err(e);
            }
        };
        if let Some(cursor) = cursor
            && let Some(step) =
                self.check_cursor(cursor, headers.get(&cursor.number).copied().flatten(), head).await?
        {
            return Ok(step);
        }
        let mut checked = BTreeMap::new();
        for (n, header) in headers {
            match header {
                Some(header) => {
                    checked.insert(n, header);
                }
                None if n >= next => {
                    return Err(IndexError::Inconsistent(format!("block {n} is not available yet")));
                }
                None => {}
            }
        }
        let headers = checked;
        // Fetch the next ranges while this one is applied: two in flight keep the RPC busy
        // while this node parses one and applies another. What they bring is checked in their
        // own step like any other fetch: against their headers and the previous range's last
        // block.
        while self.prefetch.len() < PREFETCH_DEPTH {
            let after = self.prefetch.back().map_or(to, |(_, until, _)| *until);
            if after >= limit {
                break;
            }
            let (from, until) = (after + 1, limit.min(after + self.range));
            self.prefetch.push_back((from, until, tokio::spawn(self.fetch_range(from, until, window_start))));
        }
        self.check_consistency(cursor, next, to, &headers, &logs)?;

        let Applied { events, decode_failures, root, cursor: last } = apply_range(
            &self.store,
            &mut self.lanes,
            &self.deployment,
            &logs,
            &headers,
            next..=to,
            window_start,
            window,
        )?;

        self.range = (self.range * 2).min(self.config.max_range.max(1));
        metrics::counter!("agora_index_events_applied_total").increment(events);
        metrics::gauge!("agora_index_block").set(to as f64);
        metrics::gauge!("agora_index_lag_blocks").set(head.saturating_sub(to) as f64);
        let confirmations = self.config.confirmations;
        self.status.send_modify(|s| {
            s.head = Some(head);
            s.indexed_block = Some(to);
            s.indexed_hash = Some(last.hash);
            s.final_block = head.checked_sub(confirmations);
            s.lag = Some(head.saturating_sub(to));
            s.state_root = root.digest();
            s.events_applied += events;
            s.decode_failures += decode_failures;
            s.rpc_healthy = true;
            s.rpc_error = None;
            if to == head {
                s.head_timestamp = Some(last.timestamp);
            }
        });
        tracing::debug!(target: "agora::indexer", from = next, to, events, "applied range");
        Ok(Step::Advanced)
    }

    fn abort_prefetch(&mut self) {
        for (_, _, fetch) in self.prefetch.drain(..) {
            fetch.abort();
        }
    }

    fn publish_head(&self, head: u64, head_timestamp: Option<u64>, cursor: Cursor) {
        let confirmations = self.config.confirmations;
        metrics::gauge!("agora_index_lag_blocks").set(head.saturating_sub(cursor.number) as f64);
        self.status.send_modify(|s| {
            s.head = Some(head);
            if head_timestamp.is_some() {
                s.head_timestamp = head_timestamp;
            }
            s.final_block = head.checked_sub(confirmations);
            s.lag = Some(head.saturating_sub(cursor.number));
            s.rpc_healthy = true;
            s.rpc_error = None;
        });
    }

    /// The fetched logs and headers must form one chain that extends the cursor.
    fn check_consistency(
        &self,
        cursor: Option<Cursor>,
        next: u64,
        to: u64,
        headers: &BTreeMap<u64, Header>,
        logs: &[Log],
    ) -> Result<(), IndexError> {
        if let Some(cursor) = cursor
            && headers[&next].parent_hash != cursor.hash
        {
            return Err(IndexError::Inconsistent(format!(
                "block {next} does not extend block {}",
                cursor.number
            )));
        }
        for (n, header) in headers.range(next..=to).skip_while(|(n, _)| **n == next) {
            if let Some(parent) = headers.get(&(n - 1))
                && header.parent_hash != parent.hash
            {
                return Err(IndexError::Inconsistent(format!("block {n} does not extend block {}", n - 1)));
            }
        }
        for log in logs {
            if log.removed {
                return Err(IndexError::Inconsistent(format!("log {} was removed", describe(log))));
            }
            let (Some(number), Some(hash)) = (log.block_number, log.block_hash) else {
                return Err(IndexError::Inconsistent(format!("log {} is pending", describe(log))));
            };
            if let Some(header) = headers.get(&number)
                && header.hash != hash
            {
                return Err(IndexError::Inconsistent(format!(
                    "log {} is from another branch",
                    describe(log)
                )));
            }
        }
        Ok(())
    }

    /// The cursor's block is no longer canonical: unwind to the common ancestor.
    async fn unwind_reorg(&mut self, cursor: Cursor) -> Result<(), IndexError> {
        let window = self.config.window();
        let start = self.deployment.deployment_block;
        let floor = cursor.number.saturating_sub(window);
        let mut ancestor: Option<Cursor> = None;
        let mut n = cursor.number;
        while n > floor && n > start {
            n -= 1;
            let Some(record) = self.store.get::<Blocks>(&n)? else {
                return Err(self.too_deep(cursor, n));
            };
            if self.header(n).await?.is_some_and(|h| h.hash == record.hash) {
                ancestor = Some(Cursor { number: n, hash: record.hash, timestamp: record.timestamp });
                break;
            }
        }
        if ancestor.is_none() && n > start {
            return Err(self.too_deep(cursor, n));
        }

        let bottom = ancestor.map_or(start, |a| a.number + 1);
        let mut w = IndexWriter::new(&self.store)?.with_lanes(&mut self.lanes);
        for number in (bottom..=cursor.number).rev() {
            match self.store.get::<Blocks>(&number)? {
                Some(record) => w.unwind_block(number, &record)?,
                None => return Err(self.too_deep(cursor, number)),
            }
        }
        let reorgs = load_reorgs(&self.store)? + 1;
        let root = w.commit(ancestor, Some(reorgs))?;
        let depth = cursor.number + 1 - bottom;
        metrics::counter!("agora_index_reorgs_total").increment(1);
        metrics::histogram!("agora_index_reorg_depth_blocks").record(depth as f64);
        tracing::warn!(target: "agora::indexer", depth, from = cursor.number, to = ?ancestor.map(|a| a.number), "chain reorganised; unwound the index");
        self.status.send_modify(|s| {
            s.reorgs = reorgs;
            s.last_reorg_depth = Some(depth);
            s.indexed_block = ancestor.map(|a| a.number);
            s.indexed_hash = ancestor.map(|a| a.hash);
            s.state_root = root.digest();
        });
        Ok(())
    }

    fn too_deep(&self, cursor: Cursor, at: u64) -> IndexError {
        IndexError::Fatal(format!(
            "the chain reorganised deeper than the {} blocks the index keeps (block {at} of an index at {}); \
             the index cannot be unwound safely: stop the node and rebuild it (`agora index rebuild`, or move the data dir's db/ away)",
            self.config.window(),
            cursor.number
        ))
    }
}
