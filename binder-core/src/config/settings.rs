use std::collections::BTreeMap;
use std::time::Duration;

use config::Value;

use super::node::{ConfigNode, ConfigTable, Problems};

/// How a consumer binding handles failures and parallelism (`[stream.bindings.<name>.consumer]`,
/// defaults from `[stream.default.consumer]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerProperties {
    /// `max-attempts`: how many times a failing message is handled in all (1 = no retry). Default 3.
    pub max_attempts: u32,
    /// `back-off-initial-interval`: the wait before the first retry. Default 1s.
    pub back_off_initial_interval: Duration,
    /// `back-off-multiplier`: each wait is the one before times this. Default 2.0.
    pub back_off_multiplier: f64,
    /// `back-off-max-interval`: the longest wait between retries. Default 10s.
    pub back_off_max_interval: Duration,
    /// `concurrency`: messages handled at once; messages with one key keep their order. Default 1.
    pub concurrency: u32,
    /// `max-in-flight`: messages a binding holds at once, from receipt until settled with the
    /// broker (being handled, waiting for a retry or for their outputs' confirmations).
    /// Default 1000.
    pub max_in_flight: u32,
    /// `dlq`: send messages that still fail after every attempt to the dead-letter destination.
    /// Default false (they are logged with their id and acknowledged).
    pub dlq: bool,
    /// `dlq-name`: the dead-letter destination. Default `<destination>.<group>.dlq`.
    pub dlq_name: Option<String>,
    /// `partitioned`: receive only this instance's partition of a partitioned destination
    /// (see `producer.partition-count`). Default false: every partition.
    pub partitioned: bool,
    /// `instance-count`: how many instances of the application share a partitioned
    /// destination. Default 1.
    pub instance_count: u32,
    /// `instance-index`: which of them this one is, from 0 to `instance-count - 1`; it
    /// receives partition `instance-index` (on Kafka, every partition `p` with
    /// `p % instance-count == instance-index`). Default 0.
    pub instance_index: u32,
}

impl Default for ConsumerProperties {
    fn default() -> Self {
        ConsumerProperties {
            max_attempts: 3,
            back_off_initial_interval: Duration::from_secs(1),
            back_off_multiplier: 2.0,
            back_off_max_interval: Duration::from_secs(10),
            concurrency: 1,
            max_in_flight: 1000,
            dlq: false,
            dlq_name: None,
            partitioned: false,
            instance_count: 1,
            instance_index: 0,
        }
    }
}

impl ConsumerProperties {
    /// The wait after failed attempt number `attempt` (1-based): exponential, capped.
    pub fn back_off(&self, attempt: u32) -> Duration {
        let factor = self
            .back_off_multiplier
            .powi(attempt.saturating_sub(1) as i32);
        let wait = self.back_off_initial_interval.as_secs_f64() * factor;
        Duration::from_secs_f64(wait.min(self.back_off_max_interval.as_secs_f64()))
    }

    /// The partition this consumer receives when it is `partitioned` among more than one
    /// instance: its `instance-index`. A single instance receives everything, as a producer
    /// with `partition-count = 1` is not partitioned.
    pub fn partition(&self) -> Option<u32> {
        (self.partitioned && self.instance_count > 1).then_some(self.instance_index)
    }
}

/// Producer settings of an output binding (`[stream.bindings.<name>.producer]`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProducerProperties {
    /// `required-groups`: groups whose subscriptions the producer creates up front, so what it
    /// sends before their consumers start is kept for them. Default none.
    pub required_groups: Vec<String>,
    /// `partition-count`: partitions of the destination, each message going to the one its
    /// key chooses (keyless messages in turn). Default 1: not partitioned.
    pub partition_count: u32,
}

impl Default for ProducerProperties {
    fn default() -> Self {
        ProducerProperties {
            required_groups: Vec::new(),
            partition_count: 1,
        }
    }
}

pub(crate) const STREAM_KEYS: &[&str] = &[
    "default-binder",
    "function",
    "bindings",
    "binders",
    "default",
    "output-bindings",
    "shutdown-timeout",
];
const BINDING_KEYS: &[&str] = &[
    "destination",
    "group",
    "content-type",
    "binder",
    "consumer",
    "producer",
];
const DEFAULT_KEYS: &[&str] = &["group", "content-type", "consumer", "producer"];
const CONSUMER_KEYS: &[&str] = &[
    "max-attempts",
    "back-off-initial-interval",
    "back-off-multiplier",
    "back-off-max-interval",
    "concurrency",
    "max-in-flight",
    "dlq",
    "dlq-name",
    "partitioned",
    "instance-count",
    "instance-index",
];
const PRODUCER_KEYS: &[&str] = &["required-groups", "partition-count"];
const SUPPORTED_CONTENT_TYPES: &[&str] =
    &["application/json", "text/plain", "application/octet-stream"];

/// What one binding (or `[stream.default]`) sets; unset fields fall back to the defaults.
#[derive(Clone, Debug, Default)]
pub(crate) struct BindingConfig {
    pub(crate) node: Option<ConfigNode>,
    /// The keys the binding sets, to point at one that does not apply.
    pub(crate) set: ConfigTable,
    pub(crate) destination: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) binder: Option<(String, ConfigNode)>,
    pub(crate) consumer: ConsumerOverrides,
    pub(crate) producer: ProducerOverrides,
}

