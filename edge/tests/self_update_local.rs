//! Self-update end to end against a stand-in control plane (plain HTTP, this file): the real agent binary runs
//! from a host layout under a temporary root, the control plane offers a signed release, and the agent
//! downloads, verifies, installs, switches, restarts and commits, or rolls back for each kind of bad release.
//! (The full suite with the real control plane and `releaser publish` is tests/tests/self_update.rs.)

mod support;

use nkudo_edge::state::{Identity, StateStore};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const A: &str = "0.1.0";
const B: &str = "0.2.0";

/// The stand-in control plane's state.
#[derive(Default)]
struct Cp {
    desired: Option<String>,
    offers: std::collections::HashMap<String, nkudo_core::api::UpdateOffer>,
    artifacts: std::collections::HashMap<String, Vec<u8>>,
    last: Option<Value>,
    /// (agent_version, phase) of every heartbeat.
    seen: Vec<(String, String)>,
}

fn handler(cp: Arc<Mutex<Cp>>) -> Handler {
    Arc::new(move |req: &Request| {
        let mut cp = cp.lock().unwrap();
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v1/heartbeat") => {
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let version = body["agent_version"].as_str().unwrap_or("").to_string();
                let phase = body["update"]["phase"].as_str().unwrap_or("").to_string();
                cp.seen.push((version.clone(), phase));
                cp.last = Some(body);
                let offer = cp
                    .desired
                    .clone()
                    .filter(|d| *d != version)
                    .and_then(|d| cp.offers.get(&d).cloned());
                Response::json(
                    200,
                    &json!({
                        "next_heartbeat_seconds": 1,
                        "pending_plans": [],
                        "control_plane_version": "0.2.0",
                        "minimum_supported_agent_version": "0.0.0",
                        "agent_version_supported": true,
                        "rotate_certificate": false,
                        "certificate_expires_at": "2099-01-01T00:00:00Z",
                        "desired_version": cp.desired,
                        "update": offer,
                    }),
                )
            }
            ("GET", "/v1/plans/next") => Response::json(200, &json!({"plans": []})),
            ("GET", p) if p.starts_with("/v1/releases/") => {
                let name = p.rsplit('/').next().unwrap_or("");
                match cp.artifacts.get(name) {
                    Some(data) => serve_range(req, data),
                    None => Response::json(404, &json!({"error": "no such artifact", "code": "NOT_FOUND"})),
                }
            }
            _ => Response::json(200, &json!({})),
        }
    })
}

