//! `scripts/netns-mesh`: three devices in network namespaces over a shaped
//! link (rate limit, packet loss, added delay), exchanging a file.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshfs::control::{request, Request};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-mesh");

/// The namespaces, bridge and addresses are fixed names: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Tears the namespaces down even when the test fails.
struct Netns {
    work: PathBuf,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Netns {
    fn up(work: &Path, opts: &[&str]) -> Self {
        let n = Netns {
            work: work.to_path_buf(),
            // A failed test poisons the lock; the next one still runs.
            _turn: ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let o = n.script("up", opts);
        assert!(
            o.status.success(),
            "netns-mesh up failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            common::stderr(&o)
        );
        n
    }

    fn script(&self, cmd: &str, opts: &[&str]) -> std::process::Output {
        Command::new(SCRIPT)
            .arg(cmd)
            .args(opts)
            .env("MESH_WORK", &self.work)
            .env("MESHFS_BIN", common::MESHFS)
            .output()
            .expect("run netns-mesh")
    }

    fn data(&self, dev: &str) -> PathBuf {
        self.work.join(dev).join("data")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.script("down", &[]);
    }
}

#[test]
fn three_namespaced_devices_exchange_a_file_over_a_shaped_link() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("netns");
    let net = Netns::up(
        &work,
        &["--rate", "40mbit", "--loss", "0.005", "--delay-ms", "10"],
    );
    let data = common::bytes(4 << 20, 21);
    let mut f = std::fs::File::create(work.join("a/mnt/f.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let chunks = request(
        &net.data("a"),
        &Request::Chunks {
            path: "f.bin".into(),
        },
    )
    .unwrap();
    let hashes: Vec<String> = chunks["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hash"].as_str().unwrap().to_string())
        .collect();
    let out = tmp.path().join("out.bin");
    let t = Instant::now();
    let r = request(
        &net.data("c"),
        &Request::Fetch {
            from: vec!["a".into()],
            hashes,
            out: Some(out.clone()),
        },
    );
    let took = t.elapsed();
    r.expect("fetch across namespaces");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // 4 MiB cannot cross a 40 Mbit/s link in under 0.8 s: the shaping is
    // really there.
    assert!(took > Duration::from_millis(700), "took {took:?}");
    // Both ends add 10 ms to what they receive: the RTT shows it.
    let st = request(&net.data("c"), &Request::Status).unwrap();
    let rtt = st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "a")
        .and_then(|d| d["rtt_ms"].as_f64())
        .unwrap_or(0.0);
    assert!(rtt >= 19.0, "rtt {rtt} ms");
    eprintln!("4 MiB over 40 Mbit/s, 0.5% loss, +10 ms each way: {took:?}, rtt {rtt:.1} ms");
}

fn voters(data: &Path) -> usize {
    request(data, &Request::Status).unwrap()["raft"]["voters"]
        .as_array()
        .map_or(0, |v| v.len())
}

#[test]
fn a_partitioned_minority_cannot_commit_and_converges_after_healing() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("netns");
    let net = Netns::up(&work, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while voters(&net.data("a")) < 3 {
        assert!(Instant::now() < deadline, "never 3 voters");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(work.join("a/mnt/before"), b"0").unwrap();
    let o = net.script("partition", &["c"]);
    assert!(o.status.success(), "{}", common::stderr(&o));

    // The minority (c alone) cannot commit: its create fails with EIO once
    // the write timeout (10 s) runs out, and leaves nothing behind.
    let t = Instant::now();
    let err = std::fs::write(work.join("c/mnt/minority"), b"lost").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() >= Duration::from_secs(5), "{:?}", t.elapsed());
    // The majority goes on.
    for i in 0..20 {
        std::fs::write(work.join(format!("a/mnt/majority-{i}")), format!("{i}")).unwrap();
    }
    assert_eq!(
        std::fs::read(work.join("b/mnt/majority-19")).unwrap(),
        b"19"
    );

    let o = net.script("heal", &["c"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // An open waits for the read index: once c reaches a leader again it
        // sees every committed change.
        if let Ok(b) = std::fs::read(work.join("c/mnt/majority-19")) {
            assert_eq!(b, b"19");
            break;
        }
        assert!(Instant::now() < deadline, "c never converged");
        std::thread::sleep(Duration::from_millis(200));
    }
    for dev in ["a", "b", "c"] {
        assert!(!work.join(format!("{dev}/mnt/minority")).exists(), "{dev}");
        assert_eq!(
            std::fs::read(work.join(format!("{dev}/mnt/before"))).unwrap(),
            b"0"
        );
        for i in 0..20 {
            let got = std::fs::read(work.join(format!("{dev}/mnt/majority-{i}"))).unwrap();
            assert_eq!(got, format!("{i}").as_bytes(), "{dev} majority-{i}");
        }
    }
}
