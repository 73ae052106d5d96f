//! Running the real `nkudo-edge` agent against a real control plane, with the Cloud Hypervisor and NetBird
//! stand-ins (`mock-cloud-hypervisor`, `mock-netbird`) given by `--cloud-hypervisor-bin` / `--netbird-bin`.
//!
//! [`EdgeHost`] is one simulated edge host: its own state, PKI, runtime and images directories in a temporary
//! directory, boot files for plans ([`EdgeHost::create_spec`]), the agent process (`run`, `--once`, `enroll`),
//! its log, its state file and the stand-in's record of REST calls per VM.

use crate::client::{expect_json, poll_until, tenant, Fixture};
use crate::harness::{bin_path, ControlPlane, TempDir};
use crate::plans::get_plan;
use anyhow::{bail, Context};
use nkudo_core::api::{
    ApplyPlanResponse, Execution, ExecutionLog, Host, HostsResponse, PlanActionSpec, Site, SitesResponse,
};
use reqwest::StatusCode;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const EDGE_BIN: &str = "nkudo-edge";
pub const MOCK_CH_BIN: &str = "mock-cloud-hypervisor";
pub const MOCK_NETBIRD_BIN: &str = "mock-netbird";

/// Environment variables of the agent (and of the stand-ins it starts) that never leak in from the test's own
/// environment.
const SCRUBBED_ENV: &[&str] = &[
    "NKUDO_CONFIG",
    "NKUDO_CONTROL_PLANE",
    "NKUDO_ENROLL_TOKEN",
    "NKUDO_STATE_DIR",
    "NKUDO_PKI_DIR",
    "NKUDO_RUNTIME_DIR",
    "NKUDO_IMAGES_DIR",
    "NKUDO_HOSTNAME",
    "NKUDO_CA_FILE",
    "NKUDO_INSECURE_SKIP_VERIFY",
    "NKUDO_HEARTBEAT_INTERVAL",
    "NKUDO_CLOUD_HYPERVISOR_BIN",
    "NKUDO_QEMU_IMG_BIN",
    "NKUDO_BRIDGE",
    "NKUDO_NETBIRD_BIN",
    "NKUDO_NETBIRD_ENABLED",
    "NKUDO_NETBIRD_AUTO_JOIN",
    "NKUDO_NETBIRD_HOSTNAME",
    "NKUDO_NETBIRD_MANAGEMENT_URL",
    "NKUDO_NETBIRD_SETUP_KEY",
    "NKUDO_NETBIRD_SETUP_KEY_FILE",
    "NKUDO_NETBIRD_PROBE_TYPE",
    "NKUDO_NETBIRD_PROBE_TARGET",
    "NKUDO_NETBIRD_PROBE_TIMEOUT",
    "NKUDO_SPOOL_MAX_ENTRIES",
    "NKUDO_SPOOL_MAX_BYTES",
    "NKUDO_MAX_BACKOFF",
    "NETBIRD_SETUP_KEY",
    "NB_SETUP_KEY",
    "MOCK_CH_FAIL_BOOT",
    "MOCK_CH_CRASH_AFTER_BOOT_MS",
    "MOCK_CH_GUEST_POWEROFF_AFTER_MS",
    "MOCK_CH_DELAY_MS",
    "MOCK_CH_STARTUP_DELAY_MS",
    "MOCK_CH_EXIT_AT_START",
    "MOCK_CH_POWER_BUTTON",
    "MOCK_CH_HANG_VMM_SHUTDOWN",
    "MOCK_CH_IGNORE_SIGTERM",
    "MOCK_NETBIRD_MODE",
    "MOCK_NETBIRD_STATE",
    "MOCK_NETBIRD_JOIN_FAILS",
];

/// A control plane tuned for agent tests: 1 s heartbeat interval.
pub fn edge_control_plane(backend: crate::Backend) -> crate::ControlPlaneBuilder {
    ControlPlane::builder(backend)
        .env("HEARTBEAT_INTERVAL", "1s")
        .env("OFFLINE_SWEEP_INTERVAL", "1s")
}

