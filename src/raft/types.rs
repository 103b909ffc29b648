//! What travels through the Raft log and back: the type configuration,
//! commands, results and the node record.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::meta::{FsCommand, MetaError, Outcome};

openraft::declare_raft_types!(
    /// meshfs's Raft: namespace commands, keyed by device.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        // A file: snapshots are written, sent and received in pieces,
        // never held whole in memory.
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, RaftNode>;

/// Raft's id for a device: the first 8 bytes of its 128-bit random id
/// (a collision among a handful of devices has odds of about n²/2⁶⁵).
pub fn node_id(device: DeviceId) -> NodeId {
    let mut b = [0u8; 8];
    b.copy_from_slice(&device.0[..8]);
    u64::from_be_bytes(b)
}

/// A member as Raft's membership records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub name: String,
    pub device: DeviceId,
}

impl Default for RaftNode {
    fn default() -> Self {
        RaftNode {
            name: String::new(),
            device: DeviceId([0; 16]),
        }
    }
}

/// One entry of the log: who proposed it, a request id (kept across
/// retries: the state machine applies a given (origin, id) once), and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub origin: DeviceId,
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A change that applies nowhere before it is committed: cluster-wide
    /// bookkeeping (inode blocks, authority moves) or a change spanning
    /// several authorities. Applied by `meta::MetaState::apply_by` as the
    /// origin.
    Fs(FsCommand),
    /// Changes the origin, as their authority, already applied locally, in
    /// the order it applied them: its outbox entries `first_seq`,
    /// `first_seq + 1`, ... Each is applied only if the origin still
    /// governs what it changes when the batch commits, and once (entries
    /// at or below the origin's shipped sequence are skipped).
    Batch {
        first_seq: u64,
        changes: Vec<LocalChange>,
    },
}

/// A change an authority applied locally: for `origin`'s program (itself,
/// or a device that forwarded it), with that device's request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalChange {
    pub origin: DeviceId,
    pub id: u64,
    pub cmd: FsCommand,
}

/// What applying a command produced, identical on every replica.
pub type Response = Result<Outcome, MetaError>;
