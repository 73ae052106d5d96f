//! `<state-dir>/update.json`: where the agent's self-update stands, written atomically, shared by the agent (old
//! and new version) and the update watcher. The decisions taken on it at start-up ([`start_guard`]) and by the
//! watcher ([`watch_decision`]) are pure functions of the state, the running version and the time.

use crate::fsutil;
use nkudo_core::api::UpdatePhase;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const UPDATE_FILE: &str = "update.json";
pub const PID_FILE: &str = "agent.pid";
pub const WATCH_LOG: &str = "update-watch.log";
pub const DOWNLOADS_DIR: &str = "downloads";
/// Versions remembered as refused (failed verification, failed their trial) at most.
pub const MAX_REFUSED: usize = 20;

/// A version that is not retried automatically (until the control plane names a different desired version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub version: String,
    pub reason: String,
    pub at: String,
    /// The offer refused ([`offer_digest`]): the same version offered differently (re-signed, or named a rollback
    /// target) is tried again. `None`: any offer of the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<String>,
}

/// What identifies an offer for the refusal memory: SHA-256 of the signed manifest text and the rollback mark.
pub fn offer_digest(offer: &nkudo_core::api::UpdateOffer) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(offer.manifest.as_bytes());
    ctx.update(if offer.rollback { b"\nrollback" } else { b"\nforward" });
    super::verify::hex(ctx.finish().as_ref())
}

/// The update state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UpdateState {
    #[serde(default)]
    pub phase: UpdatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_to: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_started_at: Option<String>,
    /// [`offer_digest`] of the offer the attempt follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_offer: Option<String>,
    /// RFC 3339: the trial must commit before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_deadline: Option<String>,
    /// The health window of the trial, in seconds (for messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_window_secs: Option<u64>,
    /// The agent on trial was stopped by a signal (cleared at the next start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_during_trial: bool,
    /// Process starts of `attempt_to` during the trial.
    #[serde(default)]
    pub starts: u32,
    /// Process starts of `restarts_version` beyond the first.
    #[serde(default)]
    pub restarts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The desired version the control plane last named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,
    /// The PID of the agent process (written at every start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid: Option<u32>,
    /// Versions not retried automatically.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
}

impl UpdateState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(UPDATE_FILE)
    }

    /// Reads the state; a missing file is the default (idle) state, an unreadable one is an error.
    pub fn load(state_dir: &Path) -> std::io::Result<UpdateState> {
        match std::fs::read(Self::path(state_dir)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("update.json: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UpdateState::default()),
            Err(e) => Err(e),
        }
    }

    /// Like [`UpdateState::load`], but a damaged file counts as the default state (it is rewritten next save).
    pub fn load_or_default(state_dir: &Path) -> UpdateState {
        Self::load(state_dir).unwrap_or_default()
    }

    /// Writes the state atomically (0600).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        fsutil::ensure_dir(state_dir, 0o700)?;
        let mut bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        fsutil::write_atomic(&Self::path(state_dir), &bytes, 0o600)
    }

    /// Whether the offer (`version`, [`offer_digest`]) was refused before.
    pub fn is_refused(&self, version: &str, offer: &str) -> Option<&Refused> {
        self.refused
            .iter()
            .find(|r| r.version == version && r.offer.as_deref().is_none_or(|o| o == offer))
    }

    /// Remembers `version` (the offer of the current attempt, when it is the one aimed at) as refused: not retried
    /// automatically.
    pub fn refuse(&mut self, version: &str, reason: &str, now: &str) {
        let offer = if self.attempt_to.as_deref() == Some(version) {
            self.attempt_offer.clone()
        } else {
            None
        };
        self.refused.retain(|r| r.version != version);
        self.refused.push(Refused {
            version: version.to_string(),
            reason: reason.to_string(),
            at: now.to_string(),
            offer,
        });
        if self.refused.len() > MAX_REFUSED {
            let extra = self.refused.len() - MAX_REFUSED;
            self.refused.drain(..extra);
        }
    }

    /// Records the desired version the control plane names; a different one than before clears the memory of
    /// refused versions (an operator's new decision). Returns whether anything changed.
    pub fn set_desired(&mut self, desired: Option<&str>) -> bool {
        if self.desired_version.as_deref() == desired {
            return false;
        }
        if desired.is_some() {
            self.refused.clear();
        }
        self.desired_version = desired.map(str::to_string);
        true
    }

    /// Counts a process start of `running` (the `restarts` of the heartbeat).
    pub fn count_start(&mut self, running: &str, pid: u32) {
        if self.restarts_version.as_deref() == Some(running) {
            self.restarts += 1;
        } else {
            self.restarts_version = Some(running.to_string());
            self.restarts = 0;
        }
        self.agent_pid = Some(pid);
        self.stopped_during_trial = false;
    }

    /// The trial of the attempt (`to`, `started_at`) is still under way.
    pub fn is_trial_of(&self, to: &str, started_at: &str) -> bool {
        self.phase == UpdatePhase::Trial
            && self.attempt_to.as_deref() == Some(to)
            && self.attempt_started_at.as_deref() == Some(started_at)
    }

    pub fn deadline(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.trial_deadline.as_deref().and_then(crate::state::parse_time)
    }

    /// Ends the trial with a rollback: phase rolled-back, the reason, `attempt_to` remembered as refused.
    pub fn mark_rolled_back(&mut self, reason: &str, now: &str) {
        self.phase = UpdatePhase::RolledBack;
        self.last_error = Some(reason.to_string());
        self.trial_deadline = None;
        if let Some(to) = self.attempt_to.clone() {
            self.refuse(&to, reason, now);
        }
    }
}

