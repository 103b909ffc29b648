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

/// Longest request line accepted (a fetch lists its chunk hashes).
const MAX_REQUEST: usize = 16 << 20;

/// How often a request that reports progress sends a line.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A check's progress as the CLI reads it: bytes and chunks read of the
/// totals (sent by the daemon, or read from the counters by an offline
/// check).
pub fn check_progress_json(p: &crate::storage::CheckProgress) -> serde_json::Value {
    let (bytes_done, bytes_total, chunks_done, chunks_total) = p.now();
    serde_json::json!({
        "bytes_done": bytes_done,
        "bytes_total": bytes_total,
        "chunks_done": chunks_done,
        "chunks_total": chunks_total,
    })
}

/// A progress line of a check.
fn progress_line(p: &crate::storage::CheckProgress) -> serde_json::Value {
    serde_json::json!({ "progress": check_progress_json(p) })
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Write the access log as a trace file in the data dir; the reply
    /// names it.
    TraceExport,
    /// `meshfs check`; with `progress`, progress lines (`{"progress":
    /// ...}`) come before the reply (`request_following`).
    Check {
        #[serde(default)]
        progress: bool,
    },
    /// Open a join listener and return a one-time code.
    Invite {
        ttl_s: u64,
    },
    RemoveDevice {
        name: String,
    },
    /// The chunk list of a file, by its path inside the mount.
    Chunks {
        path: String,
    },
    /// The conflicts met at reintegration; with `clear`, forget them.
    Conflicts {
        #[serde(default)]
        clear: bool,
    },
    /// The kept versions of the file at `path` (from the mount's root), and
    /// of the trashed files that were there.
    Versions {
        path: String,
    },
    /// Makes version `version` of the file at `path` current again (as a
    /// new version), or brings a trashed file back at `path`: the one
    /// `deleted` names, else the most recently removed one.
    Restore {
        path: String,
        #[serde(default)]
        version: Option<u64>,
        #[serde(default)]
        deleted: Option<u64>,
    },
    /// Authority, reputation, quality, proximity and temperature of a
    /// resource (`meshfs stat`), by inode number.
    Stat {
        resource: u64,
    },
    /// Keep the subtree at `path` (from the mount's root) on this device:
    /// fetch it now, never evict it.
    Pin {
        path: String,
    },
    /// Drop the pin of `path` (its resource, or the path it was pinned at).
    Unpin {
        path: String,
    },
    /// The pins, each with how much of it is here, and catch-up progress.
    Pins,
    /// Devices holding a resource, from Kademlia provider records.
    Holders {
        resource: u64,
    },
    /// Fetch chunks from other devices (those named in `from`, in that
    /// order, or every other member when it is empty) into the local cache;
    /// with `out`, also write them in order to that file as they arrive.
    /// For tests and benchmarks of content exchange until the namespace is
    /// shared.
    Fetch {
        #[serde(default)]
        from: Vec<String>,
        hashes: Vec<String>,
        out: Option<std::path::PathBuf>,
    },
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
        Ok(Request::Status) => status(&node, node.mesh.status().await.ok()),
        Ok(Request::Check { progress }) => {
            // The check reads every chunk stored here (minutes on a large
            // store): with `progress`, a line saying how far it is goes
            // out every PROGRESS_EVERY before the reply, which also keeps
            // the asker's read timeout from firing.
            let counts = Arc::new(crate::storage::CheckProgress::default());
            let (n, c) = (node.clone(), counts.clone());
            let mut check = tokio::spawn(async move { crate::node::check_mesh(&n, c).await });
            let done = loop {
                tokio::select! {
                    done = &mut check => break done,
                    _ = tokio::time::sleep(PROGRESS_EVERY), if progress => {
                        write_line(&mut w, &progress_line(&counts)).await?;
                    }
                }
            };
            if progress {
                // The last line says what was read in all, however quick.
                write_line(&mut w, &progress_line(&counts)).await?;
            }
            match done {
                Ok(Ok(report)) => serde_json::json!({ "ok": report.is_clean(), "report": report }),
                Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            }
        }
        Ok(Request::Invite { ttl_s }) => {
            let ttl = Duration::from_secs(ttl_s.clamp(1, 7 * 24 * 3600));
            match crate::mesh::join::invite(&node.mesh, ttl).await {
                Ok(code) => serde_json::json!({ "code": code.encode(), "expires": code.expires }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            }
        }
        Ok(Request::RemoveDevice { name }) => match node.mesh.remove_member(&name).await {
            Ok(m) => serde_json::json!({ "removed": m.name, "id": m.device.to_hex() }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        Ok(Request::Chunks { path }) => chunks(&node, &path),
        Ok(Request::Holders { resource }) => holders(&node, resource).await,
        Ok(Request::Conflicts { clear }) => conflicts(&node, clear),
        Ok(Request::Versions { path }) => versions(&node, &path).await,
        Ok(Request::Restore {
            path,
            version,
            deleted,
        }) => restore(&node, path, version, deleted).await,
        Ok(Request::Stat { resource }) => {
            match node.replica.stat(crate::ids::ResourceId(resource)).await {
                Some(st) => serde_json::to_value(st).unwrap_or_default(),
                None => {
                    serde_json::json!({ "error": format!("no resource {resource} in the namespace") })
                }
            }
        }
        Ok(Request::Fetch { from, hashes, out }) => fetch(&node, from, hashes, out).await,
        Ok(Request::Pin { path }) => pin(&node, path).await,
        Ok(Request::Unpin { path }) => unpin(&node, &path),
        Ok(Request::Pins) => {
            let n = node.clone();
            tokio::task::spawn_blocking(move || pins(&n))
                .await
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
        }
        Ok(Request::TraceExport) => {
            let n = node.clone();
            match tokio::task::spawn_blocking(move || crate::node::export_trace_file(&n)).await {
                Ok(Ok((path, events))) => serde_json::json!({ "file": path, "events": events }),
                Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            }
        }
        Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
    };
    write_line(&mut w, &reply).await?;
    w.shutdown().await
}

/// One JSON line to the asker.
async fn write_line(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    v: &serde_json::Value,
) -> std::io::Result<()> {
    let mut out = v.to_string();
    out.push('\n');
    w.write_all(out.as_bytes()).await
}

fn chunks(node: &Node, path: &str) -> serde_json::Value {
    let found = node.fs.with_meta(|m| {
        let ino = m.resolve(path.as_bytes())?;
        let i = m.get(ino)?;
        let c = i.content.as_ref()?;
        Some((ino, c.size, c.chunks.clone()))
    });
    match found {
        None => serde_json::json!({ "error": format!("{path}: no such regular file") }),
        Some((ino, size, chunks)) => serde_json::json!({
            "resource": ino.0,
            "size": size,
            "chunks": chunks.iter().map(|c| serde_json::json!({
                "hash": c.hash.to_string(), "offset": c.offset, "len": c.len,
            })).collect::<Vec<_>>(),
        }),
    }
}

async fn holders(node: &Node, resource: u64) -> serde_json::Value {
    let found = node
        .mesh
        .find_holders(crate::ids::ResourceId(resource))
        .await;
    let st = node.mesh.status().await;
    match (found, st) {
        (Ok(devices), Ok(st)) => {
            let names: Vec<&str> = st
                .devices
                .iter()
                .filter(|d| devices.contains(&d.id))
                .map(|d| d.name.as_str())
                .collect();
            serde_json::json!({ "holders": names })
        }
        (Err(e), _) | (_, Err(e)) => serde_json::json!({ "error": e.to_string() }),
    }
}

async fn fetch(
    node: &Node,
    from: Vec<String>,
    hashes: Vec<String>,
    out: Option<std::path::PathBuf>,
) -> serde_json::Value {
    let err = |e: String| serde_json::json!({ "error": e });
    let mut parsed = Vec::with_capacity(hashes.len());
    for h in &hashes {
        match crate::ids::ChunkHash::parse_hex(h) {
            Some(h) => parsed.push(h),
            None => return err(format!("bad chunk hash {h:?}")),
        }
    }
    let holders = if from.is_empty() {
        match node.mesh.nearest_devices().await {
            Ok(h) => h,
            Err(e) => return err(e.to_string()),
        }
    } else {
        let status = match node.mesh.status().await {
            Ok(s) => s,
            Err(e) => return err(e.to_string()),
        };
        let mut named = Vec::with_capacity(from.len());
        for name in &from {
            match status.devices.iter().find(|d| &d.name == name) {
                Some(d) => named.push(d.id),
                None => return err(format!("no device named {name} in the mesh")),
            }
        }
        named
    };
    let mut file = match &out {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Some(f),
            Err(e) => return err(format!("{}: {e}", p.display())),
        },
        None => None,
    };
    let r = node
        .mesh
        .fetch_stream(parsed, holders, None, |_, data| {
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                // A disk write on a runtime thread: tell the runtime, so
                // that other tasks move to another worker meanwhile.
                tokio::task::block_in_place(|| f.write_all(&data))
                    .map_err(|e| crate::mesh::MeshError::io("writing the fetched data", e))?;
            }
            Ok(())
        })
        .await;
    match r {
        Ok(rep) => serde_json::json!({
            "chunks": rep.chunks,
            "bytes": rep.bytes,
            "first_chunk_ms": rep.first_chunk.map(|d| d.as_secs_f64() * 1000.0),
            "total_ms": rep.total.as_secs_f64() * 1000.0,
        }),
        Err(e) => err(e.to_string()),
    }
}

