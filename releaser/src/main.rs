//! `releaser`: the n-kudo release captain's tool. A thin CLI over the `releaser` library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nkudo_core::build_info;
use nkudo_core::fsutil;
use nkudo_core::layout::{Activation, InstallOutcome, Layout};
use nkudo_core::version::display;
use releaser::minisign::{KeyProtection, PublicKey, SecretKey, DEFAULT_MEMLIMIT, DEFAULT_OPSLIMIT};
use releaser::{cross, dist, verify, version};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod publish;

/// Environment variable holding a whole secret key file (for CI, with an unencrypted key in a secret).
const ENV_KEY: &str = "NKUDO_SIGNING_KEY";
/// Environment variable naming a secret key file.
const ENV_KEY_FILE: &str = "NKUDO_SIGNING_KEY_FILE";
/// Environment variable holding the secret key's passphrase (else it is asked on the terminal).
const ENV_PASSPHRASE: &str = "NKUDO_SIGNING_KEY_PASSPHRASE";

/// Exit status: verification found a problem (a file, its reason).
const EXIT_VERIFY_FAILED: u8 = 3;

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (bad input, I/O, build failure, wrong passphrase)
  2  usage error (bad arguments)
  1  also: `lint-deploy` found a floating reference
  3  verification failed (`verify`: a tampered file, another key, an expired manifest, a missing file;
     `publish`: the local check of the directory, before anything is sent)
  `rollout status --wait`: 0 completed, 3 rolled back, 4 aborted, 5 gate timeout; `rollout plan|start`: 2 for
     an invalid policy file

Signing keys: --key FILE, or $NKUDO_SIGNING_KEY_FILE, or the key file's content in $NKUDO_SIGNING_KEY (CI).
An encrypted key's passphrase comes from $NKUDO_SIGNING_KEY_PASSPHRASE or is asked on the terminal. Key
material is never printed.";

