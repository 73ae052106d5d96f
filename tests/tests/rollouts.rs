//! Ring rollouts with analysis and automatic rollback end to end (issue 7): the real control plane (SQLite, 1 s
//! heartbeats, the rollout controller ticking every second), real agents running from host layouts that update
//! themselves (`nkudo_tests::releases::LayoutHost`, health window 15 s, stable after 5 s), releases built from
//! the real agent binary, the captain's `releaser rollout ...` commands, and for one run a real Prometheus
//! (Debian's package) scraping the control plane's `/metrics` over HTTPS.
//!
//! The fleet: one site per ring (`lab`, `pilot`, `stable`, labelled `ring=<ring>`, `environment=test`), one agent
//! in each, all on A. Plans are posted per site, so each site's plans are executed by its own agent.
//!
//! 1. A good release B goes lab → pilot → stable; every agent ends on B; `status --wait` exits 0; the decision
//!    log's hash chain verifies.
//! 2. A release whose agents run the Cloud Hypervisor stand-in with `MOCK_CH_FAIL_BOOT=1` (its plans fail) is
//!    rolled back by `plan-failure-rate` in lab; stable is never touched; the touched agents return to A; B is
//!    marked bad (and refused as a desired version); `status --wait` exits 3. Run with the builtin statistics and
//!    with Prometheus: the same decision (stage, trigger). The time from the breach decision to every touched
//!    agent reporting A again is printed.
//! 3. A crash-looping release stops in lab (its agent's guard rolls it back; `upgrade-rollbacks`, `crash-loops`
//!    or the report timeout fires); pilot and stable untouched.
//! 4. The control plane restarted mid-rollout (same port and data) resumes and completes; `status --wait`, started
//!    before the restart, rides it out and exits 0.
//! 5. pause (nothing switches), resume, a manual gate that waits for `approve`, and `abort` (touched agents back on
//!    A, state aborted, B not marked bad, `status --wait` exits 4).
//! 6. A pre-release aimed at a stage with a production agent is refused (`releaser rollout start` fails; the route
//!    answers 409 PRERELEASE_IN_PRODUCTION).

use chrono::{DateTime, Utc};
use nkudo_core::api::{
    ApplyPlanRequest, DesiredScope, PlanActionSpec, Rollout, RolloutDecision, RolloutState, Site, StartRolloutRequest,
};
use nkudo_tests::prometheus::Prometheus;
use nkudo_tests::releases::*;
use nkudo_tests::*;
use reqwest::StatusCode;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const A: &str = "0.1.1";
const B: &str = "0.1.2";
const RINGS: [&str; 3] = ["lab", "pilot", "stable"];

/// How long a whole rollout may take (three stages of downloads of the debug agent, restarts, bakes), on a
/// loaded 2-core machine.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(420);
/// Per agent: a switch to a version and its report.
const AGENT_DEADLINE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------------------
// The fleet

/// One ring: its site and the agent running there.
struct Member {
    ring: &'static str,
    site: Site,
    host: LayoutHost,
    id: String,
}

struct Fleet {
    fx: Fixture,
    members: Vec<Member>,
}

impl Fleet {
    fn member(&self, ring: &str) -> &Member {
        self.members.iter().find(|m| m.ring == ring).expect("ring")
    }
    fn fixture(&self, m: &Member) -> Fixture {
        Fixture {
            site: m.site.clone(),
            ..self.fx.clone()
        }
    }
}

/// One site per ring (labels `ring=<ring>`, `environment=test`) with one agent on `initial`, running and
/// reporting it.
async fn fleet(cp: &ControlPlane, initial: &BuiltRelease, key: &SecretKey, tag: &str) -> anyhow::Result<Fleet> {
    let fx = bootstrap(cp).await?;
    let mut members = Vec::new();
    for ring in RINGS {
        let site = create_site(cp, &fx.api_key, fx.tenant_id(), &format!("{ring}-{}", unique("s"))).await?;
        let r = set_site_labels(cp, &site.id, &[("ring", ring), ("environment", "test")]).await?;
        anyhow::ensure!(r.status().is_success(), "labels: {}", r.text().await?);
        let sfx = Fixture {
            site: site.clone(),
            ..fx.clone()
        };
        let mut host = LayoutHost::new(&format!("edge-{tag}-{ring}"), initial, &[key])?;
        host.set_env("NKUDO_MAX_BACKOFF", "2s");
        let id = host.enroll(cp, &sfx).await?;
        host.spawn(cp)?;
        members.push(Member { ring, site, host, id });
    }
    for m in &members {
        wait_agent(
            cp,
            &m.host,
            &m.id,
            Duration::from_secs(60),
            "the first heartbeat",
            |a| a.last_heartbeat_at.is_some() && a.agent_version == initial.version,
        )
        .await?;
    }
    Ok(Fleet { fx, members })
}

/// A control plane for rollouts on a fixed port (so that it can be restarted on the same address).
async fn rollout_control_plane(key: &SecretKey, prometheus_url: Option<&str>) -> anyhow::Result<(ControlPlane, u16)> {
    let port = free_port()?;
    let mut b = release_control_plane(Backend::Sqlite, &[key])
        .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("ROLLOUT_TICK", "1s");
    b = match prometheus_url {
        Some(u) => b.env("PROMETHEUS_URL", u),
        None => b.env_remove("PROMETHEUS_URL"),
    };
    let cp = b.start().await?.expect("SQLite is always available");
    Ok((cp, port))
}

