//! The Cloud Hypervisor provider against `mock-cloud-hypervisor` over real unix sockets: the real provider code,
//! real detached processes, real disk and seed images (qemu-img, genisoimage), TAPs in a private network namespace.

mod common;

use common::*;
use nkudo_core::api::{MicroVmCreateParams, MicroVmReport};
use nkudo_edge::provider::{self, CloudHypervisor, ProviderConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &str = "s3cr3t-password-in-user-data";

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    runtime: PathBuf,
    images: PathBuf,
    kernel: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let runtime = root.join("vms");
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let kernel = images.join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    Env {
        _tmp: tmp,
        root,
        runtime,
        images,
        kernel,
    }
}

impl Env {
    fn config(&self, ch: &Path) -> ProviderConfig {
        ProviderConfig {
            runtime_dir: self.runtime.clone(),
            images_dir: self.images.clone(),
            cloud_hypervisor_bin: ch.to_path_buf(),
            qemu_img_bin: "qemu-img".into(),
            default_bridge: None,
            stop_timeout: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(10),
        }
    }

    fn provider(&self) -> CloudHypervisor {
        CloudHypervisor::new(self.config(&mock_bin("mock-cloud-hypervisor")))
    }

    /// A provider whose VMM is the mock with these fault variables.
    fn provider_with(&self, faults: &[(&str, &str)], tweak: impl FnOnce(&mut ProviderConfig)) -> CloudHypervisor {
        let name = format!("ch-{}", faults.len() + self.root.read_dir().unwrap().count());
        let w = wrapper(&self.root, &name, &mock_bin("mock-cloud-hypervisor"), faults);
        let mut cfg = self.config(&w);
        tweak(&mut cfg);
        CloudHypervisor::new(cfg)
    }

    fn vmdir(&self, id: &str) -> PathBuf {
        self.runtime.join(id)
    }

    fn socket(&self, id: &str) -> PathBuf {
        self.vmdir(id).join("api.sock")
    }

    /// The last vm.create body the mock received.
    fn vmconfig(&self, id: &str) -> Value {
        let p = self.vmdir(id).join("api.sock.vmconfig.json");
        serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
    }

