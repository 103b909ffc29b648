//! The daemon's HTTP listener on loopback (Config `http_listen`): the
//! Prometheus metrics at `/metrics`, read from the rest of the daemon at
//! each scrape, and the dashboard at `/` with its data at `/api/state`
//! (`dashboard.rs`). Plain HTTP/1.1 by hyper; a bounded number of connections,
//! each with a deadline, so that a stuck scraper costs nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};

use crate::config::Config;
use crate::metrics::{PeerSnap, Snapshot};
use crate::node::Node;

pub mod dashboard;
use crate::storage::ChunkStore;
use dashboard::Dashboard;

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request by then is closed.
const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// Longest a scrape waits for the mesh actor's figures; without them the
/// scrape still answers, with what the rest of the daemon knows.
const MESH_WAIT: Duration = Duration::from_secs(2);
/// Where `auto` ports start, and how many are tried from the device's own.
const AUTO_BASE: u16 = 9720;
const AUTO_SPREAD: u16 = 200;
const AUTO_TRIES: u16 = 16;

/// The port `auto` tries first for `device`: the same after a restart,
/// and different for most devices sharing a machine.
pub fn auto_port(device: &crate::ids::DeviceId) -> u16 {
    let n = u16::from_le_bytes([device.0[0], device.0[1]]);
    AUTO_BASE + n % AUTO_SPREAD
}

/// Binds the listener of Config `http_listen` (None when off). A taken
/// port is logged and leaves the daemon without metrics rather than
/// without its mount.
pub fn bind(cfg: &Config) -> Option<std::net::TcpListener> {
    let addr = match cfg.http_addr() {
        Ok(Some(a)) => a,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "no metrics listener");
            return None;
        }
    };
    let tries: Vec<SocketAddr> = if addr.port() == 0 {
        let first = auto_port(&cfg.device_id());
        (0..AUTO_TRIES)
            .map(|i| SocketAddr::new(addr.ip(), first + i))
            // Then any free port: metrics on a port of its own choosing
            // beat none (status shows where).
            .chain(std::iter::once(addr))
            .collect()
    } else {
        vec![addr]
    };
    let mut last = None;
    for a in tries {
        match std::net::TcpListener::bind(a) {
            Ok(l) => {
                if let Err(e) = l.set_nonblocking(true) {
                    tracing::warn!(error = %e, "no metrics listener");
                    return None;
                }
                return Some(l);
            }
            Err(e) => last = Some((a, e)),
        }
    }
    if let Some((a, e)) = last {
        tracing::warn!(addr = %a, error = %e, "could not listen for metrics (http_listen); serving none");
    }
    None
}

/// The URL of `path` on the listener at `addr`.
pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, node: Arc<Node>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "metrics listener unusable");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let dash = Arc::new(Dashboard::default());
    // The dashboard's history: a sample of a few counters every 5 s.
    let sampler = {
        let (node, dash) = (node.clone(), dash.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(dashboard::SAMPLE_EVERY);
            loop {
                tick.tick().await;
                dash.record(dashboard::sample(&node));
            }
        })
    };
    let _stop_sampler = AbortOnDrop(sampler);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (node, dash) = (node.clone(), dash.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc =
                hyper::service::service_fn(move |req| answer(req, node.clone(), dash.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .keep_alive(true)
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
            drop(permit);
        });
    }
}

/// Ends the sampler with the listener's task.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn answer<B>(
    req: Request<B>,
    node: Arc<Node>,
    dash: Arc<Dashboard>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let mesh = tokio::time::timeout(MESH_WAIT, node.mesh.status())
                .await
                .ok()
                .and_then(Result::ok);
            let snap = snapshot(&node, mesh.as_ref());
            match node.metrics.encode(&snap) {
                Ok(text) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            dashboard::PAGE.to_string(),
        ),
        "/api/state" => reply(
            StatusCode::OK,
            "application/json",
            dashboard::state(&node, &dash).await.to_string(),
        ),
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    })
}

/// What the rest of the daemon counts, for one scrape.
pub fn snapshot(node: &Node, mesh: Option<&crate::mesh::MeshStatus>) -> Snapshot {
    let stats = node.store.stats().unwrap_or_default();
    let fs = node.fs.stats();
    let raft = node.replica.status();
    let ch = &raft.changes;
    let me = node.cfg.device_id();
    let peers = mesh
        .map(|m| {
            m.devices
                .iter()
                .filter(|d| d.id != me)
                .map(|d| PeerSnap {
                    name: d.name.clone(),
                    up: d.up,
                    rtt_s: d.rtt_ms.map(|ms| ms / 1000.0),
                    throughput_bytes_s: d.throughput_mib_s.map(|m| m * f64::from(1u32 << 20)),
                    received_bytes: d.received_bytes,
                    failed_requests: d.failed_requests,
                    bad_chunks: d.bad_chunks,
                })
                .collect()
        })
        .unwrap_or_default();
    let ledger = node
        .prefetch
        .as_ref()
        .map(|p| p.ledger.totals())
        .unwrap_or_default();
    Snapshot {
        device: node.cfg.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: node.started.elapsed().as_secs(),
        rss_bytes: crate::control::rss_bytes(),
        cache_bytes: stats.bytes,
        cache_chunks: stats.chunks,
        inodes: node.fs.with_meta(|m| m.inode_count()) as u64,
        open_files: fs.open_files,
        commits: fs.commits,
        chunk_reads_local: fs.chunk_reads[0],
        chunk_reads_ahead: fs.chunk_reads[1],
        chunk_reads_remote: fs.chunk_reads[2],
        opens_passthrough: fs.passthrough.opens_passthrough,
        opens_cached: fs.passthrough.opens_cached,
        backing_bytes: fs.passthrough.backing_bytes,
        file_hits: ledger.hits,
        file_misses: ledger.misses,
        prefetched_bytes: ledger.prefetched_bytes,
        prefetch_wasted_bytes: ledger.wasted_bytes,
        prefetch_unused_bytes: ledger.unused_bytes,
        raft_term: raft.term,
        raft_is_leader: raft.state == "leader",
        raft_leader: raft.leader.clone(),
        raft_degraded: raft.degraded,
        raft_last_log_index: raft.last_log_index.unwrap_or(0),
        raft_applied_index: raft.applied_index.unwrap_or(0),
        stale_reads: raft.stale_reads,
        changes_applied_here: ch.applied_here,
        changes_forwarded: ch.forwarded,
        changes_through_raft: ch.through_raft,
        outbox_pending: ch.pending as u64,
        outbox_uncommitted: ch.last_seq.saturating_sub(ch.committed_seq),
        journal_tentative: ch.tentative.waiting as u64,
        journal_oldest_age_s: ch.tentative.since.map(|t| {
            let now = crate::meta::Timestamp::now().secs;
            now.saturating_sub(t).max(0) as u64
        }),
        conflicts_listed: ch.tentative.conflicts as u64,
        authority_moves: ch.authority_moves,
        served_bytes: ch.served_bytes,
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_ports_stay_in_their_range_and_differ_by_device() {
        let a = crate::ids::DeviceId([1; 16]);
        let b = crate::ids::DeviceId([2; 16]);
        assert_eq!(auto_port(&a), auto_port(&a));
        assert_ne!(auto_port(&a), auto_port(&b));
        for d in [a, b, crate::ids::DeviceId([255; 16])] {
            let p = auto_port(&d);
            assert!((AUTO_BASE..AUTO_BASE + AUTO_SPREAD).contains(&p));
        }
    }
}
