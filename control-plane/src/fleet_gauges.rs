//! Fleet gauges for on-call alerts, recomputed every `FLEET_GAUGES_INTERVAL` by one grouped query over the
//! non-revoked agents of every site: `nkudo_site_heartbeat_lag_seconds` (the largest time since an agent's last
//! heartbeat, since its enrollment when it never sent one), `nkudo_site_agents{state}` and
//! `nkudo_site_certificate_expiry_earliest_timestamp_seconds`. Label sets of sites that no longer have a
//! non-revoked agent are removed. Also sets `nkudo_agent_certificate_ttl_seconds` once at start and makes the
//! `nkudo_tenant_isolation_violations_total` series of every tenant exist at 0 (so that the first violation is
//! an increase Prometheus sees).
//!
//! Heartbeats are coalesced in memory and written every `HEARTBEAT_FLUSH_INTERVAL`, so the lag read from the
//! database is up to that much larger than the agent's real silence. Every replica exports the same values.

use crate::metrics::Metrics;
use crate::state::SharedState;
use crate::util::now_ms;
use sqlx::Row;
use std::collections::HashSet;
use tokio::sync::watch;

/// The `state` label values of `nkudo_site_agents`, with the database state each counts.
pub const AGENT_STATES: [(&str, &str); 3] = [("online", "ONLINE"), ("degraded", "DEGRADED"), ("offline", "OFFLINE")];

/// One site's aggregate over its non-revoked agents (times in Unix milliseconds, as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStats {
    pub tenant_id: String,
    pub tenant_slug: String,
    pub site_id: String,
    pub site_name: String,
    /// The oldest last contact: `MIN(COALESCE(last_heartbeat_at, enrolled_at))`.
    pub oldest_contact_ms: i64,
    pub online: i64,
    pub degraded: i64,
    pub offline: i64,
    pub earliest_cert_expiry_ms: i64,
}

impl SiteStats {
    /// The label values of the per-site gauges, in [`crate::metrics::SITE_LABELS`] order.
    fn labels(&self) -> [String; 4] {
        [
            self.tenant_slug.clone(),
            self.site_name.clone(),
            self.tenant_id.clone(),
            self.site_id.clone(),
        ]
    }
}

/// Seconds between `then_ms` and `now_ms`, never negative (another replica's clock may run ahead).
pub fn lag_seconds(now_ms: i64, then_ms: i64) -> f64 {
    (now_ms.saturating_sub(then_ms)).max(0) as f64 / 1000.0
}

/// Reads every site's aggregate in one grouped query (SQLite and Postgres alike).
pub async fn query_sites(db: &crate::db::Db) -> Result<Vec<SiteStats>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT g.tenant_id, t.slug, g.site_id, s.name, g.oldest_contact, g.online, g.degraded, g.offline, \
         g.earliest_expiry FROM (\
           SELECT tenant_id, site_id, MIN(COALESCE(last_heartbeat_at, enrolled_at)) AS oldest_contact, \
             SUM(CASE WHEN state = 'ONLINE' THEN 1 ELSE 0 END) AS online, \
             SUM(CASE WHEN state = 'DEGRADED' THEN 1 ELSE 0 END) AS degraded, \
             SUM(CASE WHEN state = 'OFFLINE' THEN 1 ELSE 0 END) AS offline, \
             MIN(cert_expires_at) AS earliest_expiry \
           FROM agents WHERE revoked_at IS NULL GROUP BY tenant_id, site_id\
         ) g JOIN sites s ON s.id = g.site_id JOIN tenants t ON t.id = g.tenant_id",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SiteStats {
                tenant_id: r.try_get(0)?,
                tenant_slug: r.try_get(1)?,
                site_id: r.try_get(2)?,
                site_name: r.try_get(3)?,
                oldest_contact_ms: r.try_get(4)?,
                online: r.try_get(5)?,
                degraded: r.try_get(6)?,
                offline: r.try_get(7)?,
                earliest_cert_expiry_ms: r.try_get(8)?,
            })
        })
        .collect()
}

/// Sets the per-site gauges from `sites` and removes the label sets in `shown` (what the previous call set)
/// whose site is no longer there; `shown` becomes what this call set.
pub fn apply(metrics: &Metrics, sites: &[SiteStats], now_ms: i64, shown: &mut HashSet<[String; 4]>) {
    let mut now_shown = HashSet::with_capacity(sites.len());
    for site in sites {
        let labels = site.labels();
        let l: [&str; 4] = [&labels[0], &labels[1], &labels[2], &labels[3]];
        metrics
            .site_heartbeat_lag
            .with_label_values(&l)
            .set(lag_seconds(now_ms, site.oldest_contact_ms));
        metrics
            .site_cert_expiry
            .with_label_values(&l)
            .set(site.earliest_cert_expiry_ms as f64 / 1000.0);
        for ((state, _), n) in AGENT_STATES.iter().zip([site.online, site.degraded, site.offline]) {
            metrics
                .site_agents
                .with_label_values(&[l[0], l[1], l[2], l[3], state])
                .set(n);
        }
        now_shown.insert(labels);
    }
    for gone in shown.difference(&now_shown) {
        let l: [&str; 4] = [&gone[0], &gone[1], &gone[2], &gone[3]];
        let _ = metrics.site_heartbeat_lag.remove_label_values(&l);
        let _ = metrics.site_cert_expiry.remove_label_values(&l);
        for (state, _) in AGENT_STATES {
            let _ = metrics
                .site_agents
                .remove_label_values(&[l[0], l[1], l[2], l[3], state]);
        }
    }
    *shown = now_shown;
}

