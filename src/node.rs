//! Composition root: creates a data dir, builds every subsystem of a device
//! (storage, namespace, filesystem, mount, control socket) and owns start-up
//! and shutdown. The daemon runs here; main.rs only parses and forks.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, MountOptions};
use crate::control;
use crate::error::Error;
use crate::fs::{ChunkSizes, Fs, FsOptions};
use crate::fuse;
use crate::ids::DeviceId;
use crate::ids::ResourceId;
use crate::mesh::protocol::{Holding, InviteCode, JoinRequest};
use crate::mesh::{self, MeshClient, MeshError, MeshSettings, MeshState};
use crate::meta::{MetaState, Timestamp};
use crate::raft::{self, RaftSettings, Replica};
use crate::storage::{MetaStore, RocksStore};

pub const PID_FILE: &str = "meshfs.pid";
pub const SOCKET_FILE: &str = "control.sock";
pub const LOG_FILE: &str = "meshfs.log";
const LOCK_FILE: &str = "lock";
const DB_DIR: &str = "db";
const SPILL_DIR: &str = "spill";
const BACKING_DIR: &str = "backing";

/// How long `mount` waits for a previous daemon to let go of the data dir.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// `meshfs init`: a new mesh with this device as its first member.
pub fn init(
    data_dir: &Path,
    name: Option<String>,
    listen: Option<String>,
) -> Result<Config, Error> {
    let cfg = new_config(data_dir, name, listen)?;
    let state = MeshState::generate(&cfg.name, cfg.device_id());
    let _lock = prepare_data_dir(data_dir, cfg.device_id())?;
    finish_data_dir(data_dir, &cfg, &state)?;
    Ok(cfg)
}

/// `meshfs join CODE`: joins the mesh that issued the invite code, through
/// the inviting daemon's join listener, then sets up the data dir.
pub fn join(
    code: &str,
    data_dir: &Path,
    name: Option<String>,
    listen: Option<String>,
) -> Result<Config, Error> {
    let code = InviteCode::decode(code).map_err(|e| Error::Mesh(MeshError::Join(e)))?;
    let cfg = new_config(data_dir, name, listen)?;
    let mut state = MeshState::generate(&cfg.name, cfg.device_id());
    let req = JoinRequest {
        name: cfg.name.clone(),
        device: cfg.device_id(),
        peer: state.peer_id().to_string(),
        port: mesh::listen_port(&cfg.listen),
    };
    // Everything local that can fail is done before the inviter adds us,
    // and undone if the join fails: a refused code leaves nothing behind.
    let existed = data_dir.exists();
    let lock = prepare_data_dir(data_dir, cfg.device_id())?;
    let joined = match mesh::join::join(&code, &req) {
        Ok(j) => j,
        Err(e) => {
            drop(lock);
            undo_data_dir(data_dir, existed);
            return Err(e.into());
        }
    };
    state.mesh_key = joined.mesh_key;
    state.members = joined.members;
    finish_data_dir(data_dir, &cfg, &state)?;
    Ok(cfg)
}

/// A validated Config for a new data dir, with a fixed listen port.
fn new_config(
    data_dir: &Path,
    name: Option<String>,
    listen: Option<String>,
) -> Result<Config, Error> {
    if Config::path(data_dir).exists() {
        return Err(Error::AlreadyInitialized(data_dir.to_path_buf()));
    }
    let mut cfg = Config {
        device_id: DeviceId::generate().to_hex(),
        ..Config::default()
    };
    if let Some(n) = name {
        cfg.name = n;
    }
    let listen = listen.unwrap_or_else(|| cfg.listen.clone());
    cfg.validate()
        .and_then(|_| mesh::check_listen(&listen))
        .map_err(|msg| Error::Config {
            path: Config::path(data_dir),
            msg,
        })?;
    cfg.listen = mesh::fix_listen_port(&listen)?;
    Ok(cfg)
}

/// Creates a data dir's directory and empty store; returns its lock.
fn prepare_data_dir(data_dir: &Path, device: DeviceId) -> Result<DirLock, Error> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("securing {}", data_dir.display()), e))?;
    let lock = DirLock::acquire(data_dir, Duration::ZERO)?;
    crate::datadir::write(data_dir, crate::datadir::FORMAT)?;
    let store = RocksStore::open(&data_dir.join(DB_DIR))?;
    if store.load_meta()?.is_none() {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut meta = MetaState::new(uid, gid, Timestamp::now(), device);
        store.persist(&meta.take_changes(), true)?;
    }
    store.flush()?;
    Ok(lock)
}

