//! Analysis triggers: what a rollout measures while a stage bakes, and when it rolls back.
//!
//! A trigger is a PromQL template (evaluated against Prometheus, Thanos, Mimir or VictoriaMetrics over the
//! standard HTTP API) naming one of the [`Metric`]s the control plane also computes itself, so that with no
//! Prometheus configured the controller decides the same way from its own statistics. A [`Metric::Custom`]
//! trigger has only its query and needs Prometheus.
//!
//! Placeholders in queries: `{version}` (the cohort being measured: the new version, or the previous one for
//! the control group and the baseline), `{new_version}`, `{previous_version}`, `{stage}`, `{window}` (the
//! trigger's window as a PromQL duration).
//!
//! Comparisons ([`Compare`]): `threshold` compares the cohort's value with the threshold; `control` compares
//! the cohort's value minus the control group's (agents still on the previous version, measured at the same
//! time) with it; `baseline` compares the value minus the value measured before the rollout started.
//!
//! No data is never a pass: an evaluation without a value, or with fewer samples than `min_samples`, is
//! inconclusive; after `no_data_limit` consecutive inconclusive evaluations each further one counts as a
//! breach (or at once with `on_no_data = "breach"`). `failure_limit` consecutive breaches fire the trigger.

use std::time::Duration;

/// What a trigger measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Failed plan executions / all executions of agents on `{version}` over the window.
    PlanFailureRate,
    /// Failed enrollments / all enrollments over the window (fleet-wide).
    EnrollmentFailureRate,
    /// Agents whose self-update to the new version was rolled back by the crash-loop guard, or failed.
    UpgradeRollbacks,
    /// Process restarts of agents on the new version over the window.
    CrashLoops,
    /// Only the query (needs Prometheus).
    Custom,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::PlanFailureRate => "plan-failure-rate",
            Metric::EnrollmentFailureRate => "enrollment-failure-rate",
            Metric::UpgradeRollbacks => "upgrade-rollbacks",
            Metric::CrashLoops => "crash-loops",
            Metric::Custom => "custom",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    Threshold,
    Control,
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Operator {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Lt => "<",
            Operator::Le => "<=",
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Operator::Gt => value > threshold,
            Operator::Ge => value >= threshold,
            Operator::Lt => value < threshold,
            Operator::Le => value <= threshold,
        }
    }
}

/// What to do when an evaluation has no data (or too few samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoData {
    /// Inconclusive; after this many consecutive inconclusive evaluations each further one counts as a breach.
    Inconclusive { limit: u32 },
    /// Counts as a breach at once.
    Breach,
}

/// One trigger, resolved (defaults applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub name: String,
    pub metric: Metric,
    /// PromQL template.
    pub query: String,
    /// PromQL template giving the sample size of `{version}` over the window (absent: no minimum applies).
    pub sample_query: Option<String>,
    pub compare: Compare,
    pub operator: Operator,
    pub threshold: f64,
    pub interval: Duration,
    pub window: Duration,
    pub failure_limit: u32,
    pub min_samples: f64,
    pub no_data: NoData,
    /// Line of its definition in the policy file (0 for a built-in).
    pub line: usize,
}

/// The names of the built-in triggers, applied to every stage unless the policy names its own list.
pub const DEFAULT_ANALYSIS: &[&str] = &[
    "plan-failure-rate",
    "enrollment-failure-rate",
    "upgrade-rollbacks",
    "crash-loops",
];

const PLAN_EXECUTIONS: &str = "nkudo_plan_executions_total";

