//! Command line, environment and config file, merged with the precedence
//! **flags > environment (`NKUDO_*`) > config file (`/etc/nkudo/edge.toml`) > defaults**.

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/nkudo/edge.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nkudo-edge/state";
pub const DEFAULT_PKI_DIR: &str = "/var/lib/nkudo-edge/pki";
pub const DEFAULT_RUNTIME_DIR: &str = "/var/lib/nkudo-edge/vms";
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/nkudo-edge/images";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_SPOOL_MAX_ENTRIES: usize = 10_000;
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 8 * 1024 * 1024;
pub const DEFAULT_UPDATE_HEALTH_WINDOW: Duration = Duration::from_secs(120);
pub const DEFAULT_UPDATE_STABLE_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_UPDATE_MAX_STARTS: u32 = 3;
pub const DEFAULT_SYSTEMD_UNIT: &str = "nkudo-edge.service";

const ENV_HELP: &str = "\
Precedence: command-line flags > environment > config file > defaults.

Environment variables (each overrides the config file; a flag overrides it):
  NKUDO_CONFIG                 config file (default /etc/nkudo/edge.toml; a missing default file is fine)
  NKUDO_CONTROL_PLANE          --control-plane
  NKUDO_ENROLL_TOKEN           --token
  NKUDO_STATE_DIR              --state-dir
  NKUDO_PKI_DIR                --pki-dir
  NKUDO_RUNTIME_DIR            --runtime-dir
  NKUDO_IMAGES_DIR             --images-dir
  NKUDO_HOSTNAME               --hostname
  NKUDO_CA_FILE                --ca-file
  NKUDO_INSECURE_SKIP_VERIFY   --insecure-skip-verify
  NKUDO_HEARTBEAT_INTERVAL     --heartbeat-interval
  NKUDO_CLOUD_HYPERVISOR_BIN   --cloud-hypervisor-bin
  NKUDO_QEMU_IMG_BIN           --qemu-img-bin
  NKUDO_BRIDGE                 --bridge
  NKUDO_NETBIRD_BIN, NKUDO_NETBIRD_ENABLED, NKUDO_NETBIRD_AUTO_JOIN, NKUDO_NETBIRD_HOSTNAME,
  NKUDO_NETBIRD_MANAGEMENT_URL, NKUDO_NETBIRD_SETUP_KEY (or NETBIRD_SETUP_KEY), NKUDO_NETBIRD_SETUP_KEY_FILE,
  NKUDO_NETBIRD_PROBE_TYPE, NKUDO_NETBIRD_PROBE_TARGET, NKUDO_NETBIRD_PROBE_TIMEOUT,
  NKUDO_NETBIRD_PROBE_HTTP_MIN, NKUDO_NETBIRD_PROBE_HTTP_MAX   the --netbird-* flags
  NKUDO_SPOOL_MAX_ENTRIES, NKUDO_SPOOL_MAX_BYTES               bounds of the on-disk result/log spool
  NKUDO_RELEASE_PUBLIC_KEYS    --release-public-key (comma-separated)
  NKUDO_UPDATE_HEALTH_WINDOW, NKUDO_UPDATE_STABLE_AFTER, NKUDO_UPDATE_MAX_STARTS,
  NKUDO_UPDATE_DOWNLOAD_RATE_LIMIT, NKUDO_RESTART_MODE, NKUDO_UPDATE_SYSTEMD_UNIT   the self-update flags

Durations: `15s`, `500ms`, `2m`, `1h`, `1m30s`, or bare seconds.

Exit codes: 0 success; 1 failure (an action failed, the control plane refused); 2 usage or configuration
error; 3 not enrolled (no identity in the state dir); 4 the control plane revoked or no longer knows this
agent (re-enroll); 5 the control plane could not be reached; 75 restart requested (self-update with
--restart-mode=exit: the service manager starts the new `current`).";

/// The n-kudo edge agent: enrolls this host with the control plane (mTLS identity from a CSR), sends heartbeats
/// with host facts, microVM states and NetBird status, and executes leased microVM plans through Cloud
/// Hypervisor, reporting results and streaming logs.
#[derive(Debug, Parser)]
#[command(name = "nkudo-edge", version = nkudo_core::build_info::clap_version(), about, long_about, arg_required_else_help = true, after_long_help = ENV_HELP)]
pub struct Cli {
    /// Config file (TOML). A missing default file is fine; a missing file named here is an error.
    #[arg(long, global = true, env = "NKUDO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host: make a key and CSR, redeem a one-time token, store the identity and certificates.
    Enroll(EnrollArgs),
    /// Run the agent: heartbeats, plan execution, log streaming, certificate renewal (until SIGTERM).
    Run(RunArgs),
    /// One heartbeat (and the plans it leases), then exit: the same as `run --once`.
    VerifyHeartbeat(RunArgs),
    /// Print this host's facts as indented JSON.
    Hostfacts(HostfactsArgs),
    /// Execute a local plan file through the same executor and provider; print the result JSON (exit 1 if an
    /// action failed).
    Apply(ApplyArgs),
    /// Print the agent's version.
    Version,
    /// Internal: the self-update watcher, run from the previous (known-good) binary during a trial.
    #[command(hide = true)]
    UpdateWatch(WatchArgs),
}

