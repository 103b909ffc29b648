//! Consensus on one namespace for every device, with openraft 0.9, and
//! authority as ownership. A change to what this device governs is applied
//! here at once (`Shared::apply_local`: durable in the WAL, visible to every
//! program here) and recorded in the outbox (`outbox.rs`), which a shipper
//! task sends to the Raft log in batches (group commit). A change to what
//! another device governs is forwarded to that authority (one round trip)
//! and returns once the authority's batch holding it is applied here; one
//! spanning several authorities is committed through Raft after each has
//! shipped its outbox. An open of a file governed elsewhere first catches
//! up with its authority (close-to-open). The log and the state machine
//! persist in the device's RocksDB, RPCs travel over the mesh as
//! `/meshfs/raft/1`, and the leader keeps Raft's membership in step with
//! the mesh's member list (learners first, voters up to `max_voters`).

// openraft's error types are large (≈224 bytes) and its traits return them;
// boxing them in our helpers would only add conversions at every call.
#![allow(clippy::result_large_err)]

mod authority;
mod journal;
mod log_store;
mod membership;
mod network;
mod outbox;
mod reintegrate;
mod state_machine;
mod types;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::ids::{DeviceId, ResourceId};
use crate::mesh::{MeshClient, RaftInbound};
use crate::meta::{FsCommand, Governance, MetaError, MetaState, Outcome};
use crate::storage::{ChunkStore, MetaStore, RocksStore};

pub use authority::{PolicySettings, ResourceStat};
pub use network::{Reply, Rpc};
pub use state_machine::{AppliedBatch, ApplyHook, Local};
pub use types::{node_id, LocalChange, NodeId, Op, RaftNode, Request, Response, TypeConfig};

use network::call;
use types::Raft;

/// Timings and limits from Config.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub data_dir: PathBuf,
    pub name: String,
    /// Whether this device starts a new cluster when it has none (the
    /// device `meshfs init` made); joined devices wait to be added.
    pub bootstrap: bool,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Longest an open waits for the leader's read index.
    pub read_wait: Duration,
    /// Longest a write waits for a leader to commit it.
    pub write_timeout: Duration,
    /// How long a change waits for the device that governs it (or for a
    /// commit, when it spans several) before it is made tentatively here.
    pub offline_after: Duration,
    pub max_voters: usize,
    /// How long the shipper gathers local changes before proposing a batch
    /// (group commit), unless someone waits for them (fsync).
    pub batch_delay: Duration,
    /// Most changes in one batch (one log entry).
    pub batch_max: usize,
    pub policy: PolicySettings,
    /// What version history keeps, and how often the leader applies it.
    pub retention: crate::meta::retention::Retention,
    pub prune_every: Duration,
}

/// Most bytes of changes in one batch: with `MAX_PAYLOAD_ENTRIES` of them
/// an append stays well inside the mesh's 16 MiB frame.
pub const BATCH_MAX_BYTES: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("no leader could commit the change within {0:?} (is a majority of voters up?)")]
    NoQuorum(Duration),
    #[error("raft stopped on this device: {0}")]
    Stopped(String),
}

/// Entries a leader sends in one append: each may be a batch of many
/// changes (up to `BATCH_MAX_BYTES`), so a few catch a follower up quickly
/// while one append stays within a frame.
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

/// The handle the rest of the daemon uses.
#[derive(Clone)]
pub struct Replica {
    raft: Raft,
    mesh: MeshClient,
    shared: Arc<state_machine::Shared>,
    me: NodeId,
    device: DeviceId,
    settings: Arc<RaftSettings>,
    rt: tokio::runtime::Handle,
    stale_reads: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes the shipper: the outbox has changes.
    kick: Arc<tokio::sync::Notify>,
    /// Someone waits for the outbox to commit: ship without gathering.
    urgent: Arc<std::sync::atomic::AtomicBool>,
    /// Results of changes forwarded here, by (origin, request id), so that
    /// a retry after a lost reply is answered without applying twice.
    forwarded: Arc<std::sync::Mutex<ForwardCache>>,
    /// Counters for `meshfs status`.
    counters: Arc<Counters>,
    /// Usage reports and, on the leader, the authority policy.
    policy: Arc<authority::Policy>,
    /// Whether this device's programs still use an inode (set by the
    /// daemon from `fs`): a forwarded reclaim of it waits for them.
    in_use: Arc<std::sync::OnceLock<InUseFn>>,
    /// Seals held here for changes spanning authorities, by (asker, token).
    leases: Arc<std::sync::Mutex<Leases>>,
    /// Authorities that did not answer a catch-up lately: opens and
    /// lookups serve the local replica at once instead of each waiting
    /// `read_wait` again.
    unreachable: Arc<std::sync::Mutex<std::collections::HashMap<DeviceId, Instant>>>,
    /// Ids of this device's requests: a random start drawn once per process
    /// (so a restarted daemon does not reuse the ids its predecessor's
    /// replies are kept under), then counted up. Drawing fresh random bytes
    /// per request cost three system calls on every namespace change.
    next_request: Arc<std::sync::atomic::AtomicU64>,
    /// Tentative changes' reintegration and the conflicts it met.
    reint: Arc<reintegrate::State>,
}

/// Starts Raft on the current runtime over `meta` (the namespace the
/// filesystem reads) and `store`.
pub async fn start(
    settings: RaftSettings,
    mesh: MeshClient,
    store: Arc<RocksStore>,
    meta: Arc<RwLock<MetaState>>,
) -> Result<Replica, RaftError> {
    let device = mesh.device();
    let me = node_id(device);
    let store_for_reint = store.clone();
    let shared = Arc::new(state_machine::Shared::load(
        meta,
        store.clone(),
        device,
        settings.data_dir.join("raft"),
    )?);
    let config = openraft::Config {
        cluster_name: "meshfs".into(),
        heartbeat_interval: settings.heartbeat.as_millis() as u64,
        election_timeout_min: settings.election_min.as_millis() as u64,
        election_timeout_max: settings.election_max.as_millis() as u64,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(20_000),
        // Pieces of at most 1 MiB: a snapshot travels as many small frames
        // interleaved with everyone's other traffic.
        snapshot_max_chunk_size: 1 << 20,
        max_in_snapshot_log_to_keep: 1000,
        install_snapshot_timeout: 10_000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| RaftError::Raft(e.to_string()))?;
    let raft = Raft::new(
        me,
        Arc::new(config),
        network::Network {
            transport: mesh.clone(),
        },
        log_store::LogStore::new(store),
        state_machine::StateMachine {
            shared: shared.clone(),
        },
    )
    .await
    .map_err(|e| RaftError::Raft(e.to_string()))?;
    let settings_policy = settings.policy.clone();
    let (tx, rx) = mpsc::channel(1024);
    mesh.set_raft_inbox(tx)
        .await
        .map_err(|e| RaftError::Raft(e.to_string()))?;
    let replica = Replica {
        raft: raft.clone(),
        mesh: mesh.clone(),
        shared,
        me,
        device,
        settings: Arc::new(settings),
        rt: tokio::runtime::Handle::current(),
        stale_reads: Default::default(),
        kick: Default::default(),
        urgent: Default::default(),
        forwarded: Default::default(),
        counters: Default::default(),
        policy: Arc::new(authority::Policy::new(settings_policy)),
        unreachable: Default::default(),
        in_use: Default::default(),
        leases: Default::default(),
        reint: Arc::new(reintegrate::State::load(&store_for_reint)),
        next_request: Arc::new(std::sync::atomic::AtomicU64::new(u64::from_le_bytes(
            crate::ids::random_bytes(),
        ))),
    };
    tokio::spawn(serve(replica.clone(), rx));
    tokio::spawn(ship(replica.clone()));
    tokio::spawn(reintegrate::run(replica.clone()));
    tokio::spawn(reintegrate::watch_members(replica.clone()));
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| RaftError::Raft(e.to_string()))?;
    if !initialized && replica.settings.bootstrap {
        replica.bootstrap().await?;
    }
    tokio::spawn(membership::follow_members(replica.clone()));
    tokio::spawn(watch_stop(replica.clone()));
    tokio::spawn(reserve_at_start(replica.clone()));
    tokio::spawn(authority::run(replica.clone()));
    tokio::spawn(prune_versions(replica.clone()));
    Ok(replica)
}

