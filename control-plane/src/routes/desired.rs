//! Desired agent versions (admin), labels of sites and agents (tenant and admin), and the fleet-wide agents view
//! (admin).

use crate::audit::{self, AuditEvent};
use crate::auth::{Admin, RequestCtx, TenantAuth};
use crate::error::{ApiError, ApiResult};
use crate::extract::{path_id, JsonBody, QueryParams};
use crate::releases::desired::{AgentPlace, Entry};
use crate::state::SharedState;
use crate::util::{now_ms, rfc3339};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{
    AgentsResponse, DesiredScope, DesiredVersionEntry, DesiredVersionsResponse, ErrorCode, SetDesiredVersionRequest,
    SetLabelsRequest, Site, ENVIRONMENT_PRODUCTION,
};
use nkudo_core::version::Channel;
use std::collections::BTreeMap;

fn entry_view(e: &Entry, agents: i64) -> DesiredVersionEntry {
    DesiredVersionEntry {
        scope: e.scope,
        target: (e.scope != DesiredScope::Fleet).then(|| e.target.clone()),
        version: e.version.clone(),
        rollback: e.rollback,
        set_by: e.set_by.clone(),
        set_at: rfc3339(e.set_at),
        agents,
    }
}

/// Checks the scope's target: absent for the fleet, a ring name, or an existing site or agent id.
async fn target_of(state: &SharedState, scope: DesiredScope, target: Option<&str>) -> Result<String, ApiError> {
    let target = target.map(str::trim).filter(|t| !t.is_empty());
    match (scope, target) {
        (DesiredScope::Fleet, None) => Ok(String::new()),
        (DesiredScope::Fleet, Some(_)) => Err(ApiError::validation("scope fleet takes no target")),
        (_, None) => Err(ApiError::validation(format!("scope {} needs a target", scope.as_str()))),
        (DesiredScope::Ring, Some(r)) => {
            if crate::labels::valid(r) {
                Ok(r.to_string())
            } else {
                Err(ApiError::validation("invalid ring name"))
            }
        }
        (DesiredScope::Site, Some(id)) => {
            let id = path_id("site", id)?;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sites WHERE id = $1")
                .bind(id)
                .fetch_one(&state.db.pool)
                .await?;
            if n == 0 {
                return Err(ApiError::not_found("site"));
            }
            Ok(id.to_string())
        }
        (DesiredScope::Agent, Some(id)) => {
            let id = path_id("agent", id)?;
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_one(&state.db.pool)
                .await?;
            if n == 0 {
                return Err(ApiError::not_found("agent"));
            }
            Ok(id.to_string())
        }
    }
}

pub async fn set_desired(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    JsonBody(req): JsonBody<SetDesiredVersionRequest>,
) -> ApiResult<Json<DesiredVersionEntry>> {
    let version =
        nkudo_core::version::parse(&req.version).map_err(|e| ApiError::validation(format!("version: {e}")))?;
    let target = target_of(&state, req.scope, req.target.as_deref()).await?;
    // Fresh view of releases and labels (another replica may have just changed them).
    state.desired.refresh_releases(&state.db.pool).await?;
    state.desired.refresh_places(&state.db.pool).await?;
    let v = version.to_string();
    let Some(rel) = state.desired.release(&v) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ReleaseNotAvailable,
            format!("release {v} is not published: `releaser publish` it first"),
        ));
    };
    if rel.bad {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::VersionMarkedBad,
            format!("release {v} is marked bad (rolled back by a rollout); clear the mark first"),
        ));
    }
    if !rel
        .edge_tarballs
        .values()
        .any(|t| t.3 || rel.external_base_url.is_some())
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ReleaseNotAvailable,
            format!("release {v} has no nkudo-edge tarball an agent could fetch (upload it or register an external base URL)"),
        ));
    }
    if Channel::of(&version) == Channel::PreRelease {
        let covered = state.desired.agents_in_scope(req.scope, &target);
        let prod: Vec<&(String, AgentPlace)> = covered
            .iter()
            .filter(|(_, p)| p.environment() == Some(ENVIRONMENT_PRODUCTION))
            .collect();
        if !prod.is_empty() {
            let mut sites: Vec<&str> = prod.iter().map(|(_, p)| p.site_id.as_str()).collect();
            sites.sort();
            sites.dedup();
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::PrereleaseInProduction,
                format!(
                    "{v} is a pre-release and {} agent(s) in this scope are in environment production (sites {}): \
                     promote it to a release first",
                    prod.len(),
                    sites.join(", ")
                ),
            ));
        }
    }
    let now = now_ms();
    let e = Entry {
        scope: req.scope,
        target,
        version: v,
        rollback: req.rollback,
        set_by: "admin".into(),
        set_at: now,
    };
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "INSERT INTO desired_versions (scope, target, version, rollback, set_by, set_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (scope, target) DO UPDATE SET version = excluded.version, rollback = excluded.rollback, \
         set_by = excluded.set_by, set_at = excluded.set_at",
    )
    .bind(e.scope.as_str())
    .bind(&e.target)
    .bind(&e.version)
    .bind(e.rollback as i64)
    .bind(&e.set_by)
    .bind(e.set_at)
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, &desired_event("desired_version.set", &ctx, &e)).await?;
    tx.commit().await?;
    state.desired.put(e.clone());
    let agents = state
        .desired
        .entries_with_counts()
        .into_iter()
        .find(|(x, _)| x.scope == e.scope && x.target == e.target)
        .map(|(_, n)| n)
        .unwrap_or(0);
    tracing::info!(scope = e.scope.as_str(), target = %e.target, version = %e.version, rollback = e.rollback, "desired version set");
    Ok(Json(entry_view(&e, agents)))
}

