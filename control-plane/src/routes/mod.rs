//! The HTTP API: one router, handlers as plain async fns over the shared state, grouped by who calls them.

mod admin;
mod agent;
mod agent_plans;
mod desired;
mod enroll;
mod health;
mod plans;
mod releases;
mod rollouts;
mod tenant;

use crate::error::ApiError;
use crate::extract::MAX_BODY_BYTES;
use crate::state::SharedState;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use nkudo_core::api::ErrorCode;
use std::time::Instant;

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        // admin
        .route("/tenants", post(admin::create_tenant).get(admin::list_tenants))
        .route(
            "/tenants/{tenant_id}/api-keys",
            post(admin::create_api_key).get(tenant::list_api_keys),
        )
        // tenant
        .route(
            "/tenants/{tenant_id}/sites",
            post(tenant::create_site).get(tenant::list_sites),
        )
        .route("/tenants/{tenant_id}/api-keys/{key_id}", delete(tenant::delete_api_key))
        .route(
            "/tenants/{tenant_id}/enrollment-tokens",
            post(tenant::create_enrollment_token).get(tenant::list_enrollment_tokens),
        )
        .route("/tenants/{tenant_id}/agents", get(tenant::list_agents))
        .route(
            "/tenants/{tenant_id}/agents/{agent_id}/revoke",
            post(tenant::revoke_agent),
        )
        .route("/sites/{site_id}/hosts", get(tenant::list_hosts))
        .route("/sites/{site_id}/plans", post(plans::apply_plan))
        .route("/sites/{site_id}/plans/{plan_id}", get(plans::get_plan))
        .route("/sites/{site_id}/executions", get(plans::list_executions))
        .route("/sites/{site_id}/vms", get(plans::list_vms))
        .route("/executions/{execution_id}/logs", get(plans::execution_logs))
        // enrollment (token) and agents (mTLS)
        .route("/enroll", post(enroll::enroll))
        .route("/v1/enroll", post(enroll::enroll))
        .route("/agents/heartbeat", post(agent::heartbeat))
        .route("/v1/heartbeat", post(agent::heartbeat))
        .route("/v1/renew", post(agent::renew))
        .route("/v1/unenroll", post(agent::unenroll))
        .route("/v1/plans/next", get(agent_plans::next_plans))
        .route("/v1/executions/result", post(agent_plans::report_results))
        .route("/agents/logs", post(agent_plans::agent_logs))
        .route("/v1/logs", post(agent_plans::v1_log))
        // releases, desired versions, labels, fleet (admin unless noted)
        .route(
            "/admin/releases",
            post(releases::publish_release).get(releases::list_releases),
        )
        .route("/admin/releases/{version}", get(releases::get_release))
        .route(
            "/admin/releases/{version}/artifacts/{name}",
            put(releases::upload_artifact).get(releases::admin_download),
        )
        .route("/v1/releases/{version}/artifacts/{name}", get(releases::agent_download))
        .route(
            "/admin/desired-versions",
            put(desired::set_desired)
                .get(desired::list_desired)
                .delete(desired::clear_desired),
        )
        .route("/admin/agents", get(desired::fleet_agents))
        .route("/admin/agents/{agent_id}/labels", put(desired::admin_agent_labels))
        .route("/admin/sites/{site_id}/labels", put(desired::admin_site_labels))
        .route("/sites/{site_id}/labels", put(desired::tenant_site_labels))
        .route(
            "/tenants/{tenant_id}/agents/{agent_id}/labels",
            put(desired::tenant_agent_labels),
        )
        // rollouts (admin)
        .route(
            "/admin/rollouts",
            post(rollouts::start_rollout).get(rollouts::list_rollouts),
        )
        .route("/admin/rollouts/plan", post(rollouts::plan_rollout))
        .route("/admin/rollouts/{id}", get(rollouts::get_rollout))
        .route("/admin/rollouts/{id}/decisions", get(rollouts::rollout_decisions))
        .route("/admin/rollouts/{id}/pause", post(rollouts::pause_rollout))
        .route("/admin/rollouts/{id}/resume", post(rollouts::resume_rollout))
        .route("/admin/rollouts/{id}/approve", post(rollouts::approve_rollout))
        .route("/admin/rollouts/{id}/abort", post(rollouts::abort_rollout))
        .route("/admin/rollback", post(rollouts::fleet_rollback))
        .route("/admin/releases/{version}/bad", delete(rollouts::clear_bad))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "route not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "internal error").into_response()
}

/// Counts every request by route template (never the raw path, which holds ids), method and status.
async fn track(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = &state.metrics;
    m.http_requests
        .with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()])
        .inc();
    m.http_request_duration
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    resp
}
