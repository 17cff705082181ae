//! RabbitMQ-specific behaviour against a real server: topology, declaration conflicts,
//! publisher confirms, connection errors and recovery after the server drops connections.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bindery_core::testing::{host_port, isolated, require_broker};
use bindery_core::{Application, Binder, ConsumerSpec, Message, ProducerSpec, StreamFunction};
use bindery_rabbit::{RabbitBinder, RabbitBinderProvider};
use bytes::Bytes;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;

mod common;
use common::{close_connections_named, connections_named, uri};

fn available() -> bool {
    require_broker("RabbitMQ", &host_port(&uri(), 5672))
}

fn unique(name: &str) -> String {
    format!(
        "rabbit-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn raw_channel() -> Channel {
    let uri = uri();
    let connecting = Connection::connect(&uri, ConnectionProperties::default());
    let connection = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connected in time")
        .expect("connect");
    let channel = tokio::time::timeout(Duration::from_secs(30), connection.create_channel())
        .await
        .expect("channel opened in time")
        .expect("channel");
    // Keep the connection open for the channel's lifetime.
    std::mem::forget(connection);
    channel
}

fn passive_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

fn application(function: StreamFunction, toml: &str) -> Application {
    isolated(function, toml)
        .binder_provider(RabbitBinderProvider)
        .build()
        .expect("valid configuration")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_uses_spring_cloud_stream_names_and_arguments() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let destination = unique("topology");
        let received = Arc::new(tokio::sync::Notify::new());
        let seen = received.clone();
        let consume = StreamFunction::consumer("consume", move |_: Message| {
            let seen = seen.clone();
            async move { seen.notify_one() }
        });
        let toml = format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
type = "rabbit"
uri = "{uri}"
[stream.bindings.consume-in-0]
destination = "{destination}"
group = "billing"
consumer.dlq = true
[stream.rabbit.bindings.consume-in-0.consumer]
quorum = true
prefetch = 5
"#,
            uri = uri()
        );
        let app = application(consume, &toml).start().await.expect("start");
        let channel = raw_channel().await;
        let group_queue = format!("{destination}.billing");
        let dlq = format!("{group_queue}.dlq");

        channel
            .exchange_declare(
                destination.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the destination is a topic exchange");
        channel
            .exchange_declare(
                "DLX".into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the dead-letter exchange exists");
        channel
            .queue_declare(dlq.as_str().into(), passive_queue(), FieldTable::default())
            .await
            .expect("the DLQ exists");

        // Declaring the group queue again with exactly these arguments succeeds only if the broker
        // holds the same ones.
        let mut expected = FieldTable::default();
        expected.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("DLX".into()),
        );
        expected.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(group_queue.as_str().into()),
        );
        expected.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                group_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                expected,
            )
            .await
            .expect("the group queue is durable, quorum, and dead-letters to DLX");

        // Bound with `#`: any routing key reaches the group.
        channel
            .basic_publish(
                destination.as_str().into(),
                "any.key.at.all".into(),
                BasicPublishOptions::default(),
                b"hello",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        tokio::time::timeout(Duration::from_secs(10), received.notified())
            .await
            .expect("a message with any routing key reaches the group");
        app.shutdown().await.expect("shutdown");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_declaration_names_the_queue_and_the_argument() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let destination = unique("conflict");
        let queue = format!("{destination}.billing");
        let channel = raw_channel().await;
        let mut limited = FieldTable::default();
        limited.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                limited,
            )
            .await
            .expect("declare");
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let error = binder
            .subscribe(&ConsumerSpec::new(destination.clone(), Some("billing")))
            .await
            .expect_err("the existing queue has other arguments");
        let text = error.to_string();
        assert!(text.contains(&format!("queue `{queue}`")), "{text}");
        assert!(text.contains("x-max-length"), "{text}");
        binder.close().await.ok();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_a_missing_exchange_without_provisioning_fails_clearly() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let mut settings = bindery_rabbit::RabbitSettings {
            uri: uri(),
            ..Default::default()
        };
        settings.provision = false;
        let binder = RabbitBinder::connect("rabbit", settings)
            .await
            .expect("connect");
        let destination = unique("missing");
        let producer = binder
            .producer(&ProducerSpec::new(destination.clone()))
            .await
            .expect("producer");
        let error = producer
            .send(Message::new(Bytes::from_static(b"lost?")))
            .await
            .expect_err("no exchange to take it");
        let text = error.to_string();
        assert!(
            text.contains(&format!("exchange `{destination}`")),
            "{text}"
        );
        assert!(
            text.contains("NOT_FOUND") || text.contains("no exchange"),
            "{text}"
        );
        binder.close().await.ok();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_message_is_a_failure_not_a_silent_loss() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let producer = binder
            .producer(&ProducerSpec::new(unique("nobody")))
            .await
            .expect("producer");
        let error = producer
            .send(Message::new(Bytes::from_static(b"anyone?")))
            .await
            .expect_err("no queue is bound");
        assert!(error.to_string().contains("no queue is bound"), "{error}");
        binder.close().await.ok();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error_that_never_shows_the_password() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let wrong = uri().replacen("guest:guest@", "guest:not-the-password@", 1);
        let begun = Instant::now();
        let error = RabbitBinder::connect_uri(&wrong)
            .await
            .expect_err("wrong password");
        let text = format!("{error} {error:?}");
        assert!(
            begun.elapsed() < Duration::from_secs(15),
            "the error comes within the connection timeout"
        );
        assert!(
            text.contains(&host_port(&uri(), 5672)),
            "the host is named: {text}"
        );
        assert!(
            !text.contains("not-the-password"),
            "the password leaked: {text}"
        );
        assert!(text.contains("user, password"), "{text}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_an_error_within_the_timeout() {
    common::within_test_deadline(async {
        // A space in a password is not escaped by everyone who writes one.
        for (uri, password) in [
            ("amqp://guest:secret@127.0.0.1:1/%2f", "secret"),
            ("amqp://guest:my secret@127.0.0.1:1/%2f", "my secret"),
        ] {
            let begun = Instant::now();
            let error = RabbitBinder::connect_uri(uri)
                .await
                .expect_err("nothing listens on port 1");
            let text = error.to_string();
            assert!(begun.elapsed() < Duration::from_secs(15));
            assert!(text.contains("127.0.0.1:1"), "{text}");
            assert!(!text.contains(password), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_processed_when_the_server_closes_the_connections() {
    common::within_test_deadline(async {
        if !available() || !common::can_control_server() {
            return;
        }
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("bindery=info,bindery_core=info,bindery_rabbit=info,warn")
            .try_init();
        let input = unique("recover-in");
        let output = unique("recover-out");
        // Messages from m020 on wait until the connections were closed, so that the producer has
        // sends to make after its connection was closed under it.
        let (connections_closed, closed_signal) = tokio::sync::watch::channel(false);
        let forward = StreamFunction::function("forward", move |message: Message| {
            let mut closed_signal = closed_signal.clone();
            async move {
                if message.payload().as_ref() >= b"m020".as_slice() {
                    let _ = closed_signal.wait_for(|closed| *closed).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                message
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "recovering"
[stream.binders.recovering]
type = "rabbit"
uri = "{uri}"
recovery-interval = "1s"
[stream.bindings.forward-in-0]
destination = "{input}"
group = "workers"
consumer.max-attempts = 20
consumer.back-off-initial-interval = "100ms"
consumer.back-off-max-interval = "1s"
[stream.bindings.forward-out-0]
destination = "{output}"
"#,
            uri = uri()
        );
        let collector = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let mut results = collector
            .subscribe(&ConsumerSpec::new(output.clone(), Some("results")))
            .await
            .expect("subscribe");
        let app = application(forward, &toml).start().await.expect("start");
        let sender = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let producer = sender
            .producer(&ProducerSpec::new(input.clone()))
            .await
            .expect("producer");
        let total = 100;
        for n in 0..total {
            producer
                .send(Message::new(Bytes::from(format!("m{n:03}"))))
                .await
                .expect("send");
        }

        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut closed = BTreeSet::new();
        while seen.len() < total {
            let next = tokio::time::timeout_at(deadline, results.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                panic!(
                    "only {} of {total} messages came through: {:?}",
                    seen.len(),
                    seen
                );
            };
            seen.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
            let _ = delivery.acknowledgement.ack().await;
            if closed.is_empty() && seen.len() >= 10 {
                // The application's consuming and publishing connections, with sends in flight.
                closed = close_connections_named("bindery recovering").await;
                assert_eq!(
                    closed.len(),
                    2,
                    "the application has a consuming and a publishing connection"
                );
                connections_closed.send_replace(true);
            }
        }
        assert_eq!(seen.len(), total);
        // Both connections were opened again: new ones, under the same names.
        let mut reopened = connections_named("bindery recovering").await;
        while reopened.len() != 2 || !reopened.is_disjoint(&closed) {
            assert!(
                Instant::now() < deadline,
                "not reconnected: closed {closed:?}, open {reopened:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            reopened = connections_named("bindery recovering").await;
        }
        app.shutdown().await.expect("shutdown");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_header_names_too_long_for_amqp_never_panic() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let destination = unique("long");
        let mut subscription = binder
            .subscribe(&ConsumerSpec::new(destination.clone(), Some("g")))
            .await
            .expect("subscribe");
        let producer = binder
            .producer(&ProducerSpec::new(destination.clone()))
            .await
            .expect("producer");
        // A 300-byte key cannot be the routing key: it travels in a header and comes back.
        let key = "k".repeat(300);
        producer
            .send(
                Message::builder(Bytes::from_static(b"long key"))
                    .key(&key)
                    .build(),
            )
            .await
            .expect("a long key is sent");
        let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("in time")
            .expect("a delivery")
            .expect("no error");
        assert_eq!(delivery.message.key_str(), Some(key.as_str()));
        delivery.acknowledgement.ack().await.expect("ack");
        // A 300-byte header name cannot travel at all: a clear, permanent error.
        let error = producer
            .send(
                Message::builder(Bytes::from_static(b"long header"))
                    .header("h".repeat(300), "value")
                    .build(),
            )
            .await
            .expect_err("a header name over 255 bytes is refused");
        assert!(error.is_permanent(), "{error}");
        assert!(error.to_string().contains("header name"), "{error}");
        // A destination whose names exceed 255 bytes is a startup error, not a panic.
        let error = binder
            .subscribe(&ConsumerSpec::new("d".repeat(300), Some("g")))
            .await
            .expect_err("a 300-byte exchange name is refused");
        assert!(error.to_string().contains("at most 255"), "{error}");
        // A partitioned destination whose name fits but whose partitions' routing keys
        // (`<destination>-<partition>`) do not is refused as well.
        let name = format!("{destination}-{}", "p".repeat(254 - destination.len() - 1));
        assert_eq!(name.len(), 254, "a name RabbitMQ takes");
        let mut partitioned = ProducerSpec::new(name);
        partitioned.properties.partition_count = 2;
        let error = binder
            .producer(&partitioned)
            .await
            .expect_err("a partition routing key over 255 bytes is refused");
        assert!(error.to_string().contains("at most 255"), "{error}");
        binder.close().await.ok();
    })
    .await
}

/// What became of 300 sends in flight together on one producer's channel, every third
/// unroutable (`lost.<n>`; only `kept.*` is bound), each with the `message_id` that `id` gives
/// its number: each send's number, label and outcome, and how many messages the bound queue
/// received.
async fn mixed_sends(
    name: &str,
    id: impl Fn(usize) -> String,
) -> (
    Vec<(usize, &'static str, Result<(), bindery_core::Error>)>,
    u32,
) {
    let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
    let destination = unique(name);
    let producer = binder
        .producer(&ProducerSpec::new(destination.clone()))
        .await
        .expect("producer");
    let queue = format!("{destination}.kept");
    let channel = raw_channel().await;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            destination.as_str().into(),
            "kept.*".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut confirmations = Vec::new();
    for n in 0..300 {
        let label = if n % 3 == 0 { "lost" } else { "kept" };
        let message = Message::builder(Bytes::from(format!("{label}-{n:03}")))
            .header(bindery_core::header::MESSAGE_ID, id(n))
            .key(format!("{label}.{n}"))
            .build();
        confirmations.push((n, label, producer.enqueue(&message).await.expect("enqueue")));
    }
    let mut outcomes = Vec::new();
    for (n, label, confirmation) in confirmations {
        outcomes.push((n, label, confirmation.await));
    }
    let depth = channel
        .queue_declare(
            queue.as_str().into(),
            passive_queue(),
            FieldTable::default(),
        )
        .await
        .expect("the queue")
        .message_count();
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    binder.close().await.ok();
    (outcomes, depth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routable_and_unroutable_sends_in_flight_together_are_told_apart() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let (outcomes, depth) = mixed_sends("mixed", |n| format!("id-{n:03}")).await;
        let mut kept = 0;
        for (n, label, outcome) in outcomes {
            match (label, outcome) {
                ("kept", Ok(())) => kept += 1,
                ("lost", Err(error)) => assert!(error.to_string().contains("no queue is bound")),
                (label, outcome) => panic!("`{label}` send {n} ended {outcome:?}"),
            }
        }
        assert_eq!(kept, 200);
        assert_eq!(depth, 200, "every routable send delivered exactly once");
    })
    .await
}

/// Messages that share a `message_id` (a handler that hands on its input's headers to several
/// outputs, say) cannot be told apart by their returns: a return may be put down to any of
/// them, so each is sent again rather than one lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_send_sharing_its_id_with_routable_ones_is_never_confirmed() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let (outcomes, depth) = mixed_sends("same-id", |_| "one-id-for-all".to_owned()).await;
        let mut returned = 0;
        for (n, label, outcome) in outcomes {
            match (label, outcome) {
                ("lost", Ok(())) => panic!("unroutable send {n} was confirmed: it would be lost"),
                (_, Err(error)) => {
                    assert!(error.to_string().contains("no queue is bound"), "{error}");
                    returned += 1;
                }
                ("kept", Ok(())) => {}
                (label, outcome) => panic!("`{label}` send {n} ended {outcome:?}"),
            }
        }
        assert!(returned >= 100, "every unroutable send is a failure");
        assert_eq!(depth, 200, "every routable send was routed once");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_50000_drains_once_and_in_order_within_each_key() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let (input, output) = (unique("backlog-in"), unique("backlog-out"));
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let mut results = binder
            .subscribe(&ConsumerSpec::new(output.clone(), Some("results")))
            .await
            .expect("subscribe");
        let mut spec = ProducerSpec::new(input.clone());
        spec.properties.required_groups = vec!["forwarders".to_owned()];
        let producer = binder.producer(&spec).await.expect("producer");
        let count = 50_000;
        let mut confirmations = Vec::with_capacity(count);
        for n in 0..count {
            let key = format!("key-{}", n % 10);
            let message = Message::builder(Bytes::from(format!("{key}:{n:05}")))
                .key(key)
                .build();
            confirmations.push(producer.enqueue(&message).await.expect("enqueue"));
        }
        for confirmation in futures::future::join_all(confirmations).await {
            confirmation.expect("confirmed");
        }
        let forward =
            StreamFunction::function("forward", |message: Message| async move { message });
        let toml = format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
uri = "{uri}"
[stream.bindings.forward-in-0]
destination = "{input}"
group = "forwarders"
[stream.bindings.forward-out-0]
destination = "{output}"
"#,
            uri = uri()
        );
        let app = application(forward, &toml).start().await.expect("start");
        let mut by_key: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut records = 0;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let wait = if records < count {
                deadline
            } else {
                Instant::now() + Duration::from_secs(1)
            };
            match tokio::time::timeout_at(wait, results.next()).await {
                Ok(Some(Ok(delivery))) => {
                    records += 1;
                    let payload = String::from_utf8_lossy(delivery.message.payload()).into_owned();
                    let (key, n) = payload.split_once(':').expect("key:n");
                    by_key.entry(key.to_owned()).or_default().push(n.to_owned());
                    delivery.acknowledgement.ack().await.expect("ack");
                }
                _ if records >= count => break,
                _ => panic!("only {records} of {count} forwarded"),
            }
        }
        app.shutdown().await.expect("shutdown");
        assert_eq!(records, count, "no order forwarded twice");
        for (key, numbers) in by_key {
            let mut sorted = numbers.clone();
            sorted.sort();
            assert_eq!(numbers, sorted, "key `{key}` kept its order");
        }
        binder.close().await.ok();
    })
    .await
}

/// A supplier sending to `destination` with `required-groups = ["billing"]`, and the `billing`
/// consumer with a DLQ on a quorum queue, in one application; functions start in name order.
/// With `only_supplier`, `stream.function.definition` binds the supplier alone: the consumer
/// is one another process of the deployment binds.
fn producer_and_group(
    destination: &str,
    supplier: &str,
    consumer: &str,
    only_supplier: bool,
) -> Application {
    let tick = StreamFunction::supplier(supplier, || async { Option::<String>::None });
    let bill = StreamFunction::consumer(consumer, |_: Message| async {});
    let definition = match only_supplier {
        true => format!("function.definition = \"{supplier}\""),
        false => String::new(),
    };
    let toml = format!(
        r#"[stream]
default-binder = "rabbit"
{definition}
[stream.binders.rabbit]
uri = "{uri}"
[stream.bindings.{supplier}-out-0]
destination = "{destination}"
producer.required-groups = ["billing"]
[stream.bindings.{consumer}-in-0]
destination = "{destination}"
group = "billing"
consumer.dlq = true
[stream.rabbit.bindings.{consumer}-in-0.consumer]
quorum = true
"#,
        uri = uri()
    );
    bindery_core::Application::builder()
        .without_registered_functions()
        .function(tick)
        .function(bill)
        .config_str("application.toml", toml)
        .environment(Vec::<(String, String)>::new())
        .binder_provider(RabbitBinderProvider)
        .build()
        .expect("valid configuration")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_groups_are_declared_as_their_consumers_declare_them_in_either_order() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        // "a-tick" starts before "b-bill"; "z-tick" after "b-bill".
        for supplier in ["a-tick", "z-tick"] {
            let destination = unique("required");
            let app = tokio::time::timeout(
                Duration::from_secs(60),
                producer_and_group(&destination, supplier, "b-bill", false).start(),
            )
            .await
            .expect("started in time")
            .unwrap_or_else(|e| panic!("{supplier} first: {e}"));
            app.shutdown().await.expect("shutdown");
            assert_billing_queue_is_quorum_with_dlq(&destination)
                .await
                .unwrap_or_else(|e| panic!("{supplier} first: the group queue differs: {e}"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_groups_of_consumers_bound_elsewhere_create_only_what_is_missing() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        // Missing: the queue is created as the consumer, bound by another process, declares it.
        let destination = unique("required-elsewhere");
        let app = tokio::time::timeout(
            Duration::from_secs(60),
            producer_and_group(&destination, "tick", "bill", true).start(),
        )
        .await
        .expect("started in time")
        .expect("the supplier alone starts");
        app.shutdown().await.expect("shutdown");
        assert_billing_queue_is_quorum_with_dlq(&destination)
            .await
            .expect("created with the consumer's arguments");

        // Existing, declared elsewhere with other arguments: left as it is, and the producer
        // starts (declaring it again with the consumer's arguments would be refused).
        let destination = unique("required-elsewhere");
        let channel = raw_channel().await;
        tokio::time::timeout(
            Duration::from_secs(30),
            channel.queue_declare(
                format!("{destination}.billing").as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("RabbitMQ answers in time")
        .expect("a classic queue declared beforehand");
        let app = tokio::time::timeout(
            Duration::from_secs(60),
            producer_and_group(&destination, "tick", "bill", true).start(),
        )
        .await
        .expect("started in time")
        .expect("the supplier starts beside the existing queue");
        app.shutdown().await.expect("shutdown");
        assert!(
            assert_billing_queue_is_quorum_with_dlq(&destination)
                .await
                .is_err(),
            "the existing queue kept its own arguments"
        );
    })
    .await
}

/// Whether `<destination>.billing` is a quorum queue dead-lettering to `DLX`, as its consumer
/// with `dlq = true` and `quorum = true` declares it: declaring it so again succeeds.
async fn assert_billing_queue_is_quorum_with_dlq(destination: &str) -> Result<(), lapin::Error> {
    let channel = raw_channel().await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("DLX".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(format!("{destination}.billing").into()),
    );
    let declared = tokio::time::timeout(
        Duration::from_secs(30),
        channel.queue_declare(
            format!("{destination}.billing").as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        ),
    )
    .await
    .expect("RabbitMQ answers in time");
    declared.map(|_| ())
}

/// One side of `required_groups_declared_by_another_application_match_their_consumer`: the
/// producer, which describes the `billing` queue in its own section, or the consumer.
fn one_side(destination: &str, producer: bool) -> Application {
    let toml = if producer {
        format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
uri = "{uri}"
[stream.bindings.tick-out-0]
destination = "{destination}"
producer.required-groups = ["billing"]
[stream.rabbit.bindings.tick-out-0.producer]
dlq = true
quorum = true
"#,
            uri = uri()
        )
    } else {
        format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
uri = "{uri}"
[stream.bindings.bill-in-0]
destination = "{destination}"
group = "billing"
consumer.dlq = true
[stream.rabbit.bindings.bill-in-0.consumer]
quorum = true
"#,
            uri = uri()
        )
    };
    let function = match producer {
        true => StreamFunction::supplier("tick", || async { Option::<String>::None }),
        false => StreamFunction::consumer("bill", |_: Message| async {}),
    };
    application(function, &toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_groups_declared_by_another_application_match_their_consumer() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        for producer_first in [true, false] {
            let destination = unique("required-apart");
            let order = match producer_first {
                true => "producer first",
                false => "consumer first",
            };
            let mut running = Vec::new();
            for producer in [producer_first, !producer_first] {
                let app = tokio::time::timeout(
                    Duration::from_secs(60),
                    one_side(&destination, producer).start(),
                )
                .await
                .unwrap_or_else(|_| panic!("{order}: started in time"))
                .unwrap_or_else(|e| panic!("{order}: {e}"));
                if producer && producer_first {
                    // Alone, the producer has declared the queue as its consumer will: it is
                    // bound (a message to the destination is routed, not returned) and has the
                    // consumer's arguments, its DLQ included.
                    let sender = RabbitBinder::connect_uri(&uri()).await.expect("connect");
                    sender
                        .producer(&ProducerSpec::new(destination.clone()))
                        .await
                        .expect("producer")
                        .send(Message::new(Bytes::from_static(b"kept for billing")))
                        .await
                        .expect("the billing queue takes what is sent before its consumer runs");
                    sender.close().await.ok();
                    assert_billing_queue_is_quorum_with_dlq(&destination)
                        .await
                        .unwrap_or_else(|e| panic!("producer alone: the group queue differs: {e}"));
                    let channel = raw_channel().await;
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        channel.queue_declare(
                            format!("{destination}.billing.dlq").as_str().into(),
                            passive_queue(),
                            FieldTable::default(),
                        ),
                    )
                    .await
                    .expect("RabbitMQ answers in time")
                    .expect("producer alone: the DLQ exists");
                }
                running.push(app);
            }
            for app in running {
                app.shutdown().await.expect("shutdown");
            }
            assert_billing_queue_is_quorum_with_dlq(&destination)
                .await
                .unwrap_or_else(|e| panic!("{order}: the group queue differs: {e}"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_handles_what_was_prefetched_instead_of_handing_it_back() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let destination = unique("drain");
        let queue = format!("{destination}.workers");
        // The group queue exists before anything is sent, so the backlog waits in it.
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        binder
            .subscribe(&ConsumerSpec::new(destination.clone(), Some("workers")))
            .await
            .expect("subscribe")
            .close()
            .await
            .expect("close");
        let producer = binder
            .producer(&ProducerSpec::new(destination.clone()))
            .await
            .expect("producer");
        let total = 1_000;
        let confirmations = futures::future::join_all((0..total).map(|n| {
            let producer = producer.clone();
            async move {
                producer
                    .send(Message::new(Bytes::from(format!("m{n:04}"))))
                    .await
            }
        }));
        for sent in tokio::time::timeout(Duration::from_secs(60), confirmations)
            .await
            .expect("the backlog is sent in time")
        {
            sent.expect("send");
        }

        let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Arc::new(tokio::sync::Notify::new());
        let (record, first) = (handled.clone(), started.clone());
        let work = StreamFunction::consumer("work", move |message: Message| {
            let (record, first) = (record.clone(), first.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let mut handled = record.lock().expect("lock");
                handled.push(String::from_utf8_lossy(message.payload()).into_owned());
                if handled.len() == 50 {
                    first.notify_one();
                }
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
uri = "{uri}"
[stream.bindings.work-in-0]
destination = "{destination}"
group = "workers"
"#,
            uri = uri()
        );
        let app = application(work, &toml).start().await.expect("start");
        tokio::time::timeout(Duration::from_secs(30), started.notified())
            .await
            .expect("50 messages handled in time");
        tokio::time::timeout(Duration::from_secs(60), app.shutdown())
            .await
            .expect("shut down in time")
            .expect("shutdown");
        let handled: Vec<String> = handled.lock().expect("lock").clone();

        // What is left was never delivered: the prefetched messages were handled, not handed back.
        let channel = raw_channel().await;
        let mut left = Vec::new();
        let mut redelivered = Vec::new();
        loop {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                channel.basic_get(
                    queue.as_str().into(),
                    lapin::options::BasicGetOptions::default(),
                ),
            )
            .await
            .expect("basic.get answered in time")
            .expect("basic.get");
            let Some(message) = got else { break };
            let payload = String::from_utf8_lossy(&message.delivery.data).into_owned();
            if message.delivery.redelivered {
                redelivered.push(payload.clone());
            }
            left.push(payload);
            message
                .delivery
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .expect("ack");
        }
        assert!(
            handled.len() < total,
            "the shutdown came while a backlog was left"
        );
        assert!(
            redelivered.is_empty(),
            "{} messages were handed back as redelivered, such as {:?}",
            redelivered.len(),
            redelivered.first()
        );
        let handled_set: BTreeSet<&String> = handled.iter().collect();
        assert_eq!(
            handled_set.len(),
            handled.len(),
            "a message was handled twice"
        );
        let all: BTreeSet<&String> = handled.iter().chain(left.iter()).collect();
        assert_eq!(all.len(), total, "every message was either handled or left");
        assert_eq!(handled.len() + left.len(), total, "no message was both");
    })
    .await
}

/// Partitions are routed by their own key: an exchange that ignores keys, or a key of the
/// binding's own, would send every word to every counter, so starting is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_binding_that_routing_would_defeat_does_not_start() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let count = StreamFunction::function("count", |word: String| async move { word });
        let (words, counts) = (unique("words"), unique("counts"));
        let start_with = |section: &str| {
            let toml = format!(
                r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
type = "rabbit"
uri = "{uri}"
[stream.bindings.count-in-0]
destination = "{words}"
group = "counter"
consumer.partitioned = true
consumer.instance-count = 2
[stream.bindings.count-out-0]
destination = "{counts}"
producer.partition-count = 2
{section}
"#,
                uri = uri()
            );
            application(count.clone(), &toml).start()
        };
        let fanout =
            start_with("[stream.rabbit.bindings.count-in-0.consumer]\nexchange-type = \"fanout\"")
                .await
                .expect_err("a fanout exchange ignores the partition keys");
        let text = fanout.to_string();
        assert!(
            text.contains("`count-in-0`")
                && text.contains("`fanout` exchange ignores routing keys"),
            "{text}"
        );
        let keyed =
            start_with("[stream.rabbit.bindings.count-out-0.producer]\nrouting-key = \"all\"")
                .await
                .expect_err("a fixed routing key would be ignored");
        let text = keyed.to_string();
        assert!(
            text.contains("`count-out-0`")
                && text.contains("`routing-key = \"all\"` would be ignored"),
            "{text}"
        );
        let queue_keyed = start_with(
            "[stream.rabbit.bindings.count-out-0.producer]\nbinding-routing-key = \"all\"",
        )
        .await
        .expect_err("required groups of partitions are bound by the partition keys");
        let text = queue_keyed.to_string();
        assert!(
            text.contains("`binding-routing-key = \"all\"` would be ignored"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_binding_cancels_its_consumer_so_the_queue_keeps_the_group_s_messages() {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let destination = unique("paused");
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = StreamFunction::consumer("sink", {
            let seen = seen.clone();
            move |text: String| {
                let seen = seen.clone();
                async move { seen.lock().unwrap().push(text) }
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
type = "rabbit"
uri = "{uri}"
[stream.bindings.sink-in-0]
destination = "{destination}"
group = "g"
"#,
            uri = uri()
        );
        let app = application(sink, &toml).start().await.expect("start");
        app.pause_binding("sink-in-0").await.expect("paused");
        let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let producer = binder
            .producer(&ProducerSpec::new(destination.clone()))
            .await
            .expect("producer");
        for n in 0..100 {
            producer
                .send(Message::new(Bytes::from(format!("m{n:03}"))))
                .await
                .expect("send");
        }
        // With its consumer still there, the broker would push 100 of them to it (the prefetch
        // is 250) and none would be ready in the queue.
        let group = ConsumerSpec::new(destination.clone(), Some("g"));
        ready_reaches(
            &binder,
            &group,
            100,
            "the 100 sent while paused wait in the queue",
        )
        .await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "a paused binding handled a message"
        );

        app.resume_binding("sink-in-0").await.expect("resumed");
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().len() < 100 {
            assert!(
                Instant::now() < deadline,
                "only {} of 100 handled after the resume",
                seen.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut handled = seen.lock().unwrap().clone();
        handled.sort();
        let expected: Vec<String> = (0..100).map(|n| format!("m{n:03}")).collect();
        assert_eq!(handled, expected, "each message handled once");
        binder.close().await.ok();
        app.shutdown().await.expect("shutdown");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_hands_back_what_the_client_prefetched_and_a_resume_after_a_lost_connection_consumes_again(
) {
    common::within_test_deadline(async {
        if !available() {
            return;
        }
        let destination = unique("prefetched");
        let (app, binder, gate, seen) =
            gated_sink_with_100_sent("prefetched", &destination, Some("g")).await;
        let group = ConsumerSpec::new(destination.clone(), Some("g"));
        ready_reaches(&binder, &group, 0, "the client prefetched every message").await;
        app.pause_binding("sink-in-0").await.expect("paused");
        // The binding keeps what it took, one in the handler and at most 5 in all (fewer when
        // the pause came before it filled its window); the others go back.
        ready_within(
            &binder,
            &group,
            95..=99,
            "the prefetched messages went back to the queue",
        )
        .await;

        // The connection lost while paused: the resume reconnects. The 5 the binding held
        // come again (their channel closed), so duplicates are allowed here; losses are not.
        let closed = close_connections_named("bindery prefetched").await;
        assert!(!closed.is_empty(), "the application's connection was found");
        gate.add_permits(1000);
        app.resume_binding("sink-in-0").await.expect("resumed");
        all_handled_within(&seen, 100, Duration::from_secs(60), "after the resume").await;
        ready_reaches(&binder, &group, 0, "the queue drained after the resume").await;
        binder.close().await.ok();
        app.shutdown().await.expect("shutdown");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_anonymous_binding_loses_nothing_its_client_had_prefetched() {
    common::within_test_deadline(async {
        if !available() || !common::can_control_server() {
            return;
        }
        let destination = unique("anonymous-paused");
        // No group: an exclusive, auto-delete queue, which RabbitMQ deletes with its last
        // consumer.
        let (app, binder, gate, seen) =
            gated_sink_with_100_sent("anonymous", &destination, None).await;
        let queue_prefix = format!("{destination}.anonymous.");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queues = common::ready_in_queues_named(&queue_prefix).await;
            if matches!(queues.as_slice(), [(_, 0)]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the client did not prefetch every message: {queues:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.pause_binding("sink-in-0").await.expect("paused");
        gate.add_permits(1000);
        app.resume_binding("sink-in-0").await.expect("resumed");
        all_handled_within(&seen, 100, Duration::from_secs(60), "after the resume").await;
        binder.close().await.ok();
        app.shutdown().await.expect("shutdown");
    })
    .await
}

/// An application whose consumer `sink`, on `destination` (in `group`, or anonymous), takes a
/// permit of a gate before it keeps each text it is given, and holds 5 messages at most; and 100
/// messages sent to it, most of which its client prefetches. Returns the application, a binder
/// of the test's own, the gate (closed) and what the sink kept.
async fn gated_sink_with_100_sent(
    binder_name: &str,
    destination: &str,
    group: Option<&str>,
) -> (
    bindery_core::RunningApplication,
    RabbitBinder,
    Arc<tokio::sync::Semaphore>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    let (sink, gate, seen) = gated_sink();
    let group = group.map_or(String::new(), |group| format!("group = \"{group}\""));
    let toml = format!(
        r#"[stream]
default-binder = "{binder_name}"
[stream.binders.{binder_name}]
type = "rabbit"
uri = "{uri}"
[stream.bindings.sink-in-0]
destination = "{destination}"
{group}
consumer.max-in-flight = 5
"#,
        uri = uri()
    );
    let app = application(sink, &toml).start().await.expect("start");
    let binder = RabbitBinder::connect_uri(&uri()).await.expect("connect");
    let producer = binder
        .producer(&ProducerSpec::new(destination))
        .await
        .expect("producer");
    for n in 0..100 {
        producer
            .send(Message::new(Bytes::from(format!("m{n:03}"))))
            .await
            .expect("send");
    }
    (app, binder, gate, seen)
}

/// A consumer `sink` that takes a permit of the gate before it keeps each text it is given:
/// the function, its gate (closed) and what it kept.
fn gated_sink() -> (
    StreamFunction,
    Arc<tokio::sync::Semaphore>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = StreamFunction::consumer("sink", {
        let (gate, seen) = (gate.clone(), seen.clone());
        move |text: String| {
            let (gate, seen) = (gate.clone(), seen.clone());
            async move {
                gate.acquire().await.expect("gate").forget();
                seen.lock().unwrap().push(text);
            }
        }
    });
    (sink, gate, seen)
}

/// Waits, within `limit`, until `seen` holds `wanted` distinct texts.
async fn all_handled_within(
    seen: &std::sync::Mutex<Vec<String>>,
    wanted: usize,
    limit: Duration,
    when: &str,
) {
    let deadline = Instant::now() + limit;
    loop {
        let mut handled = seen.lock().unwrap().clone();
        handled.sort();
        handled.dedup();
        if handled.len() == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {wanted} handled {when}",
            handled.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, within 30 s, until the queue of `group` has `wanted` messages ready.
async fn ready_reaches(binder: &RabbitBinder, group: &ConsumerSpec, wanted: u64, what: &str) {
    ready_within(binder, group, wanted..=wanted, what).await;
}

/// Waits, within 30 s, until the number of messages ready in the queue of `group` is in
/// `wanted`.
async fn ready_within(
    binder: &RabbitBinder,
    group: &ConsumerSpec,
    wanted: std::ops::RangeInclusive<u64>,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready = binder.lag(group).await;
    while !ready.is_some_and(|ready| wanted.contains(&ready)) {
        assert!(
            Instant::now() < deadline,
            "{what}: {ready:?} ready, not {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = binder.lag(group).await;
    }
}
