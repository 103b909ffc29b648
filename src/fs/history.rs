//! Old versions and trashed files as people reach them: the listing behind
//! `meshfs versions`, `meshfs restore` (a kept version made current again
//! as a new version, or a trashed file brought back at its path), and the
//! read-only tree `/.meshfs/versions/<path>/<n>` at the mount root, where
//! every kept version of every file is a file to read (as ZFS's
//! `.zfs/snapshot`). The tree is not listed in the root directory (so
//! `find`, `du` and backups do not walk history), only reached by name.

use std::collections::HashMap;
use std::sync::Arc;

use super::{lock, Attr, Ctx, DirItem, Fs, FsError, Invalidate, Opened, Result};
use crate::fs::content::{read_content, ChunkCache};
use crate::ids::{DeviceId, ResourceId, VersionId};
use crate::meta::{Content, FsCommand, Kind, MetaError, MetaState, NewNode, Outcome, Timestamp};

/// The name of the virtual directory at the mount root.
pub const META_DIR: &[u8] = b".meshfs";
const VERSIONS_DIR: &[u8] = b"versions";
/// Virtual inode numbers start here, far above any block of real ones
/// (block `b` covers `[b << 32, (b + 1) << 32)`).
const VIRTUAL_BASE: u64 = 1 << 62;

/// A node of the virtual tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum VNode {
    /// `/.meshfs`
    Top,
    /// `/.meshfs/versions`, which mirrors the root.
    Versions,
    /// The mirror of a real directory.
    Dir(ResourceId),
    /// A directory standing for a real file: one entry per kept version.
    File(ResourceId),
    /// One version of a file, read-only.
    Version(ResourceId, VersionId),
}

/// Numbers handed out to virtual nodes (stable while mounted) and open
/// handles on versions.
#[derive(Default)]
pub(super) struct Virtual {
    by_ino: HashMap<u64, VNode>,
    by_node: HashMap<VNode, u64>,
    handles: HashMap<u64, (Content, Arc<ChunkCache>)>,
}

impl Virtual {
    pub(super) fn is_handle(&self, fh: u64) -> bool {
        self.handles.contains_key(&fh)
    }

    fn ino_of(&mut self, n: VNode) -> ResourceId {
        if let Some(i) = self.by_node.get(&n) {
            return ResourceId(*i);
        }
        let i = VIRTUAL_BASE + self.by_ino.len() as u64;
        self.by_ino.insert(i, n);
        self.by_node.insert(n, i);
        ResourceId(i)
    }
}

/// Whether `ino` is a node of the virtual tree.
pub fn is_virtual(ino: ResourceId) -> bool {
    ino.0 >= VIRTUAL_BASE
}

/// One version of a file, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub version: VersionId,
    pub committed: Timestamp,
    pub size: u64,
    pub author: Option<DeviceId>,
    /// `Content::digest`.
    pub hash: String,
    pub current: bool,
}

/// A file that was at the path asked about, with its kept versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHistory {
    pub resource: ResourceId,
    /// Set for a trashed file: when it went, and which device removed it.
    pub deleted: Option<(Timestamp, DeviceId)>,
    pub versions: Vec<VersionRow>,
}

/// What `restore` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub resource: ResourceId,
    /// The version restored, and the new current version it became.
    pub from: VersionId,
    pub version: VersionId,
    /// Whether the file was brought back from the trash.
    pub undeleted: bool,
}

fn row(c: &Content, current: bool) -> VersionRow {
    VersionRow {
        version: c.version,
        committed: c.committed,
        size: c.size,
        author: c.author,
        hash: c.digest().to_string(),
        current,
    }
}

