//! `mock-cloud-hypervisor` answers as `shared/reference/cloud-hypervisor-behaviour.md` says the real VMM does:
//! checked with plain HTTP/1.1 over its unix socket, independently of the provider's client.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One request; (status, body).
fn call(sock: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn chain(body: &str) -> Vec<String> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?} is not an array of strings: {e}"))
}

struct Vmm {
    child: Child,
    sock: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Vmm {
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(mock_bin("mock-cloud-hypervisor"));
    cmd.arg("--api-socket")
        .arg(&sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the mock's socket did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    Vmm { child, sock }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vm_config(dir: &Path) -> String {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"k").unwrap();
    json!({"payload": {"kernel": kernel, "cmdline": "console=ttyS0"}, "serial": {"mode": "File", "file": dir.join("serial.log")}})
        .to_string()
}

fn state(sock: &Path) -> String {
    let (st, body) = call(sock, "GET", "vm.info", None);
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["state"].as_str().unwrap().to_string()
}

#[test]
fn lifecycle_status_codes_and_error_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = spawn(dir.path(), &["--cpus", "boot=1", "--console", "off"], &[]);
    let s = &vmm.sock.clone();

    let (st, body) = call(s, "GET", "vmm.ping", None);
    assert_eq!(st, 200);
    let ping: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ping["pid"], vmm.child.id());
    assert!(ping["version"].is_string() && ping["build_version"].is_string() && ping["features"].is_array());

    let (st, body) = call(s, "GET", "vm.info", None);
    assert_eq!(st, 404);
    chain(&body);
    let (st, body) = call(s, "PUT", "vm.boot", None);
    assert_eq!(st, 404);
    assert!(chain(&body).contains(&"VM config is missing".to_string()));

    // Malformed JSON, unknown endpoint, wrong method.
    assert_eq!(call(s, "PUT", "vm.create", Some("{not json")).0, 400);
    assert_eq!(call(s, "GET", "vm.nonsense", None).0, 404);
    assert_eq!(call(s, "GET", "vm.boot", None).0, 400);

    // Create with a missing kernel: accepted; boot fails 500 and the state stays Created.
    let missing = json!({"payload": {"kernel": dir.path().join("missing-kernel")}}).to_string();
    assert_eq!(call(s, "PUT", "vm.create", Some(&missing)).0, 204);
    let (st, body) = call(s, "PUT", "vm.create", Some(&missing));
    assert_eq!(st, 500);
    assert_eq!(
        chain(&body),
        ["Error from API", "The VM could not be created", "VM is already created"]
    );
    let (st, body) = call(s, "PUT", "vm.boot", None);
    assert_eq!(st, 500);
    assert!(chain(&body).iter().any(|m| m == "The VM could not boot"), "{body}");
    assert_eq!(state(s), "Created");
    let (st, body) = call(s, "GET", "vm.info", None);
    assert_eq!(st, 200);
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1, "defaults filled in");
    assert_eq!(info["config"]["memory"]["size"], 536_870_912u64);
    assert_eq!(call(s, "PUT", "vm.delete", None).0, 204);
    assert_eq!(call(s, "PUT", "vm.delete", None).0, 204, "delete with no VM is fine");

    let cfg = vm_config(dir.path());
    assert_eq!(call(s, "PUT", "vm.create", Some(&cfg)).0, 204);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("api.sock.vmconfig.json")).unwrap(),
        cfg
    );
    assert_eq!(call(s, "PUT", "vm.pause", None).0, 500, "pause before boot");
    assert_eq!(call(s, "PUT", "vm.shutdown", None).0, 500, "shutdown when not running");
    assert_eq!(call(s, "PUT", "vm.boot", None).0, 204);
    assert_eq!(state(s), "Running");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("serial.log")).unwrap(),
        "mock guest: booted\n"
    );
    assert_eq!(call(s, "PUT", "vm.boot", None).0, 500, "boot when running");
    assert_eq!(call(s, "PUT", "vm.pause", None).0, 204);
    assert_eq!(state(s), "Paused");
    assert_eq!(call(s, "PUT", "vm.pause", None).0, 500, "pausing twice");
    assert_eq!(call(s, "PUT", "vm.resume", None).0, 204);
    assert_eq!(call(s, "PUT", "vm.resume", None).0, 500);
    assert_eq!(call(s, "PUT", "vm.shutdown", None).0, 204);
    assert_eq!(state(s), "Created", "vm.shutdown returns to Created, not Shutdown");

    // A second VMM on a live socket exits 1 at once.
    let mut second = Command::new(mock_bin("mock-cloud-hypervisor"))
        .arg("--api-socket")
        .arg(format!("path={}", s.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(wait_exit(&mut second, Duration::from_secs(5)), Some(1));
    let mut err = String::new();
    second.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("already in use by another running instance"), "{err}");

    // vmm.shutdown: 200, exit 0, socket removed, lock file left.
    assert_eq!(call(s, "PUT", "vmm.shutdown", None).0, 200);
    assert_eq!(wait_exit(&mut vmm.child, Duration::from_secs(5)), Some(0));
    assert!(!s.exists());
    assert!(dir.path().join("api.sock.lock").exists());
    let log = std::fs::read_to_string(dir.path().join("api.sock.requests.log")).unwrap();
    assert!(log.lines().any(|l| l == "PUT vmm.shutdown"), "{log}");
}

