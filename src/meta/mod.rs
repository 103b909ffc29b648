//! The namespace as a deterministic state machine: `apply(FsCommand)` with no
//! I/O. It owns inodes, directory entries, content versions (the current
//! one and the old ones kept for history), the trash of removed files and
//! the chunk reference deltas that follow from them. Storage persists the
//! changes one command at a time (one write batch); Raft replicates exactly
//! these commands.

pub mod retention;
mod types;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};

pub use types::*;

/// Why a command was refused. Each maps to one POSIX errno in `fuse/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(Cow<'static, str>),
    #[error("operation not permitted")]
    NotPermitted,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute name out of range")]
    AttrRange,
    #[error("attribute value too big")]
    AttrTooBig,
    #[error("operation not supported")]
    NotSupported,
    /// The applying device does not govern what the command changes (the
    /// authority moved): the change must go to the current authority.
    #[error("this device does not govern the resource (authority moved)")]
    NotAuthority,
    /// The applying device owns no inode block with room left: it must
    /// reserve one through Raft first.
    #[error("no inode numbers reserved for this device")]
    NoInodes,
}

/// What a successful command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The inode created, linked or changed.
    Inode(Box<Inode>),
    Done,
    /// How many authority moves took effect.
    Moved(usize),
}

/// Directory contents, indexed both by name (lookup) and by cookie (readdir).
/// The readdir index is keyed by (cookie, name), not by cookie alone: in the
/// committed state cookies are unique per directory, but the speculative
/// layer can briefly hold two names with one cookie (another authority's
/// pending create shown here while a rename committed through Raft took the
/// same number), and a cookie-only index then lost one of the names for
/// good (found by lookup, missing from listings).
#[derive(Clone, Debug, Default)]
struct DirEntries {
    by_name: BTreeMap<Name, Entry>,
    by_cookie: BTreeSet<(u64, Name)>,
}

/// What one or more applied commands changed, for storage to persist.
#[derive(Debug, Default)]
pub struct Changes {
    /// Inodes to write (`Some`) or delete (`None`).
    pub inodes: Vec<(ResourceId, Option<Inode>)>,
    /// Entries to write or delete, keyed by (parent, name).
    pub entries: Vec<(ResourceId, Name, Option<Entry>)>,
    /// Reference count changes per chunk.
    pub chunk_deltas: BTreeMap<ChunkHash, i64>,
    /// The inode allocator, when it changed.
    pub space: Option<InoSpace>,
    /// Old versions to write or delete.
    pub versions: Vec<((ResourceId, VersionId), Option<OldVersion>)>,
    /// Trash records to write or delete.
    pub trash: Vec<(ResourceId, Option<Trashed>)>,
}

/// Values an authority produced, to be shown by another device before
/// they arrive through the log (`MetaState::install`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Effects {
    pub inodes: Vec<(ResourceId, Option<Inode>)>,
    pub entries: Vec<(ResourceId, Name, Option<Entry>)>,
}

impl Effects {
    pub fn of(c: Changes) -> Self {
        Effects {
            inodes: c.inodes,
            entries: c.entries,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty() && self.entries.is_empty()
    }
}

/// A full copy of the state, for snapshots and for loading from disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub inodes: Vec<Inode>,
    pub entries: Vec<(ResourceId, Name, Entry)>,
    pub space: InoSpace,
    pub versions: Vec<((ResourceId, VersionId), OldVersion)>,
    pub trash: Vec<(ResourceId, Trashed)>,
}

/// `MetaState::snapshot_view`: the state serialized in `Snapshot`'s format.
pub struct SnapshotView<'a>(&'a MetaState);

impl Serialize for SnapshotView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct Inodes<'a>(&'a BTreeMap<ResourceId, Inode>);
        impl Serialize for Inodes<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for i in self.0.values() {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
        }
        struct Entries<'a>(&'a BTreeMap<ResourceId, DirEntries>);
        impl Serialize for Entries<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let n = self.0.values().map(|d| d.by_name.len()).sum();
                let mut seq = s.serialize_seq(Some(n))?;
                for (parent, dir) in self.0 {
                    for (name, e) in &dir.by_name {
                        seq.serialize_element(&(parent, name, e))?;
                    }
                }
                seq.end()
            }
        }
        struct Pairs<'a, K, V>(&'a BTreeMap<K, V>);
        impl<K: Serialize, V: Serialize> Serialize for Pairs<'_, K, V> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter())
            }
        }
        let mut st = s.serialize_struct("Snapshot", 5)?;
        st.serialize_field("inodes", &Inodes(&self.0.inodes))?;
        st.serialize_field("entries", &Entries(&self.0.dirs))?;
        st.serialize_field("space", &self.0.space)?;
        st.serialize_field("versions", &Pairs(&self.0.versions))?;
        st.serialize_field("trash", &Pairs(&self.0.trash))?;
        st.end()
    }
}

/// The namespace.
#[derive(Debug, Clone)]
pub struct MetaState {
    inodes: BTreeMap<ResourceId, Inode>,
    dirs: BTreeMap<ResourceId, DirEntries>,
    space: InoSpace,
    /// Versions replaced by newer ones (of live and of trashed files).
    versions: BTreeMap<(ResourceId, VersionId), OldVersion>,
    /// Files whose last name went, by their old inode number.
    trash: BTreeMap<ResourceId, Trashed>,
    dirty_space: bool,
    dirty_inodes: BTreeSet<ResourceId>,
    dirty_entries: BTreeSet<(ResourceId, Name)>,
    dirty_versions: BTreeSet<(ResourceId, VersionId)>,
    dirty_trash: BTreeSet<ResourceId>,
    chunk_deltas: BTreeMap<ChunkHash, i64>,
    undo: Undo,
}

/// The values changed since the last `take_changes`, as they were before,
/// so that a change storage failed to persist can be taken back.
#[derive(Debug, Clone, Default)]
struct Undo {
    inodes: BTreeMap<ResourceId, Option<Inode>>,
    entries: BTreeMap<(ResourceId, Name), Option<Entry>>,
    dirs: BTreeMap<ResourceId, Option<DirEntries>>,
    space: Option<InoSpace>,
    versions: BTreeMap<(ResourceId, VersionId), Option<OldVersion>>,
    trash: BTreeMap<ResourceId, Option<Trashed>>,
}

/// The undo record of the changes applied before a `MetaState::savepoint`
/// (see there).
#[derive(Debug)]
pub struct Savepoint(Undo);

