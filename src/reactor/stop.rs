//! Stopping the loop: a drain, not a cut (see the module essay of
//! [`super`]), or, first, a stop that keeps the connections. The hub says
//! how far to go ([`StopLevel`]): stop accepting, stop reading, drain.
//! [`Core::heed_stop`] follows it: [`Core::begin_stop`] closes the
//! listeners, and [`Core::begin_drain`] stops reading, at once or when a
//! stop that kept the connections turns into a drain;
//! [`Core::announce_draining`] delivers `Draining` once the hub asks for
//! the drain itself and the decoders have handed over what they had read;
//! [`Core::enforce_stop_deadline`] resets what is left at the deadline;
//! [`Core::stop_is_done`] says when the loop may end; [`Reactor::fail`]
//! closes everything at once after a failure; [`Reactor::finish`] delivers
//! `Stopped` and hands the last deliveries over.

use std::sync::atomic::Ordering::{Acquire, Release};
use std::time::{Duration, Instant};

use crate::conn::Input;
use crate::message::DeliveryKind;
use crate::shared::{Hub, StopLevel};
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
    /// The connections are drained: no input is read, and each closes once
    /// the consumer has answered `Draining`. Until then (a stop that keeps
    /// the connections) they are served as usual, and the application (or
    /// the peer, or a timeout) closes them.
    pub(super) draining: bool,
    /// How far the hub has asked this loop to stop, as last acted on.
    pub(super) seen: StopLevel,
    /// Every connection has been told to close (the consumer answered
    /// `Draining`, or the deadline came first).
    pub(super) closing_all: bool,
    /// `Draining` was delivered (or needs not be): it goes out once the
    /// connections are drained, the hub asks for the drain itself (the
    /// consumer is ready for it), and the messages decoders already hold are
    /// in the ring.
    pub(super) announced: bool,
}

/// True if `hub` asks the loop, whose stop is `stopping`, to stop further
/// than it has.
pub(super) fn stop_news(hub: &Hub, stopping: Option<&Stopping>) -> bool {
    hub.stop_level() > stopping.map_or(StopLevel::None, |s| s.seen)
}

impl<S: Selector> Reactor<S> {
    /// Reports a failure of the loop (`detail`), then closes everything at
    /// once: connections whose output all went out end with FIN, the others
    /// with a reset. Connections handed to this engine and not opened yet go
    /// to the other engines instead.
    pub(crate) fn fail(&mut self, detail: String) {
        #[cfg(test)]
        if self.core.shared.test_fail_panics.load(Acquire) {
            panic!("reporting the failure failed too (a test)");
        }
        self.core.pass_on_arrivals();
        self.core
            .emit(DeliveryKind::Failed, ConnKey::default(), None, Some(detail));
        let now = Instant::now();
        self.core.begin_stop(now, false);
        self.core.begin_drain(now);
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
        // Run inline, the consumer is this thread: it takes the last
        // deliveries between the turns that hand them over.
        if self.inline {
            return;
        }
        // Keep draining commands meanwhile, so that no Python thread stays
        // blocked on a full command ring.
        while !self.hand_over_last() {
            if self.wait(Some(SHUTDOWN_POLL), &|| false).is_err() {
                break;
            }
        }
        self.discard_commands();
    }

    /// After [`Reactor::finish`]: publishes what the ring can take of the
    /// last deliveries and drops the commands that came meanwhile, so that
    /// no sender stays blocked on a full command ring. True once nothing
    /// is left to hand over.
    pub(crate) fn hand_over_last(&mut self) -> bool {
        self.core.outbox.drain_backlog();
        self.core.publish();
        self.discard_commands();
        !self.core.outbox.has_backlog()
    }

    pub(super) fn discard_commands(&mut self) {
        while self.commands.take_with(|_| ()).is_some() {}
        self.commands.release();
        self.core.shared.command_space.ring();
    }
}

impl<S: Selector> Core<S> {
    /// Follows the hub's stop request as it goes further: begins the stop,
    /// stops reading (at once, or when a stop that kept the connections
    /// turns into a drain), and brings the deadline forward if the hub did.
    pub(super) fn heed_stop(&mut self) {
        let hub = &self.shared.hub;
        let level = hub.stop_level();
        if level <= self.stopping.as_ref().map_or(StopLevel::None, |s| s.seen) {
            return;
        }
        let deadline = hub.stop_deadline();
        self.begin_stop(deadline, true);
        if let Some(stopping) = &mut self.stopping {
            stopping.seen = level;
            stopping.deadline = stopping.deadline.min(deadline);
        }
        if level >= StopLevel::Reading {
            self.begin_drain(deadline);
        }
    }

    /// Stops accepting; the connections are served on until
    /// [`Core::begin_drain`]. `announce` delivers `Draining` once they are
    /// drained, so that the consumer answers `Shutdown` behind its last
    /// replies.
    pub(super) fn begin_stop(&mut self, deadline: Instant, announce: bool) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Stopping {
            deadline,
            overdue: false,
            draining: false,
            seen: StopLevel::None,
            closing_all: false,
            announced: !announce,
        });
        // New connections are refused from here on.
        self.close_listeners();
    }

    /// Drains the connections from now on: no more input is read, and they
    /// are reset at `deadline` if it comes before the stop's.
    pub(super) fn begin_drain(&mut self, deadline: Instant) {
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        if stopping.draining {
            return;
        }
        stopping.draining = true;
        stopping.deadline = stopping.deadline.min(deadline);
        // One-shot registrations stop watching input that will not be read.
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            self.update_interest(key);
        }
    }

    /// At the stop's deadline, or once the stop is cut, resets every
    /// connection still open (see [`Core::abort_all`]). A stop that kept the
    /// connections drains from then on: what their decoders hold is
    /// delivered, nothing more is read.
    pub(super) fn enforce_stop_deadline(&mut self) {
        let cut = self.shared.hub.cut.load(Acquire);
        let Some(stopping) = &mut self.stopping else {
            return;
        };
        let now = Instant::now();
        if now < stopping.deadline && !cut {
            return;
        }
        // Whatever has not finished by now (output, replies the consumer
        // has not made, connections the application has not closed) is
        // cut, and the peers can tell.
        stopping.closing_all = true;
        stopping.overdue = true;
        self.begin_drain(now);
        self.abort_all(cut);
    }

    /// True once the stop has nothing left to wait for, and the loop may
    /// end. A drain waits until every connection has been told to close and
    /// has gone. A stop that keeps the connections waits until the
    /// application has heard of every one closing (lingering ones are let
    /// go, as a drain lets them go), and, `dealing_over`, nothing more can
    /// be handed to this engine: the accepting engine had closed its
    /// listeners before the hand-overs were last taken, so what it had
    /// dealt out has been opened, and is served.
    pub(super) fn stop_is_done(&mut self, dealing_over: bool) -> bool {
        let Some(stopping) = &self.stopping else {
            return false;
        };
        if stopping.draining {
            return stopping.closing_all && self.table.is_empty();
        }
        if !dealing_over || self.table.len() > self.deadlines.lingering_now() {
            return false;
        }
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            self.close_now(key, None);
        }
        true
    }

    /// Delivers `Draining` once the connections are drained, the hub asks
    /// for the drain (until then the consumer may not be ready to close
    /// them: its application hears of the stop first), and no decoder holds
    /// messages it has read but not yet put in the ring (those are still
    /// delivered, ahead of it).
    pub(super) fn announce_draining(&mut self) {
        if self
            .stopping
            .as_ref()
            .is_none_or(|s| s.announced || !s.draining || s.seen < StopLevel::Drain)
        {
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
