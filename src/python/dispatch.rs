//! The listening thread's loop: it takes deliveries from the I/O threads in
//! batches and turns each into a call of the instance's callback method (so
//! that overrides in Python subclasses are honoured), and runs what the
//! application asked for besides: calls from other threads and due timers.
//!
//! One [`Dispatcher::turn`] does a batch of that work and says what is next:
//! another turn, a sleep (until a delivery, a call, or the deadline it
//! gives), or the end. `listen()` drives turns on the calling thread and
//! sleeps with the GIL released, in slices short enough for Ctrl-C to be
//! seen ([`Dispatcher::listen`]); `serve()` drives them from an asyncio
//! event loop, sleeping in the loop (`serve.rs`). An exception from a
//! callback goes to `on_exception_occurred`; `KeyboardInterrupt` and
//! `SystemExit` stop the server and are raised once it has shut down.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use super::blanks::Blanks;
use super::calls::Calls;
use super::connection::PyConnection;
use super::deliveries::{ConnectionFactory, Connections, Item};
use super::loans::Loans;
use super::run::{RunState, RunTicket};
use super::send::queue;
use super::timers::{self, TimerHandle, Timers};
use crate::framing::Framing;
use crate::server::{Request, Running};

/// Longest the listening thread waits with the GIL released before it checks
/// for signals (Ctrl-C) and stop requests.
pub(super) const SIGNAL_SLICE: Duration = Duration::from_millis(50);
/// Deliveries dispatched per batch before signals are checked again.
const DISPATCH_BATCH: usize = 256;
/// Deliveries dispatched before their slots go back to the I/O thread.
const RELEASE_BATCH: usize = 32;

/// What comes after a turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Next {
    /// More work may be ready: turn again (after a look at signals, or
    /// after letting the event loop run).
    Again,
    /// Nothing to do: sleep until a delivery or a call arrives, or this
    /// long at most (the next timer, or `on_waiting_for_activity`).
    Sleep(Duration),
    /// The server has stopped: call [`Dispatcher::finish`].
    Done,
}

/// What the application gave the server to run besides callbacks: shared by
/// the server object, which fills it, and its runs' dispatchers.
#[derive(Default)]
pub(super) struct Agenda {
    pub(super) timers: Timers,
    pub(super) calls: Calls,
}

/// Turns deliveries into callbacks, on the thread that runs the server.
pub(super) struct Dispatcher {
    /// The `rsepoll.Server` instance whose methods are the callbacks.
    instance: Py<PyAny>,
    run: Arc<RunState>,
    agenda: Arc<Agenda>,
    running: Running,
    /// Payloads lent to the I/O thread. Declared after `running`, so that it
    /// is dropped after `running` has joined the I/O thread.
    loans: Arc<Loans>,
    /// Python-side handles of the open connections, by engine and table slot.
    connections: Connections,
    /// The `bytes` objects the engines read large input into.
    blanks: Blanks,
    /// What new `Connection` objects are made with.
    factory: ConnectionFactory,
    idle_timeout: Duration,
    /// When the last delivery came (or `on_waiting_for_activity` ran).
    idle_since: Instant,
    logger: Py<PyAny>,
    /// A stop was asked for.
    stopping: bool,
    /// A second Ctrl-C (or `KeyboardInterrupt`/`SystemExit` from a
    /// callback), or a failed I/O thread: input still in the ring is not
    /// handed to callbacks. The first one stops as `stop_server()` does.
    interrupted: bool,
    /// An I/O thread exited without reporting its end.
    vanished: bool,
    /// What the run will raise once the server has shut down.
    exit_error: Option<PyErr>,
    /// Timers taken from the heap to run, kept to reuse its allocation.
    due: Vec<Py<TimerHandle>>,
    /// The run's claim on the server; dropped last, when the run is over.
    _ticket: RunTicket,
}

