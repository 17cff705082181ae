//! How handler arguments are taken from a message and how return values become messages.
//!
//! Arguments implement [`FromMessage`], return values [`IntoOutputs`]; any `Fn` whose arguments
//! and return value do is a [`Handler`]. `#[stream_function]` only picks the wrappers
//! ([`Decoded`], [`Encoded`]) for plain payload types; written by hand it looks like this:
//!
//! ```
//! use bindery_core::{Decoded, Encoded, StreamFunction};
//! # #[derive(serde::Deserialize)] struct Order { id: u64 }
//! # #[derive(serde::Serialize)] struct Invoice { order_id: u64 }
//! let bill = StreamFunction::function("bill", |order: Decoded<Order>| async move {
//!     Encoded(Invoice { order_id: order.0.id })
//! })
//! .input("orders")
//! .output("invoices");
//! ```

use std::any::type_name;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::message::header;
use crate::runtime::StreamBridge;
use crate::{AppConfig, Headers, Message};

/// Why handling a message failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    kind: FailureKind,
    type_name: String,
    message: String,
}

/// The kinds of [`Failure`]: they decide whether a retry can help.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The payload could not be decoded into the handler's argument: retrying cannot help.
    Decode,
    /// The handler returned an error.
    Handler,
    /// The handler panicked.
    Panic,
    /// The handler's return value could not be encoded: retrying cannot help.
    Encode,
    /// An output could not be sent or was not confirmed.
    Send,
}

impl Failure {
    /// A failure of `kind`, reported as `type_name` with `message`.
    pub fn new(
        kind: FailureKind,
        type_name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Failure {
            kind,
            type_name: type_name.into(),
            message: message.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The error's type, as in the `x-exception-type` header.
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// The error's text, as in the `x-exception-message` header.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether handling the message again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            FailureKind::Decode | FailureKind::Encode => false,
            FailureKind::Handler | FailureKind::Panic | FailureKind::Send => true,
        }
    }

    pub(crate) fn panic(text: String) -> Self {
        Failure::new(FailureKind::Panic, "panic", text)
    }

    fn decode<T>(why: impl fmt::Display) -> Self {
        Failure::new(
            FailureKind::Decode,
            "bindery::DecodeError",
            format!("cannot decode the payload as `{}`: {why}", type_name::<T>()),
        )
    }

    fn encode<T>(why: impl fmt::Display) -> Self {
        Failure::new(
            FailureKind::Encode,
            "bindery::EncodeError",
            format!("cannot encode `{}`: {why}", type_name::<T>()),
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.type_name)
    }
}

/// What a handler can see besides the message: the bridge, the application's configuration and
/// the content types of its bindings. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Context {
    inner: Arc<ContextInner>,
}

#[derive(Debug)]
struct ContextInner {
    bridge: StreamBridge,
    config: AppConfig,
    input_content_type: Option<String>,
    output_content_type: String,
}

/// The content type used when neither the message nor the binding names one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

impl Context {
    pub(crate) fn new(
        bridge: StreamBridge,
        config: AppConfig,
        input_content_type: Option<String>,
        output_content_type: Option<String>,
    ) -> Self {
        Context {
            inner: Arc::new(ContextInner {
                bridge,
                config,
                input_content_type,
                output_content_type: output_content_type
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
            }),
        }
    }

    /// The bridge, to send to any destination.
    pub fn bridge(&self) -> &StreamBridge {
        &self.inner.bridge
    }

    /// The application's own configuration.
    pub fn config(&self) -> &AppConfig {
        &self.inner.config
    }

    fn content_type_of<'a>(&'a self, message: &'a Message) -> &'a str {
        message
            .headers()
            .get_str(header::CONTENT_TYPE)
            .or(self.inner.input_content_type.as_deref())
            .unwrap_or(DEFAULT_CONTENT_TYPE)
    }

    /// The content type values returned by the handler are encoded with.
    pub fn output_content_type(&self) -> &str {
        &self.inner.output_content_type
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// A handler argument taken from the incoming message or its context.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a stream function",
    label = "not accepted as an argument",
    note = "accepted: a payload type that implements `serde::Deserialize` (`Decoded<T>` when written by hand), `Message<T>`, `String`, `bytes::Bytes`, `Vec<u8>`, `Headers`, `StreamBridge`, `AppConfig`"
)]
pub trait FromMessage: Sized + Send + 'static {
    /// Takes the value from `message`; a [`FailureKind::Decode`] failure is not retried.
    fn from_message(message: &Message, context: &Context) -> Result<Self, Failure>;
}

/// A payload type taken from the raw bytes of a message, given its content type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the payload of an incoming `Message`",
    note = "accepted payloads: `Decoded<T>` for `T: serde::Deserialize`, `String`, `bytes::Bytes`, `Vec<u8>`"
)]
pub trait FromPayload: Sized + Send + 'static {
    /// Decodes the payload.
    fn from_payload(payload: &Bytes, content_type: &str) -> Result<Self, Failure>;
}

/// A payload decoded by content type (JSON by default). `#[stream_function]` wraps plain
/// payload arguments in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decoded<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromPayload for Decoded<T> {
    fn from_payload(payload: &Bytes, content_type: &str) -> Result<Self, Failure> {
        if !is_json(content_type) {
            return Err(Failure::decode::<T>(format_args!(
                "content type `{content_type}` carries no structured value; take `String` or `Bytes` instead"
            )));
        }
        serde_json::from_slice(payload)
            .map(Decoded)
            .map_err(Failure::decode::<T>)
    }
}

