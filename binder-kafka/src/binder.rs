use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as sync_mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bindery_core::binder::{TryEnqueue, HEALTH_ANSWER_WITHIN, LAG_ANSWER_WITHIN};
use bindery_core::config::Problems;
use bindery_core::redact::{display_value, redact_uri};
use bindery_core::{
    header, Acknowledgement, Binder, Confirmation, ConsumerSpec, Delivery, Error, Headers, Health,
    Message, Producer, ProducerSpec, Subscription,
};
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};

use crate::settings::{refused_setting, KafkaConsumerSettings, KafkaSettings, StartOffset};
use crate::KafkaError;

/// How long a new consumer may wait for its partitions (group joins can take seconds).
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing waits for queued records. Every input whose outputs are still queued is
/// unacknowledged and comes back, so this only saves redeliveries; it keeps shutdown short.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// How long a send may wait for room in librdkafka's queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages handed from the poll thread to the application ahead of its need.
const HAND_OVER: usize = 256;
/// The longest the poll thread waits in one step (for a message, or for room to hand one
/// over); also the longest acknowledgements wait to become stored offsets.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the poll thread sleeps before looking again for room in the hand-over.
const FULL_WAIT: Duration = Duration::from_millis(1);
/// How often the poll thread turns acknowledgements into stored offsets (each loop, at most).
const SETTLE_EVERY: Duration = Duration::from_millis(10);

/// The Kafka binder: one idempotent producer shared by all destinations, one consumer (and one
/// polling thread) per subscription.
#[derive(Clone)]
pub struct KafkaBinder {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    settings: KafkaSettings,
    /// Set when the idempotent producer failed for good: every subscription then ends, which
    /// stops the application (its inputs stay unacknowledged and come back after a restart).
    producer_failed: Arc<AtomicBool>,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// The first topic a binding used: health checks ask for its metadata only, not for
    /// every topic of the cluster.
    health_topic: std::sync::OnceLock<String>,
    /// A client per group for measuring lag (it reads the group's offsets, never joins it),
    /// kept so a scrape opens no connection; `None` while a measurement holds it.
    lag_clients: Mutex<BTreeMap<String, Option<Arc<BaseConsumer>>>>,
}

impl fmt::Debug for KafkaBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBinder")
            .field("name", &self.inner.name)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// What waits for the consumer's group in `topic` (its partitions `p % instances == index`),
/// or `None` when the broker does not answer every request within `within` in all.
fn measure_lag(
    consumer: &BaseConsumer,
    topic: &str,
    instances: u32,
    index: u32,
    within: Duration,
) -> Option<u64> {
    let deadline = std::time::Instant::now() + within;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|left| !left.is_zero())
    };
    let metadata = consumer.fetch_metadata(Some(topic), left()?).ok()?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|id| u32::try_from(*id).is_ok_and(|p| p % instances == index))
        .collect();
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, left()?).ok()?;
    let mut lag = 0u64;
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, left()?).ok()?;
        let done = match committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(offset)) => offset,
            _ => low,
        };
        lag += u64::try_from(high - done).unwrap_or(0);
    }
    Some(lag)
}

fn client_error(settings: &KafkaSettings, error: rdkafka::error::KafkaError) -> KafkaError {
    KafkaError::Config(redacted(settings, &error))
}

/// librdkafka's errors may quote a configuration value: those of secret keys are hidden, and
/// so are passwords in addresses.
fn redacted(settings: &KafkaSettings, error: &rdkafka::error::KafkaError) -> String {
    let mut text = error.to_string();
    for (key, value) in &settings.configuration {
        let shown = display_value(key, value);
        if shown != *value && !value.is_empty() {
            text = text.replace(value.as_str(), &shown);
        }
    }
    redact_uri(&text)
}

impl KafkaBinder {
    /// The lag client of `group`, made on first use; `None` while a measurement holds it.
    fn take_lag_client(&self, group: &str) -> Option<Arc<BaseConsumer>> {
        let mut clients = lock(&self.inner.lag_clients);
        match clients.get_mut(group) {
            Some(client) => client.take(),
            None => {
                let mut config = base_config(&self.inner.settings);
                config
                    .set("group.id", group)
                    .set("enable.auto.commit", "false");
                let client: BaseConsumer = config.create().ok()?;
                clients.insert(group.to_owned(), None);
                Some(Arc::new(client))
            }
        }
    }

