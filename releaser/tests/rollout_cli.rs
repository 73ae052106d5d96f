//! `releaser rollout ...` and `releaser rollback --to` (the `releaser::rollout` library) against a stand-in
//! control plane (plain HTTP on 127.0.0.1) answering the admin rollout routes with scripted answers, recording
//! every request.

use clap::{Parser, Subcommand};
use nkudo_core::api::{Rollout, RolloutPlan, RolloutState};
use releaser::rollout::{self, ApiError, Out, RollbackArgs, RolloutCommand};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Debug, Subcommand)]
enum Top {
    #[command(subcommand)]
    Rollout(RolloutCommand),
    Rollback(RollbackArgs),
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    admin_key: Option<String>,
    body: String,
}

type Handler = dyn Fn(&Req, usize) -> (u16, String) + Send + Sync;

/// Serves on a thread: `handler(request, how many requests came before)` gives the status and JSON body.
fn server(handler: Box<Handler>) -> (String, Arc<Mutex<Vec<Req>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                continue;
            }
            let mut headers = HashMap::new();
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
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let mut parts = request_line.split_whitespace();
            let req = Req {
                method: parts.next().unwrap_or("").to_string(),
                path: parts.next().unwrap_or("").to_string(),
                admin_key: headers.get("x-admin-key").cloned(),
                body: String::from_utf8_lossy(&body).into_owned(),
            };
            let n = {
                let mut l = seen.lock().unwrap();
                l.push(req.clone());
                l.len() - 1
            };
            let (status, body) = if req.admin_key.as_deref() != Some("adm") {
                (
                    401,
                    r#"{"error":"invalid admin key","code":"INVALID_ADMIN_KEY"}"#.to_string(),
                )
            } else {
                handler(&req, n)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (format!("http://{addr}"), log)
}

fn rollout_json(id: &str, state: RolloutState, created: &str) -> String {
    let stage = |name: &str, st: &str| {
        serde_json::json!({
            "index": 0, "name": name, "state": st, "agents": 3, "switched": 3, "on_new_version": 2,
            "versions": {"1.4.0": 2, "1.3.2": 1}, "phases": {"healthy": 3}, "manual_gate": false,
            "triggers": [{"name": "plan-failure-rate", "metric": "plan-failure-rate", "compare": "control",
                          "operator": ">", "threshold": 0.05, "value": 0.02, "reference": 0.01, "samples": 30,
                          "verdict": "pass", "consecutive_breaches": 0}]
        })
    };
    serde_json::json!({
        "id": id, "version": "1.4.0", "previous_version": "1.3.2", "state": state,
        "current_stage": 0, "metrics_source": "builtin", "created_at": created, "updated_at": created,
        "stages": [stage("lab", "baking"), {"index": 1, "name": "pilot", "state": "pending", "agents": 5,
            "switched": 0, "on_new_version": 0, "versions": {}, "phases": {}, "manual_gate": true, "triggers": []}],
        "decisions": [{"seq": 1, "at": created, "actor": "admin", "kind": "started", "values": null,
                       "action": "start", "hash": "ab"}]
    })
    .to_string()
}

const POLICY: &str = "version = \"1.4.0\"\n\n[[stage]]\nname = \"lab\"\nrings = [\"lab\"]\n";

fn policy_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// Runs `releaser <args> --url <url> --admin-key adm`, capturing what it prints.
async fn run(url: &str, args: &[&str]) -> (anyhow::Result<ExitCode>, String) {
    let mut v = vec!["releaser"];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--url", url, "--admin-key", "adm"]);
    let cli = Cli::try_parse_from(v).unwrap();
    let mut buf = Vec::new();
    let result = {
        let mut out = Out::writer(&mut buf);
        match cli.cmd {
            Top::Rollout(c) => rollout::run_rollout_to(c, &mut out).await,
            Top::Rollback(a) => rollout::run_rollback_to(a, &mut out).await,
        }
    };
    (result, String::from_utf8(buf).unwrap())
}

