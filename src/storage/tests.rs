//! One behavioural suite that every `ChunkStore` implementation must pass.

use std::collections::BTreeMap;

use super::{ChunkStore, StorageError};
use crate::ids::ChunkHash;

/// Test-only access to damage a stored chunk, as a bad disk would.
pub trait Corrupt {
    fn corrupt(&self, hash: &ChunkHash);
}

pub fn run_all<S: ChunkStore + Corrupt>(make: impl Fn() -> S) {
    put_get_round_trip(&make());
    dedup_and_refcounts(&make());
    pins_protect_uncommitted_chunks(&make());
    uncommitted_chunks_go_when_unpinned(&make());
    corruption_is_detected(&make());
    damaged_chunks_can_be_healed_and_released(&make());
    stats_count_bytes(&make());
    cached_chunks_stay_until_collected(&make());
    eviction_drops_bytes_keeps_references_and_spares_pins(&make());
}

fn eviction_drops_bytes_keeps_references_and_spares_pins<S: ChunkStore>(s: &S) {
    let a = s.put_cached(b"cached copy").unwrap();
    s.apply_refs(&deltas(&[(a, 1)])).unwrap();
    let p = s.put(b"being committed").unwrap();
    let freed = s.evict(&[a, p, ChunkHash::of(b"never here")]).unwrap();
    assert_eq!(freed, b"cached copy".len() as u64);
    assert!(!s.contains(&a).unwrap());
    assert!(s.contains(&p).unwrap(), "a pinned chunk is not evicted");
    // The reference stays: the chunk is still part of a version, it just
    // lives elsewhere now, and fetching it again caches it again.
    assert_eq!(s.refcount(&a).unwrap(), 1);
    s.put_cached(b"cached copy").unwrap();
    assert!(s.contains(&a).unwrap());
    s.unpin(&[p]);
}

fn cached_chunks_stay_until_collected<S: ChunkStore>(s: &S) {
    // A chunk fetched from a peer: readable, unpinned, and gone at the next
    // garbage collection unless something references it by then.
    let a = s.put_cached(b"fetched a").unwrap();
    let b = s.put_cached(b"fetched b").unwrap();
    assert_eq!(s.get(&a).unwrap(), Some(b"fetched a".to_vec()));
    s.apply_refs(&deltas(&[(b, 1)])).unwrap();
    assert_eq!(s.collect_garbage().unwrap(), 1);
    assert!(!s.contains(&a).unwrap());
    assert_eq!(s.get(&b).unwrap(), Some(b"fetched b".to_vec()));
    // Caching content a writer has pinned does not take its pin away.
    let c = s.put(b"pinned").unwrap();
    s.put_cached(b"pinned").unwrap();
    assert_eq!(s.collect_garbage().unwrap(), 0);
    s.unpin(&[c]);
    assert!(!s.contains(&c).unwrap());
}

fn deltas(items: &[(ChunkHash, i64)]) -> BTreeMap<ChunkHash, i64> {
    items.iter().copied().collect()
}

fn put_get_round_trip<S: ChunkStore>(s: &S) {
    let data = b"hello chunk".to_vec();
    let h = s.put(&data).unwrap();
    assert_eq!(h, ChunkHash::of(&data));
    assert_eq!(s.get(&h).unwrap(), Some(data));
    assert!(s.contains(&h).unwrap());
    let missing = ChunkHash::of(b"missing");
    assert_eq!(s.get(&missing).unwrap(), None);
    assert!(!s.contains(&missing).unwrap());
    // Empty chunks are legal content too.
    let e = s.put(b"").unwrap();
    assert_eq!(s.get(&e).unwrap(), Some(Vec::new()));
}

