//! Raft's log and vote in RocksDB (through `storage::RocksStore`), encoded
//! with postcard, and the group commit that makes appended entries durable
//! before Raft counts them (`Syncer`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogId, StorageError, StorageIOError, Vote};

use super::types::{LogId, NodeId, TypeConfig};
use crate::storage::RocksStore;

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";

#[derive(Clone)]
pub struct LogStore {
    store: Arc<RocksStore>,
    syncer: Arc<Syncer>,
    /// Test hook (`MESHFS_FAULT=raft-log-unreadable-from=N`): entries from
    /// index N on read as undecodable, as a damaged log or one written by
    /// an incompatible build would.
    unreadable_from: Option<u64>,
}

/// Appended entries waiting for the sync that makes them durable.
const SYNC_QUEUE: usize = 1024;

/// Group commit: Raft may count an appended entry towards a majority only
/// once it survives a power cut (else a mesh-wide power cut could lose an
/// entry a majority acknowledged, and a new leader truncate the copy that
/// was synced elsewhere). `append` writes the WAL and queues its callback;
/// this thread syncs the WAL once for every callback queued meanwhile, then
/// answers them in order. While one sync runs, the next appends gather.
struct Syncer {
    tx: std::sync::mpsc::SyncSender<LogFlushed<TypeConfig>>,
}

impl Syncer {
    fn start(store: Arc<RocksStore>) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LogFlushed<TypeConfig>>(SYNC_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || {
                // Ends when every LogStore clone (the sender) is gone.
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let synced = crate::storage::MetaStore::sync(&*store);
                    if let Err(e) = &synced {
                        tracing::error!(error = %e, "syncing the Raft log failed");
                    }
                    for cb in waiting {
                        cb.log_io_completed(
                            synced
                                .as_ref()
                                .map(|_| ())
                                .map_err(|e| std::io::Error::other(e.to_string())),
                        );
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread every append fails (its callback is
            // dropped, which Raft reads as an I/O error): loud, not silent.
            tracing::error!(error = %e, "could not start the Raft log sync thread");
        }
        Syncer { tx }
    }
}

impl LogStore {
    pub fn new(store: Arc<RocksStore>) -> Self {
        let syncer = Arc::new(Syncer::start(store.clone()));
        let unreadable_from = std::env::var("MESHFS_FAULT").ok().and_then(|v| {
            v.strip_prefix("raft-log-unreadable-from=")
                .and_then(|n| n.parse().ok())
        });
        LogStore {
            store,
            syncer,
            unreadable_from,
        }
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageIOError<NodeId>> {
        match self
            .store
            .raft_get(key)
            .map_err(|e| StorageIOError::read(&e))?
        {
            Some(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| StorageIOError::read(&e)),
            None => Ok(None),
        }
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageIOError<NodeId>> {
    postcard::to_stdvec(v).map_err(|e| StorageIOError::write(&e))
}

fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageIOError<NodeId>> {
    postcard::from_bytes(bytes).map_err(|e| {
        // Corruption, or a log written by a build whose entry format
        // differs (the format is not frozen before a release): say which.
        let why = std::io::Error::other(format!(
            "a Raft log entry could not be decoded ({e}): damaged, or written \
             by an incompatible meshfs version"
        ));
        StorageIOError::read_logs(&why)
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        let rows = self
            .store
            .raft_entries(from, to)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, b) in rows {
            let unreadable = self.unreadable_from.is_some_and(|n| i >= n);
            out.push(decode_entry(if unreadable { &[] } else { &b })?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId> = self.get(KEY_PURGED)?;
        let last = match self
            .store
            .raft_last()
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, b)) => Some(*decode_entry(&b)?.get_log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Synced: voting twice in one term after a power cut would let two
        // leaders share a term.
        self.store
            .raft_put(KEY_VOTE, &encode(vote)?, true)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.get(KEY_VOTE)?)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<NodeId>> {
        self.store
            .raft_put(KEY_COMMITTED, &encode(&committed)?, false)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        Ok(self.get::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e)?));
        }
        let res = self.store.raft_append(&rows);
        if let Err(e) = &res {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
        } else if let Err(e) = self.syncer.tx.send(callback) {
            // The sync thread is gone: the entries are not durable.
            e.0.log_io_completed(Err(std::io::Error::other(
                "the Raft log sync thread stopped",
            )));
        }
        res.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.store
            .raft_truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        self.store
            .raft_purge(log_id.index, (KEY_PURGED, encode(&log_id)?))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
