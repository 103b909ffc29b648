//! Cached reads at the speed of the disk: which way the kernel reads each
//! open file, and the backing files that FUSE passthrough reads from.
//!
//! A committed version that is complete here is copied, in the background,
//! into a plain file under `<data dir>/backing` (`<ino>-<content digest>`,
//! so that a name always means the same bytes). An open
//! for reading of that version is then answered with FUSE passthrough: the
//! kernel reads the backing file itself, with no request to this daemon and
//! no copy out of RocksDB. The first open of a version is served as before
//! and asks for the copy, so a version read once is read from the disk the
//! next time; the copies are bounded in bytes (least recently opened go
//! first).
//!
//! The kernel refuses (EIO to the program) an inode open through its page
//! cache and by passthrough at once, and while one passthrough handle of an
//! inode is open every other open of it must be passthrough too, to the
//! same backing file. `choose` keeps to that: while passthrough handles are
//! open, every open joins them, writers included. A writer's bytes then go
//! straight into the backing file (readers here see them at once, as POSIX
//! wants), and the daemon commits the file from it when a writer closes or
//! syncs (`Fs::commit_backing`: the whole file goes through the chunker
//! again, as if it were copied in).

use crate::ids::{ChunkHash, ResourceId};
use crate::meta::Content;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How the kernel reads one open handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through this daemon and the kernel's page cache (FUSE's default).
    Cached,
    /// Straight from (and to) a backing file.
    Passthrough,
}

/// A backing file handed to the kernel. The FUSE layer keeps its kernel
/// registration in `slot`; it lives as long as this does, i.e. while
/// passthrough handles of the inode are open.
pub struct Backing {
    pub file: std::fs::File,
    pub ino: ResourceId,
    /// `Content::digest` of what it was made from.
    pub digest: ChunkHash,
    /// The kernel's id for `file`, set by the FUSE layer at first use.
    pub slot: Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backing")
            .field("ino", &self.ino)
            .field("digest", &self.digest)
            .finish()
    }
}

/// The passthrough handles of an inode.
#[derive(Debug)]
pub struct Pt {
    pub handles: usize,
    /// Those opened for writing: the kernel writes their bytes into the
    /// backing file without telling the daemon.
    pub writers: usize,
    pub backing: Arc<Backing>,
    /// The digest of the version the backing file holds; `None` while it
    /// may hold bytes not committed yet.
    pub holds: Option<ChunkHash>,
    /// The digest of the version the backing file last held (what writers'
    /// bytes start from). While writers have it open, a version committed
    /// elsewhere is not written over their bytes: if they leave it as it
    /// was, their close makes no version, rather than bringing this one
    /// back over the newer.
    pub base: ChunkHash,
}

/// What the kernel has open of one inode, by mode.
#[derive(Debug, Default)]
pub struct IoState {
    pub cached: usize,
    pub pt: Option<Pt>,
}

/// An open of an inode, as far as the choice of mode goes.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// Opened for reading only, and passthrough allowed for this open.
    pub read_only: bool,
    /// No uncommitted writes: the current version is all there is.
    pub clean: bool,
    /// A backing file of the current version exists here.
    pub ready: bool,
}

/// Which mode an open gets (pure). While passthrough handles are open,
/// every open joins them (the kernel allows nothing else). Otherwise only a
/// reader of a clean file whose backing file is there starts passthrough,
/// and only while nothing has the inode open through the page cache.
pub fn choose(state: &IoState, ask: Ask) -> Mode {
    if state.pt.is_some() || (ask.read_only && ask.clean && ask.ready && state.cached == 0) {
        Mode::Passthrough
    } else {
        Mode::Cached
    }
}

impl IoState {
    /// Counts a handle opened in `mode`; `backing` is used when it starts
    /// the inode's passthrough.
    pub fn add(&mut self, mode: Mode, writable: bool, backing: Option<Arc<Backing>>) {
        match (mode, &mut self.pt, backing) {
            (Mode::Passthrough, Some(pt), _) => pt.handles += 1,
            (Mode::Passthrough, None, Some(backing)) => {
                self.pt = Some(Pt {
                    handles: 1,
                    writers: 0,
                    holds: Some(backing.digest),
                    base: backing.digest,
                    backing,
                })
            }
            // Nothing to pass through: read through the daemon.
            _ => self.cached += 1,
        }
        if let (Mode::Passthrough, true, Some(pt)) = (mode, writable, &mut self.pt) {
            pt.writers += 1;
            pt.holds = None;
        }
    }

