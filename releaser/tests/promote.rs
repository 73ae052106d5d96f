//! `releaser promote`: refusals, byte-identical artifacts, the rollback marking, and `releaser verify` accepting
//! the result. The source pre-release is a small signed directory written here (no cross build needed).

use releaser::checksums;
use releaser::dist::{trusted_comment, PUBLIC_KEY_FILE, UNTRUSTED_COMMENT};
use releaser::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use releaser::minisign::{blake2b512, KeyId, KeyProtection, SecretKey};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A day ago: the fixture's manifests stay valid whenever the test runs.
fn epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 86_400
}

fn key() -> SecretKey {
    SecretKey::from_seed(&[42u8; 32], KeyId(*b"promote!"))
}

/// A signed release directory as `releaser dist` writes it, with two small artifacts.
fn write_release_dir(dir: &Path, version: &str, channel: &str, key: &SecretKey) {
    std::fs::create_dir_all(dir).unwrap();
    let epoch = epoch();
    let expires = releaser::dist::rfc3339(epoch + 90 * 86_400).unwrap();
    let sign = |name: &str, bytes: &[u8]| {
        let tc = trusted_comment(epoch, name, version, channel, &expires);
        let sig = key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT).unwrap();
        std::fs::write(dir.join(format!("{name}.minisig")), sig.to_file_text()).unwrap();
    };
    let mut artifacts = Vec::new();
    let mut sums = Vec::new();
    for (component, arch) in [("nkudo-edge", "amd64"), ("nkudo-control-plane", "arm64")] {
        let name = format!("{component}-{version}-linux-{arch}.tar.gz");
        let bytes: Vec<u8> = format!("payload of {name}\n")
            .into_bytes()
            .into_iter()
            .chain(0..=255u8)
            .collect();
        std::fs::write(dir.join(&name), &bytes).unwrap();
        sign(&name, &bytes);
        let sha = checksums::sha256_hex(&bytes);
        sums.push((name.clone(), sha.clone()));
        artifacts.push(Artifact {
            name,
            component: component.into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: arch.into(),
            size: bytes.len() as u64,
            sha256: sha,
        });
    }
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    let m = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.into(),
        channel: channel.into(),
        git_commit: "abc1234".into(),
        build_date: releaser::dist::rfc3339(epoch).unwrap(),
        expires: expires.clone(),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts,
        promoted_from: None,
        rollback_of: None,
    };
    let mb = m.to_canonical_json();
    std::fs::write(dir.join("manifest.json"), &mb).unwrap();
    sign("manifest.json", mb.as_bytes());
    sums.push(("manifest.json".into(), checksums::sha256_hex(mb.as_bytes())));
    let s = checksums::render(&sums);
    std::fs::write(dir.join("SHA256SUMS"), &s).unwrap();
    sign("SHA256SUMS", s.as_bytes());
    std::fs::write(dir.join(PUBLIC_KEY_FILE), key.public_key().to_file_text()).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    pre: PathBuf,
    pubkey: PathBuf,
    seckey: PathBuf,
    changelog: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let k = key();
    let pre = root.join("pre");
    write_release_dir(&pre, "0.2.0-pre.3+abc1234", "pre-release", &k);
    let pubkey = root.join("release.pub");
    std::fs::write(&pubkey, k.public_key().to_file_text()).unwrap();
    let seckey = root.join("release.key");
    std::fs::write(&seckey, k.to_file_text(&KeyProtection::Unencrypted).unwrap().as_bytes()).unwrap();
    let changelog = root.join("CHANGELOG.md");
    std::fs::write(
        &changelog,
        "# Changelog\n\n## [Unreleased]\n\n## [0.2.0] - 2026-11-23\n- things\n\n## v0.1.1\n- fix\n\n## [0.1.0]\n- first\n",
    )
    .unwrap();
    Fixture {
        _tmp: tmp,
        root,
        pre,
        pubkey,
        seckey,
        changelog,
    }
}

fn releaser() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_releaser"));
    c.env_remove("NKUDO_SIGNING_KEY")
        .env_remove("NKUDO_SIGNING_KEY_FILE")
        .env_remove("NKUDO_SIGNING_KEY_PASSPHRASE");
    c
}

