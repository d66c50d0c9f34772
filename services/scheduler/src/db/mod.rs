//! The scheduler's tables. Deployments, deployed models and fine-tuning jobs keep the resource itself (encoded
//! protobuf) plus the columns listing filters and orders on. Nodes and replicas are not
//! stored: nodes tell them again when they (re)connect, and the scheduler adopts what they
//! hold.

pub mod deployed_model;
pub mod deployment;
pub mod fine_tuning_job;

use kiln_store::Migration;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "deployments, deployed models",
        sql: "CREATE TABLE deployments (
                account_id TEXT NOT NULL,
                deployment_id TEXT NOT NULL,
                state INTEGER NOT NULL,
                base_model TEXT NOT NULL,
                accelerator_type INTEGER NOT NULL,
                deployment_type INTEGER NOT NULL,
                display_name TEXT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                model_bytes BIGINT NOT NULL,
                resource {blob} NOT NULL,
                PRIMARY KEY (account_id, deployment_id)
            );
            CREATE TABLE deployed_models (
                account_id TEXT NOT NULL,
                deployed_model_id TEXT NOT NULL,
                state INTEGER NOT NULL,
                model TEXT NOT NULL,
                deployment TEXT NOT NULL,
                is_default BOOLEAN NOT NULL,
                serverless BOOLEAN NOT NULL,
                public BOOLEAN NOT NULL,
                display_name TEXT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                resource {blob} NOT NULL,
                PRIMARY KEY (account_id, deployed_model_id)
            );
            CREATE INDEX deployed_models_deployment ON deployed_models (deployment)",
    },
    Migration {
        version: 2,
        name: "supervised fine-tuning jobs",
        sql: "CREATE TABLE fine_tuning_jobs (
                account_id TEXT NOT NULL,
                job_id TEXT NOT NULL,
                state INTEGER NOT NULL,
                dataset TEXT NOT NULL,
                base_model TEXT NOT NULL,
                output_model TEXT NOT NULL,
                create_time BIGINT NOT NULL,
                update_time BIGINT NOT NULL,
                resource {blob} NOT NULL,
                PRIMARY KEY (account_id, job_id)
            )",
    },
    kiln_events::outbox::MIGRATION,
];
