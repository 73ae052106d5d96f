//! SemVer policy shared by the control plane, the agent and the releaser.
//!
//! The one rule everything uses: a control plane of minor N supports agents of the same major whose minor is
//! N or N-1 ([`is_agent_supported`]); [`minimum_supported_agent_version`] is what the heartbeat answer carries.

use semver::Version;
use std::fmt;

/// Errors of version parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("invalid version {input:?}: {reason}")]
    Invalid { input: String, reason: String },
}

/// Parses a version, with or without a leading `v` (`v1.2.3`, `1.2.3-pre.4+abc1234`).
pub fn parse(input: &str) -> Result<Version, VersionError> {
    let trimmed = input.trim();
    let bare = trimmed.strip_prefix('v').unwrap_or(trimmed);
    Version::parse(bare).map_err(|e| VersionError::Invalid {
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// Release channel of a version: anything with a pre-release part is a pre-release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    PreRelease,
    Release,
}

impl Channel {
    pub fn of(v: &Version) -> Channel {
        if v.pre.is_empty() {
            Channel::Release
        } else {
            Channel::PreRelease
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::PreRelease => "pre-release",
            Channel::Release => "release",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The oldest agent version a control plane of version `control_plane` supports (N/N-1 rule):
/// same major, minor at least the control plane's minor minus one.
pub fn minimum_supported_agent_version(control_plane: &Version) -> Version {
    Version::new(control_plane.major, control_plane.minor.saturating_sub(1), 0)
}

/// Whether an agent of version `agent` is supported by a control plane of version `control_plane`:
/// same major and a minor of N or N-1 (pre-releases count by their major and minor).
pub fn is_agent_supported(control_plane: &Version, agent: &Version) -> bool {
    agent.major == control_plane.major && agent.minor <= control_plane.minor && agent.minor + 1 >= control_plane.minor
}

/// Like [`is_agent_supported`] for a version string as an agent reports it; a version that does not parse
/// (for example `dev` from an unversioned build of the earlier agent) is unsupported.
pub fn is_agent_version_supported(control_plane: &Version, agent: &str) -> bool {
    parse(agent)
        .map(|a| is_agent_supported(control_plane, &a))
        .unwrap_or(false)
}

/// The agent versions a control plane accepts: the N/N-1 rule, optionally raised by an operator-set floor
/// (for example after a security fix: "nothing below 1.4.2"). The floor can only narrow the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupportPolicy {
    control_plane: Version,
    minimum: Version,
}

impl SupportPolicy {
    pub fn new(control_plane: Version, floor: Option<Version>) -> SupportPolicy {
        let rule = minimum_supported_agent_version(&control_plane);
        let minimum = match floor {
            Some(f) if f > rule => f,
            _ => rule,
        };
        SupportPolicy { control_plane, minimum }
    }

    pub fn control_plane(&self) -> &Version {
        &self.control_plane
    }

    /// What the heartbeat and enrollment answers call `minimum_supported_agent_version`.
    pub fn minimum(&self) -> &Version {
        &self.minimum
    }

    pub fn supports(&self, agent: &Version) -> bool {
        is_agent_supported(&self.control_plane, agent) && *agent >= self.minimum
    }

    /// As [`SupportPolicy::supports`] for a reported version string; one that does not parse is unsupported.
    pub fn supports_str(&self, agent: &str) -> bool {
        parse(agent).map(|a| self.supports(&a)).unwrap_or(false)
    }

    /// Whether a (parsable) agent version is below the minimum: such an agent is refused at enrollment.
    pub fn is_below_minimum(&self, agent: &Version) -> bool {
        *agent < self.minimum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        parse(s).unwrap()
    }

    #[test]
    fn parses_with_and_without_v() {
        assert_eq!(v("v1.2.3"), Version::new(1, 2, 3));
        assert_eq!(v("1.2.3"), Version::new(1, 2, 3));
        assert!(parse("dev").is_err());
        assert!(parse("").is_err());
        assert_eq!(Channel::of(&v("v1.3.0-pre.4+abc1234")), Channel::PreRelease);
        assert_eq!(Channel::of(&v("v1.3.0")), Channel::Release);
    }

    #[test]
    fn n_minus_one_boundaries() {
        let cp = v("1.5.2");
        assert_eq!(minimum_supported_agent_version(&cp), Version::new(1, 4, 0));
        assert!(is_agent_supported(&cp, &v("1.5.0")));
        assert!(is_agent_supported(&cp, &v("1.5.9")));
        assert!(is_agent_supported(&cp, &v("1.4.0")));
        assert!(is_agent_supported(&cp, &v("1.4.0-pre.1+abc")));
        assert!(!is_agent_supported(&cp, &v("1.3.99")));
        assert!(
            !is_agent_supported(&cp, &v("1.6.0")),
            "an agent newer than the control plane"
        );
        assert!(!is_agent_supported(&cp, &v("2.5.0")), "another major");
        assert!(!is_agent_supported(&cp, &v("0.5.0")), "another major");
    }

    #[test]
    fn minor_zero_supports_only_itself() {
        let cp = v("2.0.1");
        assert_eq!(minimum_supported_agent_version(&cp), Version::new(2, 0, 0));
        assert!(is_agent_supported(&cp, &v("2.0.0")));
        assert!(!is_agent_supported(&cp, &v("1.9.0")));
    }

    #[test]
    fn unparsable_agent_version_is_unsupported() {
        let cp = v("0.1.0");
        assert!(!is_agent_version_supported(&cp, "dev"));
        assert!(!is_agent_version_supported(&cp, "mvp1"));
        assert!(is_agent_version_supported(&cp, "v0.1.0"));
        assert!(is_agent_version_supported(&cp, "0.0.7"));
    }

    #[test]
    fn a_floor_only_narrows_the_rule() {
        let cp = v("1.5.0");
        let p = SupportPolicy::new(cp.clone(), None);
        assert_eq!(p.minimum(), &Version::new(1, 4, 0));
        let p = SupportPolicy::new(cp.clone(), Some(v("1.4.2")));
        assert_eq!(p.minimum(), &Version::new(1, 4, 2));
        assert!(!p.supports(&v("1.4.1")));
        assert!(p.is_below_minimum(&v("1.4.1")));
        assert!(p.supports(&v("1.4.2")));
        assert!(p.supports_str("v1.5.3"));
        assert!(!p.supports_str("dev"));
        let p = SupportPolicy::new(cp, Some(v("1.0.0")));
        assert_eq!(
            p.minimum(),
            &Version::new(1, 4, 0),
            "a floor below the rule changes nothing"
        );
    }
}
