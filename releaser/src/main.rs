//! `releaser`: the n-kudo release captain's tool.
//!
//! For now only the command-line skeleton exists: build, package, sign, verify, promote, install and rollout
//! arrive with their issues. Nothing here pretends to do them.

use clap::Parser;

/// The n-kudo release captain's tool. Build, package, sign, verify, promote and rollout are later issues;
/// so far only `--version` exists.
#[derive(Debug, Parser)]
#[command(name = "releaser", version, about, long_about, arg_required_else_help = true)]
struct Cli {}

fn main() {
    // With no arguments clap prints the help and exits 2; `--version` and `--help` exit 0. No command exists yet.
    let _cli = Cli::parse();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
