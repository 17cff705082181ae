use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Mutex, OnceCell};

mod ids;
mod send;

use crate::binder::{Binder, ConsumerSpec, Producer, ProducerSpec};
use crate::config::{normalize_name, BindingConfig};
use crate::config::{ConfigNode, ConsumerProperties, ProducerProperties};
use crate::handler::{Batch, ContentType, IntoOutputs, Outputs, DEFAULT_CONTENT_TYPE};
use crate::message::header;
use crate::partition::PartitionSelector;
use crate::{Error, Headers, Message};
pub(crate) use ids::{new_message_id, output_id, MessageId};
use send::stamp;
pub(crate) use send::{confirm_all, enqueue_all, enqueue_at_once, Sendings};

thread_local! {
    /// What the input message whose handler is being polled on this thread hands on to what it
    /// sends: set for each poll of a handler call (see [`Lineage::in_scope`]).
    static HANDLING: RefCell<Lineage> = const { RefCell::new(Lineage::none()) };
}

/// What an input message hands on to every message its handler sends, returned or sent
/// through a [`StreamBridge`]: its correlation id, and its W3C trace context (`traceparent`,
/// with `tracestate`), so that a chain of services keeps one id and one trace. A message that
/// sets its own correlation id or `traceparent` keeps it; a `tracestate` travels only with the
/// `traceparent` it belongs to.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lineage {
    correlation_id: Option<Bytes>,
    // Shared: most messages carry no trace context, and this one is cloned on every poll.
    trace: Option<Arc<TraceContext>>,
}

#[derive(Debug)]
struct TraceContext {
    parent: Bytes,
    state: Option<Bytes>,
}

impl Lineage {
    const fn none() -> Self {
        Lineage {
            correlation_id: None,
            trace: None,
        }
    }

    /// Runs `f` with this lineage as the one what is sent from this thread hands on, as when
    /// a handler call is polled: moved in and out again, never copied.
    pub(crate) fn in_scope<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let swapped = HANDLING.try_with(|handling| handling.replace(std::mem::take(self)));
        let Ok(outer) = swapped else {
            // A thread's locals are gone while it exits: nothing is handed on then, and the
            // lineage stays where it was.
            return f();
        };
        let _restore = Restore {
            lineage: self,
            outer: Some(outer),
        };
        f()
    }

    /// What `message` hands on.
    pub(crate) fn of(message: &Message) -> Self {
        let headers = message.headers();
        let trace = headers.get(header::TRACEPARENT).map(|parent| {
            Arc::new(TraceContext {
                parent: parent.clone(),
                state: headers.get(header::TRACESTATE).cloned(),
            })
        });
        Lineage {
            correlation_id: headers.get(header::CORRELATION_ID).cloned(),
            trace,
        }
    }

    /// What a received `message` with the id `id` hands on: as [`of`](Self::of), with `id` as
    /// the correlation id when the message has none.
    pub(crate) fn received(message: &Message, id: &MessageId) -> Self {
        let mut lineage = Self::of(message);
        if lineage.correlation_id.is_none() {
            lineage.correlation_id = Some(id.bytes().clone());
        }
        lineage
    }

    /// The same, with the trace context of a span of this service instead of the input's.
    #[cfg(feature = "otel")]
    pub(crate) fn with_trace(self, parent: Bytes, state: Option<Bytes>) -> Self {
        Lineage {
            trace: Some(Arc::new(TraceContext { parent, state })),
            ..self
        }
    }

    /// Sets on `headers` what they do not set themselves. The trace state goes only with its
    /// own trace parent.
    pub(crate) fn hand_on(&self, headers: &mut Headers) {
        if let Some(correlation) = &self.correlation_id {
            if !headers.contains(header::CORRELATION_ID) {
                headers.set_static(header::CORRELATION_ID, correlation.clone());
            }
        }
        if let Some(trace) = &self.trace {
            if !headers.contains(header::TRACEPARENT) {
                headers.set_static(header::TRACEPARENT, trace.parent.clone());
                match &trace.state {
                    Some(state) => headers.set_static(header::TRACESTATE, state.clone()),
                    None => {
                        headers.remove(header::TRACESTATE);
                    }
                }
            }
        }
    }
}

/// Gives the lineage back to its call, and the thread the one it had, however the scope ends.
struct Restore<'a> {
    lineage: &'a mut Lineage,
    outer: Option<Lineage>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let outer = self.outer.take().unwrap_or_default();
        if let Ok(lineage) = HANDLING.try_with(|handling| handling.replace(outer)) {
            *self.lineage = lineage;
        }
    }
}

