//! The delivery engine's promises, checked with a stub binder (the memory binder with slow or
//! failing confirmations, recorded acknowledgements, or a close that never returns).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bindery::binder::{
    Acknowledgement, Confirmation, ConsumerSpec, Delivery, Producer, ProducerSpec, Subscription,
};
use bindery::{header, Binder, Error, MemoryBinder, Message, StreamFunction};
use bytes::Bytes;

/// What happened, in order: `refused:<correlation id>`, `confirmed:<correlation id>`,
/// `acked:<id>`, `requeued:<id>`, `called:<id>`.
type Log = Arc<Mutex<Vec<String>>>;

fn record(log: &Log, event: String) {
    log.lock().expect("log").push(event);
}

fn events(log: &Log, prefix: &str) -> Vec<String> {
    log.lock()
        .expect("log")
        .iter()
        .filter_map(|e| e.strip_prefix(prefix).map(str::to_owned))
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Stub {
    memory: MemoryBinder,
    log: Log,
    confirm_delay: Duration,
    /// Sends fail until then.
    broken_until: Option<Instant>,
    in_order: bool,
    hang_on_close: bool,
    /// Subscriptions end at once, as when the broker cancels the consumer for good.
    ended: bool,
    /// Subscriptions can drain at shutdown: they yield what is already there, then end.
    drains: bool,
    /// Subscribing takes this long, as on a broker.
    subscribe_delay: Duration,
    /// Subscribing to this destination fails.
    refused_destination: Option<&'static str>,
    /// This destination refuses for good (as a broker refuses a message too large) what is
    /// sent to it: everything, or only the payload given.
    refuses_for_good: Option<(&'static str, Option<&'static str>)>,
    /// Until then only, when set.
    refuses_until: Option<Instant>,
    /// Making a producer for this destination never finishes, as a provisioning that hangs.
    hangs_producing: Option<&'static str>,
}

#[async_trait]
impl Binder for Stub {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        tokio::time::sleep(self.subscribe_delay).await;
        if self.refused_destination == Some(spec.destination.as_str()) {
            return Err(Error::binder("stub", "the broker refused the subscription"));
        }
        record(&self.log, format!("subscribed:{}", spec.destination));
        Ok(Box::new(StubSubscription {
            inner: self.memory.subscribe(spec).await?,
            stub: self.clone(),
            draining: false,
        }))
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error> {
        record(&self.log, format!("producing:{}", spec.destination));
        if self.hangs_producing == Some(spec.destination.as_str()) {
            std::future::pending::<()>().await;
        }
        Ok(Arc::new(StubProducer {
            inner: self.memory.producer(spec).await?,
            stub: self.clone(),
            destination: spec.destination.clone(),
        }))
    }

    async fn close(&self) -> Result<(), Error> {
        record(&self.log, "closed:binder".to_owned());
        if self.hang_on_close {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct StubSubscription {
    inner: Box<dyn Subscription>,
    stub: Stub,
    draining: bool,
}

#[async_trait]
impl Subscription for StubSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        if self.stub.ended {
            return None;
        }
        let next = match self.draining {
            true => futures::FutureExt::now_or_never(self.inner.next()).flatten(),
            false => self.inner.next().await,
        };
        let mut delivery = match next? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error)),
        };
        let id = delivery
            .message
            .headers()
            .get_str(header::MESSAGE_ID)
            .unwrap_or_default()
            .to_owned();
        delivery.acknowledgement = Box::new(StubAck {
            inner: delivery.acknowledgement,
            id,
            log: self.stub.log.clone(),
        });
        Some(Ok(delivery))
    }

    fn acknowledges_in_order(&self) -> bool {
        self.stub.in_order
    }

    async fn drain(&mut self) -> bool {
        self.draining = self.stub.drains;
        self.draining
    }
}

#[derive(Debug)]
struct StubAck {
    inner: Box<dyn Acknowledgement>,
    id: String,
    log: Log,
}

#[async_trait]
impl Acknowledgement for StubAck {
    async fn ack(self: Box<Self>) -> Result<(), Error> {
        record(&self.log, format!("acked:{}", self.id));
        self.inner.ack().await
    }

