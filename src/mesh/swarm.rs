//! The swarm actor: one tokio task owns the libp2p Swarm and everything
//! only it may touch (the peer table, pending requests, the availability
//! view, the member list). Everyone else talks to it through `MeshClient`
//! over a bounded channel. Serving a chunk reads the store on the blocking
//! pool and hands the answer back through the same channel, so the event
//! loop never waits on disk.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{DialError, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, gossipsub, identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm, Transport,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::codec::{AvailCodec, ChunkCodec, RaftCodec};
use super::protocol::{
    self, Announcement, AvailRequest, AvailResponse, ChunkRequest, ChunkResponse, Holding, Load,
    Member, Piece, PieceRequest, MAX_PIECE, MAX_RESPONSE,
};
use super::state::MeshState;
use super::view::{Applied, Outbox, View};
use super::{DeviceStatus, MeshError, MeshSettings, MeshStatus, RaftInbound};
use crate::ids::{DeviceId, ResourceId, VersionId};
use crate::storage::ChunkStore;

/// Chunk requests served at once; more wait in a queue of `MAX_QUEUE`,
/// beyond which a request is refused as busy (the asker tries elsewhere).
const SERVE_SLOTS: usize = 16;
const MAX_QUEUE: u32 = 512;
/// How often members that are not connected are dialled again.
const REDIAL: Duration = Duration::from_secs(3);
/// Provider records started per round, and how often a backlog of them is
/// worked off: each starts a Kademlia query (a few streams to peers).
const PROVIDE_PER_ROUND: usize = 32;
const PROVIDE_EVERY: Duration = Duration::from_millis(250);
/// How often the member list is gossiped even without a change (it heals
/// partitions and devices that were down).
const MEMBERS_EVERY: Duration = Duration::from_secs(20);

/// What the actor can be asked.
pub(crate) enum Command {
    Fetch {
        device: DeviceId,
        req: ChunkRequest,
        reply: oneshot::Sender<Result<ChunkResponse, MeshError>>,
    },
    Respond {
        channel: ResponseChannel<ChunkResponse>,
        resp: ChunkResponse,
    },
    /// A holdings listing and how long it took.
    Holdings(BTreeMap<ResourceId, Holding>, Duration),
    Status(oneshot::Sender<MeshStatus>),
    Members(oneshot::Sender<(super::members::Members, Vec<Multiaddr>)>),
    AddMember(Member, oneshot::Sender<Result<(), MeshError>>),
    RemoveMember(String, oneshot::Sender<Result<Member, MeshError>>),
    BadBytes(DeviceId),
    /// One chunk request to a device finished (see `Peer::observe`).
    Transfer {
        device: DeviceId,
        bytes: u64,
        took: Duration,
        ok: bool,
    },
    FindHolders(ResourceId, oneshot::Sender<Vec<DeviceId>>),
    /// For each resource, the other devices whose announcements say they
    /// hold all of it.
    Holders(Vec<ResourceId>, oneshot::Sender<Vec<Vec<DeviceId>>>),
    HoldersAt(ResourceId, VersionId, oneshot::Sender<Vec<DeviceId>>),
    RaftCall {
        device: DeviceId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, MeshError>>,
    },
    RaftRespond {
        channel: ResponseChannel<Vec<u8>>,
        bytes: Vec<u8>,
    },
    SetRaftInbox(mpsc::Sender<RaftInbound>),
    /// Publishes a batch of access events on the access topic.
    PublishAccess(Vec<u8>),
    SetAccessInbox(mpsc::Sender<(DeviceId, Vec<u8>)>),
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    chunk: request_response::Behaviour<ChunkCodec>,
    avail: request_response::Behaviour<AvailCodec>,
    raft: request_response::Behaviour<RaftCodec>,
    gossip: gossipsub::Behaviour,
}

#[derive(Debug, Default)]
struct Peer {
    connections: usize,
    rtt: Option<Duration>,
    /// Chunks this peer sent that failed verification.
    bad_chunks: u64,
    /// Bytes per second its answers arrived at (moving average over
    /// answers big enough to measure; None: none yet).
    throughput: Option<f64>,
    /// Chunk requests to it that failed: timed out, refused, cut off.
    failed_requests: u64,
    /// Bytes of chunks it sent here.
    received: u64,
}

/// Answers smaller than this say more about the round trip than about the
/// bandwidth, so they do not move the throughput estimate.
const THROUGHPUT_MIN_BYTES: u64 = 64 << 10;

impl Peer {
    fn observe(&mut self, bytes: u64, took: Duration, ok: bool) {
        if !ok {
            self.failed_requests += 1;
            return;
        }
        self.received += bytes;
        if bytes < THROUGHPUT_MIN_BYTES {
            return;
        }
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6);
        self.throughput = Some(match self.throughput {
            Some(old) => old * 0.7 + rate * 0.3,
            None => rate,
        });
    }
}

/// Function giving this device's current holdings (runs on the blocking pool).
pub type HoldingsFn = Arc<dyn Fn() -> BTreeMap<ResourceId, Holding> + Send + Sync>;

