//! The pipeline every side runs: a JSON order in, a JSON invoice out.

use std::time::{SystemTime, UNIX_EPOCH};

use bindery::prelude::*;
use serde::{Deserialize, Serialize};

/// An order as a shop would publish it (about 100 bytes of JSON).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) id: u64,
    pub(crate) amount_cents: u64,
    pub(crate) customer: String,
    /// When the order was placed, in microseconds since the epoch: end-to-end latency.
    pub(crate) placed_at_us: u64,
}

/// The invoice computed from an order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Invoice {
    pub(crate) order_id: u64,
    pub(crate) customer: String,
    pub(crate) total_cents: u64,
    pub(crate) placed_at_us: u64,
}

/// The business logic, shared by every side so only the plumbing differs.
pub(crate) fn invoice_for(order: Order) -> Invoice {
    Invoice {
        order_id: order.id,
        total_cents: order.amount_cents * 6 / 5,
        customer: order.customer,
        placed_at_us: order.placed_at_us,
    }
}

/// The bindery side: the README's invoice function, bound by configuration.
#[stream_function(input = "orders", output = "invoices", group = "billing")]
async fn bill(order: Order) -> Invoice {
    invoice_for(order)
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The JSON of order number `id`.
pub(crate) fn order_json(id: u64) -> Vec<u8> {
    serde_json::to_vec(&Order {
        id,
        amount_cents: 1_000 + id % 9_000,
        customer: format!("customer-{}", id % 1_000),
        placed_at_us: now_us(),
    })
    .expect("an order encodes")
}

/// The raw pipelines' step: decode, compute, encode.
pub(crate) fn bill_raw(payload: &[u8]) -> Option<Vec<u8>> {
    let order: Order = serde_json::from_slice(payload).ok()?;
    serde_json::to_vec(&invoice_for(order)).ok()
}

/// Latency of an invoice, in microseconds, from its order's placing to now.
pub(crate) fn latency_us(payload: &[u8]) -> Option<u64> {
    let invoice: Invoice = serde_json::from_slice(payload).ok()?;
    Some(now_us().saturating_sub(invoice.placed_at_us))
}
