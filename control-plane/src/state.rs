//! The one shared state every handler receives.

use crate::agents::AgentCache;
use crate::config::Config;
use crate::db::Db;
use crate::heartbeat_buffer::HeartbeatBuffer;
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::ratelimit::RateLimiter;
use std::sync::Arc;

pub type SharedState = Arc<AppState>;

pub struct AppState {
    pub cfg: Config,
    pub db: Db,
    pub pki: Pki,
    pub admin_key: String,
    pub metrics: Metrics,
    pub agents: AgentCache,
    pub heartbeats: HeartbeatBuffer,
    pub enroll_limiter: RateLimiter,
    pub open_plan_sites: crate::plans::OpenPlanSites,
    /// This control plane's version and the agent versions it supports (N/N-1, `MINIMUM_AGENT_VERSION`).
    pub policy: nkudo_core::version::SupportPolicy,
    pub min_agent_version: String,
    /// Where rollout triggers read their values (Prometheus or the builtin statistics).
    pub rollout_source: crate::rollout::source::Source,
    pub rollout_metrics: crate::rollout::RolloutMetrics,
    /// Desired versions, releases and agent labels, refreshed every second for the heartbeat path.
    pub desired: crate::releases::desired::DesiredCache,
    pub recorded_outcomes: crate::releases::offer::Recorded,
}
