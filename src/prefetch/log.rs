//! Access events as the daemon records, stores and shares them: a resource
//! id, the device, an anonymized user and a coarse time. Paths never appear
//! here; users are a keyed BLAKE3 hash of the mesh user name, with a key
//! derived from the mesh key, so the same person hashes the same on every
//! device and to nothing useful outside the mesh.

use crate::ids::{DeviceId, ResourceId};
use serde::{Deserialize, Serialize};

/// Times are rounded down to this many milliseconds before they are stored
/// or sent (order within a device is kept by `seq`).
pub const COARSE_MS: u64 = 10_000;
/// Most events in one gossiped batch; a larger batch is refused.
pub const MAX_BATCH: usize = 512;
/// The key-derivation context of the user hash.
pub const USER_KEY_CONTEXT: &str = "meshfs 2026-11 access-log user hash v1";

/// An anonymized user: 16 bytes of a keyed hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct UserHash(pub [u8; 16]);

impl UserHash {
    pub fn of(key: &[u8; 32], mesh_user: &str) -> Self {
        let h = blake3::keyed_hash(key, mesh_user.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        UserHash(out)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    pub resource: ResourceId,
    pub device: DeviceId,
    /// Per-device sequence number: orders a device's events within one
    /// coarse time step and makes a re-delivered event a duplicate.
    pub seq: u64,
    pub user: UserHash,
    pub ts_ms: u64,
    /// Size of the file's content at the open.
    pub size: u64,
}

impl AccessEvent {
    pub fn origin(&self) -> [u8; 8] {
        let mut o = [0u8; 8];
        o.copy_from_slice(&self.device.0[..8]);
        o
    }
}

pub fn coarse(ts_ms: u64) -> u64 {
    ts_ms - ts_ms % COARSE_MS
}

pub fn encode(e: &AccessEvent) -> Vec<u8> {
    // A plain struct of integers and arrays always serializes.
    postcard::to_allocvec(e).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<AccessEvent, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("malformed access event: {e}"))
}

/// What travels on the access topic: a device's own events, or a digest of
/// how far this device's log goes for each origin (anti-entropy: an origin
/// that sees a digest behind on its events sends them again, so a device
/// that was offline catches up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMsg {
    Events(Vec<AccessEvent>),
    /// Per origin, the sequence number up to which this device has every
    /// event (its frontier).
    Digest(Vec<(DeviceId, u64)>),
    /// The sender's own events after `after`, sent again: every event of it
    /// with a sequence number in (after, last listed] is listed, so the
    /// receiver's frontier can move past numbers that never existed (a
    /// restart starts numbering afresh).
    Resend {
        after: u64,
        events: Vec<AccessEvent>,
    },
}

/// Most origins in one digest.
pub const MAX_DIGEST: usize = 4096;

pub fn encode_batch(events: &[AccessEvent]) -> Vec<u8> {
    postcard::to_allocvec(&AccessMsg::Events(events.to_vec())).unwrap_or_default()
}

pub fn encode_resend(after: u64, events: &[AccessEvent]) -> Vec<u8> {
    postcard::to_allocvec(&AccessMsg::Resend {
        after,
        events: events.to_vec(),
    })
    .unwrap_or_default()
}

pub fn encode_digest(digest: &[(DeviceId, u64)]) -> Vec<u8> {
    postcard::to_allocvec(&AccessMsg::Digest(digest.to_vec())).unwrap_or_default()
}

/// Decodes a message gossiped by `sender`. A batch that is malformed, too
/// large, or speaks for another device is refused whole: a device reports
/// only its own opens.
pub fn decode_msg(bytes: &[u8], sender: DeviceId) -> Result<AccessMsg, String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    decode_msg_at(bytes, sender, now_ms)
}

/// Events stamped further ahead of this device's clock than this are
/// refused: trimming goes by age, so an event from the future would stay.
pub const MAX_CLOCK_AHEAD_MS: u64 = 10 * 60 * 1000;

/// `decode_msg` with this device's clock reading `now_ms`.
pub fn decode_msg_at(bytes: &[u8], sender: DeviceId, now_ms: u64) -> Result<AccessMsg, String> {
    let check = |events| check_batch(events, sender, now_ms);
    match postcard::from_bytes(bytes).map_err(|e| format!("malformed access message: {e}"))? {
        AccessMsg::Events(events) => Ok(AccessMsg::Events(check(events)?)),
        AccessMsg::Resend { after, events } => {
            let events = check(events)?;
            if events.windows(2).any(|w| w[0].seq >= w[1].seq)
                || events.first().is_some_and(|e| e.seq <= after)
            {
                return Err("access events sent again out of order".into());
            }
            Ok(AccessMsg::Resend { after, events })
        }
        AccessMsg::Digest(d) if d.len() > MAX_DIGEST => Err(format!(
            "access digest of {} origins (at most {MAX_DIGEST})",
            d.len()
        )),
        AccessMsg::Digest(d) => Ok(AccessMsg::Digest(d)),
    }
}

