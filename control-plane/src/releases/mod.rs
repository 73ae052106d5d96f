//! The release registry (ARCHITECTURE §3, §4.7): signed manifests published by operators, their artifacts
//! (uploaded bytes checked against the manifest, or an external base URL), desired agent versions and what a
//! heartbeat answer offers an agent to reach its desired version.

pub mod desired;
pub mod offer;
pub mod range;
#[cfg(test)]
mod verify_tests;

use crate::state::SharedState;
use sqlx::Row;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Full reload period of agent places (sites and effective labels) from other replicas' writes.
const PLACES_EVERY: Duration = Duration::from_secs(30);
/// Recompute period of `nkudo_agent_info`.
const AGENT_INFO_EVERY: Duration = Duration::from_secs(30);

/// Keeps the snapshot fresh until `shutdown`: desired-version changes and releases every second, agent labels
/// every 30 s (a full reload: with 100,000 agents it costs a fraction of a second of CPU, so not more often; label
/// writes made through this replica refresh it at once), a full reload of the entries every minute, and
/// `nkudo_agent_info` every 30 s.
pub async fn refresh_loop(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let (mut places_at, mut full_at, mut info_at) =
        (Instant::now(), Instant::now(), Instant::now() - Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => break,
        }
        let pool = &state.db.pool;
        let full = full_at.elapsed() >= Duration::from_secs(60);
        if full {
            full_at = Instant::now();
        }
        if let Err(e) = state.desired.refresh_entries(pool, full).await {
            tracing::warn!(error = %e, "refreshing desired versions");
        }
        if let Err(e) = state.desired.refresh_releases(pool).await {
            tracing::warn!(error = %e, "refreshing releases");
        }
        if places_at.elapsed() >= PLACES_EVERY {
            places_at = Instant::now();
            if let Err(e) = state.desired.refresh_places(pool).await {
                tracing::warn!(error = %e, "refreshing agent labels");
            }
        }
        if info_at.elapsed() >= AGENT_INFO_EVERY {
            info_at = Instant::now();
            if let Err(e) = refresh_agent_info(&state).await {
                tracing::warn!(error = %e, "refreshing nkudo_agent_info");
            }
        }
    }
}

/// Recomputes `nkudo_agent_info{tenant,site,ring,environment,version}` (agents per combination).
pub async fn refresh_agent_info(state: &SharedState) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT t.slug, s.name, s.labels_json, a.labels_json, a.agent_version FROM agents a \
         JOIN sites s ON s.id = a.site_id JOIN tenants t ON t.id = a.tenant_id WHERE a.revoked_at IS NULL",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let mut counts: std::collections::HashMap<[String; 5], i64> = std::collections::HashMap::new();
    for r in rows {
        let site_labels: String = r.try_get(2)?;
        let agent_labels: String = r.try_get(3)?;
        let labels = desired::effective_labels(&site_labels, &agent_labels);
        let key = [
            r.try_get::<String, _>(0)?,
            r.try_get::<String, _>(1)?,
            labels.get(nkudo_core::api::LABEL_RING).cloned().unwrap_or_default(),
            labels
                .get(nkudo_core::api::LABEL_ENVIRONMENT)
                .cloned()
                .unwrap_or_default(),
            r.try_get::<String, _>(4)?,
        ];
        *counts.entry(key).or_default() += 1;
    }
    let g = &state.metrics.agent_info;
    g.reset();
    for (k, n) in counts {
        g.with_label_values(&[
            k[0].as_str(),
            k[1].as_str(),
            k[2].as_str(),
            k[3].as_str(),
            k[4].as_str(),
        ])
        .set(n);
    }
    Ok(())
}

use nkudo_core::manifest::Manifest;
use nkudo_core::minisign::{PublicKey, Signature};

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no release public keys configured: set RELEASE_PUBLIC_KEYS or RELEASE_PUBLIC_KEYS_FILE")]
    NoKeys,
    #[error("the signature is not a minisign signature: {0}")]
    BadSignatureFile(String),
    #[error("the manifest is signed by key {0}, which is not a configured release key")]
    UnknownKey(String),
    #[error("the manifest signature does not verify with key {0}")]
    BadSignature(String),
    #[error("not a release manifest: {0}")]
    BadManifest(String),
    #[error("the manifest expired at {0}")]
    Expired(String),
}

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub key_id: String,
    pub expires_ms: i64,
}

/// Verifies a manifest text and its signature with the configured keys at `now_ms`.
pub fn verify_manifest(keys: &[PublicKey], text: &str, sig: &str, now_ms: i64) -> Result<Verified, PublishError> {
    if keys.is_empty() {
        return Err(PublishError::NoKeys);
    }
    let signature = Signature::from_file_text(sig).map_err(|e| PublishError::BadSignatureFile(e.to_string()))?;
    let key = keys
        .iter()
        .find(|k| k.key_id == signature.key_id)
        .ok_or_else(|| PublishError::UnknownKey(signature.key_id.to_string()))?;
    key.verify(&signature, text.as_bytes())
        .map_err(|_| PublishError::BadSignature(key.key_id.to_string()))?;
    let manifest = Manifest::from_json(text.as_bytes()).map_err(|e| PublishError::BadManifest(e.to_string()))?;
    let version =
        nkudo_core::version::parse(&manifest.version).map_err(|e| PublishError::BadManifest(e.to_string()))?;
    let channel = nkudo_core::version::Channel::of(&version);
    if manifest.channel != channel.as_str() {
        return Err(PublishError::BadManifest(format!(
            "channel {:?} does not match version {} ({})",
            manifest.channel,
            manifest.version,
            channel.as_str()
        )));
    }
    let expires = chrono::DateTime::parse_from_rfc3339(&manifest.expires)
        .map_err(|e| PublishError::BadManifest(format!("expires {:?}: {e}", manifest.expires)))?
        .timestamp_millis();
    if expires <= now_ms {
        return Err(PublishError::Expired(manifest.expires.clone()));
    }
    for a in &manifest.artifacts {
        if a.name.is_empty() || a.name.contains('/') || a.name.starts_with('.') || a.sha256.len() != 64 {
            return Err(PublishError::BadManifest(format!("artifact {:?} is malformed", a.name)));
        }
    }
    Ok(Verified {
        key_id: key.key_id.to_string(),
        expires_ms: expires,
        manifest,
    })
}

/// The release architecture name of what an agent reports (`x86_64` → `amd64`, `aarch64` → `arm64`).
pub fn release_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(release_arch("x86_64"), "amd64");
        assert_eq!(release_arch("aarch64"), "arm64");
        assert_eq!(release_arch("riscv64"), "riscv64");
    }

    #[test]
    fn no_keys_and_garbage_are_refused() {
        assert!(matches!(verify_manifest(&[], "{}", "x", 0), Err(PublishError::NoKeys)));
    }
}
