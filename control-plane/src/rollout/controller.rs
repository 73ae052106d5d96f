//! The rollout controller: one replica at a time (a database lease) advances the active rollout every tick:
//! evaluates the current stage's triggers at their intervals, rolls every touched agent back on a breach, and
//! otherwise takes the stage machine's next step (`nkudo_core::rollout::machine`). All state is in the
//! database, so a restarted control plane (or another replica) continues where the last one stopped.

use super::source::observation;
use super::store::{self, NewDecision, RolloutRow, StageRow};
use crate::state::SharedState;
use crate::util::now_ms;
use nkudo_core::api::{RolloutState, ENVIRONMENT_PRODUCTION};
use nkudo_core::rollout::machine::{next_steps, Member, StagePhase, Step};
use nkudo_core::rollout::select::{stable_bucket, AgentFacts};
use nkudo_core::rollout::trigger::{Bindings, Compare, Decision, Observation, TriggerState, Verdict};
use nkudo_core::rollout::{parse_policy, Policy};
use nkudo_core::version::Channel;
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use std::time::Instant;
use tokio::sync::watch;

/// At most this many agents are switched in one cycle (whatever the blast radius allows), so that a cycle stays
/// short however large a stage is.
const MAX_SWITCH_PER_CYCLE: usize = 5_000;

/// Whether a member reports `target` (SemVer equality, build metadata ignored).
fn reports(m: &store::MemberRow, target: &semver::Version) -> bool {
    m.agent_version
        .as_deref()
        .and_then(|v| nkudo_core::version::parse(v).ok())
        .is_some_and(|v| nkudo_core::rollout::machine::on_version(Some(&v), target))
}

/// Name of the lease row.
pub const LEASE: &str = "rollout-controller";
/// Enrollment attempts are kept a week (the builtin enrollment failure rate looks back a window of minutes).
const ENROLLMENT_ATTEMPTS_KEPT_MS: i64 = 7 * 86_400_000;
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// A trigger's runtime state, kept in `rollouts.triggers_json` (keyed by trigger name, reset per stage).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TriggerRuntime {
    pub state: TriggerState,
    pub last_eval_ms: Option<i64>,
    pub observation: Observation,
    pub verdict: Option<String>,
    pub compared: Option<f64>,
    pub query: Option<String>,
}

pub type Runtimes = BTreeMap<String, TriggerRuntime>;

/// Why a cycle failed (logged; the next tick retries).
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Runs until `shutdown`: takes the lease, then cycles every `tick`.
pub async fn run(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let holder = format!("{}-{}", std::process::id(), crate::util::new_id());
    let tick = state.cfg.rollout_tick;
    let ttl = (tick.as_millis() as i64 * 5).max(5_000);
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => break,
        }
        match super::lease::acquire(&state.db.pool, LEASE, &holder, now_ms(), ttl).await {
            Ok(true) => {
                if let Err(e) = cycle(&state).await {
                    tracing::warn!(error = %e, "rollout controller cycle failed; retrying next tick");
                }
                if last_prune.elapsed() > PRUNE_EVERY {
                    last_prune = Instant::now();
                    let r = sqlx::query("DELETE FROM enrollment_attempts WHERE at < $1")
                        .bind(now_ms() - ENROLLMENT_ATTEMPTS_KEPT_MS)
                        .execute(&state.db.pool)
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "pruning enrollment attempts");
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "rollout controller lease"),
        }
    }
    let _ = super::lease::release(&state.db.pool, LEASE, &holder).await;
}

fn stage_phase(s: &StageRow) -> StagePhase {
    match s.state.as_str() {
        "switching" => StagePhase::Switching,
        "baking" => StagePhase::Baking {
            until_ms: s.bake_until.unwrap_or(0),
        },
        "done" | "rolled-back" => StagePhase::Done,
        _ => StagePhase::Pending,
    }
}

