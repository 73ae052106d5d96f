//! Unpacking a verified release tarball (`.tar.gz`) into a directory (the layout's install `fill`).
//!
//! Callers verify the bytes first (signature, size, SHA-256); this only refuses what could escape the target
//! directory: absolute paths and `..` components (the `tar` crate's `unpack` checks both), and entry types other
//! than files, directories and symbolic links.

use std::io::{self, Read};
use std::path::Path;

/// Unpacks a gzip-compressed tar stream into `dir`, keeping file modes.
pub fn unpack_tar_gz(reader: impl Read, dir: &Path) -> io::Result<()> {
    let gz = flate2::read::GzDecoder::new(reader);
    let mut archive = tar::Archive::new(gz);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unsupported tar entry type {kind:?} for {:?}", entry.path()?),
            ));
        }
        // `unpack_in` refuses entries that would land outside `dir` (absolute paths, `..`).
        if !entry.unpack_in(dir)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tar entry {:?} would land outside the release directory", entry.path()?),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            // Bypass the builder's own path checks to forge hostile names.
            h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn unpacks_files_with_modes() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        unpack_tar_gz(tarball(&[("bin/tool", b"#!/bin/sh\n", 0o755)]).as_slice(), tmp.path()).unwrap();
        let meta = std::fs::metadata(tmp.path().join("bin/tool")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn refuses_entries_outside_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("in");
        std::fs::create_dir(&inner).unwrap();
        let err = unpack_tar_gz(tarball(&[("../escape", b"x", 0o644)]).as_slice(), &inner);
        assert!(err.is_err());
        assert!(!tmp.path().join("escape").exists());
    }
}
