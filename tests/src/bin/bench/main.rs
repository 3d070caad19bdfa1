//! `scripts/bench`: benchmarks printed beside a ceiling measured in the same run.
//!
//! `agora-bench watermark [--gib N]`: see `watermark.rs`; `agora-bench artifacts [--gib N]`: see
//! `artifacts.rs`; `agora-bench flows [--gib N]`: see `flows.rs`; `agora-bench serve [--requests N] [--callers N]`: see `serve.rs`;
//! `agora-bench p2p [--nodes N] [--orders N] [--mib N]`: see `p2p.rs`; `agora-bench compute
//! [--offers N] [--rows N]`: see `compute.rs`.
//!
//! `agora-bench index [--events N]`: makes N marketplace events on a local anvil (purchases,
//! distributions with their credits), then times a cold backfill into an empty data dir, beside
//! the ceiling of fetching the same logs with `eth_getLogs` and decoding them without storing
//! (one range at a time, and three in flight; the faster counts), and the indexer's store side
//! alone (the same logs applied from memory). `--store-side-only N` runs only the store side, N
//! times (for profiles).

mod artifacts;
mod compute;
mod flows;
mod p2p;
mod serve;
mod tracking;
mod watermark;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use agora_contracts::{LicenseMarket, ModelRegistry};
use agora_e2e::market::Market;
use agora_node::{
    chain::{
        self,
        indexer::{Header, Indexer, IndexerConfig, apply_range},
        root::LaneCache,
    },
    node::deployment_id,
    store::Store,
};
use alloy::{providers::Provider, rpc::types::Filter, sol_types::SolEventInterface};
use futures::StreamExt;

/// A local chain with the contracts and a node on it (quiet logs but for the copies it makes
/// ahead, which the flows benchmark waits for), with `token` as operator.
async fn chain_and_node(token: &str) -> anyhow::Result<(Market, tempfile::TempDir, agora_e2e::Node)> {
    let market = Market::start().await;
    let data = tempfile::tempdir()?;
    let node = agora_e2e::Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_ADMIN_TOKEN", token), ("AGORA_LOG", "warn,agora::delivery=info")],
    );
    Ok((market, data, node))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gib = || option(&args, "--gib").unwrap_or(1.0);
    let count = |name: &str, default: usize| option(&args, name).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("index") => {
            bench_index(option(&args, "--events").unwrap_or(50_000), option(&args, "--store-side-only")).await
        }
        Some("watermark") => {
            let gib = gib();
            tokio::task::spawn_blocking(move || watermark::run(gib)).await?
        }
        Some("serve") => serve::run(count("--requests", 2_000).max(1), count("--callers", 8).max(1)).await,
        Some("flows") => flows::run(gib()).await,
        Some("p2p") => {
            p2p::run(count("--nodes", 10).max(2), count("--orders", 100).max(1), count("--mib", 256).max(1))
                .await
        }
        Some("compute") => {
            let (offers, rows) = (count("--offers", 10_000).max(1), count("--rows", 16_384).max(256));
            tokio::task::spawn_blocking(move || compute::run(offers, rows)).await?
        }
        Some("artifacts") => artifacts::run(gib()).await,
        Some("tracking") => {
            let points = count("--points", 100_000);
            tokio::task::spawn_blocking(move || tracking::run(points)).await?
        }
        _ => {
            anyhow::bail!(
                "usage: agora-bench index [--events N] [--store-side-only N] | watermark [--gib N] | artifacts [--gib N] | flows [--gib N] | serve [--requests N] [--callers N] | p2p [--nodes N] [--orders N] [--mib N] | compute [--offers N] [--rows N] | tracking [--points N]"
            )
        }
    }
}

/// The value after `name` in `args`, when there is one and it parses.
fn option<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

