//! The RocksDB store: one database per device, with column families
//! `chunks` (hash -> bytes, large values in blob files so compaction does not
//! rewrite content), `present` (hash -> length of each chunk stored here),
//! `refs` (hash -> reference count) and `meta` (the
//! namespace: inodes, entries, counters). A namespace change and the chunk
//! reference changes it implies are one atomic write batch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, ErrorKind,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::lock;

use super::{verify, ChunkStore, Pins, StorageError, StoreStats};
use crate::ids::{ChunkHash, ResourceId, VersionId};
use crate::meta::{Changes, Entry, Inode, MetaState, OldVersion, Snapshot, Trashed};

#[path = "access_log.rs"]
mod access_log;
pub use access_log::AccessRecord;
#[path = "raft_log.rs"]
mod raft_log;
use access_log::CF_ACCESS;
pub use raft_log::Extra;
use raft_log::CF_RAFT_LOG;

const CF_CHUNKS: &str = "chunks";
const CF_REFS: &str = "refs";
const CF_META: &str = "meta";
/// hash -> length (u64 LE) of every chunk stored here: answers "is it here?"
/// without reading the chunk. RocksDB reads a blob value in full on every
/// get, so `contains` over a big file read all of it: the holdings listing
/// after each change read the whole store, and a file's first read read it
/// twice.
const CF_PRESENT: &str = "present";
/// Every column family, for whole-database operations.
const FAMILIES: [&str; 6] = [
    CF_CHUNKS,
    CF_REFS,
    CF_PRESENT,
    CF_META,
    CF_RAFT_LOG,
    CF_ACCESS,
];

/// Largest amount of data the memtables of all families can hold; the space
/// reserve keeps this much free so that a flush never fails for space.
pub const MEMTABLE_BUDGET: u64 = 2 * (CHUNKS_MEMTABLE + 2 * SMALL_MEMTABLE) as u64;
const CHUNKS_MEMTABLE: usize = 8 << 20;
const SMALL_MEMTABLE: usize = 4 << 20;

/// The inode allocator (`meta::InoSpace`); its presence marks an
/// initialised namespace.
const KEY_SPACE: &[u8] = b"c/space";
/// What marked a namespace before inode blocks: such a data dir is refused
/// with a clear message rather than misread.
const KEY_NEXT_INO_OLD: &[u8] = b"c/next_ino";
/// A device's local changes not yet committed through Raft, by sequence
/// number (see `raft/outbox.rs`).
const PREFIX_OUTBOX: u8 = b'o';
/// Tentative changes made while their authority was out of reach, by
/// sequence number (see `raft/journal.rs`).
const PREFIX_JOURNAL: u8 = b'j';
/// Conflicts met when tentative changes were reintegrated.
const PREFIX_CONFLICT: u8 = b'k';
const KEY_STATS: &[u8] = b"c/stats";
/// Present while `present` is known to match the chunks: written at a clean
/// close (after every family is flushed), removed at open. Chunks written
/// without the WAL may be flushed without their presence entries, so after
/// a crash (or in a data dir from before the index) it is rebuilt from the
/// chunks themselves.
const KEY_PRESENT_EXACT: &[u8] = b"c/present_exact";
const PREFIX_INODE: u8 = b'i';
const PREFIX_ENTRY: u8 = b'e';
/// Old versions of files, by inode and version number.
const PREFIX_VERSION: u8 = b'v';
/// Trashed files, by their old inode number.
const PREFIX_TRASH: u8 = b't';

/// Bytes RocksDB holds in memory (see `RocksStore::memory_usage`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MemoryUsage {
    pub memtables: u64,
    pub block_cache: u64,
    pub table_readers: u64,
}

pub struct RocksStore {
    /// Shared with the background space-reclaim thread.
    db: std::sync::Arc<DB>,
    /// Set while a background compaction reclaims deleted chunks' space.
    reclaiming: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reclaim_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pins: Pins,
    /// Count of chunk writes that skipped the WAL, and how many of them a
    /// flush has made durable: unequal means a flush is owed before the next
    /// namespace change may reference them.
    bulk_written: AtomicU64,
    bulk_flushed: AtomicU64,
    /// WAL writes made without sync, and how many a sync has covered.
    wal_written: AtomicU64,
    wal_synced: AtomicU64,
    /// Chunk count and bytes; changed only with the pin table locked, and
    /// persisted in the same batches as the chunks they count. Shared with
    /// the reclaim thread, which checks after each pass whether it is done.
    stats: std::sync::Arc<Mutex<StoreStats>>,
}

impl Drop for RocksStore {
    /// A store closed without `flush` (an offline `meshfs check`, a test)
    /// is still a clean close: flushing here spares the next open a rebuild
    /// of the presence index. A crash never gets here.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "flushing the store at close failed");
        }
    }
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.db.path())
            .finish()
    }
}

