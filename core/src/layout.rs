//! The host release layout: where a host keeps the n-kudo releases it has installed and which one runs.
//!
//! ```text
//! <root>/                      default /opt/nkudo (DEFAULT_ROOT)
//!   releases/<version>/        one directory per installed release, named by its SemVer (no `v`):
//!     .complete                  completion marker (JSON: the version and the digest of every entry), written last
//!     bin/ systemd/ config/ ...  the unpacked release archive
//!   releases/.tmp-*            work in progress or leftovers of a crash; removed by the next mutating call
//!   current  -> releases/<v>   relative symlink: the version that runs (systemd units point through it)
//!   previous -> releases/<v>   relative symlink: where `rollback` goes
//!   .lock                      lock file: every mutating operation holds an exclusive lock on it
//! ```
//!
//! [`Layout`] is the library behind `releaser install|activate|rollback|list|prune --root DIR` and behind the edge
//! agent's self-update (ARCHITECTURE §4.7): install the verified release, activate it, restart through systemd,
//! and [`LayoutLock::rollback`] if the new version does not report healthy in time.
//!
//! The API is blocking (file system calls, fsyncs, waiting for the lock): from async code (the agent) call it on
//! a blocking thread (`tokio::task::spawn_blocking`). Reads need no lock; [`Layout::lock`] returns the guard
//! whose methods mutate, and `Layout::install|activate|rollback|prune` are shorthands taking the lock for one call.
//!
//! **Trust.** This module does not verify signatures: the caller (the releaser, the agent) verifies the
//! manifest signature and every SHA-256 *before* calling [`Layout::install`], and unpacks only verified bytes.
//! The layout then records a digest of everything that was unpacked in the completion marker, and
//! [`Layout::activate`] re-checks those digests, so a damaged release directory is never switched to.
//!
//! # Crash safety
//!
//! The invariant: **`current` and `previous` only ever point at complete releases**, whatever moment the
//! process dies at (power loss included), and rerunning the interrupted operation completes it.
//!
//! * A release becomes visible under `releases/<version>` by a single `rename(2)` of a temporary directory
//!   beside it (same file system, so the rename is atomic). Before the rename every file and directory in it has
//!   been fsynced and the completion marker written (and fsynced) last; after it `releases/` is fsynced. A crash
//!   before the rename leaves only a `.tmp-*` directory, which the next mutating call removes; a crash after it
//!   leaves a complete release. A `releases/<version>` without a valid marker (made by something else, or by an
//!   older tool) counts as not installed: it is never activated and `install` replaces it.
//! * `current` (and `previous`) are switched by creating a new symlink under a temporary name and renaming it
//!   over the old one, then fsyncing `<root>`: `rename(2)` replaces the link atomically, so a reader sees the old
//!   target or the new one, never no link. `activate` moves `previous` first (to the old `current`), then
//!   `current`: a crash between the two leaves `previous == current`, both complete, and the rerun finishes.
//! * `rollback` switches `current` to `previous`, then removes `previous` (a rollback is not a toggle: running it
//!   again must not bring the bad version back). A crash between the two leaves `previous == current`; a
//!   rollback finding that state only removes `previous`, and its result is the same: the version that ran before.
//! * `prune` first renames a release to a `.tmp-*` name (atomically removing it from the layout), then deletes
//!   it, so a half-deleted release is never mistaken for a complete one.
//! * Every mutating operation holds an exclusive lock on `<root>/.lock` ([`Layout::lock`], `flock(2)` through
//!   `File::lock`), so two invocations (two `releaser` runs, the agent and an operator) are serialised; the
//!   kernel drops the lock when its holder dies, so a crash cannot leave it held. Waiting for it times out
//!   ([`Layout::with_lock_timeout`]) with an error naming the lock. Reads (`list`, `current`, `previous`) take no
//!   lock: each link read is atomic.
//!
//! # Failpoints
//!
//! For the crash tests, when the environment variable [`CRASH_ENV`] (`NKUDO_LAYOUT_CRASH_AT`) equals one of the
//! step names in [`CRASH_POINTS`], the process calls `std::process::abort()` when it reaches that step (after
//! printing the step to stderr). Unset, each step costs one environment lookup. Whoever can set a process's environment can kill it anyway, so this opens nothing.

use crate::fsutil::sync_dir;
use crate::version::{compare, display};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::error::Error as StdError;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// Default layout root on a host.
pub const DEFAULT_ROOT: &str = "/opt/nkudo";
/// Default of [`LayoutLock::prune`]'s `keep`: the current version and the two before it.
pub const DEFAULT_KEEP: usize = 3;
/// Default of how long a mutating operation waits for another one to finish.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Name of the completion marker in a release directory (reserved: a release may not contain it).
pub const COMPLETE_MARKER: &str = ".complete";
/// The failpoint variable: set it to a name of [`CRASH_POINTS`] to abort the process at that step.
pub const CRASH_ENV: &str = "NKUDO_LAYOUT_CRASH_AT";

