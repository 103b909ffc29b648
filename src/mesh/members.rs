//! The mesh's device list: who may connect. Until the Raft issue moves it
//! into the replicated state, it is a grow-only set of members plus a
//! grow-only set of removed peers (a two-phase set), so that every device
//! converges on the same list whatever order the gossip arrives in, and a
//! removed device can never be re-added by a stale copy. Pure data; the
//! swarm actor persists and gossips it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::protocol::Member;
use crate::ids::DeviceId;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// By peer id.
    added: BTreeMap<String, Member>,
    removed: BTreeSet<String>,
}

impl Members {
    pub fn with(first: Member) -> Self {
        let mut m = Members::default();
        m.added.insert(first.peer.clone(), first);
        m
    }

    /// Current members, removed ones excluded.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.added
            .values()
            .filter(|m| !self.removed.contains(&m.peer))
    }

    pub fn is_member(&self, peer: &str) -> bool {
        self.added.contains_key(peer) && !self.removed.contains(peer)
    }

    pub fn is_removed(&self, peer: &str) -> bool {
        self.removed.contains(peer)
    }

    pub fn get(&self, peer: &str) -> Option<&Member> {
        self.added
            .get(peer)
            .filter(|_| !self.removed.contains(peer))
    }

    pub fn by_device(&self, device: DeviceId) -> Option<&Member> {
        self.iter().find(|m| m.device == device)
    }

    pub fn by_name(&self, name: &str) -> Option<&Member> {
        self.iter().find(|m| m.name == name)
    }

    /// Adds a device. Refused when its peer was removed, or when another
    /// current member already has its name or device id.
    pub fn add(&mut self, m: Member) -> Result<(), String> {
        if self.removed.contains(&m.peer) {
            return Err(format!("device {} was removed from this mesh", m.name));
        }
        if let Some(other) = self
            .iter()
            .find(|o| o.peer != m.peer && (o.name == m.name || o.device == m.device))
        {
            return Err(format!(
                "a device named {} is already in the mesh",
                other.name
            ));
        }
        self.added.insert(m.peer.clone(), m);
        Ok(())
    }

    /// Removes a device for good; returns it when it was a member.
    pub fn remove(&mut self, name: &str) -> Option<Member> {
        let m = self.by_name(name)?.clone();
        self.removed.insert(m.peer.clone());
        Some(m)
    }

    /// Updates where this device listens (only a device changes its own
    /// record, so its revision orders the copies).
    pub fn set_own_addrs(&mut self, peer: &str, addrs: Vec<String>) -> bool {
        match self.added.get_mut(peer) {
            Some(m) if m.addrs != addrs => {
                m.addrs = addrs;
                m.rev += 1;
                true
            }
            _ => false,
        }
    }

    /// Merges another copy; says whether anything changed. Members: union
    /// (on a conflict for one peer, the higher revision, then the greater by
    /// bytes, wins, so that every device picks the same);
    /// removals: union.
    pub fn merge(&mut self, other: &Members) -> bool {
        let mut changed = false;
        for p in &other.removed {
            changed |= self.removed.insert(p.clone());
        }
        for (peer, m) in &other.added {
            match self.added.get(peer) {
                None => {
                    self.added.insert(peer.clone(), m.clone());
                    changed = true;
                }
                Some(mine) if mine != m && prefer(m, mine) => {
                    self.added.insert(peer.clone(), m.clone());
                    changed = true;
                }
                Some(_) => {}
            }
        }
        changed
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn prefer(a: &Member, b: &Member) -> bool {
    (a.rev, crate::mesh::protocol::encode(a)) > (b.rev, crate::mesh::protocol::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, peer: &str) -> Member {
        Member {
            name: name.into(),
            device: DeviceId(
                blake3::hash(peer.as_bytes()).as_bytes()[..16]
                    .try_into()
                    .unwrap(),
            ),
            peer: peer.into(),
            addrs: vec![],
            rev: 0,
        }
    }

    #[test]
    fn merge_converges_in_any_order() {
        let mut a = Members::with(member("a", "pa"));
        let mut b = a.clone();
        a.add(member("c", "pc")).unwrap();
        b.add(member("d", "pd")).unwrap();
        b.remove("a");
        let (mut x, mut y) = (a.clone(), b.clone());
        assert!(x.merge(&b));
        assert!(y.merge(&a));
        assert_eq!(x, y);
        assert!(!x.is_member("pa"));
        assert!(x.is_member("pc") && x.is_member("pd"));
        // A stale copy that still lists the removed device does not bring
        // it back.
        assert!(!x.merge(&Members::with(member("a", "pa"))));
        assert!(!x.is_member("pa"));
    }

    #[test]
    fn names_and_removed_peers_are_guarded() {
        let mut m = Members::with(member("a", "pa"));
        assert!(m.add(member("a", "pb")).is_err());
        m.add(member("b", "pb")).unwrap();
        assert_eq!(m.remove("b").map(|x| x.peer), Some("pb".to_string()));
        assert!(m.add(member("b", "pb")).is_err());
        assert!(m.remove("nobody").is_none());
        assert_eq!(m.len(), 1);
        // A new device may take a removed device's name.
        m.add(member("b", "pb2")).unwrap();
        assert_eq!(m.by_name("b").map(|x| x.peer.as_str()), Some("pb2"));
    }

    #[test]
    fn merge_of_one_peer_picks_the_same_record_everywhere() {
        let x = member("a", "pa");
        let mut newer = Members::with(x.clone());
        assert!(newer.set_own_addrs("pa", vec!["/ip4/10.0.0.1/tcp/1".into()]));
        let (mut l, mut r) = (Members::with(x.clone()), newer.clone());
        assert!(l.merge(&newer));
        assert!(!r.merge(&Members::with(x)));
        assert_eq!(l, r);
        assert_eq!(l.get("pa").map(|m| m.addrs.len()), Some(1));
    }
}
