//! `nkudo-bench`: load benchmarks against the real control-plane binary (run it through
//! `cargo xtask bench heartbeat`, which builds both in release and points `NKUDO_BIN_DIR` at them).
//!
//! `nkudo-bench heartbeat` starts a control plane per backend with the test harness, bootstraps a tenant, a site
//! and N enrollment tokens, enrolls N simulated agents concurrently (ECDSA P-256 CSRs made with rcgen), then
//! drives heartbeats over mTLS (HTTP/1.1 keep-alive) from C concurrent closed-loop workers for a fixed time
//! after a warm-up. Worker `i` owns agents `i, i+C, i+2C, …`, each with its own client (its own certificate,
//! hence its own TLS connection), and sends their heartbeats in turn. Every latency goes into an HDR
//! histogram; the report has throughput, p50/p95/p99/max, errors and the server's peak RSS.
//!
//! Only 127.0.0.1 is contacted (the control plane the harness started, and Postgres for the test database).
//! Every phase is bounded in time.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use nkudo_core::api::{
    CreateEnrollmentTokenRequest, DiskFacts, EnrollResponse, EnrollmentTokenCreated, HeartbeatRequest,
    HeartbeatResponse, HostFacts, InterfaceFacts, KvmFacts, MicroVmReport, NetbirdStatus,
};
use nkudo_tests::{
    anon, bootstrap, client_builder, enroll_request, expect_json, make_csr, tenant, Backend, ControlPlane,
    TEST_AGENT_VERSION,
};
use reqwest::{header, Client, StatusCode};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Per-request timeout of the benchmark clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for bootstrapping and enrolling every agent.
const ENROLL_PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// Concurrency of token issuing and enrollment.
const SETUP_CONCURRENCY: usize = 32;
/// Placeholder of `sent_at` in the pre-serialized heartbeat bodies.
const SENT_AT_PLACEHOLDER: &str = "__NKUDO_BENCH_SENT_AT__";

#[derive(Debug, Parser)]
#[command(
    name = "nkudo-bench",
    version,
    about = "Load benchmarks against the real n-kudo control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Enroll N agents and drive mTLS heartbeats from C keep-alive connections for a fixed time.
    Heartbeat(HeartbeatArgs),
    /// The rollout controller's cycle time over a large simulated fleet.
    Rollout(rollout::RolloutArgs),
}

