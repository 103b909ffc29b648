//! Plain data of the namespace: inodes, directory entries, content versions,
//! timestamps and the commands that change them. Everything here is serde so
//! the same values go to RocksDB now and over Raft later.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};

/// A name inside a directory: raw bytes, as the kernel gives them.
pub type Name = Vec<u8>;

/// Longest name in a directory, as Linux's NAME_MAX.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, as Linux's PATH_MAX less the NUL.
pub const SYMLINK_MAX: usize = 4095;
/// Longest xattr name and value, as Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX.
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;

/// Wall-clock time carried inside commands, so that applying a command is
/// deterministic on every replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                // Before 1970: keep it representable rather than failing.
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timestamp {
                        secs: -(d.as_secs() as i64),
                        nanos: 0,
                    }
                } else {
                    Timestamp {
                        secs: -(d.as_secs() as i64) - 1,
                        nanos: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nanos as u64)
        }
    }
}

/// What kind of node an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// One content-defined piece of a file: where it sits and what it hashes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    pub offset: u64,
    pub len: u32,
}

/// One committed content state of a regular file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Content {
    pub version: VersionId,
    pub size: u64,
    /// Sorted by offset, contiguous from 0 to `size`.
    pub chunks: Arc<Vec<ChunkRef>>,
    /// The device that committed this version (authority follows it later).
    pub author: Option<DeviceId>,
    /// When it was committed (the command's time): what version listings
    /// show, which `touch` or `utimes` on the file does not change.
    pub committed: Timestamp,
}

impl Content {
    /// One hash of the whole content: BLAKE3 over the size and the chunk
    /// hashes in order (a hole counts as its zero-run hash). Two versions
    /// with equal bytes cut at equal points have equal hashes, which is
    /// what listings need to show that a restore brought the same bytes
    /// back; it is not the BLAKE3 of the bytes themselves.
    pub fn digest(&self) -> ChunkHash {
        Self::digest_of(self.size, &self.chunks)
    }

    /// `digest` of content not made into a version (yet).
    pub fn digest_of(size: u64, chunks: &[ChunkRef]) -> ChunkHash {
        let mut h = blake3::Hasher::new();
        h.update(&size.to_le_bytes());
        for c in chunks {
            h.update(c.hash.as_bytes());
            h.update(&c.len.to_le_bytes());
        }
        ChunkHash::from_bytes(*h.finalize().as_bytes())
    }

    /// The chunks that hold bytes (holes excepted): what references count.
    pub fn stored_chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.chunks.iter().filter(|c| !c.hash.is_zero_run())
    }
}

/// A version of a file that a newer one replaced, kept for the retention
/// period (Config `versions_*`); its chunks stay referenced while it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldVersion {
    pub content: Content,
    /// The file's modification time while this version was current.
    pub mtime: Timestamp,
    /// When a newer version (or the file's removal) replaced it: what the
    /// age limit counts from.
    pub superseded: Timestamp,
}

/// A regular file whose last name went away (unlink, or a rename over it),
/// kept restorable for the retention period. Its content stays in the
/// version store under its old inode number, which is never handed out
/// again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trashed {
    /// Where it was, from the root ("/dir/name"), when it went.
    pub path: Vec<u8>,
    pub deleted: Timestamp,
    /// The device whose program removed it.
    pub by: DeviceId,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

impl Content {
    /// Index of the chunk holding byte `offset`, if any.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.size {
            return None;
        }
        let idx = self
            .chunks
            .partition_point(|c| c.offset + c.len as u64 <= offset);
        (idx < self.chunks.len()).then_some(idx)
    }
}

/// A node of the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub id: ResourceId,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Directories: the parent, for `..` and for the rename loop check.
    pub parent: ResourceId,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Symlinks: the target.
    pub target: Option<Vec<u8>>,
    /// Regular files: the current version.
    pub content: Option<Content>,
    /// Directories: the next readdir cookie to hand out (stable offsets).
    pub next_cookie: u64,
    /// The device that governs this resource now: for a directory it
    /// decides the entries, for a file its content and attributes.
    pub authority: Authority,
}

/// Which device governs a resource, and since which decision: `epoch`
/// grows with every move, so a late, stale decision cannot undo a newer one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    pub device: DeviceId,
    pub epoch: u64,
}

/// Inode numbers are handed out in blocks of `BLOCK_SIZE`, each owned by
/// one device, so that a device creates files without asking anyone and
/// two devices never pick the same number. Block `b` covers
/// `[b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE)`.
pub const BLOCK_SIZE: u64 = 1 << 32;

/// One device's block of inode numbers and the next number never used in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub owner: DeviceId,
    pub next: u64,
}

/// The replicated allocator of inode numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InoSpace {
    /// The next block nobody owns yet.
    pub next_block: u64,
    pub blocks: BTreeMap<u64, Block>,
}

impl InoSpace {
    /// The block `device` allocates from: its newest one with room left.
    pub fn block_of(&self, device: DeviceId) -> Option<u64> {
        self.blocks
            .iter()
            .rev()
            .find(|(b, blk)| blk.owner == device && blk.next < (*b + 1).saturating_mul(BLOCK_SIZE))
            .map(|(b, _)| *b)
    }
}

impl Inode {
    pub fn size(&self) -> u64 {
        match self.kind {
            Kind::File => self.content.as_ref().map_or(0, |c| c.size),
            Kind::Symlink => self.target.as_ref().map_or(0, |t| t.len() as u64),
            Kind::Dir => 4096,
            _ => 0,
        }
    }

    /// The full st_mode: file type bits plus permission bits.
    pub fn mode(&self) -> u32 {
        let fmt = match self.kind {
            Kind::Dir => libc::S_IFDIR,
            Kind::File => libc::S_IFREG,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        };
        fmt | self.perm as u32
    }

