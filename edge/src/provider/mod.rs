//! The Cloud Hypervisor provider: microVMs on this host, one `cloud-hypervisor` process (VMM) per running VM.
//!
//! # Layout
//! Every VM lives in `<runtime_dir>/<vm_id>/` (mode 0700):
//!
//! | file | what |
//! |---|---|
//! | `vm.json` | the VM's metadata (written atomically); what survives agent restarts |
//! | `disk.qcow2` / `disk.raw` | the VM's own disk: a qcow2 overlay on a qcow2 base, a copy of a raw base, or empty |
//! | `seed.iso` | cloud-init NoCloud seed (label `cidata`, `user-data` + `meta-data`), mode 0600 |
//! | `api.sock` | the VMM's REST API socket (CH also leaves `api.sock.lock`) |
//! | `serial.log` | the guest's serial console (CH truncates it on every boot) |
//! | `vmm.stdout.log`, `vmm.stderr.log` | the VMM's output |
//! | `vmm.exit` | the VMM's exit status, written by its supervisor when it ends |
//!
//! # Life cycle
//! * `create` prepares the directory, disk, seed image and TAP, and records the VM as `STOPPED`. No process runs.
//! * `start` launches `cloud-hypervisor --api-socket <vmdir>/api.sock` detached from the agent (own session,
//!   output to files; see [`process`]), then `PUT vm.create` (payload kernel/initramfs/cmdline or firmware, cpus,
//!   memory in bytes, disks, net, serial `File`, console `Off`), `PUT vm.boot`, and polls `GET vm.info` until
//!   the VM is `Running`. A failed boot shuts the VMM down and answers `BOOT_FAILED` with CH's error chain.
//! * `stop` presses the ACPI power button (`vm.power-button`) and waits up to `stop_timeout` for the guest;
//!   then `vm.shutdown`, `vmm.shutdown`, SIGTERM and SIGKILL, each only while the VMM is still there. The VMM
//!   is started without `--no-shutdown`, so a stopped VM has no process at all.
//! * `delete` stops, removes the TAP the provider made, and removes the directory.
//!
//! Every operation is idempotent, and operations on one VM are serialised (a per-VM lock); different VMs run
//! concurrently. `list` and `reconcile` look at the live VMM (socket + pid) rather than trusting `vm.json`: a VMM
//! that exited after a guest power-off (status 0) makes the VM `STOPPED`, a VMM that died (non-zero status,
//! signal) makes it `ERROR` with the reason recorded in `vm.json`.
//!
//! Secrets: cloud-init user data goes only into `seed.iso` (0600); it is never logged nor kept in `vm.json`
//! (which holds a SHA-256 digest of the create parameters, to recognise an identical repeated create).

mod api;
mod disk;
mod net;
mod process;

pub use disk::{detect_format, DiskFormat};
pub use net::{mac_for, tap_name_for};

use api::{ApiError, ChApi};
use nkudo_core::api::{MicroVmCreateParams, MicroVmReport};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------------------------
// Error codes (ProviderError::code). The executor reports them as the execution's error code.

/// A parameter is missing, malformed or out of range (the message names it).
pub const INVALID_PARAMS: &str = "INVALID_PARAMS";
/// No VM with this id exists on this host.
pub const VM_NOT_FOUND: &str = "VM_NOT_FOUND";
/// `create` for an id that exists with different parameters (an identical repeated create succeeds).
pub const VM_ALREADY_EXISTS: &str = "VM_ALREADY_EXISTS";
/// The VM cannot do this now (e.g. `start` on a VM whose `create` did not complete: repeat the create).
pub const INVALID_STATE: &str = "INVALID_STATE";
/// The VM's disk could not be made (base image missing or unreadable, `qemu-img` failed, copy failed).
pub const DISK_PREPARE_FAILED: &str = "DISK_PREPARE_FAILED";
/// The cloud-init seed image could not be made (no ISO tool, or it failed).
pub const SEED_IMAGE_FAILED: &str = "SEED_IMAGE_FAILED";
/// The bridge is missing, or the TAP could not be created, attached or brought up.
pub const NETWORK_SETUP_FAILED: &str = "NETWORK_SETUP_FAILED";
/// The `cloud-hypervisor` process could not be started, or exited before its API answered.
pub const VMM_START_FAILED: &str = "VMM_START_FAILED";
/// The VMM's REST API refused a call (other than `vm.boot`); the message carries CH's error chain.
pub const CH_API_ERROR: &str = "CH_API_ERROR";
/// `vm.boot` failed (e.g. the kernel file is missing); the message carries CH's error chain. The VMM is shut down.
pub const BOOT_FAILED: &str = "BOOT_FAILED";
/// The VMM process died during the operation (the message has its exit status and last stderr line).
pub const VMM_CRASHED: &str = "VMM_CRASHED";
/// The VMM did not answer, or the VM did not reach the wanted state, within the time limit.
pub const TIMEOUT: &str = "TIMEOUT";
/// The VMM process survived SIGKILL (should not happen).
pub const STOP_FAILED: &str = "STOP_FAILED";
/// A file operation in the runtime directory failed.
pub const IO_ERROR: &str = "IO_ERROR";

/// Every code above, for documentation and tests.
pub const ERROR_CODES: &[&str] = &[
    INVALID_PARAMS,
    VM_NOT_FOUND,
    VM_ALREADY_EXISTS,
    INVALID_STATE,
    DISK_PREPARE_FAILED,
    SEED_IMAGE_FAILED,
    NETWORK_SETUP_FAILED,
    VMM_START_FAILED,
    CH_API_ERROR,
    BOOT_FAILED,
    VMM_CRASHED,
    TIMEOUT,
    STOP_FAILED,
    IO_ERROR,
];

/// VM states as reported in [`MicroVmReport::state`].
pub const STATE_CREATING: &str = "CREATING";
pub const STATE_STOPPED: &str = "STOPPED";
pub const STATE_RUNNING: &str = "RUNNING";
pub const STATE_PAUSED: &str = "PAUSED";
pub const STATE_ERROR: &str = "ERROR";

/// Defaults for a VM created without `vcpu` / `memory_mib` (Cloud Hypervisor's own defaults).
pub const DEFAULT_VCPU: i64 = 1;
pub const DEFAULT_MEMORY_MIB: i64 = 512;
/// The kernel command line when a kernel is given without one.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
const MAX_USER_DATA: usize = 1024 * 1024;

