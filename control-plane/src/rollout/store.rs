//! The rollout tables: rollouts, their stages, the agents they touched, the hash-chained decision log, and the
//! fleet facts the controller selects from. Every function takes a connection so callers choose the transaction.

use crate::util::{rfc3339, sha256_hex};
use nkudo_core::api::{RolloutDecision, RolloutState, UpdatePhase, UpdateStatus, LABEL_ENVIRONMENT, LABEL_RING};
use nkudo_core::manifest::canonical_json;
use sqlx::{AnyConnection, Row};
use std::collections::BTreeMap;

/// A rollout row.
#[derive(Debug, Clone)]
pub struct RolloutRow {
    pub id: String,
    pub name: Option<String>,
    pub version: String,
    pub previous_version: Option<String>,
    pub policy_text: String,
    pub state: RolloutState,
    pub current_stage: i64,
    pub approved_stage: i64,
    pub triggers_json: String,
    pub baseline_json: String,
    pub metrics_source: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

const ROLLOUT_COLUMNS: &str =
    "id, name, version, previous_version, policy_text, state, current_stage, approved_stage, \
     triggers_json, baseline_json, metrics_source, created_at, updated_at, finished_at";

pub fn parse_state(s: &str) -> RolloutState {
    match s {
        "paused" => RolloutState::Paused,
        "waiting-approval" => RolloutState::WaitingApproval,
        "completed" => RolloutState::Completed,
        "rolled-back" => RolloutState::RolledBack,
        "aborted" => RolloutState::Aborted,
        _ => RolloutState::Running,
    }
}

fn rollout_from_row(r: &sqlx::any::AnyRow) -> Result<RolloutRow, sqlx::Error> {
    let state: String = r.try_get(5)?;
    Ok(RolloutRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        version: r.try_get(2)?,
        previous_version: r.try_get(3)?,
        policy_text: r.try_get(4)?,
        state: parse_state(&state),
        current_stage: r.try_get(6)?,
        approved_stage: r.try_get(7)?,
        triggers_json: r.try_get(8)?,
        baseline_json: r.try_get(9)?,
        metrics_source: r.try_get(10)?,
        created_at: r.try_get(11)?,
        updated_at: r.try_get(12)?,
        finished_at: r.try_get(13)?,
    })
}

pub async fn get(conn: &mut AnyConnection, id: &str) -> Result<Option<RolloutRow>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// Rollouts, newest first.
pub async fn list(conn: &mut AnyConnection, limit: i64) -> Result<Vec<RolloutRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY created_at DESC, id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(rollout_from_row).collect()
}

/// The rollout that is not final, if any (at most one at a time).
pub async fn active(conn: &mut AnyConnection) -> Result<Option<RolloutRow>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ('running', 'paused', 'waiting-approval') \
         ORDER BY created_at LIMIT 1"
    ))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

pub async fn insert(conn: &mut AnyConnection, r: &RolloutRow, stage_names: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO rollouts ({ROLLOUT_COLUMNS}, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         $12, $13, $14, 'admin')"
    ))
    .bind(&r.id)
    .bind(&r.name)
    .bind(&r.version)
    .bind(&r.previous_version)
    .bind(&r.policy_text)
    .bind(r.state.as_str())
    .bind(r.current_stage)
    .bind(r.approved_stage)
    .bind(&r.triggers_json)
    .bind(&r.baseline_json)
    .bind(&r.metrics_source)
    .bind(r.created_at)
    .bind(r.updated_at)
    .bind(r.finished_at)
    .execute(&mut *conn)
    .await?;
    for (i, name) in stage_names.iter().enumerate() {
        sqlx::query("INSERT INTO rollout_stages (rollout_id, idx, name, state) VALUES ($1, $2, $3, 'pending')")
            .bind(&r.id)
            .bind(i as i64)
            .bind(name)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A stage row.
#[derive(Debug, Clone)]
pub struct StageRow {
    pub idx: i64,
    pub name: String,
    pub state: String,
    pub started_at: Option<i64>,
    pub bake_until: Option<i64>,
    pub completed_at: Option<i64>,
}

pub async fn stages(conn: &mut AnyConnection, rollout_id: &str) -> Result<Vec<StageRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT idx, name, state, started_at, bake_until, completed_at FROM rollout_stages WHERE rollout_id = $1 \
         ORDER BY idx",
    )
    .bind(rollout_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StageRow {
                idx: r.try_get(0)?,
                name: r.try_get(1)?,
                state: r.try_get(2)?,
                started_at: r.try_get(3)?,
                bake_until: r.try_get(4)?,
                completed_at: r.try_get(5)?,
            })
        })
        .collect()
}