    /// The requests the mock received, as "METHOD endpoint".
    fn requests(&self, id: &str) -> Vec<String> {
        std::fs::read_to_string(self.vmdir(id).join("api.sock.requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn count(&self, id: &str, req: &str) -> usize {
        self.requests(id).iter().filter(|r| *r == req).count()
    }

    fn params(&self, id: &str) -> MicroVmCreateParams {
        MicroVmCreateParams {
            vm_id: id.into(),
            name: format!("web {id}"),
            vcpu: 2,
            memory_mib: 256,
            kernel_path: Some(self.kernel.to_string_lossy().into()),
            cmdline: Some("console=ttyS0 root=/dev/vda1 rw".into()),
            cloud_init_user_data: Some(format!("#cloud-config\nchpasswd:\n  list: |\n    root:{SECRET}\n")),
            ..Default::default()
        }
    }
}

async fn report(p: &CloudHypervisor, id: &str) -> Option<MicroVmReport> {
    p.list().await.into_iter().find(|r| r.id == id)
}

async fn state(p: &CloudHypervisor, id: &str) -> Option<String> {
    report(p, id).await.and_then(|r| r.state)
}

async fn pid_of(p: &CloudHypervisor, id: &str) -> i64 {
    report(p, id)
        .await
        .and_then(|r| r.ch_pid)
        .expect("a running VM reports its VMM pid")
}

fn qemu_img_info(path: &Path) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn make_qcow2(path: &Path, size: &str) {
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .status()
        .expect("qemu-img is installed");
    assert!(st.success());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn lifecycle_with_qcow2_overlay_seed_and_idempotency() {
    let e = env();
    let p = e.provider();
    let id = "00000000-0000-4000-8000-000000000001";
    // A qcow2 base named .img: the format comes from the content.
    make_qcow2(&e.images.join("base.img"), "64M");
    let params = MicroVmCreateParams {
        rootfs_path: Some("base.img".into()),
        ..e.params(id)
    };

    p.create(&params).await.expect("create");
    let dir = e.vmdir(id);
    let disk = dir.join("disk.qcow2");
    let info = qemu_img_info(&disk);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(
        info["backing-filename"],
        e.images.join("base.img").to_string_lossy().as_ref()
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert!(!dir.join("disk.raw").exists());

    // The NoCloud seed: ISO 9660 volume `cidata` with the user data; 0600; no staging files left.
    let seed = dir.join("seed.iso");
    let iso = std::fs::read(&seed).unwrap();
    assert_eq!(&iso[32769..32774], b"CD001", "ISO 9660 primary volume descriptor");
    assert_eq!(
        String::from_utf8_lossy(&iso[32808..32840]).trim().to_lowercase(),
        "cidata"
    );
    assert!(contains(&iso, SECRET.as_bytes()), "user-data is in the seed");
    assert!(
        contains(&iso, format!("instance-id: \"{id}\"").as_bytes()),
        "meta-data is in the seed"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!dir.join(".seed").exists());
    // The secret is nowhere else on disk.
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        if f.path() != seed && f.path().is_file() {
            assert!(
                !contains(&std::fs::read(f.path()).unwrap(), SECRET.as_bytes()),
                "{}",
                f.path().display()
            );
        }
    }

    // Idempotent create; a different create for the same id is refused.
    p.create(&params).await.expect("identical create is ok");
    let err = p
        .create(&MicroVmCreateParams {
            memory_mib: 512,
            ..params.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, provider::VM_ALREADY_EXISTS, "{err}");

    let r = report(&p, id).await.unwrap();
    assert_eq!(r.state.as_deref(), Some("STOPPED"));
    assert_eq!((r.vcpu_count, r.memory_mib, r.ch_pid), (Some(2), Some(256), None));
    assert_eq!(r.name, format!("web {id}"));
    assert!(!e.socket(id).exists(), "create starts no VMM");

    p.start(id).await.expect("start");
    let r = report(&p, id).await.unwrap();
    assert_eq!(r.state.as_deref(), Some("RUNNING"));
    let pid = r.ch_pid.unwrap();
    assert!(alive(pid));
    assert!(cmdline(pid).contains(&e.socket(id).to_string_lossy().to_string()));
    assert_ne!(
        session_of(pid),
        Some(own_session()),
        "the VMM runs in its own session, detached from the agent"
    );
    assert_eq!(r.kernel_path.as_deref(), Some(e.kernel.to_string_lossy().as_ref()));

    // What the VMM was told.
    let c = e.vmconfig(id);
    assert_eq!(
        c["payload"]["kernel"],
        e.kernel.to_string_lossy().as_ref(),
        "the kernel path is used"
    );
    assert_eq!(c["payload"]["cmdline"], "console=ttyS0 root=/dev/vda1 rw");
    assert!(c["payload"].get("firmware").is_none());
    assert_eq!(c["cpus"]["boot_vcpus"], 2);
    assert_eq!(c["cpus"]["max_vcpus"], 2);
    assert_eq!(c["memory"]["size"], 256u64 * 1024 * 1024);
    assert_eq!(c["disks"][0]["path"], disk.to_string_lossy().as_ref());
    assert_eq!(c["disks"][0]["image_type"], "Qcow2");
    assert_eq!(c["disks"][0]["backing_files"], true);
    assert_eq!(c["disks"][0]["readonly"], false);
    assert_eq!(c["disks"][1]["path"], seed.to_string_lossy().as_ref());
    assert_eq!(c["disks"][1]["readonly"], true);
    assert_eq!(c["serial"]["mode"], "File");
    assert_eq!(c["serial"]["file"], dir.join("serial.log").to_string_lossy().as_ref());
    assert_eq!(c["console"]["mode"], "Off");
    assert!(c.get("net").is_none(), "no bridge and no tap: no network");
    assert!(!String::from_utf8_lossy(&std::fs::read(dir.join("api.sock.vmconfig.json")).unwrap()).contains(SECRET));
    assert_eq!(
        std::fs::read_to_string(dir.join("serial.log")).unwrap(),
        "mock guest: booted\n"
    );

    // Idempotent start: same VMM, no second boot.
    p.start(id).await.expect("start again");
    assert_eq!(pid_of(&p, id).await, pid);
    assert_eq!(e.count(id, "PUT vm.boot"), 1);
    assert_eq!(e.count(id, "PUT vm.create"), 1);

    // Stop: ACPI power button, the guest powers off, the VMM is gone.
    p.stop(id).await.expect("stop");
    assert!(!alive(pid));
    assert_eq!(e.count(id, "PUT vm.power-button"), 1);
    let r = report(&p, id).await.unwrap();
    assert_eq!((r.state.as_deref(), r.ch_pid), (Some("STOPPED"), None));
    assert!(!e.socket(id).exists());
    p.stop(id).await.expect("stop again");

    // Start after stop: a new VMM.
    p.start(id).await.expect("restart");
    let pid2 = pid_of(&p, id).await;
    assert_ne!(pid2, pid);
    assert_eq!(state(&p, id).await.as_deref(), Some("RUNNING"));

    p.delete(id).await.expect("delete");
    assert!(!dir.exists());
    assert!(!alive(pid2));
    assert!(report(&p, id).await.is_none());
    assert!(e.images.join("base.img").exists(), "the base image stays");
    p.delete(id).await.expect("delete again");
    assert_eq!(p.start(id).await.unwrap_err().code, provider::VM_NOT_FOUND);
    assert_eq!(p.stop(id).await.unwrap_err().code, provider::VM_NOT_FOUND);
}

#[tokio::test]
async fn raw_base_is_copied_empty_disk_is_sparse_and_diskless_vms_work() {
    let e = env();
    let p = e.provider();
    // A raw image named .qcow2: copied, not overlaid.
    let pattern: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(e.images.join("raw.qcow2"), &pattern).unwrap();
    let a = MicroVmCreateParams {
        rootfs_path: Some(e.images.join("raw.qcow2").to_string_lossy().into()),
        disk_size_mib: Some(4),
        cmdline: None,
        ..e.params("vm-raw")
    };
    p.create(&a).await.unwrap();
    let disk = e.vmdir("vm-raw").join("disk.raw");
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(bytes.len(), 4 * 1024 * 1024, "grown to disk_size_mib");
    assert_eq!(&bytes[..pattern.len()], &pattern[..]);
    assert!(!e.vmdir("vm-raw").join("disk.qcow2").exists());
    p.start("vm-raw").await.unwrap();
    let c = e.vmconfig("vm-raw");
    assert_eq!(c["disks"][0]["image_type"], "Raw");
    assert!(c["disks"][0].get("backing_files").is_none());
    assert_eq!(
        c["payload"]["cmdline"], "console=ttyS0 root=/dev/vda rw",
        "default cmdline with a disk"
    );

    // No base image, a size: an empty sparse disk.
    let b = MicroVmCreateParams {
        disk_size_mib: Some(64),
        ..e.params("vm-empty")
    };
    p.create(&b).await.unwrap();
    let m = std::fs::metadata(e.vmdir("vm-empty").join("disk.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(m.len(), 64 * 1024 * 1024);
    assert!(m.blocks() * 512 < 1024 * 1024, "sparse: {} blocks", m.blocks());

    // Neither: only the seed disk.
    p.create(&e.params("vm-nodisk")).await.unwrap();
    p.start("vm-nodisk").await.unwrap();
    let c = e.vmconfig("vm-nodisk");
    let disks = c["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1);
    assert!(disks[0]["path"].as_str().unwrap().ends_with("seed.iso"));

    // A missing base image.
    let err = p
        .create(&MicroVmCreateParams {
            rootfs_path: Some("nope.img".into()),
            ..e.params("vm-nobase")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, provider::DISK_PREPARE_FAILED, "{err}");
    assert!(err.message.contains("nope.img"), "{err}");
    assert!(!e.vmdir("vm-nobase").exists(), "a failed create leaves nothing behind");

    let ids: Vec<String> = p.list().await.into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["vm-empty", "vm-nodisk", "vm-raw"]);
    for id in ids {
        p.delete(&id).await.unwrap();
    }
    assert!(p.list().await.is_empty());
}

#[tokio::test]
async fn boot_failure_is_boot_failed_with_the_vmm_message_and_no_vmm_left() {
    let e = env();
    let p = e.provider_with(&[("MOCK_CH_FAIL_BOOT", "1")], |_| {});
    p.create(&e.params("vm-1")).await.unwrap();
    let err = p.start("vm-1").await.unwrap_err();
    assert_eq!(err.code, provider::BOOT_FAILED, "{err}");
    assert!(err.message.contains("The VM could not boot"), "{err}");
    assert!(err.message.contains("mock: injected boot failure"), "{err}");
    let sock = e.socket("vm-1").to_string_lossy().to_string();
    assert!(
        eventually(Duration::from_secs(3), || processes_mentioning(&sock).is_empty()).await,
        "VMM shut down"
    );
    assert!(e.requests("vm-1").contains(&"PUT vmm.shutdown".to_string()));
    assert_eq!(state(&p, "vm-1").await.as_deref(), Some("ERROR"));
    let reason = provider::recorded_reason(p.config(), "vm-1").unwrap();
    assert!(reason.contains("injected boot failure"), "{reason}");

    // A missing kernel: CH's own message.
    let p = e.provider();
    p.create(&e.params("vm-2")).await.unwrap();
    std::fs::remove_file(&e.kernel).unwrap();
    let err = p.start("vm-2").await.unwrap_err();
    assert_eq!(err.code, provider::BOOT_FAILED, "{err}");
    assert!(err.message.contains("Cannot load kernel"), "{err}");
    let sock = e.socket("vm-2").to_string_lossy().to_string();
    assert!(eventually(Duration::from_secs(3), || processes_mentioning(&sock).is_empty()).await);
    // Fix the cause, and the same VM boots.
    std::fs::write(&e.kernel, b"kernel").unwrap();
    p.start("vm-2").await.expect("boots once the kernel is there");
    assert_eq!(state(&p, "vm-2").await.as_deref(), Some("RUNNING"));
    p.delete("vm-1").await.unwrap();
    p.delete("vm-2").await.unwrap();
}

#[tokio::test]
async fn vmm_crash_is_error_and_guest_poweroff_is_stopped() {
    let e = env();
    let crashing = e.provider_with(&[("MOCK_CH_CRASH_AFTER_BOOT_MS", "300")], |_| {});
    crashing.create(&e.params("vm-crash")).await.unwrap();
    crashing.start("vm-crash").await.unwrap();
    let pid = pid_of(&crashing, "vm-crash").await;
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)).await,
        "the mock crashes"
    );
    let r = crashing
        .reconcile()
        .await
        .into_iter()
        .find(|r| r.id == "vm-crash")
        .unwrap();
    assert_eq!(r.state.as_deref(), Some("ERROR"), "a crashed VMM is not RUNNING");
    assert_eq!(r.ch_pid, None);
    let reason = provider::recorded_reason(crashing.config(), "vm-crash").unwrap();
    assert!(
        reason.contains("status 1") && reason.contains("fatal vCPU error"),
        "{reason}"
    );
    assert!(!e.socket("vm-crash").exists(), "the stale socket is cleared");

    let powering_off = e.provider_with(&[("MOCK_CH_GUEST_POWEROFF_AFTER_MS", "200")], |_| {});
    powering_off.create(&e.params("vm-off")).await.unwrap();
    powering_off.start("vm-off").await.unwrap();
    let pid = pid_of(&powering_off, "vm-off").await;
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)).await,
        "the guest powers off, the VMM exits 0"
    );
    assert_eq!(state(&powering_off, "vm-off").await.as_deref(), Some("STOPPED"));
    let reason = provider::recorded_reason(powering_off.config(), "vm-off").unwrap();
    assert!(reason.contains("powered off"), "{reason}");

    // Both start again.
    let p = e.provider();
    p.start("vm-crash").await.unwrap();
    p.start("vm-off").await.unwrap();
    assert_eq!(state(&p, "vm-crash").await.as_deref(), Some("RUNNING"));
    assert_eq!(state(&p, "vm-off").await.as_deref(), Some("RUNNING"));
    p.delete("vm-crash").await.unwrap();
    p.delete("vm-off").await.unwrap();
}

#[tokio::test]
async fn a_new_agent_rediscovers_running_vms_and_recovers_from_a_killed_vmm() {
    let e = env();
    let id = "vm-survivor";
    let pid = {
        let first = e.provider();
        first.create(&e.params(id)).await.unwrap();
        first.create(&e.params("vm-idle")).await.unwrap();
        first.start(id).await.unwrap();
        pid_of(&first, id).await
        // the first agent goes away here
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid), "the VMM outlives the agent");

