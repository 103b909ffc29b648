//! Reading file content and turning a dirty file into a new version:
//! merged reads over spill, base chunks and holes, and the FastCDC re-chunking
//! that re-cuts only the region around what changed and reuses every base
//! chunk before it and, once the cut points realign, after it.

use std::io::Read;

use fastcdc::v2020::{FastCDC, StreamCDC};

use super::spill::{Source, Spill};
use super::FsError;
use crate::ids::{ChunkHash, ResourceId};
use crate::meta::{ChunkRef, Content};
use crate::storage::{ChunkStore, StorageError};

/// Zero runs at least this long are stored as references, not chunked.
const ZERO_RUN_MIN: u64 = 1 << 20;
/// The longest single zero-run reference (a chunk length is a u32).
const ZERO_RUN_PIECE: u64 = 1 << 30;

/// From `pos`: where the next run of at least ZERO_RUN_MIN zero bytes (a
/// hole, or bytes cut off by truncation) starts and ends; `(size, size)` when
/// there is none.
fn next_zero_run(spill: &Spill, pos: u64) -> (u64, u64) {
    let mut p = pos;
    while p < spill.size {
        let (end, zeros) = match spill.source(p) {
            Source::Zero(e) => (e, true),
            Source::Spill(e) => (e, false),
            // Zero-run references of the base version stay zero runs.
            Source::Base(e) => match base_zero_run_end(&spill.base, p) {
                Some(z) => (z.min(e), true),
                None => (base_data_end(&spill.base, p).min(e), false),
            },
        };
        if zeros && end - p >= ZERO_RUN_MIN {
            return (p, end);
        }
        p = end.max(p + 1);
    }
    (spill.size, spill.size)
}

/// If the base chunk at `pos` is a zero run: where the run (with any zero
/// runs right after it) ends.
fn base_zero_run_end(base: &Content, pos: u64) -> Option<u64> {
    let mut i = base.chunk_at(pos)?;
    if !base.chunks[i].hash.is_zero_run() {
        return None;
    }
    let mut end = pos;
    while i < base.chunks.len() && base.chunks[i].hash.is_zero_run() {
        end = base.chunks[i].offset + base.chunks[i].len as u64;
        i += 1;
    }
    Some(end)
}

/// Where the base's data chunks starting at `pos` give way to a zero run.
fn base_data_end(base: &Content, pos: u64) -> u64 {
    let Some(mut i) = base.chunk_at(pos) else {
        return base.size;
    };
    while i < base.chunks.len() && !base.chunks[i].hash.is_zero_run() {
        i += 1;
    }
    base.chunks.get(i).map_or(base.size, |c| c.offset)
}

/// The first hole at or after `pos` of committed content (zero-run
/// references, with the zero runs right after them): `(start, end)`, or
/// `(size, size)` when none follows.
fn content_hole(content: &Content, pos: u64) -> (u64, u64) {
    let Some(mut i) = content.chunk_at(pos) else {
        return (content.size, content.size);
    };
    while i < content.chunks.len() && !content.chunks[i].hash.is_zero_run() {
        i += 1;
    }
    let Some(c) = content.chunks.get(i) else {
        return (content.size, content.size);
    };
    let start = c.offset.max(pos);
    (start, base_zero_run_end(content, start).unwrap_or(start))
}

/// The first hole at or after `pos` of a file with uncommitted writes:
/// what the commit will store as zero runs (runs of at least a megabyte).
/// A stream has none.
fn spill_hole(spill: &Spill, pos: u64) -> (u64, u64) {
    if spill.stream.is_some() {
        return (spill.size, spill.size);
    }
    next_zero_run(spill, pos)
}