/// Removes what `prepare_data_dir` made (the directory itself only when it
/// did not exist before).
fn undo_data_dir(data_dir: &Path, existed: bool) {
    if existed {
        for name in [DB_DIR, LOCK_FILE, crate::datadir::FORMAT_FILE] {
            let p = data_dir.join(name);
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    } else {
        let _ = std::fs::remove_dir_all(data_dir);
    }
}

/// Writes the mesh state, then the config, which marks the data dir complete.
fn finish_data_dir(data_dir: &Path, cfg: &Config, state: &MeshState) -> Result<(), Error> {
    state.save(data_dir)?;
    // The config is written last: its presence marks a complete data dir.
    cfg.save(data_dir)?;
    Ok(())
}

/// An exclusive lock on a data dir, held for the daemon's whole life.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock, retrying for up to `wait` while another process
    /// (typically a daemon still shutting down) holds it.
    pub fn acquire(data_dir: &Path, wait: Duration) -> Result<Self, Error> {
        let path = data_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(DirLock { _file: file });
            }
            if Instant::now() >= deadline {
                return Err(Error::InUse {
                    dir: data_dir.to_path_buf(),
                    pid: read_pid(data_dir),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn read_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the daemon recorded in `data_dir`'s pid file is alive. A zombie
/// (killed, not reaped: a container's init may never reap) is not, though
/// it may still hold /dev/fuse (see `release_dead_mount`).
fn daemon_alive(data_dir: &Path) -> bool {
    read_pid(data_dir).is_some_and(process_alive)
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A daemon killed while its invalidation thread waited in the kernel for
/// a directory lock held by a request it will now never answer (a rename,
/// say) cannot finish dying: that thread sleeps uninterruptibly, so the
/// process stays a zombie holding /dev/fuse and the data dir lock, and
/// every access to the mount hangs. Found by tests/power.rs and
/// tests/history.rs, which kill daemons mid-rename. When the mount at
/// `mountpoint` is this data dir's and its daemon is dead, abort the
/// kernel connection through fusectl (as `umount -f` would) before
/// anything touches the mount, and give the zombie's threads a moment to
/// go. Root only; best effort.
fn release_dead_mount(mountpoint: &Path, data_dir: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || daemon_alive(data_dir) {
        return;
    }
    if let Some((abs, conn)) = our_connection(mountpoint, data_dir) {
        abort_connection(&abs, conn, data_dir);
    }
}

/// The absolute mount point and FUSE connection number of the mount at
/// `mountpoint` when it is `data_dir`'s meshfs mount (from mountinfo
/// alone: nothing touches the mount).
fn our_connection(mountpoint: &Path, data_dir: &Path) -> Option<(PathBuf, u32)> {
    let abs = if mountpoint.is_absolute() {
        mountpoint.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(mountpoint)
    };
    let ours = crate::mountinfo::source_of(&abs)
        .is_some_and(|(src, fstype)| fstype == "fuse.meshfs" && Path::new(&src) == data_dir);
    let conn = crate::mountinfo::fuse_connection(&abs).filter(|_| ours)?;
    Some((abs, conn))
}

/// Aborts FUSE connection `conn` through fusectl (as `umount -f` would),
/// then gives the dead daemon's remaining threads a moment to go.
fn abort_connection(abs: &Path, conn: u32, data_dir: &Path) {
    if !abort_fuse_connection(conn) {
        return;
    }
    tracing::info!(path = %abs.display(), connection = conn, "aborted the kernel connection of a dead daemon's mount");
    let Some(pid) = read_pid(data_dir) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    // The zombie leader stays until reaped; its other threads go.
    while Instant::now() < deadline
        && std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|t| t.count() > 1)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Aborts FUSE connection `conn` (a mount's device minor, see
/// `mountinfo::fuse_connection`) through fusectl, mounting fusectl first
/// when it is not. Root only; false when the abort could not be written.
pub fn abort_fuse_connection(conn: u32) -> bool {
    let conns = Path::new("/sys/fs/fuse/connections");
    if !conns.join(conn.to_string()).exists() {
        // fusectl is often not mounted; mounting it changes nothing else.
        let (src, dst, fstype) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: valid NUL-terminated strings; no data argument.
        unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
    std::fs::write(conns.join(conn.to_string()).join("abort"), "1").is_ok()
}

/// The process holding a flock on `path`, from /proc/locks (a zombie's
/// lock stays until its last thread goes).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let dev = m.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        m.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INO 0 EOF"; waiters have "->".
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// Forks, while this process is still single-threaded (before the daemon
/// starts), a small watcher that outlives a killed daemon: once the daemon
/// `meshfs mount` is about to run is dead, it aborts that daemon's kernel
/// connection as the next `meshfs mount` would (`release_dead_mount`), so
/// that a `kill -9` leaves a mount that answers ENOTCONN, not one where
/// every program hangs until someone mounts again. It holds no descriptor
/// of the daemon's (not /dev/fuse, whose last close is what aborts a dead
/// daemon's connection; not the data dir lock) and looks once a second.
/// Root only, like the abort.
pub fn spawn_mount_watcher(mountpoint: &Path, data_dir: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let daemon = std::process::id();
    // SAFETY: the caller is single-threaded, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        if pid < 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "no mount watcher: a killed daemon's mount will hang until the next mount");
        }
        return;
    }
    // SAFETY: in the child, on its own descriptors and name.
    unsafe {
        libc::close_range(3, u32::MAX, 0);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
        libc::prctl(
            libc::PR_SET_NAME,
            c"meshfs-watch".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::chdir(c"/".as_ptr());
    }
    // The connection is learnt while the daemon is alive and its mount is
    // there, so that only that one is aborted: a daemon mounted again at
    // once (before it writes its pid file) must not lose its own.
    let mut conn = None;
    while process_alive(daemon) {
        if conn.is_none() && read_pid(data_dir) == Some(daemon) {
            conn = our_connection(mountpoint, data_dir).map(|(_, c)| c);
        }
        let every = if conn.is_some() { 1000 } else { 50 };
        std::thread::sleep(Duration::from_millis(every));
    }
    // Connection numbers are reused at once: a daemon mounted again since
    // may have this one. It took the data dir lock before mounting, so the
    // lock tells: held by another process, the mount is not ours to end.
    let holder = lock_holder(&data_dir.join(LOCK_FILE));
    if let (Some((abs, now)), true) = (
        our_connection(mountpoint, data_dir),
        holder.is_none_or(|p| p == daemon),
    ) {
        if conn == Some(now) {
            abort_connection(&abs, now, data_dir);
        }
    }
    std::process::exit(0);
}

/// Checks the mount point before the daemon starts; clears a stale mount
/// left by a killed daemon when it can.
pub fn check_mountpoint(mountpoint: &Path, data_dir: &Path) -> Result<PathBuf, Error> {
    release_dead_mount(mountpoint, data_dir);
    match std::fs::metadata(mountpoint) {
        Ok(m) if !m.is_dir() => return Err(Error::MountPointNotDir(mountpoint.to_path_buf())),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
            ) =>
        {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err(Error::StaleMount {
                    path: mountpoint.to_path_buf(),
                });
            }
            fuse::unmount(mountpoint).map_err(|_| Error::StaleMount {
                path: mountpoint.to_path_buf(),
            })?;
            tracing::info!(path = %mountpoint.display(), "cleared a stale mount left by a dead daemon");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoMountPoint(mountpoint.to_path_buf()))
        }
        Err(e) => return Err(Error::io(format!("checking {}", mountpoint.display()), e)),
    }
    let abs = std::fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("resolving {}", mountpoint.display()), e))?;
    if crate::mountinfo::is_mounted(&abs) {
        // A daemon killed a moment ago leaves a mount whose root the kernel
        // may still answer from its attribute cache: ours (same data dir,
        // type fuse.meshfs) with no live daemon is stale, not busy.
        let ours = crate::mountinfo::source_of(&abs)
            .is_some_and(|(src, fstype)| fstype == "fuse.meshfs" && Path::new(&src) == data_dir);
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if ours && root && !daemon_alive(data_dir) {
            fuse::unmount(&abs).map_err(|_| Error::StaleMount { path: abs.clone() })?;
            tracing::info!(path = %abs.display(), "cleared a stale mount left by a dead daemon");
        } else {
            return Err(Error::AlreadyMounted(abs));
        }
    }
    Ok(abs)
}

/// Everything a running device holds.
pub struct Node {
    pub cfg: Config,
    pub data_dir: PathBuf,
    pub store: Arc<RocksStore>,
    pub fs: Arc<Fs>,
    pub mesh: MeshClient,
    pub replica: Replica,
    pub mountpoint: PathBuf,
    pub started: Instant,
    /// The access log, predictors and prefetch ledger (None with
    /// `access_learn = false`).
    pub prefetch: Option<Prefetch>,
    /// Reads of chunks that are not here (the readahead window).
    pub reads: Arc<crate::readahead::Readahead>,
    /// Kernel request latencies (the mount records them).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where metrics are served (Config `http_listen`; None: nowhere).
    pub http_addr: Option<std::net::SocketAddr>,
    /// Subtrees kept on this device (`meshfs pin`).
    pub pins: Arc<crate::pin::Pins>,
    /// Wakes the replication task (which fetches what pins cover).
    pub replicate_now: Arc<tokio::sync::Notify>,
    /// What the replication task found missing here, and fetched since.
    pub catch_up: crate::replicate::CatchUpState,
}

pub struct Prefetch {
    pub engine: crate::prefetch::engine::EngineHandle,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    pub ledger: Arc<crate::prefetch::fetch::Ledger>,
}

/// Reports opens and first reads from the filesystem to the prefetch side.
struct AccessSink {
    engine: crate::prefetch::engine::EngineHandle,
    ledger: Arc<crate::prefetch::fetch::Ledger>,
}

impl crate::fs::AccessSink for AccessSink {
    fn opened(&self, ino: ResourceId, uid: u32, size: u64) {
        self.engine.opened(ino, uid, size);
    }

    fn first_read(&self, ino: ResourceId, local: bool) {
        self.ledger.first_read(ino, local);
    }
}

/// Starts the prediction thread, the access-event inbox and (with
/// `prefetch` on) the executor. Inside the runtime.
fn start_prefetch(
    cfg: &Config,
    data_dir: &Path,
    store: &Arc<RocksStore>,
    fs: &Arc<Fs>,
    mesh: &MeshClient,
    replica: &Replica,
    ledger: Arc<crate::prefetch::fetch::Ledger>,
) -> Result<Prefetch, Error> {
    use crate::prefetch::{engine, fetch, log, rnn, temperature};
    let (plans_tx, plans_rx) = tokio::sync::mpsc::channel(16);
    let publisher = mesh.clone();
    let (engine, thread) = engine::start(
        engine::EngineConfig {
            me: cfg.device_id(),
            learn: cfg.access_learn,
            share: cfg.access_share,
            prefetch: cfg.prefetch,
            user_key: mesh.derive_key(log::USER_KEY_CONTEXT),
            users: cfg.users.clone(),
            // Rounds of 4 steps of 24 windows: 40-70 ms of one core
            // each here, so an open waits little behind one.
            gru: rnn::GruConfig {
                capacity: cfg.gru_vocabulary,
                train_every: 0,
                steps: 4,
                batch: 24,
                ..Default::default()
            },
            model_dir: data_dir.join("model"),
            max_events: cfg.access_log_max_events,
            max_age_ms: cfg.access_log_days.saturating_mul(86_400_000),
            plan: temperature::PlanConfig::default(),
            half_life_ms: 6 * 3600 * 1000,
            follow_after: (cfg.prefetch_follow_after_s > 0)
                .then(|| Duration::from_secs(cfg.prefetch_follow_after_s)),
        },
        store.clone(),
        engine::Outputs {
            publish: Box::new(move |b| publisher.publish_access(b)),
            plans: plans_tx,
        },
    )
    .map_err(|e| Error::io("starting the prediction thread", e))?;
    let (inbox_tx, mut inbox) = tokio::sync::mpsc::channel(256);
    let inbox_engine = engine.clone();
    let m = mesh.clone();
    tokio::spawn(async move {
        if m.set_access_inbox(inbox_tx).await.is_err() {
            return;
        }
        while let Some((from, bytes)) = inbox.recv().await {
            inbox_engine.remote(from, bytes);
        }
    });
    fs.set_access_sink(Arc::new(AccessSink {
        engine: engine.clone(),
        ledger: ledger.clone(),
    }));
    if cfg.prefetch {
        let limit = cache_limit(cfg, data_dir);
        tokio::spawn(fetch::run(
            fs.clone(),
            store.clone(),
            replica.clone(),
            mesh.clone(),
            ledger.clone(),
            fetch::Budget {
                rate_bytes_s: cfg.prefetch_rate_kib.saturating_mul(1024),
                max_unused: (limit as f64 * cfg.prefetch_cache_share) as u64,
                cache_limit: limit,
            },
            plans_rx,
        ));
    }
    Ok(Prefetch {
        engine,
        thread: std::sync::Mutex::new(Some(thread)),
        ledger,
    })
}

/// Runs the daemon until unmount or a signal. `ready` is called once with
/// the start-up result (the mount is usable when it says Ok).
pub fn run_daemon(
    data_dir: &Path,
    mountpoint: &Path,
    opts: &MountOptions,
    ready: impl FnOnce(Result<(), String>),
) -> Result<(), Error> {
    limit_malloc_arenas();
    let mut ready = Some(ready);
    let mut report = |r: Result<(), String>| {
        if let Some(f) = ready.take() {
            f(r)
        }
    };
    match start(data_dir, mountpoint, opts) {
        Ok((node, mounted, lock, rt, listener)) => {
            report(Ok(()));
            let r = serve(node, mounted, rt, listener);
            drop(lock);
            r
        }
        Err(e) => {
            report(Err(e.to_string()));
            Err(e)
        }
    }
}

/// glibc gives each thread that allocates its own heap arena (up to 8 per
/// core), and memory freed in one arena is not reused by another. The
/// daemon moves buffers between threads all the time (kernel request
/// threads, the chunking workers, RocksDB's flush, the runtime), so over a
/// 4 GiB write the arenas held about 40 MiB more than two would (peak RSS
/// 241 MiB with the default, 198 with MALLOC_ARENA_MAX=2).
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter, under the
    // allocator's own lock.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    if ok != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX) was refused");
    }
}

