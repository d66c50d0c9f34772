//! Authenticated `GetAccount` throughput over loopback, against a bare tonic unary echo in the
//! same run. `cargo bench -p kiln-tests --bench auth_throughput [-- SECONDS CONCURRENCY]`.
//!
//! Both servers run in this process on 127.0.0.1; both clients send the same bearer header
//! through the same interceptor, so the difference is Kiln's server side: the trace and auth
//! layers (a cached key lookup) and the handler (a cached account read). A health check
//! through Kiln's server shows the cost of the layers alone.

use kiln_proto::identity::v1 as idv1;
use kiln_tests::bench::measure;
use kiln_tests::echo::echo_client::EchoClient;
use kiln_tests::echo::echo_server::{Echo, EchoServer};
use kiln_tests::echo::{EchoReply, EchoRequest};
use kiln_tests::{AuthedChannel, TestMesh, channel_to};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            name: request.into_inner().name,
        }))
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let concurrency: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mesh = TestMesh::start().await;
        let admin = mesh.admin().await;
        let key = kiln_tests::tenant(&admin, "bench").await;
        let authed: AuthedChannel = mesh.channel(Some(&key)).await;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService))
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
        );
        let echo_channel = channel_to(&format!("http://{echo_addr}"), Some(&key)).await;

        let client = kiln_tests::accounts(&authed);
        let get = move || {
            let mut client = client.clone();
            async move {
                let account = client
                    .get_account(idv1::GetAccountRequest {
                        name: "accounts/bench".into(),
                    })
                    .await
                    .expect("GetAccount");
                assert_eq!(account.get_ref().name, "accounts/bench");
            }
        };
        let echo_client = EchoClient::new(echo_channel);
        let echo = move || {
            let mut client = echo_client.clone();
            async move {
                client
                    .echo(EchoRequest {
                        name: "accounts/bench".into(),
                    })
                    .await
                    .expect("echo");
            }
        };

        let health_client = tonic_health::pb::health_client::HealthClient::new(authed.clone());
        let health = move || {
            let mut client = health_client.clone();
            async move {
                client
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .expect("health");
            }
        };

        println!(
            "loopback, {concurrency} concurrent callers, {seconds}s per measurement, {} cores",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        let echo_rate = measure(seconds, concurrency, echo).await;
        println!("bare tonic unary echo:        {echo_rate:>10.0} req/s");
        let health_rate = measure(seconds, concurrency, health).await;
        println!("health check via Kiln layers: {health_rate:>10.0} req/s  (trace layer, no auth, no database)");
        let auth_rate = measure(seconds, concurrency, get).await;
        println!("authenticated GetAccount:     {auth_rate:>10.0} req/s");
        println!(
            "ratio (authenticated / echo): {:>10.2}",
            auth_rate / echo_rate
        );
        mesh.shutdown().await;
    });
}