fn plan_json() -> String {
    serde_json::json!({
        "version": "1.4.0", "metrics_source": "builtin", "unselected_agents": 2, "warnings": ["w1"],
        "stages": [{"name": "lab", "agents": 3, "already_on_version": 0, "sites": {"s1": 3}, "manual_gate": false,
                    "bake_seconds": 600, "report_timeout_seconds": 900, "triggers": ["plan-failure-rate"]}]
    })
    .to_string()
}

#[tokio::test]
async fn an_invalid_policy_exits_2_without_contacting_the_control_plane() {
    let (url, log) = server(Box::new(|_, _| (500, "{}".into())));
    let f = policy_file("version = \"1.4.0\"\n[[stage]]\nname = \"lab\"\npercent = 150\n");
    let path = f.path().to_str().unwrap();
    let (r, _) = run(&url, &["rollout", "plan", path]).await;
    assert_eq!(r.unwrap(), ExitCode::from(2));
    let (r, _) = run(&url, &["rollout", "start", path, "--yes"]).await;
    assert_eq!(r.unwrap(), ExitCode::from(2));
    let (r, out) = run(&url, &["rollout", "plan", path, "--output", "json"]).await;
    assert_eq!(r.unwrap(), ExitCode::from(2));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["errors"][0]["line"], 4, "{out}");
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn plan_posts_the_policy_and_prints_the_stages() {
    let (url, log) = server(Box::new(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/admin/rollouts/plan") => (200, plan_json()),
        _ => (404, r#"{"error":"no","code":"NOT_FOUND"}"#.into()),
    }));
    let f = policy_file(POLICY);
    let (r, out) = run(&url, &["rollout", "plan", f.path().to_str().unwrap()]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert!(out.contains("plan: 1.4.0 to 3 agent(s) in 1 stage(s)"), "{out}");
    assert!(out.contains("  sites:    s1 3"), "{out}");
    assert!(out.contains("unselected: 2 agent(s)"), "{out}");
    assert!(out.contains("warning: w1"), "{out}");
    let sent: serde_json::Value = serde_json::from_str(&log.lock().unwrap()[0].body).unwrap();
    assert_eq!(sent["policy"], POLICY);

    let (r, out) = run(
        &url,
        &["rollout", "plan", f.path().to_str().unwrap(), "--output", "json"],
    )
    .await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    let plan: RolloutPlan = serde_json::from_str(&out).unwrap();
    assert_eq!(plan.stages[0].agents, 3);
}

#[tokio::test]
async fn start_prints_the_id_and_actions_post() {
    let (url, log) = server(Box::new(|req, _| match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/admin/rollouts") => (201, rollout_json("r-1", RolloutState::Running, "2026-11-23T19:00:00Z")),
        ("POST", "/admin/rollouts/r-1/pause") => {
            (200, rollout_json("r-1", RolloutState::Paused, "2026-11-23T19:00:00Z"))
        }
        ("POST", "/admin/rollouts/r-1/abort") => {
            (200, rollout_json("r-1", RolloutState::Aborted, "2026-11-23T19:00:00Z"))
        }
        ("POST", "/admin/rollouts/r-1/approve") => (
            409,
            r#"{"error":"rollout r-1 is not waiting for approval","code":"CONFLICT"}"#.into(),
        ),
        _ => (404, r#"{"error":"no","code":"NOT_FOUND"}"#.into()),
    }));
    let f = policy_file(POLICY);
    let (r, out) = run(&url, &["rollout", "start", f.path().to_str().unwrap(), "--yes"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert!(
        out.starts_with("started rollout r-1: 1.3.2 -> 1.4.0, 2 stage(s), running"),
        "{out}"
    );

    let (r, out) = run(&url, &["rollout", "pause", "r-1"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert_eq!(out, "pause: rollout r-1 is paused at stage 1/2 lab (baking)\n");

    let (r, out) = run(&url, &["rollout", "abort", "r-1", "--yes", "--output", "json"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    let ro: Rollout = serde_json::from_str(&out).unwrap();
    assert_eq!(ro.state, RolloutState::Aborted);

    // The server's error and code, exit 1 (main maps Err to 1).
    let (r, _) = run(&url, &["rollout", "approve", "r-1"]).await;
    let e = r.unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.ends_with(
            "/admin/rollouts/r-1/approve: 409 Conflict: rollout r-1 is not waiting for approval (code CONFLICT)"
        ),
        "{msg}"
    );
    assert!(matches!(e.downcast_ref::<ApiError>(), Some(ApiError::Http { .. })));

    let paths: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        paths,
        [
            "POST /admin/rollouts",
            "POST /admin/rollouts/r-1/pause",
            "POST /admin/rollouts/r-1/abort",
            "POST /admin/rollouts/r-1/approve"
        ]
    );
}

#[tokio::test]
async fn wait_exits_with_the_outcome() {
    for (final_state, code) in [
        (RolloutState::Completed, 0u8),
        (RolloutState::RolledBack, 3),
        (RolloutState::Aborted, 4),
    ] {
        // running, then a restarting control plane (503), then running, then final.
        let (url, _log) = server(Box::new(move |req, n| {
            assert_eq!(req.path, "/admin/rollouts/r-1");
            match n {
                0 | 2 => (200, rollout_json("r-1", RolloutState::Running, "2026-11-23T19:00:00Z")),
                1 => (503, r#"{"error":"restarting","code":"UNAVAILABLE"}"#.into()),
                _ => (200, rollout_json("r-1", final_state, "2026-11-23T19:00:00Z")),
            }
        }));
        let (r, out) = run(
            &url,
            &[
                "rollout",
                "status",
                "r-1",
                "--wait",
                "--interval",
                "100ms",
                "--output",
                "json",
            ],
        )
        .await;
        assert_eq!(r.unwrap(), ExitCode::from(code), "{final_state:?}");
        let ro: Rollout = serde_json::from_str(&out).unwrap();
        assert_eq!(ro.state, final_state);
    }
}

#[tokio::test]
async fn watch_redraws_until_final_and_gate_timeout_exits_5() {
    let (url, _log) = server(Box::new(|_, n| {
        let state = if n < 2 {
            RolloutState::Running
        } else {
            RolloutState::Completed
        };
        (200, rollout_json("r-1", state, "2026-11-23T19:00:00Z"))
    }));
    let (r, out) = run(&url, &["rollout", "status", "r-1", "--watch", "--interval", "100ms"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert_eq!(out.lines().filter(|l| l.starts_with("---- ")).count(), 3, "{out}");
    assert!(out.contains("state:   completed"), "{out}");
    assert!(out.contains("  plan-failure-rate  pass"), "{out}");

    let (url, _log) = server(Box::new(|_, _| {
        (
            200,
            rollout_json("r-2", RolloutState::WaitingApproval, "2026-11-23T19:00:00Z"),
        )
    }));
    let (r, out) = run(
        &url,
        &[
            "rollout",
            "status",
            "r-2",
            "--wait",
            "--interval",
            "100ms",
            "--gate-timeout",
            "300ms",
        ],
    )
    .await;
    assert_eq!(r.unwrap(), ExitCode::from(5));
    assert!(
        out.contains("approve the next stage: releaser rollout approve r-2"),
        "{out}"
    );
}

#[tokio::test]
async fn status_without_id_follows_the_newest_rollout_in_progress() {
    let (url, log) = server(Box::new(|req, _| match req.path.as_str() {
        "/admin/rollouts" => (
            200,
            format!(
                r#"{{"rollouts":[{},{},{}]}}"#,
                rollout_json("old", RolloutState::Paused, "2026-11-01T00:00:00Z"),
                rollout_json("newest-done", RolloutState::Completed, "2026-11-23T00:00:00Z"),
                rollout_json("current", RolloutState::Running, "2026-11-20T00:00:00Z"),
            ),
        ),
        "/admin/rollouts/current" => (
            200,
            rollout_json("current", RolloutState::Running, "2026-11-20T00:00:00Z"),
        ),
        "/admin/rollouts/current/decisions" => (
            200,
            r#"{"chain_ok":false,"decisions":[
                {"seq":1,"at":"t1","actor":"admin","kind":"started","action":"start","hash":"a"},
                {"seq":2,"at":"t2","actor":"controller","kind":"stage-started","stage":"lab","action":"","hash":"b"}]}"#
                .into(),
        ),
        _ => (404, r#"{"error":"no","code":"NOT_FOUND"}"#.into()),
    }));
    let (r, out) = run(&url, &["rollout", "status"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert!(
        out.starts_with("rollout current: 1.3.2 -> 1.4.0\nstate:   running at stage 1/2 lab (baking)\n"),
        "{out}"
    );
    assert!(
        out.contains("decisions (1):\n  #1 2026-11-20T00:00:00Z admin started: start"),
        "{out}"
    );

    let (r, out) = run(&url, &["rollout", "status", "current", "--decision-log"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert!(
        out.contains("decisions (2):\n  #1 t1 admin started: start\n  #2 t2 controller stage-started stage=lab\n"),
        "{out}"
    );
    assert!(
        out.ends_with("decision log: 2 entries, hash chain does NOT verify\n"),
        "{out}"
    );

    let (r, out) = run(&url, &["rollout", "status", "--all"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    let ids: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, ["newest-done", "current", "old"]);

    let (r, _) = run(&url, &["rollout", "status", "nope"]).await;
    let msg = format!("{:#}", r.unwrap_err());
    assert!(
        msg.contains("404") && msg.contains("(code NOT_FOUND); no such rollout"),
        "{msg}"
    );
    assert!(log.lock().unwrap().iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn rollback_posts_the_selection() {
    let (url, log) = server(Box::new(|req, _| {
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/admin/rollback"));
        (200, r#"{"version":"1.3.2","agents":7}"#.into())
    }));
    let (r, out) = run(
        &url,
        &[
            "rollback", "--to", "v1.3.2", "--site", "s1", "--site", "s2", "--ring", "lab",
        ],
    )
    .await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert_eq!(out, "sent 7 agent(s) (site s1, s2; ring lab) to 1.3.2\n");
    let (r, out) = run(&url, &["rollback", "--to", "1.3.2", "--fleet"]).await;
    assert_eq!(r.unwrap(), ExitCode::SUCCESS);
    assert_eq!(out, "sent 7 agent(s) (the whole fleet) to 1.3.2\n");
    let (r, _) = run(&url, &["rollback", "--to", "1.3.2"]).await;
    assert_eq!(r.unwrap(), ExitCode::from(2));
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 2);
    let first: serde_json::Value = serde_json::from_str(&log[0].body).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"version": "1.3.2", "sites": ["s1", "s2"], "rings": ["lab"]})
    );
    assert_eq!(log[1].body, r#"{"version":"1.3.2"}"#);
}

#[tokio::test]
async fn a_wrong_key_and_an_unreachable_control_plane_are_errors_with_the_url() {
    let (url, _log) = server(Box::new(|_, _| (200, "{}".into())));
    let mut v = vec![
        "releaser",
        "rollout",
        "status",
        "r-1",
        "--url",
        &url,
        "--admin-key",
        "wrong",
    ];
    let cli = Cli::try_parse_from(v.drain(..)).unwrap();
    let Top::Rollout(cmd) = cli.cmd else { panic!() };
    let mut buf = Vec::new();
    let msg = format!(
        "{:#}",
        rollout::run_rollout_to(cmd, &mut Out::writer(&mut buf))
            .await
            .unwrap_err()
    );
    assert!(
        msg.contains("401") && msg.contains("invalid admin key (code INVALID_ADMIN_KEY)"),
        "{msg}"
    );
    assert!(msg.contains("check the admin key"), "{msg}");

    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("http://127.0.0.1:{port}");
    let (r, _) = run(&dead, &["rollout", "pause", "r-1"]).await;
    let e = r.unwrap_err();
    assert!(matches!(
        e.downcast_ref::<ApiError>(),
        Some(ApiError::Unreachable { .. })
    ));
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&format!(
            "cannot reach the control plane: POST {dead}/admin/rollouts/r-1/pause"
        )),
        "{msg}"
    );
}
