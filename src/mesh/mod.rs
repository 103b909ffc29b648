//! The mesh: devices talking over libp2p (the only module that imports it).
//! One actor task owns the Swarm (`swarm`); `MeshClient` is its cloneable
//! handle. Transport: TCP, wrapped in the private-network layer keyed by the
//! mesh key, then Noise XX (device identity) and Yamux. Behaviours: an
//! allow list that follows the member list, identify, ping (RTT per peer),
//! mDNS, Kademlia (provider records per resource), the chunk and
//! availability request-response protocols, and gossipsub (availability and
//! member list). Joining a mesh runs outside libp2p (`join`), over a Noise
//! handshake keyed by the invite code. Every wire message is in `protocol`.

mod codec;
pub mod delay;
pub mod join;
pub mod members;
pub mod protocol;
pub mod state;
mod swarm;
pub mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::ids::{ChunkHash, DeviceId, ResourceId};
use crate::storage::ChunkStore;
use protocol::{ChunkRequest, ChunkResponse, Load, Member, MAX_PIECE};
pub use state::MeshState;
pub use swarm::HoldingsFn;

/// Largest chunk accepted from a peer: the largest chunk_max Config allows.
pub const MAX_CHUNK: u32 = 16 << 20;
/// Depth of the actor's command queue.
const COMMAND_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh state: {0}")]
    State(String),
    #[error("mesh transport: {0}")]
    Transport(String),
    #[error("mesh listen address {0}")]
    Listen(String),
    #[error("no device {0} in the mesh")]
    UnknownDevice(String),
    #[error("membership: {0}")]
    Membership(String),
    #[error("peer: {0}")]
    Peer(String),
    #[error("chunk {hash} from {device} failed BLAKE3 verification")]
    Corrupt { hash: ChunkHash, device: String },
    #[error("no device could supply chunk {hash}: {last}")]
    Unavailable { hash: ChunkHash, last: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("invite: {0}")]
    Invite(String),
    #[error("join: {0}")]
    Join(String),
    #[error("the mesh subsystem has stopped")]
    Stopped,
    #[error("local store: {0}")]
    Store(#[from] crate::storage::StorageError),
}

impl MeshError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        MeshError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Checks a listen address: an IP and a TCP port, as a multiaddr.
pub fn check_listen(listen: &str) -> Result<(), String> {
    let bad =
        || format!("listen must be a multiaddr such as /ip4/0.0.0.0/tcp/4001, not {listen:?}");
    let addr: libp2p::Multiaddr = listen.parse().map_err(|_| bad())?;
    let mut it = addr.iter();
    match (it.next(), it.next(), it.next()) {
        (
            Some(libp2p::multiaddr::Protocol::Ip4(_) | libp2p::multiaddr::Protocol::Ip6(_)),
            Some(libp2p::multiaddr::Protocol::Tcp(_)),
            None,
        ) => Ok(()),
        _ => Err(bad()),
    }
}

/// The listen address with a free TCP port in place of port 0 (the port is
/// probed by binding it, so it is free now, not reserved).
pub fn fix_listen_port(listen: &str) -> Result<String, MeshError> {
    check_listen(listen).map_err(MeshError::Listen)?;
    let addr: libp2p::Multiaddr = listen
        .parse()
        .map_err(|e| MeshError::Listen(format!("{listen}: {e}")))?;
    let mut out = libp2p::Multiaddr::empty();
    let mut ip = None;
    for p in addr.iter() {
        match p {
            libp2p::multiaddr::Protocol::Ip4(a) => {
                ip = Some(std::net::IpAddr::V4(a));
                out.push(p);
            }
            libp2p::multiaddr::Protocol::Ip6(a) => {
                ip = Some(std::net::IpAddr::V6(a));
                out.push(p);
            }
            libp2p::multiaddr::Protocol::Tcp(0) => {
                let ip = ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                let port = std::net::TcpListener::bind((ip, 0))
                    .and_then(|l| l.local_addr())
                    .map_err(|e| MeshError::Listen(format!("{listen}: {e}")))?
                    .port();
                out.push(libp2p::multiaddr::Protocol::Tcp(port));
            }
            other => out.push(other),
        }
    }
    Ok(out.to_string())
}

/// The TCP port of a listen address (0 when it has none).
pub fn listen_port(listen: &str) -> u16 {
    listen
        .parse::<libp2p::Multiaddr>()
        .ok()
        .and_then(|a| {
            a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                _ => None,
            })
        })
        .unwrap_or(0)
}

