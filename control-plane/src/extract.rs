//! Request body extraction with typed JSON errors: a body that is too large (413), not JSON or of the wrong
//! shape (400 `INVALID_JSON`), or with missing or unknown fields (400 `VALIDATION_FAILED`). Whether unknown
//! fields are refused is decided by the target type (`deny_unknown_fields` on admin and tenant requests).

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use nkudo_core::api::ErrorCode;
use serde::de::DeserializeOwned;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body is read as `{}` (for requests whose fields are all optional).
pub struct OptionalJsonBody<T>(pub T);

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let msg = e.to_string();
        let code = if e.is_data() && (msg.starts_with("unknown field") || msg.starts_with("missing field")) {
            ErrorCode::ValidationFailed
        } else {
            ErrorCode::InvalidJson
        };
        let text = if e.is_eof() && bytes.iter().all(u8::is_ascii_whitespace) {
            "request body must be a JSON object".to_string()
        } else {
            format!("invalid request body: {msg}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, text)
    })
}

/// Reads the whole body (at most [`MAX_BODY_BYTES`]), answering 413 as JSON when it is larger.
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("request body larger than {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidJson,
                "could not read request body",
            )
        }
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return parse_json(b"{}").map(OptionalJsonBody);
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// Checks a path id: malformed ids answer 400 `INVALID_ID`.
pub fn path_id<'a>(what: &str, id: &'a str) -> Result<&'a str, ApiError> {
    if crate::util::is_uuid(id) {
        Ok(id)
    } else {
        Err(ApiError::invalid_id(what))
    }
}

/// Query parameters with a typed JSON error (400 `VALIDATION_FAILED`) instead of axum's plain-text rejection.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::validation(format!("invalid query: {}", e.body_text())))
    }
}
