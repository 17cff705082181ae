//! A binding's lifecycle while its application runs: started, paused, stopped and started
//! again, with the states of Spring Cloud Stream's bindings endpoint.
//!
//! The application asks ([`Control`]); the binding's engine does it and says what it does
//! ([`Steering`]); [`supervise`] runs the engine while the binding is subscribed and waits for a
//! new subscription while it is stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex};

use super::binding::InputBinding;
use crate::binder::{Binder, ConsumerSpec, Subscription};
use crate::Error;

/// What an input binding is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BindingState {
    /// Receiving and handling messages.
    Started,
    /// Subscribed, but starting no handler: calls already running finish and are
    /// acknowledged, the broker keeps everything else for the group. Messages the binding had
    /// received but not started stay unacknowledged until it resumes (or, if it stops, go back
    /// to the broker).
    Paused,
    /// Not subscribed: the broker keeps the group's messages. Started again, the binding goes
    /// on where its group left off.
    Stopped,
}

impl BindingState {
    /// `started`, `paused` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingState::Started => "started",
            BindingState::Paused => "paused",
            BindingState::Stopped => "stopped",
        }
    }
}

/// What the application asks of a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    Run,
    Pause,
    Stop,
    /// The application shuts down: stop, for good.
    ShutDown,
}

impl Wanted {
    pub(crate) fn stops(self) -> bool {
        matches!(self, Wanted::Stop | Wanted::ShutDown)
    }
}

/// The application's handle on one input binding.
#[derive(Debug)]
pub(crate) struct Control {
    binding: String,
    wanted: watch::Sender<Wanted>,
    state: watch::Receiver<BindingState>,
    resubscribed: mpsc::Sender<Box<dyn Subscription>>,
    binder: Arc<dyn Binder>,
    spec: ConsumerSpec,
    /// One change at a time.
    changing: Mutex<()>,
}

/// The binding's side of its [`Control`].
#[derive(Debug)]
pub(crate) struct Steering {
    pub(crate) wanted: watch::Receiver<Wanted>,
    pub(crate) state: watch::Sender<BindingState>,
    resubscribed: mpsc::Receiver<Box<dyn Subscription>>,
}

/// A started binding's control, and its engine's side of it.
pub(crate) fn control(
    binding: &str,
    binder: Arc<dyn Binder>,
    spec: ConsumerSpec,
) -> (Control, Steering) {
    let (wanted_tx, wanted) = watch::channel(Wanted::Run);
    let (state_tx, state) = watch::channel(BindingState::Started);
    let (resubscribe, resubscribed) = mpsc::channel(1);
    let control = Control {
        binding: binding.to_owned(),
        wanted: wanted_tx,
        state,
        resubscribed: resubscribe,
        binder,
        spec,
        changing: Mutex::new(()),
    };
    let steering = Steering {
        wanted,
        state: state_tx,
        resubscribed,
    };
    (control, steering)
}

impl Control {
    pub(crate) fn state(&self) -> BindingState {
        *self.state.borrow()
    }

    /// Whether the binding's engine still runs: a binding stopped on purpose waits to be
    /// started; one that failed, or that the application shut down, has ended.
    pub(crate) fn runs(&self) -> bool {
        // The engine's side of the state channel lives as long as the engine does.
        self.state.has_changed().is_ok()
    }

    /// How many messages wait for the binding's group, as its binder tells it.
    pub(crate) async fn lag(&self) -> Option<u64> {
        self.binder.lag(&self.spec).await
    }

    /// The application shuts down: the binding stops as a shutdown does, whatever it was
    /// asked before.
    pub(crate) fn shut_down(&self) {
        self.wanted.send_replace(Wanted::ShutDown);
    }

    /// Starts no more handlers; returns once the binding said so.
    pub(crate) async fn pause(&self, within: Duration) -> Result<(), Error> {
        self.while_subscribed(Wanted::Pause, BindingState::Paused, "pausing", within)
            .await
    }

    /// Handles messages again after a pause.
    pub(crate) async fn resume(&self, within: Duration) -> Result<(), Error> {
        self.while_subscribed(Wanted::Run, BindingState::Started, "resuming", within)
            .await
    }

    /// Asks for a change that only a subscribed binding can make.
    async fn while_subscribed(
        &self,
        wanted: Wanted,
        then: BindingState,
        doing: &str,
        within: Duration,
    ) -> Result<(), Error> {
        let _changing = self.one_change_at_a_time(within).await?;
        self.not_stopping()?;
        match self.state() {
            BindingState::Stopped => {
                Err(self.refused(&format!("is stopped; start it instead of {doing} it")))
            }
            _ => self.ask(wanted, then, within).await,
        }
    }

    /// Refuses a change while an earlier stop has not finished.
    fn not_stopping(&self) -> Result<(), Error> {
        let stopping = self.wanted.borrow().stops() && self.state() != BindingState::Stopped;
        match stopping {
            true => Err(self.refused(
                "is still stopping (finishing what was in flight); change it once it is stopped",
            )),
            false => Ok(()),
        }
    }

    /// Finishes what is in flight as a shutdown does, and closes the subscription; returns
    /// once it is closed.
    pub(crate) async fn stop(&self, within: Duration) -> Result<(), Error> {
        let _changing = self.one_change_at_a_time(within).await?;
        self.ask(Wanted::Stop, BindingState::Stopped, within).await
    }

