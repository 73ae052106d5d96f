//! The dry run: which agents each stage of a policy would select now, and what would stop the rollout from
//! starting. `POST /admin/rollouts/plan` answers with it; `POST /admin/rollouts` refuses what it refuses.

use super::source::Source;
use super::store::FleetAgent;
use nkudo_core::api::{PlannedStage, RolloutPlan, ENVIRONMENT_PRODUCTION};
use nkudo_core::rollout::machine::on_version;
use nkudo_core::rollout::select::AgentFacts;
use nkudo_core::rollout::Policy;
use nkudo_core::version::Channel;
use std::collections::{BTreeMap, HashSet};

/// Why a policy cannot start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A pre-release would reach production agents (stage name, count).
    PrereleaseInProduction(String, usize),
    /// A trigger needs Prometheus and none is configured.
    NeedsPrometheus(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PrereleaseInProduction(stage, n) => write!(
                f,
                "stage {stage} would put a pre-release on {n} production agent(s); promote it to a release first"
            ),
            Refusal::NeedsPrometheus(t) => write!(
                f,
                "trigger {t} has only a PromQL query and no PROMETHEUS_URL is configured (the builtin source \
                 computes only the built-in metrics)"
            ),
        }
    }
}

fn facts(a: &FleetAgent) -> AgentFacts<'_> {
    AgentFacts {
        agent_id: &a.id,
        tenant_id: &a.tenant_id,
        tenant_slug: &a.tenant_slug,
        site_id: &a.site_id,
        site_name: &a.site_name,
        ring: a.ring.as_deref(),
        environment: a.environment.as_deref(),
    }
}

/// Plans `policy` over `fleet` (stages take agents in order; an agent belongs to the first stage selecting it).
pub fn plan(policy: &Policy, fleet: &[FleetAgent], source: &Source) -> (RolloutPlan, Vec<Refusal>) {
    let salt = policy.version.to_string();
    let pre = Channel::of(&policy.version) == Channel::PreRelease;
    let mut taken: HashSet<&str> = HashSet::new();
    let mut stages = Vec::new();
    let mut refusals = Vec::new();
    let mut warnings = Vec::new();
    for s in &policy.stages {
        let mut agents = 0i64;
        let mut already = 0i64;
        let mut prod = 0usize;
        let mut sites: BTreeMap<String, i64> = BTreeMap::new();
        for a in fleet {
            if taken.contains(a.id.as_str()) || !s.selector.selects(&salt, &facts(a)) {
                continue;
            }
            taken.insert(a.id.as_str());
            agents += 1;
            *sites.entry(a.site_id.clone()).or_default() += 1;
            if nkudo_core::version::parse(&a.agent_version)
                .ok()
                .is_some_and(|v| on_version(Some(&v), &policy.version))
            {
                already += 1;
            }
            if a.environment.as_deref() == Some(ENVIRONMENT_PRODUCTION) {
                prod += 1;
            }
        }
        if pre && prod > 0 {
            refusals.push(Refusal::PrereleaseInProduction(s.name.clone(), prod));
        }
        if agents == 0 {
            warnings.push(format!("stage {} selects no agent now", s.name));
        }
        for t in &s.analysis {
            if !source.supports(t) {
                let r = Refusal::NeedsPrometheus(t.name.clone());
                if !refusals.contains(&r) {
                    refusals.push(r);
                }
            }
        }
        stages.push(PlannedStage {
            name: s.name.clone(),
            agents,
            already_on_version: already,
            sites,
            manual_gate: s.manual_gate,
            bake_seconds: s.bake.as_secs(),
            report_timeout_seconds: s.report_timeout.as_secs(),
            triggers: s.analysis.iter().map(|t| t.name.clone()).collect(),
        });
    }
    let unselected = fleet.len() as i64 - taken.len() as i64;
    (
        RolloutPlan {
            version: policy.version.to_string(),
            metrics_source: source.name().to_string(),
            stages,
            unselected_agents: unselected,
            warnings,
        },
        refusals,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkudo_core::rollout::parse_policy;

    fn agent(id: &str, ring: &str, env: &str, version: &str) -> FleetAgent {
        FleetAgent {
            id: id.into(),
            tenant_id: "t".into(),
            tenant_slug: "acme".into(),
            site_id: format!("site-{ring}"),
            site_name: ring.into(),
            ring: Some(ring.into()),
            environment: Some(env.into()),
            agent_version: version.into(),
        }
    }

    #[test]
    fn stages_take_agents_in_order_and_prereleases_stay_out_of_production() {
        let fleet = vec![
            agent("a", "lab", "test", "1.3.0"),
            agent("b", "pilot", "test", "1.4.0"),
            agent("c", "stable", "production", "1.3.0"),
            agent("d", "other", "dev", "1.3.0"),
        ];
        let p = parse_policy(
            "version = \"1.4.0\"\n[[stage]]\nname = \"lab\"\nrings = [\"lab\", \"pilot\"]\n\
             [[stage]]\nname = \"pilot\"\nrings = [\"pilot\"]\n[[stage]]\nname = \"stable\"\nrings = [\"stable\"]\n",
        )
        .unwrap();
        let (planned, refusals) = plan(&p, &fleet, &Source::Builtin);
        assert!(refusals.is_empty());
        let counts: Vec<(i64, i64)> = planned
            .stages
            .iter()
            .map(|s| (s.agents, s.already_on_version))
            .collect();
        assert_eq!(counts, vec![(2, 1), (0, 0), (1, 0)]);
        assert_eq!(planned.unselected_agents, 1);
        assert!(planned.warnings[0].contains("pilot"));

        let pre = parse_policy("version = \"1.5.0-pre.1+abc1234\"\n[[stage]]\nname = \"all\"\n").unwrap();
        let (_, refusals) = plan(&pre, &fleet, &Source::Builtin);
        assert_eq!(refusals, vec![Refusal::PrereleaseInProduction("all".into(), 1)]);
    }
}
