//! Message ids: fresh ones for new messages, derived ones for a handler's outputs, so that the
//! outputs of a retried or redelivered input carry the same ids and consumers can de-duplicate.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use uuid::Uuid;

/// A message id as it travels in the `x-message-id` header: shared bytes, shown as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MessageId(Bytes);

impl MessageId {
    /// The id a message arrived with.
    pub(crate) fn from_header(value: &Bytes) -> Self {
        MessageId(value.clone())
    }

    /// The header value.
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

/// Ids made on one thread are cut from one shared block of this many ids (a block is freed
/// once its last id is: a message kept for long, such as an unread dead letter, keeps its
/// block of 2.3 KB).
const IDS_PER_BLOCK: usize = 64;

thread_local! {
    static ID_BLOCK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The id as header bytes, cut from a block shared with the ids made before it on this
/// thread: an id costs no allocation of its own (ids are freed wherever their messages end,
/// often on another thread, where a small allocation each is what costs most).
fn uuid_bytes(uuid: Uuid) -> Bytes {
    const LENGTH: usize = uuid::fmt::Hyphenated::LENGTH;
    let mut text = [0u8; LENGTH];
    uuid.hyphenated().encode_lower(&mut text);
    let cut = ID_BLOCK.try_with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() - block.len() < LENGTH {
            *block = BytesMut::with_capacity(LENGTH * IDS_PER_BLOCK);
        }
        block.extend_from_slice(&text);
        block.split().freeze()
    });
    // A thread's locals are gone while it exits: an id made then has an allocation of its own.
    cut.unwrap_or_else(|_| Bytes::from_owner(text))
}

/// A new unique id: a random prefix drawn once per process and a counter, so no message pays
/// for a draw from the operating system.
pub(crate) fn new_message_id() -> MessageId {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    MessageId(uuid_bytes(Uuid::from_u64_pair(prefix, count)))
}

/// The id of output number `index` of the input `input_id`: the same on every attempt and
/// every redelivery, whatever process handles it.
pub(crate) fn output_id(input_id: &MessageId, index: usize) -> MessageId {
    let high = fnv1a(0xcbf2_9ce4_8422_2325, &input_id.0, index);
    let low = fnv1a(0x6c62_272e_07bb_0142, &input_id.0, index);
    MessageId(uuid_bytes(Uuid::from_u64_pair(high, low)))
}

/// FNV-1a over `bytes` then `index`, from `seed`: stable across Rust versions and platforms.
fn fnv1a(seed: u64, bytes: &[u8], index: usize) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .copied()
        .chain((index as u64).to_le_bytes())
        .fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_ids_are_stable_and_distinct() {
        let id = |text: &'static str| MessageId::from_header(&Bytes::from_static(text.as_bytes()));
        assert_eq!(output_id(&id("order-1"), 0), output_id(&id("order-1"), 0));
        assert_ne!(output_id(&id("order-1"), 0), output_id(&id("order-1"), 1));
        assert_ne!(output_id(&id("order-1"), 0), output_id(&id("order-2"), 0));
        assert_ne!(new_message_id(), new_message_id());
    }

    #[test]
    fn output_ids_are_the_same_as_ever() {
        // Consumers de-duplicate by these ids across versions: the derivation must not change.
        let input = MessageId::from_header(&Bytes::from_static(b"order-1"));
        assert_eq!(
            output_id(&input, 0).to_string(),
            "172933e9-3b8e-780d-5900-13c2bfd1434c"
        );
    }
}
