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
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// Why a message's outcome is not known.
#[derive(Debug)]
pub(crate) enum Unanswered {
    /// The broker or the channel failed.
    Broker(lapin::Error),
    /// A publish on the channel was given up or failed: it may have gone out all the same, so
    /// the channel's confirms can no longer be told apart, and none of its messages not
    /// decided yet counts as delivered.
    GivenUp,
}

impl fmt::Display for Unanswered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unanswered::Broker(error) => error.fmt(f),
            Unanswered::GivenUp => f.write_str("a publish on its channel was given up, so the channel's confirms cannot be matched to their messages; it is sent again on a new channel"),
        }
    }
}

type Reply = oneshot::Sender<Result<Outcome, Unanswered>>;

/// A message's confirm: to come while its publish is under way.
enum Confirm<C> {
    Publishing(oneshot::Receiver<C>),
    Published(C),
}

/// A message on its way, with its confirm: lapin's [`PublisherConfirm`] (another future in
/// tests).
struct Waiting<C = PublisherConfirm> {
    own_id: Option<String>,
    confirm: Confirm<C>,
    answer: Option<Answer>,
    /// Answered before the settler last made sure it knew every message published until then:
    /// the returns of its ack have all been seen, so it can be decided.
    ripe: bool,
    returned_here: bool,
    reply: Reply,
}

/// The settler of one confirming channel.
#[derive(Clone, Debug)]
pub(crate) struct Confirms {
    sends: mpsc::UnboundedSender<Waiting>,
    /// One publish at a time: a message is made known to the settler and published in one
    /// turn, so the settler knows messages in the order of their delivery tags.
    turn: Arc<tokio::sync::Mutex<()>>,
    given_up: Arc<AtomicBool>,
}

impl Confirms {
    pub(crate) fn start() -> Self {
        let (sends, incoming) = mpsc::unbounded_channel();
        let given_up = Arc::new(AtomicBool::new(false));
        tokio::spawn(settle(incoming, given_up.clone()));
        Confirms {
            sends,
            turn: Arc::default(),
            given_up,
        }
    }

    /// Whether the channel is still used: not after a publish failed or was given up, nor
    /// after a confirm never came. Closing it fails the confirms still waiting.
    pub(crate) fn usable(&self) -> bool {
        !self.given_up.load(Ordering::Acquire)
    }

    /// The channel is not used again.
    pub(crate) fn give_up(&self) {
        self.given_up.store(true, Ordering::Release);
    }

