//! This device's outbox: the changes it applied locally as their authority
//! and has not yet seen committed through Raft, in the order it applied
//! them. Each is on disk (RocksDB, `o` + sequence number) from the moment
//! it is applied, and visible to every program here at once: the namespace
//! the filesystem reads is the committed state with these replayed on top
//! (`meta::MetaState::savepoint`/`keep`). A shipper task sends them to the
//! Raft log in batches (group commit); when a batch commits, the state
//! machine takes the speculative layer off, applies the log in order like
//! every other device, and replays what is still pending.
//!
//! Beside its own changes the speculative layer holds *foreign effects*:
//! values another device's authority produced and reported (a change this
//! device forwarded to it, its current state of a file being opened, a
//! name a lookup asked it for) before its batch holding them reaches the
//! log. They are shown here at once and dropped when that batch is applied
//! here. Own changes made after a foreign effect ship only once it has
//! committed, so the log never holds a change before one it depends on
//! (a version of a file before the file's creation).

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::journal::Tentative;
use super::types::LocalChange;
use crate::ids::{ChunkHash, DeviceId};
use crate::meta::{Effects, FsCommand};

/// One change applied here and not yet committed.
#[derive(Debug)]
pub struct Pending {
    /// Place in the speculative layer, among foreign effects too.
    pub order: u64,
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

/// Values another authority reported, shown here until its batch is.
#[derive(Debug)]
pub struct Foreign {
    pub order: u64,
    pub authority: DeviceId,
    /// The authority's outbox entry that holds them: applied here once its
    /// shipped sequence reaches this.
    pub seq: u64,
    pub effects: Effects,
    pub at: Instant,
    /// The journal record of the tentative change it stands for, dropped
    /// once it is settled.
    pub journal: Option<u64>,
}

/// The outbox in memory (the same entries are on disk; foreign effects
/// live in memory only).
#[derive(Debug, Default)]
pub struct Outbox {
    pub entries: VecDeque<Pending>,
    pub foreign: VecDeque<Foreign>,
    /// Tentative changes (`journal.rs`), waiting for their authority.
    pub tentative: VecDeque<Tentative>,
    /// The journal sequence of the next tentative change.
    pub next_jseq: u64,
    /// When the oldest tentative change still waiting was made (status).
    pub tentative_since: Option<crate::meta::Timestamp>,
    /// The next place in the speculative layer.
    pub next_order: u64,
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
    /// Appends change `seq` (applied here, on disk); returns the chunks
    /// its new version references, for the caller to pin.
    pub fn push(&mut self, seq: u64, change: LocalChange, bytes: usize) -> Vec<ChunkHash> {
        let pins = chunks_of(&change.cmd);
        let order = self.take_order();
        self.next_seq = seq + 1;
        self.entries.push_back(Pending {
            order,
            seq,
            change,
            bytes,
            pins: pins.clone(),
            applies: true,
        });
        pins
    }

    /// The next place in the speculative layer.
    pub fn take_order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order - 1
    }

    /// The sequence number of the last change applied here (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// The first entries, up to `max_changes` and about `max_bytes` (at
    /// least one), as a batch for the log; none made after a foreign
    /// effect that is not committed yet, nor after a tentative change not
    /// reintegrated yet (they may depend on it).
    pub fn batch(&self, max_changes: usize, max_bytes: usize) -> Option<(u64, Vec<LocalChange>)> {
        let first = self.entries.front()?;
        let blocked_at = self
            .foreign
            .front()
            .map_or(u64::MAX, |f| f.order)
            .min(self.tentative.front().map_or(u64::MAX, |t| t.order));
        if first.order > blocked_at {
            return None;
        }
        let first = first.seq;
        let mut bytes = 0;
        let mut out = Vec::new();
        for p in &self.entries {
            if p.order > blocked_at
                || (!out.is_empty() && (out.len() >= max_changes || bytes + p.bytes > max_bytes))
            {
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
            order: seq * 2,
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

    #[test]
    fn changes_after_an_uncommitted_foreign_effect_wait_for_it() {
        let mut o = Outbox::default();
        for s in 1..=4 {
            o.entries.push_back(pending(s, 10));
        }
        // Reported by another authority between our changes 2 and 3.
        o.foreign.push_back(Foreign {
            order: 5,
            authority: DeviceId([2; 16]),
            seq: 9,
            effects: Effects::default(),
            at: Instant::now(),
            journal: None,
        });
        let (first, b) = o.batch(100, 1000).unwrap();
        assert_eq!((first, b.len()), (1, 2), "only what came before it");
        o.entries.pop_front();
        o.entries.pop_front();
        assert!(o.batch(100, 1000).is_none(), "the rest waits");
        o.foreign.pop_front();
        assert_eq!(o.batch(100, 1000).unwrap().1.len(), 2);
    }
}
