//! `mock-netbird`: a stand-in for the `netbird` CLI (`shared/reference/netbird-status-json.md`).
//!
//! Subcommands:
//! * `status --json`: the real CLI's JSON shape (camelCase keys, `management.connected`, `netbirdIp` with its
//!   prefix length, `publicKey`, `fqdn`, `peers`, ...); `status` without `--json`: the human text form.
//! * `up [--management-url U] [--hostname H]` with the setup key from `NB_SETUP_KEY` (also accepted, like the
//!   real CLI: `--setup-key <k>`, `--setup-key-file <path>`): marks the peer connected in the state file, unless
//!   the join fails.
//! * `down`: marks it disconnected. `version`: prints `0.45.0-mock`.
//!
//! Environment:
//! | variable | meaning |
//! |---|---|
//! | `MOCK_NETBIRD_MODE` | `connected` (always connected), `disconnected` (default: not connected until a successful `up`), `join-fails` (`up` always fails), `daemon-down` (the CLI is there, its daemon is not: every command but `version` exits 1), `not-installed-like` (every command exits 127 "command not found") |
//! | `MOCK_NETBIRD_STATE` | state file: `connected` or `disconnected` (default: `<tmp>/mock-netbird.state`) |
//! | `MOCK_NETBIRD_JOIN_FAILS=N` | the first N `up` calls fail, later ones succeed (counted in `<state>.joins`) |
//!
//! For tests, each `up` appends one line to `<state>.up.log`: its argv (never the key itself) and where the key
//! came from (`key_source=env|argv|file|none`), and bumps the counter in `<state>.joins`.

use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

const VERSION: &str = "0.45.0-mock";

