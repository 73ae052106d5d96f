//! NetBird mesh status for the heartbeat: `netbird status --json`, an optional join with a setup key, and an
//! optional reachability probe (http or ping) across the mesh.
//!
//! What the earlier agent got wrong and this does not (reference §6.7 and bug 36):
//! * It reads the real CLI's JSON: connected = `management.connected` (and `daemonStatus == "Connected"` when
//!   present), IP from `netbirdIp` without its `/prefix`, peer id from `publicKey`, `fqdn`, `management.url`.
//!   Unknown keys are ignored. The plain-text fallback matches the `Management:` line exactly, so
//!   "Disconnected" is not "connected".
//! * The setup key goes to `netbird up` in the environment (`NB_SETUP_KEY`), never in argv (where `ps` shows
//!   it); it is never logged, never persisted, and redacted from `Debug`.
//! * `--management-url` and `--hostname` are passed when configured.
//! * A failed join is retried on later calls with exponential backoff (not only on the first tick).
//!
//! States: `Connected` (`network ready`), `Degraded` and `NotConfigured`; the reason strings are the
//! reference's, in its evaluation order (see the `REASON_*` constants).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nkudo_core::api::NetbirdStatus;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub const STATE_CONNECTED: &str = "Connected";
pub const STATE_DEGRADED: &str = "Degraded";
pub const STATE_NOT_CONFIGURED: &str = "NotConfigured";

pub const REASON_DISABLED: &str = "netbird integration disabled";
pub const REASON_NOT_INSTALLED: &str = "netbird CLI not installed";
pub const REASON_JOIN_FAILED: &str = "netbird join failed";
pub const REASON_STATUS_AFTER_JOIN: &str = "unable to read netbird status after join";
pub const REASON_NOT_CONFIGURED: &str = "netbird peer is not configured";
pub const REASON_DISCONNECTED: &str = "netbird peer disconnected";
pub const REASON_SERVICE_DOWN: &str = "netbird service is not running";
pub const REASON_PROBE_FAILED: &str = "mesh endpoint probe failed";
pub const REASON_READY: &str = "network ready";

/// User-Agent of the http probe (the reference's).
pub const PROBE_USER_AGENT: &str = "nkudo-agent-netbird-check/0.1";

const STATUS_TIMEOUT: Duration = Duration::from_secs(8);
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `GET <target>` (`http://` is prepended when there is no scheme); OK when the status is in the range.
    Http,
    /// `ping -c 1 -W <secs> <target>`.
    Ping,
}

/// A reachability check across the mesh, run when the peer is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    /// URL for http, host or address for ping.
    pub target: String,
    pub timeout: Duration,
    /// Accepted http statuses, inclusive; 0 means the default (200 and 399).
    pub http_status_min: u16,
    pub http_status_max: u16,
}

impl Probe {
    pub fn http(url: impl Into<String>) -> Self {
        Probe {
            kind: ProbeKind::Http,
            target: url.into(),
            timeout: Duration::from_secs(5),
            http_status_min: 200,
            http_status_max: 399,
        }
    }

    pub fn ping(target: impl Into<String>) -> Self {
        Probe {
            kind: ProbeKind::Ping,
            target: target.into(),
            timeout: Duration::from_secs(5),
            ..Probe::http("")
        }
    }
}

#[derive(Clone)]
pub struct NetbirdConfig {
    pub enabled: bool,
    /// The `netbird` CLI (a bare name is looked up on `PATH`).
    pub bin: PathBuf,
    pub auto_join: bool,
    /// Secret: never logged (redacted from `Debug`), passed to `netbird up` only through `NB_SETUP_KEY`.
    pub setup_key: Option<String>,
    pub management_url: Option<String>,
    pub hostname: Option<String>,
    pub probe: Option<Probe>,
}

impl Default for NetbirdConfig {
    fn default() -> Self {
        NetbirdConfig {
            enabled: true,
            bin: PathBuf::from("netbird"),
            auto_join: true,
            setup_key: None,
            management_url: None,
            hostname: None,
            probe: None,
        }
    }
}