type Started = (
    Arc<Node>,
    fuse::Mounted,
    DirLock,
    tokio::runtime::Runtime,
    Listeners,
);

/// The control socket, and the HTTP listener when there is one.
type Listeners = (tokio::net::UnixListener, Option<std::net::TcpListener>);

fn start(data_dir: &Path, mountpoint: &Path, opts: &MountOptions) -> Result<Started, Error> {
    let cfg = Config::load(data_dir)?;
    let lock = DirLock::acquire(data_dir, LOCK_WAIT)?;
    crate::datadir::migrate(data_dir)?;
    let mesh_state = if MeshState::exists(data_dir) {
        MeshState::load(data_dir)?
    } else {
        // A data dir made before meshes existed: it becomes a mesh of one.
        let s = MeshState::generate(&cfg.name, cfg.device_id());
        s.save(data_dir)?;
        s
    };
    let (store, meta) = open_state(data_dir)?;
    let store = Arc::new(store);
    let pins = Arc::new(
        crate::pin::Pins::load(data_dir)
            .map_err(|e| Error::io("loading the pins", std::io::Error::other(e)))?,
    );
    let catch_up = crate::replicate::CatchUpState::default();
    let fs = Arc::new(Fs::new(
        store.clone(),
        meta,
        FsOptions {
            device: cfg.device_id(),
            spill_dir: data_dir.join(SPILL_DIR),
            chunk_sizes: ChunkSizes {
                min: cfg.chunk_min,
                avg: cfg.chunk_avg,
                max: cfg.chunk_max,
            },
            sync_on_close: cfg.sync_on_close,
            read_only: opts.read_only,
            replicated: true,
            passthrough: cfg.passthrough.then(|| crate::fs::passthrough::Options {
                dir: data_dir.join(BACKING_DIR),
                budget_bytes: cfg.passthrough_cache_mb << 20,
                min_bytes: cfg.passthrough_min_kb << 10,
            }),
        },
    )?);
    // After Fs::new's garbage collection: what it deleted counts too.
    store.wait_background();
    if let Err(e) = store.reclaim_if_needed() {
        tracing::warn!(error = %e, "could not reclaim the space of deleted chunks");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    // Bound before the mount is reported ready, so that a CLI command run
    // right after `meshfs mount` returns finds the daemon (connections wait
    // in the backlog until `serve` accepts them).
    let listener = {
        let _in_runtime = rt.enter();
        control::bind(&data_dir.join(SOCKET_FILE))?
    };
    let http = crate::web::bind(&cfg);
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let bootstrap = mesh_state.members.len() == 1;
    let (mesh, replica, prefetch, reads, replicate_now) = {
        let _in_runtime = rt.enter();
        let holdings_fs = fs.clone();
        let holdings_store = store.clone();
        let mesh = mesh::start(
            MeshSettings {
                data_dir: data_dir.to_path_buf(),
                listen: cfg.listen.clone(),
                mdns: cfg.mdns,
                fetch_timeout: Duration::from_millis(cfg.fetch_timeout_ms),
                announce_every: Duration::from_millis(cfg.announce_interval_ms),
                fetch_window: cfg.fetch_window,
            },
            mesh_state,
            store.clone(),
            Arc::new(move || holdings(&holdings_fs, &*holdings_store)),
        )?;
        let replica = rt.block_on(raft::start(
            RaftSettings {
                data_dir: data_dir.to_path_buf(),
                name: cfg.name.clone(),
                bootstrap,
                heartbeat: Duration::from_millis(cfg.raft_heartbeat_ms),
                election_min: Duration::from_millis(cfg.raft_election_min_ms),
                election_max: Duration::from_millis(cfg.raft_election_max_ms),
                read_wait: Duration::from_millis(cfg.read_wait_ms),
                write_timeout: Duration::from_millis(cfg.write_timeout_ms),
                offline_after: Duration::from_millis(cfg.offline_after_ms),
                max_voters: cfg.max_voters,
                batch_delay: Duration::from_millis(cfg.batch_delay_ms),
                batch_max: cfg.batch_max,
                policy: raft::PolicySettings {
                    weights: cfg.authority_weights(),
                    takeover: Duration::from_secs(cfg.authority_takeover_s),
                    report_every: Duration::from_millis(cfg.authority_report_ms),
                },
                retention: cfg.retention(),
                prune_every: Duration::from_secs(cfg.versions_prune_s),
            },
            mesh.clone(),
            store.clone(),
            fs.namespace(),
        ))?;
        let m = mesh.clone();
        fs.set_on_change(Arc::new(move || m.holdings_changed()));
        let served = replica.clone();
        mesh.set_served(Box::new(move |ino, bytes| served.record_served(ino, bytes)));
        let (hook_fs, hook_mesh) = (fs.clone(), mesh.clone());
        let replicate_now = Arc::new(tokio::sync::Notify::new());
        let hook_replicate = replicate_now.clone();
        replica.set_hook(Arc::new(move |b: raft::AppliedBatch<'_>| {
            if b.replaced || !b.remote.inodes.is_empty() || !b.remote.entries.is_empty() {
                if b.replaced {
                    // A snapshot replaced everything; names cached in
                    // subdirectories age out with the attribute TTL.
                    hook_fs.changed_everywhere();
                }
                hook_fs.changed_elsewhere(b.remote);
                hook_mesh.holdings_changed();
                hook_replicate.notify_one();
            } else if b.membership {
                hook_replicate.notify_one();
            }
        }));
        tokio::spawn(crate::replicate::run(
            fs.clone(),
            store.clone(),
            replica.clone(),
            mesh.clone(),
            cfg.replicas,
            cache_limit(&cfg, data_dir),
            replicate_now.clone(),
            pins.clone(),
            catch_up.clone(),
        ));
        // A restarted device may lack content committed while it was away.
        replicate_now.notify_one();
        fs.set_replica(Arc::new(replica.clone()));
        let in_use_fs = fs.clone();
        replica.set_in_use(Arc::new(move |ino| in_use_fs.in_use(ino)));
        let (stat_replica, stat_rt) = (replica.clone(), rt.handle().clone());
        fs.set_stat(Arc::new(move |ino| {
            let r = stat_replica.clone();
            let st = stat_rt.block_on(async move { r.stat(ino).await })?;
            serde_json::to_value(st).ok()
        }));
        let ledger = Arc::new(crate::prefetch::fetch::Ledger::default());
        let authority_of = replica.clone();
        let reads = Arc::new(crate::readahead::Readahead::new(
            mesh.clone(),
            Box::new(move |ino| authority_of.authority(ino)),
            store.clone(),
            rt.handle().clone(),
            ledger.clone(),
            cfg.fetch_window,
            Duration::from_millis(cfg.fetch_timeout_ms),
        ));
        fs.set_remote(reads.clone());
        let prefetch = if cfg.access_learn {
            Some(start_prefetch(
                &cfg, data_dir, &store, &fs, &mesh, &replica, ledger,
            )?)
        } else {
            None
        };
        (mesh, replica, prefetch, reads, replicate_now)
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let allow_other = opts.allow_other.or(cfg.allow_other).unwrap_or(root);
    let mountpoint = check_mountpoint(mountpoint, data_dir)?;
    let mcfg = fuse::MountConfig {
        mountpoint: mountpoint.clone(),
        source: data_dir.display().to_string(),
        allow_other,
        read_only: opts.read_only,
        noexec: opts.noexec,
        threads: cfg.fuse_threads,
        ttl: Duration::from_millis(cfg.attr_ttl_ms),
        metrics: metrics.clone(),
    };
    let mounted = fuse::mount(fs.clone(), &mcfg).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied && !root {
            " (a non-root user needs read-write access to /dev/fuse, as Debian's fuse3 sets it up, and fusermount3)"
        } else {
            ""
        };
        Error::Mount(format!("{}: {e}{hint}", mountpoint.display()))
    })?;
    let pid_path = data_dir.join(PID_FILE);
    std::fs::File::create(&pid_path)
        .and_then(|mut f| writeln!(f, "{}", std::process::id()))
        .map_err(|e| Error::io(format!("writing {}", pid_path.display()), e))?;
    tracing::info!(
        mountpoint = %mountpoint.display(),
        device = %cfg.name,
        allow_other,
        read_only = opts.read_only,
        "mounted"
    );
    let node = Arc::new(Node {
        cfg,
        data_dir: data_dir.to_path_buf(),
        store,
        fs,
        mesh,
        replica,
        mountpoint,
        started: Instant::now(),
        prefetch,
        reads,
        metrics,
        http_addr,
        pins,
        replicate_now,
        catch_up,
    });
    Ok((node, mounted, lock, rt, (listener, http)))
}

