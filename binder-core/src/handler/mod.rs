//! Handlers: what they take ([`FromMessage`]), what they return ([`IntoOutputs`]), how their
//! failures are described ([`Failure`]), and the [`Handler`] trait tying them together.
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

mod arguments;
mod calls;
mod failure;
mod outputs;

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

pub use arguments::{Decoded, FromMessage, FromPayload};
pub use calls::HandlerCalls;
pub(crate) use failure::panic_text;
pub use failure::{Failure, FailureKind};
pub(crate) use outputs::{give_back, Batch, ContentType};
pub use outputs::{Encoded, IntoOutputs, IntoPayload, Outputs};

use crate::bridge::StreamBridge;
use crate::message::header;
use crate::{AppConfig, Message};

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
    output_content_type: ContentType,
}

/// The content type used when neither the message nor the binding names one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

impl Context {
    pub(crate) fn new(
        bridge: StreamBridge,
        config: AppConfig,
        input_content_type: Option<String>,
        output_content_type: Option<ContentType>,
    ) -> Self {
        Context {
            inner: Arc::new(ContextInner {
                bridge,
                config,
                input_content_type,
                output_content_type: output_content_type
                    .unwrap_or_else(|| ContentType::new(DEFAULT_CONTENT_TYPE)),
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

    pub(crate) fn content_type_of<'a>(&'a self, message: &'a Message) -> &'a str {
        message
            .headers()
            .get_str(header::CONTENT_TYPE)
            .or(self.inner.input_content_type.as_deref())
            .unwrap_or(DEFAULT_CONTENT_TYPE)
    }

    /// No messages yet, to be encoded with this binding's content type: what a hand-written
    /// handler taking `Message` and `Context` collects its outputs in.
    ///
    /// ```
    /// use bindery_core::{Context, Decoded, Failure, FromMessage, Message, Outputs};
    /// # #[derive(serde::Deserialize)] struct Order { id: u64 }
    /// async fn bill(message: Message, context: Context) -> Result<Outputs, Failure> {
    ///     let Decoded(order) = Decoded::<Order>::from_message(&message, &context)?;
    ///     let mut outputs = context.outputs();
    ///     outputs.push(Message::new(order.id.to_string().into()));
    ///     Ok(outputs)
    /// }
    /// ```
    pub fn outputs(&self) -> Outputs {
        Outputs::encoded_as(self.inner.output_content_type.clone())
    }

    /// The content type values returned by the handler are encoded with.
    pub fn output_content_type(&self) -> &str {
        self.inner.output_content_type.as_str()
    }
}

pub(crate) fn is_json(content_type: &str) -> bool {
    // Checked for every message; nearly always the default, spelled as bindery spells it.
    if content_type == DEFAULT_CONTENT_TYPE {
        return true;
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json")
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
    /// Whether any argument can show the input's headers ([`FromMessage::READS_HEADERS`]).
    const READS_HEADERS: bool = true;

    /// Takes the arguments from `message`, calls the function and collects its outputs.
    /// The message is shared, so a retry hands the same message over again without a copy.
    fn call(&self, message: Arc<Message>, context: Context) -> HandlerFuture;

    /// Calls of this handler made one after another, each in the allocation of the one before:
    /// how a binding calls it, message after message. By default each call is boxed, as
    /// [`call`](Self::call) makes it.
    fn calls(&self) -> Box<dyn HandlerCalls> {
        let handler = self.clone();
        Box::new(calls::Boxed::new(move |message, context| {
            handler.call(message, context)
        }))
    }
}

/// The body of a handler call: the arguments taken from the message, the function called, its
/// value turned into outputs.
macro_rules! handler_call {
    ($handler:ident, $message:ident, $context:ident; $($arg:ident),*) => {
        async move {
            $(let $arg = $arg::from_shared(&$message, &$context)?;)*
            drop($message);
            let value = $handler($($arg),*).await;
            let mut outputs = $context.outputs();
            value.into_outputs(&mut outputs)?;
            Ok(outputs)
        }
    };
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
            const READS_HEADERS: bool = false $(|| $arg::READS_HEADERS)*;

            #[allow(non_snake_case, unused_variables)]
            fn call(&self, message: Arc<Message>, context: Context) -> HandlerFuture {
                let handler = self.clone();
                Box::pin(handler_call!(handler, message, context; $($arg),*))
            }

            #[allow(non_snake_case, unused_variables)]
            fn calls(&self) -> Box<dyn HandlerCalls> {
                let handler = self.clone();
                Box::new(calls::Reused::new(move |message: Arc<Message>, context: Context| {
                    let handler = handler.clone();
                    handler_call!(handler, message, context; $($arg),*)
                }))
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

/// A handler with its argument types erased, as the runtime stores it: what makes its calls.
pub(crate) type ErasedHandler = Arc<dyn Fn() -> Box<dyn HandlerCalls> + Send + Sync>;

pub(crate) fn erase<Args, H: Handler<Args>>(handler: H) -> ErasedHandler {
    Arc::new(move || handler.calls())
}