pub async fn save_stage(conn: &mut AnyConnection, rollout_id: &str, s: &StageRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rollout_stages SET state = $1, started_at = $2, bake_until = $3, completed_at = $4 \
         WHERE rollout_id = $5 AND idx = $6",
    )
    .bind(&s.state)
    .bind(s.started_at)
    .bind(s.bake_until)
    .bind(s.completed_at)
    .bind(rollout_id)
    .bind(s.idx)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An agent of the fleet with what selection needs.
#[derive(Debug, Clone)]
pub struct FleetAgent {
    pub id: String,
    pub tenant_id: String,
    pub tenant_slug: String,
    pub site_id: String,
    pub site_name: String,
    pub ring: Option<String>,
    pub environment: Option<String>,
    pub agent_version: String,
}

fn labels(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// Every enrolled, non-revoked agent with its effective `ring` and `environment` (site labels overlaid by the
/// agent's own).
pub async fn fleet(conn: &mut AnyConnection) -> Result<Vec<FleetAgent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT a.id, a.tenant_id, t.slug, a.site_id, s.name, a.labels_json, s.labels_json, a.agent_version \
         FROM agents a JOIN sites s ON s.id = a.site_id JOIN tenants t ON t.id = a.tenant_id \
         WHERE a.revoked_at IS NULL",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let agent_labels: String = r.try_get(5)?;
        let site_labels: String = r.try_get(6)?;
        let (a, s) = (labels(&agent_labels), labels(&site_labels));
        let pick = |k: &str| a.get(k).or_else(|| s.get(k)).cloned();
        out.push(FleetAgent {
            id: r.try_get(0)?,
            tenant_id: r.try_get(1)?,
            tenant_slug: r.try_get(2)?,
            site_id: r.try_get(3)?,
            site_name: r.try_get(4)?,
            ring: pick(LABEL_RING),
            environment: pick(LABEL_ENVIRONMENT),
            agent_version: r.try_get(7)?,
        });
    }
    Ok(out)
}

/// Agent ids the rollout has touched (selected by a started stage).
pub async fn touched_ids(conn: &mut AnyConnection, rollout_id: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT agent_id FROM rollout_agents WHERE rollout_id = $1")
        .bind(rollout_id)
        .fetch_all(&mut *conn)
        .await
}

/// Rows per multi-row INSERT (6 parameters each: well under SQLite's and Postgres's parameter limits).
const INSERT_CHUNK: usize = 500;

/// `($1, $2, ...), (...)` for `rows` rows of `cols` parameters.
fn values_list(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", r * cols + c + 1));
        }
        out.push(')');
    }
    out
}

