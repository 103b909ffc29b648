//! Keeps Raft's membership in step with the mesh's member list, on the
//! leader: new members become learners, caught-up learners become voters
//! up to `max_voters`, removed members leave. The decision is the pure
//! function `plan`; `follow_members` carries it out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ChangeMembers;

use super::types::{node_id, NodeId, RaftNode};
use super::Replica;
use crate::ids::DeviceId;

/// How far behind the leader's last log index a learner may be and still be
/// promoted: a voter that lags far would hold back every commit that needs
/// it for its quorum.
pub const PROMOTE_LAG: u64 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Drop these from the cluster (voters and learners alike).
    Remove(BTreeSet<NodeId>),
    AddLearner(NodeId, RaftNode),
    Promote(BTreeSet<NodeId>),
}

/// What the cluster needs to match the member list.
pub fn plan(
    members: &[(String, DeviceId)],
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    matched: &BTreeMap<NodeId, u64>,
    last_index: u64,
    max_voters: usize,
) -> Vec<Change> {
    let wanted: BTreeMap<NodeId, RaftNode> = members
        .iter()
        .map(|(name, device)| {
            (
                node_id(*device),
                RaftNode {
                    name: name.clone(),
                    device: *device,
                },
            )
        })
        .collect();
    let mut out = Vec::new();
    let gone: BTreeSet<NodeId> = voters
        .iter()
        .chain(learners)
        .filter(|id| !wanted.contains_key(id))
        .copied()
        .collect();
    let voters_left = voters.iter().filter(|v| !gone.contains(v)).count();
    // A cluster with no voter left could never commit again.
    if !gone.is_empty() && voters_left > 0 {
        out.push(Change::Remove(gone));
    }
    for (id, node) in &wanted {
        if !voters.contains(id) && !learners.contains(id) {
            out.push(Change::AddLearner(*id, node.clone()));
        }
    }
    let room = max_voters.saturating_sub(voters_left);
    let ready: BTreeSet<NodeId> = learners
        .iter()
        .filter(|id| wanted.contains_key(id))
        .filter(|id| {
            matched
                .get(id)
                .is_some_and(|m| m.saturating_add(PROMOTE_LAG) >= last_index)
        })
        .take(room)
        .copied()
        .collect();
    if !ready.is_empty() {
        out.push(Change::Promote(ready));
    }
    out
}

/// Runs on every device; acts while this device leads.
pub async fn follow_members(replica: Replica) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = replica.raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        if m.current_leader != Some(replica.me) {
            continue;
        }
        let Ok(members) = replica.mesh.member_devices().await else {
            return;
        };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let matched: BTreeMap<NodeId, u64> = m
            .replication
            .iter()
            .flatten()
            .filter_map(|(id, l)| l.map(|l| (*id, l.index)))
            .collect();
        let changes = plan(
            &members,
            &voters,
            &learners,
            &matched,
            m.last_log_index.unwrap_or(0),
            replica.settings.max_voters,
        );
        for c in changes {
            let res = match &c {
                Change::Remove(ids) => {
                    let (v, l): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
                        ids.iter().partition(|id| voters.contains(id));
                    let mut r = Ok(());
                    if !v.is_empty() {
                        r = replica
                            .raft
                            .change_membership(ChangeMembers::RemoveVoters(v), false)
                            .await
                            .map(|_| ());
                    }
                    if r.is_ok() && !l.is_empty() {
                        r = replica
                            .raft
                            .change_membership(ChangeMembers::RemoveNodes(l), false)
                            .await
                            .map(|_| ());
                    }
                    r
                }
                Change::AddLearner(id, node) => replica
                    .raft
                    .add_learner(*id, node.clone(), false)
                    .await
                    .map(|_| ()),
                Change::Promote(ids) => replica
                    .raft
                    .change_membership(ChangeMembers::AddVoterIds(ids.clone()), false)
                    .await
                    .map(|_| ()),
            };
            match res {
                Ok(()) => tracing::info!(change = ?c, "raft membership changed"),
                Err(e) => {
                    tracing::warn!(change = ?c, error = %e, "raft membership change failed");
                    break;
                }
            }
        }
    }
}