impl std::fmt::Debug for NetbirdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetbirdConfig")
            .field("enabled", &self.enabled)
            .field("bin", &self.bin)
            .field("auto_join", &self.auto_join)
            .field("setup_key", &self.setup_key.as_ref().map(|_| "<redacted>"))
            .field("management_url", &self.management_url)
            .field("hostname", &self.hostname)
            .field("probe", &self.probe)
            .finish()
    }
}

/// What `netbird status` says, reduced to what the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedStatus {
    pub daemon_status: Option<String>,
    pub management_connected: bool,
    pub management_url: Option<String>,
    pub ipv4: Option<String>,
    pub peer_id: Option<String>,
    pub fqdn: Option<String>,
}

impl ParsedStatus {
    /// Connected to the mesh: management connected, and the daemon `Connected` when it says.
    pub fn connected(&self) -> bool {
        self.management_connected
            && self
                .daemon_status
                .as_deref()
                .is_none_or(|d| d.eq_ignore_ascii_case("Connected"))
    }

    /// The peer has never logged in (or its login is gone): it needs a setup key.
    pub fn needs_login(&self) -> bool {
        matches!(
            self.daemon_status.as_deref(),
            Some("NeedsLogin") | Some("LoginFailed") | Some("SessionExpired")
        )
    }
}

fn strip_prefix_len(ip: &str) -> String {
    ip.split('/').next().unwrap_or(ip).trim().to_string()
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// Reads `netbird status --json` (unknown keys ignored).
pub fn parse_status_json(v: &serde_json::Value) -> ParsedStatus {
    let s = |k: &str| non_empty(v.get(k).and_then(|x| x.as_str()));
    let mgmt = v.get("management");
    ParsedStatus {
        daemon_status: s("daemonStatus"),
        management_connected: mgmt
            .and_then(|m| m.get("connected"))
            .and_then(|c| c.as_bool())
            .unwrap_or(false),
        management_url: non_empty(mgmt.and_then(|m| m.get("url")).and_then(|u| u.as_str())),
        ipv4: s("netbirdIp")
            .map(|ip| strip_prefix_len(&ip))
            .filter(|ip| !ip.is_empty()),
        peer_id: s("publicKey"),
        fqdn: s("fqdn"),
    }
}

/// Reads the human `netbird status` output (`Daemon status:`, `Management: Connected`, `NetBird IP:`, ...).
pub fn parse_status_text(text: &str) -> ParsedStatus {
    let mut p = ParsedStatus::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "Daemon status" => p.daemon_status = non_empty(Some(v)),
            "Management" => {
                // "Connected", "Disconnected", "Connected to https://..." in some versions.
                let first = v.split_whitespace().next().unwrap_or("");
                p.management_connected = first.eq_ignore_ascii_case("connected");
                if let Some(url) = v.split_whitespace().find(|w| w.contains("://")) {
                    p.management_url = Some(url.to_string());
                }
            }
            "NetBird IP" => p.ipv4 = non_empty(Some(&strip_prefix_len(v))).filter(|ip| ip != "N/A"),
            "FQDN" => p.fqdn = non_empty(Some(v)),
            "Public key" => p.peer_id = non_empty(Some(v)),
            _ => {}
        }
    }
    p
}

#[derive(Debug)]
enum CliError {
    /// The CLI is not there (or the shell says "command not found").
    NotInstalled,
    /// It ran and failed (daemon down, bad output, timeout).
    Failed,
}

fn find_bin(bin: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if bin.components().count() > 1 || bin.is_absolute() {
        return exec(bin).then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| exec(p))
}

struct JoinState {
    failures: u32,
    next_attempt: Option<Instant>,
}

