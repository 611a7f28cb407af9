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
    /// `stop_server()` was called and the run it applies to has not ended.
    stop_requested: AtomicBool,
    /// The timeout of the first `stop_server()` since the last run.
    stop_timeout: Mutex<Duration>,
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
            stop_timeout: Mutex::new(DEFAULT_STOP_TIMEOUT),
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

    /// Asks the run to stop, giving queued output `timeout` (the first
    /// request's timeout stands), and tells its I/O threads if it has them.
    pub(super) fn request_stop(&self, timeout: Duration) {
        let stands = {
            let mut stands = self.stop_timeout.lock();
            if !self.stop_requested.swap(true, SeqCst) {
                *stands = timeout;
            }
            *stands
        };
        if let Some(sender) = self.current.lock().as_ref() {
            sender.stop(stands);
        }
    }

    /// True once a stop was asked for.
    pub(super) fn stop_requested(&self) -> bool {
        self.stop_requested.load(SeqCst)
    }

    /// The timeout the stop request carries.
    pub(super) fn stop_timeout(&self) -> Duration {
        *self.stop_timeout.lock()
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
        if let Some(sender) = state.current.lock().take() {
            *state.last_stats.lock() = sender.stats();
        }
        *state.stop_timeout.lock() = DEFAULT_STOP_TIMEOUT;
        state.stop_requested.store(false, SeqCst);
        state.running.store(false, SeqCst);
    }
}
