//! The failure policy, the same on every binder: retries with back-off, then the dead-letter
//! destination or the log; undecodable payloads skip the retries; panics are failures.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bindery::binder::{ConsumerSpec, ProducerSpec};
use bindery::test::TestApp;
use bindery::{header, Binder, Decoded, Message, StreamFunction};
use bytes::Bytes;
use serde::Deserialize;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
struct Order {
    #[allow(dead_code)]
    id: u64,
}

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

fn binding(name: &str, destination: &str, extra: &str) -> String {
    format!(
        r#"[stream.bindings.{name}-in-0]
destination = "{destination}"
group = "g"
[stream.bindings.{name}-in-0.consumer]
back-off-initial-interval = "5ms"
back-off-max-interval = "20ms"
{extra}"#
    )
}

async fn start(function: StreamFunction, toml: &str) -> TestApp {
    TestApp::start_with(
        bindery::application()
            .without_registered_functions()
            .function(function),
        toml,
    )
    .await
    .expect("start")
}

#[tokio::test]
async fn an_undecodable_payload_goes_straight_to_the_dlq_without_calling_the_handler() {
    let calls = counter();
    let seen = calls.clone();
    let strict = StreamFunction::consumer("strict", move |_: Decoded<Order>| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let app = start(
        strict,
        &binding("strict", "fp-strict", "max-attempts = 5\ndlq = true"),
    )
    .await;
    let bad = Message::builder(Bytes::from_static(b"not json"))
        .header("tenant", "acme")
        .build();
    app.send("fp-strict", bad).await.unwrap();
    let dead = app
        .receive_dead_letter("fp-strict", "g", WAIT)
        .await
        .expect("a dead letter");
    assert_eq!(&dead.payload()[..], b"not json");
    assert_eq!(dead.headers().get_str("tenant"), Some("acme"));
    assert_eq!(dead.headers().get_str(header::ATTEMPTS), Some("1"));
    assert_eq!(
        dead.headers().get_str(header::EXCEPTION_TYPE),
        Some("bindery::DecodeError")
    );
    let why = dead.headers().get_str(header::EXCEPTION_MESSAGE).unwrap();
    assert!(
        why.contains("cannot decode the payload as") && why.contains("Order"),
        "{why}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_handler_is_retried_like_a_failing_one() {
    let calls = counter();
    let seen = calls.clone();
    let flaky = StreamFunction::function("flaky", move |text: String| {
        let seen = seen.clone();
        async move {
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                panic!("not yet");
            }
            text
        }
    })
    .output("fp-flaky-out");
    let app = start(flaky, &binding("flaky", "fp-flaky", "max-attempts = 3")).await;
    app.send("fp-flaky", "third time lucky").await.unwrap();
    let out = app
        .receive("fp-flaky-out", WAIT)
        .await
        .expect("handled on the third attempt");
    assert_eq!(out.text(), Some("third time lucky"));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panic_on_the_last_attempt_is_dead_lettered_with_its_message() {
    let always = StreamFunction::consumer("always", |text: String| async move {
        if !text.is_empty() {
            panic!("ledger unavailable");
        }
    });
    let app = start(
        always,
        &binding("always", "fp-always", "max-attempts = 2\ndlq = true"),
    )
    .await;
    app.send("fp-always", "x").await.unwrap();
    let dead = app
        .receive_dead_letter("fp-always", "g", WAIT)
        .await
        .expect("a dead letter");
    assert_eq!(dead.headers().get_str(header::ATTEMPTS), Some("2"));
    assert_eq!(
        dead.headers().get_str(header::EXCEPTION_TYPE),
        Some("panic")
    );
    assert_eq!(
        dead.headers().get_str(header::EXCEPTION_MESSAGE),
        Some("handler panicked: ledger unavailable")
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_dlq_a_failed_message_is_acknowledged_and_processing_goes_on() {
    let handled = counter();
    let seen = handled.clone();
    let picky = StreamFunction::function("picky", move |text: String| {
        let seen = seen.clone();
        async move {
            if text == "bad" {
                return Err(format!("refusing {text}"));
            }
            seen.fetch_add(1, Ordering::SeqCst);
            Ok(text)
        }
    })
    .output("fp-picky-out");
    let app = start(picky, &binding("picky", "fp-picky", "max-attempts = 2")).await;
    // Read the dead-letter destination from the start, so a dead letter would be seen.
    assert!(app
        .receive("fp-picky.g.dlq", Duration::from_millis(1))
        .await
        .is_none());
    app.send("fp-picky", "bad").await.unwrap();
    app.send("fp-picky", "good").await.unwrap();
    assert_eq!(
        app.receive("fp-picky-out", WAIT).await.unwrap().text(),
        Some("good")
    );
    assert_eq!(
        app.binder().pending("fp-picky", "g"),
        0,
        "the failed message was acknowledged"
    );
    assert!(app
        .receive("fp-picky.g.dlq", Duration::from_millis(100))
        .await
        .is_none());
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_error_type_and_text_of_a_result_reach_the_dlq() {
    #[derive(Debug, thiserror::Error)]
    #[error("card {0} declined")]
    struct Declined(u32);
    let charge =
        StreamFunction::consumer("charge", |_: String| async { Err::<(), _>(Declined(42)) });
    let app = start(
        charge,
        &binding("charge", "fp-charge", "max-attempts = 1\ndlq = true"),
    )
    .await;
    app.send("fp-charge", "x").await.unwrap();
    let dead = app
        .receive_dead_letter("fp-charge", "g", WAIT)
        .await
        .expect("a dead letter");
    assert_eq!(
        dead.headers().get_str(header::EXCEPTION_MESSAGE),
        Some("card 42 declined")
    );
    assert!(dead
        .headers()
        .get_str(header::EXCEPTION_TYPE)
        .unwrap()
        .ends_with("Declined"));
    assert_eq!(
        dead.headers().get_str(header::ORIGINAL_DESTINATION),
        Some("fp-charge")
    );
    app.shutdown().await.unwrap();
}

#[test]
fn back_off_grows_exponentially_up_to_the_maximum() {
    let properties = bindery::ConsumerProperties {
        back_off_initial_interval: Duration::from_millis(100),
        back_off_multiplier: 3.0,
        back_off_max_interval: Duration::from_millis(500),
        ..Default::default()
    };
    let waits: Vec<u128> = (1..=4)
        .map(|a| properties.back_off(a).as_millis())
        .collect();
    assert_eq!(waits, vec![100, 300, 500, 500]);
}

#[tokio::test]
async fn sending_where_nobody_listens_is_an_error_not_a_silent_loss() {
    let app = TestApp::start_with(bindery::application().without_registered_functions(), "")
        .await
        .unwrap();
    let error = app.bridge().send("fp-nobody", "hello?").await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no group or consumer is subscribed to destination `fp-nobody`"),
        "{error}"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn required_groups_keep_messages_sent_before_their_consumer_starts() {
    let app = TestApp::start_with(
        bindery::application().without_registered_functions(),
        r#"stream.output-bindings = "early"
[stream.bindings.early-out-0]
destination = "fp-early"
producer.required-groups = ["late"]"#,
    )
    .await
    .unwrap();
    app.bridge().send("early-out-0", "kept").await.unwrap();
    assert_eq!(app.binder().pending("fp-early", "late"), 1);
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dead_letter_is_kept_until_something_reads_the_dead_letter_destination() {
    let calls = counter();
    let seen = calls.clone();
    let refuse = StreamFunction::consumer("refuse", move |_: String| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("refused")
        }
    });
    // A dead letter that could not be sent would wait an hour for its next try.
    let toml = r#"[stream.bindings.refuse-in-0]
destination = "fp-kept"
group = "g"
[stream.bindings.refuse-in-0.consumer]
max-attempts = 1
dlq = true
back-off-initial-interval = "1h"
back-off-max-interval = "1h""#;
    // A plain application: `TestApp` reads dead-letter destinations from the start.
    let binder = bindery::MemoryBinder::new();
    let mut spec = ProducerSpec::new("fp-kept");
    spec.properties.required_groups = vec!["g".to_owned()];
    let orders = binder.producer(&spec).await.unwrap();
    let app = bindery::application()
        .without_registered_functions()
        .function(refuse)
        .config_str("application.toml", toml)
        .environment(Vec::<(String, String)>::new())
        .replace_binders(Arc::new(binder.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    orders
        .send(Message::new(Bytes::from_static(b"x")))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while binder.kept("fp-kept.g.dlq") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead letter was not kept (handler called {} times)",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Nothing read the dead-letter destination when the message failed; its first reader
    // gets the dead letter.
    let mut reader = binder
        .subscribe(&ConsumerSpec::new("fp-kept.g.dlq", Some("audit")))
        .await
        .unwrap();
    let dead = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("the dead letter was kept for its first reader")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(&dead.message.payload()[..], b"x");
    assert_eq!(
        dead.message.headers().get_str(header::EXCEPTION_MESSAGE),
        Some("refused")
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "dead-lettered once, not retried"
    );
    app.shutdown().await.unwrap();
}

/// A send through the bridge inside a handler that does not get through is a send failure,
/// not a fault of the message: it is tried again past `max-attempts` until it gets through,
/// never dropped (here: until the destination's first group exists).
#[tokio::test]
async fn a_bridge_send_that_fails_in_a_handler_is_retried_until_it_gets_through() {
    let calls = counter();
    let seen = calls.clone();
    let relay = StreamFunction::consumer(
        "relay",
        move |text: String, bridge: bindery::StreamBridge| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                bridge.send("fp-relay-target", text).await
            }
        },
    );
    let app = start(relay, &binding("relay", "fp-relay", "max-attempts = 2")).await;
    app.send("fp-relay", "hello").await.unwrap();
    // Nothing subscribes to the target yet, so every send fails: well past `max-attempts`.
    let deadline = tokio::time::Instant::now() + WAIT;
    while calls.load(Ordering::SeqCst) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handler was tried {} times, then given up",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut late = app
        .binder()
        .subscribe(&ConsumerSpec::new("fp-relay-target", Some("late")))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, late.next())
        .await
        .expect("the relayed message arrives once its destination has a group")
        .expect("a delivery")
        .unwrap();
    assert_eq!(&delivery.message.payload()[..], b"hello");
    delivery.acknowledgement.ack().await.unwrap();
    app.shutdown().await.unwrap();
}
