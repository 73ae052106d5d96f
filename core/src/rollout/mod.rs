//! Rollout policies (ARCHITECTURE §4.6): the TOML file a release captain hands to `releaser rollout`, validated
//! in full before anything starts, and the pure rules the control plane's rollout controller applies with it.
//!
//! * [`policy`]: the file format, parsing and validation (every error names its line).
//! * [`select`]: which agents a stage selects (labels, tenants, sites, a stable percentage of agent ids).
//! * [`machine`]: what the controller does next in a stage (switch within the blast radius, report timeout,
//!   bake, finish, manual gate).
//! * [`trigger`]: the analysis triggers: the built-in defaults (our rollback rules), PromQL templates with
//!   placeholders, and the breach decision from the values seen.
//!
//! A policy looks like this (every key but `version` and the stage names is optional):
//!
//! ```toml
//! version = "1.4.0"
//!
//! [defaults]
//! bake = "10m"                 # how long a stage's agents run the new version before the next stage
//! report_timeout = "15m"       # how long they have to report it
//! analysis = ["plan-failure-rate", "enrollment-failure-rate", "upgrade-rollbacks", "crash-loops"]
//!
//! [[stage]]
//! name = "lab"
//! rings = ["lab"]
//!
//! [[stage]]
//! name = "pilot"
//! rings = ["pilot"]
//! max_concurrent_per_site = 2  # blast radius: agents of one site switching at once
//!
//! [[stage]]
//! name = "stable-10"
//! rings = ["stable"]
//! percent = 10                 # stable hash of the agent id: the same agents every evaluation
//! manual_gate = true           # wait for `releaser rollout approve` before this stage starts
//!
//! [[trigger]]                  # a custom trigger (or one overriding a built-in of the same name)
//! name = "heartbeat-p95"
//! query = 'histogram_quantile(0.95, sum(rate(nkudo_heartbeat_ingest_seconds_bucket[{window}])) by (le))'
//! compare = "threshold"
//! operator = ">"
//! threshold = 0.5
//! ```

pub mod machine;
pub mod policy;
pub mod select;
pub mod trigger;

pub use machine::{next_steps, Member, StagePhase, Step};
pub use policy::{parse_policy, Policy, PolicyError, Stage};
pub use select::{stable_bucket, AgentFacts, Selector};
pub use trigger::{Compare, Decision, Metric, NoData, Observation, Operator, Trigger};
