//! Release registry routes: publish a signed manifest, upload its artifacts, list and show releases, download
//! artifacts (admin, and agents over mTLS, resumable with `Range`).

use crate::audit::{self, AuditEvent};
use crate::auth::{Admin, AgentAuth, RequestCtx};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::releases::range::{self, Plan};
use crate::releases::{verify_manifest, PublishError};
use crate::state::SharedState;
use crate::util::{now_ms, rfc3339};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use nkudo_core::api::{ErrorCode, PublishReleaseRequest, ReleaseArtifactInfo, ReleaseInfo, ReleasesResponse};
use sha2::Digest;
use sqlx::{AnyConnection, Row};

/// Largest artifact accepted (the manifest states each one's size; this caps what a manifest may claim).
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// Bytes per database read when streaming an artifact.
const CHUNK: i64 = 256 * 1024;

fn publish_error(e: PublishError) -> ApiError {
    match e {
        PublishError::NoKeys => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ReleaseKeysNotConfigured,
            e.to_string(),
        ),
        // The request is well formed; what it carries cannot be accepted: 422.
        PublishError::UnknownKey(_) | PublishError::BadSignature(_) | PublishError::BadSignatureFile(_) => {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidSignature,
                e.to_string(),
            )
        }
        PublishError::Expired(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ManifestExpired,
            e.to_string(),
        ),
        PublishError::BadManifest(_) => ApiError::validation(e.to_string()),
    }
}

fn check_base_url(u: &str) -> Result<String, ApiError> {
    let u = u.trim().trim_end_matches('/').to_string();
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && u.len() <= 2000
        && !u.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(u)
    } else {
        Err(ApiError::validation("external_base_url must be an http(s) URL"))
    }
}

/// Releases belong to no tenant: their events go to the system audit chain (tenant id '').
fn release_event(action: &'static str, ctx: &RequestCtx, version: &str, metadata: serde_json::Value) -> AuditEvent {
    AuditEvent::new("", action, "release", version)
        .actor("ADMIN", None)
        .request(ctx)
        .metadata(metadata)
}

