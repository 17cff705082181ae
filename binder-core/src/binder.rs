//! The binder SPI: what a broker adapter implements so the core runtime can use it.
//!
//! A binder only translates between its broker and the core's [`Message`] and acknowledgement
//! types. Retries, dead-lettering, conversion and the order of acknowledgements live in the
//! core runtime, once for every binder.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::config::{ConfigNode, ConsumerProperties, Problems, ProducerProperties};
use crate::{Error, Message};

/// What a consumer binding asks of its binder.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// The binding's name, such as `bill-in-0`.
    pub binding: String,
    /// The destination (topic, exchange) to consume from.
    pub destination: String,
    /// The consumer group; `None` for an anonymous consumer that sees every message while it runs.
    pub group: Option<String>,
    /// Failure and parallelism settings.
    pub properties: ConsumerProperties,
    /// The binder-specific section `[stream.<type>.bindings.<binding>.consumer]`, already validated.
    pub extension: Option<ConfigNode>,
}

impl ConsumerSpec {
    /// A consumer of `destination` in `group` with default properties.
    ///
    /// ```
    /// let spec = bindery_core::ConsumerSpec::new("orders", Some("billing"));
    /// assert_eq!(spec.dlq_destination(), "orders.billing.dlq");
    /// ```
    pub fn new(destination: impl Into<String>, group: Option<&str>) -> Self {
        let destination = destination.into();
        ConsumerSpec {
            binding: destination.clone(),
            destination,
            group: group.map(str::to_owned),
            properties: ConsumerProperties::default(),
            extension: None,
        }
    }

    /// The dead-letter destination: `dlq-name`, else `<destination>.<group>.dlq`.
    pub fn dlq_destination(&self) -> String {
        match (&self.properties.dlq_name, &self.group) {
            (Some(name), _) => name.clone(),
            (None, Some(group)) => format!("{}.{group}.dlq", self.destination),
            (None, None) => format!("{}.anonymous.dlq", self.destination),
        }
    }
}

/// What an output binding (or a `StreamBridge` send) asks of its binder.
#[derive(Clone, Debug)]
pub struct ProducerSpec {
    /// The binding's name, or the destination for a dynamic destination.
    pub binding: String,
    /// The destination (topic, exchange) to send to.
    pub destination: String,
    /// Producer settings.
    pub properties: ProducerProperties,
    /// The binder-specific section `[stream.<type>.bindings.<binding>.producer]`, already validated.
    pub extension: Option<ConfigNode>,
    /// The consumers of this application in the producer's `required-groups`, so a binder can
    /// provision their subscriptions exactly as those consumers will (a RabbitMQ queue with its
    /// dead-letter, quorum, TTL and length arguments), whichever starts first.
    pub required_group_consumers: Vec<ConsumerSpec>,
    /// The consumers in `required-groups` that this application knows but does not bind
    /// (functions it leaves out, which other processes of the deployment bind): a
    /// binder may create a missing subscription as they will declare it, and leaves one that
    /// exists as it is, since their own process's configuration may differ.
    pub required_group_consumers_elsewhere: Vec<ConsumerSpec>,
}

impl ProducerSpec {
    /// A producer for `destination` with default properties.
    pub fn new(destination: impl Into<String>) -> Self {
        let destination = destination.into();
        ProducerSpec {
            binding: destination.clone(),
            destination,
            properties: ProducerProperties::default(),
            extension: None,
            required_group_consumers: Vec::new(),
            required_group_consumers_elsewhere: Vec::new(),
        }
    }
}

