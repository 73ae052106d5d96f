//! The VM's disks: its own system disk made from a base image, and the cloud-init NoCloud seed image.
//!
//! * A qcow2 base image (detected from its content, the magic `QFI\xfb`, not from its name: reference bug 34)
//!   gets a qcow2 overlay: `qemu-img create -f qcow2 -F qcow2 -b <base> disk.qcow2 [<size>M]`; the base stays
//!   shared and untouched.
//! * A raw base image is copied to `disk.raw` (and grown, sparse, to `disk_size_mib` when that is larger).
//! * No base image and a `disk_size_mib`: an empty sparse raw disk of that size.
//! * The seed image is an ISO 9660 volume labelled `cidata` holding `user-data` and `meta-data`, written by the
//!   first of `genisoimage`, `mkisofs`, `xorrisofs`, `cloud-localds` found on `PATH` (Debian: `genisoimage`).
//!   The user data may hold secrets: it is never logged, the staging files are removed and the image is 0600.
//!
//! Every file appears under its final name only when complete (written as `*.tmp`, then renamed).

use super::{ProviderError, DISK_PREPARE_FAILED, SEED_IMAGE_FAILED};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub const QCOW2_MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];
const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The name for `qemu-img -F` and in `vm.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// Cloud Hypervisor's `DiskConfig.image_type`.
    pub fn ch_image_type(self) -> &'static str {
        match self {
            DiskFormat::Raw => "Raw",
            DiskFormat::Qcow2 => "Qcow2",
        }
    }

    pub fn parse(s: &str) -> Option<DiskFormat> {
        match s {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }
}

/// qcow2 when the file starts with the qcow2 magic, raw otherwise.
pub fn detect_format(path: &Path) -> std::io::Result<DiskFormat> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(if n == 4 && magic == QCOW2_MAGIC {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

fn disk_err(msg: String) -> ProviderError {
    ProviderError::new(DISK_PREPARE_FAILED, msg)
}

/// Runs a tool to completion with a time limit; `Err` carries its stderr (or why it could not run).
async fn run_tool(bin: &Path, args: &[&std::ffi::OsStr], timeout: Duration) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => Err(format!(
            "{} did not finish within {} s",
            bin.display(),
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", bin.display())),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(2000)
                .collect::<String>();
            Err(format!("{} failed ({}): {err}", bin.display(), out.status))
        }
    }
}

/// The VM's system disk, if it has one: `(path, format)`.
pub async fn prepare_disk(
    qemu_img: &Path,
    vmdir: &Path,
    base: Option<&Path>,
    size_mib: Option<i64>,
) -> Result<Option<(PathBuf, DiskFormat)>, ProviderError> {
    let size_bytes = size_mib.map(|m| m as u64 * MIB);
    match base {
        Some(base) => {
            let meta = std::fs::metadata(base).map_err(|e| disk_err(format!("base image {}: {e}", base.display())))?;
            if !meta.is_file() {
                return Err(disk_err(format!("base image {} is not a regular file", base.display())));
            }
            let format =
                detect_format(base).map_err(|e| disk_err(format!("cannot read base image {}: {e}", base.display())))?;
            match format {
                DiskFormat::Qcow2 => {
                    let target = vmdir.join("disk.qcow2");
                    let tmp = vmdir.join("disk.qcow2.tmp");
                    let _ = std::fs::remove_file(&tmp);
                    let mut args: Vec<std::ffi::OsString> = vec![
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        "-F".into(),
                        "qcow2".into(),
                        "-b".into(),
                        base.as_os_str().into(),
                        tmp.as_os_str().into(),
                    ];
                    if let Some(m) = size_mib {
                        args.push(format!("{m}M").into());
                    }
                    let argrefs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                    run_tool(qemu_img, &argrefs, Duration::from_secs(120))
                        .await
                        .map_err(|e| disk_err(format!("qcow2 overlay on {}: {e}", base.display())))?;
                    std::fs::rename(&tmp, &target).map_err(|e| disk_err(format!("{}: {e}", target.display())))?;
                    Ok(Some((target, DiskFormat::Qcow2)))
                }
                DiskFormat::Raw => {
                    let target = vmdir.join("disk.raw");
                    let tmp = vmdir.join("disk.raw.tmp");
                    let (b, t) = (base.to_path_buf(), tmp.clone());
                    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                        std::fs::copy(&b, &t)?;
                        let f = std::fs::OpenOptions::new().write(true).open(&t)?;
                        if let Some(want) = size_bytes {
                            if want > f.metadata()?.len() {
                                f.set_len(want)?;
                            }
                        }
                        f.sync_all()
                    })
                    .await
                    .map_err(|e| disk_err(format!("copy task: {e}")))?;
                    copied.map_err(|e| disk_err(format!("copy {} to {}: {e}", base.display(), tmp.display())))?;
                    std::fs::rename(&tmp, &target).map_err(|e| disk_err(format!("{}: {e}", target.display())))?;
                    Ok(Some((target, DiskFormat::Raw)))
                }
            }
        }
        None => match size_bytes {
            Some(bytes) => {
                let target = vmdir.join("disk.raw");
                let tmp = vmdir.join("disk.raw.tmp");
                let made = (|| -> std::io::Result<()> {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.set_len(bytes)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, &target)
                })();
                made.map_err(|e| disk_err(format!("empty disk {}: {e}", target.display())))?;
                Ok(Some((target, DiskFormat::Raw)))
            }
            None => Ok(None),
        },
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The seed image tools this host has, in order of preference.
pub fn seed_tool() -> Option<(PathBuf, &'static str)> {
    ["genisoimage", "mkisofs", "xorrisofs", "cloud-localds"]
        .into_iter()
        .find_map(|t| find_in_path(t).map(|p| (p, t)))
}

/// A hostname cloud-init accepts: `[a-z0-9-]`, at most 63 characters, not starting or ending with `-`.
pub fn hostname_from(name: &str, vm_id: &str) -> String {
    let clean = |s: &str| -> String {
        let mut h: String = s
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        h.truncate(63);
        h.trim_matches('-').to_string()
    };
    let h = clean(name);
    if !h.is_empty() {
        return h;
    }
    let h = clean(vm_id);
    if h.is_empty() {
        "nkudo-vm".into()
    } else {
        h
    }
}

/// `meta-data` of the NoCloud seed.
pub fn meta_data(vm_id: &str, hostname: &str) -> String {
    // Quoted YAML scalars: the vm id is validated to safe characters, the hostname is sanitised.
    format!("instance-id: \"{vm_id}\"\nlocal-hostname: \"{hostname}\"\n")
}

/// `user-data` of the NoCloud seed: the given user data as is, or a minimal `#cloud-config`.
pub fn user_data(given: Option<&str>, hostname: &str) -> String {
    match given {
        Some(u) if !u.trim().is_empty() => u.to_string(),
        _ => format!("#cloud-config\nhostname: {hostname}\n"),
    }
}

