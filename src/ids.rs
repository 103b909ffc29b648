//! Identifier newtypes shared by every module: devices, resources (inodes),
//! content chunks and content versions. Short forms are for logs; the full
//! forms travel on the wire and to disk.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A device's identity within a mesh. Random at `init`; the mesh's member
/// list binds it to the device's libp2p peer id (its ed25519 key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 16]);

/// Random bytes for ids, keys and secrets (the mesh key, invite secrets,
/// device ids) from the kernel's CSPRNG (getrandom(2)). It fails only on a
/// broken system, and then this panics, saying so: nothing guessable (the
/// time, the pid) stands in for it.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if let Err(e) = getrandom::getrandom(&mut out) {
        panic!(
            "the kernel's random number generator failed ({e}): meshfs makes no key, secret or id without it"
        );
    }
    out
}

impl DeviceId {
    /// A fresh random id.
    pub fn generate() -> Self {
        DeviceId(random_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn parse_hex(s: &str) -> Option<Self> {
        let bytes = unhex(s)?;
        let arr: [u8; 16] = bytes.try_into().ok()?;
        Some(DeviceId(arr))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", &self.to_hex()[..8])
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A file, directory or other node of the namespace. It is the inode number
/// the kernel sees; numbers are never reused, so the FUSE generation stays 0.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct ResourceId(pub u64);

impl ResourceId {
    pub const ROOT: ResourceId = ResourceId(1);
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// The BLAKE3 hash of a chunk's bytes: its address and its integrity check.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHash(pub blake3::Hash);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(blake3::hash(data))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkHash(blake3::Hash::from_bytes(bytes))
    }

    /// Parses the 64-digit hex form (`Display`).
    pub fn parse_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(ChunkHash)
    }

    /// Parses a key read from disk; `None` when it is not 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self::from_bytes(arr))
    }

    /// A reserved value (no content hashes to all zeros in practice) that
    /// marks a run of zero bytes in a chunk list: holes and zero-filled
    /// extensions cost neither chunking nor storage.
    pub fn zero_run() -> Self {
        Self::from_bytes([0; 32])
    }

    pub fn is_zero_run(&self) -> bool {
        self.as_bytes() == &[0; 32]
    }

    /// First 8 hex digits, enough to tell chunks apart in a log line.
    pub fn fmt_short(&self) -> String {
        self.0.to_hex()[..8].to_string()
    }
}

// Ordered by bytes, so maps of chunks iterate deterministically.
impl PartialOrd for ChunkHash {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ChunkHash {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.fmt_short())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; 32]>::deserialize(d)?;
        Ok(ChunkHash::from_bytes(bytes))
    }
}

/// One committed content state of a file, numbered per file from 1.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct VersionId(pub u64);

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lowercase or uppercase hex; `None` for odd lengths or non-digits.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_fresh_every_time() {
        let keys: std::collections::HashSet<[u8; 32]> = (0..1000).map(|_| random_bytes()).collect();
        assert_eq!(keys.len(), 1000);
        assert!(!keys.contains(&[0u8; 32]));
        // Not derived from the clock or the pid: two at once still differ.
        let (a, b): ([u8; 16], [u8; 16]) = (random_bytes(), random_bytes());
        assert_ne!(a, b);
    }

    #[test]
    fn device_id_hex_round_trip() {
        let id = DeviceId::generate();
        assert_eq!(DeviceId::parse_hex(&id.to_hex()), Some(id));
        assert_eq!(DeviceId::parse_hex("zz"), None);
        assert_ne!(DeviceId::generate(), id);
    }

    #[test]
    fn chunk_hash_serde_round_trip() {
        let h = ChunkHash::of(b"hello");
        let bytes = postcard::to_stdvec(&h).unwrap();
        let back: ChunkHash = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(h, back);
        assert_eq!(h.fmt_short().len(), 8);
        assert_eq!(ChunkHash::from_slice(h.as_bytes()), Some(h));
        assert_eq!(ChunkHash::from_slice(&[1, 2, 3]), None);
    }
}
