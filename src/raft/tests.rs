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
use crate::ids::{DeviceId, ResourceId};
use crate::meta::{MetaState, Timestamp};
use crate::storage::{MetaStore, RocksStore};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(&dir.path().join("db")).unwrap());
        let mut meta = MetaState::new(0, 0, Timestamp { secs: 1, nanos: 0 }, DeviceId([1; 16]));
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

/// Applies one request at `index` straight to the state machine.
async fn apply_one(
    sm: &mut StateMachine,
    index: u64,
    op: super::types::Op,
) -> super::types::Response {
    use openraft::storage::RaftStateMachine;
    let entry = openraft::Entry::<TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(super::types::Request {
            origin: DeviceId([1; 16]),
            id: index,
            op,
        }),
    };
    let mut out = sm.apply([entry]).await.unwrap();
    out.pop().unwrap()
}

#[tokio::test]
async fn replies_kept_for_retries_carry_no_chunk_lists() {
    use super::types::Op;
    use crate::ids::{ChunkHash, ResourceId};
    use crate::meta::{ChunkRef, FsCommand, NewNode, Outcome};
    let (dir, _log, mut sm) = Builder.build().await.unwrap();
    let now = Timestamp { secs: 2, nanos: 0 };
    let created = apply_one(
        &mut sm,
        1,
        Op::Fs(FsCommand::Create {
            parent: ResourceId::ROOT,
            name: b"big".to_vec(),
            ino: crate::ids::ResourceId(0),
            node: NewNode::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            now,
        }),
    )
    .await;
    let ino = match created {
        Ok(Outcome::Inode(i)) => i.id,
        other => panic!("{other:?}"),
    };
    // A 1.25 GiB file's worth of chunk references.
    let chunks: Vec<ChunkRef> = (0..20_000u64)
        .map(|i| ChunkRef {
            hash: ChunkHash::of(&i.to_le_bytes()),
            offset: i << 16,
            len: 1 << 16,
        })
        .collect();
    let committed = apply_one(
        &mut sm,
        2,
        Op::Fs(FsCommand::CommitVersion {
            ino,
            size: 20_000 << 16,
            chunks,
            mtime: now,
            author: DeviceId([1; 16]),
            now,
        }),
    )
    .await;
    let reply = match committed {
        Ok(Outcome::Inode(i)) => i,
        other => panic!("{other:?}"),
    };
    // What callers use is there; the chunk list is not.
    assert_eq!(reply.size(), 20_000 << 16);
    let stored = sm.shared.meta.read().unwrap().get(ino).unwrap().clone();
    assert_eq!(reply.version(), stored.version());
    assert_eq!(stored.content.as_ref().unwrap().chunks.len(), 20_000);
    assert!(reply.content.as_ref().unwrap().chunks.is_empty());
    // The persisted table of replies stays small.
    let recent = sm
        .shared
        .store
        .raft_get(super::state_machine::KEY_RECENT)
        .unwrap()
        .unwrap();
    assert!(recent.len() < 4096, "{} bytes", recent.len());
    drop(dir);
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

/// Two answers of one authority arriving out of order (two programs'
/// forwarded saves of one file): the older must not hide the newer, which
/// the history checker (tests/history.rs) saw as a read of an older version
/// after a newer one was closed.
#[tokio::test]
async fn an_older_foreign_answer_does_not_hide_a_newer_one() {
    let (_dir, _log, sm) = Builder.build().await.unwrap();
    let shared = &sm.shared;
    let root = shared
        .meta
        .read()
        .unwrap()
        .get(ResourceId::ROOT)
        .unwrap()
        .clone();
    let at = |perm: u16| {
        let mut i = root.clone();
        i.perm = perm;
        Some(i)
    };
    let fx = |perm: u16, name: &str| crate::meta::Effects {
        inodes: vec![(ResourceId::ROOT, at(perm))],
        entries: vec![(ResourceId::ROOT, name.as_bytes().to_vec(), None)],
    };
    let perm = || {
        shared
            .meta
            .read()
            .unwrap()
            .get(ResourceId::ROOT)
            .unwrap()
            .perm
    };
    let authority = dev(2);
    shared.install_foreign(authority, 7, fx(0o700, "a"));
    assert_eq!(perm(), 0o700);
    // The older answer (sequence 5) arrives last: nothing of it shows.
    shared.install_foreign(authority, 5, fx(0o755, "a"));
    assert_eq!(perm(), 0o700, "the older answer hid the newer");
    assert_eq!(shared.foreign_pending(), vec![(authority, 7)]);
    // What the newer one does not cover still shows.
    shared.install_foreign(
        authority,
        6,
        crate::meta::Effects {
            inodes: Vec::new(),
            entries: vec![(ResourceId::ROOT, b"b".to_vec(), None)],
        },
    );
    assert_eq!(
        shared.foreign_pending(),
        vec![(authority, 7), (authority, 6)]
    );
    // Another authority's answer is not compared with this one's.
    shared.install_foreign(dev(3), 1, fx(0o711, "a"));
    assert_eq!(perm(), 0o711);
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

// ------------------------------------------------- in-memory network ---

mod cluster {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;

    use super::super::log_store::LogStore;
    use super::super::network::{answer_frame, call, unix_ms, Msg, Network, Reply, Rpc, Transport};
    use super::super::state_machine::{Shared, StateMachine};
    use super::super::types::{node_id, Op, Raft, RaftNode, Request};
    use super::dev;
    use crate::ids::{DeviceId, ResourceId};
    use crate::meta::{FsCommand, MetaState, NewNode, Outcome, Timestamp};
    use crate::storage::{MetaStore, RocksStore};

    /// Frames go straight to the target's `answer`, through the same
    /// encoding as on the mesh; a device in `down` is unreachable.
    #[derive(Clone, Default)]
    struct Router {
        nodes: Arc<Mutex<HashMap<DeviceId, Raft>>>,
        down: Arc<Mutex<HashSet<DeviceId>>>,
    }

    impl Transport for Router {
        async fn send_frame(
            &self,
            device: DeviceId,
            bytes: Vec<u8>,
            timeout: Duration,
        ) -> Result<Vec<u8>, Msg> {
            let raft = {
                if self.down.lock().unwrap().contains(&device) {
                    return Err(Msg("unreachable".into()));
                }
                self.nodes.lock().unwrap().get(&device).cloned()
            };
            let raft = raft.ok_or_else(|| Msg("unknown device".into()))?;
            // As the mesh's codec: a frame over the limit is not sent.
            if bytes.len() > crate::mesh::protocol::MAX_RAFT_FRAME as usize {
                return Err(Msg(format!(
                    "frame of {} bytes over the limit",
                    bytes.len()
                )));
            }
            let reply = tokio::time::timeout(timeout, answer_frame(&raft, &bytes))
                .await
                .map_err(|_| Msg("timeout".into()))?;
            Ok(postcard::to_stdvec(&reply).unwrap())
        }
    }

    struct Node {
        raft: Raft,
        meta: Arc<RwLock<MetaState>>,
        shared: Arc<Shared>,
        _dir: tempfile::TempDir,
    }

    async fn node(router: &Router, n: u8) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RocksStore::open(&dir.path().join("db")).unwrap());
        // Every device starts from the same namespace, as joined devices do
        // from the founder's snapshot.
        let mut m = MetaState::new(0, 0, Timestamp { secs: 1, nanos: 0 }, dev(1));
        store.persist(&m.take_changes(), false).unwrap();
        let meta = Arc::new(RwLock::new(m));
        let shared = Arc::new(
            Shared::load(meta.clone(), store.clone(), dev(n), dir.path().join("raft")).unwrap(),
        );
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            snapshot_max_chunk_size: 1024,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let raft = Raft::new(
            node_id(dev(n)),
            Arc::new(config),
            Network {
                transport: router.clone(),
            },
            LogStore::new(store),
            StateMachine {
                shared: shared.clone(),
            },
        )
        .await
        .unwrap();
        router.nodes.lock().unwrap().insert(dev(n), raft.clone());
        Node {
            raft,
            meta,
            shared,
            _dir: dir,
        }
    }

    fn rnode(n: u8) -> RaftNode {
        RaftNode {
            name: format!("d{n}"),
            device: dev(n),
        }
    }

    fn create(origin: u8, name: &str) -> Request {
        Request {
            origin: dev(origin),
            id: u64::from_le_bytes(crate::ids::random_bytes()),
            op: Op::Fs(FsCommand::Create {
                parent: ResourceId::ROOT,
                name: name.as_bytes().to_vec(),
                ino: crate::ids::ResourceId(0),
                node: NewNode::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                now: Timestamp { secs: 2, nanos: 0 },
            }),
        }
    }

    fn has(n: &Node, name: &str) -> bool {
        n.meta
            .read()
            .unwrap()
            .lookup(ResourceId::ROOT, name.as_bytes())
            .is_ok()
    }

    async fn leader_among(nodes: &[&Node]) -> u64 {
        for _ in 0..100 {
            for n in nodes {
                let m = n.raft.metrics().borrow().clone();
                if m.current_leader == Some(m.id) {
                    return m.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected");
    }

    /// Three nodes over the router, initialized; and which one leads.
    /// Writes `req` through the leader, `li` first: a node that answers
    /// ForwardToLeader names the one to ask (`li` follows it). A busy
    /// machine can delay heartbeats past the election timeout, and then
    /// another node leads.
    async fn write_via_leader(
        nodes: &[Node; 3],
        li: &mut usize,
        req: Request,
    ) -> openraft::raft::ClientWriteResponse<super::super::types::TypeConfig> {
        for _ in 0..50 {
            match nodes[*li].raft.client_write(req.clone()).await {
                Ok(r) => return r,
                Err(e) => {
                    let next = e
                        .forward_to_leader()
                        .and_then(|f| f.leader_id)
                        .and_then(|id| (0..3).find(|i| node_id(dev(*i as u8 + 1)) == id));
                    match next {
                        Some(n) => *li = n,
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }
        panic!("no leader took the write");
    }

    async fn three_nodes() -> (Router, [Node; 3], usize) {
        let router = Router::default();
        let nodes = [
            node(&router, 1).await,
            node(&router, 2).await,
            node(&router, 3).await,
        ];
        let members: BTreeMap<u64, RaftNode> =
            (1..=3).map(|n| (node_id(dev(n)), rnode(n))).collect();
        nodes[0].raft.initialize(members).await.unwrap();
        let lid = leader_among(&nodes.iter().collect::<Vec<_>>()).await;
        let li = (0..3).find(|i| node_id(dev(*i as u8 + 1)) == lid).unwrap();
        (router, nodes, li)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_over_the_adapter_replicate_forward_fail_over_and_snapshot() {
        let (router, nodes, li) = three_nodes().await;
        let lid = node_id(dev(li as u8 + 1));
        let fi = (li + 1) % 3;

        // A write on the leader reaches every replica.
        let r = nodes[li]
            .raft
            .client_write(create(li as u8 + 1, "a"))
            .await
            .unwrap();
        assert!(matches!(r.data, Ok(Outcome::Inode(_))));
        // A write forwarded from a follower, as `Replica::propose` does.
        let fwd = Rpc::Write {
            req: create(fi as u8 + 1, "b"),
            expires_ms: unix_ms() + 5000,
        };
        let leader_dev = dev(li as u8 + 1);
        let Reply::Written { index, result } =
            call(&router, leader_dev, &fwd, Duration::from_secs(5))
                .await
                .unwrap()
        else {
            panic!("forwarded write not written");
        };
        assert!(result.is_ok());
        nodes[fi]
            .raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "forwarded")
            .await
            .unwrap();
        assert!(has(&nodes[fi], "a") && has(&nodes[fi], "b"));
        // The same request again (a retry after a lost reply): the first
        // result, and nothing applied twice.
        let again = call(&router, leader_dev, &fwd, Duration::from_secs(5))
            .await
            .unwrap();
        match again {
            Reply::Written {
                result: ref r @ Ok(_),
                ..
            } => assert_eq!(r, &result),
            other => panic!("retry not answered with the first result: {other:?}"),
        }
        // A new request for the same name: refused everywhere.
        let other = Rpc::Write {
            req: create(fi as u8 + 1, "b"),
            expires_ms: unix_ms() + 5000,
        };
        let refused = call(&router, leader_dev, &other, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            matches!(
                refused,
                Reply::Written {
                    result: Err(crate::meta::MetaError::Exists),
                    ..
                }
            ),
            "{refused:?}"
        );
        // Read index from a follower.
        let ri = call(&router, leader_dev, &Rpc::ReadIndex, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            matches!(ri, Reply::ReadIndex { index: i } if i >= index),
            "{ri:?}"
        );
        // A forwarded write past its deadline, a follower asked to write,
        // and garbage are refused.
        let late = Rpc::Write {
            req: create(fi as u8 + 1, "late"),
            expires_ms: unix_ms().saturating_sub(1),
        };
        let r = call(&router, leader_dev, &late, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(matches!(r, Reply::Failed(_)), "{r:?}");
        let to_follower = call(
            &router,
            dev(fi as u8 + 1),
            &Rpc::ReadIndex,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(
            matches!(to_follower, Reply::NotLeader { leader: Some(l) } if l == lid),
            "{to_follower:?}"
        );
        assert!(matches!(
            answer_frame(&nodes[0].raft, b"\xff\xff\xff").await,
            Reply::Failed(_)
        ));

        // The leader goes away; the other two elect one and go on.
        router.down.lock().unwrap().insert(leader_dev);
        nodes[li].raft.shutdown().await.unwrap();
        let rest: Vec<&Node> = (0..3).filter(|i| *i != li).map(|i| &nodes[i]).collect();
        let new_lid = leader_among(&rest).await;
        assert_ne!(new_lid, lid);
        let new_leader = rest
            .iter()
            .find(|n| n.raft.metrics().borrow().id == new_lid)
            .unwrap();
        new_leader.raft.client_write(create(0, "c")).await.unwrap();

        // A snapshot, the log purged behind it: a new learner can only
        // catch up by installing the snapshot, piece by piece (1 KiB here).
        new_leader.raft.trigger().snapshot().await.unwrap();
        let applied = new_leader.raft.metrics().borrow().last_applied.unwrap();
        new_leader
            .raft
            // Generous: a loaded 2-core CI machine is slow, not wrong. The
            // snapshot may cover more than `applied` (an entry applied
            // between the trigger and the read above), so wait for at least.
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
                "snapshot",
            )
            .await
            .unwrap();
        new_leader
            .raft
            .trigger()
            .purge_log(applied.index)
            .await
            .unwrap();
        let late_node = node(&router, 4).await;
        new_leader
            .raft
            .add_learner(node_id(dev(4)), rnode(4), true)
            .await
            .unwrap();
        late_node
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(applied.index), "learner")
            .await
            .unwrap();
        for name in ["a", "b", "c"] {
            assert!(has(&late_node, name), "{name} missing on the learner");
        }
        assert!(late_node.raft.metrics().borrow().snapshot.is_some());
        // `check`'s replay: snapshot + log give exactly the live state; a
        // change made behind Raft's back is caught.
        let survivor = *new_leader;
        assert_eq!(survivor.shared.verify_against_log().unwrap(), None);
        assert_eq!(late_node.shared.verify_against_log().unwrap(), None);
        {
            let mut m = survivor.meta.write().unwrap();
            let Op::Fs(cmd) = create(0, "rogue").op else {
                unreachable!()
            };
            m.apply(cmd).unwrap();
            m.take_changes();
        }
        let why = survivor.shared.verify_against_log().unwrap();
        assert!(why.is_some_and(|w| w.contains("namespace")));
        for n in rest.iter().chain([&&late_node]) {
            let _ = n.raft.shutdown().await;
        }
    }

    /// Appends are bounded in bytes: a follower that was away while the
    /// leader logged several big entries (a large file's chunk list, 3 MiB
    /// each: together over the 16 MiB frame) still catches up, in smaller
    /// appends. Before, the one append over the limit failed and was
    /// retried forever, and the follower never caught up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_catches_up_through_appends_bounded_in_bytes() {
        use crate::ids::ChunkHash;
        use crate::meta::ChunkRef;
        let (router, nodes, mut li) = three_nodes().await;
        let away = (li + 1) % 3;
        let origin = li as u8 + 1;
        let r = write_via_leader(&nodes, &mut li, create(origin, "big")).await;
        let Ok(Outcome::Inode(file)) = r.data else {
            panic!("create: {:?}", r.data)
        };
        router.down.lock().unwrap().insert(dev(away as u8 + 1));
        let versions = 8u64;
        let per = 70_000u64;
        for v in 0..versions {
            let chunks: Vec<ChunkRef> = (0..per)
                .map(|i| ChunkRef {
                    hash: ChunkHash::of(&(v * per + i).to_le_bytes()),
                    offset: i << 16,
                    len: 1 << 16,
                })
                .collect();
            let req = Request {
                origin: dev(origin),
                id: 1000 + v,
                op: Op::Fs(FsCommand::CommitVersion {
                    ino: file.id,
                    size: per << 16,
                    chunks,
                    mtime: Timestamp { secs: 3, nanos: 0 },
                    author: dev(origin),
                    now: Timestamp { secs: 3, nanos: 0 },
                }),
            };
            let r = write_via_leader(&nodes, &mut li, req).await;
            assert!(r.data.is_ok(), "{:?}", r.data);
        }
        let last = nodes[li].raft.metrics().borrow().last_applied.unwrap();
        router.down.lock().unwrap().clear();
        nodes[away]
            .raft
            .wait(Some(Duration::from_secs(60)))
            .applied_index_at_least(Some(last.index), "caught up")
            .await
            .expect("the follower caught up");
        let i = nodes[away]
            .meta
            .read()
            .unwrap()
            .get(file.id)
            .unwrap()
            .clone();
        assert_eq!(i.version().0, versions);
        assert_eq!(i.content.as_ref().unwrap().chunks.len() as u64, per);
        for n in &nodes {
            let _ = n.raft.shutdown().await;
        }
    }
}
