//! Packaging, checksums, manifest and signatures: from built binaries to a release directory.
//!
//! ```text
//! <out>/nkudo-edge-<version>-linux-<arch>.tar.gz            bin/, systemd/, config/, LICENSE, README.md
//! <out>/nkudo-control-plane-<version>-linux-<arch>.tar.gz   the same for the control plane
//! <out>/releaser-<version>-linux-<arch>.tar.gz              bin/releaser, LICENSE, README.md
//! <out>/nkudo-control-plane-<version>-oci.tar               multi-arch OCI image archive
//! <out>/manifest.json                                       canonical JSON (see manifest.rs)
//! <out>/SHA256SUMS                                          every artifact and manifest.json
//! <out>/<each of the above>.minisig                         minisign (ED) signatures
//! <out>/nkudo-release.pub                                   the public key (minisign format)
//! ```
//!
//! The archives unpack into a release directory (`/opt/nkudo/releases/<version>/`), so they have no top-level
//! folder. Everything is a function of the binaries, the deployment files, the version, the commit,
//! SOURCE_DATE_EPOCH and the key: two runs give byte-identical directories. The output is assembled in a
//! staging directory beside `<out>` (each file written atomically) and swapped in at the end.

use crate::checksums;
use crate::cross::{arch_of, binary_path};
use crate::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use crate::minisign::{blake2b512, MinisignError, SecretKey};
use crate::oci;
use crate::package::{self, Entry, PackageError};
use chrono::{DateTime, Utc};
use nkudo_core::fsutil::write_atomic;
use nkudo_core::version::{minimum_supported_agent_version, Channel};
use semver::Version;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The public key's file name in the release directory.
pub const PUBLIC_KEY_FILE: &str = "nkudo-release.pub";
/// Default validity of a manifest after its build date.
pub const DEFAULT_EXPIRY_DAYS: u32 = 90;
const SOURCE_URL: &str = "https://github.com/n-kudo/n-kudo";

/// Everything packaging needs.
pub struct PackageRequest<'a> {
    /// Workspace root: `LICENSE` and `deployments/` are read from it.
    pub workspace: PathBuf,
    /// Cargo target directory holding `<triple>/<profile>/<binary>` (`cross::profile_of`).
    pub target_dir: PathBuf,
    pub targets: Vec<String>,
    pub out_dir: PathBuf,
    pub version: Version,
    pub git_commit: String,
    pub source_date_epoch: u64,
    pub expiry_days: u32,
    /// PEM CA bundle for the OCI image.
    pub ca_bundle: PathBuf,
    pub key: &'a SecretKey,
}

