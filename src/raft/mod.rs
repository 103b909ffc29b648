//! Consensus on one namespace for every device, with openraft 0.9: the log
//! and the state machine (`meta/` plus the authority map) persist in the
//! device's RocksDB, RPCs travel over the mesh as `/meshfs/raft/1`, writes
//! from followers are forwarded to the leader, and opens wait for a
//! read-index from the leader so that nobody opens a stale version after a
//! close elsewhere. The leader also keeps Raft's membership in step with
//! the mesh's member list (learners first, voters up to `max_voters`).

// openraft's error types are large (≈224 bytes) and its traits return them;
// boxing them in our helpers would only add conversions at every call.
#![allow(clippy::result_large_err)]

mod log_store;
mod membership;
mod network;
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
use crate::mesh::MeshClient;
use crate::meta::{FsCommand, MetaState, Outcome};
use crate::storage::RocksStore;

pub use state_machine::{AppliedBatch, ApplyHook};
pub use types::{node_id, Authority, NodeId, Op, RaftNode, Request, Response, TypeConfig};

use network::{call, Reply, Rpc};
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
    pub max_voters: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("no leader could commit the change within {0:?} (is a majority of voters up?)")]
    NoQuorum(Duration),
}

/// Entries a leader sends in one append: enough to catch a follower up
/// quickly, small enough for one frame with big commits in it.
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;

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
    /// When the last successful shared barrier started and when the last
    /// one failed (see `shared_barrier`); held while one runs, so that
    /// callers queue.
    barrier: Arc<tokio::sync::Mutex<(Option<Instant>, Option<Instant>)>>,
    /// Ids of this device's requests: a random start drawn once per process
    /// (so a restarted daemon does not reuse the ids its predecessor's
    /// replies are kept under), then counted up. Drawing fresh random bytes
    /// per request cost three system calls on every namespace change.
    next_request: Arc<std::sync::atomic::AtomicU64>,
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
    let (tx, rx) = mpsc::channel(1024);
    mesh.set_raft_inbox(tx)
        .await
        .map_err(|e| RaftError::Raft(e.to_string()))?;
    tokio::spawn(network::serve(raft.clone(), rx));
    let replica = Replica {
        raft: raft.clone(),
        mesh: mesh.clone(),
        shared,
        me,
        device,
        settings: Arc::new(settings),
        rt: tokio::runtime::Handle::current(),
        stale_reads: Default::default(),
        barrier: Default::default(),
        next_request: Arc::new(std::sync::atomic::AtomicU64::new(u64::from_le_bytes(
            crate::ids::random_bytes(),
        ))),
    };
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| RaftError::Raft(e.to_string()))?;
    if !initialized && replica.settings.bootstrap {
        replica.bootstrap().await?;
    }
    tokio::spawn(membership::follow_members(replica.clone()));
    Ok(replica)
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

    /// The device that serves `resource` first, if any.
    pub fn authority(&self, resource: ResourceId) -> Option<DeviceId> {
        self.shared.authority_of(resource).map(|a| a.device)
    }

    fn leader(&self) -> Option<(NodeId, DeviceId)> {
        // Borrowed, not cloned: this runs on every proposal.
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some((id, node.device))
    }

    /// Proposes `op` and waits until it is committed and applied here.
    pub async fn propose(&self, op: Op) -> Result<Response, RaftError> {
        let req = Request {
            origin: self.device,
            id: self
                .next_request
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            op,
        };
        let deadline = Instant::now() + self.settings.write_timeout;
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

    /// Waits until this replica has applied everything committed before the
    /// call (read-index through the leader). Returns false when no leader
    /// answered within `read_wait`: the caller reads the local replica,
    /// which may be stale.
    pub async fn read_barrier(&self) -> bool {
        if self.sole_voter() {
            // Every commit happens here and is applied before the write that
            // made it returns: nothing committed can be missing locally.
            return true;
        }
        let deadline = Instant::now() + self.settings.read_wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.leader() {
                Some((id, _)) if id == self.me => {
                    match tokio::time::timeout(left, self.raft.ensure_linearizable()).await {
                        Ok(Ok(_)) => return true,
                        Ok(Err(_)) => {}
                        Err(_) => break,
                    }
                }
                Some((_, device)) => {
                    let reply = call(&self.mesh, device, &Rpc::ReadIndex, left).await;
                    if let Ok(Reply::ReadIndex { index }) = reply {
                        return self.wait_applied(index, deadline).await.is_ok();
                    }
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stale_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "no raft leader answered within {:?}; serving the local replica, which may be stale",
            self.settings.read_wait
        );
        false
    }

    /// A read barrier shared by concurrent callers: one that started after
    /// the caller did serves it too (it covers everything committed before
    /// the caller began), so a burst of lookups costs one round trip. The
    /// leader needs none for lookups: every acknowledged write was applied
    /// on it before it was acknowledged.
    pub async fn shared_barrier(&self) {
        if self.leader().is_some_and(|(id, _)| id == self.me) {
            return;
        }
        let began = Instant::now();
        let mut last = self.barrier.lock().await;
        if last.0.is_some_and(|started| started >= began) {
            return;
        }
        // Without a leader, one lookup waits `read_wait_ms`; the ones right
        // after it serve the local replica at once instead of each waiting.
        if last
            .1
            .is_some_and(|failed| failed.elapsed() < self.settings.read_wait)
        {
            return;
        }
        let started = Instant::now();
        if self.read_barrier().await {
            last.0 = Some(started);
        } else {
            last.1 = Some(Instant::now());
        }
    }

    /// Whether this device leads a cluster in which it is the only voter.
    fn sole_voter(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        let mut voters = m.membership_config.membership().voter_ids();
        m.current_leader == Some(self.me)
            && voters.next() == Some(self.me)
            && voters.next().is_none()
    }

    /// Replays the log over the last snapshot and compares the result with
    /// the live state (blocking; holds off applies while it runs).
    pub fn verify_against_log(&self) -> Result<Option<String>, RaftError> {
        Ok(self.shared.verify_against_log()?)
    }

    /// What `meshfs status` shows about consensus.
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
    /// Opens and lookups that found no leader in time and read the local
    /// replica.
    pub stale_reads: u64,
}

impl crate::fs::Replicator for Replica {
    fn propose(&self, cmd: FsCommand) -> crate::fs::Result<Outcome> {
        let r = self.clone();
        let res = block_on(&self.rt, async move { r.propose(Op::Fs(cmd)).await });
        match res {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "a namespace change could not be committed");
                Err(crate::fs::FsError::Unavailable(e.to_string()))
            }
        }
    }

    fn read_barrier(&self) {
        let r = self.clone();
        block_on(&self.rt, async move { r.read_barrier().await });
    }

    fn lookup_barrier(&self) {
        let r = self.clone();
        block_on(&self.rt, async move { r.shared_barrier().await });
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
