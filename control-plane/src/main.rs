//! `nkudo-control-plane`: the multi-tenant control plane. `serve` (default) runs the HTTPS API,
//! `migrate` applies database migrations, `audit verify` checks every audit hash chain, `healthcheck` asks a
//! running control plane whether it is ready (for container healthchecks: the image has no shell or curl).

mod agents;
mod audit;
mod audit_watch;
mod auth;
mod config;
mod db;
mod error;
mod extract;
mod fleet_gauges;
mod heartbeat_buffer;
mod labels;
mod metrics;
mod pki;
mod plans;
mod ratelimit;
mod releases;
mod rollout;
mod routes;
mod server;
mod state;
mod sweeper;
mod util;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use std::io::Write;
use std::sync::Arc;

use nkudo_core::build_info::VERSION;

#[derive(Parser)]
#[command(
    name = "nkudo-control-plane",
    version = nkudo_core::build_info::clap_version(),
    about = "n-kudo control plane: tenants, sites, mTLS agent enrollment and heartbeats",
    long_about = "n-kudo control plane: tenants, sites, mTLS agent enrollment and heartbeats.\n\n\
        Configured by environment variables (see docs/control-plane.md): CONTROL_PLANE_ADDR, DATABASE_URL \
        (default: SQLite under NKUDO_DATA_DIR), ADMIN_KEY, REQUIRE_PERSISTENT_PKI, CA_CERT_FILE, ..."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTPS API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print version, git commit, target triple and build date (same as --version).
    Version,
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Ask a running control plane whether it is ready (GET /readyz over verified TLS): exit 0 ready, 1 not
    /// ready or unreachable. Meant for container healthchecks (the image has no shell or HTTP client).
    Healthcheck(HealthcheckArgs),
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// The readiness URL [default: https://127.0.0.1:<port of CONTROL_PLANE_ADDR>/readyz]
    #[arg(long)]
    url: Option<String>,
    /// PEM file of the CA(s) that verify the server certificate [default: <NKUDO_DATA_DIR>/pki/ca-bundle.pem]
    #[arg(long, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = nkudo_core::duration::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify every tenant's audit hash chain; exit 1 naming the first broken event of each chain.
    Verify,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(cfg.json_logs);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cfg).await,
            Command::Migrate => migrate(cfg).await,
            Command::Version => {
                println!("{}", nkudo_core::build_info::version_text("nkudo-control-plane"));
                Ok(std::process::ExitCode::SUCCESS)
            }
            Command::Audit {
                command: AuditCommand::Verify,
            } => audit_verify(cfg).await,
            Command::Healthcheck(args) => healthcheck(cfg, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn connect(cfg: &Config) -> anyhow::Result<db::Db> {
    let db = db::Db::connect(&cfg.database_url)
        .await
        .with_context(|| format!("connecting to the {} database", backend_name(cfg)))?;
    Ok(db)
}

fn backend_name(cfg: &Config) -> &'static str {
    if cfg.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    }
}

async fn migrate(cfg: Config) -> anyhow::Result<std::process::ExitCode> {
    let db = connect(&cfg).await?;
    let applied = db.migrate().await.context("applying migrations")?;
    println!("migrations applied ({} new: {})", applied.len(), applied.join(", "));
    Ok(std::process::ExitCode::SUCCESS)
}

async fn healthcheck(cfg: Config, args: HealthcheckArgs) -> anyhow::Result<std::process::ExitCode> {
    let url = args
        .url
        .unwrap_or_else(|| format!("https://127.0.0.1:{}/readyz", cfg.listen_addr.port()));
    let ca_file = args
        .ca_file
        .unwrap_or_else(|| cfg.data_dir.join("pki").join("ca-bundle.pem"));
    let pem = std::fs::read(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let mut client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(args.timeout);
    for cert in reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{}: not a PEM certificate bundle", ca_file.display()))?
    {
        client = client.add_root_certificate(cert);
    }
    let client = client.build().context("building the HTTPS client")?;
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => {
            println!("ready: {url} answered {}", r.status());
            Ok(std::process::ExitCode::SUCCESS)
        }
        Ok(r) => {
            let status = r.status();
            let body: String = r.text().await.unwrap_or_default().chars().take(500).collect();
            println!("not ready: {url} answered {status}: {body}");
            Ok(std::process::ExitCode::from(1))
        }
        Err(e) => {
            println!("not ready: {url}: {e}");
            Ok(std::process::ExitCode::from(1))
        }
    }
}

async fn audit_verify(cfg: Config) -> anyhow::Result<std::process::ExitCode> {
    let db = connect(&cfg).await?;
    let report = audit::verify(&db).await.context("reading the audit trail")?;
    if report.problems.is_empty() {
        println!("audit chains OK: {} events in {} chains", report.events, report.chains);
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        for p in &report.problems {
            println!("BROKEN: {p}");
        }
        println!(
            "audit verification FAILED: {} of {} chains broken ({} events read)",
            report.problems.len(),
            report.chains,
            report.events
        );
        Ok(std::process::ExitCode::from(1))
    }
}

