//! Stopping the loop: a drain, not a cut (see the module essay of
//! [`super`]). [`Core::begin_stop`] closes the listeners and stops reading;
//! [`Core::announce_draining`] delivers `Draining` once the decoders have handed
//! over what they had read; [`Reactor::fail`] closes everything at once after
//! a failure; [`Reactor::finish`] delivers `Stopped` and hands the last
//! deliveries over.

use std::sync::atomic::Ordering::Release;
use std::time::{Duration, Instant};

use crate::conn::Input;
use crate::message::DeliveryKind;
use crate::sys::Selector;
use crate::token::ConnKey;

use super::{Core, Reactor};

/// The I/O thread's wait while it cannot hand its last deliveries over.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// A stop under way.
pub(super) struct Stopping {
    /// When the connections not yet closed are reset (those whose decoders
    /// still hold messages once these are in the ring).
    pub(super) deadline: Instant,
    /// The deadline has passed and been acted on: from then on the loop
    /// waits for the consumer, not for the clock.
    pub(super) overdue: bool,
    /// Every connection has been told to close (the consumer answered
    /// `Draining`, or the deadline came first).
    pub(super) closing_all: bool,
    /// `Draining` was delivered (or needs not be): it goes out once the
    /// messages decoders already hold are in the ring.
    pub(super) announced: bool,
}

impl<S: Selector> Reactor<S> {
    /// Reports a failure of the loop (`detail`), then closes everything at
    /// once: connections whose output all went out end with FIN, the others
    /// with a reset. Connections handed to this engine and not opened yet go
    /// to the other engines instead.
    pub(crate) fn fail(&mut self, detail: String) {
        self.core.pass_on_arrivals();
        self.core
            .emit(DeliveryKind::Failed, ConnKey::default(), None, Some(detail));
        self.core.begin_stop(Instant::now(), false);
        self.core.close_all();
        self.core.abort_all(true);
        self.finish();
    }

    /// Every connection is gone: deliver `Stopped` and hand the last
    /// deliveries over.
    pub(super) fn finish(&mut self) {
        self.core.deadlines.clear_lingering();
        self.core.ready.clear();
        self.core.shared.stats().publish(&self.core.counters);
        // From here on, senders give up instead of waiting for ring space.
        self.core.shared.finished.store(true, Release);
        // And the accepting engine serves what it would have handed over.
        self.core.shared.close_arrivals();
        self.core
            .emit(DeliveryKind::Stopped, ConnKey::default(), None, None);
        // Keep draining commands meanwhile, so that no Python thread stays
        // blocked on a full command ring.
        loop {
            self.core.outbox.drain_backlog();
            self.core.publish();
            if !self.core.outbox.has_backlog() {
                break;
            }
            self.discard_commands();
            if self.wait(Some(SHUTDOWN_POLL)).is_err() {
                break;
            }
        }
        self.discard_commands();
    }

    pub(super) fn discard_commands(&mut self) {
        while self.commands.take_with(|_| ()).is_some() {}
        self.commands.release();
        self.core.shared.command_space.ring();
    }
}

impl<S: Selector> Core<S> {
    /// Stops accepting and reading. `announce` delivers `Draining` so that
    /// the consumer answers `Shutdown` behind its last replies.
    pub(super) fn begin_stop(&mut self, deadline: Instant, announce: bool) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Stopping {
            deadline,
            overdue: false,
            closing_all: false,
            announced: !announce,
        });
        // New connections are refused from here on.
        self.close_listeners();
        // One-shot registrations stop watching input that will not be read.
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            self.update_interest(key);
        }
    }

    /// Delivers `Draining` once a stop has begun and no decoder holds
    /// messages it has read but not yet put in the ring (those are still
    /// delivered, ahead of it).
    pub(super) fn announce_draining(&mut self) {
        if self.stopping.as_ref().is_none_or(|s| s.announced) {
            return;
        }
        let holding = self
            .table
            .connections()
            .any(|conn| conn.input() == Input::Deliver && conn.holds_messages());
        if !holding {
            if let Some(stopping) = &mut self.stopping {
                stopping.announced = true;
            }
            // Names this engine: its connections are the ones closing.
            let engine = ConnKey {
                engine: self.shared.engine,
                ..ConnKey::default()
            };
            self.emit(DeliveryKind::Draining, engine, None, None);
        }
    }
}
