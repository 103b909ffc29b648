//! The prefetch executor: fetches what the engine's latest plan names, at
//! the lowest priority, within a budget, and keeps the ledger behind
//! `meshfs status`'s prefetch hits, misses and wasted bytes.
//!
//! Budget and priority: at most `rate` bytes per second; never more than
//! `max_unused` bytes of prefetched content not yet opened; never past the
//! cache limit (prefetching only fills free cache, so it never evicts
//! anything, let alone what the user opened recently); and it pauses while
//! a read is waiting on the network. A new plan supersedes the old one:
//! queued items are dropped and the file being fetched stops at its next
//! chunk unless the new plan names it too.

use super::engine::Plan;
use super::temperature::Depth;
use crate::fs::Fs;
use crate::ids::{ChunkHash, DeviceId, ResourceId};
use crate::mesh::MeshClient;
use crate::raft::Replica;
use crate::storage::ChunkStore;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefetched content not opened within this long counts as wasted (here
/// and in the evaluation harness's simulation).
pub(super) const UNUSED_EXPIRY: Duration = Duration::from_secs(3600);

/// Prefetch outcomes, shared by the executor, the filesystem's first-read
/// reports and `meshfs status`.
#[derive(Debug)]
pub struct Ledger {
    unused: Mutex<HashMap<ResourceId, (u64, Instant)>>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub wasted_bytes: AtomicU64,
    pub prefetched_bytes: AtomicU64,
    pub unused_bytes: AtomicU64,
    /// Reads waiting on the network right now: prefetching yields to them.
    foreground: AtomicU64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            unused: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            wasted_bytes: AtomicU64::new(0),
            prefetched_bytes: AtomicU64::new(0),
            unused_bytes: AtomicU64::new(0),
            foreground: AtomicU64::new(0),
        }
    }
}

impl Ledger {
    /// A read starts waiting on the network; it stops when the guard drops.
    pub fn foreground(&self) -> Foreground<'_> {
        self.foreground.fetch_add(1, Ordering::Relaxed);
        Foreground(self)
    }

    fn foreground_waiting(&self) -> bool {
        self.foreground.load(Ordering::Relaxed) > 0
    }

    /// The first read of a handle: a hit when prefetched content made the
    /// whole file local, a miss when it had to go to the network.
    pub fn first_read(&self, ino: ResourceId, local: bool) {
        let prefetched = crate::lock(&self.unused).remove(&ino);
        if let Some((bytes, _)) = prefetched {
            self.unused_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        // Only a whole file here is a hit. A file with only its first chunk
        // prefetched is a miss, but its prefetched bytes served this first
        // read, so they are not wasted.
        if local && prefetched.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else if !local {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn prefetched(&self, ino: ResourceId, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.prefetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.unused_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut u = crate::lock(&self.unused);
        let e = u.entry(ino).or_insert((0, Instant::now()));
        e.0 += bytes;
        e.1 = Instant::now();
    }

    /// Prefetched content unopened for too long is counted as wasted (and
    /// left to the cache's own eviction).
    fn expire(&self) {
        let mut u = crate::lock(&self.unused);
        let mut wasted = 0;
        u.retain(|_, (bytes, at)| {
            let keep = at.elapsed() < UNUSED_EXPIRY;
            if !keep {
                wasted += *bytes;
            }
            keep
        });
        self.unused_bytes.fetch_sub(wasted, Ordering::Relaxed);
        self.wasted_bytes.fetch_add(wasted, Ordering::Relaxed);
    }

    /// The ledger's counters now.
    pub fn totals(&self) -> Totals {
        Totals {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            wasted_bytes: self.wasted_bytes.load(Ordering::Relaxed),
            prefetched_bytes: self.prefetched_bytes.load(Ordering::Relaxed),
            unused_bytes: self.unused_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self.totals()).unwrap_or_default()
    }
}

/// The ledger's counters at one moment (status, metrics, the dashboard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// First reads of opened files whose content was here, and was not.
    pub hits: u64,
    pub misses: u64,
    pub wasted_bytes: u64,
    pub prefetched_bytes: u64,
    pub unused_bytes: u64,
}

/// A read waiting on the network (see `Ledger::foreground`).
pub struct Foreground<'a>(&'a Ledger);

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        self.0.foreground.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the executor knows of a device when it picks where to fetch from.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub id: DeviceId,
    pub up: bool,
    /// Round trip, milliseconds (None: not measured yet).
    pub rtt_ms: Option<f64>,
    /// Chunk requests it is serving or queueing (its last announcement).
    pub busy: u32,
    /// Chunks it sent that failed verification (its record here).
    pub bad_chunks: u64,
    /// Bytes per second its answers arrived at here (None: not measured).
    pub throughput: Option<f64>,
    /// Chunk requests to it that failed here.
    pub failed_requests: u64,
}

/// The chunk size the cost of a source is reckoned for (FastCDC's average).
const TYPICAL_CHUNK: f64 = 64.0 * 1024.0;

