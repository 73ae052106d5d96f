//! `nkudo-edge run` / `verify-heartbeat`: heartbeats, plan execution, result and log delivery, renewal.
//!
//! Three tasks share one current-thread runtime:
//! * the **heartbeat loop** (this module's [`run`]): every interval ±10% jitter, exponential backoff (1 s doubling
//!   up to a cap) while the control plane is unreachable, certificate renewal, leasing plans (heartbeat answer,
//!   and `GET /v1/plans/next` after a plan finishes and every 30 s while idle);
//! * the **executor** task: runs leased plans one at a time (never the same plan twice concurrently), so a plan
//!   never blocks heartbeats;
//! * the **sender** task: delivers the on-disk spool (results at once, log lines in batches of up to 100 or
//!   every 500 ms) in order, backing off while the control plane is away.
//!
//! SIGTERM/SIGINT: the current action finishes, no further action starts, the spool is flushed (bounded wait),
//! and the process exits 0. A 401 `AGENT_REVOKED`/`UNKNOWN_AGENT` stops the agent with exit code 4.

use crate::backend::ProviderBackend;
use crate::cli::RunSettings;
use crate::client::{CpClient, CpError, TlsSettings};
use crate::executor::{Executor, PlanRun, Sink};
use crate::hostfacts::{self, Binaries, EdgeHostFacts};
use crate::logging::{error, info, warn};
use crate::mesh::Mesh;
use crate::pki::{self, Pki};
use crate::spool::{Spool, SpoolItem};
use crate::state::{now_rfc3339, CertInfo, StateStore};
use crate::update::{UpdateEvent, Updater};
use crate::vm::VmBackend;
use crate::{ExitError, EXIT_FAILURE, EXIT_NOT_ENROLLED, EXIT_REVOKED, EXIT_UNREACHABLE};
use nkudo_core::api::{
    ActionResult, AgentLogsRequest, ExecutionResultRequest, ExecutionUpdate, HeartbeatRequest, HeartbeatResponse,
    LeasedPlan, LogEntry, LogIngestResponse, MicroVmReport, NetbirdStatus, NextPlansResponse, RenewRequest,
    RenewResponse,
};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

/// The version this binary was built as (see [`agent_version`] for the one it reports).
pub const AGENT_VERSION: &str = nkudo_core::build_info::VERSION;

/// The version the agent reports: the one it was installed as (the manifest in its release directory), else its
/// build version.
pub fn agent_version() -> &'static str {
    &nkudo_core::installed::reported_version().version
}

/// During a self-update switch, how long the current action may take to finish before the restart goes ahead
/// (an interrupted action is run again after the restart: every provider operation is idempotent).
pub const SWITCH_ACTION_WAIT: Duration = Duration::from_secs(120);
/// Log lines per `POST /agents/logs`.
pub const LOG_BATCH_LINES: usize = 100;
/// A log line waits at most this long for its batch.
pub const LOG_BATCH_WAIT: Duration = Duration::from_millis(500);
/// Results per `POST /v1/executions/result` (consecutive results of one plan).
pub const RESULT_BATCH: usize = 50;
pub const BACKOFF_START: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// While idle, `GET /v1/plans/next` at most this often (the heartbeat answer carries plans too).
pub const PLANS_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// NetBird status is refreshed at most this often (it runs `netbird status --json`).
pub const NETBIRD_REFRESH: Duration = Duration::from_secs(30);
/// Helper binary versions are refreshed this often.
pub const BINARIES_REFRESH: Duration = Duration::from_secs(3600);
/// A deleted VM is reported as `DELETED` in this many heartbeats after its deletion (a tombstone), so that a
/// heartbeat snapshot taken before the deletion cannot leave it listed as alive at the control plane.
pub const TOMBSTONE_HEARTBEATS: u32 = 5;
/// How long a shutdown (or `--once`) waits to deliver the spool.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(15);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Uniform random factor in [0.9, 1.1].
fn jitter_factor() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 1.0;
    }
    0.9 + 0.2 * (u32::from_le_bytes(b) as f64 / u32::MAX as f64)
}

pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(jitter_factor())
}

/// The next backoff: 1 s, 2 s, 4 s … up to `cap`.
pub fn next_backoff(cur: Duration, cap: Duration) -> Duration {
    if cur.is_zero() {
        BACKOFF_START.min(cap)
    } else {
        (cur * 2).min(cap)
    }
}

/// The backoff cap: `NKUDO_MAX_BACKOFF` (a duration) or 60 s.
pub fn backoff_cap() -> Duration {
    std::env::var("NKUDO_MAX_BACKOFF")
        .ok()
        .and_then(|v| crate::cli::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_BACKOFF_CAP)
}

