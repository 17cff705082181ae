use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as sync_mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bindery_core::config::Problems;
use bindery_core::redact::{display_value, redact_uri};
use bindery_core::{
    header, Acknowledgement, Binder, ConsumerSpec, Delivery, Error, Headers, Message, Producer,
    ProducerSpec, Subscription,
};
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};

use crate::settings::{KafkaConsumerSettings, KafkaSettings, StartOffset};
use crate::KafkaError;

/// How long a new consumer may wait for its partitions (group joins can take seconds).
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a send may wait for room in librdkafka's queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages the poll thread holds for a busy application before it pauses the partitions.
/// Pausing is rare by design: each resume fetches again from the application's position.
const PAUSE_AFTER: usize = 500;
/// How often the poll thread polls; also how soon acknowledgements become stored offsets.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The Kafka binder: one idempotent producer shared by all destinations, one consumer (and one
/// polling thread) per subscription.
#[derive(Clone)]
pub struct KafkaBinder {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    settings: KafkaSettings,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl fmt::Debug for KafkaBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBinder")
            .field("name", &self.inner.name)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

fn client_error(settings: &KafkaSettings, error: rdkafka::error::KafkaError) -> KafkaError {
    // librdkafka's configuration errors may quote a value: hide those of secret keys.
    let mut text = error.to_string();
    for (key, value) in &settings.configuration {
        let shown = display_value(key, value);
        if shown != *value && !value.is_empty() {
            text = text.replace(value.as_str(), &shown);
        }
    }
    KafkaError::Config(redact_uri(&text))
}

impl KafkaBinder {
    /// Connects to the brokers, failing within `connection-timeout` when none answers.
    pub async fn connect(name: &str, settings: KafkaSettings) -> Result<Self, Error> {
        let fail = |e: KafkaError| Error::binder(name.to_owned(), e);
        let mut config = base_config(&settings);
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        let producer: FutureProducer = config
            .create()
            .map_err(|e| fail(client_error(&settings, e)))?;
        let admin: AdminClient<DefaultClientContext> = base_config(&settings)
            .create()
            .map_err(|e| fail(client_error(&settings, e)))?;
        let timeout = settings.connection_timeout;
        let probe = producer.clone();
        let reachable = tokio::task::spawn_blocking(move || {
            probe.client().fetch_metadata(None, timeout).map(|_| ())
        })
        .await;
        match reachable {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(fail(KafkaError::Unreachable {
                    brokers: settings.brokers.clone(),
                    timeout,
                    reason: e.to_string(),
                }))
            }
            Err(e) => return Err(fail(KafkaError::Client(e.to_string()))),
        }
        Ok(KafkaBinder {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                settings,
                producer,
                admin,
            }),
        })
    }

    /// Connects to `brokers` with default settings for everything else.
    pub async fn connect_brokers(brokers: &str) -> Result<Self, Error> {
        let settings = KafkaSettings {
            brokers: brokers.to_owned(),
            ..KafkaSettings::default()
        };
        Self::connect("kafka", settings).await
    }

    fn error(&self, error: KafkaError) -> Error {
        Error::binder(self.inner.name.clone(), error)
    }

    /// Creates `topic` when it is missing and `auto-create-topics` is on; otherwise checks that
    /// it exists.
    async fn ensure_topic(&self, topic: &str) -> Result<(), KafkaError> {
        let settings = &self.inner.settings;
        if settings.auto_create_topics {
            let new_topic = NewTopic::new(
                topic,
                settings.min_partition_count,
                TopicReplication::Fixed(settings.replication_factor),
            );
            let options = AdminOptions::new()
                .operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
            let results = self
                .inner
                .admin
                .create_topics([&new_topic], &options)
                .await
                .map_err(|e| KafkaError::Topic {
                    topic: topic.to_owned(),
                    reason: format!("cannot create it: {e}"),
                })?;
            for result in results {
                match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(KafkaError::Topic {
                            topic: topic.to_owned(),
                            reason: format!("cannot create it: {code}"),
                        })
                    }
                }
            }
            return Ok(());
        }
        let producer = self.inner.producer.clone();
        let name = topic.to_owned();
        let timeout = settings.connection_timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|e| KafkaError::Client(e.to_string()))?
        .map_err(|e| KafkaError::Client(e.to_string()))?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if exists {
            Ok(())
        } else {
            Err(KafkaError::Topic {
                topic: topic.to_owned(),
                reason: "it does not exist and `auto-create-topics` is false; create it, or set `auto-create-topics = true`".to_owned(),
            })
        }
    }
}

fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    for (key, value) in &settings.configuration {
        config.set(key, value);
    }
    config
}

#[async_trait]
impl Binder for KafkaBinder {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        self.ensure_topic(&spec.destination)
            .await
            .map_err(|e| self.error(e))?;
        let mut problems = Problems::default();
        let own = KafkaConsumerSettings::read(spec.extension.as_ref(), &mut problems);
        let (group, default_start) = match &spec.group {
            Some(group) => (group.clone(), StartOffset::Earliest),
            None => (
                format!("anonymous.{}", uuid::Uuid::new_v4().simple()),
                StartOffset::Latest,
            ),
        };
        let start = own
            .start_offset
            .or(self.inner.settings.start_offset)
            .unwrap_or(default_start);
        let mut config = base_config(&self.inner.settings);
        config
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", start.as_str())
            .set("enable.partition.eof", "false");
        let assigned = Arc::new(Notify::new());
        let tracker = Arc::new(Mutex::new(BTreeMap::new()));
        let context = PollContext {
            assigned: assigned.clone(),
            offsets: tracker.clone(),
        };
        let consumer: BaseConsumer<PollContext> = config
            .create_with_context(context)
            .map_err(|e| self.error(client_error(&self.inner.settings, e)))?;
        consumer
            .subscribe(&[spec.destination.as_str()])
            .map_err(|e| self.error(KafkaError::Client(e.to_string())))?;

        let capacity = (spec.properties.concurrency.max(1) as usize) * 2;
        let (deliveries, receiver) = mpsc::channel(capacity);
        let (acks, ack_events) = sync_mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let waiting = assigned.notified();
        let poller = Poller {
            consumer,
            topic: spec.destination.clone(),
            deliveries,
            acks,
            ack_events,
            offsets: tracker,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("bindery-kafka-{}", spec.destination))
            .spawn(move || poller.run())
            .map_err(|e| self.error(KafkaError::Client(e.to_string())))?;
        let subscription = KafkaSubscription {
            receiver,
            stop,
            thread: Some(thread),
        };
        if tokio::time::timeout(ASSIGNMENT_TIMEOUT, waiting)
            .await
            .is_err()
        {
            return Err(self.error(KafkaError::Assignment {
                group,
                topic: spec.destination.clone(),
                timeout: ASSIGNMENT_TIMEOUT,
            }));
        }
        Ok(Box::new(subscription))
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error> {
        self.ensure_topic(&spec.destination)
            .await
            .map_err(|e| self.error(e))?;
        Ok(Arc::new(KafkaProducer {
            binder: self.clone(),
            topic: spec.destination.clone(),
        }))
    }
}

struct KafkaProducer {
    binder: KafkaBinder,
    topic: String,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&self, message: Message) -> Result<(), Error> {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers().len());
        for (name, value) in message.headers().iter() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_ref()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .payload(message.payload().as_ref())
            .headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key.as_ref());
        }
        self.binder
            .inner
            .producer
            .send(record, Timeout::After(QUEUE_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                self.binder.error(KafkaError::Send {
                    topic: self.topic.clone(),
                    reason: e.to_string(),
                })
            })
    }
}

/// Offsets of one partition: those being handled, and the next after the highest done.
#[derive(Debug, Default)]
struct PartitionOffsets {
    in_flight: BTreeSet<i64>,
    next_after_done: i64,
    stored: i64,
}

impl PartitionOffsets {
    fn received(&mut self, offset: i64) {
        self.in_flight.insert(offset);
    }

    fn done(&mut self, offset: i64) {
        self.in_flight.remove(&offset);
        self.next_after_done = self.next_after_done.max(offset + 1);
    }

