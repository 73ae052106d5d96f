//! The NetBird module against `mock-netbird`: status parsing, joins (key only in the environment), backoff,
//! failure modes and probes against a local http server.

mod common;

use common::*;
use nkudo_edge::netbird::{self, Netbird, NetbirdConfig, Probe};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "A1B2C3D4-SETUP-KEY-0000-SECRET";

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let state = root.join("nb.state");
    Env { _tmp: tmp, root, state }
}

impl Env {
    /// `mock-netbird` in `mode`, with its state file in this test's directory.
    fn bin(&self, mode: &str, extra: &[(&str, &str)]) -> PathBuf {
        let state = self.state.to_string_lossy().to_string();
        let mut vars = vec![("MOCK_NETBIRD_MODE", mode), ("MOCK_NETBIRD_STATE", state.as_str())];
        vars.extend_from_slice(extra);
        wrapper(&self.root, &format!("netbird-{mode}"), &mock_bin("mock-netbird"), &vars)
    }

    fn joins(&self) -> u64 {
        std::fs::read_to_string(self.root.join("nb.state.joins"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn up_log(&self) -> String {
        std::fs::read_to_string(self.root.join("nb.state.up.log")).unwrap_or_default()
    }
}

fn cfg(bin: &Path) -> NetbirdConfig {
    NetbirdConfig {
        bin: bin.to_path_buf(),
        ..Default::default()
    }
}

fn reason(s: &nkudo_core::api::NetbirdStatus) -> (&str, &str) {
    (s.state.as_deref().unwrap_or(""), s.reason.as_deref().unwrap_or(""))
}

#[tokio::test]
async fn connected_peer_reports_its_mesh_identity() {
    let e = env();
    let nb = Netbird::new(cfg(&e.bin("connected", &[])));
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_CONNECTED, netbird::REASON_READY));
    assert!(s.connected);
    assert_eq!(s.ipv4.as_deref(), Some("100.64.0.10"), "prefix length stripped");
    assert_eq!(s.peer_id.as_deref(), Some("bW9jay1lZGdlLXB1YmxpYy1rZXktMDAwMDAwMDA="));
    assert_eq!(s.fqdn.as_deref(), Some("edge-1.netbird.cloud"));
    assert_eq!(s.management_url.as_deref(), Some("https://api.netbird.io:443"));
    assert_eq!(nb.binary_version().as_deref(), Some("0.45.0-mock"));
    assert_eq!(e.joins(), 0, "a connected peer is not joined");
}

#[tokio::test]
async fn joins_with_the_key_in_the_environment_only() {
    let e = env();
    let bin = e.bin("disconnected", &[]);
    // Without a key: not configured, nothing attempted.
    let s = Netbird::new(cfg(&bin)).status().await;
    assert_eq!(
        reason(&s),
        (netbird::STATE_NOT_CONFIGURED, netbird::REASON_NOT_CONFIGURED)
    );
    assert!(!s.connected);
    assert_eq!(e.joins(), 0);
    // auto_join off: the key is not used.
    let off = NetbirdConfig {
        setup_key: Some(KEY.into()),
        auto_join: false,
        ..cfg(&bin)
    };
    assert!(!Netbird::new(off).status().await.connected);
    assert_eq!(e.joins(), 0);

    let nb = Netbird::new(NetbirdConfig {
        setup_key: Some(KEY.into()),
        management_url: Some("https://mgmt.example.test:33073".into()),
        hostname: Some("edge-7".into()),
        ..cfg(&bin)
    });
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_CONNECTED, netbird::REASON_READY));
    assert_eq!(s.ipv4.as_deref(), Some("100.64.0.10"));
    assert_eq!(e.joins(), 1);
    let log = e.up_log();
    assert!(log.contains("key_source=env"), "{log}");
    assert!(
        log.contains("--management-url https://mgmt.example.test:33073"),
        "{log}"
    );
    assert!(log.contains("--hostname edge-7"), "{log}");
    assert!(!log.contains(KEY), "the key is not in argv: {log}");
    // Connected now: no more joins.
    nb.status().await;
    assert_eq!(e.joins(), 1);
}