#[test]
fn stale_socket_does_not_block_and_version_flag() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // a socket file nobody serves
    assert!(sock.exists());
    let mut vmm = spawn(dir.path(), &[], &[]);
    assert_eq!(call(&vmm.sock, "GET", "vmm.ping", None).0, 200);
    // SIGTERM: graceful exit.
    unsafe {
        libc::kill(vmm.child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(wait_exit(&mut vmm.child, Duration::from_secs(2)), Some(0));

    let out = Command::new(mock_bin("mock-cloud-hypervisor"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cloud-hypervisor v54.0.0-mock"
    );
}

#[test]
fn guest_poweroff_ends_the_vmm_unless_no_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = spawn(dir.path(), &[], &[("MOCK_CH_GUEST_POWEROFF_AFTER_MS", "100")]);
    assert_eq!(call(&vmm.sock, "PUT", "vm.create", Some(&vm_config(dir.path()))).0, 204);
    assert_eq!(call(&vmm.sock, "PUT", "vm.boot", None).0, 204);
    assert_eq!(wait_exit(&mut vmm.child, Duration::from_secs(5)), Some(0));
    assert!(!vmm.sock.exists());

    let dir = tempfile::tempdir().unwrap();
    let mut vmm = spawn(
        dir.path(),
        &["--no-shutdown"],
        &[("MOCK_CH_GUEST_POWEROFF_AFTER_MS", "100")],
    );
    assert_eq!(call(&vmm.sock, "PUT", "vm.create", Some(&vm_config(dir.path()))).0, 204);
    assert_eq!(call(&vmm.sock, "PUT", "vm.boot", None).0, 204);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(wait_exit(&mut vmm.child, Duration::ZERO), None, "still running");
    assert_eq!(state(&vmm.sock), "Created");

    // The power button does the same.
    assert_eq!(call(&vmm.sock, "PUT", "vm.boot", None).0, 204);
    assert_eq!(call(&vmm.sock, "PUT", "vm.power-button", None).0, 204);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&vmm.sock), "Created");
    assert_eq!(call(&vmm.sock, "PUT", "vm.power-button", None).0, 500, "not running");
}

#[test]
fn injected_faults() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = spawn(dir.path(), &[], &[("MOCK_CH_FAIL_BOOT", "1")]);
    assert_eq!(call(&vmm.sock, "PUT", "vm.create", Some(&vm_config(dir.path()))).0, 204);
    let (st, body) = call(&vmm.sock, "PUT", "vm.boot", None);
    assert_eq!(st, 500);
    assert_eq!(
        chain(&body),
        ["Error from API", "The VM could not boot", "mock: injected boot failure"]
    );
    assert_eq!(state(&vmm.sock), "Created");
    drop(vmm);

    let dir = tempfile::tempdir().unwrap();
    let mut vmm = spawn(dir.path(), &[], &[("MOCK_CH_CRASH_AFTER_BOOT_MS", "100")]);
    assert_eq!(call(&vmm.sock, "PUT", "vm.create", Some(&vm_config(dir.path()))).0, 204);
    assert_eq!(call(&vmm.sock, "PUT", "vm.boot", None).0, 204);
    assert_eq!(
        wait_exit(&mut vmm.child, Duration::from_secs(5)),
        Some(1),
        "crash: non-zero exit"
    );
    assert!(vmm.sock.exists(), "a crash leaves a stale socket");

    let dir = tempfile::tempdir().unwrap();
    let vmm = spawn(dir.path(), &[], &[("MOCK_CH_DELAY_MS", "300")]);
    let t = Instant::now();
    assert_eq!(call(&vmm.sock, "GET", "vmm.ping", None).0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    // The mock ends itself when its socket file goes away (test hygiene).
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = spawn(dir.path(), &[], &[]);
    std::fs::remove_file(&vmm.sock).unwrap();
    assert_eq!(wait_exit(&mut vmm.child, Duration::from_secs(3)), Some(0));

    let out = Command::new(mock_bin("mock-cloud-hypervisor"))
        .args(["--api-socket", "/nonexistent/x.sock"])
        .env("MOCK_CH_EXIT_AT_START", "4")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
}
