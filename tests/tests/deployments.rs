//! The deployment files under `deployments/` checked with the stock tools of their kind and against what the code
//! needs (issue 8, "Deployments"):
//!
//! * systemd units: `systemd-analyze verify` passes with no warning (a broken unit is shown to fail the same
//!   check); `systemd-analyze security --offline=true` rates the control plane under 4 and the edge agent no worse
//!   than the recorded [`EDGE_EXPOSURE_BOUND`]; the edge unit keeps what the self-update crash-loop guard relies
//!   on (docs/edge-agent.md "Self-update") and the control-plane unit what it needs to serve.
//! * docker-compose: every image pinned (third-party by `@sha256:` digest with its version named, ours by the
//!   exact workspace version), healthchecks behind every `service_healthy`, named volumes declared, bind mounts
//!   that exist (Prometheus' config and rules, Grafana's provisioning and dashboards), no secret committed (every
//!   `${VAR}` comes from `.env.example`, whose secrets are placeholders), the Grafana data source and dashboard agree,
//!   the fleet dashboard has its panels and every PromQL expression in it passes `promtool check rules`.
//! * Kubernetes: every manifest parses; the Argo Rollouts canary (setWeight 10, a pause, then analysis by
//!   AnalysisTemplates that exist and query our three metrics for the canary pods only); the analysis queries
//!   are evaluated by `promtool test rules` on synthetic series: a good canary passes every successCondition, a
//!   bad one fails it, an idle one passes, and a bad stable version does not leak into the canary's verdict.
//! * `releaser lint-deploy deployments/` exits 0, and exits 1 on a copy of the compose file with a digest removed.
//!
//! Tools: `systemd-analyze` and `promtool` (Debian's prometheus package). Missing with CI=true: the test fails;
//! otherwise it prints `SKIPPED: <tool> missing` and returns. `docker compose config` runs only where the compose
//! plugin is installed (it is not in CI); the checks above do not depend on it.

use nkudo_tests::bin_path;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The edge unit's `systemd-analyze security --offline=true` exposure when it was last hardened (systemd 252).
/// It runs as root with CAP_NET_ADMIN, /dev/kvm and the host network by design; this bound only keeps it from
/// getting worse unnoticed.
const EDGE_EXPOSURE_BOUND: f64 = 3.0;
/// The control plane's target (issue 8).
const CONTROL_PLANE_EXPOSURE_LIMIT: f64 = 4.0;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deployments() -> PathBuf {
    root().join("deployments")
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The tool on PATH; when missing: a failure with CI=true, else a loud SKIPPED line and `None`.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !ci(),
            "{name} is missing and CI is set: install it (systemd for systemd-analyze, Debian's prometheus \
             package for promtool)"
        );
        let bar = "!".repeat(80);
        eprintln!("{bar}\n!!! SKIPPED: {name} missing\n{bar}");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `version` of `[workspace.package]` in the root Cargo.toml.
fn workspace_version() -> String {
    let manifest = read(&root().join("Cargo.toml"));
    let mut in_section = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section {
            if let Some(v) = line.strip_prefix("version") {
                let v = v.trim_start().trim_start_matches('=').trim().trim_matches('"');
                return v.to_string();
            }
        }
    }
    panic!("no version in [workspace.package] of Cargo.toml");
}

// ---------------------------------------------------------------------------------------------------------------
// systemd

const UNITS: [&str; 2] = ["nkudo-control-plane", "nkudo-edge"];

/// A root for `systemd-analyze --root`: the host's unit library (for the targets the units name), executable
/// stand-ins at the ExecStart paths (verify checks only that they are executable) and our units.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let lib = root.path().join("usr/lib/systemd");
    fs::create_dir_all(&lib).unwrap();
    let host_lib = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).join("sysinit.target").exists())
        .expect("the host's systemd unit library (sysinit.target) is needed by systemd-analyze verify");
    let o = run(Command::new("cp").arg("-a").arg(host_lib).arg(&lib));
    assert!(o.status.success(), "{}", text(&o));
    let bin = root.path().join("opt/nkudo/current/bin");
    fs::create_dir_all(&bin).unwrap();
    let units = root.path().join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for name in UNITS {
        let stub = bin.join(name);
        fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
        let unit = format!("{name}.service");
        fs::copy(deployments().join("systemd").join(&unit), units.join(&unit)).unwrap();
    }
    root
}

fn verify(analyze: &Path, root: &Path, unit: &str) -> Output {
    run(Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit))
}

/// `Overall exposure level for <unit>: 1.2 OK` → 1.2.
fn exposure(analyze: &Path, root: &Path, unit: &str) -> f64 {
    let o = run(Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg(unit));
    let out = text(&o);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no exposure level for {unit}: {out}"));
    eprintln!("systemd-analyze security --offline=true {unit}: {}", line.trim());
    line.rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unparsable exposure line {line:?}"))
}