async fn bench_index(target_events: u64, store_side_only: Option<usize>) -> anyhow::Result<()> {
    println!("index: making {target_events} marketplace events on a local anvil …");
    let market =
        Market::start_with(agora_contracts::anvil::Anvil::builder().arg("--gas-limit").arg("100000000"))
            .await;
    let models = 250u64;
    let mut tokens = Vec::new();
    for i in 0..models {
        tokens.push(market.register(&format!("bench-{i}")).await);
    }
    let made = Instant::now();
    market.set_automine(false).await;
    let buyer = 5;
    let mut buyer_nonce = market.nonce_of(buyer).await;
    let mut operator_nonce = market.nonce_of(0).await;
    let mut events = 0u64;
    while events < target_events {
        // one purchase per model, then one distribution per model (Distributed + 3 Credited)
        let sends = tokens.iter().enumerate().map(|(i, token)| {
            let nonce = buyer_nonce + i as u64;
            let market = &market;
            async move { market.send_buy(*token, buyer, 0, nonce).await }
        });
        futures::stream::iter(sends).buffer_unordered(32).collect::<Vec<_>>().await;
        buyer_nonce += models;
        market.mine(1).await;
        let sends = tokens.iter().enumerate().map(|(i, token)| {
            let nonce = operator_nonce + i as u64;
            let market = &market;
            async move {
                market
                    .market
                    .distribute(*token)
                    .from(market.address(0))
                    .nonce(nonce)
                    .gas(200_000)
                    .send()
                    .await
                    .unwrap()
            }
        });
        futures::stream::iter(sends).buffer_unordered(32).collect::<Vec<_>>().await;
        operator_nonce += models;
        market.mine(1).await;
        events += models * 5;
    }
    market.set_automine(true).await;
    let head = market.provider.get_block_number().await?;
    println!("index: {events} events in {head} blocks made in {:.1} s", made.elapsed().as_secs_f64());

    // All sides fetch the same 16-block ranges (up to about 4,000 logs each here). The ceiling
    // is measured one range at a time and with three requests in flight (the indexer keeps two
    // ranges in flight while it applies a third), and the faster counts. Each is run five times,
    // alternating, and the median is reported: single runs on a 2-core machine shared with anvil
    // vary by ±25 %.
    let config =
        IndexerConfig { to_block: Some(head), confirmations: 0, max_range: 16, ..IndexerConfig::default() };
    let (mut serial, mut pipelined, mut backfills, mut alone) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let fetched = fetch_ranges(&market, &config, head).await?;
    if let Some(runs) = store_side_only {
        // for profiling the store side: nothing else runs in this process meanwhile
        let mut took = Vec::new();
        for _ in 0..runs {
            took.push(store_side_alone(&market, &config, &fetched, head)?.1);
        }
        println!("store side alone, {runs} runs (s): {:?}", secs(&took));
        return Ok(());
    }
    let mut decoded = 0;
    // CPU seconds of this process and of anvil over each kind of run, summed over the runs: the
    // machine has two cores, so the three compete for the same CPU.
    let me = nix::unistd::Pid::this();
    let anvil = nix::unistd::Pid::from_raw(market.anvil.pid().unwrap_or_default() as i32);
    let mut cpu = [(0.0f64, 0.0f64); 3];
    let mut charge = |kind: usize, before: (f64, f64)| {
        cpu[kind].0 += cpu_seconds(me) - before.0;
        cpu[kind].1 += cpu_seconds(anvil) - before.1;
    };
    let now = || (cpu_seconds(me), cpu_seconds(anvil));
    for _ in 0..5 {
        let before = now();
        let (n, took) = fetch_and_decode(&market, &config, head, 1).await?;
        charge(0, before);
        decoded = n;
        serial.push(took);
        let before = now();
        let (n, took) = fetch_and_decode(&market, &config, head, 3).await?;
        charge(1, before);
        anyhow::ensure!(n == decoded, "decoded {n} events with requests in flight, {decoded} without");
        pipelined.push(took);
        let before = now();
        let (applied, took) = backfill(&market, &config, head).await?;
        charge(2, before);
        anyhow::ensure!(applied == decoded, "applied {applied} events, the chain has {decoded}");
        backfills.push(took);
        let (applied, took) = store_side_alone(&market, &config, &fetched, head)?;
        anyhow::ensure!(applied == decoded, "applied {applied} events from memory, the chain has {decoded}");
        alone.push(took);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (serial_took, pipelined_took, took, alone_took) =
        (median(&mut serial), median(&mut pipelined), median(&mut backfills), median(&mut alone));
    let ceiling = serial_took.min(pipelined_took);
    let rate = |d: Duration| decoded as f64 / d.as_secs_f64();
    println!();
    println!("| index backfill ({decoded} events, {head} blocks; median of 5) | events/s | time |");
    println!("| --- | ---: | ---: |");
    for (what, d) in [("one range at a time", serial_took), ("three ranges in flight", pipelined_took)] {
        println!(
            "| ceiling: eth_getLogs + decode, nothing stored, {what} | {:.0} | {:.2} s |",
            rate(d),
            d.as_secs_f64()
        );
    }
    println!("| agora indexer, cold, into RocksDB | {:.0} | {:.2} s |", rate(took), took.as_secs_f64());
    println!(
        "| its store side alone: the same logs applied from memory, one thread, no RPC | {:.0} | {:.2} s |",
        rate(alone_took),
        alone_took.as_secs_f64()
    );
    println!(
        "| ratio | {:.0} % of the faster ceiling (target ≥ 80 %), target ≥ 20 000 events/s | |",
        100.0 * rate(took) / rate(ceiling)
    );
    println!(
        "runs (s): ceiling {:?}, ceiling in flight {:?}, indexer {:?}, store side alone {:?}",
        secs(&serial),
        secs(&pipelined),
        secs(&backfills),
        secs(&alone)
    );
    let [serial_cpu, pipelined_cpu, indexer_cpu] = cpu.map(|(me, anvil)| (me / 5.0, anvil / 5.0));
    println!(
        "CPU a run (s; this process + anvil): ceiling {:.2} + {:.2}, ceiling in flight {:.2} + {:.2}, indexer {:.2} + {:.2}",
        serial_cpu.0, serial_cpu.1, pipelined_cpu.0, pipelined_cpu.1, indexer_cpu.0, indexer_cpu.1
    );
    Ok(())
}

/// Sends everything `source` holds over one loopback TCP connection to a reader in this process
/// (no framing, no crypto): the ceiling of any transfer between two processes on this machine.
/// (bytes received, seconds from connecting to the last byte).
async fn loopback_copy<R>(mut source: R) -> anyhow::Result<(usize, f64)>
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let sender = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        tokio::io::copy_buf(&mut source, &mut socket).await?;
        socket.shutdown().await
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(address).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0usize;
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    sender.await??;
    Ok((received, seconds))
}

