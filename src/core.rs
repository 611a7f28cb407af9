//! A running server, as the thread that drives it sees it: start the I/O
//! threads, take [`Delivery`]s from them, send them commands, stop them.
//!
//! A server runs `Config::io_threads` I/O threads ("engines"), each with its
//! own poller, connection table and pair of rings, so that every ring stays
//! single-producer/single-consumer. The first engine owns the listeners and
//! hands accepted connections to the engines in turn (see
//! [`crate::reactor`]); a [`ConnKey`] names its engine, and a [`Sender`]
//! routes each command to the engine of its connection. One [`Hub`] holds
//! what the engines share: the stop request, the bell the consumer waits on,
//! connection ids and counts, and each engine's counters.
//!
//! This is the whole engine without Python: the PyO3 layer
//! (`crate::python`) is a thin loop around [`Running`] that turns deliveries
//! into callbacks, and the Rust tests drive [`Running`] directly.
//!
//! Threads and ownership: each I/O thread owns its sockets, its connection
//! table, its delivery ring's producer and its command ring's consumer. The
//! thread that called [`Running::start`] owns every delivery ring's consumer.
//! A command ring's producer sits in a mutex in its engine's [`Shared`], so
//! that any thread can send: the mutex is held only for a copy into the ring,
//! never while waiting for a Python lock, and a sender that finds it taken or
//! the ring full can step back (release the GIL) before it blocks. Holding it
//! for a whole message keeps each message's bytes together and gives all
//! senders to one engine (so to one connection) one order, the order in which
//! they took the mutex.

use std::io;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::Socket;

use crate::framing::{Envelope, Framing};
use crate::handover::Arrivals;
use crate::message::{Command, CommandKind, ConnKey, Delivery, DeliveryKind, Loan};
use crate::reactor::Reactor;
use crate::ring::{ring, Consumer, Producer, ReleaseWatch};
use crate::stats::{Snapshot, Stats};
use crate::sys::{Backend, Selector, Wake};
use crate::wake::{Bell, IoSleep};

/// How a server is built.
#[derive(Clone, Debug)]
pub struct Config {
    /// The readiness backend.
    pub backend: Backend,
    /// Slots in each ring (a power of two).
    pub ring_slots: usize,
    /// Bytes of payload per slot, and the chunk size of copied sends. In raw
    /// mode, a read that fills a slot goes on into a larger pooled buffer.
    pub slot_size: usize,
    /// How input is cut into messages, and sends are framed.
    pub framing: Framing,
    /// The largest message a peer may send (line or declared length); larger
    /// closes the connection with `TooLarge`. Not used in raw mode.
    pub max_message_size: usize,
    /// Connections beyond this many are accepted and closed at once.
    pub max_connections: usize,
    /// Close a connection when no bytes went either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose message (framed modes only) started and did
    /// not finish within this long.
    pub message_timeout: Option<Duration>,
    /// Reading a connection stops while more than this many bytes wait in its
    /// output queue ...
    pub write_buffer_high: usize,
    /// ... and resumes once at most this many do.
    pub write_buffer_low: usize,
    /// I/O threads, each with its own poller and rings.
    pub io_threads: usize,
    /// Called first thing on each I/O thread (instrumentation, tests).
    pub on_io_thread_start: Option<fn()>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::platform_default(),
            ring_slots: 512,
            slot_size: 16 * 1024,
            framing: Framing::Raw,
            max_message_size: 1 << 20,
            max_connections: usize::MAX,
            idle_timeout: None,
            message_timeout: Some(Duration::from_secs(30)),
            write_buffer_high: 1 << 20,
            write_buffer_low: 256 << 10,
            io_threads: 1,
            on_io_thread_start: None,
        }
    }
}

impl Config {
    /// Smallest and largest accepted `slot_size`.
    pub const SLOT_SIZE_RANGE: (usize, usize) = (256, 1 << 20);
    /// Smallest and largest accepted `max_message_size`.
    pub const MAX_MESSAGE_SIZE_RANGE: (usize, usize) = (1, 1 << 30);
    /// Smallest and largest accepted `ring_slots`.
    pub const RING_SLOTS_RANGE: (usize, usize) = (2, 1 << 16);
    /// Smallest and largest accepted `io_threads`.
    pub const IO_THREADS_RANGE: (usize, usize) = (1, 256);

