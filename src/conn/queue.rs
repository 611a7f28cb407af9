//! A connection's output: the bytes waiting for the socket, and the limits
//! on how many may wait before reading stops (and the application is told
//! that writing is paused).

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
/// The same two crossings are what the application hears as
/// `on_writing_paused` and `on_writing_resumed`.
///
/// Only this queue counts: bytes the application has sent that still wait
/// in the command ring are not in it, so a burst of sends to a client that
/// reads as fast as they are written crosses nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Stop reading above this many queued bytes.
    pub high: usize,
    /// Read again at or below this many.
    pub low: usize,
}

/// A crossing of the [`Watermarks`] by a connection's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// The queue rose above `high`: reading stops, writing is paused.
    Rose,
    /// The queue, above `high` before, fell to `low` or below: reading may go
    /// on, writing is resumed.
    Fell,
}

impl Watermarks {
    /// The crossing `queued` bytes make for a queue that is `above` (it rose
    /// past `high` and has not fallen to `low` since), if they make one. In
    /// between the two marks nothing changes, so the crossings alternate.
    pub fn crossing(self, above: bool, queued: usize) -> Option<Crossing> {
        if !above && queued > self.high {
            Some(Crossing::Rose)
        } else if above && queued <= self.low {
            Some(Crossing::Fell)
        } else {
            None
        }
    }
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
    fn crossings_alternate_and_nothing_changes_between_the_marks() {
        let marks = Watermarks { high: 100, low: 10 };
        assert_eq!(marks.crossing(false, 100), None, "at high is not above");
        assert_eq!(marks.crossing(false, 101), Some(Crossing::Rose));
        assert_eq!(marks.crossing(true, 500), None, "already above");
        assert_eq!(marks.crossing(true, 50), None, "between the marks");
        assert_eq!(marks.crossing(true, 11), None);
        assert_eq!(marks.crossing(true, 10), Some(Crossing::Fell));
        assert_eq!(
            marks.crossing(false, 50),
            None,
            "below, rising not past high"
        );
        assert_eq!(marks.crossing(false, 0), None);
        let equal = Watermarks { high: 64, low: 64 };
        assert_eq!(equal.crossing(false, 65), Some(Crossing::Rose));
        assert_eq!(equal.crossing(true, 64), Some(Crossing::Fell));
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
