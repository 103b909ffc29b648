//! Micro-benchmarks of the write and read path's building blocks: FastCDC
//! chunking with BLAKE3 hashing, and RocksDB chunk put/get with verification.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshfs::ids::ChunkHash;
use meshfs::storage::{ChunkStore, RocksStore};

fn data(n: usize) -> Vec<u8> {
    let mut x = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn chunk_and_hash(c: &mut Criterion) {
    let buf = data(8 << 20);
    let mut g = c.benchmark_group("chunk+hash");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("fastcdc 16/64/256 KiB + blake3, 8 MiB", |b| {
        b.iter(|| {
            let mut n = 0;
            for ch in fastcdc::v2020::FastCDC::new(&buf, 16 << 10, 64 << 10, 256 << 10) {
                n += ChunkHash::of(&buf[ch.offset..ch.offset + ch.length]).as_bytes()[0] as usize;
            }
            black_box(n)
        })
    });
    g.finish();
}

fn store_put_get(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RocksStore::open(dir.path()).expect("open store");
    let chunks: Vec<Vec<u8>> = (0..64)
        .map(|i| data(64 << 10).into_iter().map(|b| b ^ i as u8).collect())
        .collect();
    let mut g = c.benchmark_group("rocksdb chunk store");
    g.throughput(Throughput::Bytes((chunks.len() * (64 << 10)) as u64));
    g.bench_function("put 64 x 64 KiB new chunks", |b| {
        let mut round = 0u64;
        b.iter_batched(
            || {
                // Fresh content every round, so every put is a real write.
                round += 1;
                chunks
                    .iter()
                    .map(|c| {
                        let mut v = c.clone();
                        v[..8].copy_from_slice(&round.to_le_bytes());
                        v
                    })
                    .collect::<Vec<_>>()
            },
            |fresh| {
                // Referenced as a commit would, then unpinned.
                let hashes: Vec<ChunkHash> =
                    fresh.iter().map(|c| store.put(c).expect("put")).collect();
                store
                    .apply_refs(&hashes.iter().map(|h| (*h, 1)).collect())
                    .expect("refs");
                store.unpin(&hashes);
            },
            BatchSize::SmallInput,
        )
    });
    let hashes: Vec<ChunkHash> = chunks.iter().map(|c| store.put(c).expect("put")).collect();
    g.bench_function("get+verify 64 x 64 KiB", |b| {
        b.iter(|| {
            for h in &hashes {
                black_box(store.get(h).expect("get"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, chunk_and_hash, store_put_get);
criterion_main!(benches);