    /// Explains what is wrong with the configuration, if anything.
    pub fn validate(&self) -> Result<(), String> {
        let (min, max) = Self::RING_SLOTS_RANGE;
        if !self.ring_slots.is_power_of_two() || !(min..=max).contains(&self.ring_slots) {
            return Err(format!(
                "ring_slots must be a power of two from {min} to {max}, got {}",
                self.ring_slots
            ));
        }
        let (min, max) = Self::SLOT_SIZE_RANGE;
        if !(min..=max).contains(&self.slot_size) {
            return Err(format!(
                "slot_size must be from {min} to {max} bytes, got {}",
                self.slot_size
            ));
        }
        let (min, max) = Self::IO_THREADS_RANGE;
        if !(min..=max).contains(&self.io_threads) {
            return Err(format!(
                "io_threads must be from {min} to {max}, got {}",
                self.io_threads
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be positive".into());
        }
        for (name, timeout) in [
            ("idle_timeout", self.idle_timeout),
            ("message_timeout", self.message_timeout),
        ] {
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(format!("{name} must be positive (or None for no timeout)"));
            }
        }
        let (min, max) = Self::MAX_MESSAGE_SIZE_RANGE;
        if !(min..=max).contains(&self.max_message_size) {
            return Err(format!(
                "max_message_size must be from {min} to {max} bytes, got {}",
                self.max_message_size
            ));
        }
        if self.write_buffer_high == 0 || self.write_buffer_low > self.write_buffer_high {
            return Err(format!(
                "write_buffer_low ({}) must not exceed write_buffer_high ({}), which must be positive",
                self.write_buffer_low, self.write_buffer_high
            ));
        }
        Ok(())
    }
}

/// The next connection id; see [`Hub::next_id`]. At a million connections a
/// second, 64 bits last half a million years.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// What the engines of one server share.
pub(crate) struct Hub {
    /// Set to ask every engine to shut down.
    pub(crate) stop: AtomicBool,
    /// How long a stop may take to flush output, in nanoseconds; written
    /// before `stop` is set.
    stop_timeout_ns: AtomicU64,
    /// Rung by an engine after it publishes deliveries: the consumer waits
    /// on all the delivery rings with this one bell.
    pub(crate) deliveries: Bell,
    /// Connections accepted and not yet closed, across engines (checked
    /// against `max_connections` by the accepting engine).
    pub(crate) open: AtomicUsize,
    /// Each engine's counters.
    stats: Box<[Stats]>,
    /// Each engine's poller waker.
    wakers: Box<[Arc<dyn Wake>]>,
}

impl Hub {
    /// How long the stop under way may take to flush output.
    pub(crate) fn stop_timeout(&self) -> Duration {
        Duration::from_nanos(self.stop_timeout_ns.load(Acquire))
    }

    /// A fresh connection id, never given out before in this process: not
    /// by another engine, nor in an earlier run of the same server (each
    /// `listen()` makes a new `Hub`, so the counter cannot live here).
    pub(crate) fn next_id(&self) -> u64 {
        NEXT_CONNECTION_ID.fetch_add(1, Relaxed)
    }

    /// The server's counters: every engine's, added up.
    fn snapshot(&self) -> Snapshot {
        self.stats
            .iter()
            .map(Stats::snapshot)
            .fold(Snapshot::default(), |total, one| total.merge(&one))
    }

    /// Asks every engine to shut down; see [`Sender::stop`].
    fn stop(&self, timeout: Duration) {
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        if !self.stop.load(Acquire) {
            self.stop_timeout_ns.store(nanos, Release);
        }
        self.stop.store(true, Release);
        // Pairs with the fence in each I/O thread's sleep announcement, as
        // for commands: either it sees the flag before sleeping or it is woken.
        fence(SeqCst);
        for waker in self.wakers.iter() {
            let _ = waker.wake();
        }
    }
}

/// State shared by one engine's I/O thread and every thread that sends to it.
pub(crate) struct Shared {
    /// What all the engines share.
    pub(crate) hub: Arc<Hub>,
    /// This engine's number, counting from 0.
    pub(crate) engine: u16,
    /// Producer of the command ring; see the module docs for the locking rule.
    commands: Mutex<Producer<Command>>,
    /// How far the I/O thread has consumed commands: when lent bytes are free.
    commands_released: ReleaseWatch<Command>,
    slot_size: usize,
    /// Rung by the I/O thread after it frees command slots.
    pub(crate) command_space: Bell,
    /// The I/O thread's sleep in the selector, and who wakes it.
    pub(crate) io_sleep: IoSleep,
    /// The I/O thread no longer applies commands.
    pub(crate) finished: AtomicBool,
    /// Connections another engine accepted for this one; closed once the
    /// engine's loop has ended (or failed): nothing is handed over then.
    pub(crate) arrivals: Arrivals<Socket>,
    waker: Arc<dyn Wake>,
    /// Entries in the I/O thread's timer heap, as of its last expiry (tests
    /// of the heap's bound).
    #[cfg(test)]
    pub(crate) timer_entries: AtomicUsize,
    /// A `Hold` command's state: 0 free, 1 holding (the I/O thread waits in
    /// the command until a test stores 0).
    #[cfg(test)]
    pub(crate) test_hold: AtomicUsize,
}

impl Shared {
    /// This engine's counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.hub.stats[usize::from(self.engine)]
    }

