//! Every filesystem operation through a real kernel FUSE mount, driven by
//! std::fs and libc as ordinary programs would.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::{bytes, Device};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn mount_shows_type_fuse_meshfs_and_status_reports() {
    require_root!();
    let d = Device::start("alice");
    assert_eq!(
        common::fstype(d.mountpoint()).as_deref(),
        Some("fuse.meshfs")
    );
    let s = d.status_json();
    assert_eq!(s["running"], true);
    assert_eq!(s["devices"][0]["name"], "alice");
    assert_eq!(s["devices"][0]["up"], true);
    // A mesh of one: this device bootstrapped Raft and leads it alone.
    assert_eq!(s["leader"], "alice");
    assert!(s["term"].as_u64().unwrap() >= 1);
    assert_eq!(s["raft"]["state"], "leader");
    assert_eq!(s["raft"]["voters"], serde_json::json!(["alice"]));
    assert_eq!(s["raft"]["degraded"], false);
    assert!(s["cache_bytes"].is_u64());
    assert_eq!(s["prefetch"]["hits"], 0);
    // Memory: the process's RSS, and RocksDB's share of it, bounded.
    let rss = s["memory"]["rss_bytes"].as_u64().unwrap();
    assert!(rss > 1 << 20, "{rss}");
    let rocksdb = &s["memory"]["rocksdb"];
    for k in ["memtables", "block_cache", "table_readers"] {
        let v = rocksdb[k].as_u64().unwrap();
        assert!(v < rss, "{k}: {v} of {rss}");
    }
    // The control socket is private to the daemon's user.
    let mode = fs::metadata(d.data_dir().join("control.sock"))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn files_write_read_seek_truncate_append() {
    require_root!();
    let d = Device::start("alice");
    let p = d.path("f.bin");
    let data = bytes(3 << 20, 1);
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    assert_eq!(fs::metadata(&p).unwrap().len(), 3 << 20);

    // Overwrite in the middle, read at offsets.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"MIDDLE", 1_000_000).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 1_000_000).unwrap();
    assert_eq!(&buf, b"MIDDLE");
    // ftruncate shrinks and grows with zeros.
    f.set_len(10).unwrap();
    f.set_len(20).unwrap();
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(&got[..10], &data[..10]);
    assert_eq!(&got[10..], &[0u8; 10]);

    // truncate(2) by path.
    let cp = c(&p);
    assert_eq!(unsafe { libc::truncate(cp.as_ptr(), 5) }, 0);
    assert_eq!(fs::metadata(&p).unwrap().len(), 5);

    // O_APPEND writes at the end whatever the offset.
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"++").unwrap();
    drop(a);
    assert_eq!(fs::read(&p).unwrap(), [&data[..5], b"++"].concat());

    // O_TRUNC empties; O_EXCL refuses an existing file.
    let mut t = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    t.write_all(b"new").unwrap();
    drop(t);
    assert_eq!(fs::read(&p).unwrap(), b"new");
    let r = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_eq!(errno_of(r), libc::EEXIST);
}

#[test]
fn sparse_files_read_holes_as_zeros() {
    require_root!();
    let d = Device::start("alice");
    let p = d.path("sparse");
    let mut f = File::create(&p).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), (5 << 20) + 4);
    assert!(got[..5 << 20].iter().all(|b| *b == 0));
    assert_eq!(&got[5 << 20..], b"tail");
    // A huge hole (truncate -s 100G) is instant and reads as zeros.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    let t = std::time::Instant::now();
    f.set_len(100 << 30).unwrap();
    drop(f);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let f = File::open(&p).unwrap();
    let mut end = [1u8; 8];
    f.read_exact_at(&mut end, (100 << 30) - 8).unwrap();
    assert_eq!(end, [0u8; 8]);
}

