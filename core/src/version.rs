//! SemVer policy shared by the control plane, the agent and the releaser.
//!
//! The one rule everything uses: a control plane of minor N supports agents of the same major whose minor is
//! N or N-1 ([`is_agent_supported`]); [`minimum_supported_agent_version`] is what the heartbeat answer carries.
//!
//! Release versions are `vX.Y.Z` tags. Every other build is a pre-release `v{base}-pre.{count}+{sha}`
//! ([`pre_release`], [`parse_pre_release`]): `base` is the release it leads to ([`pre_release_base`]: the
//! version the workspace declares, or the patch after the latest release when that is higher), `count` the
//! commits since the latest release and `sha` the short commit. A pre-release built after release X.Y.Z thus
//! sorts above X.Y.Z, so agents on X.Y.Z take it as an upgrade and `releaser promote` accepts it. Versions are ordered by SemVer precedence ([`compare`]): build metadata
//! is ignored, a pre-release sorts before its release and `-pre.9` before `-pre.10`. [`is_valid_release_bump`]
//! is the rule `releaser promote` applies, [`display`] the `v`-prefixed form tags and people use.

use semver::Version;
use std::cmp::Ordering;
use std::fmt;

/// Errors of version parsing and of the release policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("invalid version {input:?}: {reason}")]
    Invalid { input: String, reason: String },
    /// [`pre_release`] was given something that cannot make a `v{base}-pre.{count}+{sha}` version.
    #[error("cannot make a pre-release version: {reason}")]
    InvalidPreRelease { reason: String },
    /// [`is_valid_release_bump`]: the proposed release version has a pre-release part or build metadata.
    #[error("{version} is not a release version: {reason}; a release is vX.Y.Z with nothing after the patch number")]
    NotARelease { version: String, reason: String },
    /// [`is_valid_release_bump`]: the proposed release version does not come after the latest release.
    #[error(
        "{next} is not greater than the latest release {latest}; choose a higher version (for example {suggestion}), \
         or promote known-good artifacts under a new patch version with --rollback"
    )]
    NotGreater {
        next: String,
        latest: String,
        suggestion: String,
    },
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

/// A pre-release version `{base}-pre.{count}+{sha}`, taken apart by [`parse_pre_release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreRelease {
    /// The latest full release the build descends from (`0.0.0` when there is none).
    pub base: Version,
    /// Commits since `base`.
    pub count: u64,
    /// Short commit hash: 7 to 12 lowercase hex digits.
    pub sha: String,
}

