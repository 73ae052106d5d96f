//! Database access: one sqlx `AnyPool` over SQLite (the embedded default) or Postgres (production), and the
//! versioned migrations of each backend, applied at start-up and by `nkudo-control-plane migrate`.
//!
//! Both schemas use portable column types (TEXT ids, BIGINT milliseconds and flags), so every query in the
//! control plane runs unchanged on both backends; where a backend needs its own SQL, [`Backend`] tells.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// One migration: a version name and its SQL for each backend.
struct Migration {
    version: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// Append-only. A release's schema must keep working with the previous release's code (expand/contract).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "0001_init",
        sqlite: include_str!("../migrations/sqlite/0001_init.sql"),
        postgres: include_str!("../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: "0002_releases",
        sqlite: include_str!("../migrations/sqlite/0002_releases.sql"),
        postgres: include_str!("../migrations/postgres/0002_releases.sql"),
    },
    Migration {
        version: "0003_rollouts",
        sqlite: include_str!("../migrations/sqlite/0003_rollouts.sql"),
        postgres: include_str!("../migrations/postgres/0003_rollouts.sql"),
    },
];

/// Advisory lock key that serialises migrations across control-plane replicas on Postgres.
const MIGRATION_LOCK_KEY: i64 = 0x6e6b_7564_6f01;

#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

impl Db {
    /// Connects to `url` (`sqlite://path` or `postgres://…`); creates a missing SQLite file and its directory.
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(sqlx::Error::Configuration(
                "DATABASE_URL must start with sqlite:// or postgres://".into(),
            ));
        };
        let pool = match backend {
            Backend::Sqlite => {
                let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or(path);
                if let Some(dir) = std::path::Path::new(path).parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
                    }
                }
                let full = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                let opts = AnyConnectOptions::from_str(&full)?;
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(15))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
                                 PRAGMA foreign_keys=ON; PRAGMA busy_timeout=15000;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await?
            }
            Backend::Postgres => {
                let opts = AnyConnectOptions::from_str(url)?;
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(15))
                    .connect_with(opts)
                    .await?
            }
        };
        Ok(Db { pool, backend })
    }

    /// Applies every migration not applied yet, each in its own transaction together with its
    /// `schema_migrations` row. On Postgres an advisory lock keeps concurrent replicas from racing.
    /// Returns the versions applied now.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .execute(&mut *conn)
                .await?;
        }
        let result = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await?;
            let mut applied_now = Vec::new();
            for m in MIGRATIONS {
                let done: Option<String> =
                    sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                        .bind(m.version)
                        .fetch_optional(&mut *conn)
                        .await?;
                if done.is_some() {
                    continue;
                }
                let sql = match self.backend {
                    Backend::Sqlite => m.sqlite,
                    Backend::Postgres => m.postgres,
                };
                conn.execute("BEGIN").await?;
                let step = async {
                    sqlx::raw_sql(sql).execute(&mut *conn).await?;
                    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                        .bind(m.version)
                        .bind(crate::util::now_ms())
                        .execute(&mut *conn)
                        .await?;
                    Ok::<_, sqlx::Error>(())
                }
                .await;
                match step {
                    Ok(()) => {
                        conn.execute("COMMIT").await?;
                        applied_now.push(m.version);
                    }
                    Err(e) => {
                        let _ = conn.execute("ROLLBACK").await;
                        return Err(e);
                    }
                }
            }
            Ok(applied_now)
        }
        .await;
        if self.backend == Backend::Postgres {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK_KEY)
                .execute(&mut *conn)
                .await;
        }
        result
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock at once (a no-op UPDATE as its
    /// first statement), waiting under `busy_timeout`: a deferred transaction that reads first and writes later
    /// fails at once with SQLITE_BUSY when another connection committed a write in between (WAL snapshots cannot
    /// be upgraded), which under load turned into 500s. On Postgres this is a plain BEGIN.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Sqlite {
            sqlx::query("UPDATE schema_migrations SET applied_at = applied_at WHERE version = ''")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query_scalar::<_, i64>("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .map(|_| ())
    }

    /// Whether an error is a unique-constraint violation (for 409 answers).
    pub fn is_unique_violation(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Database(db) => {
                db.is_unique_violation()
                    || db.code().as_deref() == Some("23505")
                    || db.message().contains("UNIQUE constraint failed")
            }
            _ => false,
        }
    }
}
