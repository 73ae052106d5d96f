//! Process mechanics of the self-update: re-executing in place, the detached watcher, PIDs.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exit code that asks the service manager to restart the agent (EX_TEMPFAIL; `RestartForceExitStatus=75`).
pub const EXIT_RESTART: i32 = 75;

/// Replaces this process with `exe` and `args` (argv[0] = `exe`), keeping the PID and the environment. Returns
/// only on failure.
pub fn exec(exe: &Path, args: &[std::ffi::OsString]) -> std::io::Error {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = CString::new(exe.as_os_str().as_bytes()) else {
        return std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL");
    };
    let mut argv: Vec<CString> = vec![path.clone()];
    for a in args {
        match CString::new(a.as_os_str().as_bytes()) {
            Ok(c) => argv.push(c),
            Err(_) => return std::io::Error::new(std::io::ErrorKind::InvalidInput, "argument contains NUL"),
        }
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `path` and every `argv` string outlive the call; the array is NULL-terminated.
    unsafe {
        libc::execv(path.as_ptr(), ptrs.as_ptr());
    }
    std::io::Error::last_os_error()
}

/// Starts `exe args…` fully detached: its own session (setsid), reparented to init (double fork, so it is never
/// the agent's zombie child), stdin from /dev/null, stdout and stderr appended to `log`.
pub fn spawn_detached(exe: &Path, args: &[std::ffi::OsString], log: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: only async-signal-safe calls (setsid, fork, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),         // the grandchild goes on to exec
                _ => libc::_exit(0), // the intermediate child leaves at once
            }
        });
    }
    let mut child = cmd.spawn()?;
    let _ = child.wait();
    Ok(())
}

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as i32, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// SIGTERM, then SIGKILL after `grace` if it is still alive. Returns whether it is gone.
pub fn terminate(pid: u32, grace: Duration) -> bool {
    if !pid_alive(pid) {
        return true;
    }
    // SAFETY: plain signals to a PID we watched.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Writes `<state-dir>/agent.pid`.
pub fn write_pid_file(state_dir: &Path, pid: u32) -> std::io::Result<()> {
    crate::fsutil::ensure_dir(state_dir, 0o700)?;
    crate::fsutil::write_atomic(
        &state_dir.join(super::state::PID_FILE),
        format!("{pid}\n").as_bytes(),
        0o644,
    )
}

pub fn read_pid_file(state_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(state_dir.join(super::state::PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `systemctl` on this host, if any.
pub fn systemctl() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("systemctl")).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(pid_alive(pid));
        // A zombie (not reaped yet) is dead.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(!pid_alive(pid));
        let _ = child.wait();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn detached_child_runs_in_its_own_session() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("w.log");
        let marker = tmp.path().join("done");
        spawn_detached(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                format!("echo hello; cut -d' ' -f6 /proc/$$/stat > {}", marker.display()).into(),
            ],
            &log,
        )
        .unwrap();
        let t0 = Instant::now();
        while !(marker.exists() && std::fs::metadata(&marker).unwrap().len() > 0)
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "hello");
        let sid: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
        assert_ne!(sid, unsafe { libc::getsid(0) });
    }
}
