//! Health checks and server reflection (v1 and v1alpha), without a key, as grpcurl uses them.

use futures::StreamExt;
use kiln_tests::TestMesh;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const IDENTITY_SERVICES: [&str; 4] = [
    "kiln.identity.v1.AccountService",
    "kiln.identity.v1.UserService",
    "kiln.identity.v1.ApiKeyService",
    "kiln.identity.v1.AuthService",
];

#[tokio::test]
async fn health_reports_every_service_serving() {
    let mesh = TestMesh::start().await;
    let mut health = HealthClient::new(mesh.channel(None).await);
    for service in IDENTITY_SERVICES.iter().copied().chain([""]) {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    mesh.shutdown().await;
}

#[tokio::test]
async fn reflection_lists_services_and_describes_them_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let mesh = TestMesh::start().await;
    let channel = mesh.channel(None).await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = futures::stream::iter([
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "kiln.identity.v1.AccountService".into(),
                ),
            ),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = responses.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        panic!("expected a service list, got {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in IDENTITY_SERVICES {
        assert!(
            names.contains(&service.to_owned()),
            "{service} in {names:?}"
        );
    }
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()));
    let file = responses.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(fd)) =
        file.message_response
    else {
        panic!("expected a file descriptor");
    };
    assert!(!fd.file_descriptor_proto.is_empty());

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = futures::stream::iter([v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let listed = alpha
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        panic!("expected a service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "kiln.identity.v1.UserService")
    );
    // The whole contract is discoverable, not only what this process serves.
    mesh.shutdown().await;
}