    /// Wakes the I/O thread if it sleeps (after publishing commands).
    fn wake_io(&self) {
        if self.io_sleep.wake_for_commands() {
            let _ = self.waker.wake();
        }
    }

    /// Waits until the test that sent `Hold` lets this I/O thread go.
    #[cfg(test)]
    pub(crate) fn hold_for_test(&self) {
        self.test_hold.store(1, Release);
        while self.test_hold.load(Acquire) == 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Hands `socket`, accepted by another engine, to this one.
    /// Gives it back if this engine's loop has ended.
    pub(crate) fn hand_over(&self, socket: Socket) -> Result<(), Socket> {
        self.arrivals.hand_over(socket)?;
        // After the flag is set: see `crate::handover`.
        self.wake_io();
        Ok(())
    }

    /// Refuses hand-overs from now on and closes the sockets still parked,
    /// uncounting them from `hub.open`. Idempotent.
    pub(crate) fn close_arrivals(&self) {
        let parked = self.arrivals.close();
        self.hub.open.fetch_sub(parked.len(), Relaxed);
    }

    /// Takes the connections handed over so far, into `into`.
    pub(crate) fn take_arrivals(&self, into: &mut Vec<Socket>) {
        self.arrivals.take(into);
    }
}

/// How long a stop may flush output unless told otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server dropped without being stopped gives queued output.
pub const ABANDON_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a command was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Another thread is sending, or the ring lacks room: retry with
    /// `wait` set, which waits.
    WouldBlock,
    /// The connection's close was already requested (its latch is set).
    Closing,
    /// The server has stopped; nothing was or will be sent.
    Stopped,
}

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
    engines: Arc<[Arc<Shared>]>,
}

impl Sender {
    /// The engine that serves `conn`.
    fn engine(&self, conn: ConnKey) -> Result<&Shared, SendError> {
        self.engines
            .get(usize::from(conn.engine))
            .map(|shared| &**shared)
            .ok_or(SendError::Stopped)
    }

