//! What travels through the Raft log and back: the type configuration,
//! commands, results and the node record.

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, ResourceId};
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

/// One replicated command and the device that proposed it (so that each
/// device can tell its own changes, which its kernel already knows, from
/// others', whose cached names and attributes it must drop). `id` is random
/// per proposal and kept across its retries: the state machine applies a
/// given (origin, id) once and answers a repeat with the first result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub origin: DeviceId,
    pub id: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A namespace change, applied by `meta::MetaState::apply` unchanged.
    Fs(FsCommand),
    /// Moves the authority for `resource` to `device`. Ignored (refused)
    /// unless `epoch` is above the current one, so that a late, stale
    /// decision cannot undo a newer one.
    SetAuthority {
        resource: ResourceId,
        device: DeviceId,
        epoch: u64,
    },
}

/// What applying a command produced, identical on every replica.
pub type Response = Result<Outcome, MetaError>;

/// Which device serves a resource first, and since which decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    pub device: DeviceId,
    pub epoch: u64,
}
