//! Ordinary programs on a mount: tar and cp -a round trips, a git repository
//! (many small files, renames, fsync), and SQLite in WAL mode (shared mmap,
//! locks, partial overwrites) when python3 is installed.

mod common;

use std::path::Path;
use std::process::Command;

use common::Device;

fn sh(dir: &Path, script: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "`{script}` failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn tar_cp_and_git_work_on_a_mount() {
    require_root!();
    let d = Device::start("alice");
    let src = env!("CARGO_MANIFEST_DIR");
    let m = d.mountpoint();
    sh(m, &format!("tar cf - -C {src} src tests | tar xf - && diff -r {src}/src src && diff -r {src}/tests tests"));
    sh(
        m,
        &format!("cp -a {src}/docs docs && diff -r {src}/docs docs"),
    );
    sh(
        m,
        "git init -q repo && cd repo && cp -r ../src . && git add -A && \
         git -c user.name=t -c user.email=t@t commit -qm one && \
         git mv src moved && git -c user.name=t -c user.email=t@t commit -qm two && \
         git fsck --strict",
    );
    let log = sh(&m.join("repo"), "git log --oneline | wc -l");
    assert_eq!(log.trim(), "2");
}

#[test]
fn sqlite_in_wal_mode_keeps_its_integrity() {
    require_root!();
    let has_sqlite = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        has_sqlite,
        "python3 with sqlite3 is needed (scripts/setup installs it)"
    );
    let d = Device::start("alice");
    let out = sh(
        d.mountpoint(),
        r#"python3 -c '
import sqlite3
c = sqlite3.connect("t.db")
c.execute("pragma journal_mode=wal")
c.execute("create table t(a integer, b text)")
for i in range(3000):
    c.execute("insert into t values(?, ?)", (i, str(i) * 30))
c.commit()
c.execute("update t set b = ? where a % 7 = 0", ("seven",))
c.execute("delete from t where a % 11 = 0")
c.commit()
print(c.execute("pragma integrity_check").fetchone()[0])
print(c.execute("select count(*), sum(a) from t").fetchone())
'"#,
    );
    let expected_count = (0..3000).filter(|a| a % 11 != 0).count();
    let expected_sum: u64 = (0..3000u64).filter(|a| a % 11 != 0).sum();
    assert_eq!(out, format!("ok\n({expected_count}, {expected_sum})\n"));
}