pub(crate) struct Actor {
    swarm: Swarm<Behaviour>,
    cmds: mpsc::Receiver<Command>,
    cmd_tx: mpsc::Sender<Command>,
    state: MeshState,
    data_dir: PathBuf,
    me: DeviceId,
    peer_id: PeerId,
    peers: HashMap<PeerId, Peer>,
    pending_chunks: HashMap<OutboundRequestId, oneshot::Sender<Result<ChunkResponse, MeshError>>>,
    pending_avail: HashMap<OutboundRequestId, DeviceId>,
    pending_raft: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>, MeshError>>>,
    /// Where Raft requests from members go (set once Raft starts).
    raft_inbox: Option<mpsc::Sender<RaftInbound>>,
    access_inbox: Option<mpsc::Sender<(DeviceId, Vec<u8>)>>,
    topic_access: gossipsub::IdentTopic,
    pending_providers: HashMap<kad::QueryId, (oneshot::Sender<Vec<DeviceId>>, HashSet<PeerId>)>,
    outbox: Outbox,
    view: View,
    holdings: HoldingsFn,
    holdings_running: bool,
    /// How long the last holdings listing took (it walks every file).
    holdings_took: Duration,
    provided: BTreeSet<ResourceId>,
    /// Held resources whose provider records have not started yet.
    to_provide: BTreeSet<ResourceId>,
    changed: Arc<super::Changed>,
    store: Arc<dyn ChunkStore>,
    serve_slots: Arc<Semaphore>,
    active: Arc<AtomicU32>,
    queued: Arc<AtomicU32>,
    refused: u64,
    /// Addresses whose refusal was logged as a warning already.
    refused_from: HashSet<String>,
    /// Test hook (`MESHFS_FAULT=corrupt-serve`): serve damaged chunks, as a
    /// faulty or hostile peer would, so that tests can watch the receiver
    /// reject them.
    fault_corrupt: bool,
    announce_every: Duration,
    topic_avail: gossipsub::IdentTopic,
    topic_members: gossipsub::IdentTopic,
}

