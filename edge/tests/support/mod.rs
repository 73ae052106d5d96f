//! Helpers of the self-update tests: a release key (ring Ed25519, minisign format), signed manifests, tarballs
//! (system `tar`), and a tiny HTTP/1.1 server (tokio) that answers `Range` requests and can act as a control plane.
#![allow(dead_code)]

use nkudo_core::api::{ArtifactLocation, UpdateOffer};
use nkudo_core::manifest::{Artifact, Manifest, PRODUCT, SCHEMA_VERSION};
use nkudo_core::minisign::{self, KeyId, PublicKey, Signature};
use ring::signature::KeyPair;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// A minisign release key (Ed25519 through ring).
pub struct ReleaseKey {
    pair: ring::signature::Ed25519KeyPair,
    pub id: [u8; 8],
}

impl ReleaseKey {
    pub fn new(seed: u8) -> ReleaseKey {
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        ReleaseKey {
            pair,
            id: [seed, 1, 2, 3, 4, 5, 6, 7],
        }
    }
    /// The `RW...` line.
    pub fn public_b64(&self) -> String {
        let mut raw = b"Ed".to_vec();
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.pair.public_key().as_ref());
        b64(&raw)
    }
    pub fn public(&self) -> PublicKey {
        PublicKey::from_base64(&self.public_b64()).unwrap()
    }
    /// A prehashed (`ED`) minisign signature file of `data`.
    pub fn sign(&self, data: &[u8]) -> String {
        let digest = minisign::blake2b512(data);
        let sig: [u8; 64] = self.pair.sign(&digest).as_ref().try_into().unwrap();
        let tc = "timestamp:0\tfile:manifest.json";
        let global: [u8; 64] = self
            .pair
            .sign(&minisign::global_message(&sig, tc))
            .as_ref()
            .try_into()
            .unwrap();
        Signature {
            untrusted_comment: "signature from the test key".into(),
            algorithm: minisign::SIG_ALG_PREHASHED,
            key_id: KeyId(self.id),
            signature: sig,
            trusted_comment: tc.into(),
            global_signature: global,
        }
        .to_file_text()
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    nkudo_edge::update::verify::hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn arch() -> String {
    nkudo_edge::update::verify::host_arch()
}

pub fn artifact_name(version: &str) -> String {
    format!("nkudo-edge-{version}-linux-{}.tar.gz", arch())
}

/// A manifest of `version` listing the agent tarball `bytes`.
pub fn manifest(version: &str, bytes: &[u8], expires: chrono::DateTime<chrono::Utc>) -> Manifest {
    Manifest {
        schema_version: SCHEMA_VERSION,
        product: PRODUCT.into(),
        version: version.into(),
        channel: "release".into(),
        git_commit: "abc1234".into(),
        build_date: "2026-01-01T00:00:00Z".into(),
        expires: expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        minimum_supported_agent_version: "0.0.0".into(),
        artifacts: vec![Artifact {
            name: artifact_name(version),
            component: "nkudo-edge".into(),
            kind: "tarball".into(),
            os: "linux".into(),
            arch: arch(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }],
        promoted_from: None,
        rollback_of: None,
    }
}

/// A signed offer of `m` (its first artifact) at `url`.
pub fn offer(key: &ReleaseKey, m: &Manifest, url: &str) -> UpdateOffer {
    let text = m.to_canonical_json();
    let a = &m.artifacts[0];
    UpdateOffer {
        version: m.version.clone(),
        rollback: false,
        manifest_signature: key.sign(text.as_bytes()),
        manifest: text,
        artifact: ArtifactLocation {
            name: a.name.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            url: url.into(),
        },
    }
}

/// A `.tar.gz` of `files` (path in the archive, content, executable), made with the system `tar`.
pub fn tarball(files: &[(&str, &[u8], bool)]) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for (p, data, exe) in files {
        let full = src.join(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, data).unwrap();
        let mode = if *exe { 0o755 } else { 0o644 };
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = tmp.path().join("out.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nkudo-edge"))
}

/// A shell script release binary: `version` prints `nkudo-edge <version>`; anything else runs `body`.
pub fn script(version: &str, body: &str) -> Vec<u8> {
    format!(
        "#!/bin/sh\nfor a in \"$@\"; do if [ \"$a\" = version ]; then echo \"nkudo-edge {version}\"; exit 0; fi; done\n{body}\n"
    )
    .into_bytes()
}

/// Installs (and optionally activates) a release into the layout at `root`, writing its signed manifest.
pub fn install(root: &Path, key: &ReleaseKey, version: &str, tar: &[u8], activate: bool) {
    let layout = nkudo_core::layout::Layout::open(root).unwrap();
    let v = nkudo_core::version::parse(version).unwrap();
    let m = manifest(version, tar, chrono::Utc::now() + chrono::Duration::days(30));
    let text = m.to_canonical_json();
    let sig = key.sign(text.as_bytes());
    layout
        .install(&v, |dir: &Path| -> std::io::Result<()> {
            nkudo_core::archive::unpack_tar_gz(tar, dir)?;
            nkudo_core::installed::write_metadata(dir, &text, &sig)
        })
        .unwrap();
    if activate {
        layout.activate(&v).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// A tiny HTTP server.

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the handler answers: status, headers, body; `cut_after`: close the connection after this many body bytes
/// (an interrupted transfer).
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub cut_after: Option<usize>,
    /// Announce this Content-Length instead of the body's length.
    pub content_length: Option<u64>,
}

impl Response {
    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(v).unwrap(),
            cut_after: None,
            content_length: None,
        }
    }
    pub fn bytes(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![],
            body,
            cut_after: None,
            content_length: None,
        }
    }
}

/// Answers `data` honouring `Range: bytes=N-`.
pub fn serve_range(req: &Request, data: &[u8]) -> Response {
    if let Some(r) = req.header("range") {
        let start: usize = r
            .trim()
            .strip_prefix("bytes=")
            .and_then(|s| s.strip_suffix('-'))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if start >= data.len() {
            return Response::bytes(416, vec![]);
        }
        let mut resp = Response::bytes(206, data[start..].to_vec());
        resp.headers.push((
            "Content-Range".into(),
            format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
        ));
        return resp;
    }
    Response::bytes(200, data.to_vec())
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

pub struct Server {
    pub base: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(handler: Handler) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    reqs.lock().unwrap().push(req.clone());
                    let resp = handler(&req);
                    let reason = match resp.status {
                        200 => "OK",
                        206 => "Partial Content",
                        404 => "Not Found",
                        416 => "Range Not Satisfiable",
                        _ => "Status",
                    };
                    let len = resp.content_length.unwrap_or(resp.body.len() as u64);
                    let mut head = format!(
                        "HTTP/1.1 {} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n",
                        resp.status
                    );
                    for (k, v) in &resp.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let body = match resp.cut_after {
                        Some(n) => &resp.body[..n.min(resp.body.len())],
                        None => &resp.body[..],
                    };
                    let _ = sock.write_all(body).await;
                    let _ = sock.flush().await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Server { base, requests, task }
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let first = lines.next()?;
    let mut parts = first.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}
