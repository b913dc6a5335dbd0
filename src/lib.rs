//! # tally
//!
//! A Kafka Streams–style analytics sidecar: it consumes event topics as a consumer group,
//! keeps windowed PV / UV / sums / top-N state per owned partition in sled, and answers
//! HTTP queries and Prometheus scrapes.
//!
//! The crate reads top to bottom like the data flows:
//!
//! * [`config`] — the TOML config file; [`topology`] — the config compiled and validated;
//! * [`event`] — JSON records decoded into slots, with their event time;
//! * [`table`] — global tables, and which of their values a record joins with;
//! * [`filter`], [`window`], [`aggregate`] — which records count, where they fall, what is kept;
//! * [`task`] — the processing core: per-partition tasks and the write-back cache;
//! * [`store`] — the sled layout of partial aggregates and partition positions;
//!   [`layout`] — what a metric's states are, and the gate every state read back passes;
//!   [`migrations`] — every persisted format, and the steps from each to the next;
//! * [`query`] — answers: merging partials over partitions and slices;
//! * [`cluster`] — any replica answers any query: membership, fan-out to the owners;
//! * [`results`] — window rows over every partition, from the changelogs, for the result topic;
//! * [`kafka`] — the edges to Kafka: consumer loop, dead-letter/late producer, topics;
//! * [`http`] — the query API and `/metrics`; [`metrics`] — the Prometheus registry;
//! * [`upgrade`] — what a restart with a new config would do to a stored state;
//! * [`app`] — wiring for `tally run`; [`gen`], [`demo`], [`bench`](mod@bench) — tools around it;
//!   [`hash`] — the hasher of the in-memory maps.

pub mod aggregate;
pub mod app;
pub mod bench;
pub mod changelog;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod event;
pub mod filter;
pub mod gen;
pub mod hash;
pub mod health;
pub mod http;
pub mod kafka;
pub mod layout;
pub mod metrics;
#[path = "../migrations/mod.rs"]
pub mod migrations;
pub mod ownership;
pub mod query;
pub mod results;
pub mod secret;
pub mod store;
pub mod table;
pub mod task;
pub mod topology;
pub mod upgrade;
pub mod window;