/// Records the members of a stage as it starts.
pub async fn add_members(
    conn: &mut AnyConnection,
    rollout_id: &str,
    stage_idx: i64,
    members: &[(String, String, u64, String)],
) -> Result<(), sqlx::Error> {
    for chunk in members.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO rollout_agents (rollout_id, agent_id, stage_idx, site_id, bucket, previous_version) VALUES {}",
            values_list(chunk.len(), 6)
        );
        let mut q = sqlx::query(&sql);
        for (agent_id, site_id, bucket, previous) in chunk {
            q = q
                .bind(rollout_id)
                .bind(agent_id)
                .bind(stage_idx)
                .bind(site_id)
                .bind(*bucket as i64)
                .bind(previous);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A stage member with its live state.
#[derive(Debug, Clone)]
pub struct MemberRow {
    pub agent_id: String,
    pub site_id: String,
    pub bucket: u64,
    pub previous_version: String,
    pub switched_at: Option<i64>,
    pub agent_version: Option<String>,
    pub phase: UpdatePhase,
}

/// The members of one stage (or all touched agents with `stage_idx = None`).
pub async fn members(
    conn: &mut AnyConnection,
    rollout_id: &str,
    stage_idx: Option<i64>,
) -> Result<Vec<MemberRow>, sqlx::Error> {
    let sql = "SELECT ra.agent_id, ra.site_id, ra.bucket, ra.previous_version, ra.switched_at, a.agent_version, \
               a.update_json FROM rollout_agents ra LEFT JOIN agents a ON a.id = ra.agent_id \
               WHERE ra.rollout_id = $1 AND ($2 < 0 OR ra.stage_idx = $2)";
    let rows = sqlx::query(sql)
        .bind(rollout_id)
        .bind(stage_idx.unwrap_or(-1))
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let update: Option<String> = r.try_get(6)?;
        let phase = update
            .and_then(|u| serde_json::from_str::<UpdateStatus>(&u).ok())
            .map(|u| u.phase)
            .unwrap_or_default();
        let bucket: i64 = r.try_get(2)?;
        out.push(MemberRow {
            agent_id: r.try_get(0)?,
            site_id: r.try_get(1)?,
            bucket: bucket.max(0) as u64,
            previous_version: r.try_get(3)?,
            switched_at: r.try_get(4)?,
            agent_version: r.try_get(5)?,
            phase,
        });
    }
    Ok(out)
}

const MEMBER_SELECT: &str = "SELECT ra.agent_id, ra.site_id, ra.bucket, ra.previous_version, ra.switched_at, \
     a.agent_version, a.update_json FROM rollout_agents ra LEFT JOIN agents a ON a.id = ra.agent_id";

fn member_rows(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<MemberRow>, sqlx::Error> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let update: Option<String> = r.try_get(6)?;
        let phase = update
            .and_then(|u| serde_json::from_str::<UpdateStatus>(&u).ok())
            .map(|u| u.phase)
            .unwrap_or_default();
        let bucket: i64 = r.try_get(2)?;
        out.push(MemberRow {
            agent_id: r.try_get(0)?,
            site_id: r.try_get(1)?,
            bucket: bucket.max(0) as u64,
            previous_version: r.try_get(3)?,
            switched_at: r.try_get(4)?,
            agent_version: r.try_get(5)?,
            phase,
        });
    }
    Ok(out)
}

/// Members of a stage that were switched and do not report `target` as text (the caller re-checks SemVer
/// equality): the ones still switching.
pub async fn in_flight(
    conn: &mut AnyConnection,
    rollout_id: &str,
    stage_idx: i64,
    target: &str,
) -> Result<Vec<MemberRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "{MEMBER_SELECT} WHERE ra.rollout_id = $1 AND ra.stage_idx = $2 AND ra.switched_at IS NOT NULL \
         AND (a.agent_version IS NULL OR a.agent_version <> $3)"
    ))
    .bind(rollout_id)
    .bind(stage_idx)
    .bind(target)
    .fetch_all(&mut *conn)
    .await?;
    member_rows(rows)
}

/// The next `limit` members of a stage not switched yet and not reporting `target`, in switching order.
pub async fn pending(
    conn: &mut AnyConnection,
    rollout_id: &str,
    stage_idx: i64,
    target: &str,
    limit: i64,
) -> Result<Vec<MemberRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "{MEMBER_SELECT} WHERE ra.rollout_id = $1 AND ra.stage_idx = $2 AND ra.switched_at IS NULL \
         AND (a.agent_version IS NULL OR a.agent_version <> $3) ORDER BY ra.bucket, ra.agent_id LIMIT $4"
    ))
    .bind(rollout_id)
    .bind(stage_idx)
    .bind(target)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    member_rows(rows)
}