impl Actor {
    /// Builds the swarm and starts listening; errors (a bad or busy listen
    /// address) are reported here, before the daemon says it is ready.
    pub(crate) fn new(
        settings: &MeshSettings,
        state: MeshState,
        store: Arc<dyn ChunkStore>,
        holdings: HoldingsFn,
        changed: Arc<super::Changed>,
        cmds: mpsc::Receiver<Command>,
        cmd_tx: mpsc::Sender<Command>,
    ) -> Result<Self, MeshError> {
        let peer_id = state.peer_id();
        let prologue = super::state::noise_prologue(&state.mesh_key);
        let delay = super::delay::from_env();
        if !delay.is_zero() {
            tracing::warn!(
                ?delay,
                "test delay line on every mesh connection (MESHFS_TEST_DELAY_MS)"
            );
        }
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(state.identity.clone())
            .with_tokio()
            .with_other_transport(|key| {
                // Noise's handshake hashes in a value only members can
                // derive: without the mesh key no handshake completes, so
                // Noise alone keeps strangers out and every byte is
                // encrypted once (the private-network layer that used to
                // wrap the socket encrypted it a second time).
                let noise = noise::Config::new(key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                    .with_prologue(prologue);
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tcp.map(move |socket, _| super::delay::Delayed::new(socket, delay))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(20)),
                )
            })
            .map_err(|e| MeshError::Transport(e.to_string()))?
            .with_behaviour(|key| build_behaviour(key, settings))
            .map_err(|e| MeshError::Transport(e.to_string()))?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(Duration::from_secs(60))
                    // Every peer is a meshfs device speaking our protocols,
                    // so a stream's protocol is proposed together with its
                    // first message instead of waiting for the answer: one
                    // round trip less for every chunk request.
                    .with_substream_upgrade_protocol_override(Version::V1Lazy)
            })
            .build();
        let listen: Multiaddr = settings
            .listen
            .parse()
            .map_err(|e| MeshError::Listen(format!("{}: {e}", settings.listen)))?;
        probe_listen(&listen)?;
        swarm
            .listen_on(listen.clone())
            .map_err(|e| MeshError::Listen(format!("{listen}: {e}")))?;
        let topic_avail = gossipsub::IdentTopic::new(protocol::TOPIC_AVAILABILITY);
        let topic_members = gossipsub::IdentTopic::new(protocol::TOPIC_MEMBERS);
        let topic_access = gossipsub::IdentTopic::new(protocol::TOPIC_ACCESS);
        let b = swarm.behaviour_mut();
        b.gossip
            .subscribe(&topic_avail)
            .and_then(|_| b.gossip.subscribe(&topic_members))
            .and_then(|_| b.gossip.subscribe(&topic_access))
            .map_err(|e| MeshError::Transport(format!("gossipsub: {e}")))?;
        b.kad.set_mode(Some(kad::Mode::Server));
        let me = state
            .members
            .get(&peer_id.to_string())
            .map(|m| m.device)
            .ok_or_else(|| MeshError::State("this device is not in its own member list".into()))?;
        let mut actor = Actor {
            swarm,
            cmds,
            cmd_tx,
            state,
            data_dir: settings.data_dir.clone(),
            me,
            peer_id,
            peers: HashMap::new(),
            pending_chunks: HashMap::new(),
            pending_avail: HashMap::new(),
            pending_raft: HashMap::new(),
            raft_inbox: None,
            access_inbox: None,
            topic_access,
            pending_providers: HashMap::new(),
            outbox: Outbox::default(),
            view: View::default(),
            holdings,
            holdings_running: false,
            holdings_took: Duration::ZERO,
            provided: BTreeSet::new(),
            to_provide: BTreeSet::new(),
            changed,
            store,
            serve_slots: Arc::new(Semaphore::new(SERVE_SLOTS)),
            active: Arc::new(AtomicU32::new(0)),
            queued: Arc::new(AtomicU32::new(0)),
            refused: 0,
            refused_from: HashSet::new(),
            fault_corrupt: std::env::var("MESHFS_FAULT").is_ok_and(|v| v == "corrupt-serve"),
            announce_every: settings.announce_every,
            topic_avail,
            topic_members,
        };
        actor.sync_allow_list();
        Ok(actor)
    }

    pub(crate) async fn run(mut self) {
        let mut announce = tokio::time::interval(self.announce_every);
        let mut redial = tokio::time::interval(REDIAL);
        let mut members = tokio::time::interval(MEMBERS_EVERY);
        let mut provide = tokio::time::interval(PROVIDE_EVERY);
        for t in [&mut announce, &mut redial, &mut members, &mut provide] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let changed = self.changed.clone();
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_event(ev),
                cmd = self.cmds.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    // Every handle is gone: the daemon is shutting down.
                    None => break,
                },
                _ = announce.tick() => self.refresh_holdings(Duration::ZERO),
                // A burst of changes (a tar extract) becomes one refresh.
                _ = changed.notify.notified() => self.refresh_holdings(change_delay(self.holdings_took)),
                _ = redial.tick() => self.redial(),
                _ = members.tick() => self.publish_members(),
                _ = provide.tick(), if !self.to_provide.is_empty() => self.provide_some(),
            }
        }
        tracing::debug!("mesh actor stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Fetch { device, req, reply } => {
                let Some(m) = self.state.members.by_device(device) else {
                    let _ = reply.send(Err(MeshError::UnknownDevice(device.to_string())));
                    return;
                };
                let Ok(peer) = m.peer.parse::<PeerId>() else {
                    let _ = reply.send(Err(MeshError::UnknownDevice(device.to_string())));
                    return;
                };
                let addrs = m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_request_with_addresses(&peer, req, addrs);
                self.pending_chunks.insert(id, reply);
            }
            Command::RaftCall {
                device,
                bytes,
                reply,
            } => {
                let Some(m) = self.state.members.by_device(device) else {
                    let _ = reply.send(Err(MeshError::UnknownDevice(device.to_string())));
                    return;
                };
                let Ok(peer) = m.peer.parse::<PeerId>() else {
                    let _ = reply.send(Err(MeshError::UnknownDevice(device.to_string())));
                    return;
                };
                let addrs = m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .raft
                    .send_request_with_addresses(&peer, bytes, addrs);
                self.pending_raft.insert(id, reply);
            }
            Command::RaftRespond { channel, bytes } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .raft
                    .send_response(channel, bytes)
                    .is_err()
                {
                    tracing::debug!("a raft response found its requester gone");
                }
            }
            Command::SetRaftInbox(tx) => self.raft_inbox = Some(tx),
            Command::SetAccessInbox(tx) => self.access_inbox = Some(tx),
            Command::PublishAccess(bytes) => {
                let topic = self.topic_access.clone();
                // No peers subscribed yet (a lone device) is not a failure:
                // the events are in this device's own log either way.
                if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, bytes) {
                    tracing::trace!(error = %e, "access events not published");
                }
            }
            Command::Respond { channel, resp } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_response(channel, resp)
                    .is_err()
                {
                    tracing::debug!("a chunk response found its requester gone");
                }
            }
            Command::Holdings(current, took) => {
                self.holdings_running = false;
                self.holdings_took = took;
                self.announce(current);
                if self.changed.is_dirty() {
                    // Changed while it was listed: list again.
                    self.refresh_holdings(change_delay(took));
                }
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Members(reply) => {
                let addrs = self.swarm.listeners().cloned().collect();
                let _ = reply.send((self.state.members.clone(), addrs));
            }
            Command::AddMember(m, reply) => {
                // Changed on a copy, so that a failed save changes nothing.
                let mut next = self.state.clone();
                let r = next
                    .members
                    .add(m.clone())
                    .map_err(MeshError::Membership)
                    .and_then(|_| next.save_members(&self.data_dir));
                if r.is_ok() {
                    self.state = next;
                    tracing::info!(device = %m.name, peer = %m.peer, "device joined the mesh");
                    self.sync_allow_list();
                    self.publish_members();
                }
                let _ = reply.send(r);
            }
            Command::RemoveMember(name, reply) => {
                let mut next = self.state.clone();
                let r = match next.members.by_name(&name) {
                    Some(m) if m.device == self.me => Err(MeshError::Membership(
                        "a device cannot remove itself; run remove-device on another member".into(),
                    )),
                    Some(_) => next
                        .members
                        .remove(&name)
                        .ok_or_else(|| MeshError::Membership(format!("no device named {name}")))
                        .and_then(|m| next.save_members(&self.data_dir).map(|_| m)),
                    None => Err(MeshError::Membership(format!(
                        "no device named {name} in the mesh"
                    ))),
                };
                if let Ok(m) = &r {
                    self.state = next;
                    tracing::info!(device = %m.name, peer = %m.peer, "device removed from the mesh");
                    self.view.forget(m.device);
                    self.sync_allow_list();
                    self.publish_members();
                }
                let _ = reply.send(r);
            }
            Command::Transfer {
                device,
                bytes,
                took,
                ok,
            } => {
                if let Some(peer) = self.peer_of(device) {
                    self.peers.entry(peer).or_default().observe(bytes, took, ok);
                }
            }
            Command::BadBytes(device) => {
                if let Some(peer) = self.peer_of(device) {
                    self.peers.entry(peer).or_default().bad_chunks += 1;
                }
            }
            Command::Holders(resources, reply) => {
                let _ = reply.send(resources.iter().map(|r| self.view.holders(*r)).collect());
            }
            Command::HoldersAt(resource, version, reply) => {
                let _ = reply.send(self.view.holders_at(resource, version));
            }
            Command::FindHolders(resource, reply) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(resource_key(resource));
                self.pending_providers.insert(id, (reply, HashSet::new()));
            }
        }
    }

    fn peer_of(&self, device: DeviceId) -> Option<PeerId> {
        self.state
            .members
            .by_device(device)
            .and_then(|m| m.peer.parse().ok())
    }

    fn device_of(&self, peer: &PeerId) -> Option<DeviceId> {
        self.state.members.get(&peer.to_string()).map(|m| m.device)
    }

    /// The allow list follows the member list: a removed device's open
    /// connections are closed at once.
    fn sync_allow_list(&mut self) {
        let members: Vec<PeerId> = self
            .state
            .members
            .iter()
            .filter_map(|m| m.peer.parse().ok())
            .filter(|p| *p != self.peer_id)
            .collect();
        let allow = &mut self.swarm.behaviour_mut().allow;
        let current: Vec<PeerId> = allow.allowed_peers().iter().copied().collect();
        for p in current {
            if !members.contains(&p) {
                allow.disallow_peer(p);
            }
        }
        for p in members {
            allow.allow_peer(p);
        }
    }

    fn redial(&mut self) {
        // A removed device would only be refused, again and again.
        if self.state.members.is_removed(&self.peer_id.to_string()) {
            return;
        }
        let targets: Vec<(PeerId, Vec<Multiaddr>)> = self
            .state
            .members
            .iter()
            .filter_map(|m| Some((m.peer.parse::<PeerId>().ok()?, m)))
            .filter(|(p, _)| *p != self.peer_id && !self.swarm.is_connected(p))
            .map(|(p, m)| (p, m.addrs.iter().filter_map(|a| a.parse().ok()).collect()))
            .collect();
        for (peer, addrs) in targets {
            if addrs.is_empty() {
                continue;
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::trace!(%peer, error = %e, "redial failed");
            }
        }
    }

    fn publish_members(&mut self) {
        let bytes = protocol::encode(&self.state.members);
        let topic = self.topic_members.clone();
        if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, bytes) {
            tracing::trace!(error = %e, "member list not published");
        }
    }

    fn refresh_holdings(&mut self, delay: Duration) {
        if self.holdings_running {
            return;
        }
        self.holdings_running = true;
        let f = self.holdings.clone();
        let tx = self.cmd_tx.clone();
        let changed = self.changed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            changed.take();
            match tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                (f(), t.elapsed())
            })
            .await
            {
                Ok((h, took)) => {
                    let _ = tx.send(Command::Holdings(h, took)).await;
                }
                Err(e) => tracing::warn!(error = %e, "listing holdings failed"),
            }
        });
    }

    /// Starts provider records for up to `PROVIDE_PER_ROUND` resources of
    /// the backlog (the `provide` tick drains the rest).
    fn provide_some(&mut self) {
        for _ in 0..PROVIDE_PER_ROUND {
            let Some(r) = self.to_provide.pop_first() else {
                break;
            };
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(resource_key(r))
            {
                tracing::debug!(error = %e, "provider record not stored");
            }
            self.provided.insert(r);
        }
    }

    fn load(&self) -> Load {
        Load {
            active_transfers: self.active.load(Ordering::Relaxed),
            queue_depth: self.queued.load(Ordering::Relaxed),
            cpu_percent: cpu_percent(),
        }
    }

    fn announce(&mut self, current: BTreeMap<ResourceId, Holding>) {
        // Provider records follow the holdings, once there is a peer to
        // tell: each new one starts a Kademlia query, which alone took
        // about 4% of a lone device's CPU while it created small files. The
        // first refresh after a peer connects (at most
        // `announce_interval_ms` later) provides everything held.
        //
        // At most `PROVIDE_PER_ROUND` new records start per refresh (the
        // rest at the next ones): a burst of thousands of small files
        // started a query each at once, which filled the connections'
        // stream limits and held up Raft's own requests for seconds.
        if self.swarm.connected_peers().next().is_some() {
            let now: BTreeSet<ResourceId> = current.keys().copied().collect();
            let gone: Vec<ResourceId> = self.provided.difference(&now).copied().collect();
            for g in gone {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .stop_providing(&resource_key(g));
                self.provided.remove(&g);
            }
            self.to_provide = now.difference(&self.provided).copied().collect();
            self.provide_some();
        }
        let load = self.load();
        if let Some(a) = self.outbox.next(self.me, &current, load, true) {
            self.publish_announcement(&a);
        }
        // A backlog bigger than one delta drains at once, one bounded
        // announcement after another.
        for _ in 0..64 {
            match self.outbox.next(self.me, &current, load, false) {
                Some(a) => self.publish_announcement(&a),
                None => break,
            }
        }
    }

    fn publish_announcement(&mut self, a: &Announcement) {
        let topic = self.topic_avail.clone();
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossip
            .publish(topic, protocol::encode(a))
        {
            tracing::trace!(error = %e, "availability not published");
        }
    }

    fn status(&self) -> MeshStatus {
        let now = Instant::now();
        let devices = self
            .state
            .members
            .iter()
            .map(|m| {
                let me = m.device == self.me;
                let peer = m.peer.parse::<PeerId>().ok();
                let info = peer.and_then(|p| self.peers.get(&p));
                let remote = self.view.devices.get(&m.device);
                DeviceStatus {
                    name: m.name.clone(),
                    id: m.device,
                    peer: m.peer.clone(),
                    up: me || peer.is_some_and(|p| self.swarm.is_connected(&p)),
                    rtt_ms: if me {
                        Some(0.0)
                    } else {
                        info.and_then(|i| i.rtt).map(|d| d.as_secs_f64() * 1000.0)
                    },
                    bad_chunks: info.map_or(0, |i| i.bad_chunks),
                    throughput_mib_s: info
                        .and_then(|i| i.throughput)
                        .map(|b| b / f64::from(1u32 << 20)),
                    failed_requests: info.map_or(0, |i| i.failed_requests),
                    received_bytes: info.map_or(0, |i| i.received),
                    holdings: if me {
                        self.outbox.held()
                    } else {
                        remote.map_or(0, |r| r.holdings.len())
                    },
                    held_bytes: if me {
                        self.outbox.held_bytes()
                    } else {
                        remote.map_or(0, |r| r.holdings.values().map(|h| h.size).sum())
                    },
                    load: if me {
                        self.load()
                    } else {
                        remote.map(|r| r.load).unwrap_or_default()
                    },
                    last_announce_s: remote
                        .and_then(|r| r.updated)
                        .map(|t| now.duration_since(t).as_secs_f64()),
                    addrs: m.addrs.clone(),
                }
            })
            .collect();
        MeshStatus {
            peer: self.peer_id.to_string(),
            listen: self.swarm.listeners().map(|a| a.to_string()).collect(),
            devices,
            refused_connections: self.refused,
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "mesh listening");
                self.update_own_addrs();
            }
            SwarmEvent::ExpiredListenAddr { .. } => self.update_own_addrs(),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                // The allow list already refused non-members; this is a
                // second check on the authenticated id, in case the list
                // changed while the handshake ran.
                if !self.state.members.is_member(&peer_id.to_string()) {
                    self.refused += 1;
                    tracing::warn!(peer = %peer_id, "closing a connection from a device outside the mesh's device list");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.peers.entry(peer_id).or_default().connections += 1;
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                tracing::debug!(peer = %peer_id, "connected");
                // A newcomer needs our list and our holdings now, not at
                // the next tick; and a device that was alone provides its
                // holdings in Kademlia only from here on (`announce`).
                self.publish_members();
                if self.provided.is_empty() {
                    self.refresh_holdings(Duration::ZERO);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connections = num_established as usize;
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                if let ListenError::Denied { cause } = &error {
                    self.refused += 1;
                    // Once per address at warning level: a removed device
                    // that keeps trying must not flood the log.
                    let ip = send_back_addr.iter().next().map(|p| p.to_string());
                    if self.refused_from.len() < 1024
                        && self.refused_from.insert(ip.unwrap_or_default())
                    {
                        tracing::warn!(from = %send_back_addr, reason = %cause, "refused a connection from a device outside the mesh's device list");
                    } else {
                        tracing::debug!(from = %send_back_addr, reason = %cause, "refused a connection again");
                    }
                } else {
                    // Wrong mesh key, port scans, and the like.
                    tracing::debug!(from = %send_back_addr, error = %error, "incoming connection failed");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let DialError::Denied { cause } = &error {
                    tracing::debug!(peer = ?peer_id, reason = %cause, "not dialling a non-member");
                } else {
                    tracing::trace!(peer = ?peer_id, error = %error, "dial failed");
                }
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b),
            _ => {}
        }
    }

    fn update_own_addrs(&mut self) {
        let addrs: Vec<String> = self
            .swarm
            .listeners()
            .filter(|a| !is_unspecified(a))
            .map(|a| a.to_string())
            .collect();
        if self
            .state
            .members
            .set_own_addrs(&self.peer_id.to_string(), addrs)
        {
            if let Err(e) = self.state.save_members(&self.data_dir) {
                tracing::warn!(error = %e, "could not save the member list");
            }
            self.publish_members();
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                let p = self.peers.entry(peer).or_default();
                // Smoothed like TCP's SRTT, so one slow ping does not swing
                // the proximity weights.
                p.rtt = Some(match p.rtt {
                    Some(old) => old.mul_f64(0.75) + rtt.mul_f64(0.25),
                    None => rtt,
                });
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                for a in info.listen_addrs.into_iter().filter(|a| !is_unspecified(a)) {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if self.state.members.is_member(&peer.to_string())
                        && peer != self.peer_id
                        && !self.swarm.is_connected(&peer)
                    {
                        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(r),
                step,
                ..
            }) => {
                if let Some((_, found)) = self.pending_providers.get_mut(&id) {
                    if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                        found.extend(providers);
                    }
                }
                if step.last {
                    if let Some((reply, found)) = self.pending_providers.remove(&id) {
                        let devices = found.iter().filter_map(|p| self.device_of(p)).collect();
                        let _ = reply.send(devices);
                    }
                }
            }
            BehaviourEvent::Chunk(ev) => self.on_chunk(ev),
            BehaviourEvent::Avail(ev) => self.on_avail(ev),
            BehaviourEvent::Raft(ev) => self.on_raft(ev),
            BehaviourEvent::Gossip(gossipsub::Event::Message { message, .. }) => {
                let Some(source) = message.source else {
                    return;
                };
                if !self.state.members.is_member(&source.to_string()) {
                    tracing::debug!(%source, "ignoring gossip from a non-member");
                    return;
                }
                if message.topic == self.topic_members.hash() {
                    self.on_members(&message.data);
                } else if message.topic == self.topic_avail.hash() {
                    self.on_announcement(source, &message.data);
                } else if message.topic == self.topic_access.hash() {
                    self.on_access(source, message.data);
                }
            }
            _ => {}
        }
    }

    /// Hands a batch of access events to the prefetch side, with the device
    /// that signed it (the batch may only speak for that device). A full
    /// inbox drops the batch: learning is best effort and must never hold
    /// up the swarm.
    fn on_access(&mut self, source: PeerId, data: Vec<u8>) {
        let (Some(inbox), Some(device)) = (&self.access_inbox, self.device_of(&source)) else {
            return;
        };
        if inbox.try_send((device, data)).is_err() {
            tracing::debug!(%source, "access events dropped: the prefetch inbox is full");
        }
    }

    fn on_members(&mut self, data: &[u8]) {
        let theirs: super::members::Members = match protocol::decode(data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "malformed member list in gossip");
                return;
            }
        };
        if self.state.members.merge(&theirs) {
            if self.state.members.is_removed(&self.peer_id.to_string()) {
                tracing::warn!("this device was removed from the mesh");
            }
            if let Err(e) = self.state.save_members(&self.data_dir) {
                tracing::warn!(error = %e, "could not save the member list");
            }
            self.sync_allow_list();
            self.publish_members();
            self.redial();
        }
    }

    fn on_announcement(&mut self, source: PeerId, data: &[u8]) {
        let a: Announcement = match protocol::decode(data) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%source, error = %e, "malformed availability announcement");
                return;
            }
        };
        // A device speaks only for itself.
        if self.device_of(&source) != Some(a.device) {
            tracing::warn!(%source, "availability announcement for another device; ignored");
            return;
        }
        let applied = self.view.apply(&a, Instant::now());
        if applied == Applied::Refused {
            tracing::warn!(%source, changes = a.added.len() + a.removed.len(), "availability announcement over the limits; ignored");
        }
        if applied == Applied::NeedSnapshot {
            let id = self
                .swarm
                .behaviour_mut()
                .avail
                .send_request(&source, AvailRequest { after: None });
            self.pending_avail.insert(id, a.device);
        }
    }

    fn on_avail(&mut self, ev: request_response::Event<AvailRequest, AvailResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let page = self.outbox.page(&request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .avail
                    .send_response(channel, page);
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some(device) = self.pending_avail.remove(&request_id) else {
                    return;
                };
                if let Some(after) = self.view.apply_page(device, response) {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .avail
                        .send_request(&peer, AvailRequest { after: Some(after) });
                    self.pending_avail.insert(id, device);
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(device) = self.pending_avail.remove(&request_id) {
                    tracing::debug!(error = %error, "availability snapshot failed");
                    self.view.abandon_sync(device);
                }
            }
            _ => {}
        }
    }

    fn on_raft(&mut self, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        let Some((peer, request, channel)) = settle(ev, &mut self.pending_raft, "raft") else {
            return;
        };
        // The allow list admits members only, but a device removed a
        // moment ago may still have a connection open.
        let Some(from) = self.state.members.get(&peer.to_string()).map(|m| m.device) else {
            tracing::debug!(%peer, "raft request from a non-member dropped");
            return;
        };
        let Some(inbox) = &self.raft_inbox else {
            return;
        };
        let (reply, rx) = oneshot::channel();
        let msg = RaftInbound {
            from,
            bytes: request,
            reply,
        };
        if inbox.try_send(msg).is_err() {
            // Dropping the channel fails the caller's request at once;
            // Raft retries.
            tracing::debug!(%peer, "raft inbox full; request dropped");
            return;
        }
        let tx = self.cmd_tx.clone();
        tokio::spawn(async move {
            if let Ok(bytes) = rx.await {
                let _ = tx.send(Command::RaftRespond { channel, bytes }).await;
            }
        });
    }

    fn on_chunk(&mut self, ev: request_response::Event<ChunkRequest, ChunkResponse>) {
        if let Some((peer, request, channel)) = settle(ev, &mut self.pending_chunks, "chunk") {
            self.serve_chunk(peer, request, channel);
        }
    }

    fn serve_chunk(
        &mut self,
        peer: PeerId,
        req: ChunkRequest,
        channel: ResponseChannel<ChunkResponse>,
    ) {
        let n = req.pieces.len();
        let all = move |p: Piece| ChunkResponse { pieces: vec![p; n] };
        if self.queued.load(Ordering::Relaxed) >= MAX_QUEUE {
            let _ = self
                .swarm
                .behaviour_mut()
                .chunk
                .send_response(channel, all(Piece::Refused("busy".into())));
            return;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let (slots, active, queued) = (
            self.serve_slots.clone(),
            self.active.clone(),
            self.queued.clone(),
        );
        let store = self.store.clone();
        let tx = self.cmd_tx.clone();
        let corrupt = self.fault_corrupt;
        let (resource, changed) = (req.resource, self.changed.clone());
        tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            queued.fetch_sub(1, Ordering::Relaxed);
            active.fetch_add(1, Ordering::Relaxed);
            let resp = match permit {
                Ok(_permit) => {
                    let read = move || read_pieces(&*store, &req.pieces, corrupt, &peer);
                    match tokio::task::spawn_blocking(read).await {
                        Ok(pieces) => ChunkResponse { pieces },
                        Err(e) => all(Piece::Refused(e.to_string())),
                    }
                }
                Err(_) => all(Piece::Refused("shutting down".into())),
            };
            active.fetch_sub(1, Ordering::Relaxed);
            if let (Some(r), Some(f)) = (resource, changed.served.get()) {
                let bytes: u64 = resp
                    .pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Data { bytes, .. } => bytes.len() as u64,
                        _ => 0,
                    })
                    .sum();
                if bytes > 0 {
                    f(r, bytes);
                }
            }
            let _ = tx.send(Command::Respond { channel, resp }).await;
        });
    }
}

