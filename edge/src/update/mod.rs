//! Safe self-update of the agent (ARCHITECTURE §3, §4.7; docs/edge-agent.md "Self-update").
//!
//! * [`state`]: `<state-dir>/update.json` and the pure start-guard and watcher decisions;
//! * [`verify`]: the checks of an offer (signature, expiry, version, artifact) and of the downloaded file;
//! * [`download`]: resumable, capped, rate-limited download into `<state-dir>/downloads/`;
//! * [`restart`]: exec in place, exit 75, the detached watcher, PIDs;
//! * [`watch`]: the `update-watch` subcommand (the previous binary, watching the new one's trial);
//! * [`Updater`] (this module): what `run` uses: the start guard, the update task, the switch, the trial.
//!
//! Flow: a heartbeat answer carries an [`UpdateOffer`] → one background task verifies the manifest, downloads,
//! verifies the file, installs into the host layout and runs `<new>/bin/nkudo-edge version` → `run` stops
//! gracefully (the current action finishes, the spool is flushed) → `update.json` records the trial, `current` is
//! switched, the watcher is started from the old binary → restart (exec or exit 75) → the new version counts its
//! start, heartbeats, and commits after a healthy heartbeat once it has been up `update_stable_after`; otherwise
//! it (or the watcher) switches back and restarts the old version.

pub mod download;
pub mod restart;
pub mod state;
pub mod verify;
pub mod watch;

use crate::cli::{RestartMode, UpdateSettings};
use crate::logging::{error, info, warn};
use crate::state::now_rfc3339;
use crate::{ExitError, EXIT_FAILURE};
use nkudo_core::api::{HeartbeatResponse, UpdateOffer, UpdatePhase, UpdateStatus};
use nkudo_core::installed::InstalledRelease;
use nkudo_core::layout::Layout;
use state::{StartDecision, UpdateState, DOWNLOADS_DIR, WATCH_LOG};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The pre-switch trial run (`<new>/bin/nkudo-edge version`) must finish within this.
pub const TRIAL_RUN_TIMEOUT: Duration = Duration::from_secs(10);
/// The watcher acts this long after the deadline, so that the new version's own timer acts first.
pub const WATCH_GRACE: Duration = Duration::from_secs(2);
/// How often the watcher looks.
pub const WATCH_POLL: Duration = Duration::from_millis(300);
/// After a failure that is not remembered (a local error such as a full disk), the same version is tried again
/// after this long at the earliest.
pub const RETRY_AFTER_LOCAL_ERROR: Duration = Duration::from_secs(60);
/// Releases kept after a commit: current and the two before it.
pub const KEEP_RELEASES: usize = nkudo_core::layout::DEFAULT_KEEP;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the update machinery asks `run` to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateEvent {
    /// A new version is installed and passed its trial run: stop gracefully, then switch and restart.
    ReadyToSwitch,
    /// The version on trial rolled the host back: stop gracefully, then restart into the previous version.
    RestartAfterRollback,
}

/// A verified, installed version waiting for the switch.
#[derive(Debug, Clone)]
struct Prepared {
    to: String,
    attempt_started_at: String,
}

/// The agent's self-update machinery (one per `run`).
pub struct Updater {
    settings: UpdateSettings,
    state_dir: PathBuf,
    /// The version this process reports (the one it was installed as).
    running: String,
    /// The release the running binary lies in; `None` outside a host layout (updates refused).
    release: Option<InstalledRelease>,
    /// The binary's path inside its release directory (`bin/nkudo-edge`).
    exe_rel: PathBuf,
    /// The `run` arguments (without the program name), for the restart and the watcher.
    run_args: Vec<std::ffi::OsString>,
    /// `run --once`: report only, never update.
    passive: bool,
    state: Mutex<UpdateState>,
    task: Mutex<Option<(String, tokio::task::JoinHandle<()>)>>,
    prepared: Mutex<Option<Prepared>>,
    /// A version that failed with a local error, and when it may be tried again.
    cooldown: Mutex<Option<(String, Instant)>>,
    heartbeat_ok: AtomicBool,
    on_trial: AtomicBool,
    started: Instant,
    events: mpsc::UnboundedSender<UpdateEvent>,
}

