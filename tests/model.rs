//! Model-based test: seeded sequences of mixed operations run on a meshfs
//! mount and on a plain directory side by side; every result (success or
//! errno, bytes read) and the final trees must agree. Set MESHFS_SEED to
//! replay one seed; the seed is printed on failure.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::Device;

const NAMES: &[&str] = &["a", "b", "c", "d0", "d1"];

fn random_rel(rng: &mut SmallRng) -> String {
    let depth = rng.gen_range(1..=3);
    (0..depth)
        .map(|_| NAMES[rng.gen_range(0..NAMES.len())])
        .collect::<Vec<_>>()
        .join("/")
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: String,
        offset: u64,
        len: usize,
        seed: u64,
        create: bool,
    },
    Truncate {
        path: String,
        size: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Read {
        path: String,
    },
    OpenUnlinkRead {
        path: String,
    },
}

fn random_op(rng: &mut SmallRng) -> Op {
    let path = random_rel(rng);
    match rng.gen_range(0..22) {
        0..=5 => Op::Write {
            path,
            // Mostly small offsets; sometimes far out, leaving holes of
            // several MiB (stored as zero runs).
            offset: match rng.gen_range(0..10) {
                0 => rng.gen_range(0..6_000_000),
                1..=3 => rng.gen_range(0..300_000),
                _ => rng.gen_range(0..5000),
            },
            len: rng.gen_range(0..70_000),
            seed: rng.gen(),
            create: rng.gen_bool(0.8),
        },
        6 | 7 => Op::Truncate {
            path,
            size: if rng.gen_bool(0.2) {
                rng.gen_range(0..5_000_000)
            } else {
                rng.gen_range(0..200_000)
            },
        },
        8 | 9 => Op::Rename {
            from: path,
            to: random_rel(rng),
        },
        10 => Op::Link {
            from: path,
            to: random_rel(rng),
        },
        11 | 12 => Op::Unlink { path },
        13 | 14 => Op::Mkdir { path },
        15 => Op::Rmdir { path },
        16 => Op::Chmod {
            path,
            mode: [0o600, 0o644, 0o755, 0o700, 0o4755][rng.gen_range(0..5)],
        },
        17 => Op::Symlink {
            target: random_rel(rng),
            path,
        },
        18 => Op::OpenUnlinkRead { path },
        _ => Op::Read { path },
    }
}

/// Content as length and BLAKE3, so a divergence prints readably.
#[derive(Debug, PartialEq)]
struct Digest(usize, String);

fn digest(d: &[u8]) -> Digest {
    Digest(d.len(), blake3::hash(d).to_hex()[..16].to_string())
}

#[derive(Debug, PartialEq)]
enum Res {
    Ok,
    Data(Digest),
    Err(i32),
}

fn res<T>(r: std::io::Result<T>) -> Res {
    match r {
        Ok(_) => Res::Ok,
        Err(e) => Res::Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    common::bytes(len, seed)
}

fn apply(root: &Path, op: &Op) -> Res {
    let p = |s: &str| root.join(s);
    match op {
        Op::Write {
            path,
            offset,
            len,
            seed,
            create,
        } => {
            let r = OpenOptions::new()
                .write(true)
                .create(*create)
                .open(p(path))
                .and_then(|f| {
                    f.write_all_at(&payload(*len, *seed), *offset)?;
                    Ok(f)
                });
            res(r)
        }
        Op::Truncate { path, size } => res(OpenOptions::new()
            .write(true)
            .open(p(path))
            .and_then(|f| f.set_len(*size))),
        Op::Rename { from, to } => res(fs::rename(p(from), p(to))),
        Op::Link { from, to } => res(fs::hard_link(p(from), p(to))),
        Op::Unlink { path } => res(fs::remove_file(p(path))),
        Op::Mkdir { path } => res(fs::create_dir(p(path))),
        Op::Rmdir { path } => res(fs::remove_dir(p(path))),
        Op::Chmod { path, mode } => res(fs::set_permissions(
            p(path),
            fs::Permissions::from_mode(*mode),
        )),
        Op::Symlink { target, path } => res(std::os::unix::fs::symlink(target, p(path))),
        Op::Read { path } => match fs::read(p(path)) {
            Ok(d) => Res::Data(digest(&d)),
            Err(e) => Res::Err(e.raw_os_error().unwrap_or(-1)),
        },
        Op::OpenUnlinkRead { path } => {
            let mut f = match fs::File::open(p(path)) {
                Ok(f) => f,
                Err(e) => return Res::Err(e.raw_os_error().unwrap_or(-1)),
            };
            if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
                return Res::Ok;
            }
            if let Err(e) = fs::remove_file(p(path)) {
                return Res::Err(e.raw_os_error().unwrap_or(-1));
            }
            let mut d = Vec::new();
            match f.read_to_end(&mut d) {
                Ok(_) => Res::Data(digest(&d)),
                Err(e) => Res::Err(e.raw_os_error().unwrap_or(-1)),
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Node {
    File { mode: u32, nlink: u64, data: Digest },
    Dir { mode: u32, nlink: u64 },
    Link { target: PathBuf },
}

fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let m = fs::symlink_metadata(&path).unwrap();
            let node = if m.file_type().is_symlink() {
                Node::Link {
                    target: fs::read_link(&path).unwrap(),
                }
            } else if m.is_dir() {
                stack.push(path.clone());
                Node::Dir {
                    mode: m.mode() & 0o7777,
                    nlink: m.nlink(),
                }
            } else {
                Node::File {
                    mode: m.mode() & 0o7777,
                    nlink: m.nlink(),
                    data: digest(&fs::read(&path).unwrap()),
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

fn run_seed(seed: u64, ops: usize) {
    let d = Device::start("model");
    let plain = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    for i in 0..ops {
        let op = random_op(&mut rng);
        let want = apply(plain.path(), &op);
        let got = apply(d.mountpoint(), &op);
        assert_eq!(
            got, want,
            "seed {seed}: op #{i} {op:?} diverged (meshfs vs plain dir)"
        );
    }
    let want = snapshot(plain.path());
    let got = snapshot(d.mountpoint());
    for (k, v) in &want {
        assert_eq!(
            got.get(k),
            Some(v),
            "seed {seed}: final tree differs at {k}"
        );
    }
    assert_eq!(
        got.len(),
        want.len(),
        "seed {seed}: final trees differ in size"
    );
}

#[test]
fn random_operations_match_a_plain_directory() {
    require_root!();
    let seeds: Vec<u64> = match std::env::var("MESHFS_SEED") {
        Ok(s) => vec![s.parse().expect("MESHFS_SEED must be a number")],
        Err(_) => (1..=5).collect(),
    };
    for seed in seeds {
        eprintln!("model test: seed {seed}");
        run_seed(seed, 1000);
    }
}
