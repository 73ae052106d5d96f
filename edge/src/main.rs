//! `nkudo-edge`: the n-kudo edge agent.
//!
//! For now only the command-line skeleton exists: enrollment, heartbeats, plans and self-update arrive with the
//! edge agent issue. Nothing here pretends to do them.

use clap::{Parser, Subcommand};

/// The n-kudo edge agent. Enrollment, heartbeats over mTLS, microVM plans and self-update are later issues;
/// so far only `--version` and `version` exist.
#[derive(Debug, Parser)]
#[command(name = "nkudo-edge", version, about, long_about, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the agent's version (the same as `--version`).
    Version,
}

fn version_line() -> String {
    format!("nkudo-edge {}", env!("CARGO_PKG_VERSION"))
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("{}", version_line()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn version_subcommand_matches_flag() {
        let flag = Cli::command().render_version();
        assert_eq!(flag.trim(), version_line());
    }
}
