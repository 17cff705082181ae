//! The pipeline on the memory binder, with a plain tokio-channel pipeline as the floor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bindery::binder::{ConsumerSpec, ProducerSpec, Subscription};
use bindery::{Binder, MemoryBinder, Message};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::measure::{rss_mib, Meter, Throughput};
use crate::pipeline::{bill_raw, order_json};
use crate::Side;

const TOML: &str = r#"
    [stream]
    function.definition = "bill"
    [stream.bindings.bill-in-0]
    destination = "orders"
    group = "billing"
    [stream.bindings.bill-out-0]
    destination = "invoices"
"#;

/// A binder with `orders` (group `billing`) and a reader of `invoices` ready.
async fn prepared() -> Result<(MemoryBinder, Box<dyn Subscription>), String> {
    let binder = MemoryBinder::new();
    let invoices = binder
        .subscribe(&ConsumerSpec::new("invoices", Some("reader")))
        .await
        .map_err(|e| e.to_string())?;
    let mut spec = ProducerSpec::new("orders");
    spec.properties.required_groups = vec!["billing".to_owned()];
    binder.producer(&spec).await.map_err(|e| e.to_string())?;
    Ok((binder, invoices))
}

/// bindery's `bill` on `binder`.
async fn start(binder: &MemoryBinder) -> Result<bindery::RunningApplication, String> {
    bindery::application()
        .config_str("bench.toml", TOML)
        .environment(Vec::<(String, String)>::new())
        .replace_binders(Arc::new(binder.clone()))
        .build()
        .map_err(|e| e.to_string())?
        .start()
        .await
        .map_err(|e| e.to_string())
}

/// Reads and acknowledges `n` invoices as a careful consumer of the binder SPI does: an invoice
/// already at hand is taken and acknowledged without a boxed future, and only an empty queue is
/// waited on.
async fn read(mut invoices: Box<dyn Subscription>, n: u64) -> Result<(), String> {
    let all = async {
        for _ in 0..n {
            let delivery = match invoices.try_next() {
                Some(next) => Some(next),
                None => invoices.next().await,
            };
            let mut acknowledgement = match delivery {
                Some(Ok(delivery)) => delivery.acknowledgement,
                _ => return Err("the invoice reader stopped".to_owned()),
            };
            match acknowledgement.try_ack() {
                Some(acked) => acked,
                None => acknowledgement.ack().await,
            }
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .map_err(|_| "the invoices did not all come within 600 s".to_owned())?
}

pub(crate) async fn throughput(side: Side, n: u64) -> Result<Throughput, String> {
    match side {
        Side::Raw => floor(n).await,
        Side::Bindery => {
            let (binder, invoices) = prepared().await?;
            let orders = binder
                .producer(&ProducerSpec::new("orders"))
                .await
                .map_err(|e| e.to_string())?;
            for id in 0..n {
                orders
                    .send(Message::new(Bytes::from(order_json(id))))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let meter = Meter::start();
            let app = start(&binder).await?;
            let result = read(invoices, n).await;
            let seconds = meter.elapsed().as_secs_f64();
            let cpu = meter.cpu();
            app.shutdown().await.map_err(|e| e.to_string())?;
            result?;
            Ok(Throughput::new(n, seconds, cpu))
        }
    }
}

/// The same work over tokio channels: the least any pipeline in this process can cost.
async fn floor(n: u64) -> Result<Throughput, String> {
    let (orders, mut incoming) = mpsc::unbounded_channel::<Bytes>();
    for id in 0..n {
        let _ = orders.send(Bytes::from(order_json(id)));
    }
    drop(orders);
    let meter = Meter::start();
    let (invoices, mut outgoing) = mpsc::channel::<Bytes>(1_000);
    let worker = tokio::spawn(async move {
        while let Some(order) = incoming.recv().await {
            let invoice = bill_raw(&order).unwrap_or_default();
            if invoices.send(Bytes::from(invoice)).await.is_err() {
                break;
            }
        }
    });
    let mut count = 0;
    while outgoing.recv().await.is_some() {
        count += 1;
    }
    let _ = worker.await;
    if count != n {
        return Err(format!("{count} of {n} invoices"));
    }
    Ok(Throughput::new(
        n,
        meter.elapsed().as_secs_f64(),
        meter.cpu(),
    ))
}

/// A sustained stream of `n` messages through bindery, never more than 10,000 waiting (orders
/// not yet taken plus invoices not yet read, so only bindery can grow): the
/// resident memory after a warm-up of a tenth of them, and at the end.
pub(crate) async fn soak(n: u64) -> Result<(f64, f64), String> {
    let (binder, invoices) = prepared().await?;
    let app = start(&binder).await?;
    let orders = binder
        .producer(&ProducerSpec::new("orders"))
        .await
        .map_err(|e| e.to_string())?;
    let reader = tokio::spawn(read(invoices, n));
    let payload = Bytes::from(order_json(1));
    let mut warm = 0.0;
    let started = Instant::now();
    for id in 0..n {
        while binder.pending("orders", "billing") + binder.pending("invoices", "reader") > 10_000 {
            tokio::task::yield_now().await;
            if started.elapsed() > Duration::from_secs(600) {
                return Err("the soak did not finish within 600 s".to_owned());
            }
        }
        orders
            .send(Message::new(payload.clone()))
            .await
            .map_err(|e| e.to_string())?;
        if id == n / 10 {
            warm = rss_mib();
        }
    }
    reader.await.map_err(|e| e.to_string())??;
    let end = rss_mib();
    app.shutdown().await.map_err(|e| e.to_string())?;
    Ok((warm, end))
}
