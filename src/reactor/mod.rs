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
//! listeners and reads no more input (not one `recv`), delivers the messages
//! its decoders had already cut from input read before (paused and throttled
//! connections' too), then delivers `Draining`; the consumer handles what it
//! already has and answers `Shutdown`, behind every reply it queued.
//! Then each connection closes as soon as its queue has gone out (FIN). At
//! the stop deadline, every connection not yet closed is reset instead, so
//! that its peer can tell a cut from a clean end; one whose decoder still
//! holds messages is reset once they are in the ring (the deadline cuts
//! output, never input already read).
//!
//! The hub says how far to stop ([`StopLevel`](crate::shared::StopLevel)).
//! A drain whose consumer must first tell its application of the stop
//! stops reading at once, but delivers `Draining` only once the hub asks
//! for the drain itself. A stop may also keep the connections: the loop
//! closes its listeners and goes on serving what is open, reading, writing
//! and timing out as usual, until the application has closed every
//! connection (and, on an engine that does not accept, until the accepting
//! one has stopped dealing: what it dealt out is opened and served too).
//! At the deadline it resets what is still open, as a drain's deadline
//! does; a drain asked for meanwhile drains as above, by the earlier of the
//! two deadlines.
//!
//! The loop's state is one struct, [`Core`], its fields grouped by owner
//! (`Outbox`, `Acceptor`, `Deadlines`, `Settings`, `Gather`, the connection
//! table); its methods live in child files by
//! concern, each an `impl` block of its own (as tokio's worker does with
//! `worker/metrics.rs`): [`accept`] (listeners, limits, dealing connections
//! out), [`read`] (raw input and the ready list), [`framed`] (decoders and
//! the message clock), [`write`] (sends and flushing), [`close`] (every way a
//! connection ends), [`stop`] (the stop and its drain), [`deadlines`]
//! (timeouts) and [`outbox`] (the delivery ring's shares and backlog). This
//! file keeps the turn itself: [`Reactor::turn`], the wait, commands in,
//! events out. An I/O thread turns it in [`Reactor::run`] ([`thread`]);
//! with `io_threads=0` the consumer's own thread turns it ([`inline`]),
//! and the wait also heeds what waits for the consumer.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering::Acquire;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::config::Config;
use crate::conn::{ConnectionTable, Watermarks};
use crate::framing::{Decoder, Framing};
use crate::message::{Command, CommandKind, Delivery};
use crate::ring::{Consumer, Producer};
use crate::shared::Shared;
use crate::stats::Counters;
use crate::sys::{Event, Interest, Selector};
use crate::token::{id_matches, ConnKey, Target, Token};

mod accept;
mod close;
mod deadlines;
mod framed;
mod inline;
#[cfg(loom)]
mod model;
mod outbox;
mod read;
mod stop;
mod thread;
mod write;

use accept::Acceptor;
use deadlines::{Deadline, Deadlines};
pub(crate) use inline::Inline;
#[cfg(loom)]
pub use model::LoomOutbox;
use outbox::Outbox;
use stop::Stopping;
use write::Gather;

/// What a listener or a new connection is watched for at first.
const READABLE: Interest = Interest {
    readable: true,
    writable: false,
    hangup: true,
};

/// Reads from one connection per turn before others get theirs.
const READ_BUDGET: usize = 16;
/// Deliveries staged before they are published without waiting for the turn's end.
const PUBLISH_BATCH: usize = 64;
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

/// The I/O thread's state; see the module docs.
pub(crate) struct Reactor<S: Selector> {
    commands: Consumer<Command>,
    core: Core<S>,
    /// Run by its consumer's thread ([`inline`]), not by a thread of its own.
    inline: bool,
}

/// Where the loop stands after a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Serving, or stopping: turn again.
    Serving,
    /// The stop is done and `Stopped` delivered (run inline: queued).
    Finished,
}

