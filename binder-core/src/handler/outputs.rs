//! What a handler returns: values turned into messages to send.

use std::any::{type_name, Any};
use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::{is_json, Failure, FailureKind, DEFAULT_CONTENT_TYPE};
use crate::message::header;
use crate::Message;

/// A binding's content type, as text and as the header value, shared by every message.
#[derive(Clone, Debug)]
pub(crate) struct ContentType {
    text: Text,
    header: Bytes,
}

/// A content type's text: the default is static, so copies of it cost no reference count.
#[derive(Clone, Debug)]
enum Text {
    Default,
    Shared(Arc<str>),
}

impl ContentType {
    pub(crate) fn new(text: impl Into<String>) -> Self {
        let text: String = text.into();
        // A static header value is shared without a reference count: the default costs
        // nothing per message, on any thread.
        match text.as_str() {
            DEFAULT_CONTENT_TYPE => ContentType {
                text: Text::Default,
                header: Bytes::from_static(DEFAULT_CONTENT_TYPE.as_bytes()),
            },
            _ => ContentType {
                header: Bytes::from(text.clone()),
                text: Text::Shared(text.into()),
            },
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        match &self.text {
            Text::Default => DEFAULT_CONTENT_TYPE,
            Text::Shared(text) => text,
        }
    }
}

/// The messages of one handler call, in order.
pub(crate) type Batch = Vec<Message>;

thread_local! {
    /// An emptied list of outputs kept for the next handler call on this thread: the engine
    /// hands a call's outputs over and gives the list back, so a call on the engine's thread
    /// costs no allocation for its list.
    static SPARE_BATCH: Cell<Batch> = const { Cell::new(Vec::new()) };
}

/// A list for a call's outputs: the spare one of this thread, or a new one.
fn spare_batch() -> Batch {
    SPARE_BATCH.try_with(Cell::take).unwrap_or_default()
}

/// Keeps `batch`, emptied, for the next call on this thread (a small one only).
pub(crate) fn give_back(mut batch: Batch) {
    if batch.capacity() == 0 || batch.capacity() > 16 {
        return;
    }
    batch.clear();
    let _ = SPARE_BATCH.try_with(|spare| spare.set(batch));
}

/// Messages produced by one handler call, not yet sent.
#[derive(Debug)]
pub struct Outputs {
    content_type: ContentType,
    messages: Batch,
}

impl Outputs {
    /// No messages yet; values will be encoded as `content_type`.
    pub fn new(content_type: impl Into<String>) -> Self {
        Self::encoded_as(ContentType::new(content_type))
    }

    pub(crate) fn encoded_as(content_type: ContentType) -> Self {
        Outputs {
            content_type,
            messages: spare_batch(),
        }
    }

    /// The content type values are encoded as.
    pub fn content_type(&self) -> &str {
        self.content_type.as_str()
    }

    /// Adds a message, ready to send.
    pub fn push(&mut self, message: Message) {
        self.messages.push(message);
    }

    /// The messages, in the order they were produced.
    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }

    /// The messages, in the order they were produced, as the engine sends them.
    pub(crate) fn into_batch(self) -> Batch {
        self.messages
    }

    /// How many messages there are.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// A handler's return value, turned into zero or more messages (or a failure).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be returned from a stream function",
    label = "not accepted as a return value",
    note = "accepted: `()`, a type that implements `serde::Serialize` (`Encoded<T>` when written by hand), `Message<T>`, `String`, `bytes::Bytes`, `Option<T>`, `Vec<T>` and `Result<T, E>` of these, where `E: Display`"
)]
pub trait IntoOutputs: Send {
    /// Adds the messages this value stands for to `outputs`.
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure>;
}

/// A payload type turned into bytes for sending.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the payload of an outgoing `Message`",
    note = "accepted payloads: `Encoded<T>` for `T: serde::Serialize`, `String`, `&'static str`, `bytes::Bytes`, `Vec<u8>`"
)]
pub trait IntoPayload: Send {
    /// The bytes, and the content type to set when the message has none (`None`: the
    /// binding's content type).
    fn into_payload(self, content_type: &str) -> Result<(Bytes, Option<&'static str>), Failure>;
}

/// A value encoded by content type (JSON by default). `#[stream_function]` wraps plain return
/// values in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encoded<T>(pub T);

impl<T: Serialize + Send> IntoPayload for Encoded<T> {
    fn into_payload(self, content_type: &str) -> Result<(Bytes, Option<&'static str>), Failure> {
        if !is_json(content_type) {
            return Err(Failure::encode::<T>(format_args!(
                "content type `{content_type}` carries no structured value; return `String` or `Bytes`, or use a JSON content type"
            )));
        }
        let bytes = serde_json::to_vec(&self.0).map_err(Failure::encode::<T>)?;
        Ok((Bytes::from(bytes), None))
    }
}

impl IntoPayload for String {
    fn into_payload(self, _: &str) -> Result<(Bytes, Option<&'static str>), Failure> {
        Ok((Bytes::from(self), Some("text/plain; charset=utf-8")))
    }
}

impl IntoPayload for &'static str {
    fn into_payload(self, _: &str) -> Result<(Bytes, Option<&'static str>), Failure> {
        Ok((
            Bytes::from_static(self.as_bytes()),
            Some("text/plain; charset=utf-8"),
        ))
    }
}

