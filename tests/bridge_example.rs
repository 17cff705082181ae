//! The bridge example, with its two binders in memory, and with readings in from Kafka and out
//! to RabbitMQ: the one example binary, with nothing but environment variables differing.
//! Every reading reaches the desk of its site, once, through a destination the router chose
//! at run time.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{field, kafka_as, rabbitmq_as, run_id, wait_within, Deployment, Reaped};

/// Runs the example once, to its end, and checks that every reading reached the desk of its
/// site once, routed to its site's destination.
fn run_the_bridge(environment: Vec<(String, String)>, what: &str) {
    let deployment = Deployment::new("bridge", environment);
    let mut run = Reaped(deployment.spawn("bridge", &[]));
    let status = wait_within(&mut run.0, Duration::from_secs(240), "the bridge example");
    let mut sites: BTreeMap<u64, String> = BTreeMap::new();
    let mut desks: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut routed: BTreeMap<u64, String> = BTreeMap::new();
    let mut summary = false;
    while let Some(line) = deployment.next_line(Instant::now() + Duration::from_secs(1)) {
        let text = &line.text;
        let reading = field(text, "reading").and_then(|n| n.parse::<u64>().ok());
        let service = text.split_whitespace().next().unwrap_or_default();
        match (service, reading) {
            ("sensor", Some(id)) => {
                sites.insert(id, field(text, "site").unwrap_or_default().to_owned());
            }
            ("route", Some(id)) => {
                routed.insert(id, field(text, "to").unwrap_or_default().to_owned());
            }
            ("north" | "south", Some(id)) => desks.entry(id).or_default().push(service.into()),
            _ => summary |= text.starts_with("summary:"),
        }
    }
    assert!(status.success(), "{what}: the example failed");
    assert!(summary, "{what}: the example prints its summary");
    assert_eq!(sites.len(), 12, "{what}: the sensor sends twelve readings");
    for (id, site) in &sites {
        assert_eq!(
            desks.get(id),
            Some(&vec![site.clone()]),
            "{what}: reading {id} reaches the {site} desk, once"
        );
        let to = routed.get(id).map(String::as_str).unwrap_or_default();
        assert!(
            to.ends_with(&format!(".{site}")),
            "{what}: reading {id} was routed to `{to}`, the destination of its site"
        );
    }
}

#[test]
fn the_bridge_example_runs_with_both_binders_in_memory() {
    run_the_bridge(vec![], "memory");
}

#[test]
fn the_bridge_example_takes_readings_from_kafka_to_rabbitmq() {
    let (Some(kafka), Some(rabbit)) = (kafka_as("INCOMING"), rabbitmq_as("OUTGOING")) else {
        return;
    };
    let kafka_brokers = kafka.1.clone();
    let run = run_id();
    let readings = format!("readings-bridge-{run}");
    let readings_topic = readings.clone();
    let sites = format!("sites-bridge-{run}");
    let binding = |name: &str, key: &str, value: String| {
        (format!("BINDERY_STREAM__BINDINGS__{name}__{key}"), value)
    };
    let environment = vec![
        kafka,
        rabbit,
        ("BINDERY_PROFILE".into(), "kafka,rabbit".into()),
        binding("SENSOR_OUT_0", "DESTINATION", readings.clone()),
        binding("ROUTE_IN_0", "DESTINATION", readings),
        // A Kafka group spans topics: this run's own.
        binding("ROUTE_IN_0", "GROUP", format!("router-{run}")),
        (
            "BINDERY_BRIDGE__SITE_DESTINATION".into(),
            format!("{sites}.{{site}}"),
        ),
        binding("NORTH_IN_0", "DESTINATION", format!("{sites}.north")),
        binding("SOUTH_IN_0", "DESTINATION", format!("{sites}.south")),
        ("RUST_LOG".into(), "warn,bindery_core::runtime=info".into()),
    ];
    run_the_bridge(environment, "kafka to rabbit");
    // The readings went through Kafka: its topic holds all twelve.
    let brokers = kafka_brokers.clone();
    let on_kafka = tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(records_on_kafka(brokers, readings_topic));
    assert_eq!(on_kafka, 12, "the sensor's readings are on the Kafka topic");
}

/// How many records `topic` holds (up to twelve), read from the start by a group of its own.
async fn records_on_kafka(brokers: String, topic: String) -> usize {
    use bindery::binder::{Binder, ConsumerSpec};
    use bindery::kafka::{KafkaBinder, KafkaSettings, StartOffset};
    let settings = KafkaSettings {
        brokers,
        start_offset: Some(StartOffset::Earliest),
        ..KafkaSettings::default()
    };
    let binder = KafkaBinder::connect("check", settings)
        .await
        .expect("connect to Kafka");
    let group = format!("check-{}", run_id());
    let mut subscription = binder
        .subscribe(&ConsumerSpec::new(topic, Some(&group)))
        .await
        .expect("subscribe");
    // Group joins on a small broker can take tens of seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut records = 0;
    while records < 12 {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(Ok(delivery))) => {
                records += 1;
                delivery.acknowledgement.ack().await.expect("ack");
            }
            _ => break,
        }
    }
    binder.close().await.ok();
    records
}
