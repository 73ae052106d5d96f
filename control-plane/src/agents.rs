//! In-memory view of every agent's credentials (current certificate serial, expiry, revocation), so that
//! mTLS requests are authorised per request without a database round trip. Writes of this process update it
//! at once; changes made by other replicas arrive through [`AgentCache::refresh_changed`], which the
//! background task runs every second (`agents.auth_changed_at`).

use crate::db::Db;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: String,
    pub tenant_id: String,
    pub site_id: String,
    pub host_id: String,
    pub cert_serial: String,
    pub revoked: bool,
    /// The version the agent last reported (at enrollment or in a heartbeat).
    pub agent_version: String,
}

const SELECT: &str =
    "SELECT id, tenant_id, site_id, host_id, cert_serial, revoked_at, auth_changed_at, agent_version FROM agents";

fn from_row(r: &sqlx::any::AnyRow) -> Result<(AgentRecord, i64), sqlx::Error> {
    let revoked_at: Option<i64> = r.try_get(5)?;
    Ok((
        AgentRecord {
            id: r.try_get(0)?,
            tenant_id: r.try_get(1)?,
            site_id: r.try_get(2)?,
            host_id: r.try_get(3)?,
            cert_serial: r.try_get(4)?,
            revoked: revoked_at.is_some(),
            agent_version: r.try_get(7)?,
        },
        r.try_get(6)?,
    ))
}

#[derive(Default)]
pub struct AgentCache {
    map: RwLock<HashMap<String, Arc<AgentRecord>>>,
    /// Highest `auth_changed_at` seen by a refresh.
    watermark: AtomicI64,
}

/// How far back a refresh looks past its watermark, to tolerate clock skew between replicas.
const REFRESH_OVERLAP_MS: i64 = 5_000;

impl AgentCache {
    /// The agent's record, from memory or loaded from the database.
    pub async fn get(&self, db: &Db, id: &str) -> Result<Option<Arc<AgentRecord>>, sqlx::Error> {
        if let Some(rec) = self.map.read().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(Some(rec));
        }
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&db.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (rec, _) = from_row(&row)?;
        let rec = Arc::new(rec);
        self.put_arc(rec.clone());
        Ok(Some(rec))
    }

    pub fn put(&self, rec: AgentRecord) {
        self.put_arc(Arc::new(rec));
    }

    fn put_arc(&self, rec: Arc<AgentRecord>) {
        if let Ok(mut m) = self.map.write() {
            m.insert(rec.id.clone(), rec);
        }
    }

    /// Marks an agent revoked in memory (after the database write committed).
    pub fn mark_revoked(&self, id: &str) {
        if let Ok(mut m) = self.map.write() {
            if let Some(rec) = m.get(id) {
                let mut r = (**rec).clone();
                r.revoked = true;
                m.insert(id.to_string(), Arc::new(r));
            }
        }
    }

    /// Reloads agents whose credentials changed recently (possibly on another replica).
    pub async fn refresh_changed(&self, db: &Db) -> Result<usize, sqlx::Error> {
        let since = self.watermark.load(Ordering::Relaxed) - REFRESH_OVERLAP_MS;
        let rows = sqlx::query(&format!("{SELECT} WHERE auth_changed_at > $1"))
            .bind(since)
            .fetch_all(&db.pool)
            .await?;
        let mut max = self.watermark.load(Ordering::Relaxed);
        let mut n = 0;
        if let Ok(mut m) = self.map.write() {
            for row in &rows {
                let (rec, changed) = from_row(row)?;
                max = max.max(changed);
                // Only agents already cached need refreshing; others load on first use.
                if m.contains_key(&rec.id) {
                    m.insert(rec.id.clone(), Arc::new(rec));
                    n += 1;
                }
            }
        }
        self.watermark.store(max, Ordering::Relaxed);
        Ok(n)
    }
}
