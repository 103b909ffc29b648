//! Devices forming a mesh: separate `meshfs` processes on loopback, each
//! with its own data dir, port and mount point. Invite and join, chunk
//! exchange through `MeshClient` (driven over the control socket) and
//! through another device's mount (the readahead window), the mesh key and
//! the member list keeping others out, corrupt peers, and peers dying
//! mid-transfer.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{bytes, flip_in_db, mesh, Device};
use meshfs::control::Request;
use meshfs::mesh::protocol::InviteCode;

const CONNECT: Duration = Duration::from_secs(30);

/// Writes `data` into `rel` on `d`'s mount and returns its chunk hashes.
fn put_file(d: &Device, rel: &str, data: &[u8]) -> Vec<String> {
    let mut f = std::fs::File::create(d.path(rel)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    chunk_hashes(d, rel)
}

fn chunk_hashes(d: &Device, rel: &str) -> Vec<String> {
    let v = d
        .control(&Request::Chunks { path: rel.into() })
        .expect("chunks");
    v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hash"].as_str().unwrap().to_string())
        .collect()
}

/// Asks `d` to fetch `hashes` from the devices in `from` (in order) into
/// a file; returns the reply or the error.
fn fetch(
    d: &Device,
    from: &[&str],
    hashes: &[String],
) -> (Result<serde_json::Value, String>, tempfile::NamedTempFile) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let r = d.control(&Request::Fetch {
        from: from.iter().map(|s| s.to_string()).collect(),
        hashes: hashes.to_vec(),
        out: Some(out.path().to_path_buf()),
    });
    (r, out)
}

