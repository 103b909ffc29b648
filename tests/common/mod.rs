//! Test actors: named devices, each a real `meshfs` daemon process with its
//! own data dir and mount point, cleaned up on drop even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const MESHFS: &str = env!("CARGO_BIN_EXE_meshfs");

/// Mount tests need root (mount(2) and /dev/fuse); without it they say so
/// and pass vacuously, which CI (root) never does.
#[macro_export]
macro_rules! require_root {
    () => {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for FUSE mounts");
            return;
        }
    };
}

pub fn meshfs(args: &[&str]) -> Output {
    Command::new(MESHFS)
        .args(args)
        .env("MESHFS_LOG", "info")
        .output()
        .expect("run meshfs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub struct Device {
    pub name: String,
    data: tempfile::TempDir,
    mnt: tempfile::TempDir,
    mounted: bool,
}

impl Device {
    /// A fresh, initialised, not yet mounted device.
    pub fn init(name: &str) -> Self {
        let data = tempfile::Builder::new()
            .prefix(&format!("meshfs-{name}-data-"))
            .tempdir()
            .unwrap();
        let mnt = tempfile::Builder::new()
            .prefix(&format!("meshfs-{name}-mnt-"))
            .tempdir()
            .unwrap();
        let d = data.path().join("d");
        let o = meshfs(&["init", "--data-dir", d.to_str().unwrap(), "--name", name]);
        assert!(o.status.success(), "init failed: {}", stderr(&o));
        Device {
            name: name.into(),
            data,
            mnt,
            mounted: false,
        }
    }

    /// An initialised device, mounted.
    pub fn start(name: &str) -> Self {
        let mut d = Self::init(name);
        d.mount();
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("d")
    }

    pub fn mountpoint(&self) -> &Path {
        self.mnt.path()
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    pub fn mount(&mut self) {
        self.mount_with(&[]);
    }

    pub fn mount_with(&mut self, extra: &[&str]) {
        let o = self.try_mount(extra);
        assert!(
            o.status.success(),
            "mount failed: {}\nlog:\n{}",
            stderr(&o),
            self.log()
        );
        self.mounted = true;
    }

    pub fn try_mount(&mut self, extra: &[&str]) -> Output {
        let dd = self.data_dir();
        let mut args = vec![
            "mount",
            "--data-dir",
            dd.to_str().unwrap(),
            self.mnt.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = meshfs(&args);
        if o.status.success() {
            self.mounted = true;
        }
        o
    }

    pub fn mark_mounted(&mut self) {
        self.mounted = true;
    }

    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir().join("meshfs.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("meshfs.log")).unwrap_or_default()
    }

    /// `umount`, then wait for the daemon to exit.
    pub fn unmount(&mut self) {
        let pid = self.pid();
        let o = Command::new("umount")
            .arg(self.mnt.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "umount failed: {}", stderr(&o));
        self.mounted = false;
        if let Some(pid) = pid {
            wait_exit(pid, Duration::from_secs(15));
        }
    }

    /// SIGKILL the daemon, leaving a dead mount, as a crash would.
    pub fn kill9(&mut self) {
        let pid = self.pid().expect("daemon pid");
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_exit(pid, Duration::from_secs(10));
    }

    pub fn status_json(&self) -> serde_json::Value {
        let dd = self.data_dir();
        let o = meshfs(&["status", "--data-dir", dd.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "status failed: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn wait_exit(pid: i32, limit: Duration) {
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < limit,
            "daemon {pid} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Unmount before the temp dirs are removed, or their removal would
        // walk into the mounted filesystem.
        let pid = self.pid();
        if self.mounted || crate_is_mounted(self.mnt.path()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.mnt.path())
                .output();
        }
        if let Some(pid) = pid {
            if alive(pid) {
                let deadline = Instant::now() + Duration::from_secs(5);
                while alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn crate_is_mounted(p: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

pub fn is_mounted(p: &Path) -> bool {
    crate_is_mounted(p)
}

/// The fs type /proc/mounts shows for `p`.
pub fn fstype(p: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let want = p.to_string_lossy();
    mounts
        .lines()
        .rfind(|l| l.split(' ').nth(1) == Some(&want))
        .and_then(|l| l.split(' ').nth(2).map(str::to_string))
}

/// A deterministic pseudo-random byte sequence.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
