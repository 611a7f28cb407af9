//! The consumer's side of a running server: [`Running`] starts the I/O
//! threads, takes their deliveries (engines in turn), answers `Draining`,
//! and stops and joins them.
//!
//! With `io_threads=0` there is no I/O thread: the one engine is run
//! inline (`crate::reactor::Inline`), and the consumer turns its loop
//! where it would otherwise wait for a delivery ([`Running::wait_unless`],
//! [`Running::poll`]). Everything else here reads the same either way.

use std::io;
use std::sync::atomic::Ordering::Acquire;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::Socket;

use super::{Sender, Ticket, ABANDON_TIMEOUT};
use crate::blank::BlankStock;
use crate::config::Config;
use crate::message::{Command, CommandKind, Delivery, DeliveryKind};
use crate::reactor::{Inline, Reactor};
use crate::ring::{ring, Consumer};
use crate::shared::{Hub, Shared, DEFAULT_STOP_TIMEOUT};
use crate::sys::{Backend, Selector, Wake};
use crate::token::ConnKey;

/// A started server, held by the thread that consumes its deliveries.
///
/// Dropping it stops the I/O threads and joins them, so no thread or socket
/// outlives it.
pub struct Running {
    pub(super) engines: Vec<Engine>,
    pub(super) sender: Sender,
    /// The engine deliveries are taken from now ...
    pub(super) cursor: usize,
    /// ... and how many in a row, so that a busy engine cannot starve the
    /// others' connections.
    pub(super) streak: usize,
}

/// The consumer's side of one engine.
pub(super) struct Engine {
    pub(super) shared: Arc<Shared>,
    pub(super) deliveries: Consumer<Delivery>,
    /// The I/O thread; `None` once joined, and for an inline engine.
    pub(super) thread: Option<JoinHandle<()>>,
    /// Run inline by the consumer, through `shared` (no thread).
    pub(super) inline: bool,
    pub(super) stopped_seen: bool,
}

