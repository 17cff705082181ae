//! Cross-checks the configuration against the registered functions and the binder types, and
//! decides every binding's destination, group, binder and properties before anything connects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::binder::{BinderProvider, BinderSettings};
use crate::bridge::ResolvedBinding;
use crate::config::{
    normalize_name, quoted_list, suggestion, BindingConfig, ConfigNode, ConsumerProperties,
    Problems, ProducerProperties, StreamConfig,
};
use crate::function::{FunctionKind, StreamFunction};

/// Binder types bindery knows, and the facade feature that brings each in.
pub(crate) const KNOWN_BINDER_TYPES: &[(&str, &str)] =
    &[("memory", ""), ("kafka", "kafka"), ("rabbit", "rabbit")];

/// Binder-specific consumer and producer sections, by binder type and normalized binding name.
type Extensions = BTreeMap<(String, String), (Option<ConfigNode>, Option<ConfigNode>)>;

const DEFAULT_POLL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub(crate) struct PlannedFunction {
    pub(crate) function: StreamFunction,
    pub(crate) input: Option<ResolvedBinding>,
    pub(crate) output: Option<ResolvedBinding>,
    pub(crate) poll: Duration,
}

#[derive(Clone, Debug)]
pub(crate) struct PlannedBinder {
    pub(crate) provider: Arc<dyn BinderProvider>,
    pub(crate) settings: BinderSettings,
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) shutdown_timeout: Duration,
    pub(crate) default_binder: String,
    pub(crate) binders: BTreeMap<String, PlannedBinder>,
    pub(crate) functions: Vec<PlannedFunction>,
    /// Output bindings by normalized name: the functions' and `output-bindings`.
    pub(crate) outputs: BTreeMap<String, ResolvedBinding>,
    /// Settings for destinations named at run time through the bridge.
    pub(crate) dynamic_defaults: BindingConfig,
}

pub(crate) struct Planner<'a> {
    pub(crate) stream: &'a StreamConfig,
    pub(crate) functions: &'a [StreamFunction],
    /// Registered functions left out of this application: configuration may still set their
    /// bindings (one file serves every process of a deployment), which stay unbound.
    pub(crate) left_out: &'a [StreamFunction],
    pub(crate) providers: &'a BTreeMap<String, Arc<dyn BinderProvider>>,
}

