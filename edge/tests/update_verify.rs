//! Refusals of an update offer before anything is downloaded or installed, and the file check after the
//! download.

mod support;

use chrono::{Duration, Utc};
use nkudo_edge::update::verify::{check_file, verify_offer};
use support::*;

const RUNNING: &str = "1.0.0";

fn good() -> (ReleaseKey, nkudo_core::manifest::Manifest, Vec<u8>) {
    let key = ReleaseKey::new(7);
    let bytes = b"pretend tarball".to_vec();
    let m = manifest("1.1.0", &bytes, Utc::now() + Duration::days(1));
    (key, m, bytes)
}

fn refusal(r: Result<nkudo_edge::update::verify::VerifiedOffer, nkudo_edge::update::verify::Refusal>) -> String {
    match r {
        Ok(v) => panic!("accepted {}", v.version),
        Err(e) => e.0,
    }
}

#[test]
fn a_good_offer_verifies() {
    let (key, m, _) = good();
    let o = offer(&key, &m, "/v1/releases/1.1.0/artifacts/x");
    let v = verify_offer(
        &o,
        &[ReleaseKey::new(9).public(), key.public()],
        RUNNING,
        &arch(),
        Utc::now(),
    )
    .unwrap();
    assert_eq!(v.version, "1.1.0");
    assert_eq!(v.artifact.name, artifact_name("1.1.0"));
}

#[test]
fn no_configured_key_refuses() {
    let (key, m, _) = good();
    let o = offer(&key, &m, "/x");
    let e = refusal(verify_offer(&o, &[], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("no release public key is configured"), "{e}");
}

#[test]
fn unknown_key_refuses() {
    let (_, m, _) = good();
    let other = ReleaseKey::new(8);
    let o = offer(&other, &m, "/x");
    let e = refusal(verify_offer(
        &o,
        &[ReleaseKey::new(7).public()],
        RUNNING,
        &arch(),
        Utc::now(),
    ));
    assert!(e.contains("not a trusted release key"), "{e}");
}

#[test]
fn bad_signature_refuses() {
    let (key, m, _) = good();
    let mut o = offer(&key, &m, "/x");
    // The manifest changed after signing (a bigger size for the same name).
    o.manifest = o
        .manifest
        .replace("\"channel\": \"release\"", "\"channel\": \"pre-release\"");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("does not verify"), "{e}");
    // A key with the same id but other key material.
    let mut impostor = ReleaseKey::new(8);
    impostor.id = key.id;
    let o = offer(&impostor, &m, "/x");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("does not verify"), "{e}");
    // Garbage.
    let mut o = offer(&key, &m, "/x");
    o.manifest_signature = "nonsense".into();
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("unreadable"), "{e}");
}

#[test]
fn expired_manifest_is_stale_metadata() {
    let key = ReleaseKey::new(7);
    let m = manifest("1.1.0", b"x", Utc::now() - Duration::minutes(1));
    let o = offer(&key, &m, "/x");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.starts_with("stale metadata"), "{e}");
}

#[test]
fn offer_and_manifest_must_agree() {
    let (key, m, _) = good();
    let base = offer(&key, &m, "/x");
    let check = |o: &nkudo_core::api::UpdateOffer, needle: &str| {
        let e = refusal(verify_offer(o, &[key.public()], RUNNING, &arch(), Utc::now()));
        assert!(e.contains(needle), "{needle:?} not in {e}");
    };
    let mut o = base.clone();
    o.version = "1.2.0".into();
    check(&o, "signed manifest is for 1.1.0");
    let mut o = base.clone();
    o.artifact.size += 1;
    check(&o, "bytes, the signed manifest");
    let mut o = base.clone();
    o.artifact.sha256 = "00".repeat(32);
    check(&o, "SHA-256");
    let mut o = base.clone();
    o.artifact.name = "other.tar.gz".into();
    check(&o, "not listed");
}

#[test]
fn wrong_arch_and_component_refuse() {
    let key = ReleaseKey::new(7);
    let mut m = manifest("1.1.0", b"x", Utc::now() + Duration::days(1));
    m.artifacts[0].arch = if arch() == "arm64" {
        "amd64".into()
    } else {
        "arm64".into()
    };
    let o = offer(&key, &m, "/x");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("this host is linux/"), "{e}");
    let mut m = manifest("1.1.0", b"x", Utc::now() + Duration::days(1));
    m.artifacts[0].component = "nkudo-control-plane".into();
    let o = offer(&key, &m, "/x");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("not the nkudo-edge tarball"), "{e}");
}

#[test]
fn older_versions_need_a_rollback_mark() {
    let key = ReleaseKey::new(7);
    let m = manifest("0.9.0", b"x", Utc::now() + Duration::days(1));
    let mut o = offer(&key, &m, "/x");
    let e = refusal(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()));
    assert!(e.contains("older than the running version"), "{e}");
    o.rollback = true;
    assert!(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()).is_ok());
    // A pre-release of the running version is older too.
    let m = manifest("1.0.0-pre.3+abc1234", b"x", Utc::now() + Duration::days(1));
    let o = offer(&key, &m, "/x");
    assert!(verify_offer(&o, &[key.public()], RUNNING, &arch(), Utc::now()).is_err());
}

#[test]
fn the_downloaded_file_must_match_size_and_hash() {
    let (_, m, bytes) = good();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f");
    std::fs::write(&p, &bytes).unwrap();
    check_file(&p, &m.artifacts[0]).unwrap();
    std::fs::write(&p, b"pretend tarbalL").unwrap();
    let e = check_file(&p, &m.artifacts[0]).unwrap_err().0;
    assert!(e.contains("does not match"), "{e}");
    std::fs::write(&p, b"short").unwrap();
    let e = check_file(&p, &m.artifacts[0]).unwrap_err().0;
    assert!(e.contains("bytes"), "{e}");
}
