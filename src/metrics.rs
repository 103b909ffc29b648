//! The daemon's Prometheus metrics (names start with `meshfs_`). What is
//! measured as it happens and counted nowhere else, the latency of every
//! kernel request, lives here in histograms. What other parts already count
//! (Raft, the mesh, the store, prefetch, the outbox) is read when a scraper
//! asks, as a [`Snapshot`], and encoded beside them: one source of truth per
//! figure, and nothing to keep in step. No I/O: `web.rs` serves the text.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The media type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// The kernel requests the mount answers, as labels of
/// `meshfs_fuse_operation_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Access,
    Fallocate,
    Lseek,
    Create,
}

impl Op {
    pub const ALL: [Op; 29] = [
        Op::Lookup,
        Op::Getattr,
        Op::Setattr,
        Op::Readlink,
        Op::Mknod,
        Op::Mkdir,
        Op::Unlink,
        Op::Rmdir,
        Op::Symlink,
        Op::Rename,
        Op::Link,
        Op::Open,
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Release,
        Op::Fsync,
        Op::Opendir,
        Op::Readdir,
        Op::Fsyncdir,
        Op::Statfs,
        Op::Setxattr,
        Op::Getxattr,
        Op::Listxattr,
        Op::Removexattr,
        Op::Access,
        Op::Fallocate,
        Op::Lseek,
        Op::Create,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Access => "access",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
            Op::Create => "create",
        }
    }
}

/// Latency histograms of kernel requests, one per [`Op`], made up front so
/// that timing a request is a lock of its own histogram only (no lookup of
/// a label set on the FUSE threads).
#[derive(Debug)]
pub struct FuseOps {
    by_op: Vec<Histogram>,
}

impl FuseOps {
    /// Starts timing one request; the time is recorded when the guard drops
    /// (after the reply was sent, as the handler returns).
    pub fn time(&self, op: Op) -> OpTimer<'_> {
        OpTimer {
            hist: &self.by_op[op as usize],
            start: Instant::now(),
        }
    }
}

/// Records a request's duration when dropped.
pub struct OpTimer<'a> {
    hist: &'a Histogram,
    start: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The live registry (what is measured as it happens).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub fuse: FuseOps,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    // 10 µs (a cached getattr) to 10 s (a write waiting for the mesh).
    Histogram::new(exponential_buckets(1e-5, 4.0, 11))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshfs");
        let family: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let by_op = Op::ALL
            .iter()
            .map(|op| {
                let labels = vec![("op".to_string(), op.label().to_string())];
                family.get_or_create(&labels).clone()
            })
            .collect();
        registry.register(
            "fuse_operation_seconds",
            "Time to answer a kernel request through the mount, by operation",
            family,
        );
        Metrics {
            registry,
            fuse: FuseOps { by_op },
        }
    }

    /// The OpenMetrics text of the live registry and of `snap`.
    pub fn encode(&self, snap: &Snapshot) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &snap.registry())?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// One connected or known device, as the metrics show it.
#[derive(Debug, Clone, Default)]
pub struct PeerSnap {
    pub name: String,
    pub up: bool,
    pub rtt_s: Option<f64>,
    pub throughput_bytes_s: Option<f64>,
    pub received_bytes: u64,
    pub failed_requests: u64,
    pub bad_chunks: u64,
}

/// Figures counted elsewhere in the daemon, read at one scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub device: String,
    pub version: String,
    pub uptime_s: u64,
    pub rss_bytes: Option<u64>,
    pub cache_bytes: u64,
    pub cache_chunks: u64,
    pub inodes: u64,
    pub open_files: u64,
    pub commits: u64,
    /// Chunks read by the mount: from this device's store, fetched ahead of
    /// the reader, fetched while the reader waited.
    pub chunk_reads_local: u64,
    pub chunk_reads_ahead: u64,
    pub chunk_reads_remote: u64,
    pub opens_passthrough: u64,
    pub opens_cached: u64,
    pub backing_bytes: u64,
    /// First reads of opened files whose content was already here (the
    /// prefetch ledger's hits) and was not.
    pub file_hits: u64,
    pub file_misses: u64,
    pub prefetched_bytes: u64,
    pub prefetch_wasted_bytes: u64,
    pub prefetch_unused_bytes: u64,
    pub raft_term: u64,
    pub raft_leader: Option<String>,
    pub raft_is_leader: bool,
    pub raft_degraded: bool,
    pub raft_last_log_index: u64,
    pub raft_applied_index: u64,
    pub stale_reads: u64,
    pub changes_applied_here: u64,
    pub changes_forwarded: u64,
    pub changes_through_raft: u64,
    pub outbox_pending: u64,
    pub outbox_uncommitted: u64,
    pub journal_tentative: u64,
    pub journal_oldest_age_s: Option<u64>,
    pub conflicts_listed: u64,
    pub authority_moves: u64,
    pub served_bytes: u64,
    pub peers: Vec<PeerSnap>,
}