/// Settles the outbound side of a request-response event: a response or
/// failure goes to whoever waits on it in `pending`; an inbound failure
/// (a malformed request among them: the stream is dropped, the connection
/// and everyone else's requests carry on) is logged. An inbound request is
/// handed back for the caller to serve.
fn settle<Req, Resp>(
    ev: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, MeshError>>>,
    what: &str,
) -> Option<(PeerId, Req, ResponseChannel<Resp>)> {
    use request_response::{Event, Message};
    match ev {
        Event::Message {
            peer,
            message: Message::Request {
                request, channel, ..
            },
            ..
        } => return Some((peer, request, channel)),
        Event::Message {
            message:
                Message::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Ok(response));
            }
        }
        Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(MeshError::Peer(format!("{peer}: {error}"))));
            }
        }
        Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, error = %error, "inbound {what} request failed");
        }
        Event::ResponseSent { .. } => {}
    }
    None
}

/// Reads the pieces of one request from the store (blocking), within the
/// response's byte budget.
fn read_pieces(
    store: &dyn ChunkStore,
    wanted: &[PieceRequest],
    corrupt: bool,
    peer: &PeerId,
) -> Vec<Piece> {
    let mut budget = MAX_RESPONSE;
    let mut out = Vec::with_capacity(wanted.len());
    for (i, w) in wanted.iter().enumerate() {
        let p = match store.get(&w.hash) {
            Ok(Some(mut data)) => {
                if corrupt {
                    if let Some(b) = data.first_mut() {
                        *b ^= 0xff;
                    }
                }
                piece(data, w.offset, w.len)
            }
            Ok(None) => Piece::NotFound,
            Err(e) => {
                tracing::warn!(%peer, chunk = %w.hash, error = %e, "cannot serve a chunk");
                Piece::NotFound
            }
        };
        let p = match p {
            Piece::Data { bytes, .. } if i > 0 && bytes.len() as u32 > budget => Piece::Deferred,
            Piece::Data { total, bytes } => {
                budget = budget.saturating_sub(bytes.len() as u32);
                Piece::Data { total, bytes }
            }
            other => other,
        };
        out.push(p);
    }
    out
}

