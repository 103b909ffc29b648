//! Power loss (issue 19 item 5): every device's data dir lives on LazyFS,
//! a FUSE filesystem that keeps written data in its own cache until the
//! file is fsynced and drops what is not on command ("clear-cache"), as a
//! power cut drops the page cache. A cut here is `kill -9` of the daemon
//! followed by that drop. Writers save files while the cut can come at any
//! moment; after each restart every save that an `fsync` (of the file, or
//! of its directory after a rename or unlink) acknowledged must be there
//! with its bytes, every other file must hold one whole version that some
//! program wrote (or be empty or absent, if that was being written), and
//! `meshfs check` must find the store consistent.
//!
//! What LazyFS does not simulate: it loses only file *data*; names
//! (create, rename, unlink) reach the backing directory at once. So the
//! cuts test that RocksDB's WAL and SST contents, Raft's log and the
//! outbox are synced before meshfs acknowledges; they do not test the
//! directory syncs after renames (those are checked by reading the code:
//! `datadir::write_atomic`).
//!
//! The number of cuts: `MESHFS_POWER_CUTS` (one device, default 6) and
//! `MESHFS_MESH_POWER_CUTS` (three devices cut together, default 2);
//! `scripts/power-loss` runs 100 and more.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fstype, Device};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Where scripts/build-lazyfs puts the binary: next to the test binaries.
const LAZYFS: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/../lazyfs/lazyfs");

/// A LazyFS mount over a temporary backing directory, unmounted (and its
/// process stopped) on drop, after the devices on it (declare it first).
struct LazyFs {
    dir: tempfile::TempDir,
    child: Child,
    cuts: usize,
}