/// How the agent restarts into a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// `exit` when started by systemd (`INVOCATION_ID` is set), else `exec`.
    #[default]
    Auto,
    /// Re-execute `<root>/current/bin/nkudo-edge` in place (same PID).
    Exec,
    /// Exit with code 75; the service manager restarts the unit (`RestartForceExitStatus=75`).
    Exit,
}

impl RestartMode {
    /// `Auto` resolved against the environment: never `Auto`.
    pub fn effective(self) -> RestartMode {
        match self {
            RestartMode::Auto if std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty()) => RestartMode::Exit,
            RestartMode::Auto => RestartMode::Exec,
            m => m,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RestartMode::Auto => "auto",
            RestartMode::Exec => "exec",
            RestartMode::Exit => "exit",
        }
    }
}

/// `update-watch` (hidden): started detached by the agent right before it restarts into a new version.
#[derive(Debug, Args, Clone)]
pub struct WatchArgs {
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The host layout root.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The agent's PID (the same after an exec restart).
    #[arg(long)]
    pub agent_pid: u32,
    #[arg(long)]
    pub attempt_to: String,
    #[arg(long)]
    pub attempt_started_at: String,
    /// The trial deadline (RFC 3339), used when update.json cannot be read.
    #[arg(long, default_value = "")]
    pub deadline: String,
    /// exec or exit (already resolved).
    #[arg(long, value_enum)]
    pub restart_mode: RestartMode,
    #[arg(long, default_value_t = DEFAULT_UPDATE_MAX_STARTS)]
    pub max_starts: u32,
    #[arg(long, default_value = DEFAULT_SYSTEMD_UNIT)]
    pub systemd_unit: String,
    /// The agent binary's path inside a release directory (`bin/nkudo-edge`).
    #[arg(long, default_value = "bin/nkudo-edge")]
    pub exe_rel: PathBuf,
    /// The original `run` arguments (without the program name).
    #[arg(last = true, allow_hyphen_values = true, value_parser = clap::value_parser!(std::ffi::OsString))]
    pub run_args: Vec<std::ffi::OsString>,
}

fn bool_flag() -> BoolishValueParser {
    BoolishValueParser::new()
}

