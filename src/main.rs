//! The `meshfs` command line: the contract in DESIGN.md. Parses, forks the
//! daemon for `mount`, and prints one clear line on any error.

use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use meshfs::config::{Config, MountOptions};
use meshfs::control::{self, Request};
use meshfs::error::Error;
use meshfs::node;
use meshfs::prefetch::eval;
use meshfs::progress::{Lines, Progress};

mod view;

// `view` (shared with the thin command line) finds it at the crate root.
use meshfs::civil;

#[derive(Parser)]
#[command(
    name = "meshfs",
    version,
    about = "A peer-to-peer filesystem for the devices you own"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What `init` and `join` ask about the device they create.
#[derive(clap::Args)]
struct NewDevice {
    #[arg(long)]
    data_dir: PathBuf,
    /// Device name (default: hostname).
    #[arg(long)]
    name: Option<String>,
    /// libp2p listen address, e.g. /ip4/0.0.0.0/tcp/4001 (default: all
    /// interfaces, a free port chosen now and kept).
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new mesh with this device as its first member.
    Init {
        #[command(flatten)]
        new: NewDevice,
    },
    /// Run the device and mount its filesystem at MOUNTPOINT.
    Mount {
        #[arg(long)]
        data_dir: PathBuf,
        mountpoint: PathBuf,
        /// Stay in the foreground (logs to stderr) instead of daemonizing.
        #[arg(long)]
        foreground: bool,
        /// Comma-separated mount options (ro, rw, allow_other, noexec, ...).
        #[arg(short = 'o', default_value = "")]
        options: String,
        /// Ignore unknown mount options instead of failing (mount -s).
        #[arg(long, hide = true)]
        sloppy: bool,
    },
    /// Print a one-time code that lets another device join this mesh (the
    /// daemon must be running).
    Invite {
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the code stays valid, e.g. 10m, 1h, 90s.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
    /// Join the mesh that printed CODE, creating this device's data dir.
    Join {
        /// The invite code; `-` reads it from standard input. A code on
        /// the command line is visible to other users (`ps`) while it runs:
        /// prefer `-` or `--code-file` on a shared machine.
        #[arg(required_unless_present = "code_file", conflicts_with = "code_file")]
        code: Option<String>,
        /// Read the invite code from this file.
        #[arg(long)]
        code_file: Option<PathBuf>,
        #[command(flatten)]
        new: NewDevice,
    },
    /// Remove a device from the mesh: it can no longer connect or fetch.
    RemoveDevice {
        name: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Show the device's state.
    Status {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the conflicts met when changes made while their authority was
    /// out of reach were reintegrated (what was kept where).
    Conflicts {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// Forget the conflicts listed so far (the files stay).
        #[arg(long)]
        clear: bool,
    },
    /// List the kept versions of a file under a mount (number, time, size,
    /// author device, content hash), and of the removed files that were at
    /// that path (the trash). Each is also readable at
    /// MOUNT/.meshfs/versions/PATH/N.
    Versions {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a kept version of a file current again (as a new version), or
    /// bring a removed file back at its path (its last version unless
    /// --version says which).
    Restore {
        path: PathBuf,
        /// The version to restore (from `meshfs versions`).
        #[arg(long)]
        version: Option<u64>,
        /// Which removed file to bring back, by the resource number
        /// `meshfs versions` lists (default: the most recently removed).
        #[arg(long)]
        deleted: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Show who governs a file or directory under a mount and why:
    /// authority and epoch, reputation per device, observed quality,
    /// proximity to each holder, temperature, version.
    Stat {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Keep a file or directory tree under a mount on this device: fetch
    /// it now (with progress) and never evict it. Pins follow renames.
    Pin {
        path: PathBuf,
        /// Return at once; the fetch goes on in the background
        /// (`meshfs pins` shows how far it is).
        #[arg(long)]
        no_wait: bool,
        /// Stop waiting (exit 2; the pin stays and the fetch goes on) when
        /// nothing arrives for this many seconds.
        #[arg(long, default_value_t = 60)]
        stall_s: u64,
    },
    /// Drop the pin of a file or directory tree (its content may then be
    /// evicted like any cached copy).
    Unpin { path: PathBuf },
    /// List the pinned trees of a device and how much of each is here.
    Pins {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify the chunk store against the namespace; exit 0 when all is well.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish,
    /// powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (meshfs.1 and one per command) into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show the effective config, or check a config file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Access traces: export this mesh's log, or generate a synthetic one.
    Trace {
        #[command(subcommand)]
        cmd: TraceCmd,
    },
    /// Replay a trace through every predictor and the prefetch policy.
    PrefetchEval {
        /// A trace in the contract format (JSON lines); - for stdin.
        #[arg(long)]
        trace: PathBuf,
        /// Cache size of every simulated device, MiB.
        #[arg(long, default_value_t = 256)]
        cache_mb: u64,
        /// Most predicted items one open may prefetch.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
        top: u64,
        /// Skip the learned predictors (gru, gru+markov).
        #[arg(long)]
        no_learned: bool,
        /// Follow a person across devices as the daemon does: seconds of
        /// trace time after which a quiet session is continued on the
        /// device they most often move to next (0: off).
        #[arg(long, default_value_t = 300)]
        follow_after_s: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the data dir's effective config as TOML: every key, defaults
    /// included.
    Show {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Check a config file: "ok", or one line naming the key at fault.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Write the mesh's access log as JSON lines to stdout (paths as this
    /// device's namespace names them; users as their anonymized hash).
    Export {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Write a synthetic cross-device workload as JSON lines to stdout.
    Gen {
        /// dev, photos, music, routine or mixed.
        workload: String,
        #[arg(long, default_value_t = 5000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshfs: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line: scripts read the first line only.
fn one_line(e: &anyhow::Error) -> String {
    let text = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("MESHFS_LOG").unwrap_or_else(|_| {
        // openraft narrates every vote and membership step at info; our own
        // lines say what matters. A filter that names openraft wins.
        if default.contains("openraft") {
            tracing_subscriber::EnvFilter::new(default)
        } else {
            tracing_subscriber::EnvFilter::new(format!("{default},openraft=warn"))
        }
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Init {
            new:
                NewDevice {
                    data_dir,
                    name,
                    listen,
                },
        } => {
            init_cli_log();
            let cfg = node::init(&data_dir, name, listen)?;
            println!(
                "initialised {} as device '{}' ({})",
                data_dir.display(),
                cfg.name,
                cfg.device_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Mount {
            data_dir,
            mountpoint,
            foreground,
            options,
            sloppy,
        } => mount(&data_dir, &mountpoint, foreground, &options, sloppy),
        Cmd::Invite { data_dir, ttl } => {
            init_cli_log();
            Config::load(&data_dir)?;
            let v = control::request(
                &data_dir,
                &Request::Invite {
                    ttl_s: ttl.as_secs().max(1),
                },
            )
            .map_err(|e| match e {
                Error::NotRunning(d) => anyhow::anyhow!(
                    "no meshfs daemon is running for {}; `meshfs invite` needs the device mounted (meshfs mount --data-dir {} MOUNTPOINT)",
                    d.display(),
                    d.display()
                ),
                e => e.into(),
            })?;
            println!("{}", v["code"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Join {
            code,
            code_file,
            new:
                NewDevice {
                    data_dir,
                    name,
                    listen,
                },
        } => {
            init_cli_log();
            let code = invite_code(code, code_file)?;
            let cfg = node::join(&code, &data_dir, name, listen)?;
            println!(
                "joined the mesh as device '{}' ({}); data dir {}",
                cfg.name,
                cfg.device_id,
                data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::RemoveDevice { name, data_dir } => {
            init_cli_log();
            Config::load(&data_dir)?;
            match control::request(&data_dir, &Request::RemoveDevice { name: name.clone() }) {
                Ok(_) => {}
                Err(Error::NotRunning(_)) => node::offline_remove_device(&data_dir, &name)?,
                Err(e) => return Err(e.into()),
            }
            println!("removed device '{name}' from the mesh");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { data_dir, json } => {
            init_cli_log();
            Config::load(&data_dir)?;
            let v = match control::request(&data_dir, &Request::Status) {
                Ok(v) => v,
                Err(Error::NotRunning(_)) => node::offline_status(&data_dir)?,
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{v}");
            } else {
                view::print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Conflicts {
            data_dir,
            json,
            clear,
        } => {
            init_cli_log();
            let v = control::request(&data_dir, &Request::Conflicts { clear })?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                return Err(anyhow::anyhow!("{e}"));
            }
            if json {
                println!("{v}");
            } else {
                view::print_conflicts(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pin {
            path,
            no_wait,
            stall_s,
        } => {
            init_cli_log();
            let (data_dir, rel) = meshfs::mountinfo::mesh_path_of(&path).map_err(Error::Mount)?;
            let v = control::request(&data_dir, &Request::Pin { path: rel.clone() })?;
            let resource = v["resource"].as_u64().unwrap_or_default();
            let shown = path.display().to_string();
            if v["new"].as_bool() == Some(false) {
                eprintln!("{shown} was pinned already");
            }
            if no_wait {
                println!("pinned {shown}; fetching in the background");
                return Ok(ExitCode::SUCCESS);
            }
            follow_pin(&data_dir, resource, &shown, Duration::from_secs(stall_s))
        }
        Cmd::Unpin { path } => {
            init_cli_log();
            let (data_dir, rel) = meshfs::mountinfo::mesh_path_of(&path).map_err(Error::Mount)?;
            let v = control::request(&data_dir, &Request::Unpin { path: rel })?;
            println!("unpinned {}", v["unpinned"].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pins { data_dir, json } => {
            init_cli_log();
            let v = control::request(&data_dir, &Request::Pins)?;
            if json {
                println!("{v}");
            } else {
                view::print_pins(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Versions { path, json } => {
            init_cli_log();
            let (data_dir, rel) = meshfs::mountinfo::mesh_path_of(&path).map_err(Error::Mount)?;
            let v = control::request(&data_dir, &Request::Versions { path: rel })?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                return Err(anyhow::anyhow!("{e}"));
            }
            if json {
                println!("{v}");
            } else {
                view::print_versions(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            path,
            version,
            deleted,
            json,
        } => {
            init_cli_log();
            let (data_dir, rel) = meshfs::mountinfo::mesh_path_of(&path).map_err(Error::Mount)?;
            let req = Request::Restore {
                path: rel,
                version,
                deleted,
            };
            let v = control::request(&data_dir, &req)?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                return Err(anyhow::anyhow!("{e}"));
            }
            if json {
                println!("{v}");
            } else if v["undeleted"].as_bool().unwrap_or(false) {
                println!(
                    "{}: brought back from the trash (its version {}, now version {})",
                    path.display(),
                    v["from"],
                    v["version"]
                );
            } else {
                println!(
                    "{}: version {} restored as version {}",
                    path.display(),
                    v["from"],
                    v["version"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stat { path, json } => {
            init_cli_log();
            let (data_dir, ino) = node::daemon_of_path(&path)?;
            let v = control::request(&data_dir, &Request::Stat { resource: ino })?;
            if json {
                println!("{v}");
            } else {
                view::print_stat(&path, &v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { data_dir, json } => {
            init_cli_log();
            Config::load(&data_dir)?;
            let report = check_following(&data_dir)?;
            // A key a report lacks (from an older daemon) counts as empty.
            let clean = [
                "missing_chunks",
                "corrupt_chunks",
                "wrong_refcounts",
                "state_mismatch",
            ]
            .iter()
            .all(|k| {
                report
                    .get(k)
                    .is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty()))
            });
            if json {
                println!("{}", serde_json::json!({"ok": clean, "report": report}));
            } else {
                println!(
                    "{}: {} inodes, {} chunks referenced ({} held by other devices, {} not here and not checked), {} unreferenced",
                    if clean { "ok" } else { "PROBLEMS" },
                    report["inodes"],
                    report["chunks_referenced"],
                    report["held_elsewhere"],
                    report["unverified_not_here"],
                    report["unreferenced_chunks"]
                );
                for k in [
                    "missing_chunks",
                    "corrupt_chunks",
                    "wrong_refcounts",
                    "state_mismatch",
                ] {
                    for item in report[k].as_array().into_iter().flatten() {
                        println!("{k}: {}", item.as_str().unwrap_or_default());
                    }
                }
            }
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Config {
            cmd: ConfigCmd::Show { data_dir },
        } => {
            print!("{}", Config::load(&data_dir)?.show()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
            Config::parse(&text, &file)?;
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "meshfs", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| Error::io(format!("writing man pages to {}", dir.display()), e))?;
            println!("man pages written to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Trace { cmd } => trace_cmd(cmd),
        Cmd::PrefetchEval {
            trace,
            cache_mb,
            top,
            no_learned,
            follow_after_s,
            json,
        } => prefetch_eval(
            &trace,
            eval::EvalOptions {
                cache_mb,
                top: top as usize,
                learned: !no_learned,
                follow_after_ms: (follow_after_s > 0).then(|| follow_after_s.saturating_mul(1000)),
                ..Default::default()
            },
            json,
        ),
    }
}

fn prefetch_eval(trace: &Path, opts: eval::EvalOptions, json: bool) -> anyhow::Result<ExitCode> {
    use meshfs::prefetch::trace as tr;
    let events = if trace == Path::new("-") {
        tr::read(std::io::stdin().lock())?
    } else {
        let f = std::fs::File::open(trace)
            .with_context(|| format!("cannot open trace {}", trace.display()))?;
        tr::read(std::io::BufReader::new(f))
            .with_context(|| format!("trace {}", trace.display()))?
    };
    if events.is_empty() {
        anyhow::bail!("trace {} has no events", trace.display());
    }
    let (rows, summary) = eval::evaluate(&events, &opts)?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", eval::table(&rows, &summary));
    }
    Ok(ExitCode::SUCCESS)
}

fn trace_cmd(cmd: TraceCmd) -> anyhow::Result<ExitCode> {
    use meshfs::prefetch::{trace as tr, workload};
    match cmd {
        TraceCmd::Export { data_dir } => {
            init_cli_log();
            Config::load(&data_dir)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match control::request(&data_dir, &Request::TraceExport) {
                Ok(v) => {
                    let path = PathBuf::from(v["file"].as_str().unwrap_or_default());
                    let copied = std::fs::File::open(&path)
                        .and_then(|mut f| std::io::copy(&mut f, &mut out))
                        .and_then(|_| out.flush());
                    let _ = std::fs::remove_file(&path);
                    copied.with_context(|| format!("copying {}", path.display()))?;
                }
                Err(Error::NotRunning(_)) => {
                    node::offline_trace(&data_dir, &mut out)?;
                }
                Err(e) => return Err(e.into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        TraceCmd::Gen {
            workload: w,
            events,
            seed,
        } => {
            let Some(events) = workload::generate(&w, events, seed) else {
                anyhow::bail!(
                    "unknown workload '{w}' (one of: {})",
                    workload::WORKLOADS.join(", ")
                );
            };
            let out = std::io::stdout().lock();
            tr::write(std::io::BufWriter::new(out), &events)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `meshfs check`'s report, from the daemon or (not running) from the data
/// dir directly, with progress shown while the chunks are read (`Progress`:
/// plain lines on stderr, so that `--json` output stays clean).
fn check_following(data_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let mut progress = Progress::new("checking", Lines::Stderr);
    let mut last = serde_json::Value::Null;
    let mut show = |p: &serde_json::Value| {
        let (done, total, extra) = check_progress(p);
        progress.update(done, total, &extra);
        last = p.clone();
    };
    let req = Request::Check { progress: true };
    let report = match control::request_following(data_dir, &req, &mut show) {
        Ok(v) => v.get("report").cloned().unwrap_or_default(),
        Err(Error::NotRunning(_)) => {
            let counts = meshfs::storage::CheckProgress::default();
            let now = control::check_progress_json;
            let report = std::thread::scope(|s| {
                let check = s.spawn(|| node::offline_check(data_dir, &counts));
                while !check.is_finished() {
                    std::thread::sleep(Duration::from_millis(100));
                    show(&now(&counts));
                }
                check
                    .join()
                    .map_err(|_| anyhow::anyhow!("the check stopped on an internal error"))
            })??;
            show(&now(&counts));
            serde_json::to_value(report)?
        }
        Err(e) => return Err(e.into()),
    };
    // The last line says what was read in all, however quick the check.
    let (done, total, extra) = check_progress(&last);
    progress.finish_with(done, total, &extra);
    Ok(report)
}

/// Bytes done and total of a check's progress line, and the chunk counts.
fn check_progress(p: &serde_json::Value) -> (u64, u64, String) {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    (
        n("bytes_done"),
        n("bytes_total"),
        format!(", {} of {} chunks", n("chunks_done"), n("chunks_total")),
    )
}

/// Follows a pin's fetch until its tree is here: an indicatif bar (bytes,
/// rate, ETA) on a terminal, a plain line every 2 s otherwise. Exit 2 when
/// nothing arrives for `stall` (the pin stays; the fetch goes on).
fn follow_pin(
    data_dir: &Path,
    resource: u64,
    shown: &str,
    stall: Duration,
) -> anyhow::Result<ExitCode> {
    let mut progress = Progress::new(&format!("pinning {shown}"), Lines::Stdout);
    let mut last_here = None;
    let mut last_change = Instant::now();
    loop {
        let v = control::request(data_dir, &Request::Pins)?;
        let Some(p) = v["pins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["resource"].as_u64() == Some(resource))
        else {
            return Err(anyhow::anyhow!(
                "{shown}: the pin is gone (unpinned meanwhile?)"
            ));
        };
        let (here, total) = (
            p["bytes_here"].as_u64().unwrap_or(0),
            p["bytes_total"].as_u64().unwrap_or(0),
        );
        let files = p["files"].as_u64().unwrap_or(0);
        if last_here != Some(here) {
            last_here = Some(here);
            last_change = Instant::now();
        }
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let extra = format!(", {files} files");
        progress.update(here, total, &extra);
        if here >= total {
            progress.finish_with(here, total, &extra);
            println!("pinned {shown}: {files} files, {:.1} MiB here", mib(total));
            return Ok(ExitCode::SUCCESS);
        }
        if last_change.elapsed() >= stall {
            progress.abandon();
            eprintln!(
                "meshfs: {shown}: nothing arrived for {} s ({:.1} of {:.1} MiB here): no device holding the rest is reachable. The pin stays and the rest is fetched when one is.",
                stall.as_secs(),
                mib(here),
                mib(total)
            );
            return Ok(ExitCode::from(2));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn init_cli_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter("warn"))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses 90, 90s, 10m, 2h, 1d.
/// The invite code `meshfs join` was given: on the command line, from
/// standard input (`-`), or from `--code-file`; its first line, trimmed.
fn invite_code(code: Option<String>, file: Option<PathBuf>) -> Result<String, Error> {
    let (text, from) = match (code.as_deref(), file) {
        (Some("-"), _) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| Error::io("reading the invite code from standard input", e))?;
            (line, "standard input".to_string())
        }
        (Some(c), _) => (c.to_string(), "the command line".to_string()),
        (None, Some(f)) => (
            std::fs::read_to_string(&f).map_err(|e| {
                Error::io(format!("reading the invite code from {}", f.display()), e)
            })?,
            f.display().to_string(),
        ),
        (None, None) => (String::new(), "nowhere".to_string()),
    };
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(code) => Ok(code.to_string()),
        None => Err(Error::Usage(format!("no invite code in {from}"))),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 90s, 10m, 2h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("bad duration unit in {s:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("duration must be positive".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

fn mount(
    data_dir: &Path,
    mountpoint: &Path,
    foreground: bool,
    options: &str,
    sloppy: bool,
) -> anyhow::Result<ExitCode> {
    // Everything that can be checked before forking is, so that errors
    // reach the terminal directly.
    let opts = MountOptions::parse(options, sloppy)?;
    let data_dir = std::fs::canonicalize(data_dir)
        .map_err(|_| Error::NotInitialized(data_dir.to_path_buf()))?;
    let cfg = Config::load(&data_dir)?;
    let mountpoint = node::check_mountpoint(mountpoint, &data_dir)?;

    if foreground {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(log_filter(&cfg.log))
            .with_writer(std::io::stderr)
            .try_init();
        node::spawn_mount_watcher(&mountpoint, &data_dir);
        node::run_daemon(&data_dir, &mountpoint, &opts, |_| {})?;
        return Ok(ExitCode::SUCCESS);
    }

    // Daemonize: fork before any thread exists; the child reports start-up
    // over a pipe so that this process exits only once the mount is usable.
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating a pipe");
    }
    // SAFETY: the fds were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded here (no runtime, no logger threads yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid > 0 {
        drop(wr);
        let mut msg = String::new();
        let _ = std::fs::File::from(rd).read_to_string(&mut msg);
        return match msg.strip_prefix("OK") {
            Some(_) => Ok(ExitCode::SUCCESS),
            None if msg.is_empty() => anyhow::bail!(
                "the daemon exited during start-up; see {}",
                data_dir.join(node::LOG_FILE).display()
            ),
            None => anyhow::bail!("{}", msg.trim_start_matches("ERR ").trim()),
        };
    }
    drop(rd);
    // Child: detach from the terminal and log to the data dir.
    // SAFETY: setsid has no preconditions in a fresh child.
    unsafe { libc::setsid() };
    // Paths are absolute by now; holding the caller's cwd would keep that
    // filesystem busy for as long as the daemon runs.
    let _ = std::env::set_current_dir("/");
    let log_path = data_dir.join(node::LOG_FILE);
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    // Also points stdout and stderr at the log (and at each new one after
    // a rotation).
    let log = meshfs::logfile::RotatingLog::open(
        &log_path,
        cfg.log_max_mb.saturating_mul(1 << 20),
        cfg.log_keep,
        true,
    );
    {
        use std::os::unix::io::AsRawFd;
        // Whatever happens, the parent's stdout/stderr must be let go, or a
        // caller waiting for them to close (mount -a, a test) would hang.
        // SAFETY: dup2 onto the standard descriptors with fds we own.
        unsafe {
            if let Ok(null) = &devnull {
                libc::dup2(null.as_raw_fd(), 0);
                if log.is_err() {
                    libc::dup2(null.as_raw_fd(), 1);
                    libc::dup2(null.as_raw_fd(), 2);
                }
            }
        }
    }
    let _ = match log {
        Ok(log) => tracing_subscriber::fmt()
            .with_env_filter(log_filter(&cfg.log))
            .with_ansi(false)
            .with_writer(log)
            .try_init(),
        Err(_) => tracing_subscriber::fmt()
            .with_env_filter(log_filter(&cfg.log))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    let mut wr = Some(std::fs::File::from(wr));
    node::spawn_mount_watcher(&mountpoint, &data_dir);
    let r = node::run_daemon(&data_dir, &mountpoint, &opts, |res| {
        if let Some(mut w) = wr.take() {
            let line = match res {
                Ok(()) => "OK\n".to_string(),
                Err(e) => format!("ERR {e}\n"),
            };
            let _ = w.write_all(line.as_bytes());
        }
    });
    if let Err(e) = &r {
        tracing::error!(error = %e, "daemon failed");
    }
    // The child never returns to the parent's logic.
    std::process::exit(if r.is_ok() { 0 } else { 1 });
}
