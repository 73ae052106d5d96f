//! `releaser check-compat --control-plane <version>`: before upgrading a control plane, which enrolled agents
//! would it no longer support (the N/N-1 rule of `nkudo_core::version`, plus an optional floor)? The agents
//! come from the running control plane, in one of two modes:
//!
//! * fleet (the default for an operator about to upgrade): `GET /admin/agents` with the admin key
//!   (`--admin-key`, `$NKUDO_ADMIN_KEY`), every tenant's agents, read page by page (`limit`, then `after=<cursor>`: the answer's
//!   `next_after` when it has that field, else the last agent's id until a page comes back empty);
//! * tenant (`--tenant ID`): `GET /tenants/{id}/agents` with that tenant's API key (`X-API-Key`).
//!
//! Revoked agents are not counted.

use anyhow::{bail, Context, Result};
use nkudo_core::api::{Agent, AgentsResponse};
use nkudo_core::version::SupportPolicy;
use semver::Version;
use std::path::Path;
use std::time::Duration;

/// One agent's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentCompat {
    pub id: String,
    pub hostname: String,
    pub agent_version: String,
    pub supported: bool,
}

/// The verdict for the whole fleet of a tenant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompatReport {
    pub ok: bool,
    pub control_plane: String,
    pub minimum_supported_agent_version: String,
    pub agents: Vec<AgentCompat>,
    pub unsupported: usize,
    pub revoked_skipped: usize,
}

/// Evaluates `agents` against a control plane of version `control_plane` (and an optional floor).
pub fn evaluate(control_plane: &Version, floor: Option<Version>, agents: &[Agent]) -> CompatReport {
    let policy = SupportPolicy::new(control_plane.clone(), floor);
    let mut out = Vec::new();
    let mut revoked = 0;
    for a in agents {
        if a.revoked_at.is_some() {
            revoked += 1;
            continue;
        }
        out.push(AgentCompat {
            id: a.id.clone(),
            hostname: a.hostname.clone(),
            agent_version: a.agent_version.clone(),
            supported: policy.supports_str(&a.agent_version),
        });
    }
    out.sort_by(|a, b| (a.supported, &a.hostname).cmp(&(b.supported, &b.hostname)));
    let unsupported = out.iter().filter(|a| !a.supported).count();
    CompatReport {
        ok: unsupported == 0,
        control_plane: control_plane.to_string(),
        minimum_supported_agent_version: policy.minimum().to_string(),
        agents: out,
        unsupported,
        revoked_skipped: revoked,
    }
}

/// Where the agents come from.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// `GET /admin/agents` (every tenant) with `X-Admin-Key`.
    Fleet { admin_key: &'a str },
    /// `GET /tenants/{tenant}/agents` with `X-API-Key`.
    Tenant { tenant: &'a str, api_key: &'a str },
}

/// Page size of `GET /admin/agents`.
pub const FLEET_PAGE_SIZE: usize = 500;

/// The agents of `source` (see [`Source`]). `ca_cert`: a PEM bundle to trust (the control plane's CA); otherwise
/// the system roots.
pub fn fetch(url: &str, source: &Source<'_>, ca_cert: Option<&Path>) -> Result<Vec<Agent>> {
    match source {
        Source::Tenant { tenant, api_key } => fetch_agents(url, tenant, api_key, ca_cert),
        Source::Fleet { admin_key } => fetch_fleet_agents(url, admin_key, ca_cert),
    }
}

fn client(ca_cert: Option<&Path>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("nkudo-releaser/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-cert {} is not a PEM bundle", path.display()))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("building the HTTP client")
}