#[derive(Debug, Args, Clone, Default)]
pub struct DirArgs {
    /// State directory (identity, idempotency cache, spool) [default: /var/lib/nkudo-edge/state]
    #[arg(long, env = "NKUDO_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// PKI directory (client key and certificate, CA bundle) [default: /var/lib/nkudo-edge/pki]
    #[arg(long, env = "NKUDO_PKI_DIR", value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ConnArgs {
    /// Control plane base URL, e.g. https://cp.example.com:8443
    #[arg(long, env = "NKUDO_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<String>,
    /// Extra CA certificates (PEM) to trust for the control plane. Enrollment without it trusts the system
    /// roots; afterwards the CA bundle received at enrollment is trusted.
    #[arg(long, env = "NKUDO_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Do NOT verify the control plane's certificate (dangerous; never needed against an n-kudo control plane,
    /// whose CA bundle the agent receives at enrollment).
    #[arg(long, env = "NKUDO_INSECURE_SKIP_VERIFY", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL")]
    pub insecure_skip_verify: Option<bool>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub dirs: DirArgs,
    /// One-time enrollment token (precedence: --token > NKUDO_ENROLL_TOKEN > --token-file).
    #[arg(
        long,
        env = "NKUDO_ENROLL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        allow_hyphen_values = true
    )]
    pub token: Option<String>,
    /// File holding the enrollment token (trimmed).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Hostname to enroll as [default: the OS hostname]
    #[arg(long, env = "NKUDO_HOSTNAME")]
    pub hostname: Option<String>,
    /// Replace an identity already stored in the state directory (re-enrollment).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ProviderArgs {
    /// Per-VM runtime directories [default: /var/lib/nkudo-edge/vms]
    #[arg(long, env = "NKUDO_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Base image cache [default: /var/lib/nkudo-edge/images]
    #[arg(long, env = "NKUDO_IMAGES_DIR", value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Cloud Hypervisor binary (name on PATH or path) [default: cloud-hypervisor]
    #[arg(long, env = "NKUDO_CLOUD_HYPERVISOR_BIN", value_name = "PATH")]
    pub cloud_hypervisor_bin: Option<PathBuf>,
    /// qemu-img binary, for qcow2 overlays of base images [default: qemu-img]
    #[arg(long, env = "NKUDO_QEMU_IMG_BIN", value_name = "PATH")]
    pub qemu_img_bin: Option<PathBuf>,
    /// Bridge that VM TAP devices join when a plan names none [default: none]
    #[arg(long, env = "NKUDO_BRIDGE", value_name = "NAME")]
    pub bridge: Option<String>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct NetbirdArgs {
    /// NetBird setup key for joining the mesh (prefer NETBIRD_SETUP_KEY or --netbird-setup-key-file: a flag is
    /// visible in `ps`). Never stored or logged.
    #[arg(
        long,
        env = "NKUDO_NETBIRD_SETUP_KEY",
        hide_env_values = true,
        value_name = "KEY",
        allow_hyphen_values = true
    )]
    pub netbird_setup_key: Option<String>,
    /// File holding the NetBird setup key.
    #[arg(long, env = "NKUDO_NETBIRD_SETUP_KEY_FILE", value_name = "FILE")]
    pub netbird_setup_key_file: Option<PathBuf>,
    /// netbird CLI [default: netbird]
    #[arg(long, env = "NKUDO_NETBIRD_BIN", value_name = "PATH")]
    pub netbird_bin: Option<PathBuf>,
    /// Report NetBird status [default: true]
    #[arg(long, env = "NKUDO_NETBIRD_ENABLED", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL")]
    pub netbird_enabled: Option<bool>,
    /// Join the mesh with the setup key when not connected [default: true]
    #[arg(long, env = "NKUDO_NETBIRD_AUTO_JOIN", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), value_name = "BOOL")]
    pub netbird_auto_join: Option<bool>,
    /// Hostname for the NetBird peer [default: the OS hostname]
    #[arg(long, env = "NKUDO_NETBIRD_HOSTNAME")]
    pub netbird_hostname: Option<String>,
    /// NetBird management URL for joining [default: NetBird's own]
    #[arg(long, env = "NKUDO_NETBIRD_MANAGEMENT_URL", value_name = "URL")]
    pub netbird_management_url: Option<String>,
    /// Accepted for compatibility with the earlier agent; this agent never installs software.
    #[arg(long, env = "NKUDO_NETBIRD_INSTALL_CMD", hide = true)]
    pub netbird_install_cmd: Option<String>,
    /// Accepted for compatibility with the earlier agent (service state comes from `netbird status`).
    #[arg(long, env = "NKUDO_NETBIRD_REQUIRE_SERVICE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = bool_flag(), hide = true)]
    pub netbird_require_service: Option<bool>,
    /// Mesh probe type: http or ping [default: http]
    #[arg(long, env = "NKUDO_NETBIRD_PROBE_TYPE", value_parser = ["http", "ping"])]
    pub netbird_probe_type: Option<String>,
    /// Mesh probe target (URL or host); no probe when empty [default: none]
    #[arg(long, env = "NKUDO_NETBIRD_PROBE_TARGET")]
    pub netbird_probe_target: Option<String>,
    /// Mesh probe timeout [default: 5s]
    #[arg(long, env = "NKUDO_NETBIRD_PROBE_TIMEOUT", value_parser = parse_duration)]
    pub netbird_probe_timeout: Option<Duration>,
    /// Lowest HTTP status that counts as a passed probe [default: 200]
    #[arg(long, env = "NKUDO_NETBIRD_PROBE_HTTP_MIN")]
    pub netbird_probe_http_min: Option<u16>,
    /// Highest HTTP status that counts as a passed probe [default: 399]
    #[arg(long, env = "NKUDO_NETBIRD_PROBE_HTTP_MAX")]
    pub netbird_probe_http_max: Option<u16>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub dirs: DirArgs,
    #[command(flatten)]
    pub provider: ProviderArgs,
    #[command(flatten)]
    pub netbird: NetbirdArgs,
    /// Heartbeat interval until the control plane names one, which then wins (±10% jitter) [default: 15s]
    #[arg(long, env = "NKUDO_HEARTBEAT_INTERVAL", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,
    /// One heartbeat (and the plans it leases, executed and reported), then exit.
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub update: UpdateArgs,
}

