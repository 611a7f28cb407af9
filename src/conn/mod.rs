//! The I/O thread's connection table: each open socket with its write queue
//! and where it is in its life.
//!
//! Only the I/O thread touches this table, and only the I/O thread closes
//! sockets, always deregistering them first. The Python side refers to a
//! connection by [`ConnKey`] (slot index plus unique id); a key whose id no
//! longer matches the slot's tenant is stale and resolves to nothing, so a
//! message for a closed connection can never reach the next connection that gets
//! the same slot or the same fd number.
//!
//! A connection's life is a small state machine, and this module is the one
//! place that says which transitions exist ([`Connection::peer_finished`],
//! [`Connection::begin_close`], [`Connection::write_failed`],
//! [`Connection::linger`]). The reactor performs the I/O and asks the
//! connection what follows:
//!
//! ```text
//!            EOF read                  close / error / timeout
//!   Open ───────────────▶ PeerDone ─────────────────────────────┐
//!    │ │                                                         ▼
//!    │ └──── close / error / timeout ─────────────────────▶ Closing ──queue empty, FIN──▶ Lingering ──EOF or deadline──▶ gone
//!    │                                                          (`Closed` delivered when it enters Lingering)
//!    ├── a send failed (peer reset) ──▶ WriteFailed ──input read to its end──▶ gone (`Closed`: reset)
//!    └── the framing broke ──▶ InputFailed ──the application closes──▶ Closing
//! ```
//!
//! Besides its phase, a connection keeps the reactor's bookkeeping (its place
//! on the ready list, its clocks, its share of the delivery ring, whether a
//! message is half sent); its fields are private, and the reactor asks and
//! tells through methods. The write queue and the watermarks are in
//! [`queue`], the table in [`table`].
//!
//! The watermarks' crossings ([`Connection::check_watermarks`]) are what the
//! application hears as writing paused and resumed; they alternate. A
//! connection that ends while paused drops its queue without a crossing
//! ([`Connection::write_failed`], an abort): the application hears `Closed`
//! and no resume, as asyncio calls no `resume_writing` after
//! `connection_lost`. A graceful close drains the queue first, so its resume
//! comes before its `Closed`.

use std::time::{Duration, Instant};

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::framing::Decoder;
use crate::message::PendingBytes;
use crate::pool::BufferPool;
use crate::sys::Interest;

mod queue;
mod table;
#[cfg(test)]
mod tests;

pub use queue::{Crossing, Watermarks, WriteQueue};
pub use table::ConnectionTable;

/// Where a connection is in its life; see the module docs for the diagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading and writing.
    Open,
    /// The peer shut down its side; `Eof` was delivered and the application
    /// will ask for the close once it has answered what came before it. Only
    /// a reset can still arrive.
    PeerDone,
    /// The application (or a limit, a timeout, the shutdown) asked for a
    /// close: input is discarded, the write queue drains, then the sending
    /// side is shut down.
    Closing {
        /// What the application will be told.
        reason: CloseReason,
        /// The peer's EOF was read already: there is nothing left to discard.
        peer_eof: bool,
    },
    /// Closed as far as the application knows (`Closed` was delivered). The
    /// socket lingers, reading and discarding until the peer's EOF or the
    /// deadline, so that unread input cannot make the kernel reset the
    /// connection and destroy the reply the peer has not read yet.
    Lingering {
        /// When to give up waiting for the peer's EOF.
        deadline: Instant,
    },
    /// A send failed because the peer is gone. Output is dropped, but input
    /// the kernel already holds is still delivered; once it is read to its
    /// end, the connection closes as [`CloseReason::Reset`].
    WriteFailed,
    /// The peer broke the framing (`reason` says how). No more input is
    /// delivered, and what arrives is discarded; output still goes out, so
    /// that the replies to the messages before the offending one reach the
    /// peer, until the application closes the connection (with `reason`).
    InputFailed {
        /// What the close will report.
        reason: CloseReason,
        /// The peer's EOF was read since: there is nothing left to discard.
        peer_eof: bool,
    },
}

/// What the reactor does with a connection's input in its current phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Read it and deliver it to the application.
    Deliver,
    /// Read it and throw it away (the application closed the connection).
    Discard,
    /// Nothing more can arrive (the peer's EOF was read): watch for a reset only.
    Ended,
}

