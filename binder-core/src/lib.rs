//! The core of bindery: the message model, the binder SPI, configuration, the function
//! registry, the runtime with its failure policy, the in-memory binder, test support and the
//! binder conformance suite.
//!
//! Applications use the `bindery` crate, which re-exports this one with the macro and binders.

#[cfg(feature = "asyncapi")]
#[doc(hidden)]
pub mod asyncapi;
pub mod binder;
mod bridge;
pub mod config;
mod error;
mod function;
pub mod handler;
#[cfg(feature = "management")]
mod management;
pub mod memory;
mod message;
#[cfg(feature = "otel")]
mod otel;
pub mod partition;
pub mod redact;
mod runtime;
pub mod testing;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use binder::{
    Acknowledgement, Binder, BinderProvider, BinderSettings, Confirmation, ConsumerSpec, Delivery,
    Health, Producer, ProducerSpec, Subscription, TryEnqueue,
};
#[doc(hidden)]
pub use bridge::with_current_correlation;
pub use bridge::StreamBridge;
pub use config::{AppConfig, ConfigError, ConsumerProperties, ProducerProperties};
pub use error::{BoxError, Error};
pub use function::{
    registered_functions, FunctionKind, FunctionRegistration, SchemaFn, StreamFunction,
};

/// Without the feature `asyncapi`, no payload type has a schema.
#[cfg(not(feature = "asyncapi"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __schema_of {
    ($direction:ident $t:ty) => {
        ::core::option::Option::<$crate::SchemaFn>::None
    };
}
pub use handler::{
    Context, Decoded, Encoded, Failure, FailureKind, FromMessage, FromPayload, Handler,
    IntoOutputs, IntoPayload, Outputs,
};
pub use memory::{MemoryBinder, MemoryBinderProvider, MemoryError};
pub use message::{header, Headers, Message, MessageBuilder};
pub use runtime::{
    Application, ApplicationBuilder, ApplicationHealth, BindingInfo, BindingState, BindingStatus,
    Controls, RunningApplication,
};

#[doc(hidden)]
pub use inventory;
