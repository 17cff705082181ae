//! The embedded in-memory binder: real group semantics inside one process.
//!
//! Destinations and groups behave as on RabbitMQ: every group of a destination gets every
//! message, consumers in one group compete for them, an anonymous consumer gets every message
//! sent while it is subscribed, and a message received but not acknowledged goes back to its
//! group when its consumer lets go of it. As on RabbitMQ with `mandatory`, sending to a
//! destination that has no group or consumer yet fails rather than losing the message;
//! `producer.required-groups` creates groups up front. A partitioned consumer (instance `i`)
//! has a queue of its own, `<group>-<i>`, which receives only partition `i`, as RabbitMQ's
//! queue `<destination>.<group>-<i>` does. A dead-letter destination is lasting:
//! what is dead-lettered while no group or consumer subscribes to it is kept, and handed to
//! the first group that does.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::binder::{
    Acknowledgement, Binder, BinderProvider, BinderSettings, Confirmation, ConsumerSpec, Delivery,
    Producer, ProducerSpec, Subscription, TryEnqueue,
};
use crate::config::Problems;
use crate::{Error, Message};

/// Why the memory binder could not take a message.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Nothing would receive the message.
    #[error("no group or consumer is subscribed to destination `{0}` (for a partitioned destination: to the message's partition), so the message would be lost; start the consumer first or list its group in `producer.required-groups`")]
    Unroutable(String),
}

/// The in-memory binder, type `memory`. Clones share the same destinations.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), bindery_core::Error> {
/// use bindery_core::{Binder, ConsumerSpec, MemoryBinder, Message, ProducerSpec};
/// let binder = MemoryBinder::new();
/// let mut subscription = binder.subscribe(&ConsumerSpec::new("orders", Some("billing"))).await?;
/// binder.producer(&ProducerSpec::new("orders")).await?.send(Message::new("hi".into())).await?;
/// let delivery = subscription.next().await.unwrap()?;
/// assert_eq!(&delivery.message.payload()[..], b"hi");
/// delivery.acknowledgement.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemoryBinder {
    broker: Arc<Broker>,
}

#[derive(Debug, Default)]
struct Broker {
    // Producers and subscriptions hold their destination, so a send takes no lock but its own
    // destination's and looks up no name.
    destinations: Mutex<HashMap<String, Arc<Mutex<Destination>>>>,
    next_anonymous: AtomicU64,
}

#[derive(Debug, Default)]
struct Destination {
    groups: HashMap<String, Arc<Queue>>,
    anonymous: HashMap<u64, Arc<Queue>>,
    /// Messages are kept while nothing subscribes (a dead-letter destination).
    lasting: bool,
    /// What a lasting destination received before its first consumer.
    kept: VecDeque<Arc<Message>>,
}

