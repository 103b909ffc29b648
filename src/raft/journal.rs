//! Tentative changes: what this device's programs changed while the device
//! governing it was out of reach (the mesh cut, the authority down), in the
//! spirit of Coda's client modification log. Each is applied to this
//! device's view at once, on disk (RocksDB, `j` + sequence) before the
//! program gets its answer, and replayed to its authority in order once it
//! is reachable again (`Replica::reintegrate`).
//!
//! A tentative change carries what it was made on (`Expect`): the version
//! of the file it replaced, the entry it removed or renamed, the absence
//! of the name it created. The authority applies it only if that still
//! holds; otherwise the change became a conflict, and `resolve` (pure)
//! turns it into one that keeps both sides (a conflict copy beside the
//! file, the name taken with a conflict suffix, the file or directory the
//! other side changed left in place). Nothing a program was told is saved
//! is dropped without a conflict record listing it.
//!
//! This module is pure: types, the expectations of a command, the check,
//! the compaction rule and the conflict rules. The I/O is in `mod.rs`
//! (reintegration) and `state_machine.rs` (apply, replay).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::types::LocalChange;
use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};
use crate::meta::{FsCommand, Kind, MetaError, MetaState, Name, RenameMode, Timestamp};

/// What a tentative change was made on; checked by the authority before it
/// applies the change at reintegration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The file exists, is linked, and has this content version.
    Version { ino: ResourceId, version: VersionId },
    /// `name` in `parent` names this inode (`None`: nothing).
    Entry {
        parent: ResourceId,
        name: Name,
        ino: Option<ResourceId>,
    },
}

/// One step of the path to a directory, as it was when a change was made
/// in it: enough to make it again if the other side removed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStep {
    pub dir: ResourceId,
    pub parent: ResourceId,
    pub name: Name,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// A tentative change as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TentativeChange {
    pub change: LocalChange,
    pub expect: Vec<Expect>,
    /// When the program made it (conflict names and records use it).
    pub at: Timestamp,
    /// The last outbox sequence applied here before it: on a restart it is
    /// replayed after that entry, before the next.
    pub after_seq: u64,
    /// A name of the file it changes (`CommitVersion`): where a conflict
    /// copy goes.
    pub place: Option<(ResourceId, Name)>,
    /// The path to the directory it changes, root first, as it was.
    pub path: Vec<PathStep>,
}

/// How a journal record is stored, versioned.
#[derive(Serialize, Deserialize)]
pub(super) enum StoredTentative {
    V1(TentativeChange),
    /// Reintegrated: `authority` applied it as its outbox entry `seq`;
    /// changes made here after it ship only once that entry is applied
    /// here (the record goes then).
    Done {
        authority: DeviceId,
        seq: u64,
        after_seq: u64,
    },
}

/// A tentative change in memory, in the speculative layer's order.
#[derive(Debug)]
pub struct Tentative {
    pub order: u64,
    pub jseq: u64,
    pub t: TentativeChange,
    pub pins: Vec<ChunkHash>,
    /// False while it does not apply over what is committed (it is then
    /// not shown; reintegration decides).
    pub applies: bool,
}

/// What the expectations of `cmd` are on `meta` (this device's view, just
/// before it applies `cmd` tentatively). `bases` overrides the version of
/// a file where `cmd` was made on another than `meta` shows: an own change
/// the log refused expects the committed version if this device wrote it
/// last, and none that can hold otherwise (`tentative_of_refused`).
pub fn expectations(
    meta: &MetaState,
    cmd: &FsCommand,
    bases: &HashMap<ResourceId, VersionId>,
) -> Vec<Expect> {
    let version = |ino: ResourceId| {
        bases.get(&ino).copied().or_else(|| {
            meta.get(ino)
                .filter(|i| i.kind == Kind::File)
                .map(|i| i.version())
        })
    };
    let entry = |parent: ResourceId, name: &[u8]| Expect::Entry {
        parent,
        name: name.to_vec(),
        ino: meta.entry(parent, name).map(|e| e.ino),
    };
    let mut out = Vec::new();
    match cmd {
        FsCommand::CommitVersion { ino, .. } => {
            if let Some(v) = version(*ino) {
                out.push(Expect::Version {
                    ino: *ino,
                    version: v,
                });
            }
        }
        FsCommand::Create { parent, name, .. } | FsCommand::Link { parent, name, .. } => {
            out.push(Expect::Entry {
                parent: *parent,
                name: name.clone(),
                ino: None,
            });
        }
        FsCommand::Unlink { parent, name, .. } | FsCommand::Rmdir { parent, name, .. } => {
            out.push(entry(*parent, name));
            if let Some(e) = meta.entry(*parent, name) {
                if let Some(v) = version(e.ino) {
                    out.push(Expect::Version {
                        ino: e.ino,
                        version: v,
                    });
                }
            }
        }
        FsCommand::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => {
            out.push(entry(*parent, name));
            out.push(entry(*new_parent, new_name));
        }
        _ => {}
    }
    out
}

