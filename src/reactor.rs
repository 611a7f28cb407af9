//! The I/O thread's event loop.
//!
//! One turn of the loop: apply the commands the Python side queued (sends,
//! closes), serve the work that an earlier turn had to leave (connections with
//! unread input, listeners with pending connections), publish what was read,
//! then wait in the selector until a socket is ready, a command arrives, or a
//! deadline passes.
//!
//! Three rules keep an edge-triggered loop from hanging or starving:
//! - a socket is read (or accepted from) until `EAGAIN`, a short read, or its
//!   budget runs out; in the last case, and when the delivery ring is full, it
//!   goes on the *ready list*, because the kernel will not report it again;
//! - reading stops, and never drops data, when the delivery ring is full: TCP's
//!   own flow control then slows the peer, and the Python thread wakes this one
//!   when it frees slots (see [`crate::wake`]);
//! - control deliveries (`Closed`, `Eof`, ...) that find the ring full wait in a
//!   small backlog that goes out before anything else, so nothing is reordered.
//!
//! Stopping is a drain, not a cut. When asked to stop, the loop closes its
//! listeners, stops reading, and delivers `Draining`; the consumer handles
//! what it already has and answers `Shutdown`, behind every reply it queued.
//! Then each connection closes as soon as its queue has gone out (FIN). At
//! the stop deadline, connections that still hold output are reset instead,
//! so that their peers can tell a cut from a clean end.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::conn::{AfterEof, CloseReason, ConnectionTable, Input, Watermarks};
use crate::core::{Config, Shared};
use crate::framing::{Decoder, Framing, Message, Refused};
use crate::inbound::LargeMessages;
use crate::message::{Command, CommandKind, ConnKey, Delivery, DeliveryKind, Opened};
use crate::ring::{Consumer, Producer};
use crate::stats::Counters;
use crate::sys::{net, Event, Interest, Selector};
use crate::timer::Timers;
use crate::token::{id_matches, Target, Token};

/// Reads from one connection per turn before others get theirs.
const READ_BUDGET: usize = 16;
/// Connections accepted from one listener per turn.
const ACCEPT_BUDGET: usize = 128;
/// Deliveries staged before they are published without waiting for the turn's end.
const PUBLISH_BATCH: usize = 64;
/// How long a closed connection waits for the peer's EOF before it is dropped.
const LINGER: Duration = Duration::from_secs(5);
/// How long a close this thread started may go without progress before it
/// becomes a reset.
const CLOSE_PROGRESS: Duration = Duration::from_secs(5);
/// After an accept failure such as EMFILE, how long before trying again. Under
/// edge triggering the listener would otherwise never be reported again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The I/O thread's wait while it cannot hand its last deliveries over.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// One connection may hold at most this fraction of the delivery ring ...
const RING_SHARE_DIVISOR: usize = 8;
/// ... but never fewer slots than this.
const MIN_RING_SHARE: usize = 4;
/// The smallest buffer a message being assembled takes from the pool: what a
/// connection in the middle of a small message costs.
const SMALLEST_ASSEMBLY: usize = 4096;
/// In raw mode, a read that fills a delivery slot goes on into a buffer of
/// this size, so that a burst arrives as one message (asyncio and uvloop read
/// up to 256 KiB at a time too). A slot at least this large never spills.
const LARGE_READ: usize = 256 * 1024;
/// The most of one message gathered before it is written (see `send_part`).
const MAX_GATHER: usize = 256 * 1024;

/// A listening socket and what the loop owes it.
struct Listener {
    socket: Socket,
    /// Connections may be waiting: the last accept stopped before `EAGAIN`.
    pending: bool,
    /// Accepting failed for lack of resources; try again at this time.
    retry_at: Option<Instant>,
}

/// A control delivery waiting for ring space.
struct Pending {
    kind: DeliveryKind,
    conn: ConnKey,
    opened: Option<Opened>,
    detail: Option<String>,
}

/// The kinds of per-connection deadline. A connection has at most one
/// timer entry of each kind pending (see `Io::timers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deadline {
    /// No bytes either way for `idle_timeout`.
    Idle,
    /// A message started and not finished within `message_timeout`.
    Message,
    /// A close this thread started (a timeout) made no progress for
    /// `CLOSE_PROGRESS`: the peer takes nothing, so the close becomes a reset.
    Drain,
}

impl Deadline {
    /// How many kinds there are: the most entries one connection has pending.
    const KINDS: usize = 3;
}

/// A stop under way.
struct Stopping {
    /// When connections that still hold output are reset.
    deadline: Instant,
    /// Every connection has been told to close (the consumer answered
    /// `Draining`, or the deadline came first).
    closing_all: bool,
    /// `Draining` was delivered (or needs not be): it goes out once the
    /// messages decoders already hold are in the ring.
    announced: bool,
}

/// The I/O thread's state; see the module docs.
pub(crate) struct Reactor<S: Selector> {
    commands: Consumer<Command>,
    io: Io<S>,
}

