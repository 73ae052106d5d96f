//! Host facts from `/proc`, `/sys`, `/etc/os-release`, `statvfs` and `getifaddrs` (reference §6.6, with bug 35
//! fixed: the runtime directory's filesystem is measured once, and `/dev/kvm` flags follow the real open result).

use nkudo_core::api::{DiskFacts, HostFacts, InterfaceFacts, KvmFacts};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A helper binary the agent drives (Cloud Hypervisor, NetBird, qemu-img).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct BinaryFacts {
    /// As configured (`cloud-hypervisor`, or a path).
    pub configured: String,
    /// Where it was found (absolute), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Binaries {
    pub cloud_hypervisor: BinaryFacts,
    pub netbird: BinaryFacts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_img: Option<BinaryFacts>,
}

/// What `nkudo-edge hostfacts` prints and the heartbeat's `host_facts` carries: the wire [`HostFacts`] plus
/// the helper binaries (unknown keys are ignored by the control plane).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct EdgeHostFacts {
    #[serde(flatten)]
    pub facts: HostFacts,
    pub hostname: String,
    pub binaries: Binaries,
}

/// Resolves `bin` like a shell would: a name with a slash is a path; otherwise the first executable file on
/// `PATH`.
pub fn find_binary(bin: &Path) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if bin.as_os_str().is_empty() {
        return None;
    }
    if bin.components().count() > 1 || bin.is_absolute() {
        return is_exec(bin).then(|| bin.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| is_exec(p))
}

pub fn binary_facts(configured: &Path, version: Option<String>) -> BinaryFacts {
    let found = find_binary(configured);
    BinaryFacts {
        configured: configured.display().to_string(),
        present: found.is_some(),
        path: found.map(|p| p.display().to_string()),
        version: version.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()),
    }
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn hostname() -> String {
    read_trim("/proc/sys/kernel/hostname")
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `GOARCH`-style names, as the earlier agent and the control plane use them.
pub fn arch() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        other => other,
    }
    .to_string()
}

pub fn kernel() -> String {
    read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into())
}

/// (`ID`, `VERSION_ID` or else `VERSION`) of `/etc/os-release` (or `/usr/lib/os-release`).
pub fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    parse_os_release(&text)
}

pub fn parse_os_release(text: &str) -> (String, String) {
    let mut id = None;
    let mut version_id = None;
    let mut version = None;
    for line in text.lines() {
        let Some((k, v)) = line.trim().split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => id = Some(v),
            "VERSION_ID" => version_id = Some(v),
            "VERSION" => version = Some(v),
            _ => {}
        }
    }
    (
        id.filter(|s| !s.is_empty()).unwrap_or_else(|| "linux".into()),
        version_id
            .or(version)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into()),
    )
}

/// (`MemTotal`, `MemAvailable`) of `/proc/meminfo` in bytes.
pub fn memory() -> (i64, i64) {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

pub fn parse_meminfo(text: &str) -> (i64, i64) {
    let mut total = 0;
    let mut avail = None;
    let mut free = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let kib: i64 = v.parse().unwrap_or(0);
        match k {
            "MemTotal:" => total = kib * 1024,
            "MemAvailable:" => avail = Some(kib * 1024),
            "MemFree:" => free = kib * 1024,
            _ => {}
        }
    }
    (total, avail.unwrap_or(free))
}

pub fn cpu_cores() -> i64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as i64)
        .unwrap_or(1)
}

/// The mount point holding `path` (longest matching mount in `/proc/self/mountinfo`).
fn mountpoint_of(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<String> = None;
    for line in info.lines() {
        // id parent major:minor root mountpoint ...
        let Some(mp) = line.split(' ').nth(4) else { continue };
        let mp = mp.replace("\\040", " ");
        let mpp = Path::new(&mp);
        if path.starts_with(mpp) && best.as_ref().is_none_or(|b| mp.len() >= b.len()) {
            best = Some(mp);
        }
    }
    best
}

