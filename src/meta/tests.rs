//! Unit tests of the state machine: rename edge cases, link counts,
//! timestamps, errors, chunk reference deltas, snapshot round trips.

use super::*;
use crate::ids::DeviceId;

fn t(secs: i64) -> Timestamp {
    Timestamp { secs, nanos: 0 }
}

fn fresh() -> MetaState {
    MetaState::new(0, 0, t(1), DeviceId([1; 16]))
}

fn mk(s: &mut MetaState, parent: ResourceId, name: &str, node: NewNode, now: i64) -> Inode {
    match s
        .apply(FsCommand::Create {
            parent,
            name: name.as_bytes().to_vec(),
            ino: crate::ids::ResourceId(0),
            node,
            perm: 0o644,
            uid: 1000,
            gid: 1000,
            now: t(now),
        })
        .unwrap()
    {
        Outcome::Inode(i) => *i,
        o => panic!("unexpected {o:?}"),
    }
}

fn rename(
    s: &mut MetaState,
    p: ResourceId,
    n: &str,
    np: ResourceId,
    nn: &str,
    mode: RenameMode,
) -> R<Outcome> {
    s.apply(FsCommand::Rename {
        parent: p,
        name: n.into(),
        new_parent: np,
        new_name: nn.into(),
        mode,
        now: t(50),
    })
}

fn nlink(s: &MetaState, ino: ResourceId) -> u32 {
    s.get(ino).unwrap().nlink
}

const ROOT: ResourceId = ResourceId::ROOT;

#[test]
fn create_sets_nlink_and_parent_times() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 10);
    assert_eq!(d.nlink, 2);
    assert_eq!(nlink(&s, ROOT), 3);
    let f = mk(&mut s, d.id, "f", NewNode::File, 20);
    assert_eq!(f.nlink, 1);
    assert_eq!(nlink(&s, d.id), 2);
    assert_eq!(s.get(d.id).unwrap().mtime, t(20));
    assert_eq!(s.get(ROOT).unwrap().mtime, t(10));
    let err = s.apply(FsCommand::Create {
        parent: d.id,
        name: b"f".to_vec(),
        ino: crate::ids::ResourceId(0),
        node: NewNode::File,
        perm: 0o600,
        uid: 0,
        gid: 0,
        now: t(30),
    });
    assert_eq!(err, Err(MetaError::Exists));
}

#[test]
fn names_are_checked() {
    let mut s = fresh();
    let long = "x".repeat(256);
    for (name, want) in [
        (long.as_str(), MetaError::NameTooLong),
        ("", MetaError::Invalid(Cow::Borrowed("bad name"))),
        ("a/b", MetaError::Invalid(Cow::Borrowed("bad name"))),
        ("..", MetaError::Invalid(Cow::Borrowed("bad name"))),
    ] {
        let r = s.apply(FsCommand::Create {
            parent: ROOT,
            name: name.as_bytes().to_vec(),
            ino: crate::ids::ResourceId(0),
            node: NewNode::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            now: t(2),
        });
        assert_eq!(r, Err(want));
    }
    mk(&mut s, ROOT, &"y".repeat(255), NewNode::File, 2);
}

#[test]
fn create_under_a_file_is_enotdir() {
    let mut s = fresh();
    let f = mk(&mut s, ROOT, "f", NewNode::File, 2);
    let r = s.apply(FsCommand::Create {
        parent: f.id,
        name: b"x".to_vec(),
        ino: crate::ids::ResourceId(0),
        node: NewNode::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        now: t(2),
    });
    assert_eq!(r, Err(MetaError::NotDir));
}

#[test]
fn setgid_directory_is_inherited() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    s.apply(FsCommand::SetAttr {
        ino: d.id,
        perm: Some(0o2775),
        uid: None,
        gid: Some(77),
        atime: None,
        mtime: None,
        now: t(3),
    })
    .unwrap();
    let f = mk(&mut s, d.id, "f", NewNode::File, 4);
    assert_eq!(f.gid, 77);
    assert_eq!(f.perm & 0o2000, 0);
    let sub = mk(&mut s, d.id, "sub", NewNode::Dir, 4);
    assert_eq!(sub.gid, 77);
    assert_eq!(sub.perm & 0o2000, 0o2000);
}