/// What a producer section sets; each key falls back to `[stream.default.producer]` on its own.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProducerOverrides {
    required_groups: Option<Vec<String>>,
    partition_count: Option<u32>,
    /// Where `partition-count` is set, to point at it.
    pub(crate) partition_count_node: Option<ConfigNode>,
}

impl ProducerOverrides {
    pub(crate) fn apply(&self, to: &mut ProducerProperties) {
        if let Some(groups) = &self.required_groups {
            to.required_groups = groups.clone();
        }
        if let Some(count) = self.partition_count {
            to.partition_count = count;
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ConsumerOverrides {
    max_attempts: Option<u32>,
    back_off_initial_interval: Option<Duration>,
    back_off_multiplier: Option<f64>,
    back_off_max_interval: Option<Duration>,
    concurrency: Option<u32>,
    max_in_flight: Option<u32>,
    pub(crate) dlq: Option<(bool, ConfigNode)>,
    dlq_name: Option<String>,
    partitioned: Option<bool>,
    instance_count: Option<u32>,
    instance_index: Option<u32>,
    /// The keys the section sets, to point at one that conflicts with another.
    pub(crate) set: ConfigTable,
}

impl ConsumerOverrides {
    pub(crate) fn apply(&self, to: &mut ConsumerProperties) {
        if let Some(v) = self.max_attempts {
            to.max_attempts = v;
        }
        if let Some(v) = self.back_off_initial_interval {
            to.back_off_initial_interval = v;
        }
        if let Some(v) = self.back_off_multiplier {
            to.back_off_multiplier = v;
        }
        if let Some(v) = self.back_off_max_interval {
            to.back_off_max_interval = v;
        }
        if let Some(v) = self.concurrency {
            to.concurrency = v;
        }
        if let Some(v) = self.max_in_flight {
            to.max_in_flight = v;
        }
        if let Some((v, _)) = &self.dlq {
            to.dlq = *v;
        }
        if let Some(v) = &self.dlq_name {
            to.dlq_name = Some(v.clone());
        }
        if let Some(v) = self.partitioned {
            to.partitioned = v;
        }
        if let Some(v) = self.instance_count {
            to.instance_count = v;
        }
        if let Some(v) = self.instance_index {
            to.instance_index = v;
        }
    }
}

/// Everything under `[stream]`, read and type-checked; cross-checks against the registered
/// functions and binders happen when the application is built.
#[derive(Clone, Debug)]
pub(crate) struct StreamConfig {
    pub(crate) default_binder: Option<(String, ConfigNode)>,
    pub(crate) function_definition: Option<(Vec<String>, ConfigNode)>,
    pub(crate) output_bindings: Vec<(String, ConfigNode)>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) bindings: BTreeMap<String, BindingConfig>,
    pub(crate) binders: BTreeMap<String, ConfigNode>,
    pub(crate) defaults: BindingConfig,
    /// `[stream.<binder type>]` sections, such as `[stream.kafka]`.
    pub(crate) extensions: BTreeMap<String, ConfigNode>,
}

impl StreamConfig {
    /// Reads `[stream]` from the merged configuration. `extension_types` are the binder types
    /// whose own sections (`[stream.kafka]`, ...) may appear under `[stream]`.
    pub(crate) fn read(
        root: &Value,
        extension_types: &[&str],
        problems: &mut Problems,
    ) -> StreamConfig {
        let mut config = StreamConfig {
            default_binder: None,
            function_definition: None,
            output_bindings: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
            bindings: BTreeMap::new(),
            binders: BTreeMap::new(),
            defaults: BindingConfig::default(),
            extensions: BTreeMap::new(),
        };
        let root = ConfigNode::new("", root.clone());
        let Some(top) = root.entries(problems) else {
            return config;
        };
        let Some(stream) = top.get("stream") else {
            return config;
        };
        let mut allowed: Vec<&str> = STREAM_KEYS.to_vec();
        allowed.extend_from_slice(extension_types);
        let Some(table) = stream.table(&allowed, problems) else {
            return config;
        };
        for (name, node) in table {
            match name.as_str() {
                "default-binder" => {
                    config.default_binder = node.string(problems).map(|s| (s, node))
                }
                "function" => {
                    if let Some(function) = node.table(&["definition"], problems) {
                        if let Some(def) = function.get("definition") {
                            config.function_definition =
                                read_definition(def, problems).map(|d| (d, def.clone()));
                        }
                    }
                }
                "output-bindings" => {
                    if let Some(names) = node.string_list(problems) {
                        config.output_bindings =
                            names.into_iter().map(|n| (n, node.clone())).collect();
                    }
                }
                "shutdown-timeout" => {
                    if let Some(d) = node.duration(problems) {
                        config.shutdown_timeout = d;
                    }
                }
                "bindings" => {
                    for (binding, node) in node.entries(problems).unwrap_or_default() {
                        let parsed = read_binding(&node, BINDING_KEYS, problems);
                        config.bindings.insert(binding, parsed);
                    }
                }
                "binders" => config.binders = node.entries(problems).unwrap_or_default(),
                "default" => config.defaults = read_binding(&node, DEFAULT_KEYS, problems),
                other if extension_types.contains(&other) => {
                    config.extensions.insert(name, node);
                }
                _ => {}
            }
        }
        config
    }
}

fn read_definition(node: &ConfigNode, problems: &mut Problems) -> Option<Vec<String>> {
    let text = node.string(problems)?;
    if text.contains('|') {
        problems.at(
            node,
            "function composition with `|` is not supported; list the functions to bind separated by `;`",
        );
        return None;
    }
    let names: Vec<String> = text
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        problems.at(
            node,
            "names no function; list the functions to bind separated by `;`, or remove the key to bind every registered function",
        );
        return None;
    }
    Some(names)
}

fn read_binding(node: &ConfigNode, allowed: &[&str], problems: &mut Problems) -> BindingConfig {
    let mut binding = BindingConfig {
        node: Some(node.clone()),
        ..BindingConfig::default()
    };
    let Some(table) = node.table(allowed, problems) else {
        return binding;
    };
    binding.set = table.clone();
    for (name, node) in table {
        match name.as_str() {
            "destination" => binding.destination = non_empty(&node, problems),
            "group" => binding.group = non_empty(&node, problems),
            "content-type" => binding.content_type = read_content_type(&node, problems),
            "binder" => binding.binder = node.string(problems).map(|s| (s, node)),
            "consumer" => binding.consumer = read_consumer(&node, problems),
            "producer" => binding.producer = read_producer(&node, problems),
            _ => {}
        }
    }
    binding
}

fn non_empty(node: &ConfigNode, problems: &mut Problems) -> Option<String> {
    let text = node.string(problems)?;
    if text.trim().is_empty() {
        problems.at(node, "must not be empty; remove the key to use the default");
        return None;
    }
    Some(text)
}

fn read_content_type(node: &ConfigNode, problems: &mut Problems) -> Option<String> {
    let text = node.string(problems)?;
    let essence = text
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if SUPPORTED_CONTENT_TYPES.contains(&essence.as_str()) || essence.ends_with("+json") {
        Some(text)
    } else {
        problems.at(
            node,
            format!(
                "unsupported content type {}; use one of {} or a `+json` type",
                node.shown(),
                super::quoted_list(SUPPORTED_CONTENT_TYPES)
            ),
        );
        None
    }
}

fn read_consumer(node: &ConfigNode, problems: &mut Problems) -> ConsumerOverrides {
    let mut consumer = ConsumerOverrides::default();
    let Some(table) = node.table(CONSUMER_KEYS, problems) else {
        return consumer;
    };
    consumer.set = table.clone();
    for (name, node) in table {
        match name.as_str() {
            "max-attempts" => consumer.max_attempts = read_u32(&node, problems),
            "back-off-initial-interval" => {
                consumer.back_off_initial_interval = node.duration(problems)
            }
            "back-off-multiplier" => consumer.back_off_multiplier = node.float(1.0, problems),
            "back-off-max-interval" => consumer.back_off_max_interval = node.duration(problems),
            "concurrency" => consumer.concurrency = read_u32(&node, problems),
            "max-in-flight" => consumer.max_in_flight = read_u32(&node, problems),
            "dlq" => consumer.dlq = node.boolean(problems).map(|b| (b, node)),
            "dlq-name" => consumer.dlq_name = non_empty(&node, problems),
            "partitioned" => consumer.partitioned = node.boolean(problems),
            "instance-count" => {
                consumer.instance_count = read_u32_in(&node, 1, MAX_PARTITIONS, problems)
            }
            "instance-index" => {
                consumer.instance_index = read_u32_in(&node, 0, u32::MAX.into(), problems)
            }
            _ => {}
        }
    }
    consumer
}

/// The most partitions a destination may have: a typo must not declare millions of queues.
const MAX_PARTITIONS: i64 = 4096;

fn read_producer(node: &ConfigNode, problems: &mut Problems) -> ProducerOverrides {
    let mut producer = ProducerOverrides::default();
    let Some(table) = node.table(PRODUCER_KEYS, problems) else {
        return producer;
    };
    if let Some(groups) = table.get("required-groups") {
        producer.required_groups = groups.string_list(problems);
    }
    if let Some(count) = table.get("partition-count") {
        producer.partition_count = read_u32_in(count, 1, MAX_PARTITIONS, problems);
        producer.partition_count_node = Some(count.clone());
    }
    producer
}

/// A whole number from 1 to `u32::MAX`.
fn read_u32(node: &ConfigNode, problems: &mut Problems) -> Option<u32> {
    read_u32_in(node, 1, u32::MAX.into(), problems)
}

/// A whole number from `min` to `max`, both within `u32`.
fn read_u32_in(node: &ConfigNode, min: i64, max: i64, problems: &mut Problems) -> Option<u32> {
    let n = node.integer_in(min, max, problems)?;
    u32::try_from(n).ok()
}