/// Whether `expect` holds on `meta`; the first that does not, if any.
pub fn check(meta: &MetaState, expect: &[Expect]) -> Result<(), Failure> {
    for e in expect {
        let (ok, absent) = match e {
            Expect::Version { ino, version } => match meta.get(*ino) {
                Some(i) if i.nlink > 0 => (i.version() == *version, false),
                _ => (false, true),
            },
            Expect::Entry { parent, name, ino } => {
                let now = meta.entry(*parent, name).map(|e| e.ino);
                (now == *ino, now.is_none())
            }
        };
        if !ok {
            return Err(Failure::Changed {
                expect: e.clone(),
                absent,
            });
        }
    }
    Ok(())
}

/// Whether tentative change `later` makes `earlier` (the change just before
/// it in the journal) pointless: two versions of one file in a row, of
/// which only the last is worth reintegrating (the first one's
/// expectations go with it).
pub fn supersedes(later: &FsCommand, earlier: &FsCommand) -> bool {
    matches!(
        (later, earlier),
        (FsCommand::CommitVersion { ino: a, .. }, FsCommand::CommitVersion { ino: b, .. }) if a == b
    )
}

/// Why a tentative change did not apply at its authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// What it was made on changed there; `absent`: the file or the name
    /// is gone there.
    Changed { expect: Expect, absent: bool },
    /// The authority's own error (the name exists, the directory is gone).
    Error(MetaError),
}

/// What becomes of a tentative change that did not apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Try this instead (a conflict name; a directory made again first).
    Retry {
        cmd: FsCommand,
        expect: Vec<Expect>,
        kept_as: Option<Name>,
    },
    /// Keep this device's version of the file as a new file `name` in
    /// `parent`, beside the other side's.
    CopyBeside { parent: ResourceId, name: Name },
    /// The other side's change stands (what it changed or added is kept);
    /// this one is dropped, recorded as a conflict.
    Yield,
    /// Nothing is lost by dropping it (the file it removes is gone
    /// already): not a conflict.
    Moot,
    /// The directory it changes is gone there: make it again from `path`,
    /// then retry.
    Remake,
}

/// Which conflict it was, for the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConflictKind {
    /// Both sides changed a file: the other side's stays in place, this
    /// device's is beside it.
    EditEdit,
    /// This device changed a file the other side deleted: it is kept (as
    /// a copy beside where it was).
    EditDelete,
    /// This device deleted a file the other side changed: it is kept.
    DeleteEdit,
    /// Both sides created the name: this device's takes a conflict name.
    CreateCreate,
    /// Both sides renamed or removed the same entry: the other side's
    /// stands.
    RenameRename,
    /// This device removed a directory the other side added to: it is
    /// kept, with what was added.
    RmdirAdd,
    /// This device added to a directory the other side removed: the
    /// directory is made again to hold it.
    AddRmdir,
    /// Anything else that no longer applied.
    Other,
}

impl ConflictKind {
    pub fn label(self) -> &'static str {
        match self {
            ConflictKind::EditEdit => "edit/edit",
            ConflictKind::EditDelete => "edit/delete",
            ConflictKind::DeleteEdit => "delete/edit",
            ConflictKind::CreateCreate => "create/create",
            ConflictKind::RenameRename => "rename/rename",
            ConflictKind::RmdirAdd => "rmdir/add",
            ConflictKind::AddRmdir => "add/rmdir",
            ConflictKind::Other => "other",
        }
    }
}

