//! Records from an outside Kafka client that bindery's own producer would never make: Python's
//! `kafka-python` (installed once, with pip, into `~/.cache/bindery/python`) sends a record
//! with a header whose name is not UTF-8, as Go and C producers can (the broker does not check
//! header names).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bindery::binder::{ConsumerSpec, ProducerSpec};
use bindery::kafka::{KafkaBinder, KafkaSettings, StartOffset};
use bindery::test::require_broker;
use bindery::Binder;

mod support;
use support::{python_package, wait_within};

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Sends to `topic` one record, payload `body`, with the headers `kept: yes` and one named by
/// the bytes `ff 78` (not UTF-8), with kafka-python.
fn send_with_a_header_name_not_utf8(pythonpath: &Path, topic: &str) {
    let script = r#"
import sys
from kafka import KafkaProducer

class NotUtf8(str):
    """A header name kafka-python writes as the bytes ff 78."""
    def encode(self, *args, **kwargs):
        return b"\xffx"

brokers, topic = sys.argv[1], sys.argv[2]
producer = KafkaProducer(bootstrap_servers=brokers, acks="all", api_version=(2, 0))
sent = producer.send(topic, key=b"k", value=b"body", headers=[("kept", b"yes"), (NotUtf8("x"), b"v")])
sent.get(timeout=60)
producer.close(timeout=30)
"#;
    let mut python = Command::new("python3")
        // Optimised: kafka-python asserts that header names are exactly `str`.
        .args(["-O", "-c", script, &brokers(), topic])
        .env("PYTHONPATH", pythonpath)
        .stdout(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let status = wait_within(
        &mut python,
        Duration::from_secs(120),
        "the kafka-python producer",
    );
    assert!(status.success(), "kafka-python could not send");
}

/// rdkafka's reading of headers panics on a name that is not UTF-8: unread, such a record
/// ended the subscription at that record on every start. The header is left out and the
/// record delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_a_header_name_that_is_not_utf8_is_delivered() {
    if !require_broker("Kafka", brokers().split(',').next().unwrap_or_default()) {
        return;
    }
    let Some(pythonpath) = python_package("kafka-python==2.0.6", "kafka", "THE HEADER NAME TEST")
    else {
        return;
    };
    let settings = KafkaSettings {
        brokers: brokers(),
        start_offset: Some(StartOffset::Earliest),
        ..KafkaSettings::default()
    };
    let binder = KafkaBinder::connect("kafka", settings)
        .await
        .expect("connect");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let topic = format!("header-name-{id}");
    // Creates the topic.
    binder
        .producer(&ProducerSpec::new(topic.clone()))
        .await
        .expect("producer");
    let sending = {
        let (pythonpath, topic) = (pythonpath.clone(), topic.clone());
        tokio::task::spawn_blocking(move || send_with_a_header_name_not_utf8(&pythonpath, &topic))
    };
    sending.await.expect("the sender ran");
    let mut subscription = binder
        .subscribe(&ConsumerSpec::new(
            topic.clone(),
            Some(&format!("reader-{id}")),
        ))
        .await
        .expect("subscribe");
    // A new group's join can take Tansu tens of seconds.
    let delivery = match tokio::time::timeout(Duration::from_secs(120), subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(error))) => panic!("receiving failed: {error}"),
        Ok(None) => panic!("the subscription ended at the record"),
        Err(_) => panic!("the record did not come within 120 s"),
    };
    assert_eq!(delivery.message.payload().as_ref(), b"body");
    let headers = delivery.message.headers();
    assert_eq!(headers.get_str("kept"), Some("yes"));
    assert!(
        headers.iter().all(|(name, _)| !name.ends_with('x')),
        "the header that cannot be read is left out"
    );
    delivery.acknowledgement.ack().await.expect("ack");
    subscription.close().await.expect("close");
}
