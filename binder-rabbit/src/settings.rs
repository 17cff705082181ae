use std::time::Duration;

use bindery_core::config::{ConfigNode, Problems};

const BINDER_KEYS: &[&str] = &[
    "type",
    "uri",
    "connection-timeout",
    "recovery-interval",
    "provision",
];
const CONSUMER_KEYS: &[&str] = &[
    "prefetch",
    "quorum",
    "ttl",
    "max-length",
    "binding-routing-key",
    "exchange-type",
];
const PRODUCER_KEYS: &[&str] = &[
    "routing-key",
    "exchange-type",
    "dlq",
    "quorum",
    "ttl",
    "max-length",
    "binding-routing-key",
];
const EXCHANGE_TYPES: &[&str] = &["topic", "direct", "fanout", "headers"];

/// `[stream.binders.<name>]` of a binder of type `rabbit`.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitSettings {
    /// `uri`: the broker, `amqp://user:password@host:port/vhost`.
    /// Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub uri: String,
    /// `connection-timeout`: how long connecting may take before it is an error. Default 10s.
    pub connection_timeout: Duration,
    /// `recovery-interval`: the longest wait between reconnection attempts after the
    /// connection is lost. Default 5s.
    pub recovery_interval: Duration,
    /// `provision`: declare exchanges, queues and bindings. Default true; when false they
    /// must exist.
    pub provision: bool,
}

impl std::fmt::Debug for RabbitSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSettings")
            .field("uri", &bindery_core::redact::redact_whole_uri(&self.uri))
            .field("connection_timeout", &self.connection_timeout)
            .field("recovery_interval", &self.recovery_interval)
            .field("provision", &self.provision)
            .finish()
    }
}

impl Default for RabbitSettings {
    fn default() -> Self {
        RabbitSettings {
            uri: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            connection_timeout: Duration::from_secs(10),
            recovery_interval: Duration::from_secs(5),
            provision: true,
        }
    }
}

impl RabbitSettings {
    /// Reads the binder's table, reporting wrong keys.
    pub fn read(node: Option<&ConfigNode>, problems: &mut Problems) -> Self {
        let mut settings = RabbitSettings::default();
        let Some(table) = node.and_then(|n| n.table(BINDER_KEYS, problems)) else {
            return settings;
        };
        for (name, node) in table {
            match name.as_str() {
                "uri" => {
                    if let Some(uri) = node.string(problems) {
                        if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
                            problems.at(&node, "expected an AMQP URI such as \"amqp://user:password@host:5672/%2f\"");
                        } else if uri.parse::<lapin::uri::AMQPUri>().is_err() {
                            // The parser's reason may quote the password: not shown.
                            problems.at(&node, "is not an AMQP URI that can be read; percent-encode `:`, `/`, `?`, `#` and `@` in the user name and password (`%3A`, `%2F`, `%3F`, `%23`, `%40`)");
                        } else {
                            settings.uri = uri;
                        }
                    }
                }
                "connection-timeout" => {
                    settings.connection_timeout = node
                        .duration(problems)
                        .unwrap_or(settings.connection_timeout)
                }
                "recovery-interval" => {
                    settings.recovery_interval = node
                        .duration(problems)
                        .unwrap_or(settings.recovery_interval)
                }
                "provision" => settings.provision = node.boolean(problems).unwrap_or(true),
                _ => {}
            }
        }
        settings
    }
}

/// `[stream.rabbit.bindings.<binding>.consumer]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitConsumerSettings {
    /// `prefetch`: unacknowledged messages the broker sends ahead (`basic.qos`). Default 250, as in Spring AMQP.
    pub prefetch: u16,
    /// `quorum`: declare the group queue (and its DLQ) as a quorum queue. Default false.
    pub quorum: bool,
    /// `ttl`: message time-to-live in the group queue (`x-message-ttl`). Default none.
    pub ttl: Option<Duration>,
    /// `max-length`: the most messages the group queue holds (`x-max-length`). Default none.
    pub max_length: Option<i64>,
    /// `binding-routing-key`: binds the queue to the exchange with this key. Default `#`.
    pub binding_routing_key: String,
    /// `exchange-type`: `topic`, `direct`, `fanout` or `headers`. Default `topic`.
    pub exchange_type: String,
}

impl Default for RabbitConsumerSettings {
    fn default() -> Self {
        RabbitConsumerSettings {
            prefetch: 250,
            quorum: false,
            ttl: None,
            max_length: None,
            binding_routing_key: "#".to_owned(),
            exchange_type: "topic".to_owned(),
        }
    }
}

