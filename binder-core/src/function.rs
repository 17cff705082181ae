//! Stream functions and their registration.

use std::fmt;

use crate::handler::{erase, ErasedHandler, Handler};

/// The three shapes of stream function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionKind {
    /// Takes a message from `<name>-in-0`, sends what it returns to `<name>-out-0`.
    Function,
    /// Takes a message from `<name>-in-0` and sends nothing.
    Consumer,
    /// Takes nothing; polled every `poll`, it sends what it returns to `<name>-out-0`.
    Supplier,
}

/// A function bound to destinations by the runtime: what `#[stream_function]` registers, and
/// what can be written by hand and passed to [`crate::ApplicationBuilder::function`].
///
/// ```
/// use bindery_core::{Decoded, StreamFunction};
/// # #[derive(serde::Deserialize)] struct Invoice { total_cents: u64 }
/// let print = StreamFunction::consumer("print", |invoice: Decoded<Invoice>| async move {
///     println!("{}", invoice.0.total_cents);
/// })
/// .input("invoices")
/// .group("printers");
/// assert_eq!(print.input_binding().as_deref(), Some("print-in-0"));
/// ```
#[derive(Clone)]
pub struct StreamFunction {
    name: String,
    kind: FunctionKind,
    input: Option<String>,
    output: Option<String>,
    group: Option<String>,
    poll: Option<String>,
    refusal: Option<String>,
    schemas: PayloadSchemas,
    pub(crate) handler: ErasedHandler,
    /// [`Handler::READS_HEADERS`] of the handler.
    pub(crate) reads_headers: bool,
}

/// A function that gives a payload type's JSON Schema, for the AsyncAPI document.
pub type SchemaFn = fn() -> serde_json::Value;

/// The JSON Schemas of a function's input and output payloads, where they are known.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
pub(crate) struct PayloadSchemas {
    pub(crate) input: Option<SchemaFn>,
    pub(crate) output: Option<SchemaFn>,
}

