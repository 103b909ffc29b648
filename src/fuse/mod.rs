//! The kernel adapter; the only module that imports fuser. Each callback
//! turns a request into a call on `fs::Fs` and its result into a reply; one
//! exhaustive match maps errors to errno. It also mounts: as root directly
//! with mount(2), so the mount shows as type `fuse.meshfs`; otherwise through
//! fusermount3.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
    TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, Ctx, Fs, FsError, SetAttr};
use crate::ids::ResourceId;
use crate::meta::{Kind, MetaError, RenameMode, Timestamp};
use crate::metrics::Op;
use crate::storage::StorageError;

/// Largest read and write the kernel sends us.
const MAX_IO: u32 = 1 << 20;

/// The one place errors become errno: a new variant must pick its errno here.
fn errno(e: &FsError) -> Errno {
    match e {
        FsError::Meta(m) => match m {
            MetaError::NotFound => Errno::ENOENT,
            MetaError::Exists => Errno::EEXIST,
            MetaError::NotEmpty => Errno::ENOTEMPTY,
            MetaError::NotDir => Errno::ENOTDIR,
            MetaError::IsDir => Errno::EISDIR,
            MetaError::NameTooLong => Errno::ENAMETOOLONG,
            MetaError::Invalid(_) => Errno::EINVAL,
            MetaError::NotPermitted => Errno::EPERM,
            MetaError::TooManyLinks => Errno::EMLINK,
            MetaError::NoAttr => Errno::NO_XATTR,
            MetaError::AttrRange => Errno::ERANGE,
            MetaError::AttrTooBig => Errno::E2BIG,
            MetaError::NotSupported => Errno::EOPNOTSUPP,
            // A change refused because its authority moved while it was
            // committed: the program's change did not happen.
            MetaError::NotAuthority => Errno::EIO,
            MetaError::NoInodes => Errno::ENOSPC,
        },
        FsError::Storage(s) => match s {
            StorageError::Corrupt { .. } => Errno::EIO,
            StorageError::NoSpace => Errno::ENOSPC,
            StorageError::Decode(_) | StorageError::Db(_) => Errno::EIO,
            StorageError::Io(io) => io_errno(io),
        },
        FsError::Io(io) => io_errno(io),
        FsError::MissingChunk(_) => Errno::EIO,
        FsError::BadHandle => Errno::EBADF,
        FsError::ReadOnly => Errno::EROFS,
        FsError::NotSupported => Errno::EOPNOTSUPP,
        FsError::Access => Errno::EACCES,
        FsError::TooBig => Errno::EFBIG,
        FsError::Unavailable(_) => Errno::EIO,
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(n) if n > 0 => Errno::from_i32(n),
        _ => Errno::EIO,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 64 * 1024,
        flags: 0,
    }
}

