//! A bounded single-producer/single-consumer ring of pre-allocated slots.
//!
//! The two threads of a server exchange work through two of these rings: the
//! I/O thread fills [`Delivery`](crate::message::Delivery) slots for the Python
//! thread, and the Python side fills [`Command`](crate::message::Command) slots
//! for the I/O thread. Slots are allocated once, when the ring is made, and are
//! then written and read *in place*: the I/O thread `recv`s straight into a
//! slot's buffer, so steady-state traffic allocates nothing.
//!
//! The protocol is the classic Lamport queue with cached indices (as in `rtrb`):
//! `tail` counts slots ever published and is written only by the producer,
//! `head` counts slots ever released and is written only by the consumer. Both
//! run over all of `usize` and wrap; `tail - head` is the number of occupied
//! slots. Publishing is a `Release` store of `tail`, which the consumer reads
//! with `Acquire` before touching a slot, so the slot's contents happen-before
//! the consumer's access; releasing is a `Release` store of `head`, read with
//! `Acquire` by the producer before it reuses a slot, so the consumer's
//! accesses happen-before the producer's next ones. Each side keeps a private
//! copy of the other side's index and reloads the shared one only when the
//! copy says full (or empty), and both sides move in batches: many slots are
//! staged (or consumed) and made visible with one store.
//!
//! The ring never blocks and never drops: a full ring makes
//! [`Producer::vacant`] return `None`, and the caller decides how to wait
//! (see [`crate::wake`]). `tests/loom.rs` checks this protocol under every
//! interleaving the loom model checker can produce.

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicUsize, UnsafeCell};
use std::sync::atomic::Ordering::{Acquire, Release};

struct Ring<T> {
    slots: Box<[UnsafeCell<T>]>,
    mask: usize,
    /// Slots ever released by the consumer. Written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Slots ever published by the producer. Written only by the producer.
    tail: CachePadded<AtomicUsize>,
}

// SAFETY: a slot is only ever touched by one side at a time. The producer writes
// slots in `[tail, head + capacity)`, which the consumer does not touch; the
// consumer reads (and may change) slots in `[head, tail)`, which the producer
// does not touch. The Release/Acquire pairs on `head` and `tail` order those
// accesses (module docs). `T: Send` because slot contents written on one
// thread are read, and may be moved out, on the other.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: the ring owns its slots; moving it moves `T`s, which are `Send`.
unsafe impl<T: Send> Send for Ring<T> {}

/// Creates a ring of `capacity` slots, each made by `make_slot`, and returns its
/// two ends.
///
/// # Panics
/// If `capacity` is zero or not a power of two.
pub fn ring<T>(capacity: usize, mut make_slot: impl FnMut() -> T) -> (Producer<T>, Consumer<T>) {
    assert!(
        capacity.is_power_of_two(),
        "ring capacity must be a power of two, got {capacity}"
    );
    let ring = Arc::new(Ring {
        slots: (0..capacity)
            .map(|_| UnsafeCell::new(make_slot()))
            .collect(),
        mask: capacity - 1,
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
    });
    let producer = Producer {
        ring: Arc::clone(&ring),
        next: 0,
        published: 0,
        head_seen: 0,
    };
    let consumer = Consumer {
        ring,
        next: 0,
        released: 0,
        tail_seen: 0,
    };
    (producer, consumer)
}

/// The writing end of a ring.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    /// Slots staged so far, published or not.
    next: usize,
    /// The value of `tail` this producer last stored.
    published: usize,
    /// The last value of `head` this producer loaded.
    head_seen: usize,
}

impl<T> Producer<T> {
    /// Number of slots in the ring.
    pub fn capacity(&self) -> usize {
        self.ring.slots.len()
    }

    /// Number of slots that can be staged now, reloading the consumer's
    /// position only if the cached one says the ring is full.
    pub fn free(&mut self) -> usize {
        let mut free = self.capacity() - self.next.wrapping_sub(self.head_seen);
        if free == 0 {
            self.head_seen = self.ring.head.load(Acquire);
            free = self.capacity() - self.next.wrapping_sub(self.head_seen);
        }
        free
    }

    /// True if `n` slots can be staged now, reloading the consumer's position
    /// if the cached one says fewer are free.
    pub fn has_room_for(&mut self, n: usize) -> bool {
        if self.capacity() - self.next.wrapping_sub(self.head_seen) < n {
            self.head_seen = self.ring.head.load(Acquire);
        }
        self.capacity() - self.next.wrapping_sub(self.head_seen) >= n
    }

