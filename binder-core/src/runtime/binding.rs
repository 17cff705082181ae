//! The delivery engine: the path of every received message, and the only place its policy
//! lives.
//!
//! binder (receive) → [window](super::window) → [lanes](super::lanes) (one key at a time) →
//! decode, invoke, encode → hand the outputs to the producer → the next message is taken at
//! once while confirmations are awaited in the background → [settle](super::settle).
//!
//! Failures: a handler failure is retried in-process with back-off (the message waits, its
//! key held, without occupying a handler), then dead-lettered or logged. A send that fails is
//! sent again (the send, not the handler) until it is confirmed or the binding stops, when the
//! input is handed back unacknowledged; only a send the broker refused for good dead-letters
//! the input.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use super::lanes::Lanes;
use super::lifecycle::{BindingState, Steering, Wanted};
use super::meter::{InFlightMark, Meter, Stamp};
use super::settle::{settle, InOrder, Settling, Verdict};
use super::window::Window;
use crate::binder::{Acknowledgement, Delivery, Producer, Subscription};
use crate::bridge::{
    confirm_all, enqueue_all, enqueue_at_once, new_message_id, output_id, Lineage, MessageId,
    Output, Sendings,
};
use crate::config::ConsumerProperties;
use crate::handler::{
    panic_text, Batch, Context, ErasedHandler, Failure, FailureKind, HandlerCalls, Outputs,
};
use crate::message::header;
use crate::{Error, Message};

/// One handler bound to its input (or poll timer) and its output.
#[derive(Clone)]
pub(crate) struct Invoker {
    pub(crate) function: Arc<str>,
    pub(crate) handler: ErasedHandler,
    /// Whether the handler can see its input's headers ([`Handler::READS_HEADERS`]).
    ///
    /// [`Handler::READS_HEADERS`]: crate::handler::Handler::READS_HEADERS
    pub(crate) reads_headers: bool,
    pub(crate) context: Context,
    pub(crate) output: Option<Arc<Output>>,
}

/// The span a handler call runs in: with the feature `otel`, a `tracing` span continuing the
/// input's trace; nothing without it.
#[derive(Default)]
struct CallSpan(#[cfg(feature = "otel")] Option<tracing::Span>);

/// A handler's call under way: polled in its input's lineage (and span), where a panic is a
/// failure like any other. It moves between polls as a box; once it is ready, its calls are
/// given back for the next message.
struct Call {
    calls: Box<dyn HandlerCalls>,
    lineage: Lineage,
    #[cfg(feature = "otel")]
    span: Option<tracing::Span>,
    /// A call that panicked leaves its calls in no state to be used again.
    panicked: bool,
}

impl Call {
    /// The handler's calls, to start the next one with (none after a panic), and the lineage
    /// the call ran in.
    fn into_parts(self) -> (Option<Box<dyn HandlerCalls>>, Lineage) {
        ((!self.panicked).then_some(self.calls), self.lineage)
    }
}

impl Future for Call {
    type Output = Result<Outputs, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        #[cfg(feature = "otel")]
        let _entered = this.span.as_ref().map(tracing::Span::enter);
        let calls = &mut this.calls;
        let polled = this
            .lineage
            .in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| calls.poll_call(cx))));
        polled.unwrap_or_else(|panic| {
            this.panicked = true;
            Poll::Ready(Err(Failure::panic(panic_text(&*panic))))
        })
    }
}

/// The calls of a handler that panicked as its call started: the call fails with the panic.
struct PanickedAtStart(Option<Failure>);

impl PanickedAtStart {
    fn calls(panic: &(dyn std::any::Any + Send)) -> Box<dyn HandlerCalls> {
        Box::new(PanickedAtStart(Some(Failure::panic(panic_text(panic)))))
    }
}

impl HandlerCalls for PanickedAtStart {
    fn start(&mut self, _: Arc<Message>, _: Context) {}

    fn poll_call(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<Outputs, Failure>> {
        Poll::Ready(Err(self.0.take().unwrap_or_else(|| {
            Failure::panic("the handler panicked as its call started".to_owned())
        })))
    }
}

impl Invoker {
    /// Starts the handler on `message` with `calls` (new ones when `None`);
    /// [`finish`](Self::finish) reads what the call returns.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    fn start(
        &self,
        calls: Option<Box<dyn HandlerCalls>>,
        message: Arc<Message>,
        lineage: Lineage,
        span: CallSpan,
    ) -> Call {
        // A handler that works before it returns its future can panic here: a failure like a
        // panic while it runs, retried, then dead-lettered.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut calls = calls.unwrap_or_else(|| (self.handler)());
            calls.start(message, self.context.clone());
            calls
        }));
        let (calls, panicked) = match started {
            Ok(calls) => (calls, false),
            Err(panic) => (PanickedAtStart::calls(&*panic), true),
        };
        Call {
            calls,
            lineage,
            #[cfg(feature = "otel")]
            span: span.0,
            panicked,
        }
    }

    /// The span a call on `item` runs in (feature `otel`), and the trace context its outputs
    /// carry from then on: the span's, where OpenTelemetry gave it one.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    fn span_for(&self, item: &mut InFlight) -> CallSpan {
        #[cfg(feature = "otel")]
        {
            // From the input each attempt: an attempt's span never stands for the next one's.
            let input = Lineage::received(&item.message, &item.id);
            let (span, lineage) = crate::otel::handler_span(
                &self.function,
                &item.id.to_string(),
                item.message.headers(),
                input,
            );
            item.lineage = lineage;
            CallSpan(Some(span))
        }
        #[cfg(not(feature = "otel"))]
        CallSpan()
    }

    /// What a call produced.
    fn finish(&self, returned: Result<Outputs, Failure>) -> Result<Batch, Failure> {
        let outputs = returned?;
        if self.output.is_none() && !outputs.is_empty() {
            return Err(Failure::new(
                FailureKind::Encode,
                "bindery::Error",
                "a consumer returned messages but has no output binding",
            ));
        }
        Ok(outputs.into_batch())
    }

    /// Calls the handler with `calls` (new ones when `None`). Returns what it produced, and
    /// the calls for the next message.
    async fn call(
        &self,
        calls: Option<Box<dyn HandlerCalls>>,
        message: Arc<Message>,
        lineage: Lineage,
        span: CallSpan,
    ) -> (Result<Batch, Failure>, Option<Box<dyn HandlerCalls>>) {
        let mut call = self.start(calls, message, lineage, span);
        let returned = (&mut call).await;
        (self.finish(returned), call.into_parts().0)
    }
}