#[path = "bench/rollout.rs"]
mod rollout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Postgres,
    Sqlite,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// HTTP/1.1 with keep-alive, one request at a time per connection (what agents use).
    Http1,
    /// HTTP/2 (ALPN h2), for comparison.
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
struct HeartbeatArgs {
    /// Number of simulated agents to enroll.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    agents: u32,
    /// Measured duration in seconds (after the warm-up).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: u64,
    /// Concurrent keep-alive connections (closed-loop workers) driving heartbeats.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    connections: u32,
    /// Which database backend(s) to measure (`both`: SQLite, then Postgres).
    #[arg(long, value_enum, default_value_t = BackendArg::Both)]
    backend: BackendArg,
    /// Warm-up in seconds before measuring (connections are opened then).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=600))]
    warmup: u64,
    /// Protocol of the heartbeat connections.
    #[arg(long, value_enum, default_value_t = Protocol::Http1)]
    protocol: Protocol,
    /// `RUST_LOG` of the control plane (its logs go to a file in its temp dir).
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// What one backend's run measured.
#[derive(Debug, Clone, Serialize)]
struct BackendResult {
    backend: String,
    /// Set when the backend could not be had (Postgres down outside CI); nothing else is meaningful then.
    skipped: Option<String>,
    agents: u32,
    connections: u32,
    duration_s: f64,
    enroll_s: f64,
    heartbeats: u64,
    heartbeats_per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    errors: u64,
    warmup_errors: u64,
    first_error: Option<String>,
    server_peak_rss_mib: Option<f64>,
    /// Server CPU during the measured window, in percent of one core.
    server_cpu_pct: Option<f64>,
    /// This load generator's CPU during the measured window, in percent of one core.
    bench_cpu_pct: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    agents: u32,
    connections: u32,
    duration_s: u64,
    warmup_s: u64,
    protocol: String,
    cpus: usize,
    results: Vec<BackendResult>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Cmd::Heartbeat(args) => heartbeat(args).await,
        Cmd::Rollout(args) => rollout::run(args).await,
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("nkudo-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the heartbeat benchmark on the chosen backends; `Ok(false)` when any request failed.
async fn heartbeat(args: HeartbeatArgs) -> Result<bool> {
    let backends = match args.backend {
        BackendArg::Sqlite => vec![Backend::Sqlite],
        BackendArg::Postgres => vec![Backend::Postgres],
        BackendArg::Both => vec![Backend::Sqlite, Backend::Postgres],
    };
    let skip_pg = std::env::var("NKUDO_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    let mut results = Vec::new();
    for backend in backends {
        if backend == Backend::Postgres && skip_pg {
            eprintln!("!!! SKIPPING the Postgres heartbeat benchmark: NKUDO_SKIP_POSTGRES=1");
            results.push(skipped(backend, &args, "NKUDO_SKIP_POSTGRES=1"));
            continue;
        }
        let r = run_backend(backend, &args)
            .await
            .with_context(|| format!("{backend} heartbeat benchmark"))?;
        if args.output == Output::Table {
            eprintln!("    {backend}: done ({} heartbeats, {} errors)", r.heartbeats, r.errors);
        }
        results.push(r);
    }
    let ok = results.iter().all(|r| r.errors == 0);
    let report = Report {
        benchmark: "heartbeat",
        agents: args.agents,
        connections: args.connections,
        duration_s: args.duration,
        warmup_s: args.warmup,
        protocol: match args.protocol {
            Protocol::Http1 => "HTTP/1.1 keep-alive over mTLS (ECDSA P-256 client certificates)",
            Protocol::Http2 => "HTTP/2 over mTLS (ECDSA P-256 client certificates)",
        }
        .to_string(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        results,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print_table(&report),
    }
    Ok(ok)
}

fn skipped(backend: Backend, args: &HeartbeatArgs, why: &str) -> BackendResult {
    BackendResult {
        backend: backend.to_string(),
        skipped: Some(why.to_string()),
        agents: args.agents,
        connections: args.connections,
        duration_s: 0.0,
        enroll_s: 0.0,
        heartbeats: 0,
        heartbeats_per_s: 0.0,
        p50_ms: 0.0,
        p95_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        mean_ms: 0.0,
        errors: 0,
        warmup_errors: 0,
        first_error: None,
        server_peak_rss_mib: None,
        server_cpu_pct: None,
        bench_cpu_pct: None,
    }
}

fn print_table(report: &Report) {
    println!();
    println!(
        "heartbeat benchmark: {} agents, {} connections, {} s measured after {} s warm-up, {} CPUs (shared by server \
         and load generator)",
        report.agents, report.connections, report.duration_s, report.warmup_s, report.cpus
    );
    println!("{}", report.protocol);
    println!();
    println!(
        "{:<9} {:>12} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "backend",
        "heartbeats/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "server RSS",
        "srv CPU",
        "gen CPU",
        "enroll s"
    );
    for r in &report.results {
        if let Some(why) = &r.skipped {
            println!("{:<9} SKIPPED: {why}", r.backend);
            continue;
        }
        let pct = |v: Option<f64>| v.map(|v| format!("{v:.0}%")).unwrap_or_else(|| "-".into());
        println!(
            "{:<9} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>10} {:>9} {:>9} {:>9.1}",
            r.backend,
            r.heartbeats_per_s,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
            r.server_peak_rss_mib
                .map(|m| format!("{m:.0} MiB"))
                .unwrap_or_else(|| "-".into()),
            pct(r.server_cpu_pct),
            pct(r.bench_cpu_pct),
            r.enroll_s,
        );
    }
    for r in &report.results {
        if let Some(e) = &r.first_error {
            println!(
                "{}: first error ({} in the window, {} in warm-up): {e}",
                r.backend, r.errors, r.warmup_errors
            );
        }
    }
    println!("(server RSS = VmHWM, the peak resident set; CPU in % of one core during the measured window)");
}

// ---------------------------------------------------------------------------------------------------------
// One backend

async fn run_backend(backend: Backend, args: &HeartbeatArgs) -> Result<BackendResult> {
    let started = ControlPlane::builder(backend)
        // Production defaults where they matter for the hot path; no enrollment rate limit for the set-up.
        .env("HEARTBEAT_FLUSH_INTERVAL", "1s")
        .env("ENROLL_RATE_LIMIT_PER_MINUTE", "1000000")
        .env("ENROLL_RATE_LIMIT_BURST", "1000000")
        .env("RUST_LOG", args.server_log.as_str())
        .start()
        .await?;
    let Some(mut cp) = started else {
        eprintln!("!!! SKIPPING the {backend} heartbeat benchmark: the backend is unavailable (see above)");
        return Ok(skipped(backend, args, "backend unavailable"));
    };
    let pid = cp.pid().context("control plane has no pid")?;
    if args.output == Output::Table {
        eprintln!(
            "==> {backend}: control plane pid {pid} at {}; enrolling {} agents",
            cp.base_url, args.agents
        );
    }

    let enroll_started = Instant::now();
    let agents = tokio::time::timeout(ENROLL_PHASE_TIMEOUT, enroll_all(&cp, args.agents, args.protocol))
        .await
        .with_context(|| {
            format!(
                "enrolling {} agents took longer than {ENROLL_PHASE_TIMEOUT:?}",
                args.agents
            )
        })??;
    let enroll_s = enroll_started.elapsed().as_secs_f64();
    if args.output == Output::Table {
        eprintln!(
            "    enrolled {} agents in {enroll_s:.1} s; {} s warm-up, then {} s measured",
            agents.len(),
            args.warmup,
            args.duration
        );
    }

    let load = drive_heartbeats(&cp, pid, agents, args).await;
    // Read the peak RSS just before stopping (VmHWM survives until exit).
    let peak_rss_mib = read_vm_hwm_kib(pid).map(|kib| kib as f64 / 1024.0);
    let stop = cp.stop().await;
    let load = load?;
    match stop {
        Ok(st) if !st.success() => eprintln!("warning: control plane exited with {st} on SIGTERM"),
        Err(e) => eprintln!("warning: stopping the control plane: {e:#}"),
        Ok(_) => {}
    }

    let h = &load.histogram;
    let ms = |us: u64| us as f64 / 1000.0;
    let secs = load.window.as_secs_f64();
    Ok(BackendResult {
        backend: backend.to_string(),
        skipped: None,
        agents: args.agents,
        connections: args.connections,
        duration_s: secs,
        enroll_s,
        heartbeats: load.ok,
        heartbeats_per_s: if secs > 0.0 { load.ok as f64 / secs } else { 0.0 },
        p50_ms: ms(h.value_at_quantile(0.50)),
        p95_ms: ms(h.value_at_quantile(0.95)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
        errors: load.errors,
        warmup_errors: load.warmup_errors,
        first_error: load.first_error,
        server_peak_rss_mib: peak_rss_mib,
        server_cpu_pct: load.server_cpu_pct,
        bench_cpu_pct: load.bench_cpu_pct,
    })
}

/// An enrolled simulated agent: its mTLS client and its heartbeat body around the `sent_at` value.
struct SimAgent {
    client: Client,
    body_prefix: String,
    body_suffix: String,
}

/// Bootstraps a tenant, API key and site, issues `n` tokens and enrolls `n` agents, `SETUP_CONCURRENCY` at a time.
async fn enroll_all(cp: &ControlPlane, n: u32, protocol: Protocol) -> Result<Vec<SimAgent>> {
    let fx = bootstrap(cp).await.context("bootstrap tenant, API key, site")?;
    let tenant_client = tenant(cp, &fx.api_key);
    let anon_client = anon(cp);
    let tokens_url = cp.url(&format!("/tenants/{}/enrollment-tokens", fx.tenant_id()));
    let enroll_url = cp.url("/v1/enroll");
    let site_id = fx.site_id().to_string();

    let mut set: JoinSet<Result<(usize, SimAgent)>> = JoinSet::new();
    let mut agents: Vec<Option<SimAgent>> = (0..n).map(|_| None).collect();
    let mut next = 0usize;
    loop {
        while set.len() < SETUP_CONCURRENCY && next < n as usize {
            let i = next;
            next += 1;
            let (tenant_client, anon_client) = (tenant_client.clone(), anon_client.clone());
            let (tokens_url, enroll_url, site_id) = (tokens_url.clone(), enroll_url.clone(), site_id.clone());
            let cp_builder = client_builder(cp);
            set.spawn(async move {
                let req = CreateEnrollmentTokenRequest {
                    site_id,
                    expires_in_seconds: None,
                };
                let resp = tenant_client.post(&tokens_url).json(&req).send().await?;
                let token: EnrollmentTokenCreated =
                    expect_json(resp, StatusCode::CREATED, "POST /tenants/{id}/enrollment-tokens").await?;
                let hostname = format!("bench-edge-{i:05}");
                // Key generation is CPU work: keep it off the I/O path of the other tasks.
                let host = hostname.clone();
                let (key_pem, csr_pem) = tokio::task::spawn_blocking(move || make_csr(&host)).await?;
                let body = enroll_request(&token.token, &hostname, &csr_pem);
                let enrollment = enroll_with_retry(&anon_client, &enroll_url, &body).await?;
                let identity_pem = format!(
                    "{}\n{}\n",
                    enrollment.client_certificate_pem.trim_end(),
                    key_pem.trim_end()
                );
                let identity = reqwest::Identity::from_pem(identity_pem.as_bytes()).context("client identity")?;
                let builder = cp_builder
                    .identity(identity)
                    .timeout(REQUEST_TIMEOUT)
                    .pool_max_idle_per_host(4);
                let builder = match protocol {
                    Protocol::Http1 => builder.http1_only(),
                    Protocol::Http2 => builder.http2_prior_knowledge(),
                };
                let client = builder.build().context("build agent client")?;
                let (body_prefix, body_suffix) = heartbeat_body_template(&enrollment.agent_id, &hostname)?;
                Ok((
                    i,
                    SimAgent {
                        client,
                        body_prefix,
                        body_suffix,
                    },
                ))
            });
        }
        match set.join_next().await {
            Some(joined) => {
                let (i, agent) = joined.context("enrollment task panicked")??;
                agents[i] = Some(agent);
            }
            None => break,
        }
    }
    Ok(agents.into_iter().map(|a| a.expect("every agent enrolled")).collect())
}

/// `POST /v1/enroll`, retrying a 429 (rate limit) a few times as a real agent would.
async fn enroll_with_retry(
    client: &Client,
    url: &str,
    body: &nkudo_core::api::EnrollRequest,
) -> Result<EnrollResponse> {
    for _ in 0..5 {
        let resp = client.post(url).json(body).send().await.context("POST /v1/enroll")?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let wait = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .min(10);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        return expect_json(resp, StatusCode::OK, "POST /v1/enroll").await;
    }
    bail!("POST /v1/enroll: still rate limited after 5 tries")
}

/// A heartbeat body like the earlier agent's (host facts, NetBird status, one microVM), serialized once and
/// split around `sent_at`, so that each request costs one small string concatenation.
fn heartbeat_body_template(agent_id: &str, hostname: &str) -> Result<(String, String)> {
    let req = HeartbeatRequest {
        agent_id: Some(agent_id.to_string()),
        agent_version: Some(TEST_AGENT_VERSION.to_string()),
        os: Some("linux".into()),
        arch: Some("amd64".into()),
        kernel_version: Some("6.1.0-18-amd64".into()),
        hostname: Some(hostname.to_string()),
        cpu_cores_total: Some(12),
        memory_bytes_total: Some(34_359_738_368),
        storage_bytes_total: Some(500_107_862_016),
        kvm_available: Some(true),
        cloud_hypervisor_available: Some(true),
        host_facts: Some(HostFacts {
            collected_at: Some("2026-01-01T00:00:00Z".into()),
            cpu_cores: 12,
            memory_total_bytes: 34_359_738_368,
            memory_free_bytes: 17_179_869_184,
            disks: vec![DiskFacts {
                mountpoint: "/".into(),
                total_bytes: 500_107_862_016,
                free_bytes: 250_053_931_008,
            }],
            os: "debian".into(),
            os_version: "12".into(),
            kernel: "6.1.0-18-amd64".into(),
            arch: "amd64".into(),
            kvm: KvmFacts {
                present: true,
                readable: true,
                writable: true,
                check_message: None,
            },
            interfaces: vec![InterfaceFacts {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                addresses: vec!["192.168.10.5/24".into()],
                is_bridge: false,
            }],
            bridges: vec!["br-nkudo".into()],
            cloud_hypervisor_available: Some(true),
        }),
        netbird_status: Some(NetbirdStatus {
            connected: true,
            state: Some("Connected".into()),
            ipv4: Some("100.64.0.7".into()),
            ..Default::default()
        }),
        microvms: vec![MicroVmReport {
            id: "vm-demo-001".into(),
            name: "demo".into(),
            state: Some("RUNNING".into()),
            vcpu_count: Some(2),
            memory_mib: Some(1024),
            rootfs_path: Some("/var/lib/nkudo/vms/vm-demo-001/rootfs.raw".into()),
            tap_iface: Some("tap-vm-demo-00".into()),
            ch_pid: Some(4242),
            ..Default::default()
        }],
        sent_at: Some(SENT_AT_PLACEHOLDER.into()),
        ..Default::default()
    };
    let json = serde_json::to_string(&req)?;
    let (prefix, suffix) = json.split_once(SENT_AT_PLACEHOLDER).context("sent_at placeholder")?;
    Ok((prefix.to_string(), suffix.to_string()))
}

// ---------------------------------------------------------------------------------------------------------
// The load

struct LoadResult {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
    warmup_errors: u64,
    first_error: Option<String>,
    window: Duration,
    server_cpu_pct: Option<f64>,
    bench_cpu_pct: Option<f64>,
}

struct WorkerResult {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
    warmup_errors: u64,
    first_error: Option<(Instant, String)>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn drive_heartbeats(
    cp: &ControlPlane,
    pid: u32,
    agents: Vec<SimAgent>,
    args: &HeartbeatArgs,
) -> Result<LoadResult> {
    let url: Arc<str> = cp.url("/v1/heartbeat").into();
    let workers = args.connections as usize;
    // Worker i owns agents i, i+C, …; with fewer agents than workers, agents are shared (reqwest then opens
    // one more connection for the same identity).
    let agents: Vec<Arc<SimAgent>> = agents.into_iter().map(Arc::new).collect();
    let mut owned: Vec<Vec<Arc<SimAgent>>> = vec![Vec::new(); workers];
    if agents.len() >= workers {
        for (i, a) in agents.iter().enumerate() {
            owned[i % workers].push(a.clone());
        }
    } else {
        for (w, list) in owned.iter_mut().enumerate() {
            list.push(agents[w % agents.len()].clone());
        }
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let measure_until = measure_from + Duration::from_secs(args.duration);

    let mut set = JoinSet::new();
    for list in owned {
        let url = url.clone();
        set.spawn(worker(list, url, measure_from, measure_until));
    }

    // CPU counters at the start and the end of the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = (proc_cpu_ticks(&pid.to_string()), proc_cpu_ticks("self"), Instant::now());
    tokio::time::sleep_until(measure_until.into()).await;
    let cpu1 = (proc_cpu_ticks(&pid.to_string()), proc_cpu_ticks("self"), Instant::now());

    let mut histogram = new_histogram();
    let (mut ok, mut errors, mut warmup_errors) = (0, 0, 0);
    let mut first_error: Option<(Instant, String)> = None;
    while let Some(joined) = set.join_next().await {
        let w = joined.context("heartbeat worker panicked")?;
        histogram.add(&w.histogram).context("merge histograms")?;
        ok += w.ok;
        errors += w.errors;
        warmup_errors += w.warmup_errors;
        if let Some((at, e)) = w.first_error {
            if first_error.as_ref().is_none_or(|(t, _)| at < *t) {
                first_error = Some((at, e));
            }
        }
    }
    let wall = cpu1.2.duration_since(cpu0.2).as_secs_f64();
    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b.saturating_sub(a)) as f64 / CLOCK_TICKS_PER_S / wall * 100.0),
        _ => None,
    };
    Ok(LoadResult {
        histogram,
        ok,
        errors,
        warmup_errors,
        first_error: first_error.map(|(_, e)| e),
        window: measure_until - measure_from,
        server_cpu_pct: pct(cpu0.0, cpu1.0),
        bench_cpu_pct: pct(cpu0.1, cpu1.1),
    })
}

/// One closed-loop worker: sends its agents' heartbeats in turn until `until`. Requests that start in
/// `[from, until)` are measured; earlier ones are warm-up.
async fn worker(agents: Vec<Arc<SimAgent>>, url: Arc<str>, from: Instant, until: Instant) -> WorkerResult {
    let mut r = WorkerResult {
        histogram: new_histogram(),
        ok: 0,
        errors: 0,
        warmup_errors: 0,
        first_error: None,
    };
    if agents.is_empty() {
        return r;
    }
    let mut idx = 0usize;
    // The first answer of each worker is checked to be a HeartbeatResponse; later ones only for status 200.
    let mut check_answer = true;
    loop {
        let t0 = Instant::now();
        if t0 >= until {
            break;
        }
        let agent = &agents[idx];
        idx = (idx + 1) % agents.len();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut body = String::with_capacity(agent.body_prefix.len() + now.len() + agent.body_suffix.len());
        body.push_str(&agent.body_prefix);
        body.push_str(&now);
        body.push_str(&agent.body_suffix);
        let outcome = send_heartbeat(&agent.client, &url, body, check_answer).await;
        let measured = t0 >= from;
        match outcome {
            Ok(()) => {
                check_answer = false;
                if measured {
                    let us = t0.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                    r.histogram.saturating_record(us.max(1));
                    r.ok += 1;
                }
            }
            Err(e) => {
                if measured {
                    r.errors += 1;
                } else {
                    r.warmup_errors += 1;
                }
                if r.first_error.is_none() {
                    r.first_error = Some((t0, e));
                }
                // Do not spin on a dead server: errors are counted, not retried in a tight loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    r
}

async fn send_heartbeat(client: &Client, url: &str, body: String, check_answer: bool) -> Result<(), String> {
    let resp = client
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("transport: {}", error_chain(&e)))?;
    let status = resp.status();
    // Read the whole body so the connection goes back to the pool (keep-alive).
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {}", error_chain(&e)))?;
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes);
        return Err(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>()));
    }
    if check_answer {
        if let Err(e) = serde_json::from_slice::<HeartbeatResponse>(&bytes) {
            let text = String::from_utf8_lossy(&bytes);
            return Err(format!(
                "answer is not a HeartbeatResponse ({e}): {}",
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------------------
// /proc

/// USER_HZ: the unit of utime/stime in /proc/<pid>/stat (100 on every mainstream Linux).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// `VmHWM` (peak resident set, KiB) of a process.
fn read_vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `/proc/<who>/stat`, in clock ticks.
fn proc_cpu_ticks(who: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after the closing parenthesis are plain.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