    /// Publishes with `publishing` a message whose `message_id` is `own_id`, made known to the
    /// settler first, and follows its confirm. A publish that fails, or is given up (the future
    /// dropped), may have been sent all the same, with a confirm no one follows that a return
    /// can travel with: every message of the channel not decided yet then fails, and the
    /// channel is not used again.
    pub(crate) async fn publish<E>(
        &self,
        own_id: Option<String>,
        publishing: impl Future<Output = Result<PublisherConfirm, E>>,
    ) -> Result<oneshot::Receiver<Result<Outcome, Unanswered>>, E> {
        let _turn = self.turn.lock().await;
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
        if !self.usable() {
            // Not published (lapin registers a publish when it is first polled): the settler,
            // without a confirm for it, refuses it and every message not decided yet.
            return Ok(outcome);
        }
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
fn marks<C>(
    waiting: &mut VecDeque<Waiting<C>>,
) -> impl Iterator<Item = (&Option<String>, &mut bool)> {
    waiting
        .iter_mut()
        .map(|entry| (&entry.own_id, &mut entry.returned_here))
}

/// Looks at every confirm answered by now, keeping the returns they carry.
fn answers_so_far<C: Confirmed>(
    waiting: &mut VecDeque<Waiting<C>>,
    returns: &mut Vec<Option<String>>,
) {
    for entry in waiting.iter_mut().filter(|w| w.answer.is_none()) {
        if let Confirm::Published(confirm) = &mut entry.confirm {
            if let Some(answer) = confirm.now_or_never() {
                returns.extend(returned_with(&answer));
                entry.answer = Some(answer);
            }
        }
    }
}

/// What the settler awaits of each message: its broker's answer.
trait Confirmed: Future<Output = Answer> + Unpin {}

impl<C: Future<Output = Answer> + Unpin> Confirmed for C {}

async fn settle<C: Confirmed>(
    mut incoming: mpsc::UnboundedReceiver<Waiting<C>>,
    given_up: Arc<AtomicBool>,
) {
    let mut waiting: VecDeque<Waiting<C>> = VecDeque::new();
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
        // moments (and its caller's deadline bounds it).
        while let Ok(next) = incoming.try_recv() {
            waiting.push_back(next);
        }
        let mut abandoned = false;
        for entry in waiting.iter_mut() {
            if let Confirm::Publishing(publishing) = &mut entry.confirm {
                match publishing.await {
                    Ok(confirm) => entry.confirm = Confirm::Published(confirm),
                    Err(_) => {
                        abandoned = true;
                        break;
                    }
                }
            }
        }
        if abandoned {
            given_up.store(true, Ordering::Release);
            return refuse_all(waiting, incoming).await;
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
                Err(error) => Err(Unanswered::Broker(error)),
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

/// A publish was given up: no message of the channel not decided yet, nor any published on it
/// from now on, counts as delivered. Each is sent again, on a new channel.
async fn refuse_all<C>(
    waiting: VecDeque<Waiting<C>>,
    mut incoming: mpsc::UnboundedReceiver<Waiting<C>>,
) {
    for entry in waiting {
        let _ = entry.reply.send(Err(Unanswered::GivenUp));
    }
    while let Some(entry) = incoming.recv().await {
        let _ = entry.reply.send(Err(Unanswered::GivenUp));
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

    /// A confirm the test answers.
    struct Answered(oneshot::Receiver<Answer>);

    impl Future for Answered {
        type Output = Answer;

        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Answer> {
            std::pin::Pin::new(&mut self.0)
                .poll(cx)
                .map(|answer| answer.expect("the test answers every confirm it publishes"))
        }
    }

    /// One message made known to a settler, as [`Confirms::publish`] does before publishing.
    struct Sent {
        published: Option<oneshot::Sender<Answered>>,
        confirm: Option<Answered>,
        answer: Option<oneshot::Sender<Answer>>,
        outcome: oneshot::Receiver<Result<Outcome, Unanswered>>,
    }

    impl Sent {
        /// Its publish is done: the settler has its confirm.
        fn publish(&mut self) {
            let confirm = self.confirm.take().expect("published once");
            let _ = self.published.take().expect("published once").send(confirm);
        }

        /// The broker answers it, with the return of the message with `returned` attached.
        fn ack(&mut self, returned: Option<Option<&str>>) {
            let attached = returned.map(|id| {
                let mut delivery = lapin::message::Delivery::mock(
                    0,
                    "exchange".into(),
                    "key".into(),
                    false,
                    Vec::new(),
                );
                if let Some(id) = id {
                    delivery.properties = delivery.properties.with_message_id(id.into());
                }
                lapin::message::BasicReturnMessage {
                    delivery,
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into(),
                }
            });
            let answer = self.answer.take().expect("answered once");
            let _ = answer.send(Ok(lapin::Confirmation::Ack(attached)));
        }

        async fn outcome(self) -> Result<Outcome, Unanswered> {
            tokio::time::timeout(std::time::Duration::from_secs(5), self.outcome)
                .await
                .expect("decided within 5 s")
                .expect("a reply")
        }
    }

    struct Settler {
        sends: mpsc::UnboundedSender<Waiting<Answered>>,
        given_up: Arc<AtomicBool>,
    }

    impl Settler {
        fn start() -> Self {
            let (sends, incoming) = mpsc::unbounded_channel();
            let given_up = Arc::new(AtomicBool::new(false));
            tokio::spawn(settle(incoming, given_up.clone()));
            Settler { sends, given_up }
        }

        fn track(&self, id: Option<&str>) -> Sent {
            let (reply, outcome) = oneshot::channel();
            let (published, confirm) = oneshot::channel();
            let (answer, answered) = oneshot::channel();
            self.sends
                .send(Waiting {
                    own_id: id.map(str::to_owned),
                    confirm: Confirm::Publishing(confirm),
                    answer: None,
                    ripe: false,
                    returned_here: false,
                    reply,
                })
                .expect("the settler runs");
            Sent {
                published: Some(published),
                confirm: Some(Answered(answered)),
                answer: Some(answer),
                outcome,
            }
        }
    }

    fn outcome_of(result: Result<Outcome, Unanswered>) -> Result<Outcome, String> {
        result.map_err(|unanswered| unanswered.to_string())
    }

    /// lapin hands a return to the next confirm it resolves, which may be an earlier message's:
    /// the returned message is decided only once that confirm was looked at, even when the
    /// return's carrier was still being published when the returned message was answered.
    #[tokio::test]
    async fn a_return_carried_by_another_message_s_confirm_is_put_down_to_its_own() {
        let settler = Settler::start();
        let mut carrier = settler.track(Some("carrier"));
        let mut returned = settler.track(Some("returned"));
        returned.publish();
        // The returned message's own ack comes first, without its return; the carrier's
        // publish is not even done yet.
        returned.ack(None);
        tokio::task::yield_now().await;
        carrier.publish();
        carrier.ack(Some(Some("returned")));
        assert_eq!(outcome_of(carrier.outcome().await), Ok(Outcome::Delivered));
        assert_eq!(outcome_of(returned.outcome().await), Ok(Outcome::Returned));
    }

    /// A later message's confirm can be answered, carrying an earlier one's return, while its
    /// publish is still under way: the earlier message waits for that confirm.
    #[tokio::test]
    async fn a_message_waits_for_the_confirm_of_a_publish_still_under_way() {
        let settler = Settler::start();
        let mut first = settler.track(Some("first"));
        let mut second = settler.track(Some("second"));
        let mut third = settler.track(Some("third"));
        first.publish();
        second.publish();
        second.ack(Some(Some("first")));
        third.ack(Some(Some("second")));
        first.ack(None);
        tokio::task::yield_now().await;
        third.publish();
        assert_eq!(outcome_of(first.outcome().await), Ok(Outcome::Returned));
        assert_eq!(outcome_of(second.outcome().await), Ok(Outcome::Returned));
        assert_eq!(outcome_of(third.outcome().await), Ok(Outcome::Delivered));
    }

    #[tokio::test]
    async fn a_return_without_an_id_is_put_down_to_every_message_without_one() {
        let settler = Settler::start();
        let mut sent: Vec<Sent> = [None, Some("a"), None]
            .into_iter()
            .map(|id| settler.track(id))
            .collect();
        for one in &mut sent {
            one.publish();
        }
        sent[1].ack(Some(None));
        sent[0].ack(None);
        sent[2].ack(None);
        let mut outcomes = Vec::new();
        for one in sent {
            outcomes.push(outcome_of(one.outcome().await));
        }
        assert_eq!(
            outcomes,
            [
                Ok(Outcome::Returned),
                Ok(Outcome::Delivered),
                Ok(Outcome::Returned)
            ]
        );
    }

    /// A publish given up may still have been sent, with a confirm no one follows that a
    /// return can travel with: no message of the channel not decided yet counts as delivered,
    /// nor any later one, and the channel is no longer used.
    #[tokio::test]
    async fn a_publish_given_up_fails_every_message_of_the_channel_not_decided_yet() {
        let settler = Settler::start();
        let mut decided = settler.track(Some("decided"));
        decided.publish();
        decided.ack(None);
        assert_eq!(outcome_of(decided.outcome().await), Ok(Outcome::Delivered));
        let mut waiting = settler.track(Some("waiting"));
        waiting.publish();
        let mut abandoned = settler.track(Some("abandoned"));
        // Its publish future dropped: its confirm never reaches the settler.
        drop(abandoned.published.take());
        waiting.ack(None);
        let later = settler.track(Some("later"));
        for sent in [waiting, later] {
            let outcome = outcome_of(sent.outcome().await);
            assert!(
                outcome.as_ref().is_err_and(|why| why.contains("given up")),
                "{outcome:?}"
            );
        }
        assert!(settler.given_up.load(Ordering::Acquire));
    }
}
