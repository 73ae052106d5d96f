//! Spawning the real control-plane binary.

use crate::db::{database_url, Backend, DbHandle};
use anyhow::{anyhow, bail, Context};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the control-plane binary.
pub const CONTROL_PLANE_BIN: &str = "nkudo-control-plane";

/// How long a control plane may take to print its `listening:` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variables of the control plane that the harness never lets leak in from the test's own
/// environment (the harness sets what it wants explicitly).
const SCRUBBED_ENV: &[&str] = &[
    "CONTROL_PLANE_ADDR",
    "NKUDO_DATA_DIR",
    "DATABASE_URL",
    "ADMIN_KEY",
    "REQUIRE_PERSISTENT_PKI",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "CA_COMMON_NAME",
    "DEFAULT_ENROLLMENT_TTL",
    "AGENT_CERT_TTL",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_OFFLINE_AFTER",
    "OFFLINE_SWEEP_INTERVAL",
    "HEARTBEAT_FLUSH_INTERVAL",
    "PLAN_LEASE_TTL",
    "MAX_PENDING_PLANS",
    "ENROLL_RATE_LIMIT_PER_MINUTE",
    "ENROLL_RATE_LIMIT_BURST",
    "HTTP_SHUTDOWN_TIMEOUT",
    "LOG_FORMAT",
    "AGENT_CA_PREVIOUS_CERT_FILES",
    "FLEET_GAUGES_INTERVAL",
    "AUDIT_VERIFY_INTERVAL",
    "RELEASE_PUBLIC_KEYS",
    "RELEASE_PUBLIC_KEYS_FILE",
    "PROMETHEUS_URL",
    "ROLLOUT_TICK",
    "MINIMUM_AGENT_VERSION",
    "SERVER_NAMES",
];

/// Path of a workspace binary in the same target profile directory as the running executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`), or in `$NKUDO_BIN_DIR` when set.
///
/// Panics with instructions when the binary is missing: cargo does not build other packages' binaries for
/// integration tests, so run `cargo build --workspace --bins` first.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("NKUDO_BIN_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe.parent().expect("executable has a parent directory").to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}.\n\
             The integration tests run the real binaries, which cargo does not build for them: run\n\
             \n    cargo build --workspace --bins\n\n\
             (with the same profile as the tests, e.g. add --release for `cargo test --release`),\n\
             or point NKUDO_BIN_DIR at the directory holding the binaries.",
            path.display()
        );
    }
    path
}

