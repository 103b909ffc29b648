//! The Raft state machine: a thin adapter over `meta::MetaState` (shared
//! with `fs/`, which reads it), which owns every replicated rule
//! (ownership included). The namespace the filesystem reads is the
//! committed state plus this device's outbox replayed on top
//! (`outbox.rs`). A batch of committed entries is applied by taking that
//! layer off, applying the entries in log order exactly as every device
//! does, persisting the result with the applied position in one RocksDB
//! batch, and replaying what is still pending. Snapshots are the whole
//! committed state, postcard-encoded, kept in one file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
};
use serde::{Deserialize, Serialize};

use super::journal::{self, Expect, Failure, StoredTentative};
use super::outbox::{self, Foreign, Outbox, Stored};
use super::types::{
    LocalChange, LogId, NodeId, Op, RaftNode, Request, Response, StoredMembership, TypeConfig,
};
use crate::ids::{DeviceId, ResourceId};
use crate::lock;
use crate::meta::{By, Changes, Effects, FsCommand, Governance, MetaError, MetaState, Outcome};
use crate::storage::{ChunkStore, Extra, RocksStore};

const KEY_APPLIED: &str = "applied";
const KEY_MEMBERSHIP: &str = "membership";
pub(super) const KEY_RECENT: &str = "recent";
const KEY_SHIPPED: &str = "shipped";

/// Results remembered per proposing device, to answer retries: more than
/// the proposals one device can have in flight (one per kernel thread and a
/// few background ones).
const RECENT_PER_ORIGIN: usize = 32;

/// The last results per origin, oldest first.
pub type Recent = BTreeMap<DeviceId, std::collections::VecDeque<(u64, Response)>>;
/// Per authority, the last outbox sequence number applied from it.
pub type Shipped = BTreeMap<DeviceId, u64>;
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

/// What applying a change locally, as its authority, came to.
#[derive(Debug)]
pub enum Local {
    /// Applied here and recorded in the outbox as `seq`; for a change
    /// forwarded from another device, the values it produced (which that
    /// device shows until the batch reaches it).
    Applied {
        seq: u64,
        out: Outcome,
        effects: Option<Effects>,
    },
    /// Refused by the namespace's rules (nothing recorded).
    Refused(MetaError),
    /// This device does not decide it: route it by this.
    NotMine(Governance),
    /// It is being handed to another device: try again in a moment.
    Sealed,
    /// A reintegrated change whose expectations no longer hold here.
    Changed(Failure),
}

/// State shared by the state machine, its snapshot builders and the
/// replica handle. Lock order: `meta`, then `outbox`, then the others.
pub struct Shared {
    pub meta: Arc<RwLock<MetaState>>,
    pub store: Arc<RocksStore>,
    /// Replicated like the namespace (it decides what a command returns).
    recent: Mutex<Recent>,
    /// Replicated: how far each authority's batches are applied.
    shipped: Mutex<Shipped>,
    pub(super) outbox: Mutex<Outbox>,
    /// Resources sealed here, with how many seals each: no local change
    /// applies to them until every seal is lifted (a handoff until the move
    /// commits, a change spanning authorities until it commits). Changed
    /// with `meta` locked, so the outbox holds every change made before a
    /// seal.
    pub(super) sealed: Mutex<std::collections::HashMap<ResourceId, u32>>,
    pub(super) me: DeviceId,
    /// Last applied log id and membership; written with `meta` locked so
    /// that a snapshot sees them consistent with the namespace.
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    snapshot_dir: PathBuf,
    hook: std::sync::OnceLock<ApplyHook>,
    snapshot_seq: AtomicU64,
    /// Bumped after every applied batch and installed snapshot, for those
    /// who wait until an authority's changes are applied here.
    pub(super) progress: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Loads the applied position, membership and shipped sequences
    /// persisted beside the namespace, then replays the outbox over it.
    pub fn load(
        meta: Arc<RwLock<MetaState>>,
        store: Arc<RocksStore>,
        me: DeviceId,
        snapshot_dir: PathBuf,
    ) -> Result<Self, crate::storage::StorageError> {
        let applied: Option<LogId> = match store.raft_get(KEY_APPLIED)? {
            Some(b) => dec(&b, "raft applied position")?,
            None => None,
        };
        let membership: StoredMembership = match store.raft_get(KEY_MEMBERSHIP)? {
            Some(b) => dec(&b, "raft membership")?,
            None => StoredMembership::default(),
        };
        let recent: Recent = match store.raft_get(KEY_RECENT)? {
            Some(b) => dec(&b, "raft recent results")?,
            None => Recent::new(),
        };
        let shipped: Shipped = match store.raft_get(KEY_SHIPPED)? {
            Some(b) => dec(&b, "shipped sequences")?,
            None => Shipped::new(),
        };
        std::fs::create_dir_all(&snapshot_dir)?;
        let done = shipped.get(&me).copied().unwrap_or(0);
        let mut outbox = Outbox {
            next_seq: done + 1,
            ..Default::default()
        };
        let mut stale = Vec::new();
        for (seq, bytes) in store.outbox_entries()? {
            if seq <= done {
                // Committed already; the deletion did not reach the disk.
                stale.push(seq);
                continue;
            }
            let Stored::V1(change) = dec(&bytes, "outbox entry")?;
            store.pin(&outbox.push(seq, change, bytes.len()));
        }
        if !stale.is_empty() {
            store.outbox_delete(&stale)?;
        }
        load_journal(&store, &mut outbox, &shipped)?;
        if !outbox.entries.is_empty() {
            tracing::info!(
                changes = outbox.entries.len(),
                "changes applied here before the restart are not committed yet; they ship now"
            );
        }
        let shared = Shared {
            meta,
            store,
            recent: Mutex::new(recent),
            shipped: Mutex::new(shipped),
            outbox: Mutex::new(outbox),
            sealed: Default::default(),
            me,
            applied: Mutex::new((applied, membership)),
            snapshot_dir,
            hook: std::sync::OnceLock::new(),
            snapshot_seq: Default::default(),
            progress: tokio::sync::watch::channel(0).0,
        };
        {
            let mut meta = write(&shared.meta);
            let mut outbox = lock(&shared.outbox);
            replay(&mut meta, &mut outbox, me);
        }
        Ok(shared)
    }

    pub fn set_hook(&self, hook: ApplyHook) {
        let _ = self.hook.set(hook);
    }

    /// Whether this device has the cluster's state (a snapshot or log
    /// applied): a device that just joined has only a placeholder namespace.
    pub fn has_state(&self) -> bool {
        lock(&self.applied).0.is_some()
    }

    /// The last log index applied here (0 before any). Read from the state
    /// machine, not from Raft's metrics: those are updated only after
    /// `apply` returns, and a change seen leaving the outbox (committed)
    /// must come with an index that covers it.
    pub fn applied_index(&self) -> u64 {
        lock(&self.applied).0.map_or(0, |l| l.index)
    }

    /// The last sequence of `device`'s outbox applied here.
    pub fn shipped(&self, device: DeviceId) -> u64 {
        lock(&self.shipped).get(&device).copied().unwrap_or(0)
    }

