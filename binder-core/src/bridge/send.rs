//! Sending: messages are handed to their producer in order and confirmed in the background.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use super::ids::MessageId;
use super::Lineage;
use crate::binder::{Confirmation, Producer, TryEnqueue};
use crate::handler::{give_back, panic_text, Batch};
use crate::message::header;
use crate::{Error, Message};

/// One message handed to a producer, with the broker's answer still to come (or the error it
/// failed with), kept to be sent again should the answer be an error. `None` when the message
/// went with a producer that panicked: such a send is refused for good, never sent again.
#[derive(Debug)]
pub(crate) struct Sending {
    pub(crate) message: Option<Message>,
    confirmation: Result<Confirmation, Error>,
}

/// The sends of one handler call: how many the broker confirmed at once, and the others, kept
/// until their answers come. Small, as it is moved along with every message: a producer that
/// confirms at once leaves the list empty, without an allocation.
#[derive(Debug, Default)]
pub(crate) struct Sendings {
    confirmed: usize,
    answers: Vec<Sending>,
}

impl Sendings {
    /// How many messages were handed over.
    pub(crate) fn len(&self) -> usize {
        self.confirmed + self.answers.len()
    }

    /// Offers `message` to `producer` ([`Producer::try_enqueue`]) and records its answer; the
    /// message back when it was not taken. A panic refuses the message for good: it went with
    /// the panic, and its send is recorded as refused, never to be sent again.
    #[inline]
    fn offer(
        &mut self,
        producer: &Arc<dyn Producer>,
        destination: &str,
        message: Message,
    ) -> Option<Message> {
        // The answer is recorded where it is made: it is large, and most often says only
        // "confirmed".
        let recorded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.record(producer.try_enqueue(message))
        }));
        recorded.unwrap_or_else(|panic| {
            self.push(None, Err(panicked(destination, &*panic)));
            None
        })
    }

    #[inline]
    fn record(&mut self, answer: TryEnqueue) -> Option<Message> {
        match answer {
            TryEnqueue::Confirmed => self.confirmed += 1,
            TryEnqueue::Pending(confirmation, message) => {
                self.push(Some(message), Ok(confirmation))
            }
            TryEnqueue::Failed(message, error) => self.push(Some(message), Err(error)),
            TryEnqueue::NotNow(message) => return Some(message),
        }
        None
    }

    fn push(&mut self, message: Option<Message>, confirmation: Result<Confirmation, Error>) {
        match &confirmation {
            // A producer that confirmed at once leaves nothing to wait for, or to send again.
            Ok(confirmation) if confirmation.is_confirmed() => self.confirmed += 1,
            _ => self.answers.push(Sending {
                message,
                confirmation,
            }),
        }
    }

    /// Whether every send was confirmed already, so there is nothing to wait for.
    pub(crate) fn all_confirmed(&self) -> bool {
        self.answers.is_empty()
    }
}

/// Hands `messages` to `producer` in order, as far as it takes them without waiting (see
/// [`Producer::try_enqueue`]): the sends made, and the messages left for [`enqueue_all`], from
/// the first one it could not take at once. A producer that never takes messages at once costs
/// nothing here: its messages come back as they were.
pub(crate) fn enqueue_at_once(
    producer: &Arc<dyn Producer>,
    destination: &str,
    mut messages: Batch,
) -> (Sendings, Batch) {
    let mut sendings = Sendings::default();
    // Most calls produce one message: taken from the end, and put back when not taken, so a
    // producer that takes nothing at once gets the batch back in the allocation it came in.
    if messages.len() == 1 {
        let Some(only) = messages.pop() else {
            return (sendings, messages);
        };
        if let Some(only) = sendings.offer(producer, destination, only) {
            messages.push(only);
            return (sendings, messages);
        }
        give_back(messages);
        return (sendings, Batch::new());
    }
    if messages.is_empty() {
        return (sendings, messages);
    }
    let first = messages.remove(0);
    if let Some(first) = sendings.offer(producer, destination, first) {
        messages.insert(0, first);
        return (sendings, messages);
    }
    let mut rest = messages.drain(..);
    while let Some(message) = rest.next() {
        if let Some(message) = sendings.offer(producer, destination, message) {
            let left = std::iter::once(message).chain(rest).collect();
            give_back(messages);
            return (sendings, left);
        }
    }
    drop(rest);
    give_back(messages);
    (sendings, Batch::new())
}

/// Hands `messages` to `producer` one after the other, after the `sendings` already made, so
/// they are sent in this order.
/// A producer that panics refuses the message for good rather than taking the binding down.
pub(crate) async fn enqueue_all(
    producer: &Arc<dyn Producer>,
    destination: &str,
    mut sendings: Sendings,
    mut messages: Batch,
) -> Sendings {
    for message in messages.drain(..) {
        let confirmation = match AssertUnwindSafe(producer.enqueue(&message))
            .catch_unwind()
            .await
        {
            Ok(confirmation) => confirmation,
            Err(panic) => Err(panicked(destination, &*panic)),
        };
        sendings.push(Some(message), confirmation);
    }
    give_back(messages);
    sendings
}

