//! Security: the bearer token on every route but the chosen open ones (and between replicas),
//! bounded requests, and no secret — a SASL password, the token — in anything tally writes
//! to stderr, not even on a config error.

mod common;
mod model;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally::gen::{generate, GenOptions, Scenario};
use tally::secret::Secret;

use common::*;

/// The token every tally of this test process takes (and every request of it carries).
const TOKEN: &str = "s3cret-bearer-token-of-the-tests";

fn with_token(cluster: &Cluster, dir: &Path) -> tally::config::Config {
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir);
    cfg.http.token = Some(Secret::new(TOKEN));
    cfg
}

fn status(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let (status, body) = http_request(addr, method, path, headers, &[]).expect("an answer");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn every_route_but_the_open_ones_needs_the_token() {
    use_token(TOKEN);
    let cluster = Cluster::for_example("s1-uvpv.toml", 2);
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(with_token(&cluster, dir.path()));
    let none = ["Authorization: Basic dXNlcjpwYXNz"];
    let wrong = ["Authorization: Bearer s3cret-bearer-token-of-the-test"];
    for path in ["/api/v1/metrics", "/api/v1/metrics/views", "/metrics", "/openapi.json", "/", "/no/such/route"] {
        for h in [&none, &wrong] {
            let (code, body) = status(tally.addr, "GET", path, h);
            assert_eq!(code, 401, "GET {path} with {h:?}: {body}");
            assert!(!body.contains(TOKEN), "a refusal quotes no token: {body}");
        }
    }
    let (code, body) = status(tally.addr, "POST", "/internal/v1/partials", &none);
    assert_eq!(code, 401, "the replicas' own route needs it too: {body}");
    for path in ["/health", "/ready"] {
        let (code, body) = status(tally.addr, "GET", path, &none);
        assert!(code == 200 || code == 503, "{path} stays open by default: {code} {body}");
    }
    assert_eq!(status(tally.addr, "GET", "/api/v1/metrics", &[]).0, 200, "with the token");
    let long = format!("/api/v1/metrics/views?key={}", "x".repeat(9000));
    assert_eq!(status(tally.addr, "GET", &long, &[]).0, 414, "a query string over 8 KiB");
    tally.stop();

    // /metrics left open by choice, for a Prometheus without the token.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_token(&cluster, dir.path());
    cfg.http.open.push("/metrics".into());
    let tally = Tally::start(cfg);
    assert_eq!(status(tally.addr, "GET", "/metrics", &none).0, 200);
    assert_eq!(status(tally.addr, "GET", "/api/v1/metrics", &none).0, 401);
    tally.stop();
}

#[test]
fn replicas_ask_each_other_with_the_token() {
    use_token(TOKEN);
    let cluster = Cluster::for_example("s1-uvpv.toml", 2);
    let records = generate(Scenario::S1, &GenOptions { count: 4_000, partitions: 2, ..GenOptions::for_scenario(Scenario::S1) });
    cluster.produce(tally::gen::topic(Scenario::S1), &records);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Tally::start(with_token(&cluster, dirs[0].path()));
    let b = Tally::start(with_token(&cluster, dirs[1].path()));
    // Until each owns one partition and every answer covers both, one of them from the other.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let owned = |t: &Tally| {
            try_get_raw(t.addr, "/ready").and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok()).map(|r| r["partitions"].clone())
        };
        if owned(&a) == Some(1.into()) && owned(&b) == Some(1.into()) {
            if let Some((200, body)) = try_get_raw(a.addr, "/api/v1/metrics/views") {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let replicas: std::collections::BTreeSet<String> =
                    v["coverage"]["partitions"].as_array().unwrap().iter().map(|p| p["replica"].as_str().unwrap().to_string()).collect();
                if replicas.len() == 2 {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "no answer from both replicas");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_caught_up(a.addr, "/api/v1/metrics/views", &ends(&records));
    s1::assert_exact(a.addr, &records, "replica a, with b's partition fetched with the token");
    s1::assert_exact(b.addr, &records, "replica b, with a's partition fetched with the token");
    a.stop();
    b.stop();
}

/// Runs `tally ARGS` with `env`, for up to `secs` (then SIGTERM): exit success and stderr.
fn tally_stderr(args: &[&str], env: &[(&str, &str)], secs: u64) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tally");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.success(), reader.join().unwrap())
}

