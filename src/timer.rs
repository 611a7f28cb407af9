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
//! Cancelling is lazy: nothing is removed from the middle of the heap when a
//! deadline moves or its connection closes. The contract with the caller:
//!
//! - The caller remembers, per connection and per kind of timer, whether it
//!   has an entry pending, and keeps at most one *live* entry per connection
//!   and kind: it schedules a new one only when it has none (or the one it
//!   had fired). Moving a deadline later, which is what every bit of traffic
//!   does to an idle timeout, schedules nothing.
//! - When an entry fires, the caller compares it with the connection's real
//!   state: the connection may be gone (a [`ConnKey`](crate::token::ConnKey)
//!   with its unique id tells), or the deadline may have moved later (the
//!   callback returns the new one, and the entry is scheduled again). Only a
//!   deadline that really passed is acted upon.
//! - Once per turn, the caller calls [`Timers::compact`] with a bound on its
//!   live entries (its open connections times the kinds of timer) and a test
//!   that tells a live entry from a stale one (is its connection still open?).
//!
//! The entries of a connection that closed are *stale*: they would each fire
//! once, harmlessly, but only when their deadline comes, so without the third
//! rule the heap would grow with the connections that closed within the last
//! timeout, not with the open ones (5,000 short connections a second under a
//! one-hour idle timeout would leave 18 million entries). [`Timers::compact`]
//! removes the stale entries, in one O(n) pass that rebuilds the heap, when
//! the heap holds more than `2 × live + COMPACT_SLACK` entries. So:
//!
//! - **Size.** After each call the heap holds at most `2 × live +
//!   COMPACT_SLACK` entries (if it held more, at most `live` are left), and
//!   until the next call it grows only by what the caller schedules in one
//!   turn: O(open connections), whatever the churn and the timeouts.
//! - **Time.** A compaction scans `n > 2 × live + COMPACT_SLACK` entries and
//!   keeps at most `live` of them, so it removes more than half of what it
//!   scans: its O(n) is paid for by the entries it removes, each of which was
//!   scheduled once and is removed once. Scheduling therefore stays O(log n)
//!   amortized (n the heap's size, bounded as above), expiring O(log n) per
//!   entry fired, and a call to `compact` that finds nothing to do costs one
//!   comparison, like a turn in which nothing is due.
//!
//! A timing wheel would cancel in O(1) without compaction, but rounds deadlines
//! to its tick and cannot say cheaply when the next deadline is (see above);
//! the heap with compaction keeps deadlines exact and `next_deadline` O(1).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Stale entries [`Timers::compact`] tolerates beyond as many as there are
/// live ones, so that a heap of a few entries is not compacted at every
/// close.
pub const COMPACT_SLACK: usize = 64;

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

    /// Drops the stale entries if they may outnumber the live ones: when more
    /// than `2 * live + COMPACT_SLACK` entries are pending, keeps only those
    /// whose key `is_live` accepts, in one pass. `live` must bound how many
    /// entries `is_live` accepts (see the module docs for why this keeps the
    /// heap at O(live) entries at O(1) amortized cost). Returns how many
    /// entries were dropped.
    pub fn compact(&mut self, live: usize, mut is_live: impl FnMut(K) -> bool) -> usize {
        let limit = live.saturating_mul(2).saturating_add(COMPACT_SLACK);
        let before = self.heap.len();
        if before <= limit {
            return 0;
        }
        // Order among the kept entries is unchanged: it is their own (deadline,
        // sequence), and `retain` rebuilds the heap from them.
        self.heap.retain(|entry| is_live(entry.key));
        before - self.heap.len()
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

    /// Connection churn under a long timeout: every connection schedules an
    /// entry an hour away and closes at once. Compacting after each step
    /// keeps the heap within `2 × live + COMPACT_SLACK` entries, and the
    /// compactions scan fewer entries than twice the number scheduled (the
    /// O(1) amortized cost of the module docs).
    #[test]
    fn compaction_bounds_the_heap_by_live_entries_under_churn() {
        const CHURN: u64 = 100_000;
        const OPEN: u64 = 10;
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut timers = Timers::new();
        let mut open = std::collections::VecDeque::new();
        let (mut scanned, mut largest) = (0usize, 0usize);
        for key in 0..CHURN {
            timers.schedule(key, t0 + hour + ms(key));
            open.push_back(key);
            if open.len() as u64 > OPEN {
                open.pop_front(); // closed: its entry is stale from now on
            }
            let (first, last) = (open[0], *open.back().unwrap());
            timers.compact(open.len(), |k| {
                scanned += 1;
                (first..=last).contains(&k)
            });
            assert!(timers.len() <= 2 * open.len() + COMPACT_SLACK);
            largest = largest.max(timers.len());
        }
        assert_eq!(largest, 2 * OPEN as usize + COMPACT_SLACK);
        assert!(scanned < 2 * CHURN as usize, "{scanned} entries scanned");
        // Without compaction, every entry would still be there.
        assert!(timers.len() < CHURN as usize / 1000);
        // What is left fires in order, and the open connections' entries are
        // all there.
        let fired = fire(&mut timers, t0 + hour * 2);
        let keys: Vec<u64> = fired.iter().map(|f| f.0).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(open.iter().all(|k| keys.contains(k)));
    }

    /// Below the limit nothing is scanned; above it, only live entries stay,
    /// still in deadline order, ties in scheduling order.
    #[test]
    fn compaction_keeps_live_entries_in_order() {
        let at = Instant::now() + ms(10);
        let mut timers = Timers::new();
        for key in 0..200 {
            timers.schedule(key, at + ms(u64::from(key % 3)));
        }
        // 20 live entries: the limit is 2 × 20 + COMPACT_SLACK.
        let live = |key: u32| key % 10 == 0;
        assert_eq!(timers.compact(100, |_| panic!("scanned")), 0);
        assert_eq!(timers.len(), 200);
        assert_eq!(timers.compact(20, live), 180);
        assert_eq!(timers.len(), 20);
        let before = 200;
        let fired = fire(&mut timers, at + ms(5));
        let mut expected: Vec<(u32, Instant)> = (0..before as u32)
            .filter(|&k| live(k))
            .map(|k| (k, at + ms(u64::from(k % 3))))
            .collect();
        expected.sort_by_key(|&(k, t)| (t, k));
        assert_eq!(fired, expected);
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
