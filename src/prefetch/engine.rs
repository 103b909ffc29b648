//! The daemon's prediction thread: it records opens in the access log,
//! shares them with the mesh, learns from every device's events, trains the
//! GRU in the background and, after each open here, tells the prefetch
//! executor what to fetch next.
//!
//! One std thread owns every predictor (tch tensors and the count tables are
//! not shared): opens and remote batches arrive over a bounded channel, and a
//! full channel drops the event rather than hold up a kernel request.
//! Training runs between messages, a bounded round at a time on this one
//! thread (libtorch is limited to one thread), so it never takes more than
//! one core.

use super::log::{self, AccessEvent, UserHash};
use super::predict::{
    hit_at, mix, Accuracy, FollowRecord, LastSuccessor, Markov, Predictor, Ranked,
};
use super::rnn::{Gru, GruConfig};
use super::temperature::{plan, Depth, PlanConfig, Temperature};
use super::{Interner, Sym};
use crate::ids::{DeviceId, ResourceId};
use crate::storage::{AccessRecord, RocksStore};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// History kept per stream.
const HISTORY: usize = 32;
/// Events replayed from the stored log at start-up.
const WARM_START: usize = 100_000;
/// Observations between GRU training rounds.
const TRAIN_EVERY: usize = 128;
/// Training rounds between checkpoints.
const CHECKPOINT_EVERY: u64 = 10;
/// Rounds a fresh GRU trains before the selector may choose it.
const GRU_READY_ROUNDS: u64 = 8;
/// Contexts the daemon's Markov model keeps (bounds its memory, about
/// 150 bytes each).
const MARKOV_CONTEXTS: usize = 300_000;
const MARKOV_ORDER: usize = 4;
/// How often this device publishes its log digest (anti-entropy).
const DIGEST_EVERY: Duration = Duration::from_secs(10);
/// Most of its own events a device sends again for one digest.
const RESEND_MAX: usize = 10_000;
/// Most stored events scanned to find them.
const RESEND_SCAN: usize = 500_000;
/// Messages taken off the channel ahead of the one being handled, so the
/// engine knows when it is behind (see `Backlog`).
const LOOKAHEAD: usize = 256;
/// Training waits while the engine is behind, but never for more than this
/// many events: a steady stream of opens must not starve the model.
const TRAIN_DEFER_MAX: usize = 4 * TRAIN_EVERY;
/// The most of one core training may take: after a round of d ms the next
/// waits 3d. Rounds are due every 128 events, so without this a burst of
/// opens (thousands a second) would train back to back and take a core
/// from the filesystem; the windows it brings stay buffered and are
/// sampled by later rounds.
const TRAIN_DUTY: f64 = 0.25;
/// Most rounds owed after a burst (about 10 s of training at the cap).
const TRAIN_OWED_MAX: usize = 16;
/// Candidate predictors of the selector, in report order.
const NAMES: [&str; 4] = ["last-successor", "markov", "gru", "gru+markov"];
/// Preference between candidates of equal accuracy (lower first): the
/// count tables cost under a microsecond, the GRU hundreds.
const TIE_RANK: [u8; 4] = [1, 0, 3, 2];

pub struct EngineConfig {
    pub me: DeviceId,
    pub learn: bool,
    pub share: bool,
    pub prefetch: bool,
    pub user_key: [u8; 32],
    pub users: BTreeMap<String, String>,
    pub gru: GruConfig,
    pub model_dir: PathBuf,
    pub max_events: usize,
    pub max_age_ms: u64,
    pub plan: PlanConfig,
    pub half_life_ms: u64,
    /// After a person's session on another device has been quiet this long,
    /// the device they most often moved to next from there fetches what
    /// that session would open next (None: never).
    pub follow_after: Option<Duration>,
}

/// What the executor should fetch for this device's latest open; a new plan
/// supersedes the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub items: Vec<(ResourceId, Depth)>,
}

enum Msg {
    Open {
        ino: ResourceId,
        uid: u32,
        size: u64,
    },
    Remote {
        from: DeviceId,
        bytes: Vec<u8>,
    },
    Stop,
}

/// A person's latest event anywhere.
#[derive(Debug, Clone, Copy)]
struct Seen {
    device: DeviceId,
    /// When it arrived here (following waits on this clock).
    at: Instant,
    /// Its session was already followed (or it was replayed history).
    followed: bool,
}

