use std::collections::BTreeMap;
use std::time::Duration;

use bindery_core::config::{ConfigNode, Problems};
use bindery_core::redact::{display_value, redact_uri};

const BINDER_KEYS: &[&str] = &[
    "type",
    "brokers",
    "auto-create-topics",
    "min-partition-count",
    "replication-factor",
    "configuration",
    "connection-timeout",
    "start-offset",
];
const CONSUMER_KEYS: &[&str] = &["start-offset"];

/// Where a consumer group without committed offsets starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOffset {
    /// The oldest message still kept.
    Earliest,
    /// Only messages sent from now on.
    Latest,
}

impl StartOffset {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StartOffset::Earliest => "earliest",
            StartOffset::Latest => "latest",
        }
    }

    fn read(node: &ConfigNode, problems: &mut Problems) -> Option<Self> {
        match node.string(problems)?.as_str() {
            "earliest" => Some(StartOffset::Earliest),
            "latest" => Some(StartOffset::Latest),
            other => {
                problems.at(
                    node,
                    format!("expected \"earliest\" or \"latest\", found \"{other}\""),
                );
                None
            }
        }
    }
}

/// `[stream.binders.<name>]` of a binder of type `kafka`.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `brokers`: bootstrap servers, comma-separated. Default `localhost:9092`.
    pub brokers: String,
    /// `auto-create-topics`: create missing topics (and DLQ topics). Default true.
    pub auto_create_topics: bool,
    /// `min-partition-count`: partitions of topics the binder creates. Default 1.
    pub min_partition_count: i32,
    /// `replication-factor`: replicas of topics the binder creates. Default 1.
    pub replication_factor: i32,
    /// `configuration`: librdkafka properties passed as they are (`security.protocol`,
    /// `sasl.*`, `ssl.*`, `client.id`, ...). Default none.
    pub configuration: BTreeMap<String, String>,
    /// `connection-timeout`: how long reaching the brokers at startup may take. Default 10s.
    pub connection_timeout: Duration,
    /// `start-offset`: where consumers without committed offsets start, unless their binding
    /// says otherwise. Default: `earliest` for groups, `latest` for anonymous consumers.
    pub start_offset: Option<StartOffset>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let configuration: BTreeMap<&String, String> = self
            .configuration
            .iter()
            .map(|(k, v)| (k, display_value(k, v)))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &redact_uri(&self.brokers))
            .field("auto_create_topics", &self.auto_create_topics)
            .field("min_partition_count", &self.min_partition_count)
            .field("replication_factor", &self.replication_factor)
            .field("configuration", &configuration)
            .field("connection_timeout", &self.connection_timeout)
            .field("start_offset", &self.start_offset)
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "localhost:9092".to_owned(),
            auto_create_topics: true,
            min_partition_count: 1,
            replication_factor: 1,
            configuration: BTreeMap::new(),
            connection_timeout: Duration::from_secs(10),
            start_offset: None,
        }
    }
}