fn device_field(d: &Device, name: &str, field: &str) -> serde_json::Value {
    let st = d.status_json();
    st["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .map(|x| x[field].clone())
        .unwrap_or_default()
}

fn member_count(d: &Device) -> usize {
    d.status_json()["devices"].as_array().unwrap().len()
}

#[test]
fn three_devices_join_and_exchange_chunks() {
    require_root!();
    let a = Device::start("alpha");
    let mut b = Device::join("bravo", &a.invite("10m"));
    b.mount();
    let mut c = Device::join("charlie", &a.invite("10m"));
    c.mount();
    for (d, others) in [
        (&a, ["bravo", "charlie"]),
        (&b, ["alpha", "charlie"]),
        (&c, ["alpha", "bravo"]),
    ] {
        d.wait_connected(&others, CONNECT);
    }
    // Every device learnt the whole list, including the one that joined
    // after it; RTTs are measured; ids are the hex form.
    assert_eq!(member_count(&b), 3);
    for d in b.status_json()["devices"].as_array().unwrap() {
        assert_eq!(d["id"].as_str().map(str::len), Some(32), "{d}");
    }
    let t = Instant::now();
    while device_field(&b, "charlie", "rtt_ms").is_null() {
        assert!(t.elapsed() < CONNECT, "no RTT measured");
        std::thread::sleep(Duration::from_millis(200));
    }

    let data = bytes(3 << 20, 11);
    let hashes = put_file(&a, "photo.jpg", &data);
    assert!(hashes.len() > 10);
    for (d, from) in [(&b, vec!["alpha"]), (&c, vec![])] {
        let (r, out) = fetch(d, &from, &hashes);
        let r = r.expect("fetch");
        assert_eq!(r["chunks"].as_u64(), Some(hashes.len() as u64));
        assert_eq!(std::fs::read(out.path()).unwrap(), data, "{}", d.name);
    }
    // Bravo measured alpha's answers (source choice weighs them).
    let tput = device_field(&b, "alpha", "throughput_mib_s");
    assert!(tput.as_f64().is_some_and(|t| t > 0.0), "throughput {tput}");
    assert_eq!(
        device_field(&b, "alpha", "failed_requests").as_u64(),
        Some(0)
    );

    // Kademlia: charlie finds alpha as a holder through provider records.
    let resource = a
        .control(&Request::Chunks {
            path: "photo.jpg".into(),
        })
        .unwrap()["resource"]
        .as_u64()
        .unwrap();
    let t = Instant::now();
    loop {
        let h = c.control(&Request::Holders { resource }).expect("holders");
        if h["holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "alpha")
        {
            break;
        }
        assert!(t.elapsed() < CONNECT, "no provider record for alpha: {h}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Availability: charlie hears what alpha holds, with its kind.
    let t = Instant::now();
    while device_field(&c, "alpha", "holdings").as_u64() != Some(1) {
        assert!(t.elapsed() < CONNECT, "no availability from alpha");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        device_field(&c, "alpha", "held_bytes").as_u64(),
        Some(data.len() as u64)
    );
}

#[test]
fn invite_codes_are_single_use_expire_and_need_the_secret() {
    require_root!();
    let a = Device::start("alpha");
    let code = a.invite("10m");

    // Wrong secret: refused, nothing created, nothing added.
    let mut wrong = InviteCode::decode(&code).unwrap();
    wrong.secret[0] ^= 1;
    let e = Device::try_join("mallory", &wrong.encode()).err().unwrap();
    assert!(e.contains("refused the code"), "{e}");
    assert_eq!(member_count(&a), 1);
    // The joiner's side keeps nothing of a refused join either.
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("never");
    let o = common::meshfs(&["join", &wrong.encode(), "--data-dir", dd.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(!dd.exists(), "a refused join left {}", dd.display());

    // Junk from another address neither blocks nor closes the invite: 10
    // connections that say nothing (each could hold a serial listener for
    // its whole 10 s conversation) and 30 that send garbage (20 failures
    // used to close it), all from 127.0.0.2; the real joiner comes from
    // 127.0.0.1 and gets in at once.
    let addr = *wrong
        .addrs
        .iter()
        .find(|a| a.ip().is_loopback())
        .expect("a loopback address in the code");
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.extend(connect_from_127_0_0_2(addr));
    }
    for _ in 0..30 {
        if let Some(mut s) = connect_from_127_0_0_2(addr) {
            let _ = s.write_all(b"\x01\xff\xffnot noise at all");
        }
    }
    let t = Instant::now();
    let _b = Device::join("bravo", &code);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "join took {:?}",
        t.elapsed()
    );
    assert_eq!(member_count(&a), 2);
    drop(idle);

    // Used once: a second use gets a clear refusal.
    let e = Device::try_join("charlie", &code).err().unwrap();
    assert!(e.contains("already used"), "{e}");
    assert_eq!(member_count(&a), 2);

    // Expired.
    let short = a.invite("1s");
    std::thread::sleep(Duration::from_millis(2100));
    let e = Device::try_join("delta", &short).err().unwrap();
    assert!(e.contains("expired"), "{e}");

    // A second daemon cannot take a port another one listens on (libp2p
    // would share it silently).
    let listen = a.status_json()["listen"][0].as_str().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("d");
    let mnt = tmp.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let (dds, mnts) = (dd.to_str().unwrap(), mnt.to_str().unwrap());
    let o = common::meshfs(&["init", "--data-dir", dds, "--listen", &listen]);
    assert!(o.status.success());
    let o = common::meshfs(&["mount", "--data-dir", dds, mnts]);
    assert!(!o.status.success(), "a second daemon took {listen}");
    assert!(
        common::stderr(&o).contains("in use"),
        "{}",
        common::stderr(&o)
    );
    assert!(!common::is_mounted(&mnt));

    // A mistyped code is caught before any connection.
    let mut typo = code.clone();
    typo.pop();
    typo.push(if code.ends_with('0') { '1' } else { '0' });
    let e = Device::try_join("echo", &typo).err().unwrap();
    assert!(e.contains("checksum"), "{e}");
    assert_eq!(member_count(&a), 2);
}

/// `meshfs join` takes the code from standard input (`-`) or a file as
/// well as from its arguments (visible to every user in `ps`).
#[test]
fn join_reads_the_code_from_stdin_or_a_file() {
    require_root!();
    let a = Device::start("alpha");
    let tmp = tempfile::tempdir().unwrap();
    let dd = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let piped = |args: &[&str], input: &str| {
        let mut c = std::process::Command::new(common::MESHFS)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let code = a.invite("10m");
    let o = piped(
        &["join", "-", "--data-dir", &dd("b"), "--name", "bravo"],
        &format!("{code}\n"),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(member_count(&a), 2);
    let file = tmp.path().join("code.txt");
    std::fs::write(&file, format!("\n  {}  \n", a.invite("10m"))).unwrap();
    let o = common::meshfs(&[
        "join",
        "--code-file",
        file.to_str().unwrap(),
        "--data-dir",
        &dd("c"),
        "--name",
        "charlie",
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(member_count(&a), 3);
    // No code, a missing file, or both ways at once: one clear line each,
    // and no data dir left behind.
    let o = piped(&["join", "-", "--data-dir", &dd("d")], "");
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("no invite code in standard input"));
    let o = common::meshfs(&[
        "join",
        "--code-file",
        "/nonexistent",
        "--data-dir",
        &dd("e"),
    ]);
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("/nonexistent"),
        "{}",
        common::stderr(&o)
    );
    let o = common::meshfs(&[
        "join",
        &code,
        "--code-file",
        file.to_str().unwrap(),
        "--data-dir",
        &dd("f"),
    ]);
    assert!(!o.status.success());
    for n in ["d", "e", "f"] {
        assert!(!tmp.path().join(n).exists(), "join left {n} behind");
    }
    assert_eq!(member_count(&a), 3);
}

#[test]
fn wrong_mesh_key_and_removed_devices_are_kept_out() {
    require_root!();
    let a = Device::start("alpha");
    let data = bytes(1 << 20, 5);
    let hashes = put_file(&a, "f.bin", &data);
    let mut b = Device::join("bravo", &a.invite("10m"));

    // A clone of bravo holding a different mesh key: it knows alpha's
    // address and is on alpha's list, but cannot complete the Noise
    // handshake, whose prologue is derived from the mesh key.
    let mut x = Device::copy_of(&b, "bravo-clone");
    let stranger = Device::init("stranger");
    std::fs::copy(
        stranger.data_dir().join("mesh/mesh.key"),
        x.data_dir().join("mesh/mesh.key"),
    )
    .unwrap();
    x.mount();
    let t = Instant::now();
    let (r, _) = fetch(&x, &["alpha"], &hashes[..1]);
    assert!(r.is_err(), "a device with the wrong key fetched: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_ne!(device_field(&a, "bravo", "up"), true);
    x.unmount();

    // The real bravo gets in.
    b.mount();
    b.wait_connected(&["alpha"], CONNECT);
    let (r, out) = fetch(&b, &["alpha"], &hashes);
    r.expect("member fetch");
    assert_eq!(std::fs::read(out.path()).unwrap(), data);

    // Removed: its connection is closed and it can fetch no more.
    a.control(&Request::RemoveDevice {
        name: "bravo".into(),
    })
    .expect("remove");
    let t = Instant::now();
    while device_field(&a, "bravo", "name") == "bravo" {
        assert!(t.elapsed() < CONNECT);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, _) = fetch(&b, &["alpha"], &hashes);
    assert!(r.is_err(), "a removed device fetched: {r:?}");
    // bravo either heard of its removal or keeps being refused; either way
    // it stays out.
    let t = Instant::now();
    loop {
        let refused = a.status_json()["refused_connections"].as_u64().unwrap_or(0);
        if refused >= 1 || b.log().contains("this device was removed from the mesh") {
            break;
        }
        assert!(t.elapsed() < CONNECT, "no sign of bravo being kept out");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(device_field(&a, "bravo", "up"), true);
}

#[test]
fn corrupt_peers_are_rejected_and_another_holder_used() {
    require_root!();
    let a = Device::start("alpha");
    let mut b = Device::join("bravo", &a.invite("10m"));
    let mut c = Device::join("charlie", &a.invite("10m"));
    // bravo serves damaged bytes (test hook), as a faulty disk path or a
    // hostile member would.
    let o = b.try_mount_env(&[], &[("MESHFS_FAULT", "corrupt-serve")]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    // charlie keeps no copies of its own: what it reads comes over the mesh.
    c.set_config("replicas", "1");
    c.mount();
    c.wait_connected(&["alpha", "bravo"], CONNECT);

    let data = bytes(2 << 20, 9);
    let hashes = put_file(&a, "doc.pdf", &data);
    // bravo takes a (good) copy from alpha...
    let (r, _) = fetch(&b, &["alpha"], &hashes);
    r.expect("bravo fetch");
    // ...but serves it damaged: charlie rejects every chunk from it, takes
    // them from alpha instead, and records bravo's bad bytes.
    let (r, out) = fetch(&c, &["bravo", "alpha"], &hashes);
    r.expect("fetch around a corrupt peer");
    assert_eq!(std::fs::read(out.path()).unwrap(), data);
    let bad = device_field(&c, "bravo", "bad_chunks")
        .as_u64()
        .unwrap_or(0);
    assert_eq!(bad, hashes.len() as u64);
    // With no one else to ask, the error names the failed verification.
    let (r, _) = fetch(&c, &["bravo"], &hashes[..1]);
    let e = r.err().unwrap();
    assert!(e.contains("BLAKE3"), "{e}");
    // Malformed bytes on the mesh port: the daemon shrugs them off.
    let port = a.status_json()["listen"][0]
        .as_str()
        .and_then(|l| l.rsplit('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap();
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.write_all(&[0xffu8; 4096]);
    }
    let (r, _) = fetch(&c, &["alpha"], &hashes[..1]);
    r.expect("alpha still serves after garbage");

    // Reading through the mount: bravo holds movie.bin too, so charlie's
    // readahead would take turns between it and alpha. bravo's bad bytes
    // are rejected, each chunk is taken from alpha instead, and bravo,
    // caught already, is asked only after everyone else.
    let movie = bytes(16 << 20, 10);
    let movie_hashes = put_file(&a, "movie.bin", &movie);
    let (r, _) = fetch(&b, &["alpha"], &movie_hashes);
    r.expect("bravo copies movie.bin");
    let t = Instant::now();
    while device_field(&c, "bravo", "holdings").as_u64() < Some(2) {
        assert!(
            t.elapsed() < CONNECT,
            "charlie never heard what bravo holds"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(c.path("movie.bin")).unwrap(), movie);
    let bad_after = device_field(&c, "bravo", "bad_chunks").as_u64().unwrap();
    assert!(
        bad_after - bad < movie_hashes.len() as u64 / 4,
        "{} of {} chunks asked of bravo after it was caught",
        bad_after - bad,
        movie_hashes.len()
    );
}

#[test]
fn a_200_mib_file_streams_and_a_dying_peer_is_skipped() {
    require_root!();
    let mut a = Device::start("alpha");
    let mut b = Device::join("bravo", &a.invite("10m"));
    let mut c = Device::join("charlie", &a.invite("10m"));
    b.mount();
    c.mount();
    c.wait_connected(&["alpha", "bravo"], CONNECT);
    let data = bytes(200 << 20, 3);
    let hashes = put_file(&a, "video.mkv", &data);
    let (r, out) = fetch(&b, &["alpha"], &hashes);
    let r = r.expect("bravo copy");
    assert_eq!(std::fs::read(out.path()).unwrap(), data);
    // Streamed: the first chunk is handed on long before the last arrives.
    let (first, total) = (
        r["first_chunk_ms"].as_f64().unwrap(),
        r["total_ms"].as_f64().unwrap(),
    );
    eprintln!("200 MiB over loopback: first chunk after {first:.1} ms, all after {total:.0} ms");
    assert!(first * 4.0 < total, "first {first} ms of {total} ms");
    drop(out);

    // charlie fetches from alpha first; alpha is killed once bytes flow.
    let out = tempfile::NamedTempFile::new().unwrap();
    let (dd, path, hs) = (c.data_dir(), out.path().to_path_buf(), hashes.clone());
    let fetcher = std::thread::spawn(move || {
        meshfs::control::request(
            &dd,
            &Request::Fetch {
                from: vec!["alpha".into(), "bravo".into()],
                hashes: hs,
                out: Some(path),
            },
        )
        .map_err(|e| e.to_string())
    });
    let t = Instant::now();
    while std::fs::metadata(out.path()).map_or(0, |m| m.len()) == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no bytes arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.kill9();
    let r = fetcher.join().unwrap();
    let took = t.elapsed();
    r.expect("fetch moves on to bravo");
    assert_eq!(std::fs::read(out.path()).unwrap(), data);
    eprintln!("fetch with alpha killed mid-way took {took:?}");

    // With alpha the only holder, the fetch fails in bounded time.
    let t = Instant::now();
    let (r, _) = fetch(&c, &["alpha"], &hashes[..2]);
    assert!(r.is_err(), "fetch from a dead peer succeeded");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "took {:?}",
        t.elapsed()
    );
}

/// bravo's readahead counters (`meshfs status --json`, `reads`).
fn reads(d: &Device) -> (u64, u64) {
    let r = &d.status_json()["reads"];
    (
        r["ahead_chunks"].as_u64().unwrap(),
        r["on_demand_chunks"].as_u64().unwrap(),
    )
}

fn wait_for_size(d: &Device, rel: &str, size: u64) {
    let t = Instant::now();
    while std::fs::metadata(d.path(rel)).map_or(0, |m| m.len()) != size {
        assert!(t.elapsed() < CONNECT, "{rel} never reached {size} bytes");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reads_through_another_devices_mount_stream_ahead_and_survive_a_dying_holder() {
    require_root!();
    // One copy of everything and no prefetch: every byte bravo reads comes
    // over the mesh when the read asks for it.
    let cfg: &[(&str, &str)] = &[
        ("replicas", "1"),
        ("prefetch", "false"),
        ("access_learn", "false"),
    ];
    let mut devs = mesh(CONNECT, &[("alpha", cfg), ("bravo", cfg), ("charlie", cfg)]);
    let (seq, rnd, big) = (
        bytes(48 << 20, 11),
        bytes(16 << 20, 12),
        bytes(64 << 20, 13),
    );
    let spread = bytes(32 << 20, 14);
    for (name, data) in [
        ("seq.bin", &seq),
        ("rnd.bin", &rnd),
        ("big.bin", &big),
        ("spread.bin", &spread),
    ] {
        std::fs::write(devs[0].path(name), data).unwrap();
        for d in &devs[1..] {
            wait_for_size(d, name, data.len() as u64);
        }
    }

    // A sequential reader: the bytes are right, and nearly every chunk was
    // asked for ahead of the read that needed it.
    let (ahead0, demand0) = reads(&devs[1]);
    assert_eq!(std::fs::read(devs[1].path("seq.bin")).unwrap(), seq);
    let (ahead, demand) = reads(&devs[1]);
    let (ahead, demand) = (ahead - ahead0, demand - demand0);
    eprintln!("48 MiB read on bravo: {ahead} chunks ahead, {demand} on demand");
    assert!(
        ahead >= 3 * (ahead + demand) / 4 && ahead + demand >= 300,
        "{ahead} ahead, {demand} on demand"
    );

    // Random access asks for what is read and nothing more: 4 KiB from the
    // middle of every 8th chunk, backwards, each read within one chunk
    // (a read that crossed into the next chunk would start a run).
    let middles: Vec<u64> = devs[0]
        .control(&Request::Chunks {
            path: "rnd.bin".into(),
        })
        .expect("chunks")["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["offset"].as_u64().unwrap(), c["len"].as_u64().unwrap()))
        .filter(|(_, len)| *len >= 16 << 10)
        .step_by(8)
        .map(|(off, len)| (off + len / 2) & !4095)
        .take(8)
        .collect();
    assert_eq!(middles.len(), 8);
    {
        use std::os::unix::fs::FileExt;
        use std::os::unix::io::AsRawFd;
        let f = std::fs::File::open(devs[1].path("rnd.bin")).unwrap();
        // SAFETY: a valid open descriptor; advice only.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        assert_eq!(rc, 0);
        let (ahead0, demand0) = reads(&devs[1]);
        let mut buf = [0u8; 4096];
        for &at in middles.iter().rev() {
            f.read_exact_at(&mut buf, at).unwrap();
            assert_eq!(&buf[..], &rnd[at as usize..at as usize + 4096]);
        }
        let (ahead, demand) = reads(&devs[1]);
        assert_eq!(ahead, ahead0, "random reads fetched ahead");
        assert_eq!(demand - demand0, 8, "chunks on demand for 8 reads");
    }

    // charlie reads spread.bin and big.bin, so two devices hold them.
    assert_eq!(std::fs::read(devs[2].path("spread.bin")).unwrap(), spread);
    assert_eq!(std::fs::read(devs[2].path("big.bin")).unwrap(), big);
    let t = Instant::now();
    while device_field(&devs[1], "charlie", "holdings").as_u64() < Some(2) {
        assert!(
            t.elapsed() < CONNECT,
            "bravo never heard what charlie holds"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A long read on bravo takes turns between the two.
    let received = |name: &str| {
        device_field(&devs[1], name, "received_bytes")
            .as_u64()
            .unwrap()
    };
    let (a0, c0) = (received("alpha"), received("charlie"));
    assert_eq!(std::fs::read(devs[1].path("spread.bin")).unwrap(), spread);
    let (from_a, from_c) = (received("alpha") - a0, received("charlie") - c0);
    eprintln!("32 MiB on bravo: {from_a} bytes from alpha, {from_c} from charlie");
    let fifth = spread.len() as u64 / 5;
    assert!(
        from_a >= fifth && from_c >= fifth,
        "{from_a} bytes from alpha, {from_c} from charlie; RTT alpha {}, charlie {}",
        device_field(&devs[1], "alpha", "rtt_ms"),
        device_field(&devs[1], "charlie", "rtt_ms")
    );

    // bravo starts reading big.bin, alpha dies a quarter of the way in, and
    // the rest comes from charlie.
    let t = Instant::now();
    let mut f = std::fs::File::open(devs[1].path("big.bin")).unwrap();
    let mut got = vec![0u8; 16 << 20];
    std::io::Read::read_exact(&mut f, &mut got).unwrap();
    devs[0].kill9();
    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
    let took = t.elapsed();
    eprintln!("64 MiB on bravo with alpha killed a quarter in: {took:?}");
    assert!(got == big, "bytes differ after the holder died");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn a_damaged_chunk_is_read_from_another_device_and_healed() {
    require_root!();
    let mut a = Device::start("alpha");
    let mut b = Device::join("bravo", &a.invite("10m"));
    b.mount();
    b.wait_connected(&["alpha"], CONNECT);
    let victim = bytes(1 << 20, 17);
    let hashes = put_file(&a, "victim.bin", &victim);
    let (r, _) = fetch(&b, &["alpha"], &hashes);
    r.expect("bravo caches a copy");

    // alpha's disk damages one chunk while it is down.
    a.unmount();
    assert!(flip_in_db(&a.data_dir(), &victim[600_000..600_064]));
    a.mount();
    a.wait_connected(&["bravo"], CONNECT);

    // Reading through alpha's mount gets bravo's verified copy, which also
    // replaces the damaged one on alpha's disk.
    assert_eq!(std::fs::read(a.path("victim.bin")).unwrap(), victim);
    assert!(
        a.log().contains("chunk fetched from another device"),
        "{}",
        a.log()
    );
    let dd = a.data_dir();
    let o = common::meshfs(&["check", "--data-dir", dd.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "check after healing: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A member that speaks garbage: a real libp2p peer built here with the
/// member's keys (the daemon's own code is not used to build it), which
/// sends malformed chunk requests.
mod rogue {
    use std::io;

    use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
    use libp2p::request_response::{self, Codec, ProtocolSupport};
    use libp2p::{StreamProtocol, Transport};

    /// Writes whatever bytes it is given as the request; reads nothing.
    #[derive(Clone, Default)]
    pub struct Garbage;

    impl Codec for Garbage {
        type Protocol = StreamProtocol;
        type Request = Vec<u8>;
        type Response = Vec<u8>;

        async fn read_request<T: AsyncRead + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
        ) -> io::Result<Vec<u8>> {
            Err(io::Error::other("a rogue serves nothing"))
        }

        async fn read_response<T: AsyncRead + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
        ) -> io::Result<Vec<u8>> {
            let mut buf = Vec::new();
            futures::AsyncReadExt::read_to_end(io, &mut buf).await?;
            if buf.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"));
            }
            Ok(buf)
        }

        async fn write_request<T: AsyncWrite + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
            req: Vec<u8>,
        ) -> io::Result<()> {
            io.write_all(&req).await?;
            io.close().await
        }

        async fn write_response<T: AsyncWrite + Unpin + Send>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
            _: Vec<u8>,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    pub type Swarm = libp2p::Swarm<request_response::Behaviour<Garbage>>;

    pub fn swarm(
        identity: libp2p::identity::Keypair,
        mesh_key: [u8; 32],
        protocol: &'static str,
    ) -> Swarm {
        libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(|key| {
                let noise = libp2p::noise::Config::new(key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                    .with_prologue(meshfs::mesh::noise_prologue(&mesh_key));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default())
                        .upgrade(libp2p::core::upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(libp2p::yamux::Config::default()),
                )
            })
            .unwrap()
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    Garbage,
                    [(StreamProtocol::new(protocol), ProtocolSupport::Outbound)],
                    request_response::Config::default()
                        .with_request_timeout(std::time::Duration::from_secs(10)),
                )
            })
            .unwrap()
            .build()
    }
}

#[test]
fn malformed_messages_from_a_member_are_refused_not_fatal() {
    require_root!();
    use futures::StreamExt;
    use libp2p::request_response::Event;
    use libp2p::swarm::SwarmEvent;

    let a = Device::start("alpha");
    let data = bytes(256 << 10, 8);
    let hashes = put_file(&a, "ok.bin", &data);
    let r = Device::join("rogue", &a.invite("10m"));
    let keys = meshfs::mesh::MeshState::load(&r.data_dir()).unwrap();
    let alpha_peer: libp2p::PeerId = a.status_json()["peer"].as_str().unwrap().parse().unwrap();
    let alpha_addr: libp2p::Multiaddr = a.status_json()["listen"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcomes = rt.block_on(async {
        let mut sw = rogue::swarm(keys.identity.clone(), keys.mesh_key, "/meshfs/chunk/2");
        let hash = hex_bytes(&hashes[0]);
        // A frame claiming 4 GiB; a frame whose body is not a request; a
        // request cut off mid-hash; and, last, a well-formed one.
        let mut truncated = 36u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(&hash[..10]);
        // postcard: one piece: the hash's 32 bytes, offset 0, len 1 MiB as
        // a varint; then no resource named (None).
        let body = [vec![1], hash.clone(), vec![0, 0x80, 0x80, 0x40, 0]].concat();
        let good = [(body.len() as u32).to_be_bytes().to_vec(), body].concat();
        let requests = vec![
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            [3u32.to_be_bytes().to_vec(), vec![0xff, 0xff, 0xff]].concat(),
            truncated,
            good,
        ];
        let mut ids = Vec::new();
        for req in requests {
            ids.push(sw.behaviour_mut().send_request_with_addresses(
                &alpha_peer,
                req,
                vec![alpha_addr.clone()],
            ));
        }
        let mut outcomes = vec![None; ids.len()];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while outcomes.iter().any(Option::is_none) {
            let ev = tokio::time::timeout_at(deadline, sw.select_next_some())
                .await
                .expect("the daemon neither answered nor refused");
            let (id, ok) = match ev {
                SwarmEvent::Behaviour(Event::Message {
                    message:
                        libp2p::request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) => (request_id, Some(response)),
                SwarmEvent::Behaviour(Event::OutboundFailure { request_id, .. }) => {
                    (request_id, None)
                }
                _ => continue,
            };
            if let Some(i) = ids.iter().position(|x| *x == id) {
                outcomes[i] = Some(ok);
            }
        }
        outcomes
    });
    // Every malformed request failed; the well-formed one, sent on the same
    // connection after them, got the chunk.
    for o in &outcomes[..3] {
        assert_eq!(o.as_ref().map(Option::is_some), Some(false), "{outcomes:?}");
    }
    let good = outcomes[3]
        .clone()
        .flatten()
        .expect("well-formed request unanswered");
    // The answer carries the chunk, which starts with the file's first bytes.
    assert!(good.windows(4096).any(|w| w == &data[..4096]));
    // The daemon is alive and still serves its mount.
    assert!(common::alive(a.pid().unwrap()));
    assert_eq!(std::fs::read(a.path("ok.bin")).unwrap(), data);
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn chunks_larger_than_a_piece_and_over_budget_batches_arrive_whole() {
    require_root!();
    // Chunks of 1 to 4 MiB: each is several 1 MiB pieces, and a batch of
    // them overflows a response's 2 MiB budget, so pieces are deferred and
    // asked for again.
    let mut a = Device::init("alpha");
    let cfg = a.data_dir().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .lines()
        .map(|l| match l.split(" = ").next() {
            Some("chunk_min") => "chunk_min = 1048576".to_string(),
            Some("chunk_avg") => "chunk_avg = 2097152".to_string(),
            Some("chunk_max") => "chunk_max = 4194304".to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cfg, text).unwrap();
    a.mount();
    let mut b = Device::join("bravo", &a.invite("10m"));
    // One copy (alpha's): bravo must not replicate the file in the
    // background, or the fetch below would find it already here.
    let cfg = b.data_dir().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("replicas = 2", "replicas = 1")).unwrap();
    let o = b.try_mount_env(&[], &[("MESHFS_LOG", "info,meshfs::mesh=debug")]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    b.wait_connected(&["alpha"], CONNECT);
    let data = bytes(48 << 20, 31);
    let hashes = put_file(&a, "large.bin", &data);
    assert!((12..=48).contains(&hashes.len()), "{} chunks", hashes.len());
    // Batches are used only on a short round trip (<= 5 ms); a loaded
    // machine can measure a longer one for a while (20 s once, while the
    // other test of this file streamed 64 MiB on two cores), so wait for a
    // short one.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = b.status_json();
        let rtt = st["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|x| x["name"] == "alpha"))
            .and_then(|x| x["rtt_ms"].as_f64());
        if rtt.is_some_and(|r| r <= 5.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alpha's round trip never under 5 ms: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (r, out) = fetch(&b, &["alpha"], &hashes);
    r.expect("fetch of large chunks");
    assert_eq!(std::fs::read(out.path()).unwrap(), data);
    assert!(
        b.log().contains("pieces deferred"),
        "no batch was over budget"
    );
}

/// A member that forges Raft messages (a real libp2p peer built here with
/// a member's keys): a vote request for another candidate, an append from
/// another leader, both with a far higher term, and a write in another
/// device's name. Each is refused and counted; the term, the leader and
/// the namespace do not change.
#[test]
fn raft_messages_forged_by_a_member_are_refused() {
    require_root!();
    use futures::StreamExt;
    use libp2p::request_response::Event;
    use libp2p::swarm::SwarmEvent;
    use meshfs::ids::{DeviceId, ResourceId};
    use meshfs::meta::{FsCommand, NewNode, Timestamp};
    use meshfs::raft::{node_id, Op, Reply, Rpc};
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::Vote;

    let a = Device::start("alpha");
    let r = Device::join("rogue", &a.invite("10m"));
    let keys = meshfs::mesh::MeshState::load(&r.data_dir()).unwrap();
    let before = a.status_json();
    let term = before["term"].as_u64().unwrap();
    let alpha = DeviceId::parse_hex(before["id"].as_str().unwrap()).unwrap();
    let alpha_peer: libp2p::PeerId = before["peer"].as_str().unwrap().parse().unwrap();
    let alpha_addr: libp2p::Multiaddr = before["listen"][0].as_str().unwrap().parse().unwrap();
    let stranger = node_id(DeviceId([7; 16]));
    let forged = vec![
        Rpc::Vote(VoteRequest {
            vote: Vote::new(term + 50, stranger),
            last_log_id: None,
        }),
        Rpc::Append(AppendEntriesRequest {
            vote: Vote::new_committed(term + 50, stranger),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }),
        Rpc::Write {
            req: meshfs::raft::Request {
                origin: alpha,
                id: 1,
                op: Op::Fs(FsCommand::Create {
                    parent: ResourceId::ROOT,
                    name: b"planted".to_vec(),
                    ino: ResourceId(0),
                    node: NewNode::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    now: Timestamp { secs: 1, nanos: 0 },
                }),
            },
            expires_ms: u64::MAX,
        },
    ];
    // The mesh's Raft frame: a length, then postcard of the request's bytes.
    let frame = |rpc: &Rpc| {
        let inner = postcard::to_stdvec(rpc).unwrap();
        let body = postcard::to_stdvec(&inner).unwrap();
        [(body.len() as u32).to_be_bytes().to_vec(), body].concat()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let replies: Vec<Reply> = rt.block_on(async {
        let mut sw = rogue::swarm(keys.identity.clone(), keys.mesh_key, "/meshfs/raft/1");
        let mut ids = Vec::new();
        for rpc in &forged {
            ids.push(sw.behaviour_mut().send_request_with_addresses(
                &alpha_peer,
                frame(rpc),
                vec![alpha_addr.clone()],
            ));
        }
        let mut out: Vec<Option<Reply>> = (0..ids.len()).map(|_| None).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while out.iter().any(Option::is_none) {
            let ev = tokio::time::timeout_at(deadline, sw.select_next_some())
                .await
                .expect("the daemon did not answer");
            let SwarmEvent::Behaviour(Event::Message {
                message:
                    libp2p::request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) = ev
            else {
                if let SwarmEvent::Behaviour(Event::OutboundFailure { error, .. }) = ev {
                    panic!("a forged request got no answer: {error}");
                }
                continue;
            };
            let body = &response[4..];
            let inner: Vec<u8> = postcard::from_bytes(body).unwrap();
            let reply: Reply = postcard::from_bytes(&inner).unwrap();
            if let Some(i) = ids.iter().position(|x| *x == request_id) {
                out[i] = Some(reply);
            }
        }
        out.into_iter().map(Option::unwrap).collect()
    });
    for (rpc, reply) in forged.iter().zip(&replies) {
        assert!(
            matches!(reply, Reply::Failed(m) if m.starts_with("refused")),
            "{rpc:?} was answered {reply:?}"
        );
    }
    let after = a.status_json();
    assert_eq!(after["raft"]["refused_forged"], 3, "{after}");
    assert_eq!(after["term"].as_u64().unwrap(), term);
    assert_eq!(after["leader"], "alpha");
    assert!(!a.path("planted").exists());
    assert!(a
        .log()
        .contains("refused a raft message claiming another sender"));
    // Alpha still commits its own changes.
    std::fs::write(a.path("after"), b"ok").unwrap();
    assert_eq!(std::fs::read(a.path("after")).unwrap(), b"ok");
}

/// A TCP connection to `to` from 127.0.0.2 (another loopback address than
/// the joiner's), or `None` when the listener refused it.
fn connect_from_127_0_0_2(to: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    // std cannot bind before connecting; libc can.
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(to) = to else {
        panic!("expected an IPv4 address: {to}")
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sa = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let me = sa(std::net::Ipv4Addr::new(127, 0, 0, 2), 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&me as *const libc::sockaddr_in).cast(), len),
            0
        );
        let there = sa(*to.ip(), to.port());
        if libc::connect(fd, (&there as *const libc::sockaddr_in).cast(), len) != 0 {
            libc::close(fd);
            return None;
        }
        Some(std::net::TcpStream::from_raw_fd(fd))
    }
}