/// How far the engine is behind: messages already waiting after the one
/// being handled, and how many of those are this device's opens.
#[derive(Debug, Default, Clone, Copy)]
struct Backlog {
    queued: usize,
    opens: usize,
}

/// Figures for `meshfs status`.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub local_events: AtomicU64,
    pub remote_events: AtomicU64,
    pub dropped_events: AtomicU64,
    pub rejected_batches: AtomicU64,
    /// Events received again that this device already had.
    pub duplicate_events: AtomicU64,
    /// Own events sent again because a digest showed a device missed them.
    pub resent_events: AtomicU64,
    pub report: Mutex<ModelReport>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ModelReport {
    /// The predictor the selector used for this device's last open.
    pub selected: String,
    /// Recent top-1 accuracy of each predictor over all streams.
    pub accuracy: BTreeMap<String, f32>,
    pub gru_state: String,
    pub gru_rounds: u64,
    pub gru_loss: Option<f32>,
    pub gru_round_ms: f32,
    pub vocabulary: usize,
    pub resources: usize,
    pub markov_contexts: usize,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Msg>,
    pub stats: Arc<EngineStats>,
}

impl EngineHandle {
    fn send(&self, m: Msg) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(m) {
            self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An open through the mount (never blocks).
    pub fn opened(&self, ino: ResourceId, uid: u32, size: u64) {
        self.send(Msg::Open { ino, uid, size });
    }

    /// A batch of access events gossiped by `from`.
    pub fn remote(&self, from: DeviceId, bytes: Vec<u8>) {
        self.send(Msg::Remote { from, bytes });
    }

    /// Checkpoints the model and ends the thread (waits for it).
    pub fn stop(&self, thread: std::thread::JoinHandle<()>) {
        let _ = self.tx.send(Msg::Stop);
        let _ = thread.join();
    }
}

/// Where the engine's output goes.
pub struct Outputs {
    /// Publishes an encoded batch of this device's events to the mesh.
    pub publish: Box<dyn Fn(Vec<u8>) + Send>,
    pub plans: tokio::sync::mpsc::Sender<Plan>,
}

pub fn start(
    cfg: EngineConfig,
    store: Arc<RocksStore>,
    out: Outputs,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = sync_channel(4096);
    let stats = Arc::new(EngineStats::default());
    let st = stats.clone();
    let thread = std::thread::Builder::new()
        .name("meshfs-prefetch".into())
        .spawn(move || {
            // Learning is background work: below the daemon's request
            // threads, so training never slows a read or a create. Linux
            // applies a thread id's nice value to that thread alone.
            // SAFETY: gettid and setpriority have no memory effects.
            unsafe {
                let tid = libc::gettid();
                libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
            }
            Engine::new(cfg, store, out, st).run(rx)
        })?;
    Ok((EngineHandle { tx, stats }, thread))
}

type StreamKey = (DeviceId, UserHash);

struct Engine {
    cfg: EngineConfig,
    store: Arc<RocksStore>,
    out: Outputs,
    stats: Arc<EngineStats>,
    syms: Interner<ResourceId>,
    streams: HashMap<StreamKey, Vec<Sym>>,
    last: LastSuccessor,
    markov: Markov,
    gru: Option<Gru>,
    /// Rounds the current GRU has trained (0 after a fresh start or a lost
    /// checkpoint: the selector waits for `GRU_READY_ROUNDS`).
    gru_rounds: u64,
    per_stream: HashMap<StreamKey, [Accuracy; 4]>,
    overall: [Accuracy; 4],
    temperature: Temperature,
    sizes: HashMap<Sym, u64>,
    seq: u64,
    to_store: Vec<AccessRecord>,
    to_publish: Vec<AccessEvent>,
    last_publish: Instant,
    last_trim: Instant,
    since_train: usize,
    /// No training round starts before this (see `TRAIN_DUTY`).
    train_not_before: Instant,
    /// When `meshfs status`'s model report was last brought up to date.
    last_report: Instant,
    rounds_since_checkpoint: u64,
    user_names: HashMap<u32, UserHash>,
    /// Each person's latest event anywhere.
    latest: HashMap<UserHash, Seen>,
    /// Per person and device, how often their next event came from each
    /// other device (a move from desktop to laptop).
    moves: HashMap<(UserHash, DeviceId), HashMap<DeviceId, u32>>,
    /// Per person and device, whether following their quiet sessions there
    /// would have paid off; following is skipped where it would not.
    continued: HashMap<(UserHash, DeviceId), FollowRecord>,
    /// Which events of each device (this one too) are in the log.
    received: HashMap<DeviceId, log::Received>,
    last_digest: Instant,
    /// When each device was last sent events again (at most every 10 s).
    resent_to: HashMap<DeviceId, Instant>,
    backlog: Backlog,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    fn new(
        cfg: EngineConfig,
        store: Arc<RocksStore>,
        out: Outputs,
        stats: Arc<EngineStats>,
    ) -> Self {
        let mut syms = Interner::new();
        let mut state = "learning".to_string();
        let mut gru_rounds = 0;
        let gru = if cfg.learn {
            match Gru::load::<u64>(cfg.gru, &cfg.model_dir, |k| syms.intern(&ResourceId(k))) {
                Ok(g) => {
                    tracing::info!(dir = %cfg.model_dir.display(), "loaded the prediction model checkpoint");
                    gru_rounds = GRU_READY_ROUNDS;
                    Some(g)
                }
                Err(e) => {
                    if cfg.model_dir.join("gru.ot").exists()
                        || cfg.model_dir.join("gru.vocab").exists()
                    {
                        tracing::warn!(error = %e, "prediction model checkpoint unusable; predicting with the Markov model until a new one has trained");
                        state = "fallback to markov: checkpoint unusable, retraining".into();
                    } else {
                        tracing::info!(
                            "no prediction model checkpoint yet; a new model starts learning"
                        );
                    }
                    match Gru::new(cfg.gru) {
                        Ok(g) => Some(g),
                        Err(e) => {
                            tracing::warn!(error = %e, "the GRU could not start; predicting with the Markov model");
                            state = format!("off: {e}");
                            None
                        }
                    }
                }
            }
        } else {
            state = "off (access_learn = false)".into();
            None
        };
        if let Ok(mut r) = stats.report.lock() {
            r.gru_state = state;
        }
        Engine {
            temperature: Temperature::new(cfg.half_life_ms),
            store,
            out,
            stats,
            syms,
            streams: HashMap::new(),
            last: LastSuccessor::default(),
            markov: Markov::new(MARKOV_ORDER, MARKOV_CONTEXTS),
            gru,
            gru_rounds,
            per_stream: HashMap::new(),
            overall: Default::default(),
            sizes: HashMap::new(),
            // Unique across restarts without storing a counter.
            seq: now_ms().saturating_mul(1000),
            to_store: Vec::new(),
            to_publish: Vec::new(),
            last_publish: Instant::now(),
            last_trim: Instant::now() - Duration::from_secs(3600),
            since_train: 0,
            train_not_before: Instant::now(),
            last_report: Instant::now(),
            rounds_since_checkpoint: 0,
            user_names: HashMap::new(),
            latest: HashMap::new(),
            moves: HashMap::new(),
            continued: HashMap::new(),
            received: HashMap::new(),
            last_digest: Instant::now(),
            resent_to: HashMap::new(),
            backlog: Backlog::default(),
            cfg,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        if self.cfg.learn {
            self.warm_start();
        }
        let mut ahead: VecDeque<Msg> = VecDeque::new();
        loop {
            if ahead.is_empty() {
                // Idle with rounds owed: wake when the next one may start.
                let wait = if self.gru.is_some() && self.since_train >= TRAIN_EVERY {
                    self.train_not_before
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(10), Duration::from_millis(500))
                } else {
                    Duration::from_millis(500)
                };
                match rx.recv_timeout(wait) {
                    Ok(m) => ahead.push_back(m),
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => self.refresh_report(),
                }
            }
            while ahead.len() < LOOKAHEAD {
                match rx.try_recv() {
                    Ok(m) => ahead.push_back(m),
                    Err(_) => break,
                }
            }
            let msg = ahead.pop_front();
            self.backlog = Backlog {
                queued: ahead.len(),
                opens: ahead
                    .iter()
                    .filter(|m| matches!(m, Msg::Open { .. }))
                    .count(),
            };
            match msg {
                Some(Msg::Open { ino, uid, size }) => self.on_open(ino, uid, size),
                Some(Msg::Remote { from, bytes }) => self.on_remote(from, &bytes),
                Some(Msg::Stop) => break,
                None => {}
            }
            self.flush(false);
            self.maybe_digest();
            self.maybe_follow();
            self.maybe_train();
            self.maybe_trim();
            // Training rounds refresh it too, but they can be minutes apart
            // under a steady stream of events.
            if self.last_report.elapsed() >= Duration::from_secs(1) {
                self.refresh_report();
            }
        }
        self.flush(true);
        self.checkpoint();
    }

