//! The mesh: devices talking over libp2p (the only module that imports it).
//! One actor task owns the Swarm (`swarm`); `MeshClient` is its cloneable
//! handle. Transport: TCP, then Noise XX (device identity; its prologue is
//! derived from the mesh key, so only members complete a handshake) and
//! Yamux. Behaviours: an allow list that follows the member list,
//! identify, ping (RTT per peer), mDNS, Kademlia (provider records per
//! resource), the chunk and availability request-response protocols, and
//! gossipsub (availability and member list). Joining a mesh runs outside libp2p (`join`), over a Noise
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

use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};
use crate::storage::ChunkStore;
use protocol::{ChunkRequest, Load, Member, Piece, PieceRequest, MAX_PIECE};
pub use state::{noise_prologue, MeshState};
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
    /// How fast its chunk answers arrived here (None: not measured yet).
    pub throughput_mib_s: Option<f64>,
    /// Chunk requests to it that failed (timeouts, refusals, cut-offs).
    pub failed_requests: u64,
    /// Bytes of chunks it sent here since this daemon started.
    pub received_bytes: u64,
    pub holdings: usize,
    pub held_bytes: u64,
    pub load: Load,
    pub last_announce_s: Option<f64>,
    pub addrs: Vec<String>,
}

fn hex_id<S: serde::Serializer>(id: &DeviceId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

/// A connected member, as source choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearby {
    pub device: DeviceId,
    /// Smoothed RTT in milliseconds (`f64::MAX` where none is measured).
    pub rtt_ms: f64,
    /// Chunks it sent that failed verification.
    pub bad_chunks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    pub peer: String,
    pub listen: Vec<String>,
    pub devices: Vec<DeviceStatus>,
    pub refused_connections: u64,
}

