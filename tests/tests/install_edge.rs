//! `scripts/install-edge.sh` end to end (issue 8): the one-line installer run with `sh` (dash on Debian) against
//! releases of the REAL debug agent built and signed in-process (`nkudo_tests::releases`), served over HTTP by the
//! test [`ArtifactServer`], into a temporary `--root` (so `--no-start` is implied), enrolling with a real control
//! plane (SQLite).
//!
//! * `shellcheck -x` passes and `sh -n` parses the script;
//! * a good release: exit 0, `releases/<v>/bin/nkudo-edge` with the verified `manifest.json`, a completion marker
//!   that `nkudo_core::layout` accepts (so the agent's self-update can roll back to it), `current` pointing at
//!   it, the unit and `edge.toml` written, the agent enrolled (state file, listed by `GET /admin/agents` with the
//!   version it was installed as) and `nkudo-edge verify-heartbeat` with the written config heartbeats; a re-run
//!   changes nothing and downloads no tarball; an upgrade switches `current` and keeps `previous`; a downgrade is
//!   refused without `--allow-downgrade`; the token never appears in the output;
//! * the token from the environment, with the signature checked by openssl (`NKUDO_VERIFY_WITH=openssl`);
//! * refused, with exit 5, nothing under `releases/`, no config, no enrollment (and the same token still works
//!   afterwards): a tampered tarball, a manifest signed by another key, an edited trusted comment (the global
//!   signature), an expired manifest, a manifest of another version; each with minisign and with openssl;
//! * a release whose binary does not start is refused by the pre-switch trial (exit 6, `current` untouched);
//! * usage errors (no key pinned or given, no version, `latest`, no token, `--token` on the command line): exit 2.
//!
//! External tools: `shellcheck`, `minisign`, `openssl`. Missing with `CI=true`: the test fails; otherwise it
//! prints `SKIPPED: <tool> missing` and returns (or skips that verifier).

use nkudo_core::layout::Layout;
use nkudo_tests::releases::*;
use nkudo_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const V1: &str = "1.2.3";
const V2: &str = "1.2.4";

/// Exit codes of the script (its header and `--help`).
const EX_USAGE: i32 = 2;
const EX_VERIFY: i32 = 5;
const EX_INSTALL: i32 = 6;

/// Variables of the script and of the agent that must not leak in from the test's environment.
const SCRUBBED: &[&str] = &[
    "NKUDO_VERSION",
    "NKUDO_CONTROL_PLANE",
    "NKUDO_RELEASE_BASE_URL",
    "NKUDO_RELEASE_PUBKEY",
    "NKUDO_VERIFY_WITH",
    "NKUDO_ENROLL_TOKEN",
    "NKUDO_ENROLLMENT_TOKEN",
    "NKUDO_CONFIG",
    "NKUDO_STATE_DIR",
    "NKUDO_PKI_DIR",
    "NKUDO_CA_FILE",
    "NKUDO_HOSTNAME",
    "NKUDO_RELEASE_PUBLIC_KEYS",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn script() -> PathBuf {
    workspace().join("scripts/install-edge.sh")
}

/// Whether `tool` is on PATH. Missing with CI=true: panics; otherwise prints the skip line.
fn tool_available(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if in_ci() {
            panic!("{tool} is required by tests/tests/install_edge.rs and CI=true: install it");
        }
        eprintln!("SKIPPED: {tool} missing");
    }
    found
}

/// The verifiers available here (`minisign`, `openssl`).
fn verifiers() -> Vec<&'static str> {
    ["minisign", "openssl"]
        .into_iter()
        .filter(|t| tool_available(t))
        .collect()
}

/// A release of the real agent with the packaged unit and sample config, as `releaser dist` packages them.
fn packaged_release(parent: &Path, spec: ReleaseSpec, key: &SecretKey) -> anyhow::Result<BuiltRelease> {
    let unit = std::fs::read(workspace().join("deployments/systemd/nkudo-edge.service"))?;
    let sample = std::fs::read(workspace().join("deployments/config/edge.toml"))?;
    build_release(
        parent,
        &spec
            .file("systemd/nkudo-edge.service", unit)
            .file("config/edge.toml", sample),
        key,
    )
}

