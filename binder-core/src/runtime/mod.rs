//! Builds the application from configuration and registered functions, binds everything, and
//! shuts it down without losing a message.

mod binding;
mod controls;
mod lanes;
mod lifecycle;
mod meter;
mod plan;
mod settle;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use binding::{run_supplier, InputBinding, Invoker};
pub use controls::{ApplicationHealth, BindingStatus, Controls};
pub use lifecycle::BindingState;
use lifecycle::{supervise, Control};
#[cfg(feature = "metrics")]
pub(crate) use meter::{prometheus, record_lag};
#[cfg(feature = "asyncapi")]
pub(crate) use plan::Plan;
#[cfg(not(feature = "asyncapi"))]
use plan::Plan;
use plan::{Planner, KNOWN_BINDER_TYPES};

use crate::binder::{Binder, BinderProvider};
use crate::bridge::StreamBridge;
use crate::config::{
    load, AppConfig, ConfigError, ConfigSource, ConsumerProperties, LoadOptions,
    ManagementSettings, Problems, ProducerProperties, StreamConfig,
};
use crate::function::{registered_functions, StreamFunction};
use crate::handler::Context;
use crate::memory::MemoryBinderProvider;
use crate::Error;

/// Configures an [`Application`]: where its configuration comes from, which functions and
/// binders it has.
///
/// ```no_run
/// # async fn demo() -> Result<(), bindery_core::Error> {
/// bindery_core::Application::builder()
///     .config_file("config/billing.toml")
///     .profile("staging")
///     .build()?
///     .run()
///     .await
/// # }
/// ```
#[derive(Debug)]
pub struct ApplicationBuilder {
    options: LoadOptions,
    providers: BTreeMap<String, Arc<dyn BinderProvider>>,
    functions: Vec<StreamFunction>,
    registered: bool,
    binders: BTreeMap<String, Arc<dyn Binder>>,
    every_binder: Option<Arc<dyn Binder>>,
}

impl Default for ApplicationBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ApplicationBuilder {
    /// The memory binder, the functions registered with `#[stream_function]`, and configuration
    /// from `application.toml`, `BINDERY_PROFILE` and `BINDERY_*` environment variables.
    pub fn new() -> Self {
        ApplicationBuilder {
            options: LoadOptions::default(),
            providers: BTreeMap::new(),
            functions: Vec::new(),
            registered: true,
            binders: BTreeMap::new(),
            every_binder: None,
        }
        .binder_provider(MemoryBinderProvider)
    }

    /// Reads this file instead of `application.toml` (`BINDERY_CONFIG` still wins when set);
    /// profile files are looked up beside it.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.source = ConfigSource::File(path.into());
        self
    }

    /// Reads configuration from TOML text, named `name` in errors.
    pub fn config_str(mut self, name: impl Into<String>, toml: impl Into<String>) -> Self {
        self.options.source = ConfigSource::Text {
            name: name.into(),
            toml: toml.into(),
        };
        self
    }

    /// Activates a profile, as `BINDERY_PROFILE` does (profiles set here replace that variable).
    pub fn profile(mut self, profile: impl Into<String>) -> Self {
        self.options
            .profiles
            .get_or_insert_with(Vec::new)
            .push(profile.into());
        self
    }

    /// Reads these variables instead of the process environment.
    pub fn environment<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.options.environment = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Adds a function written by hand.
    pub fn function(mut self, function: StreamFunction) -> Self {
        self.functions.push(function);
        self
    }

    /// Leaves out the functions registered with `#[stream_function]`; only those added with
    /// [`ApplicationBuilder::function`] are bound. Configuration may still set the bindings of
    /// the functions left out (a file shared by every process of a deployment does); they stay
    /// unbound, and their inputs tell a binder how to create a missing subscription of a
    /// group that an output lists in `required-groups`.
    pub fn without_registered_functions(mut self) -> Self {
        self.registered = false;
        self
    }

    /// Makes a binder type available (the facade adds Kafka and RabbitMQ by feature).
    pub fn binder_provider(mut self, provider: impl BinderProvider) -> Self {
        self.providers
            .insert(provider.binder_type().to_owned(), Arc::new(provider));
        self
    }

    /// Uses this binder instance for the binder named `name` instead of creating one.
    pub fn binder(mut self, name: impl Into<String>, binder: Arc<dyn Binder>) -> Self {
        self.binders.insert(name.into(), binder);
        self
    }

    /// Uses this binder instance for every binder, whatever its type (as the test support does
    /// with the memory binder). Binder-specific settings are still validated.
    pub fn replace_binders(mut self, binder: Arc<dyn Binder>) -> Self {
        self.every_binder = Some(binder);
        self
    }

    /// Loads and validates the configuration against the functions and binder types. Nothing
    /// connects yet.
    pub fn build(self) -> Result<Application, Error> {
        let merged = load(&self.options)?;
        let mut functions = self.functions;
        let mut left_out = Vec::new();
        match self.registered {
            true => functions.extend(registered_functions()),
            false => left_out.extend(registered_functions()),
        }
        let mut extension_types: Vec<&str> = self.providers.keys().map(String::as_str).collect();
        extension_types.extend(KNOWN_BINDER_TYPES.iter().map(|(t, _)| *t));
        let mut problems = Problems::default();
        let stream = StreamConfig::read(&merged, &extension_types, &mut problems);
        let planner = Planner {
            stream: &stream,
            functions: &functions,
            left_out: &left_out,
            providers: &self.providers,
        };
        let plan = planner.plan(&mut problems);
        let management = ManagementSettings::read(&merged, &mut problems);
        problems.into_result()?;
        let plan = plan.ok_or_else(|| ConfigError::Invalid(Vec::new()))?;
        Ok(Application {
            plan,
            config: AppConfig::new(&merged),
            binders: self.binders,
            every_binder: self.every_binder,
            management,
        })
    }
}

