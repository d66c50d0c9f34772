//! End-to-end suites: the mesh in-process on the environment's backends (SQLite and the
//! in-process bus by default; PostgreSQL and NATS with KILN_TEST_DATABASE_URL and
//! KILN_TEST_NATS_URL).

mod authn;
mod bad_input;
mod billing;
mod discovery;
mod errors;
mod events;
mod fine_tuning;
mod hf_onnx;
mod http_edge;
mod identity_api;
mod inference;
mod llm;
mod lora;
mod metrics;
mod quotas;
mod registry;
mod scheduler;
mod secrets;
mod tenancy;
mod training;
