//! Stage membership: which agents a stage selects. Pure functions over the facts the controller loads.
//!
//! A stage's selectors combine with AND; each list matches any of its values; an empty list matches all. The
//! percentage applies last, by a stable hash of the agent id salted with the rollout's version: an agent's
//! bucket never changes during a rollout, so a stage's members do not change between evaluations, and the
//! 10% of one stage is contained in the 50% of a later stage over the same selectors.

use sha2::{Digest, Sha256};

/// What the controller knows about an agent when it selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFacts<'a> {
    pub agent_id: &'a str,
    pub tenant_id: &'a str,
    pub tenant_slug: &'a str,
    pub site_id: &'a str,
    pub site_name: &'a str,
    /// Effective `ring` label.
    pub ring: Option<&'a str>,
    /// Effective `environment` label.
    pub environment: Option<&'a str>,
}

/// The selectors of one stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    pub rings: Vec<String>,
    pub environments: Vec<String>,
    /// Tenant ids or slugs.
    pub tenants: Vec<String>,
    /// Site ids or names.
    pub sites: Vec<String>,
    /// 0 < percent <= 100; `None` is 100.
    pub percent: Option<f64>,
}

/// Buckets are 0..BUCKETS; a percentage p selects buckets below p * BUCKETS / 100.
pub const BUCKETS: u64 = 10_000;

/// The agent's stable bucket for a rollout (salted with the rollout's version).
pub fn stable_bucket(salt: &str, agent_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(agent_id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

impl Selector {
    /// Whether the labels, tenants and sites match (the percentage aside).
    pub fn matches_labels(&self, a: &AgentFacts<'_>) -> bool {
        let any =
            |list: &[String], values: &[&str]| list.is_empty() || list.iter().any(|x| values.contains(&x.as_str()));
        any(&self.rings, &[a.ring.unwrap_or("")])
            && any(&self.environments, &[a.environment.unwrap_or("")])
            && any(&self.tenants, &[a.tenant_id, a.tenant_slug])
            && any(&self.sites, &[a.site_id, a.site_name])
    }

    /// Whether the stage selects this agent in the rollout salted with `salt`.
    pub fn selects(&self, salt: &str, a: &AgentFacts<'_>) -> bool {
        if !self.matches_labels(a) {
            return false;
        }
        match self.percent {
            None => true,
            Some(p) if p >= 100.0 => true,
            Some(p) => (stable_bucket(salt, a.agent_id) as f64) < p * (BUCKETS as f64) / 100.0,
        }
    }

    /// Whether any production agent could match (used to refuse pre-releases in a stage that contains one).
    pub fn may_select_environment(&self, environment: &str) -> bool {
        self.environments.is_empty() || self.environments.iter().any(|e| e == environment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(id: &'a str, ring: &'a str, env: &'a str) -> AgentFacts<'a> {
        AgentFacts {
            agent_id: id,
            tenant_id: "t-1",
            tenant_slug: "acme",
            site_id: "s-1",
            site_name: "berlin",
            ring: Some(ring),
            environment: Some(env),
        }
    }

    #[test]
    fn lists_and_and_or() {
        let s = Selector {
            rings: vec!["lab".into(), "pilot".into()],
            tenants: vec!["acme".into()],
            ..Default::default()
        };
        assert!(s.selects("1.4.0", &facts("a", "lab", "test")));
        assert!(s.selects("1.4.0", &facts("a", "pilot", "production")));
        assert!(!s.selects("1.4.0", &facts("a", "stable", "test")));
        let other_tenant = AgentFacts {
            tenant_slug: "globex",
            tenant_id: "t-2",
            ..facts("a", "lab", "test")
        };
        assert!(!s.selects("1.4.0", &other_tenant));
        let by_site = Selector {
            sites: vec!["berlin".into()],
            ..Default::default()
        };
        assert!(by_site.selects("1.4.0", &facts("a", "x", "y")));
    }

    #[test]
    fn percentages_are_stable_nested_and_close_to_the_share() {
        let ten = Selector {
            percent: Some(10.0),
            ..Default::default()
        };
        let fifty = Selector {
            percent: Some(50.0),
            ..Default::default()
        };
        let ids: Vec<String> = (0..20_000).map(|i| format!("agent-{i}")).collect();
        let mut n10 = 0;
        for id in &ids {
            let f = facts(id, "stable", "production");
            let in10 = ten.selects("1.4.0", &f);
            assert_eq!(in10, ten.selects("1.4.0", &f), "stable between evaluations");
            if in10 {
                n10 += 1;
                assert!(fifty.selects("1.4.0", &f), "10% is inside 50%");
            }
        }
        assert!((1800..2200).contains(&n10), "{n10} of 20000 in 10%");
        // Another rollout picks other canaries.
        let moved = ids
            .iter()
            .filter(|id| {
                let f = facts(id, "stable", "production");
                ten.selects("1.4.0", &f) != ten.selects("1.5.0", &f)
            })
            .count();
        assert!(moved > 1000);
    }
}