    /// Learns from the stored log (every device's events) without
    /// predicting: the daemon starts where it left off.
    fn warm_start(&mut self) {
        let t = Instant::now();
        let records = match self.store.access_recent(WARM_START) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the access log; learning starts empty");
                return;
            }
        };
        let mut n = 0;
        for bytes in records {
            match log::decode(&bytes) {
                Ok(e) => {
                    self.received.entry(e.device).or_default().accept(e.seq);
                    self.ingest(&e, false, false);
                    n += 1;
                }
                Err(e) => tracing::debug!(error = %e, "skipping a stored access event"),
            }
        }
        self.since_train = 0;
        // Own numbering continues where the log ends, so that other devices
        // see no gap (a device whose own events are all gone starts afresh
        // from the clock, and the next resend closes that gap).
        if let Some(r) = self.received.get(&self.cfg.me) {
            self.seq = r.latest();
        }
        // A fresh GRU learns the stored log now, a little at a time.
        tracing::info!(
            events = n,
            ms = t.elapsed().as_millis() as u64,
            "access log replayed into the predictors"
        );
    }

    fn user(&mut self, uid: u32) -> UserHash {
        if let Some(u) = self.user_names.get(&uid) {
            return *u;
        }
        let local = log::local_user_name(uid);
        let mesh_user = self.cfg.users.get(&local).cloned().unwrap_or(local);
        let h = UserHash::of(&self.cfg.user_key, &mesh_user);
        self.user_names.insert(uid, h);
        h
    }

    fn on_open(&mut self, ino: ResourceId, uid: u32, size: u64) {
        if !self.cfg.learn {
            return;
        }
        self.seq += 1;
        let e = AccessEvent {
            resource: ino,
            device: self.cfg.me,
            seq: self.seq,
            user: self.user(uid),
            ts_ms: log::coarse(now_ms()),
            size,
        };
        self.stats.local_events.fetch_add(1, Ordering::Relaxed);
        self.received.entry(e.device).or_default().accept(e.seq);
        self.to_store.push(AccessRecord {
            ts_ms: e.ts_ms,
            origin: e.origin(),
            seq: e.seq,
            value: log::encode(&e),
        });
        if self.cfg.share {
            self.to_publish.push(e.clone());
        }
        self.ingest(&e, true, self.cfg.prefetch);
    }

    fn on_remote(&mut self, from: DeviceId, bytes: &[u8]) {
        // A device that keeps its own log to itself (`access_share =
        // false`) does not keep the others' either: it neither sends nor
        // stores anyone's events.
        if !self.cfg.learn || !self.cfg.share {
            return;
        }
        let (events, settle) = match log::decode_msg(bytes, from) {
            Ok(log::AccessMsg::Events(e)) => (e, None),
            Ok(log::AccessMsg::Resend { events, .. }) => {
                let last = events.last().map(|e| e.seq);
                (events, last)
            }
            Ok(log::AccessMsg::Digest(d)) => return self.on_digest(from, &d),
            Err(e) => {
                self.stats.rejected_batches.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %from, error = %e, "access events refused");
                return;
            }
        };
        // A batch is a burst: the events after this one in it are queued
        // too (the GRU is scored only on the one that finds the engine
        // caught up; scoring each cost a GRU prediction per remote event,
        // more than every other cost of a read together on three devices).
        let queued = self.backlog.queued;
        let n = events.len();
        for (i, e) in events.into_iter().enumerate() {
            self.backlog.queued = queued + (n - 1 - i);
            if !self.received.entry(e.device).or_default().accept(e.seq) {
                self.stats.duplicate_events.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.remote_events.fetch_add(1, Ordering::Relaxed);
            self.to_store.push(AccessRecord {
                ts_ms: e.ts_ms,
                origin: e.origin(),
                seq: e.seq,
                value: log::encode(&e),
            });
            self.ingest(&e, true, false);
        }
        // A resend lists every event of its range: what is not in it never
        // existed (or is given up on), so the frontier moves past it.
        if let Some(last) = settle {
            self.received.entry(from).or_default().settle(last);
        }
    }

    /// Publishes how far this device's log goes for each origin, so that
    /// origins can send again what it missed while it was away.
    fn maybe_digest(&mut self) {
        if !self.cfg.share || self.last_digest.elapsed() < DIGEST_EVERY {
            return;
        }
        self.last_digest = Instant::now();
        let mut digest: Vec<(DeviceId, u64)> = self
            .received
            .iter()
            .map(|(d, r)| (*d, r.frontier))
            .collect();
        digest.sort();
        digest.truncate(log::MAX_DIGEST);
        (self.out.publish)(log::encode_digest(&digest));
    }

    /// Another device's digest: if it is behind on this device's own
    /// events, send them again (the newest `RESEND_MAX`, oldest first).
    fn on_digest(&mut self, from: DeviceId, digest: &[(DeviceId, u64)]) {
        let me = self.cfg.me;
        let Some(mine) = self.received.get(&me).map(|r| r.latest()) else {
            return;
        };
        let theirs = digest.iter().find(|(d, _)| *d == me).map_or(0, |(_, s)| *s);
        if !self.cfg.share || theirs >= mine {
            return;
        }
        if self
            .resent_to
            .get(&from)
            .is_some_and(|t| t.elapsed() < DIGEST_EVERY)
        {
            return;
        }
        self.resent_to.insert(from, Instant::now());
        let mut missing: Vec<AccessEvent> = Vec::new();
        let mut scanned = 0usize;
        let scan = self.store.access_scan_newest(|bytes| {
            scanned += 1;
            if let Ok(e) = log::decode(bytes) {
                if e.device == me {
                    if e.seq <= theirs {
                        return false;
                    }
                    missing.push(e);
                }
            }
            missing.len() < RESEND_MAX && scanned < RESEND_SCAN
        });
        if let Err(e) = scan {
            tracing::warn!(error = %e, "could not read the access log to send it again");
            return;
        }
        missing.reverse();
        tracing::debug!(device = %from, events = missing.len(), "sending access events again");
        self.stats
            .resent_events
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        for batch in missing.chunks(log::MAX_BATCH) {
            (self.out.publish)(log::encode_batch(batch));
        }
    }

    fn gru_ready(&self) -> bool {
        self.gru.is_some() && self.gru_rounds >= GRU_READY_ROUNDS
    }

    /// Every candidate's prediction after `history`, in `NAMES` order; the
    /// GRU's (and so the mixture's) only when `learned`.
    fn predictions(&mut self, history: &[Sym], top: usize, learned: bool) -> [Ranked; 4] {
        let ls = self.last.predict(history, top);
        let mk = self.markov.predict(history, top);
        let (g, m) = match self.gru.as_mut().filter(|_| learned) {
            Some(gru) => {
                let g = gru.predict(history, top);
                let m = mix(&g, self.overall[2].ema, &mk, self.overall[1].ema, top);
                (g, m)
            }
            None => (Vec::new(), Vec::new()),
        };
        [ls, mk, g, m]
    }

    /// Scores the predictors on `e` (when `score`), learns it, and plans
    /// prefetches for its stream (when `act`).
    fn ingest(&mut self, e: &AccessEvent, score: bool, act: bool) {
        let new = self.syms.get(&e.resource).is_none();
        let sym = self.syms.intern(&e.resource);
        self.sizes.insert(sym, e.size);
        let key = (e.device, e.user);
        let history = self.streams.remove(&key).unwrap_or_default();
        if score && !history.is_empty() {
            // Behind (a burst of opens): the GRU's prediction is the costly
            // one (hundreds of µs), so it is scored only on events that find
            // the engine caught up. Its accuracy is then a sample, not every
            // event; the count tables still see and score everything.
            let learned = self.backlog.queued == 0;
            // A resource never seen before cannot be anyone's prediction: a
            // miss for every predictor without asking them (a burst of new
            // files would otherwise pay a GRU prediction each for nothing).
            let preds = if new {
                Default::default()
            } else {
                self.predictions(&history, 5, learned)
            };
            let accs = self.per_stream.entry(key).or_default();
            for i in 0..4 {
                if !new && !learned && i >= 2 {
                    continue;
                }
                let hit = hit_at(&preds[i], sym, 1);
                accs[i].record(hit);
                self.overall[i].record(hit);
            }
        }
        self.last.observe(&history, sym);
        self.markov.observe(&history, sym);
        if let Some(g) = self.gru.as_mut() {
            g.observe(&history, sym);
        }
        self.temperature.touch(sym, e.ts_ms);
        // Rounds missed while training was held back are owed, up to
        // `TRAIN_OWED_MAX`, and paid when the duty cap allows.
        self.since_train = (self.since_train + 1).min(TRAIN_EVERY * TRAIN_OWED_MAX);
        if let Some(prev) = self.latest.get(&e.user).copied() {
            self.record_continuation(e, prev, sym);
            if prev.device != e.device {
                *self
                    .moves
                    .entry((e.user, prev.device))
                    .or_default()
                    .entry(e.device)
                    .or_default() += 1;
            }
        }
        // Replayed history (score false) is never followed.
        self.latest.insert(
            e.user,
            Seen {
                device: e.device,
                at: Instant::now(),
                followed: !score,
            },
        );
        let mut history = history;
        history.push(sym);
        if history.len() > HISTORY {
            history.remove(0);
        }
        // A plan is superseded by the next open's, so while later opens of
        // this device wait in the queue, planning for this one is waste.
        if act && self.backlog.opens == 0 {
            self.act(key, &history, e.ts_ms);
        }
        self.streams.insert(key, history);
    }

    /// A person's session elsewhere went quiet: if this is the device they
    /// most often moved to next from there, fetch what that session would
    /// open next, so it is here when they sit down (the laptop after the
    /// desktop). Pull, not push: every device decides for itself.
    fn maybe_follow(&mut self) {
        let Some(after) = self.cfg.follow_after else {
            return;
        };
        if !self.cfg.prefetch {
            return;
        }
        let me = self.cfg.me;
        let due: Vec<(UserHash, DeviceId)> = self
            .latest
            .iter()
            .filter(|(_, s)| s.device != me && !s.followed && s.at.elapsed() >= after)
            .map(|(u, s)| (*u, s.device))
            .collect();
        for (user, from) in due {
            if let Some(l) = self.latest.get_mut(&user) {
                l.followed = true;
            }
            if self.follow_target(user, from) != Some(me) {
                continue;
            }
            let record = self.continued.get(&(user, from)).copied();
            if !record.unwrap_or_default().worth_following() {
                tracing::debug!(device = %from, "a session elsewhere went quiet; not followed (this person's sessions did not continue here)");
                continue;
            }
            let Some(history) = self.streams.get(&(from, user)).cloned() else {
                continue;
            };
            tracing::debug!(device = %from, "a session elsewhere went quiet; fetching its continuation here");
            let now = log::coarse(now_ms());
            self.act((from, user), &history, now);
        }
    }

    /// The device a person most often moved to next from `from`.
    fn follow_target(&self, user: UserHash, from: DeviceId) -> Option<DeviceId> {
        self.moves
            .get(&(user, from))
            .and_then(|m| m.iter().max_by_key(|(d, n)| (**n, **d)).map(|(d, _)| *d))
    }

    /// `e` is a person's first event after a gap long enough to follow (as
    /// seen here, the clock `maybe_follow` uses): would following have paid
    /// off, that is, is `e` on the device that would have followed, and
    /// among the continuation of the quiet session (the count tables'
    /// prediction, as many items as a plan fetches)? Recorded on every
    /// device whether or not anything was followed, so following starts
    /// and stops on evidence. Replayed history carries no gaps.
    fn record_continuation(&mut self, e: &AccessEvent, prev: Seen, sym: Sym) {
        let Some(after) = self.cfg.follow_after else {
            return;
        };
        if prev.at.elapsed() < after {
            return;
        }
        let Some(target) = self.follow_target(e.user, prev.device) else {
            return;
        };
        let hit = target == e.device
            && self.streams.get(&(prev.device, e.user)).is_some_and(|h| {
                let items = self.cfg.plan.max_items;
                hit_at(&self.markov.predict(h, items), sym, items)
            });
        self.continued
            .entry((e.user, prev.device))
            .or_default()
            .record(hit);
    }

    /// Chooses the predictor with the best recent accuracy for this stream
    /// and sends the plan for its prediction.
    fn act(&mut self, key: StreamKey, history: &[Sym], now: u64) {
        let usable: Vec<usize> = if self.gru_ready() {
            vec![0, 1, 2, 3]
        } else {
            vec![0, 1]
        };
        let accs = self.per_stream.get(&key).copied().unwrap_or_default();
        // Ties go to the cheaper candidate: the GRU is picked only once it
        // has done better than the count tables on this stream.
        let best = usable
            .iter()
            .copied()
            .max_by(|&a, &b| {
                accs[a]
                    .ema
                    .total_cmp(&accs[b].ema)
                    .then(TIE_RANK[b].cmp(&TIE_RANK[a]))
            })
            .unwrap_or(1);
        // The GRU is asked only when its prediction (or the mixture) is the
        // one acted on: it is the costly one.
        let preds = self.predictions(history, 8, best >= 2);
        // Every prediction is already ranked and cut to 8.
        let ranked = &preds[best];
        let Some(&current) = history.last() else {
            return;
        };
        let context_heat = self.temperature.heat(current, now);
        let chosen = plan(
            ranked,
            context_heat,
            |s| self.temperature.heat(s, now),
            &self.cfg.plan,
        );
        let items: Vec<(ResourceId, Depth)> = chosen
            .into_iter()
            .filter(|(s, _)| *s != current && self.sizes.get(s).is_some_and(|n| *n > 0))
            .filter_map(|(s, d)| self.syms.key(s).map(|r| (*r, d)))
            .collect();
        if let Ok(mut r) = self.stats.report.lock() {
            r.selected = NAMES[best].to_string();
        }
        // A full queue means the executor is busy with the previous plan,
        // which this one supersedes anyway; dropping it is fine.
        let _ = self.out.plans.try_send(Plan { items });
    }

    fn flush(&mut self, force: bool) {
        if !self.to_store.is_empty() {
            if let Err(e) = self.store.access_put(&self.to_store) {
                tracing::warn!(error = %e, "could not store access events");
            }
            self.to_store.clear();
        }
        let due = self.last_publish.elapsed() >= Duration::from_secs(1)
            || self.to_publish.len() >= log::MAX_BATCH;
        if !self.to_publish.is_empty() && (due || force) {
            for batch in self.to_publish.chunks(log::MAX_BATCH) {
                (self.out.publish)(log::encode_batch(batch));
            }
            self.to_publish.clear();
            self.last_publish = Instant::now();
        }
    }

    fn maybe_train(&mut self) {
        if self.since_train < TRAIN_EVERY
            || (self.backlog.queued > 0 && self.since_train < TRAIN_DEFER_MAX)
            || Instant::now() < self.train_not_before
        {
            return;
        }
        let Some(gru) = self.gru.as_mut() else { return };
        self.since_train -= TRAIN_EVERY;
        let t = Instant::now();
        let loss = gru.train_round();
        let took = t.elapsed();
        self.train_not_before = Instant::now() + took.mul_f64(1.0 / TRAIN_DUTY - 1.0);
        let ms = took.as_secs_f32() * 1000.0;
        self.gru_rounds += 1;
        self.rounds_since_checkpoint += 1;
        let vocabulary = gru.vocabulary();
        let ready = self.gru_ready();
        if let Ok(mut r) = self.stats.report.lock() {
            r.gru_rounds = self.gru_rounds;
            r.gru_loss = loss;
            r.gru_round_ms = ms;
            r.vocabulary = vocabulary;
            if ready && !r.gru_state.starts_with("off") {
                r.gru_state = "learning".into();
            }
        }
        self.refresh_report();
        if self.rounds_since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint();
        }
    }

    fn checkpoint(&mut self) {
        let Some(gru) = self.gru.as_ref() else { return };
        if self.rounds_since_checkpoint == 0 {
            return;
        }
        let syms = &self.syms;
        match gru.save(&self.cfg.model_dir, |s| syms.key(s).map(|r| r.0)) {
            Ok(()) => self.rounds_since_checkpoint = 0,
            Err(e) => tracing::warn!(error = %e, "could not checkpoint the prediction model"),
        }
    }

    fn maybe_trim(&mut self) {
        if self.last_trim.elapsed() < Duration::from_secs(600) {
            return;
        }
        self.last_trim = Instant::now();
        let min_ts = now_ms().saturating_sub(self.cfg.max_age_ms);
        if let Err(e) = self.store.access_trim(min_ts, self.cfg.max_events) {
            tracing::warn!(error = %e, "could not trim the access log");
        }
        self.refresh_report();
    }

    fn refresh_report(&mut self) {
        self.last_report = Instant::now();
        if let Ok(mut r) = self.stats.report.lock() {
            r.accuracy = NAMES
                .iter()
                .zip(self.overall.iter())
                .map(|(n, a)| (n.to_string(), a.ema))
                .collect();
            r.resources = self.syms.len();
            r.markov_contexts = self.markov.contexts();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::rnn::GruConfig;

    fn engine(
        dir: &std::path::Path,
    ) -> (
        EngineHandle,
        std::thread::JoinHandle<()>,
        tokio::sync::mpsc::Receiver<Plan>,
    ) {
        engine_sharing(dir, false)
    }

    fn engine_sharing(
        dir: &std::path::Path,
        share: bool,
    ) -> (
        EngineHandle,
        std::thread::JoinHandle<()>,
        tokio::sync::mpsc::Receiver<Plan>,
    ) {
        let store = Arc::new(RocksStore::open(&dir.join("db")).expect("store"));
        let (plans, rx) = tokio::sync::mpsc::channel(1024);
        let cfg = EngineConfig {
            me: DeviceId([1; 16]),
            learn: true,
            share,
            prefetch: true,
            user_key: [0; 32],
            users: Default::default(),
            gru: GruConfig {
                capacity: 32,
                train_every: 0,
                ..Default::default()
            },
            model_dir: dir.join("model"),
            max_events: 10_000,
            max_age_ms: u64::MAX / 2,
            plan: PlanConfig::default(),
            half_life_ms: 3_600_000,
            follow_after: None,
        };
        let publish: Box<dyn Fn(Vec<u8>) + Send> = Box::new(|_| {});
        let (h, t) = start(cfg, store, Outputs { publish, plans }).expect("engine thread");
        (h, t, rx)
    }

    fn wait_for_events(h: &EngineHandle, n: u64) {
        let t = Instant::now();
        while h.stats.local_events.load(Ordering::Relaxed) < n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the engine did not take the opens"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Another device's events are taken only by a device that shares its
    /// own (`access_share`); one that does not neither sends nor keeps
    /// anyone's.
    #[test]
    fn a_device_that_does_not_share_keeps_no_one_elses_events() {
        let other = DeviceId([2; 16]);
        let now = log::coarse(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        );
        let batch: Vec<log::AccessEvent> = (1..=5)
            .map(|seq| log::AccessEvent {
                resource: ResourceId(seq + 10),
                device: other,
                seq,
                user: log::UserHash([3; 16]),
                ts_ms: now,
                size: 1,
            })
            .collect();
        for share in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (h, thread, _plans) = engine_sharing(dir.path(), share);
            h.remote(other, log::encode_batch(&batch));
            // An own open after it: once it is counted, the batch before it
            // has been handled too (one thread, in order).
            h.opened(ResourceId(1), 0, 1);
            wait_for_events(&h, 1);
            let taken = h.stats.remote_events.load(Ordering::Relaxed);
            h.stop(thread);
            let store = RocksStore::open(&dir.path().join("db")).expect("store");
            let mut kept = 0;
            store
                .access_scan_newest(|b| {
                    if log::decode(b).is_ok_and(|e| e.device == other) {
                        kept += 1;
                    }
                    true
                })
                .expect("scan");
            if share {
                assert_eq!((taken, kept), (5, 5));
            } else {
                assert_eq!((taken, kept), (0, 0));
            }
        }
    }

    /// Opens that find the engine behind are all learned, but only the last
    /// of the burst is planned for (each plan supersedes the one before);
    /// opens that find it caught up are each planned for.
    #[test]
    fn a_burst_of_opens_is_learned_in_full_and_planned_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (h, thread, mut plans) = engine(dir.path());
        let files: Vec<ResourceId> = (1..=4).map(ResourceId).collect();
        // Sent before the engine has built its model: they queue up.
        let burst = 400u64;
        for i in 0..burst {
            h.opened(files[i as usize % 4], 0, 1000);
        }
        wait_for_events(&h, burst);
        let mut planned = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            while plans.try_recv().is_ok() {
                planned += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(planned >= 1, "the last open of the burst gets a plan");
        assert!(
            planned < burst / 4,
            "{planned} plans for a burst of {burst} opens"
        );
        // Caught up: one plan per open, and it names what comes next.
        for i in 0..8u64 {
            h.opened(files[(burst + i) as usize % 4], 0, 1000);
            let plan = plans.blocking_recv().expect("a plan");
            let next = files[(burst + i + 1) as usize % 4];
            assert_eq!(plan.items.first().map(|(r, _)| *r), Some(next));
        }
        h.stop(thread);
    }
}
