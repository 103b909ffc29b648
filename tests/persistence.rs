//! Data survives unmount and remount, a restart right after unmount, and a
//! `kill -9` of the daemon after fsync; a dead daemon's stale mount is
//! cleared by the next `meshfs mount`, or by the mount watcher when the
//! dead daemon's /dev/fuse stays open.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{bytes, Device};

#[test]
fn everything_survives_unmount_and_remount() {
    require_root!();
    let mut d = Device::start("alice");
    let big = bytes(2 << 20, 3);
    fs::create_dir_all(d.path("a/b")).unwrap();
    fs::write(d.path("a/b/big"), &big).unwrap();
    fs::write(d.path("small"), b"small").unwrap();
    std::os::unix::fs::symlink("a/b/big", d.path("link")).unwrap();
    fs::hard_link(d.path("small"), d.path("small2")).unwrap();
    std::os::unix::fs::chown(d.path("small"), Some(42), Some(43)).unwrap();
    let ino = fs::metadata(d.path("a/b/big")).unwrap().ino();

    // `umount` stops the daemon promptly, and an immediate remount works.
    let t = Instant::now();
    d.unmount();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "unmount took {:?}",
        t.elapsed()
    );
    d.mount();

    assert_eq!(fs::read(d.path("a/b/big")).unwrap(), big);
    assert_eq!(fs::metadata(d.path("a/b/big")).unwrap().ino(), ino);
    assert_eq!(fs::read(d.path("link")).unwrap(), big);
    assert_eq!(fs::metadata(d.path("small2")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(d.path("small")).unwrap().uid(), 42);
    // check reads every byte stored and says so on stderr (not a
    // terminal: plain lines, the last one the whole), with the daemon
    // running and without it.
    let dd = d.data_dir();
    let check = || {
        let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "check: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let err = common::stderr(&o);
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.windows(2).all(|w| w[0] != w[1]),
            "a line twice: {err}"
        );
        let last = lines.last().copied().unwrap_or_default().to_string();
        assert!(
            last.starts_with("checking: 2.0 of 2.0 MiB (100%), ") && last.ends_with(" chunks"),
            "{err}"
        );
    };
    check();
    d.unmount();
    check();
}

#[test]
fn fsynced_data_survives_kill_9_and_stale_mount_is_cleared() {
    require_root!();
    let mut d = Device::start("alice");
    let data = bytes(1 << 20, 9);
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(d.path("durable"))
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    fs::create_dir(d.path("dir-before-kill")).unwrap();
    // A file whose writes were never fsynced nor closed may be lost; the
    // fsynced one must not be.
    d.kill9();
    drop(f);
    let err = fs::metadata(d.path("durable")).unwrap_err();
    // The kernel says ENOTCONN, or ECONNABORTED for a request it had queued.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
        ),
        "expected a dead mount, got {err}"
    );

    d.mount();
    assert_eq!(fs::read(d.path("durable")).unwrap(), data);
    assert!(d.path("dir-before-kill").is_dir());
    assert!(d.log().contains("stale") || common::is_mounted(d.mountpoint()));
}

#[test]
fn closed_files_survive_kill_9() {
    require_root!();
    let mut d = Device::start("alice");
    for i in 0..50 {
        fs::write(d.path(&format!("f{i}")), format!("content {i}")).unwrap();
    }
    d.kill9();
    d.mount();
    for i in 0..50 {
        assert_eq!(
            fs::read_to_string(d.path(&format!("f{i}"))).unwrap(),
            format!("content {i}")
        );
    }
}

/// A daemon killed while one of its threads sleeps in the kernel on a lock
/// held by a request it will now never answer cannot finish dying: its
/// /dev/fuse stays open and every program touching the mount hangs. The
/// test makes that state on purpose by holding a duplicate of the daemon's
/// /dev/fuse (pidfd_getfd), then kills it: the mount watcher must abort
/// the connection by itself, with no `meshfs mount` run.
#[test]
fn a_killed_daemon_whose_fuse_device_stays_open_leaves_no_hung_mount() {
    require_root!();
    let mut d = Device::start("alice");
    fs::write(d.path("f"), "x").unwrap();
    let pid = d.pid().expect("daemon pid");
    let fuse_fd = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/fuse")))
        .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .expect("the daemon holds /dev/fuse");
    // SAFETY: plain syscalls on a pid and fd numbers; results checked.
    let held = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fuse_fd, 0) as i32;
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        libc::close(pidfd);
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    d.kill9();
    // Asked from a thread: without the watcher this stat never returns.
    let (tx, rx) = std::sync::mpsc::channel();
    let p = d.path("f");
    std::thread::spawn(move || {
        let _ = tx.send(fs::metadata(p).map(|_| ()).map_err(|e| e.raw_os_error()));
    });
    let got = rx.recv_timeout(Duration::from_secs(15));
    if got.is_err() {
        // Unblock the stat (and this test's cleanup) before failing.
        common::abort_fuse_connection(d.mountpoint());
    }
    drop(held);
    match got {
        Ok(Err(Some(e))) => assert!(
            e == libc::ENOTCONN || e == libc::ECONNABORTED,
            "expected a dead mount, got errno {e}"
        ),
        other => panic!("the mount of the killed daemon still answered or hung: {other:?}"),
    }
    d.mount();
    assert_eq!(fs::read(d.path("f")).unwrap(), b"x");
}
