//! Test harness: a real Kafka protocol broker (librdkafka's mock cluster), tally on it
//! (in-process or as a child process), HTTP over loopback, and the reference model
//! (`tests/model`) fed with the records as the broker holds them.

#![allow(dead_code)]

pub mod changelog;
pub mod replica;
pub mod s1;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use tally::aggregate::sketch::Sketch;
use tally::config::{Config, KafkaConfig};
use tally::gen::GenRecord;
use tally::kafka::feed::Feed;

/// A Kafka protocol broker on loopback: librdkafka's mock cluster hosted by the test
/// process, or an external nisshi broker process.
pub struct Cluster {
    pub mock: Option<MockCluster<'static, DefaultProducerContext>>,
    broker: Option<BrokerProcess>,
    pub brokers: String,
}

/// An external broker process, killed when dropped.
struct BrokerProcess {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator (splitmix64): kill moments, victims, random cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// A record read back from a topic.
pub struct Drained {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Vec<u8>,
    /// Empty for a tombstone (see `null`).
    pub payload: Vec<u8>,
    /// A tombstone (null value).
    pub null: bool,
}

/// A free loopback port, below the kernel's ephemeral range (32768 and up here): a replica
/// restarted on its port must not find it taken by some outgoing connection meanwhile, which
/// a port the kernel handed out from that range can be. Never the same port twice in a run.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const PORTS: u32 = 12_000;
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    // Each test process starts somewhere else in the range, so two at once rarely meet.
    let start = std::process::id() % PORTS;
    for _ in 0..PORTS {
        let port = (LOW + (start + TAKEN.fetch_add(1, Ordering::Relaxed)) % PORTS) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// Where the nisshi broker binary is: `TALLY_NISSHI`, else where `.ci/install-test-tools`
/// builds it.
fn nisshi_binary() -> std::path::PathBuf {
    let path = std::env::var_os("TALLY_NISSHI")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").expect("HOME")).join(".cache/tally/tools/nisshi/bin/nisshi"));
    assert!(
        path.exists(),
        "the nisshi broker is not at {}: run `bash .ci/install-test-tools` (builds it once per machine) or set TALLY_NISSHI",
        path.display()
    );
    path
}

impl Cluster {
    /// A one-broker cluster with the source topic of `cfg` and its internal topics (the
    /// mock has no CreateTopics, so tally cannot create them itself here).
    pub fn for_config(cfg: &Config, partitions: i32) -> Cluster {
        Cluster::with_topics_of(cfg, partitions)
    }

    /// [`Cluster::for_config`] of a shipped example config.
    pub fn for_example(file: &str, partitions: i32) -> Cluster {
        Cluster::with_topics_of(&example_config(file, "", Path::new("unused")), partitions)
    }

    fn with_topics_of(cfg: &Config, partitions: i32) -> Cluster {
        let topo = tally::topology::Topology::compile(cfg).expect("config compiles");
        let cluster = Cluster::new(&[]);
        tally::kafka::topics::create_on_mock(cluster.mock.as_ref().unwrap(), &topo, partitions).expect("creating topics");
        cluster
    }

    /// [`Cluster::for_example`] on a mock of `brokers` brokers, with every partition led by
    /// broker 1 and the group coordinated there (so the others can be taken down one by one
    /// by moving a partition's leadership to them).
    pub fn for_example_on_brokers(file: &str, partitions: i32, brokers: i32) -> Cluster {
        let cfg = example_config(file, "", Path::new("unused"));
        let topo = tally::topology::Topology::compile(&cfg).expect("config compiles");
        let cluster = Cluster::mock(brokers, &[]);
        let mock = cluster.mock.as_ref().unwrap();
        for (topic, parts) in tally::kafka::topics::create_on_mock(mock, &topo, partitions).expect("creating topics") {
            for p in 0..parts {
                mock.partition_leader(&topic, p, Some(1)).expect("moving a leader");
            }
        }
        for group in [topo.application_id.clone(), format!("{}-restore", topo.application_id)] {
            mock.coordinator(rdkafka::mocking::MockCoordinator::Group(group), 1).expect("placing a group coordinator");
        }
        cluster
    }

    /// A one-broker cluster with `topics` (name, partitions).
    pub fn new(topics: &[(&str, i32)]) -> Cluster {
        Cluster::mock(1, topics)
    }

    fn mock(brokers: i32, topics: &[(&str, i32)]) -> Cluster {
        let mock = MockCluster::new(brokers).expect("mock cluster");
        for (t, p) in topics {
            mock.create_topic(t, *p, 1).expect("create topic");
        }
        let brokers = mock.bootstrap_servers();
        assert!(brokers.starts_with("127.0.0.1:") || brokers.starts_with("localhost:"), "mock brokers must be on loopback: {brokers}");
        Cluster { mock: Some(mock), broker: None, brokers }
    }

    /// A nisshi broker process on a loopback port, in-memory storage, with the source
    /// topics of `cfg` (`partitions` each); tally creates its internal topics itself here.
    pub fn nisshi(cfg: &Config, partitions: i32) -> Cluster {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("nisshi.log")).unwrap();
        let child = std::process::Command::new(nisshi_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://nisshi/",
                "--group-initial-rebalance-delay",
                "0s",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nisshi");
        let brokers = format!("127.0.0.1:{port}");
        let cluster = Cluster { mock: None, broker: Some(BrokerProcess { child, _dir: dir }), brokers };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nisshi did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let topo = tally::topology::Topology::compile(cfg).expect("config compiles");
        let rt = tokio::runtime::Runtime::new().unwrap();
        for s in &topo.sources {
            rt.block_on(tally::kafka::topics::ensure_source(&cluster.kafka(), &s.topic, partitions)).expect("creating the source topic");
        }
        // Tables' topics without compaction: tests read every record back.
        for t in &topo.tables {
            rt.block_on(tally::kafka::topics::ensure_source(&cluster.kafka(), &t.topic, partitions)).expect("creating the table topic");
        }
        cluster
    }

    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: self.brokers.clone(),
            application_id: "test".into(),
            properties: [("enable.idempotence".to_string(), "true".to_string())].into(),
            exit_on_broker_timeout: None,
        }
    }