impl Destination {
    /// Hands what was kept to a consumer's new queue.
    fn hand_over_kept(&mut self, queue: &Queue) {
        for message in self.kept.drain(..) {
            queue.push_back(message);
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    ready: Mutex<Ready>,
    available: Notify,
    /// Subscriptions consuming from this queue.
    consumers: AtomicUsize,
    /// The one partition this queue receives; `None` for every message.
    partition: Option<u32>,
}

/// The messages of a queue, in the order they were queued first: a message handed back goes
/// back to its place among those handed back, as RabbitMQ requeues, so several handed back
/// one after the other keep their order.
#[derive(Debug, Default)]
struct Ready {
    queued: VecDeque<Queued>,
    next_place: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data that is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Queue {
    fn for_partition(partition: Option<u32>) -> Self {
        Queue {
            partition,
            ..Queue::default()
        }
    }

    fn receives(&self, partition: Option<u32>) -> bool {
        self.partition.is_none() || self.partition == partition
    }

    #[inline]
    fn push_back(&self, message: Arc<Message>) {
        {
            let mut ready = lock(&self.ready);
            let place = ready.next_place;
            ready.next_place += 1;
            ready.queued.push_back(Queued {
                message,
                redelivered: false,
                place,
            });
        }
        self.available.notify_one();
    }

    /// Queues a delivered message again, at its place.
    fn put_back(&self, queued: Queued) {
        {
            let mut ready = lock(&self.ready);
            let at = ready
                .queued
                .partition_point(|other| other.place < queued.place);
            ready.queued.insert(at, queued);
        }
        self.available.notify_one();
    }

    /// The first message waiting, if any.
    fn try_pop(&self) -> Option<Queued> {
        let (next, more) = {
            let mut ready = lock(&self.ready);
            (ready.queued.pop_front(), !ready.queued.is_empty())
        };
        // Pass the wake-up on in case more messages are waiting for other consumers (a single
        // consumer takes the rest itself).
        if next.is_some() && more && self.consumers.load(Ordering::Relaxed) > 1 {
            self.available.notify_one();
        }
        next
    }

    async fn pop(&self) -> Queued {
        loop {
            if let Some(queued) = self.try_pop() {
                return queued;
            }
            self.available.notified().await;
        }
    }
}

impl MemoryBinder {
    /// A binder with no destinations.
    pub fn new() -> Self {
        Self::default()
    }

    /// The destination named `name`, created empty when it does not exist yet.
    fn destination(&self, name: &str) -> Arc<Mutex<Destination>> {
        let mut destinations = lock(&self.broker.destinations);
        match destinations.get(name) {
            Some(destination) => destination.clone(),
            None => destinations.entry(name.to_owned()).or_default().clone(),
        }
    }

    /// The destination named `name`, if anything created it.
    fn existing(&self, name: &str) -> Option<Arc<Mutex<Destination>>> {
        lock(&self.broker.destinations).get(name).cloned()
    }

    /// The queue of `group`, or of its `partition` (named `<group>-<partition>`).
    fn group_queue(&self, destination: &str, group: &str, partition: Option<u32>) -> Arc<Queue> {
        let name = queue_name(group, partition);
        let destination = self.destination(destination);
        let mut destination = lock(&destination);
        if let Some(queue) = destination.groups.get(&name) {
            return queue.clone();
        }
        let queue = Arc::new(Queue::for_partition(partition));
        destination.hand_over_kept(&queue);
        destination.groups.insert(name, queue.clone());
        queue
    }

    /// How many messages a dead-letter `destination` keeps for its first group.
    pub fn kept(&self, destination: &str) -> usize {
        self.existing(destination)
            .map_or(0, |d| lock(&d).kept.len())
    }

    /// How many messages wait in `group` of `destination`, not counting those being handled;
    /// the queue of partition `n` of a group is named `<group>-<n>`.
    pub fn pending(&self, destination: &str, group: &str) -> usize {
        let Some(destination) = self.existing(destination) else {
            return 0;
        };
        let destination = lock(&destination);
        destination
            .groups
            .get(group)
            .map_or(0, |q| lock(&q.ready).queued.len())
    }
}

/// The queue of `group`, or of one `partition` of it.
fn queue_name(group: &str, partition: Option<u32>) -> String {
    match partition {
        Some(partition) => format!("{group}-{partition}"),
        None => group.to_owned(),
    }
}

impl Destination {
    /// Hands `message` to every group and anonymous consumer that receives its partition (or
    /// keeps it, when lasting); the message back when nothing would receive it. Every receiver
    /// shares the one message.
    #[inline]
    fn publish(&mut self, mut message: Message) -> Option<Message> {
        let partition = message.partition();
        let mut receivers = self
            .groups
            .values()
            .chain(self.anonymous.values())
            .filter(|queue| queue.receives(partition));
        // Kept for the first group, as a DLQ queue keeps it on a broker; anonymous consumers
        // see it too.
        let keep = self.lasting && self.groups.is_empty();
        let first = receivers.next();
        if first.is_none() && !keep {
            return Some(message);
        }
        // As from a broker: what partition a message was sent to is the sender's business.
        message.set_partition(None);
        // Every receiver shares the one message: the core copies a message before it changes
        // one its binder shares.
        let message = Arc::new(message);
        let mut last = first;
        for queue in receivers {
            if let Some(previous) = last.replace(queue) {
                previous.push_back(message.clone());
            }
        }
        if keep {
            if let Some(last) = last {
                last.push_back(message.clone());
            }
            self.kept.push_back(message);
        } else if let Some(last) = last {
            last.push_back(message);
        }
        None
    }
}

#[async_trait]
impl Binder for MemoryBinder {
    async fn subscribe(&self, spec: &ConsumerSpec) -> Result<Box<dyn Subscription>, Error> {
        let (queue, anonymous_id) = match &spec.group {
            Some(group) => (
                self.group_queue(&spec.destination, group, spec.properties.partition()),
                None,
            ),
            None => {
                let id = self.broker.next_anonymous.fetch_add(1, Ordering::Relaxed);
                let queue = Arc::new(Queue::for_partition(spec.properties.partition()));
                // What a dead-letter destination kept waits for a group: an anonymous consumer
                // takes nothing with it when it goes.
                lock(&self.destination(&spec.destination))
                    .anonymous
                    .insert(id, queue.clone());
                (queue, Some(id))
            }
        };
        queue.consumers.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(MemorySubscription {
            destination: self.destination(&spec.destination),
            queue,
            anonymous_id,
        }))
    }

    async fn lag(&self, spec: &ConsumerSpec) -> Option<u64> {
        let queue = queue_name(spec.group.as_ref()?, spec.properties.partition());
        Some(self.pending(&spec.destination, &queue) as u64)
    }

    async fn producer(&self, spec: &ProducerSpec) -> Result<Arc<dyn Producer>, Error> {
        let partitions = spec.properties.partition_count;
        for group in &spec.properties.required_groups {
            match partitions {
                1 => drop(self.group_queue(&spec.destination, group, None)),
                _ => {
                    for partition in 0..partitions {
                        self.group_queue(&spec.destination, group, Some(partition));
                    }
                }
            }
        }
        Ok(Arc::new(MemoryProducer {
            name: spec.destination.clone(),
            destination: self.destination(&spec.destination),
        }))
    }

    /// Dead letters go to [`ConsumerSpec::dlq_destination`], which keeps them until a group
    /// subscribes to it: a dead letter is never refused for want of a reader.
    async fn dead_letter_producer(&self, spec: &ConsumerSpec) -> Result<Arc<dyn Producer>, Error> {
        let name = spec.dlq_destination();
        let destination = self.destination(&name);
        lock(&destination).lasting = true;
        Ok(Arc::new(MemoryProducer { name, destination }))
    }
}

#[derive(Debug)]
struct MemoryProducer {
    name: String,
    destination: Arc<Mutex<Destination>>,
}

impl MemoryProducer {
    #[inline]
    fn publish(&self, message: Message) -> TryEnqueue {
        match lock(&self.destination).publish(message) {
            None => TryEnqueue::Confirmed,
            Some(message) => {
                let unroutable = MemoryError::Unroutable(self.name.clone());
                TryEnqueue::Failed(message, Error::binder("memory", unroutable))
            }
        }
    }
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error> {
        match self.publish(message.clone()) {
            TryEnqueue::Failed(_, error) => Err(error),
            _ => Ok(Confirmation::confirmed()),
        }
    }

    fn try_enqueue(&self, message: Message) -> TryEnqueue {
        self.publish(message)
    }
}

#[derive(Debug)]
struct MemorySubscription {
    destination: Arc<Mutex<Destination>>,
    queue: Arc<Queue>,
    anonymous_id: Option<u64>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let queued = self.queue.pop().await;
        Some(Ok(self.delivery(queued)))
    }

    fn try_next(&mut self) -> Option<Result<Delivery, Error>> {
        let queued = self.queue.try_pop()?;
        Some(Ok(self.delivery(queued)))
    }
}

impl MemorySubscription {
    /// Delivers the message, shared with its acknowledgement, which keeps it until it is
    /// settled to queue it again should it not be acknowledged.
    fn delivery(&self, queued: Queued) -> Delivery {
        let acknowledgement = Box::new(MemoryAck {
            message: queued.message.clone(),
            queue: Some(self.queue.clone()),
            place: queued.place,
        });
        Delivery {
            message: queued.message,
            redelivered: queued.redelivered,
            acknowledgement,
        }
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.queue.consumers.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.anonymous_id {
            lock(&self.destination).anonymous.remove(&id);
        }
    }
}

/// A message in a queue, shared once it is queued: queues, deliveries and acknowledgements
/// share it rather than copy it.
#[derive(Debug)]
struct Queued {
    message: Arc<Message>,
    redelivered: bool,
    /// Where it was queued first.
    place: u64,
}

/// A delivered message until it is settled.
#[derive(Debug)]
struct MemoryAck {
    message: Arc<Message>,
    /// Where the message goes back unless it is settled: the queue it was delivered from
    /// until it is acknowledged or requeued.
    queue: Option<Arc<Queue>>,
    place: u64,
}

impl MemoryAck {
    /// Queues the message again, as delivered before, unless it was settled.
    fn hand_back(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.put_back(Queued {
                message: self.message.clone(),
                redelivered: true,
                place: self.place,
            });
        }
    }
}

