//! Publisher confirms of one channel, settled in publish order, with returned messages matched
//! to their sends by `message_id`.
//!
//! lapin hands a `basic.return` to whichever confirm it resolves next, and resolves the confirms
//! of one multiple-ack in no particular order: a return can travel with another message's
//! confirm. RabbitMQ sends a message's return before its ack, so once a confirm is answered,
//! every return that can concern it travels with a confirm answered by then. The settler
//! therefore collects the returns of every confirm answered so far before it decides the oldest.

use std::collections::{HashSet, VecDeque};

use futures::FutureExt;
use lapin::PublisherConfirm;
use tokio::sync::{mpsc, oneshot};

/// What became of one published message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The broker took it.
    Delivered,
    /// No queue was bound for it (`mandatory`): the broker returned it.
    Returned,
    /// The broker refused it (`basic.nack`).
    Refused,
}

type Answer = lapin::Result<lapin::Confirmation>;

struct Waiting {
    own_id: Option<String>,
    confirm: PublisherConfirm,
    answer: Option<Answer>,
    returned_here: bool,
    reply: oneshot::Sender<lapin::Result<Outcome>>,
}

/// The settler of one confirming channel.
#[derive(Clone, Debug)]
pub(crate) struct Confirms {
    sends: mpsc::UnboundedSender<Waiting>,
}

impl Confirms {
    pub(crate) fn start() -> Self {
        let (sends, incoming) = mpsc::unbounded_channel();
        tokio::spawn(settle(incoming));
        Confirms { sends }
    }

    /// Follows the confirm of a message just published with `own_id` as its `message_id`.
    pub(crate) fn track(
        &self,
        own_id: Option<String>,
        confirm: PublisherConfirm,
    ) -> oneshot::Receiver<lapin::Result<Outcome>> {
        let (reply, outcome) = oneshot::channel();
        // The settler ends only when every sender is gone: nothing is lost on the way.
        let _ = self.sends.send(Waiting {
            own_id,
            confirm,
            answer: None,
            returned_here: false,
            reply,
        });
        outcome
    }
}

/// Records what an answer says about returns: its own, or another message's to remember.
/// Returns whether a message without a `message_id` was returned, which cannot be told apart
/// from any other without one.
#[must_use]
fn note_returns(waiting: &mut Waiting, answer: &Answer, returned: &mut HashSet<String>) -> bool {
    let attached = match answer {
        Ok(lapin::Confirmation::Ack(Some(message)))
        | Ok(lapin::Confirmation::Nack(Some(message))) => message,
        _ => return false,
    };
    let id = attached
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string());
    match attribute(waiting.own_id.as_deref(), id) {
        Attribution::Own => waiting.returned_here = true,
        Attribution::Other(id) => {
            returned.insert(id);
        }
        Attribution::AnyWithoutId => return true,
    }
    false
}

/// Whose a return is, as far as its `message_id` tells.
#[derive(Debug, PartialEq, Eq)]
enum Attribution {
    /// The message whose confirm it came with.
    Own,
    /// The message with this id.
    Other(String),
    /// One of the messages sent without a `message_id` (an `x-message-id` that is not short
    /// text travels as a header only).
    AnyWithoutId,
}

fn attribute(own_id: Option<&str>, returned_id: Option<String>) -> Attribution {
    match (own_id, returned_id) {
        (Some(own), Some(id)) if own == id => Attribution::Own,
        (_, Some(id)) => Attribution::Other(id),
        (_, None) => Attribution::AnyWithoutId,
    }
}

/// A message without a `message_id` was returned: every such message still waiting counts as
/// returned, so it is sent again (a duplicate, never a loss). Its return comes before its
/// own confirm, so it is among them.
fn anonymous_returned(waiting: &mut VecDeque<Waiting>) {
    for entry in waiting.iter_mut().filter(|w| w.own_id.is_none()) {
        entry.returned_here = true;
    }
}

async fn settle(mut incoming: mpsc::UnboundedReceiver<Waiting>) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut returned: HashSet<String> = HashSet::new();
    let mut open = true;
    loop {
        while let Ok(next) = incoming.try_recv() {
            waiting.push_back(next);
        }
        // Every answer given so far, so that returns travelling with later confirms are known.
        let mut anonymous = false;
        for entry in waiting.iter_mut().filter(|w| w.answer.is_none()) {
            if let Some(answer) = (&mut entry.confirm).now_or_never() {
                anonymous |= note_returns(entry, &answer, &mut returned);
                entry.answer = Some(answer);
            }
        }
        if anonymous {
            anonymous_returned(&mut waiting);
        }
        while waiting.front().is_some_and(|w| w.answer.is_some()) {
            let entry = waiting.pop_front().expect("a front");
            let outcome = match entry.answer.expect("answered") {
                Err(error) => Err(error),
                Ok(lapin::Confirmation::Nack(_)) => Ok(Outcome::Refused),
                Ok(_) if entry.returned_here => Ok(Outcome::Returned),
                Ok(_) => match entry.own_id.as_ref().is_some_and(|id| returned.remove(id)) {
                    true => Ok(Outcome::Returned),
                    false => Ok(Outcome::Delivered),
                },
            };
            let _ = entry.reply.send(outcome);
        }
        match waiting.front_mut() {
            None if !open => return,
            None => match incoming.recv().await {
                Some(next) => waiting.push_back(next),
                None => open = false,
            },
            Some(front) => {
                let anonymous = tokio::select! {
                    answer = &mut front.confirm => {
                        let anonymous = note_returns(front, &answer, &mut returned);
                        front.answer = Some(answer);
                        anonymous
                    }
                    next = incoming.recv(), if open => {
                        match next {
                            Some(next) => waiting.push_back(next),
                            None => open = false,
                        }
                        false
                    }
                };
                if anonymous {
                    anonymous_returned(&mut waiting);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_return_is_put_down_to_the_message_its_id_names_or_to_every_one_without_an_id() {
        let id = |text: &str| Some(text.to_owned());
        assert_eq!(attribute(Some("a"), id("a")), Attribution::Own);
        assert_eq!(
            attribute(Some("a"), id("b")),
            Attribution::Other("b".into())
        );
        // Travelling with the confirm of a message without an id, a return that has one is
        // still that other message's.
        assert_eq!(attribute(None, id("b")), Attribution::Other("b".into()));
        assert_eq!(attribute(Some("a"), None), Attribution::AnyWithoutId);
        assert_eq!(attribute(None, None), Attribution::AnyWithoutId);
    }
}
