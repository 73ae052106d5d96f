//! Suite 1 of the acceptance plan, with the real agent: `nkudo-edge enroll` redeems a one-time token (trusting
//! only the CA bundle, no skip-verify), `nkudo-edge run` heartbeats over mTLS, the site goes ONLINE, the host's
//! facts and the NetBird status (stand-in, connected) reach the control plane; a reused token is refused; a
//! revoked agent stops with exit code 4.

use nkudo_core::api::{Agent, AgentsResponse};
use nkudo_tests::*;
use reqwest::StatusCode;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn agents(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Vec<Agent>> {
    let r = tenant(cp, &fx.api_key)
        .get(cp.url(&format!("/tenants/{}/agents", fx.tenant_id())))
        .send()
        .await?;
    Ok(
        expect_json::<AgentsResponse>(r, StatusCode::OK, "GET /tenants/{id}/agents")
            .await?
            .agents,
    )
}

async fn enroll_and_heartbeat(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(edge_control_plane(backend).start());
    let fx = bootstrap(&cp).await?;
    let mut host = EdgeHost::new("edge-enroll-1")?;

    // Enrollment: one-time token, key and CSR made on the host, files with their modes, identity stored.
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let out = host.enroll_output(&cp, &token.token)?;
    assert!(out.status.success(), "enroll: {}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let agent_id = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("agent_id="))
        .expect("agent_id= printed")
        .to_string();
    assert!(stdout.contains(&format!("site_id={}", fx.site_id())), "{stdout}");
    assert_eq!(mode(&host.pki_dir), 0o700);
    assert_eq!(mode(&host.pki_dir.join("client.key")), 0o600);
    assert_eq!(mode(&host.pki_dir.join("client.crt")), 0o644);
    assert_eq!(mode(&host.pki_dir.join("ca.crt")), 0o644);
    assert_eq!(mode(&host.state_dir), 0o700);
    assert_eq!(
        mode(&host.state_dir.join("edge-state.json")),
        0o600,
        "the state holds the refresh token"
    );
    let key = std::fs::read_to_string(host.pki_dir.join("client.key"))?;
    assert!(key.contains("BEGIN PRIVATE KEY"), "PKCS#8 key expected");
    let st = host.state()?;
    assert_eq!(st["identity"]["agent_id"], agent_id.as_str());
    assert_eq!(st["identity"]["site_id"], fx.site_id());
    assert!(!st["identity"]["refresh_token"].as_str().unwrap_or("").is_empty());

    // The same token again (another host): refused with ALREADY_USED, exit 1.
    let other = EdgeHost::new("edge-enroll-2")?;
    let out = other.enroll_output(&cp, &token.token)?;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ALREADY_USED"),
        "{}",
        output_text(&out)
    );
    // Enrolling this host again without --force is refused locally.
    let out = host.enroll_output(&cp, "whatever")?;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already enrolled"),
        "{}",
        output_text(&out)
    );

    // verify-heartbeat: one heartbeat, exit 0.
    let out = host.once(&cp)?;
    assert!(out.status.success(), "verify-heartbeat: {}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("heartbeat ok"),
        "{}",
        output_text(&out)
    );

    // Everything from the config file (no flags): precedence flags > environment > file > defaults.
    let cfg = host.root().join("full.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_plane = \"https://127.0.0.1:1\"\nstate_dir = {:?}\npki_dir = {:?}\nruntime_dir = {:?}\n\
             cloud_hypervisor_bin = {:?}\n[netbird]\nbin = {:?}\n",
            host.state_dir,
            host.pki_dir,
            host.runtime_dir,
            bin_path(MOCK_CH_BIN),
            bin_path(MOCK_NETBIRD_BIN)
        ),
    )?;
    // The file's control plane is wrong: the environment wins over it, a flag over both.
    let out = host
        .command(["--config"])
        .arg(&cfg)
        .arg("verify-heartbeat")
        .env("NKUDO_CONTROL_PLANE", &cp.base_url)
        .output()?;
    assert!(out.status.success(), "config file + environment: {}", output_text(&out));
    let out = host
        .command(["--config"])
        .arg(&cfg)
        .args(["verify-heartbeat", "--control-plane", &cp.base_url])
        .env("NKUDO_CONTROL_PLANE", "https://127.0.0.1:2")
        .output()?;
    assert!(out.status.success(), "flag over environment: {}", output_text(&out));
    let out = host.command(["--config"]).arg(&cfg).arg("verify-heartbeat").output()?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "the file's unreachable URL: {}",
        output_text(&out)
    );
    // --insecure-skip-verify is accepted and warns loudly (never needed here).
    let out = host
        .command(["verify-heartbeat", "--insecure-skip-verify"])
        .args(host.run_args(&cp))
        .output()?;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT verified"),
        "{}",
        output_text(&out)
    );

    // run: the site goes ONLINE; the host carries the agent's facts and NetBird status.
    host.spawn(&cp)?;
    poll_until(Duration::from_secs(30), "site ONLINE", || async {
        Ok((site_of(&cp, &fx).await?.connectivity_state == "ONLINE").then_some(()))
    })
    .await?;
    let h = poll_until(Duration::from_secs(30), "host facts and NetBird status", || async {
        let hosts = site_hosts(&cp, &fx).await?;
        Ok(hosts
            .into_iter()
            .find(|h| h.hostname == "edge-enroll-1" && h.netbird_status.is_some() && h.cpu_cores_total > 0))
    })
    .await?;
    let cores = std::thread::available_parallelism()?.get() as i64;
    assert_eq!(h.cpu_cores_total, cores, "{h:#?}");
    assert!(h.memory_bytes_total > 0 && h.storage_bytes_total > 0, "{h:#?}");
    assert!(h.cloud_hypervisor_available, "the stand-in binary is present: {h:#?}");
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert_eq!(h.kvm_available, kvm_usable, "{h:#?}");
    assert_eq!(h.agent_id.as_deref(), Some(agent_id.as_str()));
    assert_eq!(h.agent_state, "ONLINE");
    assert_eq!(h.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    assert_eq!(h.kernel_version.as_deref(), Some(kernel.trim()));
    let nb = h.netbird_status.clone().unwrap();
    assert!(nb.connected, "NetBird stand-in is connected: {nb:#?}");
    assert_eq!(nb.state.as_deref(), Some("Connected"), "{nb:#?}");
    assert!(
        nb.ipv4.as_deref().is_some_and(|ip| !ip.is_empty() && !ip.contains('/')),
        "{nb:#?}"
    );
    let a = agents(&cp, &fx).await?;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].hostname, "edge-enroll-1");
    assert!(a[0].agent_version_supported);

    // Heartbeats keep coming (1 s interval): last_heartbeat_at moves.
    let first = site_hosts(&cp, &fx).await?[0].agent_last_heartbeat_at.clone();
    poll_until(Duration::from_secs(20), "a later heartbeat", || async {
        let now = site_hosts(&cp, &fx).await?[0].agent_last_heartbeat_at.clone();
        Ok((now != first).then_some(()))
    })
    .await?;

    // Revocation: the running agent stops by itself with exit code 4 and says why.
    let r = tenant(&cp, &fx.api_key)
        .post(cp.url(&format!("/tenants/{}/agents/{agent_id}/revoke", fx.tenant_id())))
        .json(&json!({"reason": "test"}))
        .send()
        .await?;
    let _: Agent = expect_json(r, StatusCode::OK, "revoke").await?;
    let st = host.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(st.code(), Some(4), "{}", host.log_tail(3000));
    assert!(host.log().contains("AGENT_REVOKED"), "{}", host.log_tail(3000));
    Ok(())
}

