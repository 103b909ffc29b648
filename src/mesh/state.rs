//! A device's mesh credentials and device list on disk, under
//! `DATA_DIR/mesh/` (directory 0700, files 0600):
//! - `identity`: the libp2p ed25519 keypair (protobuf encoding);
//! - `mesh.key`: the 32-byte mesh key (bound into every Noise handshake,
//!   see [`noise_prologue`]), in libp2p's swarm.key text format;
//! - `members.json`: the device list (see `members`).
//!
//! Files are replaced atomically (write, fsync, rename) so that a crash
//! leaves the old or the new copy, never half of one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::PeerId;

use super::members::Members;
use super::protocol::Member;
use super::MeshError;
use crate::ids::DeviceId;

const DIR: &str = "mesh";
const IDENTITY: &str = "identity";
const MESH_KEY: &str = "mesh.key";
const MEMBERS: &str = "members.json";

/// What a device knows about its mesh.
#[derive(Clone)]
pub struct MeshState {
    pub identity: Keypair,
    pub mesh_key: [u8; 32],
    pub members: Members,
}

impl std::fmt::Debug for MeshState {
    // Keys stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshState")
            .field("peer", &self.peer_id())
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl MeshState {
    /// A new mesh whose only member is this device.
    pub fn create(name: &str, device: DeviceId, identity: Keypair) -> Self {
        let me = Member {
            name: name.to_string(),
            device,
            peer: identity.public().to_peer_id().to_string(),
            addrs: Vec::new(),
            rev: 0,
        };
        MeshState {
            identity,
            mesh_key: crate::ids::random_bytes(),
            members: Members::with(me),
        }
    }

    /// A new mesh with a freshly generated device key.
    pub fn generate(name: &str, device: DeviceId) -> Self {
        Self::create(name, device, Keypair::generate_ed25519())
    }

    pub fn peer_id(&self) -> PeerId {
        self.identity.public().to_peer_id()
    }

    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join(DIR).join(MESH_KEY).exists()
    }

    pub fn load(data_dir: &Path) -> Result<Self, MeshError> {
        let dir = data_dir.join(DIR);
        let id_bytes = read(&dir.join(IDENTITY))?;
        let identity = Keypair::from_protobuf_encoding(&id_bytes)
            .map_err(|e| MeshError::State(format!("{}: {e}", dir.join(IDENTITY).display())))?;
        let key_text = String::from_utf8(read(&dir.join(MESH_KEY))?)
            .map_err(|_| MeshError::State(format!("{}: not text", dir.join(MESH_KEY).display())))?;
        let psk = PreSharedKey::from_str(&key_text)
            .map_err(|e| MeshError::State(format!("{}: {e}", dir.join(MESH_KEY).display())))?;
        let members: Members = serde_json::from_slice(&read(&dir.join(MEMBERS))?)
            .map_err(|e| MeshError::State(format!("{}: {e}", dir.join(MEMBERS).display())))?;
        Ok(MeshState {
            identity,
            mesh_key: psk_bytes(&psk, &key_text)?,
            members,
        })
    }

    /// Writes every file (used by `init` and `join`).
    pub fn save(&self, data_dir: &Path) -> Result<(), MeshError> {
        let dir = ensure_dir(data_dir)?;
        let id = self
            .identity
            .to_protobuf_encoding()
            .map_err(|e| MeshError::State(format!("encoding the identity: {e}")))?;
        write_atomic(&dir.join(IDENTITY), &id)?;
        let key = PreSharedKey::new(self.mesh_key).to_key_file();
        write_atomic(&dir.join(MESH_KEY), key.as_bytes())?;
        self.save_members(data_dir)
    }

    pub fn save_members(&self, data_dir: &Path) -> Result<(), MeshError> {
        let dir = ensure_dir(data_dir)?;
        let json = serde_json::to_vec_pretty(&self.members)
            .map_err(|e| MeshError::State(format!("encoding the member list: {e}")))?;
        write_atomic(&dir.join(MEMBERS), &json)
    }
}

/// The key bytes back out of libp2p's key type (it keeps them private):
/// parsed from the key file's last line, which is their hex.
fn psk_bytes(psk: &PreSharedKey, text: &str) -> Result<[u8; 32], MeshError> {
    let hex = text.lines().last().unwrap_or_default().trim();
    let bytes = crate::ids::unhex(hex)
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| MeshError::State("mesh.key: bad key line".into()))?;
    // Same key as libp2p parsed, or the file is not what we think it is.
    if PreSharedKey::new(bytes).fingerprint().to_string() != psk.fingerprint().to_string() {
        return Err(MeshError::State("mesh.key: inconsistent key".into()));
    }
    Ok(bytes)
}

fn ensure_dir(data_dir: &Path) -> Result<PathBuf, MeshError> {
    let dir = data_dir.join(DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| MeshError::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| MeshError::io(format!("securing {}", dir.display()), e))?;
    Ok(dir)
}

fn read(path: &Path) -> Result<Vec<u8>, MeshError> {
    std::fs::read(path).map_err(|e| MeshError::io(format!("reading {}", path.display()), e))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), MeshError> {
    let tmp = path.with_extension("tmp");
    let ctx = |e| MeshError::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(ctx)?;
    f.write_all(bytes).map_err(ctx)?;
    f.sync_all().map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)?;
    crate::datadir::sync_parent(path).map_err(ctx)
}

/// The Noise prologue of every mesh connection: derived from the mesh key,
/// so the handshake of a peer without it fails (both sides must hash in
/// the same prologue), and useless for anything else.
pub fn noise_prologue(mesh_key: &[u8; 32]) -> Vec<u8> {
    blake3::derive_key("meshfs 2026-12 noise prologue v1", mesh_key).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_disk_with_private_modes() {
        let d = tempfile::tempdir().unwrap();
        let s = MeshState::create("a", DeviceId::generate(), Keypair::generate_ed25519());
        s.save(d.path()).unwrap();
        let back = MeshState::load(d.path()).unwrap();
        assert_eq!(back.mesh_key, s.mesh_key);
        assert_eq!(back.peer_id(), s.peer_id());
        assert_eq!(back.members, s.members);
        for f in [IDENTITY, MESH_KEY, MEMBERS] {
            let mode = std::fs::metadata(d.path().join(DIR).join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // A damaged key file is an error naming the file, not a panic.
        std::fs::write(d.path().join(DIR).join(MESH_KEY), "garbage").unwrap();
        let err = MeshState::load(d.path()).unwrap_err().to_string();
        assert!(err.contains("mesh.key"), "{err}");
    }
}
