//! Kiln's storage: sea-orm connections to SQLite (the default, a file per service under the
//! data dir) or PostgreSQL, a per-service migrations runner applied at start, and AIP list pages.

pub mod listing;

use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, DbErr,
    Statement, TransactionTrait,
};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] DbErr),
    #[error("migration {version} ({name}) of {service} failed: {source}")]
    Migration {
        service: String,
        version: i64,
        name: &'static str,
        source: DbErr,
    },
}

impl From<Error> for kiln_core::Error {
    fn from(err: Error) -> Self {
        kiln_core::Error::internal("storage", err)
    }
}

/// Opens a pool on `url`. Every SQLite connection of the pool gets WAL mode (concurrent
/// readers beside one writer), `synchronous = NORMAL` (a commit survives a process crash
/// without an fsync of its own; the WAL is synced at checkpoints), a busy timeout and foreign
/// keys. SQLite connections are not pinged before use.
pub async fn connect(url: &str) -> Result<DatabaseConnection, Error> {
    use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
    let sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if sqlite { 8 } else { 16 })
        // A ping before every statement guards against a server that dropped the
        // connection; an embedded database has none, and the ping is a thread round trip.
        .test_before_acquire(!sqlite)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        // A call waits this long at most for a connection (the database down, or every
        // connection busy), then fails as UNAVAILABLE: callers retry, nothing hangs.
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    Ok(Database::connect(options).await?)
}

/// One schema step. The SQL may use `{blob}` (BLOB / BYTEA) and `{serial}` (an
/// auto-incrementing integer primary key) so one text serves both backends; statements are
/// separated by `;`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Renders a migration's SQL for a backend.
pub fn render_sql(sql: &str, backend: DatabaseBackend) -> String {
    let (blob, serial) = match backend {
        DatabaseBackend::Postgres => ("BYTEA", "BIGSERIAL PRIMARY KEY"),
        _ => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    };
    sql.replace("{blob}", blob).replace("{serial}", serial)
}

/// Any number: the key of the PostgreSQL advisory lock that migrations run under.
const MIGRATION_LOCK: i64 = 0x6b69_6c6e; // "kiln"

/// Applies the migrations of `service` not yet applied, each in its own transaction, and
/// records them in `<service>_schema_migrations`. Safe to call at every start, from many
/// processes at once: on PostgreSQL they take turns (services of one database starting
/// together would otherwise race to create the tables they share, such as the outbox, and
/// one would fail on PostgreSQL's catalog).
pub async fn migrate(
    db: &DatabaseConnection,
    service: &str,
    migrations: &[Migration],
) -> Result<(), Error> {
    if db.get_database_backend() != DatabaseBackend::Postgres {
        return apply(db, service, migrations).await;
    }
    // Held by a transaction of its own until the end: released at its commit, or by the
    // server when this process dies.
    let turn = db.begin().await?;
    turn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await?;
    apply(db, service, migrations).await?;
    turn.commit().await?;
    Ok(())
}

async fn apply(
    db: &DatabaseConnection,
    service: &str,
    migrations: &[Migration],
) -> Result<(), Error> {
    let backend = db.get_database_backend();
    let table = format!("{service}_schema_migrations");
    db.execute_unprepared(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    ))
    .await?;
    let applied: Vec<i64> = db
        .query_all(Statement::from_string(
            backend,
            format!("SELECT version FROM {table}"),
        ))
        .await?
        .iter()
        .map(|row| row.try_get::<i64>("", "version"))
        .collect::<Result<_, _>>()?;

    let mut sorted = migrations.to_vec();
    sorted.sort_by_key(|m| m.version);
    for migration in sorted {
        if applied.contains(&migration.version) {
            continue;
        }
        let wrap = |source: DbErr| Error::Migration {
            service: service.to_owned(),
            version: migration.version,
            name: migration.name,
            source,
        };
        let txn = db.begin().await.map_err(wrap)?;
        for statement in render_sql(migration.sql, backend)
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            txn.execute_unprepared(statement).await.map_err(wrap)?;
        }
        let now = kiln_core::time::now_micros();
        txn.execute(statement(
            backend,
            &format!("INSERT INTO {table} (version, name, applied_at) VALUES (?, ?, ?)"),
            [migration.version.into(), migration.name.into(), now.into()],
        ))
        .await
        .map_err(wrap)?;
        txn.commit().await.map_err(wrap)?;
        tracing::info!(
            service,
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
    }
    Ok(())
}

