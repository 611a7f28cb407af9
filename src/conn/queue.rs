//! A connection's output: the bytes waiting for the socket, and the limits
//! on how many may wait before reading stops.

use std::collections::VecDeque;

/// Bytes accepted for sending that the socket has not taken yet, in order.
///
/// A ring buffer: bytes go in at the back and leave from the front without
/// ever being moved, so a queue that stays busy (a client that reads slower
/// than it is answered) costs one copy per byte. Allocated the first time a
/// send is partial and reused after that; a connection whose sends always go
/// through at once never allocates.
#[derive(Debug, Default)]
pub struct WriteQueue {
    bytes: VecDeque<u8>,
}

impl WriteQueue {
    /// True if nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Number of bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes to send next, in order: at most two runs, where the ring
    /// wraps.
    pub fn fronts(&self) -> [&[u8]; 2] {
        let (first, second) = self.bytes.as_slices();
        [first, second]
    }

    /// Appends `data` behind everything already waiting.
    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// Drops the first `n` bytes, which the socket took.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.bytes.len());
        self.bytes.drain(..n);
    }

    /// Drops what waits and frees the memory; returns how many bytes were
    /// dropped.
    pub fn discard(&mut self) -> usize {
        let dropped = self.len();
        self.bytes = VecDeque::new();
        dropped
    }
}

/// Per-connection output limits: reading a connection stops while more than
/// `high` bytes wait in its queue and resumes once at most `low` do, so a
/// client that sends without reading the replies is slowed by TCP itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Stop reading above this many queued bytes.
    pub high: usize,
    /// Read again at or below this many.
    pub low: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_queue_keeps_order_across_partial_consumes() {
        let mut queue = WriteQueue::default();
        queue.push(b"hello ");
        queue.consume(3);
        queue.push(b"world");
        assert_eq!(queue.fronts().concat(), b"lo world");
        queue.consume(queue.len());
        assert!(queue.is_empty());
        queue.push(b"again");
        assert_eq!(queue.fronts().concat(), b"again");
    }

    #[test]
    fn write_queue_reuses_its_allocation_when_cycling() {
        let mut queue = WriteQueue::default();
        queue.push(&[1; 1000]);
        let capacity = queue.bytes.capacity();
        for _ in 0..100 {
            queue.consume(600);
            queue.push(&[2; 600]);
        }
        assert_eq!(queue.len(), 1000);
        assert_eq!(queue.bytes.capacity(), capacity);
    }

    #[test]
    fn write_queue_keeps_order_where_the_ring_wraps() {
        let mut queue = WriteQueue::default();
        let mut expected: VecDeque<u8> = VecDeque::new();
        let mut next = 0u8;
        for round in 0..200usize {
            let chunk: Vec<u8> = (0..(round % 37) + 1)
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            queue.push(&chunk);
            expected.extend(&chunk);
            let taken = (round * 7) % (queue.len() + 1);
            queue.consume(taken);
            expected.drain(..taken);
            let [first, second] = queue.fronts();
            assert_eq!([first, second].concat(), Vec::from(expected.clone()));
        }
    }
}
