//! What a heartbeat answer says about versions: the agent's desired version and, when it runs another one, the
//! update offer (signed manifest, signature, where to fetch the artifact of its architecture); and what the
//! control plane records from the agent's `update` status (upgrade outcomes once per attempt, restarts).

use super::desired::{effective_labels, AgentPlace};
use super::release_arch;
use crate::state::SharedState;
use crate::util::now_ms;
use nkudo_core::api::{ArtifactLocation, UpdateOffer, UpdateStatus, ENVIRONMENT_PRODUCTION};
use nkudo_core::version::Channel;
use sqlx::Row;

/// The agent's place (site, tenant, effective labels), from the snapshot or, for an agent the snapshot has not
/// seen yet, from the database.
pub async fn place_of(state: &SharedState, agent_id: &str) -> Result<Option<AgentPlace>, sqlx::Error> {
    if let Some(p) = state.desired.place(agent_id) {
        return Ok(Some(p));
    }
    let row = sqlx::query(
        "SELECT a.site_id, a.tenant_id, s.labels_json, a.labels_json FROM agents a JOIN sites s ON s.id = a.site_id \
         WHERE a.id = $1",
    )
    .bind(agent_id)
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let site_labels: String = r.try_get(2)?;
    let agent_labels: String = r.try_get(3)?;
    let place = AgentPlace {
        site_id: r.try_get(0)?,
        tenant_id: r.try_get(1)?,
        labels: effective_labels(&site_labels, &agent_labels),
    };
    state.desired.set_place(agent_id, place.clone());
    Ok(Some(place))
}

/// The desired version and the offer for an agent reporting `running` on `arch`.
pub fn offer_for(
    state: &SharedState,
    agent_id: &str,
    place: &AgentPlace,
    running: &str,
    arch: Option<&str>,
) -> (Option<String>, Option<UpdateOffer>) {
    let Some(entry) = state.desired.resolve(agent_id, place) else {
        return (None, None);
    };
    let desired = Some(entry.version.clone());
    let same = match (
        nkudo_core::version::parse(&entry.version),
        nkudo_core::version::parse(running),
    ) {
        (Ok(a), Ok(b)) => nkudo_core::version::compare(&a, &b).is_eq(),
        _ => entry.version == running,
    };
    if same {
        return (desired, None);
    }
    let Some(rel) = state.desired.release(&entry.version) else {
        return (desired, None);
    };
    if rel.bad {
        return (desired, None);
    }
    let pre = rel.channel == Channel::PreRelease.as_str();
    if pre && place.environment() == Some(ENVIRONMENT_PRODUCTION) {
        // Defence in depth: the entry was accepted, but labels changed since (or it was set around the check).
        state.metrics.prerelease_offers_refused.inc();
        tracing::warn!(agent = agent_id, version = %rel.version, "not offering a pre-release to a production agent");
        return (desired, None);
    }
    let Some(arch) = arch.map(release_arch) else {
        return (desired, None);
    };
    let Some((name, size, sha256, uploaded)) = rel.edge_tarballs.get(arch).cloned() else {
        return (desired, None);
    };
    let url = if uploaded {
        format!("/v1/releases/{}/artifacts/{name}", rel.version)
    } else if let Some(base) = &rel.external_base_url {
        format!("{base}/{name}")
    } else {
        return (desired, None);
    };
    (
        desired,
        Some(UpdateOffer {
            version: rel.version.clone(),
            rollback: entry.rollback,
            manifest: rel.manifest.clone(),
            manifest_signature: rel.signature.clone(),
            artifact: ArtifactLocation {
                name,
                size,
                sha256,
                url,
            },
        }),
    )
}

/// Records an outcome once per attempt (`agent_upgrades`, `nkudo_agent_upgrades_total`) and counts restarts of
/// the agent's version (`nkudo_agent_restarts_total`), each once across replicas.
pub async fn record_status(
    state: &SharedState,
    agent_id: &str,
    tenant_id: &str,
    status: &UpdateStatus,
) -> Result<(), sqlx::Error> {
    if status.phase.is_outcome() {
        if let (Some(to), Some(started)) = (&status.attempt_to, &status.attempt_started_at) {
            let key = format!("{agent_id}\u{0}{to}\u{0}{started}");
            if state.recorded_outcomes.insert_new(&key) {
                let result = status.phase.as_str();
                let r = sqlx::query(
                    "INSERT INTO agent_upgrades (agent_id, tenant_id, from_version, to_version, result, error, \
                     attempt_started_at, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (agent_id, to_version, attempt_started_at) DO NOTHING",
                )
                .bind(agent_id)
                .bind(tenant_id)
                .bind(&status.attempt_from)
                .bind(to)
                .bind(result)
                .bind(
                    status
                        .last_error
                        .as_ref()
                        .map(|e| e.chars().take(MAX_ERROR_CHARS).collect::<String>()),
                )
                .bind(started)
                .bind(now_ms())
                .execute(&state.db.pool)
                .await?;
                if r.rows_affected() == 1 {
                    let from = status.attempt_from.as_deref().unwrap_or("");
                    state
                        .metrics
                        .agent_upgrades
                        .with_label_values(&[from, to.as_str(), result])
                        .inc();
                }
            }
        }
    }
    let restarts = status.restarts.min(i64::MAX as u64) as i64;
    if state.recorded_outcomes.restarts_to_write(agent_id, restarts) {
        let old: Option<i64> = sqlx::query_scalar("SELECT update_restarts FROM agents WHERE id = $1")
            .bind(agent_id)
            .fetch_optional(&state.db.pool)
            .await?;
        if let Some(old) = old {
            if old != restarts {
                let r = sqlx::query("UPDATE agents SET update_restarts = $1 WHERE id = $2 AND update_restarts = $3")
                    .bind(restarts)
                    .bind(agent_id)
                    .bind(old)
                    .execute(&state.db.pool)
                    .await?;
                let new = restarts_since(old, restarts);
                if r.rows_affected() == 1 && new > 0 {
                    state
                        .metrics
                        .agent_restarts
                        .with_label_values(&[status.current_version.as_str()])
                        .inc_by(new);
                }
            }
        }
    }
    Ok(())
}

