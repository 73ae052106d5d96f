//! Database leases for singleton background work across replicas: one row per name, held by one replica until
//! it expires. Taking or renewing a lease is one upsert, the same SQL on SQLite and Postgres.

use sqlx::AnyPool;

/// Takes or renews the lease `name` for `holder` until `now + ttl_ms`. True when `holder` holds it.
pub async fn acquire(pool: &AnyPool, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO controller_leases (name, holder, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE controller_leases.holder = excluded.holder OR controller_leases.expires_at < $4",
    )
    .bind(name)
    .bind(holder)
    .bind(now + ttl_ms)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Gives the lease up (on shutdown), so that another replica takes over at once.
pub async fn release(pool: &AnyPool, name: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM controller_leases WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}
