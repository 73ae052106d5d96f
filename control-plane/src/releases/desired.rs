//! Desired agent versions: the entries (per agent, site, ring or fleet), the resolution rule, and an in-memory
//! snapshot of entries, releases and labels that the heartbeat path reads without a query.
//!
//! Resolution for an agent: its `agent` entry, else its site's, else its ring's (effective `ring` label: the
//! agent's own label over its site's), else the `fleet` entry. Cleared entries keep their row with an empty
//! version, so that other replicas see the change through `set_at` (incremental refresh every second).

use nkudo_core::api::{DesiredScope, LABEL_ENVIRONMENT, LABEL_RING};
use sqlx::{AnyPool, Row};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::RwLock;

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub scope: DesiredScope,
    pub target: String,
    pub version: String,
    pub rollback: bool,
    pub set_by: String,
    pub set_at: i64,
}

/// What resolution needs to know about an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPlace {
    pub site_id: String,
    pub tenant_id: String,
    /// Effective labels (site overlaid by agent).
    pub labels: BTreeMap<String, String>,
}

impl AgentPlace {
    pub fn ring(&self) -> Option<&str> {
        self.labels.get(LABEL_RING).map(String::as_str)
    }
    pub fn environment(&self) -> Option<&str> {
        self.labels.get(LABEL_ENVIRONMENT).map(String::as_str)
    }
}

pub fn parse_scope(s: &str) -> Option<DesiredScope> {
    Some(match s {
        "fleet" => DesiredScope::Fleet,
        "ring" => DesiredScope::Ring,
        "site" => DesiredScope::Site,
        "agent" => DesiredScope::Agent,
        _ => return None,
    })
}

/// The entries, keyed by (scope, target).
pub type Entries = HashMap<(DesiredScope, String), Entry>;

/// Resolves the desired entry of an agent (pure).
pub fn resolve<'a>(entries: &'a Entries, agent_id: &str, place: &AgentPlace) -> Option<&'a Entry> {
    let get = |scope: DesiredScope, target: &str| {
        entries
            .get(&(scope, target.to_string()))
            .filter(|e| !e.version.is_empty())
    };
    get(DesiredScope::Agent, agent_id)
        .or_else(|| get(DesiredScope::Site, &place.site_id))
        .or_else(|| place.ring().and_then(|r| get(DesiredScope::Ring, r)))
        .or_else(|| get(DesiredScope::Fleet, ""))
}

/// Effective labels: the site's overlaid with the agent's own.
pub fn effective_labels(site_json: &str, agent_json: &str) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = serde_json::from_str(site_json).unwrap_or_default();
    let own: BTreeMap<String, String> = serde_json::from_str(agent_json).unwrap_or_default();
    labels.extend(own);
    labels
}

/// A published release as the heartbeat path needs it.
#[derive(Debug, Clone)]
pub struct ReleaseSummary {
    pub version: String,
    pub channel: String,
    pub manifest: String,
    pub signature: String,
    pub bad: bool,
    pub external_base_url: Option<String>,
    /// nkudo-edge linux tarballs by arch: (name, size, sha256, uploaded).
    pub edge_tarballs: HashMap<String, (String, u64, String, bool)>,
}

/// The snapshot.
#[derive(Default)]
pub struct DesiredCache {
    entries: RwLock<Entries>,
    releases: RwLock<HashMap<String, ReleaseSummary>>,
    places: RwLock<HashMap<String, AgentPlace>>,
    watermark: AtomicI64,
}

/// How far back an incremental refresh looks past its watermark (clock skew between replicas).
const OVERLAP_MS: i64 = 5_000;

impl DesiredCache {
    /// Loads everything (start-up).
    pub async fn load(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        self.refresh_entries(pool, true).await?;
        self.refresh_releases(pool).await?;
        self.refresh_places(pool).await
    }