/// One binding of an [`Application`], as it will be bound.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BindingInfo {
    /// Such as `bill-in-0`.
    pub name: String,
    /// Whether the binding consumes (an input) rather than sends (an output).
    pub input: bool,
    /// The destination (topic, exchange) it consumes from or sends to.
    pub destination: String,
    /// The consumer group of an input; `None` for an anonymous input and for outputs.
    pub group: Option<String>,
    /// The name of the binder it is bound on.
    pub binder: String,
    /// The consumer settings, as resolved (an output has the defaults).
    pub consumer: ConsumerProperties,
    /// The producer settings, as resolved (an input has the defaults).
    pub producer: ProducerProperties,
}

/// A validated application, ready to bind its functions.
#[derive(Debug)]
pub struct Application {
    plan: Plan,
    config: AppConfig,
    binders: BTreeMap<String, Arc<dyn Binder>>,
    every_binder: Option<Arc<dyn Binder>>,
    /// The management server's settings, when `[management]` configures one.
    #[cfg_attr(not(feature = "management"), allow(dead_code))]
    management: Option<ManagementSettings>,
}

impl Application {
    /// Starts configuring an application.
    pub fn builder() -> ApplicationBuilder {
        ApplicationBuilder::new()
    }

    /// The application's own configuration (everything outside `[stream]`).
    pub fn config(&self) -> &AppConfig {
        &self.config
    }

