//! The conflict rules, case by case: each side's change made on the same
//! start, the authority's applied first, then this device's checked and
//! resolved as reintegration does. Plus compaction, names and remapping.

use std::collections::HashMap;

use super::*;
use crate::ids::{ChunkHash, DeviceId, ResourceId};
use crate::meta::{ChunkRef, Inode, NewNode, Outcome};

const ROOT: ResourceId = ResourceId::ROOT;
const ME: DeviceId = DeviceId([7; 16]);

fn ts(secs: i64) -> Timestamp {
    Timestamp { secs, nanos: 0 }
}

fn fresh() -> MetaState {
    MetaState::new(0, 0, ts(1), DeviceId([1; 16]))
}

fn create(s: &mut MetaState, parent: ResourceId, name: &str, node: NewNode) -> Inode {
    match s.apply(create_cmd(parent, name, node)).unwrap() {
        Outcome::Inode(i) => *i,
        o => panic!("unexpected {o:?}"),
    }
}

fn create_cmd(parent: ResourceId, name: &str, node: NewNode) -> FsCommand {
    FsCommand::Create {
        parent,
        name: name.as_bytes().to_vec(),
        ino: ResourceId(0),
        node,
        perm: 0o644,
        uid: 0,
        gid: 0,
        now: ts(5),
    }
}

fn version(ino: ResourceId, byte: u8) -> FsCommand {
    FsCommand::CommitVersion {
        ino,
        size: 10,
        chunks: vec![ChunkRef {
            hash: ChunkHash::of(&[byte]),
            offset: 0,
            len: 10,
        }],
        mtime: ts(6),
        author: ME,
        now: ts(6),
    }
}

fn unlink(parent: ResourceId, name: &str) -> FsCommand {
    FsCommand::Unlink {
        parent,
        name: name.into(),
        now: ts(7),
    }
}

fn rename(parent: ResourceId, name: &str, new_name: &str) -> FsCommand {
    FsCommand::Rename {
        parent,
        name: name.into(),
        new_parent: parent,
        new_name: new_name.into(),
        mode: RenameMode::Replace,
        now: ts(8),
    }
}

/// This device made `mine` on `base`; the authority made `theirs` on the
/// same `base` first. What reintegration meets, and decides.
fn meet(
    base: &MetaState,
    mine: FsCommand,
    theirs: &[FsCommand],
) -> (Option<Failure>, Option<(Resolution, ConflictKind)>) {
    let expect = expectations(base, &mine, &HashMap::new());
    let mut authority = base.clone();
    for c in theirs {
        authority.apply(c.clone()).unwrap();
    }
    let failure = match check(&authority, &expect) {
        Err(f) => Some(f),
        Ok(()) => authority.apply(mine.clone()).err().map(Failure::Error),
    };
    let t = TentativeChange {
        change: LocalChange {
            origin: ME,
            id: 1,
            cmd: mine,
        },
        expect,
        at: ts(1_796_599_341),
        after_seq: 0,
        place: Some((ROOT, b"f".to_vec())),
        path: Vec::new(),
    };
    let resolved = failure
        .as_ref()
        .map(|f| resolve(&t, f, "laptop", 0, &|p, n| authority.entry(p, n).is_some()));
    (failure, resolved)
}

fn base_with_file() -> (MetaState, Inode) {
    let mut s = fresh();
    let f = create(&mut s, ROOT, "f", NewNode::File);
    s.apply(version(f.id, 1)).unwrap();
    (s, f)
}

#[test]
fn edit_edit_keeps_both_the_other_in_place_this_one_beside() {
    let (base, f) = base_with_file();
    let (failure, res) = meet(&base, version(f.id, 2), &[version(f.id, 3)]);
    assert!(matches!(
        failure,
        Some(Failure::Changed {
            expect: Expect::Version { .. },
            absent: false
        })
    ));
    let (r, kind) = res.unwrap();
    assert_eq!(kind, ConflictKind::EditEdit);
    assert_eq!(
        r,
        Resolution::CopyBeside {
            parent: ROOT,
            name: b"f.conflict-laptop-20261206-232221".to_vec()
        }
    );
}

#[test]
fn an_edit_nobody_else_made_applies_cleanly() {
    let (base, f) = base_with_file();
    let (failure, _) = meet(&base, version(f.id, 2), &[]);
    assert_eq!(failure, None);
    // Nor does an unrelated change elsewhere get in the way.
    let (failure, _) = meet(
        &base,
        version(f.id, 2),
        &[create_cmd(ROOT, "other", NewNode::File)],
    );
    assert_eq!(failure, None);
}