/// Seals held for changes spanning authorities: by (asker, token), the
/// resources sealed.
type Leases = std::collections::HashMap<(DeviceId, u64), Vec<ResourceId>>;

/// Whether this device still uses an inode (`Replica::set_in_use`).
pub type InUseFn = Arc<dyn Fn(ResourceId) -> bool + Send + Sync>;

/// How long a reclaim for another device's file keeps trying to reach it.
const RECLAIM_FOR: Duration = Duration::from_secs(600);

/// Decodes `bytes` as a Raft-protocol frame (request and reply) from the
/// authenticated `from` and judges a request as `answer` would first
/// (`network::forged`); for fuzzing (`crate::fuzzing`), which cannot reach
/// the private network module.
#[doc(hidden)]
pub fn judge_frame(bytes: &[u8], from: DeviceId) {
    if let Ok(rpc) = postcard::from_bytes::<Rpc>(bytes) {
        let _ = network::forged(from, &rpc);
    }
    let _ = postcard::from_bytes::<Reply>(bytes);
}

/// How long an authority that did not answer a catch-up is not waited for
/// again by opens and lookups.
const UNREACHABLE_FOR: Duration = Duration::from_secs(3);

/// Why a catch-up with another device failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// It did not answer.
    Silent,
    /// It answered; its batch was not applied here in time.
    Behind,
}

/// Forwarded changes answered lately, oldest first.
#[derive(Default)]
struct ForwardCache {
    map: std::collections::HashMap<(DeviceId, u64), Forwarded>,
    order: std::collections::VecDeque<(DeviceId, u64)>,
}

/// More than the changes all devices can have in flight to one authority.
const FORWARD_CACHE: usize = 4096;

/// A forwarded change's answer: sequence, result, values it produced.
type Forwarded = (u64, Response, Option<crate::meta::Effects>);

impl ForwardCache {
    fn get(&self, key: &(DeviceId, u64)) -> Option<Forwarded> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: (DeviceId, u64), v: Forwarded) {
        if self.map.insert(key, v).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > FORWARD_CACHE {
            if let Some(k) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
    }
}

/// What `meshfs status` counts about changes.
#[derive(Default)]
struct Counters {
    /// Changes applied here as their authority.
    local: std::sync::atomic::AtomicU64,
    /// Changes sent to another device's authority.
    forwarded: std::sync::atomic::AtomicU64,
    /// Changes committed through Raft before applying (several
    /// authorities, cluster bookkeeping).
    through_raft: std::sync::atomic::AtomicU64,
    /// Batches of local changes proposed to the log.
    batches: std::sync::atomic::AtomicU64,
    /// Bytes of named files served to other devices.
    served: std::sync::atomic::AtomicU64,
    /// Raft messages refused for claiming another sender.
    forged: std::sync::atomic::AtomicU64,
}

