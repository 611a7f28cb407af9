//! Deadlines for many connections, without looking at each one every turn.
//!
//! Idle and per-message timeouts may be armed on every one of 100,000
//! connections, so the I/O thread cannot afford to check each connection on
//! each turn. [`Timers`] keeps pending deadlines in a binary min-heap ordered
//! by deadline, then by scheduling order: the earliest deadline is read in O(1)
//! (to bound the poller's wait), scheduling and expiring cost O(log n), and a
//! turn in which nothing is due costs one comparison. A hashed timer wheel would
//! make scheduling O(1), but it rounds deadlines to its tick, must be advanced
//! tick by tick (or searched for its next occupied slot) to say when to wake,
//! and needs tuning to the range of timeouts; at these sizes a heap is about 17
//! levels deep, and exact.
//!
//! Cancelling is lazy: nothing is ever removed from the middle of the heap. The
//! contract with the caller, which is what keeps the heap at O(connections):
//!
//! - The caller remembers, per connection and per kind of timer, the deadline of
//!   the entry it has pending, if any, and schedules a new entry only if it has
//!   none, or if the new deadline is earlier than the pending one (that one
//!   then fires later as a stale entry). Moving a deadline later, which is what
//!   every bit of traffic does to an idle timeout, schedules nothing.
//! - When an entry fires, the caller compares it with the connection's real
//!   state: the connection may be gone (a [`ConnKey`](crate::token::ConnKey)
//!   with its unique id tells), the entry may be stale (its deadline is not the
//!   pending one), or the deadline may have moved later (the callback returns
//!   the new one, and the entry is scheduled again). Only a deadline that really
//!   passed is acted upon.
//!
//! So each connection has at most one live entry per kind of timer, plus stale
//! entries that each fire once, harmlessly, and are gone.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

/// One scheduled deadline.
#[derive(Clone, Copy, Debug)]
struct Entry<K> {
    at: Instant,
    /// Scheduling order, so that equal deadlines fire first-come first-served
    /// and the heap's order is total.
    sequence: u64,
    key: K,
}

impl<K> Entry<K> {
    fn order(&self) -> (Instant, u64) {
        (self.at, self.sequence)
    }
}

// `BinaryHeap` is a max-heap: entries compare reversed, so the earliest
// deadline is on top. The key takes no part, so it need not be ordered.
impl<K> Ord for Entry<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.order().cmp(&self.order())
    }
}

impl<K> PartialOrd for Entry<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> PartialEq for Entry<K> {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl<K> Eq for Entry<K> {}

/// Pending deadlines, each naming a key (typically a connection and the kind
/// of timer), fired in deadline order.
#[derive(Debug)]
pub struct Timers<K: Copy> {
    heap: BinaryHeap<Entry<K>>,
    next_sequence: u64,
    /// Entries rescheduled by an [`expire`](Timers::expire) callback, pushed
    /// once the call has fired everything due. Kept to reuse its allocation.
    rescheduled: Vec<(K, Instant)>,
}

impl<K: Copy> Default for Timers<K> {
    fn default() -> Self {
        Timers::new()
    }
}

impl<K: Copy> Timers<K> {
    /// No deadlines.
    pub fn new() -> Timers<K> {
        Timers::with_capacity(0)
    }

    /// No deadlines, with room for `capacity` entries before allocating.
    pub fn with_capacity(capacity: usize) -> Timers<K> {
        Timers {
            heap: BinaryHeap::with_capacity(capacity),
            next_sequence: 0,
            rescheduled: Vec::new(),
        }
    }

    /// Adds an entry for `key`, due at `at`. Entries already scheduled for the
    /// same key stay (see the module docs for how the caller tells them apart).
    pub fn schedule(&mut self, key: K, at: Instant) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.heap.push(Entry { at, sequence, key });
    }

