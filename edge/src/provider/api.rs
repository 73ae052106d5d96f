//! A small client for Cloud Hypervisor's REST API: HTTP/1.1 over the VMM's unix socket (`--api-socket`).
//!
//! One connection per call (the VMM serves one VM; calls are rare). Calls go to
//! `http://localhost/api/v1/<endpoint>`. Error bodies are JSON arrays of strings (the VMM's error chain).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// Why an API call did not give an answer, or the answer the VMM gave when it was not a success.
#[derive(Debug)]
pub enum ApiError {
    /// The socket is missing, refuses connections or the connection broke: no VMM is serving it.
    Unreachable(String),
    /// No complete answer within the call's time limit.
    Timeout(Duration),
    /// The VMM answered with an error status; `chain` is its error body (array of strings) or the raw body.
    Status { status: u16, chain: Vec<String> },
}

impl ApiError {
    /// The VMM's error chain joined with ": ", or the transport problem.
    pub fn describe(&self) -> String {
        match self {
            ApiError::Unreachable(e) => format!("VMM API unreachable: {e}"),
            ApiError::Timeout(d) => format!("VMM API did not answer within {} ms", d.as_millis()),
            ApiError::Status { status, chain } => {
                if chain.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {}", chain.join(": "))
                }
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Reads an error body: a JSON array of strings, a single JSON string, or plain text.
pub fn parse_error_chain(body: &[u8]) -> Vec<String> {
    if let Ok(list) = serde_json::from_slice::<Vec<String>>(body) {
        return list;
    }
    if let Ok(s) = serde_json::from_slice::<String>(body) {
        return vec![s];
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        Vec::new()
    } else {
        vec![text.chars().take(1000).collect()]
    }
}

/// The API of one VMM, addressed by its socket path.
#[derive(Debug, Clone)]
pub struct ChApi {
    socket: PathBuf,
}

impl ChApi {
    pub fn new(socket: &Path) -> Self {
        ChApi {
            socket: socket.to_path_buf(),
        }
    }

    /// One call. `Ok((status, body))` for 2xx answers; any other status is `ApiError::Status`.
    pub async fn call(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        match tokio::time::timeout(timeout, self.call_inner(method, endpoint, body)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout(timeout)),
        }
    }

    async fn call_inner(
        &self,
        method: Method,
        endpoint: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ApiError::Unreachable(format!("{}: {e}", self.socket.display())))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://localhost/api/v1/{endpoint}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if has_body {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ApiError::Unreachable(e.to_string()))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ApiError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        driver.abort();
        let (status, bytes) = result?;
        if status.is_success() {
            Ok((status, bytes))
        } else {
            Err(ApiError::Status {
                status: status.as_u16(),
                chain: parse_error_chain(&bytes),
            })
        }
    }

    pub async fn get(&self, endpoint: &str, timeout: Duration) -> Result<Bytes, ApiError> {
        self.call(Method::GET, endpoint, None, timeout).await.map(|(_, b)| b)
    }

    pub async fn put(&self, endpoint: &str, body: Option<Vec<u8>>, timeout: Duration) -> Result<(), ApiError> {
        self.call(Method::PUT, endpoint, body, timeout).await.map(|_| ())
    }

    /// `GET vmm.ping`: the VMM's pid when it answers (0 when the answer has none).
    pub async fn ping(&self, timeout: Duration) -> Result<i64, ApiError> {
        let body = self.get("vmm.ping", timeout).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok(v.get("pid").and_then(|p| p.as_i64()).unwrap_or(0))
    }

    /// `GET vm.info`: `Ok(None)` when the VMM has no VM (404), else the VM's state string.
    pub async fn vm_state(&self, timeout: Duration) -> Result<Option<String>, ApiError> {
        match self.get("vm.info", timeout).await {
            Ok(body) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                Ok(Some(
                    v.get("state").and_then(|s| s.as_str()).unwrap_or("Unknown").to_string(),
                ))
            }
            Err(ApiError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_forms() {
        assert_eq!(
            parse_error_chain(br#"["Error from API","The VM could not boot","VM is already created"]"#),
            vec!["Error from API", "The VM could not boot", "VM is already created"]
        );
        assert_eq!(parse_error_chain(br#""just one""#), vec!["just one"]);
        assert_eq!(parse_error_chain(b"plain text\n"), vec!["plain text"]);
        assert!(parse_error_chain(b"").is_empty());
        let e = ApiError::Status {
            status: 500,
            chain: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.describe(), "HTTP 500: a: b");
    }
}
