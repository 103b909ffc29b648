//! Carries out the authority policy (`crate::authority`, pure) over the
//! mesh. Every device counts what its programs do with each resource
//! (changes, opens) and reports it to the Raft leader every
//! `report_every`, with what it observed of the other devices' service.
//! The leader keeps the reputations, and for each move the policy decides
//! asks the current authority to hand the resource over: the authority
//! seals it (no local change applies to it any more), ships its outbox,
//! and commits `SetAuthority` itself, so every change it made comes before
//! the move in the log and none is lost or applied twice. A device down
//! longer than `takeover` loses what it governs to live devices (holders
//! of a complete copy, for files with content) through a `SetAuthority`
//! the leader commits directly; changes it made meanwhile are refused
//! when they arrive (reported as conflicts there).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::network::{call, Reply, Rpc};
use super::{lock, read_meta, Op, RaftError, Replica};
use crate::authority::media::{self, MediaInfo};
use crate::authority::{DeviceFacts, Orphaned, Quality, Tracker, Usage, Weights};
use crate::ids::{DeviceId, ResourceId};
use crate::meta::{FsCommand, Move};
use crate::storage::ChunkStore;

/// Most resources in one report: the busiest go first.
pub const MAX_REPORT: usize = 4096;
/// Most moves in one `SetAuthority` entry.
const MAX_MOVES: usize = 4096;

/// Policy settings from Config.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub weights: Weights,
    /// A device down this long loses what it governs.
    pub takeover: Duration,
    /// How often devices report usage and the leader decides.
    pub report_every: Duration,
}

/// The policy's state on one device.
pub struct Policy {
    pub settings: PolicySettings,
    /// This device's usage since its last report.
    usage: Mutex<HashMap<ResourceId, Usage>>,
    /// The leader's: reputations and hysteresis.
    tracker: Mutex<Tracker>,
    /// The leader's: each observer's latest view of the others' service.
    seen: Mutex<HashMap<DeviceId, Vec<(DeviceId, Quality)>>>,
    /// The leader's: since when each device is up, or down.
    up_since: Mutex<HashMap<DeviceId, Instant>>,
    down_since: Mutex<HashMap<DeviceId, Instant>>,
    /// When the resources of a down device were last scanned for takeover.
    scanned: Mutex<HashMap<DeviceId, Instant>>,
    origin: Instant,
    /// Moves carried out by this device (handoffs it made, takeovers it
    /// committed as leader).
    pub moves: std::sync::atomic::AtomicU64,
    /// Decaying count of opens here per resource (temperature).
    heat: Mutex<HashMap<ResourceId, (f64, f64)>>,
    /// Media facts per file version, read from its headers once.
    media: Mutex<HashMap<ResourceId, (crate::ids::VersionId, Option<MediaInfo>)>>,
}

impl Policy {
    pub fn new(settings: PolicySettings) -> Self {
        Policy {
            settings,
            usage: Default::default(),
            tracker: Default::default(),
            seen: Default::default(),
            up_since: Default::default(),
            down_since: Default::default(),
            scanned: Default::default(),
            origin: Instant::now(),
            moves: Default::default(),
            heat: Default::default(),
            media: Default::default(),
        }
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Counts a change or open by this device's programs.
    pub fn record(&self, resources: &[ResourceId], u: Usage) {
        if u.opens > 0 {
            for r in resources {
                self.touch_heat(*r);
            }
        }
        let mut m = lock(&self.usage);
        for r in resources {
            m.entry(*r).or_default().add(u);
        }
    }

    fn take_report(&self) -> Vec<(ResourceId, Usage)> {
        let mut all: Vec<(ResourceId, Usage)> = lock(&self.usage).drain().collect();
        if all.len() > MAX_REPORT {
            all.sort_by_key(|(_, u)| std::cmp::Reverse(u.changes as u64 * 4 + u.opens as u64));
            all.truncate(MAX_REPORT);
        }
        all
    }

    /// Takes one device's report (on the leader).
    pub fn ingest(
        &self,
        from: DeviceId,
        usage: &[(ResourceId, Usage)],
        seen: Vec<(DeviceId, Quality)>,
    ) {
        let now = self.now();
        lock(&self.tracker).observe(now, from, usage, &self.settings.weights);
        lock(&self.seen).insert(from, seen);
    }

    /// Reputation of each device for `ino`, as this device (the leader)
    /// sees it now, best first.
    pub fn reputations(
        &self,
        ino: ResourceId,
        facts: &BTreeMap<DeviceId, DeviceFacts>,
        media: Option<&MediaInfo>,
    ) -> Vec<(DeviceId, crate::authority::Reputation)> {
        lock(&self.tracker).reputations(ino, self.now(), facts, &self.settings.weights, media)
    }

    /// What each observer reported of each device, merged.
    fn quality(&self) -> BTreeMap<DeviceId, Quality> {
        let mut out: BTreeMap<DeviceId, Quality> = BTreeMap::new();
        for seen in lock(&self.seen).values() {
            for (d, q) in seen {
                out.entry(*d).or_default().merge(q);
            }
        }
        out
    }
}

impl Replica {
    /// What this device knows of every member now: up (connected, or
    /// itself), for how long, and the service others reported.
    pub async fn device_facts(&self) -> BTreeMap<DeviceId, DeviceFacts> {
        match self.mesh.status().await {
            Ok(status) => self.facts_from(&status),
            Err(_) => BTreeMap::new(),
        }
    }