    /// Forgets a handle of `mode`; the last passthrough handle drops the
    /// backing file (and with it the kernel's registration).
    pub fn remove(&mut self, mode: Mode, writable: bool) {
        match (mode, &mut self.pt) {
            (Mode::Passthrough, Some(pt)) => {
                pt.handles = pt.handles.saturating_sub(1);
                if writable {
                    pt.writers = pt.writers.saturating_sub(1);
                }
                if pt.handles == 0 {
                    self.pt = None;
                }
            }
            _ => self.cached = self.cached.saturating_sub(1),
        }
    }
}

/// Where backing files go and how many bytes of them are kept.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub budget_bytes: u64,
    /// Smaller files are always read through the daemon: for them the
    /// kernel's page cache already does the work, and a backing file per
    /// small file would cost more than it saves.
    pub min_bytes: u64,
}

/// Counters for `meshfs status`.
#[derive(Debug, Default, serde::Serialize, Clone, Copy)]
pub struct Stats {
    pub enabled: bool,
    pub backing_files: u64,
    pub backing_bytes: u64,
    /// Backing files made since the start.
    pub made: u64,
    pub opens_cached: u64,
    pub opens_passthrough: u64,
    /// New versions committed from a backing file (at a passthrough
    /// writer's close or sync).
    pub commits_from_backing: u64,
}

/// Reads `out.len()` bytes of a version at an offset (the daemon's own read
/// path, which verifies every chunk).
pub type ReadFn = Arc<dyn Fn(&Content, u64, &mut [u8]) -> std::io::Result<()> + Send + Sync>;

/// Whether a copy is still worth keeping: its file exists and the version
/// it holds is the current one.
pub type KeepFn = Arc<dyn Fn(ResourceId, ChunkHash) -> bool + Send + Sync>;

struct Entry {
    size: u64,
    used: u64,
}

#[derive(Default)]
struct Index {
    files: HashMap<Key, Entry>,
    queued: HashSet<Key>,
    bytes: u64,
    tick: u64,
}

/// The backing files of this device and the worker that makes them.
pub struct Backings {
    opts: Options,
    index: Mutex<Index>,
    enabled: AtomicBool,
    jobs: Mutex<Option<std::sync::mpsc::SyncSender<(ResourceId, ChunkHash, Content)>>>,
    made: AtomicU64,
    pub(super) opens_cached: AtomicU64,
    pub(super) opens_passthrough: AtomicU64,
    pub(super) commits_from_backing: AtomicU64,
}

impl std::fmt::Debug for Backings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backings")
            .field("dir", &self.opts.dir)
            .finish()
    }
}

/// A backing file: the file and the digest of the version it holds.
type Key = (ResourceId, ChunkHash);

fn name(ino: ResourceId, digest: ChunkHash) -> String {
    format!("{}-{}", ino.0, digest)
}

fn parse(name: &str) -> Option<Key> {
    let (i, d) = name.split_once('-')?;
    Some((ResourceId(i.parse().ok()?), ChunkHash::parse_hex(d)?))
}

/// Jobs waiting for the worker at most; more are dropped (asked again at
/// the next open).
const QUEUE: usize = 64;