/// lseek(2)'s SEEK_DATA (`hole` false) or SEEK_HOLE (`hole` true) from
/// `offset` in a file of `size` bytes whose holes `next_hole` finds. None is
/// ENXIO (at or past the end, or no data after `offset`). Holes shorter
/// than a megabyte are stored as zeros, so they read as data here, which
/// lseek(2) allows; the end of the file counts as a hole.
fn seek(size: u64, offset: u64, hole: bool, next_hole: impl Fn(u64) -> (u64, u64)) -> Option<u64> {
    if offset >= size {
        return None;
    }
    let (start, end) = next_hole(offset);
    match (hole, start > offset) {
        (true, _) => Some(start.min(size)),
        (false, true) => Some(offset),
        (false, false) => (end < size).then_some(end),
    }
}

/// SEEK_DATA / SEEK_HOLE over committed content.
pub fn seek_content(content: &Content, offset: u64, hole: bool) -> Option<u64> {
    seek(content.size, offset, hole, |p| content_hole(content, p))
}

/// SEEK_DATA / SEEK_HOLE over a file with uncommitted writes.
pub fn seek_spill(spill: &Spill, offset: u64, hole: bool) -> Option<u64> {
    seek(spill.size, offset, hole, |p| spill_hole(spill, p))
}

/// Bytes of `content` that are stored data, not holes (for st_blocks).
pub fn data_bytes(content: &Content) -> u64 {
    content
        .chunks
        .iter()
        .filter(|c| !c.hash.is_zero_run())
        .map(|c| u64::from(c.len))
        .sum()
}

/// Commits re-chunking at least this much use `ChunkStore::put_bulk`.
const BULK_COMMIT_BYTES: u64 = 8 << 20;

/// FastCDC parameters.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// A small cache of the last chunks read by one open file, so that reads
/// that straddle chunk boundaries do not fetch and verify a chunk twice. It
/// locks only around lookups, never while fetching, so that the kernel's
/// parallel readahead requests for one file are served in parallel.
pub struct ChunkCache {
    slots: std::sync::Mutex<Vec<(ChunkHash, std::sync::Arc<Vec<u8>>)>>,
    /// Where a chunk missing or damaged here is fetched from (the mesh).
    remote: Option<std::sync::Arc<dyn super::RemoteChunks>>,
    /// The file whose chunks these are (the mesh asks its authority first).
    ino: ResourceId,
    /// A read of this chunk index or beyond that finds its chunk here tells
    /// the remote source (a sequential reader nears the end of what was
    /// fetched ahead). `usize::MAX` until a read misses.
    check_at: std::sync::atomic::AtomicUsize,
    /// Where chunk reads are counted (the daemon's metrics).
    counts: Option<std::sync::Arc<ChunkReads>>,
}

/// Chunks read by open files, by where they came from (not counting the
/// re-reads an open file's own few slots answer).
#[derive(Debug, Default)]
pub struct ChunkReads {
    /// From this device's store: a cache hit.
    pub local: std::sync::atomic::AtomicU64,
    /// Fetched ahead of the reader, waiting in memory.
    pub ahead: std::sync::atomic::AtomicU64,
    /// Fetched from another device while the reader waited: a miss.
    pub remote: std::sync::atomic::AtomicU64,
}

const CACHE_SLOTS: usize = 4;

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("cached", &self.slots().len())
            .field("remote", &self.remote.is_some())
            .finish()
    }
}

impl Default for ChunkCache {
    fn default() -> Self {
        ChunkCache::with_remote(None, ResourceId::default())
    }
}

impl ChunkCache {
    pub fn with_remote(
        remote: Option<std::sync::Arc<dyn super::RemoteChunks>>,
        ino: ResourceId,
    ) -> Self {
        ChunkCache {
            remote,
            ino,
            slots: Default::default(),
            check_at: std::sync::atomic::AtomicUsize::new(usize::MAX),
            counts: None,
        }
    }

    /// Counts this cache's chunk reads in `counts`.
    pub fn counted(mut self, counts: std::sync::Arc<ChunkReads>) -> Self {
        self.counts = Some(counts);
        self
    }