impl fmt::Debug for StreamFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamFunction")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("input", &self.input)
            .field("output", &self.output)
            .field("group", &self.group)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl StreamFunction {
    fn new<Args, H: Handler<Args>>(
        name: impl Into<String>,
        kind: FunctionKind,
        handler: H,
    ) -> Self {
        StreamFunction {
            name: name.into(),
            kind,
            input: None,
            output: None,
            group: None,
            poll: None,
            refusal: None,
            schemas: PayloadSchemas::default(),
            reads_headers: H::READS_HEADERS,
            handler: erase(handler),
        }
    }

    /// A function: one message in, what it returns out.
    pub fn function<Args, H: Handler<Args>>(name: impl Into<String>, handler: H) -> Self {
        Self::new(name, FunctionKind::Function, handler)
    }

    /// A consumer: one message in, nothing out.
    pub fn consumer<Args, H: Handler<Args>>(name: impl Into<String>, handler: H) -> Self {
        Self::new(name, FunctionKind::Consumer, handler)
    }

    /// A supplier: polled every `poll` (default 1s); what it returns goes out.
    pub fn supplier<Args, H: Handler<Args>>(name: impl Into<String>, handler: H) -> Self {
        Self::new(name, FunctionKind::Supplier, handler)
    }

    /// The default destination of the input binding (else the binding's name).
    pub fn input(mut self, destination: impl Into<String>) -> Self {
        self.input = Some(destination.into());
        self
    }

    /// The default destination of the output binding (else the binding's name).
    pub fn output(mut self, destination: impl Into<String>) -> Self {
        self.output = Some(destination.into());
        self
    }

    /// The default consumer group of the input binding.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// How often a supplier is polled, as a duration such as `"500ms"`.
    pub fn poll(mut self, every: impl Into<String>) -> Self {
        self.poll = Some(every.into());
        self
    }

    /// Says whether the handler can see its input's headers; by default, whether any of its
    /// arguments can ([`FromMessage::READS_HEADERS`](crate::FromMessage::READS_HEADERS)).
    /// Before calling a handler that can, the binding sets `x-correlation-id` on an input that
    /// arrived without one, which costs a copy of the message; outputs get the correlation id
    /// either way. `#[stream_function]`, whose handler takes the whole message, says `false`
    /// for a function that takes only its payload and context. Saying `false` for a handler
    /// that does take `Message<T>`, `Arc<Message>` or `Headers` hides the correlation id from
    /// it (not from its outputs).
    ///
    /// ```
    /// use bindery_core::StreamFunction;
    /// let shout = StreamFunction::function("shout", |text: String| async move { text.to_uppercase() })
    ///     .reads_headers(false);
    /// # let _ = shout;
    /// ```
    pub fn reads_headers(mut self, reads: bool) -> Self {
        self.reads_headers = reads;
        self
    }

    /// Whether the handler can see its input's headers (see
    /// [`reads_headers`](Self::reads_headers)).
    pub fn sees_headers(&self) -> bool {
        self.reads_headers
    }

    /// Marks the function as one that must not run, for `why`: building an application that
    /// binds it fails with that reason. `#[stream_function]` uses it for what it can only check
    /// once the program runs, such as a `Result` behind a type alias.
    pub fn refused(mut self, why: impl Into<String>) -> Self {
        self.refusal = Some(why.into());
        self
    }

    /// The JSON Schemas of the payload the function takes and of the one it returns, for the
    /// AsyncAPI document (feature `asyncapi`); `None` where there is none. `#[stream_function]`
    /// sets them for payload types that derive `schemars::JsonSchema`.
    ///
    /// ```
    /// use bindery_core::StreamFunction;
    /// fn text() -> serde_json::Value {
    ///     serde_json::json!({"type": "string"})
    /// }
    /// let shout = StreamFunction::function("shout", |text: String| async move { text.to_uppercase() })
    ///     .payload_schemas(Some(text), Some(text));
    /// # let _ = shout;
    /// ```
    pub fn payload_schemas(mut self, input: Option<SchemaFn>, output: Option<SchemaFn>) -> Self {
        self.schemas = PayloadSchemas { input, output };
        self
    }

    #[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
    pub(crate) fn schemas(&self) -> PayloadSchemas {
        self.schemas
    }

    /// Why the function must not run, if it was [refused](Self::refused).
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its shape.
    pub fn kind(&self) -> FunctionKind {
        self.kind
    }

    /// `<name>-in-0`, unless it is a supplier.
    pub fn input_binding(&self) -> Option<String> {
        (self.kind != FunctionKind::Supplier).then(|| format!("{}-in-0", self.name))
    }

    /// `<name>-out-0`, unless it is a consumer.
    pub fn output_binding(&self) -> Option<String> {
        (self.kind != FunctionKind::Consumer).then(|| format!("{}-out-0", self.name))
    }

    pub(crate) fn default_input(&self) -> Option<&str> {
        self.input.as_deref()
    }

    pub(crate) fn default_output(&self) -> Option<&str> {
        self.output.as_deref()
    }

    pub(crate) fn default_group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    pub(crate) fn poll_text(&self) -> Option<&str> {
        self.poll.as_deref()
    }
}

/// A function registered at link time, as `#[stream_function]` does:
///
/// ```
/// use bindery_core::{Decoded, FunctionRegistration, StreamFunction};
/// fn audit() -> StreamFunction {
///     StreamFunction::consumer("audit", |line: String| async move { println!("{line}") })
/// }
/// bindery_core::inventory::submit! { FunctionRegistration::new(audit) }
/// ```
#[derive(Debug)]
pub struct FunctionRegistration {
    make: fn() -> StreamFunction,
}

impl FunctionRegistration {
    /// Registers the function `make` returns.
    pub const fn new(make: fn() -> StreamFunction) -> Self {
        FunctionRegistration { make }
    }
}

inventory::collect!(FunctionRegistration);

/// Every function registered with [`FunctionRegistration`], sorted by name.
pub fn registered_functions() -> Vec<StreamFunction> {
    let mut functions: Vec<StreamFunction> = inventory::iter::<FunctionRegistration>
        .into_iter()
        .map(|registration| (registration.make)())
        .collect();
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    functions
}