impl LazyFs {
    fn start(name: &str) -> Self {
        let bin = Path::new(LAZYFS);
        assert!(
            bin.exists(),
            "LazyFS is not built at {LAZYFS}: run scripts/build (the README's test command does)"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshfs-lazyfs-{name}-"))
            .tempdir()
            .unwrap();
        let root = dir.path();
        for d in ["backing", "mnt"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        let fifo = root.join("faults.fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // Eviction off: LazyFS then never writes unsynced data back by
        // itself, so everything not fsynced is lost at a cut.
        fs::write(
            root.join("config.toml"),
            format!(
                "[faults]\nfifo_path=\"{}\"\n[cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"2gb\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                fifo.display()
            ),
        )
        .unwrap();
        let log = fs::File::create(root.join("lazyfs.log")).unwrap();
        let child = Command::new(bin)
            .arg(root.join("mnt"))
            .arg("--config-path")
            .arg(root.join("config.toml"))
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", root.join("backing").display()))
            .arg("-f")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start lazyfs");
        let mut me = LazyFs {
            dir,
            child,
            cuts: 0,
        };
        let t = Instant::now();
        while fstype(&me.root()).as_deref() != Some("fuse.lazyfs") {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "LazyFS did not mount:\n{}",
                me.log()
            );
            if let Ok(Some(st)) = me.child.try_wait() {
                panic!("LazyFS exited ({st}):\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// The mounted directory where data dirs go.
    fn root(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("lazyfs.log")).unwrap_or_default()
    }

    /// Sends a command to LazyFS's fault FIFO and waits for the log line
    /// that says it was carried out (its `n`th such line).
    fn command(&self, cmd: &str, done: &str, n: usize) -> String {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(self.dir.path().join("faults.fifo"))
            .unwrap();
        f.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        drop(f);
        let t = Instant::now();
        loop {
            let log = self.log();
            if log.matches(done).count() >= n {
                return log;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "LazyFS did not carry out {cmd}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Drops every byte not fsynced. Returns how many there were.
    fn power_cut(&mut self) -> u64 {
        self.cuts += 1;
        let log = self.command(
            "lazyfs::unsynced-data-report",
            "total number of bytes un-fsynced",
            self.cuts,
        );
        let unsynced = log
            .lines()
            .filter_map(|l| l.split("total number of bytes un-fsynced: ").nth(1))
            .nth(self.cuts - 1)
            .and_then(|r| r.trim_end_matches(" bytes.").trim().parse().ok())
            .unwrap_or(0);
        self.command("lazyfs::clear-cache", "cache is cleared", self.cuts);
        unsynced
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.root()).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a name may hold: `None` is absent, else the BLAKE3 of the bytes.
type State = Option<[u8; 32]>;

fn digest(b: &[u8]) -> State {
    Some(*blake3::hash(b).as_bytes())
}

/// One name's history as the writer saw it: the last state a sync
/// acknowledged (or found after a restart), and every state tried since.
#[derive(Default, Clone)]
struct Entry {
    durable: State,
    tried: Vec<State>,
}

impl Entry {
    /// The states a restart may show: the durable one, or one tried since
    /// (whole versions only: meshfs commits a file's content at once), or
    /// empty when something was tried (a create or an O_TRUNC commits an
    /// empty version before the bytes).
    fn allows(&self, s: &State) -> bool {
        *s == self.durable
            || self.tried.contains(s)
            || (!self.tried.is_empty() && *s == digest(b""))
    }
}

#[derive(Default)]
struct Model {
    names: BTreeMap<String, Entry>,
    acknowledged: u64,
    unsynced_lost: u64,
}

impl Model {
    /// Prints a run's figures and checks that its cuts dropped something
    /// (or they tested nothing).
    fn report(&self, what: &str, started: Instant, extra: &str, unsynced_bytes: u64) {
        println!(
            "{what} in {:.0} s, {} acknowledged saves checked, {extra}\
             {} unsynced saves lost as allowed, {unsynced_bytes} bytes LazyFS dropped",
            started.elapsed().as_secs_f64(),
            self.acknowledged,
            self.unsynced_lost
        );
        assert!(
            unsynced_bytes > 0,
            "LazyFS never had unsynced bytes to drop"
        );
    }

    fn try_(&mut self, name: &str, s: State) {
        self.names.entry(name.into()).or_default().tried.push(s);
    }

    fn ack(&mut self, name: &str, s: State) {
        let e = self.names.entry(name.into()).or_default();
        e.durable = s;
        e.tried.clear();
        self.acknowledged += 1;
    }
}

/// What the files under `dir` whose names start with `prefix` hold now.
fn observe(dir: &Path, prefix: &str) -> BTreeMap<String, State> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            let bytes = fs::read(e.path())
                .unwrap_or_else(|err| panic!("reading {name} after the cut: {err}"));
            out.insert(name, digest(&bytes));
        }
    }
    out
}

/// Checks what a device shows against the model, then takes it as the new
/// durable state (the restart's recovery is on disk).
fn verify(model: &mut Model, seen: &BTreeMap<String, State>, prefix: &str, who: &str) {
    let names: BTreeSet<String> = model
        .names
        .keys()
        .filter(|n| n.starts_with(prefix))
        .chain(seen.keys())
        .cloned()
        .collect();
    for name in names {
        let now = seen.get(&name).copied().flatten();
        let e = model.names.entry(name.clone()).or_default();
        let unsynced = name.contains("-u");
        assert!(
            e.allows(&now),
            "{who}: {name} holds {} after the cut; durable was {}, tried since: {}",
            show(&now),
            show(&e.durable),
            e.tried.iter().map(show).collect::<Vec<_>>().join(", ")
        );
        if unsynced && e.tried.last().is_some_and(|t| *t != now) {
            model.unsynced_lost += 1;
        }
        e.durable = now;
        e.tried.clear();
    }
}

fn show(s: &State) -> String {
    match s {
        None => "nothing".into(),
        Some(h) => blake3::Hash::from(*h).to_hex()[..12].to_string(),
    }
}

/// Saves files under `dir` (names `PREFIX-fN`, `PREFIX-uN`) until an
/// operation fails (the daemon was killed) or `stop` is set, recording
/// each try and each acknowledgement in `model`:
/// - write + fsync of `fN`: acknowledged when fsync returns;
/// - an atomic save: `.PREFIX-tN` written and fsynced, renamed over
///   `fN`, the directory fsynced: acknowledged then;
/// - unlink of `fN` and a directory fsync: acknowledged absent;
/// - write + close of `uN`, never synced: may be lost, never torn.
fn writer(dir: &Path, prefix: &str, seed: u64, stop: &AtomicBool, model: &Mutex<Model>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let k = rng.gen_range(0..12);
        let f = format!("{prefix}-f{k}");
        let len = if rng.gen_bool(0.1) {
            rng.gen_range(1 << 20..3 << 20)
        } else {
            rng.gen_range(0..64 << 10)
        };
        buf.resize(len, 0);
        rng.fill(&mut buf[..]);
        let s = digest(&buf);
        let r: std::io::Result<()> = (|| match rng.gen_range(0..10) {
            0..=3 => {
                lock(model).try_(&f, s);
                let mut file = fs::File::create(dir.join(&f))?;
                file.write_all(&buf)?;
                file.sync_all()?;
                drop(file);
                lock(model).ack(&f, s);
                Ok(())
            }
            4..=5 => {
                let tmp = dir.join(format!(".{prefix}-t{k}"));
                let mut file = fs::File::create(&tmp)?;
                file.write_all(&buf)?;
                file.sync_all()?;
                drop(file);
                lock(model).try_(&f, s);
                fs::rename(&tmp, dir.join(&f))?;
                fs::File::open(dir)?.sync_all()?;
                lock(model).ack(&f, s);
                Ok(())
            }
            6 => {
                if lock(model)
                    .names
                    .get(&f)
                    .is_some_and(|e| e.durable.is_some())
                {
                    lock(model).try_(&f, None);
                    fs::remove_file(dir.join(&f))?;
                    fs::File::open(dir)?.sync_all()?;
                    lock(model).ack(&f, None);
                }
                Ok(())
            }
            _ => {
                let u = format!("{prefix}-u{k}");
                lock(model).try_(&u, s);
                fs::write(dir.join(&u), &buf)
            }
        })();
        if r.is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cuts(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Removes the atomic saves' temporary files a cut left behind.
fn sweep_temporaries(dir: &Path) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with('.') && e.path().is_file() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn check_store(d: &Device) {
    let dd = d.data_dir();
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "{}: meshfs check after the cut: {}{}",
        d.name,
        String::from_utf8_lossy(&o.stdout),
        common::stderr(&o)
    );
}

#[test]
fn fsynced_saves_survive_power_cuts_of_one_device() {
    require_root!();
    let n = cuts("MESHFS_POWER_CUTS", 6);
    let mut lazy = LazyFs::start("alpha");
    let mut d = Device::init_in("alpha", &lazy.root());
    // Few old versions, so that the store (which `meshfs check` reads
    // whole after every cut) stays small over a hundred cuts.
    d.set_config("versions_keep", "3");
    d.mount();
    let model = Mutex::new(Model::default());
    let mut rng = SmallRng::seed_from_u64(19);
    let (mut unsynced_bytes, mut closed_checked) = (0u64, 0u64);
    let started = Instant::now();
    for cut in 0..n {
        // Saves closed well before the cut (five sync intervals) survive
        // too: the background WAL sync runs every 200 ms.
        let closed = format!("closed-{cut}");
        let content = common::bytes(100_000, cut as u64);
        fs::write(d.path(&closed), &content).unwrap();
        std::thread::sleep(Duration::from_millis(1000));

        let stop = AtomicBool::new(false);
        let mnt = d.mountpoint().to_path_buf();
        std::thread::scope(|s| {
            let w = s.spawn(|| writer(&mnt, "a", cut as u64, &stop, &model));
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..2000)));
            d.crash();
            unsynced_bytes += lazy.power_cut();
            stop.store(true, Ordering::Relaxed);
            w.join().unwrap();
        });
        d.mount();
        assert_eq!(
            fs::read(d.path(&closed)).ok(),
            Some(content),
            "cut {cut}: a file closed 1 s before the cut was lost"
        );
        closed_checked += 1;
        let seen = observe(d.mountpoint(), "a-");
        verify(&mut lock(&model), &seen, "a-", &format!("cut {cut}"));
        check_store(&d);
        sweep_temporaries(d.mountpoint());
    }
    d.unmount();
    check_store(&d);
    lock(&model).report(
        &format!("power cuts of one device: {n} cuts"),
        started,
        &format!("{closed_checked} closed files checked, "),
        unsynced_bytes,
    );
}

#[test]
fn fsynced_saves_survive_a_power_cut_of_every_device() {
    require_root!();
    let n = cuts("MESHFS_MESH_POWER_CUTS", 2);
    let names = ["alpha", "bravo", "charlie"];
    let mut lazies: Vec<LazyFs> = names.iter().map(|n| LazyFs::start(n)).collect();
    let mut devices: Vec<Device> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut d = match devices.first() {
            None => Device::init_in(name, &lazies[i].root()),
            Some(founder) => Device::join_in(name, &founder.invite("10m"), &lazies[i].root()),
        };
        d.set_config("versions_keep", "3");
        d.mount();
        devices.push(d);
    }
    for d in &devices {
        d.wait_connected(&names, Duration::from_secs(60));
    }
    let model = Arc::new(Mutex::new(Model::default()));
    let mut rng = SmallRng::seed_from_u64(17);
    let mut unsynced_bytes = 0u64;
    let started = Instant::now();
    for cut in 0..n {
        let stop = AtomicBool::new(false);
        let mnts: Vec<PathBuf> = devices.iter().map(|d| d.mountpoint().into()).collect();
        std::thread::scope(|s| {
            let writers: Vec<_> = mnts
                .iter()
                .enumerate()
                .map(|(i, mnt)| {
                    let (stop, model) = (&stop, &model);
                    let prefix = &names[i][..1];
                    s.spawn(move || writer(mnt, prefix, (cut * 3 + i) as u64, stop, model))
                })
                .collect();
            std::thread::sleep(Duration::from_millis(rng.gen_range(500..3000)));
            for d in devices.iter_mut() {
                d.crash();
            }
            for l in lazies.iter_mut() {
                unsynced_bytes += l.power_cut();
            }
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.join().unwrap();
            }
        });
        for d in devices.iter_mut() {
            d.mount();
        }
        for d in &devices {
            d.wait_connected(&names, Duration::from_secs(60));
        }
        // Every device comes to show the same files, each allowed.
        let t = Instant::now();
        let views = loop {
            let views: Vec<BTreeMap<String, State>> = devices
                .iter()
                .map(|d| {
                    let mut v = BTreeMap::new();
                    for p in ["a-", "b-", "c-"] {
                        v.extend(observe(d.mountpoint(), p));
                    }
                    v
                })
                .collect();
            if views.iter().all(|v| *v == views[0]) {
                break views;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "cut {cut}: the devices still disagree after 60 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        };
        let mut m = lock(&model);
        for p in ["a-", "b-", "c-"] {
            let seen: BTreeMap<String, State> = views[0]
                .iter()
                .filter(|(k, _)| k.starts_with(p))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            verify(&mut m, &seen, p, &format!("cut {cut}"));
        }
        drop(m);
        for d in &devices {
            check_store(d);
            sweep_temporaries(d.mountpoint());
        }
    }
    for d in devices.iter_mut() {
        d.unmount();
    }
    lock(&model).report(
        &format!("power cuts of three devices together: {n} cuts"),
        started,
        "",
        unsynced_bytes,
    );
    drop(devices);
    drop(lazies);
}