#[test]
fn edit_delete_keeps_the_edit_beside_where_it_was() {
    let (base, f) = base_with_file();
    let (failure, res) = meet(&base, version(f.id, 2), &[unlink(ROOT, "f")]);
    assert!(matches!(
        failure,
        Some(Failure::Changed { absent: true, .. })
    ));
    let (r, kind) = res.unwrap();
    assert_eq!(kind, ConflictKind::EditDelete);
    assert!(matches!(r, Resolution::CopyBeside { parent: ROOT, .. }));
}

#[test]
fn delete_edit_keeps_the_edited_file() {
    let (base, f) = base_with_file();
    let (_, res) = meet(&base, unlink(ROOT, "f"), &[version(f.id, 3)]);
    assert_eq!(res, Some((Resolution::Yield, ConflictKind::DeleteEdit)));
}

#[test]
fn delete_delete_is_no_conflict() {
    let (base, _) = base_with_file();
    let (failure, res) = meet(&base, unlink(ROOT, "f"), &[unlink(ROOT, "f")]);
    assert!(matches!(
        failure,
        Some(Failure::Changed { absent: true, .. })
    ));
    assert_eq!(res.unwrap().0, Resolution::Moot);
}

#[test]
fn delete_of_a_name_that_is_another_file_now_keeps_it() {
    let (base, _) = base_with_file();
    let (_, res) = meet(
        &base,
        unlink(ROOT, "f"),
        &[unlink(ROOT, "f"), create_cmd(ROOT, "f", NewNode::File)],
    );
    assert_eq!(res, Some((Resolution::Yield, ConflictKind::RenameRename)));
}

