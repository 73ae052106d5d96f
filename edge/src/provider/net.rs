//! Host networking for a VM: a TAP device on a bridge, created and removed with `ip`.
//!
//! The TAP name derived from a VM id hashes the whole id (the earlier agent took a prefix, so UUIDs sharing
//! their first characters collided: reference bug 33). All `ip` calls go through a configurable command prefix
//! (`["ip"]` by default; tests use `["ip", "-n", "<netns>"]` to work inside a network namespace).

use super::{ProviderError, NETWORK_SETUP_FAILED};
use std::ffi::OsString;
use std::time::Duration;

/// Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL).
pub const IFNAME_MAX: usize = 15;

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

/// `nk` + 13 hex digits of SHA-256(vm_id): 15 characters, 52 bits of the hash, the same on every host and
/// restart, and different for ids that share a prefix.
pub fn tap_name_for(vm_id: &str) -> String {
    let h = sha256_hex(vm_id.as_bytes());
    format!("nk{}", &h[..IFNAME_MAX - 2])
}

/// A stable, locally administered unicast MAC for a VM: `02:` + 5 bytes of SHA-256("mac:" + vm_id).
pub fn mac_for(vm_id: &str) -> String {
    let h = sha256(format!("mac:{vm_id}").as_bytes());
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3], h[4])
}

/// An interface name `ip` accepts: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), returning it lower-case with colons; refuses multicast addresses.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut bytes = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        bytes[i] = u8::from_str_radix(p, 16).ok()?;
    }
    if bytes[0] & 1 == 1 || bytes == [0u8; 6] {
        return None;
    }
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
}

/// Runs `ip` (through the prefix). `Err(stderr)` when it fails.
async fn ip(prefix: &[OsString], args: &[&str]) -> Result<String, String> {
    let (bin, rest) = prefix.split_first().ok_or_else(|| "empty ip command".to_string())?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(rest)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(Duration::from_secs(15), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", bin.to_string_lossy())),
        Err(_) => return Err(format!("`ip {}` did not finish within 15 s", args.join(" "))),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if err.is_empty() {
            format!("exit status {}", out.status)
        } else {
            err
        })
    }
}

pub async fn link_exists(prefix: &[OsString], name: &str) -> bool {
    ip(prefix, &["link", "show", "dev", name]).await.is_ok()
}

fn net_err(msg: String) -> ProviderError {
    ProviderError::new(NETWORK_SETUP_FAILED, msg)
}

/// Makes sure the TAP exists, is attached to `bridge` (when given) and is up. Returns whether it created it.
pub async fn ensure_tap(prefix: &[OsString], tap: &str, bridge: Option<&str>) -> Result<bool, ProviderError> {
    if let Some(br) = bridge {
        if !link_exists(prefix, br).await {
            return Err(net_err(format!("bridge {br} does not exist on this host")));
        }
    }
    let mut created = false;
    if !link_exists(prefix, tap).await {
        match ip(prefix, &["tuntap", "add", "dev", tap, "mode", "tap"]).await {
            Ok(_) => created = true,
            // Raced with another creator: fine if it exists now.
            Err(e) if e.contains("exists") || e.contains("busy") => {}
            Err(e) => return Err(net_err(format!("ip tuntap add dev {tap} mode tap: {e}"))),
        }
    }
    let attach = async {
        if let Some(br) = bridge {
            ip(prefix, &["link", "set", "dev", tap, "master", br])
                .await
                .map_err(|e| format!("ip link set dev {tap} master {br}: {e}"))?;
        }
        ip(prefix, &["link", "set", "dev", tap, "up"])
            .await
            .map_err(|e| format!("ip link set dev {tap} up: {e}"))
    };
    if let Err(e) = attach.await {
        if created {
            let _ = remove_tap(prefix, tap).await;
        }
        return Err(net_err(e));
    }
    Ok(created)
}

/// Deletes the TAP; a missing device is fine.
pub async fn remove_tap(prefix: &[OsString], tap: &str) -> Result<(), ProviderError> {
    match ip(prefix, &["link", "del", "dev", tap]).await {
        Ok(_) => Ok(()),
        Err(e) if e.contains("Cannot find device") || e.contains("not found") || e.contains("does not exist") => Ok(()),
        Err(e) => Err(net_err(format!("ip link del dev {tap}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn tap_names_are_short_unique_and_stable() {
        // The reference's demo ids: all shared `tap-00000000-00` before.
        let ids: Vec<String> = (0..2000).map(|i| format!("00000000-0000-4000-8000-{i:012}")).collect();
        let names: HashSet<String> = ids.iter().map(|id| tap_name_for(id)).collect();
        assert_eq!(names.len(), ids.len(), "TAP names collide");
        for id in &ids {
            let n = tap_name_for(id);
            assert!(n.len() <= IFNAME_MAX, "{n} too long");
            assert!(valid_ifname(&n));
            assert_eq!(n, tap_name_for(id), "not stable");
        }
        let long = "x".repeat(200);
        assert_eq!(tap_name_for(&long).len(), 15);
        assert_ne!(tap_name_for("vm-1"), tap_name_for("vm-10"));
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let m = mac_for("vm-1");
        assert_eq!(m, mac_for("vm-1"));
        assert_ne!(m, mac_for("vm-2"));
        assert!(m.starts_with("02:"));
        assert_eq!(normalize_mac(&m).as_deref(), Some(m.as_str()));
    }

    #[test]
    fn mac_and_ifname_validation() {
        assert_eq!(normalize_mac("01-00-5E-00-00-01"), None, "multicast bit set");
        assert_eq!(normalize_mac("AA-BB-CC-DD-EE-FF").as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(normalize_mac("52-54-00-AB-CD-EF").as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:zz"), None);
        assert_eq!(normalize_mac("00:00:00:00:00:00"), None);
        assert!(valid_ifname("br0"));
        assert!(valid_ifname("tap-123456789ab"));
        assert!(!valid_ifname("tap-123456789abc"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a b"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname(".."));
    }
}
