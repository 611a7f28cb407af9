//! The send side: [`Sender`] queues commands for the I/O threads from any
//! thread, each to the engine of its connection; [`Ticket`] says when lent
//! bytes are free again.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::framing::Envelope;
use crate::message::{CommandKind, Loan};
use crate::shared::{Hub, SendError, Shared, StopLevel};
use crate::stats::Snapshot;
use crate::token::ConnKey;

/// What a [`Sender`] queues for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// These bytes, behind everything queued before.
    Send(&'a [u8]),
    /// A payload framed for the wire: the envelope's header, the payload,
    /// the envelope's trailer, written as one message.
    SendFramed(&'a Envelope, &'a [u8]),
    /// A graceful close: what is queued goes out, then FIN.
    Close,
    /// A reset at once; what is queued is dropped.
    Abort,
    /// Stop reading the connection.
    PauseReading,
    /// Read it again.
    ResumeReading,
}

/// Queues commands for the I/O threads; cheap to clone, usable from any
/// thread. Each command goes to the engine of its connection.
#[derive(Clone)]
pub struct Sender {
    pub(super) engines: Arc<[Arc<Shared>]>,
}

impl Sender {
    /// The engine that serves `conn`.
    fn engine(&self, conn: ConnKey) -> Result<&Shared, SendError> {
        self.engines
            .get(usize::from(conn.engine))
            .map(|shared| &**shared)
            .ok_or(SendError::Stopped)
    }

    pub(super) fn hub(&self) -> &Hub {
        &self.engines[0].hub
    }

    /// Wakes the consumer if it sleeps, as a delivery would: call it after
    /// making the work its `other_work` checks visible (see
    /// [`Running::wait_unless`](super::Running::wait_unless)).
    pub fn ring_consumer(&self) {
        self.hub().deliveries.ring();
    }

    /// Queues `request` for `conn`. With `wait`, waits for ring space as long
    /// as needed; without, fails with [`SendError::WouldBlock`] instead.
    ///
    /// `latch`, if given, is the connection's "close requested" flag, checked
    /// and set under the ring's lock: a send fails with
    /// [`SendError::Closing`] once a close was queued, and a close sets it. So
    /// every send that succeeds is ordered before the close, and goes out
    /// before the connection's FIN. An abort is queued even after a close (it
    /// cuts the close short).
    pub fn request(
        &self,
        conn: ConnKey,
        request: Request<'_>,
        latch: Option<&AtomicBool>,
        wait: bool,
    ) -> Result<(), SendError> {
        let none: &[u8] = &[];
        let (kind, parts) = match request {
            Request::Send(data) => (CommandKind::Send, [data, none, none]),
            Request::SendFramed(envelope, payload) => (
                CommandKind::Send,
                [envelope.header(), payload, envelope.trailer()],
            ),
            Request::Close => (CommandKind::Close, [none; 3]),
            Request::Abort => (CommandKind::Abort, [none; 3]),
            Request::PauseReading => (CommandKind::PauseReading, [none; 3]),
            Request::ResumeReading => (CommandKind::ResumeReading, [none; 3]),
        };
        self.engine(conn)?
            .push(kind, conn, parts, None, latch, wait)
            .map(|_| ())
    }

    /// Queues, like [`Request::Send`] (or [`Request::SendFramed`] with
    /// `envelope`), a send of `bytes` that the I/O thread writes from where
    /// they are instead of from a copy in the ring: one command, whatever the
    /// size. Returns the [`Ticket`] that says when the bytes are free again.
    ///
    /// # Safety
    /// `bytes` must stay valid and unchanged until
    /// [`has_returned`](Sender::has_returned) says so for the ticket, or until
    /// the I/O thread is gone (the server joined).
    pub unsafe fn lend(
        &self,
        conn: ConnKey,
        envelope: Option<&Envelope>,
        bytes: &[u8],
        latch: Option<&AtomicBool>,
        wait: bool,
    ) -> Result<Ticket, SendError> {
        let (header, trailer) = envelope.map_or((&[][..], &[][..]), |e| (e.header(), e.trailer()));
        // SAFETY: the caller's promise, which `Ticket` lets it keep.
        let loan = unsafe { Loan::new(bytes, header.len()) };
        let position = self.engine(conn)?.push(
            CommandKind::Send,
            conn,
            [header, trailer, &[]],
            Some(loan),
            latch,
            wait,
        )?;
        Ok(Ticket {
            engine: conn.engine,
            position,
        })
    }

