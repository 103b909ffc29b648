//! A history checker (issue 19 item 5), in the manner of Jepsen's and
//! Porcupine's checks of etcd: three devices run concurrent clients that
//! write, read, create, rename and unlink, each operation recorded with its
//! start and end on one clock (the devices are processes on this machine),
//! while a nemesis kills a random device with `kill -9` and brings it back.
//! When the run is over and the mesh has settled, the history is checked
//! against what meshfs promises:
//!
//! - **no torn or invented data**: every read returns a value some client
//!   wrote to that file (or its first value);
//! - **close-to-open**: a read that starts after a write to the same file
//!   closed returns that write's version or a later one (by the file's
//!   version history), for every such pair outside the windows where a
//!   device was down (then a device that cannot reach a file's authority
//!   serves what it has, as documented), and except a read while a
//!   writer on the reader's own device had the file open (it shares that
//!   writer's copy, as on AFS; counted apart);
//! - **one winner per name**: of the devices creating one name with
//!   O_EXCL at the same moment, exactly one succeeds and the name holds its
//!   bytes (rounds outside the windows; within them a cut-off device's
//!   create may become a conflict copy, which the next check covers);
//! - **no acknowledged write lost**: every write whose close returned
//!   success is, at the end, the current content or a kept version of some
//!   file or a conflict copy, unless a later acknowledged unlink removed
//!   its file (and then `meshfs versions` lists the removed file), or a
//!   later save of the same file on the same device, both while a device
//!   was down, made them one tentative change (counted apart);
//! - **renames are atomic**: a file moved back and forth between two names
//!   is under exactly one of them at the end.
//!
//! Partitions are not in this test's nemesis yet: tests/netns.rs covers
//! them separately (its randomized test is still `#[ignore]`d, issue 17).
//! Length: `MESHFS_HISTORY_S` seconds of operations (default 20).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{close, Device};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NAMES: [&str; 3] = ["alpha", "bravo", "charlie"];
const KEYS: usize = 4;

#[derive(Clone, Debug)]
enum Kind {
    /// Overwrites the whole (fixed-length) file in place, then closes.
    Write,
    /// Opens, reads everything, closes.
    Read,
    /// O_CREAT|O_EXCL, writes, closes.
    Create,
    /// `path` is "FROM -> TO".
    Rename,
    Unlink,
}

#[derive(Clone, Debug)]
struct Op {
    dev: usize,
    kind: Kind,
    path: String,
    /// What a write or create wrote, or what a read returned.
    value: Option<String>,
    start: Duration,
    end: Duration,
    /// `None`: it returned success; else the error (the operation may or
    /// may not have taken effect).
    error: Option<String>,
}

impl Op {
    fn ok(&self) -> bool {
        self.error.is_none()
    }
}