#[tokio::test]
async fn failed_joins_are_retried_later_with_backoff() {
    let e = env();
    let bin = e.bin("disconnected", &[("MOCK_NETBIRD_JOIN_FAILS", "2")]);
    let nb = Netbird::new(NetbirdConfig {
        setup_key: Some(KEY.into()),
        ..cfg(&bin)
    })
    .with_join_backoff(Duration::from_millis(300), Duration::from_secs(5));
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_JOIN_FAILED));
    assert_eq!(e.joins(), 1);
    // Within the backoff: no new attempt, the reason stays.
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_JOIN_FAILED));
    assert_eq!(e.joins(), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    nb.status().await;
    assert_eq!(e.joins(), 2, "retried after the first backoff");
    // The second wait is doubled (600 ms): 350 ms later nothing happens yet.
    tokio::time::sleep(Duration::from_millis(350)).await;
    nb.status().await;
    assert_eq!(e.joins(), 2, "backoff doubles");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = nb.status().await;
    assert_eq!(e.joins(), 3);
    assert_eq!(
        reason(&s),
        (netbird::STATE_CONNECTED, netbird::REASON_READY),
        "the third join succeeds"
    );

    let e = env();
    let nb = Netbird::new(NetbirdConfig {
        setup_key: Some(KEY.into()),
        ..cfg(&e.bin("join-fails", &[]))
    })
    .with_join_backoff(Duration::from_millis(10), Duration::from_millis(10));
    for _ in 0..3 {
        let s = nb.status().await;
        assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_JOIN_FAILED));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(e.joins(), 3, "joins go on, not only on the first tick");
}

#[tokio::test]
async fn daemon_down_missing_cli_and_disabled() {
    let e = env();
    let s = Netbird::new(cfg(&e.bin("daemon-down", &[]))).status().await;
    assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_SERVICE_DOWN));
    let s = Netbird::new(cfg(&e.bin("not-installed-like", &[]))).status().await;
    assert_eq!(
        reason(&s),
        (netbird::STATE_NOT_CONFIGURED, netbird::REASON_NOT_INSTALLED)
    );
    let s = Netbird::new(cfg(&e.root.join("no-netbird-here"))).status().await;
    assert_eq!(
        reason(&s),
        (netbird::STATE_NOT_CONFIGURED, netbird::REASON_NOT_INSTALLED)
    );
    let s = Netbird::new(NetbirdConfig {
        enabled: false,
        ..cfg(&e.bin("connected", &[]))
    })
    .status()
    .await;
    assert_eq!(reason(&s), (netbird::STATE_NOT_CONFIGURED, netbird::REASON_DISABLED));
    // A daemon that is down and a key: the join is tried, and its failure is what counts.
    let s = Netbird::new(NetbirdConfig {
        setup_key: Some(KEY.into()),
        ..cfg(&e.bin("daemon-down", &[]))
    })
    .status()
    .await;
    assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_JOIN_FAILED));
}

/// A one-route http server on 127.0.0.1 answering `status`; returns its address and the requests it saw.
async fn http_server(status: u16) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen2
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn probes_decide_between_ready_and_degraded() {
    let e = env();
    let bin = e.bin("connected", &[]);
    let (ok_addr, seen) = http_server(204).await;
    let nb = Netbird::new(NetbirdConfig {
        probe: Some(Probe::http(format!("{ok_addr}/healthz"))),
        ..cfg(&bin)
    });
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_CONNECTED, netbird::REASON_READY));
    let req = seen.lock().unwrap().join("\n");
    assert!(req.starts_with("GET /healthz HTTP/1.1"), "{req}");
    assert!(req.contains(netbird::PROBE_USER_AGENT), "{req}");

    let (bad_addr, _) = http_server(503).await;
    let probe = Probe::http(format!("http://{bad_addr}/"));
    let nb = Netbird::new(NetbirdConfig {
        probe: Some(probe.clone()),
        ..cfg(&bin)
    });
    let s = nb.status().await;
    assert_eq!(reason(&s), (netbird::STATE_DEGRADED, netbird::REASON_PROBE_FAILED));
    assert!(s.ipv4.is_some(), "the mesh identity is still reported");
    // A wider accepted range makes 503 fine.
    let wide = Probe {
        http_status_min: 200,
        http_status_max: 599,
        ..probe
    };
    assert_eq!(netbird::run_probe(&wide).await.as_deref(), Ok("status=503"));
    // Nothing listening: refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    assert!(netbird::run_probe(&Probe::http(closed)).await.is_err());
    assert!(
        netbird::run_probe(&Probe::http("https://127.0.0.1:1/")).await.is_err(),
        "only http"
    );
    // A probe is not run when the peer is not connected: the mesh state decides first.
    let s = Netbird::new(NetbirdConfig {
        probe: Some(Probe::http(ok_addr)),
        ..cfg(&e.bin("disconnected", &[]))
    })
    .status()
    .await;
    assert_eq!(
        reason(&s),
        (netbird::STATE_NOT_CONFIGURED, netbird::REASON_NOT_CONFIGURED)
    );
}

#[tokio::test]
async fn ping_probe() {
    if std::process::Command::new("ping").arg("-V").output().is_err() {
        eprintln!("SKIPPED: no ping binary (Debian package iputils-ping)");
        return;
    }
    let ok = Probe {
        timeout: Duration::from_secs(2),
        ..Probe::ping("127.0.0.1")
    };
    assert!(netbird::run_probe(&ok).await.is_ok(), "ping 127.0.0.1");
    let bad = Probe {
        timeout: Duration::from_secs(1),
        ..Probe::ping("no-such-host.invalid")
    };
    assert!(netbird::run_probe(&bad).await.is_err());
}
