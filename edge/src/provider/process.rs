//! The VMM process: started detached from the agent, found again by pid + command line, signalled safely.
//!
//! `cloud-hypervisor` runs under a tiny `/bin/sh` supervisor in its own session (setsid): it is not in the
//! agent's process group, no timeout or cancellation inside the agent can kill it (reference bug 26), and it
//! outlives agent restarts. The supervisor only waits for the VMM and writes its exit status to a file, so that
//! the provider can tell a guest power-off (exit 0) from a crash (non-zero) even though it is not the VMM's parent.
//!
//! A pid alone is not an identity (pids are reused): a process counts as "our VMM" only while it is not a zombie
//! and its command line contains the VM's API socket path. Signals go through a pidfd opened before that check,
//! so the check and the signal refer to the same process.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What the supervisor shell runs: the VMM (`"$@"`), then records its exit status atomically.
/// The line is `<launch id> <status>`: a late write by the supervisor of an earlier launch is not mistaken for
/// the end of the current one.
const SUPERVISOR: &str = r#""$@"
s=$?
t="$NKUDO_VMM_EXIT_FILE.$NKUDO_VMM_LAUNCH.tmp"
printf '%s %s\n' "$NKUDO_VMM_LAUNCH" "$s" > "$t" && mv -f "$t" "$NKUDO_VMM_EXIT_FILE""#;

/// Environment variables never handed to the VMM (they may hold the agent's secrets).
fn is_sensitive_env(name: &str) -> bool {
    let up = name.to_ascii_uppercase();
    (up.starts_with("NKUDO_") && !up.starts_with("NKUDO_VMM_"))
        || up.starts_with("NB_")
        || ["KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL"]
            .iter()
            .any(|w| up.contains(w))
}

pub struct VmmFiles {
    pub socket: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub exit_file: PathBuf,
}

/// Starts `<ch_bin> --api-socket <socket>` detached. Returns the supervisor's pid (not the VMM's: the VMM's pid
/// comes from `vmm.ping`). The supervisor is reaped by a background task while this agent runs, and by init
/// after that.
pub fn spawn_detached(ch_bin: &Path, files: &VmmFiles, launch: &str) -> io::Result<u32> {
    let open = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p);
    let stdout = open(&files.stdout)?;
    let stderr = open(&files.stderr)?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(SUPERVISOR)
        .arg("nkudo-vmm")
        .arg(ch_bin)
        .arg("--api-socket")
        .arg(&files.socket)
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| !is_sensitive_env(&k.to_string_lossy())))
        .env("NKUDO_VMM_EXIT_FILE", &files.exit_file)
        .env("NKUDO_VMM_LAUNCH", launch)
        .current_dir(files.socket.parent().unwrap_or(Path::new("/")))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(false);
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// The process's state letter from `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), `None` when it does not exist.
fn proc_state(pid: i64) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rfind(')')?;
    stat[after + 1..].trim_start().chars().next()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// True when `pid` is a live (not zombie) process whose command line mentions `socket`.
pub fn is_our_vmm(pid: i64, socket: &Path) -> bool {
    if pid <= 0 || pid > i64::from(i32::MAX) {
        return false;
    }
    match proc_state(pid) {
        None | Some('Z') | Some('X') | Some('x') => return false,
        _ => {}
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => contains(&cmdline, socket.as_os_str().as_encoded_bytes()),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` only if it is still our VMM. Returns whether a signal was sent.
pub fn signal_vmm(pid: i64, socket: &Path, sig: i32) -> bool {
    if pid <= 0 || pid > i64::from(i32::MAX) {
        return false;
    }
    // SAFETY: plain syscalls with integer arguments; the fd is closed below.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        if fd >= 0 {
            let mut sent = false;
            if is_our_vmm(pid, socket) {
                sent = libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                ) == 0;
            }
            libc::close(fd);
            return sent;
        }
        // Kernels before 5.3 have no pidfd: check, then kill (a tiny race, as good as it gets there).
        if is_our_vmm(pid, socket) {
            return libc::kill(pid as libc::pid_t, sig) == 0;
        }
    }
    false
}

/// Waits until `pid` is no longer our VMM. True when it is gone within `timeout`.
pub async fn wait_gone(pid: i64, socket: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_our_vmm(pid, socket) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `<bin> <args>` with a time limit without blocking forever; the first line of stdout.
pub fn run_version(bin: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    use std::io::Read;
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if !status.success() {
                    return None;
                }
                let mut out = String::new();
                child.stdout.take()?.read_to_string(&mut out).ok()?;
                return out.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// `["ip"]`: the default command prefix for `ip` calls.
pub fn default_ip_command() -> Vec<OsString> {
    vec![OsString::from("ip")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_env_is_filtered() {
        for k in [
            "NB_SETUP_KEY",
            "NKUDO_ENROLL_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "api_token",
            "DB_PASSWORD",
        ] {
            assert!(is_sensitive_env(k), "{k}");
        }
        for k in ["PATH", "HOME", "LANG", "MOCK_CH_FAIL_BOOT", "RUST_LOG"] {
            assert!(!is_sensitive_env(k), "{k}");
        }
    }

    #[test]
    fn own_process_matches_by_cmdline_only() {
        let me = std::process::id() as i64;
        let cmdline = std::fs::read("/proc/self/cmdline").unwrap();
        let argv0 = String::from_utf8(cmdline.split(|b| *b == 0).next().unwrap().to_vec()).unwrap();
        let exe = PathBuf::from(argv0);
        assert!(is_our_vmm(me, &exe), "own cmdline holds the test binary path");
        assert!(!is_our_vmm(me, Path::new("/definitely/not/a/socket.sock")));
        assert!(!is_our_vmm(0, &exe));
        assert!(!is_our_vmm(-1, &exe));
        assert!(!signal_vmm(me, Path::new("/definitely/not/a/socket.sock"), 0));
    }
}
