//! `nkudo-edge`: the n-kudo edge agent (see `nkudo-edge --help`; the work is done in the `nkudo_edge` library).

use clap::Parser;
use nkudo_edge::cli::{self, Cli, Command};
use nkudo_edge::{agent, apply, enroll, hostfacts, ExitError, EXIT_FAILURE};
use std::process::ExitCode;

/// Prints version, git commit, target triple and build date.
fn print_version() {
    println!("{}", nkudo_core::build_info::version_text("nkudo-edge"));
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ExitError::new(EXIT_FAILURE, format!("start async runtime: {e}")))
}

fn real_main(cli: Cli) -> Result<(), ExitError> {
    if let Command::Version = cli.command {
        print_version();
        return Ok(());
    }
    if let Command::UpdateWatch(a) = cli.command {
        return nkudo_edge::update::watch::watch(a);
    }
    let file = cli::load_config(cli.config.as_deref()).map_err(ExitError::usage)?;
    match cli.command {
        Command::Version | Command::UpdateWatch(_) => Ok(()),
        Command::Enroll(a) => {
            let token = cli::resolve_token(&a, &file).map_err(ExitError::usage)?;
            let input = enroll::EnrollInput {
                conn: cli::ConnSettings::resolve(&a.conn, &file),
                dirs: cli::Dirs::resolve(&a.dirs, &file),
                token,
                hostname: a
                    .hostname
                    .clone()
                    .or_else(|| file.hostname.clone())
                    .filter(|h| !h.trim().is_empty())
                    .unwrap_or_else(hostfacts::hostname),
                force: a.force,
            };
            runtime()?.block_on(enroll::enroll(input))
        }
        Command::Run(a) => {
            let s = cli::RunSettings::resolve(&a, &file).map_err(ExitError::usage)?;
            runtime()?.block_on(agent::run(s))
        }
        Command::VerifyHeartbeat(mut a) => {
            a.once = true;
            let s = cli::RunSettings::resolve(&a, &file).map_err(ExitError::usage)?;
            runtime()?.block_on(agent::run(s))
        }
        Command::Hostfacts(a) => {
            let p = cli::ProviderSettings::resolve(&a.provider, &file);
            let nb_bin = a
                .netbird_bin
                .clone()
                .or_else(|| file.netbird.bin.clone())
                .unwrap_or_else(|| "netbird".into());
            let facts = hostfacts::collect_with_versions(&p, &nb_bin);
            let json = serde_json::to_string_pretty(&facts).map_err(|e| ExitError::new(EXIT_FAILURE, e.to_string()))?;
            println!("{json}");
            Ok(())
        }
        Command::Apply(a) => {
            let p = cli::ProviderSettings::resolve(&a.provider, &file);
            let state_dir = a
                .state_dir
                .clone()
                .or_else(|| file.state_dir.clone())
                .unwrap_or_else(|| cli::DEFAULT_STATE_DIR.into());
            runtime()?.block_on(apply::apply(&a.plan, &state_dir, &p))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nkudo-edge: {e}");
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}
