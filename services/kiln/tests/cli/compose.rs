//! `deploy/docker-compose.yml` and `deploy/Dockerfile` held against the code (Docker does not
//! run here): every Kiln service's command is a real one, its `KILN_*` variables pass the very
//! validation `kiln serve` runs at start (`kiln serve <services> --check`, with the image's
//! and the service's environment), the URLs name services on the ports they listen on,
//! published ports match, state lives in declared volumes, what others wait on has a health
//! check, PostgreSQL creates the database every service uses, and Prometheus scrapes every
//! Kiln service where its metrics listen. A broken copy fails.

use std::collections::{BTreeMap, BTreeSet};

use kiln_server::Role;
use serde_yaml::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

/// Where the image keeps state (its `KILN_DATA_DIR`).
const DATA_DIR: &str = "/var/lib/kiln";

/// Ports the infrastructure images listen on.
const INFRASTRUCTURE_PORTS: [(&str, u16); 3] =
    [("postgres", 5432), ("nats", 4222), ("minio", 9000)];

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DEPLOY}/{name}")).unwrap()
}

/// The compose file with its anchors and merge keys (`<<`, at any depth) resolved.
fn parse(text: &str) -> Value {
    let mut compose: Value = serde_yaml::from_str(text).expect("docker-compose.yml parses");
    merge_keys(&mut compose);
    compose
}

/// Resolves `<<` merge keys: the merged mapping's entries where the mapping has none.
fn merge_keys(value: &mut Value) {
    match value {
        Value::Mapping(mapping) => {
            if let Some(merged) = mapping.remove("<<") {
                let mut merged = merged;
                merge_keys(&mut merged);
                let Value::Mapping(entries) = merged else {
                    panic!("<< merges a mapping")
                };
                for (key, entry) in entries {
                    if !mapping.contains_key(&key) {
                        mapping.insert(key, entry);
                    }
                }
            }
            for (_, entry) in mapping.iter_mut() {
                merge_keys(entry);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(merge_keys),
        _ => {}
    }
}

/// `${VAR:-default}` as compose resolves it where VAR is unset.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closed ${…}") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out + rest
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => interpolate(s),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_sequence)
        .map(|items| items.iter().map(text).collect())
        .unwrap_or_default()
}

/// The image's `ENV` (what every Kiln container starts with).
fn image_env(dockerfile: &str) -> BTreeMap<String, String> {
    let joined = dockerfile.replace("\\\n", " ");
    let mut env = BTreeMap::new();
    for line in joined.lines().filter(|l| l.starts_with("ENV ")) {
        for pair in line["ENV ".len()..].split_whitespace() {
            let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
            env.insert(key.to_owned(), value.to_owned());
        }
    }
    env
}

/// A Kiln service of the compose file.
struct KilnService {
    name: String,
    roles: Vec<String>,
    env: BTreeMap<String, String>,
}

/// `host` and `port` of a URL like `scheme://[user@]host:port[/…]`.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = authority.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