/// Builds `<vmdir>/seed.iso`.
pub async fn build_seed(vmdir: &Path, meta: &str, user: &str) -> Result<PathBuf, ProviderError> {
    let (tool, kind) = seed_tool().ok_or_else(|| {
        ProviderError::new(
            SEED_IMAGE_FAILED,
            "no seed image tool found on PATH (install genisoimage; mkisofs, xorrisofs or cloud-localds also work)",
        )
    })?;
    let stage = vmdir.join(".seed");
    let target = vmdir.join("seed.iso");
    let tmp = vmdir.join("seed.iso.tmp");
    let _ = std::fs::remove_dir_all(&stage);
    let _ = std::fs::remove_file(&tmp);
    let result = async {
        let io = |e: std::io::Error| format!("{}: {e}", stage.display());
        std::fs::DirBuilder::new().mode(0o700).create(&stage).map_err(io)?;
        let write = |name: &str, data: &str| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(stage.join(name))?;
            f.write_all(data.as_bytes())?;
            f.sync_all()
        };
        write("user-data", user).map_err(io)?;
        write("meta-data", meta).map_err(io)?;
        let ud = stage.join("user-data");
        let md = stage.join("meta-data");
        let args: Vec<&std::ffi::OsStr> = if kind == "cloud-localds" {
            vec![tmp.as_os_str(), ud.as_os_str(), md.as_os_str()]
        } else {
            let s = std::ffi::OsStr::new;
            let mut v = vec![s("-quiet"), s("-input-charset"), s("utf-8"), s("-o"), tmp.as_os_str()];
            v.extend([s("-V"), s("cidata"), s("-J"), s("-r"), ud.as_os_str(), md.as_os_str()]);
            v
        };
        run_tool(&tool, &args, Duration::from_secs(60)).await?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))
    }
    .await;
    // The staging files hold the user data (maybe secrets): never leave them behind.
    let _ = std::fs::remove_dir_all(&stage);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ProviderError::new(
            SEED_IMAGE_FAILED,
            format!("cloud-init seed image: {e}"),
        ));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_detection_reads_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("image.img");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(detect_format(&q).unwrap(), DiskFormat::Qcow2);
        let r = dir.path().join("image.qcow2");
        std::fs::write(&r, b"\0\0\0\0raw").unwrap();
        assert_eq!(detect_format(&r).unwrap(), DiskFormat::Raw);
        let short = dir.path().join("short");
        std::fs::write(&short, b"QF").unwrap();
        assert_eq!(detect_format(&short).unwrap(), DiskFormat::Raw);
    }

    #[test]
    fn hostnames_are_sanitised() {
        assert_eq!(hostname_from("Web Server #1", "vm-1"), "web-server--1");
        assert_eq!(
            hostname_from("", "00000000-0000-4000-8000-000000000001"),
            "00000000-0000-4000-8000-000000000001"
        );
        assert_eq!(hostname_from("---", "..."), "nkudo-vm");
        assert_eq!(hostname_from(&"a".repeat(100), "x").len(), 63);
        assert_eq!(
            meta_data("vm-1", "web"),
            "instance-id: \"vm-1\"\nlocal-hostname: \"web\"\n"
        );
        assert_eq!(user_data(None, "web"), "#cloud-config\nhostname: web\n");
        assert_eq!(user_data(Some("#cloud-config\n{}"), "web"), "#cloud-config\n{}");
    }
}
