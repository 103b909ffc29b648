//! Raft storage against openraft's own suite, on a real RocksDB, and the
//! membership plan.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

use super::log_store::LogStore;
use super::membership::{plan, Change, PROMOTE_LAG};
use super::state_machine::{Shared, StateMachine};
use super::types::{node_id, NodeId, TypeConfig};
use crate::ids::DeviceId;
use crate::meta::{MetaState, Timestamp};
use crate::storage::{MetaStore, RocksStore};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(&dir.path().join("db")).unwrap());
        let mut meta = MetaState::new(0, 0, Timestamp { secs: 1, nanos: 0 });
        store.persist(&meta.take_changes(), false).unwrap();
        let shared = Shared::load(
            Arc::new(RwLock::new(meta)),
            store.clone(),
            DeviceId([1; 16]),
            dir.path().join("raft"),
        )
        .unwrap();
        Ok((
            dir,
            LogStore::new(store),
            StateMachine {
                shared: Arc::new(shared),
            },
        ))
    }
}

#[test]
fn storage_passes_openraft_suite() {
    Suite::test_all(Builder).unwrap();
}

fn dev(n: u8) -> DeviceId {
    DeviceId([n; 16])
}

fn ids(v: &[u8]) -> BTreeSet<NodeId> {
    v.iter().map(|n| node_id(dev(*n))).collect()
}

fn members(v: &[u8]) -> Vec<(String, DeviceId)> {
    v.iter().map(|n| (format!("d{n}"), dev(*n))).collect()
}

#[test]
fn new_members_become_learners_then_caught_up_ones_voters_up_to_the_limit() {
    let m = members(&[1, 2, 3]);
    let first = plan(&m, &ids(&[1]), &ids(&[]), &BTreeMap::new(), 10, 5);
    assert_eq!(first.len(), 2);
    assert!(matches!(
        first[0],
        Change::AddLearner(..) | Change::Promote(_)
    ));
    assert!(first.iter().all(|c| matches!(c, Change::AddLearner(..))));

    let matched: BTreeMap<NodeId, u64> = [(node_id(dev(2)), 10), (node_id(dev(3)), 0)].into();
    let last = PROMOTE_LAG + 5;
    let second = plan(&m, &ids(&[1]), &ids(&[2, 3]), &matched, last, 5);
    // Device 2 is within the lag, device 3 is not.
    assert_eq!(second, vec![Change::Promote(ids(&[2]))]);

    let full = plan(&m, &ids(&[1, 2]), &ids(&[3]), &matched, 0, 2);
    assert!(full.is_empty(), "no room for a third voter: {full:?}");
}

#[test]
fn removed_members_leave_but_the_last_voter_stays() {
    let plan_rm = plan(
        &members(&[1]),
        &ids(&[1, 2]),
        &ids(&[3]),
        &BTreeMap::new(),
        0,
        5,
    );
    assert_eq!(plan_rm, vec![Change::Remove(ids(&[2, 3]))]);
    let none_left = plan(&members(&[]), &ids(&[1]), &ids(&[]), &BTreeMap::new(), 0, 5);
    assert!(none_left.is_empty());
}
