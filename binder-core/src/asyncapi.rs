//! The application's AsyncAPI 3 document (feature `asyncapi`), from the bound functions and the
//! resolved configuration: a server per binder with a broker of its own (no credentials), a
//! channel per destination, an operation per binding (`receive` for an input, `send` for an
//! output), and a message per binding with its content type and, where the payload type
//! derives `schemars::JsonSchema`, its schema.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::binder::BrokerAddress;
use crate::bridge::ResolvedBinding;
use crate::function::SchemaFn;
use crate::handler::DEFAULT_CONTENT_TYPE;
use crate::runtime::Plan;

/// What the document says about the application itself.
pub(crate) struct Info<'a> {
    pub(crate) title: &'a str,
    pub(crate) version: &'a str,
}

/// One binding as the document shows it.
struct Operation<'a> {
    id: String,
    destination: String,
    binder: &'a str,
    receives: bool,
    group: Option<&'a str>,
    content_type: Option<&'a str>,
    function: Option<&'a str>,
    schema: Option<SchemaFn>,
    /// The dead-letter destination of an input.
    dead_letters: bool,
}

impl<'a> Operation<'a> {
    fn of(binding: &'a ResolvedBinding, receives: bool, function: Option<&'a str>) -> Self {
        Operation {
            id: binding.name.clone(),
            destination: binding.destination.clone(),
            binder: &binding.binder,
            receives,
            group: binding.group.as_deref().filter(|_| receives),
            content_type: binding.content_type.as_deref(),
            function,
            schema: None,
            dead_letters: false,
        }
    }

    fn summary(&self) -> String {
        let destination = &self.destination;
        let mut summary = match (self.receives, self.function) {
            (false, Some(function)) if self.dead_letters => {
                format!("`{function}` sends what fails for good to `{destination}`")
            }
            (true, Some(function)) => format!("`{function}` receives from `{destination}`"),
            (false, Some(function)) => format!("`{function}` sends to `{destination}`"),
            (_, None) => format!("the application sends to `{destination}`"),
        };
        if let Some(group) = self.group {
            summary.push_str(&format!(" in group `{group}`"));
        }
        summary
    }
}

/// The document of `plan`.
pub(crate) fn document(plan: &Plan, info: Info<'_>) -> Value {
    let mut servers = Map::new();
    let mut server_ids = BTreeMap::new();
    for (name, binder) in &plan.binders {
        if let Some(address) = binder.provider.address(&binder.settings) {
            let id = unique(identifier(name), |id| servers.contains_key(id));
            servers.insert(
                id.clone(),
                server(&address, name, binder.provider.binder_type()),
            );
            server_ids.insert(name.as_str(), id);
        }
    }
    let mut operations: Vec<Operation<'_>> = Vec::new();
    for planned in &plan.functions {
        let schemas = planned.function.schemas();
        let function = Some(planned.function.name());
        if let Some(input) = &planned.input {
            operations.push(Operation {
                schema: schemas.input,
                ..Operation::of(input, true, function)
            });
            if input.consumer.dlq {
                // Failed messages go on, as they came, to the dead-letter destination.
                operations.push(Operation {
                    id: format!("{}.dlq", input.name),
                    destination: input.consumer_spec().dlq_destination(),
                    group: None,
                    schema: schemas.input,
                    dead_letters: true,
                    ..Operation::of(input, false, function)
                });
            }
        }
        if let Some(output) = &planned.output {
            operations.push(Operation {
                schema: schemas.output,
                ..Operation::of(output, false, function)
            });
        }
    }
    for output in plan.outputs.values() {
        if !operations.iter().any(|o| o.id == output.name) {
            operations.push(Operation::of(output, false, None));
        }
    }

    // A destination is one channel per binder: the same name on two brokers is two channels.
    let mut channel_ids: BTreeMap<(&str, &str), String> = BTreeMap::new();
    let mut channels = Map::new();
    let mut messages = Map::new();
    let mut schemas = Map::new();
    let mut operations_out = Map::new();
    for operation in &operations {
        let key = (operation.binder, operation.destination.as_str());
        let channel = match channel_ids.get(&key) {
            Some(id) => id.clone(),
            None => {
                let id = unique(identifier(&operation.destination), |id| {
                    channels.contains_key(id)
                });
                let mut entry = json!({ "address": operation.destination, "messages": {} });
                if let Some(server) = server_ids.get(operation.binder) {
                    entry["servers"] = json!([{ "$ref": format!("#/servers/{server}") }]);
                }
                channels.insert(id.clone(), entry);
                channel_ids.insert(key, id.clone());
                id
            }
        };
        let id = unique(identifier(&operation.id), |id| {
            operations_out.contains_key(id)
        });
        let message = unique(format!("{id}-message"), |id| messages.contains_key(id));
        channels[&channel]["messages"][&message] =
            json!({ "$ref": format!("#/components/messages/{message}") });

        let mut payload = operation.schema.map(|schema| schema());
        // Definitions a recursive type needs are the document's, where its refs point.
        if let Some(Value::Object(found)) = payload
            .as_mut()
            .and_then(|p| p.as_object_mut())
            .and_then(|p| p.remove("components"))
            .and_then(|mut c| c.as_object_mut().and_then(|c| c.remove("schemas")))
        {
            schemas.extend(found);
        }
        // A `String` payload travels as text, unless the binding says otherwise.
        let text = payload.as_ref() == Some(&json!({ "type": "string" }));
        let content_type = match (operation.content_type, text) {
            (Some(content_type), _) => content_type,
            (None, true) => "text/plain",
            (None, false) => DEFAULT_CONTENT_TYPE,
        };
        let mut described = json!({ "name": message, "contentType": content_type });
        if let Some(payload) = payload {
            described["payload"] = payload;
        }
        messages.insert(message.clone(), described);

        operations_out.insert(
            id,
            json!({
                "action": if operation.receives { "receive" } else { "send" },
                "channel": { "$ref": format!("#/channels/{channel}") },
                "messages": [{ "$ref": format!("#/channels/{channel}/messages/{message}") }],
                "summary": operation.summary(),
            }),
        );
    }

    let mut components = json!({ "messages": messages });
    if !schemas.is_empty() {
        components["schemas"] = Value::Object(schemas);
    }
    let mut document = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": info.title,
            "version": info.version,
            "description": "Generated by bindery from the application's functions and its resolved configuration.",
        },
        "defaultContentType": DEFAULT_CONTENT_TYPE,
        "channels": channels,
        "operations": operations_out,
        "components": components,
    });
    if !servers.is_empty() {
        document["servers"] = Value::Object(servers);
    }
    document
}

