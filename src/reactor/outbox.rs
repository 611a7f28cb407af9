//! The delivery side: each connection's share of the ring, the bytes in
//! flight, control deliveries that wait in a backlog when the ring is full
//! (so that nothing is reordered), and publishing to the consumer.
//!
//! [`Outbox`] owns the delivery ring's producer and everything that decides
//! what may go into it. It never sees the connection table: where a
//! connection's count of deliveries in the ring changes, it says so through
//! a callback (see [`Outbox::settle`]), so that it can be tested on a bare
//! ring, without sockets.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::blank::{Blank, BlankStock};
use crate::config::Config;
use crate::framing::Framing;
use crate::inbound::{LargeMessages, RingAccount};
use crate::message::{Delivery, DeliveryKind, Opened};
use crate::pool::BufferPool;
use crate::ring::Producer;
use crate::stats::Counters;
use crate::sys::Selector;
use crate::token::ConnKey;

use super::{Core, LARGE_READ, MIN_RING_SHARE, RING_SHARE_DIVISOR, SMALLEST_ASSEMBLY};

/// A control delivery waiting for ring space.
pub(super) struct Pending {
    pub(super) kind: DeliveryKind,
    pub(super) conn: ConnKey,
    pub(super) opened: Option<Opened>,
    pub(super) detail: Option<String>,
}

/// The delivery ring's producer and what governs it; see the module docs.
pub(super) struct Outbox {
    ring: Producer<Delivery>,
    /// Control deliveries that found the ring full.
    backlog: VecDeque<Pending>,
    /// Data deliveries in the ring, oldest first: the producer position of
    /// each, its connection and its payload bytes, to keep each connection's
    /// share and the bytes in the ring exact.
    in_flight: VecDeque<(usize, ConnKey, usize)>,
    /// Payload bytes of the data deliveries in the ring (the third field of
    /// `in_flight`), and the most raw reads may bring it to: the ring's own
    /// size, so that spilled reads do not raise what the ring holds.
    bytes: usize,
    byte_cap: usize,
    /// The most data deliveries one connection may have in the ring.
    share: u32,
    /// Largest message that travels in a slot's own buffer.
    slot_size: usize,
    /// The consumer's release count as of the last [`Outbox::settle`]: what
    /// `in_flight`, `bytes` and each connection's count of deliveries in the
    /// ring say, and so what a decision to wait for the consumer was based on.
    settled_at: usize,
    /// Input waits for the consumer to release slots, though some are free: a
    /// large message over the budget of buffers in the ring, or a connection
    /// at its share of the ring. The release count that decision saw
    /// (`settled_at`), not a later one: a release after it may already have
    /// made the room, and the consumer, with nothing left to take, would
    /// release nothing more.
    consumer_blocked_at: Option<usize>,
    /// The budget had no room for a spill buffer: the consumer's release
    /// count then (see [`Outbox::may_spill`]).
    spill_blocked_at: Option<usize>,
    /// Buffers of messages larger than a slot.
    large: LargeMessages,
    /// Raw mode: the size of the buffer a read that fills its slot goes on
    /// into ([`LARGE_READ`]); 0 where reads do not spill.
    spill_size: usize,
}

/// What staging a data delivery needs, lent out together with the buffer
/// pool (see [`Outbox::with_pool`]): a decoder borrows the pool while its
/// sink stages the messages it cuts.
pub(super) struct Staging<'a> {
    ring: &'a mut Producer<Delivery>,
    backlog: &'a VecDeque<Pending>,
    account: &'a mut RingAccount,
    in_flight: &'a mut VecDeque<(usize, ConnKey, usize)>,
    bytes: &'a mut usize,
}