#[test]
fn seek_hole_and_data_st_blocks_and_fallocate_through_the_kernel() {
    require_root!();
    let d = Device::start("alice");
    let mib: i64 = 1 << 20;
    let p = d.path("holes");
    let f = File::create(&p).unwrap();
    f.write_all_at(&[7u8; 4096], 0).unwrap();
    f.write_all_at(&[9u8; 4096], (8 * mib) as u64).unwrap();
    drop(f);
    let f = File::open(&p).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    let seek = |off: i64, whence: i32| {
        // SAFETY: lseek on a descriptor this test owns.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r)
        }
    };
    assert_eq!(seek(0, libc::SEEK_HOLE), Ok(4096));
    assert_eq!(seek(4096, libc::SEEK_DATA), Ok(8 * mib));
    assert_eq!(seek(8 * mib, libc::SEEK_HOLE), Ok(8 * mib + 4096));
    assert_eq!(seek(8 * mib + 4096, libc::SEEK_DATA), Err(libc::ENXIO));
    // Only the two written blocks take space (du, cp --sparse).
    assert_eq!(fs::metadata(&p).unwrap().blocks(), 2 * 4096 / 512);
    drop(f);

    let p = d.path("prealloc");
    let f = File::create(&p).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    // SAFETY: fallocate on a descriptor this test owns.
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 3 * mib) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 3 * mib as u64);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fallocate(fd, punch, 0, 4096) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    f.write_all_at(b"data", mib as u64).unwrap();
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len() as i64, 3 * mib);
    assert_eq!(&got[mib as usize..mib as usize + 4], b"data");
    assert!(got[..mib as usize].iter().all(|b| *b == 0));
}

#[test]
fn two_handles_see_each_others_writes_before_close() {
    require_root!();
    let d = Device::start("alice");
    let p = d.path("shared");
    fs::write(&p, b"0123456789").unwrap();
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    let mut r = File::open(&p).unwrap();
    w.write_all_at(b"ab", 3).unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "012ab56789");
}

