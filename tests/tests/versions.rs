//! The N/N-1 agent version policy as the control plane applies it: enrollment refuses agents below the
//! minimum supported version, heartbeats report support, and unparsable versions are enrolled but unsupported.

use nkudo_core::api::{EnrollResponse, HeartbeatResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use serde_json::json;

async fn enroll_version(cp: &ControlPlane, fx: &Fixture, host: &str, version: &str) -> reqwest::Response {
    let token = issue_token(cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None)
        .await
        .expect("issue token");
    let (_key, csr) = make_csr(host);
    let mut req = enroll_request(&token.token, host, &csr);
    req.agent_version = version.to_string();
    anon(cp)
        .post(cp.url("/v1/enroll"))
        .json(&req)
        .send()
        .await
        .expect("POST /v1/enroll")
}

async fn version_policy(backend: Backend) -> anyhow::Result<()> {
    // A floor above the N/N-1 rule of this control plane (0.1.x supports 0.0.0 and up).
    let cp = start_or_skip!(ControlPlane::builder(backend)
        .env("MINIMUM_AGENT_VERSION", "0.1.0")
        .start());
    let fx = bootstrap(&cp).await?;

    let err = expect_error(
        enroll_version(&cp, &fx, "old-1", "0.0.9").await,
        StatusCode::BAD_REQUEST,
        "AGENT_VERSION_UNSUPPORTED",
    )
    .await;
    assert!(
        err.error.contains("0.1.0"),
        "the message names the minimum: {}",
        err.error
    );
    let err = expect_error(
        enroll_version(&cp, &fx, "old-2", "v0.0.1").await,
        StatusCode::BAD_REQUEST,
        "AGENT_VERSION_UNSUPPORTED",
    )
    .await;
    assert!(
        err.error.contains("minimum supported agent version is 0.1.0"),
        "{}",
        err.error
    );

    let ok: EnrollResponse = expect_json(
        enroll_version(&cp, &fx, "new-1", "0.1.0").await,
        StatusCode::OK,
        "enroll 0.1.0",
    )
    .await?;
    assert_eq!(ok.minimum_supported_agent_version, "0.1.0");

    // An unversioned build of the earlier agent ("dev") is enrolled, so that it can be upgraded, but reported
    // unsupported.
    let (key, csr) = make_csr("legacy-1");
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let mut req = enroll_request(&token.token, "legacy-1", &csr);
    req.agent_version = "dev".into();
    let resp = anon(&cp).post(cp.url("/v1/enroll")).json(&req).send().await?;
    let dev: EnrollResponse = expect_json(resp, StatusCode::OK, "enroll dev").await?;
    let client = agent_client(&cp, &dev.client_certificate_pem, &key);
    let hb: HeartbeatResponse = expect_json(
        client.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?,
        StatusCode::OK,
        "heartbeat without version",
    )
    .await?;
    assert!(!hb.agent_version_supported, "a 'dev' agent is not within N/N-1");
    assert_eq!(hb.minimum_supported_agent_version, "0.1.0");
    let hb: HeartbeatResponse = expect_json(
        client
            .post(cp.url("/v1/heartbeat"))
            .json(&json!({"agent_version": "0.1.3"}))
            .send()
            .await?,
        StatusCode::OK,
        "heartbeat after an upgrade",
    )
    .await?;
    assert!(hb.agent_version_supported);
    // The next heartbeat without a version keeps the upgraded one.
    let hb: HeartbeatResponse = expect_json(
        client.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?,
        StatusCode::OK,
        "heartbeat without version after upgrade",
    )
    .await?;
    assert!(hb.agent_version_supported);

    let metrics = anon(&cp).get(cp.url("/metrics")).send().await?.text().await?;
    let unsupported = metrics
        .lines()
        .find(|l| l.starts_with("nkudo_unsupported_agent_heartbeats_total "))
        .unwrap_or_else(|| panic!("no unsupported counter in {metrics}"));
    assert!(
        unsupported.ends_with(" 1"),
        "exactly one unsupported heartbeat: {unsupported}"
    );
    let refused = metrics
        .lines()
        .find(|l| l.starts_with("nkudo_enrollments_total{result=\"version_unsupported\"}"))
        .unwrap_or_else(|| panic!("no version_unsupported enrollments in {metrics}"));
    assert!(refused.ends_with(" 2"), "{refused}");
    Ok(())
}
both_backends!(version_policy => version_policy_sqlite, version_policy_postgres);

#[tokio::test]
async fn a_bad_minimum_refuses_start_up() -> anyhow::Result<()> {
    let Some(prepared) = ControlPlane::builder(Backend::Sqlite)
        .env("MINIMUM_AGENT_VERSION", "latest")
        .prepare()
        .await?
    else {
        return Ok(());
    };
    let out = prepared.run_expect_exit(std::time::Duration::from_secs(30)).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MINIMUM_AGENT_VERSION"), "{stderr}");
    Ok(())
}