    async fn requeue(self: Box<Self>) -> Result<(), Error> {
        record(&self.log, format!("requeued:{}", self.id));
        self.inner.requeue().await
    }
}

#[derive(Debug)]
struct StubProducer {
    inner: Arc<dyn Producer>,
    stub: Stub,
    destination: String,
}

#[async_trait]
impl Producer for StubProducer {
    async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error> {
        if let Some((destination, only)) = self.stub.refuses_for_good {
            if destination == self.destination
                && only.map_or(true, |only| only.as_bytes() == &message.payload()[..])
                && self
                    .stub
                    .refuses_until
                    .map_or(true, |until| Instant::now() < until)
            {
                let id = message
                    .headers()
                    .get_str(header::CORRELATION_ID)
                    .unwrap_or_default();
                record(
                    &self.stub.log,
                    format!("refused-for-good:{destination}:{id}"),
                );
                return Err(Error::refused("stub", "the message is too large"));
            }
        }
        if self.stub.broken_until.is_some_and(|t| Instant::now() < t) {
            // A supplier's messages have no correlation id: they are named by their own.
            let id = message
                .headers()
                .get_str(header::CORRELATION_ID)
                .or_else(|| message.headers().get_str(header::MESSAGE_ID))
                .unwrap_or_default();
            record(&self.stub.log, format!("refused:{id}"));
            return Err(Error::binder("stub", "the broker is down"));
        }
        self.inner.enqueue(message).await?.await?;
        let correlation = message
            .headers()
            .get_str(header::CORRELATION_ID)
            .unwrap_or_default()
            .to_owned();
        let (log, delay) = (self.stub.log.clone(), self.stub.confirm_delay);
        Ok(Confirmation::pending(async move {
            tokio::time::sleep(delay).await;
            record(&log, format!("confirmed:{correlation}"));
            Ok(())
        }))
    }
}

fn order(id: usize, key: &str) -> Message {
    Message::builder(Bytes::from(id.to_string()))
        .header(header::MESSAGE_ID, format!("order-{id}"))
        .key(key)
        .build()
}