impl KafkaSettings {
    /// Reads the binder's table, reporting wrong keys.
    pub fn read(node: Option<&ConfigNode>, problems: &mut Problems) -> Self {
        let mut settings = KafkaSettings::default();
        let Some(table) = node.and_then(|n| n.table(BINDER_KEYS, problems)) else {
            return settings;
        };
        for (name, node) in table {
            match name.as_str() {
                "brokers" => {
                    if let Some(list) = node.string_list(problems) {
                        if list.is_empty() {
                            problems.at(
                                &node,
                                "expected at least one broker, such as \"localhost:9092\"",
                            );
                        } else {
                            settings.brokers = list.join(",");
                        }
                    }
                }
                "auto-create-topics" => {
                    settings.auto_create_topics = node.boolean(problems).unwrap_or(true)
                }
                "min-partition-count" => {
                    settings.min_partition_count = node
                        .integer_in(1, i32::MAX.into(), problems)
                        .and_then(|n| i32::try_from(n).ok())
                        .unwrap_or(1)
                }
                "replication-factor" => {
                    settings.replication_factor = node
                        .integer_in(1, i32::MAX.into(), problems)
                        .and_then(|n| i32::try_from(n).ok())
                        .unwrap_or(1)
                }
                "connection-timeout" => {
                    settings.connection_timeout = node
                        .duration(problems)
                        .unwrap_or(settings.connection_timeout)
                }
                "start-offset" => settings.start_offset = StartOffset::read(&node, problems),
                "configuration" => {
                    for (key, value) in node.entries(problems).unwrap_or_default() {
                        if let Some(text) = value.scalar_text(problems) {
                            if key == "bootstrap.servers"
                                || key == "group.id"
                                || key == "enable.auto.offset.store"
                            {
                                problems.at(&value, format!("`{key}` is set by the binder; use `brokers` or the binding's `group`"));
                            } else if let Some(reason) = refused_setting(&key, &text) {
                                problems.at(&value, reason);
                            } else {
                                settings.configuration.insert(key, text);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        settings
    }
}

/// Why bindery refuses a librdkafka setting, if it does: one that would let the broker lose or
/// reorder what bindery confirmed, or let a send wait forever without failing. Values are read
/// as librdkafka reads them.
pub(crate) fn refused_setting(key: &str, value: &str) -> Option<String> {
    let value = value.trim().to_ascii_lowercase();
    match key {
        "acks" | "request.required.acks" if value != "all" && integer(&value) != Some(-1) => {
            Some(format!(
                "`{key} = {value}` would let the broker lose confirmed messages; bindery confirms an input only when its outputs are on every in-sync replica: remove it or set \"all\""
            ))
        }
        "enable.idempotence" if matches!(value.as_str(), "false" | "f" | "0") => Some(format!(
            "`enable.idempotence = {value}` would let retried sends be duplicated or reordered; remove it"
        )),
        "message.timeout.ms" | "delivery.timeout.ms" if integer(&value) == Some(0) => Some(format!(
            "`{key} = {value}` lets a send wait forever for a broker that does not answer, so it never fails and is never reported; remove it (bindery's default is 30000) or set a bound"
        )),
        _ => None,
    }
}

/// An integer as librdkafka reads one: C's `strtol` with base 0 (`0x` for hexadecimal, a
/// leading `0` for octal) on the longest prefix that is a number, the rest ignored, then cast
/// to a C `int`. `None` when no digit starts the text.
fn integer(text: &str) -> Option<i64> {
    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let hex = rest
        .strip_prefix("0x")
        .or_else(|| rest.strip_prefix("0X"))
        .filter(|digits| digits.starts_with(|c: char| c.is_ascii_hexdigit()));
    let (radix, digits) = match hex {
        Some(digits) => (16, digits),
        None if rest.starts_with('0') => (8, rest),
        None => (10, rest),
    };
    let mut value: i64 = 0;
    let mut any = false;
    for digit in digits.chars().map_while(|c| c.to_digit(radix)) {
        any = true;
        value = value
            .saturating_mul(i64::from(radix))
            .saturating_add(i64::from(digit));
    }
    let value = if negative { -value } else { value };
    // C's `long` to `int`: the low 32 bits.
    any.then_some(i64::from(value as i32))
}

/// `[stream.kafka.bindings.<binding>.consumer]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaConsumerSettings {
    /// `start-offset`: where the group starts when it has no committed offset.
    pub start_offset: Option<StartOffset>,
}

impl KafkaConsumerSettings {
    /// Reads a binding's consumer section, reporting wrong keys.
    pub fn read(node: Option<&ConfigNode>, problems: &mut Problems) -> Self {
        let mut settings = KafkaConsumerSettings::default();
        let Some(table) = node.and_then(|n| n.table(CONSUMER_KEYS, problems)) else {
            return settings;
        };
        if let Some(node) = table.get("start-offset") {
            settings.start_offset = StartOffset::read(node, problems);
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_credentials_written_in_the_brokers() {
        let settings = KafkaSettings {
            brokers: "sasl://app:hunter2@kafka-1:9093".to_owned(),
            ..KafkaSettings::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("kafka-1:9093"), "{shown}");
    }

    #[test]
    fn settings_are_refused_as_librdkafka_reads_them() {
        for (key, value) in [
            ("acks", "1"),
            ("acks", "0"),
            ("request.required.acks", " 1 "),
            ("enable.idempotence", "False"),
            ("enable.idempotence", "f"),
            ("enable.idempotence", "0"),
            ("message.timeout.ms", "0"),
            ("message.timeout.ms", "00"),
            ("message.timeout.ms", "0x0"),
            ("delivery.timeout.ms", "-0"),
            ("message.timeout.ms", "0ms"),
            ("message.timeout.ms", "0.5"),
            ("message.timeout.ms", "08"),
            ("message.timeout.ms", "4294967296"),
        ] {
            assert!(refused_setting(key, value).is_some(), "{key} = {value}");
        }
        for (key, value) in [
            ("acks", "all"),
            ("acks", " ALL "),
            ("acks", "-1"),
            ("request.required.acks", "-1"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", "30000"),
            ("message.timeout.ms", "010"),
            ("delivery.timeout.ms", "0x10"),
            ("linger.ms", "0"),
        ] {
            assert!(refused_setting(key, value).is_none(), "{key} = {value}");
        }
    }
}