    /// `device_facts` from a mesh status already at hand.
    fn facts_from(&self, status: &crate::mesh::MeshStatus) -> BTreeMap<DeviceId, DeviceFacts> {
        let p = &self.policy;
        let quality = p.quality();
        let now = Instant::now();
        let mut out = BTreeMap::new();
        let mut up_since = lock(&p.up_since);
        let mut down_since = lock(&p.down_since);
        for d in &status.devices {
            let up = d.up || d.id == self.device;
            if up {
                down_since.remove(&d.id);
                up_since
                    .entry(d.id)
                    .or_insert(if d.id == self.device { p.origin } else { now });
            } else {
                up_since.remove(&d.id);
                down_since.entry(d.id).or_insert(now);
            }
            let up_for_s = up_since
                .get(&d.id)
                .map_or(0.0, |t| now.duration_since(*t).as_secs_f64());
            let mut q = quality.get(&d.id).copied().unwrap_or_default();
            q.rtt_ms = q.rtt_ms.or(d.rtt_ms);
            q.throughput_mib_s = q.throughput_mib_s.or(d.throughput_mib_s);
            out.insert(
                d.id,
                DeviceFacts {
                    up,
                    up_for_s,
                    quality: q,
                },
            );
        }
        out
    }

    /// What this device observed of the others' service, for its report.
    async fn observed(&self) -> Vec<(DeviceId, Quality)> {
        let Ok(status) = self.mesh.status().await else {
            return Vec::new();
        };
        status
            .devices
            .iter()
            .filter(|d| d.id != self.device)
            .map(|d| {
                (
                    d.id,
                    Quality {
                        chunks_ok: 0,
                        chunks_bad: d.bad_chunks,
                        requests_failed: d.failed_requests,
                        throughput_mib_s: d.throughput_mib_s,
                        rtt_ms: d.rtt_ms,
                    },
                )
            })
            .collect()
    }

