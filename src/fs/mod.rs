//! Filesystem semantics, free of fuser: handles, per-file write spills,
//! the read path, close-to-open commits and orphan reclamation. `fuse/`
//! translates kernel requests into calls here; tests call it directly.
//!
//! Lock order: an open file's lock may be held while taking the namespace
//! lock, never the other way round.

mod content;
mod cutter;
pub mod history;
pub mod passthrough;
mod spill;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::lock;

use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};
use crate::meta::{
    FsCommand, Inode, Kind, MetaError, MetaState, Name, NewNode, Outcome, RenameMode, Timestamp,
    XattrMode,
};
use crate::storage::{StorageError, Store};

pub use content::ChunkReads;
pub use content::ChunkSizes;
use content::{read_content, read_merged, ChunkCache};
use spill::Spill;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkHash),
    #[error("bad file handle")]
    BadHandle,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("operation not supported")]
    NotSupported,
    #[error("permission denied")]
    Access,
    #[error("file too large")]
    TooBig,
    /// The change could not be committed by the mesh (no leader, no quorum).
    #[error("mesh unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, FsError>;

/// Who is asking: the calling process's credentials.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
}

/// Attributes as the kernel wants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: ResourceId,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

impl Attr {
    fn of(i: &Inode) -> Self {
        let size = i.size();
        // Holes (zero runs) take no space, so `du` and `cp --sparse` see a
        // sparse file as one.
        let stored = match (&i.kind, &i.content) {
            (Kind::File, Some(c)) => content::data_bytes(c),
            (Kind::File, None) => 0,
            _ => size,
        };
        Attr {
            ino: i.id,
            kind: i.kind,
            size,
            blocks: stored.div_ceil(512),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.crtime,
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
        }
    }
}

/// A change of attributes requested by setattr.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// One directory entry for readdir.
#[derive(Debug, Clone)]
pub struct DirItem {
    pub ino: ResourceId,
    /// The offset to resume after this entry.
    pub offset: u64,
    pub kind: Kind,
    pub name: Name,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    /// The unit of `blocks`, `bfree` and `bavail`.
    pub frsize: u32,
    pub namelen: u32,
}

/// Settings the filesystem needs from Config.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub device: DeviceId,
    pub spill_dir: PathBuf,
    pub chunk_sizes: ChunkSizes,
    pub sync_on_close: bool,
    pub read_only: bool,
    /// The namespace is replicated: changes go through a `Replicator`
    /// (authority and Raft), and nothing is changed locally at start-up.
    pub replicated: bool,
    /// Where backing files for FUSE passthrough go; `None`: no passthrough.
    pub passthrough: Option<passthrough::Options>,
}

/// What `open` tells the kernel.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The kernel's cached pages of this file are still the current version.
    pub keep_cache: bool,
    /// Read (and written) straight from this backing file (FUSE
    /// passthrough).
    pub passthrough: Option<Arc<passthrough::Backing>>,
}

impl Opened {
    /// A handle read through the daemon and the page cache.
    pub fn cached(fh: u64, keep_cache: bool) -> Self {
        Opened {
            fh,
            keep_cache,
            passthrough: None,
        }
    }
}

/// Counters for `meshfs status`.
#[derive(Debug, Default, serde::Serialize, Clone, Copy)]
pub struct FsStats {
    pub commits: u64,
    /// Chunks read through the mount: from the store here, fetched ahead,
    /// fetched while the reader waited.
    pub chunk_reads: [u64; 3],
    pub rechunked_bytes: u64,
    pub open_files: u64,
    pub passthrough: passthrough::Stats,
}

#[derive(Debug)]
struct OpenFile {
    handles: usize,
    /// `open_file` calls not yet matched by `release_open_file` (a handle
    /// holds one until its release). Counted under the map's lock, so the
    /// record cannot leave the map between an open finding it and counting
    /// its handle: two records of one inode would each keep a spill, and
    /// the later commit could be the earlier write (the history checker
    /// read an older version after a newer close that way).
    holders: usize,
    spill: Option<Spill>,
    cache: Arc<ChunkCache>,
    /// How the kernel has the file open (passthrough and page cache never
    /// at once).
    io: passthrough::IoState,
}

#[derive(Debug, Clone)]
struct Handle {
    ino: ResourceId,
    file: Arc<Mutex<OpenFile>>,
    append: bool,
    writable: bool,
    mode: passthrough::Mode,
    /// Set until the handle's first read, which reports whether the file was
    /// already here (the prefetcher's hit or miss).
    unread: Arc<std::sync::atomic::AtomicBool>,
}

pub struct Fs {
    store: Arc<dyn Store>,
    /// Chunking workers of streamed files running now (`cutter`).
    chunkers: Arc<std::sync::atomic::AtomicUsize>,
    /// Shared with the Raft state machine, which applies replicated changes.
    meta: Arc<RwLock<MetaState>>,
    opts: FsOptions,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// The read-only tree of old versions at `/.meshfs` (`history`).
    virt: Mutex<history::Virtual>,
    open: Mutex<HashMap<ResourceId, Arc<Mutex<OpenFile>>>>,
    lookups: Mutex<HashMap<ResourceId, u64>>,
    /// The version of each file whose pages the kernel may hold.
    kernel_versions: Mutex<HashMap<ResourceId, VersionId>>,
    commits: AtomicU64,
    rechunked: AtomicU64,
    /// Chunks read through the mount, by where they came from.
    chunk_reads: Arc<ChunkReads>,
    spill_seq: AtomicU64,
    /// Called after every namespace change (the mesh announces holdings).
    on_change: std::sync::OnceLock<Arc<dyn Fn() + Send + Sync>>,
    /// Where reads get chunks this device lacks or holds damaged.
    remote: std::sync::OnceLock<Arc<dyn RemoteChunks>>,
    /// Consensus on namespace changes, when the mesh has it.
    replica: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// Tells the kernel to drop cached names and attributes.
    invalidate: std::sync::OnceLock<Arc<dyn Fn(Invalidate) + Send + Sync>>,
    /// Tells the kernel, synchronously, that a file's cached attributes
    /// are stale (safe from a request thread: it takes no inode lock).
    stale_attrs: std::sync::OnceLock<Arc<dyn Fn(ResourceId) + Send + Sync>>,
    /// When each file was last opened here (cache eviction is LRU by file).
    last_open: Mutex<HashMap<ResourceId, std::time::Instant>>,
    /// Where opens and first reads are reported (the access log).
    access: std::sync::OnceLock<Arc<dyn AccessSink>>,
    /// What the read-only `user.meshfs.*` xattrs show (`meshfs stat`).
    stat: std::sync::OnceLock<StatFn>,
    /// Backing files for passthrough, when the options ask for them.
    backings: Option<Arc<passthrough::Backings>>,
}