/// Everything but the command ring, so that applying a command can borrow it
/// while the ring is borrowed too.
struct Core<S: Selector> {
    selector: S,
    shared: Arc<Shared>,
    /// The delivery ring and what may go into it.
    outbox: Outbox,
    /// The listeners and the dealing of new connections to the engines.
    acceptor: Acceptor,
    table: ConnectionTable,
    /// Connections with unread input, served round-robin.
    ready: VecDeque<ConnKey>,
    events: Vec<Event>,
    /// Where discarded input goes.
    scratch: Box<[u8]>,
    /// The parts of a message larger than a slot, gathered so far.
    gather: Gather,
    /// Set once a stop has begun.
    stopping: Option<Stopping>,
    /// What the configuration fixed.
    settings: Settings,
    /// Per-connection deadlines and lingering connections.
    deadlines: Deadlines,
    /// The time this turn's work started.
    now: Instant,
    /// What this thread counts; copied to `shared.stats` once per turn.
    counters: Counters,
}

/// What the loop reads of its configuration and never changes, built once
/// from [`Config`].
#[derive(Clone, Copy)]
struct Settings {
    /// Per-connection output limits.
    watermarks: Watermarks,
    /// How input is cut into messages.
    framing: Framing,
    max_message_size: usize,
    /// Largest message that travels in a slot's own buffer.
    slot_size: usize,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        Settings {
            watermarks: Watermarks {
                high: config.write_buffer_high,
                low: config.write_buffer_low,
            },
            framing: config.framing,
            max_message_size: config.max_message_size,
            slot_size: config.slot_size,
        }
    }

    /// Per-connection output limits.
    #[inline]
    fn watermarks(&self) -> Watermarks {
        self.watermarks
    }

    /// Largest message that travels in a slot's own buffer.
    #[inline]
    fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// A new connection's decoder: none in raw mode.
    fn decoder(&self) -> Option<Decoder> {
        (self.framing != Framing::Raw)
            .then(|| Decoder::new(self.framing, self.max_message_size, self.slot_size))
    }
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
        let acceptor = Acceptor::new(listeners, &selector, engines, config.max_connections)?;
        let core = Core {
            selector,
            shared: Arc::clone(&shared),
            outbox: Outbox::new(config, deliveries, Arc::clone(&shared.blanks)),
            acceptor,
            table: ConnectionTable::new(shared.engine),
            ready: VecDeque::with_capacity(1024),
            events: Vec::with_capacity(1024),
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            gather: Gather::default(),
            stopping: None,
            settings: Settings::new(config),
            deadlines: Deadlines::new(config),
            now: Instant::now(),
            counters: Counters::default(),
        };
        Ok(Reactor {
            commands,
            core,
            inline: false,
        })
    }

    /// Serves until asked to stop, then drains (see the module docs): every
    /// connection is closed and reported, then `Stopped` is delivered.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        while self.turn(None, &|| false)? == Progress::Serving {}
        Ok(())
    }

    /// One turn of the loop: commands in, what earlier turns left, then a
    /// wait of at most `limit` (`None`: as long as the loop's own deadlines
    /// allow), and the events it brings. Returns [`Progress::Finished`]
    /// once the stop is done and `Stopped` delivered (or, run inline, on
    /// its way: see [`Reactor::hand_over_last`]).
    ///
    /// `consumer_busy` is for a loop run inline by its consumer
    /// ([`inline`]): true if the consumer has work of its own, so the turn
    /// must not sleep.
    pub(crate) fn turn(
        &mut self,
        limit: Option<Duration>,
        consumer_busy: &dyn Fn() -> bool,
    ) -> io::Result<Progress> {
        self.core.heed_stop();
        // Read before the hand-overs are taken: see `stop_is_done`.
        let dealing_over = self.core.shared.hub.accepting_ended.load(Acquire);
        self.apply_commands();
        self.core.open_arrivals();
        if self.core.stopping.is_some() {
            self.core.enforce_stop_deadline();
            if self.core.stop_is_done(dealing_over) {
                self.finish();
                return Ok(Progress::Finished);
            }
        }
        self.core.serve_leftovers();
        self.core.announce_draining();
        self.core.publish();
        let timeout = match (self.core.poll_timeout(), limit) {
            (Some(own), Some(limit)) => Some(own.min(limit)),
            (own, limit) => own.or(limit),
        };
        self.wait(timeout, consumer_busy)?;
        self.core.now = Instant::now();
        self.core.dispatch_events();
        self.core.expire_lingering();
        self.core.expire_timers();
        self.core.publish();
        Ok(Progress::Serving)
    }

    /// Applies queued commands, at most a ring's worth per turn, so that a fast
    /// sender cannot keep the sockets from being polled. Run inline, the
    /// consumer also calls it between callbacks (see [`inline`]).
    pub(crate) fn apply_commands(&mut self) {
        let mut applied = 0;
        while applied < self.commands.capacity()
            && self
                .commands
                .take_with(|command| self.core.apply(command))
                .is_some()
        {
            applied += 1;
            if self.commands.taken() >= PUBLISH_BATCH {
                self.commands.release();
                self.core.shared.command_space.ring();
            }
        }
        if applied > 0 {
            self.commands.release();
            self.core.shared.command_space.ring();
        }
    }

    /// Sleeps in the selector, unless the sleep protocol finds work first.
    ///
    /// Run inline, the loop's consumer is this very thread: it must not
    /// sleep while deliveries wait for it or `consumer_busy()` holds, and
    /// what would wake the consumer (a call from another thread, a stop
    /// request) must wake the selector. So it announces itself on the hub's
    /// bell, whose notifier is then this selector's waker, before looking.
    fn wait(
        &mut self,
        mut timeout: Option<Duration>,
        consumer_busy: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        // Whatever was counted is visible before this thread may sleep.
        self.core.shared.stats().publish(&self.core.counters);
        let stalled = timeout != Some(Duration::ZERO) && self.core.has_deferred_work();
        let core = &mut self.core;
        let announced = self.inline && timeout != Some(Duration::ZERO);
        if announced {
            core.shared.hub.deliveries.announce();
            if !core.outbox.all_taken() || consumer_busy() {
                timeout = Some(Duration::ZERO);
            }
        }
        if timeout != Some(Duration::ZERO)
            && !Self::announce_sleep(core, &mut self.commands, stalled)
        {
            timeout = Some(Duration::ZERO);
        }
        let result = core.selector.select(&mut core.events, timeout);
        core.shared.io_sleep.awake();
        if announced {
            core.shared.hub.deliveries.retract();
        }
        result
    }
}

