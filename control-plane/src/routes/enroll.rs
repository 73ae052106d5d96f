//! Enrollment: a one-time, expiring token plus a CSR become an agent with a certificate signed by the agent
//! CA. The token is consumed in the same transaction that creates the agent, so a failed enrollment never
//! burns it, and of two concurrent uses exactly one wins.

use crate::agents::AgentRecord;
use crate::audit::{self, AuditEvent};
use crate::auth::RequestCtx;
use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, read_body};
use crate::pki::{AgentIdentity, PkiError};
use crate::state::SharedState;
use crate::util::{new_id, now_ms, random_secret, rfc3339, sha256_hex};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{EnrollRequest, EnrollResponse, ErrorCode};
use sqlx::Row;

const MAX_FIELD: usize = 255;
const MAX_LABELS: usize = 64;

fn refuse(state: &SharedState, result: &'static str, err: ApiError) -> ApiError {
    state.metrics.enrollments.with_label_values(&[result]).inc();
    record_attempt(state, result);
    err
}

/// Keeps the attempt for the builtin rollout statistics (enrollment failure rate), off the request path.
pub fn record_attempt(state: &SharedState, result: &'static str) {
    let db = state.db.clone();
    tokio::spawn(async move {
        let r = sqlx::query("INSERT INTO enrollment_attempts (at, result) VALUES ($1, $2)")
            .bind(crate::util::now_ms())
            .bind(result)
            .execute(&db.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "recording an enrollment attempt");
        }
    });
}

/// A CSR the client got wrong: 400 `INVALID_CSR` with the reason.
pub fn csr_error(e: &PkiError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidCsr,
        format!("invalid csr: {e}"),
    )
}

fn validate(req: &EnrollRequest) -> Result<String, ApiError> {
    let hostname = if req.hostname.trim().is_empty() {
        req.requested_hostname.trim()
    } else {
        req.hostname.trim()
    };
    if req.enrollment_token.trim().is_empty() || req.csr_pem.trim().is_empty() || hostname.is_empty() {
        return Err(ApiError::validation(
            "enrollment_token, hostname and csr_pem are required",
        ));
    }
    if hostname.len() > 253 || hostname.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::validation(
            "hostname must be at most 253 characters without spaces",
        ));
    }
    for (field, v) in [
        ("agent_version", &req.agent_version),
        ("os", &req.os),
        ("arch", &req.arch),
        ("kernel_version", &req.kernel_version),
    ] {
        if v.len() > MAX_FIELD {
            return Err(ApiError::validation(format!(
                "{field} must be at most {MAX_FIELD} characters"
            )));
        }
    }
    if req.labels.len() > MAX_LABELS
        || req
            .labels
            .iter()
            .any(|(k, v)| k.len() > MAX_FIELD || v.len() > MAX_FIELD)
    {
        return Err(ApiError::validation("too many or too long labels"));
    }
    Ok(hostname.to_string())
}