/// The daemon's verified read path as a `passthrough::ReadFn` (what
/// backing copies are made from).
fn content_reader(store: Arc<dyn Store>, cache: Arc<ChunkCache>) -> passthrough::ReadFn {
    Arc::new(move |content, at, out| {
        read_content(&*store, &cache, content, at, out)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
}

/// A resource's `meshfs stat` as JSON, if it exists.
pub type StatFn = Arc<dyn Fn(ResourceId) -> Option<serde_json::Value> + Send + Sync>;

/// The prefix of the read-only xattrs that show `meshfs stat`.
const STAT_XATTR: &[u8] = b"user.meshfs.";

/// Receives every open through the mount and each handle's first read.
/// Called on kernel request threads: it must not block (the prefetch side
/// queues and drops rather than wait).
pub trait AccessSink: Send + Sync {
    fn opened(&self, ino: ResourceId, uid: u32, size: u64);
    /// The first read of a handle on a file with content; `local` when every
    /// chunk of it was already on this device.
    fn first_read(&self, ino: ResourceId, local: bool);
}

/// Something the kernel may have cached that another device changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidate {
    Entry { parent: ResourceId, name: Name },
    Inode(ResourceId),
}

/// Namespace changes across devices: authority and Raft. Blocking: called
/// from kernel request threads.
pub trait Replicator: Send + Sync {
    /// Makes `cmd` where it is decided: here at once when this device
    /// governs what it changes (committed through Raft in the background),
    /// else at the device that does, or through Raft when it spans several.
    /// Returns once the change is visible in the local namespace (which
    /// `Fs` reads).
    fn apply(&self, cmd: FsCommand) -> Result<Outcome>;
    /// Waits until every change applied here so far is committed through
    /// Raft, i.e. on a majority of devices (fsync).
    fn commit_wait(&self) -> Result<()>;
    /// Before an open of `ino`: waits (boundedly) until every change its
    /// authority acknowledged is applied here (close-to-open). True when
    /// the authority is another device (whose changes the kernel here may
    /// not know yet).
    fn open_barrier(&self, ino: ResourceId) -> bool;
    /// Before a listing of directory `dir` (opendir): waits (boundedly)
    /// until every change its authority acknowledged is applied here, so
    /// that names made elsewhere and closed are listed (close-to-open for
    /// directories). Never counts as use of `dir`.
    fn list_barrier(&self, dir: ResourceId);
    /// A lookup of `name` in `parent` found nothing: asks the directory's
    /// authority if that is another device. True when the lookup should be
    /// tried again.
    fn lookup_miss(&self, parent: ResourceId, name: &[u8]) -> bool;
    /// Frees the unlinked inode `ino`, which nothing on this device uses any
    /// more. Never blocks: the file's authority decides (it may still use
    /// it), reached in the background when it is another device.
    fn reclaim(&self, ino: ResourceId);
}

/// A read of chunk `at` of a committed version of file `ino`, with the
/// chunks after it (what a readahead may ask for).
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    pub ino: ResourceId,
    /// The version being read (holders of another version lack chunks).
    pub version: crate::ids::VersionId,
    pub at: usize,
    pub hash: ChunkHash,
    /// The version's chunks after `at`.
    pub next: &'a [crate::meta::ChunkRef],
}

/// A source of chunks beyond the local store (the mesh). Blocking: it is
/// called from the kernel request threads.
pub trait RemoteChunks: Send + Sync {
    /// The bytes of chunk `want.hash`, verified against it and stored
    /// locally. May start fetching the chunks after it too. Also returns
    /// the index whose read should call [`RemoteChunks::read_ahead`] even
    /// when it finds its chunk here (`usize::MAX`: none).
    fn fetch(&self, want: &Want) -> std::result::Result<(Vec<u8>, usize), String>;
    /// A read found chunk `want.at` here at the index [`RemoteChunks::fetch`]
    /// or an earlier call named: a sequential reader is about to run out of
    /// what was fetched ahead. Returns the next such index.
    fn read_ahead(&self, want: &Want) -> usize;
    /// Chunk `hash` if it was fetched ahead and is still held in memory
    /// (verified): taken, so the read skips the store.
    fn fetched_ahead(&self, hash: &ChunkHash) -> Option<Vec<u8>>;
}