fn db_err(e: rocksdb::Error) -> StorageError {
    let msg = e.to_string();
    if msg.contains("No space left") || msg.contains("NoSpace") {
        StorageError::NoSpace
    } else {
        StorageError::Db(msg)
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Decode(format!("{what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(v).map_err(|e| StorageError::Decode(e.to_string()))
}

fn inode_key(ino: ResourceId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_INODE;
    k[1..].copy_from_slice(&ino.0.to_be_bytes());
    k
}

fn version_key(ino: ResourceId, ver: VersionId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = PREFIX_VERSION;
    k[1..9].copy_from_slice(&ino.0.to_be_bytes());
    k[9..].copy_from_slice(&ver.0.to_be_bytes());
    k
}

fn trash_key(ino: ResourceId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_TRASH;
    k[1..].copy_from_slice(&ino.0.to_be_bytes());
    k
}

/// A big-endian u64 from a key part the caller cut to 8 bytes.
fn u64_of_be(b: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| StorageError::Decode("key part is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(arr))
}

fn entry_key(parent: ResourceId, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.push(PREFIX_ENTRY);
    k.extend_from_slice(&parent.0.to_be_bytes());
    k.extend_from_slice(name);
    k
}

fn u64_of(bytes: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StorageError::Decode("counter is not 8 bytes".into()))?;
    Ok(u64::from_le_bytes(arr))
}

/// What `check` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    pub inodes: u64,
    pub chunks_referenced: u64,
    pub missing_chunks: Vec<String>,
    pub corrupt_chunks: Vec<String>,
    pub wrong_refcounts: Vec<String>,
    /// Chunks whose entry in the presence index is missing, stale or of
    /// another length.
    #[serde(default)]
    pub presence_mismatch: Vec<String>,
    pub unreferenced_chunks: u64,
    /// Chunks not stored here that a live member holds (in a mesh, content
    /// lives on `replicas` devices, not necessarily this one).
    #[serde(default)]
    pub held_elsewhere: u64,
    /// Chunks not stored here that could not be checked elsewhere (the
    /// daemon is not running, so other devices cannot be asked).
    #[serde(default)]
    pub unverified_not_here: u64,
    /// Disagreements between the namespace in memory, on disk and the Raft
    /// log's applied position.
    #[serde(default)]
    pub state_mismatch: Vec<String>,
}

/// How far a `check_with` is: referenced chunks looked at, and bytes read
/// and verified, of the totals (the bytes of those stored here). Shared
/// with whoever shows it while the check runs.
#[derive(Debug, Default)]
pub struct CheckProgress {
    pub chunks_done: AtomicU64,
    pub chunks_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
}

impl CheckProgress {
    /// (bytes done, bytes total, chunks done, chunks total) as of now.
    pub fn now(&self) -> (u64, u64, u64, u64) {
        (
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total.load(Ordering::Relaxed),
            self.chunks_done.load(Ordering::Relaxed),
            self.chunks_total.load(Ordering::Relaxed),
        )
    }
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.missing_chunks.is_empty()
            && self.corrupt_chunks.is_empty()
            && self.wrong_refcounts.is_empty()
            && self.presence_mismatch.is_empty()
            && self.state_mismatch.is_empty()
    }
}

impl RocksStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let cache = Cache::new_lru_cache(16 << 20);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);

        // Recovery must not need free space: a device that stopped on a full
        // disk has to start again so that its user can delete files. The
        // binding has no setter for this one, hence the options string.
        let mut db_opts = Options::default()
            .get_options_from_string("avoid_flush_during_recovery=true")
            .map_err(db_err)?;
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        // Let the kernel read ahead in blob files: a file's chunks sit
        // one after another in them, and reads mostly go front to back.
        // RocksDB's default (POSIX_FADV_RANDOM on every file) turned a cold
        // sequential read into 64 KiB reads, one at a time.
        db_opts.set_advise_random_on_open(false);
        // Bounds memory: the daemon's RSS target is far below RocksDB defaults
        // with several column families.
        db_opts.set_db_write_buffer_size(MEMTABLE_BUDGET as usize);
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_keep_log_file_num(3);

        let mut chunks = Options::default();
        chunks.set_block_based_table_factory(&table);
        chunks.set_write_buffer_size(CHUNKS_MEMTABLE);
        chunks.set_max_write_buffer_number(2);
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(1024);
        // Content is often already compressed media; BLAKE3 checks integrity.
        chunks.set_blob_compression_type(DBCompressionType::None);
        // No blob garbage collection in ordinary compactions: with it, the
        // L0 compactions during a large write relocated the oldest quarter
        // of blob files, often that same write's first chunks, so much of
        // the data was written twice. Deleted content is reclaimed by
        // `compact_chunks` instead, which relocates live blobs only when
        // dropping dead blob files whole was not enough.
        chunks.set_enable_blob_gc(false);
        chunks.set_compression_type(DBCompressionType::None);

        let mut small = Options::default();
        small.set_block_based_table_factory(&table);
        small.set_write_buffer_size(SMALL_MEMTABLE);
        small.set_max_write_buffer_number(2);
        small.set_compression_type(DBCompressionType::Lz4);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_REFS, small.clone()),
            ColumnFamilyDescriptor::new(CF_PRESENT, small.clone()),
            ColumnFamilyDescriptor::new(CF_META, small.clone()),
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, small.clone()),
            ColumnFamilyDescriptor::new(CF_ACCESS, small),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(db_err)?;
        let store = RocksStore {
            db: std::sync::Arc::new(db),
            reclaiming: Default::default(),
            reclaim_thread: Mutex::new(None),
            pins: Pins::default(),
            bulk_written: AtomicU64::new(0),
            bulk_flushed: AtomicU64::new(0),
            wal_written: AtomicU64::new(0),
            wal_synced: AtomicU64::new(0),
            stats: Default::default(),
        };
        let stats = match store
            .db
            .get_cf(store.cf(CF_META), KEY_STATS)
            .map_err(db_err)?
        {
            Some(b) => decode(&b, "stats")?,
            None => StoreStats::default(),
        };
        *lock(&store.stats) = stats;
        store.build_presence_if_needed()?;
        Ok(store)
    }

    /// Rebuilds `present` from the chunks themselves unless the last close
    /// was clean (this reads every chunk, as the start-up garbage collection
    /// did before the index existed), then marks it unverified until the
    /// next clean close.
    fn build_presence_if_needed(&self) -> Result<(), StorageError> {
        let meta = self.cf(CF_META);
        let exact = self.db.get_cf(meta, KEY_PRESENT_EXACT).map_err(db_err)?;
        if exact.is_none() {
            self.build_presence()?;
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_cf_opt(meta, KEY_PRESENT_EXACT, &wo)
            .map_err(db_err)
    }

    fn build_presence(&self) -> Result<(), StorageError> {
        let present = self.cf(CF_PRESENT);
        // Chunk keys are 32 bytes: this range holds every entry.
        self.db
            .delete_range_cf(present, &[][..], &[0xffu8; 33][..])
            .map_err(db_err)?;
        let mut batch = WriteBatch::default();
        let mut n = 0u64;
        for item in self.scan_chunks() {
            let (k, len) = item?;
            batch.put_cf(present, &k, (len as u64).to_le_bytes());
            n += 1;
            if batch.len() >= 1024 {
                self.db.write(std::mem::take(&mut batch)).map_err(db_err)?;
            }
        }
        self.db.write(batch).map_err(db_err)?;
        if n > 0 {
            tracing::info!(chunks = n, "indexed the chunks stored here");
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        // The families are created at open, so a missing one is a bug
        // in this file, not bad input.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The namespace as last persisted, or `None` for a fresh database.
    pub fn load_meta(&self) -> Result<Option<Snapshot>, StorageError> {
        let cf = self.cf(CF_META);
        let space = match self.db.get_cf(cf, KEY_SPACE).map_err(db_err)? {
            Some(b) => decode(&b, "inode allocator")?,
            None if self
                .db
                .get_cf(cf, KEY_NEXT_INO_OLD)
                .map_err(db_err)?
                .is_some() =>
            {
                return Err(StorageError::Decode(
                    "this data dir was made by an earlier meshfs (before inode blocks and \
                     authority); copy its files out with that version and create it anew"
                        .into(),
                ))
            }
            None => return Ok(None),
        };
        let mut inodes = Vec::new();
        let mut entries = Vec::new();
        let mut versions = Vec::new();
        let mut trash = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            match k.first() {
                Some(&PREFIX_INODE) => inodes.push(decode::<Inode>(&v, "inode")?),
                Some(&PREFIX_VERSION) if k.len() == 17 => {
                    let ino = ResourceId(u64_of_be(&k[1..9])?);
                    let ver = VersionId(u64_of_be(&k[9..17])?);
                    versions.push(((ino, ver), decode::<OldVersion>(&v, "old version")?));
                }
                Some(&PREFIX_TRASH) if k.len() == 9 => {
                    let ino = ResourceId(u64_of_be(&k[1..9])?);
                    trash.push((ino, decode::<Trashed>(&v, "trash record")?));
                }
                Some(&PREFIX_ENTRY) if k.len() > 9 => {
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&k[1..9]);
                    let e: Entry = decode(&v, "entry")?;
                    entries.push((ResourceId(u64::from_be_bytes(p)), k[9..].to_vec(), e));
                }
                _ => {}
            }
        }
        Ok(Some(Snapshot {
            inodes,
            entries,
            space,
            versions,
            trash,
        }))
    }

    /// Persists one command's changes and their chunk reference deltas in
    /// one atomic batch. With `sync`, the WAL is on stable storage on return.
    fn persist_changes(&self, changes: &Changes, sync: bool) -> Result<(), StorageError> {
        self.persist_changes_with(changes, &[], sync)
    }

    /// `persist_changes` plus arbitrary meta-family writes in the same batch.
    fn persist_changes_with(
        &self,
        changes: &Changes,
        extra: &[Extra],
        sync: bool,
    ) -> Result<(), StorageError> {
        self.flush_bulk()?;
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        for (ino, inode) in &changes.inodes {
            match inode {
                Some(i) => batch.put_cf(meta, inode_key(*ino), encode(i)?),
                None => batch.delete_cf(meta, inode_key(*ino)),
            }
        }
        for (parent, name, entry) in &changes.entries {
            match entry {
                Some(e) => batch.put_cf(meta, entry_key(*parent, name), encode(e)?),
                None => batch.delete_cf(meta, entry_key(*parent, name)),
            }
        }
        if let Some(space) = &changes.space {
            batch.put_cf(meta, KEY_SPACE, encode(space)?);
        }
        for ((ino, ver), v) in &changes.versions {
            match v {
                Some(v) => batch.put_cf(meta, version_key(*ino, *ver), encode(v)?),
                None => batch.delete_cf(meta, version_key(*ino, *ver)),
            }
        }
        for (ino, t) in &changes.trash {
            match t {
                Some(t) => batch.put_cf(meta, trash_key(*ino), encode(t)?),
                None => batch.delete_cf(meta, trash_key(*ino)),
            }
        }
        for (k, v) in extra {
            match v {
                Some(v) => batch.put_cf(meta, k, v),
                None => batch.delete_cf(meta, k),
            }
        }
        self.write_with_refs(batch, &changes.chunk_deltas, sync)
    }

    /// Adds the reference deltas (and deletions of chunks left unreferenced)
    /// to `batch` and writes it, with the pin table locked throughout.
    fn write_with_refs(
        &self,
        mut batch: WriteBatch,
        deltas: &BTreeMap<ChunkHash, i64>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let refs = self.cf(CF_REFS);
        let chunks = self.cf(CF_CHUNKS);
        let present = self.cf(CF_PRESENT);
        self.pins.with(|pins| {
            let mut stats = *lock(&self.stats);
            for (h, d) in deltas {
                let cur = match self.db.get_cf(refs, h.as_bytes()).map_err(db_err)? {
                    Some(b) => u64_of(&b)?,
                    None => 0,
                };
                let new = (cur as i64).saturating_add(*d).max(0) as u64;
                if new == 0 {
                    batch.delete_cf(refs, h.as_bytes());
                    if !pins.contains_key(h) {
                        if let Some(len) = self.chunk_len(h)? {
                            batch.delete_cf(chunks, h.as_bytes());
                            batch.delete_cf(present, h.as_bytes());
                            stats.chunks = stats.chunks.saturating_sub(1);
                            stats.bytes = stats.bytes.saturating_sub(len);
                        }
                    }
                } else {
                    batch.put_cf(refs, h.as_bytes(), new.to_le_bytes());
                }
            }
            batch.put_cf(self.cf(CF_META), KEY_STATS, encode(&stats)?);
            let mut wo = WriteOptions::default();
            wo.set_sync(sync);
            self.db.write_opt(batch, &wo).map_err(db_err)?;
            if !sync {
                self.wal_written.fetch_add(1, Ordering::AcqRel);
            }
            let deleted = stats.bytes < lock(&self.stats).bytes;
            *lock(&self.stats) = stats;
            if deleted {
                self.reclaim_in_background();
            }
            Ok(())
        })
    }

    /// Iterates the chunk family without verifying content checksums: scans
    /// that only need keys and sizes must not stop at one damaged chunk
    /// (reads of content always verify).
    fn scan_chunks(&self) -> impl Iterator<Item = Result<(Box<[u8]>, usize), StorageError>> + '_ {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        ro.fill_cache(false);
        self.db
            .iterator_cf_opt(self.cf(CF_CHUNKS), ro, IteratorMode::Start)
            .map(|item| item.map(|(k, v)| (k, v.len())).map_err(db_err))
    }

    /// Makes chunks written without the WAL durable (flush of the chunk
    /// family's memtable to blob and table files, which RocksDB syncs).
    fn flush_bulk(&self) -> Result<(), StorageError> {
        let written = self.bulk_written.load(Ordering::Acquire);
        if written == self.bulk_flushed.load(Ordering::Acquire) {
            return Ok(());
        }
        // The presence entries went without the WAL too.
        let fo = rocksdb::FlushOptions::default();
        self.db
            .flush_cfs_opt(&[self.cf(CF_CHUNKS), self.cf(CF_PRESENT)], &fo)
            .map_err(db_err)?;
        self.bulk_flushed.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    fn put_with(&self, data: &[u8], bulk: bool, pin: bool) -> Result<ChunkHash, StorageError> {
        let hash = ChunkHash::of(data);
        let chunks = self.cf(CF_CHUNKS);
        let unpin_one = |pins: &mut std::collections::HashMap<ChunkHash, usize>,
                         hash: &ChunkHash| {
            if pin {
                unpin_one(pins, hash)
            }
        };
        self.pins.with(|pins| {
            if pin {
                *pins.entry(hash).or_insert(0) += 1;
            }
            // A stored copy that differs from these bytes (which hash to the
            // key) is damaged and is rewritten: writing the same content
            // again heals it. Comparing costs less than hashing again.
            let stored = self.raw_chunk(&hash)?.map(|v| v.as_ref() == data);
            if stored == Some(true) && self.chunk_len(&hash)?.is_none() {
                // Stored, but its presence entry was lost (a crash between
                // flushes of the two families): put it back.
                let mut wo = WriteOptions::default();
                wo.disable_wal(bulk);
                let len = (data.len() as u64).to_le_bytes();
                if let Err(e) = self
                    .db
                    .put_cf_opt(self.cf(CF_PRESENT), hash.as_bytes(), len, &wo)
                    .map_err(db_err)
                {
                    unpin_one(pins, &hash);
                    return Err(e);
                }
                if bulk {
                    self.bulk_written.fetch_add(1, Ordering::AcqRel);
                }
            }
            if stored != Some(true) {
                if !super::has_space(self.db.path(), data.len() as u64) {
                    unpin_one(pins, &hash);
                    return Err(StorageError::NoSpace);
                }
                let mut stats = *lock(&self.stats);
                if stored.is_none() {
                    stats.chunks += 1;
                    stats.bytes += data.len() as u64;
                } else {
                    tracing::warn!(chunk = %hash, "rewriting a damaged chunk with good content");
                }
                let mut batch = WriteBatch::default();
                batch.put_cf(chunks, hash.as_bytes(), data);
                batch.put_cf(
                    self.cf(CF_PRESENT),
                    hash.as_bytes(),
                    (data.len() as u64).to_le_bytes(),
                );
                batch.put_cf(self.cf(CF_META), KEY_STATS, encode(&stats)?);
                let mut wo = WriteOptions::default();
                wo.disable_wal(bulk);
                if let Err(e) = self.db.write_opt(batch, &wo).map_err(db_err) {
                    unpin_one(pins, &hash);
                    return Err(e);
                }
                if bulk {
                    self.bulk_written.fetch_add(1, Ordering::AcqRel);
                } else {
                    self.wal_written.fetch_add(1, Ordering::AcqRel);
                }
                *lock(&self.stats) = stats;
            }
            Ok(hash)
        })
    }

    /// A chunk's stored bytes, unverified (RocksDB's checksum included), for
    /// callers that check or only measure them: a damaged chunk must still
    /// be deletable and replaceable.
    fn raw_chunk(
        &self,
        h: &ChunkHash,
    ) -> Result<Option<rocksdb::DBPinnableSlice<'_>>, StorageError> {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        self.db
            .get_pinned_cf_opt(self.cf(CF_CHUNKS), h.as_bytes(), &ro)
            .map_err(db_err)
    }

    /// A chunk's length if it is stored here, from the presence index
    /// (without reading the chunk).
    fn chunk_len(&self, h: &ChunkHash) -> Result<Option<u64>, StorageError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_PRESENT), h.as_bytes())
            .map_err(db_err)?
        {
            Some(v) => Ok(Some(u64_of(&v)?)),
            None => Ok(None),
        }
    }

    /// What RocksDB holds in memory, for `meshfs status`: memtables of
    /// every column family, the shared block cache (index blocks included)
    /// and table readers outside it.
    pub fn memory_usage(&self) -> MemoryUsage {
        let prop = |cf: &str, name: &str| {
            self.db
                .cf_handle(cf)
                .and_then(|h| self.db.property_int_value_cf(h, name).ok().flatten())
                .unwrap_or(0)
        };
        MemoryUsage {
            memtables: FAMILIES
                .iter()
                .map(|cf| prop(cf, "rocksdb.cur-size-all-mem-tables"))
                .sum(),
            table_readers: FAMILIES
                .iter()
                .map(|cf| prop(cf, "rocksdb.estimate-table-readers-mem"))
                .sum(),
            // One cache shared by every family.
            block_cache: prop(CF_META, "rocksdb.block-cache-usage"),
        }
    }

    /// Writes memtables to table files, so a clean shutdown leaves nothing
    /// to replay from the WAL, and marks the presence index exact for the
    /// next open.
    pub fn flush(&self) -> Result<(), StorageError> {
        for cf in FAMILIES {
            self.db.flush_cf(self.cf(cf)).map_err(db_err)?;
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(self.cf(CF_META), KEY_PRESENT_EXACT, [1u8], &wo)
            .map_err(db_err)
    }

    fn garbage_bytes(&self) -> u64 {
        garbage_bytes(&self.db, &self.stats)
    }

    fn needs_reclaim(&self) -> bool {
        needs_reclaim(&self.db, &self.stats)
    }

    /// Gives the disk space of deleted chunks back to the filesystem. RocksDB
    /// frees a blob file only once compaction has dropped every reference to
    /// it (and, for a file that still holds live chunks, relocated them):
    /// see `compact_chunks`. Says whether live chunks had to be relocated.
    pub fn reclaim_space(&self) -> Result<bool, StorageError> {
        compact_chunks(&self.db, || !self.needs_reclaim())
    }

    /// Starts `reclaim_space` on a background thread when worthwhile and not
    /// already running, so that `rm` returns promptly and space follows.
    fn reclaim_in_background(&self) {
        use std::sync::atomic::Ordering as O;
        if !self.needs_reclaim() || self.reclaiming.swap(true, O::AcqRel) {
            return;
        }
        let db = self.db.clone();
        let stats = self.stats.clone();
        let flag = self.reclaiming.clone();
        let spawned = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                if let Err(e) = compact_chunks(&db, || !needs_reclaim(&db, &stats)) {
                    tracing::warn!(error = %e, "reclaiming space of deleted chunks failed");
                }
                flag.store(false, O::Release);
            });
        match spawned {
            Ok(h) => {
                if let Some(old) = lock(&self.reclaim_thread).replace(h) {
                    let _ = old.join();
                }
            }
            Err(_) => self.reclaiming.store(false, O::Release),
        }
    }

    /// Waits for a background reclaim to finish, so that the database is
    /// closed (and its files let go) before the data dir lock is released.
    pub fn wait_background(&self) {
        if let Some(h) = lock(&self.reclaim_thread).take() {
            let _ = h.join();
        }
    }

    /// At start-up: reclaim synchronously if a previous run left much
    /// garbage (for example, files deleted on a full disk).
    pub fn reclaim_if_needed(&self) -> Result<(), StorageError> {
        if self.needs_reclaim() {
            tracing::info!(
                garbage_bytes = self.garbage_bytes(),
                "reclaiming space of deleted chunks"
            );
            self.reclaim_space()?;
        }
        Ok(())
    }

    /// Verifies the store against the namespace: every referenced chunk is
    /// present and intact and every reference count is right.
    pub fn check(&self, meta: &MetaState) -> Result<CheckReport, StorageError> {
        self.check_with(meta, &CheckProgress::default())
    }

    /// `check`, counting what it has read in `progress` as it goes (a
    /// check reads every referenced chunk stored here: minutes on a large
    /// store, so the command shows how far it is).
    pub fn check_with(
        &self,
        meta: &MetaState,
        progress: &CheckProgress,
    ) -> Result<CheckReport, StorageError> {
        let expected = meta.chunk_references();
        let mut report = CheckReport {
            inodes: meta.inode_count() as u64,
            chunks_referenced: expected.len() as u64,
            ..Default::default()
        };
        // The bytes to read: what the index says is stored here (chunks
        // missing here are not read).
        let mut total = 0u64;
        for h in expected.keys() {
            total += self.chunk_len(h)?.unwrap_or(0);
        }
        progress
            .chunks_total
            .store(expected.len() as u64, Ordering::Relaxed);
        progress.bytes_total.store(total, Ordering::Relaxed);
        for (h, want) in &expected {
            match self.get(h) {
                Ok(Some(data)) => {
                    progress
                        .bytes_done
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Ok(None) => report.missing_chunks.push(h.to_string()),
                Err(StorageError::Corrupt { .. }) => report.corrupt_chunks.push(h.to_string()),
                Err(e) => return Err(e),
            }
            progress.chunks_done.fetch_add(1, Ordering::Relaxed);
            let have = self.refcount(h)?;
            if have != *want {
                report
                    .wrong_refcounts
                    .push(format!("{h}: stored {have}, namespace has {want}"));
            }
        }
        let mut stored = 0u64;
        for item in self.scan_chunks() {
            let (k, len) = item?;
            let Some(h) = ChunkHash::from_slice(&k) else {
                continue;
            };
            stored += 1;
            if !expected.contains_key(&h) {
                report.unreferenced_chunks += 1;
            }
            match self.chunk_len(&h)? {
                Some(l) if l == len as u64 => {}
                Some(l) => report
                    .presence_mismatch
                    .push(format!("{h}: stored {len} bytes, index says {l}")),
                None => report
                    .presence_mismatch
                    .push(format!("{h}: stored, not in the index")),
            }
        }
        let indexed = self
            .db
            .iterator_cf(self.cf(CF_PRESENT), IteratorMode::Start)
            .count() as u64;
        if indexed > stored {
            report.presence_mismatch.push(format!(
                "{} chunks in the index are not stored",
                indexed - stored
            ));
        }
        Ok(report)
    }

    /// Path of the database directory.
    pub fn path(&self) -> &Path {
        self.db.path()
    }
}

