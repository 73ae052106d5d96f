//! Coalescing of the volatile part of heartbeats (last seen, version, host facts, NetBird status, microVM
//! snapshots). Handlers put the newest heartbeat of each agent into memory; [`flush`] writes all of them in
//! one transaction every `HEARTBEAT_FLUSH_INTERVAL`. At 10,000 heartbeats/s that turns 10,000 transactions
//! into one per interval. Losing an unflushed heartbeat costs at most one interval of "last seen"; whatever
//! must not be lost is written before the heartbeat is answered, not here.

use crate::db::Db;
use crate::metrics::Metrics;
use crate::util::now_ms;
use nkudo_core::api::{HostFacts, NetbirdStatus};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A microVM as the agent last reported it, with its state normalised to the stored enum.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub vcpu_count: Option<i64>,
    pub memory_mib: Option<i64>,
}

/// The newest heartbeat of one agent, not yet written.
#[derive(Debug, Clone)]
pub struct PendingHeartbeat {
    pub agent_id: String,
    pub tenant_id: String,
    pub site_id: String,
    pub host_id: String,
    pub received_at: i64,
    pub seq: Option<i64>,
    pub agent_version: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub kernel_version: Option<String>,
    pub cpu_cores_total: Option<i64>,
    pub memory_bytes_total: Option<i64>,
    pub storage_bytes_total: Option<i64>,
    pub kvm_available: Option<bool>,
    pub cloud_hypervisor_available: Option<bool>,
    pub host_facts: Option<HostFacts>,
    pub netbird: Option<NetbirdStatus>,
    /// `None` when the heartbeat carried no `microvms` key at all.
    pub microvms: Option<Vec<VmSnapshot>>,
    /// The version the binary was built as, when it differs from the installed one it reports.
    pub build_version: Option<String>,
    /// The self-update state (JSON of `UpdateStatus`).
    pub update_json: Option<String>,
}

impl PendingHeartbeat {
    /// Folds an older pending heartbeat into this newer one: fields the newer one lacks keep their values.
    fn absorb_older(&mut self, older: PendingHeartbeat) {
        macro_rules! keep {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = older.$f; } )* };
        }
        keep!(
            agent_version,
            os,
            arch,
            kernel_version,
            cpu_cores_total,
            memory_bytes_total,
            storage_bytes_total,
            kvm_available,
            cloud_hypervisor_available,
            host_facts,
            netbird,
            build_version,
            update_json,
            microvms
        );
        self.seq = match (self.seq, older.seq) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.received_at = self.received_at.max(older.received_at);
    }
}

#[derive(Default)]
pub struct HeartbeatBuffer {
    pending: Mutex<HashMap<String, PendingHeartbeat>>,
}

impl HeartbeatBuffer {
    pub fn push(&self, hb: PendingHeartbeat) {
        let Ok(mut map) = self.pending.lock() else { return };
        let mut hb = hb;
        if let Some(older) = map.remove(&hb.agent_id) {
            hb.absorb_older(older);
        }
        map.insert(hb.agent_id.clone(), hb);
    }

