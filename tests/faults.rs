//! Bad disks: a byte flipped in RocksDB's files gives EIO for that file's
//! range with a log line naming the chunk, while other files still read; a
//! full disk gives ENOSPC without corrupting what was stored.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;

use common::{bytes, flip_in_db, Device};

#[test]
fn corrupted_chunk_gives_eio_and_names_the_chunk() {
    require_root!();
    // No history kept past a second, so that the deleted file leaves the
    // trash (and the store) at the next retention round.
    let mut d = Device::init("alice");
    d.set_config("versions_max_age_days", "0");
    d.set_config("versions_prune_s", "1");
    d.mount();
    let victim = bytes(1 << 20, 11);
    let other = bytes(1 << 20, 12);
    fs::write(d.path("victim"), &victim).unwrap();
    fs::write(d.path("other"), &other).unwrap();
    d.unmount();
    // Somewhere in the middle of the victim's content.
    assert!(
        flip_in_db(&d.data_dir(), &victim[600_000..600_064]),
        "content not found in the store"
    );
    d.mount();

    let mut f = fs::File::open(d.path("victim")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Bytes before the damaged chunk still read.
    drop(f);
    let f = fs::File::open(d.path("victim")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, victim[..4096]);
    drop(f);
    assert_eq!(fs::read(d.path("other")).unwrap(), other);
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("corrupt") || l.contains("verification"))
            && log.contains("chunk="),
        "no log line names the chunk:\n{log}"
    );
    // check reports it and fails.
    let dd = d.data_dir();
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
    assert!(!o.status.success());
    // The damaged file can still be deleted, which leaves the store clean
    // once the kernel lets go of the inode (dropping its caches makes it
    // send the FORGET now rather than at some later eviction) and the
    // trash lets go of its content.
    fs::remove_file(d.path("victim")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let _ = fs::write("/proc/sys/vm/drop_caches", "2");
        let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
        if o.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "store not clean after deleting the damaged file: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Unmounts a path when the test ends, even on failure.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if common::is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn full_disk_gives_enospc_and_keeps_stored_data() {
    require_root!();
    let base = tempfile::tempdir().unwrap();
    let small = base.path().join("small");
    fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    let _tmpfs = Unmount(small.clone());
    let dd = small.join("d");
    let mnt = base.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    assert!(
        common::meshfs(&["init", "--data-dir", dd.to_str().unwrap()])
            .status
            .success()
    );
    let mount = || {
        common::meshfs(&[
            "mount",
            "--data-dir",
            dd.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ])
    };
    // Dropped before the tmpfs guard: meshfs goes first.
    let _meshfs = Unmount(mnt.clone());
    let o = mount();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let keep = bytes(256 << 10, 5);
    fs::write(mnt.join("keep"), &keep).unwrap();

    // Fill the disk through the mount.
    let mut f = fs::File::create(mnt.join("big")).unwrap();
    let mut first_err = None;
    for i in 0..200 {
        // Distinct blocks: identical ones would deduplicate and never fill
        // the disk (any fork+exec elsewhere in this process closes a copy of
        // the descriptor, which commits what was written so far).
        let block = bytes(1 << 20, 100 + i);
        if let Err(e) = f.write_all(&block) {
            first_err = Some(e);
            break;
        }
    }
    let close_err = f.sync_all().err();
    drop(f);
    let errno = first_err
        .as_ref()
        .or(close_err.as_ref())
        .and_then(|e| e.raw_os_error());
    assert_eq!(
        errno,
        Some(libc::ENOSPC),
        "filling the disk must report ENOSPC, got {first_err:?} {close_err:?}"
    );

    // What was stored before is intact, now and after a restart.
    assert_eq!(fs::read(mnt.join("keep")).unwrap(), keep);
    // Deleting gives the space back: the removed file goes to the trash,
    // which gives way (the oldest history is dropped) while the disk is
    // short of space; at the latest once the daemon restarts and compacts
    // what it could not reclaim before.
    fs::remove_file(mnt.join("big")).unwrap();
    let pid: i32 = fs::read_to_string(dd.join("meshfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    common::wait_exit(pid, std::time::Duration::from_secs(20));
    let o = mount();
    assert!(
        o.status.success(),
        "remount after ENOSPC: {}",
        common::stderr(&o)
    );
    assert_eq!(fs::read(mnt.join("keep")).unwrap(), keep);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fs::write(mnt.join("after"), b"space again").is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if let Err(e) = fs::write(mnt.join("after"), b"space again") {
        let diag = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "df -k {0}; ls -la {0}/d/db {0}/d/spill; tail -5 {0}/d/meshfs.log",
                small.display()
            ))
            .output()
            .unwrap();
        panic!(
            "write after freeing space: {e}\n{}",
            String::from_utf8_lossy(&diag.stdout)
        );
    }
    assert_eq!(fs::read(mnt.join("after")).unwrap(), b"space again");
    let pid: i32 = fs::read_to_string(dd.join("meshfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = Command::new("umount").arg(&mnt).status();
    common::wait_exit(pid, std::time::Duration::from_secs(10));
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "check after ENOSPC: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A Raft log entry that cannot be read (damaged, or written by another
/// build) stops Raft on that device, never silently: the log says so, `meshfs
/// status` says why, changes are refused with EIO, what is there stays
/// readable; restarted without the cause, the device goes on and nothing
/// it acknowledged is lost. The damage is the test hook
/// `MESHFS_FAULT=raft-log-unreadable-from=N`.
#[test]
fn an_unreadable_raft_log_entry_stops_raft_loudly_and_a_restart_resumes() {
    require_root!();
    let mut d = Device::start("alice");
    fs::write(d.path("before"), b"kept").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let last = d.status_json()["raft"]["last_log_index"].as_u64().unwrap();
    d.unmount();
    let fault = format!("raft-log-unreadable-from={}", last + 2);
    let o = d.try_mount_env(&[], &[("MESHFS_FAULT", &fault)]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    // Changes made here are applied at once and committed in batches; the
    // first batch past the damage stops Raft.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut acknowledged = Vec::new();
    let why = loop {
        assert!(std::time::Instant::now() < deadline, "raft never stopped");
        let name = format!("f{}", acknowledged.len());
        match fs::write(d.path(&name), name.as_bytes()) {
            Ok(()) => acknowledged.push(name),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
        if let Some(w) = d.status_json()["raft"]["stopped"].as_str() {
            break w.to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(why.contains("could not be decoded"), "{why}");
    assert!(
        d.log().contains("raft stopped on this device"),
        "{}",
        d.log()
    );
    let text = common::meshfs(&["status", "--data-dir", d.data_dir().to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("RAFT STOPPED"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    // Changes are refused; what is here reads.
    let e = fs::write(d.path("after-stop"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(fs::read(d.path("before")).unwrap(), b"kept");
    assert!(common::alive(d.pid().unwrap()));
    // Restarted without the damage: it goes on, and every change it
    // acknowledged before it stopped is there and commits.
    d.unmount();
    d.mount();
    assert!(d.status_json()["raft"]["stopped"].is_null());
    for name in &acknowledged {
        assert_eq!(fs::read(d.path(name)).unwrap(), name.as_bytes(), "{name}");
    }
    assert!(!d.path("after-stop").exists());
    fs::write(d.path("after-restart"), b"ok").unwrap();
    d.unmount();
    let o = common::meshfs(&["check", "--data-dir", d.data_dir().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
