//! Message ids: fresh ones for new messages, derived ones for a handler's outputs, so that the
//! outputs of a retried or redelivered input carry the same ids and consumers can de-duplicate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use uuid::Uuid;

/// A new unique id: a random prefix drawn once per process and a counter, so no message pays
/// for a draw from the operating system.
pub(crate) fn new_message_id() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    Uuid::from_u64_pair(prefix, count).hyphenated().to_string()
}

/// The id of output number `index` of the input `input_id`: the same on every attempt and
/// every redelivery, whatever process handles it.
pub(crate) fn output_id(input_id: &str, index: usize) -> String {
    let high = fnv1a(0xcbf2_9ce4_8422_2325, input_id.as_bytes(), index);
    let low = fnv1a(0x6c62_272e_07bb_0142, input_id.as_bytes(), index);
    Uuid::from_u64_pair(high, low).hyphenated().to_string()
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
        assert_eq!(output_id("order-1", 0), output_id("order-1", 0));
        assert_ne!(output_id("order-1", 0), output_id("order-1", 1));
        assert_ne!(output_id("order-1", 0), output_id("order-2", 0));
        assert_ne!(new_message_id(), new_message_id());
    }
}
