//! An in-memory `ChunkStore` for unit tests of the layers above storage.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::lock;

use super::{verify, ChunkStore, Pins, StorageError, StoreStats};
use crate::ids::ChunkHash;

#[derive(Default, Debug)]
pub struct MemChunkStore {
    chunks: Mutex<HashMap<ChunkHash, Vec<u8>>>,
    refs: Mutex<HashMap<ChunkHash, u64>>,
    pins: Pins,
}

impl MemChunkStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Test hook: overwrites a stored chunk's bytes, as disk corruption would.
    pub fn corrupt(&self, hash: &ChunkHash) {
        if let Some(d) = lock(&self.chunks).get_mut(hash) {
            if let Some(b) = d.first_mut() {
                *b ^= 0xff;
            }
        }
    }
}

impl ChunkStore for MemChunkStore {
    fn put(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        let hash = ChunkHash::of(data);
        self.pins.with(|p| {
            *p.entry(hash).or_insert(0) += 1;
            let mut chunks = lock(&self.chunks);
            let stored = chunks.entry(hash).or_insert_with(|| data.to_vec());
            // Writing the same content again heals a damaged copy.
            if ChunkHash::of(stored) != hash {
                *stored = data.to_vec();
            }
        });
        Ok(hash)
    }

    fn put_cached(&self, data: &[u8]) -> Result<ChunkHash, StorageError> {
        let hash = ChunkHash::of(data);
        self.pins.with(|_| {
            lock(&self.chunks).insert(hash, data.to_vec());
        });
        Ok(hash)
    }

    fn get(&self, hash: &ChunkHash) -> Result<Option<Vec<u8>>, StorageError> {
        let data = lock(&self.chunks).get(hash).cloned();
        match data {
            Some(d) => {
                verify(hash, &d)?;
                Ok(Some(d))
            }
            None => Ok(None),
        }
    }

    fn contains(&self, hash: &ChunkHash) -> Result<bool, StorageError> {
        Ok(lock(&self.chunks).contains_key(hash))
    }

    fn apply_refs(&self, deltas: &BTreeMap<ChunkHash, i64>) -> Result<(), StorageError> {
        self.pins.with(|pins| {
            let mut refs = lock(&self.refs);
            let mut chunks = lock(&self.chunks);
            for (h, d) in deltas {
                let cur = refs.get(h).copied().unwrap_or(0) as i64;
                let new = (cur + d).max(0) as u64;
                if new == 0 {
                    refs.remove(h);
                    if !pins.contains_key(h) {
                        chunks.remove(h);
                    }
                } else {
                    refs.insert(*h, new);
                }
            }
        });
        Ok(())
    }

    fn refcount(&self, hash: &ChunkHash) -> Result<u64, StorageError> {
        Ok(lock(&self.refs).get(hash).copied().unwrap_or(0))
    }

    fn pin(&self, hashes: &[ChunkHash]) {
        self.pins.pin(hashes);
    }

    fn unpin(&self, hashes: &[ChunkHash]) {
        self.pins.unpin_then(hashes, |_, released| {
            let refs = lock(&self.refs);
            let mut chunks = lock(&self.chunks);
            for h in released {
                if !refs.contains_key(&h) {
                    chunks.remove(&h);
                }
            }
        })
    }

    fn collect_garbage(&self) -> Result<u64, StorageError> {
        Ok(self.pins.with(|pins| {
            let refs = lock(&self.refs);
            let mut chunks = lock(&self.chunks);
            let before = chunks.len();
            chunks.retain(|h, _| refs.contains_key(h) || pins.contains_key(h));
            (before - chunks.len()) as u64
        }))
    }

    fn evict(&self, hashes: &[ChunkHash]) -> Result<u64, StorageError> {
        self.pins.with(|pins| {
            let mut chunks = lock(&self.chunks);
            let mut bytes = 0;
            for h in hashes {
                if !pins.contains_key(h) {
                    bytes += chunks.remove(h).map_or(0, |d| d.len() as u64);
                }
            }
            Ok(bytes)
        })
    }

    fn stats(&self) -> Result<StoreStats, StorageError> {
        let chunks = lock(&self.chunks);
        Ok(StoreStats {
            chunks: chunks.len() as u64,
            bytes: chunks.values().map(|d| d.len() as u64).sum(),
        })
    }
}

/// Keeps nothing: the in-memory store's namespace lives only in `MetaState`,
/// but chunk reference deltas are applied as the RocksDB store would.
impl super::MetaStore for MemChunkStore {
    fn persist(&self, changes: &crate::meta::Changes, _sync: bool) -> Result<(), StorageError> {
        self.apply_refs(&changes.chunk_deltas)
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl crate::storage::conformance::Corrupt for MemChunkStore {
        fn corrupt(&self, hash: &ChunkHash) {
            MemChunkStore::corrupt(self, hash)
        }
    }

    #[test]
    fn conformance() {
        crate::storage::conformance::run_all(MemChunkStore::new);
    }
}