impl Planner<'_> {
    pub(crate) fn plan(&self, problems: &mut Problems) -> Option<Plan> {
        let functions = self.check_duplicates(problems);
        let selected = self.selected_functions(&functions, problems);
        for function in &selected {
            if let Some(why) = function.refusal() {
                problems.at_key(
                    "the code",
                    format!("stream function `{}`", function.name()),
                    why.to_owned(),
                );
            }
        }
        let known_bindings = self.known_bindings();
        self.check_binding_names(&known_bindings, problems);
        let binders = self.binders(problems);
        let default_binder = self.default_binder(&binders, problems);
        let extensions = self.extensions(&known_bindings, problems);

        let mut planned = Vec::new();
        let mut outputs = BTreeMap::new();
        let default_binder_name = default_binder.clone().unwrap_or_default();
        let resolve = |binding: &str,
                       destination: Option<&str>,
                       group: Option<&str>,
                       problems: &mut Problems| {
            self.resolve(
                binding,
                destination,
                group,
                &default_binder_name,
                &binders,
                &extensions,
                problems,
            )
        };
        for function in &selected {
            let input = function.input_binding().map(|b| {
                resolve(
                    &b,
                    function.default_input(),
                    function.default_group(),
                    problems,
                )
            });
            let output = function
                .output_binding()
                .map(|b| resolve(&b, function.default_output(), None, problems));
            if let Some(output) = &output {
                outputs.insert(normalize_name(&output.name), output.clone());
            }
            let poll = self.poll(function, problems);
            planned.push(PlannedFunction {
                function: (*function).clone(),
                input,
                output,
                poll,
            });
        }
        for (name, _) in &self.stream.output_bindings {
            let binding = format!("{name}-out-0");
            let resolved = resolve(&binding, None, None, problems);
            outputs.insert(normalize_name(&binding), resolved);
        }
        // The inputs of functions this process does not bind (other processes of the
        // deployment do): their groups' subscriptions may be created below as they will
        // declare them. One whose binding does not resolve cleanly shapes nothing; the process
        // that binds it reports why.
        let unbound_inputs: Vec<ResolvedBinding> = functions
            .values()
            .copied()
            .chain(
                self.left_out
                    .iter()
                    .filter(|f| !functions.contains_key(&normalize_name(f.name()))),
            )
            .filter(|f| {
                !selected
                    .iter()
                    .any(|s| normalize_name(s.name()) == normalize_name(f.name()))
            })
            .filter_map(|f| {
                let binding = f.input_binding()?;
                let mut its_problems = Problems::default();
                let input = resolve(
                    &binding,
                    f.default_input(),
                    f.default_group(),
                    &mut its_problems,
                );
                its_problems.is_empty().then_some(input)
            })
            .collect();
        let used: Vec<String> = planned
            .iter()
            .flat_map(|f| f.input.iter().chain(f.output.iter()))
            .chain(outputs.values())
            .map(|b| b.binder.clone())
            .chain(default_binder.clone())
            .collect();
        let mut binders: BTreeMap<String, PlannedBinder> = binders
            .into_iter()
            .filter(|(name, _)| used.contains(name))
            .collect();
        for name in used {
            if let (false, Some(provider)) =
                (binders.contains_key(&name), self.providers.get(&name))
            {
                let settings = BinderSettings {
                    name: name.clone(),
                    node: None,
                };
                binders.insert(
                    name,
                    PlannedBinder {
                        provider: provider.clone(),
                        settings,
                    },
                );
            }
        }

        // Outputs provision their required groups as the consumers of them will: those this
        // process binds, and (where nothing exists yet) those another process binds.
        let bound_inputs: Vec<ResolvedBinding> =
            planned.iter().filter_map(|f| f.input.clone()).collect();
        let consumers_of = |output: &ResolvedBinding, inputs: &[ResolvedBinding]| {
            inputs
                .iter()
                .filter(|input| {
                    input.destination == output.destination
                        && input.binder == output.binder
                        && input
                            .group
                            .as_ref()
                            .is_some_and(|g| output.producer.required_groups.contains(g))
                })
                .map(ResolvedBinding::consumer_spec)
                .collect::<Vec<_>>()
        };
        let required = |output: &mut ResolvedBinding| {
            output.required_group_consumers = consumers_of(output, &bound_inputs);
            output.required_group_consumers_elsewhere = consumers_of(output, &unbound_inputs);
        };
        planned
            .iter_mut()
            .filter_map(|f| f.output.as_mut())
            .for_each(required);
        outputs.values_mut().for_each(required);
        // Every output of a function is among `outputs` too.
        for output in outputs.values() {
            let checked = binders
                .get(&output.binder)
                .is_some_and(|b| b.provider.partitions_match_instances());
            if checked {
                let inputs = bound_inputs.iter().chain(&unbound_inputs);
                let node = self.partition_count_node(&output.name);
                check_partitions_agree(output, node, inputs, problems);
            }
        }

        if !problems.is_empty() {
            return None;
        }
        Some(Plan {
            shutdown_timeout: self.stream.shutdown_timeout,
            default_binder: default_binder?,
            binders,
            functions: planned,
            outputs,
            dynamic_defaults: self.stream.defaults.clone(),
        })
    }

    fn check_duplicates(&self, problems: &mut Problems) -> BTreeMap<String, &StreamFunction> {
        let mut by_name = BTreeMap::new();
        for function in self.functions {
            if by_name
                .insert(normalize_name(function.name()), function)
                .is_some()
            {
                problems.at_key(
                    "the registered stream functions",
                    function.name(),
                    "two stream functions have this name; give one of them `name = \"...\"`",
                );
            }
        }
        by_name
    }

    fn selected_functions<'f>(
        &self,
        functions: &BTreeMap<String, &'f StreamFunction>,
        problems: &mut Problems,
    ) -> Vec<&'f StreamFunction> {
        let Some((names, node)) = &self.stream.function_definition else {
            return functions.values().copied().collect();
        };
        let mut selected = Vec::new();
        for name in names {
            match functions.get(&normalize_name(name)) {
                Some(function) => selected.push(*function),
                None => {
                    let hint = suggestion(name, functions.values().map(|f| f.name()));
                    let known = functions.values().map(|f| f.name()).collect::<Vec<_>>();
                    problems.at(
                        node,
                        format!(
                            "no stream function is named `{name}` (registered: {}){hint}",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                quoted_list(&known)
                            }
                        ),
                    );
                }
            }
        }
        selected
    }

    /// Binding names configuration may mention: every registered function's (bound or left
    /// out), and `output-bindings`.
    fn known_bindings(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .functions
            .iter()
            .chain(self.left_out)
            .flat_map(|f| [f.input_binding(), f.output_binding()])
            .flatten()
            .chain(
                self.stream
                    .output_bindings
                    .iter()
                    .map(|(n, _)| format!("{n}-out-0")),
            )
            .collect();
        names.sort();
        names
    }

    fn check_binding_names(&self, known: &[String], problems: &mut Problems) {
        for (name, binding) in &self.stream.bindings {
            self.check_binding_name(name, binding.node.as_ref(), known, problems);
        }
    }

    fn check_binding_name(
        &self,
        name: &str,
        node: Option<&ConfigNode>,
        known: &[String],
        problems: &mut Problems,
    ) -> bool {
        let normalized = normalize_name(name);
        if known.iter().any(|k| normalize_name(k) == normalized) {
            return true;
        }
        let hint = suggestion(name, known.iter().map(String::as_str));
        let message = format!(
            "no stream function has a binding named `{name}` (bindings are `<function>-in-0` and `<function>-out-0`, and `<name>-out-0` for a name in `stream.output-bindings`){hint}"
        );
        match node {
            Some(node) => problems.at(node, message),
            None => problems.at_key("the configuration", name, message),
        }
        false
    }

    fn binders(&self, problems: &mut Problems) -> BTreeMap<String, PlannedBinder> {
        let mut binders = BTreeMap::new();
        for (name, node) in &self.stream.binders {
            let Some(table) = node.entries(problems) else {
                continue;
            };
            let binder_type = match table.get("type") {
                Some(type_node) => match type_node.string(problems) {
                    Some(t) => (t, Some(type_node.clone())),
                    None => continue,
                },
                None if self.is_known_type(name) => (name.clone(), None),
                None => {
                    problems.at(
                        node,
                        format!(
                            "missing `type`; set it to one of {}",
                            quoted_list(
                                &KNOWN_BINDER_TYPES
                                    .iter()
                                    .map(|(t, _)| *t)
                                    .collect::<Vec<_>>()
                            )
                        ),
                    );
                    continue;
                }
            };
            let (binder_type, type_node) = binder_type;
            let Some(provider) =
                self.provider(&binder_type, type_node.as_ref().unwrap_or(node), problems)
            else {
                continue;
            };
            let settings = BinderSettings {
                name: name.clone(),
                node: Some(node.clone()),
            };
            provider.validate(&settings, problems);
            binders.insert(name.clone(), PlannedBinder { provider, settings });
        }
        binders
    }

    fn is_known_type(&self, name: &str) -> bool {
        self.providers.contains_key(name) || KNOWN_BINDER_TYPES.iter().any(|(t, _)| *t == name)
    }

    fn provider(
        &self,
        binder_type: &str,
        node: &ConfigNode,
        problems: &mut Problems,
    ) -> Option<Arc<dyn BinderProvider>> {
        if let Some(provider) = self.providers.get(binder_type) {
            return Some(provider.clone());
        }
        let message = match KNOWN_BINDER_TYPES.iter().find(|(t, _)| *t == binder_type) {
            Some((_, feature)) => format!(
                "the `{binder_type}` binder is not compiled into this program; enable the `{feature}` feature of the `bindery` crate"
            ),
            None => {
                let mut types: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                types.extend(KNOWN_BINDER_TYPES.iter().map(|(t, _)| *t));
                types.sort();
                types.dedup();
                format!(
                    "unknown binder type `{binder_type}` (binder types are {}){}",
                    quoted_list(&types),
                    suggestion(binder_type, types.iter().copied()),
                )
            }
        };
        problems.at(node, message);
        None
    }

    /// A binder name as written in `default-binder` or a binding's `binder`: a configured binder,
    /// or a binder type standing for a binder of that type with default settings.
    fn binder_ref(
        &self,
        name: &str,
        node: &ConfigNode,
        binders: &BTreeMap<String, PlannedBinder>,
        problems: &mut Problems,
    ) -> Option<String> {
        if binders.contains_key(name) || self.stream.binders.contains_key(name) {
            return Some(name.to_owned());
        }
        if self.providers.contains_key(name) {
            return Some(name.to_owned());
        }
        if KNOWN_BINDER_TYPES.iter().any(|(t, _)| *t == name) {
            self.provider(name, node, problems);
            return None;
        }
        let mut candidates: Vec<&str> = self.stream.binders.keys().map(String::as_str).collect();
        candidates.extend(self.providers.keys().map(String::as_str));
        problems.at(
            node,
            format!(
                "no binder is named `{name}`; name one from [stream.binders] ({}) or a binder type{}",
                if self.stream.binders.is_empty() {
                    "none configured".to_owned()
                } else {
                    quoted_list(&self.stream.binders.keys().map(String::as_str).collect::<Vec<_>>())
                },
                suggestion(name, candidates.iter().copied()),
            ),
        );
        None
    }

    fn default_binder(
        &self,
        binders: &BTreeMap<String, PlannedBinder>,
        problems: &mut Problems,
    ) -> Option<String> {
        match &self.stream.default_binder {
            Some((name, node)) => self.binder_ref(name, node, binders, problems),
            None => match self.stream.binders.len() {
                0 => Some("memory".to_owned()),
                1 => self.stream.binders.keys().next().cloned(),
                _ => {
                    let origin = self
                        .stream
                        .binders
                        .values()
                        .next()
                        .map(ConfigNode::origin)
                        .unwrap_or_default();
                    let names: Vec<&str> = self.stream.binders.keys().map(String::as_str).collect();
                    problems.at_key(
                        origin,
                        "stream.default-binder",
                        format!("several binders are configured ({}); choose the default one with `default-binder`", quoted_list(&names)),
                    );
                    None
                }
            },
        }
    }

    /// `[stream.<type>.bindings.<binding>.consumer|producer]`, checked by the binder type's provider.
    fn extensions(&self, known: &[String], problems: &mut Problems) -> Extensions {
        let mut found = BTreeMap::new();
        for (binder_type, node) in &self.stream.extensions {
            let Some(provider) = self.provider(binder_type, node, problems) else {
                continue;
            };
            let Some(section) = node.table(&["bindings"], problems) else {
                continue;
            };
            let Some(bindings) = section.get("bindings") else {
                continue;
            };
            for (binding, node) in bindings.entries(problems).unwrap_or_default() {
                if !self.check_binding_name(&binding, Some(&node), known, problems) {
                    continue;
                }
                let Some(sides) = node.table(&["consumer", "producer"], problems) else {
                    continue;
                };
                let consumer = sides.get("consumer").cloned();
                let producer = sides.get("producer").cloned();
                if let Some(consumer) = &consumer {
                    provider.validate_consumer(consumer, problems);
                }
                if let Some(producer) = &producer {
                    provider.validate_producer(producer, problems);
                }
                found.insert(
                    (binder_type.clone(), normalize_name(&binding)),
                    (consumer, producer),
                );
            }
        }
        found
    }

    /// Where an output's `partition-count` comes from: its own producer section, else
    /// `[stream.default.producer]`.
    fn partition_count_node(&self, binding: &str) -> Option<&ConfigNode> {
        let normalized = normalize_name(binding);
        self.stream
            .bindings
            .iter()
            .find(|(name, _)| normalize_name(name) == normalized)
            .and_then(|(_, config)| config.producer.partition_count_node.as_ref())
            .or(self.stream.defaults.producer.partition_count_node.as_ref())
    }

    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &self,
        binding: &str,
        default_destination: Option<&str>,
        default_group: Option<&str>,
        default_binder: &str,
        binders: &BTreeMap<String, PlannedBinder>,
        extensions: &Extensions,
        problems: &mut Problems,
    ) -> ResolvedBinding {
        let normalized = normalize_name(binding);
        let empty = BindingConfig::default();
        let config = self
            .stream
            .bindings
            .iter()
            .find(|(name, _)| normalize_name(name) == normalized)
            .map_or(&empty, |(_, c)| c);
        let defaults = &self.stream.defaults;

        let binder = match &config.binder {
            Some((name, node)) => self
                .binder_ref(name, node, binders, problems)
                .unwrap_or_default(),
            None => default_binder.to_owned(),
        };
        let mut consumer = ConsumerProperties::default();
        defaults.consumer.apply(&mut consumer);
        config.consumer.apply(&mut consumer);
        let mut producer = ProducerProperties::default();
        defaults.producer.apply(&mut producer);
        config.producer.apply(&mut producer);
        let group = config
            .group
            .clone()
            .or_else(|| default_group.map(str::to_owned))
            .or_else(|| defaults.group.clone());
        if consumer.dlq && group.is_none() && binding.ends_with("-in-0") {
            let dlq_node = config
                .consumer
                .dlq
                .as_ref()
                .or(defaults.consumer.dlq.as_ref())
                .map(|(_, n)| n);
            let message = format!(
                "binding `{binding}` has `dlq = true` but no group; dead-letter destinations are named after the group, so set `stream.bindings.{binding}.group`"
            );
            match dlq_node {
                Some(node) => problems.at(node, message),
                None => problems.at_key(
                    "the configuration",
                    format!("stream.bindings.{binding}.consumer.dlq"),
                    message,
                ),
            }
        }
        let binder_type = binders
            .get(&binder)
            .map(|b| b.provider.binder_type().to_owned())
            .unwrap_or_else(|| binder.clone());
        let input = binding.ends_with("-in-0");
        self.check_applies(binding, input, config, &consumer, problems);
        self.check_extensions_apply(binding, input, &binder, &binder_type, extensions, problems);
        let (consumer_extension, producer_extension) = extensions
            .get(&(binder_type, normalized))
            .cloned()
            .unwrap_or((None, None));

        ResolvedBinding {
            name: binding.to_owned(),
            destination: config
                .destination
                .clone()
                .or_else(|| default_destination.map(str::to_owned))
                .unwrap_or_else(|| binding.to_owned()),
            group,
            content_type: config
                .content_type
                .clone()
                .or_else(|| defaults.content_type.clone()),
            binder,
            consumer,
            producer,
            consumer_extension,
            producer_extension,
            required_group_consumers: Vec::new(),
            required_group_consumers_elsewhere: Vec::new(),
        }
    }

    /// Settings that would be accepted and then ignored are errors: consumer settings on an
    /// output binding, producer settings on an input binding, `dlq-name` without `dlq`, and
    /// a first back-off longer than the longest.
    fn check_applies(
        &self,
        binding: &str,
        input: bool,
        config: &BindingConfig,
        consumer: &ConsumerProperties,
        problems: &mut Problems,
    ) {
        let misplaced: &[&str] = match input {
            true => &["producer"],
            false => &["group", "consumer"],
        };
        for key in misplaced {
            if let Some(node) = config.set.get(*key) {
                let side = match input {
                    true => "an input binding; `producer` settings apply to output bindings",
                    false => {
                        "an output binding; `group` and `consumer` settings apply to input bindings"
                    }
                };
                problems.at(node, format!("`{binding}` is {side}, so this would be ignored; remove it or move it to the binding it is meant for"));
            }
        }
        if !input {
            return;
        }
        let defaults = &self.stream.defaults.consumer.set;
        let set = |key: &str| config.consumer.set.get(key).or_else(|| defaults.get(key));
        if consumer.dlq_name.is_some() && !consumer.dlq {
            if let Some(node) = set("dlq-name") {
                problems.at(
                    node,
                    format!("`dlq-name` names the dead-letter destination, but `{binding}` does not dead-letter: set `dlq = true` too, or remove `dlq-name`"),
                );
            }
        }
        if !consumer.partitioned {
            let own = |key: &str| config.consumer.set.get(key);
            if let Some(node) = own("instance-index").or_else(|| own("instance-count")) {
                problems.at(
                    node,
                    format!("`{binding}` is not partitioned, so this would be ignored and its instances would share every partition; set `partitioned = true` too, or remove it"),
                );
            }
        }
        if consumer.instance_index >= consumer.instance_count {
            let message = format!(
                "for `{binding}`, `instance-index` is {} but `instance-count` is {}: instances are numbered from 0 to `instance-count - 1`; raise `instance-count` to the number of instances, or lower the index",
                consumer.instance_index, consumer.instance_count
            );
            match set("instance-index").or_else(|| set("instance-count")) {
                Some(node) => problems.at(node, message),
                None => problems.at_key(
                    "the configuration",
                    format!("stream.bindings.{binding}.consumer.instance-index"),
                    message,
                ),
            }
        }
        if consumer.back_off_initial_interval > consumer.back_off_max_interval {
            let node = set("back-off-initial-interval").or_else(|| set("back-off-max-interval"));
            if let Some(node) = node {
                problems.at(
                    node,
                    format!(
                        "for `{binding}`, the first back-off ({:?}) is longer than `back-off-max-interval` ({:?}); raise the maximum or lower the first wait",
                        consumer.back_off_initial_interval, consumer.back_off_max_interval
                    ),
                );
            }
        }
    }

    /// A binder section (`[stream.<type>.bindings.<binding>]`) applies to the binding's own
    /// binder type and side only.
    fn check_extensions_apply(
        &self,
        binding: &str,
        input: bool,
        binder: &str,
        binder_type: &str,
        extensions: &Extensions,
        problems: &mut Problems,
    ) {
        let normalized = normalize_name(binding);
        for ((section_type, name), (consumer, producer)) in extensions {
            if *name != normalized {
                continue;
            }
            let nodes = consumer.iter().chain(producer.iter());
            if section_type != binder_type {
                for node in nodes {
                    problems.at(node, format!("`{binding}` is bound to binder `{binder}` of type `{binder_type}`, so this `{section_type}` section would be ignored; move it to `[stream.{binder_type}.bindings.{binding}]`"));
                }
                continue;
            }
            let (wrong, side) = match input {
                true => (producer, "an input binding, which has no producer"),
                false => (consumer, "an output binding, which has no consumer"),
            };
            if let Some(node) = wrong {
                problems.at(
                    node,
                    format!("`{binding}` is {side}, so this would be ignored; remove it"),
                );
            }
        }
    }

    fn poll(&self, function: &StreamFunction, problems: &mut Problems) -> Duration {
        if function.kind() != FunctionKind::Supplier {
            return DEFAULT_POLL;
        }
        let Some(text) = function.poll_text() else {
            return DEFAULT_POLL;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                problems.at_key(
                    format!("the #[stream_function] attribute of `{}`", function.name()),
                    "poll",
                    format!("\"{text}\" is not a duration; write one such as \"1s\" or \"250ms\""),
                );
                DEFAULT_POLL
            }
        }
    }
}

/// A partitioned consumer receives one partition: on a binder with a partition per instance,
/// the producers of its destination that this application knows must send in as many
/// partitions as there are instances, or messages wait in partitions no instance reads (or
/// reach none at all).
fn check_partitions_agree<'a>(
    output: &ResolvedBinding,
    node: Option<&ConfigNode>,
    inputs: impl Iterator<Item = &'a ResolvedBinding>,
    problems: &mut Problems,
) {
    let partitions = output.producer.partition_count;
    let readers = inputs.filter(|input| {
        input.destination == output.destination
            && input.binder == output.binder
            && input.consumer.partition().is_some()
    });
    for input in readers {
        let instances = input.consumer.instance_count;
        if partitions == instances {
            continue;
        }
        let name = &output.name;
        let message = format!(
            "`{name}` sends to `{}` in {partitions} partition(s), but `{}` reads it as one of {instances} partitioned instances; give `stream.bindings.{name}.producer.partition-count` and `stream.bindings.{}.consumer.instance-count` the same value",
            output.destination, input.name, input.name
        );
        match node {
            Some(node) => problems.at(node, message),
            None => problems.at_key(
                "the configuration",
                format!("stream.bindings.{name}.producer.partition-count"),
                message,
            ),
        }
    }
}
