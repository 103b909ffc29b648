//! The policy on simulated time: reports every half second, as devices
//! send them.

use super::*;

fn dev(n: u8) -> DeviceId {
    DeviceId([n; 16])
}

const R: ResourceId = ResourceId(42);

/// A report of `n` changes to `R`.
fn changes(n: u32) -> [(ResourceId, Usage); 1] {
    [(
        R,
        Usage {
            changes: n,
            ..Default::default()
        },
    )]
}
const TICK: f64 = 0.5;

fn up(n: &[u8]) -> BTreeMap<DeviceId, DeviceFacts> {
    n.iter()
        .map(|d| {
            (
                dev(*d),
                DeviceFacts {
                    up: true,
                    up_for_s: 60.0,
                    quality: Quality::default(),
                },
            )
        })
        .collect()
}

/// Runs `secs` of simulated time: `rate(t)` gives each device's changes per
/// second at time t; the authority starts at device 1 and follows every
/// decision. Returns the times of the moves and the final authority.
fn simulate(
    secs: f64,
    facts: &BTreeMap<DeviceId, DeviceFacts>,
    rate: impl Fn(f64, u8) -> f64,
) -> (Vec<(f64, DeviceId)>, DeviceId) {
    let w = Weights::default();
    let mut tracker = Tracker::default();
    let mut auth = Authority {
        device: dev(1),
        epoch: 1,
    };
    let mut moves = Vec::new();
    let mut t = 0.0;
    while t < secs {
        t += TICK;
        for d in [1u8, 2] {
            let n = (rate(t, d) * TICK).round() as u32;
            tracker.observe(t, dev(d), &changes(n), &w);
        }
        for (m, from) in tracker.decide(t, |_| Some(auth), facts, &w, |_| None) {
            assert_eq!(from, auth.device);
            assert!(m.epoch > auth.epoch);
            auth = Authority {
                device: m.device,
                epoch: m.epoch,
            };
            moves.push((t, m.device));
        }
    }
    (moves, auth.device)
}

#[test]
fn a_device_that_starts_working_takes_over_within_two_seconds() {
    // Device 1 governs but is idle; device 2 starts creating at t = 0.
    let (moves, now) = simulate(10.0, &up(&[1, 2]), |_, d| if d == 2 { 50.0 } else { 0.0 });
    assert_eq!(now, dev(2));
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert!(moves[0].0 <= 2.0, "moved only at {}", moves[0].0);
    // Slow work moves it too, only later.
    let (moves, _) = simulate(10.0, &up(&[1, 2]), |_, d| if d == 2 { 4.0 } else { 0.0 });
    assert_eq!(moves.len(), 1, "{moves:?}");
}

#[test]
fn two_devices_alternating_every_second_barely_move_it() {
    let (moves, _) = simulate(120.0, &up(&[1, 2]), |t, d| {
        let second = t.ceil() as u64;
        let writer = if second.is_multiple_of(2) { 2 } else { 1 };
        if d == writer {
            50.0
        } else {
            0.0
        }
    });
    assert!(moves.len() <= 4, "{} moves: {moves:?}", moves.len());
}

#[test]
fn noisy_equal_work_never_moves_it() {
    // Both work at about the same rate, with jitter of up to ±60%.
    let mut seed = 7u64;
    let noise = std::cell::RefCell::new(move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        0.4 + 1.2 * ((seed >> 33) as f64 / (1u64 << 31) as f64)
    });
    let (moves, now) = simulate(120.0, &up(&[1, 2]), |_, _| 20.0 * (noise.borrow_mut())());
    assert!(moves.is_empty(), "{moves:?}");
    assert_eq!(now, dev(1));
}

#[test]
fn ties_keep_the_authority_and_a_down_authority_is_left_to_takeover() {
    let (moves, now) = simulate(30.0, &up(&[1, 2]), |_, _| 10.0);
    assert!(moves.is_empty());
    assert_eq!(now, dev(1));
    // Device 1 is down: `decide` does not move its resources (takeover
    // does, after its delay).
    let mut facts = up(&[1, 2]);
    facts.get_mut(&dev(1)).unwrap().up = false;
    let (moves, _) = simulate(10.0, &facts, |_, d| if d == 2 { 50.0 } else { 0.0 });
    assert!(moves.is_empty(), "{moves:?}");
}

