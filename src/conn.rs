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

use std::collections::VecDeque;
use std::time::Instant;

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::framing::Decoder;
use crate::message::PendingBytes;
use crate::sys::Interest;
use crate::token::ConnKey;

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

/// Bytes accepted for sending that the socket has not taken yet, in order.
///
/// A ring buffer: bytes go in at the back and leave from the front without
/// ever being moved, so a queue that stays busy (a client that reads slower
/// than it is answered) costs one copy per byte. Allocated the first time a
/// send is partial and reused after that; a connection whose sends always go
/// through at once never allocates.
#[derive(Debug, Default)]
pub struct WriteQueue {
    bytes: VecDeque<u8>,
}

impl WriteQueue {
    /// True if nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Number of bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes to send next, in order: at most two runs, where the ring
    /// wraps.
    pub fn fronts(&self) -> [&[u8]; 2] {
        let (first, second) = self.bytes.as_slices();
        [first, second]
    }

    /// Appends `data` behind everything already waiting.
    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// Drops the first `n` bytes, which the socket took.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.bytes.len());
        self.bytes.drain(..n);
    }

    /// Drops what waits and frees the memory; returns how many bytes were
    /// dropped.
    pub fn discard(&mut self) -> usize {
        let dropped = self.len();
        self.bytes = VecDeque::new();
        dropped
    }
}

/// Per-connection output limits: reading a connection stops while more than
/// `high` bytes wait in its queue and resumes once at most `low` do, so a
/// client that sends without reading the replies is slowed by TCP itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Stop reading above this many queued bytes.
    pub high: usize,
    /// Read again at or below this many.
    pub low: usize,
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

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The socket; closed when the connection is dropped.
    pub socket: Socket,
    /// The unique id of this tenant of the slot.
    pub id: u64,
    phase: Phase,
    /// What waits to be sent.
    pub queue: WriteQueue,
    /// The kernel may hold more input than was read: the last read stopped
    /// before `EAGAIN` (a budget or a full ring). Such a connection is on the
    /// reactor's ready list, because an edge-triggered poller will not report it
    /// again.
    pub unread_input: bool,
    /// The connection is on the reactor's ready list (at most once).
    pub in_ready_list: bool,
    /// The poller said a short read may leave input behind (see
    /// [`crate::sys::Event::read_fully`]): read until `EAGAIN` or EOF, because
    /// edge triggering will not report that input again.
    pub read_fully: bool,
    /// The application paused reading (`pause_reading`).
    paused: bool,
    /// Reading stopped because the queue rose above the high watermark.
    throttled: bool,
    /// The peer is gone (a reset, or a send failed): what it sent before is
    /// read to its end whether reading is paused or throttled, since nothing
    /// can be held back for later any more.
    peer_gone: bool,
    /// Shared with the application; see [`PendingBytes`].
    pub pending: PendingBytes,
    /// Cuts the input into messages, unless the server is in raw mode.
    pub decoder: Option<Decoder>,
    /// When bytes last went either way (for the idle timeout).
    pub last_activity: Instant,
    /// When the message being received started, if one is unfinished (for
    /// the message timeout).
    pub message_started: Option<Instant>,
    /// A message-timeout entry is scheduled for this connection.
    pub message_timer_armed: bool,
    /// Its data deliveries in the ring that the consumer has not released.
    pub in_ring: u32,
    /// The last send applied was a part of a message whose other parts are
    /// still to come: a close the I/O thread starts now must be a reset, or
    /// the peer would take half a message for a whole one.
    pub mid_message: bool,
}