struct Host {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    root: PathBuf,
    state: PathBuf,
    key: ReleaseKey,
    cp: Arc<Mutex<Cp>>,
    server: Server,
    child: Option<Child>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every process started for this host mentions its directory (agent, re-executed agents, the watcher).
        let needle = self.dir.display().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if pid as u32 != std::process::id() && String::from_utf8_lossy(&cmd).contains(&needle) {
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn real_release(version: &str) -> Vec<u8> {
    let bin = std::fs::read(agent_bin()).unwrap();
    tarball(&[("bin/nkudo-edge", &bin, true), ("README.md", version.as_bytes(), false)])
}

impl Host {
    async fn new() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let root = dir.join("root");
        let state = dir.join("state");
        let pki = dir.join("pki");
        // Identity and a (self-signed) client certificate: the stand-in speaks plain HTTP.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        nkudo_edge::pki::Pki::new(&pki)
            .write_all(&key.serialize_pem(), &cert.pem(), &cert.pem())
            .unwrap();
        let mut store = StateStore::open(&state).unwrap();
        store.state.identity = Some(Identity {
            tenant_id: "t".into(),
            site_id: "s".into(),
            host_id: "h".into(),
            agent_id: "agent-1".into(),
            refresh_token: "r".into(),
            control_plane: String::new(),
            hostname: "host".into(),
            saved_at: String::new(),
        });
        store.save().unwrap();
        let rkey = ReleaseKey::new(11);
        install(&root, &rkey, A, &real_release(A), true);
        let cp = Arc::new(Mutex::new(Cp::default()));
        let server = Server::start(handler(cp.clone())).await;
        Host {
            _tmp: tmp,
            dir,
            root,
            state,
            key: rkey,
            cp,
            server,
            child: None,
        }
    }

    /// Publishes `tar` as `version` at the stand-in and makes it the desired version.
    fn offer(&self, version: &str, tar: Vec<u8>) {
        self.offer_with(version, tar, false)
    }

    fn offer_with(&self, version: &str, tar: Vec<u8>, rollback: bool) {
        let m = manifest(version, &tar, chrono::Utc::now() + chrono::Duration::days(1));
        let name = m.artifacts[0].name.clone();
        let mut o = offer(&self.key, &m, &format!("/v1/releases/{version}/artifacts/{name}"));
        o.rollback = rollback;
        let mut cp = self.cp.lock().unwrap();
        cp.artifacts.insert(name, tar);
        cp.offers.insert(version.into(), o);
        cp.desired = Some(version.into());
    }

    fn spawn(&mut self, mode: &str) {
        let cmd = self.command(&self.root.join("current/bin/nkudo-edge"), mode, "8s", "2s");
        self.start(cmd);
    }

    /// Runs the agent under a supervisor that starts `current` again after every exit (like systemd's
    /// `Restart=always`), in exit mode, with no systemctl on the PATH. Exit codes go to `<dir>/exits`.
    fn spawn_supervised(&mut self, window: &str, stable: &str) {
        let sup = self.dir.join("supervise.sh");
        std::fs::write(
            &sup,
            format!(
                "#!/bin/sh\nwhile true; do \"{}/current/bin/nkudo-edge\" \"$@\"; echo \"exit $?\" >> \"{}/exits\"; \
                 sleep 0.2; done\n",
                self.root.display(),
                self.dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sup, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = self.command(&sup, "exit", window, stable);
        cmd.env("PATH", "/usr/bin:/bin:/nonexistent");
        self.start(cmd);
    }

    fn exits(&self) -> String {
        std::fs::read_to_string(self.dir.join("exits")).unwrap_or_default()
    }

    fn start(&mut self, mut cmd: Command) {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(cmd.spawn().unwrap());
    }

    fn command(&self, program: &std::path::Path, mode: &str, window: &str, stable: &str) -> Command {
        let cfg = self.dir.join("edge.toml");
        std::fs::write(&cfg, "").unwrap();
        let mut cmd = Command::new(program);
        cmd.args([
            "run",
            "--control-plane",
            &self.server.base,
            "--heartbeat-interval",
            "1s",
        ])
        .arg("--state-dir")
        .arg(&self.state)
        .arg("--pki-dir")
        .arg(self.dir.join("pki"))
        .arg("--runtime-dir")
        .arg(self.dir.join("vms"))
        .arg("--images-dir")
        .arg(self.dir.join("images"))
        .arg("--netbird-enabled=false")
        .env("NKUDO_CONFIG", &cfg)
        .env("NKUDO_RELEASE_PUBLIC_KEYS", self.key.public_b64())
        .env("NKUDO_UPDATE_HEALTH_WINDOW", window)
        .env("NKUDO_UPDATE_STABLE_AFTER", stable)
        .env("NKUDO_RESTART_MODE", mode)
        .env("NKUDO_MAX_BACKOFF", "1s")
        .env_remove("INVOCATION_ID");
        cmd
    }

    fn update_json(&self) -> Value {
        std::fs::read(self.state.join("update.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    fn last(&self) -> Value {
        self.cp.lock().unwrap().last.clone().unwrap_or(Value::Null)
    }

    fn link(&self, name: &str) -> Option<String> {
        std::fs::read_link(self.root.join(name))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    fn agent_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state.join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn diagnostics(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let watch = std::fs::read_to_string(self.state.join("update-watch.log")).unwrap_or_default();
        format!(
            "current={:?} previous={:?}\nupdate.json={}\nlast heartbeat update={}\n--- agent.log ---\n{}\n--- \
             update-watch.log ---\n{}",
            self.link("current"),
            self.link("previous"),
            self.update_json(),
            self.last()["update"],
            &log[log.len().saturating_sub(6000)..],
            &watch[watch.len().saturating_sub(4000)..]
        )
    }

    /// Waits until the last heartbeat satisfies `f`.
    async fn wait_heartbeat(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if f(&self.last()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}\n{}", self.diagnostics());
    }
}

fn phase(v: &Value) -> &str {
    v["update"]["phase"].as_str().unwrap_or("")
}

fn pid_alive(pid: u32) -> bool {
    nkudo_edge::update::restart::pid_alive(pid)
}

#[tokio::test]
async fn exec_mode_update_commits_and_keeps_the_pid() {
    let mut h = Host::new().await;
    h.spawn("exec");
    let pid = h.child.as_ref().unwrap().id();
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    assert_eq!(phase(&h.last()), "idle", "{}", h.diagnostics());
    h.offer(B, real_release(B));
    h.wait_heartbeat("B committed", Duration::from_secs(60), |v| {
        v["agent_version"] == B && phase(v) == "committed"
    })
    .await;
    let last = h.last();
    assert_eq!(last["update"]["previous_version"], A, "{}", h.diagnostics());
    assert_eq!(last["update"]["attempt_from"], A);
    assert_eq!(last["update"]["attempt_to"], B);
    assert_eq!(last["update"]["desired_version"], B);
    assert_eq!(h.link("current").as_deref(), Some(B));
    assert_eq!(h.link("previous").as_deref(), Some(A));
    // exec keeps the PID; the agent wrote it at every start.
    assert_eq!(h.agent_pid(), Some(pid), "{}", h.diagnostics());
    assert!(pid_alive(pid));
    // The phases went downloading/verifying/installing → trial → committed.
    let seen = h.cp.lock().unwrap().seen.clone();
    assert!(seen.iter().any(|(v, p)| v == B && p == "trial"), "{seen:?}");
    // The watcher saw the commit and left; the download was removed.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let w = std::fs::read_to_string(h.state.join("update-watch.log")).unwrap_or_default();
        if w.contains("is over") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = std::fs::read_to_string(h.state.join("update-watch.log")).unwrap_or_default();
    assert!(w.contains("is over (committed)"), "{}", h.diagnostics());
    assert!(!h.state.join("downloads").exists());
    // The manifest went into the release directory: the new binary reports B.
    let out = Command::new(h.root.join("current/bin/nkudo-edge"))
        .arg("version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("nkudo-edge {B}\n")));
}

#[tokio::test]
async fn a_release_that_exits_at_once_is_rolled_back_by_the_watcher() {
    let mut h = Host::new().await;
    h.spawn("exec");
    let pid = h.child.as_ref().unwrap().id();
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, tarball(&[("bin/nkudo-edge", &script(B, "exit 3"), true)]));
    h.wait_heartbeat("rolled back", Duration::from_secs(60), |v| {
        v["agent_version"] == A && phase(v) == "rolled-back"
    })
    .await;
    let last = h.last();
    let err = last["update"]["last_error"].as_str().unwrap_or("");
    assert!(err.contains("exited during the trial"), "{}", h.diagnostics());
    assert_eq!(h.link("current").as_deref(), Some(A));
    // The watcher became the agent: a new PID in agent.pid.
    let now = h.agent_pid().unwrap();
    assert_ne!(now, pid);
    assert!(pid_alive(now));
    // Not retried: the agent stays on A with the refusal remembered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.link("current").as_deref(), Some(A));
    assert_eq!(phase(&h.last()), "rolled-back");
    assert!(h.update_json()["refused"][0]["version"] == B, "{}", h.diagnostics());
}

#[tokio::test]
async fn a_release_that_never_heartbeats_is_rolled_back_after_the_window() {
    let mut h = Host::new().await;
    h.spawn("exec");
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, tarball(&[("bin/nkudo-edge", &script(B, "exec sleep 3600"), true)]));
    h.wait_heartbeat("rolled back", Duration::from_secs(60), |v| {
        v["agent_version"] == A && phase(v) == "rolled-back"
    })
    .await;
    let err = h.last()["update"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(
        err.contains("no healthy heartbeat within the health window (8s)"),
        "{}",
        h.diagnostics()
    );
    assert_eq!(h.link("current").as_deref(), Some(A));
}

#[tokio::test]
async fn a_release_whose_binary_does_not_run_is_refused_before_the_switch() {
    let mut h = Host::new().await;
    h.spawn("exec");
    let pid = h.child.as_ref().unwrap().id();
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, tarball(&[("bin/nkudo-edge", b"#!/bin/sh\nexit 1\n", true)]));
    h.wait_heartbeat("failed", Duration::from_secs(60), |v| phase(v) == "failed")
        .await;
    let err = h.last()["update"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(err.contains("pre-switch trial run failed"), "{}", h.diagnostics());
    assert_eq!(h.last()["agent_version"], A);
    assert_eq!(h.link("current").as_deref(), Some(A));
    assert_eq!(h.agent_pid(), Some(pid));
    assert!(!h.state.join("update-watch.log").exists());
}

#[tokio::test]
async fn exit_mode_exits_75_and_the_supervisor_starts_the_new_version() {
    let mut h = Host::new().await;
    h.spawn_supervised("8s", "2s");
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, real_release(B));
    h.wait_heartbeat("B committed", Duration::from_secs(60), |v| {
        v["agent_version"] == B && phase(v) == "committed"
    })
    .await;
    assert_eq!(h.exits().trim(), "exit 75", "{}", h.diagnostics());
    assert_eq!(h.last()["update"]["restarts"], 0);
}

#[tokio::test]
async fn a_release_that_keeps_crashing_is_rolled_back_by_the_start_counter() {
    let mut h = Host::new().await;
    h.spawn_supervised("60s", "10s");
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    // The real agent, killed one second after every start (before it can commit).
    let wrapper = script(
        B,
        "dir=$(dirname \"$0\")\n\"$dir/nkudo-edge.real\" \"$@\" &\npid=$!\nsleep 1\nkill -KILL $pid 2>/dev/null\nexit 137",
    );
    let real = std::fs::read(agent_bin()).unwrap();
    h.offer(
        B,
        tarball(&[("bin/nkudo-edge", &wrapper, true), ("bin/nkudo-edge.real", &real, true)]),
    );
    h.wait_heartbeat("rolled back", Duration::from_secs(90), |v| {
        v["agent_version"] == A && phase(v) == "rolled-back"
    })
    .await;
    let err = h.last()["update"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(err.contains("crashed 3 times during the trial"), "{}", h.diagnostics());
    assert_eq!(h.link("current").as_deref(), Some(A));
    assert!(h.exits().contains("exit 137"), "{}", h.diagnostics());
}

#[tokio::test]
async fn an_agent_stopped_during_its_trial_is_rolled_back_but_not_restarted() {
    let mut h = Host::new().await;
    let cmd = h.command(&h.root.join("current/bin/nkudo-edge"), "exec", "30s", "20s");
    h.start(cmd);
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, real_release(B));
    h.wait_heartbeat("B on trial", Duration::from_secs(60), |v| {
        v["agent_version"] == B && phase(v) == "trial"
    })
    .await;
    let pid = h.agent_pid().unwrap();
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if h.update_json()["phase"] == "rolled-back" && !pid_alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.update_json()["phase"], "rolled-back", "{}", h.diagnostics());
    let err = h.update_json()["last_error"].as_str().unwrap_or("").to_string();
    assert!(err.contains("stopped (signal) during the trial"), "{}", h.diagnostics());
    assert_eq!(h.link("current").as_deref(), Some(A));
    // Nothing was restarted: agent.pid names the stopped process.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.agent_pid(), Some(pid));
    assert!(!pid_alive(pid));
}

#[tokio::test]
async fn updates_are_refused_and_reported_without_keys_or_outside_a_layout() {
    // No release key configured.
    let mut h = Host::new().await;
    let mut cmd = h.command(&h.root.join("current/bin/nkudo-edge"), "exec", "8s", "2s");
    cmd.env_remove("NKUDO_RELEASE_PUBLIC_KEYS");
    h.start(cmd);
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    h.offer(B, real_release(B));
    h.wait_heartbeat("failed", Duration::from_secs(30), |v| phase(v) == "failed")
        .await;
    let u = h.last()["update"].clone();
    assert!(
        u["last_error"]
            .as_str()
            .unwrap()
            .contains("no release public key is configured"),
        "{}",
        h.diagnostics()
    );
    assert_eq!(u["attempt_to"], B);
    assert_eq!(h.link("current").as_deref(), Some(A));

    // Not running from a host layout.
    let mut h = Host::new().await;
    let cmd = h.command(&agent_bin(), "exec", "8s", "2s");
    h.start(cmd);
    let build = nkudo_core::build_info::VERSION;
    h.wait_heartbeat("the build version reports", Duration::from_secs(30), |v| {
        v["agent_version"] == build
    })
    .await;
    h.offer("99.0.0", real_release("99.0.0"));
    h.wait_heartbeat("failed", Duration::from_secs(30), |v| phase(v) == "failed")
        .await;
    let err = h.last()["update"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(err.contains("releaser install"), "{}", h.diagnostics());
}

#[tokio::test]
async fn an_older_version_is_refused_until_it_is_named_a_rollback_target() {
    let mut h = Host::new().await;
    h.spawn("exec");
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    let old = "0.0.9";
    h.offer(old, real_release(old));
    h.wait_heartbeat("refused", Duration::from_secs(30), |v| phase(v) == "failed")
        .await;
    let err = h.last()["update"]["last_error"].as_str().unwrap_or("").to_string();
    assert!(err.contains("older") && err.contains("rollback"), "{}", h.diagnostics());
    // Not retried while the offer stays the same.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase(&h.last()), "failed");
    assert_eq!(h.link("current").as_deref(), Some(A));
    // The same version named a rollback target: installed.
    h.offer_with(old, real_release(old), true);
    h.wait_heartbeat("rolled forward to the older version", Duration::from_secs(60), |v| {
        v["agent_version"] == old && phase(v) == "committed"
    })
    .await;
    assert_eq!(h.link("current").as_deref(), Some(old));
    assert_eq!(h.link("previous").as_deref(), Some(A));
}

#[tokio::test]
async fn a_download_interrupted_by_an_agent_restart_resumes() {
    let mut h = Host::new().await;
    let mut cmd = h.command(&h.root.join("current/bin/nkudo-edge"), "exec", "8s", "2s");
    cmd.env("NKUDO_UPDATE_DOWNLOAD_RATE_LIMIT", "1M");
    h.start(cmd);
    h.wait_heartbeat("A reports", Duration::from_secs(30), |v| v["agent_version"] == A)
        .await;
    // Incompressible padding makes the tarball ~3 MiB: about 3 s at 1 MiB/s.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let padding: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let bin = std::fs::read(agent_bin()).unwrap();
    let tar = tarball(&[("bin/nkudo-edge", &bin, true), ("share/padding.bin", &padding, false)]);
    let size = tar.len() as u64;
    h.offer(B, tar);
    let part = h.state.join("downloads").join(format!("{}.part", artifact_name(B)));
    let t0 = Instant::now();
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < 1 << 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no progress\n{}",
            h.diagnostics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kill the agent mid-download (SIGKILL: no clean-up at all), then start it again.
    let mut child = h.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(have < size);
    assert_eq!(h.update_json()["phase"], "downloading");
    let mut cmd = h.command(&h.root.join("current/bin/nkudo-edge"), "exec", "8s", "2s");
    cmd.env("NKUDO_UPDATE_DOWNLOAD_RATE_LIMIT", "1M");
    let log2 = std::fs::File::create(h.dir.join("agent2.log")).unwrap();
    cmd.stdin(Stdio::null()).stdout(log2.try_clone().unwrap()).stderr(log2);
    h.child = Some(cmd.spawn().unwrap());
    h.wait_heartbeat("B committed", Duration::from_secs(60), |v| {
        v["agent_version"] == B && phase(v) == "committed"
    })
    .await;
    let log = std::fs::read_to_string(h.dir.join("agent2.log")).unwrap();
    let needle = format!("resuming {} at byte ", artifact_name(B));
    let at: u64 = log
        .lines()
        .find_map(|l| l.split(&needle).nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no resume in the log\n{log}"));
    assert!(at >= have && at < size, "resumed at {at}, had {have} of {size}");
    let reqs = h.server.requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|r| r.header("range") == Some(&format!("bytes={at}-"))),
        "a Range request from byte {at}"
    );
}
