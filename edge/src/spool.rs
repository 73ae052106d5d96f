//! The on-disk spool of results and log lines waiting for the control plane (`<state-dir>/spool.jsonl`).
//!
//! One JSON object per line, appended and fsynced as it is produced, delivered in order. Bounded by entries and
//! bytes: when full, the oldest **log lines** are dropped (and counted); results are never dropped. After a
//! delivery the remaining entries are rewritten atomically. A torn last line (crash while appending) is skipped
//! on load.

use crate::fsutil;
use nkudo_core::api::{ActionResult, LogEntry};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const SPOOL_FILE: &str = "spool.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpoolItem {
    Result {
        plan_id: String,
        plan_execution_id: String,
        result: ActionResult,
    },
    Log {
        entry: LogEntry,
    },
}

impl SpoolItem {
    pub fn is_log(&self) -> bool {
        matches!(self, SpoolItem::Log { .. })
    }
}

#[derive(Debug)]
struct Entry {
    item: SpoolItem,
    bytes: u64,
    /// When it was queued (monotonic), for log batching.
    queued: std::time::Instant,
}

#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Option<File>,
    items: VecDeque<Entry>,
    bytes: u64,
    pub max_entries: usize,
    pub max_bytes: u64,
    /// Log lines dropped because the spool was full (this process).
    pub dropped_logs: u64,
}

