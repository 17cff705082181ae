use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bindery_core::binder::{HEALTH_ANSWER_WITHIN, LAG_ANSWER_WITHIN, PAUSE_ANSWER_WITHIN};
use bindery_core::config::Problems;
use bindery_core::redact::{redact_uri, redact_whole_uri};
use bindery_core::{
    header, Acknowledgement, Binder, Confirmation, ConsumerSpec, Delivery, Error, Health, Message,
    Producer, ProducerSpec, Subscription,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::confirms::{Confirms, Outcome};
use crate::mapping;
use crate::settings::{
    RabbitConsumerSettings, RabbitProducerSettings, RabbitSettings, RequiredGroupQueue,
};
use crate::{RabbitError, DEAD_LETTER_EXCHANGE};

/// The RabbitMQ binder: a connection for consumers and one for producers, a channel per
/// consumer and per producer.
///
/// Publishing has a connection of its own because a broker under a memory or disk alarm blocks
/// every connection that publishes: consumers keep acknowledging on theirs, and sends wait
/// (and are retried) until the alarm clears.
///
/// A lost connection is recovered: subscriptions reconnect with back-off, declare their
/// topology again and resume; producers open a new channel on their next send. Messages that
/// were not acknowledged are redelivered by the broker. A refusal that reconnecting cannot
/// cure (access refused, a queue that exists with other arguments, or is missing while
/// `provision = false`) ends the subscription with the broker's reason.
#[derive(Clone)]
pub struct RabbitBinder {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    settings: RabbitSettings,
    consuming: Mutex<Option<Connection>>,
    publishing: Mutex<Option<Connection>>,
    /// Why the broker blocks the publishing connection, while it does.
    publishing_blocked: Blocked,
    closed: AtomicBool,
}

impl Inner {
    fn connections(&self, role: Role) -> &Mutex<Option<Connection>> {
        match role {
            Role::Consume => &self.consuming,
            Role::Publish => &self.publishing,
        }
    }
}

/// Which of the binder's connections a channel is opened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Consume,
    Publish,
}

/// Why the broker blocks a publishing connection (`connection.blocked`), while it does.
#[derive(Clone, Debug, Default)]
struct Blocked(Arc<std::sync::Mutex<Option<String>>>);

impl Blocked {
    /// Follows a new connection's `connection.blocked` and `connection.unblocked` notices.
    fn follow(&self, connection: &Connection, binder: String) {
        self.set(None);
        let state = self.clone();
        let mut events = connection.events_listener();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    lapin::Event::ConnectionBlocked(reason) => {
                        tracing::warn!(%binder, %reason, "RabbitMQ blocked the publishing connection (a memory or disk alarm); sends wait and are retried until it is unblocked, consumers go on");
                        state.set(Some(reason));
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(%binder, "RabbitMQ unblocked the publishing connection");
                        state.set(None);
                    }
                    _ => {}
                }
            }
        });
    }

    fn set(&self, reason: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// The broker's reason, while the connection is blocked.
    fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl fmt::Debug for RabbitBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBinder")
            .field("name", &self.inner.name)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// What a subscription declares and consumes, again after a reconnection.
#[derive(Clone, Debug)]
struct Topology {
    exchange: String,
    exchange_type: String,
    queue: String,
    anonymous: bool,
    dead_letter_queue: Option<String>,
    consumer: RabbitConsumerSettings,
    /// Consume this queue as it is, declaring nothing else (a dead-letter queue).
    only_queue: bool,
}

/// How long a publish may wait to be written, and then for its confirm, before it is a failed
/// send (which the core sends again).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a connection closing at shutdown is checked for having failed instead.
const FAILED_CLOSE_CHECK: Duration = Duration::from_millis(20);

/// The routing key of partition `partition` of `destination`, as Spring Cloud Stream names it.
fn partition_routing_key(destination: &str, partition: u32) -> String {
    format!("{destination}-{partition}")
}

/// Why a partitioned binding cannot work with these settings: partitions are routed by key,
/// which fanout and headers exchanges ignore, and by the partition's own key.
fn partitioning_problem(
    exchange_type: &str,
    key: Option<&str>,
    key_setting: &str,
) -> Option<String> {
    if exchange_type == "fanout" || exchange_type == "headers" {
        return Some(format!("a `{exchange_type}` exchange ignores routing keys, so every partition's queue would get every message; use `exchange-type = \"topic\"` for a partitioned destination"));
    }
    key.map(|key| format!("partitions are routed by the key `<destination>-<partition>`, so `{key_setting} = \"{key}\"` would be ignored; remove it"))
}

/// Exchange and queue names are AMQP short strings: longer ones are refused, never a panic.
fn check_name(name: &str) -> Result<(), RabbitError> {
    if name.len() > mapping::SHORT_STRING_MAX {
        return Err(RabbitError::Declare {
            entity: format!("`{}...`", name.chars().take(40).collect::<String>()),
            reason: format!(
                "the name is {} bytes long; RabbitMQ allows at most {}: choose a shorter destination, group or `dlq-name`",
                name.len(),
                mapping::SHORT_STRING_MAX
            ),
            permanent: true,
        });
    }
    Ok(())
}

/// The names a topology declares and binds with, each checked as [`check_name`] does.
fn check_names(topology: &Topology) -> Result<(), RabbitError> {
    [
        &topology.exchange,
        &topology.queue,
        &topology.consumer.binding_routing_key,
    ]
    .into_iter()
    .chain(topology.dead_letter_queue.as_ref())
    .try_for_each(|name| check_name(name))
}

fn kind(exchange_type: &str) -> ExchangeKind {
    match exchange_type {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Whether the broker's answer is one that asking again cannot change:
/// - access refused (but not a queue in exclusive use by another consumer, which ends);
/// - an entity that exists with other arguments;
/// - a missing entity when the binder declares nothing (`provision = false`), except a queue
///   whose node is down, which comes back;
/// - at connection, a virtual host that does not exist or may not be used.
fn refused_for_good(error: &lapin::Error, provision: bool) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return false;
    };
    let text = amqp.get_message().as_str();
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => !text.contains("exclusive"),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => true,
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => {
            !provision && !text.contains("down or inaccessible")
        }
        // A connection limit that is reached frees up as connections close; the rest (a virtual
        // host that is missing or not permitted) needs the configuration changed.
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => !text.contains("connection limit"),
        _ => false,
    }
}

