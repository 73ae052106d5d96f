//! `releaser publish` and `releaser check-compat` (fleet mode) against a stand-in control plane (plain HTTP on
//! 127.0.0.1) that answers the release registry and `GET /admin/agents` routes as docs/control-plane.md describes.
//! The real control plane and real agents are exercised end to end in tests/tests/self_update.rs.

use releaser::checksums;
use releaser::dist::{trusted_comment, PUBLIC_KEY_FILE, UNTRUSTED_COMMENT};
use releaser::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use releaser::minisign::{blake2b512, KeyId, PublicKey, SecretKey, Signature};
use releaser::package::{tar_gz, Entry};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

const ADMIN: &str = "adm-secret";

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32], KeyId(*b"publish!"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signed release directory with an edge and a releaser tarball (amd64), like `releaser dist` writes.
fn release_dir(dir: &Path, version: &str, key: &SecretKey, marker: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let epoch = now() - 60;
    let expires = releaser::dist::rfc3339(epoch + 30 * 86_400).unwrap();
    let channel = if version.contains("-pre.") {
        "pre-release"
    } else {
        "release"
    };
    let sign = |name: &str, bytes: &[u8]| {
        let tc = trusted_comment(epoch, name, version, channel, &expires);
        let sig = key.sign_prehashed(&blake2b512(bytes), &tc, UNTRUSTED_COMMENT).unwrap();
        std::fs::write(dir.join(format!("{name}.minisig")), sig.to_file_text()).unwrap();
    };
    let mut artifacts = Vec::new();
    for component in ["nkudo-edge", "releaser"] {
        let name = format!("{component}-{version}-linux-amd64.tar.gz");
        let bytes = tar_gz(
            &[Entry::file(
                format!("bin/{component}"),
                format!("#!/bin/sh\necho {version} {marker}\n").into_bytes(),
                true,
            )],
            &[],
            epoch,
        )
        .unwrap();
        std::fs::write(dir.join(&name), &bytes).unwrap();
        sign(&name, &bytes);
        artifacts.push(Artifact {
            name,
            component: component.into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            size: bytes.len() as u64,
            sha256: checksums::sha256_hex(&bytes),
        });
    }
    let m = Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.into(),
        channel: channel.into(),
        git_commit: "abc1234".into(),
        build_date: releaser::dist::rfc3339(epoch).unwrap(),
        expires: expires.clone(),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts: artifacts.clone(),
        promoted_from: None,
        rollback_of: None,
    };
    let mb = m.to_canonical_json();
    std::fs::write(dir.join("manifest.json"), &mb).unwrap();
    sign("manifest.json", mb.as_bytes());
    let mut sums: Vec<(String, String)> = artifacts.iter().map(|a| (a.name.clone(), a.sha256.clone())).collect();
    sums.push(("manifest.json".into(), checksums::sha256_hex(mb.as_bytes())));
    let sums = checksums::render(&sums);
    std::fs::write(dir.join("SHA256SUMS"), &sums).unwrap();
    sign("SHA256SUMS", sums.as_bytes());
    std::fs::write(dir.join(PUBLIC_KEY_FILE), key.public_key().to_file_text()).unwrap();
}

/// What the stand-in holds and saw.
#[derive(Default)]
struct State {
    /// version -> (manifest text, external base url, available artifact names)
    releases: BTreeMap<String, (String, Option<String>, Vec<String>)>,
    /// `METHOD path` of every request.
    requests: Vec<String>,
    /// The agents `GET /admin/agents` pages through.
    agents: Vec<Value>,
}

struct StandIn {
    url: String,
    state: Arc<Mutex<State>>,
}

impl StandIn {
    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
    fn puts(&self) -> Vec<String> {
        self.requests().into_iter().filter(|r| r.starts_with("PUT ")).collect()
    }
}

fn release_info(version: &str, manifest: &str, external: &Option<String>, available: &[String]) -> Value {
    let m = Manifest::from_json(manifest.as_bytes()).unwrap();
    json!({
        "version": version,
        "channel": m.channel,
        "git_commit": m.git_commit,
        "build_date": m.build_date,
        "expires": m.expires,
        "minimum_supported_agent_version": m.minimum_supported_agent_version,
        "key_id": "0000000000000000",
        "external_base_url": external,
        "published_at": "2026-01-01T00:00:00Z",
        "bad": false,
        "artifacts": m.artifacts.iter().map(|a| json!({
            "name": a.name, "component": a.component, "kind": a.kind, "os": a.os, "arch": a.arch,
            "size": a.size, "sha256": a.sha256,
            "available": external.is_some() || available.contains(&a.name),
        })).collect::<Vec<_>>(),
    })
}

