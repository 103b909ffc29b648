//! Disconnected operation, the I/O half (the rules are in `journal.rs`):
//! deciding that a change goes tentative (its authority is out of reach),
//! the reintegrator task that replays the journal to the authorities in
//! order once they answer again, what it does with a change that became a
//! conflict (a conflict copy, a directory made again), and the list of
//! conflicts `meshfs conflicts` shows.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::journal::{self, ConflictRecord, Failure, Resolution, TentativeChange};
use super::network::{self, call, Reply, Rpc};
use super::{outbox, read_meta, Local, RaftError, Replica, Response};
use crate::ids::ResourceId;
use crate::lock;
use crate::meta::{FsCommand, Governance, Kind, MetaError, Name, NewNode, Outcome, Timestamp};
use crate::storage::ChunkStore;

/// How many times a change waits for what it changes to be committed
/// (with the reintegrator's backoff, minutes) before it is resolved as a
/// conflict.
const NOT_YET: u32 = 100;

/// Conflicts kept in memory for listing (all stay on disk until cleared).
const CONFLICTS_SHOWN: usize = 10_000;

/// Attempts at one tentative change before the reintegrator leaves it for
/// a later pass (it stays in the journal; nothing is dropped).
const ATTEMPTS: u32 = 16;

/// The reintegrator's state, shared by the replica's clones.
#[derive(Default)]
pub(super) struct State {
    /// Wakes the reintegrator: a tentative change was made, or a device
    /// may be back.
    pub wake: tokio::sync::Notify,
    /// Directories the other side removed and this device made again to
    /// hold what it added: old number to new.
    remap: Mutex<HashMap<ResourceId, ResourceId>>,
    /// Conflicts met so far, with their record number, oldest first.
    conflicts: Mutex<VecDeque<(u64, ConflictRecord)>>,
    next_conflict: AtomicU64,
    /// Changes made tentatively, and reintegrated, since the start.
    pub made: AtomicU64,
    pub reintegrated: AtomicU64,
    /// Failed attempts per journal record.
    attempts: Mutex<HashMap<u64, u32>>,
    /// Waits for what a change needs to be committed, per journal record.
    not_yet: Mutex<HashMap<u64, u32>>,
    /// Since when Raft has had no leader, as last seen (see `leaderless`).
    leaderless_since: Mutex<Option<Instant>>,
}

