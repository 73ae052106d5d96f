//! The alerting surface in `deployments/prometheus/` checked with the stock tool and against the code (issue 8,
//! "Alerts"):
//!
//! * `promtool check config` passes on `prometheus.yml`, whose `rule_files` (resolved relative to the file, as
//!   Prometheus and promtool do) load the alert and recording rules; the control-plane job scrapes over verified
//!   TLS (the CA bundle, no skip-verify) on the port of `deployments/config/control-plane.env`.
//! * `promtool check rules` passes on every rule file and `promtool test rules` on every unit-test file; every
//!   alert has a unit test that fires it and one where it stays quiet.
//! * Every alert of the on-call contract (`nkudo_tests::oncall`) exists with a severity,
//!   a summary, a description and a `runbook_url` of the contract's form, whose page exists under `runbooks/`.
//! * Every metric the rules, the Grafana dashboards (`expr`) and the Kubernetes analysis templates (`query`) read
//!   is exported by the control plane: its name is a string literal in `control-plane/src/**/*.rs` (histograms
//!   by their base name), or a recording rule of ours, or one Prometheus makes itself (`up`, `scrape_*`, `ALERTS`).
//!
//! * End to end: Prometheus (Debian's `/usr/bin/prometheus`) runs `prometheus.yml` as deployed (only the target,
//!   the CA bundle's path and the intervals are replaced) against a real control plane whose certificate names
//!   `control-plane`: the target is up over verified TLS, every rule loads and evaluates without error on the
//!   real series, the recording rules see the enrolled agent and its site, and stopping the control plane makes
//!   NkudoControlPlaneDown pending.
//!
//! Tools: `promtool` and `prometheus` (Debian's prometheus package; `NKUDO_PROMTOOL` overrides promtool's path).
//! Missing with CI=true the tests that need them fail; otherwise they print `SKIPPED: <tool> missing` and return.

use nkudo_tests::{
    bootstrap, current_test_name, enroll_agent, expect_json, free_port, in_ci, legacy_heartbeat_body, poll_until,
    Backend, ControlPlane, TempDir,
};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nkudo_tests::oncall::{CONTRACT_ALERTS as CONTRACT, RUNBOOK_URL_PREFIX};

/// The scrape job of the control plane.
const JOB: &str = "nkudo-control-plane";

/// Series Prometheus makes itself (per target, and for alert state).
const BUILTIN_SERIES: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn prom_dir() -> PathBuf {
    root().join("deployments/prometheus")
}

/// The `*.yml`/`*.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every file under `dir` (recursively) whose name ends with one of `suffixes`; none when `dir` does not exist.
fn files_under(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| suffixes.iter().any(|s| n.ends_with(s)))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rule_files() -> Vec<PathBuf> {
    yaml_files(&prom_dir().join("rules"))
}

fn test_files() -> Vec<PathBuf> {
    yaml_files(&prom_dir().join("tests"))
}

fn load_yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Every rule of every rule file, with the file it is in.
fn rules() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for file in rule_files() {
        let doc = load_yaml(&file);
        let groups = doc
            .get("groups")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{}: no `groups`", file.display()));
        for group in groups {
            for rule in group.get("rules").and_then(Value::as_sequence).into_iter().flatten() {
                out.push((file.clone(), rule.clone()));
            }
        }
    }
    out
}

fn alerts() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (file, rule) in rules() {
        if let Some(name) = str_of(&rule, "alert") {
            assert!(
                out.insert(name.to_string(), rule.clone()).is_none(),
                "{}: alert {name} is defined twice",
                file.display()
            );
        }
    }
    out
}

fn recording_rule_names() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|(_, r)| str_of(r, "record").map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// promtool

