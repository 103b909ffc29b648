//! meshfs: a peer-to-peer filesystem for the devices one person or team owns.
//!
//! Codemap (see docs/ARCHITECTURE.md for invariants):
//! - `ids`: newtypes for devices, resources (inodes), chunks and versions.
//! - `config`: the one documented `Config` (TOML) and mount options.
//! - `meta`: the namespace as a deterministic state machine, no I/O, with
//!   the ownership rule (who governs what).
//! - `authority`: reputation and the authority policy, pure functions.
//! - `storage`: RocksDB (the only user of rocksdb): chunks, refcounts, state.
//! - `fs`: filesystem semantics: handles, spills, reads, commits.
//! - `fuse`: the thin kernel adapter (the only user of fuser) and mounting.
//! - `mesh`: libp2p (its only user): the swarm actor, invite/join, chunk
//!   transfer, availability; `MeshClient` is its handle.
//! - `readahead`: streamed remote reads (the window ahead of a sequential
//!   reader, chunks in flight) behind the FUSE read path.
//! - `prefetch`: access log, predictors (the GRU in `prefetch/rnn.rs` is
//!   the only user of tch), temperature, the evaluation harness.
//! - `control`: the daemon's control socket and its client.
//! - `node`: composition root: init, start-up, serve, shutdown.
//! - `error`: the daemon- and CLI-level error.

pub mod authority;
pub mod civil;
pub mod config;
pub mod control;
pub mod datadir;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod fuzzing;
pub mod ids;
pub mod logfile;
pub mod mesh;
pub mod meta;
pub mod metrics;
pub mod mountinfo;
pub mod node;
pub mod pin;
pub mod prefetch;
pub mod progress;
pub mod raft;
pub mod readahead;
pub mod replicate;
pub mod storage;
pub mod web;

/// Locks a mutex even if a thread panicked while holding it: one failed
/// request must not take the whole mount down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
