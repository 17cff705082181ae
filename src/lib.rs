#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use bindery_core::{binder, config, memory, redact};
#[doc(inline)]
pub use bindery_core::{
    header, registered_functions, AppConfig, Application, ApplicationBuilder, Binder,
    BinderProvider, BindingInfo, ConsumerProperties, Context, Decoded, Encoded, Error, Failure,
    FailureKind, FromMessage, FromPayload, FunctionKind, FunctionRegistration, Handler, Headers,
    IntoOutputs, IntoPayload, MemoryBinder, Message, MessageBuilder, ProducerProperties,
    RunningApplication, StreamBridge, StreamFunction,
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
    pub use bindery_core::inventory;
    pub use bindery_core::{
        Decoded, Encoded, FunctionRegistration, IntoOutputs, Message, StreamFunction,
    };
    pub use bytes::Bytes;

    /// Points a compile error at an argument type that cannot be decoded.
    pub const fn is_payload<T: DecodablePayload>() {}

    /// Points a compile error at a return type that cannot be sent.
    pub const fn is_output<T: bindery_core::IntoOutputs>() {}

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

    /// Points a compile error at an argument the macro took for context by its name.
    pub const fn is_context<T: ContextArgument>() {}

    #[diagnostic::on_unimplemented(
        message = "`{Self}` is taken for context by its name, but it is not bindery's `{Self}`",
        label = "a payload type may not be named `Headers`, `StreamBridge`, `AppConfig` or `Context`",
        note = "write `Decoded<{Self}>` to take it as the payload, or rename the type"
    )]
    pub trait ContextArgument {}
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
        label = "this argument's type does not implement `serde::Deserialize`",
        note = "derive `serde::Deserialize` for it, or take `String`, `bytes::Bytes`, `Vec<u8>` or `Message<T>` of those"
    )]
    pub trait DecodablePayload {}
    impl<T: serde::de::DeserializeOwned> DecodablePayload for T {}
}
