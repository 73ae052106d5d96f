//! `releaser lint-deploy <paths...>`: finds floating image and version references in deployment files, with
//! file and line, so that what runs in the fleet is always an exact, known release.
//!
//! Files looked at (directories are walked; hidden directories and `target/` skipped):
//! * compose files and Kubernetes manifests: `*.yml`, `*.yaml`;
//! * systemd units: `*.service`, `*.socket`, `*.timer`, `*.container`, `*.pod`, `*.kube` (Quadlet);
//! * env files: `*.env`, `.env`, `.env.*`, `*.env.*`.
//!
//! References found (comment lines are skipped):
//! * images: YAML `image:`, Quadlet `Image=`, `KEY=VALUE` with a key ending in `IMAGE`, and any other
//!   `name:latest` token;
//! * versions: `KEY=VALUE` with a key ending in `VERSION` or `_TAG` (env files, systemd `Environment=`), YAML
//!   `newTag:` (kustomize), `tag:` (Helm values) and the `app.kubernetes.io/version` label.
//!
//! Forbidden, for every reference: `latest`, `pre-latest`, a pre-release (`-pre.`), a bare commit sha (7–40 hex
//! digits with at least one letter). For images the rule of pinning: **our images** (`nkudo-*`, `n-kudo/*`) are
//! pinned by an exact release tag (`X.Y.Z` or `vX.Y.Z`) or an `@sha256:` digest; **third-party images** only by
//! an `@sha256:` digest, because their version tags are moved by their publishers (`postgres:16.4` is rebuilt
//! in place). An image with no tag, or with a `$VARIABLE` that cannot be checked here, is unpinned.
//! Dockerfiles are build inputs, not deployment files, and are not checked.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One forbidden reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    /// `latest`, `pre-latest`, `pre-release`, `commit-sha`, `unpinned`, `unpinned-third-party`.
    pub kind: &'static str,
    pub reference: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {} ({})",
            self.file, self.line, self.kind, self.reference, self.message
        )
    }
}

/// The result of a lint run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LintReport {
    pub ok: bool,
    pub files_checked: Vec<String>,
    pub findings: Vec<Finding>,
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Yaml,
    Systemd,
    Env,
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("yml" | "yaml") => return Some(FileKind::Yaml),
        Some("service" | "socket" | "timer" | "container" | "pod" | "kube") => return Some(FileKind::Systemd),
        Some("env") => return Some(FileKind::Env),
        _ => {}
    }
    if name == ".env" || name.starts_with(".env.") || name.contains(".env.") {
        return Some(FileKind::Env);
    }
    None
}

/// Lints files and directories.
pub fn lint_paths(paths: &[PathBuf]) -> Result<LintReport> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, true, &mut files)?;
    }
    files.sort();
    files.dedup();
    let mut report = LintReport::default();
    for (path, kind) in files {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let shown = path.display().to_string();
        report.findings.extend(lint_text(&shown, kind, &text));
        report.files_checked.push(shown);
    }
    report.ok = report.findings.is_empty();
    Ok(report)
}

fn collect(path: &Path, explicit: bool, out: &mut Vec<(PathBuf, FileKind)>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{} (no such file or directory)", path.display()))?;
    if meta.is_dir() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !explicit && (name.starts_with('.') || name == "target") {
            return Ok(());
        }
        for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            collect(&entry?.path(), false, out)?;
        }
    } else if let Some(kind) = kind_of(path) {
        out.push((path.to_path_buf(), kind));
    } else if explicit {
        // A file named on the command line is checked whatever its name, as an env file unless it looks like YAML.
        let kind = if path.extension().is_some_and(|e| e == "json") {
            FileKind::Yaml
        } else {
            FileKind::Env
        };
        out.push((path.to_path_buf(), kind));
    }
    Ok(())
}

fn strip_quotes(s: &str) -> &str {
    let s = s.trim();
    let s = s.strip_suffix(',').unwrap_or(s).trim();
    s.trim_matches(|c| c == '"' || c == '\'')
}

/// Drops a trailing ` # comment` from a YAML or env value.
fn strip_comment(s: &str) -> &str {
    match s.find(" #") {
        Some(i) => &s[..i],
        None => s,
    }
}

/// Lints one file's text; `file` is how findings name it.
pub fn lint_text(file: &str, kind: FileKind, text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut images: Vec<String> = Vec::new();
        let mut versions: Vec<String> = Vec::new();
        match kind {
            FileKind::Yaml => {
                let l = line.strip_prefix("- ").unwrap_or(line).trim_start();
                if let Some((key, value)) = l.split_once(':') {
                    let value = strip_quotes(strip_comment(value));
                    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
                    if !value.is_empty() {
                        match key {
                            "image" => images.push(value.to_string()),
                            "newTag" | "tag" | "app.kubernetes.io/version" => versions.push(value.to_string()),
                            _ => {}
                        }
                    }
                }
            }
            FileKind::Systemd => {
                if let Some((key, value)) = line.split_once('=') {
                    let value = strip_quotes(value);
                    match key.trim() {
                        "Image" => images.push(value.to_string()),
                        "Environment" => {
                            for pair in value.split_whitespace() {
                                env_pair(strip_quotes(pair), &mut images, &mut versions);
                            }
                        }
                        _ => {}
                    }
                }
            }
            FileKind::Env => {
                let l = line.strip_prefix("export ").unwrap_or(line);
                env_pair(strip_quotes(strip_comment(l)), &mut images, &mut versions);
            }
        }
        // Any other `name:latest` token on the line (e.g. `docker run ... app:latest` in an ExecStart).
        for token in line.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '=') {
            if (token.ends_with(":latest") || token.contains(":latest@")) && !images.iter().any(|i| i == token) {
                images.push(token.to_string());
            }
        }
        let n = i + 1;
        for image in images {
            if let Some((k, msg)) = check_image(&image) {
                out.push(Finding {
                    file: file.to_string(),
                    line: n,
                    kind: k,
                    reference: image,
                    message: msg,
                });
            }
        }
        for version in versions {
            if let Some((k, msg)) = check_version(&version) {
                out.push(Finding {
                    file: file.to_string(),
                    line: n,
                    kind: k,
                    reference: version,
                    message: msg,
                });
            }
        }
    }
    out
}

