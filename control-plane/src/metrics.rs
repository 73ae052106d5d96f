//! Prometheus metrics of the control plane, served at `/metrics` in the text exposition format.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Labels of the per-site fleet gauges: tenant slug, site name, and their ids (for the API's filters).
pub const SITE_LABELS: [&str; 4] = ["tenant", "site", "tenant_id", "site_id"];
/// Labels of `nkudo_audit_chain_broken`: tenant slug (`system` for the system chain) and tenant id (`""`).
pub const CHAIN_LABELS: [&str; 2] = ["tenant", "tenant_id"];
/// Results of `nkudo_audit_verify_runs_total`.
pub const AUDIT_VERIFY_RESULTS: [&str; 3] = ["ok", "broken", "error"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Enrollment attempts by result (`success`, `invalid_token`, `already_used`, `token_expired`, …).
    pub enrollments: IntCounterVec,
    /// Time to ingest one heartbeat (validation, buffering, durable parts), in seconds.
    pub heartbeat_ingest: Histogram,
    /// Heartbeats received, by whether the agent's version is supported (N/N-1).
    pub heartbeats: IntCounterVec,
    /// Heartbeats from agents outside N/N-1 (still recorded, so they can be upgraded).
    pub unsupported_agent_heartbeats: IntCounter,
    /// Enrolled, non-revoked agents by version, recomputed by the sweeper.
    pub agents_by_version: IntGaugeVec,
    /// HTTP requests by route template, method and status.
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    /// Authentication failures by kind (admin, api_key, mtls, cross_tenant).
    pub auth_failures: IntCounterVec,
    /// Batched heartbeat writes: duration and rows.
    pub heartbeat_flush: Histogram,
    pub heartbeat_flush_rows: IntCounter,
    pub heartbeat_flush_errors: IntCounter,
    pub agents_marked_offline: IntCounter,
    /// Finished plan executions by result and the version of the agent that ran them.
    pub plan_executions: IntCounterVec,
    /// Self-update outcomes by from/to version and result (committed, rolled-back, failed), once per attempt.
    pub agent_upgrades: IntCounterVec,
    /// Agent process restarts by version (from the agents' update status).
    pub agent_restarts: IntCounterVec,
    /// Agents by tenant, site, ring, environment and version (recomputed periodically).
    pub agent_info: prometheus::IntGaugeVec,
    /// Pre-release offers withheld from production agents (defence in depth behind PRERELEASE_IN_PRODUCTION).
    pub prerelease_offers_refused: IntCounter,
    /// Per site: the largest time since the last heartbeat over its non-revoked agents (fleet_gauges).
    pub site_heartbeat_lag: GaugeVec,
    /// Per site and state (online, degraded, offline): non-revoked agents (fleet_gauges).
    pub site_agents: IntGaugeVec,
    /// Per site: the earliest certificate expiry of its non-revoked agents, Unix seconds (fleet_gauges).
    pub site_cert_expiry: GaugeVec,
    /// The configured `AGENT_CERT_TTL` in seconds.
    pub agent_cert_ttl: Gauge,
    /// Refused attempts to reach another tenant's resources, by the caller's own tenant and the resource kind.
    pub tenant_isolation_violations: IntCounterVec,
    /// 1 for each audit chain the last verification found broken, 0 for one found broken before and intact now.
    pub audit_chain_broken: IntGaugeVec,
    /// When the periodic audit verification last ran to completion (whatever it found), Unix seconds.
    pub audit_verify_last_success: Gauge,
    /// Periodic audit verifications by result (ok, broken, error).
    pub audit_verify_runs: IntCounterVec,
}

