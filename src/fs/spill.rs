//! Uncommitted writes of one file: a sparse spill file on the data dir's disk
//! (never RAM in proportion to the file) plus the set of byte ranges written
//! since the base version. Reads merge spill, base chunks and zeros.
//!
//! A file written sequentially from its start while it holds no data (a new
//! file, O_TRUNC, a copy; or only holes: preallocated, `truncate -s`) is
//! *streamed* instead: complete chunks are cut and stored as the writes
//! arrive, and only the unfinished tail (less than a few max-size chunks)
//! stays in memory. Nothing goes through the spill file and the commit at
//! close has only the tail left to do. Any other access materializes the
//! stream into the general form (streamed chunks become the base).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cutter::Cutter;
use crate::ids::ChunkHash;
use crate::meta::{ChunkRef, Content, Timestamp};

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

/// Chunks already cut from a sequentially written file, and its tail.
#[derive(Debug, Default)]
pub struct Stream {
    pub chunks: Vec<ChunkRef>,
    /// Where `tail` starts: the end of the last stored chunk. Stale while a
    /// `cutter` runs: the bytes handed to it lie between, and it counts
    /// them itself until `settle`.
    pub end: u64,
    pub tail: Vec<u8>,
    /// While set, a worker cuts and stores the bytes between `end` and
    /// `tail`: nothing but appending to `tail` may happen before `settle`.
    pub cutter: Option<Cutter>,
    /// Bytes appended so far: where the next write must start to keep
    /// streaming. The file may be longer (`grow`, a preallocated hole).
    pub appended: u64,
}

