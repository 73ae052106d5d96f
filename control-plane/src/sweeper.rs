//! Background upkeep: flushing coalesced heartbeats, marking silent agents OFFLINE (per
//! `HEARTBEAT_OFFLINE_AFTER`), recomputing the connectivity of the sites they belong to, refreshing the
//! agent credential cache and the agents-by-version gauge.

use crate::state::SharedState;
use crate::util::now_ms;
use sqlx::{AnyConnection, Row};
use std::time::Duration;
use tokio::sync::watch;

/// Site connectivity from its non-revoked agents: all online → ONLINE, some → PARTIAL, none → OFFLINE.
pub async fn recompute_site(conn: &mut AnyConnection, site_id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sites SET connectivity_state = CASE \
           WHEN NOT EXISTS (SELECT 1 FROM agents a WHERE a.site_id = sites.id AND a.revoked_at IS NULL \
                            AND a.state = 'ONLINE') THEN 'OFFLINE' \
           WHEN EXISTS (SELECT 1 FROM agents a WHERE a.site_id = sites.id AND a.revoked_at IS NULL \
                        AND a.state <> 'ONLINE') THEN 'PARTIAL' \
           ELSE 'ONLINE' END, \
         last_heartbeat_at = (SELECT MAX(a.last_heartbeat_at) FROM agents a WHERE a.site_id = sites.id), \
         updated_at = $1 WHERE id = $2",
    )
    .bind(now)
    .bind(site_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks agents whose last heartbeat is older than `offline_after` OFFLINE and recomputes their sites.
pub async fn sweep_offline(state: &SharedState) -> Result<usize, sqlx::Error> {
    let now = now_ms();
    let cutoff = now - state.cfg.heartbeat_offline_after.as_millis() as i64;
    let mut tx = state.db.begin_write().await?;
    let sites: Vec<String> = sqlx::query_scalar(
        "UPDATE agents SET state = 'OFFLINE', updated_at = $1 WHERE state <> 'OFFLINE' \
         AND (last_heartbeat_at IS NULL OR last_heartbeat_at < $2) RETURNING site_id",
    )
    .bind(now)
    .bind(cutoff)
    .fetch_all(&mut *tx)
    .await?;
    let n = sites.len();
    let mut sites = sites;
    sites.sort_unstable();
    sites.dedup();
    for site in &sites {
        recompute_site(&mut tx, site, now).await?;
    }
    tx.commit().await?;
    if n > 0 {
        state.metrics.agents_marked_offline.inc_by(n as u64);
        tracing::info!(agents = n, sites = sites.len(), "marked agents offline");
    }
    Ok(n)
}

/// Recomputes `nkudo_agents_by_version` from the database.
pub async fn refresh_version_gauge(state: &SharedState) -> Result<(), sqlx::Error> {
    let rows =
        sqlx::query("SELECT agent_version, COUNT(*) FROM agents WHERE revoked_at IS NULL GROUP BY agent_version")
            .fetch_all(&state.db.pool)
            .await?;
    let gauge = &state.metrics.agents_by_version;
    gauge.reset();
    for r in rows {
        let version: String = r.try_get(0)?;
        let count: i64 = r.try_get(1)?;
        let supported = state.policy.supports_str(&version);
        gauge
            .with_label_values(&[version.as_str(), if supported { "true" } else { "false" }])
            .set(count);
    }
    Ok(())
}

/// Runs every periodic task until `shutdown` turns true, then flushes heartbeats one last time.
pub async fn run(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let mut flush = tokio::time::interval(state.cfg.heartbeat_flush_interval);
    let sweep_every = state.cfg.offline_sweep_interval;
    let mut sweep = tokio::time::interval(if sweep_every.is_zero() {
        Duration::from_secs(3600)
    } else {
        sweep_every
    });
    let mut cache = tokio::time::interval(Duration::from_secs(1));
    let mut gauge = tokio::time::interval(Duration::from_secs(15));
    for t in [&mut flush, &mut sweep, &mut cache, &mut gauge] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = flush.tick() => {
                if let Err(e) = crate::heartbeat_buffer::flush(&state.heartbeats, &state.db, &state.metrics).await {
                    tracing::error!(error = %e, "flushing heartbeats");
                }
            }
            _ = sweep.tick(), if !sweep_every.is_zero() => {
                // Write what is buffered first, so that a live agent is never swept for our own delay.
                if let Err(e) = crate::heartbeat_buffer::flush(&state.heartbeats, &state.db, &state.metrics).await {
                    tracing::error!(error = %e, "flushing heartbeats");
                } else if let Err(e) = sweep_offline(&state).await {
                    tracing::error!(error = %e, "offline sweep");
                }
            }
            _ = cache.tick() => {
                if let Err(e) = state.agents.refresh_changed(&state.db).await {
                    tracing::warn!(error = %e, "refreshing agent credentials");
                }
                state.enroll_limiter.housekeep();
                if let Err(e) = state.open_plan_sites.refresh(&state.db).await {
                    tracing::warn!(error = %e, "refreshing sites with open plans");
                }
            }
            _ = gauge.tick() => {
                if let Err(e) = refresh_version_gauge(&state).await {
                    tracing::warn!(error = %e, "refreshing agent version gauge");
                }
            }
        }
    }
    if let Err(e) = crate::heartbeat_buffer::flush(&state.heartbeats, &state.db, &state.metrics).await {
        tracing::error!(error = %e, "final heartbeat flush");
    }
}
