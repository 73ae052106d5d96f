//! The host release layout without crashes: install, activate, rollback, list, prune, the lock and the errors.

mod common;

use common::*;
use nkudo_core::layout::{
    Activation, InstallOutcome, Layout, LayoutError, COMPLETE_MARKER, DEFAULT_KEEP, DEFAULT_ROOT,
};
use semver::Version;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn fresh() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open(dir.path().join("nkudo")).unwrap();
    (dir, layout)
}

fn install(layout: &Layout, s: &str) -> Version {
    let version = v(s);
    assert_eq!(
        layout.install(&version, filler(&version)).unwrap(),
        InstallOutcome::Installed
    );
    version
}

#[test]
fn open_creates_the_releases_directory() {
    assert_eq!(DEFAULT_ROOT, "/opt/nkudo");
    let (_dir, layout) = fresh();
    assert!(layout.root().join("releases").is_dir());
    assert_eq!(layout.current().unwrap(), None);
    assert_eq!(layout.previous().unwrap(), None);
    assert!(layout.list().unwrap().is_empty());
    // Opening again is harmless.
    Layout::open(layout.root()).unwrap();
}

#[test]
fn install_activate_list_and_rollback_to_the_exact_previous_bytes() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.2.0");
    let b = install(&layout, "1.3.0");
    assert_eq!(layout.release_dir(&a), layout.root().join("releases/1.2.0"));
    assert!(layout.release_dir(&a).join(COMPLETE_MARKER).is_file());
    assert_eq!(tree_digest(&layout.release_dir(&a)), expected_digest(&a));

    let act = layout.activate(&a).unwrap();
    assert_eq!(
        act,
        Activation {
            current: a.clone(),
            previous: None,
            changed: true
        }
    );
    assert_eq!(
        fs::read_link(layout.root().join("current")).unwrap(),
        Path::new("releases/1.2.0"),
        "a relative link, so the root can be moved or mounted elsewhere"
    );
    let bytes_of_a = current_digest(&layout);
    assert_eq!(bytes_of_a, expected_digest(&a));

    let act = layout.activate(&b).unwrap();
    assert_eq!(act.current, b);
    assert_eq!(act.previous, Some(a.clone()));
    assert_eq!(current_digest(&layout), expected_digest(&b));
    assert_ne!(current_digest(&layout), bytes_of_a);
    // Activating the current version changes nothing.
    let again = layout.activate(&b).unwrap();
    assert!(!again.changed);
    assert_eq!(again.previous, Some(a.clone()));

    let list = layout.list().unwrap();
    let shown: Vec<(String, bool, bool, bool)> = list
        .iter()
        .map(|e| (e.version.to_string(), e.current, e.previous, e.complete))
        .collect();
    assert_eq!(
        shown,
        [
            ("1.2.0".to_string(), false, true, true),
            ("1.3.0".to_string(), true, false, true)
        ]
    );

    assert_eq!(layout.rollback().unwrap(), a);
    assert_eq!(layout.current().unwrap(), Some(a.clone()));
    assert_eq!(
        current_digest(&layout),
        bytes_of_a,
        "rollback returns to the exact previous bytes"
    );
    // A rollback is not a toggle: a second one does not bring the bad version back.
    assert_eq!(layout.previous().unwrap(), None);
    let e = layout.rollback().unwrap_err();
    assert!(matches!(e, LayoutError::NoPrevious { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("current version is v1.2.0") && text.contains("releaser activate"),
        "{text}"
    );
    assert_eq!(layout.current().unwrap(), Some(a));
    assert!(leftovers(&layout).is_empty());
}

#[test]
fn activating_the_previous_version_swaps_the_two() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.0.0");
    let b = install(&layout, "1.1.0");
    layout.activate(&a).unwrap();
    layout.activate(&b).unwrap();
    let act = layout.activate(&a).unwrap();
    assert_eq!((act.current, act.previous), (a, Some(b)));
}

