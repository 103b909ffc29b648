//! The daemon's log file (`DATA_DIR/meshfs.log`) and its rotation by size:
//! past `log_max_mb` it becomes `meshfs.log.1` (the older ones move up, the
//! oldest beyond `log_keep` goes) and a new file starts. The daemon's
//! standard output and error point at the current file too (`dup2`), so a
//! panic message or a library's own output lands next to the log lines.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Current {
    file: std::fs::File,
    written: u64,
}

/// A size-bounded log file, shared by every tracing writer.
#[derive(Clone)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// Point fds 1 and 2 at each new file.
    redirect_std: bool,
    current: Arc<Mutex<Current>>,
}

impl RotatingLog {
    /// Opens (appends to) `path`; rotates once it passes `max_bytes`,
    /// keeping `keep` older files.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        keep: usize,
        redirect_std: bool,
    ) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let written = file.metadata()?.len();
        let log = RotatingLog {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            redirect_std,
            current: Arc::new(Mutex::new(Current { file, written })),
        };
        if redirect_std {
            log.point_std_at_current();
        }
        Ok(log)
    }

    fn point_std_at_current(&self) {
        let cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let fd = cur.file.as_raw_fd();
        // SAFETY: dup2 of a descriptor this struct owns onto 1 and 2.
        unsafe {
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
        }
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Moves the files up one place and starts a new current file. A
    /// failure leaves the current file in use (logging never stops).
    fn rotate(&self, cur: &mut Current) -> std::io::Result<()> {
        if self.keep == 0 {
            cur.file.set_len(0)?;
            cur.written = 0;
            return Ok(());
        }
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        cur.file = open_append(&self.path)?;
        cur.written = 0;
        Ok(())
    }

    fn write_line(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.written > 0 && cur.written + buf.len() as u64 > self.max_bytes {
            let rotated = self.rotate(&mut cur).is_ok();
            if rotated && self.redirect_std {
                drop(cur);
                self.point_std_at_current();
                cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
        cur.file.write_all(buf)?;
        cur.written += buf.len() as u64;
        Ok(buf.len())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// One tracing event's writer.
pub struct LogWriter(RotatingLog);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_line(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RotatingLog {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshfs.log");
        std::fs::write(&path, b"from an earlier run\n").unwrap();
        let log = RotatingLog::open(&path, 100, 2, false).unwrap();
        let line = [b'x'; 39];
        for i in 0..20u8 {
            let mut l = line.to_vec();
            l[0] = b'a' + i;
            l.push(b'\n');
            log.write_line(&l).unwrap();
        }
        // Each file holds at most 100 bytes (two 40-byte lines), the
        // current one and two older ones stay, the rest are gone.
        for p in [path.clone(), log.rotated(1), log.rotated(2)] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len > 0 && len <= 100, "{}: {len}", p.display());
        }
        assert!(!log.rotated(3).exists());
        // The newest lines are in the current file, in order.
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.starts_with('s') && now.contains("\nt"), "{now}");
        let older = std::fs::read_to_string(log.rotated(1)).unwrap();
        assert!(older.starts_with('q'), "{older}");
    }

    #[test]
    fn with_nothing_to_keep_the_log_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshfs.log");
        let log = RotatingLog::open(&path, 10, 0, false).unwrap();
        log.write_line(b"0123456789\n").unwrap();
        log.write_line(b"abc\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc\n");
        assert!(!log.rotated(1).exists());
    }
}