impl Engine {
    /// True if the consumer may sleep as far as this engine goes: nothing to
    /// take, and not finished with a `Stopped` still to come (an engine whose
    /// loop ended without one, `vanished`, is quiet too: nothing more
    /// will come from it). An inline engine is quiet whenever its ring is
    /// empty: its loop turns where the consumer sleeps
    /// ([`Running::wait_unless`], or the event loop that watches
    /// [`Running::pollable`]).
    fn is_quiet(&mut self) -> bool {
        self.deliveries.is_empty()
            && (self.inline
                || self.stopped_seen
                || !self.shared.finished.load(Acquire)
                || self.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// True if its loop ended without delivering `Stopped`.
    fn vanished(&mut self) -> bool {
        // Ended before empty: once the loop has ended, everything it made
        // is published, so an empty ring then is empty for good.
        !self.stopped_seen
            && self.shared.finished.load(Acquire)
            && self.has_ended()
            && self.deliveries.is_empty()
    }

    /// True if its loop will deliver nothing more: its thread has exited,
    /// or its inline loop has handed everything over.
    fn has_ended(&self) -> bool {
        if self.inline {
            self.shared.inline_is_over()
        } else {
            self.thread.as_ref().is_none_or(|t| t.is_finished())
        }
    }

    /// True while its loop may still deliver: not finished with `Stopped`
    /// and not ended without it.
    fn is_running(&self) -> bool {
        !self.stopped_seen && !self.has_ended()
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
            Backend::Epoll => Self::start_with::<crate::sys::epoll::Epoll>(config, listeners),
            Backend::Portable => {
                Self::start_with::<crate::sys::portable::Portable>(config, listeners)
            }
        }
    }

    fn start_with<S: Selector>(config: &Config, listeners: Vec<Socket>) -> io::Result<Running> {
        // Inline (`io_threads == 0`): one engine, turned by this thread.
        let inline = config.io_threads == 0;
        let count = config.io_threads.max(1);
        let selectors = (0..count)
            .map(|_| S::new())
            .collect::<io::Result<Vec<S>>>()?;
        let hub = Arc::new(Hub::new(selectors.iter().map(Selector::waker).collect()));
        if inline {
            // What wakes the consumer must wake the selector it sleeps in.
            hub.deliveries.set_notifier(Some(selectors[0].waker()));
        }
        let mut rings = Vec::with_capacity(count);
        let mut engines = Vec::with_capacity(count);
        for (index, selector) in selectors.iter().enumerate() {
            let (command_tx, command_rx) = ring(config.ring_slots, || {
                Command::with_capacity(config.slot_size)
            });
            let (delivery_tx, delivery_rx) = ring(config.ring_slots, || {
                Delivery::with_capacity(config.slot_size)
            });
            engines.push(Arc::new(Shared::new(
                Arc::clone(&hub),
                u16::try_from(index).expect("io_threads is validated"),
                command_tx,
                config.slot_size,
                selector.waker(),
            )));
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
        for ((reactor, deliveries), shared) in
            reactors.into_iter().zip(consumers).zip(engines.iter())
        {
            let name = match count {
                1 => "rsepoll-io".to_owned(),
                _ => format!("rsepoll-io-{}", shared.engine),
            };
            let thread = if inline {
                shared.set_inline(Some(Box::new(Inline::new(reactor, Arc::clone(shared)))));
                None
            } else {
                // On an error, dropping `running` stops and joins the threads
                // started so far; the reactors not started drop their sockets.
                Some(reactor.spawn(name, Arc::clone(shared), config.on_io_thread_start)?)
            };
            running.engines.push(Engine {
                shared: Arc::clone(shared),
                deliveries,
                thread,
                inline,
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
        self.take_with_mut(|delivery| f(delivery))
    }

    /// As [`Running::take_with`], for the crate's own consumer, which may
    /// take the slot's blank out (`blank.rs`). Not public: moving anything
    /// else out of a slot would upset the I/O thread's account of it.
    pub(crate) fn take_with_mut<R>(&mut self, f: impl FnOnce(&mut Delivery) -> R) -> Option<R> {
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
            engine.shared.wake_for_room();
        }
    }

    /// Each engine's stock of blanks, for the consumer to fill
    /// (`blank.rs`).
    #[cfg_attr(not(feature = "python"), allow(dead_code))] // the consumer's
    pub(crate) fn blank_stocks(&self) -> Vec<Arc<BlankStock>> {
        let stocks = self
            .engines
            .iter()
            .map(|engine| Arc::clone(&engine.shared.blanks));
        stocks.collect()
    }

    /// Blocks until a delivery is ready or `timeout` passes (or spuriously).
    pub fn wait(&mut self, timeout: Duration) {
        self.wait_unless(timeout, || false);
    }

    /// Blocks until a delivery is ready, `other_work()` holds, or `timeout`
    /// passes (or spuriously). Whoever makes `other_work()` true must then
    /// call [`Sender::ring_consumer`].
    ///
    /// Inline, this is where the engine's loop turns: it waits in its
    /// selector, at most `timeout`, and not at all if a delivery waits or
    /// `other_work()` holds.
    pub fn wait_unless(&mut self, timeout: Duration, other_work: impl Fn() -> bool) {
        if let Some(engine) = self.inline_engine() {
            engine.shared.turn_inline(Some(timeout), &other_work, true);
            return;
        }
        let Running {
            engines, sender, ..
        } = self;
        sender.hub().deliveries.wait_while(
            || engines.iter_mut().all(Engine::is_quiet) && !other_work(),
            Some(timeout),
        );
    }

    /// Inline: one turn of the engine's loop without waiting (sends from
    /// callbacks go out, ready sockets are read), for a consumer that has
    /// more to do than take deliveries. Threaded: nothing.
    pub fn poll(&mut self) {
        if let Some(engine) = self.inline_engine() {
            engine.shared.poll_inline(true);
        }
    }

    /// Inline: applies the commands queued so far (the replies sent from
    /// callbacks go out, and their lent buffers come back) without reading
    /// or waiting. Threaded: nothing.
    pub fn apply_commands(&self) {
        if let Some(engine) = self.inline_engine() {
            engine.shared.apply_inline_commands();
        }
    }

    /// True if the engine is run inline, by this consumer (`io_threads=0`).
    pub fn is_inline(&self) -> bool {
        self.engines.iter().any(|e| e.inline)
    }

    fn inline_engine(&self) -> Option<&Engine> {
        self.engines.first().filter(|e| e.inline)
    }

    /// For a consumer that sleeps in an event loop rather than in
    /// [`Running::wait`]: `notifier` wakes it, once per sleep, when a
    /// delivery is ready or the consumer is rung.
    pub fn set_notifier(&self, notifier: Option<Arc<dyn Wake>>) {
        self.sender.hub().deliveries.set_notifier(notifier);
    }

    /// Prepares to sleep in an event loop. `Some` if the consumer may
    /// (nothing ready, `other_work()` false): it is then announced, so the
    /// notifier will wake it, and the loop must run it again within the
    /// duration given, if any (an inline engine's own deadlines); call
    /// [`Running::end_sleep`] then. `None` if there is something to do now
    /// (no sleep to end).
    ///
    /// Inline, the event loop must also watch [`Running::pollable`], which
    /// reads as ready when the engine's sockets or senders want a turn.
    pub fn begin_sleep(&mut self, other_work: impl Fn() -> bool) -> Option<Option<Duration>> {
        let Running {
            engines, sender, ..
        } = self;
        let bell = &sender.hub().deliveries;
        bell.announce();
        let quiet = engines.iter_mut().all(Engine::is_quiet) && !other_work();
        let limit = match engines.first().filter(|e| e.inline) {
            Some(engine) if quiet => engine
                .shared
                .with_inline(|inline| inline.begin_outside_sleep())
                .flatten(),
            _ => quiet.then_some(None),
        };
        if limit.is_none() {
            bell.retract();
        }
        limit
    }

    /// Ends a sleep that [`Running::begin_sleep`] began.
    pub fn end_sleep(&self) {
        self.sender.hub().deliveries.retract();
        if let Some(engine) = self.inline_engine() {
            engine
                .shared
                .with_inline(|inline| inline.end_outside_sleep());
        }
    }

    /// Inline: a descriptor that reads as ready when the engine wants a
    /// turn, for an event loop to watch while the consumer sleeps in it;
    /// `None` if threaded, or where the platform has none (see
    /// [`Selector::pollable`]).
    pub fn pollable(&self) -> Option<i64> {
        self.inline_engine()?
            .shared
            .with_inline(|inline| inline.pollable())
            .flatten()
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
    /// `timeout` to go out; deliveries continue until `Stopped`. See
    /// [`Sender::stop`].
    pub fn stop(&self, timeout: Duration) {
        self.sender.stop(timeout);
    }

    /// Asks the I/O threads to stop accepting and serve the open
    /// connections until each has closed, or `timeout`; deliveries continue
    /// until `Stopped`. See [`Sender::stop_accepting`].
    pub fn stop_accepting(&self, timeout: Duration) {
        self.sender.stop_accepting(timeout);
    }

    /// Cuts the stop short (a second Ctrl-C): the I/O threads reset every
    /// connection still open now; deliveries continue until `Stopped`.
    pub fn cut(&self) {
        self.sender.hub().cut();
    }

    /// Waits for the I/O threads to exit. Call after `Stopped` was taken (or
    /// a thread vanished); otherwise this stops the server first, discarding
    /// deliveries (it answers `Draining` as any consumer does, so connections
    /// whose output has gone out end with FIN, and output still queued gets
    /// [`ABANDON_TIMEOUT`] before a reset).
    pub fn join(&mut self) {
        if self.engines.iter().any(Engine::is_running) {
            self.stop(ABANDON_TIMEOUT);
            while self.engines.iter().any(Engine::is_running) {
                while self.take_with(|_| ()).is_some() {}
                self.release();
                self.wait(Duration::from_millis(10));
            }
        }
        for engine in &mut self.engines {
            if let Some(thread) = engine.thread.take() {
                let _ = thread.join();
            }
            if engine.inline {
                // The loop holds the engine's `Shared`, which holds it:
                // dropping it here closes its sockets and ends the cycle.
                engine.shared.set_inline(None);
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
