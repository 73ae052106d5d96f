//! `releaser publish <dist dir> --url <control plane>`: registers a signed release with a control plane's release
//! registry (admin key), so that the control plane can name it as agents' desired version.
//!
//! 1. The directory is checked locally first: with a trusted public key (`--public-key`), exactly as `releaser
//!    verify` does (signatures, sizes, SHA-256, expiry); without one, the manifest's expiry and the size and
//!    SHA-256 of every artifact to upload (the control plane checks the signature against its own
//!    `RELEASE_PUBLIC_KEYS` anyway). Nothing is sent when this fails.
//! 2. `POST /admin/releases` with the manifest text and its signature exactly as signed (201: registered;
//!    200: the same manifest was published already; 409: another manifest holds this version).
//! 3. `PUT /admin/releases/{version}/artifacts/{name}` with each artifact's bytes, skipping those the control plane
//!    already holds (`available`: the same manifest, so the same SHA-256). With `--external-base-url` nothing is
//!    uploaded: agents fetch `<base>/<name>` and verify the bytes themselves.
//! 4. `GET /admin/releases/{version}` confirms that every selected artifact is available.
//!
//! `--only-component nkudo-edge` restricts the uploads (and the local check of artifact files) to one component:
//! agents only ever fetch their own tarball.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use nkudo_core::api::{ErrorBody, PublishReleaseRequest, ReleaseInfo};
use nkudo_core::installed::{MANIFEST_FILE, SIGNATURE_FILE};
use releaser::checksums;
use releaser::manifest::Manifest;
use releaser::minisign::PublicKey;
use releaser::verify;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to publish where.
pub struct PublishRequest<'a> {
    /// The release directory (`releaser dist` / `promote` output).
    pub dir: PathBuf,
    /// The control plane (`https://host:8443`).
    pub url: String,
    pub admin_key: String,
    /// PEM CA bundle to trust for `url`; else the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Agents fetch artifacts from `<external_base_url>/<name>`; nothing is uploaded.
    pub external_base_url: Option<String>,
    /// Only this component's artifacts are checked and uploaded.
    pub only_component: Option<String>,
    /// Verify the directory with this key first (as `releaser verify`).
    pub trusted: Option<&'a PublicKey>,
    pub now: DateTime<Utc>,
}

/// Progress of the uploads, for a progress bar.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// What will be uploaded: `files` files, `bytes` bytes in all.
    Plan { files: usize, bytes: u64 },
    /// `name` (`size` bytes) is being uploaded.
    Uploading { name: &'a str, size: u64 },
    /// `name` was uploaded and accepted.
    Uploaded { name: &'a str, size: u64 },
}

/// What happened to one artifact.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArtifactOutcome {
    pub name: String,
    pub component: String,
    pub arch: String,
    pub size: u64,
    pub sha256: String,
    /// `uploaded`, `already-available`, `external` or `not-selected`.
    pub action: String,
    /// The control plane holds it (or an external base URL serves it) after publishing.
    pub available: bool,
}

/// What `publish` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishReport {
    pub url: String,
    pub version: String,
    pub channel: String,
    pub expires: String,
    /// The key id that signed the manifest, as the control plane recorded it.
    pub key_id: String,
    /// The release was new (201); `false`: the identical manifest was published before (200).
    pub created: bool,
    /// Whether the directory was verified with a trusted key (else: only sizes and hashes).
    pub verified_signatures: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_base_url: Option<String>,
    pub uploaded_bytes: u64,
    pub artifacts: Vec<ArtifactOutcome>,
}

/// The local check failed: nothing was sent. (`releaser publish` exits 3, as `verify` does.)
#[derive(Debug, thiserror::Error)]
#[error("{} does not verify; nothing published:\n  {}", dir.display(), problems.join("\n  "))]
pub struct LocalVerifyFailed {
    pub dir: PathBuf,
    pub problems: Vec<String>,
}

/// A client for the control plane: `ca_cert` (a PEM bundle) as the trust roots when given, else the system's.
pub fn http_client(ca_cert: Option<&Path>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .user_agent(concat!("nkudo-releaser/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-cert {} is not a PEM bundle", path.display()))?;
        if certs.is_empty() {
            bail!("--ca-cert {} holds no certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("building the HTTP client")
}

/// A current-thread runtime for the blocking CLI.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")
}

/// `METHOD url: status CODE: message` from an error answer (the body when it is not an [`ErrorBody`]).
fn describe_error(what: &str, status: reqwest::StatusCode, body: &[u8]) -> (Option<String>, String) {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => (
            Some(e.code.clone()),
            format!("{what}: {status} {}: {}", e.code, e.error),
        ),
        Err(_) => (
            None,
            format!(
                "{what}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)]).trim()
            ),
        ),
    }
}

fn selected(m: &Manifest, only: Option<&str>) -> Vec<releaser::manifest::Artifact> {
    m.artifacts
        .iter()
        .filter(|a| only.is_none_or(|c| a.component == c))
        .cloned()
        .collect()
}