/// The built-in triggers: our rollback rules (plan failure rate of upgraded agents more than 5 points above
/// that of agents on the previous version; enrollment failure rate more than 2 points above its pre-rollout
/// level; any agent rolled back by its guard or failing its update; any agent of the new version restarting
/// more than twice in the window).
pub fn builtin(name: &str) -> Option<Trigger> {
    let base = |metric: Metric, query: String, compare: Compare, threshold: f64| Trigger {
        name: name.to_string(),
        metric,
        query,
        sample_query: None,
        compare,
        operator: Operator::Gt,
        threshold,
        interval: Duration::from_secs(30),
        window: Duration::from_secs(300),
        failure_limit: 2,
        min_samples: 0.0,
        no_data: NoData::Inconclusive { limit: 10 },
        line: 0,
    };
    match name {
        "plan-failure-rate" => Some(Trigger {
            sample_query: Some(format!("sum(increase({PLAN_EXECUTIONS}{{agent_version=\"{{version}}\"}}[{{window}}]))")),
            min_samples: 10.0,
            ..base(
                Metric::PlanFailureRate,
                format!(
                    "sum(increase({PLAN_EXECUTIONS}{{agent_version=\"{{version}}\",result=\"failed\"}}[{{window}}])) \
                     / sum(increase({PLAN_EXECUTIONS}{{agent_version=\"{{version}}\"}}[{{window}}]))"
                ),
                Compare::Control,
                0.05,
            )
        }),
        "enrollment-failure-rate" => Some(Trigger {
            sample_query: Some("sum(increase(nkudo_enrollments_total[{window}]))".into()),
            min_samples: 5.0,
            ..base(
                Metric::EnrollmentFailureRate,
                "sum(increase(nkudo_enrollments_total{result!=\"success\"}[{window}])) \
                 / sum(increase(nkudo_enrollments_total[{window}]))"
                    .into(),
                Compare::Baseline,
                0.02,
            )
        }),
        "upgrade-rollbacks" => Some(Trigger {
            failure_limit: 1,
            ..base(
                Metric::UpgradeRollbacks,
                "sum(increase(nkudo_agent_upgrades_total{to=\"{new_version}\",result=~\"rolled-back|failed\"}[{window}])) \
                 or vector(0)"
                    .into(),
                Compare::Threshold,
                0.0,
            )
        }),
        "crash-loops" => Some(Trigger {
            failure_limit: 1,
            ..base(
                Metric::CrashLoops,
                "max(increase(nkudo_agent_restarts_total{version=\"{new_version}\"}[{window}])) or vector(0)".into(),
                Compare::Threshold,
                2.0,
            )
        }),
        _ => None,
    }
}

/// The placeholders a query may use.
pub const PLACEHOLDERS: &[&str] = &["version", "new_version", "previous_version", "stage", "window"];

/// Values for the placeholders.
#[derive(Debug, Clone)]
pub struct Bindings<'a> {
    pub version: &'a str,
    pub new_version: &'a str,
    pub previous_version: &'a str,
    pub stage: &'a str,
    pub window: Duration,
}

/// Substitutes the placeholders (`{{` and `}}` stand for literal braces, as PromQL label matchers need them).
pub fn render(template: &str, b: &Bindings<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
            continue;
        }
        if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
            continue;
        }
        if let Some(t) = tail.strip_prefix('}') {
            // A lone `}` closes a PromQL matcher.
            out.push('}');
            rest = t;
            continue;
        }
        // `{name}` with a known name is a placeholder; any other `{` opens a PromQL matcher.
        let end = tail.find('}');
        let name = end.map(|e| &tail[1..e]);
        match name {
            Some(n) if PLACEHOLDERS.contains(&n) => {
                out.push_str(&match n {
                    "version" => b.version.to_string(),
                    "new_version" => b.new_version.to_string(),
                    "previous_version" => b.previous_version.to_string(),
                    "stage" => b.stage.to_string(),
                    _ => crate::duration::format_duration(b.window),
                });
                rest = &tail[end.unwrap_or(0) + 1..];
            }
            Some(n)
                if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !n.contains('=') =>
            {
                return Err(format!(
                    "unknown placeholder {{{n}}} (known: {})",
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            _ => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// What one evaluation saw.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Observation {
    /// The cohort's value (`None`: no data).
    pub value: Option<f64>,
    /// The control group's value (compare = control) or the baseline (compare = baseline).
    pub reference: Option<f64>,
    /// The cohort's sample size, when the trigger has a sample query.
    pub samples: Option<f64>,
}

/// The verdict of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    Pass { compared: f64 },
    Breach { compared: f64 },
    Inconclusive { reason: String },
}

impl Trigger {
    /// Judges one observation (no history).
    pub fn judge(&self, o: &Observation) -> Verdict {
        let Some(value) = o.value.filter(|v| v.is_finite()) else {
            return Verdict::Inconclusive {
                reason: "no data".into(),
            };
        };
        if self.sample_query.is_some() || self.min_samples > 0.0 {
            match o.samples {
                Some(n) if n >= self.min_samples => {}
                Some(n) => {
                    return Verdict::Inconclusive {
                        reason: format!("{n} samples, fewer than {}", self.min_samples),
                    }
                }
                None if self.min_samples > 0.0 => {
                    return Verdict::Inconclusive {
                        reason: "no sample count".into(),
                    }
                }
                None => {}
            }
        }
        let compared = match self.compare {
            Compare::Threshold => value,
            Compare::Control | Compare::Baseline => match o.reference.filter(|v| v.is_finite()) {
                Some(r) => value - r,
                None => {
                    // No control group (every agent upgraded) or no baseline: the cohort alone decides.
                    value
                }
            },
        };
        if self.operator.holds(compared, self.threshold) {
            Verdict::Breach { compared }
        } else {
            Verdict::Pass { compared }
        }
    }
}

/// A trigger's running state across evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TriggerState {
    pub consecutive_breaches: u32,
    pub consecutive_inconclusive: u32,
}

/// What the controller does after an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep going.
    Continue,
    /// The trigger fired: roll back.
    Fire,
}