/// Bytes in blob files that no live chunk uses any more.
fn garbage_bytes(db: &DB, stats: &Mutex<StoreStats>) -> u64 {
    let total = db
        .cf_handle(CF_CHUNKS)
        .and_then(|cf| {
            db.property_int_value_cf(cf, "rocksdb.total-blob-file-size")
                .ok()
                .flatten()
        })
        .unwrap_or(0);
    total.saturating_sub(lock(stats).bytes)
}

/// Whether deleted content holds enough disk space to be worth a
/// compaction: 64 MiB, or a quarter of what is stored; or any megabyte when
/// the disk is short of space (within 64 MiB of the reserve), where every
/// byte back decides whether the next write fits.
fn needs_reclaim(db: &DB, stats: &Mutex<StoreStats>) -> bool {
    let garbage = garbage_bytes(db, stats);
    garbage > (64 << 20).max(lock(stats).bytes / 4)
        || (garbage > 1 << 20 && !super::has_space(db.path(), 64 << 20))
}

fn compact_chunks(db: &DB, enough: impl Fn() -> bool) -> Result<bool, StorageError> {
    let Some(cf) = db.cf_handle(CF_CHUNKS) else {
        return Ok(false);
    };
    // Force the bottommost level too: by default RocksDB skips files already
    // there, and their references would keep dead blob files alive.
    let mut co = rocksdb::CompactOptions::default();
    co.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    // First pass, no relocation: compaction drops deleted chunks' keys, and
    // a blob file none of whose blobs is live any more is deleted whole.
    // That is the usual case (a deleted file's chunks were written
    // together) and costs reading keys only, not the content still stored.
    db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &co);
    if enough() {
        return Ok(false);
    }
    // Second pass: blob files mixing live and dead chunks. Garbage
    // collection with cutoff 1.0 rewrites the live blobs of every file.
    db.set_options_cf(
        cf,
        &[
            ("enable_blob_garbage_collection", "true"),
            ("blob_garbage_collection_age_cutoff", "1.0"),
        ],
    )
    .map_err(db_err)?;
    db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &co);
    db.set_options_cf(cf, &[("enable_blob_garbage_collection", "false")])
        .map_err(db_err)?;
    Ok(true)
}

