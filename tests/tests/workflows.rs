//! The GitHub Actions workflows (`.github/workflows/`) and their helper scripts (`.github/scripts/`).
//!
//! * `actionlint` (env `NKUDO_ACTIONLINT`, else `actionlint` on PATH) with its shellcheck integration passes on
//!   every workflow, also with each SHA-pinned action replaced by the major release its comment names (so that
//!   actionlint checks the inputs and the runtime of the pinned releases), and does catch an injected expression
//!   and a shellcheck finding (so that a pass means something);
//! * every third-party action is pinned by a 40-hex commit SHA with a `# vX.Y.Z` comment, every container image
//!   by digest; no `run:` script interpolates `${{ }}` (inputs reach scripts through `env:` only); no workflow
//!   grants write permissions at the top level; every secret and variable they read is documented in
//!   `.github/workflows/README.md` (and every variable declared to actionlint);
//! * `ci.yml` runs exactly the test command README.md gives, and so does `.ci/run`;
//! * `release.yml` triggers on `v*` tags and runs `cargo xtask dist` with the key, verifies with `releaser verify`
//!   and stock minisign, publishes pre-release tags as GitHub pre-releases; its tag check step accepts the
//!   workspace version's tags and refuses the others (the step's own script is run);
//! * `promote-release.yml` has the inputs prerelease, version and rollback, runs `releaser promote`, opens an
//!   incident issue on a rollback; its input validation step is run against good and hostile inputs;
//! * the helper scripts are shellcheck clean, `trusted-pubkey.sh` accepts and refuses keys as documented and
//!   `verify-release-dir.sh` accepts a release `releaser package` wrote and one `releaser promote` wrote, and
//!   refuses tampered ones.
//!
//! * the signing steps of release.yml and promote-release.yml (run against a stand-in build) hand the key from the
//!   secret as a 0600 file under $RUNNER_TEMP, removed however the step ends.
//!
//! External tools: `actionlint`, `shellcheck`, `minisign`, `jq`. Missing with `CI=true`: the test fails; otherwise it
//! prints `SKIPPED: <tool> missing` and returns.

use nkudo_tests::{bin_path, in_ci, TempDir};
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn workflows_dir() -> PathBuf {
    workspace().join(".github/workflows")
}

/// Every `.github/workflows/*.yml` / `*.yaml`, sorted.
fn workflow_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workflows_dir())
        .expect("reading .github/workflows")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no workflows under .github/workflows");
    files
}