/// NetBird on this host, evaluated on every `status()` (once per heartbeat).
pub struct Netbird {
    cfg: NetbirdConfig,
    join: tokio::sync::Mutex<JoinState>,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Netbird {
    pub fn new(cfg: NetbirdConfig) -> Self {
        Netbird {
            cfg,
            join: tokio::sync::Mutex::new(JoinState {
                failures: 0,
                next_attempt: None,
            }),
            backoff_initial: Duration::from_secs(30),
            backoff_max: Duration::from_secs(600),
        }
    }

    /// The wait after the first failed join (doubling per failure up to `max`). Defaults: 30 s, 10 min.
    pub fn with_join_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// `netbird version`, e.g. `0.36.5`; `None` when it does not run.
    pub fn binary_version(&self) -> Option<String> {
        let bin = find_bin(&self.cfg.bin)?;
        let line = crate::provider::run_version_line(&bin, &["version"], Duration::from_secs(5))?;
        Some(line.trim_start_matches("netbird").trim().to_string())
    }

    fn snapshot(state: &str, reason: &str, p: Option<&ParsedStatus>, cfg_url: Option<&String>) -> NetbirdStatus {
        let p = p.cloned().unwrap_or_default();
        NetbirdStatus {
            connected: state == STATE_CONNECTED,
            state: Some(state.to_string()),
            reason: Some(reason.to_string()),
            peer_id: p.peer_id,
            ipv4: p.ipv4,
            fqdn: p.fqdn,
            management_url: p.management_url.or_else(|| cfg_url.cloned()),
            network_id: None,
            raw: None,
        }
    }

    /// Evaluates NetBird: reads the status; joins when `auto_join`, a setup key is set and the peer is not
    /// connected (retrying failed joins on later calls with backoff); runs the probe when connected.
    pub async fn status(&self) -> NetbirdStatus {
        let url = self.cfg.management_url.as_ref();
        if !self.cfg.enabled {
            return Self::snapshot(STATE_NOT_CONFIGURED, REASON_DISABLED, None, url);
        }
        let Some(bin) = find_bin(&self.cfg.bin) else {
            return Self::snapshot(STATE_NOT_CONFIGURED, REASON_NOT_INSTALLED, None, url);
        };
        let mut st = self.read_status(&bin).await;
        if let Err(CliError::NotInstalled) = st {
            return Self::snapshot(STATE_NOT_CONFIGURED, REASON_NOT_INSTALLED, None, url);
        }
        let connected = matches!(&st, Ok(p) if p.connected());
        let key = self.cfg.setup_key.as_deref().filter(|k| !k.trim().is_empty());
        let mut join_failed = false;
        if !connected && self.cfg.auto_join {
            if let Some(key) = key {
                let mut js = self.join.lock().await;
                if js.next_attempt.is_none_or(|t| Instant::now() >= t) {
                    if self.join(&bin, key).await {
                        js.failures = 0;
                        js.next_attempt = None;
                        st = self.read_status(&bin).await;
                        if st.is_err() {
                            return Self::snapshot(STATE_DEGRADED, REASON_STATUS_AFTER_JOIN, None, url);
                        }
                    } else {
                        js.failures = js.failures.saturating_add(1);
                        let factor = 1u32 << js.failures.saturating_sub(1).min(16);
                        let wait = self.backoff_initial.saturating_mul(factor).min(self.backoff_max);
                        js.next_attempt = Some(Instant::now() + wait);
                        join_failed = true;
                    }
                } else {
                    // Waiting out the backoff: the last join failed and nothing has connected since.
                    join_failed = js.failures > 0;
                }
            }
        }
        let parsed = match &st {
            Ok(p) => p,
            Err(_) if join_failed => return Self::snapshot(STATE_DEGRADED, REASON_JOIN_FAILED, None, url),
            Err(_) => return Self::snapshot(STATE_DEGRADED, REASON_SERVICE_DOWN, None, url),
        };
        if !parsed.connected() {
            let (state, reason) = if join_failed {
                (STATE_DEGRADED, REASON_JOIN_FAILED)
            } else if parsed.needs_login() || (parsed.ipv4.is_none() && parsed.peer_id.is_none()) {
                (STATE_NOT_CONFIGURED, REASON_NOT_CONFIGURED)
            } else {
                (STATE_DEGRADED, REASON_DISCONNECTED)
            };
            return Self::snapshot(state, reason, Some(parsed), url);
        }
        if let Some(probe) = &self.cfg.probe {
            if run_probe(probe).await.is_err() {
                return Self::snapshot(STATE_DEGRADED, REASON_PROBE_FAILED, Some(parsed), url);
            }
        }
        Self::snapshot(STATE_CONNECTED, REASON_READY, Some(parsed), url)
    }

    async fn read_status(&self, bin: &Path) -> Result<ParsedStatus, CliError> {
        let out = run_cli(bin, &["status", "--json"], None, STATUS_TIMEOUT).await?;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out) {
            if v.is_object() {
                return Ok(parse_status_json(&v));
            }
        }
        // Older CLIs: the human output.
        let out = run_cli(bin, &["status"], None, STATUS_TIMEOUT).await?;
        let p = parse_status_text(&String::from_utf8_lossy(&out));
        if p == ParsedStatus::default() {
            return Err(CliError::Failed);
        }
        Ok(p)
    }