/// Restarts that happened between a stored count and a reported one. The count belongs to the installed version
/// and starts again at 0 with the next one, so a lower report is a new installation that restarted `reported`
/// times (a reset to 0 is stored too, so that the new version's first restart counts).
pub fn restarts_since(stored: i64, reported: i64) -> u64 {
    if reported >= stored {
        (reported - stored) as u64
    } else {
        reported.max(0) as u64
    }
}

/// Longest text kept from an agent's update status (`last_error`); versions and times are shorter.
const MAX_ERROR_CHARS: usize = 2000;
const MAX_FIELD_CHARS: usize = 255;

/// The update status with every text cut to a bounded length, as stored and recorded (an agent's error text can
/// be long; nothing it sends is refused for that).
pub fn bounded(mut s: UpdateStatus) -> UpdateStatus {
    fn cut(v: &mut String, n: usize) {
        if let Some((i, _)) = v.char_indices().nth(n) {
            v.truncate(i);
        }
    }
    cut(&mut s.current_version, MAX_FIELD_CHARS);
    for v in [
        &mut s.previous_version,
        &mut s.desired_version,
        &mut s.attempt_from,
        &mut s.attempt_to,
        &mut s.attempt_started_at,
    ]
    .into_iter()
    .flatten()
    {
        cut(v, MAX_FIELD_CHARS);
    }
    if let Some(e) = &mut s.last_error {
        cut(e, MAX_ERROR_CHARS);
    }
    s
}

/// Per-replica memory that keeps the heartbeat path from writing what it already wrote.
#[derive(Default)]
pub struct Recorded {
    outcomes: std::sync::Mutex<std::collections::HashSet<String>>,
    restarts: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

/// Forget everything past this many entries (a bound on memory; forgetting only costs a no-op insert).
const MAX_REMEMBERED: usize = 200_000;

impl Recorded {
    fn insert_new(&self, key: &str) -> bool {
        let mut set = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() > MAX_REMEMBERED {
            set.clear();
        }
        set.insert(key.to_string())
    }

    /// Whether a reported restart count must be compared with the stored one: it changed since this replica last
    /// saw it. A count of 0 is written only as the reset after a count above 0 seen here, so that the first
    /// heartbeats after a start-up (almost all at 0) cost no query; a reset nobody saw is still recognised when
    /// the new version's count comes in below the stored one ([`restarts_since`]).
    fn restarts_to_write(&self, agent_id: &str, restarts: i64) -> bool {
        let mut map = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_REMEMBERED {
            map.clear();
        }
        match map.insert(agent_id.to_string(), restarts) {
            Some(prev) if prev == restarts => false,
            Some(prev) => restarts > 0 || prev > 0,
            None => restarts > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_count_from_the_stored_value_and_from_zero_after_a_reset() {
        assert_eq!(restarts_since(0, 0), 0);
        assert_eq!(restarts_since(0, 2), 2);
        assert_eq!(restarts_since(2, 5), 3);
        // A new version was installed: its count started again at 0.
        assert_eq!(restarts_since(5, 0), 0);
        assert_eq!(restarts_since(5, 1), 1);
        assert_eq!(restarts_since(5, -1), 0);
    }

    #[test]
    fn restart_counts_worth_a_query() {
        let r = Recorded::default();
        assert!(!r.restarts_to_write("a", 0), "0 after a start-up: no query");
        assert!(!r.restarts_to_write("a", 0));
        assert!(r.restarts_to_write("a", 1));
        assert!(!r.restarts_to_write("a", 1));
        assert!(r.restarts_to_write("a", 2));
        assert!(r.restarts_to_write("a", 0), "the reset after a count above 0 is stored");
        assert!(!r.restarts_to_write("a", 0));
        assert!(r.restarts_to_write("b", 3));
    }

    #[test]
    fn status_texts_are_bounded() {
        let s = bounded(UpdateStatus {
            current_version: "1".repeat(300),
            last_error: Some("é".repeat(5000)),
            attempt_to: Some("2.0.0".into()),
            ..Default::default()
        });
        assert_eq!(s.current_version.len(), 255);
        assert_eq!(s.last_error.as_deref().map(|e| e.chars().count()), Some(2000));
        assert_eq!(s.attempt_to.as_deref(), Some("2.0.0"));
    }
}