/// One controller cycle. Public for the benchmark and tests.
pub async fn cycle(state: &SharedState) -> Result<(), CycleError> {
    let started = Instant::now();
    let mut conn = state.db.pool.acquire().await?;
    let Some(r) = store::active(&mut conn).await? else {
        state
            .rollout_metrics
            .cycle_seconds
            .observe(started.elapsed().as_secs_f64());
        return Ok(());
    };
    drop(conn);
    let result = advance(state, r).await;
    state
        .rollout_metrics
        .cycle_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn advance(state: &SharedState, mut r: RolloutRow) -> Result<(), CycleError> {
    let now = now_ms();
    let loaded_at = r.updated_at;
    let policy = match parse_policy(&r.policy_text) {
        Ok(p) => p,
        Err(e) => {
            // Validated at start; a stored policy that no longer parses (a newer release's format) stops here.
            tracing::error!(rollout = %r.id, error = %e, "stored rollout policy does not parse");
            return Ok(());
        }
    };
    let mut tx = state.db.begin_write().await?;
    let conn: &mut AnyConnection = &mut tx;
    let seq_at_start = store::last_decision_seq(conn, &r.id).await?;
    let mut stages = store::stages(conn, &r.id).await?;
    let idx = r.current_stage.max(0) as usize;
    let mut runtimes: Runtimes = serde_json::from_str(&r.triggers_json).unwrap_or_default();
    let mut changed = false;

    // 1. Triggers of the current stage, once it has started (paused rollouts keep watching).
    if let (Some(stage), Some(row)) = (policy.stages.get(idx), stages.get(idx)) {
        if matches!(stage_phase(row), StagePhase::Switching | StagePhase::Baking { .. }) {
            if let Some((trigger, values, query)) =
                evaluate_due(state, conn, &policy, &r, stage, &mut runtimes, now).await?
            {
                r.triggers_json = serde_json::to_string(&runtimes).unwrap_or_default();
                let reason = format!("trigger {trigger} breached in stage {}", stage.name);
                roll_back(
                    conn,
                    &mut r,
                    &mut stages,
                    RollBack {
                        kind: "breach",
                        actor: "controller",
                        stage: Some(stage.name.clone()),
                        trigger: Some(trigger),
                        query,
                        values,
                        reason,
                        final_state: RolloutState::RolledBack,
                        mark_bad: true,
                    },
                    now,
                )
                .await?;
                return commit(state, tx, &r, loaded_at, seq_at_start).await;
            }
            changed = true;
        }
    }

    // 2. The stage machine, when running.
    if r.state == RolloutState::Running || r.state == RolloutState::WaitingApproval {
        changed |= step(state, conn, &policy, &mut r, &mut stages, &mut runtimes, now).await?;
    }
    if changed {
        r.triggers_json = serde_json::to_string(&runtimes).unwrap_or_default();
        commit(state, tx, &r, loaded_at, seq_at_start).await
    } else {
        Ok(())
    }
}

/// Saves the rollout unless an operator (or another replica) changed it meanwhile: then this cycle's work,
/// decisions included, is dropped and redone. Decisions are counted in the metrics only once committed.
async fn commit(
    state: &SharedState,
    mut tx: sqlx::Transaction<'static, sqlx::Any>,
    r: &RolloutRow,
    loaded_at: i64,
    seq_at_start: i64,
) -> Result<(), CycleError> {
    let mut r = r.clone();
    r.updated_at = now_ms().max(loaded_at + 1);
    if store::save_if_unchanged(&mut tx, &r, loaded_at).await? {
        let kinds = store::decision_kinds_after(&mut tx, &r.id, seq_at_start).await?;
        tx.commit().await?;
        super::publish_metrics(&state.rollout_metrics, &r);
        super::count_decisions(&state.rollout_metrics, &kinds);
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

/// Evaluates the triggers that are due; returns the one that fired, with its values and query.
async fn evaluate_due(
    state: &SharedState,
    conn: &mut AnyConnection,
    policy: &Policy,
    r: &RolloutRow,
    stage: &nkudo_core::rollout::Stage,
    runtimes: &mut Runtimes,
    now: i64,
) -> Result<Option<(String, serde_json::Value, Option<String>)>, CycleError> {
    let source = &state.rollout_source;
    let new_version = policy.version.to_string();
    let previous = r.previous_version.clone().unwrap_or_default();
    let baselines: BTreeMap<String, f64> = serde_json::from_str(&r.baseline_json).unwrap_or_default();
    for t in &stage.analysis {
        let rt = runtimes.entry(t.name.clone()).or_default();
        if rt
            .last_eval_ms
            .is_some_and(|at| now - at < t.interval.as_millis() as i64)
        {
            continue;
        }
        let b = Bindings {
            version: &new_version,
            new_version: &new_version,
            previous_version: &previous,
            stage: &stage.name,
            window: t.window,
        };
        let cohort = match source.measure(conn, t, &b, now).await {
            Ok(m) => m,
            Err(e) => {
                // An unreachable source is no data: never a pass.
                tracing::warn!(trigger = %t.name, error = %e, "trigger evaluation failed");
                super::source::Measured {
                    query: e,
                    value: None,
                    samples: None,
                }
            }
        };
        let reference = match t.compare {
            Compare::Threshold => None,
            Compare::Baseline => baselines.get(&t.name).copied(),
            Compare::Control if previous.is_empty() => None,
            Compare::Control => {
                let cb = Bindings {
                    version: &previous,
                    ..b.clone()
                };
                source.measure(conn, t, &cb, now).await.ok().and_then(|m| m.value)
            }
        };
        let obs = observation(&cohort, reference);
        let verdict = t.judge(&obs);
        let decision = rt.state.record(t, &verdict);
        let (name, compared) = match &verdict {
            Verdict::Pass { compared } => ("pass", Some(*compared)),
            Verdict::Breach { compared } => ("breach", Some(*compared)),
            Verdict::Inconclusive { .. } => ("inconclusive", None),
        };
        rt.last_eval_ms = Some(now);
        rt.observation = obs;
        rt.verdict = Some(name.to_string());
        rt.compared = compared;
        rt.query = Some(cohort.query.clone());
        state
            .rollout_metrics
            .evaluations
            .with_label_values(&[t.name.as_str(), name])
            .inc();
        if decision == Decision::Fire {
            let values = serde_json::json!({
                "value": obs.value, "reference": obs.reference, "samples": obs.samples, "compared": compared,
                "threshold": t.threshold, "operator": t.operator.as_str(), "compare": format!("{:?}", t.compare).to_lowercase(),
                "consecutive_breaches": rt.state.consecutive_breaches, "verdict": verdict,
            });
            return Ok(Some((t.name.clone(), values, Some(cohort.query))));
        }
    }
    Ok(None)
}

struct RollBack {
    kind: &'static str,
    actor: &'static str,
    stage: Option<String>,
    trigger: Option<String>,
    query: Option<String>,
    values: serde_json::Value,
    reason: String,
    final_state: RolloutState,
    mark_bad: bool,
}

/// Sends every agent the rollout switched back to the version it ran before (a signed rollback target),
/// marks the release bad when asked, closes the rollout and records why.
async fn roll_back(
    conn: &mut AnyConnection,
    r: &mut RolloutRow,
    stages: &mut [StageRow],
    rb: RollBack,
    now: i64,
) -> Result<(), CycleError> {
    let touched = store::members(conn, &r.id, None).await?;
    let entries: Vec<(String, String)> = touched
        .iter()
        .filter(|m| m.switched_at.is_some())
        .map(|m| (m.agent_id.clone(), m.previous_version.clone()))
        .collect();
    let set_by = format!("rollout:{}", r.id);
    store::set_agent_desired(conn, &entries, true, &set_by, now).await?;
    if rb.mark_bad {
        store::mark_bad(conn, &r.version, &rb.reason, now).await?;
    }
    for s in stages.iter_mut() {
        if matches!(s.state.as_str(), "switching" | "baking" | "waiting-approval") {
            s.state = "rolled-back".into();
            s.completed_at = Some(now);
            store::save_stage(conn, &r.id, s).await?;
        }
    }
    let mut values = rb.values;
    if let serde_json::Value::Object(m) = &mut values {
        m.insert("agents_sent_back".into(), entries.len().into());
    }
    store::append_decision(
        conn,
        &r.id,
        NewDecision {
            actor: rb.actor,
            kind: rb.kind,
            stage: rb.stage.clone(),
            trigger: rb.trigger.clone(),
            query: rb.query,
            values: values.clone(),
            action: format!(
                "{}; {} agent(s) sent back to their previous version{}",
                rb.reason,
                entries.len(),
                if rb.mark_bad {
                    format!("; {} marked bad", r.version)
                } else {
                    String::new()
                }
            ),
        },
        now,
    )
    .await?;
    r.state = rb.final_state;
    r.finished_at = Some(now);
    Ok(())
}

/// Public entry for `abort` (the route), inside the caller's transaction.
pub async fn abort(conn: &mut AnyConnection, r: &mut RolloutRow, reason: String, now: i64) -> Result<(), CycleError> {
    let mut stages = store::stages(conn, &r.id).await?;
    roll_back(
        conn,
        r,
        &mut stages,
        RollBack {
            kind: "aborted",
            actor: "admin",
            stage: None,
            trigger: None,
            query: None,
            values: serde_json::json!({}),
            reason,
            final_state: RolloutState::Aborted,
            mark_bad: false,
        },
        now,
    )
    .await
}

/// A controller decision.
fn dec(kind: &'static str, stage: Option<&str>, values: serde_json::Value, action: String) -> NewDecision {
    NewDecision {
        actor: "controller",
        kind,
        stage: stage.map(str::to_string),
        values,
        action,
        ..Default::default()
    }
}

async fn decide(conn: &mut AnyConnection, r: &RolloutRow, d: NewDecision, now: i64) -> Result<(), CycleError> {
    store::append_decision(conn, &r.id, d, now).await?;
    Ok(())
}

/// Applies the stage machine's next step. Returns whether anything changed.
async fn step(
    state: &SharedState,
    conn: &mut AnyConnection,
    policy: &Policy,
    r: &mut RolloutRow,
    stages: &mut [StageRow],
    runtimes: &mut Runtimes,
    now: i64,
) -> Result<bool, CycleError> {
    let idx = r.current_stage.max(0) as usize;
    let (Some(stage), Some(row)) = (policy.stages.get(idx), stages.get(idx).cloned()) else {
        r.state = RolloutState::Completed;
        r.finished_at = Some(now);
        decide(
            conn,
            r,
            dec("completed", None, serde_json::json!({}), "every stage is done".into()),
            now,
        )
        .await?;
        return Ok(true);
    };
    let phase = stage_phase(&row);
    let approved = r.approved_stage == idx as i64;
    // Only what the step needs: the members still switching (switched, not yet on the version) and the next
    // candidates in switching order, never the whole stage (a stage of 100,000 agents stays cheap per cycle).
    let members: Vec<Member> = if phase == StagePhase::Switching {
        let target = policy.version.to_string();
        let in_flight: Vec<store::MemberRow> = store::in_flight(conn, &r.id, idx as i64, &target)
            .await?
            .into_iter()
            .filter(|m| !reports(m, &policy.version))
            .collect();
        let room = stage
            .max_concurrent
            .map(|n| (n as usize).saturating_sub(in_flight.len()))
            .unwrap_or(MAX_SWITCH_PER_CYCLE)
            .min(MAX_SWITCH_PER_CYCLE);
        // Per-site caps may skip candidates: read more than the room.
        let want = if stage.max_concurrent_per_site.is_some() {
            room * 4
        } else {
            room
        };
        let pending = store::pending(conn, &r.id, idx as i64, &target, want.max(1) as i64).await?;
        in_flight
            .into_iter()
            .chain(pending.into_iter().filter(|m| !reports(m, &policy.version)))
            .map(|m| Member {
                reported_version: m
                    .agent_version
                    .as_deref()
                    .and_then(|v| nkudo_core::version::parse(v).ok()),
                agent_id: m.agent_id,
                site_id: m.site_id,
                bucket: m.bucket,
                phase: m.phase,
                switched_at_ms: m.switched_at,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut changed = false;
    for s in next_steps(policy, stage, phase, approved, &members, now) {
        let mut row = stages[idx].clone();
        match s {
            Step::Wait => {}
            Step::AwaitApproval => {
                if row.state != "waiting-approval" {
                    row.state = "waiting-approval".into();
                    store::save_stage(conn, &r.id, &row).await?;
                    r.state = RolloutState::WaitingApproval;
                    decide(
                        conn,
                        r,
                        dec(
                            "gate-waiting",
                            Some(&stage.name),
                            serde_json::json!({}),
                            format!("stage {} waits for `releaser rollout approve {}`", stage.name, r.id),
                        ),
                        now,
                    )
                    .await?;
                    changed = true;
                }
            }
            Step::Start => {
                changed = true;
                if !start_stage(state, conn, policy, r, stages, idx, now).await? {
                    return Ok(true);
                }
                runtimes.clear();
            }
            Step::Switch(batch) => {
                let entries: Vec<(String, String)> =
                    batch.iter().map(|a| (a.clone(), policy.version.to_string())).collect();
                store::set_agent_desired(conn, &entries, false, &format!("rollout:{}", r.id), now).await?;
                store::mark_switched(conn, &r.id, &batch, now).await?;
                let shown: Vec<&String> = batch.iter().take(20).collect();
                decide(
                    conn,
                    r,
                    dec(
                        "agents-switched",
                        Some(&stage.name),
                        serde_json::json!({"count": batch.len(), "agents": shown}),
                        format!("{} agent(s) set to {}", batch.len(), policy.version),
                    ),
                    now,
                )
                .await?;
                changed = true;
            }
            Step::Bake { until_ms } => {
                row.state = "baking".into();
                row.bake_until = Some(until_ms);
                store::save_stage(conn, &r.id, &row).await?;
                decide(
                    conn,
                    r,
                    dec(
                        "stage-baking",
                        Some(&stage.name),
                        serde_json::json!({"bake_seconds": stage.bake.as_secs()}),
                        format!("every agent of stage {} runs {}; baking", stage.name, policy.version),
                    ),
                    now,
                )
                .await?;
                changed = true;
            }
            Step::Finish => {
                row.state = "done".into();
                row.completed_at = Some(now);
                store::save_stage(conn, &r.id, &row).await?;
                decide(
                    conn,
                    r,
                    dec(
                        "stage-done",
                        Some(&stage.name),
                        serde_json::json!({}),
                        format!("stage {} baked without a breach", stage.name),
                    ),
                    now,
                )
                .await?;
                r.current_stage += 1;
                runtimes.clear();
                if r.current_stage as usize >= policy.stages.len() {
                    r.state = RolloutState::Completed;
                    r.finished_at = Some(now);
                    decide(
                        conn,
                        r,
                        dec("completed", None, serde_json::json!({}), "every stage is done".into()),
                        now,
                    )
                    .await?;
                }
                changed = true;
            }
            Step::ReportTimeout(late) => {
                let shown: Vec<&String> = late.iter().take(20).collect();
                roll_back(
                    conn,
                    r,
                    stages,
                    RollBack {
                        kind: "report-timeout",
                        actor: "controller",
                        stage: Some(stage.name.clone()),
                        trigger: None,
                        query: None,
                        values: serde_json::json!({"late_agents": late.len(), "agents": shown,
                            "report_timeout_seconds": stage.report_timeout.as_secs()}),
                        reason: format!(
                            "{} agent(s) of stage {} did not report {} within {}",
                            late.len(),
                            stage.name,
                            policy.version,
                            nkudo_core::duration::format_duration(stage.report_timeout)
                        ),
                        final_state: RolloutState::RolledBack,
                        mark_bad: true,
                    },
                    now,
                )
                .await?;
                return Ok(true);
            }
        }
    }
    Ok(changed)
}

/// Starts stage `idx`: selects its members, refuses a pre-release for production agents, records the
/// previous version and the baselines at the first stage. False when the rollout stopped.
async fn start_stage(
    state: &SharedState,
    conn: &mut AnyConnection,
    policy: &Policy,
    r: &mut RolloutRow,
    stages: &mut [StageRow],
    idx: usize,
    now: i64,
) -> Result<bool, CycleError> {
    let stage = &policy.stages[idx];
    let fleet = store::fleet(conn).await?;
    let touched: std::collections::HashSet<String> = store::touched_ids(conn, &r.id).await?.into_iter().collect();
    let salt = policy.version.to_string();
    let selected: Vec<&store::FleetAgent> = fleet
        .iter()
        .filter(|a| !touched.contains(&a.id))
        .filter(|a| stage.selector.selects(&salt, &facts(a)))
        .collect();
    if Channel::of(&policy.version) == Channel::PreRelease {
        let prod = selected
            .iter()
            .filter(|a| a.environment.as_deref() == Some(ENVIRONMENT_PRODUCTION))
            .count();
        if prod > 0 {
            roll_back(
                conn,
                r,
                stages,
                RollBack {
                    kind: "prerelease-refused",
                    actor: "controller",
                    stage: Some(stage.name.clone()),
                    trigger: None,
                    query: None,
                    values: serde_json::json!({"production_agents": prod}),
                    reason: format!(
                        "stage {} would put pre-release {} on {prod} production agent(s) (PRERELEASE_IN_PRODUCTION)",
                        stage.name, policy.version
                    ),
                    final_state: RolloutState::Aborted,
                    mark_bad: false,
                },
                now,
            )
            .await?;
            return Ok(false);
        }
    }
    if r.previous_version.is_none() {
        r.previous_version = policy
            .previous_version
            .as_ref()
            .map(|v| v.to_string())
            .or_else(|| most_common(selected.iter().map(|a| a.agent_version.as_str()), &salt));
    }
    let members: Vec<(String, String, u64, String)> = selected
        .iter()
        .map(|a| {
            let prev = policy
                .previous_version
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| a.agent_version.clone());
            (a.id.clone(), a.site_id.clone(), stable_bucket(&salt, &a.id), prev)
        })
        .collect();
    store::add_members(conn, &r.id, idx as i64, &members).await?;
    if state.db.backend == crate::db::Backend::Postgres && members.len() > 1000 {
        // Fresh statistics for the stage just recorded: without them the planner reads a large stage whole
        // instead of walking the (rollout, stage, switched_at, bucket) index (seen: 0.9 s instead of ms per cycle
        // with 100,000 members).
        sqlx::query("ANALYZE rollout_agents").execute(&mut *conn).await?;
    }
    if idx == 0 {
        record_baselines(state, conn, policy, r, now).await;
    }
    let row = &mut stages[idx];
    row.state = "switching".into();
    row.started_at = Some(now);
    store::save_stage(conn, &r.id, row).await?;
    r.state = RolloutState::Running;
    decide(
        conn,
        r,
        dec(
            "stage-started",
            Some(&stage.name),
            serde_json::json!({"agents": members.len()}),
            format!("stage {} started with {} agent(s)", stage.name, members.len()),
        ),
        now,
    )
    .await?;
    Ok(true)
}

/// The pre-rollout level of every `baseline` trigger of the policy.
async fn record_baselines(
    state: &SharedState,
    conn: &mut AnyConnection,
    policy: &Policy,
    r: &mut RolloutRow,
    now: i64,
) {
    let mut baselines: BTreeMap<String, f64> = serde_json::from_str(&r.baseline_json).unwrap_or_default();
    let previous = r.previous_version.clone().unwrap_or_default();
    let new_version = policy.version.to_string();
    for t in policy.stages.iter().flat_map(|s| s.analysis.iter()) {
        if t.compare != Compare::Baseline || baselines.contains_key(&t.name) {
            continue;
        }
        let b = Bindings {
            version: &previous,
            new_version: &new_version,
            previous_version: &previous,
            stage: &policy.stages[0].name,
            window: t.window,
        };
        if let Ok(m) = state.rollout_source.measure(conn, t, &b, now).await {
            // No data before the rollout is a level of 0 (nothing failed).
            baselines.insert(t.name.clone(), m.value.unwrap_or(0.0));
        }
    }
    r.baseline_json = serde_json::to_string(&baselines).unwrap_or_else(|_| "{}".into());
}

fn facts(a: &store::FleetAgent) -> AgentFacts<'_> {
    AgentFacts {
        agent_id: &a.id,
        tenant_id: &a.tenant_id,
        tenant_slug: &a.tenant_slug,
        site_id: &a.site_id,
        site_name: &a.site_name,
        ring: a.ring.as_deref(),
        environment: a.environment.as_deref(),
    }
}

/// The most common value (ties broken by text); the new version itself does not count.
fn most_common<'a>(values: impl Iterator<Item = &'a str>, exclude: &str) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values.filter(|v| *v != exclude) {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(v, _)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_common_skips_the_new_version() {
        let v = ["1.3.0", "1.4.0", "1.3.0", "1.2.0", "1.4.0", "1.4.0"];
        assert_eq!(most_common(v.iter().copied(), "1.4.0").as_deref(), Some("1.3.0"));
        assert_eq!(most_common(std::iter::empty(), "1.4.0"), None);
    }
}
