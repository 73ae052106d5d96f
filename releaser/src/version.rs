//! The release version, computed from git:
//!
//! * HEAD carries a tag `vX.Y.Z` (a full release, no pre-release part): the version is `X.Y.Z`, channel
//!   `release`;
//! * otherwise a pre-release `{base}-pre.{count}+{sha}`: `base` is the release it leads to
//!   ([`nkudo_core::version::pre_release_base`] of the highest full-release tag reachable from HEAD and the
//!   workspace's declared version in `Cargo.toml`: after `v0.2.0` with 0.2.0 still declared, `0.2.1`; with 0.3.0
//!   declared, `0.3.0`), `count` the commits since that tag (all commits when there is none), `sha` the
//!   7-character short commit. Channel `pre-release`. A pre-release thus sorts above the release it was built
//!   after, so agents on that release take it as an upgrade.
//!
//! Versions are SemVer without the `v` (what `nkudo_core::version::parse` reads, with or without it).

use nkudo_core::version::Channel;
use semver::Version;
use std::path::Path;
use std::process::{Command, Stdio};

/// What git says about the commit being released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitVersion {
    pub version: Version,
    pub channel: Channel,
    /// Full commit hash.
    pub commit: String,
    /// Committer time of HEAD (Unix seconds): the default SOURCE_DATE_EPOCH.
    pub commit_time: u64,
    /// Uncommitted changes to tracked files (the build would not match the commit).
    pub dirty: bool,
}

/// Errors computing the version.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("running git {args}: {reason}")]
    Git { args: String, reason: String },
    #[error("unexpected git output for `git {args}`: {output:?}")]
    Output { args: String, output: String },
}

/// Computes the version of HEAD in the repository at `repo`.
pub fn from_git(repo: &Path) -> Result<GitVersion, VersionError> {
    let commit = git(repo, &["rev-parse", "--verify", "HEAD"])?;
    let short = commit.get(..7).unwrap_or(&commit).to_string();
    let commit_time = git(repo, &["log", "-1", "--format=%ct", "HEAD"])?;
    let commit_time: u64 = commit_time.parse().map_err(|_| VersionError::Output {
        args: "log -1 --format=%ct".into(),
        output: commit_time.clone(),
    })?;
    let dirty = !git(repo, &["status", "--porcelain", "--untracked-files=no"])?.is_empty();

    let at_head = release_tags(&git(repo, &["tag", "--points-at", "HEAD", "--list", "v*"])?);
    let (version, channel) = if let Some(v) = at_head.into_iter().max() {
        (v, Channel::Release)
    } else {
        let merged = release_tags(&git(repo, &["tag", "--merged", "HEAD", "--list", "v*"])?);
        let latest = merged.into_iter().max();
        let count = match &latest {
            Some(latest) => count_commits(repo, &format!("v{latest}..HEAD"))?,
            None => count_commits(repo, "HEAD")?,
        };
        let base = nkudo_core::version::pre_release_base(latest.as_ref(), declared_version(repo).as_ref());
        (pre_release(&base, count, &short), Channel::PreRelease)
    };
    Ok(GitVersion {
        version,
        channel,
        commit,
        commit_time,
        dirty,
    })
}

/// The version `<repo>/Cargo.toml` declares (`[workspace.package] version`, else `[package] version`), when it
/// is a plain `X.Y.Z`.
pub fn declared_version(repo: &Path) -> Option<Version> {
    let text = std::fs::read_to_string(repo.join("Cargo.toml")).ok()?;
    let doc: toml::Table = text.parse().ok()?;
    let version = doc
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .or_else(|| doc.get("package").and_then(|p| p.get("version")))?
        .as_str()?;
    Version::parse(version)
        .ok()
        .filter(|v| v.pre.is_empty() && v.build.is_empty())
}

/// `{base}-pre.{count}+{sha}`.
pub fn pre_release(base: &Version, count: u64, short_sha: &str) -> Version {
    let text = format!("{}.{}.{}-pre.{count}+{short_sha}", base.major, base.minor, base.patch);
    Version::parse(&text).expect("a pre-release built from numbers and a hex sha parses")
}

/// The full-release versions among `vX.Y.Z` tag names (pre-release tags and other names are ignored).
pub fn release_tags(list: &str) -> Vec<Version> {
    list.lines()
        .filter_map(|t| t.trim().strip_prefix('v'))
        .filter_map(|t| Version::parse(t).ok())
        .filter(|v| v.pre.is_empty() && v.build.is_empty())
        .collect()
}

fn count_commits(repo: &Path, range: &str) -> Result<u64, VersionError> {
    let out = git(repo, &["rev-list", "--count", range])?;
    out.parse().map_err(|_| VersionError::Output {
        args: format!("rev-list --count {range}"),
        output: out,
    })
}

fn git(repo: &Path, args: &[&str]) -> Result<String, VersionError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VersionError::Git {
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(VersionError::Git {
            args: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
            .env("GIT_COMMITTER_DATE", "1700000000 +0000")
            .env("GIT_AUTHOR_DATE", "1700000000 +0000")
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }

    #[test]
    fn pre_release_and_release_from_tags() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        sh(d, &["init", "-q", "-b", "main"]);
        sh(d, &["commit", "-q", "--allow-empty", "-m", "one"]);
        sh(d, &["commit", "-q", "--allow-empty", "-m", "two"]);
        let v = from_git(d).unwrap();
        assert_eq!(v.channel, Channel::PreRelease);
        assert_eq!(v.version.to_string(), format!("0.0.0-pre.2+{}", &v.commit[..7]));
        assert_eq!(v.commit_time, 1_700_000_000);
        assert!(!v.dirty);

        sh(d, &["tag", "v0.2.0"]);
        sh(d, &["tag", "v0.3.0-rc.1"]);
        sh(d, &["tag", "not-a-version"]);
        let v = from_git(d).unwrap();
        assert_eq!(
            (v.version.to_string(), v.channel),
            ("0.2.0".to_string(), Channel::Release)
        );

        // After release 0.2.0 the pre-releases lead to 0.2.1: they sort above 0.2.0.
        sh(d, &["commit", "-q", "--allow-empty", "-m", "three"]);
        let v = from_git(d).unwrap();
        assert_eq!(v.version.to_string(), format!("0.2.1-pre.1+{}", &v.commit[..7]));
        assert_eq!(v.channel, Channel::PreRelease);
        assert!(v.version > semver::Version::new(0, 2, 0));

        // The workspace declares the next minor: the pre-releases lead to it.
        std::fs::write(
            d.join("Cargo.toml"),
            "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"0.3.0\"\n",
        )
        .unwrap();
        sh(d, &["add", "Cargo.toml"]);
        sh(d, &["commit", "-q", "-m", "four"]);
        let v = from_git(d).unwrap();
        assert_eq!(v.version.to_string(), format!("0.3.0-pre.2+{}", &v.commit[..7]));
    }

    #[test]
    fn release_tag_filter() {
        let v = release_tags("v1.2.3\nv1.3.0-pre.1+abc\nv2\nfoo\nv0.9.9\n");
        assert_eq!(v, vec![Version::new(1, 2, 3), Version::new(0, 9, 9)]);
    }
}
