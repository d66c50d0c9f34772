//! What a caller sees of a failure that is not its own: INTERNAL with an error id, never the
//! database's text (which names tables, columns and queries).

use kiln_proto::registry::v1 as regv1;
use kiln_tests::TestMesh;
use kiln_tests::registry::datasets;
use sea_orm::ConnectionTrait;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failure_reaches_the_caller_as_internal_with_an_id_only() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = kiln_tests::tenant(&admin, "acme").await;
    let acme = mesh.channel(Some(&key)).await;
    let list = || async {
        datasets(&acme)
            .list_datasets(regv1::ListDatasetsRequest {
                parent: "accounts/acme".into(),
                ..Default::default()
            })
            .await
    };
    list().await.expect("the table is there");

    // The registry's table goes away behind its back.
    let db = kiln_store::connect(&mesh.config.server.database_url_for("registry"))
        .await
        .unwrap();
    db.execute_unprepared("DROP TABLE datasets").await.unwrap();

    let status = list().await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let message = status.message();
    assert!(
        message.contains("(id "),
        "an id to quote to the operator: {message}"
    );
    for leak in ["datasets", "table", "relation", "SELECT", "database"] {
        assert!(!message.contains(leak), "{leak:?} leaked: {message}");
    }
    mesh.shutdown().await;
}