/// Every kept version of `ino`, oldest first, the current one (of a live
/// file, or of a trashed one still open somewhere) last.
fn versions_of(meta: &MetaState, ino: ResourceId) -> Vec<(Content, bool)> {
    let mut out: Vec<(Content, bool)> = meta
        .old_versions(ino)
        .map(|(_, o)| (o.content.clone(), false))
        .collect();
    if let Some(c) = meta.get(ino).and_then(|i| i.content.as_ref()) {
        if c.version.0 > 0 {
            out.push((c.clone(), true));
        }
    }
    out
}

/// `path` normalised to "/a/b" (no empty, "." parts; ".." refused).
fn normal(path: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in path
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
    {
        if p == b".." {
            return Err(MetaError::Invalid("a path with '..'".into()).into());
        }
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        return Err(MetaError::Invalid("the root has no versions".into()).into());
    }
    Ok(out)
}

impl Fs {
    /// The history at `path`: the file there now (if a regular file), then
    /// the trashed files that were there, most recently removed first.
    pub fn versions(&self, path: &[u8]) -> Result<Vec<FileHistory>> {
        let path = normal(path)?;
        let meta = self.read_meta();
        let mut out = Vec::new();
        if let Some(ino) = meta.resolve(&path) {
            let i = meta.get(ino).ok_or(MetaError::NotFound)?;
            if i.kind != Kind::File {
                return Err(MetaError::Invalid("only regular files have versions".into()).into());
            }
            out.push(FileHistory {
                resource: ino,
                deleted: None,
                versions: versions_of(&meta, ino)
                    .iter()
                    .map(|(c, cur)| row(c, *cur))
                    .collect(),
            });
        }
        let mut gone: Vec<_> = meta
            .trash()
            .iter()
            .filter(|(_, t)| t.path == path)
            .collect();
        gone.sort_by_key(|(ino, t)| std::cmp::Reverse((t.deleted, **ino)));
        for (ino, t) in gone {
            out.push(FileHistory {
                resource: *ino,
                deleted: Some((t.deleted, t.by)),
                // A trashed file's last version is not "current".
                versions: versions_of(&meta, *ino)
                    .iter()
                    .map(|(c, _)| row(c, false))
                    .collect(),
            });
        }
        if out.is_empty() {
            return Err(MetaError::NotFound.into());
        }
        Ok(out)
    }

    /// Makes version `version` of the file at `path` current again, as a
    /// new version. When no file is there (or `deleted` names a trashed
    /// one), brings the most recently trashed file of that path back at it
    /// (its last version unless `version` says which), making missing
    /// parent directories.
    pub fn restore(
        &self,
        path: &[u8],
        version: Option<VersionId>,
        deleted: Option<ResourceId>,
    ) -> Result<Restored> {
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        let path = normal(path)?;
        let (live, trashed) = {
            let meta = self.read_meta();
            let live = meta.resolve(&path);
            let trashed = match deleted {
                Some(d) => match meta.trash().get(&d) {
                    Some(t) => Some((d, t.clone())),
                    None => {
                        return Err(MetaError::Invalid("no such file in the trash".into()).into())
                    }
                },
                None if live.is_none() => meta
                    .trash()
                    .iter()
                    .filter(|(_, t)| t.path == path)
                    .max_by_key(|(ino, t)| (t.deleted, **ino))
                    .map(|(i, t)| (*i, t.clone())),
                None => None,
            };
            (live, trashed)
        };
        let pick = |ino: ResourceId| -> Result<Content> {
            let meta = self.read_meta();
            let all = versions_of(&meta, ino);
            let found = match version {
                Some(v) => all.into_iter().find(|(c, _)| c.version == v),
                None => all.into_iter().last(),
            };
            found
                .map(|(c, _)| c)
                .ok_or_else(|| MetaError::Invalid("no such version kept".into()).into())
        };
        let now = Timestamp::now();
        if let Some((gone, t)) = trashed {
            if live.is_some() {
                return Err(MetaError::Exists.into());
            }
            // A file removed empty has no version kept: it comes back
            // empty.
            let content = match pick(gone) {
                Err(_) if version.is_none() && versions_of(&self.read_meta(), gone).is_empty() => {
                    Content::default()
                }
                other => other?,
            };
            let ctx = Ctx {
                uid: t.uid,
                gid: t.gid,
            };
            // At the path asked for (where `meshfs versions` listed it).
            let (parent, name) = self.make_parents(ctx, &path)?;
            let out = self.mutate(FsCommand::Create {
                parent,
                name: name.clone(),
                ino: ResourceId(0),
                node: NewNode::File,
                perm: t.perm,
                uid: t.uid,
                gid: t.gid,
                now,
            })?;
            let ino = self.inode_attr(out)?.ino;
            self.invalidate_entry(parent, &name);
            let version = if content.version.0 == 0 {
                VersionId(0)
            } else {
                self.commit_restored(ino, &content, now)?
            };
            return Ok(Restored {
                resource: ino,
                from: content.version,
                version,
                undeleted: true,
            });
        }
        let ino = live.ok_or(MetaError::NotFound)?;
        let Some(v) = version else {
            return Err(MetaError::Invalid("say which version (--version N)".into()).into());
        };
        let content = pick(ino)?;
        let current = self.read_meta().get(ino).map(|i| i.version());
        if current == Some(v) {
            return Err(MetaError::Invalid("that version is the current one".into()).into());
        }
        let version = self.commit_restored(ino, &content, now)?;
        Ok(Restored {
            resource: ino,
            from: content.version,
            version,
            undeleted: false,
        })
    }