/// One file written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What packaging did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackageReport {
    pub out_dir: PathBuf,
    pub version: String,
    pub channel: String,
    pub git_commit: String,
    pub build_date: String,
    pub expires: String,
    pub key_id: String,
    pub files: Vec<Written>,
    /// Binary sizes (`<triple>/<name>` → bytes).
    pub binaries: Vec<(String, u64)>,
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Errors of packaging.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("missing binary {0} (build it first: `releaser build` or `cargo xtask dist`)")]
    MissingBinary(PathBuf),
    #[error("unsupported target {0}")]
    Target(String),
    #[error("archive: {0}")]
    Package(#[from] PackageError),
    #[error("signing: {0}")]
    Sign(#[from] MinisignError),
    #[error("SOURCE_DATE_EPOCH {0} is out of range")]
    Epoch(u64),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DistError + '_ {
    move |source| DistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// RFC 3339 UTC (seconds) of a Unix time.
pub fn rfc3339(epoch: u64) -> Option<String> {
    let t: DateTime<Utc> = DateTime::from_timestamp(i64::try_from(epoch).ok()?, 0)?;
    Some(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The trusted comment of every signature: machine-readable, tab-separated `key:value` fields, no wall clock.
pub fn trusted_comment(epoch: u64, file: &str, version: &str, channel: &str, expires: &str) -> String {
    format!("timestamp:{epoch}\tfile:{file}\tversion:{version}\tchannel:{channel}\texpires:{expires}\thashed")
}

/// The untrusted comment of every signature.
pub const UNTRUSTED_COMMENT: &str = "signature from the n-kudo release key";

struct Job {
    name: String,
    component: &'static str,
    kind: &'static str,
    arch: String,
    build: Box<dyn FnOnce() -> Result<Vec<u8>, DistError> + Send>,
}

/// Builds every artifact, the manifest, SHA256SUMS and the signatures into `req.out_dir`.
/// `progress` is called with each artifact's name when it is done.
pub fn package(req: &PackageRequest<'_>, progress: &(dyn Fn(&str) + Sync)) -> Result<PackageReport, DistError> {
    let started = Instant::now();
    let epoch = req.source_date_epoch;
    let build_date = rfc3339(epoch).ok_or(DistError::Epoch(epoch))?;
    let expires = epoch
        .checked_add(u64::from(req.expiry_days) * 86_400)
        .and_then(rfc3339)
        .ok_or(DistError::Epoch(epoch))?;
    let version = req.version.to_string();
    let channel = Channel::of(&req.version).as_str().to_string();

    let read = |p: &Path| std::fs::read(p).map_err(io_err(p));
    let license = read(&req.workspace.join("LICENSE"))?;
    let deploy = req.workspace.join("deployments");

    // Binaries per target.
    let mut binaries = Vec::new();
    let mut cp_images: Vec<(String, Vec<u8>)> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    for triple in &req.targets {
        let arch = arch_of(triple)
            .ok_or_else(|| DistError::Target(triple.clone()))?
            .to_string();
        for (bin, _) in crate::cross::BINARIES {
            let path = binary_path(&req.target_dir, triple, bin);
            let data = std::fs::read(&path).map_err(|_| DistError::MissingBinary(path.clone()))?;
            binaries.push((format!("{triple}/{bin}"), data.len() as u64));
            let mut entries = vec![
                Entry::file(format!("bin/{bin}"), data.clone(), true),
                Entry::file("LICENSE", license.clone(), false),
                Entry::file(
                    "README.md",
                    read(&deploy.join("package").join(format!("{bin}.README.md")))?,
                    false,
                ),
            ];
            match bin {
                "nkudo-edge" => {
                    entries.push(Entry::file(
                        "systemd/nkudo-edge.service",
                        read(&deploy.join("systemd/nkudo-edge.service"))?,
                        false,
                    ));
                    entries.push(Entry::file(
                        "config/edge.toml",
                        read(&deploy.join("config/edge.toml"))?,
                        false,
                    ));
                }
                "nkudo-control-plane" => {
                    entries.push(Entry::file(
                        "systemd/nkudo-control-plane.service",
                        read(&deploy.join("systemd/nkudo-control-plane.service"))?,
                        false,
                    ));
                    entries.push(Entry::file(
                        "config/control-plane.env",
                        read(&deploy.join("config/control-plane.env"))?,
                        false,
                    ));
                    cp_images.push((arch.clone(), data));
                }
                _ => {}
            }
            jobs.push(Job {
                name: format!("{bin}-{version}-linux-{arch}.tar.gz"),
                component: bin,
                kind: "tarball",
                arch: arch.clone(),
                build: Box::new(move || Ok(package::tar_gz(&entries, &[], epoch)?)),
            });
        }
    }
    if !cp_images.is_empty() {
        let ca = read(&req.ca_bundle)?;
        let (v, c, d) = (version.clone(), req.git_commit.clone(), build_date.clone());
        jobs.push(Job {
            name: format!("nkudo-control-plane-{version}-oci.tar"),
            component: "nkudo-control-plane",
            kind: "oci-image",
            arch: if cp_images.len() > 1 {
                "multi".into()
            } else {
                cp_images[0].0.clone()
            },
            build: Box::new(move || {
                let inputs: Vec<oci::ImageInput<'_>> = cp_images
                    .iter()
                    .map(|(arch, bin)| oci::ImageInput { arch, binary: bin })
                    .collect();
                let params = oci::ImageParams {
                    version: &v,
                    git_commit: &c,
                    created: &d,
                    mtime: epoch,
                    ca_bundle: &ca,
                    source_url: SOURCE_URL,
                };
                Ok(oci::build_archive(&inputs, &params)?)
            }),
        });
    }

    // Staging directory beside the output, swapped in at the end.
    let out = &req.out_dir;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let out_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dist".into());
    let staging = parent.join(format!(".{out_name}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;

    let sign_file = |name: &str, bytes: &[u8]| -> Result<(), DistError> {
        let tc = trusted_comment(epoch, name, &version, &channel, &expires);
        let sig = req.key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT)?;
        let p = staging.join(format!("{name}.minisig"));
        write_atomic(&p, sig.to_file_text().as_bytes(), 0o644).map_err(io_err(&p))
    };

    // Build, write, hash and sign the artifacts on every core.
    let results: Mutex<Vec<(Artifact, Written)>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<DistError>> = Mutex::new(None);
    let queue = Mutex::new(jobs);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let job = match queue.lock().expect("queue lock").pop() {
                    Some(j) => j,
                    None => break,
                };
                let name = job.name.clone();
                let r = (|| -> Result<(Artifact, Written), DistError> {
                    let bytes = (job.build)()?;
                    let p = staging.join(&job.name);
                    write_atomic(&p, &bytes, 0o644).map_err(io_err(&p))?;
                    sign_file(&job.name, &bytes)?;
                    let sha256 = checksums::sha256_hex(&bytes);
                    let artifact = Artifact {
                        name: job.name.clone(),
                        component: job.component.to_string(),
                        kind: job.kind.to_string(),
                        os: "linux".into(),
                        arch: job.arch.clone(),
                        size: bytes.len() as u64,
                        sha256: sha256.clone(),
                    };
                    let written = Written {
                        name: job.name,
                        size: bytes.len() as u64,
                        sha256,
                    };
                    Ok((artifact, written))
                })();
                match r {
                    Ok(x) => {
                        results.lock().expect("results lock").push(x);
                        progress(&name);
                    }
                    Err(e) => {
                        first_error.lock().expect("error lock").get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("error lock") {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let mut results = results.into_inner().expect("results lock");
    results.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let (artifacts, mut files): (Vec<Artifact>, Vec<Written>) = results.into_iter().unzip();

    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.clone(),
        channel: channel.clone(),
        git_commit: req.git_commit.clone(),
        build_date: build_date.clone(),
        expires: expires.clone(),
        minimum_supported_agent_version: minimum_supported_agent_version(&req.version).to_string(),
        artifacts,
        promoted_from: None,
        rollback_of: None,
    };
    let mut finish = || -> Result<(), DistError> {
        let manifest_bytes = manifest.to_canonical_json().into_bytes();
        let p = staging.join("manifest.json");
        write_atomic(&p, &manifest_bytes, 0o644).map_err(io_err(&p))?;
        sign_file("manifest.json", &manifest_bytes)?;
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
        write_atomic(&p, sums.as_bytes(), 0o644).map_err(io_err(&p))?;
        sign_file("SHA256SUMS", sums.as_bytes())?;
        let p = staging.join(PUBLIC_KEY_FILE);
        write_atomic(&p, req.key.public_key().to_file_text().as_bytes(), 0o644).map_err(io_err(&p))?;
        // Swap: the old directory (if any) moves aside, the new one in, the old one goes.
        let old = parent.join(format!(".{out_name}.old-{}", std::process::id()));
        if out.exists() {
            std::fs::rename(out, &old).map_err(io_err(out))?;
        }
        std::fs::rename(&staging, out).map_err(io_err(out))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PackageReport {
        out_dir: out.clone(),
        version,
        channel,
        git_commit: req.git_commit.clone(),
        build_date,
        expires,
        key_id: req.key.key_id.to_string(),
        files,
        binaries,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_comments() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        let tc = trusted_comment(1, "a.tar.gz", "0.1.0", "release", "1970-01-01T00:00:01Z");
        assert_eq!(
            tc,
            "timestamp:1\tfile:a.tar.gz\tversion:0.1.0\tchannel:release\texpires:1970-01-01T00:00:01Z\thashed"
        );
    }
}