impl State {
    /// Loads the conflicts recorded before a restart.
    pub fn load(store: &crate::storage::RocksStore) -> Self {
        let s = State::default();
        match store.conflict_entries() {
            Ok(rows) => {
                let mut list = lock(&s.conflicts);
                for (n, bytes) in rows {
                    s.next_conflict.fetch_max(n + 1, Ordering::Relaxed);
                    match postcard::from_bytes::<ConflictRecord>(&bytes) {
                        Ok(c) => list.push_back((n, c)),
                        Err(e) => {
                            tracing::warn!(error = %e, "an unreadable conflict record is skipped")
                        }
                    }
                }
                while list.len() > CONFLICTS_SHOWN {
                    list.pop_front();
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the conflict records"),
        }
        s
    }
}

/// How one attempt at the first tentative change went.
enum Step {
    /// Settled (applied, replaced, dropped): go on at once.
    Progress,
    /// Its authority is out of reach, or busy: later.
    Wait,
    /// It did not apply: resolve.
    Failed(Failure),
}

impl Replica {
    /// Whether a change governed by `gov` goes tentative at once: its
    /// authority did not answer lately, Raft has had no leader for
    /// `offline_after` (a change through Raft), or (with `journal_first`) a
    /// tentative change waiting touches what it touches, and it must come
    /// after it.
    pub(super) fn offline_now(
        &self,
        cmd: &FsCommand,
        gov: &Governance,
        journal_first: bool,
    ) -> bool {
        if journal_first && self.shared.tentative_touching(cmd) {
            return true;
        }
        match gov {
            Governance::One(d) => self.recently_unreachable(*d),
            Governance::Several(devs) => {
                self.leaderless()
                    || devs
                        .iter()
                        .any(|d| *d != self.device && self.recently_unreachable(*d))
            }
            Governance::Cluster | Governance::Anyone => false,
        }
    }

    /// Whether Raft has had no leader for `offline_after` (checked here and
    /// by the member watcher every `PROBE_EVERY`). A moment without one is
    /// an election, which CPU starvation alone can cause on a connected
    /// mesh: a change waits that out (up to `offline_after`, as for a slow
    /// authority) rather than go tentative, which loosens close-to-open and
    /// can end in a conflict copy. CI once failed so: a rename across
    /// authorities made tentatively during a brief election on a loaded
    /// machine came back as a rename/rename conflict.
    pub(super) fn leaderless(&self) -> bool {
        let mut since = lock(&self.reint.leaderless_since);
        if self.leader().is_some() {
            *since = None;
            return false;
        }
        since.get_or_insert_with(Instant::now).elapsed() >= self.settings.offline_after
    }

    /// Remembers that the devices `gov` needs did not answer in time.
    pub(super) fn mark_unreachable(&self, gov: &Governance) {
        let devs: Vec<_> = match gov {
            Governance::One(d) => vec![*d],
            Governance::Several(ds) => ds.clone(),
            Governance::Cluster | Governance::Anyone => Vec::new(),
        };
        let mut u = lock(&self.unreachable);
        for d in devs.into_iter().filter(|d| *d != self.device) {
            u.insert(d, Instant::now());
        }
    }

    /// Makes `cmd` tentatively here (see `journal.rs`).
    pub(super) fn change_tentatively(
        &self,
        id: u64,
        cmd: FsCommand,
    ) -> Result<Response, RaftError> {
        match self.shared.apply_tentative(id, cmd.clone())? {
            Local::Applied { out, .. } => {
                self.reint.made.fetch_add(1, Ordering::Relaxed);
                self.record_change(&cmd);
                self.reint.wake.notify_one();
                tracing::debug!(change = ?cmd, "made tentatively (its authority is out of reach)");
                Ok(Ok(out))
            }
            Local::Refused(e) | Local::Changed(Failure::Error(e)) => Ok(Err(e)),
            Local::NotMine(_) | Local::Sealed | Local::Changed(Failure::Changed { .. }) => Ok(Err(
                MetaError::Invalid("could not be made tentatively".into()),
            )),
        }
    }

    /// The conflicts met so far, oldest first.
    pub fn conflicts(&self) -> Vec<ConflictRecord> {
        lock(&self.reint.conflicts)
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Forgets the conflicts listed so far (`meshfs conflicts --clear`);
    /// returns how many.
    pub fn clear_conflicts(&self) -> Result<usize, RaftError> {
        let mut list = lock(&self.reint.conflicts);
        let seqs: Vec<u64> = list.iter().map(|(n, _)| *n).collect();
        self.shared.store.conflict_delete(&seqs)?;
        list.clear();
        Ok(seqs.len())
    }

    /// (waiting, since, made, reintegrated, conflicts listed) for status.
    pub fn tentative_counts(&self) -> (usize, Option<Timestamp>, u64, u64, usize) {
        let (n, since) = self.shared.tentative_status();
        (
            n,
            since,
            self.reint.made.load(Ordering::Relaxed),
            self.reint.reintegrated.load(Ordering::Relaxed),
            lock(&self.reint.conflicts).len(),
        )
    }

    fn record_conflict(
        &self,
        t: &TentativeChange,
        kind: journal::ConflictKind,
        kept_as: Option<String>,
        detail: String,
    ) {
        let path = self.path_of(&t.change.cmd, t.place.as_ref(), &t.path);
        let rec = ConflictRecord {
            kind,
            made: t.at,
            found: Timestamp::now(),
            path: path.clone(),
            kept_as,
            detail,
        };
        tracing::warn!(
            kind = kind.label(),
            path = %path,
            kept_as = ?rec.kept_as,
            detail = %rec.detail,
            "conflict at reintegration"
        );
        let n = self.reint.next_conflict.fetch_add(1, Ordering::Relaxed);
        match postcard::to_stdvec(&rec) {
            Ok(b) => {
                if let Err(e) = self.shared.store.conflict_put(n, &b) {
                    tracing::warn!(error = %e, "could not record a conflict on disk");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode a conflict record"),
        }
        let mut list = lock(&self.reint.conflicts);
        list.push_back((n, rec));
        while list.len() > CONFLICTS_SHOWN {
            list.pop_front();
        }
    }

    /// The path a change concerns, as this device shows it now: the name
    /// it changes, or `place` (a file's name) for a change by inode.
    fn path_of(
        &self,
        cmd: &FsCommand,
        place: Option<&(ResourceId, Name)>,
        path: &[journal::PathStep],
    ) -> String {
        match cmd {
            FsCommand::Create { parent, name, .. }
            | FsCommand::Link { parent, name, .. }
            | FsCommand::Unlink { parent, name, .. }
            | FsCommand::Rmdir { parent, name, .. }
            | FsCommand::Rename { parent, name, .. } => self.path_in(*parent, name, path),
            _ => match place {
                Some((p, n)) => self.path_in(*p, n, path),
                None => String::from("(unknown)"),
            },
        }
    }

    /// The path of `name` in `parent` as this device shows it now; `path`
    /// (the directory's path when the change was made) names a directory
    /// that is gone now.
    fn path_in(&self, parent: ResourceId, name: &[u8], path: &[journal::PathStep]) -> String {
        if let Some(p) = read_meta(&self.shared.meta).path_in(parent, name) {
            return String::from_utf8_lossy(&p).into_owned();
        }
        let dir: String = match path.iter().position(|s| s.dir == parent) {
            Some(i) => path[..=i]
                .iter()
                .map(|s| format!("/{}", String::from_utf8_lossy(&s.name)))
                .collect(),
            None => format!("(directory {parent})"),
        };
        format!("{dir}/{}", String::from_utf8_lossy(name))
    }

    /// The request id of this attempt at tentative change `jseq` (made as
    /// request `id`). An authority, and the Raft log, answer a request id
    /// they saw again with its first result, so that a retry after a lost
    /// reply applies nothing twice. An attempt after a definitive answer
    /// (the change waited for what it changes, or was replaced by a
    /// conflict resolution) is a new request: with the same id it got the
    /// first refusal back forever, and a save joined to the journal after
    /// its file's creation overtook it waited until the end of time.
    fn attempt_id(&self, jseq: u64, id: u64) -> u64 {
        let waits = lock(&self.reint.not_yet).get(&jseq).copied().unwrap_or(0);
        let tries = lock(&self.reint.attempts).get(&jseq).copied().unwrap_or(0);
        if waits == 0 && tries == 0 {
            return id;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"meshfs reintegration attempt");
        h.update(&id.to_le_bytes());
        h.update(&waits.to_le_bytes());
        h.update(&tries.to_le_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(out)
    }

    /// One attempt at the first tentative change `t` (journal record `jseq`).
    async fn reintegrate_step(&self, jseq: u64, t: &TentativeChange) -> Step {
        let mut cmd = t.change.cmd.clone();
        let mut expect = t.expect.clone();
        journal::remap(&mut cmd, &mut expect, &lock(&self.reint.remap));
        let id = self.attempt_id(jseq, t.change.id);
        let live = read_meta(&self.shared.meta).governance(&cmd);
        let gov = match live {
            // Not in the live view: a later tentative change may have
            // removed it (a save, then the removal of the file saved).
            Err(MetaError::NotFound) => self
                .shared
                .before_tentative(jseq, |m| m.governance(&cmd))
                .unwrap_or(Err(MetaError::NotFound)),
            other => other,
        };
        match gov {
            Err(e) => {
                tracing::debug!(change = ?cmd, error = %e, "no authority for a tentative change here");
                Step::Failed(Failure::Error(e))
            }
            // It is this device's to decide now (the authority moved
            // here): through Raft, so that it commits before the changes
            // made here after it (they wait behind it), not after them as
            // a new outbox entry would.
            Ok(Governance::One(d)) if d == self.device => {
                self.through_raft(jseq, id, cmd, &expect, None).await
            }
            Ok(Governance::One(d)) => {
                if self.recently_unreachable(d) {
                    tracing::trace!(authority = %d, "tentative change waits: its authority is out of reach");
                    return Step::Wait;
                }
                if let Err(e) = self.sync_before_sending(vec![&cmd]).await {
                    tracing::debug!(error = %e, "tentative change waits: this device's WAL could not be synced");
                    return Step::Wait;
                }
                let pins = outbox::chunks_of(&cmd);
                self.shared.store.pin(&pins);
                let wait = self.settings.read_wait;
                let rpc = Rpc::Reintegrate {
                    origin: self.device,
                    id,
                    cmd,
                    expect,
                    expires_ms: network::unix_ms() + wait.as_millis() as u64,
                    applied: self.applied_index(),
                };
                let reply = call(&self.mesh, d, &rpc, wait).await;
                match reply {
                    Ok(Reply::Forwarded {
                        seq,
                        result: Ok(_),
                        effects,
                    }) => {
                        let done = self.shared.tentative_done(jseq, d, seq, effects);
                        self.unpin_when_shipped(d, seq, pins);
                        self.settled(jseq, done)
                    }
                    other => {
                        self.shared.store.unpin(&pins);
                        match other {
                            Ok(Reply::Forwarded { result: Err(e), .. }) => {
                                Step::Failed(Failure::Error(e))
                            }
                            Ok(Reply::Changed { expect, absent }) => {
                                Step::Failed(Failure::Changed { expect, absent })
                            }
                            Ok(Reply::NotAuthority) => {
                                tracing::debug!(authority = %d, "tentative change waits: the authority is sealed or moved");
                                Step::Wait
                            }
                            Ok(other) => {
                                tracing::debug!(reply = ?other, "reintegrating a tentative change");
                                Step::Wait
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, authority = %d, "reintegrating a tentative change");
                                lock(&self.unreachable).insert(d, Instant::now());
                                Step::Wait
                            }
                        }
                    }
                }
            }
            Ok(gov) => self.through_raft(jseq, id, cmd, &expect, Some(gov)).await,
        }
    }

    /// Reintegrates the first tentative change through Raft: checked on
    /// this device's view without it (what this device has of the
    /// authorities involved, after they shipped), then committed (routed
    /// by `gov` when several authorities are involved).
    async fn through_raft(
        &self,
        jseq: u64,
        id: u64,
        cmd: FsCommand,
        expect: &[journal::Expect],
        gov: Option<Governance>,
    ) -> Step {
        match self.shared.tentative_check(jseq, expect) {
            None => Step::Progress,
            Some(Err(f)) => Step::Failed(f),
            Some(Ok(())) => {
                let deadline = Instant::now() + self.settings.offline_after;
                let done = match gov.clone() {
                    Some(g) => self.route(id, cmd, g, deadline, true).await,
                    None => {
                        let req = super::Request {
                            origin: self.device,
                            id,
                            op: super::Op::Fs(cmd),
                        };
                        self.propose_request(req, deadline).await.map(Some)
                    }
                };
                match done {
                    // Committed (and applied here): out of the journal.
                    Ok(Some(Ok(_))) => self.settled(jseq, self.shared.tentative_drop(jseq)),
                    Ok(Some(Err(e))) => Step::Failed(Failure::Error(e)),
                    Ok(None) => {
                        tracing::debug!("tentative change waits: its authority moved");
                        Step::Wait
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reintegrating a tentative change through raft");
                        if let Some(g) = &gov {
                            self.mark_unreachable(g);
                        }
                        Step::Wait
                    }
                }
            }
        }
    }

    /// Whether `failure` only says that what `t` changes is not where it
    /// was applied yet: this device shows it (its creation is on its way,
    /// in another authority's outbox or this one's), so the change waits
    /// rather than becoming a conflict. Up to `NOT_YET` times.
    fn not_yet(&self, jseq: u64, t: &TentativeChange, failure: &Failure) -> bool {
        if !matches!(failure, Failure::Error(MetaError::NotFound)) {
            return false;
        }
        let target = match &t.change.cmd {
            FsCommand::CommitVersion { ino, .. }
            | FsCommand::SetAttr { ino, .. }
            | FsCommand::SetXattr { ino, .. }
            | FsCommand::RemoveXattr { ino, .. } => *ino,
            FsCommand::Create { parent, .. }
            | FsCommand::Link { parent, .. }
            | FsCommand::Unlink { parent, .. }
            | FsCommand::Rmdir { parent, .. }
            | FsCommand::Rename { parent, .. } => lock(&self.reint.remap)
                .get(parent)
                .copied()
                .unwrap_or(*parent),
            _ => return false,
        };
        let shown_in = |m: &crate::meta::MetaState| m.get(target).is_some_and(|i| i.nlink > 0);
        // As this device showed it when the change was made (a later
        // tentative change may have removed it since).
        let shown = shown_in(&read_meta(&self.shared.meta))
            || self.shared.before_tentative(jseq, shown_in) == Some(true);
        if !shown {
            tracing::debug!(%target, "tentative change fails: what it changes is not shown here either");
            return false;
        }
        let mut waits = lock(&self.reint.not_yet);
        let n = waits.entry(jseq).or_insert(0);
        *n += 1;
        tracing::debug!(%target, waits = *n, "tentative change waits: what it changes is not committed yet");
        *n <= NOT_YET
    }

    fn settled(&self, jseq: u64, r: Result<(), crate::storage::StorageError>) -> Step {
        match r {
            Ok(()) => {
                self.reint.reintegrated.fetch_add(1, Ordering::Relaxed);
                lock(&self.reint.attempts).remove(&jseq);
                lock(&self.reint.not_yet).remove(&jseq);
                Step::Progress
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record a reintegrated change; it is tried again");
                Step::Wait
            }
        }
    }

    /// Decides what becomes of tentative change `t` that failed with
    /// `failure`, and does it. True when the journal moved on.
    async fn resolve_failure(&self, jseq: u64, t: &TentativeChange, failure: Failure) -> bool {
        let attempt = {
            let mut a = lock(&self.reint.attempts);
            let n = a.entry(jseq).or_insert(0);
            *n += 1;
            *n - 1
        };
        let mut t = t.clone();
        journal::remap(&mut t.change.cmd, &mut t.expect, &lock(&self.reint.remap));
        if attempt >= ATTEMPTS {
            return self.give_up(jseq, &t, &failure, attempt).await;
        }
        let (resolution, kind) = {
            let meta = read_meta(&self.shared.meta);
            let taken = |p: ResourceId, n: &[u8]| meta.entry(p, n).is_some();
            journal::resolve(&t, &failure, &self.settings.name, attempt, &taken)
        };
        tracing::debug!(?failure, ?resolution, "resolving a tentative change");
        match resolution {
            Resolution::Retry {
                cmd,
                expect,
                kept_as,
            } => {
                let shown = match (&cmd, &kept_as) {
                    (
                        FsCommand::Create { parent, .. } | FsCommand::Link { parent, .. },
                        Some(n),
                    ) => Some(self.path_in(*parent, n, &[])),
                    (FsCommand::Rename { new_parent, .. }, Some(n)) => {
                        Some(self.path_in(*new_parent, n, &[]))
                    }
                    _ => None,
                };
                self.record_conflict(
                    &t,
                    kind,
                    shown,
                    "the name was taken there: this device's file took a conflict name".into(),
                );
                match self.shared.tentative_replace(jseq, cmd, expect) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, "could not record a resolved tentative change");
                        false
                    }
                }
            }
            Resolution::CopyBeside { parent, name } => {
                match self.copy_beside(&t, parent, &name).await {
                    Ok(()) => {
                        let detail = match kind {
                        journal::ConflictKind::EditEdit => {
                            "changed on both sides: the other side's version stays in place, this device's is beside it"
                        }
                        _ => "changed here, deleted there: this device's version is kept beside where it was",
                    };
                        self.record_conflict(
                            &t,
                            kind,
                            Some(self.path_in(parent, &name, &[])),
                            detail.into(),
                        );
                        self.settled(jseq, self.shared.tentative_drop(jseq));
                        true
                    }
                    // Taken too, or the place is gone: the next attempt takes
                    // another name (or the root).
                    Err(e) => {
                        tracing::debug!(error = %e, "making a conflict copy");
                        true
                    }
                }
            }
            Resolution::Yield => {
                let detail = match kind {
                    journal::ConflictKind::DeleteEdit => {
                        "deleted here, changed there: the file is kept"
                    }
                    journal::ConflictKind::RmdirAdd => {
                        "removed here, added to there: the directory is kept with what was added"
                    }
                    journal::ConflictKind::RenameRename => {
                        "renamed or removed on both sides: the other side's change stands"
                    }
                    _ => "no longer applied there; the other side's state stands",
                };
                self.record_conflict(&t, kind, None, format!("{detail} ({failure:?})"));
                self.settled(jseq, self.shared.tentative_drop(jseq));
                true
            }
            Resolution::Moot => {
                self.settled(jseq, self.shared.tentative_drop(jseq));
                true
            }
            Resolution::Remake => match self.remake(&t).await {
                Ok(true) => {
                    self.record_conflict(
                        &t,
                        kind,
                        None,
                        "the directory was removed there while this device added to it: it was made again".into(),
                    );
                    true
                }
                // Every directory of its path is there (made again just
                // before, not committed yet): try again.
                Ok(false) if !t.path.is_empty() => true,
                Ok(false) => {
                    // Nothing known to make again: into the root, under a
                    // conflict name.
                    let mut cmd = t.change.cmd.clone();
                    let fallback = self.free_name(ResourceId::ROOT, b"orphan", t.at, attempt);
                    match &mut cmd {
                        FsCommand::Create { parent, name, .. }
                        | FsCommand::Link { parent, name, .. } => {
                            *parent = ResourceId::ROOT;
                            *name = fallback.clone();
                        }
                        FsCommand::Rename {
                            new_parent,
                            new_name,
                            ..
                        } => {
                            *new_parent = ResourceId::ROOT;
                            *new_name = fallback.clone();
                        }
                        _ => {}
                    }
                    self.record_conflict(
                        &t,
                        kind,
                        Some(self.path_in(ResourceId::ROOT, &fallback, &[])),
                        "its directory was removed there and could not be made again: kept at the root".into(),
                    );
                    self.shared.tentative_replace(jseq, cmd, Vec::new()).is_ok()
                }
                Err(e) => {
                    tracing::debug!(error = %e, "making a removed directory again");
                    false
                }
            },
        }
    }

    /// The last resort for a change that kept failing: a version is kept
    /// as a copy at the root; anything else is dropped, recorded.
    async fn give_up(
        &self,
        jseq: u64,
        t: &TentativeChange,
        failure: &Failure,
        attempt: u32,
    ) -> bool {
        tracing::error!(change = ?t.change.cmd, ?failure, "a tentative change could not be reintegrated after {ATTEMPTS} attempts");
        let kept_as = if matches!(t.change.cmd, FsCommand::CommitVersion { .. }) {
            let base = t
                .place
                .as_ref()
                .map_or(&b"unnamed"[..], |(_, n)| n.as_slice());
            let name = self.free_name(ResourceId::ROOT, base, t.at, attempt);
            if let Err(e) = self.copy_beside(t, ResourceId::ROOT, &name).await {
                tracing::warn!(error = %e, "keeping a version that could not be reintegrated");
                return false;
            }
            Some(self.path_in(ResourceId::ROOT, &name, &[]))
        } else {
            None
        };
        self.record_conflict(
            t,
            journal::ConflictKind::Other,
            kept_as,
            format!("could not be reintegrated after {ATTEMPTS} attempts ({failure:?})"),
        );
        self.settled(jseq, self.shared.tentative_drop(jseq));
        true
    }

    /// A conflict name for `base` in `parent` nothing uses here.
    fn free_name(&self, parent: ResourceId, base: &[u8], at: Timestamp, attempt: u32) -> Name {
        let meta = read_meta(&self.shared.meta);
        let taken = |p: ResourceId, n: &[u8]| meta.entry(p, n).is_some();
        journal::free_conflict_name(parent, base, &self.settings.name, at, attempt, &taken)
    }

    /// Keeps this device's version of a file (the content of tentative
    /// `CommitVersion` `t`) as a new file `name` in `parent`.
    async fn copy_beside(
        &self,
        t: &TentativeChange,
        parent: ResourceId,
        name: &[u8],
    ) -> Result<(), String> {
        let FsCommand::CommitVersion {
            ino,
            size,
            chunks,
            mtime,
            author,
            ..
        } = &t.change.cmd
        else {
            return Err("not a version".into());
        };
        let (perm, uid, gid, parent) = {
            let meta = read_meta(&self.shared.meta);
            let parent = if meta
                .get(parent)
                .is_some_and(|i| i.kind == Kind::Dir && i.nlink > 0)
            {
                parent
            } else {
                ResourceId::ROOT
            };
            match meta.get(*ino).or_else(|| meta.get(parent)) {
                Some(i) if i.kind == Kind::File => (i.perm, i.uid, i.gid, parent),
                Some(i) => (0o644, i.uid, i.gid, parent),
                None => (0o644, 0, 0, parent),
            }
        };
        let create = FsCommand::Create {
            parent,
            name: name.to_vec(),
            ino: ResourceId(0),
            node: NewNode::File,
            perm,
            uid,
            gid,
            now: Timestamp::now(),
        };
        let created = self.change_blocking(create).await?;
        let new = match created {
            Ok(Outcome::Inode(i)) => i.id,
            Ok(other) => return Err(format!("creating a conflict copy gave {other:?}")),
            Err(e) => return Err(format!("creating a conflict copy: {e}")),
        };
        let version = FsCommand::CommitVersion {
            ino: new,
            size: *size,
            chunks: chunks.clone(),
            mtime: *mtime,
            author: *author,
            now: Timestamp::now(),
        };
        match self.change_blocking(version).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("writing a conflict copy: {e}")),
        }
    }