impl Outbox {
    /// The outbox of a loop configured by `config`, producing into `ring`,
    /// with the consumer's `blanks` for raw reads.
    pub(super) fn new(
        config: &Config,
        ring: Producer<Delivery>,
        blanks: Arc<BlankStock>,
    ) -> Outbox {
        let spill_size = match config.framing {
            Framing::Raw if config.slot_size < LARGE_READ => LARGE_READ,
            _ => 0,
        };
        Outbox {
            ring,
            backlog: VecDeque::with_capacity(64),
            in_flight: VecDeque::with_capacity(config.ring_slots),
            bytes: 0,
            byte_cap: config.ring_slots * config.slot_size,
            share: (config.ring_slots / RING_SHARE_DIVISOR).max(MIN_RING_SHARE) as u32,
            slot_size: config.slot_size,
            settled_at: 0,
            consumer_blocked_at: None,
            spill_blocked_at: None,
            large: LargeMessages::new(
                SMALLEST_ASSEMBLY.min(config.slot_size),
                match config.framing {
                    Framing::Raw => spill_size,
                    _ => config.max_message_size,
                },
                // As many bytes as the ring carries in its own slots, and in
                // the framed modes room for two of the largest messages.
                match config.framing {
                    Framing::Raw => config.ring_slots * config.slot_size,
                    _ => (config.ring_slots * config.slot_size).max(2 * config.max_message_size),
                },
                config.ring_slots,
                blanks,
            ),
            spill_size,
        }
    }

    /// True if a data delivery may go into the ring now: no control delivery
    /// waits, and a slot is free.
    #[inline]
    pub(super) fn has_slot(&mut self) -> bool {
        self.backlog.is_empty() && self.ring.free() > 0
    }

    /// True if the consumer has taken and released every delivery put in
    /// the ring so far, and none waits in the backlog.
    #[inline]
    pub(super) fn all_taken(&mut self) -> bool {
        self.backlog.is_empty() && self.ring.is_drained()
    }

    /// True if control deliveries wait for ring space.
    #[inline]
    pub(super) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// True if the ring can take what waits: it has free slots, and input
    /// blocked on the consumer has seen the consumer move on.
    #[inline]
    pub(super) fn has_room(&mut self) -> bool {
        self.ring.free() > 0
            && self
                .consumer_blocked_at
                .is_none_or(|at| self.ring.released() != at)
    }

    /// The most data deliveries one connection may have in the ring.
    #[inline]
    pub(super) fn share(&self) -> u32 {
        self.share
    }

    /// True if `key`, which holds `held` deliveries in the ring (`None`: it
    /// is gone), may put another there: it holds less than its share.
    /// Otherwise the consumer must move on first, and the loop waits for it
    /// (see `consumer_blocked_at`), serving other connections. `released`
    /// is told of each delivery the consumer has released, as in
    /// [`Outbox::settle`].
    #[inline]
    pub(super) fn has_share(
        &mut self,
        key: ConnKey,
        held: Option<u32>,
        mut released: impl FnMut(ConnKey),
    ) -> bool {
        if held.is_some_and(|held| held < self.share) {
            return true;
        }
        let mut held = held;
        self.settle(|done| {
            if done == key {
                held = held.map(|held| held - 1);
            }
            released(done);
        });
        if held.is_some_and(|held| held < self.share) {
            return true;
        }
        self.block();
        false
    }

    /// Forgets the deliveries the consumer has released, telling `released`
    /// the connection of each, so that each connection's count of
    /// deliveries in the ring stays exact.
    pub(super) fn settle(&mut self, mut released: impl FnMut(ConnKey)) {
        let done = self.ring.released();
        self.settled_at = done;
        while let Some(&(position, key, len)) = self.in_flight.front() {
            // Positions wrap: compare distances, not values.
            if done.wrapping_sub(position) as isize <= 0 {
                break;
            }
            self.in_flight.pop_front();
            self.bytes -= len;
            released(key);
        }
    }

    /// Input waits for the consumer to release a slot (see
    /// [`Outbox::has_room`]): one it had not released when the outbox last
    /// settled, since that is what the decision to wait was based on.
    /// Reloading the count here instead would lose a release that came in
    /// between, and the loop would sleep waiting for another one, which a
    /// consumer that has taken everything never makes.
    #[inline]
    pub(super) fn block(&mut self) {
        self.consumer_blocked_at = Some(self.settled_at);
    }

    /// Forgets that input waited for the consumer, once it has moved on.
    pub(super) fn unblock(&mut self) {
        if self
            .consumer_blocked_at
            .is_some_and(|at| self.ring.released() != at)
        {
            self.consumer_blocked_at = None;
        }
    }

