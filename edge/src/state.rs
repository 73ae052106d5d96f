//! The agent's local state file `<state-dir>/edge-state.json` (mode 0600, directory 0700).
//!
//! It holds the identity (with the refresh token, which is why the whole file is 0600), the certificate's
//! validity, the heartbeat sequence, the per-execution log sequence high-water marks and the idempotency cache of
//! actions keyed by (execution id, action id). Every save is atomic and durable ([`crate::fsutil::write_atomic`]).

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "edge-state.json";
pub const STATE_VERSION: u32 = 1;
/// At most this many action records are kept; finished ones are pruned oldest first (started ones never).
pub const MAX_ACTION_RECORDS: usize = 1000;
/// Finished action records older than this are pruned even below the cap.
pub const ACTION_RECORD_TTL: chrono::Duration = chrono::Duration::days(30);
/// At most this many per-execution log sequence marks are kept (least recently used pruned first).
pub const MAX_LOG_SEQUENCES: usize = 1000;
/// Log sequence numbers are reserved in blocks of this size, so that a block is persisted once, not per line.
pub const LOG_SEQ_BLOCK: i64 = 32;
/// Heartbeat sequence numbers are reserved in blocks too (one state write per block, not per heartbeat).
pub const HEARTBEAT_SEQ_BLOCK: i64 = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub tenant_id: String,
    pub site_id: String,
    pub host_id: String,
    pub agent_id: String,
    /// Rotated by every renewal. Secret: the state file is 0600.
    pub refresh_token: String,
    #[serde(default)]
    pub control_plane: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub saved_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CertInfo {
    /// RFC 3339, as the control plane reported it.
    pub expires_at: String,
    /// When we received the certificate (RFC 3339): with `expires_at` it gives the lifetime.
    pub received_at: String,
}

impl CertInfo {
    /// Whether less than a third of the certificate's lifetime is left at `now` (or the dates are unreadable).
    pub fn needs_renewal(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        let (Some(exp), Some(rec)) = (parse_time(&self.expires_at), parse_time(&self.received_at)) else {
            return false;
        };
        let lifetime = exp - rec;
        if lifetime <= chrono::Duration::zero() {
            return true;
        }
        exp - now < lifetime / 3
    }
}

pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    /// Recorded before the provider is called; still set after a crash in the middle of the action.
    Started,
    Succeeded,
    Failed,
}

/// One entry of the idempotency cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionRecord {
    pub execution_id: String,
    pub action_id: String,
    #[serde(default)]
    pub plan_id: String,
    #[serde(default)]
    pub action_type: String,
    pub state: ActionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// How many times the provider was called for this action (more than 1 only after a crash mid-action).
    #[serde(default)]
    pub attempts: u32,
    /// The control plane acknowledged the result.
    #[serde(default)]
    pub reported: bool,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct LogSeq {
    /// Highest sequence number reserved (and possibly used) for this execution.
    pub reserved: i64,
    #[serde(default)]
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct State {
    #[serde(default)]
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertInfo>,
    /// Highest heartbeat sequence number reserved (and possibly used).
    #[serde(default)]
    pub heartbeat_seq: i64,
    #[serde(default)]
    pub log_sequences: BTreeMap<String, LogSeq>,
    #[serde(default)]
    pub actions: Vec<ActionRecord>,
    /// Log lines dropped from the full spool since enrollment.
    #[serde(default)]
    pub dropped_log_entries: u64,
}

impl State {
    pub fn action(&self, execution_id: &str, action_id: &str) -> Option<&ActionRecord> {
        self.actions
            .iter()
            .find(|r| r.execution_id == execution_id && r.action_id == action_id)
    }

    /// Inserts or replaces the record of (execution id, action id), then prunes.
    pub fn put_action(&mut self, rec: ActionRecord) {
        match self
            .actions
            .iter_mut()
            .find(|r| r.execution_id == rec.execution_id && r.action_id == rec.action_id)
        {
            Some(slot) => *slot = rec,
            None => self.actions.push(rec),
        }
        self.prune(chrono::Utc::now());
    }

    /// Marks the results of these (execution id, action id) pairs as acknowledged by the control plane.
    pub fn mark_reported(&mut self, done: &[(String, String)]) -> bool {
        let mut changed = false;
        for r in self.actions.iter_mut() {
            if !r.reported && done.iter().any(|(e, a)| *e == r.execution_id && *a == r.action_id) {
                r.reported = true;
                changed = true;
            }
        }
        changed
    }

    /// Drops finished records older than [`ACTION_RECORD_TTL`], then the oldest finished ones above
    /// [`MAX_ACTION_RECORDS`]; keeps at most [`MAX_LOG_SEQUENCES`] log marks (least recently updated dropped).
    pub fn prune(&mut self, now: chrono::DateTime<chrono::Utc>) {
        let old = |r: &ActionRecord| {
            r.state != ActionState::Started && parse_time(&r.updated_at).is_some_and(|t| now - t > ACTION_RECORD_TTL)
        };
        self.actions.retain(|r| !old(r));
        if self.actions.len() > MAX_ACTION_RECORDS {
            let mut finished: Vec<(String, usize)> = self
                .actions
                .iter()
                .enumerate()
                .filter(|(_, r)| r.state != ActionState::Started)
                .map(|(i, r)| (r.updated_at.clone(), i))
                .collect();
            finished.sort();
            let excess = self.actions.len() - MAX_ACTION_RECORDS;
            let mut drop: Vec<usize> = finished.into_iter().take(excess).map(|(_, i)| i).collect();
            drop.sort_unstable();
            for i in drop.into_iter().rev() {
                self.actions.remove(i);
            }
        }
        if self.log_sequences.len() > MAX_LOG_SEQUENCES {
            let mut by_age: Vec<(String, String)> = self
                .log_sequences
                .iter()
                .map(|(k, v)| (v.updated_at.clone(), k.clone()))
                .collect();
            by_age.sort();
            let excess = self.log_sequences.len() - MAX_LOG_SEQUENCES;
            for (_, k) in by_age.into_iter().take(excess) {
                self.log_sequences.remove(&k);
            }
        }
    }
}

/// The state file and its in-memory copy.
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    pub state: State,
    /// Next heartbeat sequence to hand out (in memory; the file holds the reserved high-water mark).
    hb_next: Option<i64>,
}