#[test]
fn installing_an_installed_version_is_a_no_op() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "2.0.0");
    let marker = layout.release_dir(&a).join(COMPLETE_MARKER);
    let before = (
        fs::read(&marker).unwrap(),
        fs::metadata(&marker).unwrap().modified().unwrap(),
    );
    let called = AtomicBool::new(false);
    let outcome = layout
        .install(&a, |_dir: &Path| -> io::Result<()> {
            called.store(true, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    assert_eq!(outcome, InstallOutcome::AlreadyInstalled);
    assert!(!called.load(Ordering::SeqCst), "the fill function is not called");
    let after = (
        fs::read(&marker).unwrap(),
        fs::metadata(&marker).unwrap().modified().unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(tree_digest(&layout.release_dir(&a)), expected_digest(&a));
    assert!(leftovers(&layout).is_empty());
}

#[test]
fn a_half_written_release_is_never_activated_and_is_replaced_by_install() {
    let (_dir, layout) = fresh();
    let good = install(&layout, "1.0.0");
    layout.activate(&good).unwrap();
    // What an interrupted copy by hand (or an older tool) leaves: files, no completion marker.
    let half = v("1.1.0");
    let dir = layout.release_dir(&half);
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/nkudo-edge"), b"#!/bin/sh\necho trunc").unwrap();

    let entry = layout.list().unwrap().into_iter().find(|e| e.version == half).unwrap();
    assert!(!entry.complete);
    assert_eq!(layout.installed().unwrap(), vec![good.clone()]);
    let e = layout.activate(&half).unwrap_err();
    assert!(matches!(e, LayoutError::Incomplete { .. }), "{e}");
    assert!(e.to_string().contains("releaser install"), "{e}");
    assert_eq!(layout.current().unwrap(), Some(good.clone()));

    // A marker for another version does not make it complete either.
    fs::write(
        dir.join(COMPLETE_MARKER),
        r#"{"format":1,"version":"1.0.0","entries":[]}"#,
    )
    .unwrap();
    assert!(matches!(layout.activate(&half), Err(LayoutError::Incomplete { .. })));
    // Nor does garbage.
    fs::write(dir.join(COMPLETE_MARKER), "complete").unwrap();
    assert!(matches!(layout.activate(&half), Err(LayoutError::Incomplete { .. })));

    assert_eq!(layout.install(&half, filler(&half)).unwrap(), InstallOutcome::Installed);
    assert_eq!(tree_digest(&dir), expected_digest(&half));
    layout.activate(&half).unwrap();
    assert_eq!(current_digest(&layout), expected_digest(&half));
    assert!(leftovers(&layout).is_empty());
}

#[test]
fn a_damaged_release_is_refused_and_reinstalled() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.0.0");
    let b = install(&layout, "1.1.0");
    layout.activate(&a).unwrap();
    layout.verify(&b).unwrap();
    fs::write(layout.release_dir(&b).join("VERSION"), "1.1.1\n").unwrap();
    let e = layout.activate(&b).unwrap_err();
    assert!(matches!(e, LayoutError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("VERSION"), "{e}");
    assert_eq!(layout.current().unwrap(), Some(a.clone()));

    // Mode changes and a retargeted link are damage too.
    let c = install(&layout, "1.2.0");
    fs::set_permissions(
        layout.release_dir(&c).join("bin/nkudo-edge"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    assert!(matches!(layout.verify(&c), Err(LayoutError::Corrupt { .. })));
    let d = install(&layout, "1.3.0");
    fs::remove_file(layout.release_dir(&d).join("bin/edge")).unwrap();
    std::os::unix::fs::symlink("/bin/sh", layout.release_dir(&d).join("bin/edge")).unwrap();
    assert!(matches!(layout.verify(&d), Err(LayoutError::Corrupt { .. })));

    // Installing again replaces the damaged copy.
    for version in [&b, &c, &d] {
        assert_eq!(
            layout.install(version, filler(version)).unwrap(),
            InstallOutcome::Installed
        );
        layout.verify(version).unwrap();
    }
    layout.activate(&b).unwrap();
    assert_eq!(current_digest(&layout), expected_digest(&b));
}

#[test]
fn unknown_version_names_what_is_installed() {
    let (_dir, layout) = fresh();
    install(&layout, "1.0.0");
    install(&layout, "1.1.0-pre.3+abc1234");
    let e = layout.activate(&v("9.9.9")).unwrap_err();
    match &e {
        LayoutError::NotInstalled { version, installed, .. } => {
            assert_eq!(version, &v("9.9.9"));
            assert_eq!(installed, &vec![v("1.0.0"), v("1.1.0-pre.3+abc1234")]);
        }
        other => panic!("{other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("v9.9.9 is not installed")
            && text.contains("installed: v1.0.0, v1.1.0-pre.3+abc1234")
            && text.contains("releaser install"),
        "{text}"
    );
    assert!(matches!(layout.rollback(), Err(LayoutError::NoPrevious { .. })));
    assert!(matches!(
        layout.verify(&v("9.9.9")),
        Err(LayoutError::NotInstalled { .. })
    ));
}

#[test]
fn list_is_in_semver_order_with_pre_releases_before_their_release() {
    let (_dir, layout) = fresh();
    for s in [
        "1.3.0",
        "1.3.0-pre.10+aaaaaaa",
        "1.2.0",
        "1.3.0-pre.9+bbbbbbb",
        "0.0.0-pre.3+ccccccc",
        "1.10.0",
    ] {
        install(&layout, s);
    }
    // Not versions: ignored.
    fs::create_dir(layout.root().join("releases/notes")).unwrap();
    fs::create_dir(layout.root().join("releases/v1.0.0")).unwrap();
    let order: Vec<String> = layout.list().unwrap().iter().map(|e| e.version.to_string()).collect();
    assert_eq!(
        order,
        [
            "0.0.0-pre.3+ccccccc",
            "1.2.0",
            "1.3.0-pre.9+bbbbbbb",
            "1.3.0-pre.10+aaaaaaa",
            "1.3.0",
            "1.10.0"
        ]
    );
}

#[test]
fn prune_never_removes_current_or_previous_and_keeps_the_newest_others() {
    let (_dir, layout) = fresh();
    let all: Vec<Version> = ["1.0.0", "1.1.0", "1.2.0-pre.1+abc1234", "1.2.0", "1.3.0", "1.4.0"]
        .iter()
        .map(|s| install(&layout, s))
        .collect();
    // Current and previous are the two oldest: a prune by age alone would remove them.
    layout.activate(&all[0]).unwrap();
    layout.activate(&all[1]).unwrap();
    // A half-written directory is garbage.
    fs::create_dir(layout.root().join("releases/0.9.0")).unwrap();

    let removed = layout.prune(DEFAULT_KEEP).unwrap();
    assert_eq!(
        removed,
        vec![v("0.9.0"), all[2].clone(), all[3].clone(), all[4].clone()]
    );
    let left: Vec<Version> = layout.list().unwrap().into_iter().map(|e| e.version).collect();
    assert_eq!(left, vec![all[0].clone(), all[1].clone(), all[5].clone()]);
    assert_eq!(layout.current().unwrap(), Some(all[1].clone()));
    assert_eq!(layout.previous().unwrap(), Some(all[0].clone()));
    layout.verify(&all[0]).unwrap();
    layout.verify(&all[1]).unwrap();

    // keep = 0 still keeps current and previous.
    assert_eq!(layout.prune(0).unwrap(), vec![all[5].clone()]);
    let left: Vec<Version> = layout.list().unwrap().into_iter().map(|e| e.version).collect();
    assert_eq!(left, vec![all[0].clone(), all[1].clone()]);
    assert!(layout.prune(0).unwrap().is_empty());
    assert!(leftovers(&layout).is_empty());
}

#[test]
fn prune_keeps_current_and_the_two_before_it_after_a_series_of_upgrades() {
    let (_dir, layout) = fresh();
    for s in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
        let version = install(&layout, s);
        layout.activate(&version).unwrap();
        layout.prune(DEFAULT_KEEP).unwrap();
    }
    let left: Vec<String> = layout.list().unwrap().iter().map(|e| e.version.to_string()).collect();
    assert_eq!(left, ["1.1.0", "1.2.0", "1.3.0"]);
}

#[test]
fn fill_errors_leave_nothing_behind() {
    let (_dir, layout) = fresh();
    let a = v("1.0.0");
    let e = layout
        .install(&a, |dir: &Path| -> Result<(), String> {
            fs::write(dir.join("partial"), b"x").unwrap();
            Err("bad archive: unexpected end of file".to_string())
        })
        .unwrap_err();
    assert!(matches!(e, LayoutError::Fill { .. }), "{e}");
    assert!(e.to_string().contains("unexpected end of file"), "{e}");
    assert!(!layout.release_dir(&a).exists());
    assert!(leftovers(&layout).is_empty());

    // A full disk while unpacking says what to do.
    let e = layout
        .install(&a, |_dir: &Path| -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::StorageFull))
        })
        .unwrap_err();
    assert!(matches!(e, LayoutError::NoSpace { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("free space under") && text.contains("releaser prune"),
        "{text}"
    );
    assert!(leftovers(&layout).is_empty());

    // The marker's name is reserved; devices and the like are refused.
    let e = layout
        .install(&a, |dir: &Path| fs::write(dir.join(COMPLETE_MARKER), "forged"))
        .unwrap_err();
    assert!(matches!(e, LayoutError::Unsupported { .. }), "{e}");
    assert!(!layout.release_dir(&a).exists());
    let e = layout
        .install(&a, |dir: &Path| {
            std::os::unix::net::UnixListener::bind(dir.join("sock")).map(|_| ())
        })
        .unwrap_err();
    assert!(matches!(e, LayoutError::Unsupported { .. }), "{e}");
    assert!(leftovers(&layout).is_empty());
    assert!(layout.list().unwrap().is_empty());
}

#[test]
fn leftovers_of_a_crash_are_removed_by_the_next_mutating_call() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.0.0");
    layout.activate(&a).unwrap();
    let releases = layout.root().join("releases");
    fs::create_dir_all(releases.join(".tmp-1.1.0-0123456789abcdef/bin")).unwrap();
    fs::write(releases.join(".tmp-1.1.0-0123456789abcdef/bin/x"), b"half").unwrap();
    fs::create_dir_all(releases.join(".tmp-pruned-0.9.0-0123456789abcdef")).unwrap();
    std::os::unix::fs::symlink("releases/1.0.0", layout.root().join(".current.tmp-0123456789abcdef")).unwrap();
    assert_eq!(leftovers(&layout).len(), 3);
    // Reads do not touch them.
    layout.list().unwrap();
    assert_eq!(leftovers(&layout).len(), 3);
    drop(layout.lock().unwrap());
    assert!(leftovers(&layout).is_empty(), "{:?}", leftovers(&layout));
    assert_eq!(layout.current().unwrap(), Some(a));
}

#[test]
fn concurrent_installs_and_activations_are_serialised() {
    let (_dir, layout) = fresh();
    let threads = 6;
    let inside = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            // Each thread opens its own Layout, as separate invocations would.
            let layout = Layout::open(layout.root()).unwrap();
            let (inside, overlaps, barrier) = (inside.clone(), overlaps.clone(), barrier.clone());
            std::thread::spawn(move || {
                let version = v(&format!("1.{i}.0"));
                barrier.wait();
                let outcome = layout
                    .install(&version, |dir: &Path| {
                        if inside.swap(true, Ordering::SeqCst) {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        let r = write_release(&version, dir);
                        inside.store(false, Ordering::SeqCst);
                        r
                    })
                    .unwrap();
                assert_eq!(outcome, InstallOutcome::Installed);
                // Everyone also installs a shared version: exactly one unpacks it.
                let shared = v("2.0.0");
                let outcome = layout.install(&shared, filler(&shared)).unwrap();
                layout.activate(&version).unwrap();
                layout.activate(&shared).unwrap();
                outcome
            })
        })
        .collect();
    let outcomes: Vec<InstallOutcome> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two installs ran at once");
    assert_eq!(
        outcomes.iter().filter(|o| **o == InstallOutcome::Installed).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(layout.installed().unwrap().len(), threads + 1);
    assert_eq!(layout.current().unwrap(), Some(v("2.0.0")));
    layout.verify(&layout.previous().unwrap().unwrap()).unwrap();
    for e in layout.list().unwrap() {
        assert!(e.complete);
        assert_eq!(tree_digest(&e.path), expected_digest(&e.version));
    }
    assert!(leftovers(&layout).is_empty());
}

#[test]
fn a_held_lock_makes_others_wait_then_time_out_with_a_clear_error() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.0.0");
    let other = Layout::open(layout.root())
        .unwrap()
        .with_lock_timeout(Duration::from_millis(300));
    let guard = layout.lock().unwrap();
    let start = Instant::now();
    let e = other.activate(&a).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(matches!(e, LayoutError::LockTimeout { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("wait for it to finish and retry") && text.contains(".lock"),
        "{text}"
    );
    assert_eq!(layout.current().unwrap(), None);

    // Several operations under one guard, while the other waits its turn.
    let waiter = {
        let other = other.clone().with_lock_timeout(Duration::from_secs(30));
        std::thread::spawn(move || other.rollback())
    };
    let b = v("1.1.0");
    guard.install(&b, filler(&b)).unwrap();
    guard.activate(&a).unwrap();
    guard.activate(&b).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(layout.current().unwrap(), Some(b.clone()), "the waiter has not run yet");
    drop(guard);
    assert_eq!(waiter.join().unwrap().unwrap(), a);
    assert_eq!(layout.current().unwrap(), Some(a));
}

#[test]
fn current_in_the_way_is_reported_or_replaced() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.0.0");
    // A directory where the link should be (a hand-made install): refused with what to do.
    fs::create_dir(layout.root().join("current")).unwrap();
    let e = layout.activate(&a).unwrap_err();
    assert!(matches!(e, LayoutError::BadLink { .. }), "{e}");
    assert!(e.to_string().contains("remove it"), "{e}");
    assert!(
        matches!(layout.prune(0), Err(LayoutError::BadLink { .. })),
        "prune stops rather than guess"
    );
    fs::remove_dir(layout.root().join("current")).unwrap();
    // A link pointing elsewhere is replaced (and not recorded as previous).
    std::os::unix::fs::symlink("/usr/local/nkudo-old", layout.root().join("current")).unwrap();
    assert!(matches!(layout.current(), Err(LayoutError::BadLink { .. })));
    let act = layout.activate(&a).unwrap();
    assert_eq!((act.current, act.previous), (a.clone(), None));
    // An absolute link into this root's releases is understood.
    let abs = layout.root().join("releases/1.0.0");
    fs::remove_file(layout.root().join("current")).unwrap();
    std::os::unix::fs::symlink(&abs, layout.root().join("current")).unwrap();
    assert_eq!(layout.current().unwrap(), Some(a));
}

#[test]
fn release_of_finds_the_version_a_binary_was_installed_as() {
    let (_dir, layout) = fresh();
    let a = install(&layout, "1.3.0");
    layout.activate(&a).unwrap();
    let exe = fs::canonicalize(layout.root().join("current/bin/nkudo-edge")).unwrap();
    assert_eq!(layout.release_of(&exe), Some(a.clone()));
    assert_eq!(
        layout.release_of(&layout.release_dir(&a).join("bin/nkudo-edge")),
        Some(a)
    );
    assert_eq!(layout.release_of(Path::new("/usr/bin/nkudo-edge")), None);
    assert_eq!(
        layout.release_of(&layout.root().join("releases/.tmp-1.0.0-x/bin/e")),
        None
    );
}

#[test]
fn a_root_that_cannot_be_written_says_what_to_do() {
    // sysfs refuses new directories even to root.
    if Path::new("/sys/kernel").is_dir() {
        let e = Layout::open("/sys/nkudo-layout-test").unwrap_err();
        assert!(matches!(e, LayoutError::NotWritable { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("not writable") && text.contains("--root"), "{text}");
    }
    // Permission bits, when not running as root.
    let (_dir, layout) = fresh();
    let root = layout.root();
    fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let probe = fs::write(root.join("probe"), b"");
    if probe.is_err() {
        let e = layout.install(&v("1.0.0"), filler(&v("1.0.0"))).unwrap_err();
        assert!(matches!(e, LayoutError::NotWritable { .. }), "{e}");
    }
    fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}