    /// How many more payload bytes raw reads may put in the ring now, within
    /// the ring's own size: at least a slot's worth, or 0. At 0 the loop
    /// waits for the consumer, as for a full ring (see `consumer_blocked_at`),
    /// rather than cut reads smaller than a slot. `released` as in
    /// [`Outbox::settle`].
    #[inline]
    pub(super) fn ring_room(&mut self, released: impl FnMut(ConnKey)) -> usize {
        if self.bytes + self.slot_size > self.byte_cap {
            self.settle(released);
        }
        let room = self.byte_cap.saturating_sub(self.bytes);
        if room < self.slot_size {
            self.block();
            return 0;
        }
        room
    }

    /// Raw mode: the size of the buffer a read that fills its slot goes on
    /// into; 0 where reads do not spill.
    #[inline]
    pub(super) fn spill_size(&self) -> usize {
        self.spill_size
    }

    /// True if a read that fills its slot may go on into a spill buffer: the
    /// budget of buffers in the ring has room. When it has none, the check
    /// (which takes back consumed slots' buffers) waits for the consumer to
    /// move on before it runs again, so that it does not scan the ring at
    /// every read.
    #[inline]
    pub(super) fn may_spill(&mut self) -> bool {
        if self.spill_size == 0 {
            return false;
        }
        if let Some(at) = self.spill_blocked_at {
            if self.ring.released() == at {
                return false;
            }
            self.spill_blocked_at = None;
        }
        let admitted = self.large.account.admit(self.spill_size, &mut self.ring);
        // What the check took back goes to the pool now, to serve this very
        // spill: left for the read's own settle, it would make the pool
        // allocate a buffer beyond the budget, and free one (over its cap)
        // when they all come back, again and again in steady traffic.
        self.large.settle();
        if !admitted {
            self.spill_blocked_at = Some(self.ring.released());
        }
        admitted
    }

    /// A blank of the consumer's to read into, if its stock has one (see
    /// `blank.rs`).
    #[inline]
    pub(super) fn take_blank(&self) -> Option<Blank> {
        self.large.blanks.take()
    }

    /// Runs `f` with the buffer pool and what staging data deliveries needs,
    /// then gives the buffers taken out of reused slots back to the pool.
    #[inline]
    pub(super) fn with_pool<R>(&mut self, f: impl FnOnce(&mut BufferPool, Staging<'_>) -> R) -> R {
        let LargeMessages { pool, account, .. } = &mut self.large;
        let staging = Staging {
            ring: &mut self.ring,
            backlog: &self.backlog,
            account,
            in_flight: &mut self.in_flight,
            bytes: &mut self.bytes,
        };
        let result = f(pool, staging);
        self.large.settle();
        result
    }

    /// The buffer pool, for a decoder that gives its buffers back.
    pub(super) fn pool(&mut self) -> &mut BufferPool {
        &mut self.large.pool
    }

    /// Deliveries staged and not yet published.
    #[inline]
    pub(super) fn staged(&self) -> usize {
        self.ring.staged()
    }

    /// Queues a control delivery, behind any that already wait.
    pub(super) fn emit(&mut self, pending: Pending) {
        if self.backlog.is_empty() {
            if let Some(pending) = self.try_deliver(pending) {
                self.backlog.push_back(pending);
            }
        } else {
            self.backlog.push_back(pending);
        }
    }

    /// Puts `pending` in a ring slot, or hands it back if the ring is full.
    pub(super) fn try_deliver(&mut self, pending: Pending) -> Option<Pending> {
        let Some(mut slot) = self.ring.vacant() else {
            return Some(pending);
        };
        let account = &mut self.large.account;
        slot.with_mut(|delivery| {
            account.reclaim(delivery);
            delivery.kind = pending.kind;
            delivery.conn = pending.conn;
            delivery.opened = pending.opened;
            delivery.detail = pending.detail;
            delivery.len = 0;
        });
        slot.stage();
        // A blank the consumer left in the slot goes back to the stock now,
        // not at the next read, which may never come.
        self.large.settle();
        None
    }

    /// Delivers the control deliveries that wait, in order, as far as the
    /// ring has room.
    pub(super) fn drain_backlog(&mut self) {
        while let Some(pending) = self.backlog.pop_front() {
            if let Some(pending) = self.try_deliver(pending) {
                self.backlog.push_front(pending);
                return;
            }
        }
    }

    /// Makes staged deliveries visible, noting the ring's high water in
    /// `counters`. True if there were any: the consumer must be woken.
    #[inline]
    pub(super) fn publish(&mut self, counters: &mut Counters) -> bool {
        if self.ring.staged() == 0 {
            return false;
        }
        let held = (self.ring.capacity() - self.ring.free()) as u64;
        counters.ring_high_water = counters.ring_high_water.max(held);
        self.ring.publish();
        true
    }
}

impl Staging<'_> {
    /// True if a data delivery may go into the ring now (see
    /// [`Outbox::has_slot`]).
    #[inline]
    pub(super) fn has_slot(&mut self) -> bool {
        self.backlog.is_empty() && self.ring.free() > 0
    }

