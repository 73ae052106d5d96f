//! Tenant routes (`X-API-Key`): sites, enrollment tokens, agents (list, revoke) and hosts. Every query
//! filters by the key's tenant; another tenant's resource answers 404.

use crate::audit::{self, AuditEvent};
use crate::auth::{RequestCtx, TenantAuth};
use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use crate::extract::{path_id, JsonBody, OptionalJsonBody};
use crate::state::SharedState;
use crate::util::{is_uuid, new_id, now_ms, random_secret, rfc3339, rfc3339_opt, sha256_hex};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{
    Agent, AgentsResponse, ApiKeyInfo, ApiKeysResponse, CreateEnrollmentTokenRequest, CreateSiteRequest,
    EnrollmentTokenCreated, EnrollmentTokenInfo, EnrollmentTokensResponse, Host, HostsResponse, NetbirdStatus,
    RevokeAgentRequest, Site, SitesResponse,
};
use sqlx::Row;

/// Longest enrollment token lifetime a tenant may ask for (7 days).
const MAX_TOKEN_TTL_SECS: i64 = 7 * 86_400;

pub(super) const SITE_COLUMNS: &str = "id, tenant_id, name, external_key, location_country_code, connectivity_state, \
     last_heartbeat_at, created_at, labels_json";

pub(super) fn site_from_row(r: &sqlx::any::AnyRow) -> Result<Site, sqlx::Error> {
    Ok(Site {
        id: r.try_get(0)?,
        tenant_id: r.try_get(1)?,
        name: r.try_get(2)?,
        external_key: r.try_get(3)?,
        location_country_code: r.try_get(4)?,
        connectivity_state: r.try_get(5)?,
        last_heartbeat_at: rfc3339_opt(r.try_get(6)?),
        created_at: rfc3339(r.try_get(7)?),
        labels: serde_json::from_str(&r.try_get::<String, _>(8)?).unwrap_or_default(),
    })
}

/// Checks that `site_id` is a site of the key's tenant (404 otherwise, audited as cross-tenant when the site
/// exists in another tenant).
pub(super) async fn require_site(
    state: &SharedState,
    auth: &TenantAuth,
    ctx: &RequestCtx,
    site_id: &str,
) -> ApiResult<()> {
    let owner: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM sites WHERE id = $1")
        .bind(site_id)
        .fetch_optional(&state.db.pool)
        .await?;
    match owner {
        Some(t) if t == auth.tenant_id => Ok(()),
        Some(_) => {
            auth.cross_tenant(state, ctx, "site", site_id).await;
            Err(ApiError::not_found("site"))
        }
        None => Err(ApiError::not_found("site")),
    }
}

pub async fn create_site(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
    JsonBody(req): JsonBody<CreateSiteRequest>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let name = req.name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::validation("name is required (at most 200 characters)"));
    }
    let external_key = req.external_key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
    if external_key.as_ref().is_some_and(|k| k.len() > 200) {
        return Err(ApiError::validation("external_key must be at most 200 characters"));
    }
    let country = match req.location_country_code.map(|c| c.trim().to_ascii_uppercase()) {
        None => None,
        Some(c) if c.is_empty() => None,
        Some(c) if c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()) => Some(c),
        Some(_) => {
            return Err(ApiError::validation(
                "location_country_code must be a two-letter ISO 3166-1 code",
            ))
        }
    };
    let now = now_ms();
    let site = Site {
        id: new_id(),
        tenant_id: auth.tenant_id.clone(),
        name,
        external_key,
        location_country_code: country,
        connectivity_state: "OFFLINE".into(),
        last_heartbeat_at: None,
        created_at: rfc3339(now),
        labels: Default::default(),
    };
    let mut tx = state.db.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO sites (id, tenant_id, name, external_key, location_country_code, connectivity_state, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'OFFLINE', $6, $6)",
    )
    .bind(&site.id)
    .bind(&site.tenant_id)
    .bind(&site.name)
    .bind(site.external_key.as_deref())
    .bind(site.location_country_code.as_deref())
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if Db::is_unique_violation(&e) {
            return Err(ApiError::conflict("site already exists"));
        }
        return Err(e.into());
    }
    let ev = AuditEvent::new(&site.tenant_id, "site.create", "site", &site.id)
        .actor("USER", Some(&auth.key_id))
        .site(&site.id)
        .request(&ctx)
        .metadata(serde_json::json!({ "name": site.name }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(site)))
}

