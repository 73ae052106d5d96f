//! Audit chain verification, restart with persisted state, and production-mode start-up checks.

use anyhow::Context;
use nkudo_core::api::{Agent, TenantsResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Row;
use std::time::Duration;

fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn contains_word(haystack: &str, word: &str) -> bool {
    haystack.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == word)
}

/// Bootstrap, enroll, revoke, two auth failures; then stop the control plane (SIGTERM, exit 0).
async fn audited_history(backend: Backend) -> anyhow::Result<Option<(ControlPlane, Fixture)>> {
    let Some(mut cp) = ControlPlane::start(backend).await? else {
        return Ok(None);
    };
    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-audit").await?;
    let _second = enroll_agent(&cp, &fx, "edge-audit-2").await?;
    let r = tenant(&cp, &fx.api_key)
        .post(cp.url(&format!(
            "/tenants/{}/agents/{}/revoke",
            fx.tenant_id(),
            agent.agent_id()
        )))
        .json(&json!({"reason": "audit test"}))
        .send()
        .await?;
    let _: Agent = expect_json(r, StatusCode::OK, "revoke").await?;
    // Auth failures: a wrong admin key and the revoked agent.
    let r = anon(&cp)
        .get(cp.url("/tenants"))
        .header("X-Admin-Key", "wrong-key-wrong-key-wrong-key-wrong-key")
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "INVALID_ADMIN_KEY").await;
    let r = agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "AGENT_REVOKED").await;
    let st = cp.stop().await?;
    assert!(st.success(), "SIGTERM must end the control plane with exit 0, got {st}");
    Ok(Some((cp, fx)))
}

struct AuditRow {
    tenant_id: String,
    seq: i64,
    action: String,
}

async fn audit_rows(cp: &ControlPlane) -> anyhow::Result<Vec<AuditRow>> {
    let mut db = connect_db(cp.db(), &cp.data_dir).await?;
    let rows = sqlx::query(
        "SELECT COALESCE(tenant_id, '') AS tenant_id, seq, action FROM audit_events ORDER BY tenant_id, seq",
    )
    .fetch_all(&mut db)
    .await
    .context("read audit_events")?;
    rows.iter()
        .map(|r| {
            Ok(AuditRow {
                tenant_id: r.try_get("tenant_id")?,
                seq: r.try_get("seq")?,
                action: r.try_get("action")?,
            })
        })
        .collect()
}

/// The middle event of the tenant's chain (neither its first nor its last).
fn middle_of_chain<'a>(rows: &'a [AuditRow], tenant_id: &str) -> &'a AuditRow {
    let chain: Vec<&AuditRow> = rows.iter().filter(|r| r.tenant_id == tenant_id).collect();
    assert!(
        chain.len() >= 3,
        "tenant {tenant_id} should have at least 3 audit events (site, token, enrollment, revocation…), has {:?}",
        chain.iter().map(|r| (&r.seq, &r.action)).collect::<Vec<_>>()
    );
    chain[chain.len() / 2]
}

fn check_uuid(s: &str) -> &str {
    assert!(
        s.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "unexpected tenant id {s:?}"
    );
    s
}

