//! Every message that crosses the network, with its versioned protocol id
//! and its encoding. Nothing here trusts its input: every decoder bounds
//! what it reads and returns an error for anything malformed.
//!
//! Encoding: postcard (serde) frames prefixed with a u32 big-endian length;
//! chunk bytes follow their header raw, so a 1 MiB piece is not walked byte
//! by byte through serde.

use std::io;
use std::net::SocketAddr;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::ids::{ChunkHash, DeviceId, ResourceId, VersionId};

/// Chunk transfer (request-response).
/// Version 2: requests name their file. Version 1 peers are not spoken to
/// (their frames would be misread).
pub const CHUNK_PROTOCOL: &str = "/meshfs/chunk/2";
/// Availability snapshots, paged (request-response), for a device that
/// missed deltas.
pub const AVAIL_PROTOCOL: &str = "/meshfs/avail/1";
/// Identify, with our own protocol version so that other libp2p networks
/// are told apart in logs.
pub const IDENTIFY_PROTOCOL: &str = "/meshfs/id/1";
/// Kademlia under our own name: provider records for resources.
pub const KAD_PROTOCOL: &str = "/meshfs/kad/1";
/// Raft RPCs and forwarded writes (request-response). The payload is opaque
/// here: `raft/` encodes and checks it.
pub const RAFT_PROTOCOL: &str = "/meshfs/raft/1";
/// Largest Raft frame: an append of up to `raft::MAX_PAYLOAD_ENTRIES`
/// commands, or one snapshot piece.
pub const MAX_RAFT_FRAME: u32 = 16 << 20;
/// Gossipsub topics.
pub const TOPIC_AVAILABILITY: &str = "meshfs/availability/1";
pub const TOPIC_MEMBERS: &str = "meshfs/members/1";
/// Batches of anonymized access events (opaque to the mesh: the prefetch
/// module encodes and validates them).
pub const TOPIC_ACCESS: &str = "meshfs/access/1";
/// The join handshake: both sides ephemeral, authenticated by the invite's
/// secret as pre-shared key.
pub const JOIN_NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Version byte at the start of every join-listener conversation.
pub const JOIN_VERSION: u8 = 1;

/// Largest piece of a chunk sent in one response: a big transfer is many
/// small requests interleaved with everyone else's on the multiplexer.
pub const MAX_PIECE: u32 = 1 << 20;
/// Largest request or header frame accepted.
const MAX_FRAME: u32 = 64 * 1024;
/// Largest availability snapshot page.
pub const MAX_AVAIL_PAGE: usize = 2048;
/// Largest number of changes in one availability announcement.
pub const MAX_DELTA: usize = 256;

// ---------------------------------------------------------------- chunks --

/// Pieces asked for in one request: consecutive chunks of a file travel
/// together, so that a stream is opened per batch, not per 64 KiB.
pub const MAX_BATCH: usize = 16;
/// Largest sum of piece bytes in one response; pieces beyond it are
/// `Deferred` (the first is always served, so every request progresses).
pub const MAX_RESPONSE: u32 = 2 << 20;

/// Ask for `len` bytes of chunk `hash` starting at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    pub hash: ChunkHash,
    pub offset: u32,
    pub len: u32,
}

/// One to `MAX_BATCH` pieces, of the chunks of `resource` when the asker
/// knows which file they belong to (the server counts what it serves per
/// file: usage in the authority policy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub pieces: Vec<PieceRequest>,
    pub resource: Option<ResourceId>,
}

/// The answer for one piece.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Piece {
    /// `bytes` start at the requested offset; `total` is the chunk's length.
    Data {
        total: u32,
        bytes: Vec<u8>,
    },
    NotFound,
    /// The server is overloaded or refuses; the reason is for logs.
    Refused(String),
    /// Over this response's byte budget: ask again.
    Deferred,
}

/// One answer per requested piece, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkResponse {
    pub pieces: Vec<Piece>,
}

