//! One namespace on every device, through real mounts: three `meshfs`
//! processes on loopback agree on the namespace with Raft. Writes on one
//! device are read back byte for byte on the others, renames and unlinks
//! show at the next lookup, concurrent creates of one name have one winner,
//! and killing the leader only pauses writes.

mod common;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use common::{bytes, Device};

const LIMIT: Duration = Duration::from_secs(30);

/// Alpha (founder, first leader), then bravo and charlie joined; all
/// mounted, connected, and voters.
fn three() -> (Device, Device, Device) {
    let mut d = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &[]), ("charlie", &[])]);
    let (c, b, a) = (d.pop().unwrap(), d.pop().unwrap(), d.pop().unwrap());
    wait_voters(&a, 3);
    (a, b, c)
}

fn raft(d: &Device) -> serde_json::Value {
    d.status_json()["raft"].clone()
}

fn wait_voters(d: &Device, n: usize) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = raft(d);
        if r["voters"].as_array().map_or(0, |v| v.len()) == n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} voters: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(d: &Device, rel: &str, data: &[u8]) {
    let mut f = fs::File::create(d.path(rel)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_file_written_on_one_device_reads_identically_on_the_others() {
    require_root!();
    let (a, b, c) = three();
    let data = bytes(3 << 20, 7);
    fs::create_dir(a.path("docs")).unwrap();
    write(&a, "docs/report.bin", &data);
    // No sleeps: close-to-open says the open after the close sees it.
    assert_eq!(fs::read(b.path("docs/report.bin")).unwrap(), data);
    assert_eq!(fs::read(c.path("docs/report.bin")).unwrap(), data);
    // And the other way round, from a follower.
    let small = bytes(10_000, 8);
    write(&c, "docs/from-charlie", &small);
    assert_eq!(fs::read(a.path("docs/from-charlie")).unwrap(), small);
    assert_eq!(fs::read(b.path("docs/from-charlie")).unwrap(), small);
    // Everyone agrees on one leader and term.
    let leaders: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|d| raft(d)["leader"].clone())
        .collect();
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && !l.is_null()),
        "{leaders:?}"
    );
}

#[test]
fn renames_and_unlinks_show_on_the_others_at_the_next_lookup() {
    require_root!();
    let (a, b, c) = three();
    write(&a, "old", b"x");
    // A lookup right after the close elsewhere finds the name (it waits for
    // the read index like an open); this also caches it on bravo and
    // charlie.
    assert!(b.path("old").exists());
    assert!(c.path("old").exists());
    fs::rename(a.path("old"), a.path("new")).unwrap();
    // Invalidations are asynchronous; they reach the kernel within a
    // moment, far below the 1 s attribute TTL that would hide this.
    let deadline = Instant::now() + Duration::from_millis(500);
    while b.path("old").exists() || c.path("old").exists() {
        assert!(
            Instant::now() < deadline,
            "stale name after a rename elsewhere"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::read(b.path("new")).unwrap(), b"x");
    fs::remove_file(c.path("new")).unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    while a.path("new").exists() || b.path("new").exists() {
        assert!(
            Instant::now() < deadline,
            "stale name after an unlink elsewhere"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let listing: Vec<_> = fs::read_dir(b.mountpoint()).unwrap().collect();
    assert!(listing.is_empty(), "{listing:?}");
}

#[test]
fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    require_root!();
    let (a, b, c) = three();
    for round in 0..20 {
        let name = format!("race-{round}");
        let results = common::race_create(&[&a, &b, &c], &name);
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.kind(), std::io::ErrorKind::AlreadyExists, "{r}");
        }
    }
}