/// A consumer binding: its invoker, failure settings and dead-letter producer.
pub(crate) struct InputBinding {
    pub(crate) binding: String,
    pub(crate) destination: String,
    pub(crate) properties: ConsumerProperties,
    pub(crate) invoker: Invoker,
    pub(crate) dead_letter: Option<(String, Arc<dyn Producer>)>,
    /// How long, at shutdown, the binding may handle what its subscription had already
    /// received (see [`Subscription::drain`]) before it hands the rest back.
    pub(crate) drain_for: Duration,
    pub(crate) meter: Meter,
}

/// A received message on its way through the binding.
struct InFlight {
    /// Arrival order, from 0.
    sequence: u64,
    message: Arc<Message>,
    id: MessageId,
    /// What the message hands on to its outputs.
    lineage: Lineage,
    acknowledgement: Box<dyn Acknowledgement>,
    /// Handler attempts made so far.
    attempts: u32,
    /// Failed sends of this message's outputs (or dead letter) so far.
    send_failures: u32,
    /// Outputs handed to the producer and not confirmed yet.
    unconfirmed: usize,
    received_at: Stamp,
    called_at: Stamp,
    _in_flight: InFlightMark,
}

impl InFlight {
    fn key(&self) -> Option<&Bytes> {
        self.message.key()
    }
}

/// What a group of sends was for.
enum Target {
    Outputs,
    DeadLetter { failure: Failure },
}

/// A finished piece of work of the binding.
enum Step {
    /// The handler returned (or failed); its outputs are not sent yet.
    Called(
        InFlight,
        Result<Batch, Failure>,
        Option<Box<dyn HandlerCalls>>,
    ),
    /// The handler ran: its outputs handed to the producer, or why it failed.
    Handled(InFlight, Result<Sendings, Failure>),
    /// A retry's back-off is over.
    BackedOff(InFlight),
    /// Sends were answered; those not confirmed are listed with why.
    Confirmed(InFlight, Target, Vec<(Option<Message>, Error)>),
    /// The binding is stopping while the message waited: it goes back to the broker.
    Abandoned(InFlight),
    /// Settlements finished.
    Settled { count: usize, in_order: bool },
}

type Job = BoxFuture<'static, Step>;

/// Completes at `deadline`, or never without one. `select!` builds every branch's future on
/// each turn, enabled or not: this one costs nothing (no clock read, no timer) until polled.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How many messages already at hand one turn of a binding's loop takes.
const AT_HAND_PER_TURN: usize = 16;

/// How long a subscription may take to pause or resume.
const PAUSE_LIMIT: Duration =
    crate::binder::PAUSE_ANSWER_WITHIN.saturating_add(Duration::from_secs(1));
/// How long a subscription may take to answer [`Subscription::drain`].
const DRAIN_REQUEST_LIMIT: Duration = Duration::from_secs(5);
type Shared = Arc<tokio::sync::Mutex<Box<dyn Subscription>>>;
type Receiving = BoxFuture<'static, Option<Result<Delivery, Error>>>;

/// Waits for the subscription's next message, keeping the `next` call alive however often the
/// engine's loop turns: a receive is cancelled only when the binding stops or pauses.
fn receive(subscription: Shared) -> Receiving {
    Box::pin(async move { subscription.lock().await.next().await })
}

/// A spawned handler call, aborted if the binding lets go of it (shutdown timeout).
struct Spawned<T>(JoinHandle<T>);

