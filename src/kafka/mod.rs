//! The edges to Kafka: client settings, the source consumer loop ([`consumer`]), the
//! dead-letter and late-record outputs ([`side`]), changelogs ([`changelog`]) and reading
//! them back ([`state_updater`]), the result topic ([`results`]), acknowledged producing
//! ([`delivery`]), commits with a bound ([`commit`]), internal topics ([`topics`]; their settings altered by [`alter_configs`]), membership ([`members`]), global tables ([`tables`]), a copy of the changelogs' state ([`snapshot`])
//! and the producer of generated events ([`feed`]).

pub mod alter_configs;
pub mod changelog;
pub mod commit;
pub mod consumer;
pub mod delivery;
pub mod feed;
pub mod members;
pub mod results;
pub mod side;
pub mod snapshot;
pub mod state_updater;
pub mod tables;
pub mod topics;

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// A client config for the user's cluster: bootstrap servers, tally's defaults for `role`,
/// then every user property on top, untouched (SASL_SSL, truststores, …).
pub fn client_config(kafka: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.bootstrap_servers);
    // Nagle's algorithm holds a small request (a flush's position records, a commit) back
    // until the previous one is acknowledged: tens of milliseconds a round trip.
    c.set("socket.nagle.disable", "true");
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}