#[test]
fn unlink_and_rmdir_rules() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    let f = mk(&mut s, d.id, "f", NewNode::File, 2);
    let rm = |s: &mut MetaState, p, n: &str, dir: bool| {
        let (parent, name, now) = (p, n.as_bytes().to_vec(), t(9));
        s.apply(if dir {
            FsCommand::Rmdir { parent, name, now }
        } else {
            FsCommand::Unlink { parent, name, now }
        })
    };
    assert_eq!(rm(&mut s, ROOT, "d", true), Err(MetaError::NotEmpty));
    assert_eq!(rm(&mut s, ROOT, "d", false), Err(MetaError::IsDir));
    assert_eq!(rm(&mut s, d.id, "f", true), Err(MetaError::NotDir));
    assert_eq!(rm(&mut s, d.id, "nope", false), Err(MetaError::NotFound));
    rm(&mut s, d.id, "f", false).unwrap();
    // Unlinked but kept until reclaimed: it may still be open.
    assert_eq!(nlink(&s, f.id), 0);
    assert_eq!(s.get(f.id).unwrap().ctime, t(9));
    assert_eq!(s.orphans(), vec![f.id]);
    rm(&mut s, ROOT, "d", true).unwrap();
    assert_eq!(nlink(&s, ROOT), 2);
    // Nothing can be created inside a removed directory.
    let r = s.apply(FsCommand::Create {
        parent: d.id,
        name: b"x".to_vec(),
        ino: crate::ids::ResourceId(0),
        node: NewNode::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        now: t(10),
    });
    assert_eq!(r, Err(MetaError::NotFound));
    s.apply(FsCommand::ReclaimOrphans).unwrap();
    assert!(s.get(f.id).is_none());
    assert!(s.get(d.id).is_none());
}

#[test]
fn hard_links_count_and_refuse_directories() {
    let mut s = fresh();
    let f = mk(&mut s, ROOT, "f", NewNode::File, 2);
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    s.apply(FsCommand::Link {
        ino: f.id,
        parent: d.id,
        name: b"g".to_vec(),
        now: t(5),
    })
    .unwrap();
    assert_eq!(nlink(&s, f.id), 2);
    assert_eq!(s.get(f.id).unwrap().ctime, t(5));
    let r = s.apply(FsCommand::Link {
        ino: d.id,
        parent: ROOT,
        name: b"d2".to_vec(),
        now: t(5),
    });
    assert_eq!(r, Err(MetaError::NotPermitted));
    let r = s.apply(FsCommand::Link {
        ino: f.id,
        parent: ROOT,
        name: b"d".to_vec(),
        now: t(5),
    });
    assert_eq!(r, Err(MetaError::Exists));
    s.apply(FsCommand::Unlink {
        parent: ROOT,
        name: b"f".to_vec(),
        now: t(6),
    })
    .unwrap();
    assert_eq!(nlink(&s, f.id), 1);
    assert_eq!(s.lookup(d.id, b"g").unwrap().id, f.id);
    // Reclaim only drops unlinked inodes.
    s.apply(FsCommand::Reclaim { ino: f.id }).unwrap();
    assert!(s.get(f.id).is_some());
}

#[test]
fn rename_replace_and_errors() {
    let mut s = fresh();
    let a = mk(&mut s, ROOT, "a", NewNode::File, 2);
    let b = mk(&mut s, ROOT, "b", NewNode::File, 2);
    mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    let e = mk(&mut s, ROOT, "e", NewNode::Dir, 2);
    mk(&mut s, e.id, "inner", NewNode::File, 2);

    assert_eq!(
        rename(&mut s, ROOT, "a", ROOT, "d", RenameMode::Replace),
        Err(MetaError::IsDir)
    );
    assert_eq!(
        rename(&mut s, ROOT, "d", ROOT, "a", RenameMode::Replace),
        Err(MetaError::NotDir)
    );
    assert_eq!(
        rename(&mut s, ROOT, "d", ROOT, "e", RenameMode::Replace),
        Err(MetaError::NotEmpty)
    );
    assert_eq!(
        rename(&mut s, ROOT, "a", ROOT, "b", RenameMode::NoReplace),
        Err(MetaError::Exists)
    );
    assert_eq!(
        rename(&mut s, ROOT, "zz", ROOT, "b", RenameMode::Replace),
        Err(MetaError::NotFound)
    );
    assert!(matches!(
        rename(&mut s, ROOT, "e", e.id, "x", RenameMode::Replace),
        Err(MetaError::Invalid(_))
    ));

    rename(&mut s, ROOT, "a", ROOT, "b", RenameMode::Replace).unwrap();
    assert_eq!(s.lookup(ROOT, b"b").unwrap().id, a.id);
    assert_eq!(s.lookup(ROOT, b"a"), Err(MetaError::NotFound));
    assert_eq!(nlink(&s, b.id), 0);
    assert_eq!(s.get(a.id).unwrap().ctime, t(50));

    // An empty directory can be replaced by a directory.
    let before = nlink(&s, ROOT);
    rename(&mut s, ROOT, "d", ROOT, "e2", RenameMode::Replace).unwrap();
    let f = mk(&mut s, ROOT, "empty", NewNode::Dir, 60);
    rename(&mut s, ROOT, "e2", ROOT, "empty", RenameMode::Replace).unwrap();
    assert_eq!(nlink(&s, ROOT), before);
    assert_eq!(nlink(&s, f.id), 0);
}