    /// The application's AsyncAPI 3 document (feature `asyncapi`): a server per binder with
    /// a broker (host and protocol, never credentials), a channel per destination, an
    /// operation per binding and a message per binding, with its content type and, where
    /// the payload type derives `schemars::JsonSchema`, its schema.
    ///
    /// ```
    /// # fn main() -> Result<(), bindery_core::Error> {
    /// use bindery_core::{Application, StreamFunction};
    /// let bill = StreamFunction::function("bill", |text: String| async move { text });
    /// let app = Application::builder()
    ///     .without_registered_functions()
    ///     .function(bill)
    ///     .config_str("application.toml", "[stream.bindings.bill-in-0]\ndestination = \"orders\"")
    ///     .environment(Vec::<(String, String)>::new())
    ///     .build()?;
    /// let document = app.asyncapi("billing", "1.0.0");
    /// assert_eq!(document["operations"]["bill-in-0"]["action"], "receive");
    /// assert_eq!(document["channels"]["orders"]["address"], "orders");
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "asyncapi")]
    pub fn asyncapi(&self, title: &str, version: &str) -> serde_json::Value {
        crate::asyncapi::document(&self.plan, crate::asyncapi::Info { title, version })
    }

    /// Every binding as it will be bound, inputs first, each with its destination, group and
    /// binder, as configured and overridden.
    ///
    /// ```
    /// # fn main() -> Result<(), bindery_core::Error> {
    /// use bindery_core::{Application, StreamFunction};
    /// let bill = StreamFunction::function("bill", |text: String| async move { text });
    /// let app = Application::builder()
    ///     .without_registered_functions()
    ///     .function(bill)
    ///     .config_str("application.toml", "[stream.bindings.bill-in-0]\ndestination = \"orders\"")
    ///     .environment(Vec::<(String, String)>::new())
    ///     .build()?;
    /// let input = &app.bindings()[0];
    /// assert_eq!((input.name.as_str(), input.destination.as_str()), ("bill-in-0", "orders"));
    /// # Ok(()) }
    /// ```
    pub fn bindings(&self) -> Vec<BindingInfo> {
        let functions = &self.plan.functions;
        let inputs = functions.iter().filter_map(|f| f.input.as_ref());
        let outputs = functions
            .iter()
            .filter_map(|f| f.output.as_ref())
            .chain(self.plan.outputs.values());
        let mut seen = std::collections::BTreeSet::new();
        inputs
            .map(|b| (b, true))
            .chain(outputs.map(|b| (b, false)))
            .filter(|(b, _)| seen.insert(b.name.clone()))
            .map(|(b, input)| BindingInfo {
                name: b.name.clone(),
                input,
                destination: b.destination.clone(),
                group: b.group.clone().filter(|_| input),
                binder: b.binder.clone(),
                consumer: b.consumer.clone(),
                producer: b.producer.clone(),
            })
            .collect()
    }

    /// The destinations the bound functions send to, and their dead-letter destinations.
    pub fn output_destinations(&self) -> Vec<String> {
        let mut destinations: Vec<String> = self
            .plan
            .functions
            .iter()
            .flat_map(|f| {
                let output = f.output.as_ref().map(|o| o.destination.clone());
                let dlq = f
                    .input
                    .as_ref()
                    .filter(|i| i.consumer.dlq)
                    .map(|i| i.consumer_spec().dlq_destination());
                output.into_iter().chain(dlq)
            })
            .chain(self.plan.outputs.values().map(|o| o.destination.clone()))
            .collect();
        destinations.sort();
        destinations.dedup();
        destinations
    }

    /// Binds every function, runs until Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// A binding that stops by itself (its subscription ended for good) stops the application
    /// too, and `run` returns the error naming it.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(std::future::pending()).await
    }

    /// Like [`Application::run`], but also stops when `stop` completes.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        // Listening from before startup, so a signal that comes while binding is not missed.
        let signal = listen_for_shutdown()?;
        let mut running = self.start().await?;
        let outcome = tokio::select! {
            signal = signal => signal,
            () = stop => Ok(()),
            failure = running.binding_failure() => Err(failure),
        };
        running.shutdown().await?;
        outcome
    }

    /// Connects the binders, binds every input, then every output and supplier, and returns
    /// while they run.
    pub async fn start(self) -> Result<RunningApplication, Error> {
        let bindings = self.bindings();
        // The management port is taken before any broker is touched: a port in use fails
        // the start at once.
        #[cfg(feature = "management")]
        #[cfg_attr(not(feature = "asyncapi"), allow(unused_mut))]
        let mut listener = match &self.management {
            Some(settings) => Some(crate::management::prepare(settings)?),
            None => None,
        };
        #[cfg(all(feature = "management", feature = "asyncapi"))]
        if let Some(prepared) = &mut listener {
            // Served as the application was planned: titled by its executable's name.
            let title = std::env::current_exe()
                .ok()
                .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "bindery application".to_owned());
            prepared.asyncapi = Some(self.asyncapi(&title, "0.0.0"));
        }
        let plan = self.plan;
        let mut binders: HashMap<String, Arc<dyn Binder>> = HashMap::new();
        for (name, planned) in &plan.binders {
            let binder = match (&self.every_binder, self.binders.get(name)) {
                (Some(binder), _) | (None, Some(binder)) => binder.clone(),
                (None, None) => match planned.provider.create(planned.settings.clone()).await {
                    Ok(binder) => binder,
                    Err(error) => {
                        // Those already connected are not left open behind the error.
                        close_binders(&binders, Instant::now() + CLOSE_AT_LEAST).await;
                        return Err(error);
                    }
                },
            };
            tracing::info!(binder = %name, binder_type = planned.provider.binder_type(), "binder ready");
            binders.insert(name.clone(), binder);
        }
        let bridge = StreamBridge::new(
            binders.clone(),
            plan.default_binder.clone(),
            plan.outputs.clone(),
            plan.dynamic_defaults.clone(),
        );
        let (stop, stopped) = watch::channel(false);
        let change_limit = plan.shutdown_timeout * 2 + CHANGE_AT_LEAST;
        let mut running = RunningApplication {
            bridge: bridge.clone(),
            stop,
            consumers: JoinSet::new(),
            controls: Controls::default(),
            #[cfg(feature = "management")]
            management: None,
            suppliers: JoinSet::new(),
            binders: binders.clone(),
            shutdown_timeout: plan.shutdown_timeout,
            outputs: plan
                .outputs
                .iter()
                .map(|(name, b)| (name.clone(), b.destination.clone()))
                .collect(),
        };

        let mut lifecycles = BTreeMap::new();
        let bound = Self::bind(
            &plan,
            &self.config,
            &bridge,
            &binders,
            &mut running,
            &mut lifecycles,
            stopped,
        )
        .await;
        running.controls = Controls::new(
            lifecycles,
            bindings,
            binders
                .iter()
                .map(|(n, b)| (n.clone(), b.clone()))
                .collect(),
            change_limit,
        );
        match bound {
            Ok(()) => {
                #[cfg(feature = "management")]
                if let (Some(listener), Some(settings)) = (listener, &self.management) {
                    match crate::management::serve(listener, settings, running.controls.clone()) {
                        Ok(server) => running.management = Some(server),
                        Err(error) => {
                            running.abort().await;
                            close_binders(&binders, Instant::now() + CLOSE_AT_LEAST).await;
                            return Err(error);
                        }
                    }
                }
                Ok(running)
            }
            Err(error) => {
                // What was started stops, and the binders close, before the error is returned.
                running.abort().await;
                close_binders(&binders, Instant::now() + CLOSE_AT_LEAST).await;
                Err(error)
            }
        }
    }

    /// Subscribes every input, then starts every binding's loop, then every supplier: so a
    /// function's first outputs to a sibling's input find that input subscribed, and nothing
    /// sent at startup is lost.
    async fn bind(
        plan: &Plan,
        config: &AppConfig,
        bridge: &StreamBridge,
        binders: &HashMap<String, Arc<dyn Binder>>,
        running: &mut RunningApplication,
        lifecycles: &mut BTreeMap<String, Control>,
        stopped: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut suppliers = Vec::new();
        let mut subscribed = Vec::new();
        for planned in &plan.functions {
            let output = match &planned.output {
                Some(output) => {
                    let bound = bridge.output(&output.name).await?;
                    tracing::info!(
                        binding = %output.name, destination = %output.destination,
                        binder = %output.binder, "bound"
                    );
                    Some(bound)
                }
                None => None,
            };
            let context = Context::new(
                bridge.clone(),
                config.clone(),
                planned.input.as_ref().and_then(|i| i.content_type.clone()),
                output.as_ref().map(|o| o.content_type.clone()),
            );
            let invoker = Invoker {
                function: planned.function.name().into(),
                handler: planned.function.handler.clone(),
                reads_headers: planned.function.reads_headers,
                context,
                output,
            };
            let Some(input) = &planned.input else {
                suppliers.push((invoker, planned.poll));
                continue;
            };
            let binder = &binders[&input.binder];
            let spec = input.consumer_spec();
            let dead_letter = match spec.properties.dlq {
                true => Some((
                    spec.dlq_destination(),
                    binder.dead_letter_producer(&spec).await?,
                )),
                false => None,
            };
            let subscription = binder.subscribe(&spec).await?;
            let (control, steering) = lifecycle::control(&input.name, binder.clone(), spec.clone());
            lifecycles.insert(input.name.clone(), control);
            tracing::info!(
                binding = %input.name, destination = %input.destination, group = input.group.as_deref().unwrap_or("(anonymous)"),
                binder = %input.binder, "bound"
            );
            let binding = Arc::new(InputBinding {
                binding: input.name.clone(),
                destination: input.destination.clone(),
                properties: spec.properties.clone(),
                invoker,
                dead_letter,
                drain_for: plan.shutdown_timeout / 2,
                meter: meter::Meter::new(&input.name, &input.destination, input.group.as_deref()),
            });
            subscribed.push((binding, subscription, steering));
        }
        for (binding, subscription, steering) in subscribed {
            running
                .consumers
                .spawn(supervise(binding, subscription, stopped.clone(), steering));
        }
        for (invoker, every) in suppliers {
            running
                .suppliers
                .spawn(run_supplier(invoker, every, stopped.clone()));
        }
        Ok(())
    }
}

