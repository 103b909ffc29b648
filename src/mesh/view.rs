//! Availability: what each device holds and how loaded it is. Pure data and
//! decisions; the swarm actor feeds it announcements and asks it what to
//! announce. This device's side (`Outbox`) turns snapshots of its holdings
//! into bounded deltas; the other side (`View`) applies them and notices
//! gaps, which it repairs with a paged snapshot.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::protocol::{
    Announcement, AvailRequest, AvailResponse, Holding, Load, MAX_AVAIL_PAGE, MAX_DELTA,
};
use crate::ids::{DeviceId, ResourceId, VersionId};

/// This device's announced state.
#[derive(Debug, Default)]
pub struct Outbox {
    announced: BTreeMap<ResourceId, Holding>,
    seq: u64,
}

impl Outbox {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Resources announced.
    pub fn held(&self) -> usize {
        self.announced.len()
    }

    /// Bytes of the resources announced.
    pub fn held_bytes(&self) -> u64 {
        self.announced.values().map(|h| h.size).sum()
    }

    /// The next announcement towards `current`: at most `MAX_DELTA` changes
    /// (the rest follow in later ones). `None` when nothing changed and
    /// `force` (the periodic load report) is off.
    pub fn next(
        &mut self,
        device: DeviceId,
        current: &BTreeMap<ResourceId, Holding>,
        load: Load,
        force: bool,
    ) -> Option<Announcement> {
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for (id, h) in current {
            if added.len() + removed.len() >= MAX_DELTA {
                break;
            }
            if self.announced.get(id) != Some(h) {
                added.push(h.clone());
            }
        }
        for id in self.announced.keys() {
            if added.len() + removed.len() >= MAX_DELTA {
                break;
            }
            if !current.contains_key(id) {
                removed.push(*id);
            }
        }
        if added.is_empty() && removed.is_empty() && !force {
            return None;
        }
        let base = self.seq;
        self.seq += 1;
        for h in &added {
            self.announced.insert(h.resource, h.clone());
        }
        for id in &removed {
            self.announced.remove(id);
        }
        Some(Announcement {
            device,
            base,
            seq: self.seq,
            load,
            added,
            removed,
        })
    }

    /// One page of the announced state, for a peer that missed deltas.
    pub fn page(&self, req: &AvailRequest) -> AvailResponse {
        let start = match req.after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        let holdings: Vec<Holding> = self
            .announced
            .range((start, std::ops::Bound::Unbounded))
            .take(MAX_AVAIL_PAGE)
            .map(|(_, h)| h.clone())
            .collect();
        let next = if holdings.len() == MAX_AVAIL_PAGE {
            holdings.last().map(|h| h.resource)
        } else {
            None
        };
        AvailResponse {
            seq: self.seq,
            holdings,
            next,
        }
    }
}

/// What one other device holds, as far as we know.
#[derive(Debug, Clone, Default)]
pub struct Remote {
    pub seq: u64,
    pub holdings: BTreeMap<ResourceId, Holding>,
    pub load: Load,
    pub updated: Option<Instant>,
    /// A snapshot is being fetched: deltas wait for it.
    syncing: Option<Sync>,
}

#[derive(Debug, Clone, Default)]
struct Sync {
    seq: u64,
    holdings: BTreeMap<ResourceId, Holding>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already seen (gossip can repeat).
    Stale,
    /// Deltas were missed: ask the device for a snapshot from the start.
    NeedSnapshot,
    /// Larger than any device sends (`MAX_DELTA` changes), or past
    /// `MAX_HOLDINGS`: ignored.
    Refused,
}

/// Most files one other device is known to hold. What a member announces
/// is kept in memory here; past this, its further additions are ignored
/// (a device listing millions of files is misbehaving, or should be told
/// about by its own reads).
pub const MAX_HOLDINGS: usize = 2_000_000;

/// Every other device's availability.
#[derive(Debug, Default)]
pub struct View {
    pub devices: HashMap<DeviceId, Remote>,
}

