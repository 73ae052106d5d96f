//! `releaser install|activate|rollback|list|prune --root DIR`: verification comes first (a tampered or foreign
//! release installs nothing), then the crash-safe layout of `nkudo_core::layout`.

use releaser::checksums;
use releaser::dist::{trusted_comment, PUBLIC_KEY_FILE, UNTRUSTED_COMMENT};
use releaser::install::host_arch;
use releaser::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use releaser::minisign::{blake2b512, KeyId, SecretKey};
use releaser::package::{tar_gz, Entry};
use std::path::{Path, PathBuf};
use std::process::Command;

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32], KeyId(*b"install!"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signed release directory with the edge tarball for this machine's architecture.
fn release_dir(dir: &Path, version: &str, key: &SecretKey) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let epoch = now() - 60;
    let expires = releaser::dist::rfc3339(epoch + 30 * 86_400).unwrap();
    let channel = if version.contains("-pre.") {
        "pre-release"
    } else {
        "release"
    };
    let sign = |name: &str, bytes: &[u8]| {
        let tc = trusted_comment(epoch, name, version, channel, &expires);
        let sig = key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT).unwrap();
        std::fs::write(dir.join(format!("{name}.minisig")), sig.to_file_text()).unwrap();
    };
    let arch = host_arch();
    let name = format!("nkudo-edge-{version}-linux-{arch}.tar.gz");
    let bytes = tar_gz(
        &[
            Entry::file(
                "bin/nkudo-edge",
                format!("#!/bin/sh\necho {version}\n").into_bytes(),
                true,
            ),
            Entry::file("systemd/nkudo-edge.service", b"[Service]\n".to_vec(), false),
        ],
        &[],
        epoch,
    )
    .unwrap();
    std::fs::write(dir.join(&name), &bytes).unwrap();
    sign(&name, &bytes);
    let sha = checksums::sha256_hex(&bytes);
    let m = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.into(),
        channel: channel.into(),
        git_commit: "abc1234".into(),
        build_date: releaser::dist::rfc3339(epoch).unwrap(),
        expires: expires.clone(),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts: vec![Artifact {
            name: name.clone(),
            component: "nkudo-edge".into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: arch.into(),
            size: bytes.len() as u64,
            sha256: sha.clone(),
        }],
        promoted_from: None,
        rollback_of: None,
    };
    let mb = m.to_canonical_json();
    std::fs::write(dir.join("manifest.json"), &mb).unwrap();
    sign("manifest.json", mb.as_bytes());
    let sums = checksums::render(&[
        (name.clone(), sha),
        ("manifest.json".into(), checksums::sha256_hex(mb.as_bytes())),
    ]);
    std::fs::write(dir.join("SHA256SUMS"), &sums).unwrap();
    sign("SHA256SUMS", sums.as_bytes());
    std::fs::write(dir.join(PUBLIC_KEY_FILE), key.public_key().to_file_text()).unwrap();
    name
}

fn releaser(args: &[&str], root: &Path, extra: &[&Path]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_releaser"))
        .args(args)
        .args(extra)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

struct Fx {
    _tmp: tempfile::TempDir,
    t: PathBuf,
    root: PathBuf,
    pubkey: PathBuf,
}

fn fx() -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_path_buf();
    let pubkey = t.join("release.pub");
    std::fs::write(&pubkey, key(1).public_key().to_file_text()).unwrap();
    Fx {
        root: t.join("opt-nkudo"),
        t,
        pubkey,
        _tmp: tmp,
    }
}

fn install(f: &Fx, source: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["install"];
    args.extend_from_slice(extra);
    releaser(&args, &f.root, &[source, Path::new("--public-key"), &f.pubkey])
}

