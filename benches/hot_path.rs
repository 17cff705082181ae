//! The hot path: a message through a function on the memory binder, from the input
//! destination to the output destination (decode JSON, call, encode JSON, send, acknowledge).
//!
//! ```text
//! cargo bench --bench hot_path
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bindery::binder::{ConsumerSpec, ProducerSpec};
use bindery::{Binder, Decoded, Encoded, MemoryBinder, Message, StreamFunction};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    id: u64,
    amount_cents: u64,
}

#[derive(Serialize)]
struct Invoice {
    order_id: u64,
    total_cents: u64,
}

const BATCH: u64 = 1_000;

fn hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let binder = MemoryBinder::new();
    let (producer, mut invoices, app) = runtime.block_on(async {
        let bill = StreamFunction::function("bill", |order: Decoded<Order>| async move {
            Encoded(Invoice {
                order_id: order.0.id,
                total_cents: order.0.amount_cents * 6 / 5,
            })
        })
        .input("orders")
        .output("invoices")
        .group("billing");
        let invoices = binder
            .subscribe(&ConsumerSpec::new("invoices", Some("bench")))
            .await
            .unwrap();
        let app = bindery::test::isolated(bill, "")
            .replace_binders(Arc::new(binder.clone()))
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let producer = binder.producer(&ProducerSpec::new("orders")).await.unwrap();
        (producer, invoices, app)
    });
    let payload = Bytes::from_static(br#"{"id":42,"amount_cents":1000}"#);

    let mut group = c.benchmark_group("memory binder");
    group.throughput(Throughput::Elements(BATCH));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("order -> bill -> invoice", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let begun = Instant::now();
                for _ in 0..iterations {
                    for _ in 0..BATCH {
                        let mut message = Message::new(payload.clone());
                        message
                            .headers_mut()
                            .insert(bindery::header::CONTENT_TYPE, "application/json");
                        producer.send(message).await.unwrap();
                    }
                    for _ in 0..BATCH {
                        let delivery = invoices.next().await.unwrap().unwrap();
                        delivery.acknowledgement.ack().await.unwrap();
                    }
                }
                begun.elapsed()
            })
        })
    });
    group.finish();
    runtime.block_on(app.shutdown()).unwrap();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