/// The agent's entry point inside a release directory: what the service manager starts (through `current`) and
/// what every restart, trial run and watcher goes through. Always this path, even when the running binary is
/// another file of the release (a wrapper's target): a release is entered the way systemd enters it.
pub const ENTRY_POINT: &str = "bin/nkudo-edge";

impl Updater {
    /// Creates the updater at the very start of `run`: counts the start, writes `agent.pid`, and applies the start
    /// guard. When the guard rolls the host back this restarts into the previous version (exec: never returns;
    /// exit mode: `Err` with exit code 75).
    pub fn start(
        settings: &UpdateSettings,
        state_dir: &Path,
        passive: bool,
    ) -> Result<(Arc<Updater>, mpsc::UnboundedReceiver<UpdateEvent>), ExitError> {
        let rv = nkudo_core::installed::reported_version();
        let release = rv.release.clone();
        let exe_rel = PathBuf::from(ENTRY_POINT);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = match UpdateState::load(state_dir) {
            Ok(s) => s,
            Err(e) => {
                warn(&format!("update state unreadable ({e}); starting from an idle state"));
                UpdateState::default()
            }
        };
        let updater = Arc::new(Updater {
            settings: settings.clone(),
            state_dir: state_dir.to_path_buf(),
            running: rv.version.clone(),
            release,
            exe_rel,
            run_args: std::env::args_os().skip(1).collect(),
            passive,
            state: Mutex::new(UpdateState::default()),
            task: Mutex::new(None),
            prepared: Mutex::new(None),
            cooldown: Mutex::new(None),
            heartbeat_ok: AtomicBool::new(false),
            on_trial: AtomicBool::new(false),
            started: Instant::now(),
            events: tx,
        });
        if passive {
            *lock(&updater.state) = st;
            return Ok((updater, rx));
        }
        let pid = std::process::id();
        if let Err(e) = restart::write_pid_file(state_dir, pid) {
            warn(&format!(
                "cannot write {}: {e}",
                state_dir.join(state::PID_FILE).display()
            ));
        }
        st.count_start(&updater.running, pid);
        let decision = state::start_guard(&mut st, &updater.running, chrono::Utc::now(), settings.max_starts);
        *lock(&updater.state) = st;
        match decision {
            StartDecision::Normal => updater.save(),
            StartDecision::Trial => {
                let st = lock(&updater.state).clone();
                info(&format!(
                    "self-update: {} on trial (start {} of at most {}, deadline {}); commits after a healthy \
                     heartbeat once up {}s",
                    updater.running,
                    st.starts,
                    settings.max_starts,
                    st.trial_deadline.as_deref().unwrap_or("?"),
                    settings.stable_after.as_secs_f64()
                ));
                updater.on_trial.store(true, Ordering::SeqCst);
                updater.save();
            }
            StartDecision::TrialOver { reason } => {
                warn(&format!("self-update: {reason}"));
                updater.save();
            }
            StartDecision::RollBack { reason } => {
                error(&format!("self-update: {reason}"));
                updater.save();
                match updater.roll_back_trial(&reason) {
                    Ok(true) => return Err(updater.restart()),
                    Ok(false) => {}
                    Err(e) => {
                        error(&format!(
                            "self-update: cannot roll back: {e}; staying on {}",
                            updater.running
                        ));
                        let mut st = lock(&updater.state);
                        st.phase = UpdatePhase::Failed;
                        st.last_error = Some(format!("{reason}, but the rollback failed: {e}"));
                        drop(st);
                        updater.save();
                    }
                }
            }
        }
        Ok((updater, rx))
    }

    pub fn running(&self) -> &str {
        &self.running
    }

    /// This process is the version on trial (not committed yet).
    pub fn on_trial(&self) -> bool {
        self.on_trial.load(Ordering::SeqCst)
    }