/// The unit's `Key=Value` assignments by section (comments skipped; repeated keys in order).
fn unit_settings(name: &str) -> BTreeMap<(String, String), Vec<String>> {
    let text = read(&deployments().join("systemd").join(format!("{name}.service")));
    let mut section = String::new();
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.entry((section.clone(), k.trim().to_string()))
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

fn one(settings: &BTreeMap<(String, String), Vec<String>>, section: &str, key: &str) -> String {
    let values = settings
        .get(&(section.to_string(), key.to_string()))
        .unwrap_or_else(|| panic!("[{section}] {key}= is missing"));
    values.last().cloned().unwrap()
}

fn words(settings: &BTreeMap<(String, String), Vec<String>>, section: &str, key: &str) -> Vec<String> {
    settings
        .get(&(section.to_string(), key.to_string()))
        .map(|vs| {
            vs.iter()
                .flat_map(|v| v.split_whitespace().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn systemd_units_verify_cleanly_and_a_broken_unit_does_not() {
    let Some(analyze) = tool("systemd-analyze") else { return };
    let root = unit_root();
    for name in UNITS {
        let unit = format!("{name}.service");
        let o = verify(&analyze, root.path(), &unit);
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            text(&o)
        );
    }
    // The same check on a unit with a misspelt key and a bad value complains: an empty stderr means something.
    let broken = read(&deployments().join("systemd/nkudo-edge.service"))
        .replace("Restart=always", "Restart=alwayz")
        .replace("KillMode=process", "KilMode=process");
    fs::write(root.path().join("etc/systemd/system/nkudo-broken.service"), broken).unwrap();
    let o = verify(&analyze, root.path(), "nkudo-broken.service");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("KilMode") && err.contains("alwayz"),
        "verify did not notice the broken unit: {}",
        text(&o)
    );
}

#[test]
fn control_plane_unit_exposure_is_under_4() {
    let Some(analyze) = tool("systemd-analyze") else { return };
    let root = unit_root();
    let score = exposure(&analyze, root.path(), "nkudo-control-plane.service");
    assert!(
        score < CONTROL_PLANE_EXPOSURE_LIMIT,
        "nkudo-control-plane.service exposure {score} is not under {CONTROL_PLANE_EXPOSURE_LIMIT}"
    );
}

#[test]
fn edge_unit_exposure_is_no_worse_than_recorded() {
    let Some(analyze) = tool("systemd-analyze") else { return };
    let root = unit_root();
    let score = exposure(&analyze, root.path(), "nkudo-edge.service");
    assert!(
        score <= EDGE_EXPOSURE_BOUND + 1e-9,
        "nkudo-edge.service exposure {score} is worse than the recorded {EDGE_EXPOSURE_BOUND}: a setting was \
         loosened (if on purpose, say why in the unit and raise EDGE_EXPOSURE_BOUND)"
    );
}

#[test]
fn edge_unit_keeps_what_self_update_and_the_crash_loop_guard_rely_on() {
    let s = unit_settings("nkudo-edge");
    assert_eq!(one(&s, "Service", "ExecStart"), "/opt/nkudo/current/bin/nkudo-edge run");
    assert_eq!(one(&s, "Service", "Restart"), "always");
    // Exit 75 (EX_TEMPFAIL) after switching `current` is a restart request, whatever Restart= says.
    assert_eq!(words(&s, "Service", "RestartForceExitStatus"), vec!["75".to_string()]);
    // Only the agent is signalled: the VMMs and the update watcher in its cgroup survive a restart.
    assert_eq!(one(&s, "Service", "KillMode"), "process");
    // The start limit must let a new version start more often than the guard's default update_max_starts (3)
    // within the health window, so the guard (not systemd) decides; a start limit that trips still ends in the
    // watcher's reset-failed + restart of the old version.
    let burst: u32 = one(&s, "Unit", "StartLimitBurst").parse().unwrap();
    let interval: u32 = one(&s, "Unit", "StartLimitIntervalSec").parse().unwrap();
    let restart_sec: u32 = one(&s, "Service", "RestartSec").parse().unwrap();
    assert!(burst > 3, "StartLimitBurst={burst}");
    assert!(
        interval >= 120 && restart_sec * burst <= interval,
        "StartLimitIntervalSec={interval}, RestartSec={restart_sec}, StartLimitBurst={burst}"
    );
    // Self-update writes releases and flips /opt/nkudo/current; its state lives in the StateDirectory.
    assert!(words(&s, "Service", "ReadWritePaths").contains(&"/opt/nkudo".to_string()));
    assert_eq!(one(&s, "Service", "StateDirectory"), "nkudo-edge");
    // The watcher's `systemctl restart` talks to systemd over a Unix socket; netlink for `ip`.
    let families = words(&s, "Service", "RestrictAddressFamilies");
    for f in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(families.contains(&f.to_string()), "{f} missing: {families:?}");
    }
    let devices = words(&s, "Service", "DeviceAllow");
    assert!(devices.contains(&"/dev/kvm".to_string()) && devices.contains(&"/dev/net/tun".to_string()));
    assert!(words(&s, "Service", "CapabilityBoundingSet").contains(&"CAP_NET_ADMIN".to_string()));
    // Cloud Hypervisor installs its own seccomp filters: the syscall must stay allowed.
    assert!(words(&s, "Service", "SystemCallFilter").contains(&"seccomp".to_string()));
    assert!(!s.contains_key(&("Service".to_string(), "PrivateNetwork".to_string())));
}

#[test]
fn control_plane_unit_keeps_what_the_server_needs() {
    let s = unit_settings("nkudo-control-plane");
    assert_eq!(
        one(&s, "Service", "ExecStart"),
        "/opt/nkudo/current/bin/nkudo-control-plane serve"
    );
    assert_eq!(one(&s, "Service", "EnvironmentFile"), "-/etc/nkudo/control-plane.env");
    // Its data directory is the StateDirectory systemd creates for the dynamic user.
    let state = one(&s, "Service", "StateDirectory");
    assert!(words(&s, "Service", "Environment").contains(&format!("NKUDO_DATA_DIR=/var/lib/{state}")));
    assert_eq!(one(&s, "Service", "DynamicUser"), "yes");
    assert_eq!(one(&s, "Service", "CapabilityBoundingSet"), "");
    // Listens on TCP and reaches Postgres over TCP or its Unix socket.
    let families = words(&s, "Service", "RestrictAddressFamilies");
    for f in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(families.contains(&f.to_string()), "{f} missing: {families:?}");
    }
    for absent in ["PrivateNetwork", "IPAddressDeny", "SocketBindDeny"] {
        assert!(
            !s.contains_key(&("Service".to_string(), absent.to_string())),
            "{absent}= would cut the control plane off its clients or its database"
        );
    }
    // The sample env file names the same data directory.
    let env = read(&deployments().join("config/control-plane.env"));
    assert!(env
        .lines()
        .any(|l| l.trim() == format!("NKUDO_DATA_DIR=/var/lib/{state}")));
}

// ---------------------------------------------------------------------------------------------------------------
// docker-compose

fn compose_dir() -> PathBuf {
    deployments().join("compose")
}

fn compose() -> Value {
    serde_yaml::from_str(&read(&compose_dir().join("docker-compose.yml"))).expect("docker-compose.yml parses")
}

fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_mapping().and_then(|m| m.get(key))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for k in path {
        cur = map_get(cur, k).unwrap_or_else(|| panic!("missing {} in {v:?}", path.join(".")));
    }
    cur
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    s(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn seq_strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

/// Pinned by our rule: third-party `name:tag@sha256:<64 hex>` (the tag says which version the digest is of);
/// ours (`nkudo-*`, `n-kudo/*`) by the exact workspace version (or a digest).
fn check_pinned(image: &str, version: &str) -> Result<(), String> {
    let (name_tag, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last = name_tag.rsplit('/').next().unwrap_or(name_tag);
    let tag = last.split_once(':').map(|(_, t)| t);
    let ours = last.starts_with("nkudo") || name_tag.contains("n-kudo/");
    if ours {
        match (tag, digest) {
            (_, Some(d)) if is_sha256_digest(d) => Ok(()),
            (Some(t), None) if t.strip_prefix('v').unwrap_or(t) == version => Ok(()),
            _ => Err(format!("{image}: our image must carry the release {version} exactly")),
        }
    } else {
        match (tag, digest) {
            (Some(t), Some(d)) if is_sha256_digest(d) && !t.is_empty() && t != "latest" => Ok(()),
            _ => Err(format!(
                "{image}: a third-party image needs <version tag>@sha256:<digest>"
            )),
        }
    }
}

#[test]
fn compose_images_are_pinned() {
    let version = workspace_version();
    let c = compose();
    let raw = read(&compose_dir().join("docker-compose.yml"));
    let services = s(&c, &["services"]).as_mapping().unwrap();
    assert!(services.len() >= 4);
    let mut ours = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let image = str_of(svc, &["image"]);
        if let Err(e) = check_pinned(image, &version) {
            panic!("service {name}: {e}");
        }
        if image.contains("n-kudo/") {
            ours += 1;
        }
        // The comment right above each third-party image names the version its digest is of.
        if let Some((name_tag, _)) = image.split_once('@') {
            let lines: Vec<&str> = raw.lines().collect();
            let at = lines
                .iter()
                .position(|l| l.trim() == format!("image: {image}"))
                .unwrap_or_else(|| panic!("image line of {name}"));
            let comment = lines[at - 1].trim();
            assert!(
                comment.starts_with('#') && comment.contains(name_tag.rsplit('/').next().unwrap()),
                "service {name}: the comment above the image should cite {name_tag}, found {comment:?}"
            );
        }
    }
    assert_eq!(ours, 1, "exactly the control plane is our image");
    assert!(check_pinned("postgres:16.6", &version).is_err());
    assert!(check_pinned("ghcr.io/n-kudo/nkudo-control-plane:0.0.1-pre.1", &version).is_err());
}

#[test]
fn compose_services_are_wired_with_healthchecks_volumes_and_conditions() {
    let c = compose();
    let services = s(&c, &["services"]);
    for name in ["postgres", "control-plane", "prometheus", "grafana"] {
        assert!(map_get(services, name).is_some(), "service {name} missing");
    }
    let declared_volumes: BTreeSet<String> = s(&c, &["volumes"])
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut conditions = Vec::new();
    for (name, svc) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap().to_string();
        if let Some(deps) = map_get(svc, "depends_on") {
            let deps = deps
                .as_mapping()
                .unwrap_or_else(|| panic!("{name}: depends_on must use the long form with a condition"));
            for (dep, how) in deps {
                let dep = dep.as_str().unwrap().to_string();
                let condition = str_of(how, &["condition"]).to_string();
                assert!(map_get(services, &dep).is_some(), "{name} depends on unknown {dep}");
                if condition == "service_healthy" {
                    let test = seq_strs(s(services, &[&dep, "healthcheck", "test"]));
                    assert!(test.len() >= 2 && test[0] == "CMD", "{dep}: healthcheck {test:?}");
                }
                conditions.push((name.clone(), dep, condition));
            }
        }
        for v in seq_strs(map_get(svc, "volumes").unwrap_or(&Value::Null)) {
            let source = v.split(':').next().unwrap();
            if source.starts_with('.') || source.starts_with('/') {
                let p = compose_dir().join(source);
                assert!(p.exists(), "{name}: bind mount source {} does not exist", p.display());
            } else {
                assert!(
                    declared_volumes.contains(source),
                    "{name}: volume {source} not declared"
                );
            }
        }
    }
    let has = |a: &str, b: &str, cond: &str| conditions.iter().any(|(x, y, z)| x == a && y == b && z == cond);
    assert!(has("control-plane", "postgres", "service_healthy"), "{conditions:?}");
    assert!(has("grafana", "prometheus", "service_healthy"), "{conditions:?}");
    for name in ["postgres", "control-plane", "prometheus", "grafana"] {
        assert!(
            map_get(s(services, &[name]), "healthcheck").is_some(),
            "{name} has no healthcheck"
        );
    }
    // The control plane checks itself (its image has no shell or HTTP client); the CA bundle is exported once
    // it is ready.
    assert_eq!(
        seq_strs(s(services, &["control-plane", "healthcheck", "test"])),
        ["CMD", "/usr/local/bin/nkudo-control-plane", "healthcheck"]
    );
    assert!(has("ca-bundle", "control-plane", "service_healthy"), "{conditions:?}");
    // The control plane talks to the Postgres service and to this Prometheus.
    let env = s(services, &["control-plane", "environment"]);
    assert!(str_of(env, &["DATABASE_URL"]).contains("@postgres:5432/"));
    assert_eq!(str_of(env, &["PROMETHEUS_URL"]), "http://prometheus:9090");
}

#[test]
fn compose_commits_no_secret() {
    let raw = read(&compose_dir().join("docker-compose.yml"));
    let example = read(&compose_dir().join(".env.example"));
    let defined: BTreeMap<String, String> = example
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    // Every variable the compose file interpolates is documented in .env.example, secrets with a placeholder.
    let mut used = BTreeSet::new();
    let mut rest = raw.as_str();
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap();
        used.insert(after[..end].to_string());
        rest = &after[end..];
    }
    assert!(!used.is_empty());
    for var in &used {
        let value = defined
            .get(var)
            .unwrap_or_else(|| panic!("${{{var}}} is not in .env.example"));
        let secret = ["PASSWORD", "KEY", "SECRET", "TOKEN"].iter().any(|w| var.contains(w));
        assert!(
            !secret || value.starts_with("replace-with"),
            "{var}={value} looks like a real secret"
        );
    }
    // Secret-looking settings in the compose file are interpolated, never literal.
    let c = compose();
    for (name, svc) in s(&c, &["services"]).as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let Some(env) = map_get(svc, "environment").and_then(|e| e.as_mapping()) else {
            continue;
        };
        for (k, v) in env {
            let k = k.as_str().unwrap();
            let v = v.as_str().map(str::to_string).unwrap_or_else(|| format!("{v:?}"));
            let secret = ["PASSWORD", "ADMIN_KEY", "SECRET", "TOKEN", "DATABASE_URL"]
                .iter()
                .any(|w| k.contains(w));
            if secret {
                assert!(v.contains("${"), "{name}: {k} is a literal secret");
            }
        }
    }
    // The real file is ignored.
    assert!(read(&compose_dir().join(".gitignore"))
        .lines()
        .any(|l| l.trim() == ".env"));
}