/// Everything but the command ring, so that applying a command can borrow it
/// while the ring is borrowed too.
struct Io<S: Selector> {
    selector: S,
    shared: Arc<Shared>,
    deliveries: Producer<Delivery>,
    listeners: Vec<Listener>,
    table: ConnectionTable,
    /// Every engine of the server, this one included: the one with the
    /// listeners hands accepted connections to each in turn.
    engines: Arc<[Arc<Shared>]>,
    /// The engine the next accepted connection goes to.
    next_engine: usize,
    /// Connections handed to this engine, being opened.
    arrivals: Vec<Socket>,
    /// Connections with unread input, served round-robin.
    ready: VecDeque<ConnKey>,
    /// Control deliveries that found the ring full.
    backlog: VecDeque<Pending>,
    /// Lingering connections in deadline order (the linger time is constant).
    lingering: VecDeque<(Instant, ConnKey)>,
    events: Vec<Event>,
    /// Where discarded input goes.
    scratch: Box<[u8]>,
    /// The parts of a message larger than a slot, gathered so far, and the
    /// connection they are for (see `send_part`).
    gathered: Vec<u8>,
    gathered_for: Option<ConnKey>,
    /// When an accept error was last reported, to report at most one a second.
    last_accept_error: Option<Instant>,
    /// Set once a stop has begun.
    stopping: Option<Stopping>,
    /// Per-connection output limits.
    watermarks: Watermarks,
    /// How input is cut into messages.
    framing: Framing,
    max_message_size: usize,
    /// Largest message that travels in a slot's own buffer.
    slot_size: usize,
    /// Buffers of messages larger than a slot.
    large: LargeMessages,
    /// Raw mode: the size of the buffer a read that fills its slot goes on
    /// into ([`LARGE_READ`]); 0 where reads do not spill.
    spill_size: usize,
    /// The budget had no room for a spill buffer: the consumer's release
    /// count then (see `may_spill`).
    spill_blocked_at: Option<usize>,
    /// Input waits for the consumer to release slots, though some are free: a
    /// large message over the budget of buffers in the ring, or a connection
    /// at its share of the ring. The consumer's release count then.
    consumer_blocked_at: Option<usize>,
    /// Data deliveries in the ring, oldest first: the producer position of
    /// each and its connection, to keep each connection's share exact.
    in_flight: VecDeque<(usize, ConnKey, usize)>,
    /// Payload bytes of the data deliveries in the ring (the third field of
    /// `in_flight`), and the most raw reads may bring it to: the ring's own
    /// size, so that spilled reads do not raise what the ring holds.
    ring_bytes: usize,
    ring_byte_cap: usize,
    /// The most data deliveries one connection may have in the ring.
    ring_share: u32,
    /// Per-connection deadlines, at most one live entry per connection and
    /// kind; whether a deadline really passed is checked when its entry
    /// fires, and the entries of closed connections are compacted away
    /// (see `expire_timers`).
    timers: Timers<(ConnKey, Deadline)>,
    /// Connections whose deadline passed, found by the last expiry.
    expired: Vec<(ConnKey, Deadline, CloseReason)>,
    idle_timeout: Option<Duration>,
    message_timeout: Option<Duration>,
    /// The time this turn's work started.
    now: Instant,
    /// Connections beyond this many are turned away.
    max_connections: usize,
    /// Turned away since the last report, and when that was.
    unreported_rejections: u64,
    last_rejection_report: Option<Instant>,
    /// A file descriptor kept in reserve: when accepting fails for lack of
    /// descriptors, closing it lets the loop accept the queued clients and
    /// close them at once, instead of leaving them waiting.
    reserve: Option<net::ReserveFd>,
    /// What this thread counts; copied to `shared.stats` once per turn.
    counters: Counters,
}

impl<S: Selector> Reactor<S> {
    /// Registers `listeners` with `selector`; the loop starts with [`Reactor::run`].
    pub(crate) fn new(
        config: &Config,
        selector: S,
        shared: Arc<Shared>,
        engines: Arc<[Arc<Shared>]>,
        deliveries: Producer<Delivery>,
        commands: Consumer<Command>,
        listeners: Vec<Socket>,
    ) -> io::Result<Self> {
        let spill_size = match config.framing {
            Framing::Raw if config.slot_size < LARGE_READ => LARGE_READ,
            _ => 0,
        };
        let mut io = Io {
            selector,
            shared: Arc::clone(&shared),
            deliveries,
            listeners: Vec::with_capacity(listeners.len()),
            table: ConnectionTable::new(shared.engine),
            engines,
            next_engine: 0,
            arrivals: Vec::new(),
            ready: VecDeque::with_capacity(1024),
            backlog: VecDeque::with_capacity(64),
            lingering: VecDeque::with_capacity(64),
            events: Vec::with_capacity(1024),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            gathered: Vec::new(),
            gathered_for: None,
            last_accept_error: None,
            stopping: None,
            watermarks: Watermarks {
                high: config.write_buffer_high,
                low: config.write_buffer_low,
            },
            framing: config.framing,
            max_message_size: config.max_message_size,
            slot_size: config.slot_size,
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
            ),
            spill_size,
            spill_blocked_at: None,
            consumer_blocked_at: None,
            in_flight: VecDeque::with_capacity(config.ring_slots),
            ring_bytes: 0,
            ring_byte_cap: config.ring_slots * config.slot_size,
            ring_share: (config.ring_slots / RING_SHARE_DIVISOR).max(MIN_RING_SHARE) as u32,
            timers: Timers::with_capacity(1024),
            expired: Vec::with_capacity(64),
            idle_timeout: config.idle_timeout,
            message_timeout: config
                .message_timeout
                .filter(|_| config.framing != Framing::Raw),
            now: Instant::now(),
            max_connections: config.max_connections,
            unreported_rejections: 0,
            last_rejection_report: None,
            // Only the engine that accepts needs one (see `turn_away_queued`).
            reserve: None,
            counters: Counters::default(),
        };
        for (index, socket) in listeners.into_iter().enumerate() {
            socket.set_nonblocking(true)?;
            io.selector
                .register(&socket, Token::listener(index), READABLE)?;
            io.listeners.push(Listener {
                socket,
                // Connections may have queued before registration.
                pending: true,
                retry_at: None,
            });
        }
        if !io.listeners.is_empty() {
            io.reserve = net::ReserveFd::open();
        }
        Ok(Reactor { commands, io })
    }

    /// Serves until asked to stop, then drains (see the module docs): every
    /// connection is closed and reported, then `Stopped` is delivered.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        loop {
            if self.io.stopping.is_none() && self.io.shared.hub.stop.load(Acquire) {
                let timeout = self.io.shared.hub.stop_timeout();
                self.io.begin_stop(Instant::now() + timeout, true);
            }
            self.apply_commands();
            self.io.open_arrivals();
            if let Some(stopping) = &mut self.io.stopping {
                if Instant::now() >= stopping.deadline {
                    // Whatever has not finished by now (output, replies the
                    // consumer has not made) is cut, and the peers can tell.
                    stopping.closing_all = true;
                    self.io.abort_all();
                }
                if self.io.stopping.as_ref().is_some_and(|s| s.closing_all)
                    && self.io.table.is_empty()
                {
                    break;
                }
            }
            self.io.serve_leftovers();
            self.io.announce_draining();
            self.io.publish();
            let timeout = self.io.poll_timeout();
            self.wait(timeout)?;
            self.io.now = Instant::now();
            self.io.dispatch_events();
            self.io.expire_lingering();
            self.io.expire_timers();
            self.io.publish();
        }
        self.finish();
        Ok(())
    }

    /// Reports a failure of the loop (`detail`), then closes everything at
    /// once: connections whose output all went out end with FIN, the others
    /// with a reset. Connections handed to this engine and not opened yet go
    /// to the other engines instead.
    pub(crate) fn fail(&mut self, detail: String) {
        self.io.pass_on_arrivals();
        self.io
            .emit(DeliveryKind::Failed, ConnKey::default(), None, Some(detail));
        self.io.begin_stop(Instant::now(), false);
        self.io.close_all();
        self.io.abort_all();
        self.finish();
    }

    /// Applies queued commands, at most a ring's worth per turn, so that a fast
    /// sender cannot keep the sockets from being polled.
    fn apply_commands(&mut self) {
        let mut applied = 0;
        while applied < self.commands.capacity()
            && self
                .commands
                .take_with(|command| self.io.apply(command))
                .is_some()
        {
            applied += 1;
            if self.commands.taken() >= PUBLISH_BATCH {
                self.commands.release();
                self.io.shared.command_space.ring();
            }
        }
        if applied > 0 {
            self.commands.release();
            self.io.shared.command_space.ring();
        }
    }

    /// Sleeps in the selector, unless the sleep protocol finds work first.
    fn wait(&mut self, mut timeout: Option<Duration>) -> io::Result<()> {
        // Whatever was counted is visible before this thread may sleep.
        self.io.shared.stats().publish(&self.io.counters);
        let stalled = timeout != Some(Duration::ZERO) && self.io.has_deferred_work();
        let io = &mut self.io;
        if timeout != Some(Duration::ZERO) {
            let Io {
                shared,
                deliveries,
                consumer_blocked_at,
                stopping,
                ..
            } = io;
            let commands = &mut self.commands;
            let may_sleep = shared.io_sleep.prepare(stalled, || {
                !commands.is_empty()
                    || shared.arrivals.may_have_arrivals()
                    || (stopping.is_none() && shared.hub.stop.load(Acquire))
                    || (stalled && ring_has_room(deliveries, *consumer_blocked_at))
            });
            if !may_sleep {
                timeout = Some(Duration::ZERO);
            }
        }
        let result = io.selector.select(&mut io.events, timeout);
        io.shared.io_sleep.awake();
        result
    }

    /// Every connection is gone: deliver `Stopped` and hand the last
    /// deliveries over.
    fn finish(&mut self) {
        self.io.lingering.clear();
        self.io.ready.clear();
        self.io.shared.stats().publish(&self.io.counters);
        // From here on, senders give up instead of waiting for ring space.
        self.io.shared.finished.store(true, Release);
        // And the accepting engine serves what it would have handed over.
        self.io.shared.close_arrivals();
        self.io
            .emit(DeliveryKind::Stopped, ConnKey::default(), None, None);
        // Keep draining commands meanwhile, so that no Python thread stays
        // blocked on a full command ring.
        loop {
            self.io.drain_backlog();
            self.io.publish();
            if self.io.backlog.is_empty() {
                break;
            }
            self.discard_commands();
            if self.wait(Some(SHUTDOWN_POLL)).is_err() {
                break;
            }
        }
        self.discard_commands();
    }

    fn discard_commands(&mut self) {
        while self.commands.take_with(|_| ()).is_some() {}
        self.commands.release();
        self.io.shared.command_space.ring();
    }
}