    /// Produces `records` to `topic` over time, on a thread: `chunks` chunks, one every half
    /// second (events flowing while replicas come and go).
    pub fn feed_over_time(&self, topic: &'static str, records: &[GenRecord], chunks: usize) -> std::thread::JoinHandle<()> {
        let (kafka, records) = (self.kafka(), records.to_vec());
        std::thread::spawn(move || {
            let feed = Feed::new(&kafka, topic).unwrap();
            for chunk in records.chunks(records.len() / chunks + 1) {
                feed.send_all(chunk.iter().cloned(), 0, || false).unwrap();
                feed.flush().unwrap();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    }

    /// Produces `records` in order, each to its own partition, and waits for the acks.
    pub fn produce(&self, topic: &str, records: &[GenRecord]) {
        let feed = Feed::new(&self.kafka(), topic).expect("producer");
        feed.send_all(records.iter().cloned(), 0, || false).expect("produce");
        feed.flush().expect("flush");
    }

    /// Produces a tombstone (a null value) for `key` to `topic`'s `partition`.
    pub fn tombstone(&self, topic: &str, partition: i32, key: &[u8]) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("producer");
        p.send(BaseRecord::<[u8], [u8]>::to(topic).partition(partition).key(key)).map_err(|(e, _)| e).expect("tombstone");
        p.flush(Duration::from_secs(10)).expect("flush");
    }

    /// The high watermark (next offset) of every partition of `topic`.
    pub fn high_watermarks(&self, topic: &str) -> Vec<i64> {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.brokers).set("group.id", "test-offsets").create().expect("consumer");
        let meta = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        meta.topics()[0].partitions().iter().map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).expect("watermarks").1).collect()
    }

    /// A consumer assigned every partition of `topic` from the beginning (reporting each
    /// partition's end with `eof`), and the partitions.
    fn reader(&self, topic: &str, eof: bool) -> (BaseConsumer, Vec<i32>) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", if eof { "true" } else { "false" })
            .create()
            .expect("consumer");
        let meta = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
        let partitions: Vec<i32> = meta.topics()[0].partitions().iter().map(|p| p.id()).collect();
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        (c, partitions)
    }

    /// Every record of `topic` now, partition by partition in offset order.
    pub fn drain(&self, topic: &str) -> Vec<Drained> {
        let (c, partitions) = self.reader(topic, true);
        let mut open: std::collections::HashSet<i32> = partitions.into_iter().collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !open.is_empty() && Instant::now() < deadline {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(Drained {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().unwrap_or_default().to_vec(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    null: m.payload().is_none(),
                }),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                _ => {}
            }
        }
        assert!(open.is_empty(), "{topic}: partitions {open:?} not read to their end within 60 s");
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }

    /// Every record of `topic` now, as (partition, Kafka timestamp, payload), partition by
    /// partition in offset order.
    pub fn records_of(&self, topic: &str) -> Vec<(i32, Option<i64>, Vec<u8>)> {
        self.drain(topic).into_iter().map(|r| (r.partition, r.timestamp, r.payload)).collect()
    }

    /// Every record of `topic` now, as (key, payload), partition by partition in order.
    pub fn read_to_end(&self, topic: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.drain(topic).into_iter().map(|r| (r.key, r.payload)).collect()
    }

    /// Reads `expect` records of every partition of `topic`: (headers as a map, payload).
    pub fn read_all(&self, topic: &str, expect: usize) -> Vec<(HashMap<String, String>, Vec<u8>)> {
        let (c, _) = self.reader(topic, false);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let mut h = HashMap::new();
                if let Some(hs) = m.headers() {
                    for x in hs.iter() {
                        h.insert(x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned());
                    }
                }
                out.push((h, m.payload().unwrap_or_default().to_vec()));
            }
        }
        out
    }
}