/// What the mesh needs from Config.
#[derive(Debug, Clone)]
pub struct MeshSettings {
    pub data_dir: PathBuf,
    pub listen: String,
    pub mdns: bool,
    /// Longest wait for one piece from one peer before trying the next.
    pub fetch_timeout: Duration,
    /// Period of availability and load announcements.
    pub announce_every: Duration,
    /// Pieces in flight per fetch: enough to fill a fast link, few enough
    /// that one big transfer does not crowd out everyone else's.
    pub fetch_window: usize,
}

/// One device as `meshfs status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    #[serde(serialize_with = "hex_id")]
    pub id: DeviceId,
    pub peer: String,
    pub up: bool,
    pub rtt_ms: Option<f64>,
    pub bad_chunks: u64,
    pub holdings: usize,
    pub held_bytes: u64,
    pub load: Load,
    pub last_announce_s: Option<f64>,
    pub addrs: Vec<String>,
}

fn hex_id<S: serde::Serializer>(id: &DeviceId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    pub peer: String,
    pub listen: Vec<String>,
    pub devices: Vec<DeviceStatus>,
    pub refused_connections: u64,
}

/// The handle every other subsystem uses to reach the mesh.
#[derive(Clone)]
pub struct MeshClient {
    tx: mpsc::Sender<swarm::Command>,
    store: Arc<dyn ChunkStore>,
    changed: Arc<Notify>,
    settings: Arc<MeshSettings>,
    me: DeviceId,
    /// Handed to devices that join through an invite of ours.
    pub(crate) mesh_key: [u8; 32],
}

/// Starts the mesh actor on the current tokio runtime.
pub fn start(
    settings: MeshSettings,
    state: MeshState,
    store: Arc<dyn ChunkStore>,
    holdings: HoldingsFn,
) -> Result<MeshClient, MeshError> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let mesh_key = state.mesh_key;
    let changed = Arc::new(Notify::new());
    let me = state
        .members
        .get(&state.peer_id().to_string())
        .map(|m| m.device)
        .ok_or_else(|| MeshError::State("this device is not in its own member list".into()))?;
    let actor = swarm::Actor::new(
        &settings,
        state,
        store.clone(),
        holdings,
        changed.clone(),
        rx,
        tx.clone(),
    )?;
    tokio::spawn(actor.run());
    Ok(MeshClient {
        tx,
        store,
        changed,
        settings: Arc::new(settings),
        me,
        mesh_key,
    })
}

