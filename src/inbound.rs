//! Messages larger than a ring slot, on their way to the consumer and back.
//!
//! A framed message that does not fit a delivery slot travels in a buffer of
//! the I/O thread's [`BufferPool`], moved into the slot's `large` field. The
//! consumer only reads it; the buffer comes back when the I/O thread reuses
//! the slot (the first seed's design: reclaim what the consumer has
//! processed, on the producing thread, so steady traffic allocates nothing
//! and every buffer is freed on the thread that allocated it).
//!
//! Slots are reused in ring order, so a consumed slot may keep its buffer for
//! a while. A byte budget bounds what buffers parked in the ring may hold:
//! over it, the I/O thread first takes back the buffers of every slot the
//! consumer has released, and if that is not enough, it waits for the
//! consumer before handing over another large message.
//!
//! A consumer that would copy a large raw read into an object of its own (the
//! Python bindings: a `bytes` object) may lend the object's storage instead,
//! as a [`Blank`] in the engine's [`BlankStock`] (`blank.rs`): a read that
//! starts in a spill buffer takes a blank when the stock has one, the slot
//! carries it, and what the consumer did not take out of a slot goes back
//! to the stock when the slot is reused.

use std::sync::Arc;

use crate::blank::{Blank, BlankStock};
use crate::message::Delivery;
use crate::pool::BufferPool;
use crate::ring::Producer;

/// The pool of large-message buffers and the account of those in the ring,
/// kept apart so that a decoder can borrow the pool while its sink fills slots.
#[derive(Debug)]
pub(crate) struct LargeMessages {
    /// Where buffers come from (lent to decoders) and go back to.
    pub(crate) pool: BufferPool,
    /// What the ring holds.
    pub(crate) account: RingAccount,
    /// The consumer's blanks, for raw reads.
    pub(crate) blanks: Arc<BlankStock>,
}

/// The buffers that sit in delivery slots.
#[derive(Debug)]
pub(crate) struct RingAccount {
    /// Capacity of the buffers that sit in ring slots.
    in_ring: usize,
    /// The most `in_ring` may reach.
    budget: usize,
    /// Buffers taken out of slots, to go back to the pool by
    /// [`LargeMessages::settle`].
    returned: Vec<Vec<u8>>,
    /// Blanks the consumer left in slots, to go back to the stock by
    /// [`LargeMessages::settle`].
    returned_blanks: Vec<Blank>,
}

impl LargeMessages {
    /// Buffers from `min_size` to `max_message_size` bytes, at most `budget`
    /// bytes of them in a ring of `ring_slots` slots at a time,
    /// and `blanks` to read raw input into when it has some.
    pub(crate) fn new(
        min_size: usize,
        max_message_size: usize,
        budget: usize,
        ring_slots: usize,
        blanks: Arc<BlankStock>,
    ) -> Self {
        LargeMessages {
            // Cache what one budget's worth of traffic needs, no more.
            pool: BufferPool::new(min_size, max_message_size.max(min_size), budget),
            account: RingAccount {
                in_ring: 0,
                budget,
                returned: Vec::with_capacity(ring_slots),
                returned_blanks: Vec::new(),
            },
            blanks,
        }
    }

    /// Gives the buffers taken out of slots back to the pool, and the
    /// blanks back to the stock.
    pub(crate) fn settle(&mut self) {
        for buffer in self.account.returned.drain(..) {
            self.pool.give(buffer);
        }
        if !self.account.returned_blanks.is_empty() {
            self.blanks.give_all(self.account.returned_blanks.drain(..));
        }
    }
}

impl RingAccount {
    /// Takes back the buffer, or the blank, a slot still holds, before the
    /// slot is reused.
    pub(crate) fn reclaim(&mut self, delivery: &mut Delivery) {
        if let Some(buffer) = delivery.large.take() {
            self.in_ring -= buffer.capacity();
            self.returned.push(buffer);
        }
        if let Some(blank) = delivery.take_blank() {
            self.returned_blanks.push(blank);
        }
    }

    /// Takes a blank that a read did not need, for the stock.
    pub(crate) fn give_back(&mut self, blank: Blank) {
        self.returned_blanks.push(blank);
    }

    /// Moves `buffer` into a slot being filled.
    pub(crate) fn place(&mut self, delivery: &mut Delivery, buffer: Vec<u8>) {
        self.in_ring += buffer.capacity();
        delivery.len = buffer.len();
        delivery.large = Some(buffer);
    }

    /// True if a buffer of `capacity` bytes may go into the ring now. If the
    /// budget says no, first takes back the buffers of every consumed slot.
    pub(crate) fn admit(&mut self, capacity: usize, ring: &mut Producer<Delivery>) -> bool {
        if !self.fits(capacity) {
            ring.for_each_vacant(|delivery| self.reclaim(delivery));
        }
        self.fits(capacity)
    }

    /// Within the budget; a buffer larger than the whole budget goes alone.
    fn fits(&self, capacity: usize) -> bool {
        self.in_ring == 0 || self.in_ring + capacity <= self.budget
    }
}
