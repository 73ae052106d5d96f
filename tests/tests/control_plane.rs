//! Enrollment, heartbeat, tenancy and mTLS against the real control plane (both backends).

use anyhow::Context;
use nkudo_core::api::{
    Agent, AgentsResponse, EnrollResponse, HeartbeatResponse, HostsResponse, RenewRequest, RenewResponse,
    RevokeAgentRequest, SitesResponse,
};
use nkudo_core::version;
use nkudo_tests::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_secs(15);

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn rfc3339_secs(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("not RFC 3339: {s:?}: {e}"))
        .timestamp()
}

async fn list_agents(cp: &ControlPlane, fx: &Fixture) -> anyhow::Result<Vec<Agent>> {
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

async fn post_heartbeat(
    client: &reqwest::Client,
    cp: &ControlPlane,
    path: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(cp.url(path))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: transport error {e:?}"))
}

/// Checks an issued agent certificate against the contract; returns its info.
fn check_agent_cert(cp: &ControlPlane, cert_pem: &str, csr_pem: &str, enr: &EnrollResponse, ttl_secs: i64) -> CertInfo {
    let info = inspect_cert(cert_pem).expect("parse issued certificate");
    assert_eq!(
        info.subject_cn.as_deref(),
        Some(enr.agent_id.as_str()),
        "CN must be the agent id"
    );
    let spiffe = format!(
        "spiffe://nkudo/tenant/{}/site/{}/agent/{}",
        enr.tenant_id, enr.site_id, enr.agent_id
    );
    assert!(
        info.san_uris.contains(&spiffe),
        "SAN URIs {:?} lack {spiffe}",
        info.san_uris
    );
    assert!(info.eku_client_auth, "EKU clientAuth missing");
    assert!(!info.is_ca, "agent certificate must not be a CA");
    assert_eq!(
        info.spki_der,
        csr_spki_der(csr_pem).unwrap(),
        "certificate key is not the CSR's key"
    );
    verify_chain(cert_pem, &cp.ca_bundle_pem)
        .expect("agent certificate must chain to the CA bundle the control plane wrote");
    verify_chain(cert_pem, &enr.ca_certificate_pem)
        .expect("agent certificate must chain to the enrollment's ca_certificate_pem");
    let expected_not_after = now_secs() + ttl_secs;
    assert!(
        (info.not_after - expected_not_after).abs() <= 300,
        "not_after {} is not now + AGENT_CERT_TTL ({expected_not_after})",
        info.not_after
    );
    assert!(info.not_before <= now_secs() + 5, "not_before in the future");
    assert!(
        (rfc3339_secs(&enr.certificate_expires_at) - info.not_after).abs() <= 1,
        "certificate_expires_at {} != certificate not_after {}",
        enr.certificate_expires_at,
        info.not_after
    );
    info
}

// ---------------------------------------------------------------------------------------------------------

async fn enroll_and_heartbeat(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::builder(backend)
        .env("HEARTBEAT_INTERVAL", "7s")
        .env("AGENT_CERT_TTL", "2h")
        .start());
    let fx = bootstrap(&cp).await?;
    assert_eq!(fx.site.tenant_id, fx.tenant.id);
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    assert!(token.one_time);
    assert_eq!(token.site_id, fx.site.id);
    // DEFAULT_ENROLLMENT_TTL is 15m.
    let exp = rfc3339_secs(&token.expires_at);
    assert!(
        (exp - (now_secs() + 900)).abs() <= 60,
        "token expires_at {} is not now+15m",
        token.expires_at
    );

    let hostname = format!("edge-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (key_pem, csr_pem) = make_csr(&hostname);
    let resp = anon(&cp)
        .post(cp.url("/v1/enroll"))
        .json(&enroll_request(&token.token, &hostname, &csr_pem))
        .send()
        .await?;
    let enr: EnrollResponse = expect_json(resp, StatusCode::OK, "POST /v1/enroll").await?;
    assert_eq!(enr.tenant_id, fx.tenant.id);
    assert_eq!(enr.site_id, fx.site.id);
    assert!(!enr.agent_id.is_empty() && !enr.host_id.is_empty() && !enr.refresh_token.is_empty());
    assert_eq!(enr.heartbeat_interval_seconds, 7, "HEARTBEAT_INTERVAL=7s");
    assert_eq!(enr.heartbeat_interval_sec, 7);
    assert!(!enr.heartbeat_endpoint.is_empty());
    assert_eq!(
        pem_certs_der(&enr.ca_certificate_pem)?,
        pem_certs_der(&cp.ca_bundle_pem)?,
        "ca_certificate_pem must be the CA bundle the control plane wrote"
    );
    let cert_info = check_agent_cert(&cp, &enr.client_certificate_pem, &csr_pem, &enr, 2 * 3600);

    // The agent list shows it, with the certificate's serial.
    let agents = list_agents(&cp, &fx).await?;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let a = &agents[0];
    assert_eq!(
        (a.id.as_str(), a.site_id.as_str(), a.host_id.as_str()),
        (enr.agent_id.as_str(), fx.site_id(), enr.host_id.as_str())
    );
    assert_eq!(a.agent_version, TEST_AGENT_VERSION);
    assert!(a.revoked_at.is_none());
    assert!(
        [cert_info.serial_decimal.as_str(), cert_info.serial_hex.as_str()]
            .iter()
            .any(|s| a
                .cert_serial
                .trim_start_matches("0x")
                .trim_start_matches('0')
                .eq_ignore_ascii_case(s.trim_start_matches('0'))),
        "agent cert_serial {:?} matches neither {} nor {}",
        a.cert_serial,
        cert_info.serial_decimal,
        cert_info.serial_hex
    );

    // Heartbeat over mTLS on both routes, with the exact body the earlier agent sends.
    let agent = agent_client(&cp, &enr.client_certificate_pem, &key_pem);
    let body = legacy_heartbeat_body(&enr.agent_id);
    for path in ["/v1/heartbeat", "/agents/heartbeat"] {
        let r = post_heartbeat(&agent, &cp, path, &body).await;
        let hb: HeartbeatResponse = expect_json(r, StatusCode::OK, path).await?;
        assert_eq!(hb.next_heartbeat_seconds, 7, "{path}: next_heartbeat_seconds");
        let cp_version = version::parse(&hb.control_plane_version).context("control_plane_version")?;
        assert_eq!(
            hb.minimum_supported_agent_version,
            version::minimum_supported_agent_version(&cp_version).to_string(),
            "{path}: minimum_supported_agent_version"
        );
        assert_eq!(
            hb.agent_version_supported,
            version::is_agent_version_supported(&cp_version, TEST_AGENT_VERSION),
            "{path}: agent_version_supported for {TEST_AGENT_VERSION} on {cp_version}"
        );
        assert!(
            hb.agent_version_supported,
            "{path}: the workspace's own version must be supported"
        );
        assert!(
            !hb.rotate_certificate,
            "{path}: a fresh certificate must not need rotation"
        );
        assert!(
            (rfc3339_secs(&hb.certificate_expires_at) - cert_info.not_after).abs() <= 1,
            "{path}: certificate_expires_at"
        );
    }

    // The host shows the facts, under the certificate's site (the body's tenant/site/host ids are ignored).
    let hosts_url = cp.url(&format!("/sites/{}/hosts", fx.site_id()));
    let tc = tenant(&cp, &fx.api_key);
    let host = poll_until(POLL, "host facts and agent_state ONLINE", || async {
        let r = tc.get(&hosts_url).send().await?;
        let hosts: HostsResponse = expect_json(r, StatusCode::OK, "GET /sites/{id}/hosts").await?;
        Ok(hosts.hosts.into_iter().find(|h| {
            h.id == enr.host_id
                && h.cpu_cores_total == LEGACY_CPU_CORES
                && h.memory_bytes_total == LEGACY_MEMORY_BYTES
                && h.kvm_available
                && h.agent_state == "ONLINE"
        }))
    })
    .await?;
    assert_eq!(host.site_id, fx.site.id);
    assert_eq!(host.tenant_id, fx.tenant.id);
    assert_eq!(
        host.hostname, hostname,
        "the earlier agent sends no hostname: the enrolled one must stay"
    );
    assert!(host.agent_last_heartbeat_at.is_some());
    if let Some(id) = &host.agent_id {
        assert_eq!(id, &enr.agent_id);
    }

    let sites_url = cp.url(&format!("/tenants/{}/sites", fx.tenant_id()));
    let site = poll_until(POLL, "site ONLINE", || async {
        let r = tc.get(&sites_url).send().await?;
        let sites: SitesResponse = expect_json(r, StatusCode::OK, "GET /tenants/{id}/sites").await?;
        Ok(sites
            .sites
            .into_iter()
            .find(|s| s.id == fx.site.id && s.connectivity_state == "ONLINE"))
    })
    .await?;
    assert!(site.last_heartbeat_at.is_some());
    let agents = list_agents(&cp, &fx).await?;
    assert_eq!(agents[0].state, "ONLINE");
    assert!(agents[0].last_heartbeat_at.is_some());
    assert!(agents[0].agent_version_supported);
    Ok(())
}
both_backends!(enroll_and_heartbeat => enroll_and_heartbeat_sqlite, enroll_and_heartbeat_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn legacy_agent_rsa_enrollment(backend: Backend) -> anyhow::Result<()> {
    if !openssl_available() {
        if in_ci() {
            panic!("openssl is required for this test under CI");
        }
        print_skip("openssl unavailable");
        return Ok(());
    }
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let hostname = format!("legacy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (key_pem, csr_pem) = openssl_rsa_csr(cp.root(), &hostname)?;
    // Exactly the key set of the earlier Go agent (reference §2).
    let body = json!({
        "enrollment_token": token.token,
        "agent_version": "dev",
        "requested_hostname": hostname,
        "csr_pem": csr_pem,
        "labels": {"arch": "amd64", "os": "debian"},
        "host_fingerprint": {
            "machine_id_sha256": "5f2b7c9e0f1a4d3b8c6e2a1f0b9d8c7e6a5f4e3d2c1b0a99887766554433aa11",
            "primary_mac_sha256": "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
        },
        "bootstrap_nonce": "1700000000123456789"
    });
    // The earlier agent speaks HTTP/1.1 (its Go transport has a custom TLS config, so no HTTP/2).
    let r = anon_http1(&cp).post(cp.url("/v1/enroll")).json(&body).send().await?;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let enr: EnrollResponse = expect_json(
        r,
        StatusCode::OK,
        "POST /v1/enroll (earlier agent's body, RSA-4096 CSR, HTTP/1.1)",
    )
    .await?;
    check_agent_cert(&cp, &enr.client_certificate_pem, &csr_pem, &enr, 24 * 3600);

    // mTLS with the RSA key, over HTTP/1.1, twice on the same keep-alive connection.
    let agent = legacy_agent_client(&cp, &enr.client_certificate_pem, &key_pem);
    let r = post_heartbeat(&agent, &cp, "/v1/heartbeat", &legacy_heartbeat_body(&enr.agent_id)).await;
    let hb: HeartbeatResponse = expect_json(r, StatusCode::OK, "POST /v1/heartbeat (RSA client, HTTP/1.1)").await?;
    let r = post_heartbeat(&agent, &cp, "/v1/heartbeat", &legacy_heartbeat_body(&enr.agent_id)).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let _: HeartbeatResponse =
        expect_json(r, StatusCode::OK, "second POST /v1/heartbeat (RSA client, HTTP/1.1)").await?;
    assert!(
        !hb.agent_version_supported,
        "agent_version \"dev\" does not parse, so it is unsupported"
    );
    let tc = tenant(&cp, &fx.api_key);
    let url = cp.url(&format!("/sites/{}/hosts", fx.site_id()));
    let host = poll_until(POLL, "legacy host facts", || async {
        let hosts: HostsResponse = expect_json(tc.get(&url).send().await?, StatusCode::OK, "hosts").await?;
        Ok(hosts
            .hosts
            .into_iter()
            .find(|h| h.id == enr.host_id && h.cpu_cores_total == LEGACY_CPU_CORES))
    })
    .await?;
    assert_eq!(host.hostname, hostname, "requested_hostname must name the host");
    let agents = list_agents(&cp, &fx).await?;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].agent_version, "dev");
    assert!(!agents[0].agent_version_supported);
    Ok(())
}
both_backends!(legacy_agent_rsa_enrollment => legacy_agent_rsa_enrollment_sqlite, legacy_agent_rsa_enrollment_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn enrollment_token_errors(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    // Issued first so that its 1 s expires while the rest runs.
    let short = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), Some(1)).await?;
    let short_issued = Instant::now();
    let exp = rfc3339_secs(&short.expires_at);
    assert!(
        (exp - (now_secs() + 1)).abs() <= 2,
        "expires_in_seconds=1 gave expires_at {}",
        short.expires_at
    );

    // Reuse.
    let t1 = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let r = enroll(&cp, &t1.token, &make_csr("edge-a").1).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);
    let r = enroll(&cp, &t1.token, &make_csr("edge-b").1).await;
    expect_error(r, StatusCode::UNAUTHORIZED, "ALREADY_USED").await;

    // Unknown.
    let r = enroll(
        &cp,
        "definitely-not-a-token-0123456789abcdefghijklmnop",
        &make_csr("edge-c").1,
    )
    .await;
    expect_error(r, StatusCode::UNAUTHORIZED, "INVALID_TOKEN").await;

    // Bad CSRs do not burn the token.
    let t3 = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n";
    expect_error(
        enroll(&cp, &t3.token, garbage).await,
        StatusCode::BAD_REQUEST,
        "INVALID_CSR",
    )
    .await;
    expect_error(
        enroll(&cp, &t3.token, "not pem at all").await,
        StatusCode::BAD_REQUEST,
        "INVALID_CSR",
    )
    .await;
    let (_, good_csr) = make_csr("edge-d");
    let forged = corrupt_csr_signature(&good_csr);
    expect_error(
        enroll(&cp, &t3.token, &forged).await,
        StatusCode::BAD_REQUEST,
        "INVALID_CSR",
    )
    .await;
    // …and the token still works, here on the legacy `/enroll` route.
    let r = anon(&cp)
        .post(cp.url("/enroll"))
        .json(&enroll_request(&t3.token, "edge-d", &good_csr))
        .send()
        .await?;
    let enr: EnrollResponse = expect_json(r, StatusCode::OK, "POST /enroll after failed attempts").await?;
    assert_eq!(enr.site_id, fx.site.id);

    // Expired (wall-clock expiry: waiting is the point here).
    let wait = Duration::from_millis(2100).saturating_sub(short_issued.elapsed());
    tokio::time::sleep(wait).await;
    let r = enroll(&cp, &short.token, &make_csr("edge-e").1).await;
    expect_error(r, StatusCode::UNAUTHORIZED, "TOKEN_EXPIRED").await;

    // Exactly the two successful enrollments exist.
    let agents = list_agents(&cp, &fx).await?;
    assert_eq!(agents.len(), 2, "{agents:#?}");
    assert_healthy(&cp).await;
    Ok(())
}
both_backends!(enrollment_token_errors => enrollment_token_errors_sqlite, enrollment_token_errors_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn race_one_token(cp: &ControlPlane, fx: &Fixture, n: usize) -> anyhow::Result<()> {
    let token = issue_token(cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        // Each contender has its own client whose TLS connection is opened before the barrier, so that the
        // enroll requests leave as simultaneously as possible.
        let client = anon(cp);
        let health = cp.url("/healthz");
        let url = cp.url("/v1/enroll");
        let body = enroll_request(
            &token.token,
            &format!("race-{n}-{i}"),
            &make_csr(&format!("race-{n}-{i}")).1,
        );
        let barrier = barrier.clone();
        set.spawn(async move {
            let warm = client.get(&health).send().await.map(|r| r.status());
            barrier.wait().await;
            let r = client.post(&url).json(&body).send().await.expect("enroll transport");
            let st = r.status();
            (warm, st, r.text().await.unwrap_or_default())
        });
    }
    let mut ok = 0;
    let mut results = Vec::new();
    while let Some(res) = set.join_next().await {
        let (warm, st, body) = res?;
        assert_eq!(warm.ok(), Some(StatusCode::OK));
        if st == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(st, StatusCode::UNAUTHORIZED, "loser status: {body}");
            let e: nkudo_core::api::ErrorBody = serde_json::from_str(&body)?;
            assert_eq!(e.code, "ALREADY_USED", "loser body: {body}");
        }
        results.push((st, body));
    }
    assert_eq!(
        ok, 1,
        "{n} concurrent enrollments with one token: exactly one must succeed: {results:#?}"
    );
    Ok(())
}