/// A Raft request from a member, for `raft/` to answer through `reply`.
/// Dropping `reply` fails the caller's request.
pub struct RaftInbound {
    pub from: DeviceId,
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// Told of the bytes this device served of a file (the asker named it).
pub type ServedFn = Box<dyn Fn(ResourceId, u64) + Send + Sync>;

/// "This device's holdings changed": wakes the mesh actor once per holdings
/// listing, not once per namespace change (a burst of creates woke it for
/// every file).
#[derive(Default)]
pub(crate) struct Changed {
    pub(crate) notify: Notify,
    dirty: std::sync::atomic::AtomicBool,
    /// Where served bytes are reported (set once by the daemon).
    pub(crate) served: std::sync::OnceLock<ServedFn>,
}

impl Changed {
    fn mark(&self) {
        if !self.dirty.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// A listing starts: changes from here on mark again.
    pub(crate) fn take(&self) {
        self.dirty
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Whether a change came after the last listing started.
    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The handle every other subsystem uses to reach the mesh.
#[derive(Clone)]
pub struct MeshClient {
    tx: mpsc::Sender<swarm::Command>,
    store: Arc<dyn ChunkStore>,
    changed: Arc<Changed>,
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
    let changed = Arc::new(Changed::default());
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
        self.changed.mark();
    }

    /// Sets where the bytes this device serves of each file are reported
    /// (once): the authority policy counts them as usage.
    pub fn set_served(&self, f: ServedFn) {
        let _ = self.changed.served.set(f);
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

    /// Sends one Raft frame to `device` and waits for its answer, at most
    /// `timeout`.
    pub async fn raft_call(
        &self,
        device: DeviceId,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, MeshError> {
        let call = self.ask(|reply| swarm::Command::RaftCall {
            device,
            bytes,
            reply,
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r?,
            Err(_) => Err(MeshError::Timeout(timeout)),
        }
    }

    /// Routes Raft requests from members to `inbox` from now on.
    pub async fn set_raft_inbox(&self, inbox: mpsc::Sender<RaftInbound>) -> Result<(), MeshError> {
        self.tx
            .send(swarm::Command::SetRaftInbox(inbox))
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// Publishes a batch of access events to every member (best effort: a
    /// full command queue drops it rather than wait).
    pub fn publish_access(&self, bytes: Vec<u8>) {
        if self
            .tx
            .try_send(swarm::Command::PublishAccess(bytes))
            .is_err()
        {
            tracing::debug!("access events not published: the mesh is busy");
        }
    }

    /// Routes access-event batches from members, with their sender, to
    /// `inbox` from now on.
    pub async fn set_access_inbox(
        &self,
        inbox: mpsc::Sender<(DeviceId, Vec<u8>)>,
    ) -> Result<(), MeshError> {
        self.tx
            .send(swarm::Command::SetAccessInbox(inbox))
            .await
            .map_err(|_| MeshError::Stopped)
    }

    /// A key derived from the mesh key for `context`: the same on every
    /// member, useless outside the mesh (the access log hashes user names
    /// with it).
    pub fn derive_key(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.mesh_key)
    }

    /// Every current member as (name, device id).
    pub async fn member_devices(&self) -> Result<Vec<(String, DeviceId)>, MeshError> {
        let (members, _) = self.members().await?;
        Ok(members.iter().map(|m| (m.name.clone(), m.device)).collect())
    }

    /// Other members that are connected, nearest (lowest RTT) first: whom
    /// to ask for a chunk when nothing better is known.
    pub async fn nearest_devices(&self) -> Result<Vec<DeviceId>, MeshError> {
        Ok(self.nearby().await?.into_iter().map(|n| n.device).collect())
    }

    /// [`MeshClient::nearest_devices`] with what source choice weighs.
    pub async fn nearby(&self) -> Result<Vec<Nearby>, MeshError> {
        let st = self.status().await?;
        let mut up: Vec<Nearby> = st
            .devices
            .iter()
            .filter(|d| d.up && d.id != self.me)
            .map(|d| Nearby {
                device: d.id,
                rtt_ms: d.rtt_ms.unwrap_or(f64::MAX),
                bad_chunks: d.bad_chunks,
            })
            .collect();
        up.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
        Ok(up)
    }

    /// For each of `resources`, the other devices whose availability
    /// announcements say they hold a complete copy.
    pub async fn holders(
        &self,
        resources: Vec<ResourceId>,
    ) -> Result<Vec<Vec<DeviceId>>, MeshError> {
        self.ask(|r| swarm::Command::Holders(resources, r)).await
    }

    /// The other devices whose availability announcements say they hold a
    /// complete copy of `version` of `resource`.
    pub async fn holders_at(
        &self,
        resource: ResourceId,
        version: VersionId,
    ) -> Result<Vec<DeviceId>, MeshError> {
        self.ask(|r| swarm::Command::HoldersAt(resource, version, r))
            .await
    }

    /// Devices that announced a provider record for `resource` (Kademlia).
    pub async fn find_holders(&self, resource: ResourceId) -> Result<Vec<DeviceId>, MeshError> {
        self.ask(|r| swarm::Command::FindHolders(resource, r)).await
    }

    /// One chunk from the first of `holders` that supplies it intact; it is
    /// verified against its hash and stored in the local cache. A holder
    /// that sends bad bytes is recorded and the next one is tried; a holder
    /// that does not answer within the fetch timeout is skipped. `resource`
    /// names the file the chunk belongs to, when known (the serving device
    /// counts what it serves per file).
    pub async fn fetch_chunk(
        &self,
        hash: ChunkHash,
        holders: &[DeviceId],
        resource: Option<ResourceId>,
    ) -> Result<Vec<u8>, MeshError> {
        let mut last = String::from("no holders given");
        for &device in holders.iter().filter(|d| **d != self.me) {
            match self.fetch_from(device, hash, resource).await {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::debug!(chunk = %hash.fmt_short(), %device, error = %e, "fetch failed; trying the next holder");
                    last = e.to_string();
                }
            }
        }
        Err(MeshError::Unavailable { hash, last })
    }

    async fn fetch_from(
        &self,
        device: DeviceId,
        hash: ChunkHash,
        resource: Option<ResourceId>,
    ) -> Result<Vec<u8>, MeshError> {
        self.fetch_batch(device, &[hash], resource)
            .await
            .pop()
            .unwrap_or(Err(MeshError::Stopped))
    }

    /// One request for several chunks from one device; one result per hash.
    /// Pieces the device deferred are asked for again; a chunk larger than
    /// one piece continues on its own.
    async fn fetch_batch(
        &self,
        device: DeviceId,
        hashes: &[ChunkHash],
        resource: Option<ResourceId>,
    ) -> Vec<Result<Vec<u8>, MeshError>> {
        let mut out: Vec<Option<Result<Vec<u8>, MeshError>>> =
            (0..hashes.len()).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..hashes.len()).collect();
        while !todo.is_empty() {
            let req = ChunkRequest {
                pieces: todo
                    .iter()
                    .map(|&i| PieceRequest {
                        hash: hashes[i],
                        offset: 0,
                        len: MAX_PIECE,
                    })
                    .collect(),
                resource,
            };
            let refuse_all =
                |why: String| todo.iter().map(|_| Piece::Refused(why.clone())).collect();
            let pieces = match self.request(device, req).await {
                Ok(p) if p.len() == todo.len() => p,
                Ok(_) => refuse_all("answered a different number of pieces".to_string()),
                Err(e) => refuse_all(e.to_string()),
            };
            let mut deferred = Vec::new();
            for (&i, p) in todo.iter().zip(pieces) {
                let r = match p {
                    Piece::Deferred => {
                        deferred.push(i);
                        continue;
                    }
                    Piece::Data { total, bytes } => {
                        self.complete(device, hashes[i], total, bytes, resource)
                            .await
                    }
                    Piece::NotFound => {
                        Err(MeshError::Peer(format!("{device} does not hold the chunk")))
                    }
                    Piece::Refused(why) => Err(MeshError::Peer(format!("{device}: {why}"))),
                };
                out[i] = Some(r);
            }
            if !deferred.is_empty() {
                tracing::debug!(%device, deferred = deferred.len(), "pieces deferred; asking again");
            }
            // The first piece of every response is served, so each round
            // makes progress; a peer deferring everything is cut off.
            if deferred.len() == todo.len() {
                for i in deferred {
                    out[i] = Some(Err(MeshError::Peer(format!(
                        "{device} deferred every piece"
                    ))));
                }
                break;
            }
            todo = deferred;
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(MeshError::Stopped)))
            .collect()
    }

    /// Sends one chunk request and waits for its answer, within the fetch
    /// timeout. The answer's size and time go into the device's record
    /// (throughput, failures), which source choice weighs.
    async fn request(&self, device: DeviceId, req: ChunkRequest) -> Result<Vec<Piece>, MeshError> {
        let timeout = self.settings.fetch_timeout;
        let started = Instant::now();
        let resp = tokio::time::timeout(
            timeout,
            self.ask(|reply| swarm::Command::Fetch { device, req, reply }),
        )
        .await
        .map_err(|_| MeshError::Timeout(timeout))
        .and_then(|r| r)
        .and_then(|r| r);
        let bytes = resp.as_ref().map_or(0, |r| {
            r.pieces
                .iter()
                .map(|p| match p {
                    Piece::Data { bytes, .. } => bytes.len() as u64,
                    _ => 0,
                })
                .sum()
        });
        // Best effort: a full command queue loses one observation.
        let _ = self.tx.try_send(swarm::Command::Transfer {
            device,
            bytes,
            took: started.elapsed(),
            ok: resp.is_ok(),
        });
        Ok(resp?.pieces)
    }

    /// Which of `hashes` `device` holds, by asking for one byte of each (16
    /// to a request). A chunk the device could not be asked about counts as
    /// not held.
    pub async fn probe(&self, device: DeviceId, hashes: &[ChunkHash]) -> Vec<bool> {
        let mut out = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(protocol::MAX_BATCH) {
            let req = ChunkRequest {
                pieces: batch
                    .iter()
                    .map(|h| PieceRequest {
                        hash: *h,
                        offset: 0,
                        len: 1,
                    })
                    .collect(),
                resource: None,
            };
            match self.request(device, req).await {
                Ok(pieces) if pieces.len() == batch.len() => {
                    out.extend(pieces.iter().map(|p| matches!(p, Piece::Data { .. })))
                }
                _ => out.extend(batch.iter().map(|_| false)),
            }
        }
        out
    }

    /// Takes a chunk's first piece, fetches the rest when it is larger than
    /// one piece, verifies it and stores it in the local cache.
    async fn complete(
        &self,
        device: DeviceId,
        hash: ChunkHash,
        total: u32,
        first: Vec<u8>,
        resource: Option<ResourceId>,
    ) -> Result<Vec<u8>, MeshError> {
        if total > MAX_CHUNK {
            return Err(MeshError::Peer(format!(
                "{device} claims a chunk of {total} bytes"
            )));
        }
        let mut data = first;
        data.reserve_exact((total as usize).saturating_sub(data.len()));
        let mut piece_total = total;
        let mut bytes = std::mem::take(&mut data);
        loop {
            // Every piece but the last is full: a peer dribbling bytes (or
            // changing the length) is cut off at once.
            let want = MAX_PIECE.min(total.saturating_sub(data.len() as u32));
            if piece_total != total || bytes.len() as u32 != want {
                return Err(MeshError::Peer(format!(
                    "{device} sent a piece of {} bytes where {want} were due",
                    bytes.len()
                )));
            }
            if data.is_empty() {
                data = bytes;
            } else {
                data.extend_from_slice(&bytes);
            }
            if data.len() as u32 >= total {
                break;
            }
            let req = ChunkRequest {
                pieces: vec![PieceRequest {
                    hash,
                    offset: data.len() as u32,
                    len: MAX_PIECE,
                }],
                resource,
            };
            match self.request(device, req).await?.pop() {
                Some(Piece::Data { total: t, bytes: b }) => {
                    piece_total = t;
                    bytes = b;
                }
                Some(Piece::Refused(why)) => {
                    return Err(MeshError::Peer(format!("{device}: {why}")))
                }
                _ => {
                    return Err(MeshError::Peer(format!(
                        "{device} stopped serving the chunk mid-way"
                    )))
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

    /// Several chunks, in order: one batch from the first holder, then each
    /// chunk it could not supply from the others, one by one.
    async fn fetch_many(
        &self,
        hashes: Vec<ChunkHash>,
        holders: &[DeviceId],
        resource: Option<ResourceId>,
    ) -> Result<Vec<Vec<u8>>, MeshError> {
        let holders: Vec<DeviceId> = holders.iter().copied().filter(|d| *d != self.me).collect();
        let Some(&first) = holders.first() else {
            return Err(MeshError::Unavailable {
                hash: hashes.first().copied().unwrap_or_else(ChunkHash::zero_run),
                last: "no holders given".into(),
            });
        };
        let got = self.fetch_batch(first, &hashes, resource).await;
        let mut out = Vec::with_capacity(hashes.len());
        for (hash, r) in hashes.into_iter().zip(got) {
            match r {
                Ok(d) => out.push(d),
                Err(e) if holders.len() == 1 => {
                    return Err(MeshError::Unavailable {
                        hash,
                        last: e.to_string(),
                    })
                }
                Err(e) => {
                    tracing::debug!(chunk = %hash.fmt_short(), device = %first, error = %e, "fetch failed; trying the next holder");
                    out.push(self.fetch_chunk(hash, &holders[1..], resource).await?);
                }
            }
        }
        Ok(out)
    }

    /// Fetches `hashes` in order, handing each chunk to `sink` as soon as it
    /// and all before it are here (a reader streams the file instead of
    /// waiting for all of it). Chunks in flight start at 2 and double with
    /// every batch delivered, up to `fetch_window`: the first chunks get the
    /// link to themselves, so the first byte is one round trip away.
    ///
    /// Batches: on a short round trip (LAN, loopback) the cost per request
    /// dominates, so batches grow with the window up to `MAX_BATCH` chunks.
    /// On a long one, a batch would outgrow what one Yamux stream may have
    /// in flight (256 KiB a round trip; our streams are too short-lived for
    /// Yamux to widen that), so each chunk gets its own stream.
    pub async fn fetch_stream(
        &self,
        hashes: Vec<ChunkHash>,
        holders: Vec<DeviceId>,
        resource: Option<ResourceId>,
        sink: impl FnMut(usize, Vec<u8>) -> Result<(), MeshError>,
    ) -> Result<FetchReport, MeshError> {
        self.fetch_stream_from(2, hashes, holders, resource, sink)
            .await
    }

    /// [`MeshClient::fetch_stream`] with `window` chunks in flight from the
    /// start: for a reader already streaming the file (readahead), whose
    /// first bytes are not waited on.
    pub async fn fetch_stream_from(
        &self,
        window: usize,
        hashes: Vec<ChunkHash>,
        holders: Vec<DeviceId>,
        resource: Option<ResourceId>,
        mut sink: impl FnMut(usize, Vec<u8>) -> Result<(), MeshError>,
    ) -> Result<FetchReport, MeshError> {
        const SHORT_RTT_MS: f64 = 5.0;
        let start = Instant::now();
        let mut first = None;
        let mut bytes = 0u64;
        let max = self.settings.fetch_window.max(1);
        let mut window = window.clamp(1, max);
        let rtt = match (holders.iter().find(|d| **d != self.me), self.status().await) {
            (Some(d), Ok(st)) => st
                .devices
                .iter()
                .find(|x| x.id == *d)
                .and_then(|x| x.rtt_ms),
            _ => None,
        };
        let max_batch = if rtt.is_some_and(|r| r <= SHORT_RTT_MS) {
            protocol::MAX_BATCH
        } else {
            1
        };
        let mut todo = hashes.into_iter().peekable();
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut flying = 0;
        let mut i = 0;
        loop {
            while flying < window && todo.peek().is_some() {
                let batch = (window / 4).clamp(1, max_batch);
                let take: Vec<ChunkHash> = todo.by_ref().take(batch).collect();
                flying += take.len();
                let holders = &holders;
                in_flight.push_back(async move {
                    let n = take.len();
                    (n, self.fetch_many(take, holders, resource).await)
                });
            }
            let Some((n, r)) = in_flight.next().await else {
                break;
            };
            flying -= n;
            for data in r? {
                first.get_or_insert_with(|| start.elapsed());
                bytes += data.len() as u64;
                sink(i, data)?;
                i += 1;
            }
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
