//! The pipeline on Kafka: hand-written rdkafka against bindery's Kafka binder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::measure::{Latency, Meter, Throughput};
use crate::pipeline::{bill_raw, latency_us, order_json};
use crate::{Running, Side};

/// Messages the hand-written pipeline keeps in flight (enqueued, not yet reported delivered).
const WINDOW: usize = 1_000;

pub(crate) struct Kafka {
    brokers: String,
    admin: AdminClient<DefaultClientContext>,
}

fn config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// A producer with the guarantees bindery's Kafka binder uses.
fn safe_producer(brokers: &str) -> Result<FutureProducer, String> {
    config(brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| e.to_string())
}

impl Kafka {
    pub(crate) fn connect() -> Result<Kafka, String> {
        let brokers =
            std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
        let admin = config(&brokers).create().map_err(|e| e.to_string())?;
        Ok(Kafka { brokers, admin })
    }

    async fn create_topics(&self, names: &[&str]) -> Result<(), String> {
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = tokio::time::timeout(
            Duration::from_secs(30),
            self.admin.create_topics(&topics, &options),
        )
        .await
        .map_err(|_| "creating topics timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(format!("creating {topic}: {code}")),
            }
        }
        Ok(())
    }

    /// Produces `n` orders with ordinary batching, as a real producer would, at `rate` per
    /// second (as fast as possible when `None`).
    async fn produce(&self, topic: &str, n: u64, rate: Option<f64>) -> Result<(), String> {
        let producer = safe_producer(&self.brokers)?;
        let started = Instant::now();
        let mut pending = FuturesOrdered::new();
        for id in 0..n {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(id as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let payload = order_json(id);
            let key = format!("customer-{}", id % 1_000);
            loop {
                let record = FutureRecord::to(topic).payload(&payload).key(&key);
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        if let Some(done) = pending.next().await {
                            check_delivery(done)?;
                        }
                    }
                    Err((e, _)) => return Err(e.to_string()),
                }
            }
            while let Some(Some(done)) = pending.next().now_or_never() {
                check_delivery(done)?;
            }
        }
        while let Some(done) = pending.next().await {
            check_delivery(done)?;
        }
        Ok(())
    }

    /// Reads `topic` from its start until `n` records came, on a thread of its own. Returns
    /// the create-time span of the records (first to last, in seconds) and their latencies.
    fn read(&self, topic: &str, n: u64, limit: Duration) -> ReadHandle {
        let brokers = self.brokers.clone();
        let topic = topic.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || -> Result<(f64, Vec<u64>), String> {
            let consumer: BaseConsumer = config(&brokers)
                .set("group.id", format!("bench-reader-{}", uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                // The reader is the measuring instrument: it should not add a broker's fetch
                // wait to every latency (on Tansu 0.6.0, lowering it from librdkafka's 500 ms
                // default took about 300 ms off the median on both sides).
                .set("fetch.wait.max.ms", "5")
                .create()
                .map_err(|e| e.to_string())?;
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(&topic, 0, Offset::Offset(0))
                .map_err(|e| e.to_string())?;
            consumer.assign(&assignment).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + limit;
            let (mut first, mut last, mut count) = (i64::MAX, i64::MIN, 0u64);
            let mut latencies = Vec::new();
            while count < n && !stopped.load(Ordering::Relaxed) {
                if Instant::now() > deadline {
                    return Err(format!(
                        "{count} of {n} records on {topic} within {limit:?}"
                    ));
                }
                if let Some(Ok(record)) = consumer.poll(Duration::from_millis(50)) {
                    count += 1;
                    if let Some(ts) = record.timestamp().to_millis() {
                        first = first.min(ts);
                        last = last.max(ts);
                    }
                    if let Some(us) = record.payload().and_then(latency_us) {
                        latencies.push(us);
                    }
                }
            }
            Ok(((last - first).max(1) as f64 / 1000.0, latencies))
        });
        ReadHandle { thread, stop }
    }

    pub(crate) async fn throughput(&self, side: Side, n: u64) -> Result<Throughput, String> {
        let (input, output, group) = names();
        self.create_topics(&[&input, &output]).await?;
        self.produce(&input, n, None).await?;
        eprintln!("  {n} preloaded; the pipeline starts");
        let reader = self.read(&output, n, Duration::from_secs(600));
        let meter = Meter::start();
        let running = self.start(side, &input, &output, &group).await?;
        let result = reader.join().await;
        running.stop().await?;
        let (span, _) = result?;
        let cpu = meter.cpu();
        Ok(Throughput::new(n, span, cpu))
    }

    pub(crate) async fn latency(
        &self,
        side: Side,
        rate: f64,
        seconds: f64,
    ) -> Result<Latency, String> {
        let (input, output, group) = names();
        self.create_topics(&[&input, &output]).await?;
        let running = self.start(side, &input, &output, &group).await?;
        // Warm up until the pipeline answers (group joins take seconds on some brokers).
        self.produce(&input, 1, None).await?;
        self.read(&output, 1, Duration::from_secs(120))
            .join()
            .await?;
        let n = (rate * seconds) as u64;
        let reader = self.read(&output, n + 1, Duration::from_secs(120 + seconds as u64));
        self.produce(&input, n, Some(rate)).await?;
        let result = reader.join().await;
        running.stop().await?;
        let (_, mut latencies) = result?;
        latencies.remove(0); // the warm-up order
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
                    self.brokers.clone(),
                    input.to_owned(),
                    output.to_owned(),
                    group.to_owned(),
                    stopped,
                ));
                Ok(Running::Raw(stop, task))
            }
            Side::Bindery => Ok(Running::Bindery(
                crate::bindery_pipeline("kafka", "brokers", &self.brokers, (input, output, group))
                    .await?,
            )),
        }
    }
}

