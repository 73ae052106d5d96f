//! Database backends for the control plane under test, and direct SQL access to its database.

use anyhow::{bail, Context};
use sqlx::Connection;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Default admin URL of the test Postgres server (override with `NKUDO_TEST_PG_URL`).
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which database the control plane under test uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The default: no `DATABASE_URL`, the data directory's `nkudo.db`.
    Sqlite,
    /// A fresh database on the server named by `NKUDO_TEST_PG_URL`.
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

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether we run under CI (`CI=true`), where an unavailable dependency fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// The name of the running test (libtest names the test thread after the test).
pub fn current_test_name() -> String {
    std::thread::current().name().unwrap_or("<unnamed test>").to_string()
}

/// Prints a skip notice straight to the process's stderr (bypassing libtest's output capture, so it is seen).
pub fn print_skip(reason: &str) {
    let line = format!("\n*** SKIPPED ({reason}): {} ***\n", current_test_name());
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// A database for one control plane. For Postgres it owns a fresh database that is dropped (best effort)
/// when the handle drops; for SQLite there is nothing to own (`url()` is `None`: the data dir decides).
#[derive(Debug)]
pub struct DbHandle {
    backend: Backend,
    url: Option<String>,
    pg_cleanup: Option<(String, String)>, // (admin url, database name)
}

impl DbHandle {
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// The `DATABASE_URL` to hand the control plane (`None` for SQLite).
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }
    /// The database name (Postgres only).
    pub fn pg_database_name(&self) -> Option<&str> {
        self.pg_cleanup.as_ref().map(|(_, n)| n.as_str())
    }
    /// An existing database at `url` (e.g. another control plane's, for a second replica). Not owned: nothing
    /// is dropped when the handle drops.
    pub fn existing(backend: Backend, url: impl Into<String>) -> DbHandle {
        DbHandle {
            backend,
            url: Some(url.into()),
            pg_cleanup: None,
        }
    }
}

impl Drop for DbHandle {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.pg_cleanup.take() else {
            return;
        };
        // Drop may run inside a tokio runtime: do the async work on a separate thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let fut = async {
                    let mut conn = sqlx::PgConnection::connect(&admin_url).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await?;
                    Ok::<_, sqlx::Error>(())
                };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(15), fut)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    eprintln!("warning: could not drop test database {name}: {e}");
                }
            });
        })
        .join();
    }
}

/// Replaces the database name (the URL path) of a `postgres://` URL, keeping any query string.
pub fn pg_url_with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("postgres URL without scheme")? + 3;
    let authority_and_path = &base[scheme_end..];
    let authority = match authority_and_path.find('/') {
        Some(i) => &authority_and_path[..i],
        None => authority_and_path,
    };
    let mut out = format!("{}{}/{}", &base[..scheme_end], authority, database);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// A database for a control plane on `backend`.
///
/// Postgres: connects to `NKUDO_TEST_PG_URL` (default [`DEFAULT_PG_URL`]), creates `nkudo_t_<random>` and
/// returns its URL. When Postgres does not answer: with `CI=true` this is an error (the test fails);
/// otherwise a loud `SKIPPED (postgres unavailable): <test>` line goes to stderr and `Ok(None)` is returned so
/// that the test can return early.
pub async fn database_url(backend: Backend) -> anyhow::Result<Option<DbHandle>> {
    match backend {
        Backend::Sqlite => Ok(Some(DbHandle {
            backend,
            url: None,
            pg_cleanup: None,
        })),
        Backend::Postgres => {
            let admin_url = std::env::var("NKUDO_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
            let conn = tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&admin_url)).await;
            let mut conn = match conn {
                Ok(Ok(c)) => c,
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "connect timed out after 10 s".to_string(),
                        Ok(Ok(_)) => unreachable!(),
                    };
                    if in_ci() {
                        bail!("postgres unavailable at {admin_url} (CI=true, so this fails): {why}");
                    }
                    print_skip("postgres unavailable");
                    return Ok(None);
                }
            };
            let name = format!("nkudo_t_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut conn)
                .await
                .with_context(|| format!("CREATE DATABASE {name}"))?;
            let _ = conn.close().await;
            let url = pg_url_with_database(&admin_url, &name)?;
            Ok(Some(DbHandle {
                backend,
                url: Some(url),
                pg_cleanup: Some((admin_url, name)),
            }))
        }
    }
}

/// Opens a direct connection to the control plane's database (for inspection and tamper tests): the
/// Postgres test database, or `<data_dir>/nkudo.db` for SQLite.
pub async fn connect_db(db: &DbHandle, data_dir: &Path) -> anyhow::Result<sqlx::AnyConnection> {
    sqlx::any::install_default_drivers();
    let url = match db.url() {
        Some(u) => u.to_string(),
        None => {
            let file = data_dir.join("nkudo.db");
            if !file.exists() {
                bail!("SQLite database {} does not exist", file.display());
            }
            format!("sqlite://{}", file.display())
        }
    };
    sqlx::AnyConnection::connect(&url)
        .await
        .with_context(|| format!("connect {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_in_url() {
        assert_eq!(
            pg_url_with_database("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            pg_url_with_database("postgres://u:p@h/db?sslmode=disable", "y").unwrap(),
            "postgres://u:p@h/y?sslmode=disable"
        );
        assert_eq!(
            pg_url_with_database("postgres://h:5432", "z").unwrap(),
            "postgres://h:5432/z"
        );
    }
}
