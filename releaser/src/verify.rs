//! `releaser verify <dir>`: checks a release directory the way an agent must before installing anything.
//!
//! With a pinned public key: the signature of `manifest.json` (and that its trusted comment names
//! `manifest.json` and the manifest's version), the manifest's expiry, the signature of `SHA256SUMS`, and for
//! every artifact the manifest lists: present, size, SHA-256, the same digest in `SHA256SUMS`, and its own
//! signature (whose trusted comment must name that file). Every problem names the file and the reason; all
//! problems are reported, not just the first.

use crate::checksums;
use crate::manifest::Manifest;
use crate::minisign::{blake2b512, PublicKey, Signature};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::Path;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: String,
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.reason)
    }
}

/// The result of a verification.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub ok: bool,
    pub key_id: String,
    pub version: Option<String>,
    pub channel: Option<String>,
    pub expires: Option<String>,
    /// Files whose signature, size and digest all checked out.
    pub verified: Vec<String>,
    pub problems: Vec<Problem>,
    /// Files in the directory that nothing covers (not an error: nothing trusts them).
    pub unlisted: Vec<String>,
}

struct Ctx<'a> {
    dir: &'a Path,
    key: &'a PublicKey,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn problem(&mut self, file: &str, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_string(),
            reason: reason.into(),
        });
    }

    fn read(&mut self, name: &str) -> Option<Vec<u8>> {
        match std::fs::read(self.dir.join(name)) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.problem(name, "missing file");
                None
            }
            Err(e) => {
                self.problem(name, format!("cannot read: {e}"));
                None
            }
        }
    }

    /// Checks `<name>.minisig` over `bytes`; returns the signature when it verifies.
    fn check_signature(&mut self, name: &str, bytes: &[u8]) -> Option<Signature> {
        let sig_name = format!("{name}.minisig");
        let text = self.read(&sig_name)?;
        let sig = match std::str::from_utf8(&text)
            .map_err(|e| e.to_string())
            .and_then(|t| Signature::from_file_text(t).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                self.problem(&sig_name, e);
                return None;
            }
        };
        if let Err(e) = self.key.verify_prehashed(&sig, &blake2b512(bytes)) {
            let file = match e {
                crate::minisign::MinisignError::BadSignature => name.to_string(),
                _ => sig_name.clone(),
            };
            let reason = match e {
                crate::minisign::MinisignError::BadSignature => {
                    format!("signature {sig_name} does not match the file (tampered file or signature)")
                }
                other => other.to_string(),
            };
            self.problem(&file, reason);
            return None;
        }
        match sig.trusted_field("file") {
            Some(f) if f == name => Some(sig),
            other => {
                self.problem(
                    &sig_name,
                    format!(
                        "the signed trusted comment names file {other:?}, not {name:?} (signature of another file)"
                    ),
                );
                None
            }
        }
    }
}

