//! HTTP clients (trusting only the control plane's CA bundle), bootstrap helpers and assertions.

use crate::csr::make_csr;
use crate::harness::ControlPlane;
use anyhow::{bail, Context};
use nkudo_core::api::{
    ApiKeyCreated, CreateApiKeyRequest, CreateEnrollmentTokenRequest, CreateSiteRequest, CreateTenantRequest,
    EnrollRequest, EnrollResponse, EnrollmentTokenCreated, ErrorBody, Site, Tenant,
};
use reqwest::{header, Client, ClientBuilder, Response, StatusCode};
use std::future::Future;
use std::time::Duration;

/// Per-request timeout of every harness client: a hung server fails the test instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent version our test agents report (the workspace version, the same as the control plane's).
pub const TEST_AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A client builder whose ONLY trust roots are the certificates of the control plane's CA bundle.
pub fn client_builder(cp: &ControlPlane) -> ClientBuilder {
    let roots = reqwest::Certificate::from_pem_bundle(cp.ca_bundle_pem.as_bytes()).expect("parse CA bundle PEM");
    assert!(
        !roots.is_empty(),
        "CA bundle {} holds no certificate",
        cp.ca_bundle_path.display()
    );
    let mut b = Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(10));
    for r in roots {
        b = b.add_root_certificate(r);
    }
    b
}

fn with_header(b: ClientBuilder, name: &'static str, value: &str) -> ClientBuilder {
    let mut h = header::HeaderMap::new();
    h.insert(name, header::HeaderValue::from_str(value).expect("header value"));
    b.default_headers(h)
}

/// No credentials (health, metrics, enrollment, negative tests).
pub fn anon(cp: &ControlPlane) -> Client {
    client_builder(cp).build().expect("build client")
}

/// Sends `X-Admin-Key` with the control plane's admin key.
pub fn admin(cp: &ControlPlane) -> Client {
    with_header(client_builder(cp), "X-Admin-Key", &cp.admin_key)
        .build()
        .expect("build admin client")
}

/// Sends `X-API-Key: <api_key>`.
pub fn tenant(cp: &ControlPlane, api_key: &str) -> Client {
    with_header(client_builder(cp), "X-API-Key", api_key)
        .build()
        .expect("build tenant client")
}

/// An mTLS client presenting `cert_pem` (may include a chain) with `key_pem` (PKCS#8, PKCS#1 or SEC1).
pub fn agent_client(cp: &ControlPlane, cert_pem: &str, key_pem: &str) -> Client {
    let pem = format!("{}\n{}\n", cert_pem.trim_end(), key_pem.trim_end());
    let id = reqwest::Identity::from_pem(pem.as_bytes()).expect("client identity from PEM");
    client_builder(cp).identity(id).build().expect("build agent client")
}

/// Like [`anon`], but HTTP/1.1 only, as the earlier Go agent speaks (its custom `http.Transport` with a
/// `TLSClientConfig` does not negotiate HTTP/2).
pub fn anon_http1(cp: &ControlPlane) -> Client {
    client_builder(cp).http1_only().build().expect("build HTTP/1.1 client")
}

/// Like [`agent_client`], but HTTP/1.1 only (the earlier Go agent's transport).
pub fn legacy_agent_client(cp: &ControlPlane, cert_pem: &str, key_pem: &str) -> Client {
    let pem = format!("{}\n{}\n", cert_pem.trim_end(), key_pem.trim_end());
    let id = reqwest::Identity::from_pem(pem.as_bytes()).expect("client identity from PEM");
    client_builder(cp)
        .identity(id)
        .http1_only()
        .build()
        .expect("build HTTP/1.1 agent client")
}

/// A tenant with an API key and one site.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub tenant: Tenant,
    pub api_key: String,
    pub site: Site,
}

impl Fixture {
    pub fn tenant_id(&self) -> &str {
        &self.tenant.id
    }
    pub fn site_id(&self) -> &str {
        &self.site.id
    }
}

/// An enrolled agent: its private key (never sent), its certificate and the enrollment answer.
#[derive(Debug, Clone)]
pub struct EnrolledAgent {
    pub key_pem: String,
    pub cert_pem: String,
    pub enrollment: EnrollResponse,
}