/// Closes `binders` together, each until `deadline`; the names of those that did not close in
/// time.
async fn close_binders(
    binders: &HashMap<String, Arc<dyn Binder>>,
    deadline: Instant,
) -> Vec<String> {
    let closes = binders.iter().map(|(name, binder)| async move {
        match tokio::time::timeout_at(deadline, binder.close()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => {
                tracing::warn!(binder = %name, %error, "closing the binder failed");
                None
            }
            Err(_) => Some(name.clone()),
        }
    });
    futures::future::join_all(closes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// How long binders may take to close when the shutdown budget is already spent.
const CLOSE_AT_LEAST: Duration = Duration::from_millis(500);

/// Beyond the shutdown budget, how long a binding may take to stop or start again: Kafka group
/// joins on a busy broker take seconds.
const CHANGE_AT_LEAST: Duration = Duration::from_secs(30);

/// A started application: its bridge, and the way to stop it.
#[derive(Debug)]
pub struct RunningApplication {
    bridge: StreamBridge,
    stop: watch::Sender<bool>,
    consumers: JoinSet<Result<(), Error>>,
    /// Each binding's lifecycle and the binders' health.
    controls: Controls,
    #[cfg(feature = "management")]
    management: Option<crate::management::ManagementServer>,
    suppliers: JoinSet<()>,
    binders: HashMap<String, Arc<dyn Binder>>,
    shutdown_timeout: Duration,
    outputs: BTreeMap<String, String>,
}

impl RunningApplication {
    /// The destination of an output binding, such as `bill-out-0`.
    pub fn output_destination(&self, binding: &str) -> Option<String> {
        self.outputs
            .get(&crate::config::normalize_name(binding))
            .cloned()
    }

    /// The bridge, to send to any binding or destination.
    pub fn bridge(&self) -> StreamBridge {
        self.bridge.clone()
    }

    /// What the input binding `binding` (such as `bill-in-0`) is doing; `None` for a name that
    /// is no input binding of this application.
    pub fn binding_state(&self, binding: &str) -> Option<BindingState> {
        self.controls.binding_state(binding)
    }

    /// The handle on this application's bindings and health, to hand to whatever watches and
    /// steers it from outside (a server of the application's own, a task).
    pub fn controls(&self) -> Controls {
        self.controls.clone()
    }

    /// Whether every binder's broker is reachable and every input binding runs; see
    /// [`Controls::health`].
    pub async fn health(&self) -> ApplicationHealth {
        self.controls.health().await
    }

    /// Where the management server listens, when `[management]` configures one.
    #[cfg(feature = "management")]
    pub fn management_address(&self) -> Option<std::net::SocketAddr> {
        self.management.as_ref().map(|server| server.address)
    }

    /// Pauses an input binding: it starts no handler and asks its subscription for nothing
    /// more, and the subscription stays open, so the group membership is kept (on Kafka its
    /// partitions are paused and polling goes on; on RabbitMQ its consumer is cancelled and
    /// what the client had prefetched goes back to the queue). Calls already running finish
    /// and are acknowledged; messages the binding had received wait, unacknowledged, until it
    /// resumes. Returns once the binding is [`BindingState::Paused`]; a stopped binding is
    /// refused.
    ///
    /// ```no_run
    /// # async fn demo(app: bindery_core::RunningApplication) -> Result<(), bindery_core::Error> {
    /// app.pause_binding("bill-in-0").await?;
    /// // ... nothing is billed meanwhile ...
    /// app.resume_binding("bill-in-0").await?;
    /// # Ok(()) }
    /// ```
    pub async fn pause_binding(&self, binding: &str) -> Result<(), Error> {
        self.controls.pause_binding(binding).await
    }

    /// Handles messages again on a paused binding, from where it paused.
    pub async fn resume_binding(&self, binding: &str) -> Result<(), Error> {
        self.controls.resume_binding(binding).await
    }

    /// Stops an input binding as a shutdown stops it, while the rest of the application runs:
    /// what is in flight finishes and is acknowledged (a paused binding hands back what it
    /// held), what is unfinished after `stream.shutdown-timeout` goes back to the broker
    /// unacknowledged, and the subscription closes (leaving the Kafka group; cancelling the
    /// RabbitMQ consumer). The broker keeps the group's messages. Returns once it is
    /// [`BindingState::Stopped`].
    pub async fn stop_binding(&self, binding: &str) -> Result<(), Error> {
        self.controls.stop_binding(binding).await
    }

    /// Starts a stopped input binding again (or resumes a paused one): it subscribes anew and
    /// goes on where its group left off (an anonymous binding misses what was sent while it was
    /// stopped). Returns once the binding runs on its new subscription.
    pub async fn start_binding(&self, binding: &str) -> Result<(), Error> {
        self.controls.start_binding(binding).await
    }

    /// Runs until Ctrl-C or SIGTERM, then shuts down gracefully: what [`Application::run`]
    /// does once started, for an application that did something of its own after
    /// [`Application::start`]. A binding that stops by itself stops the application too, and
    /// the error names it.
    pub async fn run_until_signal(mut self) -> Result<(), Error> {
        let signal = match listen_for_shutdown() {
            Ok(signal) => signal,
            Err(error) => {
                self.shutdown().await.ok();
                return Err(error);
            }
        };
        let outcome = tokio::select! {
            signal = signal => signal,
            failure = self.binding_failure() => Err(failure),
        };
        self.shutdown().await?;
        outcome
    }

    /// Stops taking new messages, finishes and acknowledges those in flight, then closes the
    /// binders, within `stream.shutdown-timeout`. Messages still in flight after that are left
    /// unacknowledged, so the broker delivers them again.
    ///
    /// Closing the binders (flushing producers, closing connections) shares that budget; a
    /// binder that has not closed when it runs out is reported in the error, by name.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        tracing::info!("shutting down: finishing messages in flight");
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.stop_everything();
        // Bindings stop taking messages first; the server's last requests share the budget.
        #[cfg(feature = "management")]
        if let Some(server) = self.management.take() {
            server.stop().await;
        }
        let drained = tokio::time::timeout_at(deadline, async {
            while self.suppliers.join_next().await.is_some() {}
            while self.consumers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                timeout = ?self.shutdown_timeout,
                "shutdown timed out; messages still in flight were not acknowledged and will be delivered again"
            );
            self.abort().await;
        }
        self.bridge.close();
        // Binders get what is left of the budget, and at least a moment to say goodbye.
        let closing_deadline = deadline.max(Instant::now() + CLOSE_AT_LEAST);
        let hung = close_binders(&self.binders, closing_deadline).await;
        if let Some(binder) = hung.into_iter().next() {
            return Err(Error::binder(
                binder,
                format!(
                    "did not close within `stream.shutdown-timeout` ({:?}); its connections were dropped",
                    self.shutdown_timeout
                ),
            ));
        }
        tracing::info!("shut down");
        Ok(())
    }

    /// Waits until a binding stops by itself, and says why; never, while all run.
    async fn binding_failure(&mut self) -> Error {
        loop {
            match self.consumers.join_next().await {
                Some(Ok(Err(error))) => return error,
                Some(Ok(Ok(()))) => {}
                Some(Err(panic)) => {
                    return Error::Binding {
                        binding: "(a consumer binding)".to_owned(),
                        message: format!("its task failed: {panic}"),
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Tells suppliers and bindings to stop for good.
    fn stop_everything(&self) {
        self.stop.send_replace(true);
        self.controls.shut_down();
        self.controls.lifecycles().for_each(Control::shut_down);
    }

    async fn abort(&mut self) {
        self.stop_everything();
        self.suppliers.abort_all();
        self.consumers.abort_all();
        while self.suppliers.join_next().await.is_some() {}
        while self.consumers.join_next().await.is_some() {}
    }
}

/// Starts listening for Ctrl-C and SIGTERM; the future completes at the first of them.
fn listen_for_shutdown() -> Result<impl Future<Output = Result<(), Error>>, Error> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => Ok(()),
                _ = interrupt.recv() => Ok(()),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async { tokio::signal::ctrl_c().await.map_err(Error::Signal) })
    }
}
