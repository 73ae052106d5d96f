//! `releaser rollout ...` and `releaser rollback --to <version>`: the release captain's view of the control
//! plane's rollouts (ARCHITECTURE §4.6, issue 7). Everything goes over HTTP with the admin key
//! (`X-Admin-Key`); the control plane's rollout controller does the work.
//!
//! * `rollout plan <policy.toml>`: validates the policy locally (`nkudo_core::rollout::parse_policy`; every
//!   error printed as `<file>:<line>: <message>`, nothing sent when one is found), then asks for a dry run
//!   (`POST /admin/rollouts/plan`): stages with their agent counts, sites, gates, bake, triggers, the agents no
//!   stage selects and the control plane's warnings. Nothing changes.
//! * `rollout start <policy.toml> [--yes]`: the same validation, then `POST /admin/rollouts`; prints the id.
//!   Without `--yes` it shows the plan and asks first (and refuses when stdin is not a terminal).
//! * `rollout status [<id>] [--all] [--watch] [--wait] [--interval 2s] [--gate-timeout D]`: state, current
//!   stage, per stage its agents, how many were switched and report the new version, agents per version and
//!   per self-update phase, every trigger's last values (value, reference, samples, verdict, threshold,
//!   consecutive breaches) and the last decisions. Without an id: the newest rollout still in progress (else
//!   the newest one). `--all` lists every rollout. `--watch` redraws every interval until the rollout is
//!   final (with `--output json`: one JSON rollout per line, each poll); `--wait` blocks until it is final,
//!   prints it (text, or JSON with `--output json`) and sets the exit code (below).
//! * `rollout pause|resume|approve|abort <id>`: `POST /admin/rollouts/{id}/<action>`, prints the new state.
//!   `abort` (stop and send every touched agent back) asks first unless `--yes`; without a terminal on stdin
//!   it requires `--yes`.
//! * `rollback --to <version> [--tenant ID].. [--site ID].. [--ring NAME].. [--agent ID].. | --fleet`:
//!   `POST /admin/rollback`, sends the selection (or, with the explicit `--fleet`, every agent) to an older
//!   version as a signed rollback target.
//!
//! Every command takes `--url`, `--admin-key` (or `$NKUDO_ADMIN_KEY`; never printed), `--ca-cert` (a PEM bundle
//! to trust for the control plane, else the system roots) and `--output text|json`.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success; `status --wait`: the rollout completed |
//! | 1 | error: the control plane answered an error (its `error` and `code` are printed), it could not be reached (the URL is printed), bad input |
//! | 2 | the policy file is invalid (nothing was sent); `rollback` without a selection or `--fleet` |
//! | 3 | `status --wait`: the rollout was rolled back (a trigger fired or a stage's agents did not report in time) |
//! | 4 | `status --wait`: the rollout was aborted by an operator |
//! | 5 | `status --wait --gate-timeout D`: the rollout waited for approval at a manual gate longer than D |
//!
//! `status --watch` / `--wait` ride out a control plane that restarts or is briefly unreachable (connection
//! errors, 502/503/504) for up to `--unreachable-timeout` (default 2m) before giving up with exit 1.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use nkudo_core::api::{
    ErrorBody, FleetRollbackRequest, FleetRollbackResponse, Rollout, RolloutDecision, RolloutDecisionsResponse,
    RolloutPlan, RolloutState, RolloutsResponse, StartRolloutRequest,
};
use nkudo_core::duration::{format_duration, parse_duration};
use nkudo_core::rollout::policy::PolicyErrors;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Exit status: the policy file is invalid (nothing was sent), or a usage error (`rollback` without a selection).
pub const EXIT_INVALID_POLICY: u8 = 2;
/// Exit status of `status --wait`: the rollout was rolled back.
pub const EXIT_ROLLED_BACK: u8 = 3;
/// Exit status of `status --wait`: the rollout was aborted.
pub const EXIT_ABORTED: u8 = 4;
/// Exit status of `status --wait --gate-timeout`: waiting for approval longer than the timeout.
pub const EXIT_GATE_TIMEOUT: u8 = 5;

/// How many decisions `status` shows by default.
pub const DEFAULT_DECISIONS_SHOWN: usize = 8;

const STATUS_LONG_ABOUT: &str = "\
Show a rollout: its state and current stage; per stage its state, agents, how many were switched and report
the new version, agents per version and per self-update phase, and every trigger's last evaluation (value,
reference, samples, verdict, threshold, consecutive breaches); then the last decisions of its hash-chained
decision log.

Without an id: the newest rollout still in progress (else the newest one). --all lists every rollout.
--watch redraws every --interval until the rollout is final (the screen is cleared when stdout is a terminal;
with --output json: one rollout as JSON per line, each poll).
--wait blocks until the rollout is final and exits with its outcome (with --output json it prints the final
rollout as JSON). A control plane that is briefly unreachable (restarting) is retried for
--unreachable-timeout.