impl<S: Selector> Reactor<S> {
    /// Announces a sleep to senders and the consumer (`stalled`: the loop
    /// waits for ring space), then re-checks: true if nothing came in
    /// meanwhile, so the loop may sleep. Either way, `io_sleep.awake()`
    /// follows once it is back at work.
    fn announce_sleep(core: &mut Core<S>, commands: &mut Consumer<Command>, stalled: bool) -> bool {
        core.shared.io_sleep.prepare(stalled, || {
            !commands.is_empty()
                || core.shared.arrivals.may_have_arrivals()
                || stop::stop_news(&core.shared.hub, core.stopping.as_ref())
                || (stalled && core.outbox.has_room())
        })
    }

    /// Run inline by a consumer that sleeps in another event loop, which
    /// watches [`Selector::pollable`] (`serve()`): after a turn, prepares
    /// that sleep as [`Reactor::wait`] prepares its own. Returns how long
    /// the loop may sleep at most (`Some(None)`: no deadline of its own),
    /// or `None` if it must turn again now. After `Some`, call
    /// [`Reactor::end_outside_sleep`] once the consumer is back.
    pub(crate) fn begin_outside_sleep(&mut self) -> Option<Option<Duration>> {
        let core = &mut self.core;
        core.shared.stats().publish(&core.counters);
        let timeout = core.poll_timeout();
        if timeout == Some(Duration::ZERO) || !core.outbox.all_taken() {
            return None;
        }
        let stalled = core.has_deferred_work();
        if !Self::announce_sleep(core, &mut self.commands, stalled) {
            core.shared.io_sleep.awake();
            return None;
        }
        Some(timeout)
    }

