//! Unit tests of [`super::verify_manifest`]: manifests signed here with throwaway minisign keys, checked the way
//! `POST /admin/releases` checks them (key id, signature over the exact bytes, channel, expiry, artifact names).

use super::{verify_manifest, PublishError};
use ed25519_dalek::SigningKey;
use nkudo_core::manifest::{Artifact, Manifest};
use nkudo_core::minisign::{blake2b512, sign_prehashed, KeyId, PublicKey};

const NOW_MS: i64 = 1_800_000_000_000; // 2027-01-15

fn key(seed: u8) -> (SigningKey, PublicKey) {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let public = PublicKey {
        key_id: KeyId([seed; 8]),
        key: signing.verifying_key(),
    };
    (signing, public)
}

fn manifest(version: &str, channel: &str, expires: &str) -> String {
    Manifest {
        schema_version: nkudo_core::manifest::SCHEMA_VERSION,
        product: nkudo_core::manifest::PRODUCT.into(),
        version: version.into(),
        channel: channel.into(),
        git_commit: "abc1234".into(),
        build_date: "2026-11-01T00:00:00Z".into(),
        expires: expires.into(),
        minimum_supported_agent_version: "0.3.0".into(),
        artifacts: vec![Artifact {
            name: format!("nkudo-edge-{version}-linux-amd64.tar.gz"),
            component: "nkudo-edge".into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            size: 10,
            sha256: "0".repeat(64),
        }],
        promoted_from: None,
        rollback_of: None,
    }
    .to_canonical_json()
}

fn sign(k: &(SigningKey, PublicKey), text: &str) -> String {
    sign_prehashed(
        &k.0,
        k.1.key_id,
        &blake2b512(text.as_bytes()),
        "timestamp:1\tfile:manifest.json",
        "test",
    )
    .unwrap()
    .to_file_text()
}

#[test]
fn a_manifest_signed_by_a_configured_key_verifies() {
    let k = key(1);
    let text = manifest("0.4.0", "release", "2027-06-01T00:00:00Z");
    let v = verify_manifest(&[key(9).1, k.1.clone()], &text, &sign(&k, &text), NOW_MS).unwrap();
    assert_eq!(v.manifest.version, "0.4.0");
    assert_eq!(v.key_id, k.1.key_id.to_string());
    assert!(v.expires_ms > NOW_MS);
    let pre = manifest("0.5.0-pre.1", "pre-release", "2027-06-01T00:00:00Z");
    assert!(verify_manifest(std::slice::from_ref(&k.1), &pre, &sign(&k, &pre), NOW_MS).is_ok());
}

#[test]
fn an_unknown_key_is_named() {
    let (signer, configured) = (key(1), key(2));
    let text = manifest("0.4.0", "release", "2027-06-01T00:00:00Z");
    match verify_manifest(&[configured.1], &text, &sign(&signer, &text), NOW_MS) {
        Err(PublishError::UnknownKey(id)) => assert_eq!(id, signer.1.key_id.to_string()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn any_changed_byte_breaks_the_signature() {
    let k = key(1);
    let text = manifest("0.4.0", "release", "2027-06-01T00:00:00Z");
    let sig = sign(&k, &text);
    // Same meaning, other bytes (no final newline): the exact signed text is what counts.
    for changed in [text.replace("0.4.0", "0.4.1"), text.trim_end().to_string()] {
        assert!(matches!(
            verify_manifest(std::slice::from_ref(&k.1), &changed, &sig, NOW_MS),
            Err(PublishError::BadSignature(_))
        ));
    }
    // A signature made by another key carrying the configured key's id.
    let impostor = (key(3).0, k.1.clone());
    assert!(matches!(
        verify_manifest(std::slice::from_ref(&k.1), &text, &sign(&impostor, &text), NOW_MS),
        Err(PublishError::BadSignature(_))
    ));
    assert!(matches!(
        verify_manifest(std::slice::from_ref(&k.1), &text, "not a signature", NOW_MS),
        Err(PublishError::BadSignatureFile(_))
    ));
}

#[test]
fn expired_mislabelled_and_malformed_manifests_are_refused() {
    let k = key(1);
    let expired = manifest("0.4.0", "release", "2026-01-01T00:00:00Z");
    assert!(matches!(
        verify_manifest(std::slice::from_ref(&k.1), &expired, &sign(&k, &expired), NOW_MS),
        Err(PublishError::Expired(_))
    ));
    for text in [
        manifest("0.5.0-pre.1", "release", "2027-06-01T00:00:00Z"),
        manifest("0.4.0", "pre-release", "2027-06-01T00:00:00Z"),
        manifest("not-a-version", "release", "2027-06-01T00:00:00Z"),
        manifest("0.4.0", "release", "next year"),
        manifest("0.4.0", "release", "2027-06-01T00:00:00Z").replace("nkudo-edge-0.4.0", "../nkudo-edge-0.4.0"),
        "{}".to_string(),
    ] {
        assert!(
            matches!(
                verify_manifest(std::slice::from_ref(&k.1), &text, &sign(&k, &text), NOW_MS),
                Err(PublishError::BadManifest(_))
            ),
            "{text}"
        );
    }
}
