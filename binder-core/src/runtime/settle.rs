//! The acknowledgement rule: what settles a message with its broker, and in what order.
//!
//! A message is acknowledged only when its handler succeeded and every output was confirmed,
//! or when its dead letter was confirmed (or, without a DLQ, the failure was logged). It is
//! handed back ("deliver again") only when the binding stops with it unfinished. When the
//! subscription asks for it, verdicts are released strictly in the order messages arrived.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::binder::Acknowledgement;
use crate::Error;

/// What becomes of a received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Done: the broker may forget it.
    Ack,
    /// Unfinished: the broker delivers it again.
    Requeue,
}

/// A settlement: done at once, or still to await.
pub(crate) enum Settling {
    Done(Result<(), Error>),
    Waiting(BoxFuture<'static, Result<(), Error>>),
}

impl Settling {
    /// The broker's answer, waiting for it if it has not come.
    pub(crate) async fn finish(self) -> Result<(), Error> {
        match self {
            Settling::Done(settled) => settled,
            Settling::Waiting(settling) => settling.await,
        }
    }
}

/// Settles one message with its broker: without a future where the acknowledgement can
/// ([`Acknowledgement::try_ack`]), otherwise as far as its future goes at once.
pub(crate) fn settle(mut acknowledgement: Box<dyn Acknowledgement>, verdict: Verdict) -> Settling {
    if verdict == Verdict::Ack {
        if let Some(settled) = acknowledgement.try_ack() {
            return Settling::Done(settled);
        }
    }
    let mut settling = match verdict {
        Verdict::Ack => acknowledgement.ack(),
        Verdict::Requeue => acknowledgement.requeue(),
    };
    // Most brokers settle without waiting; only those that must wait cost a job.
    match (&mut settling).now_or_never() {
        Some(settled) => Settling::Done(settled),
        None => Settling::Waiting(settling),
    }
}

/// Verdicts held back until every earlier message has one, for subscriptions that need
/// their messages settled in the order they arrived.
#[derive(Debug, Default)]
pub(crate) struct InOrder {
    next: u64,
    decided: BTreeMap<u64, (Box<dyn Acknowledgement>, Verdict)>,
}

impl InOrder {
    /// Records the verdict of message number `sequence` (numbered from 0 in arrival order).
    pub(crate) fn decide(
        &mut self,
        sequence: u64,
        acknowledgement: Box<dyn Acknowledgement>,
        verdict: Verdict,
    ) {
        self.decided.insert(sequence, (acknowledgement, verdict));
    }

    /// The verdicts that may be settled now, in arrival order: those with no undecided
    /// message before them.
    pub(crate) fn releasable(&mut self) -> Vec<(Box<dyn Acknowledgement>, Verdict)> {
        let mut ready = Vec::new();
        while let Some(entry) = self.decided.remove(&self.next) {
            ready.push(entry);
            self.next += 1;
        }
        ready
    }
}
