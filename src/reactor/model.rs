//! The delivery side of the loop, [`Outbox`], for `tests/loom.rs`: built
//! only under `--cfg loom`, so that the model checker drives the shipped
//! code that decides when the I/O thread must wait for the consumer, not a
//! copy of it.

use crate::config::Config;
use crate::message::Delivery;
use crate::ring::Producer;
use crate::stats::Counters;
use crate::token::ConnKey;

use super::outbox::Outbox;

/// A raw-mode loop's [`Outbox`], with one connection's reads.
pub struct LoomOutbox(Outbox);

impl LoomOutbox {
    /// The outbox of a raw-mode loop whose delivery ring is `ring`'s, of
    /// slots of `slot_size` bytes.
    pub fn new(slot_size: usize, ring: Producer<Delivery>) -> LoomOutbox {
        let config = Config {
            ring_slots: ring.capacity(),
            slot_size,
            ..Config::default()
        };
        LoomOutbox(Outbox::new(&config, ring, Default::default()))
    }

    /// As a raw read asks before it reads: a free slot, and how many payload
    /// bytes the ring may take (0: wait for the consumer, as
    /// `Outbox::ring_room` says).
    pub fn room(&mut self) -> usize {
        if !self.0.has_slot() {
            return 0;
        }
        self.0.ring_room(|_| {})
    }

    /// Stages a data delivery of `len` payload bytes, as a read of that many
    /// (a spilled read may bring more than a slot's own buffer holds).
    pub fn stage(&mut self, len: usize) {
        self.0.with_pool(|_, mut staging| {
            staging.stage(ConnKey::default(), |delivery, _| {
                delivery.len = len;
                (Some(len), ())
            });
        });
    }

    /// Publishes what is staged; true if there was anything.
    pub fn publish(&mut self) -> bool {
        self.0.publish(&mut Counters::default())
    }

    /// True if what waits may go on (see `Outbox::has_room`): the loop
    /// sleeps, stalled, only while this is false.
    pub fn has_room(&mut self) -> bool {
        self.0.has_room()
    }
}