#[derive(Debug)]
pub struct StateError(pub String);

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateError {}

impl StateStore {
    /// Opens (or starts) the state in `state_dir`, creating the directory with mode 0700. A state file that
    /// exists but cannot be read or parsed is an error (it holds the identity: never silently start over).
    pub fn open(state_dir: &Path) -> Result<StateStore, StateError> {
        fsutil::ensure_dir(state_dir, 0o700)
            .map_err(|e| StateError(format!("create state dir {}: {e}", state_dir.display())))?;
        let path = state_dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(|e| StateError(format!("state file {} is corrupt: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(StateError(format!("read state file {}: {e}", path.display()))),
        };
        Ok(StateStore {
            path,
            state,
            hb_next: None,
        })
    }

    /// Reads the state without creating anything (for commands that must not write).
    pub fn read_only(state_dir: &Path) -> Result<State, StateError> {
        let path = state_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(|e| StateError(format!("state file {} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(StateError(format!("read state file {}: {e}", path.display()))),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the state atomically (0600) and durably.
    pub fn save(&mut self) -> Result<(), StateError> {
        self.state.version = STATE_VERSION;
        let data = serde_json::to_vec_pretty(&self.state).map_err(|e| StateError(format!("encode state: {e}")))?;
        fsutil::write_atomic(&self.path, &data, 0o600)
            .map_err(|e| StateError(format!("write state file {}: {e}", self.path.display())))
    }

    /// The identity, or the error `run enroll first`.
    pub fn identity(&self) -> Result<&Identity, StateError> {
        self.state.identity.as_ref().ok_or_else(|| {
            StateError(format!(
                "no agent identity in {} (run `nkudo-edge enroll` first)",
                self.path.display()
            ))
        })
    }

    /// The next heartbeat sequence number: strictly increasing, also across restarts (numbers are reserved in
    /// blocks of [`HEARTBEAT_SEQ_BLOCK`] in the state file before use; a restart resumes above the block).
    pub fn next_heartbeat_seq(&mut self) -> Result<i64, StateError> {
        let next = self.hb_next.unwrap_or(self.state.heartbeat_seq + 1);
        if next > self.state.heartbeat_seq {
            self.state.heartbeat_seq = next + HEARTBEAT_SEQ_BLOCK - 1;
            self.save()?;
        }
        self.hb_next = Some(next + 1);
        Ok(next)
    }
}

/// Hands out log sequence numbers per execution, starting at 1, strictly increasing also across restarts: a
/// block of [`LOG_SEQ_BLOCK`] numbers is reserved in the state file before any of it is used, and after a
/// restart numbering resumes above the reserved block (gaps are fine, collisions are not: bug 31).
#[derive(Debug, Default)]
pub struct LogSequencer {
    next: BTreeMap<String, i64>,
}

impl LogSequencer {
    /// The next sequence of `execution_id`; `store` is saved when a new block is reserved.
    pub fn next(&mut self, store: &mut StateStore, execution_id: &str) -> Result<i64, StateError> {
        let reserved = store
            .state
            .log_sequences
            .get(execution_id)
            .map(|s| s.reserved)
            .unwrap_or(0);
        let next = *self.next.entry(execution_id.to_string()).or_insert(reserved + 1);
        if next > reserved {
            store.state.log_sequences.insert(
                execution_id.to_string(),
                LogSeq {
                    reserved: next + LOG_SEQ_BLOCK - 1,
                    updated_at: now_rfc3339(),
                },
            );
            store.state.prune(chrono::Utc::now());
            store.save()?;
        }
        self.next.insert(execution_id.to_string(), next + 1);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nkudo-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn rec(exec: &str, action: &str, state: ActionState, updated: &str) -> ActionRecord {
        ActionRecord {
            execution_id: exec.into(),
            action_id: action.into(),
            plan_id: "p".into(),
            action_type: "MicroVMCreate".into(),
            state,
            error_code: None,
            message: None,
            started_at: updated.into(),
            finished_at: None,
            attempts: 1,
            reported: false,
            updated_at: updated.into(),
        }
    }

    #[test]
    fn cache_is_keyed_by_execution_and_action() {
        let mut s = State::default();
        let now = now_rfc3339();
        s.put_action(rec("e1", "create-vm-1", ActionState::Succeeded, &now));
        assert!(s.action("e1", "create-vm-1").is_some());
        assert!(
            s.action("e2", "create-vm-1").is_none(),
            "same action id in another plan is not a hit (bug 29)"
        );
    }

    #[test]
    fn prune_keeps_started_and_bounds_size() {
        let mut s = State::default();
        for i in 0..(MAX_ACTION_RECORDS + 50) {
            let t = format!("2026-01-01T00:{:02}:{:02}.000Z", (i / 60) % 60, i % 60);
            s.actions.push(rec(&format!("e{i}"), "a", ActionState::Succeeded, &t));
        }
        s.actions
            .push(rec("running", "a", ActionState::Started, "2000-01-01T00:00:00.000Z"));
        s.prune(parse_time("2026-01-02T00:00:00Z").unwrap());
        assert_eq!(s.actions.len(), MAX_ACTION_RECORDS);
        assert!(s.action("running", "a").is_some());
        assert!(s.action("e0", "a").is_none(), "the oldest finished record goes first");
        // Far in the future every finished record has expired; the started one stays.
        s.prune(parse_time("2027-01-01T00:00:00Z").unwrap());
        assert_eq!(s.actions.len(), 1);
    }

    #[test]
    fn state_file_is_private_and_round_trips() {
        let dir = tmpdir("rt");
        let mut st = StateStore::open(&dir).unwrap();
        st.state.identity = Some(Identity {
            tenant_id: "t".into(),
            site_id: "s".into(),
            host_id: "h".into(),
            agent_id: "a".into(),
            refresh_token: "secret".into(),
            control_plane: String::new(),
            hostname: String::new(),
            saved_at: String::new(),
        });
        assert_eq!(st.next_heartbeat_seq().unwrap(), 1);
        assert_eq!(st.next_heartbeat_seq().unwrap(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(st.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mut again = StateStore::open(&dir).unwrap();
        assert_eq!(again.state, st.state);
        assert!(
            again.next_heartbeat_seq().unwrap() > 2,
            "the heartbeat sequence continues after a restart"
        );
        std::fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        assert!(
            StateStore::open(&dir).is_err(),
            "a corrupt state file is an error, not a fresh start"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn log_sequences_never_repeat_across_restarts() {
        let dir = tmpdir("seq");
        let mut st = StateStore::open(&dir).unwrap();
        let mut seq = LogSequencer::default();
        let a: Vec<i64> = (0..5).map(|_| seq.next(&mut st, "x").unwrap()).collect();
        assert_eq!(a, vec![1, 2, 3, 4, 5]);
        assert_eq!(seq.next(&mut st, "y").unwrap(), 1);
        // "Restart": a fresh sequencer over the saved state.
        let mut st2 = StateStore::open(&dir).unwrap();
        let mut seq2 = LogSequencer::default();
        let n = seq2.next(&mut st2, "x").unwrap();
        assert!(
            n > 5,
            "after a restart the sequence continues above what was used ({n})"
        );
        assert!(seq2.next(&mut st2, "x").unwrap() > n);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn renewal_threshold_is_a_third_of_the_lifetime() {
        let c = CertInfo {
            received_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-01-02T00:00:00Z".into(),
        };
        assert!(!c.needs_renewal(parse_time("2026-01-01T15:00:00Z").unwrap()));
        assert!(c.needs_renewal(parse_time("2026-01-01T17:00:00Z").unwrap()));
    }
}