/// The requested piece of a chunk, at most `MAX_PIECE` bytes. The usual
/// case, a whole chunk in one piece, moves the buffer instead of copying.
fn piece(mut data: Vec<u8>, offset: u32, len: u32) -> Piece {
    let total = data.len() as u32;
    if offset > total {
        return Piece::Refused(format!("offset {offset} beyond chunk of {total}"));
    }
    let end = offset.saturating_add(len.min(MAX_PIECE)).min(total);
    let bytes = if offset == 0 {
        data.truncate(end as usize);
        data
    } else {
        data[offset as usize..end as usize].to_vec()
    };
    Piece::Data { total, bytes }
}

/// libp2p's TCP transport listens with SO_REUSEPORT, so a second daemon on
/// the same port would silently share (and split) the first one's incoming
/// connections. A plain bind first turns that into a clear error.
fn probe_listen(listen: &Multiaddr) -> Result<(), MeshError> {
    let mut ip = None;
    let mut port = 0;
    for p in listen.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(p) => port = p,
            _ => {}
        }
    }
    match (ip, port) {
        (Some(ip), p) if p != 0 => std::net::TcpListener::bind((ip, p)).map(drop).map_err(|e| {
            MeshError::Listen(format!(
                "{listen}: {e} (is another meshfs daemon using this port?)"
            ))
        }),
        _ => Ok(()),
    }
}

