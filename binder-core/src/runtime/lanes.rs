//! Lanes: messages with the same key are handled one at a time, in the order received.
//!
//! A key is held from the moment its message is admitted until its handler has finished
//! (succeeded and handed its outputs over, or failed for good); while a message waits in retry
//! back-off its key stays held, so only later messages with that key wait, never other keys.
//! Messages without a key hold nothing and wait for nothing.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// The keys held now, and the messages waiting behind each.
#[derive(Debug)]
pub(crate) struct Lanes<T> {
    held: HashMap<Bytes, VecDeque<T>>,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            held: HashMap::new(),
        }
    }
}

impl<T> Lanes<T> {
    /// Admits `item`: back at once when its key is free (the key is now held for it), or
    /// `None` when it waits behind an earlier message with the same key.
    pub(crate) fn admit(&mut self, key: Option<&Bytes>, item: T) -> Option<T> {
        let Some(key) = key else {
            return Some(item);
        };
        match self.held.entry(key.clone()) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push_back(item);
                None
            }
            Entry::Vacant(free) => {
                free.insert(VecDeque::new());
                Some(item)
            }
        }
    }

    /// The message holding `key` is done with its handler: the next one with that key, which
    /// now holds it, or `None` (and the key is free).
    pub(crate) fn release(&mut self, key: Option<&Bytes>) -> Option<T> {
        let key = key?;
        let waiting = self.held.get_mut(key)?;
        let next = waiting.pop_front();
        if next.is_none() {
            self.held.remove(key);
        }
        next
    }

    /// Every message still waiting for its key, freeing all keys (at shutdown).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.held.drain().flat_map(|(_, waiting)| waiting).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_waits_and_others_pass() {
        let mut lanes = Lanes::default();
        let (a, b) = (Bytes::from("a"), Bytes::from("b"));
        assert_eq!(lanes.admit(Some(&a), 1), Some(1));
        assert_eq!(lanes.admit(Some(&a), 2), None, "a is held by 1");
        assert_eq!(lanes.admit(Some(&b), 3), Some(3), "b is free");
        assert_eq!(lanes.admit(None, 4), Some(4), "no key, no wait");
        assert_eq!(lanes.admit(Some(&a), 5), None);
        assert_eq!(lanes.release(Some(&a)), Some(2), "2 comes next, in order");
        assert_eq!(lanes.release(Some(&a)), Some(5));
        assert_eq!(lanes.release(Some(&a)), None);
        assert_eq!(lanes.admit(Some(&a), 6), Some(6), "a is free again");
        assert_eq!(lanes.admit(Some(&a), 7), None);
        assert_eq!(lanes.drain(), vec![7]);
    }
}