    /// New and changed entries since the last refresh (every second).
    pub async fn refresh_entries(&self, pool: &AnyPool, full: bool) -> Result<(), sqlx::Error> {
        let since = if full {
            i64::MIN
        } else {
            self.watermark.load(Ordering::Relaxed) - OVERLAP_MS
        };
        let rows = sqlx::query(
            "SELECT scope, target, version, rollback, set_by, set_at FROM desired_versions WHERE set_at >= $1",
        )
        .bind(since)
        .fetch_all(pool)
        .await?;
        let mut max = self.watermark.load(Ordering::Relaxed);
        let mut fresh = Vec::with_capacity(rows.len());
        for r in rows {
            let scope: String = r.try_get(0)?;
            let Some(scope) = parse_scope(&scope) else { continue };
            let rollback: i64 = r.try_get(3)?;
            let e = Entry {
                scope,
                target: r.try_get(1)?,
                version: r.try_get(2)?,
                rollback: rollback != 0,
                set_by: r.try_get(4)?,
                set_at: r.try_get(5)?,
            };
            max = max.max(e.set_at);
            fresh.push(e);
        }
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if full {
            map.clear();
        }
        for e in fresh {
            map.insert((e.scope, e.target.clone()), e);
        }
        self.watermark.store(max, Ordering::Relaxed);
        Ok(())
    }

    /// Every release (small: manifests only, never artifact bytes).
    pub async fn refresh_releases(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        let rows = sqlx::query("SELECT version, channel, manifest, signature, bad, external_base_url FROM releases")
            .fetch_all(pool)
            .await?;
        let arts = sqlx::query(
            "SELECT version, name, arch, size, sha256, CASE WHEN content IS NULL THEN 0 ELSE 1 END FROM \
             release_artifacts WHERE component = 'nkudo-edge' AND kind = 'tarball' AND os = 'linux'",
        )
        .fetch_all(pool)
        .await?;
        let mut out: HashMap<String, ReleaseSummary> = HashMap::new();
        for r in rows {
            let bad: i64 = r.try_get(4)?;
            let version: String = r.try_get(0)?;
            out.insert(
                version.clone(),
                ReleaseSummary {
                    version,
                    channel: r.try_get(1)?,
                    manifest: r.try_get(2)?,
                    signature: r.try_get(3)?,
                    bad: bad != 0,
                    external_base_url: r.try_get(5)?,
                    edge_tarballs: HashMap::new(),
                },
            );
        }
        for a in arts {
            let version: String = a.try_get(0)?;
            let size: i64 = a.try_get(3)?;
            let uploaded: i64 = a.try_get(5)?;
            if let Some(rel) = out.get_mut(&version) {
                rel.edge_tarballs.insert(
                    a.try_get(2)?,
                    (a.try_get(1)?, size.max(0) as u64, a.try_get(4)?, uploaded != 0),
                );
            }
        }
        *self.releases.write().unwrap_or_else(|p| p.into_inner()) = out;
        Ok(())
    }

    /// Every agent's site and effective labels (labels change rarely: every 30 s, and at once for writes
    /// made by this replica through [`DesiredCache::refresh_places`]).
    pub async fn refresh_places(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT a.id, a.site_id, a.tenant_id, s.labels_json, a.labels_json FROM agents a \
             JOIN sites s ON s.id = a.site_id WHERE a.revoked_at IS NULL",
        )
        .fetch_all(pool)
        .await?;
        let mut map = HashMap::with_capacity(rows.len());
        for r in rows {
            let site_labels: String = r.try_get(3)?;
            let agent_labels: String = r.try_get(4)?;
            map.insert(
                r.try_get::<String, _>(0)?,
                AgentPlace {
                    site_id: r.try_get(1)?,
                    tenant_id: r.try_get(2)?,
                    labels: effective_labels(&site_labels, &agent_labels),
                },
            );
        }
        *self.places.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Records an entry written by this replica at once.
    pub fn put(&self, e: Entry) {
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        map.insert((e.scope, e.target.clone()), e);
    }

    pub fn place(&self, agent_id: &str) -> Option<AgentPlace> {
        self.places.read().ok()?.get(agent_id).cloned()
    }

    pub fn set_place(&self, agent_id: &str, place: AgentPlace) {
        if let Ok(mut m) = self.places.write() {
            m.insert(agent_id.to_string(), place);
        }
    }