/// The store's size limit in bytes: Config `cache_limit_mb`, or half of
/// the data dir's disk.
fn cache_limit(cfg: &Config, data_dir: &Path) -> u64 {
    match cfg.cache_limit_mb {
        Some(mb) => mb.saturating_mul(1 << 20),
        None => crate::storage::disk_size(data_dir).map_or(u64::MAX, |t| t / 2),
    }
}

/// What this device holds, for availability broadcasts: every file with
/// content whose chunks are all here. The namespace lock is held only to
/// copy what is needed: asking the store about every chunk under it would
/// hold up every create and commit for the whole listing.
fn holdings(
    fs: &Fs,
    store: &dyn crate::storage::ChunkStore,
) -> std::collections::BTreeMap<ResourceId, Holding> {
    let files: Vec<(Holding, Vec<crate::ids::ChunkHash>)> = fs.with_meta(|meta| {
        meta.files()
            .into_iter()
            .filter(|(i, _)| i.size() > 0)
            .filter_map(|(i, name)| {
                let c = i.content.as_ref()?;
                let holding = Holding {
                    resource: i.id,
                    version: i.version(),
                    size: i.size(),
                    kind: mesh::protocol::guess_kind(name).to_string(),
                };
                Some((holding, c.chunks.iter().map(|r| r.hash).collect()))
            })
            .collect()
    });
    files
        .into_iter()
        .filter(|(_, hashes)| hashes.iter().all(|h| store.contains(h).unwrap_or(false)))
        .map(|(h, _)| (h.resource, h))
        .collect()
}