/// A free TCP port on 127.0.0.1 (for a control plane that must come back on the same address).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One simulated edge host running the real agent.
pub struct EdgeHost {
    pub hostname: String,
    pub state_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub images_dir: PathBuf,
    pub config_file: PathBuf,
    pub kernel_path: PathBuf,
    pub disk_image: PathBuf,
    log_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    // Dropped last.
    root: TempDir,
}

impl EdgeHost {
    /// A fresh host: directories, an empty config file, boot files (kernel, raw disk image), NetBird connected.
    pub fn new(hostname: &str) -> anyhow::Result<EdgeHost> {
        let root = TempDir::new("nkudo-edge")?;
        let r = root.path();
        let images_dir = r.join("images");
        std::fs::create_dir_all(&images_dir)?;
        let kernel_path = images_dir.join("vmlinux");
        std::fs::write(
            &kernel_path,
            b"not really a kernel (the stand-in only checks that it exists)\n",
        )?;
        let disk_image = images_dir.join("rootfs.raw");
        std::fs::write(&disk_image, vec![0u8; 1024 * 1024])?;
        let config_file = r.join("edge.toml");
        std::fs::write(&config_file, "# nkudo-edge test config: everything comes from flags\n")?;
        let mut h = EdgeHost {
            hostname: hostname.to_string(),
            state_dir: r.join("state"),
            pki_dir: r.join("pki"),
            runtime_dir: r.join("vms"),
            images_dir,
            config_file,
            kernel_path,
            disk_image,
            log_path: r.join("agent.log"),
            env: Vec::new(),
            child: None,
            root,
        };
        h.set_env("MOCK_NETBIRD_MODE", "connected");
        let nb_state = h.root.path().join("netbird.state");
        h.set_env("MOCK_NETBIRD_STATE", nb_state.to_string_lossy().as_ref());
        Ok(h)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Sets an environment variable for later agent processes (and the stand-ins they start), e.g. a fault.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// `nkudo-edge <args>` with a clean environment plus this host's.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        // NKUDO_EDGE_BIN: measure another build of the agent (e.g. the static release binary).
        let bin = std::env::var_os("NKUDO_EDGE_BIN")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_path(EDGE_BIN));
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.env("NKUDO_CONFIG", &self.config_file);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `nkudo-edge enroll` with the token, trusting only the control plane's CA bundle (`--ca-file`).
    pub fn enroll_output(&self, cp: &ControlPlane, token: &str) -> anyhow::Result<Output> {
        let out = self
            .command([
                "enroll",
                "--control-plane",
                &cp.base_url,
                "--token",
                token,
                "--hostname",
                &self.hostname,
            ])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--pki-dir")
            .arg(&self.pki_dir)
            .arg("--ca-file")
            .arg(&cp.ca_bundle_path)
            .output()
            .context("run nkudo-edge enroll")?;
        Ok(out)
    }