#[test]
fn rename_across_directories_moves_dotdot_and_links() {
    let mut s = fresh();
    let a = mk(&mut s, ROOT, "a", NewNode::Dir, 2);
    let b = mk(&mut s, ROOT, "b", NewNode::Dir, 2);
    let c = mk(&mut s, a.id, "c", NewNode::Dir, 2);
    assert_eq!(nlink(&s, a.id), 3);
    rename(&mut s, a.id, "c", b.id, "c", RenameMode::Replace).unwrap();
    assert_eq!(nlink(&s, a.id), 2);
    assert_eq!(nlink(&s, b.id), 3);
    assert_eq!(s.get(c.id).unwrap().parent, b.id);
    assert_eq!(s.get(a.id).unwrap().mtime, t(50));
    assert_eq!(s.get(b.id).unwrap().mtime, t(50));
    // Moving a directory below its own descendant is refused.
    assert!(rename(&mut s, ROOT, "b", c.id, "b", RenameMode::Replace).is_err());
}

#[test]
fn rename_hard_link_onto_itself_is_a_no_op() {
    let mut s = fresh();
    let f = mk(&mut s, ROOT, "f", NewNode::File, 2);
    s.apply(FsCommand::Link {
        ino: f.id,
        parent: ROOT,
        name: b"g".to_vec(),
        now: t(3),
    })
    .unwrap();
    rename(&mut s, ROOT, "f", ROOT, "g", RenameMode::Replace).unwrap();
    assert_eq!(s.lookup(ROOT, b"f").unwrap().id, f.id);
    assert_eq!(s.lookup(ROOT, b"g").unwrap().id, f.id);
    assert_eq!(nlink(&s, f.id), 2);
}

#[test]
fn rename_exchange_swaps_entries_and_parents() {
    let mut s = fresh();
    let a = mk(&mut s, ROOT, "a", NewNode::Dir, 2);
    let x = mk(&mut s, a.id, "x", NewNode::Dir, 2);
    let y = mk(&mut s, ROOT, "y", NewNode::File, 2);
    rename(&mut s, a.id, "x", ROOT, "y", RenameMode::Exchange).unwrap();
    assert_eq!(s.lookup(ROOT, b"y").unwrap().id, x.id);
    assert_eq!(s.lookup(a.id, b"x").unwrap().id, y.id);
    assert_eq!(s.get(x.id).unwrap().parent, ROOT);
    assert_eq!(nlink(&s, a.id), 2);
    assert_eq!(nlink(&s, ROOT), 4);
    assert_eq!(
        rename(&mut s, ROOT, "y", ROOT, "missing", RenameMode::Exchange),
        Err(MetaError::NotFound)
    );
    // Exchanging a directory with something inside it would make a loop.
    mk(&mut s, x.id, "deep", NewNode::File, 3);
    assert!(rename(&mut s, ROOT, "y", x.id, "deep", RenameMode::Exchange).is_err());
}