#[test]
fn killing_the_leader_elects_another_and_writes_resume() {
    require_root!();
    let (a, b, c) = three();
    write(&b, "before", b"1");
    let mut devs = vec![a, b, c];
    let leader = raft(&devs[0])["leader"].as_str().unwrap().to_string();
    let i = devs.iter().position(|d| d.name == leader).unwrap();
    let mut dead = devs.remove(i);
    dead.kill9();
    let t = Instant::now();
    // The survivors elect a new leader and commit again.
    write(&devs[0], "after", b"2");
    let stall = t.elapsed();
    assert!(stall < Duration::from_secs(10), "writes stalled {stall:?}");
    assert_eq!(fs::read(devs[1].path("after")).unwrap(), b"2");
    assert_eq!(fs::read(devs[1].path("before")).unwrap(), b"1");
    let new_leader = raft(&devs[0])["leader"].clone();
    assert!(
        new_leader.is_string() && new_leader != leader.as_str(),
        "{new_leader}"
    );
    // The killed device restarts and catches up on what it missed.
    dead.mount();
    let deadline = Instant::now() + LIMIT;
    while !dead.path("after").exists() {
        assert!(
            Instant::now() < deadline,
            "restarted device never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fs::read(dead.path("after")).unwrap(), b"2");
}

/// Writes `n` files from a thread on `d`; returns the names whose close
/// succeeded (acknowledged writes).
fn burst(d: &Device, prefix: &'static str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    let root = d.mountpoint().to_path_buf();
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            let r = fs::File::create(root.join(&name))
                .and_then(|mut f| f.write_all(name.as_bytes()).and_then(|_| f.sync_all()));
            match r {
                Ok(()) => acked.push(name),
                // The writer's own daemon was killed: the mount is gone.
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => break,
                Err(_) => {}
            }
        }
        acked
    })
}