/// What follows the peer's EOF, as [`Connection::peer_finished`] decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterEof {
    /// Tell the application (`Eof`); it will close when it has answered.
    Deliver,
    /// Nothing to do now: a close is under way and goes on.
    Continue,
    /// Close now and report it with this reason.
    Close(CloseReason),
    /// Close now without a report: the application already had `Closed`.
    Forget,
}

/// What re-checking a connection's queue against the watermarks found (see
/// [`Connection::check_watermarks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Checked {
    /// The queue crossed a watermark: the application is to be told.
    pub crossed: Option<Crossing>,
    /// Reading resumed: input may be waiting that no new edge will report.
    pub reads_again: bool,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The socket; closed when the connection is dropped.
    socket: Socket,
    /// The unique id of this tenant of the slot.
    id: u64,
    phase: Phase,
    /// What waits to be sent.
    queue: WriteQueue,
    /// The kernel may hold more input than was read: the last read stopped
    /// before `EAGAIN` (a budget or a full ring). Such a connection is on the
    /// reactor's ready list, because an edge-triggered poller will not report it
    /// again.
    unread_input: bool,
    /// The connection is on the reactor's ready list (at most once).
    in_ready_list: bool,
    /// The poller said a short read may leave input behind (see
    /// [`crate::sys::Event::read_fully`]): read until `EAGAIN` or EOF, because
    /// edge triggering will not report that input again.
    read_fully: bool,
    /// Its last raw read filled its delivery slot and went on into a spill
    /// buffer, so its next one, where a spill is allowed, goes straight into
    /// a spill buffer (see `reactor::read`).
    spills: bool,
    /// The application paused reading (`pause_reading`).
    paused: bool,
    /// The queue rose above the high watermark and has not fallen to the low
    /// one since: reading stops, and the application was told that writing
    /// is paused.
    throttled: bool,
    /// The peer is gone (a reset, or a send failed): what it sent before is
    /// read to its end whether reading is paused or throttled, since nothing
    /// can be held back for later any more.
    peer_gone: bool,
    /// Shared with the application; see [`PendingBytes`].
    pending: PendingBytes,
    /// Cuts the input into messages, unless the server is in raw mode.
    decoder: Option<Decoder>,
    /// When bytes last went either way (for the idle timeout).
    last_activity: Instant,
    /// When the message being received started, if one is unfinished (for
    /// the message timeout).
    message_started: Option<Instant>,
    /// A message-timeout entry is scheduled for this connection.
    message_timer_armed: bool,
    /// Its data deliveries in the ring that the consumer has not released.
    in_ring: u32,
    /// The last send applied was a part of a message whose other parts are
    /// still to come: a close the I/O thread starts now must be a reset, or
    /// the peer would take half a message for a whole one.
    mid_message: bool,
}

impl Connection {
    fn new(socket: Socket, id: u64, decoder: Option<Decoder>, now: Instant) -> Self {
        Connection {
            socket,
            id,
            phase: Phase::Open,
            queue: WriteQueue::default(),
            unread_input: false,
            in_ready_list: false,
            read_fully: false,
            spills: false,
            paused: false,
            throttled: false,
            peer_gone: false,
            pending: PendingBytes::default(),
            decoder,
            last_activity: now,
            message_started: None,
            message_timer_armed: false,
            in_ring: 0,
            mid_message: false,
        }
    }

    /// False while reading is paused, by the application or by the
    /// connection's own queue (see [`Watermarks`]), unless the peer is gone.
    pub fn reads_input(&self) -> bool {
        self.peer_gone || (!self.paused && !self.throttled)
    }

    /// The peer reset the connection (or a send found it gone): read what
    /// it sent before to its end, paused or not; the reset then ends it.
    pub fn peer_gone(&mut self) {
        self.peer_gone = true;
    }

    /// True if the decoder holds messages it has read and not yet put in
    /// the delivery ring. They are delivered paused, throttled or stopping.
    pub fn holds_messages(&self) -> bool {
        self.decoder.as_ref().is_some_and(Decoder::has_backlog)
    }

