#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use bindery_core::{binder, config, memory, partition, redact};
#[doc(inline)]
pub use bindery_core::{
    header, registered_functions, AppConfig, Application, ApplicationBuilder, ApplicationHealth,
    Binder, BinderProvider, BindingInfo, BindingState, BindingStatus, ConsumerProperties, Context,
    Controls, Decoded, Encoded, Error, Failure, FailureKind, FromMessage, FromPayload,
    FunctionKind, FunctionRegistration, Handler, Headers, IntoOutputs, IntoPayload, MemoryBinder,
    Message, MessageBuilder, Outputs, ProducerProperties, RunningApplication, StreamBridge,
    StreamFunction,
};
#[doc(inline)]
pub use bindery_macros::stream_function;

/// Link-time registration, to register hand-written functions as `#[stream_function]` does.
pub use bindery_core::inventory;

/// Test support: run an application in-process on the memory binder.
pub mod test {
    #[doc(inline)]
    pub use bindery_core::testing::*;
}

/// What most applications need: `use bindery::prelude::*;`.
pub mod prelude {
    pub use crate::{stream_function, AppConfig, Headers, Message, StreamBridge};
}

/// The Kafka binder.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka {
    #[doc(inline)]
    pub use bindery_kafka::*;
}

/// The RabbitMQ binder.
#[cfg(feature = "rabbit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbit")))]
pub mod rabbit {
    #[doc(inline)]
    pub use bindery_rabbit::*;
}

/// A builder with every binder this build of bindery has: memory, and Kafka and RabbitMQ when
/// their features are on.
pub fn application() -> ApplicationBuilder {
    let builder = Application::builder();
    #[cfg(feature = "kafka")]
    let builder = builder.binder_provider(bindery_kafka::KafkaBinderProvider);
    #[cfg(feature = "rabbit")]
    let builder = builder.binder_provider(bindery_rabbit::RabbitBinderProvider);
    builder
}

/// Loads `application.toml` (with profiles and environment variables), binds every
/// `#[stream_function]`, and runs until Ctrl-C or SIGTERM, then shuts down gracefully.
///
/// Unless the application installed a `tracing` subscriber of its own, it installs one that
/// logs to standard error at `info` (or as `RUST_LOG` says): each binding as it is bound,
/// lost and recovered connections, retries, dead letters, shutdown.
///
/// This is the same as the hand-written
///
/// ```no_run
/// # async fn demo() -> Result<(), bindery::Error> {
/// bindery::log_to_stderr();
/// bindery::application().build()?.run().await
/// # }
/// ```
pub async fn run() -> Result<(), Error> {
    log_to_stderr();
    application().build()?.run().await
}

/// Installs a `tracing` subscriber printing to standard error, filtered by `RUST_LOG` (default
/// `info`), unless one is installed already.
pub fn log_to_stderr() {
    if tracing::dispatcher::has_been_set() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[doc(hidden)]
pub mod __private {
    pub use bindery_core::__schema_of as schema_of;
    pub use bindery_core::inventory;
    pub use bindery_core::{
        Context, Decoded, Encoded, Failure, FromMessage, FunctionRegistration, IntoOutputs,
        Message, Outputs, StreamFunction,
    };
    pub use bytes::Bytes;

    // The generated handler takes the message and the context, which every handler may, and
    // takes its arguments and gives its outputs through the functions below, each called at
    // the user's token: so a type that does not fit is one error, there, whose bound says
    // what is accepted.

    /// A payload argument, decoded by content type.
    pub fn decode<T: DecodablePayload>(message: &Message, context: &Context) -> Result<T, Failure> {
        Decoded::<T>::from_message(message, context).map(|decoded| decoded.0)
    }

    /// A `Message<T>` argument with a decoded payload.
    pub fn decode_message<T: DecodablePayload>(
        message: &Message,
        context: &Context,
    ) -> Result<Message<T>, Failure> {
        Message::<Decoded<T>>::from_message(message, context)
            .map(|message| message.map_payload(|decoded| decoded.0))
    }

    /// Any other argument (`String`, `Bytes`, `Message<Bytes>`, `Arc<Message>`, ...), from the
    /// message as the runtime shares it.
    pub fn extract<T: FromMessage>(
        message: &std::sync::Arc<Message>,
        context: &Context,
    ) -> Result<T, Failure> {
        T::from_shared(message, context)
    }

    /// An argument taken for context by its name (`Headers`, `StreamBridge`, ...).
    pub fn context<T: ContextArgument>(message: &Message, context: &Context) -> Result<T, Failure> {
        T::from_message(message, context)
    }

    /// The handler's return value, as the messages to send.
    pub fn outputs<T: IntoOutputs>(value: T, context: &Context) -> Result<Outputs, Failure> {
        let mut outputs = context.outputs();
        value.into_outputs(&mut outputs)?;
        Ok(outputs)
    }

    /// Why a return type the macro read by its name must be written out: it is a `Result`,
    /// `Option` or `Vec` behind a type alias, which would be sent as one JSON value.
    pub fn hidden_container<T>() -> Option<String> {
        let name = std::any::type_name::<T>();
        let container = [
            (
                "core::result::Result<",
                "Result<T, E>",
                "an `Err` is a failure",
            ),
            ("core::option::Option<", "Option<T>", "`None` sends nothing"),
            ("alloc::vec::Vec<", "Vec<T>", "each element is a message"),
        ]
        .into_iter()
        .find(|(prefix, _, _)| name.starts_with(prefix))?;
        let (_, written, meaning) = container;
        Some(format!(
            "its return type is `{name}` behind a type alias, which would be sent as one JSON value; write `{written}` in the signature, so that {meaning}"
        ))
    }

    #[diagnostic::on_unimplemented(
        message = "`{Self}` is taken for context by its name, but it is not bindery's `{Self}`",
        label = "a payload type may not be named `Headers`, `StreamBridge`, `AppConfig` or `Context`",
        note = "write `Decoded<{Self}>` to take it as the payload, or rename the type"
    )]
    pub trait ContextArgument: FromMessage {}
    impl ContextArgument for bindery_core::Headers {}
    impl ContextArgument for bindery_core::StreamBridge {}
    impl ContextArgument for bindery_core::AppConfig {}
    impl ContextArgument for bindery_core::Context {}

    /// Runs a plain (not `async`) handler on tokio's blocking pool, so a handler that blocks
    /// never holds up a runtime worker; a panic in it is a panic of the handler.
    pub async fn call_blocking<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> T {
        match tokio::task::spawn_blocking(bindery_core::with_current_correlation(call)).await {
            Ok(value) => value,
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => panic!("the handler's blocking task was cancelled"),
            },
        }
    }

    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be decoded from a message payload",
        label = "this argument's type does not implement `serde::Deserialize` (or is not `Send + 'static`)",
        note = "derive `serde::Deserialize` for it, or take `String`, `bytes::Bytes`, `Vec<u8>` or `Message<T>` of those"
    )]
    pub trait DecodablePayload: serde::de::DeserializeOwned + Send + 'static {}
    impl<T: serde::de::DeserializeOwned + Send + 'static> DecodablePayload for T {}
}