/// `GET {url}/admin/agents?limit=N[&after=C]` with `X-Admin-Key`, every page.
pub fn fetch_fleet_agents(url: &str, admin_key: &str, ca_cert: Option<&Path>) -> Result<Vec<Agent>> {
    let client = client(ca_cert)?;
    let base = format!("{}/admin/agents", url.trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async {
        let mut out: Vec<Agent> = Vec::new();
        let mut after: Option<String> = None;
        let mut seen_cursors = std::collections::HashSet::new();
        loop {
            let mut req = client
                .get(&base)
                .header("X-Admin-Key", admin_key)
                .query(&[("limit", FLEET_PAGE_SIZE.to_string())]);
            if let Some(a) = &after {
                req = req.query(&[("after", a)]);
            }
            let endpoint = match &after {
                Some(a) => format!("{base}?limit={FLEET_PAGE_SIZE}&after={a}"),
                None => format!("{base}?limit={FLEET_PAGE_SIZE}"),
            };
            let resp = req
                .send()
                .await
                .with_context(|| format!("GET {endpoint} (is --url right? for a private CA pass --ca-cert)"))?;
            let status = resp.status();
            let body = resp
                .bytes()
                .await
                .with_context(|| format!("reading the answer of GET {endpoint}"))?;
            if !status.is_success() {
                let hint = match status.as_u16() {
                    401 | 403 => ": the admin key is wrong or missing (--admin-key, $NKUDO_ADMIN_KEY)",
                    404 | 405 => ": this control plane has no fleet-wide agents list; use --tenant with --api-key",
                    _ => "",
                };
                bail!(
                    "GET {endpoint}: {status}{hint}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                );
            }
            let value: serde_json::Value =
                serde_json::from_slice(&body).with_context(|| format!("GET {endpoint}: not JSON"))?;
            // An explicit cursor field (`null`: the last page) when the control plane sends one; otherwise keep
            // going after the last agent until a page comes back empty.
            let explicit = ["next_after", "next_cursor"]
                .iter()
                .find_map(|k| value.get(*k))
                .map(|v| v.as_str().map(str::to_string));
            let page: AgentsResponse =
                serde_json::from_value(value).with_context(|| format!("GET {endpoint}: not an agents list"))?;
            let n = page.agents.len();
            let cursor = match explicit {
                Some(c) => c,
                None => page.agents.last().map(|a| a.id.clone()),
            };
            out.extend(page.agents);
            match cursor {
                Some(c) if n > 0 => {
                    if !seen_cursors.insert(c.clone()) {
                        bail!("GET {base}: the control plane returned the cursor {c:?} twice (pagination loops)");
                    }
                    after = Some(c);
                }
                _ => break,
            }
        }
        // A page boundary racing an enrollment could list one agent twice.
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(a.id.clone()));
        Ok(out)
    })
}

/// `GET {url}/tenants/{tenant}/agents` with `X-API-Key`. `ca_cert`: a PEM bundle to trust (the control plane's
/// CA); otherwise the system roots.
pub fn fetch_agents(url: &str, tenant: &str, api_key: &str, ca_cert: Option<&Path>) -> Result<Vec<Agent>> {
    let client = client(ca_cert)?;
    let endpoint = format!("{}/tenants/{tenant}/agents", url.trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async {
        let resp = client
            .get(&endpoint)
            .header("X-API-Key", api_key)
            .send()
            .await
            .with_context(|| format!("GET {endpoint} (is --url right? for a private CA pass --ca-cert)"))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of GET {endpoint}"))?;
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 => ": the API key is missing, unknown, expired or revoked (--api-key)",
                404 => ": unknown tenant, or the API key belongs to another tenant (--tenant)",
                _ => "",
            };
            bail!(
                "GET {endpoint}: {status}{hint}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            );
        }
        let parsed: AgentsResponse =
            serde_json::from_slice(&body).with_context(|| format!("GET {endpoint}: not an agents list"))?;
        Ok(parsed.agents)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(host: &str, v: &str, revoked: bool) -> Agent {
        Agent {
            id: format!("id-{host}"),
            tenant_id: "t".into(),
            site_id: "s".into(),
            host_id: "h".into(),
            hostname: host.into(),
            agent_version: v.into(),
            agent_version_supported: true,
            state: "ONLINE".into(),
            enrolled_at: "2026-01-01T00:00:00Z".into(),
            last_heartbeat_at: None,
            cert_serial: "1".into(),
            cert_expires_at: "2027-01-01T00:00:00Z".into(),
            revoked_at: revoked.then(|| "2026-02-01T00:00:00Z".into()),
            build_version: None,
            labels: Default::default(),
            desired_version: None,
            update: None,
        }
    }

    #[test]
    fn n_minus_one_and_floor() {
        let agents = [
            agent("a", "0.3.1", false),
            agent("b", "0.2.1-pre.4+abc1234", false),
            agent("c", "0.1.9", false),
            agent("d", "dev", false),
            agent("e", "0.0.1", true),
        ];
        let r = evaluate(&Version::new(0, 3, 0), None, &agents);
        assert!(!r.ok);
        assert_eq!(r.unsupported, 2);
        assert_eq!(r.revoked_skipped, 1);
        assert_eq!(r.minimum_supported_agent_version, "0.2.0");
        let bad: Vec<&str> = r
            .agents
            .iter()
            .filter(|a| !a.supported)
            .map(|a| a.hostname.as_str())
            .collect();
        assert_eq!(bad, ["c", "d"]);
        let r = evaluate(&Version::new(0, 3, 0), Some(Version::new(0, 3, 0)), &agents[..1]);
        assert!(r.ok);
        assert!(evaluate(&Version::new(0, 3, 0), None, &[]).ok);
    }
}
