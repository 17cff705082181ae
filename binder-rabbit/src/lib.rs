//! The RabbitMQ binder of bindery, on lapin.
//!
//! Topology follows Spring Cloud Stream's Rabbit binder, so mixed fleets interoperate:
//!
//! - a destination is a durable exchange (topic by default) named after it;
//! - a group is a durable queue `<destination>.<group>` bound to that exchange (binding key
//!   `#`); consumers of one group compete on it, and every group gets every message;
//! - an anonymous consumer gets an exclusive, auto-delete queue `<destination>.anonymous.<id>`;
//! - with `dlq = true`, the group queue dead-letters to the direct exchange `DLX` with routing
//!   key `<destination>.<group>`, and the queue `<destination>.<group>.dlq` is bound there.
//!
//! Messages are published persistent, with publisher confirms and `mandatory`, to the
//! destination's exchange with the message key as routing key (the destination name when the
//! message has none). Retries and dead-lettering are decided by the core; this crate only
//! talks to the broker.

mod binder;
mod confirms;
mod mapping;
mod settings;

pub use binder::RabbitBinder;
pub use settings::{
    RabbitConsumerSettings, RabbitProducerSettings, RabbitSettings, RequiredGroupQueue,
};

use std::sync::Arc;

use bindery_core::binder::BrokerAddress;
use bindery_core::config::{ConfigNode, Problems};
use bindery_core::{Binder, BinderProvider, BinderSettings};
use futures::future::BoxFuture;

/// The exchange dead-lettered messages are routed through.
pub const DEAD_LETTER_EXCHANGE: &str = "DLX";

/// What can go wrong talking to RabbitMQ. Texts never contain a password.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to RabbitMQ at {uri}: {reason}; check that the server runs and `stream.binders.<name>.uri` (user, password, virtual host)")]
    Connect {
        /// The URI tried, password hidden.
        uri: String,
        /// Why.
        reason: String,
        /// Whether trying again cannot help (the broker refused the credentials).
        permanent: bool,
    },
    /// Connecting took longer than `connection-timeout`.
    #[error("cannot connect to RabbitMQ at {uri}: no answer within {timeout:?}; check the host and port in `stream.binders.<name>.uri`")]
    ConnectTimeout {
        /// The URI tried, password hidden.
        uri: String,
        /// The limit.
        timeout: std::time::Duration,
    },
    /// Declaring an exchange, queue or binding failed, often because it exists with other
    /// arguments.
    #[error("cannot declare {entity}: {reason}")]
    Declare {
        /// Such as "queue `orders.billing`".
        entity: String,
        /// The broker's answer, which names the differing argument.
        reason: String,
        /// Whether declaring again cannot help (access refused, different arguments, or
        /// missing while `provision = false`).
        permanent: bool,
    },
    /// The broker refused or returned a published message.
    #[error("RabbitMQ did not take the message for exchange `{exchange}` (routing key `{routing_key}`): {reason}")]
    Publish {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// Why.
        reason: String,
    },
    /// The broker blocks the publishing connection (a memory or disk alarm).
    #[error("RabbitMQ blocks publishing ({reason}): a memory or disk alarm on the broker; the message is sent again once it clears")]
    Blocked {
        /// The broker's reason.
        reason: String,
    },
    /// Any other channel or connection failure.
    #[error("RabbitMQ: {0}")]
    Channel(String),
}

impl RabbitError {
    /// Whether the broker refused for good, so reconnecting would only repeat the refusal.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RabbitError::Connect {
                permanent: true,
                ..
            } | RabbitError::Declare {
                permanent: true,
                ..
            }
        )
    }
}

/// Creates [`RabbitBinder`]s for `type = "rabbit"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RabbitBinderProvider;

impl BinderProvider for RabbitBinderProvider {
    fn binder_type(&self) -> &'static str {
        "rabbit"
    }

    fn validate(&self, settings: &BinderSettings, problems: &mut Problems) {
        RabbitSettings::read(settings.node.as_ref(), problems);
    }

    fn validate_consumer(&self, node: &ConfigNode, problems: &mut Problems) {
        RabbitConsumerSettings::read(Some(node), problems);
    }

    fn validate_producer(&self, node: &ConfigNode, problems: &mut Problems) {
        RabbitProducerSettings::read(Some(node), problems);
    }

    /// The host and port of `uri` (credentials left out) and its virtual host as the
    /// pathname.
    fn address(&self, settings: &BinderSettings) -> Option<BrokerAddress> {
        let mut problems = Problems::default();
        let rabbit = RabbitSettings::read(settings.node.as_ref(), &mut problems);
        // A `uri` refused is left at its default, which is not this binder's address.
        if !problems.is_empty() {
            return None;
        }
        let uri: lapin::uri::AMQPUri = rabbit.uri.parse().ok()?;
        let host = &uri.authority.host;
        let host = match host.contains(':') && !host.starts_with('[') {
            true => format!("[{host}]:{}", uri.authority.port),
            false => format!("{host}:{}", uri.authority.port),
        };
        // As the URI writes it: the default virtual host `/` is `/%2f`.
        let pathname = format!("/{}", uri.vhost.replace('/', "%2f"));
        Some(BrokerAddress::new(uri.scheme.to_string(), host).with_pathname(pathname))
    }

    fn create(
        &self,
        settings: BinderSettings,
    ) -> BoxFuture<'static, Result<Arc<dyn Binder>, bindery_core::Error>> {
        Box::pin(async move {
            let mut problems = Problems::default();
            let rabbit = RabbitSettings::read(settings.node.as_ref(), &mut problems);
            let binder = RabbitBinder::connect(&settings.name, rabbit).await?;
            Ok(Arc::new(binder) as Arc<dyn Binder>)
        })
    }
}