    /// The next free slot, or `None` if the ring is full.
    pub fn vacant(&mut self) -> Option<Vacant<'_, T>> {
        (self.free() > 0).then_some(Vacant { producer: self })
    }

    /// Runs `f` on the contents of every free slot (released by the consumer,
    /// not reused yet), after reloading the consumer's position: for taking
    /// back what consumed slots still hold.
    pub fn for_each_vacant(&mut self, mut f: impl FnMut(&mut T)) {
        self.head_seen = self.ring.head.load(Acquire);
        let free = self.capacity() - self.next.wrapping_sub(self.head_seen);
        for offset in 0..free {
            let index = self.next.wrapping_add(offset) & self.ring.mask;
            self.ring.slots[index].with_mut(|slot| {
                // SAFETY: as in `Vacant::with_mut`: the slot lies in
                // `[tail, head + capacity)` for the `head` just loaded with
                // Acquire, so the consumer has released it and will not read it
                // before it is published, and `&mut self` makes this the only
                // reference.
                f(unsafe { &mut *slot })
            });
        }
    }

    /// Slots the consumer has released so far (a running count that wraps),
    /// reloaded: a change means the consumer made progress.
    pub fn released(&mut self) -> usize {
        self.head_seen = self.ring.head.load(Acquire);
        self.head_seen
    }

    /// True if the consumer has released every slot staged so far,
    /// reloading its position: nothing waits for it.
    pub fn is_drained(&mut self) -> bool {
        self.head_seen = self.ring.head.load(Acquire);
        self.head_seen == self.next
    }

    /// A handle that follows the consumer's progress without the producer:
    /// for whoever must know when a slot it filled has been consumed.
    pub fn release_watch(&self) -> ReleaseWatch<T> {
        ReleaseWatch {
            ring: Arc::clone(&self.ring),
        }
    }

    /// Number of slots staged but not yet published.
    pub fn staged(&self) -> usize {
        self.next.wrapping_sub(self.published)
    }

    /// Makes every staged slot visible to the consumer, with one store.
    pub fn publish(&mut self) {
        if self.next != self.published {
            self.ring.tail.store(self.next, Release);
            self.published = self.next;
        }
    }
}

/// Follows how far the consumer of a ring has released its slots.
pub struct ReleaseWatch<T> {
    ring: Arc<Ring<T>>,
}

impl<T> ReleaseWatch<T> {
    /// True once the consumer has released the slot staged at `position`
    /// (see [`Vacant::position`]). The Acquire load orders everything the
    /// consumer did with that slot before whatever the caller does next.
    pub fn has_released(&self, position: usize) -> bool {
        let head = self.ring.head.load(Acquire);
        // Positions wrap: compare distances, not values.
        head.wrapping_sub(position) as isize > 0
    }
}

/// A free slot of a [`Producer`]'s ring. Fill it with [`Vacant::with_mut`],
/// then [`Vacant::stage`] it; dropping it unstaged leaves the slot free.
pub struct Vacant<'a, T> {
    producer: &'a mut Producer<T>,
}

impl<T> Vacant<'_, T> {
    /// Runs `f` on the slot's contents (whatever the slot held last time).
    pub fn with_mut<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        let ring = &self.producer.ring;
        let index = self.producer.next & ring.mask;
        ring.slots[index].with_mut(|slot| {
            // SAFETY: `free() > 0` when this `Vacant` was made, so the slot lies in
            // `[tail, head + capacity)`: the consumer has released it (the Acquire
            // load of `head` ordered its last read before this write) and will not
            // read it until it is published. `&mut self` on the producer makes this
            // the only reference.
            f(unsafe { &mut *slot })
        })
    }

    /// The slot's position: how many slots the producer staged before it (a
    /// running count that wraps). The consumer has released it once
    /// [`Producer::released`] has passed it.
    pub fn position(&self) -> usize {
        self.producer.next
    }

    /// Adds the slot to the next [`Producer::publish`].
    pub fn stage(self) {
        self.producer.next = self.producer.next.wrapping_add(1);
    }
}

/// The reading end of a ring.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    /// Slots taken so far, released or not.
    next: usize,
    /// The value of `head` this consumer last stored.
    released: usize,
    /// The last value of `tail` this consumer loaded.
    tail_seen: usize,
}

impl<T> Consumer<T> {
    /// Number of slots in the ring.
    pub fn capacity(&self) -> usize {
        self.ring.slots.len()
    }