    /// Pauses or resumes reading on the application's request. Returns true
    /// if reading resumed: input may be waiting that no new edge will report.
    pub fn set_paused(&mut self, paused: bool) -> bool {
        let was_reading = self.reads_input();
        self.paused = paused;
        !was_reading && self.reads_input()
    }

    /// The socket took `n` queued or direct bytes.
    pub fn wrote(&mut self, n: usize) {
        self.pending.sub(n);
    }

    /// Re-checks the queue against `marks` after it changed: whether it
    /// crossed one, and whether reading resumed (see
    /// [`Connection::set_paused`]).
    pub fn check_watermarks(&mut self, marks: Watermarks) -> Checked {
        let was_reading = self.reads_input();
        let crossed = marks.crossing(self.throttled, self.queue.len());
        if let Some(crossing) = crossed {
            self.throttled = crossing == Crossing::Rose;
        }
        Checked {
            crossed,
            reads_again: !was_reading && self.reads_input(),
        }
    }

    fn drop_queue(&mut self) {
        let dropped = self.queue.discard();
        self.pending.sub(dropped);
        // No crossing: the connection is ending, and the application hears
        // `Closed`, not that writing resumed (see the module docs).
        self.throttled = false;
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// What its input is for now.
    pub fn input(&self) -> Input {
        match self.phase {
            Phase::Open | Phase::WriteFailed => Input::Deliver,
            Phase::PeerDone
            | Phase::Closing { peer_eof: true, .. }
            | Phase::InputFailed { peer_eof: true, .. } => Input::Ended,
            Phase::Closing { .. } | Phase::Lingering { .. } | Phase::InputFailed { .. } => {
                Input::Discard
            }
        }
    }

    /// True while sends for this connection are accepted. A close is ordered
    /// behind every send queued before it, so nothing is refused that the
    /// application was told would go out.
    pub fn accepts_output(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::PeerDone | Phase::InputFailed { .. }
        )
    }

    /// True once the application has been told the connection closed.
    pub fn reported_closed(&self) -> bool {
        matches!(self.phase, Phase::Lingering { .. })
    }

    /// The peer's EOF was read.
    pub fn peer_finished(&mut self) -> AfterEof {
        self.unread_input = false;
        match self.phase {
            Phase::Open => {
                self.phase = Phase::PeerDone;
                AfterEof::Deliver
            }
            Phase::PeerDone => AfterEof::Continue,
            Phase::Closing { reason, .. } => {
                self.phase = Phase::Closing {
                    reason,
                    peer_eof: true,
                };
                AfterEof::Continue
            }
            Phase::Lingering { .. } => AfterEof::Forget,
            Phase::WriteFailed => AfterEof::Close(CloseReason::Reset),
            // The application was told of the failure and closes; until
            // then there is nothing more to read.
            Phase::InputFailed { reason, .. } => {
                self.phase = Phase::InputFailed {
                    reason,
                    peer_eof: true,
                };
                AfterEof::Continue
            }
        }
    }

