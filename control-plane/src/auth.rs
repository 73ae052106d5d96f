//! Authentication extractors: admin key (`X-Admin-Key`), tenant API key (`X-API-Key`, scoped to one tenant),
//! agent mTLS (the client certificate seen at the handshake, checked against the agent's current serial and
//! revocation on every request), and the request context (request id, source address) for audit events.

use crate::audit::{self, AuditEvent};
use crate::error::ApiError;
use crate::pki::PeerIdentity;
use crate::state::SharedState;
use crate::util::{now_ms, secret_eq, sha256_hex};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use nkudo_core::api::ErrorCode;
use sqlx::Row;
use std::net::SocketAddr;

/// What the TLS layer knows about a connection; inserted into every request of that connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Option<PeerIdentity>,
}

/// Request id (`X-Request-ID` or a new UUID) and source address, for audit events.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub source_ip: String,
    pub remote: Option<SocketAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestCtx {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(request_ctx(parts))
    }
}

pub fn request_ctx(parts: &Parts) -> RequestCtx {
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect::<String>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(crate::util::new_id);
    let remote = parts.extensions.get::<ConnInfo>().map(|c| c.remote);
    RequestCtx {
        request_id,
        source_ip: remote.map(|r| r.ip().to_string()).unwrap_or_default(),
        remote,
    }
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

async fn auth_failure(state: &SharedState, parts: &Parts, tenant_id: &str, kind: &'static str, detail: &str) {
    state.metrics.auth_failures.with_label_values(&[kind]).inc();
    let ctx = request_ctx(parts);
    tracing::warn!(kind, detail, source_ip = %ctx.source_ip, path = %parts.uri.path(), "authentication failure");
    let ev = AuditEvent::new(tenant_id, "auth.failure", "request", parts.uri.path())
        .actor("ANONYMOUS", None)
        .outcome("denied")
        .request(&ctx)
        .metadata(serde_json::json!({ "kind": kind, "detail": detail, "method": parts.method.as_str() }));
    audit::record_standalone(&state.db, ev).await;
}

/// The caller presented the admin key.
pub struct Admin;

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        match header(parts, "x-admin-key") {
            Some(k) if secret_eq(k, &state.admin_key) => Ok(Admin),
            given => {
                let detail = if given.is_some() {
                    "wrong admin key"
                } else {
                    "missing admin key"
                };
                auth_failure(state, parts, "", "admin", detail).await;
                Err(ApiError::unauthorized(ErrorCode::InvalidAdminKey, "invalid admin key"))
            }
        }
    }
}

/// A tenant API key: every query of the handler filters by `tenant_id`.
#[derive(Debug, Clone)]
pub struct TenantAuth {
    pub tenant_id: String,
    pub key_id: String,
}

/// `last_used_at` is written at most this often per key, not on every request.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

impl FromRequestParts<SharedState> for TenantAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let Some(key) = header(parts, "x-api-key") else {
            auth_failure(state, parts, "", "api_key", "missing api key").await;
            return Err(ApiError::unauthorized(ErrorCode::MissingApiKey, "missing api key"));
        };
        let hash = sha256_hex(key.as_bytes());
        let now = now_ms();
        let row =
            sqlx::query("SELECT id, tenant_id, expires_at, revoked_at, last_used_at FROM api_keys WHERE key_hash = $1")
                .bind(&hash)
                .fetch_optional(&state.db.pool)
                .await?;
        let valid = match &row {
            Some(r) => {
                let expires_at: Option<i64> = r.try_get(2)?;
                let revoked_at: Option<i64> = r.try_get(3)?;
                revoked_at.is_none() && expires_at.is_none_or(|e| e > now)
            }
            None => false,
        };
        let Some(row) = row.filter(|_| valid) else {
            auth_failure(state, parts, "", "api_key", "unknown, expired or revoked api key").await;
            return Err(ApiError::unauthorized(ErrorCode::InvalidApiKey, "invalid api key"));
        };
        let auth = TenantAuth {
            key_id: row.try_get(0)?,
            tenant_id: row.try_get(1)?,
        };
        let last_used: Option<i64> = row.try_get(4)?;
        if last_used.is_none_or(|t| now - t > LAST_USED_RESOLUTION_MS) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(&auth.key_id)
                .execute(&state.db.pool)
                .await?;
        }
        Ok(auth)
    }
}

impl TenantAuth {
    /// The path names a tenant: it must be this key's tenant. Another tenant answers 404 (never 403 with
    /// details), and the attempt is audited in the key's own chain.
    pub async fn require_tenant(
        &self,
        state: &SharedState,
        ctx: &RequestCtx,
        path_tenant: &str,
    ) -> Result<(), ApiError> {
        if !crate::util::is_uuid(path_tenant) {
            return Err(ApiError::invalid_id("tenant"));
        }
        if path_tenant == self.tenant_id {
            return Ok(());
        }
        self.cross_tenant(state, ctx, "tenant", path_tenant).await;
        Err(ApiError::not_found("tenant"))
    }

