//! Authenticated `GetAccount` throughput over loopback, against a bare tonic unary echo in the
//! same run. `cargo bench -p kiln-tests --bench auth_throughput [-- SECONDS CONCURRENCY]`.
//!
//! Both servers run in this process on 127.0.0.1; both clients send the same bearer header
//! through the same interceptor, so the difference is Kiln's server side: the trace and auth
//! layers (a cached key lookup) and the handler (a cached account read). A health check
//! through Kiln's server shows the cost of the layers alone.

use kiln_tests::bench::{Args, block_on, cores, measure};
use kiln_tests::echo::echo_client::EchoClient;
use kiln_tests::echo::echo_server::{Echo, EchoServer};
use kiln_tests::echo::{EchoReply, EchoRequest};
use kiln_tests::{TestMesh, channel_to, get_account};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> tonic::Result<tonic::Response<EchoReply>> {
        let name = request.into_inner().name;
        Ok(tonic::Response::new(EchoReply { name }))
    }
}

fn main() {
    let args = Args::from_env();
    let (seconds, concurrency): (u64, usize) = (args.get(0, 5), args.get(1, 32));
    block_on(None, async move {
        let mesh = TestMesh::start().await;
        let (key, authed) = mesh.tenant("bench").await;

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

        let get_channel = authed.clone();
        let get = move || {
            let ch = get_channel.clone();
            async move {
                let account = get_account(&ch, "accounts/bench")
                    .await
                    .expect("GetAccount");
                assert_eq!(account.name, "accounts/bench");
            }
        };
        let echo_client = EchoClient::new(echo_channel);
        let echo = move || {
            let mut client = echo_client.clone();
            async move {
                let name = "accounts/bench".into();
                client.echo(EchoRequest { name }).await.expect("echo");
            }
        };

        let health_client = tonic_health::pb::health_client::HealthClient::new(authed);
        let health = move || {
            let mut client = health_client.clone();
            async move {
                let service = String::new();
                let request = tonic_health::pb::HealthCheckRequest { service };
                client.check(request).await.expect("health");
            }
        };

        println!(
            "loopback, {concurrency} concurrent callers, {seconds}s per measurement, {} cores",
            cores()
        );
        let echo_rate = measure(seconds, concurrency, echo).await;
        println!("bare tonic unary echo:        {echo_rate:>10.0} req/s");
        let health_rate = measure(seconds, concurrency, health).await;
        println!(
            "health check via Kiln layers: {health_rate:>10.0} req/s  (trace layer, no auth, no database)"
        );
        let auth_rate = measure(seconds, concurrency, get).await;
        println!("authenticated GetAccount:     {auth_rate:>10.0} req/s");
        println!(
            "ratio (authenticated / echo): {:>10.2}",
            auth_rate / echo_rate
        );
        mesh.shutdown().await;
    });
}
