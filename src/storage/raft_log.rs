//! The Raft log and Raft's own small state (vote, purge point, snapshot,
//! applied position) in the same RocksDB as the namespace, so that applying
//! a batch of commands and recording how far the log was applied is one
//! atomic write. Storage sees opaque bytes: `raft/` owns their encoding.
//!
//! Log writes go to the WAL without an fsync here; the Raft log store syncs
//! them (one sync for every append made meanwhile) before Raft counts them,
//! and chunks written without the WAL are flushed before an append, since
//! its entries may reference them. The vote is synced: a device must never
//! vote twice in one term, even across a power cut.

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use super::{
    db_err, encode, RocksStore, CF_META, CF_REFS, PREFIX_ENTRY, PREFIX_INODE, PREFIX_TRASH,
    PREFIX_VERSION,
};
use crate::meta::{Changes, MetaState, Snapshot};
use crate::storage::StorageError;
use std::sync::atomic::Ordering;

pub(super) const CF_RAFT_LOG: &str = "raft_log";
/// Prefix of Raft's state keys in the meta family.
const PREFIX_RAFT: &[u8] = b"r/";

/// A key-value change written in the same batch as a namespace change.
pub type Extra = (Vec<u8>, Option<Vec<u8>>);

/// Key of entry `seq` of a sequence kept under one prefix byte.
fn seq_key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut k = vec![prefix];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn raft_key(name: &str) -> Vec<u8> {
    let mut k = PREFIX_RAFT.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

impl RocksStore {
    /// Appends log entries `(index, bytes)` in one batch.
    pub fn raft_append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StorageError> {
        self.flush_bulk()?;
        let cf = self.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        for (i, b) in entries {
            batch.put_cf(cf, i.to_be_bytes(), b);
        }
        self.db.write(batch).map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Entries with `from <= index < to`, in order.
    pub fn raft_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let cf = self.cf(CF_RAFT_LOG);
        let start = from.to_be_bytes();
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(db_err)?;
            let i = index_of(&k)?;
            if i >= to {
                break;
            }
            out.push((i, v.into_vec()));
        }
        Ok(out)
    }

    /// The last entry of the log, if any.
    pub fn raft_last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let cf = self.cf(CF_RAFT_LOG);
        match self.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (k, v) = item.map_err(db_err)?;
                Ok(Some((index_of(&k)?, v.into_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes every entry with `index >= from` (a conflicting suffix).
    pub fn raft_truncate(&self, from: u64) -> Result<(), StorageError> {
        let cf = self.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, &from.to_be_bytes()[..], &[0xffu8; 9][..]);
        self.db.write(batch).map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes every entry with `index <= upto` and records `state` (the
    /// purge point) in the same batch.
    pub fn raft_purge(&self, upto: u64, state: (&str, Vec<u8>)) -> Result<(), StorageError> {
        let cf = self.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), raft_key(state.0), state.1);
        match upto.checked_add(1) {
            Some(end) => batch.delete_range_cf(cf, 0u64.to_be_bytes(), end.to_be_bytes()),
            None => batch.delete_range_cf(cf, &0u64.to_be_bytes()[..], &[0xffu8; 9][..]),
        }
        self.db.write(batch).map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    pub fn raft_get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_cf(self.cf(CF_META), raft_key(name))
            .map_err(db_err)
    }

    /// Writes one piece of Raft state; with `sync`, durable on return.
    pub fn raft_put(&self, name: &str, value: &[u8], sync: bool) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .put_cf_opt(self.cf(CF_META), raft_key(name), value, &wo)
            .map_err(db_err)?;
        if !sync {
            self.wal_written.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Key of a Raft state entry, for `Extra` changes.
    pub fn raft_state_key(name: &str) -> Vec<u8> {
        raft_key(name)
    }

    /// Key of outbox entry `seq` (for `Extra` deletions).
    pub fn outbox_key(seq: u64) -> Vec<u8> {
        seq_key(super::PREFIX_OUTBOX, seq)
    }

    /// Records one local change not yet committed through Raft (WAL, no
    /// sync: it survives `kill -9` at once, a power cut after the periodic
    /// sync, as every change does). Chunks written without the WAL are made
    /// durable first, since the entry may reference them.
    pub fn outbox_put(&self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.seq_put(super::PREFIX_OUTBOX, seq, bytes)
    }

    /// Deletes outbox entries (changes that turned out not to apply).
    pub fn outbox_delete(&self, seqs: &[u64]) -> Result<(), StorageError> {
        self.seq_delete(super::PREFIX_OUTBOX, seqs)
    }

    /// Every outbox entry, in order.
    pub fn outbox_entries(&self) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.seq_entries(super::PREFIX_OUTBOX)
    }

    /// Key of journal record `seq` (for `Extra` changes).
    pub fn journal_key(seq: u64) -> Vec<u8> {
        seq_key(super::PREFIX_JOURNAL, seq)
    }

    /// Records one tentative change (made while its authority was out of
    /// reach; see `raft/journal.rs`), durable as an outbox entry is.
    pub fn journal_put(&self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.seq_put(super::PREFIX_JOURNAL, seq, bytes)
    }

    pub fn journal_delete(&self, seqs: &[u64]) -> Result<(), StorageError> {
        self.seq_delete(super::PREFIX_JOURNAL, seqs)
    }

    /// Every tentative change, in order.
    pub fn journal_entries(&self) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.seq_entries(super::PREFIX_JOURNAL)
    }

    /// Records one conflict met at reintegration (kept for `meshfs
    /// conflicts` until cleared).
    pub fn conflict_put(&self, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.seq_put(super::PREFIX_CONFLICT, seq, bytes)
    }

    pub fn conflict_delete(&self, seqs: &[u64]) -> Result<(), StorageError> {
        self.seq_delete(super::PREFIX_CONFLICT, seqs)
    }

    /// Every recorded conflict, oldest first.
    pub fn conflict_entries(&self) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        self.seq_entries(super::PREFIX_CONFLICT)
    }

    fn seq_put(&self, prefix: u8, seq: u64, bytes: &[u8]) -> Result<(), StorageError> {
        self.flush_bulk()?;
        self.db
            .put_cf(self.cf(CF_META), seq_key(prefix, seq), bytes)
            .map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn seq_delete(&self, prefix: u8, seqs: &[u64]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for s in seqs {
            batch.delete_cf(self.cf(CF_META), seq_key(prefix, *s));
        }
        self.db.write(batch).map_err(db_err)?;
        self.wal_written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn seq_entries(&self, prefix: u8) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let cf = self.cf(CF_META);
        let start = [prefix];
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (k, v) = item.map_err(db_err)?;
            if k.first() != Some(&prefix) {
                break;
            }
            out.push((index_of(&k[1..])?, v.into_vec()));
        }
        Ok(out)
    }

    /// Persists the changes of applied commands with `extra` (the applied
    /// position, outbox deletions) in one atomic batch.
    pub fn persist_applied(
        &self,
        changes: &Changes,
        extra: &[Extra],
        sync: bool,
    ) -> Result<(), StorageError> {
        self.persist_changes_with(changes, extra, sync)
    }

    /// Replaces the whole namespace with `snap` (a Raft
    /// snapshot being installed), resets chunk reference counts to what it
    /// references and writes `extra`, in one batch. Chunks no longer
    /// referenced stay as cache until garbage collection.
    pub fn replace_namespace(&self, snap: &Snapshot, extra: &[Extra]) -> Result<(), StorageError> {
        self.flush_bulk()?;
        let meta = self.cf(CF_META);
        let refs = self.cf(CF_REFS);
        let mut batch = WriteBatch::default();
        for prefix in [PREFIX_INODE, PREFIX_ENTRY, PREFIX_VERSION, PREFIX_TRASH] {
            batch.delete_range_cf(meta, [prefix], [prefix + 1]);
        }
        batch.delete_range_cf(refs, &[0u8; 1][..], &[0xffu8; 33][..]);
        let state = MetaState::restore(snap.clone())
            .map_err(|e| StorageError::Decode(format!("snapshot: {e}")))?;
        for i in &snap.inodes {
            batch.put_cf(meta, super::inode_key(i.id), encode(i)?);
        }
        for (parent, name, e) in &snap.entries {
            batch.put_cf(meta, super::entry_key(*parent, name), encode(e)?);
        }
        batch.put_cf(meta, super::KEY_SPACE, encode(&snap.space)?);
        for ((ino, ver), v) in &snap.versions {
            batch.put_cf(meta, super::version_key(*ino, *ver), encode(v)?);
        }
        for (ino, t) in &snap.trash {
            batch.put_cf(meta, super::trash_key(*ino), encode(t)?);
        }
        for (h, n) in state.chunk_references() {
            batch.put_cf(refs, h.as_bytes(), n.to_le_bytes());
        }
        for (k, v) in extra {
            match v {
                Some(v) => batch.put_cf(meta, k, v),
                None => batch.delete_cf(meta, k),
            }
        }
        // Pins are held for versions being committed here; their chunks are
        // not touched, so the pin table need not be locked.
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(db_err)?;
        Ok(())
    }
}

fn index_of(k: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = k
        .try_into()
        .map_err(|_| StorageError::Decode("raft log key is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(arr))
}
