//! Plans: validation of what a tenant applies, idempotent creation (one execution per action), leasing to
//! agents (row locks with `SKIP LOCKED` on Postgres, so replicas never hand one plan to two agents), and the
//! forward-only state machine of executions with the plan roll-up and the VM state it implies.
//!
//! States move only forward: `PENDING → IN_PROGRESS → SUCCEEDED | FAILED`, and a plan that fails cancels what
//! it had not started yet (`CANCELLED`). A repeated report of a terminal state changes nothing.

use crate::audit::{self, AuditEvent};
use crate::db::Backend;
use crate::util::{new_id, now_ms, rfc3339, rfc3339_opt};
use nkudo_core::api::{
    Execution, LeasedAction, LeasedPlan, MicroVmCreateParams, MicroVmRefParams, PlanActionSpec, ACTION_CREATE,
    ACTION_DELETE, ACTION_START, ACTION_STOP,
};
use sqlx::{AnyConnection, Row};
use std::collections::HashSet;
use std::sync::RwLock;

pub const MAX_ACTIONS: usize = 100;
const MAX_PATH: usize = 4096;
const MAX_USER_DATA: usize = 64 * 1024;

/// A validated action: its operation, VM id and the parameters the agent will receive.
#[derive(Debug, Clone)]
pub struct ValidAction {
    pub operation_id: String,
    pub operation: &'static str,
    pub vm_id: String,
    pub name: String,
    pub vcpu: i64,
    pub memory_mib: i64,
    pub params: serde_json::Value,
}

fn field_err(i: usize, field: &str, msg: &str) -> String {
    format!("actions[{i}].{field}: {msg}")
}