const READABLE: Interest = Interest {
    readable: true,
    writable: false,
    hangup: true,
};

impl<S: Selector> Io<S> {
    fn apply(&mut self, command: &Command) {
        match command.kind {
            CommandKind::Send => match command.loan {
                Some(loan) => {
                    let (header, trailer) = command.data().split_at(loan.head);
                    // SAFETY: the command's slot is not released before this
                    // returns, and the lender keeps the bytes until then.
                    let lent = unsafe { loan.bytes() };
                    debug_assert!(self.gathered.is_empty(), "a message arrives whole");
                    self.send(command.conn, &[header, lent, trailer], false);
                }
                None => self.send_part(command.conn, command.data(), command.more),
            },
            CommandKind::Close => self.close(command.conn, CloseReason::Local),
            CommandKind::Abort => self.abort(command.conn, CloseReason::Local),
            CommandKind::Shutdown => self.close_all(),
            CommandKind::PauseReading => self.set_paused(command.conn, true),
            CommandKind::ResumeReading => self.set_paused(command.conn, false),
            #[cfg(test)]
            CommandKind::Panic => panic!("panic requested by a test"),
            #[cfg(test)]
            CommandKind::Hold => self.shared.hold_for_test(),
        }
    }

    /// True unless a stop has begun: then no input is delivered any more.
    fn reading(&self) -> bool {
        self.stopping.is_none()
    }

    /// Sends one command's part of a message. A message larger than a slot
    /// comes in consecutive commands (a sender holds the command ring for a
    /// whole message), and its parts are gathered here and written with one
    /// call, as much as [`MAX_GATHER`] at a time, instead of one call per slot.
    fn send_part(&mut self, key: ConnKey, data: &[u8], more: bool) {
        if self.gathered.is_empty() && !more {
            return self.send(key, &[data], false);
        }
        debug_assert!(self.gathered_for.is_none_or(|k| k == key));
        self.gathered.extend_from_slice(data);
        if more && self.gathered.len() < MAX_GATHER {
            self.gathered_for = Some(key);
            if let Some(conn) = self.table.get_mut(key) {
                // Part of a message is held back: a close now must cut.
                conn.mid_message = true;
            }
            return;
        }
        let gathered = std::mem::take(&mut self.gathered);
        self.send(key, &[&gathered], more);
        self.gathered = gathered;
        self.gathered.clear();
        self.gathered_for = None;
    }

    /// Writes `parts`, one message in order, now if the socket takes them and
    /// nothing is queued ahead of them; queues the rest (a copy, so that what
    /// the parts point to is free once this returns).
    /// `more`: other parts of the same message follow in later commands.
    fn send(&mut self, key: ConnKey, parts: &[&[u8]], more: bool) {
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        conn.mid_message = more;
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if !conn.accepts_output() {
            conn.pending.sub(total);
            return;
        }
        let mut sent = 0;
        if conn.queue.is_empty() {
            while sent < total {
                match send_from(&conn.socket, parts, sent) {
                    Ok(n) => {
                        sent += n;
                        conn.wrote(n);
                        conn.last_activity = now;
                        self.counters.bytes_sent += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        conn.pending.sub(total - sent);
                        return self.on_write_error(key, &e);
                    }
                }
            }
        }
        if sent < total {
            let mut skip = sent;
            for part in parts {
                let from = skip.min(part.len());
                skip -= from;
                conn.queue.push(&part[from..]);
            }
            conn.check_watermarks(self.watermarks);
            self.update_interest(key);
        }
    }