/// A piece's header on the wire; `Data`'s bytes follow all the headers,
/// raw and in order.
#[derive(Serialize, Deserialize)]
enum PieceHead {
    Data { total: u32, len: u32 },
    NotFound,
    Refused(String),
    Deferred,
}

// ---------------------------------------------------------- availability --

/// What a device holds of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub resource: ResourceId,
    pub version: VersionId,
    pub size: u64,
    /// A MIME type guessed from the name, for placement and prefetch.
    pub kind: String,
}

/// How busy a device is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Chunk requests being served right now.
    pub active_transfers: u32,
    /// Chunk requests waiting for a serving slot.
    pub queue_depth: u32,
    /// 1-minute load average per core, in percent.
    pub cpu_percent: u32,
}

/// A periodic and on-change broadcast: load plus the changes to what the
/// device holds since announcement `base` (a bounded delta, never a full
/// list). A receiver whose last known sequence for the device is not `base`
/// asks for a snapshot over `AVAIL_PROTOCOL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub device: DeviceId,
    pub base: u64,
    pub seq: u64,
    pub load: Load,
    pub added: Vec<Holding>,
    pub removed: Vec<ResourceId>,
}

/// One page of a device's holdings, resources after `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailRequest {
    pub after: Option<ResourceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailResponse {
    /// The announcement sequence this page reflects.
    pub seq: u64,
    pub holdings: Vec<Holding>,
    /// Ask again from here; `None` on the last page.
    pub next: Option<ResourceId>,
}

// ------------------------------------------------------------ membership --

/// One device of the mesh, as every member records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub device: DeviceId,
    /// libp2p peer id (base58), bound to the device's ed25519 key.
    pub peer: String,
    /// Multiaddrs where it was last seen listening.
    pub addrs: Vec<String>,
    /// Bumped by the device itself whenever it changes its own record
    /// (its addresses), so that the newest record wins every merge.
    pub rev: u64,
}

// --------------------------------------------------------------- joining --

/// The joiner's first encrypted message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub device: DeviceId,
    pub peer: String,
    /// TCP port the joiner will listen on (its address is the one the
    /// inviter sees the join connection come from).
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    Accepted {
        mesh_key: [u8; 32],
        members: crate::mesh::members::Members,
    },
    Rejected(String),
}

/// What `meshfs invite` prints: where the join listener is, the secret
/// and the expiry. Text form: `meshfs1-` then hex of the postcard bytes and
/// a 4-byte BLAKE3 checksum, so that a mistyped code is caught before any
/// connection is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCode {
    pub addrs: Vec<SocketAddr>,
    pub secret: [u8; 16],
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

const CODE_PREFIX: &str = "meshfs1-";

impl InviteCode {
    pub fn encode(&self) -> String {
        let mut bytes = postcard::to_stdvec(self).unwrap_or_default();
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(&sum.as_bytes()[..4]);
        format!("{CODE_PREFIX}{}", crate::ids::hex(&bytes))
    }

    pub fn decode(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let hex = text
            .strip_prefix(CODE_PREFIX)
            .ok_or("not a meshfs invite code (it starts with meshfs1-)")?;
        if hex.len() % 2 != 0 || hex.len() > 4096 {
            return Err("invite code has a bad length (copied incompletely?)".into());
        }
        let bytes =
            crate::ids::unhex(hex).ok_or("invite code has characters that are not hex digits")?;
        if bytes.len() < 5 {
            return Err("invite code is too short".into());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 4);
        if &blake3::hash(body).as_bytes()[..4] != sum {
            return Err("invite code checksum does not match (mistyped?)".into());
        }
        let code: InviteCode =
            postcard::from_bytes(body).map_err(|e| format!("invite code is malformed: {e}"))?;
        if code.addrs.is_empty() {
            return Err("invite code names no address".into());
        }
        Ok(code)
    }

    /// The handshake's pre-shared key: the 128-bit secret stretched to the
    /// 32 bytes Noise wants, under a context of our own.
    pub fn psk(&self) -> [u8; 32] {
        blake3::derive_key("meshfs join psk v1", &self.secret)
    }
}