    /// Connects to the brokers, failing within `connection-timeout` when none answers.
    pub async fn connect(name: &str, settings: KafkaSettings) -> Result<Self, Error> {
        let fail = |e: KafkaError| Error::binder(name.to_owned(), e);
        check_delivery_guarantees(&settings).map_err(fail)?;
        let mut config = base_config(&settings);
        // At-least-once needs every replica's confirm and no reordering on retry; the rest are
        // defaults a Kafka engineer expects, kept when the configuration sets its own.
        config.set("acks", "all").set("enable.idempotence", "true");
        for (keys, value) in [
            // librdkafka takes either name; both set, which one wins is not defined.
            (&["message.timeout.ms", "delivery.timeout.ms"][..], "30000"),
            // The Java client's partitioner: keys land on the partitions Spring producers use.
            (&["partitioner"][..], "murmur2_random"),
        ] {
            if !keys
                .iter()
                .any(|key| settings.configuration.contains_key(*key))
            {
                config.set(keys[0], value);
            }
        }
        // Topics are looked up with the producer, and librdkafka's producer asks the broker to
        // create a topic it looks up: with `auto-create-topics = false` a missing topic must
        // stay missing, an error at startup.
        if !settings.auto_create_topics
            && !settings
                .configuration
                .contains_key("allow.auto.create.topics")
        {
            config.set("allow.auto.create.topics", "false");
        }
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
                    brokers: redact_uri(&settings.brokers),
                    timeout,
                    reason: redacted(&settings, &e),
                }))
            }
            Err(e) => return Err(fail(KafkaError::Client(e.to_string()))),
        }
        Ok(KafkaBinder {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                settings,
                producer_failed: Arc::default(),
                producer,
                admin,
                health_topic: std::sync::OnceLock::new(),
                lag_clients: Mutex::default(),
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

    fn send_error(&self, topic: &str, error: rdkafka::error::KafkaError) -> Error {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(binder = %self.inner.name, %error, "the Kafka producer failed for good; the application stops");
            self.inner.producer_failed.store(true, Ordering::Release);
        }
        let permanent = is_permanent(&error);
        let error = KafkaError::Send {
            topic: topic.to_owned(),
            reason: error.to_string(),
        };
        match permanent {
            true => Error::refused(self.inner.name.clone(), error),
            false => self.error(error),
        }
    }

    /// Creates `topic` when it is missing and `auto-create-topics` is on; otherwise checks that
    /// it exists. A partitioned binding needs `partitions` partitions at least: a topic created
    /// here gets them, and one that has fewer is an error.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), KafkaError> {
        self.create_or_check_topic(topic, partitions).await?;
        // Only the first topic is kept; a later one changes nothing.
        self.inner.health_topic.set(topic.to_owned()).ok();
        Ok(())
    }

    async fn create_or_check_topic(&self, topic: &str, partitions: u32) -> Result<(), KafkaError> {
        let settings = &self.inner.settings;
        let mut created = false;
        if settings.auto_create_topics {
            let wanted = i32::try_from(wanted_partitions(settings, partitions)).unwrap_or(i32::MAX);
            let new_topic = NewTopic::new(
                topic,
                wanted,
                TopicReplication::Fixed(settings.replication_factor),
            );
            // The broker may take the operation timeout to create it; reaching the broker is
            // bounded as at connect, not by librdkafka's `socket.timeout.ms` (60 s), and within
            // the hour librdkafka accepts as a request timeout.
            let operation = Duration::from_secs(10);
            let request = operation
                .saturating_add(settings.connection_timeout)
                .min(Duration::from_secs(3600));
            let options = AdminOptions::new()
                .operation_timeout(Some(Timeout::After(operation)))
                .request_timeout(Some(Timeout::After(request)));
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
                    Ok(_) => created = true,
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(KafkaError::Topic {
                            topic: topic.to_owned(),
                            reason: format!("cannot create it: {code}"),
                        })
                    }
                }
            }
            if partitions <= 1 && !created {
                return Ok(());
            }
        }
        // A topic just created may take a moment to show in the metadata: a consumer that
        // assigns its partitions itself must see them all.
        let give_up = tokio::time::Instant::now() + settings.connection_timeout;
        let mut found = self.partition_count(topic).await?;
        while created
            && found < wanted_partitions(settings, partitions)
            && tokio::time::Instant::now() < give_up
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            found = self.partition_count(topic).await?;
        }
        if found == 0 && created {
            return Err(KafkaError::Topic {
                topic: topic.to_owned(),
                reason: format!(
                    "it was created, but the broker did not list it within {:?}",
                    settings.connection_timeout
                ),
            });
        }
        if found == 0 {
            return Err(KafkaError::Topic {
                topic: topic.to_owned(),
                reason: "it does not exist and `auto-create-topics` is false; create it, or set `auto-create-topics = true`".to_owned(),
            });
        }
        if found < partitions as usize {
            return Err(KafkaError::Topic {
                topic: topic.to_owned(),
                reason: format!("it has {found} partitions, but the binding is partitioned {partitions} ways (`partition-count` or `instance-count`); add partitions to the topic, or lower the setting"),
            });
        }
        Ok(())
    }

    /// How many partitions `topic` has; 0 when it does not exist.
    async fn partition_count(&self, topic: &str) -> Result<usize, KafkaError> {
        let producer = self.inner.producer.clone();
        let name = topic.to_owned();
        let timeout = self.inner.settings.connection_timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|e| KafkaError::Client(e.to_string()))?
        .map_err(|e| KafkaError::Client(e.to_string()))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    }
}