impl Connection {
    fn new(socket: Socket, id: u64, now: Instant) -> Self {
        Connection {
            socket,
            id,
            phase: Phase::Open,
            queue: WriteQueue::default(),
            unread_input: false,
            in_ready_list: false,
            read_fully: false,
            paused: false,
            throttled: false,
            peer_gone: false,
            pending: PendingBytes::default(),
            decoder: None,
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

    /// Re-checks the queue against `marks` after it changed. Returns true if
    /// reading resumed (see [`Connection::set_paused`]).
    pub fn check_watermarks(&mut self, marks: Watermarks) -> bool {
        let was_reading = self.reads_input();
        let queued = self.queue.len();
        if queued > marks.high {
            self.throttled = true;
        } else if queued <= marks.low {
            self.throttled = false;
        }
        !was_reading && self.reads_input()
    }

    fn drop_queue(&mut self) {
        let dropped = self.queue.discard();
        self.pending.sub(dropped);
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

/// The table: a vector of slots with a free list, so keys stay small and
/// lookups are O(1).
#[derive(Debug, Default)]
pub struct ConnectionTable {
    slots: Vec<Option<Connection>>,
    free: Vec<u32>,
    /// The I/O thread whose table this is, for the keys it hands out.
    engine: u16,
    len: usize,
}

impl ConnectionTable {
    /// An empty table of I/O thread `engine`.
    pub fn new(engine: u16) -> Self {
        ConnectionTable {
            engine,
            ..Default::default()
        }
    }

    /// Number of connections in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the table holds no connection.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a connection for `socket`, opened at `now`, under `id` (unique
    /// for the server's life), and returns its key.
    pub fn insert(&mut self, socket: Socket, id: u64, now: Instant) -> ConnKey {
        let connection = Connection::new(socket, id, now);
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = Some(connection);
                index
            }
            None => {
                let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 connections");
                self.slots.push(Some(connection));
                index
            }
        };
        self.len += 1;
        ConnKey {
            index,
            engine: self.engine,
            id,
        }
    }

    /// The connection `key` names, unless it has gone.
    pub fn get(&self, key: ConnKey) -> Option<&Connection> {
        self.slots
            .get(key.index as usize)
            .and_then(Option::as_ref)
            .filter(|c| c.id == key.id)
    }

    /// The connection `key` names, unless it has gone.
    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut Connection> {
        self.slots
            .get_mut(key.index as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.id == key.id)
    }

    /// The connection in slot `index`, whoever it is.
    pub fn slot_mut(&mut self, index: u32) -> Option<&mut Connection> {
        self.slots.get_mut(index as usize).and_then(Option::as_mut)
    }

    /// Removes the connection `key` names and returns it (the caller
    /// deregisters and drops it).
    pub fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.as_ref().is_some_and(|c| c.id == key.id) {
            self.free.push(key.index);
            self.len -= 1;
            slot.take()
        } else {
            None
        }
    }

    /// Every connection in the table.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> + '_ {
        self.slots.iter().flatten()
    }

