//! Which old versions and trashed files the retention policy no longer
//! keeps: a pure function of the namespace, the policy and the time. The
//! Raft leader runs it now and then and commits what it finds as one
//! `FsCommand::DropVersions`, so every device forgets the same versions
//! and releases the same chunk references.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{MetaState, OldVersion, Timestamp};
use crate::ids::{ChunkHash, ResourceId, VersionId};

/// How much history is kept (Config `versions_keep`, `versions_max_age_days`
/// and `versions_max_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Old versions kept per file (the current one not counted).
    pub keep: usize,
    /// How long an old version is kept after a newer one replaced it, and a
    /// trashed file after it was removed, in seconds.
    pub max_age_s: u64,
    /// Most bytes that only old versions and trashed files hold (chunks
    /// that current files share are free); the oldest go first beyond it.
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep: 100,
            max_age_s: 30 * 24 * 3600,
            max_bytes: 10 << 30,
        }
    }
}

/// What `expired` found: old versions and trash records to drop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub versions: Vec<(ResourceId, VersionId)>,
    pub trash: Vec<ResourceId>,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.trash.is_empty()
    }
}

/// Most items one `DropVersions` carries; the next round takes the rest.
pub const DROP_MAX: usize = 10_000;

/// What `policy` no longer keeps at `now`: trash older than the age limit
/// (with its versions), versions beyond the count per file or older than
/// the age limit, then the oldest versions until what only history holds
/// fits the byte limit.
pub fn expired(meta: &MetaState, policy: &Retention, now: Timestamp) -> Expired {
    let max_age = i64::try_from(policy.max_age_s).unwrap_or(i64::MAX);
    let too_old = |t: Timestamp| now.secs.saturating_sub(t.secs) > max_age;
    let mut out = Expired::default();
    let mut gone: HashSet<ResourceId> = HashSet::new();
    for (ino, t) in meta.trash() {
        if too_old(t.deleted) {
            out.trash.push(*ino);
            gone.insert(*ino);
        }
    }
    let mut dropped: BTreeSet<(ResourceId, VersionId)> = BTreeSet::new();
    let mut per_file: HashMap<ResourceId, usize> = HashMap::new();
    // Newest first per file, so the count keeps the newest.
    for ((ino, v), old) in meta.all_old_versions().iter().rev() {
        if gone.contains(ino) {
            continue;
        }
        let n = per_file.entry(*ino).or_insert(0);
        *n += 1;
        if *n > policy.keep || too_old(old.superseded) {
            dropped.insert((*ino, *v));
        }
    }
    // The byte limit: count each chunk once, and only those no current
    // file holds; drop the longest-replaced versions first.
    let live = live_chunks(meta);
    let mut held: HashMap<ChunkHash, (usize, u64)> = HashMap::new();
    let mut kept: Vec<(&(ResourceId, VersionId), &OldVersion)> = meta
        .all_old_versions()
        .iter()
        .filter(|(k, _)| !gone.contains(&k.0) && !dropped.contains(*k))
        .collect();
    for (_, old) in &kept {
        for r in old.content.stored_chunks() {
            if !live.contains(&r.hash) {
                held.entry(r.hash).or_insert((0, r.len as u64)).0 += 1;
            }
        }
    }
    let mut bytes: u64 = held.values().map(|(_, len)| *len).sum();
    if bytes > policy.max_bytes {
        kept.sort_by_key(|(k, old)| (old.superseded, **k));
        for (k, old) in kept {
            if bytes <= policy.max_bytes {
                break;
            }
            dropped.insert(*k);
            for r in old.content.stored_chunks() {
                if let Some((n, len)) = held.get_mut(&r.hash) {
                    *n -= 1;
                    if *n == 0 {
                        bytes = bytes.saturating_sub(*len);
                        held.remove(&r.hash);
                    }
                }
            }
        }
    }
    out.versions = dropped.into_iter().collect();
    out.trash.truncate(DROP_MAX);
    out.versions.truncate(DROP_MAX);
    out
}

/// Bytes that only old versions and trashed files hold (each chunk once;
/// chunks a current file shares are not counted).
pub fn history_bytes(meta: &MetaState) -> u64 {
    let live = live_chunks(meta);
    let mut seen: HashSet<ChunkHash> = HashSet::new();
    let mut bytes = 0u64;
    for old in meta.all_old_versions().values() {
        for r in old.content.stored_chunks() {
            if !live.contains(&r.hash) && seen.insert(r.hash) {
                bytes += r.len as u64;
            }
        }
    }
    bytes
}

