//! `nkudo-bench rollout`: the rollout controller's cycle time with a large fleet (issue 7's figure: under 1 s per
//! evaluation cycle with 100,000 registered agents).
//!
//! Simulated rows are written straight into the control plane's database (a tenant, `--sites` sites labelled
//! `ring=stable`, one host and one agent row per agent), and a release row is registered. A rollout is then
//! started over the real API with one stage selecting every agent and a blast radius of `--batch` agents. The
//! simulated agents never report the new version, so after the first batch every cycle is the steady state the
//! controller spends its life in: it loads the stage's members with their reported versions and update phases,
//! checks the report timeouts and the blast radius, and evaluates the built-in triggers from its own statistics.
//! The first cycle after start (selecting the stage's members out of the whole fleet and recording them) is
//! reported apart. Figures come from the server's `nkudo_rollout_cycle_seconds` histogram.

use anyhow::{bail, Context, Result};
use nkudo_core::api::{Rollout, StartRolloutRequest};
use nkudo_tests::{admin, bootstrap, connect_db, expect_json, Backend, ControlPlane};
use reqwest::StatusCode;
use serde::Serialize;
use sqlx::Executor;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    agents: u32,
    /// Sites they are spread over.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    sites: u32,
    /// The stage's blast radius (agents switching at once).
    #[arg(long, default_value_t = 1000)]
    batch: u32,
    /// Seconds of steady-state cycles to measure.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    backend: String,
    agents: u32,
    sites: u32,
    batch: u32,
    insert_s: f64,
    first_cycle_s: f64,
    steady_cycles: u64,
    steady_mean_ms: f64,
    /// Upper bound of the histogram bucket holding the 99th percentile of steady cycles.
    steady_p99_le_ms: f64,
    steady_max_le_ms: f64,
}

/// `(le, cumulative count)` buckets, count and sum of `nkudo_rollout_cycle_seconds`.
fn histogram(metrics: &str) -> (Vec<(f64, u64)>, u64, f64) {
    let mut buckets = Vec::new();
    let (mut count, mut sum) = (0, 0.0);
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("nkudo_rollout_cycle_seconds_bucket{le=\"") {
            if let Some((le, v)) = rest.split_once("\"} ") {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                buckets.push((le, v.trim().parse().unwrap_or(0)));
            }
        } else if let Some(v) = line.strip_prefix("nkudo_rollout_cycle_seconds_count ") {
            count = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("nkudo_rollout_cycle_seconds_sum ") {
            sum = v.trim().parse().unwrap_or(0.0);
        }
    }
    (buckets, count, sum)
}

async fn scrape(cp: &ControlPlane) -> Result<(Vec<(f64, u64)>, u64, f64)> {
    let text = admin(cp).get(cp.url("/metrics")).send().await?.text().await?;
    Ok(histogram(&text))
}

