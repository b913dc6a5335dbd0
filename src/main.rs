//! The `tally` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};

use tally::config::{Config, KafkaConfig};
use tally::gen::{self, GenOptions, Scenario};

/// tally: windowed PV / UV / sums / top-N from Kafka, answered over HTTP.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run on a config file until Ctrl-C / SIGTERM.
    Run {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// This replica's stable name (`cluster.replica`), e.g. the pod name.
        #[arg(long)]
        replica: Option<String>,
        /// The URL other replicas reach this one at (`http.advertised_url`).
        #[arg(long)]
        advertised_url: Option<String>,
        /// Exit when the brokers have not answered this long after start, e.g. `2m`
        /// (`kafka.exit_on_broker_timeout`); by default tally waits, up but not ready.
        #[arg(long, value_name = "DURATION")]
        exit_on_broker_timeout: Option<String>,
    },
    /// Validate a config file and explain what it computes; with `--against`, what a
    /// restart with it would do to a stored state, metric by metric.
    Check {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// A state directory (`state.dir` of the running config), or `cluster`: the state
        /// the changelogs on the config's brokers hold.
        #[arg(long)]
        against: Option<PathBuf>,
    },
    /// Run the pending migrations of the config's state store (idempotent), then exit.
    Migrate {
        /// The config file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run scenario S1 end to end on an in-process Kafka: nothing to install.
    Demo {
        /// HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Partitions of the source topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Produce a scenario's events to a topic.
    Gen {
        /// Which scenario.
        #[arg(long, value_enum)]
        scenario: Scenario,
        /// bootstrap.servers of the cluster.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Topic (default: the scenario's).
        #[arg(long)]
        topic: Option<String>,
        /// Number of events.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// PRNG seed: the same seed gives the same events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Partitions to spread events over (the topic is created with this many if missing).
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Stamp events with the wall clock instead of the scenario's fixed start time.
        #[arg(long)]
        now: bool,
        /// Share of out-of-order events (default: the scenario's).
        #[arg(long)]
        out_of_order: Option<f64>,
        /// Share of late events (default: the scenario's).
        #[arg(long)]
        late: Option<f64>,
        /// Share of malformed events (default: the scenario's).
        #[arg(long)]
        bad: Option<f64>,
        /// Distinct users (or accounts, roles; the scenario's other dimensions scale with
        /// it; default: the scenario's).
        #[arg(long)]
        users: Option<u64>,
        /// Event-time milliseconds between consecutive events (default: the scenario's).
        #[arg(long)]
        step_ms: Option<i64>,
    },
    /// Benchmark S1 through the mock cluster and print throughput, latency, RSS and state size.
    Bench(tally::bench::BenchOptions),
}

/// The store in `dir`, which must exist (a check or a migration never creates one).
fn open_existing(dir: &std::path::Path) -> anyhow::Result<tally::store::Store> {
    anyhow::ensure!(dir.join("conf").exists(), "no state store in {}", dir.display());
    tally::store::Store::open(dir).with_context(|| format!("opening the state store in {}", dir.display()))
}

/// The bearer token from the environment, which overrides `http.token`.
const TOKEN_ENV: &str = "TALLY_HTTP_TOKEN";

fn main() -> std::process::ExitCode {
    if let Ok(token) = std::env::var(TOKEN_ENV) {
        tally::secret::register(&token);
    }
    // Every line to stderr — logs, the error tally exits with, a panic — without secrets.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()))
        .with_writer(tally::secret::ScrubbedStderr)
        .init();
    std::panic::set_hook(Box::new(|info| eprintln!("{}", tally::secret::scrub(&info.to_string()))));
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", tally::secret::scrub(&format!("{e:?}")));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, replica, advertised_url, exit_on_broker_timeout } => {
            let mut cfg = Config::load(&config)?;
            cfg.cluster.replica = replica.or(cfg.cluster.replica);
            cfg.http.advertised_url = advertised_url.or(cfg.http.advertised_url);
            cfg.kafka.exit_on_broker_timeout = exit_on_broker_timeout.or(cfg.kafka.exit_on_broker_timeout);
            if let Ok(token) = std::env::var(TOKEN_ENV) {
                cfg.http.token = Some(tally::secret::Secret::new(token));
            }
            cfg.validate().context("with the command line's --replica / --advertised-url / --exit-on-broker-timeout / TALLY_HTTP_TOKEN")?;
            let rt = tokio::runtime::Runtime::new()?;
            let ran = rt.block_on(tally::app::run(cfg, tally::app::shutdown_signal(), |_| {}));
            // A metadata request to brokers that do not answer may still be waiting out its
            // timeout on a blocking thread; nothing is left that needs it.
            rt.shutdown_timeout(Duration::from_secs(1));
            ran
        }
        Command::Check { config, against } => {
            let cfg = Config::load(&config)?;
            let topo = tally::topology::Topology::compile(&cfg)?;
            print!("{}", topo.explain());
            println!("config OK");
            if let Some(dir) = against.clone().filter(|d| d.as_os_str() != "cluster" || d.is_dir()) {
                let store = open_existing(&dir)?;
                let pending: Vec<&str> = store.pending()?.iter().map(|s| s.name).collect();
                if !pending.is_empty() {
                    println!("a restart migrates the store first: {}", pending.join(", "));
                }
                let plans = tally::upgrade::plan(&topo, &store)?;
                print!("{}", tally::upgrade::render(&dir.display().to_string(), Some(store.version()?), &plans));
            } else if against.is_some() {
                let scratch = tempfile::Builder::new().prefix("tally-check-").tempdir()?;
                let store = tally::store::Store::open(scratch.path())?;
                let records = tally::kafka::snapshot::copy_changelogs(&cfg.kafka, &topo, &store).context("reading the changelogs")?;
                let plans = tally::upgrade::plan(&topo, &store)?;
                let what = format!("the changelogs on {} ({records} records)", cfg.kafka.bootstrap_servers);
                print!("{}", tally::upgrade::render(&what, None, &plans));
            }
            Ok(())
        }
        Command::Migrate { config } => {
            let cfg = Config::load(&config)?;
            let topo = tally::topology::Topology::compile(&cfg)?;
            let store = open_existing(&cfg.state.dir)?;
            let from = store.version()?;
            let applied = store.migrate(&topo)?;
            for a in &applied {
                println!("{}: {} values rewritten, {} already current, {:.2} s", a.name, a.report.rewritten, a.report.unchanged, a.seconds);
            }
            match applied.is_empty() {
                true => println!("{}: store version {from}, up to date", cfg.state.dir.display()),
                false => println!("{}: store version {from} → {}", cfg.state.dir.display(), store.version()?),
            }
            Ok(())
        }
        Command::Demo { http, rate, partitions } => tally::demo::run(tally::demo::DemoOptions { http, rate, partitions }),
        Command::Gen { scenario, brokers, topic, count, rate, seed, partitions, now, out_of_order, late, bad, users, step_ms } => {
            let mut opts = GenOptions { seed, count, partitions, ..GenOptions::for_scenario(scenario) };
            opts.cardinality = users.unwrap_or(opts.cardinality).max(1);
            opts.step_ms = step_ms.unwrap_or(opts.step_ms).max(0);
            if now {
                opts.start_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
            }
            if let Some(s) = out_of_order {
                opts.out_of_order_share = s;
            }
            if let Some(s) = late {
                opts.late_share = s;
            }
            if let Some(s) = bad {
                opts.bad_share = s;
            }
            let topics = gen::topics(scenario);
            if topic.is_some() && topics.len() > 1 {
                anyhow::bail!("--topic: scenario {scenario:?} writes to several topics ({topics:?}); they cannot be renamed");
            }
            let topic = topic.unwrap_or_else(|| gen::topic(scenario).to_string());
            let kafka = KafkaConfig {
                bootstrap_servers: brokers,
                application_id: "tally-gen".into(),
                properties: Default::default(),
                exit_on_broker_timeout: None,
            };
            let rt = tokio::runtime::Runtime::new()?;
            for t in topics.iter().filter(|t| **t != gen::S3_ROOMS) {
                let t = if topics.len() == 1 { topic.as_str() } else { t };
                rt.block_on(tally::kafka::topics::ensure_source(&kafka, t, partitions))?;
            }
            if topics.contains(&gen::S3_ROOMS) {
                rt.block_on(tally::kafka::topics::ensure_table(&kafka, gen::S3_ROOMS, partitions))?;
            }
            let feed = tally::kafka::feed::Feed::new(&kafka, &topic)?;
            let sent = feed.send_all(gen::generate(scenario, &opts), rate, || false).context("producing events")?;
            feed.flush()?;
            let to = if topics.len() == 1 { topic } else { topics.join(", ") };
            eprintln!("produced {sent} {scenario:?} records to {to}");
            Ok(())
        }
        Command::Bench(opts) => tally::bench::run(opts),
    }
}