/// How many partitions a topic created for a binding partitioned `partitions` ways gets.
fn wanted_partitions(settings: &KafkaSettings, partitions: u32) -> usize {
    let least = usize::try_from(settings.min_partition_count.max(1)).unwrap_or(1);
    least.max(partitions as usize)
}

/// Refuses configuration that would silently weaken at-least-once delivery.
fn check_delivery_guarantees(settings: &KafkaSettings) -> Result<(), KafkaError> {
    // Checked again here for settings made in code rather than read from a file.
    match settings
        .configuration
        .iter()
        .find_map(|(key, value)| refused_setting(key, value))
    {
        Some(reason) => Err(KafkaError::Config(reason)),
        None => Ok(()),
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
    /// The high watermarks of the group's partitions less its committed offsets (a partition
    /// with no commit counts from its low watermark), from a client per group that does not
    /// join it. One measurement per group at a time, all of it within 1.5 s; `None` when it
    /// does not finish in time, or another is under way.
    async fn lag(&self, spec: &ConsumerSpec) -> Option<u64> {
        let group = spec.group.clone()?;
        let client = self.take_lag_client(&group)?;
        let topic = spec.destination.clone();
        let properties = &spec.properties;
        let (instances, index) = match properties.partitioned {
            true => (properties.instance_count.max(1), properties.instance_index),
            false => (1, 0),
        };
        let inner = self.inner.clone();
        // The measurement hands the client back itself, so a caller that stops waiting
        // leaves none behind.
        let measured = tokio::task::spawn_blocking(move || {
            let lag = measure_lag(&client, &topic, instances, index, LAG_ANSWER_WITHIN);
            lock(&inner.lag_clients).insert(group, Some(client));
            lag
        })
        .await;
        measured.ok().flatten()
    }

    /// Up when a broker answers a metadata request within `connection-timeout` (at most 4 s).
    async fn health(&self) -> Health {
        let probe = self.inner.producer.clone();
        let timeout = self
            .inner
            .settings
            .connection_timeout
            .min(HEALTH_ANSWER_WITHIN);
        let brokers = redact_uri(&self.inner.settings.brokers);
        let topic = self.inner.health_topic.get().cloned();
        let answered = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(topic.as_deref(), timeout)
                .map(|_| ())
        })
        .await;
        match answered {
            Ok(Ok(())) => Health::up().with_detail("brokers", brokers),
            Ok(Err(error)) => Health::down(format!(
                "no broker of {brokers} answered a metadata request within {timeout:?}: {}",
                redacted(&self.inner.settings, &error)
            )),
            Err(error) => Health::down(format!("the metadata request failed: {error}")),
        }
    }

    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        let properties = &spec.properties;
        let instances = if properties.partitioned {
            properties.instance_count
        } else {
            1
        };
        self.ensure_topic(&spec.destination, instances)
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
        // An anonymous consumer leaves nothing behind: it never commits.
        let commits = spec.group.is_some();
        config
            .set("group.id", &group)
            .set("enable.auto.commit", if commits { "true" } else { "false" })
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", start.as_str())
            .set("enable.partition.eof", "false");
        if !self
            .inner
            .settings
            .configuration
            .contains_key("partition.assignment.strategy")
        {
            // Members joining or leaving move only the partitions that must move; the others
            // keep their messages in flight.
            config.set("partition.assignment.strategy", "cooperative-sticky");
        }
        let max_poll_interval = Duration::from_millis(
            config
                .get("max.poll.interval.ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(300_000),
        );
        // Summed only until it passes the limit: `max-attempts` may be set very high.
        let mut longest_retry = Duration::ZERO;
        for attempt in 1..properties.max_attempts {
            longest_retry = longest_retry.saturating_add(properties.back_off(attempt));
            if longest_retry > max_poll_interval / 2 {
                break;
            }
        }
        if longest_retry > max_poll_interval / 2 {
            tracing::warn!(
                binding = %spec.binding, ?longest_retry, ?max_poll_interval,
                "one message's retries can wait longer than half of `max.poll.interval.ms`; if they fill the whole window, the partitions are paused meanwhile, and resuming fetches again from the application's position"
            );
        }
        let assigned = Arc::new(Notify::new());
        let assignment_failed = Arc::new(Mutex::new(None));
        let (acks, events) = sync_mpsc::channel();
        let context = PollContext {
            assigned: assigned.clone(),
            assignment_failed: assignment_failed.clone(),
            tracker: Arc::new(Mutex::new(Tracker {
                topic: spec.destination.clone(),
                next_generation: 0,
                partitions: BTreeMap::new(),
                positions: BTreeMap::new(),
                events,
            })),
        };
        let consumer: BaseConsumer<PollContext> = config
            .create_with_context(context)
            .map_err(|e| self.error(client_error(&self.inner.settings, e)))?;
        // A group joins and gets partitions from the group; an anonymous consumer takes every
        // partition itself, at the end of each, so no group join stands between `subscribe`
        // returning and the first message it must see. A partitioned instance takes its own
        // partitions and starts where its group left off, so one key is never handled by two
        // instances, not even while a rebalance would move it.
        let static_assignment = match (&spec.group, properties.partitioned) {
            (Some(_), false) => {
                consumer
                    .subscribe(&[spec.destination.as_str()])
                    .map_err(|e| self.error(KafkaError::Client(e.to_string())))?;
                None
            }
            (group, partitioned) => Some(StaticAssignment {
                start: group.is_none().then_some(start),
                instances: if partitioned { instances.max(1) } else { 1 },
                index: if partitioned {
                    properties.instance_index
                } else {
                    0
                },
            }),
        };

        // A small hand-over: the engine's window bounds what is in flight, not this channel.
        let (deliveries, receiver) = mpsc::channel(HAND_OVER);
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let waiting = assigned.notified();
        let poller = Poller {
            consumer,
            topic: spec.destination.clone(),
            deliveries,
            acks,
            stop: stop.clone(),
            held: held.clone(),
            producer_failed: self.inner.producer_failed.clone(),
            max_poll_interval,
            static_assignment,
            commits,
            timeout: self.inner.settings.connection_timeout,
        };
        let (ended, thread_ended) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("bindery-kafka-{}", spec.destination))
            .spawn(move || {
                // Dropped as the thread ends, whichever way: its end is told by the channel
                // closing.
                let _ended = ended;
                poller.run()
            })
            .map_err(|e| self.error(KafkaError::Client(e.to_string())))?;
        let subscription = KafkaSubscription {
            receiver,
            stop,
            held,
            thread_ended: Some(thread_ended),
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
        if let Some(reason) = lock(&assignment_failed).take() {
            return Err(self.error(KafkaError::Topic {
                topic: spec.destination.clone(),
                reason: format!("the consumer of `{}`: {reason}", spec.binding),
            }));
        }
        Ok(Box::new(subscription))
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error> {
        self.ensure_topic(&spec.destination, spec.properties.partition_count)
            .await
            .map_err(|e| self.error(e))?;
        Ok(Arc::new(KafkaProducer {
            binder: self.clone(),
            topic: spec.destination.as_str().into(),
            waiting_for_room: AtomicUsize::new(0),
            turned_away: AtomicBool::new(false),
        }))
    }

    /// Waits briefly for what is still queued to be delivered.
    async fn close(&self) -> Result<(), Error> {
        let producer = self.inner.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(CLOSE_FLUSH)).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.error(KafkaError::Client(format!(
                "messages were still queued at shutdown: {e}"
            )))),
            Err(e) => Err(self.error(KafkaError::Client(e.to_string()))),
        }
    }
}

