//! Internal topics: checked against the sources, created through the admin API when missing.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::topology::{InternalTopic, TopicKind, Topology};

/// Creates the source and table topics of `topo` (`partitions` each) and its internal topics on
/// librdkafka's mock cluster, which has no admin API (`tally demo`, `tally bench`, tests);
/// returns each topic with its partition count.
pub fn create_on_mock<C: rdkafka::ClientContext>(
    mock: &rdkafka::mocking::MockCluster<'_, C>,
    topo: &Topology,
    partitions: i32,
) -> anyhow::Result<Vec<(String, i32)>> {
    let mut topics: Vec<(String, i32)> = topo.sources.iter().map(|s| (s.topic.clone(), partitions)).collect();
    topics.extend(topo.tables.iter().map(|t| (t.topic.clone(), partitions)));
    topics.extend(topo.internal_topics().into_iter().map(|t| (t.name, if t.kind.partitions_like().is_some() { partitions } else { 1 })));
    for (topic, parts) in &topics {
        mock.create_topic(topic, *parts, 1).map_err(|e| anyhow::anyhow!("creating topic {topic} on the mock cluster: {e}"))?;
    }
    Ok(topics)
}

/// The cluster cannot give start-up what it needs yet — it does not answer, or a source
/// topic does not exist — but may soon: worth trying again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotYet(pub String);

/// Side outputs and results keep a week, Kafka's own default, stated so a broker default
/// cannot shorten it.
const WEEK_MS: &str = "604800000";

/// Makes sure every internal topic of `topo` exists with the right shape.
///
/// A changelog must have exactly its source topic's partition count — partition `p` of the
/// changelog holds the state of source partition `p` — so an existing one that differs is a
/// start-up error, as is a source topic that does not exist yet (its partition count is
/// unknown). Missing topics are created: changelogs compacted and kept forever (compaction
/// bounds them; expired windows are tombstoned), side outputs deleted after a week, the
/// result topic compacted and deleted after a week. A broker
/// without the admin API (librdkafka's mock cluster) cannot create them: side outputs are
/// then auto-created on first use, a missing changelog is an error.
///
/// Returns each source topic's partition count (`None`: the topic does not exist yet).
pub async fn ensure(kafka: &KafkaConfig, topo: &Topology) -> anyhow::Result<Vec<Option<i32>>> {
    // Reading the metadata blocks (up to its timeout when no broker answers): off the
    // runtime's threads, so a caller waiting on something else too (a shutdown) is served.
    let owned = kafka.clone();
    let (admin, existing) = tokio::task::spawn_blocking(move || admin_and_topics(&owned)).await??;

    let mut wanted: Vec<(&InternalTopic, i32)> = Vec::new();
    let internal = topo.internal_topics();
    for t in &internal {
        let partitions = match t.kind.partitions_like() {
            None => 1,
            Some(s) => {
                let src = &topo.sources[s];
                *existing.get(src.topic.as_str()).ok_or_else(|| {
                    NotYet(format!(
                        "source topic `{}` (source `{}`) does not exist; create it first: its partition count fixes the changelog `{}`",
                        src.topic, src.name, t.name
                    ))
                })?
            }
        };
        match existing.get(t.name.as_str()) {
            Some(&have) if matches!(t.kind, TopicKind::Changelog { .. }) && have != partitions => anyhow::bail!(
                "changelog topic `{}` has {have} partitions but its source topic `{}` has {partitions}: partition p of the changelog must hold the state of source partition p. \
                 Delete the changelog (its state is then recomputed from the source) or give the application a new id",
                t.name,
                topo.sources[t.kind.partitions_like().unwrap_or_default()].topic
            ),
            Some(_) => {}
            None => wanted.push((t, partitions)),
        }
    }
    let specs: Vec<Spec> = wanted.iter().map(|(t, parts)| Spec { name: t.name.clone(), partitions: *parts, kind: Some(t.kind) }).collect();
    create(&admin, &specs).await?;
    let present: Vec<InternalTopic> = internal.iter().filter(|t| !wanted.iter().any(|(w, _)| w.name == t.name)).cloned().collect();
    // In the background: nothing depends on it soon (a wrong policy loses data only once its
    // retention passes), and a broker without the config APIs answers only by a timeout.
    // Its own thread: altering a setting waits on librdkafka's queue, not on the runtime.
    std::thread::Builder::new().name("tally-topic-settings".into()).spawn(move || futures::executor::block_on(migrate_settings(&admin, &present)))?;
    Ok(topo.sources.iter().map(|s| existing.get(s.topic.as_str()).copied()).collect())
}