/// A mount with no other device of the mesh in reach (a boot with the
/// network down) works from what is here; the log says so once, so that
/// an operator reading it knows why nothing new arrives.
async fn say_if_alone(node: Arc<Node>) {
    tokio::time::sleep(Duration::from_millis(node.cfg.offline_after_ms)).await;
    let Ok(s) = node.mesh.status().await else {
        return;
    };
    let me = node.cfg.device_id();
    let others = s.devices.iter().filter(|d| d.id != me).count();
    if others > 0 && !s.devices.iter().any(|d| d.id != me && d.up) {
        tracing::warn!(
            others,
            "no other device of the mesh is reachable: serving what is cached here; changes made here are kept and sent when a device returns"
        );
    }
}

/// Serves the control socket and waits for the end: an unmount from outside,
/// SIGTERM/SIGINT, or a shutdown request on the socket.
fn serve(
    node: Arc<Node>,
    mounted: fuse::Mounted,
    rt: tokio::runtime::Runtime,
    (listener, http): Listeners,
) -> Result<(), Error> {
    let sock = node.data_dir.join(SOCKET_FILE);
    // The FUSE session ends when the kernel drops the mount (umount).
    let (unmounted_tx, mut unmounted) = tokio::sync::oneshot::channel::<()>();
    let session = std::thread::Builder::new()
        .name("fuse-wait".into())
        .spawn(move || {
            mounted.join();
            let _ = unmounted_tx.send(());
        })
        .map_err(|e| Error::io("spawning the session waiter", e))?;
    let result = rt.block_on(async {
        let server = tokio::spawn(control::serve(listener, node.clone()));
        let web = http.map(|l| tokio::spawn(crate::web::serve(l, node.clone())));
        let syncer = tokio::spawn(sync_periodically(node.clone()));
        tokio::spawn(say_if_alone(node.clone()));
        let trimmer = tokio::spawn(trim_memory_periodically());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::io("installing SIGTERM handler", e))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| Error::io("installing SIGINT handler", e))?;
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = &mut unmounted => "unmounted",
        };
        tracing::info!(reason = why, "shutting down");
        server.abort();
        if let Some(w) = web {
            w.abort();
        }
        syncer.abort();
        trimmer.abort();
        Ok::<&str, Error>(why)
    });
    let why = result.unwrap_or("error");
    shutdown(&node, why != "unmounted");
    // The session thread ends once the kernel drops the connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !session.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(node.data_dir.join(PID_FILE));
    tracing::info!("stopped");
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Gives the allocator's free pages back to the system every 2 s. Large
/// writes churn through megabytes of short-lived buffers (RocksDB memtable
/// blocks, chunk and hand-over buffers) freed on other threads than the
/// ones that took them; glibc only returns the top of a heap by itself.
/// After six 512 MiB copies, RSS fell from 170 to 119 MiB with this.
async fn trim_memory_periodically() {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim has no preconditions.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}

