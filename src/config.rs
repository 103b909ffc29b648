//! The one documented configuration of a device, stored as TOML in
//! `DATA_DIR/config.toml` and written with defaults by `meshfs init`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ids::DeviceId;

pub const CONFIG_FILE: &str = "config.toml";

/// Every setting of a device. Unknown keys are refused so that typos show.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Human name of this device, unique within the mesh (default: hostname).
    pub name: String,
    /// This device's id (hex), chosen at `init`. Do not edit.
    pub device_id: String,
    /// libp2p listen address for the mesh. `init` and `join` replace port 0
    /// with a free port, so that the address other devices record stays
    /// valid across restarts.
    pub listen: String,
    /// Find other members on the LAN with mDNS.
    pub mdns: bool,
    /// Longest wait for one piece of a chunk from one device before the next
    /// holder is tried, in milliseconds.
    pub fetch_timeout_ms: u64,
    /// Chunks in flight per fetch, and the most fetched ahead of a reader
    /// of a file that is not here.
    pub fetch_window: usize,
    /// Period of availability and load announcements, in milliseconds
    /// (changes are announced at once as well).
    pub announce_interval_ms: u64,
    /// Let users other than the daemon's own reach the mount. `None`: on when
    /// the daemon runs as root (a mesh at /mnt/mesh is for every local user).
    pub allow_other: Option<bool>,
    /// Sync RocksDB's WAL when a written file is closed, not only on fsync.
    /// Off (default): close() commits the new version to the WAL, which
    /// survives a daemon crash or `kill -9` at once and a power cut after at
    /// most `sync_interval_ms`; fsync() is always durable before it returns.
    /// On: close() waits for the sync too (each close then costs a disk
    /// flush: small-file writes were 5x slower here).
    pub sync_on_close: bool,
    /// How often the daemon syncs the WAL when something was written, in
    /// milliseconds (the power-cut window for closed-but-not-fsynced data).
    pub sync_interval_ms: u64,
    /// How long the kernel may cache attributes and names, in milliseconds.
    pub attr_ttl_ms: u64,
    /// Threads serving kernel requests.
    pub fuse_threads: usize,
    /// FastCDC minimum, average and maximum chunk sizes in bytes.
    pub chunk_min: u32,
    pub chunk_avg: u32,
    pub chunk_max: u32,
    /// Default tracing filter for the daemon's log (MESHFS_LOG overrides).
    pub log: String,
    /// The log file (`meshfs.log`) is rotated past this many MiB...
    pub log_max_mb: u64,
    /// ...keeping this many older files (`meshfs.log.1` is the newest).
    pub log_keep: usize,
    /// Raft leader heartbeat period, in milliseconds.
    pub raft_heartbeat_ms: u64,
    /// A follower that hears no heartbeat for a random time in
    /// [min, max] milliseconds starts an election. Tuned for a LAN: a few
    /// lost heartbeats, not one, trigger it; a dead leader is replaced in
    /// well under a second.
    pub raft_election_min_ms: u64,
    pub raft_election_max_ms: u64,
    /// Longest an open (or a lookup that finds nothing) waits to catch up
    /// with the device that governs the file (or directory) before it
    /// serves the local replica, which may then be stale, in milliseconds.
    pub read_wait_ms: u64,
    /// Longest a namespace change waits for the device that governs it (or,
    /// for fsync and changes spanning devices, for a Raft commit) before
    /// the program gets EIO, in milliseconds.
    pub write_timeout_ms: u64,
    /// How long a change waits for the device that governs it (or, for a
    /// change spanning devices, for a Raft commit) before it is made
    /// tentatively on this device and the program answered: it is kept in
    /// a local journal and reintegrated when that device is reachable
    /// again, conflicts kept as copies (see docs/operations.md). Also how
    /// long fsync waits for a commit while no leader is reachable before it
    /// settles for this device's disk. In milliseconds.
    pub offline_after_ms: u64,
    /// Version history: how many old versions of each file are kept (the
    /// current one not counted). Old versions are readable under
    /// `/.meshfs/versions/` and restored with `meshfs restore`.
    pub versions_keep: usize,
    /// How long an old version is kept after a newer one replaced it, and a
    /// removed file stays in the trash, in days.
    pub versions_max_age_days: u64,
    /// Most bytes kept for old versions and trashed files (content current
    /// files share is not counted); the oldest go first beyond it.
    pub versions_max_bytes: u64,
    /// How often the Raft leader applies the retention policy (the leader's
    /// settings decide for the whole mesh), in seconds.
    pub versions_prune_s: u64,
    /// How long changes applied here gather before they are proposed to
    /// the Raft log as one batch (group commit), in milliseconds. fsync
    /// does not wait for it.
    pub batch_delay_ms: u64,
    /// Most changes in one batch (one Raft log entry).
    pub batch_max: usize,
    /// A device unreachable for this many seconds loses what it governs to
    /// live devices (for files with content, to devices holding a complete
    /// copy); changes it made meanwhile are refused when it returns.
    pub authority_takeover_s: u64,
    /// How often each device reports its usage to the Raft leader, and the
    /// leader decides moves, in milliseconds.
    pub authority_report_ms: u64,
    /// Reputation: usage weight of one change (create, write+close, rename,
    /// chmod...) by a device's programs.
    pub authority_weight_change: f64,
    /// Reputation: usage weight of one open.
    pub authority_weight_open: f64,
    /// Reputation: usage weight of one MiB served to other devices.
    pub authority_weight_served_mib: f64,
    /// Reputation: usage halves every this many seconds (how fast authority
    /// follows the work, and forgets it).
    pub authority_half_life_s: f64,
    /// A challenger takes a resource over only when its reputation beats
    /// the authority's by this factor plus `authority_min_lead`...
    pub authority_margin: f64,
    pub authority_min_lead: f64,
    /// ...for this many milliseconds on end...
    pub authority_hold_ms: u64,
    /// ...and not within this many seconds of the resource's last move.
    pub authority_cooldown_s: u64,
    /// Reputation: a device up (connected) this many seconds counts full
    /// uptime; a device that just started counts half.
    pub authority_uptime_full_s: u64,
    /// Devices that vote in Raft; later ones stay learners (they get every
    /// change but do not count for the quorum).
    pub max_voters: usize,
    /// Complete copies of every committed version the mesh keeps, on
    /// distinct devices (fewer while the mesh has fewer devices).
    pub replicas: usize,
    /// Most bytes of content this device keeps, in MiB; beyond it, cached
    /// copies of files other devices hold are evicted, least recently
    /// opened first. Content this device must hold (its share of the
    /// `replicas` copies) and open files are never evicted. Unset: half of
    /// the data dir's disk.
    pub cache_limit_mb: Option<u64>,
    /// Read complete local files with FUSE passthrough: the kernel reads a
    /// backing copy in the data dir (`backing/`) without asking the daemon.
    /// Needs root (CAP_SYS_ADMIN) and a kernel with passthrough (6.9+);
    /// without them files are read through the daemon as before.
    pub passthrough: bool,
    /// Most MiB of backing copies kept (least recently opened go first).
    /// They are copies: the disk holds such a file twice.
    pub passthrough_cache_mb: u64,
    /// Files smaller than this many KiB are always read through the daemon
    /// (the page cache serves them well; a copy each would cost more).
    pub passthrough_min_kb: u64,
    /// Where the daemon serves its Prometheus metrics (`/metrics`) and its
    /// dashboard, over plain HTTP: a loopback address and port, with port
    /// `auto` for one derived from the device id (so that several devices
    /// on one machine do not clash, and Prometheus finds the same port after
    /// a restart; the next free one if it is taken). `off`: not served.
    pub http_listen: String,
    /// Record opens through the mount in the access log and learn from the
    /// mesh's log (predictors and the GRU). Off: nothing is recorded or
    /// learned here, and nothing is prefetched.
    pub access_learn: bool,
    /// Share this device's access events with the other members (they are
    /// anonymized: resource ids, a keyed hash of the mesh user name, times
    /// coarsened to 10 s; never paths). Off: the log stays on this device,
    /// and the others' events are not kept here either.
    pub access_share: bool,
    /// Local user name -> mesh user name, so that one person is one user on
    /// every device even where local names or uids differ. A local user not
    /// listed is known by its local name (a uid with no name as "uid:N").
    pub users: std::collections::BTreeMap<String, String>,
    /// Access events kept in the log (oldest dropped first).
    pub access_log_max_events: usize,
    /// Access events older than this many days are dropped.
    pub access_log_days: u64,
    /// Fetch predicted files before they are opened.
    pub prefetch: bool,
    /// Most bytes per second prefetching may fetch, in KiB (it also yields
    /// to reads that are waiting on the network).
    pub prefetch_rate_kib: u64,
    /// Share of `cache_limit_mb` that prefetched, not yet opened content may
    /// take. Prefetching never evicts anything: it only fills free cache.
    pub prefetch_cache_share: f64,
    /// Seconds after a person's session on another device goes quiet before
    /// the device they usually move to next from there (learned from the
    /// access log) fetches what that session would open next. 0: never.
    pub prefetch_follow_after_s: u64,
    /// Resource slots of the GRU's vocabulary (the out-of-vocabulary bucket
    /// included); the least recently seen resource gives its slot up.
    pub gru_vocabulary: usize,
}

