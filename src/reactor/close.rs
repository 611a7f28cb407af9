//! Ending connections: a graceful close drains the queue, sends FIN, and
//! lingers until the peer's EOF so that unread input cannot turn it into a
//! reset; an abort resets at once. Every path ends in [`Core::close_now`], the
//! one place a socket is deregistered and dropped and `Closed` reported.

use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::close_reason::CloseReason;
use crate::conn::Input;
use crate::message::DeliveryKind;
use crate::sys::Selector;
use crate::token::ConnKey;

use super::Core;

/// How long a closed connection waits for the peer's EOF before it is dropped.
const LINGER: Duration = Duration::from_secs(5);

impl<S: Selector> Core<S> {
    /// Starts a graceful close: the queue drains, then FIN.
    pub(super) fn close(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.begin_close(reason) {
            self.flush(key);
        }
    }

    /// Resets the connection at once, dropping what is queued.
    pub(super) fn abort(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let reason = conn.closing_reason().unwrap_or(reason);
        // A zero linger time makes close() send RST and drop unsent data.
        let _ = conn.socket().set_linger(Some(Duration::ZERO));
        self.close_now(key, Some(reason));
    }

    /// The queue is empty: send FIN and tell the application. While serving
    /// (a stop that keeps the connections too), linger until the peer's EOF
    /// so that unread input cannot turn the close into a reset; while
    /// draining, close at once.
    pub(super) fn finish_close(&mut self, key: ConnKey) {
        let draining = self.draining();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if let Err(e) = conn.socket().shutdown(Shutdown::Write) {
            return self.close_now(key, Some(CloseReason::of_error(&e)));
        }
        if draining {
            let reason = conn.closing_reason();
            self.discard_input(key);
            return self.close_now(key, reason);
        }
        let deadline = Instant::now() + LINGER;
        let Some(reason) = conn.linger(deadline) else {
            return;
        };
        self.deadlines.linger(key, deadline);
        self.emit(DeliveryKind::Closed(reason), key, None, None);
        self.discard_input(key);
        self.update_interest(key);
    }

    /// Closes the socket now and reports `Closed(reason)`, unless the
    /// application already had it (a lingering connection) or `reason` is
    /// `None`.
    pub(super) fn close_now(&mut self, key: ConnKey, reason: Option<CloseReason>) {
        let Some(mut conn) = self.table.remove(key) else {
            return;
        };
        self.shared.hub.open.fetch_sub(1, Relaxed);
        let _ = self.selector.deregister(conn.socket());
        conn.clear_decoder(self.outbox.pool());
        let reported = conn.reported_closed();
        if reported {
            self.deadlines.stopped_lingering();
        }
        drop(conn);
        if let (Some(reason), false) = (reason, reported) {
            self.emit(DeliveryKind::Closed(reason), key, None, None);
        }
    }

    /// Asks every connection to close; called once the consumer answered
    /// `Draining` (or the stop deadline passed).
    pub(super) fn close_all(&mut self) {
        match &mut self.stopping {
            Some(stopping) if !stopping.closing_all => stopping.closing_all = true,
            _ => return,
        }
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            let Some(conn) = self.table.get_mut(key) else {
                continue;
            };
            if conn.reported_closed() {
                self.close_now(key, None);
            } else if conn.closing_reason().is_some() {
                // Already closing: it goes on, and finishes now if drained.
                self.flush(key);
            } else if !conn.accepts_output() {
                // Its output failed: what it sent will not be delivered now.
                self.close_now(key, Some(CloseReason::Reset));
            } else {
                self.close_or_cut(key, CloseReason::Shutdown);
            }
        }
    }

    /// Resets every connection still open (the stop deadline passed with
    /// their output not all sent).
    ///
    /// Unless `cut`, a connection whose decoder still holds messages it read
    /// before the stop is spared until they are in the ring: the deadline
    /// cuts output, never input already read. Called every turn after the
    /// deadline, it resets such a connection once its messages have gone.
    pub(super) fn abort_all(&mut self, cut: bool) {
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            match self.table.get(key) {
                // FIN went out after all of its output: close it quietly.
                Some(conn) if conn.reported_closed() => self.close_now(key, None),
                Some(conn) if !cut && conn.input() == Input::Deliver && conn.holds_messages() => {}
                Some(_) => self.abort(key, CloseReason::Shutdown),
                None => {}
            }
        }
    }

    /// Closes `key` for `reason` on this thread's own initiative: gracefully,
    /// unless it is in the middle of sending a message, which only a reset
    /// can tell the peer.
    pub(super) fn close_or_cut(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.is_mid_message() {
            self.abort(key, reason);
        } else {
            self.close(key, reason);
        }
    }

    pub(super) fn expire_lingering(&mut self) {
        let now = Instant::now();
        while let Some((deadline, key)) = self.deadlines.lingered(now) {
            if let Some(conn) = self.table.get_mut(key) {
                if conn.phase() == (crate::conn::Phase::Lingering { deadline }) {
                    self.close_now(key, None);
                }
            }
        }
    }
}
