//! The daemon- and command-level error: what `node` and the CLI report.
//! Subsystems keep their own enums; this wraps them with the context a user
//! needs to act (which path, which pid).

use std::path::PathBuf;

use crate::fs::FsError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not a meshfs data dir (run `meshfs init --data-dir {0}` first)")]
    NotInitialized(PathBuf),
    #[error("{0} is already a meshfs data dir")]
    AlreadyInitialized(PathBuf),
    #[error("data dir {dir} is in use by another meshfs daemon{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("mount point {0} does not exist")]
    NoMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    MountPointNotDir(PathBuf),
    #[error("{0} is already mounted")]
    AlreadyMounted(PathBuf),
    #[error("{path} is a stale mount (its daemon died); run `umount {path}` or `fusermount3 -u {path}` and retry")]
    StaleMount { path: PathBuf },
    #[error("mount failed: {0}")]
    Mount(String),
    #[error("bad mount option: {0}")]
    BadOption(String),
    /// A command given what it cannot use (the message says what).
    #[error("{0}")]
    Usage(String),
    #[error("data dir {dir}: {msg}")]
    Format { dir: PathBuf, msg: String },
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("no meshfs daemon is running for {0}")]
    NotRunning(PathBuf),
    #[error("control socket: {0}")]
    Control(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("filesystem: {0}")]
    Fs(#[from] FsError),
    #[error("{0}")]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("{0}")]
    Raft(#[from] crate::raft::RaftError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
