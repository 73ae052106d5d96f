//! Crash-safe file operations of the agent: the atomic write of `nkudo_core::fsutil`, plus directory helpers.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub use nkudo_core::fsutil::{sync_dir, write_atomic};

/// Creates `dir` (and parents) if needed and sets its mode to `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Renames `from` to `to` and fsyncs the directory of `to`.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(
        to.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_dir_sets_the_mode_and_atomic_writes_replace() {
        let dir = std::env::temp_dir().join(format!("nkudo-edge-fsutil-{}", std::process::id()));
        ensure_dir(&dir, 0o700).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let p = dir.join("f.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        let moved = dir.join("g.json");
        rename_durable(&p, &moved).unwrap();
        assert!(!p.exists() && moved.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
