//! The delivery side: each connection's share of the ring, the bytes in
//! flight, control deliveries that wait in a backlog when the ring is full
//! (so that nothing is reordered), and publishing to the consumer.

use crate::message::{Delivery, DeliveryKind, Opened};
use crate::ring::Producer;
use crate::sys::Selector;
use crate::token::ConnKey;

use super::Io;

/// A control delivery waiting for ring space.
pub(super) struct Pending {
    pub(super) kind: DeliveryKind,
    pub(super) conn: ConnKey,
    pub(super) opened: Option<Opened>,
    pub(super) detail: Option<String>,
}

impl<S: Selector> Io<S> {
    /// True if `key` may put another delivery in the ring: it holds less than
    /// its share. Otherwise the consumer must move on first, and the loop
    /// waits for it (see `consumer_blocked_at`), serving other connections.
    pub(super) fn has_share(&mut self, key: ConnKey) -> bool {
        let below = |io: &Self| {
            io.table
                .get(key)
                .is_some_and(|c| c.in_ring() < io.ring_share)
        };
        if below(self) {
            return true;
        }
        self.settle_in_flight();
        if below(self) {
            return true;
        }
        self.consumer_blocked_at = Some(self.deliveries.released());
        false
    }

    /// Forgets the deliveries the consumer has released, so that each
    /// connection's count of deliveries in the ring is exact.
    pub(super) fn settle_in_flight(&mut self) {
        let released = self.deliveries.released();
        while let Some(&(position, key, len)) = self.in_flight.front() {
            // Positions wrap: compare distances, not values.
            if released.wrapping_sub(position) as isize <= 0 {
                break;
            }
            self.in_flight.pop_front();
            self.ring_bytes -= len;
            if let Some(conn) = self.table.get_mut(key) {
                conn.released();
            }
        }
    }

    /// Queues a control delivery, behind any that already wait.
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
        let pending = Pending {
            kind,
            conn,
            opened,
            detail,
        };
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
        let Some(mut slot) = self.deliveries.vacant() else {
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
        None
    }

    pub(super) fn drain_backlog(&mut self) {
        while let Some(pending) = self.backlog.pop_front() {
            if let Some(pending) = self.try_deliver(pending) {
                self.backlog.push_front(pending);
                return;
            }
        }
    }

    /// Makes staged deliveries visible and wakes the Python thread if it sleeps.
    pub(super) fn publish(&mut self) {
        if self.deliveries.staged() > 0 {
            let held = (self.deliveries.capacity() - self.deliveries.free()) as u64;
            self.counters.ring_high_water = self.counters.ring_high_water.max(held);
            self.deliveries.publish();
            self.shared.hub.deliveries.ring();
        }
    }
}

/// True if the delivery ring can take what waits: it has free slots, and
/// input blocked on the consumer (`blocked_at`: its release count then) has
/// seen the consumer move on.
pub(super) fn ring_has_room(
    deliveries: &mut Producer<Delivery>,
    blocked_at: Option<usize>,
) -> bool {
    deliveries.free() > 0 && blocked_at.is_none_or(|at| deliveries.released() != at)
}