const PING_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// `<runtime_dir>/<vm_id>/` per VM (default `/var/lib/nkudo-edge/vms`).
    pub runtime_dir: PathBuf,
    /// Relative kernel, initramfs, firmware and base image paths are taken from here
    /// (default `/var/lib/nkudo-edge/images`).
    pub images_dir: PathBuf,
    pub cloud_hypervisor_bin: PathBuf,
    pub qemu_img_bin: PathBuf,
    /// The bridge a VM's TAP joins when its create parameters name none. `None`: only VMs that name a bridge or
    /// a TAP get a network.
    pub default_bridge: Option<String>,
    /// How long `stop` waits for the guest to power off after the ACPI power button.
    pub stop_timeout: Duration,
    /// How long `start` may take from launching the VMM to the VM running.
    pub boot_timeout: Duration,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            runtime_dir: PathBuf::from("/var/lib/nkudo-edge/vms"),
            images_dir: PathBuf::from("/var/lib/nkudo-edge/images"),
            cloud_hypervisor_bin: PathBuf::from("cloud-hypervisor"),
            qemu_img_bin: PathBuf::from("qemu-img"),
            default_bridge: None,
            stop_timeout: Duration::from_secs(15),
            boot_timeout: Duration::from_secs(30),
        }
    }
}

/// A failed provider operation: a stable code (one of [`ERROR_CODES`]) and a human message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    pub code: &'static str,
    pub message: String,
}

impl ProviderError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ProviderError {
            code,
            message: message.into(),
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::new(IO_ERROR, format!("{what} {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------------------------
// Per-VM metadata (`vm.json`)

const PHASE_CREATING: &str = "creating";
const PHASE_READY: &str = "ready";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct VmMeta {
    vm_id: String,
    #[serde(default)]
    name: String,
    vcpu: i64,
    memory_mib: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initramfs_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    firmware_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk_size_mib: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disk_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    /// The TAP is the provider's (derived name, or created by it): delete removes it.
    #[serde(default)]
    tap_owned: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
    /// SHA-256 of the create parameters (they may hold secrets, so only the digest is kept).
    params_digest: String,
    phase: String,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<i64>,
    /// Id of the current VMM launch, echoed by its supervisor in `vmm.exit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    launch: Option<String>,
    created_at: String,
    updated_at: String,
}

/// RFC 3339 UTC timestamp with seconds, e.g. `2026-01-02T03:04:05Z`.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The files of one VM.
#[derive(Debug, Clone)]
struct VmFiles {
    dir: PathBuf,
    meta: PathBuf,
    socket: PathBuf,
    serial: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: PathBuf,
    /// The launch whose exit status counts (`VmMeta::launch`).
    launch: Option<String>,
}

impl VmFiles {
    fn new(dir: PathBuf) -> Self {
        VmFiles {
            meta: dir.join("vm.json"),
            socket: dir.join("api.sock"),
            serial: dir.join("serial.log"),
            stdout: dir.join("vmm.stdout.log"),
            stderr: dir.join("vmm.stderr.log"),
            exit: dir.join("vmm.exit"),
            launch: None,
            dir,
        }
    }

    fn load(&self) -> Result<Option<VmMeta>, String> {
        match std::fs::read(&self.meta) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is unreadable: {e}", self.meta.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.meta.display())),
        }
    }

    fn save(&self, meta: &mut VmMeta) -> Result<(), ProviderError> {
        meta.updated_at = now_rfc3339();
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| ProviderError::new(IO_ERROR, e.to_string()))?;
        nkudo_core::fsutil::write_atomic(&self.meta, &bytes, 0o600).map_err(|e| io_err("write", &self.meta, e))
    }

    fn process_files(&self) -> process::VmmFiles {
        process::VmmFiles {
            socket: self.socket.clone(),
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            exit_file: self.exit.clone(),
        }
    }

    /// The exit status of the current launch's VMM, recorded by its supervisor, if it ended.
    fn exit_status(&self) -> Option<i32> {
        let text = std::fs::read_to_string(&self.exit).ok()?;
        let mut it = text.split_whitespace();
        let (launch, status) = (it.next()?, it.next()?);
        if self.launch.as_deref().is_some_and(|l| l != launch) {
            return None;
        }
        status.parse().ok()
    }

    /// The last non-empty line of the VMM's stderr (at most 300 characters).
    fn stderr_tail(&self) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.stderr).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| l.chars().take(300).collect())
    }

    /// "exited with status 1: <stderr>" / "killed by signal 9" / "exited normally".
    fn describe_exit(&self, status: i32) -> String {
        let what = match status {
            0 => "VMM exited with status 0".to_string(),
            s if s > 128 && s < 160 => format!("VMM was killed by signal {}", s - 128),
            s => format!("VMM exited with status {s}"),
        };
        match self.stderr_tail() {
            Some(t) if status != 0 => format!("{what}: {t}"),
            _ => what,
        }
    }

    fn remove_stale_socket(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut lock = self.socket.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(PathBuf::from(lock));
    }
}

/// A VMM process found for a VM.
#[derive(Debug, Clone, Copy)]
struct Vmm {
    pid: i64,
    /// Its API answered `vmm.ping`.
    api_ok: bool,
}

// ---------------------------------------------------------------------------------------------------------------
// Validation

/// A VM id usable as a directory name: 1..=128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn valid_vm_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn invalid(msg: impl Into<String>) -> ProviderError {
    ProviderError::new(INVALID_PARAMS, msg)
}