impl RabbitBinder {
    /// Connects to the broker, failing within `connection-timeout` when it cannot.
    pub async fn connect(name: &str, settings: RabbitSettings) -> Result<Self, Error> {
        let binder = RabbitBinder {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                settings,
                consuming: Mutex::new(None),
                publishing: Mutex::new(None),
                publishing_blocked: Blocked::default(),
                closed: AtomicBool::new(false),
            }),
        };
        binder
            .channel(Role::Consume)
            .await
            .map_err(|e| binder.error(e))?;
        Ok(binder)
    }

    /// Connects to `uri` with default settings for everything else.
    pub async fn connect_uri(uri: &str) -> Result<Self, Error> {
        let mut problems = Problems::default();
        let mut settings = RabbitSettings::read(None, &mut problems);
        settings.uri = uri.to_owned();
        Self::connect("rabbit", settings).await
    }

    /// How a failed declaration of `entity` is reported.
    fn declare_error(&self, entity: String) -> impl FnOnce(lapin::Error) -> RabbitError {
        let provision = self.inner.settings.provision;
        move |e| RabbitError::Declare {
            entity,
            reason: e.to_string(),
            permanent: refused_for_good(&e, provision),
        }
    }

    fn error(&self, error: RabbitError) -> Error {
        Error::binder(self.inner.name.clone(), error)
    }

    fn shown_uri(&self) -> String {
        redact_whole_uri(&self.inner.settings.uri)
    }

    async fn open(&self, role: Role) -> Result<Connection, RabbitError> {
        let name = match role {
            Role::Consume => format!("bindery {}", self.inner.name),
            Role::Publish => format!("bindery {} publisher", self.inner.name),
        };
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name));
        let timeout = self.inner.settings.connection_timeout;
        match tokio::time::timeout(
            timeout,
            Connection::connect(&self.inner.settings.uri, properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(RabbitError::Connect {
                uri: self.shown_uri(),
                reason: redact_uri(&e.to_string()),
                permanent: refused_for_good(&e, self.inner.settings.provision),
            }),
            Err(_) => Err(RabbitError::ConnectTimeout {
                uri: self.shown_uri(),
                timeout,
            }),
        }
    }

    /// A new channel on the connection for `role`, reconnecting when it was lost; an error
    /// when the broker does not answer within twice `connection-timeout`, or blocks publishing.
    async fn channel(&self, role: Role) -> Result<Channel, RabbitError> {
        let limit = self.inner.settings.connection_timeout * 2;
        tokio::time::timeout(limit, self.open_channel(role))
            .await
            .map_err(|_| {
                RabbitError::Channel(format!("RabbitMQ did not open a channel within {limit:?}"))
            })?
    }

    async fn open_channel(&self, role: Role) -> Result<Channel, RabbitError> {
        let mut cached = self.inner.connections(role).lock().await;
        if let Some(open) = cached.as_ref() {
            if open.status().connected() {
                // A blocked connection reads no frames, `channel.open` included.
                if let (Role::Publish, Some(reason)) =
                    (role, self.inner.publishing_blocked.reason())
                {
                    return Err(RabbitError::Blocked { reason });
                }
                if let Ok(channel) = open.create_channel().await {
                    return Ok(channel);
                }
            }
        }
        let reconnecting = cached.is_some();
        let open = self.open(role).await?;
        let channel = open
            .create_channel()
            .await
            .map_err(|e| RabbitError::Channel(e.to_string()))?;
        if reconnecting {
            tracing::info!(binder = %self.inner.name, ?role, "connected to RabbitMQ again");
        }
        if role == Role::Publish {
            self.inner
                .publishing_blocked
                .follow(&open, self.inner.name.clone());
        }
        *cached = Some(open);
        Ok(channel)
    }

    /// Declares what `topology` needs (when provisioning) and starts consuming its queue; an
    /// error when a name is too long for AMQP or the broker does not answer in time.
    async fn consume(
        &self,
        topology: &Topology,
    ) -> Result<(Channel, lapin::Consumer), RabbitError> {
        check_names(topology)?;
        let limit = self.inner.settings.connection_timeout * 3;
        tokio::time::timeout(limit, self.declare_and_consume(topology))
            .await
            .map_err(|_| RabbitError::Declare {
                entity: format!("queue `{}`", topology.queue),
                reason: format!("RabbitMQ did not answer within {limit:?}"),
                permanent: false,
            })?
    }

    async fn declare_and_consume(
        &self,
        topology: &Topology,
    ) -> Result<(Channel, lapin::Consumer), RabbitError> {
        let channel = self.channel(Role::Consume).await?;
        if self.inner.settings.provision && !topology.only_queue {
            self.declare(&channel, topology).await?;
        }
        if topology.only_queue && self.inner.settings.provision {
            self.declare_dead_letter_queue(
                &channel,
                &topology.queue,
                &topology.exchange,
                topology.consumer.quorum,
            )
            .await?;
        }
        channel
            .basic_qos(topology.consumer.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| RabbitError::Channel(e.to_string()))?;
        let consumer = self.start_consumer(&channel, topology).await?;
        Ok((channel, consumer))
    }

    /// A new consumer of the topology's queue on `channel`.
    async fn start_consumer(
        &self,
        channel: &Channel,
        topology: &Topology,
    ) -> Result<lapin::Consumer, RabbitError> {
        let tag = format!("bindery-{}", uuid::Uuid::new_v4().simple());
        channel
            .basic_consume(
                ShortString::from(topology.queue.as_str()),
                ShortString::from(tag),
                BasicConsumeOptions {
                    exclusive: false,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!("a consumer on queue `{}`", topology.queue)))
    }

    async fn declare(&self, channel: &Channel, topology: &Topology) -> Result<(), RabbitError> {
        channel
            .exchange_declare(
                ShortString::from(topology.exchange.as_str()),
                kind(&topology.exchange_type),
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!("exchange `{}`", topology.exchange)))?;
        let mut arguments = FieldTable::default();
        if let Some(dlq) = &topology.dead_letter_queue {
            self.declare_dead_letter_queue(channel, dlq, &topology.queue, topology.consumer.quorum)
                .await?;
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(topology.queue.as_str().into()),
            );
        }
        let consumer = &topology.consumer;
        if consumer.quorum && !topology.anonymous {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(ttl) = consumer.ttl {
            let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
            arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis));
        }
        if let Some(max) = consumer.max_length {
            arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        }
        let options = if topology.anonymous {
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            }
        } else {
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            }
        };
        channel
            .queue_declare(
                ShortString::from(topology.queue.as_str()),
                options,
                arguments,
            )
            .await
            .map_err(self.declare_error(format!("queue `{}`", topology.queue)))?;
        channel
            .queue_bind(
                ShortString::from(topology.queue.as_str()),
                ShortString::from(topology.exchange.as_str()),
                ShortString::from(consumer.binding_routing_key.as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!(
                "the binding of queue `{}` to exchange `{}`",
                topology.queue, topology.exchange
            )))?;
        Ok(())
    }

    /// The DLX exchange and a dead-letter queue bound to it with the group queue's name.
    async fn declare_dead_letter_queue(
        &self,
        channel: &Channel,
        dlq: &str,
        group_queue: &str,
        quorum: bool,
    ) -> Result<(), RabbitError> {
        channel
            .exchange_declare(
                DEAD_LETTER_EXCHANGE.into(),
                ExchangeKind::Direct,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!("exchange `{DEAD_LETTER_EXCHANGE}`")))?;
        let mut arguments = FieldTable::default();
        if quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        channel
            .queue_declare(
                ShortString::from(dlq),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(self.declare_error(format!("queue `{dlq}`")))?;
        channel
            .queue_bind(
                ShortString::from(dlq),
                DEAD_LETTER_EXCHANGE.into(),
                ShortString::from(group_queue),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!(
                "the binding of queue `{dlq}` to exchange `{DEAD_LETTER_EXCHANGE}`"
            )))?;
        // The dead-letter destination is also a destination like any other: an exchange of
        // its name, which bindery dead-letters to, so a binding on it reads dead letters as it
        // would on Kafka or the memory binder.
        channel
            .exchange_declare(
                ShortString::from(dlq),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
            .map_err(self.declare_error(format!("exchange `{dlq}`")))?;
        channel
            .queue_bind(
                ShortString::from(dlq),
                ShortString::from(dlq),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(
                self.declare_error(format!("the binding of queue `{dlq}` to exchange `{dlq}`")),
            )?;
        Ok(())
    }

    fn topology(&self, spec: &ConsumerSpec) -> Topology {
        let mut problems = Problems::default();
        let mut consumer = RabbitConsumerSettings::read(spec.extension.as_ref(), &mut problems);
        let partition = spec.properties.partition();
        let (queue, anonymous) = match (&spec.group, partition) {
            (Some(group), None) => (format!("{}.{group}", spec.destination), false),
            (Some(group), Some(partition)) => {
                (format!("{}.{group}-{partition}", spec.destination), false)
            }
            (None, _) => (
                format!(
                    "{}.anonymous.{}",
                    spec.destination,
                    uuid::Uuid::new_v4().simple()
                ),
                true,
            ),
        };
        if let Some(partition) = partition {
            // The partition's routing key, as a partitioned producer sends it.
            consumer.binding_routing_key = partition_routing_key(&spec.destination, partition);
        }
        Topology {
            exchange: spec.destination.clone(),
            exchange_type: consumer.exchange_type.clone(),
            dead_letter_queue: (spec.properties.dlq && !anonymous).then(|| spec.dlq_destination()),
            queue,
            anonymous,
            consumer,
            only_queue: false,
        }
    }

    /// Declares the queue of a required group the way its consumer will: with the consumer's
    /// own arguments when it is bound in this application. Otherwise only when the queue does
    /// not exist yet, so one declared elsewhere with other arguments is left as it is: then
    /// with the arguments of the consumer as this application knows it (a registered function
    /// another process binds), else with the producer's queue settings.
    async fn provision_required_group(
        &self,
        spec: &ProducerSpec,
        group: &str,
        partition: Option<u32>,
        queue: &RequiredGroupQueue,
    ) -> Result<(), RabbitError> {
        let of_group = |c: &&ConsumerSpec| {
            c.group.as_deref() == Some(group)
                && (partition.is_none() || c.properties.partition() == partition)
        };
        let bound_here = spec.required_group_consumers.iter().find(of_group);
        // Another instance of a partitioned group is declared as the one this application
        // knows, for its own partition.
        let known = bound_here
            .or_else(|| {
                spec.required_group_consumers_elsewhere
                    .iter()
                    .find(of_group)
            })
            .cloned()
            .or_else(|| {
                let instance = spec
                    .required_group_consumers
                    .iter()
                    .chain(&spec.required_group_consumers_elsewhere)
                    .find(|c| c.group.as_deref() == Some(group))?;
                let mut other = instance.clone();
                other.properties.partitioned = partition.is_some();
                other.properties.instance_index = partition.unwrap_or(0);
                other.properties.instance_count = spec.properties.partition_count;
                Some(other)
            });
        let topology = match known {
            Some(consumer) => self.topology(&consumer),
            None => {
                let mut consumer = queue.consumer.clone();
                let queue_name = match partition {
                    Some(partition) => {
                        consumer.binding_routing_key =
                            partition_routing_key(&spec.destination, partition);
                        format!("{}.{group}-{partition}", spec.destination)
                    }
                    None => format!("{}.{group}", spec.destination),
                };
                Topology {
                    exchange: spec.destination.clone(),
                    exchange_type: queue.consumer.exchange_type.clone(),
                    queue: queue_name,
                    anonymous: false,
                    dead_letter_queue: queue
                        .dlq
                        .then(|| format!("{}.{group}.dlq", spec.destination)),
                    consumer,
                    only_queue: false,
                }
            }
        };
        check_names(&topology)?;
        if topology.exchange_type == "direct" && topology.consumer.binding_routing_key == "#" {
            return Err(RabbitError::Declare {
                entity: format!("queue `{}`", topology.queue),
                reason: "a direct exchange routes by exact key, so the default binding key `#` would bind only the key `#`; set `binding-routing-key` in the producer's `[stream.rabbit.bindings.<binding>.producer]` section to the key this group receives".to_owned(),
                permanent: true,
            });
        }
        let limit = self.inner.settings.connection_timeout;
        if bound_here.is_none() {
            // A passive declaration of a missing queue closes its channel: a channel of its own.
            let probe = self.channel(Role::Consume).await?;
            let exists = tokio::time::timeout(
                limit,
                probe.queue_declare(
                    ShortString::from(topology.queue.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            if matches!(exists, Ok(Ok(_))) {
                let _ = tokio::time::timeout(limit, probe.close(200, "exists".into())).await;
                return Ok(());
            }
        }
        let channel = self.channel(Role::Consume).await?;
        tokio::time::timeout(limit * 3, self.declare(&channel, &topology))
            .await
            .map_err(|_| RabbitError::Declare {
                entity: format!("queue `{}`", topology.queue),
                reason: format!("RabbitMQ did not answer within {:?}", limit * 3),
                permanent: false,
            })??;
        let _ = tokio::time::timeout(limit, channel.close(200, "declared".into())).await;
        Ok(())
    }

    /// Consumes the dead-letter queue of a consumer binding (declaring it when provisioning),
    /// to inspect or replay what failed.
    pub async fn dead_letter_subscription(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<Box<dyn Subscription>, Error> {
        let mut topology = self.topology(spec);
        topology.only_queue = true;
        // For a dead-letter queue, `exchange` holds the group queue's name: its DLX routing key.
        topology.exchange = topology.queue.clone();
        topology.queue = spec.dlq_destination();
        self.subscription(topology).await
    }

    async fn subscription(&self, topology: Topology) -> Result<Box<dyn Subscription>, Error> {
        let (channel, consumer) = self.consume(&topology).await.map_err(|e| self.error(e))?;
        Ok(Box::new(RabbitSubscription {
            binder: self.clone(),
            topology,
            channel,
            consumer,
            cancelled: false,
            paused: false,
            ended: false,
        }))
    }

    async fn producer_for(
        &self,
        exchange: String,
        exchange_type: String,
        fixed_routing_key: Option<String>,
        default_routing_key: String,
        declare: bool,
    ) -> Result<Arc<dyn Producer>, Error> {
        check_name(&exchange).map_err(|e| self.error(e))?;
        let producer = RabbitProducer {
            binder: self.clone(),
            exchange,
            exchange_type,
            fixed_routing_key,
            default_routing_key,
            declare: declare && self.inner.settings.provision,
            channel: Mutex::new(None),
        };
        producer.channel().await.map_err(|e| self.error(e))?;
        Ok(Arc::new(producer))
    }
}

#[async_trait]
impl Binder for RabbitBinder {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        if spec.properties.partitioned {
            let mut problems = Problems::default();
            let own = RabbitConsumerSettings::read(spec.extension.as_ref(), &mut problems);
            let key = (own.binding_routing_key != "#").then_some(own.binding_routing_key.as_str());
            let problem = partitioning_problem(&own.exchange_type, key, "binding-routing-key");
            if let Some(reason) = problem {
                return Err(self.error(RabbitError::Declare {
                    entity: format!("the partitioned consumer `{}`", spec.binding),
                    reason,
                    permanent: true,
                }));
            }
        }
        self.subscription(self.topology(spec)).await
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error> {
        let mut problems = Problems::default();
        let settings = RabbitProducerSettings::read(spec.extension.as_ref(), &mut problems);
        let exchange_type = settings
            .exchange_type
            .clone()
            .unwrap_or_else(|| "topic".to_owned());
        if spec.properties.partition_count > 1 {
            let key = settings.routing_key.as_deref();
            let queue_key = &settings.required_group_queue.consumer.binding_routing_key;
            let problem = partitioning_problem(&exchange_type, key, "routing-key").or_else(|| {
                let queue_key = (queue_key != "#").then_some(queue_key.as_str());
                partitioning_problem(&exchange_type, queue_key, "binding-routing-key")
            });
            if let Some(reason) = problem {
                return Err(self.error(RabbitError::Declare {
                    entity: format!("the partitioned producer `{}`", spec.binding),
                    reason,
                    permanent: true,
                }));
            }
            // Each partition's routing key is a short string too: the longest is the last's.
            let last = spec.properties.partition_count - 1;
            check_name(&partition_routing_key(&spec.destination, last))
                .map_err(|e| self.error(e))?;
        }
        let producer = self
            .producer_for(
                spec.destination.clone(),
                exchange_type.clone(),
                settings.routing_key.clone(),
                spec.destination.clone(),
                true,
            )
            .await?;
        if self.inner.settings.provision {
            // Queues of `required-groups` keep what is sent before their consumers start; a
            // partitioned destination has one queue per partition and group.
            let partitions: Vec<Option<u32>> = match spec.properties.partition_count {
                1 => vec![None],
                count => (0..count).map(Some).collect(),
            };
            for group in &spec.properties.required_groups {
                for partition in &partitions {
                    self.provision_required_group(
                        spec,
                        group,
                        *partition,
                        &settings.required_group_queue,
                    )
                    .await
                    .map_err(|e| self.error(e))?;
                }
            }
        }
        Ok(producer)
    }

    /// Dead letters go to the exchange named after the dead-letter destination, which routes
    /// them to the DLQ (declared with the group queue, bound to `DLX` too for broker-side
    /// dead-lettering) and to any group bound to that destination.
    ///
    /// Without provisioning the binder declares nothing, so it uses what a Spring-provisioned
    /// topology has: the `DLX` exchange, with the group queue's name as the routing key.
    async fn dead_letter_producer(&self, spec: &ConsumerSpec) -> Result<Arc<dyn Producer>, Error> {
        if !self.inner.settings.provision {
            let group_queue = self.topology(spec).queue;
            return self
                .producer_for(
                    DEAD_LETTER_EXCHANGE.to_owned(),
                    "direct".to_owned(),
                    Some(group_queue.clone()),
                    group_queue,
                    false,
                )
                .await;
        }
        let dlq = spec.dlq_destination();
        self.producer_for(dlq.clone(), "topic".to_owned(), None, dlq, true)
            .await
    }

    async fn close(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::Release);
        let limit = self.inner.settings.connection_timeout;
        // Each within a deadline: a connection held by a reconnection, or a broker that does
        // not answer, must not hold up shutdown.
        let close = |role: Role| async move {
            let closing = async {
                if let Some(connection) = self.inner.connections(role).lock().await.take() {
                    // A connection that fails while it closes never answers the close: there
                    // is nothing left on it to wait for.
                    let status = connection.status().clone();
                    let failed = async {
                        while !(status.errored() || status.closed()) {
                            tokio::time::sleep(FAILED_CLOSE_CHECK).await;
                        }
                    };
                    tokio::select! {
                        _ = connection.close(200, "bindery shutting down".into()) => {}
                        _ = failed => {}
                    }
                }
            };
            tokio::time::timeout(limit, closing).await.map_err(|_| {
                self.error(RabbitError::Channel(format!(
                    "a connection did not close within {limit:?}; it was dropped"
                )))
            })
        };
        let (publishing, consuming) = tokio::join!(close(Role::Publish), close(Role::Consume));
        publishing.and(consuming)
    }

    /// The ready messages of the group's queue (those delivered and not yet acknowledged are
    /// not counted), from a passive declaration on a channel of its own.
    async fn lag(&self, spec: &ConsumerSpec) -> Option<u64> {
        spec.group.as_ref()?;
        let queue = self.topology(spec).queue;
        let within = self
            .inner
            .settings
            .connection_timeout
            .min(LAG_ANSWER_WITHIN);
        tokio::time::timeout(within, async {
            // A passive declaration of a missing queue closes its channel: a channel of its own.
            let probe = self.open_channel(Role::Consume).await.ok()?;
            let declared = probe
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()?;
            probe.close(200, "bindery lag".into()).await.ok();
            Some(u64::from(declared.message_count()))
        })
        .await
        .ok()
        .flatten()
    }

    /// Up while the consuming connection is open; when it was lost, one reconnection is
    /// tried (as Spring's health check opens a connection), so a broker that is back reports
    /// up before the subscriptions' back-off has run out. The answer comes within
    /// `connection-timeout`, and never later than four seconds.
    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::down("the binder was closed");
        }
        // Within the time the core gives a health check, whatever the connection timeout.
        let within = self
            .inner
            .settings
            .connection_timeout
            .min(HEALTH_ANSWER_WITHIN);
        let probe = async {
            let connected = self
                .inner
                .consuming
                .lock()
                .await
                .as_ref()
                .is_some_and(|c| c.status().connected());
            if !connected {
                let channel = self.open_channel(Role::Consume).await?;
                // The channel only proved the broker answers; the connection stays for the
                // subscriptions.
                channel.close(200, "bindery health check".into()).await.ok();
            }
            Ok::<(), RabbitError>(())
        };
        let problem = match tokio::time::timeout(within, probe).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(redact_uri(&error.to_string())),
            Err(_) => Some(format!("no connection within {within:?}")),
        };
        if let Some(problem) = problem {
            return Health::down(format!(
                "RabbitMQ at {} is not reachable: {problem}",
                self.shown_uri()
            ));
        }
        let health = Health::up().with_detail("uri", self.shown_uri());
        match self.inner.publishing_blocked.reason() {
            Some(reason) => health.with_detail(
                "publishing",
                format!("blocked by the broker ({reason}); sends wait until it unblocks"),
            ),
            None => health,
        }
    }
}