impl View {
    pub fn apply(&mut self, a: &Announcement, now: Instant) -> Applied {
        // Sizes a member controls are bounded on receipt.
        if a.added.len() + a.removed.len() > MAX_DELTA {
            return Applied::Refused;
        }
        let r = self.devices.entry(a.device).or_default();
        r.load = a.load;
        r.updated = Some(now);
        if r.syncing.is_some() {
            return Applied::Stale;
        }
        if a.seq <= r.seq && r.seq != 0 {
            return Applied::Stale;
        }
        if a.base != r.seq {
            r.syncing = Some(Sync::default());
            return Applied::NeedSnapshot;
        }
        for id in &a.removed {
            r.holdings.remove(id);
        }
        let mut refused = false;
        for h in &a.added {
            if r.holdings.len() >= MAX_HOLDINGS && !r.holdings.contains_key(&h.resource) {
                refused = true;
                continue;
            }
            r.holdings.insert(h.resource, h.clone());
        }
        r.seq = a.seq;
        if refused {
            Applied::Refused
        } else {
            Applied::Applied
        }
    }

    /// Applies one snapshot page; returns where to ask next, or `None`
    /// when the snapshot is complete (or was abandoned because the device
    /// moved on mid-way, in which case the next announcement restarts it).
    pub fn apply_page(&mut self, device: DeviceId, page: AvailResponse) -> Option<ResourceId> {
        let r = self.devices.entry(device).or_default();
        let sync = r.syncing.get_or_insert_with(Sync::default);
        if sync.holdings.is_empty() {
            sync.seq = page.seq;
        } else if sync.seq != page.seq {
            r.syncing = None;
            r.seq = 0;
            return None;
        }
        for h in page.holdings {
            sync.holdings.insert(h.resource, h);
        }
        if sync.holdings.len() > MAX_HOLDINGS {
            // A snapshot that never ends: given up (the next announcement
            // asks again; a device that keeps doing it is only ignored).
            r.syncing = None;
            r.seq = 0;
            return None;
        }
        if page.next.is_some() {
            return page.next;
        }
        if let Some(done) = r.syncing.take() {
            r.seq = done.seq;
            r.holdings = done.holdings;
        }
        None
    }

    /// A snapshot request failed: the next announcement asks again.
    pub fn abandon_sync(&mut self, device: DeviceId) {
        if let Some(r) = self.devices.get_mut(&device) {
            r.syncing = None;
            r.seq = 0;
        }
    }

    pub fn forget(&mut self, device: DeviceId) {
        self.devices.remove(&device);
    }

    /// Devices holding `resource`, least loaded first.
    pub fn holders(&self, resource: ResourceId) -> Vec<DeviceId> {
        self.holders_where(resource, |_| true)
    }

    /// Devices holding `version` of `resource`, least loaded first.
    pub fn holders_at(&self, resource: ResourceId, version: VersionId) -> Vec<DeviceId> {
        self.holders_where(resource, |h| h.version == version)
    }