/// A conflict met at reintegration, as listed by `meshfs conflicts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub kind: ConflictKind,
    /// When the program made the change, and when it was reintegrated.
    pub made: Timestamp,
    pub found: Timestamp,
    /// The path it concerns (lossy UTF-8), as this device sees it now.
    pub path: String,
    /// Where this device's version was kept, when it was put aside.
    pub kept_as: Option<String>,
    /// What happened, in words.
    pub detail: String,
}

/// The name this device's side of a conflict gets:
/// `NAME.conflict-<device>-<YYYYmmdd-HHMMSS>`, with `-<n>` after it from
/// the second attempt on (the first was taken too). Kept within NAME_MAX
/// by shortening NAME.
pub fn conflict_name(name: &[u8], device: &str, at: Timestamp, attempt: u32) -> Name {
    // A name that is one already (a retry) starts again from the original.
    let marker = format!(".conflict-{device}-");
    let name = match name
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
    {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    };
    let (y, mo, d, h, mi, s) = crate::civil::civil(at.secs);
    let mut suffix = format!(".conflict-{device}-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}");
    if attempt > 0 {
        suffix.push_str(&format!("-{}", attempt + 1));
    }
    let keep = crate::meta::NAME_MAX
        .saturating_sub(suffix.len())
        .min(name.len());
    let mut out = name[..keep].to_vec();
    out.extend_from_slice(suffix.as_bytes());
    out
}

/// Which names are taken (in this device's view): `taken(parent, name)`.
pub type Taken<'a> = &'a dyn Fn(ResourceId, &[u8]) -> bool;

/// The first conflict name for `name` in `parent`, from the `attempt`-th
/// on, that `taken` does not know: several conflicts on one file within
/// one second each get their own.
pub fn free_conflict_name(
    parent: ResourceId,
    name: &[u8],
    device: &str,
    at: Timestamp,
    attempt: u32,
    taken: Taken<'_>,
) -> Name {
    let mut n = attempt;
    loop {
        let candidate = conflict_name(name, device, at, n);
        if !taken(parent, &candidate) || n >= attempt.saturating_add(10_000) {
            return candidate;
        }
        n += 1;
    }
}

