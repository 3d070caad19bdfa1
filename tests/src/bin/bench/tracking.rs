//! `agora-bench tracking [--points N]`: how fast a training loop's metrics are kept, at the
//! store (no HTTP), beside bare RocksDB writes of the same records in the same run:
//! - `log-batch` of 1,000 points a call (MLflow's largest batch): points/s, against one synced
//!   RocksDB batch of 1,000 raw puts;
//! - one point a call (`log-metric`): calls/s, against one synced raw put a call — both bound by
//!   the disk's sync;
//! - reading a metric's whole history back.

use std::time::Instant;

use agora_node::{
    audit::Audit,
    registry::Context,
    store::{Store, tables::TrackingMetrics},
    tracking::{DEFAULT_EXPERIMENT, Logs, MetricValue, NewRun, Tracking},
};

pub fn run(points: usize) -> anyhow::Result<()> {
    let points = points.max(1_000) / 1_000 * 1_000;
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("db"))?;
    let tracking = Tracking::open(store.clone(), Audit::new(store.clone()))?;
    let ctx = Context::operator();
    let point =
        |i: usize| MetricValue { value: 1.0 / (i + 1) as f64, step: i as i64, timestamp: 1_700_000_000_000 };
    println!("tracking: {points} points of one metric into one run, synced writes, no HTTP");

    let run = tracking.create_run(&ctx, DEFAULT_EXPERIMENT, NewRun::default())?.run_id();
    let started = Instant::now();
    for chunk in 0..points / 1_000 {
        let metrics = (chunk * 1_000..(chunk + 1) * 1_000).map(|i| ("loss".to_owned(), point(i))).collect();
        tracking.log(&ctx, &run, Logs { metrics, ..Logs::default() })?;
    }
    let batched = started.elapsed().as_secs_f64();

    // the same records as bare puts: key and value as the tracking table encodes them
    let raw_key = |run: u8, i: usize| {
        let mut key = vec![run; 16];
        key.extend_from_slice(b"loss\0");
        key.extend_from_slice(&(i as u64).to_be_bytes());
        key
    };
    let value = agora_node::store::encode::<TrackingMetrics>(&point(0))?;
    let started = Instant::now();
    for chunk in 0..points / 1_000 {
        let mut batch = store.batch();
        for i in chunk * 1_000..(chunk + 1) * 1_000 {
            batch.put_raw("tracking_metrics", &raw_key(0xaa, i), &value);
        }
        store.write(batch)?;
    }
    let bare_batched = started.elapsed().as_secs_f64();

    let singles = (points / 10).clamp(100, 2_000);
    let run_single = tracking.create_run(&ctx, DEFAULT_EXPERIMENT, NewRun::default())?.run_id();
    let started = Instant::now();
    for i in 0..singles {
        tracking.log(
            &ctx,
            &run_single,
            Logs { metrics: vec![("loss".to_owned(), point(i))], ..Logs::default() },
        )?;
    }
    let single = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..singles {
        let mut batch = store.batch();
        batch.put_raw("tracking_metrics", &raw_key(0xbb, i), &value);
        store.write(batch)?;
    }
    let bare_single = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (history, _) = tracking.metric_history(&run, "loss", 0, usize::MAX)?;
    let read = started.elapsed().as_secs_f64();
    anyhow::ensure!(history.len() == points, "read back {} of {points} points", history.len());

    println!("{:<58} {:>12}", "", "per second");
    println!(
        "{:<58} {:>12.0}",
        "bare RocksDB, 1,000 raw puts a synced batch (baseline)",
        points as f64 / bare_batched
    );
    println!(
        "{:<58} {:>12.0}  ({:.0}% of bare)",
        "log-batch, 1,000 points a call (points)",
        points as f64 / batched,
        100.0 * bare_batched / batched
    );
    println!(
        "{:<58} {:>12.0}",
        "bare RocksDB, one synced put a call (baseline)",
        singles as f64 / bare_single
    );
    println!(
        "{:<58} {:>12.0}  ({:.0}% of bare)",
        "log-metric, one point a call (calls)",
        singles as f64 / single,
        100.0 * bare_single / single
    );
    println!("{:<58} {:>12.0}", "metric history read back (points)", points as f64 / read);
    Ok(())
}