/// The filesystem of the runtime directory (its nearest existing ancestor while it does not exist yet),
/// measured once.
pub fn disk_of(runtime_dir: &Path) -> Result<DiskFacts, String> {
    let abs = if runtime_dir.is_absolute() {
        runtime_dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(runtime_dir)
    };
    let mut probe = abs.as_path();
    while !probe.exists() {
        probe = probe
            .parent()
            .ok_or_else(|| format!("no existing ancestor of {}", abs.display()))?;
    }
    let c = CString::new(probe.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(format!(
            "statvfs {}: {}",
            probe.display(),
            std::io::Error::last_os_error()
        ));
    }
    let frsize = if st.f_frsize > 0 {
        st.f_frsize as u64
    } else {
        st.f_bsize as u64
    };
    let canonical = std::fs::canonicalize(probe).unwrap_or_else(|_| probe.to_path_buf());
    Ok(DiskFacts {
        mountpoint: mountpoint_of(&canonical).unwrap_or_else(|| canonical.display().to_string()),
        total_bytes: (st.f_blocks as u64).saturating_mul(frsize).min(i64::MAX as u64) as i64,
        free_bytes: (st.f_bavail as u64).saturating_mul(frsize).min(i64::MAX as u64) as i64,
    })
}

/// `/dev/kvm`: present (a character device), and readable/writable as an `O_RDWR` open really says; on failure
/// an `O_RDONLY` open decides `readable` (bug 35: the earlier agent reported readable on any open failure).
pub fn kvm(path: &Path) -> KvmFacts {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return KvmFacts {
                check_message: Some(format!("{}: {e}", path.display())),
                ..Default::default()
            }
        }
    };
    if !meta.file_type().is_char_device() {
        return KvmFacts {
            present: false,
            check_message: Some(format!("{} is not a character device", path.display())),
            ..Default::default()
        };
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => KvmFacts {
            present: true,
            readable: true,
            writable: true,
            check_message: Some(format!("{} is accessible", path.display())),
        },
        Err(rw) => {
            let readable = std::fs::File::open(path).is_ok();
            KvmFacts {
                present: true,
                readable,
                writable: false,
                check_message: Some(format!("open {} read-write: {rw}", path.display())),
            }
        }
    }
}

fn prefix_len(mask: &[u8]) -> u32 {
    mask.iter().map(|b| b.count_ones()).sum()
}

/// Interface name → address CIDRs, from getifaddrs(3).
fn addresses() -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs; every pointer is
    // checked for NULL and the sockaddr is read as the family it declares.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let family = (*ifa.ifa_addr).sa_family as i32;
            let entry = match family {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                    let plen = if ifa.ifa_netmask.is_null() {
                        32
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                        prefix_len(&m.sin_addr.s_addr.to_ne_bytes())
                    };
                    format!("{ip}/{plen}")
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    let plen = if ifa.ifa_netmask.is_null() {
                        128
                    } else {
                        let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                        prefix_len(&m.sin6_addr.s6_addr)
                    };
                    format!("{ip}/{plen}")
                }
                _ => continue,
            };
            out.entry(name).or_default().push(entry);
        }
        libc::freeifaddrs(head);
    }
    out
}

/// Non-loopback interfaces of `/sys/class/net` with MAC, addresses and bridge flag; and the bridge names.
pub fn interfaces() -> (Vec<InterfaceFacts>, Vec<String>) {
    let mut addrs = addresses();
    let mut list = Vec::new();
    let mut bridges = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return (list, bridges);
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        if name == "lo" {
            continue;
        }
        let base = Path::new("/sys/class/net").join(&name);
        let is_bridge = base.join("bridge").exists();
        if is_bridge {
            bridges.push(name.clone());
        }
        list.push(InterfaceFacts {
            mac: std::fs::read_to_string(base.join("address"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            addresses: addrs.remove(&name).unwrap_or_default(),
            is_bridge,
            name,
        });
    }
    (list, bridges)
}

/// Inputs of [`collect`].
#[derive(Debug, Clone)]
pub struct FactsInput<'a> {
    pub runtime_dir: &'a Path,
    pub kvm_device: &'a Path,
    pub binaries: Binaries,
}

