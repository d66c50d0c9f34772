//! No API key secret is stored or logged: the database (every row, and the SQLite files) and
//! the server's log output never contain one.

use std::path::Path;

use kiln_tests::TestMesh;
use kiln_tests::{tenant, user_with_key};
use sea_orm::{ConnectionTrait, Statement};

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hits.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[tokio::test]
async fn no_secret_is_stored_in_the_database() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let owner_key = tenant(&admin, "acme").await;
    let alice_key = user_with_key(&admin, "acme", "alice", "user").await.key;
    let secrets = [mesh.admin_key.clone(), owner_key, alice_key];

    // Every text and blob of every identity table, on whichever backend this runs.
    let db = mesh.identity_db().await;
    let mut dump = String::new();
    for (table, columns) in [
        ("accounts", "id, display_name, email, status_message"),
        ("users", "account_id, user_id, email, display_name, role"),
        (
            "api_keys",
            "account_id, user_id, key_id, display_name, prefix, secret_sha256",
        ),
    ] {
        for row in db
            .query_all(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT {columns} FROM {table}"),
            ))
            .await
            .unwrap()
        {
            for column in columns.split(", ") {
                dump.push_str(&row.try_get::<String>("", column).unwrap());
                dump.push('\n');
            }
        }
    }
    // Events in flight carry no secret either.
    for row in db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT payload FROM kiln_outbox".to_owned(),
        ))
        .await
        .unwrap()
    {
        dump.push_str(&String::from_utf8_lossy(
            &row.try_get::<Vec<u8>>("", "payload").unwrap(),
        ));
    }
    assert!(
        dump.contains("kiln_"),
        "the dump holds the visible key prefixes, so it is real"
    );
    for secret in &secrets {
        assert!(
            !dump.contains(secret.as_str()),
            "a secret is stored in the database"
        );
    }
    if mesh.config.server.database_url.is_none() {
        // SQLite: the raw files (database, WAL) too.
        for secret in &secrets {
            let hits = files_containing(mesh.data_dir.path(), secret.as_bytes());
            assert!(hits.is_empty(), "secret found in {hits:?}");
        }
    }
    mesh.shutdown().await;
}
