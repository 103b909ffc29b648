//! Synthetic cross-device workloads for `meshfs trace gen` and the harness:
//! a developer's edit-build-test loop, a photo album walked on a laptop then
//! a tablet, music playlists, and a daily routine with per-device variation
//! and noise. Deterministic from a seed, in the contract's trace format.

use super::trace::TraceEvent;
use super::SplitMix;

pub const WORKLOADS: [&str; 5] = ["dev", "photos", "music", "routine", "mixed"];

struct Gen {
    rng: SplitMix,
    ts: u64,
    out: Vec<TraceEvent>,
}

const SECOND: u64 = 1000;
const HOUR: u64 = 3600 * SECOND;

/// Users appear in traces as keyed hashes, never as names.
fn user(name: &str) -> String {
    blake3::keyed_hash(&[7u8; 32], name.as_bytes()).to_hex()[..16].to_string()
}

impl Gen {
    fn open(&mut self, device: &str, user: &str, path: String, size: u64, gap_ms: u64) {
        self.ts += gap_ms.max(1);
        self.out.push(TraceEvent {
            ts_ms: self.ts,
            device: device.into(),
            user: user.into(),
            path,
            size,
        });
    }

    /// A size that stays the same for the same path.
    fn size_of(path: &str, lo: u64, hi: u64) -> u64 {
        let h = blake3::hash(path.as_bytes());
        let b = h.as_bytes();
        let x = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        lo + x % (hi - lo + 1)
    }

    fn pause(&mut self, ms: u64) {
        self.ts += ms;
    }

    /// Edit a few sources, build (every source in a fixed order), test.
    fn dev(&mut self, events: usize, who: &str) {
        let u = user(who);
        let srcs: Vec<String> = (0..24)
            .map(|i| format!("/home/{who}/proj/src/mod{i:02}.rs"))
            .collect();
        let tests: Vec<String> = (0..6)
            .map(|i| format!("/home/{who}/proj/tests/t{i}.rs"))
            .collect();
        let start = self.out.len();
        let mut day = 0;
        while self.out.len() - start < events {
            let device = if day % 3 == 2 { "laptop" } else { "desktop" };
            for _ in 0..(3 + self.rng.below(4)) {
                // Edits cluster on a few modules that drift over the days.
                let focus = (day * 3 + self.rng.below(5) as usize) % srcs.len();
                let path = srcs[focus].clone();
                self.open(
                    device,
                    &u,
                    path.clone(),
                    Self::size_of(&path, 2_000, 40_000),
                    20 * SECOND,
                );
                self.open(
                    device,
                    &u,
                    format!("/home/{who}/proj/Cargo.toml"),
                    900,
                    30 * SECOND,
                );
                self.open(
                    device,
                    &u,
                    format!("/home/{who}/proj/Cargo.lock"),
                    60_000,
                    200,
                );
                for s in &srcs {
                    self.open(device, &u, s.clone(), Self::size_of(s, 2_000, 40_000), 50);
                }
                let bin = format!("/home/{who}/proj/target/debug/proj");
                self.open(device, &u, bin, 8_000_000, 2 * SECOND);
                for t in &tests {
                    self.open(device, &u, t.clone(), Self::size_of(t, 1_000, 9_000), 300);
                }
                if self.rng.chance(0.3) {
                    let n = self.rng.below(400);
                    self.open(
                        device,
                        &u,
                        format!("/home/{who}/notes/n{n}.md"),
                        3_000,
                        5 * SECOND,
                    );
                }
            }
            day += 1;
            self.pause(20 * HOUR);
        }
    }

    /// Albums walked in order on the laptop, then again on the tablet
    /// (a few photos skipped each time).
    fn photos(&mut self, events: usize, who: &str) {
        let u = user(who);
        let start = self.out.len();
        let mut album = 0;
        while self.out.len() - start < events {
            let n = 40 + self.rng.below(80) as usize;
            for device in ["laptop", "tablet"] {
                for i in 0..n {
                    if self.rng.chance(0.05) {
                        continue;
                    }
                    let p = format!("/home/{who}/Pictures/{album:03}/IMG_{i:04}.jpg");
                    let size = Self::size_of(&p, 2_000_000, 6_000_000);
                    let gap = 3 * SECOND + self.rng.below(5 * SECOND);
                    self.open(device, &u, p, size, gap);
                }
                self.pause(3 * HOUR);
            }
            album += 1;
        }
    }

