//! The acknowledgement rule: what settles a message with its broker, and in what order.
//!
//! A message is acknowledged only when its handler succeeded and every output was confirmed,
//! or when its dead letter was confirmed (or, without a DLQ, the failure was logged). It is
//! handed back ("deliver again") only when the binding stops with it unfinished. When the
//! subscription asks for it, verdicts are released strictly in the order messages arrived.

use std::collections::BTreeMap;

use futures::future::BoxFuture;

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

/// Settles one message with its broker.
pub(crate) fn settle(
    acknowledgement: Box<dyn Acknowledgement>,
    verdict: Verdict,
) -> BoxFuture<'static, Result<(), Error>> {
    match verdict {
        Verdict::Ack => acknowledgement.ack(),
        Verdict::Requeue => acknowledgement.requeue(),
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
