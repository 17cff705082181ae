//! Trace propagation (feature `otel`) with an outside client: Python's `pika` publishes a
//! message with a W3C `traceparent` to RabbitMQ; the function's output carries the same trace
//! id with a new parent span id, that of the span bindery ran the handler in. The process sets
//! up OpenTelemetry as an application does: a `tracing-opentelemetry` layer over an SDK tracer
//! provider. `pika` is installed once, with pip, into `~/.cache/bindery/python`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bindery::binder::ConsumerSpec;
use bindery::rabbit::{RabbitBinder, RabbitBinderProvider};
use bindery::test::{host_port, isolated, require_broker};
use bindery::{header, Binder, StreamFunction};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;

mod support;
use support::{python_package, wait_within};

/// The input's trace: its id, and the span of the service that sent it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENDER_SPAN: &str = "00f067aa0ba902b7";

fn uri() -> String {
    std::env::var("RABBIT_URI").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Where `pika` is installed for the tests.
fn pika() -> Option<PathBuf> {
    python_package("pika==1.3.2", "pika", "THE TRACE PROPAGATION TEST")
}

/// Publishes one message with `traceparent` to the exchange `destination`, with pika.
fn publish_with_pika(pythonpath: &Path, destination: &str, traceparent: &str) {
    let script = r#"
import sys, pika
uri, exchange, traceparent = sys.argv[1], sys.argv[2], sys.argv[3]
connection = pika.BlockingConnection(pika.URLParameters(uri))
channel = connection.channel()
channel.confirm_delivery()
channel.basic_publish(
    exchange=exchange,
    routing_key="orders",
    body=b"order 1",
    properties=pika.BasicProperties(content_type="text/plain", headers={"traceparent": traceparent}),
    mandatory=True,
)
connection.close()
"#;
    let mut python = Command::new("python3")
        .args(["-c", script, &uri(), destination, traceparent])
        .env("PYTHONPATH", pythonpath)
        .stdout(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let status = wait_within(&mut python, Duration::from_secs(60), "the pika publisher");
    assert!(status.success(), "pika could not publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_from_an_outside_client_continues_in_a_span_of_this_service() {
    if !require_broker("RabbitMQ", &host_port(&uri(), 5672)) {
        return;
    }
    let Some(pythonpath) = pika() else {
        return;
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bindery-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (input, output) = (format!("trace-in-{id}"), format!("trace-out-{id}"));
    let relay = StreamFunction::function("relay", |text: String| async move { text });
    let toml = format!(
        r#"[stream]
default-binder = "rabbit"
[stream.binders.rabbit]
type = "rabbit"
uri = "{uri}"
[stream.bindings.relay-in-0]
destination = "{input}"
group = "g"
[stream.bindings.relay-out-0]
destination = "{output}"
"#,
        uri = uri()
    );
    let collector = Arc::new(RabbitBinder::connect_uri(&uri()).await.expect("connect"));
    let mut outputs = collector
        .subscribe(&ConsumerSpec::new(output.clone(), Some("check")))
        .await
        .expect("subscribe to the output");
    let app = isolated(relay, &toml)
        .binder_provider(RabbitBinderProvider)
        .build()
        .expect("configuration")
        .start()
        .await
        .expect("start");

    let traceparent = format!("00-{TRACE_ID}-{SENDER_SPAN}-01");
    let publishing = pythonpath.clone();
    let exchange = input.clone();
    tokio::task::spawn_blocking(move || publish_with_pika(&publishing, &exchange, &traceparent))
        .await
        .expect("the publisher ran");

    let delivery = tokio::time::timeout(Duration::from_secs(30), outputs.next())
        .await
        .expect("the output within 30s")
        .expect("the subscription runs")
        .expect("a delivery");
    let carried = delivery
        .message
        .headers()
        .get_str(header::TRACEPARENT)
        .expect("the output carries a traceparent")
        .to_owned();
    delivery.acknowledgement.ack().await.ok();
    let parts: Vec<&str> = carried.split('-').collect();
    assert_eq!(parts.len(), 4, "{carried}");
    assert_eq!(parts[0], "00", "{carried}");
    assert_eq!(parts[1], TRACE_ID, "the same trace: {carried}");
    assert_ne!(
        parts[2], SENDER_SPAN,
        "a new parent span, this service's: {carried}"
    );
    assert!(
        parts[2].len() == 16 && parts[2] != "0000000000000000",
        "a valid span id: {carried}"
    );
    assert_eq!(parts[3], "01", "still sampled: {carried}");

    outputs.close().await.ok();
    collector.close().await.ok();
    app.shutdown().await.expect("shutdown");
}