/// `echo`: orders → invoices, the payload unchanged; `poison` keys fail.
fn echo(log: Log) -> StreamFunction {
    StreamFunction::function("echo", move |message: Message<Bytes>| {
        let log = log.clone();
        async move {
            let id = message
                .headers()
                .get_str(header::MESSAGE_ID)
                .unwrap_or_default()
                .to_owned();
            record(&log, format!("called:{id}"));
            let wait = message
                .headers()
                .get_str("x-work-ms")
                .and_then(|ms| ms.parse().ok());
            if let Some(ms) = wait {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if message.key_str() == Some("poison") {
                return Err(format!("{id} is poison"));
            }
            Ok(message.into_payload())
        }
    })
    .input("orders")
    .output("invoices")
    .group("billing")
}

struct Harness {
    stub: Stub,
    app: bindery::RunningApplication,
    invoices: Box<dyn Subscription>,
    dead: Box<dyn Subscription>,
    orders: Arc<dyn Producer>,
}

async fn start(stub: Stub, consumer: &str) -> Harness {
    let dlq = if consumer.contains("dlq") {
        ""
    } else {
        "dlq = true"
    };
    let toml = format!(
        "[stream]\nshutdown-timeout = \"1s\"\n[stream.bindings.echo-in-0.consumer]\n{dlq}\n{consumer}"
    );
    let invoices = stub
        .memory
        .subscribe(&ConsumerSpec::new("invoices", Some("test")))
        .await
        .expect("invoices");
    let dead = stub
        .memory
        .subscribe(&ConsumerSpec::new("orders.billing.dlq", Some("test")))
        .await
        .expect("dead letters");
    let app = run_on(&stub, echo(stub.log.clone()), &toml).await;
    let orders = stub
        .memory
        .producer(&ProducerSpec::new("orders"))
        .await
        .expect("producer");
    Harness {
        stub,
        app,
        invoices,
        dead,
        orders,
    }
}

async fn receive(subscription: &mut Box<dyn Subscription>, within: Duration) -> Option<Message> {
    let delivery = tokio::time::timeout(within, subscription.next())
        .await
        .ok()??
        .ok()?;
    delivery.acknowledgement.ack().await.ok()?;
    Some(Arc::unwrap_or_clone(delivery.message))
}

fn payload(message: &Message) -> String {
    String::from_utf8_lossy(message.payload()).into_owned()
}

#[tokio::test]
async fn confirmations_are_awaited_in_the_background_and_outputs_keep_input_order() {
    let stub = Stub {
        confirm_delay: Duration::from_millis(50),
        ..Stub::default()
    };
    let mut h = start(stub, "").await;
    let started = Instant::now();
    for id in 0..1_000 {
        h.orders
            .send(order(id, &format!("k{}", id % 7)))
            .await
            .expect("send");
    }
    for id in 0..1_000 {
        let invoice = receive(&mut h.invoices, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("invoice {id} did not come"));
        assert_eq!(payload(&invoice), id.to_string(), "outputs in input order");
    }
    // Waiting for each 50 ms confirm in turn would take 50 s; pipelined it takes a fraction.
    let deadline = Instant::now() + Duration::from_secs(30);
    while events(&h.stub.log, "acked:").len() < 1_000 {
        assert!(
            Instant::now() < deadline,
            "not every order was acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "1,000 orders with 50 ms confirms took {elapsed:?}: confirms were awaited one by one"
    );
    h.app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_broker_outage_longer_than_the_retries_loses_nothing_and_acknowledges_nothing_early() {
    let stub = Stub {
        broken_until: Some(Instant::now() + Duration::from_secs(10)),
        ..Stub::default()
    };
    // max-attempts = 3, default back-off (1s, 2s, 4s, ...), no DLQ.
    let mut h = start(stub, "dlq = false\nmax-attempts = 3").await;
    for id in 0..20 {
        h.orders
            .send(order(id, &format!("k{id}")))
            .await
            .expect("send");
    }
    let mut received = std::collections::BTreeSet::new();
    while received.len() < 20 {
        let invoice = receive(&mut h.invoices, Duration::from_secs(40))
            .await
            .expect("every order is invoiced once the broker is back");
        received.insert(payload(&invoice));
    }
    let refused = events(&h.stub.log, "refused:").len();
    assert!(
        refused >= 20,
        "every order's invoice was refused at least once while the broker was down ({refused})"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&h.stub.log, "acked:").len() < 20 {
        assert!(
            Instant::now() < deadline,
            "not every order was acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = h.stub.log.lock().expect("log").clone();
    for id in 0..20 {
        let confirmed = log
            .iter()
            .position(|e| e == &format!("confirmed:order-{id}"));
        let acked = log.iter().position(|e| e == &format!("acked:order-{id}"));
        assert!(
            matches!((confirmed, acked), (Some(c), Some(a)) if c < a),
            "order-{id} was acknowledged before its invoice was confirmed: {log:?}"
        );
    }
    h.app.shutdown().await.expect("shutdown");
}

/// `ticker`: polled every 50 ms, it supplies "0", "1", "2", ... to `invoices`.
async fn start_ticker(stub: &Stub) -> (bindery::RunningApplication, Box<dyn Subscription>) {
    let invoices = stub
        .memory
        .subscribe(&ConsumerSpec::new("invoices", Some("test")))
        .await
        .expect("invoices");
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = StreamFunction::supplier("ticker", move || {
        let call = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { call.to_string() }
    })
    .output("invoices")
    .poll("50ms");
    let app = run_on(stub, ticker, "[stream]\nshutdown-timeout = \"1s\"").await;
    (app, invoices)
}

/// `function` alone, configured by `toml`, started on `stub`.
async fn run_on(stub: &Stub, function: StreamFunction, toml: &str) -> bindery::RunningApplication {
    bindery::test::isolated(function, toml)
        .replace_binders(Arc::new(stub.clone()))
        .build()
        .expect("configuration")
        .start()
        .await
        .expect("start")
}

#[tokio::test]
async fn a_suppliers_message_the_broker_does_not_take_is_sent_again_and_none_is_lost() {
    // Down from before the supplier's first call until after it: refused at least once.
    let stub = Stub {
        broken_until: Some(Instant::now() + Duration::from_secs(3)),
        ..Stub::default()
    };
    let ((), log) = logged(async {
    let (app, mut invoices) = start_ticker(&stub).await;
    let first = receive(&mut invoices, Duration::from_secs(30))
        .await
        .expect("the first message, once the broker is back");
    assert_eq!(payload(&first), "0", "the first message is not lost");
    let refused = events(&stub.log, "refused:");
    assert!(!refused.is_empty(), "it was refused first: {refused:?}");
    let id = first.headers().get_str(header::MESSAGE_ID).expect("an id");
    assert!(
        refused.iter().all(|refused| refused == id),
        "only the first message was sent while the broker was down, always with its id {id}: {refused:?}"
    );
    for expected in 1..5 {
        let next = receive(&mut invoices, Duration::from_secs(10))
            .await
            .expect("the next message");
        assert_eq!(payload(&next), expected.to_string(), "in order, none lost");
    }
    app.shutdown().await.expect("shutdown");
    })
    .await;
    assert!(
        !log.contains("may not have been sent"),
        "every message was confirmed, and none is said to be unsent: {log}"
    );
}

#[tokio::test]
async fn a_suppliers_message_refused_for_good_is_dropped_and_the_supplier_goes_on() {
    let stub = Stub {
        refuses_for_good: Some(("invoices", Some("1"))),
        ..Stub::default()
    };
    let (app, mut invoices) = start_ticker(&stub).await;
    let mut received = Vec::new();
    for _ in 0..3 {
        let next = receive(&mut invoices, Duration::from_secs(10))
            .await
            .expect("the supplier goes on");
        received.push(payload(&next));
    }
    assert_eq!(
        received,
        ["0", "2", "3"],
        "the refused message is not sent again"
    );
    app.shutdown().await.expect("shutdown");
}

/// Waits until the input with the message id `id` was acknowledged.
async fn acknowledged(log: &Log, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !events(log, "acked:").iter().any(|acked| acked == id) {
        assert!(
            Instant::now() < deadline,
            "{id} was not acknowledged: {:?}",
            log.lock().expect("log")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_output_the_broker_refuses_for_good_dead_letters_its_input_with_the_reason() {
    let stub = Stub {
        refuses_for_good: Some(("invoices", Some("3"))),
        ..Stub::default()
    };
    let mut h = start(stub, "").await;
    for id in 0..6 {
        h.orders
            .send(order(id, &format!("k{id}")))
            .await
            .expect("send");
    }
    let mut invoiced = std::collections::BTreeSet::new();
    while invoiced.len() < 5 {
        let invoice = receive(&mut h.invoices, Duration::from_secs(10))
            .await
            .expect("the other orders are invoiced");
        invoiced.insert(payload(&invoice));
    }
    assert!(!invoiced.contains("3"), "{invoiced:?}");
    let letter = receive(&mut h.dead, Duration::from_secs(10))
        .await
        .expect("the refused order is dead-lettered");
    assert_eq!(
        letter.headers().message_id().map(|id| &id[..]),
        Some(&b"order-3"[..])
    );
    assert_eq!(
        letter.headers().get_str(header::EXCEPTION_TYPE),
        Some("bindery::SendRefused")
    );
    let reason = letter
        .headers()
        .get_str(header::EXCEPTION_MESSAGE)
        .unwrap_or_default();
    assert!(reason.contains("too large"), "{reason}");
    acknowledged(&h.stub.log, "order-3", Duration::from_secs(10)).await;
    assert_eq!(
        events(&h.stub.log, "refused-for-good:").len(),
        1,
        "a refusal for good is not sent again"
    );
    assert!(events(&h.stub.log, "requeued:").is_empty());
    h.app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_dead_letter_the_broker_refuses_is_sent_again_until_taken_and_the_input_waits_for_it() {
    let stub = Stub {
        refuses_for_good: Some(("orders.billing.dlq", None)),
        refuses_until: Some(Instant::now() + Duration::from_secs(3)),
        ..Stub::default()
    };
    let mut h = start(stub, "max-attempts = 1").await;
    h.orders.send(order(0, "poison")).await.expect("send");
    for id in 1..4 {
        h.orders
            .send(order(id, &format!("k{id}")))
            .await
            .expect("send");
    }
    let mut invoiced = std::collections::BTreeSet::new();
    while invoiced.len() < 3 {
        let invoice = receive(&mut h.invoices, Duration::from_secs(10))
            .await
            .expect("other messages flow while the dead letter is refused");
        invoiced.insert(payload(&invoice));
    }
    let letter = receive(&mut h.dead, Duration::from_secs(15))
        .await
        .expect("the dead letter is taken once the destination takes it");
    assert_eq!(
        letter.headers().message_id().map(|id| &id[..]),
        Some(&b"order-0"[..])
    );
    acknowledged(&h.stub.log, "order-0", Duration::from_secs(5)).await;
    let log = h.stub.log.lock().expect("log").clone();
    let refusals: Vec<usize> = (0..log.len())
        .filter(|&at| log[at] == "refused-for-good:orders.billing.dlq:order-0")
        .collect();
    let acked = log.iter().position(|e| e == "acked:order-0");
    assert!(refusals.len() >= 2, "sent again after a refusal: {log:?}");
    assert!(
        acked > refusals.last().copied(),
        "the input was acknowledged while its dead letter was refused: {log:?}"
    );
    h.app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_destination_being_provisioned_holds_back_only_the_bridge_sends_to_it() {
    let stub = Stub {
        hangs_producing: Some("never-ready"),
        ..Stub::default()
    };
    let mut h = start(stub, "").await;
    let bridge = h.app.bridge();
    let stuck = tokio::spawn({
        let bridge = bridge.clone();
        async move { bridge.send("never-ready", "lost in provisioning").await }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !events(&h.stub.log, "producing:").contains(&"never-ready".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "the first send never asked for its producer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), bridge.send("invoices", "through"))
        .await
        .expect("a send to another destination is not held back")
        .expect("sent");
    let through = receive(&mut h.invoices, Duration::from_secs(5))
        .await
        .expect("the send got through");
    assert_eq!(payload(&through), "through");
    assert!(!stuck.is_finished());
    stuck.abort();
    h.app.shutdown().await.expect("shutdown");
}

async fn a_key_in_back_off_holds_back_only_itself(concurrency: u32) {
    let consumer = format!(
        "concurrency = {concurrency}\nmax-attempts = 3\nback-off-initial-interval = \"1s\"\nback-off-max-interval = \"2s\""
    );
    let mut h = start(Stub::default(), &consumer).await;
    h.orders.send(order(0, "poison")).await.expect("send");
    for id in 1..=20 {
        h.orders
            .send(order(id, &format!("k{id}")))
            .await
            .expect("send");
    }
    h.orders.send(order(21, "poison")).await.expect("send");
    // The poison order waits 1 s + 2 s in back-off; everything else flows meanwhile.
    for _ in 1..=20 {
        let invoice = receive(&mut h.invoices, Duration::from_secs(2))
            .await
            .expect("other keys flow while the poison key waits");
        assert_ne!(payload(&invoice), "0");
    }
    assert!(
        events(&h.stub.log, "acked:")
            .iter()
            .all(|id| id != "order-0"),
        "the poison order is still in back-off"
    );
    let first = receive(&mut h.dead, Duration::from_secs(10))
        .await
        .expect("dead letter 0");
    let second = receive(&mut h.dead, Duration::from_secs(10))
        .await
        .expect("dead letter 21");
    assert_eq!(
        (payload(&first), payload(&second)),
        ("0".to_owned(), "21".to_owned())
    );
    let calls = events(&h.stub.log, "called:");
    let last_of_first = calls
        .iter()
        .rposition(|c| c == "order-0")
        .expect("0 was called");
    let first_of_second = calls
        .iter()
        .position(|c| c == "order-21")
        .expect("21 was called");
    assert!(
        last_of_first < first_of_second,
        "the later poison order ran before the earlier one was done: {calls:?}"
    );
    h.app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_key_in_back_off_holds_back_only_itself_at_concurrency_1() {
    a_key_in_back_off_holds_back_only_itself(1).await;
}

#[tokio::test]
async fn a_key_in_back_off_holds_back_only_itself_at_concurrency_4() {
    a_key_in_back_off_holds_back_only_itself(4).await;
}

#[tokio::test]
async fn acknowledgements_follow_arrival_order_when_the_subscription_asks() {
    let stub = Stub {
        in_order: true,
        ..Stub::default()
    };
    let mut h = start(stub, "concurrency = 4").await;
    for id in 0..40 {
        // Later orders finish first: each takes less work than the one before.
        let mut message = order(id, &format!("k{id}"));
        message
            .headers_mut()
            .insert("x-work-ms", ((40 - id) * 3).to_string());
        h.orders.send(message).await.expect("send");
    }
    for _ in 0..40 {
        receive(&mut h.invoices, Duration::from_secs(10))
            .await
            .expect("invoice");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&h.stub.log, "acked:").len() < 40 {
        assert!(
            Instant::now() < deadline,
            "not every order was acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected: Vec<String> = (0..40).map(|id| format!("order-{id}")).collect();
    assert_eq!(events(&h.stub.log, "acked:"), expected);
    h.app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn shutdown_is_bounded_when_a_binder_will_not_close() {
    let stub = Stub {
        hang_on_close: true,
        ..Stub::default()
    };
    let h = start(stub, "").await;
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), h.app.shutdown())
        .await
        .expect("shutdown returned");
    let elapsed = started.elapsed();
    let error = result.expect_err("a binder that did not close is an error");
    assert!(error.to_string().contains("did not close"), "{error}");
    assert!(error.to_string().contains("binder `"), "{error}");
    assert!(
        elapsed < Duration::from_millis(2_000),
        "shutdown took {elapsed:?} with a 1 s shutdown-timeout"
    );
}

#[tokio::test]
async fn a_binding_whose_subscription_ends_stops_the_application_with_its_name() {
    let stub = Stub {
        ended: true,
        ..Stub::default()
    };
    let application = bindery::test::isolated(echo(stub.log.clone()), "")
        .replace_binders(Arc::new(stub))
        .build()
        .expect("configuration");
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        application.run_until(std::future::pending()),
    )
    .await
    .expect("the application stopped by itself");
    let error = outcome.expect_err("a dead binding is an error");
    assert!(error.to_string().contains("echo-in-0"), "{error}");
    assert!(error.to_string().contains("subscription ended"), "{error}");
}

/// Sends 20 orders of 2 ms work each, shuts down once 3 were handled, and returns how many
/// orders were acknowledged and how many handed back. (The drain may take half of the
/// harness's 1 s `shutdown-timeout`.)
async fn shut_down_with_a_backlog(drains: bool) -> (usize, usize) {
    let stub = Stub {
        drains,
        ..Stub::default()
    };
    let h = start(stub, "").await;
    for id in 0..20 {
        let mut message = order(id, "k");
        message.headers_mut().insert("x-work-ms", "2");
        h.orders.send(message).await.expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&h.stub.log, "called:").len() < 3 {
        assert!(Instant::now() < deadline, "the orders were not handled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.app.shutdown().await.expect("shutdown");
    (
        events(&h.stub.log, "acked:").len(),
        events(&h.stub.log, "requeued:").len(),
    )
}

#[tokio::test]
async fn a_draining_subscription_has_what_it_received_handled_before_shutdown() {
    let (acked, requeued) = shut_down_with_a_backlog(true).await;
    assert_eq!((acked, requeued), (20, 0), "drained: every order handled");
    // The same backlog without draining is handed back: the case above shows a difference.
    let (acked, requeued) = shut_down_with_a_backlog(false).await;
    assert!(
        requeued > 0,
        "without draining, orders go back ({acked} acked)"
    );
}

/// `a-forward` (`startup-in` → `startup-mid`) and `b-count` (`startup-mid`, counting): in name
/// order, the forwarder comes first. A send that fails would be tried again only after an hour.
fn forward_then_count(stub: &Stub, counted: Log) -> bindery::Application {
    let log = stub.log.clone();
    let forward = StreamFunction::function("a-forward", move |text: String| {
        let log = log.clone();
        async move {
            record(&log, format!("called:{text}"));
            text
        }
    })
    .input("startup-in")
    .output("startup-mid")
    .group("g");
    let count = StreamFunction::consumer("b-count", move |text: String| {
        let counted = counted.clone();
        async move { record(&counted, text) }
    })
    .input("startup-mid")
    .group("g");
    let toml = r#"[stream.bindings.a-forward-in-0.consumer]
back-off-initial-interval = "1h"
back-off-max-interval = "1h""#;
    bindery::Application::builder()
        .without_registered_functions()
        .function(forward)
        .function(count)
        .config_str("application.toml", toml)
        .environment(Vec::<(String, String)>::new())
        .replace_binders(Arc::new(stub.clone()))
        .build()
        .expect("configuration")
}

#[tokio::test]
async fn every_input_is_subscribed_before_any_function_runs() {
    let stub = Stub {
        subscribe_delay: Duration::from_millis(300),
        ..Stub::default()
    };
    // Orders wait for the forwarder before the application starts.
    let mut spec = ProducerSpec::new("startup-in");
    spec.properties.required_groups = vec!["g".to_owned()];
    let orders = stub.memory.producer(&spec).await.expect("producer");
    for n in 0..5 {
        orders
            .send(Message::new(Bytes::from(format!("order {n}"))))
            .await
            .expect("send");
    }
    let counted: Log = Log::default();
    let app = forward_then_count(&stub, counted.clone())
        .start()
        .await
        .expect("start");
    // Had the forwarder run before `b-count` subscribed, its sends would have found no
    // consumer, and waited an hour to be tried again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted.lock().expect("log").len() < 5 {
        assert!(
            Instant::now() < deadline,
            "only {:?} were counted",
            counted.lock().expect("log")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every input was subscribed before the first handler call.
    let log = stub.log.lock().expect("log").clone();
    let first_call = log.iter().position(|e| e.starts_with("called:"));
    let last_subscribe = log.iter().rposition(|e| e.starts_with("subscribed:"));
    assert!(
        matches!((last_subscribe, first_call), (Some(s), Some(c)) if s < c),
        "a handler ran before every input was subscribed: {log:?}"
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_startup_that_fails_midway_closes_the_binders_it_connected() {
    let stub = Stub {
        refused_destination: Some("startup-mid"),
        ..Stub::default()
    };
    let error = forward_then_count(&stub, Log::default())
        .start()
        .await
        .expect_err("b-count cannot subscribe");
    assert!(
        error.to_string().contains("refused the subscription"),
        "{error}"
    );
    assert_eq!(
        events(&stub.log, "closed:"),
        ["binder"],
        "the binder was closed"
    );
}

/// What `run` returns, and what the application logged meanwhile on this thread, as text.
async fn logged<T, F: std::future::Future<Output = T>>(run: F) -> (T, String) {
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // Whether a log line is wanted is cached per line, process-wide: another test may have
    // reached it first, without a subscriber.
    tracing::callsite::rebuild_interest_cache();
    let returned = run.await;
    let text = lines.0.lock().expect("lines").clone();
    (returned, String::from_utf8_lossy(&text).into_owned())
}

#[tokio::test]
async fn a_suppliers_message_unconfirmed_when_shutdown_gives_up_is_logged_with_its_id() {
    // The broker never answers within the shutdown's second: the supplier's task is aborted.
    let stub = Stub {
        confirm_delay: Duration::from_secs(60),
        ..Stub::default()
    };
    let (id, log) = logged(async {
        let (app, mut invoices) = start_ticker(&stub).await;
        // The first message reaches the broker; its confirmation is what never comes.
        let first = receive(&mut invoices, Duration::from_secs(10))
            .await
            .expect("the first message reaches the broker");
        let id = first
            .headers()
            .get_str(header::MESSAGE_ID)
            .expect("an id")
            .to_owned();
        let began = Instant::now();
        app.shutdown().await.expect("shutdown");
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "shutdown is bounded by its timeout: {:?}",
            began.elapsed()
        );
        id
    })
    .await;
    let unsent: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("may not have been sent"))
        .collect();
    assert_eq!(unsent.len(), 1, "one message was unconfirmed: {log}");
    assert!(
        unsent[0].contains("ERROR") && unsent[0].contains(&id),
        "the unconfirmed message {id} is logged at error level: {log}"
    );
}
