//! The on-call contract the alert rules (`deployments/prometheus/rules/`) and the runbooks (`runbooks/`) share:
//! which alert links which page, and the pages every procedure has. `tests/tests/alerts.rs` checks the rules
//! against it, `tests/tests/runbooks.rs` the pages.

/// The prefix of every alert's `runbook_url`; the rest is the page's file name under `runbooks/`.
pub const RUNBOOK_URL_PREFIX: &str = "https://github.com/n-kudo/n-kudo/blob/main/runbooks/";

/// Alert name → runbook page (`runbooks/<file>`): the alerts the on-call surface must have.
pub const CONTRACT_ALERTS: &[(&str, &str)] = &[
    ("NkudoControlPlaneDown", "control-plane-down.md"),
    ("NkudoPrereleaseInProduction", "prerelease-in-production.md"),
    ("NkudoHeartbeatIngestDown", "heartbeat-ingest-down.md"),
    ("NkudoHeartbeatIngestSlow", "heartbeat-ingest-slow.md"),
    ("NkudoSiteOffline", "site-offline.md"),
    ("NkudoAgentsOffline", "agents-offline.md"),
    ("NkudoPlanFailureRateHigh", "plan-failure-rate.md"),
    ("NkudoEnrollmentFailureRateHigh", "enrollment-failure.md"),
    ("NkudoAgentsBelowMinimumVersion", "agents-below-minimum-version.md"),
    ("NkudoAgentUpgradeFailures", "agent-upgrade-failed.md"),
    ("NkudoAgentCrashLoopRollback", "agent-crash-loop-rollback.md"),
    ("NkudoRolloutRolledBack", "rollout-rolled-back.md"),
    ("NkudoAgentCertificateExpiringSoon", "agent-certificate-expiry.md"),
    ("NkudoTenantIsolationViolation", "tenant-isolation-violation.md"),
    ("NkudoAuditChainBroken", "audit-chain-broken.md"),
    ("NkudoAuditVerificationStale", "audit-verification-stale.md"),
];

/// The procedure pages (`runbooks/<file>`), besides one page per alert.
pub const CONTRACT_PROCEDURES: &[&str] = &[
    "netbird-join-failure.md",
    "cloud-hypervisor-command-failure.md",
    "certificate-rotation.md",
    "database-backup-restore.md",
    "control-plane-upgrade.md",
];