    /// Commits `content` as the next version of `ino`.
    fn commit_restored(
        &self,
        ino: ResourceId,
        content: &Content,
        now: Timestamp,
    ) -> Result<VersionId> {
        let out = self.mutate(FsCommand::CommitVersion {
            ino,
            size: content.size,
            chunks: content.chunks.to_vec(),
            mtime: now,
            author: self.opts.device,
            now,
        })?;
        if let Some(f) = self.invalidate.get() {
            f(Invalidate::Inode(ino));
        }
        match out {
            Outcome::Inode(i) => Ok(i.version()),
            _ => Ok(self
                .read_meta()
                .get(ino)
                .map(|i| i.version())
                .unwrap_or_default()),
        }
    }

    /// The directory holding `path` and the last name, making the missing
    /// directories on the way (0755, owned as `ctx`).
    fn make_parents(&self, ctx: Ctx, path: &[u8]) -> Result<(ResourceId, Vec<u8>)> {
        let parts: Vec<&[u8]> = path
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        let Some((last, dirs)) = parts.split_last() else {
            return Err(MetaError::Invalid("empty path".into()).into());
        };
        let mut at = ResourceId::ROOT;
        for d in dirs {
            let found = self.read_meta().lookup(at, d).map(|i| (i.id, i.kind));
            at = match found {
                Ok((ino, Kind::Dir)) => ino,
                Ok(_) => return Err(MetaError::NotDir.into()),
                Err(_) => {
                    let out = self.mutate(FsCommand::Create {
                        parent: at,
                        name: d.to_vec(),
                        ino: ResourceId(0),
                        node: NewNode::Dir,
                        perm: 0o755,
                        uid: ctx.uid,
                        gid: ctx.gid,
                        now: Timestamp::now(),
                    })?;
                    self.invalidate_entry(at, d);
                    self.inode_attr(out)?.ino
                }
            };
        }
        Ok((at, last.to_vec()))
    }

    fn invalidate_entry(&self, parent: ResourceId, name: &[u8]) {
        if let Some(f) = self.invalidate.get() {
            f(Invalidate::Entry {
                parent,
                name: name.to_vec(),
            });
        }
    }

    // ---- the virtual tree ----

    /// A change named `name` in `parent` must not touch the virtual tree:
    /// nothing is created, removed or renamed inside it, and its name at
    /// the root is taken.
    pub(super) fn guard_name(&self, parent: ResourceId, name: &[u8]) -> Result<()> {
        if is_virtual(parent) {
            return Err(FsError::ReadOnly);
        }
        if parent == ResourceId::ROOT && name == META_DIR {
            return Err(MetaError::Exists.into());
        }
        Ok(())
    }