    /// Applies `cmd` here at once if this device governs what it changes,
    /// recording it in the outbox (durable in the WAL before it becomes
    /// visible to anyone else). `origin` and `id` say whose request it is.
    pub fn apply_local(
        &self,
        origin: DeviceId,
        id: u64,
        cmd: FsCommand,
    ) -> Result<Local, crate::storage::StorageError> {
        self.apply_local_checked(origin, id, cmd, &[])
    }

    /// `apply_local` of a reintegrated tentative change: only if what it
    /// was made on (`expect`) still holds here.
    pub fn apply_local_checked(
        &self,
        origin: DeviceId,
        id: u64,
        mut cmd: FsCommand,
        expect: &[Expect],
    ) -> Result<Local, crate::storage::StorageError> {
        let mut meta = write(&self.meta);
        match meta.governance(&cmd) {
            Ok(Governance::One(d)) if d == self.me => {}
            Ok(Governance::Anyone) => {}
            Ok(other) => return Ok(Local::NotMine(other)),
            Err(e) => return Ok(Local::Refused(e)),
        }
        if let Err(f) = journal::check(&meta, expect) {
            return Ok(Local::Changed(f));
        }
        {
            let sealed = lock(&self.sealed);
            if !sealed.is_empty() && cmd.decided_by().iter().any(|r| sealed.contains_key(r)) {
                return Ok(Local::Sealed);
            }
        }
        let sp = meta.savepoint();
        let out = match meta.apply_by(
            By {
                applier: self.me,
                origin,
            },
            &mut cmd,
        ) {
            Ok(out) => out,
            Err(e) => {
                meta.undo_to(sp);
                return Ok(Local::Refused(e));
            }
        };
        // What a change forwarded from elsewhere touched: the kernel here
        // may have cached it.
        let touched = (origin != self.me).then(|| meta.take_changes_keep_undo());
        let change = LocalChange { origin, id, cmd };
        let stored = Stored::V1(change);
        let bytes = match postcard::to_stdvec(&stored) {
            Ok(b) => b,
            Err(e) => {
                meta.undo_to(sp);
                return Err(crate::storage::StorageError::Decode(format!(
                    "encoding an outbox entry: {e}"
                )));
            }
        };
        let Stored::V1(change) = stored;
        let mut outbox = lock(&self.outbox);
        let seq = outbox.next_seq;
        if let Err(e) = self.store.outbox_put(seq, &bytes) {
            drop(outbox);
            meta.undo_to(sp);
            return Err(e);
        }
        meta.keep(sp);
        self.store.pin(&outbox.push(seq, change, bytes.len()));
        drop(outbox);
        drop(meta);
        if let (Some(t), Some(h)) = (&touched, self.hook.get()) {
            h(AppliedBatch {
                remote: t,
                replaced: false,
                membership: false,
            });
        }
        Ok(Local::Applied {
            seq,
            out: slim(out),
            effects: touched.map(Effects::of),
        })
    }

    /// Shows values another authority reported (its change `seq`, or its
    /// state as of `seq`) until its batch holding them is applied here.
    /// Nothing when that batch already is.
    pub fn install_foreign(&self, authority: DeviceId, seq: u64, mut effects: Effects) {
        if effects.is_empty() {
            return;
        }
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        if self.shipped(authority) >= seq {
            return;
        }
        // Answers arrive in any order (two programs' forwarded saves, an
        // open's question): what the same authority already showed as of a
        // later sequence is newer, and an older answer must not hide it.
        let newer: Vec<&Effects> = outbox
            .foreign
            .iter()
            .filter(|f| f.authority == authority && f.seq > seq)
            .map(|f| &f.effects)
            .collect();
        if !newer.is_empty() {
            effects
                .inodes
                .retain(|(ino, _)| !newer.iter().any(|n| n.inodes.iter().any(|(i, _)| i == ino)));
            effects.entries.retain(|(parent, name, _)| {
                !newer
                    .iter()
                    .any(|n| n.entries.iter().any(|(p, m, _)| p == parent && m == name))
            });
            if effects.is_empty() {
                return;
            }
        }
        let sp = meta.savepoint();
        meta.install(&effects);
        meta.keep(sp);
        let order = outbox.take_order();
        outbox.foreign.push_back(Foreign {
            order,
            authority,
            seq,
            effects,
            at: std::time::Instant::now(),
            journal: None,
        });
    }

    /// As the authority of `parent`: its entry `name` and the inode it
    /// names as this device shows them now, with the last outbox sequence
    /// they include. `Err(())` when this device does not govern `parent`.
    pub fn answer_lookup(
        &self,
        parent: ResourceId,
        name: &[u8],
    ) -> Result<(Option<(crate::meta::Entry, crate::meta::Inode)>, u64), ()> {
        let meta = read(&self.meta);
        if meta.authority(parent).map(|a| a.device) != Some(self.me) {
            return Err(());
        }
        let found = meta.entry(parent, name).and_then(|e| {
            let i = meta.get(e.ino)?;
            Some((e, i.clone()))
        });
        let seq = lock(&self.outbox).last_seq();
        Ok((found, seq))
    }

    /// As the authority of `ino`: its inode as this device shows it now,
    /// with the last outbox sequence it includes. `Err(())` when this
    /// device does not govern it.
    pub fn answer_current(&self, ino: ResourceId) -> Result<(crate::meta::Inode, u64), ()> {
        let meta = read(&self.meta);
        let i = meta.get(ino).ok_or(())?;
        if i.authority.device != self.me {
            return Err(());
        }
        let seq = lock(&self.outbox).last_seq();
        Ok((i.clone(), seq))
    }

    /// Foreign effects still shown here: (authority, sequence) each.
    pub fn foreign_pending(&self) -> Vec<(DeviceId, u64)> {
        lock(&self.outbox)
            .foreign
            .iter()
            .map(|f| (f.authority, f.seq))
            .collect()
    }

    /// Seals the resources of `moves` that this device governs at the
    /// epoch before the move's (so a stale decision does nothing), and
    /// returns those moves. After this, no local change applies to them.
    pub fn seal(&self, moves: Vec<crate::meta::Move>) -> Vec<crate::meta::Move> {
        let meta = write(&self.meta);
        let mut sealed = lock(&self.sealed);
        let mine: Vec<crate::meta::Move> = moves
            .into_iter()
            .filter(|m| {
                meta.authority(m.ino)
                    .is_some_and(|a| a.device == self.me && a.epoch.checked_add(1) == Some(m.epoch))
            })
            .collect();
        for m in &mine {
            *sealed.entry(m.ino).or_insert(0) += 1;
        }
        mine
    }

    pub fn unseal(&self, moves: &[crate::meta::Move]) {
        self.unseal_resources(&moves.iter().map(|m| m.ino).collect::<Vec<_>>());
    }

    /// Seals those of `resources` this device governs and returns them,
    /// with the sequence of the last pending change here deciding about
    /// any of them (0: none): every change made here to them is at or
    /// below it, and none follows until `unseal_resources`. (Only those:
    /// waiting for the whole outbox could wait on a change stuck behind a
    /// tentative one that waits for this seal to lift.)
    pub fn seal_resources(
        &self,
        resources: &[ResourceId],
        shippable: bool,
    ) -> (Vec<ResourceId>, u64) {
        let meta = write(&self.meta);
        let mine: Vec<ResourceId> = resources
            .iter()
            .copied()
            .filter(|r| meta.authority(*r).is_some_and(|a| a.device == self.me))
            .collect();
        let mut sealed = lock(&self.sealed);
        for r in &mine {
            *sealed.entry(*r).or_insert(0) += 1;
        }
        drop(sealed);
        (mine, lock(&self.outbox).last_touching(resources, shippable))
    }