pub async fn publish_release(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    JsonBody(req): JsonBody<PublishReleaseRequest>,
) -> ApiResult<(StatusCode, Json<ReleaseInfo>)> {
    let now = now_ms();
    let v =
        verify_manifest(&state.cfg.release_public_keys, &req.manifest, &req.signature, now).map_err(publish_error)?;
    let base = req.external_base_url.as_deref().map(check_base_url).transpose()?;
    let m = &v.manifest;
    for a in &m.artifacts {
        if a.size > MAX_ARTIFACT_BYTES {
            return Err(ApiError::validation(format!(
                "artifact {} states {} bytes, more than {MAX_ARTIFACT_BYTES}",
                a.name, a.size
            )));
        }
    }
    let mut tx = state.db.begin_write().await?;
    let existing = sqlx::query("SELECT manifest, signature FROM releases WHERE version = $1")
        .bind(&m.version)
        .fetch_optional(&mut *tx)
        .await?;
    let status = match existing {
        Some(row) => {
            let text: String = row.try_get(0)?;
            if text != req.manifest {
                return Err(ApiError::conflict(format!(
                    "release {} is already published with another manifest; publish a new version",
                    m.version
                )));
            }
            let old_base: Option<String> =
                sqlx::query_scalar("SELECT external_base_url FROM releases WHERE version = $1")
                    .bind(&m.version)
                    .fetch_one(&mut *tx)
                    .await?;
            if base.is_some() && base != old_base {
                sqlx::query("UPDATE releases SET external_base_url = $1 WHERE version = $2")
                    .bind(&base)
                    .bind(&m.version)
                    .execute(&mut *tx)
                    .await?;
                let ev = release_event(
                    "release.external_base_url",
                    &ctx,
                    &m.version,
                    serde_json::json!({ "external_base_url": base }),
                );
                audit::record(&mut tx, &ev).await?;
            }
            StatusCode::OK
        }
        None => {
            let inserted = sqlx::query(
                "INSERT INTO releases (version, channel, manifest, signature, key_id, expires_at, external_base_url, \
                 published_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&m.version)
            .bind(&m.channel)
            .bind(&req.manifest)
            .bind(&req.signature)
            .bind(&v.key_id)
            .bind(v.expires_ms)
            .bind(&base)
            .bind(now)
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                if crate::db::Db::is_unique_violation(&e) {
                    return Err(ApiError::conflict(format!(
                        "release {} is being published by another request; retry",
                        m.version
                    )));
                }
                return Err(e.into());
            }
            for a in &m.artifacts {
                sqlx::query(
                    "INSERT INTO release_artifacts (version, name, component, kind, os, arch, size, sha256) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&m.version)
                .bind(&a.name)
                .bind(&a.component)
                .bind(&a.kind)
                .bind(&a.os)
                .bind(&a.arch)
                .bind(a.size as i64)
                .bind(&a.sha256)
                .execute(&mut *tx)
                .await?;
            }
            let ev = release_event(
                "release.publish",
                &ctx,
                &m.version,
                serde_json::json!({
                    "channel": m.channel,
                    "key_id": v.key_id,
                    "git_commit": m.git_commit,
                    "artifacts": m.artifacts.len(),
                    "external_base_url": base,
                }),
            );
            audit::record(&mut tx, &ev).await?;
            StatusCode::CREATED
        }
    };
    let info = release_info(&mut tx, &m.version)
        .await?
        .ok_or_else(|| ApiError::not_found("release"))?;
    tx.commit().await?;
    refresh(&state).await;
    tracing::info!(version = %m.version, key = %v.key_id, "release published");
    Ok((status, Json(info)))
}

/// Refreshes this replica's release snapshot at once (others within a second).
async fn refresh(state: &SharedState) {
    if let Err(e) = state.desired.refresh_releases(&state.db.pool).await {
        tracing::warn!(error = %e, "refreshing the release snapshot");
    }
}

fn version_param(v: &str) -> Result<String, ApiError> {
    nkudo_core::version::parse(v)
        .map(|v| v.to_string())
        .map_err(|e| ApiError::validation(format!("version: {e}")))
}

fn name_param(n: &str) -> Result<&str, ApiError> {
    if n.is_empty() || n.len() > 255 || n.contains('/') || n.starts_with('.') {
        return Err(ApiError::validation("invalid artifact name"));
    }
    Ok(n)
}

async fn release_info(conn: &mut AnyConnection, version: &str) -> Result<Option<ReleaseInfo>, sqlx::Error> {
    let Some(r) = sqlx::query(
        "SELECT manifest, key_id, external_base_url, published_at, bad, bad_reason FROM releases WHERE version = $1",
    )
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let text: String = r.try_get(0)?;
    let Ok(m) = nkudo_core::manifest::Manifest::from_json(text.as_bytes()) else {
        return Ok(None);
    };
    let base: Option<String> = r.try_get(2)?;
    let bad: i64 = r.try_get(4)?;
    let rows = sqlx::query(
        "SELECT name, component, kind, os, arch, size, sha256, CASE WHEN content IS NULL THEN 0 ELSE 1 END \
         FROM release_artifacts WHERE version = $1 ORDER BY name",
    )
    .bind(version)
    .fetch_all(&mut *conn)
    .await?;
    let mut artifacts = Vec::with_capacity(rows.len());
    for a in rows {
        let size: i64 = a.try_get(5)?;
        let uploaded: i64 = a.try_get(7)?;
        artifacts.push(ReleaseArtifactInfo {
            name: a.try_get(0)?,
            component: a.try_get(1)?,
            kind: a.try_get(2)?,
            os: a.try_get(3)?,
            arch: a.try_get(4)?,
            size: size.max(0) as u64,
            sha256: a.try_get(6)?,
            available: uploaded != 0 || base.is_some(),
        });
    }
    Ok(Some(ReleaseInfo {
        version: m.version,
        channel: m.channel,
        git_commit: m.git_commit,
        build_date: m.build_date,
        expires: m.expires,
        minimum_supported_agent_version: m.minimum_supported_agent_version,
        promoted_from: m.promoted_from,
        rollback_of: m.rollback_of,
        key_id: r.try_get(1)?,
        external_base_url: base,
        published_at: rfc3339(r.try_get(3)?),
        bad: bad != 0,
        bad_reason: r.try_get(5)?,
        artifacts,
    }))
}

pub async fn list_releases(_: Admin, State(state): State<SharedState>) -> ApiResult<Json<ReleasesResponse>> {
    let mut conn = state.db.pool.acquire().await?;
    let versions: Vec<String> = sqlx::query_scalar("SELECT version FROM releases")
        .fetch_all(&mut *conn)
        .await?;
    let mut releases = Vec::with_capacity(versions.len());
    for v in versions {
        if let Some(info) = release_info(&mut conn, &v).await? {
            releases.push(info);
        }
    }
    releases.sort_by(|a, b| {
        match (
            nkudo_core::version::parse(&a.version),
            nkudo_core::version::parse(&b.version),
        ) {
            (Ok(x), Ok(y)) => nkudo_core::version::compare(&y, &x),
            _ => b.version.cmp(&a.version),
        }
    });
    Ok(Json(ReleasesResponse { releases }))
}

pub async fn get_release(
    _: Admin,
    State(state): State<SharedState>,
    Path(version): Path<String>,
) -> ApiResult<Json<ReleaseInfo>> {
    let version = version_param(&version)?;
    let mut conn = state.db.pool.acquire().await?;
    release_info(&mut conn, &version)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("release"))
}