#[test]
fn readdir_cookies_stay_stable_under_changes() {
    let mut s = fresh();
    for n in ["a", "b", "c", "d"] {
        mk(&mut s, ROOT, n, NewNode::File, 2);
    }
    let first: Vec<(u64, Name)> = s
        .entries_after(ROOT, 0)
        .unwrap()
        .map(|(c, n, _)| (c, n.clone()))
        .take(2)
        .collect();
    assert_eq!(
        first.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    // A concurrent removal of an already-listed entry and a new entry.
    s.apply(FsCommand::Unlink {
        parent: ROOT,
        name: b"a".to_vec(),
        now: t(3),
    })
    .unwrap();
    mk(&mut s, ROOT, "e", NewNode::File, 3);
    let rest: Vec<Name> = s
        .entries_after(ROOT, first[1].0)
        .unwrap()
        .map(|(_, n, _)| n.clone())
        .collect();
    assert_eq!(rest, vec![b"c".to_vec(), b"d".to_vec(), b"e".to_vec()]);
}

#[test]
fn xattrs_follow_create_and_replace_flags() {
    let mut s = fresh();
    let f = mk(&mut s, ROOT, "f", NewNode::File, 2);
    let set = |s: &mut MetaState, v: &str, mode| {
        s.apply(FsCommand::SetXattr {
            ino: f.id,
            name: b"user.k".to_vec(),
            value: v.into(),
            mode,
            now: t(4),
        })
    };
    assert_eq!(set(&mut s, "1", XattrMode::Replace), Err(MetaError::NoAttr));
    set(&mut s, "1", XattrMode::Create).unwrap();
    assert_eq!(set(&mut s, "2", XattrMode::Create), Err(MetaError::Exists));
    set(&mut s, "2", XattrMode::Replace).unwrap();
    assert_eq!(
        s.get(f.id).unwrap().xattrs.get(b"user.k".as_slice()),
        Some(&b"2".to_vec())
    );
    let big = s.apply(FsCommand::SetXattr {
        ino: f.id,
        name: b"user.big".to_vec(),
        value: vec![0; XATTR_SIZE_MAX + 1],
        mode: XattrMode::Any,
        now: t(4),
    });
    assert_eq!(big, Err(MetaError::AttrTooBig));
    s.apply(FsCommand::RemoveXattr {
        ino: f.id,
        name: b"user.k".to_vec(),
        now: t(5),
    })
    .unwrap();
    assert_eq!(
        s.apply(FsCommand::RemoveXattr {
            ino: f.id,
            name: b"user.k".to_vec(),
            now: t(5)
        }),
        Err(MetaError::NoAttr)
    );
}

#[test]
fn commit_version_counts_chunk_references() {
    let mut s = fresh();
    let f = mk(&mut s, ROOT, "f", NewNode::File, 2);
    s.take_changes();
    let h1 = ChunkHash::of(b"one");
    let h2 = ChunkHash::of(b"two");
    let commit = |s: &mut MetaState, chunks: Vec<ChunkRef>, size| {
        s.apply(FsCommand::CommitVersion {
            ino: f.id,
            size,
            chunks,
            mtime: t(7),
            author: DeviceId([1; 16]),
            now: t(8),
        })
    };
    let c1 = ChunkRef {
        hash: h1,
        offset: 0,
        len: 3,
    };
    let c2 = ChunkRef {
        hash: h2,
        offset: 3,
        len: 3,
    };
    commit(&mut s, vec![c1, c2], 6).unwrap();
    let ch = s.take_changes();
    assert_eq!(ch.chunk_deltas.get(&h1), Some(&1));
    assert_eq!(ch.chunk_deltas.get(&h2), Some(&1));
    let i = s.get(f.id).unwrap();
    assert_eq!(i.size(), 6);
    assert_eq!(i.version(), VersionId(1));
    assert_eq!(i.mtime, t(7));
    // A gap or a wrong total is refused.
    assert!(commit(&mut s, vec![c2], 3).is_err());
    assert!(commit(&mut s, vec![c1], 4).is_err());
    // Replacing c2 by c1 twice: h1 gains a reference, and version 1 is
    // kept as an old version (its references stay: h2 keeps its one).
    commit(
        &mut s,
        vec![
            c1,
            ChunkRef {
                hash: h1,
                offset: 3,
                len: 3,
            },
        ],
        6,
    )
    .unwrap();
    let ch = s.take_changes();
    assert_eq!(ch.chunk_deltas.get(&h1), Some(&2));
    assert_eq!(ch.chunk_deltas.get(&h2), None);
    assert_eq!(ch.versions.len(), 1);
    assert_eq!(
        s.get(f.id).unwrap().content.as_ref().unwrap().chunk_at(4),
        Some(1)
    );
    let refs = s.chunk_references();
    assert_eq!((refs[&h1], refs[&h2]), (3, 1));
    // Unlink then reclaim: the file goes to the trash, its last version
    // joins the old ones, and no reference is released.
    s.apply(FsCommand::Unlink {
        parent: ROOT,
        name: b"f".to_vec(),
        now: t(9),
    })
    .unwrap();
    s.apply(FsCommand::Reclaim { ino: f.id }).unwrap();
    let ch = s.take_changes();
    assert!(ch.chunk_deltas.is_empty(), "{:?}", ch.chunk_deltas);
    assert!(ch.inodes.iter().any(|(id, v)| *id == f.id && v.is_none()));
    assert_eq!(s.trash()[&f.id].path, b"/f".to_vec());
    let kept: Vec<_> = s.old_versions(f.id).map(|(v, _)| v.0).collect();
    assert_eq!(kept, vec![1, 2]);
    // Dropping the trash releases every reference at last.
    s.apply(FsCommand::DropVersions {
        versions: vec![],
        trash: vec![f.id],
    })
    .unwrap();
    let ch = s.take_changes();
    assert_eq!(ch.chunk_deltas.get(&h1), Some(&-3));
    assert_eq!(ch.chunk_deltas.get(&h2), Some(&-1));
    assert!(s.chunk_references().is_empty());
    assert!(s.trash().is_empty());
}

#[test]
fn a_rename_over_a_file_trashes_it_at_its_path_and_undo_takes_it_back() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "docs", NewNode::Dir, 2);
    let old = mk(&mut s, d.id, "report", NewNode::File, 2);
    let new = mk(&mut s, d.id, "report.tmp", NewNode::File, 2);
    let h = ChunkHash::of(b"old words");
    s.apply(FsCommand::CommitVersion {
        ino: old.id,
        size: 9,
        chunks: vec![ChunkRef {
            hash: h,
            offset: 0,
            len: 9,
        }],
        mtime: t(3),
        author: DeviceId([1; 16]),
        now: t(3),
    })
    .unwrap();
    s.take_changes();
    // An editor's save: write the new file, rename it over the old one.
    let sp = s.savepoint();
    s.apply(FsCommand::Rename {
        parent: d.id,
        name: b"report.tmp".to_vec(),
        new_parent: d.id,
        new_name: b"report".to_vec(),
        mode: RenameMode::Replace,
        now: t(4),
    })
    .unwrap();
    assert_eq!(s.lookup(d.id, b"report").unwrap().id, new.id);
    let tr = &s.trash()[&old.id];
    assert_eq!(tr.path, b"/docs/report".to_vec());
    assert_eq!(tr.deleted, t(4));
    // Taken back (a speculative change refused): no trash record left.
    s.undo_to(sp);
    assert!(s.trash().is_empty());
    assert_eq!(s.lookup(d.id, b"report").unwrap().id, old.id);
}