#[derive(Debug, Args, Clone, Default)]
pub struct UpdateArgs {
    /// A trusted release public key (minisign base64 line `RW...`; repeatable). Without one, self-updates are
    /// refused and reported. NKUDO_RELEASE_PUBLIC_KEYS takes a comma-separated list.
    #[arg(
        long = "release-public-key",
        env = "NKUDO_RELEASE_PUBLIC_KEYS",
        value_delimiter = ',',
        value_name = "KEY"
    )]
    pub release_public_keys: Vec<String>,
    /// A new version must report a healthy heartbeat within this window after the switch, or the host goes back
    /// to the previous version [default: 120s]
    #[arg(long, env = "NKUDO_UPDATE_HEALTH_WINDOW", value_parser = parse_duration, value_name = "DURATION")]
    pub update_health_window: Option<Duration>,
    /// A new version commits after a successful heartbeat once it has been up this long [default: 30s]
    #[arg(long, env = "NKUDO_UPDATE_STABLE_AFTER", value_parser = parse_duration, value_name = "DURATION")]
    pub update_stable_after: Option<Duration>,
    /// Process starts of a new version during its trial before it is rolled back [default: 3]
    #[arg(long, env = "NKUDO_UPDATE_MAX_STARTS", value_name = "N")]
    pub update_max_starts: Option<u32>,
    /// Download rate limit in bytes/s (`500000`, `512k`, `2M`) [default: unlimited]
    #[arg(long, env = "NKUDO_UPDATE_DOWNLOAD_RATE_LIMIT", value_parser = parse_rate, value_name = "BYTES")]
    pub update_download_rate_limit: Option<u64>,
    /// How to restart into a new version: auto (exit under systemd, else exec), exec, exit [default: auto]
    #[arg(long, env = "NKUDO_RESTART_MODE", value_enum, value_name = "MODE")]
    pub restart_mode: Option<RestartMode>,
    /// The systemd unit the update watcher restarts after a rollback in exit mode [default: nkudo-edge.service]
    #[arg(long, env = "NKUDO_UPDATE_SYSTEMD_UNIT", value_name = "UNIT")]
    pub update_systemd_unit: Option<String>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct HostfactsArgs {
    #[command(flatten)]
    pub provider: ProviderArgs,
    /// netbird CLI [default: netbird]
    #[arg(long, env = "NKUDO_NETBIRD_BIN", value_name = "PATH")]
    pub netbird_bin: Option<PathBuf>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ApplyArgs {
    /// Local plan JSON: {"plan_id"?, "execution_id"?, "actions":[{"action_id"?, "type", "params", "timeout"?}]}
    #[arg(long, value_name = "FILE")]
    pub plan: PathBuf,
    /// State directory (idempotency cache) [default: /var/lib/nkudo-edge/state]
    #[arg(long, env = "NKUDO_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub provider: ProviderArgs,
}

/// Durations in flags and the config file: the one parser the workspace shares (`15s`, `500ms`, `2m`, `1h`,
/// `1m30s`, `1.5s` or bare seconds; at most ten years).
pub use nkudo_core::duration::parse_duration;

/// Parses a rate in bytes/s: `500000`, `512k`/`512K`/`512KiB` (×1024), `2M`/`2MiB` (×1024²), `1G` (×1024³).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: expected bytes/s like 500000, 512k, 2M"))?;
    let mult: u64 = match unit.trim().trim_end_matches("/s") {
        "" | "B" => 1,
        "k" | "K" | "KiB" | "KB" => 1024,
        "m" | "M" | "MiB" | "MB" => 1024 * 1024,
        "g" | "G" | "GiB" | "GB" => 1024 * 1024 * 1024,
        u => return Err(format!("invalid rate {s:?}: unknown unit {u:?} (k, M, G)")),
    };
    let v = n.checked_mul(mult).ok_or_else(|| format!("rate {s:?} is too large"))?;
    if v == 0 {
        return Err(format!("rate {s:?} must be above zero (leave it unset for no limit)"));
    }
    Ok(v)
}