/// The admin key: from `ADMIN_KEY`, or (dev mode) the one generated on first start and kept in the data dir.
fn admin_key(cfg: &Config) -> anyhow::Result<(String, Option<String>)> {
    if let Some(k) = &cfg.admin_key {
        return Ok((k.clone(), None));
    }
    let path = cfg.data_dir.join("admin.key");
    match std::fs::read_to_string(&path) {
        Ok(k) if !k.trim().is_empty() => Ok((
            k.trim().to_string(),
            Some(format!("admin key: stored in {}", path.display())),
        )),
        _ => {
            let key = format!("nkadm_{}", util::random_secret());
            std::fs::create_dir_all(&cfg.data_dir)
                .and_then(|_| nkudo_core::fsutil::write_atomic(&path, key.as_bytes(), 0o600))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((
                key.clone(),
                Some(format!(
                    "admin key: {key} (generated once; stored in {})",
                    path.display()
                )),
            ))
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<std::process::ExitCode> {
    let version = nkudo_core::version::parse(VERSION).context("parsing this binary's version")?;
    let policy = nkudo_core::version::SupportPolicy::new(version, cfg.minimum_agent_version.clone());
    let min_agent_version = policy.minimum().to_string();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let pki = pki::Pki::load_or_create(&pki::PkiConfig {
        data_dir: cfg.data_dir.clone(),
        ca_cert_file: cfg.ca_cert_file.clone(),
        ca_key_file: cfg.ca_key_file.clone(),
        server_cert_file: cfg.server_cert_file.clone(),
        server_key_file: cfg.server_key_file.clone(),
        previous_ca_cert_files: cfg.agent_ca_previous_cert_files.clone(),
        require_persistent: cfg.require_persistent_pki,
        ca_common_name: cfg.ca_common_name.clone(),
        server_names: cfg.server_names.clone(),
    })
    .context("loading the PKI")?;
    let tls = pki.server_tls_config().context("building the TLS configuration")?;
    let (admin_key, admin_line) = admin_key(&cfg)?;
    let db = connect(&cfg).await?;
    let applied = db.migrate().await.context("applying migrations")?;
    if !applied.is_empty() {
        tracing::info!(migrations = ?applied, "applied migrations");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr)
        .await
        .with_context(|| format!("listening on {}", cfg.listen_addr))?;
    let local = listener.local_addr()?;
    let metrics = metrics::Metrics::new();
    let metrics_registry = &metrics.registry().clone();
    pki.register_metrics(metrics_registry)
        .context("registering the PKI metrics")?;
    let state = Arc::new(state::AppState {
        enroll_limiter: ratelimit::RateLimiter::per_minute(cfg.enroll_rate_per_minute, cfg.enroll_rate_burst),
        metrics,
        agents: agents::AgentCache::default(),
        open_plan_sites: plans::OpenPlanSites::default(),
        heartbeats: heartbeat_buffer::HeartbeatBuffer::default(),
        db: db.clone(),
        pki,
        admin_key,
        policy,
        min_agent_version,
        rollout_source: rollout::source::Source::from_config(cfg.prometheus_url.as_deref()),
        rollout_metrics: rollout::RolloutMetrics::register(metrics_registry),
        desired: Default::default(),
        recorded_outcomes: Default::default(),
        cfg: cfg.clone(),
    });
    state
        .desired
        .load(&state.db.pool)
        .await
        .context("loading desired versions, releases and labels")?;
    if state.cfg.release_public_keys.is_empty() {
        tracing::warn!("no RELEASE_PUBLIC_KEYS: publishing releases is refused until keys are configured");
    }
    if let Err(e) = sweeper::refresh_version_gauge(&state).await {
        tracing::warn!(error = %e, "initial agent version gauge");
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "nkudo-control-plane {VERSION} (database {}, data {})",
        db.backend.as_str(),
        cfg.data_dir.display()
    )?;
    if let Some(line) = admin_line {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "ca bundle: {}", state.pki.ca_bundle_path().display())?;
    let shown_host = if local.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        local.ip().to_string()
    };
    let shown = if local.is_ipv6() && !local.ip().is_unspecified() {
        format!("[{shown_host}]:{}", local.port())
    } else {
        format!("{shown_host}:{}", local.port())
    };
    writeln!(out, "listening: https://{shown}")?;
    out.flush()?;
    drop(out);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(sweeper::run(state.clone(), stop_rx.clone()));
    let controller = tokio::spawn(rollout::controller::run(state.clone(), stop_rx.clone()));
    tokio::spawn(releases::refresh_loop(state.clone(), stop_rx.clone()));
    tokio::spawn(fleet_gauges::run(state.clone(), stop_rx.clone()));
    tokio::spawn(audit_watch::run(state.clone(), stop_rx.clone()));
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; stopping");
        let _ = stop_tx.send(true);
    });
    server::serve(
        listener,
        tls,
        routes::router(state.clone()),
        stop_rx,
        cfg.shutdown_timeout,
    )
    .await;
    // The background task flushes buffered heartbeats on its way out.
    if let Err(e) = background.await {
        tracing::error!(error = %e, "background task");
    }
    if let Err(e) = controller.await {
        tracing::error!(error = %e, "rollout controller");
    }
    db.pool.close().await;
    tracing::info!("stopped");
    Ok(std::process::ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