#[test]
fn symlink_targets_are_checked() {
    let mut s = fresh();
    let l = mk(
        &mut s,
        ROOT,
        "l",
        NewNode::Symlink {
            target: b"/x/y".to_vec(),
        },
        2,
    );
    assert_eq!(l.size(), 4);
    assert_eq!(l.perm, 0o777);
    let r = s.apply(FsCommand::Create {
        parent: ROOT,
        name: b"m".to_vec(),
        ino: crate::ids::ResourceId(0),
        node: NewNode::Symlink {
            target: vec![b'a'; SYMLINK_MAX + 1],
        },
        perm: 0o777,
        uid: 0,
        gid: 0,
        now: t(2),
    });
    assert_eq!(r, Err(MetaError::NameTooLong));
}

#[test]
fn snapshot_restore_round_trip() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    mk(&mut s, d.id, "f", NewNode::File, 3);
    mk(&mut s, ROOT, "dev", NewNode::CharDev { rdev: 0x0501 }, 3);
    let snap = s.snapshot();
    let bytes = postcard::to_stdvec(&snap).unwrap();
    let back: Snapshot = postcard::from_bytes(&bytes).unwrap();
    let r = MetaState::restore(back).unwrap();
    assert_eq!(r.snapshot(), snap);
    assert_eq!(r.lookup(d.id, b"f").unwrap().kind, Kind::File);
    assert_eq!(r.lookup(ROOT, b"dev").unwrap().rdev, 0x0501);
    // The next inode number survives, so numbers are never reused.
    let mut r = r;
    let n = mk(&mut r, ROOT, "new", NewNode::File, 4);
    assert!(n.id.0 > 4);
}

#[test]
fn failed_commands_change_nothing() {
    let mut s = fresh();
    mk(&mut s, ROOT, "a", NewNode::File, 2);
    s.take_changes();
    let before = s.snapshot();
    let _ = rename(&mut s, ROOT, "a", ROOT, "a", RenameMode::NoReplace);
    let _ = s.apply(FsCommand::Rmdir {
        parent: ROOT,
        name: b"a".to_vec(),
        now: t(3),
    });
    assert_eq!(s.snapshot(), before);
    let ch = s.take_changes();
    assert!(ch.inodes.is_empty() && ch.entries.is_empty());
}

#[test]
fn timestamps_round_trip_through_system_time() {
    for ts in [
        t(0),
        t(1_700_000_000),
        Timestamp {
            secs: -5,
            nanos: 250,
        },
    ] {
        assert_eq!(Timestamp::from_system(ts.to_system()), ts);
    }
}

#[test]
fn rollback_restores_the_state_before_unpersisted_commands() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    mk(&mut s, d.id, "f", NewNode::File, 2);
    s.take_changes();
    let before = s.snapshot();
    mk(&mut s, d.id, "g", NewNode::Dir, 3);
    rename(&mut s, d.id, "f", ROOT, "moved", RenameMode::Replace).unwrap();
    s.apply(FsCommand::Rmdir {
        parent: d.id,
        name: b"g".to_vec(),
        now: t(4),
    })
    .unwrap();
    s.apply(FsCommand::ReclaimOrphans).unwrap();
    s.rollback();
    assert_eq!(s.snapshot(), before);
    assert_eq!(s.lookup(d.id, b"f").unwrap().kind, Kind::File);
    // Numbers handed out by rolled-back creates are reused safely: nothing
    // persisted them.
    let again = mk(&mut s, ROOT, "again", NewNode::File, 5);
    assert_eq!(again.id.0, before.space.blocks[&0].next);
}