    /// Lifts one seal of each of `resources`.
    pub fn unseal_resources(&self, resources: &[ResourceId]) {
        let mut sealed = lock(&self.sealed);
        for r in resources {
            if let Some(n) = sealed.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    sealed.remove(r);
                }
            }
        }
    }

    /// Runs `f` on the committed state (the live one with this device's
    /// speculative layer taken off, a copy only when there is one) with
    /// applies held off, so that what is on disk stays put meanwhile
    /// (`meshfs check`).
    pub fn with_committed<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        let meta = read(&self.meta);
        let copy = committed_copy(&meta);
        f(copy.as_ref().unwrap_or(&*meta))
    }

    /// Applies `cmd`, which another device governs and which cannot reach
    /// it now, tentatively: to this device's view at once, recorded in the
    /// journal (on disk before this returns) with what it was made on, to
    /// be reintegrated when the authority is back (`journal.rs`).
    pub fn apply_tentative(
        &self,
        id: u64,
        mut cmd: FsCommand,
    ) -> Result<Local, crate::storage::StorageError> {
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        // Made on this view: the tentative changes before it are
        // reintegrated first, in order, and leave its authority where they
        // left this view (versions count up alike there). Only a save
        // that supersedes earlier ones takes what the first of them was
        // made on (below). Taking that for every later change made a
        // removal after a save, or a save after the save being sent,
        // expect the version before the first save: each then conflicted
        // with this device's own save, and the removed file came back.
        let mut expect = journal::expectations(&meta, &cmd, &Default::default());
        let mut place = match &cmd {
            FsCommand::CommitVersion { ino, .. } => meta.name_of(*ino),
            _ => None,
        };
        let path = match cmd.decided_by().first() {
            Some(dir)
                if meta
                    .get(*dir)
                    .is_some_and(|i| i.kind == crate::meta::Kind::Dir) =>
            {
                path_to(&meta, *dir)
            }
            _ => Vec::new(),
        };
        let sp = meta.savepoint();
        let out = match meta.apply_by(By::device(self.me), &mut cmd) {
            Ok(out) => out,
            Err(e) => {
                meta.undo_to(sp);
                return Ok(Local::Refused(e));
            }
        };
        // A new version of a file supersedes the tentative ones before it
        // (nothing depends on a version in between): only the last is
        // reintegrated, with what the first was made on.
        // The first one stays: the reintegrator may be sending it.
        let mut superseded: Vec<journal::Tentative> = Vec::new();
        if outbox
            .tentative
            .iter()
            .skip(1)
            .any(|t| journal::supersedes(&cmd, &t.t.change.cmd))
        {
            let mut all = std::mem::take(&mut outbox.tentative).into_iter();
            let first = all.next();
            let (gone, kept): (Vec<_>, Vec<_>) =
                all.partition(|t| journal::supersedes(&cmd, &t.t.change.cmd));
            outbox.tentative = first.into_iter().chain(kept).collect();
            if let Some(first) = gone.first() {
                expect = first.t.expect.clone();
                place = first.t.place.clone().or(place);
            }
            superseded = gone;
        }
        let at = crate::meta::Timestamp::now();
        let t = journal::TentativeChange {
            change: LocalChange {
                origin: self.me,
                id,
                cmd,
            },
            expect,
            at: superseded.first().map_or(at, |s| s.t.at),
            after_seq: outbox.last_seq(),
            place,
            path,
        };
        let stored = StoredTentative::V1(t);
        let bytes = match postcard::to_stdvec(&stored) {
            Ok(b) => b,
            Err(e) => {
                meta.undo_to(sp);
                restore_superseded(&mut outbox, superseded);
                return Err(crate::storage::StorageError::Decode(format!(
                    "encoding a tentative change: {e}"
                )));
            }
        };
        // Cannot panic: `stored` was built as V1 a few lines up (it is
        // moved into the enum to be encoded without a copy).
        let StoredTentative::V1(t) = stored else {
            unreachable!("encoded as V1 just above")
        };
        let jseq = outbox.next_jseq;
        if let Err(e) = self.store.journal_put(jseq, &bytes) {
            meta.undo_to(sp);
            restore_superseded(&mut outbox, superseded);
            return Err(e);
        }
        meta.keep(sp);
        outbox.next_jseq += 1;
        if !superseded.is_empty() {
            let jseqs: Vec<u64> = superseded.iter().map(|s| s.jseq).collect();
            if let Err(e) = self.store.journal_delete(&jseqs) {
                // On a restart they come back and are reintegrated before
                // the new one, which then conflicts with them and is kept
                // as a copy: nothing is lost.
                tracing::warn!(error = %e, "could not drop superseded tentative changes");
            }
            for s in superseded {
                self.store.unpin(&s.pins);
            }
            outbox.tentative_since = outbox.tentative.front().map(|t| t.t.at);
        }
        let pins = outbox::chunks_of(&t.change.cmd);
        self.store.pin(&pins);
        let order = outbox.take_order();
        if outbox.tentative_since.is_none() {
            outbox.tentative_since = Some(t.at);
        }
        outbox.tentative.push_back(journal::Tentative {
            order,
            jseq,
            t,
            pins,
            applies: true,
        });
        Ok(Local::Applied {
            seq: 0,
            out: slim(out),
            effects: None,
        })
    }

    /// The first tentative change, when it is its turn: every change made
    /// here before it that it may depend on is committed, except the
    /// tentative changes reintegrated just before it: their authorities
    /// have them, in order, and one that the next needs and is not
    /// committed yet makes it wait (`Replica::not_yet`) or queue again
    /// (`Outbox::requeued`) rather than fail.
    pub fn tentative_ready(&self) -> Option<(u64, journal::TentativeChange)> {
        let outbox = lock(&self.outbox);
        let t = outbox.tentative.front()?;
        // Own changes made before it that touch what it touches or what it
        // expects (a removal expects the file's version: this device's
        // save of it, in the outbox, must be committed first, or the
        // removal reads as a conflict with a change elsewhere); the rest
        // ship on their own.
        let mut mine = outbox::touched(&t.t.change.cmd);
        for e in &t.t.expect {
            match e {
                journal::Expect::Version { ino, .. } => mine.push(*ino),
                journal::Expect::Entry { ino: Some(ino), .. } => mine.push(*ino),
                journal::Expect::Entry { ino: None, .. } => {}
            }
        }
        let earlier_own = outbox.entries.iter().any(|p| {
            p.order < t.order
                && outbox::touched(&p.change.cmd)
                    .iter()
                    .any(|r| mine.contains(r))
        });
        let earlier_foreign = outbox.foreign.iter().any(|f| {
            f.order < t.order && f.journal.is_none() && f.at.elapsed() < outbox::FOREIGN_BLOCK
        });
        (!earlier_own && !earlier_foreign).then(|| (t.jseq, t.t.clone()))
    }

    /// What the oldest waiting changes wait for, in words (status): a
    /// foreign effect's batch, or a tentative change's reintegration.
    pub fn waiting_on(&self) -> Option<String> {
        let outbox = lock(&self.outbox);
        let first_own = outbox.entries.front().map(|p| p.order);
        let first_t = outbox.tentative.front();
        let foreign = outbox.blocking_foreign();
        let f = |order: u64| {
            outbox.foreign.iter().find(|f| f.order == order).map(|f| {
                format!(
                    "the batch of {} holding its change {} ({} ms ago)",
                    f.authority,
                    f.seq,
                    f.at.elapsed().as_millis()
                )
            })
        };
        match (first_own, first_t, foreign) {
            (_, _, Some(fo))
                if first_own.is_some_and(|o| o > fo) || first_t.is_some_and(|t| t.order > fo) =>
            {
                f(fo)
            }
            (Some(o), Some(t), _) if o > t.order => Some(format!(
                "the reintegration of tentative change {} ({:?})",
                t.jseq,
                t.t.change.cmd.decided_by()
            )),
            (Some(o), Some(t), _) if o < t.order => {
                Some("own changes made before the first tentative change, to commit first".into())
            }
            (None, Some(t), _) => Some(format!(
                "the authority of tentative change {} ({:?})",
                t.jseq,
                t.t.change.cmd.decided_by()
            )),
            _ => None,
        }
    }

    /// Whether a tentative change waiting touches what `cmd` touches.
    pub fn tentative_touching(&self, cmd: &FsCommand) -> bool {
        let outbox = lock(&self.outbox);
        if outbox.tentative.is_empty() {
            return false;
        }
        let mine = outbox::touched(cmd);
        outbox.tentative.iter().any(|t| {
            outbox::touched(&t.t.change.cmd)
                .iter()
                .any(|r| mine.contains(r))
        })
    }

    /// How many tentative changes wait, and since when.
    pub fn tentative_status(&self) -> (usize, Option<crate::meta::Timestamp>) {
        let o = lock(&self.outbox);
        (o.tentative.len(), o.tentative_since)
    }

    /// Tentative change `jseq` (the first) was applied by `authority` as
    /// its outbox entry `seq`, producing `effects`: those are shown in its
    /// place until that entry is applied here; changes made after it ship
    /// only then.
    pub fn tentative_done(
        &self,
        jseq: u64,
        authority: DeviceId,
        seq: u64,
        effects: Option<Effects>,
    ) -> Result<(), crate::storage::StorageError> {
        self.tentative_settle(jseq, |outbox, order, after_seq| {
            let record = StoredTentative::Done {
                authority,
                seq,
                after_seq,
            };
            if self.shipped(authority) < seq {
                outbox.foreign.push_front(Foreign {
                    order,
                    authority,
                    seq,
                    effects: effects.unwrap_or_default(),
                    at: std::time::Instant::now(),
                    journal: Some(jseq),
                });
                Some(record)
            } else {
                None
            }
        })
    }

    /// Tentative change `jseq` (the first) is dropped (it became a
    /// conflict the other side's change wins, or moot).
    pub fn tentative_drop(&self, jseq: u64) -> Result<(), crate::storage::StorageError> {
        self.tentative_settle(jseq, |_, _, _| None)
    }

    /// Tentative change `jseq` (the first) is replaced by `cmd` with
    /// `expect` (a conflict name; a directory made again).
    pub fn tentative_replace(
        &self,
        jseq: u64,
        cmd: FsCommand,
        expect: Vec<Expect>,
    ) -> Result<(), crate::storage::StorageError> {
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        let Some(t) = outbox.tentative.iter_mut().find(|t| t.jseq == jseq) else {
            return Ok(());
        };
        let old = named_by(&t.t.change.cmd);
        t.t.change.cmd = cmd;
        t.t.expect = expect;
        let bytes = postcard::to_stdvec(&StoredTentative::V1(t.t.clone())).map_err(|e| {
            crate::storage::StorageError::Decode(format!("encoding a tentative change: {e}"))
        })?;
        let new = named_by(&t.t.change.cmd);
        self.store.journal_put(jseq, &bytes)?;
        meta.rollback();
        replay(&mut meta, &mut outbox, self.me);
        drop(outbox);
        drop(meta);
        self.invalidate(old);
        self.invalidate(new);
        Ok(())
    }

    /// Takes tentative change `jseq` out of the journal and the view,
    /// `keep` (given its place and the outbox sequence it followed) saying
    /// what record stays on disk in its place, and adding what is shown
    /// instead; the view is rebuilt and the kernel told.
    fn tentative_settle(
        &self,
        jseq: u64,
        keep: impl FnOnce(&mut Outbox, u64, u64) -> Option<StoredTentative>,
    ) -> Result<(), crate::storage::StorageError> {
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        let Some(i) = outbox.tentative.iter().position(|t| t.jseq == jseq) else {
            return Ok(());
        };
        let (order, after_seq) = (outbox.tentative[i].order, outbox.tentative[i].t.after_seq);
        let record = keep(&mut outbox, order, after_seq);
        match record {
            Some(r) => {
                let bytes = postcard::to_stdvec(&r).map_err(|e| {
                    crate::storage::StorageError::Decode(format!("encoding a journal record: {e}"))
                })?;
                self.store.journal_put(jseq, &bytes)?;
            }
            None => self.store.journal_delete(&[jseq])?,
        }
        let Some(t) = outbox.tentative.remove(i) else {
            return Ok(());
        };
        outbox.tentative_since = outbox.tentative.front().map(|t| t.t.at);
        meta.rollback();
        replay(&mut meta, &mut outbox, self.me);
        drop(outbox);
        drop(meta);
        self.store.unpin(&t.pins);
        self.invalidate(named_by(&t.t.change.cmd));
        Ok(())
    }

    /// Checks what tentative change `jseq` was made on against this
    /// device's view without it (its own effect would hide a name it
    /// created), atomically for programs: it is out of the view only
    /// inside the locks. `None` when it is gone.
    pub fn tentative_check(&self, jseq: u64, expect: &[Expect]) -> Option<Result<(), Failure>> {
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        let i = outbox.tentative.iter().position(|t| t.jseq == jseq)?;
        let t = outbox.tentative.remove(i)?;
        meta.rollback();
        replay(&mut meta, &mut outbox, self.me);
        let checked = journal::check(&meta, expect);
        outbox.tentative.insert(i, t);
        meta.rollback();
        replay(&mut meta, &mut outbox, self.me);
        Some(checked)
    }

    /// `f` on this device's view as it was when tentative change `jseq`
    /// was made: the committed state with only what was made before it.
    /// Later tentative changes are left out: the live view has already
    /// removed the file a save waiting in the journal saved, so there the
    /// save finds no file and no authority. `None`: no such change.
    pub fn before_tentative<T>(&self, jseq: u64, f: impl FnOnce(&MetaState) -> T) -> Option<T> {
        let mut meta = write(&self.meta);
        let mut outbox = lock(&self.outbox);
        let order = outbox.tentative.iter().find(|t| t.jseq == jseq)?.order;
        meta.rollback();
        replay_before(&mut meta, &mut outbox, self.me, order);
        let out = f(&meta);
        meta.rollback();
        replay(&mut meta, &mut outbox, self.me);
        Some(out)
    }

    /// Journal records of reintegrated changes whose authority's entry is
    /// applied here now: no longer needed.
    pub fn forget_reintegrated(&self, jseqs: &[u64]) {
        if let Err(e) = self.store.journal_delete(jseqs) {
            tracing::debug!(error = %e, "could not drop reintegrated journal records");
        }
    }

    /// Tells the kernel that what `c` names may have changed.
    fn invalidate(&self, c: Changes) {
        if let Some(h) = self.hook.get() {
            h(AppliedBatch {
                remote: &c,
                replaced: false,
                membership: false,
            });
        }
    }

    /// How many changes wait in the outbox, and how many were refused at
    /// commit (conflicts).
    pub fn outbox_status(&self) -> (usize, u64, u64) {
        let o = lock(&self.outbox);
        (o.entries.len(), o.last_seq(), o.conflicts)
    }
}

