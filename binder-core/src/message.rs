//! The message model: a payload with headers and an optional key.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

/// Names of the headers bindery itself reads or writes.
pub mod header {
    /// The payload's content type, such as `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// A unique id given to every message bindery sends, used in logs.
    pub const MESSAGE_ID: &str = "x-message-id";
    /// Carried from an input message to everything produced while handling it.
    pub const CORRELATION_ID: &str = "x-correlation-id";
    /// On a dead-lettered message: the text of the last failure.
    pub const EXCEPTION_MESSAGE: &str = "x-exception-message";
    /// On a dead-lettered message: the type of the last failure.
    pub const EXCEPTION_TYPE: &str = "x-exception-type";
    /// On a dead-lettered message: the destination it was consumed from.
    pub const ORIGINAL_DESTINATION: &str = "x-original-destination";
    /// On a dead-lettered message: how many times the handler was tried.
    pub const ATTEMPTS: &str = "x-attempts";
    /// The W3C trace context's parent (`00-<trace id>-<span id>-<flags>`), carried from an
    /// input message to everything produced while handling it.
    pub const TRACEPARENT: &str = "traceparent";
    /// The W3C trace state, carried with the `traceparent` it belongs to.
    pub const TRACESTATE: &str = "tracestate";
}

/// Message headers: names mapped to byte values, read as bytes or as text.
///
/// ```
/// use bindery_core::Headers;
/// let mut headers = Headers::new();
/// headers.insert("tenant", "acme");
/// assert_eq!(headers.get_str("tenant"), Some("acme"));
/// ```
#[derive(Clone, Default)]
pub struct Headers {
    // The headers bindery puts on nearly every message (content type, message and correlation
    // id) are kept inline, in the order of `OWN`: a message bindery sends allocates nothing for
    // its headers. Such messages are mostly freed on another thread than the one that made
    // them, where every allocation of their own is what costs most.
    own: [Option<Bytes>; OWN.len()],
    // Any other headers, shared until changed: messages are cloned on every hop (fan-out,
    // retries, dead letters), headers rarely change after they were set. Kept sorted by name;
    // a message carries a few headers, so a sorted vector beats a tree.
    others: Option<Arc<Entries>>,
}

/// The headers kept inline, sorted by name.
const OWN: [&str; 3] = [
    header::CONTENT_TYPE,
    header::CORRELATION_ID,
    header::MESSAGE_ID,
];

type Entries = SmallVec<[(Name, Bytes); 4]>;

/// A header name: bindery's own are static and cost no allocation.
type Name = Cow<'static, str>;

