//! Admin routes for rollouts (`X-Admin-Key`): plan (dry run), start, list, show, decisions, pause, resume,
//! approve, abort; the fleet-wide rollback; clearing a release's bad mark.

use crate::auth::Admin;
use crate::error::{ApiError, ApiResult};
use crate::extract::{path_id, JsonBody, OptionalJsonBody};
use crate::rollout::controller;
use crate::rollout::plan::{plan, Refusal};
use crate::rollout::store::{self, NewDecision, RolloutRow};
use crate::state::SharedState;
use crate::util::{new_id, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{
    ErrorCode, FleetRollbackRequest, FleetRollbackResponse, Rollout, RolloutDecisionsResponse, RolloutPlan,
    RolloutState, RolloutsResponse, StartRolloutRequest,
};
use nkudo_core::rollout::{parse_policy, Policy};
use sqlx::AnyConnection;

/// Largest policy file accepted.
const MAX_POLICY_BYTES: usize = 256 * 1024;

fn parse(req: &StartRolloutRequest) -> Result<Policy, ApiError> {
    if req.policy.len() > MAX_POLICY_BYTES {
        return Err(ApiError::validation(format!(
            "the policy is larger than {MAX_POLICY_BYTES} bytes"
        )));
    }
    parse_policy(&req.policy).map_err(|e| ApiError::validation(format!("invalid rollout policy:\n{e}")))
}

fn refusal_error(r: &Refusal) -> ApiError {
    match r {
        Refusal::PrereleaseInProduction(..) => {
            ApiError::new(StatusCode::CONFLICT, ErrorCode::PrereleaseInProduction, r.to_string())
        }
        Refusal::NeedsPrometheus(_) => ApiError::validation(r.to_string()),
    }
}

pub async fn plan_rollout(
    _: Admin,
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<StartRolloutRequest>,
) -> ApiResult<Json<RolloutPlan>> {
    let policy = parse(&req)?;
    let mut conn = state.db.pool.acquire().await?;
    let fleet = store::fleet(&mut conn).await?;
    let (mut p, refusals) = plan(&policy, &fleet, &state.rollout_source);
    p.warnings
        .extend(refusals.iter().map(|r| format!("start would be refused: {r}")));
    if let Some(w) = release_problem(&mut conn, &policy.version.to_string()).await? {
        p.warnings.push(format!("start would be refused: {}", w.message));
    }
    Ok(Json(p))
}

/// Why the version cannot be rolled out (not published, or marked bad).
async fn release_problem(conn: &mut AnyConnection, version: &str) -> Result<Option<ApiError>, sqlx::Error> {
    let bad: Option<i64> = sqlx::query_scalar("SELECT bad FROM releases WHERE version = $1")
        .bind(version)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match bad {
        None => Some(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ReleaseNotAvailable,
            format!("release {version} is not published: `releaser publish` it first"),
        )),
        Some(b) if b != 0 => Some(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::VersionMarkedBad,
            format!("release {version} is marked bad (rolled back by a rollout); clear the mark first"),
        )),
        Some(_) => None,
    })
}

