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
/// block of under 1 KB). A block stays under 1 KB on purpose: glibc's allocator consolidates
/// all of an arena's fast-bin chunks before each allocation of 1 KB or more, which, with
/// messages freed on other threads, cost more than the ids themselves.
const IDS_PER_BLOCK: usize = 27;

thread_local! {
    static ID_BLOCK: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The UUID of the 128 bits `high` then `low` as header bytes, cut from a block shared with
/// the ids made before it on this
/// thread: an id costs no allocation of its own (ids are freed wherever their messages end,
/// often on another thread, where a small allocation each is what costs most).
fn uuid_bytes(high: u64, low: u64) -> Bytes {
    let text = hyphenated(high, low);
    let cut = ID_BLOCK.try_with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() - block.len() < UUID_LENGTH {
            *block = BytesMut::with_capacity(UUID_LENGTH * IDS_PER_BLOCK);
        }
        block.extend_from_slice(&text);
        block.split().freeze()
    });
    // A thread's locals are gone while it exits: an id made then has an allocation of its own.
    cut.unwrap_or_else(|_| Bytes::from_owner(text))
}

/// A UUID's text: `8-4-4-4-12` lowercase hex digits.
const UUID_LENGTH: usize = 36;

const _: () = assert!(
    UUID_LENGTH * IDS_PER_BLOCK < 1000,
    "a block of ids stays under 1 KB"
);

/// The UUID text of the 128 bits `high` then `low`, as [`Uuid`]'s hyphenated lowercase form
/// writes it: ids are made for every message, so eight digits are made at once.
fn hyphenated(high: u64, low: u64) -> [u8; UUID_LENGTH] {
    let mut text = [b'-'; UUID_LENGTH];
    let [a, b, c] = [(high >> 32) as u32, high as u32, (low >> 32) as u32];
    text[0..8].copy_from_slice(&hex_digits(a));
    let b = hex_digits(b);
    text[9..13].copy_from_slice(&b[..4]);
    text[14..18].copy_from_slice(&b[4..]);
    let c = hex_digits(c);
    text[19..23].copy_from_slice(&c[..4]);
    text[24..28].copy_from_slice(&c[4..]);
    text[28..36].copy_from_slice(&hex_digits(low as u32));
    text
}

/// The eight lowercase hex digits of `value`, computed for all eight at once: each nibble is
/// spread to a byte of its own, then turned into its digit.
fn hex_digits(value: u32) -> [u8; 8] {
    let mut spread = u64::from(value);
    spread = ((spread & 0xffff_0000) << 16) | (spread & 0xffff);
    spread = ((spread & 0x0000_ff00_0000_ff00) << 8) | (spread & 0x0000_00ff_0000_00ff);
    spread = ((spread & 0x00f0_00f0_00f0_00f0) << 4) | (spread & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more: it becomes a letter.
    let letters = ((spread + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    let digits = spread + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10);
    digits.to_be_bytes()
}

/// A new unique id: a random prefix drawn once per process and a counter, so no message pays
/// for a draw from the operating system. A thread takes the counter's values a block at a
/// time and writes the block's ids out at once; each id is a slice of it.
pub(crate) fn new_message_id() -> MessageId {
    let cut = NEW_IDS.try_with(|ids| {
        let mut ids = ids.borrow_mut();
        if ids.is_empty() {
            *ids = fresh_ids(IDS_PER_BLOCK);
        }
        ids.split_to(UUID_LENGTH)
    });
    // A thread's locals are gone while it exits: an id made then is a block of its own.
    MessageId(cut.unwrap_or_else(|_| fresh_ids(1)))
}

thread_local! {
    /// The ids of this thread's block not handed out yet.
    static NEW_IDS: RefCell<Bytes> = const { RefCell::new(Bytes::new()) };
}

/// `count` new ids, written one after the other.
fn fresh_ids(count: usize) -> Bytes {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    let first = COUNTER.fetch_add(count as u64, Ordering::Relaxed);
    let mut block = Vec::with_capacity(UUID_LENGTH * count);
    for n in first..first + count as u64 {
        block.extend_from_slice(&hyphenated(prefix, n));
    }
    Bytes::from(block)
}

/// The id of output number `index` of the input `input_id`: the same on every attempt and
/// every redelivery, whatever process handles it.
pub(crate) fn output_id(input_id: &MessageId, index: usize) -> MessageId {
    let (high, low) = fnv1a_pair(&input_id.0, index);
    MessageId(uuid_bytes(high, low))
}

/// FNV-1a over `bytes` then `index`, from two seeds at once: stable across Rust versions and
/// platforms.
fn fnv1a_pair(bytes: &[u8], index: usize) -> (u64, u64) {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut high: u64 = 0xcbf2_9ce4_8422_2325;
    let mut low: u64 = 0x6c62_272e_07bb_0142;
    let mut add = |byte: u8| {
        high = (high ^ u64::from(byte)).wrapping_mul(PRIME);
        low = (low ^ u64::from(byte)).wrapping_mul(PRIME);
    };
    for byte in bytes {
        add(*byte);
    }
    for byte in (index as u64).to_le_bytes() {
        add(byte);
    }
    (high, low)
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
    fn new_ids_are_uuids_and_distinct_across_blocks_and_threads() {
        let mine: Vec<MessageId> = (0..IDS_PER_BLOCK * 3 + 5)
            .map(|_| new_message_id())
            .collect();
        let theirs = std::thread::spawn(|| {
            (0..IDS_PER_BLOCK + 1)
                .map(|_| new_message_id())
                .collect::<Vec<_>>()
        })
        .join()
        .expect("a thread making ids");
        let mut seen = std::collections::HashSet::new();
        for id in mine.iter().chain(&theirs) {
            let text = id.to_string();
            assert_eq!(text.len(), UUID_LENGTH, "{text}");
            assert!(Uuid::parse_str(&text).is_ok(), "{text}");
            assert!(seen.insert(text.clone()), "{text} was made twice");
        }
    }

    #[test]
    fn ids_are_written_as_uuid_writes_them() {
        let cases = [
            (0, 0),
            (u64::MAX, u64::MAX),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
            (0x172933e93b8e780d, 0x590013c2bfd1434c),
            (0x0a1b_2c3d_4e5f_6a7b, 0x8c9d_aebf_c0d1_e2f3),
            (0x9999_aaaa_ffff_0000, 0xa0b0_c0d0_e0f0_0909),
        ];
        let more = (0..64u64).map(|n| (n.wrapping_mul(0x9e37_79b9_7f4a_7c15), !n << (n % 61)));
        for (high, low) in cases.into_iter().chain(more) {
            let expected = Uuid::from_u64_pair(high, low).hyphenated().to_string();
            assert_eq!(&hyphenated(high, low)[..], expected.as_bytes());
            assert_eq!(&uuid_bytes(high, low)[..], expected.as_bytes());
        }
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
