//! Internal topics: created through the admin API when missing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// Creates `topics` (name, partitions) if they do not exist. A broker that cannot create
/// topics (librdkafka's mock cluster has no CreateTopics) is logged, not fatal: the topics
/// are then auto-created on first produce.
pub async fn ensure(kafka: &KafkaConfig, topics: &[(String, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        super::client_config(kafka, &[]).create().map_err(|e| anyhow::anyhow!("creating the admin client: {e}"))?;
    let new: Vec<NewTopic> = topics.iter().map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(-1))).collect();
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