    /// The old authority's side of a move: seal, ship, commit the move.
    pub(super) async fn hand_off(&self, moves: Vec<Move>) -> Result<usize, RaftError> {
        let mine = self.shared.seal(moves);
        if mine.is_empty() {
            return Ok(0);
        }
        let deadline = Instant::now() + self.settings.write_timeout;
        let r = async {
            self.catch_up_with(self.device, deadline).await?;
            self.propose(Op::Fs(FsCommand::SetAuthority {
                moves: mine.clone(),
            }))
            .await
        }
        .await;
        self.shared.unseal(&mine);
        match r? {
            Ok(_) => {
                self.policy
                    .moves
                    .fetch_add(mine.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(moves = mine.len(), "handed authority over");
                Ok(mine.len())
            }
            Err(e) => Err(RaftError::Raft(e.to_string())),
        }
    }

    /// Resources governed by devices down longer than the takeover delay,
    /// with who may take each.
    async fn orphans(&self, facts: &BTreeMap<DeviceId, DeviceFacts>) -> Vec<Orphaned> {
        let p = &self.policy;
        let now = Instant::now();
        let gone: Vec<DeviceId> = {
            let down = lock(&p.down_since);
            let mut scanned = lock(&p.scanned);
            down.iter()
                .filter(|(_, since)| now.duration_since(**since) >= p.settings.takeover)
                .map(|(d, _)| *d)
                .filter(|d| {
                    // Resources nobody can take are looked at again now and
                    // then, not at every round.
                    let due = scanned
                        .get(d)
                        .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(2));
                    if due {
                        scanned.insert(*d, now);
                    }
                    due
                })
                .collect()
        };
        let everyone: Vec<DeviceId> = facts.keys().copied().collect();
        let mut out = Vec::new();
        for d in gone {
            let governed = read_meta(&self.shared.meta).governed_by(d);
            if governed.is_empty() {
                continue;
            }
            let files: Vec<ResourceId> = governed
                .iter()
                .filter(|(_, _, content)| *content)
                .map(|(i, _, _)| *i)
                .collect();
            let holders = if files.is_empty() {
                Vec::new()
            } else {
                self.mesh.holders(files.clone()).await.unwrap_or_default()
            };
            let holders: HashMap<ResourceId, Vec<DeviceId>> =
                files.into_iter().zip(holders).collect();
            for (ino, authority, content) in governed {
                let candidates = if content {
                    let mut c = holders.get(&ino).cloned().unwrap_or_default();
                    if self.holds_all(ino) {
                        c.push(self.device);
                    }
                    c
                } else {
                    everyone.clone()
                };
                out.push(Orphaned {
                    ino,
                    authority,
                    candidates,
                });
            }
        }
        out
    }

    /// The media facts of `ino`'s current version, from its first and last
    /// `media::WINDOW` bytes when those are stored here (once per version).
    fn media_of(&self, meta: &crate::meta::MetaState, ino: ResourceId) -> Option<MediaInfo> {
        let content = meta.get(ino)?.content.clone()?;
        if let Some((v, m)) = lock(&self.policy.media).get(&ino) {
            if *v == content.version {
                return *m;
            }
        }
        let read = |from: u64, to: u64| -> Option<Vec<u8>> {
            let mut out = Vec::with_capacity((to - from) as usize);
            for c in content.chunks.iter() {
                let (start, end) = (c.offset, c.offset + c.len as u64);
                if end <= from || start >= to {
                    continue;
                }
                let bytes = if c.hash.is_zero_run() {
                    vec![0u8; c.len as usize]
                } else {
                    self.shared.store.get(&c.hash).ok()??
                };
                let lo = from.max(start) - start;
                let hi = to.min(end) - start;
                out.extend_from_slice(bytes.get(lo as usize..hi as usize)?);
            }
            Some(out)
        };
        let size = content.size;
        let head_end = size.min(media::WINDOW);
        let found = read(0, head_end).and_then(|head| {
            let tail = read(size.saturating_sub(media::WINDOW), size)?;
            media::media_info(&head, &tail, size)
        });
        let mut cache = lock(&self.policy.media);
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(ino, (content.version, found));
        found
    }

    /// Whether every chunk of `ino`'s current version is stored here.
    fn holds_all(&self, ino: ResourceId) -> bool {
        let chunks = {
            let meta = read_meta(&self.shared.meta);
            match meta.get(ino).and_then(|i| i.content.clone()) {
                Some(c) => c.chunks,
                None => return true,
            }
        };
        chunks
            .iter()
            .all(|c| c.hash.is_zero_run() || self.shared.store.contains(&c.hash).unwrap_or(false))
    }