/// A routing key: an AMQP short string, so at most 255 bytes (a longer one could never be sent
/// or bound).
fn routing_key(node: &ConfigNode, problems: &mut Problems) -> Option<String> {
    let key = node.string(problems)?;
    if key.len() > crate::mapping::SHORT_STRING_MAX {
        problems.at(
            node,
            format!(
                "a routing key is at most {} bytes (an AMQP short string); this one is {}",
                crate::mapping::SHORT_STRING_MAX,
                key.len()
            ),
        );
        return None;
    }
    Some(key)
}

fn exchange_type(node: &ConfigNode, problems: &mut Problems) -> Option<String> {
    let kind = node.string(problems)?;
    if EXCHANGE_TYPES.contains(&kind.as_str()) {
        Some(kind)
    } else {
        problems.at(
            node,
            format!("unknown exchange type \"{kind}\"; use topic, direct, fanout or headers"),
        );
        None
    }
}

impl RabbitConsumerSettings {
    /// Reads a binding's consumer section, reporting wrong keys.
    pub fn read(node: Option<&ConfigNode>, problems: &mut Problems) -> Self {
        let mut settings = RabbitConsumerSettings::default();
        let Some(table) = node.and_then(|n| n.table(CONSUMER_KEYS, problems)) else {
            return settings;
        };
        let mut exchange_type_node = None;
        for (name, node) in table {
            match name.as_str() {
                "prefetch" => {
                    if let Some(n) = node.integer_in(1, u16::MAX.into(), problems) {
                        settings.prefetch = u16::try_from(n).unwrap_or(u16::MAX);
                    }
                }
                "quorum" => settings.quorum = node.boolean(problems).unwrap_or(false),
                "ttl" => settings.ttl = node.duration(problems),
                "max-length" => settings.max_length = node.integer(1, problems),
                "binding-routing-key" => {
                    if let Some(key) = routing_key(&node, problems) {
                        settings.binding_routing_key = key;
                    }
                }
                "exchange-type" => {
                    if let Some(kind) = exchange_type(&node, problems) {
                        settings.exchange_type = kind;
                        exchange_type_node = Some(node.clone());
                    }
                }
                _ => {}
            }
        }
        if let Some(node) = exchange_type_node {
            if settings.exchange_type == "direct" && settings.binding_routing_key == "#" {
                problems.at(
                    &node,
                    "a direct exchange routes by exact key, so the default `binding-routing-key` `#` would bind only the key `#`; set `binding-routing-key` to the key this group receives",
                );
            }
        }
        settings
    }
}

/// `[stream.rabbit.bindings.<binding>.producer]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RabbitProducerSettings {
    /// `routing-key`: the routing key of every message (keys then travel in a header). Default:
    /// the message key, else the destination name.
    pub routing_key: Option<String>,
    /// `exchange-type`: as for consumers. Default `topic`.
    pub exchange_type: Option<String>,
    /// How the queues of `required-groups` are declared when their consumers run in another
    /// application: `dlq`, `quorum`, `ttl`, `max-length` and `binding-routing-key`, with the
    /// meaning they have for the consumer, which must declare its queue alike. A consumer
    /// bound in the same application is declared with its own settings instead, and one the
    /// application knows but leaves out (bound by another process) with its settings as this
    /// application's configuration gives them.
    pub required_group_queue: RequiredGroupQueue,
}

/// The arguments of a required group's queue, given on the producer's side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequiredGroupQueue {
    /// `dlq`: the queue dead-letters to `DLX`, and `<destination>.<group>.dlq` is declared.
    pub dlq: bool,
    /// `quorum`, `ttl`, `max-length`, `binding-routing-key`: as in the consumer's section.
    pub consumer: RabbitConsumerSettings,
}

impl RabbitProducerSettings {
    /// Reads a binding's producer section, reporting wrong keys.
    pub fn read(node: Option<&ConfigNode>, problems: &mut Problems) -> Self {
        let mut settings = RabbitProducerSettings::default();
        let Some(table) = node.and_then(|n| n.table(PRODUCER_KEYS, problems)) else {
            return settings;
        };
        for (name, node) in table {
            let queue = &mut settings.required_group_queue;
            match name.as_str() {
                "routing-key" => settings.routing_key = routing_key(&node, problems),
                "exchange-type" => settings.exchange_type = exchange_type(&node, problems),
                "dlq" => queue.dlq = node.boolean(problems).unwrap_or(false),
                "quorum" => queue.consumer.quorum = node.boolean(problems).unwrap_or(false),
                "ttl" => queue.consumer.ttl = node.duration(problems),
                "max-length" => queue.consumer.max_length = node.integer(1, problems),
                "binding-routing-key" => {
                    if let Some(key) = routing_key(&node, problems) {
                        queue.consumer.binding_routing_key = key;
                    }
                }
                _ => {}
            }
        }
        if let Some(kind) = &settings.exchange_type {
            settings.required_group_queue.consumer.exchange_type = kind.clone();
        }
        settings
    }
}