    fn count(&self, which: fn(&ChunkReads) -> &std::sync::atomic::AtomicU64) {
        if let Some(c) = &self.counts {
            which(c).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<(ChunkHash, std::sync::Arc<Vec<u8>>)>> {
        crate::lock(&self.slots)
    }

    /// The bytes of chunk `at` of `content`: from this cache, the store, or
    /// the remote source.
    pub fn get(
        &self,
        store: &dyn ChunkStore,
        content: &Content,
        at: usize,
    ) -> Result<std::sync::Arc<Vec<u8>>, FsError> {
        use std::sync::atomic::Ordering;
        let Some(c) = content.chunks.get(at) else {
            return Err(FsError::Io(std::io::Error::other(
                "chunk index beyond the version's chunk list",
            )));
        };
        let hash = &c.hash;
        if let Some((_, data)) = self.slots().iter().find(|(h, _)| h == hash) {
            return Ok(data.clone());
        }
        let want = || super::Want {
            ino: self.ino,
            version: content.version,
            at,
            hash: *hash,
            next: &content.chunks[at + 1..],
        };
        let ahead = self.remote.as_ref().and_then(|r| r.fetched_ahead(hash));
        let was_ahead = ahead.is_some();
        let local = match ahead.map_or_else(|| store.get(hash), |d| Ok(Some(d))) {
            Ok(Some(d)) => {
                self.count(if was_ahead {
                    |c| &c.ahead
                } else {
                    |c| &c.local
                });
                Ok(d)
            }
            Ok(None) => Err(FsError::MissingChunk(*hash)),
            Err(e) => Err(FsError::from(e)),
        };
        let data = match (local, &self.remote) {
            (Ok(d), Some(remote)) if at >= self.check_at.load(Ordering::Relaxed) => {
                self.check_at
                    .store(remote.read_ahead(&want()), Ordering::Relaxed);
                d
            }
            (Ok(d), _) => d,
            // Missing or damaged here: another device's copy (verified, and
            // stored over the damaged one) serves the read instead.
            (
                Err(
                    e @ (FsError::MissingChunk(_) | FsError::Storage(StorageError::Corrupt { .. })),
                ),
                Some(remote),
            ) => match remote.fetch(&want()) {
                Ok((d, check_at)) => {
                    self.count(|c| &c.remote);
                    self.check_at.store(check_at, Ordering::Relaxed);
                    // A missing chunk is the normal case of a file written
                    // elsewhere; a damaged one is worth a line in the log.
                    if matches!(e, FsError::MissingChunk(_)) {
                        tracing::debug!(chunk = %hash, "chunk fetched from another device");
                    } else {
                        tracing::info!(chunk = %hash, local = %e, "chunk fetched from another device");
                    }
                    d
                }
                Err(why) => {
                    tracing::warn!(chunk = %hash, local = %e, error = %why, "no other device could supply the chunk");
                    return Err(e);
                }
            },
            (Err(e), _) => return Err(e),
        };
        let data = std::sync::Arc::new(data);
        let mut slots = self.slots();
        if slots.len() >= CACHE_SLOTS {
            slots.remove(0);
        }
        slots.push((*hash, data.clone()));
        Ok(data)
    }
}

/// Copies bytes of a committed version into `out`, starting at `offset`.
pub fn read_content(
    store: &dyn ChunkStore,
    cache: &ChunkCache,
    content: &Content,
    offset: u64,
    out: &mut [u8],
) -> Result<(), FsError> {
    let mut pos = offset;
    let end = offset + out.len() as u64;
    let Some(mut idx) = content.chunk_at(offset) else {
        return Ok(());
    };
    while pos < end && idx < content.chunks.len() {
        let c = content.chunks[idx];
        let from = (pos - c.offset) as usize;
        let n = ((c.offset + c.len as u64).min(end) - pos) as usize;
        let o = (pos - offset) as usize;
        if c.hash.is_zero_run() {
            out[o..o + n].fill(0);
        } else {
            let data = cache.get(store, content, idx)?;
            if data.len() != c.len as usize {
                tracing::error!(chunk = %c.hash, "chunk length differs from the version's record");
                return Err(FsError::MissingChunk(c.hash));
            }
            out[o..o + n].copy_from_slice(&data[from..from + n]);
        }
        pos += n as u64;
        idx += 1;
    }
    Ok(())
}

/// Reads a dirty file's current bytes (`out.len()` bytes from `offset`,
/// which the caller has clipped to the size).
pub fn read_merged(
    store: &dyn ChunkStore,
    cache: &ChunkCache,
    spill: &Spill,
    offset: u64,
    out: &mut [u8],
) -> Result<(), FsError> {
    let end = offset + out.len() as u64;
    let mut pos = offset;
    while pos < end {
        let o = (pos - offset) as usize;
        let (stop, src) = match spill.source(pos) {
            Source::Spill(e) => (e.min(end), 0),
            Source::Base(e) => (e.min(end), 1),
            Source::Zero(e) => (e.min(end), 2),
        };
        let n = (stop - pos) as usize;
        if n == 0 {
            break;
        }
        let slot = &mut out[o..o + n];
        match src {
            0 => spill.read_spill(pos, slot)?,
            1 => read_content(store, cache, &spill.base, pos, slot)?,
            _ => slot.fill(0),
        }
        pos = stop;
    }
    Ok(())
}

/// `Read` over a dirty file from some offset, for the chunker.
struct MergedReader<'a> {
    store: &'a dyn ChunkStore,
    cache: ChunkCache,
    spill: &'a Spill,
    pos: u64,
    /// Reading stops here (exclusive).
    end: u64,
    /// The real error behind an `io::Error` handed to the chunker.
    failure: Option<FsError>,
}

impl Read for MergedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        match read_merged(self.store, &self.cache, self.spill, self.pos, &mut buf[..n]) {
            Ok(()) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(e) => {
                let io = std::io::Error::other(e.to_string());
                self.failure = Some(e);
                Err(io)
            }
        }
    }
}

