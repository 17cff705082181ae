//! Shutting down finishes what is in flight, acknowledges it, and loses nothing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bindery::binder::{ConsumerSpec, ProducerSpec};
use bindery::header;
use bindery::{Binder, BindingState, MemoryBinder, Message, RunningApplication, StreamFunction};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;

async fn wait_until(what: &str, deadline: Duration, condition: impl Fn() -> bool) {
    let until = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start_on(
    binder: &MemoryBinder,
    function: StreamFunction,
    toml: &str,
) -> RunningApplication {
    bindery::test::isolated(function, toml)
        .replace_binders(Arc::new(binder.clone()))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap()
}

fn slow_function(
    started: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
    takes: Duration,
) -> StreamFunction {
    StreamFunction::function("slow", move |text: String| {
        let (started, finished) = (started.clone(), finished.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(takes).await;
            finished.fetch_add(1, Ordering::SeqCst);
            text
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_messages_and_loses_none() {
    let binder = MemoryBinder::new();
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let mut outputs = binder
        .subscribe(&ConsumerSpec::new("gs-out", Some("check")))
        .await
        .unwrap();
    let app = start_on(
        &binder,
        slow_function(
            started.clone(),
            finished.clone(),
            Duration::from_millis(300),
        ),
        r#"[stream.bindings.slow-in-0]
destination = "gs-in"
group = "workers"
consumer.concurrency = 4
[stream.bindings.slow-out-0]
destination = "gs-out""#,
    )
    .await;

    let producer = binder.producer(&ProducerSpec::new("gs-in")).await.unwrap();
    let total = 20;
    for n in 0..total {
        producer
            .send(Message::new(Bytes::from(format!("m{n}"))))
            .await
            .unwrap();
    }
    wait_until(
        "four messages are in flight",
        Duration::from_secs(5),
        || started.load(Ordering::SeqCst) >= 4,
    )
    .await;
    app.shutdown().await.unwrap();

    let started = started.load(Ordering::SeqCst);
    let finished = finished.load(Ordering::SeqCst);
    assert_eq!(
        started, finished,
        "every message that was being handled was finished"
    );
    assert!(
        finished < total,
        "intake stopped at shutdown ({finished} of {total} handled)"
    );
    let mut forwarded = 0;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(50), outputs.next()).await
    {
        delivery.acknowledgement.ack().await.unwrap();
        forwarded += 1;
    }
    assert_eq!(
        forwarded, finished,
        "every finished message's output was sent"
    );
    let waiting = binder.pending("gs-in", "workers") as u32;
    assert_eq!(
        waiting + finished,
        total,
        "every message is either handled or still waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_still_in_flight_at_the_timeout_is_left_for_redelivery() {
    let binder = MemoryBinder::new();
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let seen_correlation = Arc::new(Mutex::new(None::<String>));
    let (started_in, finished_in, seen) =
        (started.clone(), finished.clone(), seen_correlation.clone());
    let slow = StreamFunction::function("slow", move |message: Message<Bytes>| {
        let (started, finished, seen) = (started_in.clone(), finished_in.clone(), seen.clone());
        async move {
            let correlation = message.headers().get_str(header::CORRELATION_ID);
            *seen.lock().unwrap() = correlation.map(str::to_owned);
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(60)).await;
            finished.fetch_add(1, Ordering::SeqCst);
            message.into_payload()
        }
    });
    let app = start_on(
        &binder,
        slow,
        r#"[stream]
shutdown-timeout = "200ms"
[stream.bindings.slow-in-0]
destination = "gs-stuck"
group = "workers""#,
    )
    .await;
    let producer = binder
        .producer(&ProducerSpec::new("gs-stuck"))
        .await
        .unwrap();
    producer
        .send(Message::new(Bytes::from_static(b"stuck")))
        .await
        .unwrap();
    wait_until("the message is in flight", Duration::from_secs(5), || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;

    let begun = Instant::now();
    app.shutdown().await.unwrap();
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "shutdown is bounded by its timeout"
    );
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    assert_eq!(
        binder.pending("gs-stuck", "workers"),
        1,
        "the unfinished message waits for redelivery"
    );
    // The handler saw the correlation id the binding gives an input without one, set on a copy
    // of its own while the binder still held the message: what goes back is the message as it
    // was sent.
    assert!(
        seen_correlation.lock().unwrap().is_some(),
        "the handler's input carries a correlation id"
    );
    let mut again = binder
        .subscribe(&ConsumerSpec::new("gs-stuck", Some("workers")))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .expect("the message is delivered again within 5 s")
        .expect("a delivery")
        .expect("no receive error");
    assert!(delivery.redelivered);
    assert_eq!(&delivery.message.payload()[..], b"stuck");
    assert!(
        delivery.message.headers().is_empty(),
        "the message went back with headers it was not sent with: {:?}",
        delivery.message.headers()
    );
    delivery.acknowledgement.ack().await.unwrap();
}

/// A function whose calls wait until the test lets each go: it counts calls started and
/// finished.
fn gated_function(
    started: Arc<AtomicU32>,
    finished: Arc<AtomicU32>,
) -> (StreamFunction, Arc<Semaphore>) {
    let go_on = Arc::new(Semaphore::new(0));
    let gate = go_on.clone();
    let function = StreamFunction::function("gated", move |text: String| {
        let (started, finished, gate) = (started.clone(), finished.clone(), gate.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.expect("open").forget();
            finished.fetch_add(1, Ordering::SeqCst);
            text
        }
    });
    (function, go_on)
}

async fn send_to(binder: &MemoryBinder, destination: &str, count: usize) {
    let producer = binder
        .producer(&ProducerSpec::new(destination))
        .await
        .unwrap();
    for n in 0..count {
        producer
            .send(Message::new(Bytes::from(format!("m{n}"))))
            .await
            .unwrap();
    }
}

/// Pausing lets the handler call under way finish and be acknowledged and starts no other;
/// resuming starts what the binding held, with nothing new arriving; a shutdown while paused
/// hands back what the binding held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_binding_finishes_what_runs_resumes_what_it_held_and_hands_back_the_rest() {
    let binder = MemoryBinder::new();
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let (gated, go_on) = gated_function(started.clone(), finished.clone());
    let app = start_on(
        &binder,
        gated,
        r#"[stream.bindings.gated-in-0]
destination = "gs-paused"
group = "workers"
[stream.bindings.gated-out-0]
destination = "gs-paused-out"
producer.required-groups = ["check"]"#,
    )
    .await;
    let refused = app
        .pause_binding("gated-out-0")
        .await
        .expect_err("an output");
    assert!(
        refused
            .to_string()
            .contains("its input bindings are: gated-in-0"),
        "{refused}"
    );
    send_to(&binder, "gs-paused", 5).await;
    wait_until("a message is in flight", Duration::from_secs(5), || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    app.pause_binding("gated-in-0").await.unwrap();
    go_on.add_permits(100);
    wait_until(
        "the call under way finishes",
        Duration::from_secs(5),
        || finished.load(Ordering::SeqCst) == 1,
    )
    .await;
    // A while to watch for a call that must not start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "no call starts while paused"
    );

    // Nothing new arrives: resuming alone starts what was held.
    app.resume_binding("gated-in-0").await.unwrap();
    wait_until(
        "the messages held while paused are handled",
        Duration::from_secs(5),
        || finished.load(Ordering::SeqCst) == 5,
    )
    .await;

    app.pause_binding("gated-in-0").await.unwrap();
    send_to(&binder, "gs-paused", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        5,
        "no call starts while paused"
    );
    app.shutdown().await.unwrap();
    assert_eq!(
        binder.pending("gs-paused", "workers"),
        3,
        "what the paused binding held is back with the broker, and nothing else"
    );
    assert_eq!(
        binder.pending("gs-paused-out", "check"),
        5,
        "every output was sent"
    );
}

/// A stop whose call is stuck gives up on it after `stream.shutdown-timeout` and hands it
/// back; meanwhile the binding takes no other change, and started again it gets the message
/// once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_gives_up_on_a_stuck_call_and_hands_it_back() {
    let binder = MemoryBinder::new();
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let (gated, go_on) = gated_function(started.clone(), finished.clone());
    let app = start_on(
        &binder,
        gated,
        r#"[stream]
shutdown-timeout = "1s"
[stream.bindings.gated-in-0]
destination = "gs-stuck-stop"
group = "workers"
[stream.bindings.gated-out-0]
destination = "gs-stuck-stop-out"
producer.required-groups = ["check"]"#,
    )
    .await;
    send_to(&binder, "gs-stuck-stop", 1).await;
    wait_until("the message is in flight", Duration::from_secs(5), || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    // The caller stops waiting; the binding goes on stopping.
    let waited =
        tokio::time::timeout(Duration::from_millis(100), app.stop_binding("gated-in-0")).await;
    assert!(waited.is_err(), "the stuck call holds the stop up");
    let refused = app
        .start_binding("gated-in-0")
        .await
        .expect_err("still stopping");
    assert!(refused.to_string().contains("still stopping"), "{refused}");
    wait_until(
        "the stop gives up on the stuck call",
        Duration::from_secs(10),
        || app.binding_state("gated-in-0") == Some(BindingState::Stopped),
    )
    .await;
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    assert_eq!(
        binder.pending("gs-stuck-stop", "workers"),
        1,
        "the stuck message is back with the broker"
    );
    go_on.add_permits(1);
    app.start_binding("gated-in-0").await.unwrap();
    wait_until("it is handled again", Duration::from_secs(5), || {
        finished.load(Ordering::SeqCst) == 1
    })
    .await;
    app.shutdown().await.unwrap();
    assert_eq!(binder.pending("gs-stuck-stop", "workers"), 0);
    assert_eq!(binder.pending("gs-stuck-stop-out", "check"), 1);
}