fn valid_token(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_path(i: usize, field: &str, v: &Option<String>) -> Result<Option<String>, String> {
    match v.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(p) if !p.starts_with('/') => Err(field_err(i, field, "must be an absolute path")),
        Some(p) if p.len() > MAX_PATH || p.contains('\0') || p.split('/').any(|c| c == "..") => {
            Err(field_err(i, field, "must be a plain absolute path without '..'"))
        }
        Some(p) => Ok(Some(p.to_string())),
    }
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Validates every action; the error names the action and the field.
pub fn validate_actions(actions: &[PlanActionSpec]) -> Result<Vec<ValidAction>, String> {
    if actions.is_empty() {
        return Err("actions are required".into());
    }
    if actions.len() > MAX_ACTIONS {
        return Err(format!("at most {MAX_ACTIONS} actions per plan"));
    }
    let mut seen_ops = HashSet::new();
    let mut out = Vec::with_capacity(actions.len());
    for (i, a) in actions.iter().enumerate() {
        let operation = match a.operation.trim().to_ascii_uppercase().as_str() {
            "CREATE" => "CREATE",
            "START" => "START",
            "STOP" => "STOP",
            "DELETE" => "DELETE",
            _ => return Err(field_err(i, "operation", "must be one of CREATE, START, STOP, DELETE")),
        };
        let operation_id = match a.operation_id.as_deref().map(str::trim) {
            None | Some("") => format!("{}-{}", operation.to_ascii_lowercase(), i + 1),
            Some(op) if valid_token(op, 128) => op.to_string(),
            Some(_) => {
                return Err(field_err(
                    i,
                    "operation_id",
                    "must be 1-128 characters of [A-Za-z0-9._-]",
                ))
            }
        };
        if !seen_ops.insert(operation_id.clone()) {
            return Err(field_err(i, "operation_id", "must be unique within the plan"));
        }
        let vm_id = match a.vm_id.as_deref().map(str::trim) {
            None | Some("") if operation == "CREATE" => new_id(),
            None | Some("") => return Err(field_err(i, "vm_id", "is required for START, STOP and DELETE")),
            Some(v) if valid_token(v, 128) => v.to_string(),
            Some(_) => return Err(field_err(i, "vm_id", "must be 1-128 characters of [A-Za-z0-9._-]")),
        };
        let boot_fields = [
            ("kernel_path", a.kernel_path.is_some()),
            ("initramfs_path", a.initramfs_path.is_some()),
            ("cmdline", a.cmdline.is_some()),
            ("firmware_path", a.firmware_path.is_some()),
            ("disk_image", a.disk_image.is_some()),
            ("disk_size_mib", a.disk_size_mib.is_some()),
            ("cloud_init_user_data", a.cloud_init_user_data.is_some()),
            ("bridge", a.bridge.is_some()),
            ("tap_name", a.tap_name.is_some()),
            ("mac", a.mac.is_some()),
            ("name", a.name.is_some()),
            ("vcpu_count", a.vcpu_count.is_some()),
            ("memory_mib", a.memory_mib.is_some()),
        ];
        if operation != "CREATE" {
            if let Some((f, _)) = boot_fields.iter().find(|(_, set)| *set) {
                return Err(field_err(i, f, "is only valid for CREATE"));
            }
            out.push(ValidAction {
                operation_id,
                operation,
                params: serde_json::to_value(MicroVmRefParams { vm_id: vm_id.clone() }).unwrap_or_default(),
                vm_id,
                name: String::new(),
                vcpu: 0,
                memory_mib: 0,
            });
            continue;
        }
        let name = match a.name.as_deref().map(str::trim) {
            None | Some("") => format!("vm-{}", vm_id.chars().take(8).collect::<String>()),
            Some(n) if valid_token(n, 63) => n.to_string(),
            Some(_) => return Err(field_err(i, "name", "must be 1-63 characters of [A-Za-z0-9._-]")),
        };
        let vcpu = a.vcpu_count.unwrap_or(1);
        if !(1..=64).contains(&vcpu) {
            return Err(field_err(i, "vcpu_count", "must be between 1 and 64"));
        }
        let memory_mib = a.memory_mib.unwrap_or(512);
        if !(128..=262_144).contains(&memory_mib) {
            return Err(field_err(i, "memory_mib", "must be between 128 and 262144"));
        }
        let kernel = check_path(i, "kernel_path", &a.kernel_path)?;
        let initramfs = check_path(i, "initramfs_path", &a.initramfs_path)?;
        let firmware = check_path(i, "firmware_path", &a.firmware_path)?;
        let disk = check_path(i, "disk_image", &a.disk_image)?;
        let cmdline = a
            .cmdline
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        if cmdline.as_ref().is_some_and(|c| c.len() > MAX_PATH) {
            return Err(field_err(i, "cmdline", "must be at most 4096 characters"));
        }
        // What a VM needs to boot: a payload (kernel + command line, or firmware) and something to boot into.
        match (&kernel, &firmware) {
            (Some(_), Some(_)) => {
                return Err(field_err(
                    i,
                    "firmware_path",
                    "give kernel_path or firmware_path, not both",
                ))
            }
            (None, None) => {
                return Err(field_err(
                    i,
                    "kernel_path",
                    "is required (or firmware_path): the VM cannot boot",
                ))
            }
            (Some(_), None) if cmdline.is_none() => {
                return Err(field_err(
                    i,
                    "cmdline",
                    "is required with kernel_path: the VM cannot boot",
                ))
            }
            (None, Some(_)) if initramfs.is_some() || cmdline.is_some() => {
                return Err(field_err(
                    i,
                    "firmware_path",
                    "firmware boot takes no initramfs_path or cmdline",
                ))
            }
            _ => {}
        }
        if disk.is_none() && initramfs.is_none() {
            return Err(field_err(
                i,
                "disk_image",
                "is required (or initramfs_path): the VM has nothing to boot into",
            ));
        }
        if let Some(size) = a.disk_size_mib {
            if !(1..=16 * 1024 * 1024).contains(&size) {
                return Err(field_err(i, "disk_size_mib", "must be between 1 and 16777216"));
            }
        }
        let user_data = a.cloud_init_user_data.clone().filter(|u| !u.is_empty());
        if user_data.as_ref().is_some_and(|u| u.len() > MAX_USER_DATA) {
            return Err(field_err(i, "cloud_init_user_data", "must be at most 65536 bytes"));
        }
        for (field, v) in [("bridge", &a.bridge), ("tap_name", &a.tap_name)] {
            if let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                if !valid_token(v, 15) {
                    return Err(field_err(
                        i,
                        field,
                        "must be 1-15 characters of [A-Za-z0-9._-] (a Linux interface name)",
                    ));
                }
            }
        }
        if let Some(m) = a.mac.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            if !valid_mac(m) {
                return Err(field_err(i, "mac", "must look like 52:54:00:12:34:56"));
            }
        }
        let trimmed = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let params = MicroVmCreateParams {
            vm_id: vm_id.clone(),
            name: name.clone(),
            vcpu,
            memory_mib,
            kernel_path: kernel,
            initramfs_path: initramfs,
            cmdline,
            firmware_path: firmware,
            rootfs_path: disk,
            disk_size_mib: a.disk_size_mib,
            cloud_init_user_data: user_data,
            bridge: trimmed(&a.bridge),
            tap_iface: trimmed(&a.tap_name),
            mac: trimmed(&a.mac).map(|m| m.to_ascii_lowercase()),
        };
        out.push(ValidAction {
            operation_id,
            operation,
            vm_id,
            name,
            vcpu,
            memory_mib,
            params: serde_json::to_value(params).unwrap_or_default(),
        });
    }
    Ok(out)
}