    fn save(&self) {
        if self.on_trial() {
            // During a trial the watcher may have decided (rolled back): never overwrite its decision.
            if let Ok(disk) = UpdateState::load(&self.state_dir) {
                let ours =
                    disk.phase == UpdatePhase::Trial && disk.attempt_to.as_deref() == Some(self.running.as_str());
                if !ours {
                    *lock(&self.state) = disk;
                    return;
                }
            }
        }
        let st = lock(&self.state).clone();
        if let Err(e) = st.save(&self.state_dir) {
            error(&format!(
                "cannot write {}: {e}",
                UpdateState::path(&self.state_dir).display()
            ));
        }
    }

    fn layout(&self) -> Result<Layout, String> {
        let rel = self.release.as_ref().ok_or_else(not_in_layout)?;
        Layout::open(&rel.root).map_err(|e| e.to_string())
    }

    /// The `update` object of the heartbeat.
    pub fn status(&self) -> UpdateStatus {
        let previous = self
            .release
            .as_ref()
            .and_then(|r| std::fs::read_link(r.root.join("previous")).ok())
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        let st = lock(&self.state);
        UpdateStatus {
            current_version: self.running.clone(),
            previous_version: previous,
            desired_version: st.desired_version.clone(),
            phase: st.phase,
            last_error: st.last_error.clone(),
            attempt_from: st.attempt_from.clone(),
            attempt_to: st.attempt_to.clone(),
            attempt_started_at: st.attempt_started_at.clone(),
            restarts: st.restarts,
        }
    }

    /// `run` stops on a signal: during a trial, record it so that the watcher rolls back without restarting.
    pub fn note_signal_stop(&self) {
        if !self.on_trial() {
            return;
        }
        let mut st = UpdateState::load(&self.state_dir).unwrap_or_else(|_| lock(&self.state).clone());
        if st.phase == UpdatePhase::Trial && st.attempt_to.as_deref() == Some(self.running.as_str()) {
            st.stopped_during_trial = true;
            if let Err(e) = st.save(&self.state_dir) {
                warn(&format!("cannot write the update state: {e}"));
            }
            *lock(&self.state) = st;
        }
    }

    /// A heartbeat succeeded (the health signal of a trial).
    pub fn heartbeat_ok(&self) {
        self.heartbeat_ok.store(true, Ordering::SeqCst);
    }

    /// Reacts to a heartbeat answer: records the desired version and starts, keeps or cancels the update task.
    pub fn on_response(self: &Arc<Self>, resp: &HeartbeatResponse, cp: &crate::client::CpClient) {
        if self.passive {
            return;
        }
        let mut changed = lock(&self.state).set_desired(resp.desired_version.as_deref());
        let offer = resp.update.as_ref().filter(|o| o.version != self.running);
        {
            let mut task = lock(&self.task);
            let finished = task.as_ref().is_some_and(|(_, h)| h.is_finished());
            if finished {
                *task = None;
            }
            if let Some((v, h)) = task.as_ref() {
                if offer.map(|o| &o.version) != Some(v) {
                    info(&format!(
                        "self-update: the control plane no longer asks for {v}; cancelling that update"
                    ));
                    h.abort();
                    *task = None;
                    let mut st = lock(&self.state);
                    if matches!(
                        st.phase,
                        UpdatePhase::Downloading | UpdatePhase::Verifying | UpdatePhase::Installing
                    ) {
                        st.phase = UpdatePhase::Idle;
                        st.last_error = None;
                        changed = true;
                    }
                }
            }
        }
        let busy = lock(&self.task).is_some() || lock(&self.prepared).is_some();
        match offer {
            None => {
                let mut st = lock(&self.state);
                if !busy
                    && matches!(
                        st.phase,
                        UpdatePhase::Downloading | UpdatePhase::Verifying | UpdatePhase::Installing
                    )
                {
                    // An update interrupted by a restart that the control plane no longer asks for.
                    st.phase = UpdatePhase::Idle;
                    st.last_error = None;
                    changed = true;
                }
            }
            Some(offer) if !busy && !self.on_trial() => {
                let refused = lock(&self.state)
                    .is_refused(&offer.version, &state::offer_digest(offer))
                    .is_some();
                let cooling = lock(&self.cooldown)
                    .as_ref()
                    .is_some_and(|(v, until)| *v == offer.version && Instant::now() < *until);
                if !refused && !cooling {
                    if let Err(why) = self.preconditions() {
                        changed |= self.report_refusal(&offer.version, &why);
                    } else {
                        let me = self.clone();
                        let o = offer.clone();
                        let cp = cp.clone();
                        let h = tokio::spawn(async move { me.update_task(o, cp).await });
                        *lock(&self.task) = Some((offer.version.clone(), h));
                    }
                }
            }
            Some(_) => {}
        }
        if changed {
            self.save();
        }
    }