/// Where `name` is kept inline, if it is one of bindery's own headers. Headers are looked up
/// several times for every message: told apart by length and first byte, a name is compared
/// once, and a constant name costs nothing once inlined.
#[inline(always)]
fn own_index(name: &str) -> Option<usize> {
    let index = match (name.len(), name.as_bytes().first()) {
        (12, Some(b'c')) => 0,
        (16, Some(b'x')) => 1,
        (12, Some(b'x')) => 2,
        _ => return None,
    };
    (OWN[index] == name).then_some(index)
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    fn others(&self) -> &[(Name, Bytes)] {
        self.others.as_deref().map_or(&[], SmallVec::as_slice)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.others()
            .binary_search_by(|(entry, _)| entry.as_ref().cmp(name))
    }

    /// The value of `name` as bytes.
    #[inline]
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        if let Some(index) = own_index(name) {
            return self.own[index].as_ref();
        }
        let index = self.position(name).ok()?;
        Some(&self.others()[index].1)
    }

    /// The message's id ([`header::MESSAGE_ID`]) when it is one bindery keeps: non-empty
    /// UTF-8 text. A message received without one is given a new one (Kafka records are named
    /// by topic, partition and offset), so an empty or binary id never stands for two messages.
    ///
    /// ```
    /// use bindery_core::{header, Headers};
    /// let mut headers = Headers::new();
    /// headers.insert(header::MESSAGE_ID, "");
    /// assert_eq!(headers.message_id(), None);
    /// headers.insert(header::MESSAGE_ID, "order-1");
    /// assert_eq!(headers.message_id().map(|id| &id[..]), Some(&b"order-1"[..]));
    /// ```
    #[inline]
    pub fn message_id(&self) -> Option<&Bytes> {
        self.get(header::MESSAGE_ID)
            .filter(|id| !id.is_empty() && std::str::from_utf8(id).is_ok())
    }

    /// The value of `name` as text, when it is valid UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether `name` is present.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets `name` to `value` (copied), replacing any earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl AsRef<[u8]>) {
        self.set(
            Cow::Owned(name.into()),
            Bytes::copy_from_slice(value.as_ref()),
        );
    }

    /// Sets `name` to `value` without copying it.
    pub fn insert_bytes(&mut self, name: impl Into<String>, value: Bytes) {
        self.set(Cow::Owned(name.into()), value);
    }

    /// Sets `name`, borrowed (from a client's received record, say), to `value` without
    /// copying the value: for binders, which do so for every header of every message
    /// received. bindery's own headers, on most messages, cost no copy of their name.
    ///
    /// ```
    /// use bindery_core::{header, Headers};
    /// let received = String::from("x-message-id");
    /// let mut headers = Headers::new();
    /// headers.insert_borrowed(&received, bytes::Bytes::from_static(b"order-1"));
    /// assert_eq!(headers.get_str(header::MESSAGE_ID), Some("order-1"));
    /// ```
    pub fn insert_borrowed(&mut self, name: &str, value: Bytes) {
        match own_index(name) {
            Some(index) => self.own[index] = Some(value),
            None => self.set(Cow::Owned(name.to_owned()), value),
        }
    }

    /// Sets `name`, a constant such as one of [`header`]'s, to `value`, copying neither: for
    /// binders, which set headers on every message received.
    ///
    /// ```
    /// use bindery_core::{header, Headers};
    /// let mut headers = Headers::new();
    /// headers.set_static(header::MESSAGE_ID, bytes::Bytes::from_static(b"orders-0@42"));
    /// assert_eq!(headers.get_str(header::MESSAGE_ID), Some("orders-0@42"));
    /// ```
    #[inline(always)]
    pub fn set_static(&mut self, name: &'static str, value: Bytes) {
        // Inlined, a constant name finds its slot without a comparison at run time.
        match own_index(name) {
            Some(index) => self.own[index] = Some(value),
            None => self.set(Cow::Borrowed(name), value),
        }
    }

    #[inline]
    fn set(&mut self, name: Name, value: Bytes) {
        if let Some(index) = own_index(&name) {
            self.own[index] = Some(value);
            return;
        }
        let position = self.position(&name);
        let others = Arc::make_mut(self.others.get_or_insert_with(|| Arc::new(Entries::new())));
        match position {
            Ok(index) => others[index].1 = value,
            Err(index) => others.insert(index, (name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<Bytes> {
        if let Some(index) = own_index(name) {
            return self.own[index].take();
        }
        let index = self.position(name).ok()?;
        let others = Arc::make_mut(self.others.as_mut()?);
        Some(others.remove(index).1)
    }

    /// Every header, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        let own = OWN
            .iter()
            .zip(&self.own)
            .filter_map(|(name, value)| Some((*name, value.as_ref()?)));
        let others = self
            .others()
            .iter()
            .map(|(name, value)| (name.as_ref(), value));
        InNameOrder {
            own: own.peekable(),
            others: others.peekable(),
        }
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.own.iter().flatten().count() + self.others().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Two name-ordered sequences of headers merged into one.
struct InNameOrder<A: Iterator, B: Iterator> {
    own: std::iter::Peekable<A>,
    others: std::iter::Peekable<B>,
}

impl<'a, A, B> Iterator for InNameOrder<A, B>
where
    A: Iterator<Item = (&'a str, &'a Bytes)>,
    B: Iterator<Item = (&'a str, &'a Bytes)>,
{
    type Item = (&'a str, &'a Bytes);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.own.peek(), self.others.peek()) {
            (Some((own, _)), Some((other, _))) if other < own => self.others.next(),
            (Some(_), _) => self.own.next(),
            (None, _) => self.others.next(),
        }
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.own == other.own && self.others() == other.others()
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.iter() {
            match std::str::from_utf8(value) {
                Ok(text) => map.entry(&name, &text),
                Err(_) => map.entry(&name, value),
            };
        }
        map.finish()
    }
}

impl<K: Into<String>, V: AsRef<[u8]>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (k, v) in iter {
            headers.insert(k, v);
        }
        headers
    }
}