impl EnrolledAgent {
    pub fn agent_id(&self) -> &str {
        &self.enrollment.agent_id
    }
    /// A fresh mTLS client for this agent.
    pub fn client(&self, cp: &ControlPlane) -> Client {
        agent_client(cp, &self.cert_pem, &self.key_pem)
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Reads a JSON body of a success answer, failing with status and body otherwise.
pub async fn expect_json<T: serde::de::DeserializeOwned>(
    resp: Response,
    want: StatusCode,
    what: &str,
) -> anyhow::Result<T> {
    let status = resp.status();
    let body = resp.text().await.with_context(|| format!("{what}: read body"))?;
    if status != want {
        bail!("{what}: expected {want}, got {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what}: decode body {body}"))
}

/// `POST /tenants` with a unique slug.
pub async fn create_tenant(cp: &ControlPlane) -> anyhow::Result<Tenant> {
    let slug = format!("t-{}", short_id());
    let req = CreateTenantRequest {
        slug: slug.clone(),
        name: format!("Tenant {slug}"),
        ..Default::default()
    };
    let resp = admin(cp).post(cp.url("/tenants")).json(&req).send().await?;
    let t: Tenant = expect_json(resp, StatusCode::CREATED, "POST /tenants").await?;
    if t.slug != slug {
        bail!("POST /tenants: slug {:?} != requested {slug:?}", t.slug);
    }
    Ok(t)
}

/// `POST /tenants/{id}/api-keys`.
pub async fn create_api_key(cp: &ControlPlane, tenant_id: &str) -> anyhow::Result<ApiKeyCreated> {
    let req = CreateApiKeyRequest {
        name: format!("key-{}", short_id()),
        expires_in_seconds: None,
    };
    let resp = admin(cp)
        .post(cp.url(&format!("/tenants/{tenant_id}/api-keys")))
        .json(&req)
        .send()
        .await?;
    expect_json(resp, StatusCode::CREATED, "POST /tenants/{id}/api-keys").await
}

/// `POST /tenants/{id}/sites`.
pub async fn create_site(cp: &ControlPlane, api_key: &str, tenant_id: &str, name: &str) -> anyhow::Result<Site> {
    let req = CreateSiteRequest {
        name: name.to_string(),
        ..Default::default()
    };
    let resp = tenant(cp, api_key)
        .post(cp.url(&format!("/tenants/{tenant_id}/sites")))
        .json(&req)
        .send()
        .await?;
    expect_json(resp, StatusCode::CREATED, "POST /tenants/{id}/sites").await
}

/// `POST /tenants/{id}/enrollment-tokens`.
pub async fn issue_token(
    cp: &ControlPlane,
    api_key: &str,
    tenant_id: &str,
    site_id: &str,
    expires_in_seconds: Option<i64>,
) -> anyhow::Result<EnrollmentTokenCreated> {
    let req = CreateEnrollmentTokenRequest {
        site_id: site_id.to_string(),
        expires_in_seconds,
    };
    let resp = tenant(cp, api_key)
        .post(cp.url(&format!("/tenants/{tenant_id}/enrollment-tokens")))
        .json(&req)
        .send()
        .await?;
    expect_json(resp, StatusCode::CREATED, "POST /tenants/{id}/enrollment-tokens").await
}

/// Tenant (unique slug) + API key + site.
pub async fn bootstrap(cp: &ControlPlane) -> anyhow::Result<Fixture> {
    let tenant = create_tenant(cp).await?;
    let key = create_api_key(cp, &tenant.id).await?;
    let site = create_site(cp, &key.api_key, &tenant.id, &format!("site-{}", short_id())).await?;
    Ok(Fixture {
        tenant,
        api_key: key.api_key,
        site,
    })
}

/// The enrollment body our own agent sends.
pub fn enroll_request(token: &str, hostname: &str, csr_pem: &str) -> EnrollRequest {
    EnrollRequest {
        enrollment_token: token.to_string(),
        hostname: hostname.to_string(),
        agent_version: TEST_AGENT_VERSION.to_string(),
        os: "linux".into(),
        arch: "amd64".into(),
        csr_pem: csr_pem.to_string(),
        ..Default::default()
    }
}

/// `POST /v1/enroll` with `token` and `csr_pem` (hostname `edge-<random>`). Panics on a transport error.
pub async fn enroll(cp: &ControlPlane, token: &str, csr_pem: &str) -> Response {
    let host = format!("edge-{}", short_id());
    anon(cp)
        .post(cp.url("/v1/enroll"))
        .json(&enroll_request(token, &host, csr_pem))
        .send()
        .await
        .expect("POST /v1/enroll: transport error")
}

/// Issues a token for the fixture's site, makes a key + CSR and enrolls (`POST /v1/enroll`).
pub async fn enroll_agent(cp: &ControlPlane, fx: &Fixture, hostname: &str) -> anyhow::Result<EnrolledAgent> {
    let token = issue_token(cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let (key_pem, csr_pem) = make_csr(hostname);
    let resp = anon(cp)
        .post(cp.url("/v1/enroll"))
        .json(&enroll_request(&token.token, hostname, &csr_pem))
        .send()
        .await?;
    let enrollment: EnrollResponse = expect_json(resp, StatusCode::OK, "POST /v1/enroll").await?;
    Ok(EnrolledAgent {
        key_pem,
        cert_pem: enrollment.client_certificate_pem.clone(),
        enrollment,
    })
}

/// Reads an error answer: checks the status, parses the body as [`ErrorBody`] with non-empty `code` and
/// `error`, checks `code` (when `code` is not empty), and returns the body. Panics otherwise.
pub async fn expect_error(resp: Response, status: StatusCode, code: &str) -> ErrorBody {
    let got_status = resp.status();
    let url = resp.url().to_string();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.text().await.unwrap_or_else(|e| format!("<unreadable body: {e}>"));
    assert_eq!(
        got_status, status,
        "{url}: expected status {status} ({code}), got {got_status}; body: {body}"
    );
    let err: ErrorBody = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("{url}: error body is not an ErrorBody ({e}); content-type {ctype:?}; body: {body}")
    });
    assert!(!err.code.is_empty(), "{url}: empty error code: {body}");
    assert!(!err.error.is_empty(), "{url}: empty error message: {body}");
    assert!(
        ctype.starts_with("application/json"),
        "{url}: error content-type {ctype:?}, body {body}"
    );
    if !code.is_empty() {
        assert_eq!(
            err.code, code,
            "{url}: wrong error code (status {got_status}); body: {body}"
        );
    }
    err
}

/// Polls `f` until it returns `Ok(Some(v))`, or fails after `timeout` with the last error / state it saw.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: String;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "condition not met yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `/healthz` and `/readyz` and expect 200 from both (the server is still healthy).
pub async fn assert_healthy(cp: &ControlPlane) {
    let c = anon(cp);
    for path in ["/healthz", "/readyz"] {
        let r = c
            .get(cp.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let st = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(st, StatusCode::OK, "GET {path}: {body}");
    }
}

/// CPU cores reported by [`legacy_heartbeat_body`].
pub const LEGACY_CPU_CORES: i64 = 12;
/// Memory reported by [`legacy_heartbeat_body`] (32 GiB).
pub const LEGACY_MEMORY_BYTES: i64 = 34_359_738_368;
/// Disk sizes reported by [`legacy_heartbeat_body`] (two filesystems).
pub const LEGACY_DISK_BYTES: [i64; 2] = [500_107_862_016, 1_000_204_886_016];

/// The heartbeat body exactly as the earlier Go agent sends it (reference §3.4): top-level keys `tenant_id`,
/// `site_id`, `host_id` (ignored by the server; here deliberately wrong), `agent_id`, `sent_at`, the full
/// `host_facts`, `netbird_status` with `raw`, and `microvms` with `status` (not `state`) and a non-UUID id.
pub fn legacy_heartbeat_body(agent_id: &str) -> serde_json::Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let bogus = || uuid::Uuid::new_v4().to_string();
    serde_json::json!({
        "tenant_id": bogus(),
        "site_id": bogus(),
        "host_id": bogus(),
        "agent_id": agent_id,
        "sent_at": now,
        "host_facts": {
            "collected_at": now,
            "cpu_cores": LEGACY_CPU_CORES,
            "memory_total_bytes": LEGACY_MEMORY_BYTES,
            "memory_free_bytes": 17_179_869_184i64,
            "disks": [
                {"mountpoint": "/", "total_bytes": LEGACY_DISK_BYTES[0], "free_bytes": 250_053_931_008i64},
                {"mountpoint": "/var/lib/nkudo", "total_bytes": LEGACY_DISK_BYTES[1], "free_bytes": 900_000_000_000i64}
            ],
            "os": "debian",
            "os_version": "12",
            "kernel": "6.1.0-18-amd64",
            "arch": "amd64",
            "kvm": {"present": true, "readable": true, "writable": true, "check_message": "/dev/kvm is accessible"},
            "interfaces": [
                {"name": "eth0", "mac": "52:54:00:12:34:56", "addresses": ["192.168.10.5/24", "fe80::5054:ff:fe12:3456/64"], "is_bridge": false},
                {"name": "br-nkudo", "mac": "52:54:00:aa:bb:cc", "addresses": ["10.90.0.1/24"], "is_bridge": true}
            ],
            "bridges": ["br-nkudo"]
        },
        "netbird_status": {
            "connected": true,
            "state": "Connected",
            "peer_id": "peer-1a2b3c",
            "ipv4": "100.64.0.7",
            "management_url": "https://netbird.example.invalid:443",
            "network_id": "net-42",
            "raw": "{\"management\":{\"connected\":true},\"netbirdIp\":\"100.64.0.7/16\"}"
        },
        "microvms": [{
            "id": "vm-demo-001",
            "name": "demo",
            "kernel_path": "",
            "rootfs_path": "/var/lib/nkudo/vms/vm-demo-001/rootfs.raw",
            "tap_iface": "tap-vm-demo-00",
            "ch_pid": 4242,
            "status": "RUNNING",
            "updated_at": now
        }]
    })
}

/// `error: cause: cause…` on one line (reqwest's Debug output is long and nested).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