pub async fn run(args: RolloutArgs) -> Result<bool> {
    let backend = match args.backend.as_str() {
        "sqlite" => Backend::Sqlite,
        "postgres" => Backend::Postgres,
        other => bail!("--backend {other}: sqlite or postgres"),
    };
    let Some(cp) = ControlPlane::builder(backend)
        .env("RUST_LOG", &args.server_log)
        .env("ROLLOUT_TICK", "1s")
        .start()
        .await?
    else {
        bail!("{} is not available", args.backend);
    };
    let fx = bootstrap(&cp).await?;
    let started = Instant::now();
    let mut conn = connect_db(cp.db(), &cp.data_dir).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut site_ids = Vec::new();
    for s in 0..args.sites {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO sites (id, tenant_id, name, connectivity_state, labels_json, created_at, updated_at) \
             VALUES ($1, $2, $3, 'ONLINE', '{\"ring\":\"stable\",\"environment\":\"production\"}', $4, $4)",
        )
        .bind(&id)
        .bind(fx.tenant_id())
        .bind(format!("bench-site-{s}"))
        .bind(now)
        .execute(&mut conn)
        .await?;
        site_ids.push(id);
    }
    conn.execute("BEGIN").await?;
    let chunk = 200usize;
    let total = args.agents as usize;
    let mut i = 0;
    while i < total {
        let n = chunk.min(total - i);
        let mut hosts =
            String::from("INSERT INTO hosts (id, tenant_id, site_id, hostname, created_at, updated_at) VALUES ");
        let mut agents = String::from(
            "INSERT INTO agents (id, tenant_id, site_id, host_id, agent_version, os, arch, state, cert_serial, \
             cert_expires_at, refresh_token_hash, enrolled_at, last_heartbeat_at, auth_changed_at, created_at, \
             updated_at, update_json) VALUES ",
        );
        for k in 0..n {
            let idx = i + k;
            let site = &site_ids[idx % site_ids.len()];
            let host = uuid::Uuid::new_v4().to_string();
            let agent = uuid::Uuid::new_v4().to_string();
            let sep = if k == 0 { "" } else { "," };
            hosts.push_str(&format!(
                "{sep}('{host}', '{}', '{site}', 'bench-{idx}', {now}, {now})",
                fx.tenant_id()
            ));
            agents.push_str(&format!(
                "{sep}('{agent}', '{}', '{site}', '{host}', '1.0.0', 'linux', 'amd64', 'ONLINE', 'serial-{idx}', \
                 {}, 'x', {now}, {now}, {now}, {now}, {now}, '{{\"current_version\":\"1.0.0\",\"phase\":\"idle\",\"restarts\":0}}')",
                fx.tenant_id(),
                now + 86_400_000
            ));
        }
        conn.execute(hosts.as_str()).await.context("insert hosts")?;
        conn.execute(agents.as_str()).await.context("insert agents")?;
        i += n;
    }
    sqlx::query(
        "INSERT INTO releases (version, channel, manifest, signature, key_id, expires_at, published_at) \
         VALUES ('2.0.0', 'release', '{}', '', 'bench', $1, $2)",
    )
    .bind(now + 86_400_000)
    .bind(now)
    .execute(&mut conn)
    .await?;
    conn.execute("COMMIT").await?;
    let insert_s = started.elapsed().as_secs_f64();

    let policy = format!(
        "version = \"2.0.0\"\n[[stage]]\nname = \"stable\"\nrings = [\"stable\"]\nmax_concurrent = {}\n\
         report_timeout = \"1h\"\nbake = \"1h\"\n",
        args.batch
    );
    let (_, before_count, before_sum) = scrape(&cp).await?;
    let r = admin(&cp)
        .post(cp.url("/admin/rollouts"))
        .json(&StartRolloutRequest { policy })
        .send()
        .await?;
    let rollout: Rollout = expect_json(r, StatusCode::CREATED, "start the rollout").await?;
    // The first cycles: stage start (selection of every agent), then the first batch.
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut b1, mut c1, mut s1);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (b1, c1, s1) = scrape(&cp).await?;
        let r = admin(&cp)
            .get(cp.url(&format!("/admin/rollouts/{}", rollout.id)))
            .send()
            .await?;
        let view: Rollout = expect_json(r, StatusCode::OK, "rollout").await?;
        if view.stages[0].switched > 0 && c1 >= before_count + 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the rollout did not switch its first batch within 10 minutes");
        }
    }
    let first_cycle_s = s1 - before_sum;
    let _ = b1;
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let (b2, c2, s2) = scrape(&cp).await?;
    let steady = c2.saturating_sub(c1);
    let mean_ms = if steady > 0 {
        (s2 - s1) / steady as f64 * 1000.0
    } else {
        f64::NAN
    };
    // Bucket-wise difference: the distribution of the steady cycles only.
    let diff: Vec<(f64, u64)> = b2
        .iter()
        .map(|(le, v)| (*le, v - b1.iter().find(|(l, _)| l == le).map(|x| x.1).unwrap_or(0)))
        .collect();
    let le_at = |q: f64| {
        let want = (steady as f64 * q).ceil() as u64;
        diff.iter()
            .find(|(_, v)| *v >= want.max(1))
            .map(|(le, _)| le * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let report = Report {
        benchmark: "rollout-controller-cycle",
        backend: args.backend.clone(),
        agents: args.agents,
        sites: args.sites,
        batch: args.batch,
        insert_s,
        first_cycle_s,
        steady_cycles: steady,
        steady_mean_ms: mean_ms,
        steady_p99_le_ms: le_at(0.99),
        steady_max_le_ms: le_at(1.0),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "rollout controller, {} agents on {} ({} sites, batch {}):\n  simulated rows written in {:.1} s\n  \
             first cycles (stage start: select and record every member, first batch): {:.2} s in all\n  \
             steady state: {} cycles, mean {:.1} ms, p99 <= {} ms, max <= {} ms",
            report.agents,
            report.backend,
            report.sites,
            report.batch,
            report.insert_s,
            report.first_cycle_s,
            report.steady_cycles,
            report.steady_mean_ms,
            report.steady_p99_le_ms,
            report.steady_max_le_ms
        );
    }
    Ok(report.steady_mean_ms < 1000.0)
}
