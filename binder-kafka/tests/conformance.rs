//! The binder conformance suite against a real Kafka-protocol broker (`KAFKA_BROKERS`,
//! default `127.0.0.1:9092`).

use std::sync::Arc;
use std::time::Duration;

use bindery_core::conformance::Suite;
use bindery_core::testing::require_broker;
use bindery_core::Binder;
use bindery_kafka::{KafkaBinder, KafkaSettings, StartOffset};

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// A binder whose topics have `partitions` partitions. Every case uses topics of its own, so
/// starting at the earliest offset sees exactly what the case sends (and does not depend on the
/// broker's latest-offset lookup).
async fn binder(partitions: i32) -> Result<Arc<dyn Binder>, bindery_core::Error> {
    let settings = KafkaSettings {
        brokers: brokers(),
        start_offset: Some(StartOffset::Earliest),
        min_partition_count: partitions,
        ..KafkaSettings::default()
    };
    Ok(Arc::new(KafkaBinder::connect("kafka", settings).await?) as Arc<dyn Binder>)
}

fn suite() -> Suite {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
        .try_init();
    Suite::new(|| binder(1))
        // A partition belongs to one member of a group: two members share only two or more.
        .sharing_binder(|| binder(2))
        .timeout(Duration::from_secs(30))
        .quiet_period(Duration::from_secs(1))
        .enabled(require_broker(
            "Kafka",
            brokers().split(',').next().unwrap_or_default(),
        ))
}

bindery_core::conformance_tests!(suite());
