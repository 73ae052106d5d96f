//! Agent routes (mTLS): heartbeat and certificate renewal. Request bodies tolerate unknown fields, because
//! agents in the field (including the earlier Go agent) send more than we read.

use crate::agents::AgentRecord;
use crate::audit::{self, AuditEvent};
use crate::auth::{AgentAuth, RequestCtx};
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, OptionalJsonBody};
use crate::heartbeat_buffer::{PendingHeartbeat, VmSnapshot};
use crate::pki::{AgentCa, AgentIdentity, PkiError};
use crate::plans::Transition;
use crate::state::SharedState;
use crate::util::{now_ms, random_secret, rfc3339, secret_eq, sha256_hex};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use nkudo_core::api::{
    ErrorCode, HeartbeatRequest, HeartbeatResponse, MicroVmReport, RenewRequest, RenewResponse, UnenrollRequest,
};
use std::time::Instant;

/// Most microVMs one heartbeat may report.
const MAX_VMS: usize = 1024;
const MAX_TEXT: usize = 255;

fn check_agent_id(auth: &AgentAuth, body_agent: Option<&str>) -> ApiResult<()> {
    match body_agent.map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) if a != auth.agent.id => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::AgentIdMismatch,
            "agent_id mismatch",
        )),
        _ => Ok(()),
    }
}

/// Maps the states agents report (the earlier agent says CREATED/RUNNING/STOPPED) to the stored enum.
fn normalize_vm_state(s: &str) -> Option<&'static str> {
    Some(match s.trim().to_ascii_uppercase().as_str() {
        "RUNNING" => "RUNNING",
        "STOPPED" | "CREATED" | "SHUTDOWN" => "STOPPED",
        "CREATING" => "CREATING",
        "PAUSED" => "PAUSED",
        "DELETING" => "DELETING",
        "DELETED" => "DELETED",
        "ERROR" | "FAILED" => "ERROR",
        _ => return None,
    })
}

fn snapshot(vm: &MicroVmReport) -> ApiResult<Option<VmSnapshot>> {
    let id = vm.id.trim();
    if id.is_empty() {
        return Ok(None); // as the reference does: entries without an id are skipped
    }
    if id.len() > 128 || vm.name.len() > MAX_TEXT {
        return Err(ApiError::validation(
            "microvm id must be at most 128 and name at most 255 characters",
        ));
    }
    let raw_state = vm.state.as_deref().or(vm.status.as_deref()).unwrap_or("CREATING");
    let Some(state) = normalize_vm_state(raw_state) else {
        tracing::debug!(vm = id, state = raw_state, "ignoring microvm with unknown state");
        return Ok(None);
    };
    let positive = |v: Option<i64>| v.filter(|n| *n > 0);
    Ok(Some(VmSnapshot {
        id: id.to_string(),
        name: if vm.name.trim().is_empty() {
            id.to_string()
        } else {
            vm.name.trim().to_string()
        },
        state,
        vcpu_count: positive(vm.vcpu_count),
        memory_mib: positive(vm.memory_mib),
    }))
}

fn text(v: Option<String>) -> ApiResult<Option<String>> {
    match v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        Some(s) if s.len() > MAX_TEXT => Err(ApiError::validation("a heartbeat text field exceeds 255 characters")),
        other => Ok(other),
    }
}