    /// The offset to store now, if it moved: the lowest still in flight, else the next after
    /// the highest done. Never past a message that has not finished.
    fn advance_stored(&mut self) -> Option<i64> {
        let safe = self
            .in_flight
            .first()
            .copied()
            .unwrap_or(self.next_after_done);
        (safe > self.stored).then(|| {
            self.stored = safe;
            safe
        })
    }
}

type OffsetTracker = Arc<Mutex<BTreeMap<i32, PartitionOffsets>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct PollContext {
    assigned: Arc<Notify>,
    offsets: OffsetTracker,
}

impl ClientContext for PollContext {}

impl ConsumerContext for PollContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // librdkafka commits the stored offsets of revoked partitions; what is still in
            // flight there will be delivered again to the partition's next owner.
            let mut offsets = lock(&self.offsets);
            for element in partitions.elements() {
                offsets.remove(&element.partition());
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.notify_one();
        }
    }
}

enum AckEvent {
    Done { partition: i32, offset: i64 },
    Again { partition: i32, offset: i64 },
}

/// Owns the consumer on its own thread: polls it all the time, hands messages to the runtime,
/// pauses while the runtime is busy, and turns acknowledgements into stored offsets.
struct Poller {
    consumer: BaseConsumer<PollContext>,
    topic: String,
    deliveries: mpsc::Sender<Delivery>,
    acks: sync_mpsc::Sender<AckEvent>,
    ack_events: sync_mpsc::Receiver<AckEvent>,
    offsets: OffsetTracker,
    stop: Arc<AtomicBool>,
}

impl Poller {
    fn run(self) {
        let mut waiting: VecDeque<Delivery> = VecDeque::new();
        let mut paused = false;
        // The offset after the last message polled, per partition: where to go on resuming.
        let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
        while !self.stop.load(Ordering::Acquire) {
            self.settle_acknowledgements();
            while let Some(delivery) = waiting.pop_front() {
                match self.deliveries.try_send(delivery) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(delivery)) => {
                        waiting.push_front(delivery);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return self.finish(),
                }
            }
            // Keep polling while busy, with the partitions paused, so the group keeps us.
            let busy = if paused {
                !waiting.is_empty()
            } else {
                waiting.len() >= PAUSE_AFTER
            };
            if busy != paused {
                if let Ok(assignment) = self.consumer.assignment() {
                    let result = if busy {
                        self.consumer.pause(&assignment)
                    } else {
                        self.consumer
                            .resume(&assignment)
                            .and_then(|()| self.seek_to(&positions))
                    };
                    if let Err(error) = result {
                        tracing::warn!(topic = %self.topic, %error, "pausing or resuming partitions failed");
                    }
                }
                paused = busy;
            }
            match self.consumer.poll(POLL_INTERVAL) {
                None => {}
                Some(Err(error)) => {
                    tracing::warn!(topic = %self.topic, %error, "Kafka consumer error")
                }
                Some(Ok(record)) => {
                    let (partition, offset) = (record.partition(), record.offset());
                    positions.insert(partition, offset + 1);
                    lock(&self.offsets)
                        .entry(partition)
                        .or_default()
                        .received(offset);
                    waiting.push_back(Delivery {
                        message: to_message(&record),
                        redelivered: false,
                        acknowledgement: Box::new(KafkaAck {
                            events: Some(self.acks.clone()),
                            partition,
                            offset,
                        }),
                    });
                }
            }
        }
        self.finish();
    }

    /// Continues each partition right after the last message polled from it: what librdkafka
    /// had fetched while the partitions were paused is fetched again, never skipped.
    fn seek_to(&self, positions: &BTreeMap<i32, i64>) -> rdkafka::error::KafkaResult<()> {
        for (partition, offset) in positions {
            self.consumer.seek(
                &self.topic,
                *partition,
                Offset::Offset(*offset),
                Duration::from_secs(5),
            )?;
        }
        Ok(())
    }

    fn finish(self) {
        self.settle_acknowledgements();
        if let Err(error) = self
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        {
            tracing::debug!(topic = %self.topic, %error, "final commit");
        }
    }

    /// Applies acknowledgements: stores, per partition, the offset after which nothing is in
    /// flight; seeks back to a message that must be delivered again.
    fn settle_acknowledgements(&self) {
        let mut store = TopicPartitionList::new();
        {
            let mut offsets = lock(&self.offsets);
            for event in self.ack_events.try_iter() {
                match event {
                    AckEvent::Done { partition, offset } => {
                        if let Some(p) = offsets.get_mut(&partition) {
                            p.done(offset);
                        }
                    }
                    AckEvent::Again { partition, offset } => {
                        if offsets.contains_key(&partition) {
                            if let Err(error) = self.consumer.seek(
                                &self.topic,
                                partition,
                                Offset::Offset(offset),
                                Duration::from_secs(5),
                            ) {
                                tracing::warn!(topic = %self.topic, partition, offset, %error, "seeking back failed; the message comes back after a restart");
                            }
                        }
                    }
                }
            }
            for (partition, p) in offsets.iter_mut() {
                if let Some(safe) = p.advance_stored() {
                    let _ =
                        store.add_partition_offset(&self.topic, *partition, Offset::Offset(safe));
                }
            }
        }
        if store.count() > 0 {
            if let Err(error) = self.consumer.store_offsets(&store) {
                tracing::debug!(topic = %self.topic, %error, "storing offsets failed (partition revoked?)");
            }
        }
    }
}

