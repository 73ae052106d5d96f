//! Audit trail: append-only events, hash-chained per tenant (each event carries the hash of the previous
//! one), written in the same transaction as the change they describe. [`verify`] walks every chain and
//! finds a changed, inserted or deleted row. The empty tenant id is the system chain (events with no tenant,
//! such as a failed login with an unknown key).

use crate::util::{now_ms, sha256_hex};
use sqlx::{AnyConnection, Row};

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One event to record. `metadata` never holds secrets.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub tenant_id: String,
    pub actor_type: &'static str,
    pub actor_id: Option<String>,
    pub site_id: Option<String>,
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: String,
    pub outcome: &'static str,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
    pub metadata: serde_json::Value,
}

impl AuditEvent {
    pub fn new(tenant_id: &str, action: &'static str, resource_type: &'static str, resource_id: &str) -> Self {
        AuditEvent {
            tenant_id: tenant_id.to_string(),
            actor_type: "SYSTEM",
            actor_id: None,
            site_id: None,
            action,
            resource_type,
            resource_id: resource_id.to_string(),
            outcome: "success",
            request_id: None,
            source_ip: None,
            metadata: serde_json::Value::Object(Default::default()),
        }
    }
    pub fn actor(mut self, actor_type: &'static str, actor_id: Option<&str>) -> Self {
        self.actor_type = actor_type;
        self.actor_id = actor_id.map(str::to_string);
        self
    }
    pub fn site(mut self, site_id: &str) -> Self {
        self.site_id = Some(site_id.to_string());
        self
    }
    pub fn outcome(mut self, outcome: &'static str) -> Self {
        self.outcome = outcome;
        self
    }
    pub fn request(mut self, ctx: &crate::auth::RequestCtx) -> Self {
        self.request_id = Some(ctx.request_id.clone());
        self.source_ip = Some(ctx.source_ip.clone());
        self
    }
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// Stored fields in hashing order.
struct Stored<'a> {
    tenant_id: &'a str,
    seq: i64,
    occurred_at: i64,
    actor_type: &'a str,
    actor_id: Option<&'a str>,
    site_id: Option<&'a str>,
    action: &'a str,
    resource_type: &'a str,
    resource_id: &'a str,
    outcome: &'a str,
    request_id: Option<&'a str>,
    source_ip: Option<&'a str>,
    metadata_json: &'a str,
}

fn entry_hash(prev_hash: &str, s: &Stored<'_>) -> String {
    let canonical = serde_json::json!([
        prev_hash,
        s.tenant_id,
        s.seq,
        s.occurred_at,
        s.actor_type,
        s.actor_id,
        s.site_id,
        s.action,
        s.resource_type,
        s.resource_id,
        s.outcome,
        s.request_id,
        s.source_ip,
        s.metadata_json
    ]);
    sha256_hex(canonical.to_string().as_bytes())
}