struct KafkaProducer {
    binder: KafkaBinder,
    topic: Arc<str>,
    /// `enqueue` calls waiting for room in librdkafka's queue: while any waits, `try_enqueue`
    /// takes nothing, so no message overtakes one handed over before it.
    waiting_for_room: AtomicUsize,
    /// Set when `try_enqueue` turned a message away, until an `enqueue` got a record in: the
    /// caller enqueues that message next, and nothing taken at once meanwhile may overtake it.
    /// (Callers that enqueue concurrently keep their own order only: the core holds a key, and
    /// a binding's one handler slot, until its messages were enqueued.)
    turned_away: AtomicBool,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// `message` as a record of this topic.
    fn record<'a>(&'a self, message: &'a Message) -> FutureRecord<'a, [u8], [u8]> {
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
        if let Some(partition) = message.partition() {
            record = record.partition(i32::try_from(partition).unwrap_or(i32::MAX));
        }
        record
    }

    /// The delivery report, as the confirmation the core awaits.
    fn confirmation(&self, delivery: DeliveryFuture) -> Confirmation {
        let binder = self.binder.clone();
        let topic = self.topic.clone();
        Confirmation::pending(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(binder.send_error(&topic, error)),
                Err(_) => Err(binder.error(KafkaError::Send {
                    topic: topic.to_string(),
                    reason: "the producer was closed before the broker answered".to_owned(),
                })),
            }
        })
    }
}

