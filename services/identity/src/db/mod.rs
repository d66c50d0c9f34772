//! Identity's tables: accounts, users, API keys (only a hash of each secret).

pub mod account;
pub mod api_key;
pub mod user;

use kiln_store::Migration;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts, users, api keys",
        sql: "CREATE TABLE accounts (
                id TEXT PRIMARY KEY,
                display_name TEXT NOT NULL,
                account_type INTEGER NOT NULL,
                email TEXT NOT NULL,
                state INTEGER NOT NULL,
                status_code INTEGER NOT NULL,
                status_message TEXT NOT NULL,
                suspend_state INTEGER NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL
            );
            CREATE TABLE users (
                account_id TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL,
                email TEXT NOT NULL,
                display_name TEXT NOT NULL,
                role TEXT NOT NULL,
                service_account BOOLEAN NOT NULL,
                state INTEGER NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                PRIMARY KEY (account_id, user_id)
            );
            CREATE UNIQUE INDEX users_account_email ON users (account_id, email);
            CREATE TABLE api_keys (
                account_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                key_id TEXT NOT NULL,
                display_name TEXT NOT NULL,
                prefix TEXT NOT NULL,
                secret_sha256 TEXT NOT NULL,
                create_time BIGINT NOT NULL,
                expire_time BIGINT,
                PRIMARY KEY (account_id, user_id, key_id),
                FOREIGN KEY (account_id, user_id) REFERENCES users (account_id, user_id) ON DELETE CASCADE
            );
            CREATE UNIQUE INDEX api_keys_secret ON api_keys (secret_sha256)",
    },
    kiln_events::outbox::MIGRATION,
];