/// Whether `sha` is a short commit hash as the pre-release format wants it: 7 to 12 lowercase hex digits.
pub fn is_short_sha(sha: &str) -> bool {
    (7..=12).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The base of a pre-release: the release the work leads to. That is the version the workspace declares
/// (`[workspace.package] version`) when it is above the latest release, else the patch after the latest release
/// (the declared version was not bumped yet); with no release yet, the declared version (or `0.0.0`).
/// Pre-release and build parts of the inputs are ignored.
pub fn pre_release_base(latest_release: Option<&Version>, declared: Option<&Version>) -> Version {
    let core = |v: &Version| Version::new(v.major, v.minor, v.patch);
    let next = latest_release.map(|l| Version::new(l.major, l.minor, l.patch + 1));
    match (next, declared.map(core)) {
        // Declared not bumped yet (or behind): the next patch; declared ahead: the declared version.
        (Some(next), Some(d)) => d.max(next),
        (Some(next), None) => next,
        (None, Some(d)) => d,
        (None, None) => Version::new(0, 0, 0),
    }
}

/// Builds the pre-release version `{base}-pre.{count}+{sha}` (shown as `v{base}-pre.{count}+{sha}` by
/// [`display`]). `base` must be a full release (`X.Y.Z`, nothing after it) and `sha` 7 to 12 lowercase hex digits.
pub fn pre_release(base: &Version, count: u64, sha: &str) -> Result<Version, VersionError> {
    if !base.pre.is_empty() || !base.build.is_empty() {
        return Err(VersionError::InvalidPreRelease {
            reason: format!("the base {base} must be a full release X.Y.Z (see pre_release_base)"),
        });
    }
    if !is_short_sha(sha) {
        return Err(VersionError::InvalidPreRelease {
            reason: format!(
                "{sha:?} is not a short commit hash (7 to 12 lowercase hex digits, as `git rev-parse --short`)"
            ),
        });
    }
    let text = format!("{}.{}.{}-pre.{count}+{sha}", base.major, base.minor, base.patch);
    Version::parse(&text).map_err(|e| VersionError::InvalidPreRelease {
        reason: format!("{text}: {e}"),
    })
}

/// Takes a version of the form `{base}-pre.{count}+{sha}` apart; `None` for anything else (a release, another
/// pre-release scheme such as `-rc.1`, a missing or malformed sha).
pub fn parse_pre_release(v: &Version) -> Option<PreRelease> {
    let count = v.pre.as_str().strip_prefix("pre.")?;
    // SemVer already refuses leading zeros in numeric identifiers; refuse anything but plain digits too.
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let count: u64 = count.parse().ok()?;
    let sha = v.build.as_str();
    if !is_short_sha(sha) {
        return None;
    }
    Some(PreRelease {
        base: Version::new(v.major, v.minor, v.patch),
        count,
        sha: sha.to_string(),
    })
}

/// The version as tags and people write it: `v` followed by the full SemVer text, build metadata included
/// (`v1.3.0`, `v1.3.0-pre.4+abc1234`).
pub fn display(v: &Version) -> String {
    format!("v{v}")
}

/// SemVer precedence: major, minor, patch, then the pre-release part (a pre-release sorts before its release,
/// numeric identifiers compare as numbers so `-pre.9` < `-pre.10`). Build metadata is ignored, so two builds
/// differing only in it compare `Equal` (unlike `Version`'s own `Ord`, which breaks the tie on it).
pub fn compare(a: &Version, b: &Version) -> Ordering {
    a.cmp_precedence(b)
}

/// The rule `releaser promote` applies: `next` must be a release (no pre-release part, no build metadata) and
/// strictly greater than `latest`, the latest release so far (`None` when there is none yet), by [`compare`].
pub fn is_valid_release_bump(latest: Option<&Version>, next: &Version) -> Result<(), VersionError> {
    if !next.pre.is_empty() {
        return Err(VersionError::NotARelease {
            version: display(next),
            reason: format!("it has the pre-release part -{}", next.pre),
        });
    }
    if !next.build.is_empty() {
        return Err(VersionError::NotARelease {
            version: display(next),
            reason: format!("it has the build metadata +{}", next.build),
        });
    }
    if let Some(latest) = latest {
        if compare(next, latest) != Ordering::Greater {
            let suggestion = if latest.pre.is_empty() {
                Version::new(latest.major, latest.minor, latest.patch + 1)
            } else {
                Version::new(latest.major, latest.minor, latest.patch)
            };
            return Err(VersionError::NotGreater {
                next: display(next),
                latest: display(latest),
                suggestion: display(&suggestion),
            });
        }
    }
    Ok(())
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

#[cfg(test)]
mod release_policy_tests {
    use super::*;

    fn v(s: &str) -> Version {
        parse(s).unwrap()
    }

    #[test]
    fn pre_release_format_round_trips() {
        let p = pre_release(&Version::new(1, 3, 0), 4, "abc1234").unwrap();
        assert_eq!(p.to_string(), "1.3.0-pre.4+abc1234");
        assert_eq!(display(&p), "v1.3.0-pre.4+abc1234");
        assert_eq!(Channel::of(&p), Channel::PreRelease);
        assert_eq!(
            parse_pre_release(&p),
            Some(PreRelease {
                base: Version::new(1, 3, 0),
                count: 4,
                sha: "abc1234".into()
            })
        );
        // The first builds of a repository without tags, and a 12-digit all-numeric sha.
        let p = pre_release(&Version::new(0, 0, 0), 0, "012345678901").unwrap();
        assert_eq!(display(&p), "v0.0.0-pre.0+012345678901");
        assert_eq!(parse_pre_release(&p).unwrap().count, 0);
        assert_eq!(
            parse_pre_release(&v("v0.0.0-pre.0+012345678901")).unwrap().sha,
            "012345678901"
        );
        let p = pre_release(&Version::new(2, 0, 1), u64::MAX, "deadbee").unwrap();
        assert_eq!(parse_pre_release(&p).unwrap().count, u64::MAX);
    }

    #[test]
    fn invalid_sha_and_base_are_refused() {
        let base = Version::new(1, 0, 0);
        for bad in [
            "",
            "abc123",
            "abcdef0123456",
            "ABC1234",
            "abc123g",
            "abc 1234",
            "abc-123",
            "abc.1234",
        ] {
            assert!(
                matches!(pre_release(&base, 1, bad), Err(VersionError::InvalidPreRelease { .. })),
                "{bad:?}"
            );
        }
        assert!(pre_release(&base, 1, "abcdef0").is_ok());
        assert!(pre_release(&base, 1, "abcdef012345").is_ok());
        assert!(
            pre_release(&v("1.0.0-pre.1+abcdef0"), 1, "abcdef0").is_err(),
            "a pre-release base"
        );
        assert!(
            pre_release(&v("1.0.0+abcdef0"), 1, "abcdef0").is_err(),
            "a base with build metadata"
        );
        let e = pre_release(&base, 1, "XYZ").unwrap_err().to_string();
        assert!(e.contains("7 to 12 lowercase hex"), "{e}");
    }

    #[test]
    fn other_formats_are_not_our_pre_releases() {
        for s in [
            "1.3.0",
            "1.3.0+abc1234",
            "1.3.0-rc.1+abc1234",
            "1.3.0-pre+abc1234",
            "1.3.0-pre.x+abc1234",
            "1.3.0-pre.4",
            "1.3.0-pre.4+abc",
            "1.3.0-pre.4+ABC1234",
            "1.3.0-pre.4.1+abc1234",
            "1.3.0-pre.4+abc1234.x",
        ] {
            assert_eq!(parse_pre_release(&v(s)), None, "{s}");
        }
        assert!(parse("1.3.0-pre.04+abc1234").is_err(), "leading zero refused by SemVer");
    }

    #[test]
    fn pre_releases_sort_before_their_release_and_counts_are_numeric() {
        use Ordering::*;
        assert_eq!(compare(&v("1.3.0-pre.4+abc1234"), &v("1.3.0")), Less);
        assert_eq!(compare(&v("1.3.0"), &v("1.3.0-pre.999+abc1234")), Greater);
        assert_eq!(compare(&v("1.3.0-pre.9+fffffff"), &v("1.3.0-pre.10+0000000")), Less);
        assert_eq!(compare(&v("1.3.0-pre.10+0000000"), &v("1.3.0-pre.9+fffffff")), Greater);
        assert_eq!(
            compare(&v("1.2.9"), &v("1.3.0-pre.0+abc1234")),
            Less,
            "a pre of 1.3.0 is above 1.2.9"
        );
        assert_eq!(compare(&v("1.3.0-pre.4+abc1234"), &v("1.3.1-pre.1+abc1234")), Less);
        assert_eq!(compare(&v("1.10.0"), &v("1.9.0")), Greater);
        let mut list = [
            v("1.3.0"),
            v("1.3.0-pre.10+aaaaaaa"),
            v("1.2.0"),
            v("1.3.0-pre.9+bbbbbbb"),
            v("0.0.0-pre.3+ccccccc"),
            v("1.3.1-pre.1+ddddddd"),
        ];
        list.sort_by(compare);
        let shown: Vec<String> = list.iter().map(display).collect();
        assert_eq!(
            shown,
            [
                "v0.0.0-pre.3+ccccccc",
                "v1.2.0",
                "v1.3.0-pre.9+bbbbbbb",
                "v1.3.0-pre.10+aaaaaaa",
                "v1.3.0",
                "v1.3.1-pre.1+ddddddd"
            ]
        );
    }

    #[test]
    fn build_metadata_is_ignored_for_ordering_but_kept_in_display() {
        let a = v("1.3.0-pre.4+abc1234");
        let b = v("1.3.0-pre.4+fff0000");
        assert_eq!(compare(&a, &b), Ordering::Equal);
        assert_ne!(a, b, "still two distinct builds");
        assert_eq!(display(&a), "v1.3.0-pre.4+abc1234");
        assert_eq!(compare(&v("1.3.0+build.5"), &v("1.3.0")), Ordering::Equal);
        assert_eq!(display(&v("1.3.0+build.5")), "v1.3.0+build.5");
    }

    #[test]
    fn release_bumps() {
        assert_eq!(is_valid_release_bump(None, &v("0.1.0")), Ok(()));
        assert_eq!(is_valid_release_bump(Some(&v("1.2.3")), &v("1.2.4")), Ok(()));
        assert_eq!(is_valid_release_bump(Some(&v("1.2.3")), &v("1.3.0")), Ok(()));
        assert_eq!(is_valid_release_bump(Some(&v("1.2.3")), &v("2.0.0")), Ok(()));
        assert_eq!(
            is_valid_release_bump(Some(&v("1.3.0-pre.4+abc1234")), &v("1.3.0")),
            Ok(())
        );

        let e = is_valid_release_bump(Some(&v("1.2.3")), &v("1.2.3")).unwrap_err();
        assert_eq!(
            e,
            VersionError::NotGreater {
                next: "v1.2.3".into(),
                latest: "v1.2.3".into(),
                suggestion: "v1.2.4".into()
            }
        );
        assert!(
            e.to_string().contains("choose a higher version (for example v1.2.4)"),
            "{e}"
        );
        assert!(matches!(
            is_valid_release_bump(Some(&v("1.2.3")), &v("1.2.2")),
            Err(VersionError::NotGreater { .. })
        ));
        assert!(matches!(
            is_valid_release_bump(Some(&v("1.10.0")), &v("1.9.9")),
            Err(VersionError::NotGreater { .. })
        ));
        assert!(matches!(
            is_valid_release_bump(Some(&v("1.2.3")), &v("1.3.0-pre.1+abc1234")),
            Err(VersionError::NotARelease { .. })
        ));
        assert!(matches!(
            is_valid_release_bump(None, &v("1.3.0-pre.1+abc1234")),
            Err(VersionError::NotARelease { .. })
        ));
        let e = is_valid_release_bump(None, &v("1.3.0+abc1234")).unwrap_err();
        assert!(matches!(e, VersionError::NotARelease { .. }));
        assert!(e.to_string().contains("build metadata +abc1234"), "{e}");
        // Equal precedence is not greater, whatever the build metadata says.
        assert!(is_valid_release_bump(Some(&v("1.3.0+old")), &v("1.3.0")).is_err());
    }

    #[test]
    fn pre_release_base_is_the_release_it_leads_to() {
        let v = |s: &str| Version::parse(s).unwrap();
        // Declared not bumped since the latest release: the next patch, so the pre-release sorts above it.
        assert_eq!(pre_release_base(Some(&v("0.2.0")), Some(&v("0.2.0"))), v("0.2.1"));
        assert_eq!(pre_release_base(Some(&v("0.2.0")), None), v("0.2.1"));
        // Declared ahead of the latest release: that version.
        assert_eq!(pre_release_base(Some(&v("0.2.0")), Some(&v("0.3.0"))), v("0.3.0"));
        assert_eq!(pre_release_base(Some(&v("0.2.0")), Some(&v("0.2.1"))), v("0.2.1"));
        // Declared behind the latest release (a stale branch): still above the release.
        assert_eq!(pre_release_base(Some(&v("0.2.0")), Some(&v("0.1.0"))), v("0.2.1"));
        // No release yet.
        assert_eq!(pre_release_base(None, Some(&v("0.1.0"))), v("0.1.0"));
        assert_eq!(pre_release_base(None, None), v("0.0.0"));
        // A pre-release built from the base sorts above the latest release and below the one it leads to.
        let p = pre_release(&pre_release_base(Some(&v("0.2.0")), Some(&v("0.2.0"))), 3, "abc1234").unwrap();
        assert_eq!(compare(&p, &v("0.2.0")), Ordering::Greater);
        assert_eq!(compare(&p, &v("0.2.1")), Ordering::Less);
    }
}
