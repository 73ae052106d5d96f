//! `nkudo-edge apply --plan file.json`: a local plan through the same executor and provider.

use crate::backend::ProviderBackend;
use crate::cli::ProviderSettings;
use crate::executor::{Executor, MemorySink, PlanRun};
use crate::state::StateStore;
use crate::{ExitError, EXIT_FAILURE};
use nkudo_core::api::{ExecutionResultRequest, LeasedAction};
use serde::Deserialize;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// The local plan format of the earlier agent (reference §6.1).
#[derive(Debug, Deserialize)]
pub struct LocalPlan {
    #[serde(default)]
    pub plan_id: Option<String>,
    #[serde(default)]
    pub execution_id: Option<String>,
    pub actions: Vec<LocalAction>,
}

#[derive(Debug, Deserialize)]
pub struct LocalAction {
    #[serde(default)]
    pub action_id: Option<String>,
    #[serde(rename = "type")]
    pub action_type: String,
    #[serde(default)]
    pub params: serde_json::Value,
    /// Accepted (the earlier format has it); not used.
    #[serde(default)]
    pub desired_state: Option<String>,
    #[serde(default)]
    pub timeout: i64,
}

pub fn load_plan(path: &Path) -> Result<PlanRun, ExitError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ExitError::usage(format!("read plan {}: {e}", path.display())))?;
    let plan: LocalPlan =
        serde_json::from_str(&text).map_err(|e| ExitError::usage(format!("plan {}: {e}", path.display())))?;
    if plan.actions.is_empty() {
        return Err(ExitError::usage(format!("plan {}: no actions", path.display())));
    }
    let execution_id = plan
        .execution_id
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| format!("exec-{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()));
    let actions = plan
        .actions
        .into_iter()
        .enumerate()
        .map(|(i, a)| LeasedAction {
            action_id: a
                .action_id
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| format!("action-{}", i + 1)),
            action_type: a.action_type,
            params: a.params,
            timeout: a.timeout,
            execution_id: None,
        })
        .collect();
    Ok(PlanRun {
        plan_id: plan.plan_id.unwrap_or_else(|| execution_id.clone()),
        execution_id,
        actions,
    })
}

/// Runs the plan; prints the result JSON on stdout; exit 1 when an action failed.
pub async fn apply(plan_path: &Path, state_dir: &Path, provider: &ProviderSettings) -> Result<(), ExitError> {
    let plan = load_plan(plan_path)?;
    let store = StateStore::open(state_dir).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    let backend = Arc::new(ProviderBackend::new(provider));
    let executor = Executor::new(backend, Arc::new(Mutex::new(store)));
    let mut sink = MemorySink::default();
    let out = executor.run_plan(&plan, &mut sink, &AtomicBool::new(false)).await;
    let report = ExecutionResultRequest {
        plan_id: Some(plan.plan_id.clone()),
        execution_id: Some(plan.execution_id.clone()),
        results: out.results,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    println!("{json}");
    if out.failed {
        return Err(ExitError::new(EXIT_FAILURE, "an action failed"));
    }
    Ok(())
}