async fn audit_verify_detects_update(backend: Backend) -> anyhow::Result<()> {
    let Some((cp, fx)) = audited_history(backend).await? else {
        return Ok(());
    };
    let out = cp.run_cli(["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify on an untouched database must exit 0\n{}",
        output_text(&out)
    );

    let rows = audit_rows(&cp).await?;
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert!(
        actions.iter().any(|a| a.contains("enroll")),
        "no enrollment audit event in {actions:?}"
    );
    assert!(
        actions.iter().any(|a| a.contains("revoke")),
        "no revocation audit event in {actions:?}"
    );
    let victim = middle_of_chain(&rows, fx.tenant_id());
    let (tid, seq) = (check_uuid(&victim.tenant_id).to_string(), victim.seq);
    let mut db = connect_db(cp.db(), &cp.data_dir).await?;
    let id: Option<String> = sqlx::query(&format!(
        "SELECT CAST(id AS TEXT) AS id FROM audit_events WHERE tenant_id = '{tid}' AND seq = {seq}"
    ))
    .fetch_one(&mut db)
    .await
    .ok()
    .and_then(|r| r.try_get::<String, _>("id").ok());
    let n = sqlx::query(&format!(
        "UPDATE audit_events SET action = 'tenant.delete' WHERE tenant_id = '{tid}' AND seq = {seq}"
    ))
    .execute(&mut db)
    .await?
    .rows_affected();
    assert_eq!(n, 1);
    drop(db);

    let out = cp.run_cli(["audit", "verify"]);
    let text = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "audit verify must exit 1 after an UPDATE of event {tid}/{seq}\n{text}"
    );
    let named = id.as_deref().is_some_and(|id| text.contains(id))
        || (text.contains(&tid) && contains_word(&text, &seq.to_string()));
    assert!(
        named,
        "audit verify must name the tampered event (id {id:?}, or tenant {tid} and seq {seq})\n{text}"
    );
    Ok(())
}
both_backends!(audit_verify_detects_update => audit_verify_detects_update_sqlite, audit_verify_detects_update_postgres);

async fn audit_verify_detects_delete(backend: Backend) -> anyhow::Result<()> {
    let Some((cp, fx)) = audited_history(backend).await? else {
        return Ok(());
    };
    let out = cp.run_cli(["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify on an untouched database must exit 0\n{}",
        output_text(&out)
    );
    let rows = audit_rows(&cp).await?;
    let victim = middle_of_chain(&rows, fx.tenant_id());
    let (tid, seq) = (check_uuid(&victim.tenant_id).to_string(), victim.seq);
    let mut db = connect_db(cp.db(), &cp.data_dir).await?;
    let n = sqlx::query(&format!(
        "DELETE FROM audit_events WHERE tenant_id = '{tid}' AND seq = {seq}"
    ))
    .execute(&mut db)
    .await?
    .rows_affected();
    assert_eq!(n, 1);
    drop(db);
    let out = cp.run_cli(["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "audit verify must exit 1 after a DELETE of event {tid}/{seq}\n{}",
        output_text(&out)
    );
    Ok(())
}
both_backends!(audit_verify_detects_delete => audit_verify_detects_delete_sqlite, audit_verify_detects_delete_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn restart_keeps_state(backend: Backend) -> anyhow::Result<()> {
    let mut cp = start_or_skip!(ControlPlane::builder(backend).server_generated_admin_key().start());
    // Dev mode: the generated key is printed once and kept in <data>/admin.key with mode 0600.
    let printed = cp.admin_key_printed.clone().context("no `admin key:` line")?;
    assert!(
        !printed.starts_with("stored in"),
        "first start must print the generated key, printed {printed:?}"
    );
    let key_file = cp.data_dir.join("admin.key");
    assert_eq!(std::fs::read_to_string(&key_file)?.trim(), cp.admin_key);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin.key mode {mode:o}");
    }
    let first_key = cp.admin_key.clone();
    let first_bundle = cp.ca_bundle_pem.clone();

    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-restart").await?;
    let r = agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&legacy_heartbeat_body(agent.agent_id()))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);

    let st = cp.stop().await?;
    assert!(st.success(), "SIGTERM must end the control plane with exit 0, got {st}");
    let lines_before = cp.stdout_lines().len();
    cp.restart().await?;

    let printed = cp
        .admin_key_printed
        .clone()
        .context("no `admin key:` line on restart")?;
    assert!(
        printed.starts_with("stored in"),
        "a restart must not print the key again, printed {printed:?}"
    );
    assert!(
        !cp.stdout_lines()
            .iter()
            .skip(lines_before)
            .any(|l| l.contains(&first_key)),
        "the key was printed again"
    );
    assert_eq!(cp.admin_key, first_key, "the admin key must survive a restart");
    assert_eq!(
        pem_certs_der(&cp.ca_bundle_pem)?,
        pem_certs_der(&first_bundle)?,
        "the dev CA bundle must survive a restart"
    );

    // The same agent certificate still works (dev PKI persisted), the admin key and the API key too.
    let r = agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&legacy_heartbeat_body(agent.agent_id()))
        .send()
        .await?;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "agent certificate after restart: {}",
        r.text().await?
    );
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(first_bundle.as_bytes())?)
        .build()?;
    let r = client
        .get(cp.url("/tenants"))
        .header("X-Admin-Key", &first_key)
        .send()
        .await?;
    let tenants: TenantsResponse = expect_json(
        r,
        StatusCode::OK,
        "GET /tenants with the first admin key, trusting the first bundle",
    )
    .await?;
    assert!(tenants.tenants.iter().any(|t| t.id == fx.tenant.id));
    let r = tenant(&cp, &fx.api_key)
        .get(cp.url(&format!("/tenants/{}/agents", fx.tenant_id())))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    // The CLI on the same data dir and database works too.
    let out = cp.run_cli(["migrate"]);
    assert!(
        out.status.success(),
        "migrate on an up-to-date database:\n{}",
        output_text(&out)
    );
    Ok(())
}
both_backends!(restart_keeps_state => restart_keeps_state_sqlite, restart_keeps_state_postgres);

