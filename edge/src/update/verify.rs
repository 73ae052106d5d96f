//! Checks of an update offer BEFORE anything is downloaded (ARCHITECTURE §3): the manifest signature with one of
//! the configured release keys (the key id must match), the manifest's expiry (freeze attacks: an expired
//! manifest is stale metadata), the manifest's version against the offer, the artifact entry (component, kind,
//! OS, this host's architecture, size, SHA-256) against the offer, and the version rule (never below the running
//! version unless the control plane names a rollback target). After the download, [`check_file`] checks the
//! bytes against the signed size and SHA-256.

use nkudo_core::api::UpdateOffer;
use nkudo_core::manifest::{Artifact, Manifest, PRODUCT};
use nkudo_core::minisign::{PublicKey, Signature};
use std::cmp::Ordering;
use std::io::Read;
use std::path::Path;

/// The component whose tarball the agent installs.
pub const COMPONENT: &str = "nkudo-edge";

/// Why an offer was refused. Every refusal is permanent for that version (it is not retried automatically).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

/// An offer whose manifest verified: what to download and install.
#[derive(Debug, Clone)]
pub struct VerifiedOffer {
    pub version: String,
    pub manifest: Manifest,
    pub artifact: Artifact,
}

/// The architecture name releases use for this host (`amd64`, `arm64`).
pub fn host_arch() -> String {
    crate::hostfacts::arch()
}

/// Verifies the offer's manifest and its agreement with the offer (see the module documentation).
pub fn verify_offer(
    offer: &UpdateOffer,
    keys: &[PublicKey],
    running: &str,
    arch: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<VerifiedOffer, Refusal> {
    if keys.is_empty() {
        return refuse(
            "no release public key is configured (release_public_keys in edge.toml, --release-public-key or \
             NKUDO_RELEASE_PUBLIC_KEYS): self-updates are refused",
        );
    }
    let sig = Signature::from_file_text(&offer.manifest_signature).or_else(|e| {
        refuse(format!(
            "the manifest signature of {} is unreadable: {e}",
            offer.version
        ))
    })?;
    let Some(key) = keys.iter().find(|k| k.key_id == sig.key_id) else {
        let trusted: Vec<String> = keys.iter().map(|k| k.key_id.to_string()).collect();
        return refuse(format!(
            "the manifest of {} is signed by key {}, which is not a trusted release key (trusted: {})",
            offer.version,
            sig.key_id,
            trusted.join(", ")
        ));
    };
    if let Err(e) = key.verify(&sig, offer.manifest.as_bytes()) {
        return refuse(format!(
            "the manifest signature of {} does not verify with key {}: {e}",
            offer.version, key.key_id
        ));
    }
    let manifest = Manifest::from_json(offer.manifest.as_bytes())
        .or_else(|e| refuse(format!("the signed manifest of {} is unreadable: {e}", offer.version)))?;
    if manifest.product != PRODUCT {
        return refuse(format!(
            "the signed manifest is for product {:?}, not {PRODUCT}",
            manifest.product
        ));
    }
    let expires = crate::state::parse_time(&manifest.expires).ok_or_else(|| {
        Refusal(format!(
            "the signed manifest's expiry {:?} is unreadable",
            manifest.expires
        ))
    })?;
    if expires <= now {
        return refuse(format!(
            "stale metadata: the manifest of {} expired at {} (a re-signed manifest is needed)",
            manifest.version, manifest.expires
        ));
    }
    if manifest.version != offer.version {
        return refuse(format!(
            "the control plane offers {} but the signed manifest is for {}",
            offer.version, manifest.version
        ));
    }
    let offered = nkudo_core::version::parse(&manifest.version)
        .or_else(|e| refuse(format!("the signed version {:?} is not SemVer: {e}", manifest.version)))?;
    if let Ok(current) = nkudo_core::version::parse(running) {
        if nkudo_core::version::compare(&offered, &current) == Ordering::Less && !offer.rollback {
            return refuse(format!(
                "{} is older than the running version {running} and the control plane does not name it as a \
                 rollback target: refused (rollback protection)",
                manifest.version
            ));
        }
    }
    let a = &offer.artifact;
    let Some(entry) = manifest.artifacts.iter().find(|x| x.name == a.name) else {
        return refuse(format!(
            "{} is not listed in the signed manifest of {}",
            a.name, manifest.version
        ));
    };
    if entry.component != COMPONENT || entry.kind != "tarball" {
        return refuse(format!(
            "{} is a {} {}, not the {COMPONENT} tarball",
            a.name, entry.component, entry.kind
        ));
    }
    if entry.os != "linux" || entry.arch != arch {
        return refuse(format!(
            "{} is built for {}/{}, this host is linux/{arch}",
            a.name, entry.os, entry.arch
        ));
    }
    if entry.size != a.size {
        return refuse(format!(
            "the offer says {} has {} bytes, the signed manifest {}",
            a.name, a.size, entry.size
        ));
    }
    if !entry.sha256.eq_ignore_ascii_case(&a.sha256) {
        return refuse(format!(
            "the offer's SHA-256 of {} differs from the signed manifest's",
            a.name
        ));
    }
    if !is_safe_name(&a.name) {
        return refuse(format!("artifact name {:?} is not a plain file name", a.name));
    }
    Ok(VerifiedOffer {
        version: manifest.version.clone(),
        artifact: entry.clone(),
        manifest,
    })
}

/// A plain file name (no path separators, not hidden, printable ASCII).
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

/// SHA-256 (lower-case hex) and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((hex(ctx.finish().as_ref()), len))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the downloaded file against the signed size and SHA-256.
pub fn check_file(path: &Path, artifact: &Artifact) -> Result<(), Refusal> {
    let (digest, len) =
        sha256_file(path).or_else(|e| refuse(format!("cannot read the download {}: {e}", path.display())))?;
    if len != artifact.size {
        return refuse(format!(
            "{} has {len} bytes, the signed manifest says {}",
            artifact.name, artifact.size
        ));
    }
    if !digest.eq_ignore_ascii_case(&artifact.sha256) {
        return refuse(format!(
            "{}: SHA-256 {digest} does not match the signed {} (tampered or damaged artifact)",
            artifact.name, artifact.sha256
        ));
    }
    Ok(())
}
