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

/// How long own changes wait behind a foreign effect (see
/// `Outbox::blocking_foreign`).
pub const FOREIGN_BLOCK: std::time::Duration = std::time::Duration::from_secs(3);

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
    /// How often each change (origin, id) was queued again because what
    /// it changes was not committed yet.
    pub requeued: std::collections::HashMap<(DeviceId, u64), u32>,
}

/// How often a change refused for want of what it changes is queued again
/// (each time it ships with the next batch) before it is reintegrated as
/// a tentative change instead.
pub const REQUEUE_MAX: u32 = 50;

/// How an outbox entry is stored: the change, versioned.
#[derive(Serialize, Deserialize)]
pub(super) enum Stored {
    V1(LocalChange),
}

impl Outbox {
    /// Appends change `seq` (applied here, on disk); returns the chunks
    /// its new version references, for the caller to pin.
    pub fn push(&mut self, seq: u64, change: LocalChange, bytes: usize) -> Vec<ChunkHash> {
        let order = self.take_order();
        self.push_at(seq, change, bytes, order)
    }

    /// `push` keeping the place `order` the change was first made at (a
    /// change queued again after it was refused at commit).
    pub fn push_at(
        &mut self,
        seq: u64,
        change: LocalChange,
        bytes: usize,
        order: u64,
    ) -> Vec<ChunkHash> {
        let pins = chunks_of(&change.cmd);
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

    /// The place of the first foreign effect own changes still wait for:
    /// one reported less than `FOREIGN_BLOCK` ago. Two devices can each
    /// hold a change of the other's behind such a wait (a change one
    /// forwarded, stuck in the other's outbox behind a change that waits
    /// for the first); past `FOREIGN_BLOCK` the wait is given up, the
    /// changes behind ship, and one that needed it is refused at commit
    /// and reintegrated (`journal.rs`).
    pub fn blocking_foreign(&self) -> Option<u64> {
        self.foreign
            .iter()
            .filter(|f| f.at.elapsed() < FOREIGN_BLOCK)
            .map(|f| f.order)
            .min()
    }

    /// What a change spanning authorities must see committed here: for a
    /// program's change, every pending change; with `shippable` (a
    /// reintegrated change), the last one deciding about any of `resources`
    /// (0: none), leaving out those behind a tentative change: they
    /// ship only after it is reintegrated, which may itself wait for the
    /// change asking (two devices, each reintegrating a tentative change
    /// spanning both); the change asking commits first then, and one of
    /// them that no longer applies after it is queued again or
    /// reintegrated as a conflict, not lost. (A program's change that waits
    /// too long is kept tentatively.)
    pub fn last_touching(&self, resources: &[crate::ids::ResourceId], shippable: bool) -> u64 {
        if !shippable {
            // A program's change: everything pending here first (what it
            // decides may hinge on a change to something it does not name,
            // such as the file a rename replaces).
            return self.last_seq();
        }
        let blocked_at = self.tentative.front().map_or(u64::MAX, |t| t.order);
        self.entries
            .iter()
            .rev()
            .filter(|p| p.order < blocked_at)
            .find(|p| {
                p.change
                    .cmd
                    .decided_by()
                    .iter()
                    .any(|r| resources.contains(r))
            })
            .map_or(0, |p| p.seq)
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
    /// effect that is not committed yet, nor one that touches what a
    /// tentative change made before it touches (it may depend on it; those
    /// that do not ship, so that one device's tentative change does not
    /// hold up the changes it applied for others).
    pub fn batch(&self, max_changes: usize, max_bytes: usize) -> Option<(u64, Vec<LocalChange>)> {
        let first = self.entries.front()?;
        let blocked_at = self.blocking_foreign().unwrap_or(u64::MAX);
        let tentative: Vec<(u64, Vec<crate::ids::ResourceId>)> = self
            .tentative
            .iter()
            .map(|t| (t.order, touched(&t.t.change.cmd)))
            .collect();
        let waits_for_tentative = |p: &Pending| {
            !tentative.is_empty() && {
                let mine = touched(&p.change.cmd);
                tentative
                    .iter()
                    .any(|(o, set)| *o < p.order && set.iter().any(|r| mine.contains(r)))
            }
        };
        if first.order > blocked_at || waits_for_tentative(first) {
            return None;
        }
        let first = first.seq;
        let mut bytes = 0;
        let mut out = Vec::new();
        for p in &self.entries {
            if p.order > blocked_at
                || waits_for_tentative(p)
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

/// What a command touches for ordering against tentative changes: what
/// decides it, and the inode it creates or links.
pub(super) fn touched(cmd: &FsCommand) -> Vec<crate::ids::ResourceId> {
    let mut out = cmd.decided_by();
    match cmd {
        FsCommand::Create { ino, .. } | FsCommand::Link { ino, .. } => out.push(*ino),
        _ => {}
    }
    out
}

/// The chunks a command's new version references (to pin while pending).
/// Whether `cmd` names chunks that hold bytes (a new version's content).
pub fn names_chunks(cmd: &FsCommand) -> bool {
    matches!(cmd, FsCommand::CommitVersion { chunks, .. } if chunks.iter().any(|c| !c.hash.is_zero_run()))
}

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

    #[test]
    fn only_changes_touching_what_a_tentative_change_touches_wait_for_it() {
        use crate::raft::journal::{Tentative, TentativeChange};
        let mut o = Outbox::default();
        // A tentative change to directory 7, then own changes to 5 and 7.
        o.tentative.push_back(Tentative {
            order: 1,
            jseq: 0,
            t: TentativeChange {
                change: LocalChange {
                    origin: DeviceId([1; 16]),
                    id: 1,
                    cmd: FsCommand::Reclaim { ino: ResourceId(7) },
                },
                expect: Vec::new(),
                at: Default::default(),
                after_seq: 0,
                place: None,
                path: Vec::new(),
            },
            pins: Vec::new(),
            applies: true,
        });
        let mut a = pending(5, 10);
        a.order = 2;
        let mut b = pending(7, 10);
        b.order = 3;
        let mut c = pending(8, 10);
        c.order = 4;
        o.entries.extend([a, b, c]);
        let (first, batch) = o.batch(100, 1000).unwrap();
        assert_eq!(
            (first, batch.len()),
            (5, 1),
            "5 ships, 7 waits (and 8 behind it)"
        );
    }

    #[test]
    fn a_foreign_effect_blocks_for_a_while_only() {
        let mut o = Outbox::default();
        for s in 1..=3 {
            o.entries.push_back(pending(s, 10));
        }
        o.foreign.push_back(Foreign {
            order: 3,
            authority: DeviceId([2; 16]),
            seq: 9,
            effects: Effects::default(),
            at: Instant::now() - FOREIGN_BLOCK - std::time::Duration::from_millis(1),
            journal: None,
        });
        assert_eq!(o.batch(100, 1000).unwrap().1.len(), 3, "given up on");
    }
}