fn unpin_one(pins: &mut std::collections::HashMap<ChunkHash, usize>, hash: &ChunkHash) {
    if let Some(n) = pins.get_mut(hash) {
        *n -= 1;
        if *n == 0 {
            pins.remove(hash);
        }
    }
}

impl RocksStore {
    /// Deletes chunks the caller found unreferenced and unpinned (with the
    /// pin table locked), in one batch with the stats, and starts reclaiming
    /// their space. Returns how many went.
    fn delete_chunks(&self, doomed: Vec<(ChunkHash, u64)>) -> Result<u64, StorageError> {
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut stats = *lock(&self.stats);
        let mut batch = WriteBatch::default();
        for (h, len) in &doomed {
            batch.delete_cf(self.cf(CF_CHUNKS), h.as_bytes());
            batch.delete_cf(self.cf(CF_PRESENT), h.as_bytes());
            stats.chunks = stats.chunks.saturating_sub(1);
            stats.bytes = stats.bytes.saturating_sub(*len);
        }
        batch.put_cf(self.cf(CF_META), KEY_STATS, encode(&stats)?);
        self.db.write(batch).map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        *lock(&self.stats) = stats;
        self.reclaim_in_background();
        Ok(doomed.len() as u64)
    }
}

impl super::MetaStore for RocksStore {
    fn persist(&self, changes: &Changes, sync: bool) -> Result<(), StorageError> {
        self.persist_changes(changes, sync)
    }

