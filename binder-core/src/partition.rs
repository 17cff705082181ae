//! Partitioned destinations: which partition a message goes to, the same on every binder.
//!
//! An output with `producer.partition-count = n` sends each message to one of `n` partitions,
//! chosen from its key as Kafka's Java client chooses (murmur2 of the key bytes, made positive,
//! modulo `n`), so keys land where Java producers put them; messages without a key take the
//! partitions in turn. A consumer with `consumer.partitioned = true` receives only the
//! partition of its `instance-index` (on Kafka: every partition `p` with
//! `p % instance-count == instance-index`), so one key always reaches one instance.

use std::sync::atomic::{AtomicU32, Ordering};

/// The partition of a message with `key` among `count` partitions (`count` at least 1).
///
/// ```
/// use bindery_core::partition::partition_of_key;
/// // Where Kafka's Java client puts the keys "21" and "foobar" among 7 partitions.
/// assert_eq!(partition_of_key(b"21", 7), 1_173_551_340 % 7);
/// assert_eq!(partition_of_key(b"foobar", 7), 1_357_151_166 % 7);
/// ```
pub fn partition_of_key(key: &[u8], count: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % count.max(1)
}

/// The 32-bit murmur2 hash with Kafka's seed, as `org.apache.kafka.common.utils.Utils.murmur2`.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes the length as a Java int; keys longer than that are not sent.
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (index, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * index);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Chooses partitions for one partitioned output: by key, or in turn for keyless messages.
#[derive(Debug)]
pub(crate) struct PartitionSelector {
    count: u32,
    next_keyless: AtomicU32,
}

impl PartitionSelector {
    /// A selector for `count` partitions; `None` when the output is not partitioned.
    pub(crate) fn for_count(count: u32) -> Option<Self> {
        (count > 1).then(|| PartitionSelector {
            count,
            next_keyless: AtomicU32::new(0),
        })
    }

    pub(crate) fn select(&self, key: Option<&[u8]>) -> u32 {
        match key {
            Some(key) => partition_of_key(key, self.count),
            None => self.next_keyless.fetch_add(1, Ordering::Relaxed) % self.count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients() {
        // Apache Kafka's own vectors (UtilsTest.testMurmur2), as signed Java ints.
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key) as i32, *expected, "murmur2 of {key:?}");
        }
    }

    #[test]
    fn keyless_messages_take_the_partitions_in_turn() {
        let selector = PartitionSelector::for_count(3).expect("partitioned");
        let chosen: Vec<u32> = (0..6).map(|_| selector.select(None)).collect();
        assert_eq!(chosen, [0, 1, 2, 0, 1, 2]);
        assert!(PartitionSelector::for_count(1).is_none());
    }

    #[test]
    fn one_key_always_takes_one_partition() {
        let selector = PartitionSelector::for_count(4).expect("partitioned");
        let first = selector.select(Some(b"customer-7"));
        assert!(first < 4);
        for _ in 0..10 {
            assert_eq!(selector.select(Some(b"customer-7")), first);
        }
    }
}