/// A payload with headers and an optional key.
///
/// `Message<Bytes>` (the default) is what travels through binders; handlers may take or
/// return `Message<T>` for any payload type to read or set headers and the key.
///
/// ```
/// use bindery_core::Message;
/// let message = Message::builder("hello".to_string())
///     .header("tenant", "acme")
///     .key("customer-7")
///     .build();
/// assert_eq!(message.headers().get_str("tenant"), Some("acme"));
/// assert_eq!(message.key_str(), Some("customer-7"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Message<T = Bytes> {
    payload: T,
    headers: Headers,
    key: Option<Bytes>,
    partition: Option<u32>,
}

impl<T> Message<T> {
    /// A message with no headers and no key.
    pub fn new(payload: T) -> Self {
        Message {
            payload,
            headers: Headers::new(),
            key: None,
            partition: None,
        }
    }

    /// Starts a message to which headers and a key can be added.
    pub fn builder(payload: T) -> MessageBuilder<T> {
        MessageBuilder {
            message: Message::new(payload),
        }
    }

    /// The payload.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The payload, to change it in place.
    pub fn payload_mut(&mut self) -> &mut T {
        &mut self.payload
    }

    /// Takes the payload, dropping headers and key.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, to change them in place.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The key (Kafka record key, RabbitMQ routing key), if any.
    pub fn key(&self) -> Option<&Bytes> {
        self.key.as_ref()
    }

    /// The key as text, when there is one and it is valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// Sets or clears the key.
    pub fn set_key(&mut self, key: Option<Bytes>) {
        self.key = key;
    }

    /// The partition a partitioned output chose for this message (see
    /// `producer.partition-count`); `None` for a destination that is not partitioned.
    ///
    /// The core sets it on every message it sends, from the message's key; a binder routes
    /// the message by it (a Kafka partition, a RabbitMQ routing key `<destination>-<n>`).
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// Sets or clears the partition; the core overwrites it on every message it sends.
    pub fn set_partition(&mut self, partition: Option<u32>) {
        self.partition = partition;
    }

    /// The same headers, key and partition around another payload.
    pub fn map_payload<U>(self, f: impl FnOnce(T) -> U) -> Message<U> {
        Message {
            payload: f(self.payload),
            headers: self.headers,
            key: self.key,
            partition: self.partition,
        }
    }

    /// Splits the message into payload, headers and key.
    pub fn into_parts(self) -> (T, Headers, Option<Bytes>) {
        (self.payload, self.headers, self.key)
    }

    /// Puts a message together from its parts.
    pub fn from_parts(payload: T, headers: Headers, key: Option<Bytes>) -> Self {
        Message {
            payload,
            headers,
            key,
            partition: None,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("payload", &self.payload)
            .field("headers", &self.headers)
            .field(
                "key",
                &self
                    .key_str()
                    .map(str::to_owned)
                    .or_else(|| self.key.as_ref().map(|k| format!("{k:?}"))),
            )
            .field("partition", &self.partition)
            .finish()
    }
}

/// Builds a [`Message`] with headers and a key; see [`Message::builder`].
#[derive(Debug)]
pub struct MessageBuilder<T> {
    message: Message<T>,
}

impl<T> MessageBuilder<T> {
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.message.headers.insert(name, value);
        self
    }

