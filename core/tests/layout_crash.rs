//! Crash tests of the host release layout: the process is killed (`abort()`, through the `NKUDO_LAYOUT_CRASH_AT`
//! failpoint) between each pair of steps of install, activate, rollback and prune. After every crash `current`
//! (and `previous`) must point at a complete, intact release, and rerunning the operation must complete it.
//!
//! The child is this very test binary, run with `--exact crash_child` and the root, the operation and the crash
//! step in its environment; `crash_child` does nothing when run as part of the normal suite.

mod common;

use common::*;
use nkudo_core::layout::{InstallOutcome, Layout, LayoutError, CRASH_ENV, CRASH_POINTS, DEFAULT_KEEP};
use semver::Version;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const CHILD_ROOT: &str = "NKUDO_TEST_LAYOUT_ROOT";
const CHILD_OP: &str = "NKUDO_TEST_LAYOUT_OP";
const CHILD_LOCK_TIMEOUT_MS: &str = "NKUDO_TEST_LAYOUT_LOCK_TIMEOUT_MS";
const SIGABRT: i32 = 6;

/// The child: runs one layout operation (and crashes where `NKUDO_LAYOUT_CRASH_AT` says).
#[test]
fn crash_child() {
    let Some(root) = std::env::var_os(CHILD_ROOT) else {
        return;
    };
    let op = std::env::var(CHILD_OP).unwrap();
    let mut layout = Layout::open(root).unwrap();
    if let Ok(ms) = std::env::var(CHILD_LOCK_TIMEOUT_MS) {
        layout = layout.with_lock_timeout(Duration::from_millis(ms.parse().unwrap()));
    }
    match run_op(&layout, &op) {
        Ok(result) => println!("child result: {result}"),
        Err(e) => panic!("child error: {e}"),
    }
}

fn run_op(layout: &Layout, op: &str) -> Result<String, LayoutError> {
    let (name, arg) = op.split_once(' ').unwrap_or((op, ""));
    match name {
        "install" => layout.install(&v(arg), filler(&v(arg))).map(|o| format!("{o:?}")),
        // Unpacking dies half-way: the process is killed inside the caller's fill function.
        "install-dying-in-fill" => layout
            .install(&v(arg), |dir: &Path| -> std::io::Result<()> {
                fs::create_dir_all(dir.join("bin"))?;
                fs::write(dir.join("bin/nkudo-edge"), b"#!/bin/sh\necho half")?;
                std::process::abort()
            })
            .map(|o| format!("{o:?}")),
        "activate" => layout.activate(&v(arg)).map(|a| format!("{a:?}")),
        "rollback" => layout.rollback().map(|r| r.to_string()),
        "prune" => layout.prune(arg.parse().unwrap()).map(|r| format!("{r:?}")),
        other => panic!("unknown op {other}"),
    }
}

/// Runs `op` in a child process on `root`, crashing at `crash` when given.
fn child(root: &Path, op: &str, crash: Option<&str>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, root)
        .env(CHILD_OP, op)
        .env_remove(CHILD_LOCK_TIMEOUT_MS);
    match crash {
        Some(step) => cmd.env(CRASH_ENV, step),
        None => cmd.env_remove(CRASH_ENV),
    };
    cmd.output().unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `op` in a child that is killed at `step` and checks that it died there.
fn crash_at(root: &Path, op: &str, step: &str) {
    let out = child(root, op, Some(step));
    assert_eq!(
        out.status.signal(),
        Some(SIGABRT),
        "{op} was expected to die at {step}\n{}",
        show(&out)
    );
    let said = format!("{CRASH_ENV}={step}: aborting");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&said), "{}", show(&out));
}

fn points(prefixes: &[&str]) -> Vec<&'static str> {
    CRASH_POINTS
        .iter()
        .copied()
        .filter(|p| prefixes.iter().any(|prefix| p.starts_with(prefix)))
        .collect()
}

