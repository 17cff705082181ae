//! Between bindery messages and AMQP: headers ↔ the headers table, key ↔ routing key,
//! content type, message id and correlation id ↔ their AMQP properties.

use bindery_core::{header, Headers, Message};
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::DEAD_LETTER_EXCHANGE;

/// Carries the key of a message whose routing key is not its key (a dead letter, routed by
/// its queue's name).
pub(crate) const ORIGINAL_KEY: &str = "x-original-routing-key";

/// Marks a message published to a partition (routed by `<destination>-<n>`, so its routing
/// key is no key), with the partition; Spring Cloud Stream's name for it.
pub(crate) const PARTITION: &str = "scst_partition";

/// The longest AMQP short string (names, header names, routing keys, content types).
pub(crate) const SHORT_STRING_MAX: usize = 255;

/// Properties for publishing `message`: persistent, with its headers and ids. A header name
/// or content type longer than AMQP allows is refused with the reason, never a panic.
pub(crate) fn properties(message: &Message) -> Result<BasicProperties, String> {
    let mut table = FieldTable::default();
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    for (name, value) in message.headers().iter() {
        if name.len() > SHORT_STRING_MAX {
            return Err(format!(
                "header name `{}...` is {} bytes long; AMQP allows at most {SHORT_STRING_MAX}",
                name.chars().take(32).collect::<String>(),
                name.len()
            ));
        }
        let text = std::str::from_utf8(value).ok();
        match (name, text) {
            (header::CONTENT_TYPE, Some(text)) if text.len() <= SHORT_STRING_MAX => {
                properties = properties.with_content_type(ShortString::from(text))
            }
            (header::MESSAGE_ID, Some(text)) if text.len() <= SHORT_STRING_MAX => {
                properties = properties.with_message_id(ShortString::from(text))
            }
            (header::CORRELATION_ID, Some(text)) if text.len() <= SHORT_STRING_MAX => {
                properties = properties.with_correlation_id(ShortString::from(text))
            }
            _ => {
                table.insert(
                    ShortString::from(name),
                    AMQPValue::LongString(LongString::from(value.to_vec())),
                );
            }
        }
    }
    Ok(properties.with_headers(table))
}

/// The message a delivery carries. The routing key is the key unless it is the exchange's
/// own name, which the producer uses for messages without a key, or the message went to a
/// partition.
pub(crate) fn message(delivery: &lapin::message::Delivery) -> Message {
    let mut headers = Headers::new();
    let props = &delivery.properties;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            if let Some(bytes) = value_bytes(value) {
                headers.insert_borrowed(name.as_str(), bytes);
            }
        }
    }
    if let Some(content_type) = props.content_type() {
        headers.insert(header::CONTENT_TYPE, content_type.as_str());
    }
    if let Some(id) = props.message_id() {
        headers.insert(header::MESSAGE_ID, id.as_str());
    }
    if let Some(id) = props.correlation_id() {
        headers.insert(header::CORRELATION_ID, id.as_str());
    }
    let routing_key = delivery.routing_key.as_str();
    let exchange = delivery.exchange.as_str();
    let partition = headers.remove(PARTITION);
    let partitioned = partition.is_some_and(|partition| {
        std::str::from_utf8(&partition).is_ok_and(|n| routing_key == format!("{exchange}-{n}"))
    });
    let key = match headers.remove(ORIGINAL_KEY) {
        Some(key) => Some(key),
        None if exchange == DEAD_LETTER_EXCHANGE || partitioned => None,
        None => (!routing_key.is_empty() && routing_key != exchange)
            .then(|| Bytes::copy_from_slice(routing_key.as_bytes())),
    };
    Message::from_parts(Bytes::from(delivery.data.clone()), headers, key)
}

/// Header values other clients may have set with other AMQP types, as bytes.
fn value_bytes(value: &AMQPValue) -> Option<Bytes> {
    let text = match value {
        AMQPValue::LongString(s) => return Some(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::ByteArray(b) => return Some(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    };
    Some(Bytes::from(text))
}