pub async fn enroll(
    State(state): State<SharedState>,
    ctx: RequestCtx,
    request: Request,
) -> ApiResult<Json<EnrollResponse>> {
    if let Some(remote) = ctx.remote {
        if let Err(wait) = state.enroll_limiter.check(remote.ip()) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                "too many enrollment attempts from this address",
            );
            e.retry_after_secs = Some(wait);
            return Err(refuse(&state, "rate_limited", e));
        }
    }
    let body = read_body(request, &())
        .await
        .map_err(|e| refuse(&state, "invalid_request", e))?;
    let req: EnrollRequest = parse_json(&body).map_err(|e| refuse(&state, "invalid_request", e))?;
    let hostname = validate(&req).map_err(|e| refuse(&state, "invalid_request", e))?;
    // N/N-1: an agent older than the oldest supported version is refused. A version that does not parse
    // (`dev` builds of the earlier agent) is enrolled and reported unsupported, so that it can be upgraded.
    if let Ok(v) = nkudo_core::version::parse(&req.agent_version) {
        if state.policy.is_below_minimum(&v) {
            return Err(refuse(
                &state,
                "version_unsupported",
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::AgentVersionUnsupported,
                    format!(
                        "agent version {v} is not supported: the minimum supported agent version is {}",
                        state.min_agent_version
                    ),
                ),
            ));
        }
    }
    let token_hash = sha256_hex(req.enrollment_token.trim().as_bytes());
    let now = now_ms();

    // 1. Look the token up, so the common failures answer precisely and nothing is signed for them.
    let token =
        sqlx::query("SELECT id, tenant_id, site_id, expires_at, used_at FROM enrollment_tokens WHERE token_hash = $1")
            .bind(&token_hash)
            .fetch_optional(&state.db.pool)
            .await?;
    let Some(token) = token else {
        return Err(refuse(
            &state,
            "invalid_token",
            ApiError::unauthorized(ErrorCode::InvalidToken, "invalid enrollment token"),
        ));
    };
    let token_id: String = token.try_get(0)?;
    let tenant_id: String = token.try_get(1)?;
    let site_id: String = token.try_get(2)?;
    let expires_at: i64 = token.try_get(3)?;
    let used_at: Option<i64> = token.try_get(4)?;
    let token_refusal = |used: bool| {
        if used {
            ApiError::unauthorized(ErrorCode::AlreadyUsed, "enrollment token already used")
        } else {
            ApiError::unauthorized(ErrorCode::TokenExpired, "enrollment token expired")
        }
    };
    if used_at.is_some() {
        return Err(refuse(&state, "already_used", token_refusal(true)));
    }
    if expires_at <= now {
        return Err(refuse(&state, "token_expired", token_refusal(false)));
    }

    // 2. Sign the CSR before touching the database: a bad CSR leaves the token unused.
    let agent_id = new_id();
    let ttl = state.cfg.agent_cert_ttl;
    let pki_state = state.clone();
    let (csr, t, s, a) = (
        req.csr_pem.clone(),
        tenant_id.clone(),
        site_id.clone(),
        agent_id.clone(),
    );
    let issued = tokio::task::spawn_blocking(move || {
        pki_state.pki.sign_agent_csr(
            &csr,
            &AgentIdentity {
                tenant_id: &t,
                site_id: &s,
                agent_id: &a,
            },
            ttl,
        )
    })
    .await
    .map_err(|e| ApiError::internal("signing certificate", e))?
    .map_err(|e| match e {
        PkiError::Csr(_) => refuse(&state, "invalid_csr", csr_error(&e)),
        other => refuse(&state, "error", ApiError::internal("signing certificate", other)),
    })?;

    // 3. One transaction: consume the token (first statement: the write lock), host, agent, audit.
    let refresh_token = random_secret();
    let mut tx = state.db.begin_write().await?;
    let consumed = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = $1, used_by_agent_id = $2 \
         WHERE id = $3 AND used_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(&agent_id)
    .bind(&token_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if consumed != 1 {
        tx.rollback().await?;
        return Err(refuse(&state, "already_used", token_refusal(true)));
    }
    let fp = req.host_fingerprint.clone().unwrap_or_default();
    let host_id: String = sqlx::query_scalar(
        "INSERT INTO hosts (id, tenant_id, site_id, hostname, machine_id_sha256, primary_mac_sha256, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (tenant_id, site_id, hostname) DO UPDATE SET \
         machine_id_sha256 = COALESCE(excluded.machine_id_sha256, hosts.machine_id_sha256), \
         primary_mac_sha256 = COALESCE(excluded.primary_mac_sha256, hosts.primary_mac_sha256), \
         updated_at = excluded.updated_at RETURNING id",
    )
    .bind(new_id())
    .bind(&tenant_id)
    .bind(&site_id)
    .bind(&hostname)
    .bind(fp.machine_id_sha256.as_deref())
    .bind(fp.primary_mac_sha256.as_deref())
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    // Re-enrolling a host replaces its previous agent: that one's certificate stops working.
    let superseded: Vec<String> = sqlx::query_scalar(
        "UPDATE agents SET revoked_at = $1, revoke_reason = 'superseded by re-enrollment', state = 'OFFLINE', \
         auth_changed_at = $1, updated_at = $1 WHERE host_id = $2 AND revoked_at IS NULL RETURNING id",
    )
    .bind(now)
    .bind(&host_id)
    .fetch_all(&mut *tx)
    .await?;
    let version = if req.agent_version.trim().is_empty() {
        "unknown"
    } else {
        req.agent_version.trim()
    };
    let os = if req.os.trim().is_empty() {
        req.labels.get("os").map(String::as_str).unwrap_or("linux")
    } else {
        req.os.trim()
    };
    let arch = if req.arch.trim().is_empty() {
        req.labels.get("arch").map(String::as_str).unwrap_or("amd64")
    } else {
        req.arch.trim()
    };
    let labels = serde_json::to_string(&req.labels).unwrap_or_else(|_| "{}".into());
    sqlx::query(
        "INSERT INTO agents (id, tenant_id, site_id, host_id, agent_version, os, arch, kernel_version, state, \
         cert_serial, cert_expires_at, refresh_token_hash, enrollment_token_id, labels_json, enrolled_at, \
         last_heartbeat_at, auth_changed_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'ONLINE', $9, $10, $11, $12, $13, $14, $14, $14, $14, $14)",
    )
    .bind(&agent_id)
    .bind(&tenant_id)
    .bind(&site_id)
    .bind(&host_id)
    .bind(version)
    .bind(os)
    .bind(arch)
    .bind(Some(req.kernel_version.trim()).filter(|k| !k.is_empty()))
    .bind(&issued.serial_hex)
    .bind(issued.not_after_ms)
    .bind(sha256_hex(refresh_token.as_bytes()))
    .bind(&token_id)
    .bind(&labels)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE sites SET connectivity_state = 'ONLINE', last_heartbeat_at = $1, updated_at = $1 WHERE id = $2",
    )
    .bind(now)
    .bind(&site_id)
    .execute(&mut *tx)
    .await?;
    let ev = AuditEvent::new(&tenant_id, "agent.enroll", "agent", &agent_id)
        .actor("AGENT", Some(&agent_id))
        .site(&site_id)
        .request(&ctx)
        .metadata(serde_json::json!({
            "host_id": host_id, "hostname": hostname, "agent_version": version,
            "enrollment_token_id": token_id, "cert_serial": issued.serial_hex, "superseded": superseded,
        }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;

    for old in &superseded {
        state.agents.mark_revoked(old);
    }
    state.agents.put(AgentRecord {
        id: agent_id.clone(),
        tenant_id: tenant_id.clone(),
        site_id: site_id.clone(),
        host_id: host_id.clone(),
        cert_serial: issued.serial_hex.clone(),
        revoked: false,
        agent_version: version.to_string(),
    });
    state.metrics.enrollments.with_label_values(&["success"]).inc();
    record_attempt(&state, "success");
    tracing::info!(%tenant_id, %site_id, %agent_id, %hostname, "agent enrolled");
    let interval = state.cfg.heartbeat_interval_secs();
    Ok(Json(EnrollResponse {
        tenant_id,
        site_id,
        host_id,
        agent_id,
        client_certificate_pem: issued.cert_pem,
        ca_certificate_pem: state.pki.ca_bundle_pem().to_string(),
        refresh_token,
        heartbeat_endpoint: "/v1/heartbeat".into(),
        heartbeat_interval_sec: interval,
        heartbeat_interval_seconds: interval,
        certificate_expires_at: rfc3339(issued.not_after_ms),
        minimum_supported_agent_version: state.min_agent_version.clone(),
    }))
}