/// Bounds how long closed-but-not-fsynced data waits for stable storage.
async fn sync_periodically(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(node.cfg.sync_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = node.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.sync_if_dirty()).await {
            tracing::warn!(error = %e, "periodic WAL sync failed");
        }
    }
}

fn shutdown(node: &Node, unmount: bool) {
    if let Err(e) = node.fs.commit_all() {
        tracing::error!(error = %e, "some writes could not be committed at shutdown");
    }
    if unmount {
        if let Err(e) = fuse::unmount(&node.mountpoint) {
            tracing::warn!(error = %e, "unmount failed");
        }
    }
    // Files closed between the commit above and the unmount commit on release.
    if let Err(e) = node.fs.commit_all() {
        tracing::error!(error = %e, "some writes could not be committed at shutdown");
    }
    if let Some(p) = &node.prefetch {
        // Stores the last events and checkpoints the model.
        if let Some(t) = crate::lock(&p.thread).take() {
            p.engine.stop(t);
        }
    }
    node.store.wait_background();
    if let Err(e) = node.store.flush() {
        tracing::error!(error = %e, "flushing the database failed");
    }
}

/// `meshfs status` without a daemon: what the data dir says.
pub fn offline_status(data_dir: &Path) -> Result<serde_json::Value, Error> {
    let cfg = Config::load(data_dir)?;
    let devices: Vec<serde_json::Value> = match MeshState::exists(data_dir) {
        true => MeshState::load(data_dir)?
            .members
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "id": m.device.to_hex(), "up": false, "rtt_ms": null, "addrs": m.addrs}))
            .collect(),
        false => vec![serde_json::json!({"name": cfg.name, "id": cfg.device_id, "up": false, "rtt_ms": null})],
    };
    Ok(serde_json::json!({
        "running": false,
        "name": cfg.name,
        "id": cfg.device_id,
        "devices": devices,
        "leader": null,
        "term": 0,
        "cache_bytes": null,
        "prefetch": {"hits": 0, "misses": 0, "wasted_bytes": 0},
    }))
}

