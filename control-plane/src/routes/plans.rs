//! Tenant plan routes (`X-API-Key`): apply a plan (idempotent per key), read a plan, list executions, read an
//! execution's logs, list a site's microVMs.

use super::tenant::require_site;
use crate::audit::{self, AuditEvent};
use crate::auth::{RequestCtx, TenantAuth};
use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use crate::extract::{path_id, JsonBody, QueryParams};
use crate::plans::{self, execution_from_row, ValidAction, EXECUTION_COLUMNS};
use crate::state::SharedState;
use crate::util::{new_id, now_ms, rfc3339, rfc3339_opt, sha256_hex};
use axum::extract::{Path, State};
use axum::Json;
use nkudo_core::api::{
    ApplyPlanRequest, ApplyPlanResponse, ExecutionLog, ExecutionLogsResponse, ExecutionsResponse, MicroVm,
    MicroVmsResponse,
};
use serde::Deserialize;
use sqlx::Row;

async fn plan_response(state: &SharedState, plan_id: &str, deduplicated: bool) -> ApiResult<ApplyPlanResponse> {
    let mut conn = state.db.pool.acquire().await?;
    let row = sqlx::query("SELECT plan_version, status FROM plans WHERE id = $1")
        .bind(plan_id)
        .fetch_one(&mut *conn)
        .await?;
    let executions = plans::plan_executions(&mut conn, plan_id).await?;
    Ok(ApplyPlanResponse {
        plan_id: plan_id.to_string(),
        plan_version: row.try_get(0)?,
        plan_status: row.try_get(1)?,
        deduplicated,
        executions,
    })
}

/// An existing plan under this key: the same body returns it, another body is a conflict.
async fn existing_plan(
    state: &SharedState,
    auth: &TenantAuth,
    site_id: &str,
    key: &str,
    request_sha256: &str,
) -> ApiResult<Option<ApplyPlanResponse>> {
    let row = sqlx::query(
        "SELECT id, request_sha256 FROM plans WHERE tenant_id = $1 AND site_id = $2 AND idempotency_key = $3",
    )
    .bind(&auth.tenant_id)
    .bind(site_id)
    .bind(key)
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let id: String = row.try_get(0)?;
    let stored: String = row.try_get(1)?;
    if stored != request_sha256 {
        return Err(ApiError::conflict(
            "idempotency_key was already used with a different request body",
        ));
    }
    Ok(Some(plan_response(state, &id, true).await?))
}

/// Checks the VMs that START/STOP/DELETE name exist in this site (or are created earlier in the same plan), and
/// that a CREATE does not take a VM id of another site.
async fn check_vms(state: &SharedState, tenant: &str, site: &str, actions: &[ValidAction]) -> ApiResult<()> {
    let mut created = std::collections::HashSet::new();
    for (i, a) in actions.iter().enumerate() {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT site_id, state FROM microvms WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(&a.vm_id)
                .fetch_optional(&state.db.pool)
                .await?;
        match (a.operation, row) {
            ("CREATE", Some((other_site, _))) if other_site != site => {
                return Err(ApiError::conflict(format!(
                    "actions[{i}].vm_id: VM {} belongs to another site",
                    a.vm_id
                )))
            }
            ("CREATE", Some((_, vm_state))) if vm_state != "DELETED" => {
                return Err(ApiError::conflict(format!(
                    "actions[{i}].vm_id: VM {} already exists ({vm_state}); delete it first or use another id",
                    a.vm_id
                )))
            }
            ("CREATE", _) => {
                if !created.insert(a.vm_id.clone()) {
                    return Err(ApiError::validation(format!(
                        "actions[{i}].vm_id: VM {} is created twice in this plan",
                        a.vm_id
                    )));
                }
            }
            (_, Some((vm_site, vm_state))) if vm_site == site && vm_state != "DELETED" => {}
            _ if created.contains(&a.vm_id) => {}
            _ => {
                return Err(ApiError::validation(format!(
                    "actions[{i}].vm_id: no VM {} in this site",
                    a.vm_id
                )))
            }
        }
    }
    Ok(())
}