/// The local check (step 1). Returns the manifest text and signature text exactly as read.
fn check_locally(req: &PublishRequest<'_>) -> Result<(String, String, Manifest)> {
    let dir = &req.dir;
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: pass a release directory (`releaser dist` output)",
            dir.display()
        );
    }
    let manifest_text = std::fs::read_to_string(dir.join(MANIFEST_FILE))
        .with_context(|| format!("reading {}/{MANIFEST_FILE}", dir.display()))?;
    let signature_text = std::fs::read_to_string(dir.join(SIGNATURE_FILE))
        .with_context(|| format!("reading {}/{SIGNATURE_FILE}", dir.display()))?;
    let manifest =
        Manifest::from_json(manifest_text.as_bytes()).with_context(|| format!("{}/{MANIFEST_FILE}", dir.display()))?;
    let only = req.only_component.as_deref();
    if let Some(c) = only {
        if !manifest.artifacts.iter().any(|a| a.component == c) {
            bail!(
                "the manifest of {} lists no {c} artifact (--only-component)",
                manifest.version
            );
        }
    }
    let wanted = selected(&manifest, only);
    // Artifact files that need not be here: those of other components, and with an external base URL all of them.
    let optional = |file: &str| -> bool {
        manifest.artifacts.iter().any(|a| {
            (file == a.name || file == format!("{}.minisig", a.name))
                && (req.external_base_url.is_some() || !wanted.iter().any(|w| w.name == a.name))
        })
    };
    let mut problems = Vec::new();
    if let Some(key) = req.trusted {
        let report = verify::verify_dir(dir, key, req.now);
        for p in &report.problems {
            if p.reason == "missing file" && optional(&p.file) {
                continue;
            }
            problems.push(p.to_string());
        }
        // The bytes sent are the bytes verified.
        if problems.is_empty() {
            let sig = releaser::minisign::Signature::from_file_text(&signature_text)?;
            if key.verify(&sig, manifest_text.as_bytes()).is_err() {
                problems.push(format!("{MANIFEST_FILE}: changed while it was verified"));
            }
        }
    } else {
        match DateTime::parse_from_rfc3339(&manifest.expires) {
            Ok(exp) if exp.with_timezone(&Utc) <= req.now => problems.push(format!(
                "{MANIFEST_FILE}: expired at {} (now {})",
                manifest.expires,
                req.now.format("%Y-%m-%dT%H:%M:%SZ")
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{MANIFEST_FILE}: invalid expires {:?}: {e}", manifest.expires)),
        }
        for a in &wanted {
            let p = dir.join(&a.name);
            match std::fs::metadata(&p) {
                Err(_) if req.external_base_url.is_some() => continue,
                Err(e) => problems.push(format!("{}: cannot read: {e}", a.name)),
                Ok(md) if md.len() != a.size => problems.push(format!(
                    "{}: size {} differs from the manifest's {}",
                    a.name,
                    md.len(),
                    a.size
                )),
                Ok(_) => {
                    let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                    let digest = sha256_reader(f).with_context(|| format!("reading {}", p.display()))?;
                    if digest != a.sha256 {
                        problems.push(format!(
                            "{}: SHA-256 {digest} differs from the manifest's {}",
                            a.name, a.sha256
                        ));
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(LocalVerifyFailed {
            dir: dir.clone(),
            problems,
        }
        .into());
    }
    Ok((manifest_text, signature_text, manifest))
}

fn sha256_reader(mut r: impl std::io::Read) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Publishes the release directory (see the module documentation). `progress` sees the uploads.
pub fn publish(req: &PublishRequest<'_>, progress: &mut dyn FnMut(Progress<'_>)) -> Result<PublishReport> {
    let (manifest_text, signature_text, manifest) = check_locally(req)?;
    if let Some(u) = &req.external_base_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            bail!("--external-base-url {u:?} is not an http(s) URL");
        }
    }
    let client = http_client(req.ca_cert.as_deref())?;
    let base = req.url.trim_end_matches('/').to_string();
    let version = manifest.version.clone();
    let wanted = selected(&manifest, req.only_component.as_deref());
    runtime()?.block_on(async {
        // 2. Register the manifest.
        let endpoint = format!("{base}/admin/releases");
        let what = format!("POST {endpoint}");
        let resp = client
            .post(&endpoint)
            .header("X-Admin-Key", &req.admin_key)
            .timeout(Duration::from_secs(60))
            .json(&PublishReleaseRequest {
                manifest: manifest_text.clone(),
                signature: signature_text.clone(),
                external_base_url: req.external_base_url.clone(),
            })
            .send()
            .await
            .with_context(|| format!("{what} (is --url right? for a private CA pass --ca-cert)"))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {what}"))?;
        let created = match status.as_u16() {
            201 => true,
            200 => false,
            _ => {
                let (code, msg) = describe_error(&what, status, &body);
                let hint = match (status.as_u16(), code.as_deref()) {
                    (401, _) | (403, _) => "the admin key is wrong or missing (--admin-key, $NKUDO_ADMIN_KEY)".into(),
                    (409, _) => format!(
                        "another manifest is already published as {version}: a version is published once; publish \
                         the identical directory again, or release a new version"
                    ),
                    (_, Some("INVALID_SIGNATURE")) => {
                        "the control plane does not trust the key that signed this manifest: add its public key to \
                         the control plane's RELEASE_PUBLIC_KEYS, or sign with a trusted key"
                            .into()
                    }
                    (_, Some("RELEASE_KEYS_NOT_CONFIGURED")) => {
                        "set RELEASE_PUBLIC_KEYS on the control plane (the base64 release public keys)".into()
                    }
                    (_, Some("MANIFEST_EXPIRED")) => {
                        "the manifest expired: build or promote the release again for a fresh expiry".into()
                    }
                    (404, _) | (405, _) => {
                        "this control plane has no release registry (upgrade it, or check --url)".into()
                    }
                    _ => String::new(),
                };
                if hint.is_empty() {
                    bail!("{msg}");
                }
                bail!("{msg}\n  {hint}");
            }
        };
        let info: ReleaseInfo =
            serde_json::from_slice(&body).with_context(|| format!("{what}: the answer is not a release"))?;
        if info.version != version {
            bail!(
                "{what}: the control plane registered version {:?}, not {version:?}",
                info.version
            );
        }

        // 3. Upload what the control plane does not hold yet.
        let available = |info: &ReleaseInfo, name: &str, sha: &str| {
            info.artifacts
                .iter()
                .any(|a| a.name == name && a.sha256 == sha && a.available)
        };
        let to_upload: Vec<&releaser::manifest::Artifact> = if req.external_base_url.is_some() {
            Vec::new()
        } else {
            wanted
                .iter()
                .filter(|a| !available(&info, &a.name, &a.sha256))
                .collect()
        };
        progress(Progress::Plan {
            files: to_upload.len(),
            bytes: to_upload.iter().map(|a| a.size).sum(),
        });
        let mut uploaded_bytes = 0;
        let mut uploaded = Vec::new();
        for a in &to_upload {
            let path = req.dir.join(&a.name);
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            // The bytes sent are the bytes checked.
            if bytes.len() as u64 != a.size || checksums::sha256_hex(&bytes) != a.sha256 {
                bail!("{} changed after it was verified; stopped before uploading it", a.name);
            }
            progress(Progress::Uploading {
                name: &a.name,
                size: a.size,
            });
            let endpoint = format!("{base}/admin/releases/{version}/artifacts/{}", a.name);
            let what = format!("PUT {endpoint}");
            let resp = client
                .put(&endpoint)
                .header("X-Admin-Key", &req.admin_key)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .timeout(Duration::from_secs(30 * 60))
                .body(bytes)
                .send()
                .await
                .with_context(|| what.clone())?;
            let status = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            if !status.is_success() {
                let (code, msg) = describe_error(&what, status, &body);
                if code.as_deref() == Some("ARTIFACT_MISMATCH") {
                    bail!("{msg}\n  the control plane received bytes that differ from the signed manifest");
                }
                bail!("{msg}");
            }
            uploaded_bytes += a.size;
            uploaded.push(a.name.clone());
            progress(Progress::Uploaded {
                name: &a.name,
                size: a.size,
            });
        }

        // 4. Confirm.
        let endpoint = format!("{base}/admin/releases/{version}");
        let what = format!("GET {endpoint}");
        let resp = client
            .get(&endpoint)
            .header("X-Admin-Key", &req.admin_key)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .with_context(|| what.clone())?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {what}"))?;
        if !status.is_success() {
            bail!("{}", describe_error(&what, status, &body).1);
        }
        let info: ReleaseInfo =
            serde_json::from_slice(&body).with_context(|| format!("{what}: the answer is not a release"))?;
        let mut artifacts = Vec::new();
        let mut missing = Vec::new();
        for a in &manifest.artifacts {
            let is_wanted = wanted.iter().any(|w| w.name == a.name);
            let avail = available(&info, &a.name, &a.sha256);
            let action = if !is_wanted {
                "not-selected"
            } else if req.external_base_url.is_some() {
                "external"
            } else if uploaded.contains(&a.name) {
                "uploaded"
            } else {
                "already-available"
            };
            if is_wanted && !avail {
                missing.push(a.name.clone());
            }
            artifacts.push(ArtifactOutcome {
                name: a.name.clone(),
                component: a.component.clone(),
                arch: a.arch.clone(),
                size: a.size,
                sha256: a.sha256.clone(),
                action: action.into(),
                available: avail,
            });
        }
        if !missing.is_empty() {
            bail!(
                "{version} is registered, but the control plane does not list as available: {}",
                missing.join(", ")
            );
        }
        Ok(PublishReport {
            url: base.clone(),
            version: version.clone(),
            channel: manifest.channel.clone(),
            expires: manifest.expires.clone(),
            key_id: info.key_id,
            created,
            verified_signatures: req.trusted.is_some(),
            external_base_url: info.external_base_url.or(req.external_base_url.clone()),
            uploaded_bytes,
            artifacts,
        })
    })
}
