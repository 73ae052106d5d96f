//! `releaser lint-deploy`: a fixture tree with one of each forbidden reference (each reported with file and
//! line, exit 1) and a clean tree (exit 0). Also the repository's own deployments/.

use std::path::Path;
use std::process::Command;

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn lint(args: &[&Path], json: bool) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_releaser"));
    c.arg("lint-deploy").args(args);
    if json {
        c.args(["--output", "json"]);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn reports_every_forbidden_reference_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    write(
        r,
        "compose/docker-compose.yml",
        "services:\n  cp:\n    image: nkudo-control-plane:latest\n  db:\n    image: postgres:16.4\n  cache:\n    image: \"redis\"\n",
    );
    write(
        r,
        "k8s/edge.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  labels:\n    app.kubernetes.io/version: \"0.2.0-pre.3+abc1234\"\nspec:\n  template:\n    spec:\n      containers:\n        - name: cp\n          image: ghcr.io/n-kudo/nkudo-control-plane:pre-latest\n",
    );
    write(
        r,
        "systemd/app.service",
        "[Service]\n# image: foo:latest in a comment is ignored\nExecStart=/usr/bin/podman run --rm docker.io/library/nginx:latest\nEnvironment=NKUDO_VERSION=4f2a9c1\n",
    );
    write(
        r,
        "config/cp.env",
        "# comment\nNKUDO_IMAGE=nkudo-control-plane:0.2\nOTHER=1\n",
    );
    let (code, text) = lint(&[r], false);
    assert_eq!(code, 1, "{text}");
    let p = |rel: &str| r.join(rel).display().to_string();
    let expected = [
        (
            p("compose/docker-compose.yml"),
            3,
            "latest",
            "nkudo-control-plane:latest",
        ),
        (
            p("compose/docker-compose.yml"),
            5,
            "unpinned-third-party",
            "postgres:16.4",
        ),
        (p("compose/docker-compose.yml"), 7, "unpinned-third-party", "redis"),
        (p("k8s/edge.yaml"), 5, "pre-release", "0.2.0-pre.3+abc1234"),
        (
            p("k8s/edge.yaml"),
            11,
            "pre-latest",
            "ghcr.io/n-kudo/nkudo-control-plane:pre-latest",
        ),
        (p("systemd/app.service"), 3, "latest", "docker.io/library/nginx:latest"),
        (p("systemd/app.service"), 4, "commit-sha", "4f2a9c1"),
        (p("config/cp.env"), 2, "unpinned", "nkudo-control-plane:0.2"),
    ];
    for (file, line, kind, reference) in &expected {
        let want = format!("{file}:{line}: {kind}: {reference} (");
        assert!(text.contains(&want), "missing `{want}` in:\n{text}");
    }
    assert_eq!(
        text.lines().filter(|l| l.contains(": ") && l.contains(" (")).count(),
        expected.len(),
        "{text}"
    );
    assert!(text.contains("8 floating reference(s) in 4 file(s)"), "{text}");

    let (code, json) = lint(&[r], true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["findings"].as_array().unwrap().len(), expected.len());
    assert_eq!(v["findings"][0]["line"], 3);
}

#[test]
fn a_clean_tree_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    write(
        r,
        "docker-compose.yml",
        &format!(
            "services:\n  cp:\n    image: ghcr.io/n-kudo/nkudo-control-plane:0.2.0\n  db:\n    image: postgres:16.4@{DIGEST}\n"
        ),
    );
    write(
        r,
        "k8s/cp.yaml",
        "metadata:\n  labels:\n    app.kubernetes.io/version: \"0.2.0\"\nspec:\n  containers:\n    - image: nkudo-control-plane:v0.2.0\n",
    );
    write(
        r,
        "x.service",
        "[Service]\nEnvironment=NKUDO_VERSION=0.2.0 NKUDO_CONFIG=/etc/nkudo/edge.toml\n",
    );
    write(r, ".env", &format!("NKUDO_IMAGE=nkudo-edge@{DIGEST}\nBUILD=1234567\n"));
    let (code, text) = lint(&[r], false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("4 file(s) checked"), "{text}");
}

#[test]
fn the_repository_deployments_pass() {
    let deployments = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deployments");
    let (code, text) = lint(&[&deployments], false);
    assert_eq!(code, 0, "{text}");
}