/// What `run` does first, given the update state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartDecision {
    /// No trial concerns this process.
    Normal,
    /// This process is the version on trial: the start was counted; watch the deadline and commit when healthy.
    Trial,
    /// This process is the version on trial and must roll the host back (then restart into the previous version).
    RollBack { reason: String },
    /// A trial was recorded, but this process is not the version on trial (the switch never happened, or the host
    /// was switched back outside the agent): the trial is over.
    TrialOver { reason: String },
}

/// The start guard: counts a start of the version on trial and decides whether it may go on. Mutates `state`
/// (the start counter, and the phase for [`StartDecision::TrialOver`]); the caller persists it and, for
/// [`StartDecision::RollBack`], rolls back and records the reason ([`UpdateState::mark_rolled_back`]).
pub fn start_guard(
    state: &mut UpdateState,
    running: &str,
    now: chrono::DateTime<chrono::Utc>,
    max_starts: u32,
) -> StartDecision {
    if state.phase != UpdatePhase::Trial {
        return StartDecision::Normal;
    }
    let to = state.attempt_to.clone().unwrap_or_default();
    if to != running {
        let reason = format!(
            "the trial of {to} ended without a commit: this host runs {running} (interrupted before the switch, or \
             switched back outside the agent)"
        );
        state.mark_rolled_back(&reason, &crate::state::now_rfc3339());
        return StartDecision::TrialOver { reason };
    }
    state.starts += 1;
    if state.starts > max_starts {
        return StartDecision::RollBack {
            reason: format!(
                "{to} crashed {} times during the trial (more than {max_starts} starts without a commit); back on \
                 the previous version",
                state.starts - 1
            ),
        };
    }
    match state.deadline() {
        Some(d) if now > d => StartDecision::RollBack {
            reason: no_heartbeat_reason(&to, state),
        },
        None => StartDecision::RollBack {
            reason: format!("{to}: the trial has no readable deadline; back on the previous version"),
        },
        Some(_) => StartDecision::Trial,
    }
}

/// "no healthy heartbeat within the health window (Ns)".
pub fn no_heartbeat_reason(to: &str, state: &UpdateState) -> String {
    let w = state.health_window_secs.map(|w| format!(" ({w}s)")).unwrap_or_default();
    format!("{to}: no healthy heartbeat within the health window{w}; back on the previous version")
}

/// What the watcher does at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchDecision {
    /// Keep watching.
    Wait,
    /// The trial is over without the watcher (committed, rolled back by the new version, or another attempt).
    Done,
    /// Roll back: kill the agent if alive, switch `current` back, record the reason, and (`restart`) start the
    /// old version. No restart when the agent on trial was stopped by a signal (an operator's stop): the next
    /// start runs the previous version.
    RollBack { reason: String, restart: bool },
}

