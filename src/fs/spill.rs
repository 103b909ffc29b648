//! Uncommitted writes of one file: a sparse spill file on the data dir's disk
//! (never RAM in proportion to the file) plus the set of byte ranges written
//! since the base version. Reads merge spill, base chunks and zeros.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::meta::{Content, Timestamp};

/// Disjoint, non-adjacent half-open byte ranges.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with every range that overlaps or touches [start, end).
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Forgets everything at or beyond `at`.
    pub fn truncate(&mut self, at: u64) {
        let beyond: Vec<u64> = self.ranges.range(at..).map(|(s, _)| *s).collect();
        for s in beyond {
            self.ranges.remove(&s);
        }
        if let Some((_, e)) = self.ranges.range_mut(..at).next_back() {
            if *e > at {
                *e = at;
            }
        }
    }

    /// The range containing `pos`, or the start of the next range after it.
    pub fn locate(&self, pos: u64) -> Result<u64, Option<u64>> {
        if let Some((_, e)) = self.ranges.range(..=pos).next_back() {
            if *e > pos {
                return Ok(*e);
            }
        }
        Err(self.ranges.range(pos..).next().map(|(s, _)| *s))
    }

    pub fn first_start(&self) -> Option<u64> {
        self.ranges.keys().next().copied()
    }

    pub fn last_end(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Where the bytes at some position of a dirty file come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// From the spill file, up to (exclusive) this offset.
    Spill(u64),
    /// From the base version's chunks, up to this offset.
    Base(u64),
    /// Zeros (a hole or a region cut off by truncation), up to this offset.
    Zero(u64),
}

/// One file's uncommitted state.
#[derive(Debug)]
pub struct Spill {
    file: File,
    path: PathBuf,
    /// The committed version these writes apply to.
    pub base: Content,
    /// Base bytes at or beyond this offset are gone (truncated away).
    pub base_limit: u64,
    pub written: RangeSet,
    pub size: u64,
    pub mtime: Timestamp,
}

impl Spill {
    pub fn create(dir: &Path, name: &str, base: Content, now: Timestamp) -> std::io::Result<Self> {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(Spill {
            file,
            path,
            base_limit: base.size,
            size: base.size,
            base,
            written: RangeSet::default(),
            mtime: now,
        })
    }

    pub fn write(&mut self, offset: u64, data: &[u8], now: Timestamp) -> std::io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        self.file.write_all_at(data, offset)?;
        self.written.insert(offset, end);
        self.size = self.size.max(end);
        self.mtime = now;
        Ok(())
    }

    pub fn set_size(&mut self, size: u64, now: Timestamp) -> std::io::Result<()> {
        if size < self.size {
            self.written.truncate(size);
            self.base_limit = self.base_limit.min(size);
        }
        self.file.set_len(size)?;
        self.size = size;
        self.mtime = now;
        Ok(())
    }

    pub fn read_spill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Where byte `pos` (< size) comes from, and how far that source goes.
    pub fn source(&self, pos: u64) -> Source {
        let base_end = self.base_limit.min(self.base.size);
        match self.written.locate(pos) {
            Ok(end) => Source::Spill(end.min(self.size)),
            Err(next) => {
                let next = next.unwrap_or(self.size).min(self.size);
                if pos < base_end {
                    Source::Base(next.min(base_end))
                } else {
                    Source::Zero(next)
                }
            }
        }
    }

    /// The first and last offsets whose bytes differ from the base version;
    /// `None` when nothing differs.
    pub fn dirty_span(&self) -> Option<(u64, u64)> {
        let mut start = self.written.first_start();
        let mut end = self.written.last_end();
        if self.base_limit < self.base.size || self.size != self.base.size {
            let from = self.base_limit.min(self.base.size).min(self.size);
            start = Some(start.map_or(from, |s| s.min(from)));
            end = Some(self.size);
        }
        match (start, end) {
            (Some(s), Some(e)) => Some((s, e.max(s))),
            _ => None,
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        // Committed or abandoned: the spill file is not needed any more.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_and_truncates() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25);
        assert_eq!(r.locate(24), Ok(25));
        assert_eq!(r.locate(25), Err(Some(30)));
        r.insert(5, 35);
        assert_eq!(r.locate(5), Ok(40));
        r.truncate(12);
        assert_eq!(r.locate(11), Ok(12));
        assert_eq!(r.locate(12), Err(None));
        assert_eq!(r.first_start(), Some(5));
        assert_eq!(r.last_end(), Some(12));
        r.truncate(0);
        assert!(r.is_empty());
    }

    #[test]
    fn sources_follow_writes_truncation_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let base = Content {
            size: 100,
            ..Content::default()
        };
        let now = Timestamp::default();
        let mut s = Spill::create(d.path(), "s", base, now).unwrap();
        s.write(10, b"abc", now).unwrap();
        assert_eq!(s.source(0), Source::Base(10));
        assert_eq!(s.source(11), Source::Spill(13));
        assert_eq!(s.source(13), Source::Base(100));
        // Shrink then grow: the old bytes beyond the cut read as zeros.
        s.set_size(50, now).unwrap();
        s.set_size(200, now).unwrap();
        assert_eq!(s.source(60), Source::Zero(200));
        assert_eq!(s.source(20), Source::Base(50));
        assert_eq!(s.dirty_span(), Some((10, 200)));
        let mut buf = [0u8; 3];
        s.read_spill(10, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        let path = d.path().join("s");
        drop(s);
        assert!(!path.exists());
    }
}
