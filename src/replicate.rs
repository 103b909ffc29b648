//! Background replication of content: every committed version should have
//! `replicas` complete copies on distinct devices. Which devices hold a file
//! is a pure function of the file, its authority and the member list
//! (`placement`, rendezvous hashing), so every device decides alone, with no
//! coordination, whether it should hold a file, and fetches what it lacks.
//! A removed device leaves the member list and the placement moves, which
//! restores the count.
//!
//! The same task keeps the store under its size limit: cached copies of
//! files this device is not placed to hold go, least recently opened first,
//! and only once every device of the file's placement answers that it holds
//! them, so eviction never drops a chunk below `replicas` copies.
//!
//! Pinned subtrees (`pin.rs`) count as placed here: their files are
//! fetched first and never evicted.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::fs::Fs;
use crate::ids::{ChunkHash, DeviceId, ResourceId};
use crate::mesh::MeshClient;
use crate::pin::Pins;
use crate::raft::Replica;
use crate::storage::ChunkStore;

/// The devices that should hold `resource`: its authority first (if still
/// a member), then the members that rank highest for it.
pub fn placement(
    resource: ResourceId,
    authority: Option<DeviceId>,
    members: &[DeviceId],
    replicas: usize,
) -> Vec<DeviceId> {
    let mut out = Vec::with_capacity(replicas);
    if let Some(a) = authority.filter(|a| members.contains(a)) {
        out.push(a);
    }
    let mut ranked: Vec<([u8; 32], DeviceId)> = members
        .iter()
        .filter(|d| !out.contains(d))
        .map(|d| {
            let mut h = blake3::Hasher::new();
            h.update(&resource.0.to_be_bytes());
            h.update(&d.0);
            (*h.finalize().as_bytes(), *d)
        })
        .collect();
    ranked.sort();
    let room = replicas.saturating_sub(out.len());
    out.extend(ranked.into_iter().take(room).map(|(_, d)| d));
    out
}

/// Bytes fetched per round at most, so that replication never crowds out
/// reads for long; the next round carries on.
const ROUND_BYTES: u64 = 256 << 20;

