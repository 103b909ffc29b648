//! Filesystem semantics over the in-memory store, without a kernel: the
//! write/commit/read cycle, re-chunking of only what changed, truncation,
//! append, unlink while open, orphan reclamation and corruption.

use std::sync::Arc;

use super::*;
use crate::storage::{ChunkStore, MemChunkStore};

const ROOT: ResourceId = ResourceId::ROOT;
const CTX: Ctx = Ctx { uid: 0, gid: 0 };

fn setup() -> (Arc<MemChunkStore>, Fs, tempfile::TempDir) {
    let store = Arc::new(MemChunkStore::new());
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(
        store.clone(),
        MetaState::new(0, 0, Timestamp::now(), DeviceId([9; 16])),
        FsOptions {
            device: DeviceId([9; 16]),
            spill_dir: dir.path().join("spill"),
            chunk_sizes: ChunkSizes {
                min: 1024,
                avg: 4096,
                max: 16384,
            },
            sync_on_close: false,
            read_only: false,
            replicated: false,
            passthrough: None,
        },
    )
    .unwrap();
    (store, fs, dir)
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_file(fs: &Fs, name: &str, data: &[u8]) -> ResourceId {
    let (attr, o) = fs
        .create(CTX, ROOT, name.as_bytes(), 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(o.fh, 0, data).unwrap();
    fs.flush(o.fh).unwrap();
    fs.release(o.fh).unwrap();
    attr.ino
}

fn read_all(fs: &Fs, ino: ResourceId) -> Vec<u8> {
    let o = fs.open(ino, libc::O_RDONLY).unwrap();
    let mut out = Vec::new();
    loop {
        let d = fs.read(o.fh, out.len() as u64, 100_000).unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    fs.release(o.fh).unwrap();
    out
}

#[test]
fn written_content_reads_back_after_commit() {
    let (_s, fs, _d) = setup();
    let data = pseudo_random(200_000, 1);
    let ino = write_file(&fs, "f", &data);
    assert_eq!(fs.getattr(ino).unwrap().size, 200_000);
    assert_eq!(read_all(&fs, ino), data);
    assert_eq!(fs.stats().commits, 1);
}

#[test]
fn small_edit_rechunks_only_around_the_change() {
    let (store, fs, _d) = setup();
    let data = pseudo_random(1_000_000, 2);
    let ino = write_file(&fs, "f", &data);
    let chunks_before = store.stats().unwrap().chunks;
    let rechunked_before = fs.stats().rechunked_bytes;
    let o = fs.open(ino, libc::O_RDWR).unwrap();
    fs.write(o.fh, 500_000, b"EDIT").unwrap();
    fs.release(o.fh).unwrap();
    let rechunked = fs.stats().rechunked_bytes - rechunked_before;
    assert!(
        rechunked < 100_000,
        "re-chunked {rechunked} bytes for a 4-byte edit"
    );
    // Old version released, new chunks for the edited region only.
    let added = store.stats().unwrap().chunks as i64 - chunks_before as i64;
    assert!(added.abs() <= 6, "chunk count moved by {added}");
    let mut want = data.clone();
    want[500_000..500_004].copy_from_slice(b"EDIT");
    assert_eq!(read_all(&fs, ino), want);
}

#[test]
fn every_handle_sees_uncommitted_writes() {
    let (_s, fs, _d) = setup();
    let ino = write_file(&fs, "f", b"hello world");
    let a = fs.open(ino, libc::O_RDWR).unwrap();
    let b = fs.open(ino, libc::O_RDONLY).unwrap();
    fs.write(a.fh, 6, b"there").unwrap();
    assert_eq!(fs.read(b.fh, 0, 100).unwrap(), b"hello there");
    assert_eq!(fs.getattr(ino).unwrap().size, 11);
    fs.release(a.fh).unwrap();
    fs.release(b.fh).unwrap();
}

#[test]
fn truncate_shrink_then_grow_reads_zeros() {
    let (_s, fs, _d) = setup();
    let ino = write_file(&fs, "f", &[7u8; 10_000]);
    fs.setattr(
        ino,
        None,
        SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        ino,
        None,
        SetAttr {
            size: Some(300),
            ..Default::default()
        },
    )
    .unwrap();
    let got = read_all(&fs, ino);
    assert_eq!(got.len(), 300);
    assert!(got[..100].iter().all(|b| *b == 7));
    assert!(got[100..].iter().all(|b| *b == 0));
}

#[test]
fn sparse_write_leaves_a_hole_of_zeros() {
    let (_s, fs, _d) = setup();
    let (attr, o) = fs
        .create(CTX, ROOT, b"sparse", 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(o.fh, 1_000_000, b"end").unwrap();
    fs.release(o.fh).unwrap();
    let got = read_all(&fs, attr.ino);
    assert_eq!(got.len(), 1_000_003);
    assert!(got[..1_000_000].iter().all(|b| *b == 0));
    assert_eq!(&got[1_000_000..], b"end");
}

#[test]
fn append_and_trunc_flags() {
    let (_s, fs, _d) = setup();
    let ino = write_file(&fs, "f", b"abc");
    let o = fs.open(ino, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.write(o.fh, 0, b"def").unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(read_all(&fs, ino), b"abcdef");
    let o = fs.open(ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    fs.write(o.fh, 0, b"x").unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(read_all(&fs, ino), b"x");
}

#[test]
fn unlinked_open_file_stays_readable_then_is_reclaimed() {
    let (store, fs, _d) = setup();
    let data = pseudo_random(50_000, 3);
    let ino = write_file(&fs, "f", &data);
    fs.lookup(ROOT, b"f").unwrap();
    let o = fs.open(ino, libc::O_RDONLY).unwrap();
    fs.unlink(ROOT, b"f").unwrap();
    assert_eq!(fs.read(o.fh, 0, 60_000).unwrap(), data);
    fs.release(o.fh).unwrap();
    // Still looked up by the kernel: kept.
    assert!(fs.getattr(ino).is_ok());
    fs.forget(ino, 1);
    // Create and the explicit lookup each counted one.
    fs.forget(ino, 1);
    assert!(fs.getattr(ino).is_err());
    // The removed file is in the trash: its content stays.
    assert!(fs.with_meta(|m| m.trash().contains_key(&ino)));
    assert!(store.stats().unwrap().chunks > 0, "trashed content is kept");
    // Once the retention policy drops it, its content is collected.
    fs.apply(
        FsCommand::DropVersions {
            versions: vec![],
            trash: vec![ino],
        },
        false,
    )
    .unwrap();
    assert_eq!(
        store.stats().unwrap().chunks,
        0,
        "dropped content must be collected"
    );
}

#[test]
fn corrupt_chunk_is_an_error_not_wrong_bytes() {
    let (store, fs, _d) = setup();
    let ino = write_file(&fs, "f", &pseudo_random(30_000, 4));
    let hash = fs.with_meta(|m| m.get(ino).unwrap().content.as_ref().unwrap().chunks[0].hash);
    store.corrupt(&hash);
    let o = fs.open(ino, libc::O_RDONLY).unwrap();
    match fs.read(o.fh, 0, 4096) {
        Err(FsError::Storage(StorageError::Corrupt { hash: h })) => assert_eq!(h, hash),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    fs.release(o.fh).unwrap();
}

#[test]
fn read_only_refuses_changes() {
    let store = Arc::new(MemChunkStore::new());
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(
        store,
        MetaState::new(0, 0, Timestamp::now(), DeviceId([9; 16])),
        FsOptions {
            device: DeviceId([9; 16]),
            spill_dir: dir.path().join("spill"),
            chunk_sizes: ChunkSizes {
                min: 1024,
                avg: 4096,
                max: 16384,
            },
            sync_on_close: false,
            read_only: true,
            replicated: false,
            passthrough: None,
        },
    )
    .unwrap();
    assert!(matches!(
        fs.mkdir(CTX, ROOT, b"d", 0o755),
        Err(FsError::ReadOnly)
    ));
}

#[test]
fn holes_become_zero_runs_not_chunks() {
    let (store, fs, _d) = setup();
    let ino = write_file(&fs, "big-sparse", b"head");
    let t = std::time::Instant::now();
    // 64 GiB of hole: chunking it would take minutes.
    fs.setattr(
        ino,
        None,
        SetAttr {
            size: Some(64 << 30),
            ..Default::default()
        },
    )
    .unwrap();
    let o = fs.open(ino, libc::O_RDWR).unwrap();
    fs.write(o.fh, 32 << 30, b"middle").unwrap();
    fs.release(o.fh).unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let o = fs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.read(o.fh, 0, 8).unwrap(), b"head\0\0\0\0");
    assert_eq!(fs.read(o.fh, (32 << 30) - 2, 8).unwrap(), b"\0\0middle");
    assert_eq!(fs.read(o.fh, (64 << 30) - 4, 100).unwrap(), vec![0u8; 4]);
    fs.release(o.fh).unwrap();
    let (zero_runs, stored) = fs.with_meta(|m| {
        let c = m.get(ino).unwrap().content.clone().unwrap();
        (
            c.chunks.iter().filter(|c| c.hash.is_zero_run()).count(),
            c.chunks.len(),
        )
    });
    assert!(zero_runs >= 64, "{zero_runs} zero runs of {stored} refs");
    // Only the two small data regions are stored; zero runs are not chunks.
    assert!(store.stats().unwrap().chunks <= 4);
}

/// The in-memory store, with chunk writes that fail on demand (a full disk).
#[derive(Default)]
struct FailingStore {
    inner: MemChunkStore,
    full: std::sync::atomic::AtomicBool,
}

impl FailingStore {
    fn check(&self) -> std::result::Result<(), StorageError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StorageError::NoSpace);
        }
        Ok(())
    }
}

impl ChunkStore for FailingStore {
    fn put(&self, data: &[u8]) -> std::result::Result<ChunkHash, StorageError> {
        self.check()?;
        self.inner.put(data)
    }
    fn put_cached(&self, data: &[u8]) -> std::result::Result<ChunkHash, StorageError> {
        self.check()?;
        self.inner.put_cached(data)
    }
    fn get(&self, hash: &ChunkHash) -> std::result::Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(hash)
    }
    fn contains(&self, hash: &ChunkHash) -> std::result::Result<bool, StorageError> {
        self.inner.contains(hash)
    }
    fn apply_refs(
        &self,
        deltas: &std::collections::BTreeMap<ChunkHash, i64>,
    ) -> std::result::Result<(), StorageError> {
        self.inner.apply_refs(deltas)
    }
    fn refcount(&self, hash: &ChunkHash) -> std::result::Result<u64, StorageError> {
        self.inner.refcount(hash)
    }
    fn unpin(&self, hashes: &[ChunkHash]) {
        self.inner.unpin(hashes)
    }
    fn pin(&self, hashes: &[ChunkHash]) {
        self.inner.pin(hashes)
    }
    fn collect_garbage(&self) -> std::result::Result<u64, StorageError> {
        self.inner.collect_garbage()
    }
    fn evict(&self, hashes: &[ChunkHash]) -> std::result::Result<u64, StorageError> {
        self.inner.evict(hashes)
    }
    fn stats(&self) -> std::result::Result<crate::storage::StoreStats, StorageError> {
        self.inner.stats()
    }
}

impl crate::storage::MetaStore for FailingStore {
    fn persist(
        &self,
        changes: &crate::meta::Changes,
        sync: bool,
    ) -> std::result::Result<(), StorageError> {
        self.inner.persist(changes, sync)
    }
    fn sync(&self) -> std::result::Result<(), StorageError> {
        self.inner.sync()
    }
}

fn setup_with<S: crate::storage::Store + 'static>(store: Arc<S>) -> (Fs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(
        store,
        MetaState::new(0, 0, Timestamp::now(), DeviceId([9; 16])),
        FsOptions {
            device: DeviceId([9; 16]),
            spill_dir: dir.path().join("spill"),
            chunk_sizes: SIZES,
            sync_on_close: false,
            read_only: false,
            replicated: false,
            passthrough: None,
        },
    )
    .unwrap();
    (fs, dir)
}

