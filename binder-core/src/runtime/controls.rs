//! What an operator sees of a running application and may change: its bindings and their
//! lifecycle, and its health. The management server serves these; an application with a
//! server of its own can serve them as well.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::lifecycle::{BindingState, Control};
use super::BindingInfo;
use crate::binder::{Binder, Health};
use crate::Error;

/// How long a binder may take to say whether its broker is reachable.
const HEALTH_WITHIN: Duration =
    crate::binder::HEALTH_ANSWER_WITHIN.saturating_add(Duration::from_secs(1));
/// How long a binder may take to tell a binding's consumer lag.
const LAG_WITHIN: Duration =
    crate::binder::LAG_ANSWER_WITHIN.saturating_add(Duration::from_millis(500));

/// The handle on a running application's bindings and health, to share with whatever watches
/// and steers it from outside (cheap to clone; every clone controls the same application).
///
/// ```no_run
/// # async fn demo(app: bindery_core::RunningApplication) -> Result<(), bindery_core::Error> {
/// let controls = app.controls();
/// tokio::spawn(async move {
///     let health = controls.health().await;
///     println!("{}", health.to_json());
/// });
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Controls {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each input binding's lifecycle, by binding name.
    controls: BTreeMap<String, Control>,
    bindings: Vec<BindingInfo>,
    binders: BTreeMap<String, Arc<dyn Binder>>,
    /// How long a binding may take to change its state.
    change_limit: Duration,
    /// Set when the application shuts down: changes and health checks still under way end at
    /// once, and new ones are refused, so nothing outside steers an application that stops.
    shut_down: watch::Sender<bool>,
}

/// One binding and, for an input, what it is doing.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BindingStatus {
    /// The binding as it was bound.
    pub binding: BindingInfo,
    /// The state of an input binding; `None` for an output, which has no lifecycle.
    pub state: Option<BindingState>,
}

impl BindingStatus {
    /// The binding as JSON, in the shape of Spring Cloud Stream's bindings endpoint (with the
    /// binder's name added): `bindingName`, `name` (the destination), `group`, `binder`,
    /// `input`, `pausable` and `state` (`started`, `paused` or `stopped`).
    pub fn to_json(&self) -> Value {
        json!({
            "bindingName": self.binding.name,
            "name": self.binding.destination,
            "group": self.binding.group,
            "binder": self.binding.binder,
            "input": self.binding.input,
            "pausable": self.state.is_some(),
            "state": self.state.map_or("started", BindingState::as_str),
        })
    }
}

/// Whether the application can do its work: every binder's broker reachable and every input
/// binding's engine running.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplicationHealth {
    /// Each binder's health, by binder name.
    pub binders: BTreeMap<String, Health>,
    /// Each input binding's state, by binding name, and whether its engine runs (a binding
    /// stopped on purpose still runs, waiting to be started; one that failed does not).
    pub bindings: BTreeMap<String, (BindingState, bool)>,
}

impl ApplicationHealth {
    /// Up when every binder is up and every input binding's engine runs.
    pub fn is_up(&self) -> bool {
        self.binders.values().all(Health::is_up) && self.bindings.values().all(|(_, up)| *up)
    }

    /// The health as JSON, in the shape of Spring Boot's health endpoint: `status` (`UP` or
    /// `DOWN`), then `components.binders` and `components.bindings`, each with a `status`
    /// and one component per binder or binding.
    ///
    /// ```
    /// use bindery_core::{binder::Health, ApplicationHealth};
    /// let mut health = ApplicationHealth::default();
    /// health.binders.insert("rabbit".into(), Health::down("connection refused"));
    /// let json = health.to_json();
    /// assert_eq!(json["status"], "DOWN");
    /// assert_eq!(json["components"]["binders"]["components"]["rabbit"]["details"]["error"], "connection refused");
    /// ```
    pub fn to_json(&self) -> Value {
        let binders: serde_json::Map<String, Value> = self
            .binders
            .iter()
            .map(|(name, health)| {
                let mut component = json!({ "status": status(health.is_up()) });
                if !health.details.is_empty() {
                    component["details"] = json!(health.details);
                }
                (name.clone(), component)
            })
            .collect();
        let bindings: serde_json::Map<String, Value> = self
            .bindings
            .iter()
            .map(|(name, (state, up))| {
                let component = json!({
                    "status": status(*up),
                    "details": { "state": state.as_str() },
                });
                (name.clone(), component)
            })
            .collect();
        json!({
            "status": status(self.is_up()),
            "components": {
                "binders": {
                    "status": status(self.binders.values().all(Health::is_up)),
                    "components": binders,
                },
                "bindings": {
                    "status": status(self.bindings.values().all(|(_, up)| *up)),
                    "components": bindings,
                },
            },
        })
    }
}

fn status(up: bool) -> &'static str {
    match up {
        true => "UP",
        false => "DOWN",
    }
}