pub async fn list_sites(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
) -> ApiResult<Json<SitesResponse>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let rows = sqlx::query(&format!(
        "SELECT {SITE_COLUMNS} FROM sites WHERE tenant_id = $1 ORDER BY created_at DESC, id"
    ))
    .bind(&auth.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    let sites = rows.iter().map(site_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(SitesResponse { sites }))
}

pub async fn create_enrollment_token(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
    JsonBody(req): JsonBody<CreateEnrollmentTokenRequest>,
) -> ApiResult<(StatusCode, Json<EnrollmentTokenCreated>)> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let site_id = req.site_id.trim();
    if !is_uuid(site_id) {
        return Err(ApiError::validation("invalid site_id"));
    }
    let ttl_secs = match req.expires_in_seconds {
        None | Some(0) => state.cfg.default_enrollment_ttl.as_secs() as i64,
        Some(s) if (1..=MAX_TOKEN_TTL_SECS).contains(&s) => s,
        Some(_) => {
            return Err(ApiError::validation(format!(
                "expires_in_seconds must be between 1 and {MAX_TOKEN_TTL_SECS}"
            )))
        }
    };
    require_site(&state, &auth, &ctx, site_id).await?;
    let now = now_ms();
    let token = random_secret();
    let id = new_id();
    let expires_at = now + ttl_secs * 1000;
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, tenant_id, site_id, token_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(&auth.tenant_id)
    .bind(site_id)
    .bind(sha256_hex(token.as_bytes()))
    .bind(now)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    let ev = AuditEvent::new(&auth.tenant_id, "enrollment_token.issue", "enrollment_token", &id)
        .actor("USER", Some(&auth.key_id))
        .site(site_id)
        .request(&ctx)
        .metadata(serde_json::json!({ "expires_at": expires_at }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollmentTokenCreated {
            token_id: id,
            site_id: site_id.to_string(),
            token,
            expires_at: rfc3339(expires_at),
            one_time: true,
        }),
    ))
}

pub(super) const AGENT_COLUMNS: &str =
    "a.id, a.tenant_id, a.site_id, a.host_id, h.hostname, a.agent_version, a.state, \
     a.enrolled_at, a.last_heartbeat_at, a.cert_serial, a.cert_expires_at, a.revoked_at, a.build_version, \
     a.update_json, s.labels_json, a.labels_json";
/// The joins [`AGENT_COLUMNS`] needs.
pub(super) const AGENT_FROM: &str = "agents a JOIN hosts h ON h.id = a.host_id JOIN sites s ON s.id = a.site_id";

/// An agent as the API shows it: its effective labels, build version, self-update state and the desired
/// version the resolution names for it.
pub(super) fn agent_from_row(state: &SharedState, r: &sqlx::any::AnyRow) -> Result<Agent, sqlx::Error> {
    let version: String = r.try_get(5)?;
    let id: String = r.try_get(0)?;
    let site_id: String = r.try_get(2)?;
    let tenant_id: String = r.try_get(1)?;
    let update: Option<String> = r.try_get(13)?;
    let site_labels: String = r.try_get(14)?;
    let agent_labels: String = r.try_get(15)?;
    let labels = crate::releases::desired::effective_labels(&site_labels, &agent_labels);
    let place = crate::releases::desired::AgentPlace {
        site_id: site_id.clone(),
        tenant_id: tenant_id.clone(),
        labels: labels.clone(),
    };
    Ok(Agent {
        desired_version: state.desired.resolve(&id, &place).map(|e| e.version),
        id,
        tenant_id,
        site_id,
        host_id: r.try_get(3)?,
        hostname: r.try_get(4)?,
        agent_version_supported: state.policy.supports_str(&version),
        agent_version: version,
        state: r.try_get(6)?,
        enrolled_at: rfc3339(r.try_get(7)?),
        last_heartbeat_at: rfc3339_opt(r.try_get(8)?),
        cert_serial: r.try_get(9)?,
        cert_expires_at: rfc3339(r.try_get(10)?),
        revoked_at: rfc3339_opt(r.try_get(11)?),
        build_version: r.try_get(12)?,
        labels,
        update: update.and_then(|u| serde_json::from_str(&u).ok()),
    })
}