/// CPU seconds `pid` has used so far, from `/proc/PID/stat` (in USER_HZ, 100 a second on
/// Linux). Zero where it cannot be read.
fn cpu_seconds(pid: nix::unistd::Pid) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn secs(v: &[Duration]) -> Vec<f64> {
    v.iter().map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0).collect()
}

/// The last block of the range that starts at `from`, as the indexer's ranges fall here.
fn range_end(config: &IndexerConfig, from: u64, head: u64) -> u64 {
    (from + config.max_range - 1).min(head)
}

/// The marketplace's logs of blocks `from..=to`.
fn range_filter(market: &Market, from: u64, to: u64) -> Filter {
    Filter::new()
        .address(vec![market.deployment.model_registry, market.deployment.license_market])
        .from_block(from)
        .to_block(to)
}

/// The ceiling: eth_getLogs over the indexer's ranges, `in_flight` requests at a time, and
/// decoding in block order; nothing stored.
async fn fetch_and_decode(
    market: &Market,
    config: &IndexerConfig,
    head: u64,
    in_flight: usize,
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut decoded = 0u64;
    let starts = (market.deployment.deployment_block..=head).step_by(config.max_range as usize);
    let mut fetches = futures::stream::iter(starts)
        .map(|from| {
            let filter = range_filter(market, from, range_end(config, from, head));
            async move { market.provider.get_logs(&filter).await }
        })
        .buffered(in_flight);
    while let Some(logs) = fetches.next().await {
        for log in logs? {
            let ok = if log.address() == market.deployment.model_registry {
                ModelRegistry::ModelRegistryEvents::decode_log(&log.inner).is_ok()
            } else {
                LicenseMarket::LicenseMarketEvents::decode_log(&log.inner).is_ok()
            };
            decoded += u64::from(ok);
        }
    }
    Ok((decoded, started.elapsed()))
}

/// A range of the indexer's as a backfill's step holds it: its blocks, its logs, and the
/// headers it is checked against (its ends and its blocks inside the reorg window).
struct Fetched {
    from: u64,
    to: u64,
    logs: Vec<alloy::rpc::types::Log>,
    headers: BTreeMap<u64, Header>,
}

/// What a backfill fetches, range by range, held in memory.
async fn fetch_ranges(market: &Market, config: &IndexerConfig, head: u64) -> anyhow::Result<Vec<Fetched>> {
    let window_start = head.saturating_sub(config.window());
    let mut ranges = Vec::new();
    for from in (market.deployment.deployment_block..=head).step_by(config.max_range as usize) {
        let to = range_end(config, from, head);
        let logs = market.provider.get_logs(&range_filter(market, from, to)).await?;
        let mut headers = BTreeMap::new();
        for n in (from..=to).filter(|n| *n == from || *n == to || *n >= window_start) {
            let block =
                market.provider.get_block_by_number(n.into()).await?.context("a block below the head")?;
            headers.insert(n, Header::of(&block.header));
        }
        ranges.push(Fetched { from, to, logs, headers });
    }
    Ok(ranges)
}

/// The indexer's store side alone: the fetched ranges applied from memory into an empty data
/// dir, range by range as a backfill applies them (effects, undo records in the reorg window,
/// root, one synced batch each), on this thread while nothing else runs: (events, time).
fn store_side_alone(
    market: &Market,
    config: &IndexerConfig,
    ranges: &[Fetched],
    head: u64,
) -> anyhow::Result<(u64, Duration)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("db"))?;
    let window = config.window();
    let window_start = head.saturating_sub(window);
    let started = Instant::now();
    let mut events = 0;
    let mut lanes = LaneCache::new();
    for Fetched { from, to, logs, headers } in ranges {
        let range = *from..=*to;
        events +=
            apply_range(&store, &mut lanes, &market.deployment, logs, headers, range, window_start, window)?
                .events;
    }
    Ok((events, started.elapsed()))
}

/// A cold backfill into an empty data dir: (events applied, time).
async fn backfill(market: &Market, config: &IndexerConfig, head: u64) -> anyhow::Result<(u64, Duration)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("db"))?;
    store.bind_deployment(&deployment_id(&market.deployment))?;
    let provider = chain::connect(&market.anvil.endpoint()).await?;
    let (mut indexer, status) =
        Indexer::new(provider, market.deployment.clone(), store, config.clone(), false)?;
    let started = Instant::now();
    let cursor = indexer.sync().await?;
    let took = started.elapsed();
    anyhow::ensure!(cursor.map(|c| c.number) == Some(head), "the backfill stopped short of the head");
    let applied = status.borrow().events_applied;
    Ok((applied, took))
}