/// Streamed bytes beyond which streamed chunks skip the WAL (`put_bulk`).
const BULK_STREAM_BYTES: u64 = 8 << 20;

/// Stores one chunk (pinned until its version is committed) and appends
/// it to `chunks` at offset `*at`, which it advances.
fn store_chunk(
    store: &dyn ChunkStore,
    data: &[u8],
    bulk: bool,
    at: &mut u64,
    chunks: &mut Vec<ChunkRef>,
    pinned: &mut Vec<ChunkHash>,
) -> Result<(), FsError> {
    let hash = if bulk {
        store.put_bulk(data)?
    } else {
        store.put(data)?
    };
    pinned.push(hash);
    chunks.push(ChunkRef {
        hash,
        offset: *at,
        len: data.len() as u32,
    });
    *at += data.len() as u64;
    Ok(())
}

/// Stores the complete chunks at the front of a stream's `tail` (whose
/// first byte is at offset `*end`), appending them to `chunks` and `pinned`.
/// Runs once the tail holds a few max-size chunks, so the work per call stays
/// small; the last chunk of the tail is never final (more bytes may extend
/// it). Chunks stored before a failure stay stored; the tail keeps the rest.
pub fn cut_complete(
    store: &dyn ChunkStore,
    end: &mut u64,
    tail: &mut Vec<u8>,
    chunks: &mut Vec<ChunkRef>,
    pinned: &mut Vec<ChunkHash>,
    sizes: ChunkSizes,
) -> Result<(), FsError> {
    if tail.len() < 4 * sizes.max as usize {
        return Ok(());
    }
    let cuts: Vec<(usize, usize)> = FastCDC::new(tail, sizes.min, sizes.avg, sizes.max)
        .map(|c| (c.offset, c.length))
        .collect();
    let mut consumed = 0;
    let mut result = Ok(());
    for &(offset, length) in &cuts[..cuts.len().saturating_sub(1)] {
        let bulk = *end >= BULK_STREAM_BYTES;
        let data = &tail[offset..offset + length];
        if let Err(e) = store_chunk(store, data, bulk, end, chunks, pinned) {
            result = Err(e);
            break;
        }
        consumed = offset + length;
    }
    tail.drain(..consumed);
    result
}