impl Undo {
    /// Adds `later`'s records for keys this one has not saved yet: the
    /// result restores the values from before both.
    fn absorb(&mut self, later: Undo) {
        for (k, v) in later.inodes {
            self.inodes.entry(k).or_insert(v);
        }
        for (k, v) in later.entries {
            self.entries.entry(k).or_insert(v);
        }
        for (k, v) in later.dirs {
            self.dirs.entry(k).or_insert(v);
        }
        for (k, v) in later.versions {
            self.versions.entry(k).or_insert(v);
        }
        for (k, v) in later.trash {
            self.trash.entry(k).or_insert(v);
        }
        if self.space.is_none() {
            self.space = later.space;
        }
    }

    fn is_empty(&self) -> bool {
        self.inodes.is_empty()
            && self.entries.is_empty()
            && self.dirs.is_empty()
            && self.space.is_none()
            && self.versions.is_empty()
            && self.trash.is_empty()
    }
}

type R<T> = Result<T, MetaError>;

impl MetaState {
    /// A fresh namespace: only the root directory, owned by `uid`/`gid` and
    /// governed by `device`, which also owns the first inode block.
    pub fn new(uid: u32, gid: u32, now: Timestamp, device: DeviceId) -> Self {
        let root = Inode {
            id: ResourceId::ROOT,
            kind: Kind::Dir,
            perm: 0o755,
            uid,
            gid,
            nlink: 2,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: ResourceId::ROOT,
            xattrs: BTreeMap::new(),
            target: None,
            content: None,
            next_cookie: FIRST_COOKIE,
            authority: Authority { device, epoch: 1 },
        };
        let mut space = InoSpace {
            next_block: 1,
            blocks: BTreeMap::new(),
        };
        space.blocks.insert(
            0,
            Block {
                owner: device,
                next: 2,
            },
        );
        let mut s = MetaState {
            inodes: BTreeMap::new(),
            dirs: BTreeMap::new(),
            space,
            versions: BTreeMap::new(),
            trash: BTreeMap::new(),
            dirty_space: true,
            dirty_inodes: BTreeSet::new(),
            dirty_entries: BTreeSet::new(),
            dirty_versions: BTreeSet::new(),
            dirty_trash: BTreeSet::new(),
            chunk_deltas: BTreeMap::new(),
            undo: Undo::default(),
        };
        s.dirs.insert(ResourceId::ROOT, DirEntries::default());
        s.put_inode(root);
        s.undo = Undo::default();
        s
    }

    /// Rebuilds the state from a snapshot (or from what storage loaded).
    pub fn restore(snap: Snapshot) -> Result<Self, MetaError> {
        let mut s = MetaState {
            inodes: BTreeMap::new(),
            dirs: BTreeMap::new(),
            space: snap.space,
            versions: snap.versions.into_iter().collect(),
            trash: snap.trash.into_iter().collect(),
            dirty_space: false,
            dirty_inodes: BTreeSet::new(),
            dirty_entries: BTreeSet::new(),
            dirty_versions: BTreeSet::new(),
            dirty_trash: BTreeSet::new(),
            chunk_deltas: BTreeMap::new(),
            undo: Undo::default(),
        };
        for inode in snap.inodes {
            if inode.kind == Kind::Dir {
                s.dirs.insert(inode.id, DirEntries::default());
            }
            s.inodes.insert(inode.id, inode);
        }
        for (parent, name, entry) in snap.entries {
            let dir = s
                .dirs
                .get_mut(&parent)
                .ok_or(MetaError::Invalid(Cow::Borrowed(
                    "entry in a missing directory",
                )))?;
            if !s.inodes.contains_key(&entry.ino) {
                return Err(MetaError::Invalid(Cow::Borrowed(
                    "entry for a missing inode",
                )));
            }
            dir.by_cookie.insert((entry.cookie, name.clone()));
            dir.by_name.insert(name, entry);
        }
        if !s.inodes.contains_key(&ResourceId::ROOT) {
            return Err(MetaError::Invalid(Cow::Borrowed("no root directory")));
        }
        Ok(s)
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut entries = Vec::new();
        for (parent, dir) in &self.dirs {
            for (name, e) in &dir.by_name {
                entries.push((*parent, name.clone(), *e));
            }
        }
        Snapshot {
            inodes: self.inodes.values().cloned().collect(),
            entries,
            space: self.space.clone(),
            versions: self.versions.iter().map(|(k, v)| (*k, v.clone())).collect(),
            trash: self.trash.iter().map(|(k, v)| (*k, v.clone())).collect(),
        }
    }