    /// Makes every earlier write durable (fsync of the WAL).
    fn sync(&self) -> Result<(), StorageError> {
        let written = self.wal_written.load(Ordering::Acquire);
        self.db.flush_wal(true).map_err(db_err)?;
        self.wal_synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    fn sync_if_dirty(&self) -> Result<bool, StorageError> {
        if self.wal_written.load(Ordering::Acquire) == self.wal_synced.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.sync()?;
        Ok(true)
    }
}

impl ChunkStore for RocksStore {
    fn put(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        self.put_with(data, false, true)
    }

    fn put_bulk(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        self.put_with(data, true, true)
    }

    fn put_cached(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        // Cache needs no WAL: losing it in a crash loses nothing, and the
        // bulk path makes it durable before any version can reference it.
        self.put_with(data, true, false)
    }

    fn get(&self, hash: &ChunkHash) -> Result<Option<Vec<u8>>, StorageError> {
        // BLAKE3 verifies every chunk end to end, so RocksDB's own blob CRC
        // (a software CRC32c in this build, 40% of a read's CPU) is skipped.
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        match self
            .db
            .get_pinned_cf_opt(self.cf(CF_CHUNKS), hash.as_bytes(), &ro)
        {
            Ok(Some(v)) => {
                verify(hash, &v)?;
                Ok(Some(v.to_vec()))
            }
            Ok(None) => Ok(None),
            Err(e) if e.kind() == ErrorKind::Corruption => {
                tracing::error!(chunk = %hash, error = %e, "RocksDB reports the chunk corrupt");
                Err(StorageError::Corrupt { hash: *hash })
            }
            Err(e) => Err(db_err(e)),
        }
    }