impl Config {
    /// The authority policy's constants.
    pub fn authority_weights(&self) -> crate::authority::Weights {
        crate::authority::Weights {
            change: self.authority_weight_change,
            open: self.authority_weight_open,
            served_mib: self.authority_weight_served_mib,
            half_life_s: self.authority_half_life_s,
            margin: self.authority_margin,
            min_lead: self.authority_min_lead,
            hold_s: self.authority_hold_ms as f64 / 1000.0,
            cooldown_s: self.authority_cooldown_s as f64,
            uptime_full_s: self.authority_uptime_full_s as f64,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: default_name(),
            device_id: String::new(),
            listen: "/ip4/0.0.0.0/tcp/0".into(),
            mdns: true,
            fetch_timeout_ms: 10_000,
            fetch_window: 64,
            announce_interval_ms: 10_000,
            allow_other: None,
            sync_on_close: false,
            sync_interval_ms: 200,
            attr_ttl_ms: 1000,
            fuse_threads: 4,
            chunk_min: 16 * 1024,
            chunk_avg: 64 * 1024,
            chunk_max: 256 * 1024,
            log: "info".into(),
            log_max_mb: 16,
            log_keep: 3,
            raft_heartbeat_ms: 40,
            raft_election_min_ms: 120,
            raft_election_max_ms: 200,
            read_wait_ms: 1000,
            write_timeout_ms: 10_000,
            offline_after_ms: 5_000,
            versions_keep: 100,
            versions_max_age_days: 30,
            versions_max_bytes: 10 << 30,
            versions_prune_s: 60,
            batch_delay_ms: 2,
            batch_max: 1024,
            authority_takeover_s: 5,
            authority_report_ms: 500,
            authority_weight_change: 1.0,
            authority_weight_open: 0.25,
            authority_weight_served_mib: 0.1,
            authority_half_life_s: 2.0,
            authority_margin: 0.5,
            authority_min_lead: 2.0,
            authority_hold_ms: 500,
            authority_cooldown_s: 10,
            authority_uptime_full_s: 600,
            max_voters: 5,
            replicas: 2,
            cache_limit_mb: None,
            passthrough: true,
            passthrough_cache_mb: 4096,
            passthrough_min_kb: 1024,
            http_listen: "127.0.0.1:auto".into(),
            access_learn: true,
            access_share: true,
            users: Default::default(),
            access_log_max_events: 1_000_000,
            access_log_days: 30,
            prefetch: true,
            prefetch_rate_kib: 32 * 1024,
            prefetch_cache_share: 0.25,
            prefetch_follow_after_s: 300,
            gru_vocabulary: 2048,
        }
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "device".into())
}