    /// `netbird up [--management-url U] [--hostname H]` with `NB_SETUP_KEY` in its environment.
    async fn join(&self, bin: &Path, key: &str) -> bool {
        let mut args: Vec<&str> = vec!["up"];
        if let Some(u) = self.cfg.management_url.as_deref().filter(|u| !u.is_empty()) {
            args.extend(["--management-url", u]);
        }
        if let Some(h) = self.cfg.hostname.as_deref().filter(|h| !h.is_empty()) {
            args.extend(["--hostname", h]);
        }
        run_cli(bin, &args, Some(key), JOIN_TIMEOUT).await.is_ok()
    }
}

/// Runs the CLI; its stdout on success. Its output is never logged (it could echo what it was given).
async fn run_cli(bin: &Path, args: &[&str], setup_key: Option<&str>, timeout: Duration) -> Result<Vec<u8>, CliError> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_remove("NB_SETUP_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(k) = setup_key {
        cmd.env("NB_SETUP_KEY", k);
    }
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Err(CliError::NotInstalled),
        _ => return Err(CliError::Failed),
    };
    match out.status.code() {
        Some(0) => Ok(out.stdout),
        Some(127) => Err(CliError::NotInstalled),
        _ => Err(CliError::Failed),
    }
}

/// Runs the probe; `Ok(note)` when it passes (`status=<code>` for http).
pub async fn run_probe(probe: &Probe) -> Result<String, String> {
    let timeout = if probe.timeout.is_zero() {
        Duration::from_secs(5)
    } else {
        probe.timeout
    };
    match probe.kind {
        ProbeKind::Http => {
            let (min, max) = match (probe.http_status_min, probe.http_status_max) {
                (0, 0) => (200, 399),
                (0, m) => (200, m),
                (m, 0) => (m, 399),
                (a, b) => (a, b),
            };
            let code = match tokio::time::timeout(timeout, http_get(&probe.target)).await {
                Ok(r) => r?,
                Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
            };
            if (min..=max).contains(&code) {
                Ok(format!("status={code}"))
            } else {
                Err(format!("status={code}"))
            }
        }
        ProbeKind::Ping => {
            let secs = timeout.as_secs().max(1).to_string();
            let mut cmd = tokio::process::Command::new("ping");
            cmd.args(["-c", "1", "-W", &secs, &probe.target])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(timeout + Duration::from_secs(2), cmd.status()).await {
                Ok(Ok(s)) if s.success() => Ok("ping ok".into()),
                Ok(Ok(s)) => Err(format!("ping failed ({s})")),
                Ok(Err(e)) => Err(format!("cannot run ping: {e}")),
                Err(_) => Err("ping did not finish".into()),
            }
        }
    }
}