pub async fn mark_switched(
    conn: &mut AnyConnection,
    rollout_id: &str,
    agent_ids: &[String],
    now: i64,
) -> Result<(), sqlx::Error> {
    for chunk in agent_ids.chunks(INSERT_CHUNK) {
        let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "UPDATE rollout_agents SET switched_at = $1 WHERE rollout_id = $2 AND agent_id IN ({})",
            list.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(now).bind(rollout_id);
        for id in chunk {
            q = q.bind(id);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Sets the desired version of each agent (scope `agent`), as the rollout `set_by` decides.
pub async fn set_agent_desired(
    conn: &mut AnyConnection,
    entries: &[(String, String)],
    rollback: bool,
    set_by: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    for chunk in entries.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO desired_versions (scope, target, version, rollback, set_by, set_at) VALUES {} \
             ON CONFLICT (scope, target) DO UPDATE SET version = excluded.version, rollback = excluded.rollback, \
             set_by = excluded.set_by, set_at = excluded.set_at",
            values_list(chunk.len(), 6)
        );
        let mut q = sqlx::query(&sql);
        for (agent_id, version) in chunk {
            q = q
                .bind("agent")
                .bind(agent_id)
                .bind(version)
                .bind(if rollback { 1i64 } else { 0 })
                .bind(set_by)
                .bind(now);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Marks a release bad fleet-wide: no agent is pointed at it again until an operator clears the mark.
pub async fn mark_bad(conn: &mut AnyConnection, version: &str, reason: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE releases SET bad = 1, bad_reason = $1, bad_at = $2 WHERE version = $3")
        .bind(reason)
        .bind(now)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What a new decision says.
#[derive(Debug, Clone, Default)]
pub struct NewDecision {
    pub actor: &'static str,
    pub kind: &'static str,
    pub stage: Option<String>,
    pub trigger: Option<String>,
    pub query: Option<String>,
    pub values: serde_json::Value,
    pub action: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn entry_hash(prev: &str, rollout_id: &str, seq: i64, at: i64, d: &NewDecision) -> String {
    let body = serde_json::json!({
        "rollout_id": rollout_id, "seq": seq, "at": at, "actor": d.actor, "kind": d.kind, "stage": d.stage,
        "trigger": d.trigger, "query": d.query, "values": d.values, "action": d.action,
    });
    sha256_hex(format!("{prev}\n{}", canonical_json(&body)).as_bytes())
}

/// Appends a decision to the rollout's hash chain (call inside the transaction that acts on it).
/// The highest decision sequence number of a rollout (0 before its first decision).
pub async fn last_decision_seq(conn: &mut AnyConnection, rollout_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM rollout_decisions WHERE rollout_id = $1")
        .bind(rollout_id)
        .fetch_one(&mut *conn)
        .await
}

/// The kinds of a rollout's decisions after `seq`, in order: what a transaction appended, counted in
/// `nkudo_rollout_decisions_total` once it has committed.
pub async fn decision_kinds_after(
    conn: &mut AnyConnection,
    rollout_id: &str,
    seq: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT kind FROM rollout_decisions WHERE rollout_id = $1 AND seq > $2 ORDER BY seq")
        .bind(rollout_id)
        .bind(seq)
        .fetch_all(&mut *conn)
        .await
}

pub async fn append_decision(
    conn: &mut AnyConnection,
    rollout_id: &str,
    d: NewDecision,
    now: i64,
) -> Result<RolloutDecision, sqlx::Error> {
    let last = sqlx::query("SELECT seq, hash FROM rollout_decisions WHERE rollout_id = $1 ORDER BY seq DESC LIMIT 1")
        .bind(rollout_id)
        .fetch_optional(&mut *conn)
        .await?;
    let (seq, prev) = match last {
        Some(r) => (r.try_get::<i64, _>(0)? + 1, r.try_get::<String, _>(1)?),
        None => (1, GENESIS.to_string()),
    };
    let hash = entry_hash(&prev, rollout_id, seq, now, &d);
    sqlx::query(
        "INSERT INTO rollout_decisions (rollout_id, seq, at, actor, kind, stage, trigger_name, query, values_json, \
         action, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(rollout_id)
    .bind(seq)
    .bind(now)
    .bind(d.actor)
    .bind(d.kind)
    .bind(&d.stage)
    .bind(&d.trigger)
    .bind(&d.query)
    .bind(d.values.to_string())
    .bind(&d.action)
    .bind(&prev)
    .bind(&hash)
    .execute(&mut *conn)
    .await?;
    Ok(RolloutDecision {
        seq,
        at: rfc3339(now),
        actor: d.actor.to_string(),
        kind: d.kind.to_string(),
        stage: d.stage,
        trigger: d.trigger,
        query: d.query,
        threshold: d.values.get("threshold").and_then(|v| v.as_f64()),
        values: d.values,
        action: d.action,
        hash,
    })
}

/// The decisions of a rollout (the newest `limit`, oldest first), and whether the whole chain verifies.
pub async fn decisions(
    conn: &mut AnyConnection,
    rollout_id: &str,
    limit: Option<i64>,
) -> Result<(Vec<RolloutDecision>, bool), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, at, actor, kind, stage, trigger_name, query, values_json, action, prev_hash, hash \
         FROM rollout_decisions WHERE rollout_id = $1 ORDER BY seq",
    )
    .bind(rollout_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut prev = GENESIS.to_string();
    let mut ok = true;
    for (i, r) in rows.iter().enumerate() {
        let seq: i64 = r.try_get(0)?;
        let at: i64 = r.try_get(1)?;
        let actor: String = r.try_get(2)?;
        let kind: String = r.try_get(3)?;
        let values_text: String = r.try_get(7)?;
        let values: serde_json::Value = serde_json::from_str(&values_text).unwrap_or(serde_json::Value::Null);
        let d = NewDecision {
            actor: if actor == "admin" { "admin" } else { "controller" },
            kind: leak_kind(&kind),
            stage: r.try_get(4)?,
            trigger: r.try_get(5)?,
            query: r.try_get(6)?,
            values,
            action: r.try_get(8)?,
        };
        let stored_prev: String = r.try_get(9)?;
        let hash: String = r.try_get(10)?;
        if seq != i as i64 + 1 || stored_prev != prev || entry_hash(&prev, rollout_id, seq, at, &d) != hash {
            ok = false;
        }
        prev = hash.clone();
        out.push(RolloutDecision {
            seq,
            at: rfc3339(at),
            actor,
            kind,
            stage: d.stage,
            trigger: d.trigger,
            query: d.query,
            threshold: d.values.get("threshold").and_then(|v| v.as_f64()),
            values: d.values,
            action: d.action,
            hash,
        });
    }
    if let Some(n) = limit {
        let skip = out.len().saturating_sub(n.max(0) as usize);
        out.drain(..skip);
    }
    Ok((out, ok))
}

/// Decision kinds are a closed set of static strings; map a stored one back (unknown ones verify as such).
fn leak_kind(kind: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "started",
        "stage-started",
        "agents-switched",
        "stage-baking",
        "stage-done",
        "gate-waiting",
        "approved",
        "paused",
        "resumed",
        "breach",
        "report-timeout",
        "rolled-back",
        "aborted",
        "completed",
        "prerelease-refused",
    ];
    KINDS.iter().find(|k| **k == kind).copied().unwrap_or("unknown")
}

/// Saves the rollout only if nobody changed it since it was loaded (`updated_at` as the version). False when
/// another writer (an operator's pause or abort) came first.
pub async fn save_if_unchanged(conn: &mut AnyConnection, r: &RolloutRow, loaded_at: i64) -> Result<bool, sqlx::Error> {
    let res = sqlx::query(
        "UPDATE rollouts SET state = $1, current_stage = $2, approved_stage = $3, triggers_json = $4, \
         baseline_json = $5, previous_version = $6, updated_at = $7, finished_at = $8 WHERE id = $9 AND updated_at = $10",
    )
    .bind(r.state.as_str())
    .bind(r.current_stage)
    .bind(r.approved_stage)
    .bind(&r.triggers_json)
    .bind(&r.baseline_json)
    .bind(&r.previous_version)
    .bind(r.updated_at)
    .bind(r.finished_at)
    .bind(&r.id)
    .bind(loaded_at)
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_lists() {
        assert_eq!(super::values_list(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(super::values_list(1, 1), "($1)");
    }
}
