//! Periodic audit verification: every `AUDIT_VERIFY_INTERVAL` (default 1h; `0`/`off` disables it) the control
//! plane runs [`crate::audit::verify`] over every hash chain and exports what it found:
//! `nkudo_audit_chain_broken{tenant,tenant_id}` (1 for a broken chain, back to 0 once it verifies again),
//! `nkudo_audit_verify_last_success_timestamp_seconds` (the verification ran to completion, whatever it found)
//! and `nkudo_audit_verify_runs_total{result=ok|broken|error}`. Broken chains are logged at error level.
//!
//! The verification only reads, so every replica runs it; the first run comes after a random delay within the
//! first minute (or the interval, when shorter) so that replicas started together do not read at once.

use crate::audit::VerifyReport;
use crate::metrics::Metrics;
use crate::state::SharedState;
use sqlx::Row;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The first verification runs within this long after start (or within the interval, when shorter).
pub const FIRST_RUN_WINDOW: Duration = Duration::from_secs(60);

/// The delay before the first run: `fraction` (0..1, random) of the shorter of the interval and
/// [`FIRST_RUN_WINDOW`].
pub fn first_delay(interval: Duration, fraction: f64) -> Duration {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    interval.min(FIRST_RUN_WINDOW).mul_f64(fraction)
}

/// The labels of a chain's `nkudo_audit_chain_broken` series: the tenant's slug (`system` for the system
/// chain, the id when the tenant row is gone) and the tenant id.
pub fn chain_labels(tenant_id: &str, slugs: &HashMap<String, String>) -> [String; 2] {
    let tenant = if tenant_id.is_empty() {
        "system".to_string()
    } else {
        slugs.get(tenant_id).cloned().unwrap_or_else(|| tenant_id.to_string())
    };
    [tenant, tenant_id.to_string()]
}

/// Exports one completed verification: broken chains at 1, chains broken in an earlier run (`ever_broken`,
/// tenant id → labels) and intact now at 0, the run's result and the completion time `now_secs`. Returns the
/// result label (`ok` or `broken`).
pub fn apply_report(
    metrics: &Metrics,
    report: &VerifyReport,
    slugs: &HashMap<String, String>,
    ever_broken: &mut HashMap<String, [String; 2]>,
    now_secs: f64,
) -> &'static str {
    let broken: HashSet<&str> = report.broken_tenants().into_iter().collect();
    for (tenant_id, labels) in ever_broken.iter() {
        if !broken.contains(tenant_id.as_str()) {
            metrics
                .audit_chain_broken
                .with_label_values(&[&labels[0], &labels[1]])
                .set(0);
        }
    }
    for tenant_id in &broken {
        let labels = ever_broken
            .entry(tenant_id.to_string())
            .or_insert_with(|| chain_labels(tenant_id, slugs));
        metrics
            .audit_chain_broken
            .with_label_values(&[&labels[0], &labels[1]])
            .set(1);
    }
    let result = if report.problems.is_empty() { "ok" } else { "broken" };
    metrics.audit_verify_runs.with_label_values(&[result]).inc();
    metrics.audit_verify_last_success.set(now_secs);
    result
}

async fn tenant_slugs(db: &crate::db::Db) -> Result<HashMap<String, String>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, slug FROM tenants").fetch_all(&db.pool).await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// One verification with its metrics and logs.
async fn run_once(state: &SharedState, ever_broken: &mut HashMap<String, [String; 2]>) {
    let started = Instant::now();
    let outcome = async {
        let report = crate::audit::verify(&state.db).await?;
        let slugs = tenant_slugs(&state.db).await?;
        Ok::<_, sqlx::Error>((report, slugs))
    }
    .await;
    let (report, slugs) = match outcome {
        Ok(found) => found,
        Err(e) => {
            state.metrics.audit_verify_runs.with_label_values(&["error"]).inc();
            tracing::error!(error = %e, "audit verification could not read the audit trail");
            return;
        }
    };
    let now_secs = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let result = apply_report(&state.metrics, &report, &slugs, ever_broken, now_secs);
    for p in &report.problems {
        let [tenant, tenant_id] = chain_labels(&p.tenant_id, &slugs);
        tracing::error!(tenant, tenant_id, problem = %p.message, "audit chain broken");
    }
    tracing::info!(
        result,
        chains = report.chains,
        events = report.events,
        broken = report.broken_tenants().len(),
        took_ms = started.elapsed().as_millis() as u64,
        "audit verification finished"
    );
}