Exit codes:
  0  success; with --wait: the rollout completed
  1  error (the control plane's error and code are printed; or it could not be reached)
  3  with --wait: the rollout was rolled back (a trigger fired, or a stage's agents did not report in time)
  4  with --wait: the rollout was aborted by an operator
  5  with --wait --gate-timeout D: the rollout waited at a manual gate for approval longer than D";

const PLAN_LONG_ABOUT: &str = "\
Dry run: validate the policy file locally (every error as <file>:<line>: <message>; exit 2 without contacting
the control plane), then ask the control plane which agents each stage would select (POST /admin/rollouts/plan):
agent counts, sites, gates, bake, report timeout, triggers, the agents no stage selects, and warnings. Nothing
changes.

Exit codes: 0 the plan was shown; 1 error (the control plane's error and code are printed); 2 invalid policy.";

const START_LONG_ABOUT: &str = "\
Validate the policy file locally (exit 2 on any error, nothing sent), then start the rollout
(POST /admin/rollouts) and print its id. Without --yes the plan is shown and a confirmation asked on the
terminal; with no terminal on stdin, --yes is required.

Exit codes: 0 started; 1 error (the control plane's error and code are printed, or refused confirmation);
2 invalid policy.";

/// Output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// How to reach the control plane (shared by every rollout command and `rollback`).
#[derive(Clone, Args)]
pub struct ConnectionArgs {
    /// The control plane (https://host:8443).
    #[arg(long)]
    pub url: String,
    /// The admin key (`X-Admin-Key`).
    #[arg(long, env = "NKUDO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    /// PEM CA bundle to trust for --url (the control plane's CA); else the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Output format (json for machines).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl std::fmt::Debug for ConnectionArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionArgs")
            .field("url", &self.url)
            .field("admin_key", &"<redacted>")
            .field("ca_cert", &self.ca_cert)
            .field("output", &self.output)
            .finish()
    }
}

/// `releaser rollout ...`: rollouts on a control plane (admin key).
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Dry run: validate a policy file, then show the stages the control plane would run (agents, sites,
    /// gates, bake, triggers). Nothing changes.
    #[command(long_about = PLAN_LONG_ABOUT)]
    Plan(PolicyArgs),
    /// Validate a policy file, then start the rollout; prints its id.
    #[command(long_about = START_LONG_ABOUT)]
    Start(StartArgs),
    /// A rollout's state, stages, agents per version and phase, trigger values and last decisions
    /// (--watch, --wait with exit codes for CI).
    #[command(long_about = STATUS_LONG_ABOUT)]
    Status(StatusArgs),
    /// Pause a rollout: no further agents are switched until `resume`.
    Pause(IdArgs),
    /// Resume a paused rollout.
    Resume(IdArgs),
    /// Approve the manual gate a rollout waits at: the next stage starts.
    Approve(IdArgs),
    /// Abort a rollout: stop, and send every agent it touched back to the previous version.
    Abort(AbortArgs),
    /// Clear the bad mark a rolled-back rollout left on a release, so that it may be desired again.
    ClearBad(ClearBadArgs),
}

/// `rollout plan <policy.toml>`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The rollout policy (TOML; see `nkudo_core::rollout`).
    pub policy: PathBuf,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `rollout start <policy.toml> [--yes]`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The rollout policy (TOML; see `nkudo_core::rollout`).
    pub policy: PathBuf,
    /// Start without showing the plan and asking (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `rollout status [<id>]`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The rollout id (default: the newest rollout in progress, else the newest).
    pub id: Option<String>,
    /// List every rollout instead.
    #[arg(long, conflicts_with_all = ["id", "watch", "wait", "gate_timeout"])]
    pub all: bool,
    /// Redraw every --interval until the rollout is final.
    #[arg(long)]
    pub watch: bool,
    /// Block until the rollout is final; exit 0 completed, 3 rolled back, 4 aborted (5: see --gate-timeout).
    #[arg(long)]
    pub wait: bool,
    /// Time between two polls with --watch or --wait (e.g. 2s, 500ms, 1m).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub interval: Duration,
    /// With --wait: exit 5 when the rollout waits at a manual gate for approval longer than this (counted from
    /// its gate-waiting decision, else from when this command first saw it waiting).
    #[arg(long, value_name = "DURATION", value_parser = parse_interval, requires = "wait")]
    pub gate_timeout: Option<Duration>,
    /// With --watch or --wait: give up (exit 1) when the control plane stays unreachable this long.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_interval)]
    pub unreachable_timeout: Duration,
    /// How many of the latest decisions to show.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DECISIONS_SHOWN)]
    pub decisions: usize,
    /// Read the whole decision log (`GET /admin/rollouts/{id}/decisions`) and check its hash chain.
    #[arg(long, conflicts_with_all = ["watch", "wait"])]
    pub decision_log: bool,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `rollout pause|resume|approve <id>`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The rollout id.
    pub id: String,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `rollout abort <id> [--yes]`.
#[derive(Debug, Args)]
pub struct AbortArgs {
    /// The rollout id.
    pub id: String,
    /// Do not ask (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `rollout clear-bad <version>`.
#[derive(Debug, Args)]
pub struct ClearBadArgs {
    /// The release version.
    pub version: String,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

/// `releaser rollback --to <version>`: send the whole fleet (`--fleet`) or a selection to a version.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The version to send the agents to (a published release; agents accept it as a signed rollback target).
    #[arg(long, value_name = "VERSION")]
    pub to: String,
    /// Agents of this tenant (repeatable).
    #[arg(long = "tenant", value_name = "ID")]
    pub tenants: Vec<String>,
    /// Agents of this site (repeatable).
    #[arg(long = "site", value_name = "ID")]
    pub sites: Vec<String>,
    /// Agents of this ring label (repeatable).
    #[arg(long = "ring", value_name = "NAME")]
    pub rings: Vec<String>,
    /// This agent (repeatable).
    #[arg(long = "agent", value_name = "ID")]
    pub agents: Vec<String>,
    /// Every agent of the fleet: required when no --tenant/--site/--ring/--agent is given.
    #[arg(long, conflicts_with_all = ["tenants", "sites", "rings", "agents"])]
    pub fleet: bool,
    #[command(flatten)]
    pub conn: ConnectionArgs,
}

fn parse_interval(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?} is too short (at least 100ms)"));
    }
    Ok(d)
}

// ---------------------------------------------------------------------------------------------------------
// Entry points

/// Runs a `releaser rollout` subcommand, printing to stdout.
pub async fn run_rollout(cmd: RolloutCommand) -> Result<ExitCode> {
    let mut out = Out::stdout();
    run_rollout_to(cmd, &mut out).await
}

/// Runs `releaser rollback --to ...`, printing to stdout.
pub async fn run_rollback(args: RollbackArgs) -> Result<ExitCode> {
    let mut out = Out::stdout();
    run_rollback_to(args, &mut out).await
}

/// [`run_rollout`] on a current-thread tokio runtime, for a synchronous `main`.
pub fn run_rollout_blocking(cmd: RolloutCommand) -> Result<ExitCode> {
    runtime()?.block_on(run_rollout(cmd))
}

/// [`run_rollback`] on a current-thread tokio runtime, for a synchronous `main`.
pub fn run_rollback_blocking(args: RollbackArgs) -> Result<ExitCode> {
    runtime()?.block_on(run_rollback(args))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP runtime")
}

/// Where a command prints: stdout (clearing the screen between `--watch` redraws when it is a terminal) or any
/// writer (tests).
pub struct Out<'a> {
    w: Box<dyn Write + Send + 'a>,
    tty: bool,
}

impl<'a> Out<'a> {
    pub fn stdout() -> Out<'static> {
        Out {
            w: Box::new(std::io::stdout()),
            tty: std::io::stdout().is_terminal(),
        }
    }

    /// A writer that is not a terminal.
    pub fn writer(w: impl Write + Send + 'a) -> Out<'a> {
        Out {
            w: Box::new(w),
            tty: false,
        }
    }

    fn print(&mut self, s: &str) -> Result<()> {
        self.w.write_all(s.as_bytes())?;
        if !s.ends_with('\n') {
            self.w.write_all(b"\n")?;
        }
        self.w.flush()?;
        Ok(())
    }

    fn json(&mut self, v: &impl serde::Serialize, pretty: bool) -> Result<()> {
        let s = if pretty {
            serde_json::to_string_pretty(v)?
        } else {
            serde_json::to_string(v)?
        };
        self.print(&s)
    }
}

/// [`run_rollout`] printing to `out`.
pub async fn run_rollout_to(cmd: RolloutCommand, out: &mut Out<'_>) -> Result<ExitCode> {
    match cmd {
        RolloutCommand::Plan(a) => cmd_plan(a, out).await,
        RolloutCommand::Start(a) => cmd_start(a, out).await,
        RolloutCommand::Status(a) => cmd_status(a, out).await,
        RolloutCommand::Pause(a) => cmd_action(&a.id, "pause", &a.conn, out).await,
        RolloutCommand::Resume(a) => cmd_action(&a.id, "resume", &a.conn, out).await,
        RolloutCommand::Approve(a) => cmd_action(&a.id, "approve", &a.conn, out).await,
        RolloutCommand::Abort(a) => cmd_abort(a, out).await,
        RolloutCommand::ClearBad(a) => cmd_clear_bad(a, out).await,
    }
}