/// `decode_msg` for a message that must be a batch of events.
pub fn decode_batch(bytes: &[u8], sender: DeviceId) -> Result<Vec<AccessEvent>, String> {
    match decode_msg(bytes, sender)? {
        AccessMsg::Events(e) => Ok(e),
        _ => Err("expected a batch of access events".into()),
    }
}

fn check_batch(
    events: Vec<AccessEvent>,
    sender: DeviceId,
    now_ms: u64,
) -> Result<Vec<AccessEvent>, String> {
    if events.len() > MAX_BATCH {
        return Err(format!(
            "access batch of {} events (at most {MAX_BATCH})",
            events.len()
        ));
    }
    if let Some(e) = events.iter().find(|e| e.device != sender) {
        return Err(format!(
            "access batch from {sender} carries an event of {}",
            e.device
        ));
    }
    if events.iter().any(|e| e.ts_ms % COARSE_MS != 0) {
        return Err("access batch with uncoarsened times".into());
    }
    if events
        .iter()
        .any(|e| e.ts_ms > now_ms.saturating_add(MAX_CLOCK_AHEAD_MS))
    {
        return Err("access batch with events from the future".into());
    }
    Ok(events)
}

/// The local user name of `uid` from the password database, "uid:N" when
/// it has none.
pub fn local_user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized local storage;
    // getpwuid_r writes strings into `buf` only.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return format!("uid:{uid}");
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    name.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(device: DeviceId, ts: u64) -> AccessEvent {
        AccessEvent {
            resource: ResourceId(9),
            device,
            seq: 1,
            user: UserHash([3; 16]),
            ts_ms: ts,
            size: 10,
        }
    }

    #[test]
    fn batches_speak_only_for_their_sender() {
        let (a, b) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let batch = encode_batch(&[ev(a, 20_000), ev(a, 30_000)]);
        assert_eq!(decode_batch(&batch, a).unwrap().len(), 2);
        assert!(decode_batch(&batch, b)
            .unwrap_err()
            .contains("carries an event"));
        assert!(decode_batch(&batch[..batch.len() - 3], a).is_err());
        assert!(decode_batch(&encode_batch(&[ev(a, 20_001)]), a).is_err());
        let big: Vec<_> = (0..MAX_BATCH + 1).map(|_| ev(a, 0)).collect();
        assert!(decode_batch(&encode_batch(&big), a)
            .unwrap_err()
            .contains("at most"));
        assert_eq!(decode(&encode(&ev(a, 0))).unwrap(), ev(a, 0));
        let digest = encode_digest(&[(a, 5), (b, 7)]);
        assert_eq!(
            decode_msg(&digest, b).unwrap(),
            AccessMsg::Digest(vec![(a, 5), (b, 7)])
        );
        assert!(decode_batch(&digest, b).is_err());
        let huge: Vec<_> = (0..MAX_DIGEST + 1).map(|i| (a, i as u64)).collect();
        assert!(decode_msg(&encode_digest(&huge), b).is_err());
        let mut e1 = ev(a, 0);
        e1.seq = 5;
        let mut e2 = e1.clone();
        e2.seq = 9;
        assert!(decode_msg(&encode_resend(4, &[e1.clone(), e2.clone()]), a).is_ok());
        assert!(decode_msg(&encode_resend(5, &[e1.clone(), e2.clone()]), a).is_err());
        assert!(decode_msg(&encode_resend(4, &[e2, e1]), a).is_err());
        // Stamped from the future (past the clock slack): refused, as
        // trimming by age would never drop it.
        let now = 1_800_000_000_000;
        let soon = encode_batch(&[ev(a, coarse(now + MAX_CLOCK_AHEAD_MS))]);
        assert!(decode_msg_at(&soon, a, now).is_ok());
        let later = encode_batch(&[ev(a, coarse(now + MAX_CLOCK_AHEAD_MS) + COARSE_MS)]);
        assert!(decode_msg_at(&later, a, now)
            .unwrap_err()
            .contains("future"));
        let far = encode_batch(&[ev(a, coarse(u64::MAX))]);
        assert!(decode_msg_at(&far, a, u64::MAX - 1).is_ok());
        assert!(decode_msg_at(&far, a, now).is_err());
    }

    #[test]
    fn user_hash_is_keyed_and_stable() {
        let k1 = blake3::derive_key(USER_KEY_CONTEXT, &[1; 32]);
        let k2 = blake3::derive_key(USER_KEY_CONTEXT, &[2; 32]);
        assert_eq!(UserHash::of(&k1, "alice"), UserHash::of(&k1, "alice"));
        assert_ne!(UserHash::of(&k1, "alice"), UserHash::of(&k1, "bob"));
        assert_ne!(UserHash::of(&k1, "alice"), UserHash::of(&k2, "alice"));
        assert_eq!(local_user_name(0), "root");
        assert_eq!(local_user_name(4_000_000_000), "uid:4000000000");
        assert_eq!(coarse(123_456), 120_000);
    }
}

