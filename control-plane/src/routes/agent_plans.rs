//! Agent plan routes (mTLS): lease plans, report execution results, stream logs. Bodies tolerate unknown
//! fields (the earlier agent sends `execution_id` and `started_at` in results, which it refused).

use crate::auth::AgentAuth;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::plans::{self, Lessee, Transition};
use crate::state::SharedState;
use crate::util::now_ms;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{
    AgentLogsRequest, ErrorCode, ExecutionResultRequest, LeasedPlan, LogEntry, LogFrame, LogIngestResponse,
    NextPlansResponse,
};
use sqlx::AnyConnection;

/// Most log lines per batch.
const MAX_LOG_BATCH: usize = 1000;
const MAX_LOG_MESSAGE: usize = 16 * 1024;
const MAX_RESULTS: usize = 1000;

pub fn lessee(auth: &AgentAuth) -> Lessee<'_> {
    Lessee {
        tenant_id: &auth.agent.tenant_id,
        site_id: &auth.agent.site_id,
        host_id: &auth.agent.host_id,
        agent_id: &auth.agent.id,
    }
}

/// Leases the agent's plans, skipping the database when its site has nothing open.
pub async fn lease_for(state: &SharedState, auth: &AgentAuth) -> Result<Vec<LeasedPlan>, ApiError> {
    if !state.open_plan_sites.contains(&auth.agent.site_id) {
        return Ok(Vec::new());
    }
    let ttl = state.cfg.plan_lease_ttl.as_millis() as i64;
    Ok(plans::lease(&state.db, &lessee(auth), state.cfg.max_pending_plans, ttl).await?)
}

pub async fn next_plans(auth: AgentAuth, State(state): State<SharedState>) -> ApiResult<Json<NextPlansResponse>> {
    Ok(Json(NextPlansResponse {
        plans: lease_for(&state, &auth).await?,
    }))
}

/// Whether `execution_id` is an execution of another tenant than the agent's (a tenant isolation violation,
/// which answers like an unknown execution but is counted and audited).
async fn foreign_execution(
    conn: &mut AnyConnection,
    who: &Lessee<'_>,
    execution_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let Some(id) = execution_id.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let owner: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM executions WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(owner.is_some_and(|t| t != who.tenant_id))
}

/// The execution a report names: an execution id of the agent's site, or (earlier agents) a plan id plus the
/// action id.
async fn resolve_execution(
    conn: &mut AnyConnection,
    who: &Lessee<'_>,
    execution_id: Option<&str>,
    plan_id: Option<&str>,
    action_id: Option<&str>,
) -> Result<Option<String>, sqlx::Error> {
    if let Some(id) = execution_id.filter(|s| !s.is_empty()) {
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM executions WHERE id = $1 AND tenant_id = $2 AND site_id = $3")
                .bind(id)
                .bind(who.tenant_id)
                .bind(who.site_id)
                .fetch_optional(&mut *conn)
                .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    let plan = plan_id
        .filter(|s| !s.is_empty())
        .or(execution_id.filter(|s| !s.is_empty()));
    match (plan, action_id.filter(|s| !s.is_empty())) {
        (Some(plan), Some(action)) => sqlx::query_scalar(
            "SELECT id FROM executions WHERE plan_id = $1 AND operation_id = $2 AND tenant_id = $3 AND site_id = $4",
        )
        .bind(plan)
        .bind(action)
        .bind(who.tenant_id)
        .bind(who.site_id)
        .fetch_optional(&mut *conn)
        .await,
        _ => Ok(None),
    }
}

pub async fn report_results(
    auth: AgentAuth,
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<ExecutionResultRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if req.results.is_empty() {
        return Err(ApiError::validation("results are required"));
    }
    if req.results.len() > MAX_RESULTS {
        return Err(ApiError::validation(format!(
            "at most {MAX_RESULTS} results per report"
        )));
    }
    let who = lessee(&auth);
    let mut tx = state.db.begin_write().await?;
    // SQLite: the transaction must begin with a write, so take the agent's row first (a no-op update).
    sqlx::query("UPDATE agents SET updated_at = updated_at WHERE id = $1")
        .bind(who.agent_id)
        .execute(&mut *tx)
        .await?;
    let mut transitions = Vec::with_capacity(req.results.len());
    let mut unknown = 0;
    let mut foreign = Vec::new();
    for r in &req.results {
        let exec = resolve_execution(
            &mut tx,
            &who,
            r.execution_id.as_deref(),
            req.plan_id.as_deref().or(req.execution_id.as_deref()),
            Some(r.action_id.as_str()),
        )
        .await?;
        let Some(execution_id) = exec else {
            unknown += 1;
            if foreign_execution(&mut tx, &who, r.execution_id.as_deref()).await? {
                foreign.push(r.execution_id.clone().unwrap_or_default());
            }
            continue;
        };
        transitions.push(Transition {
            execution_id,
            state: if r.ok { "SUCCEEDED" } else { "FAILED" },
            error_code: r.error_code.clone(),
            error_message: r.message.clone(),
        });
    }
    if transitions.is_empty() {
        drop(tx);
        record_foreign(&state, &auth, &foreign).await;
        return Err(ApiError::not_found("execution"));
    }
    let applied = plans::apply_transitions(&mut tx, &who, &transitions).await?;
    tx.commit().await?;
    record_foreign(&state, &auth, &foreign).await;
    applied.count(&state.metrics);
    let changed = applied.changed;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "status": "accepted", "applied": changed, "unknown": unknown })),
    ))
}