/// Wraps `call` so that where it runs (a plain handler, on the blocking pool) it sends through
/// a [`StreamBridge`] with the correlation id and trace context of the input being handled here.
#[doc(hidden)]
pub fn with_current_correlation<T>(call: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let lineage = current_lineage();
    // The handler's span too (feature `otel`), so what a plain handler logs is within it.
    #[cfg(feature = "otel")]
    let span = tracing::Span::current();
    move || {
        #[cfg(feature = "otel")]
        let _entered = span.enter();
        let mut lineage = lineage;
        lineage.in_scope(call)
    }
}

/// What the input being handled on this thread hands on; nothing outside a handler.
fn current_lineage() -> Lineage {
    HANDLING
        .try_with(|handling| handling.borrow().clone())
        .unwrap_or_default()
}

/// Sends values or messages to any output binding or destination at run time, with the same
/// conversion and binder selection as a function's output (Spring's `StreamBridge`).
///
/// Take it as a handler argument, or from [`crate::RunningApplication::bridge`].
///
/// ```no_run
/// # async fn demo(bridge: bindery_core::StreamBridge) -> Result<(), bindery_core::Error> {
/// # #[derive(serde::Serialize)] struct Alert { level: u8 }
/// bridge.send("alerts", bindery_core::Encoded(Alert { level: 3 })).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct StreamBridge {
    inner: Arc<BridgeInner>,
}

struct BridgeInner {
    binders: HashMap<String, Arc<dyn Binder>>,
    default_binder: String,
    bindings: BTreeMap<String, ResolvedBinding>,
    dynamic_defaults: BindingConfig,
    /// One cell per target: a destination being provisioned holds back only sends to it.
    outputs: Mutex<HashMap<String, Arc<OnceCell<Arc<Output>>>>>,
    closed: AtomicBool,
}

impl fmt::Debug for StreamBridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamBridge")
            .field("default_binder", &self.inner.default_binder)
            .field("bindings", &self.inner.bindings.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A destination ready to send to: the producer, the binding's content type, and how it
/// partitions.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) content_type: ContentType,
    pub(crate) destination: String,
    pub(crate) producer: Arc<dyn Producer>,
    pub(crate) partitions: Option<PartitionSelector>,
}

impl Output {
    /// Makes a message ready to send here: its id (unless the handler set one), what the input
    /// hands on (its correlation id and trace context), and its partition (cleared when this destination is not partitioned,
    /// so a message passed through keeps no partition of another destination).
    pub(crate) fn prepare(
        &self,
        message: &mut Message,
        id: impl FnOnce() -> MessageId,
        lineage: &Lineage,
    ) {
        stamp(message, id, lineage);
        let partition = self
            .partitions
            .as_ref()
            .map(|partitions| partitions.select(message.key().map(|key| key.as_ref())));
        message.set_partition(partition);
    }

    /// Sends the messages in order, each with a new id, and waits until all were confirmed;
    /// the first failure is returned.
    pub(crate) async fn send_all(&self, messages: Batch, lineage: &Lineage) -> Result<(), Error> {
        let messages = self.prepared(messages, lineage);
        match self.send_prepared(messages).await.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }

    /// `messages`, each [prepared](Self::prepare) with a new id.
    pub(crate) fn prepared(&self, messages: Batch, lineage: &Lineage) -> Batch {
        messages
            .into_iter()
            .map(|mut message| {
                self.prepare(&mut message, new_message_id, lineage);
                message
            })
            .collect()
    }

    /// Sends prepared messages in order and waits until all were answered: those not
    /// confirmed, with why (without the message when a panicking producer lost it).
    pub(crate) async fn send_prepared(&self, messages: Batch) -> Vec<(Option<Message>, Error)> {
        let (sendings, rest) = enqueue_at_once(&self.producer, &self.destination, messages);
        let sendings = enqueue_all(&self.producer, &self.destination, sendings, rest).await;
        confirm_all(sendings).await
    }
}