fn check_id(vm_id: &str) -> Result<(), ProviderError> {
    if valid_vm_id(vm_id) {
        Ok(())
    } else {
        Err(invalid(format!(
            "vm_id {vm_id:?} is not valid: 1 to 128 characters of letters, digits, '.', '_', '-', not starting with '.'"
        )))
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------------------------
// The provider

/// Drives Cloud Hypervisor microVMs under `runtime_dir`. `Send + Sync`; share it behind an `Arc`.
pub struct CloudHypervisor {
    cfg: ProviderConfig,
    ip_cmd: Vec<OsString>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl CloudHypervisor {
    pub fn new(cfg: ProviderConfig) -> Self {
        CloudHypervisor {
            cfg,
            ip_cmd: process::default_ip_command(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Runs every `ip` call as `<argv...> <ip arguments>` instead of `ip <ip arguments>`; e.g.
    /// `["ip", "-n", "testns"]` manages TAPs inside a network namespace (used by tests).
    pub fn with_ip_command(mut self, argv: Vec<OsString>) -> Self {
        if !argv.is_empty() {
            self.ip_cmd = argv;
        }
        self
    }

    pub fn config(&self) -> &ProviderConfig {
        &self.cfg
    }

    /// `cloud-hypervisor --version` without the program name, e.g. `v54.0.0`; `None` when it does not run.
    pub fn binary_version(&self) -> Option<String> {
        let line = process::run_version(&self.cfg.cloud_hypervisor_bin, &["--version"], Duration::from_secs(5))?;
        let v = line.strip_prefix("cloud-hypervisor").map(str::trim).unwrap_or(&line);
        Some(v.to_string())
    }

    fn files(&self, vm_id: &str) -> VmFiles {
        VmFiles::new(self.cfg.runtime_dir.join(vm_id))
    }

    fn lock_for(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(vm_id.to_string()).or_default().clone()
    }

    /// Resolves a host path parameter: absolute as is, relative under `images_dir` (no `..`).
    fn host_path(&self, field: &str, value: &str) -> Result<String, ProviderError> {
        if value.contains('\0') {
            return Err(invalid(format!("{field} contains a NUL byte")));
        }
        let p = Path::new(value);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(invalid(format!("{field} {value:?} must not contain '..'")));
        }
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.cfg.images_dir.join(p)
        };
        full.to_str()
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("{field} is not valid UTF-8")))
    }

    /// Checks the create parameters and turns them into the VM's metadata (phase `creating`).
    fn validate(&self, p: &MicroVmCreateParams) -> Result<VmMeta, ProviderError> {
        check_id(&p.vm_id)?;
        if p.name.len() > 256 {
            return Err(invalid("name is longer than 256 characters"));
        }
        let vcpu = match p.vcpu {
            0 => DEFAULT_VCPU,
            v if (1..=254).contains(&v) => v,
            v => return Err(invalid(format!("vcpu {v} is out of range 1..=254"))),
        };
        let memory_mib = match p.memory_mib {
            0 => DEFAULT_MEMORY_MIB,
            m if (1..=4 * 1024 * 1024).contains(&m) => m,
            m => return Err(invalid(format!("memory_mib {m} is out of range 1..=4194304"))),
        };
        let kernel = non_empty(&p.kernel_path)
            .map(|k| self.host_path("kernel_path", k))
            .transpose()?;
        let firmware = non_empty(&p.firmware_path)
            .map(|f| self.host_path("firmware_path", f))
            .transpose()?;
        let initramfs = non_empty(&p.initramfs_path)
            .map(|i| self.host_path("initramfs_path", i))
            .transpose()?;
        let mut cmdline = non_empty(&p.cmdline).map(str::to_string);
        match (&kernel, &firmware) {
            (None, None) => {
                return Err(invalid(
                    "kernel_path or firmware_path is required: the VM has nothing to boot",
                ));
            }
            (Some(_), Some(_)) => return Err(invalid("give kernel_path or firmware_path, not both")),
            (None, Some(_)) if initramfs.is_some() || cmdline.is_some() => {
                return Err(invalid(
                    "initramfs_path and cmdline need kernel_path (direct kernel boot)",
                ));
            }
            _ => {}
        }
        if let Some(c) = &cmdline {
            if c.len() > 4096 || c.contains('\0') {
                return Err(invalid("cmdline is longer than 4096 bytes or contains NUL"));
            }
        }
        let base_image = non_empty(&p.rootfs_path)
            .map(|r| self.host_path("rootfs_path", r))
            .transpose()?;
        let disk_size_mib = match p.disk_size_mib {
            None | Some(0) => None,
            Some(s) if (1..=16 * 1024 * 1024).contains(&s) => Some(s),
            Some(s) => return Err(invalid(format!("disk_size_mib {s} is out of range 1..=16777216"))),
        };
        if kernel.is_some() && cmdline.is_none() {
            let has_disk = base_image.is_some() || disk_size_mib.is_some();
            cmdline = Some(if has_disk {
                format!("{DEFAULT_CMDLINE} root=/dev/vda rw")
            } else {
                DEFAULT_CMDLINE.to_string()
            });
        }
        if let Some(u) = &p.cloud_init_user_data {
            if u.len() > MAX_USER_DATA {
                return Err(invalid("cloud_init_user_data is larger than 1 MiB"));
            }
        }
        let bridge = non_empty(&p.bridge)
            .map(str::to_string)
            .or_else(|| self.cfg.default_bridge.clone());
        if let Some(b) = &bridge {
            if !net::valid_ifname(b) {
                return Err(invalid(format!(
                    "bridge {b:?} is not a valid interface name (at most 15 characters)"
                )));
            }
        }
        let tap_given = non_empty(&p.tap_iface).map(str::to_string);
        if let Some(t) = &tap_given {
            if !net::valid_ifname(t) {
                return Err(invalid(format!(
                    "tap_iface {t:?} is not a valid interface name (at most 15 characters)"
                )));
            }
        }
        let (tap, tap_owned) = match (tap_given, &bridge) {
            (Some(t), _) => (Some(t), false),
            (None, Some(_)) => (Some(net::tap_name_for(&p.vm_id)), true),
            (None, None) => (None, false),
        };
        let mac = match non_empty(&p.mac) {
            Some(m) => Some(net::normalize_mac(m).ok_or_else(|| invalid(format!("mac {m:?} is not a unicast MAC")))?),
            None => tap.as_ref().map(|_| net::mac_for(&p.vm_id)),
        };
        let digest = net::sha256_hex(&serde_json::to_vec(p).unwrap_or_default());
        let now = now_rfc3339();
        Ok(VmMeta {
            vm_id: p.vm_id.clone(),
            name: if p.name.is_empty() {
                p.vm_id.clone()
            } else {
                p.name.clone()
            },
            vcpu,
            memory_mib,
            kernel_path: kernel,
            initramfs_path: initramfs,
            cmdline,
            firmware_path: firmware,
            base_image,
            disk_size_mib,
            disk_path: None,
            disk_format: None,
            seed_path: None,
            tap,
            tap_owned,
            bridge,
            mac,
            params_digest: digest,
            phase: PHASE_CREATING.into(),
            state: STATE_CREATING.into(),
            reason: None,
            pid: None,
            launch: None,
            created_at: now.clone(),
            updated_at: now,
        })
    }

    // -----------------------------------------------------------------------------------------------------------
    // create

    /// Prepares the VM (directory, disk, seed image, TAP); it is then `STOPPED`. Repeating an identical create is
    /// `Ok`; a create with other parameters for an existing id is `VM_ALREADY_EXISTS`. A create interrupted
    /// earlier (agent killed) is cleaned up and done again.
    pub async fn create(&self, p: &MicroVmCreateParams) -> Result<(), ProviderError> {
        let mut meta = self.validate(p)?;
        let lock = self.lock_for(&meta.vm_id);
        let _guard = lock.lock().await;
        let files = self.files(&meta.vm_id);
        match files.load() {
            Ok(Some(existing)) if existing.phase == PHASE_READY => {
                return if existing.params_digest == meta.params_digest {
                    Ok(())
                } else {
                    Err(ProviderError::new(
                        VM_ALREADY_EXISTS,
                        format!("VM {} exists with other parameters; delete it first", meta.vm_id),
                    ))
                };
            }
            Ok(Some(partial)) => self.discard(&files, Some(&partial)).await?,
            Ok(None) | Err(_) if files.dir.exists() => self.discard(&files, None).await?,
            _ => {}
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cfg.runtime_dir)
            .map_err(|e| io_err("create", &self.cfg.runtime_dir, e))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&files.dir)
            .map_err(|e| io_err("create", &files.dir, e))?;
        files.save(&mut meta)?;
        match self.build(&files, &mut meta, p).await {
            Ok(()) => {
                meta.phase = PHASE_READY.into();
                meta.state = STATE_STOPPED.into();
                files.save(&mut meta)
            }
            Err(e) => {
                let _ = self.discard(&files, Some(&meta)).await;
                Err(e)
            }
        }
    }

    async fn build(&self, files: &VmFiles, meta: &mut VmMeta, p: &MicroVmCreateParams) -> Result<(), ProviderError> {
        let base = meta.base_image.as_ref().map(PathBuf::from);
        if let Some((path, format)) =
            disk::prepare_disk(&self.cfg.qemu_img_bin, &files.dir, base.as_deref(), meta.disk_size_mib).await?
        {
            meta.disk_path = Some(path.to_string_lossy().into_owned());
            meta.disk_format = Some(format.as_str().into());
        }
        let hostname = disk::hostname_from(&meta.name, &meta.vm_id);
        let seed = disk::build_seed(
            &files.dir,
            &disk::meta_data(&meta.vm_id, &hostname),
            &disk::user_data(p.cloud_init_user_data.as_deref(), &hostname),
        )
        .await?;
        meta.seed_path = Some(seed.to_string_lossy().into_owned());
        files.save(meta)?;
        self.ensure_network(files, meta).await
    }

    /// Creates the TAP when missing, attaches it to the bridge and brings it up.
    async fn ensure_network(&self, files: &VmFiles, meta: &mut VmMeta) -> Result<(), ProviderError> {
        let Some(tap) = meta.tap.clone() else { return Ok(()) };
        let created = net::ensure_tap(&self.ip_cmd, &tap, meta.bridge.as_deref()).await?;
        if created && !meta.tap_owned {
            meta.tap_owned = true;
            files.save(meta)?;
        }
        Ok(())
    }

    /// Removes whatever a VM directory holds: stops a VMM serving it, removes an owned TAP, removes the directory.
    async fn discard(&self, files: &VmFiles, meta: Option<&VmMeta>) -> Result<(), ProviderError> {
        if let Some(vmm) = self.find_vmm(files, meta.and_then(|m| m.pid)).await {
            self.terminate(files, vmm).await?;
        }
        if let Some(m) = meta {
            if let (Some(tap), true) = (&m.tap, m.tap_owned) {
                net::remove_tap(&self.ip_cmd, tap).await?;
            }
        }
        // The VMM's supervisor may still be writing its exit status into the directory: retry a little.
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir_all(&files.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) if attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(io_err("remove", &files.dir, e)),
            }
        }
    }

    fn require_meta(&self, files: &VmFiles, vm_id: &str) -> Result<VmMeta, ProviderError> {
        match files.load() {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(ProviderError::new(VM_NOT_FOUND, format!("no VM {vm_id} on this host"))),
            Err(e) => Err(ProviderError::new(IO_ERROR, e)),
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // finding and ending the VMM

    /// The VMM serving this VM: whoever answers `vmm.ping` on its socket, else the recorded pid if that process
    /// is still a VMM on this socket (alive but not answering).
    async fn find_vmm(&self, files: &VmFiles, recorded_pid: Option<i64>) -> Option<Vmm> {
        let api = ChApi::new(&files.socket);
        match api.ping(PING_TIMEOUT).await {
            Ok(pid) if pid > 0 => Some(Vmm { pid, api_ok: true }),
            Ok(_) => Some(Vmm {
                pid: recorded_pid.unwrap_or(0),
                api_ok: true,
            }),
            Err(_) => recorded_pid
                .filter(|pid| process::is_our_vmm(*pid, &files.socket))
                .map(|pid| Vmm { pid, api_ok: false }),
        }
    }

    /// Ends the VMM process: `vmm.shutdown`, then SIGTERM, then SIGKILL, each only while it is still there.
    async fn terminate(&self, files: &VmFiles, vmm: Vmm) -> Result<(), ProviderError> {
        let api = &ChApi::new(&files.socket);
        let gone = |t: Duration| async move {
            if vmm.pid > 0 {
                process::wait_gone(vmm.pid, &files.socket, t).await
            } else {
                // Unknown pid: the socket is what we can watch.
                let deadline = Instant::now() + t;
                while Instant::now() < deadline {
                    if api.ping(Duration::from_millis(300)).await.is_err() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        };
        if vmm.api_ok {
            let _ = api.put("vmm.shutdown", None, Duration::from_secs(3)).await;
            if gone(Duration::from_secs(3)).await {
                files.remove_stale_socket();
                return Ok(());
            }
        }
        if vmm.pid > 0 {
            for (sig, wait) in [
                (libc::SIGTERM, Duration::from_secs(3)),
                (libc::SIGKILL, Duration::from_secs(5)),
            ] {
                process::signal_vmm(vmm.pid, &files.socket, sig);
                if gone(wait).await {
                    files.remove_stale_socket();
                    return Ok(());
                }
            }
        }
        Err(ProviderError::new(
            STOP_FAILED,
            format!(
                "the VMM (pid {}) of {} did not end, even after SIGKILL",
                vmm.pid,
                files.dir.display()
            ),
        ))
    }

    // -----------------------------------------------------------------------------------------------------------
    // start

    /// Boots the VM. `Ok` when it is running already; a paused VM is resumed.
    pub async fn start(&self, vm_id: &str) -> Result<(), ProviderError> {
        check_id(vm_id)?;
        let lock = self.lock_for(vm_id);
        let _guard = lock.lock().await;
        let mut files = self.files(vm_id);
        let mut meta = self.require_meta(&files, vm_id)?;
        files.launch = meta.launch.clone();
        if meta.phase != PHASE_READY {
            return Err(ProviderError::new(
                INVALID_STATE,
                format!("VM {vm_id} was not created completely; repeat the create"),
            ));
        }
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let api = ChApi::new(&files.socket);
        if let Some(vmm) = self.find_vmm(&files, meta.pid).await {
            if !vmm.api_ok {
                return Err(ProviderError::new(
                    TIMEOUT,
                    format!(
                        "the VMM of {vm_id} (pid {}) is alive but its API does not answer",
                        vmm.pid
                    ),
                ));
            }
            meta.pid = Some(vmm.pid).filter(|p| *p > 0).or(meta.pid);
            let state = api.vm_state(CALL_TIMEOUT).await.map_err(|e| api_error("vm.info", e))?;
            match state.as_deref() {
                Some("Running") => return self.record(&files, &mut meta, STATE_RUNNING, None),
                Some("Paused") => {
                    api.put("vm.resume", None, CALL_TIMEOUT)
                        .await
                        .map_err(|e| api_error("vm.resume", e))?;
                    return self.record(&files, &mut meta, STATE_RUNNING, None);
                }
                Some(_) => return self.boot(&files, &mut meta, vmm, deadline, false).await,
                None => return self.boot(&files, &mut meta, vmm, deadline, true).await,
            }
        }
        self.ensure_network(&files, &mut meta).await?;
        files.remove_stale_socket();
        let _ = std::fs::remove_file(&files.exit);
        let launch = format!(
            "{:x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        meta.launch = Some(launch.clone());
        files.launch = Some(launch.clone());
        files.save(&mut meta)?;
        let supervisor = process::spawn_detached(&self.cfg.cloud_hypervisor_bin, &files.process_files(), &launch)
            .map_err(|e| {
                ProviderError::new(
                    VMM_START_FAILED,
                    format!("cannot start {}: {e}", self.cfg.cloud_hypervisor_bin.display()),
                )
            })?;
        let vmm = match self.wait_for_api(&files, supervisor, deadline).await {
            Ok(vmm) => vmm,
            Err(e) => {
                let _ = self.record(&files, &mut meta, STATE_ERROR, Some(e.message.clone()));
                return Err(e);
            }
        };
        meta.pid = Some(vmm.pid).filter(|p| *p > 0);
        files.save(&mut meta)?;
        self.boot(&files, &mut meta, vmm, deadline, true).await
    }

    /// Waits until the freshly started VMM answers `vmm.ping`; fails early when it exits.
    async fn wait_for_api(&self, files: &VmFiles, supervisor: u32, deadline: Instant) -> Result<Vmm, ProviderError> {
        let api = ChApi::new(&files.socket);
        loop {
            if files.socket.exists() {
                let left = deadline.saturating_duration_since(Instant::now()).min(PING_TIMEOUT);
                if let Ok(pid) = api.ping(left.max(Duration::from_millis(50))).await {
                    let pid = if pid > 0 {
                        pid
                    } else {
                        child_of(supervisor).unwrap_or(0)
                    };
                    return Ok(Vmm { pid, api_ok: true });
                }
            }
            if let Some(status) = files.exit_status() {
                return Err(ProviderError::new(
                    VMM_START_FAILED,
                    format!("{} before its API answered", files.describe_exit(status)),
                ));
            }
            if Instant::now() >= deadline {
                // Do not leave a VMM behind that may come up later.
                if let Some(pid) = child_of(supervisor) {
                    let vmm = Vmm { pid, api_ok: false };
                    let _ = self.terminate(files, vmm).await;
                }
                return Err(ProviderError::new(
                    TIMEOUT,
                    format!(
                        "the VMM API did not answer within {} s",
                        self.cfg.boot_timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Cloud Hypervisor `VmConfig` for this VM.
    fn vm_config(&self, files: &VmFiles, meta: &VmMeta) -> serde_json::Value {
        use serde_json::json;
        let mut payload = serde_json::Map::new();
        if let Some(k) = &meta.kernel_path {
            payload.insert("kernel".into(), json!(k));
        }
        if let Some(c) = &meta.cmdline {
            payload.insert("cmdline".into(), json!(c));
        }
        if let Some(i) = &meta.initramfs_path {
            payload.insert("initramfs".into(), json!(i));
        }
        if let Some(f) = &meta.firmware_path {
            payload.insert("firmware".into(), json!(f));
        }
        let mut disks = Vec::new();
        if let Some(d) = &meta.disk_path {
            let format = meta
                .disk_format
                .as_deref()
                .and_then(DiskFormat::parse)
                .unwrap_or(DiskFormat::Raw);
            let mut disk = json!({"path": d, "readonly": false, "image_type": format.ch_image_type()});
            if format == DiskFormat::Qcow2 {
                // The overlay's backing file is the base image: CH refuses backing files unless allowed.
                disk["backing_files"] = json!(true);
            }
            disks.push(disk);
        }
        if let Some(s) = &meta.seed_path {
            disks.push(json!({"path": s, "readonly": true, "image_type": "Raw"}));
        }
        let mut cfg = json!({
            "cpus": {"boot_vcpus": meta.vcpu, "max_vcpus": meta.vcpu},
            "memory": {"size": meta.memory_mib * 1024 * 1024},
            "payload": payload,
            "disks": disks,
            "serial": {"mode": "File", "file": files.serial.to_string_lossy()},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"},
        });
        if let Some(tap) = &meta.tap {
            let mut n = json!({"tap": tap});
            if let Some(mac) = &meta.mac {
                n["mac"] = json!(mac);
            }
            cfg["net"] = json!([n]);
        }
        cfg
    }

    /// `vm.create` (when `define`), `vm.boot`, then `vm.info` until `Running`. Any failure ends the VMM.
    async fn boot(
        &self,
        files: &VmFiles,
        meta: &mut VmMeta,
        vmm: Vmm,
        deadline: Instant,
        define: bool,
    ) -> Result<(), ProviderError> {
        let api = ChApi::new(&files.socket);
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100))
        };
        let result = async {
            if define {
                let body = serde_json::to_vec(&self.vm_config(files, meta)).unwrap_or_default();
                api.put("vm.create", Some(body), left().min(CALL_TIMEOUT))
                    .await
                    .map_err(|e| self.call_failed(files, vmm, CH_API_ERROR, "vm.create", e))?;
            }
            api.put("vm.boot", None, left())
                .await
                .map_err(|e| self.call_failed(files, vmm, BOOT_FAILED, "vm.boot", e))?;
            loop {
                match api.vm_state(left().min(CALL_TIMEOUT)).await {
                    Ok(Some(s)) if s == "Running" => return Ok(()),
                    Ok(s) if Instant::now() >= deadline => {
                        return Err(ProviderError::new(
                            TIMEOUT,
                            format!(
                                "the VM is {} after vm.boot, not Running",
                                s.as_deref().unwrap_or("absent")
                            ),
                        ))
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => return Err(self.call_failed(files, vmm, CH_API_ERROR, "vm.info", e)),
                }
            }
        }
        .await;
        match result {
            Ok(()) => {
                meta.pid = Some(vmm.pid).filter(|p| *p > 0).or(meta.pid);
                self.record(files, meta, STATE_RUNNING, None)
            }
            Err(e) => {
                // Leave no half-started VMM behind (and no guest that might come up later).
                let still = self.find_vmm(files, Some(vmm.pid)).await;
                if let Some(v) = still {
                    let _ = self.terminate(files, v).await;
                }
                meta.pid = None;
                let _ = self.record(files, meta, STATE_ERROR, Some(e.to_string()));
                Err(e)
            }
        }
    }

    /// Maps a failed API call: the VMM died (VMM_CRASHED), timed out (TIMEOUT), or answered an error (`code`).
    fn call_failed(&self, files: &VmFiles, vmm: Vmm, code: &'static str, call: &str, e: ApiError) -> ProviderError {
        let dead = vmm.pid > 0 && !process::is_our_vmm(vmm.pid, &files.socket);
        if dead || matches!(e, ApiError::Unreachable(_)) {
            let how = files
                .exit_status()
                .map(|s| files.describe_exit(s))
                .unwrap_or_else(|| e.describe());
            return ProviderError::new(VMM_CRASHED, format!("{call}: the VMM died: {how}"));
        }
        match e {
            ApiError::Timeout(_) => ProviderError::new(TIMEOUT, format!("{call}: {}", e.describe())),
            _ => ProviderError::new(code, format!("{call}: {}", e.describe())),
        }
    }

    fn record(
        &self,
        files: &VmFiles,
        meta: &mut VmMeta,
        state: &str,
        reason: Option<String>,
    ) -> Result<(), ProviderError> {
        meta.state = state.into();
        meta.reason = reason;
        if state == STATE_STOPPED {
            meta.pid = None;
        }
        files.save(meta)
    }

    // -----------------------------------------------------------------------------------------------------------
    // stop / delete

    /// Stops the VM and its VMM: ACPI power button, up to `stop_timeout` for the guest, then `vm.shutdown`,
    /// `vmm.shutdown`, SIGTERM, SIGKILL. `Ok` when it is stopped already.
    pub async fn stop(&self, vm_id: &str) -> Result<(), ProviderError> {
        check_id(vm_id)?;
        let lock = self.lock_for(vm_id);
        let _guard = lock.lock().await;
        let files = self.files(vm_id);
        let mut meta = self.require_meta(&files, vm_id)?;
        self.stop_locked(&files, &mut meta).await
    }

    async fn stop_locked(&self, files: &VmFiles, meta: &mut VmMeta) -> Result<(), ProviderError> {
        if let Some(vmm) = self.find_vmm(files, meta.pid).await {
            if vmm.api_ok {
                self.shutdown_guest(files, vmm).await;
            }
            self.terminate(files, vmm).await?;
        } else {
            files.remove_stale_socket();
        }
        if meta.phase == PHASE_READY {
            self.record(files, meta, STATE_STOPPED, None)?;
        }
        Ok(())
    }

    /// Asks the guest to power off, then forces the VM off if it has not within `stop_timeout`.
    async fn shutdown_guest(&self, files: &VmFiles, vmm: Vmm) {
        let api = ChApi::new(&files.socket);
        match api.vm_state(CALL_TIMEOUT).await {
            Ok(Some(s)) if s == "Running" => {
                if api.put("vm.power-button", None, CALL_TIMEOUT).await.is_ok() {
                    let deadline = Instant::now() + self.cfg.stop_timeout;
                    while Instant::now() < deadline {
                        if vmm.pid > 0 && !process::is_our_vmm(vmm.pid, &files.socket) {
                            return;
                        }
                        match api.vm_state(LIST_TIMEOUT).await {
                            Ok(Some(s)) if s == "Running" => {}
                            Ok(_) | Err(ApiError::Unreachable(_)) => return,
                            Err(_) => {}
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let _ = api.put("vm.shutdown", None, CALL_TIMEOUT).await;
            }
            Ok(Some(s)) if s == "Paused" => {
                let _ = api.put("vm.shutdown", None, CALL_TIMEOUT).await;
            }
            _ => {}
        }
    }

    /// Stops the VM, removes the TAP the provider made and the VM's directory. `Ok` when there is no such VM.
    pub async fn delete(&self, vm_id: &str) -> Result<(), ProviderError> {
        check_id(vm_id)?;
        let lock = self.lock_for(vm_id);
        let _guard = lock.lock().await;
        let files = self.files(vm_id);
        if !files.dir.exists() {
            return Ok(());
        }
        let meta = files.load().ok().flatten();
        self.discard(&files, meta.as_ref()).await?;
        if meta.is_none() {
            // Unreadable metadata: a TAP with the derived name can only be this VM's.
            let tap = net::tap_name_for(vm_id);
            if net::link_exists(&self.ip_cmd, &tap).await {
                net::remove_tap(&self.ip_cmd, &tap).await?;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------------------------
    // list / reconcile

    /// Every VM under `runtime_dir` with its live state, sorted by id. A VM whose VMM has gone since the last
    /// look is recorded as `STOPPED` (guest power-off) or `ERROR` (crash) on the way.
    pub async fn list(&self) -> Vec<MicroVmReport> {
        self.survey(false).await
    }

    /// At agent start: rediscovers the VMs from their directories, sockets and pids, fixes what `vm.json` says
    /// (VMM gone → `STOPPED`/`ERROR`; an interrupted create → `ERROR`), clears stale sockets and leftover
    /// temporary files, and returns the VMs.
    pub async fn reconcile(&self) -> Vec<MicroVmReport> {
        self.survey(true).await
    }

    async fn survey(&self, deep: bool) -> Vec<MicroVmReport> {
        let mut ids: Vec<String> = match std::fs::read_dir(&self.cfg.runtime_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| valid_vm_id(n))
                .collect(),
            Err(_) => Vec::new(),
        };
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.survey_one(&id, deep).await {
                out.push(r);
            }
        }
        out
    }

    async fn survey_one(&self, vm_id: &str, deep: bool) -> Option<MicroVmReport> {
        let files = self.files(vm_id);
        let lock = self.lock_for(vm_id);
        let Ok(_guard) = lock.try_lock() else {
            // An operation on this VM is under way: report what it last recorded.
            return match files.load() {
                Ok(Some(m)) => Some(report(&m)),
                _ => None,
            };
        };
        let mut meta = match files.load() {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(_) => {
                // Unreadable metadata: the VM exists but nothing can be done with it but a delete.
                return Some(MicroVmReport {
                    id: vm_id.to_string(),
                    name: vm_id.to_string(),
                    state: Some(STATE_ERROR.into()),
                    updated_at: Some(now_rfc3339()),
                    ..Default::default()
                });
            }
        };
        if deep {
            // Leftovers of an interrupted create (not `vmm.exit.tmp`: a supervisor may be writing it right now).
            for leftover in ["disk.raw.tmp", "disk.qcow2.tmp", "seed.iso.tmp", ".seed"] {
                let p = files.dir.join(leftover);
                let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
            }
        }
        let files = VmFiles {
            launch: meta.launch.clone(),
            ..files
        };
        let (state, reason, pid) = self.observe(&files, &meta).await;
        if state != meta.state || reason != meta.reason || pid != meta.pid {
            meta.state = state;
            meta.reason = reason;
            meta.pid = pid;
            let _ = files.save(&mut meta);
        }
        Some(report(&meta))
    }

    /// The VM's live state, the reason for a non-obvious one, and the VMM pid.
    async fn observe(&self, files: &VmFiles, meta: &VmMeta) -> (String, Option<String>, Option<i64>) {
        if meta.phase != PHASE_READY {
            return (
                STATE_ERROR.into(),
                Some("the create did not complete (agent interrupted); repeat the create".into()),
                None,
            );
        }
        match self.find_vmm(files, meta.pid).await {
            Some(vmm) if vmm.api_ok => {
                let pid = Some(vmm.pid).filter(|p| *p > 0).or(meta.pid);
                match ChApi::new(&files.socket).vm_state(LIST_TIMEOUT).await {
                    Ok(Some(s)) if s == "Running" => (STATE_RUNNING.into(), None, pid),
                    Ok(Some(s)) if s == "Paused" => (STATE_PAUSED.into(), None, pid),
                    Ok(Some(s)) => (
                        STATE_STOPPED.into(),
                        Some(format!("the VMM is up with the VM {s}")),
                        pid,
                    ),
                    Ok(None) => (STATE_STOPPED.into(), Some("the VMM is up without a VM".into()), pid),
                    Err(e) => (meta.state.clone(), Some(format!("vm.info: {}", e.describe())), pid),
                }
            }
            Some(vmm) => (
                meta.state.clone(),
                Some("the VMM is alive but its API does not answer".into()),
                Some(vmm.pid),
            ),
            None => {
                if meta.state == STATE_RUNNING || meta.state == STATE_PAUSED {
                    files.remove_stale_socket();
                    // The supervisor writes the exit status right after the VMM ends: give it a moment.
                    let mut status = files.exit_status();
                    for _ in 0..25 {
                        if status.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        status = files.exit_status();
                    }
                    match status {
                        Some(0) => (
                            STATE_STOPPED.into(),
                            Some("the guest powered off (VMM exited with status 0)".into()),
                            None,
                        ),
                        Some(s) => (STATE_ERROR.into(), Some(files.describe_exit(s)), None),
                        None => (
                            STATE_STOPPED.into(),
                            Some("the VMM process is gone (host restart or killed with its supervisor)".into()),
                            None,
                        ),
                    }
                } else {
                    (meta.state.clone(), meta.reason.clone(), None)
                }
            }
        }
    }
}

/// The VMM pid when the supervisor shell has exactly one child.
fn child_of(supervisor: u32) -> Option<i64> {
    let text = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).ok()?;
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    it.next().is_none().then_some(pid)
}

fn api_error(call: &str, e: ApiError) -> ProviderError {
    match e {
        ApiError::Timeout(_) => ProviderError::new(TIMEOUT, format!("{call}: {}", e.describe())),
        _ => ProviderError::new(CH_API_ERROR, format!("{call}: {}", e.describe())),
    }
}

fn report(m: &VmMeta) -> MicroVmReport {
    let live = m.state == STATE_RUNNING || m.state == STATE_PAUSED;
    MicroVmReport {
        id: m.vm_id.clone(),
        name: m.name.clone(),
        // A create under way is CREATING (set by `validate`); one that was interrupted is ERROR (set by `observe`).
        state: Some(m.state.clone()),
        status: None,
        vcpu_count: Some(m.vcpu),
        memory_mib: Some(m.memory_mib),
        kernel_path: m.kernel_path.clone().or_else(|| m.firmware_path.clone()),
        rootfs_path: m.disk_path.clone().or_else(|| m.base_image.clone()),
        tap_iface: m.tap.clone(),
        ch_pid: if live { m.pid } else { None },
        updated_at: Some(m.updated_at.clone()),
    }
}

/// The reason recorded for the VM's current state (e.g. why it is `ERROR`), if any. Reads `vm.json` only.
pub fn recorded_reason(cfg: &ProviderConfig, vm_id: &str) -> Option<String> {
    if !valid_vm_id(vm_id) {
        return None;
    }
    VmFiles::new(cfg.runtime_dir.join(vm_id)).load().ok()??.reason
}

/// `<bin> <args>` with a time limit: its first non-empty stdout line (for `--version`-like calls).
pub(crate) fn run_version_line(bin: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    process::run_version(bin, args, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        for ok in [
            "vm-1",
            "00000000-0000-4000-8000-000000000001",
            "a.b_c",
            &"x".repeat(128),
        ] {
            assert!(valid_vm_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(!valid_vm_id(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T", "{t}");
        assert!(t.as_str() > "2024-01-01T00:00:00Z");
    }

    fn provider() -> CloudHypervisor {
        CloudHypervisor::new(ProviderConfig {
            runtime_dir: "/nonexistent/vms".into(),
            images_dir: "/images".into(),
            ..Default::default()
        })
    }

    fn params() -> MicroVmCreateParams {
        MicroVmCreateParams {
            vm_id: "vm-1".into(),
            kernel_path: Some("/boot/vmlinux".into()),
            ..Default::default()
        }
    }

    #[test]
    fn validation_defaults_and_paths() {
        let p = provider();
        let m = p.validate(&params()).unwrap();
        assert_eq!((m.vcpu, m.memory_mib), (DEFAULT_VCPU, DEFAULT_MEMORY_MIB));
        assert_eq!(m.cmdline.as_deref(), Some(DEFAULT_CMDLINE));
        assert_eq!(m.tap, None, "no bridge and no tap: no network");
        assert_eq!(m.mac, None);
        let m = p
            .validate(&MicroVmCreateParams {
                rootfs_path: Some("base/ubuntu.qcow2".into()),
                bridge: Some("br0".into()),
                ..params()
            })
            .unwrap();
        assert_eq!(m.base_image.as_deref(), Some("/images/base/ubuntu.qcow2"));
        assert_eq!(m.cmdline.as_deref(), Some("console=ttyS0 root=/dev/vda rw"));
        assert_eq!(m.tap.as_deref(), Some(tap_name_for("vm-1").as_str()));
        assert!(m.tap_owned);
        assert_eq!(m.mac.as_deref(), Some(mac_for("vm-1").as_str()));
    }

    #[test]
    fn validation_refusals_name_the_field() {
        let p = provider();
        let cases: Vec<(MicroVmCreateParams, &str)> = vec![
            (
                MicroVmCreateParams {
                    vm_id: "../etc".into(),
                    ..params()
                },
                "vm_id",
            ),
            (MicroVmCreateParams { vcpu: -1, ..params() }, "vcpu"),
            (
                MicroVmCreateParams {
                    memory_mib: -5,
                    ..params()
                },
                "memory_mib",
            ),
            (
                MicroVmCreateParams {
                    kernel_path: None,
                    ..params()
                },
                "kernel_path or firmware_path",
            ),
            (
                MicroVmCreateParams {
                    firmware_path: Some("/fw".into()),
                    ..params()
                },
                "not both",
            ),
            (
                MicroVmCreateParams {
                    rootfs_path: Some("../../etc/shadow".into()),
                    ..params()
                },
                "rootfs_path",
            ),
            (
                MicroVmCreateParams {
                    disk_size_mib: Some(-1),
                    ..params()
                },
                "disk_size_mib",
            ),
            (
                MicroVmCreateParams {
                    tap_iface: Some("tap-way-too-long-name".into()),
                    ..params()
                },
                "tap_iface",
            ),
            (
                MicroVmCreateParams {
                    bridge: Some("bad bridge".into()),
                    ..params()
                },
                "bridge",
            ),
            (
                MicroVmCreateParams {
                    mac: Some("ff:ff:ff:ff:ff:ff".into()),
                    ..params()
                },
                "mac",
            ),
            (
                MicroVmCreateParams {
                    kernel_path: None,
                    firmware_path: Some("/fw".into()),
                    cmdline: Some("x".into()),
                    ..params()
                },
                "need kernel_path",
            ),
        ];
        for (c, needle) in cases {
            let e = p.validate(&c).unwrap_err();
            assert_eq!(e.code, INVALID_PARAMS);
            assert!(e.message.contains(needle), "{needle:?} not in {:?}", e.message);
        }
    }

    #[test]
    fn default_bridge_applies_and_digest_tracks_params() {
        let p = CloudHypervisor::new(ProviderConfig {
            default_bridge: Some("br-edge".into()),
            ..Default::default()
        });
        let a = p.validate(&params()).unwrap();
        assert_eq!(a.bridge.as_deref(), Some("br-edge"));
        assert!(a.tap.is_some());
        let b = p
            .validate(&MicroVmCreateParams {
                memory_mib: 1024,
                ..params()
            })
            .unwrap();
        assert_ne!(a.params_digest, b.params_digest);
        assert_eq!(a.params_digest, p.validate(&params()).unwrap().params_digest);
        // The digest is all that is kept of the user data.
        let s = p
            .validate(&MicroVmCreateParams {
                cloud_init_user_data: Some("password: hunter2".into()),
                ..params()
            })
            .unwrap();
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
    }

    #[test]
    fn vm_config_shape() {
        let p = provider();
        let mut m = p
            .validate(&MicroVmCreateParams {
                vcpu: 2,
                memory_mib: 256,
                initramfs_path: Some("/boot/initrd".into()),
                cmdline: Some("console=ttyS0 quiet".into()),
                tap_iface: Some("tap7".into()),
                ..params()
            })
            .unwrap();
        m.disk_path = Some("/vms/vm-1/disk.qcow2".into());
        m.disk_format = Some("qcow2".into());
        m.seed_path = Some("/vms/vm-1/seed.iso".into());
        let files = VmFiles::new("/vms/vm-1".into());
        let c = p.vm_config(&files, &m);
        assert_eq!(c["payload"]["kernel"], "/boot/vmlinux");
        assert_eq!(c["payload"]["initramfs"], "/boot/initrd");
        assert_eq!(c["payload"]["cmdline"], "console=ttyS0 quiet");
        assert_eq!(c["cpus"]["boot_vcpus"], 2);
        assert_eq!(c["memory"]["size"], 256 * 1024 * 1024);
        assert_eq!(c["disks"][0]["image_type"], "Qcow2");
        assert_eq!(c["disks"][0]["backing_files"], true);
        assert_eq!(c["disks"][1]["readonly"], true);
        assert_eq!(c["serial"]["mode"], "File");
        assert_eq!(c["serial"]["file"], "/vms/vm-1/serial.log");
        assert_eq!(c["console"]["mode"], "Off");
        assert_eq!(c["net"][0]["tap"], "tap7");
        assert_eq!(c["net"][0]["mac"], mac_for("vm-1"));
    }
}
