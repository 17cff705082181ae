//! Sending: messages are handed to their producer in order and confirmed in the background.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use smallvec::SmallVec;

use super::ids::MessageId;
use super::Lineage;
use crate::binder::{Confirmation, Producer};
use crate::handler::panic_text;
use crate::message::header;
use crate::{Error, Message};

/// One message handed to a producer, with the broker's answer still to come.
#[derive(Debug)]
pub(crate) struct Sending {
    pub(crate) message: Message,
    confirmation: Result<Confirmation, Error>,
}

/// The sends of one handler call: most calls produce one message, kept inline.
pub(crate) type Sendings = SmallVec<[Sending; 1]>;

/// Hands `messages` to `producer` one after the other, so they are sent in this order.
/// A producer that panics refuses the message for good rather than taking the binding down.
pub(crate) async fn enqueue_all(
    producer: &Arc<dyn Producer>,
    destination: &str,
    messages: Vec<Message>,
) -> Sendings {
    let mut sendings = Sendings::with_capacity(messages.len());
    for message in messages {
        let confirmation = match AssertUnwindSafe(producer.enqueue(&message))
            .catch_unwind()
            .await
        {
            Ok(confirmation) => confirmation,
            Err(panic) => Err(Error::refused(
                destination,
                format!(
                    "sending to `{destination}` panicked: {}",
                    panic_text(&*panic)
                ),
            )),
        };
        sendings.push(Sending {
            message,
            confirmation,
        });
    }
    sendings
}

/// Whether every send was confirmed already (a broker that takes messages synchronously), so
/// there is nothing to wait for.
pub(crate) fn all_confirmed(sendings: &[Sending]) -> bool {
    sendings
        .iter()
        .all(|s| matches!(&s.confirmation, Ok(c) if c.is_confirmed()))
}

/// Awaits every confirmation; returns the messages that were not confirmed, with why.
pub(crate) async fn confirm_all(sendings: Sendings) -> Vec<(Message, Error)> {
    let answers = futures::future::join_all(sendings.into_iter().map(|sending| async move {
        let answer = match sending.confirmation {
            Ok(confirmation) => confirmation.await,
            Err(error) => Err(error),
        };
        (sending.message, answer)
    }))
    .await;
    answers
        .into_iter()
        .filter_map(|(message, answer)| answer.err().map(|error| (message, error)))
        .collect()
}

/// Gives a message its id (unless the handler set one) and what its input hands on.
pub(crate) fn stamp(message: &mut Message, id: impl FnOnce() -> MessageId, lineage: &Lineage) {
    let headers = message.headers_mut();
    if !headers.contains(header::MESSAGE_ID) {
        headers.set_static(header::MESSAGE_ID, id().bytes().clone());
    }
    lineage.hand_on(headers);
}
