//! What every n-kudo binary says about its own build: version, git commit, build date and target triple.
//!
//! The values are fixed at compile time. `cargo xtask dist` (through `releaser dist`) sets them:
//!
//! | variable | meaning | without it |
//! |---|---|---|
//! | `NKUDO_VERSION` | the release version computed from git (`0.3.0`, `0.3.1-pre.4+abc1234`) | `CARGO_PKG_VERSION` |
//! | `NKUDO_GIT_COMMIT` | the full commit hash | `unknown` |
//! | `NKUDO_BUILD_DATE` | RFC 3339 UTC from `SOURCE_DATE_EPOCH`, so rebuilds are byte-identical | `unknown` |
//!
//! The target triple comes from `core/build.rs` (cargo's `TARGET`). Use [`version_text`] for a `version`
//! subcommand and [`clap_version`] for clap's `--version`, so both print the same lines:
//!
//! ```text
//! nkudo-edge 0.3.1-pre.4+abc1234
//! commit: abc1234def...
//! target: aarch64-unknown-linux-musl
//! built: 2024-05-01T12:00:00Z
//! ```

/// The version of this build (`NKUDO_VERSION` at compile time, or the crate version).
pub const VERSION: &str = match option_env!("NKUDO_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The full git commit this build was made from, or `unknown`.
pub const GIT_COMMIT: &str = match option_env!("NKUDO_GIT_COMMIT") {
    Some(v) => v,
    None => "unknown",
};

/// The build date, RFC 3339 UTC derived from `SOURCE_DATE_EPOCH` (never the wall clock), or `unknown`.
pub const BUILD_DATE: &str = match option_env!("NKUDO_BUILD_DATE") {
    Some(v) => v,
    None => "unknown",
};

/// The target triple this binary was compiled for (`x86_64-unknown-linux-musl`, ...).
pub const TARGET: &str = env!("NKUDO_TARGET");

/// Everything above, as one value (for JSON output, metrics labels, heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BuildInfo {
    pub version: &'static str,
    pub git_commit: &'static str,
    pub build_date: &'static str,
    pub target: &'static str,
}

/// This build's [`BuildInfo`].
pub const BUILD_INFO: BuildInfo = BuildInfo {
    version: VERSION,
    git_commit: GIT_COMMIT,
    build_date: BUILD_DATE,
    target: TARGET,
};

/// The text after the binary name in `--version` (clap prints `<name> <this>`): the version on the first line,
/// then `commit:`, `target:` and `built:` lines.
pub fn clap_version() -> &'static str {
    // Computed once: clap wants a `&'static str` (or a `Str`), and the text never changes.
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| format!("{}\n{}", reported(), detail_lines()))
}

/// The multi-line `version` text for the binary `name`, ending without a newline:
/// `<name> <version>`, `commit: ...`, `target: ...`, `built: ...`.
pub fn version_text(name: &str) -> String {
    format!("{name} {}\n{}", reported(), detail_lines())
}

/// The version this binary reports: the one it was installed as when it runs from a host layout's release
/// directory (see [`crate::installed`]), else [`VERSION`].
pub fn reported() -> &'static str {
    #[cfg(unix)]
    {
        crate::installed::reported_version().version.as_str()
    }
    #[cfg(not(unix))]
    {
        VERSION
    }
}

fn detail_lines() -> String {
    // A promoted release runs the pre-release's bytes: say what it was built as.
    let build = if reported() != VERSION {
        format!("build: {VERSION}\n")
    } else {
        String::new()
    };
    format!("{build}commit: {GIT_COMMIT}\ntarget: {TARGET}\nbuilt: {BUILD_DATE}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text_has_every_field() {
        let text = version_text("nkudo-edge");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], format!("nkudo-edge {VERSION}"));
        assert!(lines[1].starts_with("commit: "));
        assert_eq!(lines[2], format!("target: {TARGET}"));
        assert!(lines[3].starts_with("built: "));
        assert!(!TARGET.is_empty() && TARGET != "unknown");
    }

    #[test]
    fn clap_version_matches_version_text() {
        assert_eq!(format!("nkudo-edge {}", clap_version()), version_text("nkudo-edge"));
    }
}
