//! The window: how many received messages a binding holds at once, from receipt until they
//! are settled with the broker. It bounds memory, and it is what lets confirmations be awaited
//! in the background while the next messages are handled.

/// Messages received and not yet settled, against `max-in-flight`.
#[derive(Debug)]
pub(crate) struct Window {
    capacity: usize,
    open: usize,
}

impl Window {
    pub(crate) fn new(capacity: u32) -> Self {
        Window {
            capacity: capacity.max(1) as usize,
            open: 0,
        }
    }

    /// Whether another message may be received now.
    pub(crate) fn has_room(&self) -> bool {
        self.open < self.capacity
    }

    /// A message was received.
    pub(crate) fn open(&mut self) {
        self.open += 1;
    }

    /// `count` messages were settled (acknowledged or handed back).
    pub(crate) fn close(&mut self, count: usize) {
        self.open = self.open.saturating_sub(count);
    }
}