fn to_message(record: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let mut headers = Headers::new();
    if let Some(kafka_headers) = record.headers() {
        for h in kafka_headers.iter() {
            headers.insert_bytes(h.key, Bytes::copy_from_slice(h.value.unwrap_or_default()));
        }
    }
    if !headers.contains(header::MESSAGE_ID) {
        let id = format!(
            "{}-{}@{}",
            record.topic(),
            record.partition(),
            record.offset()
        );
        headers.insert(header::MESSAGE_ID, id);
    }
    let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let key = record.key().map(Bytes::copy_from_slice);
    Message::from_parts(payload, headers, key)
}

struct KafkaSubscription {
    receiver: mpsc::Receiver<Delivery>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscription").finish_non_exhaustive()
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        self.receiver.recv().await.map(Ok)
    }

    async fn close(mut self: Box<Self>) -> Result<(), Error> {
        self.stop.store(true, Ordering::Release);
        self.receiver.close();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

struct KafkaAck {
    events: Option<sync_mpsc::Sender<AckEvent>>,
    partition: i32,
    offset: i64,
}

impl fmt::Debug for KafkaAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAck")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .finish()
    }
}

#[async_trait]
impl Acknowledgement for KafkaAck {
    async fn ack(mut self: Box<Self>) -> Result<(), Error> {
        if let Some(events) = self.events.take() {
            let _ = events.send(AckEvent::Done {
                partition: self.partition,
                offset: self.offset,
            });
        }
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), Error> {
        if let Some(events) = self.events.take() {
            let _ = events.send(AckEvent::Again {
                partition: self.partition,
                offset: self.offset,
            });
        }
        Ok(())
    }
}

impl Drop for KafkaAck {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            let _ = events.send(AckEvent::Again {
                partition: self.partition,
                offset: self.offset,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionOffsets;

    #[test]
    fn stored_offsets_never_pass_a_message_in_flight() {
        let mut p = PartitionOffsets::default();
        for offset in 0..5 {
            p.received(offset);
        }
        // Finished out of order: 1, 3, 4 are done while 0 and 2 are still in flight.
        for offset in [1, 3, 4] {
            p.done(offset);
        }
        assert_eq!(
            p.advance_stored(),
            None,
            "offset 0 is in flight: nothing may be committed"
        );
        p.done(0);
        assert_eq!(
            p.advance_stored(),
            Some(2),
            "up to 2, which is still in flight"
        );
        assert_eq!(p.advance_stored(), None, "no change, nothing new to store");
        p.done(2);
        assert_eq!(
            p.advance_stored(),
            Some(5),
            "everything done: the next offset to read"
        );
    }

    #[test]
    fn a_failed_message_holds_the_commit_back() {
        let mut p = PartitionOffsets::default();
        for offset in 10..13 {
            p.received(offset);
        }
        p.done(11);
        p.done(12);
        // 10 was requeued: it stays in flight until it is delivered again and done.
        assert_eq!(p.advance_stored(), Some(10));
        p.received(10);
        p.done(10);
        assert_eq!(p.advance_stored(), Some(13));
    }
}
