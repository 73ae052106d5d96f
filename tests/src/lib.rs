//! Test harness shared by the integration tests under `tests/tests/` and the heartbeat benchmark.
//!
//! Everything here runs the REAL `nkudo-control-plane` binary (see [`bin_path`]) over real sockets and real
//! TLS, against SQLite (the default, a file in a fresh data directory) or a fresh Postgres database
//! ([`database_url`]).
//!
//! * [`harness`]: locating binaries, spawning/stopping/restarting a control plane, running its CLI.
//! * [`db`]: backends, throw-away Postgres databases, direct SQL access for tamper tests.
//! * [`client`]: reqwest clients that trust only the control plane's CA bundle, bootstrap helpers
//!   (tenant, API key, site, token, enrollment), error-body assertions and polling.
//! * [`rawtls`]: one pinned HTTP/1.1-over-TLS connection (keep-alive tests).
//! * [`plans`]: plan, execution, log and VM calls (apply, lease, report results).
//! * [`edge`]: the real `nkudo-edge` agent on a simulated host ([`EdgeHost`]) with the Cloud Hypervisor and
//!   NetBird stand-ins, plus polling helpers for plans, executions and logs.
//! * [`oncall`]: the on-call contract (alert → runbook page) the alert and runbook tests share.
//! * [`csr`]: CSRs (rcgen ECDSA P-256 or `openssl req` RSA-4096), a throw-away CA, certificate inspection.
//!
//! Scenarios that run on both backends are written once as `async fn scenario(backend: Backend)` and
//! expanded with [`both_backends!`] into `<name>_sqlite` and `<name>_postgres` tests.

pub mod client;
pub mod csr;
pub mod db;
pub mod edge;
pub mod harness;
pub mod oncall;
pub mod plans;
pub mod prometheus;
pub mod rawtls;
pub mod releases;

pub use client::*;
pub use csr::*;
pub use db::*;
pub use edge::*;
pub use harness::*;
pub use plans::*;
pub use rawtls::*;

/// Expands one scenario `async fn(Backend) -> anyhow::Result<()>` into two tokio tests.
///
/// ```text
/// async fn enroll_and_heartbeat(backend: Backend) -> anyhow::Result<()> { … }
/// both_backends!(enroll_and_heartbeat => enroll_and_heartbeat_sqlite, enroll_and_heartbeat_postgres);
/// ```
#[macro_export]
macro_rules! both_backends {
    ($scenario:ident => $sqlite:ident, $postgres:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() -> anyhow::Result<()> {
            $scenario($crate::Backend::Sqlite).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() -> anyhow::Result<()> {
            $scenario($crate::Backend::Postgres).await
        }
    };
}

/// `let cp = start_or_skip!(ControlPlane::start(backend));` : returns `Ok(())` from the enclosing test when the
/// backend is unavailable and skipping is allowed (Postgres down and CI != "true"; the skip is printed).
#[macro_export]
macro_rules! start_or_skip {
    ($fut:expr) => {
        match $fut.await? {
            Some(cp) => cp,
            None => return Ok(()),
        }
    };
}
