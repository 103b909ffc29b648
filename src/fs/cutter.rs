//! Background chunking of a streamed file: while a program keeps writing a
//! large file sequentially, a worker thread cuts, hashes and stores its
//! complete chunks, so the kernel's next write does not wait for them.
//!
//! Without it every 1 MiB write waited for FastCDC, BLAKE3 and the RocksDB
//! insert of the chunks it completed, one after the other with the program's
//! own copy into the kernel: `dd bs=1M` ran at the speed of one core doing
//! all of it. The worker overlaps that with the next writes.
//!
//! Nothing is lost on an error: the worker stops storing at the first
//! failure and keeps every byte it has not stored, and the writer gets the
//! error at its next write (or at flush/fsync), with the bytes back in the
//! stream's tail, where a later commit stores them again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::content::cut_complete;
use super::content::ChunkSizes;
use super::FsError;
use crate::ids::ChunkHash;
use crate::meta::ChunkRef;
use crate::storage::Store;

/// Bytes the writer gathers before handing them over: large enough that a
/// hand-over costs little per byte, small enough to keep the worker busy.
pub const HANDOFF_BYTES: usize = 1 << 20;

/// Hand-overs queued for the worker at most; the writer waits beyond that,
/// which bounds the memory a fast writer can pile up (4 MiB per file).
const QUEUE: usize = 4;

/// Workers one filesystem runs at once: one per core, at most 4. A file
/// that finds them all busy is cut on the writing thread instead.
pub fn max_running() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// What the worker did: the chunks it stored (pinned), where they end, the
/// bytes it did not store, and why it stopped storing, if it did.
pub struct Cut {
    pub chunks: Vec<ChunkRef>,
    pub pinned: Vec<ChunkHash>,
    pub end: u64,
    pub tail: Vec<u8>,
    pub error: Option<FsError>,
}

/// The writer's side of one stream's worker.
pub struct Cutter {
    tx: SyncSender<Vec<u8>>,
    /// Buffers the worker has emptied, for the writer's next hand-overs:
    /// reusing them keeps a long write from allocating and freeing 2 MiB
    /// per MiB written, which left the heap fragmented (peak RSS).
    spare: Receiver<Vec<u8>>,
    failed: Arc<AtomicBool>,
    worker: JoinHandle<Cut>,
}

impl std::fmt::Debug for Cutter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cutter")
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Gives a worker slot back when the worker ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Cutter {
    /// Starts a worker for a stream whose stored chunks end at `end` and
    /// whose unstored bytes are `tail`, counting it in `running`. Gives
    /// `tail` back when `running` is at `max_running` or no thread could be
    /// started.
    pub fn start(
        store: Arc<dyn Store>,
        sizes: ChunkSizes,
        end: u64,
        tail: Vec<u8>,
        running: &Arc<AtomicUsize>,
    ) -> Result<Cutter, Vec<u8>> {
        let limit = max_running();
        if running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_err()
        {
            return Err(tail);
        }
        let slot = Slot(running.clone());
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        // Enough for every buffer in flight; a surplus one is freed.
        let (give_back, spare) = sync_channel::<Vec<u8>>(QUEUE + 2);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        // The closure owns the tail; if the thread cannot start, it comes
        // back through this cell.
        let first = Arc::new(std::sync::Mutex::new(Some(tail)));
        let mine = first.clone();
        let spawned = std::thread::Builder::new()
            .name("meshfs-chunker".into())
            .spawn(move || {
                let _slot = slot;
                let tail = mine
                    .lock()
                    .ok()
                    .and_then(|mut t| t.take())
                    .unwrap_or_default();
                work(&*store, sizes, end, tail, rx, &give_back, &flag)
            });
        match spawned {
            Ok(worker) => Ok(Cutter {
                tx,
                spare,
                failed,
                worker,
            }),
            // The closure (and its slot) was dropped without running.
            Err(_) => Err(first
                .lock()
                .ok()
                .and_then(|mut t| t.take())
                .unwrap_or_default()),
        }
    }

    /// Whether the worker has stopped storing after an error: the writer
    /// should `finish` it to learn why.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// An emptied buffer to gather the next hand-over in, if the worker has
    /// one to give back.
    pub fn spare(&self) -> Option<Vec<u8>> {
        self.spare.try_recv().ok()
    }

    /// Queues bytes that follow everything handed over before. Gives them
    /// back if the worker is gone.
    pub fn send(&self, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        self.tx.send(bytes).map_err(|e| e.0)
    }

    /// Waits for the worker to store what it can of everything queued, and
    /// returns its state.
    pub fn finish(self) -> Cut {
        drop(self.tx);
        match self.worker.join() {
            Ok(cut) => cut,
            // Nothing in the worker panics on bad data; this is a bug, and
            // the bytes it held are gone with it.
            Err(_) => {
                tracing::error!("a chunking thread panicked; a streamed file lost bytes");
                Cut {
                    chunks: Vec::new(),
                    pinned: Vec::new(),
                    end: 0,
                    tail: Vec::new(),
                    error: Some(FsError::Io(std::io::Error::other(
                        "chunking thread panicked",
                    ))),
                }
            }
        }
    }
}