impl Metrics {
    /// The registry `/metrics` gathers (other modules register their own metrics into it).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        let enrollments = IntCounterVec::new(
            Opts::new("nkudo_enrollments_total", "Enrollment attempts by result"),
            &["result"],
        )
        .expect("metric");
        let heartbeat_ingest = Histogram::with_opts(
            HistogramOpts::new("nkudo_heartbeat_ingest_seconds", "Heartbeat ingest latency").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("metric");
        let heartbeats = IntCounterVec::new(
            Opts::new("nkudo_heartbeats_total", "Heartbeats received by agent version support"),
            &["supported"],
        )
        .expect("metric");
        let unsupported_agent_heartbeats = IntCounter::new(
            "nkudo_unsupported_agent_heartbeats_total",
            "Heartbeats from agents outside the N/N-1 supported range",
        )
        .expect("metric");
        let agents_by_version = IntGaugeVec::new(
            Opts::new(
                "nkudo_agents_by_version",
                "Enrolled, non-revoked agents by version and support",
            ),
            &["version", "supported"],
        )
        .expect("metric");
        let http_requests = IntCounterVec::new(
            Opts::new("nkudo_http_requests_total", "HTTP requests by route, method and status"),
            &["route", "method", "status"],
        )
        .expect("metric");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new("nkudo_http_request_duration_seconds", "HTTP request duration by route")
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["route"],
        )
        .expect("metric");
        let auth_failures = IntCounterVec::new(
            Opts::new("nkudo_auth_failures_total", "Authentication failures by kind"),
            &["kind"],
        )
        .expect("metric");
        let heartbeat_flush = Histogram::with_opts(
            HistogramOpts::new(
                "nkudo_heartbeat_flush_seconds",
                "Duration of one batched heartbeat write",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )
        .expect("metric");
        let heartbeat_flush_rows = IntCounter::new(
            "nkudo_heartbeat_flush_agents_total",
            "Agents written by batched heartbeat flushes",
        )
        .expect("metric");
        let heartbeat_flush_errors =
            IntCounter::new("nkudo_heartbeat_flush_errors_total", "Failed batched heartbeat writes").expect("metric");
        let agents_marked_offline = IntCounter::new(
            "nkudo_agents_marked_offline_total",
            "Agents the sweeper marked OFFLINE for a missing heartbeat",
        )
        .expect("metric");
        let plan_executions = IntCounterVec::new(
            Opts::new(
                "nkudo_plan_executions_total",
                "Finished plan executions by result and the agent version that ran them",
            ),
            &["result", "agent_version"],
        )
        .expect("metric");
        let agent_upgrades = IntCounterVec::new(
            Opts::new(
                "nkudo_agent_upgrades_total",
                "Agent self-update outcomes by from/to version and result",
            ),
            &["from", "to", "result"],
        )
        .expect("metric");
        let agent_restarts = IntCounterVec::new(
            Opts::new("nkudo_agent_restarts_total", "Agent process restarts by version"),
            &["version"],
        )
        .expect("metric");
        let agent_info = prometheus::IntGaugeVec::new(
            Opts::new(
                "nkudo_agent_info",
                "Enrolled agents by tenant, site, ring, environment and reported version",
            ),
            &["tenant", "site", "ring", "environment", "version"],
        )
        .expect("metric");
        let prerelease_offers_refused = IntCounter::new(
            "nkudo_prerelease_offers_refused_total",
            "Pre-release offers withheld from production agents",
        )
        .expect("metric");
        let site_heartbeat_lag = GaugeVec::new(
            Opts::new(
                "nkudo_site_heartbeat_lag_seconds",
                "Largest time since the last heartbeat (since enrollment when none) over the site's non-revoked agents",
            ),
            &SITE_LABELS,
        )
        .expect("metric");
        let mut site_agent_labels = SITE_LABELS.to_vec();
        site_agent_labels.push("state");
        let site_agents = IntGaugeVec::new(
            Opts::new("nkudo_site_agents", "Non-revoked agents of a site by state"),
            &site_agent_labels,
        )
        .expect("metric");
        let site_cert_expiry = GaugeVec::new(
            Opts::new(
                "nkudo_site_certificate_expiry_earliest_timestamp_seconds",
                "Earliest client certificate expiry over the site's non-revoked agents (Unix seconds)",
            ),
            &SITE_LABELS,
        )
        .expect("metric");
        let agent_cert_ttl = Gauge::new(
            "nkudo_agent_certificate_ttl_seconds",
            "Lifetime of the agent certificates this control plane issues (AGENT_CERT_TTL)",
        )
        .expect("metric");
        // Always 1, labelled with this control plane's reported version and the version it was built as (they
        // differ for a promoted release, which runs its pre-release's bytes); only registered, never changed.
        let build_info = IntGaugeVec::new(
            Opts::new(
                "nkudo_control_plane_build_info",
                "Always 1: the control plane's reported version and the version it was built as",
            ),
            &["version", "build"],
        )
        .expect("metric");
        build_info
            .with_label_values(&[nkudo_core::build_info::reported(), nkudo_core::build_info::VERSION])
            .set(1);
        let tenant_isolation_violations = IntCounterVec::new(
            Opts::new(
                "nkudo_tenant_isolation_violations_total",
                "Refused attempts to reach another tenant's resources, by the caller's own tenant and resource kind",
            ),
            &["tenant", "tenant_id", "kind"],
        )
        .expect("metric");
        let audit_chain_broken = IntGaugeVec::new(
            Opts::new(
                "nkudo_audit_chain_broken",
                "1 for an audit hash chain the last verification found broken, 0 once it verifies again",
            ),
            &CHAIN_LABELS,
        )
        .expect("metric");
        let audit_verify_last_success = Gauge::new(
            "nkudo_audit_verify_last_success_timestamp_seconds",
            "When the periodic audit verification last ran to completion, whatever it found (Unix seconds)",
        )
        .expect("metric");
        let audit_verify_runs = IntCounterVec::new(
            Opts::new(
                "nkudo_audit_verify_runs_total",
                "Periodic audit chain verifications by result (ok, broken, error)",
            ),
            &["result"],
        )
        .expect("metric");
        for result in AUDIT_VERIFY_RESULTS {
            audit_verify_runs.with_label_values(&[result]);
        }
        for c in [
            Box::new(enrollments.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(site_heartbeat_lag.clone()),
            Box::new(site_agents.clone()),
            Box::new(site_cert_expiry.clone()),
            Box::new(agent_cert_ttl.clone()),
            Box::new(build_info.clone()),
            Box::new(tenant_isolation_violations.clone()),
            Box::new(audit_chain_broken.clone()),
            Box::new(audit_verify_last_success.clone()),
            Box::new(audit_verify_runs.clone()),
            Box::new(plan_executions.clone()),
            Box::new(agent_upgrades.clone()),
            Box::new(agent_restarts.clone()),
            Box::new(agent_info.clone()),
            Box::new(prerelease_offers_refused.clone()),
            Box::new(heartbeat_ingest.clone()),
            Box::new(heartbeats.clone()),
            Box::new(unsupported_agent_heartbeats.clone()),
            Box::new(agents_by_version.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_request_duration.clone()),
            Box::new(auth_failures.clone()),
            Box::new(heartbeat_flush.clone()),
            Box::new(heartbeat_flush_rows.clone()),
            Box::new(heartbeat_flush_errors.clone()),
            Box::new(agents_marked_offline.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        Metrics {
            registry,
            enrollments,
            heartbeat_ingest,
            heartbeats,
            unsupported_agent_heartbeats,
            agents_by_version,
            http_requests,
            http_request_duration,
            auth_failures,
            heartbeat_flush,
            heartbeat_flush_rows,
            heartbeat_flush_errors,
            agents_marked_offline,
            plan_executions,
            agent_upgrades,
            agent_restarts,
            agent_info,
            prerelease_offers_refused,
            site_heartbeat_lag,
            site_agents,
            site_cert_expiry,
            agent_cert_ttl,
            tenant_isolation_violations,
            audit_chain_broken,
            audit_verify_last_success,
            audit_verify_runs,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The value of the series `name` with exactly the labels `labels` in a text exposition (tests).
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (inner, value) = rest.split_once("} ")?;
        let mut got: Vec<&str> = inner.split(',').filter(|p| !p.is_empty()).collect();
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        got.sort_unstable();
        want.sort_unstable();
        (got == want).then(|| value.trim().parse().ok())?
    })
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_reported_and_the_build_version() {
        let text = Metrics::new().render();
        let labels = [
            ("version", nkudo_core::build_info::reported()),
            ("build", nkudo_core::build_info::VERSION),
        ];
        assert_eq!(
            sample(&text, "nkudo_control_plane_build_info", &labels),
            Some(1.0),
            "{text}"
        );
    }

    #[test]
    fn sample_reads_a_series_by_its_exact_labels() {
        let text = "m{a=\"1\",b=\"x\"} 3\nm{a=\"1\"} 4\n";
        assert_eq!(sample(text, "m", &[("b", "x"), ("a", "1")]), Some(3.0));
        assert_eq!(sample(text, "m", &[("a", "1")]), Some(4.0));
        assert_eq!(sample(text, "m", &[("a", "2")]), None);
        assert_eq!(sample(text, "n", &[("a", "1")]), None);
    }
}
