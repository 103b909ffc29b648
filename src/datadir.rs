//! The data dir's on-disk format version: the `FORMAT` file written at
//! `init` and `join`, checked before anything else in a data dir is read,
//! and the migrations from older formats.
//!
//! Why a version at all: postcard is not self-describing, so a build that
//! reads another build's RocksDB values or Raft log with different types
//! may misread them rather than fail. A data dir of an unknown or newer
//! format is refused with one line naming both versions.
//!
//! Format history:
//! - 0: every data dir made before this file existed (no `FORMAT` file).
//! - 1: the same layout, with the `FORMAT` file.

use std::io::Write;
use std::path::Path;

use crate::error::Error;

/// The format this build writes.
pub const FORMAT: u32 = 1;
/// The file holding it, in the data dir.
pub const FORMAT_FILE: &str = "FORMAT";
const PREFIX: &str = "meshfs data dir format ";

/// `MIGRATIONS[n]` turns a data dir of format `n` into format `n + 1`; the
/// daemon runs those a data dir needs when it starts (`migrate`), and
/// commands that only read a data dir accept any format it can migrate.
/// 0 to 1 changes no data: it only writes the `FORMAT` file.
const MIGRATIONS: [Migration; FORMAT as usize] = [|_| Ok(())];

/// One step of `MIGRATIONS`: rewrites the data dir in place.
type Migration = fn(&Path) -> Result<(), Error>;

/// The data dir's format: refuses an unreadable or newer one. A data dir
/// without the file but with a config is format 0; one with neither is not
/// a data dir (`None`).
pub fn check(data_dir: &Path) -> Result<Option<u32>, Error> {
    let path = data_dir.join(FORMAT_FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text).ok_or_else(|| Error::Format {
            dir: data_dir.to_path_buf(),
            msg: format!(
                "{} does not name a format this meshfs knows (it reads formats 0 to {FORMAT})",
                path.display()
            ),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !crate::config::Config::path(data_dir).exists() {
                return Ok(None);
            }
            0
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    if found > FORMAT {
        return Err(Error::Format {
            dir: data_dir.to_path_buf(),
            msg: format!(
                "it has format {found}, newer than this meshfs's format {FORMAT}: use the meshfs that made it, or a newer one"
            ),
        });
    }
    Ok(Some(found))
}

fn parse(text: &str) -> Option<u32> {
    text.trim().strip_prefix(PREFIX)?.trim().parse().ok()
}

/// Brings the data dir to this build's format (the daemon, at start, with
/// the data dir locked). Returns the format it was in.
pub fn migrate(data_dir: &Path) -> Result<u32, Error> {
    let Some(mut at) = check(data_dir)? else {
        return Err(Error::NotInitialized(data_dir.to_path_buf()));
    };
    let was = at;
    while at < FORMAT {
        MIGRATIONS[at as usize](data_dir)?;
        at += 1;
        write(data_dir, at)?;
        tracing::info!(from = at - 1, to = at, "data dir format migrated");
    }
    Ok(was)
}

/// Writes the `FORMAT` file durably (a new data dir, or a migration step).
pub fn write(data_dir: &Path, format: u32) -> Result<(), Error> {
    let path = data_dir.join(FORMAT_FILE);
    let tmp = data_dir.join(format!("{FORMAT_FILE}.tmp"));
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(ctx("writing"), e))?;
    f.write_all(format!("{PREFIX}{format}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(ctx("writing"), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(ctx("writing"), e))?;
    sync_parent(&path).map_err(|e| Error::io(ctx("syncing the directory of"), e))
}

/// Syncs the directory holding `path`: a file renamed into place is there
/// after a power cut only once its directory is synced too (the file's own
/// fsync covers its bytes, not its name).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` whole: to a temporary file beside it, synced,
/// renamed over `path`, and the rename synced. A crash leaves the old file
/// or the new one, never a torn or empty one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_format_file_reads_back() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), FORMAT).unwrap();
        assert_eq!(check(d.path()).unwrap(), Some(FORMAT));
        assert_eq!(
            std::fs::read_to_string(d.path().join(FORMAT_FILE)).unwrap(),
            format!("meshfs data dir format {FORMAT}\n")
        );
    }

    #[test]
    fn newer_and_unknown_formats_are_refused_naming_both_versions() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), FORMAT + 1).unwrap();
        let e = check(d.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("format {}", FORMAT + 1))
                && e.contains(&format!("format {FORMAT}")),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert!(matches!(migrate(d.path()), Err(Error::Format { .. })));
        std::fs::write(d.path().join(FORMAT_FILE), "rocksdb 7\n").unwrap();
        let e = check(d.path()).unwrap_err().to_string();
        assert!(e.contains("does not name a format"), "{e}");
    }

    #[test]
    fn no_file_is_format_0_only_in_a_data_dir() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check(d.path()).unwrap(), None);
        assert!(matches!(migrate(d.path()), Err(Error::NotInitialized(_))));
        crate::config::Config::default().save(d.path()).unwrap();
        assert_eq!(check(d.path()).unwrap(), Some(0));
        assert_eq!(migrate(d.path()).unwrap(), 0);
        assert_eq!(check(d.path()).unwrap(), Some(FORMAT));
        // Migrated once: the next start finds the current format.
        assert_eq!(migrate(d.path()).unwrap(), FORMAT);
    }
}