/// A broker adapter: subscribes consumers and creates producers.
///
/// Implement it on one public type per broker; see the in-memory binder for a complete example.
#[async_trait]
pub trait Binder: Send + Sync + fmt::Debug + 'static {
    /// Starts consuming. When this returns, messages sent to the destination afterwards reach
    /// the subscription (for a group, messages sent earlier may too).
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error>;

    /// A producer for a destination, provisioning the destination when the binder does that.
    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error>;

    /// The producer that dead-letters messages of a consumer binding. The default sends to the
    /// destination [`ConsumerSpec::dlq_destination`]; a broker with its own dead-letter routing
    /// (RabbitMQ's DLX) overrides it.
    async fn dead_letter_producer(&self, spec: &ConsumerSpec) -> Result<Arc<dyn Producer>, Error> {
        let mut dlq = ProducerSpec::new(spec.dlq_destination());
        dlq.binding = format!("{}.dlq", spec.binding);
        self.producer(&dlq).await
    }

    /// Releases connections. Called once at shutdown, after every subscription was closed.
    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Whether the broker is reachable now, for the application's health. It should answer
    /// within a few seconds (the core gives up after five and reports the binder down); a
    /// binder that recovers lost connections may try one reconnection here. The default is
    /// up: a binder without a connection of its own (the memory binder) is always reachable.
    async fn health(&self) -> Health {
        Health::up()
    }

    /// How many messages wait for the group of `spec`, not yet received by it (consumer lag),
    /// for the application's metrics: on Kafka the partitions' high watermarks less the
    /// group's committed offsets, on RabbitMQ the queue's ready messages. It should answer
    /// within a second or two (the core gives up after two). The default, `None`, is a binder
    /// that cannot tell; so is an anonymous consumer's.
    async fn lag(&self, spec: &ConsumerSpec) -> Option<u64> {
        let _ = spec;
        None
    }
}

/// How long a binder's [`Binder::health`] may take to answer; the core waits a second more,
/// then reports the binder down.
pub const HEALTH_ANSWER_WITHIN: Duration = Duration::from_secs(4);
/// How long a binder's [`Binder::lag`] may take to answer; the core waits half a second more,
/// then reports no figure.
pub const LAG_ANSWER_WITHIN: Duration = Duration::from_millis(1500);
/// How long a subscription's [`Subscription::pause`] or [`Subscription::resume`] may take; the
/// core waits a second more, then goes on.
pub const PAUSE_ANSWER_WITHIN: Duration = Duration::from_secs(4);

/// A binder's health: whether its broker is reachable, with details for the operator.
///
/// ```
/// use bindery_core::binder::Health;
/// let down = Health::down("connection refused by 127.0.0.1:5672");
/// assert!(!down.is_up());
/// assert_eq!(down.details["error"], "connection refused by 127.0.0.1:5672");
/// assert!(Health::up().with_detail("brokers", "127.0.0.1:9092").is_up());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    up: bool,
    /// What the binder tells the operator, such as `error` when it is down. Never a secret.
    pub details: std::collections::BTreeMap<String, String>,
}

impl Health {
    /// Reachable.
    pub fn up() -> Self {
        Health {
            up: true,
            details: Default::default(),
        }
    }

    /// Not reachable, and why (the `error` detail); the reason must hold no password.
    pub fn down(reason: impl Into<String>) -> Self {
        Health {
            up: false,
            details: Default::default(),
        }
        .with_detail("error", reason)
    }

    /// Adds a detail.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// Whether the broker is reachable.
    pub fn is_up(&self) -> bool {
        self.up
    }
}

/// A running consumer.
#[async_trait]
pub trait Subscription: Send + fmt::Debug {
    /// The next message, waiting for one; `None` once the subscription has ended for good.
    async fn next(&mut self) -> Option<Result<Delivery, Error>>;

    /// A message the client already holds, without waiting for one: `None` when none is at
    /// hand now (not the end of the subscription, which [`next`](Self::next) reports).
    ///
    /// The core takes messages this way while the window has room, and waits on `next` only
    /// when nothing is at hand, so a burst costs no future and no wake-up per message. The
    /// default holds nothing: every message comes through `next`.
    fn try_next(&mut self) -> Option<Result<Delivery, Error>> {
        None
    }

