//! Reputation and authority policy: pure functions over compact reports.
//! No I/O and no clock: time comes in as seconds, so the policy is tested
//! deterministically. The Raft leader (`raft/authority.rs`) feeds it the
//! reports every device sends and carries out what it decides.
//!
//! Reputation(resource, device) = usage × quality × uptime, where
//! - usage is a decaying sum (half-life `half_life_s`) of what the device's
//!   programs did with the resource: changes (applied there or forwarded),
//!   opens, and bytes the device served to others;
//! - quality is what readers observed of the device: chunks that failed
//!   verification and failed requests against chunks served well, and for
//!   a media file whether its measured throughput sustains the file's
//!   bitrate (`media.rs`, from the file's own headers);
//! - uptime is how long the device has been up, up to `uptime_full_s`,
//!   mapped to [0.5, 1] so that a newly started device still counts.
//!
//! A challenger takes a resource over only when its reputation beats the
//! authority's by a margin (`margin`, relative, and `min_lead`, absolute)
//! for `hold_s` on end, and not within `cooldown_s` of the last move: work
//! that moves follows within seconds, noise and alternation do not flap.

pub mod media;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, ResourceId};
use crate::meta::{Authority, Move};
use media::MediaInfo;

/// The policy's constants (Config `authority_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Usage weight of one change (create, write+close, rename, chmod...).
    pub change: f64,
    /// Usage weight of one open.
    pub open: f64,
    /// Usage weight of one MiB served to other devices.
    pub served_mib: f64,
    /// Usage halves every this many seconds.
    pub half_life_s: f64,
    /// The challenger must beat the authority's reputation by this factor...
    pub margin: f64,
    /// ...plus this much (in changes' worth of usage)...
    pub min_lead: f64,
    /// ...for this many seconds on end.
    pub hold_s: f64,
    /// A resource that moved stays put at least this long.
    pub cooldown_s: f64,
    /// Being up this long counts as full uptime.
    pub uptime_full_s: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            change: 1.0,
            open: 0.25,
            served_mib: 0.1,
            half_life_s: 2.0,
            margin: 0.5,
            min_lead: 2.0,
            hold_s: 0.5,
            cooldown_s: 10.0,
            uptime_full_s: 600.0,
        }
    }
}

/// What one device's programs did with one resource since its last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub changes: u32,
    pub opens: u32,
    pub served_bytes: u64,
}

impl Usage {
    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }

    pub fn add(&mut self, o: Usage) {
        self.changes = self.changes.saturating_add(o.changes);
        self.opens = self.opens.saturating_add(o.opens);
        self.served_bytes = self.served_bytes.saturating_add(o.served_bytes);
    }

    fn weight(&self, w: &Weights) -> f64 {
        self.changes as f64 * w.change
            + self.opens as f64 * w.open
            + self.served_bytes as f64 / (1u64 << 20) as f64 * w.served_mib
    }
}

/// What readers observed of a device's service (QualityMetrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Chunks received from it that verified.
    pub chunks_ok: u64,
    /// Chunks received from it that failed BLAKE3 verification.
    pub chunks_bad: u64,
    /// Requests to it that failed (timeout, refused, vanished).
    pub requests_failed: u64,
    /// Measured throughput from it (MiB/s), if measured.
    pub throughput_mib_s: Option<f64>,
    /// Smoothed round trip to it (ms), if known.
    pub rtt_ms: Option<f64>,
}

impl Quality {
    /// In (0, 1]: 1 for a device nobody saw fail; a damaged chunk weighs
    /// eight failed requests.
    pub fn factor(&self) -> f64 {
        let ok = self.chunks_ok as f64 + 1.0;
        ok / (ok + 8.0 * self.chunks_bad as f64 + self.requests_failed as f64)
    }