#[test]
fn no_secret_reaches_stderr() {
    const PASSWORD: &str = "sasl-pa55word-never-logged";
    const ENV_TOKEN: &str = "env-token-never-logged-0123";
    let cluster = Cluster::for_example("s1-uvpv.toml", 1);
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/s1-uvpv.toml")).unwrap();
    let write = |name: &str, kafka_extra: &str, http_extra: &str| {
        let port = free_port();
        let text = example
            .replace("[kafka]", &format!("[kafka]\n{kafka_extra}"))
            .replace("bootstrap_servers = \"127.0.0.1:9092\"", &format!("bootstrap_servers = \"{}\"", cluster.brokers))
            .replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:{port}\"\n{http_extra}"))
            .replace("dir = \"tally-state/s1\"", &format!("dir = \"{}\"", dir.path().join(name).display()));
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        (path.display().to_string(), port)
    };
    let sasl = format!(
        "properties = {{ \"security.protocol\" = \"SASL_PLAINTEXT\", \"sasl.mechanisms\" = \"PLAIN\", \"sasl.username\" = \"tally\", \"sasl.password\" = \"{PASSWORD}\", \"debug\" = \"security,broker,conf\" }}"
    );
    let cases = [
        // A syntax error on the password's line: the parser would quote it.
        ("unterminated", format!("properties = {{ \"sasl.password\" = \"{PASSWORD} }}"), String::new()),
        // A password where the config wants a string, and a number: the type error would quote it.
        ("mistyped", "properties = { \"sasl.password\" = 31415926535897 }".to_string(), String::new()),
        // A token too short to take.
        ("short_token", sasl.clone(), "token = \"short-tok\"".to_string()),
    ];
    for (name, kafka, http) in &cases {
        let (file, _) = write(name, kafka, http);
        let (ok, err) = tally_stderr(&["check", "--config", &file], &[], 30);
        assert!(!ok, "{name}: the config is refused");
        for secret in [PASSWORD, "31415926535897", "short-tok"] {
            assert!(!err.contains(secret), "{name}: stderr shows a secret:\n{err}");
        }
        assert!(err.contains("line") || err.contains("http.token"), "{name}: the error still says where: {err}");
    }
    // Running, with every log on, SASL towards a broker that does not speak it, the token
    // from the environment, a refused and an accepted query.
    let (file, port) = write("running", &sasl, "");
    let (ok, err) = tally_stderr(&["check", "--config", &file], &[], 30);
    assert!(ok, "the running config is valid: {err}");
    let env = [("RUST_LOG", "debug,librdkafka=debug,rdkafka=debug"), ("TALLY_HTTP_TOKEN", ENV_TOKEN)];
    let asking = std::thread::spawn(move || {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let bearer = format!("Authorization: Bearer {ENV_TOKEN}");
        let wrong = format!("Authorization: Bearer {ENV_TOKEN}-not");
        let mut answered = Vec::new();
        for _ in 0..100 {
            for h in [&bearer, &wrong] {
                if let Ok((code, _)) = http_request(addr, "GET", "/api/v1/metrics", &[h.as_str()], &[]) {
                    answered.push(code);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        answered
    });
    let (_, err) = tally_stderr(&["run", "--config", &file], &env, 12);
    let answered = asking.join().unwrap();
    assert!(answered.contains(&401), "the wrong token was refused: {answered:?}");
    assert!(err.contains("waiting for the brokers") || err.contains("tally is running"), "the run got somewhere: {err}");
    for secret in [PASSWORD, ENV_TOKEN] {
        assert!(
            !err.contains(secret),
            "a running tally's stderr shows a secret:\n{}",
            err.lines().filter(|l| l.contains(secret)).take(5).collect::<Vec<_>>().join("\n")
        );
    }
    let shown: Vec<&str> = err.lines().filter(|l| !l.contains("sled::")).take(6).collect();
    println!("{} lines of debug logs, no secret among them; some:\n{}", err.lines().count(), shown.join("\n"));
}