/// Adds metrics of one scrape to a registry.
struct Out(Registry);

impl Out {
    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.0.register(name, help, ConstGauge::new(v));
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.0.register(name, help, ConstCounter::new(v));
    }

    fn gauges(&mut self, name: &str, help: &str, rows: Vec<(Labels, f64)>) {
        let f: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        for (l, v) in rows {
            f.get_or_create(&l).set(v);
        }
        self.0.register(name, help, f);
    }

    fn counters(&mut self, name: &str, help: &str, rows: Vec<(Labels, u64)>) {
        let f: Family<Labels, prometheus_client::metrics::counter::Counter> = Family::default();
        for (l, v) in rows {
            f.get_or_create(&l).inc_by(v);
        }
        self.0.register(name, help, f);
    }
}

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

fn b(v: bool) -> f64 {
    if v {
        1.0
    } else {
        0.0
    }
}

impl Snapshot {
    fn registry(&self) -> Registry {
        let mut o = Out(Registry::with_prefix("meshfs"));
        let peer = |p: &PeerSnap| label("peer", &p.name);
        o.gauges(
            "device_info",
            "This device's name and the daemon's version (always 1)",
            vec![(
                vec![
                    ("device".into(), self.device.clone()),
                    ("version".into(), self.version.clone()),
                ],
                1.0,
            )],
        );
        o.gauge(
            "uptime_seconds",
            "Seconds since the daemon started",
            self.uptime_s as f64,
        );
        if let Some(rss) = self.rss_bytes {
            o.gauge(
                "resident_memory_bytes",
                "The daemon's resident memory",
                rss as f64,
            );
        }
        o.gauge(
            "cache_bytes",
            "Bytes of chunks stored on this device",
            self.cache_bytes as f64,
        );
        o.gauge(
            "cache_chunks",
            "Chunks stored on this device",
            self.cache_chunks as f64,
        );
        o.gauge(
            "inodes",
            "Files, directories and links in the namespace",
            self.inodes as f64,
        );
        o.gauge(
            "open_files",
            "Files open through the mount",
            self.open_files as f64,
        );
        o.counter(
            "commits",
            "File versions committed on this device",
            self.commits,
        );
        o.counters(
            "chunk_reads",
            "Chunks the mount read, by where they came from: this device's store (a cache hit), fetched ahead of the reader, or fetched while the reader waited (a miss)",
            vec![
                (label("from", "local"), self.chunk_reads_local),
                (label("from", "ahead"), self.chunk_reads_ahead),
                (label("from", "remote"), self.chunk_reads_remote),
            ],
        );
        o.counters(
            "file_first_reads",
            "First reads of opened files, by whether the content was already here",
            vec![
                (label("result", "hit"), self.file_hits),
                (label("result", "miss"), self.file_misses),
            ],
        );
        o.counters(
            "opens",
            "Opens for reading by how the kernel reads them: through the daemon (page cache) or by FUSE passthrough from a local copy",
            vec![
                (label("mode", "cached"), self.opens_cached),
                (label("mode", "passthrough"), self.opens_passthrough),
            ],
        );
        o.gauge(
            "passthrough_backing_bytes",
            "Bytes of passthrough copies in the data dir",
            self.backing_bytes as f64,
        );
        o.counter(
            "prefetched_bytes",
            "Bytes fetched because the predictor expected them to be opened",
            self.prefetched_bytes,
        );
        o.counter(
            "prefetch_wasted_bytes",
            "Prefetched bytes not opened in time",
            self.prefetch_wasted_bytes,
        );
        o.gauge(
            "prefetch_unused_bytes",
            "Prefetched bytes not opened yet",
            self.prefetch_unused_bytes as f64,
        );
        o.gauge("raft_term", "Raft term", self.raft_term as f64);
        o.gauge(
            "raft_is_leader",
            "1 when this device leads Raft",
            b(self.raft_is_leader),
        );
        if let Some(l) = &self.raft_leader {
            o.gauges(
                "raft_leader_info",
                "The Raft leader this device knows (always 1)",
                vec![(label("leader", l), 1.0)],
            );
        }
        o.gauge(
            "raft_degraded",
            "1 when no leader is known or the leader lost its quorum",
            b(self.raft_degraded),
        );
        o.gauge(
            "raft_last_log_index",
            "Index of the last Raft log entry here",
            self.raft_last_log_index as f64,
        );
        o.gauge(
            "raft_applied_index",
            "Index of the last Raft log entry applied here",
            self.raft_applied_index as f64,
        );
        o.gauge(
            "raft_apply_lag_entries",
            "Raft log entries here not yet applied",
            self.raft_last_log_index
                .saturating_sub(self.raft_applied_index) as f64,
        );
        o.counter(
            "stale_reads",
            "Opens and lookups served from the local replica because the governing device did not answer in time",
            self.stale_reads,
        );
        o.counters(
            "changes",
            "Namespace changes made on this device, by how they travel: applied here as authority, forwarded to the authority, or committed through Raft first",
            vec![
                (label("path", "applied_here"), self.changes_applied_here),
                (label("path", "forwarded"), self.changes_forwarded),
                (label("path", "through_raft"), self.changes_through_raft),
            ],
        );
        o.gauge(
            "outbox_pending_changes",
            "Changes applied here as authority and not yet committed through Raft",
            self.outbox_pending as f64,
        );
        o.gauge(
            "outbox_commit_lag",
            "Outbox sequence numbers given out here and not yet committed (the commit lag)",
            self.outbox_uncommitted as f64,
        );
        o.gauge(
            "journal_tentative_changes",
            "Changes made while their authority was out of reach, waiting to be reintegrated",
            self.journal_tentative as f64,
        );
        if let Some(age) = self.journal_oldest_age_s {
            o.gauge(
                "journal_oldest_age_seconds",
                "Age of the oldest tentative change",
                age as f64,
            );
        }
        o.gauge(
            "conflicts",
            "Conflicts listed by `meshfs conflicts`",
            self.conflicts_listed as f64,
        );
        o.counter(
            "authority_moves",
            "Authority moves this device carried out (handoffs, and takeovers as leader)",
            self.authority_moves,
        );
        o.counter(
            "served_bytes",
            "Bytes of files this device served to others",
            self.served_bytes,
        );
        o.gauges(
            "peer_up",
            "1 when the device is connected",
            self.peers.iter().map(|p| (peer(p), b(p.up))).collect(),
        );
        o.gauges(
            "peer_rtt_seconds",
            "Measured round trip to the device",
            self.peers
                .iter()
                .filter_map(|p| Some((peer(p), p.rtt_s?)))
                .collect(),
        );
        o.gauges(
            "peer_throughput_bytes_per_second",
            "How fast the device's chunk answers arrived here lately",
            self.peers
                .iter()
                .filter_map(|p| Some((peer(p), p.throughput_bytes_s?)))
                .collect(),
        );
        o.counters(
            "peer_received_bytes",
            "Bytes of chunks received from the device",
            self.peers
                .iter()
                .map(|p| (peer(p), p.received_bytes))
                .collect(),
        );
        o.counters(
            "peer_failed_requests",
            "Chunk requests to the device that failed",
            self.peers
                .iter()
                .map(|p| (peer(p), p.failed_requests))
                .collect(),
        );
        o.counters(
            "peer_bad_chunks",
            "Chunks from the device that failed verification",
            self.peers.iter().map(|p| (peer(p), p.bad_chunks)).collect(),
        );
        o.0
    }
}

