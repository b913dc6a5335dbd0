//! Internal topics: created through the admin API when missing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// Creates `topics` (name, partitions) that do not exist yet. A broker that cannot create
/// topics (librdkafka's mock cluster has no CreateTopics) is logged, not fatal: the topics
/// are then auto-created on first produce.
pub async fn ensure(kafka: &KafkaConfig, topics: &[(String, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(kafka, &[("allow.auto.create.topics", "false")]).create().map_err(|e| anyhow::anyhow!("creating the admin client: {e}"))?;
    // Look first: creating what exists costs a broker round trip per topic, and brokers
    // without the admin API would make every start wait for a timeout.
    let meta = admin.inner().fetch_metadata(None, Duration::from_secs(10)).map_err(|e| anyhow::anyhow!("reading cluster metadata from {}: {e}", kafka.bootstrap_servers))?;
    let existing: std::collections::HashSet<&str> = meta.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name()).collect();
    let new: Vec<NewTopic> = topics
        .iter()
        .filter(|(name, _)| !existing.contains(name.as_str()))
        .map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(-1)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(10)));
    match admin.create_topics(&new, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(name) => tracing::info!(topic = %name, "created internal topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => tracing::warn!(topic = %name, error = %code, "could not create internal topic; it will be auto-created on first use"),
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not create internal topics; they will be auto-created on first use"),
    }
    Ok(())
}