impl FromPayload for Bytes {
    fn from_payload(payload: &Bytes, _: &str) -> Result<Self, Failure> {
        Ok(payload.clone())
    }
}

impl FromPayload for Vec<u8> {
    fn from_payload(payload: &Bytes, _: &str) -> Result<Self, Failure> {
        Ok(payload.to_vec())
    }
}

impl FromPayload for String {
    fn from_payload(payload: &Bytes, _: &str) -> Result<Self, Failure> {
        String::from_utf8(payload.to_vec()).map_err(Failure::decode::<String>)
    }
}

macro_rules! payload_arguments {
    ($($ty:ty),*) => {$(
        impl FromMessage for $ty {
            fn from_message(message: &Message, context: &Context) -> Result<Self, Failure> {
                <$ty as FromPayload>::from_payload(message.payload(), context.content_type_of(message))
            }
        }
    )*};
}
payload_arguments!(Bytes, Vec<u8>, String);

impl<T: DeserializeOwned + Send + 'static> FromMessage for Decoded<T> {
    fn from_message(message: &Message, context: &Context) -> Result<Self, Failure> {
        Decoded::from_payload(message.payload(), context.content_type_of(message))
    }
}

impl<P: FromPayload> FromMessage for Message<P> {
    fn from_message(message: &Message, context: &Context) -> Result<Self, Failure> {
        let payload = P::from_payload(message.payload(), context.content_type_of(message))?;
        Ok(Message::from_parts(
            payload,
            message.headers().clone(),
            message.key().cloned(),
        ))
    }
}

impl FromMessage for Headers {
    fn from_message(message: &Message, _: &Context) -> Result<Self, Failure> {
        Ok(message.headers().clone())
    }
}

impl FromMessage for StreamBridge {
    fn from_message(_: &Message, context: &Context) -> Result<Self, Failure> {
        Ok(context.bridge().clone())
    }
}

impl FromMessage for AppConfig {
    fn from_message(_: &Message, context: &Context) -> Result<Self, Failure> {
        Ok(context.config().clone())
    }
}

/// Messages produced by one handler call, not yet sent.
#[derive(Debug)]
pub struct Outputs {
    content_type: String,
    messages: Vec<Message>,
}

impl Outputs {
    /// No messages yet; values will be encoded as `content_type`.
    pub fn new(content_type: impl Into<String>) -> Self {
        Outputs {
            content_type: content_type.into(),
            messages: Vec::new(),
        }
    }

    /// The content type values are encoded as.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// Adds a message, ready to send.
    pub fn push(&mut self, message: Message) {
        self.messages.push(message);
    }

    /// The messages, in the order they were produced.
    pub fn into_messages(self) -> Vec<Message> {
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
        let (bytes, own_type) = payload.into_payload(&outputs.content_type)?;
        if !headers.contains(header::CONTENT_TYPE) {
            headers.insert(
                header::CONTENT_TYPE,
                own_type.unwrap_or(&outputs.content_type),
            );
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

impl<O: IntoOutputs, E: fmt::Display + Send + 'static> IntoOutputs for Result<O, E> {
    fn into_outputs(self, outputs: &mut Outputs) -> Result<(), Failure> {
        match self {
            Ok(value) => value.into_outputs(outputs),
            Err(error) => Err(Failure::new(
                FailureKind::Handler,
                type_name::<E>(),
                error.to_string(),
            )),
        }
    }
}

/// The future a type-erased handler returns.
pub type HandlerFuture = BoxFuture<'static, Result<Outputs, Failure>>;

/// A function usable as a stream function: every argument implements [`FromMessage`], the
/// (awaited) return value implements [`IntoOutputs`]. `Args` only tells the impls apart.
#[diagnostic::on_unimplemented(
    message = "this function cannot be used as a stream function handler",
    note = "a handler is an `Fn` returning a future; its arguments implement `FromMessage` and its output `IntoOutputs`"
)]
pub trait Handler<Args>: Clone + Send + Sync + 'static {
    /// Takes the arguments from `message`, calls the function and collects its outputs.
    /// The message is shared, so a retry hands the same message over again without a copy.
    fn call(&self, message: Arc<Message>, context: Context) -> HandlerFuture;
}

macro_rules! impl_handler {
    ($($arg:ident),*) => {
        impl<F, Fut, O, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: Fn($($arg),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = O> + Send + 'static,
            O: IntoOutputs,
            $($arg: FromMessage,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn call(&self, message: Arc<Message>, context: Context) -> HandlerFuture {
                let handler = self.clone();
                Box::pin(async move {
                    $(let $arg = $arg::from_message(&message, &context)?;)*
                    drop(message);
                    let value = handler($($arg),*).await;
                    let mut outputs = Outputs::new(context.output_content_type());
                    value.into_outputs(&mut outputs)?;
                    Ok(outputs)
                })
            }
        }
    };
}

impl_handler!();
impl_handler!(A1);
impl_handler!(A1, A2);
impl_handler!(A1, A2, A3);
impl_handler!(A1, A2, A3, A4);
impl_handler!(A1, A2, A3, A4, A5);
impl_handler!(A1, A2, A3, A4, A5, A6);

/// A handler with its argument types erased, as the runtime stores it.
pub(crate) type ErasedHandler = Arc<dyn Fn(Arc<Message>, Context) -> HandlerFuture + Send + Sync>;

pub(crate) fn erase<Args, H: Handler<Args>>(handler: H) -> ErasedHandler {
    Arc::new(move |message, context| handler.call(message, context))
}