/// The n-kudo release captain's tool: cross-build static binaries, package them, write SHA256SUMS and a
/// manifest, sign everything in minisign format, and verify a release directory.
///
/// `cargo xtask dist` runs `releaser dist`. Outputs are reproducible: the same commit, SOURCE_DATE_EPOCH and key
/// give byte-identical files (Ed25519 signatures are deterministic; no wall clock is recorded).
#[derive(Debug, Parser)]
#[command(
    name = "releaser",
    version = build_info::clap_version(),
    about,
    long_about,
    after_help = AFTER_HELP,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print this binary's version, commit, target and build date (the same as --version).
    Version(OutputArg),
    /// Print the release version git gives for HEAD (`vX.Y.Z` tag, else `{base}-pre.{count}+{sha}`).
    GitVersion(GitVersionArgs),
    /// Write a new minisign key pair: <name>.key (secret, mode 0600) and <name>.pub.
    Keygen(KeygenArgs),
    /// Sign files: writes <file>.minisig (minisign ED) next to each.
    Sign(SignArgs),
    /// Cross-build the static musl binaries (cargo zigbuild --profile dist).
    Build(BuildArgs),
    /// Package built binaries: tarballs, OCI archive, manifest.json, SHA256SUMS, signatures, public key.
    Package(PackageArgs),
    /// Build, then package: the whole release directory.
    Dist(DistArgs),
    /// Verify a release directory: every signature, size, SHA-256 and the manifest's expiry.
    Verify(VerifyArgs),
    /// Promote a verified pre-release directory to a release (or, with --rollback, republish an older known-good
    /// release under a new patch version): byte-identical artifacts, a new signed manifest, no rebuild.
    Promote(PromoteArgs),
    /// Find floating image/version references (`:latest`, pre-latest, `-pre.`, bare commit shas, unpinned images)
    /// in compose files, Kubernetes manifests, systemd units and env files. Exit 1 when any is found.
    LintDeploy(LintDeployArgs),
    /// Verify a release (directory or tarball) FIRST, then unpack it into <root>/releases/<version> (crash-safe).
    Install(InstallArgs),
    /// Point <root>/current at an installed version (previous keeps the old one).
    Activate(ActivateArgs),
    /// Point <root>/current back at previous (this host). With --to <version>: the fleet rollback (see
    /// `releaser fleet-rollback --help`).
    Rollback(RollbackArgs),
    /// The installed versions, and which are current and previous.
    List(ListArgs),
    /// Remove old releases, keeping the newest --keep (never current or previous).
    Prune(PruneArgs),
    /// Before upgrading a control plane: which enrolled agents would it no longer support (N/N-1 rule)? Reads
    /// the whole fleet (`GET /admin/agents`, admin key) or one tenant (`--tenant`, `GET /tenants/{id}/agents`);
    /// exit 1 when any active agent would be unsupported.
    CheckCompat(CheckCompatArgs),
    /// Register a release directory with a control plane's release registry (admin key): checks it locally,
    /// posts the signed manifest, uploads the artifacts it does not hold yet (or registers --external-base-url).
    Publish(PublishArgs),
    /// Rollouts on a control plane (admin key): plan, start, status (--watch, --wait), pause, resume, approve, abort.
    #[command(subcommand)]
    Rollout(releaser::rollout::RolloutCommand),
    /// Send the whole fleet (--fleet) or a selection (--tenant/--site/--ring/--agent) to a version, as a signed
    /// rollback target (admin key). `releaser rollback --to <version> ...` runs this too.
    FleetRollback(releaser::rollout::RollbackArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct OutputArg {
    /// Output format (json for machines).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
struct GitVersionArgs {
    /// The repository (default: the current directory).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Directory for the key files.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Base name of the key files.
    #[arg(long, default_value = "nkudo-release")]
    name: String,
    /// Store the secret key unencrypted (minisign -W), e.g. for a CI secret variable.
    #[arg(long)]
    unencrypted: bool,
    /// Overwrite existing key files.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct KeyArg {
    /// The secret key file (else $NKUDO_SIGNING_KEY_FILE or $NKUDO_SIGNING_KEY).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SignArgs {
    #[command(flatten)]
    key: KeyArg,
    /// Trusted comment (signed). Default: `file:<name>\thashed`.
    #[arg(long)]
    trusted_comment: Option<String>,
    /// Files to sign.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct ReleaseArgs {
    /// The workspace root (default: the current directory).
    #[arg(long, default_value = ".")]
    workspace: PathBuf,
    /// Target triples (repeatable; default: x86_64 and aarch64 linux musl).
    #[arg(long = "target", value_name = "TRIPLE")]
    targets: Vec<String>,
    /// Cargo target directory (default: $CARGO_TARGET_DIR or <workspace>/target).
    #[arg(long)]
    target_dir: Option<PathBuf>,
    /// Release version instead of the one computed from git (SemVer, with or without a leading v).
    #[arg(long = "version", value_name = "VERSION")]
    release_version: Option<String>,
    /// Git commit recorded instead of HEAD's.
    #[arg(long)]
    git_commit: Option<String>,
    /// Build time (Unix seconds; default $SOURCE_DATE_EPOCH, else HEAD's commit time).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: Option<u64>,
}

#[derive(Debug, Args)]
struct BuildArgs {
    #[command(flatten)]
    release: ReleaseArgs,
}

#[derive(Debug, Args)]
struct PackageOpts {
    /// Output directory (replaced as a whole).
    #[arg(long, default_value = "dist")]
    out: PathBuf,
    /// Days the manifest stays valid after the build date.
    #[arg(long, default_value_t = dist::DEFAULT_EXPIRY_DAYS)]
    expires_in_days: u32,
    /// CA bundle copied into the OCI image.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    ca_bundle: PathBuf,
    #[command(flatten)]
    key: KeyArg,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct PackageArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    #[command(flatten)]
    opts: PackageOpts,
}

#[derive(Debug, Args)]
struct DistArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    #[command(flatten)]
    opts: PackageOpts,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The release directory.
    dir: PathBuf,
    /// The trusted public key file (minisign format). Never taken from the directory itself.
    #[arg(long, value_name = "FILE", required_unless_present = "public_key_string")]
    public_key: Option<PathBuf>,
    /// The trusted public key as its base64 line (`RWQ...`, what `minisign -P` takes).
    #[arg(long, value_name = "BASE64", conflicts_with = "public_key")]
    public_key_string: Option<String>,
    /// Check the expiry at this RFC 3339 time instead of now.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct TrustedKeyArgs {
    /// The trusted public key file (minisign format). Never taken from the directory itself.
    #[arg(long, value_name = "FILE", required_unless_present = "public_key_string")]
    public_key: Option<PathBuf>,
    /// The trusted public key as its base64 line (`RWQ...`, what `minisign -P` takes).
    #[arg(long, value_name = "BASE64", conflicts_with = "public_key")]
    public_key_string: Option<String>,
}

#[derive(Debug, Args)]
struct PromoteArgs {
    /// The pre-release directory (`releaser dist` output); with --rollback, an older release directory.
    from: PathBuf,
    /// The release version (vX.Y.Z): greater than the latest release.
    #[arg(long, value_name = "VERSION")]
    to: String,
    /// Republish older known-good artifacts under --to (a patch release of the latest release); the manifest
    /// records `rollback_of: <latest release>`.
    #[arg(long)]
    rollback: bool,
    #[command(flatten)]
    trusted: TrustedKeyArgs,
    #[command(flatten)]
    key: KeyArg,
    /// The changelog that must have a `## [X.Y.Z]` (or `## vX.Y.Z`) section for the version.
    #[arg(long, default_value = "CHANGELOG.md")]
    changelog: PathBuf,
    /// The latest release so far (else read from --releases-dir; with neither, this is the first release).
    #[arg(long, value_name = "VERSION", conflicts_with = "releases_dir")]
    latest_release: Option<String>,
    /// A directory of release directories (each with a manifest.json): the highest `release` is the latest.
    #[arg(long, value_name = "DIR")]
    releases_dir: Option<PathBuf>,
    /// Output directory (must not exist; default dist-vX.Y.Z).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Days the release manifest stays valid from now.
    #[arg(long, default_value_t = dist::DEFAULT_EXPIRY_DAYS)]
    expires_in_days: u32,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct LintDeployArgs {
    /// Files and directories (walked) to check.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct RootArg {
    /// The layout root (releases/, current, previous).
    #[arg(long, default_value = nkudo_core::layout::DEFAULT_ROOT)]
    root: PathBuf,
}

#[derive(Debug, Args)]
struct RestartArg {
    /// After switching, `systemctl restart --unit` (when systemd runs this machine; else says to restart it).
    #[arg(long)]
    restart: bool,
    /// The unit --restart restarts.
    #[arg(long, default_value = "nkudo-edge.service")]
    unit: String,
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// A release directory, or a .tar.gz (with its .minisig; verified with manifest.json when beside it).
    source: PathBuf,
    #[command(flatten)]
    root: RootArg,
    #[command(flatten)]
    trusted: TrustedKeyArgs,
    /// Which component's tarball to take from a release directory.
    #[arg(long, default_value = "nkudo-edge")]
    component: String,
    /// Which architecture's tarball (default: this machine's).
    #[arg(long)]
    arch: Option<String>,
    /// Activate the version after installing it.
    #[arg(long)]
    activate: bool,
    #[command(flatten)]
    restart: RestartArg,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct ActivateArgs {
    /// The installed version (with or without a leading v).
    version: String,
    #[command(flatten)]
    root: RootArg,
    #[command(flatten)]
    restart: RestartArg,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    #[command(flatten)]
    root: RootArg,
    #[command(flatten)]
    restart: RestartArg,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    root: RootArg,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct PruneArgs {
    #[command(flatten)]
    root: RootArg,
    /// How many releases to keep (current and previous are always kept).
    #[arg(long, default_value_t = nkudo_core::layout::DEFAULT_KEEP)]
    keep: usize,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct CheckCompatArgs {
    /// The control plane version about to be deployed.
    #[arg(long, value_name = "VERSION")]
    control_plane: String,
    /// The running control plane (https://host:8443).
    #[arg(long)]
    url: String,
    /// Check one tenant's agents (`GET /tenants/{id}/agents` with --api-key) instead of the whole fleet.
    #[arg(long, value_name = "ID")]
    tenant: Option<String>,
    /// A tenant API key (`X-API-Key`), with --tenant.
    #[arg(long, env = "NKUDO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The admin key (`X-Admin-Key`): the whole fleet, every tenant (`GET /admin/agents`). The default mode.
    #[arg(long, env = "NKUDO_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// PEM CA bundle to trust for --url (the control plane's CA); else the system roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// An operator floor above the N/N-1 rule (the control plane's minimum agent version setting).
    #[arg(long, value_name = "VERSION")]
    minimum_agent_version: Option<String>,
    #[command(flatten)]
    output: OutputArg,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The release directory (`releaser dist` / `releaser promote` output).
    dir: PathBuf,
    /// The control plane (https://host:8443).
    #[arg(long)]
    url: String,
    /// The admin key (`X-Admin-Key`).
    #[arg(long, env = "NKUDO_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    /// PEM CA bundle to trust for --url (the control plane's CA); else the system roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Agents fetch the artifacts from <URL>/<artifact name> (a CDN, an object store): nothing is uploaded.
    #[arg(long, value_name = "URL")]
    external_base_url: Option<String>,
    /// Check and upload only this component's artifacts (agents only fetch their own).
    #[arg(long, value_name = "COMPONENT")]
    only_component: Option<String>,
    /// Verify the directory's signatures with this trusted public key first (as `releaser verify`); without
    /// it, only the expiry and the artifacts' sizes and SHA-256 are checked locally (the control plane checks the
    /// signature against its RELEASE_PUBLIC_KEYS in any case).
    #[arg(long, value_name = "FILE", conflicts_with = "public_key_string")]
    public_key: Option<PathBuf>,
    /// The trusted public key as its base64 line (`RWQ...`).
    #[arg(long, value_name = "BASE64")]
    public_key_string: Option<String>,
    #[command(flatten)]
    output: OutputArg,
}

/// `releaser rollback --to <version> ...` is the fleet rollback; `releaser rollback [--root ...]` the host's.
fn route_rollback(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let is_rollback = args.get(1).is_some_and(|a| a == "rollback");
    let has_to = args
        .iter()
        .skip(2)
        .any(|a| a == "--to" || a.to_string_lossy().starts_with("--to="));
    if is_rollback && has_to {
        args[1] = "fleet-rollback".into();
    }
    args
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(route_rollback(std::env::args_os().collect()));
    let result = match cli.command {
        Cmd::Version(a) => cmd_version(a),
        Cmd::GitVersion(a) => cmd_git_version(a),
        Cmd::Keygen(a) => cmd_keygen(a),
        Cmd::Sign(a) => cmd_sign(a),
        Cmd::Build(a) => cmd_build(&a.release).map(|_| ExitCode::SUCCESS),
        Cmd::Package(a) => cmd_package(&a.release, &a.opts),
        Cmd::Dist(a) => cmd_dist(a),
        Cmd::Verify(a) => cmd_verify(a),
        Cmd::Promote(a) => cmd_promote(a),
        Cmd::LintDeploy(a) => cmd_lint_deploy(a),
        Cmd::Install(a) => cmd_install(a),
        Cmd::Activate(a) => cmd_activate(a),
        Cmd::Rollback(a) => cmd_rollback(a),
        Cmd::List(a) => cmd_list(a),
        Cmd::Prune(a) => cmd_prune(a),
        Cmd::CheckCompat(a) => cmd_check_compat(a),
        Cmd::Publish(a) => cmd_publish(a),
        Cmd::Rollout(c) => releaser::rollout::run_rollout_blocking(c),
        Cmd::FleetRollback(a) => releaser::rollout::run_rollback_blocking(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<publish::LocalVerifyFailed>().is_some() => {
            eprintln!("releaser: error: {e:#}");
            ExitCode::from(EXIT_VERIFY_FAILED)
        }
        Err(e) => {
            eprintln!("releaser: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn cmd_version(a: OutputArg) -> Result<ExitCode> {
    match a.output {
        Output::Json => print_json(&build_info::BUILD_INFO)?,
        Output::Text => println!("{}", build_info::version_text("releaser")),
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_git_version(a: GitVersionArgs) -> Result<ExitCode> {
    let v = version::from_git(&a.repo)?;
    match a.output.output {
        Output::Json => print_json(&serde_json::json!({
            "version": v.version.to_string(),
            "channel": v.channel.as_str(),
            "git_commit": v.commit,
            "commit_time": v.commit_time,
            "dirty": v.dirty,
        }))?,
        Output::Text => println!("{}", v.version),
    }
    Ok(ExitCode::SUCCESS)
}

fn read_passphrase(confirm: bool) -> Result<zeroize::Zeroizing<String>> {
    if let Ok(p) = std::env::var(ENV_PASSPHRASE) {
        return Ok(zeroize::Zeroizing::new(p));
    }
    let p = zeroize::Zeroizing::new(
        rpassword::prompt_password("Passphrase for the secret key: ")
            .with_context(|| format!("reading the passphrase (no terminal? set ${ENV_PASSPHRASE})"))?,
    );
    if confirm {
        let again = zeroize::Zeroizing::new(rpassword::prompt_password("Passphrase again: ")?);
        if *again != *p {
            bail!("the passphrases differ");
        }
    }
    if p.is_empty() {
        bail!("empty passphrase (use --unencrypted for a key without one)");
    }
    Ok(p)
}

fn cmd_keygen(a: KeygenArgs) -> Result<ExitCode> {
    let sk_path = a.out_dir.join(format!("{}.key", a.name));
    let pk_path = a.out_dir.join(format!("{}.pub", a.name));
    for p in [&sk_path, &pk_path] {
        if p.exists() && !a.force {
            bail!("{} exists (use --force to overwrite)", p.display());
        }
    }
    std::fs::create_dir_all(&a.out_dir).with_context(|| format!("creating {}", a.out_dir.display()))?;
    let key = SecretKey::generate();
    let text = if a.unencrypted {
        key.to_file_text(&KeyProtection::Unencrypted)?
    } else {
        let pass = read_passphrase(true)?;
        key.to_file_text(&KeyProtection::Passphrase {
            passphrase: &pass,
            opslimit: DEFAULT_OPSLIMIT,
            memlimit: DEFAULT_MEMLIMIT,
        })?
    };
    fsutil::write_atomic(&sk_path, text.as_bytes(), 0o600).with_context(|| format!("writing {}", sk_path.display()))?;
    let pk = key.public_key();
    fsutil::write_atomic(&pk_path, pk.to_file_text().as_bytes(), 0o644)
        .with_context(|| format!("writing {}", pk_path.display()))?;
    match a.output.output {
        Output::Json => print_json(&serde_json::json!({
            "key_id": pk.key_id.to_string(),
            "public_key": pk.to_base64(),
            "secret_key_file": sk_path,
            "public_key_file": pk_path,
            "encrypted": !a.unencrypted,
        }))?,
        Output::Text => {
            println!("key id {}", pk.key_id);
            println!("secret key: {} (keep it secret)", sk_path.display());
            println!("public key: {}  ({})", pk_path.display(), pk.to_base64());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn load_key(arg: &KeyArg) -> Result<SecretKey> {
    let (text, source) = if let Some(path) = &arg.key {
        (read_key_file(path)?, path.display().to_string())
    } else if let Some(path) = std::env::var_os(ENV_KEY_FILE) {
        let path = PathBuf::from(path);
        (read_key_file(&path)?, path.display().to_string())
    } else if let Ok(text) = std::env::var(ENV_KEY) {
        (zeroize::Zeroizing::new(text), format!("${ENV_KEY}"))
    } else {
        bail!("no signing key: pass --key FILE, or set ${ENV_KEY_FILE} or ${ENV_KEY}");
    };
    let encrypted = SecretKey::file_is_encrypted(&text).with_context(|| format!("reading the key from {source}"))?;
    let pass = if encrypted { Some(read_passphrase(false)?) } else { None };
    SecretKey::from_file_text(&text, pass.as_deref().map(|s| s.as_str()))
        .with_context(|| format!("reading the key from {source}"))
}

fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<String>> {
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

fn cmd_sign(a: SignArgs) -> Result<ExitCode> {
    let key = load_key(&a.key)?;
    for file in &a.files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", file.display()))?;
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let digest = releaser::minisign::blake2b512_reader(f).with_context(|| format!("reading {}", file.display()))?;
        let tc = a
            .trusted_comment
            .clone()
            .unwrap_or_else(|| format!("file:{name}\thashed"));
        let sig = key.sign_prehashed(&digest, &tc, dist::UNTRUSTED_COMMENT)?;
        let mut out = file.clone().into_os_string();
        out.push(".minisig");
        let out = PathBuf::from(out);
        fsutil::write_atomic(&out, sig.to_file_text().as_bytes(), 0o644)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("signed {} -> {}", file.display(), out.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Version, commit and SOURCE_DATE_EPOCH of a release, from the flags or git.
struct Resolved {
    version: semver::Version,
    commit: String,
    epoch: u64,
    targets: Vec<String>,
    target_dir: PathBuf,
}

fn resolve(r: &ReleaseArgs) -> Result<Resolved> {
    let git = version::from_git(&r.workspace);
    let (version, commit, commit_time) = match (&r.release_version, &git) {
        (Some(v), _) => {
            let v = nkudo_core::version::parse(v)?;
            let commit = r
                .git_commit
                .clone()
                .or_else(|| git.as_ref().ok().map(|g| g.commit.clone()))
                .unwrap_or_else(|| "unknown".into());
            (v, commit, git.as_ref().ok().map(|g| g.commit_time))
        }
        (None, Ok(g)) => {
            if g.dirty {
                eprintln!(
                    "releaser: warning: the work tree has uncommitted changes; the build is not exactly {}",
                    g.commit
                );
            }
            (
                g.version.clone(),
                r.git_commit.clone().unwrap_or_else(|| g.commit.clone()),
                Some(g.commit_time),
            )
        }
        (None, Err(e)) => bail!("computing the version from git: {e} (or pass --version)"),
    };
    let epoch = r
        .source_date_epoch
        .or(commit_time)
        .context("no SOURCE_DATE_EPOCH and no git commit time")?;
    let targets = if r.targets.is_empty() {
        cross::DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        r.targets.clone()
    };
    let target_dir = match (&r.target_dir, std::env::var_os("CARGO_TARGET_DIR")) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => r.workspace.join(d),
        (None, None) => r.workspace.join("target"),
    };
    Ok(Resolved {
        version,
        commit,
        epoch,
        targets,
        target_dir,
    })
}

fn cmd_build(r: &ReleaseArgs) -> Result<Resolved> {
    let res = resolve(r)?;
    let req = cross::BuildRequest {
        workspace: r.workspace.clone(),
        targets: res.targets.clone(),
        version: res.version.to_string(),
        git_commit: res.commit.clone(),
        build_date: dist::rfc3339(res.epoch).context("SOURCE_DATE_EPOCH out of range")?,
        source_date_epoch: res.epoch,
        cargo: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
    };
    eprintln!(
        "releaser: building {} for {} (commit {}, SOURCE_DATE_EPOCH {})",
        res.version,
        res.targets.join(", "),
        res.commit,
        res.epoch
    );
    let started = Instant::now();
    let spinner = spinner("cross-building with cargo zigbuild (output below)");
    let result = req.run();
    spinner.finish_and_clear();
    result?;
    eprintln!("releaser: build done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(res)
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn cmd_package(r: &ReleaseArgs, o: &PackageOpts) -> Result<ExitCode> {
    let res = resolve(r)?;
    package_resolved(r, o, &res)
}

fn package_resolved(r: &ReleaseArgs, o: &PackageOpts, res: &Resolved) -> Result<ExitCode> {
    let key = load_key(&o.key)?;
    let req = dist::PackageRequest {
        workspace: r.workspace.clone(),
        target_dir: res.target_dir.clone(),
        targets: res.targets.clone(),
        out_dir: o.out.clone(),
        version: res.version.clone(),
        git_commit: res.commit.clone(),
        source_date_epoch: res.epoch,
        expiry_days: o.expires_in_days,
        ca_bundle: o.ca_bundle.clone(),
        key: &key,
    };
    let total = (res.targets.len() * cross::BINARIES.len() + 1) as u64;
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} artifacts {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let report = dist::package(&req, &|name: &str| {
        pb.inc(1);
        pb.set_message(name.to_string());
    });
    pb.finish_and_clear();
    let report = report?;
    match o.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            println!(
                "{} ({}) commit {} built {} expires {}, signed by key {}",
                report.version, report.channel, report.git_commit, report.build_date, report.expires, report.key_id
            );
            for (bin, size) in &report.binaries {
                println!("  binary   {size:>10}  {bin}");
            }
            for f in &report.files {
                println!("  artifact {:>10}  {}", f.size, f.name);
            }
            println!(
                "wrote {} (packaging, checksums and signatures in {:.2}s)",
                report.out_dir.display(),
                report.elapsed.as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_dist(a: DistArgs) -> Result<ExitCode> {
    // Load the key first: a missing key or passphrase should fail before a long build.
    load_key(&a.opts.key)?;
    let res = cmd_build(&a.release)?;
    package_resolved(&a.release, &a.opts, &res)
}

fn trusted_key(path: &Option<PathBuf>, line: &Option<String>) -> Result<PublicKey> {
    Ok(match (path, line) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            PublicKey::from_file_text(&text).with_context(|| format!("reading the public key {}", p.display()))?
        }
        (None, Some(s)) => PublicKey::from_base64(s).context("reading --public-key-string")?,
        (None, None) => bail!("a trusted public key is required (--public-key FILE or --public-key-string)"),
    })
}

fn cmd_promote(a: PromoteArgs) -> Result<ExitCode> {
    let trusted = trusted_key(&a.trusted.public_key, &a.trusted.public_key_string)?;
    let to = nkudo_core::version::parse(&a.to).with_context(|| format!("--to {:?}", a.to))?;
    let latest = match (&a.latest_release, &a.releases_dir) {
        (Some(v), _) => Some(nkudo_core::version::parse(v).with_context(|| format!("--latest-release {v:?}"))?),
        (None, Some(dir)) => releaser::promote::latest_release_in(dir)?,
        (None, None) => {
            eprintln!(
                "releaser: warning: neither --latest-release nor --releases-dir: treating {} as the first release",
                nkudo_core::version::display(&to)
            );
            None
        }
    };
    let changelog = std::fs::read_to_string(&a.changelog)
        .with_context(|| format!("reading {} (pass --changelog FILE)", a.changelog.display()))?;
    let key = load_key(&a.key)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("dist-v{to}")));
    let report = releaser::promote::promote(&releaser::promote::PromoteRequest {
        from: a.from.clone(),
        out,
        to,
        rollback: a.rollback,
        trusted: &trusted,
        key: &key,
        changelog,
        latest,
        now: chrono::Utc::now(),
        expiry_days: a.expires_in_days,
    })?;
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            for f in &report.files {
                println!("  {:>10}  {}  {}", f.size, f.sha256, f.name);
            }
            match &report.rollback_of {
                Some(bad) => println!(
                    "ROLLBACK: {} republishes the artifacts of {} and supersedes {bad}",
                    report.version, report.promoted_from
                ),
                None => println!("promoted {} to {}", report.promoted_from, report.version),
            }
            println!(
                "wrote {} (signed by key {}, expires {}); it verifies with `releaser verify`",
                report.out_dir.display(),
                report.key_id,
                report.expires
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open_layout(root: &RootArg) -> Result<Layout> {
    Ok(Layout::open(&root.root)?)
}

fn restart(r: &RestartArg, root: &Path) -> Result<()> {
    if !r.restart {
        return Ok(());
    }
    if !releaser::install::systemd_running() {
        println!("systemd does not run this machine: restart {} yourself", r.unit);
        return Ok(());
    }
    let status = std::process::Command::new("systemctl")
        .args(["restart", &r.unit])
        .status()
        .context("running systemctl")?;
    if !status.success() {
        bail!(
            "`systemctl restart {}` failed ({status}): see `journalctl -u {}`; go back with `releaser rollback --root {} \
             --restart`",
            r.unit,
            r.unit,
            root.display()
        );
    }
    println!("restarted {}", r.unit);
    Ok(())
}

fn print_activation(a: &Activation, what: &str, output: Output) -> Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({
            "current": a.current.to_string(),
            "previous": a.previous.as_ref().map(|v| v.to_string()),
            "changed": a.changed,
        })),
        Output::Text => {
            if a.changed {
                println!("{what}: current is {}", display(&a.current));
            } else {
                println!("{} was already current: nothing changed", display(&a.current));
            }
            if let Some(p) = &a.previous {
                println!("previous is {} (`releaser rollback` goes there)", display(p));
            }
            Ok(())
        }
    }
}

fn cmd_install(a: InstallArgs) -> Result<ExitCode> {
    let key = trusted_key(&a.trusted.public_key, &a.trusted.public_key_string)?;
    let arch = a
        .arch
        .clone()
        .unwrap_or_else(|| releaser::install::host_arch().to_string());
    let verified = releaser::install::verify_source(&a.source, &key, &a.component, &arch, chrono::Utc::now())?;
    let layout = open_layout(&a.root)?;
    let outcome = releaser::install::install(&layout, &verified)?;
    let dir = layout.release_dir(&verified.version);
    let activation = if a.activate {
        Some(layout.activate(&verified.version)?)
    } else {
        None
    };
    match a.output.output {
        Output::Json => print_json(&serde_json::json!({
            "version": verified.version.to_string(),
            "artifact": verified.name,
            "path": dir,
            "installed": outcome == InstallOutcome::Installed,
            "current": activation.as_ref().map(|x| x.current.to_string()),
        }))?,
        Output::Text => {
            match outcome {
                InstallOutcome::Installed => println!(
                    "verified and installed {} ({}) into {}",
                    display(&verified.version),
                    verified.name,
                    dir.display()
                ),
                InstallOutcome::AlreadyInstalled => {
                    println!(
                        "{} is already installed intact in {}",
                        display(&verified.version),
                        dir.display()
                    )
                }
            }
            match &activation {
                Some(x) => print_activation(x, "activated", Output::Text)?,
                None => println!(
                    "activate it with `releaser activate {} --root {}`",
                    display(&verified.version),
                    a.root.root.display()
                ),
            }
        }
    }
    if activation.as_ref().is_some_and(|x| x.changed) {
        restart(&a.restart, &a.root.root)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_activate(a: ActivateArgs) -> Result<ExitCode> {
    let v = nkudo_core::version::parse(&a.version).with_context(|| format!("version {:?}", a.version))?;
    let layout = open_layout(&a.root)?;
    let x = layout.activate(&v)?;
    print_activation(&x, "activated", a.output.output)?;
    if x.changed {
        restart(&a.restart, &a.root.root)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_rollback(a: RollbackArgs) -> Result<ExitCode> {
    let layout = open_layout(&a.root)?;
    let v = layout.rollback()?;
    match a.output.output {
        Output::Json => print_json(&serde_json::json!({ "current": v.to_string() }))?,
        Output::Text => println!("rolled back: current is {}", display(&v)),
    }
    restart(&a.restart, &a.root.root)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_list(a: ListArgs) -> Result<ExitCode> {
    let layout = open_layout(&a.root)?;
    let entries = layout.list()?;
    match a.output.output {
        Output::Json => print_json(
            &entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "version": e.version.to_string(),
                        "path": e.path,
                        "current": e.current,
                        "previous": e.previous,
                        "complete": e.complete,
                    })
                })
                .collect::<Vec<_>>(),
        )?,
        Output::Text => {
            if entries.is_empty() {
                println!("no releases under {}", a.root.root.display());
            }
            for e in &entries {
                let mark = match (e.current, e.previous, e.complete) {
                    (_, _, false) => "  incomplete (never activated; install it again)",
                    (true, _, _) => "  current",
                    (_, true, _) => "  previous",
                    _ => "",
                };
                println!("{}{mark}", display(&e.version));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_prune(a: PruneArgs) -> Result<ExitCode> {
    let layout = open_layout(&a.root)?;
    let removed = layout.prune(a.keep)?;
    match a.output.output {
        Output::Json => print_json(&serde_json::json!({
            "removed": removed.iter().map(|v| v.to_string()).collect::<Vec<_>>()
        }))?,
        Output::Text => {
            if removed.is_empty() {
                println!("nothing to prune (keeping {})", a.keep);
            }
            for v in &removed {
                println!("removed {}", display(v));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_check_compat(a: CheckCompatArgs) -> Result<ExitCode> {
    let cp = nkudo_core::version::parse(&a.control_plane)
        .with_context(|| format!("--control-plane {:?}", a.control_plane))?;
    let floor = a
        .minimum_agent_version
        .as_deref()
        .map(|v| nkudo_core::version::parse(v).with_context(|| format!("--minimum-agent-version {v:?}")))
        .transpose()?;
    let source = match (&a.tenant, &a.api_key, &a.admin_key) {
        (Some(tenant), Some(api_key), _) => releaser::compat::Source::Tenant { tenant, api_key },
        (Some(_), None, _) => bail!("--tenant needs the tenant's API key: --api-key or $NKUDO_API_KEY"),
        (None, _, Some(admin_key)) => releaser::compat::Source::Fleet { admin_key },
        (None, _, None) => bail!(
            "no credentials: pass --admin-key (or $NKUDO_ADMIN_KEY) to check the whole fleet, or --tenant ID with \
             --api-key (or $NKUDO_API_KEY) to check one tenant"
        ),
    };
    let agents = releaser::compat::fetch(&a.url, &source, a.ca_cert.as_deref())?;
    let report = releaser::compat::evaluate(&cp, floor, &agents);
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            for x in &report.agents {
                println!(
                    "{:<12} {:<30} {:<24} {}",
                    if x.supported { "ok" } else { "UNSUPPORTED" },
                    x.hostname,
                    x.agent_version,
                    x.id
                );
            }
            if report.ok {
                println!(
                    "control plane {} supports all {} active agent(s) (minimum agent version {})",
                    display(&cp),
                    report.agents.len(),
                    report.minimum_supported_agent_version
                );
            } else {
                println!(
                    "control plane {} would not support {} of {} active agent(s) (minimum agent version {}): upgrade \
                     those agents first, or deploy a control plane one minor version closer",
                    display(&cp),
                    report.unsupported,
                    report.agents.len(),
                    report.minimum_supported_agent_version
                );
            }
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_publish(a: PublishArgs) -> Result<ExitCode> {
    let trusted = match (&a.public_key, &a.public_key_string) {
        (None, None) => None,
        (p, s) => Some(trusted_key(p, s)?),
    };
    let req = publish::PublishRequest {
        dir: a.dir.clone(),
        url: a.url.clone(),
        admin_key: a.admin_key.clone(),
        ca_cert: a.ca_cert.clone(),
        external_base_url: a.external_base_url.clone(),
        only_component: a.only_component.clone(),
        trusted: trusted.as_ref(),
        now: chrono::Utc::now(),
    };
    let bar = ProgressBar::hidden();
    let show = a.output.output == Output::Text;
    let report = publish::publish(&req, &mut |p| match p {
        publish::Progress::Plan { files, bytes } => {
            if show && files > 0 {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(bytes);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg} [{elapsed}]")
                        .expect("static template")
                        .progress_chars("=> "),
                );
            }
        }
        publish::Progress::Uploading { name, size } => bar.set_message(format!("uploading {name} ({size} bytes)")),
        publish::Progress::Uploaded { name, size } => {
            bar.inc(size);
            bar.set_message(format!("uploaded {name}"));
        }
    });
    bar.finish_and_clear();
    let report = report?;
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            for x in &report.artifacts {
                println!("  {:<18} {:>10}  {}", x.action, x.size, x.name);
            }
            if !report.verified_signatures {
                println!(
                    "note: no --public-key: checked sizes, hashes and expiry locally; the control plane checked the                      signature"
                );
            }
            println!(
                "{} {} ({}) on {}: signed by key {}, expires {}; {} byte(s) uploaded{}",
                if report.created {
                    "published"
                } else {
                    "already published (identical manifest)"
                },
                report.version,
                report.channel,
                report.url,
                report.key_id,
                report.expires,
                report.uploaded_bytes,
                report
                    .external_base_url
                    .as_ref()
                    .map(|u| format!("; agents fetch artifacts from {u}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_lint_deploy(a: LintDeployArgs) -> Result<ExitCode> {
    let report = releaser::lint::lint_paths(&a.paths)?;
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            for f in &report.findings {
                println!("{f}");
            }
            if report.ok {
                println!(
                    "lint-deploy: {} file(s) checked, every image and version reference is pinned",
                    report.files_checked.len()
                );
            } else {
                println!(
                    "lint-deploy: {} floating reference(s) in {} file(s) checked",
                    report.findings.len(),
                    report.files_checked.len()
                );
            }
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_verify(a: VerifyArgs) -> Result<ExitCode> {
    let key = trusted_key(&a.public_key, &a.public_key_string)?;
    let now = match &a.at {
        Some(t) => chrono::DateTime::parse_from_rfc3339(t)
            .with_context(|| format!("--at {t:?} is not RFC 3339"))?
            .with_timezone(&chrono::Utc),
        None => chrono::Utc::now(),
    };
    let report = verify::verify_dir(&a.dir, &key, now);
    match a.output.output {
        Output::Json => print_json(&report)?,
        Output::Text => {
            for f in &report.verified {
                println!("ok       {f}");
            }
            for f in &report.unlisted {
                println!("unlisted {f} (not covered by the manifest or SHA256SUMS; not trusted)");
            }
            for p in &report.problems {
                println!("FAILED   {p}");
            }
            if report.ok {
                println!(
                    "verified {} ({}), expires {}, key {}",
                    report.version.as_deref().unwrap_or("?"),
                    report.channel.as_deref().unwrap_or("?"),
                    report.expires.as_deref().unwrap_or("?"),
                    report.key_id
                );
            } else {
                println!("verification FAILED: {} problem(s)", report.problems.len());
            }
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFY_FAILED)
    })
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
    fn rollback_with_to_is_the_fleet_rollback() {
        let args = |v: &[&str]| route_rollback(v.iter().map(|s| std::ffi::OsString::from(*s)).collect());
        let fleet = Cli::try_parse_from(args(&[
            "releaser",
            "rollback",
            "--to",
            "1.3.0",
            "--fleet",
            "--url",
            "https://x",
            "--admin-key",
            "k",
        ]))
        .unwrap();
        assert!(matches!(fleet.command, Cmd::FleetRollback(ref a) if a.to == "1.3.0" && a.fleet));
        let host = Cli::try_parse_from(args(&["releaser", "rollback", "--root", "/tmp/x"])).unwrap();
        assert!(matches!(host.command, Cmd::Rollback(_)));
        // `--to` after another subcommand is left alone.
        assert_eq!(args(&["releaser", "verify", "--to"])[1], "verify");
    }

    #[test]
    fn dist_takes_version_and_targets() {
        let cli = Cli::try_parse_from([
            "releaser",
            "dist",
            "--version",
            "1.2.3",
            "--target",
            "aarch64-unknown-linux-musl",
        ])
        .unwrap();
        match cli.command {
            Cmd::Dist(d) => {
                assert_eq!(d.release.release_version.as_deref(), Some("1.2.3"));
                assert_eq!(d.release.targets, ["aarch64-unknown-linux-musl"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