pub async fn heartbeat(
    auth: AgentAuth,
    State(state): State<SharedState>,
    JsonBody(hb): JsonBody<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let started = Instant::now();
    check_agent_id(&auth, hb.agent_id.as_deref())?;
    if hb.execution_updates.len() > MAX_VMS {
        return Err(ApiError::validation(format!(
            "at most {MAX_VMS} execution updates per heartbeat"
        )));
    }
    if hb.microvms.len() > MAX_VMS {
        return Err(ApiError::validation(format!(
            "at most {MAX_VMS} microvms per heartbeat"
        )));
    }
    let facts = hb.host_facts;
    let kvm_from_facts = facts
        .as_ref()
        .map(|f| f.kvm.present && f.kvm.readable && f.kvm.writable);
    let storage_from_facts = facts.as_ref().filter(|f| !f.disks.is_empty()).map(|f| {
        // Count each filesystem once, even when several mount points share it (reference bug 35).
        let mut seen = std::collections::HashSet::new();
        f.disks
            .iter()
            .filter(|d| seen.insert((d.total_bytes, d.free_bytes)))
            .map(|d| d.total_bytes.max(0))
            .sum::<i64>()
    });
    let positive = |v: Option<i64>| v.filter(|n| *n > 0);
    let microvms = if hb.microvms.is_empty() {
        None
    } else {
        let mut out = Vec::with_capacity(hb.microvms.len());
        for vm in &hb.microvms {
            if let Some(s) = snapshot(vm)? {
                out.push(s);
            }
        }
        Some(out)
    };
    let agent_version = text(hb.agent_version)?;
    let update_status = hb.update.map(crate::releases::offer::bounded);
    let pending = PendingHeartbeat {
        agent_id: auth.agent.id.clone(),
        tenant_id: auth.agent.tenant_id.clone(),
        site_id: auth.agent.site_id.clone(),
        host_id: auth.agent.host_id.clone(),
        received_at: now_ms(),
        seq: hb.heartbeat_seq.filter(|s| *s >= 0),
        agent_version: agent_version.clone(),
        os: text(hb.os.or_else(|| facts.as_ref().map(|f| f.os.clone())))?,
        arch: text(hb.arch.or_else(|| facts.as_ref().map(|f| f.arch.clone())))?,
        kernel_version: text(hb.kernel_version.or_else(|| facts.as_ref().map(|f| f.kernel.clone())))?,
        cpu_cores_total: positive(hb.cpu_cores_total.or(facts.as_ref().map(|f| f.cpu_cores))),
        memory_bytes_total: positive(hb.memory_bytes_total.or(facts.as_ref().map(|f| f.memory_total_bytes))),
        storage_bytes_total: positive(hb.storage_bytes_total.or(storage_from_facts)),
        kvm_available: hb.kvm_available.or(kvm_from_facts),
        // Never assumed from KVM (reference bug 4): only what the agent says it found.
        cloud_hypervisor_available: hb
            .cloud_hypervisor_available
            .or(facts.as_ref().and_then(|f| f.cloud_hypervisor_available)),
        host_facts: facts,
        netbird: hb.netbird_status,
        microvms,
        build_version: text(hb.build_version)?,
        update_json: update_status.as_ref().and_then(|u| serde_json::to_string(u).ok()),
    };
    let arch_reported = pending.arch.clone();
    state.heartbeats.push(pending);

    // Execution progress must not be lost: written before the answer, unlike the coalesced part above.
    if !hb.execution_updates.is_empty() {
        let who = super::agent_plans::lessee(&auth);
        let transitions: Vec<Transition> = hb
            .execution_updates
            .iter()
            .filter_map(|u| {
                let state = crate::plans::parse_state(&u.state)?;
                crate::util::is_uuid(&u.execution_id).then(|| Transition {
                    execution_id: u.execution_id.clone(),
                    state,
                    error_code: u.error_code.clone(),
                    error_message: u.error_message.clone(),
                })
            })
            .collect();
        if !transitions.is_empty() {
            let mut tx = state.db.begin_write().await?;
            sqlx::query("UPDATE agents SET updated_at = updated_at WHERE id = $1")
                .bind(&auth.agent.id)
                .execute(&mut *tx)
                .await?;
            let applied = crate::plans::apply_transitions(&mut tx, &who, &transitions).await?;
            tx.commit().await?;
            applied.count(&state.metrics);
        }
    }
    let pending_plans = super::agent_plans::lease_for(&state, &auth).await?;

    // An agent that does not say its version (the earlier Go agent) keeps the one it enrolled with.
    let version = match &agent_version {
        Some(v) if *v != auth.agent.agent_version => {
            state.agents.put(AgentRecord {
                agent_version: v.clone(),
                ..(*auth.agent).clone()
            });
            v.as_str()
        }
        _ => auth.agent.agent_version.as_str(),
    };
    let supported = state.policy.supports_str(version);
    state
        .metrics
        .heartbeats
        .with_label_values(&[if supported { "true" } else { "false" }])
        .inc();
    if !supported {
        state.metrics.unsupported_agent_heartbeats.inc();
    }
    if let Some(update) = &update_status {
        if let Err(e) =
            crate::releases::offer::record_status(&state, &auth.agent.id, &auth.agent.tenant_id, update).await
        {
            tracing::warn!(error = %e, agent = %auth.agent.id, "recording the update status");
        }
    }
    let (desired_version, update) = match crate::releases::offer::place_of(&state, &auth.agent.id).await? {
        Some(place) => {
            let arch = match arch_reported {
                Some(a) => Some(a),
                None => hb_arch_fallback(&state, &auth.agent.id).await,
            };
            crate::releases::offer::offer_for(&state, &auth.agent.id, &place, version, arch.as_deref())
        }
        None => (None, None),
    };
    let ttl_ms = state.cfg.agent_cert_ttl.as_millis() as i64;
    // A certificate of a previous agent CA (a CA rotation is under way) is renewed at once, so the agent holds a
    // current-CA certificate and the new CA bundle after one heartbeat; otherwise, once a third is left.
    let issuer = state.pki.agent_ca_of(&auth.peer);
    state.pki.count_heartbeat(issuer);
    let rotate = issuer == AgentCa::Previous || auth.peer.not_after_ms - now_ms() < ttl_ms / 3;
    state.metrics.heartbeat_ingest.observe(started.elapsed().as_secs_f64());
    Ok(Json(HeartbeatResponse {
        next_heartbeat_seconds: state.cfg.heartbeat_interval_secs(),
        pending_plans,
        control_plane_version: state.policy.control_plane().to_string(),
        minimum_supported_agent_version: state.min_agent_version.clone(),
        agent_version_supported: supported,
        rotate_certificate: rotate,
        certificate_expires_at: rfc3339(auth.peer.not_after_ms),
        desired_version,
        update,
    }))
}