    /// Why no update can be attempted at all (configuration), if so.
    fn preconditions(&self) -> Result<(), String> {
        if self.settings.release_public_keys.is_empty() {
            return Err(
                "self-update refused: no release public key is configured (release_public_keys in \
                        edge.toml, --release-public-key or NKUDO_RELEASE_PUBLIC_KEYS)"
                    .into(),
            );
        }
        if self.release.is_none() {
            return Err(not_in_layout());
        }
        Ok(())
    }

    /// Records a configuration refusal as a failed attempt (not remembered: fixing the configuration and
    /// restarting retries). Returns whether the state changed.
    fn report_refusal(&self, version: &str, why: &str) -> bool {
        let mut st = lock(&self.state);
        if st.phase == UpdatePhase::Failed
            && st.attempt_to.as_deref() == Some(version)
            && st.last_error.as_deref() == Some(why)
        {
            return false;
        }
        warn(&format!("self-update to {version}: {why}"));
        st.attempt_from = Some(self.running.clone());
        st.attempt_to = Some(version.to_string());
        st.attempt_started_at = Some(now_rfc3339());
        st.phase = UpdatePhase::Failed;
        st.last_error = Some(why.to_string());
        true
    }

    fn set_phase(&self, phase: UpdatePhase, last_error: Option<String>) {
        {
            let mut st = lock(&self.state);
            st.phase = phase;
            st.last_error = last_error;
        }
        self.save();
    }

    /// Ends an attempt before the switch: phase failed, the reason, and (`remember`) no automatic retry.
    fn fail(&self, version: &str, reason: &str, remember: bool) {
        error(&format!("self-update to {version} failed: {reason}"));
        {
            let mut st = lock(&self.state);
            st.phase = UpdatePhase::Failed;
            st.last_error = Some(reason.to_string());
            if remember {
                st.refuse(version, reason, &now_rfc3339());
            }
        }
        if !remember {
            *lock(&self.cooldown) = Some((version.to_string(), Instant::now() + RETRY_AFTER_LOCAL_ERROR));
        }
        self.save();
    }

    fn downloads(&self) -> PathBuf {
        self.state_dir.join(DOWNLOADS_DIR)
    }