/// Desired versions span tenants (fleet, ring): their events go to the system audit chain (tenant id '').
fn desired_event(action: &'static str, ctx: &RequestCtx, e: &Entry) -> AuditEvent {
    AuditEvent::new(
        "",
        action,
        "desired_version",
        &format!("{}:{}", e.scope.as_str(), e.target),
    )
    .actor("ADMIN", None)
    .request(ctx)
    .metadata(serde_json::json!({
        "scope": e.scope.as_str(),
        "target": e.target,
        "version": e.version,
        "rollback": e.rollback,
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeQuery {
    scope: String,
    #[serde(default)]
    target: Option<String>,
}

pub async fn clear_desired(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    QueryParams(q): QueryParams<ScopeQuery>,
) -> ApiResult<StatusCode> {
    let scope = crate::releases::desired::parse_scope(&q.scope)
        .ok_or_else(|| ApiError::validation("scope must be fleet, ring, site or agent"))?;
    let target = q.target.clone().unwrap_or_default();
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    let n = sqlx::query(
        "UPDATE desired_versions SET version = '', rollback = 0, set_by = 'admin', set_at = $1 \
         WHERE scope = $2 AND target = $3 AND version <> ''",
    )
    .bind(now)
    .bind(scope.as_str())
    .bind(&target)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("desired version entry"));
    }
    let cleared = Entry {
        scope,
        target,
        version: String::new(),
        rollback: false,
        set_by: "admin".into(),
        set_at: now,
    };
    audit::record(&mut tx, &desired_event("desired_version.clear", &ctx, &cleared)).await?;
    tx.commit().await?;
    state.desired.put(cleared);
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_desired(_: Admin, State(state): State<SharedState>) -> ApiResult<Json<DesiredVersionsResponse>> {
    state.desired.refresh_entries(&state.db.pool, false).await?;
    let desired_versions = state
        .desired
        .entries_with_counts()
        .iter()
        .map(|(e, n)| entry_view(e, *n))
        .collect();
    Ok(Json(DesiredVersionsResponse { desired_versions }))
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<String, ApiError> {
    crate::labels::to_json(labels).map_err(ApiError::validation)
}

/// Who changed something, for the audit trail: the admin key, or a tenant's API key.
fn actor(ev: AuditEvent, tenant_key: Option<&str>) -> AuditEvent {
    match tenant_key {
        Some(key_id) => ev.actor("USER", Some(key_id)),
        None => ev.actor("ADMIN", None),
    }
}

async fn write_site_labels(
    state: &SharedState,
    ctx: &RequestCtx,
    tenant_key: Option<&str>,
    site_id: &str,
    labels: &BTreeMap<String, String>,
) -> ApiResult<Site> {
    let json = check_labels(labels)?;
    let mut tx = state.db.begin_write().await?;
    let n = sqlx::query("UPDATE sites SET labels_json = $1, updated_at = $2 WHERE id = $3")
        .bind(&json)
        .bind(now_ms())
        .bind(site_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("site"));
    }
    let row = sqlx::query(&format!(
        "SELECT {} FROM sites WHERE id = $1",
        super::tenant::SITE_COLUMNS
    ))
    .bind(site_id)
    .fetch_one(&mut *tx)
    .await?;
    let site = super::tenant::site_from_row(&row)?;
    let ev = AuditEvent::new(&site.tenant_id, "site.labels", "site", &site.id)
        .site(&site.id)
        .request(ctx)
        .metadata(serde_json::json!({ "labels": labels }));
    audit::record(&mut tx, &actor(ev, tenant_key)).await?;
    tx.commit().await?;
    state.desired.refresh_places(&state.db.pool).await?;
    Ok(site)
}

/// `PUT /sites/{site_id}/labels` (tenant key: its own sites only).
pub async fn tenant_site_labels(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
    JsonBody(req): JsonBody<SetLabelsRequest>,
) -> ApiResult<Json<Site>> {
    let site_id = path_id("site", &site_id)?.to_string();
    super::tenant::require_site(&state, &auth, &ctx, &site_id).await?;
    Ok(Json(
        write_site_labels(&state, &ctx, Some(&auth.key_id), &site_id, &req.labels).await?,
    ))
}

/// `PUT /admin/sites/{site_id}/labels`.
pub async fn admin_site_labels(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
    JsonBody(req): JsonBody<SetLabelsRequest>,
) -> ApiResult<Json<Site>> {
    let site_id = path_id("site", &site_id)?.to_string();
    Ok(Json(
        write_site_labels(&state, &ctx, None, &site_id, &req.labels).await?,
    ))
}

/// Replaces an agent's own labels; `tenant` = the calling tenant (its agents only), `None` for the admin.
async fn write_agent_labels(
    state: &SharedState,
    ctx: &RequestCtx,
    tenant: Option<&TenantAuth>,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
) -> ApiResult<nkudo_core::api::Agent> {
    let json = check_labels(labels)?;
    let mut tx = state.db.begin_write().await?;
    let n = sqlx::query(
        "UPDATE agents SET labels_json = $1, updated_at = $2 WHERE id = $3 AND ($4 = '' OR tenant_id = $4)",
    )
    .bind(&json)
    .bind(now_ms())
    .bind(agent_id)
    .bind(tenant.map(|t| t.tenant_id.as_str()).unwrap_or(""))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("agent"));
    }
    let row = sqlx::query(&format!(
        "SELECT {} FROM {} WHERE a.id = $1",
        super::tenant::AGENT_COLUMNS,
        super::tenant::AGENT_FROM
    ))
    .bind(agent_id)
    .fetch_one(&mut *tx)
    .await?;
    let tenant_id: String = sqlx::Row::try_get(&row, 1)?;
    let site_id: String = sqlx::Row::try_get(&row, 2)?;
    let ev = AuditEvent::new(&tenant_id, "agent.labels", "agent", agent_id)
        .site(&site_id)
        .request(ctx)
        .metadata(serde_json::json!({ "labels": labels }));
    audit::record(&mut tx, &actor(ev, tenant.map(|t| t.key_id.as_str()))).await?;
    tx.commit().await?;
    state.desired.refresh_places(&state.db.pool).await?;
    Ok(super::tenant::agent_from_row(state, &row)?)
}

/// `PUT /tenants/{tenant_id}/agents/{agent_id}/labels`.
pub async fn tenant_agent_labels(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path((tenant_id, agent_id)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetLabelsRequest>,
) -> ApiResult<Json<nkudo_core::api::Agent>> {
    auth.require_tenant(&state, &ctx, &tenant_id).await?;
    let agent_id = path_id("agent", &agent_id)?.to_string();
    Ok(Json(
        write_agent_labels(&state, &ctx, Some(&auth), &agent_id, &req.labels).await?,
    ))
}

/// `PUT /admin/agents/{agent_id}/labels`.
pub async fn admin_agent_labels(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(agent_id): Path<String>,
    JsonBody(req): JsonBody<SetLabelsRequest>,
) -> ApiResult<Json<nkudo_core::api::Agent>> {
    let agent_id = path_id("agent", &agent_id)?.to_string();
    Ok(Json(
        write_agent_labels(&state, &ctx, None, &agent_id, &req.labels).await?,
    ))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetQuery {
    tenant_id: Option<String>,
    site_id: Option<String>,
    version: Option<String>,
    ring: Option<String>,
    environment: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// `GET /admin/agents`: every tenant's agents, filtered, paged by id (`after` = the last id of the page before).
pub async fn fleet_agents(
    _: Admin,
    State(state): State<SharedState>,
    QueryParams(q): QueryParams<FleetQuery>,
) -> ApiResult<Json<AgentsResponse>> {
    let limit = q.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 10000"));
    }
    let mut agents = Vec::new();
    let mut after = q.after.clone().unwrap_or_default();
    // Label filters apply after the query: keep reading pages until this one is full or the fleet ends.
    loop {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM {} WHERE ($1 = '' OR a.tenant_id = $1) AND ($2 = '' OR a.site_id = $2) \
             AND ($3 = '' OR a.agent_version = $3) AND a.id > $4 ORDER BY a.id LIMIT $5",
            super::tenant::AGENT_COLUMNS,
            super::tenant::AGENT_FROM
        ))
        .bind(q.tenant_id.clone().unwrap_or_default())
        .bind(q.site_id.clone().unwrap_or_default())
        .bind(q.version.clone().unwrap_or_default())
        .bind(&after)
        .bind(limit)
        .fetch_all(&state.db.pool)
        .await?;
        let exhausted = (rows.len() as i64) < limit;
        for r in &rows {
            let a = super::tenant::agent_from_row(&state, r)?;
            after = a.id.clone();
            let want = |key: &str, v: &Option<String>| match v {
                None => true,
                Some(v) => a.labels.get(key) == Some(v),
            };
            if want("ring", &q.ring) && want("environment", &q.environment) && (agents.len() as i64) < limit {
                agents.push(a);
            }
        }
        if exhausted || agents.len() as i64 >= limit {
            break;
        }
    }
    Ok(Json(AgentsResponse { agents }))
}
