//! The access log's table: anonymized access events from every device, in
//! time order, with bounded retention. Storage sees opaque values; the key
//! is (coarse time, origin device, sequence), so a scan is in time order and
//! an event gossiped twice is stored once.
//!
//! Writes skip the WAL's fsync like every other non-vote write: losing the
//! last second of the log in a power cut costs a little learning, nothing
//! else.

use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::{db_err, RocksStore};
use crate::storage::StorageError;

pub(super) const CF_ACCESS: &str = "access";

/// One stored event: where it sorts and its encoded body.
pub struct AccessRecord {
    pub ts_ms: u64,
    pub origin: [u8; 8],
    pub seq: u64,
    pub value: Vec<u8>,
}

/// Every scan of the log reads past the block cache: replaying 100,000
/// events at start-up or counting a million when trimming would otherwise
/// fill the cache the namespace and chunk index live in (and the daemon's
/// resident set with it) with blocks read once.
fn scan() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.fill_cache(false);
    ro
}

fn key(ts_ms: u64, origin: &[u8; 8], seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&ts_ms.to_be_bytes());
    k[8..16].copy_from_slice(origin);
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl RocksStore {
    pub fn access_put(&self, records: &[AccessRecord]) -> Result<(), StorageError> {
        let cf = self.cf(CF_ACCESS);
        let mut batch = WriteBatch::default();
        for r in records {
            batch.put_cf(cf, key(r.ts_ms, &r.origin, r.seq), &r.value);
        }
        self.db.write(batch).map_err(db_err)
    }

    /// The newest `limit` event bodies, oldest first.
    pub fn access_recent(&self, limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_ACCESS), scan(), IteratorMode::End)
        {
            let (_, v) = item.map_err(db_err)?;
            out.push(v.into_vec());
            if out.len() >= limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Event bodies newest first, handed to `each` until it returns false.
    pub fn access_scan_newest(
        &self,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), StorageError> {
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_ACCESS), scan(), IteratorMode::End)
        {
            let (_, v) = item.map_err(db_err)?;
            if !each(&v) {
                break;
            }
        }
        Ok(())
    }

    /// Every event body, oldest first, handed to `each` (export).
    pub fn access_scan(&self, mut each: impl FnMut(&[u8])) -> Result<(), StorageError> {
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_ACCESS), scan(), IteratorMode::Start)
        {
            let (_, v) = item.map_err(db_err)?;
            each(&v);
        }
        Ok(())
    }

    /// Drops events older than `min_ts_ms`, then the oldest beyond `keep`;
    /// returns how many events remain (counted while trimming).
    pub fn access_trim(&self, min_ts_ms: u64, keep: usize) -> Result<usize, StorageError> {
        let cf = self.cf(CF_ACCESS);
        let cutoff = key(min_ts_ms, &[0; 8], 0);
        self.db
            .delete_range_cf(cf, [0u8; 24], cutoff)
            .map_err(db_err)?;
        // Count from the newest end; everything past `keep` goes.
        let mut count = 0usize;
        let mut oldest_kept: Option<Vec<u8>> = None;
        for item in self.db.iterator_cf_opt(cf, scan(), IteratorMode::End) {
            let (k, _) = item.map_err(db_err)?;
            if count == keep {
                oldest_kept = Some(k.into_vec());
                break;
            }
            count += 1;
        }
        if let Some(k) = oldest_kept {
            // `k` is the newest event over the limit: delete it and all older.
            let mut end = k;
            end.push(0);
            self.db
                .delete_range_cf(cf, &[0u8; 24][..], &end[..])
                .map_err(db_err)?;
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_orders_dedups_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let rec = |ts: u64, seq: u64| AccessRecord {
            ts_ms: ts,
            origin: [1; 8],
            seq,
            value: format!("{ts}/{seq}").into_bytes(),
        };
        store
            .access_put(&[rec(30, 1), rec(10, 1), rec(20, 1), rec(20, 1)])
            .unwrap();
        let text = |v: Vec<Vec<u8>>| {
            v.into_iter()
                .map(|b| String::from_utf8(b).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text(store.access_recent(10).unwrap()),
            ["10/1", "20/1", "30/1"]
        );
        assert_eq!(text(store.access_recent(2).unwrap()), ["20/1", "30/1"]);
        store
            .access_put(&(0..10).map(|i| rec(100 + i, i)).collect::<Vec<_>>())
            .unwrap();
        // Older than 15 goes, then all but the newest 5.
        assert_eq!(store.access_trim(15, 5).unwrap(), 5);
        let mut all = Vec::new();
        store
            .access_scan(|v| all.push(String::from_utf8(v.to_vec()).unwrap()))
            .unwrap();
        assert_eq!(all, ["105/5", "106/6", "107/7", "108/8", "109/9"]);
    }
}