    fn contains(&self, hash: &ChunkHash) -> Result<bool, StorageError> {
        Ok(self.chunk_len(hash)?.is_some())
    }

    fn apply_refs(&self, deltas: &BTreeMap<ChunkHash, i64>) -> Result<(), StorageError> {
        self.flush_bulk()?;
        self.write_with_refs(WriteBatch::default(), deltas, false)
    }

    fn refcount(&self, hash: &ChunkHash) -> Result<u64, StorageError> {
        match self
            .db
            .get_cf(self.cf(CF_REFS), hash.as_bytes())
            .map_err(db_err)?
        {
            Some(b) => u64_of(&b),
            None => Ok(0),
        }
    }

    fn pin(&self, hashes: &[ChunkHash]) {
        self.pins.pin(hashes);
    }

    fn unpin(&self, hashes: &[ChunkHash]) {
        let r = self.pins.unpin_then(hashes, |_, released| {
            let mut doomed = Vec::new();
            for h in released {
                if self.refcount(&h)? == 0 {
                    if let Some(len) = self.chunk_len(&h)? {
                        doomed.push((h, len));
                    }
                }
            }
            self.delete_chunks(doomed)
        });
        if let Err(e) = r {
            // Left for the garbage collection at the next start.
            tracing::warn!(error = %e, "could not drop uncommitted chunks");
        }
    }