pub async fn list_agents(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
) -> ApiResult<Json<AgentsResponse>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let rows = sqlx::query(&format!(
        "SELECT {AGENT_COLUMNS} FROM {AGENT_FROM} WHERE a.tenant_id = $1 \
         ORDER BY a.enrolled_at, a.id"
    ))
    .bind(&auth.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    let agents = rows
        .iter()
        .map(|r| agent_from_row(&state, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(AgentsResponse { agents }))
}

pub async fn revoke_agent(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path((tenant_id, agent_id)): Path<(String, String)>,
    OptionalJsonBody(req): OptionalJsonBody<RevokeAgentRequest>,
) -> ApiResult<Json<Agent>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let agent_id = path_id("agent", &agent_id)?.to_string();
    let reason = req
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "revoked by tenant".into());
    if reason.len() > 500 {
        return Err(ApiError::validation("reason must be at most 500 characters"));
    }
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    let updated = sqlx::query(
        "UPDATE agents SET revoked_at = $1, revoke_reason = $2, state = 'OFFLINE', auth_changed_at = $1, \
         updated_at = $1 WHERE id = $3 AND tenant_id = $4 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(&reason)
    .bind(&agent_id)
    .bind(&auth.tenant_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 1 {
        let site: String = sqlx::query_scalar("SELECT site_id FROM agents WHERE id = $1")
            .bind(&agent_id)
            .fetch_one(&mut *tx)
            .await?;
        crate::sweeper::recompute_site(&mut tx, &site, now).await?;
        let ev = AuditEvent::new(&auth.tenant_id, "agent.revoke", "agent", &agent_id)
            .actor("USER", Some(&auth.key_id))
            .site(&site)
            .request(&ctx)
            .metadata(serde_json::json!({ "reason": reason }));
        audit::record(&mut tx, &ev).await?;
    }
    let row = sqlx::query(&format!(
        "SELECT {AGENT_COLUMNS} FROM {AGENT_FROM} WHERE a.id = $1 AND a.tenant_id = $2"
    ))
    .bind(&agent_id)
    .bind(&auth.tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some(row) = row else {
        return Err(ApiError::not_found("agent"));
    };
    state.agents.mark_revoked(&agent_id);
    Ok(Json(agent_from_row(&state, &row)?))
}

pub async fn list_hosts(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
) -> ApiResult<Json<HostsResponse>> {
    let site_id = path_id("site", &site_id)?;
    require_site(&state, &auth, &ctx, site_id).await?;
    // The newest non-revoked agent of each host decides its agent fields.
    let rows = sqlx::query(
        "SELECT h.id, h.tenant_id, h.site_id, h.hostname, h.cpu_cores_total, h.memory_bytes_total, \
         h.storage_bytes_total, h.kvm_available, h.cloud_hypervisor_available, h.last_facts_at, \
         a.id, a.state, a.last_heartbeat_at, a.agent_version, a.os, a.arch, a.kernel_version, a.netbird_json \
         FROM hosts h LEFT JOIN agents a ON a.id = (SELECT a2.id FROM agents a2 WHERE a2.host_id = h.id \
         AND a2.revoked_at IS NULL ORDER BY a2.enrolled_at DESC LIMIT 1) \
         WHERE h.tenant_id = $1 AND h.site_id = $2 ORDER BY h.hostname",
    )
    .bind(&auth.tenant_id)
    .bind(site_id)
    .fetch_all(&state.db.pool)
    .await?;
    let hosts = rows
        .iter()
        .map(|r| {
            let agent_state: Option<String> = r.try_get(11)?;
            let netbird: Option<String> = r.try_get(17)?;
            Ok(Host {
                id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                site_id: r.try_get(2)?,
                hostname: r.try_get(3)?,
                cpu_cores_total: r.try_get(4)?,
                memory_bytes_total: r.try_get(5)?,
                storage_bytes_total: r.try_get(6)?,
                kvm_available: r.try_get::<i64, _>(7)? != 0,
                cloud_hypervisor_available: r.try_get::<i64, _>(8)? != 0,
                last_facts_at: rfc3339_opt(r.try_get(9)?),
                agent_id: r.try_get(10)?,
                agent_state: agent_state.unwrap_or_else(|| "OFFLINE".into()),
                agent_last_heartbeat_at: rfc3339_opt(r.try_get(12)?),
                agent_version: r.try_get(13)?,
                os: r.try_get(14)?,
                arch: r.try_get(15)?,
                kernel_version: r.try_get(16)?,
                netbird_status: netbird.and_then(|j| serde_json::from_str::<NetbirdStatus>(&j).ok()),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(HostsResponse { hosts }))
}

pub async fn list_api_keys(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
) -> ApiResult<Json<ApiKeysResponse>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let rows = sqlx::query(
        "SELECT id, tenant_id, name, created_at, expires_at, last_used_at, revoked_at FROM api_keys \
         WHERE tenant_id = $1 ORDER BY created_at, id",
    )
    .bind(&auth.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    let api_keys = rows
        .iter()
        .map(|r| {
            Ok(ApiKeyInfo {
                id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                name: r.try_get(2)?,
                created_at: rfc3339(r.try_get(3)?),
                expires_at: rfc3339_opt(r.try_get(4)?),
                last_used_at: rfc3339_opt(r.try_get(5)?),
                revoked_at: rfc3339_opt(r.try_get(6)?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(ApiKeysResponse { api_keys }))
}

/// Revokes an API key of the tenant (204); a revoked key is refused from the next request on.
pub async fn delete_api_key(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path((tenant_id, key_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let key_id = path_id("api key", &key_id)?;
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    let updated =
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(key_id)
            .bind(&auth.tenant_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if updated == 0 {
        return Err(ApiError::not_found("api key"));
    }
    let ev = AuditEvent::new(&auth.tenant_id, "apikey.delete", "api_key", key_id)
        .actor("USER", Some(&auth.key_id))
        .request(&ctx);
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_enrollment_tokens(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
) -> ApiResult<Json<EnrollmentTokensResponse>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let rows = sqlx::query(
        "SELECT t.id, t.site_id, s.name, t.created_at, t.expires_at, t.used_at, t.used_by_agent_id \
         FROM enrollment_tokens t JOIN sites s ON s.id = t.site_id WHERE t.tenant_id = $1 \
         ORDER BY t.created_at DESC, t.id",
    )
    .bind(&auth.tenant_id)
    .fetch_all(&state.db.pool)
    .await?;
    let tokens = rows
        .iter()
        .map(|r| {
            let used_at: Option<i64> = r.try_get(5)?;
            Ok(EnrollmentTokenInfo {
                id: r.try_get(0)?,
                site_id: r.try_get(1)?,
                site_name: r.try_get(2)?,
                created_at: rfc3339(r.try_get(3)?),
                expires_at: rfc3339(r.try_get(4)?),
                consumed: used_at.is_some(),
                consumed_at: rfc3339_opt(used_at),
                consumed_by_agent_id: r.try_get(6)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(EnrollmentTokensResponse { tokens }))
}
