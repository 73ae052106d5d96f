//! `releaser install`: verify a release FIRST (signature, then SHA-256), then unpack the verified bytes into the
//! host layout (`nkudo_core::layout`, crash-safe). `activate`, `rollback`, `list` and `prune` are thin wrappers
//! over the same library; the edge agent's self-update uses it too.
//!
//! The source is a release directory (`releaser dist` / `promote` output: the whole directory is verified with
//! `releaser verify`'s rules and the artifact for `--component` and `--arch` is taken from the manifest) or one
//! tarball: with a `manifest.json` beside it the directory is verified the same way; without one, the
//! tarball's own `.minisig` is verified and the signed trusted comment gives its version and expiry.

use crate::checksums;
use crate::manifest::Manifest;
use crate::minisign::{PublicKey, Signature};
use crate::verify;
use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use nkudo_core::layout::{InstallOutcome, Layout};
use semver::Version;
use std::path::Path;

/// The architecture name releases use for this machine (`amd64`, `arm64`).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A verified tarball held in memory: only these bytes are unpacked.
#[derive(Debug)]
pub struct Verified {
    pub name: String,
    pub version: Version,
    pub bytes: Vec<u8>,
    /// The verified `manifest.json` text and its signature, written into the release directory so that the
    /// installed binaries report the version they were installed as (`nkudo_core::installed`). `None` for a lone
    /// tarball.
    pub metadata: Option<(String, String)>,
}

/// Verifies `source` (a release directory or a tarball) with `key` at `now` and returns the tarball's bytes.
pub fn verify_source(
    source: &Path,
    key: &PublicKey,
    component: &str,
    arch: &str,
    now: DateTime<Utc>,
) -> Result<Verified> {
    let (dir, wanted) = if source.is_dir() {
        (source.to_path_buf(), None)
    } else if source.is_file() {
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the tarball has no file name")?;
        let dir = match source.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => ".".into(),
        };
        if !dir.join("manifest.json").is_file() {
            return verify_lone_tarball(source, &name, key, now);
        }
        (dir, Some(name))
    } else {
        bail!(
            "{} does not exist: pass a release directory or a .tar.gz from one",
            source.display()
        );
    };
    let report = verify::verify_dir(&dir, key, now);
    if !report.ok {
        let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        bail!(
            "{} does not verify with key {}; nothing installed:\n  {}",
            dir.display(),
            report.key_id,
            problems.join("\n  ")
        );
    }
    // The manifest bytes kept are the bytes whose signature is checked (the file could change after verify_dir).
    let manifest_bytes = std::fs::read(dir.join("manifest.json"))?;
    let sig_text = std::fs::read_to_string(dir.join(nkudo_core::installed::SIGNATURE_FILE))
        .context("reading manifest.json.minisig")?;
    key.verify(&Signature::from_file_text(&sig_text)?, &manifest_bytes)
        .context("manifest.json changed after it was verified; nothing installed")?;
    let manifest_text = String::from_utf8(manifest_bytes.clone()).context("manifest.json is not UTF-8")?;
    let m = Manifest::from_json(&manifest_bytes)?;
    let artifact = match &wanted {
        Some(name) => m
            .artifacts
            .iter()
            .find(|a| &a.name == name)
            .with_context(|| format!("{name} is not listed in {}/manifest.json", dir.display()))?,
        None => m
            .artifacts
            .iter()
            .find(|a| a.kind == "tarball" && a.component == component && a.arch == arch)
            .with_context(|| {
                format!(
                    "{} has no {component} tarball for {arch} (--component, --arch)",
                    dir.display()
                )
            })?,
    };
    if artifact.kind != "tarball" {
        bail!(
            "{} is a {}, not a tarball: only tarballs are installed",
            artifact.name,
            artifact.kind
        );
    }
    let bytes = std::fs::read(dir.join(&artifact.name)).with_context(|| format!("reading {}", artifact.name))?;
    // The bytes unpacked are the bytes checked (the file could change after verify_dir read it).
    if checksums::sha256_hex(&bytes) != artifact.sha256 {
        bail!("{} changed after it was verified; nothing installed", artifact.name);
    }
    Ok(Verified {
        name: artifact.name.clone(),
        version: nkudo_core::version::parse(&m.version)?,
        bytes,
        metadata: Some((manifest_text, sig_text)),
    })
}

fn verify_lone_tarball(path: &Path, name: &str, key: &PublicKey, now: DateTime<Utc>) -> Result<Verified> {
    let sig_path = format!("{}.minisig", path.display());
    let text = std::fs::read_to_string(&sig_path)
        .with_context(|| format!("reading {sig_path}: a tarball is installed only with its signature"))?;
    let sig = Signature::from_file_text(&text).with_context(|| format!("reading {sig_path}"))?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    key.verify(&sig, &bytes)
        .with_context(|| format!("{name} does not verify with key {}; nothing installed", key.key_id))?;
    if sig.trusted_field("file") != Some(name) {
        bail!(
            "{sig_path} signs {:?}, not {name:?}; nothing installed",
            sig.trusted_field("file")
        );
    }
    let expires = sig
        .trusted_field("expires")
        .context("the signed comment has no expiry")?;
    let expires = DateTime::parse_from_rfc3339(expires).with_context(|| format!("signed expiry {expires:?}"))?;
    if expires < now {
        bail!("{name}'s signature expired at {expires}: install a newer release");
    }
    let version = sig
        .trusted_field("version")
        .context("the signed comment names no version")?;
    Ok(Verified {
        name: name.to_string(),
        version: nkudo_core::version::parse(version)?,
        bytes,
        metadata: None,
    })
}

/// Unpacks verified tarball bytes into the layout. Returns whether it was installed or already there.
pub fn install(layout: &Layout, verified: &Verified) -> Result<InstallOutcome> {
    let outcome = layout.install(&verified.version, |dir: &Path| -> std::io::Result<()> {
        nkudo_core::archive::unpack_tar_gz(verified.bytes.as_slice(), dir)?;
        if let Some((manifest, signature)) = &verified.metadata {
            nkudo_core::installed::write_metadata(dir, manifest, signature)?;
        }
        Ok(())
    })?;
    Ok(outcome)
}

/// Whether systemd runs this machine (what `--restart` needs).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}
