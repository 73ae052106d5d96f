//! Prometheus metrics of the control plane, served at `/metrics` in the text exposition format.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
        for c in [
            Box::new(enrollments.clone()) as Box<dyn prometheus::core::Collector>,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