    let second = e.provider();
    let vms = second.reconcile().await;
    assert_eq!(vms.len(), 2);
    let r = vms.iter().find(|r| r.id == id).unwrap();
    assert_eq!((r.state.as_deref(), r.ch_pid), (Some("RUNNING"), Some(pid)));
    assert_eq!(
        vms.iter().find(|r| r.id == "vm-idle").unwrap().state.as_deref(),
        Some("STOPPED")
    );
    second.start(id).await.unwrap();
    assert_eq!(
        e.count(id, "PUT vm.boot"),
        1,
        "a rediscovered running VM is not booted again"
    );

    // SIGKILL (e.g. the OOM killer): a stale socket stays; reconcile says ERROR; start works over the stale socket.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    assert!(eventually(Duration::from_secs(3), || !alive(pid)).await);
    let third = e.provider();
    let r = third.reconcile().await.into_iter().find(|r| r.id == id).unwrap();
    assert_eq!(r.state.as_deref(), Some("ERROR"));
    let reason = provider::recorded_reason(third.config(), id).unwrap();
    assert!(reason.contains("signal 9"), "{reason}");
    std::os::unix::net::UnixListener::bind(e.socket(id)).map(drop).ok(); // leave a stale socket file behind
    assert!(e.socket(id).exists());
    third.start(id).await.expect("start over a stale socket");
    assert_ne!(pid_of(&third, id).await, pid);
    third.stop(id).await.unwrap();
    third.delete(id).await.unwrap();
    third.delete("vm-idle").await.unwrap();
}

