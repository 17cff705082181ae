//! Under a memory alarm RabbitMQ blocks every connection that publishes. This test binary holds
//! that one test alone, since the alarm holds up every publisher on the server while it lasts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bindery_core::testing::{host_port, require_broker};
use bindery_core::{Application, Binder, ConsumerSpec, Message, ProducerSpec, StreamFunction};
use bindery_rabbit::{RabbitBinder, RabbitBinderProvider};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;

mod common;
use common::{can_control_server, connection_states, queue_depth, rabbitmqctl, uri};

/// A memory alarm on the server while it lives: the high watermark set to 0, restored on drop.
struct MemoryAlarm {
    watermark: String,
}

impl MemoryAlarm {
    async fn raise() -> Self {
        let current =
            rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]).await;
        let watermark = match current.trim().parse::<f64>() {
            Ok(_) => current.trim().to_owned(),
            Err(_) => "0.4".to_owned(),
        };
        let alarm = MemoryAlarm { watermark };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]).await;
        wait_until(
            "the memory alarm is raised",
            Duration::from_secs(30),
            || async {
                rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
                    .await
                    .contains("memory")
            },
        )
        .await;
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        // `timeout`, so that a server that does not answer cannot hang the test run.
        let _ = std::process::Command::new("timeout")
            .args([
                "30",
                "rabbitmqctl",
                "-q",
                "set_vm_memory_high_watermark",
                &self.watermark,
            ])
            .status();
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_memory_alarm_consumers_keep_acknowledging_and_sends_go_through_after_it() {
    common::within_test_deadline(async {
        if !require_broker("RabbitMQ", &host_port(&uri(), 5672)) || !can_control_server() {
            return;
        }
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("bindery_rabbit=info,warn")
            .try_init();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let (sunk, orders, invoices) = (
            format!("alarm-sunk-{id}"),
            format!("alarm-orders-{id}"),
            format!("alarm-invoices-{id}"),
        );
        // Both functions hold their messages until the alarm is on.
        let (sink_gate, forward_gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let sink = StreamFunction::consumer("sink", {
            let gate = sink_gate.clone();
            move |_: Message| {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.expect("gate").forget();
                }
            }
        });
        let forward = StreamFunction::function("forward", {
            let (gate, forwarded) = (forward_gate.clone(), forwarded.clone());
            move |message: Message| {
                let (gate, forwarded) = (gate.clone(), forwarded.clone());
                async move {
                    gate.acquire().await.expect("gate").forget();
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    message
                }
            }
        });
        let toml = format!(
            r#"[stream]
default-binder = "alarmed"
[stream.binders.alarmed]
type = "rabbit"
uri = "{uri}"
[stream.bindings.sink-in-0]
destination = "{sunk}"
group = "g"
[stream.bindings.forward-in-0]
destination = "{orders}"
group = "g"
[stream.bindings.forward-out-0]
destination = "{invoices}"
"#,
            uri = uri()
        );
        let collector = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let mut results = collector
            .subscribe(&ConsumerSpec::new(invoices.clone(), Some("results")))
            .await
            .expect("subscribe");
        let app = Application::builder()
            .without_registered_functions()
            .function(sink)
            .function(forward)
            .config_str("application.toml", toml)
            .environment(Vec::<(String, String)>::new())
            .binder_provider(RabbitBinderProvider)
            .build()
            .expect("configuration")
            .start()
            .await
            .expect("start");
        let sender = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        for (destination, count) in [(&sunk, 20), (&orders, 10)] {
            let producer = sender
                .producer(&ProducerSpec::new(destination.clone()))
                .await
                .expect("producer");
            for n in 0..count {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    producer.send(Message::new(Bytes::from(format!("{destination}-{n}")))),
                )
                .await
                .expect("sent in time")
                .expect("send");
            }
        }
        sender.close().await.ok();

        let alarm = MemoryAlarm::raise().await;
        // The forwards run first and publish, which makes RabbitMQ block the publishing connection
        // (it blocks a connection when it publishes during an alarm); later invoices wait behind
        // the first, in order.
        forward_gate.add_permits(10);
        wait_until("forward handled an order", Duration::from_secs(30), || {
            let forwarded = forwarded.clone();
            async move { forwarded.load(Ordering::SeqCst) >= 1 }
        })
        .await;
        wait_until(
            "the broker blocked the application's publishing connection",
            Duration::from_secs(30),
            || async { connection_states("bindery alarmed publisher").await == ["blocked"] },
        )
        .await;
        let results_queue = format!("{invoices}.results");
        assert_eq!(
            queue_depth(&results_queue).await,
            Some(0),
            "no invoice is published while the alarm lasts"
        );
        // The sink's acknowledgements still reach the broker: its queue empties during the alarm.
        sink_gate.add_permits(20);
        let sunk_queue = format!("{sunk}.g");
        wait_until(
            "the sink's messages are acknowledged during the alarm",
            Duration::from_secs(30),
            || {
                let queue = sunk_queue.clone();
                async move { queue_depth(&queue).await == Some(0) }
            },
        )
        .await;

        // A send on a blocked connection fails at once (the core sends it again later) instead
        // of waiting in the socket: once this producer's connection is blocked too.
        let prober = RabbitBinder::connect_uri(&uri()).await.expect("connect");
        let probe = prober
            .producer(&ProducerSpec::new(sunk.clone()))
            .await
            .expect("producer");
        let deadline = Instant::now() + Duration::from_secs(30);
        let refusal = loop {
            assert!(
                Instant::now() < deadline,
                "no send was refused while blocked"
            );
            let begun = Instant::now();
            let enqueued = tokio::time::timeout(
                Duration::from_secs(5),
                probe.enqueue(&Message::new(Bytes::from_static(b"probe"))),
            )
            .await
            .expect("a send under the alarm returns within 5s");
            assert!(
                begun.elapsed() < Duration::from_secs(2),
                "a send under the alarm took {:?}",
                begun.elapsed()
            );
            match enqueued {
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(error) => break error.to_string(),
            }
        };
        assert!(refusal.contains("blocks publishing"), "{refusal}");
        sink_gate.add_permits(1_000);
        drop(alarm);

        // Once it clears, every held invoice goes through.
        let mut received = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        while received.len() < 10 {
            let next = tokio::time::timeout_at(deadline, results.next()).await;
            let Ok(Some(Ok(delivery))) = next else {
                panic!(
                    "only {} of 10 invoices after the alarm cleared",
                    received.len()
                );
            };
            received.insert(String::from_utf8_lossy(delivery.message.payload()).into_owned());
            delivery.acknowledgement.ack().await.expect("ack");
        }
        tokio::time::timeout(Duration::from_secs(60), app.shutdown())
            .await
            .expect("shut down in time")
            .expect("shutdown");
        collector.close().await.ok();
        prober.close().await.ok();
    })
    .await
}
