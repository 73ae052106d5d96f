//! Deterministic `.tar.gz` archives: the same inputs give the same bytes on any machine.
//!
//! * entries sorted by path, with every parent directory as its own entry;
//! * ustar headers with a fixed mtime (SOURCE_DATE_EPOCH), uid/gid 0, user/group `root`, fixed modes
//!   (0755 for directories and executables, 0644 for the rest), no device numbers, no extended headers;
//! * gzip with a fixed header: mtime 0, no file name, OS byte 255 ("unknown"), compression level 6
//!   (flate2's pure-Rust miniz_oxide backend, so the compressed bytes do not depend on a system zlib).

use flate2::{Compression, GzBuilder};
use std::collections::BTreeMap;
use std::io::{self, Write};

/// Where an entry's bytes come from.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Relative path inside the archive (`bin/nkudo-edge`), `/`-separated, no leading `/` or `..`.
    pub path: String,
    pub data: Vec<u8>,
    /// 0o755 or 0o644 (or another fixed mode).
    pub mode: u32,
    /// Owner (0 unless an image needs a directory owned by its user).
    pub uid: u64,
}

impl Entry {
    pub fn file(path: impl Into<String>, data: Vec<u8>, executable: bool) -> Self {
        Entry {
            path: path.into(),
            data,
            mode: if executable { 0o755 } else { 0o644 },
            uid: 0,
        }
    }
}

/// A directory entry with a given mode and owner (parents not listed are added as root-owned 0755).
#[derive(Debug, Clone)]
pub struct Dir {
    pub path: String,
    pub mode: u32,
    pub uid: u64,
}

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("invalid archive path {0:?}")]
    BadPath(String),
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

enum Item<'a> {
    Dir { mode: u32, uid: u64 },
    File(&'a Entry),
}

/// The uncompressed tar bytes for these entries (and directories), deterministic.
pub fn tar_bytes(entries: &[Entry], dirs: &[Dir], mtime: u64) -> Result<Vec<u8>, PackageError> {
    let mut items: BTreeMap<String, Item<'_>> = BTreeMap::new();
    for d in dirs {
        check_path(&d.path)?;
        items.insert(
            format!("{}/", d.path.trim_end_matches('/')),
            Item::Dir {
                mode: d.mode,
                uid: d.uid,
            },
        );
    }
    for e in entries {
        check_path(&e.path)?;
        if items.insert(e.path.clone(), Item::File(e)).is_some() {
            return Err(PackageError::Duplicate(e.path.clone()));
        }
        // Every parent directory, root-owned 0755 unless listed.
        let mut parent = e.path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            items
                .entry(format!("{p}/"))
                .or_insert(Item::Dir { mode: 0o755, uid: 0 });
            parent = p;
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    for (path, item) in &items {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(mtime);
        h.set_username("root")?;
        h.set_groupname("root")?;
        h.set_gid(0);
        match item {
            Item::Dir { mode, uid } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid);
                if *uid != 0 {
                    h.set_username("")?;
                    h.set_groupname("")?;
                    h.set_gid(*uid);
                }
                h.set_size(0);
                h.set_path(path)?;
                h.set_cksum();
                builder.append(&h, io::empty())?;
            }
            Item::File(e) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(e.mode);
                h.set_uid(e.uid);
                h.set_size(e.data.len() as u64);
                h.set_path(path)?;
                h.set_cksum();
                builder.append(&h, e.data.as_slice())?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// gzip with the fixed header described above.
pub fn gzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::with_capacity(bytes.len() / 2), Compression::new(6));
    enc.write_all(bytes)?;
    enc.finish()
}

/// A deterministic `.tar.gz` of these entries.
pub fn tar_gz(entries: &[Entry], dirs: &[Dir], mtime: u64) -> Result<Vec<u8>, PackageError> {
    Ok(gzip(&tar_bytes(entries, dirs, mtime)?)?)
}

fn check_path(p: &str) -> Result<(), PackageError> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c == ".." || c == ".")
        || p.contains('\\')
        || p.len() > 99;
    if bad {
        Err(PackageError::BadPath(p.to_string()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn same_entries_same_bytes_in_any_order() {
        let a = vec![
            Entry::file("bin/tool", b"\x7fELF".to_vec(), true),
            Entry::file("LICENSE", b"license".to_vec(), false),
        ];
        let mut b = a.clone();
        b.reverse();
        let x = tar_gz(&a, &[], 1_700_000_000).unwrap();
        let y = tar_gz(&b, &[], 1_700_000_000).unwrap();
        assert_eq!(x, y);
        // gzip header: magic, CM=8, FLG=0 (no name), MTIME=0, XFL, OS=255.
        assert_eq!(&x[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&x[4..8], &[0, 0, 0, 0]);
        assert_eq!(x[9], 255);

        let mut tar_data = Vec::new();
        flate2::read::GzDecoder::new(x.as_slice())
            .read_to_end(&mut tar_data)
            .unwrap();
        let mut ar = tar::Archive::new(tar_data.as_slice());
        let listed: Vec<(String, u32, u64, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                ("LICENSE".into(), 0o644, 0, 1_700_000_000),
                ("bin/".into(), 0o755, 0, 1_700_000_000),
                ("bin/tool".into(), 0o755, 0, 1_700_000_000),
            ]
        );
    }

    #[test]
    fn refuses_bad_and_duplicate_paths() {
        assert!(tar_gz(&[Entry::file("../x", vec![], false)], &[], 0).is_err());
        assert!(tar_gz(&[Entry::file("/x", vec![], false)], &[], 0).is_err());
        let dup = vec![Entry::file("a", vec![], false), Entry::file("a", vec![1], false)];
        assert!(matches!(tar_gz(&dup, &[], 0), Err(PackageError::Duplicate(_))));
    }
}