#[async_trait]
impl Acknowledgement for MemoryAck {
    async fn ack(mut self: Box<Self>) -> Result<(), Error> {
        self.queue = None;
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), Error> {
        self.hand_back();
        Ok(())
    }

    fn try_ack(&mut self) -> Option<Result<(), Error>> {
        self.queue = None;
        Some(Ok(()))
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        self.hand_back();
    }
}

/// Creates [`MemoryBinder`]s for `type = "memory"`. It has no settings of its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryBinderProvider;

impl BinderProvider for MemoryBinderProvider {
    fn binder_type(&self) -> &'static str {
        "memory"
    }

    fn validate(&self, settings: &BinderSettings, problems: &mut Problems) {
        if let Some(node) = &settings.node {
            node.table(&["type"], problems);
        }
    }

    fn create(
        &self,
        _settings: BinderSettings,
    ) -> BoxFuture<'static, Result<Arc<dyn Binder>, Error>> {
        Box::pin(async { Ok(Arc::new(MemoryBinder::new()) as Arc<dyn Binder>) })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn text(delivery: &Delivery) -> String {
        String::from_utf8_lossy(delivery.message.payload()).into_owned()
    }

    /// The next `count` deliveries, kept unsettled.
    fn take(subscription: &mut Box<dyn Subscription>, count: usize) -> Vec<Delivery> {
        (0..count)
            .map(|_| {
                subscription
                    .try_next()
                    .expect("a message")
                    .expect("delivered")
            })
            .collect()
    }

    #[tokio::test]
    async fn messages_handed_back_return_in_the_order_they_were_first_queued() {
        let binder = MemoryBinder::new();
        let mut subscription = binder
            .subscribe(&ConsumerSpec::new("handed-back", Some("group")))
            .await
            .expect("subscription");
        let producer = binder
            .producer(&ProducerSpec::new("handed-back"))
            .await
            .expect("producer");
        for n in 1..=5 {
            producer
                .send(Message::new(Bytes::from(format!("m{n}"))))
                .await
                .expect("send");
        }
        let mut taken = take(&mut subscription, 4);
        let m4 = taken.pop().expect("m4");
        let m3 = taken.pop().expect("m3");
        let m2 = taken.pop().expect("m2");
        let m1 = taken.pop().expect("m1");
        m1.acknowledgement.ack().await.expect("ack");
        // Oldest first, as the engine hands back what it holds; and one out of turn.
        m2.acknowledgement.requeue().await.expect("requeue");
        m4.acknowledgement.requeue().await.expect("requeue");
        drop(m3.acknowledgement);
        // Kept until compared: a delivery dropped unsettled goes back to the queue.
        let again = take(&mut subscription, 4);
        assert_eq!(
            again.iter().map(text).collect::<Vec<_>>(),
            ["m2", "m3", "m4", "m5"]
        );
        assert!(again[..3].iter().all(|delivery| delivery.redelivered));
    }
}