    /// Waits, within `within`, for a change under way to finish.
    async fn one_change_at_a_time(
        &self,
        within: Duration,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, Error> {
        tokio::time::timeout(within, self.changing.lock())
            .await
            .map_err(|_| {
                self.refused(&format!(
                    "is still changing (another change did not finish within {within:?}); try again later"
                ))
            })
    }

    /// Refuses every change once the application shuts down.
    fn not_shut_down(&self) -> Result<(), Error> {
        match *self.wanted.borrow() == Wanted::ShutDown || !self.runs() {
            true => Err(self.ended()),
            false => Ok(()),
        }
    }

    /// Subscribes again after a stop (or resumes after a pause); returns once the binding runs
    /// on its new subscription.
    pub(crate) async fn start(&self, within: Duration) -> Result<(), Error> {
        let _changing = self.one_change_at_a_time(within).await?;
        self.not_shut_down()?;
        self.not_stopping()?;
        if self.state() != BindingState::Stopped {
            return self.ask(Wanted::Run, BindingState::Started, within).await;
        }
        let subscription = tokio::time::timeout(within, self.binder.subscribe(&self.spec))
            .await
            .map_err(|_| self.refused(&format!("could not subscribe again within {within:?}")))??;
        let refusal = match self.want(Wanted::Run) {
            Ok(()) => match self.resubscribed.try_send(subscription) {
                Ok(()) => return self.wait_for(BindingState::Started, within).await,
                Err(mpsc::error::TrySendError::Full(unsent)) => (
                    unsent,
                    self.refused("is still taking up an earlier start; try again later"),
                ),
                Err(mpsc::error::TrySendError::Closed(unsent)) => (unsent, self.ended()),
            },
            Err(ended) => (subscription, ended),
        };
        // Not taken up: the subscription is closed, not kept.
        let (unsent, error) = refusal;
        if tokio::time::timeout(within, unsent.close()).await.is_err() {
            tracing::warn!(binding = %self.binding, "a subscription that was not taken up did not close within {within:?}");
        }
        Err(error)
    }

    async fn ask(&self, wanted: Wanted, then: BindingState, within: Duration) -> Result<(), Error> {
        self.want(wanted)?;
        self.wait_for(then, within).await
    }

    /// Asks the engine for `wanted`, unless the application shuts down: a shutdown is never
    /// overridden.
    fn want(&self, wanted: Wanted) -> Result<(), Error> {
        let mut shut_down = false;
        self.wanted.send_if_modified(|now| {
            shut_down = *now == Wanted::ShutDown;
            let change = !shut_down && *now != wanted;
            if change {
                *now = wanted;
            }
            change
        });
        match shut_down {
            true => Err(self.ended()),
            false => Ok(()),
        }
    }

    async fn wait_for(&self, state: BindingState, within: Duration) -> Result<(), Error> {
        let mut states = self.state.clone();
        let reached = tokio::time::timeout(within, async {
            states.wait_for(|now| *now == state).await.map(|_| ())
        })
        .await;
        match reached {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.ended()),
            Err(_) => Err(self.refused(&format!(
                "was not {state:?} within {within:?}; it is {:?} and goes on changing",
                self.state()
            ))),
        }
    }

    /// The binding's task has ended: the application stops, or the binding failed.
    fn ended(&self) -> Error {
        self.refused(
            "has ended: the application is shutting down, or the binding failed (see the log)",
        )
    }

    fn refused(&self, why: &str) -> Error {
        Error::Binding {
            binding: self.binding.clone(),
            message: why.to_owned(),
        }
    }
}

/// Runs the binding until the application stops: its engine while it is subscribed, and while
/// it is stopped, a wait for its next subscription. An engine that ends by itself ends this
/// with its error.
pub(crate) async fn supervise(
    binding: Arc<InputBinding>,
    subscription: Box<dyn Subscription>,
    mut shutdown: watch::Receiver<bool>,
    mut steering: Steering,
) -> Result<(), Error> {
    let mut subscription = subscription;
    loop {
        if let Err(error) = binding.clone().run(subscription, &mut steering).await {
            // Failed: no longer subscribed, and no start brings it back (its task ends).
            steering.state.send_replace(BindingState::Stopped);
            return Err(error);
        }
        // The engine ends without an error at shutdown, or when it was asked to stop.
        let shutting_down = *shutdown.borrow();
        if shutting_down {
            return Ok(());
        }
        steering.state.send_replace(BindingState::Stopped);
        tracing::info!(binding = %binding.binding, "binding stopped");
        subscription = tokio::select! {
            // A shutdown wins over a start that arrives at the same time.
            biased;
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                // A start that raced the shutdown: its subscription is closed, not dropped.
                if let Ok(subscription) = steering.resubscribed.try_recv() {
                    let closing = tokio::time::timeout(super::CLOSE_AT_LEAST, subscription.close());
                    if closing.await.is_err() {
                        tracing::warn!(binding = %binding.binding, "a subscription made while shutting down did not close in time");
                    }
                }
                return Ok(());
            }
            next = steering.resubscribed.recv() => match next {
                Some(subscription) => subscription,
                None => return Ok(()),
            },
        };
        tracing::info!(binding = %binding.binding, "binding started again");
    }
}