    fn hub(&self) -> &Hub {
        &self.engines[0].hub
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
        self.engines[usize::from(ticket.engine)]
            .commands_released
            .has_released(ticket.position)
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

    /// Asks the I/O thread to shut down, giving queued output up to `timeout`
    /// to go out. Safe from any thread, any time; the first stop's timeout
    /// stands.
    pub fn stop(&self, timeout: Duration) {
        self.hub().stop(timeout);
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

impl Shared {
    /// Queues a command (several, for `parts` longer than a slot) and returns
    /// the ring position of the last one. A `loan` goes in one command with
    /// `parts`, its header and trailer, which must fit a slot.
    fn push(
        &self,
        kind: CommandKind,
        conn: ConnKey,
        mut parts: [&[u8]; 3],
        loan: Option<Loan>,
        latch: Option<&AtomicBool>,
        wait: bool,
    ) -> Result<usize, SendError> {
        let shared = self;
        if shared.finished.load(Acquire) {
            return Err(SendError::Stopped);
        }
        let mut producer = if wait {
            shared
                .commands
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        } else {
            match shared.commands.try_lock() {
                Ok(producer) => producer,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return Err(SendError::WouldBlock),
            }
        };
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let chunks = total.div_ceil(shared.slot_size).max(1);
        debug_assert!(loan.is_none() || chunks == 1);
        if !wait && !producer.has_room_for(chunks) {
            return Err(SendError::WouldBlock);
        }
        if let Some(latch) = latch {
            // Under the lock: see `Sender::request`.
            match kind {
                CommandKind::Send if latch.load(Relaxed) => return Err(SendError::Closing),
                CommandKind::Close if latch.swap(true, Relaxed) => return Err(SendError::Closing),
                CommandKind::Abort => latch.store(true, Relaxed),
                _ => {}
            }
        }
        let mut rest = total;
        let mut position = 0;
        for _ in 0..chunks {
            let len = rest.min(shared.slot_size);
            rest -= len;
            let more = rest > 0;
            loop {
                if let Some(mut slot) = producer.vacant() {
                    slot.with_mut(|command| {
                        command.kind = kind;
                        command.conn = conn;
                        command.len = len;
                        command.more = more;
                        command.loan = loan;
                        fill(&mut command.buf[..len], &mut parts);
                    });
                    position = slot.position();
                    slot.stage();
                    break;
                }
                // Full: let the I/O thread work on what is staged, and wait.
                producer.publish();
                shared.wake_io();
                if shared.finished.load(Acquire) {
                    return Err(SendError::Stopped);
                }
                shared.command_space.wait_while(
                    || producer.free() == 0 && !shared.finished.load(Acquire),
                    Some(Duration::from_millis(50)),
                );
            }
        }
        producer.publish();
        drop(producer);
        shared.wake_io();
        if kind == CommandKind::Send {
            shared.stats().message_sent();
        }
        Ok(position)
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

/// Fills `buf` from the front of `parts`, in order, advancing them past what
/// was copied.
fn fill(buf: &mut [u8], parts: &mut [&[u8]]) {
    let mut filled = 0;
    for part in parts.iter_mut() {
        let n = part.len().min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&part[..n]);
        *part = &part[n..];
        filled += n;
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

/// A started server, held by the thread that consumes its deliveries.
///
/// Dropping it stops the I/O threads and joins them, so no thread or socket
/// outlives it.
pub struct Running {
    engines: Vec<Engine>,
    sender: Sender,
    /// The engine deliveries are taken from now ...
    cursor: usize,
    /// ... and how many in a row, so that a busy engine cannot starve the
    /// others' connections.
    streak: usize,
}

/// The consumer's side of one engine.
struct Engine {
    shared: Arc<Shared>,
    deliveries: Consumer<Delivery>,
    thread: Option<JoinHandle<()>>,
    stopped_seen: bool,
}

impl Engine {
    /// True if the consumer may sleep as far as this engine goes: nothing to
    /// take, and not finished with a `Stopped` still to come (an engine whose
    /// thread exited without one, `vanished`, is quiet too: nothing more
    /// will come from it).
    fn is_quiet(&mut self) -> bool {
        let gone = self.thread.as_ref().is_none_or(|t| t.is_finished());
        self.deliveries.is_empty()
            && (self.stopped_seen || !self.shared.finished.load(Acquire) || gone)
    }

    /// True if its I/O thread exited without delivering `Stopped`.
    fn vanished(&mut self) -> bool {
        !self.stopped_seen
            && self.shared.finished.load(Acquire)
            && self.deliveries.is_empty()
            && self.thread.as_ref().is_some_and(|t| t.is_finished())
    }
}

/// Deliveries taken from one engine in a row while others have some.
const ENGINE_STREAK: usize = 32;

impl Running {
    /// Starts the I/O threads serving `listeners`.
    ///
    /// Errors come from creating the pollers or registering the listeners, on
    /// the calling thread.
    pub fn start(config: &Config, listeners: Vec<Socket>) -> io::Result<Running> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match config.backend {
            #[cfg(target_os = "linux")]
            Backend::Epoll => Self::start_with::<crate::sys::epoll::Epoll>(config, listeners),
            #[cfg(not(target_os = "linux"))]
            Backend::Epoll => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the epoll backend exists only on Linux",
            )),
            Backend::Portable => {
                Self::start_with::<crate::sys::portable::Portable>(config, listeners)
            }
        }
    }

    fn start_with<S: Selector>(config: &Config, listeners: Vec<Socket>) -> io::Result<Running> {
        let count = config.io_threads;
        let selectors = (0..count)
            .map(|_| S::new())
            .collect::<io::Result<Vec<S>>>()?;
        let hub = Arc::new(Hub {
            stop: AtomicBool::new(false),
            stop_timeout_ns: AtomicU64::new(DEFAULT_STOP_TIMEOUT.as_nanos() as u64),
            deliveries: Bell::new(),
            open: AtomicUsize::new(0),
            stats: (0..count).map(|_| Stats::default()).collect(),
            wakers: selectors.iter().map(Selector::waker).collect(),
        });
        let mut rings = Vec::with_capacity(count);
        let mut engines = Vec::with_capacity(count);
        for (index, selector) in selectors.iter().enumerate() {
            let (command_tx, command_rx) = ring(config.ring_slots, || {
                Command::with_capacity(config.slot_size)
            });
            let (delivery_tx, delivery_rx) = ring(config.ring_slots, || {
                Delivery::with_capacity(config.slot_size)
            });
            engines.push(Arc::new(Shared {
                hub: Arc::clone(&hub),
                engine: u16::try_from(index).expect("io_threads is validated"),
                commands_released: command_tx.release_watch(),
                commands: Mutex::new(command_tx),
                slot_size: config.slot_size,
                command_space: Bell::new(),
                io_sleep: IoSleep::new(),
                finished: AtomicBool::new(false),
                arrivals: Arrivals::new(),
                waker: selector.waker(),
                #[cfg(test)]
                timer_entries: AtomicUsize::new(0),
                #[cfg(test)]
                test_hold: AtomicUsize::new(0),
            }));
            rings.push((delivery_tx, delivery_rx, command_rx));
        }
        let engines: Arc<[Arc<Shared>]> = engines.into();
        // Every reactor is built (and the listeners registered) before any
        // thread starts, so that an error leaves nothing running.
        let mut listeners = Some(listeners);
        let mut reactors = Vec::with_capacity(count);
        let mut consumers = Vec::with_capacity(count);
        for (selector, (shared, (delivery_tx, delivery_rx, command_rx))) in
            selectors.into_iter().zip(engines.iter().zip(rings))
        {
            reactors.push(Reactor::new(
                config,
                selector,
                Arc::clone(shared),
                Arc::clone(&engines),
                delivery_tx,
                command_rx,
                // The first engine accepts, for all of them.
                listeners.take().unwrap_or_default(),
            )?);
            consumers.push(delivery_rx);
        }
        let mut running = Running {
            engines: Vec::with_capacity(count),
            sender: Sender {
                engines: Arc::clone(&engines),
            },
            cursor: 0,
            streak: 0,
        };
        for ((mut reactor, deliveries), shared) in
            reactors.into_iter().zip(consumers).zip(engines.iter())
        {
            let on_start = config.on_io_thread_start;
            let exit_guard = ExitGuard(Arc::clone(shared));
            let name = match count {
                1 => "rsepoll-io".to_owned(),
                _ => format!("rsepoll-io-{}", shared.engine),
            };
            // On an error, dropping `running` stops and joins the threads
            // started so far; the reactors not started drop their sockets.
            let thread = std::thread::Builder::new().name(name).spawn(move || {
                let _exit_guard = exit_guard;
                block_signals();
                run_io_thread(&mut reactor, on_start);
            })?;
            running.engines.push(Engine {
                shared: Arc::clone(shared),
                deliveries,
                thread: Some(thread),
                stopped_seen: false,
            });
        }
        Ok(running)
    }

    /// A handle for sending commands from any thread.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Takes the next delivery, if one is ready, and reads it with `f`. The
    /// slot stays reserved until [`Running::release`]. Engines take turns, at
    /// most [`ENGINE_STREAK`] deliveries in a row while another has some.
    ///
    /// A `Draining` delivery is answered here, after `f` has seen it: every
    /// delivery before it has been handled by then, so the `Shutdown` command
    /// queues behind every reply the consumer made to them. A `Failed` one
    /// stops the other engines too.
    pub fn take_with<R>(&mut self, f: impl FnOnce(&Delivery) -> R) -> Option<R> {
        let count = self.engines.len();
        let mut tried = 0;
        while self.streak >= ENGINE_STREAK || self.engines[self.cursor].deliveries.ready() == 0 {
            tried += 1;
            if tried > count {
                return None;
            }
            self.cursor = (self.cursor + 1) % count;
            self.streak = 0;
        }
        self.streak += 1;
        let engine = &mut self.engines[self.cursor];
        let mut kind = None;
        let result = engine.deliveries.take_with(|delivery| {
            kind = Some(delivery.kind);
            f(delivery)
        });
        match kind {
            Some(DeliveryKind::Stopped) => engine.stopped_seen = true,
            Some(DeliveryKind::Draining) => {
                // Fails only once the I/O thread has finished: nothing to answer.
                let _ = engine.shared.push(
                    CommandKind::Shutdown,
                    ConnKey::default(),
                    [&[]; 3],
                    None,
                    None,
                    true,
                );
            }
            Some(DeliveryKind::Failed) => self.sender.stop(DEFAULT_STOP_TIMEOUT),
            _ => {}
        }
        result
    }

    /// Number of deliveries taken since the last release.
    pub fn taken(&self) -> usize {
        self.engines.iter().map(|e| e.deliveries.taken()).sum()
    }

    /// Returns the slots taken so far to the I/O threads, waking one that
    /// waits for them.
    pub fn release(&mut self) {
        for engine in &mut self.engines {
            if engine.deliveries.taken() == 0 {
                continue;
            }
            engine.deliveries.release();
            if engine.shared.io_sleep.wake_for_room() {
                let _ = engine.shared.waker.wake();
            }
        }
    }

    /// Blocks until a delivery is ready or `timeout` passes (or spuriously).
    pub fn wait(&mut self, timeout: Duration) {
        let Running {
            engines, sender, ..
        } = self;
        sender
            .hub()
            .deliveries
            .wait_while(|| engines.iter_mut().all(Engine::is_quiet), Some(timeout));
    }

    /// True once the I/O thread is done with the bytes lent for `ticket`.
    pub fn has_returned(&self, ticket: Ticket) -> bool {
        self.sender.has_returned(ticket)
    }

    /// True once every engine's `Stopped` delivery has been taken: the I/O
    /// threads have closed everything and will deliver nothing more.
    pub fn has_stopped(&self) -> bool {
        self.engines.iter().all(|e| e.stopped_seen)
    }

    /// True if an I/O thread exited without delivering `Stopped` (it could
    /// not even report its failure).
    pub fn io_thread_vanished(&mut self) -> bool {
        self.engines.iter_mut().any(Engine::vanished)
    }

    /// Asks the I/O threads to shut down, giving queued output up to
    /// `timeout` to go out; deliveries continue until `Stopped`.
    pub fn stop(&self, timeout: Duration) {
        self.sender.stop(timeout);
    }

    /// Waits for the I/O threads to exit. Call after `Stopped` was taken (or
    /// a thread vanished); otherwise this stops the server first, discarding
    /// deliveries (it answers `Draining` as any consumer does, so connections
    /// whose output has gone out end with FIN, and output still queued gets
    /// [`ABANDON_TIMEOUT`] before a reset).
    pub fn join(&mut self) {
        let running =
            |e: &Engine| !e.stopped_seen && e.thread.as_ref().is_some_and(|t| !t.is_finished());
        if self.engines.iter().any(running) {
            self.stop(ABANDON_TIMEOUT);
            while self.engines.iter().any(running) {
                while self.take_with(|_| ()).is_some() {}
                self.release();
                self.wait(Duration::from_millis(10));
            }
        }
        for engine in &mut self.engines {
            if let Some(thread) = engine.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Joining holds whatever the dropping thread holds (the GIL, on error paths of
/// `listen()`); that is safe because the I/O threads never wait for it.
impl Drop for Running {
    fn drop(&mut self) {
        self.join();
    }
}

/// Marks an I/O thread finished however it ends, so that no sender or
/// consumer waits for it again.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.finished.store(true, Release);
        self.0.close_arrivals();
        self.0.hub.deliveries.ring();
        self.0.command_space.ring();
    }
}

/// The I/O thread's body: run the loop; on a panic or an I/O error, report it
/// and shut down anyway. Reports travel as deliveries: this thread never logs,
/// because logging reaches Python's `logging` and would need the GIL.
fn run_io_thread<S: Selector>(reactor: &mut Reactor<S>, on_start: Option<fn()>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(hook) = on_start {
            hook();
        }
        reactor.run()
    }));
    let detail = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(error)) => format!("the I/O loop failed: {error}"),
        Err(panic) => format!("the I/O thread panicked: {}", panic_message(&*panic)),
    };
    // If shutting down panics too, the thread ends without `Stopped`; the
    // consumer notices through `Running::io_thread_vanished`.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reactor.fail(detail)));
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Keeps asynchronous signals (Ctrl-C above all) off the I/O thread, so that
/// the kernel delivers them to a thread that runs Python code.
fn block_signals() {
    #[cfg(unix)]
    {
        // SAFETY: `set` is a local sigset_t initialised by sigfillset before use;
        // pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpStream;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    fn listener() -> (Socket, u16) {
        let socket = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let address: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&address.into()).unwrap();
        socket.listen(16).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        (socket, port)
    }

