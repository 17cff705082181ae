//! The binder conformance suite: one set of behaviour tests that every binder runs against
//! itself, so the core contract holds on each broker.
//!
//! A binder crate runs all of it with one line in a test file:
//!
//! ```ignore
//! bindery_core::conformance_tests!(bindery_core::conformance::Suite::new(|| async {
//!     Ok(std::sync::Arc::new(bindery_core::MemoryBinder::new()) as std::sync::Arc<dyn bindery_core::Binder>)
//! }));
//! ```
//!
//! Every case uses destinations and groups of its own, named with a random suffix.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::binder::{Binder, ConsumerSpec, Delivery, ProducerSpec, Subscription, TryEnqueue};
use crate::partition::partition_of_key;
use crate::{header, Application, BindingState, Error, Message, StreamFunction};

type BinderFactory =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Binder>, Error>> + Send + Sync>;
type DeadLetterReader = Arc<
    dyn Fn(
            Arc<dyn Binder>,
            ConsumerSpec,
        ) -> BoxFuture<'static, Result<Box<dyn Subscription>, Error>>
        + Send
        + Sync,
>;

/// The suite, set up for one binder.
#[derive(Clone)]
pub struct Suite {
    factory: BinderFactory,
    sharing: Option<BinderFactory>,
    dead_letters: DeadLetterReader,
    timeout: Duration,
    quiet: Duration,
    enabled: bool,
    tells_lag: bool,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Suite {
    /// A suite that makes a fresh binder for each case with `factory`.
    pub fn new<F, Fut>(factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Binder>, Error>> + Send + 'static,
    {
        Suite {
            factory: Arc::new(move || Box::pin(factory())),
            sharing: None,
            dead_letters: Arc::new(|binder, spec| {
                Box::pin(async move {
                    let reader =
                        ConsumerSpec::new(spec.dlq_destination(), Some("conformance-dlq-reader"));
                    binder.subscribe(&reader).await
                })
            }),
            timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            enabled: true,
            tells_lag: true,
        }
    }

    /// How long to wait for an expected message (default 10s; brokers with slow group joins
    /// need more).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the cases only when `enabled` (see [`crate::testing::require_broker`]).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// For a binder whose [`Binder::lag`] cannot tell (answers `None`).
    pub fn without_lag(mut self) -> Self {
        self.tells_lag = false;
        self
    }

    /// Whether the cases run.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// How long to watch for a message that must not come (default 300ms).
    pub fn quiet_period(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// How the suite reads a consumer's dead-letter destination, for binders whose dead letters
    /// are not an ordinary destination (the default subscribes to
    /// [`ConsumerSpec::dlq_destination`] with a group of its own).
    pub fn dead_letter_reader<F, Fut>(mut self, reader: F) -> Self
    where
        F: Fn(Arc<dyn Binder>, ConsumerSpec) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Box<dyn Subscription>, Error>> + Send + 'static,
    {
        self.dead_letters = Arc::new(move |binder, spec| Box::pin(reader(binder, spec)));
        self
    }

    /// The binder for [`Suite::a_group_shares_its_messages_among_its_consumers`], when sharing
    /// needs settings the other cases must not have: on Kafka a partition belongs to one member
    /// of a group, so that case needs topics of two partitions or more (which would break the
    /// order of unkeyed messages the other cases check). The default is the suite's binder.
    pub fn sharing_binder<F, Fut>(mut self, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Binder>, Error>> + Send + 'static,
    {
        self.sharing = Some(Arc::new(move || Box::pin(factory())));
        self
    }

    async fn binder(&self) -> Arc<dyn Binder> {
        (self.factory)()
            .await
            .expect("the binder under test could not be created")
    }

    /// Every group of a destination gets every message.
    pub async fn pub_sub_across_groups(&self) {
        let binder = self.binder().await;
        let destination = unique("pubsub");
        let mut first = subscribe(&binder, &destination, Some(&unique("first"))).await;
        let mut second = subscribe(&binder, &destination, Some(&unique("second"))).await;
        let sent = send_numbered(&binder, &destination, 10, None).await;
        assert_eq!(
            self.receive_n(&mut first, 10).await,
            sent,
            "group `first` must get every message"
        );
        assert_eq!(
            self.receive_n(&mut second, 10).await,
            sent,
            "group `second` must get every message"
        );
        binder.close().await.ok();
    }

    /// Consumers in one group share the messages: each message reaches exactly one of them.
    pub async fn competing_consumers_within_a_group(&self) {
        let binder = self.binder().await;
        let destination = unique("competing");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut readers = Vec::new();
        let workers = unique("workers");
        for _ in 0..2 {
            let subscription = subscribe(&binder, &destination, Some(&workers)).await;
            readers.push(tokio::spawn(forward(subscription, tx.clone())));
        }
        let sent = send_numbered(&binder, &destination, 20, None).await;
        let mut received = Vec::new();
        let deadline = Instant::now() + self.timeout;
        while received.len() < sent.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(payload)) => received.push(payload),
                _ => break,
            }
        }
        // Anything more within the quiet period would be a message delivered twice.
        while let Ok(Some(payload)) = tokio::time::timeout(self.quiet, rx.recv()).await {
            received.push(payload);
        }
        readers.iter().for_each(|r| r.abort());
        received.sort();
        let mut expected = sent.clone();
        expected.sort();
        assert_eq!(
            received, expected,
            "each message must reach exactly one consumer of the group"
        );
        binder.close().await.ok();
    }

    /// A message handed back with `requeue` is delivered to the group again.
    pub async fn a_requeued_message_is_delivered_again(&self) {
        self.comes_back_to_its_group("requeue", |delivery| async move {
            delivery.acknowledgement.requeue().await.expect("requeue");
        })
        .await;
    }

    /// Consumers in one group share its messages: while one of them holds a message
    /// unacknowledged, the other gets messages too. A group that hands everything to one
    /// member fails here (every message arriving once is not enough).
    pub async fn a_group_shares_its_messages_among_its_consumers(&self) {
        let factory = self.sharing.as_ref().unwrap_or(&self.factory);
        let binder = factory()
            .await
            .expect("the binder under test could not be created");
        let destination = unique("sharing");
        let group = unique("sharers");
        // How many messages each consumer received; each holds its first one unacknowledged
        // until the other has one too (or the wait is over, and the assertion below fails).
        let counts = Arc::new(tokio::sync::watch::channel([0usize; 2]).0);
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let hold_for = self.timeout * 2;
        let mut readers = Vec::new();
        for me in 0..2 {
            let mut subscription = subscribe(&binder, &destination, Some(&group)).await;
            let (counts, tx) = (counts.clone(), tx.clone());
            readers.push(tokio::spawn(async move {
                let mut first = true;
                while let Some(Ok(delivery)) = subscription.next().await {
                    counts.send_modify(|counts| counts[me] += 1);
                    let _ = tx.send(String::from_utf8_lossy(delivery.message.payload()).into());
                    if std::mem::take(&mut first) {
                        let mut seen = counts.subscribe();
                        let other = 1 - me;
                        let shared = seen.wait_for(|counts| counts[other] > 0);
                        let _ = tokio::time::timeout(hold_for, shared).await;
                    }
                    if delivery.acknowledgement.ack().await.is_err() {
                        break;
                    }
                }
            }));
        }
        let producer = producer(&binder, &destination).await;
        let mut sent = BTreeSet::new();
        for n in 0..20 {
            let payload = format!("message-{n:04}");
            let message = Message::builder(Bytes::from(payload.clone()))
                .key(format!("key-{n}"))
                .build();
            producer.send(message).await.expect("send");
            sent.insert(payload);
        }
        // A rebalance may hand a message to both consumers: at least once is the promise here.
        let mut received = BTreeSet::new();
        let deadline = Instant::now() + hold_for + self.timeout;
        while received.len() < sent.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(payload)) => received.insert(payload),
                _ => break,
            };
        }
        readers.iter().for_each(|r| r.abort());
        let counts = *counts.borrow();
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "both consumers of the group must get a share of its messages, got {counts:?}"
        );
        assert_eq!(received, sent, "every message must reach the group");
        binder.close().await.ok();
    }

    /// An anonymous consumer gets every message sent while it runs, independently of others.
    pub async fn anonymous_consumers_each_get_every_message(&self) {
        let binder = self.binder().await;
        let destination = unique("anonymous");
        let mut first = subscribe(&binder, &destination, None).await;
        let mut second = subscribe(&binder, &destination, None).await;
        let sent = send_numbered(&binder, &destination, 5, None).await;
        assert_eq!(self.receive_n(&mut first, 5).await, sent);
        assert_eq!(self.receive_n(&mut second, 5).await, sent);
        binder.close().await.ok();
    }

    /// Messages with the same key arrive in the order they were sent.
    pub async fn order_is_kept_within_a_key(&self) {
        let binder = self.binder().await;
        let destination = unique("ordered");
        let mut subscription = subscribe(&binder, &destination, Some(&unique("ordered"))).await;
        let sent = send_numbered(&binder, &destination, 50, Some("same-key")).await;
        assert_eq!(
            self.receive_n(&mut subscription, 50).await,
            sent,
            "order within a key must hold"
        );
        binder.close().await.ok();
    }

    /// Payload, headers (text and binary), key and content type survive the trip.
    pub async fn headers_key_and_content_type_round_trip(&self) {
        let binder = self.binder().await;
        let destination = unique("roundtrip");
        let mut subscription = subscribe(&binder, &destination, Some(&unique("roundtrip"))).await;
        let mut message = Message::builder(Bytes::from_static(b"{\"n\":1}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header("tenant", "acme")
            .header("binary", [0u8, 159, 146, 150, 255])
            .header(header::CORRELATION_ID, "corr-1")
            .key("customer-42")
            .build();
        message.headers_mut().insert(header::MESSAGE_ID, "id-1");
        producer(&binder, &destination)
            .await
            .send(message.clone())
            .await
            .expect("send");
        let received = self.receive_one(&mut subscription).await;
        let got = received.message.clone();
        received.acknowledgement.ack().await.expect("ack");
        assert_eq!(got.payload(), message.payload());
        assert_eq!(got.key_str(), Some("customer-42"));
        for (name, value) in message.headers().iter() {
            assert_eq!(
                got.headers().get(name),
                Some(value),
                "header `{name}` must survive the trip"
            );
        }
        binder.close().await.ok();
    }

    /// A message received but not acknowledged is delivered again when its consumer goes away.
    pub async fn unacknowledged_messages_are_redelivered(&self) {
        self.comes_back_to_its_group("redeliver", |delivery| async move {
            // The consumer goes away without acknowledging.
            drop(delivery);
        })
        .await;
    }

    /// A message acknowledged is gone for its group: the group's next consumer gets what was
    /// sent after it. It is sent with [`Producer::try_enqueue`](crate::Producer::try_enqueue)
    /// and settled with [`Acknowledgement::try_ack`](crate::binder::Acknowledgement::try_ack)
    /// where the binder offers them (as the core
    /// does), and the acknowledgement is dropped after `try_ack`, which must not hand the
    /// message back.
    pub async fn an_acknowledged_message_is_not_delivered_again(&self) {
        let binder = self.binder().await;
        let destination = unique("acked");
        let group = unique("acked");
        let mut first = subscribe(&binder, &destination, Some(&group)).await;
        let producer = producer(&binder, &destination).await;
        let done = Message::new(Bytes::from_static(b"done"));
        match producer.try_enqueue(done) {
            TryEnqueue::Confirmed => {}
            TryEnqueue::Pending(confirmation, _) => confirmation.await.expect("confirm"),
            TryEnqueue::NotNow(done) => {
                let confirmation = producer.enqueue(&done).await.expect("enqueue");
                confirmation.await.expect("confirm");
            }
            TryEnqueue::Failed(_, error) => panic!("try_enqueue failed: {error}"),
        }
        let delivery = self.receive_one(&mut first).await;
        assert_eq!(&delivery.message.payload()[..], b"done");
        let mut acknowledgement = delivery.acknowledgement;
        match acknowledgement.try_ack() {
            Some(settled) => {
                settled.expect("try_ack");
                // Dropped before the consumer goes: what is left must not hand the message back.
                drop(acknowledgement);
            }
            None => acknowledgement.ack().await.expect("ack"),
        }
        first.close().await.expect("close");
        // Sent after the first consumer went, so it starts a batch of its own on any broker.
        producer
            .send(Message::new(Bytes::from_static(b"next")))
            .await
            .expect("send");
        let mut second = subscribe(&binder, &destination, Some(&group)).await;
        let next = self.receive_one(&mut second).await;
        assert_eq!(
            String::from_utf8_lossy(next.message.payload()),
            "next",
            "an acknowledged message must not come again"
        );
        next.acknowledgement.ack().await.expect("ack");
        self.expect_nothing(&mut second, self.quiet, "again after it was acknowledged")
            .await;
        binder.close().await.ok();
    }

    /// Sends one message to a group, lets `hand_back` settle it without acknowledging it, closes
    /// that consumer, and checks that the group's next consumer gets the message.
    async fn comes_back_to_its_group<F, Fut>(&self, case: &str, hand_back: F)
    where
        F: FnOnce(Delivery) -> Fut,
        Fut: Future<Output = ()>,
    {
        let binder = self.binder().await;
        let destination = unique(case);
        let group = unique(case);
        let mut first = subscribe(&binder, &destination, Some(&group)).await;
        producer(&binder, &destination)
            .await
            .send(Message::new(Bytes::from_static(b"again")))
            .await
            .expect("send");
        let delivery = self.receive_one(&mut first).await;
        assert_eq!(&delivery.message.payload()[..], b"again");
        hand_back(delivery).await;
        first.close().await.expect("close");
        let mut second = subscribe(&binder, &destination, Some(&group)).await;
        let again = self.receive_one(&mut second).await;
        assert_eq!(
            &again.message.payload()[..],
            b"again",
            "the message handed back must come again"
        );
        again.acknowledgement.ack().await.expect("ack");
        binder.close().await.ok();
    }

    /// A failing handler is tried `max-attempts` times, then the message is dead-lettered with
    /// its payload, key and headers and the failure headers.
    pub async fn retries_then_dead_letter_with_failure_headers(&self) {
        let binder = self.binder().await;
        let destination = unique("failing");
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = attempts.clone();
        let fails = StreamFunction::consumer("conformance-fails", move |_: Message| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("the ledger is closed")
            }
        });
        let group = unique("billing");
        let toml = format!(
            r#"[stream.bindings.conformance-fails-in-0]
destination = "{destination}"
group = "{group}"
consumer.max-attempts = 3
consumer.back-off-initial-interval = "10ms"
consumer.back-off-max-interval = "50ms"
consumer.dlq = true"#
        );
        let mut spec = ConsumerSpec::new(destination.clone(), Some(&group));
        spec.properties.dlq = true;
        let mut dead_letters = (self.dead_letters)(binder.clone(), spec)
            .await
            .expect("dead-letter reader");
        let app = application(&binder, fails, &toml)
            .start()
            .await
            .expect("start");
        let original = Message::builder(Bytes::from_static(b"{\"id\":7}"))
            .header("tenant", "acme")
            .key("order-7")
            .build();
        producer(&binder, &destination)
            .await
            .send(original)
            .await
            .expect("send");
        let dead = self.receive_one(&mut dead_letters).await;
        let message = dead.message.clone();
        dead.acknowledgement.ack().await.expect("ack");
        app.shutdown().await.expect("shutdown");
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            3,
            "the handler must be tried max-attempts times"
        );
        assert_eq!(&message.payload()[..], b"{\"id\":7}");
        assert_eq!(message.key_str(), Some("order-7"));
        let headers = message.headers();
        assert_eq!(headers.get_str("tenant"), Some("acme"));
        assert_eq!(
            headers.get_str(header::EXCEPTION_MESSAGE),
            Some("the ledger is closed")
        );
        assert_eq!(headers.get_str(header::EXCEPTION_TYPE), Some("&str"));
        assert_eq!(
            headers.get_str(header::ORIGINAL_DESTINATION),
            Some(destination.as_str())
        );
        assert_eq!(headers.get_str(header::ATTEMPTS), Some("3"));
        binder.close().await.ok();
    }

    /// With `concurrency` > 1 every message is handled and forwarded, and messages with the
    /// same key keep their order.
    pub async fn nothing_is_lost_under_concurrency(&self) {
        let binder = self.binder().await;
        let input = unique("concurrent-in");
        let output = unique("concurrent-out");
        let forward =
            StreamFunction::function("conformance-forward", |message: Message| async move {
                // Uneven handling times shuffle work across workers.
                let delay = message.payload().last().copied().unwrap_or(0) % 3;
                tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
                message
            });
        let forwarders = unique("forwarders");
        let toml = format!(
            r#"[stream.bindings.conformance-forward-in-0]
destination = "{input}"
group = "{forwarders}"
consumer.concurrency = 4
[stream.bindings.conformance-forward-out-0]
destination = "{output}""#
        );
        let mut results = subscribe(&binder, &output, Some(&unique("results"))).await;
        let app = application(&binder, forward, &toml)
            .start()
            .await
            .expect("start");
        let producer = producer(&binder, &input).await;
        let count = 200;
        for n in 0..count {
            let key = format!("key-{}", n % 10);
            let message = Message::builder(Bytes::from(format!("{key}:{n:04}")))
                .key(key)
                .build();
            producer.send(message).await.expect("send");
        }
        let received = self.receive_n(&mut results, count).await;
        app.shutdown().await.expect("shutdown");
        assert_once_and_in_order_per_key(&received, count);
        binder.close().await.ok();
    }

    /// A message in retry back-off holds back only later messages with its key: the rest flow
    /// meanwhile, and the next message with its key waits until it is dead-lettered.
    pub async fn back_off_holds_back_only_its_key(&self) {
        self.back_off_holds_back_only_its_key_with(1).await;
    }

    /// As [`back_off_holds_back_only_its_key`](Self::back_off_holds_back_only_its_key), with
    /// four handlers at once.
    pub async fn back_off_holds_back_only_its_key_at_concurrency_4(&self) {
        self.back_off_holds_back_only_its_key_with(4).await;
    }

    async fn back_off_holds_back_only_its_key_with(&self, concurrency: u32) {
        let binder = self.binder().await;
        let input = unique("poison-in");
        let output = unique("poison-out");
        let calls = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = calls.clone();
        let poisoned = StreamFunction::function("conformance-poison", move |message: Message| {
            let log = log.clone();
            async move {
                let text = String::from_utf8_lossy(message.payload()).into_owned();
                log.lock().expect("calls").push(text.clone());
                match message.key_str() {
                    Some("poison") => Err(format!("{text} is poison")),
                    _ => Ok(message),
                }
            }
        });
        let group = unique("billing");
        let toml = format!(
            r#"[stream.bindings.conformance-poison-in-0]
destination = "{input}"
group = "{group}"
consumer.max-attempts = 3
consumer.back-off-initial-interval = "3s"
consumer.back-off-max-interval = "3s"
consumer.dlq = true
consumer.concurrency = {concurrency}
[stream.bindings.conformance-poison-out-0]
destination = "{output}""#
        );
        let mut spec = ConsumerSpec::new(input.clone(), Some(&group));
        spec.properties.dlq = true;
        let mut dead_letters = (self.dead_letters)(binder.clone(), spec)
            .await
            .expect("dead-letter reader");
        let mut results = subscribe(&binder, &output, Some(&unique("results"))).await;
        let app = application(&binder, poisoned, &toml)
            .start()
            .await
            .expect("start");
        let producer = producer(&binder, &input).await;
        let keyed =
            |payload: String, key: &str| Message::builder(Bytes::from(payload)).key(key).build();
        producer
            .send(keyed("first-poison".to_owned(), "poison"))
            .await
            .expect("send");
        for n in 0..20 {
            producer
                .send(keyed(format!("order-{n:02}"), &format!("key-{n}")))
                .await
                .expect("send");
        }
        producer
            .send(keyed("second-poison".to_owned(), "poison"))
            .await
            .expect("send");
        let mut flowed = self.receive_n(&mut results, 20).await;
        let first_poison_calls = calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|c| *c == "first-poison")
            .count();
        assert!(
            first_poison_calls < 3,
            "the other keys waited for the poison message's retries to end"
        );
        flowed.sort();
        let expected: Vec<String> = (0..20).map(|n| format!("order-{n:02}")).collect();
        assert_eq!(flowed, expected);
        let mut dead = Vec::new();
        for _ in 0..2 {
            let letter = self.receive_one(&mut dead_letters).await;
            dead.push(String::from_utf8_lossy(letter.message.payload()).into_owned());
            letter.acknowledgement.ack().await.expect("ack");
        }
        app.shutdown().await.expect("shutdown");
        assert_eq!(dead, ["first-poison", "second-poison"]);
        let calls = calls.lock().expect("calls").clone();
        let last_first = calls.iter().rposition(|c| c == "first-poison");
        let first_second = calls.iter().position(|c| c == "second-poison");
        assert!(
            last_first < first_second,
            "the second message with the poison key ran before the first was done: {calls:?}"
        );
        binder.close().await.ok();
    }

    /// A backlog sent before the application starts drains through a function with a window
    /// of 7: every message once, in order within each key.
    pub async fn a_backlog_drains_in_order_within_each_key(&self) {
        let binder = self.binder().await;
        let input = unique("backlog-in");
        let output = unique("backlog-out");
        let forward = StreamFunction::function(
            "conformance-backlog",
            |message: Message| async move { message },
        );
        let forwarders = unique("forwarders");
        let toml = format!(
            r#"[stream.bindings.conformance-backlog-in-0]
destination = "{input}"
group = "{forwarders}"
# A window far smaller than the backlog: each settled message must give its place back, or
# the drain stalls.
consumer.max-in-flight = 7
[stream.bindings.conformance-backlog-out-0]
destination = "{output}""#
        );
        let mut results = subscribe(&binder, &output, Some(&unique("results"))).await;
        // The group exists before the backlog is sent, so it keeps every message.
        let mut spec = ProducerSpec::new(input.clone());
        spec.properties.required_groups = vec![forwarders.clone()];
        let producer = binder.producer(&spec).await.expect("producer");
        let count = 600;
        for n in 0..count {
            let key = format!("key-{}", n % 3);
            let message = Message::builder(Bytes::from(format!("{key}:{n:04}")))
                .key(key)
                .build();
            producer.send(message).await.expect("send");
        }
        let app = application(&binder, forward, &toml)
            .start()
            .await
            .expect("start");
        let received = self.receive_n(&mut results, count).await;
        app.shutdown().await.expect("shutdown");
        assert_once_and_in_order_per_key(&received, count);
        binder.close().await.ok();
    }

    /// A function bound to a binding's dead-letter destination receives its dead letters with
    /// the failure headers, as any other input: the same configuration reads them on every
    /// binder.
    pub async fn a_binding_on_the_dead_letter_destination_reads_dead_letters(&self) {
        let binder = self.binder().await;
        let destination = unique("audited");
        let (group, audit_group) = (unique("billing"), unique("audit"));
        let dlq = format!("{destination}.{group}.dlq");
        let letters = Arc::new(std::sync::Mutex::new(Vec::<Message>::new()));
        let seen = letters.clone();
        let audit = StreamFunction::consumer("conformance-audit", move |letter: Message| {
            let seen = seen.clone();
            async move {
                seen.lock().expect("letters").push(letter);
            }
        });
        let auditor = application(
            &binder,
            audit,
            &format!(
                r#"[stream.bindings.conformance-audit-in-0]
destination = "{dlq}"
group = "{audit_group}""#
            ),
        )
        .start()
        .await
        .expect("the auditor starts");
        let fails = StreamFunction::consumer("conformance-refuses", |_: Message| async move {
            Err::<(), _>("refused for the audit")
        });
        let billing = application(
            &binder,
            fails,
            &format!(
                r#"[stream.bindings.conformance-refuses-in-0]
destination = "{destination}"
group = "{group}"
consumer.max-attempts = 1
consumer.dlq = true"#
            ),
        )
        .start()
        .await
        .expect("start");
        let original = Message::builder(Bytes::from_static(b"audit me"))
            .key("order-9")
            .build();
        producer(&binder, &destination)
            .await
            .send(original)
            .await
            .expect("send");
        let deadline = Instant::now() + self.timeout;
        while letters.lock().expect("letters").is_empty() {
            assert!(
                Instant::now() < deadline,
                "no dead letter reached the binding on `{dlq}` within {:?}",
                self.timeout
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        billing.shutdown().await.expect("shutdown");
        auditor.shutdown().await.expect("shutdown");
        let letter = letters.lock().expect("letters")[0].clone();
        assert_eq!(&letter.payload()[..], b"audit me");
        assert_eq!(letter.key_str(), Some("order-9"));
        assert_eq!(
            letter.headers().get_str(header::EXCEPTION_MESSAGE),
            Some("refused for the audit")
        );
        assert_eq!(
            letter.headers().get_str(header::ORIGINAL_DESTINATION),
            Some(destination.as_str())
        );
        binder.close().await.ok();
    }

    /// A payload the handler's argument type cannot be decoded from goes to the dead-letter
    /// destination at once, with the reason, without calling the handler.
    pub async fn an_undecodable_payload_is_dead_lettered_without_retries(&self) {
        #[derive(Debug, serde::Deserialize)]
        struct Order {
            #[allow(dead_code)]
            id: u64,
        }
        let binder = self.binder().await;
        let destination = unique("undecodable");
        let group = unique("billing");
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let bill =
            StreamFunction::consumer("conformance-decodes", move |_: crate::Decoded<Order>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        let toml = format!(
            r#"[stream.bindings.conformance-decodes-in-0]
destination = "{destination}"
group = "{group}"
consumer.max-attempts = 3
consumer.dlq = true"#
        );
        let mut spec = ConsumerSpec::new(destination.clone(), Some(&group));
        spec.properties.dlq = true;
        let mut dead_letters = (self.dead_letters)(binder.clone(), spec)
            .await
            .expect("dead-letter reader");
        let app = application(&binder, bill, &toml)
            .start()
            .await
            .expect("start");
        let garbage = Message::builder(Bytes::from_static(b"not json at all"))
            .header(header::CONTENT_TYPE, "application/json")
            .build();
        producer(&binder, &destination)
            .await
            .send(garbage)
            .await
            .expect("send");
        let dead = self.receive_one(&mut dead_letters).await;
        let message = dead.message.clone();
        dead.acknowledgement.ack().await.expect("ack");
        app.shutdown().await.expect("shutdown");
        assert_eq!(&message.payload()[..], b"not json at all");
        assert_eq!(message.headers().get_str(header::ATTEMPTS), Some("1"));
        assert!(message
            .headers()
            .get_str(header::EXCEPTION_MESSAGE)
            .is_some());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "the handler was not called"
        );
        binder.close().await.ok();
    }

    /// A dead letter sent while nothing reads the dead-letter destination waits there for a
    /// reader that comes later.
    pub async fn a_dead_letter_waits_for_a_reader_that_comes_later(&self) {
        let binder = self.binder().await;
        let destination = unique("unread-dlq");
        let group = unique("billing");
        let attempts = Arc::new(AtomicU32::new(0));
        let counter = attempts.clone();
        let fails = StreamFunction::consumer("conformance-fails-alone", move |_: Message| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("nobody is listening")
            }
        });
        let toml = format!(
            r#"[stream.bindings.conformance-fails-alone-in-0]
destination = "{destination}"
group = "{group}"
consumer.max-attempts = 1
consumer.dlq = true"#
        );
        let app = application(&binder, fails, &toml)
            .start()
            .await
            .expect("start");
        producer(&binder, &destination)
            .await
            .send(Message::new(Bytes::from_static(b"kept")))
            .await
            .expect("send");
        let deadline = Instant::now() + self.timeout;
        while attempts.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the handler was not called");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A graceful shutdown finishes the dead-lettering in flight.
        app.shutdown().await.expect("shutdown");
        let mut spec = ConsumerSpec::new(destination.clone(), Some(&group));
        spec.properties.dlq = true;
        let mut dead_letters = (self.dead_letters)(binder.clone(), spec)
            .await
            .expect("dead-letter reader");
        let dead = self.receive_one(&mut dead_letters).await;
        assert_eq!(&dead.message.payload()[..], b"kept");
        dead.acknowledgement.ack().await.expect("ack");
        binder.close().await.ok();
    }

    /// A group listed in a producer's `required-groups` gets what was sent before its consumer
    /// first subscribed.
    pub async fn required_groups_keep_what_is_sent_before_their_consumer_starts(&self) {
        let binder = self.binder().await;
        let destination = unique("required");
        let group = unique("late");
        let mut spec = ProducerSpec::new(destination.clone());
        spec.properties.required_groups = vec![group.clone()];
        let early = binder.producer(&spec).await.expect("producer");
        early
            .send(Message::new(Bytes::from_static(b"early")))
            .await
            .expect("sent before the group's consumer exists");
        let mut late = subscribe(&binder, &destination, Some(&group)).await;
        let delivery = self.receive_one(&mut late).await;
        assert_eq!(&delivery.message.payload()[..], b"early");
        delivery.acknowledgement.ack().await.expect("ack");
        binder.close().await.ok();
    }

    /// The lag of a group counts what waits for it: five messages sent before its consumer
    /// starts, then none once they were received and acknowledged. For a suite made
    /// [`without_lag`](Suite::without_lag), the binder must answer `None`.
    pub async fn lag_counts_what_waits_for_a_group(&self) {
        let binder = self.binder().await;
        let destination = unique("lag");
        let group = unique("behind");
        let mut spec = ProducerSpec::new(destination.clone());
        spec.properties.required_groups = vec![group.clone()];
        let early = binder.producer(&spec).await.expect("producer");
        for n in 0..5 {
            early
                .send(Message::new(Bytes::from(format!("waiting-{n}"))))
                .await
                .expect("sent before the group's consumer exists");
        }
        let consumer = ConsumerSpec::new(destination.clone(), Some(&group));
        if !self.tells_lag {
            assert_eq!(
                binder.lag(&consumer).await,
                None,
                "the binder tells lag after all: leave `Suite::without_lag` out"
            );
            binder.close().await.ok();
            return;
        }
        self.lag_reaches(&binder, &consumer, 5).await;
        let mut subscription = subscribe(&binder, &destination, Some(&group)).await;
        self.receive_n(&mut subscription, 5).await;
        self.lag_reaches(&binder, &consumer, 0).await;
        subscription.close().await.ok();
        binder.close().await.ok();
    }

    /// Waits, within the suite's timeout, until the binder tells `lag` for `spec`.
    async fn lag_reaches(&self, binder: &Arc<dyn Binder>, spec: &ConsumerSpec, lag: u64) {
        let deadline = Instant::now() + self.timeout;
        loop {
            let told = binder.lag(spec).await;
            if told == Some(lag) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the lag of `{}` was {told:?}, not {lag}, within {:?}",
                spec.destination,
                self.timeout
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An output with `partition-count = 2` sends each key to one partition, the one
    /// [`partition_of_key`] names, and each partitioned consumer of a group (`instance-count = 2`)
    /// receives only its own, in order within each key; a group that is not partitioned
    /// receives everything.
    pub async fn a_partitioned_destination_sends_each_key_to_one_instance(&self) {
        let binder = self.binder().await;
        let input = unique("partition-in");
        let output = unique("partitioned");
        let (counters, everything) = (unique("counters"), unique("everything"));
        let forward =
            StreamFunction::function("conformance-partition", |message: Message| async move {
                message
            });
        let forwarders = unique("forwarders");
        let toml = format!(
            r#"[stream.bindings.conformance-partition-in-0]
destination = "{input}"
group = "{forwarders}"
[stream.bindings.conformance-partition-out-0]
destination = "{output}"
producer.partition-count = 2"#
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<(u32, String, Option<String>)>();
        let mut readers = Vec::new();
        for instance in 0..2 {
            let spec = partitioned_consumer(&output, &counters, instance, 2);
            let mut subscription = binder.subscribe(&spec).await.expect("subscribe");
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(delivery)) = subscription.next().await {
                    let payload = String::from_utf8_lossy(delivery.message.payload()).into_owned();
                    let key = delivery.message.key_str().map(str::to_owned);
                    if delivery.acknowledgement.ack().await.is_ok() {
                        let _ = tx.send((instance, payload, key));
                    }
                }
            }));
        }
        let mut all = subscribe(&binder, &output, Some(&everything)).await;
        let app = application(&binder, forward, &toml)
            .start()
            .await
            .expect("start");
        let keys: Vec<String> = (0..8).map(|k| format!("word-{k}")).collect();
        let owners: BTreeSet<u32> = keys
            .iter()
            .map(|key| partition_of_key(key.as_bytes(), 2))
            .collect();
        assert_eq!(
            owners.len(),
            2,
            "the case's keys must cover both partitions"
        );
        let producer = producer(&binder, &input).await;
        let count = 40;
        for n in 0..count {
            let key = &keys[n % keys.len()];
            let message = Message::builder(Bytes::from(format!("{key}:{n:04}")))
                .key(key)
                .build();
            producer.send(message).await.expect("send");
        }
        let mut by_instance: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + self.timeout;
        while by_instance.iter().map(Vec::len).sum::<usize>() < count {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((instance, payload, key))) => {
                    let sent_key = payload.split_once(':').map(|(key, _)| key.to_owned());
                    assert_eq!(key, sent_key, "`{payload}` keeps its key");
                    by_instance[instance as usize].push(payload);
                }
                _ => panic!(
                    "the partitioned consumers received {} of {count} messages within {:?}",
                    by_instance.iter().map(Vec::len).sum::<usize>(),
                    self.timeout
                ),
            }
        }
        let everything = self.receive_n(&mut all, count).await;
        app.shutdown().await.expect("shutdown");
        readers.iter().for_each(|reader| reader.abort());
        for (instance, received) in by_instance.iter().enumerate() {
            for payload in received {
                let key = payload.split_once(':').expect("key:n").0;
                assert_eq!(
                    partition_of_key(key.as_bytes(), 2),
                    instance as u32,
                    "`{payload}` reached instance {instance}, not the owner of its key"
                );
            }
        }
        let both: Vec<String> = by_instance.concat();
        assert_once_and_in_order_per_key(&both, count);
        assert_once_and_in_order_per_key(&everything, count);
        binder.close().await.ok();
    }

    /// The required groups of a partitioned output keep each partition for its instance, so
    /// what is sent before the instances start reaches each of them; a message sent without a
    /// key arrives without one.
    pub async fn required_groups_keep_each_partition_of_a_partitioned_destination(&self) {
        let binder = self.binder().await;
        let destination = unique("required-partitions");
        let group = unique("late-instances");
        let mut spec = ProducerSpec::new(destination.clone());
        spec.properties.required_groups = vec![group.clone()];
        spec.properties.partition_count = 2;
        let early = binder.producer(&spec).await.expect("producer");
        for partition in 0..2 {
            let mut message = Message::new(Bytes::from(format!("early-{partition}")));
            message.set_partition(Some(partition));
            early
                .send(message)
                .await
                .expect("sent before the group's instances exist");
        }
        for instance in 0..2 {
            let spec = partitioned_consumer(&destination, &group, instance, 2);
            let mut late = binder.subscribe(&spec).await.expect("subscribe");
            let delivery = self.receive_one(&mut late).await;
            assert_eq!(
                String::from_utf8_lossy(delivery.message.payload()),
                format!("early-{instance}"),
                "instance {instance} receives its own partition"
            );
            assert_eq!(
                delivery.message.key(),
                None,
                "a message sent without a key arrives without one, whatever its partition"
            );
            delivery.acknowledgement.ack().await.expect("ack");
        }
        binder.close().await.ok();
    }

    /// A graceful shutdown in the middle of a backlog loses nothing: every message was either
    /// handled or is delivered again to the group.
    pub async fn a_shutdown_mid_backlog_loses_nothing(&self) {
        let binder = self.binder().await;
        let destination = unique("shutdown");
        let group = unique("workers");
        let handled = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let record = handled.clone();
        let work = StreamFunction::consumer("conformance-slow", move |message: Message| {
            let record = record.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                record
                    .lock()
                    .expect("handled")
                    .push(String::from_utf8_lossy(message.payload()).into_owned());
            }
        });
        let toml = format!(
            r#"[stream.bindings.conformance-slow-in-0]
destination = "{destination}"
group = "{group}""#
        );
        // The group exists before anything is sent, so the whole backlog waits for it.
        let mut spec = ProducerSpec::new(destination.clone());
        spec.properties.required_groups = vec![group.clone()];
        binder.producer(&spec).await.expect("producer");
        let sent = send_numbered(&binder, &destination, 30, None).await;
        let app = application(&binder, work, &toml)
            .start()
            .await
            .expect("start");
        let deadline = Instant::now() + self.timeout;
        while handled.lock().expect("handled").len() < 3 {
            assert!(Instant::now() < deadline, "nothing was handled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        app.shutdown().await.expect("shutdown");
        // Binders that drain at shutdown (RabbitMQ) may have handled all of it.
        let done: BTreeSet<String> = handled.lock().expect("handled").iter().cloned().collect();
        let mut rest = subscribe(&binder, &destination, Some(&group)).await;
        let mut seen = done.clone();
        while seen.len() < sent.len() {
            let delivery = self.receive_one(&mut rest).await;
            seen.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
            delivery.acknowledgement.ack().await.expect("ack");
        }
        let expected: BTreeSet<String> = sent.into_iter().collect();
        assert_eq!(seen, expected, "every message was handled or came back");
        binder.close().await.ok();
    }

    /// A binding paused, then stopped, then stopped while paused, while its application runs:
    /// meanwhile nothing sent to its group is handled, and the broker keeps it; resumed, or
    /// started again, the binding handles each of those messages once.
    pub async fn a_paused_or_stopped_binding_handles_nothing_until_it_runs_again(&self) {
        let binder = self.binder().await;
        let (input, output) = (unique("lifecycle-in"), unique("lifecycle-out"));
        let (group, readers) = (unique("lifecycle"), unique("lifecycle-readers"));
        let forward =
            StreamFunction::function("conformance-lifecycle", |message: Message| async move {
                message
            });
        let toml = format!(
            r#"[stream.bindings.conformance-lifecycle-in-0]
destination = "{input}"
group = "{group}"
[stream.bindings.conformance-lifecycle-out-0]
destination = "{output}""#
        );
        let binding = "conformance-lifecycle-in-0";
        let mut handled = subscribe(&binder, &output, Some(&readers)).await;
        let app = application(&binder, forward, &toml)
            .start()
            .await
            .expect("start");
        assert_eq!(app.binding_state(binding), Some(BindingState::Started));
        let producer = producer(&binder, &input).await;
        let send = |phase: &'static str, count: usize| {
            let producer = producer.clone();
            async move {
                let mut sent = Vec::with_capacity(count);
                for n in 0..count {
                    let payload = format!("{phase}-{n:04}");
                    let message = Message::new(Bytes::from(payload.clone()));
                    producer.send(message).await.expect("send");
                    sent.push(payload);
                }
                sent
            }
        };
        let hold = self.quiet.max(Duration::from_secs(3));
        let sent = send("running", 10).await;
        let mut received = self.receive_n(&mut handled, 10).await;
        received.sort();
        assert_eq!(received, sent, "each message sent while started, once");

        app.pause_binding(binding).await.expect("pause");
        assert_eq!(app.binding_state(binding), Some(BindingState::Paused));
        let sent = send("paused", 100).await;
        self.expect_nothing(&mut handled, hold, "while the binding is paused")
            .await;
        app.resume_binding(binding).await.expect("resume");
        assert_eq!(app.binding_state(binding), Some(BindingState::Started));
        let mut received = self.receive_n(&mut handled, 100).await;
        received.sort();
        assert_eq!(received, sent, "each message sent while paused, once");
        self.expect_nothing(&mut handled, self.quiet, "after the resumed backlog")
            .await;

        app.stop_binding(binding).await.expect("stop");
        assert_eq!(app.binding_state(binding), Some(BindingState::Stopped));
        let refused = app
            .pause_binding(binding)
            .await
            .expect_err("a stopped binding");
        assert!(refused.to_string().contains("start it"), "{refused}");
        let sent = send("stopped", 100).await;
        self.expect_nothing(&mut handled, hold, "while the binding is stopped")
            .await;
        app.start_binding(binding).await.expect("start again");
        assert_eq!(app.binding_state(binding), Some(BindingState::Started));
        let mut received = self.receive_n(&mut handled, 100).await;
        received.sort();
        assert_eq!(received, sent, "each message sent while stopped, once");
        self.expect_nothing(&mut handled, self.quiet, "after the started backlog")
            .await;

        // Stopped while paused, it hands back what it held without handling it.
        app.pause_binding(binding).await.expect("pause");
        let sent = send("held", 20).await;
        self.expect_nothing(&mut handled, self.quiet, "while the binding is paused")
            .await;
        app.stop_binding(binding).await.expect("stop while paused");
        self.expect_nothing(&mut handled, self.quiet, "when the paused binding stopped")
            .await;
        app.start_binding(binding).await.expect("start again");
        let mut received = self.receive_n(&mut handled, 20).await;
        received.sort();
        assert_eq!(received, sent, "each message held while paused, once");
        self.expect_nothing(&mut handled, self.quiet, "after the held backlog")
            .await;
        app.shutdown().await.expect("shutdown");
        binder.close().await.ok();
    }

    /// Confirmations are awaited in the background: with every confirmation 50 ms late, 1,000
    /// messages go through one handler (`concurrency = 1`) in far less than 1,000 × 50 ms, and
    /// their outputs keep the order of their inputs.
    pub async fn confirmations_are_awaited_in_the_background(&self) {
        let binder = self.binder().await;
        let (_, faulty) = faulty(
            &binder,
            Faults {
                confirm_delay: Duration::from_millis(50),
                ..Faults::default()
            },
        );
        let (input, output, group) = (unique("slow-in"), unique("slow-out"), unique("slow"));
        let forward =
            StreamFunction::function(
                "conformance-slow",
                |message: Message| async move { message },
            );
        let toml = format!(
            r#"[stream.bindings.conformance-slow-in-0]
destination = "{input}"
group = "{group}"
[stream.bindings.conformance-slow-out-0]
destination = "{output}""#
        );
        let mut results = subscribe(&binder, &output, Some(&unique("results"))).await;
        let app = application(&faulty, forward, &toml)
            .start()
            .await
            .expect("start");
        let count = 1_000;
        // Sent while the binding is paused, so that it meets them all at once and only its own
        // pace is timed. One key: the order of the outputs is kept on every binder,
        // partitioned or not.
        let binding = "conformance-slow-in-0";
        app.pause_binding(binding).await.expect("pause");
        let sent = send_numbered(&binder, &input, count, Some("one-key")).await;
        let began = Instant::now();
        app.resume_binding(binding).await.expect("resume");
        let received = self.receive_n(&mut results, count).await;
        let took = began.elapsed();
        app.shutdown().await.expect("shutdown");
        assert_eq!(received, sent, "the outputs keep the order of their inputs");
        let one_at_a_time = Duration::from_millis(50) * count as u32;
        assert!(
            took < one_at_a_time / 4,
            "{count} outputs took {took:?}, against {one_at_a_time:?} with one confirmation awaited at a time"
        );
        binder.close().await.ok();
    }

    /// A producer that fails every send for 10 s, with `max-attempts = 3`, the default back-off
    /// and no DLQ: no input is acknowledged before its output is confirmed, and nothing is lost
    /// once sends get through again.
    pub async fn a_send_outage_loses_nothing_and_acknowledges_nothing_early(&self) {
        let binder = self.binder().await;
        let (faults, faulty) = faulty(
            &binder,
            Faults {
                outage: Duration::from_secs(10),
                ..Faults::default()
            },
        );
        let (input, output, group) = (unique("outage-in"), unique("outage-out"), unique("outage"));
        let forward = StreamFunction::function(
            "conformance-outage",
            |message: Message| async move { message },
        );
        let toml = format!(
            r#"[stream.bindings.conformance-outage-in-0]
destination = "{input}"
group = "{group}"
consumer.max-attempts = 3
[stream.bindings.conformance-outage-out-0]
destination = "{output}""#
        );
        let mut results = subscribe(&binder, &output, Some(&unique("results"))).await;
        let app = application(&faulty, forward, &toml)
            .start()
            .await
            .expect("start");
        let count = 20;
        let mut sent = send_numbered(&binder, &input, count, None).await;
        // The outage lasts 10 s from the first send and the back-off grows to 10 s: the
        // outputs come within 40 s of it, on top of the binder's own wait.
        let patient = Suite {
            timeout: self.timeout + Duration::from_secs(40),
            ..self.clone()
        };
        // Distinct outputs: a broker may deliver one twice.
        let mut distinct = BTreeSet::new();
        while distinct.len() < count {
            distinct.extend(patient.receive_n(&mut results, 1).await);
        }
        let mut received: Vec<String> = distinct.into_iter().collect();
        self.acknowledged(&faults, count).await;
        app.shutdown().await.expect("shutdown");
        received.sort();
        received.dedup();
        sent.sort();
        assert_eq!(received, sent, "every input's output arrived");
        assert!(
            faults.refused.load(Ordering::SeqCst) >= count as u32,
            "every output was refused at least once"
        );
        let log = faults.log();
        for payload in &sent {
            let confirmed = log
                .iter()
                .position(|e| *e == format!("confirmed:{payload}"));
            let acked = log.iter().position(|e| *e == format!("acked:{payload}"));
            assert!(
                confirmed.is_some() && confirmed < acked,
                "{payload} was acknowledged before its output was confirmed: {log:?}"
            );
        }
        binder.close().await.ok();
    }

    /// A subscription that asks for acknowledgements in arrival order gets them so, even when
    /// four handlers finish later messages first.
    pub async fn acknowledgements_follow_arrival_order_when_the_subscription_asks(&self) {
        let binder = self.binder().await;
        let (faults, faulty) = faulty(
            &binder,
            Faults {
                in_order: true,
                ..Faults::default()
            },
        );
        let (input, group) = (unique("in-order-in"), unique("in-order"));
        let count = 40;
        // Later messages take less time than earlier ones: they finish first.
        let finishing = faults.clone();
        let slow_first =
            StreamFunction::consumer("conformance-in-order", move |message: Message| {
                let finishing = finishing.clone();
                async move {
                    let text = String::from_utf8_lossy(message.payload()).into_owned();
                    let n: u64 = text.trim_start_matches("message-").parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis((count as u64 - n) * 5)).await;
                    finishing.record("finished", &message);
                }
            });
        let toml = format!(
            r#"[stream.bindings.conformance-in-order-in-0]
destination = "{input}"
group = "{group}"
consumer.concurrency = 4"#
        );
        let app = application(&faulty, slow_first, &toml)
            .start()
            .await
            .expect("start");
        // Sent while the binding is paused, so that they arrive together; distinct keys, so
        // that four handlers run at once.
        let binding = "conformance-in-order-in-0";
        app.pause_binding(binding).await.expect("pause");
        let producer = producer(&binder, &input).await;
        for n in 0..count {
            let message = Message::builder(Bytes::from(format!("message-{n:04}")))
                .key(format!("key-{n}"))
                .build();
            producer.send(message).await.expect("send");
        }
        app.resume_binding(binding).await.expect("resume");
        self.acknowledged(&faults, count).await;
        app.shutdown().await.expect("shutdown");
        let received = faults.events("received:");
        let finished = faults.events("finished:");
        let acked = faults.events("acked:");
        assert_ne!(
            finished[..count],
            received[..count],
            "the handlers finished in arrival order: nothing was tested"
        );
        assert_eq!(
            acked,
            received[..acked.len()],
            "acknowledged out of arrival order"
        );
        binder.close().await.ok();
    }

    /// A shutdown whose binder never finishes closing returns within `shutdown-timeout` and a
    /// little more, with an error naming the binder.
    pub async fn shutdown_is_bounded_when_a_binder_will_not_close(&self) {
        let binder = self.binder().await;
        let (_, stubborn) = faulty(
            &binder,
            Faults {
                close_hangs: true,
                ..Faults::default()
            },
        );
        let (input, group) = (unique("hang-in"), unique("hang"));
        let sink = StreamFunction::consumer("conformance-hang", |_: Message| async move {});
        let toml = format!(
            r#"[stream]
shutdown-timeout = "1s"
default-binder = "stubborn"
[stream.binders.stubborn]
type = "memory"
[stream.bindings.conformance-hang-in-0]
destination = "{input}"
group = "{group}""#
        );
        let app = crate::testing::isolated(sink, &toml)
            .replace_binders(stubborn)
            .build()
            .expect("the conformance configuration is valid")
            .start()
            .await
            .expect("start");
        let began = Instant::now();
        let shutdown = tokio::time::timeout(Duration::from_secs(30), app.shutdown())
            .await
            .expect("the shutdown returned");
        let took = began.elapsed();
        let error = shutdown.expect_err("a binder that did not close is an error");
        assert!(error.to_string().contains("binder `stubborn`"), "{error}");
        assert!(error.to_string().contains("did not close"), "{error}");
        assert!(
            took < Duration::from_secs(3),
            "the shutdown took {took:?} with a 1 s shutdown-timeout"
        );
        binder.close().await.ok();
    }

    /// Waits until the application acknowledged `count` messages through `faults`.
    async fn acknowledged(&self, faults: &Faults, count: usize) {
        let deadline = Instant::now() + self.timeout;
        while faults.events("acked:").len() < count {
            assert!(
                Instant::now() < deadline,
                "{} of {count} messages were acknowledged",
                faults.events("acked:").len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails if a message arrives within `quiet`.
    async fn expect_nothing(
        &self,
        subscription: &mut Box<dyn Subscription>,
        quiet: Duration,
        when: &str,
    ) {
        match tokio::time::timeout(quiet, subscription.next()).await {
            Err(_) => {}
            Ok(Some(Ok(delivery))) => panic!(
                "`{}` was handled {when}",
                String::from_utf8_lossy(delivery.message.payload())
            ),
            Ok(Some(Err(error))) => panic!("receiving failed {when}: {error}"),
            Ok(None) => panic!("the subscription ended {when}"),
        }
    }

    async fn receive_one(&self, subscription: &mut Box<dyn Subscription>) -> Delivery {
        match tokio::time::timeout(self.timeout, subscription.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            Ok(Some(Err(error))) => panic!("receiving failed: {error}"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("no message within {:?}", self.timeout),
        }
    }

    /// Receives and acknowledges `n` messages, returning their payloads as text.
    async fn receive_n(&self, subscription: &mut Box<dyn Subscription>, n: usize) -> Vec<String> {
        let mut payloads = Vec::with_capacity(n);
        while payloads.len() < n {
            let delivery = match tokio::time::timeout(self.timeout, subscription.next()).await {
                Ok(Some(Ok(delivery))) => delivery,
                other => panic!(
                    "received {} of {n} messages, then {}",
                    payloads.len(),
                    match other {
                        Ok(Some(Err(error))) => format!("an error: {error}"),
                        Ok(None) => "the subscription ended".to_owned(),
                        _ => format!("nothing within {:?}", self.timeout),
                    }
                ),
            };
            payloads.push(String::from_utf8_lossy(delivery.message.payload()).into_owned());
            delivery.acknowledgement.ack().await.expect("ack");
        }
        payloads
    }
}

/// Every `key:n` payload arrived once, and those of each key in the order sent.
fn assert_once_and_in_order_per_key(received: &[String], count: usize) {
    let distinct: BTreeSet<&String> = received.iter().collect();
    assert_eq!(distinct.len(), count, "every message must arrive once");
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for payload in received {
        let (key, n) = payload.split_once(':').expect("key:n");
        by_key.entry(key).or_default().push(n);
    }
    for (key, numbers) in by_key {
        let mut sorted = numbers.clone();
        sorted.sort();
        assert_eq!(
            numbers, sorted,
            "messages with key `{key}` must keep their order"
        );
    }
}

fn unique(case: &str) -> String {
    format!(
        "conformance-{case}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

async fn subscribe(
    binder: &Arc<dyn Binder>,
    destination: &str,
    group: Option<&str>,
) -> Box<dyn Subscription> {
    binder
        .subscribe(&ConsumerSpec::new(destination, group))
        .await
        .expect("subscribe")
}

async fn producer(binder: &Arc<dyn Binder>, destination: &str) -> Arc<dyn crate::Producer> {
    binder
        .producer(&ProducerSpec::new(destination))
        .await
        .expect("producer")
}

async fn send_numbered(
    binder: &Arc<dyn Binder>,
    destination: &str,
    n: usize,
    key: Option<&str>,
) -> Vec<String> {
    let producer = producer(binder, destination).await;
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        let payload = format!("message-{i:04}");
        let mut message = Message::new(Bytes::from(payload.clone()));
        message.set_key(key.map(|k| Bytes::copy_from_slice(k.as_bytes())));
        producer.send(message).await.expect("send");
        sent.push(payload);
    }
    sent
}

/// Instance `index` of `count` of a partitioned consumer group.
fn partitioned_consumer(destination: &str, group: &str, index: u32, count: u32) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(destination, Some(group));
    spec.properties.partitioned = true;
    spec.properties.instance_index = index;
    spec.properties.instance_count = count;
    spec
}

async fn forward(mut subscription: Box<dyn Subscription>, to: mpsc::UnboundedSender<String>) {
    while let Some(Ok(delivery)) = subscription.next().await {
        let payload = String::from_utf8_lossy(delivery.message.payload()).into_owned();
        if delivery.acknowledgement.ack().await.is_ok() {
            let _ = to.send(payload);
        }
    }
}

/// An application on `binder`, which its shutdown leaves open: the case goes on using it, and
/// closes it at the end.
fn application(binder: &Arc<dyn Binder>, function: StreamFunction, toml: &str) -> Application {
    crate::testing::isolated(function, toml)
        .replace_binders(Arc::new(Lent(binder.clone())))
        .build()
        .expect("the conformance configuration is valid")
}

/// A binder lent to an application: everything but `close` goes to the binder.
#[derive(Debug)]
struct Lent(Arc<dyn Binder>);

#[async_trait::async_trait]
impl Binder for Lent {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        self.0.subscribe(spec).await
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn crate::Producer>, Error> {
        self.0.producer(spec).await
    }

    async fn dead_letter_producer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<Arc<dyn crate::Producer>, Error> {
        self.0.dead_letter_producer(spec).await
    }
}

/// Faults a case puts on the binder under test, and what the application's bindings did
/// through it: `received:`, `confirmed:` and `acked:` events, each with the message's payload.
#[derive(Debug, Default)]
struct Faults {
    /// How much later than the broker's each confirmation is answered.
    confirm_delay: Duration,
    /// Every send fails for this long from the first one, without reaching the broker (from
    /// the first send, not the start: a broker's group join can take longer than the outage).
    outage: Duration,
    outage_began: std::sync::OnceLock<Instant>,
    /// Sends failed so far.
    refused: AtomicU32,
    /// Subscriptions ask for acknowledgements in arrival order.
    in_order: bool,
    /// `close` never finishes.
    close_hangs: bool,
    log: std::sync::Mutex<Vec<String>>,
}

impl Faults {
    fn record(&self, event: &str, message: &Message) {
        let payload = String::from_utf8_lossy(message.payload());
        self.log
            .lock()
            .expect("log")
            .push(format!("{event}:{payload}"));
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// The payloads of the events of one kind (`acked:`, say), in the order they happened.
    fn events(&self, kind: &str) -> Vec<String> {
        self.log()
            .iter()
            .filter_map(|event| event.strip_prefix(kind).map(str::to_owned))
            .collect()
    }
}

/// `binder` with `faults`, and the faults to read what happened.
fn faulty(binder: &Arc<dyn Binder>, faults: Faults) -> (Arc<Faults>, Arc<dyn Binder>) {
    let faults = Arc::new(faults);
    let faulty = Arc::new(Faulty::new(binder, &faults));
    (faults, faulty)
}

/// The binder under test with [`Faults`], lent to an application as [`Lent`] is (its `close`
/// does not close the binder under test).
#[derive(Debug)]
struct Faulty {
    binder: Arc<dyn Binder>,
    faults: Arc<Faults>,
}

impl Faulty {
    fn new(binder: &Arc<dyn Binder>, faults: &Arc<Faults>) -> Self {
        Faulty {
            binder: binder.clone(),
            faults: faults.clone(),
        }
    }
}

#[async_trait::async_trait]
impl Binder for Faulty {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        let subscription = self.binder.subscribe(spec).await?;
        Ok(Box::new(FaultySubscription {
            subscription,
            faults: self.faults.clone(),
        }))
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn crate::Producer>, Error> {
        let producer = self.binder.producer(spec).await?;
        Ok(Arc::new(FaultyProducer {
            producer,
            faults: self.faults.clone(),
        }))
    }

    async fn dead_letter_producer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<Arc<dyn crate::Producer>, Error> {
        self.binder.dead_letter_producer(spec).await
    }

    async fn close(&self) -> Result<(), Error> {
        if self.faults.close_hangs {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FaultyProducer {
    producer: Arc<dyn crate::Producer>,
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl crate::Producer for FaultyProducer {
    async fn enqueue(&self, message: &Message) -> Result<crate::binder::Confirmation, Error> {
        let faults = self.faults.clone();
        let outage_began = *faults.outage_began.get_or_init(Instant::now);
        if Instant::now() < outage_began + faults.outage {
            faults.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::binder(
                "faulty",
                "the broker is away (a conformance fault)",
            ));
        }
        let confirmation = self.producer.enqueue(message).await?;
        let message = message.clone();
        Ok(crate::binder::Confirmation::pending(async move {
            confirmation.await?;
            tokio::time::sleep(faults.confirm_delay).await;
            faults.record("confirmed", &message);
            Ok(())
        }))
    }
}

#[derive(Debug)]
struct FaultySubscription {
    subscription: Box<dyn Subscription>,
    faults: Arc<Faults>,
}

impl FaultySubscription {
    fn logged(&self, delivery: Delivery) -> Delivery {
        self.faults.record("received", &delivery.message);
        Delivery {
            acknowledgement: Box::new(LoggedAcknowledgement {
                acknowledgement: Some(delivery.acknowledgement),
                message: delivery.message.clone(),
                faults: self.faults.clone(),
            }),
            ..delivery
        }
    }
}

#[async_trait::async_trait]
impl Subscription for FaultySubscription {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let next = self.subscription.next().await?;
        Some(next.map(|delivery| self.logged(delivery)))
    }

    fn try_next(&mut self) -> Option<Result<Delivery, Error>> {
        let next = self.subscription.try_next()?;
        Some(next.map(|delivery| self.logged(delivery)))
    }

    async fn close(self: Box<Self>) -> Result<(), Error> {
        self.subscription.close().await
    }

    async fn drain(&mut self) -> bool {
        self.subscription.drain().await
    }

    async fn pause(&mut self) {
        self.subscription.pause().await
    }

    async fn resume(&mut self) {
        self.subscription.resume().await
    }

    fn acknowledges_in_order(&self) -> bool {
        self.faults.in_order || self.subscription.acknowledges_in_order()
    }
}

#[derive(Debug)]
struct LoggedAcknowledgement {
    acknowledgement: Option<Box<dyn crate::binder::Acknowledgement>>,
    message: Arc<Message>,
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl crate::binder::Acknowledgement for LoggedAcknowledgement {
    async fn ack(mut self: Box<Self>) -> Result<(), Error> {
        self.faults.record("acked", &self.message);
        match self.acknowledgement.take() {
            Some(acknowledgement) => acknowledgement.ack().await,
            None => Ok(()),
        }
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), Error> {
        match self.acknowledgement.take() {
            Some(acknowledgement) => acknowledgement.requeue().await,
            None => Ok(()),
        }
    }
}

/// Generates one `#[tokio::test]` per conformance case, each running against the binder the
/// given [`Suite`] expression makes.
#[macro_export]
macro_rules! conformance_tests {
    ($suite:expr) => {
        $crate::conformance_tests!(@cases $suite;
            pub_sub_across_groups,
            competing_consumers_within_a_group,
            a_group_shares_its_messages_among_its_consumers,
            anonymous_consumers_each_get_every_message,
            order_is_kept_within_a_key,
            headers_key_and_content_type_round_trip,
            unacknowledged_messages_are_redelivered,
            a_requeued_message_is_delivered_again,
            an_acknowledged_message_is_not_delivered_again,
            retries_then_dead_letter_with_failure_headers,
            nothing_is_lost_under_concurrency,
            back_off_holds_back_only_its_key,
            back_off_holds_back_only_its_key_at_concurrency_4,
            confirmations_are_awaited_in_the_background,
            a_send_outage_loses_nothing_and_acknowledges_nothing_early,
            acknowledgements_follow_arrival_order_when_the_subscription_asks,
            shutdown_is_bounded_when_a_binder_will_not_close,
            a_backlog_drains_in_order_within_each_key,
            a_binding_on_the_dead_letter_destination_reads_dead_letters,
            an_undecodable_payload_is_dead_lettered_without_retries,
            a_dead_letter_waits_for_a_reader_that_comes_later,
            required_groups_keep_what_is_sent_before_their_consumer_starts,
            lag_counts_what_waits_for_a_group,
            a_partitioned_destination_sends_each_key_to_one_instance,
            required_groups_keep_each_partition_of_a_partitioned_destination,
            a_shutdown_mid_backlog_loses_nothing,
            a_paused_or_stopped_binding_handles_nothing_until_it_runs_again
        );
    };
    (@cases $suite:expr; $($case:ident),*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let suite: $crate::conformance::Suite = $suite;
                if suite.is_enabled() {
                    suite.$case().await;
                }
            }
        )*
    };
}