impl<T> Future for Spawned<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl InputBinding {
    /// Receives, handles and settles messages until shutdown, then finishes what is in flight
    /// and hands back what was not started.
    /// Returns an error when the subscription ended while the application was running.
    ///
    /// `steering` pauses it (no handler starts and nothing is received until it runs again;
    /// the subscription is told, [`Subscription::pause`]),
    /// stops it (as a shutdown does) and shuts it down; the engine says which it does.
    pub(crate) async fn run(
        self: Arc<Self>,
        subscription: Box<dyn Subscription>,
        steering: &mut Steering,
    ) -> Result<(), Error> {
        let mut engine = Engine {
            window: Window::new(self.properties.max_in_flight),
            concurrency: self.properties.concurrency.max(1) as usize,
            in_order: subscription.acknowledges_in_order().then(InOrder::default),
            binding: self,
            lanes: Lanes::default(),
            ready: VecDeque::new(),
            running: 0,
            jobs: FuturesUnordered::new(),
            settling_in_order: false,
            stopping: false,
            paused: false,
            next_sequence: 0,
            halt: watch::channel(false).0,
            calls: Vec::new(),
            spare: None,
        };
        let subscription: Shared = Arc::new(tokio::sync::Mutex::new(subscription));
        let mut open = true;
        let mut receiving: Option<Receiving> = None;
        let mut receive_again_at: Option<Instant> = None;
        let mut drain_until: Option<Instant> = None;
        let mut stop_asked = false;
        // Whether the application still steers this binding, and whether it asked it to stop.
        let mut steered = true;
        let mut stop_wanted = false;
        steering.state.send_replace(BindingState::Started);
        // Asked to stop by the application, the binding gives up on what is still in flight
        // at this time: it is handed back unacknowledged.
        let mut stop_by: Option<Instant> = None;
        let mut gave_up = false;
        let mut wanted = *steering.wanted.borrow_and_update();
        loop {
            // Checked without a lock: this runs for every message.
            if steering.wanted.has_changed().unwrap_or(false) {
                wanted = *steering.wanted.borrow_and_update();
            }
            let pause = wanted == Wanted::Pause;
            // Asked to stop, a binding stays as it is (paused or not) and stops as a shutdown
            // does.
            if !wanted.stops() && pause != engine.paused && !engine.stopping {
                engine.paused = pause;
                // A waiting receive has taken nothing: cancelled, so the subscription can hand
                // back what its client holds, and the broker keep it.
                receiving = None;
                let changing = async {
                    let mut subscription = subscription.lock().await;
                    match pause {
                        true => subscription.pause().await,
                        false => subscription.resume().await,
                    }
                };
                if tokio::time::timeout(PAUSE_LIMIT, changing).await.is_err() {
                    tracing::warn!(binding = %engine.binding.binding, "the subscription did not say within {PAUSE_LIMIT:?} that it is paused or running again; going on");
                }
                let state = match pause {
                    true => BindingState::Paused,
                    false => BindingState::Started,
                };
                steering.state.send_replace(state);
                tracing::info!(binding = %engine.binding.binding, ?state, "binding state changed");
                // Resumed: what was held starts now, not at the next message.
                engine.start_ready();
            }
            if wanted.stops() && !stop_wanted {
                stop_wanted = true;
                stop_asked = true;
                // A shutdown has a deadline of its own, for the whole application.
                if wanted == Wanted::Stop {
                    stop_by = Some(Instant::now() + engine.binding.drain_for * 2);
                }
            }
            if stop_asked {
                stop_asked = false;
                // A waiting receive has taken nothing: cancelled, so the broker can be asked to
                // send no more.
                receiving = None;
                let stop_seen = Instant::now();
                let drain_for = engine.binding.drain_for;
                let asked = tokio::time::timeout(DRAIN_REQUEST_LIMIT.min(drain_for), async {
                    subscription.lock().await.drain().await
                });
                // A paused binding handles nothing more: what it holds goes back at once.
                match !engine.paused && asked.await == Ok(true) {
                    true => drain_until = Some(stop_seen + drain_for),
                    false => engine.stop(),
                }
            }
            if open
                && receiving.is_none()
                && !engine.stopping
                && !engine.paused
                && receive_again_at.is_none()
            {
                if let Err(error) = engine.take_at_hand(&subscription) {
                    tracing::error!(binding = %engine.binding.binding, %error, "receiving failed; trying again in 1s");
                    receive_again_at = Some(Instant::now() + Duration::from_secs(1));
                } else if engine.window.has_room() {
                    receiving = Some(receive(subscription.clone()));
                }
            }
            if engine.jobs.is_empty() && (engine.stopping || (receiving.is_none() && !open)) {
                break;
            }
            tokio::select! {
                biased;
                _ = until(drain_until), if drain_until.is_some() && !engine.stopping => {
                    tracing::warn!(binding = %engine.binding.binding, "messages already received were not all handled before shutdown; the rest go back to the broker");
                    engine.stop();
                }
                _ = until(stop_by), if stop_by.is_some() && !gave_up => {
                    tracing::warn!(binding = %engine.binding.binding, "messages in flight did not finish within `stream.shutdown-timeout` of the stop; they go back to the broker unacknowledged");
                    gave_up = true;
                    // Their acknowledgements, dropped, hand them back; then what waits for a
                    // handler goes back as at any stop, its settlements kept.
                    engine.jobs = FuturesUnordered::new();
                    engine.running = 0;
                    engine.stop();
                }
                Some(step) = engine.jobs.next(), if !engine.jobs.is_empty() => engine.on_step(step),
                next = async { receiving.as_mut().expect("receiving").await }, if receiving.is_some() => {
                    receiving = None;
                    match next {
                        Some(Ok(delivery)) => engine.admit(delivery),
                        Some(Err(error)) => {
                            tracing::error!(binding = %engine.binding.binding, %error, "receiving failed; trying again in 1s");
                            receive_again_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                        // Drained: what was admitted is finished before the binding ends.
                        None if drain_until.is_some() => open = false,
                        None => {
                            tracing::error!(binding = %engine.binding.binding, "the subscription ended; the application stops");
                            open = false;
                        }
                    }
                }
                _ = until(receive_again_at), if receive_again_at.is_some() => {
                    receive_again_at = None;
                }
                // Shutdown, too, comes this way: one watch for the engine to poll.
                changed = steering.wanted.changed(), if steered && !stop_wanted => match changed {
                    Ok(()) => wanted = *steering.wanted.borrow_and_update(),
                    Err(_) => steered = false,
                },
            }
            engine.start_ready();
        }
        // A receive still waiting has taken nothing yet: it is cancelled, and the subscription
        // closed (for Kafka: the final commit of what was acknowledged).
        drop(receiving);
        let subscription = Arc::try_unwrap(subscription)
            .map(tokio::sync::Mutex::into_inner)
            .ok();
        if let Some(subscription) = subscription {
            // A shutdown bounds the close itself; a binding stopped alone gets what is left of
            // the shutdown budget, and at least a moment.
            let closing = subscription.close();
            let closed = match stop_by {
                Some(stop_by) => {
                    let at_least = engine.binding.drain_for.max(super::CLOSE_AT_LEAST);
                    let close_by = stop_by.max(Instant::now() + at_least);
                    tokio::time::timeout_at(close_by, closing)
                        .await
                        .unwrap_or_else(|_| {
                            tracing::warn!(binding = %engine.binding.binding, "the subscription did not close in time; it is dropped");
                            Ok(())
                        })
                }
                None => closing.await,
            };
            if let Err(error) = closed {
                tracing::warn!(binding = %engine.binding.binding, %error, "closing the subscription failed");
            }
        }
        match open || engine.stopping || drain_until.is_some() {
            true => Ok(()),
            false => Err(Error::Binding {
                binding: engine.binding.binding.clone(),
                message: "its subscription ended (the broker cancelled the consumer or the client failed for good; see the log); the application stopped".to_owned(),
            }),
        }
    }
}

/// The state of one running binding.
struct Engine {
    binding: Arc<InputBinding>,
    window: Window,
    lanes: Lanes<InFlight>,
    /// Messages whose key is theirs, waiting for a free handler.
    ready: VecDeque<InFlight>,
    /// Handler calls running.
    running: usize,
    concurrency: usize,
    jobs: FuturesUnordered<Job>,
    in_order: Option<InOrder>,
    settling_in_order: bool,
    stopping: bool,
    /// Paused by the application: no handler starts, nothing is received.
    paused: bool,
    next_sequence: u64,
    /// Set when the binding stops for good (not while it drains): messages waiting for a
    /// back-off go back to the broker.
    halt: watch::Sender<bool>,
    /// The handler's calls not in use, each kept for the next message.
    calls: Vec<Box<dyn HandlerCalls>>,
    /// The allocation of a message settled, for the next copy of a shared message received.
    spare: Option<Arc<Message>>,
}

impl Engine {
    /// Admits, and starts, what the subscription already holds, as far as the window and one
    /// turn's share go (the loop checks for shutdown between turns).
    fn take_at_hand(&mut self, subscription: &Shared) -> Result<(), Error> {
        let Ok(mut subscription) = subscription.try_lock() else {
            return Ok(());
        };
        for _ in 0..AT_HAND_PER_TURN {
            if !self.window.has_room() {
                break;
            }
            match subscription.try_next() {
                Some(Ok(delivery)) => self.admit(delivery),
                Some(Err(error)) => return Err(error),
                None => break,
            }
            self.start_ready();
        }
        Ok(())
    }

