//! The quickstart: a supplier of orders, a function billing them, a consumer printing the
//! invoices. It runs on the embedded memory binder with no broker and no setup, and stops by
//! itself after ten invoices (or on Ctrl-C).
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The same binary runs on Kafka or RabbitMQ by configuration alone: see
//! `examples/quickstart.toml` and the README.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use bindery::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const ORDERS: u64 = 10;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Invoice {
    order_id: u64,
    total_cents: u64,
}

#[derive(Debug, thiserror::Error)]
enum BillingError {
    #[error("order {0} has no amount")]
    EmptyOrder(u64),
}

static NEXT_ORDER: AtomicU64 = AtomicU64::new(1);
static PRINTED: AtomicU64 = AtomicU64::new(0);
static ALL_PRINTED: LazyLock<Notify> = LazyLock::new(Notify::new);

/// Makes a new order each time it is polled, until there have been ten.
#[stream_function(output = "orders", poll = "200ms")]
fn take_order() -> Option<Order> {
    let id = NEXT_ORDER.fetch_add(1, Ordering::SeqCst);
    (id <= ORDERS).then(|| {
        println!("-> order {id} placed");
        Order {
            id,
            amount_cents: 1_000 * id,
        }
    })
}

/// Bills an order: the total is the amount plus 20% tax.
#[stream_function(input = "orders", output = "invoices", group = "billing")]
async fn bill(order: Order) -> Result<Invoice, BillingError> {
    if order.amount_cents == 0 {
        return Err(BillingError::EmptyOrder(order.id));
    }
    Ok(Invoice {
        order_id: order.id,
        total_cents: order.amount_cents * 6 / 5,
    })
}

/// Prints each invoice.
#[stream_function(input = "invoices", group = "printing")]
async fn print_invoice(invoice: Invoice, headers: Headers) {
    println!(
        "<- invoice for order {} : {}.{:02} (correlation {})",
        invoice.order_id,
        invoice.total_cents / 100,
        invoice.total_cents % 100,
        headers
            .get_str(bindery::header::CORRELATION_ID)
            .unwrap_or("-"),
    );
    if PRINTED.fetch_add(1, Ordering::SeqCst) + 1 == ORDERS {
        ALL_PRINTED.notify_one();
    }
}

#[tokio::main]
async fn main() -> Result<(), bindery::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart.toml");
    bindery::application()
        .config_file(config)
        .build()?
        .run_until(ALL_PRINTED.notified())
        .await?;
    println!("done: {} invoices printed", PRINTED.load(Ordering::SeqCst));
    Ok(())
}
