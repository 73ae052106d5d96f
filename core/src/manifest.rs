//! The release manifest (`manifest.json`): one signed document binding version, channel, commit, expiry and the
//! hash and size of every artifact (the TUF "targets" role, in small).
//!
//! Serialization is canonical so that its bytes (and so its signature) are stable: object keys sorted by
//! byte order, two-space indentation, `\n` line ends and a final newline, no floats (sizes are integers),
//! strings escaped by serde_json. [`canonical_json`] applies the same rules to any `serde_json::Value`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// The product name in every manifest.
pub const PRODUCT: &str = "n-kudo";

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub product: String,
    /// SemVer without a leading `v` (`0.3.0`, `0.3.0-pre.4+abc1234`).
    pub version: String,
    /// `pre-release` or `release`.
    pub channel: String,
    pub git_commit: String,
    /// RFC 3339 UTC, from SOURCE_DATE_EPOCH.
    pub build_date: String,
    /// RFC 3339 UTC: agents refuse the manifest after this instant (freeze attacks).
    pub expires: String,
    /// The oldest agent version that the control plane of this release supports (N/N-1 rule).
    pub minimum_supported_agent_version: String,
    pub artifacts: Vec<Artifact>,
    /// Set by `releaser promote`: the version (a pre-release, or for a rollback an earlier release) whose
    /// artifacts this release republishes byte for byte. Absent in manifests `releaser dist` writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<String>,
    /// Set by `releaser promote --rollback`: the release this one undoes. Its artifacts are the older, known-good
    /// ones of `promoted_from`, published under a higher version so that every agent moves to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<String>,
}

/// One file of the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name in the release directory.
    pub name: String,
    /// `nkudo-edge`, `nkudo-control-plane` or `releaser`.
    pub component: String,
    /// `tarball` or `oci-image`.
    pub kind: String,
    pub os: String,
    /// `amd64`, `arm64`, or `multi` for a multi-arch OCI image.
    pub arch: String,
    pub size: u64,
    pub sha256: String,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid manifest JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported schema_version {0} (this build reads {SCHEMA_VERSION})")]
    Schema(u32),
}

impl Manifest {
    /// The canonical bytes (what is signed).
    pub fn to_canonical_json(&self) -> String {
        canonical_json(&serde_json::to_value(self).expect("a manifest always serializes"))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.schema_version != SCHEMA_VERSION {
            return Err(ManifestError::Schema(m.schema_version));
        }
        Ok(m)
    }
}

/// Canonical pretty JSON: sorted keys, two-space indent, final newline.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0, true);
    out.push('\n');
    out
}

/// Canonical compact JSON (sorted keys, no whitespace): for OCI blobs.
pub fn canonical_json_compact(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0, false);
    out
}

fn write_value(out: &mut String, value: &Value, depth: usize, pretty: bool) {
    let newline = |out: &mut String, depth: usize| {
        if pretty {
            out.push('\n');
            for _ in 0..depth {
                out.push_str("  ");
            }
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if pretty {
                    out.push(' ');
                }
                write_value(out, &map[*k], depth + 1, pretty);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, depth + 1);
                write_value(out, v, depth + 1, pretty);
            }
            newline(out, depth);
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_is_sorted_and_stable() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": "x", "c": null}], "e": {}}, "s": "tab\t\"q\""});
        assert_eq!(
            canonical_json_compact(&v),
            r#"{"a":{"e":{},"z":[1,{"c":null,"y":"x"}]},"b":1,"s":"tab\t\"q\""}"#
        );
        let pretty = canonical_json(&v);
        assert!(pretty.starts_with("{\n  \"a\": {\n    \"e\": {},\n"));
        assert!(pretty.ends_with("}\n"));
        let back: Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn manifest_round_trip() {
        let m = Manifest {
            schema_version: SCHEMA_VERSION,
            product: PRODUCT.into(),
            version: "0.1.0-pre.3+abc1234".into(),
            channel: "pre-release".into(),
            git_commit: "abc1234".into(),
            build_date: "2024-01-01T00:00:00Z".into(),
            expires: "2024-03-31T00:00:00Z".into(),
            minimum_supported_agent_version: "0.0.0".into(),
            artifacts: vec![Artifact {
                name: "x.tar.gz".into(),
                component: "nkudo-edge".into(),
                kind: "tarball".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                size: 3,
                sha256: "00".into(),
            }],
            promoted_from: None,
            rollback_of: None,
        };
        let text = m.to_canonical_json();
        assert_eq!(Manifest::from_json(text.as_bytes()).unwrap(), m);
        assert_eq!(Manifest::from_json(text.as_bytes()).unwrap().to_canonical_json(), text);
        assert!(!text.contains("promoted_from") && !text.contains("rollback_of"));
        let mut promoted = m.clone();
        promoted.promoted_from = Some("0.1.0-pre.3+abc1234".into());
        promoted.rollback_of = Some("0.1.1".into());
        let ptext = promoted.to_canonical_json();
        assert!(ptext.contains("\"promoted_from\": \"0.1.0-pre.3+abc1234\""));
        assert_eq!(Manifest::from_json(ptext.as_bytes()).unwrap(), promoted);
        let bad = text.replace("\"schema_version\": 1", "\"schema_version\": 9");
        assert!(matches!(
            Manifest::from_json(bad.as_bytes()),
            Err(ManifestError::Schema(9))
        ));
    }
}
