//! Streamed remote reads: what a read that misses here asks the mesh for.
//!
//! A read whose chunk is not here fetches it, and while access to the file
//! is sequential also the chunks after it: a readahead window that starts
//! at [`FIRST_WINDOW`] chunks and doubles with every step of a sequential
//! reader up to `fetch_window` (Config), fetched as one stream per step with
//! several batches in flight. A read that finds its chunk here at the
//! window's check point takes the next step, so a steady reader never waits
//! for the network after its first chunk. Random access fetches only what
//! is asked. Chunks asked for are recorded as in flight: a read that needs
//! one waits for it instead of asking again.
//!
//! The window is a pure decision ([`Window::step`]); [`Readahead`] does the
//! I/O on the daemon's runtime.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::fs::{RemoteChunks, Want};
use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};
use crate::mesh::{MeshClient, Nearby};
use crate::storage::ChunkStore;

/// Chunks fetched ahead at the first sequential step (256 KiB at the
/// default chunk size): enough to hide a round trip on a LAN, little
/// wasted when the reader stops.
pub const FIRST_WINDOW: usize = 4;

/// Files whose windows are remembered; beyond this the map starts over (a
/// forgotten window only starts small again).
const MAX_FILES: usize = 4096;

/// The readahead state of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// The chunk index of the last read that took a step.
    last: Option<usize>,
    /// Chunks asked for ahead at the last step (0: random access).
    size: usize,
    /// Every chunk from the last read up to this index has been asked for.
    asked_to: usize,
}

/// What one step decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Chunk indices to ask for ahead of the read.
    pub fetch: Range<usize>,
    /// The index whose read takes the next step even when its chunk is
    /// here (half a window before the end of what is asked for);
    /// `usize::MAX` when none.
    pub check_at: usize,
}

impl Window {
    /// A read of chunk `at` of a version of `len` chunks; `max` bounds the
    /// window. Sequential: the first chunk of a file, the chunk after the
    /// last random read, or while a run lasts, a chunk no further than what
    /// was asked and at most a window behind the last step's (the kernel's
    /// parallel requests arrive out of order).
    pub fn step(&mut self, at: usize, len: usize, max: usize) -> Step {
        let max = max.max(1);
        let sequential = match self.last {
            None => at == 0,
            // After random access, only the very next chunk starts a run.
            Some(l) if self.size == 0 => at == l + 1,
            Some(l) => at + self.size >= l && at <= self.asked_to.max(l + 1),
        };
        if !sequential {
            *self = Window {
                last: Some(at),
                size: 0,
                asked_to: at + 1,
            };
            return Step {
                fetch: at + 1..at + 1,
                check_at: usize::MAX,
            };
        }
        self.size = if self.size == 0 {
            FIRST_WINDOW.min(max)
        } else {
            (self.size * 2).min(max)
        };
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        let end = (at + 1 + self.size).min(len).max(at + 1);
        let start = self.asked_to.max(at + 1).min(end);
        self.asked_to = self.asked_to.max(end);
        let check_at = if self.asked_to >= len {
            usize::MAX
        } else {
            self.asked_to.saturating_sub(self.size / 2).max(at + 1)
        };
        Step {
            fetch: start..end,
            check_at,
        }
    }
}

/// Milliseconds of RTT beyond twice the nearest holder's within which
/// another holder still takes turns.
pub const CLOSE_MS: f64 = 5.0;