/// Serves the release's files at `<base>/v<version>/<name>` (the GitHub Releases shape of the default URL).
fn serve(server: &ArtifactServer, rel: &BuiltRelease, as_version: &str) -> anyhow::Result<()> {
    for name in [
        rel.tarball_name.clone(),
        "manifest.json".into(),
        "manifest.json.minisig".into(),
        "SHA256SUMS".into(),
        "SHA256SUMS.minisig".into(),
    ] {
        server.put(&format!("v{as_version}/{name}"), std::fs::read(rel.dir.join(&name))?);
    }
    // The tarball as named for the served version (a misversioned manifest still names its own file).
    Ok(())
}

fn base_url(server: &ArtifactServer) -> String {
    format!("{}/v{{version}}", server.base_url)
}

/// One host under a temporary root: where the script installs, and its own TMPDIR (checked for leftovers).
struct Host {
    dir: TempDir,
    hostname: String,
}

impl Host {
    fn new() -> anyhow::Result<Host> {
        let dir = TempDir::new("nkudo-install-edge")?;
        std::fs::create_dir_all(dir.path().join("root"))?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        Ok(Host {
            dir,
            hostname: format!("inst-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
        })
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn layout(&self) -> PathBuf {
        self.root().join("opt/nkudo")
    }
    fn config(&self) -> PathBuf {
        self.root().join("etc/nkudo/edge.toml")
    }
    fn unit(&self) -> PathBuf {
        self.root().join("etc/systemd/system/nkudo-edge.service")
    }
    fn state_file(&self) -> PathBuf {
        self.root().join("var/lib/nkudo-edge/state/edge-state.json")
    }
    fn write_token(&self, token: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.path().join("token");
        std::fs::write(&p, format!("{token}\n"))?;
        Ok(p)
    }
    /// `sh scripts/install-edge.sh --root <root> --hostname <h> <args>` with `env`, in a clean environment.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg(script())
            .arg("--root")
            .arg(self.root())
            .args(["--hostname", &self.hostname])
            .args(args)
            .env("TMPDIR", self.dir.path().join("tmp"))
            .stdin(Stdio::null());
        for k in SCRUBBED {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run sh scripts/install-edge.sh");
        eprintln!("---- install-edge.sh {args:?}\n{}", output_text(&out));
        out
    }
    /// Entries under `<root>/opt/nkudo/releases` (none when it does not exist).
    fn releases(&self) -> Vec<String> {
        std::fs::read_dir(self.layout().join("releases"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Temporary directories the script left in its TMPDIR (it must clean up on every exit).
    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The agents the control plane lists under `hostname`.
async fn agents_named(cp: &ControlPlane, hostname: &str) -> anyhow::Result<Vec<nkudo_core::api::Agent>> {
    Ok(admin_agents(cp)
        .await?
        .into_iter()
        .filter(|a| a.hostname == hostname)
        .collect())
}

/// Asserts that a refused run installed nothing, wrote no config or unit and enrolled nothing.
async fn assert_nothing_installed(host: &Host, cp: &ControlPlane, out: &Output, what: &str) -> anyhow::Result<()> {
    assert_eq!(code(out), Some(EX_VERIFY), "{what}: exit code\n{}", output_text(out));
    assert!(
        text(out).contains("nothing installed"),
        "{what}: the error says nothing was installed\n{}",
        output_text(out)
    );
    assert!(
        host.releases().is_empty(),
        "{what}: releases/ holds {:?}",
        host.releases()
    );
    assert!(
        std::fs::symlink_metadata(host.layout().join("current")).is_err(),
        "{what}: current exists"
    );
    assert!(!host.config().exists(), "{what}: edge.toml written");
    assert!(!host.unit().exists(), "{what}: unit written");
    assert!(!host.state_file().exists(), "{what}: state file written");
    assert!(
        agents_named(cp, &host.hostname).await?.is_empty(),
        "{what}: the control plane lists an agent"
    );
    assert!(
        host.leftovers().is_empty(),
        "{what}: TMPDIR leftovers {:?}",
        host.leftovers()
    );
    Ok(())
}

#[test]
fn shellcheck_clean() {
    let out = Command::new("sh").arg("-n").arg(script()).output().expect("sh -n");
    assert!(out.status.success(), "sh -n: {}", output_text(&out));
    if !tool_available("shellcheck") {
        return;
    }
    let out = Command::new("shellcheck")
        .arg("-x")
        .arg(script())
        .current_dir(workspace())
        .output()
        .expect("run shellcheck");
    assert!(
        out.status.success(),
        "shellcheck -x scripts/install-edge.sh:\n{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_enrolls_heartbeats_and_reruns() -> anyhow::Result<()> {
    let work = TempDir::new("nkudo-install-edge-rel")?;
    let key = new_release_key();
    let pubkey = public_key_b64(&key);
    let rel1 = packaged_release(work.path(), ReleaseSpec::new(V1), &key)?;
    let rel2 = packaged_release(work.path(), ReleaseSpec::new(V2), &key)?;
    let server = ArtifactServer::start()?;
    serve(&server, &rel1, V1)?;
    serve(&server, &rel2, V2)?;
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;

    let host = Host::new()?;
    let token_file = host.write_token(&token.token)?;
    let ca = cp.ca_bundle_path.to_string_lossy().into_owned();
    let base = base_url(&server);
    let common = |version: &'static str| -> Vec<String> {
        vec![
            "--version".into(),
            version.into(),
            "--base-url".into(),
            base.clone(),
            "--control-plane".into(),
            cp.base_url.clone(),
            "--ca-file".into(),
            ca.clone(),
            "--pubkey".into(),
            pubkey.clone(),
        ]
    };
    let mut args = common(V1);
    args.extend(["--token-file".to_string(), token_file.to_string_lossy().into_owned()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();

    let started = std::time::Instant::now();
    let out = host.run(&argv, &[]);
    println!("install-edge.sh (first install, enrollment): {:?}", started.elapsed());
    assert_eq!(code(&out), Some(0), "install\n{}", output_text(&out));
    assert!(
        !text(&out).contains(&token.token),
        "the token appears in the output\n{}",
        output_text(&out)
    );
    assert!(host.leftovers().is_empty(), "TMPDIR leftovers {:?}", host.leftovers());

    // The layout: the release with its verified manifest, complete for nkudo_core::layout, and current.
    let rel_dir = host.layout().join("releases").join(V1);
    assert!(rel_dir.join("bin/nkudo-edge").is_file());
    assert_eq!(
        std::fs::read_to_string(rel_dir.join("manifest.json"))?,
        rel1.manifest_text,
        "manifest.json is the verified one"
    );
    assert_eq!(
        std::fs::read_to_string(rel_dir.join("manifest.json.minisig"))?,
        rel1.signature_text
    );
    assert_eq!(layout_link(&host.layout(), "current").as_deref(), Some(V1));
    let layout = Layout::open(host.layout())?;
    let v1 = nkudo_core::version::parse(V1)?;
    layout
        .verify(&v1)
        .map_err(|e| anyhow::anyhow!("the layout refuses the installed release: {e}"))?;
    assert_eq!(layout.installed()?, vec![v1.clone()]);
    assert_eq!(layout.current()?, Some(v1.clone()));
    // The binary reports the version it was installed as (read from manifest.json beside it).
    let ver = Command::new(host.layout().join("current/bin/nkudo-edge"))
        .arg("version")
        .output()?;
    assert!(
        String::from_utf8_lossy(&ver.stdout).starts_with(&format!("nkudo-edge {V1}\n")),
        "{}",
        output_text(&ver)
    );

    // Unit and config.
    let unit = std::fs::read_to_string(host.unit())?;
    let exec = format!("ExecStart={}/current/bin/nkudo-edge run", host.layout().display());
    assert!(unit.contains(&exec), "the unit runs the layout's current agent: {unit}");
    assert!(unit.contains("RestartForceExitStatus=75"), "the packaged unit: {unit}");
    let config = std::fs::read_to_string(host.config())?;
    assert!(
        config.contains(&format!("control_plane = \"{}\"", cp.base_url)),
        "{config}"
    );
    assert!(
        config.contains(&format!("release_public_keys = [\"{pubkey}\"]")),
        "{config}"
    );
    assert!(!config.contains(&token.token), "the token is not stored in the config");
    assert_eq!(
        std::fs::read(host.root().join("etc/nkudo/ca-bundle.pem"))?,
        std::fs::read(&cp.ca_bundle_path)?
    );

    // Enrolled: the state file, and the control plane lists the agent at the version it was installed as.
    assert!(host.state_file().is_file(), "no state file");
    let listed = agents_named(&cp, &host.hostname).await?;
    assert_eq!(listed.len(), 1, "agents named {}: {listed:?}", host.hostname);
    let agent = listed[0].clone();
    assert_eq!(agent.site_id, fx.site_id());
    assert_eq!(agent.agent_version, V1);

    // The installed agent with the written config heartbeats.
    let nb_state = host.dir.path().join("netbird.state");
    let mut hb = Command::new(host.layout().join("current/bin/nkudo-edge"));
    hb.arg("verify-heartbeat")
        .arg("--config")
        .arg(host.config())
        .arg("--cloud-hypervisor-bin")
        .arg(bin_path(MOCK_CH_BIN))
        .arg("--netbird-bin")
        .arg(bin_path(MOCK_NETBIRD_BIN))
        .env("MOCK_NETBIRD_MODE", "connected")
        .env("MOCK_NETBIRD_STATE", &nb_state)
        .stdin(Stdio::null());
    for k in SCRUBBED {
        hb.env_remove(k);
    }
    let hb_out = hb.output()?;
    assert!(hb_out.status.success(), "verify-heartbeat: {}", output_text(&hb_out));
    let after = admin_agent(&cp, &agent.id).await?;
    assert!(after.last_heartbeat_at.is_some(), "no heartbeat recorded: {after:?}");

    // A re-run changes nothing: no tarball download, no second enrollment (the token is spent anyway).
    let tarball_gets = |server: &ArtifactServer, name: &str| {
        server
            .requests()
            .iter()
            .filter(|r| r.ends_with(&format!("/{name}")))
            .count()
    };
    assert_eq!(tarball_gets(&server, &rel1.tarball_name), 1);
    let unit_before = std::fs::read(host.unit())?;
    let config_before = std::fs::read(host.config())?;
    let out = host.run(&argv, &[]);
    assert_eq!(code(&out), Some(0), "re-run\n{}", output_text(&out));
    let t = text(&out);
    assert!(t.contains("already installed") && t.contains("already enrolled"), "{t}");
    assert_eq!(
        tarball_gets(&server, &rel1.tarball_name),
        1,
        "the re-run downloaded the tarball"
    );
    assert_eq!(std::fs::read(host.unit())?, unit_before);
    assert_eq!(std::fs::read(host.config())?, config_before);
    assert_eq!(agents_named(&cp, &host.hostname).await?.len(), 1);

    // An upgrade (already enrolled: no token needed) switches current and keeps the old release as previous. The
    // new release is already there, installed by nkudo_core::layout (as the agent's self-update or `releaser
    // install` would): the script reads that marker, finds the release intact and downloads nothing.
    install_into_layout(&host.layout(), &rel2, false)?;
    let up_args = common(V2);
    let up: Vec<&str> = up_args.iter().map(String::as_str).collect();
    let out = host.run(&up, &[]);
    assert_eq!(code(&out), Some(0), "upgrade\n{}", output_text(&out));
    assert!(text(&out).contains("already installed"), "{}", output_text(&out));
    assert_eq!(
        tarball_gets(&server, &rel2.tarball_name),
        0,
        "an intact release was downloaded again"
    );
    let v2 = nkudo_core::version::parse(V2)?;
    assert_eq!(layout.current()?, Some(v2.clone()));
    assert_eq!(layout.previous()?, Some(v1.clone()));
    assert_eq!(layout.installed()?, vec![v1.clone(), v2.clone()]);
    layout
        .verify(&v2)
        .map_err(|e| anyhow::anyhow!("the layout refuses {V2}: {e}"))?;

    // Going back needs --allow-downgrade.
    let down_args = common(V1);
    let down: Vec<&str> = down_args.iter().map(String::as_str).collect();
    let out = host.run(&down, &[]);
    assert_eq!(code(&out), Some(EX_USAGE), "downgrade\n{}", output_text(&out));
    assert!(text(&out).contains("--allow-downgrade"), "{}", output_text(&out));
    assert_eq!(layout.current()?, Some(v2.clone()));
    let mut down_ok = down.clone();
    down_ok.push("--allow-downgrade");
    let out = host.run(&down_ok, &[]);
    assert_eq!(code(&out), Some(0), "downgrade allowed\n{}", output_text(&out));
    assert_eq!(layout.current()?, Some(v1.clone()));
    assert_eq!(layout.previous()?, Some(v2));
    assert_eq!(agents_named(&cp, &host.hostname).await?.len(), 1);

    // A damaged release (a file changed after it was installed) is installed again by a re-run.
    std::fs::write(rel_dir.join("README.md"), b"changed on the host\n")?;
    assert!(layout.verify(&v1).is_err(), "the damage is visible to the layout");
    let out = host.run(&down_ok, &[]);
    assert_eq!(code(&out), Some(0), "repair\n{}", output_text(&out));
    assert!(text(&out).contains("README.md changed"), "{}", output_text(&out));
    layout
        .verify(&v1)
        .map_err(|e| anyhow::anyhow!("the repaired release does not verify: {e}"))?;
    assert_eq!(tarball_gets(&server, &rel1.tarball_name), 2);
    assert_eq!(layout.current()?, Some(v1.clone()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_environment_with_openssl_verification() -> anyhow::Result<()> {
    if !tool_available("openssl") {
        return Ok(());
    }
    let work = TempDir::new("nkudo-install-edge-rel")?;
    let key = new_release_key();
    let rel = packaged_release(work.path(), ReleaseSpec::new(V1), &key)?;
    let server = ArtifactServer::start()?;
    serve(&server, &rel, V1)?;
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;

    let host = Host::new()?;
    let ca = cp.ca_bundle_path.to_string_lossy().into_owned();
    let base = base_url(&server);
    let pubkey = public_key_b64(&key);
    let out = host.run(
        &["--version", V1, "--ca-file", &ca],
        &[
            ("NKUDO_RELEASE_BASE_URL", base.as_str()),
            ("NKUDO_CONTROL_PLANE", cp.base_url.as_str()),
            ("NKUDO_RELEASE_PUBKEY", pubkey.as_str()),
            ("NKUDO_VERIFY_WITH", "openssl"),
            ("NKUDO_ENROLLMENT_TOKEN", token.token.as_str()),
        ],
    );
    assert_eq!(code(&out), Some(0), "{}", output_text(&out));
    let t = text(&out);
    assert!(t.contains("verifying with openssl"), "{t}");
    assert!(t.contains("signature verified"), "{t}");
    assert!(!t.contains(&token.token), "the token appears in the output: {t}");
    assert_eq!(layout_link(&host.layout(), "current").as_deref(), Some(V1));
    assert!(host.state_file().is_file());
    let listed = agents_named(&cp, &host.hostname).await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].site_id, fx.site_id());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_releases_install_nothing() -> anyhow::Result<()> {
    let verifiers = verifiers();
    if verifiers.is_empty() {
        return Ok(());
    }
    let work = TempDir::new("nkudo-install-edge-rel")?;
    let key = new_release_key();
    let other_key = new_release_key();
    let pubkey = public_key_b64(&key);
    let good = packaged_release(work.path(), ReleaseSpec::new(V1), &key)?;
    let by_other_key = packaged_release(work.path(), ReleaseSpec::new(V1), &other_key)?;
    let expired = packaged_release(
        work.path(),
        ReleaseSpec::new(V1).expires_at(chrono::Utc::now() - chrono::Duration::hours(1)),
        &key,
    )?;
    let other_version = packaged_release(work.path(), ReleaseSpec::new(V2), &key)?;
    let cp = start_or_skip!(edge_control_plane(Backend::Sqlite).start());
    let fx = bootstrap(&cp).await?;
    let token = issue_token(&cp, &fx.api_key, fx.tenant_id(), fx.site_id(), None).await?;
    let ca = cp.ca_bundle_path.to_string_lossy().into_owned();

    // Each case: a server serving a broken release under v1.2.3, and the words the error must contain.
    type Tamper = Box<dyn Fn(&ArtifactServer) -> anyhow::Result<()>>;
    let good_c = good.clone();
    let tampered_tarball: Tamper = Box::new(move |s| {
        serve(s, &good_c, V1)?;
        let mut bytes = good_c.tarball_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        s.put(&format!("v{V1}/{}", good_c.tarball_name), bytes);
        Ok(())
    });
    let other_c = by_other_key.clone();
    let wrong_key: Tamper = Box::new(move |s| serve(s, &other_c, V1));
    let good_c = good.clone();
    let edited_comment: Tamper = Box::new(move |s| {
        serve(s, &good_c, V1)?;
        // Only the trusted comment changes: the signature over the manifest still verifies, the global one not.
        let sig = good_c
            .signature_text
            .replacen("\tchannel:release", "\tchannel:pre-release", 1);
        assert_ne!(sig, good_c.signature_text);
        s.put(&format!("v{V1}/manifest.json.minisig"), sig.into_bytes());
        Ok(())
    });
    let expired_c = expired.clone();
    let expired_case: Tamper = Box::new(move |s| serve(s, &expired_c, V1));
    let other_v = other_version.clone();
    let misversioned: Tamper = Box::new(move |s| serve(s, &other_v, V1));
    let cases: Vec<(&str, Tamper, &str)> = vec![
        ("tampered tarball", tampered_tarball, "SHA-256 mismatch"),
        ("signed by another key", wrong_key, "does not verify"),
        ("edited trusted comment", edited_comment, "does not verify"),
        ("expired manifest", expired_case, "expired"),
        ("manifest of another version", misversioned, "is for version 1.2.4"),
    ];

    for verifier in &verifiers {
        for (what, tamper, words) in &cases {
            let what = format!("{what} ({verifier})");
            let server = ArtifactServer::start()?;
            tamper(&server)?;
            let host = Host::new()?;
            let token_file = host.write_token(&token.token)?;
            let base = base_url(&server);
            let tf = token_file.to_string_lossy().into_owned();
            let out = host.run(
                &[
                    "--version",
                    V1,
                    "--base-url",
                    &base,
                    "--control-plane",
                    &cp.base_url,
                    "--ca-file",
                    &ca,
                    "--token-file",
                    &tf,
                    "--pubkey",
                    &pubkey,
                    "--verify-with",
                    verifier,
                ],
                &[],
            );
            assert!(
                text(&out).contains(words),
                "{what}: the error names the cause ({words})\n{}",
                output_text(&out)
            );
            assert_nothing_installed(&host, &cp, &out, &what).await?;
        }
    }

    // The token was never spent: the good release installs and enrolls with it.
    let server = ArtifactServer::start()?;
    serve(&server, &good, V1)?;
    let host = Host::new()?;
    let token_file = host.write_token(&token.token)?;
    let base = base_url(&server);
    let tf = token_file.to_string_lossy().into_owned();
    let out = host.run(
        &[
            "--version",
            V1,
            "--base-url",
            &base,
            "--control-plane",
            &cp.base_url,
            "--ca-file",
            &ca,
            "--token-file",
            &tf,
            "--pubkey",
            &pubkey,
        ],
        &[],
    );
    assert_eq!(
        code(&out),
        Some(0),
        "the good release after the refusals\n{}",
        output_text(&out)
    );
    assert_eq!(agents_named(&cp, &host.hostname).await?.len(), 1);
    Ok(())
}

#[test]
fn a_release_that_does_not_start_is_not_switched_to() -> anyhow::Result<()> {
    let work = TempDir::new("nkudo-install-edge-rel")?;
    let key = new_release_key();
    let rel = build_release(work.path(), &ReleaseSpec::new(V1).payload(Payload::DoesNotStart), &key)?;
    let server = ArtifactServer::start()?;
    serve(&server, &rel, V1)?;
    let host = Host::new()?;
    let base = base_url(&server);
    let pubkey = public_key_b64(&key);
    let out = host.run(
        &[
            "--version",
            V1,
            "--base-url",
            &base,
            "--control-plane",
            "https://127.0.0.1:9",
            "--pubkey",
            &pubkey,
        ],
        &[("NKUDO_ENROLL_TOKEN", "never-used")],
    );
    assert_eq!(code(&out), Some(EX_INSTALL), "{}", output_text(&out));
    assert!(
        text(&out).contains("does not run on this host"),
        "{}",
        output_text(&out)
    );
    assert!(host.releases().is_empty(), "releases/ holds {:?}", host.releases());
    assert!(std::fs::symlink_metadata(host.layout().join("current")).is_err());
    assert!(!host.state_file().exists());
    assert!(host.leftovers().is_empty(), "TMPDIR leftovers {:?}", host.leftovers());
    Ok(())
}

#[test]
fn usage_errors_exit_2_before_any_download() {
    let host = Host::new().expect("host");
    let key = public_key_b64(&new_release_key());
    // Nothing listens on this address: a usage error must come before any download.
    let base = "http://127.0.0.1:9/v{version}";
    /// What is wrong, the arguments, the environment, words the error must contain.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no key pinned or given",
            vec![
                "--version",
                V1,
                "--base-url",
                base,
                "--control-plane",
                "https://cp:8443",
            ],
            vec![("NKUDO_ENROLL_TOKEN", "t")],
            "no release public key",
        ),
        (
            "no version",
            vec![
                "--pubkey",
                &key,
                "--base-url",
                base,
                "--control-plane",
                "https://cp:8443",
            ],
            vec![("NKUDO_ENROLL_TOKEN", "t")],
            "--version is required",
        ),
        (
            "latest",
            vec![
                "--version",
                "latest",
                "--pubkey",
                &key,
                "--control-plane",
                "https://cp:8443",
            ],
            vec![("NKUDO_ENROLL_TOKEN", "t")],
            "no \"latest\" index",
        ),
        (
            "no token",
            vec![
                "--version",
                V1,
                "--pubkey",
                &key,
                "--base-url",
                base,
                "--control-plane",
                "https://cp:8443",
            ],
            vec![],
            "not enrolled yet",
        ),
        (
            "token on the command line",
            vec!["--version", V1, "--pubkey", &key, "--token", "secret"],
            vec![],
            "never taken on the command line",
        ),
        (
            "no control plane",
            vec!["--version", V1, "--pubkey", &key, "--base-url", base],
            vec![("NKUDO_ENROLL_TOKEN", "t")],
            "--control-plane URL is required",
        ),
    ];
    for (what, args, env, words) in cases {
        let out = host.run(&args, &env);
        assert_eq!(code(&out), Some(EX_USAGE), "{what}\n{}", output_text(&out));
        assert!(
            text(&out).contains(words),
            "{what}: expected {words:?}\n{}",
            output_text(&out)
        );
        assert!(
            !text(&out).contains("downloading"),
            "{what}: downloaded\n{}",
            output_text(&out)
        );
        assert!(!host.root().join("opt").exists(), "{what}: wrote under the root");
    }
    let help = host.run(&["--help"], &[]);
    assert_eq!(code(&help), Some(0));
    assert!(text(&help).contains("Exit codes"), "{}", output_text(&help));
}
