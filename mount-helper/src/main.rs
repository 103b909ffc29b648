//! `mount.meshfs`: the helper mount(8) runs for `mount -t meshfs DIR MNT`
//! and for fstab lines of type `meshfs`. It translates mount(8)'s calling
//! convention into `meshfs mount --data-dir DIR MNT -o OPTIONS` and returns
//! its result. `meshfs mount` itself daemonizes and reports success only once
//! the mount is usable, so `mount -a` neither hangs nor returns early.
//!
//! Called as: mount.meshfs SOURCE TARGET [-sfnv] [-o OPTIONS] [-t TYPE]

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

#[derive(Debug, Default, PartialEq)]
struct Args {
    source: PathBuf,
    target: PathBuf,
    options: Vec<String>,
    sloppy: bool,
    fake: bool,
    verbose: bool,
}

fn usage() -> String {
    "usage: mount.meshfs DATA_DIR MOUNTPOINT [-sfnv] [-o OPTIONS]".into()
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut positional = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let s = arg.to_string_lossy().into_owned();
        if s == "-o" {
            let v = it.next().ok_or("-o needs an option list")?;
            a.options
                .extend(v.to_string_lossy().split(',').map(str::to_string));
        } else if let Some(v) = s.strip_prefix("-o") {
            a.options.extend(v.split(',').map(str::to_string));
        } else if s == "-t" {
            // mount(8) may pass the type; it can only be ours.
            it.next();
        } else if s.starts_with('-') && s.len() > 1 {
            for c in s[1..].chars() {
                match c {
                    's' => a.sloppy = true,
                    'f' => a.fake = true,
                    'v' => a.verbose = true,
                    // -n (no mtab) means nothing here: /etc/mtab is /proc/mounts.
                    'n' => {}
                    'h' => return Err(usage()),
                    other => return Err(format!("unknown flag -{other}\n{}", usage())),
                }
            }
        } else {
            positional.push(PathBuf::from(arg));
        }
    }
    match <[PathBuf; 2]>::try_from(positional) {
        Ok([source, target]) => {
            a.source = source;
            a.target = target;
        }
        Err(_) => return Err(usage()),
    }
    a.options.retain(|o| !o.is_empty());
    Ok(a)
}

/// mount(8) runs helpers with a minimal environment; look where the
/// installer puts the binary, then in PATH.
fn meshfs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHFS_BIN") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/local/bin/meshfs",
        "/usr/bin/meshfs",
        "/usr/sbin/meshfs",
    ] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("meshfs")
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.meshfs: {e}");
            // mount(8)'s exit code for usage errors.
            return ExitCode::from(1);
        }
    };
    let bin = meshfs_binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("mount")
        .arg("--data-dir")
        .arg(&args.source)
        .arg(&args.target);
    if !args.options.is_empty() {
        cmd.arg("-o").arg(args.options.join(","));
    }
    if args.sloppy {
        cmd.arg("--sloppy");
    }
    if args.verbose {
        eprintln!("mount.meshfs: running {:?}", cmd);
    }
    if args.fake {
        return ExitCode::SUCCESS;
    }
    let err = cmd.exec();
    eprintln!("mount.meshfs: cannot run {}: {err}", bin.display());
    // mount(8)'s "system error" code.
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, String> {
        parse(v.iter().map(OsString::from))
    }

    #[test]
    fn parses_what_mount_8_passes() {
        let a = p(&[
            "/var/lib/meshfs",
            "/mnt/mesh",
            "-o",
            "rw,_netdev,allow_other",
        ])
        .unwrap();
        assert_eq!(a.source, PathBuf::from("/var/lib/meshfs"));
        assert_eq!(a.target, PathBuf::from("/mnt/mesh"));
        assert_eq!(a.options, vec!["rw", "_netdev", "allow_other"]);
        let a = p(&["-sv", "a", "b", "-oro"]).unwrap();
        assert!(a.sloppy && a.verbose && !a.fake);
        assert_eq!(a.options, vec!["ro"]);
        assert!(p(&["-n", "-f", "a", "b"]).unwrap().fake);
    }

    #[test]
    fn refuses_bad_calls() {
        assert!(p(&["only-one"]).is_err());
        assert!(p(&["a", "b", "c"]).is_err());
        assert!(p(&["a", "b", "-o"]).is_err());
        assert!(p(&["-q", "a", "b"]).is_err());
    }
}