    /// Sets the key.
    pub fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.message.key = Some(Bytes::copy_from_slice(key.as_ref()));
        self
    }

    /// Sets every header at once, replacing those added before.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.message.headers = headers;
        self
    }

    /// The finished message.
    pub fn build(self) -> Message<T> {
        self.message
    }
}

impl Message<Bytes> {
    /// Decodes the payload as JSON.
    ///
    /// ```
    /// let message = bindery_core::Message::new(bytes::Bytes::from_static(br#"{"id":7}"#));
    /// let value: serde_json::Value = message.json().unwrap();
    /// assert_eq!(value["id"], 7);
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The payload as text, when it is valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_headers_are_found_by_their_names_and_no_other() {
        for (index, name) in OWN.iter().enumerate() {
            assert_eq!(own_index(name), Some(index), "{name}");
        }
        for other in [
            "content-typE",
            "x-message-iD",
            "x-correlation-iD",
            "c",
            "",
            "xx-message-id",
            "x-messages-id",
            "tracestate",
        ] {
            assert_eq!(own_index(other), None, "{other}");
        }
        let mut headers = Headers::new();
        headers.insert("x-message-iD", "not ours");
        assert_eq!(headers.get(header::MESSAGE_ID), None);
        assert_eq!(headers.get_str("x-message-iD"), Some("not ours"));
    }

    #[test]
    fn headers_keep_name_order_replace_and_remove() {
        let mut headers = Headers::new();
        headers.insert("tenant", "acme");
        headers.set_static(header::CONTENT_TYPE, Bytes::from_static(b"text/plain"));
        headers.insert("b-side", "1");
        headers.insert("tenant", "globex");
        let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["b-side", "content-type", "tenant"]);
        headers.set_static(header::MESSAGE_ID, Bytes::from_static(b"m-1"));
        headers.insert("z-last", "z");
        headers.insert("x-a", "a");
        let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "b-side",
                "content-type",
                "tenant",
                "x-a",
                "x-message-id",
                "z-last"
            ]
        );
        assert_eq!(headers.remove("x-message-id").as_deref(), Some(&b"m-1"[..]));
        assert_eq!(headers.remove("z-last").as_deref(), Some(&b"z"[..]));
        assert_eq!(headers.remove("x-a").as_deref(), Some(&b"a"[..]));
        assert_eq!(headers.get_str("tenant"), Some("globex"), "insert replaces");
        assert_eq!(headers.len(), 3);

        let shared = headers.clone();
        assert_eq!(headers.remove("b-side").as_deref(), Some(&b"1"[..]));
        assert_eq!(headers.remove("b-side"), None);
        assert_eq!(shared.len(), 3, "a clone keeps what the original changes");

        headers.remove("tenant");
        headers.remove("content-type");
        assert!(headers.is_empty());
        assert_eq!(headers, Headers::new(), "emptied equals never filled");
        assert_eq!(
            format!("{shared:?}"),
            r#"{"b-side": "1", "content-type": "text/plain", "tenant": "globex"}"#
        );
    }

    #[test]
    fn headers_kept_inline_are_in_name_order_among_the_others() {
        assert!(
            OWN.windows(2).all(|pair| pair[0] < pair[1]),
            "OWN is sorted"
        );
        let mut headers = Headers::new();
        for name in ["x-zeta", "x-d", "x-c", "a", OWN[0], OWN[1], OWN[2]] {
            headers.insert(name, name);
        }
        let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert_eq!(headers.len(), 7);
        for (name, value) in headers.iter() {
            assert_eq!(value.as_ref(), name.as_bytes());
        }
    }

    #[test]
    fn owned_and_static_names_are_the_same_header() {
        let mut owned = Headers::new();
        owned.insert(header::MESSAGE_ID, "m-1");
        let mut fixed = Headers::new();
        fixed.set_static(header::MESSAGE_ID, Bytes::from_static(b"m-1"));
        assert_eq!(owned, fixed);
        assert!(fixed.contains("x-message-id"));
    }
}
