//! Billing's tables, and the small SQL helpers its handlers share. Everything is plain SQL:
//! the ledger is written in multi-row statements and read in aggregates.

use kiln_store::Migration;
use std::collections::HashSet;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DatabaseTransaction, QueryResult,
    TransactionTrait, Value,
};

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger, monthly spend, open replicas, models, deployments, quotas, suspensions",
        sql: "CREATE TABLE billing_ledger (
                id TEXT PRIMARY KEY,
                account TEXT NOT NULL,
                kind TEXT NOT NULL,
                time_micros BIGINT NOT NULL,
                day TEXT NOT NULL,
                model TEXT NOT NULL,
                deployment TEXT NOT NULL,
                deployed_model TEXT NOT NULL,
                accelerator_type INTEGER NOT NULL,
                deployment_type INTEGER NOT NULL,
                request_count BIGINT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                cached_prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                embedding_tokens BIGINT NOT NULL,
                accelerator_micros BIGINT NOT NULL,
                training_tokens BIGINT NOT NULL,
                cost_nanos BIGINT NOT NULL
            );
            CREATE INDEX billing_ledger_account_time ON billing_ledger (account, time_micros);
            CREATE TABLE billing_monthly_spend (
                account TEXT NOT NULL,
                month TEXT NOT NULL,
                cost_nanos BIGINT NOT NULL,
                PRIMARY KEY (account, month)
            );
            CREATE TABLE billing_replicas (
                replica TEXT PRIMARY KEY,
                account TEXT NOT NULL,
                deployment TEXT NOT NULL,
                model TEXT NOT NULL,
                accelerator_type INTEGER NOT NULL,
                accelerator_count BIGINT NOT NULL,
                start_micros BIGINT NOT NULL,
                billed_until BIGINT NOT NULL
            );
            CREATE TABLE billing_models (
                name TEXT PRIMARY KEY,
                parameter_count BIGINT NOT NULL,
                base_model TEXT NOT NULL
            );
            CREATE TABLE billing_deployments (
                name TEXT PRIMARY KEY,
                account TEXT NOT NULL,
                deployment_type INTEGER NOT NULL,
                accelerator_type INTEGER NOT NULL,
                accelerator_count BIGINT NOT NULL,
                max_replica_count BIGINT NOT NULL,
                active BOOLEAN NOT NULL
            );
            CREATE TABLE billing_quotas (
                account TEXT NOT NULL,
                quota TEXT NOT NULL,
                value BIGINT NOT NULL,
                max_value BIGINT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                PRIMARY KEY (account, quota)
            );
            CREATE TABLE billing_suspensions (
                account TEXT PRIMARY KEY,
                suspend_state INTEGER NOT NULL,
                month TEXT NOT NULL,
                reason TEXT NOT NULL,
                since_micros BIGINT NOT NULL
            )",
    },
    kiln_events::outbox::MIGRATION,
];

/// Begins a transaction that will write. On SQLite it takes the write lock at once (a write
/// that changes nothing), so a transaction that reads first never has to upgrade a stale
/// snapshot: SQLite refuses that at once ("database is locked") instead of waiting.
pub(crate) async fn begin_write(
    db: &DatabaseConnection,
) -> Result<DatabaseTransaction, sea_orm::DbErr> {
    let txn = db.begin().await?;
    if txn.get_database_backend() == DatabaseBackend::Sqlite {
        txn.execute_unprepared("UPDATE billing_quotas SET value = value WHERE 0 = 1")
            .await?;
    }
    Ok(txn)
}

/// Inserts `rows`, `per_statement` at a time (so that a statement stays under the backends'
/// bind-variable limits), with `insert`: an `INSERT ... VALUES {rows} ... RETURNING` statement
/// whose `{rows}` stands for the rows' placeholders, `values` giving a row's values. Returns
/// the `returned` column of the rows the statements returned.
pub(crate) async fn insert_returning<T, const COLUMNS: usize>(
    txn: &DatabaseTransaction,
    insert: &str,
    rows: &[T],
    per_statement: usize,
    values: impl Fn(&T) -> [Value; COLUMNS],
    returned: &str,
) -> Result<HashSet<String>, sea_orm::DbErr> {
    let mut inserted = HashSet::with_capacity(rows.len());
    for chunk in rows.chunks(per_statement) {
        let sql = insert.replace("{rows}", &kiln_store::value_rows(chunk.len(), COLUMNS));
        let values = chunk.iter().flat_map(&values).collect();
        for row in kiln_store::query(txn, &sql, values).await? {
            inserted.insert(row.try_get::<String>("", returned)?);
        }
    }
    Ok(inserted)
}

/// One i64 column of a row (SUM over no rows reads as 0).
pub(crate) fn int(row: &QueryResult, column: &str) -> Result<i64, sea_orm::DbErr> {
    Ok(row.try_get::<Option<i64>>("", column)?.unwrap_or(0))
}

/// One i64 column of the first row; 0 when there is none.
pub(crate) fn first_int(rows: &[QueryResult], column: &str) -> Result<i64, sea_orm::DbErr> {
    Ok(rows
        .first()
        .map(|r| int(r, column))
        .transpose()?
        .unwrap_or(0))
}