#[test]
fn directories_links_symlinks_and_special_nodes() {
    require_root!();
    let d = Device::start("alice");
    fs::create_dir(d.path("dir")).unwrap();
    fs::write(d.path("dir/a"), b"a").unwrap();
    assert_eq!(errno_of(fs::remove_dir(d.path("dir"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::create_dir(d.path("dir"))), libc::EEXIST);
    assert_eq!(errno_of(fs::read(d.path("nope"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(d.path("dir/a/x"))), libc::ENOTDIR);
    assert_eq!(fs::metadata(d.path("dir")).unwrap().nlink(), 2);
    fs::create_dir(d.path("dir/sub")).unwrap();
    assert_eq!(fs::metadata(d.path("dir")).unwrap().nlink(), 3);

    // Hard links share content and count links.
    fs::hard_link(d.path("dir/a"), d.path("b")).unwrap();
    assert_eq!(fs::metadata(d.path("b")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(d.path("b")).unwrap().ino(),
        fs::metadata(d.path("dir/a")).unwrap().ino()
    );
    fs::write(d.path("b"), b"changed").unwrap();
    assert_eq!(fs::read(d.path("dir/a")).unwrap(), b"changed");
    assert_eq!(
        errno_of(fs::hard_link(d.path("dir"), d.path("dirlink"))),
        libc::EPERM
    );

    // Symlinks.
    std::os::unix::fs::symlink("dir/a", d.path("sl")).unwrap();
    assert_eq!(fs::read_link(d.path("sl")).unwrap(), Path::new("dir/a"));
    assert_eq!(fs::read(d.path("sl")).unwrap(), b"changed");
    assert!(fs::symlink_metadata(d.path("sl"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A fifo and a device node as metadata.
    let fifo = c(&d.path("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let m = fs::symlink_metadata(d.path("fifo")).unwrap();
    assert_eq!(m.mode() & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(m.mode() & 0o7777, 0o640);
    let dev = c(&d.path("null2"));
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        0
    );
    assert_eq!(
        fs::symlink_metadata(d.path("null2")).unwrap().rdev(),
        libc::makedev(1, 3)
    );

    // Unlink and rmdir.
    fs::remove_file(d.path("b")).unwrap();
    assert_eq!(fs::metadata(d.path("dir/a")).unwrap().nlink(), 1);
    fs::remove_dir(d.path("dir/sub")).unwrap();
    assert_eq!(fs::metadata(d.path("dir")).unwrap().nlink(), 2);
    assert_eq!(errno_of(fs::remove_file(d.path("dir"))), libc::EISDIR);
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> i32 {
    let (a, b) = (c(from), c(to));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[test]
fn rename_replace_noreplace_exchange() {
    require_root!();
    let d = Device::start("alice");
    fs::write(d.path("x"), b"x").unwrap();
    fs::write(d.path("y"), b"y").unwrap();
    fs::create_dir(d.path("d1")).unwrap();
    fs::create_dir(d.path("d2")).unwrap();
    fs::write(d.path("d2/in"), b"in").unwrap();

    assert_eq!(
        renameat2(&d.path("x"), &d.path("y"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        renameat2(&d.path("x"), &d.path("y"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(fs::read(d.path("x")).unwrap(), b"y");
    assert_eq!(fs::read(d.path("y")).unwrap(), b"x");
    fs::rename(d.path("x"), d.path("y")).unwrap();
    assert_eq!(fs::read(d.path("y")).unwrap(), b"y");
    assert!(!d.path("x").exists());
    assert_eq!(
        errno_of(fs::rename(d.path("d1"), d.path("d2"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(fs::rename(d.path("y"), d.path("d1"))),
        libc::EISDIR
    );
    assert_eq!(
        errno_of(fs::rename(d.path("d1"), d.path("y"))),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(fs::rename(d.path("d2"), d.path("d2/in2"))),
        libc::EINVAL
    );
    // Across directories, with `..` following.
    fs::rename(d.path("d1"), d.path("d2/d1")).unwrap();
    assert_eq!(fs::metadata(d.path("d2")).unwrap().nlink(), 3);
    fs::write(d.path("d2/d1/../marker"), b"m").unwrap();
    assert_eq!(fs::read(d.path("d2/marker")).unwrap(), b"m");
}

#[test]
fn attributes_chmod_chown_utimens_statfs_access() {
    require_root!();
    let d = Device::start("alice");
    let p = d.path("f");
    fs::write(&p, b"data").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4751);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));

    let cp = c(&p);
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 456_789,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 123));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 456_789));
    assert!(m.ctime() > 1_500_000_000);

    // Writing moves mtime forward again.
    fs::write(&p, b"more").unwrap();
    assert!(fs::metadata(&p).unwrap().mtime() > 1_500_000_000);

    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let root = c(d.mountpoint());
    assert_eq!(unsafe { libc::statvfs(root.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bsize > 0);
    assert_eq!(st.f_namemax, 255);

    assert_eq!(
        unsafe { libc::access(cp.as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
    let long = d.path(&"n".repeat(256));
    assert_eq!(errno_of(fs::write(long, b"")), libc::ENAMETOOLONG);
}

#[test]
fn xattrs_set_get_list_remove() {
    require_root!();
    let d = Device::start("alice");
    let p = d.path("f");
    fs::write(&p, b"").unwrap();
    let cp = c(&p);
    let name = CString::new("user.color").unwrap();
    let set = |v: &[u8], flags| unsafe {
        libc::setxattr(
            cp.as_ptr(),
            name.as_ptr(),
            v.as_ptr() as *const _,
            v.len(),
            flags,
        )
    };
    assert_eq!(set(b"blue", libc::XATTR_REPLACE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(set(b"blue", libc::XATTR_CREATE), 0);
    assert_eq!(set(b"red", libc::XATTR_CREATE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::getxattr(
            cp.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut _,
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"blue");
    // Size query, then too small a buffer.
    assert_eq!(
        unsafe { libc::getxattr(cp.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) },
        4
    );
    assert_eq!(
        unsafe { libc::getxattr(cp.as_ptr(), name.as_ptr(), buf.as_mut_ptr() as *mut _, 2) },
        -1
    );
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    let n = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    assert_eq!(&buf[..n as usize], b"user.color\0");
    // ACLs and security labels are refused, not stored unenforced.
    // (The kernel itself rejects a malformed ACL value, so ACLs are probed
    // with getxattr.)
    let cap = CString::new("security.label").unwrap();
    let r = unsafe { libc::setxattr(cp.as_ptr(), cap.as_ptr(), b"x".as_ptr() as *const _, 1, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    let acl = CString::new("system.posix_acl_access").unwrap();
    let r = unsafe {
        libc::getxattr(
            cp.as_ptr(),
            acl.as_ptr(),
            buf.as_mut_ptr() as *mut _,
            buf.len(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );
    assert_eq!(unsafe { libc::removexattr(cp.as_ptr(), name.as_ptr()) }, 0);
    assert_eq!(unsafe { libc::removexattr(cp.as_ptr(), name.as_ptr()) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA)
    );
}

#[test]
fn open_unlinked_file_stays_readable_until_close() {
    require_root!();
    // No history kept past a second: the removed file leaves the trash at
    // the next retention round (once a second here).
    let mut d = Device::init("alice");
    d.set_config("versions_max_age_days", "0");
    d.set_config("versions_prune_s", "1");
    d.mount();
    let p = d.path("tmp");
    let data = bytes(300_000, 7);
    fs::write(&p, &data).unwrap();
    let mut f = File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
    drop(f);
    // It is in the trash, then, once it expires, its content is collected.
    let dp = d.path("tmp");
    let o = common::meshfs(&["versions", dp.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(
        v["files"][0]["deleted"].is_object(),
        "not in the trash: {v}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = d.status_json();
        if s["cache_bytes"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired content not collected: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn readdir_lists_large_directories_with_stable_offsets() {
    require_root!();
    let d = Device::start("alice");
    fs::create_dir(d.path("big")).unwrap();
    for i in 0..3000 {
        File::create(d.path(&format!("big/f{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(d.path("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3000);
    assert_eq!(names[0], "f00000");

    // Deleting entries while iterating never repeats or skips a survivor.
    let mut seen = std::collections::HashSet::new();
    let mut it = fs::read_dir(d.path("big")).unwrap();
    for i in 0..1500 {
        let e = it.next().unwrap().unwrap();
        assert!(seen.insert(e.file_name()), "repeated entry");
        if i % 2 == 0 {
            fs::remove_file(d.path(&format!("big/f{:05}", 2999 - i))).unwrap();
        }
    }
    for e in it {
        assert!(seen.insert(e.unwrap().file_name()), "repeated entry");
    }
    let now = fs::read_dir(d.path("big")).unwrap().count();
    assert_eq!(now, 3000 - 750);
    assert!(seen.len() >= now);
}

/// Every operation that takes a name refuses a component longer than 255
/// bytes with ENAMETOOLONG, as ext4 does (the kernel hands names of up to
/// 1,024 bytes to FUSE and looks the name up before unlinking, renaming or
/// changing it); a path longer than PATH_MAX is the kernel's ENAMETOOLONG.
#[test]
fn names_over_255_bytes_are_enametoolong_for_every_operation() {
    require_root!();
    let d = Device::start("alice");
    let m = d.mountpoint().to_path_buf();
    fs::write(m.join("f"), b"x").unwrap();
    fs::create_dir(m.join("dir")).unwrap();
    let long = m.join("n".repeat(256));
    let deep = m.join("dir").join("n".repeat(300));
    let ok255 = m.join("y".repeat(255));
    let (lc, dc) = (c(&long), c(&deep));
    let libc_call = |r: i32| {
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    };
    let cases: Vec<(&str, i32)> = vec![
        ("stat", errno_of(fs::metadata(&long))),
        ("lstat", errno_of(fs::symlink_metadata(&deep))),
        ("open", errno_of(File::open(&long))),
        ("create", errno_of(File::create(&long))),
        ("mkdir", errno_of(fs::create_dir(&long))),
        ("rmdir", errno_of(fs::remove_dir(&long))),
        ("unlink", errno_of(fs::remove_file(&deep))),
        ("rename from", errno_of(fs::rename(&long, m.join("g")))),
        ("rename to", errno_of(fs::rename(m.join("f"), &long))),
        ("link", errno_of(fs::hard_link(m.join("f"), &long))),
        ("symlink", errno_of(std::os::unix::fs::symlink("f", &long))),
        ("readlink", errno_of(fs::read_link(&long))),
        (
            "chmod",
            errno_of(fs::set_permissions(
                &long,
                fs::Permissions::from_mode(0o600),
            )),
        ),
        (
            "chown",
            libc_call(unsafe { libc::chown(lc.as_ptr(), 1, 1) }),
        ),
        (
            "truncate",
            libc_call(unsafe { libc::truncate(dc.as_ptr(), 0) }),
        ),
        (
            "utimes",
            libc_call(unsafe { libc::utimes(lc.as_ptr(), std::ptr::null()) }),
        ),
        (
            "mknod",
            libc_call(unsafe { libc::mknod(lc.as_ptr(), libc::S_IFIFO | 0o644, 0) }),
        ),
        (
            "setxattr",
            libc_call(unsafe {
                libc::setxattr(lc.as_ptr(), c"user.a".as_ptr(), b"v".as_ptr().cast(), 1, 0)
            }),
        ),
        (
            "access",
            libc_call(unsafe { libc::access(lc.as_ptr(), libc::R_OK) }),
        ),
        (
            "path over PATH_MAX",
            errno_of(fs::metadata(m.join("a/".repeat(2100)).join("f"))),
        ),
    ];
    let wrong: Vec<_> = cases
        .iter()
        .filter(|(_, e)| *e != libc::ENAMETOOLONG)
        .collect();
    assert!(wrong.is_empty(), "not ENAMETOOLONG: {wrong:?}");
    // Nothing was made or changed, and 255 bytes is a name.
    assert_eq!(fs::read(m.join("f")).unwrap(), b"x");
    assert_eq!(fs::metadata(m.join("f")).unwrap().mode() & 0o777, 0o644);
    fs::write(&ok255, b"255").unwrap();
    assert_eq!(fs::read(&ok255).unwrap(), b"255");
    let mut names: Vec<_> = fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().len())
        .collect();
    names.sort();
    assert_eq!(names, vec![1, 3, 255]);
}

fn pt(d: &Device, what: &str) -> u64 {
    d.passthrough(what)
}

#[test]
fn complete_files_are_read_by_passthrough_and_readers_see_local_writes() {
    require_root!();
    let mut d = Device::start("pat");
    assert_eq!(d.status_json()["passthrough"]["enabled"], true);
    let v1 = bytes(4 << 20, 11);
    fs::write(d.path("big"), &v1).unwrap();
    // Below passthrough_min_kb: never a backing file.
    fs::write(d.path("small"), b"small file").unwrap();
    assert_eq!(fs::read(d.path("small")).unwrap(), b"small file");
    // The first open reads through the daemon and asks for a copy.
    assert_eq!(fs::read(d.path("big")).unwrap(), v1);
    assert_eq!(pt(&d, "opens_passthrough"), 0);
    d.wait_passthrough("big");
    assert_eq!(pt(&d, "backing_files"), 1);

    // A reader is answered with passthrough (the kernel accepted it: the
    // open succeeded) and reads the version.
    let pt0 = pt(&d, "opens_passthrough");
    let r1 = File::open(d.path("big")).unwrap();
    assert_eq!(pt(&d, "opens_passthrough"), pt0 + 1);
    let mut got = vec![0u8; v1.len()];
    r1.read_exact_at(&mut got, 0).unwrap();
    assert!(got == v1, "passthrough read differs");

    // A writer while it is open joins it (the kernel allows nothing else)
    // and writes into the backing file: the reader sees each write at once
    // (POSIX on one device), an extension included.
    let w = OpenOptions::new().write(true).open(d.path("big")).unwrap();
    assert_eq!(pt(&d, "opens_passthrough"), pt0 + 2);
    let patch = bytes(1 << 20, 12);
    w.write_all_at(&patch, 1 << 20).unwrap();
    w.write_all_at(b"tail", 4 << 20).unwrap();
    let mut seen = vec![0u8; 1 << 20];
    r1.read_exact_at(&mut seen, 1 << 20).unwrap();
    assert!(seen == patch, "the passthrough reader missed a write");
    let mut tail = [0u8; 4];
    r1.read_exact_at(&mut tail, 4 << 20).unwrap();
    assert_eq!(&tail, b"tail");
    assert_eq!(fs::metadata(d.path("big")).unwrap().len(), (4 << 20) + 4);
    drop(w);
    let mut v2 = v1.clone();
    v2[1 << 20..2 << 20].copy_from_slice(&patch);
    v2.extend_from_slice(b"tail");
    // The writer's close committed the file from the backing file.
    assert_eq!(pt(&d, "commits_from_backing"), 1);
    let r2 = File::open(d.path("big")).unwrap();
    let mut got = Vec::new();
    (&r2).read_to_end(&mut got).unwrap();
    assert!(got == v2, "second reader");
    // A writer that writes nothing makes no version.
    let versions = || fs::read_dir(d.path(".meshfs/versions/big")).map_or(0, |r| r.count());
    let before = versions();
    drop(OpenOptions::new().write(true).open(d.path("big")).unwrap());
    assert_eq!(pt(&d, "commits_from_backing"), 1);
    assert_eq!(versions(), before);
    drop((r1, r2));
    // Closed everywhere: what another program reads is the new version.
    assert!(fs::read(d.path("big")).unwrap() == v2, "after close");

    // A new version replaces the copy; a reader never gets an older one.
    fs::write(d.path("big"), &v1).unwrap();
    assert_eq!(fs::read(d.path("big")).unwrap(), v1);
    d.wait_passthrough("big");
    assert_eq!(fs::read(d.path("big")).unwrap(), v1);
    let trunc = OpenOptions::new().write(true).open(d.path("big")).unwrap();
    trunc.set_len(3 << 20).unwrap();
    drop(trunc);
    assert!(
        fs::read(d.path("big")).unwrap() == v1[..3 << 20],
        "after truncate"
    );

    // Copies outlive the daemon; one of the wrong size is not used.
    fs::write(d.path("big"), &v1).unwrap();
    d.wait_passthrough("big");
    fs::copy(d.path("big"), d.path("big2")).unwrap();
    d.wait_passthrough("big2");
    d.unmount();
    let backing = d.data_dir().join("backing");
    let mut copies: Vec<_> = fs::read_dir(&backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    copies.sort();
    assert_eq!(copies.len(), 2, "{copies:?}");
    // Damage one of the two (which one does not matter: both hold v1).
    OpenOptions::new()
        .write(true)
        .open(&copies[0])
        .unwrap()
        .set_len(1)
        .unwrap();
    d.mount();
    for name in ["big", "big2"] {
        assert!(
            fs::read(d.path(name)).unwrap() == v1,
            "{name} after remount"
        );
    }
    assert_eq!(pt(&d, "opens_passthrough"), 1, "the intact copy only");
}

#[test]
fn the_daemon_log_is_rotated_by_size() {
    require_root!();
    let mut d = Device::init("logger");
    d.set_config("log_max_mb", "1");
    d.set_config("log_keep", "1");
    // Trace level: Raft heartbeats and the mesh fill a MiB in seconds.
    let o = d.try_mount_env(&[], &[("MESHFS_LOG", "trace")]);
    assert!(o.status.success(), "mount: {}", common::stderr(&o));
    let log = d.data_dir().join("meshfs.log");
    let old = d.data_dir().join("meshfs.log.1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !old.exists() {
        fs::write(d.path("f"), b"activity").unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "never rotated: {} bytes",
            fs::metadata(&log).map_or(0, |m| m.len())
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Keep going past a second rotation: still one older file, each at
    // most the limit (plus the line that crossed it).
    let first = fs::read(&old).unwrap();
    while fs::read(&old).unwrap() == first {
        fs::write(d.path("f"), b"activity").unwrap();
        assert!(std::time::Instant::now() < deadline, "no second rotation");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!d.data_dir().join("meshfs.log.2").exists());
    for p in [&log, &old] {
        let len = fs::metadata(p).unwrap().len();
        assert!(len <= (1 << 20) + 65536, "{}: {len}", p.display());
    }
    // The daemon still logs to the current file.
    assert!(fs::metadata(&log).unwrap().len() > 0);
    d.unmount();
}