/// Three stages, one per ring, with `defaults` (TOML lines) and extra text (triggers) after them.
fn three_stage_policy(version: &str, defaults: &str, stage_extra: &[(&str, &str)], tail: &str) -> String {
    let mut s = format!("version = \"{version}\"\nname = \"{version} lab to stable (test)\"\nprevious_version = \"{A}\"\n\n[defaults]\n{defaults}\n");
    for ring in RINGS {
        s.push_str(&format!("\n[[stage]]\nname = \"{ring}\"\nrings = [\"{ring}\"]\n"));
        if let Some((_, extra)) = stage_extra.iter().find(|(r, _)| *r == ring) {
            s.push_str(extra);
            s.push('\n');
        }
    }
    s.push_str(tail);
    s
}

fn write_policy(dir: &Path, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(format!("{}.toml", unique("policy")));
    std::fs::write(&p, text)?;
    Ok(p)
}

// ---------------------------------------------------------------------------------------------------------
// releaser and the admin routes

/// `releaser rollout <args> --url <cp> --admin-key <key> --ca-cert <bundle>`.
fn rollout_cmd(cp: &ControlPlane, args: &[&str]) -> std::process::Command {
    let mut c = releaser_command();
    c.arg("rollout")
        .args(args)
        .args(["--url", &cp.base_url, "--admin-key", &cp.admin_key])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path);
    c
}

fn rollout_output(cp: &ControlPlane, args: &[&str]) -> Output {
    rollout_cmd(cp, args).output().expect("run releaser rollout")
}