/// The arch the agent reported before, for a heartbeat that does not say it (the earlier Go agent).
async fn hb_arch_fallback(state: &SharedState, agent_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT arch FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(&state.db.pool)
        .await
        .ok()
        .flatten()
}

pub async fn renew(
    auth: AgentAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    JsonBody(req): JsonBody<RenewRequest>,
) -> ApiResult<Json<RenewResponse>> {
    check_agent_id(&auth, req.agent_id.as_deref())?;
    if req.csr_pem.trim().is_empty() {
        return Err(ApiError::validation("csr_pem is required"));
    }
    let agent = auth.agent.clone();
    if let Some(token) = req.refresh_token.as_deref().filter(|t| !t.is_empty()) {
        let stored: Option<String> = sqlx::query_scalar("SELECT refresh_token_hash FROM agents WHERE id = $1")
            .bind(&agent.id)
            .fetch_optional(&state.db.pool)
            .await?;
        if !stored.is_some_and(|h| secret_eq(&h, &sha256_hex(token.as_bytes()))) {
            return Err(ApiError::unauthorized(
                ErrorCode::InvalidRefreshToken,
                "invalid refresh token",
            ));
        }
    }
    let pki_state = state.clone();
    let a = agent.clone();
    let csr = req.csr_pem.clone();
    let ttl = state.cfg.agent_cert_ttl;
    let issued = tokio::task::spawn_blocking(move || {
        pki_state.pki.sign_agent_csr(
            &csr,
            &AgentIdentity {
                tenant_id: &a.tenant_id,
                site_id: &a.site_id,
                agent_id: &a.id,
            },
            ttl,
        )
    })
    .await
    .map_err(|e| ApiError::internal("signing certificate", e))?
    .map_err(|e| match e {
        PkiError::Csr(_) => super::enroll::csr_error(&e),
        other => ApiError::internal("signing certificate", other),
    })?;
    let refresh_token = random_secret();
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    // Only the certificate that authenticated this request may be replaced (no lost update between two renewals).
    let updated = sqlx::query(
        "UPDATE agents SET cert_serial = $1, cert_expires_at = $2, refresh_token_hash = $3, auth_changed_at = $4, \
         updated_at = $4 WHERE id = $5 AND cert_serial = $6 AND revoked_at IS NULL",
    )
    .bind(&issued.serial_hex)
    .bind(issued.not_after_ms)
    .bind(sha256_hex(refresh_token.as_bytes()))
    .bind(now)
    .bind(&agent.id)
    .bind(&auth.peer.serial_hex)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != 1 {
        return Err(ApiError::unauthorized(
            ErrorCode::CertificateSerialMismatch,
            "certificate was renewed or revoked meanwhile",
        ));
    }
    let ev = AuditEvent::new(&agent.tenant_id, "agent.certificate_renew", "agent", &agent.id)
        .actor("AGENT", Some(&agent.id))
        .site(&agent.site_id)
        .request(&ctx)
        .metadata(serde_json::json!({
            "old_serial": auth.peer.serial_hex,
            "new_serial": issued.serial_hex,
            "old_issuer": state.pki.agent_ca_of(&auth.peer).as_str(),
        }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    state.agents.put(AgentRecord {
        cert_serial: issued.serial_hex.clone(),
        ..(*agent).clone()
    });
    Ok(Json(RenewResponse {
        client_certificate_pem: issued.cert_pem,
        // The whole bundle (current and previous agent CAs, server anchor): the agent replaces the one it trusts,
        // so it verifies a server certificate from the new CA once the old CA is retired.
        ca_certificate_pem: state.pki.ca_bundle_pem().to_string(),
        expires_at: rfc3339(issued.not_after_ms),
        refresh_token,
    }))
}

/// The agent gives up its identity (host decommissioned or key compromised): 204, and its certificate is
/// refused from the next request on.
pub async fn unenroll(
    auth: AgentAuth,
    State(state): State<SharedState>,
    ctx: RequestCtx,
    OptionalJsonBody(req): OptionalJsonBody<UnenrollRequest>,
) -> ApiResult<StatusCode> {
    check_agent_id(&auth, req.agent_id.as_deref())?;
    let reason = req
        .reason
        .map(|r| r.trim().chars().take(500).collect::<String>())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "unenrolled by agent".into());
    let agent = &auth.agent;
    let now = now_ms();
    let mut tx = state.db.begin_write().await?;
    sqlx::query(
        "UPDATE agents SET revoked_at = $1, revoke_reason = $2, state = 'OFFLINE', auth_changed_at = $1, \
         updated_at = $1 WHERE id = $3 AND revoked_at IS NULL",
    )
    .bind(now)
    .bind(&reason)
    .bind(&agent.id)
    .execute(&mut *tx)
    .await?;
    crate::sweeper::recompute_site(&mut tx, &agent.site_id, now).await?;
    let ev = AuditEvent::new(&agent.tenant_id, "agent.unenroll", "agent", &agent.id)
        .actor("AGENT", Some(&agent.id))
        .site(&agent.site_id)
        .request(&ctx)
        .metadata(serde_json::json!({ "reason": reason }));
    audit::record(&mut tx, &ev).await?;
    tx.commit().await?;
    state.agents.mark_revoked(&agent.id);
    Ok(StatusCode::NO_CONTENT)
}
