//! `releaser promote <pre-release dir> --to vX.Y.Z`: turns a verified pre-release directory into a release
//! directory without rebuilding anything.
//!
//! 1. The pre-release is verified with the trusted public key (every signature, size, SHA-256, the expiry).
//! 2. The version rule (`nkudo_core::version::is_valid_release_bump`): `--to` is a release strictly greater than
//!    the latest release. Without `--rollback` the source must be a pre-release newer than the latest release.
//!    With `--rollback` the source is an older, known-good release (or pre-release), `--to` a patch release
//!    of the latest release's line, and the manifest says `rollback_of: <latest>`.
//! 3. CHANGELOG.md must have a `## [X.Y.Z]` (or `## vX.Y.Z`, `## X.Y.Z`) section for the version.
//! 4. Every artifact is copied byte for byte (its digest checked against the signed manifest on read and after
//!    the write); only the version in its file name changes. The binaries inside still report the pre-release
//!    version they were built as; `promoted_from` records it.
//! 5. A new manifest (channel `release`, `promoted_from`, `rollback_of`), SHA256SUMS, every signature and the
//!    public key are written into a staging directory that is renamed into place; the result is verified again.

use crate::checksums;
use crate::dist::{rfc3339, trusted_comment, Written, PUBLIC_KEY_FILE, UNTRUSTED_COMMENT};
use crate::manifest::{Artifact, Manifest};
use crate::minisign::{blake2b512, PublicKey, SecretKey};
use crate::verify;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use nkudo_core::fsutil::write_atomic;
use nkudo_core::version::{self, compare, display, is_valid_release_bump, minimum_supported_agent_version};
use semver::Version;
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// What to promote and how.
pub struct PromoteRequest<'a> {
    /// The verified source directory (a pre-release; with `rollback`, an older release).
    pub from: PathBuf,
    /// The release directory to write (must not exist).
    pub out: PathBuf,
    /// The release version.
    pub to: Version,
    pub rollback: bool,
    /// The trusted key the source is verified with.
    pub trusted: &'a PublicKey,
    /// The key the release is signed with.
    pub key: &'a SecretKey,
    /// CHANGELOG.md's text.
    pub changelog: String,
    /// The latest release so far (None: this is the first release).
    pub latest: Option<Version>,
    pub now: DateTime<Utc>,
    pub expiry_days: u32,
}

/// What promotion wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteReport {
    pub out_dir: PathBuf,
    pub version: String,
    pub promoted_from: String,
    pub rollback_of: Option<String>,
    pub expires: String,
    pub key_id: String,
    pub files: Vec<Written>,
}

/// Whether `changelog` has a section heading for `v`: `## [X.Y.Z]`, `## [vX.Y.Z]`, `## vX.Y.Z` or `## X.Y.Z`
/// (followed by the end of the line, a space or `]`).
pub fn changelog_has_section(changelog: &str, v: &Version) -> bool {
    let want = v.to_string();
    changelog.lines().any(|line| {
        let Some(rest) = line.strip_prefix("## ") else {
            return false;
        };
        let rest = rest.trim_start();
        let rest = rest.strip_prefix('[').unwrap_or(rest);
        let rest = rest.strip_prefix('v').unwrap_or(rest);
        match rest.strip_prefix(want.as_str()) {
            Some(after) => after.is_empty() || after.starts_with([']', ' ', '\t']),
            None => false,
        }
    })
}

/// The highest `release` version among the release directories under `dir` (each a directory with a
/// `manifest.json`); None when there is none.
pub fn latest_release_in(dir: &Path) -> Result<Option<Version>> {
    let mut latest: Option<Version> = None;
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading --releases-dir {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let manifest = path.join("manifest.json");
        if !manifest.is_file() {
            continue;
        }
        let bytes = std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        let m = Manifest::from_json(&bytes).with_context(|| format!("reading {}", manifest.display()))?;
        if m.channel != "release" {
            continue;
        }
        let v = version::parse(&m.version).with_context(|| format!("the version in {}", manifest.display()))?;
        if latest.as_ref().is_none_or(|l| compare(&v, l) == Ordering::Greater) {
            latest = Some(v);
        }
    }
    Ok(latest)
}