    fn take(&self) -> HashMap<String, PendingHeartbeat> {
        self.pending
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// Puts back heartbeats whose write failed, under any newer ones that arrived meanwhile.
    fn restore(&self, batch: HashMap<String, PendingHeartbeat>) {
        let Ok(mut map) = self.pending.lock() else { return };
        for (id, older) in batch {
            match map.get_mut(&id) {
                Some(newer) => newer.absorb_older(older),
                None => {
                    map.insert(id, older);
                }
            }
        }
    }
}

fn flag(b: Option<bool>) -> Option<i64> {
    b.map(i64::from)
}

/// Writes every pending heartbeat in one transaction. On failure they go back into the buffer.
pub async fn flush(buffer: &HeartbeatBuffer, db: &Db, metrics: &Metrics) -> Result<usize, sqlx::Error> {
    let batch = buffer.take();
    if batch.is_empty() {
        return Ok(0);
    }
    let started = Instant::now();
    match write_batch(db, &batch).await {
        Ok(()) => {
            metrics.heartbeat_flush.observe(started.elapsed().as_secs_f64());
            metrics.heartbeat_flush_rows.inc_by(batch.len() as u64);
            Ok(batch.len())
        }
        Err(e) => {
            metrics.heartbeat_flush_errors.inc();
            buffer.restore(batch);
            Err(e)
        }
    }
}

async fn write_batch(db: &Db, batch: &HashMap<String, PendingHeartbeat>) -> Result<(), sqlx::Error> {
    let now = now_ms();
    // A stable order keeps concurrent writers (other replicas) from deadlocking on row locks.
    let mut items: Vec<&PendingHeartbeat> = batch.values().collect();
    items.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    let mut tx = db.begin_write().await?;
    for hb in &items {
        let netbird = hb.netbird.as_ref().and_then(|n| serde_json::to_string(n).ok());
        sqlx::query(
            "UPDATE agents SET agent_version = COALESCE($1, agent_version), os = COALESCE($2, os), \
             arch = COALESCE($3, arch), kernel_version = COALESCE($4, kernel_version), state = 'ONLINE', \
             last_heartbeat_at = $5, heartbeat_seq = CASE WHEN heartbeat_seq > $6 THEN heartbeat_seq ELSE $6 END, \
             netbird_json = COALESCE($7, netbird_json), updated_at = $8, \
             build_version = CASE WHEN $1 IS NULL THEN build_version ELSE $10 END, \
             update_json = COALESCE($11, update_json) WHERE id = $9 AND revoked_at IS NULL",
        )
        .bind(hb.agent_version.as_deref())
        .bind(hb.os.as_deref())
        .bind(hb.arch.as_deref())
        .bind(hb.kernel_version.as_deref())
        .bind(hb.received_at)
        .bind(hb.seq.unwrap_or(0))
        .bind(netbird)
        .bind(now)
        .bind(&hb.agent_id)
        .bind(hb.build_version.as_deref())
        .bind(hb.update_json.as_deref())
        .execute(&mut *tx)
        .await?;
        let facts = hb.host_facts.as_ref().and_then(|f| serde_json::to_string(f).ok());
        let facts_at = facts.as_ref().map(|_| hb.received_at);
        sqlx::query(
            "UPDATE hosts SET cpu_cores_total = COALESCE($1, cpu_cores_total), \
             memory_bytes_total = COALESCE($2, memory_bytes_total), \
             storage_bytes_total = COALESCE($3, storage_bytes_total), kvm_available = COALESCE($4, kvm_available), \
             cloud_hypervisor_available = COALESCE($5, cloud_hypervisor_available), \
             facts_json = COALESCE($6, facts_json), last_facts_at = COALESCE($7, last_facts_at), updated_at = $8 \
             WHERE id = $9",
        )
        .bind(hb.cpu_cores_total)
        .bind(hb.memory_bytes_total)
        .bind(hb.storage_bytes_total)
        .bind(flag(hb.kvm_available))
        .bind(flag(hb.cloud_hypervisor_available))
        .bind(facts)
        .bind(facts_at)
        .bind(now)
        .bind(&hb.host_id)
        .execute(&mut *tx)
        .await?;
        // A snapshot never undoes what happened after it was taken: a VM deleted (or moved by an execution result)
        // since this heartbeat arrived keeps its newer state.
        for vm in hb.microvms.iter().flatten() {
            sqlx::query(
                "INSERT INTO microvms (tenant_id, id, site_id, host_id, name, state, vcpu_count, memory_mib, \
                 last_reported_at, last_transition_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, 1), COALESCE($8, 256), $9, $9, $9, $9) \
                 ON CONFLICT (tenant_id, id) DO UPDATE SET host_id = excluded.host_id, state = excluded.state, \
                 vcpu_count = COALESCE($7, microvms.vcpu_count), memory_mib = COALESCE($8, microvms.memory_mib), \
                 last_transition_at = CASE WHEN microvms.state <> excluded.state THEN excluded.last_reported_at \
                 ELSE microvms.last_transition_at END, \
                 last_reported_at = excluded.last_reported_at, updated_at = excluded.updated_at \
                 WHERE microvms.site_id = excluded.site_id AND microvms.state <> 'DELETED' \
                 AND (microvms.last_transition_at IS NULL OR microvms.last_transition_at <= excluded.last_reported_at)",
            )
            .bind(&hb.tenant_id)
            .bind(&vm.id)
            .bind(&hb.site_id)
            .bind(&hb.host_id)
            .bind(&vm.name)
            .bind(vm.state)
            .bind(vm.vcpu_count)
            .bind(vm.memory_mib)
            .bind(hb.received_at)
            .execute(&mut *tx)
            .await?;
        }
    }
    let mut sites: Vec<&str> = items.iter().map(|hb| hb.site_id.as_str()).collect();
    sites.sort_unstable();
    sites.dedup();
    for site in sites {
        crate::sweeper::recompute_site(&mut tx, site, now).await?;
    }
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(agent: &str, at: i64) -> PendingHeartbeat {
        PendingHeartbeat {
            agent_id: agent.into(),
            tenant_id: "t".into(),
            site_id: "s".into(),
            host_id: "h".into(),
            received_at: at,
            seq: None,
            agent_version: None,
            os: None,
            arch: None,
            kernel_version: None,
            cpu_cores_total: None,
            memory_bytes_total: None,
            storage_bytes_total: None,
            kvm_available: None,
            cloud_hypervisor_available: None,
            host_facts: None,
            netbird: None,
            microvms: None,
            build_version: None,
            update_json: None,
        }
    }

    #[test]
    fn newer_heartbeat_wins_and_keeps_what_it_lacks() {
        let buf = HeartbeatBuffer::default();
        let mut a = hb("a", 1);
        a.agent_version = Some("0.1.0".into());
        a.cpu_cores_total = Some(4);
        a.seq = Some(7);
        buf.push(a);
        let mut b = hb("a", 2);
        b.cpu_cores_total = Some(8);
        b.seq = Some(5);
        buf.push(b);
        buf.push(hb("b", 3));
        let taken = buf.take();
        assert_eq!(taken.len(), 2);
        let a = &taken["a"];
        assert_eq!(a.cpu_cores_total, Some(8), "the newer value wins");
        assert_eq!(
            a.agent_version.as_deref(),
            Some("0.1.0"),
            "a field the newer one lacks is kept"
        );
        assert_eq!(a.seq, Some(7), "the sequence only grows");
        assert_eq!(a.received_at, 2);
        assert!(buf.take().is_empty(), "take empties the buffer");
    }

    #[test]
    fn restore_puts_failed_batch_under_newer_heartbeats() {
        let buf = HeartbeatBuffer::default();
        let mut old = hb("a", 1);
        old.os = Some("debian".into());
        old.kernel_version = Some("6.1".into());
        buf.push(old);
        let batch = buf.take();
        let mut newer = hb("a", 5);
        newer.kernel_version = Some("6.6".into());
        buf.push(newer);
        buf.restore(batch);
        let taken = buf.take();
        let a = &taken["a"];
        assert_eq!(a.kernel_version.as_deref(), Some("6.6"));
        assert_eq!(a.os.as_deref(), Some("debian"));
        assert_eq!(a.received_at, 5);
    }
}
