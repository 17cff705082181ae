//! The e-commerce flow: an order service publishes `OrderPlaced` events to `orders`, keyed by
//! customer; `inventory`, `shipping` and `notification` each receive every order, in groups of
//! their own; `payment` turns orders into `PaymentProcessed` events on `payments`, which
//! `ledger` books; an order with a negative amount fails its payment, is retried once, and ends
//! in `orders.payment.dlq`, where `audit` reads it with its failure headers.
//!
//! ```text
//! cargo run --example orders                      # every service in one process, on memory
//! BINDERY_PROFILE=rabbit cargo run --example orders
//! BINDERY_PROFILE=kafka cargo run --example orders
//! ```
//!
//! Each service can also run as a process of its own, as in a deployment. Two instances of a
//! group share its orders (partitions on Kafka, competing consumers on RabbitMQ); on memory,
//! services only meet within one process.
//!
//! ```text
//! BINDERY_PROFILE=rabbit cargo run --example orders -- --service inventory   # twice, if you like
//! BINDERY_PROFILE=rabbit cargo run --example orders -- --service shipping,notification,payment,ledger,audit
//! BINDERY_PROFILE=rabbit cargo run --example orders -- --service orders --orders 20
//! ```
//!
//! `cargo run --example orders -- --asyncapi` prints the AsyncAPI document of the services
//! (all of them, or those `--service` names) and exits.
//!
//! Every line a service prints says what it did with which order, so the output can be
//! checked: `inventory pid=4711 order=8 customer=customer-3`. The configuration is
//! `examples/orders.toml`, with `orders-kafka.toml` and `orders-rabbit.toml` beside it.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bindery::prelude::*;
use common::{definition, environment_with, log_to_stderr, Failed, Flags, Services};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Every order whose id leaves this remainder by ten has a negative amount.
const POISON_REMAINDER: u64 = 7;

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct OrderPlaced {
    order_id: u64,
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
struct PaymentProcessed {
    order_id: u64,
    charged_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("order {0} has a negative amount ({1} cents); nothing can be charged")]
    NegativeAmount(u64, i64),
}

/// What the services of this process did, for the summary of a run in one process.
#[derive(Default)]
struct Seen {
    inventory: BTreeSet<u64>,
    shipping: BTreeSet<u64>,
    notification: BTreeSet<u64>,
    ledger: BTreeSet<u64>,
    audit: BTreeSet<u64>,
}

static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(Mutex::default);
/// Set when every service runs in this process, which then prints a summary: a service of a
/// deployment runs for good, and keeps no record of what it handled.
static SUMMARY: AtomicBool = AtomicBool::new(false);
static PROGRESS: LazyLock<Notify> = LazyLock::new(Notify::new);

fn record(service: &str, order_id: u64, detail: String, pick: fn(&mut Seen) -> &mut BTreeSet<u64>) {
    println!(
        "{service} pid={} order={order_id} {detail}",
        std::process::id()
    );
    if SUMMARY.load(Ordering::Relaxed) {
        let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pick(&mut seen).insert(order_id);
        PROGRESS.notify_one();
    }
}

/// Reserves stock for each order.
#[stream_function(input = "orders", group = "inventory")]
async fn inventory(order: OrderPlaced) {
    let detail = format!("customer={}", order.customer);
    record("inventory", order.order_id, detail, |s| &mut s.inventory);
}

/// Books a parcel for each order.
#[stream_function(input = "orders", group = "shipping")]
async fn shipping(order: OrderPlaced) {
    let detail = format!("customer={}", order.customer);
    record("shipping", order.order_id, detail, |s| &mut s.shipping);
}

/// Tells the customer about each order.
#[stream_function(input = "orders", group = "notification")]
async fn notification(order: OrderPlaced) {
    let detail = format!("customer={}", order.customer);
    record("notification", order.order_id, detail, |s| {
        &mut s.notification
    });
}

/// Charges each order; one with a negative amount fails, and is dead-lettered after its retry.
#[stream_function(input = "orders", output = "payments", group = "payment")]
async fn payment(order: OrderPlaced) -> Result<PaymentProcessed, PaymentError> {
    if order.amount_cents < 0 {
        return Err(PaymentError::NegativeAmount(
            order.order_id,
            order.amount_cents,
        ));
    }
    Ok(PaymentProcessed {
        order_id: order.order_id,
        charged_cents: order.amount_cents,
    })
}

/// Books each payment.
#[stream_function(input = "payments", group = "ledger")]
async fn ledger(payment: PaymentProcessed) {
    let detail = format!("charged={}", payment.charged_cents);
    record("ledger", payment.order_id, detail, |s| &mut s.ledger);
}

/// Reads the orders whose payment failed for good, with the failure headers bindery added.
#[stream_function(input = "orders.payment.dlq", group = "audit")]
async fn audit(order: OrderPlaced, headers: Headers) {
    let header = |name| headers.get_str(name).unwrap_or("-").to_owned();
    let detail = format!(
        "attempts={} from={} exception={:?}",
        header(bindery::header::ATTEMPTS),
        header(bindery::header::ORIGINAL_DESTINATION),
        header(bindery::header::EXCEPTION_MESSAGE),
    );
    record("audit", order.order_id, detail, |s| &mut s.audit);
}