    /// Virtual nodes are read-only.
    pub(super) fn guard_ino(&self, ino: ResourceId) -> Result<()> {
        if is_virtual(ino) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    fn vnode(&self, ino: ResourceId) -> Result<VNode> {
        lock(&self.virt)
            .by_ino
            .get(&ino.0)
            .copied()
            .ok_or_else(|| MetaError::NotFound.into())
    }

    /// Lookup inside the virtual tree (or of its top at the root).
    pub(super) fn virtual_lookup(&self, parent: ResourceId, name: &[u8]) -> Result<Attr> {
        let node = if parent == ResourceId::ROOT {
            VNode::Top
        } else {
            let meta = self.read_meta();
            match self.vnode(parent)? {
                VNode::Top if name == VERSIONS_DIR => VNode::Versions,
                VNode::Top => return Err(MetaError::NotFound.into()),
                VNode::Versions => Self::mirror_lookup(&meta, ResourceId::ROOT, name)?,
                VNode::Dir(d) => Self::mirror_lookup(&meta, d, name)?,
                VNode::File(f) => {
                    let n: u64 = std::str::from_utf8(name)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or(MetaError::NotFound)?;
                    if !versions_of(&meta, f).iter().any(|(c, _)| c.version.0 == n) {
                        return Err(MetaError::NotFound.into());
                    }
                    VNode::Version(f, VersionId(n))
                }
                VNode::Version(..) => return Err(MetaError::NotDir.into()),
            }
        };
        let ino = lock(&self.virt).ino_of(node);
        self.virtual_attr(ino)
    }

    /// The node mirroring `name` in the real directory `dir`: a directory
    /// for a directory, a directory of versions for a regular file.
    fn mirror_lookup(meta: &MetaState, dir: ResourceId, name: &[u8]) -> Result<VNode> {
        let i = meta.lookup(dir, name)?;
        match i.kind {
            Kind::Dir => Ok(VNode::Dir(i.id)),
            Kind::File => Ok(VNode::File(i.id)),
            _ => Err(MetaError::NotFound.into()),
        }
    }

    /// Attributes of a virtual node: directories read-only (0555) and owned
    /// as what they mirror; versions read-only with the file's owner and
    /// permission bits less the write bits.
    pub(super) fn virtual_attr(&self, ino: ResourceId) -> Result<Attr> {
        let node = self.vnode(ino)?;
        let meta = self.read_meta();
        let root = meta.get(ResourceId::ROOT).ok_or(MetaError::NotFound)?;
        let mut a = Attr::of(root);
        a.ino = ino;
        a.perm = 0o555;
        a.nlink = 2;
        match node {
            VNode::Top | VNode::Versions => {}
            VNode::Dir(d) | VNode::File(d) => {
                let i = meta.get(d).ok_or(MetaError::NotFound)?;
                let base = Attr::of(i);
                (a.uid, a.gid, a.mtime, a.ctime) = (base.uid, base.gid, base.mtime, base.ctime);
                a.size = 4096;
                a.blocks = 8;
            }
            VNode::Version(f, v) => {
                let (c, _) = versions_of(&meta, f)
                    .into_iter()
                    .find(|(c, _)| c.version == v)
                    .ok_or(MetaError::NotFound)?;
                let i = meta.get(f);
                let (perm, uid, gid) = match (i, meta.trash().get(&f)) {
                    (Some(i), _) => (i.perm, i.uid, i.gid),
                    (None, Some(t)) => (t.perm, t.uid, t.gid),
                    (None, None) => (0o444, 0, 0),
                };
                a.kind = Kind::File;
                a.nlink = 1;
                a.perm = perm & !0o222;
                (a.uid, a.gid) = (uid, gid);
                a.size = c.size;
                a.blocks = crate::fs::content::data_bytes(&c).div_ceil(512);
                (a.mtime, a.ctime, a.crtime) = (c.committed, c.committed, c.committed);
            }
        }
        Ok(a)
    }

    /// Listing of a virtual directory: everything, then cut at `offset`
    /// (an index: the listings are small or rarely read).
    pub(super) fn virtual_readdir(
        &self,
        ino: ResourceId,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<DirItem>> {
        let node = self.vnode(ino)?;
        let mut names: Vec<(Vec<u8>, VNode)> = Vec::new();
        {
            let meta = self.read_meta();
            match node {
                VNode::Top => names.push((VERSIONS_DIR.to_vec(), VNode::Versions)),
                VNode::Versions | VNode::Dir(_) => {
                    let dir = match node {
                        VNode::Dir(d) => d,
                        _ => ResourceId::ROOT,
                    };
                    for (_, name, e) in meta.entries_after(dir, 0)? {
                        match e.kind {
                            Kind::Dir => names.push((name.clone(), VNode::Dir(e.ino))),
                            Kind::File => names.push((name.clone(), VNode::File(e.ino))),
                            _ => {}
                        }
                    }
                }
                VNode::File(f) => {
                    for (c, _) in versions_of(&meta, f) {
                        names.push((
                            c.version.0.to_string().into_bytes(),
                            VNode::Version(f, c.version),
                        ));
                    }
                }
                VNode::Version(..) => return Err(MetaError::NotDir.into()),
            }
        }
        let mut virt = lock(&self.virt);
        let mut out = Vec::new();
        let dots = [(b".".to_vec(), ino), (b"..".to_vec(), ino)];
        let all = dots
            .into_iter()
            .map(|(n, i)| (n, i, Kind::Dir))
            .chain(names.into_iter().map(|(n, v)| {
                let kind = if matches!(v, VNode::Version(..)) {
                    Kind::File
                } else {
                    Kind::Dir
                };
                (n, virt.ino_of(v), kind)
            }));
        for (idx, (name, i, kind)) in all.enumerate().skip(offset as usize) {
            if out.len() >= limit {
                break;
            }
            out.push(DirItem {
                ino: i,
                offset: idx as u64 + 1,
                kind,
                name,
            });
        }
        Ok(out)
    }

    /// Opens a version for reading; anything else is refused.
    pub(super) fn virtual_open(&self, ino: ResourceId, flags: i32) -> Result<Opened> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        let VNode::Version(f, v) = self.vnode(ino)? else {
            return Err(MetaError::IsDir.into());
        };
        let (c, _) = versions_of(&self.read_meta(), f)
            .into_iter()
            .find(|(c, _)| c.version == v)
            .ok_or(MetaError::NotFound)?;
        let fh = self
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cache = Arc::new(self.read_cache(f));
        lock(&self.virt).handles.insert(fh, (c, cache));
        Ok(Opened::cached(fh, true))
    }

    /// Reads an open version; `None` when `fh` is not one.
    pub(super) fn virtual_read(&self, fh: u64, offset: u64, size: u32) -> Option<Result<Vec<u8>>> {
        let (c, cache) = lock(&self.virt).handles.get(&fh).cloned()?;
        let n = c.size.saturating_sub(offset).min(size as u64) as usize;
        let mut out = vec![0u8; n];
        Some(read_content(&*self.store, &cache, &c, offset, &mut out).map(|_| out))
    }

    /// The content of an open version; `None` when `fh` is not one.
    pub(super) fn virtual_content(&self, fh: u64) -> Option<Content> {
        lock(&self.virt).handles.get(&fh).map(|(c, _)| c.clone())
    }

    /// Closes an open version; false when `fh` is not one.
    pub(super) fn virtual_release(&self, fh: u64) -> bool {
        lock(&self.virt).handles.remove(&fh).is_some()
    }
}
