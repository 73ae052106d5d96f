//! Library part of the edge agent (shared by the `nkudo-edge` binary and the integration tests).
//!
//! * [`provider`] (Cloud Hypervisor) and [`netbird`]: the host integrations.
//! * [`cli`]: flags, environment and config file; [`enroll`], [`agent`] (`run`), [`apply`], [`hostfacts`]: the
//!   subcommands; [`executor`], [`spool`], [`state`], [`pki`], [`client`]: what they are built from.

pub mod netbird;
pub mod provider;

pub mod agent;
pub mod apply;
pub mod backend;
pub mod cli;
pub mod client;
pub mod enroll;
pub mod executor;
pub mod fsutil;
pub mod hostfacts;
pub mod logging;
pub mod mesh;
pub mod pki;
pub mod spool;
pub mod state;
pub mod update;
pub mod vm;

/// Exit codes of `nkudo-edge` (also in `--help`).
pub const EXIT_OK: i32 = 0;
/// An action failed, the control plane refused a request, or a local error.
pub const EXIT_FAILURE: i32 = 1;
/// Bad flags, environment or config file.
pub const EXIT_USAGE: i32 = 2;
/// No identity in the state directory: run `enroll` first.
pub const EXIT_NOT_ENROLLED: i32 = 3;
/// The control plane revoked or no longer knows this agent.
pub const EXIT_REVOKED: i32 = 4;
/// The control plane could not be reached.
pub const EXIT_UNREACHABLE: i32 = 5;
/// Restart requested (self-update in exit mode): the service manager starts `<root>/current` again.
pub const EXIT_RESTART: i32 = update::restart::EXIT_RESTART;

/// An error that ends the process with `code`.
#[derive(Debug, Clone)]
pub struct ExitError {
    pub code: i32,
    pub message: String,
}

impl ExitError {
    pub fn new(code: i32, message: impl Into<String>) -> ExitError {
        ExitError {
            code,
            message: message.into(),
        }
    }
    pub fn usage(message: impl std::fmt::Display) -> ExitError {
        ExitError::new(EXIT_USAGE, message.to_string())
    }
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitError {}