struct RabbitSubscription {
    binder: RabbitBinder,
    topology: Topology,
    channel: Channel,
    consumer: lapin::Consumer,
    /// `basic.cancel` was sent at shutdown: the consumer yields what it holds, then ends.
    cancelled: bool,
    /// Cancelled for a pause: resumed with a new consumer on the same channel, where the
    /// messages the core holds are still to be settled.
    paused: bool,
    /// The consumer has ended (or may have): it is never polled again, since lapin does not
    /// say twice that a consumer ended. The next receive recovers instead.
    ended: bool,
}

impl fmt::Debug for RabbitSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSubscription")
            .field("queue", &self.topology.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitSubscription {
    /// Asks the broker to send this consumer no more (`basic.cancel`), within a deadline.
    async fn cancel(&mut self) -> bool {
        let limit = self.binder.inner.settings.connection_timeout;
        self.cancel_within(limit).await
    }

    async fn cancel_within(&mut self, limit: Duration) -> bool {
        if self.cancelled {
            return true;
        }
        let cancelling = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        self.cancelled = matches!(tokio::time::timeout(limit, cancelling).await, Ok(Ok(())));
        self.cancelled
    }

    /// Reconnects with back-off until the queue is consumed again (or the binder closes).
    async fn recover(&mut self) -> bool {
        let mut wait = Duration::from_millis(250);
        let limit = self.binder.inner.settings.recovery_interval;
        loop {
            if self.binder.inner.closed.load(Ordering::Acquire) {
                return false;
            }
            match self.binder.consume(&self.topology).await {
                Ok((channel, consumer)) => {
                    tracing::info!(queue = %self.topology.queue, "consuming again after reconnecting to RabbitMQ");
                    self.cancelled = false;
                    self.paused = false;
                    self.ended = false;
                    self.channel = channel;
                    self.consumer = consumer;
                    return true;
                }
                Err(error) if error.is_permanent() => {
                    tracing::error!(queue = %self.topology.queue, %error, "RabbitMQ refused the subscription for good; it ends, which stops the application");
                    return false;
                }
                Err(error) => {
                    tracing::warn!(queue = %self.topology.queue, %error, "reconnecting to RabbitMQ failed; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(limit);
                }
            }
        }
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        loop {
            if self.ended {
                // Drained at shutdown: nothing more comes.
                if self.cancelled && !self.paused {
                    return None;
                }
                if !self.recover().await {
                    return None;
                }
            }
            match self.consumer.next().await {
                Some(Ok(delivery)) => {
                    let message = mapping::message(&delivery);
                    return Some(Ok(Delivery {
                        message: Arc::new(message),
                        redelivered: delivery.redelivered,
                        acknowledgement: Box::new(RabbitAck {
                            acker: Some(delivery.acker),
                        }),
                    }));
                }
                // Draining at shutdown: what was received has been yielded; nothing is recovered.
                _ if self.cancelled => {
                    self.ended = true;
                    return None;
                }
                // The client closes the whole connection on a frame it cannot read, every
                // consumer of the binder sees it, and the broker delivers the same message first
                // again after each reconnect.
                Some(Err(error)) if matches!(error.kind(), lapin::ErrorKind::ParsingError(_)) => {
                    tracing::error!(queue = %self.topology.queue, %error, "RabbitMQ delivered a message the AMQP client cannot read (most likely a property or header name that is not UTF-8, which AMQP 0-9-1 requires) to one of this binder's queues; the client drops the binder's consuming connection at it, every time it is delivered, until the message is removed from its queue (by hand, or by a quorum queue's delivery limit); reconnecting");
                }
                Some(Err(error)) => {
                    tracing::warn!(queue = %self.topology.queue, %error, "lost the RabbitMQ consumer; reconnecting");
                }
                None => {
                    tracing::warn!(queue = %self.topology.queue, "the RabbitMQ consumer was cancelled; reconnecting");
                }
            }
            // Marked first: a receive dropped while it recovers leaves the next one to recover.
            self.ended = true;
        }
    }

    async fn drain(&mut self) -> bool {
        self.cancel().await
    }

    /// Cancels the consumer, so the broker keeps the queue for the group's other consumers,
    /// and hands back (`basic.nack`, requeued) what it had prefetched that the core did not
    /// take; all within [`PAUSE_ANSWER_WITHIN`], inside the core's limit.
    ///
    /// An anonymous queue has no other consumer, and RabbitMQ deletes an auto-delete queue with
    /// its last consumer, messages and all: its consumer is kept, and what the client prefetched
    /// (at most `prefetch`, the broker sends no more unacknowledged) waits for the resume. A
    /// pause longer than the broker's `consumer_timeout` (30 min by default) ends the consumer
    /// all the same, and the queue with it, as a lost connection does.
    async fn pause(&mut self) {
        if self.topology.anonymous {
            return;
        }
        let deadline = tokio::time::Instant::now() + PAUSE_ANSWER_WITHIN;
        if self.ended || self.cancelled || !self.cancel_within(PAUSE_ANSWER_WITHIN / 2).await {
            return;
        }
        self.paused = true;
        let mut handed_back = 0usize;
        // After `cancel-ok` the consumer yields what lapin holds for it, then ends.
        loop {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                // Ended (or out of time: not polled again either way).
                self.ended = true;
                break;
            };
            let nack = delivery.acker.nack(REQUEUE);
            if !matches!(tokio::time::timeout_at(deadline, nack).await, Ok(Ok(true))) {
                tracing::warn!(queue = %self.topology.queue, "handing a prefetched message back failed; RabbitMQ delivers it again once the channel closes");
            }
            handed_back += 1;
        }
        tracing::info!(queue = %self.topology.queue, handed_back, "paused: the consumer is cancelled, and the queue keeps the group's messages");
    }

    /// Consumes again on the same channel, where the messages the core holds are settled;
    /// when that fails, the next receive reconnects.
    async fn resume(&mut self) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        self.cancelled = false;
        self.ended = true;
        let consuming = self.binder.start_consumer(&self.channel, &self.topology);
        match tokio::time::timeout(PAUSE_ANSWER_WITHIN / 2, consuming).await {
            Ok(Ok(consumer)) => {
                self.consumer = consumer;
                self.ended = false;
            }
            Ok(Err(error)) => {
                tracing::warn!(queue = %self.topology.queue, %error, "consuming again after the pause failed; reconnecting");
            }
            Err(_) => {
                // A consumer the broker may have started is read by nobody: closing the
                // channel hands its messages back (and those the core holds, which come again).
                tracing::warn!(queue = %self.topology.queue, "RabbitMQ did not start the consumer again in time; reconnecting");
                let closing = self
                    .channel
                    .close(200, "consumer not started in time".into());
                tokio::time::timeout(PAUSE_ANSWER_WITHIN / 2, closing)
                    .await
                    .ok();
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<(), Error> {
        // Cancelled first, so the broker sends nothing more while the channel closes; closing
        // the channel hands unacknowledged messages back to the broker.
        self.cancel().await;
        let limit = self.binder.inner.settings.connection_timeout;
        let _ =
            tokio::time::timeout(limit, self.channel.close(200, "consumer closed".into())).await;
        Ok(())
    }
}

struct RabbitAck {
    acker: Option<lapin::Acker>,
}

impl fmt::Debug for RabbitAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitAck").finish_non_exhaustive()
    }
}

const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

#[async_trait]
impl Acknowledgement for RabbitAck {
    async fn ack(mut self: Box<Self>) -> Result<(), Error> {
        match self.acker.take() {
            Some(acker) => {
                settle_delivery(acker.ack(BasicAckOptions::default()), "basic.ack").await
            }
            None => Ok(()),
        }
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), Error> {
        match self.acker.take() {
            Some(acker) => settle_delivery(acker.nack(REQUEUE), "basic.nack").await,
            None => Ok(()),
        }
    }
}

/// Sends an ack or nack within a deadline (a blocked connection takes no frames), and reports
/// one lapin did not send (`false`: the delivery's channel failed, so the broker delivers it
/// again).
async fn settle_delivery(
    sending: impl std::future::Future<Output = lapin::Result<bool>>,
    what: &str,
) -> Result<(), Error> {
    let failed = |reason: String| Error::binder("rabbit", RabbitError::Channel(reason));
    match tokio::time::timeout(PUBLISH_TIMEOUT, sending).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(failed(format!(
            "{what} was not sent: lapin no longer accepts it for this delivery (its channel failed); RabbitMQ delivers the message again"
        ))),
        Ok(Err(error)) => Err(failed(format!("{what} failed: {error}"))),
        Err(_) => Err(failed(format!(
            "{what} was not sent within {PUBLISH_TIMEOUT:?} (is the connection blocked?)"
        ))),
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        if let (Some(acker), Ok(runtime)) =
            (self.acker.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = acker.nack(REQUEUE).await;
            });
        }
    }
}