/// Replicates (and evicts beyond `cache_limit` bytes) until the runtime
/// stops. `changed` is notified after changes from other devices are
/// applied, and when a pin is added.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    fs: Arc<Fs>,
    store: Arc<dyn ChunkStore>,
    replica: Replica,
    mesh: MeshClient,
    replicas: usize,
    cache_limit: u64,
    changed: Arc<Notify>,
    pins: Arc<Pins>,
    catch_up: CatchUpState,
) {
    let me = mesh.device();
    let mut ticks = 0u32;
    loop {
        // The size check is cheap and runs every 5 s (reads grow the cache
        // without any notification); the replication scan runs after
        // changes from elsewhere and every 30 s.
        let full_scan = tokio::select! {
            _ = changed.notified() => true,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                ticks = ticks.wrapping_add(1);
                ticks.is_multiple_of(6)
            }
        };
        if store.stats().is_ok_and(|s| s.bytes > cache_limit) {
            evict(&fs, &store, &replica, &mesh, &pins, replicas, cache_limit).await;
        }
        if !full_scan {
            continue;
        }
        // Let a burst of changes settle into one round.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(wanted) = scan(&fs, &store, &replica, &mesh, &pins, replicas, missing_here).await
        else {
            return;
        };
        *crate::lock(&catch_up) = CatchUp {
            missing_files: wanted.len() as u64,
            missing_bytes: wanted.iter().map(|(_, _, b)| b).sum(),
            fetched_bytes: 0,
        };
        if wanted.is_empty() {
            continue;
        }
        let nearest = mesh.nearest_devices().await.unwrap_or_default();
        let mut fetched = 0u64;
        let mut more = false;
        for (ino, hashes, _) in wanted {
            let holders = authority_first(nearest.clone(), replica.authority(ino), me);
            // A window of requests in flight (the chunks are stored as
            // they arrive), not one round trip per chunk.
            let mut got = 0u64;
            let r = mesh
                .fetch_stream(hashes, holders, Some(ino), |_, d| {
                    got += d.len() as u64;
                    crate::lock(&catch_up).fetched_bytes += d.len() as u64;
                    Ok(())
                })
                .await;
            fetched += got;
            if let Err(e) = r {
                tracing::debug!(resource = ino.0, error = %e, "replication fetch failed; retried later");
                more = true;
            }
            if fetched >= ROUND_BYTES {
                more = true;
                break;
            }
        }
        if fetched > 0 {
            tracing::debug!(bytes = fetched, "replicated content to this device");
            mesh.holdings_changed();
        }
        // Carry on soon only while rounds make progress; a file nobody
        // reachable holds waits for the next 30 s scan, not a busy retry.
        if more && fetched > 0 {
            changed.notify_one();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Brings the store to 90% of `limit` by dropping cached copies, least
/// recently opened file first, each only after every device placed to hold
/// the file confirmed it has every chunk of it.
async fn evict(
    fs: &Arc<Fs>,
    store: &Arc<dyn ChunkStore>,
    replica: &Replica,
    mesh: &MeshClient,
    pins: &Arc<Pins>,
    replicas: usize,
    limit: u64,
) {
    let Some(plan) = scan(fs, store, replica, mesh, pins, replicas, eviction_plan).await else {
        return;
    };
    let target = limit / 10 * 9;
    let mut used = store.stats().map_or(0, |s| s.bytes);
    for (ino, holders, hashes) in plan {
        if used <= target {
            break;
        }
        let mut confirmed = !holders.is_empty();
        for d in &holders {
            if !mesh.probe(*d, &hashes).await.iter().all(|held| *held) {
                confirmed = false;
                break;
            }
        }
        if !confirmed {
            continue;
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.evict(&hashes)).await {
            Ok(Ok(freed)) => {
                used = used.saturating_sub(freed);
                tracing::debug!(resource = ino.0, bytes = freed, "evicted a cached copy");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cache eviction failed"),
            Err(_) => return,
        }
    }
    mesh.holdings_changed();
}

/// Cached files this device may drop, least recently opened first: each
/// with the devices placed to hold it and its local chunks that no file
/// this device must keep (placed here, pinned, or open) shares.
fn eviction_plan(
    fs: &Fs,
    store: &dyn ChunkStore,
    replica: &Replica,
    at: &Placing,
) -> Vec<(ResourceId, Vec<DeviceId>, Vec<ChunkHash>)> {
    let Placing {
        members,
        me,
        replicas,
        pinned,
    } = at;
    let (last_open, open) = fs.usage();
    let files = files_with_chunks(fs);
    let mut keep = std::collections::HashSet::new();
    let mut cached = Vec::new();
    for (ino, chunks) in files {
        let hashes: Vec<ChunkHash> = chunks.into_iter().map(|(h, _)| h).collect();
        let place = placement(ino, replica.authority(ino), members, *replicas);
        if place.contains(me) || open.contains(&ino) || pinned.contains(&ino) {
            keep.extend(hashes);
        } else {
            cached.push((ino, place, hashes));
        }
    }
    let mut plan: Vec<_> = cached
        .into_iter()
        .filter_map(|(ino, place, hashes)| {
            let mut local: Vec<ChunkHash> = hashes
                .into_iter()
                .filter(|h| !keep.contains(h) && store.contains(h).unwrap_or(false))
                .collect();
            local.sort();
            local.dedup();
            (!local.is_empty()).then_some((ino, place, local))
        })
        .collect();
    // Never opened here sorts first (None < Some).
    plan.sort_by_key(|(ino, _, _)| last_open.get(ino).copied());
    plan
}

/// Whom to ask for a file's chunks: its authority (unless that is `me`),
/// then `nearest`.
pub fn authority_first(
    mut nearest: Vec<DeviceId>,
    authority: Option<DeviceId>,
    me: DeviceId,
) -> Vec<DeviceId> {
    if let Some(a) = authority.filter(|a| *a != me) {
        nearest.retain(|d| *d != a);
        nearest.insert(0, a);
    }
    nearest
}

/// What decides which files this device keeps: the members, itself, the
/// copies wanted, and the files pins cover.
struct Placing {
    members: Vec<DeviceId>,
    me: DeviceId,
    replicas: usize,
    pinned: HashSet<ResourceId>,
}

/// What a scan of every file decides: which chunks to fetch, which to evict.
type ScanFn<T> = fn(&Fs, &dyn ChunkStore, &Replica, &Placing) -> T;

/// Runs `f` over the namespace on the blocking pool, with the current
/// member list and pins; `None` once the mesh has stopped.
async fn scan<T: Default + Send + 'static>(
    fs: &Arc<Fs>,
    store: &Arc<dyn ChunkStore>,
    replica: &Replica,
    mesh: &MeshClient,
    pins: &Arc<Pins>,
    replicas: usize,
    f: ScanFn<T>,
) -> Option<T> {
    let me = mesh.device();
    let members = mesh.member_devices().await.ok()?;
    let members: Vec<DeviceId> = members.into_iter().map(|(_, d)| d).collect();
    let (fs, store, replica, pins) = (fs.clone(), store.clone(), replica.clone(), pins.clone());
    Some(
        tokio::task::spawn_blocking(move || {
            let at = Placing {
                members,
                me,
                replicas,
                pinned: fs.with_meta(|m| pins.files(m)),
            };
            f(&fs, &*store, &replica, &at)
        })
        .await
        .unwrap_or_default(),
    )
}

/// Every file with content, with the hashes of its chunks: those of its
/// current version and of the old versions kept for history, and those of
/// trashed files' kept versions (placed as any file, by their old number),
/// so that kept versions have `replicas` copies like current content.
fn files_with_chunks(fs: &Fs) -> Vec<(ResourceId, Vec<(ChunkHash, u64)>)> {
    fs.with_meta(|m| {
        let mut by: std::collections::BTreeMap<ResourceId, Vec<(ChunkHash, u64)>> =
            Default::default();
        for (i, _) in m.files() {
            if let Some(c) = i.content.as_ref() {
                by.entry(i.id)
                    .or_default()
                    .extend(c.stored_chunks().map(|r| (r.hash, u64::from(r.len))));
            }
        }
        for ((ino, _), old) in m.all_old_versions() {
            by.entry(*ino).or_default().extend(
                old.content
                    .stored_chunks()
                    .map(|r| (r.hash, u64::from(r.len))),
            );
        }
        by.into_iter()
            .filter_map(|(ino, mut hashes)| {
                hashes.sort();
                hashes.dedup();
                (!hashes.is_empty()).then_some((ino, hashes))
            })
            .collect()
    })
}

/// Files this device should hold (placed here or pinned), with the chunks
/// it lacks and their bytes; pinned files first (a person asked for them).
fn missing_here(
    fs: &Fs,
    store: &dyn ChunkStore,
    replica: &Replica,
    at: &Placing,
) -> Vec<(ResourceId, Vec<ChunkHash>, u64)> {
    let files = files_with_chunks(fs);
    let mut out: Vec<(ResourceId, Vec<ChunkHash>, u64)> = files
        .into_iter()
        .filter(|(ino, _)| {
            at.pinned.contains(ino)
                || placement(*ino, replica.authority(*ino), &at.members, at.replicas)
                    .contains(&at.me)
        })
        .filter_map(|(ino, chunks)| {
            let missing: Vec<(ChunkHash, u64)> = chunks
                .into_iter()
                .filter(|(h, _)| !store.contains(h).unwrap_or(false))
                .collect();
            let bytes = missing.iter().map(|(_, n)| n).sum();
            let hashes: Vec<ChunkHash> = missing.into_iter().map(|(h, _)| h).collect();
            (!hashes.is_empty()).then_some((ino, hashes, bytes))
        })
        .collect();
    out.sort_by_key(|(ino, _, _)| !at.pinned.contains(ino));
    out
}

/// Catch-up after a device returns (or a pin): what the last scan found
/// missing here, and what was fetched since, for `meshfs status`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CatchUp {
    pub missing_files: u64,
    pub missing_bytes: u64,
    pub fetched_bytes: u64,
}

/// Shared between the replication task and status.
pub type CatchUpState = Arc<std::sync::Mutex<CatchUp>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    #[test]
    fn placement_puts_the_authority_first_and_spreads_the_rest() {
        let members = [d(1), d(2), d(3), d(4)];
        let p = placement(ResourceId(7), Some(d(3)), &members, 2);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], d(3));
        assert_ne!(p[1], d(3));
        // Deterministic: every device computes the same set.
        assert_eq!(p, placement(ResourceId(7), Some(d(3)), &members, 2));
        // Over many files, every member gets a share of second copies.
        let mut count = std::collections::HashMap::new();
        for r in 0..400 {
            let p = placement(ResourceId(r), Some(d(1)), &members, 2);
            *count.entry(p[1]).or_insert(0) += 1;
        }
        assert_eq!(count.len(), 3, "{count:?}");
        assert!(count.values().all(|c| *c > 80), "{count:?}");
    }

    #[test]
    fn a_removed_authority_or_member_moves_the_copies() {
        let p = placement(ResourceId(1), Some(d(9)), &[d(1), d(2)], 2);
        assert_eq!(p.len(), 2);
        assert!(!p.contains(&d(9)));
        let one = placement(ResourceId(1), None, &[d(1)], 2);
        assert_eq!(one, vec![d(1)]);
    }
}