pub async fn start_rollout(
    _: Admin,
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<StartRolloutRequest>,
) -> ApiResult<(StatusCode, Json<Rollout>)> {
    let policy = parse(&req)?;
    let version = policy.version.to_string();
    let mut tx = state.db.begin_write().await?;
    if let Some(active) = store::active(&mut tx).await? {
        return Err(ApiError::conflict(format!(
            "rollout {} of {} is {}: abort it or wait for it to finish",
            active.id,
            active.version,
            active.state.as_str()
        )));
    }
    if let Some(e) = release_problem(&mut tx, &version).await? {
        return Err(e);
    }
    let fleet = store::fleet(&mut tx).await?;
    let (_, refusals) = plan(&policy, &fleet, &state.rollout_source);
    if let Some(r) = refusals.first() {
        return Err(refusal_error(r));
    }
    let now = now_ms();
    let r = RolloutRow {
        id: new_id(),
        name: policy.name.clone(),
        version: version.clone(),
        previous_version: policy.previous_version.as_ref().map(|v| v.to_string()),
        policy_text: req.policy.clone(),
        state: RolloutState::Running,
        current_stage: 0,
        approved_stage: -1,
        triggers_json: "{}".into(),
        baseline_json: "{}".into(),
        metrics_source: state.rollout_source.name().into(),
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    let names: Vec<String> = policy.stages.iter().map(|s| s.name.clone()).collect();
    store::insert(&mut tx, &r, &names).await?;
    store::append_decision(
        &mut tx,
        &r.id,
        NewDecision {
            actor: "admin",
            kind: "started",
            values: serde_json::json!({"stages": names, "metrics_source": r.metrics_source}),
            action: format!("rollout of {version} started with {} stage(s)", policy.stages.len()),
            ..Default::default()
        },
        now,
    )
    .await?;
    let view = crate::rollout::view(&mut tx, &r, 20).await?;
    tx.commit().await?;
    crate::rollout::publish_metrics(&state.rollout_metrics, &r);
    state.rollout_metrics.decisions.with_label_values(&["started"]).inc();
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list_rollouts(_: Admin, State(state): State<SharedState>) -> ApiResult<Json<RolloutsResponse>> {
    let mut conn = state.db.pool.acquire().await?;
    let rows = store::list(&mut conn, 100).await?;
    let mut rollouts = Vec::with_capacity(rows.len());
    for r in &rows {
        rollouts.push(crate::rollout::view(&mut conn, r, 5).await?);
    }
    Ok(Json(RolloutsResponse { rollouts }))
}

async fn load(conn: &mut AnyConnection, id: &str) -> Result<RolloutRow, ApiError> {
    let id = path_id("rollout", id)?;
    store::get(conn, id)
        .await?
        .ok_or_else(|| ApiError::not_found("rollout"))
}

pub async fn get_rollout(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Rollout>> {
    let mut conn = state.db.pool.acquire().await?;
    let r = load(&mut conn, &id).await?;
    Ok(Json(crate::rollout::view(&mut conn, &r, 20).await?))
}

pub async fn rollout_decisions(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutDecisionsResponse>> {
    let mut conn = state.db.pool.acquire().await?;
    let r = load(&mut conn, &id).await?;
    let (decisions, chain_ok) = store::decisions(&mut conn, &r.id, None).await?;
    Ok(Json(RolloutDecisionsResponse { decisions, chain_ok }))
}

/// Optional body of pause/abort/approve: a reason for the log.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    #[serde(default)]
    pub reason: Option<String>,
}

async fn act(state: &SharedState, id: &str, body: ActionBody, action: &'static str) -> Result<Json<Rollout>, ApiError> {
    let reason = body.reason.map(|r| r.chars().take(500).collect::<String>());
    let mut tx = state.db.begin_write().await?;
    let mut r = load(&mut tx, id).await?;
    let loaded_at = r.updated_at;
    let seq_at_start = store::last_decision_seq(&mut tx, &r.id).await?;
    let now = now_ms();
    if r.state.is_final() {
        return Err(ApiError::conflict(format!(
            "rollout {} is already {}",
            r.id,
            r.state.as_str()
        )));
    }
    let (kind, text): (&'static str, String) = match action {
        "pause" => {
            if r.state == RolloutState::Paused {
                return Err(ApiError::conflict("the rollout is already paused"));
            }
            r.state = RolloutState::Paused;
            (
                "paused",
                "paused: no further step until resumed (triggers are still evaluated)".into(),
            )
        }
        "resume" => {
            if r.state != RolloutState::Paused {
                return Err(ApiError::conflict(format!(
                    "the rollout is {}, not paused",
                    r.state.as_str()
                )));
            }
            r.state = RolloutState::Running;
            ("resumed", "resumed".into())
        }
        "approve" => {
            if r.state != RolloutState::WaitingApproval {
                return Err(ApiError::conflict(format!(
                    "the rollout is {}, not waiting at a manual gate",
                    r.state.as_str()
                )));
            }
            r.approved_stage = r.current_stage;
            r.state = RolloutState::Running;
            ("approved", format!("stage {} approved", r.current_stage))
        }
        _ => {
            let why = reason.clone().unwrap_or_else(|| "aborted by an operator".into());
            controller::abort(&mut tx, &mut r, why, now)
                .await
                .map_err(|e| ApiError::internal("abort failed", e))?;
            ("aborted", String::new())
        }
    };
    if kind != "aborted" {
        store::append_decision(
            &mut tx,
            &r.id,
            NewDecision {
                actor: "admin",
                kind,
                values: serde_json::json!({"reason": reason}),
                action: text,
                ..Default::default()
            },
            now,
        )
        .await?;
    }
    r.updated_at = now.max(loaded_at + 1);
    if !store::save_if_unchanged(&mut tx, &r, loaded_at).await? {
        return Err(ApiError::conflict("the rollout changed meanwhile; retry"));
    }
    let view = crate::rollout::view(&mut tx, &r, 20).await?;
    let kinds = store::decision_kinds_after(&mut tx, &r.id, seq_at_start).await?;
    tx.commit().await?;
    crate::rollout::publish_metrics(&state.rollout_metrics, &r);
    crate::rollout::count_decisions(&state.rollout_metrics, &kinds);
    Ok(Json(view))
}

pub async fn pause_rollout(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<ActionBody>,
) -> ApiResult<Json<Rollout>> {
    act(&state, &id, body, "pause").await
}

pub async fn resume_rollout(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<ActionBody>,
) -> ApiResult<Json<Rollout>> {
    act(&state, &id, body, "resume").await
}

pub async fn approve_rollout(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<ActionBody>,
) -> ApiResult<Json<Rollout>> {
    act(&state, &id, body, "approve").await
}

pub async fn abort_rollout(
    _: Admin,
    State(state): State<SharedState>,
    Path(id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody<ActionBody>,
) -> ApiResult<Json<Rollout>> {
    act(&state, &id, body, "abort").await
}

/// `POST /admin/rollback`: the whole fleet, or a selection, goes to `version` (a signed rollback target).
pub async fn fleet_rollback(
    _: Admin,
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<FleetRollbackRequest>,
) -> ApiResult<Json<FleetRollbackResponse>> {
    let version = nkudo_core::version::parse(&req.version)
        .map_err(|e| ApiError::validation(format!("version: {e}")))?
        .to_string();
    let mut tx = state.db.begin_write().await?;
    if let Some(e) = release_problem(&mut tx, &version).await? {
        return Err(e);
    }
    if let Some(active) = store::active(&mut tx).await? {
        return Err(ApiError::conflict(format!(
            "rollout {} is {}: abort it first (`releaser rollout abort {}`), which already sends its agents back",
            active.id,
            active.state.as_str(),
            active.id
        )));
    }
    let fleet = store::fleet(&mut tx).await?;
    let any = |list: &[String], values: &[&str]| list.is_empty() || list.iter().any(|x| values.contains(&x.as_str()));
    let ids: Vec<(String, String)> = fleet
        .iter()
        .filter(|a| {
            any(&req.tenants, &[&a.tenant_id, &a.tenant_slug])
                && any(&req.sites, &[&a.site_id, &a.site_name])
                && any(&req.rings, &[a.ring.as_deref().unwrap_or("")])
                && any(&req.agents, &[&a.id])
        })
        .map(|a| (a.id.clone(), version.clone()))
        .collect();
    if ids.is_empty() {
        return Err(ApiError::validation("the selection matches no agent"));
    }
    if nkudo_core::version::Channel::of(
        &nkudo_core::version::parse(&version).map_err(|e| ApiError::validation(e.to_string()))?,
    ) == nkudo_core::version::Channel::PreRelease
    {
        let prod = fleet
            .iter()
            .filter(|a| ids.iter().any(|(id, _)| id == &a.id))
            .filter(|a| a.environment.as_deref() == Some(nkudo_core::api::ENVIRONMENT_PRODUCTION))
            .count();
        if prod > 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::PrereleaseInProduction,
                format!("{version} is a pre-release and {prod} selected agent(s) are in production"),
            ));
        }
    }
    store::set_agent_desired(&mut tx, &ids, true, "admin:rollback", now_ms()).await?;
    tx.commit().await?;
    Ok(Json(FleetRollbackResponse {
        version,
        agents: ids.len() as i64,
    }))
}

/// `DELETE /admin/releases/{version}/bad`: an operator clears a release's bad mark.
pub async fn clear_bad(
    _: Admin,
    State(state): State<SharedState>,
    Path(version): Path<String>,
) -> ApiResult<StatusCode> {
    let version = nkudo_core::version::parse(&version)
        .map_err(|e| ApiError::validation(format!("version: {e}")))?
        .to_string();
    let n = sqlx::query("UPDATE releases SET bad = 0, bad_reason = NULL, bad_at = NULL WHERE version = $1")
        .bind(&version)
        .execute(&state.db.pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("release"));
    }
    Ok(StatusCode::NO_CONTENT)
}