struct RabbitProducer {
    binder: RabbitBinder,
    exchange: String,
    exchange_type: String,
    fixed_routing_key: Option<String>,
    default_routing_key: String,
    declare: bool,
    /// The confirming channel and the settler of its confirms.
    channel: Mutex<Option<(Channel, Confirms)>>,
}

impl fmt::Debug for RabbitProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitProducer")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl RabbitProducer {
    /// The producer's confirming channel, opened again when it was closed; an error when the
    /// broker does not answer in time.
    async fn channel(&self) -> Result<(Channel, Confirms), RabbitError> {
        let limit = self.binder.inner.settings.connection_timeout * 2;
        tokio::time::timeout(limit, self.confirming_channel())
            .await
            .map_err(|_| {
                RabbitError::Channel(format!("RabbitMQ did not open a channel within {limit:?}"))
            })?
    }

    async fn confirming_channel(&self) -> Result<(Channel, Confirms), RabbitError> {
        let mut cached = self.channel.lock().await;
        if let Some((channel, confirms)) = cached.take() {
            if channel.status().connected() && confirms.usable() {
                *cached = Some((channel.clone(), confirms.clone()));
                return Ok((channel, confirms));
            }
            // Closed, so the broker forgets its confirms, and lapin fails those still waiting.
            tokio::spawn(async move {
                let closing = channel.close(200, "bindery replaces the channel".into());
                let _ = tokio::time::timeout(PUBLISH_TIMEOUT, closing).await;
            });
        }
        let channel = self.binder.channel(Role::Publish).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| RabbitError::Channel(e.to_string()))?;
        if self.declare {
            channel
                .exchange_declare(
                    ShortString::from(self.exchange.as_str()),
                    kind(&self.exchange_type),
                    durable_exchange(),
                    FieldTable::default(),
                )
                .await
                .map_err(
                    self.binder
                        .declare_error(format!("exchange `{}`", self.exchange)),
                )?;
        }
        let confirms = Confirms::start();
        *cached = Some((channel.clone(), confirms.clone()));
        Ok((channel, confirms))
    }

    /// Publishes on the producer's confirming channel; the confirmation resolves when the
    /// broker acknowledged the message (or returned or refused it).
    async fn publish(
        &self,
        message: &Message,
        routing_key: &str,
        properties: BasicProperties,
    ) -> Result<Confirmation, RabbitError> {
        let (channel, confirms) = self.channel().await?;
        // The id the broker hands back with a return: the `message_id` property, when set.
        let own_id = message
            .headers()
            .get_str(header::MESSAGE_ID)
            .filter(|id| id.len() <= mapping::SHORT_STRING_MAX)
            .map(str::to_owned);
        let publishing = channel.basic_publish(
            ShortString::from(self.exchange.as_str()),
            ShortString::from(routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            message.payload(),
            properties,
        );
        // A connection the broker blocks (memory or disk alarm) takes no more frames. A publish
        // that fails or is given up makes the channel be replaced: only this channel, so
        // callers that fail together replace it once.
        let published =
            tokio::time::timeout(PUBLISH_TIMEOUT, confirms.publish(own_id, publishing)).await;
        let taken = match published {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("RabbitMQ did not take the message within {PUBLISH_TIMEOUT:?} (is the connection blocked?)")),
        };
        let outcome = taken.map_err(|reason| {
            confirms.give_up();
            self.publish_error(routing_key, reason)
        })?;
        let (binder, exchange, routing_key) = (
            self.binder.clone(),
            self.exchange.clone(),
            routing_key.to_owned(),
        );
        Ok(Confirmation::pending(async move {
            let failed = |reason: &str| {
                binder.error(RabbitError::Publish {
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                    reason: reason.to_owned(),
                })
            };
            let outcome = match tokio::time::timeout(PUBLISH_TIMEOUT, outcome).await {
                Err(_) => {
                    // Later confirms of the channel wait behind this one: it is replaced.
                    confirms.give_up();
                    return Err(failed(&format!("no confirm within {PUBLISH_TIMEOUT:?}")));
                }
                Ok(Err(_)) => return Err(failed("the channel closed before the broker answered")),
                Ok(Ok(outcome)) => outcome.map_err(|e| failed(&e.to_string()))?,
            };
            match outcome {
                Outcome::Delivered => Ok(()),
                Outcome::Returned => Err(failed(
                    "no queue is bound for it, so RabbitMQ returned it; start a consumer group first or list the group in `producer.required-groups`",
                )),
                Outcome::Refused => Err(failed("the broker refused it (nack)")),
            }
        }))
    }

    fn publish_error(&self, routing_key: &str, reason: String) -> RabbitError {
        RabbitError::Publish {
            exchange: self.exchange.clone(),
            routing_key: routing_key.to_owned(),
            reason,
        }
    }

    /// The routing key for `message`, and whether its key must travel in a header because it
    /// cannot be the routing key (none is fixed, it is UTF-8, not empty, short enough, and not
    /// the exchange's name, which stands for "no key" on receipt).
    fn route(&self, message: &Message) -> (String, bool) {
        if let Some(partition) = message.partition() {
            // A partition's queues are bound by its routing key: the key travels in a header.
            let routing_key = partition_routing_key(&self.exchange, partition);
            return (routing_key, message.key().is_some());
        }
        if let Some(fixed) = &self.fixed_routing_key {
            return (fixed.clone(), message.key().is_some());
        }
        match (message.key(), message.key_str()) {
            (None, _) => (self.default_routing_key.clone(), false),
            (Some(_), Some(key))
                if !key.is_empty()
                    && key.len() <= mapping::SHORT_STRING_MAX
                    && key != self.exchange =>
            {
                (key.to_owned(), false)
            }
            (Some(_), _) => (self.default_routing_key.clone(), true),
        }
    }
}

