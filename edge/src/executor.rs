//! Runs plans: actions in order through a [`VmBackend`], with the idempotency cache of the state file.
//!
//! For each action, keyed by (execution id, action id) — never by the action id alone (bug 29):
//! * finished before (cache hit): its recorded result is replayed, the provider is not called;
//! * recorded as started but never finished (the agent died in the middle): the action runs again — every
//!   provider operation is idempotent — and its result is reported;
//! * otherwise "started" is persisted before the provider is called and the result right after.
//!
//! Results and log lines go to a [`Sink`] as they happen (the agent's sink is the on-disk spool). The first
//! failure ends the plan (the control plane cancels the remaining actions).

use crate::state::{now_rfc3339, ActionRecord, ActionState, LogSequencer, StateStore};
use crate::vm::{VmBackend, VmError};
use nkudo_core::api::{
    ActionResult, ExecutionUpdate, LeasedAction, LogEntry, MicroVmCreateParams, MicroVmRefParams, ACTION_CREATE,
    ACTION_DELETE, ACTION_START, ACTION_STOP,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the executor's output goes.
pub trait Sink: Send {
    fn log(&mut self, entry: LogEntry);
    /// An action's result (`replay`: answered from the idempotency cache).
    fn result(&mut self, plan_id: &str, plan_execution_id: &str, result: &ActionResult, replay: bool);
    /// Progress for the heartbeat's `execution_updates` (IN_PROGRESS when an action starts).
    fn progress(&mut self, update: ExecutionUpdate);
    /// Whether a result of this (execution, action) is still waiting to be delivered (replays are then silent).
    fn has_pending_result(&self, _execution_id: &str, _action_id: &str) -> bool {
        false
    }
}

/// A plan to execute (a leased plan, or a local plan file for `apply`).
#[derive(Debug, Clone)]
pub struct PlanRun {
    pub plan_id: String,
    /// Plan-level execution id (the plan id for leases; used for actions without their own execution id).
    pub execution_id: String,
    pub actions: Vec<LeasedAction>,
}

#[derive(Debug, Clone, Default)]
pub struct PlanOutcome {
    pub results: Vec<ActionResult>,
    pub failed: bool,
    /// Stopped before the end because of a shutdown (the remaining actions stay leased).
    pub interrupted: bool,
}

pub struct Executor<B: VmBackend> {
    backend: Arc<B>,
    state: Arc<Mutex<StateStore>>,
    seq: Mutex<LogSequencer>,
    /// Upper bound for an action without a timeout.
    pub default_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: VmBackend> Executor<B> {
    pub fn new(backend: Arc<B>, state: Arc<Mutex<StateStore>>) -> Self {
        Executor {
            backend,
            state,
            seq: Mutex::new(LogSequencer::default()),
            default_timeout: Duration::from_secs(600),
        }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    fn log(&self, sink: &mut dyn Sink, execution_id: &str, action_id: &str, severity: &str, message: String) {
        crate::logging::log(
            severity,
            &format!("execution {execution_id} action {action_id}: {message}"),
        );
        let sequence = {
            let mut st = lock(&self.state);
            let mut seq = lock(&self.seq);
            match seq.next(&mut st, execution_id) {
                Ok(n) => n,
                Err(e) => {
                    crate::logging::log("ERROR", &format!("cannot persist the log sequence: {e}"));
                    return;
                }
            }
        };
        sink.log(LogEntry {
            execution_id: execution_id.to_string(),
            action_id: Some(action_id.to_string()),
            sequence,
            severity: severity.to_string(),
            message,
            emitted_at: Some(now_rfc3339()),
        });
    }

    fn save_record(&self, rec: ActionRecord) -> Result<(), VmError> {
        let mut st = lock(&self.state);
        st.state.put_action(rec);
        st.save().map_err(|e| VmError::new("STATE_WRITE_FAILED", e.to_string()))
    }

    /// Executes `plan`; stops before the next action when `stop` is set.
    pub async fn run_plan(&self, plan: &PlanRun, sink: &mut dyn Sink, stop: &AtomicBool) -> PlanOutcome {
        let mut out = PlanOutcome::default();
        for action in &plan.actions {
            if stop.load(Ordering::SeqCst) {
                out.interrupted = true;
                break;
            }
            let exec_id = action
                .execution_id
                .clone()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| plan.execution_id.clone());
            let result = self.run_action(plan, action, &exec_id, sink).await;
            let ok = result.ok;
            out.results.push(result);
            if !ok {
                out.failed = true;
                break;
            }
        }
        out
    }

    async fn run_action(
        &self,
        plan: &PlanRun,
        action: &LeasedAction,
        exec_id: &str,
        sink: &mut dyn Sink,
    ) -> ActionResult {
        let aid = action.action_id.as_str();
        let cached = lock(&self.state).state.action(exec_id, aid).cloned();
        let mut attempts = 0;
        if let Some(rec) = &cached {
            match rec.state {
                ActionState::Succeeded | ActionState::Failed => {
                    let result = ActionResult {
                        execution_id: Some(exec_id.to_string()),
                        action_id: aid.to_string(),
                        ok: rec.state == ActionState::Succeeded,
                        error_code: rec.error_code.clone(),
                        message: rec.message.clone(),
                        started_at: Some(rec.started_at.clone()),
                        finished_at: rec.finished_at.clone(),
                    };
                    if !sink.has_pending_result(exec_id, aid) {
                        if !rec.reported {
                            self.log(
                                sink,
                                exec_id,
                                aid,
                                "INFO",
                                format!(
                                    "{} already {} at {}: result replayed from the idempotency cache, not executed \
                                     again",
                                    action.action_type,
                                    if result.ok { "succeeded" } else { "failed" },
                                    rec.finished_at.as_deref().unwrap_or("?")
                                ),
                            );
                        }
                        // A reported result is sent again quietly (idempotent at the control plane): its lease was
                        // issued before our report arrived, or it lost the report.
                        sink.result(&plan.plan_id, &plan.execution_id, &result, true);
                    }
                    return result;
                }
                ActionState::Started => {
                    attempts = rec.attempts;
                    self.log(
                        sink,
                        exec_id,
                        aid,
                        "WARN",
                        format!(
                            "{} was interrupted (agent restart) after starting at {}; running it again (the operation is idempotent)",
                            action.action_type, rec.started_at
                        ),
                    );
                }
            }
        }
        let started_at = now_rfc3339();
        let mut rec = ActionRecord {
            execution_id: exec_id.to_string(),
            action_id: aid.to_string(),
            plan_id: plan.plan_id.clone(),
            action_type: action.action_type.clone(),
            state: ActionState::Started,
            error_code: None,
            message: None,
            started_at: cached
                .as_ref()
                .map(|c| c.started_at.clone())
                .unwrap_or_else(|| started_at.clone()),
            finished_at: None,
            attempts: attempts + 1,
            reported: false,
            updated_at: started_at.clone(),
        };
        let outcome = match self.save_record(rec.clone()) {
            Err(e) => Err(e),
            Ok(()) => {
                sink.progress(ExecutionUpdate {
                    execution_id: exec_id.to_string(),
                    state: "IN_PROGRESS".into(),
                    error_code: None,
                    error_message: None,
                    updated_at: Some(started_at.clone()),
                });
                self.log(
                    sink,
                    exec_id,
                    aid,
                    "INFO",
                    format!("{} {} started", action.action_type, describe(action)),
                );
                let limit = if action.timeout > 0 {
                    Duration::from_secs(action.timeout as u64)
                } else {
                    self.default_timeout
                };
                match tokio::time::timeout(limit, self.dispatch(action)).await {
                    Ok(r) => r,
                    Err(_) => Err(VmError::new(
                        "ACTION_TIMEOUT",
                        format!("{} did not finish within {}s", action.action_type, limit.as_secs()),
                    )),
                }
            }
        };
        let finished_at = now_rfc3339();
        let (ok, code, message) = match &outcome {
            Ok(()) => (true, None, "ok".to_string()),
            Err(e) => {
                let code = if e.code.trim().is_empty() {
                    "ACTION_FAILED".to_string()
                } else {
                    e.code.clone()
                };
                let msg = if e.message.trim().is_empty() {
                    format!("{} failed", action.action_type)
                } else {
                    e.message.clone()
                };
                (false, Some(code), msg)
            }
        };
        match &code {
            None => self.log(sink, exec_id, aid, "INFO", format!("{} succeeded", action.action_type)),
            Some(c) => self.log(
                sink,
                exec_id,
                aid,
                "ERROR",
                format!("{} failed: {c}: {message}", action.action_type),
            ),
        }
        rec.state = if ok {
            ActionState::Succeeded
        } else {
            ActionState::Failed
        };
        rec.error_code = code.clone();
        rec.message = Some(message.clone());
        rec.finished_at = Some(finished_at.clone());
        rec.updated_at = finished_at.clone();
        if let Err(e) = self.save_record(rec) {
            crate::logging::log("ERROR", &format!("cannot record the result of action {aid}: {e}"));
        }
        let result = ActionResult {
            execution_id: Some(exec_id.to_string()),
            action_id: aid.to_string(),
            ok,
            error_code: code,
            message: Some(message),
            started_at: Some(started_at),
            finished_at: Some(finished_at),
        };
        sink.result(&plan.plan_id, &plan.execution_id, &result, false);
        result
    }

    async fn dispatch(&self, action: &LeasedAction) -> Result<(), VmError> {
        match action.action_type.as_str() {
            ACTION_CREATE => {
                let p: MicroVmCreateParams = serde_json::from_value(action.params.clone())
                    .map_err(|e| VmError::new("INVALID_PARAMS", format!("MicroVMCreate params: {e}")))?;
                if p.vm_id.trim().is_empty() {
                    return Err(VmError::new(
                        "INVALID_PARAMS",
                        "MicroVMCreate params: vm_id is required",
                    ));
                }
                self.backend.create(&p).await
            }
            ACTION_START | ACTION_STOP | ACTION_DELETE => {
                let p: MicroVmRefParams = serde_json::from_value(action.params.clone())
                    .map_err(|e| VmError::new("INVALID_PARAMS", format!("{} params: {e}", action.action_type)))?;
                if p.vm_id.trim().is_empty() {
                    return Err(VmError::new(
                        "INVALID_PARAMS",
                        format!("{} params: vm_id is required", action.action_type),
                    ));
                }
                match action.action_type.as_str() {
                    ACTION_START => self.backend.start(&p.vm_id).await,
                    ACTION_STOP => self.backend.stop(&p.vm_id).await,
                    _ => self.backend.delete(&p.vm_id).await,
                }
            }
            other => Err(VmError::new(
                "UNSUPPORTED_ACTION",
                format!("unknown action type: {other}"),
            )),
        }
    }
}

fn describe(action: &LeasedAction) -> String {
    match action.params.get("vm_id").and_then(|v| v.as_str()) {
        Some(id) => format!("vm_id={id}"),
        None => String::new(),
    }
}

/// A sink that keeps everything in memory (used by `apply` and tests).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub logs: Vec<LogEntry>,
    pub results: Vec<(ActionResult, bool)>,
    pub progress: Vec<ExecutionUpdate>,
}

impl Sink for MemorySink {
    fn log(&mut self, entry: LogEntry) {
        self.logs.push(entry);
    }
    fn result(&mut self, _plan_id: &str, _plan_execution_id: &str, result: &ActionResult, replay: bool) {
        self.results.push((result.clone(), replay));
    }
    fn progress(&mut self, update: ExecutionUpdate) {
        self.progress.push(update);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nkudo_core::api::MicroVmReport;
    use serde_json::json;

    #[derive(Default)]
    struct FakeVm {
        calls: Mutex<Vec<String>>,
        fail_start: bool,
    }

    impl VmBackend for FakeVm {
        async fn create(&self, p: &MicroVmCreateParams) -> Result<(), VmError> {
            lock(&self.calls).push(format!("create {}", p.vm_id));
            Ok(())
        }
        async fn start(&self, id: &str) -> Result<(), VmError> {
            lock(&self.calls).push(format!("start {id}"));
            if self.fail_start {
                return Err(VmError::new("VM_BOOT_FAILED", "the VM could not boot"));
            }
            Ok(())
        }
        async fn stop(&self, id: &str) -> Result<(), VmError> {
            lock(&self.calls).push(format!("stop {id}"));
            Ok(())
        }
        async fn delete(&self, id: &str) -> Result<(), VmError> {
            lock(&self.calls).push(format!("delete {id}"));
            Ok(())
        }
        async fn list(&self) -> Vec<MicroVmReport> {
            Vec::new()
        }
        async fn reconcile(&self) -> Vec<MicroVmReport> {
            Vec::new()
        }
        fn binary_version(&self) -> Option<String> {
            None
        }
    }

    fn action(id: &str, ty: &str, exec: Option<&str>) -> LeasedAction {
        LeasedAction {
            action_id: id.into(),
            action_type: ty.into(),
            params: json!({"vm_id": "vm-1", "name": "one", "vcpu": 1, "memory_mib": 256}),
            timeout: 30,
            execution_id: exec.map(str::to_string),
        }
    }

    fn plan(id: &str, actions: Vec<LeasedAction>) -> PlanRun {
        PlanRun {
            plan_id: id.into(),
            execution_id: id.into(),
            actions,
        }
    }

    fn setup(name: &str, fail_start: bool) -> (Executor<FakeVm>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("nkudo-exec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = StateStore::open(&dir).unwrap();
        let vm = FakeVm {
            fail_start,
            ..Default::default()
        };
        (Executor::new(Arc::new(vm), Arc::new(Mutex::new(st))), dir)
    }

    #[tokio::test]
    async fn a_finished_action_is_replayed_not_repeated() {
        let (ex, dir) = setup("replay", false);
        let p = plan(
            "p1",
            vec![
                action("create", ACTION_CREATE, Some("e1")),
                action("start", ACTION_START, Some("e2")),
            ],
        );
        let stop = AtomicBool::new(false);
        let mut sink = MemorySink::default();
        let out = ex.run_plan(&p, &mut sink, &stop).await;
        assert!(!out.failed && out.results.len() == 2);
        let out2 = ex.run_plan(&p, &mut sink, &stop).await;
        assert!(out2.results.iter().all(|r| r.ok));
        assert_eq!(*lock(&ex.backend.calls), vec!["create vm-1", "start vm-1"]);
        assert_eq!(sink.results.iter().filter(|(_, replay)| *replay).count(), 2);
        // Once the control plane acknowledged the results, a replay adds no log line.
        let logs_before = sink.logs.len();
        lock(&ex.state)
            .state
            .mark_reported(&[("e1".into(), "create".into()), ("e2".into(), "start".into())]);
        ex.run_plan(&p, &mut sink, &stop).await;
        assert_eq!(sink.logs.len(), logs_before);
        assert_eq!(sink.results.iter().filter(|(_, replay)| *replay).count(), 4);
        assert_eq!(lock(&ex.backend.calls).len(), 2);
        // Sequences per execution start at 1 and increase.
        let seqs: Vec<i64> = sink
            .logs
            .iter()
            .filter(|l| l.execution_id == "e1")
            .map(|l| l.sequence)
            .collect();
        assert_eq!(seqs[0], 1);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        // The same action id in another plan (other execution ids) runs: no false cache hit (bug 29).
        let p2 = plan("p2", vec![action("create", ACTION_CREATE, Some("e3"))]);
        ex.run_plan(&p2, &mut sink, &stop).await;
        assert_eq!(lock(&ex.backend.calls).len(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_started_but_unfinished_action_runs_again() {
        let (ex, dir) = setup("restart", false);
        lock(&ex.state).state.put_action(ActionRecord {
            execution_id: "e1".into(),
            action_id: "create".into(),
            plan_id: "p1".into(),
            action_type: ACTION_CREATE.into(),
            state: ActionState::Started,
            error_code: None,
            message: None,
            started_at: now_rfc3339(),
            finished_at: None,
            attempts: 1,
            reported: false,
            updated_at: now_rfc3339(),
        });
        let mut sink = MemorySink::default();
        let p = plan("p1", vec![action("create", ACTION_CREATE, Some("e1"))]);
        let out = ex.run_plan(&p, &mut sink, &AtomicBool::new(false)).await;
        assert!(out.results[0].ok);
        assert_eq!(lock(&ex.backend.calls).len(), 1);
        let rec = lock(&ex.state).state.action("e1", "create").cloned().unwrap();
        assert_eq!((rec.state, rec.attempts), (ActionState::Succeeded, 2));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn the_first_failure_ends_the_plan_with_code_and_message() {
        let (ex, dir) = setup("fail", true);
        let p = plan(
            "p1",
            vec![
                action("create", ACTION_CREATE, Some("e1")),
                action("start", ACTION_START, Some("e2")),
                action("stop", ACTION_STOP, Some("e3")),
            ],
        );
        let mut sink = MemorySink::default();
        let out = ex.run_plan(&p, &mut sink, &AtomicBool::new(false)).await;
        assert!(out.failed);
        assert_eq!(out.results.len(), 2);
        let r = &out.results[1];
        assert_eq!(r.error_code.as_deref(), Some("VM_BOOT_FAILED"));
        assert!(!r.message.as_deref().unwrap_or("").is_empty());
        assert!(!lock(&ex.backend.calls).iter().any(|c| c.starts_with("stop")));
        // Unknown action types and bad params fail cleanly.
        let bad = plan("p2", vec![action("x", "MicroVMFly", Some("e9"))]);
        let out = ex.run_plan(&bad, &mut sink, &AtomicBool::new(false)).await;
        assert_eq!(out.results[0].error_code.as_deref(), Some("UNSUPPORTED_ACTION"));
        let mut a = action("y", ACTION_START, Some("e10"));
        a.params = json!({"vm": 1});
        let out = ex
            .run_plan(&plan("p3", vec![a]), &mut sink, &AtomicBool::new(false))
            .await;
        assert_eq!(out.results[0].error_code.as_deref(), Some("INVALID_PARAMS"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_stop_request_ends_the_plan_between_actions() {
        let (ex, dir) = setup("stop", false);
        let p = plan("p1", vec![action("create", ACTION_CREATE, Some("e1"))]);
        let out = ex
            .run_plan(&p, &mut MemorySink::default(), &AtomicBool::new(true))
            .await;
        assert!(out.interrupted && out.results.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
