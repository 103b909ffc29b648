//! The prefetch harness and trace tools through the real `meshfs` binary:
//! `meshfs trace gen` and `meshfs prefetch-eval` on a generated trace, and
//! clear errors on bad input.

use std::process::Command;

fn meshfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshfs"))
}

#[test]
fn harness_scores_every_predictor_on_a_generated_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("routine.jsonl");
    let out = meshfs()
        .args(["trace", "gen", "routine", "--events", "1500", "--seed", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&trace, &out.stdout).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1500);

    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .args(["--cache-mb", "8", "--top", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["predictor"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
            .clone()
    };
    for name in [
        "last-successor",
        "markov",
        "markov-2",
        "markov-8",
        "gru",
        "gru+markov",
        "selector",
    ] {
        let r = row(name);
        for k in ["top1", "top5", "local_hit_rate"] {
            let v = r[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{name}.{k} = {v}");
        }
        assert!(r["wasted_bytes"].as_u64().is_some(), "{name}");
        assert!(r["top5"].as_f64() >= r["top1"].as_f64(), "{name}");
    }
    // The routine repeats daily with noise: context beats the last resource
    // alone, and the GRU learns it within 1,500 events.
    let top1 = |name: &str| row(name)["top1"].as_f64().unwrap();
    assert!(top1("markov-2") > top1("last-successor"), "{rows:?}");
    assert!(top1("gru") > 0.5, "{rows:?}");
    assert!(
        row("markov")["local_hit_rate"].as_f64().unwrap() > 0.5,
        "{rows:?}"
    );

    // The table form names the same predictors.
    let out = meshfs()
        .args(["prefetch-eval", "--no-learned", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("markov-8") && text.contains("1500 events"),
        "{text}"
    );
}

#[test]
fn bad_traces_and_arguments_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"ts_ms\":1,\"device\":\"a\",\"user\":\"u\",\"path\":\"/p\",\"size\":1}\n{\"ts_ms\":\n",
    )
    .unwrap();
    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.lines().count() == 1, "{err}");

    let out = meshfs()
        .args(["prefetch-eval", "--trace", "/nonexistent/trace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open trace"));

    std::fs::write(&trace, "\n").unwrap();
    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no events"));

    let out = meshfs().args(["trace", "gen", "nosuch"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload"));

    let out = meshfs()
        .args(["prefetch-eval", "--trace", "x", "--top", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses --top 0");
}

#[macro_use]
mod common;

use common::Device;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

fn prefetch(d: &Device) -> serde_json::Value {
    d.status_json()["prefetch"].clone()
}

fn count(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Reads every file in order, as a workflow would, with a pause between
/// files (the time a person or a build spends on each).
fn walk(d: &Device, files: &[String], pause: Duration) {
    for f in files {
        let data = std::fs::read(d.path(f)).unwrap();
        assert_eq!(data.len(), 200_000, "{f}");
        std::thread::sleep(pause);
    }
}

/// Waits until `d` has received `n` events from other devices.
fn wait_remote_events(d: &Device, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while count(&prefetch(d), "remote_events") < n {
        assert!(
            Instant::now() < deadline,
            "{} got fewer than {n} events from others: {}",
            d.name,
            prefetch(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` files of 200,000 bytes in `dir` on `d`, in workflow order.
fn workflow_files(d: &Device, dir: &str, n: usize, seed: u64) -> Vec<String> {
    std::fs::create_dir(d.path(dir)).unwrap();
    let files: Vec<String> = (0..n).map(|i| format!("{dir}/step{i:02}.dat")).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(d.path(f), common::bytes(200_000, seed + i as u64)).unwrap();
    }
    files
}

/// Five one-byte files f0..f4 created on `d`, then read in order `rounds`
/// times: 5 + 5 x rounds opens.
fn small_cycle(d: &Device, rounds: usize) {
    for i in 0..5 {
        std::fs::write(d.path(&format!("f{i}")), b"x").unwrap();
    }
    for _ in 0..rounds {
        for i in 0..5 {
            std::fs::read(d.path(&format!("f{i}"))).unwrap();
        }
    }
}

/// The device's access log as `meshfs trace export` writes it.
fn export(d: &Device) -> Vec<meshfs::prefetch::trace::TraceEvent> {
    let out = meshfs()
        .args(["trace", "export", "--data-dir"])
        .arg(d.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    meshfs::prefetch::trace::read(&out.stdout[..]).unwrap()
}

/// A workflow done on alpha is repeated on bravo (prefetch on) and on
/// charlie (prefetch off). With one copy of each file (replicas = 1, on
/// alpha), every open elsewhere needs the network unless something fetched
/// the file first: bravo's opens are served locally because it learned the
/// sequence from alpha's shared access events; charlie's are not.
#[test]
fn a_workflow_repeated_on_another_device_is_served_from_its_cache() {
    require_root!();
    let one = ("replicas", "1");
    let mut devices = common::mesh(
        LIMIT,
        &[
            ("alpha", &[one]),
            ("bravo", &[one]),
            ("charlie", &[one, ("prefetch", "false")]),
        ],
    );
    let (c, b, a) = (
        devices.pop().unwrap(),
        devices.pop().unwrap(),
        devices.pop().unwrap(),
    );
    let files = workflow_files(&a, "work", 24, 900);
    for _ in 0..3 {
        walk(&a, &files, Duration::ZERO);
    }
    // Alpha's events reach both other devices (creates + 3 walks).
    for d in [&b, &c] {
        wait_remote_events(d, 3 * 24, LIMIT);
    }

    walk(&b, &files, Duration::from_millis(150));
    walk(&c, &files, Duration::from_millis(150));
    let (pb, pc) = (prefetch(&b), prefetch(&c));
    eprintln!("bravo (prefetch on): {pb}\ncharlie (prefetch off): {pc}");
    // Charlie fetched every file on demand; bravo most from its cache.
    assert_eq!(count(&pc, "hits"), 0, "{pc}");
    assert!(count(&pc, "misses") >= 23, "{pc}");
    assert!(
        count(&pb, "hits") >= 16,
        "bravo served too few opens locally: {pb}"
    );
    assert!(count(&pb, "misses") <= 8, "{pb}");
    assert!(count(&pb, "prefetched_bytes") >= 16 * 200_000, "{pb}");
    assert_eq!(count(&pb, "rejected_batches"), 0, "{pb}");

    // The exported trace names alpha's walk in order, with paths.
    let events = export(&b);
    let alpha_walk: Vec<&str> = events
        .iter()
        .filter(|e| e.device == "alpha" && e.size == 200_000)
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(alpha_walk.len(), 3 * 24, "{events:?}");
    assert_eq!(alpha_walk[1], "/work/step01.dat");
    assert!(
        events.iter().any(|e| e.device == "bravo"),
        "bravo's own opens are logged"
    );
    let users: std::collections::HashSet<&str> = events.iter().map(|e| e.user.as_str()).collect();
    assert_eq!(
        users.len(),
        1,
        "root on every device is one mesh user: {users:?}"
    );
    assert!(
        events.iter().all(|e| !format!("{e:?}").contains("root")),
        "user names never appear"
    );
    drop((a, b, c));
}

/// A damaged model checkpoint does not stop the daemon: it says so in its
/// log and status, predicts with the Markov model, and learns a new GRU.
#[test]
fn a_damaged_model_checkpoint_falls_back_to_markov() {
    require_root!();
    let mut a = Device::init("alpha");
    let model = a.data_dir().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("gru.ot"), b"not a checkpoint").unwrap();
    std::fs::write(model.join("gru.vocab"), b"\xff\xff\xff").unwrap();
    a.mount();
    small_cycle(&a, 3);
    let deadline = Instant::now() + LIMIT;
    let p = loop {
        // The model report refreshes when the engine is idle.
        let p = prefetch(&a);
        if count(&p, "local_events") >= 20
            && p["model"]["accuracy"]["markov"].as_f64().unwrap_or(0.0) > 0.5
        {
            break p;
        }
        assert!(Instant::now() < deadline, "{p}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let state = p["model"]["gru_state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(state.contains("fallback"), "{p}");
    assert!(a.log().contains("checkpoint unusable"), "{}", a.log());
    assert_eq!(p["model"]["selected"], "markov", "{p}");
    a.unmount();
}

/// A person moves from alpha to bravo: once alpha's session goes quiet,
/// bravo (where they went after alpha before) fetches what that session
/// would open next, so even bravo's first open of the workflow is local;
/// but only once following would have paid off for this person before.
#[test]
fn the_next_device_fetches_the_continuation_of_a_quiet_session() {
    require_root!();
    let one = ("replicas", "1");
    let mut devices = common::mesh(
        LIMIT,
        &[
            ("alpha", &[one]),
            ("bravo", &[one, ("prefetch_follow_after_s", "2")]),
        ],
    );
    let (b, a) = (devices.pop().unwrap(), devices.pop().unwrap());
    let first = workflow_files(&a, "w", 8, 700);
    let second = workflow_files(&a, "v", 8, 900);
    // Alpha's 16 creates count as opens too.
    let mut events = 16;
    // A cycle walked on alpha, ending on the last file, then a note written
    // on bravo: bravo learns that this person moves from alpha to bravo.
    for _ in 0..3 {
        walk(&a, &first, Duration::ZERO);
    }
    events += 3 * 8;
    wait_remote_events(&b, events, LIMIT);
    std::fs::write(b.path("note"), b"bravo's own").unwrap();
    // Nothing predicts what follows a new note: bravo fetched nothing.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        count(&prefetch(&b), "prefetched_bytes"),
        0,
        "{}",
        prefetch(&b)
    );
    // The next session on alpha, then quiet (2 s, the setting, and a
    // margin: events travel in batches a second apart). Following has never
    // paid off for this person yet, so bravo does not follow...
    walk(&a, &first, Duration::ZERO);
    events += 8;
    wait_remote_events(&b, events, LIMIT);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        count(&prefetch(&b), "prefetched_bytes"),
        0,
        "followed without evidence: {}",
        prefetch(&b)
    );
    // ... but the person goes on on bravo where alpha's session stopped:
    // following would have paid off.
    std::fs::read(b.path(&first[0])).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let settled = count(&prefetch(&b), "prefetched_bytes");
    // Another workflow on alpha, then quiet: now bravo fetches what that
    // session would open next.
    for _ in 0..3 {
        walk(&a, &second, Duration::ZERO);
    }
    events += 3 * 8;
    wait_remote_events(&b, events, LIMIT);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        count(&prefetch(&b), "prefetched_bytes") >= settled + 200_000,
        "bravo never fetched ahead: {}",
        prefetch(&b)
    );
    let before = prefetch(&b);
    std::fs::read(b.path(&second[0])).unwrap();
    let after = prefetch(&b);
    assert_eq!(
        count(&after, "hits"),
        count(&before, "hits") + 1,
        "{before}\n{after}"
    );
    assert_eq!(count(&after, "misses"), count(&before, "misses"), "{after}");
}

/// Gossip reaches only devices that are up; a device that was away gets the
/// events it missed when it is back, from each origin's answer to its log
/// digest.
#[test]
fn a_device_that_was_away_catches_up_on_the_access_log() {
    require_root!();
    // Charlie keeps the quorum while bravo is away.
    let mut devices = common::mesh(LIMIT, &[("alpha", &[]), ("bravo", &[]), ("charlie", &[])]);
    let (_c, mut b, a) = (
        devices.pop().unwrap(),
        devices.pop().unwrap(),
        devices.pop().unwrap(),
    );
    b.unmount();
    small_cycle(&a, 2);
    b.mount();
    wait_remote_events(&b, 15, Duration::from_secs(60));
    assert!(
        count(&prefetch(&a), "resent_events") >= 15,
        "{}",
        prefetch(&a)
    );
    // Exported from bravo: alpha's reads while bravo was away, in order.
    let events = export(&b);
    let reads: Vec<&str> = events
        .iter()
        .filter(|e| e.device == "alpha")
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(reads.len(), 15, "{reads:?}");
    assert_eq!(&reads[5..10], ["/f0", "/f1", "/f2", "/f3", "/f4"]);
}

/// `access_share = false` keeps a device's log to itself, and the others'
/// away from it; `access_learn = false` records and learns nothing.
#[test]
fn sharing_and_learning_can_be_switched_off() {
    require_root!();
    let mut devices = common::mesh(
        LIMIT,
        &[
            ("alpha", &[("access_share", "false")]),
            ("bravo", &[("access_learn", "false")]),
            ("charlie", &[]),
        ],
    );
    let (c, b, a) = (
        devices.pop().unwrap(),
        devices.pop().unwrap(),
        devices.pop().unwrap(),
    );
    for i in 0..4 {
        std::fs::write(a.path(&format!("a{i}")), b"x").unwrap();
        std::fs::read(a.path(&format!("a{i}"))).unwrap();
    }
    std::fs::write(b.path("b0"), b"x").unwrap();
    std::fs::write(c.path("c0"), b"x").unwrap();
    // Alpha's eight events never leave it, and charlie's one is not kept
    // there either: a device that does not share keeps no one else's.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&prefetch(&a), "local_events"), 8, "{}", prefetch(&a));
    assert_eq!(count(&prefetch(&a), "remote_events"), 0, "{}", prefetch(&a));
    assert_eq!(count(&prefetch(&c), "remote_events"), 0, "{}", prefetch(&c));
    let pb = prefetch(&b);
    assert_eq!(pb["enabled"], false, "{pb}");
    assert_eq!(count(&pb, "local_events"), 0, "{pb}");
    assert!(export(&b).is_empty(), "bravo records nothing");
    let on_charlie = export(&c);
    assert!(
        on_charlie.iter().all(|e| e.device == "charlie"),
        "{on_charlie:?}"
    );
    let on_alpha = export(&a);
    assert_eq!(on_alpha.len(), 8, "{on_alpha:?}");
    assert!(on_alpha.iter().all(|e| e.device == "alpha"), "{on_alpha:?}");
}
