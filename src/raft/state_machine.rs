//! The Raft state machine: `meta::MetaState` (shared with `fs/`, which
//! reads it) plus the authority map. A batch of committed entries is applied
//! in memory and persisted with the applied position in one RocksDB batch;
//! snapshots are the whole state, postcard-encoded, kept in one file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
};
use serde::{Deserialize, Serialize};

use super::types::{
    Authority, LogId, NodeId, Op, RaftNode, Response, StoredMembership, TypeConfig,
};
use crate::ids::{DeviceId, ResourceId};
use crate::lock;
use crate::meta::{Changes, FsCommand, MetaError, MetaState, Outcome};
use crate::storage::{Extra, RocksStore};

const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
pub(super) const KEY_RECENT: &str = "recent";

/// Results remembered per proposing device, to answer retries: more than
/// the proposals one device can have in flight (one per kernel thread and a
/// few background ones).
const RECENT_PER_ORIGIN: usize = 32;

/// The last results per origin, oldest first.
pub type Recent = BTreeMap<DeviceId, std::collections::VecDeque<(u64, Response)>>;
const SNAPSHOT_FILE: &str = "snapshot.bin";

/// What one applied batch changed, for the hooks.
pub struct AppliedBatch<'a> {
    /// Changes made by commands from other devices: the kernel's cached
    /// names and attributes for these are stale.
    pub remote: &'a Changes,
    /// Whether a whole snapshot replaced the state.
    pub replaced: bool,
    /// Whether the cluster's membership changed (who should hold what
    /// changes with it).
    pub membership: bool,
}