#[test]
fn compose_prometheus_mounts_the_config_rules_and_ca_bundle_it_reads() {
    let c = compose();
    let prom = s(&c, &["services", "prometheus"]);
    let mounts: BTreeMap<String, String> = seq_strs(s(prom, &["volumes"]))
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (parts[1].to_string(), parts[0].to_string())
        })
        .collect();
    let config_src = mounts
        .get("/etc/prometheus/prometheus.yml")
        .expect("prometheus.yml mounted at /etc/prometheus/prometheus.yml");
    let config_path = compose_dir().join(config_src);
    assert!(config_path.is_file(), "{}", config_path.display());
    assert!(seq_strs(s(prom, &["command"])).contains(&"--config.file=/etc/prometheus/prometheus.yml".to_string()));
    let config: Value = serde_yaml::from_str(&read(&config_path)).unwrap();
    // Each rule_files glob (relative to the config file) lands in a mounted directory holding rule files.
    for pattern in seq_strs(s(&config, &["rule_files"])) {
        let dir = Path::new(&pattern).parent().unwrap().to_string_lossy().to_string();
        let src = mounts
            .get(&format!("/etc/prometheus/{dir}"))
            .unwrap_or_else(|| panic!("rule_files {pattern}: /etc/prometheus/{dir} is not mounted"));
        let host = compose_dir().join(src);
        let rules: Vec<_> = fs::read_dir(&host)
            .unwrap_or_else(|e| panic!("{}: {e}", host.display()))
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "yml"))
            .collect();
        assert!(!rules.is_empty(), "no rule files in {}", host.display());
        assert_eq!(
            fs::canonicalize(&host).unwrap(),
            fs::canonicalize(config_path.parent().unwrap().join(&dir)).unwrap()
        );
    }
    // TLS files the scrape configs name are in mounted volumes, and the scraped host:port is a compose service.
    for job in s(&config, &["scrape_configs"]).as_sequence().unwrap() {
        if let Some(ca) = map_get(job, "tls_config").and_then(|t| map_get(t, "ca_file")) {
            let ca = ca.as_str().unwrap();
            let dir = Path::new(ca).parent().unwrap().to_string_lossy().to_string();
            let volume = mounts
                .get(&dir)
                .unwrap_or_else(|| panic!("{ca}: nothing mounted at {dir}"));
            // Filled by the one-shot service that writes that volume, which Prometheus waits for.
            let writer = s(&c, &["services"])
                .as_mapping()
                .unwrap()
                .iter()
                .find(|(_, svc)| {
                    seq_strs(map_get(svc, "volumes").unwrap_or(&Value::Null))
                        .iter()
                        .any(|v| v.starts_with(&format!("{volume}:")) && !v.ends_with(":ro"))
                })
                .map(|(n, _)| n.as_str().unwrap().to_string())
                .unwrap_or_else(|| panic!("no service writes volume {volume}"));
            assert_eq!(
                str_of(prom, &["depends_on", &writer, "condition"]),
                "service_completed_successfully"
            );
        }
        for sc in map_get(job, "static_configs")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            for target in seq_strs(s(sc, &["targets"])) {
                let host = target.split(':').next().unwrap();
                assert!(
                    host == "localhost" || map_get(s(&c, &["services"]), host).is_some(),
                    "scrape target {target} is no compose service"
                );
            }
        }
    }
}

