//! Signed agent releases for the self-update tests, and edge hosts that run the agent from a host layout.
//!
//! * [`new_release_key`], [`build_release`]: a release directory as `releaser dist` writes it (tarball for this
//!   machine's architecture, `manifest.json` in canonical JSON, `SHA256SUMS`, minisign signatures of all three,
//!   the public key), made in-process from the REAL debug `nkudo-edge` binary ([`bin_path`]) or from one of the
//!   "bad release" shell wrappers of [`Payload`]. Channel (pre-release or release) follows the version; expiry,
//!   padding (incompressible random bytes, for slow downloads), extra files and `rollback_of` are configurable.
//! * [`install_into_layout`]: installs a built release into a layout root with `nkudo_core::layout`, unpacking
//!   with `nkudo_core::archive` and writing the manifest beside it (`nkudo_core::installed::write_metadata`),
//!   as `releaser install --activate` does, so that the binary reports the version it was installed as.
//! * [`LayoutHost`]: an [`EdgeHost`] whose agent runs as `<root>/current/bin/nkudo-edge run ...`; it finds the
//!   current agent process through `<state_dir>/agent.pid` and, on drop, kills every process it started (each
//!   carries a marker in its environment, inherited across the agent's re-exec and the update watcher).
//! * Admin calls of the release registry, desired versions, labels and the fleet-wide agents list, and
//!   `releaser publish` against a control plane.
//! * [`ArtifactServer`]: a tiny plain-HTTP server (Range aware) standing in for an external artifact host.

use crate::client::{admin, expect_json, Fixture};
use crate::edge::{output_text, EdgeHost};
use crate::harness::{bin_path, ControlPlane};
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use nkudo_core::api::{
    Agent, DesiredScope, Rollout, RolloutDecisionsResponse, SetDesiredVersionRequest, SetLabelsRequest,
};
use nkudo_core::layout::Layout;
use nkudo_core::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use releaser::dist::{trusted_comment, PUBLIC_KEY_FILE, UNTRUSTED_COMMENT};
use releaser::minisign::blake2b512;
pub use releaser::minisign::SecretKey;
use releaser::package::{tar_gz, Entry};
use reqwest::{Response, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable every process of a [`LayoutHost`] carries (value: the host's marker).
pub const HOST_MARKER_ENV: &str = "NKUDO_TEST_HOST_MARKER";

/// A new random release key pair (minisign format).
pub fn new_release_key() -> SecretKey {
    SecretKey::generate()
}

/// The base64 public key line (`RWQ...`), what `RELEASE_PUBLIC_KEYS` and `NKUDO_RELEASE_PUBLIC_KEYS` take.
pub fn public_key_b64(key: &SecretKey) -> String {
    key.public_key().to_base64()
}

/// The architecture name releases use for this machine (`amd64`, `arm64`).
pub fn host_arch() -> &'static str {
    releaser::install::host_arch()
}

/// What `bin/nkudo-edge` of a release is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The real debug agent binary.
    Real,
    /// (a) `version` prints `nkudo-edge <version>`; anything else exits 3 at once.
    ExitsAtOnce,
    /// (b) `version` prints the version; anything else `exec sleep 3600` (starts, never heartbeats).
    NeverHeartbeats,
    /// (c) `run` starts the real binary (copied beside it as `bin/nkudo-edge.real`) in the background, kills it
    /// with SIGKILL after this many seconds and exits 137 (crashes after a few seconds); `version` prints the
    /// version.
    CrashesAfter(u32),
    /// (d) exits 1 for everything, `version` included: the pre-switch trial must refuse it.
    DoesNotStart,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ReleaseSpec {
    /// SemVer without `v`; a `-pre.` version is a pre-release.
    pub version: String,
    pub payload: Payload,
    pub expires: DateTime<Utc>,
    /// Random (incompressible) bytes added as `share/padding.bin`: makes the tarball this much bigger.
    pub padding: usize,
    pub rollback_of: Option<String>,
    /// Extra files (path in the archive, bytes).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

impl ReleaseSpec {
    /// A release of the real agent binary, valid for 30 days.
    pub fn new(version: &str) -> ReleaseSpec {
        ReleaseSpec {
            version: version.to_string(),
            payload: Payload::Real,
            expires: Utc::now() + chrono::Duration::days(30),
            padding: 0,
            rollback_of: None,
            extra_files: Vec::new(),
        }
    }
    pub fn payload(mut self, p: Payload) -> Self {
        self.payload = p;
        self
    }
    /// Expires `d` from now.
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires = Utc::now() + chrono::Duration::from_std(d).expect("duration");
        self
    }
    pub fn expires_at(mut self, t: DateTime<Utc>) -> Self {
        self.expires = t;
        self
    }
    pub fn padding(mut self, bytes: usize) -> Self {
        self.padding = bytes;
        self
    }
    pub fn rollback_of(mut self, v: &str) -> Self {
        self.rollback_of = Some(v.to_string());
        self
    }
    pub fn file(mut self, path: &str, bytes: Vec<u8>) -> Self {
        self.extra_files.push((path.to_string(), bytes));
        self
    }
    pub fn channel(&self) -> &'static str {
        if self.version.contains("-pre.") {
            "pre-release"
        } else {
            "release"
        }
    }
}