    /// The earliest pending deadline, stale entries included (the poller may
    /// wake for one of those, once).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|entry| entry.at)
    }

    /// Fires every entry due at `now` (deadline not after it), earliest first,
    /// equal deadlines in the order they were scheduled, by calling
    /// `on_expired(key, deadline)`. The callback returns `Some(at)` to schedule
    /// the key again (its real deadline moved later), else `None`. Entries
    /// scheduled this way fire in a later call, even if `at` is not after `now`,
    /// so every call ends. Returns how many entries fired.
    pub fn expire(
        &mut self,
        now: Instant,
        mut on_expired: impl FnMut(K, Instant) -> Option<Instant>,
    ) -> usize {
        let mut fired = 0;
        while let Some(entry) = self.heap.peek() {
            if entry.at > now {
                break;
            }
            let entry = self.heap.pop().expect("peeked");
            fired += 1;
            if let Some(at) = on_expired(entry.key, entry.at) {
                self.rescheduled.push((entry.key, at));
            }
        }
        // Indexed rather than drained, so that `schedule` can borrow `self`.
        for i in 0..self.rescheduled.len() {
            let (key, at) = self.rescheduled[i];
            self.schedule(key, at);
        }
        self.rescheduled.clear();
        fired
    }

    /// Number of entries pending, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True if no entry is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.heap.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Everything `timers` fires at `now`, in order.
    fn fire<K: Copy>(timers: &mut Timers<K>, now: Instant) -> Vec<(K, Instant)> {
        let mut fired = Vec::new();
        let count = timers.expire(now, |key, at| {
            fired.push((key, at));
            None
        });
        assert_eq!(count, fired.len());
        fired
    }

    #[test]
    fn entries_fire_in_deadline_order_once_due() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        assert_eq!(timers.next_deadline(), None);
        for (key, offset) in [(3, 30), (1, 10), (4, 40), (2, 20)] {
            timers.schedule(key, t0 + ms(offset));
        }
        assert_eq!(timers.len(), 4);
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));
        assert!(fire(&mut timers, t0 + ms(5)).is_empty());
        // Due means "not after now": the entry at exactly 20 fires.
        let fired = fire(&mut timers, t0 + ms(20));
        assert_eq!(fired, [(1, t0 + ms(10)), (2, t0 + ms(20))]);
        assert_eq!(timers.next_deadline(), Some(t0 + ms(30)));
        let keys: Vec<_> = fire(&mut timers, t0 + ms(100))
            .iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(keys, [3, 4]);
        assert!(timers.is_empty());
        assert_eq!(timers.next_deadline(), None);
    }

    #[test]
    fn equal_deadlines_fire_in_scheduling_order() {
        let at = Instant::now() + ms(10);
        let mut timers = Timers::new();
        for key in [5, 1, 4, 2, 3] {
            timers.schedule(key, at);
        }
        timers.schedule(0, at - ms(1));
        let keys: Vec<_> = fire(&mut timers, at).iter().map(|f| f.0).collect();
        assert_eq!(keys, [0, 5, 1, 4, 2, 3]);
    }

    #[test]
    fn a_rescheduled_entry_fires_in_a_later_call_even_if_already_due() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.schedule('a', t0);
        timers.schedule('b', t0 + ms(1));
        let mut calls = 0;
        // Rescheduling into the past must not make this call loop forever.
        let fired = timers.expire(t0 + ms(5), |key, _| {
            calls += 1;
            (key == 'a').then_some(t0)
        });
        assert_eq!((fired, calls), (2, 2));
        assert_eq!(timers.next_deadline(), Some(t0));
        assert_eq!(fire(&mut timers, t0 + ms(5)), [('a', t0)]);
    }

    #[test]
    fn many_entries_fire_sorted_in_steps() {
        let t0 = Instant::now();
        let mut timers = Timers::with_capacity(100_000);
        // A simple LCG: deterministic, spread-out deadlines with many ties.
        let mut state = 12345u64;
        let mut deadlines = Vec::new();
        for key in 0..100_000u32 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = t0 + ms((state >> 33) % 10_000);
            deadlines.push((at, key));
            timers.schedule(key, at);
        }
        deadlines.sort(); // by deadline, then key, which is scheduling order
        let mut fired = Vec::new();
        for step in 1..=10u64 {
            let now = t0 + ms(step * 1000);
            let before = fired.len();
            timers.expire(now, |key, at| {
                fired.push((at, key));
                None
            });
            assert!(fired[before..].iter().all(|&(at, _)| at <= now));
            if let Some(next) = timers.next_deadline() {
                assert!(next > now);
            }
        }
        assert_eq!(fired, deadlines);
        assert!(timers.is_empty());
    }

    /// The lazy-cancellation contract of the module docs, played by a caller
    /// with idle timeouts: traffic moves deadlines later without scheduling,
    /// so the heap never holds more than one entry per connection.
    #[test]
    fn lazy_cancellation_keeps_one_entry_per_connection() {
        const IDLE: Duration = Duration::from_millis(100);
        struct Conn {
            /// The real deadline: last traffic + IDLE.
            idle_deadline: Instant,
            /// The deadline of the entry pending in the heap.
            entry: Option<Instant>,
        }
        let t0 = Instant::now();
        let mut timers = Timers::new();
        let mut conns: HashMap<u32, Conn> = HashMap::new();
        for key in 0..1000 {
            let at = t0 + IDLE;
            conns.insert(
                key,
                Conn {
                    idle_deadline: at,
                    entry: Some(at),
                },
            );
            timers.schedule(key, at);
        }
        let mut timed_out = Vec::new();
        for tick in 1..=50u64 {
            let now = t0 + ms(tick * 10);
            // Even connections talk every tick until 300 ms: deadlines move,
            // nothing is scheduled.
            if tick * 10 <= 300 {
                for (_, conn) in conns.iter_mut().filter(|(key, _)| *key % 2 == 0) {
                    conn.idle_deadline = now + IDLE;
                }
            }
            timers.expire(now, |key, at| {
                let conn = conns.get_mut(&key)?; // gone: ignore
                if conn.entry != Some(at) {
                    return None; // stale
                }
                if conn.idle_deadline > now {
                    conn.entry = Some(conn.idle_deadline);
                    return conn.entry;
                }
                conn.entry = None;
                timed_out.push((key, now));
                conns.remove(&key);
                None
            });
            assert!(timers.len() <= conns.len());
        }
        assert!(conns.is_empty());
        assert_eq!(timed_out.len(), 1000);
        for (key, at) in timed_out {
            let expected = if key % 2 == 0 { ms(400) } else { ms(100) };
            assert_eq!(at - t0, expected, "connection {key}");
        }
    }

    #[test]
    fn clear_drops_everything() {
        let mut timers = Timers::default();
        timers.schedule((), Instant::now());
        timers.clear();
        assert!(timers.is_empty());
        assert_eq!(timers.next_deadline(), None);
    }
}