pub fn action_type(operation: &str) -> &'static str {
    match operation {
        "CREATE" => ACTION_CREATE,
        "START" => ACTION_START,
        "STOP" => ACTION_STOP,
        _ => ACTION_DELETE,
    }
}

/// Seconds an agent may spend on one action.
pub fn action_timeout(operation: &str) -> i64 {
    match operation {
        "CREATE" => 300,
        _ => 120,
    }
}

pub const EXECUTION_COLUMNS: &str = "id, tenant_id, site_id, plan_id, host_id, agent_id, vm_id, operation_id, \
     operation_type, state, error_code, error_message, created_at, updated_at, started_at, completed_at";

pub fn execution_from_row(r: &sqlx::any::AnyRow) -> Result<Execution, sqlx::Error> {
    Ok(Execution {
        id: r.try_get(0)?,
        tenant_id: r.try_get(1)?,
        site_id: r.try_get(2)?,
        plan_id: r.try_get(3)?,
        host_id: r.try_get(4)?,
        agent_id: r.try_get(5)?,
        vm_id: r.try_get(6)?,
        operation_id: r.try_get(7)?,
        operation_type: r.try_get(8)?,
        state: r.try_get(9)?,
        error_code: r.try_get(10)?,
        error_message: r.try_get(11)?,
        created_at: rfc3339(r.try_get(12)?),
        updated_at: rfc3339(r.try_get(13)?),
        started_at: rfc3339_opt(r.try_get(14)?),
        completed_at: rfc3339_opt(r.try_get(15)?),
    })
}

pub async fn plan_executions(conn: &mut AnyConnection, plan_id: &str) -> Result<Vec<Execution>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {EXECUTION_COLUMNS} FROM executions WHERE plan_id = $1 ORDER BY ordinal"
    ))
    .bind(plan_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(execution_from_row).collect()
}

/// Sites that have plans not finished yet, refreshed every second (and at once on apply), so that heartbeats of
/// sites with nothing to do never touch the database for leasing.
#[derive(Default)]
pub struct OpenPlanSites {
    sites: RwLock<HashSet<String>>,
}