fn time_of(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(s) => Timestamp::from_system(s),
        TimeOrNow::Now => Timestamp::now(),
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn rid(i: INodeNo) -> ResourceId {
    ResourceId(i.0)
}

/// The fuser `Filesystem` over `Fs`.
pub struct Adapter {
    fs: Arc<Fs>,
    ttl: Duration,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Adapter {
    pub fn new(fs: Arc<Fs>, ttl: Duration, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Adapter { fs, ttl, metrics }
    }

    /// Times one kernel request until the returned guard drops.
    fn time(&self, op: Op) -> crate::metrics::OpTimer<'_> {
        self.metrics.fuse.time(op)
    }

    /// Registers a passthrough handle's backing file with the kernel at its
    /// first use (`open` is the reply's `open_backing`); the id is kept in
    /// the `Backing`, which lives as long as the file's passthrough
    /// handles. When the kernel refuses, the handle is read through the
    /// daemon instead (and passthrough is off for the run).
    fn register_backing(
        &self,
        o: &crate::fs::Opened,
        open: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) {
        let Some(b) = &o.passthrough else { return };
        let mut slot = b.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return;
        }
        match open(&b.file) {
            Ok(id) => *slot = Some(Box::new(id)),
            Err(e) => {
                drop(slot);
                self.fs.passthrough_refused(o.fh, &e.to_string());
            }
        }
    }

    fn entry(&self, r: crate::fs::Result<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// The flags of a handle read through the daemon.
fn fopen_flags(o: &crate::fs::Opened) -> FopenFlags {
    if o.keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn empty(r: crate::fs::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Each optional capability is only asked for when the kernel has it.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            let _ = config.add_capabilities(cap);
        }
        if self.fs.passthrough_wanted() {
            // Depth 1: backing files on an ordinary filesystem, and this
            // mount may still be a lower layer of an overlay.
            let asked = config
                .set_max_stack_depth(1)
                .ok()
                .and_then(|_| config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).ok());
            if asked.is_none() {
                self.fs
                    .passthrough_off("this kernel has no FUSE passthrough");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.commit_all() {
            tracing::error!(error = %e, "commit at unmount failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = self.time(Op::Lookup);
        self.entry(self.fs.lookup(rid(parent), name.as_bytes()), reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(rid(ino), nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = self.time(Op::Getattr);
        match self.fs.getattr(rid(ino)) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _t = self.time(Op::Setattr);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_of),
            mtime: mtime.map(time_of),
        };
        match self.fs.setattr(rid(ino), fh.map(|f| f.0), set) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = self.time(Op::Readlink);
        match self.fs.readlink(rid(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _t = self.time(Op::Mknod);
        self.entry(
            self.fs
                .mknod(ctx(req), rid(parent), name.as_bytes(), mode, rdev),
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _t = self.time(Op::Mkdir);
        self.entry(
            self.fs.mkdir(ctx(req), rid(parent), name.as_bytes(), mode),
            reply,
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.time(Op::Unlink);
        empty(self.fs.unlink(rid(parent), name.as_bytes()), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.time(Op::Rmdir);
        empty(self.fs.rmdir(rid(parent), name.as_bytes()), reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _t = self.time(Op::Symlink);
        self.entry(
            self.fs.symlink(
                ctx(req),
                rid(parent),
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            ),
            reply,
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Rename);
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            // RENAME_WHITEOUT is for overlay filesystems' upper layers.
            return reply.error(Errno::EINVAL);
        };
        empty(
            self.fs.rename(
                rid(parent),
                name.as_bytes(),
                rid(newparent),
                newname.as_bytes(),
                mode,
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _t = self.time(Op::Link);
        self.entry(
            self.fs.link(rid(ino), rid(newparent), newname.as_bytes()),
            reply,
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.time(Op::Open);
        match self.fs.open_as(req.uid(), rid(ino), flags.0) {
            Ok(o) => {
                self.register_backing(&o, |f| reply.open_backing(f));
                if let Some(b) = &o.passthrough {
                    let slot = b.slot.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(id) = slot.as_ref().and_then(|s| s.downcast_ref::<BackingId>()) {
                        return reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), id);
                    }
                }
                reply.opened(FileHandle(o.fh), fopen_flags(&o))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _t = self.time(Op::Read);
        match self.fs.read(fh.0, offset, size.min(MAX_IO)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _t = self.time(Op::Write);
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Flush);
        empty(self.fs.flush(fh.0), reply)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Release);
        empty(self.fs.release(fh.0), reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Fsync);
        empty(self.fs.fsync(fh.0), reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.time(Op::Opendir);
        match self.fs.opendir(rid(ino)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = self.time(Op::Readdir);
        match self.fs.readdir(rid(ino), offset, 512) {
            Ok(items) => {
                for it in items {
                    if reply.add(
                        INodeNo(it.ino.0),
                        it.offset,
                        file_type(it.kind),
                        OsStr::from_bytes(&it.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _t = self.time(Op::Readdir);
        match self.fs.readdir(rid(ino), offset, 256) {
            Ok(items) => {
                for it in items {
                    let dot = it.name == b"." || it.name == b"..";
                    let attr = match self.fs.getattr(it.ino) {
                        Ok(a) => a,
                        // Removed since the listing was taken: skip it.
                        Err(_) => continue,
                    };
                    if reply.add(
                        INodeNo(it.ino.0),
                        it.offset,
                        OsStr::from_bytes(&it.name),
                        &self.ttl,
                        &file_attr(&attr),
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel counts a lookup for every entry it accepted,
                    // except `.` and `..`.
                    if !dot {
                        self.fs.note_lookup(it.ino);
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Fsyncdir);
        empty(self.fs.fsyncdir(), reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = self.time(Op::Statfs);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Setxattr);
        empty(
            self.fs.setxattr(rid(ino), name.as_bytes(), value, flags),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = self.time(Op::Getxattr);
        xattr_reply(self.fs.getxattr(rid(ino), name.as_bytes()), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = self.time(Op::Listxattr);
        xattr_reply(self.fs.listxattr(rid(ino)), size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = self.time(Op::Removexattr);
        empty(self.fs.removexattr(rid(ino), name.as_bytes()), reply)
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _t = self.time(Op::Access);
        empty(self.fs.access(ctx(req), rid(ino), mask.bits()), reply)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _t = self.time(Op::Fallocate);
        empty(self.fs.fallocate(fh.0, offset, length, mode), reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _t = self.time(Op::Lseek);
        let hole = match whence {
            libc::SEEK_DATA => false,
            libc::SEEK_HOLE => true,
            // The kernel answers SEEK_SET, SEEK_CUR and SEEK_END itself.
            _ => return reply.error(Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        match self.fs.seek_data_or_hole(fh.0, offset, hole) {
            Ok(Some(pos)) => reply.offset(pos as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _t = self.time(Op::Create);
        match self
            .fs
            .create(ctx(req), rid(parent), name.as_bytes(), mode, flags)
        {
            Ok((a, o)) => {
                // An existing file opened by create(2) joins the
                // passthrough handles it has open, if any.
                self.register_backing(&o, |f| reply.open_backing(f));
                if let Some(b) = &o.passthrough {
                    let slot = b.slot.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(id) = slot.as_ref().and_then(|s| s.downcast_ref::<BackingId>()) {
                        return reply.created_passthrough(
                            &self.ttl,
                            &file_attr(&a),
                            Generation(0),
                            FileHandle(o.fh),
                            FopenFlags::empty(),
                            id,
                        );
                    }
                }
                reply.created(
                    &self.ttl,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(o.fh),
                    fopen_flags(&o),
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// getxattr/listxattr: size 0 asks for the length; too small is ERANGE.
fn xattr_reply(r: crate::fs::Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// Shown as the mount's source in /proc/mounts (the data dir).
    pub source: String,
    pub allow_other: bool,
    pub read_only: bool,
    pub noexec: bool,
    pub threads: usize,
    pub ttl: Duration,
    /// Where request latencies are recorded.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// A live mount. Dropping it does not unmount: the daemon unmounts
/// explicitly on shutdown so that it can commit first.
pub struct Mounted {
    session: BackgroundSession,
    mountpoint: PathBuf,
}

impl Mounted {
    /// Blocks until the kernel ends the session (unmount).
    pub fn join(self) {
        if let Err(e) = self.session.join() {
            tracing::warn!(error = %e, "FUSE session ended with an error");
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the session thread has ended (the mount is gone).
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }
}

/// Unmounts `path`; lazily if it is busy, so shutdown never hangs.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(path)
                .status()?;
            if st.success() {
                Ok(())
            } else {
                Err(std::io::Error::other("fusermount3 -u failed"))
            }
        }
        _ => Err(err),
    }
}

/// Mounts `fs` and serves it on background threads.
pub fn mount(fs: Arc<Fs>, cfg: &MountConfig) -> std::io::Result<Mounted> {
    let fs_for_inval = fs.clone();
    let adapter = Adapter::new(fs, cfg.ttl, cfg.metrics.clone());
    let acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(cfg.threads);
    config.clone_fd = true;
    config.acl = acl;
    // SAFETY: geteuid has no preconditions.
    let session = if unsafe { libc::geteuid() } == 0 {
        let fd = mount_as_root(cfg)?;
        fuser::Session::from_fd(adapter, fd, acl, config)?
    } else {
        config.mount_options = vec![
            MountOption::FSName(cfg.source.clone()),
            MountOption::Subtype("meshfs".into()),
            MountOption::DefaultPermissions,
            if cfg.read_only {
                MountOption::RO
            } else {
                MountOption::RW
            },
            if cfg.noexec {
                MountOption::NoExec
            } else {
                MountOption::Exec
            },
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        fuser::Session::new(adapter, &cfg.mountpoint, &config)?
    };
    let session = session.spawn()?;
    start_invalidator(&fs_for_inval, session.notifier());
    raise_readahead(&cfg.mountpoint);
    Ok(Mounted {
        session,
        mountpoint: cfg.mountpoint.clone(),
    })
}

/// Tells the kernel about changes made on other devices, from a thread of
/// its own: a notification can wait on a kernel lock held by a request we
/// are serving, so it must never be sent from a request thread or from
/// where a request waits (the Raft apply). When the queue is full the
/// notification is dropped and the attribute TTL bounds the staleness.
fn start_invalidator(fs: &Arc<Fs>, notifier: fuser::Notifier) {
    // Attributes only (offset -1): the kernel takes no inode or page lock
    // for it, so an open may send it while the kernel waits for the open.
    let attrs = notifier.clone();
    fs.set_stale_attrs(Arc::new(move |ino| {
        let _ = attrs.inval_inode(INodeNo(ino.0), -1, 0);
    }));
    let (tx, rx) = std::sync::mpsc::sync_channel::<crate::fs::Invalidate>(4096);
    fs.set_invalidator(Arc::new(move |inv| {
        let _ = tx.try_send(inv);
    }));
    let spawned = std::thread::Builder::new()
        .name("fuse-inval".into())
        .spawn(move || {
            while let Ok(inv) = rx.recv() {
                // ENOENT (nothing cached) is the common, harmless answer.
                let _ = match inv {
                    crate::fs::Invalidate::Entry { parent, name } => {
                        notifier.inval_entry(INodeNo(parent.0), OsStr::from_bytes(&name))
                    }
                    crate::fs::Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino.0), 0, 0),
                };
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no invalidation thread; remote changes show after the attribute TTL");
    }
}

/// The kernel offers FUSE at most 128 KiB of readahead at INIT; sequential
/// reads then arrive in 128 KiB requests. Root can raise the mount's
/// backing-device readahead to MAX_IO afterwards (best effort).
fn raise_readahead(mountpoint: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mountpoint.as_os_str().as_bytes();
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4].as_bytes() == want).then(|| f[2].to_string())
    });
    if let Some(dev) = dev {
        let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        if let Err(e) = std::fs::write(&path, format!("{}", MAX_IO / 1024)) {
            tracing::debug!(%path, error = %e, "could not raise readahead");
        }
    }
}

/// mount(2) with type `fuse.meshfs`, which fuser's own mount code does not
/// offer (it always says plain `fuse`).
fn mount_as_root(cfg: &MountConfig) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata(&cfg.mountpoint)?.mode();
    let dev = std::ffi::CString::new("/dev/fuse").map_err(std::io::Error::other)?;
    // SAFETY: valid C string; the returned fd is checked and owned below.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut data = format!(
        "fd={raw},rootmode={:o},user_id=0,group_id=0,default_permissions,max_read={MAX_IO}",
        mode & libc::S_IFMT
    );
    if cfg.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NODEV | libc::MS_NOSUID;
    if cfg.read_only {
        flags |= libc::MS_RDONLY;
    }
    if cfg.noexec {
        flags |= libc::MS_NOEXEC;
    }
    let c = |s: &[u8]| {
        std::ffi::CString::new(s).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let source = c(cfg.source.as_bytes())?;
    let target = c(cfg.mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.meshfs")?;
    let data = c(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