    fn admit(&mut self, delivery: Delivery) {
        let Delivery {
            mut message,
            acknowledgement,
            ..
        } = delivery;
        // An id that is empty or not text is replaced, as one that is missing: ids are logged,
        // become the correlation id of what the handler sends, and the ids of its outputs are
        // derived from them.
        let id = match message.headers().message_id() {
            Some(id) => MessageId::from_header(id),
            None => new_message_id(),
        };
        // A handler that can see its input's headers sees the correlation id its outputs get;
        // one that takes only the payload needs no copy of the message for it.
        if self.binding.invoker.reads_headers && !message.headers().contains(header::CORRELATION_ID)
        {
            self.own(&mut message)
                .headers_mut()
                .set_static(header::CORRELATION_ID, id.bytes().clone());
        }
        let lineage = Lineage::received(&message, &id);
        self.window.open();
        let in_flight = self.binding.meter.received();
        let item = InFlight {
            sequence: self.next_sequence,
            message,
            id,
            lineage,
            acknowledgement,
            attempts: 0,
            send_failures: 0,
            unconfirmed: 0,
            received_at: self.binding.meter.stamp(),
            called_at: Stamp::default(),
            _in_flight: in_flight,
        };
        self.next_sequence += 1;
        if self.stopping {
            return self.settle(item, Verdict::Requeue);
        }
        let key = item.key().cloned();
        let Some(item) = self.lanes.admit(key.as_ref(), item) else {
            return;
        };
        // Nothing ahead of it and a handler free: it starts now, without a turn in the queue.
        if self.ready.is_empty() && self.can_start() {
            self.running += 1;
            return self.handle(item);
        }
        self.ready.push_back(item);
    }

    /// Whether a handler may start now.
    fn can_start(&self) -> bool {
        !self.stopping && !self.paused && self.running < self.concurrency
    }

    fn start_ready(&mut self) {
        while self.can_start() {
            let Some(item) = self.ready.pop_front() else {
                break;
            };
            self.running += 1;
            self.handle(item);
        }
    }

    /// Runs `job` as far as it goes at once, and only keeps it when it has to wait: on the
    /// memory binder, or a handler that does not wait, a message is handled, sent and settled
    /// within this call, without a task node or a wake-up. A job kept is polled again by `jobs`
    /// straight away, with the binding's waker.
    fn push_job(&mut self, mut job: Job) {
        // A handler on a task of its own is never done at once.
        if self.concurrency > 1 {
            return self.jobs.push(job);
        }
        match (&mut job).now_or_never() {
            Some(step) => self.on_step(step),
            None => self.jobs.push(job),
        }
    }

    /// Calls the handler, then hands its outputs to the producer. A handler that is done at
    /// once (most are) is called here, without a job of its own.
    fn handle(&mut self, mut item: InFlight) {
        item.attempts += 1;
        item.called_at = self.binding.meter.stamp();
        let span = self.binding.invoker.span_for(&mut item);
        let calls = self.calls.pop();
        if self.concurrency > 1 {
            let invoker = self.binding.invoker.clone();
            return self.jobs.push(Box::pin(async move {
                let (message, lineage) = (item.message.clone(), item.lineage.clone());
                let (outcome, calls) = Spawned(tokio::spawn(async move {
                    invoker.call(calls, message, lineage, span).await
                }))
                .await
                .unwrap_or_else(|error| (Err(Failure::panic(error.to_string())), None));
                Step::Called(item, outcome, calls)
            }));
        }
        // The call runs in the item's lineage, moved there and back.
        let lineage = std::mem::take(&mut item.lineage);
        let mut call = self
            .binding
            .invoker
            .start(calls, item.message.clone(), lineage, span);
        match (&mut call).now_or_never() {
            Some(returned) => {
                let (calls, lineage) = call.into_parts();
                item.lineage = lineage;
                self.calls.extend(calls);
                let outcome = self.binding.invoker.finish(returned);
                self.send_outputs(item, outcome);
            }
            None => {
                let binding = self.binding.clone();
                self.jobs.push(Box::pin(async move {
                    let returned = (&mut call).await;
                    let (calls, lineage) = call.into_parts();
                    item.lineage = lineage;
                    Step::Called(item, binding.invoker.finish(returned), calls)
                }));
            }
        }
    }