/// The permanent refusal a panicking producer amounts to.
fn panicked(destination: &str, panic: &(dyn std::any::Any + Send)) -> Error {
    Error::refused(
        destination,
        format!("sending to `{destination}` panicked: {}", panic_text(panic)),
    )
}

/// Awaits every confirmation; returns the messages that were not confirmed, with why (`None`
/// for a message a panicking producer took with it, whose refusal is permanent).
pub(crate) async fn confirm_all(sendings: Sendings) -> Vec<(Option<Message>, Error)> {
    let mut answers = sendings.answers;
    // Most handler calls send one message: its answer is awaited as it is, with nothing to join.
    if answers.len() == 1 {
        let Some(sending) = answers.pop() else {
            return Vec::new();
        };
        return match sending.answer().await {
            (_, Ok(())) => Vec::new(),
            (message, Err(error)) => vec![(message, error)],
        };
    }
    futures::future::join_all(answers.into_iter().map(Sending::answer))
        .await
        .into_iter()
        .filter_map(|(message, answer)| answer.err().map(|error| (message, error)))
        .collect()
}

impl Sending {
    /// The message, and the broker's answer once it came.
    async fn answer(self) -> (Option<Message>, Result<(), Error>) {
        let answer = match self.confirmation {
            Ok(confirmation) => confirmation.await,
            Err(error) => Err(error),
        };
        (self.message, answer)
    }
}

