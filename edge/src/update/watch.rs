//! `nkudo-edge update-watch` (hidden): the watcher of a trial. The agent starts it, detached, from the OLD
//! (known-good) binary right before it restarts into the new version. It polls `update.json` (and, in exec
//! mode, the agent's PID) every 300 ms until the trial ends:
//!
//! * committed, or rolled back by the new version itself → exit 0;
//! * the agent died before committing (exec mode: nothing else would restart it), the deadline passed without a
//!   commit, or the new version started more than `--max-starts` times → switch `current` back (under the layout
//!   lock, only if it still points at the version on trial), record phase rolled-back with the reason, stop the
//!   new version if it is still alive, then restart the old one: exec mode → this process becomes the agent
//!   (execv `<root>/current/bin/nkudo-edge` with the original `run` arguments; it writes its PID into
//!   `agent.pid`); exit mode → `systemctl reset-failed` + `systemctl restart <unit>` when systemd started the
//!   agent (`INVOCATION_ID`) and systemctl exists, else stop the new version and leave the restart to the
//!   supervisor.
//!   When the agent on trial was stopped by a signal (an operator's stop) the rollback happens but nothing is
//!   restarted.

use super::restart;
use super::state::{watch_decision, UpdateState, WatchDecision};
use super::{WATCH_GRACE, WATCH_POLL};
use crate::cli::{RestartMode, WatchArgs};
use crate::logging::{error, info, warn};
use crate::state::now_rfc3339;
use crate::{ExitError, EXIT_FAILURE};
use nkudo_core::layout::Layout;
use std::time::Duration;

/// How long a new version gets to stop after SIGTERM before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs the watcher (blocking). Returns when the trial is over; in exec mode after a rollback it becomes the
/// agent (never returns on success).
pub fn watch(a: WatchArgs) -> Result<(), ExitError> {
    let mode = a.restart_mode.effective();
    info(&format!(
        "update watcher (pid {}): watching the trial of {} (agent pid {}, restart mode {})",
        std::process::id(),
        a.attempt_to,
        a.agent_pid,
        mode.as_str()
    ));
    let (reason, restart_agent) = loop {
        std::thread::sleep(WATCH_POLL);
        let st = match UpdateState::load(&a.state_dir) {
            Ok(s) => s,
            Err(e) => {
                // Decide on what the agent told us at the switch (the deadline), so a damaged file cannot
                // leave an uncommitted version running for good.
                warn(&format!("update watcher: cannot read the update state ({e})"));
                fallback(&a)
            }
        };
        let alive = (mode == RestartMode::Exec).then(|| restart::pid_alive(a.agent_pid));
        match watch_decision(
            &st,
            &a.attempt_to,
            &a.attempt_started_at,
            chrono::Utc::now(),
            alive,
            a.max_starts,
            WATCH_GRACE,
        ) {
            WatchDecision::Wait => continue,
            WatchDecision::Done => {
                info(&format!(
                    "update watcher: the trial of {} is over ({}); exiting",
                    a.attempt_to,
                    st.phase.as_str()
                ));
                return Ok(());
            }
            WatchDecision::RollBack { reason, restart } => break (reason, restart),
        }
    };
    error(&format!("update watcher: {reason}"));
    // Switch back under the layout lock, unless the trial was decided meanwhile.
    let layout = Layout::open(&a.root).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
    {
        let guard = layout.lock().map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
        let mut st = UpdateState::load(&a.state_dir).unwrap_or_else(|_| fallback(&a));
        if !st.is_trial_of(&a.attempt_to, &a.attempt_started_at) {
            info("update watcher: the trial was decided meanwhile; exiting");
            return Ok(());
        }
        let mut why = reason.clone();
        let current = layout.current().ok().flatten().map(|v| v.to_string());
        if current.as_deref() == Some(a.attempt_to.as_str()) {
            match guard.rollback() {
                Ok(v) => info(&format!("update watcher: rolled back to {v}")),
                Err(e) => {
                    error(&format!("update watcher: rollback failed: {e}"));
                    why = format!("{reason}; the rollback failed: {e}");
                }
            }
        }
        st.mark_rolled_back(&why, &now_rfc3339());
        if let Err(e) = st.save(&a.state_dir) {
            error(&format!("update watcher: cannot write the update state: {e}"));
        }
    }
    if !restart_agent {
        if mode == RestartMode::Exec && restart::pid_alive(a.agent_pid) {
            restart::terminate(a.agent_pid, KILL_GRACE);
        }
        info("update watcher: the agent was stopped during the trial; not restarting it (its next start runs the previous version)");
        return Ok(());
    }
    match mode {
        RestartMode::Exit => {
            // systemd started the agent (INVOCATION_ID is inherited) and systemctl is there: ask systemd.
            let under_systemd = std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty());
            if let Some(systemctl) = restart::systemctl().filter(|_| under_systemd) {
                let unit = &a.systemd_unit;
                let _ = std::process::Command::new(&systemctl)
                    .args(["reset-failed", unit])
                    .status();
                info(&format!("update watcher: systemctl restart {unit}"));
                match std::process::Command::new(&systemctl)
                    .args(["restart", "--no-block", unit])
                    .status()
                {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(ExitError::new(EXIT_FAILURE, format!("systemctl restart {unit}: {s}"))),
                    Err(e) => Err(ExitError::new(EXIT_FAILURE, format!("systemctl restart {unit}: {e}"))),
                }
            } else {
                // No systemd: stop the new version if it still runs; whatever supervises it starts `current`.
                if let Some(pid) = restart::read_pid_file(&a.state_dir).filter(|p| looks_like_agent(*p)) {
                    restart::terminate(pid, KILL_GRACE);
                }
                info("update watcher: not under systemd; the agent's supervisor restarts it from current");
                Ok(())
            }
        }
        _ => {
            if restart::pid_alive(a.agent_pid) && !restart::terminate(a.agent_pid, KILL_GRACE) {
                warn(&format!("update watcher: agent pid {} does not die", a.agent_pid));
            }
            // This process becomes the agent again, on the previous version.
            let pid = std::process::id();
            if let Err(e) = restart::write_pid_file(&a.state_dir, pid) {
                warn(&format!("update watcher: cannot write agent.pid: {e}"));
            }
            let target = a.root.join("current").join(&a.exe_rel);
            info(&format!(
                "update watcher: starting the agent again from {} (pid {pid})",
                target.display()
            ));
            let e = restart::exec(&target, &a.run_args);
            Err(ExitError::new(
                EXIT_FAILURE,
                format!("update watcher: cannot execute {}: {e}", target.display()),
            ))
        }
    }
}

/// The trial as the agent described it at the switch (when update.json cannot be read).
fn fallback(a: &WatchArgs) -> UpdateState {
    UpdateState {
        phase: nkudo_core::api::UpdatePhase::Trial,
        attempt_to: Some(a.attempt_to.clone()),
        attempt_started_at: Some(a.attempt_started_at.clone()),
        trial_deadline: Some(a.deadline.clone()).filter(|d| !d.is_empty()),
        ..Default::default()
    }
}

/// Whether `pid` runs something named nkudo-edge (a guard before signalling a PID read from a file).
fn looks_like_agent(pid: u32) -> bool {
    restart::pid_alive(pid)
        && pid != std::process::id()
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("nkudo-edge"))
            .unwrap_or(false)
}