fn grafana_dir() -> PathBuf {
    deployments().join("grafana")
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(&grafana_dir().join("dashboards/nkudo-fleet.json"))).expect("dashboard JSON parses")
}

/// Every panel (rows' nested panels too) with its PromQL expressions.
fn panels_with_exprs(d: &serde_json::Value) -> Vec<(String, Vec<String>, serde_json::Value)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested.iter());
        }
        if p["type"] == "row" {
            continue;
        }
        let exprs = p["targets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter_map(|t| t["expr"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            p["title"].as_str().unwrap_or("").to_string(),
            exprs,
            p["datasource"].clone(),
        ));
    }
    out
}

#[test]
fn grafana_provisioning_and_fleet_dashboard() {
    let c = compose();
    let graf = s(&c, &["services", "grafana"]);
    let mounts: BTreeMap<String, String> = seq_strs(s(graf, &["volumes"]))
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (parts[1].to_string(), parts[0].to_string())
        })
        .collect();
    let prov = compose_dir().join(mounts.get("/etc/grafana/provisioning").expect("provisioning mounted"));
    assert_eq!(
        fs::canonicalize(&prov).unwrap(),
        fs::canonicalize(grafana_dir().join("provisioning")).unwrap()
    );
    // The data source: Prometheus at the compose service, with the uid the dashboard uses.
    let ds_files: Vec<_> = fs::read_dir(prov.join("datasources"))
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert!(!ds_files.is_empty());
    let mut uids = BTreeSet::new();
    for f in ds_files {
        let v: Value = serde_yaml::from_str(&read(&f.path())).unwrap();
        for ds in s(&v, &["datasources"]).as_sequence().unwrap() {
            assert_eq!(str_of(ds, &["type"]), "prometheus");
            let url = str_of(ds, &["url"]);
            let host = url.trim_start_matches("http://").split(':').next().unwrap();
            assert!(
                map_get(s(&c, &["services"]), host).is_some(),
                "data source {url}: no such service"
            );
            uids.insert(str_of(ds, &["uid"]).to_string());
        }
    }
    // The dashboard provider loads the directory the dashboards are mounted at.
    let providers: Vec<_> = fs::read_dir(prov.join("dashboards"))
        .unwrap()
        .filter_map(|e| e.ok())
        .collect();
    assert!(!providers.is_empty());
    for f in providers {
        let v: Value = serde_yaml::from_str(&read(&f.path())).unwrap();
        for p in s(&v, &["providers"]).as_sequence().unwrap() {
            let path = str_of(p, &["options", "path"]);
            let src = mounts
                .get(path)
                .unwrap_or_else(|| panic!("provider path {path} is not mounted"));
            let host = compose_dir().join(src);
            assert!(host.join("nkudo-fleet.json").is_file(), "{}", host.display());
        }
    }
    // The dashboard: the panels on-call needs, all on the provisioned data source.
    let d = dashboard();
    let panels = panels_with_exprs(&d);
    for (title, exprs, ds) in &panels {
        assert!(!exprs.is_empty(), "panel {title:?} has no query");
        let uid = ds["uid"].as_str().unwrap_or("");
        assert!(
            uids.contains(uid),
            "panel {title:?}: data source {uid:?} is not provisioned ({uids:?})"
        );
    }
    let any = |pred: &dyn Fn(&str) -> bool| panels.iter().any(|(_, exprs, _)| exprs.iter().any(|e| pred(e)));
    assert!(any(&|e| e.contains("nkudo_agent_info")
        && e.contains("ring")
        && e.contains("version")));
    assert!(any(&|e| e.contains("nkudo_site_heartbeat_lag_seconds")));
    assert!(any(
        &|e| e.contains("nkudo_plan_executions_total") && e.contains("failed")
    ));
    assert!(any(&|e| e.contains("nkudo_rollout_stage")));
    assert!(any(&|e| e.contains("nkudo_rollout_state")));
    assert!(any(
        &|e| e.contains("histogram_quantile(0.95") && e.contains("nkudo_heartbeat_ingest_seconds_bucket")
    ));
}

