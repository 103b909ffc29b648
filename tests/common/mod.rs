//! Test actors: named devices, each a real `meshfs` daemon process with its
//! own data dir and mount point, cleaned up on drop even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const MESHFS: &str = env!("CARGO_BIN_EXE_meshfs");

/// Mount tests need root (mount(2), /dev/fuse, network namespaces): without
/// it they fail, saying so, rather than pass having tested nothing. The
/// README's test command runs them as root.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test needs root (FUSE mounts, network namespaces): run the README's test command"
        );
    };
}

pub fn meshfs(args: &[&str]) -> Output {
    Command::new(MESHFS)
        .args(args)
        .env(
            "MESHFS_LOG",
            std::env::var("MESHFS_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .output()
        .expect("run meshfs")
}

/// Closes `f` and returns close's error, which dropping a `File` ignores:
/// a save is acknowledged only when its close succeeded (the commit of a
/// version happens at close, and may fail there: a daemon killed between
/// a program's write and its close fails the close, not the write).
pub fn close(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor is ours alone and closed once.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub struct Device {
    pub name: String,
    data: tempfile::TempDir,
    /// `data/d`, unless the test placed it elsewhere (on LazyFS, say).
    data_dir: PathBuf,
    mnt: tempfile::TempDir,
    mounted: bool,
}

impl Device {
    /// A device whose data dir (`data/d`) does not exist yet.
    fn blank(name: &str) -> Self {
        let dir = |what: &str| {
            tempfile::Builder::new()
                .prefix(&format!("meshfs-{name}-{what}-"))
                .tempdir()
                .unwrap()
        };
        let data = dir("data");
        Device {
            name: name.into(),
            data_dir: data.path().join("d"),
            data,
            mnt: dir("mnt"),
            mounted: false,
        }
    }

    /// Sets one top-level key of the device's config.toml (before any
    /// table, where TOML wants it); the daemon reads it at its next mount.
    #[allow(dead_code)]
    pub fn set_config(&self, key: &str, value: &str) {
        let path = self.data_dir().join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(String::from)
            .collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with('['))
            .unwrap_or(lines.len());
        lines.insert(at, format!("{key} = {value}"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }

    /// A fresh, initialised, not yet mounted device.
    pub fn init(name: &str) -> Self {
        Self::init_with(Self::blank(name))
    }

    /// Like `init`, with the data dir at `parent/NAME` (a directory on
    /// another filesystem, such as a LazyFS mount).
    pub fn init_in(name: &str, parent: &Path) -> Self {
        let mut d = Self::blank(name);
        d.data_dir = parent.join(name);
        Self::init_with(d)
    }

    fn init_with(d: Self) -> Self {
        let name = d.name.clone();
        let dd = d.data_dir();
        let o = meshfs(&["init", "--data-dir", dd.to_str().unwrap(), "--name", &name]);
        assert!(o.status.success(), "init failed: {}", stderr(&o));
        d
    }

    /// A device that joins a mesh with an invite code (not yet mounted).
    pub fn join(name: &str, code: &str) -> Self {
        let d = Self::try_join(name, code);
        match d {
            Ok(d) => d,
            Err(e) => panic!("join failed: {e}"),
        }
    }

    /// Like `join`, returning the command's error line on failure.
    pub fn try_join(name: &str, code: &str) -> Result<Self, String> {
        Self::try_join_with(Self::blank(name), code)
    }

    /// Like `join`, with the data dir at `parent/NAME`.
    pub fn join_in(name: &str, code: &str, parent: &Path) -> Self {
        let mut d = Self::blank(name);
        d.data_dir = parent.join(name);
        Self::try_join_with(d, code).unwrap_or_else(|e| panic!("join failed: {e}"))
    }

    fn try_join_with(d: Self, code: &str) -> Result<Self, String> {
        let dd = d.data_dir();
        let o = meshfs(&[
            "join",
            code,
            "--data-dir",
            dd.to_str().unwrap(),
            "--name",
            &d.name,
        ]);
        if !o.status.success() {
            return Err(stderr(&o));
        }
        Ok(d)
    }

    /// A device whose data dir is a copy of `src`'s (same identity, same
    /// keys), not mounted: for tests that tamper with a copy.
    pub fn copy_of(src: &Device, name: &str) -> Self {
        let d = Self::blank(name);
        let o = Command::new("cp")
            .arg("-a")
            .arg(src.data_dir())
            .arg(d.data_dir())
            .output()
            .unwrap();
        assert!(o.status.success(), "copy failed: {}", stderr(&o));
        d
    }

    /// A fresh one-time invite code from this (mounted) device.
    pub fn invite(&self, ttl: &str) -> String {
        let dd = self.data_dir();
        let o = meshfs(&["invite", "--data-dir", dd.to_str().unwrap(), "--ttl", ttl]);
        assert!(
            o.status.success(),
            "invite failed: {}\ndaemon pid {:?} alive: {:?}\nlog:\n{}",
            stderr(&o),
            self.pid(),
            self.pid().map(alive),
            self.log()
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// One request to the daemon's control socket.
    pub fn control(&self, req: &meshfs::control::Request) -> Result<serde_json::Value, String> {
        meshfs::control::request(&self.data_dir(), req).map_err(|e| e.to_string())
    }

    /// Waits until this device sees every named device connected.
    pub fn wait_connected(&self, names: &[&str], limit: Duration) {
        let t = Instant::now();
        loop {
            let st = self.status_json();
            let up: Vec<String> = st["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["up"].as_bool() == Some(true))
                .filter_map(|d| d["name"].as_str().map(str::to_string))
                .collect();
            if names.iter().all(|n| up.iter().any(|u| u == n)) {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "{} sees only {up:?} up, wanted {names:?}\nlog:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An initialised device, mounted.
    pub fn start(name: &str) -> Self {
        let mut d = Self::init(name);
        d.mount();
        d
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
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
        self.try_mount_env(extra, &[])
    }

    /// Mounts with extra environment for the daemon (fault hooks).
    pub fn try_mount_env(&mut self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let dd = self.data_dir();
        let mut args = vec![
            "mount",
            "--data-dir",
            dd.to_str().unwrap(),
            self.mnt.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(MESHFS)
            .args(&args)
            .env(
                "MESHFS_LOG",
                std::env::var("MESHFS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .output()
            .expect("run meshfs");
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

    /// A power cut as this device sees it: the daemon is killed and its
    /// kernel connection aborted at once, so no request in flight is
    /// answered after the cut.
    pub fn crash(&mut self) {
        let pid = self.pid().expect("daemon pid");
        unsafe { libc::kill(pid, libc::SIGKILL) };
        abort_fuse_connection(self.mnt.path());
        wait_exit(pid, Duration::from_secs(10));
    }

    /// Files this device holds completely, as it announces them.
    pub fn own_holdings(&self) -> u64 {
        let s = self.status_json();
        s["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == self.name.as_str())
            .map_or(0, |x| x["holdings"].as_u64().unwrap_or(0))
    }

    /// `meshfs status`'s passthrough counter `what`.
    #[allow(dead_code)]
    pub fn passthrough(&self, what: &str) -> u64 {
        self.status_json()["passthrough"][what]
            .as_u64()
            .unwrap_or_else(|| panic!("no passthrough.{what} in status"))
    }

    /// Opens `rel` for reading until the open is answered with passthrough
    /// (its backing copy is made in the background after a first open).
    #[allow(dead_code)]
    pub fn wait_passthrough(&self, rel: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let before = self.passthrough("opens_passthrough");
            drop(std::fs::File::open(self.path(rel)).unwrap());
            if self.passthrough("opens_passthrough") > before {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{rel} never opened by passthrough on {}: {}",
                self.name,
                self.status_json()["passthrough"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let dd = self.data_dir();
        let o = meshfs(&["status", "--data-dir", dd.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "status failed: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

/// Alpha (the founder) and the others joined to it, each with its own
/// config settings, all mounted and connected to each other.
#[allow(dead_code)]
pub fn mesh(limit: Duration, devices: &[(&str, &[(&str, &str)])]) -> Vec<Device> {
    let mut out: Vec<Device> = Vec::new();
    for (name, settings) in devices {
        let mut d = match out.first() {
            None => Device::init(name),
            Some(founder) => Device::join(name, &founder.invite("10m")),
        };
        for (k, v) in settings.iter() {
            d.set_config(k, v);
        }
        d.mount();
        out.push(d);
    }
    let names: Vec<&str> = devices.iter().map(|(n, _)| *n).collect();
    for d in &out {
        d.wait_connected(&names, limit);
    }
    out
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
        // A failing test's daemon logs would go with its temporary dirs:
        // keep them where the failure can be read afterwards.
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join("meshfs-test-failures");
            let test = std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-");
            let file = keep.join(format!("{test}-{}.log", self.name));
            if std::fs::create_dir_all(&keep).is_ok() && std::fs::write(&file, self.log()).is_ok() {
                eprintln!("{}'s daemon log kept in {}", self.name, file.display());
            }
        }
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

/// Aborts the FUSE connection of the mount at `p` through fusectl (mounted
/// here if it is not yet), as a power cut ends every request in flight;
/// its number is the mount's device minor, read from mountinfo so that
/// nothing touches the mount.
pub fn abort_fuse_connection(p: &Path) {
    if let Some(conn) = meshfs::mountinfo::fuse_connection(p) {
        meshfs::node::abort_fuse_connection(conn);
    }
}

/// Every task in uninterruptible sleep, with its kernel stack: what a
/// hung test is waiting on. Reads only `stat`, `comm` and `stack`, never
/// `cmdline` (which waits behind a page fault stuck in FUSE); even `stat`
/// was seen to wait on such a task, so call it from a thread with a
/// timeout.
pub fn blocked_tasks() -> String {
    let mut out = String::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            if stat.rsplit(") ").next().is_some_and(|r| r.starts_with('D')) {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                out += &format!(
                    "{} task {} ({}):\n{stack}",
                    p.file_name().to_string_lossy(),
                    t.file_name().to_string_lossy(),
                    comm.trim()
                );
            }
        }
    }
    out
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

/// Every device tries to create `rel` exclusively (O_CREAT|O_EXCL) at the
/// same moment; one result per device, in order.
pub fn race_create(devices: &[&Device], rel: &str) -> Vec<std::io::Result<std::fs::File>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = devices
            .iter()
            .map(|d| {
                let p = d.path(rel);
                s.spawn(move || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(p)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
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

fn db_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("db")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// Flips one byte of the first copy of `needle` found in the store's files,
/// as a bad disk would (the daemon must not be running).
pub fn flip_in_db(data_dir: &Path, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    for p in db_files(data_dir) {
        let hay = std::fs::read(&p).unwrap();
        if let Some(pos) = hay.windows(needle.len()).position(|w| w == needle) {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&[hay[pos + 10] ^ 0x40], (pos + 10) as u64)
                .unwrap();
            return true;
        }
    }
    false
}
