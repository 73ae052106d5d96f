//! Agent CA and server certificate rotation with no agent orphaned (docs/control-plane.md, "Rotating
//! certificates"), against the real control plane and the real `nkudo-edge` agent.
//!
//! The control plane runs with persistent PKI files at fixed paths whose contents the test swaps between
//! restarts, as an operator does: `CA_CERT_FILE`/`CA_KEY_FILE`, `AGENT_CA_PREVIOUS_CERT_FILES` and
//! `SERVER_CERT_FILE`/`SERVER_KEY_FILE`. The old CA A and the new CA B carry the very same name.
//!
//! * stage 0: A issues, the server certificate is A's; the agent enrolls and trusts the A bundle only.
//! * stage 1: B current, A previous, server certificate unchanged. The agent's A certificate is still
//!   accepted; the heartbeat answer asks it to renew (long certificate lifetime: not because of expiry); it
//!   renews, gets a B certificate and stores the bundle B + A. A straggler (an agent that does not renew) is
//!   still served and counted by `nkudo_agent_heartbeats_by_ca_total{ca="previous"}`.
//! * stage 2: the server certificate comes from B: the renewed agent goes on; a client that only trusts the
//!   A bundle cannot verify the server any more, and `/admin/agents` names the straggler as the agent whose
//!   certificate was issued before stage 1.
//! * stage 3: A is dropped: the bundle is B alone, the agent goes on, the straggler's A certificate is refused
//!   at the handshake, as is a certificate from an unknown CA at every stage.