#[async_trait]
impl Producer for RabbitProducer {
    async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error> {
        // Frames written to a blocked connection would wait in its socket until the alarm
        // clears: the send fails now, and the core sends it again after its back-off.
        if let Some(reason) = self.binder.inner.publishing_blocked.reason() {
            return Err(self.binder.error(RabbitError::Blocked { reason }));
        }
        let (routing_key, key_in_header) = self.route(message);
        let refused = |reason: String| {
            Error::refused(
                self.binder.inner.name.clone(),
                self.publish_error(&routing_key, reason),
            )
        };
        let stale = message.partition().is_none() && message.headers().contains(mapping::PARTITION);
        let properties = if key_in_header || message.partition().is_some() || stale {
            let mut carried = message.clone();
            let headers = carried.headers_mut();
            // Only this producer says which partition a message went to.
            headers.remove(mapping::PARTITION);
            if let (true, Some(key)) = (key_in_header, message.key().cloned()) {
                headers.insert_bytes(mapping::ORIGINAL_KEY, key);
            }
            if let Some(partition) = message.partition() {
                headers.insert(mapping::PARTITION, partition.to_string());
            }
            mapping::properties(&carried)
        } else {
            mapping::properties(message)
        }
        .map_err(refused)?;
        match self
            .publish(message, &routing_key, properties.clone())
            .await
        {
            Ok(confirmation) => Ok(confirmation),
            Err(blocked @ RabbitError::Blocked { .. }) => Err(self.binder.error(blocked)),
            Err(first) => {
                // A channel closed under us (reconnection, or a refused publish) is opened again
                // once; a second failure is the core's to retry.
                tracing::debug!(exchange = %self.exchange, error = %first, "publishing failed; trying once more on a new channel");
                self.publish(message, &routing_key, properties)
                    .await
                    .map_err(|_| self.binder.error(first))
            }
        }
    }
}