    /// Hands a handler's outputs to the producer, in order, before the key is released: so
    /// outputs of one key are sent in the order their inputs arrived.
    fn send_outputs(&mut self, mut item: InFlight, outcome: Result<Batch, Failure>) {
        self.binding.meter.returned(item.called_at, outcome.is_ok());
        let mut messages = match outcome {
            Ok(messages) => messages,
            Err(failure) => return self.handled(item, Err(failure)),
        };
        let Some(output) = self.binding.invoker.output.as_ref() else {
            return self.handled(item, Ok(Sendings::default()));
        };
        // Ids derived from an input's own id are the same on every delivery of it, so consumers
        // can de-duplicate. An input without one (the id made on receipt is never written on
        // it) would have derived ids new on every delivery as well, so its outputs get new ids,
        // which cost less to make.
        let derived = item.message.headers().message_id().is_some();
        for (index, message) in messages.iter_mut().enumerate() {
            let id = || match derived {
                true => output_id(&item.id, index),
                false => new_message_id(),
            };
            output.prepare(message, id, &item.lineage);
        }
        item.unconfirmed = messages.len();
        // A producer that takes the outputs at once costs no job.
        let (sendings, rest) = enqueue_at_once(&output.producer, &output.destination, messages);
        if rest.is_empty() {
            return self.handled(item, Ok(sendings));
        }
        let output = output.clone();
        self.push_job(Box::pin(async move {
            let sendings = enqueue_all(&output.producer, &output.destination, sendings, rest).await;
            Step::Handled(item, Ok(sendings))
        }));
    }

    /// The handler ran: its outputs were handed to the producer (their answers may still be
    /// to come), or it failed.
    fn handled(&mut self, item: InFlight, sent: Result<Sendings, Failure>) {
        self.running -= 1;
        let sendings = match sent {
            Ok(sendings) => sendings,
            Err(failure) => return self.handler_failed(item, failure),
        };
        self.release_key(&item);
        if sendings.all_confirmed() {
            self.binding.meter.sent(sendings.len());
            self.settle(item, Verdict::Ack);
        } else {
            self.jobs.push(Box::pin(async move {
                let failed = confirm_all(sendings).await;
                Step::Confirmed(item, Target::Outputs, failed)
            }));
        }
    }

    fn on_step(&mut self, step: Step) {
        match step {
            Step::Called(item, outcome, calls) => {
                self.calls.extend(calls);
                self.send_outputs(item, outcome);
            }
            Step::Handled(item, sent) => self.handled(item, sent),
            Step::BackedOff(item) if self.stopping => self.settle(item, Verdict::Requeue),
            Step::BackedOff(item) => self.ready.push_front(item),
            Step::Confirmed(item, target, failed) => self.confirmed(item, target, failed),
            Step::Abandoned(item) => self.settle(item, Verdict::Requeue),
            Step::Settled { count, in_order } => {
                self.window.close(count);
                if in_order {
                    self.settling_in_order = false;
                    self.release_in_order();
                }
            }
        }
    }

    fn release_key(&mut self, item: &InFlight) {
        if let Some(next) = self.lanes.release(item.key()) {
            self.ready.push_back(next);
        }
    }

    fn handler_failed(&mut self, item: InFlight, failure: Failure) {
        let binding = &self.binding;
        // A send that did not get through is no fault of the message: it is tried until it
        // gets through or the binding stops, never dropped or dead-lettered for it.
        let unbounded = failure.kind() == FailureKind::Send;
        let retry = failure.is_retryable()
            && (unbounded || item.attempts < binding.properties.max_attempts);
        if retry && self.stopping {
            return self.settle(item, Verdict::Requeue);
        }
        if retry {
            // The message waits without a handler; its key stays held, so only later
            // messages with the same key wait with it.
            let wait = binding.properties.back_off(item.attempts);
            tracing::warn!(binding = %binding.binding, message_id = %item.id, attempt = item.attempts, %failure, "handling failed; retrying in {wait:?}");
            binding.meter.retried();
            let job = self.after(wait, item, Step::BackedOff);
            return self.jobs.push(job);
        }
        self.release_key(&item);
        self.dead_letter(item, failure);
    }

    /// Waits `wait`, then makes the step; or hands the message back if the binding stops.
    fn after(&self, wait: Duration, item: InFlight, then: fn(InFlight) -> Step) -> Job {
        let mut halted = self.halt.subscribe();
        Box::pin(async move {
            tokio::select! {
                _ = halted.wait_for(|halted| *halted) => Step::Abandoned(item),
                _ = tokio::time::sleep(wait) => then(item),
            }
        })
    }

    fn dead_letter(&mut self, item: InFlight, failure: Failure) {
        let binding = &self.binding;
        let attempts = item.attempts;
        let Some((destination, producer)) = binding.dead_letter.clone() else {
            tracing::error!(binding = %binding.binding, message_id = %item.id, attempts, %failure, "message dropped after failing; set `dlq = true` to keep such messages");
            binding.meter.dropped();
            return self.settle(item, Verdict::Ack);
        };
        let letter = dead_letter(&item, &failure, &binding.destination);
        self.push_job(Box::pin(async move {
            let sendings =
                enqueue_all(&producer, &destination, Sendings::default(), vec![letter]).await;
            let failed = confirm_all(sendings).await;
            Step::Confirmed(item, Target::DeadLetter { failure }, failed)
        }));
    }