// -------------------------------------------------------------- encoding --

/// Largest availability page frame.
pub const MAX_AVAIL_FRAME: u32 = 4 << 20;

/// Writes one length-prefixed postcard frame of at most `MAX_FRAME` bytes.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> io::Result<()> {
    write_frame_max(w, msg, MAX_FRAME).await
}

pub async fn write_frame_max<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
    max: u32,
) -> io::Result<()> {
    let bytes = postcard::to_stdvec(msg).map_err(|e| io::Error::other(e.to_string()))?;
    let len = u32::try_from(bytes.len()).map_err(|_| invalid("frame too large"))?;
    if len > max {
        return Err(invalid("frame too large"));
    }
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&bytes).await
}

/// Reads one length-prefixed postcard frame of at most `MAX_FRAME` bytes.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> io::Result<T> {
    read_frame_max(r, MAX_FRAME).await
}

pub async fn read_frame_max<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(invalid(&format!("frame of {len} bytes is over the limit")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    decode(&buf)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| invalid(&format!("malformed message: {e}")))
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our own types always serialize; an empty frame would be refused by
    // the receiver, never misread.
    postcard::to_stdvec(msg).unwrap_or_default()
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

pub async fn read_chunk_request<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<ChunkRequest> {
    let req: ChunkRequest = read_frame(r).await?;
    if req.pieces.is_empty() || req.pieces.len() > MAX_BATCH {
        return Err(invalid(&format!(
            "request for {} pieces (1 to {MAX_BATCH} allowed)",
            req.pieces.len()
        )));
    }
    Ok(req)
}

pub async fn write_chunk_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: ChunkResponse,
) -> io::Result<()> {
    let mut heads = Vec::with_capacity(resp.pieces.len());
    let mut sum = 0u32;
    for p in &resp.pieces {
        heads.push(match p {
            Piece::Data { total, bytes } => {
                let len = u32::try_from(bytes.len()).map_err(|_| invalid("piece too large"))?;
                sum = sum.saturating_add(len);
                if len > MAX_PIECE || sum > MAX_RESPONSE {
                    return Err(invalid("response over its byte budget"));
                }
                PieceHead::Data { total: *total, len }
            }
            Piece::NotFound => PieceHead::NotFound,
            Piece::Refused(why) => PieceHead::Refused(why.clone()),
            Piece::Deferred => PieceHead::Deferred,
        });
    }
    write_frame(w, &heads).await?;
    for p in resp.pieces {
        if let Piece::Data { bytes, .. } = p {
            w.write_all(&bytes).await?;
        }
    }
    Ok(())
}

pub async fn read_chunk_response<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<ChunkResponse> {
    let heads: Vec<PieceHead> = read_frame(r).await?;
    if heads.len() > MAX_BATCH {
        return Err(invalid("response with too many pieces"));
    }
    // Check every length before allocating any.
    let mut sum = 0u32;
    for h in &heads {
        if let PieceHead::Data { total, len } = h {
            sum = sum.saturating_add(*len);
            if *len > MAX_PIECE || len > total || sum > MAX_RESPONSE {
                return Err(invalid(&format!(
                    "piece of {len} bytes (chunk {total}) is over the limit"
                )));
            }
        }
    }
    let mut pieces = Vec::with_capacity(heads.len());
    for h in heads {
        pieces.push(match h {
            PieceHead::Data { total, len } => {
                let mut bytes = vec![0u8; len as usize];
                r.read_exact(&mut bytes).await?;
                Piece::Data { total, bytes }
            }
            PieceHead::NotFound => Piece::NotFound,
            PieceHead::Refused(why) => Piece::Refused(why),
            PieceHead::Deferred => Piece::Deferred,
        });
    }
    Ok(ChunkResponse { pieces })
}