// ---------------------------------------------------------------------------------------------------------
// Production mode (REQUIRE_PERSISTENT_PKI=true). SQLite only: this is about start-up checks.

const LONG_KEY: &str = "prod-admin-key-0123456789abcdefghijklmnopqrstuv";
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

struct PkiFiles {
    ca: TestCa,
    dir: TempDir,
}

impl PkiFiles {
    fn new() -> anyhow::Result<PkiFiles> {
        let ca = TestCa::new("prod-agent-ca");
        let dir = TempDir::new("nkudo-pki")?;
        let (skey, scert) = ca.issue_server_cert();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())?;
        std::fs::write(dir.path().join("ca.key"), ca.key_pem())?;
        std::fs::write(dir.path().join("server.crt"), scert)?;
        std::fs::write(dir.path().join("server.key"), skey)?;
        Ok(PkiFiles { ca, dir })
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn apply(&self, b: ControlPlaneBuilder) -> ControlPlaneBuilder {
        b.env("CA_CERT_FILE", self.path("ca.crt"))
            .env("CA_KEY_FILE", self.path("ca.key"))
            .env("SERVER_CERT_FILE", self.path("server.crt"))
            .env("SERVER_KEY_FILE", self.path("server.key"))
    }
}

async fn expect_refusal(b: ControlPlaneBuilder, what: &str, mentions: &[&str]) -> anyhow::Result<()> {
    let prepared = b
        .env("REQUIRE_PERSISTENT_PKI", "true")
        .prepare()
        .await?
        .expect("sqlite is always available");
    let out = prepared.run_expect_exit(EXIT_TIMEOUT).await?;
    let text = output_text(&out);
    assert!(!out.status.success(), "{what}: start-up must be refused\n{text}");
    assert!(
        mentions
            .iter()
            .any(|m| text.to_ascii_lowercase().contains(&m.to_ascii_lowercase())),
        "{what}: the message must name the problem (one of {mentions:?})\n{text}"
    );
    assert!(
        !text.contains("listening:"),
        "{what}: it must not have listened\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_mode_refuses_unsafe_start_sqlite() -> anyhow::Result<()> {
    let pki = PkiFiles::new()?;
    let base = || ControlPlane::builder(Backend::Sqlite);
    expect_refusal(
        base().admin_key(LONG_KEY),
        "no PKI files",
        &["CA_CERT_FILE", "SERVER_CERT_FILE", "REQUIRE_PERSISTENT_PKI"],
    )
    .await?;
    expect_refusal(
        base()
            .admin_key(LONG_KEY)
            .env("CA_CERT_FILE", pki.path("ca.crt"))
            .env("CA_KEY_FILE", pki.path("ca.key")),
        "CA files but no server pair",
        &["SERVER_CERT_FILE", "SERVER_KEY_FILE"],
    )
    .await?;
    expect_refusal(
        base()
            .admin_key(LONG_KEY)
            .env("SERVER_CERT_FILE", pki.path("server.crt"))
            .env("SERVER_KEY_FILE", pki.path("server.key")),
        "server pair but no CA files",
        &["CA_CERT_FILE", "CA_KEY_FILE"],
    )
    .await?;
    expect_refusal(
        pki.apply(base()).admin_key("short-admin-key"),
        "short ADMIN_KEY",
        &["ADMIN_KEY"],
    )
    .await?;
    expect_refusal(
        pki.apply(base()).env_remove("ADMIN_KEY"),
        "missing ADMIN_KEY",
        &["ADMIN_KEY"],
    )
    .await?;
    expect_refusal(
        pki.apply(base())
            .admin_key(LONG_KEY)
            .env("CA_KEY_FILE", pki.path("does-not-exist.key")),
        "unreadable CA key file",
        &["CA_KEY_FILE", "does-not-exist.key"],
    )
    .await?;
    Ok(())
}

/// With all four files and a long key, production mode starts, serves with OUR server certificate and signs
/// agents with OUR CA; certificates of that CA that are not an agent's current one are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_mode_with_persistent_pki_sqlite() -> anyhow::Result<()> {
    let pki = PkiFiles::new()?;
    let cp = start_or_skip!(pki
        .apply(ControlPlane::builder(Backend::Sqlite))
        .admin_key(LONG_KEY)
        .env("REQUIRE_PERSISTENT_PKI", "true")
        .start());
    assert!(
        cp.admin_key_printed.as_deref().is_none_or(|l| !l.contains(LONG_KEY)),
        "the admin key must not be printed"
    );
    // Trusting only our CA reaches the server.
    let ours = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.cert_pem().as_bytes())?)
        .build()?;
    let r = ours
        .get(cp.url("/healthz"))
        .send()
        .await
        .context("TLS with the persistent server certificate")?;
    assert_eq!(r.status(), StatusCode::OK);

    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-prod").await?;
    verify_chain(&agent.cert_pem, &pki.ca.cert_pem()).context("agent certificate must be signed by CA_CERT_FILE")?;
    let r = agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);

    // Certificates of the right CA that are not a current agent certificate.
    let (k, c) = pki.ca.issue_client_cert(&uuid::Uuid::new_v4().to_string(), None);
    let r = agent_client(&cp, &c, &k)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "UNKNOWN_AGENT").await;
    let (k, c) = pki.ca.issue_client_cert(agent.agent_id(), Some(0x1234_5678));
    let r = agent_client(&cp, &c, &k)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "CERTIFICATE_SERIAL_MISMATCH").await;
    // The genuine one still works.
    let r = agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    Ok(())
}