/// One file's uncommitted state.
#[derive(Debug)]
pub struct Spill {
    /// Set while the file has only been appended to since it held no data.
    pub stream: Option<Stream>,
    /// Chunks stored (and pinned) for this spill before its commit.
    pub pinned: Vec<ChunkHash>,
    /// The backing file, created on first need: a streamed file never has
    /// one, which saves a create and an unlink on the data dir's disk per
    /// small file.
    file: Option<File>,
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
        // A file that holds no data yet (empty, or only holes: preallocated
        // or `truncate -s`) is written as a stream from its start; what the
        // writes leave of the hole is stored as a zero run at the commit.
        let holes_only =
            !base.chunks.is_empty() && base.chunks.iter().all(|c| c.hash.is_zero_run());
        let stream = (base.size == 0 || holes_only).then(Stream::default);
        Ok(Spill {
            stream,
            pinned: Vec::new(),
            file: None,
            path,
            base_limit: base.size,
            size: base.size,
            base,
            written: RangeSet::default(),
            mtime: now,
        })
    }

    fn file(&mut self) -> std::io::Result<&File> {
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)?;
            self.file = Some(f);
        }
        match &self.file {
            Some(f) => Ok(f),
            None => Err(std::io::Error::other("spill file missing")),
        }
    }

    /// Takes back what a stream's chunking worker holds: its chunks and
    /// pins join the stream's, its unstored bytes go before the tail. Returns
    /// the error the worker stopped at, if any; no bytes are lost either way.
    pub fn settle(&mut self) -> Result<(), super::FsError> {
        let Some(st) = self.stream.as_mut() else {
            return Ok(());
        };
        let Some(cutter) = st.cutter.take() else {
            return Ok(());
        };
        let cut = cutter.finish();
        st.chunks.extend(cut.chunks);
        self.pinned.extend(cut.pinned);
        st.end = cut.end;
        let mut tail = cut.tail;
        tail.append(&mut st.tail);
        st.tail = tail;
        cut.error.map_or(Ok(()), Err)
    }

    /// Turns a stream into the general form: its chunks become the base and
    /// its tail goes to the spill file.
    pub fn materialize(&mut self) -> std::io::Result<()> {
        if let Err(e) = self.settle() {
            // The bytes are back in the tail; the commit stores them again
            // and reports what still fails.
            tracing::debug!(error = %e, "chunking worker stopped early");
        }
        let Some(st) = self.stream.take() else {
            return Ok(());
        };
        let file = self.file()?;
        file.set_len(0)?;
        file.write_all_at(&st.tail, st.end)?;
        self.base = Content {
            version: self.base.version,
            size: st.end,
            chunks: std::sync::Arc::new(st.chunks),
            author: None,
            committed: self.base.committed,
        };
        self.base_limit = st.end;
        self.written = RangeSet::default();
        self.written.insert(st.end, st.end + st.tail.len() as u64);
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], now: Timestamp) -> std::io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFBIG))?;
        if let Some(st) = self.stream.as_mut() {
            if offset == st.appended {
                st.tail.extend_from_slice(data);
                st.appended = end;
                self.size = self.size.max(end);
                self.mtime = now;
                return Ok(());
            }
            self.materialize()?;
        }
        self.file()?.write_all_at(data, offset)?;
        self.written.insert(offset, end);
        self.size = self.size.max(end);
        self.mtime = now;
        Ok(())
    }

    /// Extends the file to `size` with a hole, if it is shorter
    /// (fallocate). A stream stays one: writes that go on from where it
    /// ended, over the hole, still stream.
    pub fn grow(&mut self, size: u64, now: Timestamp) -> std::io::Result<()> {
        if size <= self.size {
            return Ok(());
        }
        if self.stream.is_some() {
            self.size = size;
            self.mtime = now;
            return Ok(());
        }
        self.set_size(size, now)
    }

    /// Whether the file is a stream with a hole after what was appended:
    /// such a stream is materialized before its commit, which stores the
    /// hole as the general path does.
    pub fn stream_with_hole(&self) -> bool {
        self.stream
            .as_ref()
            .is_some_and(|st| st.appended < self.size)
    }

    pub fn set_size(&mut self, size: u64, now: Timestamp) -> std::io::Result<()> {
        if size == 0 {
            // Empty again: whatever follows may stream from scratch. The
            // worker's chunks are dropped with the rest, their pins kept in
            // `pinned` until the commit or discard releases them.
            if let Err(e) = self.settle() {
                tracing::debug!(error = %e, "chunking worker stopped early");
            }
            if let Some(f) = &self.file {
                f.set_len(0)?;
            }
            self.written = RangeSet::default();
            self.base_limit = 0;
            self.size = 0;
            self.mtime = now;
            self.stream = Some(Stream::default());
            return Ok(());
        }
        self.materialize()?;
        if size < self.size {
            self.written.truncate(size);
            self.base_limit = self.base_limit.min(size);
        }
        self.file()?.set_len(size)?;
        self.size = size;
        self.mtime = now;
        Ok(())
    }

    pub fn read_spill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match &self.file {
            Some(f) => f.read_exact_at(buf, offset),
            // Nothing was ever written to a spill without a file.
            None => {
                buf.fill(0);
                Ok(())
            }
        }
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
    /// `None` when nothing differs. A stream counts as all new.
    pub fn dirty_span(&self) -> Option<(u64, u64)> {
        if self.stream.is_some() {
            return Some((0, self.size));
        }
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
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
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

    #[test]
    fn streams_appends_and_materializes_on_anything_else() {
        let d = tempfile::tempdir().unwrap();
        let now = Timestamp::default();
        let mut s = Spill::create(d.path(), "s", Content::default(), now).unwrap();
        s.write(0, b"hello ", now).unwrap();
        s.write(6, b"world", now).unwrap();
        assert_eq!(s.stream.as_ref().unwrap().tail, b"hello world");
        assert_eq!(s.size, 11);
        // A write elsewhere ends streaming; the tail lands in the spill file.
        s.write(0, b"J", now).unwrap();
        assert!(s.stream.is_none());
        assert_eq!(s.source(0), Source::Spill(11));
        let mut buf = [0u8; 11];
        s.read_spill(0, &mut buf).unwrap();
        assert_eq!(&buf, b"Jello world");
        // Truncating to zero streams again.
        s.set_size(0, now).unwrap();
        assert!(s.stream.is_some());
        assert_eq!(s.dirty_span(), Some((0, 0)));
    }
}
