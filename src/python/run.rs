//! One run of a server (a `listen()` or a `serve()`), as the server object
//! and the run's dispatcher both see it.
//!
//! [`RunState`] lives as long as the server object and is shared with each
//! run's [`Dispatcher`](super::dispatch::Dispatcher): whether a run is
//! under way, its stop request (which `stop_server()` may make from any
//! thread, even before the run starts), the handle that reaches its I/O
//! threads, and the counters the last run left. A [`RunTicket`] is one run's
//! claim on it: taking one fails while another run is under way, and
//! dropping it, however the run ends, puts the state back for the next.
//!
//! A stop either drains the connections (`close_connections=True`: no more
//! input is read, each closes once its replies are out) or keeps them
//! (`False`: they are served as usual until the application has closed
//! them). Either way the application hears of it before any connection
//! closes for it: the dispatcher calls `on_stopping()` when it begins the
//! stop, and only then ([`RunState::cue`]) may the engines announce
//! `Draining`, whose answer closes the connections. A request does the
//! rest at once, from whatever thread: accepting stops (new clients are
//! refused), reading stops too for a drain, and the stop's deadline runs
//! from the first request.
//!
//! The rules between requests:
//! - the first request's timeout stands, and so does its kind, with one
//!   exception: a request to close the connections while a stop keeps them
//!   turns that stop into a drain (Ctrl-C asks for this too), by the first
//!   stop's deadline or the new timeout, whichever comes first (the hub
//!   keeps the earlier one: [`crate::server::Sender::stop`]);
//! - nothing turns a drain back into a stop that keeps the connections.
//!
//! The stop's lock orders each request's effect on the engines with the
//! cue: a request either comes before the cue, which then applies it in
//! full, or sees the cue and applies itself. `on_stopping` runs without it,
//! so that the callback may call `stop_server()`. Locks are taken in one
//! order: the stop's, then the run's handle (`current`).

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::PyResult;

use crate::server::{Sender, DEFAULT_STOP_TIMEOUT};
use crate::stats::Snapshot;
use crate::sync::Mutex;

/// What a server's runs share with the server object.
pub(super) struct RunState {
    /// A run is under way.
    running: AtomicBool,
    /// A stop was requested and the run it applies to has not ended: the
    /// dispatcher's cheap check.
    stop_requested: AtomicBool,
    /// The requests so far, as they add up.
    stop: Mutex<Stop>,
    /// The running server's command handle.
    current: Mutex<Option<Sender>>,
    /// The counters as the last run left them.
    last_stats: Mutex<Snapshot>,
}

impl RunState {
    pub(super) fn new() -> Self {
        RunState {
            running: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            stop: Mutex::new(Stop::NONE),
            current: Mutex::new(None),
            last_stats: Mutex::new(Snapshot::default()),
        }
    }

    /// Claims the server for a run; fails if one is under way.
    pub(super) fn begin(self: &Arc<Self>) -> PyResult<RunTicket> {
        if self.running.swap(true, SeqCst) {
            return Err(PyRuntimeError::new_err(
                "the server is already running (listen() or serve())",
            ));
        }
        Ok(RunTicket(Arc::clone(self)))
    }

    /// True while a run is under way.
    pub(super) fn is_running(&self) -> bool {
        self.running.load(SeqCst)
    }

    /// Asks the run to stop within `timeout` (`None`: the timeout that
    /// stands, the default if none does), closing the connections or, unless
    /// `close_connections`, keeping them until the application closes them.
    /// Without a run under way, the request waits for the next one.
    pub(super) fn request_stop(&self, timeout: Option<Duration>, close_connections: bool) {
        let mut stop = self.stop.lock();
        if !self.stop_requested.swap(true, SeqCst) {
            stop.timeout = timeout.unwrap_or(stop.timeout);
        }
        if close_connections && stop.close_timeout.is_none() {
            stop.close_timeout = Some(timeout.unwrap_or(stop.timeout));
        }
        if let Some(sender) = self.current.lock().as_ref() {
            stop.apply(sender);
            // The dispatcher begins the stop (`on_stopping`, the cue) at
            // once, even asleep in an event loop.
            sender.ring_consumer();
        }
    }