    /// Stops consuming. Messages received but never acknowledged are redelivered later.
    async fn close(self: Box<Self>) -> Result<(), Error> {
        Ok(())
    }

    /// Called once when the application begins to shut down: asks the broker to send no more
    /// messages and returns `true` when, from now on, [`next`](Self::next) yields only what
    /// the client has already received and then `None`. The core then handles those messages
    /// to the end before it closes the subscription, so a graceful shutdown hands nothing
    /// back that was already on its way (RabbitMQ would mark it redelivered).
    ///
    /// The default returns `false`: the core stops taking messages at once, and whatever the
    /// client had received comes back through the broker.
    async fn drain(&mut self) -> bool {
        false
    }

    /// The binding was paused: the core takes nothing more until [`resume`](Self::resume).
    /// A binder whose broker goes on pushing messages to an idle consumer (RabbitMQ's
    /// prefetch) stops them here and hands back what it holds that the core did not take, so
    /// the broker keeps them for the group's other consumers. Messages the core took stay
    /// with it, and are settled as usual. It should finish within a few seconds (the core
    /// waits five at most); Kafka's binder pauses its partitions here and polls on, keeping
    /// the group membership. The default does nothing.
    async fn pause(&mut self) {}

    /// The binding runs again after a [`pause`](Self::pause): consume as before. A
    /// subscription that cannot should let its next [`next`](Self::next) recover, as after a
    /// lost connection. The default does nothing.
    async fn resume(&mut self) {}

    /// Whether this subscription needs its messages settled in the order they were received.
    /// When it does, the core never acknowledges a message before every earlier one was
    /// settled, however the handling finished. The default is `false`: Kafka's binder tracks
    /// offsets itself and RabbitMQ acknowledges by delivery tag.
    fn acknowledges_in_order(&self) -> bool {
        false
    }
}

/// Sends messages to one destination.
///
/// The core keeps many messages in flight: it hands each message over with
/// [`Producer::try_enqueue`] or [`Producer::enqueue`] as soon as it was produced, in order,
/// and awaits the returned
/// [`Confirmation`] in the background. A binder only has to make two promises: messages
/// enqueued one after another are sent in that order, and a confirmation resolves to `Ok`
/// only once the broker has taken responsibility for the message.
///
/// A message the core sends to a partitioned destination (`producer.partition-count` above 1)
/// carries its partition, [`Message::partition`], which the producer routes it by, so that it
/// reaches the consumers whose [`ConsumerProperties::partition`](crate::ConsumerProperties::partition)
/// is that partition (and every consumer that is not partitioned).
#[async_trait]
pub trait Producer: Send + Sync + fmt::Debug {
    /// Hands `message` to the broker client and returns, without waiting for the broker, the
    /// confirmation to await. An error here (or from the confirmation) is a failed send: the
    /// core sends the message again later, unless the error [is permanent](Error::is_permanent).
    async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error>;

    /// Hands `message` over as [`enqueue`](Self::enqueue) does, when the client can take it
    /// without waiting (see [`TryEnqueue`] for the answers); [`TryEnqueue::NotNow`], with the
    /// message and nothing sent, when it cannot now, and the core calls `enqueue` for it and
    /// for every message after it in the same batch. A client that takes messages
    /// synchronously (an in-process queue, a local buffer with room) saves the core a future
    /// per message, and one that confirms at once the copy the core would keep to send again.
    /// The default never can.
    ///
    /// The order promise covers both methods: while an `enqueue` on this producer is still
    /// waiting, `try_enqueue` must answer `NotNow`, so no message overtakes one handed over
    /// before it.
    fn try_enqueue(&self, message: Message) -> TryEnqueue {
        TryEnqueue::NotNow(message)
    }

    /// Sends `message`, returning once the broker has confirmed it (or it failed).
    async fn send(&self, message: Message) -> Result<(), Error> {
        self.enqueue(&message).await?.await
    }
}