/// Every step boundary a failpoint can stop at, in the order the operations pass them.
pub const CRASH_POINTS: &[&str] = &[
    // Any mutating operation, right after taking the lock (before the leftovers of a crash are removed).
    "lock:acquired",
    // install: a `releases/<version>` without a valid marker has been moved aside, not yet deleted.
    "install:stale-moved",
    "install:stale-removed",
    "install:tmp-created",
    "install:filled",
    "install:synced",
    "install:marker-written",
    "install:renamed",
    "install:done",
    // activate: `previous` is moved to the old current version, then `current` is switched.
    "activate:previous-link-created",
    "activate:previous-renamed",
    "activate:previous-synced",
    "activate:current-link-created",
    "activate:current-renamed",
    "activate:current-synced",
    // rollback: the target (the previous version) is verified, `current` switched to it, `previous` removed.
    "rollback:resolved",
    "rollback:current-link-created",
    "rollback:current-renamed",
    "rollback:current-synced",
    "rollback:previous-removed",
    // prune, for each removed version: renamed to a `.tmp-*` name, then deleted.
    "prune:moved",
    "prune:removed",
];

const RELEASES: &str = "releases";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const LOCK_FILE: &str = ".lock";
const TMP_PREFIX: &str = ".tmp-";
const MARKER_FORMAT: u32 = 1;

/// Aborts the process when [`CRASH_ENV`] names `step` (see the module documentation).
fn crash_point(step: &'static str) {
    debug_assert!(CRASH_POINTS.contains(&step), "unknown crash point {step}");
    if let Some(at) = std::env::var_os(CRASH_ENV) {
        if at == step {
            eprintln!("{CRASH_ENV}={step}: aborting at this step");
            std::process::abort();
        }
    }
}

/// What went wrong, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "cannot {op} {path}: {source}. {root} is not writable by this user: run as a user allowed to change it \
         (usually root, for example with sudo), or choose a writable directory with --root"
    )]
    NotWritable {
        root: PathBuf,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no space left on the file system holding {root} (while trying to {op} {path}): free space under {root} \
         (`releaser prune --root {root}` removes old releases) and retry"
    )]
    NoSpace {
        root: PathBuf,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not installed under {root}; installed: {}. Install it first (`releaser install`)",
        display(.version), list_versions(.installed))]
    NotInstalled {
        root: PathBuf,
        version: Version,
        installed: Vec<Version>,
    },
    #[error(
        "{} under {root} is incomplete (an interrupted install: no valid {COMPLETE_MARKER} marker) and is never \
         activated; install it again (`releaser install`), which replaces it", display(.version)
    )]
    Incomplete { root: PathBuf, version: Version },
    #[error(
        "{} under {root} no longer matches what was installed: {reason}; install it again (`releaser install` \
         replaces a damaged release)", display(.version)
    )]
    Corrupt {
        root: PathBuf,
        version: Version,
        reason: String,
    },
    #[error(
        "another process (a releaser or the nkudo-edge agent) has been changing {root} for more than {:.1}s \
         (it holds the lock {}); wait for it to finish and retry. A lock is released when its holder exits, so it \
         is never left behind by a crash", .waited.as_secs_f64(), .lock.display()
    )]
    LockTimeout {
        root: PathBuf,
        lock: PathBuf,
        waited: Duration,
    },
    #[error(
        "nothing to roll back to under {root}: the current version is {} and no previous version is recorded (none \
         was activated before it, or a rollback already happened); activate a version explicitly (`releaser \
         activate <version>`); installed: {}",
        .current.as_ref().map(display).unwrap_or_else(|| "none".into()), list_versions(.installed)
    )]
    NoPrevious {
        root: PathBuf,
        current: Option<Version>,
        installed: Vec<Version>,
    },
    #[error("unpacking {} failed: {source}; nothing was installed (its temporary directory was removed)",
        display(.version))]
    Fill {
        version: Version,
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },
    #[error(
        "cannot install {}: {path} is {reason}; a release may hold only regular files, directories and symbolic \
         links with UTF-8 names, and not {COMPLETE_MARKER} at its top", display(.version)
    )]
    Unsupported {
        version: Version,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{path} is not a link into {root}/releases ({reason}); remove it, then activate a version (`releaser \
         activate <version>`)"
    )]
    BadLink {
        root: PathBuf,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn list_versions(versions: &[Version]) -> String {
    if versions.is_empty() {
        "none".to_string()
    } else {
        versions.iter().map(display).collect::<Vec<_>>().join(", ")
    }
}

/// Result of [`LayoutLock::install`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The release was unpacked and is now complete under `releases/<version>`.
    Installed,
    /// A complete, intact copy was already there: nothing was done and the fill function was not called.
    AlreadyInstalled,
}