/// Replays the outbox over the committed state in `meta` (whose undo
/// record must be empty): own changes, tentative changes and foreign
/// effects, in the order they were made. An own change that still applies
/// becomes part of the speculative layer; one that does not is marked and
/// left to be refused when it commits. A tentative change that does not
/// apply is not shown until reintegration decides it.
fn replay(meta: &mut MetaState, outbox: &mut Outbox, me: DeviceId) {
    replay_before(meta, outbox, me, u64::MAX)
}

/// `replay` of only what was made before `order`.
fn replay_before(meta: &mut MetaState, outbox: &mut Outbox, me: DeviceId, order: u64) {
    // (order, which queue, index): 0 own, 1 tentative, 2 foreign.
    let mut items: Vec<(u64, u8, usize)> =
        Vec::with_capacity(outbox.entries.len() + outbox.tentative.len() + outbox.foreign.len());
    items.extend(
        outbox
            .entries
            .iter()
            .enumerate()
            .map(|(i, p)| (p.order, 0, i)),
    );
    items.extend(
        outbox
            .tentative
            .iter()
            .enumerate()
            .map(|(i, t)| (t.order, 1, i)),
    );
    items.extend(
        outbox
            .foreign
            .iter()
            .enumerate()
            .map(|(i, f)| (f.order, 2, i)),
    );
    items.retain(|(o, _, _)| *o < order);
    items.sort_unstable();
    for (_, queue, i) in items {
        match queue {
            0 => {
                let p = &mut outbox.entries[i];
                let sp = meta.savepoint();
                let mut cmd = p.change.cmd.clone();
                let by = By {
                    applier: me,
                    origin: p.change.origin,
                };
                let ok = matches!(
                    meta.governance(&cmd),
                    Ok(Governance::One(d)) if d == me
                ) || matches!(meta.governance(&cmd), Ok(Governance::Anyone));
                match ok.then(|| meta.apply_by(by, &mut cmd)) {
                    Some(Ok(_)) => {
                        meta.keep(sp);
                        p.applies = true;
                    }
                    _ => {
                        meta.undo_to(sp);
                        if p.applies {
                            tracing::warn!(
                                seq = p.seq,
                                "a change applied here no longer applies over what the mesh committed; \
                                 it will be reported as a conflict"
                            );
                        }
                        p.applies = false;
                    }
                }
            }
            1 => {
                let t = &mut outbox.tentative[i];
                let sp = meta.savepoint();
                let mut cmd = t.t.change.cmd.clone();
                match meta.apply_by(By::device(me), &mut cmd) {
                    Ok(_) => {
                        meta.keep(sp);
                        t.applies = true;
                    }
                    Err(_) => {
                        meta.undo_to(sp);
                        // Its inode number stays taken: it comes back when
                        // reintegration decides.
                        if let FsCommand::Create { ino, .. } = cmd {
                            let sp = meta.savepoint();
                            meta.hold_ino(me, ino);
                            meta.keep(sp);
                        }
                        t.applies = false;
                    }
                }
            }
            _ => install(meta, &outbox.foreign[i].effects),
        }
    }
}