both_backends!(enroll_and_heartbeat => enroll_and_heartbeat_sqlite, enroll_and_heartbeat_postgres);

/// `run` without an identity exits 3 (not enrolled) with the reference's message.
#[test]
fn run_without_identity_exits_not_enrolled() -> anyhow::Result<()> {
    let host = EdgeHost::new("edge-none")?;
    let out = host
        .command(["run", "--control-plane", "https://127.0.0.1:1", "--state-dir"])
        .arg(&host.state_dir)
        .arg("--pki-dir")
        .arg(&host.pki_dir)
        .output()?;
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run enroll first"),
        "{}",
        output_text(&out)
    );
    // A missing explicit config file is a usage error (2).
    let out = host
        .command(["--config", "/nonexistent/edge.toml", "hostfacts"])
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    // hostfacts prints indented JSON with the helper binaries.
    let out = host
        .command(["hostfacts", "--cloud-hypervisor-bin"])
        .arg(bin_path(MOCK_CH_BIN))
        .arg("--netbird-bin")
        .arg(bin_path(MOCK_NETBIRD_BIN))
        .arg("--runtime-dir")
        .arg(&host.runtime_dir)
        .output()?;
    assert!(out.status.success(), "{}", output_text(&out));
    let facts: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(facts["cpu_cores"].as_i64().unwrap_or(0) >= 1, "{facts:#}");
    assert_eq!(facts["disks"].as_array().map(|d| d.len()), Some(1), "{facts:#}");
    assert_eq!(facts["binaries"]["cloud_hypervisor"]["present"], true, "{facts:#}");
    assert_eq!(
        facts["binaries"]["cloud_hypervisor"]["version"], "v54.0.0-mock",
        "{facts:#}"
    );
    assert_eq!(facts["binaries"]["netbird"]["version"], "0.45.0-mock", "{facts:#}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\n  \""), "indented JSON");
    Ok(())
}
