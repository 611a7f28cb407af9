//! What the I/O threads and the threads that talk to them share.
//!
//! [`Hub`] is the server's: the stop request (how far, by when), the bell
//! the consumer waits on, connection ids and the open count, every engine's
//! counters and poller waker. [`Shared`] is one engine's: the producer side
//! of its command ring (behind a mutex, so that any thread can send; see
//! [`Shared::push`]), its sleep handshake, the list of connections
//! another engine accepted for it, and, for an engine run inline by its
//! consumer's thread ([`InlineLoop`]), the loop itself.
//!
//! Both are built once, before any I/O thread starts, and live in `Arc`s
//! that the reactor, the consumer ([`crate::server::Running`]) and every
//! [`crate::server::Sender`] hold. This module sits below all of them: it
//! knows the rings and the wake-ups, not who drives them.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::blank::BlankStock;
use crate::handover::Arrivals;
use crate::message::{Command, CommandKind, Loan};
use crate::ring::{Producer, ReleaseWatch};
use crate::stats::{Snapshot, Stats};
use crate::sync::Mutex;
use crate::sys::Wake;
use crate::token::ConnKey;
use crate::wake::{Bell, IoSleep};

/// How long a stop may flush output unless told otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The next connection id; see [`Hub::next_id`]. At a million connections a
/// second, 64 bits last half a million years.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// How far a stop has gone, as the hub asks it of every engine; each level
/// includes the ones before it, and a stop only ever goes further.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum StopLevel {
    /// No stop: serving.
    None = 0,
    /// The listeners close; the open connections are served as usual until
    /// they close.
    Accepting = 1,
    /// No more input is read either: what the decoders hold is delivered,
    /// and the connections wait for the drain.
    Reading = 2,
    /// The drain: `Draining` is announced, and each connection closes once
    /// the consumer has answered it and its queued output is out.
    Drain = 3,
}

impl StopLevel {
    fn from_u8(level: u8) -> StopLevel {
        match level {
            0 => StopLevel::None,
            1 => StopLevel::Accepting,
            2 => StopLevel::Reading,
            _ => StopLevel::Drain,
        }
    }
}

/// What the engines of one server share.
pub(crate) struct Hub {
    /// How far the engines are asked to stop (a [`StopLevel`]).
    stop_level: AtomicU8,
    /// When the stop resets what is still open, in nanoseconds after
    /// `epoch`; written before `stop_level` is raised.
    stop_deadline_ns: AtomicU64,
    /// The origin of `stop_deadline_ns`.
    epoch: Instant,
    /// Makes each stop request's reading and writing of the two fields
    /// above one step: requests come from any thread.
    stop_requests: Mutex<()>,
    /// Set to cut the stop under way short: what is still open is reset now.
    pub(crate) cut: AtomicBool,
    /// Set once the first engine, the one that accepts, has closed its
    /// listeners: from then on nothing is handed over to any engine (see
    /// [`Hub::end_accepting`]).
    pub(crate) accepting_ended: AtomicBool,
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
    /// The hub of `wakers.len()` engines, one poller waker each.
    pub(crate) fn new(wakers: Box<[Arc<dyn Wake>]>) -> Hub {
        Hub {
            stop_level: AtomicU8::new(StopLevel::None as u8),
            stop_deadline_ns: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            stop_requests: Mutex::new(()),
            cut: AtomicBool::new(false),
            accepting_ended: AtomicBool::new(false),
            deliveries: Bell::new(),
            open: AtomicUsize::new(0),
            stats: wakers.iter().map(|_| Stats::default()).collect(),
            wakers,
        }
    }

    /// How far the engines are asked to stop. Read the deadline after it.
    pub(crate) fn stop_level(&self) -> StopLevel {
        StopLevel::from_u8(self.stop_level.load(Acquire))
    }

    /// When the stop under way resets the connections still open, as of
    /// the [`Hub::stop_level`] read before.
    pub(crate) fn stop_deadline(&self) -> Instant {
        let after = Duration::from_nanos(self.stop_deadline_ns.load(Acquire));
        // Beyond what an `Instant` holds (a timeout of centuries on some
        // platforms) is as good as never.
        self.epoch
            .checked_add(after)
            .or_else(|| self.epoch.checked_add(A_YEAR))
            .unwrap_or(self.epoch)
    }

    /// A fresh connection id, never given out before in this process: not
    /// by another engine, nor in an earlier run of the same server (each
    /// `listen()` makes a new `Hub`, so the counter cannot live here).
    pub(crate) fn next_id(&self) -> u64 {
        NEXT_CONNECTION_ID.fetch_add(1, Relaxed)
    }

    /// The server's counters: every engine's, added up.
    pub(crate) fn snapshot(&self) -> Snapshot {
        self.stats
            .iter()
            .map(Stats::snapshot)
            .fold(Snapshot::default(), |total, one| total.merge(&one))
    }