impl Spool {
    /// Opens the spool in `dir`, loading what an earlier run left undelivered.
    pub fn open(dir: &Path, max_entries: usize, max_bytes: u64) -> io::Result<Spool> {
        let path = dir.join(SPOOL_FILE);
        let mut items = VecDeque::new();
        let mut bytes = 0;
        let mut torn = 0;
        match std::fs::read(&path) {
            Ok(data) => {
                let now = std::time::Instant::now();
                for line in data.split(|b| *b == b'\n') {
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    match serde_json::from_slice::<SpoolItem>(line) {
                        Ok(item) => {
                            let n = line.len() as u64 + 1;
                            bytes += n;
                            items.push_back(Entry {
                                item,
                                bytes: n,
                                queued: now,
                            });
                        }
                        Err(_) => torn += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut spool = Spool {
            path,
            file: None,
            items,
            bytes,
            max_entries,
            max_bytes,
            dropped_logs: 0,
        };
        if torn > 0 {
            crate::logging::warn(&format!("spool: skipped {torn} unreadable line(s) (interrupted write)"));
            spool.rewrite()?;
        }
        Ok(spool)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn append_file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            self.file = Some(f);
        }
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("spool file not open"))
    }

    /// Queues `item` durably (appended and fsynced before this returns), then enforces the bounds.
    pub fn push(&mut self, item: SpoolItem) -> io::Result<()> {
        let mut line = serde_json::to_vec(&item).map_err(io::Error::other)?;
        line.push(b'\n');
        let n = line.len() as u64;
        {
            let f = self.append_file()?;
            f.write_all(&line)?;
            f.sync_data()?;
        }
        self.items.push_back(Entry {
            item,
            bytes: n,
            queued: std::time::Instant::now(),
        });
        self.bytes += n;
        self.enforce_bounds()
    }

    /// Over a bound: drop the oldest log lines until 90% of the bounds are free again, then rewrite once.
    fn enforce_bounds(&mut self) -> io::Result<()> {
        if self.items.len() <= self.max_entries && self.bytes <= self.max_bytes {
            return Ok(());
        }
        let target_n = self.max_entries * 9 / 10;
        let target_b = self.max_bytes * 9 / 10;
        let mut dropped = 0u64;
        let mut kept = VecDeque::with_capacity(self.items.len());
        let mut n = self.items.len();
        let mut b = self.bytes;
        for e in self.items.drain(..) {
            if (n > target_n || b > target_b) && e.item.is_log() {
                n -= 1;
                b -= e.bytes;
                dropped += 1;
                continue;
            }
            kept.push_back(e);
        }
        self.items = kept;
        self.bytes = b;
        if dropped > 0 {
            self.dropped_logs += dropped;
            crate::logging::warn(&format!(
                "spool full ({} entries, {} bytes): dropped the {dropped} oldest log line(s); {} dropped so far",
                self.items.len(),
                self.bytes,
                self.dropped_logs
            ));
            self.rewrite()?;
        }
        Ok(())
    }

    /// The next batch to deliver: up to `max_logs` consecutive log lines, or up to `max_results` consecutive
    /// results of one plan. Empty when the spool is empty.
    pub fn next_batch(&self, max_logs: usize, max_results: usize) -> Vec<SpoolItem> {
        let mut out = Vec::new();
        let Some(first) = self.items.front() else {
            return out;
        };
        match &first.item {
            SpoolItem::Log { .. } => {
                for e in self.items.iter().take_while(|e| e.item.is_log()).take(max_logs) {
                    out.push(e.item.clone());
                }
            }
            SpoolItem::Result { plan_id, .. } => {
                for e in self.items.iter().take(max_results) {
                    match &e.item {
                        SpoolItem::Result { plan_id: p, .. } if p == plan_id => out.push(e.item.clone()),
                        _ => break,
                    }
                }
            }
        }
        out
    }

    /// Whether a batch should go now: a result is waiting, `max_logs` lines are waiting, or the oldest entry
    /// waited `max_wait`.
    pub fn due(&self, max_logs: usize, max_wait: std::time::Duration) -> bool {
        let Some(first) = self.items.front() else {
            return false;
        };
        first.queued.elapsed() >= max_wait
            || self.items.len() >= max_logs
            || self.items.iter().any(|e| !e.item.is_log())
    }

    /// How long until the oldest entry has waited `max_wait` (zero when due).
    pub fn wait_for(&self, max_wait: std::time::Duration) -> Option<std::time::Duration> {
        self.items.front().map(|e| max_wait.saturating_sub(e.queued.elapsed()))
    }

    /// Removes the first `n` entries (delivered) and rewrites the file.
    pub fn pop_front(&mut self, n: usize) -> io::Result<()> {
        for _ in 0..n.min(self.items.len()) {
            if let Some(e) = self.items.pop_front() {
                self.bytes -= e.bytes;
            }
        }
        self.rewrite()
    }

    pub fn has_result(&self, execution_id: &str, action_id: &str) -> bool {
        self.items.iter().any(|e| match &e.item {
            SpoolItem::Result { result, .. } => {
                result.action_id == action_id && result.execution_id.as_deref() == Some(execution_id)
            }
            _ => false,
        })
    }

    pub fn items(&self) -> impl Iterator<Item = &SpoolItem> {
        self.items.iter().map(|e| &e.item)
    }

    fn rewrite(&mut self) -> io::Result<()> {
        self.file = None;
        if self.items.is_empty() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(dir) = self.path.parent() {
                let _ = fsutil::sync_dir(dir);
            }
            return Ok(());
        }
        let mut data = Vec::with_capacity(self.bytes as usize);
        for e in &self.items {
            serde_json::to_writer(&mut data, &e.item).map_err(io::Error::other)?;
            data.push(b'\n');
        }
        fsutil::write_atomic(&self.path, &data, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(seq: i64) -> SpoolItem {
        SpoolItem::Log {
            entry: LogEntry {
                execution_id: "e".into(),
                sequence: seq,
                severity: "INFO".into(),
                message: format!("line {seq}"),
                ..Default::default()
            },
        }
    }

    fn result(plan: &str, action: &str) -> SpoolItem {
        SpoolItem::Result {
            plan_id: plan.into(),
            plan_execution_id: plan.into(),
            result: ActionResult {
                execution_id: Some(format!("x-{action}")),
                action_id: action.into(),
                ok: true,
                ..Default::default()
            },
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nkudo-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn survives_a_restart_in_order_and_skips_a_torn_line() {
        let d = dir("restart");
        let mut s = Spool::open(&d, 100, 1 << 20).unwrap();
        s.push(log(1)).unwrap();
        s.push(result("p", "a")).unwrap();
        s.push(log(2)).unwrap();
        drop(s);
        // A torn line at the end (crash in the middle of an append).
        let mut f = OpenOptions::new().append(true).open(d.join(SPOOL_FILE)).unwrap();
        f.write_all(b"{\"kind\":\"log\",\"ent").unwrap();
        let mut s = Spool::open(&d, 100, 1 << 20).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.next_batch(100, 50), vec![log(1)]);
        s.pop_front(1).unwrap();
        assert_eq!(s.next_batch(100, 50), vec![result("p", "a")]);
        assert!(s.has_result("x-a", "a"));
        s.pop_front(1).unwrap();
        s.pop_front(1).unwrap();
        assert!(s.is_empty());
        assert!(!d.join(SPOOL_FILE).exists());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn full_spool_drops_oldest_logs_never_results() {
        let d = dir("full");
        let mut s = Spool::open(&d, 20, 1 << 20).unwrap();
        s.push(result("p", "first")).unwrap();
        for i in 0..40 {
            s.push(log(i)).unwrap();
        }
        s.push(result("p", "last")).unwrap();
        assert!(s.len() <= 21);
        assert!(s.dropped_logs > 0);
        let items: Vec<_> = s.items().cloned().collect();
        assert_eq!(items[0], result("p", "first"));
        assert!(items.contains(&result("p", "last")));
        // The newest logs are the ones kept.
        assert!(items.contains(&log(39)));
        assert!(!items.contains(&log(0)));
        // And the file holds the same.
        let again = Spool::open(&d, 20, 1 << 20).unwrap();
        assert_eq!(again.items().cloned().collect::<Vec<_>>(), items);
        // Results alone may exceed the bound: none is dropped.
        let d2 = dir("results");
        let mut r = Spool::open(&d2, 10, 1 << 20).unwrap();
        for i in 0..15 {
            r.push(result("p", &format!("a{i}"))).unwrap();
        }
        assert_eq!(r.len(), 15);
        std::fs::remove_dir_all(d).unwrap();
        std::fs::remove_dir_all(d2).unwrap();
    }

    #[test]
    fn batches_group_logs_and_results_of_one_plan() {
        let d = dir("batch");
        let mut s = Spool::open(&d, 100, 1 << 20).unwrap();
        for i in 0..5 {
            s.push(log(i)).unwrap();
        }
        s.push(result("p", "a")).unwrap();
        s.push(result("p", "b")).unwrap();
        s.push(result("q", "c")).unwrap();
        assert_eq!(s.next_batch(3, 50).len(), 3);
        assert_eq!(s.next_batch(100, 50).len(), 5);
        s.pop_front(5).unwrap();
        assert_eq!(s.next_batch(100, 50).len(), 2);
        std::fs::remove_dir_all(d).unwrap();
    }
}