/// A TOML error's message with the key it is about: the parser's message
/// for a wrong value ("invalid type: string, expected u64") does not name
/// the key, and a config has dozens.
fn keyed_message(text: &str, e: &toml::de::Error) -> String {
    // toml's messages can run over several lines ("invalid string" then
    // "expected ..."): the error is one line (found by fuzzing).
    let msg = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(span) = e.span() else {
        return msg;
    };
    // `get`: a span that is not on a character boundary must not panic.
    let start = text
        .get(..span.start.min(text.len()))
        .unwrap_or(text)
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !msg.contains(key.trim()) => {
            format!("{}: {msg}", key.trim())
        }
        _ => msg,
    }
}

impl Config {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(CONFIG_FILE)
    }

    pub fn load(data_dir: &Path) -> Result<Self, Error> {
        // The format first: nothing of a data dir this build cannot read is
        // read (`datadir`).
        if crate::datadir::check(data_dir)?.is_none() {
            return Err(Error::NotInitialized(data_dir.to_path_buf()));
        }
        let path = Self::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotInitialized(data_dir.to_path_buf()))
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        Self::parse(&text, &path)
    }

    /// Parses and validates the text of a config file (`path` names it in
    /// errors, which name the key at fault: `meshfs config check`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: keyed_message(text, &e),
        })?;
        cfg.validate().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// The effective config as TOML (`meshfs config show`): every key with
    /// its value, defaults included; keys left unset are listed first as
    /// comments saying what unset means.
    pub fn show(&self) -> Result<String, Error> {
        let body = toml::to_string_pretty(self).map_err(|e| Error::Config {
            path: PathBuf::from(CONFIG_FILE),
            msg: e.to_string(),
        })?;
        let mut out = String::new();
        if self.allow_other.is_none() {
            out.push_str("# allow_other: unset (on when the daemon runs as root)\n");
        }
        if self.cache_limit_mb.is_none() {
            out.push_str("# cache_limit_mb: unset (half of the data dir's disk)\n");
        }
        out.push_str(&body);
        Ok(out)
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), Error> {
        let path = Self::path(data_dir);
        let text = toml::to_string_pretty(self).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        // A crash leaves the old config or the new one, never a torn or
        // empty file (`config.toml.tmp` beside it, as before).
        crate::datadir::write_atomic(&path, text.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The version retention policy these settings describe.
    pub fn retention(&self) -> crate::meta::retention::Retention {
        crate::meta::retention::Retention {
            keep: self.versions_keep,
            max_age_s: self.versions_max_age_days.saturating_mul(24 * 3600),
            max_bytes: self.versions_max_bytes,
        }
    }

    /// Config `http_listen`: None when `off`; a port of 0 stands for `auto`.
    pub fn http_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let v = self.http_listen.trim();
        if v == "off" {
            return Ok(None);
        }
        let bad = || {
            format!("http_listen must be a loopback address and port (port `auto` allowed), or `off`: {v:?}")
        };
        let (host, port) = v.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = if port == "auto" {
            0
        } else {
            port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().map_err(|_| bad())?;
        // Metrics and the dashboard say what this mesh holds and who uses
        // it; they are not authenticated, so they stay on this machine.
        if !ip.is_loopback() {
            return Err(bad());
        }
        Ok(Some(std::net::SocketAddr::new(ip, port)))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        if DeviceId::parse_hex(&self.device_id).is_none() {
            return Err("device_id is not a 32-digit hex id".into());
        }
        if !(64 <= self.chunk_min
            && self.chunk_min <= self.chunk_avg
            && self.chunk_avg <= self.chunk_max)
        {
            return Err("need 64 <= chunk_min <= chunk_avg <= chunk_max".into());
        }
        // FastCDC's own bounds.
        if self.chunk_min > 1 << 20
            || self.chunk_avg < 256
            || self.chunk_avg > 4 << 20
            || self.chunk_max > 16 << 20
        {
            return Err("chunk sizes outside FastCDC's limits".into());
        }
        if self.sync_interval_ms == 0 || self.sync_interval_ms > 60_000 {
            return Err("sync_interval_ms must be 1..=60000".into());
        }
        crate::mesh::check_listen(&self.listen)?;
        if !(0.0..=1.0).contains(&self.prefetch_cache_share) {
            return Err("prefetch_cache_share must be between 0 and 1".into());
        }
        if self.prefetch_rate_kib == 0 {
            return Err(
                "prefetch_rate_kib must be at least 1 (turn prefetching off with prefetch = false)"
                    .into(),
            );
        }
        if !(16..=1 << 20).contains(&self.gru_vocabulary) {
            return Err("gru_vocabulary must be 16..=1048576".into());
        }
        if self.access_log_max_events == 0 || self.access_log_days == 0 {
            return Err("access_log_max_events and access_log_days must be at least 1".into());
        }
        if !(100..=600_000).contains(&self.fetch_timeout_ms) {
            return Err("fetch_timeout_ms must be 100..=600000".into());
        }
        if self.passthrough && self.passthrough_cache_mb == 0 {
            return Err(
                "passthrough_cache_mb must be at least 1 (turn passthrough off with passthrough = false)"
                    .into(),
            );
        }
        self.http_addr()?;
        if !(1..=100_000).contains(&self.log_max_mb) || self.log_keep > 100 {
            return Err("log_max_mb must be 1..=100000 and log_keep 0..=100".into());
        }
        if !(1..=1024).contains(&self.fetch_window) {
            return Err("fetch_window must be 1..=1024".into());
        }
        if !(100..=3_600_000).contains(&self.announce_interval_ms) {
            return Err("announce_interval_ms must be 100..=3600000".into());
        }
        if self.fuse_threads == 0 || self.fuse_threads > 64 {
            return Err("fuse_threads must be 1..=64".into());
        }
        if !(10..=10_000).contains(&self.raft_heartbeat_ms)
            || self.raft_election_min_ms < 3 * self.raft_heartbeat_ms
            || self.raft_election_max_ms <= self.raft_election_min_ms
            || self.raft_election_max_ms > 60_000
        {
            return Err("need 10 <= raft_heartbeat_ms, 3 x raft_heartbeat_ms <= raft_election_min_ms < raft_election_max_ms <= 60000".into());
        }
        if self.read_wait_ms > 60_000 {
            return Err("read_wait_ms must be 0..=60000".into());
        }
        if !(100..=600_000).contains(&self.write_timeout_ms) {
            return Err("write_timeout_ms must be 100..=600000".into());
        }
        if !(50..=600_000).contains(&self.offline_after_ms) {
            return Err("offline_after_ms must be 50..=600000".into());
        }
        if self.versions_keep > 1_000_000 {
            return Err("versions_keep must be 0..=1000000".into());
        }
        if self.versions_max_age_days > 36_500 {
            return Err("versions_max_age_days must be 0..=36500".into());
        }
        if !(1..=86_400).contains(&self.versions_prune_s) {
            return Err("versions_prune_s must be 1..=86400".into());
        }
        if self.batch_delay_ms > 1_000 {
            return Err("batch_delay_ms must be 0..=1000".into());
        }
        if !(1..=65_536).contains(&self.batch_max) {
            return Err("batch_max must be 1..=65536".into());
        }
        if !(1..=86_400).contains(&self.authority_takeover_s) {
            return Err("authority_takeover_s must be 1..=86400".into());
        }
        if !(50..=60_000).contains(&self.authority_report_ms) {
            return Err("authority_report_ms must be 50..=60000".into());
        }
        for (k, v) in [
            ("authority_weight_change", self.authority_weight_change),
            ("authority_weight_open", self.authority_weight_open),
            (
                "authority_weight_served_mib",
                self.authority_weight_served_mib,
            ),
            ("authority_margin", self.authority_margin),
            ("authority_min_lead", self.authority_min_lead),
        ] {
            if !(0.0..=1e6).contains(&v) {
                return Err(format!("{k} must be 0..=1000000"));
            }
        }
        if !(0.1..=86_400.0).contains(&self.authority_half_life_s) {
            return Err("authority_half_life_s must be 0.1..=86400".into());
        }
        if self.authority_hold_ms > 600_000 || self.authority_cooldown_s > 86_400 {
            return Err(
                "authority_hold_ms must be 0..=600000 and authority_cooldown_s 0..=86400".into(),
            );
        }
        if !(1..=16).contains(&self.replicas) {
            return Err("replicas must be 1..=16".into());
        }
        if !(1..=15).contains(&self.max_voters) {
            return Err("max_voters must be 1..=15".into());
        }
        Ok(())
    }

    pub fn device_id(&self) -> DeviceId {
        // Checked by `validate` on load.
        DeviceId::parse_hex(&self.device_id).unwrap_or(DeviceId([0; 16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_show_lists_every_key() {
        let p = Path::new("c.toml");
        let id = format!("device_id = \"{}\"\n", "ab".repeat(16));
        let bad = |line: &str| {
            Config::parse(&format!("{id}{line}\n"), p)
                .unwrap_err()
                .to_string()
        };
        let e = bad("replicas = \"two\"");
        assert!(e.contains("replicas") && !e.contains('\n'), "{e}");
        assert!(bad("bogus = 1").contains("bogus"));
        // toml says this in two lines; the error stays one (fuzzing found
        // it).
        let e = bad("name = ");
        assert!(e.contains("name") && !e.contains('\n'), "{e}");
        assert!(bad("access_log_days = 0").contains("access_log_days"));
        assert!(bad("http_listen = \"0.0.0.0:9000\"").contains("http_listen"));
        assert!(bad("http_listen = \"127.0.0.1:x\"").contains("http_listen"));
        let cfg = Config {
            device_id: "ab".repeat(16),
            ..Config::default()
        };
        let shown = cfg.show().unwrap();
        assert!(shown.starts_with("# allow_other: unset"), "{shown}");
        assert!(shown.contains("versions_keep = 100"), "{shown}");
        assert_eq!(Config::parse(&shown, p).unwrap(), cfg);
    }

    #[test]
    fn http_listen_is_loopback_auto_a_port_or_off() {
        let with = |v: &str| {
            Config {
                http_listen: v.into(),
                ..Config::default()
            }
            .http_addr()
        };
        assert_eq!(
            with("127.0.0.1:auto").unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            with("[::1]:9100").unwrap(),
            Some("[::1]:9100".parse().unwrap())
        );
        assert_eq!(with("off").unwrap(), None);
        assert!(with("192.168.1.2:9100").is_err());
        assert!(with("127.0.0.1:0").is_err());
        assert!(with("localhost").is_err());
    }

    #[test]
    fn defaults_round_trip_and_validate() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            device_id: DeviceId::generate().to_hex(),
            ..Config::default()
        };
        cfg.save(d.path()).unwrap();
        assert_eq!(Config::load(d.path()).unwrap(), cfg);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let id = DeviceId::generate().to_hex();
        std::fs::write(
            Config::path(d.path()),
            format!("device_id = \"{id}\"\nnmae = \"x\"\n"),
        )
        .unwrap();
        assert!(matches!(Config::load(d.path()), Err(Error::Config { .. })));
        std::fs::write(
            Config::path(d.path()),
            format!("device_id = \"{id}\"\nchunk_min = 9999999\n"),
        )
        .unwrap();
        assert!(matches!(Config::load(d.path()), Err(Error::Config { .. })));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Config::load(empty.path()),
            Err(Error::NotInitialized(_))
        ));
    }
}

/// Options given with `-o` to `meshfs mount` or through mount(8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub read_only: bool,
    /// `Some` when given explicitly; otherwise Config decides.
    pub allow_other: Option<bool>,
    pub noexec: bool,
}