const SIZES: ChunkSizes = ChunkSizes {
    min: 1024,
    avg: 4096,
    max: 16384,
};

fn chunks_of(fs: &Fs, ino: ResourceId) -> Vec<crate::meta::ChunkRef> {
    fs.with_meta(|m| m.get(ino).unwrap().content.clone().unwrap().chunks.to_vec())
}

/// Writes `data` from `from` on in 64 KiB appends.
fn append(fs: &Fs, fh: u64, from: u64, data: &[u8]) {
    for (i, piece) in data.chunks(64 << 10).enumerate() {
        fs.write(fh, from + (i as u64) * (64 << 10), piece).unwrap();
    }
}

fn has_worker(fs: &Fs, fh: u64) -> bool {
    let h = fs.handle(fh).unwrap();
    let f = lock(&h.file);
    f.spill
        .as_ref()
        .and_then(|s| s.stream.as_ref())
        .is_some_and(|st| st.cutter.is_some())
}

#[test]
fn a_large_streamed_write_is_chunked_in_the_background_as_in_one_pass() {
    let store = Arc::new(MemChunkStore::new());
    let (fs, _dir) = setup_with(store.clone());
    let data = pseudo_random(5 << 20, 21);
    let (attr, o) = fs.create(CTX, ROOT, b"big", 0o644, libc::O_RDWR).unwrap();
    append(&fs, o.fh, 0, &data[..3 << 20]);
    assert!(has_worker(&fs, o.fh), "3 MiB of appends go to a worker");
    append(&fs, o.fh, 3 << 20, &data[3 << 20..]);
    fs.flush(o.fh).unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(read_all(&fs, attr.ino), data);
    // The same cut points as one pass over the whole file: hand-overs and
    // the worker's leftovers never move a boundary.
    let got: Vec<(u64, u32)> = chunks_of(&fs, attr.ino)
        .iter()
        .map(|c| (c.offset, c.len))
        .collect();
    let want: Vec<(u64, u32)> =
        fastcdc::v2020::FastCDC::new(&data, SIZES.min, SIZES.avg, SIZES.max)
            .map(|c| (c.offset as u64, c.length as u32))
            .collect();
    assert_eq!(got, want);
    // Every chunk is referenced once and nothing was left pinned.
    for c in chunks_of(&fs, attr.ino) {
        assert_eq!(store.refcount(&c.hash).unwrap(), 1);
    }
    assert_eq!(store.collect_garbage().unwrap(), 0);
    assert_eq!(store.stats().unwrap().bytes, data.len() as u64);
}

