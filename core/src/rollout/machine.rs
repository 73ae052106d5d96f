//! The rollout controller's decisions for one stage, as a pure function of what it knows (so that every rule is
//! unit-tested here and the control plane only loads facts, applies steps and records them).
//!
//! A stage goes `pending → switching → baking → done`:
//!
//! * **switching**: the stage's members (agents it selects that no earlier stage selected) get the new version
//!   as their desired version, in batches capped by the blast radius (`max_concurrent` agents switching at
//!   once, `max_concurrent_per_site` per site; an agent is "switching" from the moment its desired version is
//!   set until it reports the new version). Members are taken in a stable order (their percentage bucket,
//!   then id), so a restarted controller picks the same ones.
//! * An agent that does not report the new version within `report_timeout` of being switched fails the stage
//!   (the controller rolls back).
//! * **baking**: once every member reports the new version, the stage bakes for `bake`; the triggers are
//!   evaluated all along (from the first switch), not only while baking.
//! * **done**: the next stage starts, or waits at its manual gate for an approval; after the last, the
//!   rollout is complete.

use super::policy::{Policy, Stage};
use crate::api::UpdatePhase;
use semver::Version;
use std::collections::BTreeMap;

/// One member of the current stage, as the controller loads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub agent_id: String,
    pub site_id: String,
    /// [`super::select::stable_bucket`] of the agent in this rollout (the switching order).
    pub bucket: u64,
    /// The version the agent reports.
    pub reported_version: Option<Version>,
    pub phase: UpdatePhase,
    /// When the rollout set this agent's desired version (Unix ms); `None` while not switched.
    pub switched_at_ms: Option<i64>,
}

/// Where the current stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum StagePhase {
    /// Not started (it may be waiting at its manual gate).
    Pending,
    Switching,
    Baking {
        until_ms: i64,
    },
    Done,
}

/// What the controller does next for the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The stage has a manual gate and no approval yet: wait.
    AwaitApproval,
    /// Start the stage (record its start) and switch.
    Start,
    /// Set the new version as desired for these agents.
    Switch(Vec<String>),
    /// Every member reports the new version: bake until this instant.
    Bake { until_ms: i64 },
    /// The bake is over: the stage is done.
    Finish,
    /// These agents were switched more than `report_timeout` ago and still do not report the version.
    ReportTimeout(Vec<String>),
    /// Nothing to do now.
    Wait,
}

/// Whether `reported` is `target` (build metadata ignored).
pub fn on_version(reported: Option<&Version>, target: &Version) -> bool {
    reported.is_some_and(|r| crate::version::compare(r, target).is_eq())
}

