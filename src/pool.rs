//! Buffers for messages too large for a ring slot, recycled per size class.
//!
//! A framed message larger than a delivery slot is assembled in a `Vec<u8>` of
//! its own and handed to the consumer inside the slot. Allocating that vector
//! per message would put a `malloc`/`free` pair on the hot path for every large
//! message, so the I/O thread keeps a [`BufferPool`]: a free list per
//! power-of-two size class, from the smallest class (typically the slot size)
//! up to the class of the largest message allowed. [`BufferPool::take`] hands
//! out a buffer of the whole class size, even when less is asked for, so that
//! the buffer can serve any later message of its class once it comes back;
//! [`BufferPool::give`] files a returned buffer under the largest class its
//! capacity can serve. Power-of-two classes waste at most half of a buffer and
//! keep the number of free lists logarithmic in the size range.
//!
//! The cache is bounded: once the buffers it holds add up to the cap, returned
//! buffers are freed instead, so a burst of large messages cannot pin its peak
//! memory for the life of the server.
//!
//! Only the I/O thread uses a pool. Buffers travel to the consumer inside ring
//! slots and come back when the I/O thread reuses the slot, so the pool needs
//! no synchronisation.

/// Free lists of byte buffers, one per power-of-two size class.
#[derive(Debug)]
pub struct BufferPool {
    /// Capacity of the buffers of class 0; class `i` holds `smallest << i`.
    smallest: usize,
    /// One free list per class, smallest first.
    free: Box<[Vec<Vec<u8>>]>,
    /// Sum of the capacities of the buffers in the free lists.
    cached_bytes: usize,
    /// Most bytes the free lists may hold.
    cache_limit: usize,
    hits: u64,
    misses: u64,
}

impl BufferPool {
    /// A pool whose classes run from `min_size` to `max_size`, each rounded up
    /// to a power of two, keeping at most `cache_limit` bytes of free buffers.
    ///
    /// Requests above `max_size` are still served, by a fresh allocation of
    /// exactly that size; such a buffer is cached, when it comes back, in the
    /// largest class.
    pub fn new(min_size: usize, max_size: usize, cache_limit: usize) -> BufferPool {
        let smallest = round_up_to_class(min_size.max(1));
        let largest = round_up_to_class(max_size).max(smallest);
        let classes = (largest.trailing_zeros() - smallest.trailing_zeros()) as usize + 1;
        BufferPool {
            smallest,
            free: (0..classes).map(|_| Vec::new()).collect(),
            cached_bytes: 0,
            cache_limit,
            hits: 0,
            misses: 0,
        }
    }

    /// An empty buffer (length 0) with room for at least `size` bytes: a cached
    /// one of `size`'s class if there is one, else a new one of the whole class
    /// size.
    pub fn take(&mut self, size: usize) -> Vec<u8> {
        let Some(class) = self.class_for_request(size) else {
            self.misses += 1;
            return Vec::with_capacity(size);
        };
        match self.free[class].pop() {
            Some(buf) => {
                self.hits += 1;
                self.cached_bytes -= buf.capacity();
                debug_assert!(buf.is_empty() && buf.capacity() >= size);
                buf
            }
            None => {
                self.misses += 1;
                Vec::with_capacity(self.class_size(class))
            }
        }
    }

    /// Takes `buf` back, emptied, into the largest class its capacity can
    /// serve; frees it if it is smaller than the smallest class or if caching
    /// it would exceed the cap.
    pub fn give(&mut self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        let Some(class) = self.class_served_by(capacity) else {
            return;
        };
        if self.cached_bytes + capacity > self.cache_limit {
            return;
        }
        buf.clear();
        self.cached_bytes += capacity;
        self.free[class].push(buf);
    }

