//! The programming model end to end on the memory binder: shapes, arguments, return values,
//! headers, keys, correlation ids and trace context.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bindery::prelude::*;
use bindery::test::TestApp;
use bindery::{header, Encoded};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, Serialize, PartialEq)]
struct Order {
    id: u64,
    amount_cents: u64,
}

#[derive(Debug, Deserialize, Serialize, PartialEq)]
struct Invoice {
    order_id: u64,
    total_cents: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("order {0} has no amount")]
struct BillingError(u64);

#[stream_function(input = "pm-orders", output = "pm-invoices", group = "billing")]
async fn bill(order: Order) -> Result<Invoice, BillingError> {
    if order.amount_cents == 0 {
        return Err(BillingError(order.id));
    }
    Ok(Invoice {
        order_id: order.id,
        total_cents: order.amount_cents + order.amount_cents / 5,
    })
}

#[tokio::test]
async fn a_function_turns_each_order_into_an_invoice() {
    let app = TestApp::start(
        r#"[stream]
function.definition = "bill""#,
    )
    .await
    .unwrap();
    app.send_json(
        "pm-orders",
        Order {
            id: 1,
            amount_cents: 1000,
        },
    )
    .await
    .unwrap();
    let invoice = app.receive("pm-invoices", WAIT).await.expect("an invoice");
    assert_eq!(
        invoice.json::<Invoice>().unwrap(),
        Invoice {
            order_id: 1,
            total_cents: 1200
        }
    );
    assert_eq!(
        invoice.headers().get_str(header::CONTENT_TYPE),
        Some("application/json")
    );
    assert!(invoice.headers().contains(header::MESSAGE_ID));
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_redelivered_input_gives_its_outputs_the_same_ids_and_an_input_without_an_id_new_ones() {
    let app = TestApp::start(
        r#"[stream]
function.definition = "bill""#,
    )
    .await
    .unwrap();
    let order = |id: Option<&str>| {
        let mut order = Message::new(bytes::Bytes::from_static(
            br#"{"id":1,"amount_cents":1000}"#,
        ));
        order
            .headers_mut()
            .insert(header::CONTENT_TYPE, "application/json");
        if let Some(id) = id {
            order.headers_mut().insert(header::MESSAGE_ID, id);
        }
        order
    };
    // The same order twice, as a broker delivers it again after a crash before its
    // acknowledgement; then twice without an id, and twice with an empty one.
    let inputs = [
        Some("order-1"),
        Some("order-1"),
        None,
        None,
        Some(""),
        Some(""),
    ];
    for id in inputs {
        app.send("pm-orders", order(id)).await.unwrap();
    }
    let mut ids = Vec::new();
    for _ in inputs {
        let invoice = app.receive("pm-invoices", WAIT).await.expect("an invoice");
        let id = invoice
            .headers()
            .get_str(header::MESSAGE_ID)
            .expect("an id");
        ids.push(id.to_owned());
    }
    assert_eq!(
        ids[0], ids[1],
        "outputs of one input keep their ids: {ids:?}"
    );
    assert_ne!(ids[0], "order-1", "an output has an id of its own");
    assert_ne!(
        ids[2], ids[3],
        "inputs without an id are told apart: {ids:?}"
    );
    assert_ne!(
        ids[4], ids[5],
        "inputs with an empty id are told apart: {ids:?}"
    );
    for id in &ids {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id} is a UUID");
    }
    assert!(!ids[2..].contains(&ids[0]), "{ids:?}");
    app.shutdown().await.unwrap();
}

#[stream_function]
fn shout(text: String) -> String {
    text.to_uppercase()
}