/// What to do with tentative change `t` that failed at its authority
/// with `failure` (the `attempt`-th time), and which conflict it was.
/// `device` is this device's name; `taken` says which names are in use.
pub fn resolve(
    t: &TentativeChange,
    failure: &Failure,
    device: &str,
    attempt: u32,
    taken: Taken<'_>,
) -> (Resolution, ConflictKind) {
    use ConflictKind as K;
    let conflict_name =
        |parent: ResourceId, name: &[u8], device: &str, at: Timestamp, attempt: u32| {
            free_conflict_name(parent, name, device, at, attempt, taken)
        };
    let gone = matches!(
        failure,
        Failure::Error(MetaError::NotFound | MetaError::NotDir)
    );
    match &t.change.cmd {
        FsCommand::CommitVersion { .. } => {
            let kind = match failure {
                Failure::Changed { absent: false, .. } => K::EditEdit,
                _ => K::EditDelete,
            };
            match &t.place {
                Some((parent, name)) => (
                    Resolution::CopyBeside {
                        parent: *parent,
                        name: conflict_name(*parent, name, device, t.at, attempt),
                    },
                    kind,
                ),
                // Nowhere known to put it: at the root.
                None => (
                    Resolution::CopyBeside {
                        parent: ResourceId::ROOT,
                        name: conflict_name(ResourceId::ROOT, b"unnamed", device, t.at, attempt),
                    },
                    kind,
                ),
            }
        }
        FsCommand::Create { parent, name, .. } | FsCommand::Link { parent, name, .. } => {
            if gone {
                // The directory it was made in is gone there.
                return (Resolution::Remake, K::AddRmdir);
            }
            let taken = matches!(
                failure,
                Failure::Changed { absent: false, .. } | Failure::Error(MetaError::Exists)
            );
            if !taken {
                // Refused for another reason: what it made stays out (a
                // file's content, if any, follows as an edit of a file
                // that does not exist, which is kept as a copy).
                return (Resolution::Yield, K::Other);
            }
            let new_name = conflict_name(*parent, name, device, t.at, attempt);
            let mut cmd = t.change.cmd.clone();
            match &mut cmd {
                FsCommand::Create { name, .. } | FsCommand::Link { name, .. } => {
                    *name = new_name.clone()
                }
                _ => {}
            }
            (
                Resolution::Retry {
                    cmd,
                    expect: vec![Expect::Entry {
                        parent: *parent,
                        name: new_name.clone(),
                        ino: None,
                    }],
                    kept_as: Some(new_name),
                },
                K::CreateCreate,
            )
        }
        FsCommand::Unlink { .. } => match failure {
            // Removed there too (or the directory with it).
            Failure::Changed { absent: true, .. } | Failure::Error(MetaError::NotFound) => {
                (Resolution::Moot, K::Other)
            }
            // The file it removes changed there: kept.
            Failure::Changed {
                expect: Expect::Version { .. },
                ..
            } => (Resolution::Yield, K::DeleteEdit),
            // The name is another file's now: kept.
            _ => (Resolution::Yield, K::RenameRename),
        },
        FsCommand::Rmdir { .. } => match failure {
            Failure::Changed { absent: true, .. } | Failure::Error(MetaError::NotFound) => {
                (Resolution::Moot, K::Other)
            }
            _ => (Resolution::Yield, K::RmdirAdd),
        },
        FsCommand::Rename {
            parent,
            name,
            new_parent,
            new_name,
            mode,
            now,
        } => match failure {
            // Something new sits at the target there: take a conflict name
            // rather than replace it.
            Failure::Changed {
                expect: Expect::Entry {
                    parent: p, name: n, ..
                },
                ..
            } if p == new_parent && n == new_name && *mode != RenameMode::Exchange => {
                let kept = conflict_name(*new_parent, new_name, device, t.at, attempt);
                let cmd = FsCommand::Rename {
                    parent: *parent,
                    name: name.clone(),
                    new_parent: *new_parent,
                    new_name: kept.clone(),
                    mode: RenameMode::NoReplace,
                    now: *now,
                };
                let mut expect: Vec<Expect> = t
                    .expect
                    .iter()
                    .filter(|e| !matches!(e, Expect::Entry { parent: p, name: n, .. } if p == new_parent && n == new_name))
                    .cloned()
                    .collect();
                expect.push(Expect::Entry {
                    parent: *new_parent,
                    name: kept.clone(),
                    ino: None,
                });
                (
                    Resolution::Retry {
                        cmd,
                        expect,
                        kept_as: Some(kept),
                    },
                    K::CreateCreate,
                )
            }
            _ if gone && matches!(failure, Failure::Error(_)) => (Resolution::Remake, K::AddRmdir),
            // The entry moved or went there: the other side's stands (the
            // file is where it put it).
            _ => (Resolution::Yield, K::RenameRename),
        },
        _ if gone => (Resolution::Moot, K::Other),
        _ => (Resolution::Yield, K::Other),
    }
}

/// Replaces inode numbers per `remap` (directories made again after the
/// other side removed them) in the places a command names a directory.
pub fn remap(cmd: &mut FsCommand, expect: &mut [Expect], remap: &HashMap<ResourceId, ResourceId>) {
    if remap.is_empty() {
        return;
    }
    let fix = |r: &mut ResourceId| {
        if let Some(n) = remap.get(r) {
            *r = *n;
        }
    };
    match cmd {
        FsCommand::Create { parent, .. }
        | FsCommand::Link { parent, .. }
        | FsCommand::Unlink { parent, .. }
        | FsCommand::Rmdir { parent, .. } => fix(parent),
        FsCommand::Rename {
            parent, new_parent, ..
        } => {
            fix(parent);
            fix(new_parent);
        }
        _ => {}
    }
    for e in expect {
        if let Expect::Entry { parent, .. } = e {
            fix(parent);
        }
    }
}

#[cfg(test)]
mod tests;
