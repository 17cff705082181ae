//! Kafka-specific behaviour against a real Kafka-protocol broker: provisioning, connection
//! errors, and slow handlers that must not get the consumer thrown out of its group.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bindery_core::testing::{isolated, require_broker};
use bindery_core::{
    Application, Binder, ConsumerSpec, Message, ProducerSpec, StreamFunction, TryEnqueue,
};
use bindery_kafka::{KafkaBinder, KafkaBinderProvider, KafkaSettings, StartOffset};
use bytes::Bytes;
use tokio::time::Instant;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn available() -> bool {
    require_broker("Kafka", brokers().split(',').next().unwrap_or_default())
}

fn unique(name: &str) -> String {
    format!(
        "kafka-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A producer for `topic` on a binder of its own, as another service sending to it would be.
async fn producer_for(topic: &str) -> Arc<dyn bindery_core::Producer> {
    KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect")
        .producer(&ProducerSpec::new(topic))
        .await
        .expect("producer")
}

fn settings() -> KafkaSettings {
    KafkaSettings {
        brokers: brokers(),
        start_offset: Some(StartOffset::Earliest),
        ..KafkaSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_a_missing_topic_is_a_clear_startup_error() {
    if !available() {
        return;
    }
    let binder = KafkaBinder::connect(
        "kafka",
        KafkaSettings {
            auto_create_topics: false,
            ..settings()
        },
    )
    .await
    .expect("connect");
    let topic = unique("missing");
    let error = binder
        .subscribe(&ConsumerSpec::new(topic.clone(), Some(&unique("g"))))
        .await
        .expect_err("the topic does not exist");
    let text = error.to_string();
    assert!(text.contains(&format!("topic `{topic}`")), "{text}");
    assert!(text.contains("auto-create-topics"), "{text}");
    // Looking the topic up did not create it: this bites on brokers that create topics they
    // are asked about (Apache Kafka's default), not on one that never does (Tansu).
    let topic_for_lookup = topic.clone();
    let listed = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("a client");
        consumer
            .fetch_metadata(Some(&topic_for_lookup), Duration::from_secs(10))
            .expect("metadata")
            .topics()
            .iter()
            .any(|t| t.name() == topic_for_lookup && t.error().is_none())
    })
    .await
    .expect("the lookup ran");
    assert!(!listed, "the missing topic {topic} was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_create_topics_are_created_and_usable() {
    if !available() {
        return;
    }
    let binder = KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect");
    let topic = unique("created");
    let producer = binder
        .producer(&ProducerSpec::new(topic.clone()))
        .await
        .expect("the topic is created");
    let mut subscription = binder
        .subscribe(&ConsumerSpec::new(topic.clone(), Some(&unique("g"))))
        .await
        .expect("subscribe");
    producer
        .send(Message::new(Bytes::from_static(b"hello")))
        .await
        .expect("send");
    let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("ok");
    assert_eq!(&delivery.message.payload()[..], b"hello");
    delivery.acknowledgement.ack().await.unwrap();
}

/// Brokers written with credentials, as some URLs are, name the brokers but never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_error_never_shows_a_password_written_in_the_brokers() {
    let error = KafkaBinder::connect(
        "kafka",
        KafkaSettings {
            brokers: "PLAINTEXT://app:s3cret@127.0.0.1:1".to_owned(),
            connection_timeout: Duration::from_secs(2),
            ..KafkaSettings::default()
        },
    )
    .await
    .expect_err("nothing listens on port 1");
    let text = error.to_string();
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_an_error_within_the_timeout_naming_the_brokers() {
    let begun = Instant::now();
    let error = KafkaBinder::connect(
        "kafka",
        KafkaSettings {
            brokers: "127.0.0.1:1".to_owned(),
            connection_timeout: Duration::from_secs(2),
            ..KafkaSettings::default()
        },
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(
        begun.elapsed() < Duration::from_secs(10),
        "bounded by connection-timeout"
    );
    assert!(error.to_string().contains("127.0.0.1:1"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_max_poll_interval_keeps_its_group_membership() {
    if !available() {
        return;
    }
    let input = unique("slow");
    let group = unique("slow-group");
    let handled: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let counts = handled.clone();
    let slow = StreamFunction::consumer("slow", move |text: String| {
        let counts = counts.clone();
        async move {
            if text == "slow" {
                // Longer than max.poll.interval.ms below.
                tokio::time::sleep(Duration::from_secs(9)).await;
            }
            *counts.lock().unwrap().entry(text).or_default() += 1;
        }
    });
    let toml = format!(
        r#"[stream]
default-binder = "kafka"
[stream.binders.kafka]
brokers = "{brokers}"
start-offset = "earliest"
configuration."max.poll.interval.ms" = "6000"
configuration."session.timeout.ms" = "6000"
[stream.bindings.slow-in-0]
destination = "{input}"
group = "{group}"
"#,
        brokers = brokers()
    );
    let app = kafka_app(slow, &toml).start().await.expect("start");
    let producer = producer_for(&input).await;
    for text in ["slow", "after-1", "after-2"] {
        producer
            .send(Message::new(Bytes::from(text)))
            .await
            .expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "not all handled: {:?}",
            handled.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A consumer thrown out of its group would see the slow message again after rejoining.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.shutdown().await.expect("shutdown");
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled.get("slow"),
        Some(&1),
        "handled once, never redelivered: {handled:?}"
    );
    assert_eq!(handled.get("after-1"), Some(&1));
    assert_eq!(handled.get("after-2"), Some(&1));
}

/// An application of `function` alone on the Kafka binder, configured by `toml`.
fn kafka_app(function: StreamFunction, toml: &str) -> Application {
    isolated(function, toml)
        .binder_provider(KafkaBinderProvider)
        .build()
        .expect("valid")
}

fn forwarding_app(input: &str, output: &str, group: &str) -> Application {
    let forward = StreamFunction::function("forward", |message: Message| async move { message });
    let toml = format!(
        r#"[stream]
default-binder = "kafka"
[stream.binders.kafka]
brokers = "{brokers}"
start-offset = "earliest"
min-partition-count = 2
[stream.bindings.forward-in-0]
destination = "{input}"
group = "{group}"
consumer.concurrency = 2
[stream.bindings.forward-out-0]
destination = "{output}"
"#,
        brokers = brokers()
    );
    kafka_app(forward, &toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_between_two_consumers_of_a_group_loses_nothing() {
    if !available() {
        return;
    }
    let input = unique("rebalance-in");
    let group = unique("rebalancing");
    let output = unique("rebalance-out");
    let binder = KafkaBinder::connect(
        "kafka",
        KafkaSettings {
            min_partition_count: 2,
            ..settings()
        },
    )
    .await
    .expect("connect");
    let mut results = binder
        .subscribe(&ConsumerSpec::new(output.clone(), Some(&unique("results"))))
        .await
        .expect("subscribe");
    let producer = binder
        .producer(&ProducerSpec::new(input.clone()))
        .await
        .expect("producer");
    let send = |from: usize| {
        let producer = producer.clone();
        async move {
            for n in from..from + 30 {
                let message = Message::builder(Bytes::from(format!("m{n:03}")))
                    .key(format!("k{}", n % 7))
                    .build();
                producer.send(message).await.expect("send");
            }
        }
    };

    let first = forwarding_app(&input, &output, &group)
        .start()
        .await
        .expect("first consumer");
    send(0).await;
    // A second consumer joins the group: partitions move between them.
    let second = forwarding_app(&input, &output, &group)
        .start()
        .await
        .expect("second consumer");
    send(30).await;
    // The first leaves: everything moves to the second.
    first.shutdown().await.expect("shutdown");
    send(60).await;

    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 90 {
        match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(Ok(delivery))) => {
                seen.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
                delivery.acknowledgement.ack().await.unwrap();
            }
            _ => panic!("only {} of 90 messages came through", seen.len()),
        }
    }
    second.shutdown().await.expect("shutdown");
    assert_eq!(seen.len(), 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_never_committed_past_an_unfinished_message() {
    if !available() {
        return;
    }
    let input = unique("ordered-commits");
    let group = unique("committers");
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = |handled: Arc<Mutex<Vec<String>>>, slow_takes: Duration| {
        let work = StreamFunction::consumer("work", move |text: String| {
            let handled = handled.clone();
            async move {
                if text == "slow" {
                    tokio::time::sleep(slow_takes).await;
                }
                handled.lock().unwrap().push(text);
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "kafka"
shutdown-timeout = "500ms"
[stream.binders.kafka]
brokers = "{brokers}"
start-offset = "earliest"
[stream.bindings.work-in-0]
destination = "{input}"
group = "{group}"
consumer.concurrency = 4
"#,
            brokers = brokers()
        );
        kafka_app(work, &toml)
    };

    let first = app(handled.clone(), Duration::from_secs(600))
        .start()
        .await
        .expect("start");
    let producer = producer_for(&input).await;
    // The first message never finishes; the ones after it (other keys, other workers) do.
    producer
        .send(
            Message::builder(Bytes::from_static(b"slow"))
                .key("a")
                .build(),
        )
        .await
        .expect("send");
    for (n, key) in ["b", "c", "d"].iter().enumerate() {
        let message = Message::builder(Bytes::from(format!("quick-{n}")))
            .key(*key)
            .build();
        producer.send(message).await.expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled.lock().unwrap().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the quick messages were not handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the poll thread time to store what it may (it must not store past "slow").
    tokio::time::sleep(Duration::from_millis(500)).await;
    first
        .shutdown()
        .await
        .expect("shutdown gives up on the slow message");
    assert!(!handled.lock().unwrap().contains(&"slow".to_owned()));

    let again: Arc<Mutex<Vec<String>>> = Arc::default();
    let second = app(again.clone(), Duration::ZERO)
        .start()
        .await
        .expect("restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !again.lock().unwrap().contains(&"slow".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "the unfinished message was not delivered again; the group committed past it: {:?}",
            again.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown().await.expect("shutdown");
}

/// An application forwarding `input` to `output` in group `group`, at default settings.
fn forwarder(input: &str, output: &str, group: &str) -> Application {
    let forward = StreamFunction::function("forward", |message: Message| async move { message });
    let toml = format!(
        r#"[stream]
default-binder = "kafka"
[stream.binders.kafka]
brokers = "{brokers}"
[stream.bindings.forward-in-0]
destination = "{input}"
group = "{group}"
[stream.bindings.forward-out-0]
destination = "{output}"
"#,
        brokers = brokers()
    );
    kafka_app(forward, &toml)
}

/// Sends `payloads` as another service would: pipelined, so librdkafka batches several
/// records together (multi-record batches, as real producers make).
async fn send_batched(topic: &str, payloads: impl Iterator<Item = String>) {
    let producer = producer_for(topic).await;
    let mut confirmations = Vec::new();
    for payload in payloads {
        let message = Message::new(Bytes::from(payload));
        confirmations.push(producer.enqueue(&message).await.expect("enqueue"));
    }
    for confirmation in futures::future::join_all(confirmations).await {
        confirmation.expect("confirmed");
    }
}

/// Reads `topic` in a group of its own until `n` distinct payloads came, then for `quiet`
/// more; returns how many records came in all and the distinct payloads.
async fn read_all(
    topic: &str,
    n: usize,
    quiet: Duration,
) -> (usize, std::collections::BTreeSet<String>) {
    let binder = KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect");
    let mut reader = binder
        .subscribe(&ConsumerSpec::new(topic, Some(&unique("reader"))))
        .await
        .expect("subscribe");
    let mut seen = std::collections::BTreeSet::new();
    let mut records = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let wait = if seen.len() < n {
            deadline
        } else {
            Instant::now() + quiet
        };
        match tokio::time::timeout_at(wait, reader.next()).await {
            Ok(Some(Ok(delivery))) => {
                records += 1;
                seen.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
                delivery.acknowledgement.ack().await.expect("ack");
            }
            _ if seen.len() >= n => break,
            _ => panic!("only {} of {n} records came", seen.len()),
        }
    }
    (records, seen)
}

/// The offset `group` committed for partition 0 of `topic`.
fn committed(topic: &str, group: &str) -> i64 {
    committed_pair(topic, group)[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_50000_drains_once_and_the_group_commits_the_end() {
    if !available() {
        return;
    }
    let (input, output, group) = (unique("backlog-in"), unique("backlog-out"), unique("g"));
    let count = 50_000;
    send_batched(&input, (0..count).map(|n| format!("order-{n:05}"))).await;
    let app = forwarder(&input, &output, &group)
        .start()
        .await
        .expect("start");
    let (records, seen) = read_all(&output, count, Duration::from_secs(2)).await;
    app.shutdown().await.expect("shutdown");
    assert_eq!(seen.len(), count, "every order forwarded");
    assert_eq!(records, count, "no order forwarded twice");
    assert_eq!(
        committed(&input, &group),
        count as i64,
        "the group committed the end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_acknowledged_is_not_delivered_again_after_a_restart() {
    if !available() {
        return;
    }
    let (input, output, group) = (unique("restart-in"), unique("restart-out"), unique("g"));
    send_batched(&input, (0..1_000).map(|n| format!("first-{n:04}"))).await;
    let app = forwarder(&input, &output, &group)
        .start()
        .await
        .expect("start");
    let (_, seen) = read_all(&output, 1_000, Duration::ZERO).await;
    assert_eq!(seen.len(), 1_000);
    app.shutdown().await.expect("shutdown");
    assert_eq!(committed(&input, &group), 1_000);

    // Started again, the group goes on after what it acknowledged: only the new order comes.
    let app = forwarder(&input, &output, &group)
        .start()
        .await
        .expect("restart");
    send_batched(&input, std::iter::once("second".to_owned())).await;
    let (records, seen) = read_all(&output, 1_001, Duration::from_secs(3)).await;
    app.shutdown().await.expect("shutdown");
    assert!(seen.contains("second"), "the restarted group consumes");
    assert_eq!(records, 1_001, "nothing acknowledged was delivered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_consumer_gets_what_is_sent_right_after_it_subscribed() {
    if !available() {
        return;
    }
    // Anonymous consumers start at the latest offset: once `subscribe` returns, that offset
    // must be resolved, or a message sent right then is skipped.
    let binder = KafkaBinder::connect(
        "kafka",
        KafkaSettings {
            brokers: brokers(),
            ..KafkaSettings::default()
        },
    )
    .await
    .expect("connect");
    let topic = unique("anonymous");
    let producer = binder
        .producer(&ProducerSpec::new(topic.clone()))
        .await
        .expect("producer");
    for round in 0..20 {
        let mut subscription = binder
            .subscribe(&ConsumerSpec::new(topic.clone(), None))
            .await
            .expect("subscribe");
        let sent = format!("round-{round:02}");
        producer
            .send(Message::new(Bytes::from(sent.clone())))
            .await
            .expect("send");
        let received = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: the message sent after subscribing never came")
            })
            .expect("a delivery")
            .expect("no error");
        assert_eq!(
            String::from_utf8_lossy(received.message.payload()),
            sent,
            "round {round}: only what was sent after subscribing"
        );
        received.acknowledgement.ack().await.expect("ack");
        subscription.close().await.expect("close");
    }
}

/// Where the partition and offset of a record sent without `x-message-id` can be read: the
/// binder names such records `<topic>-<partition>@<offset>`.
fn partition_and_offset(message: &Message) -> (i32, i64) {
    let id = message
        .headers()
        .get_str(bindery_core::header::MESSAGE_ID)
        .expect("an id");
    let (rest, offset) = id.rsplit_once('@').expect("topic-partition@offset");
    let (_, partition) = rest.rsplit_once('-').expect("topic-partition");
    (
        partition.parse().expect("partition"),
        offset.parse().expect("offset"),
    )
}

/// The offsets `group` committed for partitions 0 and 1 of `topic` (-1 where none).
fn committed_pair(topic: &str, group: &str) -> [i64; 2] {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut partitions = rdkafka::TopicPartitionList::new();
    partitions.add_partition(topic, 0);
    partitions.add_partition(topic, 1);
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .expect("committed offsets");
    [0, 1].map(
        |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(offset)) => offset,
            _ => -1,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_and_leaving_mid_stream_never_lets_the_group_commit_past_unhandled_work() {
    if !available() {
        return;
    }
    let (input, group) = (unique("joining"), unique("g"));
    type Handled = Arc<Mutex<std::collections::BTreeSet<(i32, i64)>>>;
    let handled: Handled = Arc::default();
    let app = |handled: Handled| {
        let work = StreamFunction::consumer("work", move |message: Message| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                handled
                    .lock()
                    .unwrap()
                    .insert(partition_and_offset(&message));
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "kafka"
shutdown-timeout = "5s"
[stream.binders.kafka]
brokers = "{brokers}"
min-partition-count = 2
[stream.bindings.work-in-0]
destination = "{input}"
group = "{group}"
consumer.concurrency = 2
"#,
            brokers = brokers()
        );
        kafka_app(work, &toml)
    };
    let first = app(handled.clone()).start().await.expect("first member");

    // An outside observer: whatever the group committed must have been handled already.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let observer = {
        let (input, group, handled, watching) = (
            input.clone(),
            group.clone(),
            handled.clone(),
            watching.clone(),
        );
        std::thread::spawn(move || {
            let mut checks = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let committed = committed_pair(&input, &group);
                let done = handled.lock().unwrap().clone();
                for (partition, &upto) in committed.iter().enumerate() {
                    for offset in 0..upto {
                        assert!(
                            done.contains(&(partition as i32, offset)),
                            "partition {partition} committed {upto} while offset {offset} was not handled"
                        );
                    }
                }
                checks += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            checks
        })
    };

    // One record per batch: a member taking over a partition fetches from the committed offset,
    // which Tansu 0.6.0 cannot serve from inside a multi-record batch.
    let producer = KafkaBinder::connect("kafka", {
        let mut s = settings();
        s.min_partition_count = 2;
        s.configuration
            .insert("batch.num.messages".to_owned(), "1".to_owned());
        s
    })
    .await
    .expect("connect")
    .producer(&ProducerSpec::new(input.clone()))
    .await
    .expect("producer");
    let total = 300;
    let wait_for = |count: usize| {
        let handled = handled.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while handled.lock().unwrap().len() < count {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {count} handled",
                    handled.lock().unwrap().len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for n in 0..total {
        let message = Message::builder(Bytes::from(format!("m{n}")))
            .key(format!("k{}", n % 11))
            .build();
        producer.send(message).await.expect("send");
    }
    wait_for(50).await;
    let second = app(handled.clone())
        .start()
        .await
        .expect("second member joins");
    wait_for(150).await;
    first.shutdown().await.expect("the first member leaves");
    wait_for(total).await;
    second.shutdown().await.expect("shutdown");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let checks = observer.join().expect("no commit passed unhandled work");
    assert!(checks > 0, "the observer looked");
}

const KILL_TEST: &str = "BINDERY_KAFKA_KILL_TEST";

/// Not a test of its own: the application process that
/// `a_sigkill_mid_backlog_loses_nothing` starts (with `BINDERY_KAFKA_KILL_TEST` set) and kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_sigkill_mid_backlog_loses_nothing, started by it"]
async fn sigkill_child() {
    let Ok(names) = std::env::var(KILL_TEST) else {
        return;
    };
    let names: Vec<&str> = names.split(',').collect();
    let slow = StreamFunction::function("forward", |message: Message| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        message
    });
    let toml = format!(
        r#"[stream]
default-binder = "kafka"
[stream.binders.kafka]
brokers = "{brokers}"
# The killed member leaves no goodbye: the group waits this long before handing its
# partitions to the restarted one.
configuration."session.timeout.ms" = "6000"
[stream.bindings.forward-in-0]
destination = "{input}"
group = "{group}"
[stream.bindings.forward-out-0]
destination = "{output}"
"#,
        brokers = brokers(),
        input = names[0],
        output = names[1],
        group = names[2],
    );
    let _app = kafka_app(slow, &toml).start().await.expect("start");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_backlog_loses_nothing() {
    if !available() {
        return;
    }
    let (input, output, group) = (unique("killed-in"), unique("killed-out"), unique("g"));
    // One record per batch: the restarted group fetches from its committed offset, which
    // Tansu 0.6.0 cannot serve from inside a multi-record batch.
    let mut one_per_batch = settings();
    one_per_batch
        .configuration
        .insert("batch.num.messages".to_owned(), "1".to_owned());
    let producer = KafkaBinder::connect("kafka", one_per_batch)
        .await
        .expect("connect")
        .producer(&ProducerSpec::new(input.clone()))
        .await
        .expect("producer");
    let total = 3_000;
    let mut confirmations = Vec::new();
    for n in 0..total {
        let message = Message::new(Bytes::from(format!("order-{n:04}")));
        confirmations.push(producer.enqueue(&message).await.expect("enqueue"));
    }
    for confirmation in futures::future::join_all(confirmations).await {
        confirmation.expect("confirmed");
    }
    let start_child = || {
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "sigkill_child", "--ignored", "--nocapture"])
            .env(KILL_TEST, format!("{input},{output},{group}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the application process")
    };
    let binder = KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect");
    let mut reader = binder
        .subscribe(&ConsumerSpec::new(output.clone(), Some(&unique("reader"))))
        .await
        .expect("subscribe");
    let mut seen = std::collections::BTreeSet::new();
    let mut child = start_child();
    read_until(&mut reader, &mut seen, 500).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let mut child = start_child();
    read_until(&mut reader, &mut seen, total).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert_eq!(seen.len(), total, "every order forwarded after the kill");
}

/// Reads `reader` until `seen` holds `count` distinct payloads.
async fn read_until(
    reader: &mut Box<dyn bindery_core::Subscription>,
    seen: &mut std::collections::BTreeSet<String>,
    count: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < count {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(delivery))) => {
                seen.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
                delivery.acknowledgement.ack().await.expect("ack");
            }
            _ => panic!("only {} of {count} orders forwarded", seen.len()),
        }
    }
}

async fn next_within_30s(
    subscription: &mut Box<dyn bindery_core::Subscription>,
) -> bindery_core::Delivery {
    match tokio::time::timeout(Duration::from_secs(30), subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        _ => panic!("no record within 30 s"),
    }
}

/// Instance `index` of two of a partitioned consumer group.
fn partitioned_instance(topic: &str, group: &str, index: u32) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(topic, Some(group));
    spec.properties.partitioned = true;
    spec.properties.instance_count = 2;
    spec.properties.instance_index = index;
    spec
}

/// A partitioned instance takes its partitions without joining the group's rebalances, yet
/// commits to its group: started again with the same index, it goes on after what it
/// acknowledged. Each record is sent once the one before was confirmed, so every record is a
/// batch of its own and the restart never fetches from inside a batch (which Tansu cannot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_instance_commits_to_its_group_and_resumes_there() {
    if !available() {
        return;
    }
    let (topic, group) = (unique("partitioned"), unique("counters"));
    let binder = KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect");
    let mut first = binder
        .subscribe(&partitioned_instance(&topic, &group, 1))
        .await
        .expect("subscribe");
    let mut spec = ProducerSpec::new(topic.clone());
    spec.properties.partition_count = 2;
    let producer = binder.producer(&spec).await.expect("producer");
    // Partition 0 belongs to the other instance: none of it may reach this one.
    for n in 0..10 {
        for partition in [0, 1] {
            let mut message = Message::new(Bytes::from(format!("record-{partition}-{n}")));
            message.set_partition(Some(partition));
            producer.send(message).await.expect("send");
        }
    }
    for n in 0..5 {
        let delivery = next_within_30s(&mut first).await;
        assert_eq!(partition_and_offset(&delivery.message), (1, n));
        delivery.acknowledgement.ack().await.expect("ack");
    }
    first.close().await.expect("close");
    assert_eq!(
        committed_pair(&topic, &group),
        [-1, 5],
        "the instance committed what it acknowledged, to its group"
    );

    let mut again = binder
        .subscribe(&partitioned_instance(&topic, &group, 1))
        .await
        .expect("subscribe again");
    let delivery = next_within_30s(&mut again).await;
    assert_eq!(
        String::from_utf8_lossy(delivery.message.payload()),
        "record-1-5",
        "the restarted instance goes on after what it acknowledged"
    );
    delivery.acknowledgement.ack().await.expect("ack");
    again.close().await.expect("close");
    binder.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_fewer_partitions_than_the_instances_is_a_clear_error() {
    if !available() {
        return;
    }
    let topic = unique("narrow");
    let binder = KafkaBinder::connect("kafka", settings())
        .await
        .expect("connect");
    // Created with one partition by a producer that is not partitioned.
    binder
        .producer(&ProducerSpec::new(topic.clone()))
        .await
        .expect("producer");
    let error = binder
        .subscribe(&partitioned_instance(&topic, &unique("counters"), 0))
        .await
        .expect_err("two instances cannot share one partition");
    let text = error.to_string();
    assert!(
        text.contains(&topic)
            && text.contains("has 1 partitions")
            && text.contains("instance-count"),
        "{text}"
    );
    binder.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_a_full_queue_turned_away_is_overtaken_by_none_taken_at_once() {
    if !available() {
        return;
    }
    // A queue of three records fills at once; the broker's answers free it again.
    let binder = KafkaBinder::connect("kafka", {
        let mut s = settings();
        s.configuration
            .insert("queue.buffering.max.messages".to_owned(), "3".to_owned());
        s
    })
    .await
    .expect("connect");
    let topic = unique("full-queue");
    let producer = binder
        .producer(&ProducerSpec::new(topic.clone()))
        .await
        .expect("producer");
    let count = 200;
    let record = |n: usize| Message::new(Bytes::from(format!("{n:03}")));
    let (mut confirmations, mut turned_away) = (Vec::new(), 0);
    let mut n = 0;
    while n < count {
        match producer.try_enqueue(record(n)) {
            TryEnqueue::Pending(confirmation, _) => confirmations.push(confirmation),
            TryEnqueue::NotNow(first) => {
                turned_away += 1;
                // Until the record turned away is enqueued, the next is not taken at once
                // either, though the queue has room again once what it held was confirmed.
                for confirmation in confirmations.drain(..) {
                    confirmation.await.expect("confirmed");
                }
                let mut waiting = vec![first];
                while n + 1 < count && turned_away < 20 {
                    match producer.try_enqueue(record(n + 1)) {
                        TryEnqueue::NotNow(next) => waiting.push(next),
                        other => panic!("record {} overtook {n}: {other:?}", n + 1),
                    }
                    n += 1;
                    if waiting.len() == 3 {
                        break;
                    }
                }
                for message in &waiting {
                    confirmations.push(producer.enqueue(message).await.expect("enqueue"));
                }
            }
            other => panic!("record {n}: {other:?}"),
        }
        n += 1;
    }
    assert!(turned_away > 0, "the queue was full at times");
    for confirmation in futures::future::join_all(confirmations).await {
        confirmation.expect("confirmed");
    }
    let mut reader = binder
        .subscribe(&ConsumerSpec::new(topic, Some(&unique("reader"))))
        .await
        .expect("subscribe");
    for n in 0..count {
        let delivery = tokio::time::timeout(Duration::from_secs(60), reader.next())
            .await
            .unwrap_or_else(|_| panic!("record {n} did not come"))
            .expect("open")
            .expect("ok");
        assert_eq!(
            String::from_utf8_lossy(delivery.message.payload()),
            format!("{n:03}"),
            "records arrive in the order they were handed over"
        );
        delivery.acknowledgement.ack().await.expect("ack");
    }
}