/// Grafana's variables replaced by values PromQL accepts.
fn grafana_expr_to_promql(e: &str) -> String {
    e.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$ring", ".*")
        .replace("$environment", ".*")
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let Some(promtool) = tool("promtool") else { return };
    let d = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for (title, exprs, _) in panels_with_exprs(&d) {
        for e in exprs {
            n += 1;
            let q = grafana_expr_to_promql(&e);
            assert!(!q.contains('$'), "panel {title:?}: unknown variable in {e}");
            rules.push_str(&format!(
                "      - record: dashboard:q{n}\n        expr: {}\n",
                serde_json::to_string(&q).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.yml");
    fs::write(&file, &rules).unwrap();
    let o = run(Command::new(&promtool).arg("check").arg("rules").arg(&file));
    assert!(o.status.success(), "{rules}\n{}", text(&o));
    // And the check bites: a broken expression fails it.
    fs::write(&file, rules.replacen("sum by", "sum byy", 1)).unwrap();
    let o = run(Command::new(&promtool).arg("check").arg("rules").arg(&file));
    assert!(!o.status.success(), "promtool accepted a broken expression");
}

#[test]
fn compose_config_by_docker_compose_where_installed() {
    let plugin = Command::new("docker").args(["compose", "version"]).output();
    if !plugin.is_ok_and(|o| o.status.success()) {
        eprintln!("note: `docker compose` is not installed here; its `config -q` check is not run");
        return;
    }
    let o = run(Command::new("docker")
        .args(["compose", "--env-file"])
        .arg(compose_dir().join(".env.example"))
        .arg("-f")
        .arg(compose_dir().join("docker-compose.yml"))
        .args(["config", "-q"]));
    assert!(o.status.success(), "{}", text(&o));
}

// ---------------------------------------------------------------------------------------------------------------
// Kubernetes

fn k8s_docs() -> Vec<(String, Value)> {
    let dir = deployments().join("k8s");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = read(&f);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().to_string(), v));
            }
        }
    }
    out
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| map_get(d, "kind").and_then(|k| k.as_str()) == Some(kind) && str_of(d, &["metadata", "name"]) == name)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| map_get(labels, k.as_str().unwrap()) == Some(v))
}