/// A statement for `backend` from `sql` written with `?` bind placeholders (numbered `$n`
/// for PostgreSQL); `sql` holds no other `?`.
pub fn statement(
    backend: DatabaseBackend,
    sql: &str,
    values: impl IntoIterator<Item = sea_orm::Value>,
) -> Statement {
    let sql = match backend {
        DatabaseBackend::Postgres => {
            let mut numbered = String::with_capacity(sql.len() + 16);
            for (n, part) in sql.split('?').enumerate() {
                if n > 0 {
                    numbered.push_str(&format!("${n}"));
                }
                numbered.push_str(part);
            }
            numbered
        }
        _ => sql.to_owned(),
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// `rows` tuples of `columns` placeholders, for a multi-row `VALUES` or an `IN` list:
/// `(?, ?), (?, ?)`.
pub fn value_rows(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// Runs `sql` (with `?` placeholders, as [`statement`]); returns the rows it changed.
pub async fn execute<C: ConnectionTrait>(
    conn: &C,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    Ok(conn
        .execute(statement(backend, sql, values))
        .await?
        .rows_affected())
}

/// Runs the query `sql` (with `?` placeholders, as [`statement`]).
pub async fn query<C: ConnectionTrait>(
    conn: &C,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<Vec<sea_orm::QueryResult>, DbErr> {
    let backend = conn.get_database_backend();
    conn.query_all(statement(backend, sql, values)).await
}

/// Inserts a row: ALREADY_EXISTS naming `name` when its key (or another unique column) is
/// taken.
pub async fn insert<A, C>(
    db: &C,
    row: A,
    name: &(dyn std::fmt::Display + Sync),
) -> Result<(), kiln_core::Error>
where
    A: sea_orm::ActiveModelTrait + Send,
    <A::Entity as sea_orm::EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
    C: ConnectionTrait,
{
    match <A::Entity as sea_orm::EntityTrait>::insert(row)
        .exec_without_returning(db)
        .await
    {
        Ok(_) => Ok(()),
        Err(err) if is_unique_violation(&err) => Err(kiln_core::Error::already_exists(name)),
        Err(err) => Err(err.into()),
    }
}

/// Inserts a new row (as [`insert`]) or overwrites every column of an existing one.
pub async fn save<A, C>(
    db: &C,
    row: A,
    new: bool,
    name: &(dyn std::fmt::Display + Sync),
) -> Result<(), kiln_core::Error>
where
    A: sea_orm::ActiveModelTrait + sea_orm::ActiveModelBehavior + Send,
    <A::Entity as sea_orm::EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
    C: ConnectionTrait,
{
    if new {
        insert(db, row, name).await
    } else {
        row.reset_all().update(db).await?;
        Ok(())
    }
}

/// Whether a database error is a unique-constraint violation (a duplicate key).
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(
        err.sql_err(),
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[Migration] = &[
        Migration {
            version: 1,
            name: "things",
            sql: "CREATE TABLE things (id {serial}, body {blob} NOT NULL)",
        },
        Migration {
            version: 2,
            name: "things_name",
            sql: "ALTER TABLE things ADD COLUMN name TEXT; CREATE INDEX things_name_idx ON things (name)",
        },
    ];

    #[tokio::test]
    async fn migrations_apply_once_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = connect(&url).await.unwrap();
        migrate(&db, "test", &MIGRATIONS[..1]).await.unwrap();
        // A later start with more migrations applies only the new one; a third is a no-op.
        migrate(&db, "test", MIGRATIONS).await.unwrap();
        migrate(&db, "test", MIGRATIONS).await.unwrap();
        db.execute_unprepared("INSERT INTO things (body, name) VALUES (x'00', 'a')")
            .await
            .unwrap();
        let rows = db
            .query_all(Statement::from_string(
                DatabaseBackend::Sqlite,
                "SELECT version FROM test_schema_migrations".to_owned(),
            ))
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
    }

    #[tokio::test]
    async fn a_failing_migration_names_itself_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = connect(&url).await.unwrap();
        let bad = [Migration {
            version: 1,
            name: "broken",
            sql: "CREATE TABLE a (id INTEGER); CREATE TABLE a (id INTEGER)",
        }];
        let err = migrate(&db, "svc", &bad).await.unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
        // The transaction rolled back: table `a` does not exist, so the fixed one applies.
        let good = [Migration {
            version: 1,
            name: "fixed",
            sql: "CREATE TABLE a (id INTEGER)",
        }];
        migrate(&db, "svc", &good).await.unwrap();
    }

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let sql = format!(
            "INSERT INTO t (a, b) VALUES {} WHERE c = ?",
            value_rows(2, 2)
        );
        assert_eq!(
            statement(DatabaseBackend::Postgres, &sql, []).sql,
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) WHERE c = $5"
        );
        assert_eq!(statement(DatabaseBackend::Sqlite, &sql, []).sql, sql);
    }
}
