//! Resumable, capped artifact download into `<state-dir>/downloads/<name>.part`.
//!
//! * **Resume**: a `.part` left by an interrupted download (also by an earlier process) is continued with
//!   `Range: bytes=<len>-`; a `206` whose `Content-Range` starts elsewhere, or a `200` (the server ignores ranges),
//!   restarts from zero.
//! * **Endless data**: never more than the signed size is written; a server announcing or sending more is refused
//!   ([`DownloadError::Permanent`]).
//! * **Thin links**: an optional rate limit (bytes/s).
//!
//! The caller verifies the SHA-256 of the complete file afterwards.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// A download stalls out after this long without a byte.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one download request (a resumed request continues where this one stopped).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// Retry later (network, server errors, an interrupted transfer); the `.part` is kept for resuming.
    Transient(String),
    /// Never retry this artifact (the server sends more than the signed size).
    Permanent(String),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Transient(m) | DownloadError::Permanent(m) => f.write_str(m),
        }
    }
}

/// A plain HTTP(S) client for artifacts on an external URL (system roots).
pub fn plain_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(crate::client::CONNECT_TIMEOUT)
        .user_agent(format!(
            "nkudo-edge/{}",
            nkudo_core::installed::reported_version().version
        ))
        .build()
        .map_err(|e| format!("build HTTP client: {}", crate::client::error_chain(&e)))
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn truncate(path: &Path) -> Result<(), DownloadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DownloadError::Transient(format!("remove {}: {e}", path.display()))),
    }
}

/// `bytes START-END/TOTAL` → START.
fn content_range_start(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// Downloads `url` into `part` until it holds `size` bytes (resuming what is there). `Ok` when complete.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    part: &Path,
    size: u64,
    rate_limit: Option<u64>,
) -> Result<(), DownloadError> {
    let transient = |m: String| DownloadError::Transient(m);
    let mut have = len_of(part);
    if have > size {
        truncate(part)?;
        have = 0;
    }
    if have == size {
        return Ok(());
    }
    let mut req = http.get(url).timeout(REQUEST_TIMEOUT);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| transient(format!("GET {url}: {}", crate::client::error_chain(&e))))?;
    let status = resp.status().as_u16();
    match status {
        206 => {
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            if start != Some(have) {
                truncate(part)?;
                return Err(transient(format!(
                    "GET {url}: asked for bytes {have}- but the server answered the range starting at {start:?}; \
                     starting over"
                )));
            }
        }
        200 => {
            if have > 0 {
                truncate(part)?;
                have = 0;
            }
        }
        416 => {
            truncate(part)?;
            return Err(transient(format!(
                "GET {url}: range {have}- not satisfiable; starting over"
            )));
        }
        _ => {
            let body = resp.bytes().await.unwrap_or_default();
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string();
            return Err(transient(format!("GET {url}: HTTP {status}: {text}")));
        }
    }
    if let Some(announced) = resp.content_length() {
        if have + announced > size {
            return Err(DownloadError::Permanent(format!(
                "GET {url}: the server announces {} bytes, more than the signed size of {size} (endless-data \
                 defence)",
                have + announced
            )));
        }
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(part)
            .map_err(|e| transient(format!("open {}: {e}", part.display())))?
    };
    let t0 = Instant::now();
    let mut got: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, resp.chunk()).await {
            Err(_) => {
                let _ = file.sync_all();
                return Err(transient(format!(
                    "GET {url}: no data for {}s after {} of {size} bytes",
                    IDLE_TIMEOUT.as_secs(),
                    have + got
                )));
            }
            Ok(Err(e)) => {
                let _ = file.sync_all();
                return Err(transient(format!(
                    "GET {url}: interrupted after {} of {size} bytes: {}",
                    have + got,
                    crate::client::error_chain(&e)
                )));
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if have + got + chunk.len() as u64 > size {
            let _ = file.sync_all();
            return Err(DownloadError::Permanent(format!(
                "GET {url}: the server sends more than the signed size of {size} bytes; stopped (endless-data \
                 defence)"
            )));
        }
        file.write_all(&chunk)
            .map_err(|e| transient(format!("write {}: {e}", part.display())))?;
        got += chunk.len() as u64;
        if let Some(rate) = rate_limit.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(got as f64 / rate as f64);
            let spent = t0.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
    }
    file.sync_all()
        .map_err(|e| transient(format!("sync {}: {e}", part.display())))?;
    let total = have + got;
    if total < size {
        return Err(transient(format!(
            "GET {url}: the connection ended after {total} of {size} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
    }
}