    /// Number of [`take`](Self::take)s served from the cache.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Number of [`take`](Self::take)s that had to allocate.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Bytes held by cached buffers (their capacities).
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }

    /// Number of buffers cached.
    pub fn cached_buffers(&self) -> usize {
        self.free.iter().map(Vec::len).sum()
    }

    /// Frees every cached buffer (the counters stay).
    pub fn release_cached(&mut self) {
        for list in self.free.iter_mut() {
            *list = Vec::new();
        }
        self.cached_bytes = 0;
    }

    fn class_size(&self, class: usize) -> usize {
        self.smallest << class
    }

    /// The smallest class whose buffers hold `size` bytes, if any.
    fn class_for_request(&self, size: usize) -> Option<usize> {
        let class_size = round_up_to_class(size.max(self.smallest));
        let class = (class_size.trailing_zeros() - self.smallest.trailing_zeros()) as usize;
        (class < self.free.len() && class_size >= size).then_some(class)
    }

    /// The largest class a buffer of `capacity` bytes can serve, if any: the
    /// largest class size not above `capacity`, capped at the top class.
    fn class_served_by(&self, capacity: usize) -> Option<usize> {
        if capacity < self.smallest {
            return None;
        }
        let log2 = usize::BITS - 1 - capacity.leading_zeros();
        let class = (log2 - self.smallest.trailing_zeros()) as usize;
        Some(class.min(self.free.len() - 1))
    }
}