#[test]
fn k8s_manifests_parse_and_hang_together() {
    let docs = k8s_docs();
    let mut files_with_resources = BTreeSet::new();
    for (file, d) in &docs {
        let kind = str_of(d, &["kind"]);
        assert!(map_get(d, "apiVersion").is_some(), "{file}: no apiVersion");
        if kind == "Kustomization" {
            continue;
        }
        let name = str_of(d, &["metadata", "name"]);
        if kind != "Namespace" {
            assert_eq!(str_of(d, &["metadata", "namespace"]), "nkudo", "{file}: {kind}/{name}");
        }
        files_with_resources.insert(file.clone());
    }
    // The kustomization lists every manifest, and only those.
    let kustomization = docs
        .iter()
        .find(|(_, d)| str_of(d, &["kind"]) == "Kustomization")
        .map(|(_, d)| d)
        .expect("kustomization.yaml");
    let listed: BTreeSet<String> = seq_strs(s(kustomization, &["resources"])).into_iter().collect();
    assert_eq!(listed, files_with_resources);

    let version = workspace_version();
    let rollout = find(&docs, "Rollout", "nkudo-control-plane").expect("Rollout nkudo-control-plane");
    assert_eq!(str_of(rollout, &["apiVersion"]), "argoproj.io/v1alpha1");
    let template = s(rollout, &["spec", "template"]);
    let pod_labels = s(template, &["metadata", "labels"]);
    assert!(labels_match(
        s(rollout, &["spec", "selector", "matchLabels"]),
        pod_labels
    ));
    assert_eq!(str_of(pod_labels, &["app.kubernetes.io/version"]), version);
    let pod = s(template, &["spec"]);
    assert_eq!(s(pod, &["securityContext", "runAsNonRoot"]).as_bool(), Some(true));
    let containers = s(pod, &["containers"]).as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    check_pinned(str_of(c, &["image"]), &version).unwrap();
    assert!(str_of(c, &["image"]).ends_with(&format!(":{version}")));
    let sc = s(c, &["securityContext"]);
    assert_eq!(s(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    assert_eq!(s(sc, &["allowPrivilegeEscalation"]).as_bool(), Some(false));
    assert_eq!(seq_strs(s(sc, &["capabilities", "drop"])), vec!["ALL".to_string()]);
    for k in ["cpu", "memory"] {
        assert!(map_get(s(c, &["resources", "requests"]), k).is_some(), "requests.{k}");
    }
    assert!(map_get(s(c, &["resources", "limits"]), "memory").is_some());
    // Probes hit the control plane's health routes over HTTPS on its port.
    let router = read(&root().join("control-plane/src/routes/mod.rs"));
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = s(c, &[probe, "httpGet"]);
        assert_eq!(str_of(get, &["path"]), path, "{probe}");
        assert_eq!(str_of(get, &["scheme"]), "HTTPS", "{probe}");
        assert_eq!(str_of(get, &["port"]), "https", "{probe}");
        assert!(router.contains(&format!(".route(\"{path}\"")), "{path} is no route");
    }
    let ports = s(c, &["ports"]).as_sequence().unwrap();
    assert!(ports
        .iter()
        .any(|p| str_of(p, &["name"]) == "https" && s(p, &["containerPort"]).as_u64() == Some(8443)));
    // Writable paths are volumes (the root filesystem is read-only): the data directory and /tmp.
    let config = find(&docs, "ConfigMap", "nkudo-control-plane").expect("ConfigMap");
    let mount_paths: Vec<String> = s(c, &["volumeMounts"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| str_of(m, &["mountPath"]).to_string())
        .collect();
    assert!(mount_paths.contains(&str_of(config, &["data", "NKUDO_DATA_DIR"]).to_string()));
    assert!(mount_paths.contains(&"/tmp".to_string()));
    // ConfigMap and Secret references resolve: the ConfigMap is here, the Secrets are documented.
    let readme = read(&deployments().join("k8s/README.md"));
    for from in s(c, &["envFrom"]).as_sequence().unwrap() {
        let name = str_of(from, &["configMapRef", "name"]);
        assert!(find(&docs, "ConfigMap", name).is_some(), "ConfigMap {name}");
    }
    for env in s(c, &["env"]).as_sequence().unwrap() {
        let secret = str_of(env, &["valueFrom", "secretKeyRef", "name"]);
        let key = str_of(env, &["valueFrom", "secretKeyRef", "key"]);
        assert!(
            readme.contains(&format!("create secret generic {secret} ")) && readme.contains(&format!("{key}=")),
            "README.md must show how to create Secret {secret} with {key}"
        );
    }
    // The PKI files the ConfigMap names are the Secret volume's items.
    let pki_volume = s(pod, &["volumes"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| map_get(v, "secret").is_some())
        .expect("PKI secret volume");
    let pki_name = str_of(pki_volume, &["name"]);
    let pki_mount = s(c, &["volumeMounts"])
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| str_of(m, &["name"]) == pki_name)
        .map(|m| str_of(m, &["mountPath"]).to_string())
        .unwrap();
    let items: BTreeSet<String> = s(pki_volume, &["secret", "items"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| format!("{pki_mount}/{}", str_of(i, &["path"])))
        .collect();
    for var in ["CA_CERT_FILE", "CA_KEY_FILE", "SERVER_CERT_FILE", "SERVER_KEY_FILE"] {
        assert!(
            items.contains(str_of(config, &["data", var])),
            "{var} is not in the PKI Secret volume"
        );
    }
    assert!(readme.contains(&format!(
        "create secret generic {}",
        str_of(pki_volume, &["secret", "secretName"])
    )));
    assert_eq!(str_of(config, &["data", "REQUIRE_PERSISTENT_PKI"]), "true");

    // Services: the stable and canary Services exist and select the pods; the PDB covers them.
    let canary = s(rollout, &["spec", "strategy", "canary"]);
    for key in ["stableService", "canaryService"] {
        let name = str_of(canary, &[key]);
        let svc = find(&docs, "Service", name).unwrap_or_else(|| panic!("{key} {name}"));
        assert!(
            labels_match(s(svc, &["spec", "selector"]), pod_labels),
            "{name} selects no pod"
        );
        assert_ne!(str_of(svc, &["metadata", "name"]), "nkudo-control-plane");
    }
    let main = find(&docs, "Service", "nkudo-control-plane").expect("main Service");
    assert!(labels_match(s(main, &["spec", "selector"]), pod_labels));
    let pdb = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| str_of(d, &["kind"]) == "PodDisruptionBudget")
        .expect("PodDisruptionBudget");
    assert!(labels_match(s(pdb, &["spec", "selector", "matchLabels"]), pod_labels));
}

/// The analysis step of the canary, with the AnalysisTemplates it names.
fn analysis_templates(docs: &[(String, Value)]) -> (Vec<Value>, &Value) {
    let rollout = find(docs, "Rollout", "nkudo-control-plane").expect("Rollout");
    let steps = s(rollout, &["spec", "strategy", "canary", "steps"])
        .as_sequence()
        .unwrap();
    assert_eq!(
        s(&steps[0], &["setWeight"]).as_u64(),
        Some(10),
        "first step: {:?}",
        steps[0]
    );
    let pause = steps
        .iter()
        .position(|st| map_get(st, "pause").is_some())
        .expect("a pause (the bake)");
    let duration = str_of(&steps[pause], &["pause", "duration"]);
    assert!(duration.ends_with('m') || duration.ends_with('h'), "bake {duration}");
    let analysis_at = steps
        .iter()
        .position(|st| map_get(st, "analysis").is_some())
        .expect("an analysis step");
    assert!(analysis_at > pause, "the analysis comes after the bake");
    assert!(
        steps[analysis_at + 1..]
            .iter()
            .all(|st| map_get(st, "setWeight").is_none_or(|w| w.as_u64() == Some(100))),
        "after the analysis the canary is promoted"
    );
    let analysis = s(&steps[analysis_at], &["analysis"]);
    let args = s(analysis, &["args"]).as_sequence().unwrap();
    let hash = args
        .iter()
        .find(|a| str_of(a, &["name"]) == "canary-hash")
        .expect("canary-hash arg");
    assert_eq!(str_of(hash, &["valueFrom", "podTemplateHashValue"]), "Latest");
    let templates = s(analysis, &["templates"])
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| {
            let name = str_of(t, &["templateName"]);
            find(docs, "AnalysisTemplate", name)
                .unwrap_or_else(|| panic!("AnalysisTemplate {name} does not exist"))
                .clone()
        })
        .collect();
    (templates, analysis)
}

/// (template, metric, query, successCondition) of every metric.
fn analysis_metrics(templates: &[Value]) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for t in templates {
        let tname = str_of(t, &["metadata", "name"]).to_string();
        let declared: BTreeSet<String> = s(t, &["spec", "args"])
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| str_of(a, &["name"]).to_string())
            .collect();
        for m in s(t, &["spec", "metrics"]).as_sequence().unwrap() {
            let mname = str_of(m, &["name"]).to_string();
            assert!(
                s(m, &["failureLimit"]).as_u64().is_some(),
                "{tname}/{mname}: failureLimit"
            );
            let prom = s(m, &["provider", "prometheus"]);
            let query = str_of(prom, &["query"]).to_string();
            let address = str_of(prom, &["address"]);
            for text in [query.as_str(), address] {
                let mut rest = text;
                while let Some(i) = rest.find("{{args.") {
                    let after = &rest[i + 7..];
                    let end = after.find("}}").unwrap();
                    assert!(
                        declared.contains(&after[..end]),
                        "{tname}: args.{} not declared",
                        &after[..end]
                    );
                    rest = &after[end..];
                }
            }
            assert!(
                query.contains("rollouts_pod_template_hash=\"{{args.canary-hash}}\""),
                "{tname}/{mname} does not select the canary pods: {query}"
            );
            out.push((
                tname.clone(),
                mname,
                query,
                str_of(m, &["successCondition"]).to_string(),
            ));
        }
    }
    out
}

