//! Ring and wave rollouts (ARCHITECTURE §4.6): the controller that advances them stage by stage, the metrics
//! sources its triggers read, the tables it keeps, and the views the admin routes answer with. The policy format
//! and the pure decision rules are `nkudo_core::rollout`.

pub mod controller;
pub mod lease;
pub mod plan;
pub mod source;
pub mod store;

use crate::util::{rfc3339, rfc3339_opt};
use nkudo_core::api::{Rollout, RolloutStageStatus, TriggerStatus};
use nkudo_core::rollout::parse_policy;
use prometheus::{HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use sqlx::{AnyConnection, Row};
use std::collections::BTreeMap;
use store::RolloutRow;

/// The rollout metrics (`nkudo_rollout_*`).
pub struct RolloutMetrics {
    /// Index of the stage in progress per rollout (-1 once final).
    pub stage: IntGaugeVec,
    /// 1 for the rollout's current state.
    pub state: IntGaugeVec,
    pub decisions: IntCounterVec,
    pub evaluations: IntCounterVec,
    pub cycle_seconds: prometheus::Histogram,
}

impl RolloutMetrics {
    pub fn register(registry: &Registry) -> RolloutMetrics {
        let stage = IntGaugeVec::new(
            Opts::new(
                "nkudo_rollout_stage",
                "Index of the stage in progress per rollout (-1 when final)",
            ),
            &["rollout", "version", "stage"],
        )
        .expect("metric");
        let state = IntGaugeVec::new(
            Opts::new("nkudo_rollout_state", "1 for each rollout's current state"),
            &["rollout", "version", "state"],
        )
        .expect("metric");
        let decisions = IntCounterVec::new(
            Opts::new("nkudo_rollout_decisions_total", "Rollout controller decisions by kind"),
            &["kind"],
        )
        .expect("metric");
        let evaluations = IntCounterVec::new(
            Opts::new(
                "nkudo_rollout_trigger_evaluations_total",
                "Trigger evaluations by trigger and verdict",
            ),
            &["trigger", "verdict"],
        )
        .expect("metric");
        let cycle = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "nkudo_rollout_cycle_seconds",
                "Duration of one rollout controller cycle",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("metric");
        for c in [
            Box::new(stage.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(state.clone()),
            Box::new(decisions.clone()),
            Box::new(evaluations.clone()),
            Box::new(cycle.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        RolloutMetrics {
            stage,
            state,
            decisions,
            evaluations,
            cycle_seconds: cycle,
        }
    }
}

/// Sets the gauges of one rollout after a change.
pub fn publish_metrics(m: &RolloutMetrics, r: &RolloutRow) {
    let policy = parse_policy(&r.policy_text).ok();
    let stage_name = policy
        .as_ref()
        .and_then(|p| p.stages.get(r.current_stage.max(0) as usize).map(|s| s.name.clone()))
        .unwrap_or_default();
    // One series per rollout: the stages it has left (and the unnamed placeholder) are removed, so a dashboard
    // or a query on `nkudo_rollout_stage` never sees a rollout in two stages at once.
    let names = policy.iter().flat_map(|p| p.stages.iter().map(|s| s.name.as_str()));
    for old in std::iter::once("").chain(names) {
        if old != stage_name {
            let _ = m.stage.remove_label_values(&[r.id.as_str(), r.version.as_str(), old]);
        }
    }
    m.stage
        .with_label_values(&[r.id.as_str(), r.version.as_str(), stage_name.as_str()])
        .set(if r.state.is_final() { -1 } else { r.current_stage });
    for s in [
        nkudo_core::api::RolloutState::Running,
        nkudo_core::api::RolloutState::Paused,
        nkudo_core::api::RolloutState::WaitingApproval,
        nkudo_core::api::RolloutState::Completed,
        nkudo_core::api::RolloutState::RolledBack,
        nkudo_core::api::RolloutState::Aborted,
    ] {
        m.state
            .with_label_values(&[r.id.as_str(), r.version.as_str(), s.as_str()])
            .set((s == r.state) as i64);
    }
}

/// Counts decisions in `nkudo_rollout_decisions_total`; call it after the transaction that recorded them has
/// committed (a rolled-back cycle or a refused operator action records nothing and counts nothing).
pub fn count_decisions(m: &RolloutMetrics, kinds: &[String]) {
    for kind in kinds {
        m.decisions.with_label_values(&[kind.as_str()]).inc();
    }
}

/// Members, switched, on the new version, per version, per phase.
type StageCounts = (i64, i64, i64, BTreeMap<String, i64>, BTreeMap<String, i64>);

/// The full view of a rollout, with its latest `decisions` decisions.
pub async fn view(conn: &mut AnyConnection, r: &RolloutRow, decisions: i64) -> Result<Rollout, sqlx::Error> {
    let policy = parse_policy(&r.policy_text).ok();
    let stages = store::stages(conn, &r.id).await?;
    let runtimes: controller::Runtimes = serde_json::from_str(&r.triggers_json).unwrap_or_default();
    let rows = sqlx::query(
        "SELECT ra.stage_idx, COALESCE(a.agent_version, ''), a.update_json, ra.switched_at FROM rollout_agents ra \
         LEFT JOIN agents a ON a.id = ra.agent_id WHERE ra.rollout_id = $1",
    )
    .bind(&r.id)
    .fetch_all(&mut *conn)
    .await?;
    let mut per_stage: BTreeMap<i64, StageCounts> = BTreeMap::new();
    let target = nkudo_core::version::parse(&r.version).ok();
    for row in rows {
        let idx: i64 = row.try_get(0)?;
        let version: String = row.try_get(1)?;
        let update: Option<String> = row.try_get(2)?;
        let switched: Option<i64> = row.try_get(3)?;
        let phase = update
            .and_then(|u| serde_json::from_str::<nkudo_core::api::UpdateStatus>(&u).ok())
            .map(|u| u.phase)
            .unwrap_or_default();
        let e = per_stage.entry(idx).or_default();
        e.0 += 1;
        if switched.is_some() {
            e.1 += 1;
        }
        let on = match (&target, nkudo_core::version::parse(&version).ok()) {
            (Some(t), Some(v)) => nkudo_core::rollout::machine::on_version(Some(&v), t),
            _ => false,
        };
        if on {
            e.2 += 1;
        }
        *e.3.entry(version).or_default() += 1;
        *e.4.entry(phase.as_str().to_string()).or_default() += 1;
    }
    let mut out_stages = Vec::new();
    for s in &stages {
        let pstage = policy.as_ref().and_then(|p| p.stages.get(s.idx as usize));
        let (agents, switched, on_new, versions, phases) = per_stage.remove(&s.idx).unwrap_or_default();
        let current = s.idx == r.current_stage;
        let triggers = pstage
            .map(|ps| {
                ps.analysis
                    .iter()
                    .map(|t| {
                        let rt = if current { runtimes.get(&t.name) } else { None };
                        TriggerStatus {
                            name: t.name.clone(),
                            metric: t.metric.as_str().to_string(),
                            compare: format!("{:?}", t.compare).to_lowercase(),
                            operator: t.operator.as_str().to_string(),
                            threshold: t.threshold,
                            value: rt.and_then(|x| x.observation.value),
                            reference: rt.and_then(|x| x.observation.reference),
                            samples: rt.and_then(|x| x.observation.samples),
                            verdict: rt.and_then(|x| x.verdict.clone()),
                            consecutive_breaches: rt.map(|x| x.state.consecutive_breaches).unwrap_or(0),
                            evaluated_at: rt.and_then(|x| x.last_eval_ms).map(rfc3339),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        out_stages.push(RolloutStageStatus {
            index: s.idx as u32,
            name: s.name.clone(),
            state: s.state.clone(),
            agents,
            switched,
            on_new_version: on_new,
            versions,
            phases,
            started_at: rfc3339_opt(s.started_at),
            bake_until: rfc3339_opt(s.bake_until),
            completed_at: rfc3339_opt(s.completed_at),
            manual_gate: pstage.map(|p| p.manual_gate).unwrap_or(false),
            triggers,
        });
    }
    let (decisions, _) = store::decisions(conn, &r.id, Some(decisions)).await?;
    Ok(Rollout {
        id: r.id.clone(),
        name: r.name.clone(),
        version: r.version.clone(),
        previous_version: r.previous_version.clone(),
        state: r.state,
        current_stage: (!r.state.is_final()).then_some(r.current_stage.max(0) as u32),
        metrics_source: r.metrics_source.clone(),
        created_at: rfc3339(r.created_at),
        updated_at: rfc3339(r.updated_at),
        stages: out_stages,
        decisions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkudo_core::api::RolloutState;

    fn row(stage: i64, state: RolloutState) -> store::RolloutRow {
        store::RolloutRow {
            id: "r1".into(),
            name: None,
            version: "1.2.0".into(),
            previous_version: Some("1.1.0".into()),
            policy_text: "version = \"1.2.0\"\n\n[[stage]]\nname = \"lab\"\nrings = [\"lab\"]\n\n[[stage]]\nname = \"pilot\"\nrings = [\"pilot\"]\n"
                .into(),
            state,
            current_stage: stage,
            approved_stage: 0,
            triggers_json: "{}".into(),
            baseline_json: "{}".into(),
            metrics_source: "builtin".into(),
            created_at: 0,
            updated_at: 0,
            finished_at: None,
        }
    }

    /// The stage series of a rollout (`stage` label values present in the registry).
    fn stage_series(registry: &Registry) -> Vec<(String, i64)> {
        registry
            .gather()
            .into_iter()
            .filter(|f| f.name() == "nkudo_rollout_stage")
            .flat_map(|f| f.get_metric().to_vec())
            .map(|m| {
                let stage = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "stage")
                    .map(|l| l.value().to_string());
                (stage.unwrap_or_default(), m.get_gauge().get_value() as i64)
            })
            .collect()
    }

    /// Regression: a rollout that moved from `lab` to `pilot` kept a `stage="lab"` series next to the new one.
    #[test]
    fn a_rollout_has_one_stage_series() {
        let registry = Registry::new();
        let m = RolloutMetrics::register(&registry);
        publish_metrics(&m, &row(0, RolloutState::Running));
        assert_eq!(stage_series(&registry), vec![("lab".to_string(), 0)]);
        publish_metrics(&m, &row(1, RolloutState::Running));
        assert_eq!(stage_series(&registry), vec![("pilot".to_string(), 1)]);
        publish_metrics(&m, &row(1, RolloutState::Completed));
        assert_eq!(stage_series(&registry), vec![("pilot".to_string(), -1)]);
    }
}
