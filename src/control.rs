//! The control socket (`DATA_DIR/control.sock`, mode 0600): how the CLI
//! reaches a running daemon. One JSON request line, one JSON reply line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::error::Error;
use crate::node::{Node, SOCKET_FILE};
use crate::storage::ChunkStore;

/// Longest request line accepted: requests are tiny.
const MAX_REQUEST: usize = 4096;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Check,
}

pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    // A socket left by a daemon that died; the data dir lock proves it dead.
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("securing {}", path.display()), e))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, node: Arc<Node>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, node).await {
                        tracing::debug!(error = %e, "control connection failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, node: Arc<Node>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(r).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => status(&node),
        Ok(Request::Check) => {
            let n = node.clone();
            match tokio::task::spawn_blocking(move || n.fs.with_meta(|m| n.store.check(m))).await {
                Ok(Ok(report)) => serde_json::json!({ "ok": report.is_clean(), "report": report }),
                Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            }
        }
        Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
    };
    let mut out = reply.to_string();
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

fn status(node: &Node) -> serde_json::Value {
    let stats = node.store.stats().unwrap_or_default();
    let fs = node.fs.stats();
    let inodes = node.fs.with_meta(|m| m.inode_count());
    serde_json::json!({
        "running": true,
        "pid": std::process::id(),
        "name": node.cfg.name,
        "id": node.cfg.device_id,
        "mountpoint": node.mountpoint,
        "uptime_s": node.started.elapsed().as_secs(),
        // One device until devices form a mesh: this one, reachable, no RTT.
        "devices": [{"name": node.cfg.name, "id": node.cfg.device_id, "up": true, "rtt_ms": 0.0}],
        // No consensus runs yet, so there is no leader and no term.
        "leader": null,
        "term": 0,
        "cache_bytes": stats.bytes,
        "chunks": stats.chunks,
        "inodes": inodes,
        "commits": fs.commits,
        "rechunked_bytes": fs.rechunked_bytes,
        "open_files": fs.open_files,
        "prefetch": {"hits": 0, "misses": 0, "wasted_bytes": 0},
    })
}

/// Sends one request to the daemon of `data_dir`.
pub fn request(data_dir: &Path, req: &Request) -> Result<serde_json::Value, Error> {
    let path = data_dir.join(SOCKET_FILE);
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(Error::NotRunning(data_dir.to_path_buf()))
        }
        Err(e) => return Err(Error::io(format!("connecting to {}", path.display()), e)),
    };
    let timeout = Some(Duration::from_secs(60));
    let _ = s.set_read_timeout(timeout);
    let _ = s.set_write_timeout(timeout);
    let mut line = serde_json::to_string(req).map_err(|e| Error::Control(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| Error::io("sending to the daemon", e))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| Error::io("reading the daemon's reply", e))?;
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| Error::Control(format!("bad reply: {e}")))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Control(err.to_string()));
    }
    Ok(v)
}