async fn cmd_clear_bad(a: ClearBadArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    let version = nkudo_core::version::parse(&a.version).with_context(|| format!("version {:?}", a.version))?;
    let api = Api::new(&a.conn)?;
    api.delete(&format!("/admin/releases/{version}/bad")).await?;
    match a.conn.output {
        Output::Json => out.json(&serde_json::json!({"version": version.to_string(), "bad": false}), true)?,
        Output::Text => out.print(&format!("{version} is no longer marked bad"))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// [`run_rollback`] printing to `out`.
pub async fn run_rollback_to(a: RollbackArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    if !a.fleet && a.tenants.is_empty() && a.sites.is_empty() && a.rings.is_empty() && a.agents.is_empty() {
        eprintln!(
            "releaser: error: no selection: pass --tenant, --site, --ring and/or --agent (repeatable), or --fleet \
             to send EVERY agent of the fleet to {}",
            a.to
        );
        return Ok(ExitCode::from(EXIT_INVALID_POLICY));
    }
    let version = nkudo_core::version::parse(&a.to).with_context(|| format!("--to {:?}", a.to))?;
    let api = Api::new(&a.conn)?;
    let req = FleetRollbackRequest {
        version: version.to_string(),
        tenants: a.tenants.clone(),
        sites: a.sites.clone(),
        rings: a.rings.clone(),
        agents: a.agents.clone(),
    };
    let resp: FleetRollbackResponse = api.post("/admin/rollback", &req).await?;
    match a.conn.output {
        Output::Json => out.json(&resp, true)?,
        Output::Text => out.print(&format!(
            "sent {} agent(s) ({}) to {}",
            resp.agents,
            describe_selection(&req),
            resp.version
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `the whole fleet`, or `tenant a, site s1, s2, ring lab`.
pub fn describe_selection(r: &FleetRollbackRequest) -> String {
    let mut parts = Vec::new();
    for (what, list) in [
        ("tenant", &r.tenants),
        ("site", &r.sites),
        ("ring", &r.rings),
        ("agent", &r.agents),
    ] {
        if !list.is_empty() {
            parts.push(format!("{what} {}", list.join(", ")));
        }
    }
    if parts.is_empty() {
        "the whole fleet".into()
    } else {
        parts.join("; ")
    }
}

// ---------------------------------------------------------------------------------------------------------
// Exit codes

/// The exit status `status --wait` ends with for a final state (`None`: not final yet).
pub fn final_exit_code(state: RolloutState) -> Option<u8> {
    match state {
        RolloutState::Completed => Some(0),
        RolloutState::RolledBack => Some(EXIT_ROLLED_BACK),
        RolloutState::Aborted => Some(EXIT_ABORTED),
        RolloutState::Running | RolloutState::Paused | RolloutState::WaitingApproval => None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Policy files

/// Every policy error as `<file>:<line>: <message>` (`<file>: <message>` when it has no line), one a line.
pub fn format_policy_errors(file: &str, errors: &PolicyErrors) -> String {
    let mut s = String::new();
    for e in &errors.0 {
        if e.line > 0 {
            let _ = writeln!(s, "{file}:{}: {}", e.line, e.message);
        } else {
            let _ = writeln!(s, "{file}: {}", e.message);
        }
    }
    s
}

/// The policy's text when it is valid; else its errors are printed (stderr, or JSON on `out`) and the exit
/// code to return is given.
fn load_policy(path: &Path, output: Output, out: &mut Out<'_>) -> Result<std::result::Result<String, ExitCode>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the policy {}", path.display()))?;
    match nkudo_core::rollout::parse_policy(&text) {
        Ok(_) => Ok(Ok(text)),
        Err(errs) => {
            let file = path.display().to_string();
            match output {
                Output::Json => out.json(
                    &serde_json::json!({
                        "ok": false,
                        "file": file,
                        "errors": errs.0.iter().map(|e| serde_json::json!({
                            "line": e.line,
                            "message": e.message,
                        })).collect::<Vec<_>>(),
                    }),
                    true,
                )?,
                Output::Text => {
                    eprint!("{}", format_policy_errors(&file, &errs));
                    eprintln!(
                        "releaser: {file}: {} error(s); nothing was sent to the control plane",
                        errs.0.len()
                    );
                }
            }
            Ok(Err(ExitCode::from(EXIT_INVALID_POLICY)))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Commands

async fn cmd_plan(a: PolicyArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    let policy = match load_policy(&a.policy, a.conn.output, out)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let api = Api::new(&a.conn)?;
    let plan: RolloutPlan = api
        .post("/admin/rollouts/plan", &StartRolloutRequest { policy })
        .await?;
    match a.conn.output {
        Output::Json => out.json(&plan, true)?,
        Output::Text => out.print(&render_plan(&plan))?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_start(a: StartArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    let policy = match load_policy(&a.policy, a.conn.output, out)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let interactive = std::io::stdin().is_terminal();
    require_confirmation_possible(a.yes, interactive, "start the rollout")?;
    let api = Api::new(&a.conn)?;
    let req = StartRolloutRequest { policy };
    if !a.yes {
        let plan: RolloutPlan = api.post("/admin/rollouts/plan", &req).await?;
        eprint!("{}", render_plan(&plan));
        let total: i64 = plan.stages.iter().map(|s| s.agents).sum();
        if !ask(&format!(
            "Start rolling out {} to {total} agent(s) in {} stage(s)?",
            plan.version,
            plan.stages.len()
        ))? {
            bail!("not started");
        }
    }
    let r: Rollout = api.post("/admin/rollouts", &req).await?;
    match a.conn.output {
        Output::Json => out.json(&r, true)?,
        Output::Text => {
            out.print(&format!(
                "started rollout {}: {} -> {}, {} stage(s), {}",
                r.id,
                r.previous_version.as_deref().unwrap_or("each agent's version"),
                r.version,
                r.stages.len(),
                r.state.as_str()
            ))?;
            eprintln!("follow it with `releaser rollout status {} --watch`", r.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_action(id: &str, action: &str, conn: &ConnectionArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    check_id(id)?;
    let api = Api::new(conn)?;
    let r: Rollout = api
        .post(&format!("/admin/rollouts/{id}/{action}"), &serde_json::json!({}))
        .await?;
    match conn.output {
        Output::Json => out.json(&r, true)?,
        Output::Text => out.print(&format!("{action}: rollout {} is {}", r.id, one_line_state(&r)))?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_abort(a: AbortArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    check_id(&a.id)?;
    let interactive = std::io::stdin().is_terminal();
    require_confirmation_possible(a.yes, interactive, &format!("abort rollout {}", a.id))?;
    let api = Api::new(&a.conn)?;
    if !a.yes {
        let r: Rollout = api.get(&format!("/admin/rollouts/{}", a.id)).await?;
        if r.state.is_final() {
            bail!("rollout {} is already {}: nothing to abort", r.id, r.state.as_str());
        }
        let back = r.previous_version.as_deref().unwrap_or("the version it had before");
        if !ask(&format!(
            "Abort rollout {} of {} ({})? Every agent it touched goes back to {back}.",
            r.id,
            r.version,
            one_line_state(&r)
        ))? {
            bail!("not aborted");
        }
    }
    cmd_action(&a.id, "abort", &a.conn, out).await
}

/// Fails when a confirmation would be needed but cannot be asked (stdin is not a terminal).
pub fn require_confirmation_possible(yes: bool, interactive: bool, what: &str) -> Result<()> {
    if !yes && !interactive {
        bail!("refusing to {what} without confirmation: stdin is not a terminal; pass --yes");
    }
    Ok(())
}

fn ask(question: &str) -> Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the answer")?;
    Ok(is_yes(&line))
}

/// `y` or `yes` (any case).
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!("{id:?} is not a rollout id (see `releaser rollout status --all`)");
    }
    Ok(())
}

async fn cmd_status(a: StatusArgs, out: &mut Out<'_>) -> Result<ExitCode> {
    let api = Api::new(&a.conn)?;
    if a.all {
        let mut list: RolloutsResponse = api.get("/admin/rollouts").await?;
        sort_newest_first(&mut list.rollouts);
        match a.conn.output {
            Output::Json => out.json(&list, true)?,
            Output::Text => out.print(&render_list(&list.rollouts))?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = match &a.id {
        Some(id) => {
            check_id(id)?;
            id.clone()
        }
        None => {
            let list: RolloutsResponse = api.get("/admin/rollouts").await?;
            let r = pick_default(&list.rollouts).ok_or_else(|| {
                anyhow::anyhow!(
                    "the control plane at {} has no rollouts (start one: releaser rollout start)",
                    api.base
                )
            })?;
            if r.state.is_final() {
                eprintln!("no rollout in progress; the newest is {} ({})", r.id, r.state.as_str());
            }
            r.id.clone()
        }
    };
    let path = format!("/admin/rollouts/{id}");
    let opts = RenderOptions {
        decisions: a.decisions,
        now: Utc::now(),
    };

    if !a.watch && !a.wait {
        let mut r: Rollout = api.get(&path).await?;
        let mut chain_ok = None;
        if a.decision_log {
            let log: RolloutDecisionsResponse = api.get(&format!("{path}/decisions")).await?;
            if !log.chain_ok {
                eprintln!("WARNING: the decision log of rollout {id} does NOT verify (hash chain broken)");
            }
            chain_ok = Some(log.chain_ok);
            r.decisions = log.decisions;
        }
        match a.conn.output {
            Output::Json => out.json(&r, true)?,
            Output::Text => {
                let opts = RenderOptions {
                    decisions: if a.decision_log { usize::MAX } else { a.decisions },
                    ..opts
                };
                let mut text = render_rollout(&r, &opts);
                if let Some(ok) = chain_ok {
                    let _ = writeln!(
                        text,
                        "decision log: {} entries, hash chain {}",
                        r.decisions.len(),
                        if ok { "verifies" } else { "does NOT verify" }
                    );
                }
                out.print(&text)?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }

    // --watch and/or --wait: poll until final.
    let mut last_ok = Instant::now();
    let mut gate_seen: Option<Instant> = None;
    let mut last_summary = String::new();
    loop {
        let r: Rollout = match api.get(&path).await {
            Ok(r) => {
                last_ok = Instant::now();
                r
            }
            Err(e) if is_transient(&e) && last_ok.elapsed() < a.unreachable_timeout => {
                eprintln!(
                    "{}: {e:#} (retrying for up to {})",
                    Utc::now().format("%H:%M:%S"),
                    format_duration(a.unreachable_timeout.saturating_sub(last_ok.elapsed()))
                );
                tokio::time::sleep(a.interval).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let now = Utc::now();
        let opts = RenderOptions { now, ..opts };
        if a.watch {
            match a.conn.output {
                Output::Json => out.json(&r, false)?,
                Output::Text => {
                    let mut frame = String::new();
                    if out.tty {
                        frame.push_str("\x1b[2J\x1b[H");
                    } else {
                        let _ = writeln!(frame, "---- {} ----", now.format("%Y-%m-%dT%H:%M:%SZ"));
                    }
                    frame.push_str(&render_rollout(&r, &opts));
                    out.print(&frame)?;
                }
            }
        } else if a.conn.output == Output::Text {
            let summary = one_line_state(&r);
            if summary != last_summary {
                eprintln!("{}: rollout {} {summary}", now.format("%H:%M:%S"), r.id);
                last_summary = summary;
            }
        }
        if let Some(code) = final_exit_code(r.state) {
            if !a.watch {
                print_final(&r, a.conn.output, &opts, out)?;
            }
            return Ok(if a.wait {
                ExitCode::from(code)
            } else {
                ExitCode::SUCCESS
            });
        }
        if r.state == RolloutState::WaitingApproval {
            let seen = *gate_seen.get_or_insert_with(Instant::now);
            if let Some(limit) = a.gate_timeout {
                if waiting_longer_than(&r, seen, limit, now) {
                    if !a.watch {
                        print_final(&r, a.conn.output, &opts, out)?;
                    }
                    eprintln!(
                        "rollout {} has waited for approval longer than {} (approve: releaser rollout approve {})",
                        r.id,
                        format_duration(limit),
                        r.id
                    );
                    return Ok(ExitCode::from(EXIT_GATE_TIMEOUT));
                }
            }
        } else {
            gate_seen = None;
        }
        tokio::time::sleep(a.interval).await;
    }
}

fn print_final(r: &Rollout, output: Output, opts: &RenderOptions, out: &mut Out<'_>) -> Result<()> {
    match output {
        Output::Json => out.json(r, true),
        Output::Text => out.print(&render_rollout(r, opts)),
    }
}

/// Whether a rollout waiting at a manual gate has waited longer than `limit`: from its latest `gate-waiting`
/// decision when that is known, else from `first_seen` (when this command first saw it waiting).
pub fn waiting_longer_than(r: &Rollout, first_seen: Instant, limit: Duration, now: DateTime<Utc>) -> bool {
    let since_decision = r
        .decisions
        .iter()
        .rev()
        .find(|d| d.kind == "gate-waiting")
        .and_then(|d| DateTime::parse_from_rfc3339(&d.at).ok())
        .and_then(|t| (now - t.with_timezone(&Utc)).to_std().ok());
    let waited = since_decision.unwrap_or_else(|| first_seen.elapsed());
    waited > limit
}

/// The rollout `status` shows without an id: the newest one not final, else the newest.
pub fn pick_default(rollouts: &[Rollout]) -> Option<&Rollout> {
    newest(rollouts.iter().filter(|r| !r.state.is_final())).or_else(|| newest(rollouts.iter()))
}

fn newest<'a>(it: impl Iterator<Item = &'a Rollout>) -> Option<&'a Rollout> {
    it.max_by_key(|r| created_key(r))
}

fn created_key(r: &Rollout) -> (i64, String) {
    let t = DateTime::parse_from_rfc3339(&r.created_at)
        .map(|t| t.timestamp_micros())
        .unwrap_or(i64::MIN);
    (t, r.created_at.clone())
}

fn sort_newest_first(list: &mut [Rollout]) {
    list.sort_by_key(|r| std::cmp::Reverse(created_key(r)));
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

/// An error talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The control plane answered an error status.
    #[error("{method} {url}: {status}: {message}{}{hint}", code.as_deref().map(|c| format!(" (code {c})")).unwrap_or_default())]
    Http {
        method: &'static str,
        url: String,
        status: reqwest::StatusCode,
        /// The `code` of the JSON error body.
        code: Option<String>,
        /// The `error` of the JSON error body (else the start of the body).
        message: String,
        hint: &'static str,
    },
    /// The control plane could not be reached (or did not answer in time).
    #[error("cannot reach the control plane: {method} {url} (is --url right? for a private CA pass --ca-cert)")]
    Unreachable {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer is not what this command expected.
    #[error("{method} {url}: unexpected answer ({what}): {detail}")]
    Unexpected {
        method: &'static str,
        url: String,
        what: &'static str,
        detail: String,
    },
}

/// The error for a non-success answer: the server's `error` and `code` when the body is an [`ErrorBody`].
pub fn http_error(method: &'static str, url: &str, status: reqwest::StatusCode, body: &[u8]) -> ApiError {
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    let hint = match (status.as_u16(), parsed.as_ref().map(|e| e.code.as_str())) {
        (401 | 403, _) => "; check the admin key (--admin-key, $NKUDO_ADMIN_KEY)",
        (404, Some(_)) if url.contains("/admin/rollouts/") => {
            "; no such rollout (`releaser rollout status --all` lists them)"
        }
        (404 | 405, None) => "; does this control plane have the rollouts API? (is --url right?)",
        _ => "",
    };
    let (code, message) = match parsed {
        Some(e) => (Some(e.code), e.error),
        None => {
            let text = String::from_utf8_lossy(&body[..body.len().min(500)]).trim().to_string();
            (None, if text.is_empty() { "(empty body)".into() } else { text })
        }
    };
    ApiError::Http {
        method,
        url: url.to_string(),
        status,
        code,
        message,
        hint,
    }
}

/// Whether `--watch`/`--wait` should retry after this error (connection trouble, a restarting control plane).
pub fn is_transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<ApiError>() {
        Some(ApiError::Unreachable { .. }) => true,
        Some(ApiError::Http { status, code, .. }) => {
            matches!(status.as_u16(), 502..=504) || code.as_deref() == Some("UNAVAILABLE")
        }
        _ => false,
    }
}

struct Api {
    client: reqwest::Client,
    base: String,
    admin_key: String,
}

impl Api {
    fn new(conn: &ConnectionArgs) -> Result<Api> {
        let base = conn.url.trim_end_matches('/').to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            bail!("--url {:?}: give the control plane as https://host:port", conn.url);
        }
        if conn.admin_key.is_empty() {
            bail!("the admin key is empty (--admin-key or $NKUDO_ADMIN_KEY)");
        }
        Ok(Api {
            client: http_client(conn.ca_cert.as_deref())?,
            base,
            admin_key: conn.admin_key.clone(),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send("GET", path, None::<&()>).await
    }

    async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> Result<T> {
        self.send("POST", path, Some(body)).await
    }

    /// A DELETE answered without a body (204).
    async fn delete(&self, path: &str) -> Result<()> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .client
            .delete(&url)
            .header("X-Admin-Key", &self.admin_key)
            .send()
            .await
            .map_err(|source| ApiError::Unreachable {
                method: "DELETE",
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(http_error("DELETE", &url, status, &bytes).into());
        }
        Ok(())
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.client.get(&url),
            _ => self.client.post(&url),
        }
        .header("X-Admin-Key", &self.admin_key)
        .header(reqwest::header::ACCEPT, "application/json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| ApiError::Unreachable {
            method,
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ApiError::Unreachable {
            method,
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(http_error(method, &url, status, &bytes).into());
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::Unexpected {
                method,
                url,
                what: std::any::type_name::<T>().rsplit("::").next().unwrap_or("JSON"),
                detail: format!(
                    "{e}; body starts {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            }
            .into()
        })
    }
}

/// A client for the control plane: `ca_cert` (a PEM bundle) as extra trust roots when given, else the system's.
fn http_client(ca_cert: Option<&Path>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("nkudo-releaser/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-cert {} is not a PEM bundle", path.display()))?;
        if certs.is_empty() {
            bail!("--ca-cert {} holds no certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("building the HTTP client")
}

// ---------------------------------------------------------------------------------------------------------
// Text rendering (pure, unit-tested)

/// What [`render_rollout`] shows.
#[derive(Debug, Clone, Copy)]
pub struct RenderOptions {
    /// How many of the latest decisions.
    pub decisions: usize,
    /// The time remaining bake times are computed against.
    pub now: DateTime<Utc>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            decisions: DEFAULT_DECISIONS_SHOWN,
            now: Utc::now(),
        }
    }
}

/// `running at stage 2/3 pilot (baking)`, `completed`, ...
pub fn one_line_state(r: &Rollout) -> String {
    let mut s = r.state.as_str().to_string();
    if let Some(i) = r.current_stage {
        let n = r.stages.len();
        match r.stages.get(i as usize) {
            Some(st) => {
                let _ = write!(s, " at stage {}/{n} {}", i + 1, st.name);
                if st.state != r.state.as_str() {
                    let _ = write!(s, " ({})", st.state);
                }
            }
            None => {
                let _ = write!(s, " at stage {}/{n}", i + 1);
            }
        }
    }
    s
}

/// A number for people: integers without decimals, others with up to 4 decimals.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    if v != 0.0 && v.abs() < 0.001 {
        return format!("{v:.3e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn opt_num(v: Option<f64>) -> String {
    v.map(fmt_num).unwrap_or_else(|| "-".into())
}

/// Left-aligned columns (right-aligned for the columns in `right`), two spaces apart, each line after `indent`.
fn table(out: &mut String, indent: &str, header: &[&str], rows: &[Vec<String>], right: &[usize]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::from(indent);
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.contains(&i) {
                l.push_str(&" ".repeat(pad));
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn counts(map: &std::collections::BTreeMap<String, i64>, limit: usize) -> String {
    if map.is_empty() {
        return "-".into();
    }
    let mut v: Vec<(&String, &i64)> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut s: Vec<String> = v.iter().take(limit).map(|(k, n)| format!("{k} {n}")).collect();
    if v.len() > limit {
        s.push(format!("(+{} more)", v.len() - limit));
    }
    s.join(", ")
}

/// How long until an RFC 3339 instant (`None` when it is past or not a time).
fn remaining(at: &str, now: DateTime<Utc>) -> Option<String> {
    let t = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    let d = (t - now).to_std().ok()?;
    Some(format_duration(Duration::from_secs(d.as_secs())))
}

/// The dry run as text.
pub fn render_plan(p: &RolloutPlan) -> String {
    let mut s = String::new();
    let total: i64 = p.stages.iter().map(|x| x.agents).sum();
    let _ = writeln!(
        s,
        "plan: {} to {total} agent(s) in {} stage(s) (metrics: {}); nothing was changed",
        p.version,
        p.stages.len(),
        p.metrics_source
    );
    s.push('\n');
    let on = format!("ON {}", p.version);
    let rows: Vec<Vec<String>> = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, st)| {
            vec![
                (i + 1).to_string(),
                st.name.clone(),
                st.agents.to_string(),
                st.already_on_version.to_string(),
                st.sites.len().to_string(),
                if st.manual_gate { "manual" } else { "-" }.into(),
                format_duration(Duration::from_secs(st.bake_seconds)),
                format_duration(Duration::from_secs(st.report_timeout_seconds)),
            ]
        })
        .collect();
    table(
        &mut s,
        "  ",
        &["#", "STAGE", "AGENTS", &on, "SITES", "GATE", "BAKE", "REPORT TIMEOUT"],
        &rows,
        &[0, 2, 3, 4],
    );
    for (i, st) in p.stages.iter().enumerate() {
        let _ = writeln!(s, "\nstage {} {}:", i + 1, st.name);
        let _ = writeln!(s, "  sites:    {}", counts(&st.sites, 8));
        let _ = writeln!(
            s,
            "  triggers: {}",
            if st.triggers.is_empty() {
                "none".into()
            } else {
                st.triggers.join(", ")
            }
        );
        if st.manual_gate {
            let _ = writeln!(s, "  waits for `releaser rollout approve` before it starts");
        }
    }
    let _ = writeln!(
        s,
        "\nunselected: {} agent(s) no stage selects stay where they are",
        p.unselected_agents
    );
    for w in &p.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// A rollout as text: header, stages table, per started stage its versions, phases and triggers, then the
/// last `opts.decisions` decisions.
pub fn render_rollout(r: &Rollout, opts: &RenderOptions) -> String {
    let mut s = String::new();
    let _ = write!(s, "rollout {}", r.id);
    if let Some(n) = &r.name {
        let _ = write!(s, " \"{n}\"");
    }
    let _ = writeln!(
        s,
        ": {} -> {}",
        r.previous_version.as_deref().unwrap_or("(each agent's version)"),
        r.version
    );
    let _ = writeln!(s, "state:   {}", one_line_state(r));
    match r.state {
        RolloutState::WaitingApproval => {
            let _ = writeln!(s, "         approve the next stage: releaser rollout approve {}", r.id);
        }
        RolloutState::Paused => {
            let _ = writeln!(s, "         resume: releaser rollout resume {}", r.id);
        }
        RolloutState::RolledBack => {
            if let Some(d) = r
                .decisions
                .iter()
                .rev()
                .find(|d| d.kind == "breach" || d.kind == "report-timeout")
            {
                let _ = writeln!(s, "         why: {}", decision_line(d));
            }
        }
        _ => {}
    }
    let _ = writeln!(
        s,
        "metrics: {}; created {}, updated {}",
        r.metrics_source, r.created_at, r.updated_at
    );
    s.push('\n');

    let on = format!("ON {}", r.version);
    let rows: Vec<Vec<String>> = r
        .stages
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let current = r.current_stage == Some(i as u32);
            vec![
                if current { ">".into() } else { String::new() },
                (i + 1).to_string(),
                st.name.clone(),
                st.state.clone(),
                st.agents.to_string(),
                st.switched.to_string(),
                st.on_new_version.to_string(),
                if st.manual_gate { "manual" } else { "-" }.into(),
            ]
        })
        .collect();
    table(
        &mut s,
        "",
        &["", "#", "STAGE", "STATE", "AGENTS", "SWITCHED", &on, "GATE"],
        &rows,
        &[1, 4, 5, 6],
    );

    for (i, st) in r.stages.iter().enumerate() {
        if st.state == "pending" && st.started_at.is_none() {
            continue;
        }
        let _ = writeln!(s, "\nstage {} {}: {}", i + 1, st.name, st.state);
        let mut times = Vec::new();
        if let Some(t) = &st.started_at {
            times.push(format!("started {t}"));
        }
        if let Some(t) = &st.bake_until {
            match remaining(t, opts.now).filter(|_| st.completed_at.is_none()) {
                Some(left) => times.push(format!("bakes until {t} ({left} left)")),
                None => times.push(format!("baked until {t}")),
            }
        }
        if let Some(t) = &st.completed_at {
            times.push(format!("completed {t}"));
        }
        if !times.is_empty() {
            let _ = writeln!(s, "  {}", times.join(", "));
        }
        let _ = writeln!(s, "  versions: {}", counts(&st.versions, 10));
        let _ = writeln!(s, "  phases:   {}", counts(&st.phases, 10));
        if st.triggers.is_empty() {
            let _ = writeln!(s, "  triggers: none");
            continue;
        }
        let rows: Vec<Vec<String>> = st
            .triggers
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.verdict.clone().unwrap_or_else(|| "-".into()),
                    opt_num(t.value),
                    opt_num(t.reference),
                    opt_num(t.samples),
                    format!("{} {} {}", t.compare, t.operator, fmt_num(t.threshold)),
                    t.consecutive_breaches.to_string(),
                    t.evaluated_at.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            &mut s,
            "  ",
            &[
                "TRIGGER",
                "VERDICT",
                "VALUE",
                "REFERENCE",
                "SAMPLES",
                "THRESHOLD",
                "BREACHES",
                "EVALUATED",
            ],
            &rows,
            &[2, 3, 4, 6],
        );
    }

    if opts.decisions > 0 && !r.decisions.is_empty() {
        let n = r.decisions.len().min(opts.decisions);
        if n == r.decisions.len() {
            let _ = writeln!(s, "\ndecisions ({n}):");
        } else {
            let _ = writeln!(
                s,
                "\ndecisions (last {n} of {}; --decisions N for more):",
                r.decisions.len()
            );
        }
        for d in &r.decisions[r.decisions.len() - n..] {
            let _ = writeln!(s, "  {}", decision_line(d));
            if let Some(q) = &d.query {
                let _ = writeln!(s, "      query: {q}");
            }
        }
    }
    s
}

/// `#7 2026-...Z controller breach stage=pilot trigger=plan-failure-rate value=0.12 threshold=0.05: roll back`.
pub fn decision_line(d: &RolloutDecision) -> String {
    let mut s = format!("#{} {} {} {}", d.seq, d.at, d.actor, d.kind);
    if let Some(st) = &d.stage {
        let _ = write!(s, " stage={st}");
    }
    if let Some(t) = &d.trigger {
        let _ = write!(s, " trigger={t}");
    }
    match &d.values {
        serde_json::Value::Null => {}
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::Number(n) => {
                        let _ = write!(s, " {k}={}", n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()));
                    }
                    serde_json::Value::String(x) => {
                        let _ = write!(s, " {k}={x}");
                    }
                    serde_json::Value::Null => {
                        let _ = write!(s, " {k}=-");
                    }
                    other => {
                        let _ = write!(s, " {k}={other}");
                    }
                }
            }
        }
        other => {
            let _ = write!(s, " values={other}");
        }
    }
    if let Some(t) = d.threshold {
        let _ = write!(s, " threshold={}", fmt_num(t));
    }
    if !d.action.is_empty() {
        let _ = write!(s, ": {}", d.action);
    }
    s
}

/// Every rollout, one a line (newest first as given).
pub fn render_list(rollouts: &[Rollout]) -> String {
    if rollouts.is_empty() {
        return "no rollouts\n".into();
    }
    let rows: Vec<Vec<String>> = rollouts
        .iter()
        .map(|r| {
            let stage = match r.current_stage {
                Some(i) => format!(
                    "{}/{} {}",
                    i + 1,
                    r.stages.len(),
                    r.stages.get(i as usize).map(|s| s.name.as_str()).unwrap_or("?")
                ),
                None => "-".into(),
            };
            vec![
                r.id.clone(),
                r.state.as_str().into(),
                r.version.clone(),
                r.previous_version.clone().unwrap_or_else(|| "-".into()),
                stage,
                r.created_at.clone(),
                r.updated_at.clone(),
                r.name.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut s = String::new();
    table(
        &mut s,
        "",
        &["ID", "STATE", "VERSION", "FROM", "STAGE", "CREATED", "UPDATED", "NAME"],
        &rows,
        &[],
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use nkudo_core::api::{PlannedStage, RolloutStageStatus, TriggerStatus};
    use std::collections::BTreeMap;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        #[command(subcommand)]
        Rollout(RolloutCommand),
        Rollback(RollbackArgs),
    }

    fn parse(args: &[&str]) -> std::result::Result<Top, clap::Error> {
        let mut v = vec!["releaser"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.cmd)
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn stage(name: &str, state: &str) -> RolloutStageStatus {
        RolloutStageStatus {
            index: 0,
            name: name.into(),
            state: state.into(),
            agents: 0,
            switched: 0,
            on_new_version: 0,
            versions: BTreeMap::new(),
            phases: BTreeMap::new(),
            started_at: None,
            bake_until: None,
            completed_at: None,
            manual_gate: false,
            triggers: vec![],
        }
    }

    fn rollout(id: &str, state: RolloutState, created: &str) -> Rollout {
        Rollout {
            id: id.into(),
            name: None,
            version: "1.4.0".into(),
            previous_version: Some("1.3.2".into()),
            state,
            current_stage: None,
            metrics_source: "builtin".into(),
            created_at: created.into(),
            updated_at: created.into(),
            stages: vec![],
            decisions: vec![],
        }
    }

    fn decision(seq: i64, kind: &str, at: &str) -> RolloutDecision {
        RolloutDecision {
            seq,
            at: at.into(),
            actor: "controller".into(),
            kind: kind.into(),
            stage: None,
            trigger: None,
            query: None,
            values: serde_json::Value::Null,
            threshold: None,
            action: String::new(),
            hash: "00".into(),
        }
    }

    /// A rollout rolled back in its second stage by the plan failure rate trigger.
    fn rolled_back() -> Rollout {
        let mut lab = stage("lab", "done");
        lab.agents = 4;
        lab.switched = 4;
        lab.on_new_version = 4;
        lab.versions = BTreeMap::from([("1.4.0".into(), 4)]);
        lab.phases = BTreeMap::from([("healthy".into(), 4)]);
        lab.started_at = Some("2026-11-23T19:00:00Z".into());
        lab.bake_until = Some("2026-11-23T19:12:00Z".into());
        lab.completed_at = Some("2026-11-23T19:12:00Z".into());
        let mut pilot = stage("pilot", "rolled-back");
        pilot.agents = 10;
        pilot.switched = 6;
        pilot.on_new_version = 5;
        pilot.versions = BTreeMap::from([("1.4.0".into(), 5), ("1.3.2".into(), 5)]);
        pilot.phases = BTreeMap::from([("healthy".into(), 9), ("downloading".into(), 1)]);
        pilot.started_at = Some("2026-11-23T19:12:00Z".into());
        pilot.triggers = vec![
            TriggerStatus {
                name: "plan-failure-rate".into(),
                metric: "plan-failure-rate".into(),
                compare: "control".into(),
                operator: ">".into(),
                threshold: 0.05,
                value: Some(0.125),
                reference: Some(0.01),
                samples: Some(48.0),
                verdict: Some("breach".into()),
                consecutive_breaches: 2,
                evaluated_at: Some("2026-11-23T19:15:30Z".into()),
            },
            TriggerStatus {
                name: "crash-loops".into(),
                metric: "crash-loops".into(),
                compare: "threshold".into(),
                operator: ">".into(),
                threshold: 2.0,
                value: None,
                reference: None,
                samples: None,
                verdict: Some("inconclusive".into()),
                consecutive_breaches: 0,
                evaluated_at: None,
            },
        ];
        let mut stable = stage("stable", "pending");
        stable.agents = 200;
        stable.manual_gate = true;
        let mut breach = decision(9, "breach", "2026-11-23T19:15:30Z");
        breach.stage = Some("pilot".into());
        breach.trigger = Some("plan-failure-rate".into());
        breach.query = Some("sum(increase(nkudo_plan_executions_total[5m]))".into());
        breach.values = serde_json::json!({"value": 0.125, "reference": 0.01, "samples": 48});
        breach.threshold = Some(0.05);
        breach.action = "roll back every touched agent to 1.3.2".into();
        let mut rb = decision(10, "rolled-back", "2026-11-23T19:15:31Z");
        rb.action = "14 agent(s) sent back to 1.3.2".into();
        Rollout {
            id: "r-7".into(),
            name: Some("1.4.0 to everyone".into()),
            state: RolloutState::RolledBack,
            current_stage: Some(1),
            stages: vec![lab, pilot, stable],
            decisions: vec![
                decision(7, "stage-baked", "2026-11-23T19:12:00Z"),
                decision(8, "stage-started", "2026-11-23T19:12:00Z"),
                breach,
                rb,
            ],
            ..rollout("r-7", RolloutState::RolledBack, "2026-11-23T19:00:00Z")
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T19:20:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn renders_a_rolled_back_rollout() {
        let text = render_rollout(
            &rolled_back(),
            &RenderOptions {
                decisions: 3,
                now: now(),
            },
        );
        let expect = [
            "rollout r-7 \"1.4.0 to everyone\": 1.3.2 -> 1.4.0",
            "state:   rolled-back at stage 2/3 pilot",
            "why: #9 2026-11-23T19:15:30Z controller breach stage=pilot trigger=plan-failure-rate reference=0.01 \
             samples=48 value=0.125 threshold=0.05: roll back every touched agent to 1.3.2",
            "metrics: builtin; created 2026-11-23T19:00:00Z",
            "   #  STAGE   STATE        AGENTS  SWITCHED  ON 1.4.0  GATE",
            "   1  lab     done              4         4         4  -",
            ">  2  pilot   rolled-back      10         6         5  -",
            "   3  stable  pending         200         0         0  manual",
            "stage 1 lab: done",
            "baked until 2026-11-23T19:12:00Z, completed 2026-11-23T19:12:00Z",
            "  versions: 1.3.2 5, 1.4.0 5",
            "  phases:   healthy 9, downloading 1",
            "  TRIGGER            VERDICT       VALUE  REFERENCE  SAMPLES  THRESHOLD       BREACHES  EVALUATED",
            "  plan-failure-rate  breach        0.125       0.01       48  control > 0.05         2  2026-11-23T19:15:30Z",
            "  crash-loops        inconclusive      -          -        -  threshold > 2          0  -",
            "decisions (last 3 of 4; --decisions N for more):",
            "      query: sum(increase(nkudo_plan_executions_total[5m]))",
            "#10 2026-11-23T19:15:31Z controller rolled-back: 14 agent(s) sent back to 1.3.2",
        ];
        for e in expect {
            assert!(text.contains(e), "missing {e:?} in\n{text}");
        }
        // Pending stages have no detail block; the oldest decision is cut.
        assert!(!text.contains("stage 3 stable"), "{text}");
        assert!(!text.contains("#7 "), "{text}");
        // No trailing spaces.
        assert!(text.lines().all(|l| l == l.trim_end()), "{text}");
    }

    #[test]
    fn renders_a_baking_stage_and_hints() {
        let mut r = rolled_back();
        r.state = RolloutState::WaitingApproval;
        r.current_stage = Some(2);
        r.stages[2].state = "waiting-approval".into();
        r.decisions.clear();
        let text = render_rollout(
            &r,
            &RenderOptions {
                decisions: 5,
                now: now(),
            },
        );
        assert!(
            text.contains("state:   waiting-approval at stage 3/3 stable\n"),
            "{text}"
        );
        assert!(text.contains("releaser rollout approve r-7"), "{text}");
        assert!(!text.contains("decisions ("), "{text}");

        r.state = RolloutState::Running;
        r.current_stage = Some(0);
        r.stages[0].state = "baking".into();
        r.stages[0].completed_at = None;
        r.stages[0].bake_until = Some("2026-11-23T19:25:00Z".into());
        let text = render_rollout(
            &r,
            &RenderOptions {
                decisions: 5,
                now: now(),
            },
        );
        assert!(text.contains("state:   running at stage 1/3 lab (baking)"), "{text}");
        assert!(text.contains("bakes until 2026-11-23T19:25:00Z (5m left)"), "{text}");
        assert_eq!(one_line_state(&rollout("x", RolloutState::Completed, "")), "completed");
    }

    #[test]
    fn renders_a_plan() {
        let plan = RolloutPlan {
            version: "1.4.0".into(),
            metrics_source: "prometheus".into(),
            stages: vec![
                PlannedStage {
                    name: "lab".into(),
                    agents: 4,
                    already_on_version: 1,
                    sites: BTreeMap::from([("s-a".into(), 1), ("s-b".into(), 3)]),
                    manual_gate: false,
                    bake_seconds: 120,
                    report_timeout_seconds: 900,
                    triggers: vec!["plan-failure-rate".into(), "crash-loops".into()],
                },
                PlannedStage {
                    name: "stable-10".into(),
                    agents: 20,
                    already_on_version: 0,
                    sites: (0..12).map(|i| (format!("s{i:02}"), 1 + i as i64)).collect(),
                    manual_gate: true,
                    bake_seconds: 3600,
                    report_timeout_seconds: 90,
                    triggers: vec![],
                },
            ],
            unselected_agents: 7,
            warnings: vec!["stage stable-10 selects no production agent".into()],
        };
        let text = render_plan(&plan);
        for e in [
            "plan: 1.4.0 to 24 agent(s) in 2 stage(s) (metrics: prometheus); nothing was changed",
            "  #  STAGE      AGENTS  ON 1.4.0  SITES  GATE    BAKE  REPORT TIMEOUT",
            "  1  lab             4         1      2  -       2m    15m",
            "  2  stable-10      20         0     12  manual  1h    90s",
            "  sites:    s-b 3, s-a 1",
            "  sites:    s11 12, s10 11, s09 10, s08 9, s07 8, s06 7, s05 6, s04 5, (+4 more)",
            "  triggers: plan-failure-rate, crash-loops",
            "  triggers: none",
            "waits for `releaser rollout approve`",
            "unselected: 7 agent(s) no stage selects stay where they are",
            "warning: stage stable-10 selects no production agent",
        ] {
            assert!(text.contains(e), "missing {e:?} in\n{text}");
        }
    }

    #[test]
    fn renders_a_list() {
        let mut a = rollout("r-1", RolloutState::Completed, "2026-11-20T10:00:00Z");
        a.stages = vec![stage("lab", "done")];
        let mut b = rollout("r-2", RolloutState::Running, "2026-11-23T10:00:00Z");
        b.stages = vec![stage("lab", "done"), stage("pilot", "switching")];
        b.current_stage = Some(1);
        let text = render_list(&[b, a]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID   STATE      VERSION  FROM   STAGE"), "{text}");
        assert!(
            lines[1].starts_with("r-2  running    1.4.0    1.3.2  2/2 pilot"),
            "{text}"
        );
        assert!(lines[2].starts_with("r-1  completed  1.4.0    1.3.2  -"), "{text}");
        assert_eq!(render_list(&[]), "no rollouts\n");
    }

    #[test]
    fn numbers_for_people() {
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_num(48.0), "48");
        assert_eq!(fmt_num(-3.0), "-3");
        assert_eq!(fmt_num(0.123456), "0.1235");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.00012), "1.200e-4");
        assert_eq!(fmt_num(f64::NAN), "NaN");
    }

    #[test]
    fn policy_errors_name_file_and_line() {
        let text = "version = \"1.4.0\"\n[[stage]]\nname = \"lab\"\npercent = 150\nbake = \"ten\"\n";
        let errs = nkudo_core::rollout::parse_policy(text).unwrap_err();
        let out = format_policy_errors("p.toml", &errs);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].starts_with("p.toml:4: percent"), "{out}");
        assert!(lines[1].starts_with("p.toml:5: bake"), "{out}");
        let errs = PolicyErrors(vec![nkudo_core::rollout::PolicyError {
            line: 0,
            message: "empty".into(),
        }]);
        assert_eq!(format_policy_errors("p.toml", &errs), "p.toml: empty\n");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(final_exit_code(RolloutState::Completed), Some(0));
        assert_eq!(final_exit_code(RolloutState::RolledBack), Some(3));
        assert_eq!(final_exit_code(RolloutState::Aborted), Some(4));
        for s in [
            RolloutState::Running,
            RolloutState::Paused,
            RolloutState::WaitingApproval,
        ] {
            assert_eq!(final_exit_code(s), None);
            assert!(!s.is_final());
        }
        assert_eq!(EXIT_GATE_TIMEOUT, 5);
        assert_eq!(EXIT_INVALID_POLICY, 2);
    }

    #[test]
    fn gate_timeout_counts_from_the_gate_decision() {
        let mut r = rollout("r", RolloutState::WaitingApproval, "2026-11-23T19:00:00Z");
        let just_now = Instant::now();
        // No decision: from when the command first saw it.
        assert!(!waiting_longer_than(&r, just_now, Duration::from_secs(60), now()));
        r.decisions.push(decision(3, "gate-waiting", "2026-11-23T19:10:00Z"));
        assert!(waiting_longer_than(&r, just_now, Duration::from_secs(300), now()));
        assert!(!waiting_longer_than(&r, just_now, Duration::from_secs(900), now()));
    }

    #[test]
    fn default_rollout_is_the_newest_in_progress() {
        let list = vec![
            rollout("old-running", RolloutState::Paused, "2026-11-01T00:00:00Z"),
            rollout("new-done", RolloutState::Completed, "2026-11-23T00:00:00Z"),
            rollout("mid-running", RolloutState::Running, "2026-11-10T00:00:00+02:00"),
        ];
        assert_eq!(pick_default(&list).unwrap().id, "mid-running");
        assert_eq!(pick_default(&list[1..2]).unwrap().id, "new-done");
        assert!(pick_default(&[]).is_none());
        let mut sorted = list.clone();
        sort_newest_first(&mut sorted);
        let ids: Vec<&str> = sorted.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["new-done", "mid-running", "old-running"]);
    }

    #[test]
    fn http_errors_show_the_servers_error_and_code() {
        let e = http_error(
            "POST",
            "https://cp/admin/rollouts",
            reqwest::StatusCode::CONFLICT,
            br#"{"error":"rollout r-1 is running","code":"CONFLICT"}"#,
        );
        assert_eq!(
            e.to_string(),
            "POST https://cp/admin/rollouts: 409 Conflict: rollout r-1 is running (code CONFLICT)"
        );
        let e = http_error(
            "GET",
            "https://cp/admin/rollouts/r-9",
            reqwest::StatusCode::NOT_FOUND,
            br#"{"error":"not found","code":"NOT_FOUND"}"#,
        );
        assert!(
            e.to_string()
                .ends_with("(code NOT_FOUND); no such rollout (`releaser rollout status --all` lists them)"),
            "{e}"
        );
        let e = http_error(
            "GET",
            "https://cp/admin/rollouts",
            reqwest::StatusCode::UNAUTHORIZED,
            b"",
        );
        assert!(
            e.to_string()
                .contains("401 Unauthorized: (empty body); check the admin key"),
            "{e}"
        );
        let e = http_error(
            "GET",
            "https://cp/admin/rollouts",
            reqwest::StatusCode::NOT_FOUND,
            b"<html>",
        );
        assert!(
            e.to_string().contains("does this control plane have the rollouts API"),
            "{e}"
        );
        let e: anyhow::Error = http_error(
            "GET",
            "https://cp/x",
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"restarting","code":"UNAVAILABLE"}"#,
        )
        .into();
        assert!(is_transient(&e));
        let e: anyhow::Error = http_error("GET", "https://cp/x", reqwest::StatusCode::BAD_REQUEST, b"").into();
        assert!(!is_transient(&e));
        assert!(!is_transient(&anyhow::anyhow!("other")));
    }

    #[test]
    fn confirmation_rules() {
        assert!(require_confirmation_possible(true, false, "abort rollout r").is_ok());
        assert!(require_confirmation_possible(false, true, "abort rollout r").is_ok());
        let e = require_confirmation_possible(false, false, "abort rollout r").unwrap_err();
        assert_eq!(
            e.to_string(),
            "refusing to abort rollout r without confirmation: stdin is not a terminal; pass --yes"
        );
        assert!(is_yes("y\n") && is_yes(" YES ") && !is_yes("") && !is_yes("no") && !is_yes("yess"));
    }

    #[test]
    fn cli_parses() {
        let t = parse(&[
            "rollout",
            "status",
            "r-1",
            "--wait",
            "--interval",
            "500ms",
            "--gate-timeout",
            "1h",
            "--url",
            "https://cp",
            "--admin-key",
            "k",
            "--output",
            "json",
        ])
        .unwrap();
        match t {
            Top::Rollout(RolloutCommand::Status(s)) => {
                assert_eq!(s.id.as_deref(), Some("r-1"));
                assert!(s.wait && !s.watch);
                assert_eq!(s.interval, Duration::from_millis(500));
                assert_eq!(s.gate_timeout, Some(Duration::from_secs(3600)));
                assert_eq!(s.conn.output, Output::Json);
                assert!(!format!("{:?}", s.conn).contains("\"k\""));
            }
            other => panic!("{other:?}"),
        }
        // --gate-timeout needs --wait; --all excludes an id.
        assert!(parse(&[
            "rollout",
            "status",
            "--gate-timeout",
            "1h",
            "--url",
            "u",
            "--admin-key",
            "k"
        ])
        .is_err());
        assert!(parse(&["rollout", "status", "r-1", "--all", "--url", "u", "--admin-key", "k"]).is_err());
        assert!(parse(&[
            "rollout",
            "status",
            "--interval",
            "1ms",
            "--url",
            "u",
            "--admin-key",
            "k"
        ])
        .is_err());

        let t = parse(&[
            "rollback",
            "--to",
            "1.3.2",
            "--site",
            "s1",
            "--site",
            "s2",
            "--ring",
            "lab",
            "--url",
            "u",
            "--admin-key",
            "k",
        ])
        .unwrap();
        match t {
            Top::Rollback(a) => {
                assert_eq!(a.sites, ["s1", "s2"]);
                assert_eq!(a.rings, ["lab"]);
                assert!(!a.fleet);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&[
            "rollback",
            "--to",
            "1.3.2",
            "--fleet",
            "--site",
            "s",
            "--url",
            "u",
            "--admin-key",
            "k"
        ])
        .is_err());
        assert!(parse(&["rollout", "abort", "r-1", "--yes", "--url", "u", "--admin-key", "k"]).is_ok());
    }

    #[test]
    fn selection_descriptions() {
        let mut r = FleetRollbackRequest {
            version: "1.3.2".into(),
            ..Default::default()
        };
        assert_eq!(describe_selection(&r), "the whole fleet");
        r.sites = vec!["s1".into(), "s2".into()];
        r.rings = vec!["lab".into()];
        assert_eq!(describe_selection(&r), "site s1, s2; ring lab");
    }

    #[test]
    fn rollback_without_selection_is_refused_before_any_request() {
        let t = parse(&[
            "rollback",
            "--to",
            "1.3.2",
            "--url",
            "http://127.0.0.1:9",
            "--admin-key",
            "k",
        ])
        .unwrap();
        let Top::Rollback(a) = t else { panic!() };
        let mut buf = Vec::new();
        let code = runtime()
            .unwrap()
            .block_on(run_rollback_to(a, &mut Out::writer(&mut buf)))
            .unwrap();
        assert_eq!(code, ExitCode::from(EXIT_INVALID_POLICY));
        assert!(buf.is_empty());
    }
}
