//! The rollout controller across two control-plane replicas (ARCHITECTURE §4.6, §6): two real
//! `nkudo-control-plane` processes on one Postgres database and one PKI, the controller ticking every 250 ms (its
//! lease TTL is then the 5 s floor), a simulated fleet of six agents (two per ring `lab`, `pilot`, `stable`) that
//! heartbeat to both replicas alternately, take the desired version a replica answers with when it is newer and
//! report it at the next heartbeat. Releases are tiny signed test releases (the agents never download them).
//!
//! One scenario, four phases on the same pair (Postgres only; on SQLite the skip line is printed):
//! 1. Both replicas up: a three-stage rollout completes; the `controller_leases` row names one holder throughout
//!    (one of the two processes); each stage starts, bakes and finishes exactly once in the decision log, every
//!    agent is switched in exactly one decision and switches exactly once; the hash chain verifies (the route and
//!    the stored rows); only the holder's `nkudo_rollout_decisions_total` counts controller decisions.
//! 2. Failover: the holder is killed with SIGKILL just after switching stage `pilot` (its lease is not released);
//!    the other replica takes the lease once the TTL has run out (not before) and finishes the rollout without
//!    repeating a stage or switching an agent twice. The takeover (kill → the survivor holds the lease, and kill →
//!    its first decision) is printed and bounded by the TTL plus a margin.
//! 3. Graceful: the killed replica is started again; a new rollout runs; the holder gets SIGTERM just after
//!    switching `pilot`; it gives the lease up on its way out and the other replica takes over at once (well
//!    under the TTL) and completes the rollout.
//! 4. Frozen holder: the replica is started again; a new rollout runs; the holder is frozen with SIGSTOP (a long
//!    GC pause, a suspended VM) just after switching `pilot`; the other replica takes the lease after the TTL;
//!    the frozen one is thawed (SIGCONT) after the takeover and never takes the lease back nor adds a decision:
//!    the log still has every transition exactly once.
//!
//! Proof that these assertions bite: with the lease ignored (`acquire` always true) phase 1 fails (the
//! replicas share the decisions); without the release on shutdown phase 3 fails (takeover after the TTL).

use nkudo_core::api::{Rollout, RolloutDecision, RolloutState, StartRolloutRequest};
use nkudo_tests::releases::*;
use nkudo_tests::*;
use reqwest::StatusCode;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the simulated agents run before the first rollout, and the releases rolled out one after the other.
const A: &str = "0.1.1";
const B: &str = "0.1.2";
const C: &str = "0.1.3";
const D: &str = "0.1.4";
const E: &str = "0.1.5";
const RINGS: [&str; 3] = ["lab", "pilot", "stable"];
const AGENTS_PER_RING: usize = 2;
const TICK: &str = "250ms";
const TICK_MS: i64 = 250;
/// The controller's lease TTL for this tick: `max(5 × ROLLOUT_TICK, 5 s)` (controller.rs).
const TTL_MS: i64 = 5_000;
/// Slack over the TTL for a takeover after a crash: the survivor's next tick, one cycle, a loaded 2-core machine.
const TAKEOVER_MARGIN_MS: i64 = 2_500;
/// A graceful handover must be this much faster than the TTL.
const GRACEFUL_MAX_MS: i64 = 2_000;
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(40);
const HEARTBEAT_EVERY: Duration = Duration::from_millis(150);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

// ---------------------------------------------------------------------------------------------------------
// The simulated fleet

#[derive(Debug, Default, Clone)]
struct SimState {
    version: String,
    /// Every version change the agent made: (from, to).
    switches: Vec<(String, String)>,
    /// Heartbeats answered by replica 0 and 1.
    served: [u64; 2],
    /// Failed heartbeats (a replica down).
    errors: u64,
    /// Desired versions older than the running one that a replica answered with (never taken).
    stale: BTreeSet<String>,
}

struct SimAgent {
    id: String,
    ring: &'static str,
    state: Arc<Mutex<SimState>>,
}