/// Counts and audits the other tenants' executions a request named (after its transaction ended).
/// At most [`MAX_FOREIGN_AUDITED`] per request are recorded, so a misbehaving agent cannot flood the audit trail.
async fn record_foreign(state: &SharedState, auth: &AgentAuth, ids: &[String]) {
    for id in ids.iter().take(MAX_FOREIGN_AUDITED) {
        auth.cross_tenant(state, "execution", id).await;
    }
    if ids.len() > MAX_FOREIGN_AUDITED {
        tracing::warn!(agent_id = %auth.agent.id, more = ids.len() - MAX_FOREIGN_AUDITED,
            "further cross-tenant execution ids in the same request were not recorded");
    }
}

/// Most cross-tenant execution ids of one request that are counted and audited.
const MAX_FOREIGN_AUDITED: usize = 5;

fn severity(s: &str) -> &'static str {
    match s.trim().to_ascii_uppercase().as_str() {
        "DEBUG" | "TRACE" => "DEBUG",
        "WARN" | "WARNING" => "WARN",
        "ERROR" | "FATAL" => "ERROR",
        _ => "INFO",
    }
}

fn parse_time(s: Option<&str>, fallback: i64) -> i64 {
    s.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .filter(|ms| *ms > 0)
        .unwrap_or(fallback)
}

async fn ingest(state: &SharedState, auth: &AgentAuth, entries: &[LogEntry]) -> ApiResult<LogIngestResponse> {
    if entries.len() > MAX_LOG_BATCH {
        return Err(ApiError::validation(format!(
            "at most {MAX_LOG_BATCH} log entries per batch"
        )));
    }
    let who = lessee(auth);
    let now = now_ms();
    let mut accepted = 0i64;
    let mut tx = state.db.begin_write().await?;
    sqlx::query("UPDATE agents SET updated_at = updated_at WHERE id = $1")
        .bind(who.agent_id)
        .execute(&mut *tx)
        .await?;
    let mut resolved: std::collections::HashMap<(String, Option<String>), Option<String>> = Default::default();
    let mut foreign = Vec::new();
    for e in entries {
        let key = (e.execution_id.clone(), e.action_id.clone());
        let exec = match resolved.get(&key) {
            Some(found) => found.clone(),
            None => {
                let found =
                    resolve_execution(&mut tx, &who, Some(&e.execution_id), None, e.action_id.as_deref()).await?;
                if found.is_none() && foreign_execution(&mut tx, &who, Some(&e.execution_id)).await? {
                    foreign.push(e.execution_id.clone());
                }
                resolved.insert(key, found.clone());
                found
            }
        };
        let Some(execution_id) = exec else { continue };
        let sequence = if e.sequence > 0 {
            e.sequence
        } else {
            let max: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(sequence), 0) FROM execution_logs WHERE tenant_id = $1 AND execution_id = $2",
            )
            .bind(who.tenant_id)
            .bind(&execution_id)
            .fetch_one(&mut *tx)
            .await?;
            max + 1
        };
        let message: String = e.message.chars().take(MAX_LOG_MESSAGE).collect();
        let inserted = sqlx::query(
            "INSERT INTO execution_logs (tenant_id, execution_id, sequence, severity, message, emitted_at, ingested_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, execution_id, sequence) DO NOTHING",
        )
        .bind(who.tenant_id)
        .bind(&execution_id)
        .bind(sequence)
        .bind(severity(&e.severity))
        .bind(message)
        .bind(parse_time(e.emitted_at.as_deref(), now))
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        accepted += inserted as i64;
    }
    tx.commit().await?;
    record_foreign(state, auth, &foreign).await;
    Ok(LogIngestResponse {
        accepted_frames: accepted,
        dropped_frames: entries.len() as i64 - accepted,
    })
}

pub async fn agent_logs(
    auth: AgentAuth,
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<AgentLogsRequest>,
) -> ApiResult<Json<LogIngestResponse>> {
    if let Some(a) = req.agent_id.as_deref().filter(|a| !a.is_empty()) {
        if a != auth.agent.id {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::AgentIdMismatch,
                "agent_id mismatch",
            ));
        }
    }
    Ok(Json(ingest(&state, &auth, &req.entries).await?))
}

/// One frame per request, as the earlier agent streams them (`level` instead of `severity`).
pub async fn v1_log(
    auth: AgentAuth,
    State(state): State<SharedState>,
    JsonBody(frame): JsonBody<LogFrame>,
) -> ApiResult<(StatusCode, Json<LogIngestResponse>)> {
    if frame.execution_id.trim().is_empty() {
        return Err(ApiError::validation("execution_id required"));
    }
    let entry = LogEntry {
        execution_id: frame.execution_id,
        action_id: frame.action_id,
        sequence: frame.sequence,
        severity: frame.level,
        message: frame.message,
        emitted_at: frame.emitted_at,
    };
    Ok((StatusCode::ACCEPTED, Json(ingest(&state, &auth, &[entry]).await?)))
}