/// `id`, or `id-2`, `id-3`, ... where `taken` says it is in use.
fn unique(id: String, taken: impl Fn(&str) -> bool) -> String {
    if !taken(&id) {
        return id;
    }
    (2..)
        .map(|n| format!("{id}-{n}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or(id)
}

fn server(address: &BrokerAddress, name: &str, binder_type: &str) -> Value {
    let mut server = json!({
        "host": address.host,
        "protocol": address.protocol,
        "description": format!("binder `{name}` (type `{binder_type}`)"),
    });
    if let Some(pathname) = &address.pathname {
        server["pathname"] = json!(pathname);
    }
    server
}

/// An id AsyncAPI accepts for a component, channel or operation: letters, digits, `.`, `-`
/// and `_`.
fn identifier(name: &str) -> String {
    name.chars()
        .map(|c| match c.is_ascii_alphanumeric() || "._-".contains(c) {
            true => c,
            false => '_',
        })
        .collect()
}

/// How `#[stream_function]` finds the JSON Schema of a payload type that derives
/// `schemars::JsonSchema`, and none for another: a method found on `&&Probe<T>` when
/// `T: JsonSchema`, and on `&Probe<T>` for every `T`.
#[doc(hidden)]
pub mod probe {
    use std::marker::PhantomData;

    use crate::function::SchemaFn;

    /// Stands for the payload type `T`.
    #[derive(Debug)]
    pub struct Probe<T: ?Sized>(PhantomData<T>);

    impl<T: ?Sized> Probe<T> {
        #[allow(clippy::new_without_default)]
        pub fn new() -> Self {
            Probe(PhantomData)
        }
    }

    /// For a `T` with a JSON Schema: as it is read, and as it is written.
    pub trait WithSchema {
        fn schemas(&self) -> Option<[SchemaFn; 2]>;
    }

    impl<T: schemars::JsonSchema> WithSchema for &Probe<T> {
        fn schemas(&self) -> Option<[SchemaFn; 2]> {
            Some([schema_of::<T, false>, schema_of::<T, true>])
        }
    }

    /// For every other `T`.
    pub trait WithoutSchema {
        fn schemas(&self) -> Option<[SchemaFn; 2]> {
            None
        }
    }

    impl<T: ?Sized> WithoutSchema for Probe<T> {}

    /// `T`'s schema as it is read (or, `WRITTEN`, as it is written), with its subschemas
    /// inlined and, where a recursive type needs them, its definitions under
    /// `components/schemas`, where the document keeps them; without `$schema`.
    fn schema_of<T: schemars::JsonSchema, const WRITTEN: bool>() -> serde_json::Value {
        let settings = schemars::generate::SchemaSettings::draft07().with(|settings| {
            settings.inline_subschemas = true;
            settings.meta_schema = None;
            settings.definitions_path = "/components/schemas".into();
            settings.contract = match WRITTEN {
                true => schemars::generate::Contract::Serialize,
                false => schemars::generate::Contract::Deserialize,
            };
        });
        let schema = settings.into_generator().into_root_schema_for::<T>();
        schema.to_value()
    }
}

/// The JSON Schema of the payload type `$t`, when it derives `schemars::JsonSchema`
/// (feature `asyncapi`); `None` otherwise, and always without the feature.
#[cfg(feature = "asyncapi")]
#[doc(hidden)]
#[macro_export]
macro_rules! __schema_of {
    (input $t:ty) => {
        $crate::__schema_of!(@0 $t)
    };
    (output $t:ty) => {
        $crate::__schema_of!(@1 $t)
    };
    (@$index:tt $t:ty) => {{
        #[allow(unused_imports)]
        use $crate::asyncapi::probe::{WithSchema as _, WithoutSchema as _};
        (&&$crate::asyncapi::probe::Probe::<$t>::new())
            .schemas()
            .map(|schemas| schemas[$index])
    }};
}