    pub fn version(&self) -> VersionId {
        self.content.as_ref().map(|c| c.version).unwrap_or_default()
    }
}

/// A directory entry. The cookie orders entries for readdir and never
/// changes while the entry exists, so offsets stay valid under changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ino: ResourceId,
    pub cookie: u64,
    pub kind: Kind,
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewNode {
    File,
    Dir,
    Symlink { target: Vec<u8> },
    Fifo,
    Socket,
    CharDev { rdev: u32 },
    BlockDev { rdev: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenameMode {
    /// Plain rename(2): replace the target if it is compatible.
    Replace,
    /// RENAME_NOREPLACE: fail with EEXIST if the target exists.
    NoReplace,
    /// RENAME_EXCHANGE: swap two existing entries atomically.
    Exchange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    Any,
    /// XATTR_CREATE: fail if it exists.
    Create,
    /// XATTR_REPLACE: fail if it does not exist.
    Replace,
}

/// Every change to the namespace. `now` is chosen by the proposer so that
/// every replica applies the same timestamps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsCommand {
    Create {
        parent: ResourceId,
        name: Name,
        /// The new inode's number, from the applying device's block; 0 asks
        /// the applier to choose (the authority fills it in before the
        /// command is logged).
        ino: ResourceId,
        node: NewNode,
        perm: u16,
        uid: u32,
        gid: u32,
        now: Timestamp,
    },
    Link {
        ino: ResourceId,
        parent: ResourceId,
        name: Name,
        now: Timestamp,
    },
    Unlink {
        parent: ResourceId,
        name: Name,
        now: Timestamp,
    },
    Rmdir {
        parent: ResourceId,
        name: Name,
        now: Timestamp,
    },
    Rename {
        parent: ResourceId,
        name: Name,
        new_parent: ResourceId,
        new_name: Name,
        mode: RenameMode,
        now: Timestamp,
    },
    SetAttr {
        ino: ResourceId,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
        now: Timestamp,
    },
    SetXattr {
        ino: ResourceId,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
        now: Timestamp,
    },
    RemoveXattr {
        ino: ResourceId,
        name: Vec<u8>,
        now: Timestamp,
    },
    /// A new content version of a regular file (write, truncate).
    CommitVersion {
        ino: ResourceId,
        size: u64,
        chunks: Vec<ChunkRef>,
        mtime: Timestamp,
        author: DeviceId,
        now: Timestamp,
    },
    /// Drop an unlinked inode once nothing uses it any more.
    Reclaim { ino: ResourceId },
    /// Drop every unlinked inode: nothing can hold one open across a restart.
    ReclaimOrphans,
    /// Gives `device` a block of inode numbers (cluster-wide, through Raft).
    ReserveInodes { device: DeviceId },
    /// Moves authorities (cluster-wide, through Raft). A move whose epoch
    /// is not above the resource's current one, or whose resource is gone,
    /// is skipped: a late, stale decision cannot undo a newer one.
    SetAuthority { moves: Vec<Move> },
    /// Forgets old versions and trashed files the retention policy no
    /// longer keeps (cluster-wide, through Raft: the leader decides, see
    /// `meta::retention`), releasing their chunks. Ones already gone are
    /// skipped.
    DropVersions {
        versions: Vec<(ResourceId, VersionId)>,
        trash: Vec<ResourceId>,
    },
}

/// One authority move: `ino` is governed by `device` from `epoch` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub ino: ResourceId,
    pub device: DeviceId,
    pub epoch: u64,
}

impl FsCommand {
    /// The resources whose authority decides this command (the directories
    /// whose entries it changes, or the inode whose content or attributes
    /// it changes): what a device's work on them is counted against, and
    /// what a handoff seals.
    pub fn decided_by(&self) -> Vec<ResourceId> {
        match self {
            FsCommand::Create { parent, .. }
            | FsCommand::Link { parent, .. }
            | FsCommand::Unlink { parent, .. }
            | FsCommand::Rmdir { parent, .. } => vec![*parent],
            FsCommand::Rename {
                parent, new_parent, ..
            } => {
                if parent == new_parent {
                    vec![*parent]
                } else {
                    vec![*parent, *new_parent]
                }
            }
            FsCommand::SetAttr { ino, .. }
            | FsCommand::SetXattr { ino, .. }
            | FsCommand::RemoveXattr { ino, .. }
            | FsCommand::CommitVersion { ino, .. }
            | FsCommand::Reclaim { ino } => vec![*ino],
            FsCommand::ReclaimOrphans
            | FsCommand::ReserveInodes { .. }
            | FsCommand::SetAuthority { .. }
            | FsCommand::DropVersions { .. } => vec![],
        }
    }
}

/// Who must agree to a command (`MetaState::governance`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Governance {
    /// Decided by this one authority, which applies it at once.
    One(DeviceId),
    /// Spans several authorities (a rename or removal across directories
    /// governed by different devices): committed through Raft after each
    /// has shipped its pending changes.
    Several(Vec<DeviceId>),
    /// Cluster-wide bookkeeping (inode blocks, authority moves): Raft only.
    Cluster,
    /// A monotone clean-up any device may apply (reclaiming an unlinked
    /// inode nobody uses).
    Anyone,
}

/// Who applies a command and on whose behalf: the applier is the
/// authority that decided it (its inode block numbers new resources), the
/// origin the device whose program asked (new resources start governed by
/// it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct By {
    pub applier: DeviceId,
    pub origin: DeviceId,
}

impl By {
    pub fn device(d: DeviceId) -> Self {
        By {
            applier: d,
            origin: d,
        }
    }
}
