//! The rollout policy file: parsing and full validation before anything starts. Every error names its line;
//! all errors are reported at once.

use super::select::Selector;
use super::trigger::{self, Bindings, Compare, Metric, NoData, Operator, Trigger, DEFAULT_ANALYSIS};
use crate::duration::parse_duration;
use crate::version::{parse as parse_version, Channel};
use semver::Version;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;
use toml::Spanned;

/// Default bake time of a stage.
pub const DEFAULT_BAKE: Duration = Duration::from_secs(600);
/// Default time a stage's agents have to report the new version.
pub const DEFAULT_REPORT_TIMEOUT: Duration = Duration::from_secs(900);

/// A validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: Option<String>,
    /// The version rolled out.
    pub version: Version,
    /// Where touched agents go back to on a rollback; absent: each agent's version before the rollout.
    pub previous_version: Option<Version>,
    pub stages: Vec<Stage>,
}

/// One stage, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: String,
    pub line: usize,
    pub selector: Selector,
    pub bake: Duration,
    pub manual_gate: bool,
    pub report_timeout: Duration,
    /// At most this many agents of the stage switching at once (absent: no cap).
    pub max_concurrent: Option<u32>,
    /// At most this many agents per site switching at once.
    pub max_concurrent_per_site: Option<u32>,
    pub analysis: Vec<Trigger>,
}

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// 1-based; 0 when the problem has no place (an empty file).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

/// Every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&lines.join("\n"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn as_f64(&self) -> f64 {
        match self {
            Num::Int(i) => *i as f64,
            Num::Float(f) => *f,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    previous_version: Option<Spanned<String>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default, rename = "stage")]
    stages: Vec<Spanned<RawStage>>,
    #[serde(default, rename = "trigger")]
    triggers: Vec<Spanned<RawTrigger>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    bake: Option<Spanned<String>>,
    report_timeout: Option<Spanned<String>>,
    analysis: Option<Spanned<Vec<String>>>,
    max_concurrent: Option<Spanned<i64>>,
    max_concurrent_per_site: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    #[serde(default)]
    rings: Vec<String>,
    environments: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    sites: Vec<String>,
    percent: Option<Spanned<Num>>,
    bake: Option<Spanned<String>>,
    #[serde(default)]
    manual_gate: bool,
    report_timeout: Option<Spanned<String>>,
    max_concurrent: Option<Spanned<i64>>,
    max_concurrent_per_site: Option<Spanned<i64>>,
    analysis: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    name: Spanned<String>,
    metric: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    sample_query: Option<Spanned<String>>,
    compare: Option<Spanned<String>>,
    operator: Option<Spanned<String>>,
    threshold: Option<Spanned<Num>>,
    interval: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    failure_limit: Option<Spanned<i64>>,
    min_samples: Option<Spanned<Num>>,
    on_no_data: Option<Spanned<String>>,
    no_data_limit: Option<Spanned<i64>>,
}