/// Counts an `enqueue` waiting for room, until it is done or dropped.
struct WaitingForRoom<'a>(&'a AtomicUsize);

impl<'a> WaitingForRoom<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitingForRoom(count)
    }
}

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_queue_full(error: &rdkafka::error::KafkaError) -> bool {
    matches!(
        error,
        rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    )
}

#[async_trait]
impl Producer for KafkaProducer {
    /// Enqueues the record in librdkafka (waiting while its queue is full) and returns the
    /// delivery report as the confirmation: records are sent in the order they are enqueued,
    /// and the idempotent producer keeps that order through its own retries.
    async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error> {
        let mut record = self.record(message);
        let give_up = tokio::time::Instant::now() + QUEUE_TIMEOUT;
        let mut waiting = None;
        loop {
            match self.binder.inner.producer.send_result(record) {
                Ok(delivery) => {
                    self.turned_away.store(false, Ordering::Release);
                    return Ok(self.confirmation(delivery));
                }
                Err((error, returned))
                    if is_queue_full(&error) && tokio::time::Instant::now() < give_up =>
                {
                    waiting.get_or_insert_with(|| WaitingForRoom::new(&self.waiting_for_room));
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(self.binder.send_error(&self.topic, error)),
            }
        }
    }

    /// librdkafka takes a record in the same call when its queue has room: no `enqueue` future
    /// per message.
    fn try_enqueue(&self, message: Message) -> TryEnqueue {
        if self.waiting_for_room.load(Ordering::Acquire) > 0
            || self.turned_away.load(Ordering::Acquire)
        {
            self.turned_away.store(true, Ordering::Release);
            return TryEnqueue::NotNow(message);
        }
        let handed = self
            .binder
            .inner
            .producer
            .send_result(self.record(&message));
        match handed {
            Ok(delivery) => TryEnqueue::Pending(self.confirmation(delivery), message),
            Err((error, _)) if is_queue_full(&error) => {
                self.turned_away.store(true, Ordering::Release);
                TryEnqueue::NotNow(message)
            }
            Err((error, _)) => {
                let error = self.binder.send_error(&self.topic, error);
                TryEnqueue::Failed(message, error)
            }
        }
    }
}

/// Whether librdkafka's error means the same record can never be accepted.
fn is_permanent(error: &rdkafka::error::KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | MessageBatchTooLarge
                | InvalidRecord
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | TransactionalIdAuthorizationFailed
        )
    )
}

/// Offsets of one partition in one assignment: those being handled, and the next after the
/// highest done.
#[derive(Debug)]
struct PartitionOffsets {
    generation: u64,
    in_flight: BTreeSet<i64>,
    next_after_done: i64,
    stored: i64,
}

impl PartitionOffsets {
    fn new(generation: u64) -> Self {
        PartitionOffsets {
            generation,
            in_flight: BTreeSet::new(),
            next_after_done: 0,
            stored: 0,
        }
    }

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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the application said of one message, tagged with the assignment it came from.
struct AckEvent {
    partition: i32,
    offset: i64,
    generation: u64,
    done: bool,
}

/// The offsets of the current assignment and the acknowledgements not yet applied. Every
/// assignment of a partition starts a new generation of it: acknowledgements of messages
/// received before are ignored, so a partition revoked and assigned back never stores an offset
/// past a message its new copy has not handled.
struct Tracker {
    topic: String,
    next_generation: u64,
    partitions: BTreeMap<i32, PartitionOffsets>,
    /// The offset after the last record polled, per partition: where a resume continues.
    positions: BTreeMap<i32, i64>,
    events: sync_mpsc::Receiver<AckEvent>,
}

impl Tracker {
    /// Starts a new generation of `partition`.
    fn assign(&mut self, partition: i32) -> &mut PartitionOffsets {
        self.next_generation += 1;
        let fresh = PartitionOffsets::new(self.next_generation);
        self.partitions.insert(partition, fresh);
        self.partitions.get_mut(&partition).expect("just assigned")
    }

    /// Records a polled record; returns the generation its acknowledgement must carry.
    fn received(&mut self, partition: i32, offset: i64) -> u64 {
        self.positions.insert(partition, offset + 1);
        let p = match self.partitions.contains_key(&partition) {
            true => self.partitions.get_mut(&partition).expect("present"),
            false => self.assign(partition),
        };
        p.received(offset);
        p.generation
    }

