//! Invite and join. A joiner has no mesh key yet, so it cannot complete a
//! handshake on the libp2p port (the mesh key is in Noise's prologue
//! there); instead the inviting daemon opens a short-lived TCP listener
//! for one code, and the two run a Noise NNpsk0 handshake (crate snow)
//! keyed by the code's 128-bit secret. A wrong code
//! fails the handshake's first message; the joiner then sends who it is,
//! and the inviter answers with the mesh key and the member list (which
//! carries everyone's addresses, for bootstrapping).
//!
//! Wire: one version byte from the joiner, then Noise messages, each with a
//! u16 big-endian length. A code is good for one join until it expires;
//! using it again is answered with a clear refusal.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::multiaddr::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::protocol::{
    self, InviteCode, JoinReply, JoinRequest, Member, JOIN_NOISE_PARAMS, JOIN_VERSION,
};
use super::{MeshClient, MeshError};

/// How long one join conversation may take.
const CONVERSATION: Duration = Duration::from_secs(10);
/// Conversations served at once by one invite's listener, in all and from
/// one address: a connection that says nothing holds a slot until
/// `CONVERSATION` ends, and neither it nor junk from one address may keep a
/// real joiner waiting.
const MAX_CONVERSATIONS: usize = 32;
const MAX_CONVERSATIONS_PER_ADDRESS: u32 = 2;
/// Failed conversations after which an address is no longer answered by
/// this invite (others still are: junk from one address does not close it).
const MAX_FAILURES_PER_ADDRESS: u32 = 10;
const NOISE_MAX: usize = 65535;

fn noise_builder(psk: &[u8; 32]) -> Result<snow::Builder<'_>, snow::Error> {
    // The parameter string is a constant that snow knows.
    let params: snow::params::NoiseParams = JOIN_NOISE_PARAMS.parse()?;
    snow::Builder::new(params).psk(0, psk)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Opens a join listener for a new code valid for `ttl`; returns the code.
pub async fn invite(client: &MeshClient, ttl: Duration) -> Result<InviteCode, MeshError> {
    let listener = TcpListener::bind(("0.0.0.0", 0))
        .await
        .map_err(|e| MeshError::io("opening the join listener", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| MeshError::io("opening the join listener", e))?
        .port();
    let (_, listen) = client.members().await?;
    let mut ips: Vec<IpAddr> = listen
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Ip4(ip) if !ip.is_unspecified() => Some(IpAddr::V4(ip)),
                Protocol::Ip6(ip) if !ip.is_unspecified() => Some(IpAddr::V6(ip)),
                _ => None,
            })
        })
        .collect();
    // Addresses other devices can reach first; loopback last, for a
    // second device on the same machine.
    ips.sort_by_key(|ip| (ip.is_loopback(), ip.is_ipv6()));
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    let code = InviteCode {
        addrs: ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
        secret: crate::ids::random_bytes(),
        expires: now_unix() + ttl.as_secs(),
    };
    let serve_code = std::sync::Arc::new(code.clone());
    let client = client.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + ttl;
        // Set by the conversation that adds its device (one per code).
        let used = std::sync::Arc::new(tokio::sync::Mutex::new(false));
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONVERSATIONS));
        let by_address: std::sync::Arc<std::sync::Mutex<ByAddress>> = Default::default();
        loop {
            let accepted = tokio::time::timeout_at(deadline, listener.accept()).await;
            let (stream, from) = match accepted {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    // A transient accept error (out of descriptors) must
                    // not close the invite.
                    tracing::debug!(error = %e, "join listener accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => break,
            };
            let ip = from.ip();
            if !crate::lock(&by_address).admit(ip) {
                tracing::debug!(%from, "join connection refused: too many from this address");
                continue;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                crate::lock(&by_address).done(ip, false);
                tracing::debug!(%from, "join connection refused: the listener is busy");
                continue;
            };
            let (code, client, used, by_address) = (
                serve_code.clone(),
                client.clone(),
                used.clone(),
                by_address.clone(),
            );
            tokio::spawn(async move {
                let r =
                    tokio::time::timeout(CONVERSATION, serve_one(stream, &code, &client, &used))
                        .await
                        .unwrap_or(Err(MeshError::Timeout(CONVERSATION)));
                crate::lock(&by_address).done(ip, r.is_ok());
                drop(slot);
                match r {
                    Ok(name) => tracing::info!(device = %name, %from, "invite used: device joined"),
                    Err(e) => tracing::warn!(%from, error = %e, "join attempt refused"),
                }
            });
        }
        tracing::debug!(port, "join listener closed");
    });
    Ok(code)
}