struct Ctx<'a> {
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
    }

    fn err(&mut self, offset: usize, message: impl Into<String>) {
        let line = self.line(offset);
        self.errors.push(PolicyError {
            line,
            message: message.into(),
        });
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, what: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(e) => {
                    self.err(s.span().start, format!("{what}: {e}"));
                    default
                }
            },
        }
    }

    fn count(&mut self, v: &Option<Spanned<i64>>, what: &str, min: i64) -> Option<u32> {
        let s = v.as_ref()?;
        let n = *s.get_ref();
        if n < min || n > u32::MAX as i64 {
            self.err(s.span().start, format!("{what} must be at least {min}, got {n}"));
            return None;
        }
        Some(n as u32)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses and validates a policy file. All problems are returned together, each with its line.
pub fn parse_policy(text: &str) -> Result<Policy, PolicyErrors> {
    let mut cx = Ctx {
        text,
        errors: Vec::new(),
    };
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let line = e.span().map(|s| cx.line(s.start)).unwrap_or(0);
            return Err(PolicyErrors(vec![PolicyError {
                line,
                message: e.message().to_string(),
            }]));
        }
    };

    let version = match parse_version(raw.version.get_ref()) {
        Ok(v) => Some(v),
        Err(e) => {
            cx.err(raw.version.span().start, format!("version: {e}"));
            None
        }
    };
    let previous_version = raw
        .previous_version
        .as_ref()
        .and_then(|p| match parse_version(p.get_ref()) {
            Ok(v) if Some(&v) == version.as_ref() => {
                cx.err(p.span().start, "previous_version is the version being rolled out");
                None
            }
            Ok(v) => Some(v),
            Err(e) => {
                cx.err(p.span().start, format!("previous_version: {e}"));
                None
            }
        });
    let pre_release = version
        .as_ref()
        .map(|v| Channel::of(v) == Channel::PreRelease)
        .unwrap_or(false);

    // Triggers: the built-ins, overridden or extended by the file's.
    let mut triggers: Vec<Trigger> = DEFAULT_ANALYSIS.iter().filter_map(|n| trigger::builtin(n)).collect();
    let mut seen = BTreeSet::new();
    for t in &raw.triggers {
        let line = cx.line(t.span().start);
        let t = t.get_ref();
        let name = t.name.get_ref().clone();
        if !valid_name(&name) {
            cx.err(
                t.name.span().start,
                format!("trigger name {name:?}: use 1-63 letters, digits, '.', '_' or '-'"),
            );
        }
        if !seen.insert(name.clone()) {
            cx.err(t.name.span().start, format!("trigger {name:?} is defined twice"));
            continue;
        }
        if let Some(resolved) = resolve_trigger(&mut cx, t, &name, line) {
            triggers.retain(|x| x.name != name);
            triggers.push(resolved);
        }
    }

    let defaults = raw.defaults.unwrap_or_default();
    let default_bake = cx.duration(&defaults.bake, "defaults.bake", DEFAULT_BAKE);
    let default_report = cx.duration(
        &defaults.report_timeout,
        "defaults.report_timeout",
        DEFAULT_REPORT_TIMEOUT,
    );
    let default_max = cx.count(&defaults.max_concurrent, "defaults.max_concurrent", 1);
    let default_max_site = cx.count(&defaults.max_concurrent_per_site, "defaults.max_concurrent_per_site", 1);
    let default_analysis: Vec<String> = match &defaults.analysis {
        Some(a) => {
            check_analysis(&mut cx, a, &triggers);
            a.get_ref().clone()
        }
        None => DEFAULT_ANALYSIS.iter().map(|s| s.to_string()).collect(),
    };

    if raw.stages.is_empty() {
        cx.errors.push(PolicyError {
            line: 0,
            message: "the policy has no [[stage]]: name at least one".into(),
        });
    }
    let mut stages = Vec::new();
    let mut stage_names = BTreeSet::new();
    for s in &raw.stages {
        let line = cx.line(s.span().start);
        let s = s.get_ref();
        let name = s.name.get_ref().clone();
        if !valid_name(&name) {
            cx.err(
                s.name.span().start,
                format!("stage name {name:?}: use 1-63 letters, digits, '.', '_' or '-'"),
            );
        }
        if !stage_names.insert(name.clone()) {
            cx.err(s.name.span().start, format!("stage {name:?} is named twice"));
        }
        let percent = s.percent.as_ref().and_then(|p| {
            let v = p.get_ref().as_f64();
            if !(v > 0.0 && v <= 100.0) {
                cx.err(
                    p.span().start,
                    format!("percent must be above 0 and at most 100, got {v}"),
                );
                None
            } else {
                Some(v)
            }
        });
        for (list, what) in [(&s.rings, "rings"), (&s.tenants, "tenants"), (&s.sites, "sites")] {
            if list.iter().any(|x| x.trim().is_empty()) {
                cx.err(
                    s.name.span().start,
                    format!("stage {name:?}: {what} has an empty entry"),
                );
            }
        }
        let environments = s.environments.as_ref().map(|e| e.get_ref().clone()).unwrap_or_default();
        let env_at = s.environments.as_ref().map(|e| e.span().start).unwrap_or(0);
        if pre_release && environments.iter().any(|e| e == crate::api::ENVIRONMENT_PRODUCTION) {
            cx.err(
                env_at,
                format!(
                    "stage {name:?} selects environment production, and {} is a pre-release: pre-releases never \
                     reach production (PRERELEASE_IN_PRODUCTION); promote it to a release first",
                    raw.version.get_ref()
                ),
            );
        }
        let bake = cx.duration(&s.bake, "bake", default_bake);
        let report_timeout = cx.duration(&s.report_timeout, "report_timeout", default_report);
        if report_timeout.is_zero() {
            cx.err(
                s.name.span().start,
                format!("stage {name:?}: report_timeout must be above 0"),
            );
        }
        let max_concurrent = cx.count(&s.max_concurrent, "max_concurrent", 1).or(default_max);
        let max_concurrent_per_site = cx
            .count(&s.max_concurrent_per_site, "max_concurrent_per_site", 1)
            .or(default_max_site);
        let names = match &s.analysis {
            Some(a) => {
                check_analysis(&mut cx, a, &triggers);
                a.get_ref().clone()
            }
            None => default_analysis.clone(),
        };
        let analysis = names
            .iter()
            .filter_map(|n| triggers.iter().find(|t| &t.name == n).cloned())
            .collect();
        stages.push(Stage {
            name,
            line,
            selector: Selector {
                rings: s.rings.clone(),
                environments,
                tenants: s.tenants.clone(),
                sites: s.sites.clone(),
                percent,
            },
            bake,
            manual_gate: s.manual_gate,
            report_timeout,
            max_concurrent,
            max_concurrent_per_site,
            analysis,
        });
    }

    match (cx.errors.is_empty(), version) {
        (true, Some(version)) => Ok(Policy {
            name: raw.name,
            version,
            previous_version,
            stages,
        }),
        _ => {
            cx.errors.sort_by_key(|e| e.line);
            Err(PolicyErrors(cx.errors))
        }
    }
}

