//! Publisher confirms of one channel, settled in publish order, with returned messages matched
//! to their sends by `message_id`.
//!
//! lapin hands a `basic.return` to whichever confirm it resolves next, and resolves the confirms
//! of one multiple-ack in no particular order: a return can travel with another message's
//! confirm, answered before or with the returned message's own. RabbitMQ sends a message's
//! return before its ack. So each message is made known to the settler before it is published,
//! and a message answered by a given moment is decided only after the settler has made sure it
//! knows every message published until then, each with its confirm, and has put down the
//! returns of every confirm answered so far: the return of a message it decides came before
//! the message's ack, with a confirm answered by then.
//!
//! A return names its message only by `message_id`: every message waiting with that id (or,
//! for a return without one, every message waiting without one) counts as returned and is sent
//! again, so messages that share an id may be duplicated but are never lost.

use std::collections::VecDeque;
use std::future::Future;

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

/// A message's confirm: to come while its publish is under way.
enum Confirm {
    Publishing(oneshot::Receiver<PublisherConfirm>),
    Published(PublisherConfirm),
}

struct Waiting {
    own_id: Option<String>,
    confirm: Confirm,
    answer: Option<Answer>,
    /// Answered before the settler last made sure it knew every message published until then:
    /// the returns of its ack have all been seen, so it can be decided.
    ripe: bool,
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

    /// Publishes with `publishing` a message whose `message_id` is `own_id`, made known to the
    /// settler first, and follows its confirm. A publish that fails, or is given up (the future
    /// dropped), is forgotten by the settler.
    pub(crate) async fn publish<E>(
        &self,
        own_id: Option<String>,
        publishing: impl Future<Output = Result<PublisherConfirm, E>>,
    ) -> Result<oneshot::Receiver<lapin::Result<Outcome>>, E> {
        let (reply, outcome) = oneshot::channel();
        let (published, confirm) = oneshot::channel();
        // The settler ends only when every sender is gone: nothing is lost on the way.
        let _ = self.sends.send(Waiting {
            own_id,
            confirm: Confirm::Publishing(confirm),
            answer: None,
            ripe: false,
            returned_here: false,
            reply,
        });
        let _ = published.send(publishing.await?);
        Ok(outcome)
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

/// Puts a return down to every message waiting that it can be: each one with its `message_id`
/// (messages may share one: a handler that hands on its input's headers to several outputs),
/// or, for a return without one, each one without one. `waiting` gives each waiting message's
/// id and its mark.
fn put_down<'a>(
    returned_id: &Option<String>,
    waiting: impl Iterator<Item = (&'a Option<String>, &'a mut bool)>,
) {
    for (_, returned_here) in waiting.filter(|(own_id, _)| *own_id == returned_id) {
        *returned_here = true;
    }
}

/// The id and the mark of every message waiting.
fn marks(waiting: &mut VecDeque<Waiting>) -> impl Iterator<Item = (&Option<String>, &mut bool)> {
    waiting
        .iter_mut()
        .map(|entry| (&entry.own_id, &mut entry.returned_here))
}

/// Looks at every confirm answered by now, keeping the returns they carry.
fn answers_so_far(waiting: &mut VecDeque<Waiting>, returns: &mut Vec<Option<String>>) {
    for entry in waiting.iter_mut().filter(|w| w.answer.is_none()) {
        if let Confirm::Published(confirm) = &mut entry.confirm {
            if let Some(answer) = confirm.now_or_never() {
                returns.extend(returned_with(&answer));
                entry.answer = Some(answer);
            }
        }
    }
}

async fn settle(mut incoming: mpsc::UnboundedReceiver<Waiting>) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut open = true;
    // Returns seen before the settler next makes sure it knows every message published until
    // then: their messages will be waiting once it has.
    let mut returns: Vec<Option<String>> = Vec::new();
    loop {
        answers_so_far(&mut waiting, &mut returns);
        for entry in waiting.iter_mut().filter(|w| w.answer.is_some()) {
            entry.ripe = true;
        }
        // Every message published by now, each with its confirm; a publish under way takes
        // moments (and its caller's deadline bounds it), one that failed is forgotten.
        while let Ok(next) = incoming.try_recv() {
            waiting.push_back(next);
        }
        let mut index = 0;
        while index < waiting.len() {
            if let Confirm::Publishing(publishing) = &mut waiting[index].confirm {
                match publishing.await {
                    Ok(confirm) => waiting[index].confirm = Confirm::Published(confirm),
                    Err(_) => {
                        waiting.remove(index);
                        continue;
                    }
                }
            }
            index += 1;
        }
        // Returns seen from now on may be of a message published since: each is put down now
        // and once more in the next round, when that message is known.
        let mut later = Vec::new();
        answers_so_far(&mut waiting, &mut later);
        for returned_id in returns.iter().chain(&later) {
            put_down(returned_id, marks(&mut waiting));
        }
        returns = later;
        while waiting.front().is_some_and(|w| w.ripe) {
            let entry = waiting.pop_front().expect("a front");
            let outcome = match entry.answer.expect("answered") {
                Err(error) => Err(error),
                Ok(lapin::Confirmation::Nack(_)) => Ok(Outcome::Refused),
                Ok(_) if entry.returned_here => Ok(Outcome::Returned),
                Ok(_) => Ok(Outcome::Delivered),
            };
            let _ = entry.reply.send(outcome);
        }
        // An answered front is ripe in the next round, which comes at once.
        match waiting.front_mut() {
            None if !open => return,
            None => match incoming.recv().await {
                Some(next) => waiting.push_back(next),
                None => open = false,
            },
            Some(front) if front.answer.is_some() => {}
            Some(front) => {
                let Confirm::Published(confirm) = &mut front.confirm else {
                    continue;
                };
                tokio::select! {
                    answer = confirm => {
                        returns.extend(returned_with(&answer));
                        front.answer = Some(answer);
                    }
                    next = incoming.recv(), if open => match next {
                        Some(next) => waiting.push_back(next),
                        None => open = false,
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of the messages waiting with `ids` a return with `returned_id` is put down to.
    fn put_down_among(returned_id: Option<&str>, ids: &[Option<&str>]) -> Vec<bool> {
        let mut waiting: Vec<(Option<String>, bool)> = ids
            .iter()
            .map(|id| (id.map(str::to_owned), false))
            .collect();
        put_down(
            &returned_id.map(str::to_owned),
            waiting.iter_mut().map(|(id, mark)| (&*id, mark)),
        );
        waiting.into_iter().map(|(_, mark)| mark).collect()
    }

    #[test]
    fn a_return_is_put_down_to_every_message_waiting_that_it_can_be() {
        let (a, b) = (Some("a"), Some("b"));
        // Its own id only.
        assert_eq!(put_down_among(a, &[a, b, None]), [true, false, false]);
        // An id several messages share: each of them, since any could be the one returned.
        assert_eq!(put_down_among(a, &[a, b, a]), [true, false, true]);
        // Without an id: every message sent without one.
        assert_eq!(put_down_among(None, &[None, b, None]), [true, false, true]);
    }
}