impl StreamBridge {
    pub(crate) fn new(
        binders: HashMap<String, Arc<dyn Binder>>,
        default_binder: String,
        bindings: BTreeMap<String, ResolvedBinding>,
        dynamic_defaults: BindingConfig,
    ) -> Self {
        StreamBridge {
            inner: Arc::new(BridgeInner {
                binders,
                default_binder,
                bindings,
                dynamic_defaults,
                outputs: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `value` to `target`: an output binding's name (such as `bill-out-0`, or `<name>-out-0`
    /// for a name in `stream.output-bindings`) or else a destination on the default binder.
    /// Returns once the broker confirmed every message.
    ///
    /// Sent from a handler, the messages carry the input's `x-correlation-id` and its trace
    /// context (`traceparent`, `tracestate`), as its returned outputs do (unless they set their
    /// own); from a task the handler spawned, they do not.
    pub async fn send(&self, target: &str, value: impl IntoOutputs) -> Result<(), Error> {
        let output = self.output(target).await?;
        let mut outputs = Outputs::encoded_as(output.content_type.clone());
        value
            .into_outputs(&mut outputs)
            .map_err(|failure| Error::Encode {
                destination: target.to_owned(),
                message: failure.to_string(),
            })?;
        output
            .send_all(outputs.into_batch(), &current_lineage())
            .await
    }

    /// The output for a binding name or destination, created (and provisioned) on first use.
    pub(crate) async fn output(&self, target: &str) -> Result<Arc<Output>, Error> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let cell = {
            let mut outputs = self.inner.outputs.lock().await;
            match outputs.get(target) {
                Some(cell) => cell.clone(),
                None => outputs.entry(target.to_owned()).or_default().clone(),
            }
        };
        let provisioned = cell
            .get_or_try_init(|| self.provision(target))
            .await
            .cloned();
        if provisioned.is_err() {
            // The next send tries again; a target that never works (one named by input data,
            // say) leaves nothing behind.
            let mut outputs = self.inner.outputs.lock().await;
            if outputs
                .get(target)
                .is_some_and(|kept| Arc::ptr_eq(kept, &cell) && !kept.initialized())
            {
                outputs.remove(target);
            }
        }
        provisioned
    }

    /// A producer for `target`, provisioned on its binder.
    async fn provision(&self, target: &str) -> Result<Arc<Output>, Error> {
        let (binder_name, spec, content_type) =
            match self.inner.bindings.get(&normalize_name(target)) {
                Some(binding) => (
                    binding.binder.clone(),
                    binding.producer_spec(),
                    binding.content_type.clone(),
                ),
                None => {
                    let mut spec = ProducerSpec::new(target);
                    self.inner
                        .dynamic_defaults
                        .producer
                        .apply(&mut spec.properties);
                    (
                        self.inner.default_binder.clone(),
                        spec,
                        self.inner.dynamic_defaults.content_type.clone(),
                    )
                }
            };
        let binder = self
            .inner
            .binders
            .get(&binder_name)
            .ok_or_else(|| Error::Binding {
                binding: target.to_owned(),
                message: format!("binder `{binder_name}` is not running"),
            })?;
        let producer = binder.producer(&spec).await?;
        let output = Arc::new(Output {
            content_type: ContentType::new(
                content_type.unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
            ),
            destination: spec.destination.clone(),
            producer,
            partitions: PartitionSelector::for_count(spec.properties.partition_count),
        });
        Ok(output)
    }

    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }
}

/// One binding, fully decided.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedBinding {
    pub(crate) name: String,
    pub(crate) destination: String,
    pub(crate) group: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) binder: String,
    pub(crate) consumer: ConsumerProperties,
    pub(crate) producer: ProducerProperties,
    pub(crate) consumer_extension: Option<ConfigNode>,
    pub(crate) producer_extension: Option<ConfigNode>,
    /// For an output: the application's inputs in its `required-groups`.
    pub(crate) required_group_consumers: Vec<ConsumerSpec>,
    /// For an output: inputs in its `required-groups` of registered functions this application
    /// does not bind.
    pub(crate) required_group_consumers_elsewhere: Vec<ConsumerSpec>,
}

impl ResolvedBinding {
    pub(crate) fn consumer_spec(&self) -> ConsumerSpec {
        ConsumerSpec {
            binding: self.name.clone(),
            destination: self.destination.clone(),
            group: self.group.clone(),
            properties: self.consumer.clone(),
            extension: self.consumer_extension.clone(),
        }
    }

    pub(crate) fn producer_spec(&self) -> ProducerSpec {
        ProducerSpec {
            binding: self.name.clone(),
            destination: self.destination.clone(),
            properties: self.producer.clone(),
            extension: self.producer_extension.clone(),
            required_group_consumers: self.required_group_consumers.clone(),
            required_group_consumers_elsewhere: self.required_group_consumers_elsewhere.clone(),
        }
    }
}
