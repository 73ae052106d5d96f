//! Certificate renewal before expiry: with one-minute agent certificates the control plane asks for rotation
//! after two thirds of the lifetime; the running agent makes a new key and CSR, renews over `POST /v1/renew`,
//! writes the new key (0600) and certificate, rotates its refresh token, and keeps heartbeating with the new
//! certificate while the old one is refused.

use nkudo_core::api::{Agent, AgentsResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

async fn agent(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Agent> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/tenants/{}/agents", fx.tenant_id())))
        .send()
        .await?;
    let mut a = expect_json::<AgentsResponse>(r, StatusCode::OK, "GET agents")
        .await?
        .agents;
    anyhow::ensure!(a.len() == 1, "{a:#?}");
    Ok(a.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_renews_its_certificate_before_expiry() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).env("AGENT_CERT_TTL", "1m").start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-renew")?;
    host.enroll(&cp, &fx).await?;
    let old_cert = std::fs::read_to_string(host.pki_dir.join("client.crt"))?;
    let old_key = std::fs::read_to_string(host.pki_dir.join("client.key"))?;
    let old_refresh = host.state()?["identity"]["refresh_token"].clone();
    let first = agent(&cp, &fx).await?;
    host.spawn(&cp)?;

    // Rotation is due after 40 s of a 60 s certificate.
    let renewed = poll_until(Duration::from_secs(75), "a renewed certificate", || async {
        let a = agent(&cp, &fx).await?;
        Ok((a.cert_serial != first.cert_serial).then_some(a))
    })
    .await?;
    assert!(renewed.cert_expires_at > first.cert_expires_at);
    poll_until(Duration::from_secs(10), "new files on disk", || async {
        let c = std::fs::read_to_string(host.pki_dir.join("client.crt"))?;
        Ok((c != old_cert).then_some(()))
    })
    .await?;
    let new_key = std::fs::read_to_string(host.pki_dir.join("client.key"))?;
    assert_ne!(new_key, old_key, "a new key for every renewal");
    let mode = std::fs::metadata(host.pki_dir.join("client.key"))?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_ne!(
        host.state()?["identity"]["refresh_token"],
        old_refresh,
        "refresh token rotated"
    );
    assert!(!host.pki_dir.join("client.key.next").exists() && !host.pki_dir.join("client.crt.next").exists());

    // The old certificate is refused; the agent goes on with the new one.
    let old = agent_client(&cp, &old_cert, &old_key);
    let r = old
        .post(cp.url("/v1/heartbeat"))
        .json(&serde_json::json!({}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    wait_heartbeats(&cp, &fx, 2).await?;
    assert!(host.is_running());
    assert!(host.log().contains("certificate renewed"), "{}", host.log_tail(3000));
    let status = host.stop().await?;
    assert!(status.success(), "{status}");
    Ok(())
}