/// Appends `ev` to its tenant's chain. Call inside the transaction of the change it records; the chain head
/// row serialises concurrent writers of one tenant.
pub async fn record(conn: &mut AnyConnection, ev: &AuditEvent) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_chain_heads (tenant_id, last_seq, last_hash) VALUES ($1, 0, $2) \
         ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(&ev.tenant_id)
    .bind(GENESIS_HASH)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(
        "UPDATE audit_chain_heads SET last_seq = last_seq + 1 WHERE tenant_id = $1 RETURNING last_seq, last_hash",
    )
    .bind(&ev.tenant_id)
    .fetch_one(&mut *conn)
    .await?;
    let seq: i64 = row.try_get(0)?;
    let prev_hash: String = row.try_get(1)?;
    let occurred_at = now_ms();
    let metadata_json = ev.metadata.to_string();
    let stored = Stored {
        tenant_id: &ev.tenant_id,
        seq,
        occurred_at,
        actor_type: ev.actor_type,
        actor_id: ev.actor_id.as_deref(),
        site_id: ev.site_id.as_deref(),
        action: ev.action,
        resource_type: ev.resource_type,
        resource_id: &ev.resource_id,
        outcome: ev.outcome,
        request_id: ev.request_id.as_deref(),
        source_ip: ev.source_ip.as_deref(),
        metadata_json: &metadata_json,
    };
    let hash = entry_hash(&prev_hash, &stored);
    sqlx::query(
        "INSERT INTO audit_events (tenant_id, seq, prev_hash, entry_hash, occurred_at, actor_type, actor_id, \
         site_id, action, resource_type, resource_id, outcome, request_id, source_ip, metadata_json) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(&ev.tenant_id)
    .bind(seq)
    .bind(&prev_hash)
    .bind(&hash)
    .bind(occurred_at)
    .bind(ev.actor_type)
    .bind(ev.actor_id.as_deref())
    .bind(ev.site_id.as_deref())
    .bind(ev.action)
    .bind(ev.resource_type)
    .bind(&ev.resource_id)
    .bind(ev.outcome)
    .bind(ev.request_id.as_deref())
    .bind(ev.source_ip.as_deref())
    .bind(&metadata_json)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_chain_heads SET last_hash = $1 WHERE tenant_id = $2")
        .bind(&hash)
        .bind(&ev.tenant_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records `ev` in its own transaction (for events with no other write, such as authentication failures).
/// Failures are logged: the request they belong to has already been refused.
pub async fn record_standalone(db: &crate::db::Db, ev: AuditEvent) {
    let result = async {
        let mut tx = db.begin_write().await?;
        record(&mut tx, &ev).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = result {
        tracing::error!(error = %e, action = ev.action, "writing audit event");
    }
}

/// A broken chain: whose it is and the first problem found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    /// The chain's tenant id; empty for the system chain.
    pub tenant_id: String,
    /// Human-readable description of the first problem (names the tenant and the event's seq).
    pub message: String,
}

impl std::fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What `audit verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chains: usize,
    pub events: usize,
    /// The first problem of each broken chain; empty when everything verifies.
    pub problems: Vec<ChainProblem>,
}

impl VerifyReport {
    /// The tenant ids of the broken chains (`""`: the system chain), each once, in report order.
    pub fn broken_tenants(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.problems {
            if !out.contains(&p.tenant_id.as_str()) {
                out.push(&p.tenant_id);
            }
        }
        out
    }
}

/// Walks every chain: sequence numbers without gaps, each `prev_hash` equal to the previous `entry_hash`,
/// each `entry_hash` recomputed from the row, and the chain head pointing at the last event.
pub async fn verify(db: &crate::db::Db) -> Result<VerifyReport, sqlx::Error> {
    let mut report = VerifyReport::default();
    let heads = sqlx::query("SELECT tenant_id, last_seq, last_hash FROM audit_chain_heads ORDER BY tenant_id")
        .fetch_all(&db.pool)
        .await?;
    let mut head_tenants = std::collections::HashSet::new();
    for head in heads {
        let tenant: String = head.try_get(0)?;
        let last_seq: i64 = head.try_get(1)?;
        let last_hash: String = head.try_get(2)?;
        head_tenants.insert(tenant.clone());
        report.chains += 1;
        let label = if tenant.is_empty() {
            "system".to_string()
        } else {
            format!("tenant {tenant}")
        };
        let rows = sqlx::query(
            "SELECT seq, prev_hash, entry_hash, occurred_at, actor_type, actor_id, site_id, action, resource_type, \
             resource_id, outcome, request_id, source_ip, metadata_json FROM audit_events WHERE tenant_id = $1 \
             ORDER BY seq",
        )
        .bind(&tenant)
        .fetch_all(&db.pool)
        .await?;
        let mut expected_seq = 1i64;
        let mut prev = GENESIS_HASH.to_string();
        let mut problem = None;
        for r in &rows {
            report.events += 1;
            let seq: i64 = r.try_get(0)?;
            let prev_hash: String = r.try_get(1)?;
            let stored_hash: String = r.try_get(2)?;
            let actor_id: Option<String> = r.try_get(5)?;
            let site_id: Option<String> = r.try_get(6)?;
            let request_id: Option<String> = r.try_get(11)?;
            let source_ip: Option<String> = r.try_get(12)?;
            let (actor_type, action, resource_type, resource_id, outcome, metadata_json): (
                String,
                String,
                String,
                String,
                String,
                String,
            ) = (
                r.try_get(4)?,
                r.try_get(7)?,
                r.try_get(8)?,
                r.try_get(9)?,
                r.try_get(10)?,
                r.try_get(13)?,
            );
            if problem.is_some() {
                continue;
            }
            if seq != expected_seq {
                problem = Some(format!(
                    "{label}: event seq {expected_seq} is missing (next present is {seq}): a row was deleted"
                ));
                continue;
            }
            if prev_hash != prev {
                problem = Some(format!("{label}: event seq {seq} does not link to the previous event"));
                continue;
            }
            let recomputed = entry_hash(
                &prev_hash,
                &Stored {
                    tenant_id: &tenant,
                    seq,
                    occurred_at: r.try_get(3)?,
                    actor_type: &actor_type,
                    actor_id: actor_id.as_deref(),
                    site_id: site_id.as_deref(),
                    action: &action,
                    resource_type: &resource_type,
                    resource_id: &resource_id,
                    outcome: &outcome,
                    request_id: request_id.as_deref(),
                    source_ip: source_ip.as_deref(),
                    metadata_json: &metadata_json,
                },
            );
            if recomputed != stored_hash {
                problem = Some(format!(
                    "{label}: event seq {seq} ({action}) was changed: its hash does not match"
                ));
                continue;
            }
            prev = stored_hash;
            expected_seq += 1;
        }
        if problem.is_none() && (expected_seq - 1 != last_seq || prev != last_hash) {
            problem = Some(format!(
                "{label}: chain head says {last_seq} events, found {} intact: events at the end were deleted",
                expected_seq - 1
            ));
        }
        if let Some(message) = problem {
            report.problems.push(ChainProblem {
                tenant_id: tenant.clone(),
                message,
            });
        }
    }
    let orphans: Vec<String> = sqlx::query_scalar("SELECT DISTINCT tenant_id FROM audit_events")
        .fetch_all(&db.pool)
        .await?;
    for t in orphans {
        if !head_tenants.contains(&t) {
            report.problems.push(ChainProblem {
                message: format!("tenant {t}: events without a chain head"),
                tenant_id: t,
            });
        }
    }
    Ok(report)
}
