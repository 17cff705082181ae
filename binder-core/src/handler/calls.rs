//! How a binding calls its handler, message after message: each call's future is made in the
//! allocation of the call before it, so a handler called for every message costs no allocation
//! per call for its future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use super::{Context, Failure, FailureKind, HandlerFuture, Outputs};
use crate::Message;

/// Calls of one handler, one after another; what [`Handler::calls`](super::Handler::calls)
/// gives. A binding starts a call, polls it until it is ready, then starts the next.
pub trait HandlerCalls: Send {
    /// Starts a call on `message`, dropping what is left of the one before.
    fn start(&mut self, message: Arc<Message>, context: Context);

    /// Polls the call started last. Once it is ready its future is dropped, in place; polled
    /// again without a call started, it answers with a failure.
    fn poll_call(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Outputs, Failure>>;
}

/// Each call's future made by `make`, in one allocation kept for every call.
pub(super) struct Reused<Make, Call> {
    make: Make,
    call: Pin<Box<Option<Call>>>,
}

impl<Make, Call> Reused<Make, Call>
where
    Make: Fn(Arc<Message>, Context) -> Call + Send,
    Call: Future<Output = Result<Outputs, Failure>> + Send,
{
    pub(super) fn new(make: Make) -> Self {
        Reused {
            make,
            call: Box::pin(None),
        }
    }
}

impl<Make, Call> HandlerCalls for Reused<Make, Call>
where
    Make: Fn(Arc<Message>, Context) -> Call + Send,
    Call: Future<Output = Result<Outputs, Failure>> + Send,
{
    fn start(&mut self, message: Arc<Message>, context: Context) {
        let call = (self.make)(message, context);
        self.call.as_mut().set(Some(call));
    }

    fn poll_call(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Outputs, Failure>> {
        let Some(call) = self.call.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(no_call()));
        };
        let polled = call.poll(cx);
        if polled.is_ready() {
            self.call.as_mut().set(None);
        }
        polled
    }
}

/// The calls of a handler that only says how to make one boxed call: each is boxed.
pub(super) struct Boxed<Make> {
    make: Make,
    call: Option<HandlerFuture>,
}

impl<Make> Boxed<Make>
where
    Make: Fn(Arc<Message>, Context) -> HandlerFuture + Send,
{
    pub(super) fn new(make: Make) -> Self {
        Boxed { make, call: None }
    }
}

impl<Make> HandlerCalls for Boxed<Make>
where
    Make: Fn(Arc<Message>, Context) -> HandlerFuture + Send,
{
    fn start(&mut self, message: Arc<Message>, context: Context) {
        self.call = Some((self.make)(message, context));
    }

    fn poll_call(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Outputs, Failure>> {
        let Some(call) = &mut self.call else {
            return Poll::Ready(Err(no_call()));
        };
        let polled = call.as_mut().poll(cx);
        if polled.is_ready() {
            self.call = None;
        }
        polled
    }
}

fn no_call() -> Failure {
    Failure::new(
        FailureKind::Panic,
        "bindery::Error",
        "a handler call was polled before it was started",
    )
}

impl std::fmt::Debug for dyn HandlerCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandlerCalls")
    }
}