    fn is_current(&self, partition: i32, generation: u64) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.generation == generation)
    }

    fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.positions.remove(&partition);
    }

    /// Applies acknowledgements and stores, per partition, the offset below which everything
    /// is done. "Deliver again" leaves the message in flight: nothing is stored past it, and the
    /// partition's next reader gets it again.
    fn settle<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        for event in self.events.try_iter() {
            if !event.done {
                continue;
            }
            if let Some(p) = self.partitions.get_mut(&event.partition) {
                if p.generation == event.generation {
                    p.done(event.offset);
                }
            }
        }
        let mut store: Option<TopicPartitionList> = None;
        for (partition, p) in self.partitions.iter_mut() {
            if let Some(safe) = p.advance_stored() {
                let store = store.get_or_insert_with(TopicPartitionList::new);
                let _ = store.add_partition_offset(&self.topic, *partition, Offset::Offset(safe));
            }
        }
        if let Some(store) = store {
            if let Err(error) = consumer.store_offsets(&store) {
                tracing::debug!(topic = %self.topic, %error, "storing offsets failed (partition revoked?)");
            }
        }
    }
}

struct PollContext {
    assigned: Arc<Notify>,
    /// Why the consumer could not take its partitions itself, for `subscribe` to report.
    assignment_failed: Arc<Mutex<Option<String>>>,
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for PollContext {}

impl ConsumerContext for PollContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {}
            // Nothing was stored since the last commit.
            Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(error) => {
                let topic = lock(&self.tracker).topic.clone();
                tracing::warn!(%topic, %error, partitions = offsets.count(), "committing offsets failed; what was handled since the last commit will be delivered again after a restart");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Store what is done before librdkafka's commit of the revoked partitions; what is
            // still in flight there is delivered again to the partition's next owner.
            let mut tracker = lock(&self.tracker);
            tracker.settle(consumer);
            for element in partitions.elements() {
                tracker.revoke(element.partition());
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            let mut tracker = lock(&self.tracker);
            for element in partitions.elements() {
                tracker.assign(element.partition());
            }
            drop(tracker);
            self.assigned.notify_one();
        }
    }
}

/// Owns the consumer on its own thread. It polls only when the hand-over to the application
/// has room, so a backlog waits in the broker (and librdkafka's prefetch), not in this thread:
/// no pause and no seek in the steady state. Should the application stay full for longer than
/// half of `max.poll.interval.ms` (every message waiting in back-off, say), the partitions are
/// paused and polling goes on to keep the group membership; records that arrive meanwhile are
/// kept, and resuming continues after the last record polled.
struct Poller {
    consumer: BaseConsumer<PollContext>,
    topic: String,
    deliveries: mpsc::Sender<Delivery>,
    acks: sync_mpsc::Sender<AckEvent>,
    stop: Arc<AtomicBool>,
    /// The binding is paused: the partitions are paused at once, and polling goes on.
    held: Arc<AtomicBool>,
    /// The binder's producer failed for good: stop too.
    producer_failed: Arc<AtomicBool>,
    max_poll_interval: Duration,
    /// The partitions a consumer takes itself (anonymous, or a partitioned instance); `None`
    /// for a group member that the group gives partitions to.
    static_assignment: Option<StaticAssignment>,
    /// Whether offsets are committed (a group's, not an anonymous consumer's).
    commits: bool,
    /// How long looking up partitions and offsets may take.
    timeout: Duration,
}

/// Partitions a consumer takes without the group handing them out.
#[derive(Clone, Copy, Debug)]
struct StaticAssignment {
    /// Where each partition starts, resolved at once; `None` for where the group left off
    /// (else `auto.offset.reset`).
    start: Option<StartOffset>,
    /// Partition `p` is taken when `p % instances == index`.
    instances: u32,
    index: u32,
}

/// A record polled and not yet handed over, with the assignment it came from.
struct Polled {
    partition: i32,
    generation: u64,
    delivery: Delivery,
}

