//! What a handler takes: arguments extracted from the incoming message or its context.

use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::{is_json, Context, Failure};
use crate::bridge::StreamBridge;
use crate::{AppConfig, Headers, Message};

/// A handler argument taken from the incoming message or its context.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a stream function",
    label = "not accepted as an argument",
    note = "accepted: a payload type that implements `serde::Deserialize` (`Decoded<T>` when written by hand), `Message<T>`, `Arc<Message>`, `String`, `bytes::Bytes`, `Vec<u8>`, `Headers`, `StreamBridge`, `AppConfig`"
)]
pub trait FromMessage: Sized + Send + 'static {
    /// Whether the value can show the message's headers. Before calling a handler that takes
    /// such an argument, the binding sets `x-correlation-id` on an input that arrived without
    /// one, which costs a copy of the message while its binder still holds it; arguments taken
    /// from the payload or the context alone say `false` and spare their handlers that copy.
    /// Keep the default, `true`, for an argument that reads headers.
    ///
    /// ```
    /// use bindery_core::{Context, Failure, FromMessage, Message};
    /// /// The size of the payload, in bytes.
    /// struct PayloadSize(usize);
    /// impl FromMessage for PayloadSize {
    ///     const READS_HEADERS: bool = false;
    ///     fn from_message(message: &Message, _: &Context) -> Result<Self, Failure> {
    ///         Ok(PayloadSize(message.payload().len()))
    ///     }
    /// }
    /// ```
    const READS_HEADERS: bool = true;

    /// Takes the value from `message`; a [`FailureKind::Decode`](super::FailureKind::Decode) failure is not retried.
    fn from_message(message: &Message, context: &Context) -> Result<Self, Failure>;

    /// Takes the value from the message as the runtime holds it, shared; what a handler call
    /// uses. The default takes it from the message itself.
    fn from_shared(message: &Arc<Message>, context: &Context) -> Result<Self, Failure> {
        Self::from_message(message, context)
    }
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
            const READS_HEADERS: bool = false;

            fn from_message(message: &Message, context: &Context) -> Result<Self, Failure> {
                <$ty as FromPayload>::from_payload(message.payload(), context.content_type_of(message))
            }
        }
    )*};
}
payload_arguments!(Bytes, Vec<u8>, String);

impl<T: DeserializeOwned + Send + 'static> FromMessage for Decoded<T> {
    const READS_HEADERS: bool = false;

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

/// The message as received, shared rather than copied.
impl FromMessage for Arc<Message> {
    fn from_message(message: &Message, _: &Context) -> Result<Self, Failure> {
        Ok(Arc::new(message.clone()))
    }

    fn from_shared(message: &Arc<Message>, _: &Context) -> Result<Self, Failure> {
        Ok(message.clone())
    }
}

impl FromMessage for Context {
    const READS_HEADERS: bool = false;

    fn from_message(_: &Message, context: &Context) -> Result<Self, Failure> {
        Ok(context.clone())
    }
}

impl FromMessage for Headers {
    fn from_message(message: &Message, _: &Context) -> Result<Self, Failure> {
        Ok(message.headers().clone())
    }
}

impl FromMessage for StreamBridge {
    const READS_HEADERS: bool = false;

    fn from_message(_: &Message, context: &Context) -> Result<Self, Failure> {
        Ok(context.bridge().clone())
    }
}

impl FromMessage for AppConfig {
    const READS_HEADERS: bool = false;

    fn from_message(_: &Message, context: &Context) -> Result<Self, Failure> {
        Ok(context.config().clone())
    }
}