/// Gives a message its id (unless the handler set one) and what its input hands on.
pub(crate) fn stamp(message: &mut Message, id: impl FnOnce() -> MessageId, lineage: &Lineage) {
    let headers = message.headers_mut();
    if !headers.contains(header::MESSAGE_ID) {
        headers.set_static(header::MESSAGE_ID, id().bytes().clone());
    }
    lineage.hand_on(headers);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;

    /// Answers `try_enqueue` for the n-th message as `script[n]` says: taken at once, not now,
    /// or a panic; records how each message was sent.
    #[derive(Debug)]
    struct Scripted {
        script: Vec<&'static str>,
        tried: Mutex<usize>,
        sent: Mutex<Vec<(String, &'static str)>>,
    }

    impl Scripted {
        fn new(script: &[&'static str]) -> Arc<Self> {
            Arc::new(Scripted {
                script: script.to_vec(),
                tried: Mutex::new(0),
                sent: Mutex::new(Vec::new()),
            })
        }

        fn record(&self, message: &Message, how: &'static str) {
            self.sent.lock().unwrap().push((text(message), how));
        }

        fn sent(&self) -> Vec<(String, &'static str)> {
            self.sent.lock().unwrap().clone()
        }
    }

    fn text(message: &Message) -> String {
        String::from_utf8_lossy(message.payload()).into_owned()
    }

    #[async_trait]
    impl Producer for Scripted {
        async fn enqueue(&self, message: &Message) -> Result<Confirmation, Error> {
            self.record(message, "enqueue");
            Ok(Confirmation::confirmed())
        }

        fn try_enqueue(&self, message: Message) -> TryEnqueue {
            let n = {
                let mut tried = self.tried.lock().unwrap();
                *tried += 1;
                *tried - 1
            };
            match self.script.get(n).copied() {
                Some("at once") => {
                    self.record(&message, "at once");
                    TryEnqueue::Confirmed
                }
                Some("pending") => {
                    self.record(&message, "pending");
                    let answer = Confirmation::pending(async { Err(Error::ShuttingDown) });
                    TryEnqueue::Pending(answer, message)
                }
                Some("failed") => {
                    self.record(&message, "failed");
                    let error = Error::binder("scripted", "the broker is away");
                    TryEnqueue::Failed(message, error)
                }
                Some("panic") => panic!("the client broke"),
                _ => TryEnqueue::NotNow(message),
            }
        }
    }

    fn messages(texts: &[&'static str]) -> Batch {
        texts
            .iter()
            .map(|text| Message::new(Bytes::from_static(text.as_bytes())))
            .collect()
    }

    #[tokio::test]
    async fn from_the_first_message_not_taken_at_once_everything_is_enqueued_in_order() {
        // The producer would take "c" at once again: it is enqueued after "b", never before.
        let scripted = Scripted::new(&["at once", "not now", "at once", "at once"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b", "c", "d"]));
        assert_eq!((sendings.len(), rest.len()), (1, 3));
        let sendings = enqueue_all(&producer, "out", sendings, rest).await;
        assert_eq!(sendings.len(), 4);
        assert!(sendings.all_confirmed());
        let expected = [
            ("a", "at once"),
            ("b", "enqueue"),
            ("c", "enqueue"),
            ("d", "enqueue"),
        ]
        .map(|(text, how)| (text.to_owned(), how));
        assert_eq!(scripted.sent(), expected);
    }

    #[tokio::test]
    async fn confirm_all_returns_each_unconfirmed_message_with_its_error_in_order() {
        // One answer awaited alone, and several joined: the same result either way.
        for (script, texts, failed) in [
            (&["pending"][..], &["a"][..], &["a"][..]),
            (&["failed"], &["a"], &["a"]),
            (
                &["pending", "at once", "failed", "pending"],
                &["a", "b", "c", "d"],
                &["a", "c", "d"],
            ),
        ] {
            let producer: Arc<dyn Producer> = Scripted::new(script);
            let (sendings, rest) = enqueue_at_once(&producer, "out", messages(texts));
            assert!(rest.is_empty());
            let unconfirmed = confirm_all(sendings).await;
            let texts: Vec<String> = unconfirmed
                .iter()
                .map(|(message, _)| text(message.as_ref().expect("kept to send again")))
                .collect();
            assert_eq!(texts, failed, "{script:?}");
            for (_, error) in &unconfirmed {
                assert!(!error.is_permanent(), "{error}");
            }
        }
    }

    #[tokio::test]
    async fn a_producer_that_never_takes_messages_at_once_gets_them_all_back() {
        let scripted = Scripted::new(&[]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b"]));
        assert_eq!(sendings.len(), 0);
        assert_eq!(rest.iter().map(text).collect::<Vec<_>>(), ["a", "b"]);
        assert!(
            scripted.sent().is_empty(),
            "nothing may be sent by a `NotNow`"
        );
    }

    #[tokio::test]
    async fn a_panic_taking_a_message_at_once_refuses_it_for_good_and_the_next_goes_on() {
        let scripted = Scripted::new(&["panic", "at once"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b"]));
        assert!(rest.is_empty());
        assert_eq!(sendings.len(), 2);
        assert_eq!(sendings.answers.len(), 1, "only the refusal is kept");
        assert!(
            sendings.answers[0].message.is_none(),
            "the message went with the panic: nothing may stand in for it"
        );
        let failed = confirm_all(sendings).await;
        let (lost, refused) = &failed[0];
        assert!(lost.is_none());
        assert!(refused.is_permanent(), "{refused}");
        assert!(
            refused.to_string().contains("the client broke"),
            "{refused}"
        );
        assert_eq!(scripted.sent(), [("b".to_owned(), "at once")]);
    }

    #[tokio::test]
    async fn a_single_message_not_taken_at_once_comes_back_in_its_batch() {
        let scripted = Scripted::new(&[]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let batch = messages(&["only"]);
        let allocation = batch.as_ptr();
        let (sendings, rest) = enqueue_at_once(&producer, "out", batch);
        assert_eq!(sendings.len(), 0);
        assert_eq!(rest.iter().map(text).collect::<Vec<_>>(), ["only"]);
        assert_eq!(rest.as_ptr(), allocation, "the batch keeps its allocation");
        let sendings = enqueue_all(&producer, "out", sendings, rest).await;
        assert!(sendings.all_confirmed());
        assert_eq!(scripted.sent(), [("only".to_owned(), "enqueue")]);
    }

    #[tokio::test]
    async fn a_single_message_taken_at_once_is_confirmed_and_not_kept() {
        let scripted = Scripted::new(&["at once"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["only"]));
        assert!(rest.is_empty());
        assert_eq!((sendings.len(), sendings.answers.len()), (1, 0));
        assert!(sendings.all_confirmed());
    }

    #[tokio::test]
    async fn a_single_message_the_producer_failed_is_kept_to_be_sent_again() {
        let scripted = Scripted::new(&["failed"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["only"]));
        assert!(rest.is_empty());
        assert!(!sendings.all_confirmed());
        let failed = confirm_all(sendings).await;
        assert_eq!(failed.len(), 1);
        let (message, error) = &failed[0];
        assert_eq!(message.as_ref().map(text).as_deref(), Some("only"));
        assert!(!error.is_permanent(), "{error}");
    }

    #[tokio::test]
    async fn a_single_message_whose_producer_panics_is_refused_for_good() {
        let scripted = Scripted::new(&["panic"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["only"]));
        assert!(rest.is_empty());
        let failed = confirm_all(sendings).await;
        assert_eq!(failed.len(), 1);
        assert!(failed[0].0.is_none());
        assert!(failed[0].1.is_permanent());
    }

    #[tokio::test]
    async fn a_message_taken_with_its_answer_to_come_is_kept_until_the_answer_comes() {
        let scripted = Scripted::new(&["pending", "at once"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b"]));
        assert!(rest.is_empty());
        assert!(!sendings.all_confirmed());
        assert_eq!(sendings.len(), 2);
        let kept: Vec<_> = sendings
            .answers
            .iter()
            .filter_map(|s| s.message.as_ref().map(text))
            .collect();
        assert_eq!(
            kept,
            ["a"],
            "a pending send keeps its message to send again"
        );
        let failed = confirm_all(sendings).await;
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0.as_ref().map(text).as_deref(), Some("a"));
    }
}