/// What became of a message offered with [`Producer::try_enqueue`].
#[must_use = "a message taken may still be refused: its confirmation tells"]
#[non_exhaustive]
#[derive(Debug)]
pub enum TryEnqueue {
    /// Taken, and the broker took responsibility for it already: nothing is left to wait for.
    Confirmed,
    /// Taken; the broker's answer is still to come. The message comes back with it, for the
    /// core to send again should the answer be an error.
    Pending(Confirmation, Message),
    /// Not taken now: nothing was sent, and the core enqueues the message with
    /// [`Producer::enqueue`].
    NotNow(Message),
    /// Not taken, for the reason given (a send failure, as an error of `enqueue` is).
    Failed(Message, Error),
}

/// The broker's answer to one enqueued message, still to come: a future of `Ok` once the
/// broker confirmed the message, or of the send's error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use bindery_core::binder::Confirmation;
/// assert!(Confirmation::confirmed().await.is_ok());
/// assert!(Confirmation::pending(async { Ok(()) }).await.is_ok());
/// # }
/// ```
#[must_use = "a confirmation tells whether the broker took the message"]
pub struct Confirmation(Option<BoxFuture<'static, Result<(), Error>>>);

impl Confirmation {
    /// Already confirmed (a broker that takes messages synchronously).
    pub fn confirmed() -> Self {
        Confirmation(None)
    }

    /// Whether the broker confirmed already: awaiting it returns `Ok` at once.
    pub fn is_confirmed(&self) -> bool {
        self.0.is_none()
    }

    /// Confirmed when `future` resolves.
    pub fn pending(future: impl Future<Output = Result<(), Error>> + Send + 'static) -> Self {
        Confirmation(Some(Box::pin(future)))
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            None => "Confirmation(confirmed)",
            Some(_) => "Confirmation(pending)",
        })
    }
}

impl Future for Confirmation {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.as_mut() {
            None => Poll::Ready(Ok(())),
            Some(future) => future.as_mut().poll(cx),
        }
    }
}

/// Settles one received message with its broker.
///
/// The core settles each message once, one of two ways:
/// - [`ack`](Acknowledgement::ack) ("done"), or [`try_ack`](Acknowledgement::try_ack) first
///   where the binder can acknowledge without waiting (and `ack` only if that answers `None`),
///   once the handler succeeded and every message it produced was confirmed, or once the
///   message was dead-lettered and the dead letter was confirmed (or, without a DLQ, logged).
///   Nothing else acknowledges.
/// - [`requeue`](Acknowledgement::requeue) ("deliver again") when the binding stops with the
///   message unfinished (shutdown, or a send that never got through). Retries while running
///   happen inside the core and never reach the binder.
///
/// Acknowledgements may come in any order unless [`Subscription::acknowledges_in_order`] says
/// otherwise; a Kafka binder, for instance, stores an offset only once every earlier message of
/// the partition was acknowledged.
#[async_trait]
pub trait Acknowledgement: Send + fmt::Debug {
    /// The message was handled (or dead-lettered): the broker may forget it.
    async fn ack(self: Box<Self>) -> Result<(), Error>;

    /// The message was not handled: the broker delivers it again later.
    /// Dropping an acknowledgement without settling it must have the same effect.
    async fn requeue(self: Box<Self>) -> Result<(), Error>;

    /// Acknowledges as [`ack`](Self::ack) does, when that needs no waiting (a client that
    /// records acknowledgements in memory), saving the core a future per message:
    /// - `Some(Ok(()))`: the message is acknowledged; dropping the acknowledgement afterwards
    ///   does nothing more.
    /// - `Some(Err(_))`: acknowledging failed, as when `ack` fails; the core logs it, settles
    ///   nothing else for the message and leaves its redelivery to the broker.
    /// - `None`: nothing was done and the acknowledgement is as it was; the core calls `ack`.
    ///
    /// The default waits.
    fn try_ack(&mut self) -> Option<Result<(), Error>> {
        None
    }
}

