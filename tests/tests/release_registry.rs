//! The release registry on both backends, over the real API: publish a signed manifest, upload its artifacts
//! (checked against the manifest), download them whole and by `Range` (206, 416) as an operator and as an enrolled
//! agent over mTLS, desired versions (set, list with agent counts, clear, refusals), labels, and the fleet view.
//! The artifact bytes live in a BLOB (SQLite) or BYTEA (Postgres) column read in chunks with `substr`.

use nkudo_core::api::{DesiredScope, DesiredVersionsResponse, PublishReleaseRequest, ReleaseInfo, ReleasesResponse};
use nkudo_tests::releases::*;
use nkudo_tests::*;
use reqwest::{header, StatusCode};

async fn registry(backend: Backend) -> anyhow::Result<()> {
    let key = new_release_key();
    let other_key = new_release_key();
    let cp = start_or_skip!(release_control_plane(backend, &[&key]).start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-registry")?;
    // 600 KiB of padding: more than two 256 KiB chunks.
    let rel = build_release(tmp.path(), &ReleaseSpec::new("0.4.0").padding(600 * 1024), &key)?;
    let bytes = rel.tarball_bytes();
    let admin = admin(&cp);

    // An unknown signing key, a garbage signature and an unknown route field are refused; nothing is stored.
    let stranger = build_release(tmp.path(), &ReleaseSpec::new("0.4.1"), &other_key)?;
    let r = admin
        .post(cp.url("/admin/releases"))
        .json(&PublishReleaseRequest {
            manifest: stranger.manifest_text.clone(),
            signature: stranger.signature_text.clone(),
            external_base_url: None,
        })
        .send()
        .await?;
    let body = expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_SIGNATURE").await;
    assert!(body.error.contains("not a configured release key"), "{}", body.error);
    let r = admin
        .post(cp.url("/admin/releases"))
        .json(&PublishReleaseRequest {
            manifest: rel.manifest_text.replace("0.4.0", "0.4.9"),
            signature: rel.signature_text.clone(),
            external_base_url: None,
        })
        .send()
        .await?;
    expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "INVALID_SIGNATURE").await;

    // Publish: 201, then the identical manifest again: 200.
    let req = PublishReleaseRequest {
        manifest: rel.manifest_text.clone(),
        signature: rel.signature_text.clone(),
        external_base_url: None,
    };
    let r = admin.post(cp.url("/admin/releases")).json(&req).send().await?;
    let info: ReleaseInfo = expect_json(r, StatusCode::CREATED, "publish").await?;
    assert_eq!(info.version, "0.4.0");
    assert!(info.artifacts.iter().all(|a| !a.available));
    let r = admin.post(cp.url("/admin/releases")).json(&req).send().await?;
    let _: ReleaseInfo = expect_json(r, StatusCode::OK, "republish").await?;

    // Upload: wrong bytes (422, nothing stored), then the right ones (201), then again (200).
    let art = format!("/admin/releases/0.4.0/artifacts/{}", rel.tarball_name);
    let mut wrong = bytes.clone();
    wrong[100] ^= 0xff;
    let r = admin.put(cp.url(&art)).body(wrong).send().await?;
    expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "ARTIFACT_MISMATCH").await;
    let r = admin.put(cp.url(&art)).body(bytes[..1000].to_vec()).send().await?;
    expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "ARTIFACT_MISMATCH").await;
    let r = admin.get(cp.url(&art)).send().await?;
    expect_error(r, StatusCode::NOT_FOUND, "RELEASE_NOT_AVAILABLE").await;
    let r = admin.put(cp.url(&art)).body(bytes.clone()).send().await?;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await?);
    let r = admin.put(cp.url(&art)).body(bytes.clone()).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    let r = admin
        .put(cp.url("/admin/releases/0.4.0/artifacts/nope.tar.gz"))
        .body(vec![1])
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;

    // Download whole and by range, byte-exact.
    let r = admin.get(cp.url(&art)).send().await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::ACCEPT_RANGES], "bytes");
    assert_eq!(r.bytes().await?.as_ref(), bytes.as_slice());
    let len = bytes.len();
    for (range, start, end) in [
        ("bytes=10-19".to_string(), 10, 19),
        (format!("bytes={}-", 300_000), 300_000, len - 1),
        ("bytes=-5".to_string(), len - 5, len - 1),
    ] {
        let r = admin.get(cp.url(&art)).header(header::RANGE, &range).send().await?;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()[header::CONTENT_RANGE].to_str()?,
            format!("bytes {start}-{end}/{len}"),
            "{range}"
        );
        assert_eq!(r.bytes().await?.as_ref(), &bytes[start..=end], "{range}");
    }
    let r = admin
        .get(cp.url(&art))
        .header(header::RANGE, format!("bytes={len}-"))
        .send()
        .await?;
    assert_eq!(r.headers()[header::CONTENT_RANGE].to_str()?, format!("bytes */{len}"));
    expect_error(r, StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_NOT_SATISFIABLE").await;

    // An enrolled agent downloads over mTLS; without a client certificate the route is closed.
    let enrolled = enroll_agent(&cp, &fx, "edge-registry").await?;
    let agent = enrolled.client(&cp);
    let path = format!("/v1/releases/0.4.0/artifacts/{}", rel.tarball_name);
    let r = agent
        .get(cp.url(&path))
        .header(header::RANGE, "bytes=1-3")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await?.as_ref(), &bytes[1..=3]);
    let r = anon(&cp).get(cp.url(&path)).send().await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The listing shows the artifact available.
    let r = admin.get(cp.url("/admin/releases")).send().await?;
    let list: ReleasesResponse = expect_json(r, StatusCode::OK, "list").await?;
    assert!(list.releases[0]
        .artifacts
        .iter()
        .any(|a| a.name == rel.tarball_name && a.available));

    // Desired versions: set for the site (counts the agent), list, clear; unknown versions and targets refused.
    let site = fx.site.id.clone();
    set_desired_ok(&cp, DesiredScope::Site, Some(&site), "0.4.0", false).await?;
    let r = admin.get(cp.url("/admin/desired-versions")).send().await?;
    let d: DesiredVersionsResponse = expect_json(r, StatusCode::OK, "list desired").await?;
    assert_eq!(d.desired_versions.len(), 1);
    assert_eq!(d.desired_versions[0].agents, 1, "{d:?}");
    let r = set_desired(&cp, DesiredScope::Fleet, None, "9.9.9", false).await?;
    expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "RELEASE_NOT_AVAILABLE").await;
    let r = set_desired(
        &cp,
        DesiredScope::Site,
        Some("00000000-0000-4000-8000-000000000000"),
        "0.4.0",
        false,
    )
    .await?;
    expect_error(r, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    let r = set_desired(&cp, DesiredScope::Ring, None, "0.4.0", false).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    let r = admin
        .delete(cp.url(&format!("/admin/desired-versions?scope=site&target={site}")))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = admin.get(cp.url("/admin/desired-versions")).send().await?;
    let d: DesiredVersionsResponse = expect_json(r, StatusCode::OK, "list desired").await?;
    assert!(d.desired_versions.is_empty(), "{d:?}");

    // Labels: validated; the fleet view filters by them.
    let r = set_site_labels(&cp, &site, &[("ring", "pilot"), ("environment", "test")]).await?;
    assert_eq!(r.status(), StatusCode::OK);
    let r = set_site_labels(&cp, &site, &[("ring", "has space")]).await?;
    expect_error(r, StatusCode::BAD_REQUEST, "VALIDATION_FAILED").await;
    let agents = admin_agents(&cp).await?;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].labels.get("ring").map(String::as_str), Some("pilot"));
    let r = admin.get(cp.url("/admin/agents?ring=stable")).send().await?;
    let v: serde_json::Value = expect_json(r, StatusCode::OK, "fleet").await?;
    assert_eq!(v["agents"].as_array().map(Vec::len), Some(0));
    Ok(())
}

both_backends!(registry => registry_sqlite, registry_postgres);