/// Result of [`LayoutLock::activate`] and [`LayoutLock::rollback`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// What `current` points at now.
    pub current: Version,
    /// What `previous` points at now (where a rollback would go).
    pub previous: Option<Version>,
    /// False when the version was already current (nothing was changed).
    pub changed: bool,
}

/// One release directory, as [`Layout::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: Version,
    pub path: PathBuf,
    /// `current` points at it.
    pub current: bool,
    /// `previous` points at it.
    pub previous: bool,
    /// It has a valid completion marker (an incomplete release is never activated).
    pub complete: bool,
}

/// The completion marker: written last into a release directory, it lists every entry with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: u32,
    version: String,
    entries: Vec<MarkerEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum MarkerEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        size: u64,
        sha256: String,
    },
    Symlink {
        path: String,
        target: String,
    },
}

enum ReleaseState {
    Missing,
    Incomplete,
    Complete(Marker),
}

/// A host release layout rooted at one directory. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    releases: PathBuf,
    lock_timeout: Duration,
}

impl Layout {
    /// Opens the layout at `root` (usually [`DEFAULT_ROOT`]), creating `root/releases/` if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Layout, LayoutError> {
        let root = root.into();
        let releases = root.join(RELEASES);
        let layout = Layout {
            root,
            releases,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        };
        if !layout.releases.is_dir() {
            fs::create_dir_all(&layout.releases).map_err(|e| layout.io("create", &layout.releases, e))?;
            if let Some(parent) = layout.root.parent().filter(|p| !p.as_os_str().is_empty()) {
                let _ = sync_dir(parent);
            }
            let _ = sync_dir(&layout.root);
        }
        Ok(layout)
    }

    /// How long [`Layout::lock`] waits for another process's operation to finish (default
    /// [`DEFAULT_LOCK_TIMEOUT`]).
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Layout {
        self.lock_timeout = timeout;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/releases/<version>` (whether or not it is installed).
    pub fn release_dir(&self, version: &Version) -> PathBuf {
        self.releases.join(version.to_string())
    }

    /// Takes the exclusive layout lock, waiting up to the lock timeout, then removes the leftovers of crashed
    /// operations (best effort). Every mutating operation runs under it; hold the guard to run several of them
    /// as one (for example install then activate). The lock is released when the guard is dropped.
    pub fn lock(&self) -> Result<LayoutLock<'_>, LayoutError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io("open the lock file", &path, e))?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) => {
                    let waited = start.elapsed();
                    if waited >= self.lock_timeout {
                        return Err(LayoutError::LockTimeout {
                            root: self.root.clone(),
                            lock: path,
                            waited,
                        });
                    }
                    std::thread::sleep(pause.min(self.lock_timeout - waited));
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(fs::TryLockError::Error(e)) => return Err(self.io("lock", &path, e)),
            }
        }
        crash_point("lock:acquired");
        let guard = LayoutLock {
            layout: self,
            _file: file,
        };
        self.remove_leftovers();
        Ok(guard)
    }

    /// Installs `version` (see [`LayoutLock::install`]) under the lock.
    pub fn install<E>(
        &self,
        version: &Version,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<InstallOutcome, LayoutError>
    where
        E: Into<Box<dyn StdError + Send + Sync + 'static>>,
    {
        self.lock()?.install(version, fill)
    }

    /// Activates `version` (see [`LayoutLock::activate`]) under the lock.
    pub fn activate(&self, version: &Version) -> Result<Activation, LayoutError> {
        self.lock()?.activate(version)
    }

    /// Rolls back to the previous version (see [`LayoutLock::rollback`]) under the lock.
    pub fn rollback(&self) -> Result<Version, LayoutError> {
        self.lock()?.rollback()
    }

    /// Removes old releases (see [`LayoutLock::prune`]) under the lock.
    pub fn prune(&self, keep: usize) -> Result<Vec<Version>, LayoutError> {
        self.lock()?.prune(keep)
    }

    /// The version `current` points at; `None` when nothing was activated yet.
    pub fn current(&self) -> Result<Option<Version>, LayoutError> {
        self.read_link(CURRENT)
    }

    /// The version `previous` points at (where [`LayoutLock::rollback`] goes); `None` when there is none.
    pub fn previous(&self) -> Result<Option<Version>, LayoutError> {
        self.read_link(PREVIOUS)
    }

    /// Every release directory, in SemVer precedence order (pre-releases before their release; builds that
    /// differ only in build metadata by their text). Directories whose name is not a SemVer version and
    /// temporary directories are not listed.
    pub fn list(&self) -> Result<Vec<Entry>, LayoutError> {
        let current = self.current().ok().flatten();
        let previous = self.previous().ok().flatten();
        let mut entries = Vec::new();
        for version in self.release_dirs()? {
            let complete = matches!(self.state(&version)?, ReleaseState::Complete(_));
            entries.push(Entry {
                path: self.release_dir(&version),
                current: current.as_ref() == Some(&version),
                previous: previous.as_ref() == Some(&version),
                complete,
                version,
            });
        }
        Ok(entries)
    }

    /// The complete releases, in SemVer order.
    pub fn installed(&self) -> Result<Vec<Version>, LayoutError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|e| e.complete)
            .map(|e| e.version)
            .collect())
    }

    /// Checks that `version` is installed, complete, and that every entry recorded in its completion marker is
    /// still there with the same digest, size and mode (or link target). Files added later are not looked at.
    pub fn verify(&self, version: &Version) -> Result<(), LayoutError> {
        let marker = match self.state(version)? {
            ReleaseState::Complete(m) => m,
            ReleaseState::Incomplete => {
                return Err(LayoutError::Incomplete {
                    root: self.root.clone(),
                    version: version.clone(),
                })
            }
            ReleaseState::Missing => return Err(self.not_installed(version)),
        };
        let dir = self.release_dir(version);
        let corrupt = |reason: String| LayoutError::Corrupt {
            root: self.root.clone(),
            version: version.clone(),
            reason,
        };
        for entry in &marker.entries {
            match entry {
                MarkerEntry::Dir { path, mode } => {
                    let meta = fs::symlink_metadata(dir.join(path)).map_err(|e| corrupt(format!("{path}: {e}")))?;
                    if !meta.is_dir() {
                        return Err(corrupt(format!("{path} is no longer a directory")));
                    }
                    if meta.permissions().mode() & 0o7777 != *mode {
                        return Err(corrupt(format!("the mode of {path} changed")));
                    }
                }
                MarkerEntry::File {
                    path,
                    mode,
                    size,
                    sha256,
                } => {
                    let full = dir.join(path);
                    let meta = fs::symlink_metadata(&full).map_err(|e| corrupt(format!("{path}: {e}")))?;
                    if !meta.is_file() {
                        return Err(corrupt(format!("{path} is no longer a regular file")));
                    }
                    if meta.len() != *size {
                        return Err(corrupt(format!(
                            "{path} has {} bytes, {size} were installed",
                            meta.len()
                        )));
                    }
                    if meta.permissions().mode() & 0o7777 != *mode {
                        return Err(corrupt(format!("the mode of {path} changed")));
                    }
                    let file = File::open(&full).map_err(|e| self.io("read", &full, e))?;
                    let (digest, _) = sha256_of(file).map_err(|e| self.io("read", &full, e))?;
                    if digest != *sha256 {
                        return Err(corrupt(format!("the content of {path} changed (SHA-256 {digest})")));
                    }
                }
                MarkerEntry::Symlink { path, target } => {
                    let actual = fs::read_link(dir.join(path)).map_err(|e| corrupt(format!("{path}: {e}")))?;
                    if actual.as_os_str() != target.as_str() {
                        return Err(corrupt(format!("the link {path} now points at {}", actual.display())));
                    }
                }
            }
        }
        Ok(())
    }

    /// The installed release a path lies in (for example the running binary, `/proc/self/exe`, which resolves
    /// to `<root>/releases/<version>/bin/...`): how a binary learns the version it was installed as.
    pub fn release_of(&self, path: &Path) -> Option<Version> {
        let rest = match path.strip_prefix(&self.releases) {
            Ok(rest) => rest.to_path_buf(),
            Err(_) => path
                .strip_prefix(fs::canonicalize(&self.releases).ok()?)
                .ok()?
                .to_path_buf(),
        };
        match rest.components().next()? {
            Component::Normal(name) => parse_dir_name(name.to_str()?),
            _ => None,
        }
    }

    // ----- internals -----

    fn io(&self, op: &'static str, path: &Path, source: io::Error) -> LayoutError {
        io_error(&self.root, op, path, source)
    }

    /// `current` as a switch needs it: a symbolic link pointing somewhere unexpected is simply replaced (its
    /// target is not recorded as previous), but anything else in the way (a directory, a file) is an error.
    fn current_for_switch(&self) -> Result<Option<Version>, LayoutError> {
        match self.current() {
            Err(LayoutError::BadLink { .. })
                if fs::symlink_metadata(self.root.join(CURRENT)).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                Ok(None)
            }
            other => other,
        }
    }

    fn not_installed(&self, version: &Version) -> LayoutError {
        LayoutError::NotInstalled {
            root: self.root.clone(),
            version: version.clone(),
            installed: self.installed().unwrap_or_default(),
        }
    }

    /// Versions with a directory under `releases/` (complete or not), sorted.
    fn release_dirs(&self) -> Result<Vec<Version>, LayoutError> {
        let mut versions = Vec::new();
        let read = fs::read_dir(&self.releases).map_err(|e| self.io("list", &self.releases, e))?;
        for entry in read {
            let entry = entry.map_err(|e| self.io("list", &self.releases, e))?;
            if let Some(v) = entry.file_name().to_str().and_then(parse_dir_name) {
                versions.push(v);
            }
        }
        versions.sort_by(|a, b| compare(a, b).then_with(|| a.build.cmp(&b.build)));
        Ok(versions)
    }

    fn state(&self, version: &Version) -> Result<ReleaseState, LayoutError> {
        let dir = self.release_dir(version);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(ReleaseState::Incomplete),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReleaseState::Missing),
            Err(e) => return Err(self.io("inspect", &dir, e)),
        }
        let path = dir.join(COMPLETE_MARKER);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReleaseState::Incomplete),
            Err(e) => return Err(self.io("read", &path, e)),
        };
        match serde_json::from_slice::<Marker>(&bytes) {
            Ok(m) if m.format == MARKER_FORMAT && m.version == version.to_string() => Ok(ReleaseState::Complete(m)),
            _ => Ok(ReleaseState::Incomplete),
        }
    }

    fn read_link(&self, name: &str) -> Result<Option<Version>, LayoutError> {
        let path = self.root.join(name);
        let target = match fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Err(LayoutError::BadLink {
                    root: self.root.clone(),
                    path,
                    reason: "it is not a symbolic link".into(),
                })
            }
            Err(e) => return Err(self.io("read the link", &path, e)),
        };
        let bad = |reason: String| LayoutError::BadLink {
            root: self.root.clone(),
            path: path.clone(),
            reason,
        };
        // Ours are relative (`releases/<version>`); accept an absolute one into this root's releases too.
        let parent_ok = match target.parent() {
            Some(p) if p == Path::new(RELEASES) => true,
            Some(p) if p.is_absolute() => {
                p == self.releases
                    || fs::canonicalize(p)
                        .ok()
                        .is_some_and(|c| Some(c) == fs::canonicalize(&self.releases).ok())
            }
            _ => false,
        };
        let version = target.file_name().and_then(|n| n.to_str()).and_then(parse_dir_name);
        match (parent_ok, version) {
            (true, Some(v)) => Ok(Some(v)),
            _ => Err(bad(format!("it points at {}", target.display()))),
        }
    }

    /// Removes `releases/.tmp-*` and `<root>/.*.tmp-*` leftovers. Only called under the lock, so none of them
    /// belongs to a running operation. Best effort: a failure here must not block a rollback.
    fn remove_leftovers(&self) {
        let mut removed = false;
        if let Ok(read) = fs::read_dir(&self.releases) {
            for entry in read.flatten() {
                if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    removed |= remove_any(&entry.path()).is_ok();
                }
            }
        }
        if removed {
            let _ = sync_dir(&self.releases);
        }
        let mut removed = false;
        if let Ok(read) = fs::read_dir(&self.root) {
            for entry in read.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if [CURRENT, PREVIOUS]
                    .iter()
                    .any(|link| name.starts_with(&format!(".{link}{TMP_PREFIX}")))
                {
                    removed |= fs::remove_file(entry.path()).is_ok();
                }
            }
        }
        if removed {
            let _ = sync_dir(&self.root);
        }
    }

    /// Renames `releases/<version>` to a `.tmp-*` name (atomically taking it out of the layout), then deletes
    /// it. A failure to delete leaves a leftover that the next mutating call removes.
    fn take_out(
        &self,
        version: &Version,
        why: &str,
        moved: &'static str,
        removed: &'static str,
    ) -> Result<(), LayoutError> {
        let dir = self.release_dir(version);
        let trash = self.releases.join(format!("{TMP_PREFIX}{why}-{version}-{}", nonce()));
        fs::rename(&dir, &trash).map_err(|e| self.io("move aside", &dir, e))?;
        sync_dir(&self.releases).map_err(|e| self.io("sync", &self.releases, e))?;
        crash_point(moved);
        let _ = remove_any(&trash);
        crash_point(removed);
        Ok(())
    }

    /// Points `<root>/<name>` at `releases/<version>`: new symlink under a temporary name, rename over, fsync.
    fn set_link(&self, name: &str, version: &Version, steps: [&'static str; 3]) -> Result<(), LayoutError> {
        let tmp = self.root.join(format!(".{name}{TMP_PREFIX}{}", nonce()));
        let target = Path::new(RELEASES).join(version.to_string());
        symlink(&target, &tmp).map_err(|e| self.io("create the link", &tmp, e))?;
        crash_point(steps[0]);
        let path = self.root.join(name);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io("switch the link", &path, e));
        }
        crash_point(steps[1]);
        sync_dir(&self.root).map_err(|e| self.io("sync", &self.root, e))?;
        crash_point(steps[2]);
        Ok(())
    }

    /// Walks the unpacked tree at `dir`, fsyncing every file and directory (children before their directory)
    /// and recording each entry for the completion marker, sorted by path.
    fn sync_and_record(&self, version: &Version, dir: &Path) -> Result<Vec<MarkerEntry>, LayoutError> {
        let mut entries = Vec::new();
        self.walk(version, dir, "", &mut entries)?;
        Ok(entries)
    }

    fn walk(&self, version: &Version, dir: &Path, rel: &str, out: &mut Vec<MarkerEntry>) -> Result<(), LayoutError> {
        let mut children: Vec<_> = fs::read_dir(dir)
            .map_err(|e| self.io("list", dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.io("list", dir, e))?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let path = child.path();
            let unsupported = |reason: &str| LayoutError::Unsupported {
                version: version.clone(),
                path: path.clone(),
                reason: reason.to_string(),
            };
            let name = child.file_name();
            let name = name.to_str().ok_or_else(|| unsupported("a name that is not UTF-8"))?;
            if rel.is_empty() && name == COMPLETE_MARKER {
                return Err(unsupported("the reserved completion marker name"));
            }
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(&path).map_err(|e| self.io("inspect", &path, e))?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(|e| self.io("read the link", &path, e))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| unsupported("a link whose target is not UTF-8"))?;
                out.push(MarkerEntry::Symlink {
                    path: child_rel,
                    target,
                });
            } else if meta.is_dir() {
                out.push(MarkerEntry::Dir {
                    path: child_rel.clone(),
                    mode,
                });
                self.walk(version, &path, &child_rel, out)?;
            } else if meta.is_file() {
                let file = File::open(&path).map_err(|e| self.io("read", &path, e))?;
                let (sha256, size) = sha256_of(&file).map_err(|e| self.io("read", &path, e))?;
                file.sync_all().map_err(|e| self.io("sync", &path, e))?;
                out.push(MarkerEntry::File {
                    path: child_rel,
                    mode,
                    size,
                    sha256,
                });
            } else {
                return Err(unsupported("neither a file, a directory nor a symbolic link"));
            }
        }
        sync_dir(dir).map_err(|e| self.io("sync", dir, e))
    }
}

/// The layout lock, held: the mutating operations. Dropping it releases the lock.
pub struct LayoutLock<'a> {
    layout: &'a Layout,
    _file: File,
}

impl fmt::Debug for LayoutLock<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayoutLock").field("root", &self.layout.root).finish()
    }
}

impl LayoutLock<'_> {
    pub fn layout(&self) -> &Layout {
        self.layout
    }

    /// Installs `version`: `fill` unpacks the release into the (empty) directory it is given; then every file
    /// and directory in it is fsynced, the completion marker (the version and each entry's SHA-256, size and
    /// mode) is written last and fsynced, the directory is renamed to `releases/<version>` and `releases/`
    /// fsynced.
    ///
    /// **The caller verifies the release first** (manifest signature, then every artifact's SHA-256) and
    /// unpacks only verified bytes: this function trusts what `fill` writes.
    ///
    /// A complete, intact `releases/<version>` makes this a no-op ([`InstallOutcome::AlreadyInstalled`]; `fill`
    /// is not called): the same version always has the same bytes. One without a valid marker, or damaged since,
    /// is replaced. If `fill` fails, its temporary directory is removed and [`LayoutError::Fill`] carries its
    /// error (or [`LayoutError::NoSpace`] when that error is an `io::Error` saying the disk is full). The
    /// release may hold regular files, directories and symbolic links with UTF-8 names, and no
    /// [`COMPLETE_MARKER`] at its top. `fill` runs under the lock: other operations wait meanwhile.
    pub fn install<E>(
        &self,
        version: &Version,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<InstallOutcome, LayoutError>
    where
        E: Into<Box<dyn StdError + Send + Sync + 'static>>,
    {
        let layout = self.layout;
        match layout.state(version)? {
            ReleaseState::Complete(_) => match layout.verify(version) {
                Ok(()) => return Ok(InstallOutcome::AlreadyInstalled),
                Err(LayoutError::Corrupt { .. }) => {
                    layout.take_out(version, "damaged", "install:stale-moved", "install:stale-removed")?
                }
                Err(e) => return Err(e),
            },
            ReleaseState::Incomplete => {
                layout.take_out(version, "stale", "install:stale-moved", "install:stale-removed")?
            }
            ReleaseState::Missing => {}
        }

        let tmp = layout.releases.join(format!("{TMP_PREFIX}{version}-{}", nonce()));
        fs::create_dir(&tmp).map_err(|e| layout.io("create", &tmp, e))?;
        crash_point("install:tmp-created");
        let result = self.fill_and_seal(version, &tmp, fill);
        if result.is_err() {
            let _ = remove_any(&tmp);
            return result.map(|_| InstallOutcome::Installed);
        }

        let dir = layout.release_dir(version);
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = remove_any(&tmp);
            return Err(layout.io("rename into place", &dir, e));
        }
        crash_point("install:renamed");
        sync_dir(&layout.releases).map_err(|e| layout.io("sync", &layout.releases, e))?;
        crash_point("install:done");
        Ok(InstallOutcome::Installed)
    }

    fn fill_and_seal<E>(
        &self,
        version: &Version,
        tmp: &Path,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<(), LayoutError>
    where
        E: Into<Box<dyn StdError + Send + Sync + 'static>>,
    {
        let layout = self.layout;
        if let Err(e) = fill(tmp) {
            let source: Box<dyn StdError + Send + Sync> = e.into();
            if let Some(io) = source.downcast_ref::<io::Error>() {
                if is_no_space(io) {
                    return Err(LayoutError::NoSpace {
                        root: layout.root.clone(),
                        op: "unpack",
                        path: tmp.to_path_buf(),
                        source: io::Error::new(io.kind(), io.to_string()),
                    });
                }
            }
            return Err(LayoutError::Fill {
                version: version.clone(),
                source,
            });
        }
        crash_point("install:filled");
        let entries = layout.sync_and_record(version, tmp)?;
        crash_point("install:synced");
        let marker = Marker {
            format: MARKER_FORMAT,
            version: version.to_string(),
            entries,
        };
        let mut bytes = serde_json::to_vec_pretty(&marker).expect("a marker always serializes");
        bytes.push(b'\n');
        let path = tmp.join(COMPLETE_MARKER);
        let write = || -> io::Result<()> {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&path)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        write().map_err(|e| layout.io("write", &path, e))?;
        sync_dir(tmp).map_err(|e| layout.io("sync", tmp, e))?;
        crash_point("install:marker-written");
        Ok(())
    }

    /// Makes `version` current: it must be installed, complete and intact ([`Layout::verify`]). `previous` is
    /// moved to the old current version first, then `current` is switched, each by an atomic rename of a new
    /// symlink (relative target `releases/<version>`) followed by an fsync of the root. Activating the current
    /// version changes nothing (`changed: false`).
    pub fn activate(&self, version: &Version) -> Result<Activation, LayoutError> {
        let layout = self.layout;
        layout.verify(version)?;
        let old = layout.current_for_switch()?;
        if old.as_ref() == Some(version) {
            return Ok(Activation {
                current: version.clone(),
                previous: layout.previous().ok().flatten(),
                changed: false,
            });
        }
        // Only a complete release becomes `previous`; otherwise the old `previous` stays.
        if let Some(old) = old
            .as_ref()
            .filter(|o| matches!(layout.state(o), Ok(ReleaseState::Complete(_))))
        {
            layout.set_link(
                PREVIOUS,
                old,
                [
                    "activate:previous-link-created",
                    "activate:previous-renamed",
                    "activate:previous-synced",
                ],
            )?;
        }
        layout.set_link(
            CURRENT,
            version,
            [
                "activate:current-link-created",
                "activate:current-renamed",
                "activate:current-synced",
            ],
        )?;
        Ok(Activation {
            current: version.clone(),
            previous: layout.previous().ok().flatten(),
            changed: true,
        })
    }

    /// Activates the previous version and returns it, then forgets `previous`: a rollback is not a toggle, so
    /// running it again cannot bring back the version rolled back from (it answers [`LayoutError::NoPrevious`]).
    /// The target must be complete and intact. When `previous` equals `current` (an activation or a rollback
    /// interrupted between its two link switches) the rollback only removes `previous` and returns the current
    /// version: the one that ran before the interrupted operation.
    pub fn rollback(&self) -> Result<Version, LayoutError> {
        let layout = self.layout;
        let current = layout.current_for_switch()?;
        let target = match layout.previous()? {
            Some(p) => p,
            None => {
                return Err(LayoutError::NoPrevious {
                    root: layout.root.clone(),
                    current,
                    installed: layout.installed().unwrap_or_default(),
                })
            }
        };
        layout.verify(&target)?;
        crash_point("rollback:resolved");
        if current.as_ref() != Some(&target) {
            layout.set_link(
                CURRENT,
                &target,
                [
                    "rollback:current-link-created",
                    "rollback:current-renamed",
                    "rollback:current-synced",
                ],
            )?;
        }
        let link = layout.root.join(PREVIOUS);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(layout.io("remove", &link, e)),
        }
        sync_dir(&layout.root).map_err(|e| layout.io("sync", &layout.root, e))?;
        crash_point("rollback:previous-removed");
        Ok(target)
    }

    /// Removes old releases and returns the removed versions (in SemVer order). Never removes the current or the
    /// previous version; of the other complete releases it keeps the newest (by SemVer) so that `keep` releases
    /// remain counting current and previous ([`DEFAULT_KEEP`]: current + two before it). Incomplete release
    /// directories (never activated) are removed too.
    pub fn prune(&self, keep: usize) -> Result<Vec<Version>, LayoutError> {
        let layout = self.layout;
        // Read the links strictly: a link that cannot be read must stop the prune, not unprotect a release.
        let protected: Vec<Version> = [layout.current()?, layout.previous()?].into_iter().flatten().collect();
        let entries = layout.list()?;
        let is_protected = |v: &Version| protected.contains(v);
        let mut budget = keep.saturating_sub(entries.iter().filter(|e| is_protected(&e.version)).count());
        let mut remove = Vec::new();
        for entry in entries.iter().rev() {
            if is_protected(&entry.version) {
                continue;
            }
            if entry.complete && budget > 0 {
                budget -= 1;
                continue;
            }
            remove.push(entry.version.clone());
        }
        remove.reverse();
        for version in &remove {
            layout.take_out(version, "pruned", "prune:moved", "prune:removed")?;
        }
        Ok(remove)
    }
}

/// Maps an I/O error to the error that says what to do (disk full, not writable) or to [`LayoutError::Io`].
fn io_error(root: &Path, op: &'static str, path: &Path, source: io::Error) -> LayoutError {
    let root = root.to_path_buf();
    let path = path.to_path_buf();
    if is_no_space(&source) {
        LayoutError::NoSpace { root, op, path, source }
    } else if matches!(
        source.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    ) {
        LayoutError::NotWritable { root, op, path, source }
    } else {
        LayoutError::Io { op, path, source }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// A version from a release directory name: only the canonical SemVer text (what [`Layout::release_dir`] makes).
fn parse_dir_name(name: &str) -> Option<Version> {
    let v = Version::parse(name).ok()?;
    (v.to_string() == name).then_some(v)
}

fn sha256_of(mut file: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A random suffix for temporary names (std only: the per-process random hasher keys, the pid, the time and
/// a counter).
fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, AtomicOrdering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_say_what_to_do() {
        let root = Path::new("/opt/nkudo");
        let path = Path::new("/opt/nkudo/releases/.tmp-1.0.0-x/bin/nkudo-edge");
        for kind in [io::ErrorKind::StorageFull, io::ErrorKind::QuotaExceeded] {
            let e = io_error(root, "write", path, io::Error::from(kind));
            assert!(matches!(e, LayoutError::NoSpace { .. }), "{kind:?}");
            let text = e.to_string();
            assert!(
                text.contains("free space under /opt/nkudo") && text.contains("releaser prune --root /opt/nkudo"),
                "{text}"
            );
        }
        for kind in [io::ErrorKind::PermissionDenied, io::ErrorKind::ReadOnlyFilesystem] {
            let e = io_error(root, "create", path, io::Error::from(kind));
            assert!(matches!(e, LayoutError::NotWritable { .. }), "{kind:?}");
            let text = e.to_string();
            assert!(
                text.contains("/opt/nkudo is not writable") && text.contains("--root"),
                "{text}"
            );
        }
        let e = io_error(root, "read", path, io::Error::from(io::ErrorKind::InvalidData));
        assert!(matches!(e, LayoutError::Io { .. }));
    }

    #[test]
    fn directory_names_are_canonical_versions_only() {
        assert_eq!(parse_dir_name("1.2.3"), Some(Version::new(1, 2, 3)));
        assert!(parse_dir_name("1.2.3-pre.4+abc1234").is_some());
        for bad in ["v1.2.3", ".tmp-1.2.3-0a", "1.2", "notes", " 1.2.3", "01.2.3"] {
            assert_eq!(parse_dir_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn crash_points_are_inert_unless_named() {
        // The variable is not set in the unit tests: every point returns.
        assert!(std::env::var_os(CRASH_ENV).is_none());
        for p in CRASH_POINTS {
            crash_point(p);
        }
    }

    #[test]
    fn nonces_differ() {
        let a: std::collections::BTreeSet<String> = (0..1000).map(|_| nonce()).collect();
        assert_eq!(a.len(), 1000);
    }
}