/// The watcher's decision. `agent_alive` is `None` when the PID is not watched (systemd restarts the agent, so
/// its PID changes). `grace` delays the deadline so that the new version's own timer acts first.
pub fn watch_decision(
    state: &UpdateState,
    to: &str,
    started_at: &str,
    now: chrono::DateTime<chrono::Utc>,
    agent_alive: Option<bool>,
    max_starts: u32,
    grace: std::time::Duration,
) -> WatchDecision {
    if !state.is_trial_of(to, started_at) {
        return WatchDecision::Done;
    }
    let restart = !state.stopped_during_trial;
    if state.starts > max_starts {
        return WatchDecision::RollBack {
            reason: format!(
                "{to} crashed {} times during the trial (more than {max_starts} starts without a commit); back on \
                 the previous version",
                state.starts.saturating_sub(1)
            ),
            restart,
        };
    }
    if agent_alive == Some(false) {
        let reason = if state.stopped_during_trial {
            format!("{to} was stopped (signal) during the trial, before it committed; back on the previous version")
        } else {
            format!("{to} exited during the trial, before it committed; back on the previous version")
        };
        return WatchDecision::RollBack { reason, restart };
    }
    let late = match state.deadline() {
        Some(d) => now > d + chrono::Duration::from_std(grace).unwrap_or_default(),
        None => true,
    };
    if late {
        return WatchDecision::RollBack {
            reason: no_heartbeat_reason(to, state),
            restart,
        };
    }
    WatchDecision::Wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as CDuration, Utc};
    use std::time::Duration;

    fn trial(now: chrono::DateTime<Utc>) -> UpdateState {
        UpdateState {
            phase: UpdatePhase::Trial,
            attempt_from: Some("1.0.0".into()),
            attempt_to: Some("1.1.0".into()),
            attempt_started_at: Some("2026-01-01T00:00:00.000Z".into()),
            trial_deadline: Some((now + CDuration::seconds(60)).to_rfc3339()),
            health_window_secs: Some(8),
            starts: 0,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(UpdateState::load(tmp.path()).unwrap(), UpdateState::default());
        let mut s = trial(Utc::now());
        s.refuse("0.9.0", "bad signature", "2026-01-01T00:00:00Z");
        s.last_error = Some("x".into());
        s.agent_pid = Some(42);
        s.save(tmp.path()).unwrap();
        let back = UpdateState::load(tmp.path()).unwrap();
        assert_eq!(back, s);
        let text = std::fs::read_to_string(tmp.path().join(UPDATE_FILE)).unwrap();
        assert!(text.contains("\"phase\": \"trial\""), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join(UPDATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(tmp.path().join(UPDATE_FILE), b"{not json").unwrap();
        assert!(UpdateState::load(tmp.path()).is_err());
        assert_eq!(UpdateState::load_or_default(tmp.path()), UpdateState::default());
    }

    #[test]
    fn a_different_desired_version_clears_the_refused_memory() {
        let mut s = UpdateState::default();
        assert!(s.set_desired(Some("1.1.0")));
        s.refuse("1.1.0", "rolled back", "t");
        assert!(!s.set_desired(Some("1.1.0")));
        assert!(s.is_refused("1.1.0", "any").is_some());
        assert!(s.set_desired(Some("1.2.0")));
        assert!(s.is_refused("1.1.0", "any").is_none());
        // The offer of the attempt is remembered: another offer of the same version is tried again.
        s.attempt_to = Some("1.2.0".into());
        s.attempt_offer = Some("d1".into());
        s.refuse("1.2.0", "older", "t");
        assert!(s.is_refused("1.2.0", "d1").is_some());
        assert!(s.is_refused("1.2.0", "d2").is_none());
        for i in 0..30 {
            s.refuse(&format!("2.0.{i}"), "x", "t");
        }
        assert_eq!(s.refused.len(), MAX_REFUSED);
        assert!(s.is_refused("2.0.29", "x").is_some());
    }

    #[test]
    fn restarts_count_per_version() {
        let mut s = UpdateState::default();
        s.count_start("1.0.0", 10);
        assert_eq!(s.restarts, 0);
        s.count_start("1.0.0", 11);
        s.count_start("1.0.0", 12);
        assert_eq!(s.restarts, 2);
        assert_eq!(s.agent_pid, Some(12));
        s.count_start("1.1.0", 13);
        assert_eq!(s.restarts, 0);
    }

    #[test]
    fn start_guard_outside_a_trial_does_nothing() {
        let now = Utc::now();
        for phase in [
            UpdatePhase::Idle,
            UpdatePhase::Committed,
            UpdatePhase::RolledBack,
            UpdatePhase::Failed,
        ] {
            let mut s = UpdateState { phase, ..trial(now) };
            let before = s.clone();
            assert_eq!(start_guard(&mut s, "1.1.0", now, 3), StartDecision::Normal);
            assert_eq!(s, before);
        }
    }

    #[test]
    fn start_guard_counts_starts_and_rolls_back_after_max() {
        let now = Utc::now();
        let mut s = trial(now);
        for n in 1..=3 {
            assert_eq!(start_guard(&mut s, "1.1.0", now, 3), StartDecision::Trial);
            assert_eq!(s.starts, n);
        }
        match start_guard(&mut s, "1.1.0", now, 3) {
            StartDecision::RollBack { reason } => assert!(reason.contains("crashed 3 times"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn start_guard_rolls_back_after_the_deadline() {
        let now = Utc::now();
        let mut s = trial(now);
        match start_guard(&mut s, "1.1.0", now + CDuration::seconds(61), 3) {
            StartDecision::RollBack { reason } => {
                assert!(
                    reason.contains("no healthy heartbeat within the health window"),
                    "{reason}"
                )
            }
            d => panic!("{d:?}"),
        }
        let mut s = UpdateState {
            trial_deadline: None,
            ..trial(now)
        };
        assert!(matches!(
            start_guard(&mut s, "1.1.0", now, 3),
            StartDecision::RollBack { .. }
        ));
    }

    #[test]
    fn start_guard_of_another_version_ends_the_trial() {
        let now = Utc::now();
        let mut s = trial(now);
        match start_guard(&mut s, "1.0.0", now, 3) {
            StartDecision::TrialOver { reason } => assert!(reason.contains("1.1.0"), "{reason}"),
            d => panic!("{d:?}"),
        }
        assert_eq!(s.phase, UpdatePhase::RolledBack);
        assert!(s.is_refused("1.1.0", "x").is_some());
        assert_eq!(s.starts, 0);
    }

    #[test]
    fn watcher_decisions() {
        let now = Utc::now();
        let s = trial(now);
        let started = s.attempt_started_at.clone().unwrap();
        let g = Duration::from_secs(2);
        assert_eq!(
            watch_decision(&s, "1.1.0", &started, now, Some(true), 3, g),
            WatchDecision::Wait
        );
        assert_eq!(
            watch_decision(&s, "1.1.0", &started, now, None, 3, g),
            WatchDecision::Wait
        );
        // The agent died before committing (exec mode).
        match watch_decision(&s, "1.1.0", &started, now, Some(false), 3, g) {
            WatchDecision::RollBack { reason, restart: true } => {
                assert!(reason.contains("exited during the trial"), "{reason}")
            }
            d => panic!("{d:?}"),
        }
        // Deadline plus grace.
        assert_eq!(
            watch_decision(&s, "1.1.0", &started, now + CDuration::seconds(61), None, 3, g),
            WatchDecision::Wait
        );
        match watch_decision(&s, "1.1.0", &started, now + CDuration::seconds(63), Some(true), 3, g) {
            WatchDecision::RollBack { reason, restart: true } => {
                assert!(reason.contains("within the health window (8s)"), "{reason}")
            }
            d => panic!("{d:?}"),
        }
        // Stopped by a signal (an operator): rolled back, not restarted.
        let stopped = UpdateState {
            stopped_during_trial: true,
            ..s.clone()
        };
        match watch_decision(&stopped, "1.1.0", &started, now, Some(false), 3, g) {
            WatchDecision::RollBack { reason, restart: false } => assert!(reason.contains("stopped"), "{reason}"),
            d => panic!("{d:?}"),
        }
        // Too many starts.
        let many = UpdateState { starts: 4, ..s.clone() };
        assert!(matches!(
            watch_decision(&many, "1.1.0", &started, now, None, 3, g),
            WatchDecision::RollBack { .. }
        ));
        // Committed, rolled back by the new version, or another attempt: done.
        for other in [
            UpdateState {
                phase: UpdatePhase::Committed,
                ..s.clone()
            },
            UpdateState {
                phase: UpdatePhase::RolledBack,
                ..s.clone()
            },
            UpdateState {
                attempt_started_at: Some("2026-02-01T00:00:00Z".into()),
                ..s.clone()
            },
        ] {
            assert_eq!(
                watch_decision(&other, "1.1.0", &started, now, Some(false), 3, g),
                WatchDecision::Done
            );
        }
    }
}