fn work(
    store: &dyn Store,
    sizes: ChunkSizes,
    end: u64,
    tail: Vec<u8>,
    rx: Receiver<Vec<u8>>,
    give_back: &SyncSender<Vec<u8>>,
    failed: &AtomicBool,
) -> Cut {
    let mut cut = Cut {
        chunks: Vec::new(),
        pinned: Vec::new(),
        end,
        tail,
        error: None,
    };
    // Runs until the writer hangs up, even after an error: bytes already in
    // the queue must come back to it, not be dropped with the queue.
    for bytes in rx {
        if cut.tail.is_empty() {
            cut.tail = bytes;
        } else {
            cut.tail.extend_from_slice(&bytes);
            let mut empty = bytes;
            empty.clear();
            // Full (or the writer gone): this one is simply freed.
            let _ = give_back.try_send(empty);
        }
        if cut.error.is_some() {
            continue;
        }
        if let Err(e) = cut_complete(
            store,
            &mut cut.end,
            &mut cut.tail,
            &mut cut.chunks,
            &mut cut.pinned,
            sizes,
        ) {
            cut.error = Some(e);
            failed.store(true, Ordering::Release);
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemChunkStore;

    #[test]
    fn emptied_buffers_come_back_for_the_next_hand_overs() {
        let store: Arc<dyn Store> = Arc::new(MemChunkStore::new());
        let running = Arc::new(AtomicUsize::new(0));
        let sizes = ChunkSizes {
            min: 1024,
            avg: 4096,
            max: 16384,
        };
        let mut x = 7u64;
        let data: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let mib = HANDOFF_BYTES;
        let c = Cutter::start(store, sizes, 0, data[..mib].to_vec(), &running)
            .unwrap_or_else(|_| panic!("no worker started"));
        // The worker keeps an unfinished chunk from the first megabyte, so
        // it copies the next ones after it and can give their buffers back.
        c.send(data[mib..2 * mib].to_vec()).unwrap();
        c.send(data[2 * mib..].to_vec()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let spare = loop {
            if let Some(b) = c.spare() {
                break b;
            }
            assert!(std::time::Instant::now() < deadline, "no buffer came back");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(spare.is_empty() && spare.capacity() >= mib);
        let cut = c.finish();
        assert!(cut.error.is_none());
        let stored: u64 = cut.chunks.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(stored, cut.end);
        assert_eq!(cut.end as usize + cut.tail.len(), data.len());
        assert_eq!(cut.tail, data[cut.end as usize..]);
        assert_eq!(running.load(Ordering::Acquire), 0, "the slot is given back");
    }
}