const SERVICES: &[&str] = &[
    "inventory",
    "shipping",
    "notification",
    "payment",
    "ledger",
    "audit",
];

/// What to run, from the command line.
struct Options {
    services: Services,
    orders: u64,
    first: u64,
    /// Print the AsyncAPI document of the chosen services, and exit.
    asyncapi: bool,
}

fn options() -> Result<Options, Failed> {
    let usage = format!(
        "orders [--service orders|{}[,...]] [--orders N] [--first ID] [--asyncapi]",
        SERVICES.join("|")
    );
    let mut flags = Flags::new(usage);
    let mut options = Options {
        services: Services::all(SERVICES),
        orders: 20,
        first: 1,
        asyncapi: false,
    };
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--service" => {
                let list = flags.value(&flag)?;
                options.services = Services::chosen(&list, "orders", SERVICES)
                    .map_err(|problem| flags.error(&problem))?;
            }
            "--orders" => options.orders = flags.parsed(&flag)?,
            "--first" => options.first = flags.parsed(&flag)?,
            "--asyncapi" => options.asyncapi = true,
            other => return Err(flags.error(&format!("unknown argument `{other}`"))),
        }
    }
    if options.first.checked_add(options.orders).is_none() {
        return Err(flags.error("`--first` plus `--orders` is too large"));
    }
    Ok(options)
}

fn order(order_id: u64) -> OrderPlaced {
    let amount_cents = match order_id % 10 == POISON_REMAINDER {
        true => -500,
        false => 1_000 + (order_id % 7) as i64 * 250,
    };
    OrderPlaced {
        order_id,
        customer: format!("customer-{}", order_id % 5),
        amount_cents,
    }
}

/// Places the orders `first..end`, each keyed by its customer, one after the other once the
/// broker has confirmed the one before.
async fn place_orders(bridge: &StreamBridge, first: u64, end: u64) -> Result<(), bindery::Error> {
    for order_id in first..end {
        let order = order(order_id);
        let placed = format!(
            "orders pid={} order={order_id} customer={} amount={}",
            std::process::id(),
            order.customer,
            order.amount_cents
        );
        let key = order.customer.clone();
        let message = Message::builder(bindery::Encoded(order)).key(key).build();
        bridge.send("placed-out-0", message).await?;
        println!("{placed}");
    }
    Ok(())
}

/// Whether every service of a run in one process has seen what it should of these orders.
fn all_seen(ids: &BTreeSet<u64>) -> bool {
    let seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let paid: BTreeSet<u64> = ids
        .iter()
        .copied()
        .filter(|id| id % 10 != POISON_REMAINDER)
        .collect();
    let poison: BTreeSet<u64> = ids.difference(&paid).copied().collect();
    ids.is_subset(&seen.inventory)
        && ids.is_subset(&seen.shipping)
        && ids.is_subset(&seen.notification)
        && paid.is_subset(&seen.ledger)
        && poison.is_subset(&seen.audit)
}

#[tokio::main]
async fn main() -> Result<(), Failed> {
    log_to_stderr();
    let options = options()?;
    let services = &options.services;
    let everything = services.everything(SERVICES);
    SUMMARY.store(everything, Ordering::Relaxed);
    let mut builder = bindery::application()
        .config_file(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/orders.toml"))
        .environment(environment_with(definition(services)));
    if services.functions.is_empty() {
        builder = builder.without_registered_functions();
    }
    let end = options.first + options.orders;
    let app = builder.build()?;
    if options.asyncapi {
        let document = app.asyncapi("orders", env!("CARGO_PKG_VERSION"));
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let app = app.start().await?;

    if services.sends {
        if let Err(error) = place_orders(&app.bridge(), options.first, end).await {
            app.shutdown().await.ok();
            return Err(error.into());
        }
        if services.functions.is_empty() {
            // The order service alone: done once the broker has confirmed its orders.
            return Ok(app.shutdown().await?);
        }
    }
    if !everything {
        // Services of a deployment: they run until Ctrl-C or SIGTERM.
        let management = app
            .management_address()
            .map_or_else(|| "off".to_owned(), |address| address.to_string());
        println!(
            "ready pid={} services={} management={management}",
            std::process::id(),
            services.functions.join(","),
        );
        return Ok(app.run_until_signal().await?);
    }
    let ids: BTreeSet<u64> = (options.first..end).collect();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !all_seen(&ids) {
            PROGRESS.notified().await;
        }
    })
    .await;
    let summary = {
        let seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        format!(
            "summary: {} orders placed; inventory {}, shipping {}, notification {}, ledger {} payments, audit {} failed payments",
            ids.len(),
            seen.inventory.len(),
            seen.shipping.len(),
            seen.notification.len(),
            seen.ledger.len(),
            seen.audit.len(),
        )
    };
    println!("{summary}");
    app.shutdown().await?;
    match waited {
        Ok(()) => Ok(()),
        Err(_) => Err("not every service saw all of its orders within 60 s (see the summary); is another process of the same groups running (`--service ...`) and taking a share of them?".into()),
    }
}