impl TriggerState {
    /// Records a verdict; says whether the trigger fires.
    pub fn record(&mut self, t: &Trigger, v: &Verdict) -> Decision {
        let breach = match v {
            Verdict::Pass { .. } => {
                self.consecutive_breaches = 0;
                self.consecutive_inconclusive = 0;
                false
            }
            Verdict::Breach { .. } => {
                self.consecutive_inconclusive = 0;
                true
            }
            Verdict::Inconclusive { .. } => {
                self.consecutive_inconclusive += 1;
                match t.no_data {
                    NoData::Breach => true,
                    NoData::Inconclusive { limit } => self.consecutive_inconclusive > limit,
                }
            }
        };
        if breach {
            self.consecutive_breaches += 1;
        }
        if self.consecutive_breaches >= t.failure_limit.max(1) {
            Decision::Fire
        } else {
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Bindings<'static> {
        Bindings {
            version: "1.4.0",
            new_version: "1.4.0",
            previous_version: "1.3.2",
            stage: "lab",
            window: Duration::from_secs(300),
        }
    }

    #[test]
    fn renders_placeholders_and_keeps_matchers() {
        let t = builtin("plan-failure-rate").unwrap();
        let q = render(&t.query, &b()).unwrap();
        assert_eq!(
            q,
            "sum(increase(nkudo_plan_executions_total{agent_version=\"1.4.0\",result=\"failed\"}[5m])) \
             / sum(increase(nkudo_plan_executions_total{agent_version=\"1.4.0\"}[5m]))"
        );
        assert_eq!(render("up{job=\"x\"} {{lit}}", &b()).unwrap(), "up{job=\"x\"} {lit}");
        assert!(render("x{nope}", &b())
            .unwrap_err()
            .contains("unknown placeholder {nope}"));
        assert_eq!(render("{previous_version}-{stage}", &b()).unwrap(), "1.3.2-lab");
    }

    #[test]
    fn control_comparison_and_consecutive_breaches() {
        let t = builtin("plan-failure-rate").unwrap();
        let mut st = TriggerState::default();
        let obs = |v, r, n| Observation {
            value: Some(v),
            reference: Some(r),
            samples: Some(n),
        };
        // 4 points above the control group: a pass.
        assert!(matches!(t.judge(&obs(0.06, 0.02, 50.0)), Verdict::Pass { .. }));
        // 10 points above: a breach; two in a row fire.
        let v = t.judge(&obs(0.12, 0.02, 50.0));
        assert!(matches!(v, Verdict::Breach { compared } if (compared - 0.10).abs() < 1e-9));
        assert_eq!(st.record(&t, &v), Decision::Continue);
        assert_eq!(st.record(&t, &v), Decision::Fire);
        // A pass resets.
        let mut st = TriggerState::default();
        st.record(&t, &v);
        st.record(&t, &t.judge(&obs(0.02, 0.02, 50.0)));
        assert_eq!(st.record(&t, &v), Decision::Continue);
        // Too few samples is inconclusive, not a pass.
        assert!(matches!(t.judge(&obs(0.9, 0.0, 3.0)), Verdict::Inconclusive { .. }));
    }

    #[test]
    fn no_data_is_never_a_pass() {
        let t = Trigger {
            no_data: NoData::Inconclusive { limit: 2 },
            failure_limit: 1,
            ..builtin("upgrade-rollbacks").unwrap()
        };
        let mut st = TriggerState::default();
        let none = t.judge(&Observation::default());
        assert_eq!(st.record(&t, &none), Decision::Continue);
        assert_eq!(st.record(&t, &none), Decision::Continue);
        assert_eq!(st.record(&t, &none), Decision::Fire);
        let strict = Trigger {
            no_data: NoData::Breach,
            ..t.clone()
        };
        assert_eq!(TriggerState::default().record(&strict, &none), Decision::Fire);
        // One rolled-back agent fires the rollback trigger at once.
        let one = t.judge(&Observation {
            value: Some(1.0),
            ..Default::default()
        });
        assert_eq!(TriggerState::default().record(&t, &one), Decision::Fire);
    }
}