/// `meshfs remove-device` without a daemon: edits the member list on disk;
/// the removal spreads to the other members when this daemon next runs.
pub fn offline_remove_device(data_dir: &Path, name: &str) -> Result<(), Error> {
    let cfg = Config::load(data_dir)?;
    let _lock = DirLock::acquire(data_dir, Duration::ZERO)?;
    let mut state = MeshState::load(data_dir)?;
    if name == cfg.name {
        return Err(Error::Mesh(MeshError::Membership(
            "a device cannot remove itself; run remove-device on another member".into(),
        )));
    }
    state.members.remove(name).ok_or_else(|| {
        Error::Mesh(MeshError::Membership(format!(
            "no device named {name} in the mesh"
        )))
    })?;
    state.save_members(data_dir)?;
    Ok(())
}

/// `meshfs check` without a daemon: open the store and verify it. In a mesh
/// of several devices, chunks not stored here are normal (they live on
/// other devices) and cannot be checked without the daemon: they are
/// counted, not reported as missing.
/// Writes the access log to `out` as contract trace lines (oldest first):
/// resources by their current path inside the mesh ("/(deleted)/N" when
/// gone), devices by name, users by their anonymized hash. Returns how many
/// events it wrote.
pub fn write_trace(
    store: &RocksStore,
    meta: &MetaState,
    data_dir: &Path,
    out: &mut dyn std::io::Write,
) -> Result<u64, Error> {
    let paths = meta.paths();
    let names: std::collections::HashMap<DeviceId, String> = match MeshState::exists(data_dir) {
        true => MeshState::load(data_dir)?
            .members
            .iter()
            .map(|m| (m.device, m.name.clone()))
            .collect(),
        false => Default::default(),
    };
    let mut n = 0u64;
    let mut failed: Option<std::io::Error> = None;
    store.access_scan(|bytes| {
        if failed.is_some() {
            return;
        }
        let Ok(e) = crate::prefetch::log::decode(bytes) else {
            return;
        };
        let t = crate::prefetch::trace::TraceEvent {
            ts_ms: e.ts_ms,
            device: names
                .get(&e.device)
                .cloned()
                .unwrap_or_else(|| e.device.to_hex()),
            user: e.user.to_hex(),
            path: paths
                .get(&e.resource)
                .cloned()
                .unwrap_or_else(|| format!("/(deleted)/{}", e.resource.0)),
            size: e.size,
        };
        let r = serde_json::to_writer(&mut *out, &t)
            .map_err(std::io::Error::other)
            .and_then(|_| out.write_all(b"\n"));
        match r {
            Ok(()) => n += 1,
            Err(e) => failed = Some(e),
        }
    })?;
    if let Some(e) = failed {
        return Err(Error::io("writing the trace", e));
    }
    out.flush().map_err(|e| Error::io("writing the trace", e))?;
    Ok(n)
}