fn state_path() -> PathBuf {
    std::env::var_os("MOCK_NETBIRD_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("mock-netbird.state"))
}

fn with_suffix(suffix: &str) -> PathBuf {
    let mut s = state_path().into_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn connected(mode: &str) -> bool {
    match mode {
        "connected" => true,
        "join-fails" => false,
        _ => std::fs::read_to_string(state_path())
            .map(|s| s.trim() == "connected")
            .unwrap_or(false),
    }
}

fn status_json(connected: bool) -> serde_json::Value {
    let now = "2026-01-01T00:00:00Z";
    json!({
        "peers": {
            "total": 2,
            "connected": if connected { 1 } else { 0 },
            "details": [{
                "fqdn": "peer-a.netbird.cloud",
                "netbirdIp": "100.64.0.11",
                "publicKey": "cGVlci1hLXB1YmxpYy1rZXktMDAwMDAwMDAwMDA=",
                "status": if connected { "Connected" } else { "Idle" },
                "lastStatusUpdate": now,
                "connectionType": if connected { "P2P" } else { "-" },
                "iceCandidateType": {"local": "host", "remote": "host"},
                "iceCandidateEndpoint": {"local": "10.0.0.2:51820", "remote": "10.0.0.3:51820"},
                "relayAddress": "",
                "lastWireguardHandshake": now,
                "transferReceived": 1024,
                "transferSent": 2048,
                "latency": 1_200_000,
                "quantumResistance": false,
                "networks": null
            }]
        },
        "cliVersion": VERSION,
        "daemonVersion": VERSION,
        "daemonStatus": if connected { "Connected" } else { "NeedsLogin" },
        "management": {
            "url": "https://api.netbird.io:443",
            "connected": connected,
            "error": if connected { "" } else { "not logged in" }
        },
        "signal": {"url": "https://signal.netbird.io:443", "connected": connected, "error": ""},
        "relays": {"total": 1, "available": 1, "details": [
            {"uri": "rels://relay.netbird.io:443", "available": true, "error": ""}
        ]},
        "netbirdIp": if connected { "100.64.0.10/16" } else { "" },
        "publicKey": if connected { "bW9jay1lZGdlLXB1YmxpYy1rZXktMDAwMDAwMDA=" } else { "" },
        "fqdn": if connected { "edge-1.netbird.cloud" } else { "" },
        "usesKernelInterface": true,
        "wireguardPort": 51820,
        "quantumResistance": false,
        "quantumResistancePermissive": false,
        "lazyConnectionEnabled": false,
        "networks": null,
        "forwardingRules": 0,
        "dnsServers": [{"servers": ["100.64.0.1:53"], "domains": null, "enabled": true, "error": ""}],
        "events": [],
        "profileName": "default",
        "sshServer": {"enabled": false, "sessions": []}
    })
}

fn status_text(connected: bool) -> String {
    let c = |b: bool| if b { "Connected" } else { "Disconnected" };
    format!(
        "OS: linux/amd64\nDaemon version: {VERSION}\nCLI version: {VERSION}\nProfile: default\n\
         Management: {}\nSignal: {}\nRelays: 1/1 Available\nNameservers: 1/1 Available\nFQDN: {}\n\
         NetBird IP: {}\nInterface type: Kernel\nQuantum resistance: false\nNetworks: -\n\
         Forwarding rules: 0\nPeers count: {}/2 Connected\n",
        c(connected),
        c(connected),
        if connected { "edge-1.netbird.cloud" } else { "" },
        if connected { "100.64.0.10/16" } else { "N/A" },
        if connected { 1 } else { 0 },
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = std::env::var("MOCK_NETBIRD_MODE").unwrap_or_else(|_| "disconnected".into());
    if mode == "not-installed-like" {
        eprintln!("netbird: command not found");
        std::process::exit(127);
    }
    let sub = args.first().map(String::as_str).unwrap_or("");
    if mode == "daemon-down" && sub != "version" {
        eprintln!(
            "Error: failed to connect to daemon error: context deadline exceeded\n\
             If the daemon is not running please run: \nnetbird service install \nnetbird service start"
        );
        std::process::exit(1);
    }
    match sub {
        "version" => println!("{VERSION}"),
        "status" => {
            let c = connected(&mode);
            if args.iter().any(|a| a == "--json" || a == "-j") {
                println!("{}", serde_json::to_string_pretty(&status_json(c)).unwrap());
            } else {
                print!("{}", status_text(c));
            }
        }
        "up" => up(&mode, &args),
        "down" => {
            let _ = std::fs::write(state_path(), "disconnected\n");
            println!("Disconnected successfully");
        }
        _ => {
            eprintln!("Error: unknown command {sub:?} for \"netbird\"");
            std::process::exit(1);
        }
    }
}

fn up(mode: &str, args: &[String]) {
    let mut key_source = "none";
    let mut key: Option<String> = None;
    if let Ok(k) = std::env::var("NB_SETUP_KEY") {
        if !k.is_empty() {
            key = Some(k);
            key_source = "env";
        }
    }
    let mut logged: Vec<String> = Vec::new();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--setup-key" | "-k" => {
                key = args.get(i + 1).cloned();
                key_source = "argv";
                logged.extend([args[i].clone(), "<key>".into()]);
                i += 1;
            }
            "--setup-key-file" => {
                key = args
                    .get(i + 1)
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|s| s.trim().to_string());
                key_source = "file";
                logged.extend(args[i..].iter().take(2).cloned());
                i += 1;
            }
            a => logged.push(a.to_string()),
        }
        i += 1;
    }
    let joins_path = with_suffix(".joins");
    let joins: u64 = std::fs::read_to_string(&joins_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
        + 1;
    let _ = std::fs::write(&joins_path, format!("{joins}\n"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(with_suffix(".up.log"))
    {
        let _ = writeln!(f, "argv={} key_source={key_source}", logged.join(" "));
    }
    let fail_first: u64 = std::env::var("MOCK_NETBIRD_JOIN_FAILS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if key.as_deref().is_none_or(str::is_empty) {
        eprintln!("Error: login failed: no setup key given and no SSO session");
        std::process::exit(1);
    }
    if mode == "join-fails" || joins <= fail_first {
        eprintln!("Error: login failed: rpc error: code = PermissionDenied desc = invalid setup key");
        std::process::exit(1);
    }
    let _ = std::fs::write(state_path(), "connected\n");
    println!("Connected");
}
