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
        MetaState::new(0, 0, Timestamp::now()),
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
    assert_eq!(
        store.stats().unwrap().chunks,
        0,
        "reclaimed content must be collected"
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
        MetaState::new(0, 0, Timestamp::now()),
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