/// `releaser rollout start <policy> --yes --output json`: the rollout it started.
fn releaser_start(cp: &ControlPlane, policy: &Path) -> anyhow::Result<Rollout> {
    let out = rollout_output(cp, &["start", policy.to_str().unwrap(), "--yes", "--output", "json"]);
    anyhow::ensure!(out.status.success(), "releaser rollout start: {}", output_text(&out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `releaser rollout status <id> --wait` in the background (killed if dropped).
fn spawn_status_wait(cp: &ControlPlane, id: &str) -> tokio::task::JoinHandle<std::io::Result<Output>> {
    let mut c = tokio::process::Command::from(rollout_cmd(
        cp,
        &["status", id, "--wait", "--interval", "1s", "--output", "json"],
    ));
    c.kill_on_drop(true);
    tokio::spawn(async move { c.output().await })
}

/// Awaits `status --wait` (bounded) and returns its exit code and output.
async fn status_wait_result(
    h: tokio::task::JoinHandle<std::io::Result<Output>>,
    timeout: Duration,
) -> anyhow::Result<(i32, Output)> {
    let out = tokio::time::timeout(timeout, h)
        .await
        .map_err(|_| anyhow::anyhow!("releaser rollout status --wait still running after {timeout:?}"))???;
    Ok((out.status.code().unwrap_or(-1), out))
}

fn describe(r: &Rollout) -> String {
    let stages: Vec<String> = r
        .stages
        .iter()
        .map(|s| {
            format!(
                "{}:{} agents={} switched={} on_new={} versions={:?} phases={:?}",
                s.name, s.state, s.agents, s.switched, s.on_new_version, s.versions, s.phases
            )
        })
        .collect();
    let decisions: Vec<String> = r
        .decisions
        .iter()
        .map(|d| {
            format!(
                "#{} {} {} {:?} {:?} {} {}",
                d.seq, d.at, d.kind, d.stage, d.trigger, d.values, d.action
            )
        })
        .collect();
    format!(
        "rollout {} state={} stage={:?} source={}\n  {}\n  decisions:\n    {}",
        r.id,
        r.state.as_str(),
        r.current_stage,
        r.metrics_source,
        stages.join("\n  "),
        decisions.join("\n    ")
    )
}

/// Polls the rollout until `pred` holds.
async fn wait_rollout<F>(
    cp: &ControlPlane,
    id: &str,
    timeout: Duration,
    what: &str,
    mut pred: F,
) -> anyhow::Result<Rollout>
where
    F: FnMut(&Rollout) -> bool,
{
    let deadline = Instant::now() + timeout;
    let mut last: Option<Rollout> = None;
    loop {
        if let Ok(r) = get_rollout(cp, id).await {
            if pred(&r) {
                return Ok(r);
            }
            last = Some(r);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "timed out after {timeout:?} waiting for {what}: {}",
                last.as_ref().map(describe).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_final(cp: &ControlPlane, id: &str, timeout: Duration) -> anyhow::Result<Rollout> {
    wait_rollout(cp, id, timeout, "the rollout to be final", |r| {
        !matches!(
            r.state,
            RolloutState::Running | RolloutState::Paused | RolloutState::WaitingApproval
        )
    })
    .await
}

async fn release_info(cp: &ControlPlane, version: &str) -> anyhow::Result<serde_json::Value> {
    let r = admin(cp)
        .get(cp.url(&format!("/admin/releases/{version}")))
        .send()
        .await?;
    expect_json(r, StatusCode::OK, "GET /admin/releases/{version}").await
}

// ---------------------------------------------------------------------------------------------------------
// Background helpers: a sentinel over the agents that must stay untouched, and a plan generator

/// Records every `agent_version` and `desired_version` the control plane shows for some agents (every 300 ms).
struct Sentinel {
    seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Sentinel {
    fn start(cp: &ControlPlane, ids: &[&str]) -> Sentinel {
        let client = admin(cp);
        let url = cp.url("/admin/agents?limit=100");
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            while !st2.load(Ordering::SeqCst) {
                if let Ok(r) = client.get(&url).send().await {
                    if let Ok(v) = r.json::<serde_json::Value>().await {
                        for a in v["agents"].as_array().into_iter().flatten() {
                            let Some(id) = a["id"].as_str() else { continue };
                            if !ids.iter().any(|x| x == id) {
                                continue;
                            }
                            let mut g = s2.lock().unwrap();
                            let e = g.entry(id.to_string()).or_default();
                            e.insert(format!("version={}", a["agent_version"].as_str().unwrap_or("?")));
                            e.insert(format!("desired={}", a["desired_version"].as_str().unwrap_or("none")));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Sentinel { seen, stop, handle }
    }

    /// Stops and asserts that each agent was only ever seen on `version` with no desired version but `allowed`.
    async fn assert_untouched(self, version: &str, allowed_desired: &[&str]) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.await;
        let seen = self.seen.lock().unwrap().clone();
        anyhow::ensure!(!seen.is_empty(), "the sentinel saw nothing");
        for (id, s) in &seen {
            for x in s {
                let ok = *x == format!("version={version}")
                    || *x == "desired=none"
                    || allowed_desired.iter().any(|d| *x == format!("desired={d}"));
                anyhow::ensure!(
                    ok,
                    "agent {id} must stay untouched on {version}, but was seen with {x} ({s:?})"
                );
            }
        }
        Ok(())
    }
}

/// Posts a plan `CREATE, START, STOP, DELETE` of a new VM to every site every `every`, until stopped.
struct PlanLoad {
    stop: Arc<AtomicBool>,
    posted: Arc<Mutex<usize>>,
    last_error: Arc<Mutex<String>>,
    handle: tokio::task::JoinHandle<()>,
}

impl PlanLoad {
    fn start(cp: &ControlPlane, fleet: &Fleet, every: Duration) -> PlanLoad {
        let client = tenant(cp, &fleet.fx.api_key);
        let targets: Vec<(String, PlanActionSpec)> = fleet
            .members
            .iter()
            .map(|m| {
                (
                    cp.url(&format!("/sites/{}/plans", m.site.id)),
                    m.host.edge.create_spec("x"),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let posted = Arc::new(Mutex::new(0usize));
        let last_error = Arc::new(Mutex::new(String::new()));
        let (st2, p2, e2) = (stop.clone(), posted.clone(), last_error.clone());
        let handle = tokio::spawn(async move {
            while !st2.load(Ordering::SeqCst) {
                for (url, template) in &targets {
                    let vm = unique("vm");
                    let mut create = template.clone();
                    create.vm_id = Some(vm.clone());
                    create.name = Some(format!("name-{vm}"));
                    create.operation_id = Some("create".into());
                    let ops: Vec<PlanActionSpec> = ["START", "STOP", "DELETE"]
                        .iter()
                        .map(|op| {
                            let mut a = vm_action(op, &vm);
                            a.operation_id = Some(op.to_ascii_lowercase());
                            a
                        })
                        .collect();
                    let mut actions = vec![create];
                    actions.extend(ops);
                    let req: ApplyPlanRequest = plan_request(&unique("load"), actions);
                    match client.post(url).json(&req).send().await {
                        Ok(r) if r.status().is_success() => *p2.lock().unwrap() += 1,
                        Ok(r) => {
                            let st = r.status();
                            *e2.lock().unwrap() = format!("{st}: {}", r.text().await.unwrap_or_default());
                        }
                        Err(e) => *e2.lock().unwrap() = format!("{e:#}"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
        PlanLoad {
            stop,
            posted,
            last_error,
            handle,
        }
    }

    /// Plans posted so far, and the last refusal.
    fn progress(&self) -> String {
        format!(
            "{} plans posted; last error: {:?}",
            self.posted.lock().unwrap(),
            self.last_error.lock().unwrap()
        )
    }

    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.await;
        let n = *self.posted.lock().unwrap();
        n
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1. A good release goes lab -> pilot -> stable

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_release_goes_lab_pilot_stable() -> anyhow::Result<()> {
    let key = new_release_key();
    let (cp, _) = rollout_control_plane(&key, None).await?;
    let tmp = TempDir::new("nkudo-rollouts")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let b = build_release(tmp.path(), &ReleaseSpec::new(B), &key)?;
    publish_ok(&cp, &a, &[])?;
    publish_ok(&cp, &b, &[])?;
    let fleet = fleet(&cp, &a, &key, "good").await?;

    // The default analysis (every built-in trigger), short bakes.
    let policy = write_policy(
        tmp.path(),
        &three_stage_policy(B, "bake = \"4s\"\nreport_timeout = \"4m\"", &[], ""),
    )?;
    // The dry run selects one agent per stage and changes nothing.
    let out = rollout_output(&cp, &["plan", policy.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "plan: {}", output_text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let counts: Vec<i64> = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["agents"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(counts, vec![1, 1, 1], "{plan}");
    for m in &fleet.members {
        assert_eq!(admin_agent(&cp, &m.id).await?.desired_version, None);
    }

    let started = releaser_start(&cp, &policy)?;
    assert_eq!(started.version, B);
    assert_eq!(started.metrics_source, "builtin");
    let status = spawn_status_wait(&cp, &started.id);

    // Stage by stage: while lab is in progress, stable has not been pointed at B.
    let lab = fleet.member("lab");
    wait_agent(&cp, &lab.host, &lab.id, AGENT_DEADLINE, "lab on B", |x| {
        x.agent_version == B
    })
    .await?;
    let stable = admin_agent(&cp, &fleet.member("stable").id).await?;
    assert_eq!(stable.agent_version, A);

    let r = wait_final(&cp, &started.id, ROLLOUT_DEADLINE).await?;
    assert_eq!(r.state, RolloutState::Completed, "{}", describe(&r));
    for m in &fleet.members {
        let x = wait_agent(&cp, &m.host, &m.id, AGENT_DEADLINE, "on B", |x| x.agent_version == B).await?;
        assert_eq!(x.desired_version.as_deref(), Some(B));
        assert_eq!(m.host.current_version().as_deref(), Some(B), "{}", m.host.diagnostics());
    }
    // The stages ran in order: each started after the previous one completed.
    let ends: Vec<(String, Option<String>, Option<String>)> = r
        .stages
        .iter()
        .map(|s| (s.state.clone(), s.started_at.clone(), s.completed_at.clone()))
        .collect();
    for w in ends.windows(2) {
        let prev_done = w[0].2.clone().expect("completed_at");
        let next_start = w[1].1.clone().expect("started_at");
        assert!(prev_done <= next_start, "stages in order: {ends:?}");
    }
    assert!(r.stages.iter().all(|s| s.state == "done"), "{}", describe(&r));

    let (code, out) = status_wait_result(status, Duration::from_secs(60)).await?;
    assert_eq!(code, 0, "status --wait: {}", output_text(&out));
    let final_view: Rollout = serde_json::from_slice(&out.stdout)?;
    assert_eq!(final_view.state, RolloutState::Completed);

    let log = decisions(&cp, &started.id).await?;
    assert!(log.chain_ok, "the decision chain verifies: {:?}", log.decisions);
    let kinds: Vec<&str> = log.decisions.iter().map(|d| d.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert!(!kinds.contains(&"breach"), "{kinds:?}");
    // B is fine: not marked bad.
    assert_eq!(release_info(&cp, B).await?["bad"], false);

    // `releaser rollback --to A --ring stable`: only the stable agent goes back (a signed rollback target).
    let out = releaser_command()
        .args(["rollback", "--to", A, "--ring", "stable", "--output", "json"])
        .args(["--url", &cp.base_url, "--admin-key", &cp.admin_key])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path)
        .output()?;
    assert!(out.status.success(), "rollback: {}", output_text(&out));
    let resp: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(resp["agents"], 1, "{resp}");
    let stable = fleet.member("stable");
    wait_agent(&cp, &stable.host, &stable.id, AGENT_DEADLINE, "stable back on A", |x| {
        x.agent_version == A
    })
    .await?;
    for ring in ["lab", "pilot"] {
        assert_eq!(
            admin_agent(&cp, &fleet.member(ring).id).await?.agent_version,
            B,
            "{ring}"
        );
    }
    // Without a selection it refuses (exit 2) and changes nothing.
    let out = releaser_command()
        .args(["rollback", "--to", A])
        .args(["--url", &cp.base_url, "--admin-key", &cp.admin_key])
        .arg("--ca-cert")
        .arg(&cp.ca_bundle_path)
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 2. Plan failures: rolled back, stable untouched, B marked bad; builtin and Prometheus decide the same

/// What scenario 2 decided.
#[derive(Debug, PartialEq)]
struct Breach {
    stage: String,
    trigger: String,
}

async fn plan_failures_roll_back(with_prometheus: bool) -> anyhow::Result<Breach> {
    let key = new_release_key();
    let tag = if with_prometheus { "prom" } else { "builtin" };
    let (prom_port, prom_url) = if with_prometheus {
        let p = free_port()?;
        (Some(p), Some(format!("http://127.0.0.1:{p}")))
    } else {
        (None, None)
    };
    let (cp, cp_port) = rollout_control_plane(&key, prom_url.as_deref()).await?;
    let prometheus = match prom_port {
        Some(p) => {
            let prom = Prometheus::start(p, &format!("127.0.0.1:{cp_port}"), &cp.ca_bundle_path).await?;
            prom.wait_target_up(Duration::from_secs(60)).await?;
            Some(prom)
        }
        None => None,
    };
    let tmp = TempDir::new("nkudo-rollouts")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    // B: the real agent, but the VMM stand-in it starts fails every boot.
    let b = build_release_with_env(tmp.path(), B, &[("MOCK_CH_FAIL_BOOT", "1")], &key)?;
    publish_ok(&cp, &a, &[])?;
    publish_ok(&cp, &b, &[])?;
    let fleet = fleet(&cp, &a, &key, tag).await?;
    let stable = fleet.member("stable");
    let sentinel = Sentinel::start(&cp, &[&stable.id]);

    // Plans everywhere (the control group on A succeeds).
    let load = PlanLoad::start(&cp, &fleet, Duration::from_secs(2));
    // Plans succeed on A before anything changes.
    let lab_fx = fleet.fixture(fleet.member("lab"));
    poll_until(
        Duration::from_secs(60),
        "a plan SUCCEEDED on the lab agent (A)",
        || async {
            let ex = site_executions(&cp, &lab_fx).await?;
            if ex.iter().any(|e| e.state == "SUCCEEDED" && e.operation_id == "delete") {
                return Ok(Some(()));
            }
            let states: Vec<String> = ex.iter().map(|e| format!("{}={}", e.operation_id, e.state)).collect();
            anyhow::bail!("{}; executions: {states:?}", load.progress())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", fleet.member("lab").host.edge.log_tail(3000)))?;

    let policy = write_policy(
        tmp.path(),
        &three_stage_policy(
            B,
            "bake = \"90s\"\nreport_timeout = \"4m\"\nanalysis = [\"plan-failure-rate\"]",
            &[],
            "\n[[trigger]]\nname = \"plan-failure-rate\"\nmin_samples = 3\ninterval = \"2s\"\nwindow = \"1m\"\nfailure_limit = 1\n",
        ),
    )?;
    let started = releaser_start(&cp, &policy)?;
    assert_eq!(
        started.metrics_source,
        if with_prometheus { "prometheus" } else { "builtin" }
    );
    let status = spawn_status_wait(&cp, &started.id);

    let r = wait_final(&cp, &started.id, ROLLOUT_DEADLINE).await?;
    let seen_final = Utc::now();
    assert_eq!(r.state, RolloutState::RolledBack, "{}", describe(&r));
    let log = decisions(&cp, &started.id).await?;
    assert!(log.chain_ok, "{:?}", log.decisions);
    let breach: RolloutDecision = log
        .decisions
        .iter()
        .find(|d| d.kind == "breach")
        .cloned()
        .unwrap_or_else(|| panic!("no breach decision: {}", describe(&r)));
    let stage = breach.stage.clone().unwrap_or_default();
    let trigger = breach.trigger.clone().unwrap_or_default();
    assert_eq!(trigger, "plan-failure-rate", "{breach:?}");
    let value = breach.values["value"].as_f64();
    assert!(
        value.is_some_and(|v| v > 0.05),
        "the value seen is recorded: {breach:?}"
    );
    assert_eq!(breach.values["threshold"].as_f64(), Some(0.05), "{breach:?}");
    // The query as sent: PromQL to Prometheus, the builtin statistics otherwise.
    let query = breach.query.clone().unwrap_or_default();
    if with_prometheus {
        assert!(
            query.contains("nkudo_plan_executions_total") && query.contains(B),
            "{breach:?}"
        );
    } else {
        assert!(query.starts_with("builtin:"), "{breach:?}");
    }
    assert!(
        stage == "lab" || stage == "pilot",
        "rolled back after lab or pilot: {breach:?}"
    );

    // Every touched agent (the stages up to the one that breached) goes back to A; measure how fast.
    let breach_at: DateTime<Utc> = DateTime::parse_from_rfc3339(&breach.at)?.with_timezone(&Utc);
    let upto = RINGS.iter().position(|r| *r == stage).unwrap();
    let touched: Vec<&Member> = fleet.members.iter().take(upto + 1).collect();
    let mut back_at: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let deadline = Instant::now() + AGENT_DEADLINE;
    while back_at.len() < touched.len() {
        let agents = admin_agents(&cp).await?;
        for m in &touched {
            if back_at.contains_key(&m.id) {
                continue;
            }
            if let Some(x) = agents.iter().find(|x| x.id == m.id) {
                if x.agent_version == A {
                    back_at.insert(m.id.clone(), Utc::now());
                }
            }
        }
        if Instant::now() > deadline {
            let diags: Vec<String> = touched.iter().map(|m| m.host.diagnostics()).collect();
            anyhow::bail!("touched agents not back on {A}: {back_at:?}\n{}", diags.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slowest = back_at.values().max().copied().unwrap();
    let took = (slowest - breach_at).to_std().unwrap_or_default();
    eprintln!(
        "ROLLBACK TIMING ({tag}): breach decided at {} in stage {stage} by {trigger} (value {value:?}, reference {}), \
         every touched agent ({}) reported {A} again {:.2} s later (target: < 2 heartbeats + 1 analysis interval = \
         2 x 1 s + 2 s = 4 s; seen final {:.2} s after the decision)",
        breach.at,
        breach.values["reference"],
        touched.len(),
        took.as_secs_f64(),
        (seen_final - breach_at).to_std().unwrap_or_default().as_secs_f64(),
    );
    assert!(took < Duration::from_secs(45), "rollback took {took:?}");
    for m in &touched {
        let x = admin_agent(&cp, &m.id).await?;
        assert_eq!(x.desired_version.as_deref(), Some(A), "{} sent back", m.ring);
        assert_eq!(m.host.current_version().as_deref(), Some(A), "{}", m.host.diagnostics());
    }
    let posted = load.stop().await;
    eprintln!("({tag}: {posted} plans posted)");

    // Stable was never touched: always A, never a desired version.
    sentinel.assert_untouched(A, &[]).await?;
    let s = admin_agent(&cp, &stable.id).await?;
    assert_eq!(s.agent_version, A);
    assert_eq!(s.desired_version, None);
    assert_eq!(stable.host.installed_versions(), vec![A.to_string()]);

    // B is marked bad fleet-wide and refused as a desired version.
    let info = release_info(&cp, B).await?;
    assert_eq!(info["bad"], true, "{info}");
    let resp = set_desired(&cp, DesiredScope::Site, Some(&stable.site.id), B, false).await?;
    expect_error(resp, StatusCode::CONFLICT, "VERSION_MARKED_BAD").await;
    // And a new rollout of it is refused.
    let resp = admin(&cp)
        .post(cp.url("/admin/rollouts"))
        .json(&StartRolloutRequest {
            policy: std::fs::read_to_string(&policy)?,
        })
        .send()
        .await?;
    expect_error(resp, StatusCode::CONFLICT, "VERSION_MARKED_BAD").await;

    let (code, out) = status_wait_result(status, Duration::from_secs(60)).await?;
    assert_eq!(code, 3, "status --wait exits 3 on a rollback: {}", output_text(&out));

    // An operator clears the mark (`releaser rollout clear-bad`): the version may be desired again.
    let out = rollout_output(&cp, &["clear-bad", B]);
    assert!(
        out.status.success(),
        "releaser rollout clear-bad: {}",
        output_text(&out)
    );
    assert_eq!(release_info(&cp, B).await?["bad"], false);
    let out = rollout_output(&cp, &["clear-bad", "9.9.9"]);
    assert_eq!(out.status.code(), Some(1), "an unknown release: {}", output_text(&out));
    if let Some(p) = &prometheus {
        // The control plane's series are in Prometheus.
        let q = format!("sum(nkudo_plan_executions_total{{agent_version=\"{B}\",result=\"failed\"}})");
        let v = p.query(&q).await?;
        assert!(v.is_some_and(|v| v > 0.0), "{q} = {v:?}");
        // The decisions are exported as metrics, and scraped.
        let q = "sum(nkudo_rollout_decisions_total{kind=\"breach\"})";
        poll_until(Duration::from_secs(20), q, || async {
            Ok(p.query(q).await?.filter(|v| *v >= 1.0))
        })
        .await?;
    }
    Ok(Breach { stage, trigger })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_failures_roll_back_builtin() -> anyhow::Result<()> {
    let b = plan_failures_roll_back(false).await?;
    eprintln!("builtin decision: {b:?}");
    assert_eq!(
        b,
        Breach {
            stage: "lab".into(),
            trigger: "plan-failure-rate".into()
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_failures_roll_back_prometheus() -> anyhow::Result<()> {
    // Like Postgres: skipped (loudly) when Prometheus is not installed, unless CI=true.
    if !Prometheus::available() && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!(
            "SKIPPED: /usr/bin/prometheus is not installed (apt-get install prometheus; `cargo xtask test` does it)"
        );
        return Ok(());
    }
    let b = plan_failures_roll_back(true).await?;
    eprintln!("prometheus decision: {b:?}");
    // The same decision as the builtin source on the same scenario.
    assert_eq!(
        b,
        Breach {
            stage: "lab".into(),
            trigger: "plan-failure-rate".into()
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 3. A crash-looping release stops in lab

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_release_stops_in_lab() -> anyhow::Result<()> {
    let key = new_release_key();
    let (cp, _) = rollout_control_plane(&key, None).await?;
    let tmp = TempDir::new("nkudo-rollouts")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let b = build_release(tmp.path(), &ReleaseSpec::new(B).payload(Payload::CrashesAfter(3)), &key)?;
    publish_ok(&cp, &a, &[])?;
    publish_ok(&cp, &b, &[])?;
    let fleet = fleet(&cp, &a, &key, "crash").await?;
    let others: Vec<&str> = ["pilot", "stable"]
        .iter()
        .map(|r| fleet.member(r).id.as_str())
        .collect();
    let sentinel = Sentinel::start(&cp, &others);

    let policy = write_policy(
        tmp.path(),
        &three_stage_policy(B, "bake = \"60s\"\nreport_timeout = \"2m\"", &[], ""),
    )?;
    let started = releaser_start(&cp, &policy)?;
    let status = spawn_status_wait(&cp, &started.id);
    let r = wait_final(&cp, &started.id, ROLLOUT_DEADLINE).await?;
    assert_eq!(r.state, RolloutState::RolledBack, "{}", describe(&r));
    let log = decisions(&cp, &started.id).await?;
    assert!(log.chain_ok);
    let stop = log
        .decisions
        .iter()
        .find(|d| d.kind == "breach" || d.kind == "report-timeout")
        .unwrap_or_else(|| panic!("no breach: {}", describe(&r)));
    assert_eq!(stop.stage.as_deref(), Some("lab"), "{stop:?}");
    if stop.kind == "breach" {
        let t = stop.trigger.as_deref().unwrap_or("");
        assert!(t == "upgrade-rollbacks" || t == "crash-loops", "{stop:?}");
    }
    eprintln!(
        "crash loop: stopped by {} {:?} values {}",
        stop.kind, stop.trigger, stop.values
    );
    assert!(r.stages[1..].iter().all(|s| s.switched == 0), "{}", describe(&r));

    let lab = fleet.member("lab");
    wait_agent(&cp, &lab.host, &lab.id, AGENT_DEADLINE, "lab back on A", |x| {
        x.agent_version == A
    })
    .await?;
    assert_eq!(
        lab.host.current_version().as_deref(),
        Some(A),
        "{}",
        lab.host.diagnostics()
    );
    let (code, out) = status_wait_result(status, Duration::from_secs(60)).await?;
    assert_eq!(code, 3, "{}", output_text(&out));
    // A few more heartbeats: pilot and stable stay untouched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sentinel.assert_untouched(A, &[]).await?;
    for ring in ["pilot", "stable"] {
        let m = fleet.member(ring);
        assert_eq!(m.host.installed_versions(), vec![A.to_string()], "{ring}");
    }
    assert_eq!(release_info(&cp, B).await?["bad"], true);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 4. The control plane restarted mid-rollout resumes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restarted_mid_rollout_resumes() -> anyhow::Result<()> {
    let key = new_release_key();
    let (mut cp, port) = rollout_control_plane(&key, None).await?;
    let tmp = TempDir::new("nkudo-rollouts")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let b = build_release(tmp.path(), &ReleaseSpec::new(B), &key)?;
    publish_ok(&cp, &a, &[])?;
    publish_ok(&cp, &b, &[])?;
    let fleet = fleet(&cp, &a, &key, "restart").await?;
    let policy = write_policy(
        tmp.path(),
        &three_stage_policy(B, "bake = \"8s\"\nreport_timeout = \"4m\"", &[], ""),
    )?;
    let started = releaser_start(&cp, &policy)?;
    // status --wait follows it across the restart.
    let status = spawn_status_wait(&cp, &started.id);

    // Once lab is done and pilot is in progress, stop the control plane (SIGTERM), leave it down a few seconds
    // and start it again on the same port and database.
    let before = wait_rollout(&cp, &started.id, ROLLOUT_DEADLINE, "the pilot stage in progress", |r| {
        r.current_stage == Some(1) && r.stages[1].state != "pending"
    })
    .await?;
    eprintln!("restarting the control plane at: {}", describe(&before));
    cp.stop().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.restart().await?;
    assert_eq!(cp.base_url, format!("https://127.0.0.1:{port}"));
    let after = get_rollout(&cp, &started.id).await?;
    assert!(
        after.current_stage >= Some(1),
        "resumed where it stopped: {}",
        describe(&after)
    );
    assert_eq!(after.stages[0].state, "done", "{}", describe(&after));

    let r = wait_final(&cp, &started.id, ROLLOUT_DEADLINE).await?;
    assert_eq!(r.state, RolloutState::Completed, "{}", describe(&r));
    for m in &fleet.members {
        wait_agent(&cp, &m.host, &m.id, AGENT_DEADLINE, "on B", |x| x.agent_version == B).await?;
    }
    let log = decisions(&cp, &started.id).await?;
    assert!(log.chain_ok, "{:?}", log.decisions);
    // Each stage started and switched its agents once (nothing redone after the restart), then completed.
    for kind in ["stage-started", "agents-switched", "stage-done"] {
        let stages: Vec<Option<String>> = log
            .decisions
            .iter()
            .filter(|d| d.kind == kind)
            .map(|d| d.stage.clone())
            .collect();
        let want: Vec<Option<String>> = RINGS.iter().map(|r| Some(r.to_string())).collect();
        assert_eq!(stages, want, "{kind} once per stage, in order: {:?}", log.decisions);
    }
    assert_eq!(log.decisions.last().map(|d| d.kind.as_str()), Some("completed"));
    let (code, out) = status_wait_result(status, Duration::from_secs(90)).await?;
    assert_eq!(code, 0, "status --wait across the restart: {}", output_text(&out));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 5. pause, resume, approve, abort

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_approve_and_abort() -> anyhow::Result<()> {
    let key = new_release_key();
    let (cp, _) = rollout_control_plane(&key, None).await?;
    let tmp = TempDir::new("nkudo-rollouts")?;
    let a = build_release(tmp.path(), &ReleaseSpec::new(A), &key)?;
    let b = build_release(tmp.path(), &ReleaseSpec::new(B), &key)?;
    publish_ok(&cp, &a, &[])?;
    publish_ok(&cp, &b, &[])?;
    let fleet = fleet(&cp, &a, &key, "gate").await?;
    let (lab, pilot, stable) = (fleet.member("lab"), fleet.member("pilot"), fleet.member("stable"));
    let sentinel = Sentinel::start(&cp, &[&stable.id]);
    let policy = write_policy(
        tmp.path(),
        &three_stage_policy(
            B,
            "bake = \"3s\"\nreport_timeout = \"4m\"",
            &[("pilot", "manual_gate = true\nbake = \"10m\"")],
            "",
        ),
    )?;
    let started = releaser_start(&cp, &policy)?;
    let id = started.id.clone();
    // Pause at once: nothing is switched while paused.
    let out = rollout_output(&cp, &["pause", &id, "--output", "json"]);
    assert!(out.status.success(), "pause: {}", output_text(&out));
    let paused: Rollout = serde_json::from_slice(&out.stdout)?;
    assert_eq!(paused.state, RolloutState::Paused);
    // Pausing twice is refused.
    let out = rollout_output(&cp, &["pause", &id]);
    assert!(!out.status.success(), "second pause: {}", output_text(&out));
    let status = spawn_status_wait(&cp, &id);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = get_rollout(&cp, &id).await?;
    assert_eq!(r.state, RolloutState::Paused, "{}", describe(&r));
    // The controller may have switched lab in the moment before the pause; beyond that nothing moves.
    let lab_switched_while_paused = admin_agent(&cp, &lab.id).await?.desired_version.as_deref() == Some(B);
    assert_eq!(admin_agent(&cp, &pilot.id).await?.desired_version, None);
    eprintln!("lab switched before the pause took effect: {lab_switched_while_paused}");
    // approve is refused when not at a gate.
    let out = rollout_output(&cp, &["approve", &id]);
    assert!(!out.status.success(), "approve while paused: {}", output_text(&out));

    // Resume: lab moves to B and bakes, then the rollout waits at pilot's gate.
    let out = rollout_output(&cp, &["resume", &id, "--output", "json"]);
    assert!(out.status.success(), "resume: {}", output_text(&out));
    let resumed: Rollout = serde_json::from_slice(&out.stdout)?;
    assert_eq!(resumed.state, RolloutState::Running);
    wait_agent(&cp, &lab.host, &lab.id, AGENT_DEADLINE, "lab on B", |x| {
        x.agent_version == B
    })
    .await?;
    let r = wait_rollout(&cp, &id, AGENT_DEADLINE, "waiting for approval at pilot", |r| {
        r.state == RolloutState::WaitingApproval
    })
    .await?;
    assert_eq!(r.current_stage, Some(1), "{}", describe(&r));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = get_rollout(&cp, &id).await?;
    assert_eq!(
        r.state,
        RolloutState::WaitingApproval,
        "the gate holds: {}",
        describe(&r)
    );
    let p = admin_agent(&cp, &pilot.id).await?;
    assert_eq!(p.desired_version, None, "pilot waits for the approval");
    assert_eq!(p.agent_version, A);

    // Approve: pilot moves to B.
    let out = rollout_output(&cp, &["approve", &id, "--output", "json"]);
    assert!(out.status.success(), "approve: {}", output_text(&out));
    wait_agent(&cp, &pilot.host, &pilot.id, AGENT_DEADLINE, "pilot on B", |x| {
        x.agent_version == B
    })
    .await?;
    let r = get_rollout(&cp, &id).await?;
    assert_eq!(r.state, RolloutState::Running, "{}", describe(&r));
    assert_eq!(r.current_stage, Some(1), "pilot bakes 10 minutes: {}", describe(&r));

    // Abort: both touched agents go back to A; B is not marked bad; stable never touched.
    let out = rollout_output(&cp, &["abort", &id]);
    assert!(
        !out.status.success(),
        "abort without --yes and without a terminal is refused: {}",
        output_text(&out)
    );
    let out = rollout_output(&cp, &["abort", &id, "--yes", "--output", "json"]);
    assert!(out.status.success(), "abort: {}", output_text(&out));
    let aborted: Rollout = serde_json::from_slice(&out.stdout)?;
    assert_eq!(aborted.state, RolloutState::Aborted, "{}", describe(&aborted));
    for m in [lab, pilot] {
        let x = wait_agent(&cp, &m.host, &m.id, AGENT_DEADLINE, "back on A", |x| {
            x.agent_version == A
        })
        .await?;
        assert_eq!(x.desired_version.as_deref(), Some(A));
        assert_eq!(m.host.current_version().as_deref(), Some(A), "{}", m.host.diagnostics());
    }
    let (code, out) = status_wait_result(status, Duration::from_secs(60)).await?;
    assert_eq!(code, 4, "status --wait exits 4 on an abort: {}", output_text(&out));
    let info = release_info(&cp, B).await?;
    assert_eq!(info["bad"], false, "an abort does not mark the release bad: {info}");
    sentinel.assert_untouched(A, &[]).await?;
    let log = decisions(&cp, &id).await?;
    assert!(log.chain_ok);
    let kinds: Vec<&str> = log.decisions.iter().map(|d| d.kind.as_str()).collect();
    for k in ["started", "aborted"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    // Final: further actions are refused.
    let out = rollout_output(&cp, &["resume", &id]);
    assert!(!out.status.success(), "resume after abort: {}", output_text(&out));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 6. A pre-release aimed at a production stage is refused

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prerelease_aimed_at_production_is_refused() -> anyhow::Result<()> {
    let key = new_release_key();
    let (cp, _) = rollout_control_plane(&key, None).await?;
    let fx = bootstrap(&cp).await?;
    let tmp = TempDir::new("nkudo-rollouts")?;
    let pre_version = "0.1.9-pre.3+abc1234";
    let pre = build_release(tmp.path(), &ReleaseSpec::new(pre_version), &key)?;
    assert_eq!(pre.channel, "pre-release");
    publish_ok(&cp, &pre, &[])?;
    // A production agent in the stable ring (enrolled over the API: the rule is about who the version reaches).
    let prod = enroll_agent(&cp, &fx, "edge-prod").await?;
    let r = set_site_labels(&cp, fx.site_id(), &[("environment", "production"), ("ring", "stable")]).await?;
    assert!(r.status().is_success(), "labels: {}", r.text().await?);
    let policy_text =
        format!("version = \"{pre_version}\"\n\n[[stage]]\nname = \"canary\"\nrings = [\"stable\"]\nbake = \"5s\"\n");
    let policy = write_policy(tmp.path(), &policy_text)?;

    let out = rollout_output(&cp, &["start", policy.to_str().unwrap(), "--yes"]);
    assert_eq!(out.status.code(), Some(1), "start is refused: {}", output_text(&out));
    assert!(
        output_text(&out).contains("PRERELEASE_IN_PRODUCTION"),
        "the code is printed: {}",
        output_text(&out)
    );
    let resp = admin(&cp)
        .post(cp.url("/admin/rollouts"))
        .json(&StartRolloutRequest {
            policy: policy_text.clone(),
        })
        .send()
        .await?;
    let body = expect_error(resp, StatusCode::CONFLICT, "PRERELEASE_IN_PRODUCTION").await;
    assert!(!body.error.is_empty());
    // Nothing was started, nothing changed.
    let r = admin(&cp).get(cp.url("/admin/rollouts")).send().await?;
    let list: serde_json::Value = expect_json(r, StatusCode::OK, "GET /admin/rollouts").await?;
    assert_eq!(list["rollouts"].as_array().map(|a| a.len()), Some(0), "{list}");
    assert_eq!(admin_agent(&cp, prod.agent_id()).await?.desired_version, None);
    // The dry run says why.
    let out = rollout_output(&cp, &["plan", policy.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "plan: {}", output_text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        plan["warnings"].to_string().to_lowercase().contains("pre-release")
            || plan["warnings"].to_string().contains("PRERELEASE"),
        "{plan}"
    );

    // The same pre-release to a stage of test agents is accepted.
    let r = set_site_labels(&cp, fx.site_id(), &[("environment", "test"), ("ring", "stable")]).await?;
    assert!(r.status().is_success());
    let started = releaser_start(&cp, &policy)?;
    assert_eq!(started.version, pre_version);
    let out = rollout_output(&cp, &["abort", &started.id, "--yes"]);
    assert!(out.status.success(), "abort: {}", output_text(&out));
    Ok(())
}