    /// The resolved entry of an agent.
    pub fn resolve(&self, agent_id: &str, place: &AgentPlace) -> Option<Entry> {
        let map = self.entries.read().ok()?;
        resolve(&map, agent_id, place).cloned()
    }

    pub fn release(&self, version: &str) -> Option<ReleaseSummary> {
        self.releases.read().ok()?.get(version).cloned()
    }

    /// Every live entry, and how many agents currently resolve to each.
    pub fn entries_with_counts(&self) -> Vec<(Entry, i64)> {
        let entries = self.entries.read().map(|m| m.clone()).unwrap_or_default();
        let places = self.places.read().map(|m| m.clone()).unwrap_or_default();
        let mut counts: HashMap<(DesiredScope, String), i64> = HashMap::new();
        for (id, place) in &places {
            if let Some(e) = resolve(&entries, id, place) {
                *counts.entry((e.scope, e.target.clone())).or_default() += 1;
            }
        }
        let mut out: Vec<(Entry, i64)> = entries
            .into_values()
            .filter(|e| !e.version.is_empty())
            .map(|e| {
                let n = counts.get(&(e.scope, e.target.clone())).copied().unwrap_or(0);
                (e, n)
            })
            .collect();
        out.sort_by(|a, b| (a.0.scope.as_str(), &a.0.target).cmp(&(b.0.scope.as_str(), &b.0.target)));
        out
    }

    /// Agents (id, place) an entry of `scope`/`target` covers, whatever more specific entries say (the strict
    /// view the pre-release ban uses).
    pub fn agents_in_scope(&self, scope: DesiredScope, target: &str) -> Vec<(String, AgentPlace)> {
        let places = self.places.read().map(|m| m.clone()).unwrap_or_default();
        places
            .into_iter()
            .filter(|(id, p)| match scope {
                DesiredScope::Fleet => true,
                DesiredScope::Ring => p.ring() == Some(target),
                DesiredScope::Site => p.site_id == target,
                DesiredScope::Agent => id == target,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(scope: DesiredScope, target: &str, version: &str) -> Entry {
        Entry {
            scope,
            target: target.into(),
            version: version.into(),
            rollback: false,
            set_by: "admin".into(),
            set_at: 1,
        }
    }

    #[test]
    fn agent_over_site_over_ring_over_fleet() {
        let place = AgentPlace {
            site_id: "s1".into(),
            tenant_id: "t".into(),
            labels: [("ring".to_string(), "pilot".to_string())].into_iter().collect(),
        };
        let mut entries = Entries::new();
        assert!(resolve(&entries, "a1", &place).is_none());
        for (scope, target, v) in [
            (DesiredScope::Fleet, "", "1.0.0"),
            (DesiredScope::Ring, "pilot", "1.1.0"),
            (DesiredScope::Site, "s1", "1.2.0"),
            (DesiredScope::Agent, "a1", "1.3.0"),
        ] {
            entries.insert((scope, target.to_string()), entry(scope, target, v));
            assert_eq!(resolve(&entries, "a1", &place).unwrap().version, v);
        }
        // Another agent of another ring and site falls to the fleet entry.
        let other = AgentPlace {
            site_id: "s2".into(),
            ..Default::default()
        };
        assert_eq!(resolve(&entries, "a2", &other).unwrap().version, "1.0.0");
        // A cleared entry (empty version) falls through.
        entries.insert((DesiredScope::Agent, "a1".into()), entry(DesiredScope::Agent, "a1", ""));
        assert_eq!(resolve(&entries, "a1", &place).unwrap().version, "1.2.0");
    }

    #[test]
    fn agent_labels_override_site_labels() {
        let l = effective_labels(r#"{"ring":"stable","environment":"production"}"#, r#"{"ring":"lab"}"#);
        assert_eq!(l.get("ring").map(String::as_str), Some("lab"));
        assert_eq!(l.get("environment").map(String::as_str), Some("production"));
        assert!(effective_labels("not json", "{}").is_empty());
    }
}
