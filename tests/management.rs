//! The management server over real HTTP: health, and the bindings endpoint steering a binding.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bindery::binder::{ConsumerSpec, Health, ProducerSpec, Subscription};
use bindery::{Binder, MemoryBinder, Message, RunningApplication, StreamFunction};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::time::Instant;

mod support;

const MANAGEMENT: &str = r#"
[management]
address = "127.0.0.1"
port = 0
endpoints = ["health", "bindings"]
"#;

/// Records every payload it handles, so a message handled twice shows.
fn recording(seen: Arc<Mutex<Vec<String>>>) -> StreamFunction {
    StreamFunction::function("echo", move |text: String| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(text.clone());
            text
        }
    })
}

fn counting(handled: Arc<AtomicU32>) -> StreamFunction {
    StreamFunction::function("echo", move |text: String| {
        let handled = handled.clone();
        async move {
            handled.fetch_add(1, Ordering::SeqCst);
            text
        }
    })
}

async fn start(
    binder: Arc<dyn Binder>,
    function: StreamFunction,
    toml: &str,
) -> RunningApplication {
    bindery::test::isolated(function, toml)
        .replace_binders(binder)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap()
}

fn url(app: &RunningApplication, path: &str) -> String {
    let address: SocketAddr = app
        .management_address()
        .expect("the management server runs");
    format!("http://{address}{path}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn get(app: &RunningApplication, path: &str) -> (u16, Value) {
    let response = client().get(url(app, path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(app: &RunningApplication, path: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(url(app, path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_until(what: &str, deadline: Duration, condition: impl Fn() -> bool) {
    let until = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_bindings_answer_over_http_and_steer_the_binding() {
    let binder = MemoryBinder::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = {
        let seen = seen.clone();
        move || seen.lock().unwrap().len()
    };
    let toml = format!(
        "{MANAGEMENT}
[stream.bindings.echo-in-0]
destination = \"mg-in\"
group = \"echoes\"
[stream.bindings.echo-out-0]
destination = \"mg-out\"
producer.required-groups = [\"check\"]"
    );
    let app = start(Arc::new(binder.clone()), recording(seen.clone()), &toml).await;
    let producer = binder.producer(&ProducerSpec::new("mg-in")).await.unwrap();

    let (status, health) = get(&app, "/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "UP");
    assert_eq!(
        health["components"]["binders"]["components"]["memory"]["status"],
        "UP"
    );
    let echo = &health["components"]["bindings"]["components"]["echo-in-0"];
    assert_eq!(echo["status"], "UP");
    assert_eq!(echo["details"]["state"], "started");

    let (status, bindings) = get(&app, "/bindings").await;
    assert_eq!(status, 200);
    assert_eq!(
        bindings,
        json!([
            {"bindingName": "echo-in-0", "name": "mg-in", "group": "echoes", "binder": "memory",
             "input": true, "pausable": true, "state": "started"},
            {"bindingName": "echo-out-0", "name": "mg-out", "group": null, "binder": "memory",
             "input": false, "pausable": false, "state": "started"},
        ])
    );

    let (status, paused) = post(&app, "/bindings/echo-in-0", json!({"state": "PAUSED"})).await;
    assert_eq!(
        (status, &paused["state"]),
        (200, &json!("paused")),
        "{paused}"
    );
    for n in 0..100 {
        producer
            .send(Message::new(Bytes::from(format!("m{n}"))))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(handled(), 0, "a paused binding handled a message");

    let (status, resumed) = post(&app, "/bindings/echo-in-0", json!({"state": "RESUMED"})).await;
    assert_eq!(
        (status, &resumed["state"]),
        (200, &json!("started")),
        "{resumed}"
    );
    wait_until(
        "the 100 messages are handled",
        Duration::from_secs(30),
        || handled() >= 100,
    )
    .await;

    let (status, stopped) = post(&app, "/bindings/echo-in-0", json!({"state": "STOPPED"})).await;
    assert_eq!(
        (status, &stopped["state"]),
        (200, &json!("stopped")),
        "{stopped}"
    );
    let (status, refused) = post(&app, "/bindings/echo-in-0", json!({"state": "PAUSED"})).await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("is stopped; start it"),
        "{refused}"
    );
    let (status, health) = get(&app, "/health").await;
    assert_eq!(
        status, 200,
        "a binding stopped on purpose is healthy: {health}"
    );
    let echo = &health["components"]["bindings"]["components"]["echo-in-0"];
    assert_eq!(
        (&echo["status"], &echo["details"]["state"]),
        (&json!("UP"), &json!("stopped")),
        "{health}"
    );
    for n in 100..110 {
        producer
            .send(Message::new(Bytes::from(format!("m{n}"))))
            .await
            .unwrap();
    }
    let (status, started) = post(&app, "/bindings/echo-in-0", json!({"state": "STARTED"})).await;
    assert_eq!(
        (status, &started["state"]),
        (200, &json!("started")),
        "{started}"
    );
    wait_until(
        "the 10 sent while stopped are handled",
        Duration::from_secs(30),
        || handled() >= 110,
    )
    .await;
    let mut payloads = seen.lock().unwrap().clone();
    payloads.sort();
    let mut expected: Vec<String> = (0..110).map(|n| format!("m{n}")).collect();
    expected.sort();
    assert_eq!(payloads, expected, "each message is handled once");

    let (status, body) = post(&app, "/bindings/echo-in-0", json!({"state": "SLEEPING"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&app, "/bindings/echo-out-0", json!({"state": "PAUSED"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get(&app, "/bindings/nope-in-0").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("echo-in-0"),
        "{body}"
    );
    let (status, one) = get(&app, "/bindings/echo-in-0").await;
    assert_eq!((status, &one["state"]), (200, &json!("started")));

    let address = app.management_address().unwrap();
    let controls = app.controls();
    app.shutdown().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the management server still listens after shutdown"
    );
    // A handle kept past shutdown steers nothing.
    let refused = tokio::time::timeout(Duration::from_secs(5), controls.start_binding("echo-in-0"))
        .await
        .expect("a change after shutdown is answered at once");
    let error = refused
        .expect_err("a binding cannot start after shutdown")
        .to_string();
    assert!(error.contains("shutting down"), "{error}");
    let health = controls.health().await;
    assert!(!health.is_up(), "{}", health.to_json());
}

/// A memory binder whose broker is unreachable, as far as health can tell.
#[derive(Debug)]
struct Unreachable(MemoryBinder);

#[async_trait]
impl Binder for Unreachable {
    async fn subscribe(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<Box<dyn Subscription>, bindery::Error> {
        self.0.subscribe(spec).await
    }

    async fn producer(
        &self,
        spec: &ProducerSpec,
    ) -> Result<Arc<dyn bindery::binder::Producer>, bindery::Error> {
        self.0.producer(spec).await
    }

    async fn health(&self) -> Health {
        Health::down("connection refused")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_down_with_503_and_the_bindings_endpoint_is_off_unless_listed() {
    let handled = Arc::new(AtomicU32::new(0));
    let toml = "[management]\naddress = \"127.0.0.1\"\nport = 0\n[stream.bindings.echo-in-0]\ndestination = \"mg-down\"";
    let app = start(
        Arc::new(Unreachable(MemoryBinder::new())),
        counting(handled),
        toml,
    )
    .await;
    let (status, health) = get(&app, "/health").await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "DOWN");
    let memory = &health["components"]["binders"]["components"]["memory"];
    assert_eq!(memory["status"], "DOWN");
    assert_eq!(memory["details"]["error"], "connection refused");
    assert_eq!(health["components"]["bindings"]["status"], "UP");

    let response = client().get(url(&app, "/bindings")).send().await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        404,
        "`bindings` is not in `endpoints`"
    );
    app.shutdown().await.unwrap();
}

/// A memory binder that counts what it is asked for.
#[derive(Clone, Debug, Default)]
struct Watched {
    memory: MemoryBinder,
    asked: Arc<AtomicU32>,
}

#[async_trait]
impl Binder for Watched {
    async fn subscribe(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<Box<dyn Subscription>, bindery::Error> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.memory.subscribe(spec).await
    }

    async fn producer(
        &self,
        spec: &ProducerSpec,
    ) -> Result<Arc<dyn bindery::binder::Producer>, bindery::Error> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.memory.producer(spec).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_fails_the_start_naming_the_key_and_a_wrong_endpoint_names_the_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let toml = format!("[management]\naddress = \"127.0.0.1\"\nport = {port}\n[stream.bindings.echo-in-0]\ndestination = \"mg-port\"");
    let binder = Watched::default();
    let error = bindery::test::isolated(counting(Arc::default()), &toml)
        .replace_binders(Arc::new(binder.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .expect_err("the port is taken");
    assert_eq!(
        binder.asked.load(Ordering::SeqCst),
        0,
        "a binding subscribed before the port was taken"
    );
    let text = error.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}"))
            && text.contains("`management.port`")
            && text.contains("application.toml"),
        "{text}"
    );

    let toml = "[management]\nendpoints = [\"health\", \"bindngs\"]\nprot = 1";
    let error = bindery::test::isolated(counting(Arc::default()), toml)
        .build()
        .expect_err("a misspelled endpoint and key");
    let text = error.to_string();
    assert!(
        text.contains("application.toml")
            && text.contains("`management.endpoints`")
            && text.contains("did you mean `bindings`?")
            && text.contains("`management.prot`"),
        "{text}"
    );
}

/// The value of the series `name` whose labels include `label`, in a Prometheus scrape.
fn series(scrape: &str, name: &str, label: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_received_handled_retried_and_dead_lettered() {
    let binder = MemoryBinder::new();
    let meter = StreamFunction::function("meter", |text: String| async move {
        if text.ends_with('0') {
            panic!("every tenth order fails");
        }
        text
    });
    let toml = r#"
[management]
address = "127.0.0.1"
port = 0
endpoints = ["health", "metrics"]
[stream.bindings.meter-in-0]
destination = "mt-in"
group = "g"
[stream.bindings.meter-in-0.consumer]
max-attempts = 2
back-off-initial-interval = "5ms"
dlq = true
[stream.bindings.meter-out-0]
destination = "mt-out"
producer.required-groups = ["check"]
"#;
    let app = start(Arc::new(binder.clone()), meter, toml).await;
    let producer = binder.producer(&ProducerSpec::new("mt-in")).await.unwrap();
    // Paused, so that the 100 wait in the group, where the lag shows them.
    app.pause_binding("meter-in-0").await.unwrap();
    for n in 1..=100 {
        producer
            .send(Message::new(Bytes::from(format!("order {n}"))))
            .await
            .unwrap();
    }
    let label = r#"destination="mt-in""#;
    // A receive under way when the pause came may hold one, unacknowledged and not handled;
    // the rest wait in the group. (The lag is measured just before the counters are read, so
    // a receive between the two is seen at the next scrape.)
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = client()
            .get(url(&app, "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let held = series(&scrape, "bindery_messages_received_total", label).unwrap_or(0.0);
        assert!(held <= 1.0, "a paused binding received {held}: {scrape}");
        if series(&scrape, "bindery_consumer_lag", label) == Some(100.0 - held) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the lag does not count the 100 waiting: {scrape}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.resume_binding("meter-in-0").await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        let response = client().get(url(&app, "/metrics")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let scrape = response.text().await.unwrap();
        let settled = series(&scrape, "bindery_processing_duration_seconds_count", label);
        let in_flight = series(&scrape, "bindery_messages_in_flight", label);
        let lag = series(&scrape, "bindery_consumer_lag", label);
        if settled == Some(100.0) && in_flight == Some(0.0) && lag == Some(0.0) {
            break scrape;
        }
        assert!(
            Instant::now() < until,
            "the 100 messages were not all settled within 30s:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let read = |name: &str| series(&scrape, name, label);
    assert_eq!(
        read("bindery_messages_received_total"),
        Some(100.0),
        "{scrape}"
    );
    assert_eq!(
        read("bindery_messages_handled_total"),
        Some(90.0),
        "{scrape}"
    );
    assert_eq!(
        read("bindery_messages_dead_lettered_total"),
        Some(10.0),
        "{scrape}"
    );
    assert_eq!(
        read("bindery_messages_failed_total"),
        Some(20.0),
        "{scrape}"
    );
    assert_eq!(
        read("bindery_messages_retried_total"),
        Some(10.0),
        "{scrape}"
    );
    assert_eq!(read("bindery_messages_sent_total"), Some(90.0), "{scrape}");
    assert_eq!(
        read("bindery_messages_dropped_total"),
        Some(0.0),
        "{scrape}"
    );
    assert_eq!(
        read("bindery_handler_duration_seconds_count"),
        Some(110.0),
        "one sample per handler call: {scrape}"
    );
    assert!(
        scrape.contains(r#"bindery_messages_received_total{binding="meter-in-0",destination="mt-in",group="g"} 100"#),
        "series are labelled by binding, destination and group: {scrape}"
    );
    assert!(
        scrape.contains("# TYPE bindery_handler_duration_seconds histogram"),
        "durations are histograms: {scrape}"
    );
    app.shutdown().await.unwrap();
}

/// Pauses, resumes, stops and starts a binding on a real broker over HTTP: 100 sent while it
/// is paused (and 100 while it is stopped) are not handled within 3 s, then each is handled
/// once after the resume (the start).
async fn steer_over_http_on(
    binder: &str,
    binder_toml: &str,
    provider: impl bindery::BinderProvider,
) {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (input, group) = (format!("mg-{binder}-{id}"), format!("g-{id}"));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = StreamFunction::consumer("sink", {
        let seen = seen.clone();
        move |text: String| {
            let seen = seen.clone();
            async move { seen.lock().unwrap().push(text) }
        }
    });
    let toml = format!(
        "{MANAGEMENT}
[stream]
default-binder = \"{binder}\"
{binder_toml}
[stream.bindings.sink-in-0]
destination = \"{input}\"
group = \"{group}\""
    );
    let app = tokio::time::timeout(
        Duration::from_secs(120),
        bindery::test::isolated(sink, &toml)
            .binder_provider(provider)
            .build()
            .expect("configuration")
            .start(),
    )
    .await
    .expect("started within 120 s")
    .expect("start");
    let bridge = app.bridge();
    let send = |phase: &'static str| {
        let (bridge, input) = (bridge.clone(), input.clone());
        async move {
            // One at a time, each confirmed before the next: on Kafka every record is a batch
            // of its own, so a group started again never fetches from inside a batch.
            for n in 0..100 {
                bridge
                    .send(&input, Message::new(Bytes::from(format!("{phase}-{n:03}"))))
                    .await
                    .expect("send");
            }
        }
    };
    let handled = || seen.lock().unwrap().len();
    let every = |phases: &[&str]| {
        let mut all: Vec<String> = phases
            .iter()
            .flat_map(|phase| (0..100).map(move |n| format!("{phase}-{n:03}")))
            .collect();
        all.sort();
        all
    };

    for (away, back, state, phase) in [
        ("PAUSED", "RESUMED", "paused", "paused"),
        ("STOPPED", "STARTED", "stopped", "stopped"),
    ] {
        let (status, body) = post(&app, "/bindings/sink-in-0", json!({"state": away})).await;
        assert_eq!(
            (status, &body["state"]),
            (200, &json!(state)),
            "{binder}: {body}"
        );
        let before = handled();
        send(phase).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            handled(),
            before,
            "{binder}: a {state} binding handled a message"
        );
        let (status, body) = post(&app, "/bindings/sink-in-0", json!({"state": back})).await;
        assert_eq!(
            (status, &body["state"]),
            (200, &json!("started")),
            "{binder}: {body}"
        );
        wait_until(
            &format!("{binder}: the 100 sent while {state} are handled"),
            Duration::from_secs(120),
            || handled() >= before + 100,
        )
        .await;
    }
    let mut payloads = seen.lock().unwrap().clone();
    payloads.sort();
    assert_eq!(
        payloads,
        every(&["paused", "stopped"]),
        "{binder}: each handled once"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_on_rabbitmq_pauses_resumes_stops_and_starts_over_http() {
    let Some((_, uri)) = support::rabbitmq_as("RABBIT") else {
        return;
    };
    let binder = format!("[stream.binders.rabbit]\ntype = \"rabbit\"\nuri = \"{uri}\"");
    steer_over_http_on("rabbit", &binder, bindery::rabbit::RabbitBinderProvider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_on_kafka_pauses_resumes_stops_and_starts_over_http() {
    let Some((_, brokers)) = support::kafka_as("KAFKA") else {
        return;
    };
    let binder = format!(
        "[stream.binders.kafka]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\nauto-create-topics = true\nstart-offset = \"earliest\""
    );
    steer_over_http_on("kafka", &binder, bindery::kafka::KafkaBinderProvider).await;
}