#[tokio::test]
async fn stop_escalates_to_signals_when_guest_and_vmm_do_not_cooperate() {
    let e = env();
    let p = e.provider_with(
        &[
            ("MOCK_CH_POWER_BUTTON", "ignore"),
            ("MOCK_CH_HANG_VMM_SHUTDOWN", "1"),
            ("MOCK_CH_IGNORE_SIGTERM", "1"),
        ],
        |c| c.stop_timeout = Duration::from_millis(300),
    );
    p.create(&e.params("vm-1")).await.unwrap();
    p.start("vm-1").await.unwrap();
    let pid = pid_of(&p, "vm-1").await;
    let t = Instant::now();
    p.stop("vm-1").await.expect("stop");
    assert!(!alive(pid), "SIGKILL ended it");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let reqs = e.requests("vm-1");
    let pos = |r: &str| {
        reqs.iter()
            .position(|x| x == r)
            .unwrap_or_else(|| panic!("{r} not in {reqs:?}"))
    };
    assert!(pos("PUT vm.power-button") < pos("PUT vm.shutdown"));
    assert!(pos("PUT vm.shutdown") < pos("PUT vmm.shutdown"));
    assert_eq!(state(&p, "vm-1").await.as_deref(), Some("STOPPED"));
    p.delete("vm-1").await.unwrap();
}

