//! Publisher confirms of one channel, settled in publish order, with returned messages matched
//! to their sends by `message_id`.
//!
//! lapin hands a `basic.return` to whichever confirm it resolves next, and resolves the confirms
//! of one multiple-ack in no particular order: a return can travel with another message's
//! confirm. RabbitMQ sends a message's return before its ack, so once a confirm is answered,
//! every return that can concern it travels with a confirm answered by then. The settler
//! therefore collects the returns of every confirm answered so far before it decides the oldest.
//! A return names its message only by `message_id`: every message waiting with that id (or,
//! for a return without one, every message sent without one) counts as returned and is sent
//! again, so messages that share an id may be duplicated but are never lost.

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

/// The return an answer carries, if any: the `message_id` of the message returned, or `None`
/// for a message sent without one.
fn returned_with(answer: &Answer) -> Option<Option<String>> {
    let attached = match answer {
        Ok(lapin::Confirmation::Ack(Some(message)))
        | Ok(lapin::Confirmation::Nack(Some(message))) => message,
        _ => return None,
    };
    Some(
        attached
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string()),
    )
}

/// Puts a return down to every message still waiting that it can be: all those with its
/// `message_id` (messages may share one: a handler that hands on its input's headers to several
/// outputs), or, for a return without one, all those sent without one. Each is sent again, a
/// duplicate at worst, never a loss. A return whose message is not waiting yet (its send is
/// still being tracked) is remembered for the first message with its id that is settled.
/// `waiting` gives each waiting message's id and its mark.
fn put_down<'a>(
    returned_id: Option<String>,
    waiting: impl Iterator<Item = (&'a Option<String>, &'a mut bool)>,
    returned: &mut HashSet<String>,
) {
    let mut found = false;
    for (_, returned_here) in waiting.filter(|(own_id, _)| **own_id == returned_id) {
        *returned_here = true;
        found = true;
    }
    if let (false, Some(id)) = (found, returned_id) {
        returned.insert(id);
    }
}

/// The id and the mark of every message waiting.
fn marks(waiting: &mut VecDeque<Waiting>) -> impl Iterator<Item = (&Option<String>, &mut bool)> {
    waiting
        .iter_mut()
        .map(|entry| (&entry.own_id, &mut entry.returned_here))
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
        let mut returns = Vec::new();
        for entry in waiting.iter_mut().filter(|w| w.answer.is_none()) {
            if let Some(answer) = (&mut entry.confirm).now_or_never() {
                returns.extend(returned_with(&answer));
                entry.answer = Some(answer);
            }
        }
        for returned_id in returns {
            put_down(returned_id, marks(&mut waiting), &mut returned);
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
                let carried = tokio::select! {
                    answer = &mut front.confirm => {
                        let carried = returned_with(&answer);
                        front.answer = Some(answer);
                        carried
                    }
                    next = incoming.recv(), if open => {
                        match next {
                            Some(next) => waiting.push_back(next),
                            None => open = false,
                        }
                        None
                    }
                };
                if let Some(returned_id) = carried {
                    // The returned message may have been tracked meanwhile.
                    while let Ok(next) = incoming.try_recv() {
                        waiting.push_back(next);
                    }
                    put_down(returned_id, marks(&mut waiting), &mut returned);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marks what a return with `returned_id` is put down to, among messages waiting with
    /// `ids`; and what is remembered for messages not waiting yet.
    fn put_down_among(returned_id: Option<&str>, ids: &[Option<&str>]) -> (Vec<bool>, Vec<String>) {
        let mut waiting: Vec<(Option<String>, bool)> = ids
            .iter()
            .map(|id| (id.map(str::to_owned), false))
            .collect();
        let mut returned = HashSet::new();
        put_down(
            returned_id.map(str::to_owned),
            waiting.iter_mut().map(|(id, mark)| (&*id, mark)),
            &mut returned,
        );
        let marks = waiting.into_iter().map(|(_, mark)| mark).collect();
        (marks, returned.into_iter().collect())
    }

    #[test]
    fn a_return_is_put_down_to_every_message_waiting_it_can_be() {
        let none: Vec<String> = Vec::new();
        // Its own id only.
        assert_eq!(
            put_down_among(Some("a"), &[Some("a"), Some("b"), None]),
            (vec![true, false, false], none.clone())
        );
        // An id several messages share: each of them, since any could be the one returned.
        assert_eq!(
            put_down_among(Some("a"), &[Some("a"), Some("b"), Some("a")]),
            (vec![true, false, true], none.clone())
        );
        // Without an id: every message sent without one.
        assert_eq!(
            put_down_among(None, &[None, Some("b"), None]),
            (vec![true, false, true], none)
        );
        // The message is not waiting yet: remembered for it.
        assert_eq!(
            put_down_among(Some("c"), &[Some("a"), None]),
            (vec![false, false], vec!["c".to_owned()])
        );
    }
}