pub type ApplyHook = Arc<dyn Fn(AppliedBatch<'_>) + Send + Sync>;

/// State shared by the state machine, its snapshot builders and the
/// replica handle.
pub struct Shared {
    pub meta: Arc<RwLock<MetaState>>,
    pub store: Arc<RocksStore>,
    pub authority: RwLock<BTreeMap<ResourceId, Authority>>,
    /// Replicated like the namespace (it decides what a command returns).
    recent: Mutex<Recent>,
    me: DeviceId,
    /// Last applied log id and membership; written with `meta` locked so
    /// that a snapshot sees them consistent with the namespace.
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    snapshot_dir: PathBuf,
    hook: std::sync::OnceLock<ApplyHook>,
    snapshot_seq: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Loads the applied position, membership and authority map persisted
    /// beside the namespace.
    pub fn load(
        meta: Arc<RwLock<MetaState>>,
        store: Arc<RocksStore>,
        me: DeviceId,
        snapshot_dir: PathBuf,
    ) -> Result<Self, crate::storage::StorageError> {
        let applied: Option<LogId> = match store.raft_get(KEY_APPLIED)? {
            Some(b) => dec(b, "raft applied position")?,
            None => None,
        };
        let membership: StoredMembership = match store.raft_get(KEY_MEMBERSHIP)? {
            Some(b) => dec(b, "raft membership")?,
            None => StoredMembership::default(),
        };
        let mut authority = BTreeMap::new();
        for (id, row) in store.table_rows()? {
            authority.insert(ResourceId(id), dec(row, "authority")?);
        }
        let recent: Recent = match store.raft_get(KEY_RECENT)? {
            Some(b) => dec(b, "raft recent results")?,
            None => Recent::new(),
        };
        std::fs::create_dir_all(&snapshot_dir)?;
        Ok(Shared {
            meta,
            store,
            authority: RwLock::new(authority),
            recent: Mutex::new(recent),
            me,
            applied: Mutex::new((applied, membership)),
            snapshot_dir,
            hook: std::sync::OnceLock::new(),
            snapshot_seq: Default::default(),
        })
    }

    pub fn set_hook(&self, hook: ApplyHook) {
        let _ = self.hook.set(hook);
    }

    pub fn authority_of(&self, resource: ResourceId) -> Option<Authority> {
        read(&self.authority).get(&resource).copied()
    }
}

impl Shared {
    /// Rebuilds the state from the last snapshot plus the log entries after
    /// it and compares it with the live state (with applies held off). Says
    /// what differs, or `None` when they agree.
    pub fn verify_against_log(&self) -> Result<Option<String>, crate::storage::StorageError> {
        let meta = read(&self.meta);
        let authority = read(&self.authority).clone();
        let applied = lock(&self.applied).0;
        let Some((snap_meta, body)) = read_snapshot_file(&self.snapshot_dir.join(SNAPSHOT_FILE))?
        else {
            return Ok(Some("no raft snapshot to check the state against".into()));
        };
        let mut state = MetaState::restore(body.namespace)
            .map_err(|e| crate::storage::StorageError::Decode(format!("snapshot: {e}")))?;
        let mut auth: BTreeMap<ResourceId, Authority> = body.authority.into_iter().collect();
        let from = snap_meta.last_log_id.map_or(0, |l| l.index + 1);
        let to = applied.map_or(0, |l| l.index + 1);
        if to < from {
            return Ok(Some(format!(
                "applied index {} is behind the snapshot's {}",
                to.saturating_sub(1),
                from - 1
            )));
        }
        let rows = self.store.raft_entries(from, to)?;
        if rows.len() as u64 != to - from {
            return Ok(Some(format!(
                "the log lacks entries between the snapshot ({}) and the applied index ({})",
                from.saturating_sub(1),
                to.saturating_sub(1)
            )));
        }
        let sm = StateMachine {
            shared: Arc::new(Shared {
                meta: Arc::new(RwLock::new(MetaState::new(
                    0,
                    0,
                    crate::meta::Timestamp::default(),
                ))),
                store: self.store.clone(),
                authority: RwLock::new(BTreeMap::new()),
                recent: Mutex::new(Recent::new()),
                me: self.me,
                applied: Mutex::new((None, StoredMembership::default())),
                snapshot_dir: self.snapshot_dir.clone(),
                hook: std::sync::OnceLock::new(),
                snapshot_seq: Default::default(),
            }),
        };
        let mut touched = BTreeMap::new();
        let mut recent = body.recent;
        for (_, b) in rows {
            let entry: openraft::Entry<TypeConfig> = dec(b, "raft log entry")?;
            if let EntryPayload::Normal(req) = entry.payload {
                let q = recent.entry(req.origin).or_default();
                if q.iter().any(|(id, _)| *id == req.id) {
                    continue;
                }
                let (resp, _) = sm.apply_op(&mut state, &mut auth, &mut touched, req.op);
                q.push_back((req.id, resp));
                while q.len() > RECENT_PER_ORIGIN {
                    q.pop_front();
                }
            }
        }
        let mut diffs = Vec::new();
        if state.snapshot() != meta.snapshot() {
            diffs.push("the namespace");
        }
        if auth != authority {
            diffs.push("the authority map");
        }
        Ok((!diffs.is_empty()).then(|| {
            format!(
                "{} differ(s) from the snapshot replayed with the log up to index {}",
                diffs.join(" and "),
                to.saturating_sub(1)
            )
        }))
    }
}

fn dec<T: serde::de::DeserializeOwned>(
    b: Vec<u8>,
    what: &str,
) -> Result<T, crate::storage::StorageError> {
    postcard::from_bytes(&b)
        .map_err(|e| crate::storage::StorageError::Decode(format!("{what}: {e}")))
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// The whole replicated state, as a snapshot carries it.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    namespace: crate::meta::Snapshot,
    authority: Vec<(ResourceId, Authority)>,
    recent: Recent,
}

/// `SnapshotBody`'s format, serialized from the live state without a copy.
#[derive(Serialize)]
struct BodyView<'a> {
    namespace: crate::meta::SnapshotView<'a>,
    authority: &'a BTreeMap<ResourceId, Authority>,
    recent: &'a Recent,
}

type Meta = SnapshotMeta<NodeId, RaftNode>;

/// Scratch space for decoding a snapshot from a file: only strings pass
/// through it, one at a time (names are byte sequences, read byte by byte).
const DECODE_SCRATCH: usize = 1 << 20;

