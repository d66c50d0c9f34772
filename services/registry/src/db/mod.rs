//! The registry's tables. A model or dataset row keeps the resource itself (encoded protobuf)
//! plus the columns that listing filters and orders on; files are rows of their own, so an
//! upload's progress is one small update.

pub mod dataset;
pub mod model;
pub mod model_file;

use kiln_store::Migration;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "models, model files, datasets",
        sql: "CREATE TABLE models (
                account_id TEXT NOT NULL,
                model_id TEXT NOT NULL,
                kind INTEGER NOT NULL,
                state INTEGER NOT NULL,
                public BOOLEAN NOT NULL,
                display_name TEXT NOT NULL,
                base_model TEXT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                resource {blob} NOT NULL,
                PRIMARY KEY (account_id, model_id)
            );
            CREATE INDEX models_public ON models (public, account_id);
            CREATE TABLE model_files (
                account_id TEXT NOT NULL,
                model_id TEXT NOT NULL,
                bundle TEXT NOT NULL,
                path TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                sha256 TEXT NOT NULL,
                uploaded_bytes BIGINT NOT NULL,
                complete BOOLEAN NOT NULL,
                PRIMARY KEY (account_id, model_id, bundle, path)
            );
            CREATE TABLE datasets (
                account_id TEXT NOT NULL,
                dataset_id TEXT NOT NULL,
                state INTEGER NOT NULL,
                format INTEGER NOT NULL,
                display_name TEXT NOT NULL,
                example_count BIGINT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                resource {blob} NOT NULL,
                PRIMARY KEY (account_id, dataset_id)
            )",
    },
    kiln_events::outbox::MIGRATION,
];