#[test]
fn snapshot_view_serializes_like_a_snapshot() {
    let now = Timestamp { secs: 3, nanos: 0 };
    let mut m = MetaState::new(0, 0, now, DeviceId([1; 16]));
    for n in ["a", "b", "c"] {
        m.apply(FsCommand::Create {
            parent: ResourceId::ROOT,
            name: n.as_bytes().to_vec(),
            ino: crate::ids::ResourceId(0),
            node: NewNode::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            now,
        })
        .unwrap();
    }
    // History too: an old version, and a trashed file with its versions.
    let f = mk(&mut m, ROOT, "f", NewNode::File, 4);
    for n in 0..3u8 {
        m.apply(FsCommand::CommitVersion {
            ino: f.id,
            size: 1,
            chunks: vec![ChunkRef {
                hash: ChunkHash::of(&[n]),
                offset: 0,
                len: 1,
            }],
            mtime: now,
            author: DeviceId([1; 16]),
            now,
        })
        .unwrap();
    }
    mk(&mut m, ROOT, "g", NewNode::File, 5);
    rename(&mut m, ROOT, "g", ROOT, "f", RenameMode::Replace).unwrap();
    m.apply(FsCommand::Reclaim { ino: f.id }).unwrap();
    assert_eq!(m.old_versions(f.id).count(), 3);
    assert_eq!(m.trash().len(), 1);
    let copied = postcard::to_stdvec(&m.snapshot()).unwrap();
    let viewed = postcard::to_stdvec(&m.snapshot_view()).unwrap();
    assert_eq!(copied, viewed);
    let back: Snapshot = postcard::from_bytes(&viewed).unwrap();
    assert_eq!(back, m.snapshot());
    let again = MetaState::restore(back).unwrap();
    assert_eq!(again.chunk_references(), m.chunk_references());
    assert_eq!(again.trash(), m.trash());
}

// ---- ownership, inode blocks, the speculative layer ----

const A: DeviceId = DeviceId([1; 16]);
const B: DeviceId = DeviceId([2; 16]);
const C: DeviceId = DeviceId([3; 16]);

/// Creates `name` in `parent` as `by.applier` for `by.origin`.
fn mk_by(s: &mut MetaState, by: By, parent: ResourceId, name: &str, node: NewNode) -> Inode {
    let mut cmd = FsCommand::Create {
        parent,
        name: name.as_bytes().to_vec(),
        ino: ResourceId(0),
        node,
        perm: 0o755,
        uid: 0,
        gid: 0,
        now: t(5),
    };
    match s.apply_by(by, &mut cmd).unwrap() {
        Outcome::Inode(i) => *i,
        o => panic!("unexpected {o:?}"),
    }
}

fn set_authority(s: &mut MetaState, ino: ResourceId, device: DeviceId) {
    let epoch = s.authority(ino).unwrap().epoch + 1;
    s.apply(FsCommand::SetAuthority {
        moves: vec![Move { ino, device, epoch }],
    })
    .unwrap();
}