/// After a streaming write: stores the stream's complete chunks, on a
/// background worker (`cutter`) once the file is large enough to be worth
/// one, else here. An error the worker meets is reported by the next write
/// (`Fs::write` checks before it takes any bytes), or by the commit.
pub fn stream_cut(
    store: &std::sync::Arc<dyn crate::storage::Store>,
    spill: &mut Spill,
    sizes: ChunkSizes,
    workers: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<(), FsError> {
    let Some(st) = spill.stream.as_mut() else {
        return Ok(());
    };
    if let Some(c) = &st.cutter {
        if st.tail.len() >= super::cutter::HANDOFF_BYTES {
            // Room for the next hand-over plus one 1 MiB write past it.
            let room = 2 * super::cutter::HANDOFF_BYTES;
            let next = c.spare().unwrap_or_else(|| Vec::with_capacity(room));
            let bytes = std::mem::replace(&mut st.tail, next);
            if let Err(bytes) = c.send(bytes) {
                // The worker is gone; settle puts these after its bytes.
                st.tail = bytes;
                return spill.settle();
            }
        }
        return Ok(());
    }
    if st.tail.len() < 4 * sizes.max as usize {
        return Ok(());
    }
    let tail = std::mem::take(&mut st.tail);
    match super::cutter::Cutter::start(store.clone(), sizes, st.end, tail, workers) {
        Ok(c) => {
            st.cutter = Some(c);
            Ok(())
        }
        Err(tail) => {
            st.tail = tail;
            let pinned = &mut spill.pinned;
            cut_complete(
                &**store,
                &mut st.end,
                &mut st.tail,
                &mut st.chunks,
                pinned,
                sizes,
            )
        }
    }
}

/// The final chunk list of a streamed file: its stored chunks plus its tail,
/// chunked to the end.
fn finish_stream(
    store: &dyn ChunkStore,
    spill: &Spill,
    sizes: ChunkSizes,
) -> Result<NewContent, FsError> {
    let mut chunks = Vec::new();
    let mut pinned = Vec::new();
    let (mut end, tail) = match &spill.stream {
        // `rechunk` callers settle first: a worker's bytes are not here.
        Some(st) if st.cutter.is_some() => {
            return Err(FsError::Io(std::io::Error::other(
                "commit of a stream still being chunked",
            )))
        }
        Some(st) => {
            chunks.extend_from_slice(&st.chunks);
            (st.end, st.tail.as_slice())
        }
        None => (0, &[][..]),
    };
    for c in FastCDC::new(tail, sizes.min, sizes.avg, sizes.max) {
        let data = &tail[c.offset..c.offset + c.length];
        let bulk = end >= BULK_STREAM_BYTES;
        if let Err(e) = store_chunk(store, data, bulk, &mut end, &mut chunks, &mut pinned) {
            store.unpin(&pinned);
            return Err(e);
        }
    }
    Ok(NewContent {
        chunks,
        pinned,
        rechunked_bytes: tail.len() as u64,
    })
}

/// The result of chunking a dirty file.
pub struct NewContent {
    pub chunks: Vec<ChunkRef>,
    /// Chunks written (and pinned) for this version; unpin after commit.
    pub pinned: Vec<ChunkHash>,
    /// Bytes that went through the chunker (the rest was reused).
    pub rechunked_bytes: u64,
}

/// Chunks the dirty file's bytes into the store. Base chunks wholly before
/// the first changed byte are kept; chunking starts at the boundary before
/// it and stops as soon as a cut after the last changed byte lands on a base
/// chunk boundary, from where the base chunks are reused.
pub fn rechunk(
    store: &dyn ChunkStore,
    spill: &Spill,
    sizes: ChunkSizes,
) -> Result<NewContent, FsError> {
    if spill.stream.is_some() {
        return finish_stream(store, spill, sizes);
    }
    let base = &spill.base;
    let (dirty_start, dirty_end) = spill.dirty_span().unwrap_or((spill.size, spill.size));
    // Large commits write content once (no WAL copy); small ones stay on the
    // WAL, where a flush per commit would cost more than the copy.
    let bulk = dirty_end - dirty_start >= BULK_COMMIT_BYTES;
    // Keep base chunks that end at or before the first change.
    let keep = base
        .chunks
        .partition_point(|c| c.offset + c.len as u64 <= dirty_start.min(spill.base_limit));
    let mut chunks: Vec<ChunkRef> = base.chunks[..keep].to_vec();
    let start = chunks.last().map_or(0, |c| c.offset + c.len as u64);
    // Base boundaries where chunking may stop: inside the kept base region.
    let base_valid_end = spill.base_limit.min(base.size).min(spill.size);

    let mut pinned = Vec::new();
    let mut rechunked = 0u64;
    let mut at = start;
    let mut resume_at: Option<usize> = None;
    // Past the last change, a cut on a base chunk boundary means the same
    // bytes follow from a boundary both versions cut at: the base chunks
    // from there are what chunking would produce again.
    let realign = |at: u64| -> Option<usize> {
        if at < dirty_end || at >= base_valid_end {
            return None;
        }
        let i = base.chunks.partition_point(|c| c.offset < at);
        (i < base.chunks.len() && base.chunks[i].offset == at).then_some(i)
    };
    'regions: while at < spill.size {
        // Bytes up to the next long run of zeros go through the chunker;
        // the run itself becomes zero-run references, never read or hashed.
        let (data_end, zeros_end) = next_zero_run(spill, at);
        let mut reader = MergedReader {
            store,
            cache: ChunkCache::default(),
            spill,
            pos: at,
            end: data_end,
            failure: None,
        };
        let mut chunker_error = None;
        for item in StreamCDC::new(&mut reader, sizes.min, sizes.avg, sizes.max) {
            let chunk = match item {
                Ok(c) => c,
                Err(e) => {
                    chunker_error = Some(e);
                    break;
                }
            };
            if let Err(e) = store_chunk(store, &chunk.data, bulk, &mut at, &mut chunks, &mut pinned)
            {
                store.unpin(&pinned);
                return Err(e);
            }
            rechunked += chunk.length as u64;
            if let Some(i) = realign(at) {
                resume_at = Some(i);
                break 'regions;
            }
        }
        if let Some(e) = chunker_error {
            store.unpin(&pinned);
            // Prefer the reader's own error: it keeps "corrupt chunk" apart
            // from plain I/O failures.
            return Err(reader.failure.take().unwrap_or_else(|| match e {
                fastcdc::v2020::Error::IoError(io) => FsError::Io(io),
                other => FsError::Io(std::io::Error::other(other.to_string())),
            }));
        }
        while at < zeros_end {
            let len = (zeros_end - at).min(ZERO_RUN_PIECE);
            chunks.push(ChunkRef {
                hash: ChunkHash::zero_run(),
                offset: at,
                len: len as u32,
            });
            at += len;
            if let Some(i) = realign(at) {
                resume_at = Some(i);
                break 'regions;
            }
        }
    }
    if let Some(i) = resume_at {
        // Base chunks beyond `base_valid_end` were cut away; stop there.
        for c in base.chunks[i..].iter() {
            if c.offset + c.len as u64 > base_valid_end {
                break;
            }
            chunks.push(*c);
            at = c.offset + c.len as u64;
        }
        if at != spill.size {
            // A tail that is neither reusable nor re-chunked cannot happen
            // with a consistent spill; refuse rather than commit a bad list.
            store.unpin(&pinned);
            return Err(FsError::Io(std::io::Error::other(
                "re-chunking lost the file's tail",
            )));
        }
    }
    Ok(NewContent {
        chunks,
        pinned,
        rechunked_bytes: rechunked,
    })
}