/// Says once, loudly, when Raft stops on this device (openraft stops for
/// good on a storage error, such as a log entry it cannot read): from then
/// on changes are refused (`Replica::change`), `meshfs status` says why,
/// and what is here stays readable.
async fn watch_stop(replica: Replica) {
    let mut metrics = replica.raft.metrics();
    loop {
        let stopped = metrics
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|e| e.to_string());
        if let Some(why) = stopped {
            tracing::error!(
                error = %why,
                "raft stopped on this device: changes are refused (EIO) and what is here stays readable; fix the cause and restart the daemon"
            );
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Gives this device a block of inode numbers as soon as it has the
/// cluster's state, so that its first create does not wait for Raft.
async fn reserve_at_start(replica: Replica) {
    loop {
        if replica.shared.has_state() {
            let has = read_meta(&replica.shared.meta)
                .space()
                .block_of(replica.device)
                .is_some();
            if has {
                return;
            }
            match replica.reserve_inodes().await {
                Ok(()) => {
                    tracing::info!(
                        "inode numbers reserved: this device can create files while cut off"
                    );
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "reserving inode numbers; retrying"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies the retention policy while this device leads: what it no
/// longer keeps is dropped by one command through Raft, so that every
/// device forgets the same old versions and releases the same chunks. Any
/// device whose data dir's disk is short of space (below the reserve
/// every writer leaves) drops the older half of the history at once, and
/// again every second while it stays short: history gives way to new data.
async fn prune_versions(replica: Replica) {
    let every = replica.settings.prune_every;
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(every.min(Duration::from_secs(1))).await;
        if !replica.shared.has_state() {
            continue;
        }
        let dir = replica.settings.data_dir.clone();
        let short = tokio::task::spawn_blocking(move || !crate::storage::has_space(&dir, 0))
            .await
            .unwrap_or(false);
        let due = replica.leader_device() == Some(replica.device) && last.elapsed() >= every;
        if !short && !due {
            continue;
        }
        if due {
            last = Instant::now();
        }
        let meta = replica.shared.meta.clone();
        let mut policy = replica.settings.retention;
        let now = crate::meta::Timestamp::now();
        let found = tokio::task::spawn_blocking(move || {
            let meta = read_meta(&meta);
            if short {
                let held = crate::meta::retention::history_bytes(&meta);
                policy.max_bytes = policy.max_bytes.min(held / 2);
            }
            crate::meta::retention::expired(&meta, &policy, now)
        })
        .await;
        let Ok(expired) = found else { return };
        if expired.is_empty() {
            continue;
        }
        let (versions, trash) = (expired.versions.len(), expired.trash.len());
        let cmd = FsCommand::DropVersions {
            versions: expired.versions,
            trash: expired.trash,
        };
        match replica.propose(Op::Fs(cmd)).await {
            Ok(_) if short => tracing::warn!(
                versions,
                trash,
                "the data dir's disk is short of space: dropped the oldest kept versions"
            ),
            Ok(_) => tracing::info!(versions, trash, "retention dropped old versions"),
            Err(e) => tracing::debug!(error = %e, "dropping old versions; retried later"),
        }
    }
}

/// Sends the outbox to the log: waits for changes, gathers for
/// `batch_delay` (group commit) unless someone waits for them, proposes
/// the oldest as one batch, and goes on once it is applied here (which
/// takes it out of the outbox). A batch that fails is proposed again: its
/// changes apply once whatever happens (sequence numbers).
async fn ship(replica: Replica) {
    use std::sync::atomic::Ordering;
    loop {
        let notified = replica.kick.notified();
        if lock(&replica.shared.outbox).entries.is_empty() {
            notified.await;
            continue;
        }
        if !replica.urgent.swap(false, Ordering::AcqRel) {
            tokio::time::sleep(replica.settings.batch_delay).await;
        }
        let mut applied = replica.shared.progress.subscribe();
        let batch = lock(&replica.shared.outbox).batch(replica.settings.batch_max, BATCH_MAX_BYTES);
        let Some((first_seq, changes)) = batch else {
            // The oldest changes wait for another authority's batch to be
            // applied here (a foreign effect they come after).
            let _ = tokio::time::timeout(Duration::from_millis(100), applied.changed()).await;
            continue;
        };
        let n = changes.len();
        let req = Request {
            origin: replica.device,
            id: first_seq,
            op: Op::Batch { first_seq, changes },
        };
        let deadline = Instant::now() + replica.settings.write_timeout;
        match replica.propose_request(req, deadline).await {
            Ok(_) => {
                replica.counters.batches.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(first_seq, changes = n, "batch committed");
            }
            Err(e) => {
                tracing::debug!(error = %e, first_seq, "shipping a batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers Raft RPCs and the authority's own requests (forwarded changes,
/// catch-up) from members until the mesh goes away.
async fn serve(replica: Replica, mut inbox: mpsc::Receiver<RaftInbound>) {
    while let Some(req) = inbox.recv().await {
        let r = replica.clone();
        tokio::spawn(async move {
            let reply = match postcard::from_bytes::<Rpc>(&req.bytes) {
                Ok(rpc) => r.answer(req.from, rpc).await,
                Err(e) => Reply::Failed(format!("malformed raft request: {e}")),
            };
            let bytes = postcard::to_stdvec(&reply).unwrap_or_default();
            let _ = req.reply.send(bytes);
        });
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    crate::lock(m)
}

fn read_meta(m: &RwLock<MetaState>) -> std::sync::RwLockReadGuard<'_, MetaState> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

impl Replica {
    /// Makes this device a cluster of one, then snapshots and drops the log
    /// so that every device that joins starts from a snapshot of this
    /// namespace (which may predate Raft) rather than replaying a log on top
    /// of its own empty one.
    async fn bootstrap(&self) -> Result<(), RaftError> {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            self.me,
            RaftNode {
                name: self.settings.name.clone(),
                device: self.device,
            },
        );
        self.raft
            .initialize(nodes)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let wait = self.raft.wait(Some(Duration::from_secs(10)));
        let m = wait
            .state(openraft::ServerState::Leader, "bootstrap")
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let applied = m.last_log_index.unwrap_or(0);
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(applied), "bootstrap applied")
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        // Read into a local: a metrics guard held across the wait below
        // would block Raft from publishing the metrics it waits for.
        let last_applied = self.raft.metrics().borrow().last_applied;
        let last_applied = last_applied
            .ok_or_else(|| RaftError::Raft("nothing applied after bootstrap".into()))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .snapshot(last_applied, "bootstrap snapshot")
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        self.raft
            .trigger()
            .purge_log(applied)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        tracing::info!("started a new raft cluster with this device as its only voter");
        Ok(())
    }

    pub fn set_hook(&self, hook: ApplyHook) {
        self.shared.set_hook(hook);
    }

    /// The device that governs `resource`, if it exists here.
    pub fn authority(&self, resource: ResourceId) -> Option<DeviceId> {
        read_meta(&self.shared.meta)
            .authority(resource)
            .map(|a| a.device)
    }

    /// The last log index applied here (0 before any).
    fn applied_index(&self) -> u64 {
        self.shared.applied_index()
    }

    fn leader_device(&self) -> Option<DeviceId> {
        self.leader().map(|(_, d)| d)
    }

    fn leader(&self) -> Option<(NodeId, DeviceId)> {
        // Borrowed, not cloned: this runs on every proposal.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.device))
    }

    fn next_id(&self) -> u64 {
        self.next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes `op` and waits until it is committed and applied here.
    pub async fn propose(&self, op: Op) -> Result<Response, RaftError> {
        let req = Request {
            origin: self.device,
            id: self.next_id(),
            op,
        };
        self.propose_request(req, Instant::now() + self.settings.write_timeout)
            .await
    }

    async fn propose_request(
        &self,
        req: Request,
        deadline: Instant,
    ) -> Result<Response, RaftError> {
        let cmds: Vec<&FsCommand> = match &req.op {
            Op::Fs(cmd) => vec![cmd],
            Op::Batch { changes, .. } => changes.iter().map(|c| &c.cmd).collect(),
        };
        self.sync_before_sending(cmds).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RaftError::NoQuorum(self.settings.write_timeout));
            }
            match self.leader() {
                Some((id, _)) if id == self.me => {
                    match tokio::time::timeout(left, self.raft.client_write(req.clone())).await {
                        Ok(Ok(r)) => return Ok(r.data),
                        Ok(Err(e)) if e.forward_to_leader::<RaftNode>().is_some() => {}
                        Ok(Err(e)) => return Err(RaftError::Raft(e.to_string())),
                        Err(_) => return Err(RaftError::NoQuorum(self.settings.write_timeout)),
                    }
                }
                Some((_, device)) => {
                    let rpc = Rpc::Write {
                        req: req.clone(),
                        expires_ms: network::unix_ms() + left.as_millis() as u64,
                    };
                    match call(&self.mesh, device, &rpc, left).await {
                        Ok(Reply::Written { index, result }) => {
                            self.wait_applied(index, deadline).await?;
                            return Ok(result);
                        }
                        Ok(Reply::NotLeader { .. }) => {}
                        Ok(other) => {
                            tracing::debug!(reply = ?other, "forwarded write failed; retrying");
                        }
                        // Not delivered, or delivered and the reply lost:
                        // either way the retry is safe, since the state
                        // machine applies a request id once.
                        Err(e) => tracing::debug!(error = %e, "forwarding a write failed"),
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), RaftError> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(left.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "local apply")
            .await
            .map(|_| ())
            .map_err(|_| RaftError::NoQuorum(self.settings.write_timeout))
    }

    /// Reserves a block of inode numbers for this device through Raft.
    async fn reserve_inodes(&self) -> Result<(), RaftError> {
        self.propose(Op::Fs(FsCommand::ReserveInodes {
            device: self.device,
        }))
        .await?
        .map(|_| ())
        .map_err(|e| RaftError::Raft(e.to_string()))
    }

    fn kick_shipper(&self, urgent: bool) {
        if urgent {
            self.urgent
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.kick.notify_one();
    }

    /// Waits until `device`'s outbox entry `seq` (and everything before it)
    /// is applied here.
    async fn wait_shipped(
        &self,
        device: DeviceId,
        seq: u64,
        deadline: Instant,
    ) -> Result<(), RaftError> {
        let mut progress = self.shared.progress.subscribe();
        loop {
            if self.shared.shipped(device) >= seq {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || tokio::time::timeout(left, progress.changed())
                    .await
                    .is_err()
            {
                return Err(RaftError::NoQuorum(self.settings.write_timeout));
            }
        }
    }

    /// Waits until every change `device` applied as authority before this
    /// call is applied here: this device's own outbox committed, or another
    /// device asked to ship its outbox (one round trip) and its batch
    /// applied here.
    async fn catch_up_with(&self, device: DeviceId, deadline: Instant) -> Result<(), RaftError> {
        if device == self.device {
            let last = lock(&self.shared.outbox).last_seq();
            if self.shared.shipped(device) >= last {
                return Ok(());
            }
            self.kick_shipper(true);
            return self.wait_shipped(device, last, deadline).await;
        }
        self.catch_up_with_other(device, deadline)
            .await
            .map_err(|_| RaftError::NoQuorum(self.settings.write_timeout))
    }

    /// `catch_up_with` another device, saying why it failed: the device
    /// never answered, or it answered and what it shipped was not applied
    /// here in time (busy, not out of reach).
    async fn catch_up_with_other(
        &self,
        device: DeviceId,
        deadline: Instant,
    ) -> Result<(), CatchUp> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CatchUp::Silent);
            }
            match call(&self.mesh, device, &Rpc::Ship, left).await {
                Ok(Reply::Shipping { seq }) => {
                    return self
                        .wait_shipped(device, seq, deadline)
                        .await
                        .map_err(|_| CatchUp::Behind)
                }
                Ok(other) => tracing::debug!(reply = ?other, "catching up with an authority"),
                Err(e) => tracing::debug!(error = %e, "catching up with an authority"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Applies a change where it is decided (see the module comment) and
    /// returns its result. Blocking: called from kernel request threads;
    /// the common case (this device governs it) touches no async code.
    pub fn change(&self, cmd: FsCommand) -> Result<Response, RaftError> {
        self.change_as(cmd, true)
    }

    /// `change`; `journal_first`: while tentative changes wait, a change
    /// another device governs joins them, so that the journal keeps the
    /// order programs made them in (reintegration's own changes, conflict
    /// copies and directories made again, pass false).
    fn change_as(&self, cmd: FsCommand, journal_first: bool) -> Result<Response, RaftError> {
        use std::sync::atomic::Ordering;
        // Raft stopped on an error (a log entry that could not be read):
        // nothing made here could ever commit, so it is refused now (EIO)
        // rather than kept as if it would.
        if let Some(why) = self.stopped() {
            return Err(RaftError::Stopped(why));
        }
        let deadline = Instant::now() + self.settings.write_timeout;
        let sealed_until = Instant::now() + self.settings.offline_after;
        let id = self.next_id();
        let mut reserved = false;
        loop {
            if !self.shared.has_state() {
                // A device that just joined has a placeholder namespace
                // until the cluster's state arrives.
                if Instant::now() >= deadline {
                    return Err(RaftError::NoQuorum(self.settings.write_timeout));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let gov = match self.shared.apply_local(self.device, id, cmd.clone())? {
                Local::Applied { out, .. } => {
                    self.counters.local.fetch_add(1, Ordering::Relaxed);
                    self.kick_shipper(false);
                    self.record_change(&cmd);
                    return Ok(Ok(out));
                }
                Local::Sealed => {
                    // Being handed over, or decided with other authorities:
                    // settled in a moment, or, when that takes longer than
                    // offline_after, kept as a tentative change.
                    if Instant::now() >= sealed_until {
                        return self.change_tentatively(id, cmd);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Local::Refused(MetaError::NoInodes) if !reserved => {
                    reserved = true;
                    let r = self.clone();
                    block_on(&self.rt, async move { r.reserve_inodes().await })?;
                    continue;
                }
                Local::Refused(e) | Local::Changed(journal::Failure::Error(e)) => {
                    return Ok(Err(e))
                }
                Local::Changed(journal::Failure::Changed { .. }) => {
                    return Ok(Err(MetaError::Invalid("changed meanwhile".into())))
                }
                Local::NotMine(gov) => gov,
            };
            let may_wait = matches!(gov, Governance::One(_) | Governance::Several(_));
            if may_wait && self.offline_now(&cmd, &gov, journal_first) {
                return self.change_tentatively(id, cmd);
            }
            let until = if may_wait {
                deadline.min(Instant::now() + self.settings.offline_after)
            } else {
                deadline
            };
            let r = self.clone();
            let (c, g) = (cmd.clone(), gov.clone());
            match block_on(
                &self.rt,
                async move { r.route(id, c, g, until, false).await },
            ) {
                Ok(Some(resp)) => {
                    if resp.is_ok() {
                        self.record_change(&cmd);
                    }
                    return Ok(resp);
                }
                // The authority moved meanwhile: route again.
                Ok(None) => {}
                Err(RaftError::NoQuorum(_)) if may_wait => {
                    self.mark_unreachable(&gov);
                    return self.change_tentatively(id, cmd);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Counts bytes this device served to another of `ino` (usage: a
    /// device that serves a file much is a good place to govern it).
    pub fn record_served(&self, ino: ResourceId, bytes: u64) {
        self.counters
            .served
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.policy.record(
            &[ino],
            crate::authority::Usage {
                served_bytes: bytes,
                ..Default::default()
            },
        );
    }

    fn record_open(&self, ino: ResourceId) {
        self.policy.record(
            &[ino],
            crate::authority::Usage {
                opens: 1,
                ..Default::default()
            },
        );
    }

    /// Sets how a forwarded reclaim learns whether this device still uses
    /// the inode (once).
    pub fn set_in_use(&self, f: InUseFn) {
        let _ = self.in_use.set(f);
    }

    fn in_use(&self, ino: ResourceId) -> bool {
        self.in_use.get().is_some_and(|f| f(ino))
    }

    /// Frees an unlinked inode nothing here uses: at once when this device
    /// governs it, else at its authority, in the background (retried for
    /// up to `RECLAIM_FOR`; the authority defers while it still uses it,
    /// and frees it itself when it is done).
    pub fn reclaim_unused(&self, ino: ResourceId) {
        let id = self.next_id();
        let cmd = FsCommand::Reclaim { ino };
        match self.shared.apply_local(self.device, id, cmd.clone()) {
            Ok(Local::Applied { .. }) => self.kick_shipper(false),
            Ok(Local::Refused(_)) => {}
            Ok(Local::Changed(_)) => {}
            Ok(Local::NotMine(_) | Local::Sealed) => {
                let r = self.clone();
                self.rt
                    .spawn(async move { r.reclaim_remote(ino, id, cmd).await });
            }
            Err(e) => tracing::warn!(%ino, error = %e, "could not reclaim an unlinked inode"),
        }
    }

    async fn reclaim_remote(&self, ino: ResourceId, id: u64, cmd: FsCommand) {
        let until = Instant::now() + RECLAIM_FOR;
        let mut pause = Duration::from_millis(50);
        while Instant::now() < until {
            let gov = read_meta(&self.shared.meta).governance(&cmd);
            let deadline = Instant::now() + self.settings.write_timeout;
            let done = match gov {
                Ok(Governance::One(a)) if a == self.device => {
                    let (shared, c) = (self.shared.clone(), cmd.clone());
                    let local =
                        tokio::task::spawn_blocking(move || shared.apply_local(shared.me, id, c))
                            .await;
                    if let Ok(Ok(Local::Applied { .. })) = local {
                        self.kick_shipper(false);
                    }
                    true
                }
                Ok(Governance::One(a)) => {
                    matches!(
                        self.forward(a, id, cmd.clone(), deadline).await,
                        Ok(Some(_))
                    )
                }
                // Gone already: nothing to free.
                _ => true,
            };
            if done {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
        tracing::warn!(%ino, "no authority took the reclaim of an unlinked inode; it stays until one does");
    }

    /// Counts a change by this device's programs against the resources
    /// that decide it (the authority policy moves them to who works).
    fn record_change(&self, cmd: &FsCommand) {
        self.policy.record(
            &cmd.decided_by(),
            crate::authority::Usage {
                changes: 1,
                ..Default::default()
            },
        );
    }

    /// A change this device does not decide: to its authority, or through
    /// Raft. `None` when the authority had moved (route again).
    /// `reintegrating`: a tentative change being reintegrated (see
    /// `Outbox::last_touching`).
    async fn route(
        &self,
        id: u64,
        cmd: FsCommand,
        gov: Governance,
        deadline: Instant,
        reintegrating: bool,
    ) -> Result<Option<Response>, RaftError> {
        use std::sync::atomic::Ordering;
        let req = |cmd| Request {
            origin: self.device,
            id,
            op: Op::Fs(cmd),
        };
        match gov {
            Governance::One(authority) => {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                self.forward(authority, id, cmd, deadline).await
            }
            Governance::Several(devices) => {
                // Each authority seals what the change involves and ships
                // its outbox: the change is decided on everything they
                // acknowledged, and nothing of theirs races it until it is
                // committed.
                let resources = read_meta(&self.shared.meta).involved(&cmd);
                let mut local = Vec::new();
                let mut remote = Vec::new();
                let outcome = async {
                    for d in &devices {
                        let seq = if *d == self.device {
                            let (mine, seq) = self.shared.seal_resources(&resources, reintegrating);
                            local = mine;
                            if self.shared.shipped(self.device) < seq {
                                self.kick_shipper(true);
                            }
                            seq
                        } else {
                            let seq = self
                                .seal_at(*d, id, &resources, deadline, reintegrating)
                                .await?;
                            remote.push(*d);
                            seq
                        };
                        if !reintegrating {
                            self.wait_shipped(*d, seq, deadline).await?;
                            continue;
                        }
                        // A tentative change waits for an authority's
                        // outbox a bounded time: that authority's own
                        // changes may wait behind its own tentative changes,
                        // which may wait for this one (devices cut off in
                        // turn, each renaming across the others'
                        // directories, deadlocked so), and this device's
                        // later changes to the same directories wait behind
                        // this one. What it was made on is checked when it
                        // is applied, so going first is at worst a conflict,
                        // kept; this device's earlier changes to what it
                        // touches or expects are committed before it starts
                        // (`tentative_ready`).
                        let soon = deadline.min(Instant::now() + self.settings.offline_after);
                        if self.wait_shipped(*d, seq, soon).await.is_err() {
                            tracing::debug!(
                                authority = %d,
                                seq,
                                "reintegrating without waiting for the authority's outbox"
                            );
                        }
                    }
                    self.counters.through_raft.fetch_add(1, Ordering::Relaxed);
                    self.propose_request(req(cmd), deadline).await
                }
                .await;
                self.shared.unseal_resources(&local);
                // The change is applied here (or was given up): each
                // authority lifts its seal once it has applied as much.
                let applied = self.applied_index();
                for d in remote {
                    let r = self.clone();
                    tokio::spawn(async move {
                        let timeout = r.settings.read_wait;
                        let rpc = Rpc::Unseal { token: id, applied };
                        let _ = call(&r.mesh, d, &rpc, timeout).await;
                    });
                }
                outcome.map(Some)
            }
            Governance::Cluster | Governance::Anyone => {
                self.counters.through_raft.fetch_add(1, Ordering::Relaxed);
                self.propose_request(req(cmd), deadline).await.map(Some)
            }
        }
    }

    /// Asks authority `d` to seal `resources` for the change `token` and ship
    /// its outbox; returns the sequence to wait for. Retried until
    /// `deadline` while `d` does not answer.
    async fn seal_at(
        &self,
        d: DeviceId,
        token: u64,
        resources: &[ResourceId],
        deadline: Instant,
        shippable: bool,
    ) -> Result<u64, RaftError> {
        let rpc = Rpc::Seal {
            token,
            resources: resources.to_vec(),
            lease_ms: self.settings.write_timeout.as_millis() as u64,
            shippable,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RaftError::NoQuorum(self.settings.write_timeout));
            }
            match call(&self.mesh, d, &rpc, left).await {
                Ok(Reply::Shipping { seq }) => return Ok(seq),
                Ok(other) => tracing::debug!(reply = ?other, "sealing at an authority"),
                Err(e) => tracing::debug!(error = %e, "sealing at an authority"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lifts the seals held for (`from`, `token`), once.
    fn end_lease(&self, from: DeviceId, token: u64) {
        if let Some(res) = lock(&self.leases).remove(&(from, token)) {
            self.shared.unseal_resources(&res);
        }
    }

    /// A change naming new chunks leaves this device (for the Raft log, or
    /// for its authority) only once those chunks are on this device's
    /// disk. Otherwise the others could commit a version whose only copy
    /// of the bytes sits in this device's unsynced WAL, and a power cut
    /// here would leave that version, the file's current one, unreadable
    /// everywhere (EIO), where the promise is that a change closed shortly
    /// before a cut is lost whole. Found by tests/power.rs cutting three
    /// devices at once. One WAL sync, skipped when nothing was written
    /// since the last (the periodic `sync_interval_ms` sync often got
    /// there first).
    async fn sync_before_sending(&self, cmds: Vec<&FsCommand>) -> Result<(), RaftError> {
        if !cmds.into_iter().any(outbox::names_chunks) {
            return Ok(());
        }
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || store.sync_if_dirty())
            .await
            .map_err(|e| RaftError::Raft(format!("syncing before sending a change: {e}")))??;
        Ok(())
    }

    /// Sends a change to its authority, which applies it at once and
    /// answers with the values it produced; they are shown here until the
    /// authority's batch holding the change is applied here, so the program
    /// that asked sees its change at once (one round trip). `None`: not the
    /// authority any more.
    async fn forward(
        &self,
        authority: DeviceId,
        id: u64,
        cmd: FsCommand,
        deadline: Instant,
    ) -> Result<Option<Response>, RaftError> {
        self.sync_before_sending(vec![&cmd]).await?;
        // A new version's chunks are only here: keep them until the change
        // is committed.
        let pins = outbox::chunks_of(&cmd);
        self.shared.store.pin(&pins);
        let unpin = |r: &Replica| r.shared.store.unpin(&pins);
        let left = deadline.saturating_duration_since(Instant::now());
        let rpc = Rpc::Forward {
            origin: self.device,
            id,
            cmd,
            expires_ms: network::unix_ms() + left.as_millis() as u64,
        };
        let reply = call(&self.mesh, authority, &rpc, left).await;
        match reply {
            Ok(Reply::Forwarded {
                seq,
                result,
                effects,
            }) => {
                if result.is_err() {
                    unpin(self);
                    return Ok(Some(result));
                }
                match effects {
                    Some(fx) => self.shared.install_foreign(authority, seq, fx),
                    // An authority that reports no values: wait for its
                    // batch instead.
                    None => {
                        if let Err(e) = self.wait_shipped(authority, seq, deadline).await {
                            self.unpin_when_shipped(authority, seq, pins);
                            return Err(e);
                        }
                    }
                }
                self.unpin_when_shipped(authority, seq, pins);
                Ok(Some(result))
            }
            Ok(Reply::NotAuthority) => {
                unpin(self);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(None)
            }
            Ok(other) => {
                unpin(self);
                tracing::debug!(reply = ?other, "forwarding a change failed; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(None)
            }
            Err(e) => {
                unpin(self);
                tracing::debug!(error = %e, %authority, "forwarding a change failed; retrying");
                if Instant::now() >= deadline {
                    return Err(RaftError::NoQuorum(self.settings.write_timeout));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(None)
            }
        }
    }

    /// Releases pins once `authority`'s entry `seq` is applied here (or
    /// after 10 minutes).
    fn unpin_when_shipped(&self, authority: DeviceId, seq: u64, pins: Vec<crate::ids::ChunkHash>) {
        if pins.is_empty() {
            return;
        }
        let r = self.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(600);
            let _ = r.wait_shipped(authority, seq, until).await;
            r.shared.store.unpin(&pins);
        });
    }

    /// Answers one request from member `from` (authenticated by the mesh).
    async fn answer(&self, from: DeviceId, rpc: Rpc) -> Reply {
        match rpc {
            Rpc::Forward { expires_ms, .. } if network::unix_ms() > expires_ms => {
                Reply::Failed("forwarded change arrived after its deadline".into())
            }
            Rpc::Forward { origin, .. } if origin != from => {
                tracing::warn!(%from, %origin, "refused a forwarded change claiming another origin");
                Reply::Failed("a forwarded change must come from its origin".into())
            }
            Rpc::Forward {
                origin, id, cmd, ..
            } => self.apply_forwarded(origin, id, cmd, Vec::new()).await,
            Rpc::Reintegrate { expires_ms, .. } if network::unix_ms() > expires_ms => {
                Reply::Failed("reintegrated change arrived after its deadline".into())
            }
            Rpc::Reintegrate { origin, .. } if origin != from => {
                tracing::warn!(%from, %origin, "refused a reintegrated change claiming another origin");
                Reply::Failed("a reintegrated change must come from its origin".into())
            }
            Rpc::Reintegrate {
                origin,
                id,
                cmd,
                expect,
                applied,
                ..
            } => {
                // Checked only once this device has applied what the
                // origin had: else the origin's own save of a file it then
                // removed reads as a change made elsewhere. Not caught up
                // in time: the origin asks again later.
                let until = Instant::now() + self.settings.read_wait / 2;
                if self.wait_applied(applied, until).await.is_err() {
                    return Reply::Failed(format!(
                        "not caught up with the origin's log (index {applied}) yet"
                    ));
                }
                self.apply_forwarded(origin, id, cmd, expect).await
            }
            Rpc::Lookup { parent, name } => match self.shared.answer_lookup(parent, &name) {
                Ok((found, seq)) => Reply::Looked { found, seq },
                Err(()) => Reply::NotAuthority,
            },
            Rpc::Seal {
                token,
                resources,
                lease_ms,
                shippable,
            } => {
                // One lease per (asker, token): a repeated request re-seals
                // nothing.
                let mut resources = resources;
                resources.truncate(16);
                if !lock(&self.leases).contains_key(&(from, token)) {
                    let (mine, _) = self.shared.seal_resources(&resources, shippable);
                    lock(&self.leases).insert((from, token), mine);
                    let r = self.clone();
                    let lease = Duration::from_millis(lease_ms.min(60_000));
                    tokio::spawn(async move {
                        tokio::time::sleep(lease).await;
                        r.end_lease(from, token);
                    });
                }
                let seq = lock(&self.shared.outbox).last_touching(&resources, shippable);
                if self.shared.shipped(self.device) < seq {
                    self.kick_shipper(true);
                }
                Reply::Shipping { seq }
            }
            Rpc::Unseal { token, applied } => {
                // Lifted only once the change it was for is applied here
                // too: CI once saw an authority unsealed before the rename
                // it had been sealed for reached it, create the name the
                // rename had just taken, and turn its own create into a
                // create/create conflict. The lease bounds the wait.
                if self.applied_index() >= applied {
                    self.end_lease(from, token);
                } else {
                    let r = self.clone();
                    tokio::spawn(async move {
                        let _ = r
                            .wait_applied(applied, Instant::now() + r.settings.write_timeout)
                            .await;
                        r.end_lease(from, token);
                    });
                }
                Reply::Done
            }
            Rpc::Current { ino } => match self.shared.answer_current(ino) {
                Ok((inode, seq)) => Reply::Current {
                    inode: Box::new(inode),
                    seq,
                },
                Err(()) => Reply::NotAuthority,
            },
            Rpc::Ship => {
                let seq = lock(&self.shared.outbox).last_seq();
                if self.shared.shipped(self.device) < seq {
                    self.kick_shipper(true);
                }
                Reply::Shipping { seq }
            }
            Rpc::Report { usage, seen } => {
                if self.leader_device() != Some(self.device) {
                    return Reply::Failed("not the leader".into());
                }
                let mut usage = usage;
                usage.truncate(authority::MAX_REPORT);
                let mut seen = seen;
                seen.truncate(1024);
                self.policy.ingest(from, &usage, seen);
                Reply::Done
            }
            Rpc::Reputation { ino } => {
                if self.leader_device() != Some(self.device) {
                    return Reply::Failed("not the leader".into());
                }
                let facts = self.device_facts().await;
                let media = self.media(ino);
                Reply::Reputation(self.policy.reputations(ino, &facts, media.as_ref()))
            }
            Rpc::Handoff { moves } => {
                if self.leader_device() != Some(from) {
                    return Reply::Failed("handoffs come from the leader".into());
                }
                match self.hand_off(moves).await {
                    Ok(_) => Reply::Done,
                    Err(e) => Reply::Failed(e.to_string()),
                }
            }
            other => {
                if let Some(why) = network::forged(from, &other) {
                    self.counters
                        .forged
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%from, why, "refused a raft message claiming another sender");
                    return Reply::Failed(format!("refused: {why}"));
                }
                network::answer(&self.raft, other).await
            }
        }
    }

    /// Applies a change another device forwarded, as its authority.
    /// With `expect` (a reintegrated tentative change), only if it holds.
    async fn apply_forwarded(
        &self,
        origin: DeviceId,
        id: u64,
        cmd: FsCommand,
        expect: Vec<journal::Expect>,
    ) -> Reply {
        if let FsCommand::Reclaim { ino } = cmd {
            if self.in_use(ino) {
                // A program here still has it: it is freed here when that
                // program is done (`Fs::maybe_reclaim`).
                return Reply::Forwarded {
                    seq: 0,
                    result: Ok(Outcome::Done),
                    effects: None,
                };
            }
            let linked = read_meta(&self.shared.meta)
                .get(ino)
                .is_some_and(|i| i.nlink > 0);
            if linked {
                // The unlink has not reached this device yet: ask again.
                return Reply::Failed("still linked here".into());
            }
        }
        if let Some((seq, result, effects)) = lock(&self.forwarded).get(&(origin, id)) {
            return Reply::Forwarded {
                seq,
                result,
                effects,
            };
        }
        let mut reserved = false;
        loop {
            let shared = self.shared.clone();
            let c = cmd.clone();
            let e = expect.clone();
            let local = match tokio::task::spawn_blocking(move || {
                shared.apply_local_checked(origin, id, c, &e)
            })
            .await
            {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => return Reply::Failed(e.to_string()),
                Err(e) => return Reply::Failed(e.to_string()),
            };
            let (seq, result, effects) = match local {
                Local::Applied { seq, out, effects } => {
                    self.kick_shipper(false);
                    (seq, Ok(out), effects)
                }
                Local::Refused(MetaError::NoInodes) if !reserved => {
                    reserved = true;
                    if let Err(e) = self.reserve_inodes().await {
                        return Reply::Failed(e.to_string());
                    }
                    continue;
                }
                Local::Refused(e) => (0, Err(e), None),
                Local::NotMine(_) | Local::Sealed => return Reply::NotAuthority,
                Local::Changed(journal::Failure::Changed { expect, absent }) => {
                    if let journal::Expect::Version { ino, version } = &expect {
                        let found = read_meta(&self.shared.meta)
                            .get(*ino)
                            .map(|i| (i.version(), i.nlink));
                        tracing::info!(
                            %origin,
                            resource = ino.0,
                            expected = version.0,
                            ?found,
                            "a reintegrated change was made on another version"
                        );
                    }
                    return Reply::Changed { expect, absent };
                }
                Local::Changed(journal::Failure::Error(e)) => (0, Err(e), None),
            };
            lock(&self.forwarded).put((origin, id), (seq, result.clone(), effects.clone()));
            return Reply::Forwarded {
                seq,
                result,
                effects,
            };
        }
    }

    /// Before an open of `ino`: every change its authority acknowledged is
    /// applied here (close-to-open across devices). With the authority
    /// unreachable for `read_wait`, the local copy is served (and counted).
    pub async fn open_barrier(&self, ino: ResourceId) {
        let Some(authority) = self.authority(ino) else {
            return;
        };
        self.record_open(ino);
        if authority == self.device {
            return;
        }
        let recently = self.recently_unreachable(authority);
        if !recently {
            let left = self.settings.read_wait;
            match call(&self.mesh, authority, &Rpc::Current { ino }, left).await {
                Ok(Reply::Current { inode, seq }) => {
                    self.shared.install_foreign(
                        authority,
                        seq,
                        crate::meta::Effects {
                            inodes: vec![(ino, Some(*inode))],
                            entries: Vec::new(),
                        },
                    );
                    return;
                }
                // Moved meanwhile, or an older daemon: the slower way.
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, %authority, "asking for a file's version"),
            }
        }
        if !self.read_barrier(authority).await && !self.cut_off() {
            tracing::warn!(
                %ino,
                "the authority of a file did not answer, or what it shipped did not arrive, within {:?}; serving the local copy, which may be stale",
                self.settings.read_wait
            );
        }
    }

    /// A lookup in `parent` found nothing here: asks the directory's
    /// authority for the name (one round trip); what it has is shown here
    /// until its batch arrives. True when the lookup should be tried again.
    pub async fn lookup_remote(&self, parent: ResourceId, name: Vec<u8>) -> bool {
        let Some(authority) = self.authority(parent) else {
            return false;
        };
        if authority == self.device {
            return false;
        }
        let recently = self.recently_unreachable(authority);
        if !recently {
            let rpc = Rpc::Lookup {
                parent,
                name: name.clone(),
            };
            match call(&self.mesh, authority, &rpc, self.settings.read_wait).await {
                Ok(Reply::Looked { found: None, .. }) => return false,
                Ok(Reply::Looked {
                    found: Some((entry, inode)),
                    seq,
                }) => {
                    self.shared.install_foreign(
                        authority,
                        seq,
                        crate::meta::Effects {
                            inodes: vec![(entry.ino, Some(inode))],
                            entries: vec![(parent, name, Some(entry))],
                        },
                    );
                    return true;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, %authority, "asking for a name"),
            }
        }
        self.read_barrier(authority).await
    }

    /// Whether `authority` failed to answer a catch-up in the last
    /// `UNREACHABLE_FOR` (then opens and lookups do not wait for it again).
    fn recently_unreachable(&self, authority: DeviceId) -> bool {
        lock(&self.unreachable)
            .get(&authority)
            .is_some_and(|t| t.elapsed() < UNREACHABLE_FOR)
    }

    /// Catches up with `authority` within `read_wait`; when it does not
    /// answer (now, or within the last few seconds: then without waiting
    /// again), with everything committed instead, counted as a possibly
    /// stale read. False when neither worked.
    async fn read_barrier(&self, authority: DeviceId) -> bool {
        let recently = self.recently_unreachable(authority);
        if recently && self.cut_off() {
            // No authority and no leader to catch up with: the local
            // replica is all there is (disconnected operation).
            self.stale_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        let caught_up = if recently {
            Err(CatchUp::Silent)
        } else {
            self.catch_up_with_other(authority, Instant::now() + self.settings.read_wait)
                .await
        };
        let ok = caught_up.is_ok();
        if ok {
            lock(&self.unreachable).remove(&authority);
        } else {
            // Only an authority that did not answer is out of reach. One
            // that answered but whose batch was not applied here within
            // read_wait is busy (a loaded machine): marking it would turn
            // every change to what it governs tentative for
            // UNREACHABLE_FOR, which CI saw end in conflicts on a
            // connected mesh.
            if !recently && caught_up == Err(CatchUp::Silent) {
                lock(&self.unreachable).insert(authority, Instant::now());
            }
            self.stale_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // What the authority shipped before it went quiet is in the
            // log: everything committed (fsynced changes included) is
            // applied here before the local replica is served.
            return self
                .read_index(Instant::now() + self.settings.read_wait)
                .await
                .is_ok();
        }
        ok
    }

    /// Waits until this replica has applied everything committed before
    /// the call (read-index through the leader).
    async fn read_index(&self, deadline: Instant) -> Result<(), RaftError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RaftError::NoQuorum(self.settings.read_wait));
            }
            match self.leader() {
                Some((id, _)) if id == self.me => {
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(left, self.raft.ensure_linearizable()).await
                    {
                        return Ok(());
                    }
                }
                Some((_, device)) => {
                    if let Ok(Reply::ReadIndex { index }) =
                        call(&self.mesh, device, &Rpc::ReadIndex, left).await
                    {
                        return self.wait_applied(index, deadline).await;
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every change shown here so far is committed (fsync):
    /// this device's own, and those other authorities reported to it.
    ///
    /// A device cut off from the mesh (no leader it can reach) cannot
    /// commit: after `offline_after` it settles for what it has on its own
    /// disk (the caller syncs it), and the changes ship when the mesh is
    /// back (`meshfs status` counts them). Tentative changes are not waited
    /// for: their authorities are out of reach.
    pub async fn commit_wait(&self) -> Result<(), RaftError> {
        let soon = Instant::now() + self.settings.offline_after;
        match self.commit_wait_until(soon).await {
            Ok(()) => Ok(()),
            Err(_) if self.cut_off() => {
                tracing::debug!("fsync while cut off from the mesh: durable here, committed when the mesh is back");
                Ok(())
            }
            Err(_) => {
                self.commit_wait_until(Instant::now() + self.settings.write_timeout)
                    .await
            }
        }
    }

    async fn commit_wait_until(&self, deadline: Instant) -> Result<(), RaftError> {
        for (authority, seq) in self.shared.foreign_pending() {
            self.wait_shipped(authority, seq, deadline).await?;
        }
        self.catch_up_with(self.device, deadline).await
    }

    /// Whether this device sees no leader it can reach.
    fn cut_off(&self) -> bool {
        match self.leader() {
            None => true,
            Some((_, d)) => d != self.device && self.recently_unreachable(d),
        }
    }

    /// Runs `f` on the committed namespace, applies held off meanwhile.
    pub fn with_committed<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        self.shared.with_committed(f)
    }

    /// Replays the log over the last snapshot and compares the result with
    /// the live state (blocking; holds off applies while it runs).
    pub fn verify_against_log(&self) -> Result<Option<String>, RaftError> {
        Ok(self.shared.verify_against_log()?)
    }

    /// What `meshfs status` shows about consensus.
    /// Why Raft stopped on this device (a storage error it cannot go on
    /// from), if it did.
    pub fn stopped(&self) -> Option<String> {
        self.raft
            .metrics()
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|e| e.to_string())
    }

    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let name = |id: &NodeId| {
            membership
                .get_node(id)
                .map_or_else(|| format!("{id:016x}"), |n| n.name.clone())
        };
        let leader = m.current_leader.map(|l| name(&l));
        let voters: Vec<String> = membership.voter_ids().map(|v| name(&v)).collect();
        let learners: Vec<String> = membership.learner_ids().map(|v| name(&v)).collect();
        let quorum_ack_ms = m.millis_since_quorum_ack;
        let degraded = leader.is_none()
            || (m.current_leader == Some(self.me)
                && quorum_ack_ms
                    .is_some_and(|ms| ms > self.settings.election_max.as_millis() as u64));
        RaftStatus {
            state: format!("{:?}", m.state).to_lowercase(),
            leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters,
            learners,
            degraded,
            stale_reads: self.stale_reads.load(std::sync::atomic::Ordering::Relaxed),
            refused_forged: self
                .counters
                .forged
                .load(std::sync::atomic::Ordering::Relaxed),
            stopped: m.running_state.as_ref().err().map(|e| e.to_string()),
            inode_block: read_meta(&self.shared.meta)
                .space()
                .block_of(self.device)
                .is_some(),
            changes: self.change_status(),
        }
    }

    fn change_status(&self) -> ChangeStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let (pending, last_seq, conflicts) = self.shared.outbox_status();
        ChangeStatus {
            applied_here: self.counters.local.load(Relaxed),
            forwarded: self.counters.forwarded.load(Relaxed),
            through_raft: self.counters.through_raft.load(Relaxed),
            batches: self.counters.batches.load(Relaxed),
            pending,
            last_seq,
            committed_seq: self.shared.shipped(self.device),
            conflicts,
            served_bytes: self.counters.served.load(Relaxed),
            authority_moves: self.policy.moves.load(Relaxed),
            waiting_on: self.shared.waiting_on(),
            tentative: {
                let (waiting, since, made, reintegrated, conflicts) = self.tentative_counts();
                TentativeStatus {
                    waiting,
                    since: since.map(|t| t.secs),
                    made,
                    reintegrated,
                    conflicts,
                }
            },
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Consensus as `meshfs status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RaftStatus {
    /// leader, follower, candidate or learner.
    pub state: String,
    pub leader: Option<String>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// No leader known, or this leader has not heard from a quorum lately:
    /// writes cannot commit and opens may be stale.
    pub degraded: bool,
    /// Opens and lookups whose authority did not answer in time, which
    /// read the local replica.
    pub stale_reads: u64,
    /// Raft messages refused because they claimed a sender other than the
    /// authenticated device that sent them (a vote for another candidate,
    /// an append or snapshot from another leader, a write for another
    /// origin).
    pub refused_forged: u64,
    /// Why Raft stopped on this device, when it did: changes are refused
    /// (EIO) and what is here stays readable; restart the daemon once the
    /// cause is fixed.
    pub stopped: Option<String>,
    /// Whether this device has inode numbers reserved (through Raft, when
    /// it starts): it needs them to create anything while cut off.
    pub inode_block: bool,
    pub changes: ChangeStatus,
}

/// How this device's changes travel, for `meshfs status`.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeStatus {
    /// Changes applied here as their authority (then shipped in batches).
    pub applied_here: u64,
    /// Changes sent to another device that governs what they change.
    pub forwarded: u64,
    /// Changes committed through Raft before applying anywhere.
    pub through_raft: u64,
    /// Batches of local changes committed (one log entry each).
    pub batches: u64,
    /// Local changes applied here and not yet committed (the outbox).
    pub pending: usize,
    /// The last outbox sequence number, and the last one committed.
    pub last_seq: u64,
    pub committed_seq: u64,
    /// Local changes refused when they committed (authority moved away);
    /// they are reintegrated as tentative changes, not lost.
    pub conflicts: u64,
    /// Bytes of files served to other devices (usage in reputation).
    pub served_bytes: u64,
    /// Authority moves this device carried out: handoffs it made, and
    /// takeovers it committed as leader.
    pub authority_moves: u64,
    /// What the oldest changes waiting here wait for, when they wait.
    pub waiting_on: Option<String>,
    /// Changes made while their authority was out of reach.
    pub tentative: TentativeStatus,
}

/// Disconnected operation, for `meshfs status`.
#[derive(Debug, Clone, Serialize)]
pub struct TentativeStatus {
    /// Tentative changes waiting to be reintegrated, and since when the
    /// oldest waits (Unix seconds).
    pub waiting: usize,
    pub since: Option<i64>,
    /// Made tentatively, and reintegrated, since the daemon started.
    pub made: u64,
    pub reintegrated: u64,
    /// Conflicts met at reintegration and listed (`meshfs conflicts`).
    pub conflicts: usize,
}

impl crate::fs::Replicator for Replica {
    fn apply(&self, cmd: FsCommand) -> crate::fs::Result<Outcome> {
        match self.change(cmd) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.into()),
            Err(RaftError::Storage(e)) => Err(e.into()),
            // Said once, when it stopped (`watch_stop`).
            Err(e @ RaftError::Stopped(_)) => Err(crate::fs::FsError::Unavailable(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "a namespace change could not be made");
                Err(crate::fs::FsError::Unavailable(e.to_string()))
            }
        }
    }

    fn commit_wait(&self) -> crate::fs::Result<()> {
        let r = self.clone();
        block_on(&self.rt, async move { r.commit_wait().await }).map_err(|e| {
            tracing::warn!(error = %e, "changes could not be committed through Raft in time");
            crate::fs::FsError::Unavailable(e.to_string())
        })
    }

    fn open_barrier(&self, ino: ResourceId) -> bool {
        if self.authority(ino).is_none_or(|a| a == self.device) {
            self.record_open(ino);
            return false;
        }
        let r = self.clone();
        block_on(&self.rt, async move { r.open_barrier(ino).await });
        true
    }

    fn list_barrier(&self, dir: ResourceId) {
        let Some(authority) = self.authority(dir).filter(|a| *a != self.device) else {
            return;
        };
        let r = self.clone();
        block_on(&self.rt, async move { r.read_barrier(authority).await });
    }

    fn reclaim(&self, ino: ResourceId) {
        self.reclaim_unused(ino);
    }

    fn lookup_miss(&self, parent: ResourceId, name: &[u8]) -> bool {
        if self.authority(parent).is_none_or(|a| a == self.device) {
            return false;
        }
        let r = self.clone();
        let name = name.to_vec();
        block_on(&self.rt, async move { r.lookup_remote(parent, name).await })
    }
}

/// Runs `f` to completion from a kernel request thread (or, with
/// `block_in_place`, from a runtime worker).
fn block_on<F: std::future::Future>(rt: &tokio::runtime::Handle, f: F) -> F::Output {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(|| rt.block_on(f))
    } else {
        rt.block_on(f)
    }
}