/// The invariant after any crash: `current` points at a complete, intact release holding exactly the bytes
/// of its version, and one of `allowed`; `previous`, if any, is complete and intact; every listed release is
/// complete except those in `may_be_incomplete`.
fn check_invariants(layout: &Layout, allowed: &[&Version], may_be_incomplete: &[&Version], context: &str) {
    let current = layout
        .current()
        .unwrap()
        .unwrap_or_else(|| panic!("{context}: no current"));
    assert!(
        allowed.contains(&&current),
        "{context}: current is {current}, expected one of {allowed:?}"
    );
    layout.verify(&current).unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(current_digest(layout), expected_digest(&current), "{context}");
    if let Some(previous) = layout.previous().unwrap() {
        layout
            .verify(&previous)
            .unwrap_or_else(|e| panic!("{context}: previous: {e}"));
    }
    for entry in layout.list().unwrap() {
        assert!(
            entry.complete || may_be_incomplete.contains(&&entry.version),
            "{context}: {} is listed incomplete",
            entry.version
        );
        if entry.complete {
            layout
                .verify(&entry.version)
                .unwrap_or_else(|e| panic!("{context}: {e}"));
        }
    }
}

/// A root with `versions` installed and activated in order (so the last is current, the one before previous).
fn setup(installed: &[&Version], activated: &[&Version]) -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open(dir.path().join("nkudo")).unwrap();
    for version in installed {
        layout.install(version, filler(version)).unwrap();
    }
    for version in activated {
        layout.activate(version).unwrap();
    }
    (dir, layout)
}

#[test]
fn every_crash_point_is_named_once() {
    let unique: BTreeSet<_> = CRASH_POINTS.iter().collect();
    assert_eq!(unique.len(), CRASH_POINTS.len());
    for p in CRASH_POINTS {
        assert!(
            ["lock:", "install:", "activate:", "rollback:", "prune:"]
                .iter()
                .any(|prefix| p.starts_with(prefix)),
            "{p}"
        );
    }
}

#[test]
fn a_child_without_a_crash_point_completes() {
    let (a, b) = (v("1.0.0"), v("1.1.0"));
    let (_dir, layout) = setup(&[&a], &[&a]);
    let out = child(layout.root(), "install 1.1.0", None);
    assert!(out.status.success(), "{}", show(&out));
    let out = child(layout.root(), "activate 1.1.0", None);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(layout.current().unwrap(), Some(b));
    check_invariants(&layout, &[&v("1.1.0")], &[], "no crash");
}

#[test]
fn install_survives_a_crash_at_every_step() {
    let (a, b, c) = (v("1.0.0"), v("1.1.0"), v("1.2.0-pre.3+abc1234"));
    let steps = points(&[
        "lock:",
        "install:tmp-",
        "install:filled",
        "install:synced",
        "install:marker-",
        "install:renamed",
        "install:done",
    ]);
    assert_eq!(steps.len(), 7);
    for step in steps {
        let (_dir, layout) = setup(&[&a, &b], &[&a, &b]);
        crash_at(layout.root(), "install 1.2.0-pre.3+abc1234", step);
        let context = format!("install, crashed at {step}");
        check_invariants(&layout, &[&b], &[], &context);
        assert_eq!(layout.previous().unwrap(), Some(a.clone()), "{context}");
        // The new release is there complete, or not at all.
        let there = layout.installed().unwrap().contains(&c);
        assert_eq!(there, matches!(step, "install:renamed" | "install:done"), "{context}");

        let outcome = layout.install(&c, filler(&c)).unwrap();
        let expected = if there {
            InstallOutcome::AlreadyInstalled
        } else {
            InstallOutcome::Installed
        };
        assert_eq!(outcome, expected, "{context}");
        assert!(leftovers(&layout).is_empty(), "{context}: {:?}", leftovers(&layout));
        assert_eq!(tree_digest(&layout.release_dir(&c)), expected_digest(&c), "{context}");
        layout.activate(&c).unwrap();
        check_invariants(&layout, &[&c], &[], &context);
    }
}

