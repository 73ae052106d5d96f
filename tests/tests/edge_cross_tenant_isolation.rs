//! Suite 4 of the acceptance plan, with two real agents in two tenants: tenant B's API key cannot see or touch
//! tenant A's site, plans, executions, logs or VMs (404, never a hint); B's agent never leases A's plan, cannot
//! report A's results (404) nor write A's logs (dropped), and both attempts are counted as isolation
//! violations of B; A's plan runs on A's agent only.

use nkudo_core::api::{AgentLogsRequest, LogEntry, LogIngestResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use std::time::Duration;

/// `nkudo_tenant_isolation_violations_total{tenant_id=<tenant>,kind=<kind>}` as /metrics shows it (0 when absent).
async fn violations(cp: &ControlPlane, tenant_id: &str, kind: &str) -> anyhow::Result<f64> {
    let text = anon(cp).get(cp.url("/metrics")).send().await?.text().await?;
    let want = [format!("tenant_id=\"{tenant_id}\""), format!("kind=\"{kind}\"")];
    Ok(text
        .lines()
        .filter(|l| l.starts_with("nkudo_tenant_isolation_violations_total{"))
        .filter(|l| want.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn agent_http(cp: &ControlPlane, host: &EdgeHost) -> anyhow::Result<reqwest::Client> {
    let cert = std::fs::read_to_string(host.pki_dir.join("client.crt"))?;
    let key = std::fs::read_to_string(host.pki_dir.join("client.key"))?;
    Ok(agent_client(cp, &cert, &key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_tenant_isolation_rejected() -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let a = bootstrap(&cp).await?;
    let b = bootstrap(&cp).await?;
    let mut host_a = EdgeHost::new("edge-tenant-a")?;
    let mut host_b = EdgeHost::new("edge-tenant-b")?;
    host_a.enroll(&cp, &a).await?;
    let agent_b = host_b.enroll(&cp, &b).await?;
    host_b.spawn(&cp)?; // B's agent is up before A's plan exists and keeps leasing throughout

    // B's key on A's resources: 404 everywhere, including the plan apply (nothing is created).
    let vm = unique("vm");
    let req = plan_request(&unique("key"), vec![host_a.create_spec(&vm)]);
    let r = apply_raw(&cp, &b.api_key, a.site_id(), &serde_json::to_value(&req)?).await;
    expect_error(r, StatusCode::NOT_FOUND, "").await;
    let p = apply_plan(&cp, &a, &req).await?;
    let exec_id = p.executions[0].id.clone();
    let kb = tenant(&cp, &b.api_key);
    for path in [
        format!("/sites/{}/vms", a.site_id()),
        format!("/sites/{}/hosts", a.site_id()),
        format!("/sites/{}/executions", a.site_id()),
        format!("/sites/{}/plans/{}", a.site_id(), p.plan_id),
        format!("/executions/{exec_id}/logs"),
        format!("/tenants/{}/sites", a.tenant_id()),
        format!("/tenants/{}/agents", a.tenant_id()),
    ] {
        let r = kb.get(cp.url(&path)).send().await?;
        let err = expect_error(r, StatusCode::NOT_FOUND, "").await;
        assert!(
            !err.error.contains(a.tenant_id()),
            "{path}: the answer names the other tenant: {err:?}"
        );
    }
    // Even under B's own site path, A's plan id is unknown.
    let r = kb
        .get(cp.url(&format!("/sites/{}/plans/{}", b.site_id(), p.plan_id)))
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "").await;

    // B's agent (mTLS) cannot report A's execution nor write its logs.
    let before = violations(&cp, b.tenant_id(), "execution").await?;
    let b_http = agent_http(&cp, &host_b)?;
    let body = result_body(&[(exec_id.as_str(), "create", false, Some("EVIL"), Some("forged"))]);
    let r = report_raw(&cp, &b_http, &body).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let logs = AgentLogsRequest {
        agent_id: Some(agent_b.clone()),
        entries: vec![LogEntry {
            execution_id: exec_id.clone(),
            sequence: 1,
            severity: "ERROR".into(),
            message: "forged by tenant B".into(),
            ..Default::default()
        }],
    };
    let r = b_http.post(cp.url("/agents/logs")).json(&logs).send().await?;
    let ack: LogIngestResponse = expect_json(r, StatusCode::OK, "POST /agents/logs").await?;
    assert_eq!((ack.accepted_frames, ack.dropped_frames), (0, 1));
    // Both attempts are tenant isolation violations of B (the alert NkudoTenantIsolationViolation reads this).
    assert_eq!(violations(&cp, b.tenant_id(), "execution").await? - before, 2.0);
    assert_eq!(violations(&cp, a.tenant_id(), "execution").await?, 0.0);

    // B's agent has had several chances to lease: it got nothing of A's.
    wait_heartbeats(&cp, &b, 3).await?;
    assert_eq!(get_plan(&cp, &a, &p.plan_id).await?.plan_status, "PENDING");
    assert!(host_b.state()?["actions"].as_array().is_none_or(|a| a.is_empty()));
    assert!(!host_b.runtime_dir.join(&vm).exists());

    // A's agent runs A's plan; A's logs hold only A's agent's lines.
    host_a.spawn(&cp)?;
    let done = wait_plan_done(&cp, &a, &p.plan_id, Duration::from_secs(60)).await?;
    assert_eq!(done.plan_status, "SUCCEEDED", "{done:#?}");
    assert_eq!(
        done.executions[0].state, "SUCCEEDED",
        "the forged failure was not applied"
    );
    let lines = all_logs(&cp, &a.api_key, &exec_id).await?;
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| !l.message.contains("forged")), "{lines:#?}");
    assert!(host_a.runtime_dir.join(&vm).exists());
    assert!(!host_b.runtime_dir.join(&vm).exists());
    assert!(site_vms(&cp, &b).await?.is_empty());
    Ok(())
}