/// Whom step `n` of a readahead asks, in order. The devices the
/// availability view names as holding the version read (`holding`), among the
/// connected ones (`nearest`, nearest first), within twice the nearest
/// holder's RTT plus [`CLOSE_MS`] and never caught sending bad bytes, take turns
/// step by step, so a long read is spread over them; then the file's
/// authority; then every other connected device, nearest first (one may
/// hold the file before the view says so; one that sent bad bytes comes
/// last). A chunk the first cannot supply goes to the next.
pub fn holder_order(
    nearest: &[Nearby],
    holding: &[DeviceId],
    authority: Option<DeviceId>,
    n: usize,
) -> Vec<DeviceId> {
    let held: Vec<&Nearby> = nearest
        .iter()
        .filter(|d| holding.contains(&d.device) && d.bad_chunks == 0)
        .collect();
    let mut out: Vec<DeviceId> = match held.first() {
        Some(best) => {
            // Loose enough for the jitter of a busy LAN (and loopback),
            // tight enough to keep a holder across a WAN out.
            let limit = best.rtt_ms * 2.0 + CLOSE_MS;
            let mut close: Vec<DeviceId> = held
                .iter()
                .filter(|d| d.rtt_ms <= limit)
                .map(|d| d.device)
                .collect();
            let k = n % close.len();
            close.rotate_left(k);
            close
        }
        None => Vec::new(),
    };
    let good = nearest.iter().filter(|d| d.bad_chunks == 0);
    let bad = nearest.iter().filter(|d| d.bad_chunks > 0);
    for d in authority
        .into_iter()
        .chain(good.chain(bad).map(|d| d.device))
    {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// Chunks asked for and not yet here; reads that need one wait on it.
#[derive(Default)]
struct Flights {
    chunks: Mutex<HashSet<ChunkHash>>,
    landed: Condvar,
    /// Chunks fetched ahead (verified, and stored), kept in memory until
    /// their read takes them: the read then skips reading and verifying
    /// them from the store again. At most [`KEPT`] chunks; older ones are
    /// dropped (the store has them).
    kept: Mutex<Kept>,
}

/// Chunks fetched ahead, in memory, oldest first.
#[derive(Default)]
struct Kept {
    chunks: HashMap<ChunkHash, Vec<u8>>,
    order: VecDeque<ChunkHash>,
}

/// Chunks fetched ahead kept in memory for their reads (8 MiB at the
/// default chunk size).
const KEPT: usize = 128;

impl Flights {
    /// Records those of `hashes` not already in flight (each once);
    /// returns them.
    fn claim(&self, hashes: impl IntoIterator<Item = ChunkHash>) -> Vec<ChunkHash> {
        let mut set = crate::lock(&self.chunks);
        hashes.into_iter().filter(|h| set.insert(*h)).collect()
    }

    /// Keeps a chunk that arrived for a read still to come.
    fn keep(&self, hash: ChunkHash, data: Vec<u8>) {
        let mut kept = crate::lock(&self.kept);
        let Kept { chunks: map, order } = &mut *kept;
        if map.insert(hash, data).is_none() {
            order.push_back(hash);
        }
        while order.len() > KEPT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    fn take(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        let mut kept = crate::lock(&self.kept);
        let Kept { chunks: map, order } = &mut *kept;
        let data = map.remove(hash)?;
        if let Some(i) = order.iter().position(|h| h == hash) {
            order.remove(i);
        }
        Some(data)
    }

    fn land(&self, hashes: &[ChunkHash]) {
        let mut set = crate::lock(&self.chunks);
        for h in hashes {
            set.remove(h);
        }
        drop(set);
        self.landed.notify_all();
    }

    /// Waits until `hash` is no longer in flight (or `limit` passes).
    /// False when it was not in flight.
    fn wait(&self, hash: &ChunkHash, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut set = crate::lock(&self.chunks);
        if !set.contains(hash) {
            return false;
        }
        while set.contains(hash) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            set = match self.landed.wait_timeout(set, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

/// Lands its chunks when dropped, whatever happened to the fetch: a
/// waiter never waits for a fetch that is gone.
struct Claim {
    flights: Arc<Flights>,
    hashes: Vec<ChunkHash>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.flights.land(&self.hashes);
    }
}

/// The authority of a file, as this device knows it.
pub type AuthorityFn = Box<dyn Fn(ResourceId) -> Option<DeviceId> + Send + Sync>;

/// Reads of chunks missing or damaged here: the file's authority first,
/// then the other members, nearest first; chunks ahead of a sequential
/// reader are streamed in the background.
pub struct Readahead {
    mesh: MeshClient,
    /// Who governs each file (asked first).
    authority: AuthorityFn,
    store: Arc<dyn ChunkStore>,
    rt: tokio::runtime::Handle,
    /// Told of every read that waits on the network (prefetch yields).
    ledger: Arc<crate::prefetch::fetch::Ledger>,
    /// The most chunks asked for ahead of one reader.
    max_window: usize,
    /// How long a read waits for a chunk in flight before asking itself.
    wait_limit: Duration,
    windows: Mutex<HashMap<ResourceId, Window>>,
    flights: Arc<Flights>,
    stats: Stats,
    /// Streams started: which holder's turn it is.
    streams: AtomicUsize,
}

/// Counters for `meshfs status` (`reads`).
#[derive(Default)]
struct Stats {
    /// Chunks a read fetched itself (nothing had asked for them yet).
    on_demand: AtomicU64,
    /// Chunks asked for ahead of a reader.
    ahead: AtomicU64,
    /// Reads that waited for a chunk already in flight.
    waited: AtomicU64,
}

impl Readahead {
    pub fn new(
        mesh: MeshClient,
        authority: AuthorityFn,
        store: Arc<dyn ChunkStore>,
        rt: tokio::runtime::Handle,
        ledger: Arc<crate::prefetch::fetch::Ledger>,
        max_window: usize,
        wait_limit: Duration,
    ) -> Self {
        Readahead {
            mesh,
            authority,
            store,
            rt,
            ledger,
            max_window,
            wait_limit,
            windows: Mutex::new(HashMap::new()),
            flights: Arc::default(),
            stats: Stats::default(),
            streams: AtomicUsize::new(0),
        }
    }

    /// What `meshfs status --json` shows as `reads`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "on_demand_chunks": self.stats.on_demand.load(Ordering::Relaxed),
            "ahead_chunks": self.stats.ahead.load(Ordering::Relaxed),
            "waited_in_flight": self.stats.waited.load(Ordering::Relaxed),
            "max_window_chunks": self.max_window,
        })
    }

    /// Takes a step of `want.ino`'s window and starts fetching what it asks
    /// for; returns the step's check point.
    fn step(&self, want: &Want) -> usize {
        let len = want.at + 1 + want.next.len();
        let step = {
            let mut windows = crate::lock(&self.windows);
            if windows.len() >= MAX_FILES && !windows.contains_key(&want.ino) {
                windows.clear();
            }
            windows
                .entry(want.ino)
                .or_default()
                .step(want.at, len, self.max_window)
        };
        let first = want.at + 1;
        let ahead: Vec<ChunkHash> = want
            .next
            .get(step.fetch.start - first..step.fetch.end - first)
            .unwrap_or_default()
            .iter()
            .map(|c| c.hash)
            .filter(|h| !h.is_zero_run())
            .filter(|h| !self.store.contains(h).unwrap_or(false))
            .collect();
        if !ahead.is_empty() {
            self.stream(want.ino, want.version, ahead);
        }
        step.check_at
    }

    /// Fetches `hashes` in the background, in order, into the store.
    fn stream(&self, ino: ResourceId, version: VersionId, hashes: Vec<ChunkHash>) {
        // Claiming also drops a hash repeated within `hashes`.
        let claim = Claim {
            hashes: self.flights.claim(hashes),
            flights: self.flights.clone(),
        };
        if claim.hashes.is_empty() {
            return;
        }
        self.stats
            .ahead
            .fetch_add(claim.hashes.len() as u64, Ordering::Relaxed);
        let (mesh, ledger) = (self.mesh.clone(), self.ledger.clone());
        let authority = (self.authority)(ino).filter(|a| *a != mesh.device());
        let turn = self.streams.fetch_add(1, Ordering::Relaxed);
        self.rt.spawn(async move {
            let _waiting = ledger.foreground();
            let Ok(nearest) = mesh.nearby().await else {
                return;
            };
            let holding = mesh.holders_at(ino, version).await.unwrap_or_default();
            let holders = holder_order(&nearest, &holding, authority, turn);
            let flights = claim.flights.clone();
            // The reader streams already: the whole step in flight at once.
            let window = claim.hashes.len();
            let r = mesh
                .fetch_stream_from(
                    window,
                    claim.hashes.clone(),
                    holders,
                    Some(ino),
                    |i, data| {
                        if let Some(h) = claim.hashes.get(i) {
                            flights.keep(*h, data);
                            flights.land(std::slice::from_ref(h));
                        }
                        Ok(())
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::debug!(%ino, error = %e, "readahead stopped; reads fetch what they need");
            }
        });
    }

    /// One chunk now, on the calling (kernel request) thread, from the
    /// holders in the order a stream would ask them (`holder_order`: the
    /// nearest holder of the version first, one caught sending bad bytes
    /// last).
    fn fetch_now(
        &self,
        ino: ResourceId,
        version: VersionId,
        hash: ChunkHash,
    ) -> Result<Vec<u8>, String> {
        let claim = Claim {
            hashes: self.flights.claim([hash]),
            flights: self.flights.clone(),
        };
        let mesh = self.mesh.clone();
        let authority = (self.authority)(ino).filter(|a| *a != mesh.device());
        let _waiting = self.ledger.foreground();
        let r = self.rt.block_on(async move {
            let nearest = mesh.nearby().await.map_err(|e| e.to_string())?;
            let holding = mesh.holders_at(ino, version).await.unwrap_or_default();
            let holders = holder_order(&nearest, &holding, authority, 0);
            mesh.fetch_chunk(hash, &holders, Some(ino))
                .await
                .map_err(|e| e.to_string())
        });
        drop(claim);
        r
    }
}

impl RemoteChunks for Readahead {
    fn fetch(&self, want: &Want) -> Result<(Vec<u8>, usize), String> {
        // Kernel request threads block here; a runtime thread must not.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err("remote fetch requested from inside the runtime".into());
        }
        let check_at = self.step(want);
        // In flight already (ahead of this reader, or another reader's):
        // wait for it. A chunk that does not arrive, or arrives damaged,
        // is asked for again.
        if self.flights.wait(&want.hash, self.wait_limit) {
            self.stats.waited.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = self.flights.take(&want.hash) {
                return Ok((d, check_at));
            }
            if let Ok(Some(d)) = self.store.get(&want.hash) {
                return Ok((d, check_at));
            }
        }
        self.stats.on_demand.fetch_add(1, Ordering::Relaxed);
        Ok((self.fetch_now(want.ino, want.version, want.hash)?, check_at))
    }

    fn read_ahead(&self, want: &Want) -> usize {
        self.step(want)
    }

    fn fetched_ahead(&self, hash: &ChunkHash) -> Option<Vec<u8>> {
        self.flights.take(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_doubles_its_window_up_to_the_limit() {
        let mut w = Window::default();
        let s = w.step(0, 1000, 64);
        assert_eq!(s.fetch, 1..5);
        assert_eq!(s.check_at, 3);
        let s = w.step(3, 1000, 64);
        assert_eq!(s.fetch, 5..12, "only what was not asked for yet");
        assert_eq!(s.check_at, 8);
        let s = w.step(8, 1000, 64);
        assert_eq!(s.fetch, 12..25);
        let mut last = s;
        let mut at = last.check_at;
        for _ in 0..10 {
            last = w.step(at, 1000, 64);
            at = last.check_at;
        }
        // Steady state: each step asks for the half window read since the
        // last one (and the chunk the step was taken at).
        assert_eq!(last.fetch.len(), 33);
        assert!(last.fetch.end - at <= 64 + 32);
    }

    #[test]
    fn random_access_fetches_only_what_is_read() {
        let mut w = Window::default();
        let s = w.step(500, 1000, 64);
        assert!(s.fetch.is_empty());
        assert_eq!(s.check_at, usize::MAX);
        // A jump back resets a sequential reader too.
        let mut w = Window::default();
        w.step(0, 1000, 64);
        w.step(3, 1000, 64);
        let s = w.step(900, 1000, 64);
        assert!(s.fetch.is_empty());
        // Reading the same chunk again is no run...
        assert!(w.step(900, 1000, 64).fetch.is_empty());
        // ...reading on from there is.
        let s = w.step(901, 1000, 64);
        assert_eq!(s.fetch, 902..906);
    }

    #[test]
    fn out_of_order_requests_within_the_window_stay_sequential() {
        let mut w = Window::default();
        w.step(0, 1000, 64);
        w.step(4, 1000, 64);
        // The kernel's parallel requests: chunk 2 arrives after chunk 4.
        let s = w.step(2, 1000, 64);
        assert!(s.fetch.start >= 13, "nothing asked twice: {s:?}");
        assert!(w.size > 0);
    }

    #[test]
    fn a_read_waits_for_a_chunk_in_flight_and_takes_it_from_memory() {
        let flights = Arc::new(Flights::default());
        let (a, b) = (ChunkHash::of(b"a"), ChunkHash::of(b"b"));
        assert_eq!(flights.claim([a, b]), vec![a, b]);
        assert!(flights.claim([a]).is_empty(), "claimed twice");
        let c = ChunkHash::of(b"c");
        assert_eq!(flights.claim([c, c]), vec![c], "a repeat within one claim");
        flights.land(&[c]);
        let f = flights.clone();
        let arrive = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f.keep(a, b"a".to_vec());
            f.land(&[a]);
        });
        let t = Instant::now();
        assert!(flights.wait(&a, Duration::from_secs(10)));
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert_eq!(flights.take(&a).as_deref(), Some(&b"a"[..]));
        assert_eq!(flights.take(&a), None, "taken once");
        arrive.join().unwrap();
        // Not in flight: no wait. In flight and never landing: bounded.
        assert!(!flights.wait(&ChunkHash::of(b"c"), Duration::from_secs(10)));
        assert!(flights.wait(&b, Duration::from_millis(20)));
    }

    #[test]
    fn chunks_kept_in_memory_are_bounded_oldest_first() {
        let flights = Flights::default();
        let hashes: Vec<ChunkHash> = (0..KEPT as u32 + 10)
            .map(|i| ChunkHash::of(&i.to_le_bytes()))
            .collect();
        for h in &hashes {
            flights.keep(*h, vec![1]);
        }
        assert_eq!(flights.take(&hashes[0]), None);
        assert_eq!(flights.take(&hashes[9]), None);
        assert!(flights.take(&hashes[10]).is_some());
        assert!(flights.take(&hashes[KEPT + 9]).is_some());
    }

    #[test]
    fn steps_take_turns_among_close_holders_then_authority_then_the_rest() {
        let d = |i: u8| DeviceId([i; 16]);
        let near = |i: u8, rtt_ms: f64| Nearby {
            device: d(i),
            rtt_ms,
            bad_chunks: 0,
        };
        let mut nearest = [near(1, 0.2), near(2, 0.3), near(3, 0.5), near(4, 40.0)];
        // d2 and d3 hold the file, d4 too but far away; d1 governs it.
        let holding = [d(3), d(2), d(4)];
        assert_eq!(
            holder_order(&nearest, &holding, Some(d(1)), 0),
            vec![d(2), d(3), d(1), d(4)]
        );
        assert_eq!(
            holder_order(&nearest, &holding, Some(d(1)), 1),
            vec![d(3), d(2), d(1), d(4)]
        );
        assert_eq!(holder_order(&nearest, &holding, Some(d(1)), 2)[0], d(2));
        // Nobody known to hold it: the authority, then by RTT (even one not
        // connected, since it governs the file).
        assert_eq!(
            holder_order(&nearest, &[], Some(d(9)), 5),
            vec![d(9), d(1), d(2), d(3), d(4)]
        );
        assert_eq!(holder_order(&[], &[], None, 0), vec![]);
        // A holder caught sending bad bytes leaves the turns and goes last.
        nearest[1].bad_chunks = 3;
        for n in 0..3 {
            assert_eq!(
                holder_order(&nearest, &holding, Some(d(1)), n),
                vec![d(3), d(1), d(4), d(2)]
            );
        }
    }

    #[test]
    fn the_window_stops_at_the_end_of_the_file() {
        let mut w = Window::default();
        let s = w.step(0, 3, 64);
        assert_eq!(s.fetch, 1..3);
        assert_eq!(s.check_at, usize::MAX);
        let s = w.step(2, 3, 64);
        assert!(s.fetch.is_empty());
    }
}