/// Verifies the release directory `dir` with the trusted `key` at time `now`.
pub fn verify_dir(dir: &Path, key: &PublicKey, now: DateTime<Utc>) -> Report {
    let mut ctx = Ctx {
        dir,
        key,
        problems: Vec::new(),
    };
    let mut report = Report {
        key_id: key.key_id.to_string(),
        ..Report::default()
    };
    if !dir.is_dir() {
        ctx.problem(&dir.display().to_string(), "not a directory");
        report.problems = ctx.problems;
        return report;
    }
    let mut covered: Vec<String> = vec!["manifest.json".into(), "manifest.json.minisig".into()];

    // 1. The manifest: signature, parse, version binding, expiry.
    let manifest = ctx.read("manifest.json").and_then(|bytes| {
        let sig = ctx.check_signature("manifest.json", &bytes);
        let m = match Manifest::from_json(&bytes) {
            Ok(m) => m,
            Err(e) => {
                ctx.problem("manifest.json", e.to_string());
                return None;
            }
        };
        let sig = sig?;
        if sig.trusted_field("version") != Some(m.version.as_str()) {
            ctx.problem(
                "manifest.json.minisig",
                format!(
                    "signed version {:?} differs from the manifest's {:?}",
                    sig.trusted_field("version"),
                    m.version
                ),
            );
            return None;
        }
        match DateTime::parse_from_rfc3339(&m.expires) {
            Ok(exp) if exp.with_timezone(&Utc) <= now => {
                ctx.problem(
                    "manifest.json",
                    format!("expired at {} (now {})", m.expires, now.format("%Y-%m-%dT%H:%M:%SZ")),
                );
            }
            Ok(_) => {}
            Err(e) => ctx.problem("manifest.json", format!("invalid expires {:?}: {e}", m.expires)),
        }
        report.verified.push("manifest.json".into());
        Some(m)
    });
    if let Some(m) = &manifest {
        report.version = Some(m.version.clone());
        report.channel = Some(m.channel.clone());
        report.expires = Some(m.expires.clone());
    }

    // 2. SHA256SUMS: signature and content.
    covered.extend(["SHA256SUMS".into(), "SHA256SUMS.minisig".into()]);
    let sums: Option<BTreeMap<String, String>> = ctx.read("SHA256SUMS").and_then(|bytes| {
        let sig_ok = ctx.check_signature("SHA256SUMS", &bytes).is_some();
        let parsed = match std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|t| checksums::parse(t).map_err(|e| e.to_string()))
        {
            Ok(p) => p.into_iter().collect(),
            Err(e) => {
                ctx.problem("SHA256SUMS", e);
                return None;
            }
        };
        if sig_ok {
            report.verified.push("SHA256SUMS".into());
            Some(parsed)
        } else {
            None
        }
    });

    // 3. Every artifact of the manifest.
    if let Some(m) = &manifest {
        for a in &m.artifacts {
            covered.extend([a.name.clone(), format!("{}.minisig", a.name)]);
            if a.name.contains('/') || a.name.starts_with('.') {
                ctx.problem(&a.name, "artifact name is not a plain file name");
                continue;
            }
            let Some(bytes) = ctx.read(&a.name) else { continue };
            let mut ok = true;
            if bytes.len() as u64 != a.size {
                ctx.problem(
                    &a.name,
                    format!("size {} differs from the manifest's {}", bytes.len(), a.size),
                );
                ok = false;
            }
            let digest = checksums::sha256_hex(&bytes);
            if digest != a.sha256 {
                ctx.problem(
                    &a.name,
                    format!("SHA-256 {digest} differs from the manifest's {}", a.sha256),
                );
                ok = false;
            }
            if let Some(sums) = &sums {
                match sums.get(&a.name) {
                    Some(h) if *h == a.sha256 => {}
                    Some(h) => {
                        ctx.problem(
                            "SHA256SUMS",
                            format!("{}: {h} differs from the manifest's {}", a.name, a.sha256),
                        );
                        ok = false;
                    }
                    None => {
                        ctx.problem("SHA256SUMS", format!("does not list {}", a.name));
                        ok = false;
                    }
                }
            }
            if ctx.check_signature(&a.name, &bytes).is_none() {
                ok = false;
            }
            if ok {
                report.verified.push(a.name.clone());
            }
        }
        // SHA256SUMS lines beyond the artifacts (manifest.json): the file must match too.
        if let Some(sums) = &sums {
            for (name, hash) in sums {
                if m.artifacts.iter().any(|a| &a.name == name) {
                    continue;
                }
                if name.contains('/') {
                    continue;
                }
                if let Some(bytes) = ctx.read(name) {
                    if checksums::sha256_hex(&bytes) != *hash {
                        ctx.problem(name, "SHA-256 differs from SHA256SUMS");
                    }
                }
            }
        }
    }

    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut unlisted: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !covered.contains(n) && n != crate::dist::PUBLIC_KEY_FILE)
            .collect();
        unlisted.sort();
        report.unlisted = unlisted;
    }
    report.problems = ctx.problems;
    report.ok = report.problems.is_empty();
    report
}