    /// Issues a token for the fixture's site and enrolls; returns the agent id.
    pub async fn enroll(&self, cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<String> {
        let token = crate::issue_token(cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
        let out = self.enroll_output(cp, &token.token)?;
        if !out.status.success() {
            bail!("nkudo-edge enroll failed: {}", output_text(&out));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let agent_id = stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix("agent_id="))
            .with_context(|| format!("no agent_id= in enroll output: {}", output_text(&out)))?;
        Ok(agent_id.to_string())
    }

    /// Arguments of `run`/`verify-heartbeat` against `cp` with the stand-ins and a 1 s heartbeat.
    pub fn run_args(&self, cp: &ControlPlane) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut push = |k: &str, v: &std::ffi::OsStr| {
            a.push(k.into());
            a.push(v.to_os_string());
        };
        push("--control-plane", cp.base_url.as_ref());
        push("--state-dir", self.state_dir.as_os_str());
        push("--pki-dir", self.pki_dir.as_os_str());
        push("--runtime-dir", self.runtime_dir.as_os_str());
        push("--images-dir", self.images_dir.as_os_str());
        push("--heartbeat-interval", "1s".as_ref());
        push("--cloud-hypervisor-bin", bin_path(MOCK_CH_BIN).as_os_str());
        push("--netbird-bin", bin_path(MOCK_NETBIRD_BIN).as_os_str());
        a
    }

    /// Starts `nkudo-edge run` (stderr appended to the agent log).
    pub fn spawn(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("agent already running");
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let out = log.try_clone()?;
        let args = self.run_args(cp);
        let child = self
            .command(["run"])
            .args(args)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn nkudo-edge run")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `nkudo-edge verify-heartbeat` (one heartbeat and its plans), waiting for it to exit.
    pub fn once(&self, cp: &ControlPlane) -> anyhow::Result<Output> {
        let args = self.run_args(cp);
        self.command(["verify-heartbeat"])
            .args(args)
            .output()
            .context("run nkudo-edge verify-heartbeat")
    }

    /// Sends `signal` (`TERM`, `KILL`, …) to the running agent.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("agent is not running")?;
        let st = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the agent to exit (polling, up to `timeout`); returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("agent is not running")?;
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("agent still running after {timeout:?}\n{}", self.log_tail(4000));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait for the exit.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit(Duration::from_secs(60)).await
    }

    /// SIGKILL (the agent gets no chance to clean up) and reap it.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.signal("KILL")?;
        self.wait_exit(Duration::from_secs(10)).await.map(|_| ())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Everything the agent processes wrote (stdout and stderr of every `run`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, max: usize) -> String {
        let mut f = match std::fs::File::open(&self.log_path) {
            Ok(f) => f,
            Err(_) => return String::new(),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(max as u64)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        format!("---- agent log (tail) ----\n{s}\n----")
    }

    /// The agent's state file as JSON (`Null` when it does not exist).
    pub fn state(&self) -> anyhow::Result<serde_json::Value> {
        let p = self.state_dir.join("edge-state.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parse {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
            Err(e) => Err(e.into()),
        }
    }

    /// The idempotency-cache record of `action_id` (any execution), from the state file.
    pub fn action_record(&self, action_id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let st = self.state()?;
        Ok(st["actions"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["action_id"] == action_id).cloned()))
    }

    /// Entries in the on-disk spool (results and logs not delivered yet).
    pub fn spool_len(&self) -> usize {
        std::fs::read_to_string(self.state_dir.join("spool.jsonl"))
            .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    /// The action ids of the results waiting in the spool, in order.
    pub fn spooled_results(&self) -> Vec<String> {
        std::fs::read_to_string(self.state_dir.join("spool.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "result")
            .filter_map(|v| v["result"]["action_id"].as_str().map(str::to_string))
            .collect()
    }

    /// A CREATE that boots on the stand-in: this host's kernel and disk image, a command line.
    pub fn create_spec(&self, vm_id: &str) -> PlanActionSpec {
        PlanActionSpec {
            operation_id: Some(format!("create-{vm_id}")),
            operation: "CREATE".into(),
            vm_id: Some(vm_id.to_string()),
            name: Some(format!("name-{vm_id}")),
            vcpu_count: Some(2),
            memory_mib: Some(256),
            kernel_path: Some(self.kernel_path.to_string_lossy().into_owned()),
            cmdline: Some("console=ttyS0 root=/dev/vda rw".into()),
            disk_image: Some(self.disk_image.to_string_lossy().into_owned()),
            ..Default::default()
        }
    }

    /// The REST calls the stand-in VMM of `vm_id` received (`<METHOD> <endpoint>` per line, all VMM processes).
    pub fn vmm_requests(&self, vm_id: &str) -> Vec<String> {
        std::fs::read_to_string(self.runtime_dir.join(vm_id).join("api.sock.requests.log"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// How many times the stand-in of `vm_id` received `<METHOD> <endpoint>` (e.g. `PUT vm.boot`).
    pub fn vmm_calls(&self, vm_id: &str, call: &str) -> usize {
        self.vmm_requests(vm_id).iter().filter(|l| l.contains(call)).count()
    }

    /// `VmRSS` and `VmHWM` of the running agent in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.pid().context("agent is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing"))?;
            Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// utime + stime of the running agent, in clock ticks.
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let pid = self.pid().context("agent is not running")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // After the comm field: state is index 0; utime is field 14 overall → index 11; stime → 12.
        Ok(f.get(11).unwrap_or(&"0").parse::<u64>()? + f.get(12).unwrap_or(&"0").parse::<u64>()?)
    }
}

impl Drop for EdgeHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(8000));
        }
    }
}

pub fn output_text(o: &Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The fixture's site as `GET /tenants/{id}/sites` lists it.
pub async fn site_of(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Site> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/tenants/{}/sites", fx.tenant_id())))
        .send()
        .await?;
    let sites: SitesResponse = expect_json(r, StatusCode::OK, "GET /tenants/{id}/sites").await?;
    sites
        .sites
        .into_iter()
        .find(|s| s.id == fx.site_id())
        .context("site not listed")
}

/// The hosts of the fixture's site.
pub async fn site_hosts(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Vec<Host>> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/sites/{}/hosts", fx.site_id())))
        .send()
        .await?;
    Ok(expect_json::<HostsResponse>(r, StatusCode::OK, "GET /sites/{id}/hosts")
        .await?
        .hosts)
}

/// Polls the plan until its status is terminal (`SUCCEEDED`, `FAILED`, `CANCELLED`); returns it.
pub async fn wait_plan_done(
    cp: &ControlPlane,
    fx: &Fixture,
    plan_id: &str,
    timeout: Duration,
) -> anyhow::Result<ApplyPlanResponse> {
    poll_until(timeout, &format!("plan {plan_id} to finish"), || async {
        let p = get_plan(cp, fx, plan_id).await?;
        Ok(matches!(p.plan_status.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED").then_some(p))
    })
    .await
}

/// Polls until the execution of `plan` named `op` is in `state`.
pub async fn wait_execution(
    cp: &ControlPlane,
    fx: &Fixture,
    plan_id: &str,
    op: &str,
    state: &str,
    timeout: Duration,
) -> anyhow::Result<Execution> {
    poll_until(
        timeout,
        &format!("execution {op} of plan {plan_id} to be {state}"),
        || async {
            let p = get_plan(cp, fx, plan_id).await?;
            let e = p
                .executions
                .iter()
                .find(|e| e.operation_id == op)
                .with_context(|| format!("no execution {op}"))?;
            if e.state == state {
                return Ok(Some(e.clone()));
            }
            anyhow::ensure!(
                !matches!(e.state.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED"),
                "execution {op} ended {} ({:?}: {:?}), not {state}",
                e.state,
                e.error_code,
                e.error_message
            );
            Ok(None)
        },
    )
    .await
}

/// Every log line of an execution (all pages, `limit=2` to exercise pagination).
pub async fn all_logs(cp: &ControlPlane, api_key: &str, execution_id: &str) -> anyhow::Result<Vec<ExecutionLog>> {
    let mut out = Vec::new();
    let mut after: Option<i64> = None;
    for _ in 0..10_000 {
        let q = match after {
            Some(a) => format!("?limit=2&after_sequence={a}"),
            None => "?limit=2".to_string(),
        };
        let page = crate::plans::execution_logs(cp, api_key, execution_id, &q).await?;
        out.extend(page.logs);
        match page.next_after_sequence {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
    bail!("more than 10000 pages of logs")
}

/// Waits until the control plane saw `n` more heartbeats of the site's (single) host: its
/// `agent_last_heartbeat_at` changed `n` times. A deliberate observation window with a deadline.
pub async fn wait_heartbeats(cp: &ControlPlane, fx: &Fixture, n: usize) -> anyhow::Result<()> {
    let mut last = site_hosts(cp, fx)
        .await?
        .first()
        .and_then(|h| h.agent_last_heartbeat_at.clone());
    for i in 0..n {
        last = poll_until(Duration::from_secs(30), &format!("heartbeat {}/{n}", i + 1), || {
            let prev = last.clone();
            async move {
                let now = site_hosts(cp, fx)
                    .await?
                    .first()
                    .and_then(|h| h.agent_last_heartbeat_at.clone());
                Ok((now.is_some() && now != prev).then_some(now))
            }
        })
        .await?;
    }
    Ok(())
}