/// Where to fetch a predicted file from, best first: its authority, then
/// the devices that are up, by the expected time to fetch a chunk (round
/// trip plus the chunk at the throughput measured from it) weighed by how
/// busy it is and by its record here (damaged chunks, failed requests).
/// A device not measured yet is reckoned by its round trip alone, so it
/// gets tried and measured. No device's own reads wait for a guess, so a
/// busy device is asked last. Pure.
pub fn rank_sources(
    sources: &[Source],
    authority: Option<DeviceId>,
    me: DeviceId,
) -> Vec<DeviceId> {
    let cost = |s: &Source| {
        let rtt = s.rtt_ms.unwrap_or(1000.0).max(0.1) / 1000.0;
        let transfer = s.throughput.map_or(0.0, |b| TYPICAL_CHUNK / b.max(1.0));
        let record = 1.0 + s.bad_chunks as f64 + s.failed_requests as f64 / 4.0;
        (rtt + transfer) * (1.0 + f64::from(s.busy)) * record
    };
    let mut up: Vec<&Source> = sources.iter().filter(|s| s.up && s.id != me).collect();
    up.sort_by(|a, b| cost(a).total_cmp(&cost(b)).then(a.id.cmp(&b.id)));
    let mut out: Vec<DeviceId> = authority.filter(|a| *a != me).into_iter().collect();
    out.extend(
        up.into_iter()
            .map(|s| s.id)
            .filter(|d| Some(*d) != authority),
    );
    out
}

pub struct Budget {
    pub rate_bytes_s: u64,
    pub max_unused: u64,
    pub cache_limit: u64,
}

/// The work of one planned file: its chunks still to fetch.
struct Job {
    ino: ResourceId,
    chunks: VecDeque<(ChunkHash, u64)>,
    bytes: u64,
    /// Where to fetch from, ranked once when the file's turn comes.
    holders: Vec<DeviceId>,
}

/// The chunks of `ino`'s current content that `depth` asks for and this
/// device lacks.
fn missing_chunks(
    fs: &Fs,
    store: &dyn ChunkStore,
    ino: ResourceId,
    depth: Depth,
) -> VecDeque<(ChunkHash, u64)> {
    let chunks: Vec<(ChunkHash, u64)> = fs.with_meta(|m| {
        m.get(ino)
            .and_then(|i| i.content.as_ref())
            .map(|c| c.chunks.iter().map(|r| (r.hash, r.len as u64)).collect())
            .unwrap_or_default()
    });
    let take = match depth {
        Depth::Head => 1,
        Depth::Whole => chunks.len(),
    };
    chunks
        .into_iter()
        .take(take)
        .filter(|(h, _)| !h.is_zero_run() && !store.contains(h).unwrap_or(true))
        .collect()
}