    /// Makes the directories of `t`'s path that are gone again (new
    /// numbers, remembered in `remap`); false when none was missing.
    async fn remake(&self, t: &TentativeChange) -> Result<bool, String> {
        let mut made = false;
        for step in &t.path {
            let (dir, parent) = {
                let remap = lock(&self.reint.remap);
                (
                    remap.get(&step.dir).copied().unwrap_or(step.dir),
                    remap.get(&step.parent).copied().unwrap_or(step.parent),
                )
            };
            let alive = |r: ResourceId| {
                read_meta(&self.shared.meta)
                    .get(r)
                    .is_some_and(|i| i.kind == Kind::Dir && i.nlink > 0)
            };
            if alive(dir) {
                continue;
            }
            let create = FsCommand::Create {
                parent,
                name: step.name.clone(),
                ino: ResourceId(0),
                node: NewNode::Dir,
                perm: step.perm,
                uid: step.uid,
                gid: step.gid,
                now: Timestamp::now(),
            };
            let new = match self.change_blocking(create).await? {
                Ok(Outcome::Inode(i)) => i.id,
                Err(MetaError::Exists) => {
                    // Made again already (by an earlier change of ours, or
                    // the other side): use it if it is a directory.
                    match read_meta(&self.shared.meta).entry(parent, &step.name) {
                        Some(e) if e.kind == Kind::Dir => e.ino,
                        _ => return Err("the name of a removed directory is a file now".into()),
                    }
                }
                Ok(other) => return Err(format!("making a directory again gave {other:?}")),
                Err(e) => return Err(format!("making a directory again: {e}")),
            };
            lock(&self.reint.remap).insert(step.dir, new);
            made = true;
        }
        if made {
            // What goes into them may be committed through Raft, on the
            // committed state: they must be there first (their authority
            // ships them in a moment).
            let deadline = Instant::now() + self.settings.write_timeout;
            let made_dirs: Vec<ResourceId> = lock(&self.reint.remap).values().copied().collect();
            loop {
                let there = self.with_committed(|m| made_dirs.iter().all(|d| m.get(*d).is_some()));
                if there {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("a directory made again is not committed yet".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(made)
    }

    /// `change_as` (not journal first) from async code.
    async fn change_blocking(&self, cmd: FsCommand) -> Result<Response, String> {
        let r = self.clone();
        tokio::task::spawn_blocking(move || r.change_as(cmd, false))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// How often each other member is asked whether it answers.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// One member's probing: a question out, and since when none was answered.
#[derive(Default)]
struct Probe {
    busy: bool,
    failing_since: Option<Instant>,
}

/// Watches which members answer: each is asked a trivial question every
/// `PROBE_EVERY` (one at a time each); one that has not answered for
/// `offline_after` (every question since failed or timed out) is marked
/// unreachable, so that changes to what it governs go tentative at once (no
/// program waits on it), and unmarked when it answers again (the
/// reintegrator is woken then). A single slow answer marks nothing: a
/// tentative change is only for a device that is really out of reach (it
/// loosens close-to-open until it is reintegrated).
pub(super) async fn watch_members(r: Replica) {
    let probes: std::sync::Arc<Mutex<HashMap<crate::ids::DeviceId, Probe>>> = Default::default();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        // Keeps the leaderless clock running between changes.
        r.leaderless();
        let devices: Vec<crate::ids::DeviceId> = {
            let metrics = r.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .nodes()
                .map(|(_, n)| n.device)
                .filter(|d| *d != r.device)
                .collect()
        };
        for d in devices {
            let failing_since = {
                let mut p = lock(&probes);
                let p = p.entry(d).or_default();
                if p.busy {
                    continue;
                }
                p.busy = true;
                p.failing_since
            };
            let (r, probes) = (r.clone(), probes.clone());
            tokio::spawn(async move {
                let rpc = Rpc::Lookup {
                    parent: ResourceId::ROOT,
                    name: Vec::new(),
                };
                let answered = call(&r.mesh, d, &rpc, r.settings.read_wait).await.is_ok();
                let was = r.recently_unreachable(d);
                let next = if answered {
                    lock(&r.unreachable).remove(&d);
                    if was {
                        tracing::info!(device = %d, "a device answers again");
                        r.reint.wake.notify_one();
                    }
                    None
                } else {
                    let since = failing_since.unwrap_or_else(Instant::now);
                    if since.elapsed() >= r.settings.offline_after {
                        if !was {
                            tracing::info!(device = %d, "a device does not answer; changes to what it governs are made tentatively here");
                        }
                        lock(&r.unreachable).insert(d, Instant::now());
                    }
                    Some(since)
                };
                lock(&probes).insert(
                    d,
                    Probe {
                        busy: false,
                        failing_since: next,
                    },
                );
            });
        }
    }
}

/// The reintegrator: replays the journal to the authorities, first change
/// first, as soon as each is reachable; resolves conflicts on the way.
///
/// A change that keeps waiting is tried less often (200 ms doubling to 3
/// s): a change spanning authorities seals what it involves at each while
/// it tries, and retrying it back to back would keep them sealed.
pub(super) async fn run(r: Replica) {
    let mut pause = Duration::from_millis(200);
    loop {
        let woken = r.reint.wake.notified();
        let mut applied = r.shared.progress.subscribe();
        let Some((jseq, t)) = r.shared.tentative_ready() else {
            // Nothing to do, or the first waits for changes made before it
            // to commit: a batch applied here may be that.
            tokio::select! {
                _ = woken => {}
                _ = applied.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let progressed = match r.reintegrate_step(jseq, &t).await {
            Step::Progress => {
                tracing::debug!(jseq, change = ?t.change.cmd, "a tentative change is reintegrated");
                true
            }
            Step::Wait => false,
            Step::Failed(f) if r.not_yet(jseq, &t, &f) => false,
            Step::Failed(f) => r.resolve_failure(jseq, &t, f).await,
        };
        if progressed {
            pause = Duration::from_millis(200);
        } else {
            let _ = tokio::time::timeout(pause, woken).await;
            pause = (pause * 2).min(Duration::from_secs(3));
        }
    }
}
