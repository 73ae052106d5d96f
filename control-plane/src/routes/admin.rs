//! Admin routes (`X-Admin-Key`): tenants and their API keys.

use crate::audit::{self, AuditEvent};
use crate::auth::{Admin, RequestCtx};
use crate::db::Db;
use crate::error::{ApiError, ApiResult};
use crate::extract::{path_id, JsonBody, OptionalJsonBody};
use crate::state::SharedState;
use crate::util::{new_id, now_ms, random_secret, rfc3339, rfc3339_opt, sha256_hex};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{ApiKeyCreated, CreateApiKeyRequest, CreateTenantRequest, Tenant, TenantsResponse};
use sqlx::Row;

const MAX_NAME: usize = 200;
/// Ten years: longer API key lifetimes are refused as a typo.
const MAX_KEY_LIFETIME_SECS: i64 = 10 * 365 * 86_400;

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub async fn create_tenant(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    JsonBody(req): JsonBody<CreateTenantRequest>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    let slug = req.slug.trim().to_string();
    let name = req.name.trim().to_string();
    if slug.is_empty() || name.is_empty() {
        return Err(ApiError::validation("slug and name are required"));
    }
    if !valid_slug(&slug) {
        return Err(ApiError::validation(
            "slug must be 1-63 lowercase letters, digits or dashes, not starting or ending with a dash",
        ));
    }
    if name.len() > MAX_NAME {
        return Err(ApiError::validation(format!(
            "name must be at most {MAX_NAME} characters"
        )));
    }
    let region = req
        .primary_region
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "eu-central-1".into());
    if region.len() > 64 {
        return Err(ApiError::validation("primary_region must be at most 64 characters"));
    }
    let retention = match req.data_retention_days {
        None | Some(0) => 30,
        Some(d) if (7..=3650).contains(&d) => d,
        Some(_) => return Err(ApiError::validation("data_retention_days must be between 7 and 3650")),
    };
    let now = now_ms();
    let tenant = Tenant {
        id: new_id(),
        slug,
        name,
        primary_region: region,
        data_retention_days: retention,
        created_at: rfc3339(now),
        updated_at: rfc3339(now),
    };
    let mut tx = state.db.begin_write().await?;
    let inserted = sqlx::query(
        "INSERT INTO tenants (id, slug, name, primary_region, data_retention_days, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6)",
    )
    .bind(&tenant.id)
    .bind(&tenant.slug)
    .bind(&tenant.name)
    .bind(&tenant.primary_region)
    .bind(tenant.data_retention_days)
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if Db::is_unique_violation(&e) {
            return Err(ApiError::conflict("tenant slug already exists"));
        }
        return Err(e.into());
    }
    let ev = AuditEvent::new(&tenant.id, "tenant.create", "tenant", &tenant.id)
        .actor("ADMIN", None)
        .request(&ctx)
        .metadata(serde_json::json!({ "slug": tenant.slug }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

pub async fn list_tenants(_: Admin, State(state): State<SharedState>) -> ApiResult<Json<TenantsResponse>> {
    let rows = sqlx::query(
        "SELECT id, slug, name, primary_region, data_retention_days, created_at, updated_at FROM tenants \
         ORDER BY created_at DESC, id",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let tenants = rows
        .iter()
        .map(|r| {
            Ok(Tenant {
                id: r.try_get(0)?,
                slug: r.try_get(1)?,
                name: r.try_get(2)?,
                primary_region: r.try_get(3)?,
                data_retention_days: r.try_get(4)?,
                created_at: rfc3339(r.try_get(5)?),
                updated_at: rfc3339(r.try_get(6)?),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(TenantsResponse { tenants }))
}

pub async fn create_api_key(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path(tenant_id): Path<String>,
    OptionalJsonBody(req): OptionalJsonBody<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, Json<ApiKeyCreated>)> {
    let tenant_id = path_id("tenant", &tenant_id)?.to_string();
    let name = match req.name.trim() {
        "" => "default".to_string(),
        n if n.len() > MAX_NAME => {
            return Err(ApiError::validation(format!(
                "name must be at most {MAX_NAME} characters"
            )))
        }
        n => n.to_string(),
    };
    let expires_at = match req.expires_in_seconds {
        None | Some(0) => None,
        Some(s) if (1..=MAX_KEY_LIFETIME_SECS).contains(&s) => Some(now_ms() + s * 1000),
        Some(_) => {
            return Err(ApiError::validation(
                "expires_in_seconds must be between 1 and 315360000 (or 0 for no expiry)",
            ))
        }
    };
    // Checked before the transaction: on SQLite a write transaction must begin with its first write.
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
        .bind(&tenant_id)
        .fetch_optional(&state.db.pool)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let mut tx = state.db.begin_write().await?;
    let id = new_id();
    let plaintext = format!("nk_{}", random_secret());
    let now = now_ms();
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, key_hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(&tenant_id)
    .bind(&name)
    .bind(sha256_hex(plaintext.as_bytes()))
    .bind(now)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    let ev = AuditEvent::new(&tenant_id, "apikey.create", "api_key", &id)
        .actor("ADMIN", None)
        .request(&ctx)
        .metadata(serde_json::json!({ "name": name, "expires_at": expires_at }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyCreated {
            id,
            tenant_id,
            name,
            api_key: plaintext,
            expires_at: rfc3339_opt(expires_at),
        }),
    ))
}
