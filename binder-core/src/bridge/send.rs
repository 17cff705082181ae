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

/// Hands `messages` to `producer` in order, as far as it takes them without waiting (see
/// [`Producer::try_enqueue`]): the sends made, and the messages left for [`enqueue_all`], from
/// the first one it could not take at once. A producer that never takes messages at once costs
/// nothing here: its messages come back as they were.
pub(crate) fn enqueue_at_once(
    producer: &Arc<dyn Producer>,
    destination: &str,
    messages: Vec<Message>,
) -> (Sendings, Vec<Message>) {
    let mut sendings = Sendings::new();
    let mut messages = messages.into_iter();
    // Each is asked by reference, and moved only once taken.
    while let Some(confirmation) = messages
        .as_slice()
        .first()
        .and_then(|next| try_enqueue(producer, destination, next))
    {
        if let Some(message) = messages.next() {
            sendings.push(Sending {
                message,
                confirmation,
            });
        }
    }
    // The rest, if any, are collected in place and keep the batch's allocation.
    let rest = match messages.as_slice().is_empty() {
        true => Vec::new(),
        false => messages.collect(),
    };
    (sendings, rest)
}

/// [`Producer::try_enqueue`], where a panic refuses the message for good.
fn try_enqueue(
    producer: &Arc<dyn Producer>,
    destination: &str,
    message: &Message,
) -> Option<Result<Confirmation, Error>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| producer.try_enqueue(message)))
        .unwrap_or_else(|panic| Some(Err(panicked(destination, &*panic))))
}

/// Hands `messages` to `producer` one after the other, after the `sendings` already made, so
/// they are sent in this order.
/// A producer that panics refuses the message for good rather than taking the binding down.
pub(crate) async fn enqueue_all(
    producer: &Arc<dyn Producer>,
    destination: &str,
    mut sendings: Sendings,
    messages: Vec<Message>,
) -> Sendings {
    sendings.reserve(messages.len());
    for message in messages {
        let confirmation = match AssertUnwindSafe(producer.enqueue(&message))
            .catch_unwind()
            .await
        {
            Ok(confirmation) => confirmation,
            Err(panic) => Err(panicked(destination, &*panic)),
        };
        sendings.push(Sending {
            message,
            confirmation,
        });
    }
    sendings
}

/// The permanent refusal a panicking producer amounts to.
fn panicked(destination: &str, panic: &(dyn std::any::Any + Send)) -> Error {
    Error::refused(
        destination,
        format!("sending to `{destination}` panicked: {}", panic_text(panic)),
    )
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

        fn try_enqueue(&self, message: &Message) -> Option<Result<Confirmation, Error>> {
            let n = {
                let mut tried = self.tried.lock().unwrap();
                *tried += 1;
                *tried - 1
            };
            match self.script.get(n).copied() {
                Some("at once") => {
                    self.record(message, "at once");
                    Some(Ok(Confirmation::confirmed()))
                }
                Some("panic") => panic!("the client broke"),
                _ => None,
            }
        }
    }

    fn messages(texts: &[&'static str]) -> Vec<Message> {
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
        let order: Vec<_> = sendings.iter().map(|s| text(&s.message)).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert!(all_confirmed(&sendings));
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
    async fn a_producer_that_never_takes_messages_at_once_gets_them_all_back() {
        let scripted = Scripted::new(&[]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b"]));
        assert!(sendings.is_empty());
        assert_eq!(rest.iter().map(text).collect::<Vec<_>>(), ["a", "b"]);
        assert!(
            scripted.sent().is_empty(),
            "nothing may be sent by a `None`"
        );
    }

    #[tokio::test]
    async fn a_panic_taking_a_message_at_once_refuses_it_for_good_and_the_next_goes_on() {
        let scripted = Scripted::new(&["panic", "at once"]);
        let producer: Arc<dyn Producer> = scripted.clone();
        let (sendings, rest) = enqueue_at_once(&producer, "out", messages(&["a", "b"]));
        assert!(rest.is_empty());
        let refused = match &sendings[0].confirmation {
            Err(error) => error,
            Ok(_) => panic!("a panicking producer must refuse the message"),
        };
        assert!(refused.is_permanent(), "{refused}");
        assert!(
            refused.to_string().contains("the client broke"),
            "{refused}"
        );
        assert_eq!(text(&sendings[1].message), "b");
        assert!(matches!(&sendings[1].confirmation, Ok(c) if c.is_confirmed()));
        assert_eq!(scripted.sent(), [("b".to_owned(), "at once")]);
    }
}