    /// Stops now: a stop under way (or one that starts here) resets every
    /// connection still open instead of waiting for its output.
    pub(crate) fn cut(&self) {
        self.cut.store(true, Release);
        self.stop(Duration::ZERO, StopLevel::Drain);
    }

    /// Asks every engine to stop as far as `level`, resetting what is still
    /// open `timeout` from now; see [`Sender::stop`](crate::server::Sender::stop)
    /// and its siblings.
    ///
    /// A request that takes the stop no further changes nothing, so the
    /// first request's deadline stands; one that takes it further brings the
    /// deadline forward to `timeout` from now, if that is earlier.
    pub(crate) fn stop(&self, timeout: Duration, level: StopLevel) {
        {
            let _requests = self.stop_requests.lock();
            if level > StopLevel::from_u8(self.stop_level.load(Relaxed)) {
                let deadline = self
                    .epoch
                    .elapsed()
                    .checked_add(timeout)
                    .and_then(|at| u64::try_from(at.as_nanos()).ok())
                    .unwrap_or(u64::MAX);
                self.stop_deadline_ns.fetch_min(deadline, Relaxed);
                self.stop_level.store(level as u8, Release);
            }
        }
        // Pairs with the fence in each I/O thread's sleep announcement, as
        // for commands: either it sees the level before sleeping or it is
        // woken (and a cut, which may change no level, is woken for).
        self.wake_all();
    }

    /// The first engine has closed its listeners: tells the others, which
    /// may be waiting for nothing more to be handed over to end a stop that
    /// kept the connections.
    pub(crate) fn end_accepting(&self) {
        self.accepting_ended.store(true, Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        fence(SeqCst);
        for waker in self.wakers.iter() {
            let _ = waker.wake();
        }
    }
}

/// How far off a stop's deadline is when the one asked for does not fit an
/// `Instant`: as good as never.
const A_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// An engine's loop run by its consumer's thread instead of a thread of
/// its own, one turn at a time (`io_threads=0`). The engine's [`Shared`]
/// keeps it, so that a sender that finds the command ring full can apply
/// the commands itself rather than wait for a thread that may be its own.
pub(crate) trait InlineLoop: Send {
    /// One turn of the loop, waiting at most `limit` (`None`: as its own
    /// deadlines allow), and not at all while `consumer_busy()` holds or
    /// deliveries wait for the consumer. Never panics: a failure is
    /// reported as a delivery and ends the loop.
    fn turn(&mut self, limit: Option<Duration>, consumer_busy: &dyn Fn() -> bool);

    /// True once the loop has ended and handed over every delivery it
    /// will make: nothing more will come from it.
    fn is_over(&self) -> bool;

    /// Applies the commands queued so far (writes the replies sent since
    /// the last turn) without a turn: no reading, no waiting. For the
    /// consumer between two callbacks. Never panics: a failure is reported
    /// as a delivery and ends the loop, as in [`InlineLoop::turn`].
    fn apply_commands(&mut self);

    /// For a consumer that sleeps in another event loop, watching
    /// [`InlineLoop::pollable`]: prepares the sleep after a turn. How long
    /// it may last at most (`Some(None)`: no deadline of the loop's own),
    /// or `None` if the loop must turn again first.
    fn begin_outside_sleep(&mut self) -> Option<Option<Duration>>;

    /// Ends a sleep that [`InlineLoop::begin_outside_sleep`] began.
    fn end_outside_sleep(&mut self);

    /// A descriptor that reads as ready while the loop has events to
    /// handle; `None` where the platform has none.
    fn pollable(&self) -> Option<i64>;
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
    /// The engine's loop, when its consumer's thread runs it (an inline
    /// engine, `io_threads=0`); held for one turn at a time.
    inline: Mutex<Option<Box<dyn InlineLoop>>>,
    /// Storage the consumer lends for large raw reads (`blank.rs`).
    pub(crate) blanks: Arc<BlankStock>,
    /// Entries in the I/O thread's timer heap, as of its last expiry (tests
    /// of the heap's bound).
    #[cfg(test)]
    pub(crate) timer_entries: AtomicUsize,
    /// A `Hold` command's state: 0 free, 1 holding (the I/O thread waits in
    /// the command until a test stores 0).
    #[cfg(test)]
    pub(crate) test_hold: AtomicUsize,
    /// Makes reporting a failure panic too (tests of an engine that ends
    /// without `Stopped`).
    #[cfg(test)]
    pub(crate) test_fail_panics: AtomicBool,
}

impl Shared {
    /// Engine number `engine` of `hub`: the producer of its command ring
    /// (slots of `slot_size` bytes) and its poller's waker.
    pub(crate) fn new(
        hub: Arc<Hub>,
        engine: u16,
        commands: Producer<Command>,
        slot_size: usize,
        waker: Arc<dyn Wake>,
    ) -> Shared {
        Shared {
            hub,
            engine,
            commands_released: commands.release_watch(),
            commands: Mutex::new(commands),
            slot_size,
            command_space: Bell::new(),
            io_sleep: IoSleep::new(),
            finished: AtomicBool::new(false),
            arrivals: Arrivals::new(),
            waker,
            inline: Mutex::new(None),
            blanks: Arc::new(BlankStock::new(slot_size)),
            #[cfg(test)]
            timer_entries: AtomicUsize::new(0),
            #[cfg(test)]
            test_hold: AtomicUsize::new(0),
            #[cfg(test)]
            test_fail_panics: AtomicBool::new(false),
        }
    }