/// Which of one origin's events this device has: every sequence number up
/// to `frontier`, plus those listed in `ahead` (arrived after a gap). It
/// starts at 0: whatever an origin logged before the first event seen from
/// it counts as missing, so a device new to an origin asks for its history
/// (and the origin's resend settles the numbers that never existed).
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub frontier: u64,
    ahead: std::collections::BTreeSet<u64>,
}

/// Out-of-order sequence numbers kept per origin; past it the frontier
/// jumps to the oldest of them (what is missing is then given up on).
const MAX_AHEAD: usize = 65_536;

impl Received {
    /// Records `seq`; false when it was already here (a copy).
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq <= self.frontier || !self.ahead.insert(seq) {
            return false;
        }
        self.advance();
        if self.ahead.len() > MAX_AHEAD {
            if let Some(&first) = self.ahead.iter().next() {
                self.frontier = first.saturating_sub(1);
                self.advance();
            }
        }
        true
    }

    /// The highest sequence number here.
    pub fn latest(&self) -> u64 {
        self.ahead.last().copied().unwrap_or(0).max(self.frontier)
    }

    /// Every number up to `seq` is accounted for (a resend said so).
    /// Sequence numbers come from other devices: checked arithmetic, so
    /// that u64::MAX settles everything instead of overflowing (it panicked
    /// the prefetch thread, overflow checks being on in release builds).
    pub fn settle(&mut self, seq: u64) {
        if seq > self.frontier {
            self.frontier = seq;
            self.ahead = match seq.checked_add(1) {
                Some(next) => self.ahead.split_off(&next),
                None => Default::default(),
            };
            self.advance();
        }
    }

    fn advance(&mut self) {
        while let Some(next) = self.frontier.checked_add(1) {
            if !self.ahead.remove(&next) {
                break;
            }
            self.frontier = next;
        }
    }
}

#[cfg(test)]
mod received_tests {
    use super::Received;

    #[test]
    fn the_largest_sequence_numbers_settle_without_overflow() {
        let mut r = Received::default();
        assert!(r.accept(u64::MAX));
        assert!(r.accept(u64::MAX - 1));
        r.settle(u64::MAX);
        assert_eq!(r.frontier, u64::MAX);
        assert_eq!(r.latest(), u64::MAX);
        assert!(!r.accept(u64::MAX));
        assert!(!r.accept(5));
        let mut r = Received::default();
        assert!(r.accept(1));
        assert!(r.accept(u64::MAX));
        r.settle(u64::MAX - 1);
        assert_eq!(r.frontier, u64::MAX);
    }

    #[test]
    fn frontier_moves_over_gaps_once_filled_or_settled() {
        let mut r = Received::default();
        assert!(r.accept(1));
        assert!(r.accept(2));
        assert!(!r.accept(2));
        assert!(r.accept(4));
        assert_eq!((r.frontier, r.latest()), (2, 4));
        assert!(r.accept(3));
        assert_eq!(r.frontier, 4);
        assert!(r.accept(1000));
        assert_eq!(r.frontier, 4);
        r.settle(999);
        assert_eq!(r.frontier, 1000);
        assert!(!r.accept(500));
        // An origin first seen mid-way: its earlier history counts as missing.
        let mut late = Received::default();
        assert!(late.accept(50));
        assert_eq!((late.frontier, late.latest()), (0, 50));
    }
}

/// Gossiped access messages, arbitrary or damaged (proptest, bounded for
/// CI): refused, or within every bound `decode_msg_at` promises.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use crate::fuzzing::{access_message as holds_its_promises, ACCESS_NOW_MS as NOW_MS};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_refused_or_kept_within_bounds(
            bytes in vec(any::<u8>(), 0..2048),
            sender in any::<[u8; 16]>(),
        ) {
            holds_its_promises(&bytes, DeviceId(sender));
        }

        #[test]
        fn a_damaged_batch_is_refused_or_kept_within_bounds(
            seqs in vec(any::<u64>(), 0..20),
            damage in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let sender = DeviceId([3; 16]);
            let events: Vec<AccessEvent> = seqs
                .iter()
                .map(|s| AccessEvent {
                    resource: ResourceId(s % 1000),
                    device: sender,
                    seq: *s,
                    user: UserHash([1; 16]),
                    ts_ms: NOW_MS - NOW_MS % COARSE_MS,
                    size: *s,
                })
                .collect();
            let mut bytes = postcard::to_allocvec(&AccessMsg::Events(events)).unwrap();
            holds_its_promises(&bytes, sender);
            for (at, b) in damage {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            holds_its_promises(&bytes, sender);
        }
    }
}