#[tokio::test]
async fn slow_or_failing_vmm_gives_timeout_and_vmm_start_failed() {
    let e = env();
    let slow = e.provider_with(&[("MOCK_CH_DELAY_MS", "2500")], |c| {
        c.boot_timeout = Duration::from_secs(1)
    });
    slow.create(&e.params("vm-slow")).await.unwrap();
    let t = Instant::now();
    let err = slow.start("vm-slow").await.unwrap_err();
    assert_eq!(err.code, provider::TIMEOUT, "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let sock = e.socket("vm-slow").to_string_lossy().to_string();
    assert!(
        eventually(Duration::from_secs(10), || processes_mentioning(&sock).is_empty()).await,
        "no VMM is left behind after a timeout"
    );

    let failing = e.provider_with(&[("MOCK_CH_EXIT_AT_START", "3")], |_| {});
    failing.create(&e.params("vm-fail")).await.unwrap();
    let err = failing.start("vm-fail").await.unwrap_err();
    assert_eq!(err.code, provider::VMM_START_FAILED, "{err}");
    assert!(
        err.message.contains("status 3") && err.message.contains("injected start failure"),
        "{err}"
    );

    let missing = CloudHypervisor::new(e.config(&e.root.join("no-such-cloud-hypervisor")));
    let err = missing.start("vm-fail").await.unwrap_err();
    assert_eq!(err.code, provider::VMM_START_FAILED, "{err}");
    assert_eq!(missing.binary_version(), None);
    assert_eq!(e.provider().binary_version().as_deref(), Some("v54.0.0-mock"));
    for id in ["vm-slow", "vm-fail"] {
        e.provider().delete(id).await.unwrap();
    }
}

#[tokio::test]
async fn concurrent_operations_on_one_vm_are_serialised() {
    let e = env();
    let p = Arc::new(e.provider());
    let params = e.params("vm-1");
    let (a, b) = tokio::join!(p.create(&params), p.create(&params));
    a.unwrap();
    b.unwrap();
    let (a, b, c) = tokio::join!(p.start("vm-1"), p.start("vm-1"), p.list());
    a.unwrap();
    b.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(e.count("vm-1", "PUT vm.boot"), 1);
    assert_eq!(
        processes_mentioning(&e.socket("vm-1").to_string_lossy()).len(),
        2,
        "one VMM (and its supervisor)"
    );
    let (a, b) = tokio::join!(p.delete("vm-1"), p.stop("vm-1"));
    a.unwrap();
    // The stop ran before or after the delete: ok, or the VM is gone.
    if let Err(err) = b {
        assert_eq!(err.code, provider::VM_NOT_FOUND);
    }
    assert!(!e.vmdir("vm-1").exists());
}

#[tokio::test]
async fn invalid_params_create_nothing_and_interrupted_creates_are_redone() {
    let e = env();
    let p = e.provider();
    for bad in [
        MicroVmCreateParams {
            vm_id: "../escape".into(),
            ..e.params("x")
        },
        MicroVmCreateParams {
            kernel_path: None,
            ..e.params("vm-bad")
        },
        MicroVmCreateParams {
            vcpu: -2,
            ..e.params("vm-bad")
        },
        MicroVmCreateParams {
            tap_iface: Some("a-very-long-tap-name".into()),
            ..e.params("vm-bad")
        },
    ] {
        let err = p.create(&bad).await.unwrap_err();
        assert_eq!(err.code, provider::INVALID_PARAMS, "{err}");
    }
    assert!(!e.runtime.exists() || std::fs::read_dir(&e.runtime).unwrap().count() == 0);
    assert_eq!(p.start("../etc").await.unwrap_err().code, provider::INVALID_PARAMS);

    // An agent killed in the middle of a create leaves `phase: creating`.
    let dir = e.vmdir("vm-half");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vm.json"),
        r#"{"vm_id":"vm-half","vcpu":1,"memory_mib":512,"params_digest":"x","phase":"creating",
            "state":"CREATING","created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("disk.raw.tmp"), b"partial").unwrap();
    let r = p.reconcile().await.into_iter().find(|r| r.id == "vm-half").unwrap();
    assert_eq!(
        r.state.as_deref(),
        Some("ERROR"),
        "an interrupted create is not left CREATING"
    );
    assert!(provider::recorded_reason(p.config(), "vm-half")
        .unwrap()
        .contains("did not complete"));
    assert_eq!(p.start("vm-half").await.unwrap_err().code, provider::INVALID_STATE);
    p.create(&e.params("vm-half")).await.expect("the create is redone");
    assert!(!dir.join("disk.raw.tmp").exists());
    assert_eq!(state(&p, "vm-half").await.as_deref(), Some("STOPPED"));
    p.delete("vm-half").await.unwrap();
}

/// A network namespace of our own, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Option<NetNs> {
        let name = format!("nkt-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success());
        if !matches!(ok, Ok(true)) {
            return None;
        }
        let ns = NetNs(name);
        ns.ip(&["link", "add", "br-nk", "type", "bridge"]).then_some(())?;
        ns.ip(&["link", "set", "br-nk", "up"]).then_some(())?;
        Some(ns)
    }

    fn ip(&self, args: &[&str]) -> bool {
        std::process::Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn link(&self, dev: &str) -> Option<String> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.0, "-o", "link", "show", "dev", dev])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn taps_on_a_bridge_inside_a_private_network_namespace() {
    let Some(ns) = NetNs::new() else {
        eprintln!("SKIPPED: cannot create a network namespace here (needs root and CAP_NET_ADMIN)");
        return;
    };
    let e = env();
    let p = e
        .provider()
        .with_ip_command(vec!["ip".into(), "-n".into(), ns.0.clone().into()]);
    // Two UUIDs with a common prefix: distinct TAPs (the reference's bug 33).
    let ids = [
        "00000000-0000-4000-8000-00000000000a",
        "00000000-0000-4000-8000-00000000000b",
    ];
    for id in ids {
        p.create(&MicroVmCreateParams {
            bridge: Some("br-nk".into()),
            ..e.params(id)
        })
        .await
        .unwrap();
    }
    let taps: Vec<String> = ids.iter().map(|id| provider::tap_name_for(id)).collect();
    assert_ne!(taps[0], taps[1]);
    for tap in &taps {
        assert!(tap.len() <= 15);
        let link = ns.link(tap).unwrap_or_else(|| panic!("{tap} exists"));
        assert!(link.contains("master br-nk"), "{link}");
        assert!(link.contains("<") && link.contains("UP"), "{link}");
    }
    p.start(ids[0]).await.unwrap();
    let c = e.vmconfig(ids[0]);
    assert_eq!(c["net"][0]["tap"], taps[0].as_str());
    assert_eq!(c["net"][0]["mac"], provider::mac_for(ids[0]).as_str());

    // A TAP removed behind our back (host reboot) is made again at start.
    assert!(ns.ip(&["link", "del", "dev", &taps[1]]));
    p.start(ids[1]).await.unwrap();
    assert!(ns.link(&taps[1]).unwrap().contains("master br-nk"));

    for id in ids {
        p.delete(id).await.unwrap();
    }
    for tap in &taps {
        assert!(ns.link(tap).is_none(), "{tap} removed with its VM");
    }

    // An explicit TAP name without a bridge; a missing bridge fails cleanly.
    p.create(&MicroVmCreateParams {
        tap_iface: Some("tapx1".into()),
        ..e.params("vm-tap")
    })
    .await
    .unwrap();
    assert!(!ns.link("tapx1").unwrap().contains("master"));
    p.delete("vm-tap").await.unwrap();
    assert!(ns.link("tapx1").is_none(), "the provider made it, so it removes it");
    let err = p
        .create(&MicroVmCreateParams {
            bridge: Some("br-missing".into()),
            ..e.params("vm-nobr")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, provider::NETWORK_SETUP_FAILED, "{err}");
    assert!(err.message.contains("br-missing"), "{err}");
    assert!(!e.vmdir("vm-nobr").exists());
    assert!(ns.link(&provider::tap_name_for("vm-nobr")).is_none());
}