    fn holders_where(&self, resource: ResourceId, ok: impl Fn(&Holding) -> bool) -> Vec<DeviceId> {
        let mut v: Vec<(u32, DeviceId)> = self
            .devices
            .iter()
            .filter(|(_, r)| r.holdings.get(&resource).is_some_and(&ok))
            .map(|(d, r)| (r.load.active_transfers + r.load.queue_depth, *d))
            .collect();
        v.sort();
        v.into_iter().map(|(_, d)| d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(id: u64, size: u64) -> Holding {
        Holding {
            resource: ResourceId(id),
            version: crate::ids::VersionId(1),
            size,
            kind: "text/plain".into(),
        }
    }

    fn state(ids: impl IntoIterator<Item = u64>) -> BTreeMap<ResourceId, Holding> {
        ids.into_iter()
            .map(|i| (ResourceId(i), holding(i, i * 10)))
            .collect()
    }

    #[test]
    fn deltas_are_bounded_and_converge() {
        let dev = DeviceId([1; 16]);
        let mut out = Outbox::default();
        let mut view = View::default();
        let now = Instant::now();
        let current = state(0..(MAX_DELTA as u64 * 2 + 10));
        let mut n = 0;
        while let Some(a) = out.next(dev, &current, Load::default(), false) {
            assert!(a.added.len() + a.removed.len() <= MAX_DELTA);
            assert_eq!(view.apply(&a, now), Applied::Applied);
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(out.next(dev, &current, Load::default(), false).is_none());
        let r = &view.devices[&dev];
        assert_eq!(r.holdings.len(), current.len());
        // A removal and a change travel as one small delta.
        let mut next = current.clone();
        next.remove(&ResourceId(3));
        next.insert(ResourceId(4), holding(4, 999));
        let a = out.next(dev, &next, Load::default(), false).unwrap();
        assert_eq!((a.added.len(), a.removed.len()), (1, 1));
        view.apply(&a, now);
        assert_eq!(view.devices[&dev].holdings, next);
        assert!(out.next(dev, &next, Load::default(), false).is_none());
        assert!(out.next(dev, &next, Load::default(), true).is_some());
    }

    #[test]
    fn holders_of_a_version_leave_out_those_with_another() {
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let mut view = View::default();
        let now = Instant::now();
        for (dev, version) in [(a, 1), (b, 2)] {
            let mut h = holding(7, 10);
            h.version = crate::ids::VersionId(version);
            let ann = Announcement {
                device: dev,
                base: 0,
                seq: 1,
                added: vec![h],
                removed: Vec::new(),
                load: Load::default(),
            };
            assert_eq!(view.apply(&ann, now), Applied::Applied);
        }
        assert_eq!(view.holders(ResourceId(7)).len(), 2);
        assert_eq!(view.holders_at(ResourceId(7), VersionId(2)), vec![b]);
        assert_eq!(view.holders_at(ResourceId(7), VersionId(1)), vec![a]);
        assert!(view.holders_at(ResourceId(7), VersionId(3)).is_empty());
        assert!(view.holders_at(ResourceId(8), VersionId(1)).is_empty());
    }

    #[test]
    fn sizes_a_member_controls_are_bounded_on_receipt() {
        let dev = DeviceId([3; 16]);
        let mut view = View::default();
        let now = Instant::now();
        let too_many = Announcement {
            device: dev,
            base: 0,
            seq: 1,
            added: state(0..MAX_DELTA as u64 + 1).into_values().collect(),
            removed: Vec::new(),
            load: Load::default(),
        };
        assert_eq!(view.apply(&too_many, now), Applied::Refused);
        assert!(view.devices.get(&dev).is_none_or(|r| r.holdings.is_empty()));
        // A snapshot that pages on past MAX_HOLDINGS is given up.
        let mut after = 0u64;
        let mut pages = 0;
        loop {
            let page = AvailResponse {
                seq: 7,
                holdings: state(after..after + MAX_AVAIL_PAGE as u64)
                    .into_values()
                    .collect(),
                next: Some(ResourceId(after + MAX_AVAIL_PAGE as u64)),
            };
            after += MAX_AVAIL_PAGE as u64;
            pages += 1;
            if view.apply_page(dev, page).is_none() {
                break;
            }
            assert!(pages <= MAX_HOLDINGS / MAX_AVAIL_PAGE + 1, "never given up");
        }
        assert!(view.devices[&dev].holdings.is_empty());
        assert_eq!(view.devices[&dev].seq, 0);
    }

    #[test]
    fn a_missed_delta_is_repaired_by_a_paged_snapshot() {
        let dev = DeviceId([2; 16]);
        let mut out = Outbox::default();
        let mut view = View::default();
        let now = Instant::now();
        let current = state(0..(MAX_AVAIL_PAGE as u64 + 5));
        // The first announcement is lost.
        let _lost = out.next(dev, &current, Load::default(), false).unwrap();
        while out.next(dev, &current, Load::default(), false).is_some() {}
        let a = out.next(dev, &current, Load::default(), true).unwrap();
        assert_eq!(view.apply(&a, now), Applied::NeedSnapshot);
        // Further deltas wait while the snapshot is fetched.
        assert_eq!(view.apply(&a, now), Applied::Stale);
        let mut after = None;
        loop {
            let page = out.page(&AvailRequest { after });
            match view.apply_page(dev, page) {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(view.devices[&dev].holdings, current);
        assert_eq!(view.devices[&dev].seq, out.seq());
        let a = out.next(dev, &state(0..3), Load::default(), false).unwrap();
        assert_eq!(view.apply(&a, now), Applied::Applied);
        assert_eq!(view.holders(ResourceId(2)), vec![dev]);
        assert!(view.holders(ResourceId(10)).is_empty());
    }
}