#[test]
fn install_over_a_half_written_release_survives_a_crash_at_every_step() {
    let (a, c) = (v("1.0.0"), v("1.1.0"));
    let steps = points(&["install:"]);
    assert_eq!(steps.len(), 8);
    for step in steps {
        let (_dir, layout) = setup(&[&a], &[&a]);
        let stale = layout.release_dir(&c);
        fs::create_dir_all(stale.join("bin")).unwrap();
        fs::write(stale.join("bin/nkudo-edge"), b"truncated").unwrap();
        crash_at(layout.root(), "install 1.1.0", step);
        let context = format!("install over a stale directory, crashed at {step}");
        check_invariants(&layout, &[&a], &[&c], &context);
        assert!(
            matches!(
                layout.activate(&c),
                Ok(_) | Err(LayoutError::Incomplete { .. } | LayoutError::NotInstalled { .. })
            ),
            "{context}"
        );
        check_invariants(&layout, &[&a, &c], &[&c], &context);
        layout.install(&c, filler(&c)).unwrap();
        assert!(leftovers(&layout).is_empty(), "{context}: {:?}", leftovers(&layout));
        layout.activate(&c).unwrap();
        check_invariants(&layout, &[&c], &[], &context);
    }
}

#[test]
fn a_crash_while_unpacking_leaves_nothing_that_can_be_activated() {
    let (a, c) = (v("1.0.0"), v("1.1.0"));
    let (_dir, layout) = setup(&[&a], &[&a]);
    let out = child(layout.root(), "install-dying-in-fill 1.1.0", None);
    assert_eq!(out.status.signal(), Some(SIGABRT), "{}", show(&out));
    assert_eq!(leftovers(&layout).len(), 1, "the half-unpacked temporary directory");
    check_invariants(&layout, &[&a], &[], "crash in fill");
    assert!(matches!(layout.activate(&c), Err(LayoutError::NotInstalled { .. })));
    assert_eq!(layout.install(&c, filler(&c)).unwrap(), InstallOutcome::Installed);
    assert!(leftovers(&layout).is_empty());
    assert_eq!(tree_digest(&layout.release_dir(&c)), expected_digest(&c));
}

#[test]
fn activate_survives_a_crash_at_every_step() {
    let (a, b, c) = (v("1.0.0"), v("1.1.0"), v("1.2.0"));
    let steps = points(&["lock:", "activate:"]);
    assert_eq!(steps.len(), 7);
    for step in steps {
        let (_dir, layout) = setup(&[&a, &b, &c], &[&a, &b]);
        crash_at(layout.root(), "activate 1.2.0", step);
        let context = format!("activate, crashed at {step}");
        check_invariants(&layout, &[&b, &c], &[], &context);
        let (current, previous) = (layout.current().unwrap().unwrap(), layout.previous().unwrap().unwrap());
        if current == c {
            assert_eq!(previous, b, "{context}");
        } else {
            assert!(previous == a || previous == b, "{context}: previous {previous}");
        }

        let act = layout.activate(&c).unwrap();
        assert_eq!(
            (act.current.clone(), act.previous.clone()),
            (c.clone(), Some(b.clone())),
            "{context}"
        );
        assert!(leftovers(&layout).is_empty(), "{context}: {:?}", leftovers(&layout));
        check_invariants(&layout, &[&c], &[], &context);
    }
}

#[test]
fn rollback_survives_a_crash_at_every_step_and_returns_the_exact_previous_bytes() {
    let (a, b) = (v("1.0.0"), v("1.1.0"));
    let steps = points(&["lock:", "rollback:"]);
    assert_eq!(steps.len(), 6);
    for step in steps {
        let (_dir, layout) = setup(&[&a, &b], &[&a]);
        let bytes_of_a = current_digest(&layout);
        layout.activate(&b).unwrap();
        assert_ne!(current_digest(&layout), bytes_of_a);

        crash_at(layout.root(), "rollback", step);
        let context = format!("rollback, crashed at {step}");
        check_invariants(&layout, &[&a, &b], &[], &context);

        // Rerun: completes the rollback, or finds it already complete (a rollback is not a toggle).
        match layout.rollback() {
            Ok(to) => assert_eq!(to, a, "{context}"),
            Err(LayoutError::NoPrevious { current, .. }) => {
                assert_eq!(step, "rollback:previous-removed", "{context}");
                assert_eq!(current, Some(a.clone()), "{context}");
            }
            Err(e) => panic!("{context}: {e}"),
        }
        assert_eq!(layout.current().unwrap(), Some(a.clone()), "{context}");
        assert_eq!(layout.previous().unwrap(), None, "{context}");
        assert_eq!(
            current_digest(&layout),
            bytes_of_a,
            "{context}: not the exact previous bytes"
        );
        assert!(leftovers(&layout).is_empty(), "{context}: {:?}", leftovers(&layout));
        check_invariants(&layout, &[&a], &[], &context);
    }
}