/// Loads a shipped example config, pointed at `brokers`, a state dir and a free port.
pub fn example_config(file: &str, brokers: &str, state: &Path) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
    let mut cfg = Config::load(&path).expect("example config");
    cfg.kafka.bootstrap_servers = brokers.to_string();
    cfg.state.dir = state.to_path_buf();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg
}

/// The number after `name=` in a log line (ANSI colours stripped).
pub fn log_field(line: &str, name: &str) -> Option<i64> {
    let plain: String = line.split('\x1b').map(|p| p.split_once('m').map_or(p, |(_, rest)| rest)).collect();
    let at = plain.find(&format!(" {name}="))? + name.len() + 2;
    plain[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The bearer token every request of this test process carries unless it gives its own
/// `Authorization` (see [`use_token`]).
static BEARER: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Makes every request of this test process carry `token` (tallies started with
/// `http.token`): the helpers below then ask as any client would.
pub fn use_token(token: &str) {
    *BEARER.write().unwrap() = Some(token.to_string());
}

/// One HTTP/1.0 request on loopback (`headers` as `Name: value` lines, `body` for a POST):
/// status and body. Times out rather than hanging a test on a stalled server.
pub fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    http_exchange(addr, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`http_request`], with the response's head (status line and headers) too.
pub fn http_exchange(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if let Some(t) = BEARER.read().unwrap().as_ref().filter(|_| !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("authorization:"))) {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| std::io::Error::other("no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok((status, head, resp[split + 4..].to_vec()))
}

/// GET over loopback; returns status and body, or `None` when nothing answers (yet).
pub fn try_get_raw(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let (status, body) = http_request(addr, "GET", path, &[], &[]).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GET over loopback; returns status and body.
pub fn http_get_raw(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get_raw(addr, path).unwrap_or_else(|| panic!("GET {path}: no answer from {addr}"))
}

/// GET returning JSON; panics unless 200.
pub fn get(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get_raw(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON body")
}

/// Sum of the samples of a metric family (name + optional labels filter by prefix).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{', ',']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Value of one sample, the line starting with exactly `series`.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// Waits until every partition in the answer of `probe` (a query path) has reached
/// `ends[partition]` — i.e. everything produced is in the queryable state.
pub fn wait_caught_up(addr: SocketAddr, probe: &str, ends: &HashMap<i32, i64>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((200, body)) = try_get_raw(addr, probe) {
            let v: Value = serde_json::from_str(&body).unwrap();
            let positions: HashMap<i32, i64> = v["coverage"]["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["partition"].as_i64().unwrap() as i32, p["next_offset"].as_i64().unwrap()))
                .collect();
            if ends.iter().all(|(p, end)| positions.get(p).copied().unwrap_or(0) >= *end) {
                return;
            }
            assert!(Instant::now() < deadline, "tally did not catch up: at {positions:?}, want {ends:?}");
        }
        assert!(Instant::now() < deadline, "tally did not answer {probe}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The next offset of each partition after producing `records` once.
pub fn ends(records: &[GenRecord]) -> HashMap<i32, i64> {
    let mut m = HashMap::new();
    for r in records {
        *m.entry(r.partition).or_insert(0) += 1;
    }
    m
}

/// tally running in-process on its own runtime.
pub struct Tally {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Tally {
    /// Starts tally on `cfg` and waits until it has met the brokers and serves its API.
    pub fn start(cfg: Config) -> Tally {
        let tally = Tally::listening(cfg);
        let deadline = Instant::now() + Duration::from_secs(60);
        while try_get_raw(tally.addr, "/ready").is_none_or(|(_, body)| body.contains("\"starting\":true")) {
            assert!(Instant::now() < deadline, "tally did not get past waiting for the brokers");
            std::thread::sleep(Duration::from_millis(20));
        }
        tally
    }

    /// Starts tally on `cfg` and waits only for its HTTP address (it may still be waiting
    /// for the brokers).
    pub fn listening(cfg: Config) -> Tally {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(tally::app::run(
                cfg,
                async {
                    let _ = stop_rx.await;
                },
                move |a| {
                    let _ = addr_tx.send(a);
                },
            ))
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).expect("tally did not start");
        Tally { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// The Prometheus exposition.
    pub fn metrics(&self) -> String {
        http_get_raw(self.addr, "/metrics").1
    }

    /// GET returning JSON.
    pub fn get(&self, path: &str) -> Value {
        get(self.addr, path)
    }

    /// Stops cleanly and returns the run's result.
    pub fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().expect("tally thread").expect("tally run");
    }
}

/// The canonical hex of a sketch of exactly these values (single clean pass).
pub fn sketch_hex<'a>(values: impl IntoIterator<Item = &'a String>, precision: u8) -> String {
    let mut s = Sketch::new(precision).unwrap();
    for v in values {
        s.insert(v.as_bytes());
    }
    s.to_canonical().iter().map(|b| format!("{b:02x}")).collect()
}

/// The estimate tally reports for a sketch of exactly these values (single clean pass).
pub fn sketch_estimate<'a>(values: impl IntoIterator<Item = &'a String>, precision: u8) -> f64 {
    let mut s = Sketch::new(precision).unwrap();
    for v in values {
        s.insert(v.as_bytes());
    }
    s.estimate().round()
}

/// Asserts an HLL estimate is within 3 standard errors of the exact count.
pub fn assert_hll(estimate: &Value, exact: usize, what: &str) {
    let est = estimate["estimate"].as_f64().unwrap_or_else(|| panic!("{what}: no estimate in {estimate}"));
    let se = estimate["standard_error"].as_f64().unwrap();
    let bound = 3.0 * se * exact as f64 + 1.0;
    assert!((est - exact as f64).abs() <= bound, "{what}: estimate {est} vs exact {exact} (bound {bound})");
}

/// The model of a shipped example config fed with `records` (`partition`, Kafka timestamp,
/// payload), each partition's in offset order.
pub fn model_of(file: &str, partitions: i32, records: impl IntoIterator<Item = (i32, Option<i64>, Vec<u8>)>) -> crate::model::Model {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file)).expect("example config");
    let mut model = crate::model::Model::new(crate::model::spec::Spec::parse(&text), &[partitions]);
    for (partition, kafka_ts, payload) in records {
        model.feed(0, &crate::model::Step::Record { partition, kafka_ts, payload });
    }
    model
}

/// Every metric's and ratio's windows as tally at `addr` answers them, against the model:
/// the differences, each in words.
pub fn check_answers(addr: SocketAddr, model: &crate::model::Model) -> Vec<String> {
    use crate::model::check::Range;
    let mut diffs = Vec::new();
    for (mi, m) in model.spec.metrics.iter().enumerate() {
        let a = get(addr, &format!("/api/v1/metrics/{}?sketch=canonical", m.name));
        assert_eq!(a["truncated"], Value::Bool(false), "{}: answer truncated", m.name);
        diffs.extend(model.check_windows(mi, &a, Range::default(), None));
    }
    for (ri, r) in model.spec.ratios.iter().enumerate() {
        diffs.extend(model.check_ratio(ri, &get(addr, &format!("/api/v1/metrics/{}", r.name)), Range::default()));
    }
    diffs
}

/// Fails with the first differences, if any.
pub fn assert_no_diffs(diffs: &[String], what: &str) {
    assert!(
        diffs.is_empty(),
        "{what}: {} differences from the reference model, first ones:\n{}",
        diffs.len(),
        diffs.iter().take(15).cloned().collect::<Vec<_>>().join("\n")
    );
}
