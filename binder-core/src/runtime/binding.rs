//! The path of one message: binder (receive) → decode, invoke, retry or dead-letter, encode →
//! binder (send, confirm) → acknowledge. This is the only place that policy lives.

use std::any::Any;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::bridge::Output;
use crate::binder::{Delivery, Producer, Subscription};
use crate::config::ConsumerProperties;
use crate::handler::{Context, ErasedHandler, Failure, FailureKind};
use crate::message::header;
use crate::Message;

/// One handler bound to its input (or poll timer) and its output.
#[derive(Clone)]
pub(crate) struct Invoker {
    pub(crate) function: String,
    pub(crate) handler: ErasedHandler,
    pub(crate) context: Context,
    pub(crate) output: Option<Arc<Output>>,
}

impl Invoker {
    /// Calls the handler and sends what it returned; a panic is a failure like any other.
    async fn invoke(
        &self,
        message: Message,
        correlation_id: Option<&Bytes>,
    ) -> Result<usize, Failure> {
        let call = (self.handler)(message, self.context.clone());
        let outputs = match AssertUnwindSafe(call).catch_unwind().await {
            Ok(result) => result?,
            Err(panic) => {
                return Err(Failure::new(
                    FailureKind::Panic,
                    "panic",
                    panic_text(&*panic),
                ))
            }
        };
        let sent = outputs.len();
        match &self.output {
            Some(output) => output
                .send_all(outputs, correlation_id)
                .await
                .map_err(|e| Failure::new(FailureKind::Send, "bindery::Error", e.to_string()))?,
            None if outputs.is_empty() => {}
            None => {
                return Err(Failure::new(
                    FailureKind::Encode,
                    "bindery::Error",
                    "a consumer returned messages but has no output binding",
                ))
            }
        }
        Ok(sent)
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        format!("handler panicked: {text}")
    } else if let Some(text) = panic.downcast_ref::<String>() {
        format!("handler panicked: {text}")
    } else {
        "handler panicked".to_owned()
    }
}

/// A consumer binding: its invoker, failure settings and dead-letter producer.
pub(crate) struct InputBinding {
    pub(crate) binding: String,
    pub(crate) destination: String,
    pub(crate) properties: ConsumerProperties,
    pub(crate) invoker: Invoker,
    pub(crate) dead_letter: Option<Arc<dyn Producer>>,
}

enum Outcome {
    Handled,
    Failed(Failure, u32),
    Abandoned,
}

impl InputBinding {
    /// Reads from the subscription until shutdown, handing messages to `concurrency` workers.
    /// Messages with the same key always go to the same worker, so their order is kept.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut subscription: Box<dyn Subscription>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let workers = self.properties.concurrency.max(1) as usize;
        let mut senders = Vec::with_capacity(workers);
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            let (tx, mut rx) = mpsc::channel::<Delivery>(1);
            senders.push(tx);
            let binding = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                while let Some(delivery) = rx.recv().await {
                    binding.process(delivery, &shutdown).await;
                }
            });
        }
        let mut next_worker = 0usize;
        loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                next = subscription.next() => next,
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::error!(binding = %self.binding, %error, "receiving failed; trying again in 1s");
                    tokio::select! {
                        _ = shutdown.wait_for(|stop| *stop) => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
                None => break,
            };
            let worker = match delivery.message.key() {
                Some(key) => {
                    let mut hasher = DefaultHasher::new();
                    key.hash(&mut hasher);
                    (hasher.finish() % workers as u64) as usize
                }
                None => {
                    next_worker = (next_worker + 1) % workers;
                    next_worker
                }
            };
            // A delivery dropped here, unsent because of shutdown, is redelivered by the binder.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                _ = senders[worker].send(delivery) => {}
            }
        }
        drop(senders);
        while tasks.join_next().await.is_some() {}
        if let Err(error) = subscription.close().await {
            tracing::warn!(binding = %self.binding, %error, "closing the subscription failed");
        }
    }

    async fn process(&self, delivery: Delivery, shutdown: &watch::Receiver<bool>) {
        let Delivery {
            mut message,
            acknowledgement,
            ..
        } = delivery;
        let message_id = message
            .headers()
            .get_str(header::MESSAGE_ID)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if !message.headers().contains(header::CORRELATION_ID) {
            message
                .headers_mut()
                .insert(header::CORRELATION_ID, &message_id);
        }
        let correlation_id = message.headers().get(header::CORRELATION_ID).cloned();

        let outcome = self
            .handle(&message, correlation_id.as_ref(), &message_id, shutdown)
            .await;
        let settled = match outcome {
            Outcome::Handled => acknowledgement.ack().await,
            Outcome::Abandoned => acknowledgement.requeue().await,
            Outcome::Failed(failure, attempts) => match &self.dead_letter {
                Some(dlq) => match dlq
                    .send(dead_letter(message, &failure, &self.destination, attempts))
                    .await
                {
                    Ok(()) => {
                        tracing::warn!(binding = %self.binding, %message_id, attempts, %failure, "message sent to the dead-letter destination");
                        acknowledgement.ack().await
                    }
                    Err(error) => {
                        tracing::error!(binding = %self.binding, %message_id, %error, "dead-lettering failed; the message will be redelivered");
                        tokio::time::sleep(
                            self.properties
                                .back_off_max_interval
                                .min(Duration::from_secs(1)),
                        )
                        .await;
                        acknowledgement.requeue().await
                    }
                },
                None => {
                    tracing::error!(binding = %self.binding, %message_id, attempts, %failure, "message dropped after failing; set `dlq = true` to keep such messages");
                    acknowledgement.ack().await
                }
            },
        };
        if let Err(error) = settled {
            tracing::warn!(binding = %self.binding, %message_id, %error, "acknowledging failed; the broker may deliver the message again");
        }
    }

    /// Tries the handler up to `max-attempts` times with exponential back-off.
    async fn handle(
        &self,
        message: &Message,
        correlation_id: Option<&Bytes>,
        message_id: &str,
        shutdown: &watch::Receiver<bool>,
    ) -> Outcome {
        let mut attempt = 1;
        loop {
            let failure = match self.invoker.invoke(message.clone(), correlation_id).await {
                Ok(_) => return Outcome::Handled,
                Err(failure) => failure,
            };
            if !failure.is_retryable() || attempt >= self.properties.max_attempts {
                return Outcome::Failed(failure, attempt);
            }
            let wait = self.properties.back_off(attempt);
            tracing::warn!(binding = %self.binding, %message_id, attempt, %failure, "handling failed; retrying in {wait:?}");
            let mut shutdown = shutdown.clone();
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return Outcome::Abandoned,
                _ = tokio::time::sleep(wait) => {}
            }
            attempt += 1;
        }
    }
}

/// The original message with the failure headers of the dead-letter contract.
fn dead_letter(
    mut message: Message,
    failure: &Failure,
    destination: &str,
    attempts: u32,
) -> Message {
    let headers = message.headers_mut();
    headers.insert(header::EXCEPTION_MESSAGE, failure.message());
    headers.insert(header::EXCEPTION_TYPE, failure.type_name());
    headers.insert(header::ORIGINAL_DESTINATION, destination);
    headers.insert(header::ATTEMPTS, attempts.to_string());
    message
}

/// Polls a supplier every `every` until shutdown, sending what it returns.
pub(crate) async fn run_supplier(
    invoker: Invoker,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            _ = ticks.tick() => {}
        }
        if let Err(failure) = invoker.invoke(Message::new(Bytes::new()), None).await {
            tracing::error!(function = %invoker.function, %failure, "supplier failed; it will be polled again");
        }
    }
}