/// Prints `SKIPPED: <tool> missing` straight to stderr (past libtest's capture, so it is seen).
fn skip(tool: &str, why: &str) {
    let line = format!("\n*** SKIPPED: {tool} missing ({why}): {} ***\n", current_test_name());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// The promtool to run, or `None` (after printing the skip) when it is missing outside CI. Panics in CI.
fn promtool() -> Option<PathBuf> {
    let bin = std::env::var_os("NKUDO_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("promtool"));
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => Some(bin),
        result => {
            let why = match result {
                Ok(out) => format!("`{} --version` exited {}", bin.display(), out.status),
                Err(e) => format!("`{}`: {e}", bin.display()),
            };
            if in_ci() {
                panic!("promtool missing ({why}); CI must install Debian's prometheus package");
            }
            skip("promtool", &why);
            None
        }
    }
}

/// Runs promtool with `args` from the repository root and asserts success, showing its output otherwise.
fn run_promtool(bin: &Path, args: &[&str], files: &[PathBuf]) -> String {
    let root = root();
    let rel: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
        .collect();
    let out = Command::new(bin)
        .args(args)
        .args(&rel)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {} {}` failed ({}):\n{text}",
        args.join(" "),
        rel.join(" "),
        out.status
    );
    text
}

#[test]
fn promtool_check_config_passes_and_loads_every_rule_file() {
    let Some(bin) = promtool() else { return };
    let out = run_promtool(&bin, &["check", "config"], &[prom_dir().join("prometheus.yml")]);
    // promtool accepts a rule_files glob that matches nothing; the configuration must load our rule files.
    let expected = format!("SUCCESS: {} rule files found", rule_files().len());
    assert!(out.contains(&expected), "expected `{expected}` in:\n{out}");
    for file in rule_files() {
        let name = file.file_name().and_then(|n| n.to_str()).expect("file name");
        assert!(out.contains(name), "prometheus.yml does not load {name}:\n{out}");
    }
}

#[test]
fn promtool_check_rules_passes() {
    let Some(bin) = promtool() else { return };
    let files = rule_files();
    assert!(
        files.len() >= 2,
        "expected the alert and the recording rules: {files:?}"
    );
    run_promtool(&bin, &["check", "rules"], &files);
}

#[test]
fn promtool_rule_unit_tests_pass() {
    let Some(bin) = promtool() else { return };
    let files = test_files();
    assert!(!files.is_empty(), "no unit tests under deployments/prometheus/tests/");
    let out = run_promtool(&bin, &["test", "rules"], &files);
    assert!(!out.contains("FAILED"), "{out}");
}

// ---------------------------------------------------------------------------------------------------------------
// The scrape configuration

#[test]
fn scrape_config_reads_the_control_plane_over_verified_tls() {
    let config = load_yaml(&prom_dir().join("prometheus.yml"));
    let jobs = config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| str_of(j, "job_name") == Some(JOB))
        .unwrap_or_else(|| panic!("no scrape job {JOB}"));
    assert_eq!(
        str_of(job, "scheme"),
        Some("https"),
        "the control plane serves TLS only"
    );
    assert_eq!(str_of(job, "metrics_path").unwrap_or("/metrics"), "/metrics");
    let tls = job.get("tls_config").expect("tls_config");
    assert!(
        str_of(tls, "ca_file").is_some_and(|f| f.ends_with("ca-bundle.pem")),
        "tls_config.ca_file must be the control plane's CA bundle: {tls:?}"
    );
    assert_ne!(
        tls.get("insecure_skip_verify").and_then(Value::as_bool),
        Some(true),
        "the server certificate must be verified"
    );

    // The target's port is the one the control plane listens on.
    let env = fs::read_to_string(root().join("deployments/config/control-plane.env")).expect("control-plane.env");
    let addr = env
        .lines()
        .find_map(|l| l.trim().strip_prefix("CONTROL_PLANE_ADDR="))
        .expect("CONTROL_PLANE_ADDR in control-plane.env");
    let port = addr.rsplit(':').next().expect("port");
    let targets: Vec<&str> = job
        .get("static_configs")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .flat_map(|sc| sc.get("targets").and_then(Value::as_sequence).into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(!targets.is_empty(), "no targets for {JOB}");
    for t in targets {
        assert!(t.ends_with(&format!(":{port}")), "target {t} is not on port {port}");
    }

    // rule_files are resolved relative to the configuration file: every rule file is matched by an entry.
    let patterns: Vec<&str> = config
        .get("rule_files")
        .and_then(Value::as_sequence)
        .expect("rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for file in rule_files() {
        let rel = file.strip_prefix(prom_dir()).expect("under deployments/prometheus");
        let rel = rel.to_str().expect("utf-8 path");
        assert!(
            patterns.iter().any(|p| glob_match(p, rel)),
            "{rel} is not loaded by rule_files {patterns:?}"
        );
    }
}

/// A `*`-only glob (what `rule_files` uses here) against a relative path; `*` does not cross `/`.
fn glob_match(pattern: &str, path: &str) -> bool {
    fn rec(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| rec(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && rec(rest, &s[1..]),
        }
    }
    rec(pattern.as_bytes(), path.as_bytes())
}

// ---------------------------------------------------------------------------------------------------------------
// The contract: alerts, annotations, runbooks, unit tests

#[test]
fn every_contract_alert_has_severity_summary_description_and_runbook_url() {
    let alerts = alerts();
    let mut problems = Vec::new();
    for (name, page) in CONTRACT {
        let Some(rule) = alerts.get(*name) else {
            problems.push(format!("{name}: missing"));
            continue;
        };
        let labels = rule.get("labels");
        let severity = labels.and_then(|l| str_of(l, "severity"));
        if !matches!(severity, Some("critical" | "warning" | "info")) {
            problems.push(format!("{name}: severity {severity:?} is not critical|warning|info"));
        }
        let ann = rule.get("annotations");
        let get = |k: &str| ann.and_then(|a| str_of(a, k)).map(str::trim).unwrap_or("");
        let summary = get("summary");
        if summary.is_empty() {
            problems.push(format!("{name}: no summary"));
        } else if !summary.contains("$labels.") && !summary.contains("$value") {
            problems.push(format!("{name}: the summary names nothing of the alert ({summary})"));
        }
        if get("description").len() < 40 {
            problems.push(format!("{name}: no real description"));
        }
        let expected = format!("{RUNBOOK_URL_PREFIX}{page}");
        if get("runbook_url") != expected {
            problems.push(format!(
                "{name}: runbook_url {:?}, expected {expected}",
                get("runbook_url")
            ));
        }
    }
    // Alerts beyond the contract follow the same form (so they can be added without touching this test).
    let contract: BTreeSet<&str> = CONTRACT.iter().map(|(n, _)| *n).collect();
    for (name, rule) in &alerts {
        if contract.contains(name.as_str()) {
            continue;
        }
        let url = rule
            .get("annotations")
            .and_then(|a| str_of(a, "runbook_url"))
            .unwrap_or("");
        if !url.starts_with(RUNBOOK_URL_PREFIX) || rule.get("labels").and_then(|l| str_of(l, "severity")).is_none() {
            problems.push(format!(
                "{name}: not in the contract and without severity or runbook_url"
            ));
        }
    }
    assert!(problems.is_empty(), "alert rules:\n  {}", problems.join("\n  "));
}

#[test]
fn every_alert_links_a_runbook_that_exists() {
    let mut missing = Vec::new();
    for (name, rule) in alerts() {
        let url = rule
            .get("annotations")
            .and_then(|a| str_of(a, "runbook_url"))
            .unwrap_or("");
        let Some(page) = url.strip_prefix(RUNBOOK_URL_PREFIX) else {
            missing.push(format!("{name}: runbook_url {url:?} is not under {RUNBOOK_URL_PREFIX}"));
            continue;
        };
        let path = root().join("runbooks").join(page);
        if !path.is_file() {
            missing.push(format!("{name}: runbooks/{page} does not exist"));
        }
    }
    assert!(missing.is_empty(), "runbooks:\n  {}", missing.join("\n  "));
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    // alertname -> (firing cases, quiet cases)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for file in test_files() {
        let doc = load_yaml(&file);
        for test in doc.get("tests").and_then(Value::as_sequence).into_iter().flatten() {
            for case in test
                .get("alert_rule_test")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let Some(name) = str_of(case, "alertname") else {
                    continue;
                };
                let fires = case
                    .get("exp_alerts")
                    .and_then(Value::as_sequence)
                    .is_some_and(|a| !a.is_empty());
                let e = cases.entry(name.to_string()).or_default();
                if fires {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
        }
    }
    let mut problems = Vec::new();
    for name in alerts().keys() {
        let (firing, quiet) = cases.get(name).copied().unwrap_or_default();
        if firing == 0 {
            problems.push(format!("{name}: no unit test fires it"));
        }
        if quiet == 0 {
            problems.push(format!("{name}: no unit test shows it quiet"));
        }
    }
    let known = alerts();
    for name in cases.keys() {
        if !known.contains_key(name) {
            problems.push(format!("{name}: tested but not defined"));
        }
    }
    assert!(problems.is_empty(), "unit tests:\n  {}", problems.join("\n  "));
}

// ---------------------------------------------------------------------------------------------------------------
// Metric names

/// PromQL words that are neither metrics nor followed by `(`: binary and grouping keywords, literals.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
];
/// Aggregation operators: followed by `(`, or by `by`/`without` and a label list (`sum by (le) (...)`).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords whose parenthesised list holds label names, not metrics.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression selects. Strings, label matchers (`{...}`), ranges (`[...]`), template
/// placeholders (`{{...}}`, Grafana's `$var`), comments, function names (an identifier followed by `(`),
/// aggregation operators, keywords and the label lists after `by`/`without`/`on`/`ignoring`/`group_*` are not
/// metrics.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // 1. Template placeholders (Argo `{{args.x}}`, Go templates) go first: they may sit inside strings.
    let mut text = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(start) = rest.find("{{") {
        text.push_str(&rest[..start]);
        text.push(' ');
        rest = match rest[start..].find("}}") {
            Some(end) => &rest[start + end + 2..],
            None => "",
        };
    }
    text.push_str(rest);

    // 2. Blank out strings, matchers, ranges, variables and comments.
    let chars: Vec<char> = text.chars().collect();
    let mut clean = String::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                clean.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                // Strings inside matchers were not blanked yet: skip them whole.
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if matches!(chars[i], '"' | '\'' | '`') {
                        let q = chars[i];
                        i += 1;
                        while i < chars.len() && chars[i] != q {
                            if chars[i] == '\\' && q != '`' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                clean.push(' ');
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                continue;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => clean.push(c),
        }
        i += 1;
    }

    // 3. Tokens.
    let chars: Vec<char> = clean.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (`1e3`, `0x1f`, `6h`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let after = next_non_space(i);
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) && chars.get(after) == Some(&'(') {
                // Skip the label list.
                i = after;
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                continue;
            }
            if KEYWORDS.contains(&word.as_str())
                || AGGREGATIONS.contains(&word.as_str())
                || chars.get(after) == Some(&'(')
            {
                continue;
            }
            names.insert(word);
            continue;
        }
        i += 1;
    }
    names
}

/// The text of every Rust source file of the control plane.
fn control_plane_sources() -> String {
    let files = files_under(&root().join("control-plane/src"), &[".rs"]);
    assert!(!files.is_empty(), "no sources under control-plane/src");
    files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display())))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `name` is a metric the control plane exports (a string literal in its sources; a histogram's
/// `_bucket`/`_sum`/`_count` series by the histogram's name), a recording rule, or a series Prometheus makes.
fn is_known_metric(name: &str, sources: &str, records: &BTreeSet<String>) -> bool {
    if BUILTIN_SERIES.contains(&name) || records.contains(name) || sources.contains(&format!("\"{name}\"")) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| sources.contains(&format!("\"{base}\"")))
    })
}

