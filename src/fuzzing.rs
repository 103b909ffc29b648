//! Entry points for fuzzing every decoder of what a peer sends or a user
//! writes: each feeds its input to the real decoder and asserts the bounds
//! a decoded value must keep, so that a panic (or a failed assertion) is a
//! finding. The cargo-fuzz targets in `fuzz/` call them for long runs; the
//! proptest properties beside each decoder call them for the bounded runs
//! CI does.

use crate::ids::DeviceId;
use crate::mesh::protocol::{self, Piece, MAX_BATCH, MAX_PIECE, MAX_RESPONSE};
use crate::prefetch::log;

/// `bytes` as every mesh protocol message: chunk requests and responses
/// (whose readers bound pieces and bytes before allocating), availability
/// pages, announcements, member records, join messages.
pub fn mesh_frames(bytes: &[u8]) {
    futures::executor::block_on(async {
        if let Ok(req) = protocol::read_chunk_request(&mut &bytes[..]).await {
            assert!((1..=MAX_BATCH).contains(&req.pieces.len()));
        }
        if let Ok(resp) = protocol::read_chunk_response(&mut &bytes[..]).await {
            assert!(resp.pieces.len() <= MAX_BATCH);
            let mut sum = 0usize;
            for p in &resp.pieces {
                if let Piece::Data { total, bytes } = p {
                    assert!(bytes.len() <= MAX_PIECE as usize);
                    assert!(bytes.len() <= *total as usize);
                    sum += bytes.len();
                }
            }
            assert!(sum <= MAX_RESPONSE as usize);
        }
        let _ = protocol::read_frame_max::<protocol::AvailResponse, _>(
            &mut &bytes[..],
            protocol::MAX_AVAIL_FRAME,
        )
        .await;
    });
    let _ = protocol::decode::<protocol::AvailRequest>(bytes);
    let _ = protocol::decode::<protocol::Announcement>(bytes);
    let _ = protocol::decode::<protocol::Member>(bytes);
    let _ = protocol::decode::<protocol::JoinRequest>(bytes);
    let _ = protocol::decode::<protocol::JoinReply>(bytes);
}

/// The clock `access_message` judges events by.
pub const ACCESS_NOW_MS: u64 = 1_800_000_000_000;

/// `bytes` as an access message gossiped by `sender`: refused, or every
/// bound `log::decode_msg_at` promises holds.
pub fn access_message(bytes: &[u8], sender: DeviceId) {
    let Ok(msg) = log::decode_msg_at(bytes, sender, ACCESS_NOW_MS) else {
        return;
    };
    let events = match msg {
        log::AccessMsg::Events(e) => e,
        log::AccessMsg::Resend { after, events } => {
            assert!(events.iter().all(|e| e.seq > after));
            assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
            events
        }
        log::AccessMsg::Digest(d) => {
            assert!(d.len() <= log::MAX_DIGEST);
            return;
        }
    };
    assert!(events.len() <= log::MAX_BATCH);
    for e in &events {
        assert_eq!(e.device, sender);
        assert_eq!(e.ts_ms % log::COARSE_MS, 0);
        assert!(e.ts_ms <= ACCESS_NOW_MS + log::MAX_CLOCK_AHEAD_MS);
    }
}

/// `bytes` as a Raft-protocol frame from the authenticated `from`:
/// refused as malformed, or decoded and judged (`forged`).
pub fn raft_frame(bytes: &[u8], from: DeviceId) {
    crate::raft::judge_frame(bytes, from);
}

/// `text` as an invite code (`meshfs join`): refused, or one that names
/// an address.
pub fn invite_code(text: &str) {
    if let Ok(code) = protocol::InviteCode::decode(text) {
        assert!(!code.addrs.is_empty());
    }
}

/// `text` as a config file: parsed, or refused with one line that says
/// why (`meshfs config check`).
pub fn config_text(text: &str) {
    let path = std::path::Path::new("config.toml");
    if let Err(e) = crate::config::Config::parse(text, path) {
        let shown = e.to_string();
        assert!(!shown.trim_end().contains('\n'), "{shown:?}");
    }
}