    fn confirmed(
        &mut self,
        mut item: InFlight,
        target: Target,
        failed: Vec<(Option<Message>, Error)>,
    ) {
        let binding = self.binding.clone();
        match &target {
            Target::Outputs => {
                binding
                    .meter
                    .sent(item.unconfirmed.saturating_sub(failed.len()));
                item.unconfirmed = failed.len();
            }
            Target::DeadLetter { .. } if failed.is_empty() => binding.meter.dead_lettered(),
            Target::DeadLetter { .. } => {}
        }
        if failed.is_empty() {
            if let Target::DeadLetter { failure } = &target {
                tracing::warn!(binding = %binding.binding, message_id = %item.id, attempts = item.attempts, %failure, "message sent to the dead-letter destination");
            }
            return self.settle(item, Verdict::Ack);
        }
        // A message lost with a panicking producer cannot be sent again: refused for good.
        let refused = failed
            .iter()
            .find(|(message, error)| message.is_none() || error.is_permanent());
        if let (Target::Outputs, Some((_, error))) = (&target, refused) {
            tracing::error!(binding = %binding.binding, message_id = %item.id, %error, "the broker refused an output for good; the input is dead-lettered instead of retried");
            let failure =
                Failure::new(FailureKind::Send, "bindery::SendRefused", error.to_string());
            return self.dead_letter(item, failure);
        }
        let (_, error) = refused.unwrap_or(&failed[0]);
        if self.stopping {
            tracing::warn!(binding = %binding.binding, message_id = %item.id, %error, "sending failed while stopping; the message will be delivered again");
            return self.settle(item, Verdict::Requeue);
        }
        item.send_failures += 1;
        let wait = binding.properties.back_off(item.send_failures);
        let what = match target {
            Target::Outputs => "sending an output",
            Target::DeadLetter { .. } => "dead-lettering",
        };
        match refused {
            // Only a dead letter is still here refused: a dead-letter destination that refuses
            // (not authorised, say) is for the operator to mend, never a reason to drop the
            // input. It is sent again like any failed send, and said louder.
            Some(_) => {
                tracing::error!(binding = %binding.binding, message_id = %item.id, failures = item.send_failures, %error, "the dead-letter destination refused the message; sending it again in {wait:?}, the input unacknowledged until it is taken")
            }
            None => {
                tracing::warn!(binding = %binding.binding, message_id = %item.id, failures = item.send_failures, %error, "{what} failed; sending it again in {wait:?}")
            }
        }
        let lost = failed.iter().any(|(message, _)| message.is_none());
        let mut messages: Batch = failed
            .into_iter()
            .filter_map(|(message, _)| message)
            .collect();
        // A dead letter is made again from its input should it ever be lost.
        if let (true, Target::DeadLetter { failure }) = (lost, &target) {
            messages = vec![dead_letter(&item, failure, &binding.destination)];
        }
        let mut halted = self.halt.subscribe();
        self.jobs.push(Box::pin(async move {
            tokio::select! {
                _ = halted.wait_for(|halted| *halted) => return Step::Abandoned(item),
                _ = tokio::time::sleep(wait) => {}
            }
            let (destination, producer) = match &target {
                Target::Outputs => match &binding.invoker.output {
                    Some(output) => (output.destination.clone(), output.producer.clone()),
                    None => return Step::Abandoned(item),
                },
                Target::DeadLetter { .. } => match &binding.dead_letter {
                    Some(dead_letter) => dead_letter.clone(),
                    None => return Step::Abandoned(item),
                },
            };
            let sendings =
                enqueue_all(&producer, &destination, Sendings::default(), messages).await;
            let failed = confirm_all(sendings).await;
            Step::Confirmed(item, target, failed)
        }));
    }

    fn settle(&mut self, item: InFlight, verdict: Verdict) {
        if verdict == Verdict::Ack {
            self.binding.meter.done(item.received_at);
        }
        if let Some(in_order) = &mut self.in_order {
            in_order.decide(item.sequence, item.acknowledgement, verdict);
            self.keep_spare(item.message);
            return self.release_in_order();
        }
        let settling = match settle(item.acknowledgement, verdict) {
            Settling::Done(settled) => {
                self.window.close(1);
                self.keep_spare(item.message);
                return unsettled(&self.binding.binding, &item.id, settled);
            }
            Settling::Waiting(settling) => settling,
        };
        let binding = self.binding.binding.clone();
        let id = item.id;
        self.jobs.push(Box::pin(async move {
            unsettled(&binding, &id, settling.await);
            Step::Settled {
                count: 1,
                in_order: false,
            }
        }));
    }