/// Collects every fact (cheap: a few small files, one statvfs, one getifaddrs).
pub fn collect(input: FactsInput<'_>) -> EdgeHostFacts {
    let (os, os_version) = os_release();
    let (mem_total, mem_free) = memory();
    let (ifaces, bridges) = interfaces();
    let disks = match disk_of(input.runtime_dir) {
        Ok(d) => vec![d],
        Err(_) => Vec::new(),
    };
    let ch_ok = input.binaries.cloud_hypervisor.present;
    EdgeHostFacts {
        facts: HostFacts {
            collected_at: Some(crate::state::now_rfc3339()),
            cpu_cores: cpu_cores(),
            memory_total_bytes: mem_total,
            memory_free_bytes: mem_free,
            disks,
            os,
            os_version,
            kernel: kernel(),
            arch: arch(),
            kvm: kvm(input.kvm_device),
            interfaces: ifaces,
            bridges,
            cloud_hypervisor_available: Some(ch_ok),
        },
        hostname: hostname(),
        binaries: input.binaries,
    }
}

/// Facts with the helper binaries' versions (runs `cloud-hypervisor --version` and `netbird version`): what
/// `nkudo-edge hostfacts` prints.
pub fn collect_with_versions(p: &crate::cli::ProviderSettings, netbird_bin: &Path) -> EdgeHostFacts {
    let ch = crate::provider::CloudHypervisor::new(crate::backend::provider_config(p));
    let binaries = Binaries {
        cloud_hypervisor: binary_facts(&p.cloud_hypervisor_bin, ch.binary_version()),
        netbird: binary_facts(netbird_bin, crate::mesh::netbird_version(netbird_bin)),
        qemu_img: Some(binary_facts(&p.qemu_img_bin, None)),
    };
    collect(FactsInput {
        runtime_dir: &p.runtime_dir,
        kvm_device: Path::new("/dev/kvm"),
        binaries,
    })
}

/// Hex SHA-256 (host fingerprints).
pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The earlier agent's fingerprint: SHA-256 of the trimmed `/etc/machine-id` and of the MAC of the first
/// `/sys/class/net` entry not starting with `lo`.
pub fn host_fingerprint() -> nkudo_core::api::HostFingerprint {
    let machine = read_trim("/etc/machine-id").map(|m| sha256_hex(m.as_bytes()));
    let mac = std::fs::read_dir("/sys/class/net").ok().and_then(|rd| {
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
            .into_iter()
            .find(|n| !n.starts_with("lo"))
            .and_then(|n| read_trim(&format!("/sys/class/net/{n}/address")))
            .map(|m| sha256_hex(m.as_bytes()))
    });
    nkudo_core::api::HostFingerprint {
        machine_id_sha256: machine,
        primary_mac_sha256: mac,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_prefers_version_id() {
        let (id, v) =
            parse_os_release("NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\n");
        assert_eq!((id.as_str(), v.as_str()), ("debian", "12"));
        let (id, v) = parse_os_release("ID=arch\nVERSION=rolling\n");
        assert_eq!((id.as_str(), v.as_str()), ("arch", "rolling"));
        assert_eq!(parse_os_release("").0, "linux");
    }

    #[test]
    fn meminfo_in_bytes() {
        let (t, f) = parse_meminfo("MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable:    8000 kB\n");
        assert_eq!((t, f), (16000 * 1024, 8000 * 1024));
    }

    #[test]
    fn disk_is_measured_once_for_a_missing_runtime_dir() {
        let d = disk_of(Path::new("/nonexistent-nkudo/vms/deeper")).unwrap();
        assert!(d.total_bytes > 0);
        assert_eq!(d.mountpoint, mountpoint_of(Path::new("/")).unwrap());
    }

    #[test]
    fn kvm_flags_follow_the_open_result() {
        let k = kvm(Path::new("/nonexistent/kvm"));
        assert!(!k.present && !k.readable && !k.writable);
        assert!(k.check_message.is_some());
        // A regular file is not a device.
        let k = kvm(Path::new("/proc/self/status"));
        assert!(!k.present && !k.readable);
        // /dev/null is a character device we may open read-write.
        let k = kvm(Path::new("/dev/null"));
        assert!(k.present && k.readable && k.writable);
    }

    #[test]
    fn collect_has_the_basics() {
        let f = collect(FactsInput {
            runtime_dir: Path::new("/tmp"),
            kvm_device: Path::new("/dev/kvm"),
            binaries: Binaries::default(),
        });
        assert!(f.facts.cpu_cores >= 1);
        assert!(f.facts.memory_total_bytes > 0);
        assert_eq!(f.facts.disks.len(), 1);
        assert!(!f.facts.kernel.is_empty());
        assert_eq!(prefix_len(&[255, 255, 255, 0]), 24);
    }
}