/// The chunks current files hold.
fn live_chunks(meta: &MetaState) -> HashSet<ChunkHash> {
    meta.files()
        .into_iter()
        .filter_map(|(i, _)| i.content.as_ref())
        .flat_map(|c| c.stored_chunks().map(|r| r.hash))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceId;
    use crate::meta::{ChunkRef, FsCommand, NewNode};

    const D: DeviceId = DeviceId([1; 16]);

    fn t(secs: i64) -> Timestamp {
        Timestamp { secs, nanos: 0 }
    }

    fn chunk(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            hash: ChunkHash::of(&[n; 8]),
            offset: 0,
            len,
        }
    }

    fn file(s: &mut MetaState, name: &str, at: i64) -> ResourceId {
        let cmd = FsCommand::Create {
            parent: ResourceId::ROOT,
            name: name.as_bytes().to_vec(),
            ino: ResourceId(0),
            node: NewNode::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            now: t(at),
        };
        match s.apply(cmd) {
            Ok(crate::meta::Outcome::Inode(i)) => i.id,
            other => panic!("create: {other:?}"),
        }
    }

    fn save(s: &mut MetaState, ino: ResourceId, c: ChunkRef, at: i64) {
        s.apply(FsCommand::CommitVersion {
            ino,
            size: c.len as u64,
            chunks: vec![c],
            mtime: t(at),
            author: D,
            now: t(at),
        })
        .unwrap();
    }

    fn namespace() -> MetaState {
        MetaState::new(0, 0, t(0), D)
    }

    #[test]
    fn the_count_keeps_the_newest_versions_of_each_file() {
        let mut s = namespace();
        let a = file(&mut s, "a", 0);
        let b = file(&mut s, "b", 0);
        for n in 1..=5u8 {
            save(&mut s, a, chunk(n, 10), n as i64);
        }
        save(&mut s, b, chunk(9, 10), 1);
        save(&mut s, b, chunk(10, 10), 2);
        let policy = Retention {
            keep: 2,
            ..Retention::default()
        };
        let e = expired(&s, &policy, t(10));
        // a has old versions 1..=4: 1 and 2 go; b's one old version stays.
        assert_eq!(e.versions, vec![(a, VersionId(1)), (a, VersionId(2))]);
        assert!(e.trash.is_empty());
    }

    #[test]
    fn age_drops_old_versions_and_old_trash_with_its_versions() {
        let mut s = namespace();
        let a = file(&mut s, "a", 0);
        save(&mut s, a, chunk(1, 10), 0);
        save(&mut s, a, chunk(2, 10), 100);
        save(&mut s, a, chunk(3, 10), 200);
        let gone = file(&mut s, "gone", 0);
        save(&mut s, gone, chunk(4, 10), 0);
        save(&mut s, gone, chunk(5, 10), 10);
        s.apply(FsCommand::Unlink {
            parent: ResourceId::ROOT,
            name: b"gone".to_vec(),
            now: t(50),
        })
        .unwrap();
        s.apply(FsCommand::Reclaim { ino: gone }).unwrap();
        assert_eq!(s.trash()[&gone].path, b"/gone".to_vec());
        assert_eq!(s.old_versions(gone).count(), 2);
        let policy = Retention {
            max_age_s: 120,
            ..Retention::default()
        };
        // At 230: a's version 1 was replaced at 100 (130 s ago), version 2
        // at 200; the trash went at 50 (180 s ago).
        let e = expired(&s, &policy, t(230));
        assert_eq!(e.versions, vec![(a, VersionId(1))]);
        assert_eq!(e.trash, vec![gone]);
        // Applying it releases the chunks of everything dropped.
        s.take_changes();
        s.apply(FsCommand::DropVersions {
            versions: e.versions,
            trash: e.trash,
        })
        .unwrap();
        assert!(s.trash().is_empty());
        assert_eq!(s.old_versions(gone).count(), 0);
        let refs = s.chunk_references();
        for n in [1u8, 4, 5] {
            assert!(
                !refs.contains_key(&chunk(n, 10).hash),
                "chunk {n} still held"
            );
        }
        assert!(refs.contains_key(&chunk(2, 10).hash));
        let deltas = s.take_changes().chunk_deltas;
        assert_eq!(deltas.get(&chunk(1, 10).hash), Some(&-1));
        assert_eq!(deltas.get(&chunk(5, 10).hash), Some(&-1));
    }

    #[test]
    fn the_byte_limit_counts_shared_chunks_once_and_drops_the_oldest() {
        let mut s = namespace();
        let a = file(&mut s, "a", 0);
        // Versions 1..=4 of 100 bytes each, all different; version 5 is
        // current (its bytes are free). Version 3's chunk is also the
        // current content of b: free too.
        for n in 1..=5u8 {
            save(&mut s, a, chunk(n, 100), n as i64);
        }
        let b = file(&mut s, "b", 0);
        save(&mut s, b, chunk(3, 100), 9);
        let policy = Retention {
            max_bytes: 150,
            ..Retention::default()
        };
        // History holds 1, 2, 4: 300 bytes. Dropping 1 and 2 leaves 100.
        let e = expired(&s, &policy, t(10));
        assert_eq!(e.versions, vec![(a, VersionId(1)), (a, VersionId(2))]);
        let roomy = Retention {
            max_bytes: 300,
            ..Retention::default()
        };
        assert!(expired(&s, &roomy, t(10)).is_empty());
        assert_eq!(history_bytes(&s), 300);
    }
}