#[test]
fn rollout_canary_is_analysed_on_our_three_metrics() {
    let docs = k8s_docs();
    let (templates, _) = analysis_templates(&docs);
    let metrics = analysis_metrics(&templates);
    let by = |needle: &str| metrics.iter().filter(|(_, _, q, _)| q.contains(needle)).count();
    assert!(by("nkudo_enrollments_total") >= 1, "enrollment success rate");
    assert!(by("nkudo_heartbeat_ingest_seconds_bucket") >= 1, "heartbeat ingest p95");
    assert!(metrics.iter().any(
        |(_, _, q, _)| q.contains("nkudo_heartbeat_ingest_seconds_bucket") && q.contains("histogram_quantile(0.95")
    ));
    assert!(by("nkudo_plan_executions_total") >= 1, "plan failure rate");
}

/// `result[0] >= 0.9` → (">=", "0.9").
fn parse_condition(c: &str) -> (String, String) {
    let rest = c
        .trim()
        .strip_prefix("result[0]")
        .unwrap_or_else(|| panic!("successCondition {c:?}: expected `result[0] <op> <number>`"))
        .trim();
    for op in [">=", "<=", ">", "<", "=="] {
        if let Some(num) = rest.strip_prefix(op) {
            let num = num.trim();
            num.parse::<f64>()
                .unwrap_or_else(|_| panic!("successCondition {c:?}: {num} is no number"));
            return (op.to_string(), num.to_string());
        }
    }
    panic!("successCondition {c:?}: no comparison");
}