/// What is wrong with the compose file, short of what `kiln serve --check` decides; also the
/// Kiln services, for that check.
fn problems(compose: &Value, dockerfile: &str, otel: &str) -> (Vec<String>, Vec<KilnService>) {
    let mut problems = Vec::new();
    let services = compose["services"].as_mapping().expect("services");
    let declared_volumes: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(text).collect())
        .unwrap_or_default();
    let image = image_env(dockerfile);
    // Who listens where: infrastructure by image, the collector by its config, Kiln by
    // KILN_LISTEN.
    let mut listens: BTreeMap<String, u16> = INFRASTRUCTURE_PORTS
        .iter()
        .map(|(s, p)| ((*s).to_owned(), *p))
        .collect();
    let otel: Value = serde_yaml::from_str(otel).unwrap();
    let otlp = text(&otel["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]);
    listens.insert(
        "otel-collector".into(),
        otlp.rsplit_once(':').unwrap().1.parse().unwrap(),
    );
    let mut kiln = Vec::new();
    let mut http_listens: BTreeMap<String, u16> = BTreeMap::new();
    for (name, service) in services {
        let name = text(name);
        if service.get("build").is_none() {
            continue;
        }
        let command = strings(service.get("command"));
        let roles = match command.split_first() {
            Some((serve, roles)) if serve == "serve" && !roles.is_empty() => roles.to_vec(),
            _ => {
                problems.push(format!(
                    "{name}: command {command:?} is not `serve <services>`"
                ));
                continue;
            }
        };
        for role in &roles {
            if role.parse::<Role>().is_err() {
                problems.push(format!("{name}: {role:?} is not a Kiln service"));
            }
        }
        let mut env = image.clone();
        if let Some(vars) = service.get("environment").and_then(Value::as_mapping) {
            for (key, value) in vars {
                env.insert(text(key), text(value));
            }
        }
        // The HTTP edge listens on a port of its own beside the gRPC one.
        if let Some(port) = env
            .get("KILN_GATEWAY__LISTEN")
            .and_then(|l| l.rsplit_once(':')?.1.parse().ok())
        {
            http_listens.insert(name.clone(), port);
        }
        let listen = env
            .get("KILN_LISTEN")
            .and_then(|l| l.rsplit_once(':')?.1.parse().ok());
        match listen {
            Some(port) => {
                listens.insert(name.clone(), port);
            }
            None => problems.push(format!("{name}: KILN_LISTEN names no port")),
        }
        kiln.push(KilnService { name, roles, env });
    }
    let mut published = BTreeMap::new();
    for (name, service) in services {
        let name = text(name);
        for port in strings(service.get("ports")) {
            let (host, container) = port.split_once(':').expect("ports as HOST:CONTAINER");
            if let Some(other) = published.insert(host.to_owned(), name.clone()) {
                problems.push(format!("{name} and {other} both publish port {host}"));
            }
            let container: u16 = container.parse().expect("a container port");
            let grpc = listens.get(&name).copied();
            let http = http_listens.get(&name).copied();
            if grpc.is_some() && grpc != Some(container) && http != Some(container) {
                problems.push(format!(
                    "{name} publishes container port {container} but listens on {}",
                    listens[&name]
                ));
            }
        }
        for volume in strings(service.get("volumes")) {
            let source = volume.split(':').next().unwrap_or_default();
            if !source.starts_with('.') && !declared_volumes.contains(source) {
                problems.push(format!(
                    "{name} mounts volume {source:?}, which is not declared"
                ));
            }
        }
        if let Some(depends) = service.get("depends_on").and_then(Value::as_mapping) {
            for (target, how) in depends {
                let target = text(target);
                let healthy = how.get("condition").map(text).as_deref() == Some("service_healthy");
                let checked = services
                    .get(target.as_str())
                    .is_some_and(|t| t.get("healthcheck").is_some());
                if healthy && !checked {
                    problems.push(format!(
                        "{name} waits for {target} healthy, which has no health check"
                    ));
                }
                if !services.contains_key(target.as_str()) {
                    problems.push(format!("{name} depends on {target}, which is no service"));
                }
            }
        }
    }
    let database = services
        .get("postgres")
        .and_then(|p| p["environment"].get("POSTGRES_DB"))
        .map(text);
    for service in &kiln {
        let name = &service.name;
        for (key, value) in &service.env {
            // The public URL is where clients outside reach the edge, not a service.
            if !key.starts_with("KILN_") || key == "KILN_GATEWAY__PUBLIC_URL" {
                continue;
            }
            let Some((host, port)) = host_port(value) else {
                continue;
            };
            match listens.get(&host) {
                None => problems.push(format!("{name}: {key} names {host}, which is no service")),
                Some(&listens) if listens != port => problems.push(format!(
                    "{name}: {key} reaches {host} on port {port}, but it listens on {listens}"
                )),
                Some(_) => {}
            }
            if key == "KILN_DATABASE_URL" {
                let db = value.rsplit('/').next().unwrap_or_default();
                if database.as_deref() != Some(db) {
                    problems.push(format!(
                        "{name}: database {db:?} is not the one PostgreSQL creates ({database:?})"
                    ));
                }
            }
        }
        let spec = &services[name.as_str()];
        // Keys and the bootstrap admin key (identity), artifacts' staging (registry), the
        // model cache (inference) live in the data dir: it must outlive the container.
        let stateful = service
            .roles
            .iter()
            .any(|r| matches!(r.as_str(), "identity" | "registry" | "inference"));
        let mounted = strings(spec.get("volumes"))
            .iter()
            .any(|v| v.split(':').nth(1) == Some(DATA_DIR));
        if stateful && !mounted {
            problems.push(format!(
                "{name} keeps state in {DATA_DIR} but mounts no volume there"
            ));
        }
        let health = strings(spec.get("healthcheck").and_then(|h| h.get("test")));
        let port = listens.get(name.as_str()).copied().unwrap_or_default();
        let probe = ["CMD", "kiln", "health", "--server"];
        let probes_itself = health.len() == 5
            && health[..4] == probe
            && host_port(&health[4]).is_some_and(|(_, p)| p == port);
        if !probes_itself {
            problems.push(format!(
                "{name}: no health check `kiln health --server http://127.0.0.1:{port}` ({health:?})"
            ));
        }
    }
    if dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count()
        < 2
    {
        problems.push("the Dockerfile is not multi-stage".into());
    }
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "));
    if user.is_none_or(|u| u.trim() == "root" || u.trim() == "0") {
        problems.push("the image runs as root".into());
    }
    (problems, kiln)
}

/// Runs `kiln serve <roles> --check` in each Kiln service's environment; the failures.
fn config_failures(services: &[KilnService]) -> Vec<String> {
    services
        .iter()
        .filter_map(|service| {
            let out = std::process::Command::new(super::kiln_binary())
                .arg("serve")
                .args(&service.roles)
                .arg("--check")
                .env_clear()
                .envs(&service.env)
                .output()
                .unwrap();
            (!out.status.success()).then(|| {
                format!(
                    "{}: {}",
                    service.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
        })
        .collect()
}

/// Prometheus scrapes every Kiln service where its metrics listen, and nothing that is not.
fn scrape_problems(prometheus: &str, services: &[KilnService]) -> Vec<String> {
    let config: Value = serde_yaml::from_str(prometheus).expect("prometheus.yml parses");
    let targets: BTreeSet<String> = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|c| strings(c.get("targets")))
        .collect();
    let mut expected = BTreeSet::new();
    let mut problems = Vec::new();
    for service in services {
        match service.env.get("KILN_METRICS_LISTEN") {
            Some(listen) => {
                let port = listen.rsplit_once(':').map_or("", |(_, p)| p);
                expected.insert(format!("{}:{port}", service.name));
            }
            None => problems.push(format!("{}: no KILN_METRICS_LISTEN", service.name)),
        }
    }
    for missing in expected.difference(&targets) {
        problems.push(format!("prometheus.yml does not scrape {missing}"));
    }
    for stray in targets.difference(&expected) {
        problems.push(format!(
            "prometheus.yml scrapes {stray}, where no Kiln metrics listen"
        ));
    }
    problems
}

fn check(compose: &str) -> Vec<String> {
    let (mut problems, services) = problems(
        &parse(compose),
        &read("Dockerfile"),
        &read("otel-collector.yaml"),
    );
    assert!(services.len() >= 5, "the Kiln services are found");
    problems.extend(scrape_problems(&read("prometheus.yml"), &services));
    problems.extend(config_failures(&services));
    problems
}

#[test]
fn the_compose_file_holds_against_the_code() {
    let problems = check(&read("docker-compose.yml"));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_broken_copy_of_the_compose_file_fails_naming_what_broke() {
    let original = read("docker-compose.yml");
    for (from, to, named) in [
        // A value the service refuses at start.
        (
            "KILN_REGISTRY__S3_ALLOW_HTTP: \"true\"",
            "KILN_REGISTRY__S3_ALLOW_HTTP: \"sometimes\"",
            "registry.s3_allow_http",
        ),
        // A key that is no configuration.
        (
            "KILN_INFERENCE__NODE_ID: inference-1",
            "KILN_INFERENCE__NODE_IDENT: inference-1",
            "node_ident",
        ),
        // A URL on the wrong port.
        (
            "KILN_BILLING_URL: http://billing:7404\n    ports",
            "KILN_BILLING_URL: http://billing:7405\n    ports",
            "KILN_BILLING_URL reaches billing on port 7405",
        ),
        // Metrics where Prometheus does not look.
        (
            "KILN_METRICS_LISTEN: 0.0.0.0:9464",
            "KILN_METRICS_LISTEN: 0.0.0.0:9465",
            "does not scrape identity:9465",
        ),
        // A command that is no service.
        (
            "[\"serve\", \"billing\"]",
            "[\"serve\", \"biling\"]",
            "\"biling\"",
        ),
    ] {
        assert!(original.contains(from), "the file holds {from:?}");
        let problems = check(&original.replacen(from, to, 1));
        assert!(
            problems.iter().any(|p| p.contains(named)),
            "{named:?} in {problems:#?}"
        );
    }
}