fn promote(f: &Fixture, from: &Path, out: &Path, extra: &[&str]) -> (i32, String) {
    let o = releaser()
        .arg("promote")
        .arg(from)
        .arg("--public-key")
        .arg(&f.pubkey)
        .arg("--key")
        .arg(&f.seckey)
        .arg("--changelog")
        .arg(&f.changelog)
        .arg("--out")
        .arg(out)
        .args(extra)
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

fn verify(f: &Fixture, dir: &Path) -> (i32, String) {
    let o = releaser()
        .arg("verify")
        .arg(dir)
        .arg("--public-key")
        .arg(&f.pubkey)
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

fn manifest(dir: &Path) -> Manifest {
    Manifest::from_json(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn promotes_with_byte_identical_artifacts_and_verifies() {
    let f = fixture();
    let out = f.root.join("rel");
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "v0.2.0", "--latest-release", "v0.1.1"]);
    assert_eq!(code, 0, "{text}");
    let m = manifest(&out);
    assert_eq!(m.version, "0.2.0");
    assert_eq!(m.channel, "release");
    assert_eq!(m.promoted_from.as_deref(), Some("0.2.0-pre.3+abc1234"));
    assert_eq!(m.rollback_of, None);
    let src = manifest(&f.pre);
    assert_eq!(m.artifacts.len(), src.artifacts.len());
    for (a, s) in m.artifacts.iter().zip(&src.artifacts) {
        assert_eq!(a.name, s.name.replace("0.2.0-pre.3+abc1234", "0.2.0"));
        assert_eq!((a.sha256.as_str(), a.size), (s.sha256.as_str(), s.size));
        assert_eq!(
            std::fs::read(out.join(&a.name)).unwrap(),
            std::fs::read(f.pre.join(&s.name)).unwrap(),
            "{} is not byte-identical",
            a.name
        );
    }
    let (code, text) = verify(&f, &out);
    assert_eq!(code, 0, "releaser verify refused the promoted release: {text}");
    assert!(text.contains("verified 0.2.0 (release)"), "{text}");
}

#[test]
fn refuses_a_version_not_greater_than_the_latest_release() {
    let f = fixture();
    let out = f.root.join("rel");
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "v0.2.0", "--latest-release", "v0.2.0"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("v0.2.1"), "the refusal suggests the next version: {text}");
    assert!(!out.exists());
    // --releases-dir: the highest release found there is the latest.
    let rels = f.root.join("releases");
    write_release_dir(&rels.join("v0.2.0"), "0.2.0", "release", &key());
    write_release_dir(&rels.join("v0.1.0"), "0.1.0", "release", &key());
    let rels_s = rels.to_str().unwrap();
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "0.2.0", "--releases-dir", rels_s]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("v0.2.0"), "{text}");
    assert!(!out.exists());
}

#[test]
fn refuses_without_a_changelog_section() {
    let f = fixture();
    let out = f.root.join("rel");
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "v0.3.0", "--latest-release", "v0.1.1"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("CHANGELOG.md has no section for 0.3.0"), "{text}");
    assert!(!out.exists());
}

#[test]
fn refuses_a_tampered_pre_release() {
    let f = fixture();
    let name = manifest(&f.pre).artifacts[0].name.clone();
    let path = f.pre.join(&name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = f.root.join("rel");
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "v0.2.0", "--latest-release", "v0.1.1"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("does not verify") && text.contains(&name), "{text}");
    assert!(!out.exists());
}

#[test]
fn refuses_an_older_pre_release_without_rollback() {
    let f = fixture();
    let out = f.root.join("rel");
    let (code, text) = promote(&f, &f.pre, &out, &["--to", "v0.2.1", "--latest-release", "v0.2.0"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("--rollback"), "{text}");
}

#[test]
fn rollback_republishes_old_artifacts_and_says_so() {
    let f = fixture();
    let good = f.root.join("v0.1.1");
    write_release_dir(&good, "0.1.1", "release", &key());
    let out = f.root.join("rel");
    let args = ["--to", "v0.2.1", "--latest-release", "v0.2.0", "--rollback"];
    std::fs::write(&f.changelog, "## [0.2.1]\n- rollback of 0.2.0 to 0.1.1's artifacts\n").unwrap();
    let (code, text) = promote(&f, &good, &out, &args);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ROLLBACK"), "{text}");
    let m = manifest(&out);
    assert_eq!(m.version, "0.2.1");
    assert_eq!(m.channel, "release");
    assert_eq!(m.rollback_of.as_deref(), Some("0.2.0"));
    assert_eq!(m.promoted_from.as_deref(), Some("0.1.1"));
    for (a, s) in m.artifacts.iter().zip(&manifest(&good).artifacts) {
        assert_eq!(
            std::fs::read(out.join(&a.name)).unwrap(),
            std::fs::read(good.join(&s.name)).unwrap()
        );
    }
    assert_eq!(verify(&f, &out).0, 0);
    // A rollback must still be a higher version, and a patch release of the latest line.
    let out2 = f.root.join("rel2");
    let (code, text) = promote(
        &f,
        &good,
        &out2,
        &["--to", "v0.2.0", "--latest-release", "v0.2.0", "--rollback"],
    );
    assert_eq!(code, 1, "{text}");
    let (code, text) = promote(
        &f,
        &good,
        &out2,
        &["--to", "v0.3.0", "--latest-release", "v0.2.0", "--rollback"],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("use --to v0.2.1"), "{text}");
}
