//! The command line's error handling, the mount helper and the fstab path.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::{meshfs, stderr, Device};

fn one_line_error(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected failure, got success");
    let e = stderr(o);
    assert_eq!(
        e.trim().lines().count(),
        1,
        "error should be one line: {e:?}"
    );
    e
}

#[test]
fn bad_input_gets_a_clear_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("dd");
    let dds = dd.to_str().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnts = mnt.to_str().unwrap();

    // Uninitialised or missing data dir.
    let e = one_line_error(&meshfs(&["mount", "--data-dir", dds, mnts]));
    assert!(e.contains("not a meshfs data dir"), "{e}");
    let e = one_line_error(&meshfs(&["status", "--data-dir", dds]));
    assert!(e.contains("not a meshfs data dir"), "{e}");

    assert!(meshfs(&["init", "--data-dir", dds, "--name", "x"])
        .status
        .success());
    let e = one_line_error(&meshfs(&["init", "--data-dir", dds]));
    assert!(e.contains("already"), "{e}");

    // Mount point missing or not a directory.
    let missing = tmp.path().join("missing");
    let e = one_line_error(&meshfs(&[
        "mount",
        "--data-dir",
        dds,
        missing.to_str().unwrap(),
    ]));
    assert!(e.contains("does not exist"), "{e}");
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    let e = one_line_error(&meshfs(&[
        "mount",
        "--data-dir",
        dds,
        file.to_str().unwrap(),
    ]));
    assert!(e.contains("not a directory"), "{e}");

    // Unknown mount options and flags.
    let e = one_line_error(&meshfs(&[
        "mount",
        "--data-dir",
        dds,
        mnts,
        "-o",
        "rw,bogus",
    ]));
    assert!(e.contains("bogus"), "{e}");
    let o = meshfs(&["mount", "--data-dir", dds, mnts, "--frobnicate"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("frobnicate"));

    // A broken config names the file.
    fs::write(dd.join("config.toml"), "name = [").unwrap();
    let e = one_line_error(&meshfs(&["status", "--data-dir", dds]));
    assert!(e.contains("config.toml"), "{e}");

    // Status of a stopped device still answers.
    let d2 = tmp.path().join("d2");
    assert!(
        meshfs(&["init", "--data-dir", d2.to_str().unwrap(), "--name", "y"])
            .status
            .success()
    );
    let o = meshfs(&["status", "--data-dir", d2.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["running"], false);
    assert_eq!(v["devices"][0]["name"], "y");
    // check works offline too.
    assert!(meshfs(&["check", "--data-dir", d2.to_str().unwrap()])
        .status
        .success());
}

#[test]
fn already_mounted_and_data_dir_in_use_are_refused() {
    require_root!();
    let d = Device::start("alice");
    let dd = d.data_dir();
    let e = one_line_error(&meshfs(&[
        "mount",
        "--data-dir",
        dd.to_str().unwrap(),
        d.mountpoint().to_str().unwrap(),
    ]));
    assert!(e.contains("already mounted"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let e = one_line_error(&meshfs(&[
        "mount",
        "--data-dir",
        dd.to_str().unwrap(),
        other.path().to_str().unwrap(),
    ]));
    assert!(e.contains("in use"), "{e}");
    assert!(e.contains(&format!("pid {}", d.pid().unwrap())), "{e}");
    // It waited for the lock before giving up.
    assert!(t.elapsed() >= std::time::Duration::from_secs(9));
    assert!(!common::is_mounted(other.path()));
}

/// Installs the helper where mount(8) looks, for the duration of a test.
struct Helper;

impl Helper {
    fn install() -> Self {
        let helper = PathBuf::from(common::MESHFS).with_file_name("mount-meshfs");
        assert!(
            helper.exists(),
            "build the workspace first: {}",
            helper.display()
        );
        fs::copy(&helper, "/usr/sbin/mount.meshfs").unwrap();
        Helper
    }
}

#[test]
fn mount_t_meshfs_and_fstab_through_the_helper() {
    require_root!();
    let _h = Helper::install();
    let mut d = Device::init("alice");
    let dd = d.data_dir();
    // mount(8) runs the helper with a minimal environment; point it at
    // this build of meshfs.
    let o = Command::new("mount")
        .args(["-t", "meshfs", "-o", "rw,_netdev,nofail"])
        .arg(&dd)
        .arg(d.mountpoint())
        .env("MESHFS_BIN", common::MESHFS)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount -t meshfs: {}", stderr(&o));
    d.mark_mounted();
    assert_eq!(
        common::fstype(d.mountpoint()).as_deref(),
        Some("fuse.meshfs")
    );
    fs::write(d.path("via-helper"), b"ok").unwrap();
    d.unmount();

    // An unknown option is refused with a message naming it.
    let o = Command::new("mount")
        .args(["-t", "meshfs", "-o", "frob"])
        .arg(&dd)
        .arg(d.mountpoint())
        .env("MESHFS_BIN", common::MESHFS)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("frob"), "{}", stderr(&o));

    // The fstab line from the docs, through mount -a with a test fstab.
    let tab = tempfile::NamedTempFile::new().unwrap();
    fs::write(
        tab.path(),
        format!(
            "{} {} meshfs defaults,_netdev,x-systemd.requires=network-online.target 0 0\n",
            dd.display(),
            d.mountpoint().display()
        ),
    )
    .unwrap();
    let o = Command::new("mount")
        .arg("-a")
        .arg("-T")
        .arg(tab.path())
        .env("MESHFS_BIN", common::MESHFS)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount -a: {}", stderr(&o));
    d.mark_mounted();
    assert_eq!(fs::read(d.path("via-helper")).unwrap(), b"ok");
    d.unmount();

    // ro is honoured.
    let o = Command::new("mount")
        .args(["-t", "meshfs", "-o", "ro"])
        .arg(&dd)
        .arg(d.mountpoint())
        .env("MESHFS_BIN", common::MESHFS)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    d.mark_mounted();
    assert_eq!(fs::read(d.path("via-helper")).unwrap(), b"ok");
    let e = fs::write(d.path("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

/// `meshfs` is the thin command line: it links neither libtorch nor
/// RocksDB (which made every `meshfs status` take a third of a second to
/// start), and what it answers itself matches what `meshfsd` answers.
#[test]
fn the_command_line_is_thin_and_answers_like_the_full_program() {
    let ldd = Command::new("ldd").arg(common::MESHFS).output().unwrap();
    let libs = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success(), "{}", stderr(&ldd));
    // Only the library names: a load address such as 0x7fd7927c1000 holds
    // "c10" often enough to fail a run.
    let names: Vec<&str> = libs
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("libc.so")),
        "ldd listed no libc:\n{libs}"
    );
    for heavy in ["torch", "c10", "rocksdb"] {
        assert!(
            !names.iter().any(|n| n.contains(heavy)),
            "meshfs links {heavy}:\n{libs}"
        );
    }
    require_root!();
    let d = Device::start("alpha");
    let dd = d.data_dir();
    let quick = meshfs(&["status", "--data-dir", dd.to_str().unwrap(), "--json"]);
    assert!(quick.status.success(), "{}", stderr(&quick));
    let full = Command::new(PathBuf::from(common::MESHFS).with_file_name("meshfsd"))
        .args(["status", "--data-dir", dd.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(full.status.success(), "{}", stderr(&full));
    let (q, f): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&quick.stdout).unwrap(),
        serde_json::from_slice(&full.stdout).unwrap(),
    );
    for key in ["name", "id", "pid", "mountpoint", "leader"] {
        assert!(!q[key].is_null(), "{key} missing: {q}");
        assert_eq!(q[key], f[key], "{key}");
    }
    assert_eq!(q["name"], "alpha");
    // Arguments it does not handle itself go to meshfsd, errors included.
    let bad = meshfs(&["status", "--data-dir", "/nonexistent", "--json"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("not a meshfs data dir"),
        "{}",
        stderr(&bad)
    );
    let o = meshfs(&["--version"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("meshfs "));
}

/// A data dir records its format: one made before the `FORMAT` file
/// existed (format 0) is migrated when it is mounted and keeps its files;
/// one of a newer format is refused by every command with one line naming
/// both formats, before anything in it is read.
#[test]
fn the_data_dir_format_is_checked_and_an_old_one_migrated() {
    require_root!();
    let mut d = Device::start("alpha");
    fs::write(d.path("kept"), b"from format 0").unwrap();
    d.unmount();
    let format = d.data_dir().join("FORMAT");
    assert_eq!(
        fs::read_to_string(&format).unwrap(),
        format!("meshfs data dir format {}\n", meshfs::datadir::FORMAT)
    );
    // As a data dir made by the build before this one.
    fs::remove_file(&format).unwrap();
    d.mount();
    assert_eq!(fs::read(d.path("kept")).unwrap(), b"from format 0");
    assert!(fs::read_to_string(&format)
        .unwrap()
        .ends_with(&format!(" {}\n", meshfs::datadir::FORMAT)));
    d.unmount();
    // A newer build's data dir.
    let newer = meshfs::datadir::FORMAT + 1;
    fs::write(&format, format!("meshfs data dir format {newer}\n")).unwrap();
    let dd = d.data_dir();
    let dds = dd.to_str().unwrap();
    for args in [
        vec!["status", "--data-dir", dds],
        vec!["check", "--data-dir", dds],
        vec!["mount", "--data-dir", dds, d.mountpoint().to_str().unwrap()],
    ] {
        let e = one_line_error(&meshfs(&args));
        assert!(
            e.contains(&format!("format {newer}"))
                && e.contains(&format!("format {}", meshfs::datadir::FORMAT)),
            "{args:?}: {e}"
        );
    }
    assert!(!common::is_mounted(d.mountpoint()));
    // Nothing was changed: the right build still finds its data.
    fs::write(&format, "meshfs data dir format 1\n").unwrap();
    d.mount();
    assert_eq!(fs::read(d.path("kept")).unwrap(), b"from format 0");
}

/// `meshfs config show` prints the effective config, every key with its
/// value, as TOML that reads back; `meshfs config check` says ok, or names
/// the key at fault in one line.
#[test]
fn config_show_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("d");
    let dds = dd.to_str().unwrap();
    assert!(meshfs(&["init", "--data-dir", dds, "--name", "x"])
        .status
        .success());
    let o = meshfs(&["config", "show", "--data-dir", dds]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = String::from_utf8(o.stdout).unwrap();
    for line in [
        "name = \"x\"",
        "replicas = 2",
        "versions_keep = 100",
        "sync_on_close = false",
        "# cache_limit_mb: unset",
    ] {
        assert!(shown.contains(line), "{line} missing from:\n{shown}");
    }
    let copy = tmp.path().join("shown.toml");
    fs::write(&copy, &shown).unwrap();
    let o = meshfs(&["config", "check", copy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(": ok"));
    for (bad, key) in [
        ("replicas = \"two\"", "replicas"),
        ("versions_kept = 3", "versions_kept"),
        ("versions_prune_s = 0", "versions_prune_s"),
    ] {
        let f = tmp.path().join("bad.toml");
        fs::write(&f, shown.replace("replicas = 2", bad)).unwrap();
        let e = one_line_error(&meshfs(&["config", "check", f.to_str().unwrap()]));
        assert!(e.contains(key) && e.contains("bad.toml"), "{bad}: {e}");
    }
    let e = one_line_error(&meshfs(&["config", "check", "/nonexistent.toml"]));
    assert!(e.contains("/nonexistent.toml"), "{e}");
}

/// The systemd unit shipped in the repository (and installed by
/// scripts/install) passes `systemd-analyze verify`, with this build's
/// `meshfs` in its command lines.
#[test]
fn the_systemd_unit_verifies() {
    let unit = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/meshfs@.service"
    ))
    .unwrap();
    assert!(unit.contains("After=network-online.target"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("meshfs@mesh.service");
    fs::write(&path, unit.replace("/usr/local/bin/meshfs", common::MESHFS)).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

/// Shell completions for bash, zsh and fish name every command, and the
/// man pages (one per command) are written where asked.
#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let o = meshfs(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        for cmd in [
            "mount",
            "join",
            "versions",
            "restore",
            "conflicts",
            "config",
        ] {
            assert!(text.contains(cmd), "{shell} completions lack {cmd}");
        }
    }
    // A usage error, as clap reports them (with the shells it knows).
    let o = meshfs(&["completions", "tcsh"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tcsh") && stderr(&o).contains("bash"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("man1");
    let o = meshfs(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for page in [
        "meshfs.1",
        "meshfs-mount.1",
        "meshfs-restore.1",
        "meshfs-config-check.1",
    ] {
        let text = fs::read_to_string(dir.join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
}