/// Device names by id, for listings (a device removed since shows as its
/// id).
async fn device_names(node: &Node) -> std::collections::HashMap<crate::ids::DeviceId, String> {
    let mut names = std::collections::HashMap::new();
    if let Ok(st) = node.mesh.status().await {
        for d in st.devices {
            names.insert(d.id, d.name);
        }
    }
    names
}

async fn versions(node: &Node, path: &str) -> serde_json::Value {
    let found = node.fs.versions(path.as_bytes());
    let names = device_names(node).await;
    let name = |d: &crate::ids::DeviceId| names.get(d).cloned().unwrap_or_else(|| d.to_hex());
    match found {
        Err(crate::fs::FsError::Meta(crate::meta::MetaError::NotFound)) => {
            serde_json::json!({ "error": format!("{path}: no such file, and none in the trash") })
        }
        Err(e) => serde_json::json!({ "error": format!("{path}: {e}") }),
        Ok(files) => serde_json::json!({
            "path": path,
            "files": files.iter().map(|f| serde_json::json!({
                "resource": f.resource.0,
                "deleted": f.deleted.map(|(at, by)| serde_json::json!({
                    "time": at.secs, "by": name(&by),
                })),
                "versions": f.versions.iter().map(|v| serde_json::json!({
                    "version": v.version.0,
                    "time": v.committed.secs,
                    "time_nanos": v.committed.nanos,
                    "size": v.size,
                    "author": v.author.as_ref().map(name),
                    "hash": v.hash,
                    "current": v.current,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    }
}

async fn restore(
    node: &Arc<Node>,
    path: String,
    version: Option<u64>,
    deleted: Option<u64>,
) -> serde_json::Value {
    let fs = node.fs.clone();
    let p = path.clone();
    let done = tokio::task::spawn_blocking(move || {
        fs.restore(
            p.as_bytes(),
            version.map(crate::ids::VersionId),
            deleted.map(crate::ids::ResourceId),
        )
    })
    .await;
    match done {
        Ok(Ok(r)) => serde_json::json!({
            "path": path,
            "resource": r.resource.0,
            "from": r.from.0,
            "version": r.version.0,
            "undeleted": r.undeleted,
        }),
        Ok(Err(crate::fs::FsError::Meta(crate::meta::MetaError::Exists))) => serde_json::json!({
            "error": format!("{path}: a file is there now; move it away first to bring the removed one back")
        }),
        Ok(Err(crate::fs::FsError::Meta(crate::meta::MetaError::NotFound))) => {
            serde_json::json!({ "error": format!("{path}: no such file, and none in the trash") })
        }
        Ok(Err(e)) => serde_json::json!({ "error": format!("{path}: {e}") }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

async fn pin(node: &Arc<Node>, path: String) -> serde_json::Value {
    let Some(resource) = node.fs.with_meta(|m| m.resolve(path.as_bytes())) else {
        return serde_json::json!({ "error": format!("{path}: no such file or directory") });
    };
    let p = crate::pin::Pin {
        resource,
        path: format!("/{}", path.trim_start_matches('/')),
        since: crate::meta::Timestamp::now().secs,
    };
    match node.pins.add(p) {
        Ok(new) => {
            // Fetching starts now, in the replication task; the CLI follows
            // it with `Pins`.
            node.replicate_now.notify_one();
            serde_json::json!({ "pinned": path, "resource": resource.0, "new": new })
        }
        Err(e) => serde_json::json!({ "error": e }),
    }
}

fn unpin(node: &Node, path: &str) -> serde_json::Value {
    let shown = format!("/{}", path.trim_start_matches('/'));
    let by_path = node
        .pins
        .list()
        .into_iter()
        .find(|p| p.path == shown)
        .map(|p| p.resource);
    let resource = node
        .fs
        .with_meta(|m| m.resolve(path.as_bytes()))
        .filter(|r| node.pins.list().iter().any(|p| p.resource == *r))
        .or(by_path);
    let Some(resource) = resource else {
        return serde_json::json!({ "error": format!("{shown} is not pinned") });
    };
    match node.pins.remove(resource) {
        Ok(Some(p)) => serde_json::json!({ "unpinned": p.path, "resource": resource.0 }),
        Ok(None) => serde_json::json!({ "error": format!("{shown} is not pinned") }),
        Err(e) => serde_json::json!({ "error": e }),
    }
}

/// The pins with their progress, and the replication catch-up.
fn pins(node: &Node) -> serde_json::Value {
    serde_json::json!({
        "pins": pin_list(node),
        "catch_up": *crate::lock(&node.catch_up),
    })
}

/// Each pin with how much of its tree is here.
fn pin_list(node: &Node) -> Vec<serde_json::Value> {
    node.pins
        .list()
        .into_iter()
        .map(|p| {
            let (present, prog) = node.fs.with_meta(|m| {
                (
                    m.get(p.resource).is_some(),
                    crate::pin::progress(m, &*node.store, p.resource),
                )
            });
            serde_json::json!({
                "path": p.path,
                "resource": p.resource.0,
                "since": p.since,
                "present": present,
                "files": prog.files,
                "bytes_total": prog.bytes_total,
                "bytes_here": prog.bytes_here,
                "complete": prog.complete(),
            })
        })
        .collect()
}

fn conflicts(node: &Node, clear: bool) -> serde_json::Value {
    let list: Vec<serde_json::Value> = node
        .replica
        .conflicts()
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "kind": c.kind.label(),
                "made": c.made.secs,
                "found": c.found.secs,
                "path": c.path,
                "kept_as": c.kept_as,
                "detail": c.detail,
            })
        })
        .collect();
    if clear {
        if let Err(e) = node.replica.clear_conflicts() {
            return serde_json::json!({ "error": e.to_string() });
        }
    }
    serde_json::json!({ "conflicts": list, "cleared": clear })
}

fn status(node: &Node, mesh: Option<crate::mesh::MeshStatus>) -> serde_json::Value {
    let stats = node.store.stats().unwrap_or_default();
    let fs = node.fs.stats();
    let inodes = node.fs.with_meta(|m| m.inode_count());
    let raft = node.replica.status();
    serde_json::json!({
        "running": true,
        "pid": std::process::id(),
        "name": node.cfg.name,
        "id": node.cfg.device_id,
        "mountpoint": node.mountpoint,
        "uptime_s": node.started.elapsed().as_secs(),
        "devices": match &mesh {
            Some(m) => serde_json::to_value(&m.devices).unwrap_or_default(),
            None => serde_json::json!([{"name": node.cfg.name, "id": node.cfg.device_id, "up": true, "rtt_ms": 0.0}]),
        },
        "peer": mesh.as_ref().map(|m| m.peer.clone()),
        "listen": mesh.as_ref().map(|m| m.listen.clone()),
        "refused_connections": mesh.as_ref().map(|m| m.refused_connections),
        "leader": raft.leader,
        "term": raft.term,
        "raft": raft,
        "cache_bytes": stats.bytes,
        "chunks": stats.chunks,
        "inodes": inodes,
        "commits": fs.commits,
        "rechunked_bytes": fs.rechunked_bytes,
        "open_files": fs.open_files,
        "passthrough": fs.passthrough,
        "memory": {
            "rss_bytes": rss_bytes(),
            "rocksdb": node.store.memory_usage(),
        },
        "prefetch": prefetch_status(node),
        "reads": node.reads.json(),
        "metrics_url": node.http_addr.map(|a| crate::web::url(a, "/metrics")),
        "dashboard_url": node.http_addr.map(|a| crate::web::url(a, "/")),
        "pins": pin_list(node),
        "catch_up": *crate::lock(&node.catch_up),
    })
}

/// This process's resident memory, from /proc (None where unreadable).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The prefetch ledger (hits, misses, wasted bytes) and the model's state.
fn prefetch_status(node: &Node) -> serde_json::Value {
    let Some(p) = &node.prefetch else {
        return serde_json::json!({"hits": 0, "misses": 0, "wasted_bytes": 0, "enabled": false});
    };
    let mut v = p.ledger.json();
    let s = &p.engine.stats;
    use std::sync::atomic::Ordering::Relaxed;
    v["enabled"] = serde_json::json!(node.cfg.prefetch);
    v["local_events"] = s.local_events.load(Relaxed).into();
    v["remote_events"] = s.remote_events.load(Relaxed).into();
    v["dropped_events"] = s.dropped_events.load(Relaxed).into();
    v["rejected_batches"] = s.rejected_batches.load(Relaxed).into();
    v["duplicate_events"] = s.duplicate_events.load(Relaxed).into();
    v["resent_events"] = s.resent_events.load(Relaxed).into();
    v["model"] = serde_json::to_value(&*crate::lock(&s.report)).unwrap_or_default();
    v
}

/// Sends one request to the daemon of `data_dir`.
pub fn request(data_dir: &Path, req: &Request) -> Result<serde_json::Value, Error> {
    request_following(data_dir, req, &mut |_| {})
}

/// `request` of one that reports progress: each progress line before the
/// reply goes to `on_progress` (its `progress` object).
pub fn request_following(
    data_dir: &Path,
    req: &Request,
    on_progress: &mut dyn FnMut(&serde_json::Value),
) -> Result<serde_json::Value, Error> {
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
    let mut reader = BufReader::new(s);
    let v = loop {
        let mut reply = String::new();
        let n = reader
            .read_line(&mut reply)
            .map_err(|e| Error::io("reading the daemon's reply", e))?;
        if n == 0 {
            return Err(Error::Control(
                "the daemon closed the connection without a reply".into(),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(reply.trim())
            .map_err(|e| Error::Control(format!("bad reply: {e}")))?;
        match v
            .as_object()
            .and_then(|o| o.get("progress").filter(|_| o.len() == 1))
        {
            Some(p) => on_progress(p),
            None => break v,
        }
    };
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Control(err.to_string()));
    }
    Ok(v)
}