#[test]
fn a_rollback_after_an_interrupted_activation_stays_on_the_version_that_ran() {
    let (a, b, c) = (v("1.0.0"), v("1.1.0"), v("1.2.0"));
    let (_dir, layout) = setup(&[&a, &b, &c], &[&a, &b]);
    crash_at(layout.root(), "activate 1.2.0", "activate:previous-synced");
    assert_eq!(
        (layout.current().unwrap(), layout.previous().unwrap()),
        (Some(b.clone()), Some(b.clone()))
    );
    assert_eq!(layout.rollback().unwrap(), b);
    check_invariants(&layout, &[&b], &[], "rollback after an interrupted activation");
    assert_eq!(layout.previous().unwrap(), None);
}

#[test]
fn prune_survives_a_crash_at_every_step() {
    let versions: Vec<Version> = ["1.0.0", "1.1.0", "1.2.0-pre.1+abc1234", "1.2.0", "1.3.0"]
        .iter()
        .map(|s| v(s))
        .collect();
    let refs: Vec<&Version> = versions.iter().collect();
    let steps = points(&["lock:", "prune:"]);
    assert_eq!(steps.len(), 3);
    for step in steps {
        let (_dir, layout) = setup(&refs, &[&versions[0], &versions[1]]);
        crash_at(layout.root(), &format!("prune {DEFAULT_KEEP}"), step);
        let context = format!("prune, crashed at {step}");
        check_invariants(&layout, &[&versions[1]], &[], &context);
        assert_eq!(layout.previous().unwrap(), Some(versions[0].clone()), "{context}");

        layout.prune(DEFAULT_KEEP).unwrap();
        let left: Vec<Version> = layout.list().unwrap().into_iter().map(|e| e.version).collect();
        assert_eq!(
            left,
            vec![versions[0].clone(), versions[1].clone(), versions[4].clone()],
            "{context}"
        );
        assert!(leftovers(&layout).is_empty(), "{context}: {:?}", leftovers(&layout));
        check_invariants(&layout, &[&versions[1]], &[], &context);
    }
}

#[test]
fn every_crash_point_is_exercised() {
    // The scenarios above select their steps by prefix; together they must cover every point.
    let covered: BTreeSet<&str> = [
        points(&["lock:", "install:"]),
        points(&["activate:"]),
        points(&["rollback:"]),
        points(&["prune:"]),
    ]
    .concat()
    .into_iter()
    .collect();
    let all: BTreeSet<&str> = CRASH_POINTS.iter().copied().collect();
    assert_eq!(covered, all);
}

#[test]
fn the_lock_serialises_separate_processes() {
    let (a, b) = (v("1.0.0"), v("1.1.0"));
    let (_dir, layout) = setup(&[&a, &b], &[&a]);
    let guard = layout.lock().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    let out = cmd
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, layout.root())
        .env(CHILD_OP, "activate 1.1.0")
        .env(CHILD_LOCK_TIMEOUT_MS, "300")
        .env_remove(CRASH_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another process") && stderr.contains("wait for it to finish"),
        "{}",
        show(&out)
    );
    assert_eq!(layout.current().unwrap(), Some(a.clone()));

    // A waiting process proceeds once the holder is done.
    let mut waiting = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, layout.root())
        .env(CHILD_OP, "activate 1.1.0")
        .env(CHILD_LOCK_TIMEOUT_MS, "30000")
        .env_remove(CRASH_ENV)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the child did not wait for the lock"
    );
    assert_eq!(layout.current().unwrap(), Some(a));
    drop(guard);
    assert!(waiting.wait().unwrap().success());
    assert_eq!(layout.current().unwrap(), Some(b.clone()));

    // A holder that dies releases the lock: the kernel drops it with the process.
    crash_at(layout.root(), "rollback", "lock:acquired");
    let quick = Layout::open(layout.root())
        .unwrap()
        .with_lock_timeout(Duration::from_millis(100));
    quick.lock().unwrap();
    check_invariants(&layout, &[&b], &[], "after a holder died");
}