/// A release directory written by [`build_release`].
#[derive(Debug, Clone)]
pub struct BuiltRelease {
    pub dir: PathBuf,
    pub version: String,
    pub channel: String,
    /// `manifest.json` exactly as signed, and its `.minisig`.
    pub manifest_text: String,
    pub signature_text: String,
    pub tarball_name: String,
    pub tarball: PathBuf,
    pub size: u64,
    pub sha256: String,
}

impl BuiltRelease {
    pub fn manifest(&self) -> Manifest {
        Manifest::from_json(self.manifest_text.as_bytes()).expect("our manifest parses")
    }
    pub fn tarball_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.tarball).expect("read our tarball")
    }
}

fn real_agent_bytes() -> Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES
        .get_or_init(|| {
            let p = bin_path(crate::edge::EDGE_BIN);
            std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        })
        .clone()
}

/// The shell wrapper of a bad payload. `version` is recognised anywhere in the arguments (global flags first).
fn wrapper(version: &str, payload: &Payload) -> String {
    // Every process records its pid (cleanup looks at the environment marker too).
    let head = format!(
        "#!/bin/sh\n# n-kudo test release {version}: {payload:?}\n\
         for a in \"$@\"; do\n  if [ \"$a\" = version ]; then echo \"nkudo-edge {version}\"; echo \"build: test \
         wrapper\"; exit 0; fi\ndone\n"
    );
    let body = match payload {
        Payload::ExitsAtOnce => "echo \"test release: exiting at once (exit 3)\" >&2\nexit 3\n".to_string(),
        Payload::NeverHeartbeats => {
            "echo \"test release: never heartbeats (sleep 3600)\" >&2\nexec sleep 3600\n".to_string()
        }
        Payload::CrashesAfter(secs) => format!(
            "dir=$(dirname \"$0\")\n\
             is_run=0\nfor a in \"$@\"; do [ \"$a\" = run ] && is_run=1; done\n\
             if [ $is_run = 0 ]; then exec \"$dir/nkudo-edge.real\" \"$@\"; fi\n\
             \"$dir/nkudo-edge.real\" \"$@\" &\npid=$!\n\
             echo \"test release: the agent (pid $pid) will crash in {secs} s\" >&2\n\
             sleep {secs}\nkill -KILL $pid 2>/dev/null\n\
             echo \"test release: crashed (SIGKILL), exit 137\" >&2\nexit 137\n"
        ),
        Payload::DoesNotStart | Payload::Real => unreachable!(),
    };
    format!("{head}{body}")
}