use nkudo_core::api::{Agent, AgentsResponse, HeartbeatResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Both CAs get this name (a rotation often keeps it).
const CA_NAME: &str = "n-kudo rotation agent CA";

/// The PKI files the control plane reads at start-up.
struct PkiFiles {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    previous: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl PkiFiles {
    fn new(dir: &Path) -> PkiFiles {
        PkiFiles {
            ca_cert: dir.join("agent-ca.crt"),
            ca_key: dir.join("agent-ca.key"),
            previous: dir.join("agent-ca-previous.pem"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        }
    }

    /// Writes the files of one stage: the issuing CA, the previous CAs (the current one alone means none: it
    /// is ignored there) and the server certificate chain (leaf + issuer) with its key.
    fn write(&self, current: &TestCa, previous: &[&TestCa], server: &(String, String), server_ca: &TestCa) {
        std::fs::write(&self.ca_cert, current.cert_pem()).expect("write CA");
        std::fs::write(&self.ca_key, current.key_pem()).expect("write CA key");
        let previous: String = if previous.is_empty() {
            current.cert_pem()
        } else {
            previous.iter().map(|ca| ca.cert_pem()).collect()
        };
        std::fs::write(&self.previous, previous).expect("write previous CAs");
        let (key, cert) = server;
        std::fs::write(&self.server_cert, format!("{cert}{}", server_ca.cert_pem())).expect("write server cert");
        std::fs::write(&self.server_key, key).expect("write server key");
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Whether the first certificate of `cert_pem` was issued by `ca` (signature checked).
fn issued_by(cert_pem: &str, ca: &TestCa) -> bool {
    verify_chain(cert_pem, &ca.cert_pem()).is_ok()
}

/// The DER certificates of a PEM bundle.
fn ders(pem: &str) -> Vec<Vec<u8>> {
    pem_certs_der(pem).expect("PEM bundle")
}

/// `nkudo_agent_heartbeats_by_ca_total{ca="<ca>"}` from `/metrics`.
async fn heartbeats_by_ca(cp: &ControlPlane, ca: &str) -> anyhow::Result<f64> {
    let text = anon(cp).get(cp.url("/metrics")).send().await?.text().await?;
    let prefix = format!("nkudo_agent_heartbeats_by_ca_total{{ca=\"{ca}\"}} ");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .ok_or_else(|| anyhow::anyhow!("no {prefix:?} in /metrics"))?;
    Ok(line.trim().parse()?)
}

async fn fleet(cp: &ControlPlane) -> anyhow::Result<Vec<Agent>> {
    let r = admin(cp).get(cp.url("/admin/agents")).send().await?;
    Ok(expect_json::<AgentsResponse>(r, StatusCode::OK, "GET /admin/agents")
        .await?
        .agents)
}

/// The agents `/admin/agents` shows with a certificate issued before `rotation_started` (so by the old CA):
/// a certificate lives exactly AGENT_CERT_TTL, so it expires before `rotation_started + ttl`.
async fn agents_on_the_old_ca(
    cp: &ControlPlane,
    rotation_started: chrono::DateTime<chrono::Utc>,
    ttl: chrono::Duration,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for a in fleet(cp).await? {
        let expires = chrono::DateTime::parse_from_rfc3339(&a.cert_expires_at)?;
        if a.revoked_at.is_none() && expires < rotation_started + ttl {
            ids.push(a.id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// One heartbeat with a raw agent certificate; `Err` when the TLS handshake (or the request) fails.
async fn raw_heartbeat(
    cp: &ControlPlane,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(StatusCode, Option<HeartbeatResponse>), reqwest::Error> {
    let r = agent_client(cp, cert_pem, key_pem)
        .post(cp.url("/v1/heartbeat"))
        .json(&legacy_heartbeat_body(""))
        .send()
        .await?;
    let status = r.status();
    let body = if status == StatusCode::OK {
        Some(r.json::<HeartbeatResponse>().await?)
    } else {
        None
    };
    Ok((status, body))
}

/// A client certificate from a CA the control plane never trusted is refused at the handshake.
async fn assert_unknown_ca_refused(cp: &ControlPlane, agent_id: &str) {
    let (key, cert) = TestCa::new(CA_NAME).issue_client_cert(agent_id, None);
    let r = raw_heartbeat(cp, &cert, &key).await;
    assert!(r.is_err(), "a certificate from an unknown CA was accepted: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ca_and_server_certificate_rotation_orphans_no_agent() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let files_dir = TempDir::new("nkudo-ca-rotation")?;
    let files = PkiFiles::new(files_dir.path());
    let (ca_a, ca_b) = (TestCa::new(CA_NAME), TestCa::new(CA_NAME));
    let (server_a, server_b) = (ca_a.issue_server_cert(), ca_b.issue_server_cert());
    files.write(&ca_a, &[], &server_a, &ca_a);

    let port = free_port()?;
    let ttl = chrono::Duration::hours(24);
    let mut cp = start_or_skip!(edge_control_plane(Backend::Sqlite)
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("AGENT_CERT_TTL", "24h")
        .env("CA_CERT_FILE", path_str(&files.ca_cert))
        .env("CA_KEY_FILE", path_str(&files.ca_key))
        .env("AGENT_CA_PREVIOUS_CERT_FILES", path_str(&files.previous))
        .env("SERVER_CERT_FILE", path_str(&files.server_cert))
        .env("SERVER_KEY_FILE", path_str(&files.server_key))
        .start());

    // Stage 0: A issues and is the only CA of the bundle.
    assert_eq!(ders(&cp.ca_bundle_pem), ders(&ca_a.cert_pem()), "stage 0 bundle: A");
    let old_bundle = cp.ca_bundle_pem.clone();
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-ca-rotation")?;
    host.set_env("NKUDO_MAX_BACKOFF", "2s");
    let edge_id = host.enroll(&cp, &fx).await?;
    let edge_cert_0 = std::fs::read_to_string(host.pki_dir.join("client.crt"))?;
    assert!(issued_by(&edge_cert_0, &ca_a));
    assert_eq!(
        ders(&std::fs::read_to_string(host.pki_dir.join("ca.crt"))?),
        ders(&ca_a.cert_pem()),
        "the agent trusts the enrollment bundle"
    );
    host.spawn(&cp)?;
    wait_heartbeats(&cp, &fx, 2).await?;
    // The straggler: another tenant's agent that will never renew (an agent offline during the rotation).
    let fx2 = bootstrap(&cp).await?;
    let straggler = enroll_agent(&cp, &fx2, "straggler").await?;
    assert!(issued_by(&straggler.cert_pem, &ca_a));
    let (status, hb) = raw_heartbeat(&cp, &straggler.cert_pem, &straggler.key_pem).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !hb.expect("answer").rotate_certificate,
        "no rotation without a previous CA"
    );
    assert_unknown_ca_refused(&cp, &edge_id).await;

    // Stage 1: B current, A previous, the server certificate unchanged (A's).
    // In whole seconds, as certificate times are: a certificate issued from now on expires at or after
    // `rotation_started + ttl` even when it is issued within this second. The pause puts the stage 0
    // certificates into an earlier second (in production, minutes lie between enrollment and rotation).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotation_started =
        chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).expect("a representable time");
    files.write(&ca_b, &[&ca_a], &server_a, &ca_a);
    cp.restart().await?;
    assert_eq!(
        ders(&cp.ca_bundle_pem),
        [ders(&ca_b.cert_pem()), ders(&ca_a.cert_pem())].concat(),
        "stage 1 bundle: B then A"
    );
    // The agent renews at its next heartbeat, without waiting for expiry, and stores the new bundle.
    let edge_cert_1 = poll_until(Duration::from_secs(30), "the agent's certificate from B", || async {
        let c = std::fs::read_to_string(host.pki_dir.join("client.crt"))?;
        Ok(issued_by(&c, &ca_b).then_some(c))
    })
    .await?;
    assert!(!issued_by(&edge_cert_1, &ca_a), "issued by B only");
    let info = inspect_cert(&edge_cert_1)?;
    assert_eq!(info.subject_cn.as_deref(), Some(edge_id.as_str()));
    assert!(
        info.not_after - chrono::Utc::now().timestamp() > 23 * 3600,
        "a full 24 h certificate"
    );
    poll_until(Duration::from_secs(10), "the agent's new CA bundle", || async {
        let bundle = std::fs::read_to_string(host.pki_dir.join("ca.crt"))?;
        Ok((ders(&bundle) == ders(&cp.ca_bundle_pem)).then_some(()))
    })
    .await?;
    wait_heartbeats(&cp, &fx, 2).await?;
    assert!(
        host.log()
            .contains("trusted CA bundle updated from the renewal answer (2 certificate(s))"),
        "{}",
        host.log_tail(3000)
    );
    // The straggler's A certificate is still served, and told to renew; the metric counts it.
    let before = heartbeats_by_ca(&cp, "previous").await?;
    let (status, hb) = raw_heartbeat(&cp, &straggler.cert_pem, &straggler.key_pem).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        hb.expect("answer").rotate_certificate,
        "a previous CA's certificate is renewed at once"
    );
    assert_eq!(heartbeats_by_ca(&cp, "previous").await?, before + 1.0);
    assert!(
        heartbeats_by_ca(&cp, "current").await? >= 1.0,
        "the renewed agent heartbeats on B"
    );
    assert_unknown_ca_refused(&cp, &edge_id).await;

    // Stage 2: the server certificate from B.
    files.write(&ca_b, &[&ca_a], &server_b, &ca_b);
    cp.restart().await?;
    assert_eq!(
        ders(&cp.ca_bundle_pem),
        [ders(&ca_b.cert_pem()), ders(&ca_a.cert_pem())].concat(),
        "stage 2 bundle: B then A (the server chain ends at B)"
    );
    let current_before = heartbeats_by_ca(&cp, "current").await?;
    wait_heartbeats(&cp, &fx, 2).await?;
    assert!(heartbeats_by_ca(&cp, "current").await? >= current_before + 2.0);
    // A client that only trusts the enrollment bundle (A) cannot verify the server any more: that is what
    // would orphan an agent that never renewed. The check before dropping A names the straggler only.
    let a_only = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(old_bundle.as_bytes())?)
        .build()?;
    let r = a_only.get(cp.url("/healthz")).send().await;
    assert!(r.is_err(), "the B server certificate verified with the A bundle: {r:?}");
    assert_eq!(
        agents_on_the_old_ca(&cp, rotation_started, ttl).await?,
        vec![straggler.agent_id().to_string()],
        "/admin/agents: the agents still on the old CA (the renewed agent is {edge_id}, renewed from {})",
        rotation_started.to_rfc3339()
    );
    assert_unknown_ca_refused(&cp, &edge_id).await;

    // Stage 3: A dropped.
    files.write(&ca_b, &[], &server_b, &ca_b);
    cp.restart().await?;
    assert_eq!(ders(&cp.ca_bundle_pem), ders(&ca_b.cert_pem()), "stage 3 bundle: B");
    wait_heartbeats(&cp, &fx, 2).await?;
    let r = raw_heartbeat(&cp, &straggler.cert_pem, &straggler.key_pem).await;
    assert!(r.is_err(), "an A certificate was accepted after A was dropped: {r:?}");
    assert_unknown_ca_refused(&cp, &edge_id).await;
    assert_eq!(heartbeats_by_ca(&cp, "previous").await?, 0.0);
    // The agent went through all four starts on its first certificate's renewal only.
    assert_eq!(
        std::fs::read_to_string(host.pki_dir.join("client.crt"))?,
        edge_cert_1,
        "one renewal for the whole rotation"
    );
    assert!(host.is_running(), "{}", host.log_tail(3000));
    let edge = fleet(&cp)
        .await?
        .into_iter()
        .find(|a| a.id == edge_id)
        .expect("agent listed");
    assert_eq!(edge.state, "ONLINE");
    assert_eq!(
        edge.cert_serial.trim_start_matches('0'),
        inspect_cert(&edge_cert_1)?.serial_hex,
        "the control plane knows the B certificate"
    );
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    eprintln!("CA rotation scenario took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