    /// A server on a fresh listener with one client connected and accepted:
    /// the server, the client (reads time out after 10 s) and its key.
    fn start_with_client(config: &Config) -> (Running, TcpStream, ConnKey) {
        let (socket, port) = listener();
        let mut running = Running::start(config, vec![socket]).unwrap();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let key = loop {
            assert!(Instant::now() < deadline, "connection not accepted");
            match running.take_with(|d| (d.kind, d.conn)) {
                Some((DeliveryKind::Opened, key)) => break key,
                _ => running.wait(Duration::from_millis(10)),
            }
        };
        running.release();
        (running, client, key)
    }

    /// Takes deliveries until `Stopped`, returning their kinds in order.
    fn drain_to_stopped(running: &mut Running) -> Vec<DeliveryKind> {
        let mut kinds = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !running.has_stopped() {
            assert!(Instant::now() < deadline, "no Stopped delivery");
            while let Some(kind) = running.take_with(|d| d.kind) {
                kinds.push(kind);
            }
            running.release();
            running.wait(Duration::from_millis(10));
        }
        kinds
    }

    #[test]
    fn a_panic_on_the_io_thread_is_reported_and_closes_everything() {
        for backend in [Backend::Portable, Backend::platform_default()] {
            let config = Config {
                backend,
                ..Config::default()
            };
            // The connection is accepted before the thread breaks.
            let (mut running, mut client, _) = start_with_client(&config);
            running.sender().inject_panic(0);
            let kinds = drain_to_stopped(&mut running);
            assert_eq!(
                kinds,
                vec![
                    DeliveryKind::Failed,
                    DeliveryKind::Closed(crate::conn::CloseReason::Shutdown),
                    DeliveryKind::Stopped
                ],
                "{backend:?}"
            );
            // The client sees the connection end, and senders give up at once.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            assert_eq!(
                running.sender().send(ConnKey::default(), b"late"),
                Err(SendError::Stopped)
            );
            running.join();
        }
    }

    /// A connection the accepting engine deals to an engine whose
    /// loop has ended (here it failed, and the consumer has not taken
    /// `Failed` yet, as while a long callback runs) must not be parked where
    /// nobody serves or closes it: it is served by a live engine instead.
    #[test]
    fn a_connection_dealt_to_a_finished_engine_is_served_by_a_live_one() {
        use std::sync::atomic::Ordering::Relaxed;
        let (socket, port) = listener();
        let config = Config {
            io_threads: 2,
            ..Config::default()
        };
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let sender = running.sender();
        sender.inject_panic(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sender.engines[1].finished.load(Acquire) {
            assert!(Instant::now() < deadline, "engine 1 did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Dealt in turn: the first to engine 0, the second to engine 1.
        let _served = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut stranded = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // Engine 0's deliveries only: taking engine 1's `Failed` would stop
        // the server.
        let mut opened_on_0 = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && opened_on_0 < 2 {
            match running.engines[0].deliveries.take_with(|d| d.kind) {
                Some(DeliveryKind::Opened) => opened_on_0 += 1,
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        running.engines[0].deliveries.release();
        stranded
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        let outcome = stranded.read(&mut byte);
        let open = sender.hub().open.load(Relaxed);
        // Set by every hand-over, cleared only by the engine taking them.
        let parked = sender.engines[1].arrivals.may_have_arrivals();
        running.join();
        assert!(
            !parked && opened_on_0 == 2 && open == 2,
            "a socket parked in engine 1: {parked}; opened by engine 0: {opened_on_0} (2 expected); \
             hub.open = {open}; the second client's read: {outcome:?}"
        );
        // Once engine 1 is gone for good, nothing is counted for it.
        drop(running);
        assert_eq!(sender.hub().open.load(Relaxed), 0);
    }

    /// Takes deliveries until `opened` more `Opened` and `closed` more
    /// `Closed` were seen; returns the keys opened.
    fn take_until(running: &mut Running, opened: usize, closed: usize) -> Vec<ConnKey> {
        let (mut keys, mut closes) = (Vec::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while keys.len() < opened || closes < closed {
            assert!(
                Instant::now() < deadline,
                "{} of {opened} opened, {closes} of {closed} closed",
                keys.len()
            );
            match running.take_with(|d| (d.kind, d.conn)) {
                Some((DeliveryKind::Opened, key)) => keys.push(key),
                Some((DeliveryKind::Closed(_), _)) => closes += 1,
                Some(_) => {}
                None => running.wait(Duration::from_millis(10)),
            }
            running.release();
        }
        keys
    }

    /// Issue 13, item 5: with a long idle timeout, every connection leaves an
    /// entry in the timer heap when it closes. The heap must follow the
    /// connections that are open, not every connection there ever was.
    #[test]
    fn the_timer_heap_is_bounded_by_open_connections_under_churn() {
        const CHURN: usize = 2000;
        const AT_ONCE: usize = 10;
        for (backend, io_threads) in [
            (Backend::Portable, 1),
            (Backend::platform_default(), 1),
            (Backend::platform_default(), 2),
        ] {
            let config = Config {
                backend,
                io_threads,
                idle_timeout: Some(Duration::from_secs(3600)),
                ..Config::default()
            };
            let (socket, port) = listener();
            let mut running = Running::start(&config, vec![socket]).unwrap();
            for _ in 0..CHURN / AT_ONCE {
                let clients: Vec<TcpStream> = (0..AT_ONCE)
                    .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
                    .collect();
                take_until(&mut running, AT_ONCE, 0);
                for client in clients {
                    // A reset: the server closes it at once.
                    socket2::SockRef::from(&client)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
                take_until(&mut running, 0, AT_ONCE);
            }
            // One connection more: each engine's count is as of a turn in
            // which the closes above had all happened.
            let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            take_until(&mut running, 1, 0);
            let sender = running.sender();
            let entries: usize = sender
                .engines
                .iter()
                .map(|e| e.timer_entries.load(Relaxed))
                .sum();
            running.stop(Duration::from_secs(1));
            drain_to_stopped(&mut running);
            running.join();
            // Per engine: at most twice the live entries (one per open
            // connection here) plus the slack the heap allows itself.
            let bound = io_threads * (2 * 3 + crate::timer::COMPACT_SLACK);
            assert!(
                entries <= bound,
                "{backend:?}, io_threads={io_threads}: {entries} timer entries \
                 after {CHURN} connections came and went (1 open; at most {bound} expected)"
            );
        }
    }

    /// Issue 13, item 7: connections dealt to an engine that fails before it
    /// has opened them (parked in its hand-over list while it is busy) are
    /// served by a live engine, not closed by the failing one.
    #[test]
    fn connections_parked_in_an_engine_that_fails_are_served_by_a_live_one() {
        for backend in [Backend::Portable, Backend::platform_default()] {
            let (socket, port) = listener();
            let config = Config {
                backend,
                io_threads: 2,
                ..Config::default()
            };
            let mut running = Running::start(&config, vec![socket]).unwrap();
            let sender = running.sender();
            let deadline = Instant::now() + Duration::from_secs(10);
            // Engine 1 is busy in a command, with a panic queued behind it.
            sender.inject(1, CommandKind::Hold);
            while sender.engines[1].test_hold.load(Acquire) != 1 {
                assert!(Instant::now() < deadline, "engine 1 did not hold");
                std::thread::sleep(Duration::from_millis(1));
            }
            sender.inject_panic(1);
            // Dealt in turn: the first to engine 0, the second to engine 1,
            // where it waits in the hand-over list.
            let _served = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut parked = TcpStream::connect(("127.0.0.1", port)).unwrap();
            while !sender.engines[1].arrivals.may_have_arrivals() {
                assert!(Instant::now() < deadline, "nothing handed to engine 1");
                std::thread::sleep(Duration::from_millis(1));
            }
            // Engine 1 goes on to the panic, and fails.
            sender.engines[1].test_hold.store(0, Release);
            while !sender.engines[1].finished.load(Acquire) {
                assert!(Instant::now() < deadline, "engine 1 did not end");
                std::thread::sleep(Duration::from_millis(1));
            }
            // Engine 0's deliveries only: taking engine 1's `Failed` would
            // stop the server.
            let mut opened_on_0 = 0;
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && opened_on_0 < 2 {
                match running.engines[0].deliveries.take_with(|d| d.kind) {
                    Some(DeliveryKind::Opened) => opened_on_0 += 1,
                    Some(_) => {}
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            running.engines[0].deliveries.release();
            parked
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let outcome = parked.read(&mut [0u8; 1]);
            let open = sender.hub().open.load(Relaxed);
            running.join();
            assert!(
                opened_on_0 == 2 && open == 2,
                "{backend:?}: opened by engine 0: {opened_on_0} (2 expected); hub.open = \
                 {open}; the parked client's read: {outcome:?} (a timeout expected)"
            );
            assert!(outcome.is_err(), "{backend:?}: {outcome:?}");
        }
    }

    #[test]
    fn lent_bytes_go_out_whole_with_their_envelope_and_come_back() {
        use crate::framing::{envelope, PrefixWidth};
        // Larger than the socket takes at once: the rest is copied into the
        // connection's queue, and the loan returns before it is all written.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for backend in [Backend::Portable, Backend::platform_default()] {
            for framing in [
                Framing::Raw,
                Framing::Line,
                Framing::Length(PrefixWidth::Four),
            ] {
                let config = Config {
                    backend,
                    ..Config::default()
                };
                let (mut running, mut client, key) = start_with_client(&config);
                let payload = if framing == Framing::Line {
                    &payload[..payload.len() / 2]
                        .iter()
                        .map(|b| b | 0x80)
                        .collect::<Vec<u8>>()
                } else {
                    &payload
                };
                let envelope = envelope(framing, payload.len()).unwrap();
                let framed = (framing != Framing::Raw).then_some(&envelope);
                let sender = running.sender();
                // SAFETY: `payload` outlives the server, which is joined below.
                let ticket = unsafe { sender.lend(key, framed, payload, None, true) }.unwrap();
                let mut wire = vec![0; envelope.overhead() + payload.len()];
                client.read_exact(&mut wire).unwrap();
                let expected = [envelope.header(), payload, envelope.trailer()].concat();
                assert!(wire == expected, "{backend:?} {framing:?}: bytes differ");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !sender.has_returned(ticket) {
                    assert!(Instant::now() < deadline, "the loan never came back");
                    std::thread::sleep(Duration::from_millis(1));
                }
                running.stop(Duration::from_secs(1));
                drain_to_stopped(&mut running);
                running.join();
            }
        }
    }
}
