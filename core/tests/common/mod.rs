//! Helpers shared by the layout tests: deterministic release contents and digests of a tree.
#![allow(dead_code)]

use nkudo_core::layout::{Layout, COMPLETE_MARKER};
use semver::Version;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

pub fn v(s: &str) -> Version {
    nkudo_core::version::parse(s).unwrap()
}

/// Bytes that differ from one version to the next (a cheap xorshift stream seeded by the version text).
fn payload(version: &Version, len: usize) -> Vec<u8> {
    let mut x = version.to_string().bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Unpacks a fake release of `version` into `dir`: what a release tarball holds (binary, unit, config, a link,
/// an empty directory).
pub fn write_release(version: &Version, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(dir.join("systemd"))?;
    fs::create_dir_all(dir.join("config/examples"))?;
    fs::create_dir_all(dir.join("empty"))?;
    let bin = dir.join("bin/nkudo-edge");
    let mut content = format!("#!/bin/sh\necho nkudo-edge {version}\n").into_bytes();
    content.extend(payload(version, 96 * 1024));
    fs::write(&bin, content)?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    fs::write(
        dir.join("systemd/nkudo-edge.service"),
        "[Service]\nExecStart=/opt/nkudo/current/bin/nkudo-edge run\n",
    )?;
    fs::write(dir.join("config/examples/agent.toml"), format!("# agent {version}\n"))?;
    fs::set_permissions(
        dir.join("config/examples/agent.toml"),
        fs::Permissions::from_mode(0o640),
    )?;
    fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    symlink("nkudo-edge", dir.join("bin/edge"))?;
    Ok(())
}

/// A fill function for `Layout::install`.
pub fn filler(version: &Version) -> impl FnOnce(&Path) -> io::Result<()> + '_ {
    move |dir| write_release(version, dir)
}

/// Path -> kind, mode and SHA-256 (or link target) of every entry under `dir`, following nothing; the
/// completion marker is left out.
pub fn tree_digest(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if rel == COMPLETE_MARKER {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(rel, format!("link {}", fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &path, out);
            } else {
                let digest = hex::encode(Sha256::digest(fs::read(&path).unwrap()));
                out.insert(rel, format!("file {mode:o} {digest}"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The digest of what `write_release` produces for `version` (written into a scratch directory).
pub fn expected_digest(version: &Version) -> BTreeMap<String, String> {
    let scratch = tempfile::tempdir().unwrap();
    write_release(version, scratch.path()).unwrap();
    tree_digest(scratch.path())
}

/// The digest of the release `current` points at, read through the link as systemd would.
pub fn current_digest(layout: &Layout) -> BTreeMap<String, String> {
    tree_digest(&layout.root().join("current/"))
}

/// Names of leftovers of crashed operations (temporary release directories and links).
pub fn leftovers(layout: &Layout) -> Vec<String> {
    let mut names = Vec::new();
    for dir in [layout.root().to_path_buf(), layout.root().join("releases")] {
        for entry in fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.contains(".tmp-") {
                names.push(name);
            }
        }
    }
    names
}