impl Poller {
    /// Assigns the topic's partitions that `assignment` takes. Those resolved now (an
    /// anonymous consumer's, at the end or start of each) receive whatever is sent after this
    /// returns.
    /// How many partitions it took.
    fn assign_static(&self, assignment: StaticAssignment) -> rdkafka::error::KafkaResult<usize> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), self.timeout)?;
        let mut partitions = TopicPartitionList::new();
        for topic in metadata.topics() {
            for partition in topic.partitions() {
                let id = partition.id();
                if u32::try_from(id).map_or(true, |p| p % assignment.instances != assignment.index)
                {
                    continue;
                }
                let offset = match assignment.start {
                    None => Offset::Stored,
                    Some(start) => {
                        let (low, high) =
                            self.consumer
                                .fetch_watermarks(&self.topic, id, self.timeout)?;
                        Offset::Offset(match start {
                            StartOffset::Earliest => low,
                            StartOffset::Latest => high,
                        })
                    }
                };
                partitions.add_partition_offset(&self.topic, id, offset)?;
            }
        }
        self.consumer.assign(&partitions)?;
        Ok(partitions.count())
    }

    fn run(self) {
        if let Some(assignment) = self.static_assignment {
            let context = self.consumer.context();
            match self.assign_static(assignment) {
                Ok(0) => {
                    *lock(&context.assignment_failed) = Some(format!(
                        "no partition `p` of the topic has `p % {} == {}`: the topic has fewer partitions than `instance-count`",
                        assignment.instances, assignment.index
                    ))
                }
                Ok(_) => {}
                Err(error) => {
                    *lock(&context.assignment_failed) =
                        Some(format!("assigning its partitions failed: {error}"))
                }
            }
            context.assigned.notify_one();
            if lock(&context.assignment_failed).is_some() {
                return;
            }
        }
        // Records polled but not handed over yet: at most one in the steady state, more only
        // while paused.
        let mut pending: VecDeque<Polled> = VecDeque::new();
        let mut full_since: Option<std::time::Instant> = None;
        let mut paused = false;
        let mut settled_at = std::time::Instant::now();
        while !self.stop.load(Ordering::Acquire) && !self.producer_failed.load(Ordering::Acquire) {
            // Stored offsets are read only by commits: librdkafka's, every
            // `auto.commit.interval.ms` (which commits what is stored by then), and those at a
            // revocation and at the end (which settle first). Storing them once per record
            // would cost a client call per record; a crash brings back at most 10 ms more.
            if settled_at.elapsed() >= SETTLE_EVERY {
                self.settle();
                settled_at = std::time::Instant::now();
            }
            if self.held.load(Ordering::Acquire) {
                if !paused {
                    tracing::info!(topic = %self.topic, "the binding is paused: pausing the partitions, keeping the group membership");
                    paused = true;
                }
                // As when full for long: paused again each time for partitions assigned
                // meanwhile, and polled so rebalances are served; what comes is kept.
                self.pause();
                if let Some(record) = self.poll() {
                    pending.push_back(record);
                }
                continue;
            }
            if let Some(polled) = pending.pop_front() {
                let current = lock(&self.consumer.context().tracker)
                    .is_current(polled.partition, polled.generation);
                if !current {
                    // Its partition was revoked since: its next owner delivers it.
                    continue;
                }
                match self.deliveries.try_send(polled.delivery) {
                    Ok(()) => {
                        full_since = None;
                        continue;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                    Err(mpsc::error::TrySendError::Full(delivery)) => {
                        pending.push_front(Polled { delivery, ..polled });
                        let since = *full_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > self.max_poll_interval / 2 {
                            if !paused {
                                tracing::warn!(topic = %self.topic, "the application has been full for a long time; pausing the partitions to keep the group membership");
                                paused = true;
                            }
                            // Paused again each time, so partitions assigned meanwhile pause too;
                            // polling serves rebalances and keeps the membership.
                            self.pause();
                            if let Some(record) = self.poll() {
                                pending.push_back(record);
                            }
                        } else {
                            std::thread::sleep(FULL_WAIT);
                        }
                        continue;
                    }
                }
            }
            if paused {
                self.resume();
                paused = false;
            }
            if let Some(record) = self.poll() {
                pending.push_back(record);
            }
        }
        self.finish();
    }

    /// Polls once; a record becomes a delivery whose acknowledgement carries its generation.
    fn poll(&self) -> Option<Polled> {
        match self.consumer.poll(POLL_INTERVAL)? {
            Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => {
                // The consumer cannot go on: the subscription ends, and the binding with it.
                tracing::error!(topic = %self.topic, %error, "fatal Kafka consumer error; this subscription stops");
                self.stop.store(true, Ordering::Release);
                None
            }
            Err(error) => {
                tracing::warn!(topic = %self.topic, %error, "Kafka consumer error");
                None
            }
            Ok(record) => {
                let (partition, offset) = (record.partition(), record.offset());
                let generation = lock(&self.consumer.context().tracker).received(partition, offset);
                Some(Polled {
                    partition,
                    generation,
                    delivery: Delivery {
                        message: Arc::new(to_message(&self.topic, &record)),
                        redelivered: false,
                        acknowledgement: Box::new(KafkaAck {
                            events: Some(self.acks.clone()),
                            partition,
                            offset,
                            generation,
                        }),
                    },
                })
            }
        }
    }

    fn settle(&self) {
        lock(&self.consumer.context().tracker).settle(&self.consumer);
    }

    fn pause(&self) {
        if let Err(error) = self
            .consumer
            .assignment()
            .and_then(|assignment| self.consumer.pause(&assignment))
        {
            tracing::warn!(topic = %self.topic, %error, "pausing the partitions failed");
        }
    }

    /// Resumes every partition right after the last record polled from it: what librdkafka
    /// had fetched meanwhile is fetched again, never skipped.
    fn resume(&self) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if let Err(error) = self.consumer.resume(&assignment) {
            tracing::warn!(topic = %self.topic, %error, "resuming the partitions failed");
        }
        let positions = lock(&self.consumer.context().tracker).positions.clone();
        for (partition, offset) in positions {
            if let Err(error) = self.consumer.seek(
                &self.topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                tracing::warn!(topic = %self.topic, partition, %error, "continuing a partition after the pause failed");
            }
        }
    }

    fn finish(self) {
        self.settle();
        // An anonymous consumer leaves nothing behind.
        if !self.commits {
            return;
        }
        match self
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        {
            Ok(()) => {}
            Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
            Err(error) => {
                tracing::warn!(topic = %self.topic, %error, "the final commit failed; what was handled since the last commit will be delivered again")
            }
        }
    }
}