/// The next steps for stage `stage` of `policy` (at most one switching batch per call).
pub fn next_steps(
    policy: &Policy,
    stage: &Stage,
    phase: StagePhase,
    approved: bool,
    members: &[Member],
    now_ms: i64,
) -> Vec<Step> {
    let target = &policy.version;
    match phase {
        StagePhase::Pending => {
            if stage.manual_gate && !approved {
                vec![Step::AwaitApproval]
            } else {
                vec![Step::Start]
            }
        }
        StagePhase::Done => vec![Step::Wait],
        StagePhase::Baking { until_ms } => {
            if now_ms >= until_ms {
                vec![Step::Finish]
            } else {
                vec![Step::Wait]
            }
        }
        StagePhase::Switching => {
            let timeout_ms = stage.report_timeout.as_millis() as i64;
            let late: Vec<String> = members
                .iter()
                .filter(|m| {
                    !on_version(m.reported_version.as_ref(), target)
                        && m.switched_at_ms.is_some_and(|t| now_ms - t > timeout_ms)
                })
                .map(|m| m.agent_id.clone())
                .collect();
            if !late.is_empty() {
                return vec![Step::ReportTimeout(late)];
            }
            // Members already on the version count as done (switched or not).
            let pending: Vec<&Member> = {
                let mut p: Vec<&Member> = members
                    .iter()
                    .filter(|m| m.switched_at_ms.is_none() && !on_version(m.reported_version.as_ref(), target))
                    .collect();
                p.sort_by(|a, b| (a.bucket, &a.agent_id).cmp(&(b.bucket, &b.agent_id)));
                p
            };
            let in_flight: Vec<&Member> = members
                .iter()
                .filter(|m| m.switched_at_ms.is_some() && !on_version(m.reported_version.as_ref(), target))
                .collect();
            if pending.is_empty() && in_flight.is_empty() {
                let bake_ms = stage.bake.as_millis() as i64;
                return vec![Step::Bake {
                    until_ms: now_ms + bake_ms,
                }];
            }
            let mut room = stage
                .max_concurrent
                .map(|n| (n as usize).saturating_sub(in_flight.len()))
                .unwrap_or(usize::MAX);
            let mut per_site: BTreeMap<&str, usize> = BTreeMap::new();
            for m in &in_flight {
                *per_site.entry(m.site_id.as_str()).or_default() += 1;
            }
            let mut batch = Vec::new();
            for m in pending {
                if room == 0 {
                    break;
                }
                let used = per_site.entry(m.site_id.as_str()).or_default();
                if stage.max_concurrent_per_site.is_some_and(|cap| *used >= cap as usize) {
                    continue;
                }
                *used += 1;
                room -= 1;
                batch.push(m.agent_id.clone());
            }
            if batch.is_empty() {
                vec![Step::Wait]
            } else {
                vec![Step::Switch(batch)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::parse_policy;

    fn policy(extra: &str) -> Policy {
        parse_policy(&format!(
            "version = \"1.4.0\"\n[[stage]]\nname = \"s\"\nbake = \"60s\"\nreport_timeout = \"120s\"\n{extra}"
        ))
        .unwrap()
    }

    fn member(id: &str, site: &str, version: &str, switched: Option<i64>) -> Member {
        Member {
            agent_id: id.into(),
            site_id: site.into(),
            bucket: id.bytes().map(|b| b as u64).sum(),
            reported_version: Some(Version::parse(version).unwrap()),
            phase: UpdatePhase::Idle,
            switched_at_ms: switched,
        }
    }

    #[test]
    fn gate_then_start() {
        let p = policy("manual_gate = true\n");
        let s = &p.stages[0];
        assert_eq!(
            next_steps(&p, s, StagePhase::Pending, false, &[], 0),
            vec![Step::AwaitApproval]
        );
        assert_eq!(next_steps(&p, s, StagePhase::Pending, true, &[], 0), vec![Step::Start]);
    }

    #[test]
    fn switches_within_the_blast_radius_then_bakes_then_finishes() {
        let p = policy("max_concurrent = 2\nmax_concurrent_per_site = 1\n");
        let s = &p.stages[0];
        let ms = vec![
            member("a", "s1", "1.3.0", None),
            member("b", "s1", "1.3.0", None),
            member("c", "s2", "1.3.0", None),
            member("d", "s3", "1.3.0", None),
        ];
        // Two at once, at most one per site: a (s1) and c (s2) in bucket order; b waits for a's site.
        let steps = next_steps(&p, s, StagePhase::Switching, false, &ms, 1000);
        assert_eq!(steps, vec![Step::Switch(vec!["a".into(), "c".into()])]);
        // Both in flight: no room.
        let mut ms2 = ms.clone();
        ms2[0].switched_at_ms = Some(1000);
        ms2[2].switched_at_ms = Some(1000);
        assert_eq!(
            next_steps(&p, s, StagePhase::Switching, false, &ms2, 2000),
            vec![Step::Wait]
        );
        // a reports 1.4.0: one slot frees, and s1 is free again: b goes.
        ms2[0].reported_version = Some(Version::parse("1.4.0").unwrap());
        assert_eq!(
            next_steps(&p, s, StagePhase::Switching, false, &ms2, 3000),
            vec![Step::Switch(vec!["b".into()])]
        );
        // Everyone on 1.4.0: bake 60 s.
        let done: Vec<Member> = ms
            .iter()
            .map(|m| Member {
                reported_version: Some(Version::parse("1.4.0+build").unwrap()),
                switched_at_ms: Some(1000),
                ..m.clone()
            })
            .collect();
        assert_eq!(
            next_steps(&p, s, StagePhase::Switching, false, &done, 5000),
            vec![Step::Bake { until_ms: 65_000 }]
        );
        assert_eq!(
            next_steps(&p, s, StagePhase::Baking { until_ms: 65_000 }, false, &done, 64_999),
            vec![Step::Wait]
        );
        assert_eq!(
            next_steps(&p, s, StagePhase::Baking { until_ms: 65_000 }, false, &done, 65_000),
            vec![Step::Finish]
        );
    }

    #[test]
    fn an_agent_late_to_report_fails_the_stage() {
        let p = policy("");
        let s = &p.stages[0];
        let ms = vec![member("a", "s1", "1.3.0", Some(0)), member("b", "s1", "1.4.0", Some(0))];
        assert_eq!(
            next_steps(&p, s, StagePhase::Switching, false, &ms, 120_000),
            vec![Step::Wait]
        );
        assert_eq!(
            next_steps(&p, s, StagePhase::Switching, false, &ms, 120_001),
            vec![Step::ReportTimeout(vec!["a".into()])]
        );
    }

    #[test]
    fn an_empty_stage_bakes_at_once() {
        let p = policy("");
        assert_eq!(
            next_steps(&p, &p.stages[0], StagePhase::Switching, false, &[], 10),
            vec![Step::Bake { until_ms: 60_010 }]
        );
    }
}