/// Promotes `req.from` to the release `req.to` in `req.out`. Refuses (with what to do) before writing anything.
pub fn promote(req: &PromoteRequest<'_>) -> Result<PromoteReport> {
    let to = &req.to;
    // 1. The source: signatures, hashes, expiry.
    let report = verify::verify_dir(&req.from, req.trusted, req.now);
    if !report.ok {
        let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{} does not verify with key {}; nothing promoted:\n  {}",
            req.from.display(),
            report.key_id,
            problems.join("\n  ")
        );
    }
    let source_bytes = std::fs::read(req.from.join("manifest.json")).context("reading the source manifest")?;
    let source = Manifest::from_json(&source_bytes).context("reading the source manifest")?;
    let source_version = version::parse(&source.version).context("the source manifest's version")?;

    // 2. The version rule.
    is_valid_release_bump(req.latest.as_ref(), to).map_err(|e| anyhow::anyhow!("refusing {}: {e}", display(to)))?;
    let rollback_of = if req.rollback {
        let Some(latest) = &req.latest else {
            bail!("--rollback needs the release it undoes: pass --latest-release vA.B.C or --releases-dir DIR");
        };
        if compare(&source_version, latest) != Ordering::Less {
            bail!(
                "--rollback republishes an older known-good release, but {} is not older than the latest release {}",
                display(&source_version),
                display(latest)
            );
        }
        if (to.major, to.minor) != (latest.major, latest.minor) {
            bail!(
                "a rollback is a patch release of the latest release {}: use --to v{}.{}.{}",
                display(latest),
                latest.major,
                latest.minor,
                latest.patch + 1
            );
        }
        Some(latest.to_string())
    } else {
        if source.channel != "pre-release" {
            bail!(
                "{} is a {} ({}), not a pre-release; to republish an older release use --rollback",
                req.from.display(),
                source.channel,
                display(&source_version)
            );
        }
        if let Some(latest) = &req.latest {
            if compare(&source_version, latest) != Ordering::Greater {
                bail!(
                    "the pre-release {} is older than the latest release {}: its artifacts predate it. Promote a newer \
                     pre-release, or use --rollback to republish old artifacts on purpose",
                    display(&source_version),
                    display(latest)
                );
            }
        }
        if compare(to, &source_version) != Ordering::Greater {
            bail!(
                "{} would not be newer than the pre-release {} it promotes",
                display(to),
                display(&source_version)
            );
        }
        None
    };

    // 3. The changelog.
    if !changelog_has_section(&req.changelog, to) {
        bail!(
            "CHANGELOG.md has no section for {to}: add a `## [{to}]` heading (move the Unreleased notes under it) \
             and commit it before promoting"
        );
    }

    if req.out.exists() {
        bail!("{} exists: remove it or pass another --out", req.out.display());
    }

    // 4. + 5. Staging directory beside the output.
    let parent = match req.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let out_name = req
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("--out has no file name")?;
    let staging = parent.join(format!(".{out_name}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = write_release(req, &source, &source_version, rollback_of, &staging);
    let result = result.and_then(|r| {
        std::fs::rename(&staging, &req.out).with_context(|| format!("renaming into {}", req.out.display()))?;
        Ok(r)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let mut report = result?;
    report.out_dir = req.out.clone();

    let check = verify::verify_dir(&req.out, &req.key.public_key(), req.now);
    if !check.ok {
        let problems: Vec<String> = check.problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "the promoted release {} does not verify (a bug): {}",
            req.out.display(),
            problems.join("; ")
        );
    }
    Ok(report)
}

fn write_release(
    req: &PromoteRequest<'_>,
    source: &Manifest,
    source_version: &Version,
    rollback_of: Option<String>,
    staging: &Path,
) -> Result<PromoteReport> {
    let to = req.to.to_string();
    let epoch = u64::try_from(req.now.timestamp()).context("the clock is before 1970")?;
    let expires = epoch
        .checked_add(u64::from(req.expiry_days) * 86_400)
        .and_then(rfc3339)
        .context("--expires-in-days out of range")?;
    let sign = |name: &str, bytes: &[u8]| -> Result<()> {
        let tc = trusted_comment(epoch, name, &to, "release", &expires);
        let sig = req.key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT)?;
        let p = staging.join(format!("{name}.minisig"));
        write_atomic(&p, sig.to_file_text().as_bytes(), 0o644).with_context(|| format!("writing {}", p.display()))
    };
    let old_tag = format!("-{}-", source.version);
    let new_tag = format!("-{to}-");
    let mut artifacts = Vec::new();
    let mut files = Vec::new();
    for a in &source.artifacts {
        let src = req.from.join(&a.name);
        let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        let sha = checksums::sha256_hex(&bytes);
        if sha != a.sha256 || bytes.len() as u64 != a.size {
            bail!(
                "{} changed since it was verified (SHA-256 {sha}, manifest {})",
                a.name,
                a.sha256
            );
        }
        let name = a.name.replacen(&old_tag, &new_tag, 1);
        let dst = staging.join(&name);
        write_atomic(&dst, &bytes, 0o644).with_context(|| format!("writing {}", dst.display()))?;
        let (written_sha, written_size) =
            checksums::sha256_file(&dst).with_context(|| format!("reading back {}", dst.display()))?;
        if written_sha != a.sha256 || written_size != a.size {
            bail!("{} differs from {} after the copy", dst.display(), src.display());
        }
        sign(&name, &bytes)?;
        artifacts.push(Artifact {
            name: name.clone(),
            ..a.clone()
        });
        files.push(Written {
            name,
            size: a.size,
            sha256: a.sha256.clone(),
        });
    }
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest {
        schema_version: source.schema_version,
        product: source.product.clone(),
        version: to.clone(),
        channel: "release".into(),
        git_commit: source.git_commit.clone(),
        build_date: source.build_date.clone(),
        expires: expires.clone(),
        minimum_supported_agent_version: minimum_supported_agent_version(&req.to).to_string(),
        artifacts,
        promoted_from: Some(source_version.to_string()),
        rollback_of: rollback_of.clone(),
    };
    let manifest_bytes = manifest.to_canonical_json().into_bytes();
    let p = staging.join("manifest.json");
    write_atomic(&p, &manifest_bytes, 0o644).with_context(|| format!("writing {}", p.display()))?;
    sign("manifest.json", &manifest_bytes)?;
    files.push(Written {
        name: "manifest.json".into(),
        size: manifest_bytes.len() as u64,
        sha256: checksums::sha256_hex(&manifest_bytes),
    });
    let sums = checksums::render(
        &files
            .iter()
            .map(|w| (w.name.clone(), w.sha256.clone()))
            .collect::<Vec<_>>(),
    );
    let p = staging.join("SHA256SUMS");
    write_atomic(&p, sums.as_bytes(), 0o644).with_context(|| format!("writing {}", p.display()))?;
    sign("SHA256SUMS", sums.as_bytes())?;
    let p = staging.join(PUBLIC_KEY_FILE);
    write_atomic(&p, req.key.public_key().to_file_text().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", p.display()))?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PromoteReport {
        out_dir: staging.to_path_buf(),
        version: to,
        promoted_from: source_version.to_string(),
        rollback_of,
        expires,
        key_id: req.key.key_id.to_string(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_changelog_sections() {
        let v = Version::new(0, 2, 0);
        for ok in [
            "## [0.2.0] - 2026-11-23",
            "## v0.2.0",
            "## 0.2.0",
            "## [v0.2.0]",
            "## [0.2.0]",
        ] {
            assert!(
                changelog_has_section(&format!("# Changelog\n\n{ok}\n- x\n"), &v),
                "{ok}"
            );
        }
        for bad in [
            "## [0.2.01]",
            "## [Unreleased]",
            "### [0.2.0]",
            "## 0.2.0-pre.1",
            "- 0.2.0",
            "## [0.20.0]",
        ] {
            assert!(!changelog_has_section(&format!("# Changelog\n{bad}\n"), &v), "{bad}");
        }
    }
}