    /// Adds another observer's counts (throughput and RTT: the best seen).
    pub fn merge(&mut self, o: &Quality) {
        self.chunks_ok += o.chunks_ok;
        self.chunks_bad += o.chunks_bad;
        self.requests_failed += o.requests_failed;
        self.throughput_mib_s = max_opt(self.throughput_mib_s, o.throughput_mib_s);
        self.rtt_ms = match (self.rtt_ms, o.rtt_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// What the leader knows about a device right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceFacts {
    pub up: bool,
    /// Seconds it has been up (connected) without a break.
    pub up_for_s: f64,
    pub quality: Quality,
}

/// A device's reputation for one resource, with its components.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    pub usage: f64,
    pub quality: f64,
    pub uptime: f64,
    pub score: f64,
}

/// Combines the components; a device that is down scores 0. For a media
/// file (`media`), quality also counts how much of its bitrate the
/// device's measured throughput sustains.
pub fn reputation(
    usage: f64,
    facts: &DeviceFacts,
    w: &Weights,
    media: Option<&MediaInfo>,
) -> Reputation {
    let quality =
        facts.quality.factor() * media.map_or(1.0, |m| m.sustained(facts.quality.throughput_mib_s));
    let uptime = if w.uptime_full_s > 0.0 {
        (facts.up_for_s / w.uptime_full_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let score = if facts.up {
        usage * quality * (0.5 + 0.5 * uptime)
    } else {
        0.0
    };
    Reputation {
        usage,
        quality,
        uptime,
        score,
    }
}

/// ProximityWeight in (0, 1] between two devices, from the round trip and
/// the measured throughput: the expected time to move a 64 KiB chunk,
/// against 1 ms for a perfect LAN. An unknown round trip counts as a
/// second (the lightest weight).
pub fn proximity(rtt_ms: Option<f64>, throughput_mib_s: Option<f64>) -> f64 {
    let rtt = rtt_ms.unwrap_or(1000.0);
    let transfer_ms = throughput_mib_s
        .filter(|t| *t > 0.0)
        .map_or(0.0, |t| 1000.0 / 16.0 / t);
    1.0 / (1.0 + (rtt + transfer_ms) / 1.0)
}

/// A usage value that halves every `half_life_s`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Decaying {
    value: f64,
    at: f64,
}

impl Decaying {
    fn at(&self, now: f64, half_life: f64) -> f64 {
        let dt = (now - self.at).max(0.0);
        self.value * 0.5f64.powf(dt / half_life.max(1e-3))
    }

    fn add(&mut self, now: f64, v: f64, half_life: f64) {
        self.value = self.at(now, half_life) + v;
        self.at = now;
    }
}

#[derive(Debug, Default)]
struct Tracked {
    per_device: BTreeMap<DeviceId, Decaying>,
    /// The challenger leading now, and since when.
    leading: Option<(DeviceId, f64)>,
    last_move: Option<f64>,
}

/// The leader's view of usage per resource, and the hysteresis state.
#[derive(Debug, Default)]
pub struct Tracker {
    resources: HashMap<ResourceId, Tracked>,
}

/// Usage below this is forgotten (about one open long ago).
const FORGET_BELOW: f64 = 0.01;

impl Tracker {
    /// Adds one device's report.
    pub fn observe(
        &mut self,
        now: f64,
        device: DeviceId,
        report: &[(ResourceId, Usage)],
        w: &Weights,
    ) {
        for (ino, u) in report {
            let v = u.weight(w);
            if v <= 0.0 {
                continue;
            }
            self.resources
                .entry(*ino)
                .or_default()
                .per_device
                .entry(device)
                .or_default()
                .add(now, v, w.half_life_s);
        }
    }

    /// Every device's reputation for `ino` now, best first.
    pub fn reputations(
        &self,
        ino: ResourceId,
        now: f64,
        facts: &BTreeMap<DeviceId, DeviceFacts>,
        w: &Weights,
        media: Option<&MediaInfo>,
    ) -> Vec<(DeviceId, Reputation)> {
        let Some(t) = self.resources.get(&ino) else {
            return Vec::new();
        };
        let mut out: Vec<(DeviceId, Reputation)> = t
            .per_device
            .iter()
            .map(|(d, u)| {
                let f = facts.get(d).copied().unwrap_or_default();
                (*d, reputation(u.at(now, w.half_life_s), &f, w, media))
            })
            .collect();
        out.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then(a.0.cmp(&b.0)));
        out
    }

    /// The usage score of `device` for `ino` now (0 if none).
    fn usage(&self, ino: ResourceId, device: DeviceId, now: f64, w: &Weights) -> f64 {
        self.resources
            .get(&ino)
            .and_then(|t| t.per_device.get(&device))
            .map_or(0.0, |u| u.at(now, w.half_life_s))
    }

    /// Which resources should move now. `authority` says who governs a
    /// resource (None: it is gone); `media` its media facts, asked only for
    /// a resource whose challenger leads. Resources whose authority is down
    /// are left to `takeover`.
    pub fn decide(
        &mut self,
        now: f64,
        authority: impl Fn(ResourceId) -> Option<Authority>,
        facts: &BTreeMap<DeviceId, DeviceFacts>,
        w: &Weights,
        media: impl Fn(ResourceId) -> Option<MediaInfo>,
    ) -> Vec<(Move, DeviceId)> {
        let mut out = Vec::new();
        let mut gone = Vec::new();
        let inos: Vec<ResourceId> = self.resources.keys().copied().collect();
        for ino in inos {
            let Some(auth) = authority(ino) else {
                gone.push(ino);
                continue;
            };
            let mut ranked = self.reputations(ino, now, facts, w, None);
            if ranked.iter().all(|(_, r)| r.usage < FORGET_BELOW) {
                gone.push(ino);
                continue;
            }
            let auth_facts = facts.get(&auth.device).copied().unwrap_or_default();
            let auth_usage = self.usage(ino, auth.device, now, w);
            // Ties keep the authority: only a strict leader challenges.
            let lead = |ranked: &[(DeviceId, Reputation)], auth_score: f64| {
                ranked
                    .iter()
                    .find(|(d, r)| *d != auth.device && r.score > 0.0)
                    .copied()
                    .filter(|(_, r)| r.score > auth_score * (1.0 + w.margin) + w.min_lead)
            };
            let mut leads = lead(&ranked, reputation(auth_usage, &auth_facts, w, None).score);
            if leads.is_some() && auth_facts.up {
                // A media file: whether each can sustain its bitrate counts.
                if let Some(m) = media(ino) {
                    ranked = self.reputations(ino, now, facts, w, Some(&m));
                    let auth_score = reputation(auth_usage, &auth_facts, w, Some(&m)).score;
                    leads = lead(&ranked, auth_score);
                }
            }
            let Some(t) = self.resources.get_mut(&ino) else {
                continue;
            };
            if !auth_facts.up {
                t.leading = None;
                continue;
            }
            let Some((c, _)) = leads else {
                t.leading = None;
                continue;
            };
            let since = match t.leading {
                Some((d, s)) if d == c => s,
                _ => {
                    t.leading = Some((c, now));
                    now
                }
            };
            let cooled = t.last_move.is_none_or(|m| now - m >= w.cooldown_s);
            if now - since >= w.hold_s && cooled {
                t.leading = None;
                t.last_move = Some(now);
                out.push((
                    Move {
                        ino,
                        device: c,
                        epoch: auth.epoch + 1,
                    },
                    auth.device,
                ));
            }
        }
        for ino in gone {
            if self
                .resources
                .get(&ino)
                .is_none_or(|t| t.last_move.is_none_or(|m| now - m >= w.cooldown_s))
            {
                self.resources.remove(&ino);
            }
        }
        out
    }

    /// Records a move carried out (by takeover or handoff) for the cooldown.
    pub fn moved(&mut self, ino: ResourceId, now: f64) {
        let t = self.resources.entry(ino).or_default();
        t.last_move = Some(now);
        t.leading = None;
    }

    /// How many resources have usage on record.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

/// A resource whose authority has been down longer than the takeover
/// delay, as the leader sees it.
#[derive(Debug, Clone)]
pub struct Orphaned {
    pub ino: ResourceId,
    pub authority: Authority,
    /// Devices that may take it: for a file with content, those holding a
    /// complete, verified copy; for anything else, every device.
    pub candidates: Vec<DeviceId>,
}

/// Where resources of a device that is gone move: to the live candidate
/// with the best reputation for each, then the longest up, then the
/// lowest id (a stable choice). One with no live candidate stays.
pub fn takeover(
    orphans: &[Orphaned],
    tracker: &Tracker,
    now: f64,
    facts: &BTreeMap<DeviceId, DeviceFacts>,
    w: &Weights,
) -> Vec<Move> {
    let mut out = Vec::new();
    for o in orphans {
        let best = o
            .candidates
            .iter()
            .filter(|d| **d != o.authority.device)
            .filter_map(|d| facts.get(d).filter(|f| f.up).map(|f| (*d, f)))
            .map(|(d, f)| {
                let r = reputation(tracker.usage(o.ino, d, now, w), f, w, None);
                (d, r.score, f.up_for_s)
            })
            .max_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then(a.2.total_cmp(&b.2))
                    .then(b.0.cmp(&a.0))
            });
        if let Some((d, _, _)) = best {
            out.push(Move {
                ino: o.ino,
                device: d,
                epoch: o.authority.epoch + 1,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