pub async fn upload_artifact(
    _: Admin,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    Path((version, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ReleaseArtifactInfo>)> {
    let version = version_param(&version)?;
    let name = name_param(&name)?.to_string();
    let row = sqlx::query(
        "SELECT size, sha256, CASE WHEN content IS NULL THEN 0 ELSE 1 END, component, kind, os, arch \
         FROM release_artifacts WHERE version = $1 AND name = $2",
    )
    .bind(&version)
    .bind(&name)
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("artifact (publish the manifest that lists it first)"))?;
    let size: i64 = row.try_get(0)?;
    let sha: String = row.try_get(1)?;
    let uploaded: i64 = row.try_get(2)?;
    let info = ReleaseArtifactInfo {
        name: name.clone(),
        component: row.try_get(3)?,
        kind: row.try_get(4)?,
        os: row.try_get(5)?,
        arch: row.try_get(6)?,
        size: size.max(0) as u64,
        sha256: sha.clone(),
        available: true,
    };
    let cap = size.max(0) as usize;
    let mut buf: Vec<u8> = Vec::with_capacity(cap.min(64 << 20));
    let mut hasher = sha2::Sha256::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::validation(format!("reading the upload: {e}")))?;
        if buf.len() + chunk.len() > cap {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::ArtifactMismatch,
                format!("{name} is larger than the {size} bytes the signed manifest states; nothing stored"),
            ));
        }
        hasher.update(&chunk);
        buf.extend_from_slice(&chunk);
    }
    let digest = hex::encode(hasher.finalize());
    if buf.len() != cap || digest != sha {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::ArtifactMismatch,
            format!(
                "{name}: {} bytes with SHA-256 {digest}, the signed manifest states {size} bytes with {sha}; \
                 nothing stored",
                buf.len()
            ),
        ));
    }
    if uploaded != 0 {
        return Ok((StatusCode::OK, Json(info)));
    }
    let mut tx = state.db.begin_write().await?;
    // `content IS NULL`: of two concurrent uploads of the same (checked) bytes, one stores and audits them.
    let stored = sqlx::query(
        "UPDATE release_artifacts SET content = $1, uploaded_at = $2 WHERE version = $3 AND name = $4 \
         AND content IS NULL",
    )
    .bind(buf)
    .bind(now_ms())
    .bind(&version)
    .bind(&name)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if stored == 0 {
        return Ok((StatusCode::OK, Json(info)));
    }
    let ev = release_event(
        "release.artifact_upload",
        &ctx,
        &version,
        serde_json::json!({ "artifact": name, "size": size, "sha256": sha }),
    );
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    refresh(&state).await;
    tracing::info!(%version, artifact = %name, bytes = size, sha256 = %sha, "artifact uploaded");
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn admin_download(
    _: Admin,
    State(state): State<SharedState>,
    Path((version, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download(&state, &version, &name, &headers).await
}

pub async fn agent_download(
    _: AgentAuth,
    State(state): State<SharedState>,
    Path((version, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download(&state, &version, &name, &headers).await
}

async fn download(state: &SharedState, version: &str, name: &str, headers: &HeaderMap) -> ApiResult<Response> {
    let version = version_param(version)?;
    let name = name_param(name)?.to_string();
    let row = sqlx::query(
        "SELECT size, sha256, CASE WHEN content IS NULL THEN 0 ELSE 1 END FROM release_artifacts \
         WHERE version = $1 AND name = $2",
    )
    .bind(&version)
    .bind(&name)
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::not_found("artifact"))?;
    let size: i64 = row.try_get(0)?;
    let sha: String = row.try_get(1)?;
    let uploaded: i64 = row.try_get(2)?;
    if uploaded == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ReleaseNotAvailable,
            format!("{name} of {version} was not uploaded (fetch it from the release's external base URL)"),
        ));
    }
    let len = size.max(0) as u64;
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range::plan(range_header, len) {
        Plan::Full => (StatusCode::OK, 0u64, len.saturating_sub(1)),
        Plan::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        Plan::Unsatisfiable => {
            let mut e = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeNotSatisfiable,
                format!("the range is outside the {len} bytes of {name}"),
            )
            .into_response();
            e.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).unwrap_or(HeaderValue::from_static("bytes */0")),
            );
            return Ok(e);
        }
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    let pool = state.db.pool.clone();
    let (v2, n2) = (version.clone(), name.clone());
    // 1-based offsets for SQL substr; one chunk per read, so an artifact is never held whole in memory.
    let stream = futures_util::stream::unfold(start, move |pos| {
        let (pool, v2, n2) = (pool.clone(), v2.clone(), n2.clone());
        async move {
            if len == 0 || pos > end {
                return None;
            }
            let take = (CHUNK as u64).min(end - pos + 1) as i64;
            let r: Result<Option<Vec<u8>>, sqlx::Error> = sqlx::query_scalar(
                // Postgres has substr(bytea, integer, integer) only: the casts make one statement for both.
                "SELECT substr(content, CAST($1 AS INTEGER), CAST($2 AS INTEGER)) FROM release_artifacts \
                 WHERE version = $3 AND name = $4",
            )
            .bind(pos as i64 + 1)
            .bind(take)
            .bind(&v2)
            .bind(&n2)
            .fetch_one(&pool)
            .await;
            match r {
                Ok(Some(bytes)) if bytes.len() as i64 == take => {
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(bytes)), pos + take as u64))
                }
                Ok(_) => {
                    tracing::error!(version = %v2, artifact = %n2, "artifact changed while streaming");
                    Some((Err(std::io::Error::other("artifact changed while streaming")), end + 1))
                }
                Err(e) => {
                    tracing::error!(version = %v2, artifact = %n2, error = %e, "reading an artifact chunk");
                    Some((Err(std::io::Error::other(e.to_string())), end + 1))
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}
