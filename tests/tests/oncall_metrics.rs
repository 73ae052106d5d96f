//! The control plane's on-call metrics (issue 8), scraped from a real control plane on SQLite and Postgres with
//! short FLEET_GAUGES_INTERVAL and AUDIT_VERIFY_INTERVAL:
//! * per-site fleet gauges follow enrolled agents' heartbeats: states, the largest heartbeat lag, the earliest
//!   certificate expiry (the issued certificate's notAfter), and a site's series vanish when its last agent is
//!   revoked; the configured certificate TTL and the build info;
//! * a tenant API key on another tenant's path answers 404 and counts one isolation violation under the
//!   caller's own tenant (kind `tenant`, then `site`), next to `nkudo_auth_failures_total{kind="cross_tenant"}`;
//! * an audit event changed directly in the database turns `nkudo_audit_chain_broken{tenant}` to 1 and counts
//!   broken runs; restoring the row brings it back to 0; and `AUDIT_VERIFY_INTERVAL=off` runs nothing.

use nkudo_tests::*;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Row;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Time for a condition that the 1 s background tasks make true.
const WAIT: Duration = Duration::from_secs(30);
/// The agent certificate TTL the control plane runs with (2 h).
const CERT_TTL_SECS: f64 = 7200.0;

/// One sample of the text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `name{k="v",...} value` lines (comments skipped; `\"`, `\\` and `\n` unescaped in label values).
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            let mut end = body.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        let mut value = String::new();
                        let _ = chars.next(); // the opening quote
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(other) => value.push(other),
                                    None => {}
                                },
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &body[end..];
        }
        if let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            out.push(Sample { name, labels, value });
        }
    }
    out
}

/// What one `/metrics` scrape said.
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// The value of the series `name` whose labels are exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
    /// Every series of `name` that has all of `labels` (and maybe more).
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .collect()
    }
}

async fn scrape(cp: &ControlPlane) -> anyhow::Result<Scrape> {
    let r = anon(cp).get(cp.url("/metrics")).send().await?;
    anyhow::ensure!(r.status() == StatusCode::OK, "GET /metrics: {}", r.status());
    let text = r.text().await?;
    Ok(Scrape {
        samples: parse_exposition(&text),
        text,
    })
}