fn de_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Num(n)) if n > 0 => Ok(Some(n)),
        Some(Raw::Num(_)) => Err(serde::de::Error::custom(
            "update_download_rate_limit must be above zero",
        )),
        Some(Raw::Text(t)) => parse_rate(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(n)) => Ok(Some(Duration::from_secs(n))),
        Some(Raw::Text(t)) => parse_duration(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// The config file (TOML). Every key is optional; unknown keys are an error (typos must not pass silently).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub control_plane: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub pki_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub images_dir: Option<PathBuf>,
    pub hostname: Option<String>,
    pub token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_interval: Option<Duration>,
    pub cloud_hypervisor_bin: Option<PathBuf>,
    pub qemu_img_bin: Option<PathBuf>,
    pub bridge: Option<String>,
    #[serde(default, deserialize_with = "de_duration")]
    pub vm_stop_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub vm_boot_timeout: Option<Duration>,
    pub spool_max_entries: Option<usize>,
    pub spool_max_bytes: Option<u64>,
    /// Trusted release public keys (minisign base64 lines).
    pub release_public_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_duration")]
    pub update_health_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    pub update_stable_after: Option<Duration>,
    pub update_max_starts: Option<u32>,
    #[serde(default, deserialize_with = "de_rate")]
    pub update_download_rate_limit: Option<u64>,
    pub restart_mode: Option<RestartMode>,
    pub update_systemd_unit: Option<String>,
    #[serde(default)]
    pub netbird: FileNetbird,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileNetbird {
    pub enabled: Option<bool>,
    pub bin: Option<PathBuf>,
    pub auto_join: Option<bool>,
    pub setup_key_file: Option<PathBuf>,
    pub management_url: Option<String>,
    pub hostname: Option<String>,
    pub install_command: Option<String>,
    pub require_service: Option<bool>,
    pub probe_type: Option<String>,
    pub probe_target: Option<String>,
    #[serde(default, deserialize_with = "de_duration")]
    pub probe_timeout: Option<Duration>,
    pub probe_http_min: Option<u16>,
    pub probe_http_max: Option<u16>,
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Loads the config file: `explicit` (flag or `NKUDO_CONFIG`) must exist; the default may be missing.
pub fn load_config(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(FileConfig::default()),
        Err(e) => return Err(ConfigError(format!("read config file {}: {e}", path.display()))),
    };
    toml::from_str(&text).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

fn read_secret_file(p: &Path, what: &str) -> Result<String, ConfigError> {
    let s = std::fs::read_to_string(p).map_err(|e| ConfigError(format!("read {what} {}: {e}", p.display())))?;
    let s = s.trim().to_string();
    if s.is_empty() {
        return Err(ConfigError(format!("{what} {} is empty", p.display())));
    }
    Ok(s)
}

/// Connection settings after merging.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub control_plane: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

impl ConnSettings {
    pub fn resolve(a: &ConnArgs, f: &FileConfig) -> ConnSettings {
        ConnSettings {
            control_plane: a.control_plane.clone().or_else(|| f.control_plane.clone()),
            ca_file: a.ca_file.clone().or_else(|| f.ca_file.clone()),
            insecure_skip_verify: a.insecure_skip_verify.or(f.insecure_skip_verify).unwrap_or(false),
        }
    }
    pub fn require_control_plane(&self) -> Result<&str, ConfigError> {
        self.control_plane
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                ConfigError(
                    "--control-plane is required (or NKUDO_CONTROL_PLANE, or control_plane in the config file)".into(),
                )
            })
    }
}

#[derive(Debug, Clone)]
pub struct Dirs {
    pub state_dir: PathBuf,
    pub pki_dir: PathBuf,
}

impl Dirs {
    pub fn resolve(a: &DirArgs, f: &FileConfig) -> Dirs {
        Dirs {
            state_dir: a
                .state_dir
                .clone()
                .or_else(|| f.state_dir.clone())
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            pki_dir: a
                .pki_dir
                .clone()
                .or_else(|| f.pki_dir.clone())
                .unwrap_or_else(|| DEFAULT_PKI_DIR.into()),
        }
    }
}

/// Provider settings after merging.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub runtime_dir: PathBuf,
    pub images_dir: PathBuf,
    pub cloud_hypervisor_bin: PathBuf,
    pub qemu_img_bin: PathBuf,
    pub bridge: Option<String>,
    pub stop_timeout: Duration,
    pub boot_timeout: Duration,
}

impl ProviderSettings {
    pub fn resolve(a: &ProviderArgs, f: &FileConfig) -> ProviderSettings {
        ProviderSettings {
            runtime_dir: a
                .runtime_dir
                .clone()
                .or_else(|| f.runtime_dir.clone())
                .unwrap_or_else(|| DEFAULT_RUNTIME_DIR.into()),
            images_dir: a
                .images_dir
                .clone()
                .or_else(|| f.images_dir.clone())
                .unwrap_or_else(|| DEFAULT_IMAGES_DIR.into()),
            cloud_hypervisor_bin: a
                .cloud_hypervisor_bin
                .clone()
                .or_else(|| f.cloud_hypervisor_bin.clone())
                .unwrap_or_else(|| "cloud-hypervisor".into()),
            qemu_img_bin: a
                .qemu_img_bin
                .clone()
                .or_else(|| f.qemu_img_bin.clone())
                .unwrap_or_else(|| "qemu-img".into()),
            bridge: a.bridge.clone().or_else(|| f.bridge.clone()).filter(|b| !b.is_empty()),
            stop_timeout: f.vm_stop_timeout.unwrap_or(Duration::from_secs(15)),
            boot_timeout: f.vm_boot_timeout.unwrap_or(Duration::from_secs(30)),
        }
    }
}

/// NetBird settings after merging. `setup_key` is never logged or stored.
#[derive(Clone)]
pub struct NetbirdSettings {
    pub enabled: bool,
    pub bin: PathBuf,
    pub auto_join: bool,
    pub setup_key: Option<String>,
    pub management_url: Option<String>,
    pub hostname: Option<String>,
    pub probe_type: String,
    pub probe_target: Option<String>,
    pub probe_timeout: Duration,
    pub probe_http_min: u16,
    pub probe_http_max: u16,
}