impl MountOptions {
    /// Parses a comma-separated option list. Options meant for mount(8),
    /// systemd and fstab are accepted and ignored; unknown ones are refused
    /// unless `sloppy` (mount -s) is set.
    pub fn parse(list: &str, sloppy: bool) -> Result<Self, Error> {
        let mut o = MountOptions::default();
        for opt in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match opt {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "allow_other" => o.allow_other = Some(true),
                "noallow_other" => o.allow_other = Some(false),
                "noexec" => o.noexec = true,
                "exec" => o.noexec = false,
                // Always in force: the kernel checks modes and ownership, and
                // meshfs never honours device nodes or setuid bits.
                "default_permissions" | "nodev" | "nosuid" => {}
                // For mount(8), systemd and fstab; nothing for the daemon.
                "defaults" | "_netdev" | "nofail" | "noauto" | "auto" | "user" | "nouser" | "users"
                | "owner" | "group" | "async" | "atime" | "noatime" | "relatime" | "norelatime"
                | "strictatime" | "nodiratime" | "diratime" => {}
                o2 if o2.starts_with("x-") || o2.starts_with("comment=") => {}
                other if sloppy => {
                    tracing::warn!(option = other, "ignoring unknown mount option (sloppy)");
                }
                other => {
                    return Err(Error::BadOption(format!(
                        "unknown mount option '{other}' (meshfs knows ro, rw, allow_other, noallow_other, noexec, exec, default_permissions, and ignores defaults, _netdev, nofail, noauto, auto, user, x-systemd.*)"
                    )))
                }
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod mount_option_tests {
    use super::*;

    #[test]
    fn fstab_options_are_accepted_and_unknown_refused() {
        let o = MountOptions::parse(
            "rw,_netdev,nofail,x-systemd.automount,defaults,allow_other",
            false,
        )
        .unwrap();
        assert_eq!(
            o,
            MountOptions {
                read_only: false,
                allow_other: Some(true),
                noexec: false
            }
        );
        assert!(MountOptions::parse("ro", false).unwrap().read_only);
        let e = MountOptions::parse("rw,frobnicate", false).unwrap_err();
        assert!(e.to_string().contains("frobnicate"));
        assert!(MountOptions::parse("rw,frobnicate", true).is_ok());
    }
}

/// Config text, arbitrary or a valid file damaged (proptest, bounded for
/// CI): parsed, or refused with one line (`meshfs config check`), never a
/// panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    use crate::fuzzing::config_text as parses_or_says_why_in_one_line;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_is_parsed_or_refused_in_one_line(text in "\\PC{0,300}") {
            parses_or_says_why_in_one_line(&text);
        }

        #[test]
        fn a_damaged_config_is_parsed_or_refused_in_one_line(
            at in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
            insert in "\\PC{0,12}",
        ) {
            let cfg = Config { name: "alpha".into(), ..Config::default() };
            let text = cfg.show().unwrap();
            let mut chars: Vec<char> = text.chars().collect();
            let i = at.index(chars.len());
            let j = (i + cut.index(16)).min(chars.len());
            chars.splice(i..j, insert.chars());
            let damaged: String = chars.into_iter().collect();
            parses_or_says_why_in_one_line(&damaged);
        }
    }
}