/// Why the agent stops.
#[derive(Debug, Clone)]
enum Stop {
    Signal,
    Fatal(String),
    /// Self-update: a new version is installed; stop gracefully, then switch and restart.
    Update,
    /// Self-update: the version on trial rolled back; stop gracefully, then restart into the previous version.
    Restart,
}

/// State shared by the three tasks.
struct Shared<B: VmBackend> {
    settings: RunSettings,
    state: Arc<Mutex<StateStore>>,
    pki: Pki,
    client: RwLock<CpClient>,
    executor: Executor<B>,
    spool: Arc<Mutex<Spool>>,
    spool_notify: Arc<Notify>,
    progress: Arc<Mutex<Vec<ExecutionUpdate>>>,
    /// Set on SIGTERM or a fatal error: no new action starts.
    stopping: AtomicBool,
    stop_reason: Mutex<Option<Stop>>,
    wake: Notify,
    /// The executor is running a plan or has plans queued.
    busy: AtomicBool,
    /// The executor finished a plan: poll `GET /v1/plans/next` now.
    poll_now: AtomicBool,
    /// The sender should deliver everything now, without batching waits, and return when empty.
    draining: AtomicBool,
    agent_id: String,
    serial_mismatches: Mutex<u32>,
    /// VMs deleted recently: (vm id, heartbeats left to report them `DELETED`).
    tombstones: Mutex<Vec<(String, u32)>>,
    updater: Arc<Updater>,
}