/// `meshfs trace export` without a daemon: straight from the data dir.
pub fn offline_trace(data_dir: &Path, out: &mut dyn std::io::Write) -> Result<u64, Error> {
    Config::load(data_dir)?;
    let _lock = DirLock::acquire(data_dir, Duration::ZERO)?;
    let (store, meta) = open_state(data_dir)?;
    write_trace(&store, &meta, data_dir, out)
}

/// `meshfs trace export` with the daemon running: it writes the trace to a
/// file in the data dir (0600) and the CLI streams it, so that a large log
/// never has to fit in one control-socket reply.
pub fn export_trace_file(node: &Node) -> Result<(PathBuf, u64), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = node.data_dir.join("trace-export.jsonl");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let mut w = std::io::BufWriter::new(f);
    let n = node
        .fs
        .with_meta(|m| write_trace(&node.store, m, &node.data_dir, &mut w))?;
    Ok((path, n))
}

pub fn offline_check(
    data_dir: &Path,
    progress: &crate::storage::CheckProgress,
) -> Result<crate::storage::CheckReport, Error> {
    Config::load(data_dir)?;
    let _lock = DirLock::acquire(data_dir, Duration::ZERO)?;
    let (store, meta) = open_state(data_dir)?;
    let mut report = store.check_with(&meta, progress)?;
    let shared = MeshState::exists(data_dir) && MeshState::load(data_dir)?.members.len() > 1;
    if shared {
        report.unverified_not_here = report.missing_chunks.len() as u64;
        report.missing_chunks.clear();
    }
    Ok(report)
}

/// `meshfs check` with the daemon running: the local store against the
/// namespace, the namespace in memory against the one on disk and Raft's
/// applied position, and every referenced chunk not stored here against
/// the other live members (missing only when nobody has it).
pub async fn check_mesh(
    node: &Arc<Node>,
    progress: Arc<crate::storage::CheckProgress>,
) -> Result<crate::storage::CheckReport, Error> {
    let n = node.clone();
    // The committed namespace: the disk and the chunk reference counts
    // follow it, not the changes still waiting to be committed.
    let (report, disk_matches) = tokio::task::spawn_blocking(move || {
        n.replica.with_committed(|m| -> Result<_, Error> {
            let report = n.store.check_with(m, &progress)?;
            let disk = n.store.load_meta()?;
            Ok((report, disk.as_ref() == Some(&m.snapshot())))
        })
    })
    .await
    .map_err(|e| Error::Control(e.to_string()))??;
    let mut report = report;
    if !disk_matches {
        report
            .state_mismatch
            .push("the namespace on disk differs from the one in memory".into());
    }
    let r = node.replica.clone();
    match tokio::task::spawn_blocking(move || r.verify_against_log()).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(why))) => report.state_mismatch.push(why),
        Ok(Err(e)) => report
            .state_mismatch
            .push(format!("could not replay the log: {e}")),
        Err(e) => return Err(Error::Control(e.to_string())),
    }
    let mut missing: Vec<crate::ids::ChunkHash> = report
        .missing_chunks
        .iter()
        .filter_map(|h| crate::ids::ChunkHash::parse_hex(h))
        .collect();
    if !missing.is_empty() {
        let before = missing.len() as u64;
        for device in node.mesh.nearest_devices().await.unwrap_or_default() {
            if missing.is_empty() {
                break;
            }
            let held = node.mesh.probe(device, &missing).await;
            let mut i = 0;
            missing.retain(|_| {
                let keep = !held[i];
                i += 1;
                keep
            });
        }
        report.held_elsewhere = before - missing.len() as u64;
        report.missing_chunks = missing.iter().map(|h| h.to_string()).collect();
    }
    Ok(report)
}

/// The data dir of the meshfs mount holding `path`, and `path`'s inode
/// number there (`meshfs stat`).
pub fn daemon_of_path(path: &Path) -> Result<(PathBuf, u64), Error> {
    crate::mountinfo::meshfs_of(path).map_err(Error::Mount)
}

/// Opens a data dir's store and loads its namespace.
fn open_state(data_dir: &Path) -> Result<(RocksStore, MetaState), Error> {
    let store = RocksStore::open(&data_dir.join(DB_DIR))?;
    let snap = store
        .load_meta()?
        .ok_or_else(|| Error::NotInitialized(data_dir.to_path_buf()))?;
    let meta = MetaState::restore(snap)
        .map_err(|e| Error::Mount(format!("namespace on disk is inconsistent: {e}")))?;
    Ok((store, meta))
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::AsRawFd;

    #[test]
    fn the_lock_holder_is_read_from_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let f = std::fs::File::create(&path).unwrap();
        assert_eq!(super::lock_holder(&path), None, "nobody holds it yet");
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert_eq!(super::lock_holder(&path), Some(std::process::id()));
        drop(f);
        assert_eq!(super::lock_holder(&path), None, "released at close");
    }
}