/// Scrapes until `check` accepts a scrape (returns `Some`), failing with the last scrape after [`WAIT`].
async fn wait_metrics<T>(
    cp: &ControlPlane,
    what: &str,
    mut check: impl FnMut(&Scrape) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(cp).await?;
        if let Some(v) = check(&s) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "timed out after {WAIT:?} waiting for {what}; last /metrics:\n{}",
                s.text
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_secs() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

/// The control plane for these scenarios: every on-call task each second, agents offline after 4 s of silence.
async fn start(backend: Backend, audit_interval: &str) -> anyhow::Result<Option<ControlPlane>> {
    ControlPlane::builder(backend)
        .env("FLEET_GAUGES_INTERVAL", "1s")
        .env("AUDIT_VERIFY_INTERVAL", audit_interval)
        .env("AGENT_CERT_TTL", "2h")
        .env("HEARTBEAT_OFFLINE_AFTER", "4s")
        .env("OFFLINE_SWEEP_INTERVAL", "1s")
        .start()
        .await
}

/// Keeps an agent heartbeating every 500 ms until dropped.
struct Heartbeats(tokio::task::JoinHandle<()>);

impl Heartbeats {
    fn start(cp: &ControlPlane, agent: &EnrolledAgent) -> Heartbeats {
        let (client, url, body) = (
            agent.client(cp),
            cp.url("/v1/heartbeat"),
            legacy_heartbeat_body(agent.agent_id()),
        );
        Heartbeats(tokio::spawn(async move {
            loop {
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    Ok(r) => eprintln!("heartbeat answered {}", r.status()),
                    Err(e) => eprintln!("heartbeat failed: {}", error_chain(&e)),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }))
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn revoke(cp: &ControlPlane, fx: &Fixture, agent: &EnrolledAgent) -> anyhow::Result<()> {
    let r = tenant(cp, &fx.api_key)
        .post(cp.url(&format!(
            "/tenants/{}/agents/{}/revoke",
            fx.tenant_id(),
            agent.agent_id()
        )))
        .json(&json!({"reason": "oncall metrics test"}))
        .send()
        .await?;
    anyhow::ensure!(
        r.status() == StatusCode::OK,
        "revoke: {} {}",
        r.status(),
        r.text().await?
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------

async fn site_gauges_follow_the_fleet(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(start(backend, "1h"));
    let fx = bootstrap(&cp).await?;
    let steady = enroll_agent(&cp, &fx, "edge-steady").await?;
    let silent = enroll_agent(&cp, &fx, "edge-silent").await?;
    let _beats = Heartbeats::start(&cp, &steady);
    let site = [
        ("tenant", fx.tenant.slug.as_str()),
        ("site", fx.site.name.as_str()),
        ("tenant_id", fx.tenant_id()),
        ("site_id", fx.site_id()),
    ];
    let with_state = |state: &'static str| {
        let mut l = site.to_vec();
        l.push(("state", state));
        l
    };
    let agents = |s: &Scrape, state: &'static str| s.get("nkudo_site_agents", &with_state(state));
    let lag = |s: &Scrape| s.get("nkudo_site_heartbeat_lag_seconds", &site);

    // Both agents just enrolled (enrollment counts as the first contact): online, lag small.
    let lag_now = wait_metrics(&cp, "two online agents", |s| {
        (agents(s, "online") == Some(2.0)).then(|| lag(s)).flatten()
    })
    .await?;
    // Both still online: at most HEARTBEAT_OFFLINE_AFTER (4 s) plus a sweep and a gauge interval have passed.
    assert!((0.0..7.0).contains(&lag_now), "lag right after enrollment: {lag_now}");
    let s = scrape(&cp).await?;
    assert_eq!(
        agents(&s, "degraded"),
        Some(0.0),
        "every state has a series:\n{}",
        s.text
    );
    let expiry = s
        .get("nkudo_site_certificate_expiry_earliest_timestamp_seconds", &site)
        .expect("certificate expiry series");
    let not_after = [&steady, &silent]
        .iter()
        .map(|a| inspect_cert(&a.cert_pem).map(|c| c.not_after))
        .collect::<anyhow::Result<Vec<i64>>>()?;
    let earliest = *not_after.iter().min().expect("two certificates") as f64;
    assert!(
        (expiry - earliest).abs() <= 1.0,
        "earliest expiry {expiry} != the issued certificates' earliest notAfter {earliest}"
    );
    assert!(
        (expiry - (now_secs() + CERT_TTL_SECS)).abs() < 300.0,
        "earliest expiry {expiry} is not about now + AGENT_CERT_TTL (2h)"
    );
    assert_eq!(s.get("nkudo_agent_certificate_ttl_seconds", &[]), Some(CERT_TTL_SECS));
    // Build info: the version `nkudo-control-plane version` prints, and the build version (the same here).
    let out = cp.run_cli(["version"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let version = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("nkudo-control-plane "))
        .expect("version line")
        .to_string();
    let build = text
        .lines()
        .find_map(|l| l.strip_prefix("build: "))
        .unwrap_or(&version)
        .to_string();
    assert_eq!(
        s.get(
            "nkudo_control_plane_build_info",
            &[("version", &version), ("build", &build)]
        ),
        Some(1.0),
        "{}",
        s.text
    );

    // The silent agent goes offline after 4 s; the site's lag is its silence, not the steady agent's.
    let lag_offline = wait_metrics(&cp, "one agent offline", |s| {
        (agents(s, "offline") == Some(1.0) && agents(s, "online") == Some(1.0))
            .then(|| lag(s))
            .flatten()
    })
    .await?;
    assert!(
        lag_offline >= 4.0,
        "lag of a site with an agent silent for 4 s+: {lag_offline}"
    );
    let later = wait_metrics(&cp, "the lag to grow", |s| lag(s).filter(|l| *l >= lag_offline + 1.5)).await?;
    assert!(later < 60.0, "lag {later}");

    // Revoked agents do not count: with the silent one revoked, the lag is the steady agent's (small).
    revoke(&cp, &fx, &silent).await?;
    let lag_steady = wait_metrics(&cp, "the revoked agent to leave the gauges", |s| {
        (agents(s, "offline") == Some(0.0) && agents(s, "online") == Some(1.0))
            .then(|| lag(s))
            .flatten()
    })
    .await?;
    assert!(
        lag_steady < 4.0,
        "lag of an agent heartbeating every 500 ms: {lag_steady}"
    );

    // The site's last agent revoked: its series go away.
    revoke(&cp, &fx, &steady).await?;
    wait_metrics(&cp, "the site's series to vanish", |s| {
        let left = s.matching("nkudo_site_agents", &[("site_id", fx.site_id())]).len()
            + s.matching("nkudo_site_heartbeat_lag_seconds", &[("site_id", fx.site_id())])
                .len()
            + s.matching(
                "nkudo_site_certificate_expiry_earliest_timestamp_seconds",
                &[("site_id", fx.site_id())],
            )
            .len();
        (left == 0).then_some(())
    })
    .await?;
    Ok(())
}
both_backends!(site_gauges_follow_the_fleet => site_gauges_follow_the_fleet_sqlite, site_gauges_follow_the_fleet_postgres);

// ---------------------------------------------------------------------------------------------------------

async fn isolation_violations_count_the_callers_tenant(backend: Backend) -> anyhow::Result<()> {
    let cp = start_or_skip!(start(backend, "1h"));
    let a = bootstrap(&cp).await?;
    let b = bootstrap(&cp).await?;
    let series = |fx: &Fixture, kind: &'static str| {
        vec![
            ("tenant", fx.tenant.slug.clone()),
            ("tenant_id", fx.tenant.id.clone()),
            ("kind", kind.to_string()),
        ]
    };
    let get = |s: &Scrape, fx: &Fixture, kind: &'static str| {
        let l = series(fx, kind);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.get("nkudo_tenant_isolation_violations_total", &l)
    };
    // Every tenant's series exist at 0 before any violation (so that the first one is an increase).
    wait_metrics(&cp, "isolation series of both tenants at 0", |s| {
        ["tenant", "site", "execution"]
            .iter()
            .all(|k| get(s, &a, k) == Some(0.0) && get(s, &b, k) == Some(0.0))
            .then_some(())
    })
    .await?;
    let before = scrape(&cp).await?;
    let cross_before = before
        .get("nkudo_auth_failures_total", &[("kind", "cross_tenant")])
        .unwrap_or(0.0);

    // A's key on B's tenant path, then on B's site: 404 both, never a hint.
    let ka = tenant(&cp, &a.api_key);
    let r = ka
        .get(cp.url(&format!("/tenants/{}/sites", b.tenant_id())))
        .send()
        .await?;
    expect_error(r, StatusCode::NOT_FOUND, "").await;
    let r = ka.get(cp.url(&format!("/sites/{}/hosts", b.site_id()))).send().await?;
    expect_error(r, StatusCode::NOT_FOUND, "").await;
    // A's own resources are no violation.
    let r = ka
        .get(cp.url(&format!("/tenants/{}/sites", a.tenant_id())))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);

    let s = scrape(&cp).await?;
    assert_eq!(get(&s, &a, "tenant"), Some(1.0), "{}", s.text);
    assert_eq!(get(&s, &a, "site"), Some(1.0), "{}", s.text);
    assert_eq!(get(&s, &a, "execution"), Some(0.0));
    for kind in ["tenant", "site", "execution"] {
        assert_eq!(
            get(&s, &b, kind),
            Some(0.0),
            "the victim tenant {kind} is not the caller"
        );
    }
    assert_eq!(
        s.get("nkudo_auth_failures_total", &[("kind", "cross_tenant")]),
        Some(cross_before + 2.0),
        "nkudo_auth_failures_total{{kind=\"cross_tenant\"}} still counts"
    );
    Ok(())
}
both_backends!(
    isolation_violations_count_the_callers_tenant => isolation_violations_count_the_callers_tenant_sqlite,
    isolation_violations_count_the_callers_tenant_postgres
);

// ---------------------------------------------------------------------------------------------------------

async fn audit_verification_finds_a_tampered_chain(backend: Backend) -> anyhow::Result<()> {
    let started = now_secs();
    let cp = start_or_skip!(start(backend, "1s"));
    let a = bootstrap(&cp).await?;
    let b = bootstrap(&cp).await?;
    let both_exist = now_secs();
    let runs = |s: &Scrape, r: &str| {
        s.get("nkudo_audit_verify_runs_total", &[("result", r)])
            .unwrap_or_default()
    };
    let broken = |s: &Scrape, fx: &Fixture| {
        s.get(
            "nkudo_audit_chain_broken",
            &[("tenant", &fx.tenant.slug), ("tenant_id", fx.tenant_id())],
        )
    };
    // Intact chains: runs counted ok, no broken series, a fresh completion time.
    let s = wait_metrics(&cp, "a verification after both tenants exist", |s| {
        let last = s.get("nkudo_audit_verify_last_success_timestamp_seconds", &[])?;
        (runs(s, "ok") >= 1.0 && last > both_exist).then(|| scrape_clone(s))
    })
    .await?;
    let last = s
        .get("nkudo_audit_verify_last_success_timestamp_seconds", &[])
        .unwrap_or_default();
    assert!(last >= started && last <= now_secs() + 1.0, "last success {last}");
    assert!(s.matching("nkudo_audit_chain_broken", &[]).is_empty(), "{}", s.text);
    assert_eq!((runs(&s, "broken"), runs(&s, "error")), (0.0, 0.0));

    // Change A's first audit event behind the control plane's back.
    let mut db = connect_db(cp.db(), &cp.data_dir).await?;
    let original: String = sqlx::query("SELECT action FROM audit_events WHERE tenant_id = $1 AND seq = 1")
        .bind(a.tenant_id())
        .fetch_one(&mut db)
        .await?
        .try_get(0)?;
    let tamper = |action: &str| {
        sqlx::query("UPDATE audit_events SET action = $1 WHERE tenant_id = $2 AND seq = 1")
            .bind(action.to_string())
            .bind(a.tenant_id().to_string())
    };
    assert_eq!(tamper("tenant.delete").execute(&mut db).await?.rows_affected(), 1);
    let broken_before = runs(&scrape(&cp).await?, "broken");
    let s = wait_metrics(&cp, "A's chain reported broken", |s| {
        (broken(s, &a) == Some(1.0) && runs(s, "broken") > broken_before).then(|| scrape_clone(s))
    })
    .await?;
    assert_eq!(broken(&s, &b), None, "B's chain is intact:\n{}", s.text);
    assert_eq!(
        s.get("nkudo_audit_chain_broken", &[("tenant", "system"), ("tenant_id", "")]),
        None
    );
    // A broken verification still ran to completion.
    let last_broken = s
        .get("nkudo_audit_verify_last_success_timestamp_seconds", &[])
        .unwrap_or_default();
    assert!(last_broken > last, "last success {last_broken} after {last}");
    let log = cp.stderr_log();
    assert!(
        log.lines()
            .any(|l| l.contains("audit chain broken") && l.contains(a.tenant_id()) && l.contains("ERROR")),
        "no error log line names the broken chain:\n{log}"
    );

    // Restored (as from a backup): back to 0, and runs are ok again.
    assert_eq!(tamper(&original).execute(&mut db).await?.rows_affected(), 1);
    drop(db);
    let ok_before = runs(&scrape(&cp).await?, "ok");
    wait_metrics(&cp, "A's chain back to 0", |s| {
        (broken(s, &a) == Some(0.0) && runs(s, "ok") > ok_before).then_some(())
    })
    .await?;
    Ok(())
}
both_backends!(
    audit_verification_finds_a_tampered_chain => audit_verification_finds_a_tampered_chain_sqlite,
    audit_verification_finds_a_tampered_chain_postgres
);

fn scrape_clone(s: &Scrape) -> Scrape {
    Scrape {
        samples: s.samples.clone(),
        text: s.text.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verification_can_be_switched_off() -> anyhow::Result<()> {
    let cp = start_or_skip!(start(Backend::Sqlite, "off"));
    bootstrap(&cp).await?;
    // The fleet gauges do run (their first refresh is at start), the verification never does.
    wait_metrics(&cp, "the certificate TTL gauge", |s| {
        (s.get("nkudo_agent_certificate_ttl_seconds", &[]) == Some(CERT_TTL_SECS)).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = scrape(&cp).await?;
    for result in ["ok", "broken", "error"] {
        assert_eq!(
            s.get("nkudo_audit_verify_runs_total", &[("result", result)]),
            Some(0.0),
            "{}",
            s.text
        );
    }
    // Never completed: 0, which NkudoAuditVerificationStale reads as stale.
    assert_eq!(
        s.get("nkudo_audit_verify_last_success_timestamp_seconds", &[]),
        Some(0.0)
    );
    assert!(cp.stderr_log().contains("periodic audit verification disabled"));
    Ok(())
}

#[test]
fn exposition_parser_reads_labels_and_values() {
    let text = "# HELP m help\n# TYPE m gauge\nm{a=\"x,y\",b=\"q\\\"uote\"} 1.5\nplain 2\nm{a=\"\"} -3e2\n";
    let s = parse_exposition(text);
    assert_eq!(s.len(), 3, "{s:?}");
    assert_eq!(s[0].labels.get("a").map(String::as_str), Some("x,y"));
    assert_eq!(s[0].labels.get("b").map(String::as_str), Some("q\"uote"));
    assert_eq!(s[0].value, 1.5);
    assert_eq!((s[1].name.as_str(), s[1].labels.len(), s[1].value), ("plain", 0, 2.0));
    assert_eq!(s[2].labels.get("a").map(String::as_str), Some(""));
    assert_eq!(s[2].value, -300.0);
}