    fn collect_garbage(&self) -> Result<u64, StorageError> {
        self.pins.with(|pins| {
            let mut doomed = Vec::new();
            for item in self
                .db
                .iterator_cf(self.cf(CF_PRESENT), IteratorMode::Start)
            {
                let (k, v) = item.map_err(db_err)?;
                let Some(h) = ChunkHash::from_slice(&k) else {
                    continue;
                };
                if !pins.contains_key(&h) && self.refcount(&h)? == 0 {
                    doomed.push((h, u64_of(&v)?));
                }
            }
            self.delete_chunks(doomed)
        })
    }

    fn evict(&self, hashes: &[ChunkHash]) -> Result<u64, StorageError> {
        self.pins.with(|pins| {
            let mut doomed = Vec::new();
            for h in hashes {
                if pins.contains_key(h) {
                    continue;
                }
                if let Some(len) = self.chunk_len(h)? {
                    doomed.push((*h, len));
                }
            }
            let bytes = doomed.iter().map(|(_, l)| l).sum();
            self.delete_chunks(doomed)?;
            Ok(bytes)
        })
    }

    fn stats(&self) -> Result<StoreStats, StorageError> {
        Ok(*lock(&self.stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{FsCommand, NewNode, Timestamp};
    use crate::storage::MetaStore;

    impl crate::storage::conformance::Corrupt for RocksStore {
        fn corrupt(&self, hash: &ChunkHash) {
            // Rewrite the value with one byte flipped, bypassing `put`, so the
            // key no longer matches the content.
            let cf = self.cf(CF_CHUNKS);
            let mut v = self.db.get_cf(cf, hash.as_bytes()).unwrap().unwrap();
            v[0] ^= 0x55;
            self.db.put_cf(cf, hash.as_bytes(), v).unwrap();
        }
    }

    #[test]
    fn conformance() {
        let dirs = std::sync::Mutex::new(Vec::new());
        crate::storage::conformance::run_all(|| {
            let d = tempfile::tempdir().unwrap();
            let s = RocksStore::open(d.path()).unwrap();
            dirs.lock().unwrap().push(d);
            s
        });
    }

    /// Stores distinct 1 MiB chunks, one per seed, and then references each
    /// once (as one commit would: the references flush the chunks).
    fn put_referenced(s: &RocksStore, seeds: impl Iterator<Item = u64>) -> Vec<ChunkHash> {
        let hashes: Vec<ChunkHash> = seeds
            .map(|seed| {
                let mut data = vec![0u8; 1 << 20];
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for b in data.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.copy_from_slice(&x.to_le_bytes());
                }
                s.put_bulk(&data).unwrap()
            })
            .collect();
        s.apply_refs(&hashes.iter().map(|h| (*h, 1)).collect())
            .unwrap();
        s.unpin(&hashes);
        hashes
    }

    fn release(s: &RocksStore, hashes: &[ChunkHash]) {
        s.apply_refs(&hashes.iter().map(|h| (*h, -1)).collect())
            .unwrap();
    }

    fn wait_reclaimed(s: &RocksStore) {
        s.wait_background();
        assert!(!s.reclaiming.load(Ordering::Acquire));
    }

    #[test]
    fn a_deleted_file_is_reclaimed_without_rewriting_live_content() {
        let d = tempfile::tempdir().unwrap();
        let s = RocksStore::open(d.path()).unwrap();
        let before = put_referenced(&s, 0..8);
        let dead = put_referenced(&s, 100..180);
        let after = put_referenced(&s, 200..208);
        // Blob file headers and record headers only.
        assert!(s.garbage_bytes() < 1 << 20, "{}", s.garbage_bytes());
        let blob_files = || -> std::collections::BTreeSet<std::ffi::OsString> {
            std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n.to_string_lossy().ends_with(".blob"))
                .collect()
        };
        let written = blob_files();
        release(&s, &dead);
        // 80 MiB of garbage is over the threshold: the release started a
        // background reclaim.
        wait_reclaimed(&s);
        assert!(s.garbage_bytes() < 1 << 20, "{}", s.garbage_bytes());
        // The dead file's blob files are gone and no new one was written:
        // live chunks stayed where they were.
        let left = blob_files();
        assert!(left.len() < written.len(), "{left:?}");
        assert!(left.is_subset(&written), "{left:?} {written:?}");
        for h in before.iter().chain(&after) {
            assert!(s.get(h).unwrap().is_some());
        }
        assert!(!s.contains(&dead[0]).unwrap());
    }

    #[test]
    fn garbage_mixed_with_live_content_is_relocated_away() {
        let d = tempfile::tempdir().unwrap();
        let s = RocksStore::open(d.path()).unwrap();
        // One commit, so live and dead chunks share blob files.
        let all = put_referenced(&s, 0..160);
        let (live, dead): (Vec<_>, Vec<_>) = all.chunks(2).map(|p| (p[0], p[1])).unzip();
        release(&s, &dead);
        wait_reclaimed(&s);
        // Dropping whole blob files could not free these: every file also
        // holds live chunks, so the second pass had to move them.
        assert!(s.garbage_bytes() < 8 << 20, "{}", s.garbage_bytes());
        for h in &live {
            assert!(s.get(h).unwrap().is_some());
        }
    }

    #[test]
    fn presence_index_is_rebuilt_after_a_crash_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let hashes: Vec<ChunkHash>;
        {
            let s = RocksStore::open(d.path()).unwrap();
            hashes = (0..5u8).map(|i| s.put(&[i; 3000]).unwrap()).collect();
            s.apply_refs(&hashes.iter().map(|h| (*h, 1)).collect())
                .unwrap();
            s.unpin(&hashes);
        }
        {
            // As after a crash that lost the index entries (written without
            // the WAL): no mark of a clean close, and entries gone.
            let cfs = DB::list_cf(&Options::default(), d.path()).unwrap();
            let db = DB::open_cf(&Options::default(), d.path(), cfs).unwrap();
            let (meta, present) = (
                db.cf_handle(CF_META).unwrap(),
                db.cf_handle(CF_PRESENT).unwrap(),
            );
            assert!(db.get_cf(meta, KEY_PRESENT_EXACT).unwrap().is_some());
            db.delete_cf(meta, KEY_PRESENT_EXACT).unwrap();
            for h in &hashes {
                db.delete_cf(present, h.as_bytes()).unwrap();
            }
            // And one entry for a chunk that is not there.
            db.put_cf(present, [7u8; 32], 10u64.to_le_bytes()).unwrap();
        }
        let s = RocksStore::open(d.path()).unwrap();
        for h in &hashes {
            assert!(s.contains(h).unwrap());
            assert_eq!(s.chunk_len(h).unwrap(), Some(3000));
        }
        // Released and evicted chunks leave the index with the chunk.
        s.apply_refs(&[(hashes[0], -1)].into_iter().collect())
            .unwrap();
        assert!(!s.contains(&hashes[0]).unwrap());
        assert_eq!(s.evict(&[hashes[1]]).unwrap(), 3000);
        assert!(!s.contains(&hashes[1]).unwrap());
        let meta = MetaState::new(
            0,
            0,
            Timestamp { secs: 1, nanos: 0 },
            crate::ids::DeviceId([1; 16]),
        );
        let report = s.check(&meta).unwrap();
        assert!(report.presence_mismatch.is_empty(), "{report:?}");
        assert!(!s
            .contains(&ChunkHash::from_slice(&[7u8; 32]).unwrap())
            .unwrap());
        // A lost entry is reported, and storing the content again heals it.
        s.db.delete_cf(s.cf(CF_PRESENT), hashes[2].as_bytes())
            .unwrap();
        let report = s.check(&meta).unwrap();
        assert_eq!(report.presence_mismatch.len(), 1, "{report:?}");
        assert_eq!(s.put(&[2u8; 3000]).unwrap(), hashes[2]);
        s.unpin(&[hashes[2]]);
        assert!(s.contains(&hashes[2]).unwrap());
        assert!(s.check(&meta).unwrap().presence_mismatch.is_empty());
    }