#[test]
fn every_command_is_decided_by_the_right_authority() {
    let mut s = fresh();
    for d in [B, C] {
        s.apply(FsCommand::ReserveInodes { device: d }).unwrap();
    }
    // Root is A's; a directory B's program made (through A) is B's, and so
    // is a file C made in it (through B).
    let bd = mk_by(
        &mut s,
        By {
            applier: A,
            origin: B,
        },
        ROOT,
        "bd",
        NewNode::Dir,
    );
    assert_eq!(bd.authority.device, B);
    let f = mk_by(
        &mut s,
        By {
            applier: B,
            origin: C,
        },
        bd.id,
        "f",
        NewNode::File,
    );
    assert_eq!(f.authority.device, C);
    let sub = mk_by(&mut s, By::device(C), ROOT, "sub", NewNode::Dir);
    assert_eq!(sub.authority.device, C);
    let now = t(6);
    let g = |s: &MetaState, cmd: FsCommand| s.governance(&cmd).unwrap();
    let create = |parent, name: &str| FsCommand::Create {
        parent,
        name: name.into(),
        ino: ResourceId(0),
        node: NewNode::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        now,
    };
    // Entries: the directory's authority.
    assert_eq!(g(&s, create(bd.id, "x")), Governance::One(B));
    assert_eq!(g(&s, create(ROOT, "x")), Governance::One(A));
    assert_eq!(
        g(
            &s,
            FsCommand::Unlink {
                parent: bd.id,
                name: b"f".to_vec(),
                now
            }
        ),
        Governance::One(B)
    );
    assert_eq!(
        g(
            &s,
            FsCommand::Link {
                ino: f.id,
                parent: ROOT,
                name: b"l".to_vec(),
                now
            }
        ),
        Governance::One(A)
    );
    // Content and attributes: the file's authority.
    for cmd in [
        FsCommand::SetAttr {
            ino: f.id,
            perm: Some(0o600),
            uid: None,
            gid: None,
            atime: None,
            mtime: None,
            now,
        },
        FsCommand::SetXattr {
            ino: f.id,
            name: b"user.a".to_vec(),
            value: vec![],
            mode: XattrMode::Any,
            now,
        },
        FsCommand::CommitVersion {
            ino: f.id,
            size: 0,
            chunks: vec![],
            mtime: now,
            author: C,
            now,
        },
    ] {
        assert_eq!(g(&s, cmd), Governance::One(C));
    }
    // A rename within one directory is its authority's; across directories
    // governed by different devices it needs both; replacing a directory
    // needs that directory's authority too (it must be empty).
    let rename = |p, n: &str, np, nn: &str| FsCommand::Rename {
        parent: p,
        name: n.into(),
        new_parent: np,
        new_name: nn.into(),
        mode: RenameMode::Replace,
        now,
    };
    assert_eq!(g(&s, rename(bd.id, "f", bd.id, "f2")), Governance::One(B));
    assert_eq!(
        g(&s, rename(bd.id, "f", ROOT, "f2")),
        Governance::Several(vec![A, B])
    );
    assert_eq!(
        g(&s, rename(ROOT, "bd", ROOT, "sub")),
        Governance::Several(vec![A, C])
    );
    // Removing a directory governed elsewhere needs its authority too.
    assert_eq!(
        g(
            &s,
            FsCommand::Rmdir {
                parent: ROOT,
                name: b"sub".to_vec(),
                now
            }
        ),
        Governance::Several(vec![A, C])
    );
    // Bookkeeping is the cluster's; reclaiming an unlinked inode its
    // authority's (one already gone, anyone's: it does nothing).
    assert_eq!(
        g(&s, FsCommand::ReserveInodes { device: B }),
        Governance::Cluster
    );
    assert_eq!(g(&s, FsCommand::Reclaim { ino: f.id }), Governance::One(C));
    assert_eq!(
        g(
            &s,
            FsCommand::Reclaim {
                ino: ResourceId(999)
            }
        ),
        Governance::Anyone
    );
    // After a move, the new authority decides.
    set_authority(&mut s, bd.id, C);
    assert_eq!(g(&s, create(bd.id, "y")), Governance::One(C));
    assert_eq!(s.authority(bd.id).unwrap().epoch, 2);
    // A stale move (epoch not above) is skipped.
    let out = s
        .apply(FsCommand::SetAuthority {
            moves: vec![Move {
                ino: bd.id,
                device: A,
                epoch: 2,
            }],
        })
        .unwrap();
    assert_eq!(out, Outcome::Moved(0));
    assert_eq!(s.authority(bd.id).unwrap().device, C);
    // Missing inodes are the command's own error.
    assert_eq!(
        s.governance(&create(ResourceId(999), "z")),
        Err(MetaError::NotFound)
    );
}

#[test]
fn inode_numbers_come_from_the_appliers_block_and_are_never_reused() {
    let mut s = fresh();
    // B has no block yet: it must reserve one first.
    let mut cmd = FsCommand::Create {
        parent: ROOT,
        name: b"x".to_vec(),
        ino: ResourceId(0),
        node: NewNode::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        now: t(2),
    };
    assert_eq!(
        s.apply_by(By::device(B), &mut cmd.clone()),
        Err(MetaError::NoInodes)
    );
    s.apply(FsCommand::ReserveInodes { device: B }).unwrap();
    let x = match s.apply_by(By::device(B), &mut cmd).unwrap() {
        Outcome::Inode(i) => i.id,
        o => panic!("{o:?}"),
    };
    assert_eq!(x.0 / BLOCK_SIZE, 1, "B's block is the second");
    // The number chosen went into the command: replayed elsewhere, it
    // gives the same inode, and a second use of it is refused.
    assert!(matches!(&cmd, FsCommand::Create { ino, .. } if *ino == x));
    let mut other = fresh();
    other.apply(FsCommand::ReserveInodes { device: B }).unwrap();
    let mut replay = cmd.clone();
    let y = match other.apply_by(By::device(B), &mut replay).unwrap() {
        Outcome::Inode(i) => i.id,
        o => panic!("{o:?}"),
    };
    assert_eq!(x, y);
    let mut again = cmd.clone();
    if let FsCommand::Create { name, .. } = &mut again {
        *name = b"x2".to_vec();
    }
    assert!(
        other.apply_by(By::device(B), &mut again).is_err(),
        "a used number"
    );
    // A number from another device's block is refused.
    let mut foreign = again.clone();
    if let FsCommand::Create { ino, .. } = &mut foreign {
        *ino = ResourceId(x.0 + 5);
    }
    assert!(other.apply_by(By::device(A), &mut foreign).is_err());
    // Reserving again while the block is roomy changes nothing.
    let before = other.space().clone();
    other.apply(FsCommand::ReserveInodes { device: B }).unwrap();
    assert_eq!(*other.space(), before);
}