#[test]
fn create_create_takes_a_conflict_name() {
    let base = fresh();
    let (failure, res) = meet(
        &base,
        create_cmd(ROOT, "g", NewNode::File),
        &[create_cmd(ROOT, "g", NewNode::File)],
    );
    assert!(matches!(
        failure,
        Some(Failure::Changed { absent: false, .. })
    ));
    let (r, kind) = res.unwrap();
    assert_eq!(kind, ConflictKind::CreateCreate);
    let Resolution::Retry {
        cmd: FsCommand::Create { name, parent, .. },
        expect,
        kept_as,
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(parent, ROOT);
    assert_eq!(name, b"g.conflict-laptop-20261206-232221".to_vec());
    assert_eq!(kept_as, Some(name.clone()));
    assert_eq!(
        expect,
        vec![Expect::Entry {
            parent: ROOT,
            name,
            ino: None
        }]
    );
}

#[test]
fn rename_rename_lets_the_other_side_stand() {
    let (base, _) = base_with_file();
    let (failure, res) = meet(&base, rename(ROOT, "f", "b"), &[rename(ROOT, "f", "c")]);
    assert!(matches!(
        failure,
        Some(Failure::Changed { absent: true, .. })
    ));
    assert_eq!(res, Some((Resolution::Yield, ConflictKind::RenameRename)));
}

#[test]
fn rename_onto_a_name_created_there_does_not_replace_it() {
    let (base, _) = base_with_file();
    let (_, res) = meet(
        &base,
        rename(ROOT, "f", "b"),
        &[create_cmd(ROOT, "b", NewNode::File)],
    );
    let (r, kind) = res.unwrap();
    assert_eq!(kind, ConflictKind::CreateCreate);
    let Resolution::Retry {
        cmd: FsCommand::Rename { new_name, mode, .. },
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(new_name, b"b.conflict-laptop-20261206-232221".to_vec());
    assert_eq!(mode, RenameMode::NoReplace, "never replaces what is there");
}

#[test]
fn add_to_a_directory_removed_there_makes_it_again() {
    let mut base = fresh();
    let d = create(&mut base, ROOT, "d", NewNode::Dir);
    let (failure, res) = meet(
        &base,
        create_cmd(d.id, "new", NewNode::File),
        &[FsCommand::Rmdir {
            parent: ROOT,
            name: b"d".to_vec(),
            now: ts(9),
        }],
    );
    assert!(matches!(failure, Some(Failure::Error(MetaError::NotFound))));
    assert_eq!(res, Some((Resolution::Remake, ConflictKind::AddRmdir)));
}

#[test]
fn rmdir_of_a_directory_added_to_there_keeps_it() {
    let mut base = fresh();
    let d = create(&mut base, ROOT, "d", NewNode::Dir);
    let (failure, res) = meet(
        &base,
        FsCommand::Rmdir {
            parent: ROOT,
            name: b"d".to_vec(),
            now: ts(9),
        },
        &[create_cmd(d.id, "added", NewNode::File)],
    );
    assert_eq!(failure, Some(Failure::Error(MetaError::NotEmpty)));
    assert_eq!(res, Some((Resolution::Yield, ConflictKind::RmdirAdd)));
}

#[test]
fn expectations_of_a_file_changed_here_before_use_the_version_the_authority_saw() {
    let (mut base, f) = base_with_file();
    let before = base.get(f.id).unwrap().version();
    base.apply(version(f.id, 2)).unwrap();
    let bases = HashMap::from([(f.id, before)]);
    assert_eq!(
        expectations(&base, &version(f.id, 3), &bases),
        vec![Expect::Version {
            ino: f.id,
            version: before
        }]
    );
}

#[test]
fn a_removal_after_a_tentative_save_expects_the_saved_version() {
    // The authority has f at its first version; cut off, this device saves
    // f and then removes it. Reintegrated in order, both apply.
    let (authority, f) = base_with_file();
    let mut view = authority.clone();
    let save = version(f.id, 2);
    let save_expects = expectations(&view, &save, &HashMap::new());
    view.apply(save.clone()).unwrap();
    let removal = unlink(ROOT, "f");
    let removal_expects = expectations(&view, &removal, &HashMap::new());
    let mut at = authority.clone();
    assert_eq!(check(&at, &save_expects), Ok(()));
    at.apply(save).unwrap();
    assert_eq!(check(&at, &removal_expects), Ok(()));
    // What it expected before (the version before this device's first
    // tentative save) made it a conflict with that very save.
    let before = authority.get(f.id).unwrap().version();
    let old = expectations(&view, &removal, &HashMap::from([(f.id, before)]));
    assert!(check(&at, &old).is_err());
}

#[test]
fn only_two_versions_of_one_file_in_a_row_collapse() {
    let a = ResourceId(10);
    let b = ResourceId(11);
    assert!(supersedes(&version(a, 2), &version(a, 1)));
    assert!(!supersedes(&version(a, 2), &version(b, 1)));
    assert!(!supersedes(&unlink(ROOT, "f"), &version(a, 1)));
}

#[test]
fn conflict_names_stay_within_name_max_and_count_attempts() {
    let long = vec![b'x'; 255];
    let n = conflict_name(&long, "laptop", ts(0), 0);
    assert_eq!(n.len(), 255);
    assert!(n.ends_with(b".conflict-laptop-19700101-000000"));
    let second = conflict_name(b"f", "laptop", ts(0), 1);
    assert_eq!(second, b"f.conflict-laptop-19700101-000000-2".to_vec());
    // A retry names from the original, not from the first conflict name.
    let third = conflict_name(&second, "laptop", ts(0), 2);
    assert_eq!(third, b"f.conflict-laptop-19700101-000000-3".to_vec());
}

#[test]
fn conflicts_within_one_second_get_names_of_their_own() {
    let mut s = fresh();
    create(
        &mut s,
        ROOT,
        "f.conflict-laptop-19700101-000000",
        NewNode::File,
    );
    create(
        &mut s,
        ROOT,
        "f.conflict-laptop-19700101-000000-2",
        NewNode::File,
    );
    let taken = |p: ResourceId, n: &[u8]| s.entry(p, n).is_some();
    assert_eq!(
        free_conflict_name(ROOT, b"f", "laptop", ts(0), 0, &taken),
        b"f.conflict-laptop-19700101-000000-3".to_vec()
    );
}

#[test]
fn remap_moves_a_change_into_the_directory_made_again() {
    let old = ResourceId(5);
    let new = ResourceId(9);
    let mut cmd = create_cmd(old, "x", NewNode::File);
    let mut expect = vec![Expect::Entry {
        parent: old,
        name: b"x".to_vec(),
        ino: None,
    }];
    remap(&mut cmd, &mut expect, &HashMap::from([(old, new)]));
    assert!(matches!(cmd, FsCommand::Create { parent, .. } if parent == new));
    assert!(matches!(&expect[0], Expect::Entry { parent, .. } if *parent == new));
}