impl IntoPayload for Bytes {
    fn into_payload(self, _: &str) -> Result<(Bytes, Option<&'static str>), Failure> {
        Ok((self, Some("application/octet-stream")))
    }
}

impl IntoPayload for Vec<u8> {
    fn into_payload(self, _: &str) -> Result<(Bytes, Option<&'static str>), Failure> {
        Ok((Bytes::from(self), Some("application/octet-stream")))
    }
}

impl<P: IntoPayload> IntoOutputs for Message<P> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        let (payload, mut headers, key) = self.into_parts();
        let (bytes, own_type) = payload.into_payload(outputs.content_type())?;
        if !headers.contains(header::CONTENT_TYPE) {
            let value = match own_type {
                Some(own) => Bytes::from_static(own.as_bytes()),
                None => outputs.content_type.header.clone(),
            };
            headers.set_static(header::CONTENT_TYPE, value);
        }
        outputs.push(Message::from_parts(bytes, headers, key));
        Ok(())
    }
}

macro_rules! single_payload_outputs {
    ($($ty:ty),*) => {$(
        impl IntoOutputs for $ty {
            fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
                Message::new(self).into_outputs(outputs)
            }
        }
    )*};
}
single_payload_outputs!(String, &'static str, Bytes);

impl<T: Serialize + Send> IntoOutputs for Encoded<T> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        Message::new(self).into_outputs(outputs)
    }
}

impl IntoOutputs for () {
    fn into_outputs(self, _: &mut Outputs) -> Result<(), Failure> {
        Ok(())
    }
}

impl<O: IntoOutputs> IntoOutputs for Option<O> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        match self {
            Some(value) => value.into_outputs(outputs),
            None => Ok(()),
        }
    }
}

impl<O: IntoOutputs> IntoOutputs for Vec<O> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        self.into_iter()
            .try_for_each(|value| value.into_outputs(outputs))
    }
}

/// An `Err` is a failure of the handler, retried and then dead-lettered; an `Err` that is a
/// [`Failure`] already keeps its kind (so one of kind [`FailureKind::Decode`] is not retried).
/// A [`crate::Error`] from a send that did not get through (a `StreamBridge` send inside the
/// handler) is of kind [`FailureKind::Send`]: retried until it gets through, as outputs are.
impl<O: IntoOutputs, E: fmt::Display + Send + 'static> IntoOutputs for Result<O, E> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        match self {
            Ok(value) => value.into_outputs(outputs),
            Err(error) => Err(into_failure(error)),
        }
    }
}

fn into_failure<E: fmt::Display + 'static>(error: E) -> Failure {
    let mut error = Some(error);
    let failure = (&mut error as &mut dyn Any)
        .downcast_mut::<Option<Failure>>()
        .and_then(Option::take);
    if let Some(failure) = failure {
        return failure;
    }
    // A send through the bridge that did not get through (the broker down, a destination
    // nobody subscribes to yet) is a send failure: the message is tried again until it gets
    // through or the application stops, never dropped after `max-attempts`.
    let send_failed = (&error as &dyn Any)
        .downcast_ref::<Option<crate::Error>>()
        .and_then(Option::as_ref)
        .is_some_and(|error| {
            matches!(
                error,
                crate::Error::Binder { .. } | crate::Error::ShuttingDown
            )
        });
    let kind = match send_failed {
        true => FailureKind::Send,
        false => FailureKind::Handler,
    };
    Failure::new(
        kind,
        type_name::<E>(),
        error.map(|e| e.to_string()).unwrap_or_default(),
    )
}

/// Messages collected already, as a hand-written handler returns them.
impl IntoOutputs for Outputs {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        if outputs.messages.is_empty() {
            outputs.messages = self.messages;
        } else {
            outputs.messages.extend(self.messages);
        }
        Ok(())
    }
}