    /// `message`, to be changed: a message its binder still shares (to deliver it again) is
    /// copied first, into the allocation of a message settled before where there is one.
    fn own<'a>(&mut self, message: &'a mut Arc<Message>) -> &'a mut Message {
        if Arc::get_mut(message).is_none() {
            if let Some(mut spare) = self.spare.take() {
                if let Some(slot) = Arc::get_mut(&mut spare) {
                    slot.clone_from(message);
                    *message = spare;
                }
            }
        }
        Arc::make_mut(message)
    }

    /// Keeps the allocation of a settled message for the next copy [`own`](Self::own) makes,
    /// when nothing else holds it; the message itself is dropped now.
    fn keep_spare(&mut self, mut message: Arc<Message>) {
        if let Some(settled) = Arc::get_mut(&mut message) {
            *settled = Message::new(Bytes::new());
            self.spare = Some(message);
        }
    }

    /// Settles, one at a time and in arrival order, every verdict with none undecided before it.
    fn release_in_order(&mut self) {
        let Some(in_order) = &mut self.in_order else {
            return;
        };
        if self.settling_in_order {
            return;
        }
        let batch = in_order.releasable();
        if batch.is_empty() {
            return;
        }
        self.settling_in_order = true;
        let binding = self.binding.binding.clone();
        self.push_job(Box::pin(async move {
            let count = batch.len();
            for (acknowledgement, verdict) in batch {
                if let Err(error) = settle(acknowledgement, verdict).finish().await {
                    tracing::warn!(%binding, %error, "settling a message with the broker failed; it may be delivered again");
                }
            }
            Step::Settled {
                count,
                in_order: true,
            }
        }));
    }

    /// Stops taking messages: those not started go back to the broker; handlers running
    /// finish and their outputs are confirmed; waits are cut short.
    fn stop(&mut self) {
        self.stopping = true;
        self.halt.send_replace(true);
        let waiting: Vec<InFlight> = self.ready.drain(..).chain(self.lanes.drain()).collect();
        let mut waiting = waiting;
        waiting.sort_by_key(|item| item.sequence);
        for item in waiting {
            self.settle(item, Verdict::Requeue);
        }
    }
}

/// Logs a settlement the broker did not take.
fn unsettled(binding: &str, id: &MessageId, settled: Result<(), Error>) {
    if let Err(error) = settled {
        tracing::warn!(%binding, message_id = %id, %error, "settling the message with the broker failed; it may be delivered again");
    }
}

/// The original message with the failure headers of the dead-letter contract, and the
/// correlation id the binding gave it.
fn dead_letter(item: &InFlight, failure: &Failure, destination: &str) -> Message {
    let attempts = item.attempts;
    let mut message = Message::clone(&item.message);
    // The dead-letter destination is not partitioned, whatever partition the input came from.
    message.set_partition(None);
    let headers = message.headers_mut();
    if !headers.contains(header::CORRELATION_ID) {
        headers.set_static(header::CORRELATION_ID, item.id.bytes().clone());
    }
    headers.insert(
        header::EXCEPTION_MESSAGE,
        clipped(failure.message(), EXCEPTION_MESSAGE_LIMIT).as_bytes(),
    );
    headers.insert(header::EXCEPTION_TYPE, failure.type_name());
    headers.insert(header::ORIGINAL_DESTINATION, destination);
    headers.insert(header::ATTEMPTS, attempts.to_string());
    message
}

/// The longest `x-exception-message` a dead letter carries, in bytes: a handler's error text
/// can be long, and a dead letter larger than the broker takes is refused for good.
const EXCEPTION_MESSAGE_LIMIT: usize = 4096;

/// `text`, cut to at most `limit` bytes on a character boundary and ending in `…` when cut.
fn clipped(text: &str, limit: usize) -> Cow<'_, str> {
    if text.len() <= limit {
        return Cow::Borrowed(text);
    }
    let mut end = limit.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// Polls a supplier every `every` until shutdown, sending what it returns.
///
/// What the broker did not confirm is sent again (the same messages, with the same ids) with
/// the default back-off, and the supplier is not called again until all of it is confirmed:
/// a supplier's output has no input to be delivered again, so a failed send is its only copy.
pub(crate) async fn run_supplier(
    invoker: Invoker,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = ticks.tick() => {}
        }
        let tick = Arc::new(Message::new(Bytes::new()));
        let (called, next_calls) = invoker
            .call(calls.take(), tick, Lineage::default(), CallSpan::default())
            .await;
        calls = next_calls;
        let messages = match called {
            Ok(messages) => messages,
            Err(failure) => {
                tracing::error!(function = %invoker.function, %failure, "supplier failed; it will be polled again");
                continue;
            }
        };
        if let Some(output) = &invoker.output {
            let messages = output.prepared(messages, &Lineage::default());
            send_until_confirmed(&invoker.function, output, messages, &mut shutdown).await;
        }
    }
}

/// A supplier's message's id, for the log.
fn supplied_id(message: &Message) -> &str {
    message
        .headers()
        .get_str(header::MESSAGE_ID)
        .unwrap_or("(none)")
}

/// The ids of a supplier's messages not confirmed yet: should the application give up on
/// them (the task aborted when `stream.shutdown-timeout` runs out), they are logged as it
/// drops them, since nothing else holds a copy. Given up on while a round was answered in
/// part, every message of the round is logged, those confirmed among them: hence "may".
struct Unconfirmed<'a> {
    function: &'a str,
    ids: Vec<String>,
}

impl Unconfirmed<'_> {
    fn are(&mut self, messages: &[Message]) {
        self.ids.clear();
        self.ids.extend(
            messages
                .iter()
                .map(|message| supplied_id(message).to_owned()),
        );
    }
}

impl Drop for Unconfirmed<'_> {
    fn drop(&mut self) {
        for message_id in &self.ids {
            tracing::error!(function = self.function, message_id, "the application stopped before a supplier's message was confirmed; it may not have been sent");
        }
    }
}

