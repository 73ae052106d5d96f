//! Safe agent self-update end to end (issue 6): the real control plane, real agents running from a host
//! layout under a temporary root (`<root>/current/bin/nkudo-edge run ...`, restart mode exec), releases built
//! in-process from the real debug agent binary and signed with throw-away keys (`nkudo_tests::releases`), and
//! `releaser publish` / `releaser check-compat` against the control plane.
//!
//! * three agents on A move to B (site scope) and report it; A and B are both kept in the layout;
//! * refusals that leave the agent on A with the failure reported: a tampered artifact (an external base URL
//!   serving other bytes), a manifest signed by a key the control plane trusts but the agent does not, an expired
//!   manifest (the control plane refuses one at publish; the agent refuses one that expired in between), an older
//!   version not marked rollback (and then the same version marked rollback is installed);
//! * bad releases (exits at once, never heartbeats, crashes after a few seconds) end with the host back on A,
//!   rolled back by the watcher; one that does not start at all is refused by the pre-switch trial;
//! * the control plane killed mid-download comes back on the same data: the agent resumes with a Range request;
//! * a pre-release aimed at a production-labelled site is refused (409 PRERELEASE_IN_PRODUCTION).
//!
//! The three-agent update and the pre-release ban run on SQLite and Postgres, the rest on SQLite.
//! Health window 15 s and stable-after 5 s on the agents, 1 s heartbeats. Every wait has a deadline whose failure
//! message carries the agent log tail, the watcher log, update.json and the layout.

use nkudo_core::api::{DesiredScope, PublishReleaseRequest};
use nkudo_tests::releases::*;
use nkudo_tests::*;
use reqwest::StatusCode;
use std::time::Duration;

const A: &str = "0.1.1";
const B: &str = "0.1.2";

/// Per-step deadline for an update to be reported (download, verify, install, restart, trial).
const UPDATE_DEADLINE: Duration = Duration::from_secs(120);

/// A host on `initial` (installed and current), enrolled in the fixture's site, its agent running and reporting
/// `initial`. Returns the host and the agent id.
async fn host_on(
    cp: &ControlPlane,
    fx: &Fixture,
    name: &str,
    initial: &BuiltRelease,
    trusted: &[&SecretKey],
) -> anyhow::Result<(LayoutHost, String)> {
    let mut host = LayoutHost::new(name, initial, trusted)?;
    let id = host.enroll(cp, fx).await?;
    host.spawn(cp)?;
    wait_agent(cp, &host, &id, Duration::from_secs(60), "the first heartbeat", |a| {
        a.last_heartbeat_at.is_some() && a.agent_version == initial.version
    })
    .await?;
    Ok((host, id))
}

