//! An OCI image archive of the control plane, built without a container daemon: a `FROM scratch` image (the
//! static binary, a CA bundle, `/etc/passwd` with a non-root user, a data directory owned by it), one per
//! architecture, under a multi-arch image index, in an OCI image layout packed as a deterministic tar (what
//! `skopeo copy oci-archive:...` and `podman load` read).
//!
//! Layout of the archive: `oci-layout`, `index.json` (one entry: the multi-arch index, tagged with the
//! version), `blobs/sha256/<digest>` (the index, a manifest, a config and a gzip layer per architecture).
//! Every JSON blob is canonical (sorted keys, compact), every tar deterministic, so the archive is reproducible.

use crate::manifest::canonical_json_compact;
use crate::package::{self, Dir, Entry, PackageError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The unprivileged user the image runs as (distroless' "nonroot" id).
pub const IMAGE_UID: u64 = 65532;
/// The port the control plane listens on in the image.
pub const IMAGE_PORT: u16 = 8443;
const BINARY_PATH: &str = "usr/local/bin/nkudo-control-plane";
const DATA_DIR: &str = "var/lib/nkudo";

/// One architecture's image input.
pub struct ImageInput<'a> {
    /// OCI architecture name: `amd64` or `arm64`.
    pub arch: &'a str,
    /// The static control-plane binary for it.
    pub binary: &'a [u8],
}

/// What every image of the archive shares.
pub struct ImageParams<'a> {
    pub version: &'a str,
    pub git_commit: &'a str,
    /// RFC 3339 (from SOURCE_DATE_EPOCH).
    pub created: &'a str,
    /// SOURCE_DATE_EPOCH, the mtime of every tar entry.
    pub mtime: u64,
    /// PEM CA bundle copied to /etc/ssl/certs/ca-certificates.crt.
    pub ca_bundle: &'a [u8],
    pub source_url: &'a str,
}

/// The tag in `index.json` (`org.opencontainers.image.ref.name`): the version with `+` (not allowed in tags)
/// replaced by `_`, as Helm and others do.
pub fn tag_for(version: &str) -> String {
    version.replace('+', "_")
}

struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Blob {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            bytes,
        }
    }
    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// Builds the archive bytes.
pub fn build_archive(images: &[ImageInput<'_>], p: &ImageParams<'_>) -> Result<Vec<u8>, PackageError> {
    let labels = json!({
        "org.opencontainers.image.title": "nkudo-control-plane",
        "org.opencontainers.image.description": "n-kudo control plane",
        "org.opencontainers.image.version": p.version,
        "org.opencontainers.image.revision": p.git_commit,
        "org.opencontainers.image.created": p.created,
        "org.opencontainers.image.source": p.source_url,
        "org.opencontainers.image.licenses": "Apache-2.0",
    });
    let mut blobs: Vec<Blob> = Vec::new();
    let mut manifest_descriptors = Vec::new();
    for img in images {
        let layer_tar = layer_tar(img.binary, p)?;
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&layer_tar)));
        let layer = Blob::new(package::gzip(&layer_tar)?);
        let config = json!({
            "architecture": img.arch,
            "os": "linux",
            "created": p.created,
            "author": "n-kudo releaser",
            "config": {
                "User": format!("{IMAGE_UID}:{IMAGE_UID}"),
                "ExposedPorts": {format!("{IMAGE_PORT}/tcp"): {}},
                "Env": [
                    "PATH=/usr/local/bin",
                    "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                    format!("NKUDO_DATA_DIR=/{DATA_DIR}"),
                    format!("CONTROL_PLANE_ADDR=0.0.0.0:{IMAGE_PORT}"),
                ],
                "Entrypoint": [format!("/{BINARY_PATH}")],
                "Cmd": ["serve"],
                "WorkingDir": format!("/{DATA_DIR}"),
                "Volumes": {format!("/{DATA_DIR}"): {}},
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": p.created, "created_by": "releaser: static binary, CA bundle, passwd (no daemon)"}],
        });
        let mut platform = json!({"architecture": img.arch, "os": "linux"});
        if img.arch == "arm64" {
            platform["variant"] = json!("v8");
        }
        let config = Blob::new(canonical_json_compact(&config).into_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config.descriptor(MT_CONFIG),
            "layers": [layer.descriptor(MT_LAYER_GZIP)],
            "annotations": labels,
        });
        let manifest = Blob::new(canonical_json_compact(&manifest).into_bytes());
        let mut desc = manifest.descriptor(MT_MANIFEST);
        desc["platform"] = platform;
        manifest_descriptors.push(desc);
        blobs.extend([layer, config, manifest]);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": manifest_descriptors,
        "annotations": labels,
    });
    let index = Blob::new(canonical_json_compact(&index).into_bytes());
    let mut top_desc = index.descriptor(MT_INDEX);
    top_desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag_for(p.version)});
    let top = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [top_desc]});
    blobs.push(index);

    let mut entries = vec![
        Entry::file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(), false),
        Entry::file("index.json", canonical_json_compact(&top).into_bytes(), false),
    ];
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    blobs.dedup_by(|a, b| a.digest == b.digest);
    for b in blobs {
        let hex = b.digest.trim_start_matches("sha256:").to_string();
        entries.push(Entry::file(format!("blobs/sha256/{hex}"), b.bytes, false));
    }
    package::tar_bytes(&entries, &[], p.mtime)
}