#[test]
fn speculative_changes_undo_alone_or_all_together_and_installs_show_foreign_values() {
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    s.take_changes();
    let committed = s.snapshot();
    // Two speculative changes, each kept...
    let sp = s.savepoint();
    mk(&mut s, d.id, "a", NewNode::File, 3);
    s.keep(sp);
    let sp = s.savepoint();
    rename(&mut s, d.id, "a", ROOT, "moved", RenameMode::Replace).unwrap();
    s.keep(sp);
    assert!(s.lookup(ROOT, b"moved").is_ok());
    // ...a third taken back alone...
    let sp = s.savepoint();
    mk(&mut s, ROOT, "gone", NewNode::Dir, 4);
    s.undo_to(sp);
    assert!(s.lookup(ROOT, b"gone").is_err());
    assert!(s.lookup(ROOT, b"moved").is_ok(), "earlier ones stay");
    // ...and nothing speculative is persisted as committed state.
    let c = s.take_changes_keep_undo();
    assert!(c.inodes.is_empty() && c.entries.is_empty() && c.chunk_deltas.is_empty());
    // Another authority's values: shown as they are, undone with the rest.
    let mut theirs = s.clone();
    theirs.rollback();
    let x = mk(&mut theirs, d.id, "theirs", NewNode::Dir, 5);
    let fx = Effects::of(theirs.take_changes());
    let sp = s.savepoint();
    s.install(&fx);
    s.keep(sp);
    assert_eq!(s.lookup(d.id, b"theirs").unwrap().id, x.id);
    assert_eq!(
        s.entries_after(x.id, 0).map(|e| e.count()),
        Ok(0),
        "an installed directory can be listed"
    );
    s.rollback();
    assert_eq!(s.snapshot(), committed);
}

#[test]
fn a_cookie_shown_twice_in_the_speculative_layer_hides_no_name() {
    // Committed: "a" in d. Another authority's pending create shown here
    // reuses a's cookie (a rename committed through Raft took the number
    // the authority had already handed out).
    let mut s = fresh();
    let d = mk(&mut s, ROOT, "d", NewNode::Dir, 2);
    let a = mk(&mut s, d.id, "a", NewNode::File, 3);
    s.take_changes();
    let cookie = s.entry(d.id, b"a").unwrap().cookie;
    let mut other = s.clone();
    let b = mk(&mut other, ROOT, "b-inode", NewNode::File, 4);
    let fx = Effects {
        inodes: vec![],
        entries: vec![(
            d.id,
            b"b".to_vec(),
            Some(Entry {
                ino: b.id,
                cookie,
                kind: Kind::File,
            }),
        )],
    };
    let names = |s: &MetaState| -> Vec<Name> {
        s.entries_after(d.id, 0)
            .unwrap()
            .map(|(_, n, _)| n.clone())
            .collect()
    };
    let sp = s.savepoint();
    s.install(&fx);
    s.keep(sp);
    assert_eq!(names(&s), vec![b"a".to_vec(), b"b".to_vec()], "both listed");
    s.rollback();
    assert_eq!(names(&s), vec![b"a".to_vec()], "a survives the undo");
    assert_eq!(s.lookup(d.id, b"a").unwrap().id, a.id);
}

#[test]
fn a_subtree_lists_its_files_once_each_and_a_file_itself() {
    let mut s = fresh();
    let a = mk(&mut s, ROOT, "a", NewNode::Dir, 10);
    let b = mk(&mut s, a.id, "b", NewNode::Dir, 10);
    let f1 = mk(&mut s, a.id, "f1", NewNode::File, 10);
    let f2 = mk(&mut s, b.id, "f2", NewNode::File, 10);
    let out = mk(&mut s, ROOT, "out", NewNode::File, 10);
    // A second name for f1 inside the subtree counts once.
    s.apply(FsCommand::Link {
        ino: f1.id,
        parent: b.id,
        name: b"f1-again".to_vec(),
        now: t(11),
    })
    .unwrap();
    let mut got = s.subtree_files(a.id);
    got.sort();
    assert_eq!(got, vec![f1.id, f2.id]);
    assert_eq!(s.subtree_files(b.id).len(), 2);
    assert_eq!(s.subtree_files(out.id), vec![out.id]);
    assert!(s.subtree_files(ResourceId(9999)).is_empty());
    assert_eq!(s.subtree_files(ROOT).len(), 3);
}