pub async fn run(
    fs: Arc<Fs>,
    store: Arc<dyn ChunkStore>,
    replica: Replica,
    mesh: MeshClient,
    ledger: Arc<Ledger>,
    budget: Budget,
    mut plans: tokio::sync::mpsc::Receiver<Plan>,
) {
    let me = mesh.device();
    let mut queue: VecDeque<(ResourceId, Depth)> = VecDeque::new();
    let mut job: Option<Job> = None;
    let mut last_expire = Instant::now();
    loop {
        // Take the newest plan; it supersedes everything queued.
        let mut newest = None;
        if job.is_none() && queue.is_empty() {
            match tokio::time::timeout(Duration::from_secs(30), plans.recv()).await {
                Ok(Some(p)) => newest = Some(p),
                Ok(None) => return,
                Err(_) => {}
            }
        }
        while let Ok(p) = plans.try_recv() {
            newest = Some(p);
        }
        if let Some(p) = newest {
            if job
                .as_ref()
                .is_some_and(|j| !p.items.iter().any(|(i, _)| *i == j.ino))
            {
                if let Some(j) = job.take() {
                    ledger.prefetched(j.ino, j.bytes);
                }
            }
            queue = p
                .items
                .into_iter()
                .filter(|(i, _)| job.as_ref().is_none_or(|j| j.ino != *i))
                .collect();
        }
        if last_expire.elapsed() > Duration::from_secs(30) {
            ledger.expire();
            last_expire = Instant::now();
        }
        if job.is_none() {
            let Some((ino, depth)) = queue.pop_front() else {
                continue;
            };
            let chunks = {
                let (fs, store) = (fs.clone(), store.clone());
                match tokio::task::spawn_blocking(move || missing_chunks(&fs, &*store, ino, depth))
                    .await
                {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            if chunks.is_empty() {
                continue;
            }
            let sources: Vec<Source> = match mesh.status().await {
                Ok(st) => st
                    .devices
                    .iter()
                    .map(|d| Source {
                        id: d.id,
                        up: d.up,
                        rtt_ms: d.rtt_ms,
                        busy: d.load.active_transfers + d.load.queue_depth,
                        bad_chunks: d.bad_chunks,
                        throughput: d.throughput_mib_s.map(|m| m * f64::from(1u32 << 20)),
                        failed_requests: d.failed_requests,
                    })
                    .collect(),
                // The mesh is gone: the daemon is stopping.
                Err(_) => return,
            };
            job = Some(Job {
                ino,
                chunks,
                bytes: 0,
                holders: rank_sources(&sources, replica.authority(ino), me),
            });
        }
        let Some(j) = job.as_mut() else { continue };
        let Some(&(hash, len)) = j.chunks.front() else {
            if let Some(j) = job.take() {
                ledger.prefetched(j.ino, j.bytes);
            }
            continue;
        };
        // Lowest priority: a read waiting on the network goes first.
        if ledger.foreground_waiting() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let used = store.stats().map_or(u64::MAX, |s| s.bytes);
        if used.saturating_add(len) > budget.cache_limit / 10 * 9
            || ledger.unused_bytes.load(Ordering::Relaxed) + j.bytes + len > budget.max_unused
        {
            tracing::debug!(
                resource = j.ino.0,
                "prefetch skipped: no free cache within its share"
            );
            if let Some(j) = job.take() {
                ledger.prefetched(j.ino, j.bytes);
            }
            queue.clear();
            continue;
        }
        let started = Instant::now();
        match mesh.fetch_chunk(hash, &j.holders, Some(j.ino)).await {
            Ok(data) => {
                j.chunks.pop_front();
                j.bytes += data.len() as u64;
                // Pace to the byte rate.
                let due =
                    Duration::from_secs_f64(data.len() as f64 / budget.rate_bytes_s.max(1) as f64);
                if let Some(rest) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
            Err(e) => {
                tracing::debug!(resource = j.ino.0, error = %e, "prefetch fetch failed; dropping this item");
                if let Some(j) = job.take() {
                    ledger.prefetched(j.ino, j.bytes);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_rank_authority_then_near_idle_and_reliable() {
        let d = |n: u8| DeviceId([n; 16]);
        let s = |n: u8, rtt: f64, busy: u32, bad: u64| Source {
            id: d(n),
            up: true,
            rtt_ms: Some(rtt),
            busy,
            bad_chunks: bad,
            throughput: None,
            failed_requests: 0,
        };
        let sources = vec![
            s(1, 1.0, 0, 0),  // me
            s(2, 10.0, 0, 0), // far, idle
            s(3, 1.0, 0, 0),  // near, idle
            s(4, 1.0, 30, 0), // near, very busy
            s(5, 1.0, 0, 40), // near, sent damaged chunks
            Source {
                up: false,
                ..s(6, 0.5, 0, 0)
            },
        ];
        assert_eq!(
            rank_sources(&sources, Some(d(4)), d(1)),
            vec![d(4), d(3), d(2), d(5)]
        );
        assert_eq!(
            rank_sources(&sources, Some(d(1)), d(1)),
            vec![d(3), d(2), d(4), d(5)]
        );
        assert_eq!(rank_sources(&sources, None, d(1))[0], d(3));
    }

    #[test]
    fn sources_rank_by_measured_throughput_and_failed_requests() {
        let d = |n: u8| DeviceId([n; 16]);
        let s = |n: u8, rtt: f64, mib_s: Option<f64>, failed: u64| Source {
            id: d(n),
            up: true,
            rtt_ms: Some(rtt),
            busy: 0,
            bad_chunks: 0,
            throughput: mib_s.map(|m| m * 1048576.0),
            failed_requests: failed,
        };
        // Near but on a slow link (1 MiB/s: 62 ms a chunk) against farther
        // on a fast one (100 MiB/s: 10 ms round trip + 0.6 ms).
        let slow_near = s(2, 1.0, Some(1.0), 0);
        let fast_far = s(3, 10.0, Some(100.0), 0);
        assert_eq!(
            rank_sources(&[slow_near.clone(), fast_far.clone()], None, d(1)),
            vec![d(3), d(2)]
        );
        // Not measured yet: its round trip decides, so it gets tried.
        let unmeasured = s(4, 5.0, None, 0);
        assert_eq!(
            rank_sources(&[fast_far.clone(), unmeasured], None, d(1))[0],
            d(4)
        );
        // Failed requests push an otherwise equal device back.
        let flaky = s(5, 10.0, Some(100.0), 8);
        assert_eq!(
            rank_sources(&[flaky, fast_far], None, d(1)),
            vec![d(3), d(5)]
        );
    }

    #[test]
    fn ledger_counts_hits_misses_and_waste() {
        let l = Ledger::default();
        l.prefetched(ResourceId(5), 100);
        l.prefetched(ResourceId(6), 50);
        l.first_read(ResourceId(5), true);
        l.first_read(ResourceId(7), false);
        l.first_read(ResourceId(8), true);
        l.first_read(ResourceId(6), false);
        let j = l.json();
        assert_eq!(j["hits"], 1);
        assert_eq!(j["misses"], 2);
        // 6 had only its head here: a miss, but nothing wasted.
        assert_eq!(j["wasted_bytes"], 0);
        assert_eq!(j["prefetched_bytes"], 150);
        assert_eq!(j["unused_bytes"], 0);
    }
}