impl Controls {
    pub(crate) fn new(
        controls: BTreeMap<String, Control>,
        bindings: Vec<BindingInfo>,
        binders: BTreeMap<String, Arc<dyn Binder>>,
        change_limit: Duration,
    ) -> Self {
        Controls {
            inner: Arc::new(Inner {
                controls,
                bindings,
                binders,
                change_limit,
                shut_down: watch::Sender::new(false),
            }),
        }
    }

    /// The application shuts down: whatever a clone of these controls still does ends.
    pub(crate) fn shut_down(&self) {
        self.inner.shut_down.send_replace(true);
    }

    /// Runs `doing` unless, or until, the application shuts down.
    async fn unless_shut_down<T>(
        &self,
        name: &str,
        doing: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut shut_down = self.inner.shut_down.subscribe();
        tokio::select! {
            biased;
            _ = shut_down.wait_for(|down| *down) => Err(Error::Binding {
                binding: name.to_owned(),
                message: "was not changed: the application is shutting down".to_owned(),
            }),
            done = doing => done,
        }
    }

    pub(crate) fn lifecycles(&self) -> impl Iterator<Item = &Control> {
        self.inner.controls.values()
    }

    /// Every binding, inputs first, with the state of each input.
    pub fn bindings(&self) -> Vec<BindingStatus> {
        self.inner
            .bindings
            .iter()
            .map(|binding| BindingStatus {
                binding: binding.clone(),
                state: match binding.input {
                    true => self.binding_state(&binding.name),
                    false => None,
                },
            })
            .collect()
    }

    /// One binding by name (such as `bill-in-0`), input or output.
    pub fn binding(&self, name: &str) -> Option<BindingStatus> {
        let name = crate::config::normalize_name(name);
        self.bindings().into_iter().find(|b| b.binding.name == name)
    }

    /// What the input binding `binding` is doing; `None` for a name that is no input binding.
    pub fn binding_state(&self, binding: &str) -> Option<BindingState> {
        self.control(binding).ok().map(Control::state)
    }

    /// See [`RunningApplication::pause_binding`](super::RunningApplication::pause_binding).
    pub async fn pause_binding(&self, binding: &str) -> Result<(), Error> {
        let control = self.control(binding)?;
        self.unless_shut_down(binding, control.pause(self.inner.change_limit))
            .await
    }

    /// See [`RunningApplication::resume_binding`](super::RunningApplication::resume_binding).
    pub async fn resume_binding(&self, binding: &str) -> Result<(), Error> {
        let control = self.control(binding)?;
        self.unless_shut_down(binding, control.resume(self.inner.change_limit))
            .await
    }

    /// See [`RunningApplication::stop_binding`](super::RunningApplication::stop_binding).
    pub async fn stop_binding(&self, binding: &str) -> Result<(), Error> {
        let control = self.control(binding)?;
        self.unless_shut_down(binding, control.stop(self.inner.change_limit))
            .await
    }

    /// See [`RunningApplication::start_binding`](super::RunningApplication::start_binding).
    pub async fn start_binding(&self, binding: &str) -> Result<(), Error> {
        let control = self.control(binding)?;
        self.unless_shut_down(binding, control.start(self.inner.change_limit))
            .await
    }

    /// Asks every binder whether its broker is reachable (each within five seconds, all at
    /// once) and every input binding whether its engine runs.
    /// Once the application shuts down, every binder is down.
    pub async fn health(&self) -> ApplicationHealth {
        let asked = self.inner.binders.iter().map(|(name, binder)| async move {
            let asking = tokio::time::timeout(HEALTH_WITHIN, binder.health());
            let health = match self.unless_shut_down(name, async { Ok(asking.await) }).await {
                Ok(Ok(health)) => health,
                Ok(Err(_)) => Health::down(format!(
                    "the binder did not say within {HEALTH_WITHIN:?} whether its broker is reachable"
                )),
                Err(_) => Health::down("the application is shutting down"),
            };
            (name.clone(), health)
        });
        let binders = futures::future::join_all(asked).await.into_iter().collect();
        let bindings = self
            .inner
            .controls
            .iter()
            .map(|(name, control)| (name.clone(), (control.state(), control.runs())))
            .collect();
        ApplicationHealth { binders, bindings }
    }

    /// Each input binding's consumer lag: how many messages wait for its group, as its binder
    /// tells it (each within two seconds, all at once); `None` where the binder cannot tell,
    /// or did not in time.
    pub async fn lags(&self) -> BTreeMap<String, Option<u64>> {
        let asked = self
            .inner
            .controls
            .iter()
            .map(|(name, control)| async move {
                let lag = tokio::time::timeout(LAG_WITHIN, control.lag()).await;
                (name.clone(), lag.ok().flatten())
            });
        futures::future::join_all(asked).await.into_iter().collect()
    }

    fn control(&self, binding: &str) -> Result<&Control, Error> {
        let name = crate::config::normalize_name(binding);
        self.inner
            .controls
            .get(&name)
            .ok_or_else(|| Error::Binding {
                binding: binding.to_owned(),
                message: format!(
                    "is no input binding of this application; its input bindings are: {}",
                    self.inner
                        .controls
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}
