//! Where trigger values come from: Prometheus over its HTTP API (`PROMETHEUS_URL`; Thanos, Mimir and
//! VictoriaMetrics answer the same `/api/v1/query`), or, with none configured, the control plane's own
//! statistics computed the same way from its database (so a lab decides the same with no Prometheus).

use nkudo_core::rollout::trigger::{render, Bindings, Metric, Observation, Trigger};
use sqlx::{AnyConnection, Row};
use std::time::Duration;

/// A metrics source.
#[derive(Clone)]
pub enum Source {
    Prometheus { base: String, client: reqwest::Client },
    Builtin,
}

impl Source {
    pub fn from_config(url: Option<&str>) -> Source {
        match url {
            Some(u) => Source::Prometheus {
                base: u.trim_end_matches('/').to_string(),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap_or_default(),
            },
            None => Source::Builtin,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Source::Prometheus { .. } => "prometheus",
            Source::Builtin => "builtin",
        }
    }

    /// Whether this source can evaluate `t` (a custom trigger needs Prometheus).
    pub fn supports(&self, t: &Trigger) -> bool {
        matches!(self, Source::Prometheus { .. }) || t.metric != Metric::Custom
    }

    /// One value: the cohort `version` of `t` (with its sample size), as the log shows it.
    pub async fn measure(
        &self,
        conn: &mut AnyConnection,
        t: &Trigger,
        b: &Bindings<'_>,
        now_ms: i64,
    ) -> Result<Measured, String> {
        match self {
            Source::Prometheus { base, client } => {
                let query = render(&t.query, b)?;
                let value = prom_query(client, base, &query).await?;
                let samples = match &t.sample_query {
                    Some(sq) => prom_query(client, base, &render(sq, b)?).await?,
                    None => None,
                };
                Ok(Measured { query, value, samples })
            }
            Source::Builtin => {
                let since = now_ms - b.window.as_millis() as i64;
                let (value, samples) = builtin(conn, t.metric, b, since)
                    .await
                    .map_err(|e| format!("builtin statistics: {e}"))?;
                Ok(Measured {
                    query: format!(
                        "builtin:{}(version={}, window={})",
                        t.metric.as_str(),
                        b.version,
                        nkudo_core::duration::format_duration(b.window)
                    ),
                    value,
                    samples,
                })
            }
        }
    }
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    pub query: String,
    pub value: Option<f64>,
    pub samples: Option<f64>,
}

/// An observation from a cohort measurement and its reference.
pub fn observation(cohort: &Measured, reference: Option<f64>) -> Observation {
    Observation {
        value: cohort.value,
        reference,
        samples: cohort.samples,
    }
}

/// `GET /api/v1/query`: the first sample of a vector, or a scalar; `None` for an empty result or NaN.
async fn prom_query(client: &reqwest::Client, base: &str, query: &str) -> Result<Option<f64>, String> {
    let url = format!("{base}/api/v1/query");
    let resp = client
        .get(&url)
        .query(&[("query", query)])
        .send()
        .await
        .map_err(|e| format!("Prometheus at {base}: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("Prometheus at {base} answered {status} with no JSON: {e}"))?;
    if body.get("status").and_then(|s| s.as_str()) != Some("success") {
        let err = body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
        return Err(format!("Prometheus refused {query:?}: {err}"));
    }
    parse_prom_value(&body["data"])
}

/// Reads a query result (`resultType` vector or scalar).
pub fn parse_prom_value(data: &serde_json::Value) -> Result<Option<f64>, String> {
    let sample = match data.get("resultType").and_then(|t| t.as_str()) {
        Some("vector") => match data["result"].as_array().and_then(|a| a.first()) {
            None => return Ok(None),
            Some(s) => &s["value"],
        },
        Some("scalar") => &data["result"],
        other => return Err(format!("unexpected Prometheus result type {other:?}")),
    };
    let text = sample
        .get(1)
        .and_then(|v| v.as_str())
        .ok_or_else(|| "Prometheus sample without a value".to_string())?;
    let v: f64 = text
        .parse()
        .map_err(|_| format!("Prometheus value {text:?} is not a number"))?;
    Ok(v.is_finite().then_some(v))
}

/// The builtin statistics: the same definitions as the built-in triggers' PromQL.
async fn builtin(
    conn: &mut AnyConnection,
    metric: Metric,
    b: &Bindings<'_>,
    since: i64,
) -> Result<(Option<f64>, Option<f64>), sqlx::Error> {
    match metric {
        Metric::PlanFailureRate => {
            let r = sqlx::query(
                "SELECT COALESCE(SUM(CASE WHEN state = 'FAILED' THEN 1 ELSE 0 END), 0), COUNT(*) FROM executions \
                 WHERE completed_at >= $1 AND state IN ('SUCCEEDED', 'FAILED') AND agent_version = $2",
            )
            .bind(since)
            .bind(b.version)
            .fetch_one(&mut *conn)
            .await?;
            let (failed, total): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            Ok(((total > 0).then(|| failed as f64 / total as f64), Some(total as f64)))
        }
        Metric::EnrollmentFailureRate => {
            let r = sqlx::query(
                "SELECT COALESCE(SUM(CASE WHEN result <> 'success' THEN 1 ELSE 0 END), 0), COUNT(*) \
                 FROM enrollment_attempts WHERE at >= $1",
            )
            .bind(since)
            .fetch_one(&mut *conn)
            .await?;
            let (failed, total): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            Ok(((total > 0).then(|| failed as f64 / total as f64), Some(total as f64)))
        }
        Metric::UpgradeRollbacks => {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM agent_upgrades WHERE to_version = $1 AND result IN ('rolled-back', 'failed') \
                 AND recorded_at >= $2",
            )
            .bind(b.new_version)
            .bind(since)
            .fetch_one(&mut *conn)
            .await?;
            Ok((Some(n as f64), None))
        }
        Metric::CrashLoops => {
            let n: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(update_restarts) FROM agents WHERE agent_version = $1 AND revoked_at IS NULL",
            )
            .bind(b.new_version)
            .fetch_one(&mut *conn)
            .await?;
            Ok((Some(n.unwrap_or(0) as f64), None))
        }
        Metric::Custom => Ok((None, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_vectors_scalars_and_empty_results() {
        let v = json!({"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "0.25"]}]});
        assert_eq!(parse_prom_value(&v).unwrap(), Some(0.25));
        assert_eq!(
            parse_prom_value(&json!({"resultType": "vector", "result": []})).unwrap(),
            None
        );
        assert_eq!(
            parse_prom_value(&json!({"resultType": "scalar", "result": [1.0, "3"]})).unwrap(),
            Some(3.0)
        );
        assert_eq!(
            parse_prom_value(&json!({"resultType": "vector", "result": [{"value": [1.0, "NaN"]}]})).unwrap(),
            None
        );
        assert!(parse_prom_value(&json!({"resultType": "matrix", "result": []})).is_err());
    }
}
