//! Operating a device: the Prometheus endpoint, through real daemons and
//! real mounts.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{mesh, Device};

const LIMIT: Duration = Duration::from_secs(30);

/// One HTTP/1.1 request to `url` (http://host:port/path); the status code
/// and the body.
fn http(method: &str, url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_string())
}

/// The value of one series (`name{labels}` exactly as exposed).
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn metrics_url(d: &Device) -> String {
    d.status_json()["metrics_url"]
        .as_str()
        .expect("status gives metrics_url")
        .to_string()
}

#[test]
fn each_device_serves_prometheus_metrics_of_what_it_does() {
    require_root!();
    let cfg: &[(&str, &str)] = &[("replicas", "1"), ("prefetch", "false")];
    let devs = mesh(LIMIT, &[("alpha", cfg), ("bravo", cfg)]);
    let (a, b) = (&devs[0], &devs[1]);
    let (ua, ub) = (metrics_url(a), metrics_url(b));
    assert_ne!(ua, ub, "two devices on one machine share no port");
    assert!(ua.starts_with("http://127.0.0.1:"), "{ua}");

    // Written on alpha, read on bravo: bravo's chunks come from alpha.
    let data = common::bytes(3 << 20, 7);
    std::fs::write(a.path("f"), &data).unwrap();
    let t = Instant::now();
    let got = loop {
        match std::fs::read(b.path("f")) {
            Ok(g) if g.len() == data.len() => break g,
            _ if t.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("bravo never read f: {:?}", other.map(|g| g.len())),
        }
    };
    assert!(got == data);

    let (code, text) = http("GET", &ub);
    assert_eq!(code, 200);
    assert!(text.ends_with("# EOF\n"), "an OpenMetrics exposition");
    let count = |op: &str| {
        series(
            &text,
            &format!("meshfs_fuse_operation_seconds_count{{op=\"{op}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(count("open") >= 1.0 && count("read") >= 1.0, "{text}");
    assert_eq!(count("write"), 0.0, "bravo wrote nothing");
    let fetched = series(&text, "meshfs_chunk_reads_total{from=\"remote\"}").unwrap()
        + series(&text, "meshfs_chunk_reads_total{from=\"ahead\"}").unwrap();
    assert!(fetched >= 1.0, "bravo's chunks came from alpha: {text}");
    assert_eq!(
        series(&text, "meshfs_peer_up{peer=\"alpha\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(series(&text, "meshfs_peer_rtt_seconds{peer=\"alpha\"}").is_some());
    assert!(
        series(&text, "meshfs_peer_received_bytes_total{peer=\"alpha\"}").unwrap()
            >= (3 << 20) as f64
    );
    assert!(series(&text, "meshfs_raft_term").unwrap() >= 1.0);
    assert!(
        text.contains("meshfs_raft_leader_info{leader=\""),
        "a leader is known"
    );
    assert!(text.contains("meshfs_device_info{"), "{text}");

    // Alpha wrote: its own write latencies, commits, and its peer bravo.
    let (_, text_a) = http("GET", &ua);
    assert!(series(&text_a, "meshfs_fuse_operation_seconds_count{op=\"write\"}").unwrap() >= 1.0);
    assert!(series(&text_a, "meshfs_commits_total").unwrap() >= 1.0);
    assert_eq!(series(&text_a, "meshfs_peer_up{peer=\"bravo\"}"), Some(1.0));

    assert_eq!(http("GET", &ub.replace("/metrics", "/nope")).0, 404);
    assert_eq!(http("POST", &ub).0, 405);
}

#[test]
fn metrics_can_be_turned_off_or_pinned_to_a_port() {
    require_root!();
    let mut d = Device::init("alpha");
    d.set_config("http_listen", "\"off\"");
    d.mount();
    assert!(d.status_json()["metrics_url"].is_null());
    d.unmount();

    // A port of its own; when another program holds it, the mount still
    // comes up, without metrics, and the log says why.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    d.set_config("http_listen", &format!("\"127.0.0.1:{port}\""));
    d.mount();
    assert!(d.status_json()["metrics_url"].is_null());
    assert!(
        d.log().contains("could not listen for metrics"),
        "{}",
        d.log()
    );
    d.unmount();
    drop(holder);
    d.mount();
    let url = metrics_url(&d);
    assert_eq!(url, format!("http://127.0.0.1:{port}/metrics"));
    assert_eq!(http("GET", &url).0, 200);
}

fn cache_bytes(d: &Device) -> u64 {
    d.status_json()["cache_bytes"].as_u64().unwrap()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pinned_tree_is_fetched_at_once_and_never_evicted() {
    require_root!();
    let cfg: &[(&str, &str)] = &[("replicas", "1"), ("prefetch", "false")];
    let small: &[(&str, &str)] = &[
        ("replicas", "1"),
        ("prefetch", "false"),
        ("cache_limit_mb", "8"),
        ("passthrough", "false"),
    ];
    let mut devs = mesh(LIMIT, &[("alpha", cfg), ("bravo", small)]);
    let a = &devs[0];
    std::fs::create_dir_all(a.path("keep/sub")).unwrap();
    let (ka, kb, other) = (
        common::bytes(6 << 20, 1),
        common::bytes(4 << 20, 2),
        common::bytes(6 << 20, 3),
    );
    std::fs::write(a.path("keep/a"), &ka).unwrap();
    std::fs::write(a.path("keep/sub/b"), &kb).unwrap();
    std::fs::write(a.path("other"), &other).unwrap();
    let b = &devs[1];
    wait_for("bravo to see keep/sub/b", LIMIT, || {
        std::fs::metadata(b.path("keep/sub/b")).is_ok_and(|m| m.len() == kb.len() as u64)
    });
    let before = cache_bytes(b);
    assert!(
        before < 1 << 20,
        "bravo holds nothing of alpha's yet: {before}"
    );

    let bad = common::meshfs(&["pin", b.path("nope").to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(
        common::stderr(&bad).contains("no such file"),
        "{}",
        common::stderr(&bad)
    );

    // Not a terminal: plain progress lines, then the end.
    let o = common::meshfs(&["pin", b.path("keep").to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{}", out, common::stderr(&o));
    assert!(out.contains("MiB ("), "a progress line: {out}");
    assert!(out.contains("pinned") && out.contains("2 files"), "{out}");
    let bd = b.data_dir();
    let pins = common::meshfs(&["pins", "--data-dir", bd.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&pins.stdout).unwrap();
    let p = &v["pins"][0];
    assert_eq!(p["path"], "/keep");
    assert_eq!(p["complete"], true, "{v}");
    assert_eq!(p["bytes_total"].as_u64(), Some(10 << 20));
    // The tree is here: 10 MiB more, over the 8 MiB limit.
    assert!(cache_bytes(b) >= before + (10 << 20));

    // Reading a file nobody pinned here caches it; eviction then takes it
    // back to the limit, and leaves the pinned tree whole.
    assert!(std::fs::read(b.path("other")).unwrap() == other);
    wait_for("eviction of the unpinned copy", LIMIT, || {
        cache_bytes(b) < before + (11 << 20)
    });
    let v: serde_json::Value = serde_json::from_slice(
        &common::meshfs(&["pins", "--data-dir", bd.to_str().unwrap(), "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(v["pins"][0]["bytes_here"].as_u64(), Some(10 << 20), "{v}");

    // Pins survive a restart, follow a rename, and can be dropped; then
    // the tree is a cached copy like any other and goes over the limit.
    devs[1].unmount();
    devs[1].mount();
    let b = &devs[1];
    std::fs::rename(b.path("keep"), b.path("kept")).unwrap();
    let o = common::meshfs(&["pins", "--data-dir", bd.to_str().unwrap()]);
    let listed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        listed.contains("/keep") && listed.contains("(here)"),
        "{listed}"
    );
    let o = common::meshfs(&["unpin", b.path("kept").to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = common::meshfs(&["pins", "--data-dir", bd.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no pins"));
    wait_for("eviction of the unpinned tree", LIMIT, || {
        cache_bytes(b) <= 8 << 20
    });
    assert!(
        std::fs::read(b.path("kept/a")).unwrap() == ka,
        "still readable from alpha"
    );
}

/// The DOM of `url` after its scripts ran, from headless Chromium (Debian's
/// package, installed by scripts/setup).
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.path().display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium (scripts/setup installs it)");
    assert!(o.status.success(), "chromium: {}", common::stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The text of the element with id `id` (its inner HTML up to the close of
/// the same tag).
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let end = dom[at..]
        .find(&format!("</{tag}>"))
        .map_or(dom.len(), |e| at + e);
    &dom[at..end]
}

#[test]
fn the_dashboard_shows_the_mesh_who_governs_what_and_prefetch() {
    require_root!();
    let cfg: &[(&str, &str)] = &[("replicas", "1")];
    let devs = mesh(LIMIT, &[("alpha", cfg), ("bravo", cfg)]);
    let (a, b) = (&devs[0], &devs[1]);
    std::fs::create_dir(a.path("docs")).unwrap();
    std::fs::write(a.path("docs/one"), common::bytes(100_000, 1)).unwrap();
    std::fs::write(a.path("docs/two"), common::bytes(50_000, 2)).unwrap();
    wait_for("bravo to see /docs", LIMIT, || b.path("docs/two").exists());
    std::fs::create_dir(b.path("music")).unwrap();
    std::fs::write(b.path("music/song"), common::bytes(70_000, 3)).unwrap();
    wait_for("alpha to see /music", LIMIT, || {
        a.path("music/song").exists()
    });

    let url = a.status_json()["dashboard_url"]
        .as_str()
        .expect("status gives dashboard_url")
        .to_string();
    // The data first: who governs each top-level directory.
    let (code, body) = http("GET", &format!("{url}api/state"));
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dir = |p: &str| {
        st["dirs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["path"] == p)
            .unwrap_or_else(|| panic!("no {p} in {st}"))
            .clone()
    };
    assert_eq!(dir("/docs/")["files"], 2);
    assert_eq!(dir("/docs/")["bytes"], 150_000);
    assert_eq!(dir("/docs/")["governed"]["alpha"], 2, "{st}");
    assert_eq!(dir("/music/")["governed"]["bravo"], 1, "{st}");
    // One copy each (replicas = 1), on the device that governs it.
    assert_eq!(dir("/music/")["placed"]["bravo"], 70_000, "{st}");

    // The page, as a browser renders it.
    let dom = rendered(&url);
    assert!(dom.contains("meshfs: alpha"), "{dom}");
    let devices = element(&dom, "table", "devices");
    assert!(
        devices.contains("bravo") && devices.contains("alpha (this device)"),
        "{devices}"
    );
    assert!(
        devices.contains(">up<") && devices.contains(" ms<"),
        "{devices}"
    );
    let graph = element(&dom, "svg", "graph");
    assert!(
        graph.contains("<circle") && graph.contains("bravo") && graph.contains(" ms"),
        "{graph}"
    );
    let dirs = element(&dom, "table", "dirs");
    assert!(
        dirs.contains("/docs/") && dirs.contains("alpha: 2"),
        "{dirs}"
    );
    assert!(
        dirs.contains("/music/") && dirs.contains("bravo: 1"),
        "{dirs}"
    );
    let prefetch = element(&dom, "table", "prefetch");
    assert!(
        prefetch.contains("hit rate") && prefetch.contains("wasted"),
        "{prefetch}"
    );
}