#[test]
fn after_a_move_the_resource_cools_down() {
    let w = Weights::default();
    let facts = up(&[1, 2, 3]);
    let mut tr = Tracker::default();
    let mut auth = Authority {
        device: dev(1),
        epoch: 1,
    };
    let mut moves = Vec::new();
    let mut t = 0.0;
    // Device 2 works for 3 s, then device 3 for 30 s.
    while t < 33.0 {
        t += TICK;
        let d = if t <= 3.0 { 2 } else { 3 };
        tr.observe(t, dev(d), &changes(25), &w);
        for (m, _) in tr.decide(t, |_| Some(auth), &facts, &w, |_| None) {
            auth = Authority {
                device: m.device,
                epoch: m.epoch,
            };
            moves.push(t);
        }
    }
    assert_eq!(auth.device, dev(3));
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves[1] - moves[0] >= w.cooldown_s, "{moves:?}");
}

#[test]
fn poor_quality_and_short_uptime_lower_reputation() {
    let w = Weights::default();
    let good = DeviceFacts {
        up: true,
        up_for_s: 10_000.0,
        quality: Quality {
            chunks_ok: 100,
            ..Default::default()
        },
    };
    let mut bad = good;
    bad.quality.chunks_bad = 20;
    let mut fresh = good;
    fresh.up_for_s = 0.0;
    let r = |f: &DeviceFacts| reputation(10.0, f, &w, None);
    assert!(r(&bad).score < r(&good).score / 2.0);
    assert_eq!(r(&fresh).score, r(&good).score / 2.0);
    assert_eq!(r(&good).quality, 1.0);
    let down = DeviceFacts { up: false, ..good };
    assert_eq!(r(&down).score, 0.0);
    // Closer and faster is a heavier weight; unknown is light.
    assert!(proximity(Some(0.2), Some(500.0)) > proximity(Some(5.0), Some(500.0)));
    assert!(proximity(Some(1.0), Some(500.0)) > proximity(Some(1.0), Some(5.0)));
    assert!(proximity(None, None) < proximity(Some(50.0), None));
}

#[test]
fn takeover_picks_a_live_holder_by_reputation() {
    let w = Weights::default();
    let mut facts = up(&[1, 2, 3, 4]);
    facts.get_mut(&dev(1)).unwrap().up = false;
    facts.get_mut(&dev(4)).unwrap().up = false;
    let mut tr = Tracker::default();
    tr.observe(
        1.0,
        dev(3),
        &[(
            R,
            Usage {
                opens: 8,
                ..Default::default()
            },
        )],
        &w,
    );
    let a = Authority {
        device: dev(1),
        epoch: 5,
    };
    let orphans = vec![
        // Held by 2 and 3: 3 used it.
        Orphaned {
            ino: R,
            authority: a,
            candidates: vec![dev(2), dev(3)],
        },
        // Held only by a device that is down too: it stays.
        Orphaned {
            ino: ResourceId(7),
            authority: a,
            candidates: vec![dev(4)],
        },
        // A directory: anyone; nobody used it, so the longest up (a tie
        // here), then the lowest id.
        Orphaned {
            ino: ResourceId(8),
            authority: a,
            candidates: vec![dev(3), dev(2), dev(1)],
        },
    ];
    let moves = takeover(&orphans, &tr, 2.0, &facts, &w);
    assert_eq!(
        moves,
        vec![
            Move {
                ino: R,
                device: dev(3),
                epoch: 6
            },
            Move {
                ino: ResourceId(8),
                device: dev(2),
                epoch: 6
            }
        ]
    );
}

#[test]
fn a_media_file_stays_with_a_device_that_can_sustain_its_bitrate() {
    // Device 1 governs and plays the file now and then; device 2 works on
    // it three times as much, but over a link that carries a tenth of the
    // file's bitrate.
    let w = Weights::default();
    let mut facts = up(&[1, 2]);
    facts.get_mut(&dev(1)).unwrap().quality.throughput_mib_s = Some(50.0);
    facts.get_mut(&dev(2)).unwrap().quality.throughput_mib_s = Some(0.1);
    let video = media::MediaInfo {
        bitrate_kbps: Some(8000.0),
        ..Default::default()
    };
    let run = |m: Option<media::MediaInfo>| {
        let mut tr = Tracker::default();
        let auth = Authority {
            device: dev(1),
            epoch: 1,
        };
        let mut moved = false;
        let mut t = 0.0;
        while t < 10.0 {
            t += TICK;
            for (d, n) in [(1u8, 5u32), (2, 15)] {
                tr.observe(t, dev(d), &changes(n), &w);
            }
            moved |= !tr.decide(t, |_| Some(auth), &facts, &w, |_| m).is_empty();
        }
        moved
    };
    assert!(run(None), "an ordinary file moves to the busier device");
    assert!(!run(Some(video)), "the video stays where it can be played");
}