fn env_pair(pair: &str, images: &mut Vec<String>, versions: &mut Vec<String>) {
    let Some((key, value)) = pair.split_once('=') else {
        return;
    };
    let key = key.trim().to_ascii_uppercase();
    let value = strip_quotes(value);
    if value.is_empty() {
        return;
    }
    if key.ends_with("IMAGE") {
        images.push(value.to_string());
    } else if key.ends_with("VERSION") || key.ends_with("_TAG") {
        versions.push(value.to_string());
    }
}

fn is_commit_sha(s: &str) -> bool {
    (7..=40).contains(&s.len())
        && s.chars().all(|c| c.is_ascii_hexdigit())
        && s.chars().any(|c| c.is_ascii_alphabetic())
}

/// The floating-version kinds shared by tags and version values.
fn check_version(v: &str) -> Option<(&'static str, String)> {
    let lower = v.to_ascii_lowercase();
    let bare = lower.strip_prefix('v').unwrap_or(&lower);
    if lower.contains("pre-latest") {
        Some((
            "pre-latest",
            "pre-latest moves with every build: pin a release version".into(),
        ))
    } else if lower == "latest" {
        Some((
            "latest",
            "latest moves with every release: pin a release version".into(),
        ))
    } else if lower.contains("-pre.") {
        Some((
            "pre-release",
            "a pre-release is not deployed to the fleet: promote it (`releaser promote`) and pin the release".into(),
        ))
    } else if is_commit_sha(bare) {
        Some((
            "commit-sha",
            "a bare commit sha says nothing about what was released: pin a release version".into(),
        ))
    } else {
        None
    }
}

fn is_release_version(tag: &str) -> bool {
    let t = tag.strip_prefix('v').unwrap_or(tag);
    semver::Version::parse(t).is_ok_and(|v| v.pre.is_empty() && v.build.is_empty())
}

fn check_image(image: &str) -> Option<(&'static str, String)> {
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last = name_tag.rsplit('/').next().unwrap_or(name_tag);
    let tag = last.split_once(':').map(|(_, t)| t);
    if let Some(t) = tag {
        if let Some(found) = check_version(t) {
            return Some(found);
        }
    }
    if image.contains('$') {
        return Some((
            "unpinned",
            "a variable in an image reference cannot be checked: write the pinned reference".into(),
        ));
    }
    let pinned_digest = digest.is_some_and(|d| d.starts_with("sha256:") && d.len() == 7 + 64);
    let ours = last.starts_with("nkudo") || name_tag.contains("n-kudo/");
    if ours {
        if pinned_digest || tag.is_some_and(is_release_version) {
            None
        } else {
            Some((
                "unpinned",
                "pin our image to an exact release tag (X.Y.Z) or an @sha256: digest".into(),
            ))
        }
    } else if pinned_digest {
        None
    } else {
        Some((
            "unpinned-third-party",
            match tag {
                None => "third-party image without a tag or digest: pin it with @sha256:<digest>".into(),
                Some(t) => format!("third-party tag {t:?} can be moved upstream: add @sha256:<digest>"),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_images() {
        let d = format!("@sha256:{}", "a".repeat(64));
        assert_eq!(check_image("nkudo-control-plane:latest").unwrap().0, "latest");
        assert_eq!(
            check_image("ghcr.io/n-kudo/nkudo-edge:pre-latest").unwrap().0,
            "pre-latest"
        );
        assert_eq!(check_image("nkudo-control-plane:0.2.0-pre.3").unwrap().0, "pre-release");
        assert_eq!(check_image("nkudo-control-plane:abc1234").unwrap().0, "commit-sha");
        assert_eq!(check_image("nkudo-control-plane").unwrap().0, "unpinned");
        assert_eq!(check_image("nkudo-control-plane:0.2").unwrap().0, "unpinned");
        assert!(check_image("nkudo-control-plane:0.2.0").is_none());
        assert!(check_image("ghcr.io/n-kudo/nkudo-control-plane:v0.2.0").is_none());
        assert!(check_image(&format!("nkudo-control-plane{d}")).is_none());
        assert_eq!(check_image("postgres:16.4").unwrap().0, "unpinned-third-party");
        assert_eq!(check_image("postgres").unwrap().0, "unpinned-third-party");
        assert_eq!(
            check_image("localhost:5000/postgres").unwrap().0,
            "unpinned-third-party"
        );
        assert!(check_image(&format!("postgres:16.4{d}")).is_none());
        assert_eq!(check_image(&format!("postgres:latest{d}")).unwrap().0, "latest");
        assert_eq!(check_image("nkudo-edge:${TAG}").unwrap().0, "unpinned");
        assert!(
            check_version("1234567").is_none(),
            "digits only are not taken for a sha"
        );
        assert!(check_version("0.2.0").is_none());
    }
}
