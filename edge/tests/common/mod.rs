//! Helpers shared by the provider, mock and NetBird tests: where the stand-in binaries are, wrappers that give a
//! stand-in its fault-injection environment without touching this process's environment, /proc probes.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `NKUDO_BIN_DIR`, else `target/<profile>/` (the test executable is `target/<profile>/deps/<name>-<hash>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NKUDO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// A stand-in binary of the `nkudo-tests` package; fails with how to build it when missing.
pub fn mock_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the stand-ins first (`cargo build -p nkudo-tests --bins`, which `cargo xtask test` does) \
         or point NKUDO_BIN_DIR at them",
        p.display()
    );
    p
}

/// A shell script in `dir` that sets `env` and execs `target` with its arguments: a stand-in with faults.
pub fn wrapper(dir: &Path, name: &str, target: &Path, env: &[(&str, &str)]) -> PathBuf {
    let mut script = String::from("#!/bin/sh\n");
    for (k, v) in env {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    script.push_str(&format!("exec '{}' \"$@\"\n", target.display()));
    let p = dir.join(name);
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...].
fn stat_fields(pid: i64) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rfind(')')?;
    Some(stat[after + 1..].split_whitespace().map(str::to_string).collect())
}

/// Alive and not a zombie.
pub fn alive(pid: i64) -> bool {
    match stat_fields(pid) {
        Some(f) => f[0] != "Z" && f[0] != "X",
        None => false,
    }
}

pub fn session_of(pid: i64) -> Option<i64> {
    stat_fields(pid)?.get(3)?.parse().ok()
}

pub fn own_session() -> i64 {
    session_of(std::process::id() as i64).unwrap()
}

pub fn cmdline(pid: i64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Live processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() {
            if pid != std::process::id() as i64 && alive(pid) && cmdline(pid).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
