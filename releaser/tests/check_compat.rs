//! `releaser check-compat` against a stand-in control plane (plain HTTP on 127.0.0.1) answering
//! `GET /tenants/{id}/agents` as docs/control-plane.md describes.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;

const AGENTS: &str = r#"{"agents":[
 {"id":"a1","tenant_id":"t1","site_id":"s","host_id":"h","hostname":"edge-new","agent_version":"0.3.0","agent_version_supported":true,"state":"ONLINE","enrolled_at":"2026-01-01T00:00:00Z","cert_serial":"1","cert_expires_at":"2027-01-01T00:00:00Z"},
 {"id":"a2","tenant_id":"t1","site_id":"s","host_id":"h","hostname":"edge-old","agent_version":"0.1.4","agent_version_supported":true,"state":"ONLINE","enrolled_at":"2026-01-01T00:00:00Z","cert_serial":"2","cert_expires_at":"2027-01-01T00:00:00Z"},
 {"id":"a3","tenant_id":"t1","site_id":"s","host_id":"h","hostname":"edge-gone","agent_version":"0.0.1","agent_version_supported":false,"state":"OFFLINE","enrolled_at":"2026-01-01T00:00:00Z","cert_serial":"3","cert_expires_at":"2027-01-01T00:00:00Z","revoked_at":"2026-02-01T00:00:00Z"}
]}"#;

/// Serves forever on a thread: 200 with AGENTS for `GET /tenants/t1/agents` with `X-API-Key: good`, else 401/404.
fn server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut key = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("x-api-key") {
                        key = Some(v.trim().to_string());
                    }
                }
            }
            let (status, body) = if !request_line.starts_with("GET /tenants/t1/agents ") {
                ("404 Not Found", r#"{"error":"not found"}"#)
            } else if key.as_deref() != Some("good") {
                ("401 Unauthorized", r#"{"error":"invalid api key"}"#)
            } else {
                ("200 OK", AGENTS)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

fn check(url: &str, cp: &str, key: &str, json: bool) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_releaser"));
    c.args([
        "check-compat",
        "--control-plane",
        cp,
        "--url",
        url,
        "--tenant",
        "t1",
        "--api-key",
        key,
    ])
    .env_remove("NKUDO_API_KEY");
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

#[test]
fn reports_agents_a_new_control_plane_would_not_support() {
    let url = server();
    // N/N-1: a 0.3.0 control plane supports 0.2.x and 0.3.x agents, not 0.1.4.
    let (code, text) = check(&url, "0.3.0", "good", false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNSUPPORTED") && text.contains("edge-old"), "{text}");
    assert!(!text.contains("edge-gone"), "revoked agents are not counted: {text}");
    assert!(text.contains("would not support 1 of 2 active agent(s)"), "{text}");
    let (code, json) = check(&url, "v0.3.0", "good", true);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["unsupported"], 1);
    assert_eq!(v["revoked_skipped"], 1);
    let (code, text) = check(&url, "0.2.0", "good", false);
    assert_eq!(code, 1, "a 0.3.0 agent is newer than a 0.2.0 control plane: {text}");
    let (code, text) = check(&url, "0.3.0", "bad", false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("401") && text.contains("--api-key"), "{text}");
}