/// Per address: conversations in flight, and how many failed.
#[derive(Default)]
struct ByAddress(std::collections::HashMap<IpAddr, (u32, u32)>);

impl ByAddress {
    /// Whether a new connection from `ip` is served (and counts it).
    fn admit(&mut self, ip: IpAddr) -> bool {
        let (in_flight, failed) = self.0.entry(ip).or_default();
        if *in_flight >= MAX_CONVERSATIONS_PER_ADDRESS || *failed >= MAX_FAILURES_PER_ADDRESS {
            return false;
        }
        *in_flight += 1;
        true
    }

    /// A conversation from `ip` ended.
    fn done(&mut self, ip: IpAddr, ok: bool) {
        if let Some((in_flight, failed)) = self.0.get_mut(&ip) {
            *in_flight = in_flight.saturating_sub(1);
            if !ok {
                *failed += 1;
            }
        }
    }
}

async fn serve_one(
    mut s: tokio::net::TcpStream,
    code: &InviteCode,
    client: &MeshClient,
    used: &tokio::sync::Mutex<bool>,
) -> Result<String, MeshError> {
    let io = |e| MeshError::io("join conversation", e);
    let version = s.read_u8().await.map_err(io)?;
    if version != JOIN_VERSION {
        return Err(MeshError::Join(format!(
            "joiner speaks version {version}, we speak {JOIN_VERSION}"
        )));
    }
    let psk = code.psk();
    let mut hs = noise_builder(&psk)
        .and_then(|b| b.build_responder())
        .map_err(noise_err)?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut out = vec![0u8; NOISE_MAX];
    let msg = read_noise_async(&mut s).await?;
    hs.read_message(&msg, &mut out)
        .map_err(|_| MeshError::Join("wrong invite code (the handshake failed)".into()))?;
    let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
    write_noise_async(&mut s, &buf[..n]).await?;
    let mut t = hs.into_transport_mode().map_err(noise_err)?;
    let msg = read_noise_async(&mut s).await?;
    let n = t.read_message(&msg, &mut out).map_err(noise_err)?;
    let req: JoinRequest =
        protocol::decode(&out[..n]).map_err(|e| MeshError::Join(e.to_string()))?;
    let peer_ip = s.peer_addr().map_err(io)?.ip();
    // Held while the device is added: two joiners with one code cannot
    // both get in.
    let mut used = used.lock().await;
    let reply = if *used {
        JoinReply::Rejected("this invite code was already used; ask for a new one".into())
    } else if now_unix() > code.expires {
        JoinReply::Rejected("this invite code has expired; ask for a new one".into())
    } else {
        match check_request(&req, peer_ip) {
            Err(why) => JoinReply::Rejected(why),
            Ok(member) => match client.add_member(member).await {
                Err(e) => JoinReply::Rejected(e.to_string()),
                Ok(()) => {
                    *used = true;
                    let (members, _) = client.members().await?;
                    JoinReply::Accepted {
                        mesh_key: client.mesh_key,
                        members,
                    }
                }
            },
        }
    };
    drop(used);
    let payload = protocol::encode(&reply);
    if payload.len() > NOISE_MAX - 16 {
        return Err(MeshError::Join(
            "member list too large for one message".into(),
        ));
    }
    let n = t.write_message(&payload, &mut buf).map_err(noise_err)?;
    write_noise_async(&mut s, &buf[..n]).await?;
    s.flush().await.map_err(io)?;
    match reply {
        JoinReply::Accepted { .. } => Ok(req.name),
        JoinReply::Rejected(why) => Err(MeshError::Join(format!("{}: {why}", req.name))),
    }
}