/// A received message and the means to settle it.
#[derive(Debug)]
pub struct Delivery {
    /// The message as received, shared: a binder that must keep it until it is settled (to
    /// deliver it again) keeps a reference rather than a copy. The core never changes a message
    /// its binder still shares: it copies one it must change, so a binder that keeps nothing
    /// should hand over a message it does not share.
    pub message: Arc<Message>,
    /// Whether the broker says this message was delivered before.
    pub redelivered: bool,
    /// Settles the message.
    pub acknowledgement: Box<dyn Acknowledgement>,
}

/// The settings of one binder: its table `[stream.binders.<name>]`, `type` included.
#[derive(Clone, Debug)]
pub struct BinderSettings {
    /// The binder's name, such as `kafka` or `analytics-cluster`.
    pub name: String,
    /// Its table in the configuration, when it has one.
    pub node: Option<ConfigNode>,
}

/// Where a binder's broker is, as an AsyncAPI server names it.
///
/// ```
/// use bindery_core::binder::BrokerAddress;
/// let rabbit = BrokerAddress::new("amqp", "mq.internal:5672").with_pathname("/orders");
/// assert_eq!(rabbit.host, "mq.internal:5672");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerAddress {
    /// Such as `amqp` or `kafka`.
    pub protocol: String,
    /// `host:port`, without credentials.
    pub host: String,
    /// The part after the host, such as a RabbitMQ virtual host's `/orders`.
    pub pathname: Option<String>,
}

impl BrokerAddress {
    /// A broker at `host` spoken to with `protocol`.
    pub fn new(protocol: impl Into<String>, host: impl Into<String>) -> Self {
        BrokerAddress {
            protocol: protocol.into(),
            host: host.into(),
            pathname: None,
        }
    }

    /// With the part of the address after the host.
    pub fn with_pathname(mut self, pathname: impl Into<String>) -> Self {
        self.pathname = Some(pathname.into());
        self
    }
}

/// Creates binders of one type, and checks the configuration keys that belong to that type.
pub trait BinderProvider: Send + Sync + fmt::Debug + 'static {
    /// The type name used in `type = "..."` and in `[stream.<type>.bindings...]`.
    fn binder_type(&self) -> &'static str;

    /// Checks `[stream.binders.<name>]` (which holds `type` too), reporting every wrong key.
    fn validate(&self, settings: &BinderSettings, problems: &mut Problems);

    /// Checks `[stream.<type>.bindings.<binding>.consumer]`. The default allows no keys.
    fn validate_consumer(&self, node: &ConfigNode, problems: &mut Problems) {
        node.table(&[], problems);
    }

    /// Checks `[stream.<type>.bindings.<binding>.producer]`. The default allows no keys.
    fn validate_producer(&self, node: &ConfigNode, problems: &mut Problems) {
        node.table(&[], problems);
    }

    /// Whether a partitioned destination of this type needs `producer.partition-count` equal to
    /// its consumers' `instance-count`, one partition per instance (as memory and RabbitMQ
    /// queues are). The default is `true`; Kafka spreads a topic's partitions over the
    /// instances, and any producer keyed as Kafka's are feeds them, so it answers `false`.
    fn partitions_match_instances(&self) -> bool {
        true
    }

    /// Where the broker of a binder with `settings` is, for the application's AsyncAPI
    /// document: protocol and host, never credentials. The default, `None`, is an embedded
    /// broker, which the document lists as no server.
    fn address(&self, settings: &BinderSettings) -> Option<BrokerAddress> {
        let _ = settings;
        None
    }

    /// Connects a binder. It must fail within a bounded time when the broker is unreachable.
    fn create(
        &self,
        settings: BinderSettings,
    ) -> BoxFuture<'static, Result<Arc<dyn Binder>, Error>>;
}