impl std::fmt::Debug for NetbirdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetbirdSettings")
            .field("enabled", &self.enabled)
            .field("bin", &self.bin)
            .field("auto_join", &self.auto_join)
            .field("setup_key", &self.setup_key.as_ref().map(|_| "<redacted>"))
            .field("management_url", &self.management_url)
            .field("probe_target", &self.probe_target)
            .finish()
    }
}

impl NetbirdSettings {
    pub fn resolve(a: &NetbirdArgs, f: &FileConfig) -> Result<NetbirdSettings, ConfigError> {
        let n = &f.netbird;
        // Setup key: flag/NKUDO_NETBIRD_SETUP_KEY > NETBIRD_SETUP_KEY > key file (flag/env > config).
        let setup_key = match a.netbird_setup_key.clone().filter(|k| !k.trim().is_empty()) {
            Some(k) => Some(k.trim().to_string()),
            None => match env_nonempty("NETBIRD_SETUP_KEY") {
                Some(k) => Some(k.trim().to_string()),
                None => match a.netbird_setup_key_file.clone().or_else(|| n.setup_key_file.clone()) {
                    Some(p) => Some(read_secret_file(&p, "NetBird setup key file")?),
                    None => None,
                },
            },
        };
        let min = a.netbird_probe_http_min.or(n.probe_http_min).unwrap_or(200);
        let max = a.netbird_probe_http_max.or(n.probe_http_max).unwrap_or(399);
        if min > max {
            return Err(ConfigError(format!(
                "--netbird-probe-http-min {min} is above --netbird-probe-http-max {max}"
            )));
        }
        let probe_type = a
            .netbird_probe_type
            .clone()
            .or_else(|| n.probe_type.clone())
            .unwrap_or_else(|| "http".into());
        if probe_type != "http" && probe_type != "ping" {
            return Err(ConfigError(format!(
                "netbird probe type must be http or ping, not {probe_type:?}"
            )));
        }
        Ok(NetbirdSettings {
            enabled: a.netbird_enabled.or(n.enabled).unwrap_or(true),
            bin: a
                .netbird_bin
                .clone()
                .or_else(|| n.bin.clone())
                .unwrap_or_else(|| "netbird".into()),
            auto_join: a.netbird_auto_join.or(n.auto_join).unwrap_or(true),
            setup_key,
            management_url: a
                .netbird_management_url
                .clone()
                .or_else(|| n.management_url.clone())
                .filter(|s| !s.is_empty()),
            hostname: a
                .netbird_hostname
                .clone()
                .or_else(|| n.hostname.clone())
                .filter(|s| !s.is_empty()),
            probe_type,
            probe_target: a
                .netbird_probe_target
                .clone()
                .or_else(|| n.probe_target.clone())
                .filter(|s| !s.is_empty()),
            probe_timeout: a
                .netbird_probe_timeout
                .or(n.probe_timeout)
                .unwrap_or(Duration::from_secs(5)),
            probe_http_min: min,
            probe_http_max: max,
        })
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub conn: ConnSettings,
    pub dirs: Dirs,
    pub provider: ProviderSettings,
    pub netbird: NetbirdSettings,
    pub heartbeat_interval: Duration,
    pub once: bool,
    pub spool_max_entries: usize,
    pub spool_max_bytes: u64,
    pub update: UpdateSettings,
}

/// Self-update settings after merging.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    /// Parsed and validated trusted keys (empty: updates are refused and reported).
    pub release_public_keys: Vec<nkudo_core::minisign::PublicKey>,
    pub health_window: Duration,
    pub stable_after: Duration,
    pub max_starts: u32,
    /// Bytes per second; `None`: unlimited.
    pub download_rate_limit: Option<u64>,
    pub restart_mode: RestartMode,
    pub systemd_unit: String,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            release_public_keys: Vec::new(),
            health_window: DEFAULT_UPDATE_HEALTH_WINDOW,
            stable_after: DEFAULT_UPDATE_STABLE_AFTER,
            max_starts: DEFAULT_UPDATE_MAX_STARTS,
            download_rate_limit: None,
            restart_mode: RestartMode::Auto,
            systemd_unit: DEFAULT_SYSTEMD_UNIT.into(),
        }
    }
}