/// Alters the existing internal topics whose settings differ from what they must have
/// ([`crate::migrations::topics`]). A broker without the config APIs (the mock cluster) is
/// logged and left as it is: the topics tally creates itself are right from the start.
async fn migrate_settings(admin: &AdminClient<DefaultClientContext>, topics: &[InternalTopic]) {
    use rdkafka::admin::ResourceSpecifier;
    let topics: Vec<&InternalTopic> = topics.iter().filter(|t| !crate::migrations::topics::required(t.kind).is_empty()).collect();
    if topics.is_empty() {
        return;
    }
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let specifiers: Vec<ResourceSpecifier> = topics.iter().map(|t| ResourceSpecifier::Topic(&t.name)).collect();
    let described = match admin.describe_configs(&specifiers, &opts).await {
        Ok(d) => d,
        Err(e) => return tracing::warn!(error = %e, "could not read the internal topics' settings; they are not checked"),
    };
    for (t, resource) in topics.iter().zip(described) {
        let Ok(resource) = resource else { continue };
        let current = resource.entry_map();
        let missing =
            crate::migrations::topics::missing(crate::migrations::topics::required(t.kind), |k| current.get(k).and_then(|e| e.value.clone()));
        if missing.is_empty() {
            continue;
        }
        match super::alter_configs::set_topic_settings(admin, &t.name, &missing, Duration::from_secs(10)) {
            Ok(()) => tracing::warn!(topic = %t.name, settings = ?missing, "migrated an internal topic's settings"),
            Err(why) => {
                tracing::error!(topic = %t.name, settings = ?missing, error = %why, "an internal topic has the wrong settings and could not be altered; set them by hand")
            }
        }
    }
}

/// An admin client, and the existing topics with their partition counts. Looking first
/// matters: creating what exists costs a round trip per topic, and a timeout on brokers
/// without the admin API.
fn admin_and_topics(kafka: &KafkaConfig) -> anyhow::Result<(AdminClient<DefaultClientContext>, HashMap<String, i32>)> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(kafka, &[("allow.auto.create.topics", "false")])
        .create()
        .map_err(|e| anyhow::anyhow!("creating the admin client: {e}"))?;
    let meta = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| NotYet(format!("reading cluster metadata from {}: {e}", kafka.bootstrap_servers)))?;
    let existing = meta.topics().iter().filter(|t| t.error().is_none()).map(|t| (t.name().to_string(), t.partitions().len() as i32)).collect();
    Ok((admin, existing))
}

/// A topic to create: name, partitions, and `Some(kind)` for an internal topic, whose kind
/// fixes its cleanup policy (`None`: the broker's defaults).
struct Spec {
    name: String,
    partitions: i32,
    kind: Option<TopicKind>,
}

/// Creates a source topic with `partitions` unless it exists (`tally gen`).
pub async fn ensure_source(kafka: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let (admin, existing) = admin_and_topics(kafka)?;
    if existing.contains_key(topic) {
        return Ok(());
    }
    create(&admin, &[Spec { name: topic.to_string(), partitions, kind: None }]).await
}

/// Creates a global table's topic (compacted; replaced values kept a day before compaction
/// may drop them, which is what a table's default `history` needs) unless it exists
/// (`tally gen`).
pub async fn ensure_table(kafka: &KafkaConfig, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let (admin, existing) = admin_and_topics(kafka)?;
    if existing.contains_key(topic) {
        return Ok(());
    }
    create(&admin, &[Spec { name: topic.to_string(), partitions, kind: Some(TopicKind::Table) }]).await
}

/// Creates `specs`. A changelog that cannot be created is an error; other topics are then
/// left to auto-creation on first use (brokers without the admin API).
async fn create(admin: &AdminClient<DefaultClientContext>, specs: &[Spec]) -> anyhow::Result<()> {
    if specs.is_empty() {
        // Asking anyway would cost a round trip, and a timeout on brokers without the API.
        return Ok(());
    }
    let new: Vec<NewTopic> = specs
        .iter()
        .map(|t| {
            let topic = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(-1));
            match t.kind {
                Some(TopicKind::Changelog { .. }) => topic.set("cleanup.policy", "compact").set("retention.ms", "-1"),
                Some(TopicKind::SideOutput) => topic.set("cleanup.policy", "delete").set("retention.ms", WEEK_MS),
                Some(TopicKind::Results) => topic.set("cleanup.policy", "compact,delete").set("retention.ms", WEEK_MS),
                // A stopped replica leaves a tombstone; a killed one's record ages out on read.
                Some(TopicKind::Members) => topic.set("cleanup.policy", "compact").set("retention.ms", "-1"),
                Some(TopicKind::Table) => topic.set("cleanup.policy", "compact").set("retention.ms", "-1").set("min.compaction.lag.ms", "86400000"),
                None => topic,
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(10)));
    let failed: Vec<(String, String)> = match admin.create_topics(&new, &opts).await {
        Ok(results) => results
            .into_iter()
            .filter_map(|r| match r {
                Ok(name) => {
                    tracing::info!(topic = %name, "created topic");
                    None
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                Err((name, code)) => Some((name, code.to_string())),
            })
            .collect(),
        Err(e) => specs.iter().map(|t| (t.name.clone(), e.to_string())).collect(),
    };
    for (name, why) in failed {
        let t = specs.iter().find(|t| t.name == name).expect("a result names a requested topic");
        if matches!(t.kind, Some(TopicKind::Changelog { .. })) {
            anyhow::bail!("could not create changelog topic `{name}` ({why}); create it with {} partitions and cleanup.policy=compact", t.partitions);
        }
        tracing::warn!(topic = %name, error = %why, "could not create topic; it will be auto-created on first use");
    }
    Ok(())
}