/// The committed state as a copy of the live one with this device's
/// speculative layer taken off; `None` when there is none (the live state
/// is the committed one).
fn committed_copy(meta: &MetaState) -> Option<MetaState> {
    meta.has_undo().then(|| {
        let mut c = meta.clone();
        c.rollback();
        c
    })
}

fn install(meta: &mut MetaState, fx: &Effects) {
    let sp = meta.savepoint();
    meta.install(fx);
    meta.keep(sp);
}

/// Foreign effects older than this are given up on (their authority never
/// shipped them: it died, or lost its authority): own changes behind them
/// ship again, and are refused if they depended on them.
const FOREIGN_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Drops the foreign effects whose batches are applied (or given up on);
/// returns the journal records of those that stood for reintegrated
/// tentative changes.
fn settle_foreign(outbox: &mut Outbox, shipped: &Shipped) -> Vec<u64> {
    let mut done = Vec::new();
    outbox.foreign.retain(|f| {
        if shipped.get(&f.authority).copied().unwrap_or(0) >= f.seq {
            done.extend(f.journal);
            return false;
        }
        // A reintegrated change sits at its authority's outbox: it ships
        // unless that device is gone for good, so it is waited for longer.
        let max = if f.journal.is_some() {
            FOREIGN_MAX_AGE * 10
        } else {
            FOREIGN_MAX_AGE
        };
        if f.at.elapsed() > max {
            tracing::warn!(
                authority = %f.authority,
                seq = f.seq,
                "a change another device reported never reached the log; no longer shown here"
            );
            return false;
        }
        true
    });
    done
}

