//! Two binders in one application: sensor readings come in on one binder and go out on
//! another, to a destination chosen at run time from each reading.
//!
//! `sensor` publishes twelve readings to `readings` on the binder named `incoming`; `route`
//! reads them there and sends each, through `StreamBridge`, to the destination of its site
//! (`readings.north`, `readings.south`) on the binder named `outgoing`, which is the default
//! binder; `north` and `south` read those and print what they got. It stops by itself once
//! every reading arrived.
//!
//! ```text
//! cargo run --example bridge                                   # both binders in memory
//! BINDERY_PROFILE=kafka,rabbit cargo run --example bridge      # in from Kafka, out to RabbitMQ
//! ```
//!
//! Each profile swaps one named binder (`bridge-kafka.toml` makes `incoming` a Kafka binder,
//! `bridge-rabbit.toml` makes `outgoing` a RabbitMQ binder), so either works alone too. The
//! destination of a site is `bridge.site-destination` in `examples/bridge.toml`, where `{site}`
//! stands for the reading's site.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use bindery::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const READINGS: u64 = 12;

#[derive(Debug, Serialize, Deserialize)]
struct Reading {
    id: u64,
    site: String,
    sensor: String,
    celsius: f64,
}

static NEXT_READING: AtomicU64 = AtomicU64::new(1);
static RECEIVED: LazyLock<Mutex<BTreeSet<u64>>> = LazyLock::new(Mutex::default);
static PROGRESS: LazyLock<Notify> = LazyLock::new(Notify::new);

/// A new reading each time it is polled, until there have been twelve; every third is from
/// the south site.
#[stream_function(output = "readings", poll = "100ms")]
fn sensor() -> Option<Reading> {
    let id = NEXT_READING.fetch_add(1, Ordering::SeqCst);
    (id <= READINGS).then(|| {
        let site = if id % 3 == 0 { "south" } else { "north" };
        println!("sensor reading={id} site={site}");
        Reading {
            id,
            site: site.to_owned(),
            sensor: format!("{site}-{}", id % 2),
            celsius: 18.0 + id as f64 / 4.0,
        }
    })
}

/// Sends the reading to its site's destination, named from the payload at run time; the
/// bridge creates (and provisions) that destination's producer on first use.
#[stream_function(input = "readings", group = "router")]
async fn route(
    reading: Reading,
    bridge: StreamBridge,
    config: AppConfig,
) -> Result<(), bindery::Error> {
    let pattern: String = config.get("bridge.site-destination")?;
    let destination = pattern.replace("{site}", &reading.site);
    let key = reading.sensor.clone();
    let id = reading.id;
    let message = Message::builder(bindery::Encoded(reading)).key(key).build();
    bridge.send(&destination, message).await?;
    println!("route reading={id} to={destination}");
    Ok(())
}

fn received(desk: &str, reading: &Reading) {
    println!(
        "{desk} reading={} sensor={} celsius={}",
        reading.id, reading.sensor, reading.celsius
    );
    let mut received = RECEIVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    received.insert(reading.id);
    PROGRESS.notify_one();
}

#[stream_function(input = "readings.north", group = "north-desk")]
async fn north(reading: Reading) {
    received("north", &reading);
}

#[stream_function(input = "readings.south", group = "south-desk")]
async fn south(reading: Reading) {
    received("south", &reading);
}

#[tokio::main]
async fn main() -> Result<(), common::Failed> {
    common::log_to_stderr();
    let app = bindery::application()
        .config_file(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bridge.toml"))
        .build()?
        .start()
        .await?;
    let everything: BTreeSet<u64> = (1..=READINGS).collect();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let arrived = {
                let received = RECEIVED
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *received == everything
            };
            if arrived {
                break;
            }
            PROGRESS.notified().await;
        }
    })
    .await;
    app.shutdown().await?;
    match waited {
        Ok(()) => {
            println!("summary: all {READINGS} readings crossed from `incoming` to `outgoing`");
            Ok(())
        }
        Err(_) => Err(format!(
            "not every reading arrived within 60 s (received {:?})",
            RECEIVED
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        )
        .into()),
    }
}