    /// This engine's counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.hub.stats[usize::from(self.engine)]
    }

    /// True once the I/O thread has released the command slot at ring
    /// position `position` (see [`ReleaseWatch`]).
    pub(crate) fn has_released(&self, position: usize) -> bool {
        self.commands_released.has_released(position)
    }

    /// Wakes the I/O thread if it sleeps waiting for delivery slots (after
    /// the consumer released some).
    pub(crate) fn wake_for_room(&self) {
        if self.io_sleep.wake_for_room() {
            let _ = self.waker.wake();
        }
    }

    /// Wakes the I/O thread if it sleeps (after publishing commands).
    pub(crate) fn wake_io(&self) {
        if self.io_sleep.wake_for_commands() {
            let _ = self.waker.wake();
        }
    }

    /// Makes `inline` this engine's loop, run by whoever calls
    /// [`Shared::turn_inline`]; `None` ends that (and drops the loop, which
    /// holds this `Shared` in turn).
    pub(crate) fn set_inline(&self, inline: Option<Box<dyn InlineLoop>>) {
        *self.inline.lock() = inline;
    }

    /// Runs one turn of this engine's loop on this thread, if it is run
    /// inline; see [`InlineLoop::turn`]. False if it is not (or if another
    /// thread is running a turn and `wait` is false).
    pub(crate) fn turn_inline(
        &self,
        limit: Option<Duration>,
        consumer_busy: &dyn Fn() -> bool,
        wait: bool,
    ) -> bool {
        let slot = if wait {
            Some(self.inline.lock())
        } else {
            self.inline.try_lock()
        };
        match slot {
            Some(mut slot) => match slot.as_mut() {
                Some(inline) => {
                    inline.turn(limit, consumer_busy);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// Runs one turn of this engine's loop on this thread without sleeping,
    /// if it is run inline: see [`Shared::turn_inline`].
    pub(crate) fn poll_inline(&self, wait: bool) -> bool {
        self.turn_inline(Some(Duration::ZERO), &|| true, wait)
    }

    /// Applies this engine's queued commands on this thread, if it is run
    /// inline and no other thread is turning it (that turn applies them);
    /// see [`InlineLoop::apply_commands`].
    pub(crate) fn apply_inline_commands(&self) {
        if let Some(mut slot) = self.inline.try_lock() {
            if let Some(inline) = slot.as_mut() {
                inline.apply_commands();
            }
        }
    }

    /// Runs `f` on this engine's inline loop, if it is run inline (waits
    /// for a turn under way to end).
    pub(crate) fn with_inline<R>(&self, f: impl FnOnce(&mut dyn InlineLoop) -> R) -> Option<R> {
        self.inline.lock().as_mut().map(|inline| f(inline.as_mut()))
    }

    /// True if this engine is run inline and its loop is over, or gone (see
    /// [`InlineLoop::is_over`]); waits for a turn under way to end.
    pub(crate) fn inline_is_over(&self) -> bool {
        // No loop any more (dropped at the join): over too.
        self.with_inline(|inline| inline.is_over()).unwrap_or(true)
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

impl Shared {
    /// Queues a command (several, for `parts` longer than a slot) and returns
    /// the ring position of the last one. A `loan` goes in one command with
    /// `parts`, its header and trailer, which must fit a slot.
    pub(crate) fn push(
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
            shared.commands.lock()
        } else {
            shared.commands.try_lock().ok_or(SendError::WouldBlock)?
        };
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let chunks = total.div_ceil(shared.slot_size).max(1);
        debug_assert!(loan.is_none() || chunks == 1);
        if !wait && !producer.has_room_for(chunks) {
            return Err(SendError::WouldBlock);
        }
        if let Some(latch) = latch {
            // Under the lock: see `server::Sender::request`.
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
                // Run inline, the thread that would turn the loop may be
                // this one, inside a callback: apply the commands here. If
                // another thread is turning it (sleeping in the poller, or
                // a zero-wait turn that may have applied commands before
                // these came), wake it and take the next turn.
                let turned = shared.poll_inline(false);
                if !turned {
                    shared.wake_io();
                }
                if shared.finished.load(Acquire) {
                    return Err(SendError::Stopped);
                }
                if turned || shared.poll_inline(true) {
                    continue;
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