/// Sends a supplier's `messages` until each is confirmed or refused for good, or until the
/// application stops; what is given up on is logged at error level with its id.
async fn send_until_confirmed(
    function: &str,
    output: &Output,
    mut messages: Batch,
    shutdown: &mut watch::Receiver<bool>,
) {
    let back_off = ConsumerProperties::default();
    let mut failures = 0;
    let mut unconfirmed = Unconfirmed {
        function,
        ids: Vec::new(),
    };
    loop {
        unconfirmed.are(&messages);
        let mut failed = output.send_prepared(messages).await;
        // Answered: the guard holds nothing until what is left to send again is known, so a
        // round that was confirmed logs nothing.
        let sent = std::mem::take(&mut unconfirmed.ids);
        // A message lost with a panicking producer, or refused for good, cannot be sent again.
        failed.retain(|(message, error)| match message {
            Some(_) if !error.is_permanent() => true,
            Some(message) => {
                tracing::error!(function, message_id = supplied_id(message), %error, "the broker refused a supplier's message for good; it is dropped");
                false
            }
            None => {
                tracing::error!(function, message_ids = ?sent, %error, "one of these supplier's messages was lost while it was sent (its producer panicked)");
                false
            }
        });
        let Some(error) = failed.first().map(|(_, error)| error.to_string()) else {
            return;
        };
        messages = failed
            .into_iter()
            .filter_map(|(message, _)| message)
            .collect();
        unconfirmed.are(&messages);
        failures += 1;
        let wait = back_off.back_off(failures);
        if !*shutdown.borrow() {
            tracing::warn!(function, failures, %error, unconfirmed = messages.len(), "sending a supplier's messages failed; sending them again in {wait:?}");
        }
        let stopped = *shutdown.borrow()
            || tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => true,
                _ = tokio::time::sleep(wait) => false,
            };
        // Logged as `unconfirmed` drops.
        if stopped {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::handler::{Context, Handler, HandlerFuture};
    use crate::message::header;
    use crate::testing::TestApp;
    use crate::{Application, Failure, FailureKind, Message, StreamFunction};

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn a_long_exception_message_is_cut_on_a_character_boundary() {
        assert_eq!(super::clipped("short", 10), "short");
        let long = "é".repeat(3_000);
        let cut = super::clipped(&long, super::EXCEPTION_MESSAGE_LIMIT);
        assert!(cut.len() <= super::EXCEPTION_MESSAGE_LIMIT, "{}", cut.len());
        assert!(
            cut.len() > super::EXCEPTION_MESSAGE_LIMIT - 8,
            "{}",
            cut.len()
        );
        assert!(cut.ends_with("é…"), "cut whole characters only");
    }

    /// Run by the core's own tests with and without the feature `otel`, whose spans take
    /// another path to the lineage a call hands on.
    #[tokio::test]
    async fn a_payload_only_handler_hands_its_inputs_id_on_as_the_correlation_id() {
        let upper = StreamFunction::function("upper", |text: String| async move {
            match text.as_str() {
                "fail" => Err(Failure::new(FailureKind::Handler, "test::Refused", "no")),
                _ => Ok(text.to_uppercase()),
            }
        })
        .input("core-upper-in")
        .output("core-upper-out")
        .group("g");
        assert!(!upper.sees_headers(), "a `String` shows no headers");
        let builder = Application::builder()
            .without_registered_functions()
            .function(upper);
        let app = TestApp::start_with(
            builder,
            "[stream.bindings.upper-in-0.consumer]\nmax-attempts = 1\ndlq = true",
        )
        .await
        .expect("start");
        let with_id = |id: &str, text: &'static str| {
            Message::builder(Bytes::from_static(text.as_bytes()))
                .header(header::MESSAGE_ID, id)
                .build()
        };
        app.send("core-upper-in", with_id("text-1", "hi"))
            .await
            .unwrap();
        let out = app
            .receive("core-upper-out", WAIT)
            .await
            .expect("an output");
        assert_eq!(&out.payload()[..], b"HI");
        assert_eq!(
            out.headers().get_str(header::CORRELATION_ID),
            Some("text-1")
        );
        app.send("core-upper-in", with_id("text-2", "fail"))
            .await
            .unwrap();
        let dead = app
            .receive_dead_letter("core-upper-in", "g", WAIT)
            .await
            .expect("a dead letter");
        assert_eq!(
            dead.headers().get_str(header::CORRELATION_ID),
            Some("text-2")
        );
        app.shutdown().await.unwrap();
    }

    /// A handler written by hand that works before it returns its future, and panics there.
    #[derive(Clone)]
    struct PanicsBeforeItsFuture {
        calls: Arc<AtomicUsize>,
    }

    impl Handler<PanicsBeforeItsFuture> for PanicsBeforeItsFuture {
        fn call(&self, message: Arc<Message>, context: Context) -> HandlerFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert_ne!(
                &message.payload()[..],
                b"boom",
                "a handler that panics early"
            );
            Box::pin(async move { Ok(context.outputs()) })
        }
    }

    #[tokio::test]
    async fn a_handler_that_panics_before_its_future_is_retried_then_dead_lettered() {
        for concurrency in [1, 4] {
            let handler = PanicsBeforeItsFuture {
                calls: Default::default(),
            };
            let calls = handler.calls.clone();
            let eager = StreamFunction::consumer("eager", handler)
                .input("core-eager-in")
                .group("g");
            let builder = Application::builder()
                .without_registered_functions()
                .function(eager);
            let app = TestApp::start_with(
                builder,
                &format!("[stream.bindings.eager-in-0.consumer]\nmax-attempts = 2\ndlq = true\nconcurrency = {concurrency}\nback-off-initial-interval = \"10ms\""),
            )
            .await
            .expect("start");
            app.send("core-eager-in", "boom").await.unwrap();
            let dead = app
                .receive_dead_letter("core-eager-in", "g", WAIT)
                .await
                .unwrap_or_else(|| panic!("no dead letter at concurrency {concurrency}"));
            assert_eq!(&dead.payload()[..], b"boom");
            assert_eq!(dead.headers().get_str(header::ATTEMPTS), Some("2"));
            // The binding goes on with the next message.
            app.send("core-eager-in", "fine").await.unwrap();
            let deadline = tokio::time::Instant::now() + WAIT;
            while calls.load(Ordering::SeqCst) < 3 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the next message was not handled at concurrency {concurrency}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            app.shutdown().await.unwrap();
        }
    }
}