/// The first line of `<root>/current/bin/nkudo-edge version`.
fn current_version_line(host: &LayoutHost) -> String {
    let o = host.command(["version"]).output().expect("run nkudo-edge version");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Waits for the agent to report `version` committed.
async fn wait_committed(
    cp: &ControlPlane,
    host: &LayoutHost,
    id: &str,
    version: &str,
) -> anyhow::Result<nkudo_core::api::Agent> {
    wait_agent(cp, host, id, UPDATE_DEADLINE, &format!("{version} committed"), |a| {
        a.agent_version == version && phase(a) == "committed"
    })
    .await
}

/// Waits for the agent to report the attempt at `version` failed (before any switch) while still on `on`.
async fn wait_failed(
    cp: &ControlPlane,
    host: &LayoutHost,
    id: &str,
    version: &str,
    on: &str,
) -> anyhow::Result<nkudo_core::api::Agent> {
    wait_agent(
        cp,
        host,
        id,
        UPDATE_DEADLINE,
        &format!("{version} refused (phase failed)"),
        |a| {
            a.agent_version == on
                && phase(a) == "failed"
                && a.update.as_ref().and_then(|u| u.desired_version.as_deref()) == Some(version)
                && last_error(a).contains(version)
        },
    )
    .await
}

/// The host is on `version` and nothing else was switched to.
fn assert_on(host: &LayoutHost, version: &str, not_installed: &[&str]) {
    assert_eq!(
        host.current_version().as_deref(),
        Some(version),
        "current link\n{}",
        host.diagnostics()
    );
    let installed = host.installed_versions();
    for v in not_installed {
        assert!(
            !installed.iter().any(|x| x == v),
            "{v} must not be installed: {installed:?}\n{}",
            host.diagnostics()
        );
    }
    assert_eq!(
        current_version_line(host),
        format!("nkudo-edge {version}"),
        "{}",
        host.diagnostics()
    );
}

async fn three_agents_update_from_a_to_b(backend: Backend) -> anyhow::Result<()> {
    let key = new_release_key();
    let cp = start_or_skip!(release_control_plane(backend, &[&key]).start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-releases")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let b = build_release(tmp.path(), &ReleaseSpec::new(B), &key)?;

    let mut hosts = Vec::new();
    for i in 1..=3 {
        hosts.push(host_on(&cp, &fx, &format!("edge-upd-{i}"), &a, &[&key]).await?);
    }

    // Publish B with the releaser (verified locally with the release key first), then target the site.
    let pubkey = b.dir.join("nkudo-release.pub");
    let out = releaser_publish(
        &cp,
        &b.dir,
        &["--public-key", pubkey.to_str().unwrap(), "--output", "json"],
    );
    assert!(out.status.success(), "publish: {}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["version"], B);
    assert_eq!(report["created"], true);
    assert_eq!(report["artifacts"][0]["action"], "uploaded", "{report}");
    // Publishing the same directory again changes nothing and uploads nothing.
    let out = releaser_publish(&cp, &b.dir, &["--output", "json"]);
    assert!(out.status.success(), "republish: {}", output_text(&out));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["uploaded_bytes"], 0, "{again}");

    set_desired_ok(&cp, DesiredScope::Site, Some(fx.site_id()), B, false).await?;
    for (host, id) in &hosts {
        let agent = wait_committed(&cp, host, id, B).await?;
        assert_eq!(agent.desired_version.as_deref(), Some(B));
        let u = agent.update.clone().expect("update status");
        assert_eq!(u.current_version, B, "{u:?}");
        assert_eq!(u.previous_version.as_deref(), Some(A), "{u:?}");
        assert!(u.last_error.is_none(), "{u:?}");
    }
    for (host, _) in &hosts {
        // Switched, and both versions are kept.
        assert_eq!(host.current_version().as_deref(), Some(B), "{}", host.diagnostics());
        assert_eq!(host.previous_version().as_deref(), Some(A), "{}", host.diagnostics());
        let installed = host.installed_versions();
        assert!(
            installed.contains(&A.to_string()) && installed.contains(&B.to_string()),
            "{installed:?}"
        );
        assert_eq!(current_version_line(host), format!("nkudo-edge {B}"));
        assert!(host.agent_pid().is_some(), "an agent runs\n{}", host.diagnostics());
        assert_eq!(host.update_state()["phase"], "committed", "{}", host.diagnostics());
    }

    // check-compat, fleet mode, against the real control plane: every agent, supported by this control plane.
    let out = releaser_command()
        .args([
            "check-compat",
            "--control-plane",
            env!("CARGO_PKG_VERSION"),
            "--url",
            &cp.base_url,
            "--output",
            "json",
        ])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path)
        .env("NKUDO_ADMIN_KEY", &cp.admin_key)
        .output()?;
    assert!(out.status.success(), "check-compat: {}", output_text(&out));
    let compat: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let listed = compat["agents"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{compat}");
    assert!(listed.iter().all(|x| x["agent_version"] == B), "{compat}");
    Ok(())
}
both_backends!(three_agents_update_from_a_to_b => three_agents_update_from_a_to_b_sqlite, three_agents_update_from_a_to_b_postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_and_the_agent_stays_on_a() -> anyhow::Result<()> {
    let key = new_release_key();
    // The control plane trusts a second key that the agent does not.
    let cp_only = new_release_key();
    let cp = start_or_skip!(release_control_plane(Backend::Sqlite, &[&key, &cp_only]).start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-releases")?;
    let older = build_release(tmp.path(), &ReleaseSpec::new("0.1.0"), &key)?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let (mut host, id) = host_on(&cp, &fx, "edge-refuse", &a, &[&key]).await?;

    // 1. A tampered artifact: the external base URL serves other bytes of the same size.
    let tampered = build_release(tmp.path(), &ReleaseSpec::new("0.1.3"), &key)?;
    let server = ArtifactServer::start()?;
    let mut bytes = tampered.tarball_bytes();
    let n = bytes.len();
    bytes[n / 2] ^= 0x5a;
    server.put(&tampered.tarball_name, bytes);
    publish_ok(&cp, &tampered, &["--external-base-url", &server.base_url])?;
    set_desired_ok(&cp, DesiredScope::Agent, Some(&id), &tampered.version, false).await?;
    let agent = wait_failed(&cp, &host, &id, &tampered.version, A).await?;
    assert!(
        server.requests().iter().any(|r| r.contains(&tampered.tarball_name)),
        "the agent fetched from the external URL: {:?}",
        server.requests()
    );
    let err = last_error(&agent).to_lowercase();
    assert!(err.contains("sha-256") || err.contains("sha256"), "{err}");
    assert_on(&host, A, &[&tampered.version]);

    // 2. Signed by a key the control plane trusts but the agent does not.
    let foreign = build_release(tmp.path(), &ReleaseSpec::new("0.1.4"), &cp_only)?;
    publish_ok(&cp, &foreign, &[])?;
    set_desired_ok(&cp, DesiredScope::Agent, Some(&id), &foreign.version, false).await?;
    let agent = wait_failed(&cp, &host, &id, &foreign.version, A).await?;
    let err = last_error(&agent);
    assert!(err.contains("not a trusted release key"), "{err}");
    assert_on(&host, A, &[&foreign.version]);

    // 3a. An expired manifest: the control plane refuses to register it.
    let expired = build_release(
        tmp.path(),
        &ReleaseSpec::new("0.1.5").expires_at(chrono::Utc::now() - chrono::Duration::hours(1)),
        &key,
    )?;
    let r = admin(&cp)
        .post(cp.url("/admin/releases"))
        .json(&PublishReleaseRequest {
            manifest: expired.manifest_text.clone(),
            signature: expired.signature_text.clone(),
            external_base_url: None,
        })
        .send()
        .await?;
    expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "MANIFEST_EXPIRED").await;
    // ... and `releaser publish` refuses it before sending anything (exit 3).
    let out = releaser_publish(&cp, &expired.dir, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));
    // 3b. One that expires between the offer and the agent's check: the agent is down while it is published
    // (valid) and targeted, and sees it only once it expired.
    host.stop_agent(Duration::from_secs(30)).await?;
    let expiring = build_release(
        tmp.path(),
        &ReleaseSpec::new("0.1.6").expires_in(Duration::from_secs(20)),
        &key,
    )?;
    publish_ok(&cp, &expiring, &[])?;
    let r = set_desired(&cp, DesiredScope::Agent, Some(&id), &expiring.version, false).await?;
    assert!(r.status().is_success(), "{}", r.text().await?);
    let wait = chrono::DateTime::parse_from_rfc3339(&expiring.manifest().expires)?.with_timezone(&chrono::Utc)
        - chrono::Utc::now();
    tokio::time::sleep(wait.to_std().unwrap_or_default() + Duration::from_secs(1)).await;
    host.spawn(&cp)?;
    let agent = wait_failed(&cp, &host, &id, &expiring.version, A).await?;
    let err = last_error(&agent);
    assert!(err.contains("expired"), "{err}");
    assert_on(&host, A, &[&expiring.version]);

    // 4. An older version not marked rollback: refused; the same version marked rollback: installed.
    publish_ok(&cp, &older, &[])?;
    set_desired_ok(&cp, DesiredScope::Agent, Some(&id), &older.version, false).await?;
    let agent = wait_failed(&cp, &host, &id, &older.version, A).await?;
    let err = last_error(&agent);
    assert!(err.contains("older") && err.contains("rollback"), "{err}");
    assert_on(&host, A, &[]);
    set_desired_ok(&cp, DesiredScope::Agent, Some(&id), &older.version, true).await?;
    wait_committed(&cp, &host, &id, &older.version).await?;
    assert_eq!(host.current_version().as_deref(), Some(older.version.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_releases_roll_back_to_a() -> anyhow::Result<()> {
    let key = new_release_key();
    let cp = start_or_skip!(release_control_plane(Backend::Sqlite, &[&key]).start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-releases")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    // (version, payload, host name, what the rollback reason says)
    let cases = [
        (
            "0.1.5",
            Payload::ExitsAtOnce,
            "exits-at-once",
            "exited during the trial",
        ),
        (
            "0.1.6",
            Payload::NeverHeartbeats,
            "never-heartbeats",
            "no healthy heartbeat within the health window",
        ),
        ("0.1.7", Payload::CrashesAfter(3), "crashes", "during the trial"),
        (
            "0.1.8",
            Payload::DoesNotStart,
            "does-not-start",
            "the pre-switch trial run failed",
        ),
    ];
    let mut runs = Vec::new();
    for (v, payload, name, reason) in cases {
        let rel = build_release(tmp.path(), &ReleaseSpec::new(v).payload(payload.clone()), &key)?;
        publish_ok(&cp, &rel, &[])?;
        let (host, id) = host_on(&cp, &fx, &format!("edge-{name}"), &a, &[&key]).await?;
        runs.push((rel, payload, host, id, reason));
    }
    // All at once, one desired version per agent.
    for (rel, _, _, id, _) in &runs {
        set_desired_ok(&cp, DesiredScope::Agent, Some(id), &rel.version, false).await?;
    }
    for (rel, payload, host, id, reason) in &runs {
        let v = rel.version.as_str();
        if *payload == Payload::DoesNotStart {
            // Refused by the pre-switch trial: never switched.
            let agent = wait_failed(&cp, host, id, v, A).await?;
            let err = last_error(&agent);
            assert!(err.contains(reason), "{err}");
            assert_on(host, A, &[]);
            assert!(
                !host
                    .log()
                    .contains(&format!("update watcher: watching the trial of {v}")),
                "no trial, no watcher\n{}",
                host.diagnostics()
            );
            continue;
        }
        let mut seen_new = false;
        let agent = wait_agent(
            &cp,
            host,
            id,
            UPDATE_DEADLINE,
            &format!("{v} rolled back to {A}"),
            |x| {
                seen_new |= x.agent_version == v;
                x.agent_version == A && phase(x) == "rolled-back" && last_error(x).contains(v)
            },
        )
        .await?;
        let u = agent.update.clone().unwrap();
        assert!(last_error(&agent).contains(reason), "{u:?}\n{}", host.diagnostics());
        assert_eq!(u.attempt_to.as_deref(), Some(v), "{u:?}");
        assert_eq!(u.attempt_from.as_deref(), Some(A), "{u:?}");
        if matches!(payload, Payload::CrashesAfter(_)) {
            // It did start and heartbeat as the new version, then crashed before it could commit.
            let log = host.log();
            let started = log
                .find(&format!("nkudo-edge {v} agent "))
                .unwrap_or_else(|| panic!("{v} never started\n{}", host.diagnostics()));
            let after = &log[started..];
            assert!(
                after.contains("heartbeat accepted") && after.contains("crashed (SIGKILL)"),
                "{v} heartbeated, then crashed\n{}",
                host.diagnostics()
            );
        }
        assert_eq!(host.current_version().as_deref(), Some(A), "{}", host.diagnostics());
        assert_eq!(current_version_line(host), format!("nkudo-edge {A}"));
        assert!(
            host.agent_pid().is_some(),
            "an agent runs again\n{}",
            host.diagnostics()
        );
        assert_eq!(host.update_state()["phase"], "rolled-back", "{}", host.diagnostics());
        assert!(
            host.watch_log()
                .contains(&format!("update watcher: rolled back to {A}")),
            "the watcher switched back\n{}",
            host.diagnostics()
        );
    }
    // The rolled-back hosts keep heartbeating on A (the bad version is not retried).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (rel, _, host, id, _) in &runs {
        let agent = admin_agent(&cp, id).await?;
        assert_eq!(agent.agent_version, A, "{}\n{}", rel.version, host.diagnostics());
        assert_eq!(host.current_version().as_deref(), Some(A));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_mid_download_the_agent_resumes() -> anyhow::Result<()> {
    let key = new_release_key();
    let port = free_port()?;
    let mut cp = start_or_skip!(release_control_plane(Backend::Sqlite, &[&key])
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-releases")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    // The real binary (several MiB compressed) plus 3 MiB of incompressible padding at 512 KiB/s: a download of
    // 15 s and more, long enough to kill the control plane in the middle.
    let b = build_release(tmp.path(), &ReleaseSpec::new(B).padding(3 << 20), &key)?;
    assert!(b.size > 6 << 20, "{} bytes", b.size);
    let mut host = LayoutHost::new("edge-resume", &a, &[&key])?;
    host.set_env("NKUDO_UPDATE_DOWNLOAD_RATE_LIMIT", "524288");
    host.set_env("NKUDO_MAX_BACKOFF", "2s");
    let id = host.enroll(&cp, &fx).await?;
    host.spawn(&cp)?;
    wait_agent(&cp, &host, &id, Duration::from_secs(60), "the first heartbeat", |x| {
        x.agent_version == A
    })
    .await?;
    publish_ok(&cp, &b, &[])?;
    set_desired_ok(&cp, DesiredScope::Agent, Some(&id), B, false).await?;

    // Kill the control plane (SIGKILL) once a good part is downloaded.
    let part = host
        .edge
        .state_dir
        .join("downloads")
        .join(format!("{}.part", b.tarball_name));
    let partial = poll_until(Duration::from_secs(60), "1 MiB downloaded", || async {
        let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        Ok((len >= 1 << 20).then_some(len))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", host.diagnostics()))?;
    assert!(partial < b.size, "still downloading");
    let pid = cp.pid().expect("control plane pid");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        kept >= partial,
        "the partial download is kept while the control plane is away ({kept} < {partial})\n{}",
        host.diagnostics()
    );
    cp.restart().await?;
    assert_eq!(cp.base_url, format!("https://127.0.0.1:{port}"));

    wait_committed(&cp, &host, &id, B).await?;
    // It resumed where it stopped (a `Range: bytes=<have>-` request), not a fresh download from byte 0: the agent
    // logs `self-update: resuming <artifact> at byte <have>`.
    let log = host.log();
    let needle = format!("resuming {} at byte ", b.tarball_name);
    let resumed_at: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split(&needle).nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    assert!(
        resumed_at.iter().any(|at| *at >= partial && *at < b.size),
        "no resumed download from byte >= {partial} in the agent log (resumed at {resumed_at:?})\n{}",
        host.diagnostics()
    );
    assert_eq!(host.current_version().as_deref(), Some(B));
    assert_eq!(current_version_line(&host), format!("nkudo-edge {B}"));
    Ok(())
}

async fn prerelease_for_a_production_site_is_refused(backend: Backend) -> anyhow::Result<()> {
    let key = new_release_key();
    let cp = start_or_skip!(release_control_plane(backend, &[&key]).start());
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-releases")?;
    let pre = build_release(tmp.path(), &ReleaseSpec::new("0.1.9-pre.3+abc1234"), &key)?;
    assert_eq!(pre.channel, "pre-release");
    publish_ok(&cp, &pre, &[])?;
    let release = build_release(tmp.path(), &ReleaseSpec::new(B), &key)?;
    publish_ok(&cp, &release, &[])?;
    // An agent in a production site (the API enrollment is enough: the rule is about who the version reaches).
    let agent = enroll_agent(&cp, &fx, "edge-prod").await?;
    let r = set_site_labels(&cp, fx.site_id(), &[("environment", "production"), ("ring", "stable")]).await?;
    assert!(r.status().is_success(), "labels: {}", r.text().await?);

    for (scope, target) in [
        (DesiredScope::Site, Some(fx.site_id())),
        (DesiredScope::Agent, Some(agent.agent_id())),
        (DesiredScope::Ring, Some("stable")),
        (DesiredScope::Fleet, None),
    ] {
        let r = set_desired(&cp, scope, target, &pre.version, false).await?;
        let body = expect_error(r, StatusCode::CONFLICT, "PRERELEASE_IN_PRODUCTION").await;
        assert!(!body.error.is_empty());
    }
    // A release is fine there; and the pre-release is fine once the site is not production.
    set_desired_ok(&cp, DesiredScope::Site, Some(fx.site_id()), &release.version, false).await?;
    let r = set_site_labels(&cp, fx.site_id(), &[("environment", "test")]).await?;
    assert!(r.status().is_success());
    set_desired_ok(&cp, DesiredScope::Site, Some(fx.site_id()), &pre.version, false).await?;
    Ok(())
}
both_backends!(prerelease_for_a_production_site_is_refused => prerelease_for_a_production_site_is_refused_sqlite, prerelease_for_a_production_site_is_refused_postgres);

/// The fixtures themselves, without a control plane: every release verifies with `releaser verify`, installs
/// into a layout, and its `bin/nkudo-edge version` says what the pre-switch trial expects (or fails, for the
/// release that does not start).
#[test]
fn test_releases_verify_install_and_report_their_version() -> anyhow::Result<()> {
    let key = new_release_key();
    let tmp = TempDir::new("nkudo-releases")?;
    let cases = [
        ("0.1.1", Payload::Real),
        ("0.1.5", Payload::ExitsAtOnce),
        ("0.1.6", Payload::NeverHeartbeats),
        ("0.1.7", Payload::CrashesAfter(3)),
        ("0.1.8", Payload::DoesNotStart),
        ("0.1.9-pre.3+abc1234", Payload::Real),
    ];
    let root = tmp.path().join("opt-nkudo");
    for (v, payload) in cases {
        let rel = build_release(tmp.path(), &ReleaseSpec::new(v).payload(payload.clone()), &key)?;
        let out = releaser_command()
            .arg("verify")
            .arg(&rel.dir)
            .args(["--public-key-string", &public_key_b64(&key)])
            .output()?;
        assert!(out.status.success(), "{v}: {}", output_text(&out));
        install_into_layout(&root, &rel, true)?;
        assert_eq!(layout_link(&root, "current").as_deref(), Some(v));
        let dir = root.join("releases").join(v);
        assert_eq!(std::fs::read_to_string(dir.join("manifest.json"))?, rel.manifest_text);
        let o = std::process::Command::new(dir.join("bin/nkudo-edge"))
            .arg("version")
            .output()?;
        let first = String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if payload == Payload::DoesNotStart {
            assert_eq!(o.status.code(), Some(1), "{v}");
        } else {
            assert!(o.status.success(), "{v}: {}", output_text(&o));
            assert_eq!(first, format!("nkudo-edge {v}"), "{v}: {}", output_text(&o));
        }
        if payload == Payload::ExitsAtOnce {
            let o = std::process::Command::new(dir.join("bin/nkudo-edge"))
                .arg("run")
                .output()?;
            assert_eq!(o.status.code(), Some(3));
        }
    }
    // Padding makes the tarball that much bigger (incompressible).
    let padded = build_release(tmp.path(), &ReleaseSpec::new("0.2.0").padding(1 << 20), &key)?;
    let plain = build_release(tmp.path(), &ReleaseSpec::new("0.2.1"), &key)?;
    assert!(
        padded.size > plain.size + (1 << 20) - 4096,
        "{} vs {}",
        padded.size,
        plain.size
    );
    Ok(())
}

/// `releaser publish` against the real control plane: what it refuses, and that the refusal says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releaser_publish_refusals_from_the_control_plane() -> anyhow::Result<()> {
    let key = new_release_key();
    let cp = start_or_skip!(release_control_plane(Backend::Sqlite, &[&key]).start());
    let tmp = TempDir::new("nkudo-releases")?;
    // Signed by a key the control plane does not trust (and the directory's own key is not trusted for that).
    let stranger = new_release_key();
    let foreign = build_release(tmp.path(), &ReleaseSpec::new("0.1.3"), &stranger)?;
    let out = releaser_publish(&cp, &foreign.dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_SIGNATURE") && err.contains("RELEASE_PUBLIC_KEYS"),
        "{err}"
    );
    // ... and with the trusted key given to the releaser, it is refused before anything is sent (exit 3).
    let out = releaser_publish(&cp, &foreign.dir, &["--public-key-string", &public_key_b64(&key)]);
    assert_eq!(out.status.code(), Some(3), "{}", output_text(&out));

    // A version is published once: another manifest under the same version is a conflict.
    let first = build_release(tmp.path(), &ReleaseSpec::new("0.1.4"), &key)?;
    publish_ok(&cp, &first, &[])?;
    let second = build_release(
        tmp.path(),
        &ReleaseSpec::new("0.1.4").file("extra.txt", b"different bytes\n".to_vec()),
        &key,
    )?;
    let out = releaser_publish(&cp, &second.dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("409") && err.contains("a version is published once"),
        "{err}"
    );

    // The wrong admin key.
    let out = releaser_command()
        .arg("publish")
        .arg(&first.dir)
        .args(["--url", &cp.base_url, "--admin-key", "not-the-key"])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path)
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--admin-key"),
        "{}",
        output_text(&out)
    );

    // What was published is listed with its artifact available.
    let r = admin(&cp).get(cp.url("/admin/releases/0.1.4")).send().await?;
    let info: nkudo_core::api::ReleaseInfo = expect_json(r, StatusCode::OK, "GET /admin/releases/0.1.4").await?;
    assert_eq!(info.key_id, key.public_key().key_id.to_string());
    assert!(info.artifacts.iter().all(|a| a.available), "{info:?}");
    assert_eq!(info.artifacts[0].sha256, first.sha256);
    Ok(())
}
