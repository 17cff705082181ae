//! The pipeline on RabbitMQ: hand-written lapin against bindery's RabbitMQ binder.

use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;

use crate::measure::{Latency, Meter, Throughput};
use crate::pipeline::{bill_raw, latency_us, order_json};
use crate::{Running, Side};

/// The binder's default `prefetch`, so both sides have as many deliveries outstanding.
pub(crate) const PREFETCH: u16 = 250;

pub(crate) struct Rabbit {
    uri: String,
    channel: Channel,
    _connection: Connection,
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

async fn connect(uri: &str) -> Result<Connection, String> {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| "connecting to RabbitMQ timed out".to_owned())?
    .map_err(|e| e.to_string())
}

impl Rabbit {
    pub(crate) async fn connect() -> Result<Rabbit, String> {
        let uri = std::env::var("RABBIT_URI")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        let connection = connect(&uri).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Rabbit {
            uri,
            channel,
            _connection: connection,
        })
    }

    /// The topology the binder declares: a durable topic exchange and a durable queue
    /// `<exchange>.<group>` bound with `#`.
    async fn declare(&self, exchange: &str, queue: &str) -> Result<(), String> {
        let ch = &self.channel;
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<u32, String> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(q.message_count())
    }

    async fn delete(&self, queues: &[&str], exchanges: &[&str]) {
        for q in queues {
            let _ = self
                .channel
                .queue_delete((*q).into(), Default::default())
                .await;
        }
        for e in exchanges {
            let _ = self
                .channel
                .exchange_delete((*e).into(), Default::default())
                .await;
        }
    }

    /// Publishes `n` persistent orders with confirms, at `rate` per second when given.
    async fn produce(&self, exchange: &str, n: u64, rate: Option<f64>) -> Result<(), String> {
        let started = Instant::now();
        let mut pending = FuturesOrdered::new();
        for id in 0..n {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(id as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    format!("customer-{}", id % 1_000).as_str().into(),
                    BasicPublishOptions::default(),
                    &order_json(id),
                    persistent(),
                )
                .await
                .map_err(|e| e.to_string())?;
            pending.push_back(confirm);
            if pending.len() >= 5_000 {
                check(pending.next().await)?;
            }
            while let Some(Some(done)) = pending.next().now_or_never() {
                check(Some(done))?;
            }
        }
        while let Some(done) = pending.next().await {
            check(Some(done))?;
        }
        Ok(())
    }

    pub(crate) async fn throughput(&self, side: Side, n: u64) -> Result<Throughput, String> {
        let (input, output, group) = names();
        let (in_queue, out_queue) = (format!("{input}.{group}"), format!("{output}.reader"));
        self.declare(&input, &in_queue).await?;
        self.declare(&output, &out_queue).await?;
        self.produce(&input, n, None).await?;
        eprintln!("  {n} preloaded; the pipeline starts");
        let meter = Meter::start();
        let running = self.start(side, &input, &output, &group).await?;
        // Time from the first invoice in the output queue to the last.
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        let result = loop {
            let depth = self.depth(&out_queue).await?;
            if depth > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            if u64::from(depth) >= n {
                break Ok(first.map_or(0.0, |f| f.elapsed().as_secs_f64()));
            }
            if Instant::now() > deadline {
                break Err(format!("{depth} of {n} invoices within 600 s"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let cpu = meter.cpu();
        running.stop().await?;
        self.delete(&[&in_queue, &out_queue], &[&input, &output])
            .await;
        Ok(Throughput::new(n, result?, cpu))
    }

    pub(crate) async fn latency(
        &self,
        side: Side,
        rate: f64,
        seconds: f64,
    ) -> Result<Latency, String> {
        let (input, output, group) = names();
        let (in_queue, out_queue) = (format!("{input}.{group}"), format!("{output}.reader"));
        self.declare(&input, &in_queue).await?;
        self.declare(&output, &out_queue).await?;
        let running = self.start(side, &input, &output, &group).await?;
        let n = (rate * seconds) as usize;
        let reader = tokio::spawn(read_latencies(self.uri.clone(), out_queue.clone(), n));
        self.produce(&input, n as u64, Some(rate)).await?;
        let latencies = reader.await.map_err(|e| e.to_string())??;
        running.stop().await?;
        self.delete(&[&in_queue, &out_queue], &[&input, &output])
            .await;
        Ok(Latency::from_micros(rate, latencies))
    }

    async fn start(
        &self,
        side: Side,
        input: &str,
        output: &str,
        group: &str,
    ) -> Result<Running, String> {
        match side {
            Side::Raw => {
                let (stop, stopped) = watch::channel(false);
                let task = tokio::spawn(raw_pipeline(
                    self.uri.clone(),
                    format!("{input}.{group}"),
                    output.to_owned(),
                    stopped,
                ));
                Ok(Running::Raw(stop, task))
            }
            Side::Bindery => Ok(Running::Bindery(
                crate::bindery_pipeline("rabbit", "uri", &self.uri, (input, output, group)).await?,
            )),
        }
    }
}

fn names() -> (String, String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        format!("bench-orders-{id}"),
        format!("bench-invoices-{id}"),
        "billing".to_owned(),
    )
}

fn check(confirm: Option<lapin::Result<Confirmation>>) -> Result<(), String> {
    match confirm {
        Some(Ok(Confirmation::Ack(None))) | None => Ok(()),
        Some(Ok(other)) => Err(format!("publish not confirmed: {other:?}")),
        Some(Err(e)) => Err(e.to_string()),
    }
}

async fn read_latencies(uri: String, queue: String, n: usize) -> Result<Vec<u64>, String> {
    let connection = connect(&uri).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench-reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
            Ok(Some(Ok(delivery))) => latencies.extend(latency_us(&delivery.data)),
            Ok(_) => return Err("the latency reader lost its consumer".to_owned()),
            Err(_) => return Err(format!("{} of {n} invoices came", latencies.len())),
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(latencies)
}

/// The pipeline as an expert writes it on lapin: consume with a prefetch, transform, publish
/// persistent on a confirming channel and keep going; ack an input once its output's confirm
/// came back.
async fn raw_pipeline(
    uri: String,
    queue: String,
    output: String,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let connection = connect(&uri).await?;
    let consume = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let publish = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    consume
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut deliveries = consume
        .basic_consume(
            queue.as_str().into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut in_flight = FuturesOrdered::new();
    async fn settle(done: (lapin::Result<Confirmation>, lapin::Acker)) -> Result<(), String> {
        let (confirm, acker) = done;
        check(Some(confirm))?;
        acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    loop {
        let next = tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                settle(done).await?;
                continue;
            }
            next = deliveries.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        };
        let invoice = bill_raw(&delivery.data).unwrap_or_default();
        let confirm = publish
            .basic_publish(
                output.as_str().into(),
                delivery.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &invoice,
                persistent(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let acker = delivery.acker;
        in_flight.push_back(confirm.map(move |c| (c, acker)));
    }
    while let Some(done) = in_flight.next().await {
        settle(done).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