/// Checks every expression of `exprs` (where, expression); returns the unknown metrics with where they are used.
fn unknown_metrics(exprs: &[(String, String)]) -> Vec<String> {
    let sources = control_plane_sources();
    let records = recording_rule_names();
    let mut unknown = Vec::new();
    for (place, expr) in exprs {
        for name in metric_names(expr) {
            if !is_known_metric(&name, &sources, &records) {
                unknown.push(format!("{name} (in {place})"));
            }
        }
    }
    unknown
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"histogram_quantile(0.95, sum by (instance, le) (rate(nkudo_heartbeat_ingest_seconds_bucket[5m])))"#),
        ["nkudo_heartbeat_ingest_seconds_bucket"]
    );
    assert_eq!(
        names(
            "max by (tenant, site) (site:nkudo_site_agents:max{state=\"offline\"}) > 0\n  and on (tenant, site) \
             (x_online{state=~\"online|degraded\"} > 0) # comment with fake_metric"
        ),
        ["site:nkudo_site_agents:max", "x_online"]
    );
    assert_eq!(
        names("(min by (tenant, site) (a_ts > 0) - time()) < on () group_left () (max(b_ttl) / 6)"),
        ["a_ts", "b_ttl"]
    );
    assert_eq!(
        names(r#"up{job="nkudo-control-plane"} == 0 or absent(up{job="nkudo-control-plane"})"#),
        ["up"]
    );
    assert_eq!(
        names("sum(increase(c_total{agent_version=\"{{args.canary-version}}\",result=\"failed\"}[5m])) offset 1h"),
        ["c_total"]
    );
    assert_eq!(
        names(r#"sum by (ring) (nkudo_agent_info{tenant=~"$tenant"}) * 1e3 unless ignoring(ring) g[$__rate_interval]"#),
        ["g", "nkudo_agent_info"]
    );
    assert_eq!(
        names(r#"nkudo_agent_info{version=~`v?[0-9]+\.[0-9]+-.+`} and bool sum without (x) (y)"#),
        ["nkudo_agent_info", "y"]
    );
    assert_eq!(names(r#"{__name__="z"}"#), Vec::<String>::new());
}

#[test]
fn metrics_read_by_the_rules_are_exported_by_the_control_plane() {
    let exprs: Vec<(String, String)> = rules()
        .into_iter()
        .filter_map(|(file, rule)| {
            let name = str_of(&rule, "alert").or_else(|| str_of(&rule, "record"))?.to_string();
            let expr = str_of(&rule, "expr")?.to_string();
            Some((format!("{} {name}", file.display()), expr))
        })
        .collect();
    assert!(exprs.len() >= CONTRACT.len(), "too few rules read: {}", exprs.len());
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "metrics no control-plane source defines:\n  {}",
        unknown.join("\n  ")
    );
}

/// Every string under `key` anywhere in a JSON document.
fn json_strings_at(v: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    _ => json_strings_at(v, key, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_strings_at(v, key, out)),
        _ => {}
    }
}

/// Every string under `key` anywhere in a YAML document.
fn yaml_strings_at(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    (Some(k), Value::String(s)) if k == key => out.push(s.clone()),
                    _ => yaml_strings_at(v, key, out),
                }
            }
        }
        Value::Sequence(a) => a.iter().for_each(|v| yaml_strings_at(v, key, out)),
        Value::Tagged(t) => yaml_strings_at(&t.value, key, out),
        _ => {}
    }
}