/// Shared by the mount (which times requests) and the web listener.
pub type Shared = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn requests_are_timed_by_operation_and_snapshots_encode_beside_them() {
        let m = Metrics::new();
        drop(m.fuse.time(Op::Lookup));
        drop(m.fuse.time(Op::Lookup));
        drop(m.fuse.time(Op::Read));
        let snap = Snapshot {
            device: "alpha".into(),
            raft_term: 7,
            raft_last_log_index: 10,
            raft_applied_index: 8,
            chunk_reads_local: 5,
            peers: vec![PeerSnap {
                name: "bravo".into(),
                up: true,
                rtt_s: Some(0.002),
                received_bytes: 4096,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = m.encode(&snap).unwrap();
        assert_eq!(
            value(&text, "meshfs_fuse_operation_seconds_count{op=\"lookup\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "meshfs_fuse_operation_seconds_count{op=\"read\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "meshfs_fuse_operation_seconds_count{op=\"write\"}"),
            Some(0.0)
        );
        assert_eq!(value(&text, "meshfs_raft_term"), Some(7.0));
        assert_eq!(value(&text, "meshfs_raft_apply_lag_entries"), Some(2.0));
        assert_eq!(
            value(&text, "meshfs_chunk_reads_total{from=\"local\"}"),
            Some(5.0)
        );
        assert_eq!(
            value(&text, "meshfs_peer_rtt_seconds{peer=\"bravo\"}"),
            Some(0.002)
        );
        assert_eq!(
            value(&text, "meshfs_peer_received_bytes_total{peer=\"bravo\"}"),
            Some(4096.0)
        );
        // One EOF, at the end: the two registries make one exposition.
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
        // No journal age without tentative changes.
        assert!(!text.contains("journal_oldest_age_seconds"));
    }
}