/// Synthetic series, one sample a minute for 30 minutes. Pods by `rollouts_pod_template_hash`:
/// `good` (a healthy canary), `bad` (a broken one), `quiet` (a canary whose counters exist but did not move),
/// `stable` (a broken stable version, to show it does not leak into a canary's verdict); `idle` has no series.
const ANALYSIS_SERIES: &str = r#"
      # Enrollments: good 60 succeed and 3 fail a minute (0.952), with a flood of rate-limited attempts that do
      # not count; bad half fail; stable all fail.
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="good",result="success"}'
        values: '0+60x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="good",result="token_expired"}'
        values: '0+3x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="good",result="rate_limited"}'
        values: '0+600x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="bad",result="success"}'
        values: '0+30x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="bad",result="invalid_csr"}'
        values: '0+30x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="quiet",result="success"}'
        values: '5x30'
      - series: 'nkudo_enrollments_total{rollouts_pod_template_hash="stable",result="error"}'
        values: '0+100x30'
      # Heartbeat ingest: good all under 5 ms; bad all between 0.25 and 0.5 s; stable likewise slow.
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="good",le="0.005"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="good",le="0.1"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="good",le="0.25"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="good",le="0.5"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="good",le="+Inf"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="bad",le="0.005"}'
        values: '0x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="bad",le="0.1"}'
        values: '0x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="bad",le="0.25"}'
        values: '0x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="bad",le="0.5"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="bad",le="+Inf"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="quiet",le="0.1"}'
        values: '7x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="quiet",le="+Inf"}'
        values: '7x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="stable",le="0.5"}'
        values: '0+600x30'
      - series: 'nkudo_heartbeat_ingest_seconds_bucket{rollouts_pod_template_hash="stable",le="+Inf"}'
        values: '0+600x30'
      # Plan executions: good 1 in 20 fails (0.05); bad half fail; stable all fail.
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="good",result="succeeded",agent_version="1.2.0"}'
        values: '0+19x30'
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="good",result="failed",agent_version="1.2.0"}'
        values: '0+1x30'
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="bad",result="succeeded",agent_version="1.2.0"}'
        values: '0+5x30'
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="bad",result="failed",agent_version="1.2.0"}'
        values: '0+5x30'
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="quiet",result="failed",agent_version="1.2.0"}'
        values: '2x30'
      - series: 'nkudo_plan_executions_total{rollouts_pod_template_hash="stable",result="failed",agent_version="1.1.0"}'
        values: '0+50x30'
"#;

#[test]
fn analysis_queries_pass_a_good_canary_and_fail_a_bad_one() {
    let Some(promtool) = tool("promtool") else { return };
    let docs = k8s_docs();
    let (templates, _) = analysis_templates(&docs);
    let metrics = analysis_metrics(&templates);
    assert_eq!(metrics.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("none.yml"), "groups: []\n").unwrap();
    let mut tests =
        String::from("rule_files: [none.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n");
    tests.push_str(ANALYSIS_SERIES);
    tests.push_str("    promql_expr_test:\n");
    // Each metric's query with its successCondition turned into a PromQL `bool` comparison, per canary.
    for (tname, mname, query, condition) in &metrics {
        let (op, num) = parse_condition(condition);
        for (hash, passes) in [("good", true), ("bad", false), ("quiet", true), ("idle", true)] {
            let q = query.replace("{{args.canary-hash}}", hash);
            let expr = format!("({}) {op} bool {num}", q.trim());
            tests.push_str(&format!(
                "      # {tname}/{mname}, canary {hash}: {}\n      - expr: {}\n        eval_time: 25m\n        exp_samples:\n          - labels: '{{}}'\n            value: {}\n",
                if passes { "passes" } else { "fails" },
                serde_json::to_string(&expr).unwrap(),
                if passes { 1 } else { 0 }
            ));
        }
    }
    let file = dir.path().join("analysis.test.yml");
    fs::write(&file, &tests).unwrap();
    let o = run(Command::new(&promtool)
        .current_dir(dir.path())
        .args(["test", "rules", "analysis.test.yml"]));
    assert!(o.status.success(), "{tests}\n{}", text(&o));
    // The verdicts are not vacuous: claiming the bad canary passes makes promtool fail.
    let flipped = tests.replacen("canary bad: fails\n", "canary bad: claimed to pass\n", 1);
    let at = flipped.find("claimed to pass").unwrap();
    let value_at = at + flipped[at..].find("value: 0").unwrap();
    let flipped = format!("{}value: 1{}", &flipped[..value_at], &flipped[value_at + 8..]);
    fs::write(&file, &flipped).unwrap();
    let o = run(Command::new(&promtool)
        .current_dir(dir.path())
        .args(["test", "rules", "analysis.test.yml"]));
    assert!(!o.status.success(), "promtool accepted a wrong verdict: {}", text(&o));
}

// ---------------------------------------------------------------------------------------------------------------
// releaser lint-deploy

#[test]
fn lint_deploy_passes_on_deployments_and_catches_a_removed_digest() {
    let releaser = bin_path("releaser");
    let o = run(Command::new(&releaser).arg("lint-deploy").arg(deployments()));
    assert!(o.status.success(), "releaser lint-deploy deployments/: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("pinned"), "{out}");
    // The same compose file with Postgres' digest dropped is refused, naming the line.
    let raw = read(&compose_dir().join("docker-compose.yml"));
    let (line_no, line) = raw
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim_start().starts_with("image: postgres:"))
        .expect("postgres image line");
    let unpinned = line.split('@').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("docker-compose.yml");
    fs::write(&copy, raw.replacen(line, unpinned, 1)).unwrap();
    let o = run(Command::new(&releaser).arg("lint-deploy").arg(&copy));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains(&format!("docker-compose.yml:{}", line_no + 1)) && out.contains("unpinned-third-party"),
        "{out}"
    );
}
