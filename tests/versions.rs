//! Version history and the trash through real mounts: three `meshfs`
//! processes on loopback. Every save is kept and listed on every device
//! (`meshfs versions`), readable in the hidden tree `.meshfs/versions`,
//! restorable from any device (`meshfs restore`); a removed or replaced
//! file is kept in the trash and brought back at its path; the retention
//! policy drops the oldest versions everywhere, and a kept version stays
//! readable after its chunks were evicted elsewhere and its author died.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{bytes, Device};

const LIMIT: Duration = Duration::from_secs(30);

/// Saves `data` as `rel` (one version) from a child process: a file
/// opened in this process is also closed by every fork of it (the other
/// tests' commands), which commits a version at each such close.
fn save(d: &Device, rel: &str, data: &[u8]) {
    let mut src = tempfile::NamedTempFile::new().unwrap();
    src.write_all(data).unwrap();
    src.flush().unwrap();
    let st = std::process::Command::new("cp")
        .arg(src.path())
        .arg(d.path(rel))
        .status()
        .unwrap();
    assert!(st.success(), "cp to {rel} on {}", d.name);
}

/// `meshfs versions --json` of `rel` on `d`, or the error line.
fn versions(d: &Device, rel: &str) -> Result<serde_json::Value, String> {
    let p = d.path(rel);
    let o = common::meshfs(&["versions", p.to_str().unwrap(), "--json"]);
    if !o.status.success() {
        return Err(common::stderr(&o));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

/// The version numbers listed for the first file (the one there now, or
/// the most recently removed one).
fn numbers(v: &serde_json::Value) -> Vec<u64> {
    v["files"][0]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect()
}

/// Waits until `f` holds of `rel`'s listing on `d`.
fn wait_versions(
    d: &Device,
    rel: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v = versions(d, rel);
        if let Ok(v) = &v {
            if f(v) {
                return v.clone();
            }
        }
        assert!(Instant::now() < deadline, "{}: never {what}: {v:?}", d.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn restore(d: &Device, rel: &str, args: &[&str]) -> serde_json::Value {
    let p = d.path(rel);
    let mut all = vec!["restore", p.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let o = common::meshfs(&all);
    assert!(
        o.status.success(),
        "restore {rel} {args:?} on {}: {}",
        d.name,
        common::stderr(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Waits until `rel` on `d` reads as `want`.
fn wait_content(d: &Device, rel: &str, want: &[u8]) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let got = fs::read(d.path(rel)).ok();
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {rel} never read as expected ({:?} bytes)",
            d.name,
            got.map(|g| g.len())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_save_is_listed_readable_and_restorable_on_every_device() {
    require_root!();
    let mut d = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &[]), ("charlie", &[])]);
    let (c, b, a) = (d.pop().unwrap(), d.pop().unwrap(), d.pop().unwrap());
    fs::create_dir(a.path("docs")).unwrap();
    let v: Vec<Vec<u8>> = (0..3)
        .map(|i| bytes(150_000 + i * 7_000, 300 + i as u64))
        .collect();
    for data in &v {
        save(&a, "docs/report", data);
    }
    // Listed on another device, with sizes, authors and content hashes.
    let list = wait_versions(&b, "docs/report", "3 versions", |l| numbers(l) == [1, 2, 3]);
    let rows = list["files"][0]["versions"].as_array().unwrap().clone();
    for (r, data) in rows.iter().zip(&v) {
        assert_eq!(r["size"].as_u64().unwrap(), data.len() as u64, "{r}");
        assert_eq!(r["author"], "alpha", "{r}");
    }
    assert_eq!(rows[2]["current"], true);
    assert!(list["files"][0]["deleted"].is_null());
    // Readable in place on bravo (chunks fetched from alpha), read-only,
    // and hidden from the root's listing.
    let tree = b.path(".meshfs/versions/docs/report");
    let mut names: Vec<String> = fs::read_dir(&tree)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["1", "2", "3"]);
    assert_eq!(fs::read(tree.join("1")).unwrap(), v[0]);
    assert_eq!(fs::read(tree.join("2")).unwrap(), v[1]);
    let meta = fs::metadata(tree.join("1")).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o222,
        0,
        "versions are read-only"
    );
    let e = fs::OpenOptions::new()
        .write(true)
        .open(tree.join("1"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(
        fs::write(tree.join("new"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert!(fs::read_dir(b.mountpoint())
        .unwrap()
        .all(|e| e.unwrap().file_name() != ".meshfs"));

    // Restore version 1 from charlie (not the file's authority): it
    // becomes version 4 everywhere, with version 1's bytes and hash.
    let r = restore(&c, "docs/report", &["--version", "1"]);
    assert_eq!(
        (r["from"].as_u64(), r["version"].as_u64()),
        (Some(1), Some(4)),
        "{r}"
    );
    wait_content(&a, "docs/report", &v[0]);
    wait_content(&b, "docs/report", &v[0]);
    let list = wait_versions(&a, "docs/report", "4 versions", |l| {
        numbers(l) == [1, 2, 3, 4]
    });
    let rows = list["files"][0]["versions"].as_array().unwrap();
    assert_eq!(rows[3]["hash"], rows[0]["hash"]);
    assert_eq!(rows[3]["author"], "charlie");

    // An editor's save: a new file renamed over the old one. The old one
    // is kept in the trash and listed after the new one.
    save(&a, "docs/report.tmp", b"rewritten by an editor");
    fs::rename(a.path("docs/report.tmp"), a.path("docs/report")).unwrap();
    let list = wait_versions(&b, "docs/report", "the replaced file in the trash", |l| {
        l["files"].as_array().is_some_and(|f| f.len() == 2)
    });
    let old = &list["files"][1];
    assert_eq!(old["deleted"]["by"], "alpha", "{list}");
    let old_id = old["resource"].as_u64().unwrap();
    assert_eq!(old["versions"].as_array().unwrap().len(), 4, "{list}");

    // Removed on bravo: listed from the trash on alpha, brought back by
    // alpha at its path (directory made again), with its last version.
    fs::remove_file(b.path("docs/report")).unwrap();
    fs::remove_dir(b.path("docs")).unwrap();
    let list = wait_versions(&a, "docs/report", "the removed file in the trash", |l| {
        l["files"][0]["deleted"]["by"] == "bravo"
    });
    assert_eq!(numbers(&list), [1]);
    let r = restore(&a, "docs/report", &[]);
    assert_eq!(r["undeleted"], true, "{r}");
    wait_content(&c, "docs/report", b"rewritten by an editor");
    // The older file, replaced by the editor's save, is there too: brought
    // back by name once the path is free, at the version asked for.
    let o = common::meshfs(&[
        "restore",
        a.path("docs/report").to_str().unwrap(),
        "--deleted",
        &old_id.to_string(),
    ]);
    assert!(!o.status.success(), "a file is at the path: refused");
    assert!(
        common::stderr(&o).contains("move it away"),
        "{}",
        common::stderr(&o)
    );
    fs::rename(a.path("docs/report"), a.path("docs/report.editor")).unwrap();
    restore(
        &a,
        "docs/report",
        &["--deleted", &old_id.to_string(), "--version", "2"],
    );
    wait_content(&b, "docs/report", &v[1]);
    wait_content(&c, "docs/report.editor", b"rewritten by an editor");
    // Nothing to list at a path that never held a file.
    let e = versions(&a, "docs/never").unwrap_err();
    assert!(e.contains("no such file, and none in the trash"), "{e}");
}

fn cache_bytes(d: &Device) -> u64 {
    d.status_json()["cache_bytes"].as_u64().unwrap()
}

fn check_ok(d: &Device) {
    let dd = d.data_dir();
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn retention_drops_the_oldest_everywhere_and_kept_versions_survive_eviction_and_their_author() {
    require_root!();
    let keep: &[(&str, &str)] = &[("versions_keep", "2"), ("versions_prune_s", "1")];
    let mut d = common::mesh(
        LIMIT,
        &[("alpha", keep), ("bravo", keep), ("charlie", keep)],
    );
    let (c, b, mut a) = (d.pop().unwrap(), d.pop().unwrap(), d.pop().unwrap());
    let v: Vec<Vec<u8>> = (0..5).map(|i| bytes(400_000, 500 + i as u64)).collect();
    for data in &v {
        save(&a, "big", data);
    }
    // Two old versions and the current one stay, on every device.
    for dev in [&a, &b, &c] {
        wait_versions(dev, "big", "versions 3..=5 only", |l| {
            numbers(l) == [3, 4, 5]
        });
    }
    assert!(!b.path(".meshfs/versions/big/1").exists());
    // The dropped versions' chunks are released: references match.
    check_ok(&a);
    // Besides alpha, replication places every kept version on one of
    // bravo and charlie; the other only caches what it reads. That one
    // reads every kept version (1.2 MB), then gets a 1 MiB cache.
    let deadline = Instant::now() + LIMIT;
    while b.own_holdings() + c.own_holdings() == 0 {
        assert!(Instant::now() < deadline, "no second copy placed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut cacher, placed) = if b.own_holdings() > 0 { (c, b) } else { (b, c) };
    for (n, data) in [(3, &v[2]), (4, &v[3]), (5, &v[4])] {
        let p = cacher.path(&format!(".meshfs/versions/big/{n}"));
        assert_eq!(&fs::read(&p).unwrap(), data, "version {n}");
    }
    let full = cache_bytes(&cacher);
    assert!(
        full >= 1_200_000,
        "{} caches only {full} bytes",
        cacher.name
    );
    cacher.unmount();
    cacher.set_config("cache_limit_mb", "1");
    cacher.mount();
    cacher.wait_connected(&["alpha", "bravo", "charlie"], LIMIT);
    let deadline = Instant::now() + LIMIT;
    while cache_bytes(&cacher) + (200 << 10) > full {
        assert!(
            Instant::now() < deadline,
            "nothing evicted from {full} bytes"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The author (every version's first holder) dies: the kept versions
    // are still there, on the device replication placed them on.
    a.kill9();
    for dev in [&cacher, &placed] {
        for (n, data) in [(3, &v[2]), (4, &v[3]), (5, &v[4])] {
            let p = dev.path(&format!(".meshfs/versions/big/{n}"));
            assert_eq!(&fs::read(&p).unwrap(), data, "version {n} on {}", dev.name);
        }
    }
}