/// Verifies every `AUDIT_VERIFY_INTERVAL` until `shutdown` turns true (returns at once when disabled).
pub async fn run(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let Some(every) = state.cfg.audit_verify_interval else {
        tracing::info!("periodic audit verification disabled (AUDIT_VERIFY_INTERVAL)");
        return;
    };
    let mut delay = first_delay(every, rand::random::<f64>());
    let mut ever_broken = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        let started = Instant::now();
        run_once(&state, &mut ever_broken).await;
        // The interval runs from start to start; a verification longer than it is followed at once by the next.
        delay = every.saturating_sub(started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ChainProblem;
    use crate::metrics::sample;

    #[test]
    fn first_run_comes_within_a_minute_or_the_interval() {
        let hour = Duration::from_secs(3600);
        assert_eq!(first_delay(hour, 0.0), Duration::ZERO);
        assert_eq!(first_delay(hour, 1.0), FIRST_RUN_WINDOW);
        assert_eq!(first_delay(hour, 0.5), Duration::from_secs(30));
        assert_eq!(first_delay(Duration::from_secs(10), 0.5), Duration::from_secs(5));
        assert_eq!(first_delay(hour, 7.0), FIRST_RUN_WINDOW);
        assert_eq!(first_delay(hour, f64::NAN), Duration::ZERO);
        for _ in 0..100 {
            assert!(first_delay(Duration::from_secs(2), rand::random()) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn system_chain_and_missing_tenants_are_labelled() {
        let slugs = HashMap::from([("id-1".to_string(), "acme".to_string())]);
        assert_eq!(chain_labels("", &slugs), ["system".to_string(), String::new()]);
        assert_eq!(chain_labels("id-1", &slugs), ["acme".to_string(), "id-1".to_string()]);
        assert_eq!(chain_labels("id-2", &slugs), ["id-2".to_string(), "id-2".to_string()]);
    }

    fn report(broken: &[&str]) -> VerifyReport {
        VerifyReport {
            chains: 3,
            events: 10,
            problems: broken
                .iter()
                .map(|t| ChainProblem {
                    tenant_id: t.to_string(),
                    message: format!("tenant {t}: event seq 2 was changed"),
                })
                .collect(),
        }
    }

    #[test]
    fn broken_chains_go_to_one_and_back_to_zero() {
        let m = Metrics::new();
        let slugs = HashMap::from([("id-1".to_string(), "acme".to_string())]);
        let mut ever = HashMap::new();
        let acme = [("tenant", "acme"), ("tenant_id", "id-1")];
        let system = [("tenant", "system"), ("tenant_id", "")];
        let runs = |text: &str, r: &str| sample(text, "nkudo_audit_verify_runs_total", &[("result", r)]);

        let text = m.render();
        assert_eq!(
            runs(&text, "broken"),
            Some(0.0),
            "every result exists from the start:\n{text}"
        );
        assert!(!text.contains("nkudo_audit_chain_broken{"), "{text}");
        assert!(!text.contains("nkudo_audit_verify_last_success_timestamp_seconds 1"));

        assert_eq!(apply_report(&m, &report(&[]), &slugs, &mut ever, 100.0), "ok");
        let text = m.render();
        assert_eq!(runs(&text, "ok"), Some(1.0));
        assert!(
            !text.contains("nkudo_audit_chain_broken{"),
            "nothing broken, no series:\n{text}"
        );
        assert!(
            text.contains("nkudo_audit_verify_last_success_timestamp_seconds 100\n"),
            "{text}"
        );

        // Two problems in one chain count once.
        let mut two = report(&["id-1", ""]);
        two.problems.push(ChainProblem {
            tenant_id: "id-1".into(),
            message: "tenant id-1: events without a chain head".into(),
        });
        assert_eq!(two.broken_tenants(), vec!["id-1", ""]);
        assert_eq!(apply_report(&m, &two, &slugs, &mut ever, 200.0), "broken");
        let text = m.render();
        assert_eq!(sample(&text, "nkudo_audit_chain_broken", &acme), Some(1.0), "{text}");
        assert_eq!(sample(&text, "nkudo_audit_chain_broken", &system), Some(1.0), "{text}");
        assert_eq!(runs(&text, "broken"), Some(1.0));
        assert!(text.contains("nkudo_audit_verify_last_success_timestamp_seconds 200\n"));

        // The system chain was repaired (restored from a backup); acme's is still broken.
        apply_report(&m, &report(&["id-1"]), &slugs, &mut ever, 300.0);
        let text = m.render();
        assert_eq!(sample(&text, "nkudo_audit_chain_broken", &acme), Some(1.0));
        assert_eq!(sample(&text, "nkudo_audit_chain_broken", &system), Some(0.0));
        apply_report(&m, &report(&[]), &slugs, &mut ever, 400.0);
        let text = m.render();
        assert_eq!(sample(&text, "nkudo_audit_chain_broken", &acme), Some(0.0));
        assert_eq!(runs(&text, "ok"), Some(2.0));
        assert_eq!(runs(&text, "broken"), Some(2.0));
        assert_eq!(runs(&text, "error"), Some(0.0));
    }
}