/// `size` rounded up to a power of two, saturating at the largest power of two
/// a `usize` holds.
fn round_up_to_class(size: usize) -> usize {
    size.checked_next_power_of_two()
        .unwrap_or(1 << (usize::BITS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    #[test]
    fn take_rounds_up_to_the_class_size() {
        let mut pool = BufferPool::new(4 * KIB, 64 * KIB, usize::MAX);
        assert_eq!(pool.take(0).capacity(), 4 * KIB);
        assert_eq!(pool.take(1).capacity(), 4 * KIB);
        assert_eq!(pool.take(4 * KIB).capacity(), 4 * KIB);
        assert_eq!(pool.take(4 * KIB + 1).capacity(), 8 * KIB);
        assert_eq!(pool.take(64 * KIB).capacity(), 64 * KIB);
        assert_eq!(pool.misses(), 5);
        assert_eq!(pool.hits(), 0);
    }

    #[test]
    fn class_bounds_that_are_not_powers_of_two_round_up() {
        let mut pool = BufferPool::new(3000, 10_000, usize::MAX);
        assert_eq!(pool.take(1).capacity(), 4096);
        assert_eq!(pool.take(10_000).capacity(), 16_384);
        // Three classes: 4, 8 and 16 KiB; nothing above 16 KiB is pooled.
        let big = pool.take(20_000);
        assert_eq!(big.capacity(), 20_000);
    }

    #[test]
    fn a_returned_buffer_serves_the_next_take_of_its_class() {
        let mut pool = BufferPool::new(4 * KIB, 64 * KIB, usize::MAX);
        let mut buf = pool.take(5 * KIB);
        buf.extend_from_slice(&[1; 5 * KIB]);
        let address = buf.as_ptr();
        pool.give(buf);
        assert_eq!(pool.cached_bytes(), 8 * KIB);
        // Any size of the same class gets it back, emptied.
        let again = pool.take(7 * KIB);
        assert_eq!(again.as_ptr(), address);
        assert!(again.is_empty());
        assert_eq!(pool.hits(), 1);
        assert_eq!(pool.cached_bytes(), 0);
        // Another class does not.
        pool.give(again);
        let other = pool.take(4 * KIB);
        assert_ne!(other.as_ptr(), address);
        assert_eq!(pool.misses(), 2);
    }

    #[test]
    fn odd_capacities_go_to_the_largest_class_they_serve() {
        let mut pool = BufferPool::new(4 * KIB, 64 * KIB, usize::MAX);
        // 12 KiB serves every 8 KiB request, but not every 16 KiB one.
        pool.give(Vec::with_capacity(12 * KIB));
        assert_eq!(pool.take(16 * KIB).capacity(), 16 * KIB);
        assert_eq!(pool.misses(), 1);
        let buf = pool.take(8 * KIB);
        assert_eq!(buf.capacity(), 12 * KIB);
        assert_eq!(pool.hits(), 1);
        // Larger than the top class: kept in the top class.
        pool.give(Vec::with_capacity(100 * KIB));
        assert_eq!(pool.take(64 * KIB).capacity(), 100 * KIB);
        // Smaller than the smallest class: dropped.
        pool.give(Vec::with_capacity(KIB));
        pool.give(Vec::new());
        assert_eq!(pool.cached_buffers(), 0);
        assert_eq!(pool.cached_bytes(), 0);
    }

    #[test]
    fn requests_above_the_largest_class_are_allocated_exactly() {
        let mut pool = BufferPool::new(4 * KIB, 16 * KIB, usize::MAX);
        let big = pool.take(20 * KIB);
        assert_eq!(big.capacity(), 20 * KIB);
        pool.give(big);
        // It went to the top class, where it serves top-class requests...
        assert_eq!(pool.take(16 * KIB).capacity(), 20 * KIB);
        // ...but a second oversized request cannot assume that and allocates.
        assert_eq!(pool.take(20 * KIB).capacity(), 20 * KIB);
        assert_eq!(pool.misses(), 2);
    }

    #[test]
    fn the_cache_stays_under_its_cap() {
        let mut pool = BufferPool::new(4 * KIB, 64 * KIB, 20 * KIB);
        let bufs: Vec<_> = (0..8).map(|_| pool.take(4 * KIB)).collect();
        for buf in bufs {
            pool.give(buf);
        }
        assert_eq!(pool.cached_buffers(), 5);
        assert_eq!(pool.cached_bytes(), 20 * KIB);
        // A 16 KiB buffer does not fit in what is left: freed.
        pool.give(Vec::with_capacity(16 * KIB));
        assert_eq!(pool.cached_bytes(), 20 * KIB);
        pool.release_cached();
        assert_eq!(pool.cached_buffers(), 0);
        assert_eq!(pool.cached_bytes(), 0);
    }

    #[test]
    fn a_max_below_the_min_leaves_one_class() {
        let mut pool = BufferPool::new(64 * KIB, 1000, usize::MAX);
        assert_eq!(pool.take(10).capacity(), 64 * KIB);
        assert_eq!(pool.take(64 * KIB + 1).capacity(), 64 * KIB + 1);
    }

    #[test]
    fn huge_limits_do_not_overflow() {
        let mut pool = BufferPool::new(0, usize::MAX, usize::MAX);
        assert_eq!(pool.take(3).capacity(), 4);
        // A capacity of 3 serves the class of 2, and counts as 3 bytes held.
        pool.give(Vec::with_capacity(3));
        assert_eq!(pool.cached_bytes(), 3);
        assert_eq!(pool.take(2).capacity(), 3);
    }

    #[test]
    fn steady_state_cycles_reuse_the_same_buffers() {
        let mut pool = BufferPool::new(4 * KIB, 1024 * KIB, usize::MAX);
        let sizes = [5 * KIB, 300 * KIB, 4 * KIB, 1024 * KIB, 70 * KIB, 9 * KIB];
        let cycle = |pool: &mut BufferPool| {
            // Several buffers in flight at once, as in a ring full of messages.
            let held: Vec<_> = sizes
                .iter()
                .map(|&size| {
                    let mut buf = pool.take(size);
                    buf.resize(size, 7);
                    buf
                })
                .collect();
            let addresses: Vec<_> = held.iter().map(|b| b.as_ptr()).collect();
            for buf in held {
                pool.give(buf);
            }
            addresses
        };
        let warm = cycle(&mut pool);
        let misses = pool.misses();
        for _ in 0..100 {
            let mut again = cycle(&mut pool);
            let mut expected = warm.clone();
            again.sort();
            expected.sort();
            assert_eq!(again, expected);
        }
        assert_eq!(pool.misses(), misses);
        assert_eq!(pool.hits(), 100 * sizes.len() as u64);
    }
}