    /// One round of the leader's work.
    async fn decide(&self) {
        let facts = self.device_facts().await;
        let now = self.policy.now();
        let w = self.policy.settings.weights;
        let decisions = {
            let meta = read_meta(&self.shared.meta);
            lock(&self.policy.tracker).decide(
                now,
                |ino| meta.authority(ino),
                &facts,
                &w,
                |ino| self.media_of(&meta, ino),
            )
        };
        let mut by_authority: BTreeMap<DeviceId, Vec<Move>> = BTreeMap::new();
        for (m, from) in decisions {
            tracing::info!(ino = %m.ino, %from, to = %m.device, epoch = m.epoch, "authority follows the work");
            by_authority.entry(from).or_default().push(m);
        }
        for (from, moves) in by_authority {
            let r = self.clone();
            tokio::spawn(async move {
                let res = if from == r.device {
                    r.hand_off(moves).await.map(|_| ())
                } else {
                    let timeout = r.settings.write_timeout;
                    match call(&r.mesh, from, &Rpc::Handoff { moves }, timeout).await {
                        Ok(Reply::Done) => Ok(()),
                        Ok(other) => Err(RaftError::Raft(format!("{other:?}"))),
                        Err(e) => Err(RaftError::Raft(e.to_string())),
                    }
                };
                if let Err(e) = res {
                    tracing::debug!(error = %e, "an authority handoff did not happen");
                }
            });
        }
        let orphans = self.orphans(&facts).await;
        if orphans.is_empty() {
            return;
        }
        let moves = {
            let t = lock(&self.policy.tracker);
            crate::authority::takeover(&orphans, &t, now, &facts, &w)
        };
        for chunk in moves.chunks(MAX_MOVES) {
            let n = chunk.len();
            match self
                .propose(Op::Fs(FsCommand::SetAuthority {
                    moves: chunk.to_vec(),
                }))
                .await
            {
                Ok(Ok(_)) => {
                    let mut t = lock(&self.policy.tracker);
                    for m in chunk {
                        t.moved(m.ino, now);
                    }
                    self.policy
                        .moves
                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(moves = n, "took over what a device that is down governed");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "a takeover was refused"),
                Err(e) => tracing::debug!(error = %e, "a takeover could not commit"),
            }
        }
    }
}

/// Every device: reports its usage to the leader; the leader also decides.
pub(super) async fn run(replica: Replica) {
    let every = replica.policy.settings.report_every;
    loop {
        tokio::time::sleep(every).await;
        if !replica.shared.has_state() {
            continue;
        }
        let report = replica.policy.take_report();
        let leader = replica.leader_device();
        match leader {
            Some(l) if l == replica.device => {
                let seen = replica.observed().await;
                replica.policy.ingest(replica.device, &report, seen);
                replica.decide().await;
            }
            Some(l) => {
                // A new leader starts its own view; this one's is stale.
                *lock(&replica.policy.tracker) = Tracker::default();
                let seen = replica.observed().await;
                if report.is_empty() && seen.is_empty() {
                    continue;
                }
                let rpc = Rpc::Report {
                    usage: report,
                    seen,
                };
                if let Err(e) = call(&replica.mesh, l, &rpc, every).await {
                    tracing::debug!(error = %e, "usage report not delivered");
                }
            }
            None => {}
        }
    }
}

/// Half-life of a resource's temperature here (as the prefetcher's).
const HEAT_HALF_LIFE_S: f64 = 6.0 * 3600.0;

/// What `meshfs stat` and the `user.meshfs.*` xattrs show of a resource.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResourceStat {
    pub resource: u64,
    pub kind: String,
    pub size: u64,
    pub authority: DeviceRef,
    pub epoch: u64,
    /// The current version's number (versions committed so far).
    pub version: u64,
    pub versions: u64,
    /// Devices holding a complete copy (this one included).
    pub holders: Vec<String>,
    /// Per device with usage on record, best first (from the leader).
    pub reputation: Vec<DeviceReputation>,
    /// What was observed of each device's service.
    pub quality: Vec<DeviceQuality>,
    /// ProximityWeight from this device to each holder.
    pub proximity: Vec<DeviceProximity>,
    /// Decaying count of opens here (half-life 6 h).
    pub temperature: f64,
    /// For an image or MP4-family file stored here: resolution, duration
    /// and bitrate from its headers.
    pub media: Option<MediaInfo>,
    /// Changes made here and not yet committed through Raft.
    pub pending_changes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRef {
    pub name: String,
    pub id: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReputation {
    pub device: String,
    #[serde(flatten)]
    pub reputation: crate::authority::Reputation,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceQuality {
    pub device: String,
    pub up: bool,
    pub factor: f64,
    #[serde(flatten)]
    pub quality: Quality,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceProximity {
    pub device: String,
    pub weight: f64,
    pub rtt_ms: Option<f64>,
    pub throughput_mib_s: Option<f64>,
}

impl Policy {
    fn touch_heat(&self, ino: ResourceId) {
        let now = self.now();
        let mut h = lock(&self.heat);
        let v = h.get(&ino).map_or(0.0, |(v, t)| decay(*v, now - t));
        h.insert(ino, (v + 1.0, now));
        if h.len() > 200_000 {
            h.retain(|_, (v, t)| decay(*v, now - *t) > 0.05);
        }
    }

    fn heat(&self, ino: ResourceId) -> f64 {
        let now = self.now();
        lock(&self.heat)
            .get(&ino)
            .map_or(0.0, |(v, t)| decay(*v, now - t))
    }
}

fn decay(v: f64, dt: f64) -> f64 {
    v * 0.5f64.powf(dt.max(0.0) / HEAT_HALF_LIFE_S)
}

impl Replica {
    pub(super) fn media(&self, ino: ResourceId) -> Option<MediaInfo> {
        let meta = read_meta(&self.shared.meta);
        self.media_of(&meta, ino)
    }

    /// Every device's reputation for `ino`: from the leader's view (asked
    /// over the mesh when this device does not lead).
    pub(super) async fn reputations(
        &self,
        ino: ResourceId,
    ) -> Vec<(DeviceId, crate::authority::Reputation)> {
        match self.leader_device() {
            Some(l) if l == self.device => {
                let facts = self.device_facts().await;
                let media = self.media(ino);
                self.policy.reputations(ino, &facts, media.as_ref())
            }
            Some(l) => match call(
                &self.mesh,
                l,
                &Rpc::Reputation { ino },
                self.settings.read_wait,
            )
            .await
            {
                Ok(Reply::Reputation(r)) => r,
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }

    /// What `meshfs stat` shows of `ino`, or None if it does not exist.
    pub async fn stat(&self, ino: ResourceId) -> Option<ResourceStat> {
        let inode = read_meta(&self.shared.meta).get(ino).cloned()?;
        let status = self.mesh.status().await.ok();
        let facts = status
            .as_ref()
            .map(|s| self.facts_from(s))
            .unwrap_or_default();
        let names: HashMap<DeviceId, String> = status
            .into_iter()
            .flat_map(|s| s.devices)
            .map(|d| (d.id, d.name))
            .collect();
        let name = |d: &DeviceId| {
            names
                .get(d)
                .cloned()
                .unwrap_or_else(|| d.to_hex()[..8].to_string())
        };
        let mut holders: Vec<DeviceId> = if inode.content.is_some() {
            self.mesh
                .holders(vec![ino])
                .await
                .ok()
                .and_then(|mut v| v.pop())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if inode.content.is_some() && self.holds_all(ino) {
            holders.insert(0, self.device);
        }
        let reputation = self
            .reputations(ino)
            .await
            .into_iter()
            .map(|(d, r)| DeviceReputation {
                device: name(&d),
                reputation: r,
            })
            .collect();
        let quality = facts
            .iter()
            .map(|(d, f)| DeviceQuality {
                device: name(d),
                up: f.up,
                factor: f.quality.factor(),
                quality: f.quality,
            })
            .collect();
        let proximity = holders
            .iter()
            .map(|d| {
                let (rtt, tp) = if *d == self.device {
                    (Some(0.0), None)
                } else {
                    facts.get(d).map_or((None, None), |f| {
                        (f.quality.rtt_ms, f.quality.throughput_mib_s)
                    })
                };
                DeviceProximity {
                    device: name(d),
                    weight: crate::authority::proximity(rtt, tp),
                    rtt_ms: rtt,
                    throughput_mib_s: tp,
                }
            })
            .collect();
        let version = inode.version().0;
        let pending = lock(&self.shared.outbox)
            .entries
            .iter()
            .filter(|p| p.change.cmd.decided_by().contains(&ino))
            .count();
        Some(ResourceStat {
            resource: ino.0,
            kind: format!("{:?}", inode.kind).to_lowercase(),
            size: inode.size(),
            authority: DeviceRef {
                name: name(&inode.authority.device),
                id: inode.authority.device.to_hex(),
            },
            epoch: inode.authority.epoch,
            version,
            versions: version,
            holders: holders.iter().map(name).collect(),
            reputation,
            quality,
            proximity,
            temperature: self.policy.heat(ino),
            media: self.media(ino),
            pending_changes: pending,
        })
    }
}