    /// Pauses or resumes reading `key` for the application.
    fn set_paused(&mut self, key: ConnKey, paused: bool) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.set_paused(paused) {
            self.mark_unread(key);
        }
        self.update_interest(key);
    }

    /// Sends what is queued until the socket is full; completes a pending close
    /// once the queue is empty.
    fn flush(&mut self, key: ConnKey) {
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        while !conn.queue.is_empty() {
            match send_from(&conn.socket, &conn.queue.fronts(), 0) {
                Ok(n) => {
                    conn.queue.consume(n);
                    conn.wrote(n);
                    conn.last_activity = now;
                    self.counters.bytes_sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return self.on_write_error(key, &e),
            }
        }
        let resumed = conn.check_watermarks(self.watermarks);
        let drained_close = conn.queue.is_empty() && conn.closing_reason().is_some();
        if resumed {
            // Input that arrived while reading was off raised no new edge.
            self.mark_unread(key);
        }
        if drained_close {
            self.finish_close(key);
        }
    }

    /// A send failed: the peer is gone. Input it sent before may still wait in
    /// the kernel; unless nothing more can come, read it to its end first.
    fn on_write_error(&mut self, key: ConnKey, error: &io::Error) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.write_failed() {
            self.close_now(key, Some(CloseReason::of_error(error)));
        } else {
            // No new edge may come for input that is already there.
            self.mark_unread(key);
        }
    }

    /// Starts a graceful close: the queue drains, then FIN.
    fn close(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.begin_close(reason) {
            self.flush(key);
        }
    }

    /// Resets the connection at once, dropping what is queued.
    fn abort(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let reason = conn.closing_reason().unwrap_or(reason);
        // A zero linger time makes close() send RST and drop unsent data.
        let _ = conn.socket.set_linger(Some(Duration::ZERO));
        self.close_now(key, Some(reason));
    }

    /// The queue is empty: send FIN and tell the application. While serving,
    /// linger until the peer's EOF so that unread input cannot turn the close
    /// into a reset; while stopping, close at once.
    fn finish_close(&mut self, key: ConnKey) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if let Err(e) = conn.socket.shutdown(Shutdown::Write) {
            return self.close_now(key, Some(CloseReason::of_error(&e)));
        }
        if self.stopping.is_some() {
            let reason = conn.closing_reason();
            self.discard_input(key);
            return self.close_now(key, reason);
        }
        let deadline = Instant::now() + LINGER;
        let Some(reason) = conn.linger(deadline) else {
            return;
        };
        self.lingering.push_back((deadline, key));
        self.emit(DeliveryKind::Closed(reason), key, None, None);
        self.discard_input(key);
        self.update_interest(key);
    }

    /// Closes the socket now and reports `Closed(reason)`, unless the
    /// application already had it (a lingering connection) or `reason` is
    /// `None`.
    fn close_now(&mut self, key: ConnKey, reason: Option<CloseReason>) {
        let Some(mut conn) = self.table.remove(key) else {
            return;
        };
        self.shared.hub.open.fetch_sub(1, Relaxed);
        let _ = self.selector.deregister(&conn.socket);
        if let Some(decoder) = conn.decoder.as_mut() {
            decoder.clear(&mut self.large.pool);
        }
        let reported = conn.reported_closed();
        drop(conn);
        if let (Some(reason), false) = (reason, reported) {
            self.emit(DeliveryKind::Closed(reason), key, None, None);
        }
    }

    /// Asks every connection to close; called once the consumer answered
    /// `Draining` (or the stop deadline passed).
    fn close_all(&mut self) {
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
    fn abort_all(&mut self) {
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            match self.table.get(key) {
                // FIN went out after all of its output: close it quietly.
                Some(conn) if conn.reported_closed() => self.close_now(key, None),
                Some(_) => self.abort(key, CloseReason::Shutdown),
                None => {}
            }
        }
    }

    /// Delivers `Draining` once a stop has begun and no decoder holds
    /// messages it has read but not yet put in the ring (those are still
    /// delivered, ahead of it).
    fn announce_draining(&mut self) {
        if self.stopping.as_ref().is_none_or(|s| s.announced) {
            return;
        }
        let holding = self.table.connections().any(|conn| {
            conn.reads_input() && conn.decoder.as_ref().is_some_and(Decoder::has_backlog)
        });
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

    /// Closes `key` for `reason` on this thread's own initiative: gracefully,
    /// unless it is in the middle of sending a message, which only a reset
    /// can tell the peer.
    fn close_or_cut(&mut self, key: ConnKey, reason: CloseReason) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        if conn.mid_message {
            self.abort(key, reason);
        } else {
            self.close(key, reason);
        }
    }

    /// Stops accepting and reading. `announce` delivers `Draining` so that
    /// the consumer answers `Shutdown` behind its last replies.
    fn begin_stop(&mut self, deadline: Instant, announce: bool) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Stopping {
            deadline,
            closing_all: false,
            announced: !announce,
        });
        // New connections are refused from here on.
        for listener in self.listeners.drain(..) {
            let _ = self.selector.deregister(&listener.socket);
        }
        // One-shot registrations stop watching input that will not be read.
        let keys: Vec<ConnKey> = self.table.keys().collect();
        for key in keys {
            self.update_interest(key);
        }
    }

    fn on_readable(&mut self, key: ConnKey) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        match conn.input() {
            // While stopping, no new input is read, but messages a decoder
            // already holds are still delivered.
            Input::Deliver
                if conn.reads_input()
                    && (self.stopping.is_none()
                        || conn.decoder.as_ref().is_some_and(Decoder::has_backlog)) =>
            {
                if conn.decoder.is_some() {
                    self.read_framed(key)
                } else {
                    self.read_into_ring(key)
                }
            }
            // Not now: resuming puts it on the ready list. Until then, the
            // one-shot registration stays disarmed (see `update_interest`).
            Input::Deliver => conn.unread_input = true,
            Input::Ended => {}
            Input::Discard => self.discard_input(key),
        }
    }

    /// The poller reported a hangup or an error. A connection that reads will
    /// find out by reading, now or once its reading resumes; one that reads
    /// no more (after the peer's EOF, or while stopping) must be closed here,
    /// or the report would repeat.
    fn on_hangup(&mut self, key: ConnKey) {
        let reading = self.reading();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let finds_out = match conn.input() {
            Input::Deliver => reading,
            Input::Discard => true,
            Input::Ended => false,
        };
        if finds_out {
            if !conn.reads_input() {
                // Paused: the input before the reset is still to be delivered.
                conn.unread_input = true;
            }
            return;
        }
        let reason = match conn.socket.take_error() {
            Ok(Some(error)) => CloseReason::of_error(&error),
            _ => CloseReason::Reset,
        };
        self.close_now(key, Some(reason));
    }

    fn on_eof(&mut self, key: ConnKey) {
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        match conn.peer_finished() {
            AfterEof::Deliver => self.emit(DeliveryKind::Eof, key, None, None),
            AfterEof::Continue => {}
            AfterEof::Close(reason) => self.close_now(key, Some(reason)),
            AfterEof::Forget => self.close_now(key, None),
        }
    }

    /// Reads into delivery slots until the socket is drained, the ring is full,
    /// or the budget is spent. A read that fills a slot goes on into a larger
    /// buffer (see [`LARGE_READ`]), so that a burst of input reaches the
    /// consumer as one message rather than a slot's worth at a time.
    fn read_into_ring(&mut self, key: ConnKey) {
        let now = self.now;
        for _ in 0..READ_BUDGET {
            if !self.backlog.is_empty() || self.deliveries.free() == 0 || !self.has_share(key) {
                return self.mark_unread(key);
            }
            let room = self.ring_room();
            if room == 0 {
                return self.mark_unread(key);
            }
            let spill = room > self.slot_size && self.may_spill();
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            let read_fully = conn.read_fully;
            let LargeMessages { pool, account } = &mut self.large;
            let spill_size = self.spill_size;
            let mut slot = self.deliveries.vacant().expect("free() > 0");
            let (result, end) = slot.with_mut(|delivery| {
                account.reclaim(delivery);
                delivery.kind = DeliveryKind::Data;
                delivery.conn = key;
                delivery.opened = None;
                delivery.detail = None;
                let want = delivery.buf.len();
                let result = net::recv(&conn.socket, &mut delivery.buf);
                delivery.len = *result.as_ref().unwrap_or(&0);
                let end = match result {
                    Ok(n) if n == want && spill => {
                        let mut buffer = pool.take(spill_size);
                        buffer.extend_from_slice(&delivery.buf[..n]);
                        let limit = buffer.capacity().min(room);
                        let end = read_on(&conn.socket, &mut buffer, limit, read_fully);
                        account.place(delivery, buffer);
                        end
                    }
                    Ok(n) if n < want && !read_fully => ReadEnd::Drained,
                    _ => ReadEnd::Full,
                };
                (result.map(|_| delivery.len), end)
            });
            // The buffer the slot held before goes back for the next spill.
            self.large.settle();
            match result {
                // The slot stays unstaged, so it is still free.
                Ok(0) => return self.on_eof(key),
                Ok(n) => {
                    let position = slot.position();
                    slot.stage();
                    self.in_flight.push_back((position, key, n));
                    self.ring_bytes += n;
                    conn.in_ring += 1;
                    conn.last_activity = now;
                    self.counters.bytes_received += n as u64;
                    self.counters.messages_received += 1;
                    if self.deliveries.staged() >= PUBLISH_BATCH {
                        self.publish();
                    }
                    match end {
                        // A short read drained the socket: anything that
                        // arrives later raises a new edge (and re-arms a
                        // one-shot registration). Unless the poller said
                        // otherwise (an EOF behind the data, urgent data):
                        // then read on to EAGAIN.
                        ReadEnd::Drained => return self.mark_drained(key),
                        // A spilled read has had a turn's worth (16 slots'
                        // worth before); the ready list brings it back.
                        ReadEnd::Full if n > self.slot_size => return self.mark_unread(key),
                        ReadEnd::Full => {}
                        ReadEnd::Eof => return self.on_eof(key),
                        ReadEnd::Failed(e) => {
                            return self.close_now(key, Some(CloseReason::of_error(&e)))
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.mark_drained(key);
                }
                Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
            }
        }
        self.mark_unread(key);
    }

    /// How many more payload bytes raw reads may put in the ring now, within
    /// the ring's own size: at least a slot's worth, or 0. At 0 the loop
    /// waits for the consumer, as for a full ring (see `consumer_blocked_at`),
    /// rather than cut reads smaller than a slot.
    fn ring_room(&mut self) -> usize {
        if self.ring_bytes + self.slot_size > self.ring_byte_cap {
            self.settle_in_flight();
        }
        let room = self.ring_byte_cap.saturating_sub(self.ring_bytes);
        if room < self.slot_size {
            self.consumer_blocked_at = Some(self.deliveries.released());
            return 0;
        }
        room
    }

    /// True if a read that fills its slot may go on into a spill buffer: the
    /// budget of buffers in the ring has room. When it has none, the check
    /// (which takes back consumed slots' buffers) waits for the consumer to
    /// move on before it runs again, so that it does not scan the ring at
    /// every read.
    fn may_spill(&mut self) -> bool {
        if self.spill_size == 0 {
            return false;
        }
        if let Some(at) = self.spill_blocked_at {
            if self.deliveries.released() == at {
                return false;
            }
            self.spill_blocked_at = None;
        }
        let admitted = self
            .large
            .account
            .admit(self.spill_size, &mut self.deliveries);
        if !admitted {
            self.spill_blocked_at = Some(self.deliveries.released());
        }
        admitted
    }

    /// Reads into the I/O thread's scratch buffer and cuts what comes into
    /// messages, one delivery each, until the socket is drained, the ring is
    /// full, or the budget is spent. Messages the ring could not take wait in
    /// the decoder, and nothing more is read until they are delivered.
    fn read_framed(&mut self, key: ConnKey) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            let read_fully = conn.read_fully;
            let decoder = conn.decoder.as_mut().expect("a framed connection");
            let (outcome, read) = if decoder.has_backlog() {
                (self.deliver_messages(key, None), None)
            } else {
                if !self.backlog.is_empty() || self.deliveries.free() == 0 || !self.has_share(key) {
                    return self.mark_unread(key);
                }
                let Some(conn) = self.table.get_mut(key) else {
                    return;
                };
                match net::recv(&conn.socket, &mut self.scratch) {
                    Ok(0) => return self.on_eof(key),
                    Ok(n) => {
                        conn.last_activity = self.now;
                        self.counters.bytes_received += n as u64;
                        (self.deliver_messages(key, Some(n)), Some(n))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.mark_drained(key);
                    }
                    Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
                }
            };
            if self.deliveries.staged() >= PUBLISH_BATCH {
                self.publish();
            }
            self.track_message(key);
            if let Err(error) = outcome {
                // The consumer closes it once it has answered what came before.
                let Some(conn) = self.table.get_mut(key) else {
                    return;
                };
                if conn.input_failed(CloseReason::TooLarge) {
                    self.emit(DeliveryKind::TooLarge, key, None, Some(error.to_string()));
                    return self.discard_input(key);
                }
                // Its output had failed already: the peer is gone.
                return self.close_now(key, Some(CloseReason::Reset));
            }
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            if conn.decoder.as_ref().is_some_and(Decoder::has_backlog) {
                return self.mark_unread(key);
            }
            // A short read drained the socket (see `read_into_ring`).
            if read.is_some_and(|n| n < self.scratch.len()) && !read_fully {
                return self.mark_drained(key);
            }
        }
        self.mark_unread(key);
    }

    /// True if `key` may put another delivery in the ring: it holds less than
    /// its share. Otherwise the consumer must move on first, and the loop
    /// waits for it (see `consumer_blocked_at`), serving other connections.
    fn has_share(&mut self, key: ConnKey) -> bool {
        let below = |io: &Self| io.table.get(key).is_some_and(|c| c.in_ring < io.ring_share);
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
    fn settle_in_flight(&mut self) {
        let released = self.deliveries.released();
        while let Some(&(position, key, len)) = self.in_flight.front() {
            // Positions wrap: compare distances, not values.
            if released.wrapping_sub(position) as isize <= 0 {
                break;
            }
            self.in_flight.pop_front();
            self.ring_bytes -= len;
            if let Some(conn) = self.table.get_mut(key) {
                conn.in_ring -= 1;
            }
        }
    }

    /// Notes when the message `key` is receiving started, and arms its
    /// message timeout. A decoder holding messages the ring could not take is
    /// waiting for the server, not for the peer: the clock does not run then.
    fn track_message(&mut self, key: ConnKey) {
        let Some(timeout) = self.message_timeout else {
            return;
        };
        let now = self.now;
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let Some(decoder) = conn.decoder.as_ref() else {
            return;
        };
        let unfinished = decoder.in_message() && !decoder.has_backlog();
        conn.message_started = if unfinished {
            conn.message_started.or(Some(now))
        } else {
            None
        };
        if let (Some(started), false) = (conn.message_started, conn.message_timer_armed) {
            conn.message_timer_armed = true;
            self.timers
                .schedule((key, Deadline::Message), started + timeout);
        }
    }

    /// Closes the connections whose idle or message deadline has passed,
    /// resets those whose close made no progress, and schedules again the
    /// entries whose deadline moved later.
    fn expire_timers(&mut self) {
        let Io {
            timers,
            table,
            expired,
            idle_timeout,
            message_timeout,
            now,
            stopping,
            ..
        } = self;
        let now = *now;
        let stopping = stopping.is_some();
        timers.expire(now, |(key, deadline), _| {
            let conn = table.get_mut(key)?;
            if conn.reported_closed() {
                return None;
            }
            let (due, reason) = match deadline {
                Deadline::Idle => (
                    conn.last_activity + (*idle_timeout)?,
                    CloseReason::IdleTimeout,
                ),
                Deadline::Message => {
                    let timeout = (*message_timeout)?;
                    let Some(started) = conn.message_started else {
                        conn.message_timer_armed = false;
                        return None;
                    };
                    if conn.input() != Input::Deliver {
                        // Its input has ended: the message can never finish,
                        // and the close under way decides what follows.
                        conn.message_started = None;
                        conn.message_timer_armed = false;
                        return None;
                    }
                    let server_behind = stopping
                        || !conn.reads_input()
                        || conn.unread_input
                        || conn.decoder.as_ref().is_some_and(Decoder::has_backlog);
                    if server_behind {
                        // The server, not the peer, holds the message up.
                        conn.message_started = Some(now);
                        return Some(now + timeout);
                    }
                    (started + timeout, CloseReason::MessageTimeout)
                }
                Deadline::Drain => {
                    conn.closing_reason()?;
                    (
                        conn.last_activity + CLOSE_PROGRESS,
                        CloseReason::IdleTimeout,
                    )
                }
            };
            if due > now {
                return Some(due);
            }
            if deadline == Deadline::Message {
                conn.message_timer_armed = false;
            }
            expired.push((key, deadline, reason));
            None
        });
        let mut expired = std::mem::take(&mut self.expired);
        for (key, deadline, reason) in expired.drain(..) {
            let Some(conn) = self.table.get_mut(key) else {
                continue;
            };
            if deadline == Deadline::Drain || conn.closing_reason().is_some() {
                // Its close cannot finish (the peer takes nothing): reset it.
                self.abort(key, reason);
                continue;
            }
            self.close_or_cut(key, reason);
            if self
                .table
                .get(key)
                .is_some_and(|conn| conn.closing_reason().is_some())
            {
                // Output is still queued: the close must make progress.
                self.timers
                    .schedule((key, Deadline::Drain), self.now + CLOSE_PROGRESS);
            }
        }
        self.expired = expired;
        // The entries of connections closed since the last turn are stale:
        // drop them once they may outnumber the live ones, so that the heap
        // follows the open connections, not every connection of the last
        // `idle_timeout`. Each connection has at most one entry per kind
        // pending: `open` schedules the idle entry, `track_message` the
        // message entry only when none is armed, the expiry above the drain
        // entry once (its connection is closing from then on), and an entry
        // is scheduled again only when it fires.
        let table = &self.table;
        self.timers
            .compact(table.len() * Deadline::KINDS, |(key, _)| {
                table.get(key).is_some()
            });
        #[cfg(test)]
        self.shared.timer_entries.store(self.timers.len(), Relaxed);
    }

    /// Offers `key`'s messages to the delivery ring: those in the first `read`
    /// bytes of the scratch buffer, or (`None`) those its decoder kept.
    fn deliver_messages(
        &mut self,
        key: ConnKey,
        read: Option<usize>,
    ) -> Result<(), crate::framing::FrameError> {
        let Io {
            table,
            deliveries,
            backlog,
            large,
            scratch,
            consumer_blocked_at,
            counters,
            in_flight,
            ring_bytes,
            ring_share,
            ..
        } = self;
        let Some(conn) = table.get_mut(key) else {
            return Ok(());
        };
        let share = ring_share.saturating_sub(conn.in_ring);
        let Some(decoder) = conn.decoder.as_mut() else {
            return Ok(());
        };
        let account = &mut large.account;
        let mut blocked = false;
        let mut staged = 0;
        let sink = |message: Message<'_>| -> Result<(), Refused> {
            if !backlog.is_empty() || deliveries.free() == 0 {
                return Err(message.into());
            }
            if staged >= share {
                blocked = true;
                return Err(message.into());
            }
            if let Message::Owned(buffer) = &message {
                if !account.admit(buffer.capacity(), deliveries) {
                    blocked = true;
                    return Err(message.into());
                }
            }
            let mut slot = deliveries.vacant().expect("free() > 0");
            let len = slot.with_mut(|delivery| {
                account.reclaim(delivery);
                delivery.kind = DeliveryKind::Data;
                delivery.conn = key;
                delivery.opened = None;
                delivery.detail = None;
                match message {
                    Message::Slice(bytes) => {
                        delivery.buf[..bytes.len()].copy_from_slice(bytes);
                        delivery.len = bytes.len();
                    }
                    Message::Owned(buffer) => account.place(delivery, buffer),
                }
                delivery.len
            });
            in_flight.push_back((slot.position(), key, len));
            *ring_bytes += len;
            slot.stage();
            staged += 1;
            counters.messages_received += 1;
            Ok(())
        };
        let outcome = match read {
            Some(n) => decoder.feed(&scratch[..n], &mut large.pool, sink),
            None => decoder.pump(&mut large.pool, sink),
        };
        conn.in_ring += staged;
        large.settle();
        if blocked {
            *consumer_blocked_at = Some(deliveries.released());
        }
        outcome
    }

    /// Reads and drops input of a connection the application closed. EOF (or an
    /// error) ends a lingering connection.
    fn discard_input(&mut self, key: ConnKey) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.table.get_mut(key) else {
                return;
            };
            match net::recv(&conn.socket, &mut self.scratch) {
                Ok(0) => return self.on_eof(key),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.mark_drained(key);
                }
                Err(e) => return self.close_now(key, Some(CloseReason::of_error(&e))),
            }
        }
        self.mark_unread(key);
    }

    fn mark_unread(&mut self, key: ConnKey) {
        if let Some(conn) = self.table.get_mut(key) {
            conn.unread_input = true;
            if !conn.in_ready_list {
                conn.in_ready_list = true;
                self.ready.push_back(key);
            }
        }
    }

    fn mark_drained(&mut self, key: ConnKey) {
        if let Some(conn) = self.table.get_mut(key) {
            conn.unread_input = false;
            // Read to EAGAIN: whatever the poller warned of has been read.
            conn.read_fully = false;
        }
    }

    /// Tells the selector what the connection wants now (see
    /// [`Connection::interest`](crate::conn::Connection::interest)).
    fn update_interest(&mut self, key: ConnKey) {
        let reading = self.reading();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let interest = conn.interest(reading);
        if let Err(e) =
            self.selector
                .set_interest(&conn.socket, Token::connection(key.index, key.id), interest)
        {
            self.close_now(key, Some(CloseReason::of_error(&e)));
        }
    }

    fn accept_from(&mut self, index: usize) {
        for _ in 0..ACCEPT_BUDGET {
            // An accepted connection needs a slot for its `Opened`.
            if !self.backlog.is_empty() || self.deliveries.free() == 0 {
                self.listeners[index].pending = true;
                return;
            }
            match net::accept(&self.listeners[index].socket) {
                Ok(socket) if self.shared.hub.open.load(Relaxed) >= self.max_connections => {
                    drop(socket);
                    self.reject(CloseReason::Limit);
                }
                Ok(socket) => self.hand_out(socket),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listeners[index].pending = false;
                    return self.rearm_listener(index);
                }
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) => {
                    // EMFILE and friends: the clients stay queued in the kernel.
                    // Turn them away now with the reserve descriptor, and retry
                    // later rather than spin.
                    if net::is_out_of_descriptors(&e) {
                        self.turn_away_queued(index);
                    }
                    let listener = &mut self.listeners[index];
                    listener.pending = false;
                    listener.retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    self.report_accept_error(e);
                    return;
                }
            }
        }
        self.listeners[index].pending = true;
    }

    /// Out of descriptors: frees the reserve one, accepts and closes the
    /// clients queued on listener `index` (so they hear at once instead of
    /// waiting), then takes the reserve again.
    fn turn_away_queued(&mut self, index: usize) {
        if self.reserve.take().is_none() {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            match net::accept(&self.listeners[index].socket) {
                Ok(socket) => {
                    drop(socket);
                    self.counters.rejected(CloseReason::Limit);
                }
                Err(e) if is_transient_accept_error(&e) => {}
                Err(_) => break,
            }
        }
        self.reserve = net::ReserveFd::open();
    }

    /// Counts a connection turned away at `max_connections`, and reports
    /// the count at most once a second.
    fn reject(&mut self, reason: CloseReason) {
        self.counters.rejected(reason);
        self.unreported_rejections += 1;
        let now = Instant::now();
        if self
            .last_rejection_report
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return;
        }
        self.last_rejection_report = Some(now);
        let detail = format!(
            "max_connections ({}) reached: turned away {} connection(s)",
            self.max_connections, self.unreported_rejections
        );
        self.unreported_rejections = 0;
        self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
    }

    fn rearm_listener(&mut self, index: usize) {
        let listener = &self.listeners[index];
        let _ = self
            .selector
            .set_interest(&listener.socket, Token::listener(index), READABLE);
    }

    fn report_accept_error(&mut self, error: io::Error) {
        let now = Instant::now();
        if self
            .last_accept_error
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return;
        }
        self.last_accept_error = Some(now);
        let detail = format!("accepting a connection failed: {error}");
        self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
    }

    /// Gives an accepted connection to the engines in turn: opens it here,
    /// or hands it to another engine. Round-robin keeps the engines' shares
    /// equal whatever the kernel's accept order, on every platform, with a
    /// lock taken per connection, never per message.
    fn hand_out(&mut self, socket: Socket) {
        self.shared.hub.open.fetch_add(1, Relaxed);
        let target = self.next_engine;
        self.next_engine = (target + 1) % self.engines.len();
        if target == usize::from(self.shared.engine) {
            self.open(socket);
        } else if let Err(socket) = self.engines[target].hand_over(socket) {
            // That engine's loop has ended (it failed, or finished a stop
            // this one has not seen yet): serve it here.
            self.open(socket);
        }
    }

    /// Opens the connections other engines handed to this one; while
    /// stopping, closes them instead (the application never heard of them).
    fn open_arrivals(&mut self) {
        let mut arrivals = std::mem::take(&mut self.arrivals);
        self.shared.take_arrivals(&mut arrivals);
        for socket in arrivals.drain(..) {
            if self.reading() {
                self.open(socket);
            } else {
                self.shared.hub.open.fetch_sub(1, Relaxed);
                self.counters.rejected(CloseReason::Shutdown);
            }
        }
        self.arrivals = arrivals;
    }

    /// Refuses hand-overs from now on, and deals the connections handed to
    /// this engine and not opened yet to the other engines: a failing engine
    /// would only close them, while the others may serve them. A connection
    /// no engine takes (they have all ended) is closed.
    fn pass_on_arrivals(&mut self) {
        for socket in self.shared.arrivals.close() {
            let mut socket = Some(socket);
            for engine in self.engines.iter() {
                if engine.engine == self.shared.engine {
                    continue;
                }
                let Some(unserved) = socket.take() else {
                    break;
                };
                match engine.hand_over(unserved) {
                    Ok(()) => break,
                    Err(back) => socket = Some(back),
                }
            }
            if socket.is_some() {
                self.shared.hub.open.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Starts serving `socket`, counted in `hub.open` already.
    fn open(&mut self, socket: Socket) {
        let fd = net::raw_handle(&socket);
        let peer = net::peer_addr(&socket);
        let local = net::local_addr(&socket);
        let id = self.shared.hub.next_id();
        let key = self.table.insert(socket, id, self.now);
        if let Some(idle) = self.idle_timeout {
            self.timers.schedule((key, Deadline::Idle), self.now + idle);
        }
        let conn = self.table.get_mut(key).expect("just inserted");
        if self.framing != Framing::Raw {
            conn.decoder = Some(Decoder::new(
                self.framing,
                self.max_message_size,
                self.slot_size,
            ));
        }
        let opened = Opened {
            fd,
            peer,
            local,
            pending: conn.pending.clone(),
        };
        let token = Token::connection(key.index, key.id);
        if let Err(e) = self.selector.register(&conn.socket, token, READABLE) {
            self.table.remove(key);
            self.shared.hub.open.fetch_sub(1, Relaxed);
            let detail = format!("watching an accepted connection failed: {e}");
            self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
            return;
        }
        self.emit(DeliveryKind::Opened, key, Some(opened), None);
    }

    fn dispatch_events(&mut self) {
        for i in 0..self.events.len() {
            let event = self.events[i];
            match event.token.target() {
                Target::Listener(index) if index < self.listeners.len() => {
                    if self.listeners[index].retry_at.is_none() {
                        self.accept_from(index);
                    }
                }
                Target::Listener(_) => {}
                Target::Connection { index, id_bits } => {
                    let Some(conn) = self.table.slot_mut(index) else {
                        continue;
                    };
                    // The slot's tenant changed since the event was queued.
                    if !id_matches(conn.id, id_bits) {
                        continue;
                    }
                    conn.read_fully |= event.read_fully;
                    let key = ConnKey {
                        index,
                        engine: self.shared.engine,
                        id: conn.id,
                    };
                    if event.writable {
                        self.flush(key);
                    }
                    if event.readable {
                        self.on_readable(key);
                    }
                    if event.hangup {
                        self.on_hangup(key);
                    }
                    self.update_interest(key);
                }
            }
        }
    }

    /// Serves what earlier turns left: backlog, ready connections, listeners.
    fn serve_leftovers(&mut self) {
        self.drain_backlog();
        self.settle_in_flight();
        if self
            .consumer_blocked_at
            .is_some_and(|at| self.deliveries.released() != at)
        {
            self.consumer_blocked_at = None;
        }
        let now = Instant::now();
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if listener.retry_at.is_some_and(|at| at <= now) {
                listener.retry_at = None;
                listener.pending = true;
            }
            if self.listeners[index].pending {
                self.accept_from(index);
            }
        }
        for _ in 0..self.ready.len() {
            if !self.backlog.is_empty() || self.deliveries.free() == 0 {
                break;
            }
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.table.get_mut(key) else {
                continue;
            };
            conn.in_ready_list = false;
            if !conn.unread_input {
                continue;
            }
            conn.unread_input = false;
            self.on_readable(key);
            self.update_interest(key);
        }
    }

    fn expire_lingering(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, key)) = self.lingering.front() {
            if deadline > now {
                break;
            }
            self.lingering.pop_front();
            if let Some(conn) = self.table.get_mut(key) {
                if conn.phase() == (crate::conn::Phase::Lingering { deadline }) {
                    self.close_now(key, None);
                }
            }
        }
    }

    /// True if an earlier turn left work that needs delivery slots: control
    /// deliveries, connections with unread input, listeners with pending
    /// connections.
    fn has_deferred_work(&self) -> bool {
        !self.backlog.is_empty()
            || !self.ready.is_empty()
            || self.listeners.iter().any(|l| l.pending)
    }

    fn poll_timeout(&mut self) -> Option<Duration> {
        if self.has_deferred_work() && ring_has_room(&mut self.deliveries, self.consumer_blocked_at)
        {
            return Some(Duration::ZERO);
        }
        let deadlines = self
            .lingering
            .front()
            .map(|&(deadline, _)| deadline)
            .into_iter()
            .chain(self.listeners.iter().filter_map(|l| l.retry_at))
            .chain(self.stopping.as_ref().map(|s| s.deadline))
            .chain(self.timers.next_deadline());
        deadlines
            .min()
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Queues a control delivery, behind any that already wait.
    fn emit(
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
    fn try_deliver(&mut self, pending: Pending) -> Option<Pending> {
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

    fn drain_backlog(&mut self) {
        while let Some(pending) = self.backlog.pop_front() {
            if let Some(pending) = self.try_deliver(pending) {
                self.backlog.push_front(pending);
                return;
            }
        }
    }

    /// Makes staged deliveries visible and wakes the Python thread if it sleeps.
    fn publish(&mut self) {
        if self.deliveries.staged() > 0 {
            let held = (self.deliveries.capacity() - self.deliveries.free()) as u64;
            self.counters.ring_high_water = self.counters.ring_high_water.max(held);
            self.deliveries.publish();
            self.shared.hub.deliveries.ring();
        }
    }
}

/// Sends what follows the first `skip` bytes of `parts`, with one call.
fn send_from(socket: &Socket, parts: &[&[u8]], mut skip: usize) -> io::Result<usize> {
    let mut slices = [io::IoSlice::new(&[]); 3];
    let mut count = 0;
    for part in parts {
        let from = skip.min(part.len());
        skip -= from;
        if from < part.len() {
            slices[count] = io::IoSlice::new(&part[from..]);
            count += 1;
        }
    }
    match &slices[..count] {
        [one] => net::send(socket, one),
        several => net::send_vectored(socket, several),
    }
}

/// How a read into a delivery ended, when it read something.
enum ReadEnd {
    /// The socket has nothing more now (a short read, or `EAGAIN`).
    Drained,
    /// The buffer filled up: more may wait.
    Full,
    /// The peer's EOF came right behind the data.
    Eof,
    /// An error came right behind the data.
    Failed(io::Error),
}

/// Reads on into `buffer`'s spare capacity until the socket is drained or
/// the buffer holds `limit` bytes. With `read_fully`, a short read does not
/// count as drained (see `read_into_ring`).
fn read_on(socket: &Socket, buffer: &mut Vec<u8>, limit: usize, read_fully: bool) -> ReadEnd {
    debug_assert!(limit <= buffer.capacity());
    while buffer.len() < limit {
        let room = limit - buffer.len();
        match net::recv_spare(socket, buffer, room) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) if n < room && !read_fully => return ReadEnd::Drained,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
            Err(e) => return ReadEnd::Failed(e),
        }
    }
    ReadEnd::Full
}

/// True if the delivery ring can take what waits: it has free slots, and
/// input blocked on the consumer (`blocked_at`: its release count then) has
/// seen the consumer move on.
fn ring_has_room(deliveries: &mut Producer<Delivery>, blocked_at: Option<usize>) -> bool {
    deliveries.free() > 0 && blocked_at.is_none_or(|at| deliveries.released() != at)
}

/// Accept errors that concern one connection only (it was reset or refused
/// while queued); the next one may well succeed.
fn is_transient_accept_error(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR)
        )
    }
    #[cfg(not(unix))]
    {
        // A connection reset before it was accepted can also surface as
        // WSAENOTCONN (seen under Wine).
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
                | io::ErrorKind::Interrupted
        )
    }
}