/// `GET url` over plain http; the status code.
async fn http_get(target: &str) -> Result<u16, String> {
    let url = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad probe url {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("probe url {url:?}: only http:// is supported"));
    }
    let host = uri.host().ok_or_else(|| format!("probe url {url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr_host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((addr_host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, PROBE_USER_AGENT)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string());
    let code = match res {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            Ok(code)
        }
        Err(e) => Err(e),
    };
    driver.abort();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTED: &str = r#"{
      "peers": {"total": 1, "connected": 1, "details": [{"fqdn": "peer.netbird.cloud", "netbirdIp": "100.64.0.11",
        "publicKey": "PEER=", "status": "Connected", "connectionType": "P2P", "latency": 1200000,
        "networks": null}]},
      "cliVersion": "0.36.5", "daemonVersion": "0.36.5", "daemonStatus": "Connected",
      "management": {"url": "https://api.netbird.io:443", "connected": true, "error": ""},
      "signal": {"url": "https://signal.netbird.io:443", "connected": true, "error": ""},
      "relays": {"total": 0, "available": 0, "details": []},
      "netbirdIp": "100.64.0.10/16", "publicKey": "AbCdEf0123456789=", "usesKernelInterface": true,
      "fqdn": "edge-1.netbird.cloud", "quantumResistance": false, "networks": null, "forwardingRules": 0,
      "dnsServers": [], "events": [], "someFutureKey": {"x": 1}
    }"#;

    #[test]
    fn parses_the_real_json_shape() {
        let v: serde_json::Value = serde_json::from_str(CONNECTED).unwrap();
        let p = parse_status_json(&v);
        assert!(p.connected());
        assert_eq!(p.ipv4.as_deref(), Some("100.64.0.10"));
        assert_eq!(p.peer_id.as_deref(), Some("AbCdEf0123456789="));
        assert_eq!(p.fqdn.as_deref(), Some("edge-1.netbird.cloud"));
        assert_eq!(p.management_url.as_deref(), Some("https://api.netbird.io:443"));
    }

    #[test]
    fn management_connected_decides_not_peers() {
        let mut v: serde_json::Value = serde_json::from_str(CONNECTED).unwrap();
        v["management"]["connected"] = false.into();
        assert!(!parse_status_json(&v).connected());
        let mut v: serde_json::Value = serde_json::from_str(CONNECTED).unwrap();
        v["daemonStatus"] = "Connecting".into();
        assert!(!parse_status_json(&v).connected());
        v.as_object_mut().unwrap().remove("daemonStatus");
        assert!(parse_status_json(&v).connected(), "older CLIs without daemonStatus");
        let v = serde_json::json!({"daemonStatus": "NeedsLogin", "management": {"connected": false}});
        assert!(parse_status_json(&v).needs_login());
    }

    #[test]
    fn text_fallback_does_not_take_disconnected_for_connected() {
        let p = parse_status_text("Daemon status: Connected\nManagement: Disconnected\nSignal: Connected\n");
        assert!(!p.connected());
        let p = parse_status_text(
            "OS: linux/amd64\nDaemon version: 0.36.5\nCLI version: 0.36.5\nManagement: Connected\n\
             Signal: Connected\nFQDN: edge-1.netbird.cloud\nNetBird IP: 100.64.0.10/16\nPeers count: 1/1 Connected\n",
        );
        assert!(p.connected());
        assert_eq!(p.ipv4.as_deref(), Some("100.64.0.10"));
        assert_eq!(p.fqdn.as_deref(), Some("edge-1.netbird.cloud"));
    }

    #[test]
    fn debug_redacts_the_setup_key() {
        let cfg = NetbirdConfig {
            setup_key: Some("SECRET-KEY-123".into()),
            ..Default::default()
        };
        let d = format!("{cfg:?}");
        assert!(!d.contains("SECRET-KEY-123"), "{d}");
        assert!(d.contains("<redacted>"));
    }

    #[tokio::test]
    async fn disabled_and_missing_cli() {
        let nb = Netbird::new(NetbirdConfig {
            enabled: false,
            ..Default::default()
        });
        let s = nb.status().await;
        assert_eq!(
            (s.state.as_deref(), s.reason.as_deref()),
            (Some(STATE_NOT_CONFIGURED), Some(REASON_DISABLED))
        );
        assert!(!s.connected);
        let nb = Netbird::new(NetbirdConfig {
            bin: "/nonexistent/netbird".into(),
            ..Default::default()
        });
        let s = nb.status().await;
        assert_eq!(s.reason.as_deref(), Some(REASON_NOT_INSTALLED));
        assert_eq!(nb.binary_version(), None);
    }
}
