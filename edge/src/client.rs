//! The HTTPS client of the control plane: JSON in and out, `{"error","code"}` answers as [`CpError::Http`].

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a call to the control plane failed.
#[derive(Debug, Clone)]
pub enum CpError {
    /// No answer (connection refused, TLS failure, timeout…): retry later.
    Transport(String),
    /// An error answer (`code` from the `{"error","code"}` body, empty when the body is not one).
    Http { status: u16, code: String, message: String },
    /// A success answer we could not read.
    Decode(String),
}

impl CpError {
    pub fn code(&self) -> &str {
        match self {
            CpError::Http { code, .. } => code,
            _ => "",
        }
    }
    /// The control plane no longer knows or accepts this agent: stop, a person must act (re-enroll).
    pub fn is_fatal_auth(&self) -> bool {
        matches!(self, CpError::Http { status: 401, code, .. }
            if code == "AGENT_REVOKED" || code == "UNKNOWN_AGENT" || code == "INVALID_CLIENT_CERTIFICATE")
    }
    /// Worth retrying with the same request later (transport failures, 5xx, 429, 408).
    pub fn is_retryable(&self) -> bool {
        match self {
            CpError::Transport(_) => true,
            CpError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            CpError::Decode(_) => false,
        }
    }
}

impl std::fmt::Display for CpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpError::Transport(m) => write!(f, "control plane unreachable: {m}"),
            CpError::Http { status, code, message } if code.is_empty() => write!(f, "HTTP {status}: {message}"),
            CpError::Http { status, code, message } => write!(f, "HTTP {status} {code}: {message}"),
            CpError::Decode(m) => write!(f, "unreadable answer: {m}"),
        }
    }
}

impl std::error::Error for CpError {}

/// `error: cause: cause…` on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// What the client trusts and presents.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM bundles of trusted CAs (the control plane's bundle from enrollment, `--ca-file`).
    pub roots_pem: Vec<Vec<u8>>,
    /// Also trust the system's roots (enrollment without `--ca-file`).
    pub system_roots: bool,
    /// Certificate + key PEM for mTLS.
    pub identity_pem: Option<Vec<u8>>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone)]
pub struct CpClient {
    base: String,
    http: reqwest::Client,
}

impl CpClient {
    pub fn new(base_url: &str, tls: &TlsSettings) -> Result<CpClient, String> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(tls.system_roots)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(2)
            .user_agent(format!(
                "nkudo-edge/{}",
                nkudo_core::installed::reported_version().version
            ));
        for pem in &tls.roots_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("read CA certificates: {e}"))?;
            if certs.is_empty() {
                return Err("CA file holds no certificate".into());
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if let Some(id) = &tls.identity_pem {
            let id = reqwest::Identity::from_pem(id).map_err(|e| format!("read client certificate/key: {e}"))?;
            b = b.identity(id);
        }
        if tls.insecure_skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let http = b
            .build()
            .map_err(|e| format!("build HTTPS client: {}", error_chain(&e)))?;
        let base = base_url.trim_end_matches('/').to_string();
        if !base.starts_with("https://") && !base.starts_with("http://") {
            return Err(format!("control plane URL must start with https:// (got {base_url:?})"));
        }
        Ok(CpClient { base, http })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The underlying HTTP client (mTLS identity and trust included), for streaming downloads.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The absolute URL of a control-plane path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post<T: Serialize + ?Sized, R: DeserializeOwned>(&self, path: &str, body: &T) -> Result<R, CpError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CpError::Decode(format!("encode request: {e}")))?;
        let req = self
            .http
            .post(format!("{}{}", self.base, path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        self.send(req).await
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, CpError> {
        self.send(self.http.get(format!("{}{}", self.base, path))).await
    }

    async fn send<R: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<R, CpError> {
        let resp = req.send().await.map_err(|e| CpError::Transport(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| CpError::Transport(error_chain(&e)))?;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<nkudo_core::api::ErrorBody>(&body) {
                Ok(e) => CpError::Http {
                    status,
                    code: e.code,
                    message: e.error,
                },
                Err(_) => CpError::Http {
                    status,
                    code: String::new(),
                    message: String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string(),
                },
            });
        }
        let body: &[u8] = if body.iter().all(|b| b.is_ascii_whitespace()) {
            b"null"
        } else {
            &body
        };
        serde_json::from_slice(body).map_err(|e| {
            CpError::Decode(format!(
                "{e}; body: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ))
        })
    }
}