    /// Number of published slots not yet taken, reloading the producer's
    /// position only if the cached one says the ring is empty.
    pub fn ready(&mut self) -> usize {
        let mut ready = self.tail_seen.wrapping_sub(self.next);
        if ready == 0 {
            self.tail_seen = self.ring.tail.load(Acquire);
            ready = self.tail_seen.wrapping_sub(self.next);
        }
        ready
    }

    /// Reads the next published slot with `f` and takes it, or returns `None`
    /// if none is ready. A taken slot stays out of the producer's reach until
    /// [`Consumer::release`]. `f` may also change the slot or move things
    /// out of it, which the producer then finds changed.
    pub fn take_with<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if self.ready() == 0 {
            return None;
        }
        let index = self.next & self.ring.mask;
        // Taken before it is read: if `f` panics, the slot is not read again.
        self.next = self.next.wrapping_add(1);
        let result = self.ring.slots[index].with_mut(|slot| {
            // SAFETY: `ready() > 0`, so the slot lies in `[head, tail)`: the
            // producer published it (the Acquire load of `tail` ordered its writes
            // before this access) and will not touch it until it is released,
            // whose Release store orders this access before the producer's next.
            // The consumer takes each slot once, so this is the only reference.
            f(unsafe { &mut *slot })
        });
        Some(result)
    }

    /// Number of slots taken but not yet released.
    pub fn taken(&self) -> usize {
        self.next.wrapping_sub(self.released)
    }

    /// Gives every taken slot back to the producer, with one store.
    pub fn release(&mut self) {
        if self.next != self.released {
            self.ring.head.store(self.next, Release);
            self.released = self.next;
        }
    }

    /// True if the ring holds no published slot that is not yet taken, as seen by
    /// a fresh load of the producer's position.
    pub fn is_empty(&mut self) -> bool {
        self.tail_seen = self.ring.tail.load(Acquire);
        self.tail_seen == self.next
    }
}

impl<T> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("staged", &self.staged())
            .finish()
    }
}

impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("taken", &self.taken())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    impl<T> Producer<T> {
        fn shared_positions(&self) -> (usize, usize) {
            (self.ring.head.load(Relaxed), self.ring.tail.load(Relaxed))
        }
    }

    #[test]
    fn staged_slots_are_invisible_until_published() {
        let (mut tx, mut rx) = ring(4, || 0u32);
        let mut slot = tx.vacant().unwrap();
        slot.with_mut(|v| *v = 7);
        slot.stage();
        assert_eq!(rx.ready(), 0);
        tx.publish();
        assert_eq!(rx.take_with(|v| *v), Some(7));
        assert_eq!(rx.take_with(|v| *v), None);
    }

    #[test]
    fn full_ring_refuses_until_released() {
        let (mut tx, mut rx) = ring(2, || 0u32);
        for i in 0..2 {
            let mut slot = tx.vacant().unwrap();
            slot.with_mut(|v| *v = i);
            slot.stage();
        }
        tx.publish();
        assert!(tx.vacant().is_none());
        assert_eq!(rx.take_with(|v| *v), Some(0));
        // Taken but not released: still not reusable.
        assert!(tx.vacant().is_none());
        rx.release();
        assert_eq!(tx.free(), 1);
        assert_eq!(tx.shared_positions(), (1, 2));
    }

    #[test]
    fn unstaged_vacant_slot_stays_free() {
        let (mut tx, mut rx) = ring(2, || 0u32);
        tx.vacant().unwrap().with_mut(|v| *v = 9);
        tx.publish();
        assert_eq!(rx.ready(), 0);
        assert_eq!(tx.free(), 2);
    }

    #[test]
    fn positions_wrap_around_usize() {
        let (mut tx, mut rx) = ring(4, || 0usize);
        // Start both ends just below the wrap point.
        let start = usize::MAX - 5;
        tx.next = start;
        tx.published = start;
        tx.head_seen = start;
        tx.ring.head.store(start, Relaxed);
        tx.ring.tail.store(start, Relaxed);
        rx.next = start;
        rx.released = start;
        rx.tail_seen = start;
        for round in 0..5 {
            for i in 0..4 {
                let mut slot = tx.vacant().unwrap();
                slot.with_mut(|v| *v = round * 4 + i);
                slot.stage();
            }
            assert!(tx.vacant().is_none());
            tx.publish();
            for i in 0..4 {
                assert_eq!(rx.take_with(|v| *v), Some(round * 4 + i));
            }
            rx.release();
        }
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_must_be_a_power_of_two() {
        let _ = ring(3, || 0u8);
    }
}