fn random_bytes(n: usize) -> Vec<u8> {
    // Incompressible, cheap: xorshift seeded from the clock and a uuid.
    let mut x: u64 = uuid::Uuid::new_v4().as_u128() as u64 | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn tarball_bytes(spec: &ReleaseSpec, epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut entries = Vec::new();
    match &spec.payload {
        Payload::Real => entries.push(Entry::file("bin/nkudo-edge", real_agent_bytes(), true)),
        Payload::DoesNotStart => entries.push(Entry::file(
            "bin/nkudo-edge",
            b"#!/bin/sh\necho \"test release: does not start (exit 1)\" >&2\nexit 1\n".to_vec(),
            true,
        )),
        Payload::CrashesAfter(_) => {
            entries.push(Entry::file(
                "bin/nkudo-edge",
                wrapper(&spec.version, &spec.payload).into_bytes(),
                true,
            ));
            entries.push(Entry::file("bin/nkudo-edge.real", real_agent_bytes(), true));
        }
        p => entries.push(Entry::file(
            "bin/nkudo-edge",
            wrapper(&spec.version, p).into_bytes(),
            true,
        )),
    }
    // No version in the plain real release's bytes: its tarball is the same for every version (and cached).
    entries.push(Entry::file(
        "README.md",
        b"n-kudo edge agent (test release)\n".to_vec(),
        false,
    ));
    for (path, bytes) in &spec.extra_files {
        entries.push(Entry::file(path.clone(), bytes.clone(), false));
    }
    if spec.padding > 0 {
        entries.push(Entry::file("share/padding.bin", random_bytes(spec.padding), false));
    }
    // The real binary compresses slowly in a debug build: the plain real release is made once per process.
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let cacheable = spec.payload == Payload::Real && spec.extra_files.is_empty() && spec.padding == 0;
    let cache_key = "real".to_string();
    if cacheable {
        if let Some(b) = CACHE.get_or_init(Default::default).lock().unwrap().get(&cache_key) {
            return Ok(b.clone());
        }
    }
    let bytes = tar_gz(&entries, &[], epoch)?;
    if cacheable {
        CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap()
            .insert(cache_key, bytes.clone());
    }
    Ok(bytes)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Writes a signed release directory for `spec` under `parent` (a new directory named after the version).
pub fn build_release(parent: &Path, spec: &ReleaseSpec, key: &SecretKey) -> anyhow::Result<BuiltRelease> {
    let version = spec.version.clone();
    nkudo_core::version::parse(&version).with_context(|| format!("test release version {version:?}"))?;
    let dir = parent.join(format!(
        "dist-{version}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    let epoch = (Utc::now().timestamp() - 60) as u64;
    let channel = spec.channel();
    let expires = rfc3339(spec.expires);
    let sign = |name: &str, bytes: &[u8]| -> anyhow::Result<String> {
        let tc = trusted_comment(epoch, name, &version, channel, &expires);
        let sig = key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT)?;
        let text = sig.to_file_text();
        std::fs::write(dir.join(format!("{name}.minisig")), &text)?;
        Ok(text)
    };
    let arch = host_arch();
    let tarball_name = format!("nkudo-edge-{version}-linux-{arch}.tar.gz");
    let bytes = tarball_bytes(spec, epoch)?;
    let tarball = dir.join(&tarball_name);
    std::fs::write(&tarball, &bytes)?;
    sign(&tarball_name, &bytes)?;
    let sha256 = releaser::checksums::sha256_hex(&bytes);
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.clone(),
        channel: channel.into(),
        git_commit: "0123abc".into(),
        build_date: releaser::dist::rfc3339(epoch).context("epoch")?,
        expires: expires.clone(),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts: vec![Artifact {
            name: tarball_name.clone(),
            component: "nkudo-edge".into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: arch.into(),
            size: bytes.len() as u64,
            sha256: sha256.clone(),
        }],
        promoted_from: None,
        rollback_of: spec.rollback_of.clone(),
    };
    let manifest_text = manifest.to_canonical_json();
    std::fs::write(dir.join("manifest.json"), &manifest_text)?;
    let signature_text = sign("manifest.json", manifest_text.as_bytes())?;
    let sums = releaser::checksums::render(&[
        (tarball_name.clone(), sha256.clone()),
        (
            "manifest.json".into(),
            releaser::checksums::sha256_hex(manifest_text.as_bytes()),
        ),
    ]);
    std::fs::write(dir.join("SHA256SUMS"), &sums)?;
    sign("SHA256SUMS", sums.as_bytes())?;
    std::fs::write(dir.join(PUBLIC_KEY_FILE), key.public_key().to_file_text())?;
    Ok(BuiltRelease {
        dir,
        version,
        channel: channel.into(),
        manifest_text,
        signature_text,
        tarball_name,
        tarball,
        size: bytes.len() as u64,
        sha256,
    })
}

/// Installs `rel` into the layout at `root` (verified by construction) and, with `activate`, makes it current.
pub fn install_into_layout(root: &Path, rel: &BuiltRelease, activate: bool) -> anyhow::Result<()> {
    let layout = Layout::open(root)?;
    let v = nkudo_core::version::parse(&rel.version)?;
    let bytes = rel.tarball_bytes();
    layout.install(&v, |dir: &Path| -> std::io::Result<()> {
        nkudo_core::archive::unpack_tar_gz(bytes.as_slice(), dir)?;
        nkudo_core::installed::write_metadata(dir, &rel.manifest_text, &rel.signature_text)
    })?;
    if activate {
        layout.activate(&v)?;
    }
    Ok(())
}

/// The version a layout link (`current`, `previous`) points at.
pub fn layout_link(root: &Path, link: &str) -> Option<String> {
    let target = std::fs::read_link(root.join(link)).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Pids of processes whose environment carries `NKUDO_TEST_HOST_MARKER=<marker>`.
fn marked_pids(marker: &str) -> Vec<u32> {
    let needle = format!("{HOST_MARKER_ENV}={marker}");
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether `pid` is a live process (not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start()).unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// An edge host whose agent runs from a host layout under `<host root>/opt-nkudo`:
/// `<root>/current/bin/nkudo-edge run ...`, so that it can update itself.
pub struct LayoutHost {
    pub edge: EdgeHost,
    /// The layout root (`releases/`, `current`, `previous`).
    pub layout_root: PathBuf,
    marker: String,
    /// The first process of the latest spawn and its exit status once it ended (reaped at once by a thread, as a
    /// service manager would, so that a dead agent is never left as a zombie that looks alive).
    child: Option<(u32, Arc<Mutex<Option<std::process::ExitStatus>>>)>,
}

impl LayoutHost {
    /// A fresh host with `initial` installed and current, trusting `trusted` release keys, with a short health
    /// window (`NKUDO_UPDATE_HEALTH_WINDOW` 15s, `NKUDO_UPDATE_STABLE_AFTER` 5s). The agent is not started.
    pub fn new(hostname: &str, initial: &BuiltRelease, trusted: &[&SecretKey]) -> anyhow::Result<LayoutHost> {
        let mut edge = EdgeHost::new(hostname)?;
        let layout_root = edge.root().join("opt-nkudo");
        install_into_layout(&layout_root, initial, true)?;
        let marker = uuid::Uuid::new_v4().simple().to_string();
        edge.set_env(HOST_MARKER_ENV, &marker);
        let keys: Vec<String> = trusted.iter().map(|k| public_key_b64(k)).collect();
        edge.set_env("NKUDO_RELEASE_PUBLIC_KEYS", &keys.join(","));
        edge.set_env("NKUDO_UPDATE_HEALTH_WINDOW", "15s");
        edge.set_env("NKUDO_UPDATE_STABLE_AFTER", "5s");
        // Not under systemd: the agent re-executes itself from `current`.
        edge.set_env("NKUDO_RESTART_MODE", "exec");
        Ok(LayoutHost {
            edge,
            layout_root,
            marker,
            child: None,
        })
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.edge.set_env(key, value);
    }

    /// `<root>/current/bin/nkudo-edge`.
    pub fn agent_bin(&self) -> PathBuf {
        self.layout_root.join("current/bin/nkudo-edge")
    }

    /// The agent from the layout with this host's environment (the same as [`EdgeHost::command`]'s).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let template = self.edge.command(std::iter::empty::<&str>());
        let mut cmd = Command::new(self.agent_bin());
        cmd.args(args);
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `nkudo-edge enroll` (from the layout) with a fresh token of the fixture's site; returns the agent id.
    pub async fn enroll(&self, cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<String> {
        let token = crate::issue_token(cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
        let out = self
            .command([
                "enroll",
                "--control-plane",
                &cp.base_url,
                "--token",
                &token.token,
                "--hostname",
                &self.edge.hostname,
            ])
            .arg("--state-dir")
            .arg(&self.edge.state_dir)
            .arg("--pki-dir")
            .arg(&self.edge.pki_dir)
            .arg("--ca-file")
            .arg(&cp.ca_bundle_path)
            .output()
            .context("run nkudo-edge enroll")?;
        if !out.status.success() {
            bail!("nkudo-edge enroll failed: {}", output_text(&out));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let id = stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("agent_id="))
            .with_context(|| format!("no agent_id= in enroll output: {}", output_text(&out)))?;
        Ok(id.to_string())
    }

    fn log_path(&self) -> PathBuf {
        self.edge.root().join("agent.log")
    }

    /// Starts `<root>/current/bin/nkudo-edge run ...` (the [`EdgeHost::run_args`]; output appended to the log).
    pub fn spawn(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        self.spawn_with(cp, &[])
    }

    /// [`LayoutHost::spawn`] with extra `run` arguments.
    pub fn spawn_with(&mut self, cp: &ControlPlane, extra: &[&str]) -> anyhow::Result<()> {
        if self.child.as_ref().is_some_and(|(_, st)| st.lock().unwrap().is_none()) {
            bail!("agent already running");
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let out = log.try_clone()?;
        let mut child: Child = self
            .command(["run"])
            .args(self.edge.run_args(cp))
            .args(extra)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {} run", self.agent_bin().display()))?;
        let status = Arc::new(Mutex::new(None));
        let st = status.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            if let Ok(s) = child.wait() {
                *st.lock().unwrap() = Some(s);
            }
        });
        self.child = Some((pid, status));
        Ok(())
    }

    /// The exit status of the process started by the latest spawn, once it ended (`None` while it runs; in exec
    /// restart mode the agent keeps that pid across versions).
    pub fn spawned_exit(&self) -> Option<std::process::ExitStatus> {
        self.child.as_ref().and_then(|(_, st)| *st.lock().unwrap())
    }

    /// The pid in `<state_dir>/agent.pid` (the process that is the agent now), when it is alive.
    pub fn agent_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.edge.state_dir.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Every live process this host started (agent, re-executed agents, the update watcher, bad releases).
    pub fn processes(&self) -> Vec<u32> {
        marked_pids(&self.marker)
            .into_iter()
            .filter(|p| pid_alive(*p))
            .collect()
    }

    /// The version `current` points at.
    pub fn current_version(&self) -> Option<String> {
        layout_link(&self.layout_root, "current")
    }

    pub fn previous_version(&self) -> Option<String> {
        layout_link(&self.layout_root, "previous")
    }

    /// The complete releases installed, in version order.
    pub fn installed_versions(&self) -> Vec<String> {
        Layout::open(&self.layout_root)
            .and_then(|l| l.installed())
            .map(|v| v.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default()
    }

    /// `<state_dir>/update.json` (`Null` when absent or unreadable).
    pub fn update_state(&self) -> serde_json::Value {
        std::fs::read(self.edge.state_dir.join("update.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// `<state_dir>/update-watch.log`.
    pub fn watch_log(&self) -> String {
        std::fs::read_to_string(self.edge.state_dir.join("update-watch.log")).unwrap_or_default()
    }

    /// The agent log (every process).
    pub fn log(&self) -> String {
        self.edge.log()
    }

    /// Everything useful when a deadline passes: agent log tail, watcher log tail, update.json, the layout.
    pub fn diagnostics(&self) -> String {
        let watch = self.watch_log();
        let watch_tail = &watch[watch.len().saturating_sub(3000)..];
        let downloads: Vec<String> = std::fs::read_dir(self.edge.state_dir.join("downloads"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        format!(
                            "{} ({} bytes)",
                            e.file_name().to_string_lossy(),
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "==== host {} ====\nlayout: current={:?} previous={:?} installed={:?}\nagent.pid={:?} processes={:?} \
             first spawned process exit={:?}\n\
             downloads: {downloads:?}\nupdate.json: {}\n---- update-watch.log (tail) ----\n{watch_tail}\n{}",
            self.edge.hostname,
            self.current_version(),
            self.previous_version(),
            self.installed_versions(),
            self.agent_pid(),
            self.processes(),
            self.spawned_exit(),
            self.update_state(),
            self.edge.log_tail(6000),
        )
    }

    /// Kills (SIGKILL) every process this host started.
    pub fn kill_all(&mut self) {
        for _ in 0..5 {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some((pid, st)) = self.child.take() {
            if st.lock().unwrap().is_none() && pid_alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    /// SIGTERM to the current agent process (from agent.pid) and waits up to `timeout` for it to be gone.
    pub async fn stop_agent(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.agent_pid().context("no live agent in agent.pid")?;
        Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        let deadline = Instant::now() + timeout;
        while pid_alive(pid) {
            if Instant::now() > deadline {
                bail!(
                    "agent {pid} still alive {timeout:?} after SIGTERM\n{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Drop for LayoutHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.kill_all();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Control plane calls

/// A control plane for self-update tests: 1 s heartbeats, trusting `keys` as release keys.
pub fn release_control_plane(backend: crate::Backend, keys: &[&SecretKey]) -> crate::ControlPlaneBuilder {
    let keys: Vec<String> = keys.iter().map(|k| public_key_b64(k)).collect();
    crate::edge::edge_control_plane(backend).env("RELEASE_PUBLIC_KEYS", keys.join(","))
}

/// `releaser <args>` (the real binary) with a clean credential environment.
pub fn releaser_command() -> Command {
    let mut c = Command::new(bin_path("releaser"));
    c.env_remove("NKUDO_ADMIN_KEY")
        .env_remove("NKUDO_API_KEY")
        .stdin(Stdio::null());
    c
}

/// `releaser publish <dir> --url <cp> --ca-cert <bundle> --admin-key <key> <extra>`.
pub fn releaser_publish(cp: &ControlPlane, dir: &Path, extra: &[&str]) -> Output {
    releaser_command()
        .arg("publish")
        .arg(dir)
        .args(["--url", &cp.base_url, "--admin-key", &cp.admin_key])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path)
        .args(extra)
        .output()
        .expect("run releaser publish")
}

/// [`releaser_publish`] that must succeed.
pub fn publish_ok(cp: &ControlPlane, rel: &BuiltRelease, extra: &[&str]) -> anyhow::Result<()> {
    let out = releaser_publish(cp, &rel.dir, extra);
    if !out.status.success() {
        bail!("releaser publish {} failed: {}", rel.version, output_text(&out));
    }
    Ok(())
}

/// `PUT /admin/desired-versions` (raw answer).
pub async fn set_desired(
    cp: &ControlPlane,
    scope: DesiredScope,
    target: Option<&str>,
    version: &str,
    rollback: bool,
) -> anyhow::Result<Response> {
    let req = SetDesiredVersionRequest {
        scope,
        target: target.map(str::to_string),
        version: version.to_string(),
        rollback,
    };
    Ok(admin(cp)
        .put(cp.url("/admin/desired-versions"))
        .json(&req)
        .send()
        .await?)
}

/// [`set_desired`] that must answer 2xx.
pub async fn set_desired_ok(
    cp: &ControlPlane,
    scope: DesiredScope,
    target: Option<&str>,
    version: &str,
    rollback: bool,
) -> anyhow::Result<()> {
    let r = set_desired(cp, scope, target, version, rollback).await?;
    let status = r.status();
    if !status.is_success() {
        bail!(
            "PUT /admin/desired-versions {} {target:?} {version} (rollback {rollback}): {status}: {}",
            scope.as_str(),
            r.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// `PUT /admin/sites/{id}/labels` (raw answer).
/// `GET /admin/rollouts/{id}`.
pub async fn get_rollout(cp: &ControlPlane, id: &str) -> anyhow::Result<Rollout> {
    let r = admin(cp).get(cp.url(&format!("/admin/rollouts/{id}"))).send().await?;
    expect_json(r, StatusCode::OK, "GET /admin/rollouts/{id}").await
}

/// `GET /admin/rollouts/{id}/decisions`: the decision log and whether its hash chain verifies.
pub async fn decisions(cp: &ControlPlane, id: &str) -> anyhow::Result<RolloutDecisionsResponse> {
    let r = admin(cp)
        .get(cp.url(&format!("/admin/rollouts/{id}/decisions")))
        .send()
        .await?;
    expect_json(r, StatusCode::OK, "GET /admin/rollouts/{id}/decisions").await
}

pub async fn set_site_labels(cp: &ControlPlane, site_id: &str, labels: &[(&str, &str)]) -> anyhow::Result<Response> {
    let req = SetLabelsRequest {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    };
    Ok(admin(cp)
        .put(cp.url(&format!("/admin/sites/{site_id}/labels")))
        .json(&req)
        .send()
        .await?)
}

/// `GET /admin/agents`, every page (`limit`, `after`).
pub async fn admin_agents(cp: &ControlPlane) -> anyhow::Result<Vec<Agent>> {
    let mut out: Vec<Agent> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1000 {
        let mut url = cp.url("/admin/agents?limit=100");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let r = admin(cp).get(&url).send().await?;
        let v: serde_json::Value = expect_json(r, StatusCode::OK, "GET /admin/agents").await?;
        let explicit = v.get("next_after").map(|c| c.as_str().map(str::to_string));
        let page: Vec<Agent> = serde_json::from_value(v["agents"].clone()).context("GET /admin/agents: agents")?;
        let last = page.last().map(|a| a.id.clone());
        let n = page.len();
        out.extend(page);
        let next = match explicit {
            Some(c) => c,
            None => last,
        };
        match next {
            Some(c) if n > 0 && after.as_deref() != Some(c.as_str()) => after = Some(c),
            _ => return Ok(out),
        }
    }
    bail!("GET /admin/agents: more than 1000 pages")
}

/// One agent from `GET /admin/agents`.
pub async fn admin_agent(cp: &ControlPlane, agent_id: &str) -> anyhow::Result<Agent> {
    admin_agents(cp)
        .await?
        .into_iter()
        .find(|a| a.id == agent_id)
        .with_context(|| format!("agent {agent_id} not in GET /admin/agents"))
}

/// Polls `GET /admin/agents` until `pred` holds for the agent; on timeout fails with the agent as last seen and
/// the host's diagnostics (logs, update.json, layout).
pub async fn wait_agent<F>(
    cp: &ControlPlane,
    host: &LayoutHost,
    agent_id: &str,
    timeout: Duration,
    what: &str,
    mut pred: F,
) -> anyhow::Result<Agent>
where
    F: FnMut(&Agent) -> bool,
{
    let deadline = Instant::now() + timeout;
    let mut last: Option<Agent> = None;
    let mut last_err = String::new();
    loop {
        match admin_agent(cp, agent_id).await {
            Ok(a) => {
                if pred(&a) {
                    return Ok(a);
                }
                last = Some(a);
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what} (agent {agent_id} on {}): last seen {}{}\n{}",
                host.edge.hostname,
                last.map(|a| format!(
                    "agent_version={} desired={:?} update={}",
                    a.agent_version,
                    a.desired_version,
                    serde_json::to_string(&a.update).unwrap_or_default()
                ))
                .unwrap_or_default(),
                if last_err.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last_err})")
                },
                host.diagnostics()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The phase an agent's update reports (`idle` when none).
pub fn phase(a: &Agent) -> &'static str {
    a.update.as_ref().map(|u| u.phase.as_str()).unwrap_or("none")
}

/// The last error an agent's update reports.
pub fn last_error(a: &Agent) -> String {
    a.update.as_ref().and_then(|u| u.last_error.clone()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------
// An external artifact host

/// A tiny plain-HTTP file server on 127.0.0.1 (GET, `Range: bytes=N-`), standing in for an external base URL.
pub struct ArtifactServer {
    pub base_url: String,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ArtifactServer {
    pub fn start() -> anyhow::Result<ArtifactServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Default::default();
        let requests: Arc<Mutex<Vec<String>>> = Default::default();
        let (f, r) = (files.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (f, r) = (f.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &f, &r);
                });
            }
        });
        Ok(ArtifactServer {
            base_url: format!("http://{addr}/releases"),
            files,
            requests,
        })
    }

    /// Serves `bytes` at `<base_url>/<name>`.
    pub fn put(&self, name: &str, bytes: Vec<u8>) {
        self.files.lock().unwrap().insert(name.to_string(), bytes);
    }

    /// `GET /releases/<name> [range]` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    requests: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut range: Option<u64> = None;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("range") {
                    range = v
                        .strip_prefix("bytes=")
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse().ok());
                } else if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse().unwrap_or(0);
                }
            }
        }
        let mut sink = vec![0u8; len];
        reader.read_exact(&mut sink)?;
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        requests.lock().unwrap().push(format!(
            "{method} {path}{}",
            range.map(|r| format!(" range={r}-")).unwrap_or_default()
        ));
        let name = path.strip_prefix("/releases/").unwrap_or("");
        let body = files.lock().unwrap().get(name).cloned();
        match body {
            None => {
                write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
            Some(b) => {
                let total = b.len() as u64;
                let start = range.unwrap_or(0).min(total);
                let head = method == "HEAD";
                if range.is_some() {
                    write!(
                        stream,
                        "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
                         Content-Range: bytes {start}-{}/{total}\r\nAccept-Ranges: bytes\r\n\r\n",
                        total - start,
                        total.saturating_sub(1)
                    )?;
                } else {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\
                         Accept-Ranges: bytes\r\n\r\n"
                    )?;
                }
                if !head {
                    stream.write_all(&b[start as usize..])?;
                }
            }
        }
        stream.flush()?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// A release of the real agent that runs with extra environment (rollout tests)

/// The shell wrapper of [`build_release_with_env`]: `version` prints the version; anything else exports `env`
/// and execs the real binary copied beside it as `bin/nkudo-edge.real`.
fn env_wrapper(version: &str, env: &[(&str, &str)]) -> String {
    let mut s = format!(
        "#!/bin/sh\n# n-kudo test release {version}: the real agent with extra environment\n\
         for a in \"$@\"; do\n  if [ \"$a\" = version ]; then echo \"nkudo-edge {version}\"; echo \"build: test \
         wrapper\"; exit 0; fi\ndone\n"
    );
    for (k, v) in env {
        s.push_str(&format!("{k}='{}'\nexport {k}\n", v.replace('\'', "'\\''")));
    }
    s.push_str("exec \"$(dirname \"$0\")/nkudo-edge.real\" \"$@\"\n");
    s
}

/// A signed release `version` whose `bin/nkudo-edge` is a shell wrapper exporting `env` (e.g.
/// `MOCK_CH_FAIL_BOOT=1`: the Cloud Hypervisor stand-in the agent starts then fails every boot) before it execs
/// the real agent binary (`bin/nkudo-edge.real`, as [`Payload::CrashesAfter`] has it). The agent reports the
/// version it was installed as and updates like the real one; only what it runs behaves differently. Note that
/// the environment is inherited across the agent's re-exec: after a switch back to another version in exec
/// restart mode the variables are still set in that process.
pub fn build_release_with_env(
    parent: &Path,
    version: &str,
    env: &[(&str, &str)],
    key: &SecretKey,
) -> anyhow::Result<BuiltRelease> {
    nkudo_core::version::parse(version).with_context(|| format!("test release version {version:?}"))?;
    let spec = ReleaseSpec::new(version);
    let dir = parent.join(format!(
        "dist-{version}-env-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir)?;
    let epoch = (Utc::now().timestamp() - 60) as u64;
    let channel = spec.channel();
    let expires = rfc3339(spec.expires);
    let entries = vec![
        Entry::file("bin/nkudo-edge", env_wrapper(version, env).into_bytes(), true),
        Entry::file("bin/nkudo-edge.real", real_agent_bytes(), true),
        Entry::file(
            "README.md",
            format!("n-kudo edge agent {version} (test release with environment {env:?})\n").into_bytes(),
            false,
        ),
    ];
    let bytes = tar_gz(&entries, &[], epoch)?;
    let sign = |name: &str, bytes: &[u8]| -> anyhow::Result<String> {
        let tc = trusted_comment(epoch, name, version, channel, &expires);
        let sig = key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT)?;
        let text = sig.to_file_text();
        std::fs::write(dir.join(format!("{name}.minisig")), &text)?;
        Ok(text)
    };
    let arch = host_arch();
    let tarball_name = format!("nkudo-edge-{version}-linux-{arch}.tar.gz");
    let tarball = dir.join(&tarball_name);
    std::fs::write(&tarball, &bytes)?;
    sign(&tarball_name, &bytes)?;
    let sha256 = releaser::checksums::sha256_hex(&bytes);
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.to_string(),
        channel: channel.into(),
        git_commit: "0123abc".into(),
        build_date: releaser::dist::rfc3339(epoch).context("epoch")?,
        expires: expires.clone(),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts: vec![Artifact {
            name: tarball_name.clone(),
            component: "nkudo-edge".into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: arch.into(),
            size: bytes.len() as u64,
            sha256: sha256.clone(),
        }],
        promoted_from: None,
        rollback_of: None,
    };
    let manifest_text = manifest.to_canonical_json();
    std::fs::write(dir.join("manifest.json"), &manifest_text)?;
    let signature_text = sign("manifest.json", manifest_text.as_bytes())?;
    let sums = releaser::checksums::render(&[
        (tarball_name.clone(), sha256.clone()),
        (
            "manifest.json".into(),
            releaser::checksums::sha256_hex(manifest_text.as_bytes()),
        ),
    ]);
    std::fs::write(dir.join("SHA256SUMS"), &sums)?;
    sign("SHA256SUMS", sums.as_bytes())?;
    std::fs::write(dir.join(PUBLIC_KEY_FILE), key.public_key().to_file_text())?;
    Ok(BuiltRelease {
        dir,
        version: version.to_string(),
        channel: channel.into(),
        manifest_text,
        signature_text,
        tarball_name,
        tarball,
        size: bytes.len() as u64,
        sha256,
    })
}