    /// True once the I/O thread is done with the bytes lent for `ticket`.
    pub fn has_returned(&self, ticket: Ticket) -> bool {
        self.engines[usize::from(ticket.engine)].has_released(ticket.position)
    }

    /// The server's counters now, all engines together.
    pub fn stats(&self) -> Snapshot {
        self.hub().snapshot()
    }

    /// Queues `data` for `conn` if that can be done without waiting.
    pub fn try_send(&self, conn: ConnKey, data: &[u8]) -> Result<(), SendError> {
        self.request(conn, Request::Send(data), None, false)
    }

    /// Queues `data` for `conn`, waiting for ring space as long as needed.
    pub fn send(&self, conn: ConnKey, data: &[u8]) -> Result<(), SendError> {
        self.request(conn, Request::Send(data), None, true)
    }

    /// Asks for `conn` to be closed once what is queued for it is sent,
    /// waiting for ring space as long as needed.
    pub fn close(&self, conn: ConnKey) -> Result<(), SendError> {
        self.request(conn, Request::Close, None, true)
    }

    /// Asks the I/O threads to shut down, draining the connections: they
    /// stop accepting and reading, deliver what they had read, announce
    /// `Draining`, and close each connection once the consumer has answered
    /// it and the replies queued for it have gone out; what is still open
    /// after `timeout` is reset. Safe from any thread, any time. The first
    /// stop's timeout stands, but a stop that had not gone as far
    /// ([`Sender::stop_accepting`], [`Sender::stop_reading`]) becomes this
    /// drain by its own deadline or `timeout` from now, whichever comes
    /// first.
    pub fn stop(&self, timeout: Duration) {
        self.stop_at(timeout, StopLevel::Drain);
    }

    /// Asks the I/O threads to stop as [`Sender::stop`] does, but to hold
    /// the connections open, once what they had read is delivered, until
    /// [`Sender::stop`] follows (or `timeout` resets them): for a consumer
    /// that has to hear of the stop before any connection closes for it.
    pub fn stop_reading(&self, timeout: Duration) {
        self.stop_at(timeout, StopLevel::Reading);
    }

    /// Asks the I/O threads to stop accepting (the listeners close) and to
    /// keep serving the open connections, reading, delivering and writing
    /// as usual, until each has closed (whoever closed it); what is still
    /// open after `timeout` is reset. They end once every connection has
    /// closed. Safe from any thread, any time; after a stop it does nothing.
    pub fn stop_accepting(&self, timeout: Duration) {
        self.stop_at(timeout, StopLevel::Accepting);
    }

    /// Raises the stop to `level` and wakes the engines to act on it. An
    /// engine run inline that is not turning now (its consumer is in a
    /// callback) gets a turn from this thread, so that its listeners close
    /// now, not once the callback returns.
    fn stop_at(&self, timeout: Duration, level: StopLevel) {
        self.hub().stop(timeout, level);
        for engine in self.engines.iter() {
            engine.poll_inline(false);
        }
    }

    /// A handle that does not keep the server's rings alive.
    pub fn downgrade(&self) -> WeakSender {
        WeakSender {
            engines: Arc::downgrade(&self.engines),
        }
    }

    /// Makes I/O thread `engine` panic (tests of the failure path).
    #[cfg(test)]
    pub(crate) fn inject_panic(&self, engine: usize) {
        self.inject(engine, CommandKind::Panic);
    }

    /// Queues a test-only command (`Panic`, `Hold`) for I/O thread `engine`.
    #[cfg(test)]
    pub(crate) fn inject(&self, engine: usize, kind: CommandKind) {
        self.engines[engine]
            .push(kind, ConnKey::default(), [&[]; 3], None, None, true)
            .expect("server running");
    }
}

/// Says when bytes lent with [`Sender::lend`] are free again: the command's
/// engine and ring position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    engine: u16,
    position: usize,
}

impl Ticket {
    /// The engine whose command ring carries the loan, counting from 0.
    /// One engine releases its commands in ring order, so its tickets return
    /// in the order they were issued.
    pub fn engine(&self) -> usize {
        usize::from(self.engine)
    }
}

/// A [`Sender`] that lets the server's memory go when the server ends: what
/// handles held by the application (one per connection) keep.
#[derive(Clone)]
pub struct WeakSender {
    engines: Weak<[Arc<Shared>]>,
}

impl WeakSender {
    /// The sender, unless the server has ended.
    pub fn upgrade(&self) -> Option<Sender> {
        self.engines.upgrade().map(|engines| Sender { engines })
    }
}