impl OpenPlanSites {
    pub fn contains(&self, site: &str) -> bool {
        self.sites.read().map(|s| s.contains(site)).unwrap_or(true)
    }
    pub fn insert(&self, site: &str) {
        if let Ok(mut s) = self.sites.write() {
            s.insert(site.to_string());
        }
    }
    pub async fn refresh(&self, db: &crate::db::Db) -> Result<(), sqlx::Error> {
        let sites: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT site_id FROM plans WHERE status IN ('PENDING', 'IN_PROGRESS')")
                .fetch_all(&db.pool)
                .await?;
        if let Ok(mut s) = self.sites.write() {
            *s = sites.into_iter().collect();
        }
        Ok(())
    }
}

/// The agent that leases: its identity scopes every query.
pub struct Lessee<'a> {
    pub tenant_id: &'a str,
    pub site_id: &'a str,
    pub host_id: &'a str,
    pub agent_id: &'a str,
}

/// Leases up to `limit` runnable plans of the agent's site to it (or renews its own leases) and returns them
/// with their unfinished actions. One statement takes the leases, so two agents (or two replicas) can never
/// hold one plan at once.
pub async fn lease(
    db: &crate::db::Db,
    who: &Lessee<'_>,
    limit: u32,
    ttl_ms: i64,
) -> Result<Vec<LeasedPlan>, sqlx::Error> {
    let now = now_ms();
    let lock = if db.backend == Backend::Postgres {
        "FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let mut tx = db.begin_write().await?;
    let mut leased: Vec<(String, i64)> = sqlx::query_as(&format!(
        "UPDATE plans SET leased_by_agent_id = $1, lease_expires_at = $2, \
           status = CASE WHEN status = 'PENDING' THEN 'IN_PROGRESS' ELSE status END, \
           started_at = COALESCE(started_at, $3), updated_at = $3 \
         WHERE id IN (SELECT p.id FROM plans p WHERE p.tenant_id = $4 AND p.site_id = $5 \
             AND p.status IN ('PENDING', 'IN_PROGRESS') \
             AND (p.leased_by_agent_id IS NULL OR p.lease_expires_at < $3 OR p.leased_by_agent_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM executions e JOIN microvms v ON v.tenant_id = e.tenant_id AND v.id = e.vm_id \
                 WHERE e.plan_id = p.id AND v.host_id IS NOT NULL AND v.host_id <> $6 AND v.state <> 'DELETED') \
             ORDER BY p.plan_version LIMIT $7 {lock}) \
         RETURNING id, plan_version"
    ))
    .bind(who.agent_id)
    .bind(now + ttl_ms)
    .bind(now)
    .bind(who.tenant_id)
    .bind(who.site_id)
    .bind(who.host_id)
    .bind(i64::from(limit.max(1)))
    .fetch_all(&mut *tx)
    .await?;
    // RETURNING does not keep the subquery's order: hand plans out oldest first.
    leased.sort_by_key(|(_, version)| *version);
    let mut plans = Vec::with_capacity(leased.len());
    for (plan_id, _) in leased {
        let rows = sqlx::query(
            "SELECT id, operation_id, operation_type, payload_json FROM executions WHERE plan_id = $1 \
             AND state IN ('PENDING', 'IN_PROGRESS') ORDER BY ordinal",
        )
        .bind(&plan_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut actions = Vec::with_capacity(rows.len());
        for r in rows {
            let op: String = r.try_get(2)?;
            let payload: String = r.try_get(3)?;
            actions.push(LeasedAction {
                action_id: r.try_get(1)?,
                action_type: action_type(&op).to_string(),
                params: serde_json::from_str(&payload).unwrap_or_default(),
                timeout: action_timeout(&op),
                execution_id: Some(r.try_get(0)?),
            });
        }
        if !actions.is_empty() {
            plans.push(LeasedPlan {
                execution_id: plan_id.clone(),
                plan_id,
                actions,
            });
        }
    }
    tx.commit().await?;
    Ok(plans)
}

/// A state change reported by an agent for one execution.
#[derive(Debug, Clone)]
pub struct Transition {
    pub execution_id: String,
    pub state: &'static str,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// Normalises a reported state; unknown states are refused (never guessed).
pub fn parse_state(s: &str) -> Option<&'static str> {
    match s.trim().to_ascii_uppercase().as_str() {
        "IN_PROGRESS" | "RUNNING" | "STARTED" => Some("IN_PROGRESS"),
        "SUCCEEDED" | "SUCCESS" | "OK" => Some("SUCCEEDED"),
        "FAILED" | "ERROR" => Some("FAILED"),
        _ => None,
    }
}

/// What [`apply_transitions`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Executions that changed.
    pub changed: usize,
    /// Executions that reached SUCCEEDED or FAILED now, with the version of the agent that ran them (for
    /// `nkudo_plan_executions_total{result,agent_version}`, which rollout triggers compare across versions).
    pub finished: Vec<(&'static str, String)>,
}

impl Applied {
    /// Counts the finished executions in `nkudo_plan_executions_total` (call after the commit).
    pub fn count(&self, metrics: &crate::metrics::Metrics) {
        for (state, version) in &self.finished {
            let (result, other) = if *state == "SUCCEEDED" {
                ("succeeded", "failed")
            } else {
                ("failed", "succeeded")
            };
            metrics
                .plan_executions
                .with_label_values(&[result, version.as_str()])
                .inc();
            // Both series exist from a version's first execution, so a failure rate over them is 0, never "no
            // data", for a version that never failed (the control group of a rollout).
            metrics
                .plan_executions
                .with_label_values(&[other, version.as_str()])
                .inc_by(0);
        }
    }
}

/// Applies transitions of executions of the agent's site, forward only, then rolls up the plans touched and
/// moves their VMs. A finished execution records the version of the agent that ran it.
pub async fn apply_transitions(
    conn: &mut AnyConnection,
    who: &Lessee<'_>,
    transitions: &[Transition],
) -> Result<Applied, sqlx::Error> {
    let now = now_ms();
    let mut changed = 0;
    let mut finished = Vec::new();
    let mut plans_touched: Vec<String> = Vec::new();
    for t in transitions {
        let (code, message) = if t.state == "FAILED" {
            (
                Some(
                    t.error_code
                        .clone()
                        .filter(|c| !c.trim().is_empty())
                        .unwrap_or_else(|| "ACTION_FAILED".into()),
                ),
                Some(
                    t.error_message
                        .clone()
                        .filter(|m| !m.trim().is_empty())
                        .unwrap_or_else(|| "action failed".into()),
                ),
            )
        } else {
            (None, None)
        };
        let allowed_from = if t.state == "IN_PROGRESS" {
            "('PENDING')"
        } else {
            "('PENDING', 'IN_PROGRESS')"
        };
        let completed = if t.state == "IN_PROGRESS" { None } else { Some(now) };
        let row = sqlx::query(&format!(
            "UPDATE executions SET state = $1, error_code = $2, error_message = $3, host_id = $4, agent_id = $5, \
             started_at = COALESCE(started_at, $6), completed_at = COALESCE($7, completed_at), updated_at = $6, \
             agent_version = (SELECT agent_version FROM agents WHERE id = $5) \
             WHERE id = $8 AND tenant_id = $9 AND site_id = $10 AND state IN {allowed_from} \
             RETURNING plan_id, vm_id, operation_type, agent_version"
        ))
        .bind(t.state)
        .bind(code)
        .bind(message.map(|m| m.chars().take(4000).collect::<String>()))
        .bind(who.host_id)
        .bind(who.agent_id)
        .bind(now)
        .bind(completed)
        .bind(&t.execution_id)
        .bind(who.tenant_id)
        .bind(who.site_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { continue };
        changed += 1;
        let plan_id: String = row.try_get(0)?;
        let vm_id: Option<String> = row.try_get(1)?;
        let op: String = row.try_get(2)?;
        if t.state == "SUCCEEDED" || t.state == "FAILED" {
            let version: Option<String> = row.try_get(3)?;
            finished.push((t.state, version.unwrap_or_default()));
        }
        if let Some(vm) = vm_id {
            let vm_state = match (t.state, op.as_str()) {
                ("FAILED", _) => Some("ERROR"),
                ("SUCCEEDED", "CREATE") | ("SUCCEEDED", "STOP") => Some("STOPPED"),
                ("SUCCEEDED", "START") => Some("RUNNING"),
                ("SUCCEEDED", "DELETE") => Some("DELETED"),
                ("IN_PROGRESS", "DELETE") => Some("DELETING"),
                _ => None,
            };
            if let Some(to) = vm_state {
                set_vm_state(conn, who, &vm, to, &t.execution_id, now).await?;
            }
        }
        if !plans_touched.contains(&plan_id) {
            plans_touched.push(plan_id);
        }
    }
    for plan in &plans_touched {
        roll_up(conn, plan, now).await?;
    }
    Ok(Applied { changed, finished })
}

async fn set_vm_state(
    conn: &mut AnyConnection,
    who: &Lessee<'_>,
    vm_id: &str,
    to: &'static str,
    execution_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    let from: Option<String> = sqlx::query_scalar(
        "UPDATE microvms SET state = $1, host_id = $2, last_transition_at = $3, updated_at = $3 \
         WHERE tenant_id = $4 AND id = $5 AND site_id = $6 RETURNING state",
    )
    .bind(to)
    .bind(who.host_id)
    .bind(now)
    .bind(who.tenant_id)
    .bind(vm_id)
    .bind(who.site_id)
    .fetch_optional(&mut *conn)
    .await?;
    if from.is_some() {
        let ev = AuditEvent::new(who.tenant_id, "vm.state_change", "microvm", vm_id)
            .actor("AGENT", Some(who.agent_id))
            .site(who.site_id)
            .metadata(serde_json::json!({ "to": to, "execution_id": execution_id, "host_id": who.host_id }));
        audit::record(conn, &ev).await?;
    }
    Ok(())
}

/// Plan status from its executions: any FAILED → FAILED (and what had not started is CANCELLED); all done →
/// SUCCEEDED; anything started → IN_PROGRESS. A finished plan gives up its lease.
pub async fn roll_up(conn: &mut AnyConnection, plan_id: &str, now: i64) -> Result<(), sqlx::Error> {
    let states: Vec<String> = sqlx::query_scalar("SELECT state FROM executions WHERE plan_id = $1")
        .bind(plan_id)
        .fetch_all(&mut *conn)
        .await?;
    let any = |s: &str| states.iter().any(|x| x == s);
    let status = if any("FAILED") {
        sqlx::query(
            "UPDATE executions SET state = 'CANCELLED', completed_at = $1, updated_at = $1, \
             error_code = 'PLAN_FAILED', error_message = 'an earlier action of the plan failed' \
             WHERE plan_id = $2 AND state = 'PENDING'",
        )
        .bind(now)
        .bind(plan_id)
        .execute(&mut *conn)
        .await?;
        if any("IN_PROGRESS") {
            "IN_PROGRESS"
        } else {
            "FAILED"
        }
    } else if states.iter().all(|s| s == "SUCCEEDED" || s == "CANCELLED") {
        "SUCCEEDED"
    } else if any("IN_PROGRESS") || any("SUCCEEDED") {
        "IN_PROGRESS"
    } else {
        "PENDING"
    };
    let terminal = status == "SUCCEEDED" || status == "FAILED";
    sqlx::query(
        "UPDATE plans SET status = $1, updated_at = $2, \
         completed_at = CASE WHEN $3 = 1 THEN $2 ELSE completed_at END, \
         leased_by_agent_id = CASE WHEN $3 = 1 THEN NULL ELSE leased_by_agent_id END, \
         lease_expires_at = CASE WHEN $3 = 1 THEN NULL ELSE lease_expires_at END \
         WHERE id = $4 AND status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')",
    )
    .bind(status)
    .bind(now)
    .bind(i64::from(terminal))
    .bind(plan_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create() -> PlanActionSpec {
        PlanActionSpec {
            operation: "create".into(),
            kernel_path: Some("/var/lib/nkudo/images/vmlinux".into()),
            cmdline: Some("console=ttyS0 root=/dev/vda rw".into()),
            disk_image: Some("/var/lib/nkudo/images/rootfs.raw".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_create_that_cannot_boot_names_the_missing_field() {
        let mut a = create();
        a.kernel_path = None;
        assert!(validate_actions(&[a]).unwrap_err().contains("actions[0].kernel_path"));
        let mut a = create();
        a.cmdline = None;
        assert!(validate_actions(&[a]).unwrap_err().contains("actions[0].cmdline"));
        let mut a = create();
        a.disk_image = None;
        assert!(validate_actions(&[a]).unwrap_err().contains("actions[0].disk_image"));
        let mut a = create();
        a.disk_image = None;
        a.initramfs_path = Some("/boot/initrd".into());
        assert!(validate_actions(&[a]).is_ok(), "an initramfs is something to boot into");
        let mut a = create();
        a.kernel_path = None;
        a.cmdline = None;
        a.firmware_path = Some("/usr/share/cloud-hypervisor/hypervisor-fw".into());
        assert!(validate_actions(&[a]).is_ok());
    }

    #[test]
    fn bad_values_are_refused() {
        let mut a = create();
        a.kernel_path = Some("relative/vmlinux".into());
        assert!(validate_actions(&[a]).unwrap_err().contains("absolute"));
        let mut a = create();
        a.disk_image = Some("/images/../etc/shadow".into());
        assert!(validate_actions(&[a]).is_err());
        let mut a = create();
        a.tap_name = Some("a-very-long-tap-name".into());
        assert!(validate_actions(&[a]).unwrap_err().contains("tap_name"));
        let mut a = create();
        a.mac = Some("zz:00".into());
        assert!(validate_actions(&[a]).unwrap_err().contains("mac"));
        let start = PlanActionSpec {
            operation: "START".into(),
            ..Default::default()
        };
        assert!(validate_actions(&[start]).unwrap_err().contains("vm_id"));
        let start = PlanActionSpec {
            operation: "START".into(),
            vm_id: Some("vm-1".into()),
            kernel_path: Some("/k".into()),
            ..Default::default()
        };
        assert!(validate_actions(&[start])
            .unwrap_err()
            .contains("only valid for CREATE"));
        let bogus = PlanActionSpec {
            operation: "REBOOT".into(),
            vm_id: Some("vm-1".into()),
            ..Default::default()
        };
        assert!(validate_actions(&[bogus]).unwrap_err().contains("operation"));
        assert!(validate_actions(&[]).is_err());
    }

    #[test]
    fn operation_ids_are_unique_and_generated() {
        let mut a = create();
        a.vm_id = Some("vm-demo-001".into());
        let b = PlanActionSpec {
            operation: "start".into(),
            vm_id: Some("vm-demo-001".into()),
            ..Default::default()
        };
        let v = validate_actions(&[a.clone(), b]).unwrap();
        assert_eq!(v[0].operation_id, "create-1");
        assert_eq!(v[1].operation_id, "start-2");
        assert_eq!(v[0].params["vcpu"], 1);
        assert_eq!(v[0].params["rootfs_path"], "/var/lib/nkudo/images/rootfs.raw");
        let mut dup = a.clone();
        dup.operation_id = Some("x".into());
        assert!(validate_actions(&[dup.clone(), dup]).unwrap_err().contains("unique"));
    }
}
