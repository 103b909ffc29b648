//! `meshfs`, the command line people and scripts run. `status`, `stat` and
//! `versions` are answered here from the running daemon's control socket.
//! Every other command, and these whenever the quick way does not apply (no daemon,
//! other arguments, any error), runs in `meshfsd`, the full program, with
//! the same arguments, in this process (exec). This binary links nothing of
//! the meshfs library: `meshfsd` loads libtorch when it starts (0.33 s
//! here, before `main`), which every `meshfs status` used to pay.

// Both are plain standard library and serde_json, shared with `meshfsd`
// (which also uses what this binary does not).
mod civil;
#[allow(dead_code)]
mod mountinfo;
mod view;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the daemon listens, in its data dir (as `node::SOCKET_FILE`).
const SOCKET_FILE: &str = "control.sock";

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Some(code) = quick(&args) {
        std::process::exit(code);
    }
    full(&args)
}

/// Runs `meshfsd` (beside this binary, else on the PATH) with `args`.
fn full(args: &[OsString]) -> ! {
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("meshfsd"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("meshfsd"));
    let err = std::process::Command::new(&exe).args(args).exec();
    eprintln!("meshfs: cannot run {}: {err}", exe.display());
    std::process::exit(1)
}

/// `status`, `pins`, `stat` or `versions` answered here; `None` leaves the command to `meshfsd`
/// (which also prints the errors, so they read the same either way).
fn quick(args: &[OsString]) -> Option<i32> {
    let args: Vec<&str> = args.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
    let (cmd, rest) = args.split_first()?;
    let json = rest.contains(&"--json");
    let rest: Vec<&str> = rest.iter().copied().filter(|a| *a != "--json").collect();
    match *cmd {
        "status" | "pins" => {
            let dir = match rest.as_slice() {
                ["--data-dir", d] => *d,
                [d] => d.strip_prefix("--data-dir=")?,
                _ => return None,
            };
            let v = request(Path::new(dir), serde_json::json!({ "cmd": *cmd }))?;
            if json {
                println!("{v}");
            } else if *cmd == "pins" {
                view::print_pins(&v);
            } else {
                view::print_status(&v);
            }
            Some(0)
        }
        "stat" => {
            let [path] = rest.as_slice() else {
                return None;
            };
            if path.starts_with('-') {
                return None;
            }
            let (dir, ino) = mountinfo::meshfs_of(Path::new(path)).ok()?;
            let v = request(&dir, serde_json::json!({ "cmd": "stat", "resource": ino }))?;
            if json {
                println!("{v}");
            } else {
                view::print_stat(Path::new(path), &v);
            }
            Some(0)
        }
        "versions" => {
            let [path] = rest.as_slice() else {
                return None;
            };
            if path.starts_with('-') {
                return None;
            }
            let (dir, rel) = mountinfo::mesh_path_of(Path::new(path)).ok()?;
            let v = request(&dir, serde_json::json!({ "cmd": "versions", "path": rel }))?;
            if json {
                println!("{v}");
            } else {
                view::print_versions(&v);
            }
            Some(0)
        }
        _ => None,
    }
}

/// One request line to the daemon of `data_dir`, one reply line; `None`
/// on any failure or an error reply.
fn request(data_dir: &Path, req: serde_json::Value) -> Option<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(data_dir.join(SOCKET_FILE)).ok()?;
    let timeout = Some(Duration::from_secs(60));
    s.set_read_timeout(timeout).ok()?;
    s.set_write_timeout(timeout).ok()?;
    s.write_all(format!("{req}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).ok()?;
    let v: serde_json::Value = serde_json::from_str(reply.trim()).ok()?;
    v.get("error").is_none().then_some(v)
}