#[test]
fn reads_and_truncation_during_a_streamed_write_see_every_byte() {
    let store = Arc::new(MemChunkStore::new());
    let (fs, _dir) = setup_with(store.clone());
    let data = pseudo_random(4 << 20, 22);
    let (attr, o) = fs.create(CTX, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
    append(&fs, o.fh, 0, &data[..3 << 20]);
    assert!(has_worker(&fs, o.fh));
    // A read takes everything back from the worker first.
    let at = (2 << 20) + 12345;
    assert_eq!(
        fs.read(o.fh, at, 70_000).unwrap(),
        &data[at as usize..at as usize + 70_000]
    );
    append(&fs, o.fh, 3 << 20, &data[3 << 20..]);
    fs.flush(o.fh).unwrap();
    assert_eq!(read_all(&fs, attr.ino), data);
    // Truncating to zero mid-stream drops the worker's chunks with the rest.
    let o2 = fs.open(attr.ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    append(&fs, o2.fh, 0, &data[..2 << 20]);
    assert!(has_worker(&fs, o2.fh));
    let zero = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    fs.setattr(attr.ino, Some(o2.fh), zero).unwrap();
    fs.write(o2.fh, 0, b"short").unwrap();
    fs.release(o2.fh).unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(read_all(&fs, attr.ino), b"short");
    assert_eq!(store.collect_garbage().unwrap(), 0, "no chunk left pinned");
    // The first version is kept as history; dropped, only "short" is left.
    let old: Vec<_> = fs.with_meta(|m| {
        m.old_versions(attr.ino)
            .map(|(v, _)| (attr.ino, *v))
            .collect()
    });
    assert_eq!(old.len(), 1);
    fs.apply(
        FsCommand::DropVersions {
            versions: old,
            trash: vec![],
        },
        false,
    )
    .unwrap();
    assert_eq!(store.stats().unwrap().bytes, 5);
}

#[test]
fn a_chunking_error_comes_back_at_the_next_write_and_loses_nothing() {
    let store = Arc::new(FailingStore::default());
    let (fs, _dir) = setup_with(store.clone());
    let data = pseudo_random(6 << 20, 23);
    let (attr, o) = fs.create(CTX, ROOT, b"f", 0o644, libc::O_RDWR).unwrap();
    append(&fs, o.fh, 0, &data[..1 << 20]);
    assert!(has_worker(&fs, o.fh));
    store.full.store(true, Ordering::SeqCst);
    // The next hand-over makes the worker fail, and the first write after
    // that reports it, before taking its own bytes. Once a hand-over has
    // surely happened, wait for the failure so that the next write sees it.
    let failed = || {
        let h = fs.handle(o.fh).unwrap();
        let f = lock(&h.file);
        let st = f.spill.as_ref().unwrap().stream.as_ref().unwrap();
        st.cutter.as_ref().unwrap().failed()
    };
    let mut written = 1 << 20;
    let err = loop {
        assert!(written < 4 << 20, "no write reported the full store");
        if written >= 3 << 20 {
            let waited = std::time::Instant::now();
            while !failed() {
                assert!(waited.elapsed().as_secs() < 20, "the worker never failed");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        match fs.write(o.fh, written as u64, &data[written..written + (64 << 10)]) {
            Ok(n) => written += n as usize,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, FsError::Storage(StorageError::NoSpace)),
        "{err:?}"
    );
    assert_eq!(fs.getattr(attr.ino).unwrap().size, written as u64);
    assert!(fs.flush(o.fh).is_err(), "still full");
    // Space again: the commit stores every byte that was accepted.
    store.full.store(false, Ordering::SeqCst);
    fs.flush(o.fh).unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(read_all(&fs, attr.ino), &data[..written]);
    assert_eq!(store.collect_garbage().unwrap(), 0);
}

#[test]
fn seek_data_and_hole_find_zero_runs_before_and_after_the_commit() {
    let (_store, fs, _d) = setup();
    let mib = 1u64 << 20;
    let (attr, o) = fs
        .create(CTX, ROOT, b"sparse", 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(o.fh, 0, &[1u8; 4096]).unwrap();
    fs.write(o.fh, 3 * mib, &[2u8; 4096]).unwrap();
    let size = 3 * mib + 4096;
    let check = |fh: u64, when: &str| {
        let seek = |off: u64, hole: bool| fs.seek_data_or_hole(fh, off, hole).unwrap();
        assert_eq!(seek(0, false), Some(0), "{when}");
        assert_eq!(seek(0, true), Some(4096), "{when}: the hole after the head");
        assert_eq!(seek(4096, false), Some(3 * mib), "{when}");
        assert_eq!(seek(5000, false), Some(3 * mib), "{when}");
        assert_eq!(seek(3 * mib + 10, false), Some(3 * mib + 10), "{when}");
        assert_eq!(seek(3 * mib, true), Some(size), "{when}: end of file");
        assert_eq!(seek(size, false), None, "{when}: ENXIO at the end");
        assert_eq!(seek(size, true), None, "{when}");
    };
    check(o.fh, "uncommitted");
    fs.release(o.fh).unwrap();
    let o = fs.open(attr.ino, libc::O_RDONLY).unwrap();
    check(o.fh, "committed");
    fs.release(o.fh).unwrap();
    // The hole takes no blocks.
    assert_eq!(fs.getattr(attr.ino).unwrap().blocks, 2 * 4096 / 512);
}

#[test]
fn fallocate_extends_with_a_hole_keep_size_only_checks_and_punching_is_refused() {
    let (_store, fs, _d) = setup();
    let mib = 1u64 << 20;
    let (attr, o) = fs.create(CTX, ROOT, b"pre", 0o644, libc::O_RDWR).unwrap();
    fs.write(o.fh, 0, b"head").unwrap();
    fs.fallocate(o.fh, 0, 4 * mib, 0).unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 4 * mib);
    // Never shrinks; KEEP_SIZE leaves the size alone.
    fs.fallocate(o.fh, 0, mib, 0).unwrap();
    fs.fallocate(o.fh, 0, 8 * mib, libc::FALLOC_FL_KEEP_SIZE)
        .unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().size, 4 * mib);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert!(matches!(
        fs.fallocate(o.fh, 0, 10, punch),
        Err(FsError::NotSupported)
    ));
    assert!(matches!(
        fs.fallocate(o.fh, 0, 10, libc::FALLOC_FL_ZERO_RANGE),
        Err(FsError::NotSupported)
    ));
    assert!(matches!(
        fs.fallocate(o.fh, u64::MAX - 1, 10, 0),
        Err(FsError::TooBig)
    ));
    fs.release(o.fh).unwrap();
    let ro = fs.open(attr.ino, libc::O_RDONLY).unwrap();
    assert!(matches!(
        fs.fallocate(ro.fh, 0, 8 * mib, 0),
        Err(FsError::BadHandle)
    ));
    // Committed: the head, then a hole to 4 MiB that reads as zeros.
    let data = read_all(&fs, attr.ino);
    assert_eq!(data.len() as u64, 4 * mib);
    assert_eq!(&data[..4], b"head");
    assert!(data[4..].iter().all(|b| *b == 0));
    assert_eq!(fs.seek_data_or_hole(ro.fh, 0, true).unwrap(), Some(4));
    assert!(fs.getattr(attr.ino).unwrap().blocks <= 1);
    fs.release(ro.fh).unwrap();
}

#[test]
fn a_preallocated_file_written_in_order_still_streams() {
    let (_store, fs, _d) = setup();
    let mib = 1usize << 20;
    let data = pseudo_random(5 * mib, 33);
    for (name, falloc) in [(&b"exact"[..], 5 * mib), (&b"longer"[..], 6 * mib)] {
        let (attr, o) = fs.create(CTX, ROOT, name, 0o644, libc::O_RDWR).unwrap();
        fs.fallocate(o.fh, 0, falloc as u64, 0).unwrap();
        append(&fs, o.fh, 0, &data[..3 * mib]);
        assert!(
            has_worker(&fs, o.fh),
            "writes over the preallocated hole go on streaming"
        );
        append(&fs, o.fh, 3 * mib as u64, &data[3 * mib..]);
        assert_eq!(fs.getattr(attr.ino).unwrap().size, falloc as u64);
        fs.release(o.fh).unwrap();
        let got = read_all(&fs, attr.ino);
        assert_eq!(got.len(), falloc);
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(got[data.len()..].iter().all(|b| *b == 0));
        // Only the written bytes take space; the rest stays a hole.
        assert_eq!(
            fs.getattr(attr.ino).unwrap().blocks,
            (data.len() / 512) as u64
        );
    }
}

#[test]
fn a_file_of_holes_reopened_and_written_in_order_streams() {
    let (_store, fs, _d) = setup();
    let mib = 1usize << 20;
    let data = pseudo_random(4 * mib, 34);
    // Preallocated by one program (fallocate(1)), committed as a hole ...
    let (attr, o) = fs.create(CTX, ROOT, b"pre", 0o644, libc::O_RDWR).unwrap();
    fs.fallocate(o.fh, 0, 6 * mib as u64, 0).unwrap();
    fs.release(o.fh).unwrap();
    assert_eq!(fs.getattr(attr.ino).unwrap().blocks, 0);
    // ... then written from its start by another (dd conv=notrunc).
    let o = fs.open(attr.ino, libc::O_RDWR).unwrap();
    append(&fs, o.fh, 0, &data[..3 * mib]);
    assert!(
        has_worker(&fs, o.fh),
        "the hole is written over as a stream"
    );
    append(&fs, o.fh, 3 * mib as u64, &data[3 * mib..]);
    fs.release(o.fh).unwrap();
    let got = read_all(&fs, attr.ino);
    assert_eq!(got.len(), 6 * mib);
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|b| *b == 0));
    assert_eq!(fs.getattr(attr.ino).unwrap().blocks, (4 * mib / 512) as u64);
    // A write elsewhere in such a file is not a stream, and keeps the rest.
    let o = fs.open(attr.ino, libc::O_RDWR).unwrap();
    fs.write(o.fh, 5 * mib as u64, b"end").unwrap();
    fs.release(o.fh).unwrap();
    let got = read_all(&fs, attr.ino);
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(&got[5 * mib..5 * mib + 3], b"end");
}

/// Random writes, truncations, reads and commits on files that start as
/// holes only (the streamed-over-holes path), against a plain byte vector.
#[test]
fn files_of_holes_match_a_byte_vector_under_random_operations() {
    use rand::{Rng, SeedableRng};
    let mut total_streamed = 0;
    for seed in 0..24u64 {
        let (_store, fs, _d) = setup();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let name = format!("f{seed}");
        let (attr, o) = fs
            .create(CTX, ROOT, name.as_bytes(), 0o644, libc::O_RDWR)
            .unwrap();
        let start = rng.gen_range(1..4usize) << 20;
        fs.fallocate(o.fh, 0, start as u64, 0).unwrap();
        fs.release(o.fh).unwrap();
        let mut model = vec![0u8; start];
        let mut fh = fs.open(attr.ino, libc::O_RDWR).unwrap().fh;
        let mut last_end = 0usize;
        let mut streamed = 0;
        for step in 0..40 {
            let what = rng.gen_range(0..10);
            let ctx = format!("seed {seed} step {step} op {what}");
            match what {
                // Mostly appends where the last write ended (streaming).
                0..=4 => {
                    let at = if rng.gen_bool(0.7) {
                        last_end
                    } else {
                        rng.gen_range(0..model.len() + (1 << 20))
                    };
                    let len = rng.gen_range(1..300_000);
                    let data = pseudo_random(len, seed * 1000 + step);
                    fs.write(fh, at as u64, &data).unwrap();
                    streamed += has_worker(&fs, fh) as usize;
                    last_end = at + len;
                    if model.len() < at + len {
                        model.resize(at + len, 0);
                    }
                    model[at..at + len].copy_from_slice(&data);
                }
                5 => {
                    let size = rng.gen_range(0..model.len() + (2 << 20));
                    fs.setattr(
                        attr.ino,
                        Some(fh),
                        SetAttr {
                            size: Some(size as u64),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    model.resize(size, 0);
                }
                6 => {
                    let len = rng.gen_range(1..(2 << 20));
                    let end = model.len() + len;
                    fs.fallocate(fh, 0, end as u64, 0).unwrap();
                    model.resize(end, 0);
                }
                7 if !model.is_empty() => {
                    let at = rng.gen_range(0..model.len());
                    let n = rng.gen_range(1..200_000).min(model.len() - at);
                    let got = fs.read(fh, at as u64, n as u32).unwrap();
                    assert_eq!(got, &model[at..at + n], "{ctx}");
                }
                _ => {
                    fs.release(fh).unwrap();
                    fh = fs.open(attr.ino, libc::O_RDWR).unwrap().fh;
                    last_end = 0;
                }
            }
            assert_eq!(
                fs.getattr(attr.ino).unwrap().size,
                model.len() as u64,
                "{ctx}"
            );
        }
        fs.release(fh).unwrap();
        assert_eq!(read_all(&fs, attr.ino), model, "seed {seed}: committed");
        total_streamed += streamed;
    }
    assert!(
        total_streamed > 10,
        "the streaming path ran {total_streamed} times"
    );
}

#[test]
fn create_of_a_name_taken_meanwhile_opens_it_unless_exclusive() {
    // Another device can create the name between the kernel's lookup and
    // its create: open(2) without O_EXCL then opens (and truncates) that
    // file; with O_EXCL it is EEXIST; a directory of that name is EEXIST.
    let (_s, fs, _d) = setup();
    let ino = write_file(&fs, "taken", b"already here");
    let (attr, o) = fs.create(CTX, ROOT, b"taken", 0o644, libc::O_RDWR).unwrap();
    assert_eq!(attr.ino, ino);
    assert_eq!(fs.read(o.fh, 0, 100).unwrap(), b"already here");
    fs.release(o.fh).unwrap();
    let (attr, o) = fs
        .create(CTX, ROOT, b"taken", 0o644, libc::O_WRONLY | libc::O_TRUNC)
        .unwrap();
    assert_eq!(attr.ino, ino);
    fs.release(o.fh).unwrap();
    assert!(read_all(&fs, ino).is_empty(), "O_TRUNC truncated it");
    let e = fs
        .create(CTX, ROOT, b"taken", 0o644, libc::O_RDWR | libc::O_EXCL)
        .unwrap_err();
    assert!(matches!(e, FsError::Meta(MetaError::Exists)), "{e:?}");
    fs.mkdir(CTX, ROOT, b"dir", 0o755).unwrap();
    let e = fs
        .create(CTX, ROOT, b"dir", 0o644, libc::O_RDWR)
        .unwrap_err();
    assert!(matches!(e, FsError::Meta(MetaError::Exists)), "{e:?}");
    // Someone else's file without write permission for the caller: EACCES.
    let other = Ctx {
        uid: 4242,
        gid: 4242,
    };
    let e = fs
        .create(other, ROOT, b"taken", 0o644, libc::O_WRONLY)
        .unwrap_err();
    assert!(matches!(e, FsError::Access), "{e:?}");
}

/// Reads a whole virtual version file through open/read/release.
fn read_version(fs: &Fs, ino: ResourceId) -> Vec<u8> {
    let o = fs.open_as(0, ino, libc::O_RDONLY).unwrap();
    let mut out = Vec::new();
    loop {
        let d = fs.read(o.fh, out.len() as u64, 1 << 16).unwrap();
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    fs.flush(o.fh).unwrap();
    fs.release(o.fh).unwrap();
    out
}

#[test]
fn versions_are_listed_readable_in_the_hidden_tree_and_restored() {
    let (_store, fs, _d) = setup();
    let d = fs.mkdir(CTX, ROOT, b"docs", 0o755).unwrap();
    let put = |data: &[u8]| {
        let (attr, o) = match fs.lookup(d.ino, b"note") {
            Ok(a) => (a, fs.open(a.ino, libc::O_WRONLY | libc::O_TRUNC).unwrap()),
            Err(_) => fs
                .create(CTX, d.ino, b"note", 0o640, libc::O_WRONLY)
                .unwrap(),
        };
        fs.write(o.fh, 0, data).unwrap();
        fs.release(o.fh).unwrap();
        attr.ino
    };
    let ino = put(b"first");
    put(b"second, longer");
    put(b"third");
    let h = fs.versions(b"/docs/note").unwrap();
    assert_eq!(h.len(), 1);
    let rows: Vec<(u64, u64, bool)> = h[0]
        .versions
        .iter()
        .map(|r| (r.version.0, r.size, r.current))
        .collect();
    assert_eq!(rows, vec![(1, 5, false), (2, 14, false), (3, 5, true)]);
    assert_ne!(h[0].versions[0].hash, h[0].versions[2].hash);

    // The hidden tree: not listed at the root, reached by name.
    assert!(fs
        .readdir(ROOT, 0, 100)
        .unwrap()
        .iter()
        .all(|e| e.name != b".meshfs"));
    let top = fs.lookup(ROOT, b".meshfs").unwrap();
    let vers = fs.lookup(top.ino, b"versions").unwrap();
    let vd = fs.lookup(vers.ino, b"docs").unwrap();
    let vf = fs.lookup(vd.ino, b"note").unwrap();
    assert_eq!(vf.kind, Kind::Dir);
    let names: Vec<Vec<u8>> = fs
        .readdir(vf.ino, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        vec![
            b".".to_vec(),
            b"..".to_vec(),
            b"1".to_vec(),
            b"2".to_vec(),
            b"3".to_vec()
        ]
    );
    let v2 = fs.lookup(vf.ino, b"2").unwrap();
    assert_eq!((v2.kind, v2.size, v2.perm), (Kind::File, 14, 0o440));
    assert_eq!(read_version(&fs, v2.ino), b"second, longer");
    // lseek(SEEK_DATA/SEEK_HOLE) on an open version: data from 0, the
    // hole at its end.
    let o = fs.open_as(0, v2.ino, libc::O_RDONLY).unwrap();
    assert_eq!(fs.seek_data_or_hole(o.fh, 0, false).unwrap(), Some(0));
    assert_eq!(fs.seek_data_or_hole(o.fh, 0, true).unwrap(), Some(14));
    fs.release(o.fh).unwrap();
    // Read-only: no writes, no new names, no removal; its name is taken.
    assert!(matches!(
        fs.open_as(0, v2.ino, libc::O_RDWR),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        fs.create(CTX, vf.ino, b"x", 0o644, libc::O_WRONLY),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(fs.unlink(vf.ino, b"2"), Err(FsError::ReadOnly)));
    assert!(fs.mkdir(CTX, ROOT, b".meshfs", 0o755).is_err());

    // Restore version 1: it becomes version 4, same bytes, same hash.
    let r = fs.restore(b"docs/note", Some(VersionId(1)), None).unwrap();
    assert_eq!(
        (r.resource, r.from.0, r.version.0, r.undeleted),
        (ino, 1, 4, false)
    );
    assert_eq!(read_all(&fs, ino), b"first");
    let h = fs.versions(b"/docs/note").unwrap();
    assert_eq!(h[0].versions.last().unwrap().hash, h[0].versions[0].hash);
    assert!(
        fs.restore(b"/docs/note", Some(VersionId(4)), None).is_err(),
        "already current"
    );
    assert!(fs
        .restore(b"/docs/note", Some(VersionId(99)), None)
        .is_err());

    // Removed: the trash lists it, restore brings it back at its path,
    // with the directory made again.
    fs.unlink(d.ino, b"note").unwrap();
    fs.forget(ino, 1);
    fs.rmdir(ROOT, b"docs").unwrap();
    let h = fs.versions(b"/docs/note").unwrap();
    assert_eq!(h.len(), 1);
    assert!(h[0].deleted.is_some());
    assert_eq!(h[0].versions.len(), 4);
    let r = fs.restore(b"/docs/note", Some(VersionId(2)), None).unwrap();
    assert!(r.undeleted);
    assert_ne!(r.resource, ino);
    let back = fs
        .lookup(fs.lookup(ROOT, b"docs").unwrap().ino, b"note")
        .unwrap();
    assert_eq!(back.perm, 0o640);
    assert_eq!(read_all(&fs, back.ino), b"second, longer");
    // Now a file is there again: the old one is listed after it.
    let h = fs.versions(b"/docs/note").unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].resource, back.ino);
    assert_eq!(h[1].resource, ino);
    assert!(matches!(
        fs.restore(b"/docs/note", None, Some(ino)),
        Err(FsError::Meta(MetaError::Exists))
    ));
    // A file removed empty comes back empty.
    let (e, o) = fs
        .create(CTX, ROOT, b"empty", 0o600, libc::O_WRONLY)
        .unwrap();
    fs.release(o.fh).unwrap();
    fs.unlink(ROOT, b"empty").unwrap();
    fs.forget(e.ino, 1);
    let r = fs.restore(b"/empty", None, None).unwrap();
    assert!(r.undeleted);
    let back = fs.lookup(ROOT, b"empty").unwrap();
    assert_eq!((back.size, back.perm), (0, 0o600));
}