    #[test]
    fn chunks_left_by_a_crash_are_collected_at_the_next_open() {
        let d = tempfile::tempdir().unwrap();
        let (kept, lost);
        {
            let s = RocksStore::open(d.path()).unwrap();
            kept = s.put(b"committed").unwrap();
            s.apply_refs(&[(kept, 1)].into_iter().collect()).unwrap();
            s.unpin(&[kept]);
            // Put for a version that never got committed: the process dies
            // with the pin held.
            lost = s.put(b"never committed").unwrap();
        }
        let s = RocksStore::open(d.path()).unwrap();
        assert!(s.contains(&lost).unwrap());
        assert_eq!(s.collect_garbage().unwrap(), 1);
        assert!(!s.contains(&lost).unwrap());
        assert!(s.contains(&kept).unwrap());
        assert_eq!(s.stats().unwrap().chunks, 1);
    }

    #[test]
    fn namespace_survives_reopen_and_check_is_clean() {
        let d = tempfile::tempdir().unwrap();
        let now = Timestamp { secs: 5, nanos: 0 };
        let ino;
        {
            let s = RocksStore::open(d.path()).unwrap();
            assert!(s.load_meta().unwrap().is_none());
            let mut m = MetaState::new(0, 0, now, crate::ids::DeviceId([1; 16]));
            s.persist(&m.take_changes(), true).unwrap();
            let out = m
                .apply(FsCommand::Create {
                    parent: ResourceId::ROOT,
                    name: b"f".to_vec(),
                    ino: crate::ids::ResourceId(0),
                    node: NewNode::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    now,
                })
                .unwrap();
            ino = match out {
                crate::meta::Outcome::Inode(i) => i.id,
                _ => unreachable!(),
            };
            let h = s.put(b"content").unwrap();
            m.apply(FsCommand::CommitVersion {
                ino,
                size: 7,
                chunks: vec![crate::meta::ChunkRef {
                    hash: h,
                    offset: 0,
                    len: 7,
                }],
                mtime: now,
                author: crate::ids::DeviceId([0; 16]),
                now,
            })
            .unwrap();
            s.persist(&m.take_changes(), true).unwrap();
            s.unpin(&[h]);
            let progress = CheckProgress::default();
            assert!(s.check_with(&m, &progress).unwrap().is_clean());
            // Every referenced byte was read, and counted.
            assert_eq!(progress.now(), (7, 7, 1, 1));
        }
        let s = RocksStore::open(d.path()).unwrap();
        let m = MetaState::restore(s.load_meta().unwrap().unwrap()).unwrap();
        let f = m.lookup(ResourceId::ROOT, b"f").unwrap();
        assert_eq!(f.id, ino);
        assert_eq!(f.size(), 7);
        let report = s.check(&m).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(s.stats().unwrap().chunks, 1);
    }
}