    /// Keys of every connection in the table.
    pub fn keys(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.as_ref().map(|c| ConnKey {
                index: index as u32,
                engine: self.engine,
                id: c.id,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};

    fn socket() -> Socket {
        Socket::new(Domain::IPV4, Type::STREAM, None).unwrap()
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_key() {
        let mut table = ConnectionTable::new(3);
        let old = table.insert(socket(), 1, Instant::now());
        assert!(table.remove(old).is_some());
        let new = table.insert(socket(), 2, Instant::now());
        assert_eq!((old.engine, new.engine), (3, 3));
        assert_eq!(new.index, old.index);
        assert_ne!(new.id, old.id);
        assert!(table.get_mut(old).is_none());
        assert!(table.remove(old).is_none());
        assert!(table.get_mut(new).is_some());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_peer_ending_first_makes_a_local_close_a_peer_close() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        assert_eq!(conn.input(), Input::Deliver);
        assert_eq!(conn.peer_finished(), AfterEof::Deliver);
        assert_eq!(conn.input(), Input::Ended);
        assert!(conn.accepts_output());
        assert!(conn.begin_close(CloseReason::Local));
        assert!(!conn.accepts_output());
        assert!(
            !conn.begin_close(CloseReason::Shutdown),
            "the first close stands"
        );
        assert_eq!(conn.linger(Instant::now()), Some(CloseReason::Peer));
        assert!(conn.reported_closed());
        assert_eq!(conn.peer_finished(), AfterEof::Forget);
    }

    #[test]
    fn a_failed_write_still_delivers_input_then_reports_a_reset() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        conn.queue.push(b"unsent");
        assert!(!conn.write_failed(), "input may still wait in the kernel");
        assert!(conn.queue.is_empty());
        assert_eq!(conn.input(), Input::Deliver);
        assert!(!conn.accepts_output());
        assert!(!conn.begin_close(CloseReason::Local));
        assert_eq!(conn.peer_finished(), AfterEof::Close(CloseReason::Reset));
    }

    #[test]
    fn a_closing_connection_discards_input_until_the_peer_ends() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        assert!(conn.begin_close(CloseReason::IdleTimeout));
        assert_eq!(conn.input(), Input::Discard);
        assert_eq!(conn.peer_finished(), AfterEof::Continue);
        assert_eq!(conn.input(), Input::Ended);
        assert!(conn.write_failed(), "nothing more can arrive: close now");
        assert_eq!(conn.closing_reason(), Some(CloseReason::IdleTimeout));
    }

    #[test]
    fn interest_follows_the_phase() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        let none = Interest {
            readable: false,
            writable: false,
            hangup: true,
        };
        assert!(conn.interest(true).readable);
        assert_eq!(
            conn.interest(false),
            none,
            "a stopping server reads no input"
        );
        conn.queue.push(b"x");
        assert!(conn.interest(false).writable);
        conn.peer_finished();
        assert!(
            !conn.interest(true).readable,
            "after EOF a socket stays readable"
        );
        conn.begin_close(CloseReason::Local);
        conn.linger(Instant::now());
        assert!(conn.interest(false).readable, "lingering discards input");
    }

    #[test]
    fn a_held_back_connection_watches_for_a_reset_and_reads_once_the_peer_is_gone() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        conn.set_paused(true);
        // Input came while paused: it stays unread, and only a reset is heard.
        conn.unread_input = true;
        let held = conn.interest(true);
        assert!(!held.readable, "a paused connection reads nothing");
        assert!(held.hangup, "a paused connection still hears of a reset");
        conn.peer_gone();
        assert!(
            conn.reads_input(),
            "nothing is held back from a peer that is gone"
        );
        // On the ready list now: reading finds the reset, no report needed.
        assert!(!conn.interest(true).hangup);
    }

    #[test]
    fn a_failed_write_reads_the_input_to_its_end_even_while_paused() {
        let mut conn = Connection::new(socket(), 1, Instant::now());
        conn.set_paused(true);
        assert!(!conn.write_failed(), "input may still wait in the kernel");
        assert!(conn.reads_input());
    }

    #[test]
    fn write_queue_keeps_order_across_partial_consumes() {
        let mut queue = WriteQueue::default();
        queue.push(b"hello ");
        queue.consume(3);
        queue.push(b"world");
        assert_eq!(queue.fronts().concat(), b"lo world");
        queue.consume(queue.len());
        assert!(queue.is_empty());
        queue.push(b"again");
        assert_eq!(queue.fronts().concat(), b"again");
    }

    #[test]
    fn write_queue_reuses_its_allocation_when_cycling() {
        let mut queue = WriteQueue::default();
        queue.push(&[1; 1000]);
        let capacity = queue.bytes.capacity();
        for _ in 0..100 {
            queue.consume(600);
            queue.push(&[2; 600]);
        }
        assert_eq!(queue.len(), 1000);
        assert_eq!(queue.bytes.capacity(), capacity);
    }

    #[test]
    fn write_queue_keeps_order_where_the_ring_wraps() {
        let mut queue = WriteQueue::default();
        let mut expected: VecDeque<u8> = VecDeque::new();
        let mut next = 0u8;
        for round in 0..200usize {
            let chunk: Vec<u8> = (0..(round % 37) + 1)
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            queue.push(&chunk);
            expected.extend(&chunk);
            let taken = (round * 7) % (queue.len() + 1);
            queue.consume(taken);
            expected.drain(..taken);
            let [first, second] = queue.fronts();
            assert_eq!([first, second].concat(), Vec::from(expected.clone()));
        }
    }
}