/// `nkudo-control-plane healthcheck` (the container healthcheck of deployments/compose): exit 0 when the
/// control plane answers /readyz over TLS verified with its CA bundle; exit 1 when the certificate is not
/// trusted (another CA) or nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand() -> anyhow::Result<()> {
    let mut cp = start_or_skip!(ControlPlane::builder(Backend::Sqlite).start());
    let url = cp.url("/readyz");
    let ok = cp.run_cli(["healthcheck", "--url", url.as_str()]);
    assert_eq!(ok.status.code(), Some(0), "{}", output_text(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).starts_with("ready:"),
        "{}",
        output_text(&ok)
    );

    // A CA that did not issue the server certificate: refused by the TLS handshake.
    let other = TempDir::new("healthcheck-ca")?;
    let (key, crt) = (other.path().join("ca.key"), other.path().join("ca.crt"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-subj", "/CN=not the n-kudo CA", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()?;
    assert!(made.status.success(), "{}", output_text(&made));
    let untrusted = cp.run_cli([
        "healthcheck".as_ref(),
        "--url".as_ref(),
        url.as_str().as_ref(),
        "--ca-file".as_ref(),
        crt.as_os_str(),
    ]);
    assert_eq!(untrusted.status.code(), Some(1), "{}", output_text(&untrusted));
    assert!(String::from_utf8_lossy(&untrusted.stdout).starts_with("not ready:"));

    cp.stop().await?;
    let down = cp.run_cli(["healthcheck", "--url", url.as_str(), "--timeout", "2s"]);
    assert_eq!(down.status.code(), Some(1), "{}", output_text(&down));
    Ok(())
}