impl MeshClient {
    pub fn device(&self) -> DeviceId {
        self.me
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> swarm::Command,
    ) -> Result<T, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| MeshError::Stopped)?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Tells the mesh that this device's holdings changed (a commit, an
    /// unlink): an announcement follows at once instead of at the next tick.
    pub fn holdings_changed(&self) {
        self.changed.notify_one();
    }

    pub async fn status(&self) -> Result<MeshStatus, MeshError> {
        self.ask(swarm::Command::Status).await
    }

    /// The member list and this device's listen addresses (for invites).
    pub async fn members(&self) -> Result<(members::Members, Vec<libp2p::Multiaddr>), MeshError> {
        self.ask(swarm::Command::Members).await
    }

    pub async fn add_member(&self, m: Member) -> Result<(), MeshError> {
        self.ask(|r| swarm::Command::AddMember(m, r)).await?
    }

    pub async fn remove_member(&self, name: &str) -> Result<Member, MeshError> {
        let name = name.to_string();
        self.ask(|r| swarm::Command::RemoveMember(name, r)).await?
    }

    /// Other members that are connected, nearest (lowest RTT) first: whom
    /// to ask for a chunk when nothing better is known.
    pub async fn nearest_devices(&self) -> Result<Vec<DeviceId>, MeshError> {
        let st = self.status().await?;
        let mut up: Vec<&DeviceStatus> = st
            .devices
            .iter()
            .filter(|d| d.up && d.id != self.me)
            .collect();
        up.sort_by(|a, b| {
            let (x, y) = (a.rtt_ms.unwrap_or(f64::MAX), b.rtt_ms.unwrap_or(f64::MAX));
            x.total_cmp(&y)
        });
        Ok(up.into_iter().map(|d| d.id).collect())
    }

    /// Devices that announced a provider record for `resource` (Kademlia).
    pub async fn find_holders(&self, resource: ResourceId) -> Result<Vec<DeviceId>, MeshError> {
        self.ask(|r| swarm::Command::FindHolders(resource, r)).await
    }

    /// One chunk from the first of `holders` that supplies it intact; it is
    /// verified against its hash and stored in the local cache. A holder
    /// that sends bad bytes is recorded and the next one is tried; a holder
    /// that does not answer within the fetch timeout is skipped.
    pub async fn fetch_chunk(
        &self,
        hash: ChunkHash,
        holders: &[DeviceId],
    ) -> Result<Vec<u8>, MeshError> {
        let mut last = String::from("no holders given");
        for &device in holders.iter().filter(|d| **d != self.me) {
            match self.fetch_from(device, hash).await {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::debug!(chunk = %hash.fmt_short(), %device, error = %e, "fetch failed; trying the next holder");
                    last = e.to_string();
                }
            }
        }
        Err(MeshError::Unavailable { hash, last })
    }

    async fn fetch_from(&self, device: DeviceId, hash: ChunkHash) -> Result<Vec<u8>, MeshError> {
        let mut data: Vec<u8> = Vec::new();
        let mut expected_total = None;
        loop {
            let req = ChunkRequest {
                hash,
                offset: data.len() as u32,
                len: MAX_PIECE,
            };
            let timeout = self.settings.fetch_timeout;
            let resp = tokio::time::timeout(
                timeout,
                self.ask(|reply| swarm::Command::Fetch { device, req, reply }),
            )
            .await
            .map_err(|_| MeshError::Timeout(timeout))???;
            match resp {
                ChunkResponse::Data { total, bytes } => {
                    if total > MAX_CHUNK {
                        return Err(MeshError::Peer(format!(
                            "{device} claims a chunk of {total} bytes"
                        )));
                    }
                    if data.is_empty() {
                        expected_total = Some(total);
                        data.reserve_exact(total as usize);
                    }
                    // Every piece but the last is full: a peer dribbling
                    // bytes (or changing the length) is cut off at once.
                    let want = MAX_PIECE.min(total.saturating_sub(data.len() as u32));
                    if expected_total != Some(total) || bytes.len() as u32 != want {
                        return Err(MeshError::Peer(format!(
                            "{device} sent a piece of {} bytes where {want} were due",
                            bytes.len()
                        )));
                    }
                    data.extend_from_slice(&bytes);
                    if data.len() as u32 >= total {
                        break;
                    }
                }
                ChunkResponse::NotFound => {
                    return Err(MeshError::Peer(format!("{device} does not hold the chunk")))
                }
                ChunkResponse::Refused(why) => {
                    return Err(MeshError::Peer(format!("{device} refused: {why}")))
                }
            }
        }
        if ChunkHash::of(&data) != hash {
            tracing::warn!(%device, chunk = %hash, "peer sent bytes that fail BLAKE3 verification");
            let _ = self.tx.send(swarm::Command::BadBytes(device)).await;
            return Err(MeshError::Corrupt {
                hash,
                device: device.to_string(),
            });
        }
        let store = self.store.clone();
        let (stored, data) = tokio::task::spawn_blocking(move || {
            let r = store.put_cached(&data);
            (r, data)
        })
        .await
        .map_err(|e| MeshError::State(e.to_string()))?;
        stored?;
        Ok(data)
    }

    /// Fetches `hashes` in order, handing each chunk to `sink` as soon as it
    /// and all before it are here (a reader streams the file instead of
    /// waiting for all of it). Chunks in flight start at `START_WINDOW` and
    /// double with every chunk delivered, up to `fetch_window`: the first
    /// chunks then get the link to themselves instead of sharing it with a
    /// full window, which keeps the first byte one round trip away.
    pub async fn fetch_stream(
        &self,
        hashes: Vec<ChunkHash>,
        holders: Vec<DeviceId>,
        mut sink: impl FnMut(usize, Vec<u8>) -> Result<(), MeshError>,
    ) -> Result<FetchReport, MeshError> {
        const START_WINDOW: usize = 2;
        let start = Instant::now();
        let mut first = None;
        let mut bytes = 0u64;
        let holders = Arc::new(holders);
        let max = self.settings.fetch_window.max(1);
        let mut window = START_WINDOW.min(max);
        let mut todo = hashes.into_iter();
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut i = 0;
        loop {
            while in_flight.len() < window {
                let Some(h) = todo.next() else { break };
                let holders = holders.clone();
                in_flight.push_back(async move { self.fetch_chunk(h, &holders).await });
            }
            let Some(r) = in_flight.next().await else {
                break;
            };
            let data = r?;
            first.get_or_insert_with(|| start.elapsed());
            bytes += data.len() as u64;
            sink(i, data)?;
            i += 1;
            window = (window * 2).min(max);
        }
        Ok(FetchReport {
            chunks: i,
            bytes,
            first_chunk: first,
            total: start.elapsed(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub chunks: usize,
    pub bytes: u64,
    pub first_chunk: Option<Duration>,
    pub total: Duration,
}