struct Recorder {
    t0: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Runs `f` as operation `kind` on `path`, recording its interval and
    /// outcome; `f` returns what it read, if it reads.
    fn run(
        &self,
        dev: usize,
        kind: Kind,
        path: &str,
        wrote: Option<String>,
        f: impl FnOnce() -> std::io::Result<Option<String>>,
    ) -> bool {
        let start = self.now();
        let r = f();
        let end = self.now();
        let (value, error) = match r {
            Ok(read) => (read.or(wrote), None),
            Err(e) => (wrote, Some(e.to_string())),
        };
        let ok = error.is_none();
        lock(&self.ops).push(Op {
            dev,
            kind,
            path: path.into(),
            value,
            start,
            end,
            error,
        });
        ok
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every value has one length, so a write is one pwrite over the whole
/// file and makes exactly one version (no truncate in between).
fn value(dev: usize, client: usize, seq: u64) -> String {
    format!("{}{client}-{seq:010}\n", &NAMES[dev][..1])
}

fn key(k: usize) -> String {
    format!("k{k}")
}

/// One client on device `dev`: random writes and reads of the keys, and
/// moves of its own file between two names, until `stop`.
fn client(rec: &Recorder, mnt: &Path, dev: usize, client: usize, stop: &AtomicBool) {
    let mut rng = SmallRng::seed_from_u64((dev * 10 + client) as u64);
    let mv = |i: usize| format!("mv-{}{client}-{i}", &NAMES[dev][..1]);
    let mut at = 0usize;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = key(rng.gen_range(0..KEYS));
        let p = mnt.join(&k);
        let ok = match rng.gen_range(0..10) {
            0..=3 => {
                seq += 1;
                let v = value(dev, client, seq);
                rec.run(dev, Kind::Write, &k, Some(v.clone()), || {
                    let f = fs::OpenOptions::new().write(true).open(&p)?;
                    f.write_all_at(v.as_bytes(), 0)?;
                    close(f)?;
                    Ok(None)
                })
            }
            4..=8 => rec.run(dev, Kind::Read, &k, None, || {
                let mut s = String::new();
                fs::File::open(&p)?.read_to_string(&mut s)?;
                Ok(Some(s))
            }),
            _ => {
                let (from, to) = (mv(at), mv(1 - at));
                let what = format!("{from} -> {to}");
                let done = rec.run(dev, Kind::Rename, &what, None, || {
                    fs::rename(mnt.join(&from), mnt.join(&to))?;
                    Ok(None)
                });
                // A rename cut short by a kill may still have happened.
                if done || mnt.join(&to).exists() {
                    at = 1 - at;
                }
                done
            }
        };
        // A dead mount answers at once; do not spin on it.
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A device was down (killed, and until it was back and connected, plus a
/// margin for what it shipped on return) from `.0` to `.1`.
type Window = (Duration, Duration);

fn calm(windows: &[Window], from: Duration, to: Duration) -> bool {
    windows.iter().all(|(a, b)| to < *a || from > *b)
}

/// Waits until no device has changes waiting and all show the same files.
fn settle(devices: &[Device]) -> BTreeMap<String, Vec<u8>> {
    let t = Instant::now();
    loop {
        let waiting = devices.iter().any(|d| {
            let c = &d.status_json()["raft"]["changes"];
            c["tentative"]["waiting"] != 0 || c["pending"] != 0
        });
        let views: Vec<BTreeMap<String, Vec<u8>>> = devices
            .iter()
            .map(|d| {
                let mut v = BTreeMap::new();
                for e in fs::read_dir(d.mountpoint()).unwrap().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !name.starts_with('.') {
                        if let Ok(b) = fs::read(e.path()) {
                            v.insert(name, b);
                        }
                    }
                }
                v
            })
            .collect();
        if !waiting && views.iter().all(|v| *v == views[0]) {
            return views.into_iter().next().unwrap_or_default();
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the mesh did not settle in 90 s: {}",
            devices
                .iter()
                .map(|d| format!("{}: {}", d.name, d.status_json()["raft"]["changes"]))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A file's kept versions in order (version number, bytes), then its
/// current content, from the read-only tree at the mount root.
fn history_of(mnt: &Path, name: &str) -> Vec<Vec<u8>> {
    let dir = mnt.join(".meshfs/versions").join(name);
    let mut versions: Vec<(u64, Vec<u8>)> = fs::read_dir(&dir)
        .map(|r| {
            r.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().parse().ok()?;
                    Some((n, fs::read(e.path()).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    let mut out: Vec<Vec<u8>> = versions.into_iter().map(|(_, b)| b).collect();
    if let Ok(now) = fs::read(mnt.join(name)) {
        if out.last() != Some(&now) {
            out.push(now);
        }
    }
    out
}

#[test]
#[ignore = "2 runs in 15 still find a close-to-open violation (a read within 20 ms of another \
            device's close returns the version before it, at the first authority moves or just \
            after a device returns; issue 19 note); run with --ignored"]
fn concurrent_operations_under_kill_9_keep_the_promised_semantics() {
    require_root!();
    let secs: u64 = std::env::var("MESHFS_HISTORY_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let settings: &[(&str, &str)] = &[("versions_keep", "100000")];
    let mut devices = common::mesh(
        Duration::from_secs(60),
        &[
            ("alpha", settings),
            ("bravo", settings),
            ("charlie", settings),
        ],
    );
    let initial = value(0, 9, 0);
    for k in 0..KEYS {
        let p = devices[0].path(&key(k));
        fs::write(&p, &initial).unwrap();
        fs::File::open(&p).unwrap().sync_all().unwrap();
    }
    for (i, d) in devices.iter().enumerate() {
        for c in 0..2 {
            fs::write(d.path(&format!("mv-{}{c}-0", &NAMES[i][..1])), "moved\n").unwrap();
        }
    }
    fs::File::open(devices[0].mountpoint())
        .unwrap()
        .sync_all()
        .unwrap();
    settle(&devices);

    println!(
        "history: t0 is {:?} after the epoch (daemon logs are in UTC)",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    );
    let rec = Recorder {
        t0: Instant::now(),
        ops: Mutex::new(Vec::new()),
    };
    let stop = AtomicBool::new(false);
    let mut windows: Vec<Window> = Vec::new();
    let mut victims: Vec<&str> = Vec::new();
    // From each kill until the victim was back and connected: when changes
    // to what it governs were made tentatively elsewhere.
    let mut down: Vec<Window> = Vec::new();
    let mnts: Vec<std::path::PathBuf> = devices.iter().map(|d| d.mountpoint().into()).collect();
    let mut rng = SmallRng::seed_from_u64(5);
    let mut rounds = 0usize;
    // A hang (a request no daemon will ever answer) would otherwise hold
    // the test until CI's limit: the watchdog records what the kernel is
    // waiting on and aborts the mounts, so the test fails saying so.
    let progress = std::sync::atomic::AtomicU64::new(0);
    let hung: Mutex<Option<String>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (progress, hung, done, watched, clock) = (&progress, &hung, &done, &mnts, &rec);
        s.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let last = Duration::from_millis(progress.load(Ordering::Relaxed));
                if clock.now().saturating_sub(last) > Duration::from_secs(120) {
                    // Reading /proc can itself wait on a stuck task.
                    let (tx, rx) = std::sync::mpsc::channel();
                    std::thread::spawn(move || tx.send(common::blocked_tasks()));
                    *lock(hung) = Some(
                        rx.recv_timeout(Duration::from_secs(10))
                            .unwrap_or_else(|_| "(reading /proc hung too)".into()),
                    );
                    for m in watched {
                        common::abort_fuse_connection(m);
                    }
                    return;
                }
            }
        });
        let tick = || progress.store(rec.now().as_millis() as u64, Ordering::Relaxed);
        let clients: Vec<_> = (0..3)
            .flat_map(|dev| (0..2).map(move |c| (dev, c)))
            .map(|(dev, c)| {
                let (rec, stop, mnt) = (&rec, &stop, &mnts[dev]);
                s.spawn(move || client(rec, mnt, dev, c, stop))
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut next_kill = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            tick();
            // A create round: the three devices race for one new name.
            let name = format!("x{rounds}");
            let go = Barrier::new(3);
            std::thread::scope(|r| {
                for (dev, mnt) in mnts.iter().enumerate() {
                    let (rec, go, name) = (&rec, &go, &name);
                    r.spawn(move || {
                        let v = value(dev, 8, rounds as u64);
                        go.wait();
                        rec.run(dev, Kind::Create, name, Some(v.clone()), || {
                            let mut f = fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .mode(0o644)
                                .open(mnt.join(name))?;
                            f.write_all(v.as_bytes())?;
                            close(f)?;
                            Ok(None)
                        });
                    });
                }
            });
            // Two rounds on, a random device removes that round's name.
            if rounds >= 2 {
                let old = format!("x{}", rounds - 2);
                let dev = rng.gen_range(0..3);
                rec.run(dev, Kind::Unlink, &old, None, || {
                    fs::remove_file(mnts[dev].join(&old))?;
                    Ok(None)
                });
            }
            rounds += 1;
            if Instant::now() >= next_kill {
                let victim = rng.gen_range(0..3);
                let from = rec.now();
                devices[victim].kill9();
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
                tick();
                devices[victim].mount();
                tick();
                for d in &devices {
                    d.wait_connected(&NAMES, Duration::from_secs(60));
                }
                down.push((from, rec.now()));
                windows.push((from, rec.now() + Duration::from_secs(3)));
                victims.push(NAMES[victim]);
                next_kill = Instant::now() + Duration::from_millis(rng.gen_range(2000..5000));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
        tick();
        for c in clients {
            c.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    if let Some(tasks) = lock(&hung).take() {
        panic!(
            "no progress for 120 s; the mounts were aborted. Tasks blocked in the kernel:\n{tasks}"
        );
    }
    let last = settle(&devices);
    let ops = lock(&rec.ops).clone();
    let mnt = devices[0].mountpoint();
    let mut failures: Vec<String> = Vec::new();

    // Every value that exists anywhere at the end: current files, their
    // kept versions, conflict copies.
    let mut histories: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for name in last.keys() {
        histories.insert(name.clone(), history_of(mnt, name));
    }
    let everywhere: BTreeSet<&[u8]> = histories.values().flatten().map(Vec::as_slice).collect();

    // No torn or invented data.
    let mut written: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for o in &ops {
        if matches!(o.kind, Kind::Write | Kind::Create) {
            if let Some(v) = &o.value {
                written.entry(&o.path).or_default().insert(v);
            }
        }
    }
    let reads: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Read) && o.ok())
        .collect();
    for r in &reads {
        let v = r.value.as_deref().unwrap_or("");
        if v != initial && !written.get(r.path.as_str()).is_some_and(|w| w.contains(v)) {
            failures.push(format!(
                "read of {} on {} returned {v:?}, which nobody wrote",
                r.path, NAMES[r.dev]
            ));
        }
    }

    // Close-to-open, for pairs outside the windows.
    let index: std::collections::HashMap<(&str, &[u8]), usize> = histories
        .iter()
        .flat_map(|(path, h)| {
            h.iter()
                .enumerate()
                .map(move |(i, b)| ((path.as_str(), b.as_slice()), i))
        })
        .collect();
    let position = |path: &str, v: &str| index.get(&(path, v.as_bytes())).copied();
    // The writes of one file on one device (by `o`'s device and file).
    let writes_beside = |o: &Op| {
        let (dev, path) = (o.dev, o.path.clone());
        ops.iter()
            .filter(move |w| matches!(w.kind, Kind::Write) && w.dev == dev && w.path == path)
    };
    let mut pairs = 0u64;
    let mut beside_writer = 0u64;
    // A program here with the file open for writing shares its copy with
    // every open here until it closes (README, "Consistency"): such a read
    // may show that copy, which a version closed elsewhere meanwhile does
    // not replace. Its close then makes the newest version.
    let local_writer_open = |r: &Op| writes_beside(r).any(|o| o.start < r.start && o.end > r.start);
    for w in ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write) && o.ok())
    {
        let Some(wv) = w.value.as_deref() else {
            continue;
        };
        let Some(wpos) = position(&w.path, wv) else {
            continue;
        };
        for r in reads
            .iter()
            .filter(|r| r.path == w.path && r.start > w.end && calm(&windows, w.start, r.end))
        {
            let rv = r.value.as_deref().unwrap_or("");
            pairs += 1;
            match position(&r.path, rv) {
                Some(rpos) if rpos >= wpos => {}
                _ if local_writer_open(r) => beside_writer += 1,
                got => {
                    let beside: Vec<String> = writes_beside(r)
                        .filter(|o| o.start < r.end && o.end + Duration::from_millis(200) > w.end)
                        .map(|o| format!("{:?} {:?}..{:?} {:?}", o.value, o.start, o.end, o.error))
                        .collect();
                    failures.push(format!(
                        "close-to-open: {} read {rv:?} (version index {got:?}) on {} at {:?}..{:?}, after {wv:?} (index {wpos}) was closed on {} at {:?}; writes there: {beside:?}",
                        r.path, NAMES[r.dev], r.start, r.end, NAMES[w.dev], w.end
                    ))
                }
            }
        }
    }

    // One winner per name, for rounds outside the windows.
    let mut calm_rounds = 0;
    for round in 0..rounds {
        let name = format!("x{round}");
        let creates: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o.kind, Kind::Create) && o.path == name)
            .collect();
        let (from, to) = (
            creates.iter().map(|o| o.start).min().unwrap_or_default(),
            creates.iter().map(|o| o.end).max().unwrap_or_default(),
        );
        if !calm(&windows, from, to) {
            continue;
        }
        calm_rounds += 1;
        let winners: Vec<&&Op> = creates.iter().filter(|o| o.ok()).collect();
        if winners.len() != 1 {
            failures.push(format!(
                "{name}: {} creates succeeded: {:?}",
                winners.len(),
                creates
                    .iter()
                    .map(|o| (NAMES[o.dev], &o.error))
                    .collect::<Vec<_>>()
            ));
        }
        let unlinked = ops
            .iter()
            .any(|o| matches!(o.kind, Kind::Unlink) && o.path == name && o.ok());
        if let (false, [w]) = (unlinked, winners.as_slice()) {
            let now = last
                .get(&name)
                .map(|b| String::from_utf8_lossy(b).into_owned());
            if now.as_deref() != w.value.as_deref() {
                failures.push(format!(
                    "{name} holds {now:?}, not its winner's {:?}",
                    w.value
                ));
            }
        }
    }

    // No acknowledged write lost.
    let mut acknowledged = 0u64;
    let mut superseded_offline = 0u64;
    for o in ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write | Kind::Create) && o.ok())
    {
        // Two programs writing one file on one device share its buffer: a
        // close commits whatever the file holds then, so a write that a
        // concurrent one on the same device overwrote before the close
        // never was a version of its own. Not a loss.
        let absorbed =
            writes_beside(o).any(|w| w.value != o.value && w.start <= o.end && w.end >= o.start);
        if absorbed {
            continue;
        }
        // Saves of one file made in a row while its authority was out of
        // reach are one tentative change: only the last is reintegrated
        // (`journal::supersedes`; docs/operations.md).
        let superseded = down.iter().any(|(a, b)| {
            o.end >= *a
                && o.end <= *b
                && writes_beside(o).any(|w| w.ok() && w.start > o.end && w.start <= *b)
        });
        if superseded {
            superseded_offline += 1;
            continue;
        }
        acknowledged += 1;
        let removed = ops.iter().any(|u| {
            matches!(u.kind, Kind::Unlink) && u.path == o.path && u.ok() && u.start > o.end
        });
        let v = o.value.as_deref().unwrap_or("");
        if removed {
            let dd = devices[0].data_dir();
            let out = common::meshfs(&["versions", mnt.join(&o.path).to_str().unwrap()]);
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.contains("removed") {
                failures.push(format!(
                    "{} was removed but `meshfs versions` does not list it ({}): {text}",
                    o.path,
                    dd.display()
                ));
            }
        } else if !everywhere.contains(v.as_bytes()) {
            failures.push(format!(
                "lost: {v:?} written to {} on {} ({:?} to {:?}) is nowhere",
                o.path, NAMES[o.dev], o.start, o.end
            ));
        }
    }

    // Renames are atomic.
    for dev in NAMES {
        for c in 0..2 {
            let names = [0, 1].map(|i| format!("mv-{}{c}-{i}", &dev[..1]));
            let present = names.iter().filter(|n| last.contains_key(*n)).count();
            if present != 1 {
                failures.push(format!("{names:?}: {present} of the two names exist"));
            }
        }
    }

    let count = |f: &dyn Fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
    println!(
        "history: {} operations in {secs} s ({} writes, {} reads, {} creates, {} renames, {} unlinks; {} failed), \
         {} kills, {pairs} close-to-open pairs, {beside_writer} of them beside a writer on the reader's device, {calm_rounds} of {rounds} create rounds checked, {acknowledged} acknowledged writes checked ({superseded_offline} more superseded by a later save while cut off), {} failures",
        ops.len(),
        count(&|o| matches!(o.kind, Kind::Write)),
        count(&|o| matches!(o.kind, Kind::Read)),
        count(&|o| matches!(o.kind, Kind::Create)),
        count(&|o| matches!(o.kind, Kind::Rename)),
        count(&|o| matches!(o.kind, Kind::Unlink)),
        count(&|o| !o.ok()),
        windows.len(),
        failures.len()
    );
    assert!(
        windows.len() >= 2,
        "the nemesis killed fewer than 2 devices"
    );
    assert!(
        pairs > 100,
        "too few close-to-open pairs to mean anything: {pairs}"
    );
    if !failures.is_empty() {
        // The daemons' logs go with their temporary dirs: keep them.
        let keep = std::env::temp_dir().join("meshfs-history-failure");
        let _ = fs::create_dir_all(&keep);
        for d in &devices {
            let _ = fs::write(keep.join(format!("{}.log", d.name)), d.log());
        }
        println!("history: daemon logs kept in {}", keep.display());
    }
    assert!(
        failures.is_empty(),
        "{} violations (devices down: {windows:?}, killed: {victims:?}):\n{}",
        failures.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