    /// True if a buffer of `capacity` bytes may go into the ring now, within
    /// the budget of buffers in the ring.
    #[inline]
    pub(super) fn admit(&mut self, capacity: usize) -> bool {
        self.account.admit(capacity, self.ring)
    }

    /// Fills a vacant slot with a data delivery of `key`: `fill` gets the
    /// delivery (kind and connection set, the buffer it held taken back) and
    /// the account of buffers in the ring, writes the payload, and returns
    /// its length if the delivery is to go out (`None` leaves the slot
    /// free), along with what it wants to tell. The caller has checked
    /// [`Staging::has_slot`].
    #[inline]
    pub(super) fn stage<R>(
        &mut self,
        key: ConnKey,
        fill: impl FnOnce(&mut Delivery, &mut RingAccount) -> (Option<usize>, R),
    ) -> R {
        let mut slot = self.ring.vacant().expect("free() > 0");
        let account = &mut *self.account;
        let (len, told) = slot.with_mut(|delivery| {
            account.reclaim(delivery);
            delivery.kind = DeliveryKind::Data;
            delivery.conn = key;
            delivery.opened = None;
            delivery.detail = None;
            fill(delivery, account)
        });
        if let Some(len) = len {
            self.in_flight.push_back((slot.position(), key, len));
            *self.bytes += len;
            slot.stage();
        }
        told
    }
}

impl<S: Selector> Core<S> {
    /// True if `key` may put another delivery in the ring (see
    /// [`Outbox::has_share`]).
    #[inline]
    pub(super) fn has_share(&mut self, key: ConnKey) -> bool {
        let held = self.table.get(key).map(|conn| conn.in_ring());
        let table = &mut self.table;
        self.outbox.has_share(key, held, |done| {
            if let Some(conn) = table.get_mut(done) {
                conn.released();
            }
        })
    }

    /// Forgets the deliveries the consumer has released (see
    /// [`Outbox::settle`]).
    pub(super) fn settle(&mut self) {
        let table = &mut self.table;
        self.outbox.settle(|done| {
            if let Some(conn) = table.get_mut(done) {
                conn.released();
            }
        });
    }

    /// How many more payload bytes raw reads may put in the ring now (see
    /// [`Outbox::ring_room`]).
    #[inline]
    pub(super) fn ring_room(&mut self) -> usize {
        let table = &mut self.table;
        self.outbox.ring_room(|done| {
            if let Some(conn) = table.get_mut(done) {
                conn.released();
            }
        })
    }

    /// Counts a control delivery and queues it, behind any that already wait.
    pub(super) fn emit(
        &mut self,
        kind: DeliveryKind,
        conn: ConnKey,
        opened: Option<Opened>,
        detail: Option<String>,
    ) {
        match kind {
            DeliveryKind::Opened => self.counters.connections_accepted += 1,
            DeliveryKind::Closed(reason) => self.counters.closed(reason),
            _ => {}
        }
        self.outbox.emit(Pending {
            kind,
            conn,
            opened,
            detail,
        });
    }

    /// Makes staged deliveries visible and wakes the Python thread if it sleeps.
    #[inline]
    pub(super) fn publish(&mut self) {
        if self.outbox.publish(&mut self.counters) {
            self.shared.hub.deliveries.ring();
        }
    }
}

#[cfg(test)]
mod tests;