impl Shared {
    /// Rebuilds the state from the last snapshot plus the log entries after
    /// it and compares it with the live committed state (with applies held
    /// off). Says what differs, or `None` when they agree.
    pub fn verify_against_log(&self) -> Result<Option<String>, crate::storage::StorageError> {
        // Held to the end: applies wait (the lock order is the state
        // machine's: namespace, then the rest).
        let meta = read(&self.meta);
        let applied = lock(&self.applied).0;
        let live = committed_copy(&meta).as_ref().unwrap_or(&*meta).snapshot();
        let Some((snap_meta, body)) = read_snapshot_file(&self.snapshot_dir.join(SNAPSHOT_FILE))?
        else {
            return Ok(Some("no raft snapshot to check the state against".into()));
        };
        let mut state = MetaState::restore(body.namespace)
            .map_err(|e| crate::storage::StorageError::Decode(format!("snapshot: {e}")))?;
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
        let mut recent = body.recent;
        let mut shipped = body.shipped;
        let mut effects = Applied::default();
        for (_, b) in rows {
            let entry: openraft::Entry<TypeConfig> = dec(&b, "raft log entry")?;
            if let EntryPayload::Normal(req) = entry.payload {
                let _ = apply_request(
                    &mut state,
                    &mut recent,
                    &mut shipped,
                    req,
                    self.me,
                    &mut effects,
                );
            }
        }
        let mut diffs = Vec::new();
        if state.snapshot() != live {
            diffs.push("the namespace");
        }
        if shipped != *lock(&self.shipped) {
            diffs.push("the shipped sequences");
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

/// What applying committed requests produced beyond the namespace itself.
#[derive(Default)]
struct Applied {
    /// Every change, to persist.
    all: Changes,
    /// Changes from other devices, which the kernel here may have cached.
    remote: Changes,
    /// This device's outbox entries that committed, with their results.
    own: Vec<(u64, Response)>,
    recent_changed: bool,
    shipped_changed: bool,
}

/// Applies one committed request to the committed state: a plain command
/// (deduplicated by request id), or an authority's batch (each change once,
/// in sequence order, and only while that authority still governs what it
/// changes). Returns the request's response.
fn apply_request(
    meta: &mut MetaState,
    recent: &mut Recent,
    shipped: &mut Shipped,
    req: Request,
    me: DeviceId,
    fx: &mut Applied,
) -> Response {
    match req.op {
        Op::Fs(cmd) => {
            let seen = recent.get(&req.origin).and_then(|q| {
                q.iter()
                    .find(|(id, _)| *id == req.id)
                    .map(|(_, r)| r.clone())
            });
            if let Some(first) = seen {
                // A retry of a request already applied: the first result
                // again, nothing applied twice.
                return first;
            }
            let (resp, changes) = apply_cmd(meta, By::device(req.origin), cmd, true);
            let q = recent.entry(req.origin).or_default();
            q.push_back((req.id, resp.clone()));
            while q.len() > RECENT_PER_ORIGIN {
                q.pop_front();
            }
            fx.recent_changed = true;
            if req.origin != me {
                merge(&mut fx.remote, without_deltas(&changes));
            }
            merge(&mut fx.all, changes);
            resp
        }
        Op::Batch { first_seq, changes } => {
            let authority = req.origin;
            let mut done = shipped.get(&authority).copied().unwrap_or(0);
            for (i, ch) in changes.into_iter().enumerate() {
                let seq = first_seq.saturating_add(i as u64);
                if seq <= done {
                    continue;
                }
                if seq != done + 1 {
                    tracing::error!(
                        %authority,
                        expected = done + 1,
                        got = seq,
                        "a batch skips outbox entries; the rest of it is ignored"
                    );
                    break;
                }
                done = seq;
                fx.shipped_changed = true;
                let allowed = match meta.governance(&ch.cmd) {
                    Ok(Governance::One(d)) => d == authority,
                    Ok(Governance::Anyone) => true,
                    Ok(Governance::Several(_) | Governance::Cluster) => false,
                    // The command's own error (a missing inode) says more.
                    Err(_) => true,
                };
                let (resp, changes) = if allowed {
                    apply_cmd(
                        meta,
                        By {
                            applier: authority,
                            origin: ch.origin,
                        },
                        ch.cmd,
                        false,
                    )
                } else {
                    (Err(MetaError::NotAuthority), Changes::default())
                };
                if authority == me {
                    fx.own.push((seq, resp));
                } else if ch.origin != me {
                    merge(&mut fx.remote, without_deltas(&changes));
                }
                merge(&mut fx.all, changes);
            }
            shipped.insert(authority, done);
            Ok(Outcome::Done)
        }
    }
}

/// Applies one command to the committed state, recording what changed; on
/// error nothing changed.
fn apply_cmd(
    meta: &mut MetaState,
    by: By,
    mut cmd: FsCommand,
    reserve: bool,
) -> (Response, Changes) {
    let mut r = meta.apply_by(by, &mut cmd);
    if reserve && matches!(r, Err(MetaError::NoInodes)) {
        // A create committed directly (not by an authority) by a device
        // without inode numbers yet: give it a block first.
        meta.rollback();
        let _ = meta.apply_by(by, &mut FsCommand::ReserveInodes { device: by.applier });
        r = meta.apply_by(by, &mut cmd);
    }
    match r {
        Ok(out) => (Ok(slim(out)), meta.take_changes()),
        Err(e) => {
            meta.rollback();
            (Err(e), Changes::default())
        }
    }
}

fn without_deltas(c: &Changes) -> Changes {
    Changes {
        inodes: c.inodes.clone(),
        entries: c.entries.clone(),
        chunk_deltas: BTreeMap::new(),
        space: None,
        versions: Vec::new(),
        trash: Vec::new(),
    }
}

/// What a command names, as changes for invalidating the kernel's cache
/// (a local change refused at commit leaves the kernel's view stale).
fn named_by(cmd: &FsCommand) -> Changes {
    let mut c = Changes::default();
    let mut entry = |p: ResourceId, n: &[u8]| c.entries.push((p, n.to_vec(), None));
    match cmd {
        FsCommand::Create { parent, name, .. }
        | FsCommand::Link { parent, name, .. }
        | FsCommand::Unlink { parent, name, .. }
        | FsCommand::Rmdir { parent, name, .. } => entry(*parent, name),
        FsCommand::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => {
            entry(*parent, name);
            entry(*new_parent, new_name);
        }
        _ => {}
    }
    let inos: Vec<ResourceId> = match cmd {
        FsCommand::Create { parent, .. }
        | FsCommand::Unlink { parent, .. }
        | FsCommand::Rmdir { parent, .. } => vec![*parent],
        FsCommand::Link { ino, parent, .. } => vec![*ino, *parent],
        FsCommand::Rename {
            parent, new_parent, ..
        } => vec![*parent, *new_parent],
        FsCommand::SetAttr { ino, .. }
        | FsCommand::SetXattr { ino, .. }
        | FsCommand::RemoveXattr { ino, .. }
        | FsCommand::CommitVersion { ino, .. }
        | FsCommand::Reclaim { ino } => vec![*ino],
        FsCommand::SetAuthority { moves } => moves.iter().map(|m| m.ino).collect(),
        FsCommand::ReclaimOrphans
        | FsCommand::ReserveInodes { .. }
        | FsCommand::DropVersions { .. } => vec![],
    };
    c.inodes = inos.into_iter().map(|i| (i, None)).collect();
    c
}

/// Puts superseded tentative changes back (the new one could not be
/// recorded), in order.
fn restore_superseded(outbox: &mut Outbox, superseded: Vec<journal::Tentative>) {
    for t in superseded {
        let at = outbox
            .tentative
            .iter()
            .position(|x| x.order > t.order)
            .unwrap_or(outbox.tentative.len());
        outbox.tentative.insert(at, t);
    }
}

/// Loads the journal (tentative changes, and reintegrated ones whose
/// authority's entry is not applied here yet) into `outbox`, and puts
/// everything in the order it was made: a journal record after the outbox
/// entry it followed.
fn load_journal(
    store: &RocksStore,
    outbox: &mut Outbox,
    shipped: &Shipped,
) -> Result<(), crate::storage::StorageError> {
    let mut gone = Vec::new();
    // The outbox sequence each reintegrated record followed (the foreign
    // queue holds only those at this point: nothing else survives a restart).
    let mut foreign_after = Vec::new();
    for (jseq, bytes) in store.journal_entries()? {
        outbox.next_jseq = outbox.next_jseq.max(jseq + 1);
        match dec::<StoredTentative>(&bytes, "journal record")? {
            StoredTentative::V1(t) => {
                let pins = outbox::chunks_of(&t.change.cmd);
                store.pin(&pins);
                outbox.tentative.push_back(journal::Tentative {
                    order: 0,
                    jseq,
                    t,
                    pins,
                    applies: true,
                });
            }
            StoredTentative::Done {
                authority,
                seq,
                after_seq,
            } => {
                if shipped.get(&authority).copied().unwrap_or(0) >= seq {
                    gone.push(jseq);
                    continue;
                }
                foreign_after.push(after_seq);
                outbox.foreign.push_back(Foreign {
                    order: 0,
                    authority,
                    seq,
                    effects: Effects::default(),
                    at: std::time::Instant::now(),
                    journal: Some(jseq),
                });
            }
        }
    }
    if !gone.is_empty() {
        store.journal_delete(&gone)?;
    }
    // Orders: own entry `s` at (s, 0, 0), a journal record at
    // (after_seq, 1, jseq); sorted, then numbered.
    let mut keys: Vec<(u64, u8, u64, u8, usize)> = Vec::new();
    keys.extend(
        outbox
            .entries
            .iter()
            .enumerate()
            .map(|(i, p)| (p.seq, 0, 0, 0, i)),
    );
    keys.extend(
        outbox
            .tentative
            .iter()
            .enumerate()
            .map(|(i, t)| (t.t.after_seq, 1, t.jseq, 1, i)),
    );
    for (i, f) in outbox.foreign.iter().enumerate() {
        let a = foreign_after.get(i).copied().unwrap_or(0);
        keys.push((a, 1, f.journal.unwrap_or(0), 2, i));
    }
    keys.sort_unstable();
    for (n, (_, _, _, queue, i)) in keys.into_iter().enumerate() {
        let order = n as u64;
        match queue {
            0 => outbox.entries[i].order = order,
            1 => outbox.tentative[i].order = order,
            _ => outbox.foreign[i].order = order,
        }
    }
    outbox.next_order =
        outbox.entries.len() as u64 + outbox.tentative.len() as u64 + outbox.foreign.len() as u64;
    // The foreign queue and the journal are kept in order.
    outbox.foreign.make_contiguous().sort_by_key(|f| f.order);
    outbox.tentative.make_contiguous().sort_by_key(|t| t.order);
    outbox.tentative_since = outbox.tentative.front().map(|t| t.t.at);
    if !outbox.tentative.is_empty() {
        tracing::info!(
            changes = outbox.tentative.len(),
            "tentative changes made while their authority was out of reach wait to be reintegrated"
        );
    }
    Ok(())
}

/// Puts tentative change `t` into the journal at its place `order` among
/// the others, its record written with `extra` (the applied batch).
fn journal_at_order(
    outbox: &mut Outbox,
    extra: &mut Vec<Extra>,
    order: u64,
    t: journal::TentativeChange,
    pins: Vec<crate::ids::ChunkHash>,
) -> Result<(), StorageError<NodeId>> {
    let jseq = outbox.next_jseq;
    outbox.next_jseq += 1;
    extra.push((
        RocksStore::journal_key(jseq),
        Some(enc(&StoredTentative::V1(t.clone()))?),
    ));
    if outbox.tentative_since.is_none() {
        outbox.tentative_since = Some(t.at);
    }
    let at = outbox
        .tentative
        .iter()
        .position(|x| x.order > order)
        .unwrap_or(outbox.tentative.len());
    outbox.tentative.insert(
        at,
        journal::Tentative {
            order,
            jseq,
            t,
            pins,
            applies: true,
        },
    );
    Ok(())
}

/// An own change the log refused (its authority moved meanwhile, or it no
/// longer applied) as a tentative change to reintegrate, made on the
/// committed state `meta`; `None` for bookkeeping that is simply dropped.
/// It is this device's to reintegrate (as origin), whichever device's
/// program made it: that device was told it is done.
fn tentative_of_refused(
    meta: &MetaState,
    change: &LocalChange,
    seq: u64,
    me: DeviceId,
) -> Option<journal::TentativeChange> {
    let cmd = &change.cmd;
    if matches!(
        cmd,
        FsCommand::Reclaim { .. }
            | FsCommand::ReclaimOrphans
            | FsCommand::ReserveInodes { .. }
            | FsCommand::SetAuthority { .. }
            | FsCommand::DropVersions { .. }
    ) {
        return None;
    }
    let mut bases = std::collections::HashMap::new();
    if let FsCommand::CommitVersion { ino, author, .. } = cmd {
        // The version this device last committed is what its change was
        // made on, unless someone else wrote since: then it conflicts.
        if let Some(c) = meta.get(*ino).and_then(|i| i.content.as_ref()) {
            let mine = c.author == Some(*author);
            bases.insert(
                *ino,
                if mine {
                    c.version
                } else {
                    crate::ids::VersionId(u64::MAX)
                },
            );
        }
    }
    let path = match cmd.decided_by().first() {
        Some(dir)
            if meta
                .get(*dir)
                .is_some_and(|i| i.kind == crate::meta::Kind::Dir) =>
        {
            path_to(meta, *dir)
        }
        _ => Vec::new(),
    };
    Some(journal::TentativeChange {
        change: LocalChange {
            origin: me,
            id: change.id,
            cmd: cmd.clone(),
        },
        expect: journal::expectations(meta, cmd, &bases),
        at: crate::meta::Timestamp::now(),
        after_seq: seq.saturating_sub(1),
        place: match cmd {
            FsCommand::CommitVersion { ino, .. } => meta.name_of(*ino),
            _ => None,
        },
        path,
    })
}

/// The path to directory `dir`, root first, as `meta` shows it.
fn path_to(meta: &MetaState, dir: ResourceId) -> Vec<journal::PathStep> {
    let mut out = Vec::new();
    let mut d = dir;
    while d != ResourceId::ROOT && out.len() < 256 {
        let Some(i) = meta.get(d) else { break };
        let Some((parent, name)) = meta.name_of(d) else {
            break;
        };
        out.push(journal::PathStep {
            dir: d,
            parent,
            name,
            perm: i.perm,
            uid: i.uid,
            gid: i.gid,
        });
        d = parent;
    }
    out.reverse();
    out
}

fn dec<T: serde::de::DeserializeOwned>(
    b: &[u8],
    what: &str,
) -> Result<T, crate::storage::StorageError> {
    postcard::from_bytes(b)
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
    recent: Recent,
    shipped: Shipped,
}

/// `SnapshotBody`'s format, serialized from the live state without a copy.
#[derive(Serialize)]
struct BodyView<'a> {
    namespace: crate::meta::SnapshotView<'a>,
    recent: &'a Recent,
    shipped: &'a Shipped,
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
    if from.space.is_some() {
        into.space = from.space;
    }
    into.versions.extend(from.versions);
    into.trash.extend(from.trash);
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
            // The committed state only: this device's pending changes are
            // not part of what the log says (a copy only when there are any).
            let committed = committed_copy(&meta);
            let state: &MetaState = committed.as_ref().unwrap_or(&meta);
            let (applied, membership) = lock(&shared.applied).clone();
            let recent = lock(&shared.recent);
            let shipped = lock(&shared.shipped);
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
                namespace: state.snapshot_view(),
                recent: &recent,
                shipped: &shipped,
            };
            let f = std::fs::File::create(&tmp)?;
            let w = std::io::BufWriter::with_capacity(1 << 20, f);
            let mut w = postcard::to_io(&(&smeta, &body), w).map_err(std::io::Error::other)?;
            w.flush()?;
            drop(shipped);
            drop(recent);
            drop(committed);
            drop(meta);
            w.get_ref().sync_all()?;
            std::fs::rename(&tmp, &path)?;
            crate::datadir::sync_parent(&path)?;
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
        let mut outbox = lock(&shared.outbox);
        let mut applied = lock(&shared.applied);
        let mut recent = lock(&shared.recent);
        let mut shipped = lock(&shared.shipped);
        // Back to the committed state: the log applies there, in order, as
        // on every device; this device's pending changes go on top after.
        meta.rollback();
        let (mut last, mut membership) = applied.clone();
        let mut fx = Applied::default();
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
                EntryPayload::Normal(req) => out.push(apply_request(
                    &mut meta,
                    &mut recent,
                    &mut shipped,
                    req,
                    shared.me,
                    &mut fx,
                )),
            }
        }
        // This device's committed changes leave the outbox (on disk in the
        // same batch); one refused now was applied here and reported done.
        let mut extra: Vec<Extra> = Vec::new();
        let mut unpin = Vec::new();
        let mut requeued_pins = Vec::new();
        for (seq, resp) in &fx.own {
            while outbox.entries.front().is_some_and(|p| p.seq <= *seq) {
                let Some(p) = outbox.entries.pop_front() else {
                    break;
                };
                let mut pins = p.pins;
                if p.seq == *seq {
                    let key = (p.change.origin, p.change.id);
                    let tries = outbox.requeued.get(&key).copied().unwrap_or(0);
                    if resp.is_ok() && tries > 0 {
                        outbox.requeued.remove(&key);
                    }
                    // A tentative change made after it may need it (the
                    // removal of the file it saved): queued again at the
                    // end of the outbox, it could sit behind a change that
                    // waits for that tentative change, which waits for it.
                    // It joins the journal at its place instead, and is
                    // reintegrated before what was made after it.
                    let later_tentative = outbox.tentative.iter().any(|t| t.order > p.order);
                    let not_yet = matches!(resp, Err(MetaError::NotFound));
                    let journaled = if not_yet && later_tentative {
                        tentative_of_refused(&meta, &p.change, p.seq, shared.me)
                    } else {
                        None
                    };
                    if let Some(t) = journaled {
                        outbox.requeued.remove(&key);
                        tracing::debug!(
                            seq,
                            change = ?p.change.cmd,
                            "a change came before what it changes, with tentative changes made after it; it joins the journal in its place"
                        );
                        journal_at_order(
                            &mut outbox,
                            &mut extra,
                            p.order,
                            t,
                            std::mem::take(&mut pins),
                        )?;
                    } else if not_yet && tries < outbox::REQUEUE_MAX {
                        // What it changes is not committed yet (its
                        // creation is in another authority's batch, which
                        // a wait given up on let this one overtake): it
                        // goes to the end of the outbox and ships again.
                        outbox.requeued.insert(key, tries + 1);
                        let again = outbox.next_seq;
                        let bytes = enc(&Stored::V1(p.change.clone()))?;
                        extra.push((RocksStore::outbox_key(again), Some(bytes.clone())));
                        // It keeps its place among tentative changes: one
                        // made after it (a removal of what it saved) must
                        // still wait for it.
                        requeued_pins.extend(outbox.push_at(
                            again,
                            p.change.clone(),
                            bytes.len(),
                            p.order,
                        ));
                        tracing::debug!(
                            seq,
                            again,
                            "a change came before what it changes; queued again"
                        );
                    } else if let Err(e) = resp {
                        outbox.requeued.remove(&key);
                        outbox.conflicts += 1;
                        merge(&mut fx.remote, named_by(&p.change.cmd));
                        if let Some(t) = tentative_of_refused(&meta, &p.change, p.seq, shared.me) {
                            // Not lost: reintegrated like a change made
                            // while the authority was out of reach.
                            tracing::warn!(
                                seq,
                                change = ?p.change.cmd,
                                error = %e,
                                "a change applied here was refused when it committed (its authority moved, or it came before a change it needs); it is reintegrated as a tentative change"
                            );
                            journal_at_order(
                                &mut outbox,
                                &mut extra,
                                p.order,
                                t,
                                std::mem::take(&mut pins),
                            )?;
                        } else {
                            tracing::warn!(
                                seq,
                                change = ?p.change.cmd,
                                error = %e,
                                "a change applied here was refused when it committed (conflict); it is undone"
                            );
                        }
                    }
                }
                unpin.extend(pins);
                extra.push((RocksStore::outbox_key(p.seq), None));
            }
        }
        extra.push((RocksStore::raft_state_key(KEY_APPLIED), Some(enc(&last)?)));
        extra.push((
            RocksStore::raft_state_key(KEY_MEMBERSHIP),
            Some(enc(&membership)?),
        ));
        if fx.recent_changed {
            extra.push((RocksStore::raft_state_key(KEY_RECENT), Some(enc(&*recent)?)));
        }
        if fx.shipped_changed {
            extra.push((
                RocksStore::raft_state_key(KEY_SHIPPED),
                Some(enc(&*shipped)?),
            ));
        }
        // A failure here leaves memory ahead of disk: Raft stops (a storage
        // error is fatal to it) and the restart reloads the state as of the
        // last successful batch, then replays the log from there.
        shared
            .store
            .persist_applied(&fx.all, &extra, false)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        *applied = (last, membership);
        let reintegrated = settle_foreign(&mut outbox, &shipped);
        replay(&mut meta, &mut outbox, shared.me);
        if !reintegrated.is_empty() {
            shared.forget_reintegrated(&reintegrated);
        }
        drop(shipped);
        drop(recent);
        drop(applied);
        drop(outbox);
        drop(meta);
        // Committed now, so their reference counts hold them (those queued
        // again were pinned again first).
        shared.store.pin(&requeued_pins);
        shared.store.unpin(&unpin);
        shared.progress.send_modify(|n| *n += 1);
        if let Some(h) = shared.hook.get() {
            h(AppliedBatch {
                remote: &fx.remote,
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
        let mut extra: Vec<Extra> = vec![
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
            (
                RocksStore::raft_state_key(KEY_SHIPPED),
                Some(enc(&body.shipped)?),
            ),
        ];
        let mut unpin = Vec::new();
        {
            let shared = &self.shared;
            let mut m = write(&shared.meta);
            let mut outbox = lock(&shared.outbox);
            let mut applied = lock(&shared.applied);
            // Pending changes the snapshot already holds are committed.
            let done = body.shipped.get(&shared.me).copied().unwrap_or(0);
            let mut gone = Vec::new();
            while outbox.entries.front().is_some_and(|p| p.seq <= done) {
                if let Some(p) = outbox.entries.pop_front() {
                    gone.push(p.seq);
                    unpin.extend(p.pins);
                }
            }
            outbox.next_seq = outbox.next_seq.max(done + 1);
            extra.extend(gone.iter().map(|s| (RocksStore::outbox_key(*s), None)));
            shared
                .store
                .replace_namespace(&body.namespace, &extra)
                .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
            *m = state;
            *lock(&shared.recent) = body.recent;
            *lock(&shared.shipped) = body.shipped;
            *applied = (meta.last_log_id, meta.last_membership.clone());
            let reintegrated = settle_foreign(&mut outbox, &lock(&shared.shipped));
            replay(&mut m, &mut outbox, shared.me);
            if !reintegrated.is_empty() {
                shared.forget_reintegrated(&reintegrated);
            }
        }
        self.shared.store.unpin(&unpin);
        self.shared.progress.send_modify(|n| *n += 1);
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
            std::fs::rename(&tmp, &path)?;
            crate::datadir::sync_parent(&path)
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