fn check_analysis(cx: &mut Ctx<'_>, a: &Spanned<Vec<String>>, triggers: &[Trigger]) {
    let mut seen = BTreeSet::new();
    for n in a.get_ref() {
        if !triggers.iter().any(|t| &t.name == n) {
            let known: Vec<&str> = triggers.iter().map(|t| t.name.as_str()).collect();
            cx.err(
                a.span().start,
                format!("analysis names unknown trigger {n:?} (known: {})", known.join(", ")),
            );
        }
        if !seen.insert(n) {
            cx.err(a.span().start, format!("analysis names {n:?} twice"));
        }
    }
}

fn resolve_trigger(cx: &mut Ctx<'_>, t: &RawTrigger, name: &str, line: usize) -> Option<Trigger> {
    let errors_before = cx.errors.len();
    let metric = match &t.metric {
        None => None,
        Some(m) => match serde_json::from_value::<Metric>(serde_json::Value::String(m.get_ref().clone())) {
            Ok(m) => Some(m),
            Err(_) => {
                cx.err(
                    m.span().start,
                    format!(
                        "unknown metric {:?} (plan-failure-rate, enrollment-failure-rate, upgrade-rollbacks, \
                         crash-loops, custom)",
                        m.get_ref()
                    ),
                );
                None
            }
        },
    };
    // Start from the built-in of this name, or of the metric, or a custom one that must bring its query.
    let base = trigger::builtin(name).or_else(|| metric.and_then(|m| trigger::builtin(m.as_str())));
    let mut out = match base {
        Some(b) => Trigger {
            name: name.to_string(),
            line,
            ..b
        },
        None => {
            if t.query.is_none() {
                cx.err(
                    t.name.span().start,
                    format!("trigger {name:?} is not a built-in one: give it a query (PromQL)"),
                );
            }
            Trigger {
                name: name.to_string(),
                metric: Metric::Custom,
                query: String::new(),
                sample_query: None,
                compare: Compare::Threshold,
                operator: Operator::Gt,
                threshold: 0.0,
                interval: Duration::from_secs(30),
                window: Duration::from_secs(300),
                failure_limit: 2,
                min_samples: 0.0,
                no_data: NoData::Inconclusive { limit: 10 },
                line,
            }
        }
    };
    if let Some(m) = metric {
        out.metric = m;
    }
    let bindings = Bindings {
        version: "1.0.0",
        new_version: "1.0.0",
        previous_version: "0.9.0",
        stage: "s",
        window: Duration::from_secs(60),
    };
    for (q, slot) in [(&t.query, 0), (&t.sample_query, 1)] {
        if let Some(q) = q {
            if q.get_ref().trim().is_empty() {
                cx.err(q.span().start, "empty query");
            } else if let Err(e) = trigger::render(q.get_ref(), &bindings) {
                cx.err(q.span().start, e);
            } else if slot == 0 {
                out.query = q.get_ref().clone();
            } else {
                out.sample_query = Some(q.get_ref().clone());
            }
        }
    }
    if let Some(c) = &t.compare {
        match c.get_ref().as_str() {
            "threshold" => out.compare = Compare::Threshold,
            "control" => out.compare = Compare::Control,
            "baseline" => out.compare = Compare::Baseline,
            other => cx.err(
                c.span().start,
                format!("compare {other:?}: use threshold, control or baseline"),
            ),
        }
    }
    if let Some(o) = &t.operator {
        match o.get_ref().as_str() {
            ">" => out.operator = Operator::Gt,
            ">=" => out.operator = Operator::Ge,
            "<" => out.operator = Operator::Lt,
            "<=" => out.operator = Operator::Le,
            other => cx.err(o.span().start, format!("operator {other:?}: use >, >=, < or <=")),
        }
    }
    if let Some(th) = &t.threshold {
        let v = th.get_ref().as_f64();
        if v.is_finite() {
            out.threshold = v;
        } else {
            cx.err(th.span().start, "threshold must be a finite number");
        }
    }
    out.interval = cx.duration(&t.interval, "interval", out.interval);
    if out.interval < Duration::from_secs(1) {
        cx.err(
            t.name.span().start,
            format!("trigger {name:?}: interval must be at least 1s"),
        );
    }
    out.window = cx.duration(&t.window, "window", out.window);
    if out.window < out.interval {
        cx.err(
            t.name.span().start,
            format!("trigger {name:?}: window must be at least the interval"),
        );
    }
    if let Some(n) = cx.count(&t.failure_limit, "failure_limit", 1) {
        out.failure_limit = n;
    }
    if let Some(m) = &t.min_samples {
        let v = m.get_ref().as_f64();
        if v.is_finite() && v >= 0.0 {
            out.min_samples = v;
        } else {
            cx.err(m.span().start, "min_samples must be 0 or more");
        }
    }
    if out.min_samples > 0.0 && out.sample_query.is_none() && out.metric == Metric::Custom {
        cx.err(
            t.name.span().start,
            format!("trigger {name:?}: min_samples needs a sample_query"),
        );
    }
    let limit = match cx.count(&t.no_data_limit, "no_data_limit", 0) {
        Some(n) => n,
        None => match out.no_data {
            NoData::Inconclusive { limit } => limit,
            NoData::Breach => 0,
        },
    };
    match t.on_no_data.as_ref().map(|s| (s.span().start, s.get_ref().as_str())) {
        None => {
            if t.no_data_limit.is_some() {
                out.no_data = NoData::Inconclusive { limit };
            }
        }
        Some((_, "inconclusive")) => out.no_data = NoData::Inconclusive { limit },
        Some((_, "breach")) => out.no_data = NoData::Breach,
        Some((at, other)) => cx.err(
            at,
            format!("on_no_data {other:?}: use inconclusive (a breach after no_data_limit) or breach; no data is never a pass"),
        ),
    }
    (cx.errors.len() == errors_before).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = "1.4.0"
name = "1.4.0 to everyone"

[defaults]
bake = "10m"

[[stage]]
name = "lab"
rings = ["lab"]
bake = "2m"

[[stage]]
name = "pilot"
rings = ["pilot"]
max_concurrent_per_site = 2

[[stage]]
name = "stable-10"
rings = ["stable"]
percent = 10
manual_gate = true
analysis = ["plan-failure-rate", "heartbeat-p95"]

[[trigger]]
name = "heartbeat-p95"
query = 'histogram_quantile(0.95, sum(rate(nkudo_heartbeat_ingest_seconds_bucket[{window}])) by (le))'
threshold = 0.5
interval = "15s"
"#;

    #[test]
    fn a_good_policy_gets_the_defaults() {
        let p = parse_policy(GOOD).unwrap();
        assert_eq!(p.version.to_string(), "1.4.0");
        assert_eq!(p.stages.len(), 3);
        let lab = &p.stages[0];
        assert_eq!(lab.bake, Duration::from_secs(120));
        assert_eq!(lab.report_timeout, DEFAULT_REPORT_TIMEOUT);
        assert_eq!(
            lab.analysis.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            DEFAULT_ANALYSIS
        );
        assert_eq!(p.stages[1].bake, Duration::from_secs(600));
        assert_eq!(p.stages[1].max_concurrent_per_site, Some(2));
        let s3 = &p.stages[2];
        assert!(s3.manual_gate);
        assert_eq!(s3.selector.percent, Some(10.0));
        assert_eq!(s3.analysis[1].metric, Metric::Custom);
        assert_eq!(s3.analysis[1].interval, Duration::from_secs(15));
        assert_eq!(s3.analysis[1].line, 25);
        let pfr = &s3.analysis[0];
        assert_eq!((pfr.compare, pfr.threshold), (Compare::Control, 0.05));
    }

    #[test]
    fn every_error_names_its_line() {
        let bad = r#"version = "1.4.0-pre.2+abc1234"

[[stage]]
name = "lab"
percent = 150
bake = "ten minutes"

[[stage]]
name = "lab"
environments = ["production"]
analysis = ["nope"]

[[trigger]]
name = "mine"
threshold = 1
operator = "=="
on_no_data = "pass"
"#;
        let errs = parse_policy(bad).unwrap_err().0;
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let has = |line: usize, needle: &str| {
            assert!(
                errs.iter().any(|e| e.line == line && e.message.contains(needle)),
                "no error at line {line} containing {needle:?} in {text:#?}"
            )
        };
        has(5, "percent must be above 0");
        has(6, "bake");
        has(9, "named twice");
        has(10, "pre-release");
        has(11, "unknown trigger \"nope\"");
        has(14, "give it a query");
        has(16, "operator \"==\"");
        has(17, "no data is never a pass");
    }

    #[test]
    fn syntax_and_unknown_keys_are_errors_with_lines() {
        let errs = parse_policy("version = \"1.0.0\"\n[[stage]]\nname = \"a\"\nringz = [\"lab\"]\n").unwrap_err();
        assert_eq!(errs.0[0].line, 4, "{errs}");
        assert!(errs.0[0].message.contains("ringz"), "{errs}");
        let errs = parse_policy("version = \n").unwrap_err();
        assert_eq!(errs.0[0].line, 1);
        let errs = parse_policy("version = \"1.0.0\"\n").unwrap_err();
        assert!(errs.to_string().contains("no [[stage]]"));
        let errs = parse_policy("version = \"1.0\"\n[[stage]]\nname = \"a\"\n").unwrap_err();
        assert_eq!(errs.0[0].line, 1);
    }

    #[test]
    fn a_user_trigger_overrides_a_builtin_of_the_same_name() {
        let p = parse_policy(
            "version = \"1.0.0\"\n[[stage]]\nname = \"a\"\n[[trigger]]\nname = \"plan-failure-rate\"\nthreshold = 0.1\nfailure_limit = 3\n",
        )
        .unwrap();
        let t = &p.stages[0].analysis[0];
        assert_eq!(
            (t.name.as_str(), t.threshold, t.failure_limit),
            ("plan-failure-rate", 0.1, 3)
        );
        assert_eq!(t.compare, Compare::Control);
        assert!(t.query.contains("nkudo_plan_executions_total"));
    }
}