impl UpdateSettings {
    pub fn resolve(a: &UpdateArgs, f: &FileConfig) -> Result<UpdateSettings, ConfigError> {
        let texts: Vec<String> = if a.release_public_keys.iter().any(|k| !k.trim().is_empty()) {
            a.release_public_keys.clone()
        } else {
            f.release_public_keys.clone().unwrap_or_default()
        };
        let mut keys = Vec::new();
        for t in texts.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let k = nkudo_core::minisign::PublicKey::from_base64(t).map_err(|e| {
                ConfigError(format!(
                    "release public key {t:?} is not a minisign public key (the base64 line `RW...`): {e}"
                ))
            })?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let health_window = a
            .update_health_window
            .or(f.update_health_window)
            .unwrap_or(DEFAULT_UPDATE_HEALTH_WINDOW);
        let stable_after = a
            .update_stable_after
            .or(f.update_stable_after)
            .unwrap_or(DEFAULT_UPDATE_STABLE_AFTER);
        if health_window < Duration::from_secs(1) {
            return Err(ConfigError(format!(
                "update health window {health_window:?} is too short (at least 1s)"
            )));
        }
        if stable_after >= health_window {
            return Err(ConfigError(format!(
                "update_stable_after ({stable_after:?}) must be shorter than update_health_window \
                 ({health_window:?}): a new version could never commit"
            )));
        }
        let max_starts = a
            .update_max_starts
            .or(f.update_max_starts)
            .unwrap_or(DEFAULT_UPDATE_MAX_STARTS);
        if max_starts == 0 {
            return Err(ConfigError("update_max_starts must be at least 1".into()));
        }
        Ok(UpdateSettings {
            release_public_keys: keys,
            health_window,
            stable_after,
            max_starts,
            download_rate_limit: a.update_download_rate_limit.or(f.update_download_rate_limit),
            restart_mode: a.restart_mode.or(f.restart_mode).unwrap_or_default(),
            systemd_unit: a
                .update_systemd_unit
                .clone()
                .or_else(|| f.update_systemd_unit.clone())
                .filter(|u| !u.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SYSTEMD_UNIT.into()),
        })
    }
}

impl RunSettings {
    pub fn resolve(a: &RunArgs, f: &FileConfig) -> Result<RunSettings, ConfigError> {
        let env_num = |k: &str| -> Result<Option<u64>, ConfigError> {
            match env_nonempty(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ConfigError(format!("{k}={v:?} is not a number"))),
            }
        };
        let interval = a
            .heartbeat_interval
            .or(f.heartbeat_interval)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        if interval < Duration::from_millis(100) {
            return Err(ConfigError(format!(
                "heartbeat interval {interval:?} is too short (at least 100ms)"
            )));
        }
        Ok(RunSettings {
            conn: ConnSettings::resolve(&a.conn, f),
            dirs: Dirs::resolve(&a.dirs, f),
            provider: ProviderSettings::resolve(&a.provider, f),
            netbird: NetbirdSettings::resolve(&a.netbird, f)?,
            heartbeat_interval: interval,
            once: a.once,
            spool_max_entries: env_num("NKUDO_SPOOL_MAX_ENTRIES")?
                .map(|v| v as usize)
                .or(f.spool_max_entries)
                .unwrap_or(DEFAULT_SPOOL_MAX_ENTRIES)
                .max(10),
            spool_max_bytes: env_num("NKUDO_SPOOL_MAX_BYTES")?
                .or(f.spool_max_bytes)
                .unwrap_or(DEFAULT_SPOOL_MAX_BYTES)
                .max(64 * 1024),
            update: UpdateSettings::resolve(&a.update, f)?,
        })
    }
}

