//! Media quality from a file's own headers (pure): the resolution of an
//! image (`imagesize`), and the duration, resolution and bitrate of an
//! MP4/MOV/M4A file (`mp4`). A device's quality for a media file counts
//! whether its measured throughput sustains the file's bitrate: a device on
//! a slow link would make every reader of a high-bitrate video stall.
//!
//! Only the first and last `WINDOW` bytes are read: image dimensions are in
//! the first bytes, and an MP4's `moov` box is at the start ("fast start")
//! or at the end; the `mdat` between is skipped by seeking.

use serde::{Deserialize, Serialize};

/// How much of each end of a file is read.
pub const WINDOW: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MediaInfo {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub duration_s: Option<f64>,
    /// Bits per second the whole file needs to play at its own pace.
    pub bitrate_kbps: Option<f64>,
}

impl MediaInfo {
    /// In (0, 1]: how much of the bitrate `throughput_mib_s` sustains (1
    /// when unknown or enough).
    pub fn sustained(&self, throughput_mib_s: Option<f64>) -> f64 {
        match (self.bitrate_kbps, throughput_mib_s) {
            (Some(b), Some(t)) if b > 0.0 && t > 0.0 => {
                let kbps = t * 8.0 * 1048.576;
                (kbps / b).clamp(0.05, 1.0)
            }
            _ => 1.0,
        }
    }
}

/// Media facts of a file of `size` bytes whose first bytes are `head` and
/// last bytes `tail` (both at most `WINDOW`; `tail` may overlap `head`).
/// None when it is no image or MP4 family file that can be read, or its
/// headers are damaged: bad input is never a panic.
pub fn media_info(head: &[u8], tail: &[u8], size: u64) -> Option<MediaInfo> {
    if let Ok(dim) = imagesize::blob_size(head) {
        return Some(MediaInfo {
            width: u32::try_from(dim.width).ok(),
            height: u32::try_from(dim.height).ok(),
            ..Default::default()
        });
    }
    if head.len() < 12 || &head[4..8] != b"ftyp" {
        return None;
    }
    let view = Ends {
        head,
        tail,
        size,
        pos: 0,
    };
    // The crate is not ours: a damaged file must not take the daemon down.
    let parsed = std::panic::catch_unwind(move || {
        let mp4 = mp4::Mp4Reader::read_header(view, size).ok()?;
        let duration = mp4.duration().as_secs_f64();
        let video = mp4
            .tracks()
            .values()
            .find(|t| t.width() > 0 && t.height() > 0);
        Some(MediaInfo {
            width: video.map(|t| t.width() as u32),
            height: video.map(|t| t.height() as u32),
            duration_s: (duration > 0.0).then_some(duration),
            bitrate_kbps: (duration > 0.0).then(|| size as f64 * 8.0 / 1000.0 / duration),
        })
    });
    parsed.ok().flatten()
}

/// A file of which only both ends are at hand, as `Read + Seek`; reading
/// elsewhere is an error.
struct Ends<'a> {
    head: &'a [u8],
    tail: &'a [u8],
    size: u64,
    pos: u64,
}

impl std::io::Read for Ends<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let tail_start = self.size.saturating_sub(self.tail.len() as u64);
        let (src, at) = if self.pos < self.head.len() as u64 {
            (self.head, self.pos)
        } else if self.pos >= tail_start {
            (self.tail, self.pos - tail_start)
        } else {
            return Err(std::io::Error::other("outside the ends read"));
        };
        let at = at as usize;
        let n = buf.len().min(src.len() - at);
        buf[..n].copy_from_slice(&src[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Ends<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let next = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = next.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PNG header: signature and IHDR with 640x480.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn an_mp4_gives_duration_resolution_and_bitrate_from_its_ends() {
        let mut buf = std::io::Cursor::new(Vec::new());
        let cfg = mp4::Mp4Config {
            major_brand: "isom".parse().unwrap(),
            minor_version: 512,
            compatible_brands: vec!["isom".parse().unwrap()],
            timescale: 1000,
        };
        let mut w = mp4::Mp4Writer::write_start(&mut buf, &cfg).unwrap();
        w.add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale: 1000,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width: 1280,
                height: 720,
                seq_param_set: vec![0x67, 0x64, 0, 0x1f],
                pic_param_set: vec![0x68, 0xeb],
            }),
        })
        .unwrap();
        // 10 s of 30 KB samples: 3 MB, more than both windows, with the
        // moov box at the end (as most recorders write it).
        for i in 0..100u64 {
            let s = mp4::Mp4Sample {
                start_time: i * 100,
                duration: 100,
                rendering_offset: 0,
                is_sync: i == 0,
                bytes: bytes::Bytes::from(vec![0u8; 30_000]),
            };
            w.write_sample(1, &s).unwrap();
        }
        w.write_end().unwrap();
        let data = buf.into_inner();
        let n = data.len() as u64;
        assert!(n > 2 * WINDOW);
        let head = &data[..WINDOW as usize];
        let tail = &data[(n - WINDOW) as usize..];
        let m = media_info(head, tail, n).unwrap();
        assert_eq!((m.width, m.height), (Some(1280), Some(720)));
        let d = m.duration_s.unwrap();
        assert!((d - 10.0).abs() < 0.5, "{d}");
        let b = m.bitrate_kbps.unwrap();
        assert!((b - n as f64 * 8.0 / 1000.0 / d).abs() < 1.0, "{b}");
        // With only the head (the moov box is at the end), nothing.
        assert_eq!(media_info(head, &[], n), None);
    }

    #[test]
    fn images_give_their_resolution() {
        let p = png(640, 480);
        let m = media_info(&p, &p, p.len() as u64).unwrap();
        assert_eq!((m.width, m.height), (Some(640), Some(480)));
        assert_eq!(m.bitrate_kbps, None);
        assert_eq!(m.sustained(Some(0.1)), 1.0);
    }

    #[test]
    fn garbage_and_damaged_headers_are_none_never_a_panic() {
        assert_eq!(media_info(b"", b"", 0), None);
        assert_eq!(media_info(b"hello world, plain text", b"", 23), None);
        // An MP4 signature with nonsense after it.
        let mut bad = b"\0\0\0\x18ftypisom\0\0\0\0".to_vec();
        bad.extend_from_slice(&[0xff; 64]);
        assert_eq!(media_info(&bad, &bad, 1 << 30), None);
        // Random bytes after the signature, many seeds.
        let mut x = 12345u64;
        for _ in 0..200 {
            let mut v = b"\0\0\0\x18ftypisom\0\0\0\0".to_vec();
            for _ in 0..256 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                v.push((x >> 56) as u8);
            }
            let _ = media_info(&v, &v, v.len() as u64);
        }
    }

    #[test]
    fn throughput_below_the_bitrate_lowers_quality() {
        let m = MediaInfo {
            bitrate_kbps: Some(8000.0),
            ..Default::default()
        };
        assert_eq!(m.sustained(Some(10.0)), 1.0, "10 MiB/s sustains 8 Mbit/s");
        let slow = m.sustained(Some(0.5));
        assert!(slow > 0.4 && slow < 0.6, "{slow}");
        assert_eq!(m.sustained(None), 1.0, "unmeasured: no penalty");
    }
}