    /// The peer broke the framing: stop delivering its input. False if the
    /// connection was not reading anyway.
    pub fn input_failed(&mut self, reason: CloseReason) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        self.phase = Phase::InputFailed {
            reason,
            peer_eof: false,
        };
        self.unread_input = false;
        self.message_started = None;
        true
    }

    /// Starts a close for `reason`: no more output is accepted, the queue
    /// drains, then FIN. False if a close is already under way (the first
    /// reason stands). An application's close after the peer's EOF is the
    /// peer's doing and is reported as [`CloseReason::Peer`].
    pub fn begin_close(&mut self, reason: CloseReason) -> bool {
        match self.phase {
            Phase::Open => {
                self.phase = Phase::Closing {
                    reason,
                    peer_eof: false,
                };
                true
            }
            Phase::PeerDone => {
                let reason = match reason {
                    CloseReason::Local => CloseReason::Peer,
                    other => other,
                };
                self.phase = Phase::Closing {
                    reason,
                    peer_eof: true,
                };
                true
            }
            Phase::InputFailed {
                reason: failure,
                peer_eof,
            } => {
                let reason = match reason {
                    CloseReason::Local => failure,
                    other => other,
                };
                self.phase = Phase::Closing { reason, peer_eof };
                true
            }
            Phase::Closing { .. } | Phase::Lingering { .. } | Phase::WriteFailed => false,
        }
    }

    /// A send failed because the peer has gone. Returns true if the
    /// connection should close now; false if input may still be waiting in
    /// the kernel, to be delivered first (then [`Connection::peer_finished`]
    /// or a failed read ends it).
    pub fn write_failed(&mut self) -> bool {
        self.drop_queue();
        match self.phase {
            Phase::Open => {
                self.phase = Phase::WriteFailed;
                self.peer_gone = true;
                false
            }
            Phase::WriteFailed => false,
            Phase::PeerDone
            | Phase::Closing { .. }
            | Phase::Lingering { .. }
            | Phase::InputFailed { .. } => true,
        }
    }

    /// The queue has drained and FIN was sent: the application is told now
    /// (the returned reason), and the socket waits for the peer's EOF until
    /// `deadline`. `None` (and no change) unless the connection was closing.
    pub fn linger(&mut self, deadline: Instant) -> Option<CloseReason> {
        let Phase::Closing { reason, .. } = self.phase else {
            return None;
        };
        self.phase = Phase::Lingering { deadline };
        self.drop_queue();
        Some(reason)
    }

    /// The reason a close under way will report, if one is under way.
    pub fn closing_reason(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closing { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// What the poller should watch for. `reading` is false while the reactor
    /// delivers no input at all (the server is stopping); discarding goes on.
    pub fn interest(&self, reading: bool) -> Interest {
        let wants_input = match self.input() {
            Input::Deliver => reading && self.reads_input(),
            Input::Discard => true,
            // After EOF a socket stays readable for good; watching it would spin.
            Input::Ended => false,
        };
        let readable = wants_input && !self.unread_input;
        let writable = !self.queue.is_empty();
        Interest {
            readable,
            writable,
            // A connection with input still to read finds out about a reset
            // by reading; reports until then would only repeat. One held
            // back (paused or throttled) would not read soon: it watches, so
            // that a reset ends it now rather than when reading resumes.
            hangup: readable || writable || !self.unread_input || !self.reads_input(),
        }
    }
}

/// The bookkeeping the reactor keeps per connection, asked and told through
/// these methods: the ready list, output, the clocks, the ring share.
impl Connection {
    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }

    /// The unique id of this tenant of the slot.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The count of bytes accepted and not yet written, shared with the
    /// application (see [`PendingBytes`]).
    pub fn pending(&self) -> &PendingBytes {
        &self.pending
    }

    /// The decoder that cuts the input into messages; `None` in raw mode.
    pub fn decoder_mut(&mut self) -> Option<&mut Decoder> {
        self.decoder.as_mut()
    }

    /// True if input is cut into messages (not raw).
    pub fn is_framed(&self) -> bool {
        self.decoder.is_some()
    }

    /// Lets go of what the decoder holds, its buffers back to `pool`.
    pub fn clear_decoder(&mut self, pool: &mut BufferPool) {
        if let Some(decoder) = self.decoder.as_mut() {
            decoder.clear(pool);
        }
    }

    // The ready list.

    /// The last read stopped before `EAGAIN` (a budget, a full ring): input
    /// may wait that no new edge will report. Returns true if the connection
    /// must join the ready list, which it is not on yet.
    pub fn enlist(&mut self) -> bool {
        self.unread_input = true;
        !std::mem::replace(&mut self.in_ready_list, true)
    }

    /// Input waits, held back (paused, throttled, stopping): whatever lets it
    /// be read again enlists the connection. The one-shot registration stays
    /// disarmed meanwhile (see [`Connection::interest`]).
    pub fn hold_input(&mut self) {
        self.unread_input = true;
    }

    /// Taken off the ready list. Returns true if it had unread input to
    /// serve now (the read that follows says again whether it has more).
    pub fn leave_ready_list(&mut self) -> bool {
        self.in_ready_list = false;
        std::mem::take(&mut self.unread_input)
    }

    /// Read to `EAGAIN`: nothing waits, and whatever the poller warned of
    /// (see [`Connection::warn_short_reads`]) has been read.
    pub fn drained(&mut self) {
        self.unread_input = false;
        self.read_fully = false;
    }

    /// True if input may wait unread (see [`Connection::enlist`]).
    pub fn has_unread_input(&self) -> bool {
        self.unread_input
    }

    /// The poller said a short read may leave input behind (see
    /// [`crate::sys::Event::read_fully`]): read until `EAGAIN` or EOF.
    pub fn warn_short_reads(&mut self) {
        self.read_fully = true;
    }

    /// True if a short read does not prove the socket drained.
    pub fn reads_fully(&self) -> bool {
        self.read_fully
    }

    /// True if its last raw read filled its delivery slot and went on into
    /// a spill buffer.
    pub fn spills(&self) -> bool {
        self.spills
    }

    /// Records whether its last raw read went on into a spill buffer.
    pub fn set_spills(&mut self, spilled: bool) {
        self.spills = spilled;
    }

    // Output.

    /// True if bytes wait in the write queue.
    pub fn has_queued_output(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The queued bytes to send next, in order (at most two runs).
    pub fn queued_output(&self) -> [&[u8]; 2] {
        self.queue.fronts()
    }

    /// Queues `data` behind what waits.
    pub fn queue_output(&mut self, data: &[u8]) {
        self.queue.push(data);
    }

    /// The socket took the first `n` queued bytes.
    pub fn sent_queued(&mut self, n: usize) {
        self.queue.consume(n);
        self.wrote(n);
    }

    /// `n` bytes the application sent will not go out (the connection no
    /// longer takes output).
    pub fn refuse_output(&mut self, n: usize) {
        self.pending.sub(n);
    }

    /// Notes whether the last send applied was a part of a message whose
    /// other parts are still to come: a close the I/O thread starts then
    /// must be a reset, or the peer would take half a message for a whole.
    pub fn set_mid_message(&mut self, mid_message: bool) {
        self.mid_message = mid_message;
    }

    /// True if a message is half sent (see [`Connection::set_mid_message`]).
    pub fn is_mid_message(&self) -> bool {
        self.mid_message
    }

    // The clocks.

    /// Bytes went either way at `now` (for the idle timeout).
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// When bytes last went either way.
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// Notes at `now` whether a message is unfinished (the message timeout's
    /// clock runs only while the peer, not the server, holds it up). Returns
    /// when it started if a message timer must be armed now: one is due and
    /// none is armed. After this, [`Connection::message_deadline`] tells
    /// what the timer means when it fires.
    pub fn track_message(&mut self, now: Instant) -> Option<Instant> {
        let decoder = self.decoder.as_ref()?;
        let unfinished = decoder.in_message() && !decoder.has_backlog();
        self.message_started = if unfinished {
            self.message_started.or(Some(now))
        } else {
            None
        };
        let started = self.message_started?;
        if self.message_timer_armed {
            return None;
        }
        self.message_timer_armed = true;
        Some(started)
    }

    /// The message timer fired at `now`. Returns the message's deadline: as
    /// it stands, or moved to `now + timeout` while the server holds the
    /// message up (`stopping`, reading held back, input unread, messages
    /// waiting in the decoder). `None`, and the timer disarmed, if no
    /// message is unfinished or none can finish any more.
    pub fn message_deadline(
        &mut self,
        now: Instant,
        timeout: Duration,
        stopping: bool,
    ) -> Option<Instant> {
        let Some(started) = self.message_started else {
            self.message_timer_armed = false;
            return None;
        };
        if self.input() != Input::Deliver {
            // Its input has ended: the message can never finish, and the
            // close under way decides what follows.
            self.message_started = None;
            self.message_timer_armed = false;
            return None;
        }
        let server_behind =
            stopping || !self.reads_input() || self.unread_input || self.holds_messages();
        if server_behind {
            self.message_started = Some(now);
            return Some(now + timeout);
        }
        Some(started + timeout)
    }

    /// The message timer fired for good (the connection closes for it).
    pub fn disarm_message_timer(&mut self) {
        self.message_timer_armed = false;
    }

    // The delivery ring.

    /// Its data deliveries in the ring that the consumer has not released.
    pub fn in_ring(&self) -> u32 {
        self.in_ring
    }

    /// `n` more of its deliveries went into the ring.
    pub fn delivered(&mut self, n: u32) {
        self.in_ring += n;
    }

    /// The consumer released one of its deliveries.
    pub fn released(&mut self) {
        self.in_ring -= 1;
    }
}