/// A temporary directory removed (recursively) on drop. Kept when the thread is panicking, so that a failed
/// test's data directory and logs can be inspected.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection (test panicked)", self.path.display());
            return;
        }
        if std::env::var_os("NKUDO_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("keeping {} (NKUDO_TEST_KEEP)", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What to start: backend, environment, admin key policy. Build with [`ControlPlane::builder`].
#[derive(Debug, Clone)]
pub struct ControlPlaneBuilder {
    backend: Backend,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    admin_key: Option<String>,
    database_url: Option<String>,
}

impl ControlPlaneBuilder {
    /// Uses this existing database (`DATABASE_URL`) instead of a fresh one, e.g. another control plane's
    /// `database_url` to run a second replica on it. The database is not owned (never dropped by this one).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Adds (or overrides) an environment variable of the control plane.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env_remove.retain(|k| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Makes sure an environment variable is NOT set for the control plane (also removes a default).
    pub fn env_remove(mut self, key: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        if key == "ADMIN_KEY" {
            self.admin_key = None;
        }
        self.env_remove.push(key);
        self
    }

    /// Uses this admin key instead of the random one.
    pub fn admin_key(mut self, key: impl Into<String>) -> Self {
        self.admin_key = Some(key.into());
        self
    }

    /// A second replica of `first`: the same (Postgres) database, admin key and PKI (the first replica's dev
    /// agent CA and server certificate, as persistent files), so agents and clients trust both.
    pub fn replica_of(self, first: &ControlPlane) -> anyhow::Result<Self> {
        let url = first
            .database_url
            .clone()
            .context("a replica needs a shared database: start the first control plane on Postgres")?;
        let pki = first.data_dir.join("pki");
        let mut b = self.database_url(url).admin_key(first.admin_key.clone());
        for (var, file) in [
            ("CA_CERT_FILE", "ca.crt"),
            ("CA_KEY_FILE", "ca.key"),
            ("SERVER_CERT_FILE", "server.crt"),
            ("SERVER_KEY_FILE", "server.key"),
        ] {
            let path = pki.join(file);
            anyhow::ensure!(path.is_file(), "{} missing: dev PKI layout changed?", path.display());
            b = b.env(var, path.display().to_string());
        }
        Ok(b)
    }

    /// Sets no `ADMIN_KEY`: the control plane generates one (dev mode), prints it once and stores it in
    /// `<data>/admin.key`; the harness picks it up from the start-up output.
    pub fn server_generated_admin_key(self) -> Self {
        self.env_remove("ADMIN_KEY")
    }

    /// Prepares the data directory and database without starting anything. `None`: backend unavailable and
    /// skipping allowed (see [`database_url`]).
    pub async fn prepare(self) -> anyhow::Result<Option<Prepared>> {
        let db = match &self.database_url {
            Some(url) => DbHandle::existing(self.backend, url.clone()),
            None => match database_url(self.backend).await? {
                Some(db) => db,
                None => return Ok(None),
            },
        };
        let root = TempDir::new("nkudo-cp")?;
        let data_dir = root.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        Ok(Some(Prepared {
            builder: self,
            db,
            data_dir,
            root,
        }))
    }

    /// Prepares and starts the control plane; `None` when the backend is unavailable and skipping is allowed.
    pub async fn start(self) -> anyhow::Result<Option<ControlPlane>> {
        let Some(prepared) = self.prepare().await? else {
            return Ok(None);
        };
        prepared.start().await.map(Some)
    }
}

/// A data directory and database ready for a control plane (not running yet).
#[derive(Debug)]
pub struct Prepared {
    builder: ControlPlaneBuilder,
    db: DbHandle,
    data_dir: PathBuf,
    // Dropped last (declared last).
    root: TempDir,
}

impl Prepared {
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    /// The temporary root directory (holds `data/` and `control-plane.stderr.log`); a place for extra files.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
    pub fn db(&self) -> &DbHandle {
        &self.db
    }

    fn stderr_path(&self) -> PathBuf {
        self.root.path().join("control-plane.stderr.log")
    }

    /// A command for the control-plane binary with this control plane's environment.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin_path(CONTROL_PLANE_BIN));
        cmd.args(args);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.env("NKUDO_DATA_DIR", &self.data_dir);
        cmd.env("CONTROL_PLANE_ADDR", "127.0.0.1:0");
        cmd.env("HEARTBEAT_FLUSH_INTERVAL", "100ms");
        cmd.env("NO_COLOR", "1");
        cmd.env(
            "RUST_LOG",
            std::env::var("NKUDO_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        if let Some(url) = self.db.url() {
            cmd.env("DATABASE_URL", url);
        }
        if let Some(key) = &self.builder.admin_key {
            cmd.env("ADMIN_KEY", key);
        }
        for (k, v) in &self.builder.env {
            cmd.env(k, v);
        }
        for k in &self.builder.env_remove {
            cmd.env_remove(k);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs the binary (serve, no arguments) expecting it to EXIT within `timeout` (e.g. refused start-up).
    /// Fails if it is still running then (it is killed) or if it printed `listening:`.
    pub async fn run_expect_exit(&self, timeout: Duration) -> anyhow::Result<Output> {
        let mut cmd = self.command(std::iter::empty::<&str>());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawn control plane")?;
        // Drain both pipes on threads so the child never blocks on a full pipe.
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let t_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let t_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = t_out.join().unwrap_or_default();
                let stderr = t_err.join().unwrap_or_default();
                bail!(
                    "control plane still running after {timeout:?} although it was expected to refuse start-up\n\
                     stdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    tail(&String::from_utf8_lossy(&stderr), 8000)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stdout = t_out.join().unwrap_or_default();
        let stderr = t_err.join().unwrap_or_default();
        Ok(Output { status, stdout, stderr })
    }

    /// Starts the control plane and waits for its `listening:` line.
    pub async fn start(self) -> anyhow::Result<ControlPlane> {
        let mut cp = ControlPlane {
            prepared: self,
            child: None,
            stdout_lines: Arc::new(Mutex::new(Vec::new())),
            base_url: String::new(),
            admin_key: String::new(),
            data_dir: PathBuf::new(),
            database_url: None,
            ca_bundle_path: PathBuf::new(),
            ca_bundle_pem: String::new(),
            admin_key_printed: None,
        };
        cp.data_dir = cp.prepared.data_dir.clone();
        cp.database_url = cp.prepared.db.url().map(str::to_string);
        cp.spawn().await?;
        Ok(cp)
    }
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// A running `nkudo-control-plane serve` with its own data directory and database. The child is killed when
/// this drops; a Postgres database is dropped after it.
#[derive(Debug)]
pub struct ControlPlane {
    prepared: Prepared,
    child: Option<Child>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    /// `https://127.0.0.1:<port>` from the `listening:` line (changes on restart).
    pub base_url: String,
    /// The admin key in force (ours, or the one the control plane generated).
    pub admin_key: String,
    pub data_dir: PathBuf,
    /// `DATABASE_URL` handed to the control plane (`None`: SQLite in the data dir).
    pub database_url: Option<String>,
    /// Path from the `ca bundle:` line.
    pub ca_bundle_path: PathBuf,
    /// Contents of the CA bundle (the only trust root of every client).
    pub ca_bundle_pem: String,
    /// What the `admin key:` line said on the latest start (the key itself, or "stored in <path>").
    pub admin_key_printed: Option<String>,
}

impl ControlPlane {
    /// Starts the builder for a control plane on `backend` with the harness defaults: fresh data dir,
    /// `CONTROL_PLANE_ADDR=127.0.0.1:0`, a random 48-character `ADMIN_KEY`, `HEARTBEAT_FLUSH_INTERVAL=100ms`.
    pub fn builder(backend: Backend) -> ControlPlaneBuilder {
        ControlPlaneBuilder {
            backend,
            env: Vec::new(),
            env_remove: Vec::new(),
            database_url: None,
            admin_key: Some(format!(
                "adm-{}{}",
                uuid::Uuid::new_v4().simple(),
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )),
        }
    }

    /// Starts a control plane with the defaults; `None` when the backend is unavailable and skipping is allowed.
    pub async fn start(backend: Backend) -> anyhow::Result<Option<ControlPlane>> {
        Self::builder(backend).start().await
    }

    pub fn backend(&self) -> Backend {
        self.prepared.db.backend()
    }

    pub fn db(&self) -> &DbHandle {
        &self.prepared.db
    }

    /// The temp root (holds `data/`, the stderr log; a place for extra files).
    pub fn root(&self) -> &Path {
        self.prepared.root()
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Everything the control plane wrote to stdout so far (all starts).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().unwrap().clone()
    }

    /// The control plane's stderr (logs) so far (all starts).
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.prepared.stderr_path()).unwrap_or_default()
    }

    /// A command for the binary with this control plane's environment (data dir, database, admin key…).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.prepared.command(args)
    }

    /// Runs the binary with `args` (e.g. `["audit", "verify"]`, `["migrate"]`) and the same environment.
    pub fn run_cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.output().expect("run control-plane CLI")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let stderr_path = self.prepared.stderr_path();
        let stderr = File::options().create(true).append(true).open(&stderr_path)?;
        let stderr_start = stderr.metadata()?.len();
        let mut cmd = self.prepared.command(std::iter::empty::<&str>());
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin_path(CONTROL_PLANE_BIN).display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let lines = self.stdout_lines.clone();
        std::thread::spawn(move || {
            // Keep draining until EOF even after nobody listens, so the child never blocks on stdout.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let mut ca_bundle: Option<PathBuf> = None;
        let mut admin_line: Option<String> = None;
        let mut seen = Vec::new();
        let listening = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => {
                    seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix("ca bundle: ") {
                        ca_bundle = Some(PathBuf::from(rest.trim()));
                    } else if let Some(rest) = line.strip_prefix("admin key: ") {
                        admin_line = Some(rest.trim().to_string());
                    } else if let Some(rest) = line.strip_prefix("listening: ") {
                        break rest.trim().to_string();
                    }
                }
                Ok(None) => {
                    // stdout closed before `listening:`: the process exited (or closed stdout).
                    let status = self.wait_exit(Duration::from_secs(5)).await;
                    let log = read_from(&stderr_path, stderr_start);
                    bail!(
                        "control plane exited before `listening:` (status {status:?})\nstdout:\n{}\nstderr:\n{}",
                        seen.join("\n"),
                        tail(&log, 8000)
                    );
                }
                Err(_) => {
                    self.kill();
                    let log = read_from(&stderr_path, stderr_start);
                    bail!(
                        "control plane did not print `listening:` within {STARTUP_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                        seen.join("\n"),
                        tail(&log, 8000)
                    );
                }
            }
        };
        let ctx = |what: &str| {
            format!(
                "{what}\nstdout:\n{}\nstderr:\n{}",
                seen.join("\n"),
                tail(&read_from(&stderr_path, stderr_start), 4000)
            )
        };
        if !listening.starts_with("https://") {
            self.kill();
            bail!(ctx(&format!("`listening:` is not an https URL: {listening}")));
        }
        let Some(ca_bundle) = ca_bundle else {
            self.kill();
            bail!(ctx("no `ca bundle:` line before `listening:`"));
        };
        self.ca_bundle_pem = std::fs::read_to_string(&ca_bundle)
            .with_context(|| ctx(&format!("read CA bundle {}", ca_bundle.display())))?;
        self.ca_bundle_path = ca_bundle;
        self.base_url = listening.trim_end_matches('/').to_string();
        self.admin_key_printed = admin_line.clone();
        match &self.prepared.builder.admin_key {
            Some(k) => self.admin_key = k.clone(),
            None => {
                let line =
                    admin_line.ok_or_else(|| anyhow!(ctx("no `admin key:` line although the key is generated")))?;
                self.admin_key = match line.strip_prefix("stored in ") {
                    Some(path) => std::fs::read_to_string(path.trim())
                        .with_context(|| format!("read admin key file {path}"))?
                        .trim()
                        .to_string(),
                    // `admin key: <key>`; tolerate a trailing remark such as "(generated once; stored in …)".
                    None => line.split_whitespace().next().unwrap_or_default().to_string(),
                };
            }
        }
        Ok(())
    }

    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    return Some(st);
                }
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return None,
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (`kill -TERM <pid>`) and waits (up to 30 s) for the process to exit; returns its status.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.pid().context("control plane is not running")?;
        let st = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("run kill -TERM")?;
        if !st.success() {
            bail!("kill -TERM {pid} failed: {st}");
        }
        match self.wait_exit(Duration::from_secs(30)).await {
            Some(st) => Ok(st),
            None => {
                self.kill();
                bail!(
                    "control plane did not exit within 30 s of SIGTERM\nstderr:\n{}",
                    tail(&self.stderr_log(), 4000)
                )
            }
        }
    }

    /// Kills the control plane with SIGKILL, as a crash or an OOM kill would: no shutdown code runs (nothing is
    /// flushed or released), and reaps it. [`ControlPlane::restart`] starts it again.
    pub fn kill_hard(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("control plane is not running")?;
        child.kill().context("SIGKILL the control plane")?;
        Ok(child.wait()?)
    }

    /// Stops the control plane if it runs (SIGTERM; a non-zero exit is an error) and starts it again with the
    /// same data directory, database and admin-key policy. `base_url` etc. are refreshed.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            let st = self.stop().await?;
            if !st.success() {
                bail!("control plane exited with {st} on SIGTERM");
            }
        }
        self.child = None;
        self.spawn().await
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let _ = f.seek(SeekFrom::Start(offset));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- control plane stdout ----\n{}\n---- control plane stderr (tail) ----\n{}\n----",
                self.stdout_lines().join("\n"),
                tail(&self.stderr_log(), 6000)
            );
        }
    }
}
