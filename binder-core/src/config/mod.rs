//! Configuration: loading `application.toml`, profiles and environment variables, and checking
//! every key under `[stream]` before anything connects.

mod load;
mod management;
mod node;
mod settings;

pub(crate) use load::{load, LoadOptions};
pub use load::{AppConfig, ConfigSource};
#[cfg(feature = "management")]
pub(crate) use management::Endpoint;
pub(crate) use management::ManagementSettings;
pub use node::{did_you_mean, ConfigError, ConfigNode, ConfigProblem, ConfigTable, Problems};
pub(crate) use node::{quoted_list, suggestion};
pub(crate) use settings::{BindingConfig, StreamConfig};
pub use settings::{ConsumerProperties, ProducerProperties};

/// Binding and function names match with `_` and `-` taken as the same, so
/// `BINDERY_STREAM__BINDINGS__SEND_ORDER_IN_0__GROUP` reaches `send_order-in-0`.
pub(crate) fn normalize_name(name: &str) -> String {
    name.replace('_', "-")
}