impl<B: VmBackend> Shared<B> {
    fn client(&self) -> CpClient {
        self.client.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stop(&self, why: Stop) {
        {
            let mut r = lock(&self.stop_reason);
            // A signal wins over a pending self-update restart (the operator wants the agent stopped).
            let restart_pending = matches!(*r, Some(Stop::Update | Stop::Restart));
            if r.is_none() || (restart_pending && matches!(why, Stop::Signal | Stop::Fatal(_))) {
                *r = Some(why);
            }
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        self.spool_notify.notify_one();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Reacts to an error answer of an authenticated call: fatal auth stops the agent; a serial mismatch (our
    /// certificate was replaced, e.g. a renewal answer we lost) reloads the client and is fatal when it persists.
    fn check_auth(&self, e: &CpError) {
        if e.is_fatal_auth() {
            self.stop(Stop::Fatal(format!(
                "the control plane refuses this agent ({e}); it was revoked or removed: re-enroll with `nkudo-edge enroll`"
            )));
            return;
        }
        if e.code() == "CERTIFICATE_SERIAL_MISMATCH" {
            let n = {
                let mut n = lock(&self.serial_mismatches);
                *n += 1;
                *n
            };
            if let Err(err) = self.reload_client() {
                warn(&format!("reload client certificate: {err}"));
            }
            if n >= 5 {
                self.stop(Stop::Fatal(format!(
                    "the control plane no longer accepts this agent's certificate ({e}); re-enroll with `nkudo-edge enroll`"
                )));
            }
        } else {
            *lock(&self.serial_mismatches) = 0;
        }
    }

    fn reload_client(&self) -> Result<(), String> {
        let c = build_client(&self.settings, &self.pki)?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = c;
        Ok(())
    }

    async fn sleep_or_wake(&self, d: Duration) {
        if self.is_stopping() {
            return;
        }
        let _ = tokio::time::timeout(d, self.wake.notified()).await;
    }
}

/// The mTLS client: trusts the CA bundle from enrollment (plus `--ca-file`), presents the agent certificate.
pub fn build_client(settings: &RunSettings, pki: &Pki) -> Result<CpClient, String> {
    let cp = settings
        .conn
        .require_control_plane()
        .map_err(|e| e.to_string())?
        .to_string();
    let mut roots = vec![pki.ca_pem().map_err(|e| e.to_string())?];
    if let Some(f) = &settings.conn.ca_file {
        roots.push(std::fs::read(f).map_err(|e| format!("read --ca-file {}: {e}", f.display()))?);
    }
    let tls = TlsSettings {
        roots_pem: roots,
        system_roots: false,
        identity_pem: Some(pki.identity_pem().map_err(|e| e.to_string())?),
        insecure_skip_verify: settings.conn.insecure_skip_verify,
    };
    CpClient::new(&cp, &tls)
}

pub fn warn_insecure(insecure: bool) {
    if insecure {
        warn("**********************************************************************************");
        warn("--insecure-skip-verify: the control plane's certificate is NOT verified. Anyone on");
        warn("the path can impersonate it. Never needed against an n-kudo control plane: remove it.");
        warn("**********************************************************************************");
    }
}

/// The spool-backed sink of the agent's executor.
struct SpoolSink {
    state: Arc<Mutex<StateStore>>,
    spool: Arc<Mutex<Spool>>,
    notify: Arc<Notify>,
    progress: Arc<Mutex<Vec<ExecutionUpdate>>>,
}

impl Sink for SpoolSink {
    fn log(&mut self, entry: LogEntry) {
        let dropped = {
            let mut sp = lock(&self.spool);
            let before = sp.dropped_logs;
            if let Err(e) = sp.push(SpoolItem::Log { entry }) {
                error(&format!("spool: cannot queue a log line: {e}"));
            }
            sp.dropped_logs - before
        };
        if dropped > 0 {
            // The running count of lines lost to a full spool, kept across restarts.
            let mut st = lock(&self.state);
            st.state.dropped_log_entries += dropped;
            if let Err(e) = st.save() {
                warn(&format!("cannot record dropped log lines: {e}"));
            }
        }
        self.notify.notify_one();
    }

    fn result(&mut self, plan_id: &str, plan_execution_id: &str, result: &ActionResult, _replay: bool) {
        if let Some(exec) = &result.execution_id {
            lock(&self.progress).retain(|u| &u.execution_id != exec);
        }
        let item = SpoolItem::Result {
            plan_id: plan_id.to_string(),
            plan_execution_id: plan_execution_id.to_string(),
            result: result.clone(),
        };
        if let Err(e) = lock(&self.spool).push(item) {
            error(&format!(
                "spool: cannot queue the result of action {} ({e}); it stays in the idempotency cache and is \
                 reported when the plan is leased again",
                result.action_id
            ));
        }
        self.notify.notify_one();
    }

    fn progress(&mut self, update: ExecutionUpdate) {
        let mut p = lock(&self.progress);
        p.retain(|u| u.execution_id != update.execution_id);
        p.push(update);
    }

    fn has_pending_result(&self, execution_id: &str, action_id: &str) -> bool {
        lock(&self.spool).has_result(execution_id, action_id)
    }
}

fn to_plan_run(p: LeasedPlan) -> PlanRun {
    PlanRun {
        plan_id: p.plan_id.clone(),
        execution_id: if p.execution_id.is_empty() {
            p.plan_id
        } else {
            p.execution_id
        },
        actions: p.actions,
    }
}

/// The executor task: runs queued plans one at a time; a plan already running or queued is not queued again.
async fn executor_task<B: VmBackend>(shared: Arc<Shared<B>>, mut rx: mpsc::UnboundedReceiver<Vec<LeasedPlan>>) {
    let mut queue: VecDeque<PlanRun> = VecDeque::new();
    let mut sink = SpoolSink {
        state: shared.state.clone(),
        spool: shared.spool.clone(),
        notify: shared.spool_notify.clone(),
        progress: shared.progress.clone(),
    };
    let enqueue = |queue: &mut VecDeque<PlanRun>, plans: Vec<LeasedPlan>| {
        for p in plans {
            let run = to_plan_run(p);
            match queue.iter_mut().find(|q| q.plan_id == run.plan_id) {
                Some(q) => *q = run, // the newer lease: only the actions still unfinished
                None => queue.push_back(run),
            }
        }
    };
    loop {
        while let Ok(plans) = rx.try_recv() {
            enqueue(&mut queue, plans);
        }
        if shared.is_stopping() {
            break;
        }
        let Some(plan) = queue.pop_front() else {
            shared.busy.store(false, Ordering::SeqCst);
            shared.wake.notify_waiters();
            tokio::select! {
                got = rx.recv() => match got {
                    Some(plans) => {
                        shared.busy.store(true, Ordering::SeqCst);
                        enqueue(&mut queue, plans);
                        continue;
                    }
                    None => break,
                },
                _ = shared.wake.notified() => continue,
            }
        };
        shared.busy.store(true, Ordering::SeqCst);
        if plan.actions.is_empty() {
            continue;
        }
        info(&format!(
            "plan {} started ({} action(s))",
            plan.plan_id,
            plan.actions.len()
        ));
        let out = shared.executor.run_plan(&plan, &mut sink, &shared.stopping).await;
        for (action, result) in plan.actions.iter().zip(&out.results) {
            if result.ok && action.action_type == nkudo_core::api::ACTION_DELETE {
                if let Some(vm_id) = action.params.get("vm_id").and_then(|v| v.as_str()) {
                    let mut t = lock(&shared.tombstones);
                    t.retain(|(id, _)| id != vm_id);
                    t.push((vm_id.to_string(), TOMBSTONE_HEARTBEATS));
                }
            }
        }
        if out.interrupted {
            info(&format!(
                "plan {} interrupted by shutdown; the rest stays leased",
                plan.plan_id
            ));
        } else if out.failed {
            warn(&format!("plan {} failed", plan.plan_id));
        } else {
            info(&format!("plan {} finished", plan.plan_id));
        }
        // Drop leases of this plan that arrived while it ran: they were issued before our results reached
        // the control plane; the next lease (after delivery) decides whether anything is left.
        while let Ok(plans) = rx.try_recv() {
            enqueue(&mut queue, plans);
        }
        queue.retain(|q| q.plan_id != plan.plan_id);
        shared.poll_now.store(true, Ordering::SeqCst);
    }
    shared.busy.store(false, Ordering::SeqCst);
    shared.wake.notify_waiters();
}

/// Sends one batch; `Ok(n)` entries may be removed from the spool.
async fn deliver<B: VmBackend>(shared: &Shared<B>, batch: &[SpoolItem]) -> Result<usize, CpError> {
    let client = shared.client();
    match batch.first() {
        None => Ok(0),
        Some(SpoolItem::Log { .. }) => {
            let entries: Vec<LogEntry> = batch
                .iter()
                .filter_map(|i| match i {
                    SpoolItem::Log { entry } => Some(entry.clone()),
                    _ => None,
                })
                .collect();
            let req = AgentLogsRequest {
                agent_id: Some(shared.agent_id.clone()),
                entries,
            };
            let resp: LogIngestResponse = client.post("/agents/logs", &req).await?;
            if resp.dropped_frames > 0 {
                warn(&format!(
                    "control plane dropped {} of {} log line(s) (duplicates or unknown executions)",
                    resp.dropped_frames,
                    batch.len()
                ));
            }
            Ok(batch.len())
        }
        Some(SpoolItem::Result {
            plan_id,
            plan_execution_id,
            ..
        }) => {
            let results: Vec<ActionResult> = batch
                .iter()
                .filter_map(|i| match i {
                    SpoolItem::Result { result, .. } => Some(result.clone()),
                    _ => None,
                })
                .collect();
            let req = ExecutionResultRequest {
                plan_id: Some(plan_id.clone()),
                execution_id: Some(plan_execution_id.clone()),
                results,
            };
            let _: serde_json::Value = client.post("/v1/executions/result", &req).await?;
            let done: Vec<(String, String)> = req
                .results
                .iter()
                .map(|r| (r.execution_id.clone().unwrap_or_default(), r.action_id.clone()))
                .collect();
            let mut st = lock(&shared.state);
            if st.state.mark_reported(&done) {
                if let Err(e) = st.save() {
                    warn(&format!("cannot record delivered results: {e}"));
                }
            }
            Ok(batch.len())
        }
    }
}

/// The sender task: delivers the spool in order until the agent stops (then drains it when asked).
async fn sender_task<B: VmBackend>(shared: Arc<Shared<B>>) {
    let cap = backoff_cap();
    let mut backoff = Duration::ZERO;
    loop {
        let draining = shared.draining.load(Ordering::SeqCst);
        let (batch, wait) = {
            let sp = lock(&shared.spool);
            if sp.is_empty() {
                (Vec::new(), None)
            } else if draining || sp.due(LOG_BATCH_LINES, LOG_BATCH_WAIT) {
                (sp.next_batch(LOG_BATCH_LINES, RESULT_BATCH), Some(Duration::ZERO))
            } else {
                (Vec::new(), sp.wait_for(LOG_BATCH_WAIT))
            }
        };
        if batch.is_empty() {
            if draining {
                return;
            }
            if shared.is_stopping() && wait.is_none() {
                // Nothing to send; wait for the drain request (or more items from the last action).
                let _ = tokio::time::timeout(Duration::from_millis(200), shared.spool_notify.notified()).await;
                continue;
            }
            match wait {
                None => shared.spool_notify.notified().await,
                Some(d) => {
                    let _ = tokio::time::timeout(d.max(Duration::from_millis(5)), shared.spool_notify.notified()).await;
                }
            }
            continue;
        }
        match deliver(&shared, &batch).await {
            Ok(n) => {
                backoff = Duration::ZERO;
                if let Err(e) = lock(&shared.spool).pop_front(n) {
                    error(&format!("spool: cannot rewrite after delivery: {e}"));
                }
            }
            Err(e) => {
                shared.check_auth(&e);
                if e.is_fatal_auth() {
                    return;
                }
                let permanent = matches!(&e, CpError::Http { status, code, .. }
                    if (400..500).contains(status) && ![401, 403, 408, 429].contains(status)
                        && code != "CERTIFICATE_SERIAL_MISMATCH")
                    || matches!(e, CpError::Decode(_));
                if permanent {
                    error(&format!(
                        "control plane refused {} spooled {} ({e}); dropping them (the request would never succeed)",
                        batch.len(),
                        if batch[0].is_log() { "log line(s)" } else { "result(s)" }
                    ));
                    if let Err(e) = lock(&shared.spool).pop_front(batch.len()) {
                        error(&format!("spool: cannot rewrite: {e}"));
                    }
                    continue;
                }
                if draining {
                    warn(&format!(
                        "could not deliver the spool before exit ({e}); {} entr(ies) stay on disk for the next start",
                        lock(&shared.spool).len()
                    ));
                    return;
                }
                backoff = next_backoff(backoff, cap);
                warn(&format!(
                    "delivering results/logs failed ({e}); {} queued, retrying in {:.1}s",
                    lock(&shared.spool).len(),
                    backoff.as_secs_f64()
                ));
                let _ = tokio::time::timeout(jittered(backoff), async {
                    // Wake early only for a drain request.
                    loop {
                        shared.spool_notify.notified().await;
                        if shared.draining.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
    }
}

/// Cached helper-binary facts and NetBird status.
struct Probes {
    binaries: Binaries,
    binaries_at: Option<Instant>,
    netbird: Option<NetbirdStatus>,
    netbird_at: Option<Instant>,
}

async fn heartbeat_once<B: VmBackend>(
    shared: &Shared<B>,
    mesh: &Mesh,
    probes: &mut Probes,
    updates: Vec<ExecutionUpdate>,
) -> Result<HeartbeatResponse, CpError> {
    let s = &shared.settings;
    if probes.binaries_at.is_none_or(|t| t.elapsed() >= BINARIES_REFRESH) {
        probes.binaries = Binaries {
            cloud_hypervisor: hostfacts::binary_facts(
                &s.provider.cloud_hypervisor_bin,
                shared.executor.backend().binary_version(),
            ),
            netbird: hostfacts::binary_facts(&s.netbird.bin, mesh.binary_version()),
            qemu_img: Some(hostfacts::binary_facts(&s.provider.qemu_img_bin, None)),
        };
        probes.binaries_at = Some(Instant::now());
    }
    if probes.netbird_at.is_none_or(|t| t.elapsed() >= NETBIRD_REFRESH) {
        probes.netbird = Some(mesh.status().await);
        probes.netbird_at = Some(Instant::now());
    }
    let facts: EdgeHostFacts = hostfacts::collect(hostfacts::FactsInput {
        runtime_dir: &s.provider.runtime_dir,
        kvm_device: Path::new("/dev/kvm"),
        binaries: probes.binaries.clone(),
    });
    let mut microvms = shared.executor.backend().list().await;
    {
        let mut t = lock(&shared.tombstones);
        for (vm_id, left) in t.iter_mut() {
            if !microvms.iter().any(|v| &v.id == vm_id) {
                microvms.push(MicroVmReport {
                    id: vm_id.clone(),
                    name: vm_id.clone(),
                    state: Some("DELETED".into()),
                    updated_at: Some(now_rfc3339()),
                    ..Default::default()
                });
            }
            *left = left.saturating_sub(1);
        }
        t.retain(|(_, left)| *left > 0);
    }
    let seq = {
        let mut st = lock(&shared.state);
        st.next_heartbeat_seq()
            .map_err(|e| CpError::Decode(format!("persist heartbeat sequence: {e}")))?
    };
    let f = &facts.facts;
    let kvm = f.kvm.present && f.kvm.readable && f.kvm.writable;
    let req = HeartbeatRequest {
        agent_id: Some(shared.agent_id.clone()),
        heartbeat_seq: Some(seq),
        agent_version: Some(shared.updater.running().to_string()),
        os: Some(f.os.clone()),
        arch: Some(f.arch.clone()),
        kernel_version: Some(f.kernel.clone()),
        hostname: Some(facts.hostname.clone()),
        cpu_cores_total: Some(f.cpu_cores),
        memory_bytes_total: Some(f.memory_total_bytes),
        storage_bytes_total: Some(f.disks.iter().map(|d| d.total_bytes).sum()),
        kvm_available: Some(kvm),
        cloud_hypervisor_available: Some(facts.binaries.cloud_hypervisor.present),
        host_facts: None,
        netbird_status: probes.netbird.clone(),
        microvms,
        execution_updates: updates,
        sent_at: Some(now_rfc3339()),
        build_version: nkudo_core::installed::reported_version()
            .build_version_if_different()
            .map(str::to_string),
        update: Some(shared.updater.status()),
    };
    // The wire type plus our extra keys (helper binaries and hostname in the facts; the spool's state): unknown
    // keys are ignored by the control plane.
    let mut body = serde_json::to_value(&req).map_err(|e| CpError::Decode(e.to_string()))?;
    let dropped = lock(&shared.state).state.dropped_log_entries;
    let queued = lock(&shared.spool).len();
    if let serde_json::Value::Object(m) = &mut body {
        m.insert(
            "host_facts".into(),
            serde_json::to_value(&facts).map_err(|e| CpError::Decode(e.to_string()))?,
        );
        m.insert(
            "spool".into(),
            serde_json::json!({"queued_entries": queued, "dropped_log_entries": dropped}),
        );
    }
    shared.client().post("/v1/heartbeat", &body).await
}

/// Renews the certificate: new key (staged first), `POST /v1/renew`, new files and refresh token, new client.
async fn renew<B: VmBackend>(shared: &Shared<B>) -> Result<(), String> {
    let refresh = {
        let st = lock(&shared.state);
        st.identity().map_err(|e| e.to_string())?.refresh_token.clone()
    };
    let (key, csr) = pki::new_key_and_csr(&shared.agent_id).map_err(|e| e.to_string())?;
    shared.pki.stage_next_key(&key).map_err(|e| e.to_string())?;
    let req = RenewRequest {
        agent_id: Some(shared.agent_id.clone()),
        csr_pem: csr,
        refresh_token: Some(refresh).filter(|r| !r.is_empty()),
    };
    let resp: RenewResponse = match shared.client().post("/v1/renew", &req).await {
        Ok(r) => r,
        Err(e) => {
            let _ = shared.pki.recover(); // discards the staged key: the old pair stays in force
            shared.check_auth(&e);
            return Err(format!("renew: {e}"));
        }
    };
    // The answer's CA bundle replaces the trusted one (a CA rotation adds the new CA before the server moves to it).
    let bundle = shared
        .pki
        .stage_next_cert(&resp.client_certificate_pem, &resp.ca_certificate_pem)
        .map_err(|e| e.to_string())?;
    match bundle {
        pki::BundleUpdate::Replaced(n) => info(&format!(
            "trusted CA bundle updated from the renewal answer ({n} certificate(s))"
        )),
        pki::BundleUpdate::Ignored(reason) => warn(&format!(
            "the renewal answer's CA bundle is not usable ({reason}); keeping the trusted one"
        )),
        pki::BundleUpdate::Unchanged | pki::BundleUpdate::Absent => {}
    }
    {
        let mut st = lock(&shared.state);
        if let Some(id) = st.state.identity.as_mut() {
            if !resp.refresh_token.is_empty() {
                id.refresh_token = resp.refresh_token.clone();
            }
        }
        st.state.certificate = Some(CertInfo {
            expires_at: resp.expires_at.clone(),
            received_at: now_rfc3339(),
        });
        st.save().map_err(|e| e.to_string())?;
    }
    shared.pki.recover().map_err(|e| e.to_string())?;
    shared.reload_client()?;
    info(&format!("certificate renewed; it expires at {}", resp.expires_at));
    Ok(())
}

async fn poll_plans<B: VmBackend>(shared: &Shared<B>) -> Vec<LeasedPlan> {
    match shared.client().get::<NextPlansResponse>("/v1/plans/next").await {
        Ok(r) => r.plans,
        Err(e) => {
            shared.check_auth(&e);
            if !e.is_retryable() {
                warn(&format!("GET /v1/plans/next: {e}"));
            }
            Vec::new()
        }
    }
}

/// Waits for SIGTERM or SIGINT.
async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers we simply never stop gracefully.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// `run` (and `verify-heartbeat` / `run --once`).
pub async fn run(settings: RunSettings) -> Result<(), ExitError> {
    warn_insecure(settings.conn.insecure_skip_verify);
    settings.conn.require_control_plane().map_err(ExitError::usage)?;
    // The self-update start guard comes first: a version on trial that must roll back does so before connecting.
    let (updater, mut update_events) = Updater::start(&settings.update, &settings.dirs.state_dir, settings.once)?;
    let mut store =
        StateStore::open(&settings.dirs.state_dir).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    let identity = store
        .identity()
        .map_err(|e| ExitError::new(EXIT_NOT_ENROLLED, format!("load identity (run enroll first): {e}")))?
        .clone();
    let pki = Pki::new(&settings.dirs.pki_dir);
    pki.recover().map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    let client = build_client(&settings, &pki).map_err(|e| ExitError::new(EXIT_NOT_ENROLLED, e))?;
    let spool = Spool::open(
        &settings.dirs.state_dir,
        settings.spool_max_entries,
        settings.spool_max_bytes,
    )
    .map_err(|e| ExitError::new(EXIT_FAILURE, format!("open spool: {e}")))?;
    if !spool.is_empty() {
        info(&format!(
            "spool: {} undelivered entr(ies) from an earlier run",
            spool.len()
        ));
    }
    store.state.prune(chrono::Utc::now());
    let state = Arc::new(Mutex::new(store));
    let backend = Arc::new(ProviderBackend::new(&settings.provider));
    let mesh = Mesh::new(&settings.netbird);
    info(&format!(
        "nkudo-edge {} agent {} (site {}) → {}",
        agent_version(),
        identity.agent_id,
        identity.site_id,
        client.base_url()
    ));
    let found = backend.reconcile().await;
    if !found.is_empty() {
        info(&format!(
            "reconciled {} microVM(s) from {}",
            found.len(),
            settings.provider.runtime_dir.display()
        ));
    }
    let shared = Arc::new(Shared {
        executor: Executor::new(backend, state.clone()),
        state,
        pki,
        client: RwLock::new(client),
        spool: Arc::new(Mutex::new(spool)),
        spool_notify: Arc::new(Notify::new()),
        progress: Arc::new(Mutex::new(Vec::new())),
        stopping: AtomicBool::new(false),
        stop_reason: Mutex::new(None),
        wake: Notify::new(),
        busy: AtomicBool::new(false),
        poll_now: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        agent_id: identity.agent_id.clone(),
        serial_mismatches: Mutex::new(0),
        tombstones: Mutex::new(Vec::new()),
        updater: updater.clone(),
        settings,
    });
    {
        let s = shared.clone();
        tokio::spawn(async move {
            while let Some(ev) = update_events.recv().await {
                match ev {
                    UpdateEvent::ReadyToSwitch => {
                        info("self-update: stopping gracefully to switch versions");
                        s.stop(Stop::Update);
                    }
                    UpdateEvent::RestartAfterRollback => s.stop(Stop::Restart),
                }
            }
        });
    }
    if updater.on_trial() {
        tokio::spawn(updater.clone().trial_task());
    }
    let (plan_tx, plan_rx) = mpsc::unbounded_channel::<Vec<LeasedPlan>>();
    let exec_handle = tokio::spawn(executor_task(shared.clone(), plan_rx));
    let sender_handle = tokio::spawn(sender_task(shared.clone()));
    {
        let s = shared.clone();
        tokio::spawn(async move {
            signals().await;
            info("signal received: finishing the current action, then flushing and exiting");
            s.stop(Stop::Signal);
            signals().await;
            error("second signal: exiting at once");
            std::process::exit(130);
        });
    }

    let once = shared.settings.once;
    let mut interval = shared.settings.heartbeat_interval;
    let cap = backoff_cap();
    let mut backoff = Duration::ZERO;
    let mut last_poll: Option<Instant> = None;
    let mut probes = Probes {
        binaries: Binaries::default(),
        binaries_at: None,
        netbird: None,
        netbird_at: None,
    };
    let mesh = &mesh;
    let mut once_result: Result<(), ExitError> = Ok(());
    let mut ok_count: u64 = 0;
    loop {
        if shared.is_stopping() {
            break;
        }
        let updates: Vec<ExecutionUpdate> = lock(&shared.progress).clone();
        let sent_updates: Vec<(String, String)> = updates
            .iter()
            .map(|u| (u.execution_id.clone(), u.state.clone()))
            .collect();
        let mut sleep_for = interval;
        match heartbeat_once(&shared, mesh, &mut probes, updates).await {
            Ok(resp) => {
                if !backoff.is_zero() {
                    info("control plane reachable again");
                }
                backoff = Duration::ZERO;
                ok_count += 1;
                shared.updater.heartbeat_ok();
                shared.updater.on_response(&resp, &shared.client());
                *lock(&shared.serial_mismatches) = 0;
                // Progress that went out is done (unless it changed meanwhile).
                lock(&shared.progress).retain(|u| !sent_updates.contains(&(u.execution_id.clone(), u.state.clone())));
                if resp.next_heartbeat_seconds > 0 {
                    // The control plane's interval wins (ours is the starting value).
                    interval = Duration::from_secs(resp.next_heartbeat_seconds as u64);
                }
                sleep_for = interval;
                if once {
                    println!(
                        "heartbeat ok: agent {} → control plane {} (version {}), {} plan(s) leased",
                        shared.agent_id,
                        shared.client().base_url(),
                        resp.control_plane_version,
                        resp.pending_plans.len()
                    );
                }
                if ok_count == 1 {
                    info(&format!(
                        "heartbeat accepted (control plane {}, next in {}s, {} plan(s) leased)",
                        resp.control_plane_version,
                        interval.as_secs_f64(),
                        resp.pending_plans.len()
                    ));
                }
                if !resp.agent_version_supported {
                    warn(&format!(
                        "the control plane no longer supports agent version {} (minimum {}): upgrade",
                        agent_version(),
                        resp.minimum_supported_agent_version
                    ));
                }
                // Certificate renewal.
                let needs = {
                    let mut st = lock(&shared.state);
                    if st.state.certificate.is_none() && !resp.certificate_expires_at.is_empty() {
                        st.state.certificate = Some(CertInfo {
                            expires_at: resp.certificate_expires_at.clone(),
                            received_at: now_rfc3339(),
                        });
                        let _ = st.save();
                    }
                    resp.rotate_certificate
                        || st
                            .state
                            .certificate
                            .as_ref()
                            .is_some_and(|c| c.needs_renewal(chrono::Utc::now()))
                };
                if needs {
                    if let Err(e) = renew(&shared).await {
                        warn(&format!(
                            "certificate renewal failed: {e}; retrying at the next heartbeat"
                        ));
                    }
                }
                // Plans.
                let mut plans = resp.pending_plans;
                let idle = !shared.busy.load(Ordering::SeqCst);
                let poll_due = shared.poll_now.swap(false, Ordering::SeqCst)
                    || once
                    || (idle && last_poll.is_none_or(|t| t.elapsed() >= PLANS_POLL_INTERVAL));
                if plans.is_empty() && poll_due && !shared.is_stopping() {
                    last_poll = Some(Instant::now());
                    plans = poll_plans(&shared).await;
                }
                if !plans.is_empty() {
                    shared.busy.store(true, Ordering::SeqCst);
                    let _ = plan_tx.send(plans);
                }
            }
            Err(e) => {
                shared.check_auth(&e);
                if shared.is_stopping() {
                    break;
                }
                if e.is_retryable() {
                    backoff = next_backoff(backoff, cap);
                    sleep_for = backoff;
                    warn(&format!(
                        "heartbeat failed ({e}); retrying in {:.1}s",
                        backoff.as_secs_f64()
                    ));
                    if once {
                        once_result = Err(ExitError::new(EXIT_UNREACHABLE, format!("heartbeat failed: {e}")));
                    }
                } else {
                    error(&format!("heartbeat refused: {e}"));
                    if once {
                        once_result = Err(ExitError::new(EXIT_FAILURE, format!("heartbeat refused: {e}")));
                    }
                }
            }
        }
        if once {
            // Execute what was leased, then stop.
            while shared.busy.load(Ordering::SeqCst) && !shared.is_stopping() {
                shared.sleep_or_wake(Duration::from_millis(200)).await;
            }
            break;
        }
        shared.sleep_or_wake(jittered(sleep_for)).await;
    }

    // Shutdown: the executor finishes its current action, then the spool is flushed.
    let reason = lock(&shared.stop_reason).clone().unwrap_or(Stop::Signal);
    let restarting = matches!(reason, Stop::Update | Stop::Restart);
    if matches!(reason, Stop::Signal) && !once {
        shared.updater.note_signal_stop();
    }
    shared.stop(reason);
    if restarting {
        if tokio::time::timeout(SWITCH_ACTION_WAIT, exec_handle).await.is_err() {
            warn(&format!(
                "the current action did not finish within {}s; restarting anyway (it runs again after the restart)",
                SWITCH_ACTION_WAIT.as_secs()
            ));
        }
    } else {
        let _ = exec_handle.await;
    }
    shared.draining.store(true, Ordering::SeqCst);
    shared.spool_notify.notify_one();
    let fatal = matches!(*lock(&shared.stop_reason), Some(Stop::Fatal(_)));
    if !fatal {
        match tokio::time::timeout(FLUSH_DEADLINE, sender_handle).await {
            Ok(_) => {}
            Err(_) => warn(&format!(
                "spool not fully delivered within {}s; {} entr(ies) stay on disk",
                FLUSH_DEADLINE.as_secs(),
                lock(&shared.spool).len()
            )),
        }
    } else {
        sender_handle.abort();
    }
    let left = lock(&shared.spool).len();
    let reason = lock(&shared.stop_reason).clone();
    match reason {
        Some(Stop::Fatal(msg)) => return Err(ExitError::new(EXIT_REVOKED, msg)),
        Some(Stop::Update) => {
            info(&format!(
                "stopped for the self-update ({left} undelivered spool entr(ies) kept)"
            ));
            return Err(shared.updater.switch_and_restart());
        }
        Some(Stop::Restart) => {
            info(&format!(
                "stopped to restart into the previous version ({left} undelivered spool entr(ies) kept)"
            ));
            return Err(shared.updater.restart());
        }
        _ => {}
    }
    info(&format!("stopped ({left} undelivered spool entr(ies) kept)"));
    once_result
}