#[test]
fn install_activate_rollback_list_prune() {
    let f = fx();
    for v in ["0.1.0", "0.2.0", "0.3.0", "0.4.0"] {
        release_dir(&f.t.join(v), v, &key(1));
    }
    let (code, text) = install(&f, &f.t.join("0.1.0"), &["--activate"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("verified and installed v0.1.0"), "{text}");
    assert_eq!(
        std::fs::read_to_string(f.root.join("current/bin/nkudo-edge")).unwrap(),
        "#!/bin/sh\necho 0.1.0\n"
    );
    // The verified manifest and its signature are kept in the release directory, byte for byte: the installed
    // binaries read the version they were installed as from there.
    let rel = f.root.join("releases/0.1.0");
    for file in ["manifest.json", "manifest.json.minisig"] {
        assert_eq!(
            std::fs::read(rel.join(file)).unwrap_or_else(|e| panic!("{file} in {}: {e}", rel.display())),
            std::fs::read(f.t.join("0.1.0").join(file)).unwrap(),
            "{file}"
        );
    }
    // A lone tarball (with its .minisig) installs too.
    let name = release_dir(&f.t.join("lone"), "0.2.0", &key(1));
    std::fs::remove_file(f.t.join("lone/manifest.json")).unwrap();
    let (code, text) = install(&f, &f.t.join("lone").join(&name), &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("releaser activate v0.2.0"), "{text}");
    // Again: already there, nothing done.
    let (code, text) = install(&f, &f.t.join("0.2.0"), &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already installed"), "{text}");

    let (code, text) = releaser(&["activate", "0.2.0"], &f.root, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("current is v0.2.0") && text.contains("previous is v0.1.0"),
        "{text}"
    );
    let (code, text) = releaser(&["rollback"], &f.root, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("current is v0.1.0"), "{text}");
    let (code, text) = releaser(&["rollback"], &f.root, &[]);
    assert_eq!(code, 1, "a second rollback has nowhere to go: {text}");
    assert!(text.contains("nothing to roll back to"), "{text}");
    let (code, text) = releaser(&["activate", "9.9.9"], &f.root, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("not installed") && text.contains("releaser install"),
        "{text}"
    );

    for v in ["0.3.0", "0.4.0"] {
        assert_eq!(install(&f, &f.t.join(v), &[]).0, 0);
    }
    let (code, text) = releaser(&["list"], &f.root, &[]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["v0.1.0  current", "v0.2.0", "v0.3.0", "v0.4.0"]
    );
    let (code, text) = releaser(&["prune", "--keep", "2"], &f.root, &[]);
    assert_eq!(code, 0, "{text}");
    let (_, json) = releaser(&["list", "--output", "json"], &f.root, &[]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let left: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_str().unwrap())
        .collect();
    assert!(left.contains(&"0.1.0"), "current is never pruned: {left:?}");
    assert!(left.len() < 4, "{left:?}");
}

#[test]
fn verification_comes_first() {
    let f = fx();
    // Tampered tarball: nothing installed.
    let name = release_dir(&f.t.join("bad"), "0.1.0", &key(1));
    let p = f.t.join("bad").join(&name);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let (code, text) = install(&f, &f.t.join("bad"), &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("does not verify") && text.contains("nothing installed"),
        "{text}"
    );
    assert!(!f.root.join("releases/0.1.0").exists());
    let (code, text) = install(&f, &p, &[]);
    assert_eq!(code, 1, "{text}");
    // Signed by another key: nothing installed.
    release_dir(&f.t.join("other"), "0.1.0", &key(2));
    let (code, text) = install(&f, &f.t.join("other"), &[]);
    assert_eq!(code, 1, "{text}");
    assert!(!f.root.join("releases/0.1.0").exists(), "{text}");
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The real release directory of `cargo xtask test` (see tests/dist.rs): installed, its edge binary reports the
/// version it was installed as on its first line, and the manifest it was verified with sits beside it.
#[test]
fn installed_dist_edge_binary_reports_its_installed_version() {
    let (Some(dir), Some(pubkey)) = (
        std::env::var_os("NKUDO_DIST_DIR"),
        std::env::var_os("NKUDO_DIST_PUBKEY"),
    ) else {
        assert!(
            !ci(),
            "CI=true but NKUDO_DIST_DIR / NKUDO_DIST_PUBKEY are not set: run the tests through `cargo xtask test`"
        );
        let bar = "!".repeat(90);
        eprintln!("{bar}\n!!! SKIPPED: installing the real release: NKUDO_DIST_DIR is not set (run `cargo xtask test`)\n{bar}");
        return;
    };
    let (dir, pubkey) = (PathBuf::from(dir), PathBuf::from(pubkey));
    let m = Manifest::from_json(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    if !m
        .artifacts
        .iter()
        .any(|a| a.component == "nkudo-edge" && a.arch == host_arch())
    {
        assert!(
            !ci(),
            "CI=true but {} has no nkudo-edge tarball for {}",
            dir.display(),
            host_arch()
        );
        eprintln!(
            "SKIPPED: {} has no nkudo-edge tarball for {}",
            dir.display(),
            host_arch()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("opt-nkudo");
    let (code, text) = releaser(
        &["install", "--activate"],
        &root,
        &[&dir, Path::new("--public-key"), &pubkey],
    );
    assert_eq!(code, 0, "{text}");
    let rel = root.join("releases").join(&m.version);
    for file in ["manifest.json", "manifest.json.minisig"] {
        assert_eq!(
            std::fs::read(rel.join(file)).unwrap_or_else(|e| panic!("{file} in {}: {e}", rel.display())),
            std::fs::read(dir.join(file)).unwrap(),
            "{file}"
        );
    }
    for bin in [rel.join("bin/nkudo-edge"), root.join("current/bin/nkudo-edge")] {
        let o = Command::new(&bin).arg("version").output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{}: {out}{}",
            bin.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            out.lines().next(),
            Some(format!("nkudo-edge {}", m.version).as_str()),
            "{}: {out}",
            bin.display()
        );
    }
}