async fn concurrent_enrollment(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    race_one_token(&cp, &fx, 2).await?;
    race_one_token(&cp, &fx, 8).await?;
    let agents = list_agents(&cp, &fx).await?;
    assert_eq!(agents.len(), 2, "one agent per token: {agents:#?}");
    Ok(())
}
both_backends!(concurrent_enrollment => concurrent_enrollment_sqlite, concurrent_enrollment_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn cross_tenant_isolation(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let a = bootstrap(&cp).await?;
    let b = bootstrap(&cp).await?;
    let a_agent = enroll_agent(&cp, &a, "edge-a").await?;
    let a_token = issue_token(&cp, &a.api_key, a.tenant_id(), a.site_id(), None).await?;
    let secrets = [
        a.api_key.as_str(),
        b.api_key.as_str(),
        cp.admin_key.as_str(),
        a_token.token.as_str(),
        a_agent.enrollment.refresh_token.as_str(),
    ];

    let bc = tenant(&cp, &b.api_key);
    let (ta, tb, sa, aa) = (a.tenant_id(), b.tenant_id(), a.site_id(), a_agent.agent_id());
    let attempts: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("GET A's sites", bc.get(cp.url(&format!("/tenants/{ta}/sites")))),
        ("GET hosts of A's site", bc.get(cp.url(&format!("/sites/{sa}/hosts")))),
        (
            "token for A's site via A's path",
            bc.post(cp.url(&format!("/tenants/{ta}/enrollment-tokens")))
                .json(&json!({"site_id": sa})),
        ),
        (
            "token for A's site via B's path",
            bc.post(cp.url(&format!("/tenants/{tb}/enrollment-tokens")))
                .json(&json!({"site_id": sa})),
        ),
        ("GET A's agents", bc.get(cp.url(&format!("/tenants/{ta}/agents")))),
        (
            "create a site in A",
            bc.post(cp.url(&format!("/tenants/{ta}/sites")))
                .json(&json!({"name": "intruder"})),
        ),
        (
            "revoke A's agent via A's path",
            bc.post(cp.url(&format!("/tenants/{ta}/agents/{aa}/revoke")))
                .json(&json!({})),
        ),
        (
            "revoke A's agent via B's path",
            bc.post(cp.url(&format!("/tenants/{tb}/agents/{aa}/revoke")))
                .json(&json!({})),
        ),
    ];
    for (what, req) in attempts {
        let r = req.send().await?;
        let url = r.url().to_string();
        let st = r.status();
        let body = r.text().await?;
        assert_eq!(st, StatusCode::NOT_FOUND, "{what} ({url}): {body}");
        let e: nkudo_core::api::ErrorBody = serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))?;
        assert!(!e.code.is_empty(), "{what}: {body}");
        for s in secrets {
            assert!(!body.contains(s), "{what}: the error body leaks a secret: {body}");
        }
        assert!(
            !body.contains(&a.site.name) && !body.contains(&a.tenant.slug),
            "{what}: leaks A's names: {body}"
        );
    }

    // Nothing of A changed, and both keys still work on their own tenant.
    let r = a_agent
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "A's agent must not have been revoked: {}",
        r.text().await?
    );
    let sites: SitesResponse = expect_json(
        bc.get(cp.url(&format!("/tenants/{tb}/sites"))).send().await?,
        StatusCode::OK,
        "B sites",
    )
    .await?;
    assert_eq!(
        sites.sites.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![b.site_id()]
    );
    let ac = tenant(&cp, &a.api_key);
    let sites: SitesResponse = expect_json(
        ac.get(cp.url(&format!("/tenants/{ta}/sites"))).send().await?,
        StatusCode::OK,
        "A sites",
    )
    .await?;
    assert_eq!(
        sites.sites.len(),
        1,
        "A must still have exactly its one site: {:?}",
        sites.sites
    );
    let hosts: HostsResponse = expect_json(
        ac.get(cp.url(&format!("/sites/{sa}/hosts"))).send().await?,
        StatusCode::OK,
        "A hosts",
    )
    .await?;
    assert_eq!(hosts.hosts.len(), 1);
    let agents = list_agents(&cp, &a).await?;
    assert!(agents.iter().all(|x| x.revoked_at.is_none()));
    // B's own listing does not show A's agent.
    assert!(list_agents(&cp, &b).await?.is_empty());
    Ok(())
}
both_backends!(cross_tenant_isolation => cross_tenant_isolation_sqlite, cross_tenant_isolation_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn mtls_refusals(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let one = enroll_agent(&cp, &fx, "edge-one").await?;
    let two = enroll_agent(&cp, &fx, "edge-two").await?;

    // No client certificate.
    for path in ["/v1/heartbeat", "/agents/heartbeat", "/v1/renew"] {
        let r = anon(&cp).post(cp.url(path)).json(&json!({})).send().await?;
        expect_error(r, StatusCode::UNAUTHORIZED, "MISSING_CLIENT_CERTIFICATE").await;
    }

    // A certificate from another CA (same CA name, the real agent id as CN): the handshake must fail.
    let rogue_ca = TestCa::new("n-kudo-agent-ca");
    let (rogue_key, rogue_cert) = rogue_ca.issue_client_cert(one.agent_id(), None);
    let rogue = agent_client(&cp, &rogue_cert, &rogue_key);
    let res = rogue.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await;
    match res {
        Err(e) => assert!(!e.is_timeout(), "expected a TLS failure, got a timeout: {e:?}"),
        Ok(r) => panic!(
            "a certificate from another CA was accepted: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ),
    }

    // Body agent_id of another agent.
    let c1 = one.client(&cp);
    let r = c1
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({"agent_id": two.agent_id()}))
        .send()
        .await?;
    expect_error(r, StatusCode::FORBIDDEN, "AGENT_ID_MISMATCH").await;
    let r = c1
        .post(cp.url("/agents/heartbeat"))
        .json(&json!({"agent_id": two.agent_id()}))
        .send()
        .await?;
    expect_error(r, StatusCode::FORBIDDEN, "AGENT_ID_MISMATCH").await;

    // Revocation reaches an already-open (keep-alive) connection: the reqwest client's pooled connection, and
    // a raw TLS connection pinned by the test.
    let r = c1
        .post(cp.url("/v1/heartbeat"))
        .json(&json!({"agent_id": one.agent_id()}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);
    let mut pinned = RawConn::connect(&cp, Some((&one.cert_pem, &one.key_pem))).await?;
    let r = pinned
        .post_json("/v1/heartbeat", &json!({"agent_id": one.agent_id()}))
        .await?;
    assert_eq!(r.status, 200, "pinned connection before revocation: {}", r.text());
    let revoke_url = cp.url(&format!("/tenants/{}/agents/{}/revoke", fx.tenant_id(), one.agent_id()));
    let r = tenant(&cp, &fx.api_key)
        .post(revoke_url)
        .json(&RevokeAgentRequest {
            reason: Some("test".into()),
        })
        .send()
        .await?;
    let revoked: Agent = expect_json(r, StatusCode::OK, "revoke").await?;
    assert_eq!(revoked.id, one.agent_id());
    assert!(
        revoked.revoked_at.is_some(),
        "revoke answer lacks revoked_at: {revoked:?}"
    );
    let r = c1.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "AGENT_REVOKED").await;
    let r = pinned.post_json("/v1/heartbeat", &json!({})).await?;
    assert_eq!(r.status, 401, "same TLS connection after revocation: {}", r.text());
    let e: nkudo_core::api::ErrorBody = serde_json::from_slice(&r.body)?;
    assert_eq!(e.code, "AGENT_REVOKED");
    assert_eq!(pinned.requests, 2);
    let r = one
        .client(&cp)
        .post(cp.url("/agents/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "AGENT_REVOKED").await;
    let (_, csr) = make_csr("edge-one");
    let r = one
        .client(&cp)
        .post(cp.url("/v1/renew"))
        .json(&RenewRequest {
            csr_pem: csr,
            ..Default::default()
        })
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "AGENT_REVOKED").await;

    // The other agent is unaffected.
    let r = two
        .client(&cp)
        .post(cp.url("/v1/heartbeat"))
        .json(&legacy_heartbeat_body(two.agent_id()))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);
    let agents = list_agents(&cp, &fx).await?;
    let find = |id: &str| agents.iter().find(|a| a.id == id).cloned().unwrap();
    assert!(find(one.agent_id()).revoked_at.is_some());
    assert!(find(two.agent_id()).revoked_at.is_none());
    assert_healthy(&cp).await;
    Ok(())
}
both_backends!(mtls_refusals => mtls_refusals_sqlite, mtls_refusals_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn certificate_renewal(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(ControlPlane::start(backend));
    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-renew").await?;
    let old_client = agent.client(&cp);
    let r = old_client.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await?);
    let old_info = inspect_cert(&agent.cert_pem)?;
    let serial_before = list_agents(&cp, &fx).await?[0].cert_serial.clone();

    // A bad CSR is refused and changes nothing.
    let r = old_client
        .post(cp.url("/v1/renew"))
        .json(&RenewRequest {
            agent_id: Some(agent.agent_id().into()),
            csr_pem: "garbage".into(),
            refresh_token: None,
        })
        .send()
        .await?;
    expect_error(r, StatusCode::BAD_REQUEST, "INVALID_CSR").await;
    // A wrong refresh token is refused.
    let (_, csr_x) = make_csr("edge-renew");
    let r = old_client
        .post(cp.url("/v1/renew"))
        .json(&RenewRequest {
            agent_id: None,
            csr_pem: csr_x,
            refresh_token: Some("not-the-refresh-token".into()),
        })
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "INVALID_REFRESH_TOKEN").await;
    let r = old_client.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "after refused renewals the old cert still works: {}",
        r.text().await?
    );

    let (new_key, new_csr) = make_csr("edge-renew");
    let r = old_client
        .post(cp.url("/v1/renew"))
        .json(&RenewRequest {
            agent_id: Some(agent.agent_id().into()),
            csr_pem: new_csr.clone(),
            refresh_token: Some(agent.enrollment.refresh_token.clone()),
        })
        .send()
        .await?;
    let renewed: RenewResponse = expect_json(r, StatusCode::OK, "POST /v1/renew").await?;
    assert!(!renewed.refresh_token.is_empty());
    let mut enr = agent.enrollment.clone();
    enr.certificate_expires_at = renewed.expires_at.clone();
    enr.ca_certificate_pem = renewed.ca_certificate_pem.clone();
    let new_info = check_agent_cert(&cp, &renewed.client_certificate_pem, &new_csr, &enr, 24 * 3600);
    assert_ne!(
        new_info.serial_hex, old_info.serial_hex,
        "renewal must issue a new serial"
    );

    let new_client = agent_client(&cp, &renewed.client_certificate_pem, &new_key);
    let r = new_client
        .post(cp.url("/v1/heartbeat"))
        .json(&legacy_heartbeat_body(agent.agent_id()))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK, "renewed certificate: {}", r.text().await?);

    // The old certificate: refused on the open connection and on a new one.
    let r = old_client.post(cp.url("/v1/heartbeat")).json(&json!({})).send().await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "CERTIFICATE_SERIAL_MISMATCH").await;
    let r = agent
        .client(&cp)
        .post(cp.url("/agents/heartbeat"))
        .json(&json!({}))
        .send()
        .await?;
    expect_error(r, StatusCode::UNAUTHORIZED, "CERTIFICATE_SERIAL_MISMATCH").await;

    let serial_after = list_agents(&cp, &fx).await?[0].cert_serial.clone();
    assert_ne!(serial_before, serial_after, "the agent's recorded serial must change");
    Ok(())
}
both_backends!(certificate_renewal => certificate_renewal_sqlite, certificate_renewal_postgres);
