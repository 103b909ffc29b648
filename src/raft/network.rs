//! Raft over the mesh: every RPC and forwarded request is one postcard
//! frame on `/meshfs/raft/1`, request-response, between members only (the
//! mesh's allow list and member check). This side knows openraft's types;
//! the mesh carries opaque bytes.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::types::{NodeId, Raft, RaftNode, Request, Response, TypeConfig};
use crate::authority::{Quality, Usage};
use crate::ids::DeviceId;
use crate::ids::ResourceId;
use crate::mesh::MeshClient;
use crate::meta::{Effects, Entry, FsCommand, Inode, Move};

/// A request on `/meshfs/raft/1`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write forwarded by a follower to the leader. `expires_ms` (Unix
    /// time) is when the follower gives up on it: a request held up in a
    /// hung connection and delivered after that is refused, so that a write
    /// a program was told failed does not happen later.
    Write {
        req: Request,
        expires_ms: u64,
    },
    /// Read-index: the leader confirms it still leads and says up to which
    /// log index a reader must have applied.
    ReadIndex,
    /// A change to something the receiver governs, from a device that does
    /// not: the receiver applies it as authority (once per origin and id)
    /// and answers with its outbox sequence number. `expires_ms` as for
    /// `Write`.
    Forward {
        origin: DeviceId,
        id: u64,
        cmd: FsCommand,
        expires_ms: u64,
    },
    /// "Ship your outbox now and tell me its last sequence number": after
    /// that entry is applied locally, the asker has every change the
    /// receiver acknowledged before (close-to-open across devices).
    Ship,
    /// What the sender's programs did with resources since its last
    /// report, and what it observed of the others' service (to the
    /// leader, which keeps reputations).
    Report {
        usage: Vec<(ResourceId, Usage)>,
        seen: Vec<(DeviceId, Quality)>,
    },
    /// From the leader to an authority: hand these resources over (seal,
    /// ship the outbox, commit the move).
    Handoff {
        moves: Vec<Move>,
    },
    /// To the leader: every device's reputation for a resource.
    Reputation {
        ino: ResourceId,
    },
    /// To the authority of `parent`: its entry `name` as it stands there
    /// now (a lookup that found nothing locally).
    Lookup {
        parent: ResourceId,
        name: Vec<u8>,
    },
    /// To the authority of `ino`: its inode as it stands there now (an
    /// open: close-to-open across devices).
    Current {
        ino: ResourceId,
    },
    /// For a change spanning authorities: seal these resources (those the
    /// receiver governs), ship the outbox, answer `Shipping` with its last
    /// sequence. The seal holds until `Unseal` with the same token (and
    /// the receiver has applied the log up to its `applied`), or for
    /// `lease_ms` at most (the asker may die).
    Seal {
        token: u64,
        resources: Vec<ResourceId>,
        lease_ms: u64,
        /// For a reintegrated change: leave out changes stuck behind a
        /// tentative one (`Outbox::last_touching`).
        shippable: bool,
    },
    Unseal {
        token: u64,
        /// The asker's applied log index once the change was decided
        /// (committed and applied there, or given up): the seal holds
        /// until the receiver has applied that much, so that nothing it
        /// makes meanwhile is made on a state without the change.
        applied: u64,
    },
    /// A tentative change made at `origin` while the receiver was out of
    /// reach: applied as `Forward` is, only if `expect` still holds there
    /// (else `Changed`).
    Reintegrate {
        origin: DeviceId,
        id: u64,
        cmd: FsCommand,
        expect: Vec<super::journal::Expect>,
        expires_ms: u64,
        /// The origin's last applied log index: the receiver catches up to
        /// it (boundedly) before checking `expect`, so that what the origin
        /// committed through Raft just before (a save of the file this
        /// change removes) is not taken for a change made elsewhere.
        applied: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Append(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    Snapshot(InstallSnapshotResponse<NodeId>),
    Written {
        index: u64,
        result: Response,
    },
    ReadIndex {
        index: u64,
    },
    /// Not the leader (any more); `leader` is the one it knows, if any.
    NotLeader {
        leader: Option<NodeId>,
    },
    /// A forwarded change, applied (`seq` > 0, the outbox entry holding
    /// it, and the values it produced) or refused (`seq` 0, nothing
    /// recorded).
    Forwarded {
        seq: u64,
        result: Response,
        effects: Option<Effects>,
    },
    /// The answer to `Lookup`: the entry and its inode, if any, as of the
    /// authority's outbox entry `seq`.
    Looked {
        found: Option<(Entry, Inode)>,
        seq: u64,
    },
    /// The answer to `Current`, as of the authority's outbox entry `seq`.
    Current {
        inode: Box<Inode>,
        seq: u64,
    },
    /// The receiver does not govern what a forwarded change changes.
    NotAuthority,
    /// The receiver's last outbox sequence number (see `Rpc::Ship`).
    Shipping {
        seq: u64,
    },
    Done,
    /// A reintegrated change's expectation that no longer holds; `absent`:
    /// the file or name is gone.
    Changed {
        expect: super::journal::Expect,
        absent: bool,
    },
    Reputation(Vec<(DeviceId, crate::authority::Reputation)>),
    Failed(String),
}

#[derive(Debug)]
pub struct Msg(pub String);

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Msg {}

/// Carries Raft frames to a device: the mesh in the daemon, an in-memory
/// router in tests.
pub trait Transport: Clone + Send + Sync + 'static {
    fn send_frame(
        &self,
        device: DeviceId,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, Msg>> + Send;
}

impl Transport for MeshClient {
    async fn send_frame(
        &self,
        device: DeviceId,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Msg> {
        self.raft_call(device, bytes, timeout)
            .await
            .map_err(|e| Msg(e.to_string()))
    }
}

/// Sends one RPC to `device` and decodes the reply.
pub async fn call<T: Transport>(
    transport: &T,
    device: DeviceId,
    rpc: &Rpc,
    timeout: Duration,
) -> Result<Reply, Msg> {
    let bytes = postcard::to_stdvec(rpc).map_err(|e| Msg(format!("encoding: {e}")))?;
    call_encoded(transport, device, bytes, timeout).await
}

/// `call` with the RPC already encoded.
async fn call_encoded<T: Transport>(
    transport: &T,
    device: DeviceId,
    bytes: Vec<u8>,
    timeout: Duration,
) -> Result<Reply, Msg> {
    let answer = transport.send_frame(device, bytes, timeout).await?;
    postcard::from_bytes(&answer).map_err(|e| Msg(format!("malformed raft reply: {e}")))
}

/// Largest encoded append sent: the mesh's Raft frame, less room for its
/// own framing.
pub const MAX_APPEND_BYTES: usize = crate::mesh::protocol::MAX_RAFT_FRAME as usize - (64 << 10);

/// What to do with an append of `entries` entries encoded in `bytes`
/// bytes: send it, or ask openraft for fewer entries (it retries at once
/// with at most the number returned). Appends are bounded in bytes as well
/// as in entries: a few large batches (a big file's chunk list) made an
/// append over the frame limit, refused and retried forever, and the
/// follower never caught up.
pub fn append_fits(entries: u64, bytes: usize) -> Result<(), u64> {
    if bytes <= MAX_APPEND_BYTES || entries <= 1 {
        return Ok(());
    }
    // In proportion, and at least halved so that it converges.
    let by_size = (entries as u128 * MAX_APPEND_BYTES as u128 / bytes as u128) as u64;
    Err(by_size.min(entries / 2).max(1))
}

/// Builds a client per peer.
#[derive(Clone)]
pub struct Network<T> {
    pub transport: T,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Conn<T>;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Conn<T> {
        Conn {
            transport: self.transport.clone(),
            device: node.device,
            target,
        }
    }
}

pub struct Conn<T> {
    transport: T,
    device: DeviceId,
    target: NodeId,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, RaftNode, RaftError<NodeId, E>>;

impl<T: Transport> Conn<T> {
    async fn send<E: std::error::Error>(
        &self,
        rpc: Rpc,
        opt: &RPCOption,
    ) -> Result<Reply, RpcErr<E>> {
        let bytes = postcard::to_stdvec(&rpc)
            .map_err(|e| RPCError::Network(NetworkError::new(&Msg(format!("encoding: {e}")))))?;
        self.send_encoded(bytes, opt).await
    }

    async fn send_encoded<E: std::error::Error>(
        &self,
        bytes: Vec<u8>,
        opt: &RPCOption,
    ) -> Result<Reply, RpcErr<E>> {
        match call_encoded(&self.transport, self.device, bytes, opt.hard_ttl()).await {
            Ok(Reply::Failed(m)) => Err(RPCError::Network(NetworkError::new(&Msg(m)))),
            Ok(r) => Ok(r),
            // Not connected, timed out or gone: openraft backs off and
            // retries (see `backoff`).
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}

fn unexpected<E: std::error::Error>(target: NodeId, r: Reply) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&Msg(format!(
        "node {target} answered with {r:?}"
    ))))
}

impl<T: Transport> RaftNetwork<TypeConfig> for Conn<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let entries = rpc.entries.len() as u64;
        let bytes = postcard::to_stdvec(&Rpc::Append(rpc))
            .map_err(|e| RPCError::Network(NetworkError::new(&Msg(format!("encoding: {e}")))))?;
        if let Err(hint) = append_fits(entries, bytes.len()) {
            tracing::debug!(
                entries,
                bytes = bytes.len(),
                hint,
                "an append is over the frame limit; sent in smaller ones"
            );
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        match self.send_encoded(bytes, &option).await? {
            Reply::Append(r) => Ok(r),
            r => Err(unexpected(self.target, r)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.send(Rpc::Snapshot(rpc), &option).await? {
            Reply::Snapshot(r) => Ok(r),
            r => Err(unexpected(self.target, r)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.send(Rpc::Vote(rpc), &option).await? {
            Reply::Vote(r) => Ok(r),
            r => Err(unexpected(self.target, r)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A device that restarts is back within a second; 500 ms (the
        // default) would add to every failover.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

/// Decodes one frame and answers it with `answer` (tests route frames so).
#[cfg(test)]
pub async fn answer_frame(raft: &Raft, bytes: &[u8]) -> Reply {
    match postcard::from_bytes(bytes) {
        Ok(rpc) => answer(raft, rpc).await,
        Err(e) => Reply::Failed(format!("malformed raft request: {e}")),
    }
}

/// Why `rpc`, sent by the authenticated device `from`, is forged: Raft's
/// own messages name their sender (a vote request its candidate, an append
/// or snapshot its leader, a forwarded write its origin), and a member
/// must not speak for another (claim another leader id, inject entries,
/// replace a device's namespace with a snapshot). `None`: it is what it
/// says.
pub fn forged(from: DeviceId, rpc: &Rpc) -> Option<&'static str> {
    let me = Some(super::types::node_id(from));
    match rpc {
        Rpc::Vote(r) if r.vote.leader_id().voted_for() != me => {
            Some("a vote request for another candidate")
        }
        Rpc::Append(r) if r.vote.leader_id().voted_for() != me => {
            Some("an append from another leader")
        }
        Rpc::Snapshot(r) if r.vote.leader_id().voted_for() != me => {
            Some("a snapshot from another leader")
        }
        Rpc::Write { req, .. } if req.origin != from => Some("a write for another origin"),
        _ => None,
    }
}

/// Answers one Raft request with this device's Raft (the authority's own
/// requests are answered by `Replica::answer`).
pub async fn answer(raft: &Raft, rpc: Rpc) -> Reply {
    match rpc {
        Rpc::Append(r) => match raft.append_entries(r).await {
            Ok(r) => Reply::Append(r),
            Err(e) => Reply::Failed(e.to_string()),
        },
        Rpc::Vote(r) => match raft.vote(r).await {
            Ok(r) => Reply::Vote(r),
            Err(e) => Reply::Failed(e.to_string()),
        },
        Rpc::Snapshot(r) => match raft.install_snapshot(r).await {
            Ok(r) => Reply::Snapshot(r),
            Err(e) => Reply::Failed(e.to_string()),
        },
        Rpc::Write { expires_ms, .. } if unix_ms() > expires_ms => {
            Reply::Failed("forwarded write arrived after its deadline".into())
        }
        Rpc::Write { req, .. } => match raft.client_write(req).await {
            Ok(r) => Reply::Written {
                index: r.log_id.index,
                result: r.data,
            },
            Err(e) => match e.forward_to_leader::<RaftNode>() {
                Some(f) => Reply::NotLeader {
                    leader: f.leader_id,
                },
                None => Reply::Failed(e.to_string()),
            },
        },
        Rpc::ReadIndex => match raft.get_read_log_id().await {
            Ok((read, _)) => Reply::ReadIndex {
                index: read.map_or(0, |l| l.index),
            },
            Err(e) => match e.forward_to_leader::<RaftNode>() {
                Some(f) => Reply::NotLeader {
                    leader: f.leader_id,
                },
                None => Reply::Failed(e.to_string()),
            },
        },
        Rpc::Forward { .. }
        | Rpc::Ship
        | Rpc::Report { .. }
        | Rpc::Handoff { .. }
        | Rpc::Reputation { .. }
        | Rpc::Lookup { .. }
        | Rpc::Current { .. }
        | Rpc::Seal { .. }
        | Rpc::Unseal { .. }
        | Rpc::Reintegrate { .. } => {
            Reply::Failed("not a raft request (answered by the replica)".into())
        }
    }
}

/// Milliseconds since the Unix epoch (devices' clocks are assumed to agree
/// to well within a write timeout, as NTP keeps them).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_messages_must_come_from_the_sender_they_name() {
        use openraft::{CommittedLeaderId, LogId, Vote};
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let (na, nb) = (
            super::super::types::node_id(a),
            super::super::types::node_id(b),
        );
        let vote = |n| Vote::new(3, n);
        let v = |n| {
            Rpc::Vote(VoteRequest {
                vote: vote(n),
                last_log_id: None,
            })
        };
        assert_eq!(forged(a, &v(na)), None);
        assert_eq!(forged(b, &v(nb)), None);
        assert!(forged(b, &v(na)).is_some());
        assert!(forged(a, &v(nb)).is_some());
        let append = |n| {
            Rpc::Append(AppendEntriesRequest {
                vote: Vote::new_committed(3, n),
                prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, n), 1)),
                entries: Vec::new(),
                leader_commit: None,
            })
        };
        assert_eq!(forged(a, &append(na)), None);
        assert_eq!(
            forged(b, &append(na)),
            Some("an append from another leader")
        );
        let snapshot = |n| {
            Rpc::Snapshot(InstallSnapshotRequest {
                vote: Vote::new_committed(3, n),
                meta: Default::default(),
                offset: 0,
                data: Vec::new(),
                done: false,
            })
        };
        assert_eq!(forged(a, &snapshot(na)), None);
        assert!(forged(b, &snapshot(na)).is_some());
        let write = |origin| Rpc::Write {
            req: Request {
                origin,
                id: 1,
                op: super::super::types::Op::Fs(FsCommand::ReclaimOrphans),
            },
            expires_ms: 0,
        };
        assert_eq!(forged(a, &write(a)), None);
        assert_eq!(forged(b, &write(a)), Some("a write for another origin"));
        // What is not Raft's own is checked where it is answered.
        assert_eq!(forged(b, &Rpc::ReadIndex), None);
    }

    #[test]
    fn appends_over_the_frame_ask_for_fewer_entries_until_one() {
        assert_eq!(append_fits(16, 1 << 20), Ok(()));
        assert_eq!(append_fits(16, MAX_APPEND_BYTES), Ok(()));
        // In proportion to the excess, and at least halved.
        assert_eq!(append_fits(8, MAX_APPEND_BYTES * 4), Err(2));
        assert_eq!(append_fits(8, MAX_APPEND_BYTES + 1), Err(4));
        assert_eq!(append_fits(3, MAX_APPEND_BYTES * 100), Err(1));
        // One entry is sent whatever its size: there is nothing to split
        // (a chunk list that big needs to go out of line).
        assert_eq!(append_fits(1, MAX_APPEND_BYTES * 2), Ok(()));
    }
}

/// Raft frames from a peer, arbitrary (proptest, bounded for CI): refused
/// as malformed, or decoded and judged by `forged` without a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_raft_frames_are_refused_or_judged(
            bytes in vec(any::<u8>(), 0..2048),
            from in any::<[u8; 16]>(),
        ) {
            crate::fuzzing::raft_frame(&bytes, DeviceId(from));
        }
    }
}