fn err(code: &str, msg: &str) -> Value {
    json!({"error": msg, "code": code})
}

/// Serves on a thread; trusts `trusted` for manifest signatures.
fn stand_in(trusted: PublicKey) -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Mutex::new(State::default()));
    let st = state.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = BTreeMap::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let target = parts.next().unwrap_or("").to_string();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let mut s = st.lock().unwrap();
            s.requests.push(format!("{method} {target}"));
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            let (status, answer): (u16, Value) = if headers.get("x-admin-key").map(String::as_str) != Some(ADMIN) {
                (401, err("INVALID_ADMIN_KEY", "invalid admin key"))
            } else {
                match (method.as_str(), segs.as_slice()) {
                    ("POST", ["admin", "releases"]) => {
                        let req: Value = serde_json::from_slice(&body).unwrap();
                        let manifest = req["manifest"].as_str().unwrap().to_string();
                        let sig = Signature::from_file_text(req["signature"].as_str().unwrap()).unwrap();
                        let external = req["external_base_url"].as_str().map(str::to_string);
                        let m = Manifest::from_json(manifest.as_bytes()).unwrap();
                        if trusted.verify(&sig, manifest.as_bytes()).is_err() {
                            (
                                422,
                                err(
                                    "INVALID_SIGNATURE",
                                    "the manifest signature does not verify with any release key",
                                ),
                            )
                        } else {
                            match s.releases.get(&m.version) {
                                Some((old, ext, avail)) if *old == manifest => {
                                    (200, release_info(&m.version, old, ext, avail))
                                }
                                Some(_) => (409, err("CONFLICT", "another manifest is published as this version")),
                                None => {
                                    s.releases
                                        .insert(m.version.clone(), (manifest.clone(), external.clone(), vec![]));
                                    (201, release_info(&m.version, &manifest, &external, &[]))
                                }
                            }
                        }
                    }
                    ("PUT", ["admin", "releases", v, "artifacts", name]) => match s.releases.get_mut(*v) {
                        None => (404, err("NOT_FOUND", "no such release")),
                        Some((manifest, _, avail)) => {
                            let m = Manifest::from_json(manifest.as_bytes()).unwrap();
                            match m.artifacts.iter().find(|a| a.name == *name) {
                                None => (404, err("NOT_FOUND", "no such artifact")),
                                Some(a) if a.size != body.len() as u64 || a.sha256 != checksums::sha256_hex(&body) => (
                                    422,
                                    err("ARTIFACT_MISMATCH", "size or SHA-256 differs from the manifest"),
                                ),
                                Some(_) => {
                                    avail.push(name.to_string());
                                    (200, json!({}))
                                }
                            }
                        }
                    },
                    ("GET", ["admin", "releases", v]) => match s.releases.get(*v) {
                        None => (404, err("NOT_FOUND", "no such release")),
                        Some((manifest, ext, avail)) => (200, release_info(v, manifest, ext, avail)),
                    },
                    ("GET", ["admin", "agents"]) => {
                        // Pages of at most 2 (below what the client asks for), cursor = last id, no next field.
                        let q: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
                        let after = q.get("after").copied();
                        let start = match after {
                            Some(a) => s.agents.iter().position(|x| x["id"] == a).map(|i| i + 1).unwrap_or(0),
                            None => 0,
                        };
                        let page: Vec<Value> = s.agents.iter().skip(start).take(2).cloned().collect();
                        (200, json!({ "agents": page }))
                    }
                    _ => (404, err("NOT_FOUND", "no such route")),
                }
            };
            drop(s);
            let body = answer.to_string();
            let reason = match status {
                200 => "OK",
                201 => "Created",
                401 => "Unauthorized",
                404 => "Not Found",
                409 => "Conflict",
                _ => "Unprocessable Entity",
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    StandIn {
        url: format!("http://{addr}"),
        state,
    }
}