#[test]
fn metrics_read_by_dashboards_and_analysis_templates_are_exported_by_the_control_plane() {
    let root = root();
    let mut exprs = Vec::new();
    for file in files_under(&root.join("deployments/grafana"), &[".json"]) {
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let doc: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
        let mut found = Vec::new();
        json_strings_at(&doc, "expr", &mut found);
        exprs.extend(found.into_iter().map(|e| (file.display().to_string(), e)));
    }
    for file in files_under(&root.join("deployments/k8s"), &[".yaml", ".yml"]) {
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(doc).unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
            let mut found = Vec::new();
            yaml_strings_at(&doc, "query", &mut found);
            exprs.extend(found.into_iter().map(|e| (file.display().to_string(), e)));
        }
    }
    if exprs.is_empty() {
        eprintln!("no Grafana `expr` or Kubernetes `query` found under deployments/grafana and deployments/k8s");
        return;
    }
    let files: BTreeSet<&str> = exprs.iter().map(|(f, _)| f.as_str()).collect();
    eprintln!("{} expressions checked in {} files", exprs.len(), files.len());
    let unknown = unknown_metrics(&exprs);
    assert!(
        unknown.is_empty(),
        "metrics no control-plane source defines:\n  {}",
        unknown.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------------------------
// End to end: the deployed configuration against a real control plane

/// Debian's Prometheus server.
const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A Prometheus process of this test, killed when dropped.
struct PrometheusProcess {
    child: Child,
    url: String,
    log: PathBuf,
}

impl PrometheusProcess {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with `query`; the `data` of a successful answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(v["status"] == "success", "GET /api/v1/{path} {query:?}: {v}");
        Ok(v["data"].clone())
    }

    /// The instant vector of `q`.
    async fn query(&self, q: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let data = self.api("query", &[("query", q)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `from` (which must occur exactly once) by `to`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "prometheus.yml should contain `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_config_scrapes_a_real_control_plane_and_evaluates_every_rule() -> anyhow::Result<()> {
    if !Path::new(PROMETHEUS_BIN).exists() {
        assert!(
            !in_ci(),
            "{PROMETHEUS_BIN} missing; CI must install Debian's prometheus package"
        );
        skip("prometheus", PROMETHEUS_BIN);
        return Ok(());
    }
    // The control plane's certificate names `control-plane`, as in compose, so the TLS settings stay as deployed.
    let Some(mut cp) = ControlPlane::builder(Backend::Sqlite)
        .env("SERVER_NAMES", "control-plane")
        .env("FLEET_GAUGES_INTERVAL", "1s")
        .start()
        .await?
    else {
        return Ok(());
    };
    let cp_port = cp
        .base_url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("control plane port");

    // The deployed configuration and rules, with the target, the CA bundle's path and the intervals replaced.
    let dir = TempDir::new("nkudo-alerts-prometheus")?;
    let rules_dir = dir.path().join("rules");
    fs::create_dir_all(&rules_dir)?;
    for file in rule_files() {
        fs::copy(&file, rules_dir.join(file.file_name().expect("file name")))?;
    }
    let prom_port = free_port()?;
    let mut config = fs::read_to_string(prom_dir().join("prometheus.yml"))?;
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        ("scrape_timeout: 10s", "scrape_timeout: 1s".to_string()),
        ("evaluation_interval: 15s", "evaluation_interval: 1s".to_string()),
        (
            "ca_file: /etc/prometheus/tls/ca-bundle.pem",
            format!("ca_file: {}", cp.ca_bundle_path.display()),
        ),
        ("\"control-plane:8443\"", format!("\"127.0.0.1:{cp_port}\"")),
        ("\"localhost:9090\"", format!("\"127.0.0.1:{prom_port}\"")),
    ] {
        config = replace_once(&config, from, &to);
    }
    let config_path = dir.path().join("prometheus.yml");
    fs::write(&config_path, &config)?;
    let tsdb = dir.path().join("tsdb");
    let log = dir.path().join("prometheus.log");
    let log_file = fs::File::create(&log)?;
    let child = Command::new(PROMETHEUS_BIN)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file))
        .spawn()?;
    let prom = PrometheusProcess {
        child,
        url: format!("http://127.0.0.1:{prom_port}"),
        log,
    };

    // An agent that heartbeats.
    let fx = bootstrap(&cp).await?;
    let agent = enroll_agent(&cp, &fx, "edge-alerts").await?;
    let client = agent.client(&cp);
    let heartbeat = || async {
        let r = client
            .post(cp.url("/v1/heartbeat"))
            .json(&legacy_heartbeat_body(agent.agent_id()))
            .send()
            .await?;
        expect_json::<serde_json::Value>(r, StatusCode::OK, "POST /v1/heartbeat").await
    };
    heartbeat().await?;

    // Scraped over TLS verified against the CA bundle, with the server name of the deployment.
    let up = format!("up{{job=\"{JOB}\"}} == 1");
    poll_until(Duration::from_secs(60), "the control plane target up", || async {
        Ok(prom.query(&up).await.ok().filter(|r| !r.is_empty()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nprometheus log:\n{}", prom.log()))?;

    // Every rule is loaded, and evaluates without error on the real series.
    let expected_rules = rules().len();
    let health = poll_until(Duration::from_secs(60), "every rule evaluated", || async {
        let Ok(data) = prom.api("rules", &[]).await else {
            return Ok(None);
        };
        let rules: Vec<serde_json::Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules
            .iter()
            .all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001-")));
        Ok((rules.len() == expected_rules && evaluated).then_some(rules))
    })
    .await?;
    let errors: Vec<String> = health
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(
        errors.is_empty(),
        "rules failing on real series:\n  {}",
        errors.join("\n  ")
    );
    let loaded: BTreeSet<&str> = health.iter().filter_map(|r| r["name"].as_str()).collect();
    for (name, _) in CONTRACT {
        assert!(loaded.contains(name), "{name} not loaded by Prometheus");
    }

    // The recording rules see the fleet as the control plane exports it.
    let tenant_id = fx.tenant_id().to_string();
    let site_id = fx.site_id().to_string();
    let online = format!(
        "site:nkudo_site_agents:max{{state=\"online\", tenant_id=\"{tenant_id}\", site_id=\"{site_id}\", \
         tenant=\"{}\", site=\"{}\"}} == 1",
        fx.tenant.slug, fx.site.name
    );
    for q in [
        "nkudo:agents:count == 1".to_string(),
        online,
        "nkudo:heartbeats_ingested:rate3m > 0".to_string(),
        "instance:nkudo_heartbeat_ingest_seconds:p95_5m < 0.1".to_string(),
    ] {
        poll_until(Duration::from_secs(60), &q, || async {
            heartbeat().await?;
            Ok(prom.query(&q).await.ok().filter(|r| !r.is_empty()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nprometheus log:\n{}", prom.log()))?;
    }
    let firing = prom.query("ALERTS{alertname=\"NkudoControlPlaneDown\"}").await?;
    assert!(
        firing.is_empty(),
        "NkudoControlPlaneDown while the control plane is up: {firing:?}"
    );

    // The control plane goes away: its alert turns pending (it fires after its `for:`).
    cp.stop().await?;
    poll_until(Duration::from_secs(60), "NkudoControlPlaneDown pending", || async {
        let r = prom
            .query("ALERTS{alertname=\"NkudoControlPlaneDown\", alertstate=\"pending\", severity=\"critical\"}")
            .await;
        Ok(r.ok().filter(|r| !r.is_empty()))
    })
    .await?;
    Ok(())
}
