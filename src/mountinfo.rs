//! Mounts as /proc/self/mountinfo lists them: whether a path is a mount
//! point, what a mount's source and type are, and which meshfs mount holds a
//! path. Standard library only: the thin `meshfs` binary (`src/cli.rs`)
//! compiles this file too, without the rest of the library.

use std::path::{Path, PathBuf};

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_encoded_bytes();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape(m).as_bytes() == want)
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The source and type of the mount at `path` (the last one mounted
/// there).
pub fn source_of(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_encoded_bytes();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4).map(|m| unescape(m)).as_deref().map(str::as_bytes) != Some(want) {
            return None;
        }
        let sep = f.iter().position(|x| *x == "-")?;
        Some((unescape(f.get(sep + 2)?), f.get(sep + 1)?.to_string()))
    })
}

/// The FUSE connection number of the mount at `path` (its device minor,
/// as /sys/fs/fuse/connections names it), read from mountinfo alone so
/// that nothing touches a mount whose daemon may never answer.
pub fn fuse_connection(path: &Path) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    connection_in(&info, path)
}

fn connection_in(info: &str, path: &Path) -> Option<u32> {
    let want = path.as_os_str().as_encoded_bytes();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4).map(|m| unescape(m)).as_deref().map(str::as_bytes) != Some(want) {
            return None;
        }
        f.get(2)?.split(':').nth(1)?.parse().ok()
    })
}

/// The data dir of the meshfs mount holding `path` (its source), and
/// `path`'s inode number there; an error line otherwise.
pub fn meshfs_of(path: &Path) -> Result<(PathBuf, u64), String> {
    use std::os::unix::fs::MetadataExt;
    let abs =
        std::fs::canonicalize(path).map_err(|e| format!("resolving {}: {e}", path.display()))?;
    let ino = std::fs::symlink_metadata(&abs)
        .map_err(|e| format!("stat {}: {e}", abs.display()))?
        .ino();
    let mut at = Some(abs.as_path());
    while let Some(p) = at {
        if let Some((source, fstype)) = source_of(p) {
            if fstype == "fuse.meshfs" {
                return Ok((PathBuf::from(source), ino));
            }
            break;
        }
        at = p.parent();
    }
    Err(format!("{} is not on a meshfs mount", path.display()))
}

/// The data dir of the meshfs mount `path` lies under, and `path` inside
/// that mount ("/dir/name"). `path` need not exist (a removed file's
/// versions are asked for by its old path); its directories are resolved
/// as far as they exist, its last part is not (a symlink is itself).
pub fn mesh_path_of(path: &Path) -> Result<(PathBuf, String), String> {
    use std::path::Component;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(path)
    };
    // Lexically first ("a/../b" is "b", as the shell sees it).
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    for c in abs.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_os_string()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    let Some(last) = parts.pop() else {
        return Err(format!("{}: the root has no versions", path.display()));
    };
    // The longest existing directory, resolved; the rest kept as given.
    let mut keep = parts.len();
    let resolved = loop {
        let dir: PathBuf = std::iter::once(std::ffi::OsString::from("/"))
            .chain(parts[..keep].iter().cloned())
            .collect();
        if let Ok(real) = std::fs::canonicalize(&dir) {
            break real;
        }
        if keep == 0 {
            return Err(format!("resolving {}", path.display()));
        }
        keep -= 1;
    };
    let mut full = resolved;
    for p in &parts[keep..] {
        full.push(p);
    }
    full.push(&last);
    let mut at = full.parent();
    while let Some(p) = at {
        if let Some((source, fstype)) = source_of(p) {
            if fstype == "fuse.meshfs" {
                let rel = full
                    .strip_prefix(p)
                    .map_err(|_| format!("{} is not on a meshfs mount", path.display()))?;
                let rel = rel
                    .to_str()
                    .ok_or_else(|| format!("{}: the path is not UTF-8", path.display()))?;
                return Ok((PathBuf::from(source), format!("/{rel}")));
            }
            break;
        }
        at = p.parent();
    }
    Err(format!("{} is not on a meshfs mount", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_is_the_minor_of_the_last_mount_there() {
        let info = "36 25 0:31 / /mnt/a rw - ext4 /dev/sda1 rw\n\
                    40 25 0:45 / /mnt/mesh rw - fuse.meshfs /var/lib/m rw\n\
                    41 25 0:47 / /mnt/my\\040mesh rw - fuse.meshfs /d rw\n\
                    42 40 0:52 / /mnt/mesh rw - fuse.meshfs /var/lib/m rw\n";
        assert_eq!(connection_in(info, Path::new("/mnt/mesh")), Some(52));
        assert_eq!(connection_in(info, Path::new("/mnt/my mesh")), Some(47));
        assert_eq!(connection_in(info, Path::new("/mnt/b")), None);
    }
}