fn releaser(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_releaser"))
        .args(args)
        .env_remove("NKUDO_ADMIN_KEY")
        .env_remove("NKUDO_API_KEY")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn publish(s: &StandIn, dir: &Path, extra: &[&str]) -> (i32, String, String) {
    let d = dir.to_string_lossy().into_owned();
    let mut args = vec!["publish", d.as_str(), "--url", s.url.as_str(), "--admin-key", ADMIN];
    args.extend_from_slice(extra);
    releaser(&args)
}

struct Fx {
    _tmp: tempfile::TempDir,
    t: PathBuf,
    pubkey: String,
}

fn fx() -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().to_path_buf();
    let pubkey = t.join("release.pub");
    std::fs::write(&pubkey, key(1).public_key().to_file_text()).unwrap();
    Fx {
        pubkey: pubkey.to_string_lossy().into_owned(),
        t,
        _tmp: tmp,
    }
}

#[test]
fn publishes_verifies_first_and_uploads_only_what_is_missing() {
    let f = fx();
    let s = stand_in(key(1).public_key());
    let dir = f.t.join("v0.2.0");
    release_dir(&dir, "0.2.0", &key(1), "a");

    // Only the edge tarball, verified with the trusted key first.
    let (code, out, err) = publish(
        &s,
        &dir,
        &[
            "--public-key",
            &f.pubkey,
            "--only-component",
            "nkudo-edge",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["version"], "0.2.0");
    assert_eq!(r["created"], true);
    assert_eq!(r["verified_signatures"], true);
    let actions: BTreeMap<String, String> = r["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["component"].as_str().unwrap().to_string(),
                a["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(actions["nkudo-edge"], "uploaded", "{out}");
    assert_eq!(actions["releaser"], "not-selected", "{out}");
    assert_eq!(
        s.puts(),
        ["PUT /admin/releases/0.2.0/artifacts/nkudo-edge-0.2.0-linux-amd64.tar.gz"]
    );

    // Everything: the edge tarball is already there, only the releaser one goes up.
    let (code, out, err) = publish(&s, &dir, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already published (identical manifest) 0.2.0"), "{out}");
    assert!(out.contains("already-available") && out.contains("uploaded"), "{out}");
    assert!(out.contains("note: no --public-key"), "{out}");
    assert_eq!(s.puts().len(), 2, "{:?}", s.requests());
    // Once more: nothing to upload.
    let (code, out, err) = publish(&s, &dir, &["--public-key", &f.pubkey]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" 0 byte(s) uploaded"), "{out}");
    assert_eq!(s.puts().len(), 2);

    // Another manifest under the same version: 409, said plainly.
    let other = f.t.join("v0.2.0-other");
    release_dir(&other, "0.2.0", &key(1), "b");
    let (code, out, err) = publish(&s, &other, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("409") && err.contains("a version is published once"),
        "{err}"
    );

    // A wrong admin key.
    let d = dir.to_string_lossy().into_owned();
    let (code, _, err) = releaser(&["publish", &d, "--url", &s.url, "--admin-key", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("401") && err.contains("--admin-key"), "{err}");
}

#[test]
fn refuses_before_sending_anything_when_the_directory_does_not_verify() {
    let f = fx();
    let s = stand_in(key(1).public_key());
    let dir = f.t.join("v0.3.0");
    release_dir(&dir, "0.3.0", &key(1), "a");
    let edge = dir.join("nkudo-edge-0.3.0-linux-amd64.tar.gz");
    let mut bytes = std::fs::read(&edge).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    std::fs::write(&edge, bytes).unwrap();

    for extra in [&["--public-key", f.pubkey.as_str()][..], &[][..]] {
        let (code, out, err) = publish(&s, &dir, extra);
        assert_eq!(code, 3, "exit 3 as `verify`: {out}{err}");
        assert!(
            err.contains("nothing published") && err.contains("nkudo-edge-0.3.0-linux-amd64.tar.gz"),
            "{err}"
        );
    }
    // Only the other component: its files verify, so it goes through.
    let (code, out, err) = publish(&s, &dir, &["--only-component", "releaser"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        s.puts(),
        ["PUT /admin/releases/0.3.0/artifacts/releaser-0.3.0-linux-amd64.tar.gz"]
    );

    // Signed by a key the control plane does not trust: refused there, with what to do.
    let foreign = f.t.join("foreign");
    release_dir(&foreign, "0.4.0", &key(2), "a");
    let (code, out, err) = publish(&s, &foreign, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("INVALID_SIGNATURE") && err.contains("RELEASE_PUBLIC_KEYS"),
        "{err}"
    );
    // ... and with the trusted key given locally, refused before anything is sent.
    let before = s.requests().len();
    let (code, _, err) = publish(&s, &foreign, &["--public-key", &f.pubkey]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(s.requests().len(), before);
}

#[test]
fn external_base_url_uploads_nothing() {
    let f = fx();
    let s = stand_in(key(1).public_key());
    let dir = f.t.join("v0.5.0");
    release_dir(&dir, "0.5.0", &key(1), "a");
    // The artifacts need not even be here.
    std::fs::remove_file(dir.join("releaser-0.5.0-linux-amd64.tar.gz")).unwrap();
    let (code, out, err) = publish(
        &s,
        &dir,
        &[
            "--public-key",
            &f.pubkey,
            "--external-base-url",
            "https://cdn.example/n-kudo/0.5.0",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["external_base_url"], "https://cdn.example/n-kudo/0.5.0");
    assert_eq!(r["uploaded_bytes"], 0);
    assert!(
        r["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["action"] == "external"),
        "{out}"
    );
    assert!(s.puts().is_empty(), "{:?}", s.requests());
}

fn agent(id: &str, tenant: &str, v: &str) -> Value {
    json!({"id": id, "tenant_id": tenant, "site_id": "s", "host_id": "h", "hostname": format!("host-{id}"),
        "agent_version": v, "agent_version_supported": true, "state": "ONLINE",
        "enrolled_at": "2026-01-01T00:00:00Z", "cert_serial": "1", "cert_expires_at": "2027-01-01T00:00:00Z"})
}

#[test]
fn check_compat_fleet_mode_reads_every_page_of_admin_agents() {
    let s = stand_in(key(1).public_key());
    s.state.lock().unwrap().agents = vec![
        agent("a1", "t1", "0.3.0"),
        agent("a2", "t2", "0.2.4"),
        agent("a3", "t2", "0.3.1"),
        agent("a4", "t3", "0.1.9"),
        agent("a5", "t3", "0.3.0"),
    ];
    let (code, out, err) = releaser(&[
        "check-compat",
        "--control-plane",
        "0.3.0",
        "--url",
        &s.url,
        "--admin-key",
        ADMIN,
        "--output",
        "json",
    ]);
    assert_eq!(code, 1, "one agent of tenant t3 is 0.1.x: {out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["agents"].as_array().unwrap().len(), 5, "every page read: {out}");
    assert_eq!(r["unsupported"], 1);
    let agent_reqs: Vec<String> = s
        .requests()
        .into_iter()
        .filter(|r| r.contains("/admin/agents"))
        .collect();
    assert_eq!(agent_reqs.len(), 4, "3 pages and an empty one: {agent_reqs:?}");
    assert!(
        agent_reqs[1].contains("after=a2") && agent_reqs[2].contains("after=a4"),
        "{agent_reqs:?}"
    );

    // The admin key from the environment; text output names the agent.
    let o = Command::new(env!("CARGO_BIN_EXE_releaser"))
        .args(["check-compat", "--control-plane", "0.3.0", "--url", &s.url])
        .env("NKUDO_ADMIN_KEY", ADMIN)
        .env_remove("NKUDO_API_KEY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("UNSUPPORTED") && text.contains("host-a4"), "{text}");
    assert!(text.contains("would not support 1 of 5"), "{text}");

    // No credentials at all: a usage hint, not a request.
    let (code, _, err) = releaser(&["check-compat", "--control-plane", "0.3.0", "--url", &s.url]);
    assert_eq!(code, 1);
    assert!(err.contains("--admin-key") && err.contains("--tenant"), "{err}");
    // --tenant without its API key.
    let (code, _, err) = releaser(&[
        "check-compat",
        "--control-plane",
        "0.3.0",
        "--url",
        &s.url,
        "--tenant",
        "t1",
        "--admin-key",
        ADMIN,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--api-key"), "{err}");
}