fn helper_scripts() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace().join(".github/scripts"))
        .expect("reading .github/scripts")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn load(name: &str) -> Value {
    let path = workflows_dir().join(name);
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tool's path, or None after applying the missing-tool rule (CI=true: panic; else a SKIPPED line).
fn tool(name: &str, env_override: Option<&str>) -> Option<PathBuf> {
    if let Some(var) = env_override {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "{var}={} does not exist", p.display());
            return Some(p);
        }
    }
    match find_in_path(name) {
        Some(p) => Some(p),
        None if in_ci() => panic!("{name} is required by tests/tests/workflows.rs and CI=true: install it"),
        None => {
            eprintln!("SKIPPED: {name} missing");
            None
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `actionlint` with its shellcheck integration on `files`, run in `dir`.
fn actionlint(actionlint: &Path, shellcheck: &Path, dir: &Path, files: &[PathBuf]) -> Output {
    let out = Command::new(actionlint)
        .arg("-no-color")
        .arg("-shellcheck")
        .arg(shellcheck)
        .args(files)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running actionlint");
    eprintln!("actionlint {}:\n{}", files.len(), text(&out));
    out
}

#[test]
fn actionlint_with_shellcheck_passes() {
    let Some(al) = tool("actionlint", Some("NKUDO_ACTIONLINT")) else {
        return;
    };
    let Some(sc) = tool("shellcheck", None) else {
        return;
    };
    let out = actionlint(&al, &sc, &workspace(), &workflow_files());
    assert!(out.status.success(), "actionlint found problems:\n{}", text(&out));
}

/// actionlint cannot see which release a commit SHA is, so it checks neither the inputs given to a pinned action
/// nor its runtime (node20 actions stopped running in September 2026). Here every `owner/repo@<sha> # vX.Y.Z` is
/// rewritten to `owner/repo@vX` in a copy of the workflows, which actionlint does check.
#[test]
fn actionlint_checks_the_pinned_releases() {
    let Some(al) = tool("actionlint", Some("NKUDO_ACTIONLINT")) else {
        return;
    };
    let Some(sc) = tool("shellcheck", None) else {
        return;
    };
    let tmp = TempDir::new("workflows-majors").expect("temp dir");
    let dir = tmp.path().join(".github/workflows");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = workspace().join(".github/actionlint.yaml");
    if config.is_file() {
        std::fs::copy(&config, tmp.path().join(".github/actionlint.yaml")).expect("copy");
    }
    let mut files = Vec::new();
    let mut rewritten = 0;
    for file in workflow_files() {
        let mut out = String::new();
        for line in read(&file).lines() {
            match uses_on_line(line) {
                Some((reference, comment)) if !reference.starts_with("./") && !reference.starts_with("docker://") => {
                    let (action, _) = reference.split_once('@').expect("@ref");
                    let major = comment
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.split('.').next())
                        .expect("version comment");
                    let indent = &line[..line.find("uses:").expect("uses:")];
                    out.push_str(&format!("{indent}uses: {action}@{major}\n"));
                    rewritten += 1;
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        let copy = dir.join(file.file_name().expect("name"));
        std::fs::write(&copy, out).expect("write");
        files.push(copy);
    }
    assert!(rewritten > 0, "no pinned action found");
    let out = actionlint(&al, &sc, tmp.path(), &files);
    assert!(
        out.status.success(),
        "actionlint finds problems with the releases the pins name (inputs, deprecated runtime):\n{}",
        text(&out)
    );
}

/// The control: the same invocation fails on a workflow with an injected expression and a shellcheck finding.
#[test]
fn actionlint_catches_injection_and_shellcheck_findings() {
    let Some(al) = tool("actionlint", Some("NKUDO_ACTIONLINT")) else {
        return;
    };
    let Some(sc) = tool("shellcheck", None) else {
        return;
    };
    let tmp = TempDir::new("workflows-actionlint").expect("temp dir");
    let dir = tmp.path().join(".github/workflows");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bad = dir.join("bad.yml");
    std::fs::write(
        &bad,
        "name: bad\non:\n  issues:\n    types: [opened]\npermissions: {}\njobs:\n  triage:\n    runs-on: ubuntu-24.04\n    \
         steps:\n      - run: |\n          echo \"${{ github.event.issue.title }}\"\n          files=$(ls)\n          \
         echo $files\n",
    )
    .expect("write");
    let out = actionlint(&al, &sc, tmp.path(), &[bad]);
    let all = text(&out);
    assert!(!out.status.success(), "actionlint passed a bad workflow:\n{all}");
    assert!(
        all.contains("potentially untrusted"),
        "no expression-injection finding:\n{all}"
    );
    assert!(
        all.contains("SC2086"),
        "no shellcheck finding (is the integration on?):\n{all}"
    );
}

#[test]
fn helper_scripts_are_shellcheck_clean() {
    let Some(sc) = tool("shellcheck", None) else {
        return;
    };
    let scripts = helper_scripts();
    assert!(!scripts.is_empty(), "no .github/scripts/*.sh");
    for s in &scripts {
        let out = Command::new(&sc).arg(s).output().expect("running shellcheck");
        assert!(out.status.success(), "shellcheck {}:\n{}", s.display(), text(&out));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(s).expect("stat").permissions());
        assert!(
            mode & 0o111 != 0,
            "{} is not executable (the workflows run it directly)",
            s.display()
        );
    }
}

/// A `uses:` reference from a workflow line: (reference, comment after `#`).
fn uses_on_line(line: &str) -> Option<(String, String)> {
    let t = line.trim_start();
    let t = t.strip_prefix("- ").map(str::trim_start).unwrap_or(t);
    let rest = t.strip_prefix("uses:")?;
    let (value, comment) = match rest.split_once('#') {
        Some((v, c)) => (v, c.trim()),
        None => (rest, ""),
    };
    let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
    Some((value.to_string(), comment.to_string()))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `vX.Y.Z` (at least major.minor.patch) at the start of the comment.
fn is_version_comment(c: &str) -> bool {
    let word = c.split_whitespace().next().unwrap_or("");
    let Some(v) = word.strip_prefix('v') else {
        return false;
    };
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Every step mapping of every job.
fn steps(wf: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    if let Some(jobs) = wf.get("jobs").and_then(Value::as_mapping) {
        for job in jobs.values() {
            if let Some(steps) = job.get("steps").and_then(Value::as_sequence) {
                out.extend(steps.iter());
            }
        }
    }
    out
}

fn jobs(wf: &Value) -> Vec<(String, &Value)> {
    wf.get("jobs")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn actions_pinned_by_commit_sha_and_images_by_digest() {
    let mut pinned = 0;
    for file in workflow_files() {
        let name = file.display().to_string();
        let src = read(&file);
        let mut on_lines = 0;
        for (n, line) in src.lines().enumerate() {
            let Some((reference, comment)) = uses_on_line(line) else {
                continue;
            };
            on_lines += 1;
            let at = format!("{name}:{}", n + 1);
            if reference.starts_with("./") {
                continue;
            }
            if let Some(image) = reference.strip_prefix("docker://") {
                let digest = image.split_once("@sha256:").map(|(_, d)| d).unwrap_or("");
                assert!(is_hex(digest, 64), "{at}: {reference} is not pinned by digest");
                continue;
            }
            let (action, git_ref) = reference
                .split_once('@')
                .unwrap_or_else(|| panic!("{at}: {reference} has no @ref"));
            assert!(
                is_hex(git_ref, 40),
                "{at}: {action} is pinned to {git_ref:?}, not a full 40-hex commit SHA"
            );
            assert!(
                is_version_comment(&comment),
                "{at}: {action}@{git_ref} needs a `# vX.Y.Z` comment naming the release it is"
            );
            pinned += 1;
        }
        // Every `uses` the YAML holds was seen on a line of its own (no flow-style step escaped the check).
        let wf: Value = serde_yaml::from_str(&src).expect("YAML");
        let in_yaml = steps(&wf).iter().filter(|s| s.get("uses").is_some()).count();
        assert_eq!(on_lines, in_yaml, "{name}: `uses:` lines and YAML steps disagree");

        for (job_name, job) in jobs(&wf) {
            let mut images: Vec<String> = Vec::new();
            match job.get("container") {
                Some(Value::String(s)) => images.push(s.clone()),
                Some(c) => images.extend(c.get("image").and_then(Value::as_str).map(String::from)),
                None => {}
            }
            if let Some(services) = job.get("services").and_then(Value::as_mapping) {
                for s in services.values() {
                    images.extend(s.get("image").and_then(Value::as_str).map(String::from));
                }
            }
            for image in images {
                let digest = image.split_once("@sha256:").map(|(_, d)| d).unwrap_or("");
                assert!(
                    is_hex(digest, 64),
                    "{name} job {job_name}: image {image} is not pinned by digest"
                );
            }
        }
    }
    assert!(
        pinned >= 4,
        "expected the workflows to use pinned actions, saw {pinned}"
    );
}

#[test]
fn run_scripts_take_inputs_through_env_and_permissions_are_minimal() {
    for file in workflow_files() {
        let name = file.display().to_string();
        let wf: Value = serde_yaml::from_str(&read(&file)).expect("YAML");
        for step in steps(&wf) {
            if let Some(run) = step.get("run").and_then(Value::as_str) {
                assert!(
                    !run.contains("${{"),
                    "{name}: a run script interpolates an expression (pass it through env:):\n{run}"
                );
            }
        }
        let top = wf
            .get("permissions")
            .unwrap_or_else(|| panic!("{name}: no top-level permissions (the default token may write)"));
        let top_text = serde_yaml::to_string(top).expect("YAML");
        assert!(
            !top_text.contains("write"),
            "{name}: write permissions at the top level; grant them to the job that needs them:\n{top_text}"
        );
        for (job_name, job) in jobs(&wf) {
            if let Some(p) = job.get("permissions") {
                let t = serde_yaml::to_string(p).expect("YAML");
                assert!(!t.contains("write-all"), "{name} job {job_name}: write-all");
            }
        }
    }
}

/// The `NAME`s of every `<prefix>NAME` (e.g. `secrets.`) in `text`.
fn names_after(text: &str, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices(prefix)
        .map(|(i, _)| {
            text[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every secret and variable the workflows read is documented in .github/workflows/README.md, and every variable
/// is declared to actionlint (which then reports a misspelt `vars.` name).
#[test]
fn secrets_and_variables_are_documented() {
    let all: String = workflow_files().iter().map(|f| read(f)).collect::<Vec<_>>().join("\n");
    let doc = read(&workflows_dir().join("README.md"));
    let secrets: Vec<String> = names_after(&all, "secrets.")
        .into_iter()
        .filter(|n| n != "GITHUB_TOKEN")
        .collect();
    let vars = names_after(&all, "vars.");
    assert!(secrets.iter().any(|s| s == "NKUDO_RELEASE_KEY"), "{secrets:?}");
    assert!(vars.iter().any(|v| v == "NKUDO_RELEASE_PUBKEY"), "{vars:?}");
    for name in secrets.iter().chain(&vars) {
        assert!(
            doc.contains(&format!("`{name}`")),
            ".github/workflows/README.md does not document {name}"
        );
    }
    let config = read(&workspace().join(".github/actionlint.yaml"));
    let config: Value = serde_yaml::from_str(&config).expect("actionlint.yaml");
    let declared: Vec<&str> = config["config-variables"]
        .as_sequence()
        .expect("actionlint.yaml: config-variables")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for v in &vars {
        assert!(
            declared.contains(&v.as_str()),
            "{v} is not in .github/actionlint.yaml config-variables"
        );
    }
}

/// The test command README.md gives: in its first fenced block, the line commented "the whole test suite"
/// (else the block's second command), without the comment.
fn readme_test_command() -> String {
    let readme = read(&workspace().join("README.md"));
    let mut lines = readme.lines().skip_while(|l| !l.trim_start().starts_with("```"));
    lines.next().expect("README.md has a fenced block");
    let block: Vec<&str> = lines.take_while(|l| !l.trim_start().starts_with("```")).collect();
    let line = block
        .iter()
        .find(|l| l.contains("# the whole test suite"))
        .or_else(|| block.iter().filter(|l| !l.trim().is_empty()).nth(1))
        .expect("README.md's first block names the test command");
    let command = line.split('#').next().unwrap_or("").trim().to_string();
    assert!(!command.is_empty(), "empty test command in README.md: {line}");
    command
}

#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let command = readme_test_command();
    assert_eq!(
        command, "cargo xtask test",
        "README.md's test command changed: update ci.yml and .ci/run"
    );

    let ci = load("ci.yml");
    let on = ci.get("on").expect("ci.yml: no `on`");
    for event in ["push", "pull_request", "workflow_dispatch"] {
        assert!(on.get(event).is_some(), "ci.yml does not run on {event}");
    }
    let runs: Vec<&str> = steps(&ci)
        .iter()
        .filter_map(|s| s.get("run").and_then(Value::as_str))
        .map(str::trim)
        .collect();
    assert!(
        runs.contains(&command.as_str()),
        "ci.yml has no step running exactly `{command}`; its run steps: {runs:#?}"
    );
    assert_eq!(
        ci.get("permissions")
            .and_then(|p| p.get("contents"))
            .and_then(Value::as_str),
        Some("read"),
        "ci.yml: permissions contents: read"
    );
    let concurrency = ci.get("concurrency").expect("ci.yml: no concurrency group");
    assert_eq!(
        concurrency.get("cancel-in-progress").and_then(Value::as_bool),
        Some(true),
        "ci.yml: superseded runs are not cancelled"
    );
    let cache = steps(&ci)
        .into_iter()
        .filter_map(|s| s.get("uses").and_then(Value::as_str))
        .any(|u| u.starts_with("actions/cache@"));
    assert!(cache, "ci.yml does not cache cargo's registry and target directory");

    let ci_run = read(&workspace().join(".ci/run"));
    let runs_it = ci_run.lines().map(str::trim).any(|l| {
        let l = l.strip_prefix("exec ").unwrap_or(l).trim();
        l == command
    });
    assert!(runs_it, ".ci/run does not run `{command}`:\n{ci_run}");
}

/// All run scripts of a workflow, concatenated.
fn all_runs(wf: &Value) -> String {
    steps(wf)
        .iter()
        .filter_map(|s| s.get("run").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `run` script of the step named `step` in job `job`.
fn step_script(wf: &Value, job: &str, step: &str) -> String {
    wf["jobs"][job]["steps"]
        .as_sequence()
        .unwrap_or_else(|| panic!("no job {job}"))
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(step))
        .and_then(|s| s.get("run").and_then(Value::as_str))
        .unwrap_or_else(|| panic!("no step {step:?} with a run script in job {job}"))
        .to_string()
}

/// Runs a step's script as the runner does (`bash --noprofile --norc -eo pipefail`), in `cwd`, with `env` and a
/// fresh `$GITHUB_OUTPUT`; returns the output and the `key=value` lines written to it.
fn run_step(script: &str, cwd: &Path, env: &[(&str, &str)]) -> (Output, Vec<(String, String)>) {
    let tmp = TempDir::new("workflows-step").expect("temp dir");
    let file = tmp.path().join("step.sh");
    std::fs::write(&file, script).expect("write step");
    let gh_output = tmp.path().join("github_output");
    std::fs::write(&gh_output, "").expect("write");
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-eo", "pipefail"])
        .arg(&file)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .env("GITHUB_OUTPUT", &gh_output)
        .stdin(Stdio::null())
        .output()
        .expect("running bash");
    let outputs = read(&gh_output)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (out, outputs)
}

fn output_of<'a>(outputs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    outputs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[test]
fn release_workflow_builds_v_tags_with_the_key_and_verifies() {
    let wf = load("release.yml");
    let tags: Vec<&str> = wf["on"]["push"]["tags"]
        .as_sequence()
        .expect("release.yml: on.push.tags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tags, ["v*"], "release.yml triggers on v* tags only");
    assert!(
        wf["on"].get("pull_request").is_none(),
        "release.yml must not run on pull requests"
    );

    let runs = all_runs(&wf);
    let dist = runs
        .lines()
        .find(|l| l.contains("cargo xtask dist"))
        .expect("release.yml does not run cargo xtask dist");
    for flag in ["--version \"$VERSION\"", "--key \"$key_file\""] {
        assert!(dist.contains(flag), "cargo xtask dist without {flag}: {dist}");
    }
    for needed in [
        "releaser verify dist --public-key-string",
        ".github/scripts/verify-release-dir.sh dist",
        "gh release create",
        "--prerelease",
        "mktemp",
        "rm -f \"$key_file\"",
    ] {
        assert!(runs.contains(needed), "release.yml: no `{needed}` in its scripts");
    }
    let src = read(&workflows_dir().join("release.yml"));
    assert!(
        src.contains("secrets.NKUDO_RELEASE_KEY }}"),
        "the key comes from the NKUDO_RELEASE_KEY secret"
    );
    assert!(
        src.contains("vars.NKUDO_RELEASE_PUBKEY"),
        "the trusted key comes from NKUDO_RELEASE_PUBKEY"
    );
    // Write access only where the release is created.
    for (name, job) in jobs(&wf) {
        let p = serde_yaml::to_string(job.get("permissions").unwrap_or(&Value::Null)).expect("YAML");
        assert_eq!(
            p.contains("write"),
            name == "publish",
            "release.yml job {name}: permissions {p}"
        );
    }
}

#[test]
fn release_tag_check_accepts_only_the_workspace_version() {
    let wf = load("release.yml");
    let script = step_script(&wf, "build", "The tag names the workspace version");
    let ws = env!("CARGO_PKG_VERSION");
    let (major, rest) = ws.split_once('.').expect("X.Y.Z");
    let next_major = format!("{}.{rest}", major.parse::<u64>().expect("major") + 1);
    let cases: Vec<(String, Option<(&str, &str)>)> = vec![
        (format!("v{ws}"), Some(("false", "release"))),
        (format!("v{ws}-pre.7"), Some(("true", "pre-release"))),
        (format!("v{next_major}"), None),
        (format!("v{next_major}-pre.1"), None),
        (ws.to_string(), None),
        (format!("v{ws}-rc.1"), None),
        (format!("v{ws}-pre.01"), None),
        (format!("v{ws}+abc1234"), None),
        (format!("v{ws}\"; touch pwned; \""), None),
        ("v1.2".to_string(), None),
    ];
    for (tag, want) in cases {
        let (out, outputs) = run_step(&script, &workspace(), &[("TAG", tag.as_str())]);
        match want {
            Some((prerelease, channel)) => {
                assert!(out.status.success(), "tag {tag} refused:\n{}", text(&out));
                assert_eq!(output_of(&outputs, "version"), tag.strip_prefix('v'), "{tag}");
                assert_eq!(output_of(&outputs, "prerelease"), Some(prerelease), "{tag}");
                assert_eq!(output_of(&outputs, "channel"), Some(channel), "{tag}");
            }
            None => {
                assert!(!out.status.success(), "tag {tag} accepted:\n{}", text(&out));
                assert!(
                    outputs.is_empty(),
                    "tag {tag}: outputs written although refused: {outputs:?}"
                );
                assert!(
                    String::from_utf8_lossy(&out.stderr).contains("::error"),
                    "tag {tag}: no error annotation:\n{}",
                    text(&out)
                );
            }
        }
    }
    assert!(!workspace().join("pwned").exists(), "the tag was executed");
}

/// A stand-in for `cargo` / `releaser` that records what a signing step hands it: its arguments, the `--key`
/// file's mode and content while it runs, and which secrets it can see; then exits with `$STUB_EXIT`.
const SIGNING_STUB: &str = r#"#!/usr/bin/env bash
set -eu
key=""
prev=""
for a in "$@"; do
    if [ "$prev" = "--key" ]; then key="$a"; fi
    prev="$a"
done
{
    printf 'args=%s\n' "$*"
    printf 'key=%s\n' "$key"
    printf 'mode=%s\n' "$(stat -c %a "$key")"
    printf 'content=%s\n' "$(tr '\n' '|' <"$key")"
    printf 'release_key_env=%s\n' "${NKUDO_RELEASE_KEY-unset}"
    printf 'passphrase_env=%s\n' "${NKUDO_SIGNING_KEY_PASSPHRASE-unset}"
} >"$STUB_RECORD"
exit "${STUB_EXIT:-0}"
"#;

fn record_of(path: &Path) -> Vec<(String, String)> {
    read(path)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Runs a signing step with the stub as `stub_path` (relative to a fresh directory, or on PATH when it is a bare
/// name); returns the step's output, the stub's record and the runner temp directory.
fn run_signing_step(
    script: &str,
    stub_name: &str,
    env: &[(&str, &str)],
    exit: i32,
) -> (Output, Vec<(String, String)>, TempDir) {
    let tmp = TempDir::new("workflows-signing").expect("temp dir");
    let runner_temp = tmp.path().join("runner-temp");
    let work = tmp.path().join("work");
    let bin = tmp.path().join("bin");
    for d in [&runner_temp, &work, &bin] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let stub = if stub_name.contains('/') {
        work.join(stub_name)
    } else {
        bin.join(stub_name)
    };
    std::fs::create_dir_all(stub.parent().expect("parent")).expect("mkdir");
    std::fs::write(&stub, SIGNING_STUB).expect("write stub");
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let record = tmp.path().join("record");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let exit = exit.to_string();
    let runner_temp_s = runner_temp.to_string_lossy().into_owned();
    let record_s = record.to_string_lossy().into_owned();
    let mut all_env: Vec<(&str, &str)> = vec![
        ("PATH", &path),
        ("RUNNER_TEMP", &runner_temp_s),
        ("STUB_RECORD", &record_s),
        ("STUB_EXIT", &exit),
    ];
    all_env.extend_from_slice(env);
    let (out, _) = run_step(script, &work, &all_env);
    let rec = if record.exists() {
        record_of(&record)
    } else {
        Vec::new()
    };
    (out, rec, tmp)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("runner-temp"))
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// The key from the secret reaches the build as a 0600 file under $RUNNER_TEMP that is gone once the step ends
/// (also when the build fails); the secret itself is not in the build's environment; a passphrase is passed only
/// when one is configured. For release.yml's dist step and promote-release.yml's promote step.
#[test]
fn signing_steps_hand_the_key_as_a_private_file_and_remove_it() {
    let secret = "untrusted comment: minisign encrypted secret key\nRWRTY0IyAAAAstand-in-key-material";
    let release = load("release.yml");
    let promote = load("promote-release.yml");
    let steps = [
        (
            step_script(&release, "build", "cargo xtask dist (build, package, sign)"),
            "cargo",
            vec![("VERSION", "1.2.3-pre.4")],
            "xtask dist --version 1.2.3-pre.4 --key ",
        ),
        (
            step_script(&promote, "promote", "releaser promote"),
            "target/release/releaser",
            vec![
                ("TAG", "v1.2.3"),
                ("LATEST", "1.2.2"),
                ("ROLLBACK", "false"),
                ("PUBKEY", "RWQ"),
            ],
            "promote source --to v1.2.3 --public-key-string RWQ --key ",
        ),
    ];
    for (script, stub, env, args_start) in &steps {
        for (exit, passphrase) in [(0, ""), (1, ""), (0, "correct horse")] {
            let mut env = env.clone();
            env.push(("NKUDO_RELEASE_KEY", secret));
            env.push(("RELEASE_KEY_PASSPHRASE", passphrase));
            let (out, rec, tmp) = run_signing_step(script, stub, &env, exit);
            let case = format!("{stub} exit {exit} passphrase {passphrase:?}");
            assert_eq!(out.status.success(), exit == 0, "{case}:\n{}", text(&out));
            let get = |k: &str| output_of(&rec, k).unwrap_or_else(|| panic!("{case}: no {k} in {rec:?}"));
            assert!(get("args").starts_with(args_start), "{case}: {}", get("args"));
            let key = PathBuf::from(get("key"));
            assert!(
                key.starts_with(tmp.path().join("runner-temp")),
                "{case}: key file {}",
                key.display()
            );
            assert_eq!(get("mode"), "600", "{case}");
            assert_eq!(get("content"), format!("{}|", secret.replace('\n', "|")), "{case}");
            assert_eq!(
                get("release_key_env"),
                "unset",
                "{case}: the secret is in the build's environment"
            );
            let want_pass = if passphrase.is_empty() { "unset" } else { passphrase };
            assert_eq!(get("passphrase_env"), want_pass, "{case}");
            assert!(!key.exists(), "{case}: {} left behind", key.display());
            assert!(leftovers(tmp.path()).is_empty(), "{case}: {:?}", leftovers(tmp.path()));
        }
        let mut env = env.clone();
        env.push(("NKUDO_RELEASE_KEY", ""));
        env.push(("RELEASE_KEY_PASSPHRASE", ""));
        let (out, rec, _tmp) = run_signing_step(script, stub, &env, 0);
        assert!(!out.status.success(), "{stub}: ran without a key:\n{}", text(&out));
        assert!(rec.is_empty(), "{stub}: the build ran without a key");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("NKUDO_RELEASE_KEY"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn promote_workflow_has_its_inputs_and_opens_an_incident_on_rollback() {
    let wf = load("promote-release.yml");
    let on = wf.get("on").expect("on");
    let inputs = on["workflow_dispatch"]["inputs"]
        .as_mapping()
        .expect("promote-release.yml: workflow_dispatch inputs");
    let names: Vec<&str> = inputs.keys().filter_map(Value::as_str).collect();
    assert_eq!(names, ["prerelease", "version", "rollback"]);
    assert_eq!(
        on.as_mapping().map(|m| m.len()),
        Some(1),
        "promote-release.yml runs on manual dispatch only"
    );
    let rollback = &on["workflow_dispatch"]["inputs"]["rollback"];
    assert_eq!(rollback["type"].as_str(), Some("boolean"));
    assert_eq!(rollback["default"].as_bool(), Some(false));
    for input in ["prerelease", "version"] {
        assert_eq!(
            on["workflow_dispatch"]["inputs"][input]["required"].as_bool(),
            Some(true),
            "{input}"
        );
    }

    let runs = all_runs(&wf);
    for needed in [
        "target/release/releaser \"${args[@]}\"",
        "args=(promote source --to \"$TAG\"",
        "args+=(--rollback)",
        "releaser verify release --public-key-string",
        ".github/scripts/verify-release-dir.sh release",
        "gh release download",
        "gh release create",
        "fleet-rollback --fleet --to \"$VERSION\"",
        "gh issue create",
        "runbooks/rollout-rolled-back.md",
        "$GITHUB_ACTOR",
        "actions/runs/$GITHUB_RUN_ID",
    ] {
        assert!(
            runs.contains(needed),
            "promote-release.yml: no `{needed}` in its scripts"
        );
    }
    assert!(
        workspace().join("runbooks/rollout-rolled-back.md").is_file(),
        "the incident issue links runbooks/rollout-rolled-back.md, which does not exist"
    );
    let incident = &wf["jobs"]["incident"];
    assert_eq!(incident["permissions"]["issues"].as_str(), Some("write"));
    let cond = incident["if"].as_str().unwrap_or_default();
    assert!(
        cond.contains("always()") && cond.contains("inputs.rollback"),
        "the incident issue opens on every rollback, however the other jobs end: if: {cond}"
    );
    for (name, job) in jobs(&wf) {
        let p = serde_yaml::to_string(job.get("permissions").unwrap_or(&Value::Null)).expect("YAML");
        assert_eq!(
            p.contains("contents: write"),
            name == "publish",
            "promote job {name}: {p}"
        );
        assert_eq!(
            p.contains("issues: write"),
            name == "incident",
            "promote job {name}: {p}"
        );
    }
}

/// (prerelease, version, rollback) inputs, and the validated (source_version, source_channel, version) or None.
type PromoteCase = (
    &'static str,
    &'static str,
    &'static str,
    Option<(&'static str, &'static str, &'static str)>,
);

#[test]
fn promote_input_validation_refuses_bad_and_hostile_inputs() {
    let wf = load("promote-release.yml");
    let script = step_script(&wf, "prepare", "Validate the inputs");
    let tmp = TempDir::new("workflows-promote").expect("temp dir");
    let cases: &[PromoteCase] = &[
        (
            "1.2.3-pre.4",
            "1.2.3",
            "false",
            Some(("1.2.3-pre.4", "pre-release", "1.2.3")),
        ),
        (
            "v1.2.3-pre.4",
            "v1.2.3",
            "false",
            Some(("1.2.3-pre.4", "pre-release", "1.2.3")),
        ),
        ("1.2.2", "1.2.4", "true", Some(("1.2.2", "release", "1.2.4"))),
        (
            "1.2.3-pre.4",
            "1.2.4",
            "true",
            Some(("1.2.3-pre.4", "pre-release", "1.2.4")),
        ),
        ("1.2.2", "1.2.3", "false", None),
        ("1.2.3-pre.4", "1.2.3-pre.5", "false", None),
        ("1.2.3-rc.1", "1.2.3", "false", None),
        ("1.2.3-pre.4", "01.2.3", "false", None),
        ("1.2.3-pre.4", "1.2", "false", None),
        ("1.2.3-pre.4", "1.2.3", "yes", None),
        ("1.2.3-pre.4\"; touch pwned; \"", "1.2.3", "false", None),
        ("1.2.3-pre.4", "1.2.3$(touch pwned)", "false", None),
        ("1.2.3-pre.4\n1.2.3", "1.2.3", "false", None),
        ("", "1.2.3", "true", None),
    ];
    for (pre, version, rollback, want) in cases {
        let env = [
            ("IN_PRERELEASE", *pre),
            ("IN_VERSION", *version),
            ("IN_ROLLBACK", *rollback),
        ];
        let (out, outputs) = run_step(&script, tmp.path(), &env);
        let case = format!("prerelease={pre:?} version={version:?} rollback={rollback}");
        match want {
            Some((source, channel, v)) => {
                assert!(out.status.success(), "{case} refused:\n{}", text(&out));
                assert_eq!(output_of(&outputs, "source_version"), Some(*source), "{case}");
                assert_eq!(
                    output_of(&outputs, "source_tag"),
                    Some(format!("v{source}").as_str()),
                    "{case}"
                );
                assert_eq!(output_of(&outputs, "source_channel"), Some(*channel), "{case}");
                assert_eq!(output_of(&outputs, "version"), Some(*v), "{case}");
                assert_eq!(output_of(&outputs, "tag"), Some(format!("v{v}").as_str()), "{case}");
                assert_eq!(output_of(&outputs, "rollback"), Some(*rollback), "{case}");
            }
            None => {
                assert!(!out.status.success(), "{case} accepted:\n{}", text(&out));
                assert!(
                    outputs.is_empty(),
                    "{case}: outputs written although refused: {outputs:?}"
                );
            }
        }
    }
    assert!(!tmp.path().join("pwned").exists(), "an input was executed");
}

fn script(name: &str) -> PathBuf {
    workspace().join(".github/scripts").join(name)
}

/// A minisign key pair from the real `releaser keygen --unencrypted`: (secret key file, `RW...` line).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let out = Command::new(bin_path("releaser"))
        .args(["keygen", "--unencrypted", "--name", name, "--out-dir"])
        .arg(dir)
        .output()
        .expect("releaser keygen");
    assert!(out.status.success(), "releaser keygen:\n{}", text(&out));
    let public = read(&dir.join(format!("{name}.pub")));
    let line = public.lines().nth(1).expect("public key line").trim().to_string();
    (dir.join(format!("{name}.key")), line)
}

#[test]
fn trusted_pubkey_script_takes_the_pinned_key_only() {
    let tmp = TempDir::new("workflows-pubkey").expect("temp dir");
    let (_, key_a) = keygen(tmp.path(), "a");
    let (_, key_b) = keygen(tmp.path(), "b");
    let pub_file_a = read(&tmp.path().join("a.pub"));
    let cwd = tmp.path().join("repo");
    std::fs::create_dir_all(&cwd).expect("mkdir");
    let run = |var: Option<&str>| -> Output {
        let mut cmd = Command::new(script("trusted-pubkey.sh"));
        cmd.current_dir(&cwd).env_remove("NKUDO_RELEASE_PUBKEY");
        if let Some(v) = var {
            cmd.env("NKUDO_RELEASE_PUBKEY", v);
        }
        cmd.output().expect("trusted-pubkey.sh")
    };
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).trim().to_string();

    let none = run(None);
    assert!(!none.status.success(), "no key accepted:\n{}", text(&none));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("NKUDO_RELEASE_PUBKEY"),
        "{}",
        text(&none)
    );
    for good in [key_a.clone(), pub_file_a.clone(), format!("  {key_a}\r\n")] {
        let o = run(Some(&good));
        assert!(o.status.success(), "{good:?} refused:\n{}", text(&o));
        assert_eq!(stdout(&o), key_a);
    }
    let truncated = &key_a[..40];
    for bad in ["RWQ", truncated, "untrusted comment: x", "not a key"] {
        let o = run(Some(bad));
        assert!(!o.status.success(), "{bad:?} accepted:\n{}", text(&o));
    }
    // The committed file, alone or agreeing with the variable; a disagreement fails.
    let committed = cwd.join("deployments/keys");
    std::fs::create_dir_all(&committed).expect("mkdir");
    std::fs::write(committed.join("nkudo-release.pub"), &pub_file_a).expect("write");
    let o = run(None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(stdout(&o), key_a);
    let o = run(Some(&key_a));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(Some(&key_b));
    assert!(!o.status.success(), "disagreeing keys accepted:\n{}", text(&o));
}

/// A release directory written by the real `releaser package` around stand-in binaries (the packaging, manifest,
/// checksums and signatures are the real ones; only the binaries' bytes are not).
fn packaged_release(dir: &Path, key: &Path, version: &str, commit: &str) -> PathBuf {
    let target_dir = dir.join("target");
    for triple in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"] {
        for (profile, bin) in [
            ("dist-edge", "nkudo-edge"),
            ("dist", "nkudo-control-plane"),
            ("dist", "releaser"),
        ] {
            let d = target_dir.join(triple).join(profile);
            std::fs::create_dir_all(&d).expect("mkdir");
            let p = d.join(bin);
            std::fs::write(&p, format!("#!/bin/sh\necho {bin} {triple}\n")).expect("write");
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
    }
    let out_dir = dir.join(format!("dist-{version}"));
    let out = Command::new(bin_path("releaser"))
        .args(["package", "--workspace"])
        .arg(workspace())
        .arg("--target-dir")
        .arg(&target_dir)
        .args([
            "--version",
            version,
            "--git-commit",
            commit,
            "--source-date-epoch",
            "1790000000",
        ])
        .arg("--out")
        .arg(&out_dir)
        .arg("--key")
        .arg(key)
        .output()
        .expect("releaser package");
    assert!(out.status.success(), "releaser package:\n{}", text(&out));
    out_dir
}

fn verify_dir(dir: &Path, key: &str, version: &str, channel: &str, commit: Option<&str>) -> Output {
    let mut cmd = Command::new(script("verify-release-dir.sh"));
    cmd.arg(dir).args([key, version, channel]);
    if let Some(c) = commit {
        cmd.arg(c);
    }
    cmd.output().expect("verify-release-dir.sh")
}

#[test]
fn verify_release_dir_script_accepts_real_releases_and_refuses_tampering() {
    if tool("minisign", None).is_none() || tool("jq", None).is_none() {
        return;
    }
    let tmp = TempDir::new("workflows-verify").expect("temp dir");
    let (key, pubkey) = keygen(tmp.path(), "release");
    let (_, other_pubkey) = keygen(tmp.path(), "other");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let pre = packaged_release(tmp.path(), &key, "0.9.0-pre.3", commit);

    let ok = verify_dir(&pre, &pubkey, "0.9.0-pre.3", "pre-release", Some(commit));
    assert!(ok.status.success(), "a good pre-release refused:\n{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    let signed = std::fs::read_dir(&pre)
        .expect("read")
        .filter(|e| {
            let n = e.as_ref().expect("entry").file_name().to_string_lossy().into_owned();
            !n.ends_with(".minisig") && n != "nkudo-release.pub"
        })
        .count();
    assert!(
        stdout.contains(&format!("{signed} signed files")),
        "not every file was checked: {stdout}"
    );

    let refused = |dir: &Path, key: &str, version: &str, channel: &str, commit: Option<&str>, why: &str| {
        let o = verify_dir(dir, key, version, channel, commit);
        assert!(!o.status.success(), "accepted ({why}):\n{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("::error::"),
            "{why}: {}",
            text(&o)
        );
    };
    refused(&pre, &other_pubkey, "0.9.0-pre.3", "pre-release", None, "another key");
    refused(&pre, &pubkey, "0.9.0", "pre-release", None, "another version");
    refused(&pre, &pubkey, "0.9.0-pre.3", "release", None, "another channel");
    refused(
        &pre,
        &pubkey,
        "0.9.0-pre.3",
        "pre-release",
        Some(&"f".repeat(40)),
        "another commit",
    );

    // Tampering with a copy each time.
    let copy = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        for e in std::fs::read_dir(&pre).expect("read") {
            let p = e.expect("entry").path();
            std::fs::copy(&p, d.join(p.file_name().expect("name"))).expect("copy");
        }
        d
    };
    let tarball = "nkudo-edge-0.9.0-pre.3-linux-amd64.tar.gz";
    let d = copy("flipped");
    let mut bytes = std::fs::read(d.join(tarball)).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(d.join(tarball), bytes).expect("write");
    refused(&d, &pubkey, "0.9.0-pre.3", "pre-release", None, "a modified artifact");

    let d = copy("swapped");
    std::fs::copy(
        d.join("nkudo-edge-0.9.0-pre.3-linux-arm64.tar.gz.minisig"),
        d.join(format!("{tarball}.minisig")),
    )
    .expect("copy");
    std::fs::copy(d.join("nkudo-edge-0.9.0-pre.3-linux-arm64.tar.gz"), d.join(tarball)).expect("copy");
    refused(
        &d,
        &pubkey,
        "0.9.0-pre.3",
        "pre-release",
        None,
        "another file's bytes and signature",
    );

    let d = copy("unsigned");
    std::fs::remove_file(d.join("SHA256SUMS.minisig")).expect("rm");
    refused(&d, &pubkey, "0.9.0-pre.3", "pre-release", None, "a missing signature");

    let d = copy("missing");
    std::fs::remove_file(d.join(tarball)).expect("rm");
    std::fs::remove_file(d.join(format!("{tarball}.minisig"))).expect("rm");
    refused(&d, &pubkey, "0.9.0-pre.3", "pre-release", None, "a missing artifact");

    // What promote-release.yml checks after `releaser promote`.
    let changelog = tmp.path().join("CHANGELOG.md");
    std::fs::write(
        &changelog,
        "# Changelog\n\n## [0.9.0]\n\n- Promoted in the workflow test.\n",
    )
    .expect("write");
    let release = tmp.path().join("release");
    let out = Command::new(bin_path("releaser"))
        .arg("promote")
        .arg(&pre)
        .args([
            "--to",
            "v0.9.0",
            "--public-key-string",
            &pubkey,
            "--latest-release",
            "0.8.1",
        ])
        .arg("--key")
        .arg(&key)
        .arg("--changelog")
        .arg(&changelog)
        .arg("--out")
        .arg(&release)
        .output()
        .expect("releaser promote");
    assert!(out.status.success(), "releaser promote:\n{}", text(&out));
    let ok = verify_dir(&release, &pubkey, "0.9.0", "release", Some(commit));
    assert!(ok.status.success(), "the promoted release refused:\n{}", text(&ok));
    refused(
        &release,
        &pubkey,
        "0.9.0-pre.3",
        "pre-release",
        None,
        "the promoted release as its source",
    );
}
