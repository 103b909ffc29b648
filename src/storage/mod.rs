//! Local persistence; the only module that imports rocksdb. It owns the chunk
//! cache (content addressed by BLAKE3, verified on every read from disk,
//! reference counted so that overwritten and deleted content is collected)
//! and the persisted copy of the namespace state. `ChunkStore` has a RocksDB
//! implementation and an in-memory one; both pass `conformance`.

mod mem;
mod rocks;

/// The conformance suite every `ChunkStore` passes (test-only).
#[cfg(test)]
#[path = "tests.rs"]
pub(crate) mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::ids::ChunkHash;

pub use mem::MemChunkStore;
pub use rocks::{AccessRecord, CheckProgress, CheckReport, Extra, RocksStore};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("chunk {hash} failed BLAKE3 verification")]
    Corrupt { hash: ChunkHash },
    #[error("no space left on the data dir's disk")]
    NoSpace,
    #[error("stored data could not be decoded: {0}")]
    Decode(String),
    #[error("database error: {0}")]
    Db(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts of what the chunk store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreStats {
    pub chunks: u64,
    pub bytes: u64,
}

/// Content-addressed chunk storage with reference counts.
pub trait ChunkStore: Send + Sync {
    /// Stores `data` under its BLAKE3 hash and pins it until `unpin`, so that a
    /// concurrent release of the same content cannot delete it before the
    /// version that uses it is committed.
    fn put(&self, data: &[u8]) -> Result<ChunkHash, StorageError>;
    /// Like `put`, for large commits: the store may skip its write-ahead log
    /// for these bytes, as long as they are durable before any namespace
    /// change is persisted (RocksDB flushes the chunk family first). This
    /// writes content to disk once instead of twice.
    fn put_bulk(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        self.put(data)
    }
    /// Stores a chunk fetched from another device, without a pin: it stays
    /// as cache until a garbage collection or a release of references finds
    /// it unreferenced.
    fn put_cached(&self, data: &[u8]) -> Result<ChunkHash, StorageError>;
    /// Reads and verifies a chunk. `Ok(None)` when absent, `Corrupt` when the
    /// bytes on disk do not hash to `hash`.
    fn get(&self, hash: &ChunkHash) -> Result<Option<Vec<u8>>, StorageError>;
    fn contains(&self, hash: &ChunkHash) -> Result<bool, StorageError>;
    /// Applies reference count changes; a chunk whose count reaches zero and
    /// is not pinned is deleted in the same write.
    fn apply_refs(&self, deltas: &BTreeMap<ChunkHash, i64>) -> Result<(), StorageError>;
    fn refcount(&self, hash: &ChunkHash) -> Result<u64, StorageError>;
    /// Releases pins taken by `put` or `pin`; a chunk left with neither pins
    /// nor references (its version was never committed) is deleted.
    fn unpin(&self, hashes: &[ChunkHash]);
    /// Pins chunks already stored (one more pin each), so that they survive
    /// until `unpin` whatever happens to their references: a version applied
    /// here but not yet committed through Raft holds its chunks this way.
    fn pin(&self, hashes: &[ChunkHash]);
    /// Deletes every chunk with no references and no pins; returns how many.
    fn collect_garbage(&self) -> Result<u64, StorageError>;
    /// Drops the local copies of `hashes` (cache eviction: other devices
    /// hold them) while keeping their reference counts; pinned chunks are
    /// kept. Returns the bytes freed.
    fn evict(&self, hashes: &[ChunkHash]) -> Result<u64, StorageError>;
    fn stats(&self) -> Result<StoreStats, StorageError>;
}

/// Persistence of namespace changes, beside the chunks.
pub trait MetaStore: Send + Sync {
    /// Writes one command's changes and its chunk reference deltas atomically.
    fn persist(&self, changes: &crate::meta::Changes, sync: bool) -> Result<(), StorageError>;
    /// Makes every earlier write durable.
    fn sync(&self) -> Result<(), StorageError>;
    /// `sync` if anything was written since the last one; says whether it
    /// synced. The daemon calls it periodically (Config `sync_interval_ms`).
    fn sync_if_dirty(&self) -> Result<bool, StorageError> {
        self.sync()?;
        Ok(true)
    }
}

/// Everything the filesystem needs from storage.
pub trait Store: ChunkStore + MetaStore {}
impl<T: ChunkStore + MetaStore> Store for T {}

/// In-flight pins: chunks written for a version not committed yet.
#[derive(Default, Debug)]
pub(crate) struct Pins {
    map: Mutex<HashMap<ChunkHash, usize>>,
}

impl Pins {
    /// Runs `f` with the pin table locked: deletion decisions and new pins
    /// are serialised against each other.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut HashMap<ChunkHash, usize>) -> T) -> T {
        f(&mut crate::lock(&self.map))
    }

    /// Adds one pin to each of `hashes`.
    pub(crate) fn pin(&self, hashes: &[ChunkHash]) {
        self.with(|m| {
            for h in hashes {
                *m.entry(*h).or_insert(0) += 1;
            }
        })
    }

    /// Releases pins; `on_released` runs with the table still locked and
    /// gets the chunks no pin holds any more, so that it can drop those no
    /// version references before any new put could pin them again.
    pub(crate) fn unpin_then<T>(
        &self,
        hashes: &[ChunkHash],
        on_released: impl FnOnce(&mut HashMap<ChunkHash, usize>, Vec<ChunkHash>) -> T,
    ) -> T {
        self.with(|m| {
            let mut released = Vec::new();
            for h in hashes {
                if let Some(n) = m.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(h);
                        released.push(*h);
                    }
                }
            }
            on_released(m, released)
        })
    }
}

/// Free space every writer leaves on the data dir's disk, so that RocksDB can
/// always still flush its memtables (whose content is already in the WAL,
/// so a flush needs that much again) and write its log and manifest (to
/// delete files, to restart): a full disk shows as ENOSPC to programs, never
/// as a store stuck in read-only mode. The memtable budget plus 2% of the
/// disk, the latter between 1 and 256 MiB.
pub fn space_reserve(total: u64) -> u64 {
    rocks::MEMTABLE_BUDGET + (total / 50).clamp(1 << 20, 256 << 20)
}

/// Total size of the filesystem holding `path`, if statvfs answers.
pub fn disk_size(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_blocks.saturating_mul(st.f_frsize.max(1)))
}

/// Whether the disk holding `path` has more than the reserve free, after
/// writing `incoming` more bytes. Unknown (statvfs failed) counts as yes.
pub fn has_space(path: &std::path::Path, incoming: u64) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return true;
    }
    let frsize = st.f_frsize.max(1);
    let total = st.f_blocks.saturating_mul(frsize);
    let avail = st.f_bavail.saturating_mul(frsize);
    avail.saturating_sub(incoming) > space_reserve(total)
}

/// Verifies bytes read from disk against the hash they are stored under.
pub(crate) fn verify(hash: &ChunkHash, data: &[u8]) -> Result<(), StorageError> {
    if ChunkHash::of(data) == *hash {
        Ok(())
    } else {
        tracing::error!(chunk = %hash, "chunk failed BLAKE3 verification; refusing to serve it");
        Err(StorageError::Corrupt { hash: *hash })
    }
}