impl Fs {
    /// Builds the filesystem over a loaded namespace. Unlinked inodes left by
    /// a previous run are reclaimed and stale spill files removed: nothing can
    /// still hold them open.
    pub fn new(store: Arc<dyn Store>, meta: MetaState, opts: FsOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.spill_dir)?;
        for e in std::fs::read_dir(&opts.spill_dir)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let meta = Arc::new(RwLock::new(meta));
        let backings = match &opts.passthrough {
            Some(p) => {
                let read = content_reader(store.clone(), Arc::new(ChunkCache::default()));
                // Copies of files deleted or replaced (meanwhile, or while
                // the daemon was down) go.
                let names = Arc::downgrade(&meta);
                let keep: passthrough::KeepFn = Arc::new(move |ino, digest| {
                    let Some(m) = names.upgrade() else {
                        return true;
                    };
                    let m = m.read().unwrap_or_else(|p| p.into_inner());
                    m.get(ino)
                        .and_then(|i| i.content.as_ref())
                        .is_some_and(|c| c.digest() == digest)
                });
                Some(passthrough::Backings::start(p.clone(), read, keep)?)
            }
            None => None,
        };
        let fs = Fs {
            store,
            chunkers: Default::default(),
            meta,
            opts,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            virt: Default::default(),
            open: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            kernel_versions: Mutex::new(HashMap::new()),
            commits: AtomicU64::new(0),
            rechunked: AtomicU64::new(0),
            chunk_reads: Arc::default(),
            spill_seq: AtomicU64::new(0),
            on_change: std::sync::OnceLock::new(),
            remote: std::sync::OnceLock::new(),
            replica: std::sync::OnceLock::new(),
            invalidate: std::sync::OnceLock::new(),
            stale_attrs: std::sync::OnceLock::new(),
            last_open: Mutex::new(HashMap::new()),
            access: std::sync::OnceLock::new(),
            stat: std::sync::OnceLock::new(),
            backings,
        };
        // With a replicated namespace, orphans are not ours to drop at
        // start-up: another device may hold them open.
        if !fs.opts.read_only && !fs.opts.replicated {
            fs.apply(FsCommand::ReclaimOrphans, true)?;
            // Best effort: leftover chunks waste space but harm nothing.
            match fs.store.collect_garbage() {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    chunks = n,
                    "collected unreferenced chunks left by an interrupted commit"
                ),
                Err(e) => tracing::warn!(error = %e, "could not collect unreferenced chunks"),
            }
        }
        Ok(fs)
    }

    fn read_meta(&self) -> std::sync::RwLockReadGuard<'_, MetaState> {
        match self.meta.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Applies one command and persists it; on a storage failure the
    /// in-memory state is rolled back so memory and disk never disagree.
    /// With a replica, the replica applies it where it is decided (here, as
    /// its authority, or at the device that governs it); with `sync`, it
    /// returns once the change is committed through Raft and the WAL synced.
    fn apply(&self, cmd: FsCommand, sync: bool) -> Result<Outcome> {
        if let Some(r) = self.replica.get() {
            let out = r.apply(cmd)?;
            if sync {
                r.commit_wait()?;
                self.store.sync()?;
            }
            if let Some(f) = self.on_change.get() {
                f();
            }
            return Ok(out);
        }
        let mut meta = match self.meta.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let out = match meta.apply(cmd) {
            Ok(o) => o,
            Err(e) => {
                meta.rollback();
                return Err(e.into());
            }
        };
        let changes = meta.take_changes_keep_undo();
        if let Err(e) = self.store.persist(&changes, false) {
            meta.rollback();
            tracing::warn!(error = %e, "could not persist a namespace change; rolled back");
            return Err(e.into());
        }
        meta.forget_undo();
        drop(meta);
        if sync {
            self.store.sync()?;
        }
        if let Some(f) = self.on_change.get() {
            f();
        }
        Ok(out)
    }

    /// Sets where reads fetch chunks missing or damaged here (once).
    pub fn set_remote(&self, r: Arc<dyn RemoteChunks>) {
        let _ = self.remote.set(r);
    }

    /// Routes namespace changes through consensus from now on (once).
    pub fn set_replica(&self, r: Arc<dyn Replicator>) {
        let _ = self.replica.set(r);
    }

    /// The namespace, for the Raft state machine to apply changes to.
    pub fn namespace(&self) -> Arc<RwLock<MetaState>> {
        self.meta.clone()
    }

    /// Sets what the `user.meshfs.*` xattrs show (once).
    pub fn set_stat(&self, f: StatFn) {
        let _ = self.stat.set(f);
    }

    /// Sets where opens and first reads are reported (once).
    pub fn set_access_sink(&self, sink: Arc<dyn AccessSink>) {
        let _ = self.access.set(sink);
    }

    /// `open` by user `uid` through the mount: also reported to the access
    /// log.
    pub fn open_as(&self, uid: u32, ino: ResourceId, flags: i32) -> Result<Opened> {
        if history::is_virtual(ino) {
            return self.virtual_open(ino, flags);
        }
        let opened = self.open(ino, flags)?;
        self.report_open(uid, ino);
        Ok(opened)
    }

    fn report_open(&self, uid: u32, ino: ResourceId) {
        if let Some(sink) = self.access.get() {
            let size = self
                .read_meta()
                .get(ino)
                .and_then(|i| i.content.as_ref().map(|c| c.size))
                .unwrap_or(0);
            sink.opened(ino, uid, size);
        }
    }

    /// Whether every chunk of the file's committed content is here.
    fn all_local(&self, content: &crate::meta::Content) -> bool {
        content
            .chunks
            .iter()
            .all(|c| c.hash.is_zero_run() || self.store.contains(&c.hash).unwrap_or(false))
    }

    /// Sets how the kernel is told of changes made elsewhere (once).
    pub fn set_invalidator(&self, f: Arc<dyn Fn(Invalidate) + Send + Sync>) {
        let _ = self.invalidate.set(f);
    }

    /// Sets how an open tells the kernel that a file's cached attributes
    /// are stale (once).
    pub fn set_stale_attrs(&self, f: Arc<dyn Fn(ResourceId) + Send + Sync>) {
        let _ = self.stale_attrs.set(f);
    }

    /// Changes another device made were applied here: the kernel's cached
    /// names and attributes of what they touched must go, so that the next
    /// lookup or stat sees them.
    pub fn changed_elsewhere(&self, changes: &crate::meta::Changes) {
        if let Some(f) = self.invalidate.get() {
            for (parent, name, _) in &changes.entries {
                f(Invalidate::Entry {
                    parent: *parent,
                    name: name.clone(),
                });
            }
            for (ino, _) in &changes.inodes {
                f(Invalidate::Inode(*ino));
            }
        }
        // An inode this device governs, unlinked by another device: freed
        // here if nothing here uses it (a reclaim asked for before the
        // unlink arrived, or a forget that came first, would leave it).
        let orphans: Vec<ResourceId> = {
            let meta = self.read_meta();
            changes
                .inodes
                .iter()
                .filter_map(|(ino, _)| meta.get(*ino))
                .filter(|i| i.nlink == 0 && i.authority.device == self.opts.device)
                .map(|i| i.id)
                .collect()
        };
        for ino in orphans {
            self.maybe_reclaim(ino);
        }
    }

    /// When each file was last opened on this device, and which are open
    /// now: what cache eviction must spare and in which order it goes.
    pub fn usage(
        &self,
    ) -> (
        HashMap<ResourceId, std::time::Instant>,
        std::collections::HashSet<ResourceId>,
    ) {
        let open = lock(&self.open).keys().copied().collect();
        (lock(&self.last_open).clone(), open)
    }

    /// The whole namespace was replaced (a Raft snapshot installed): the
    /// root's cached attributes and listing go at once.
    pub fn changed_everywhere(&self) {
        if let Some(f) = self.invalidate.get() {
            f(Invalidate::Inode(ResourceId::ROOT));
        }
    }

    /// Sets the hook run after every namespace change (once).
    pub fn set_on_change(&self, f: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.on_change.set(f);
    }

    fn mutate(&self, cmd: FsCommand) -> Result<Outcome> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        self.apply(cmd, false)
    }

    fn inode_attr(&self, out: Outcome) -> Result<Attr> {
        match out {
            Outcome::Inode(i) => Ok(self.overlay(Attr::of(&i))),
            Outcome::Done | Outcome::Moved(_) => Err(FsError::Io(std::io::Error::other(
                "command returned no inode",
            ))),
        }
    }

    /// Adds what open handles know and the namespace does not yet: the size
    /// and mtime of uncommitted writes.
    fn overlay(&self, mut attr: Attr) -> Attr {
        if attr.kind != Kind::File {
            return attr;
        }
        let file = lock(&self.open).get(&attr.ino).cloned();
        if let Some(f) = file {
            let f = lock(&f);
            if let Some(s) = &f.spill {
                attr.size = s.size;
                attr.blocks = s.size.div_ceil(512);
                attr.mtime = s.mtime;
                attr.ctime = attr.ctime.max(s.mtime);
            } else if let Some(pt) = f.io.pt.as_ref().filter(|p| p.holds.is_none()) {
                // Passthrough writers' bytes not committed yet: the backing
                // file says how long it is and when it changed.
                if let Ok(m) = pt.backing.file.metadata() {
                    attr.size = m.len();
                    attr.blocks = m.len().div_ceil(512);
                    if let Ok(t) = m.modified() {
                        let t = Timestamp::from_system(t);
                        attr.mtime = attr.mtime.max(t);
                        attr.ctime = attr.ctime.max(t);
                    }
                }
            }
        }
        attr
    }

    fn note_lookup_of(&self, ino: ResourceId) {
        *lock(&self.lookups).entry(ino).or_insert(0) += 1;
    }

    // ---- namespace ----

    pub fn lookup(&self, parent: ResourceId, name: &[u8]) -> Result<Attr> {
        if history::is_virtual(parent) || (parent == ResourceId::ROOT && name == history::META_DIR)
        {
            return self.virtual_lookup(parent, name);
        }
        let found = self.read_meta().lookup(parent, name).map(Attr::of);
        let attr = match (found, self.replica.get()) {
            // A name created elsewhere a moment ago must be found: ask the
            // directory's authority before saying it does not exist.
            (Err(MetaError::NotFound), Some(r)) if r.lookup_miss(parent, name) => {
                Attr::of(self.read_meta().lookup(parent, name)?)
            }
            (found, _) => found?,
        };
        self.note_lookup_of(attr.ino);
        Ok(self.overlay(attr))
    }

    /// Records a lookup the kernel made through readdirplus.
    pub fn note_lookup(&self, ino: ResourceId) {
        if history::is_virtual(ino) {
            return;
        }
        self.note_lookup_of(ino);
    }

    pub fn forget(&self, ino: ResourceId, n: u64) {
        if history::is_virtual(ino) {
            return;
        }
        let forgotten = {
            let mut l = lock(&self.lookups);
            match l.get_mut(&ino) {
                Some(c) => {
                    *c = c.saturating_sub(n);
                    *c == 0 && l.remove(&ino).is_some()
                }
                None => false,
            }
        };
        if forgotten {
            // The kernel dropped the inode and its cached pages with it.
            lock(&self.kernel_versions).remove(&ino);
        }
        self.maybe_reclaim(ino);
    }

    /// Drops an unlinked inode once the kernel and every handle let go.
    fn maybe_reclaim(&self, ino: ResourceId) {
        if self.opts.read_only {
            return;
        }
        let unlinked = self.read_meta().get(ino).is_some_and(|i| i.nlink == 0);
        if !unlinked || self.in_use(ino) {
            return;
        }
        if let Some(r) = self.replica.get() {
            r.reclaim(ino);
            if let Some(f) = self.on_change.get() {
                f();
            }
            return;
        }
        if let Err(e) = self.apply(FsCommand::Reclaim { ino }, false) {
            tracing::warn!(%ino, error = %e, "could not reclaim an unlinked inode; retried at next start");
        }
    }

    /// Whether this device still uses `ino`: the kernel holds it or a
    /// handle is open (an unlinked file stays until neither does).
    pub fn in_use(&self, ino: ResourceId) -> bool {
        lock(&self.lookups).contains_key(&ino) || lock(&self.open).contains_key(&ino)
    }

    /// Opens directory `ino` for listing: after the cross-device barrier,
    /// `readdir` shows every name its authority acknowledged.
    pub fn opendir(&self, ino: ResourceId) -> Result<()> {
        let kind = self.getattr(ino)?.kind;
        if kind != Kind::Dir {
            return Err(MetaError::NotDir.into());
        }
        if !history::is_virtual(ino) {
            if let Some(r) = self.replica.get() {
                r.list_barrier(ino);
            }
        }
        Ok(())
    }

    pub fn getattr(&self, ino: ResourceId) -> Result<Attr> {
        if history::is_virtual(ino) {
            return self.virtual_attr(ino);
        }
        let attr = Attr::of(self.read_meta().get(ino).ok_or(MetaError::NotFound)?);
        Ok(self.overlay(attr))
    }

    pub fn setattr(&self, ino: ResourceId, fh: Option<u64>, set: SetAttr) -> Result<Attr> {
        self.guard_ino(ino)?;
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        if let Some(size) = set.size {
            let kind = self.read_meta().get(ino).ok_or(MetaError::NotFound)?.kind;
            match kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::Meta(MetaError::IsDir)),
                _ => {
                    return Err(FsError::Meta(MetaError::Invalid(Cow::Borrowed(
                        "truncate of a special file",
                    ))))
                }
            }
            let file = self.open_file(ino);
            let res = (|| {
                let mut f = lock(&file);
                if let Some(pt) = f.io.pt.as_mut() {
                    // Passthrough handles read and write the backing file:
                    // the new size is made there, and committed from it.
                    pt.holds = None;
                    let b = pt.backing.clone();
                    b.file.set_len(size)?;
                    if fh.is_none() {
                        self.commit_backing(ino, &mut f, &b, self.opts.sync_on_close)?;
                    }
                    return Ok(());
                }
                self.ensure_spill(ino, &mut f)?;
                if let Some(s) = f.spill.as_mut() {
                    s.set_size(size, Timestamp::now())?;
                }
                // truncate(2) has no close to commit at; ftruncate(2) does.
                if fh.is_none() {
                    self.commit_locked(ino, &mut f, self.opts.sync_on_close)?;
                }
                Ok::<(), FsError>(())
            })();
            self.release_open_file(ino, &file);
            res?;
        }
        let any_meta = set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some();
        if any_meta {
            if set.mtime.is_some() {
                // An explicit mtime must not be overwritten by a later commit
                // of earlier writes: commit them first.
                self.commit(ino, false)?;
            }
            self.mutate(FsCommand::SetAttr {
                ino,
                perm: set.mode.map(|m| (m & 0o7777) as u16),
                uid: set.uid,
                gid: set.gid,
                atime: set.atime,
                mtime: set.mtime,
                now: Timestamp::now(),
            })?;
        }
        self.getattr(ino)
    }

    pub fn readlink(&self, ino: ResourceId) -> Result<Vec<u8>> {
        let meta = self.read_meta();
        let i = meta.get(ino).ok_or(MetaError::NotFound)?;
        i.target
            .clone()
            .ok_or(FsError::Meta(MetaError::Invalid(Cow::Borrowed(
                "not a symlink",
            ))))
    }

    fn create_node(
        &self,
        ctx: Ctx,
        parent: ResourceId,
        name: &[u8],
        node: NewNode,
        perm: u16,
    ) -> Result<Attr> {
        self.guard_name(parent, name)?;
        let out = self.mutate(FsCommand::Create {
            parent,
            name: name.to_vec(),
            ino: crate::ids::ResourceId(0),
            node,
            perm,
            uid: ctx.uid,
            gid: ctx.gid,
            now: Timestamp::now(),
        })?;
        let attr = self.inode_attr(out)?;
        self.note_lookup_of(attr.ino);
        Ok(attr)
    }

    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: ResourceId,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let node = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NewNode::File,
            libc::S_IFIFO => NewNode::Fifo,
            libc::S_IFSOCK => NewNode::Socket,
            libc::S_IFCHR => NewNode::CharDev { rdev },
            libc::S_IFBLK => NewNode::BlockDev { rdev },
            libc::S_IFDIR => NewNode::Dir,
            _ => {
                return Err(FsError::Meta(MetaError::Invalid(Cow::Borrowed(
                    "unknown file type",
                ))))
            }
        };
        self.create_node(ctx, parent, name, node, (mode & 0o7777) as u16)
    }

    pub fn mkdir(&self, ctx: Ctx, parent: ResourceId, name: &[u8], mode: u32) -> Result<Attr> {
        self.create_node(ctx, parent, name, NewNode::Dir, (mode & 0o7777) as u16)
    }

    pub fn symlink(
        &self,
        ctx: Ctx,
        parent: ResourceId,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr> {
        self.create_node(
            ctx,
            parent,
            name,
            NewNode::Symlink {
                target: target.to_vec(),
            },
            0o777,
        )
    }

    pub fn unlink(&self, parent: ResourceId, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: ResourceId, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: ResourceId, name: &[u8], dir: bool) -> Result<()> {
        self.guard_ino(parent)?;
        let ino = self.read_meta().lookup(parent, name).map(|i| i.id).ok();
        let (name, now) = (name.to_vec(), Timestamp::now());
        self.mutate(if dir {
            FsCommand::Rmdir { parent, name, now }
        } else {
            FsCommand::Unlink { parent, name, now }
        })?;
        if let Some(ino) = ino {
            self.maybe_reclaim(ino);
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: ResourceId,
        name: &[u8],
        new_parent: ResourceId,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        if history::is_virtual(parent) || (parent == ResourceId::ROOT && name == history::META_DIR)
        {
            return Err(FsError::ReadOnly);
        }
        self.guard_name(new_parent, new_name)?;
        let replaced = self
            .read_meta()
            .lookup(new_parent, new_name)
            .map(|i| i.id)
            .ok();
        self.mutate(FsCommand::Rename {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            mode,
            now: Timestamp::now(),
        })?;
        if let Some(ino) = replaced {
            self.maybe_reclaim(ino);
        }
        Ok(())
    }

    pub fn link(&self, ino: ResourceId, new_parent: ResourceId, new_name: &[u8]) -> Result<Attr> {
        self.guard_ino(ino)?;
        self.guard_name(new_parent, new_name)?;
        let out = self.mutate(FsCommand::Link {
            ino,
            parent: new_parent,
            name: new_name.to_vec(),
            now: Timestamp::now(),
        })?;
        let attr = self.inode_attr(out)?;
        self.note_lookup_of(attr.ino);
        Ok(attr)
    }

    /// Entries after `offset`: `.` is offset 1, `..` offset 2, then entries
    /// in cookie order (cookies never change while an entry exists).
    pub fn readdir(&self, ino: ResourceId, offset: u64, limit: usize) -> Result<Vec<DirItem>> {
        if history::is_virtual(ino) {
            return self.virtual_readdir(ino, offset, limit);
        }
        let meta = self.read_meta();
        let dir = meta.get(ino).ok_or(MetaError::NotFound)?;
        if dir.kind != Kind::Dir {
            return Err(MetaError::NotDir.into());
        }
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirItem {
                ino,
                offset: 1,
                kind: Kind::Dir,
                name: b".".to_vec(),
            });
        }
        if offset < 2 {
            out.push(DirItem {
                ino: dir.parent,
                offset: 2,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            });
        }
        for (cookie, name, e) in meta.entries_after(ino, offset.max(2))? {
            if out.len() >= limit {
                break;
            }
            out.push(DirItem {
                ino: e.ino,
                offset: cookie,
                kind: e.kind,
                name: name.clone(),
            });
        }
        Ok(out)
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let c = std::ffi::CString::new(self.opts.spill_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| {
                FsError::Meta(MetaError::Invalid(Cow::Borrowed("data dir path has a NUL")))
            })?;
        // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a properly sized out-param.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let files = self.read_meta().inode_count() as u64;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: files + st.f_ffree,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            frsize: st.f_frsize as u32,
            namelen: crate::meta::NAME_MAX as u32,
        })
    }

    pub fn access(&self, ctx: Ctx, ino: ResourceId, mask: i32) -> Result<()> {
        if history::is_virtual(ino) {
            // Permission bits are checked by the kernel (default_permissions).
            self.virtual_attr(ino)?;
            return if mask & libc::W_OK != 0 {
                Err(FsError::ReadOnly)
            } else {
                Ok(())
            };
        }
        let meta = self.read_meta();
        let i = meta.get(ino).ok_or(MetaError::NotFound)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        if mask & libc::W_OK != 0 && self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        let perm = i.perm as i32;
        let granted = if ctx.uid == 0 {
            // root may do anything, but execute needs some x bit on files.
            let x = if i.kind == Kind::Dir || perm & 0o111 != 0 {
                libc::X_OK
            } else {
                0
            };
            libc::R_OK | libc::W_OK | x
        } else if ctx.uid == i.uid {
            (perm >> 6) & 7
        } else if ctx.gid == i.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if mask & !granted & 7 != 0 {
            return Err(FsError::Access);
        }
        Ok(())
    }

    // ---- xattrs ----

    /// `user.*` and `trusted.*` attributes are stored. `system.*` (POSIX
    /// ACLs) is refused: stored as opaque bytes it would only pretend to be
    /// enforced. `security.*` (SELinux labels, file capabilities) is refused
    /// too: the mount is always nosuid, so capabilities would never apply,
    /// and a clear "not supported" lets tools such as `ls -l` stop asking for
    /// a label on every file (one kernel round trip each).
    fn check_xattr_namespace(name: &[u8]) -> Result<()> {
        if name.starts_with(b"system.") || name.starts_with(b"security.") {
            return Err(FsError::NotSupported);
        }
        if name.starts_with(STAT_XATTR) {
            // Read-only facts about the mesh, not stored attributes.
            return Err(MetaError::NotPermitted.into());
        }
        Ok(())
    }

    /// `user.meshfs.authority`, `.epoch`, `.version`, `.temperature` and
    /// `.stat` (all of `meshfs stat --json`). Not listed by listxattr, so
    /// that copying tools do not try to copy them.
    fn stat_xattr(&self, ino: ResourceId, name: &[u8]) -> Result<Vec<u8>> {
        let f = self.stat.get().ok_or(MetaError::NoAttr)?;
        let v = f(ino).ok_or(MetaError::NotFound)?;
        let field = &name[STAT_XATTR.len()..];
        let out = match field {
            b"stat" => v.to_string(),
            b"authority" => v["authority"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            b"epoch" | b"version" | b"temperature" => {
                v[std::str::from_utf8(field).unwrap_or_default()].to_string()
            }
            _ => return Err(MetaError::NoAttr.into()),
        };
        Ok(out.into_bytes())
    }

    pub fn setxattr(&self, ino: ResourceId, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.guard_ino(ino)?;
        Self::check_xattr_namespace(name)?;
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return Err(MetaError::Invalid(Cow::Borrowed("xattr flags")).into()),
        };
        self.mutate(FsCommand::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            mode,
            now: Timestamp::now(),
        })?;
        Ok(())
    }

    pub fn getxattr(&self, ino: ResourceId, name: &[u8]) -> Result<Vec<u8>> {
        if history::is_virtual(ino) {
            return Err(MetaError::NoAttr.into());
        }
        if name.starts_with(STAT_XATTR) {
            return self.stat_xattr(ino, name);
        }
        Self::check_xattr_namespace(name)?;
        let meta = self.read_meta();
        let i = meta.get(ino).ok_or(MetaError::NotFound)?;
        i.xattrs.get(name).cloned().ok_or(MetaError::NoAttr.into())
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: ResourceId) -> Result<Vec<u8>> {
        if history::is_virtual(ino) {
            return Ok(Vec::new());
        }
        let meta = self.read_meta();
        let i = meta.get(ino).ok_or(MetaError::NotFound)?;
        let mut out = Vec::new();
        for k in i.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: ResourceId, name: &[u8]) -> Result<()> {
        self.guard_ino(ino)?;
        Self::check_xattr_namespace(name)?;
        self.mutate(FsCommand::RemoveXattr {
            ino,
            name: name.to_vec(),
            now: Timestamp::now(),
        })?;
        Ok(())
    }

    // ---- files ----

    /// The open-file record of `ino`, held until `release_open_file`.
    fn open_file(&self, ino: ResourceId) -> Arc<Mutex<OpenFile>> {
        let mut open = lock(&self.open);
        let file = open
            .entry(ino)
            .or_insert_with(|| {
                Arc::new(Mutex::new(OpenFile {
                    handles: 0,
                    holders: 0,
                    io: Default::default(),
                    spill: None,
                    cache: Arc::new(self.read_cache(ino)),
                }))
            })
            .clone();
        lock(&file).holders += 1;
        file
    }

    /// Lets go of what `open_file` returned; forgets the record when
    /// nobody uses it any more.
    fn release_open_file(&self, ino: ResourceId, file: &Arc<Mutex<OpenFile>>) {
        let mut open = lock(&self.open);
        let mut f = lock(file);
        f.holders = f.holders.saturating_sub(1);
        if f.holders == 0 && f.handles == 0 && f.spill.is_none() {
            open.remove(&ino);
        }
    }

    fn ensure_spill(&self, ino: ResourceId, f: &mut OpenFile) -> Result<()> {
        if f.spill.is_none() {
            let base = {
                let meta = self.read_meta();
                let i = meta.get(ino).ok_or(MetaError::NotFound)?;
                i.content.clone().unwrap_or_default()
            };
            let seq = self.spill_seq.fetch_add(1, Ordering::Relaxed);
            let name = format!("{}-{}", ino.0, seq);
            f.spill = Some(Spill::create(
                &self.opts.spill_dir,
                &name,
                base,
                Timestamp::now(),
            )?);
        }
        Ok(())
    }

    pub fn open(&self, ino: ResourceId, flags: i32) -> Result<Opened> {
        self.open_with(ino, flags, true, true)
    }

    /// How the kernel is to read a new handle of `ino` (`passthrough`), and
    /// the backing file when it starts the file's passthrough. Asks for a
    /// backing file of a complete version that has none yet.
    fn io_mode(
        &self,
        ino: ResourceId,
        f: &OpenFile,
        read_only: bool,
        content: Option<&crate::meta::Content>,
    ) -> (passthrough::Mode, Option<Arc<passthrough::Backing>>) {
        let backings = self.backings.as_ref().filter(|b| b.enabled());
        let clean = f.spill.is_none();
        let eligible = match (backings, content) {
            (Some(b), Some(c)) => read_only && clean && c.size > 0 && c.size >= b.min_bytes(),
            _ => false,
        };
        let mut backing = None;
        if let (true, Some(b), Some(c), None) = (eligible, backings, content, &f.io.pt) {
            let digest = c.digest();
            backing = b.ready(ino, digest, c.size);
            if backing.is_none() && !b.known(ino, digest) && self.all_local(c) {
                b.want(ino, digest, c);
            }
        }
        let ask = passthrough::Ask {
            read_only: eligible,
            clean,
            ready: backing.is_some(),
        };
        (passthrough::choose(&f.io, ask), backing)
    }

    /// Whether the mount should ask the kernel for passthrough.
    pub fn passthrough_wanted(&self) -> bool {
        self.backings.as_ref().is_some_and(|b| b.enabled())
    }

    /// Turns passthrough off for this run (the kernel lacks it).
    pub fn passthrough_off(&self, why: &str) {
        if let Some(b) = &self.backings {
            b.disable(why);
        }
    }

    /// The FUSE layer could not hand the backing file to the kernel (no
    /// passthrough in this kernel, or no right to it): the handle is read
    /// through the daemon instead, and no later open tries again.
    pub fn passthrough_refused(&self, fh: u64, why: &str) {
        if let Some(b) = &self.backings {
            b.disable(why);
        }
        let Ok(h) = self.handle(fh) else { return };
        if h.mode != passthrough::Mode::Passthrough {
            return;
        }
        {
            let mut f = lock(&h.file);
            f.io.remove(passthrough::Mode::Passthrough, h.writable);
            f.io.cached += 1;
        }
        if let Some(e) = lock(&self.handles).get_mut(&fh) {
            e.mode = passthrough::Mode::Cached;
        }
        // Its pages may be another version's: it is opened without them.
        lock(&self.kernel_versions).remove(&h.ino);
    }

    /// `open`; `barrier` false skips the cross-device read barrier (for a
    /// file this call just created: the creation is the open's moment);
    /// `pt_ok` false keeps the handle off passthrough (a create's reply).
    fn open_with(&self, ino: ResourceId, flags: i32, barrier: bool, pt_ok: bool) -> Result<Opened> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let kind = self.read_meta().get(ino).ok_or(MetaError::NotFound)?.kind;
        if kind == Kind::Dir {
            return Err(MetaError::IsDir.into());
        }
        if writable && self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        // Close-to-open across devices: wait until everything the file's
        // authority acknowledged is applied here, then look again.
        let elsewhere = match self.replica.get().filter(|_| barrier) {
            Some(r) => r.open_barrier(ino),
            None => false,
        };
        let (version, content) = {
            let meta = self.read_meta();
            let i = meta.get(ino).ok_or(MetaError::NotFound)?;
            (i.version(), i.content.clone())
        };
        {
            let mut last = lock(&self.last_open);
            last.insert(ino, std::time::Instant::now());
            // Files deleted since leave entries behind; drop them now and
            // then so that the map stays the size of the namespace.
            if last.len() > 4096 && last.len().is_power_of_two() {
                let meta = self.read_meta();
                last.retain(|i, _| meta.get(*i).is_some());
            }
        }
        let file = self.open_file(ino);
        let (mode, passthrough) = {
            let mut f = lock(&file);
            if let Some(c) = &content {
                self.refresh_backing(&mut f, c);
            }
            let read_only = !writable && pt_ok && kind == Kind::File;
            let (mode, backing) = self.io_mode(ino, &f, read_only, content.as_ref());
            f.io.add(mode, writable, backing);
            f.handles += 1;
            if let (true, Some(pt), Some(b)) = (writable, &f.io.pt, &self.backings) {
                // Its name no longer says what it holds.
                b.forget(ino, pt.backing.digest);
            }
            let trunc = flags & libc::O_TRUNC != 0 && writable && kind == Kind::File;
            if let (true, Some(pt)) = (trunc, &f.io.pt) {
                // The kernel writes this handle's bytes into the backing
                // file: the truncation goes there too.
                if let Err(e) = pt.backing.file.set_len(0) {
                    f.handles -= 1;
                    f.io.remove(mode, writable);
                    drop(f);
                    self.release_open_file(ino, &file);
                    return Err(e.into());
                }
            } else if trunc {
                if let Err(e) =
                    self.ensure_spill(ino, &mut f)
                        .and_then(|_| match f.spill.as_mut() {
                            Some(s) => s.set_size(0, Timestamp::now()).map_err(FsError::from),
                            None => Ok(()),
                        })
                {
                    f.handles -= 1;
                    f.io.remove(mode, writable);
                    drop(f);
                    self.release_open_file(ino, &file);
                    return Err(e);
                }
            }
            let pt = match mode {
                passthrough::Mode::Passthrough => f.io.pt.as_ref().map(|p| p.backing.clone()),
                _ => None,
            };
            (mode, pt)
        };
        if let Some(b) = &self.backings {
            match mode {
                passthrough::Mode::Passthrough => &b.opens_passthrough,
                passthrough::Mode::Cached => &b.opens_cached,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        // A passthrough handle's reads never reach the daemon: its first
        // read is now, and the file is all here.
        let unread = mode != passthrough::Mode::Passthrough;
        if !unread {
            if let Some(sink) = self.access.get() {
                sink.first_read(ino, true);
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(
            fh,
            Handle {
                ino,
                file,
                append: flags & libc::O_APPEND != 0,
                writable,
                mode,
                unread: Arc::new(std::sync::atomic::AtomicBool::new(unread)),
            },
        );
        // Only a cached handle fills the kernel's page cache.
        let keep_cache = mode == passthrough::Mode::Cached && {
            let mut kv = lock(&self.kernel_versions);
            kv.insert(ino, version) == Some(version)
        };
        if elsewhere {
            // Governed by another device: the size the kernel holds (from
            // a lookup or stat before this open) may be an older version's,
            // and the asynchronous invalidation may not have reached it
            // yet. Marked stale now, the first stat or read past that size
            // asks again: close-to-open holds.
            if let Some(f) = self.stale_attrs.get() {
                f(ino);
            }
        }
        Ok(Opened {
            fh,
            keep_cache,
            passthrough,
        })
    }

    pub fn create(
        &self,
        ctx: Ctx,
        parent: ResourceId,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, Opened)> {
        let attr = match self.create_node(ctx, parent, name, NewNode::File, (mode & 0o7777) as u16)
        {
            Ok(a) => a,
            // Another device created the name since the kernel looked it up:
            // without O_EXCL, open(2) opens the existing file (as NFS does).
            Err(FsError::Meta(MetaError::Exists)) if flags & libc::O_EXCL == 0 => {
                return self.open_existing(ctx, parent, name, flags);
            }
            Err(e) => return Err(e),
        };
        // O_TRUNC on a brand-new file is a no-op; opening must not fail on it.
        let opened = self.open_with(attr.ino, flags & !libc::O_TRUNC, false, false)?;
        self.report_open(ctx.uid, attr.ino);
        Ok((attr, opened))
    }

    /// `create` found the name taken: opens what is there, if it is a
    /// regular file the caller may open so (the kernel checked only the
    /// directory's permissions, for a create).
    fn open_existing(
        &self,
        ctx: Ctx,
        parent: ResourceId,
        name: &[u8],
        flags: i32,
    ) -> Result<(Attr, Opened)> {
        let attr = self.lookup(parent, name)?;
        let refuse = |e: FsError| {
            // The kernel gets no entry for a failed create.
            self.forget(attr.ino, 1);
            Err(e)
        };
        if attr.kind != Kind::File {
            return refuse(MetaError::Exists.into());
        }
        let mask = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => libc::W_OK,
            libc::O_RDWR => libc::R_OK | libc::W_OK,
            _ => libc::R_OK,
        };
        if let Err(e) = self.access(ctx, attr.ino, mask) {
            return refuse(e);
        }
        match self.open_with(attr.ino, flags, true, false) {
            Ok(opened) => {
                self.report_open(ctx.uid, attr.ino);
                Ok((self.getattr(attr.ino)?, opened))
            }
            Err(e) => refuse(e),
        }
    }

    fn handle(&self, fh: u64) -> Result<Handle> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if let Some(r) = self.virtual_read(fh, offset, size) {
            return r;
        }
        let h = self.handle(fh)?;
        let cache = {
            let mut f = lock(&h.file);
            let f = &mut *f;
            if let Some(s) = f.spill.as_mut() {
                s.materialize()?;
                let n = s.size.saturating_sub(offset).min(size as u64) as usize;
                let mut out = vec![0u8; n];
                read_merged(&*self.store, &f.cache, s, offset, &mut out)?;
                return Ok(out);
            }
            f.cache.clone()
        };
        // A clean file: read the committed version without holding the
        // file's lock, so concurrent reads of one file run in parallel. A
        // commit updates the namespace before it drops its spill, so a read
        // that found no spill sees at least every completed write.
        let content = {
            let meta = self.read_meta();
            let i = meta.get(h.ino).ok_or(MetaError::NotFound)?;
            i.content.clone().unwrap_or_default()
        };
        if let Some(sink) = self.access.get() {
            if !content.chunks.is_empty() && h.unread.swap(false, Ordering::Relaxed) {
                sink.first_read(h.ino, self.all_local(&content));
            }
        }
        let n = content.size.saturating_sub(offset).min(size as u64) as usize;
        let mut out = vec![0u8; n];
        read_content(&*self.store, &cache, &content, offset, &mut out)?;
        Ok(out)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        if !crate::storage::has_space(&self.opts.spill_dir, data.len() as u64) {
            return Err(StorageError::NoSpace.into());
        }
        let mut f = lock(&h.file);
        if let (passthrough::Mode::Passthrough, Some(pt)) = (h.mode, f.io.pt.as_mut()) {
            // The kernel writes a passthrough handle's bytes itself; this
            // is a handle it sent here anyway: into the backing file too.
            pt.holds = None;
            let file = &pt.backing.file;
            let at = if h.append {
                file.metadata()?.len()
            } else {
                offset
            };
            std::os::unix::fs::FileExt::write_all_at(file, data, at)?;
            return Ok(data.len() as u32);
        }
        self.ensure_spill(h.ino, &mut f)?;
        let s = f.spill.as_mut().ok_or(FsError::BadHandle)?;
        let at = if h.append { s.size } else { offset };
        if at
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(FsError::TooBig);
        }
        // An error the chunking worker met is reported before these bytes
        // are taken, so a failed write(2) adds nothing to the file.
        if s.stream
            .as_ref()
            .and_then(|st| st.cutter.as_ref())
            .is_some_and(|c| c.failed())
        {
            s.settle()?;
        }
        s.write(at, data, Timestamp::now())?;
        content::stream_cut(&self.store, s, self.opts.chunk_sizes, &self.chunkers)?;
        Ok(data.len() as u32)
    }

    /// close(2) of one descriptor: commit what was written (close-to-open).
    pub fn flush(&self, fh: u64) -> Result<()> {
        if lock(&self.virt).is_handle(fh) {
            return Ok(());
        }
        let h = self.handle(fh)?;
        let mut f = lock(&h.file);
        // A file only emptied so far is not committed at a flush: a shell's
        // `>` opens with O_TRUNC and closes a duplicate of the descriptor
        // before anything is written, which made every such save two
        // versions, the first one empty. The release (or the flush after
        // the writes) commits it.
        if f.spill.as_ref().is_some_and(|s| s.size == 0) {
            return Ok(());
        }
        if let Some(b) = self.backing_to_commit(&f, &h) {
            if b.file.metadata().is_ok_and(|m| m.len() == 0) {
                return Ok(());
            }
            return self.commit_backing(h.ino, &mut f, &b, self.opts.sync_on_close);
        }
        self.commit_locked(h.ino, &mut f, self.opts.sync_on_close)
    }

    /// lseek(2) with SEEK_DATA (`hole` false) or SEEK_HOLE (`hole` true);
    /// the kernel answers the other whences itself. `None` is ENXIO.
    pub fn seek_data_or_hole(&self, fh: u64, offset: u64, hole: bool) -> Result<Option<u64>> {
        if let Some(c) = self.virtual_content(fh) {
            return Ok(content::seek_content(&c, offset, hole));
        }
        let h = self.handle(fh)?;
        let f = lock(&h.file);
        if let Some(s) = f.spill.as_ref() {
            return Ok(content::seek_spill(s, offset, hole));
        }
        if let Some(pt) = f.io.pt.as_ref().filter(|p| p.holds.is_none()) {
            // Not committed yet: all data, which POSIX allows.
            let size = pt.backing.file.metadata()?.len();
            return Ok(match (offset < size, hole) {
                (false, _) => None,
                (true, false) => Some(offset),
                (true, true) => Some(size),
            });
        }
        let meta = self.read_meta();
        let i = meta.get(h.ino).ok_or(MetaError::NotFound)?;
        let content = i.content.clone().unwrap_or_default();
        drop(meta);
        Ok(content::seek_content(&content, offset, hole))
    }

    /// fallocate(2). Content is stored by hash and shared between files and
    /// versions, so there is nothing to reserve in place: mode 0 checks that
    /// the data dir has room for the bytes it adds and extends the size (a
    /// hole, as OpenZFS does), and KEEP_SIZE only checks the room. A later
    /// write can still meet a full disk. Punching or zeroing a range,
    /// collapsing and inserting are not supported (EOPNOTSUPP).
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(FsError::NotSupported);
        }
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let end = offset
            .checked_add(length)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::TooBig)?;
        let mut f = lock(&h.file);
        if let Some(pt) = f.io.pt.as_mut() {
            let len = pt.backing.file.metadata()?.len();
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > len {
                if !crate::storage::has_space(&self.opts.spill_dir, end - len) {
                    return Err(StorageError::NoSpace.into());
                }
                pt.holds = None;
                pt.backing.file.set_len(end)?;
            }
            return Ok(());
        }
        let size = match f.spill.as_ref() {
            Some(s) => s.size,
            None => self
                .read_meta()
                .get(h.ino)
                .ok_or(MetaError::NotFound)?
                .size(),
        };
        if !crate::storage::has_space(&self.opts.spill_dir, end.saturating_sub(size)) {
            return Err(StorageError::NoSpace.into());
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 || end <= size {
            return Ok(());
        }
        self.ensure_spill(h.ino, &mut f)?;
        let s = f.spill.as_mut().ok_or(FsError::BadHandle)?;
        s.grow(end, Timestamp::now())?;
        Ok(())
    }

    /// fsync(2): the file's changes are committed through Raft (on a
    /// majority of devices) and in this device's synced WAL.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        if lock(&self.virt).is_handle(fh) {
            return Ok(());
        }
        let h = self.handle(fh)?;
        let mut f = lock(&h.file);
        match self.backing_to_commit(&f, &h) {
            Some(b) => self.commit_backing(h.ino, &mut f, &b, false)?,
            None => self.commit_locked(h.ino, &mut f, false)?,
        }
        self.sync_changes()
    }

    /// fsync on a directory: every namespace change made here so far is
    /// committed and durable.
    pub fn fsyncdir(&self) -> Result<()> {
        self.sync_changes()
    }

    fn sync_changes(&self) -> Result<()> {
        if let Some(r) = self.replica.get() {
            r.commit_wait()?;
        }
        self.store.sync()?;
        Ok(())
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        if self.virtual_release(fh) {
            return Ok(());
        }
        let h = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        let result = {
            let mut f = lock(&h.file);
            let backing = self.backing_to_commit(&f, &h);
            f.io.remove(h.mode, h.writable);
            let r = match backing {
                Some(b) => self.commit_backing(h.ino, &mut f, &b, self.opts.sync_on_close),
                None => self.commit_locked(h.ino, &mut f, self.opts.sync_on_close),
            };
            f.handles = f.handles.saturating_sub(1);
            if f.handles == 0 && r.is_err() {
                // Nobody can retry a commit of a released file; the writes
                // are lost and the caller was told at close().
                self.discard_spill(&mut f);
            }
            r
        };
        self.release_open_file(h.ino, &h.file);
        self.maybe_reclaim(h.ino);
        result
    }

    fn commit(&self, ino: ResourceId, sync: bool) -> Result<()> {
        let file = lock(&self.open).get(&ino).cloned();
        if let Some(file) = file {
            let mut f = lock(&file);
            self.commit_locked(ino, &mut f, sync)?;
        }
        Ok(())
    }

    /// Turns a file's uncommitted writes into a new version. On failure the
    /// writes stay in the spill, so a later flush or fsync can retry.
    fn commit_locked(&self, ino: ResourceId, f: &mut OpenFile, sync: bool) -> Result<()> {
        self.commit_spill(ino, f, sync, None).map(|_| ())
    }

    /// `commit_locked`; `unchanged_from` (passthrough writers' base, see
    /// `Pt::base`): content equal to the current version's or to that base
    /// makes no new version (writers that wrote nothing, or put back what
    /// they started from). Returns the digest of the content the spill
    /// held, committed or not (`None`: it held no change).
    fn commit_spill(
        &self,
        ino: ResourceId,
        f: &mut OpenFile,
        sync: bool,
        unchanged_from: Option<ChunkHash>,
    ) -> Result<Option<ChunkHash>> {
        let Some(spill) = f.spill.as_mut() else {
            return Ok(None);
        };
        // Everything a chunking worker holds comes back first; an error it
        // met is this commit's (the bytes are kept for a retry).
        spill.settle()?;
        if spill.stream_with_hole() {
            spill.materialize()?;
        }
        let spill = &*spill;
        if spill.dirty_span().is_none() {
            self.discard_spill(f);
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let new = content::rechunk(&*self.store, spill, self.opts.chunk_sizes)?;
        let chunked = started.elapsed();
        let digest = crate::meta::Content::digest_of(spill.size, &new.chunks);
        let same = |base: ChunkHash| {
            (spill.size == spill.base.size && new.chunks[..] == spill.base.chunks[..])
                || digest == base
        };
        if unchanged_from.is_some_and(same) {
            self.store.unpin(&new.pinned);
            self.discard_spill(f);
            return Ok(Some(digest));
        }
        let cmd = FsCommand::CommitVersion {
            ino,
            size: spill.size,
            chunks: new.chunks,
            mtime: spill.mtime,
            author: self.opts.device,
            now: Timestamp::now(),
        };
        let res = self.apply(cmd, sync);
        self.store.unpin(&new.pinned);
        let out = res?;
        if let Outcome::Inode(i) = out {
            let mut kv = lock(&self.kernel_versions);
            if f.io.pt.is_none() {
                // Our own writes went through the kernel's page cache, so
                // the pages it holds are this version.
                kv.insert(ino, i.version());
            } else {
                // Passthrough writes bypassed it: what it holds is older.
                kv.remove(&ino);
            }
        }
        tracing::debug!(
            %ino,
            size = spill.size,
            rechunked = new.rechunked_bytes,
            chunk_ms = chunked.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "committed a new version"
        );
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.rechunked
            .fetch_add(new.rechunked_bytes, Ordering::Relaxed);
        self.discard_spill(f);
        Ok(Some(digest))
    }

    /// Commits what passthrough writers left in the backing file `b` of
    /// `ino`: the whole file goes through the chunker again (only new
    /// chunks are stored), as a copy into the mount would; bytes equal to
    /// the current version make no new version. On failure the bytes stay
    /// in the backing file, and the next close or sync tries again.
    fn commit_backing(
        &self,
        ino: ResourceId,
        f: &mut OpenFile,
        b: &passthrough::Backing,
        sync: bool,
    ) -> Result<()> {
        let size = b.file.metadata()?.len();
        let base = f.io.pt.as_ref().map(|p| p.base);
        let digest = || {
            self.read_meta()
                .get(ino)
                .and_then(|i| i.content.as_ref().map(|c| c.digest()))
        };
        let before = digest();
        self.ensure_spill(ino, f)?;
        let streamed = (|| {
            let s = f.spill.as_mut().ok_or(FsError::BadHandle)?;
            // From scratch, as `>` then a write of every byte would.
            s.set_size(0, Timestamp::now())?;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(buf.len() as u64) as usize;
                std::os::unix::fs::FileExt::read_exact_at(&b.file, &mut buf[..n], at)?;
                s.write(at, &buf[..n], Timestamp::now())?;
                content::stream_cut(&self.store, s, self.opts.chunk_sizes, &self.chunkers)?;
                at += n as u64;
            }
            Ok::<(), FsError>(())
        })();
        let held = match streamed.and_then(|_| self.commit_spill(ino, f, sync, base.or(before))) {
            Ok(held) => held.or(before),
            Err(e) => {
                self.discard_spill(f);
                return Err(e);
            }
        };
        if let (Some(b), true) = (&self.backings, digest() != before) {
            b.commits_from_backing.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(pt) = f.io.pt.as_mut() {
            // With writers still there, the next byte they write is not
            // in this version. Without, it holds the version just made, or
            // the current one, or (when writers put back their base over a
            // version committed elsewhere) that base, which the next open
            // replaces.
            pt.holds = if pt.writers == 0 { held } else { None };
            if let Some(d) = held {
                pt.base = d;
            }
        }
        Ok(())
    }

    /// The backing file a passthrough handle's close or sync commits from:
    /// a writer's, or any handle's while what it holds is not committed (a
    /// commit that failed, a truncate).
    fn backing_to_commit(&self, f: &OpenFile, h: &Handle) -> Option<Arc<passthrough::Backing>> {
        let pt = f.io.pt.as_ref()?;
        let ours = h.mode == passthrough::Mode::Passthrough;
        (ours && (h.writable || pt.holds.is_none())).then(|| pt.backing.clone())
    }

    /// Passthrough handles of a file hold its backing file, which still has
    /// an older version than the one just applied here (committed on
    /// another device): the new version is written over it, so that opens
    /// from now on, which must join those handles, read it (close-to-open).
    /// Its chunks are fetched first, so that a failure leaves the older
    /// version whole. Left as it is (and logged) while writers have it open.
    fn refresh_backing(&self, f: &mut OpenFile, content: &crate::meta::Content) {
        let Some(pt) = f.io.pt.as_mut() else { return };
        let Some(held) = pt.holds else { return };
        let digest = content.digest();
        if held == digest || pt.writers > 0 {
            return;
        }
        let ino = pt.backing.ino;
        let cache = ChunkCache::with_remote(self.remote.get().cloned(), ino);
        let read = content_reader(self.store.clone(), Arc::new(cache));
        // Every chunk first, so that a fetch that fails leaves the older
        // version whole.
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0;
        while at < content.size {
            let n = (content.size - at).min(buf.len() as u64) as usize;
            if let Err(e) = read(content, at, &mut buf[..n]) {
                tracing::warn!(%ino, error = %e, "a file open here by passthrough changed elsewhere and its new version could not be fetched; until it is closed here, opens here see the older version");
                return;
            }
            at += n as u64;
        }
        // `holds` stays the older digest if this fails: the next open tries
        // again, and no commit is ever made from a half-written copy.
        match passthrough::fill(&pt.backing.file, content, &read) {
            Ok(()) => {
                pt.holds = Some(digest);
                pt.base = digest;
            }
            Err(e) => {
                tracing::error!(%ino, error = %e, "could not write a new version over a passthrough file; its readers here may see a mix of versions until the next open retries")
            }
        }
    }

    /// Drops a file's spill and the pins its streamed chunks held.
    fn discard_spill(&self, f: &mut OpenFile) {
        if let Some(mut s) = f.spill.take() {
            // A worker's chunks are pinned too; they come back with it.
            if let Err(e) = s.settle() {
                tracing::debug!(error = %e, "chunking worker failed on a discarded file");
            }
            self.store.unpin(&s.pinned);
        }
    }

    /// Commits every file with uncommitted writes (clean shutdown).
    pub fn commit_all(&self) -> Result<()> {
        let files: Vec<(ResourceId, Arc<Mutex<OpenFile>>)> = lock(&self.open)
            .iter()
            .map(|(i, f)| (*i, f.clone()))
            .collect();
        let mut first_err = None;
        for (ino, file) in files {
            let mut f = lock(&file);
            if let Err(e) = self.commit_locked(ino, &mut f, false) {
                tracing::error!(%ino, error = %e, "could not commit a file at shutdown");
                first_err.get_or_insert(e);
            }
        }
        self.store.sync()?;
        first_err.map_or(Ok(()), Err)
    }

    /// The chunk cache of a file read through the mount.
    fn read_cache(&self, ino: ResourceId) -> ChunkCache {
        ChunkCache::with_remote(self.remote.get().cloned(), ino).counted(self.chunk_reads.clone())
    }

    pub fn stats(&self) -> FsStats {
        FsStats {
            chunk_reads: [
                self.chunk_reads.local.load(Ordering::Relaxed),
                self.chunk_reads.ahead.load(Ordering::Relaxed),
                self.chunk_reads.remote.load(Ordering::Relaxed),
            ],
            commits: self.commits.load(Ordering::Relaxed),
            rechunked_bytes: self.rechunked.load(Ordering::Relaxed),
            open_files: lock(&self.open).len() as u64,
            passthrough: self
                .backings
                .as_ref()
                .map(|b| b.stats())
                .unwrap_or_default(),
        }
    }

    /// Read access to the namespace (status, check).
    pub fn with_meta<T>(&self, f: impl FnOnce(&MetaState) -> T) -> T {
        f(&self.read_meta())
    }
}