    /// Serializes exactly as `self.snapshot()` would, without copying the
    /// state first: a snapshot of a large namespace is written straight to
    /// its file.
    pub fn snapshot_view(&self) -> SnapshotView<'_> {
        SnapshotView(self)
    }

    /// Everything changed since the last call, as storage needs it.
    pub fn take_changes(&mut self) -> Changes {
        let c = self.take_changes_keep_undo();
        self.forget_undo();
        c
    }

    /// Like `take_changes`, but keeps what is needed to `rollback` until
    /// `forget_undo`: for callers that persist and may fail.
    pub fn take_changes_keep_undo(&mut self) -> Changes {
        let inodes = std::mem::take(&mut self.dirty_inodes)
            .into_iter()
            .map(|id| (id, self.inodes.get(&id).cloned()))
            .collect();
        let entries = std::mem::take(&mut self.dirty_entries)
            .into_iter()
            .map(|(p, n)| {
                let e = self.dirs.get(&p).and_then(|d| d.by_name.get(&n)).copied();
                (p, n, e)
            })
            .collect();
        let mut chunk_deltas = std::mem::take(&mut self.chunk_deltas);
        chunk_deltas.retain(|_, d| *d != 0);
        let space = std::mem::take(&mut self.dirty_space).then(|| self.space.clone());
        let versions = std::mem::take(&mut self.dirty_versions)
            .into_iter()
            .map(|k| (k, self.versions.get(&k).cloned()))
            .collect();
        let trash = std::mem::take(&mut self.dirty_trash)
            .into_iter()
            .map(|k| (k, self.trash.get(&k).cloned()))
            .collect();
        Changes {
            inodes,
            entries,
            chunk_deltas,
            space,
            versions,
            trash,
        }
    }

    /// The persisted state is authoritative again: drop the undo record.
    pub fn forget_undo(&mut self) {
        self.undo = Undo::default();
    }

    /// Takes back every change since the last `take_changes`/`forget_undo`.
    pub fn rollback(&mut self) {
        let undo = std::mem::take(&mut self.undo);
        for (id, old) in undo.dirs {
            match old {
                Some(d) => {
                    self.dirs.insert(id, d);
                }
                None => {
                    self.dirs.remove(&id);
                }
            }
        }
        for (id, old) in undo.inodes {
            match old {
                Some(i) => {
                    self.inodes.insert(id, i);
                }
                None => {
                    self.inodes.remove(&id);
                }
            }
        }
        for ((parent, name), old) in undo.entries {
            if let Some(d) = self.dirs.get_mut(&parent) {
                if let Some(cur) = d.by_name.remove(&name) {
                    d.by_cookie.remove(&(cur.cookie, name.clone()));
                }
                if let Some(e) = old {
                    d.by_cookie.insert((e.cookie, name.clone()));
                    d.by_name.insert(name, e);
                }
            }
        }
        if let Some(n) = undo.space {
            self.space = n;
        }
        for (k, old) in undo.versions {
            match old {
                Some(v) => self.versions.insert(k, v),
                None => self.versions.remove(&k),
            };
        }
        for (k, old) in undo.trash {
            match old {
                Some(t) => self.trash.insert(k, t),
                None => self.trash.remove(&k),
            };
        }
        self.clear_dirty();
    }

    fn clear_dirty(&mut self) {
        self.dirty_inodes.clear();
        self.dirty_entries.clear();
        self.dirty_versions.clear();
        self.dirty_trash.clear();
        self.chunk_deltas.clear();
        self.dirty_space = false;
    }

    /// Starts a change that may have to be taken back alone, on top of
    /// speculative changes applied before it (an authority's local changes
    /// not yet committed through Raft). The undo record kept so far (the
    /// committed values of everything the earlier changes touched) is set
    /// aside; `keep` merges the new change into it, `undo_to` takes back
    /// only the new change.
    pub fn savepoint(&mut self) -> Savepoint {
        Savepoint(std::mem::take(&mut self.undo))
    }

    /// Keeps what was applied since `sp` as speculative: nothing of it is
    /// to be persisted as committed state, and `rollback` takes it back
    /// together with everything speculative before it.
    pub fn keep(&mut self, sp: Savepoint) {
        let mut outer = sp.0;
        outer.absorb(std::mem::take(&mut self.undo));
        self.undo = outer;
        self.clear_dirty();
    }

    /// Takes back what was applied since `sp`, keeping what came before.
    pub fn undo_to(&mut self, sp: Savepoint) {
        self.rollback();
        self.undo = sp.0;
    }

    /// Whether speculative (or unpersisted) changes are applied.
    pub fn has_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    /// Writes values another device's authority produced (a change it
    /// applied and has not yet committed, or its current state of a
    /// resource), as they are: its own rules decided them. Recorded like
    /// any change (for `rollback`/`keep`); no chunk reference changes (the
    /// committed state owns those). An entry whose directory is not here
    /// is skipped.
    pub fn install(&mut self, fx: &Effects) {
        for (id, inode) in &fx.inodes {
            self.save_inode(*id);
            match inode {
                Some(i) => {
                    if i.kind == Kind::Dir && !self.dirs.contains_key(id) {
                        self.save_dir(*id);
                        self.dirs.insert(*id, DirEntries::default());
                    }
                    self.inodes.insert(*id, i.clone());
                }
                None => {
                    self.save_dir(*id);
                    self.inodes.remove(id);
                    self.dirs.remove(id);
                }
            }
            self.dirty_inodes.insert(*id);
        }
        for (parent, name, entry) in &fx.entries {
            if !self.dirs.contains_key(parent) {
                continue;
            }
            self.save_entry(*parent, name);
            if let Some(d) = self.dirs.get_mut(parent) {
                if let Some(old) = d.by_name.remove(name) {
                    d.by_cookie.remove(&(old.cookie, name.clone()));
                }
                if let Some(e) = entry {
                    d.by_cookie.insert((e.cookie, name.clone()));
                    d.by_name.insert(name.clone(), *e);
                }
            }
            self.dirty_entries.insert((*parent, name.clone()));
        }
    }

    fn save_inode(&mut self, id: ResourceId) {
        if !self.undo.inodes.contains_key(&id) {
            let old = self.inodes.get(&id).cloned();
            self.undo.inodes.insert(id, old);
        }
    }

    fn save_entry(&mut self, parent: ResourceId, name: &[u8]) {
        let key = (parent, name.to_vec());
        if !self.undo.entries.contains_key(&key) {
            let old = self
                .dirs
                .get(&parent)
                .and_then(|d| d.by_name.get(name))
                .copied();
            self.undo.entries.insert(key, old);
        }
    }

    /// Writes (or with `None` deletes) an old version, recorded for undo.
    fn put_version(&mut self, key: (ResourceId, VersionId), v: Option<OldVersion>) {
        let old = match v {
            Some(v) => self.versions.insert(key, v),
            None => self.versions.remove(&key),
        };
        self.undo.versions.entry(key).or_insert(old);
        self.dirty_versions.insert(key);
    }

    /// Writes (or with `None` deletes) a trash record, recorded for undo.
    fn put_trash(&mut self, ino: ResourceId, t: Option<Trashed>) {
        let old = match t {
            Some(t) => self.trash.insert(ino, t),
            None => self.trash.remove(&ino),
        };
        self.undo.trash.entry(ino).or_insert(old);
        self.dirty_trash.insert(ino);
    }

    fn save_dir(&mut self, id: ResourceId) {
        if !self.undo.dirs.contains_key(&id) {
            let old = self.dirs.get(&id).cloned();
            self.undo.dirs.insert(id, old);
        }
    }

    pub fn get(&self, ino: ResourceId) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn lookup(&self, parent: ResourceId, name: &[u8]) -> R<&Inode> {
        // The kernel looks a name up before it unlinks, renames, links or
        // changes the attributes of what it names: a name no directory can
        // hold is ENAMETOOLONG there too, not ENOENT.
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        let dir = self.dir(parent)?;
        let e = dir.by_name.get(name).ok_or(MetaError::NotFound)?;
        self.inodes.get(&e.ino).ok_or(MetaError::NotFound)
    }

    /// The entry `name` of directory `parent`, if any.
    pub fn entry(&self, parent: ResourceId, name: &[u8]) -> Option<Entry> {
        self.dirs.get(&parent)?.by_name.get(name).copied()
    }

    /// Entries of a directory after `cookie` (exclusive), in cookie order.
    pub fn entries_after(
        &self,
        dir: ResourceId,
        cookie: u64,
    ) -> R<impl Iterator<Item = (u64, &Name, &Entry)>> {
        let d = self.dir(dir)?;
        Ok(d.by_cookie
            .range((cookie.saturating_add(1), Vec::new())..)
            .filter_map(move |(c, n)| d.by_name.get(n).map(|e| (*c, n, e))))
    }

    /// Every regular file, once each (hard links included once), with one
    /// of its names: what availability broadcasts describe.
    pub fn files(&self) -> Vec<(&Inode, &Name)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for d in self.dirs.values() {
            for (name, e) in &d.by_name {
                if e.kind == Kind::File && seen.insert(e.ino) {
                    if let Some(i) = self.inodes.get(&e.ino) {
                        out.push((i, name));
                    }
                }
            }
        }
        out
    }

    /// Every regular file in the subtree at `root` (`root` itself when it
    /// is a file), each once: what a pin keeps on a device.
    pub fn subtree_files(&self, root: ResourceId) -> Vec<ResourceId> {
        let mut out = Vec::new();
        match self.inodes.get(&root).map(|i| i.kind) {
            Some(Kind::File) => return vec![root],
            Some(Kind::Dir) => {}
            _ => return out,
        }
        let mut seen = std::collections::HashSet::new();
        let mut queue = std::collections::VecDeque::from([root]);
        while let Some(dir) = queue.pop_front() {
            let Some(d) = self.dirs.get(&dir) else {
                continue;
            };
            for e in d.by_name.values() {
                match e.kind {
                    Kind::Dir => queue.push_back(e.ino),
                    Kind::File if seen.insert(e.ino) => out.push(e.ino),
                    _ => {}
                }
            }
        }
        out
    }

    /// One path (from the root, '/'-separated, lossy UTF-8) of every
    /// reachable inode: the access log's exporter names resources with it.
    pub fn paths(&self) -> std::collections::HashMap<ResourceId, String> {
        let mut out = std::collections::HashMap::new();
        out.insert(ResourceId::ROOT, "/".to_string());
        let mut queue = std::collections::VecDeque::from([(ResourceId::ROOT, String::new())]);
        while let Some((dir, prefix)) = queue.pop_front() {
            let Some(d) = self.dirs.get(&dir) else {
                continue;
            };
            for (name, e) in &d.by_name {
                if out.contains_key(&e.ino) {
                    continue;
                }
                let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
                if e.kind == Kind::Dir {
                    queue.push_back((e.ino, path.clone()));
                }
                out.insert(e.ino, path);
            }
        }
        out
    }

    /// The inode allocator.
    pub fn space(&self) -> &InoSpace {
        &self.space
    }

    /// Who governs `ino`, if it exists.
    pub fn authority(&self, ino: ResourceId) -> Option<Authority> {
        self.inodes.get(&ino).map(|i| i.authority)
    }

    /// Who must agree to `cmd`, by the ownership rule: the authority of a
    /// directory decides its entries, the authority of a file its content
    /// and attributes. A removal or rename that also decides about a
    /// directory governed elsewhere (removing it, replacing it, moving
    /// between directories) needs every authority involved.
    pub fn governance(&self, cmd: &FsCommand) -> R<Governance> {
        let auth = |ino: ResourceId| self.inode(ino).map(|i| i.authority.device);
        let one_or_several = |mut devs: Vec<DeviceId>| {
            devs.sort();
            devs.dedup();
            if devs.len() == 1 {
                Governance::One(devs[0])
            } else {
                Governance::Several(devs)
            }
        };
        Ok(match cmd {
            FsCommand::Create { parent, .. } | FsCommand::Link { parent, .. } => {
                Governance::One(auth(*parent)?)
            }
            FsCommand::Unlink { parent, .. } => Governance::One(auth(*parent)?),
            FsCommand::Rmdir { .. } | FsCommand::Rename { .. } => {
                let devs = self
                    .involved(cmd)
                    .into_iter()
                    .map(auth)
                    .collect::<R<Vec<_>>>()?;
                one_or_several(devs)
            }
            FsCommand::SetAttr { ino, .. }
            | FsCommand::SetXattr { ino, .. }
            | FsCommand::RemoveXattr { ino, .. }
            | FsCommand::CommitVersion { ino, .. } => Governance::One(auth(*ino)?),
            // An unlinked inode is freed by its authority, which knows
            // whether its own programs still hold it open; one already gone
            // is nobody's (the command does nothing).
            FsCommand::Reclaim { ino } => match self.inodes.get(ino) {
                Some(i) => Governance::One(i.authority.device),
                None => Governance::Anyone,
            },
            FsCommand::ReclaimOrphans => Governance::Anyone,
            FsCommand::ReserveInodes { .. }
            | FsCommand::SetAuthority { .. }
            | FsCommand::DropVersions { .. } => Governance::Cluster,
        })
    }

    /// The resources whose authorities decide a removal or rename: the
    /// directories whose entries change, a directory removed (its entries
    /// must be none) and one replaced (likewise). Empty for other commands.
    /// A change spanning several authorities seals these at each of them
    /// while it is committed.
    pub fn involved(&self, cmd: &FsCommand) -> Vec<ResourceId> {
        let mut out = Vec::new();
        match cmd {
            FsCommand::Rmdir { parent, name, .. } => {
                out.push(*parent);
                if let Ok(child) = self.lookup(*parent, name) {
                    out.push(child.id);
                }
            }
            FsCommand::Rename {
                parent,
                new_parent,
                new_name,
                mode,
                ..
            } => {
                out.push(*parent);
                out.push(*new_parent);
                if *mode != RenameMode::Exchange {
                    if let Ok(i) = self.lookup(*new_parent, new_name) {
                        if i.kind == Kind::Dir {
                            out.push(i.id);
                        }
                    }
                }
            }
            _ => {}
        }
        out.sort();
        out.dedup();
        out
    }

    /// Every resource `device` governs: id, authority, and whether it is a
    /// file with stored content (which only a holder of that content
    /// should take over).
    pub fn governed_by(&self, device: DeviceId) -> Vec<(ResourceId, Authority, bool)> {
        self.inodes
            .values()
            .filter(|i| i.authority.device == device)
            .map(|i| {
                let content = i
                    .content
                    .as_ref()
                    .is_some_and(|c| c.chunks.iter().any(|ch| !ch.hash.is_zero_run()));
                (i.id, i.authority, content)
            })
            .collect()
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Every chunk referenced by the namespace, with its expected count.
    pub fn chunk_references(&self) -> BTreeMap<ChunkHash, u64> {
        let mut refs = BTreeMap::new();
        let old = self.versions.values().map(|v| &v.content);
        for c in self
            .inodes
            .values()
            .filter_map(|i| i.content.as_ref())
            .chain(old)
        {
            for ch in c.stored_chunks() {
                *refs.entry(ch.hash).or_insert(0) += 1;
            }
        }
        refs
    }

    /// The kept old versions of `ino`, oldest first.
    pub fn old_versions(
        &self,
        ino: ResourceId,
    ) -> impl DoubleEndedIterator<Item = (&VersionId, &OldVersion)> {
        self.versions
            .range((ino, VersionId(0))..=(ino, VersionId(u64::MAX)))
            .map(|((_, v), o)| (v, o))
    }

    /// Every kept old version, by (file, version).
    pub fn all_old_versions(&self) -> &BTreeMap<(ResourceId, VersionId), OldVersion> {
        &self.versions
    }

    /// Every trashed file, by its old inode number.
    pub fn trash(&self) -> &BTreeMap<ResourceId, Trashed> {
        &self.trash
    }

    /// Unlinked inodes still present (kept for open handles).
    pub fn orphans(&self) -> Vec<ResourceId> {
        self.inodes
            .values()
            .filter(|i| i.nlink == 0)
            .map(|i| i.id)
            .collect()
    }

    /// Applies one command as the device that governs the root (a
    /// namespace of one device, and tests). On error nothing changed.
    pub fn apply(&mut self, mut cmd: FsCommand) -> R<Outcome> {
        let root = self.inode(ResourceId::ROOT)?.authority.device;
        self.apply_by(By::device(root), &mut cmd)
    }

    /// Applies one command decided by `by.applier` for `by.origin`. A
    /// `Create` with inode 0 gets a number from the applier's block, written
    /// into `cmd` so that the command can be logged and replayed as applied.
    /// Ownership is not checked here (`governance` says who decides). On
    /// error nothing changed.
    pub fn apply_by(&mut self, by: By, cmd: &mut FsCommand) -> R<Outcome> {
        if let FsCommand::Create { ino, .. } = cmd {
            if ino.0 == 0 {
                *ino = self.next_free_ino(by.applier)?;
            }
        }
        match cmd.clone() {
            FsCommand::Create {
                parent,
                name,
                ino,
                node,
                perm,
                uid,
                gid,
                now,
            } => self.create(by, parent, name, ino, node, perm, uid, gid, now),
            FsCommand::Link {
                ino,
                parent,
                name,
                now,
            } => self.link(ino, parent, name, now),
            FsCommand::Unlink { parent, name, now } => self.remove(by, parent, name, false, now),
            FsCommand::Rmdir { parent, name, now } => self.remove(by, parent, name, true, now),
            FsCommand::Rename {
                parent,
                name,
                new_parent,
                new_name,
                mode,
                now,
            } => self.rename(by, parent, name, new_parent, new_name, mode, now),
            FsCommand::SetAttr {
                ino,
                perm,
                uid,
                gid,
                atime,
                mtime,
                now,
            } => {
                let mut inode = self.inode(ino)?.clone();
                if let Some(p) = perm {
                    inode.perm = p & 0o7777;
                }
                if let Some(u) = uid {
                    inode.uid = u;
                }
                if let Some(g) = gid {
                    inode.gid = g;
                }
                if let Some(a) = atime {
                    inode.atime = a;
                }
                if let Some(m) = mtime {
                    inode.mtime = m;
                }
                inode.ctime = now;
                self.put_inode(inode.clone());
                Ok(Outcome::Inode(Box::new(inode)))
            }
            FsCommand::SetXattr {
                ino,
                name,
                value,
                mode,
                now,
            } => {
                check_xattr_name(&name)?;
                if value.len() > XATTR_SIZE_MAX {
                    return Err(MetaError::AttrTooBig);
                }
                let mut inode = self.inode(ino)?.clone();
                let exists = inode.xattrs.contains_key(&name);
                match mode {
                    XattrMode::Create if exists => return Err(MetaError::Exists),
                    XattrMode::Replace if !exists => return Err(MetaError::NoAttr),
                    _ => {}
                }
                inode.xattrs.insert(name, value);
                inode.ctime = now;
                self.put_inode(inode);
                Ok(Outcome::Done)
            }
            FsCommand::RemoveXattr { ino, name, now } => {
                check_xattr_name(&name)?;
                let mut inode = self.inode(ino)?.clone();
                if inode.xattrs.remove(&name).is_none() {
                    return Err(MetaError::NoAttr);
                }
                inode.ctime = now;
                self.put_inode(inode);
                Ok(Outcome::Done)
            }
            FsCommand::CommitVersion {
                ino,
                size,
                chunks,
                mtime,
                author,
                now,
            } => {
                let mut inode = self.inode(ino)?.clone();
                match inode.kind {
                    Kind::File => {}
                    Kind::Dir => return Err(MetaError::IsDir),
                    _ => {
                        return Err(MetaError::Invalid(Cow::Borrowed(
                            "content for a non-regular file",
                        )))
                    }
                }
                check_chunk_list(&chunks, size)?;
                let old = inode.content.take().unwrap_or_default();
                let version = VersionId(old.version.0 + 1);
                // The replaced version is kept (its chunks stay referenced)
                // until the retention policy drops it; the empty version 0
                // of a new file is nothing to keep.
                self.keep_version(ino, old, inode.mtime, now);
                for c in chunks.iter().filter(|c| !c.hash.is_zero_run()) {
                    *self.chunk_deltas.entry(c.hash).or_insert(0) += 1;
                }
                inode.content = Some(Content {
                    version,
                    size,
                    chunks: Arc::new(chunks),
                    author: Some(author),
                    committed: now,
                });
                inode.mtime = mtime;
                inode.ctime = now;
                self.put_inode(inode.clone());
                Ok(Outcome::Inode(Box::new(inode)))
            }
            FsCommand::Reclaim { ino } => {
                if self.inodes.get(&ino).is_some_and(|i| i.nlink == 0) {
                    self.drop_inode(ino);
                }
                Ok(Outcome::Done)
            }
            FsCommand::ReclaimOrphans => {
                for ino in self.orphans() {
                    self.drop_inode(ino);
                }
                Ok(Outcome::Done)
            }
            FsCommand::ReserveInodes { device } => {
                self.reserve_block(device);
                Ok(Outcome::Done)
            }
            FsCommand::DropVersions { versions, trash } => {
                for key in versions {
                    self.drop_version(key);
                }
                for ino in trash {
                    if self.trash.contains_key(&ino) {
                        self.put_trash(ino, None);
                        let keys: Vec<_> = self
                            .versions
                            .range((ino, VersionId(0))..=(ino, VersionId(u64::MAX)))
                            .map(|(k, _)| *k)
                            .collect();
                        for key in keys {
                            self.drop_version(key);
                        }
                    }
                }
                Ok(Outcome::Done)
            }
            FsCommand::SetAuthority { moves } => {
                let mut moved = 0usize;
                for m in moves {
                    let Some(inode) = self.inodes.get(&m.ino) else {
                        continue;
                    };
                    if m.epoch <= inode.authority.epoch {
                        continue;
                    }
                    let mut inode = inode.clone();
                    inode.authority = Authority {
                        device: m.device,
                        epoch: m.epoch,
                    };
                    self.put_inode(inode);
                    moved += 1;
                }
                Ok(Outcome::Moved(moved))
            }
        }
    }

    /// The next unused number in `device`'s block.
    fn next_free_ino(&self, device: DeviceId) -> R<ResourceId> {
        let b = self.space.block_of(device).ok_or(MetaError::NoInodes)?;
        Ok(ResourceId(self.space.blocks[&b].next))
    }

    fn save_space(&mut self) {
        if self.undo.space.is_none() {
            self.undo.space = Some(self.space.clone());
        }
        self.dirty_space = true;
    }

    /// Gives `device` a new block (its first, or one more when its last is
    /// nearly used up).
    fn reserve_block(&mut self, device: DeviceId) {
        let roomy = self.space.block_of(device).is_some_and(|b| {
            let end = (b + 1).saturating_mul(BLOCK_SIZE);
            end - self.space.blocks[&b].next > BLOCK_SIZE / 4
        });
        if roomy {
            return;
        }
        self.save_space();
        let b = self.space.next_block;
        self.space.next_block += 1;
        let start = b.saturating_mul(BLOCK_SIZE).max(2);
        self.space.blocks.insert(
            b,
            Block {
                owner: device,
                next: start,
            },
        );
    }

    /// Takes `ino` for a new inode: it must lie in a block of the applier
    /// or of the origin (a change made tentatively on the origin while the
    /// authority was out of reach was numbered there) and not be in use.
    /// Numbers are not reused: each device hands out the numbers of its
    /// blocks once, in order (`next_free_ino`, from a view that includes
    /// its pending and tentative creates); a tentative create reintegrated
    /// late may come after a higher number of the same block.
    fn take_ino(&mut self, by: By, ino: ResourceId) -> R<()> {
        let b = ino.0 / BLOCK_SIZE;
        match self.space.blocks.get(&b) {
            Some(blk)
                if (blk.owner == by.applier || blk.owner == by.origin)
                    && ino.0 >= b.saturating_mul(BLOCK_SIZE).max(2) => {}
            _ => {
                return Err(MetaError::Invalid(Cow::Borrowed(
                    "inode number outside the applier's block",
                )))
            }
        }
        if self.inodes.contains_key(&ino) {
            return Err(MetaError::Exists);
        }
        self.save_space();
        if let Some(blk) = self.space.blocks.get_mut(&b) {
            blk.next = blk.next.max(ino.0 + 1);
        }
        Ok(())
    }

    /// Keeps `ino` of `device`'s block from being handed out (a tentative
    /// create that does not show now still owns its number).
    pub fn hold_ino(&mut self, device: DeviceId, ino: ResourceId) {
        let b = ino.0 / BLOCK_SIZE;
        let holds = self
            .space
            .blocks
            .get(&b)
            .is_some_and(|blk| blk.owner == device && ino.0 >= blk.next);
        if holds {
            self.save_space();
            if let Some(blk) = self.space.blocks.get_mut(&b) {
                blk.next = ino.0 + 1;
            }
        }
    }

    /// One name of `ino` (its parent directory and the name there), found
    /// by a scan of the directories: what a conflict copy of a file is
    /// placed beside.
    pub fn name_of(&self, ino: ResourceId) -> Option<(ResourceId, Name)> {
        if let Some(i) = self.inodes.get(&ino) {
            if i.kind == Kind::Dir {
                let p = self.dirs.get(&i.parent)?;
                return p
                    .by_name
                    .iter()
                    .find(|(_, e)| e.ino == ino)
                    .map(|(n, _)| (i.parent, n.clone()));
            }
        }
        self.dirs.iter().find_map(|(d, entries)| {
            entries
                .by_name
                .iter()
                .find(|(_, e)| e.ino == ino)
                .map(|(n, _)| (*d, n.clone()))
        })
    }

    // ---- commands ----

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        by: By,
        parent: ResourceId,
        name: Name,
        id: ResourceId,
        node: NewNode,
        perm: u16,
        uid: u32,
        gid: u32,
        now: Timestamp,
    ) -> R<Outcome> {
        check_name(&name)?;
        let p = self.live_dir_inode(parent)?.clone();
        if self.dir(parent)?.by_name.contains_key(&name) {
            return Err(MetaError::Exists);
        }
        let mut perm = perm & 0o7777;
        // BSD group semantics for setgid directories, as Linux does.
        let gid = if p.perm & libc::S_ISGID as u16 != 0 {
            if matches!(node, NewNode::Dir) {
                perm |= libc::S_ISGID as u16;
            }
            p.gid
        } else {
            gid
        };
        let (kind, rdev, target, content) = match node {
            NewNode::File => (Kind::File, 0, None, Some(Content::default())),
            NewNode::Dir => (Kind::Dir, 0, None, None),
            NewNode::Symlink { target } => {
                if target.is_empty() {
                    return Err(MetaError::NotFound);
                }
                if target.len() > SYMLINK_MAX {
                    return Err(MetaError::NameTooLong);
                }
                perm = 0o777;
                (Kind::Symlink, 0, Some(target), None)
            }
            NewNode::Fifo => (Kind::Fifo, 0, None, None),
            NewNode::Socket => (Kind::Socket, 0, None, None),
            NewNode::CharDev { rdev } => (Kind::CharDev, rdev, None, None),
            NewNode::BlockDev { rdev } => (Kind::BlockDev, rdev, None, None),
        };
        self.take_ino(by, id)?;
        let is_dir = kind == Kind::Dir;
        let inode = Inode {
            id,
            kind,
            perm,
            uid,
            gid,
            nlink: if is_dir { 2 } else { 1 },
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
            xattrs: BTreeMap::new(),
            target,
            content,
            next_cookie: FIRST_COOKIE,
            authority: Authority {
                device: by.origin,
                epoch: 1,
            },
        };
        if is_dir {
            self.save_dir(id);
            self.dirs.insert(id, DirEntries::default());
        }
        self.put_inode(inode.clone());
        self.insert_entry(parent, name, id, kind);
        let mut p = self.inode(parent)?.clone();
        if is_dir {
            p.nlink += 1;
        }
        p.mtime = now;
        p.ctime = now;
        self.put_inode(p);
        Ok(Outcome::Inode(Box::new(inode)))
    }

    fn link(
        &mut self,
        ino: ResourceId,
        parent: ResourceId,
        name: Name,
        now: Timestamp,
    ) -> R<Outcome> {
        check_name(&name)?;
        let mut inode = self.inode(ino)?.clone();
        if inode.kind == Kind::Dir {
            return Err(MetaError::NotPermitted);
        }
        if inode.nlink == 0 {
            return Err(MetaError::NotFound);
        }
        self.live_dir_inode(parent)?;
        if self.dir(parent)?.by_name.contains_key(&name) {
            return Err(MetaError::Exists);
        }
        if inode.nlink == u32::MAX {
            return Err(MetaError::TooManyLinks);
        }
        inode.nlink += 1;
        inode.ctime = now;
        self.put_inode(inode.clone());
        self.insert_entry(parent, name, ino, inode.kind);
        self.touch_dir(parent, now)?;
        Ok(Outcome::Inode(Box::new(inode)))
    }

    fn remove(
        &mut self,
        by: By,
        parent: ResourceId,
        name: Name,
        dir: bool,
        now: Timestamp,
    ) -> R<Outcome> {
        check_name(&name)?;
        let target = self.lookup(parent, &name)?.clone();
        match (dir, target.kind == Kind::Dir) {
            (true, false) => return Err(MetaError::NotDir),
            (false, true) => return Err(MetaError::IsDir),
            (true, true) => {
                if !self.dir(target.id)?.by_name.is_empty() {
                    return Err(MetaError::NotEmpty);
                }
            }
            (false, false) => {}
        }
        self.remove_entry(parent, &name);
        self.unref_inode(target.id, now)?;
        self.trash_if_gone(by, target.id, parent, &name, now);
        self.touch_dir(parent, now)?;
        Ok(Outcome::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        by: By,
        parent: ResourceId,
        name: Name,
        new_parent: ResourceId,
        new_name: Name,
        mode: RenameMode,
        now: Timestamp,
    ) -> R<Outcome> {
        check_name(&name)?;
        check_name(&new_name)?;
        let src = *self
            .dir(parent)?
            .by_name
            .get(&name)
            .ok_or(MetaError::NotFound)?;
        self.live_dir_inode(new_parent)?;
        let dst = self.dir(new_parent)?.by_name.get(&new_name).copied();
        if parent == new_parent && name == new_name {
            return match (mode, dst) {
                (RenameMode::NoReplace, _) => Err(MetaError::Exists),
                _ => Ok(Outcome::Done),
            };
        }
        if src.kind == Kind::Dir && self.is_ancestor_or_self(src.ino, new_parent) {
            return Err(MetaError::Invalid(Cow::Borrowed(
                "cannot move a directory into itself",
            )));
        }
        match mode {
            RenameMode::Exchange => {
                let dst = dst.ok_or(MetaError::NotFound)?;
                if dst.kind == Kind::Dir && self.is_ancestor_or_self(dst.ino, parent) {
                    return Err(MetaError::Invalid(Cow::Borrowed(
                        "cannot move a directory into itself",
                    )));
                }
                self.set_entry_ino(parent, &name, dst.ino, dst.kind);
                self.set_entry_ino(new_parent, &new_name, src.ino, src.kind);
                if parent != new_parent {
                    self.reparent(src.ino, parent, new_parent);
                    self.reparent(dst.ino, new_parent, parent);
                }
                self.touch_ctime(src.ino, now)?;
                self.touch_ctime(dst.ino, now)?;
            }
            RenameMode::NoReplace | RenameMode::Replace => {
                if let Some(dst) = dst {
                    if mode == RenameMode::NoReplace {
                        return Err(MetaError::Exists);
                    }
                    if dst.ino == src.ino {
                        // Two links to one inode: POSIX says do nothing.
                        return Ok(Outcome::Done);
                    }
                    match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                        (true, false) => return Err(MetaError::NotDir),
                        (false, true) => return Err(MetaError::IsDir),
                        (true, true) => {
                            if !self.dir(dst.ino)?.by_name.is_empty() {
                                return Err(MetaError::NotEmpty);
                            }
                        }
                        (false, false) => {}
                    }
                    self.remove_entry(new_parent, &new_name);
                    self.unref_inode(dst.ino, now)?;
                    self.trash_if_gone(by, dst.ino, new_parent, &new_name, now);
                }
                self.remove_entry(parent, &name);
                self.insert_entry(new_parent, new_name, src.ino, src.kind);
                if parent != new_parent {
                    self.reparent(src.ino, parent, new_parent);
                }
                self.touch_ctime(src.ino, now)?;
            }
        }
        self.touch_dir(parent, now)?;
        if new_parent != parent {
            self.touch_dir(new_parent, now)?;
        }
        Ok(Outcome::Done)
    }

    // ---- helpers ----

    fn inode(&self, ino: ResourceId) -> R<&Inode> {
        self.inodes.get(&ino).ok_or(MetaError::NotFound)
    }

    fn dir(&self, ino: ResourceId) -> R<&DirEntries> {
        match self.dirs.get(&ino) {
            Some(d) => Ok(d),
            None if self.inodes.contains_key(&ino) => Err(MetaError::NotDir),
            None => Err(MetaError::NotFound),
        }
    }

    /// A directory that can still receive entries (not removed).
    fn live_dir_inode(&self, ino: ResourceId) -> R<&Inode> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Dir {
            return Err(MetaError::NotDir);
        }
        if inode.nlink == 0 {
            return Err(MetaError::NotFound);
        }
        Ok(inode)
    }

    fn put_inode(&mut self, inode: Inode) {
        self.save_inode(inode.id);
        self.dirty_inodes.insert(inode.id);
        self.inodes.insert(inode.id, inode);
    }

    fn drop_inode(&mut self, ino: ResourceId) {
        self.save_inode(ino);
        self.save_dir(ino);
        if let Some(inode) = self.inodes.remove(&ino) {
            if let Some(c) = inode.content {
                // A trashed file's last version joins its old ones (the
                // references move with it); otherwise its chunks go.
                if self.trash.contains_key(&ino) {
                    let at = self.trash.get(&ino).map_or(inode.ctime, |t| t.deleted);
                    self.keep_version(ino, c, inode.mtime, at);
                } else {
                    for ch in c.stored_chunks() {
                        *self.chunk_deltas.entry(ch.hash).or_insert(0) -= 1;
                    }
                }
            }
            self.dirs.remove(&ino);
            self.dirty_inodes.insert(ino);
        }
    }

    /// Keeps `content`, replaced at `at`, as an old version of `ino` (its
    /// chunk references stay). Version 0 (a new file's empty content) is
    /// not kept.
    fn keep_version(&mut self, ino: ResourceId, content: Content, mtime: Timestamp, at: Timestamp) {
        if content.version.0 == 0 {
            for ch in content.stored_chunks() {
                *self.chunk_deltas.entry(ch.hash).or_insert(0) -= 1;
            }
            return;
        }
        let key = (ino, content.version);
        self.put_version(
            key,
            Some(OldVersion {
                content,
                mtime,
                superseded: at,
            }),
        );
    }

    /// Forgets one old version and releases its chunks.
    fn drop_version(&mut self, key: (ResourceId, VersionId)) {
        if let Some(v) = self.versions.get(&key) {
            for ch in v.content.stored_chunks() {
                *self.chunk_deltas.entry(ch.hash).or_insert(0) -= 1;
            }
            self.put_version(key, None);
        }
    }

    /// Puts a regular file whose last name just went (`unlink`, or a
    /// rename over it) in the trash, as it was at `name` in `dir`.
    fn trash_if_gone(
        &mut self,
        by: By,
        ino: ResourceId,
        dir: ResourceId,
        name: &[u8],
        now: Timestamp,
    ) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if i.kind != Kind::File || i.nlink > 0 {
            return;
        }
        // `dir` just lost an entry, so it is reachable; the bare name is a
        // fallback for a damaged parent chain.
        let path = self.path_in(dir, name).unwrap_or_else(|| {
            let mut p = b"/".to_vec();
            p.extend_from_slice(name);
            p
        });
        let t = Trashed {
            path,
            deleted: now,
            by: by.origin,
            perm: i.perm,
            uid: i.uid,
            gid: i.gid,
        };
        self.put_trash(ino, Some(t));
    }

    /// The path from the root of `name` in directory `dir` ("/a/b/name"),
    /// found by walking up the directories' parents (`name_of` each);
    /// `None` when `dir` is not reachable from the root.
    pub fn path_in(&self, dir: ResourceId, name: &[u8]) -> Option<Vec<u8>> {
        let mut parts: Vec<Name> = vec![name.to_vec()];
        let mut d = dir;
        // Bounded by the depth of the tree; the bound guards against a
        // damaged parent chain.
        for _ in 0..4096 {
            if d == ResourceId::ROOT {
                let mut out = Vec::new();
                for p in parts.iter().rev() {
                    out.push(b'/');
                    out.extend_from_slice(p);
                }
                return Some(out);
            }
            let (parent, n) = self.name_of(d)?;
            parts.push(n);
            d = parent;
        }
        None
    }

    /// The inode at `path` ("/a/b", from the root), symlinks not followed.
    pub fn resolve(&self, path: &[u8]) -> Option<ResourceId> {
        let mut ino = ResourceId::ROOT;
        for part in path.split(|b| *b == b'/').filter(|p| !p.is_empty()) {
            ino = self.lookup(ino, part).ok()?.id;
        }
        Some(ino)
    }

    fn insert_entry(&mut self, parent: ResourceId, name: Name, ino: ResourceId, kind: Kind) {
        self.save_inode(parent);
        self.save_entry(parent, &name);
        let cookie = match self.inodes.get_mut(&parent) {
            Some(p) => {
                let c = p.next_cookie;
                p.next_cookie += 1;
                self.dirty_inodes.insert(parent);
                c
            }
            None => return,
        };
        if let Some(d) = self.dirs.get_mut(&parent) {
            d.by_cookie.insert((cookie, name.clone()));
            d.by_name.insert(name.clone(), Entry { ino, cookie, kind });
            self.dirty_entries.insert((parent, name));
        }
    }

    fn set_entry_ino(&mut self, parent: ResourceId, name: &[u8], ino: ResourceId, kind: Kind) {
        self.save_entry(parent, name);
        if let Some(e) = self
            .dirs
            .get_mut(&parent)
            .and_then(|d| d.by_name.get_mut(name))
        {
            e.ino = ino;
            e.kind = kind;
            self.dirty_entries.insert((parent, name.to_vec()));
        }
    }

    fn remove_entry(&mut self, parent: ResourceId, name: &[u8]) {
        self.save_entry(parent, name);
        if let Some(d) = self.dirs.get_mut(&parent) {
            if let Some(e) = d.by_name.remove(name) {
                d.by_cookie.remove(&(e.cookie, name.to_vec()));
                self.dirty_entries.insert((parent, name.to_vec()));
            }
        }
    }

    /// One link to `ino` went away. Directories lose their parent's link too.
    /// An inode at nlink 0 stays until `Reclaim`: it may still be open.
    fn unref_inode(&mut self, ino: ResourceId, now: Timestamp) -> R<()> {
        let mut inode = self.inode(ino)?.clone();
        if inode.kind == Kind::Dir {
            inode.nlink = 0;
            let mut p = self.inode(inode.parent)?.clone();
            p.nlink = p.nlink.saturating_sub(1);
            self.put_inode(p);
        } else {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        inode.ctime = now;
        self.put_inode(inode);
        Ok(())
    }

    fn reparent(&mut self, ino: ResourceId, old: ResourceId, new: ResourceId) {
        let is_dir = self.inodes.get(&ino).is_some_and(|i| i.kind == Kind::Dir);
        if !is_dir {
            return;
        }
        if let Some(i) = self.inodes.get(&ino) {
            let mut i = i.clone();
            i.parent = new;
            self.put_inode(i);
        }
        if let Some(o) = self.inodes.get(&old) {
            let mut o = o.clone();
            o.nlink = o.nlink.saturating_sub(1);
            self.put_inode(o);
        }
        if let Some(n) = self.inodes.get(&new) {
            let mut n = n.clone();
            n.nlink += 1;
            self.put_inode(n);
        }
    }

    fn touch_dir(&mut self, dir: ResourceId, now: Timestamp) -> R<()> {
        let mut d = self.inode(dir)?.clone();
        d.mtime = now;
        d.ctime = now;
        self.put_inode(d);
        Ok(())
    }

    fn touch_ctime(&mut self, ino: ResourceId, now: Timestamp) -> R<()> {
        let mut i = self.inode(ino)?.clone();
        i.ctime = now;
        self.put_inode(i);
        Ok(())
    }

    /// Whether `dir` is `anc` or lies below it.
    fn is_ancestor_or_self(&self, anc: ResourceId, mut dir: ResourceId) -> bool {
        // Bounded by the number of inodes: a corrupt parent chain cannot spin.
        for _ in 0..=self.inodes.len() {
            if dir == anc {
                return true;
            }
            if dir == ResourceId::ROOT {
                return false;
            }
            match self.inodes.get(&dir) {
                Some(i) => dir = i.parent,
                None => return false,
            }
        }
        false
    }
}

/// Cookies 1 and 2 are `.` and `..` in readdir.
pub const FIRST_COOKIE: u64 = 3;

fn check_name(name: &[u8]) -> R<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(MetaError::Invalid(Cow::Borrowed("bad name")));
    }
    Ok(())
}

fn check_xattr_name(name: &[u8]) -> R<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(MetaError::AttrRange);
    }
    Ok(())
}

fn check_chunk_list(chunks: &[ChunkRef], size: u64) -> R<()> {
    let mut at = 0u64;
    for c in chunks {
        if c.offset != at || c.len == 0 {
            return Err(MetaError::Invalid(Cow::Borrowed(
                "chunk list is not contiguous",
            )));
        }
        at = at
            .checked_add(c.len as u64)
            .ok_or(MetaError::Invalid(Cow::Borrowed("chunk list overflows")))?;
    }
    if at != size {
        return Err(MetaError::Invalid(Cow::Borrowed(
            "chunk list does not cover the size",
        )));
    }
    Ok(())
}
