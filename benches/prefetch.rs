//! The prefetch targets that are not accuracy (those are `meshfs
//! prefetch-eval`'s, see scripts/bench-prefetch): prediction time per event,
//! training time per round, and the daemon's memory for the model and the
//! log at 1M events. Run with `cargo bench --bench prefetch`; it prints one
//! line per figure.
//!
//! Memory: 1M events of the mixed workload are written to a real RocksDB
//! access log, then the real engine (daemon parameters) starts on it, replays
//! the newest 100,000 as the daemon does at start-up, and takes 20,000 more
//! through its inbox, sent as fast as it takes them, as a device that was
//! away would receive them: the count tables score every event, the GRU
//! only those that find the engine caught up (see engine.rs, `Backlog`).
//! The figure is the growth of this process's resident set over that.

use meshfs::ids::{DeviceId, ResourceId};
use meshfs::prefetch::engine::{self, EngineConfig, Outputs};
use meshfs::prefetch::log::{self, AccessEvent, UserHash};
use meshfs::prefetch::predict::{Markov, Predictor};
use meshfs::prefetch::rnn::{Gru, GruConfig};
use meshfs::prefetch::{temperature::PlanConfig, workload, Interner, Sym};
use meshfs::storage::{AccessRecord, RocksStore};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

/// The daemon's GRU shape (node.rs).
fn daemon_gru() -> GruConfig {
    GruConfig {
        capacity: 2048,
        train_every: 0,
        steps: 4,
        batch: 24,
        ..Default::default()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let trace = workload::generate("mixed", 1_000_000, 1).unwrap_or_default();
    let mut paths: Interner<String> = Interner::new();
    let syms: Vec<Sym> = trace.iter().map(|e| paths.intern(&e.path)).collect();

    // Prediction and training time with the daemon's parameters, after
    // learning the first 20,000 events.
    let mut markov = Markov::new(4, 300_000);
    let mut gru = match Gru::new(daemon_gru()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("libtorch: {e}");
            return;
        }
    };
    for w in syms[..20_000].windows(17) {
        markov.observe(&w[..16], w[16]);
        gru.observe(&w[..16], w[16]);
    }
    let t = Instant::now();
    let mut rounds = 0;
    while rounds < 20 {
        gru.train_round();
        rounds += 1;
    }
    println!(
        "gru training round (4 steps x 24 windows, capacity 2048): {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0 / rounds as f64
    );
    for (name, p) in [
        ("markov-4", &mut markov as &mut dyn Predictor),
        ("gru", &mut gru as &mut dyn Predictor),
    ] {
        let t = Instant::now();
        let n = 2000;
        for w in syms[20_000..20_000 + n].windows(16) {
            std::hint::black_box(p.predict(w, 8));
        }
        println!(
            "{name} prediction: {:.1} us per event",
            t.elapsed().as_secs_f64() * 1e6 / (n - 15) as f64
        );
    }
    // Every prediction computed, none remembered: the model's own cost.
    let t = Instant::now();
    let n = 2000;
    for w in syms[20_000..20_000 + n].windows(16) {
        gru.forget_predictions();
        std::hint::black_box(gru.predict(w, 8));
    }
    println!(
        "gru prediction, never remembered: {:.1} us per event",
        t.elapsed().as_secs_f64() * 1e6 / (n - 15) as f64
    );
    drop((markov, gru));

    // Memory at 1M events.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RocksStore::open(dir.path()).expect("store"));
    let other = DeviceId([9; 16]);
    let user = UserHash([1; 16]);
    let event = |i: usize, s: Sym| AccessEvent {
        resource: ResourceId(u64::from(s) + 2),
        device: other,
        seq: i as u64,
        user,
        ts_ms: log::coarse(1_795_000_000_000 + i as u64 * 1000),
        size: trace[i % trace.len()].size,
    };
    let t = Instant::now();
    for (c, chunk) in syms.chunks(10_000).enumerate() {
        let recs: Vec<AccessRecord> = chunk
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                let e = event(c * 10_000 + j, s);
                AccessRecord {
                    ts_ms: e.ts_ms,
                    origin: e.origin(),
                    seq: e.seq,
                    value: log::encode(&e),
                }
            })
            .collect();
        store.access_put(&recs).expect("access_put");
    }
    println!(
        "wrote {} events to the access log in {:.1} s",
        syms.len(),
        t.elapsed().as_secs_f64()
    );
    let before = rss_mib();
    let (plans, mut plans_rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || while plans_rx.blocking_recv().is_some() {});
    let model_dir = dir.path().join("model");
    let cfg = EngineConfig {
        me: DeviceId([1; 16]),
        learn: true,
        share: false,
        prefetch: true,
        user_key: [0; 32],
        users: Default::default(),
        gru: daemon_gru(),
        model_dir,
        max_events: 1_000_000,
        max_age_ms: u64::MAX / 2,
        plan: PlanConfig::default(),
        half_life_ms: 6 * 3600 * 1000,
        follow_after: None,
    };
    let t = Instant::now();
    let (handle, thread) = engine::start(
        cfg,
        store.clone(),
        Outputs {
            publish: Box::new(|_| {}),
            plans,
        },
    )
    .expect("engine");
    let extra = 20_000;
    let base = syms.len();
    for chunk in (0..extra).collect::<Vec<_>>().chunks(log::MAX_BATCH) {
        let batch: Vec<AccessEvent> = chunk
            .iter()
            .map(|&k| event(base + k, syms[k % base]))
            .collect();
        // 40 batches: far fewer than the inbox holds, so none is dropped.
        handle.remote(other, log::encode_batch(&batch));
    }
    while handle.stats.remote_events.load(Ordering::Relaxed) < extra as u64 {
        assert_eq!(handle.stats.dropped_events.load(Ordering::Relaxed), 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t.elapsed().as_secs_f64();
    let after = rss_mib();
    println!(
        "engine on a 1M-event log: warm start + {extra} events in {secs:.1} s ({:.0} us per event incl. warm start); resident set {before:.0} -> {after:.0} MiB (+{:.0} MiB for model and log)",
        secs * 1e6 / extra as f64,
        after - before
    );
    // The engine brings its report up to date at least once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let report = handle
        .stats
        .report
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    println!("model: {report:?}");
    handle.stop(thread);
}
