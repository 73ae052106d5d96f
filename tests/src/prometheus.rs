//! A real Prometheus (Debian's `/usr/bin/prometheus`) scraping a control plane's `/metrics` over HTTPS, for the
//! rollout tests that compare the Prometheus metrics source with the builtin one.
//!
//! [`Prometheus::start`] writes a temporary configuration (one job, `scrape_interval` 1 s, `scheme: https`, the
//! control plane's CA bundle as `ca_file`, server name `localhost`, which the dev server certificate covers), runs
//! `prometheus` on `127.0.0.1:<port>` with a temporary `--storage.tsdb.path`, and waits for `/-/ready`. The
//! process is killed when the value drops. [`Prometheus::wait_target_up`] waits for the first successful scrape.

use crate::harness::TempDir;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's Prometheus server (package `prometheus`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// The scrape job name.
pub const JOB: &str = "nkudo-control-plane";

/// A running Prometheus.
pub struct Prometheus {
    /// `http://127.0.0.1:<port>` (what `PROMETHEUS_URL` takes).
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    // Dropped last: config, TSDB and log.
    dir: TempDir,
}

impl Prometheus {
    /// Whether the binary is installed (`cargo xtask test` installs the `prometheus` package).
    pub fn available() -> bool {
        Path::new(PROMETHEUS_BIN).exists()
    }

    /// The configuration scraping `target` (`host:port`) over HTTPS, trusting `ca_file`.
    pub fn config(target: &str, ca_file: &Path) -> String {
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {JOB}\n    scheme: https\n    metrics_path: /metrics\n\
             \x20   tls_config:\n      ca_file: {ca}\n      server_name: localhost\n\
             \x20   static_configs:\n      - targets: [\"{target}\"]\n",
            ca = ca_file.display()
        )
    }

    /// Starts Prometheus on `127.0.0.1:<port>` scraping `target` (`127.0.0.1:<control plane port>`) over HTTPS
    /// with `ca_file` as its only trust root; returns once `/-/ready` answers 200.
    pub async fn start(port: u16, target: &str, ca_file: &Path) -> anyhow::Result<Prometheus> {
        if !Self::available() {
            bail!("{PROMETHEUS_BIN} is not installed (apt-get install prometheus; `cargo xtask test` does it)");
        }
        let dir = TempDir::new("nkudo-prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, Self::config(target, ca_file))?;
        let tsdb = dir.path().join("tsdb");
        std::fs::create_dir_all(&tsdb)?;
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(PROMETHEUS_BIN)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {PROMETHEUS_BIN}"))?;
        let mut p = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child: Some(child),
            log_path,
            dir,
        };
        p.wait_ready(Duration::from_secs(60)).await?;
        Ok(p)
    }

    /// The Prometheus log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The temporary directory (config, TSDB, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("prometheus exited with {st} before it was ready:\n{}", self.log());
                }
            }
            if let Ok(r) = client.get(format!("{}/-/ready", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after {timeout:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `GET /api/v1/query?query=<q>`: the first sample's value (`None`: empty result).
    pub async fn query(&self, q: &str) -> anyhow::Result<Option<f64>> {
        let r = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await?;
        let v: serde_json::Value = r.json().await?;
        if v["status"] != "success" {
            bail!("prometheus refused {q:?}: {v}");
        }
        let data = &v["data"];
        let sample = match data["resultType"].as_str() {
            Some("vector") => match data["result"].as_array().and_then(|a| a.first()) {
                Some(s) => s["value"].clone(),
                None => return Ok(None),
            },
            Some("scalar") => data["result"].clone(),
            other => bail!("unexpected result type {other:?}: {v}"),
        };
        let text = sample[1].as_str().context("sample without a value")?;
        Ok(Some(text.parse()?))
    }

    /// `GET /api/v1/targets`, the scrape pool of our job (for diagnostics).
    pub async fn targets(&self) -> String {
        match reqwest::Client::new()
            .get(format!("{}/api/v1/targets", self.url))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("GET /api/v1/targets: {e}"),
        }
    }

    /// Waits until the control plane's target is scraped successfully (`up{job=...} == 1`).
    pub async fn wait_target_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let q = format!("up{{job=\"{JOB}\"}}");
        loop {
            if let Ok(Some(v)) = self.query(&q).await {
                if v == 1.0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane target is not up after {timeout:?}; targets: {}\nlog:\n{}",
                    self.targets().await,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