fn names() -> (String, String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        format!("bench-orders-{id}"),
        format!("bench-invoices-{id}"),
        format!("bench-billing-{id}"),
    )
}

fn check_delivery(
    delivery: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<(), String> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer went away".to_owned()),
    }
}

struct ReadHandle {
    thread: std::thread::JoinHandle<Result<(f64, Vec<u64>), String>>,
    stop: Arc<AtomicBool>,
}

impl ReadHandle {
    async fn join(self) -> Result<(f64, Vec<u64>), String> {
        let stop = self.stop.clone();
        let thread = self.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        stop.store(true, Ordering::Relaxed);
        match joined {
            Ok(Ok(result)) => result,
            _ => Err("the reader thread failed".to_owned()),
        }
    }
}

/// The pipeline as an expert writes it on rdkafka: consume, transform, enqueue the send and
/// keep going; store an input's offset once its output's delivery report came back.
async fn raw_pipeline(
    brokers: String,
    input: String,
    output: String,
    group: String,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let consumer: StreamConsumer = config(&brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| e.to_string())?;
    consumer
        .subscribe(&[input.as_str()])
        .map_err(|e| e.to_string())?;
    let producer = safe_producer(&brokers)?;
    let mut in_flight = FuturesOrdered::new();
    let settle = |done: (Result<_, _>, i32, i64)| -> Result<(), String> {
        let (delivery, partition, offset) = done;
        check_delivery(delivery)?;
        let mut store = TopicPartitionList::new();
        store
            .add_partition_offset(&input, partition, Offset::Offset(offset + 1))
            .map_err(|e| e.to_string())?;
        consumer.store_offsets(&store).map_err(|e| e.to_string())
    };
    loop {
        let record = tokio::select! {
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            record = consumer.recv() => record.map_err(|e| e.to_string())?,
        };
        let (partition, offset) = (record.partition(), record.offset());
        let invoice = record.payload().and_then(bill_raw).unwrap_or_default();
        let key = record.key().map(<[u8]>::to_vec);
        drop(record);
        loop {
            let mut out = FutureRecord::to(&output).payload(&invoice);
            if let Some(key) = &key {
                out = out.key(key);
            }
            match producer.send_result(out) {
                Ok(delivery) => {
                    in_flight.push_back(delivery.map(move |d| (d, partition, offset)));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if let Some(done) = in_flight.next().await {
                        settle(done)?;
                    }
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
        if in_flight.len() >= WINDOW {
            if let Some(done) = in_flight.next().await {
                settle(done)?;
            }
        }
        while let Some(Some(done)) = in_flight.next().now_or_never() {
            settle(done)?;
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(done)?;
    }
    let _ = producer.flush(Duration::from_secs(10));
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .map_err(|e| e.to_string())
}