/// Calls `f` with the name and value of each of `record`'s headers. rdkafka panics on a header
/// name that is not UTF-8, which any producer can send and the broker does not check: such a
/// header is left out, with a warning, and the record delivered; unread, it would end the
/// subscription at that record on every start.
fn each_header(record: &rdkafka::message::BorrowedMessage<'_>, mut f: impl FnMut(&str, &[u8])) {
    let Some(headers) = record.headers() else {
        return;
    };
    for index in 0..headers.count() {
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| headers.try_get(index)));
        match read {
            Ok(Some(header)) => f(header.key, header.value.unwrap_or_default()),
            Ok(None) => {}
            Err(_) => tracing::warn!(
                topic = record.topic(),
                partition = record.partition(),
                offset = record.offset(),
                "a header whose name is not UTF-8 was left out of the record"
            ),
        }
    }
}

/// The message of a record of `topic` (the subscription's one topic, known without asking the
/// record for it).
fn to_message(topic: &str, record: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    let mut headers = Headers::new();
    each_header(record, |name, value| {
        headers.insert_borrowed(name, Bytes::copy_from_slice(value))
    });
    // Named by its place in the log, the same on every delivery, where it has no id bindery
    // keeps: so its outputs' ids, derived from it, are the same on every delivery too.
    if headers.message_id().is_none() {
        // Made where it is kept, in one allocation: this runs for every record received.
        let mut partition = itoa::Buffer::new();
        let mut offset = itoa::Buffer::new();
        let (partition, offset) = (
            partition.format(record.partition()),
            offset.format(record.offset()),
        );
        let mut id = String::with_capacity(topic.len() + partition.len() + offset.len() + 2);
        id.push_str(topic);
        id.push('-');
        id.push_str(partition);
        id.push('@');
        id.push_str(offset);
        headers.set_static(header::MESSAGE_ID, Bytes::from(id));
    }
    let payload = Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let key = record.key().map(Bytes::copy_from_slice);
    Message::from_parts(payload, headers, key)
}

struct KafkaSubscription {
    receiver: mpsc::Receiver<Delivery>,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    /// Closes when the polling thread has ended (its final commit made, its client closed).
    /// Waited for without a thread of the runtime's blocking pool: a close given up on (a
    /// shutdown's deadline) leaves nothing the runtime waits for as it drops.
    thread_ended: Option<tokio::sync::oneshot::Receiver<()>>,
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

    /// What the polling thread has handed over already; its end is left for `next` to report.
    fn try_next(&mut self) -> Option<Result<Delivery, Error>> {
        self.receiver.try_recv().ok().map(Ok)
    }

    /// Pauses the partitions at once, keeping the group membership; what the polling thread
    /// had handed over stays in the hand-over, and resuming goes on after it.
    async fn pause(&mut self) {
        self.held.store(true, Ordering::Release);
    }

    async fn resume(&mut self) {
        self.held.store(false, Ordering::Release);
    }

    async fn close(mut self: Box<Self>) -> Result<(), Error> {
        self.stop.store(true, Ordering::Release);
        self.receiver.close();
        if let Some(thread_ended) = self.thread_ended.take() {
            let _ = thread_ended.await;
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
    generation: u64,
}

impl KafkaAck {
    fn tell(&mut self, done: bool) {
        if let Some(events) = self.events.take() {
            let _ = events.send(AckEvent {
                partition: self.partition,
                offset: self.offset,
                generation: self.generation,
                done,
            });
        }
    }
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
        self.tell(true);
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), Error> {
        self.tell(false);
        Ok(())
    }

    fn try_ack(&mut self) -> Option<Result<(), Error>> {
        self.tell(true);
        Some(Ok(()))
    }
}

impl Drop for KafkaAck {
    fn drop(&mut self) {
        self.tell(false);
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionOffsets;

    #[test]
    fn stored_offsets_never_pass_a_message_in_flight() {
        let mut p = PartitionOffsets::new(0);
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
        let mut p = PartitionOffsets::new(0);
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