    /// `on_stopping` has run: the stop requested (a drain, with the default
    /// timeout, if none was) reaches the engines in full, and so will the
    /// requests that follow.
    pub(super) fn cue(&self) {
        let mut stop = self.stop.lock();
        stop.cued = true;
        if !self.stop_requested.swap(true, SeqCst) {
            stop.close_timeout = Some(stop.timeout);
        }
        if let Some(sender) = self.current.lock().as_ref() {
            stop.apply(sender);
        }
    }

    /// True once a stop was asked for.
    pub(super) fn stop_requested(&self) -> bool {
        self.stop_requested.load(SeqCst)
    }

    /// True while a stop keeps the connections (none closes them yet): the
    /// server still serves them as usual.
    pub(super) fn keeps_connections(&self) -> bool {
        self.stop_requested() && self.stop.lock().close_timeout.is_none()
    }

    /// The run's I/O threads are up: `stop_server()` and `stats()` reach them
    /// through `sender` from now on.
    pub(super) fn started(&self, sender: Sender) {
        *self.current.lock() = Some(sender);
    }

    /// Wakes the run's dispatcher if it sleeps (after giving it work that is
    /// not a delivery: a call from another thread, an earlier timer).
    pub(super) fn wake_dispatcher(&self) {
        if let Some(sender) = self.current.lock().as_ref() {
            sender.ring_consumer();
        }
    }

    /// The counters: the running server's, at most one I/O turn old, else
    /// the last run's.
    pub(super) fn stats(&self) -> Snapshot {
        match self.current.lock().as_ref() {
            Some(sender) => sender.stats(),
            None => *self.last_stats.lock(),
        }
    }
}

/// One run's claim on its server's [`RunState`]; dropping it ends the run.
pub(super) struct RunTicket(Arc<RunState>);

impl Drop for RunTicket {
    fn drop(&mut self) {
        let state = &self.0;
        // The stop's lock first, as everywhere (see the module docs).
        let mut stop = state.stop.lock();
        let current = state.current.lock().take();
        if let Some(sender) = current {
            *state.last_stats.lock() = sender.stats();
        }
        *stop = Stop::NONE;
        state.stop_requested.store(false, SeqCst);
        state.running.store(false, SeqCst);
    }
}

/// The stop requests of a run so far, as they add up.
#[derive(Clone, Copy, Debug)]
struct Stop {
    /// The first request's timeout (the default until one comes).
    timeout: Duration,
    /// The timeout of the first request to close the connections, if one
    /// came: the first request's, or the one that turns a stop that kept
    /// them into a drain.
    close_timeout: Option<Duration>,
    /// `on_stopping` has run: requests reach the engines in full.
    cued: bool,
}

impl Stop {
    const NONE: Stop = Stop {
        timeout: DEFAULT_STOP_TIMEOUT,
        close_timeout: None,
        cued: false,
    };

    /// Tells the engines what the requests add up to, as far as the cue
    /// allows. Repeating it is harmless: the hub ignores a request that
    /// takes the stop no further.
    ///
    /// One request to the hub, so that the engines never see a drain's
    /// first step alone (they would read on after closing the listeners).
    /// The hub keeps the earlier deadline when a stop goes further, so the
    /// shorter of the two timeouts gives what the requests ask for: the
    /// first request's deadline, or the escalating one's if earlier.
    fn apply(&self, sender: &Sender) {
        match (self.close_timeout, self.cued) {
            (None, _) => sender.stop_accepting(self.timeout),
            // Reading stops at once too; the connections close once the
            // dispatcher, having cued the application, lets the drain go on.
            (Some(close), false) => sender.stop_reading(close.min(self.timeout)),
            (Some(close), true) => sender.stop(close.min(self.timeout)),
        }
    }
}
