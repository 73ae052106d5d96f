//! The static cross build: `cargo zigbuild --profile <profile> --target <triple>... -p <crates> --bins`, one
//! invocation per profile: the edge agent builds alone under `dist-edge` (optimised for size: it ships to every
//! host), so that the control plane's dependency features (tokio "full", the HTTP server) stay out of it.
//!
//! Zig (`ziglang` from PyPI, driven by `cargo-zigbuild`) is the C cross compiler and linker for both musl
//! targets: it ships musl headers and libc for every architecture, so the C in our dependencies (ring,
//! libsqlite3-sys bundled) builds for aarch64 on this x86_64 machine with nothing else installed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The targets `dist` builds by default, with their `linux-<arch>` names (Go/OCI architecture names).
pub const DEFAULT_TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

/// The binaries released, with their packages.
pub const BINARIES: [(&str, &str); 3] = [
    ("nkudo-edge", "nkudo-edge"),
    ("nkudo-control-plane", "nkudo-control-plane"),
    ("releaser", "nkudo-releaser"),
];

/// The cargo profile of release builds (`[profile.dist]`: release with symbols stripped).
pub const PROFILE: &str = "dist";

/// The cargo profile of the edge agent (`[profile.dist-edge]`: `dist` optimised for size).
pub const EDGE_PROFILE: &str = "dist-edge";

/// The profile a released binary is built with.
pub fn profile_of(binary: &str) -> &'static str {
    if binary == "nkudo-edge" {
        EDGE_PROFILE
    } else {
        PROFILE
    }
}

/// `amd64` / `arm64` for a target triple.
pub fn arch_of(triple: &str) -> Option<&'static str> {
    match triple.split('-').next()? {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        _ => None,
    }
}

/// What a build needs.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub workspace: PathBuf,
    pub targets: Vec<String>,
    pub version: String,
    pub git_commit: String,
    /// RFC 3339.
    pub build_date: String,
    pub source_date_epoch: u64,
    /// `cargo` (or `$CARGO`).
    pub cargo: OsString,
}

/// Errors of the build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unsupported target {0} (supported: x86_64/aarch64 linux musl)")]
    UnsupportedTarget(String),
    #[error("could not start {program}: {reason} (cargo-zigbuild and ziglang: `pip install cargo-zigbuild ziglang`)")]
    Spawn { program: String, reason: String },
    #[error("`{0}` failed: {1}")]
    Failed(String, String),
}

impl BuildRequest {
    /// The cargo commands (one per profile), with the build-info environment set.
    pub fn commands(&self) -> Result<Vec<Command>, BuildError> {
        for t in &self.targets {
            if arch_of(t).is_none() || !t.ends_with("-linux-musl") {
                return Err(BuildError::UnsupportedTarget(t.clone()));
            }
        }
        let mut commands = Vec::new();
        for profile in [PROFILE, EDGE_PROFILE] {
            let packages: Vec<&str> = BINARIES
                .iter()
                .filter(|(bin, _)| profile_of(bin) == profile)
                .map(|(_, package)| *package)
                .collect();
            if packages.is_empty() {
                continue;
            }
            let mut cmd = Command::new(&self.cargo);
            cmd.current_dir(&self.workspace)
                .args(["zigbuild", "--locked", "--profile", profile])
                .stdin(Stdio::null());
            for t in &self.targets {
                cmd.args(["--target", t]);
            }
            for package in packages {
                cmd.args(["-p", package]);
            }
            cmd.arg("--bins")
                .env("CARGO_ENCODED_RUSTFLAGS", self.rustflags())
                .env("NKUDO_VERSION", &self.version)
                .env("NKUDO_GIT_COMMIT", &self.git_commit)
                .env("NKUDO_BUILD_DATE", &self.build_date)
                .env("SOURCE_DATE_EPOCH", self.source_date_epoch.to_string());
            commands.push(cmd);
        }
        Ok(commands)
    }

    /// The rustflags of the build: the caller's (`CARGO_ENCODED_RUSTFLAGS` or `RUSTFLAGS`) plus path remapping,
    /// so that the binaries do not depend on where the workspace and `CARGO_HOME` are (panic messages of
    /// dependencies carry their source paths): builds on other machines give the same bytes.
    pub fn rustflags(&self) -> String {
        let mut flags: Vec<String> = match (std::env::var("CARGO_ENCODED_RUSTFLAGS"), std::env::var("RUSTFLAGS")) {
            (Ok(enc), _) if !enc.is_empty() => enc.split('\x1f').map(str::to_string).collect(),
            (_, Ok(plain)) => plain.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
        if let Some(home) = cargo_home {
            flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
        }
        if let Ok(ws) = std::fs::canonicalize(&self.workspace) {
            flags.push(format!("--remap-path-prefix={}=/build", ws.display()));
        }
        flags.join("\x1f")
    }

    /// Runs the builds with inherited output.
    pub fn run(&self) -> Result<(), BuildError> {
        for mut cmd in self.commands()? {
            let shown = format!(
                "{} {}",
                cmd.get_program().to_string_lossy(),
                cmd.get_args()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let status = cmd.status().map_err(|e| BuildError::Spawn {
                program: shown.clone(),
                reason: e.to_string(),
            })?;
            if !status.success() {
                return Err(BuildError::Failed(shown, status.to_string()));
            }
        }
        Ok(())
    }
}

/// Where cargo puts a built binary.
pub fn binary_path(target_dir: &Path, triple: &str, name: &str) -> PathBuf {
    target_dir.join(triple).join(profile_of(name)).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_profile_targets_and_env() {
        let req = BuildRequest {
            workspace: ".".into(),
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            version: "0.1.0".into(),
            git_commit: "abc".into(),
            build_date: "2024-01-01T00:00:00Z".into(),
            source_date_epoch: 1_704_067_200,
            cargo: "cargo".into(),
        };
        let cmds = req.commands().unwrap();
        assert_eq!(cmds.len(), 2, "one build per profile");
        let edge: Vec<String> = cmds[1].get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&edge[..4], ["zigbuild", "--locked", "--profile", "dist-edge"]);
        assert!(edge.windows(2).any(|w| w == ["-p", "nkudo-edge"]));
        assert!(
            !edge.iter().any(|a| a == "nkudo-control-plane"),
            "the edge builds alone"
        );
        let cmd = &cmds[0];
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(&args[..4], ["zigbuild", "--locked", "--profile", "dist"]);
        assert!(!args.iter().any(|a| a == "nkudo-edge"));
        assert!(args.windows(2).any(|w| w == ["--target", "aarch64-unknown-linux-musl"]));
        let envs: Vec<_> = cmd.get_envs().collect();
        assert!(envs
            .iter()
            .any(|(k, v)| *k == "NKUDO_VERSION" && v.is_some_and(|v| v == "0.1.0")));
        assert!(req.rustflags().contains("--remap-path-prefix="));
        let bad = BuildRequest {
            targets: vec!["x86_64-pc-windows-msvc".into()],
            ..req
        };
        assert!(bad.commands().is_err());
        assert_eq!(
            binary_path(Path::new("t"), "x86_64-unknown-linux-musl", "nkudo-edge"),
            Path::new("t/x86_64-unknown-linux-musl/dist-edge/nkudo-edge")
        );
        assert_eq!(arch_of("aarch64-unknown-linux-musl"), Some("arm64"));
    }
}