/// A guess at a resource's MIME type from its name, for availability
/// broadcasts (placement and prefetch weigh media differently).
pub fn guess_kind(name: &[u8]) -> &'static str {
    let ext = name
        .rsplit(|&b| b == b'.')
        .next()
        .filter(|e| e.len() < name.len())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_slice() {
        b"txt" | b"md" | b"log" | b"csv" => "text/plain",
        b"html" | b"htm" => "text/html",
        b"json" => "application/json",
        b"pdf" => "application/pdf",
        b"zip" => "application/zip",
        b"gz" | b"tgz" => "application/gzip",
        b"tar" => "application/x-tar",
        b"jpg" | b"jpeg" => "image/jpeg",
        b"png" => "image/png",
        b"gif" => "image/gif",
        b"webp" => "image/webp",
        b"mp3" => "audio/mpeg",
        b"flac" => "audio/flac",
        b"ogg" | b"opus" => "audio/ogg",
        b"mp4" | b"m4v" => "video/mp4",
        b"mkv" => "video/x-matroska",
        b"webm" => "video/webm",
        b"rs" | b"c" | b"h" | b"py" | b"sh" | b"toml" | b"yaml" | b"yml" => "text/x-source",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_code_round_trips_and_catches_typos() {
        let code = InviteCode {
            addrs: vec!["127.0.0.1:4100".parse().unwrap()],
            secret: [7; 16],
            expires: 1_900_000_000,
        };
        let text = code.encode();
        assert!(text.starts_with("meshfs1-"));
        assert_eq!(InviteCode::decode(&text), Ok(code.clone()));
        assert_eq!(InviteCode::decode(&format!("  {text}\n")), Ok(code));
        // One changed digit fails the checksum, not the handshake.
        let mut bad = text.clone().into_bytes();
        let i = bad.len() - 12;
        bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
        let err = InviteCode::decode(std::str::from_utf8(&bad).unwrap()).unwrap_err();
        assert!(err.contains("checksum"), "{err}");
        assert!(InviteCode::decode("hello").is_err());
        assert!(InviteCode::decode("meshfs1-zz").is_err());
        assert!(InviteCode::decode(&text[..text.len() - 1]).is_err());
    }

    #[test]
    fn frames_reject_oversized_and_malformed_input() {
        futures::executor::block_on(async {
            let req = ChunkRequest {
                resource: Some(ResourceId(7)),
                pieces: vec![PieceRequest {
                    hash: ChunkHash::of(b"x"),
                    offset: 0,
                    len: 10,
                }],
            };
            let mut buf = Vec::new();
            write_frame(&mut buf, &req).await.unwrap();
            let back = read_chunk_request(&mut buf.as_slice()).await.unwrap();
            assert_eq!(back, req);

            let huge = (MAX_FRAME + 1).to_be_bytes();
            let err = read_chunk_request(&mut huge.as_slice()).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);

            let mut garbage = 3u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
            assert!(read_chunk_request(&mut garbage.as_slice()).await.is_err());
            // Truncated: an error, not a hang or a panic.
            assert!(read_chunk_request(&mut &buf[..buf.len() - 1])
                .await
                .is_err());
            // Empty and oversized batches are refused.
            for n in [0, MAX_BATCH + 1] {
                let mut buf = Vec::new();
                let pieces = vec![req.pieces[0].clone(); n];
                write_frame(
                    &mut buf,
                    &ChunkRequest {
                        pieces,
                        resource: None,
                    },
                )
                .await
                .unwrap();
                assert!(read_chunk_request(&mut buf.as_slice()).await.is_err());
            }
        });
    }

    #[test]
    fn chunk_responses_round_trip_and_bound_pieces() {
        futures::executor::block_on(async {
            let resp = ChunkResponse {
                pieces: vec![
                    Piece::Data {
                        total: 10,
                        bytes: b"hello".to_vec(),
                    },
                    Piece::NotFound,
                    Piece::Data {
                        total: 3,
                        bytes: b"abc".to_vec(),
                    },
                    Piece::Refused("busy".into()),
                    Piece::Deferred,
                ],
            };
            let mut buf = Vec::new();
            write_chunk_response(&mut buf, resp.clone()).await.unwrap();
            assert_eq!(
                read_chunk_response(&mut buf.as_slice()).await.unwrap(),
                resp
            );
            // Headers claiming more than the limits are refused before any
            // allocation of that size.
            for heads in [
                vec![PieceHead::Data {
                    total: u32::MAX,
                    len: u32::MAX,
                }],
                vec![
                    PieceHead::Data {
                        total: MAX_PIECE,
                        len: MAX_PIECE,
                    },
                    PieceHead::Data {
                        total: MAX_PIECE,
                        len: MAX_PIECE,
                    },
                    PieceHead::Data { total: 1, len: 1 },
                ],
            ] {
                let mut buf = Vec::new();
                write_frame(&mut buf, &heads).await.unwrap();
                assert!(read_chunk_response(&mut buf.as_slice()).await.is_err());
            }
        });
    }

    #[test]
    fn kinds_are_guessed_from_extensions() {
        assert_eq!(guess_kind(b"film.MKV"), "video/x-matroska");
        assert_eq!(guess_kind(b"notes.txt"), "text/plain");
        assert_eq!(guess_kind(b"Makefile"), "application/octet-stream");
        assert_eq!(guess_kind(b".bashrc"), "application/octet-stream");
    }
}