struct SimFleet {
    agents: Vec<SimAgent>,
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl SimFleet {
    /// Enrolls `AGENTS_PER_RING` agents per ring (one site per ring, labelled `ring=<ring>`) through alternate
    /// replicas, and starts their heartbeat loops against both.
    async fn start(cps: [&ControlPlane; 2]) -> anyhow::Result<SimFleet> {
        let fx = bootstrap(cps[0]).await?;
        let urls: Vec<String> = cps.iter().map(|cp| cp.url("/v1/heartbeat")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut agents = Vec::new();
        let mut handles = Vec::new();
        for (ri, ring) in RINGS.into_iter().enumerate() {
            let site = create_site(cps[0], &fx.api_key, fx.tenant_id(), &format!("{ring}-{}", unique("s"))).await?;
            let r = set_site_labels(cps[0], &site.id, &[("ring", ring), ("environment", "test")]).await?;
            anyhow::ensure!(r.status().is_success(), "labels: {}", r.text().await?);
            let sfx = Fixture { site, ..fx.clone() };
            for i in 0..AGENTS_PER_RING {
                let cp = cps[(ri + i) % 2];
                let enrolled = enroll_agent(cp, &sfx, &format!("edge-{ring}-{i}")).await?;
                // One client for both replicas: they share the CA, so either one's bundle trusts both.
                let client = enrolled.client(cps[0]);
                let id = enrolled.agent_id().to_string();
                let state = Arc::new(Mutex::new(SimState {
                    version: A.into(),
                    ..Default::default()
                }));
                let (st, stop2, urls2, id2) = (state.clone(), stop.clone(), urls.clone(), id.clone());
                // Agents start on different replicas so both serve every moment.
                let first = (ri * AGENTS_PER_RING + i) % 2;
                handles.push(tokio::spawn(async move {
                    let mut n = first;
                    while !stop2.load(Ordering::SeqCst) {
                        let which = n % 2;
                        n += 1;
                        let version = st.lock().unwrap().version.clone();
                        let body = serde_json::json!({"agent_id": id2, "agent_version": version});
                        let answer = client.post(&urls2[which]).json(&body).send().await;
                        match answer {
                            Ok(r) if r.status() == StatusCode::OK => {
                                let v: serde_json::Value = r.json().await.unwrap_or_default();
                                let mut g = st.lock().unwrap();
                                g.served[which] += 1;
                                if let Some(d) = v["desired_version"].as_str() {
                                    take_desired(&mut g, d);
                                }
                            }
                            _ => st.lock().unwrap().errors += 1,
                        }
                        tokio::time::sleep(HEARTBEAT_EVERY).await;
                    }
                }));
                agents.push(SimAgent { id, ring, state });
            }
        }
        Ok(SimFleet { agents, stop, handles })
    }

    fn snapshot(&self) -> BTreeMap<String, SimState> {
        self.agents
            .iter()
            .map(|a| (format!("{}/{}", a.ring, a.id), a.state.lock().unwrap().clone()))
            .collect()
    }

    fn ids(&self) -> BTreeSet<String> {
        self.agents.iter().map(|a| a.id.clone()).collect()
    }

    async fn wait_all_on(&self, version: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.agents.iter().all(|a| a.state.lock().unwrap().version == version) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "agents not all on {version} after {timeout:?}: {:#?}",
                self.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// What a real agent does with a desired version: takes a newer one, refuses an older one (no rollback target).
fn take_desired(s: &mut SimState, desired: &str) {
    let (Ok(d), Ok(cur)) = (
        nkudo_core::version::parse(desired),
        nkudo_core::version::parse(&s.version),
    ) else {
        return;
    };
    if d > cur {
        let from = std::mem::replace(&mut s.version, desired.to_string());
        s.switches.push((from, desired.to_string()));
    } else if d < cur {
        s.stale.insert(desired.to_string());
    }
}

// ---------------------------------------------------------------------------------------------------------
// The lease row, watched from the side

#[derive(Debug, Clone)]
struct LeaseSample {
    at_ms: i64,
    holder: Option<String>,
}

/// Samples `controller_leases` every 50 ms over its own connection.
struct LeaseWatch {
    samples: Arc<Mutex<Vec<LeaseSample>>>,
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LeaseWatch {
    async fn start(cp: &ControlPlane) -> anyhow::Result<LeaseWatch> {
        let mut conn = connect_db(cp.db(), &cp.data_dir).await?;
        let samples: Arc<Mutex<Vec<LeaseSample>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (samples.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            while !st2.load(Ordering::SeqCst) {
                let holder = current_holder(&mut conn).await?;
                s2.lock().unwrap().push(LeaseSample {
                    at_ms: now_ms(),
                    holder,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        });
        Ok(LeaseWatch { samples, stop, handle })
    }

    /// The samples taken at or after `since_ms`.
    fn since(&self, since_ms: i64) -> Vec<LeaseSample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.at_ms >= since_ms)
            .cloned()
            .collect()
    }

    /// The first time at or after `since_ms` the row named a holder of process `pid`.
    fn first_held_by(&self, pid: u32, since_ms: i64) -> Option<i64> {
        self.since(since_ms)
            .into_iter()
            .find(|s| s.holder.as_deref().and_then(holder_pid) == Some(pid))
            .map(|s| s.at_ms)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await?
    }
}

async fn current_holder(conn: &mut sqlx::AnyConnection) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar::<_, String>("SELECT holder FROM controller_leases WHERE name = 'rollout-controller'")
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// The process id in a holder id (`<pid>-<random>`).
fn holder_pid(holder: &str) -> Option<u32> {
    holder.split('-').next()?.parse().ok()
}

fn pids(cps: &[ControlPlane; 2]) -> [u32; 2] {
    [
        cps[0].pid().expect("replica 0 runs"),
        cps[1].pid().expect("replica 1 runs"),
    ]
}

/// `kill <sig> <pid>`.
fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    anyhow::ensure!(st.success(), "kill {sig} {pid}: {st}");
    Ok(())
}

/// Waits until the lease row names one of the replicas; returns its index.
async fn wait_holder(conn: &mut sqlx::AnyConnection, pids: [u32; 2]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(h) = current_holder(conn).await? {
            if let Some(i) = pids.iter().position(|p| holder_pid(&h) == Some(*p)) {
                return Ok(i);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no replica holds the rollout lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rollouts and their decision log

fn policy(version: &str) -> String {
    let mut s = format!(
        "version = \"{version}\"\nname = \"{version} across replicas (test)\"\n\n[defaults]\nbake = \"1s\"\n\
         report_timeout = \"2m\"\n"
    );
    for ring in RINGS {
        s.push_str(&format!("\n[[stage]]\nname = \"{ring}\"\nrings = [\"{ring}\"]\n"));
    }
    s
}

async fn start_rollout(cp: &ControlPlane, version: &str) -> anyhow::Result<Rollout> {
    let r = admin(cp)
        .post(cp.url("/admin/rollouts"))
        .json(&StartRolloutRequest {
            policy: policy(version),
        })
        .send()
        .await?;
    expect_json(r, StatusCode::CREATED, "POST /admin/rollouts").await
}

fn show(log: &[RolloutDecision]) -> String {
    log.iter()
        .map(|d| format!("#{} {} {} {:?} {}", d.seq, d.at, d.kind, d.stage, d.action))
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn at_ms(d: &RolloutDecision) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&d.at)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

/// Polls the decision log on `cp` until `pred` holds.
async fn wait_decisions<F>(cp: &ControlPlane, id: &str, what: &str, pred: F) -> anyhow::Result<Vec<RolloutDecision>>
where
    F: Fn(&[RolloutDecision]) -> bool,
{
    let deadline = Instant::now() + ROLLOUT_DEADLINE;
    loop {
        let log = decisions(cp, id).await?.decisions;
        if pred(&log) {
            return Ok(log);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n  {}",
            show(&log)
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn wait_completed(cp: &ControlPlane, id: &str) -> anyhow::Result<Rollout> {
    let deadline = Instant::now() + ROLLOUT_DEADLINE;
    loop {
        let r = get_rollout(cp, id).await?;
        if r.state.is_final() {
            anyhow::ensure!(
                r.state == RolloutState::Completed,
                "rollout {id} ended {}:\n  {}",
                r.state.as_str(),
                show(&decisions(cp, id).await?.decisions)
            );
            return Ok(r);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rollout {id} not completed after {ROLLOUT_DEADLINE:?}:\n  {}",
            show(&decisions(cp, id).await?.decisions)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn switched_pilot(log: &[RolloutDecision]) -> bool {
    log.iter()
        .any(|d| d.kind == "agents-switched" && d.stage.as_deref() == Some("pilot"))
}

/// Every stage transition exactly once and in order, every member switched in exactly one decision, the chain
/// verifies (the route's verdict and the stored rows' links).
async fn check_log(
    cp: &ControlPlane,
    conn: &mut sqlx::AnyConnection,
    id: &str,
    agents: &BTreeSet<String>,
) -> anyhow::Result<Vec<RolloutDecision>> {
    let resp = decisions(cp, id).await?;
    let log = resp.decisions;
    let text = show(&log);
    anyhow::ensure!(resp.chain_ok, "the decision chain must verify:\n  {text}");
    let mut expected = vec![("started".to_string(), None)];
    for ring in RINGS {
        for kind in ["stage-started", "agents-switched", "stage-baking", "stage-done"] {
            expected.push((kind.to_string(), Some(ring.to_string())));
        }
    }
    expected.push(("completed".into(), None));
    let got: Vec<(String, Option<String>)> = log.iter().map(|d| (d.kind.clone(), d.stage.clone())).collect();
    assert_eq!(
        got, expected,
        "each stage transition exactly once, in order (one batch per stage: no blast-radius cap):\n  {text}"
    );
    let mut switched: BTreeMap<String, usize> = BTreeMap::new();
    for d in log.iter().filter(|d| d.kind == "agents-switched") {
        for a in d.values["agents"].as_array().into_iter().flatten() {
            *switched.entry(a.as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        switched.keys().cloned().collect::<BTreeSet<_>>(),
        *agents,
        "every agent switched:\n  {text}"
    );
    assert!(
        switched.values().all(|n| *n == 1),
        "no agent switched twice: {switched:?}"
    );
    // The stored chain, link by link: seq 1..n, each prev_hash the hash before it.
    let rows = sqlx::query("SELECT seq, prev_hash, hash FROM rollout_decisions WHERE rollout_id = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
    let mut prev = "0".repeat(64);
    for (i, r) in rows.iter().enumerate() {
        let seq: i64 = r.try_get(0)?;
        let p: String = r.try_get(1)?;
        let h: String = r.try_get(2)?;
        assert_eq!(seq, i as i64 + 1, "stored sequence without gaps");
        assert_eq!(p, prev, "stored decision #{seq} links to the one before it");
        prev = h;
    }
    assert_eq!(rows.len(), log.len());
    Ok(log)
}

/// The decision kinds the controller makes in these rollouts (not the operator's `started`).
const CONTROLLER_KINDS: [&str; 5] = [
    "stage-started",
    "agents-switched",
    "stage-baking",
    "stage-done",
    "completed",
];

/// `nkudo_rollout_decisions_total{kind="<kind>"}` of one replica (0 when absent).
async fn decisions_counted(cp: &ControlPlane, kind: &str) -> anyhow::Result<f64> {
    let text = anon(cp).get(cp.url("/metrics")).send().await?.text().await?;
    let prefix = format!("nkudo_rollout_decisions_total{{kind=\"{kind}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The agents' switches must be exactly one `from -> to` each since `before` (a snapshot).
fn assert_switched_once(fleet: &SimFleet, before: &BTreeMap<String, SimState>, from: &str, to: &str) {
    let now = fleet.snapshot();
    for (name, s) in &now {
        let old = before.get(name).map(|b| b.switches.len()).unwrap_or(0);
        let new: Vec<&(String, String)> = s.switches.iter().skip(old).collect();
        assert_eq!(
            new,
            vec![&(from.to_string(), to.to_string())],
            "agent {name} switched exactly once {from} -> {to}: {s:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// The scenario

async fn rollout_controller_across_replicas(backend: Backend) -> anyhow::Result<()> {
    if backend != Backend::Postgres {
        print_skip("two replicas need a shared Postgres database; this scenario runs on Postgres only");
        return Ok(());
    }
    let t0 = Instant::now();
    let key = new_release_key();
    let ports = [free_port()?, free_port()?];
    let base = |port: u16| {
        release_control_plane(backend, &[&key])
            .env("CONTROL_PLANE_ADDR", format!("127.0.0.1:{port}"))
            .env("ROLLOUT_TICK", TICK)
            .env("HTTP_SHUTDOWN_TIMEOUT", "2s")
            .env_remove("PROMETHEUS_URL")
    };
    let cp0 = start_or_skip!(base(ports[0]).start());
    let cp1 = base(ports[1])
        .replica_of(&cp0)?
        .start()
        .await?
        .expect("second replica on the same database");
    let mut cps = [cp0, cp1];

    let tmp = TempDir::new("nkudo-rollout-replicas")?;
    for v in [B, C, D, E] {
        let rel = build_release(tmp.path(), &ReleaseSpec::new(v).payload(Payload::ExitsAtOnce), &key)?;
        publish_ok(&cps[0], &rel, &[])?;
    }
    let fleet = SimFleet::start([&cps[0], &cps[1]]).await?;
    let ids = fleet.ids();
    let mut conn = connect_db(cps[0].db(), &cps[0].data_dir).await?;
    let lease = LeaseWatch::start(&cps[0]).await?;
    eprintln!("set-up: {:?}", t0.elapsed());

    // 1. Both replicas up: one acts.
    // From the moment a replica holds the lease (both take part from their first tick).
    wait_holder(&mut conn, pids(&cps)).await?;
    let p1 = now_ms();
    let before = fleet.snapshot();
    let r = start_rollout(&cps[1], B).await?;
    wait_completed(&cps[0], &r.id).await?;
    fleet.wait_all_on(B, Duration::from_secs(10)).await?;
    let held: BTreeSet<Option<String>> = lease.since(p1).into_iter().map(|s| s.holder).collect();
    assert_eq!(held.len(), 1, "one holder all along while both replicas run: {held:?}");
    let holder = held.into_iter().next().flatten().expect("the lease is held");
    let h = pids(&cps)
        .iter()
        .position(|p| holder_pid(&holder) == Some(*p))
        .unwrap_or_else(|| {
            panic!(
                "holder {holder} is neither replica {:?}",
                cps.iter().map(|c| c.pid()).collect::<Vec<_>>()
            )
        });
    check_log(&cps[h], &mut conn, &r.id, &ids).await?;
    for kind in ["stage-started", "stage-baking", "stage-done", "completed"] {
        let want = if kind == "completed" { 1.0 } else { RINGS.len() as f64 };
        assert_eq!(
            decisions_counted(&cps[h], kind).await?,
            want,
            "holder's {kind} decisions"
        );
        assert_eq!(
            decisions_counted(&cps[1 - h], kind).await?,
            0.0,
            "the replica without the lease decides nothing ({kind})"
        );
    }
    assert_switched_once(&fleet, &before, A, B);
    for (name, s) in fleet.snapshot() {
        assert!(
            s.served[0] > 0 && s.served[1] > 0,
            "agent {name} heartbeats to both: {s:?}"
        );
    }
    eprintln!("phase 1 (both replicas, holder = replica {h}): {:?}", t0.elapsed());

    // 2. SIGKILL of the holder mid-rollout: the survivor takes over after the TTL and finishes.
    let before = fleet.snapshot();
    let r = start_rollout(&cps[h], C).await?;
    let h = wait_holder(&mut conn, pids(&cps)).await?;
    let s = 1 - h;
    let survivor_pid = cps[s].pid().expect("survivor runs");
    let killed_pid = cps[h].pid().expect("holder runs");
    let at_kill_log = wait_decisions(&cps[s], &r.id, "stage pilot switched", switched_pilot).await?;
    let kill_at = now_ms();
    cps[h].kill_hard()?;
    let after_kill = wait_decisions(&cps[s], &r.id, "a decision by the survivor", |log| {
        log.iter().any(|d| at_ms(d) > kill_at)
    })
    .await?;
    let first = after_kill.iter().find(|d| at_ms(d) > kill_at).expect("found");
    let decision_ms = at_ms(first) - kill_at;
    wait_completed(&cps[s], &r.id).await?;
    fleet.wait_all_on(C, Duration::from_secs(10)).await?;
    let lease_ms = lease
        .first_held_by(survivor_pid, kill_at)
        .map(|t| t - kill_at)
        .expect("the survivor took the lease");
    let dead_until: Vec<LeaseSample> = lease
        .since(kill_at)
        .into_iter()
        .take_while(|x| x.holder.as_deref().and_then(holder_pid) != Some(survivor_pid))
        .collect();
    assert!(
        dead_until
            .iter()
            .all(|x| x.holder.as_deref().and_then(holder_pid) == Some(killed_pid)),
        "after SIGKILL the row keeps naming the dead holder until the survivor takes it: {dead_until:?}"
    );
    eprintln!(
        "FAILOVER (SIGKILL): lease taken {lease_ms} ms after the kill, first survivor decision after {decision_ms} ms \
         ({} {:?}); TTL {TTL_MS} ms, tick {TICK_MS} ms; log at the kill:\n  {}",
        first.kind,
        first.stage,
        show(&at_kill_log)
    );
    assert!(
        lease_ms >= TTL_MS - TICK_MS - 1_000,
        "the survivor must wait for the lease to expire, took it after {lease_ms} ms"
    );
    assert!(
        lease_ms <= TTL_MS + TAKEOVER_MARGIN_MS,
        "takeover after a crash is bounded by the TTL plus {TAKEOVER_MARGIN_MS} ms: {lease_ms} ms"
    );
    assert!(
        decision_ms <= TTL_MS + TAKEOVER_MARGIN_MS,
        "the survivor's first decision is bounded by the TTL plus {TAKEOVER_MARGIN_MS} ms: {decision_ms} ms"
    );
    let log = check_log(&cps[s], &mut conn, &r.id, &ids).await?;
    // The survivor continued: nothing it decided repeats what the dead holder had decided.
    let before_kill: BTreeSet<(String, Option<String>)> = log
        .iter()
        .filter(|d| at_ms(d) <= kill_at)
        .map(|d| (d.kind.clone(), d.stage.clone()))
        .collect();
    assert!(
        before_kill.contains(&("agents-switched".into(), Some("pilot".into()))),
        "killed mid-rollout (after pilot was switched):\n  {}",
        show(&log)
    );
    assert_switched_once(&fleet, &before, B, C);
    eprintln!("phase 2 (SIGKILL): {:?}", t0.elapsed());

    // 3. Graceful: the killed replica comes back; SIGTERM of the holder hands the lease over at once.
    cps[h].restart().await?;
    let before = fleet.snapshot();
    let r = start_rollout(&cps[s], D).await?;
    let h = wait_holder(&mut conn, pids(&cps)).await?;
    let s = 1 - h;
    let survivor_pid = cps[s].pid().expect("survivor runs");
    wait_decisions(&cps[s], &r.id, "stage pilot switched", switched_pilot).await?;
    let term_at = now_ms();
    let st = cps[h].stop().await?;
    let exited_ms = now_ms() - term_at;
    assert!(st.success(), "SIGTERM exits 0: {st}");
    let after_term = wait_decisions(&cps[s], &r.id, "a decision by the survivor", |log| {
        log.iter().any(|d| at_ms(d) > term_at)
    })
    .await?;
    let first = after_term.iter().find(|d| at_ms(d) > term_at).expect("found");
    let decision_ms = at_ms(first) - term_at;
    wait_completed(&cps[s], &r.id).await?;
    fleet.wait_all_on(D, Duration::from_secs(10)).await?;
    let lease_ms = lease
        .first_held_by(survivor_pid, term_at)
        .map(|t| t - term_at)
        .expect("the survivor took the lease");
    eprintln!(
        "HANDOVER (SIGTERM): lease taken {lease_ms} ms after SIGTERM (holder exited after {exited_ms} ms), first \
         survivor decision after {decision_ms} ms ({} {:?}); TTL {TTL_MS} ms",
        first.kind, first.stage
    );
    assert!(
        lease_ms <= GRACEFUL_MAX_MS,
        "a graceful stop releases the lease: the other replica takes it well under the TTL, not after {lease_ms} ms"
    );
    check_log(&cps[s], &mut conn, &r.id, &ids).await?;
    assert_switched_once(&fleet, &before, C, D);
    eprintln!("phase 3 (SIGTERM): {:?}", t0.elapsed());

    // 4. A frozen holder (SIGSTOP past the TTL, as a long GC pause or a suspended VM would) loses the lease; once
    //    thawed it must not act on what it read before: the log stays one decision per transition.
    cps[h].restart().await?;
    let before = fleet.snapshot();
    // What each replica had counted before this rollout (the restarted one starts at 0).
    let mut counted_before = BTreeMap::new();
    for (i, cp) in cps.iter().enumerate() {
        for kind in CONTROLLER_KINDS {
            counted_before.insert((i, kind), decisions_counted(cp, kind).await?);
        }
    }
    let r = start_rollout(&cps[s], E).await?;
    let h = wait_holder(&mut conn, pids(&cps)).await?;
    let s = 1 - h;
    let (frozen_pid, survivor_pid) = (cps[h].pid().expect("holder runs"), cps[s].pid().expect("runs"));
    wait_decisions(&cps[s], &r.id, "stage pilot switched", switched_pilot).await?;
    let stop_at = now_ms();
    signal(frozen_pid, "-STOP")?;
    let deadline = Instant::now() + Duration::from_millis((TTL_MS + TAKEOVER_MARGIN_MS) as u64);
    let taken = loop {
        if let Some(t) = lease.first_held_by(survivor_pid, stop_at) {
            break Some(t);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Stay frozen a little past the takeover, then wake up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    signal(frozen_pid, "-CONT")?;
    let lease_ms = taken.map(|t| t - stop_at);
    eprintln!("FROZEN HOLDER (SIGSTOP): lease taken {lease_ms:?} ms after the freeze; TTL {TTL_MS} ms");
    let lease_ms = lease_ms.expect("the other replica takes the lease of a frozen holder");
    assert!(
        (TTL_MS - TICK_MS - 1_000..=TTL_MS + TAKEOVER_MARGIN_MS).contains(&lease_ms),
        "takeover from a frozen holder after the TTL: {lease_ms} ms"
    );
    wait_completed(&cps[s], &r.id).await?;
    fleet.wait_all_on(E, Duration::from_secs(10)).await?;
    let after: Vec<LeaseSample> = lease.since(stop_at + lease_ms);
    assert!(
        after
            .iter()
            .all(|x| x.holder.as_deref().and_then(holder_pid) == Some(survivor_pid)),
        "the thawed replica (pid {frozen_pid}) never takes the lease back while the survivor renews it: {:?}",
        after
            .iter()
            .filter(|x| x.holder.as_deref().and_then(holder_pid) != Some(survivor_pid))
            .take(5)
            .collect::<Vec<_>>()
    );
    let log = check_log(&cps[s], &mut conn, &r.id, &ids).await?;
    assert_switched_once(&fleet, &before, D, E);
    // Regression: decisions were counted in nkudo_rollout_decisions_total before their transaction committed, so
    // a replica whose stale cycle was rolled back (thawed after losing the lease) counted decisions never made.
    // Both replicas together count exactly the decisions recorded.
    for kind in CONTROLLER_KINDS {
        let mut counted = 0.0;
        for (i, cp) in cps.iter().enumerate() {
            counted += decisions_counted(cp, kind).await? - counted_before[&(i, kind)];
        }
        let recorded = log.iter().filter(|d| d.kind == kind).count() as f64;
        assert_eq!(
            counted, recorded,
            "{kind}: decisions counted by both replicas vs recorded"
        );
    }
    eprintln!("phase 4 (SIGSTOP/SIGCONT): {:?}", t0.elapsed());

    lease.stop().await?;
    let stale: BTreeMap<String, BTreeSet<String>> = fleet
        .snapshot()
        .into_iter()
        .filter(|(_, s)| !s.stale.is_empty())
        .map(|(n, s)| (n, s.stale))
        .collect();
    eprintln!("older desired versions answered by a lagging replica (refused by the agents): {stale:?}");
    fleet.stop().await;
    // The replica that owns the database drops last.
    let [cp0, cp1] = cps;
    drop(cp1);
    drop(cp0);
    Ok(())
}
both_backends!(rollout_controller_across_replicas => rollout_controller_across_replicas_sqlite, rollout_controller_across_replicas_postgres);
