//! This device's outbox: the changes it applied locally as their authority
//! and has not yet seen committed through Raft, in the order it applied
//! them. Each is on disk (RocksDB, `o` + sequence number) from the moment
//! it is applied, and visible to every program here at once: the namespace
//! the filesystem reads is the committed state with these replayed on top
//! (`meta::MetaState::savepoint`/`keep`). A shipper task sends them to the
//! Raft log in batches (group commit); when a batch commits, the state
//! machine takes the speculative layer off, applies the log in order like
//! every other device, and replays what is still pending.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::types::LocalChange;
use crate::ids::ChunkHash;
use crate::meta::FsCommand;

/// One change applied here and not yet committed.
#[derive(Debug)]
pub struct Pending {
    pub seq: u64,
    pub change: LocalChange,
    /// Its encoded size, to bound batches in bytes.
    pub bytes: usize,
    /// Chunks a new version references: pinned until the version is
    /// committed (their reference counts follow the committed state).
    pub pins: Vec<ChunkHash>,
    /// False when it no longer applies on top of the committed state (a
    /// change committed before it made it invalid): it stays in order,
    /// ships, and is refused when committed, which the state machine
    /// reports as a conflict.
    pub applies: bool,
}

/// The outbox in memory (the same entries are on disk).
#[derive(Debug, Default)]
pub struct Outbox {
    pub entries: VecDeque<Pending>,
    /// The sequence number of the next change applied here.
    pub next_seq: u64,
    /// Changes applied here that were refused when they committed.
    pub conflicts: u64,
}

/// How an outbox entry is stored: the change, versioned.
#[derive(Serialize, Deserialize)]
pub(super) enum Stored {
    V1(LocalChange),
}

impl Outbox {
    /// The sequence number of the last change applied here (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// The first entries, up to `max_changes` and about `max_bytes` (at
    /// least one), as a batch for the log.
    pub fn batch(&self, max_changes: usize, max_bytes: usize) -> Option<(u64, Vec<LocalChange>)> {
        let first = self.entries.front()?.seq;
        let mut bytes = 0;
        let mut out = Vec::new();
        for p in &self.entries {
            if !out.is_empty() && (out.len() >= max_changes || bytes + p.bytes > max_bytes) {
                break;
            }
            bytes += p.bytes;
            out.push(p.change.clone());
        }
        Some((first, out))
    }
}

/// The chunks a command's new version references (to pin while pending).
pub fn chunks_of(cmd: &FsCommand) -> Vec<ChunkHash> {
    match cmd {
        FsCommand::CommitVersion { chunks, .. } => chunks
            .iter()
            .filter(|c| !c.hash.is_zero_run())
            .map(|c| c.hash)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, ResourceId};

    fn pending(seq: u64, bytes: usize) -> Pending {
        Pending {
            seq,
            change: LocalChange {
                origin: DeviceId([1; 16]),
                id: seq,
                cmd: FsCommand::Reclaim {
                    ino: ResourceId(seq),
                },
            },
            bytes,
            pins: Vec::new(),
            applies: true,
        }
    }

    #[test]
    fn batches_are_bounded_in_count_and_bytes_but_never_empty() {
        let mut o = Outbox::default();
        assert!(o.batch(10, 100).is_none());
        for s in 5..15 {
            o.entries.push_back(pending(s, 40));
        }
        let (first, b) = o.batch(4, 1000).unwrap();
        assert_eq!((first, b.len()), (5, 4));
        let (_, b) = o.batch(100, 100).unwrap();
        assert_eq!(b.len(), 2, "40 + 40 fit in 100, a third does not");
        let mut big = Outbox::default();
        big.entries.push_back(pending(1, 5000));
        big.entries.push_back(pending(2, 10));
        let (_, b) = big.batch(100, 100).unwrap();
        assert_eq!(b.len(), 1, "one oversized change still ships alone");
    }
}