    /// Ends a sleep that [`Reactor::begin_outside_sleep`] began.
    pub(crate) fn end_outside_sleep(&mut self) {
        self.core.shared.io_sleep.awake();
    }

    /// See [`Selector::pollable`].
    pub(crate) fn pollable(&self) -> Option<i64> {
        self.core.selector.pollable()
    }
}

impl<S: Selector> Core<S> {
    fn apply(&mut self, command: &Command) {
        match command.kind {
            CommandKind::Send => match command.loan {
                Some(loan) => {
                    let (header, trailer) = command.data().split_at(loan.head);
                    // SAFETY: the command's slot is not released before this
                    // returns, and the lender keeps the bytes until then.
                    let lent = unsafe { loan.bytes() };
                    debug_assert!(self.gather.is_empty(), "a message arrives whole");
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

    /// True unless a stop drains the connections: then no input is
    /// delivered any more.
    fn reading(&self) -> bool {
        !self.draining()
    }

    /// True once a stop drains the connections (see [`stop`]).
    fn draining(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| s.draining)
    }

    /// Tells the selector what the connection wants now (see
    /// [`Connection::interest`](crate::conn::Connection::interest)).
    fn update_interest(&mut self, key: ConnKey) {
        let reading = self.reading();
        let Some(conn) = self.table.get_mut(key) else {
            return;
        };
        let interest = conn.interest(reading);
        if let Err(e) = self.selector.set_interest(
            conn.socket(),
            Token::connection(key.index, key.id),
            interest,
        ) {
            self.close_now(key, Some(CloseReason::of_error(&e)));
        }
    }

    fn dispatch_events(&mut self) {
        for i in 0..self.events.len() {
            let event = self.events[i];
            match event.token.target() {
                Target::Listener(index) => {
                    if self.acceptor.may_accept(index) {
                        self.accept_from(index);
                    }
                }
                Target::Connection { index, id_bits } => {
                    let Some(conn) = self.table.slot_mut(index) else {
                        continue;
                    };
                    // The slot's tenant changed since the event was queued.
                    if !id_matches(conn.id(), id_bits) {
                        continue;
                    }
                    if event.read_fully {
                        conn.warn_short_reads();
                    }
                    let key = ConnKey {
                        index,
                        engine: self.shared.engine,
                        id: conn.id(),
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
        self.outbox.drain_backlog();
        self.settle();
        self.outbox.unblock();
        self.accept_pending(Instant::now());
        for _ in 0..self.ready.len() {
            if !self.outbox.has_slot() {
                break;
            }
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.table.get_mut(key) else {
                continue;
            };
            if !conn.leave_ready_list() {
                continue;
            }
            self.on_readable(key);
            self.update_interest(key);
        }
    }

    /// True if an earlier turn left work that needs delivery slots: control
    /// deliveries, connections with unread input, listeners with pending
    /// connections.
    fn has_deferred_work(&self) -> bool {
        self.outbox.has_backlog() || !self.ready.is_empty() || self.acceptor.has_pending()
    }

    fn poll_timeout(&mut self) -> Option<Duration> {
        if self.has_deferred_work() && self.outbox.has_room() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let deadlines = self
            .deadlines
            .next()
            .into_iter()
            .chain(self.acceptor.next_retry())
            // Until the turn that acts on it: a deadline that passed during
            // this turn gives a zero timeout, not a missed one. Once acted
            // on, what is left waits for the consumer, which wakes this thread.
            .chain(
                self.stopping
                    .as_ref()
                    .filter(|s| !s.overdue)
                    .map(|s| s.deadline),
            );
        deadlines.min().map(|at| at.saturating_duration_since(now))
    }
}
