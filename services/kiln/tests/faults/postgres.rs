//! PostgreSQL restarted under traffic: a PostgreSQL of the scenario's own (initdb, run as the
//! postgres user) that every service uses, stopped and started while clients call. Calls in
//! the outage end as UNAVAILABLE (retry), never as an internal error; afterwards the services
//! reconnect by themselves and the ledger holds exactly what the clients were told.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_tests::{free_port, wait_for_listener};
use tonic::Code;

use crate::cluster::{Cluster, Shape};
use crate::traffic::Traffic;

/// A PostgreSQL server in a temp dir, on a free port; stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(args: &[&str]) {
    crate::run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args),
    );
}

impl Postgres {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a data dir");
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        assert!(chown.expect("chown runs").success());
        let data = dir.path().join("data");
        let data = data.to_str().unwrap();
        as_postgres(&[
            "initdb",
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let pg = Self {
            port: free_port(),
            dir,
        };
        pg.resume().await;
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn resume(&self) {
        let socket = self.dir.path().display().to_string();
        let options = format!(
            "-p {} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        let log = Path::new(&socket).join("log").display().to_string();
        as_postgres(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &options,
            "-l",
            &log,
            "-w",
            "start",
        ]);
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for_listener(&addr, Duration::from_secs(30), "PostgreSQL").await;
    }

    /// A fast stop: sessions are cut, as a restart or a failover cuts them.
    fn stop(&self) {
        as_postgres(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "pg_ctl",
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

#[tokio::test]
async fn postgres_restarted_under_traffic_answers_unavailable_meanwhile_and_books_exactly() {
    let pg = Postgres::start().await;
    let shape = Shape {
        database_url: Some(pg.url()),
        ..Shape::nodes(1)
    };
    let (cluster, key, model, _) = Cluster::serving_minilm(shape).await;
    let inference = cluster.channel("inference-1", Some(&key)).await;
    let traffic = Traffic::embeddings(&inference, &model, 4, &[Code::Unavailable]);
    traffic.answers(20).await;
    pg.stop();
    let during = traffic.calls(8).await;
    pg.resume().await;
    // The services reconnect by themselves: answers again, then more.
    traffic.answers(20).await;
    let tally = traffic.stop().await;
    assert!(
        during.refused.contains_key("Unavailable") || during.answered > 20,
        "{during:?}"
    );
    crate::usage::booked_exactly(&cluster, "accounts/acme", &tally).await;
}