    /// Records an attempt to reach another tenant's resource (a tenant isolation violation): counted in
    /// `nkudo_auth_failures_total{kind="cross_tenant"}` and in `nkudo_tenant_isolation_violations_total` under
    /// the caller's own tenant, logged, and audited in the caller's chain. `kind` is one of
    /// [`CROSS_TENANT_KINDS`].
    pub async fn cross_tenant(&self, state: &SharedState, ctx: &RequestCtx, kind: &'static str, id: &str) {
        state.metrics.auth_failures.with_label_values(&["cross_tenant"]).inc();
        let slug = tenant_slug(state, &self.tenant_id).await;
        state
            .metrics
            .tenant_isolation_violations
            .with_label_values(&[&slug, &self.tenant_id, kind])
            .inc();
        tracing::warn!(tenant = %slug, tenant_id = %self.tenant_id, kind, id, "cross-tenant access refused");
        let ev = AuditEvent::new(&self.tenant_id, "auth.cross_tenant", kind, id)
            .actor("USER", Some(&self.key_id))
            .outcome("denied")
            .request(ctx);
        audit::record_standalone(&state.db, ev).await;
    }
}

impl AgentAuth {
    /// Records an agent naming another tenant's resource (an execution id of another tenant in a result or a
    /// log frame): the same counters, log line and audit event as [`ApiKeyAuth::cross_tenant`], under the
    /// agent's own tenant, with the agent as the actor. Call it after the request's own write transaction has
    /// ended (the audit event is a write of its own).
    pub async fn cross_tenant(&self, state: &SharedState, kind: &'static str, id: &str) {
        let tenant_id = &self.agent.tenant_id;
        state.metrics.auth_failures.with_label_values(&["cross_tenant"]).inc();
        let slug = tenant_slug(state, tenant_id).await;
        state
            .metrics
            .tenant_isolation_violations
            .with_label_values(&[&slug, tenant_id, kind])
            .inc();
        tracing::warn!(tenant = %slug, tenant_id = %tenant_id, agent_id = %self.agent.id, kind, id,
            "cross-tenant access by an agent refused");
        let ev = AuditEvent::new(tenant_id, "auth.cross_tenant", kind, id)
            .actor("AGENT", Some(&self.agent.id))
            .site(&self.agent.site_id)
            .outcome("denied");
        audit::record_standalone(&state.db, ev).await;
    }
}

/// The resource kinds a cross-tenant refusal names (`kind` of `nkudo_tenant_isolation_violations_total`): the
/// tenant in the path, a site, an execution.
pub const CROSS_TENANT_KINDS: [&str; 3] = ["tenant", "site", "execution"];

/// The slug of `tenant_id` for metric labels; the id itself when it cannot be read.
async fn tenant_slug(state: &SharedState, tenant_id: &str) -> String {
    match sqlx::query_scalar::<_, String>("SELECT slug FROM tenants WHERE id = $1")
        .bind(tenant_id)
        .fetch_optional(&state.db.pool)
        .await
    {
        Ok(Some(slug)) => slug,
        Ok(None) => tenant_id.to_string(),
        Err(e) => {
            tracing::warn!(error = %e, tenant_id, "reading the tenant slug");
            tenant_id.to_string()
        }
    }
}

/// An enrolled, non-revoked agent authenticated by its client certificate.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    pub agent: std::sync::Arc<crate::agents::AgentRecord>,
    pub peer: PeerIdentity,
}

impl FromRequestParts<SharedState> for AgentAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let Some(peer) = parts.extensions.get::<ConnInfo>().and_then(|c| c.peer.clone()) else {
            state.metrics.auth_failures.with_label_values(&["mtls"]).inc();
            return Err(ApiError::unauthorized(
                ErrorCode::MissingClientCertificate,
                "missing client certificate",
            ));
        };
        let refuse = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let Some(agent) = state.agents.get(&state.db, &peer.agent_id).await? else {
            auth_failure(state, parts, "", "mtls", "unknown agent").await;
            return Err(refuse(ErrorCode::UnknownAgent, "unknown agent"));
        };
        if agent.revoked {
            auth_failure(state, parts, &agent.tenant_id, "mtls", "revoked agent").await;
            return Err(refuse(ErrorCode::AgentRevoked, "agent revoked"));
        }
        if agent.cert_serial != peer.serial_hex {
            auth_failure(state, parts, &agent.tenant_id, "mtls", "certificate serial mismatch").await;
            return Err(refuse(
                ErrorCode::CertificateSerialMismatch,
                "certificate serial mismatch",
            ));
        }
        if peer.not_after_ms <= now_ms() {
            return Err(refuse(
                ErrorCode::InvalidClientCertificate,
                "client certificate expired",
            ));
        }
        Ok(AgentAuth { agent, peer })
    }
}
