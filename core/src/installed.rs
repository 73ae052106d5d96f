//! Which release a binary was *installed as*, and the release metadata kept beside it.
//!
//! `releaser promote` republishes a pre-release's bytes unchanged under the release version, so a binary
//! cannot know its release version from what was compiled in ([`crate::build_info::VERSION`] stays the
//! pre-release). The host layout knows: an installer (`releaser install`, the agent's self-update) writes the
//! signed manifest it verified into the release directory ([`write_metadata`]), and a binary running from
//! `<root>/releases/<version>/bin/...` reads it back ([`current_exe_release`]). So an agent installed from
//! v1.3.0 reports v1.3.0 in its heartbeat, with its build version alongside ([`reported_version`]).
//!
//! The version is the release directory's name (the layout names it after the verified manifest); the manifest
//! in it, when present and naming the same version, adds the rest (channel, promoted_from).

use crate::manifest::Manifest;
use semver::Version;
use std::io;
use std::path::{Path, PathBuf};

/// The verified manifest, as installed into a release directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Its minisign signature, beside it.
pub const SIGNATURE_FILE: &str = "manifest.json.minisig";

/// An installed release a path lies in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledRelease {
    /// The layout root (`/opt/nkudo`).
    pub root: PathBuf,
    /// `<root>/releases/<version>`.
    pub dir: PathBuf,
    /// The version it was installed as.
    pub version: Version,
    /// The manifest in the release directory, when there is one for this version.
    pub manifest: Option<Manifest>,
}

/// The installed release that `path` (after resolving symbolic links) lies in: the nearest ancestor
/// `<root>/releases/<version>/`. `None` when the path is not inside a host layout.
pub fn release_of_path(path: &Path) -> Option<InstalledRelease> {
    let path = std::fs::canonicalize(path).ok()?;
    let mut dir = path.parent();
    while let Some(d) = dir {
        let parent = d.parent()?;
        if parent.file_name().and_then(|n| n.to_str()) == Some("releases") {
            if let Some(version) = d.file_name().and_then(|n| n.to_str()).and_then(parse_dir_name) {
                let manifest = std::fs::read(d.join(MANIFEST_FILE))
                    .ok()
                    .and_then(|b| Manifest::from_json(&b).ok())
                    .filter(|m| crate::version::parse(&m.version).ok().as_ref() == Some(&version));
                return Some(InstalledRelease {
                    root: parent.parent()?.to_path_buf(),
                    dir: d.to_path_buf(),
                    version,
                    manifest,
                });
            }
        }
        dir = d.parent();
    }
    None
}

fn parse_dir_name(name: &str) -> Option<Version> {
    if name.starts_with('.') {
        return None;
    }
    Version::parse(name).ok()
}

/// The installed release the running executable lies in (`/proc/self/exe` on Linux).
pub fn current_exe_release() -> Option<InstalledRelease> {
    release_of_path(&std::env::current_exe().ok()?)
}

/// What a binary reports as its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedVersion {
    /// The version it was installed as, or its build version outside a host layout.
    pub version: String,
    /// The version it was built as ([`crate::build_info::VERSION`]).
    pub build_version: String,
    /// The release directory it runs from, if any.
    pub release: Option<InstalledRelease>,
}

impl ReportedVersion {
    /// The build version when it differs from the reported one (for `build_version` fields).
    pub fn build_version_if_different(&self) -> Option<&str> {
        (self.build_version != self.version).then_some(self.build_version.as_str())
    }
}

/// This process's [`ReportedVersion`], computed once.
pub fn reported_version() -> &'static ReportedVersion {
    static CELL: std::sync::OnceLock<ReportedVersion> = std::sync::OnceLock::new();
    CELL.get_or_init(|| reported_version_for(current_exe_release(), crate::build_info::VERSION))
}

/// [`reported_version`] for a given release and build version (testable).
pub fn reported_version_for(release: Option<InstalledRelease>, build: &str) -> ReportedVersion {
    ReportedVersion {
        version: release
            .as_ref()
            .map(|r| r.version.to_string())
            .unwrap_or_else(|| build.to_string()),
        build_version: build.to_string(),
        release,
    }
}

/// Writes the verified manifest text and its signature into a release directory being filled (call it from the
/// layout's install `fill`, so that the completion marker records both).
pub fn write_metadata(dir: &Path, manifest: &str, signature: &str) -> io::Result<()> {
    crate::fsutil::write_atomic(&dir.join(MANIFEST_FILE), manifest.as_bytes(), 0o644)?;
    crate::fsutil::write_atomic(&dir.join(SIGNATURE_FILE), signature.as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{PRODUCT, SCHEMA_VERSION};

    fn manifest(version: &str) -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            product: PRODUCT.into(),
            version: version.into(),
            channel: "release".into(),
            git_commit: "abc1234".into(),
            build_date: "2026-01-01T00:00:00Z".into(),
            expires: "2026-04-01T00:00:00Z".into(),
            minimum_supported_agent_version: "1.2.0".into(),
            artifacts: vec![],
            promoted_from: Some("1.3.0-pre.2+abc1234".into()),
            rollback_of: None,
        }
    }

    #[test]
    fn a_binary_in_a_release_dir_reports_the_installed_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("releases/1.3.0");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/nkudo-edge"), b"x").unwrap();
        write_metadata(&dir, &manifest("1.3.0").to_canonical_json(), "sig").unwrap();
        // Through a `current` link, as systemd starts it.
        std::os::unix::fs::symlink("releases/1.3.0", tmp.path().join("current")).unwrap();
        let rel = release_of_path(&tmp.path().join("current/bin/nkudo-edge")).unwrap();
        assert_eq!(rel.version, Version::parse("1.3.0").unwrap());
        assert_eq!(rel.root, std::fs::canonicalize(tmp.path()).unwrap());
        assert_eq!(
            rel.manifest.as_ref().unwrap().promoted_from.as_deref(),
            Some("1.3.0-pre.2+abc1234")
        );
        let rv = reported_version_for(Some(rel), "1.3.0-pre.2+abc1234");
        assert_eq!(rv.version, "1.3.0");
        assert_eq!(rv.build_version_if_different(), Some("1.3.0-pre.2+abc1234"));
    }

    #[test]
    fn a_manifest_naming_another_version_is_ignored_and_outside_a_layout_the_build_version_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("releases/1.4.0/bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x"), b"x").unwrap();
        std::fs::write(
            tmp.path().join("releases/1.4.0").join(MANIFEST_FILE),
            manifest("9.9.9").to_canonical_json(),
        )
        .unwrap();
        let rel = release_of_path(&dir.join("x")).unwrap();
        assert_eq!(rel.version.to_string(), "1.4.0");
        assert!(rel.manifest.is_none());

        std::fs::write(tmp.path().join("loose"), b"x").unwrap();
        assert!(release_of_path(&tmp.path().join("loose")).is_none());
        let rv = reported_version_for(None, "0.9.0");
        assert_eq!(rv.version, "0.9.0");
        assert_eq!(rv.build_version_if_different(), None);
    }
}