/// Every decoder of what a peer sends, fed arbitrary and damaged input
/// (proptest, bounded so that CI runs them; `fuzz/` has cargo-fuzz targets
/// for longer runs): an error or a value within the protocol's bounds,
/// never a panic or an allocation a length field asked for.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    use crate::fuzzing::mesh_frames as decode_all;

    fn piece_request() -> impl Strategy<Value = PieceRequest> {
        (any::<[u8; 32]>(), any::<u32>(), any::<u32>()).prop_map(|(h, offset, len)| PieceRequest {
            hash: ChunkHash::of(&h),
            offset,
            len,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_decode_to_an_error_or_a_bounded_message(
            bytes in vec(any::<u8>(), 0..2048)
        ) {
            decode_all(&bytes);
        }

        #[test]
        fn a_damaged_frame_decodes_to_an_error_or_a_bounded_message(
            pieces in vec(piece_request(), 1..=MAX_BATCH),
            damage in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = Vec::new();
            let req = ChunkRequest { pieces, resource: Some(ResourceId(7)) };
            futures::executor::block_on(write_frame(&mut frame, &req)).unwrap();
            // Intact, it reads back as it was.
            let back = futures::executor::block_on(read_chunk_request(&mut frame.as_slice()));
            prop_assert_eq!(back.ok(), Some(req));
            for (at, byte) in damage {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            decode_all(&frame);
            frame.truncate(cut.index(frame.len() + 1));
            decode_all(&frame);
        }

        #[test]
        fn invite_codes_refuse_text_that_is_not_one(text in "\\PC{0,200}") {
            crate::fuzzing::invite_code(&text);
            crate::fuzzing::invite_code(&format!("meshfs1-{text}"));
        }

        #[test]
        fn one_changed_digit_of_an_invite_code_is_caught(
            secret in any::<[u8; 16]>(),
            expires in any::<u64>(),
            port in 1u16..,
            at in any::<prop::sample::Index>(),
            digit in 0u8..16,
        ) {
            let code = InviteCode {
                addrs: vec![SocketAddr::from(([10, 0, 0, 1], port))],
                secret,
                expires,
            };
            let text = code.encode();
            prop_assert_eq!(InviteCode::decode(&text), Ok(code));
            let mut bad = text.into_bytes();
            let i = CODE_PREFIX.len() + at.index(bad.len() - CODE_PREFIX.len());
            let new = b"0123456789abcdef"[digit as usize];
            prop_assume!(bad[i] != new);
            bad[i] = new;
            // The 4-byte checksum catches it (or, changed in the checksum
            // itself, the body no longer matches).
            prop_assert!(InviteCode::decode(std::str::from_utf8(&bad).unwrap()).is_err());
        }
    }
}