impl Backings {
    /// Opens the backing directory (made if missing), drops what a crash
    /// left half made and what `keep` says no to, and starts the worker
    /// that makes backing files with `read` (and, after each, drops the
    /// copies of files deleted or replaced meanwhile).
    pub fn start(opts: Options, read: ReadFn, keep: KeepFn) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&opts.dir)?;
        let mut index = Index::default();
        for e in std::fs::read_dir(&opts.dir)? {
            let e = e?;
            let file_name = e.file_name();
            let key = file_name.to_str().and_then(parse);
            match (key, e.metadata()) {
                (Some(key), Ok(m)) if m.is_file() => {
                    index.tick += 1;
                    index.bytes += m.len();
                    index.files.insert(
                        key,
                        Entry {
                            size: m.len(),
                            used: index.tick,
                        },
                    );
                }
                // Half made (`tmp-…`) or not ours.
                _ => {
                    if let Err(err) = std::fs::remove_file(e.path()) {
                        tracing::debug!(error = %err, path = %e.path().display(), "removing a stray backing file");
                    }
                }
            }
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<(ResourceId, ChunkHash, Content)>(QUEUE);
        let me = Arc::new(Backings {
            opts,
            index: Mutex::new(index),
            enabled: AtomicBool::new(true),
            jobs: Mutex::new(Some(tx)),
            made: AtomicU64::new(0),
            opens_cached: AtomicU64::new(0),
            opens_passthrough: AtomicU64::new(0),
            commits_from_backing: AtomicU64::new(0),
        });
        me.retain(|i, d| keep(i, d));
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("backing".into())
            .spawn(move || {
                while let Ok((ino, digest, content)) = rx.recv() {
                    let Some(me) = weak.upgrade() else { return };
                    me.make(ino, digest, &content, &read);
                    me.retain(|i, d| keep(i, d));
                }
            })?;
        Ok(me)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Stops passthrough for the rest of the run (the kernel or this
    /// process's rights do not allow it).
    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "FUSE passthrough is off for this mount ({why}); cached files are read through the daemon"
            );
        }
    }

    pub fn min_bytes(&self) -> u64 {
        self.opts.min_bytes
    }

    /// The backing file of `ino`'s version with `digest`, opened, when
    /// there is one of the version's size.
    pub fn ready(&self, ino: ResourceId, digest: ChunkHash, size: u64) -> Option<Arc<Backing>> {
        let key = (ino, digest);
        {
            let mut index = self.index();
            let idx = &mut *index;
            let e = idx.files.get_mut(&key)?;
            idx.tick += 1;
            e.used = idx.tick;
        }
        let path = self.opts.dir.join(name(ino, digest));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path);
        match opened {
            Ok(file) if file.metadata().is_ok_and(|m| m.len() == size) => Some(Arc::new(Backing {
                file,
                ino,
                digest,
                slot: Mutex::new(None),
            })),
            other => {
                tracing::warn!(
                    path = %path.display(),
                    error = ?other.err(),
                    "a backing file is missing or of the wrong size; dropped"
                );
                self.forget(ino, digest);
                None
            }
        }
    }

    /// Whether a backing file of this version is made or being made.
    pub fn known(&self, ino: ResourceId, digest: ChunkHash) -> bool {
        let index = self.index();
        index.files.contains_key(&(ino, digest)) || index.queued.contains(&(ino, digest))
    }

    /// Asks for a backing file of `content` (a version complete here),
    /// whose digest is `digest`.
    pub fn want(&self, ino: ResourceId, digest: ChunkHash, content: &Content) {
        let key = (ino, digest);
        if !self.index().queued.insert(key) {
            return;
        }
        let sent = match &*self.jobs.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.try_send((ino, digest, content.clone())).is_ok(),
            None => false,
        };
        if !sent {
            self.index().queued.remove(&key);
        }
    }

    /// Drops the backing file of `ino` with `digest` (its name only: an
    /// open one stays readable by whoever has it open).
    pub fn forget(&self, ino: ResourceId, digest: ChunkHash) {
        let removed = {
            let mut index = self.index();
            let e = index.files.remove(&(ino, digest));
            if let Some(e) = &e {
                index.bytes = index.bytes.saturating_sub(e.size);
            }
            e.is_some()
        };
        if removed {
            let path = self.opts.dir.join(name(ino, digest));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::debug!(error = %e, path = %path.display(), "removing a backing file");
            }
        }
    }

    /// Drops every backing file `keep` says no to (versions no longer
    /// current, files gone).
    pub fn retain(&self, keep: impl Fn(ResourceId, ChunkHash) -> bool) {
        // Asked without the index locked: `keep` reads the namespace.
        let all: Vec<Key> = self.index().files.keys().copied().collect();
        for (i, d) in all {
            if !keep(i, d) {
                self.forget(i, d);
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let index = self.index();
        Stats {
            enabled: self.enabled(),
            backing_files: index.files.len() as u64,
            backing_bytes: index.bytes,
            made: self.made.load(Ordering::Relaxed),
            opens_cached: self.opens_cached.load(Ordering::Relaxed),
            opens_passthrough: self.opens_passthrough.load(Ordering::Relaxed),
            commits_from_backing: self.commits_from_backing.load(Ordering::Relaxed),
        }
    }

    /// The worker's job: copies the version into `tmp-…`, flushes it to the
    /// disk and only then gives it its name, so that a crash never leaves a
    /// backing file with other bytes than its version's.
    fn make(&self, ino: ResourceId, digest: ChunkHash, content: &Content, read: &ReadFn) {
        let key = (ino, digest);
        let made = if content.size > self.opts.budget_bytes {
            Err(std::io::Error::other("larger than passthrough_cache_mb"))
        } else if !crate::storage::has_space(&self.opts.dir, content.size) {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            copy_out(&self.opts.dir, key, content, read)
        };
        self.index().queued.remove(&key);
        match made {
            Ok(()) => {
                let stale: Vec<ChunkHash> = {
                    let mut index = self.index();
                    let idx = &mut *index;
                    idx.tick += 1;
                    idx.bytes += content.size;
                    idx.files.insert(
                        key,
                        Entry {
                            size: content.size,
                            used: idx.tick,
                        },
                    );
                    idx.files
                        .keys()
                        .filter(|(i, d)| *i == ino && *d != digest)
                        .map(|(_, d)| *d)
                        .collect()
                };
                // An older version of the same file is never opened again.
                for d in stale {
                    self.forget(ino, d);
                }
                self.evict();
                // Counted last: whoever sees it sees the copy in place.
                self.made.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(%ino, error = %e, "no backing file made"),
        }
    }

    /// Least recently opened backing files go until the rest fit the budget.
    fn evict(&self) {
        loop {
            let victim = {
                let index = self.index();
                if index.bytes <= self.opts.budget_bytes {
                    return;
                }
                index
                    .files
                    .iter()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| *k)
            };
            match victim {
                Some((i, v)) => self.forget(i, v),
                None => return,
            }
        }
    }
}

/// Writes `content` over `file` (which ends up exactly its size).
pub fn fill(file: &std::fs::File, content: &Content, read: &ReadFn) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < content.size {
        let n = (content.size - at).min(buf.len() as u64) as usize;
        read(content, at, &mut buf[..n])?;
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    file.set_len(content.size)
}

fn copy_out(dir: &Path, key: Key, content: &Content, read: &ReadFn) -> std::io::Result<()> {
    let tmp = dir.join(format!("tmp-{}", name(key.0, key.1)));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        fill(&file, content, read)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name(key.0, key.1)))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> ChunkHash {
        ChunkHash::of(&[n])
    }

    fn ask(read_only: bool, clean: bool, ready: bool) -> Ask {
        Ask {
            read_only,
            clean,
            ready,
        }
    }

    fn backing(dir: &Path, version: u8) -> Arc<Backing> {
        Arc::new(Backing {
            file: std::fs::File::create(dir.join(version.to_string())).unwrap(),
            ino: ResourceId(7),
            digest: d(version),
            slot: Mutex::new(None),
        })
    }

    #[test]
    fn passthrough_and_page_cache_never_meet_on_one_inode() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = IoState::default();
        // A writer holds the page cache: a reader is cached too.
        assert_eq!(choose(&s, ask(false, true, true)), Mode::Cached);
        s.add(Mode::Cached, true, None);
        assert_eq!(choose(&s, ask(true, true, true)), Mode::Cached);
        s.remove(Mode::Cached, true);
        // A dirty file, or no backing file: cached.
        assert_eq!(choose(&s, ask(true, false, true)), Mode::Cached);
        assert_eq!(choose(&s, ask(true, true, false)), Mode::Cached);
        // Nothing open, backing file there: passthrough.
        assert_eq!(choose(&s, ask(true, true, true)), Mode::Passthrough);
        s.add(Mode::Passthrough, false, Some(backing(dir.path(), 1)));
        assert_eq!(s.pt.as_ref().and_then(|p| p.holds), Some(d(1)));
        // While it is open every open joins it, a writer too, which makes
        // what the backing file holds unknown until a commit says.
        assert_eq!(choose(&s, ask(false, true, false)), Mode::Passthrough);
        assert_eq!(choose(&s, ask(true, false, false)), Mode::Passthrough);
        s.add(Mode::Passthrough, true, None);
        let pt = s.pt.as_ref().unwrap();
        assert_eq!((pt.handles, pt.writers, pt.holds), (2, 1, None));
        s.remove(Mode::Passthrough, true);
        assert_eq!(s.pt.as_ref().map(|p| (p.handles, p.writers)), Some((1, 0)));
        s.remove(Mode::Passthrough, false);
        assert!(s.pt.is_none());
        assert_eq!(s.cached, 0);
    }

    fn content(version: u64, size: u64) -> Content {
        Content {
            version: crate::ids::VersionId(version),
            size,
            ..Content::default()
        }
    }

    fn want(b: &Backings, ino: u64, version: u64, size: u64) {
        b.want(ResourceId(ino), d(version as u8), &content(version, size));
    }

    fn known(b: &Backings, ino: u64, version: u64) -> bool {
        b.known(ResourceId(ino), d(version as u8))
    }

    fn wait_made(b: &Backings, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.stats().made < n {
            assert!(std::time::Instant::now() < deadline, "never made");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn backing_files_hold_their_version_replace_older_ones_and_fit_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        // A half-made file from a crash goes at start.
        let torn = dir
            .path()
            .join(format!("tmp-{}", name(ResourceId(1), d(1))));
        std::fs::write(&torn, b"torn").unwrap();
        let read: ReadFn = Arc::new(|c: &Content, at: u64, out: &mut [u8]| {
            for (k, b) in out.iter_mut().enumerate() {
                *b = ((at + k as u64) as u8).wrapping_add(c.version.0 as u8);
            }
            Ok(())
        });
        // Ino 9's file is gone: its copies go after each one made.
        let keep: KeepFn = Arc::new(|ino: ResourceId, _| ino != ResourceId(9));
        let b = Backings::start(
            Options {
                dir: dir.path().into(),
                budget_bytes: 10 << 20,
                min_bytes: 0,
            },
            read,
            keep,
        )
        .unwrap();
        assert!(!torn.exists());
        let ino = ResourceId(5);
        assert!(b.ready(ino, d(1), 6 << 20).is_none());
        want(&b, 5, 1, 6 << 20);
        wait_made(&b, 1);
        let got = b.ready(ino, d(1), 6 << 20).unwrap();
        let mut buf = vec![0u8; 16];
        got.file.read_exact_at(&mut buf, 5 << 20).unwrap();
        assert_eq!(buf[0], ((5u64 << 20) as u8).wrapping_add(1));
        // The wrong size (a torn or foreign file) is not served.
        assert!(b.ready(ino, d(1), 1).is_none());
        assert!(!known(&b, 5, 1));
        // A newer version replaces the older one's file.
        want(&b, 5, 1, 6 << 20);
        wait_made(&b, 2);
        want(&b, 5, 2, 1 << 20);
        wait_made(&b, 3);
        assert!(!known(&b, 5, 1));
        assert!(known(&b, 5, 2));
        // Over the budget, the least recently opened go.
        want(&b, 6, 1, 6 << 20);
        wait_made(&b, 4);
        want(&b, 8, 1, 6 << 20);
        wait_made(&b, 5);
        let s = b.stats();
        assert!(s.backing_bytes <= 10 << 20, "{s:?}");
        assert!(known(&b, 8, 1));
        assert!(!known(&b, 6, 1));
        // Larger than the whole budget: never made.
        want(&b, 10, 1, 11 << 20);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!known(&b, 10, 1));
        // A copy of a file deleted meanwhile is dropped.
        want(&b, 9, 1, 1 << 20);
        wait_made(&b, 6);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!known(&b, 9, 1));
    }
}
