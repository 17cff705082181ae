//! The Kafka binder of bindery, on rdkafka (librdkafka, built from source).
//!
//! - A destination is a topic; a group is a Kafka consumer group (`group.id`). A consumer
//!   without a group gets a group of its own, `anonymous.<id>`, starting at the latest offset.
//! - At-least-once: offsets are stored (`enable.auto.offset.store = false`) only for messages
//!   whose handling finished, in order per partition: never past a message still in flight or
//!   waiting to be redelivered. librdkafka commits stored offsets periodically, when partitions
//!   are revoked, and on close; never for partitions that were lost.
//! - A dedicated thread polls the consumer all the time, pausing the assigned partitions while
//!   the application is busy, so slow handlers and retries never exceed
//!   `max.poll.interval.ms`.
//! - Producers use `acks=all` and idempotence, and a send returns once the broker confirmed it.
//!
//! Retries and dead-lettering are decided by the core; this crate only talks to Kafka.

mod binder;
mod settings;

pub use binder::KafkaBinder;
pub use settings::{KafkaConsumerSettings, KafkaSettings, StartOffset};

use std::sync::Arc;

use bindery_core::binder::BrokerAddress;
use bindery_core::config::{ConfigNode, Problems};
use bindery_core::redact::redact_uri;
use bindery_core::{Binder, BinderProvider, BinderSettings};
use futures::future::BoxFuture;

/// What can go wrong talking to Kafka. Texts never contain secret settings.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// No broker answered.
    #[error("cannot reach the Kafka brokers `{brokers}` within {timeout:?}: {reason}; check `stream.binders.<name>.brokers`")]
    Unreachable {
        /// The brokers tried.
        brokers: String,
        /// The limit.
        timeout: std::time::Duration,
        /// librdkafka's reason.
        reason: String,
    },
    /// librdkafka refused the client configuration.
    #[error(
        "Kafka client configuration refused: {0}; check `stream.binders.<name>.configuration`"
    )]
    Config(String),
    /// A topic is missing and may not be created, or could not be created.
    #[error("topic `{topic}`: {reason}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The consumer did not get its partitions in time.
    #[error("consumer group `{group}` on topic `{topic}` got no partition assignment within {timeout:?}; is the broker's group coordinator up?")]
    Assignment {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// The broker did not confirm a message.
    #[error("Kafka did not confirm the message for topic `{topic}`: {reason}")]
    Send {
        /// The topic.
        topic: String,
        /// librdkafka's reason.
        reason: String,
    },
    /// Any other client failure.
    #[error("Kafka: {0}")]
    Client(String),
}

/// Creates [`KafkaBinder`]s for `type = "kafka"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct KafkaBinderProvider;

impl BinderProvider for KafkaBinderProvider {
    fn partitions_match_instances(&self) -> bool {
        false
    }

    fn binder_type(&self) -> &'static str {
        "kafka"
    }

    fn validate(&self, settings: &BinderSettings, problems: &mut Problems) {
        KafkaSettings::read(settings.node.as_ref(), problems);
    }

    fn validate_consumer(&self, node: &ConfigNode, problems: &mut Problems) {
        KafkaConsumerSettings::read(Some(node), problems);
    }

    /// The first of `brokers`; `kafka-secure` when `security.protocol` uses TLS.
    fn address(&self, settings: &BinderSettings) -> Option<BrokerAddress> {
        let kafka = KafkaSettings::read(settings.node.as_ref(), &mut Problems::default());
        let first = kafka
            .brokers
            .split(',')
            .map(str::trim)
            .find(|b| !b.is_empty())?;
        let secure = kafka
            .configuration
            .get("security.protocol")
            .is_some_and(|protocol| protocol.to_ascii_uppercase().contains("SSL"));
        let protocol = match secure {
            true => "kafka-secure",
            false => "kafka",
        };
        Some(BrokerAddress::new(protocol, redact_uri(first)))
    }

    fn create(
        &self,
        settings: BinderSettings,
    ) -> BoxFuture<'static, Result<Arc<dyn Binder>, bindery_core::Error>> {
        Box::pin(async move {
            let mut problems = Problems::default();
            let kafka = KafkaSettings::read(settings.node.as_ref(), &mut problems);
            let binder = KafkaBinder::connect(&settings.name, kafka).await?;
            Ok(Arc::new(binder) as Arc<dyn Binder>)
        })
    }
}