/// Decodes the (meta, body) pair a snapshot file holds, streaming.
fn read_snapshot_file(path: &std::path::Path) -> std::io::Result<Option<(Meta, SnapshotBody)>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut scratch = vec![0u8; DECODE_SCRATCH];
    let reader = std::io::BufReader::with_capacity(1 << 20, f);
    let (pair, _) = postcard::from_io::<(Meta, SnapshotBody), _>((reader, &mut scratch))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some(pair))
}

/// Only the metadata at the head of a snapshot file.
fn read_snapshot_meta(path: &std::path::Path) -> std::io::Result<Option<Meta>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut scratch = vec![0u8; DECODE_SCRATCH];
    let reader = std::io::BufReader::new(f);
    let (meta, _) = postcard::from_io::<Meta, _>((reader, &mut scratch))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some(meta))
}

fn merge(into: &mut Changes, from: Changes) {
    into.inodes.extend(from.inodes);
    into.entries.extend(from.entries);
    for (h, d) in from.chunk_deltas {
        *into.chunk_deltas.entry(h).or_insert(0) += d;
    }
    into.chunk_deltas.retain(|_, d| *d != 0);
    into.next_ino = from.next_ino;
}

/// A reply's inode without its chunk list and xattrs: callers want its
/// attributes and version only, and every reply is kept (32 per device, for
/// retries) in a table rewritten with each applied batch and sent back to
/// forwarding devices. With the chunk list, one commit of a 4 GiB file put
/// megabytes into each of the next 32 batches.
fn slim(out: Outcome) -> Outcome {
    match out {
        Outcome::Inode(mut i) => {
            i.xattrs.clear();
            if let Some(c) = i.content.as_mut() {
                c.chunks = Default::default();
            }
            Outcome::Inode(i)
        }
        other => other,
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    postcard::to_stdvec(v).map_err(|e| StorageIOError::write_state_machine(&e).into())
}

#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

impl StateMachine {
    fn snapshot_path(&self) -> PathBuf {
        self.shared.snapshot_dir.join(SNAPSHOT_FILE)
    }

    fn incoming_path(&self) -> PathBuf {
        self.shared.snapshot_dir.join("snapshot.incoming")
    }

    /// Opens the current snapshot file for Raft to send, from offset 0.
    async fn open_snapshot(&self) -> std::io::Result<Box<tokio::fs::File>> {
        Ok(Box::new(tokio::fs::File::open(self.snapshot_path()).await?))
    }

    /// Applies one command to the namespace, recording what changed.
    fn apply_op(
        &self,
        meta: &mut MetaState,
        authority: &mut BTreeMap<ResourceId, Authority>,
        touched: &mut BTreeMap<ResourceId, Option<Authority>>,
        op: Op,
    ) -> (Response, Changes) {
        match op {
            Op::Fs(cmd) => {
                let author = match &cmd {
                    FsCommand::CommitVersion { ino, author, .. } => Some((*ino, *author)),
                    _ => None,
                };
                match meta.apply(cmd) {
                    Ok(out) => {
                        let out = slim(out);
                        let changes = meta.take_changes();
                        if let Some((ino, device)) = author {
                            let epoch = authority.get(&ino).map_or(0, |a| a.epoch) + 1;
                            let a = Authority { device, epoch };
                            authority.insert(ino, a);
                            touched.insert(ino, Some(a));
                        }
                        for (ino, inode) in &changes.inodes {
                            if inode.is_none() && authority.remove(ino).is_some() {
                                touched.insert(*ino, None);
                            }
                        }
                        (Ok(out), changes)
                    }
                    Err(e) => {
                        meta.rollback();
                        (Err(e), Changes::default())
                    }
                }
            }
            Op::SetAuthority {
                resource,
                device,
                epoch,
            } => {
                let current = authority.get(&resource).map_or(0, |a| a.epoch);
                if meta.get(resource).is_none() {
                    return (Err(MetaError::NotFound), Changes::default());
                }
                if epoch <= current {
                    return (
                        Err(MetaError::Invalid("stale authority epoch".into())),
                        Changes::default(),
                    );
                }
                let a = Authority { device, epoch };
                authority.insert(resource, a);
                touched.insert(resource, Some(a));
                (Ok(Outcome::Done), Changes::default())
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let seq = self
            .shared
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.snapshot_path();
        let tmp = path.with_extension("tmp");
        let shared = self.shared.clone();
        // Written straight from the live state into the file, applies held
        // off meanwhile (a consistent cut without a copy of the namespace).
        let built = tokio::task::spawn_blocking(move || -> std::io::Result<Meta> {
            use std::io::Write;
            let meta = read(&shared.meta);
            let (applied, membership) = lock(&shared.applied).clone();
            let authority = read(&shared.authority);
            let recent = lock(&shared.recent);
            let snapshot_id = match applied {
                Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
                None => format!("none-{seq}"),
            };
            let smeta = Meta {
                last_log_id: applied,
                last_membership: membership,
                snapshot_id,
            };
            let body = BodyView {
                namespace: meta.snapshot_view(),
                authority: &authority,
                recent: &recent,
            };
            let f = std::fs::File::create(&tmp)?;
            let w = std::io::BufWriter::with_capacity(1 << 20, f);
            let mut w = postcard::to_io(&(&smeta, &body), w).map_err(std::io::Error::other)?;
            w.flush()?;
            drop(recent);
            drop(authority);
            drop(meta);
            w.get_ref().sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(smeta)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())))?;
        let smeta = built.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let file = self
            .open_snapshot()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(smeta.signature()), &e))?;
        Ok(Snapshot {
            meta: smeta,
            snapshot: file,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        Ok(lock(&self.shared.applied).clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let shared = self.shared.clone();
        let mut meta = write(&shared.meta);
        let mut authority = write(&shared.authority);
        let mut applied = lock(&shared.applied);
        let mut recent = lock(&shared.recent);
        let mut recent_changed = false;
        let (mut last, mut membership) = applied.clone();
        let mut all = Changes {
            next_ino: 0,
            ..Default::default()
        };
        let mut remote = Changes::default();
        let mut touched = BTreeMap::new();
        let mut out = Vec::new();
        let mut membership_changed = false;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(Ok(Outcome::Done)),
                EntryPayload::Membership(m) => {
                    membership_changed = true;
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Ok(Outcome::Done));
                }
                EntryPayload::Normal(req) => {
                    let seen = recent.get(&req.origin).and_then(|q| {
                        q.iter()
                            .find(|(id, _)| *id == req.id)
                            .map(|(_, r)| r.clone())
                    });
                    if let Some(first) = seen {
                        // A retry of a request already applied: the first
                        // result again, nothing applied twice.
                        out.push(first);
                        continue;
                    }
                    let (resp, changes) =
                        self.apply_op(&mut meta, &mut authority, &mut touched, req.op);
                    let q = recent.entry(req.origin).or_default();
                    q.push_back((req.id, resp.clone()));
                    while q.len() > RECENT_PER_ORIGIN {
                        q.pop_front();
                    }
                    recent_changed = true;
                    if req.origin != shared.me {
                        merge(
                            &mut remote,
                            Changes {
                                inodes: changes.inodes.clone(),
                                entries: changes.entries.clone(),
                                chunk_deltas: BTreeMap::new(),
                                next_ino: changes.next_ino,
                            },
                        );
                    }
                    merge(&mut all, changes);
                    out.push(resp);
                }
            }
        }
        // Persisted with every batch; nothing is dirty here, so this only
        // reads the counter.
        all.next_ino = meta.take_changes().next_ino;
        let mut extra: Vec<Extra> = vec![
            (RocksStore::raft_state_key(KEY_APPLIED), Some(enc(&last)?)),
            (
                RocksStore::raft_state_key(KEY_MEMBERSHIP),
                Some(enc(&membership)?),
            ),
        ];
        if recent_changed {
            extra.push((RocksStore::raft_state_key(KEY_RECENT), Some(enc(&*recent)?)));
        }
        for (ino, a) in &touched {
            let row = match a {
                Some(a) => Some(enc(a)?),
                None => None,
            };
            extra.push((RocksStore::table_key(ino.0), row));
        }
        // A failure here leaves memory ahead of disk: Raft stops (a storage
        // error is fatal to it) and the restart reloads the state as of the
        // last successful batch, then replays the log from there.
        shared
            .store
            .persist_applied(&all, &extra, false)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        *applied = (last, membership);
        drop(recent);
        drop(applied);
        drop(authority);
        drop(meta);
        if let Some(h) = shared.hook.get() {
            h(AppliedBatch {
                remote: &remote,
                replaced: false,
                membership: membership_changed,
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        // Pieces land in a file, not in memory.
        let f = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.incoming_path())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, RaftNode>,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        use tokio::io::AsyncWriteExt;
        let sig = Some(meta.signature());
        let io_err = |e: std::io::Error| StorageIOError::read_snapshot(sig.clone(), &e);
        snapshot.flush().await.map_err(io_err)?;
        // Read from the handle Raft gives (normally our incoming file), then
        // keep a copy of it as the current snapshot.
        let file = snapshot.into_std().await;
        let decoded = tokio::task::spawn_blocking(
            move || -> std::io::Result<(SnapshotBody, std::fs::File)> {
                use std::io::{Seek, SeekFrom};
                let mut file = file;
                file.seek(SeekFrom::Start(0))?;
                let mut scratch = vec![0u8; DECODE_SCRATCH];
                let reader = std::io::BufReader::with_capacity(1 << 20, &file);
                let ((_, body), _) =
                    postcard::from_io::<(Meta, SnapshotBody), _>((reader, &mut scratch))
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                Ok((body, file))
            },
        )
        .await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
        let (body, file) = decoded.map_err(io_err)?;
        let _ = std::fs::remove_file(self.incoming_path());
        let state = MetaState::restore(body.namespace.clone())
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let rows: Vec<(u64, Vec<u8>)> = body
            .authority
            .iter()
            .map(|(k, v)| Ok((k.0, enc(v)?)))
            .collect::<Result<_, StorageError<NodeId>>>()?;
        let extra: Vec<Extra> = vec![
            (
                RocksStore::raft_state_key(KEY_APPLIED),
                Some(enc(&meta.last_log_id)?),
            ),
            (
                RocksStore::raft_state_key(KEY_MEMBERSHIP),
                Some(enc(&meta.last_membership)?),
            ),
            (
                RocksStore::raft_state_key(KEY_RECENT),
                Some(enc(&body.recent)?),
            ),
        ];
        {
            let shared = &self.shared;
            let mut m = write(&shared.meta);
            let mut authority = write(&shared.authority);
            let mut applied = lock(&shared.applied);
            shared
                .store
                .replace_namespace(&body.namespace, &rows, &extra)
                .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
            *m = state;
            *authority = body.authority.into_iter().collect();
            *lock(&shared.recent) = body.recent;
            *applied = (meta.last_log_id, meta.last_membership.clone());
        }
        // The state is in; the received file becomes the current snapshot.
        let (path, tmp) = (
            self.snapshot_path(),
            self.snapshot_path().with_extension("tmp"),
        );
        let kept = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::{Seek, SeekFrom};
            let mut file = file;
            file.seek(SeekFrom::Start(0))?;
            let mut out = std::fs::File::create(&tmp)?;
            std::io::copy(&mut file, &mut out)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?;
        kept.map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        if let Some(h) = self.shared.hook.get() {
            h(AppliedBatch {
                remote: &Changes::default(),
                replaced: true,
                membership: true,
            });
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let path = self.snapshot_path();
        let meta = tokio::task::spawn_blocking(move || read_snapshot_meta(&path))
            .await
            .map_err(|e| {
                StorageIOError::read_snapshot(None, &std::io::Error::other(e.to_string()))
            })?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        let file = self
            .open_snapshot()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: file,
        }))
    }
}