fn wait_for(d: &Device, rel: &str) {
    let deadline = Instant::now() + LIMIT;
    while !d.path(rel).exists() {
        assert!(Instant::now() < deadline, "{} never saw {rel}", d.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn devices_killed_mid_burst_catch_up_and_lose_no_acknowledged_write() {
    require_root!();
    let (a, b, c) = three();
    // 1. A follower dies while another follower writes; it restarts and
    // catches up.
    let mut devs = vec![a, b, c];
    let leader = raft(&devs[0])["leader"].as_str().unwrap().to_string();
    let li = devs.iter().position(|d| d.name == leader).unwrap();
    let leader_dev = devs.remove(li);
    let (mut writer, mut victim) = (devs.remove(0), devs.remove(0));
    let h = burst(&writer, "one", 150);
    std::thread::sleep(Duration::from_millis(300));
    victim.kill9();
    let acked = h.join().unwrap();
    assert!(
        acked.len() >= 140,
        "only {} of 150 acknowledged",
        acked.len()
    );
    victim.mount();
    for d in [&leader_dev, &writer, &victim] {
        wait_for(d, acked.last().unwrap());
        for name in &acked {
            assert_eq!(
                fs::read(d.path(name)).unwrap(),
                name.as_bytes(),
                "{} {name}",
                d.name
            );
        }
    }
    // 2. The writer itself dies mid-burst: what it acknowledged is on the
    // others at once (metadata) and, once it is back, everywhere.
    let h = burst(&writer, "two", 100_000);
    std::thread::sleep(Duration::from_millis(500));
    writer.kill9();
    let acked = h.join().unwrap();
    assert!(!acked.is_empty());
    for name in &acked {
        assert!(leader_dev.path(name).exists(), "{name} lost on the leader");
        assert!(victim.path(name).exists(), "{name} lost on {}", victim.name);
    }
    writer.mount();
    for d in [&leader_dev, &writer, &victim] {
        for name in &acked {
            assert_eq!(
                fs::read(d.path(name)).unwrap(),
                name.as_bytes(),
                "{} {name}",
                d.name
            );
        }
    }
}

#[test]
fn content_is_replicated_so_a_dead_author_loses_nothing() {
    require_root!();
    let (mut a, b, c) = three();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("r{i}"), bytes(300_000 + i * 1000, 40 + i as u64)))
        .collect();
    for (name, data) in &files {
        write(&a, name, data);
    }
    // replicas = 2: besides alpha, each file gets one more complete copy,
    // on bravo or charlie.
    wait_held(&[&b, &c], files.len() as u64);
    // `check` on bravo: what it does not store, a live member does.
    let (ok, report) = check(&b);
    assert!(ok, "{report}");
    assert!(report["held_elsewhere"].as_u64().unwrap() > 0, "{report}");
    a.kill9();
    for (name, data) in &files {
        assert_eq!(&fs::read(b.path(name)).unwrap(), data, "{name} on bravo");
        assert_eq!(&fs::read(c.path(name)).unwrap(), data, "{name} on charlie");
    }
    // Alpha is dead, yet every chunk is still held by a live device.
    let (ok, report) = check(&b);
    assert!(ok, "{report}");
}

/// `meshfs check --json` on `d`: (exit status ok, report).
fn check(d: &Device) -> (bool, serde_json::Value) {
    let dd = d.data_dir();
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(o.status.success(), v["ok"] == true, "{v}");
    (o.status.success(), v["report"].clone())
}

#[test]
fn check_finds_chunks_that_no_live_device_holds() {
    require_root!();
    let (a, b, mut c) = three();
    // Written on charlie and read nowhere else: until replication places a
    // copy, only charlie (and the placement's second device) holds it.
    // Kill charlie and the device holding the second copy; alpha's check
    // must then report the chunks as missing.
    write(&c, "only-here", &bytes(200_000, 77));
    wait_held(&[&a, &b], 1);
    let (ok, _) = check(&a);
    assert!(ok);
    let (mut keeper, other) = if a.own_holdings() > 0 { (a, b) } else { (b, a) };
    c.kill9();
    keeper.kill9();
    let (ok, report) = check(&other);
    assert!(!ok, "{report}");
    assert!(
        !report["missing_chunks"].as_array().unwrap().is_empty(),
        "{report}"
    );
}

/// Waits until `devs` between them hold (completely, as announced) at
/// least `n` files.
fn wait_held(devs: &[&Device], n: u64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let held: u64 = devs.iter().map(|d| d.own_holdings()).sum();
        if held >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {held} of {n} files held");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cache_bytes(d: &Device) -> u64 {
    d.status_json()["cache_bytes"].as_u64().unwrap()
}

#[test]
fn a_small_cache_evicts_cached_copies_but_never_below_replicas() {
    require_root!();
    let mut d = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &[]), ("charlie", &[])]);
    let (c, mut b, mut a) = (d.pop().unwrap(), d.pop().unwrap(), d.pop().unwrap());
    wait_voters(&a, 3);
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("big{i}"), bytes(512 << 10, 90 + i as u64)))
        .collect();
    for (name, data) in &files {
        write(&a, name, data);
    }
    // Reading everything on bravo caches every file there.
    for (name, data) in &files {
        assert_eq!(&fs::read(b.path(name)).unwrap(), data);
    }
    let full = cache_bytes(&b);
    assert!(full >= 4 << 20, "bravo holds only {full} bytes");
    // Only now does bravo get a small cache: at most 1 MiB beyond what it
    // must hold. (With the limit set from the start, an eviction round
    // could run in the middle of the reads above on a slow machine.)
    b.unmount();
    b.set_config("cache_limit_mb", "1");
    b.mount();
    b.wait_connected(&["alpha", "bravo", "charlie"], LIMIT);
    let deadline = Instant::now() + LIMIT;
    while cache_bytes(&b) > full - (512 << 10) {
        assert!(
            Instant::now() < deadline,
            "nothing evicted from {full} bytes"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Evicted copies come back on demand...
    for (name, data) in &files {
        assert_eq!(
            &fs::read(b.path(name)).unwrap(),
            data,
            "{name} after eviction"
        );
    }
    // ...and never went below two copies: with alpha (every file's
    // authority) dead, bravo and charlie between them still have them all.
    a.kill9();
    for (name, data) in &files {
        assert_eq!(&fs::read(c.path(name)).unwrap(), data, "{name} on charlie");
        assert_eq!(&fs::read(b.path(name)).unwrap(), data, "{name} on bravo");
    }
}

#[test]
fn two_devices_with_one_down_still_read_and_keep_writes_for_later() {
    require_root!();
    // Short waits so that the test does not sit through the defaults.
    let short = [
        ("write_timeout_ms", "1500"),
        ("read_wait_ms", "300"),
        ("offline_after_ms", "500"),
    ];
    let mut d = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &short)]);
    let (b, mut a) = (d.pop().unwrap(), d.pop().unwrap());
    wait_voters(&a, 2);
    let data = bytes(100_000, 5);
    write(&a, "cached", &data);
    fs::create_dir(a.path("dir")).unwrap();
    assert_eq!(fs::read(b.path("cached")).unwrap(), data);
    // Bravo numbers what it creates from its own block of inode numbers
    // (reserved through Raft when it starts, or at its first create, as
    // here): it needs one to create anything while cut off.
    fs::create_dir(b.path("mine")).unwrap();
    fs::write(b.path("mine/f"), b"f").unwrap();
    a.kill9();
    // Quorum is lost: cached content, listings and stats keep working (the
    // open waits read_wait_ms, then serves the local replica)...
    assert_eq!(fs::read(b.path("cached")).unwrap(), data);
    let names: Vec<_> = fs::read_dir(b.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(b.path("dir").is_dir());
    // ...and changes to what alpha governs are made tentatively on bravo,
    // within offline_after_ms, not refused: the programs see them at once.
    let t = Instant::now();
    fs::write(b.path("new"), b"x").unwrap();
    fs::remove_file(b.path("cached")).unwrap();
    fs::write(b.path("dir/inside"), b"in dir").unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(fs::read(b.path("new")).unwrap(), b"x");
    assert!(!b.path("cached").exists());
    let r = raft(&b);
    assert_eq!(r["degraded"], true, "{r}");
    assert!(
        r["changes"]["tentative"]["waiting"].as_u64().unwrap() >= 3,
        "{r}"
    );
    assert!(r["changes"]["tentative"]["since"].as_i64().is_some(), "{r}");
    // Alpha comes back: bravo's changes are reintegrated, none conflicts.
    a.mount();
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = raft(&b);
        if r["changes"]["tentative"]["waiting"] == 0 {
            assert_eq!(r["changes"]["tentative"]["conflicts"], 0, "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "never reintegrated: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fs::read(a.path("new")).unwrap(), b"x");
    assert_eq!(fs::read(a.path("dir/inside")).unwrap(), b"in dir");
    assert!(!a.path("cached").exists());
    fs::write(b.path("after"), b"y").unwrap();
    assert_eq!(fs::read(a.path("after")).unwrap(), b"y");
}

#[test]
fn a_removed_device_leaves_the_voters() {
    require_root!();
    let (a, _b, c) = three();
    let dd = a.data_dir();
    let o = common::meshfs(&[
        "remove-device",
        "charlie",
        "--data-dir",
        dd.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    wait_voters(&a, 2);
    let r = raft(&a);
    assert!(
        !r["voters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "charlie"),
        "{r}"
    );
    // The mesh still commits with its two voters.
    write(&a, "after-removal", b"ok");
    // Charlie is cut off: nothing it asks for is answered any more.
    assert!(!c.path("after-removal").exists());
}

/// Sets one key of `d`'s config.toml (before it mounts).
#[test]
fn losing_a_device_for_good_restores_the_copy_count() {
    require_root!();
    let (mut a, b, mut c) = three();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("keep{i}"), bytes(200_000, 300 + i as u64)))
        .collect();
    for (name, data) in &files {
        write(&a, name, data);
    }
    wait_held(&[&b, &c], files.len() as u64);
    // Charlie dies for good and is removed: its copies are gone, so bravo
    // becomes the second copy of every file.
    c.kill9();
    let dd = a.data_dir();
    let o = common::meshfs(&[
        "remove-device",
        "charlie",
        "--data-dir",
        dd.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    wait_held(&[&b], files.len() as u64);
    a.kill9();
    for (name, data) in &files {
        assert_eq!(&fs::read(b.path(name)).unwrap(), data, "{name}");
    }
}

#[test]
fn a_device_booting_with_no_other_reachable_mounts_with_its_cache_and_says_so() {
    require_root!();
    let short = [("read_wait_ms", "300"), ("offline_after_ms", "500")];
    let mut d = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &short)]);
    let (mut b, mut a) = (d.pop().unwrap(), d.pop().unwrap());
    wait_voters(&a, 2);
    let data = bytes(200_000, 9);
    write(&a, "cached", &data);
    assert_eq!(fs::read(b.path("cached")).unwrap(), data);
    // A device creates offline from its own block of inode numbers, which
    // it reserves through Raft once it has joined.
    let deadline = Instant::now() + LIMIT;
    while !b.log().contains("inode numbers reserved") {
        assert!(
            Instant::now() < deadline,
            "bravo never reserved inode numbers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.unmount();
    a.unmount();
    // A boot with the network down: only bravo starts.
    let t = Instant::now();
    b.mount();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "mount took {took:?}");
    assert_eq!(fs::read(b.path("cached")).unwrap(), data);
    fs::write(b.path("offline"), b"made at boot").unwrap();
    assert_eq!(fs::read(b.path("offline")).unwrap(), b"made at boot");
    // The log says why nothing new arrives (after offline_after_ms).
    let deadline = Instant::now() + LIMIT;
    while !b.log().contains("no other device of the mesh is reachable") {
        assert!(
            Instant::now() < deadline,
            "the log does not say the mount is offline"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Alpha comes back: bravo's change reaches it.
    a.mount();
    let deadline = Instant::now() + LIMIT;
    while fs::read(a.path("offline")).ok().as_deref() != Some(&b"made at boot"[..]) {
        assert!(Instant::now() < deadline, "never reached alpha");
        std::thread::sleep(Duration::from_millis(100));
    }
}