fn resource_key(r: ResourceId) -> kad::RecordKey {
    let mut k = b"meshfs/r/".to_vec();
    k.extend_from_slice(&r.0.to_be_bytes());
    kad::RecordKey::new(&k)
}

fn is_unspecified(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The 1-minute load average per core, in percent (0 when unknown).
fn cpu_percent() -> u32 {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (load / cores * 100.0).round().clamp(0.0, 10_000.0) as u32
}

fn build_behaviour(
    key: &libp2p::identity::Keypair,
    settings: &MeshSettings,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer = key.public().to_peer_id();
    let mdns = if settings.mdns {
        match mdns::tokio::Behaviour::new(mdns::Config::default(), peer) {
            Ok(m) => Some(m),
            Err(e) => {
                // No multicast-capable interface is not fatal: members are
                // still found through their recorded addresses.
                tracing::warn!(error = %e, "mDNS unavailable; LAN discovery is off");
                None
            }
        }
    } else {
        None
    };
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(protocol::KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(10));
    let store_cfg = kad::store::MemoryStoreConfig {
        max_records: 1024,
        max_value_bytes: 1024,
        max_providers_per_key: 64,
        max_provided_keys: 1 << 20,
    };
    let kad = kad::Behaviour::with_config(
        peer,
        kad::store::MemoryStore::with_config(peer, store_cfg),
        kad_cfg,
    );
    let rr_cfg = request_response::Config::default()
        .with_request_timeout(settings.fetch_timeout)
        .with_max_concurrent_streams(1024);
    let chunk = request_response::Behaviour::with_codec(
        ChunkCodec,
        [(
            StreamProtocol::new(protocol::CHUNK_PROTOCOL),
            ProtocolSupport::Full,
        )],
        rr_cfg.clone(),
    );
    let avail = request_response::Behaviour::with_codec(
        AvailCodec,
        [(
            StreamProtocol::new(protocol::AVAIL_PROTOCOL),
            ProtocolSupport::Full,
        )],
        rr_cfg.clone(),
    );
    let raft = request_response::Behaviour::with_codec(
        RaftCodec,
        [(
            StreamProtocol::new(protocol::RAFT_PROTOCOL),
            ProtocolSupport::Full,
        )],
        // Raft bounds each call itself (heartbeats much tighter than this);
        // this only reaps streams nobody waits on any more.
        rr_cfg.with_request_timeout(Duration::from_secs(30)),
    );
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .max_transmit_size(4 << 20)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))?;
    let gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_cfg,
    )?;
    Ok(Behaviour {
        allow: allow_block_list::Behaviour::default(),
        identify: identify::Behaviour::new(identify::Config::new(
            protocol::IDENTIFY_PROTOCOL.into(),
            key.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        mdns: Toggle::from(mdns),
        kad,
        chunk,
        avail,
        raft,
        gossip,
    })
}

/// How long after a local change the holdings are listed again. A listing
/// walks every file, so on a large namespace changing fast (10,000 creates)
/// a fixed short delay would keep a core busy listing; this keeps listing
/// to about a twentieth of the time, and never waits less than 200 ms, so
/// that a burst of changes is announced once.
fn change_delay(last_listing: Duration) -> Duration {
    (last_listing * 20).clamp(Duration::from_millis(200), Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_record_keeps_throughput_of_large_answers_and_counts_failures() {
        let mut p = Peer::default();
        p.observe(1000, Duration::from_millis(1), true);
        assert_eq!(p.throughput, None, "a small answer measures the round trip");
        p.observe(1 << 20, Duration::from_millis(100), true);
        let first = p.throughput.unwrap_or_default();
        assert!(
            (first - 10.0 * f64::from(1u32 << 20)).abs() < 1.0,
            "{first}"
        );
        p.observe(1 << 20, Duration::from_millis(10), true);
        let second = p.throughput.unwrap_or_default();
        assert!(second > first && second < 100.0 * f64::from(1u32 << 20));
        p.observe(0, Duration::from_secs(10), false);
        assert_eq!(p.failed_requests, 1);
        assert_eq!(p.throughput, Some(second));
    }

    #[test]
    fn holdings_are_listed_again_after_a_delay_that_grows_with_the_listing() {
        let ms = Duration::from_millis;
        assert_eq!(change_delay(Duration::ZERO), ms(200));
        assert_eq!(change_delay(ms(5)), ms(200));
        assert_eq!(change_delay(ms(50)), ms(1000));
        assert_eq!(change_delay(ms(2000)), Duration::from_secs(10));
    }

    #[test]
    fn a_batch_stays_within_its_byte_budget() {
        let store = crate::storage::MemChunkStore::default();
        let big: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; MAX_PIECE as usize]).collect();
        let wanted: Vec<PieceRequest> = big
            .iter()
            .map(|d| PieceRequest {
                hash: store.put_cached(d).unwrap(),
                offset: 0,
                len: MAX_PIECE,
            })
            .chain([PieceRequest {
                hash: crate::ids::ChunkHash::of(b"absent"),
                offset: 0,
                len: 1,
            }])
            .collect();
        let peer = PeerId::random();
        let got = read_pieces(&store, &wanted, false, &peer);
        let kinds: Vec<&str> = got
            .iter()
            .map(|p| match p {
                Piece::Data { .. } => "data",
                Piece::Deferred => "deferred",
                Piece::NotFound => "missing",
                Piece::Refused(_) => "refused",
            })
            .collect();
        assert_eq!(kinds, ["data", "data", "deferred", "deferred", "missing"]);
    }

    #[test]
    fn pieces_are_bounded_and_checked() {
        let data = vec![7u8; (MAX_PIECE as usize) * 2 + 10];
        match piece(data.clone(), 0, u32::MAX) {
            Piece::Data { total, bytes } => {
                assert_eq!(total as usize, data.len());
                assert_eq!(bytes.len(), MAX_PIECE as usize);
            }
            other => panic!("{other:?}"),
        }
        match piece(data.clone(), 2 * MAX_PIECE, MAX_PIECE) {
            Piece::Data { bytes, .. } => assert_eq!(bytes.len(), 10),
            other => panic!("{other:?}"),
        }
        assert!(matches!(piece(data, u32::MAX, 1), Piece::Refused(_)));
    }
}