    /// Playlists played in order on the phone and the desktop; one session
    /// in five is shuffled (unpredictable on purpose).
    fn music(&mut self, events: usize, who: &str) {
        let u = user(who);
        let lists: Vec<Vec<String>> = (0..8)
            .map(|l| {
                (0..15)
                    .map(|t| {
                        format!(
                            "/home/{who}/Music/list{l}/track{:02}.flac",
                            (t * 7 + l) % 40
                        )
                    })
                    .collect()
            })
            .collect();
        let start = self.out.len();
        while self.out.len() - start < events {
            let device = if self.rng.chance(0.6) {
                "phone"
            } else {
                "desktop"
            };
            let list = &lists[self.rng.below(lists.len() as u64) as usize];
            let mut order: Vec<usize> = (0..list.len()).collect();
            if self.rng.chance(0.2) {
                for i in (1..order.len()).rev() {
                    order.swap(i, self.rng.below(i as u64 + 1) as usize);
                }
            }
            for i in order {
                let p = list[i].clone();
                let size = Self::size_of(&p, 4_000_000, 9_000_000);
                self.open(device, &u, p, size, 200 * SECOND);
            }
            self.pause(5 * HOUR);
        }
    }

    /// The same morning, work and evening steps every day, on different
    /// devices, with variation and 10% noise.
    fn routine(&mut self, events: usize, who: &str) {
        let u = user(who);
        let morning = [
            "mail/inbox.mbox",
            "calendar/cal.ics",
            "news/feed.xml",
            "todo.txt",
        ];
        let work: Vec<String> = (0..12).map(|i| format!("docs/report{i}.odt")).collect();
        let evening = ["books/novel.epub", "books/notes.md", "todo.txt"];
        let start = self.out.len();
        let mut day = 0u64;
        while self.out.len() - start < events {
            let (m_dev, w_dev, e_dev) = if day % 7 >= 5 {
                ("tablet", "laptop", "tablet")
            } else {
                ("phone", "desktop", "laptop")
            };
            for f in morning {
                self.open(
                    m_dev,
                    &u,
                    format!("/home/{who}/{f}"),
                    Self::size_of(f, 10_000, 2_000_000),
                    40 * SECOND,
                );
            }
            self.pause(HOUR);
            // Work: this week's documents in order, sometimes revisiting one.
            let first = (day / 7 * 3) as usize % work.len();
            for k in 0..5 {
                let f = &work[(first + k) % work.len()];
                self.open(
                    w_dev,
                    &u,
                    format!("/home/{who}/{f}"),
                    Self::size_of(f, 50_000, 900_000),
                    15 * 60 * SECOND,
                );
                if self.rng.chance(0.1) {
                    let n = self.rng.below(2000);
                    self.open(
                        w_dev,
                        &u,
                        format!("/home/{who}/misc/file{n}"),
                        20_000,
                        10 * SECOND,
                    );
                }
            }
            self.pause(5 * HOUR);
            for f in evening {
                if self.rng.chance(0.15) {
                    continue;
                }
                self.open(
                    e_dev,
                    &u,
                    format!("/home/{who}/{f}"),
                    Self::size_of(f, 100_000, 3_000_000),
                    30 * 60 * SECOND,
                );
            }
            self.pause(10 * HOUR);
            day += 1;
        }
    }
}

/// Generates about `events` opens of the named workload (see `WORKLOADS`).
pub fn generate(workload: &str, events: usize, seed: u64) -> Option<Vec<TraceEvent>> {
    let mut g = Gen {
        rng: SplitMix::new(seed),
        ts: 1_767_225_600_000,
        out: Vec::new(),
    };
    match workload {
        "dev" => g.dev(events, "alice"),
        "photos" => g.photos(events, "alice"),
        "music" => g.music(events, "bob"),
        "routine" => g.routine(events, "bob"),
        "mixed" => {
            // Two people, four workloads, interleaved by time.
            let quarter = events / 4;
            let mut parts = Vec::new();
            for (i, w) in ["dev", "photos", "music", "routine"].iter().enumerate() {
                let mut p = generate(w, quarter, seed.wrapping_add(i as u64 + 1))?;
                parts.append(&mut p);
            }
            parts.sort_by_key(|e| e.ts_ms);
            return Some(parts);
        }
        _ => return None,
    }
    g.out.truncate(events.max(1));
    Some(g.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_deterministic_sized_and_anonymous() {
        for w in WORKLOADS {
            let a = generate(w, 500, 3).unwrap();
            assert_eq!(a, generate(w, 500, 3).unwrap(), "{w}");
            assert!(a.len() >= 400 && a.len() <= 500, "{w}: {}", a.len());
            assert!(
                a.windows(2).all(|p| p[0].ts_ms <= p[1].ts_ms),
                "{w}: time goes forward"
            );
            assert!(a
                .iter()
                .all(|e| !e.user.contains("alice") && !e.user.contains("bob")));
            let devices: std::collections::HashSet<_> = a.iter().map(|e| &e.device).collect();
            assert!(devices.len() >= 2, "{w}: a cross-device workload");
        }
        assert!(generate("nope", 10, 1).is_none());
    }
}
