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

pub fn encode_batch(events: &[AccessEvent]) -> Vec<u8> {
    postcard::to_allocvec(events).unwrap_or_default()
}

/// Decodes a batch gossiped by `sender`. A batch that is malformed, too
/// large, or speaks for another device is refused whole: a device reports
/// only its own opens.
pub fn decode_batch(bytes: &[u8], sender: DeviceId) -> Result<Vec<AccessEvent>, String> {
    let events: Vec<AccessEvent> =
        postcard::from_bytes(bytes).map_err(|e| format!("malformed access batch: {e}"))?;
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