/// Validates what a joiner says about itself; its address is where the
/// join connection came from, with the port it says it will listen on.
fn check_request(req: &JoinRequest, ip: IpAddr) -> Result<Member, String> {
    if req.name.is_empty() || req.name.len() > 64 || req.name.chars().any(char::is_control) {
        return Err("device name must be 1 to 64 printable characters".into());
    }
    if req.peer.parse::<libp2p::PeerId>().is_err() {
        return Err("malformed peer id".into());
    }
    if req.port == 0 {
        return Err("joiner gave no listen port".into());
    }
    let addr = match ip {
        IpAddr::V4(v4) => format!("/ip4/{v4}/tcp/{}", req.port),
        IpAddr::V6(v6) => format!("/ip6/{v6}/tcp/{}", req.port),
    };
    Ok(Member {
        name: req.name.clone(),
        device: req.device,
        peer: req.peer.clone(),
        addrs: vec![addr],
        rev: 0,
    })
}

/// What a successful join hands back.
pub struct Joined {
    pub mesh_key: [u8; 32],
    pub members: super::members::Members,
}

/// The joiner's side, blocking: tries the code's addresses in order.
pub fn join(code: &InviteCode, req: &JoinRequest) -> Result<Joined, MeshError> {
    if now_unix() > code.expires {
        return Err(MeshError::Join(
            "this invite code has expired; ask for a new one".into(),
        ));
    }
    let mut last = String::new();
    for addr in &code.addrs {
        match TcpStream::connect_timeout(addr, Duration::from_secs(3)) {
            Ok(s) => return converse(s, code, req),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(MeshError::Join(format!(
        "could not reach the inviting device ({last}); is its daemon running, and is the code still valid?"
    )))
}

fn converse(mut s: TcpStream, code: &InviteCode, req: &JoinRequest) -> Result<Joined, MeshError> {
    let io = |e| MeshError::io("join conversation", e);
    s.set_read_timeout(Some(CONVERSATION)).map_err(io)?;
    s.set_write_timeout(Some(CONVERSATION)).map_err(io)?;
    let psk = code.psk();
    let mut hs = noise_builder(&psk)
        .and_then(|b| b.build_initiator())
        .map_err(noise_err)?;
    let mut buf = vec![0u8; NOISE_MAX];
    let mut out = vec![0u8; NOISE_MAX];
    s.write_all(&[JOIN_VERSION]).map_err(io)?;
    let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
    write_noise(&mut s, &buf[..n])?;
    let refused = || {
        MeshError::Join(
            "the inviting device refused the code (wrong code, or its invite was closed)".into(),
        )
    };
    let msg = read_noise(&mut s).map_err(|_| refused())?;
    hs.read_message(&msg, &mut out).map_err(|_| refused())?;
    let mut t = hs.into_transport_mode().map_err(noise_err)?;
    let n = t
        .write_message(&protocol::encode(req), &mut buf)
        .map_err(noise_err)?;
    write_noise(&mut s, &buf[..n])?;
    let msg = read_noise(&mut s)?;
    let n = t.read_message(&msg, &mut out).map_err(noise_err)?;
    match protocol::decode::<JoinReply>(&out[..n]).map_err(|e| MeshError::Join(e.to_string()))? {
        JoinReply::Accepted { mesh_key, members } => {
            if !members.is_member(&req.peer) {
                return Err(MeshError::Join(
                    "the inviter's member list does not include us".into(),
                ));
            }
            Ok(Joined { mesh_key, members })
        }
        JoinReply::Rejected(why) => Err(MeshError::Join(format!("refused by the inviter: {why}"))),
    }
}

fn noise_err(e: snow::Error) -> MeshError {
    MeshError::Join(format!("noise: {e}"))
}

fn write_noise(s: &mut TcpStream, msg: &[u8]) -> Result<(), MeshError> {
    let len = u16::try_from(msg.len()).map_err(|_| MeshError::Join("message too large".into()))?;
    s.write_all(&len.to_be_bytes())
        .and_then(|_| s.write_all(msg))
        .map_err(|e| MeshError::io("join conversation", e))
}

fn read_noise(s: &mut TcpStream) -> Result<Vec<u8>, MeshError> {
    let io = |e| MeshError::io("join conversation", e);
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(io)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).map_err(io)?;
    Ok(msg)
}

async fn write_noise_async(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<(), MeshError> {
    let io = |e| MeshError::io("join conversation", e);
    let len = u16::try_from(msg.len()).map_err(|_| MeshError::Join("message too large".into()))?;
    s.write_all(&len.to_be_bytes()).await.map_err(io)?;
    s.write_all(msg).await.map_err(io)
}

async fn read_noise_async(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, MeshError> {
    let io = |e| MeshError::io("join conversation", e);
    let len = s.read_u16().await.map_err(io)?;
    let mut msg = vec![0u8; len as usize];
    s.read_exact(&mut msg).await.map_err(io)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_from_one_address_is_limited_there_only() {
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut by = ByAddress::default();
        // At most two at once from one address.
        assert!(by.admit(a) && by.admit(a));
        assert!(!by.admit(a));
        assert!(by.admit(b));
        by.done(a, false);
        assert!(by.admit(a));
        // Failures add up per address; past the limit it is not answered,
        // while another address still is.
        for _ in 0..MAX_FAILURES_PER_ADDRESS {
            by.done(a, false);
            let _ = by.admit(a);
        }
        assert!(!by.admit(a));
        by.done(b, true);
        assert!(by.admit(b));
    }

    #[test]
    fn join_requests_are_checked() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_string();
        let mut req = JoinRequest {
            name: "laptop".into(),
            device: crate::ids::DeviceId::generate(),
            peer,
            port: 4100,
        };
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let m = check_request(&req, ip).unwrap();
        assert_eq!(m.addrs, vec!["/ip4/10.1.2.3/tcp/4100".to_string()]);
        req.name = "bad\nname".into();
        assert!(check_request(&req, ip).is_err());
        req.name = "ok".into();
        req.peer = "not-a-peer".into();
        assert!(check_request(&req, ip).is_err());
    }

    #[test]
    fn a_wrong_secret_fails_the_first_handshake_message() {
        let good = InviteCode {
            addrs: vec![],
            secret: [1; 16],
            expires: 0,
        };
        let wrong = InviteCode {
            secret: [2; 16],
            ..good.clone()
        };
        let (pg, pw) = (good.psk(), wrong.psk());
        let mut init = noise_builder(&pw).unwrap().build_initiator().unwrap();
        let mut resp = noise_builder(&pg).unwrap().build_responder().unwrap();
        let mut buf = vec![0u8; NOISE_MAX];
        let mut out = vec![0u8; NOISE_MAX];
        let n = init.write_message(&[], &mut buf).unwrap();
        assert!(resp.read_message(&buf[..n], &mut out).is_err());
        // The right secret completes it.
        let mut init = noise_builder(&pg).unwrap().build_initiator().unwrap();
        let mut resp = noise_builder(&pg).unwrap().build_responder().unwrap();
        let n = init.write_message(&[], &mut buf).unwrap();
        resp.read_message(&buf[..n], &mut out).unwrap();
        let n = resp.write_message(&[], &mut buf).unwrap();
        init.read_message(&buf[..n], &mut out).unwrap();
        assert!(init.is_handshake_finished() && resp.is_handshake_finished());
    }
}
