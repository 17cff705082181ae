//! The binder conformance suite against a real RabbitMQ server (`RABBIT_URI`, default the
//! local server with guest/guest).

use std::sync::Arc;
use std::time::Duration;

use bindery_core::conformance::Suite;
use bindery_core::testing::{host_port, require_broker};
use bindery_core::Binder;
use bindery_rabbit::RabbitBinder;

fn uri() -> String {
    std::env::var("RABBIT_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn suite() -> Suite {
    Suite::new(|| async {
        Ok(Arc::new(RabbitBinder::connect_uri(&uri()).await?) as Arc<dyn Binder>)
    })
    .dead_letter_reader(|_, spec| async move {
        RabbitBinder::connect_uri(&uri())
            .await?
            .dead_letter_subscription(&spec)
            .await
    })
    .timeout(Duration::from_secs(15))
    .enabled(require_broker("RabbitMQ", &host_port(&uri(), 5672)))
}

bindery_core::conformance_tests!(suite());