#[tokio::test]
async fn a_plain_fn_takes_and_returns_text_with_default_destinations() {
    let app = TestApp::start(r#"stream.function.definition = "shout""#)
        .await
        .unwrap();
    app.send("shout-in-0", "hello").await.unwrap();
    let reply = app.receive("shout-out-0", WAIT).await.expect("a reply");
    assert_eq!(reply.text(), Some("HELLO"));
    assert_eq!(
        reply.headers().get_str(header::CONTENT_TYPE),
        Some("text/plain; charset=utf-8")
    );
    app.shutdown().await.unwrap();
}

#[stream_function(output = "pm-tagged")]
async fn tag(message: Message<Order>, headers: Headers) -> Message<Invoice> {
    let tenant = headers.get_str("tenant").unwrap_or("none").to_owned();
    let key = message.key_str().unwrap_or_default().to_owned();
    let order = message.into_payload();
    Message::builder(Invoice {
        order_id: order.id,
        total_cents: order.amount_cents,
    })
    .header("tenant", tenant)
    .key(key)
    .build()
}

#[tokio::test]
async fn headers_and_keys_are_read_and_set_and_the_correlation_id_is_carried() {
    let app = TestApp::start(
        r#"
[stream]
function.definition = "tag"
[stream.bindings.tag-in-0]
destination = "pm-tag-in"
"#,
    )
    .await
    .unwrap();
    let order = Message::builder(Encoded(Order {
        id: 9,
        amount_cents: 5,
    }))
    .header("tenant", "acme")
    .header(header::CORRELATION_ID, "corr-9")
    .key("customer-3")
    .build();
    app.send("pm-tag-in", order).await.unwrap();
    let out = app
        .receive("pm-tagged", WAIT)
        .await
        .expect("a tagged invoice");
    assert_eq!(out.headers().get_str("tenant"), Some("acme"));
    assert_eq!(out.key_str(), Some("customer-3"));
    assert_eq!(
        out.headers().get_str(header::CORRELATION_ID),
        Some("corr-9")
    );
    assert_eq!(out.json::<Invoice>().unwrap().order_id, 9);
    app.shutdown().await.unwrap();
}

#[stream_function(output = "pm-echoed")]
async fn echo(message: std::sync::Arc<Message>) -> Message<bytes::Bytes> {
    let tenant = message.headers().get_str("tenant").unwrap_or("none");
    // Shared with the runtime, which holds the message until it is settled: never a copy.
    let shared = std::sync::Arc::strong_count(&message) > 1;
    Message::builder(message.payload().clone())
        .header("tenant", format!("seen {tenant}"))
        .header("shared", shared.to_string())
        .key(message.key_str().unwrap_or("no key"))
        .build()
}

#[tokio::test]
async fn a_shared_message_argument_sees_payload_headers_and_key() {
    let app = TestApp::start(
        r#"
[stream]
function.definition = "echo"
[stream.bindings.echo-in-0]
destination = "pm-echo-in"
"#,
    )
    .await
    .unwrap();
    let sent = Message::builder(bytes::Bytes::from_static(b"as it came"))
        .header("tenant", "acme")
        .key("customer-5")
        .build();
    app.send("pm-echo-in", sent).await.unwrap();
    let out = app.receive("pm-echoed", WAIT).await.expect("an echo");
    assert_eq!(&out.payload()[..], b"as it came");
    assert_eq!(out.headers().get_str("tenant"), Some("seen acme"));
    assert_eq!(out.headers().get_str("shared"), Some("true"));
    assert_eq!(out.key_str(), Some("customer-5"));
    app.shutdown().await.unwrap();
}

/// Messages a handler keeps after its call returned.
static KEPT: std::sync::Mutex<Vec<std::sync::Arc<Message>>> = std::sync::Mutex::new(Vec::new());

#[stream_function(output = "pm-kept-out")]
async fn keep(message: std::sync::Arc<Message>) -> bytes::Bytes {
    let payload = message.payload().clone();
    KEPT.lock().unwrap().push(message);
    payload
}

#[tokio::test]
async fn a_message_kept_after_its_call_stays_as_it_came_while_others_follow() {
    let app = TestApp::start(
        r#"
[stream]
function.definition = "keep"
[stream.bindings.keep-in-0]
destination = "pm-keep-in"
"#,
    )
    .await
    .unwrap();
    for n in 1..=3 {
        app.send("pm-keep-in", format!("kept {n}")).await.unwrap();
        let out = app.receive("pm-kept-out", WAIT).await.expect("an output");
        assert_eq!(out.text(), Some(format!("kept {n}").as_str()));
    }
    for n in 4..=6 {
        app.send("pm-keep-in", format!("kept {n}")).await.unwrap();
    }
    for _ in 4..=6 {
        app.receive("pm-kept-out", WAIT).await.expect("an output");
    }
    app.shutdown().await.unwrap();
    let kept: Vec<String> = KEPT
        .lock()
        .unwrap()
        .iter()
        .map(|message| String::from_utf8_lossy(message.payload()).into_owned())
        .collect();
    let expected: Vec<String> = (1..=6).map(|n| format!("kept {n}")).collect();
    assert_eq!(
        kept, expected,
        "what a handler keeps is never reused for later messages"
    );
}

#[stream_function(output = "pm-lines")]
fn split(text: String) -> Vec<String> {
    text.split(',').map(str::to_owned).collect()
}

#[stream_function(output = "pm-evens")]
fn evens(n: u64) -> Option<u64> {
    (n % 2 == 0).then_some(n)
}

#[tokio::test]
async fn vec_fans_out_and_none_sends_nothing() {
    let app = TestApp::start(r#"stream.function.definition = "split;evens""#)
        .await
        .unwrap();
    app.send("split-in-0", "a,b,c").await.unwrap();
    for expected in ["a", "b", "c"] {
        let line = app.receive("pm-lines", WAIT).await.expect("a line");
        assert_eq!(line.text(), Some(expected));
    }
    for n in [1u64, 2, 3, 4] {
        app.send_json("evens-in-0", n).await.unwrap();
    }
    assert_eq!(
        app.receive("pm-evens", WAIT)
            .await
            .unwrap()
            .json::<u64>()
            .unwrap(),
        2
    );
    assert_eq!(
        app.receive("pm-evens", WAIT)
            .await
            .unwrap()
            .json::<u64>()
            .unwrap(),
        4
    );
    assert!(app
        .receive("pm-evens", Duration::from_millis(200))
        .await
        .is_none());
    app.shutdown().await.unwrap();
}

static TICKS: AtomicU32 = AtomicU32::new(0);

#[stream_function(output = "pm-ticks", poll = "20ms")]
fn tick() -> Option<u32> {
    let n = TICKS.fetch_add(1, Ordering::SeqCst);
    (n < 3).then_some(n)
}

#[tokio::test]
async fn a_supplier_is_polled_and_none_sends_nothing_that_round() {
    let app = TestApp::start(r#"stream.function.definition = "tick""#)
        .await
        .unwrap();
    for expected in 0..3u32 {
        let tick = app.receive("pm-ticks", WAIT).await.expect("a tick");
        assert_eq!(tick.json::<u32>().unwrap(), expected);
    }
    assert!(app
        .receive("pm-ticks", Duration::from_millis(200))
        .await
        .is_none());
    assert!(
        TICKS.load(Ordering::SeqCst) > 3,
        "polling goes on after None"
    );
    app.shutdown().await.unwrap();
}

#[stream_function(output = "pm-relay")]
async fn relay(text: String, bridge: StreamBridge) -> String {
    bridge
        .send("pm-side-channel", format!("saw {text}"))
        .await
        .unwrap();
    text
}

#[tokio::test]
async fn the_bridge_sends_to_any_destination_from_a_handler() {
    let app = TestApp::start(r#"stream.function.definition = "relay""#)
        .await
        .unwrap();
    // Capture the side channel before anything is sent to it.
    assert!(app
        .receive("pm-side-channel", Duration::from_millis(1))
        .await
        .is_none());
    let ping = bindery::Message::builder(bytes::Bytes::from_static(b"ping"))
        .header(bindery::header::CORRELATION_ID, "corr-42")
        .build();
    app.send("relay-in-0", ping).await.unwrap();
    let returned = app.receive("pm-relay", WAIT).await.unwrap();
    assert_eq!(returned.text(), Some("ping"));
    let side = app.receive("pm-side-channel", WAIT).await.unwrap();
    assert_eq!(side.text(), Some("saw ping"));
    // What a handler sends through the bridge is correlated with its input, as what it returns.
    for message in [&returned, &side] {
        assert_eq!(
            message.headers().get_str(bindery::header::CORRELATION_ID),
            Some("corr-42")
        );
    }
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_function_written_by_hand_runs_like_a_registered_one() {
    use bindery::{Decoded, StreamFunction};
    let double =
        StreamFunction::function("double", |n: Decoded<u64>| async move { Encoded(n.0 * 2) })
            .input("pm-numbers")
            .output("pm-doubled");
    let app = TestApp::start_with(
        bindery::application()
            .without_registered_functions()
            .function(double),
        "",
    )
    .await
    .unwrap();
    app.send_json("pm-numbers", 21u64).await.unwrap();
    assert_eq!(
        app.receive("pm-doubled", WAIT)
            .await
            .unwrap()
            .json::<u64>()
            .unwrap(),
        42
    );
    app.shutdown().await.unwrap();
}

/// The `bindery` crate under another name, as a renamed dependency in `Cargo.toml` gives it.
mod renamed {
    pub(crate) use bindery as stream_kit;
}

#[bindery::stream_function(crate = "renamed::stream_kit", output = "pm-renamed-out")]
async fn through_a_renamed_crate(text: String) -> String {
    text.to_uppercase()
}

#[tokio::test]
async fn the_macro_reaches_bindery_by_the_path_given_in_crate() {
    let app = TestApp::start(r#"stream.function.definition = "through_a_renamed_crate""#)
        .await
        .unwrap();
    app.send("through_a_renamed_crate-in-0", "hello")
        .await
        .unwrap();
    assert_eq!(
        app.receive("pm-renamed-out", WAIT).await.unwrap().text(),
        Some("HELLO")
    );
    app.shutdown().await.unwrap();
}

static BLOCKING_STARTED: AtomicBool = AtomicBool::new(false);
static BLOCKING_RELEASED: AtomicBool = AtomicBool::new(false);
static BLOCKING_DONE: AtomicBool = AtomicBool::new(false);

/// A plain `fn` that blocks its thread until the test releases it (at most 10 s).
#[stream_function(output = "pm-blocked-out")]
fn blocks(text: String) -> String {
    BLOCKING_STARTED.store(true, SeqCst);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !BLOCKING_RELEASED.load(SeqCst) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    BLOCKING_DONE.store(true, SeqCst);
    text
}

#[stream_function(output = "pm-quick-out")]
async fn quick(text: String, context: bindery::Context) -> String {
    let _ = context;
    text
}

// One runtime thread: a plain `fn` run on it would stop everything else until it returns.
#[tokio::test(flavor = "current_thread")]
async fn a_plain_fn_that_blocks_does_not_hold_up_other_functions() {
    let app = TestApp::start(r#"stream.function.definition = "blocks;quick""#)
        .await
        .unwrap();
    app.send("blocks-in-0", "slow").await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !BLOCKING_STARTED.load(SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "`blocks` did not start"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    app.send("quick-in-0", "fast").await.unwrap();
    let fast = app.receive("pm-quick-out", WAIT).await.unwrap();
    assert_eq!(fast.text(), Some("fast"));
    assert!(
        !BLOCKING_DONE.load(SeqCst),
        "`quick` ran only once the blocking `blocks` had returned"
    );
    BLOCKING_RELEASED.store(true, SeqCst);
    assert_eq!(
        app.receive("pm-blocked-out", WAIT).await.unwrap().text(),
        Some("slow")
    );
    app.shutdown().await.unwrap();
}

/// A `Result` the macro cannot see, behind an alias.
type Checked = Result<u32, String>;

#[stream_function(output = "pm-aliased-out")]
async fn aliased(text: String) -> Checked {
    Err(format!("refusing {text}"))
}

#[tokio::test]
async fn a_result_behind_a_type_alias_is_refused_when_the_application_is_built() {
    let error = TestApp::start(r#"stream.function.definition = "aliased""#)
        .await
        .expect_err("the application is refused");
    let text = error.to_string();
    assert!(text.contains("stream function `aliased`"), "{text}");
    assert!(text.contains("write `Result<T, E>`"), "{text}");
}

/// A plain `fn` that sends through the bridge, blocking on it as synchronous code does.
#[stream_function(output = "pm-plain-relay")]
fn relay_plain(text: String, bridge: StreamBridge) -> String {
    tokio::runtime::Handle::current()
        .block_on(bridge.send("pm-plain-side", format!("saw {text}")))
        .unwrap();
    text
}

#[tokio::test]
async fn a_plain_fn_sends_through_the_bridge_with_its_inputs_correlation_id() {
    let app = TestApp::start(r#"stream.function.definition = "relay_plain""#)
        .await
        .unwrap();
    assert!(app
        .receive("pm-plain-side", Duration::from_millis(1))
        .await
        .is_none());
    let ping = bindery::Message::builder(bytes::Bytes::from_static(b"ping"))
        .header(bindery::header::CORRELATION_ID, "corr-7")
        .build();
    app.send("relay_plain-in-0", ping).await.unwrap();
    let side = app.receive("pm-plain-side", WAIT).await.unwrap();
    assert_eq!(side.text(), Some("saw ping"));
    assert_eq!(
        side.headers().get_str(bindery::header::CORRELATION_ID),
        Some("corr-7")
    );
    app.shutdown().await.unwrap();
}

/// A handler that waits before it sends through the bridge and returns: its call is kept
/// and polled again later, and must still see its input's correlation id on every poll.
async fn a_handler_that_waits_keeps_its_correlation_and_order(concurrency: u32) {
    use bindery::{StreamBridge, StreamFunction};
    let suffix = format!("c{concurrency}");
    let side = format!("pm-late-side-{suffix}");
    let output = format!("pm-late-out-{suffix}");
    let to_side = side.clone();
    let late = StreamFunction::function("late", move |text: String, bridge: StreamBridge| {
        let side = to_side.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            bridge.send(&side, format!("saw {text}")).await.unwrap();
            tokio::task::yield_now().await;
            text
        }
    })
    .input(format!("pm-late-in-{suffix}"))
    .output(output.clone());
    let toml = format!("[stream.bindings.late-in-0.consumer]\nconcurrency = {concurrency}");
    let builder = bindery::application()
        .without_registered_functions()
        .function(late);
    let app = TestApp::start_with(builder, &toml).await.unwrap();
    assert!(app.receive(&side, Duration::from_millis(1)).await.is_none());
    for n in 0..12 {
        let mut message = bindery::Message::builder(bytes::Bytes::from(format!("m{n}")))
            .header(header::CORRELATION_ID, format!("corr-{n}"))
            .header(header::TRACEPARENT, traceparent(n))
            .key("one-key")
            .build();
        if n % 2 == 0 {
            message
                .headers_mut()
                .insert(header::TRACESTATE, format!("vendor=state-{n}"));
        }
        app.send(&format!("pm-late-in-{suffix}"), message)
            .await
            .unwrap();
    }
    for n in 0..12 {
        // One key: handled, and sent, in the order the inputs arrived, at any concurrency.
        let returned = app.receive(&output, WAIT).await.expect("an output");
        assert_eq!(returned.text(), Some(format!("m{n}").as_str()));
        let correlation = Some(format!("corr-{n}"));
        assert_eq!(
            returned.headers().get_str(header::CORRELATION_ID),
            correlation.as_deref()
        );
        let sent = app.receive(&side, WAIT).await.expect("a bridge send");
        assert_eq!(sent.text(), Some(format!("saw m{n}").as_str()));
        assert_eq!(
            sent.headers().get_str(header::CORRELATION_ID),
            correlation.as_deref(),
            "a bridge send after an await carries the input's correlation id"
        );
        // One trace through the chain: both the returned output and the bridge send carry
        // the input's trace context.
        let state = (n % 2 == 0).then(|| format!("vendor=state-{n}"));
        for (what, message) in [("the output", &returned), ("the bridge send", &sent)] {
            assert_eq!(
                message.headers().get_str(header::TRACEPARENT),
                Some(traceparent(n).as_str()),
                "{what} of m{n} carries its input's traceparent"
            );
            assert_eq!(
                message.headers().get_str(header::TRACESTATE),
                state.as_deref(),
                "{what} of m{n} carries its input's tracestate, and only its own"
            );
        }
    }
    app.shutdown().await.unwrap();
}

/// A W3C `traceparent` with a trace id of its own for `n`.
fn traceparent(n: u64) -> String {
    format!("00-{n:032x}-{:016x}-01", n + 1)
}

/// A handler that starts a trace context of its own for what it returns.
#[stream_function(input = "pm-traced-in", output = "pm-traced-out")]
fn retrace(message: Message<String>) -> Message<String> {
    Message::builder(message.into_payload())
        .header(header::TRACEPARENT, traceparent(99))
        .build()
}

#[tokio::test]
async fn an_output_with_a_trace_context_of_its_own_keeps_it() {
    let app = TestApp::start(r#"stream.function.definition = "retrace""#)
        .await
        .unwrap();
    let input = Message::builder(bytes::Bytes::from_static(b"hello"))
        .header(header::TRACEPARENT, traceparent(1))
        .header(header::TRACESTATE, "vendor=of-the-input")
        .build();
    app.send("pm-traced-in", input).await.unwrap();
    let out = app.receive("pm-traced-out", WAIT).await.expect("an output");
    assert_eq!(
        out.headers().get_str(header::TRACEPARENT),
        Some(traceparent(99).as_str())
    );
    assert_eq!(
        out.headers().get_str(header::TRACESTATE),
        None,
        "the input's trace state belongs to the input's trace parent"
    );
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_handler_that_waits_keeps_its_correlation_and_order_at_concurrency_1() {
    a_handler_that_waits_keeps_its_correlation_and_order(1).await;
}

#[tokio::test]
async fn a_handler_that_waits_keeps_its_correlation_and_order_at_concurrency_4() {
    a_handler_that_waits_keeps_its_correlation_and_order(4).await;
}

/// One configuration file serves every process of a deployment: a process that binds only
/// functions of its own may still find the bindings of the registered ones configured.
#[test]
fn bindings_of_registered_functions_left_out_may_be_configured() {
    let toml = r#"
        [stream.bindings.bill-in-0.consumer]
        max-attempts = 2
        [stream.bindings.shout-in-0]
        destination = "pm-shouts"
    "#;
    let only_mine = || {
        bindery::application()
            .without_registered_functions()
            .function(bindery::StreamFunction::consumer(
                "mine",
                |_: String| async {},
            ))
            .environment(Vec::<(String, String)>::new())
    };
    let built = only_mine().config_str("application.toml", toml).build();
    let app = built.expect("the left-out functions' bindings are accepted");
    let bound: Vec<String> = app.bindings().into_iter().map(|b| b.name).collect();
    assert_eq!(bound, ["mine-in-0"], "only the function added is bound");
    let misspelled = only_mine()
        .config_str(
            "application.toml",
            "[stream.bindings.bil-in-0]\ngroup = \"x\"",
        )
        .build()
        .expect_err("a binding of no function at all is still refused");
    assert!(
        misspelled.to_string().contains("did you mean `bill-in-0`?"),
        "{misspelled}"
    );
}

/// Sends to the memory binder, recording every producer it was asked for.
#[derive(Debug, Default)]
struct RecordingBinder {
    inner: bindery::MemoryBinder,
    producers: std::sync::Mutex<Vec<bindery::binder::ProducerSpec>>,
}

#[async_trait::async_trait]
impl bindery::Binder for RecordingBinder {
    async fn subscribe(
        &self,
        spec: &bindery::binder::ConsumerSpec,
    ) -> Result<Box<dyn bindery::binder::Subscription>, bindery::Error> {
        self.inner.subscribe(spec).await
    }

    async fn producer(
        &self,
        spec: &bindery::binder::ProducerSpec,
    ) -> Result<std::sync::Arc<dyn bindery::binder::Producer>, bindery::Error> {
        self.producers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(spec.clone());
        self.inner.producer(spec).await
    }
}

/// A process that only sends still tells its binder how the consumers of its `required-groups`
/// will declare their subscriptions, when it knows them as registered functions it leaves out:
/// whichever process of a deployment starts first creates them alike.
#[tokio::test]
async fn required_groups_carry_the_consumers_that_other_processes_bind() {
    let toml = r#"
        [stream]
        output-bindings = ["placed"]
        [stream.bindings.placed-out-0]
        destination = "pm-orders"
        producer.required-groups = ["billing", "unknown-group"]
        [stream.bindings.bill-in-0.consumer]
        dlq = true
        max-attempts = 2
        [stream.bindings.shout-in-0]
        destination = "pm-elsewhere"
        group = "billing"
    "#;
    let binder = std::sync::Arc::new(RecordingBinder::default());
    let app = bindery::application()
        .without_registered_functions()
        .environment(Vec::<(String, String)>::new())
        .config_str("application.toml", toml)
        .replace_binders(binder.clone())
        .build()
        .expect("valid")
        .start()
        .await
        .expect("started");
    app.bridge()
        .send("placed-out-0", "an order")
        .await
        .expect("sent");
    app.shutdown().await.expect("shut down");
    let producers = binder.producers.lock().unwrap_or_else(|p| p.into_inner());
    let placed = producers
        .iter()
        .find(|p| p.binding == "placed-out-0")
        .expect("the output's producer was created");
    assert!(
        placed.required_group_consumers.is_empty(),
        "nothing is bound here"
    );
    let elsewhere: Vec<_> = placed
        .required_group_consumers_elsewhere
        .iter()
        .map(|c| {
            (
                c.binding.as_str(),
                c.destination.as_str(),
                c.group.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        elsewhere,
        [("bill-in-0", "pm-orders", Some("billing"))],
        "only the left-out consumer of this destination and a required group"
    );
    let bill = &placed.required_group_consumers_elsewhere[0];
    assert!(
        bill.properties.dlq,
        "with its configured dead-letter setting"
    );
    assert_eq!(bill.properties.max_attempts, 2);
}

#[stream_function(input = "pm-plain-in", output = "pm-plain-out", group = "g")]
async fn plain(order: Order) -> Result<Invoice, BillingError> {
    bill(order).await
}

#[stream_function(input = "pm-seen-in", output = "pm-seen-out")]
async fn seen(_order: Order, headers: Headers) -> String {
    headers
        .get_str(header::CORRELATION_ID)
        .unwrap_or("none")
        .to_owned()
}

/// An order with the message id `id` and no correlation id.
fn order_with_id(id: &str, amount_cents: u64) -> Message<Encoded<Order>> {
    Message::builder(Encoded(Order {
        id: 1,
        amount_cents,
    }))
    .header(header::MESSAGE_ID, id)
    .build()
}

#[tokio::test]
async fn an_input_without_a_correlation_id_hands_its_message_id_on_whatever_its_handler_takes() {
    let app = TestApp::start(
        r#"
[stream]
function.definition = "plain;seen"
[stream.bindings.plain-in-0.consumer]
max-attempts = 1
dlq = true
"#,
    )
    .await
    .unwrap();
    let sees_headers = |name: &str| {
        bindery::registered_functions()
            .into_iter()
            .find(|function| function.name() == name)
            .map(|function| function.sees_headers())
    };
    assert_eq!(sees_headers("plain"), Some(false), "a payload alone");
    assert_eq!(sees_headers("seen"), Some(true), "`Headers`");
    assert_eq!(sees_headers("tag"), Some(true), "`Message<T>`");
    assert_eq!(sees_headers("echo"), Some(true), "`Arc<Message>`");
    // A handler that takes only the payload: its input is not copied to carry the id, yet
    // its outputs and its dead letters carry it.
    app.send("pm-plain-in", order_with_id("order-1", 5))
        .await
        .unwrap();
    let invoice = app.receive("pm-plain-out", WAIT).await.expect("an invoice");
    assert_eq!(
        invoice.headers().get_str(header::CORRELATION_ID),
        Some("order-1")
    );
    app.send("pm-plain-in", order_with_id("order-2", 0))
        .await
        .unwrap();
    let dead = app
        .receive_dead_letter("pm-plain-in", "g", WAIT)
        .await
        .expect("a dead letter");
    assert_eq!(
        dead.headers().get_str(header::CORRELATION_ID),
        Some("order-2")
    );
    assert_eq!(dead.headers().get_str(header::MESSAGE_ID), Some("order-2"));
    // A handler that takes the headers sees the correlation id its outputs get.
    app.send("pm-seen-in", order_with_id("order-3", 5))
        .await
        .unwrap();
    let out = app.receive("pm-seen-out", WAIT).await.expect("an answer");
    assert_eq!(&out.payload()[..], b"order-3");
    assert_eq!(
        out.headers().get_str(header::CORRELATION_ID),
        Some("order-3")
    );
    app.shutdown().await.unwrap();
}