    /// The one update task: verify the manifest, download, verify the file, install, trial run.
    async fn update_task(self: Arc<Self>, offer: UpdateOffer, cp: crate::client::CpClient) {
        let version = offer.version.clone();
        {
            let mut st = lock(&self.state);
            let resuming = st.attempt_to.as_deref() == Some(version.as_str())
                && matches!(
                    st.phase,
                    UpdatePhase::Downloading | UpdatePhase::Verifying | UpdatePhase::Installing
                )
                && st.attempt_started_at.is_some();
            if !resuming {
                st.attempt_started_at = Some(now_rfc3339());
            }
            st.attempt_from = Some(self.running.clone());
            st.attempt_to = Some(version.clone());
            st.attempt_offer = Some(state::offer_digest(&offer));
            st.phase = UpdatePhase::Downloading;
            st.last_error = None;
            st.trial_deadline = None;
            st.starts = 0;
        }
        self.save();
        info(&format!("self-update: {} → {version}", self.running));
        let verified = match verify::verify_offer(
            &offer,
            &self.settings.release_public_keys,
            &self.running,
            &verify::host_arch(),
            chrono::Utc::now(),
        ) {
            Ok(v) => v,
            Err(r) => return self.fail(&version, &r.0, true),
        };
        let artifact = verified.artifact.clone();
        // The download.
        let dir = self.downloads();
        if let Err(e) = crate::fsutil::ensure_dir(&dir, 0o700) {
            return self.fail(&version, &format!("create {}: {e}", dir.display()), false);
        }
        let part = dir.join(format!("{}.part", artifact.name));
        let sha_file = dir.join(format!("{}.sha256", artifact.name));
        clean_downloads(&dir, &artifact.name);
        let same = std::fs::read_to_string(&sha_file)
            .map(|s| s.trim().eq_ignore_ascii_case(&artifact.sha256))
            .unwrap_or(false);
        if !same {
            let _ = std::fs::remove_file(&part);
            if let Err(e) = crate::fsutil::write_atomic(&sha_file, artifact.sha256.as_bytes(), 0o600) {
                return self.fail(&version, &format!("write {}: {e}", sha_file.display()), false);
            }
        }
        let (http, url) = if offer.artifact.url.starts_with('/') {
            (cp.http().clone(), cp.url(&offer.artifact.url))
        } else if offer.artifact.url.starts_with("https://") || offer.artifact.url.starts_with("http://") {
            match download::plain_client() {
                Ok(c) => (c, offer.artifact.url.clone()),
                Err(e) => return self.fail(&version, &e, false),
            }
        } else {
            return self.fail(
                &version,
                &format!(
                    "unsupported artifact URL {:?} (a control-plane path or http(s) URL)",
                    offer.artifact.url
                ),
                true,
            );
        };
        let cap = crate::agent::backoff_cap();
        let mut backoff = Duration::ZERO;
        let mut retried_from_scratch = false;
        loop {
            let resumed = part.exists() && std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) > 0;
            let before = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            if resumed {
                info(&format!("self-update: resuming {} at byte {before}", artifact.name));
            }
            match download::download(&http, &url, &part, artifact.size, self.settings.download_rate_limit).await {
                Ok(()) => {}
                Err(download::DownloadError::Permanent(e)) => {
                    let _ = std::fs::remove_file(&part);
                    return self.fail(&version, &e, true);
                }
                Err(download::DownloadError::Transient(e)) => {
                    let after = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    backoff = if after > before {
                        crate::agent::BACKOFF_START
                    } else {
                        crate::agent::next_backoff(backoff, cap)
                    };
                    warn(&format!(
                        "self-update: download of {} interrupted ({e}); {after} of {} bytes kept, retrying in {:.1}s",
                        artifact.name,
                        artifact.size,
                        backoff.as_secs_f64()
                    ));
                    {
                        let mut st = lock(&self.state);
                        st.last_error = Some(format!("download interrupted, retrying: {e}"));
                    }
                    self.save();
                    tokio::time::sleep(crate::agent::jittered(backoff)).await;
                    continue;
                }
            }
            self.set_phase(UpdatePhase::Verifying, None);
            let (p, a) = (part.clone(), artifact.clone());
            let checked = tokio::task::spawn_blocking(move || verify::check_file(&p, &a))
                .await
                .unwrap_or_else(|e| Err(verify::Refusal(format!("verification task failed: {e}"))));
            match checked {
                Ok(()) => break,
                Err(r) => {
                    let _ = std::fs::remove_file(&part);
                    if resumed && !retried_from_scratch {
                        // A resumed download can be damaged by an earlier crash: fetch it whole once more.
                        warn(&format!("self-update: {r}; downloading it again from the start"));
                        retried_from_scratch = true;
                        self.set_phase(UpdatePhase::Downloading, Some(r.0.clone()));
                        continue;
                    }
                    return self.fail(&version, &r.0, true);
                }
            }
        }
        // Install.
        self.set_phase(UpdatePhase::Installing, None);
        let layout = match self.layout() {
            Ok(l) => l,
            Err(e) => return self.fail(&version, &e, true),
        };
        let v = match nkudo_core::version::parse(&version) {
            Ok(v) => v,
            Err(e) => return self.fail(&version, &e.to_string(), true),
        };
        let (l2, p2, v2) = (layout.clone(), part.clone(), v.clone());
        let manifest_text = offer.manifest.clone();
        let sig_text = offer.manifest_signature.clone();
        let installed = tokio::task::spawn_blocking(move || {
            l2.install(&v2, |dir: &Path| -> std::io::Result<()> {
                let f = std::fs::File::open(&p2)?;
                nkudo_core::archive::unpack_tar_gz(std::io::BufReader::new(f), dir)?;
                nkudo_core::installed::write_metadata(dir, &manifest_text, &sig_text)?;
                Ok(())
            })
            .map_err(|e| {
                // The release's own content is at fault (remembered); anything else is local (a full disk, the
                // lock, permissions) and is tried again later.
                let release_fault = matches!(
                    e,
                    nkudo_core::layout::LayoutError::Fill { .. } | nkudo_core::layout::LayoutError::Unsupported { .. }
                );
                (e.to_string(), release_fault)
            })
        })
        .await
        .unwrap_or_else(|e| Err((format!("install task failed: {e}"), false)));
        if let Err((e, release_fault)) = installed {
            return self.fail(
                &version,
                &format!("install into {}: {e}", layout.root().display()),
                release_fault,
            );
        }
        // The pre-switch trial run.
        let new_exe = layout.release_dir(&v).join(&self.exe_rel);
        if let Err(e) = trial_run(&new_exe, &version).await {
            return self.fail(
                &version,
                &format!("the pre-switch trial run failed: {e}; not switched"),
                true,
            );
        }
        info(&format!(
            "self-update: {version} installed and its trial run passed; switching after the current action"
        ));
        let started = lock(&self.state).attempt_started_at.clone().unwrap_or_else(now_rfc3339);
        *lock(&self.prepared) = Some(Prepared {
            to: version,
            attempt_started_at: started,
        });
        let _ = self.events.send(UpdateEvent::ReadyToSwitch);
    }

    /// After `run` stopped gracefully: record the trial, switch `current`, start the watcher, restart. Returns
    /// only the error that ends the process (exit 75 in exit mode, or a failure).
    pub fn switch_and_restart(&self) -> ExitError {
        let Some(p) = lock(&self.prepared).take() else {
            return self.restart();
        };
        let (layout, rel) = match (self.layout(), self.release.as_ref()) {
            (Ok(l), Some(r)) => (l, r),
            (Err(e), _) => {
                self.fail(&p.to, &e, true);
                return self.restart();
            }
            (Ok(_), None) => {
                self.fail(&p.to, &not_in_layout(), true);
                return self.restart();
            }
        };
        let v = match nkudo_core::version::parse(&p.to) {
            Ok(v) => v,
            Err(e) => {
                self.fail(&p.to, &e.to_string(), true);
                return self.restart();
            }
        };
        let mode = self.settings.restart_mode.effective();
        let window = self.settings.health_window;
        {
            let mut st = lock(&self.state);
            st.phase = UpdatePhase::Trial;
            st.attempt_from = Some(self.running.clone());
            st.attempt_to = Some(p.to.clone());
            st.attempt_started_at = Some(p.attempt_started_at.clone());
            st.trial_deadline = Some(
                (chrono::Utc::now() + chrono::Duration::from_std(window).unwrap_or_default())
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
            st.health_window_secs = Some(window.as_secs());
            st.starts = 0;
            st.last_error = None;
        }
        self.save();
        if let Err(e) = layout.activate(&v) {
            self.fail(&p.to, &format!("cannot switch to {}: {e}", p.to), true);
            return self.restart();
        }
        // The watcher runs the old, known-good binary.
        let old_exe = rel.dir.join(&self.exe_rel);
        let mut args: Vec<std::ffi::OsString> = vec![
            "update-watch".into(),
            "--state-dir".into(),
            self.state_dir.clone().into_os_string(),
            "--root".into(),
            rel.root.clone().into_os_string(),
            "--agent-pid".into(),
            std::process::id().to_string().into(),
            "--attempt-to".into(),
            p.to.clone().into(),
            "--attempt-started-at".into(),
            p.attempt_started_at.clone().into(),
            "--deadline".into(),
            lock(&self.state).trial_deadline.clone().unwrap_or_default().into(),
            "--restart-mode".into(),
            mode.as_str().into(),
            "--max-starts".into(),
            self.settings.max_starts.to_string().into(),
            "--systemd-unit".into(),
            self.settings.systemd_unit.clone().into(),
            "--exe-rel".into(),
            self.exe_rel.clone().into_os_string(),
            "--".into(),
        ];
        args.extend(self.run_args.iter().cloned());
        if let Err(e) = restart::spawn_detached(&old_exe, &args, &self.state_dir.join(WATCH_LOG)) {
            let reason = format!(
                "cannot start the update watcher ({}): {e}; not switched",
                old_exe.display()
            );
            match self.roll_back_trial(&reason) {
                Ok(_) => {}
                Err(e2) => error(&format!("self-update: rollback failed too: {e2}")),
            }
            let mut st = lock(&self.state);
            st.phase = UpdatePhase::Failed;
            drop(st);
            self.save();
            return self.restart();
        }
        info(&format!(
            "self-update: switched to {} (previous {}); restarting ({}), health window {}s",
            p.to,
            self.running,
            mode.as_str(),
            window.as_secs()
        ));
        self.restart()
    }

    /// Restarts into `<root>/current`: exec in place, or exit 75 for the service manager. Returns only the error
    /// that ends the process.
    pub fn restart(&self) -> ExitError {
        match self.settings.restart_mode.effective() {
            RestartMode::Exit => ExitError::new(
                restart::EXIT_RESTART,
                "restarting (exit code 75: the service manager starts <root>/current again)",
            ),
            _ => {
                let Some(rel) = self.release.as_ref() else {
                    return ExitError::new(EXIT_FAILURE, "cannot restart: not running from a host layout");
                };
                let target = rel.root.join("current").join(&self.exe_rel);
                let e = restart::exec(&target, &self.run_args);
                // The new binary could not even be executed: back to the previous version, then exec that.
                let reason = format!("cannot execute {}: {e}; back on the previous version", target.display());
                error(&format!("self-update: {reason}"));
                if let Ok(true) = self.roll_back_trial(&reason) {
                    let e2 = restart::exec(&target, &self.run_args);
                    return ExitError::new(EXIT_FAILURE, format!("cannot execute {}: {e2}", target.display()));
                }
                ExitError::new(EXIT_FAILURE, format!("cannot execute {}: {e}", target.display()))
            }
        }
    }

    /// Rolls the trial back under the layout lock, if `update.json` still records it: `current` goes back to the
    /// previous version when it is the version on trial, and the reason is recorded. Returns whether the trial was
    /// still under way (so a restart is due).
    fn roll_back_trial(&self, reason: &str) -> Result<bool, String> {
        let layout = self.layout()?;
        let guard = layout.lock().map_err(|e| e.to_string())?;
        let mut st = UpdateState::load(&self.state_dir).unwrap_or_else(|_| lock(&self.state).clone());
        if st.phase != UpdatePhase::Trial {
            *lock(&self.state) = st;
            return Ok(false);
        }
        let to = st.attempt_to.clone().unwrap_or_default();
        let current = layout.current().ok().flatten().map(|v| v.to_string());
        let mut why = reason.to_string();
        if current.as_deref() == Some(to.as_str()) {
            match guard.rollback() {
                Ok(v) => info(&format!("self-update: rolled back to {v}")),
                Err(e) => why = format!("{reason}; the rollback failed: {e}"),
            }
        }
        st.mark_rolled_back(&why, &now_rfc3339());
        if let Err(e) = st.save(&self.state_dir) {
            error(&format!("cannot write the update state: {e}"));
        }
        *lock(&self.state) = st;
        self.on_trial.store(false, Ordering::SeqCst);
        Ok(true)
    }

    /// Commits the trial under the layout lock if it is still under way: phase committed, old releases pruned
    /// (current and two before it kept), the download removed.
    fn commit(&self) -> Result<bool, String> {
        let layout = self.layout()?;
        let guard = layout.lock().map_err(|e| e.to_string())?;
        let mut st = UpdateState::load(&self.state_dir).map_err(|e| e.to_string())?;
        if st.phase != UpdatePhase::Trial || st.attempt_to.as_deref() != Some(self.running.as_str()) {
            *lock(&self.state) = st;
            return Ok(false);
        }
        st.phase = UpdatePhase::Committed;
        st.last_error = None;
        st.trial_deadline = None;
        st.save(&self.state_dir).map_err(|e| e.to_string())?;
        *lock(&self.state) = st;
        self.on_trial.store(false, Ordering::SeqCst);
        match guard.prune(KEEP_RELEASES) {
            Ok(removed) if !removed.is_empty() => info(&format!(
                "self-update: pruned {}",
                removed.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
            )),
            Ok(_) => {}
            Err(e) => warn(&format!("self-update: prune failed: {e}")),
        }
        drop(guard);
        let _ = std::fs::remove_dir_all(self.downloads());
        Ok(true)
    }

    /// The trial task of the version on trial: commit after a healthy heartbeat once up `stable_after`, or roll
    /// back at the deadline.
    pub async fn trial_task(self: Arc<Self>) {
        let deadline = lock(&self.state).deadline();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !self.on_trial() {
                return;
            }
            if self.heartbeat_ok.load(Ordering::SeqCst) && self.started.elapsed() >= self.settings.stable_after {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.commit()).await {
                    Ok(Ok(true)) => {
                        info(&format!("self-update: {} committed", self.running));
                        return;
                    }
                    Ok(Ok(false)) => {
                        warn("self-update: the trial was already decided elsewhere");
                        self.on_trial.store(false, Ordering::SeqCst);
                        return;
                    }
                    Ok(Err(e)) => warn(&format!("self-update: commit failed ({e}); retrying")),
                    Err(e) => warn(&format!("self-update: commit task failed ({e}); retrying")),
                }
            }
            if deadline.is_none_or(|d| chrono::Utc::now() > d) {
                let reason = {
                    let st = lock(&self.state);
                    state::no_heartbeat_reason(&self.running, &st)
                };
                error(&format!("self-update: {reason}"));
                let me = self.clone();
                let r = reason.clone();
                match tokio::task::spawn_blocking(move || me.roll_back_trial(&r)).await {
                    Ok(Ok(true)) => {
                        let _ = self.events.send(UpdateEvent::RestartAfterRollback);
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => error(&format!("self-update: rollback failed: {e}")),
                    Err(e) => error(&format!("self-update: rollback task failed: {e}")),
                }
                self.on_trial.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

fn not_in_layout() -> String {
    "self-update refused: this agent does not run from a host layout (<root>/releases/<version>/bin/nkudo-edge); \
     install it with `releaser install` so that it can switch versions safely"
        .into()
}

/// Removes everything in `downloads/` that does not belong to the artifact `name`.
fn clean_downloads(dir: &Path, name: &str) {
    let keep = [format!("{name}.part"), format!("{name}.sha256")];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Runs `<exe> version` and checks that it exits 0 and prints `nkudo-edge <version>` first.
pub async fn trial_run(exe: &Path, version: &str) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("version").stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = match tokio::time::timeout(TRIAL_RUN_TIMEOUT, cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "`{} version` did not finish within {}s",
                exe.display(),
                TRIAL_RUN_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot execute {}: {e}", exe.display())),
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or("").trim().to_string();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`{} version` failed ({}): {}",
            exe.display(),
            out.status,
            stderr.trim().chars().take(300).collect::<String>()
        ));
    }
    let want = format!("nkudo-edge {version}");
    if first != want {
        return Err(format!(
            "`{} version` printed {first:?}, expected {want:?}",
            exe.display()
        ));
    }
    Ok(())
}