pub async fn apply_plan(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
    JsonBody(req): JsonBody<ApplyPlanRequest>,
) -> ApiResult<Json<ApplyPlanResponse>> {
    let site_id = path_id("site", &site_id)?.to_string();
    require_site(&state, &auth, &ctx, &site_id).await?;
    let key = req.idempotency_key.trim().to_string();
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::validation(
            "idempotency_key is required (at most 200 characters)",
        ));
    }
    if req.client_request_id.as_ref().is_some_and(|c| c.len() > 200) {
        return Err(ApiError::validation("client_request_id must be at most 200 characters"));
    }
    // The hash covers the request as understood (trimmed key), so that `"k"` and `"k "` are one key.
    let mut normalized = req.clone();
    normalized.idempotency_key = key.clone();
    let request_sha256 = sha256_hex(&serde_json::to_vec(&normalized).unwrap_or_default());
    if let Some(found) = existing_plan(&state, &auth, &site_id, &key, &request_sha256).await? {
        return Ok(Json(found));
    }
    let actions = plans::validate_actions(&req.actions).map_err(ApiError::validation)?;
    if let Err(e) = check_vms(&state, &auth.tenant_id, &site_id, &actions).await {
        // A concurrent apply of this very request may have created the VMs meanwhile: answer as its repeat.
        if let Some(found) = existing_plan(&state, &auth, &site_id, &key, &request_sha256).await? {
            return Ok(Json(found));
        }
        return Err(e);
    }

    let plan_id = new_id();
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    // First statement writes: it locks the site, serialising plan versions of one site.
    sqlx::query("UPDATE sites SET updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(&site_id)
        .execute(&mut *tx)
        .await?;
    let version: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(plan_version), 0) + 1 FROM plans WHERE site_id = $1")
        .bind(&site_id)
        .fetch_one(&mut *tx)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO plans (id, tenant_id, site_id, idempotency_key, request_sha256, client_request_id, \
         plan_version, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'PENDING', $8, $8)",
    )
    .bind(&plan_id)
    .bind(&auth.tenant_id)
    .bind(&site_id)
    .bind(&key)
    .bind(&request_sha256)
    .bind(req.client_request_id.as_deref())
    .bind(version)
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if Db::is_unique_violation(&e) {
            // A concurrent apply with the same key won: answer as a repeat of it.
            drop(tx);
            if let Some(found) = existing_plan(&state, &auth, &site_id, &key, &request_sha256).await? {
                return Ok(Json(found));
            }
        }
        return Err(e.into());
    }
    for (i, a) in actions.iter().enumerate() {
        if a.operation == "CREATE" {
            let created: Option<String> = sqlx::query_scalar(
                "INSERT INTO microvms (tenant_id, id, site_id, name, state, vcpu_count, memory_mib, spec_json, \
                 last_transition_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'CREATING', $5, $6, $7, $8, $8, $8) \
                 ON CONFLICT (tenant_id, id) DO UPDATE SET state = 'CREATING', name = excluded.name, \
                 vcpu_count = excluded.vcpu_count, memory_mib = excluded.memory_mib, spec_json = excluded.spec_json, \
                 host_id = NULL, last_transition_at = excluded.updated_at, updated_at = excluded.updated_at \
                 WHERE microvms.site_id = excluded.site_id AND microvms.state = 'DELETED' RETURNING id",
            )
            .bind(&auth.tenant_id)
            .bind(&a.vm_id)
            .bind(&site_id)
            .bind(&a.name)
            .bind(a.vcpu)
            .bind(a.memory_mib)
            .bind(a.params.to_string())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if created.is_none() {
                // Another plan created this VM since the check above.
                drop(tx);
                if let Some(found) = existing_plan(&state, &auth, &site_id, &key, &request_sha256).await? {
                    return Ok(Json(found));
                }
                return Err(ApiError::conflict(format!(
                    "actions[{i}].vm_id: VM {} already exists",
                    a.vm_id
                )));
            }
        }
        sqlx::query(
            "INSERT INTO executions (id, tenant_id, site_id, plan_id, ordinal, operation_id, operation_type, vm_id, \
             payload_json, state, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'PENDING', $10, $10)",
        )
        .bind(new_id())
        .bind(&auth.tenant_id)
        .bind(&site_id)
        .bind(&plan_id)
        .bind(i as i64)
        .bind(&a.operation_id)
        .bind(a.operation)
        .bind(&a.vm_id)
        .bind(a.params.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    // Guest payload (cloud-init user data) stays out of the audit trail.
    let ops: Vec<serde_json::Value> = actions
        .iter()
        .map(|a| serde_json::json!({ "operation_id": a.operation_id, "operation": a.operation, "vm_id": a.vm_id }))
        .collect();
    let ev = AuditEvent::new(&auth.tenant_id, "plan.apply", "plan", &plan_id)
        .actor("USER", Some(&auth.key_id))
        .site(&site_id)
        .request(&ctx)
        .metadata(serde_json::json!({ "idempotency_key": key, "plan_version": version, "actions": ops }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    state.open_plan_sites.insert(&site_id);
    Ok(Json(plan_response(&state, &plan_id, false).await?))
}

pub async fn get_plan(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path((site_id, plan_id)): Path<(String, String)>,
) -> ApiResult<Json<ApplyPlanResponse>> {
    let site_id = path_id("site", &site_id)?;
    let plan_id = path_id("plan", &plan_id)?;
    require_site(&state, &auth, &ctx, site_id).await?;
    let found: Option<String> =
        sqlx::query_scalar("SELECT id FROM plans WHERE id = $1 AND tenant_id = $2 AND site_id = $3")
            .bind(plan_id)
            .bind(&auth.tenant_id)
            .bind(site_id)
            .fetch_optional(&state.db.pool)
            .await?;
    if found.is_none() {
        return Err(ApiError::not_found("plan"));
    }
    Ok(Json(plan_response(&state, plan_id, false).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionsQuery {
    status: Option<String>,
    limit: Option<i64>,
}

pub async fn list_executions(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
    QueryParams(q): QueryParams<ExecutionsQuery>,
) -> ApiResult<Json<ExecutionsResponse>> {
    let site_id = path_id("site", &site_id)?;
    require_site(&state, &auth, &ctx, site_id).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 1000"));
    }
    let mut states = Vec::new();
    for s in q
        .status
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let s = s.to_ascii_uppercase();
        if !["PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED", "CANCELLED"].contains(&s.as_str()) {
            return Err(ApiError::validation(format!("unknown status {s}")));
        }
        states.push(s);
    }
    let filter = if states.is_empty() {
        String::new()
    } else {
        // Values are from the fixed list above, never raw input.
        format!(
            " AND state IN ({})",
            states.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
        )
    };
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions WHERE tenant_id = $1 AND site_id = $2{filter} \
         ORDER BY created_at DESC, ordinal LIMIT $3"
    ))
    .bind(&auth.tenant_id)
    .bind(site_id)
    .bind(limit)
    .fetch_all(&state.db.pool)
    .await?;
    let executions = rows.iter().map(execution_from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(ExecutionsResponse { executions }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    limit: Option<i64>,
    after_sequence: Option<i64>,
}

pub async fn execution_logs(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(execution_id): Path<String>,
    QueryParams(q): QueryParams<LogsQuery>,
) -> ApiResult<Json<ExecutionLogsResponse>> {
    let execution_id = path_id("execution", &execution_id)?;
    let owner: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM executions WHERE id = $1")
        .bind(execution_id)
        .fetch_optional(&state.db.pool)
        .await?;
    match owner {
        Some(t) if t == auth.tenant_id => {}
        Some(_) => {
            auth.cross_tenant(&state, &ctx, "execution", execution_id).await;
            return Err(ApiError::not_found("execution"));
        }
        None => return Err(ApiError::not_found("execution")),
    }
    let limit = match q.limit {
        None => 500,
        Some(l) if (1..=2000).contains(&l) => l,
        Some(_) => return Err(ApiError::validation("limit must be between 1 and 2000")),
    };
    let after = q.after_sequence.unwrap_or(0);
    let rows = sqlx::query(
        "SELECT tenant_id, execution_id, sequence, severity, message, emitted_at, ingested_at FROM execution_logs \
         WHERE tenant_id = $1 AND execution_id = $2 AND sequence > $3 ORDER BY sequence LIMIT $4",
    )
    .bind(&auth.tenant_id)
    .bind(execution_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.db.pool)
    .await?;
    // One row more than asked tells whether another page follows.
    let more = rows.len() as i64 > limit;
    let logs = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            Ok(ExecutionLog {
                tenant_id: r.try_get(0)?,
                execution_id: r.try_get(1)?,
                sequence: r.try_get(2)?,
                severity: r.try_get(3)?,
                message: r.try_get(4)?,
                emitted_at: rfc3339(r.try_get(5)?),
                ingested_at: rfc3339(r.try_get(6)?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_after_sequence = if more { logs.last().map(|l| l.sequence) } else { None };
    Ok(Json(ExecutionLogsResponse {
        logs,
        next_after_sequence,
    }))
}

pub async fn list_vms(
    auth: TenantAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(site_id): Path<String>,
) -> ApiResult<Json<MicroVmsResponse>> {
    let site_id = path_id("site", &site_id)?;
    require_site(&state, &auth, &ctx, site_id).await?;
    let rows = sqlx::query(
        "SELECT id, tenant_id, site_id, host_id, name, state, vcpu_count, memory_mib, last_transition_at, updated_at \
         FROM microvms WHERE tenant_id = $1 AND site_id = $2 ORDER BY updated_at DESC, id",
    )
    .bind(&auth.tenant_id)
    .bind(site_id)
    .fetch_all(&state.db.pool)
    .await?;
    let vms = rows
        .iter()
        .map(|r| {
            let host: Option<String> = r.try_get(3)?;
            Ok(MicroVm {
                id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                site_id: r.try_get(2)?,
                host_id: host.unwrap_or_default(),
                name: r.try_get(4)?,
                state: r.try_get(5)?,
                vcpu_count: r.try_get(6)?,
                memory_mib: r.try_get(7)?,
                last_transition_at: rfc3339_opt(r.try_get(8)?),
                updated_at: rfc3339(r.try_get(9)?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(MicroVmsResponse { vms }))
}