/// The enrollment token: `--token` (or NKUDO_ENROLL_TOKEN, which clap folds into it) > `--token-file` >
/// `token_file` of the config file.
pub fn resolve_token(a: &EnrollArgs, f: &FileConfig) -> Result<String, ConfigError> {
    if let Some(t) = a.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    match a.token_file.clone().or_else(|| f.token_file.clone()) {
        Some(p) => read_secret_file(&p, "token file"),
        None => Err(ConfigError(
            "enrollment token is required (--token, NKUDO_ENROLL_TOKEN or --token-file)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn config_file_parses_and_refuses_typos() {
        let f: FileConfig = toml::from_str(
            "control_plane = \"https://cp:8443\"\nheartbeat_interval = \"5s\"\n[netbird]\nenabled = false\nprobe_timeout = 3\n",
        )
        .unwrap();
        assert_eq!(f.heartbeat_interval, Some(Duration::from_secs(5)));
        assert_eq!(f.netbird.enabled, Some(false));
        assert_eq!(f.netbird.probe_timeout, Some(Duration::from_secs(3)));
        assert!(toml::from_str::<FileConfig>("control_plan = \"x\"").is_err());
    }

    #[test]
    fn flags_beat_config_beats_defaults() {
        let cli = Cli::try_parse_from([
            "nkudo-edge",
            "run",
            "--control-plane",
            "https://flag",
            "--netbird-enabled=false",
            "--once",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else { panic!() };
        let f = FileConfig {
            control_plane: Some("https://file".into()),
            state_dir: Some("/file/state".into()),
            heartbeat_interval: Some(Duration::from_secs(7)),
            ..Default::default()
        };
        let s = RunSettings::resolve(&a, &f).unwrap();
        assert_eq!(s.conn.control_plane.as_deref(), Some("https://flag"));
        assert_eq!(s.dirs.state_dir, PathBuf::from("/file/state"));
        assert_eq!(s.dirs.pki_dir, PathBuf::from(DEFAULT_PKI_DIR));
        assert_eq!(s.heartbeat_interval, Duration::from_secs(7));
        assert!(!s.netbird.enabled);
        assert!(s.netbird.auto_join);
        assert!(s.once);
    }

    #[test]
    fn the_shipped_sample_config_parses() {
        let text = include_str!("../../deployments/config/edge.toml");
        let f: FileConfig = toml::from_str(text).unwrap();
        assert!(f.control_plane.is_some());
        assert_eq!(f.heartbeat_interval, Some(Duration::from_secs(15)));
        assert!(f.netbird.setup_key_file.is_some());
        let u = UpdateSettings::resolve(&UpdateArgs::default(), &f).unwrap();
        assert_eq!(u.health_window, DEFAULT_UPDATE_HEALTH_WINDOW);
        assert_eq!(u.restart_mode, RestartMode::Auto);
    }

    #[test]
    fn update_settings_merge_and_validate() {
        // A test key (Ed25519 seed [7; 32], key id 07 01 02 ... 07).
        let key = "RWQHAQIDBAUGB+pKbGPinFIKvvVQexMuxfmVR3auvr57kkIe6mkURtIs";
        let f: FileConfig = toml::from_str(&format!(
            "release_public_keys = [\"{key}\"]\nupdate_health_window = \"8s\"\nupdate_stable_after = 2\n\
             update_max_starts = 5\nupdate_download_rate_limit = \"512k\"\nrestart_mode = \"exit\"\n"
        ))
        .unwrap();
        let u = UpdateSettings::resolve(&UpdateArgs::default(), &f).unwrap();
        assert_eq!(u.release_public_keys.len(), 1);
        assert_eq!(u.release_public_keys[0].to_base64(), key);
        assert_eq!(u.health_window, Duration::from_secs(8));
        assert_eq!(u.stable_after, Duration::from_secs(2));
        assert_eq!(u.max_starts, 5);
        assert_eq!(u.download_rate_limit, Some(512 * 1024));
        assert_eq!(u.restart_mode, RestartMode::Exit);
        // The comma-separated environment form, as clap splits it.
        let cli = Cli::try_parse_from(["nkudo-edge", "run", "--release-public-key", &format!("{key},{key}")]).unwrap();
        let Command::Run(a) = cli.command else { panic!() };
        assert_eq!(a.update.release_public_keys.len(), 2);
        let u = UpdateSettings::resolve(&a.update, &FileConfig::default()).unwrap();
        assert_eq!(u.release_public_keys.len(), 1, "duplicates collapse");
        // Flags beat the file.
        let cli = Cli::try_parse_from([
            "nkudo-edge",
            "run",
            "--update-health-window",
            "1m",
            "--restart-mode",
            "exec",
            "--update-max-starts",
            "2",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else { panic!() };
        let f = FileConfig {
            update_health_window: Some(Duration::from_secs(5)),
            restart_mode: Some(RestartMode::Exit),
            ..Default::default()
        };
        let u = UpdateSettings::resolve(&a.update, &f).unwrap();
        assert_eq!(u.health_window, Duration::from_secs(60));
        assert_eq!(u.restart_mode, RestartMode::Exec);
        assert_eq!(u.max_starts, 2);
        // Nonsense is refused.
        let bad = UpdateArgs {
            release_public_keys: vec!["nonsense".into()],
            ..Default::default()
        };
        assert!(UpdateSettings::resolve(&bad, &FileConfig::default()).is_err());
        let bad = UpdateArgs {
            update_stable_after: Some(Duration::from_secs(200)),
            ..Default::default()
        };
        assert!(UpdateSettings::resolve(&bad, &FileConfig::default()).is_err());
        assert_eq!(parse_rate("2M").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("0").is_err() && parse_rate("3x").is_err());
    }

    #[test]
    fn secrets_may_start_with_a_hyphen() {
        // base64url tokens and keys can start with '-': `--token -abc` is a value, not a flag.
        let cli = Cli::try_parse_from([
            "nkudo-edge",
            "enroll",
            "--token",
            "-Xy_z",
            "--control-plane",
            "https://cp",
        ])
        .unwrap();
        let Command::Enroll(a) = cli.command else { panic!() };
        assert_eq!(a.token.as_deref(), Some("-Xy_z"));
        let cli = Cli::try_parse_from(["nkudo-edge", "run", "--netbird-setup-key", "-k", "--once"]).unwrap();
        let Command::Run(a) = cli.command else { panic!() };
        assert_eq!(a.netbird.netbird_setup_key.as_deref(), Some("-k"));
        assert!(a.once);
    }

    #[test]
    fn missing_explicit_config_is_an_error() {
        assert!(load_config(Some(Path::new("/nonexistent/edge.toml"))).is_err());
    }
}
