//! The dashboard's data (`/api/state`, polled by `dashboard.html` every
//! 2 s): the devices with RTT and throughput, who governs and is placed to
//! hold what by top-level directory, authority moves, conflicts and the
//! prefetch hit rate over time. The history is sampled every 5 s by one
//! task into a bounded ring; the directory table, a walk of the whole
//! namespace, is computed at most every 5 s whoever asks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ids::{DeviceId, ResourceId};
use crate::meta::{Kind, MetaState};
use crate::node::Node;

/// The page, shipped in the binary.
pub const PAGE: &str = include_str!("dashboard.html");

/// History samples kept: 30 minutes at one per 5 s.
const HISTORY: usize = 360;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The directory table is reused for this long.
const DIRS_FRESH: Duration = Duration::from_secs(5);

/// Cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub t: i64,
    pub moves: u64,
    pub conflicts: u64,
    pub hits: u64,
    pub misses: u64,
    pub wasted: u64,
    pub prefetched: u64,
}

/// One top-level directory (or file) of the mesh.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DirRow {
    pub path: String,
    pub files: u64,
    pub bytes: u64,
    /// Device name -> files it governs here.
    pub governed: BTreeMap<String, u64>,
    /// Device name -> bytes placed on it (replication's placement).
    pub placed: BTreeMap<String, u64>,
}

/// The dashboard's state between requests.
#[derive(Default)]
pub struct Dashboard {
    history: Mutex<VecDeque<Sample>>,
    dirs: Mutex<Option<(Instant, Vec<DirRow>)>>,
}

impl Dashboard {
    pub fn record(&self, s: Sample) {
        let mut h = crate::lock(&self.history);
        if h.len() >= HISTORY {
            h.pop_front();
        }
        h.push_back(s);
    }

    fn history(&self) -> Vec<Sample> {
        crate::lock(&self.history).iter().copied().collect()
    }

    fn dirs(
        &self,
        node: &Node,
        members: &[DeviceId],
        names: &dyn Fn(DeviceId) -> String,
    ) -> Vec<DirRow> {
        let mut cached = crate::lock(&self.dirs);
        if let Some((at, rows)) = cached.as_ref() {
            if at.elapsed() < DIRS_FRESH {
                return rows.clone();
            }
        }
        let rows = node
            .fs
            .with_meta(|m| dir_rows(m, members, node.cfg.replicas, names));
        *cached = Some((Instant::now(), rows.clone()));
        rows
    }
}

/// The counters the history follows, now.
pub fn sample(node: &Node) -> Sample {
    sample_of(node, &node.replica.status())
}

/// [`sample`] with Raft's status already read.
fn sample_of(node: &Node, raft: &crate::raft::RaftStatus) -> Sample {
    let ch = &raft.changes;
    let ledger = node
        .prefetch
        .as_ref()
        .map(|p| p.ledger.totals())
        .unwrap_or_default();
    Sample {
        t: crate::meta::Timestamp::now().secs,
        moves: ch.authority_moves,
        conflicts: ch.tentative.conflicts as u64,
        hits: ledger.hits,
        misses: ledger.misses,
        wasted: ledger.wasted_bytes,
        prefetched: ledger.prefetched_bytes,
    }
}

/// Per top-level entry: files, bytes, who governs them, where replication
/// places their content. Pure over the namespace.
pub fn dir_rows(
    m: &MetaState,
    members: &[DeviceId],
    replicas: usize,
    names: &dyn Fn(DeviceId) -> String,
) -> Vec<DirRow> {
    let Ok(top) = m.entries_after(ResourceId::ROOT, 0) else {
        return Vec::new();
    };
    let top: Vec<(String, ResourceId, Kind)> = top
        .map(|(_, name, e)| (String::from_utf8_lossy(name).into_owned(), e.ino, e.kind))
        .filter(|(name, _, _)| name != ".meshfs")
        .collect();
    let mut rows = Vec::new();
    for (name, ino, kind) in top {
        if !matches!(kind, Kind::Dir | Kind::File) {
            continue;
        }
        let mut row = DirRow {
            path: format!("/{name}{}", if kind == Kind::Dir { "/" } else { "" }),
            ..DirRow::default()
        };
        for f in m.subtree_files(ino) {
            let Some(i) = m.get(f) else { continue };
            let size = i.size();
            row.files += 1;
            row.bytes += size;
            *row.governed.entry(names(i.authority.device)).or_default() += 1;
            let place = crate::replicate::placement(f, Some(i.authority.device), members, replicas);
            for d in place {
                *row.placed.entry(names(d)).or_default() += size;
            }
        }
        rows.push(row);
    }
    rows
}

/// What `/api/state` answers.
pub async fn state(node: &Node, dash: &Dashboard) -> serde_json::Value {
    let mesh = tokio::time::timeout(Duration::from_secs(2), node.mesh.status())
        .await
        .ok()
        .and_then(Result::ok);
    let me = node.cfg.device_id();
    let devices: Vec<serde_json::Value> = match &mesh {
        Some(m) => m
            .devices
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "me": d.id == me,
                    "up": d.up,
                    "rtt_ms": if d.id == me { None } else { d.rtt_ms },
                    "throughput_mib_s": d.throughput_mib_s,
                    "received_bytes": d.received_bytes,
                    "held_bytes": d.held_bytes,
                })
            })
            .collect(),
        None => vec![serde_json::json!({
            "name": node.cfg.name, "me": true, "up": true, "rtt_ms": null,
            "throughput_mib_s": null, "received_bytes": 0, "held_bytes": 0,
        })],
    };
    let by_id: BTreeMap<DeviceId, String> = mesh
        .as_ref()
        .map(|m| m.devices.iter().map(|d| (d.id, d.name.clone())).collect())
        .unwrap_or_default();
    let members: Vec<DeviceId> = match &mesh {
        Some(m) => m.devices.iter().map(|d| d.id).collect(),
        None => vec![me],
    };
    let names = move |d: DeviceId| {
        by_id
            .get(&d)
            .cloned()
            .unwrap_or_else(|| d.to_hex()[..8].to_string())
    };
    let dirs = dash.dirs(node, &members, &names);
    let raft = node.replica.status();
    let now = sample_of(node, &raft);
    let conflicts: Vec<serde_json::Value> = node
        .replica
        .conflicts()
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "kind": c.kind.label(), "path": c.path, "kept_as": c.kept_as, "found": c.found.secs,
            })
        })
        .collect();
    serde_json::json!({
        "device": node.cfg.name,
        "time": now.t,
        "devices": devices,
        "dirs": dirs,
        "history": dash.history(),
        "authority_moves": now.moves,
        "conflicts": conflicts,
        "prefetch": {
            "hits": now.hits,
            "misses": now.misses,
            "wasted_bytes": now.wasted,
            "prefetched_bytes": now.prefetched,
        },
        "raft": { "leader": raft.leader, "term": raft.term },
    })
}