fn dedup_and_refcounts<S: ChunkStore>(s: &S) {
    let h = s.put(b"same").unwrap();
    let h2 = s.put(b"same").unwrap();
    assert_eq!(h, h2);
    // A commit references it twice, then the writer lets go of its pins.
    s.apply_refs(&deltas(&[(h, 2)])).unwrap();
    s.unpin(&[h, h2]);
    assert_eq!(s.refcount(&h).unwrap(), 2);
    s.apply_refs(&deltas(&[(h, -1)])).unwrap();
    assert_eq!(s.refcount(&h).unwrap(), 1);
    assert!(s.contains(&h).unwrap());
    s.apply_refs(&deltas(&[(h, -1)])).unwrap();
    assert_eq!(s.refcount(&h).unwrap(), 0);
    assert!(
        !s.contains(&h).unwrap(),
        "unreferenced, unpinned chunk must be collected"
    );
}

fn pins_protect_uncommitted_chunks<S: ChunkStore>(s: &S) {
    // File A references X; writer B puts X again (pinned), A releases X.
    let x = s.put(b"shared content").unwrap();
    s.apply_refs(&deltas(&[(x, 1)])).unwrap();
    s.unpin(&[x]);
    let again = s.put(b"shared content").unwrap();
    s.apply_refs(&deltas(&[(x, -1)])).unwrap();
    assert!(
        s.contains(&x).unwrap(),
        "a pinned chunk survives its count reaching zero"
    );
    s.apply_refs(&deltas(&[(again, 1)])).unwrap();
    s.unpin(&[again]);
    assert_eq!(s.get(&x).unwrap().as_deref(), Some(&b"shared content"[..]));
}

fn uncommitted_chunks_go_when_unpinned<S: ChunkStore>(s: &S) {
    let kept = s.put(b"kept").unwrap();
    let lost = s.put(b"lost").unwrap();
    let pinned = s.put(b"pinned").unwrap();
    s.apply_refs(&deltas(&[(kept, 1)])).unwrap();
    // The version using `lost` was never committed.
    s.unpin(&[kept, lost]);
    assert!(s.contains(&kept).unwrap());
    assert!(!s.contains(&lost).unwrap());
    assert!(s.contains(&pinned).unwrap());
    // Nothing left for the collector: referenced and pinned chunks stay.
    assert_eq!(s.collect_garbage().unwrap(), 0);
    assert!(s.contains(&kept).unwrap() && s.contains(&pinned).unwrap());
}

fn corruption_is_detected<S: ChunkStore + Corrupt>(s: &S) {
    let good = s.put(b"good bytes").unwrap();
    let bad = s.put(b"bytes that will rot").unwrap();
    s.corrupt(&bad);
    match s.get(&bad) {
        Err(StorageError::Corrupt { hash }) => assert_eq!(hash, bad),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(s.get(&good).unwrap().as_deref(), Some(&b"good bytes"[..]));
}

fn damaged_chunks_can_be_healed_and_released<S: ChunkStore + Corrupt>(s: &S) {
    let data = b"content that rots and is written again".to_vec();
    let h = s.put(&data).unwrap();
    s.apply_refs(&deltas(&[(h, 1)])).unwrap();
    s.unpin(&[h]);
    s.corrupt(&h);
    assert!(s.get(&h).is_err());
    // The same content written again replaces the damaged copy.
    let again = s.put(&data).unwrap();
    s.apply_refs(&deltas(&[(again, 1)])).unwrap();
    s.unpin(&[again]);
    assert_eq!(s.get(&h).unwrap(), Some(data.clone()));
    // A damaged chunk can still be released and deleted.
    s.corrupt(&h);
    s.apply_refs(&deltas(&[(h, -2)])).unwrap();
    assert!(!s.contains(&h).unwrap());
}

fn stats_count_bytes<S: ChunkStore>(s: &S) {
    let before = s.stats().unwrap();
    s.put(&[7u8; 1000]).unwrap();
    let after = s.stats().unwrap();
    assert_eq!(after.chunks, before.chunks + 1);
    assert_eq!(after.bytes, before.bytes + 1000);
}