impl Dispatcher {
    /// The dispatcher of the run `running` of server `server_id` (framing
    /// `framing`), calling back `instance`; `idle_timeout` paces
    /// `on_waiting_for_activity`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        py: Python<'_>,
        instance: Py<PyAny>,
        ticket: RunTicket,
        run: Arc<RunState>,
        agenda: Arc<Agenda>,
        server_id: u64,
        framing: Framing,
        running: Running,
        idle_timeout: Duration,
    ) -> PyResult<Self> {
        let logger = py
            .import(intern!(py, "logging"))?
            .call_method1(intern!(py, "getLogger"), ("rsepoll",))?
            .unbind();
        let loans = Arc::new(Loans::default());
        let factory = ConnectionFactory {
            server_id,
            framing,
            sender: running.sender().downgrade(),
            loans: Arc::downgrade(&loans),
        };
        let blanks = Blanks::new(py, running.blank_stocks());
        run.started(running.sender());
        agenda.calls.open();
        Ok(Dispatcher {
            instance,
            run,
            agenda,
            running,
            loans,
            connections: Connections::default(),
            blanks,
            factory,
            idle_timeout,
            idle_since: Instant::now(),
            logger,
            stopping: false,
            interrupted: false,
            vanished: false,
            exit_error: None,
            due: Vec::new(),
            _ticket: ticket,
        })
    }

    /// Serves on this thread until the server stops (`listen()`).
    pub(super) fn listen(mut self, py: Python<'_>) -> PyResult<()> {
        self.start(py);
        loop {
            match self.turn(py) {
                Next::Done => break,
                // Inline, the engine's loop turns here too, so that calls
                // and timers that keep coming cannot starve the sockets.
                Next::Again => self.poll_inline(py),
                Next::Sleep(wait) => {
                    let wait = wait.min(SIGNAL_SLICE);
                    let Dispatcher {
                        running,
                        agenda,
                        run,
                        stopping,
                        ..
                    } = &mut self;
                    let other_work = || has_other_work(agenda, run, *stopping);
                    py.detach(|| running.wait_unless(wait, other_work));
                }
            }
            if let Err(interrupt) = py.check_signals() {
                self.fail_with(py, interrupt);
            }
        }
        self.finish(py)
    }

    /// Begins the run: a stop asked for before it is acted on, and
    /// `on_listen_success` runs.
    pub(super) fn start(&mut self, py: Python<'_>) {
        self.callback(py, intern!(py, "on_listen_success"), ());
        if self.run.stop_requested() {
            self.begin_stop(py);
        }
        self.idle_since = Instant::now();
    }

    /// Dispatches a batch of deliveries, runs the calls and the due timers,
    /// and says what is next.
    pub(super) fn turn(&mut self, py: Python<'_>) -> Next {
        let dispatched = self.dispatch_batch(py);
        // Before the end is noticed: engines with nothing open may have
        // stopped at the request already, and `on_stopping` is still owed.
        if self.run.stop_requested() {
            self.begin_stop(py);
        }
        if self.running.has_stopped() {
            return Next::Done;
        }
        if self.running.io_thread_vanished() {
            self.vanished = true;
            return Next::Done;
        }
        let ran = self.run_calls(py) + self.run_timers(py);
        if dispatched > 0 {
            self.idle_since = Instant::now();
        }
        // Threaded, more may have come meanwhile: turn again. Inline, only
        // a batch cut short by its size may have left deliveries; the sleep
        // below is where the loop turns (writing the replies just queued
        // and reading what came), so going there saves a turn.
        let more = if self.running.is_inline() {
            dispatched == DISPATCH_BATCH
        } else {
            dispatched > 0
        };
        if more || ran > 0 {
            return Next::Again;
        }
        let now = Instant::now();
        let idle_due = self.idle_since + self.idle_timeout;
        if now >= idle_due {
            if !self.stopping || self.run.keeps_connections() {
                self.callback(py, intern!(py, "on_waiting_for_activity"), ());
            }
            self.idle_since = Instant::now();
            return Next::Again;
        }
        let mut wait = idle_due - now;
        if let Some(when) = self.agenda.timers.next_when() {
            wait = wait.min(timers::until(when));
        }
        Next::Sleep(wait)
    }

    /// Ends the run, once [`Dispatcher::turn`] said so: joins the I/O
    /// threads, runs the calls accepted before the end and drops the
    /// timers, runs `on_shutdown_success`, and gives back what the run
    /// raises, if anything.
    pub(super) fn finish(mut self, py: Python<'_>) -> PyResult<()> {
        if self.vanished {
            // The I/O thread could not report its own end: close the books here.
            self.report_error::<PyRuntimeError>(py, "the rsepoll I/O thread exited unexpectedly");
            let open: Vec<Py<PyConnection>> = self.connections.drain().collect();
            for conn in open {
                self.close_and_report(py, conn);
            }
        }
        let running = &mut self.running;
        py.detach(|| running.join());
        // The I/O thread is gone: nothing reads what was lent any more, nor
        // reads into a blank.
        self.loans.clear(py);
        self.blanks.clear();
        for call in self.agenda.calls.close() {
            self.run_call(py, call);
        }
        self.callback(py, intern!(py, "on_shutdown_success"), ());
        // After the last callback, so that no timer made in one outlives
        // the run either.
        self.agenda.timers.clear();
        match self.exit_error.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Inline: turns the engine's loop without waiting (with the GIL
    /// released), so that replies go out and ready sockets are read between
    /// turns that do not sleep. Threaded: nothing.
    pub(super) fn poll_inline(&mut self, py: Python<'_>) {
        if self.running.is_inline() {
            let running = &mut self.running;
            py.detach(|| running.poll());
        }
    }

    /// Prepares to sleep in an event loop (`serve()`): `Some` if nothing is
    /// ready, with the longest the sleep may last if an inline engine has a
    /// deadline; the run's notifier then wakes the loop when something is
    /// (and, inline, the engine's [`Running::pollable`] becomes ready), and
    /// the next turn must begin with [`Dispatcher::end_sleep`].
    pub(super) fn begin_sleep(&mut self) -> Option<Option<Duration>> {
        let Dispatcher {
            running,
            agenda,
            run,
            stopping,
            ..
        } = self;
        running.begin_sleep(|| has_other_work(agenda, run, *stopping))
    }

    /// Ends a sleep that [`Dispatcher::begin_sleep`] began.
    pub(super) fn end_sleep(&self) {
        self.running.end_sleep();
    }

    /// The running server, for setting its notifier.
    pub(super) fn running(&self) -> &Running {
        &self.running
    }

    /// Makes a lender wake this thread when it keeps a reply (`serve()`,
    /// where the thread sleeps in an event loop; see [`Loans`]).
    pub(super) fn wake_on_loans(&self) {
        self.loans.wake_consumer_on_keep();
    }

    /// Lets go of the lent replies whose commands the I/O threads have
    /// released; true if some are still kept (see [`Loans`]).
    pub(super) fn settle_loans(&self, py: Python<'_>) -> bool {
        let running = &self.running;
        self.loans.settle(py, |ticket| running.has_returned(ticket));
        self.loans.is_holding()
    }

    /// Stops the server and makes the run raise `error` once it has; see
    /// [`Dispatcher::fail_with`]. For the driver's own interruptions.
    pub(super) fn interrupt(&mut self, py: Python<'_>, error: PyErr) {
        self.fail_with(py, error);
    }

    /// Dispatches up to a batch of ready deliveries; returns how many.
    fn dispatch_batch(&mut self, py: Python<'_>) -> usize {
        let mut dispatched = 0;
        while dispatched < DISPATCH_BATCH {
            let Dispatcher {
                running,
                connections,
                factory,
                blanks,
                ..
            } = self;
            // Copy out what the callback needs, so the slot can go back to the
            // I/O thread before the callback runs.
            let Some(item) =
                running.take_with_mut(|d| Item::read(py, factory, connections, blanks, d))
            else {
                break;
            };
            dispatched += 1;
            if self.running.taken() >= RELEASE_BATCH {
                self.running.release();
                // Not only at the batch's end: see `Loans`.
                let running = &self.running;
                self.loans.settle(py, |ticket| running.has_returned(ticket));
            }
            self.handle(py, item);
            if self.running.is_inline() && self.loans.is_holding() {
                self.write_lent(py);
            }
        }
        self.running.release();
        let running = &self.running;
        self.loans.settle(py, |ticket| running.has_returned(ticket));
        self.blanks.restock(py);
        dispatched
    }

    /// Inline: applies the commands queued so far, which writes the replies
    /// lent so far (those of the callback that just ran, mostly), and lets
    /// go of their objects before the next callback makes more; see
    /// [`Loans`]. With the GIL held, as uvloop writes from its callbacks:
    /// the apply never waits (a turn under way on another thread skips it),
    /// and releasing the GIL once per reply would let any other runnable
    /// Python thread keep it for up to the switch interval.
    fn write_lent(&mut self, py: Python<'_>) {
        self.running.apply_commands();
        let running = &self.running;
        self.loans.settle(py, |ticket| running.has_returned(ticket));
    }

    /// Runs the calls queued so far by other threads; returns how many.
    fn run_calls(&mut self, py: Python<'_>) -> usize {
        let calls = self.agenda.calls.take();
        let count = calls.len();
        for call in calls {
            self.run_call(py, call);
        }
        count
    }

    fn run_call(&mut self, py: Python<'_>, (callback, args): (Py<PyAny>, Py<PyTuple>)) {
        if let Err(error) = callback.call1(py, args.bind(py)) {
            self.on_callback_error(py, error);
        }
    }

    /// Runs the timers due now, in order; returns how many ran.
    fn run_timers(&mut self, py: Python<'_>) -> usize {
        let mut due = std::mem::take(&mut self.due);
        self.agenda.timers.take_due(timers::now(), &mut due);
        let mut ran = 0;
        for handle in due.drain(..) {
            // A timer that ran before may have cancelled this one.
            if let Some(call) = handle.get().take() {
                self.run_call(py, call);
                ran += 1;
            }
        }
        self.due = due;
        ran
    }

    fn handle(&mut self, py: Python<'_>, item: Item<'_>) {
        match item {
            Item::Opened(conn) => {
                self.callback(py, intern!(py, "on_connection_opened"), (conn,));
            }
            Item::Data(conn, data) => {
                if !self.interrupted {
                    self.callback(py, intern!(py, "on_message_received"), (conn, data));
                }
            }
            Item::WritingPaused(conn) => {
                self.callback(py, intern!(py, "on_writing_paused"), (conn,));
            }
            Item::WritingResumed(conn) => {
                self.callback(py, intern!(py, "on_writing_resumed"), (conn,));
            }
            Item::Eof(conn) => {
                // After the callbacks for what came before the EOF, so their
                // replies are queued ahead of the default close.
                self.callback(py, intern!(py, "on_eof_received"), (conn,));
            }
            Item::Closed(conn, reason) => {
                let _ = conn.get().close_reason.set(reason);
                self.close_and_report(py, conn);
            }
            Item::Error(detail) => self.report_error::<PyOSError>(py, &detail),
            Item::TooLarge(conn, detail) => {
                let message = format!(
                    "{}: {detail}",
                    conn.bind(py)
                        .repr()
                        .map_or_else(|_| "a connection".to_owned(), |r| r.to_string(),)
                );
                let error = py
                    .import(intern!(py, "rsepoll"))
                    .and_then(|module| module.getattr(intern!(py, "MessageTooLarge")))
                    .and_then(|class| class.call1((message, conn.clone_ref(py))))
                    .map_or_else(|e| e, PyErr::from_value);
                self.on_callback_error(py, error);
                // After the replies to the messages before it, as for EOF.
                queue(py, conn.get(), Request::Close);
            }
            Item::Failed(detail) => {
                self.report_error::<PyRuntimeError>(py, &detail);
                self.begin_stop(py);
                self.interrupted = true;
            }
            Item::Nothing => {}
        }
    }

    fn close_and_report(&mut self, py: Python<'_>, conn: Py<PyConnection>) {
        conn.get().open.store(false, Relaxed);
        self.callback(py, intern!(py, "on_connection_closed"), (conn,));
    }

    fn report_error<E: pyo3::PyTypeInfo>(&mut self, py: Python<'_>, detail: &str) {
        let error = PyErr::from_type(E::type_object(py), detail.to_owned());
        self.on_callback_error(py, error);
    }

    /// Calls the instance's method `name`; exceptions go to
    /// `on_exception_occurred`, `KeyboardInterrupt`/`SystemExit` stop the server.
    fn callback<'py, A>(&mut self, py: Python<'py>, name: &Bound<'py, PyString>, args: A)
    where
        A: pyo3::call::PyCallArgs<'py>,
    {
        if let Err(error) = self.instance.bind(py).call_method1(name, args) {
            self.on_callback_error(py, error);
        }
    }

    fn on_callback_error(&mut self, py: Python<'_>, error: PyErr) {
        if !error.is_instance_of::<PyException>(py) {
            return self.fail_with(py, error);
        }
        let value = error.into_value(py);
        let Err(second) = self
            .instance
            .bind(py)
            .call_method1(intern!(py, "on_exception_occurred"), (value,))
        else {
            return;
        };
        if !second.is_instance_of::<PyException>(py) {
            return self.fail_with(py, second);
        }
        let kwargs = [("exc_info", second.into_value(py))];
        let logged = pyo3::types::IntoPyDict::into_py_dict(kwargs, py).and_then(|kwargs| {
            self.logger.bind(py).call_method(
                intern!(py, "error"),
                ("on_exception_occurred raised an exception",),
                Some(&kwargs),
            )
        });
        if let Err(error) = logged {
            error.write_unraisable(py, None);
        }
    }

    /// Stops the server and makes the run raise `error` once it has. The
    /// first such error stops as `stop_server()` does: input already read
    /// is still handed to the callbacks and their replies go out. A second
    /// one cuts: no more input is handed over, and every connection still
    /// open is reset.
    fn fail_with(&mut self, py: Python<'_>, error: PyErr) {
        if self.exit_error.is_none() {
            self.exit_error = Some(error);
            // As stop_server() does: a stop that keeps the connections
            // becomes a drain.
            self.run.request_stop(None, true);
            return self.begin_stop(py);
        }
        self.interrupted = true;
        self.stopping = true;
        self.running.cut();
    }

    fn begin_stop(&mut self, py: Python<'_>) {
        if !self.stopping {
            self.stopping = true;
            // The application's cue, before any connection closes for the
            // stop: the engines announce `Draining`, whose answer closes
            // them, only once `cue` lets them.
            self.callback(py, intern!(py, "on_stopping"), ());
            self.run.cue();
        }
    }
}

/// Work for the dispatcher that is not a delivery: a call from another
/// thread, or a stop request it has not begun. Whoever makes either true
/// wakes it ([`RunState::wake_dispatcher`]).
fn has_other_work(agenda: &Agenda, run: &RunState, stopping: bool) -> bool {
    agenda.calls.is_pending() || (!stopping && run.stop_requested())
}