fn layer_tar(binary: &[u8], p: &ImageParams<'_>) -> Result<Vec<u8>, PackageError> {
    let passwd = format!(
        "root:x:0:0:root:/root:/sbin/nologin\nnkudo:x:{IMAGE_UID}:{IMAGE_UID}:n-kudo:/{DATA_DIR}:/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nnkudo:x:{IMAGE_UID}:\n");
    let entries = vec![
        Entry::file("etc/passwd", passwd.into_bytes(), false),
        Entry::file("etc/group", group.into_bytes(), false),
        Entry::file("etc/ssl/certs/ca-certificates.crt", p.ca_bundle.to_vec(), false),
        Entry::file(BINARY_PATH, binary.to_vec(), true),
    ];
    let dirs = vec![
        Dir {
            path: DATA_DIR.into(),
            mode: 0o750,
            uid: IMAGE_UID,
        },
        Dir {
            path: "tmp".into(),
            mode: 0o1777,
            uid: 0,
        },
    ];
    package::tar_bytes(&entries, &dirs, p.mtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn params() -> ImageParams<'static> {
        ImageParams {
            version: "0.1.0-pre.2+abc1234",
            git_commit: "abc1234",
            created: "2024-01-01T00:00:00Z",
            mtime: 1_704_067_200,
            ca_bundle: b"-----BEGIN CERTIFICATE-----\n",
            source_url: "https://example.invalid/n-kudo",
        }
    }

    #[test]
    fn archive_is_reproducible_and_well_formed() {
        let imgs = [
            ImageInput {
                arch: "amd64",
                binary: b"amd64-binary",
            },
            ImageInput {
                arch: "arm64",
                binary: b"arm64-binary",
            },
        ];
        let a = build_archive(&imgs, &params()).unwrap();
        let b = build_archive(&imgs, &params()).unwrap();
        assert_eq!(a, b);
        let mut ar = tar::Archive::new(a.as_slice());
        let mut files = std::collections::BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            files.insert(path, data);
        }
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "0.1.0-pre.2_abc1234"
        );
        // Every blob's name is its digest.
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                if !hex.is_empty() {
                    assert_eq!(hex, hex::encode(Sha256::digest(data)));
                }
            }
        }
        let inner_digest = index["manifests"][0]["digest"].as_str().unwrap();
        let inner: Value = serde_json::from_slice(&files[&format!("blobs/sha256/{}", &inner_digest[7..])]).unwrap();
        let archs: Vec<&str> = inner["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["platform"]["architecture"].as_str().unwrap())
            .collect();
        assert_eq!(archs, ["amd64", "arm64"]);
    }
}
