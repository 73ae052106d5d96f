//! Liveness, readiness (the database answers) and metrics.

use crate::error::ApiError;
use crate::state::SharedState;
use crate::util::{now_ms, rfc3339};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use nkudo_core::api::{ErrorCode, HealthResponse};

pub async fn healthz() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        time: rfc3339(now_ms()),
    })
}

pub async fn readyz(State(state): State<SharedState>) -> Result<Json<HealthResponse>, ApiError> {
    match tokio::time::timeout(std::time::Duration::from_secs(3), state.db.ping()).await {
        Ok(Ok(())) => Ok(Json(HealthResponse {
            status: "ready".into(),
            time: rfc3339(now_ms()),
        })),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "database unreachable",
        )),
    }
}

pub async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