/// Makes `nkudo_tenant_isolation_violations_total{tenant,tenant_id,kind}` exist at 0 for every tenant not seen
/// before (tenants are never deleted, so nothing is removed).
async fn init_isolation_series(state: &SharedState, seen: &mut HashSet<String>) -> Result<(), sqlx::Error> {
    let rows = sqlx::query("SELECT id, slug FROM tenants")
        .fetch_all(&state.db.pool)
        .await?;
    for r in rows {
        let id: String = r.try_get(0)?;
        if seen.contains(&id) {
            continue;
        }
        let slug: String = r.try_get(1)?;
        for kind in crate::auth::CROSS_TENANT_KINDS {
            state
                .metrics
                .tenant_isolation_violations
                .with_label_values(&[&slug, &id, kind]);
        }
        seen.insert(id);
    }
    Ok(())
}

/// Recomputes the gauges until `shutdown` turns true: at once, then every `FLEET_GAUGES_INTERVAL`.
pub async fn run(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    state.metrics.agent_cert_ttl.set(state.cfg.agent_cert_ttl.as_secs_f64());
    let mut tick = tokio::time::interval(state.cfg.fleet_gauges_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = HashSet::new();
    let mut tenants_seen = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {}
        }
        match query_sites(&state.db).await {
            Ok(sites) => apply(&state.metrics, &sites, now_ms(), &mut shown),
            Err(e) => tracing::warn!(error = %e, "refreshing the per-site fleet gauges"),
        }
        if let Err(e) = init_isolation_series(&state, &mut tenants_seen).await {
            tracing::warn!(error = %e, "listing tenants for the isolation violation series");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sample;

    fn site(name: &str, oldest: i64, counts: [i64; 3], expiry: i64) -> SiteStats {
        SiteStats {
            tenant_id: "t-id".into(),
            tenant_slug: "acme".into(),
            site_id: format!("{name}-id"),
            site_name: name.into(),
            oldest_contact_ms: oldest,
            online: counts[0],
            degraded: counts[1],
            offline: counts[2],
            earliest_cert_expiry_ms: expiry,
        }
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(lag_seconds(10_500, 10_000), 0.5);
        assert_eq!(lag_seconds(10_000, 12_000), 0.0);
        assert_eq!(lag_seconds(i64::MAX, i64::MIN), i64::MAX as f64 / 1000.0);
    }

    #[test]
    fn sets_every_state_and_removes_vanished_sites() {
        let m = Metrics::new();
        let mut shown = HashSet::new();
        let now = 1_700_000_000_000;
        let sites = [
            site("berlin", now - 42_000, [2, 0, 1], 1_700_086_400_000),
            site("paris", now, [0, 1, 0], 1_700_000_600_000),
        ];
        apply(&m, &sites, now, &mut shown);
        let text = m.render();
        let berlin = [
            ("tenant", "acme"),
            ("site", "berlin"),
            ("tenant_id", "t-id"),
            ("site_id", "berlin-id"),
        ];
        let state = |s: &'static str| {
            let mut l = berlin.to_vec();
            l.push(("state", s));
            l
        };
        assert_eq!(
            sample(&text, "nkudo_site_heartbeat_lag_seconds", &berlin),
            Some(42.0),
            "{text}"
        );
        assert_eq!(sample(&text, "nkudo_site_agents", &state("online")), Some(2.0));
        assert_eq!(
            sample(&text, "nkudo_site_agents", &state("degraded")),
            Some(0.0),
            "a state without agents still has its series:\n{text}"
        );
        assert_eq!(sample(&text, "nkudo_site_agents", &state("offline")), Some(1.0));
        assert_eq!(
            sample(
                &text,
                "nkudo_site_certificate_expiry_earliest_timestamp_seconds",
                &berlin
            ),
            Some(1_700_086_400.0)
        );
        assert_eq!(shown.len(), 2);

        // Paris lost its last agent: its series go, Berlin's stay.
        apply(&m, &sites[..1], now + 1000, &mut shown);
        let text = m.render();
        assert!(!text.contains("site=\"paris\""), "{text}");
        assert_eq!(sample(&text, "nkudo_site_heartbeat_lag_seconds", &berlin), Some(43.0));
        assert_eq!(shown.len(), 1);
        apply(&m, &[], now, &mut shown);
        assert!(!m.render().contains("nkudo_site_agents{"), "every site gone");
    }
}
