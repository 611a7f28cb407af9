//! A run's stop request, shared by `stop_server()` (from any thread, and
//! before `listen()`) and the dispatcher on the listening thread: owned by
//! the server object, reset when `listen()` ends.
//!
//! A stop either drains the connections (`close_connections=True`: no more
//! input is read, each closes once its replies are out) or keeps them
//! (`False`: they are served as usual until the application has closed
//! them). Either way the application hears of it before any connection
//! closes for it: the dispatcher calls `on_stopping()` when it begins the
//! stop, and only then ([`RunState::cue`]) may the engines announce
//! `Draining`, whose answer closes the connections. A request does the
//! rest at once, from whatever thread, as it did before `on_stopping`
//! existed: accepting stops (new clients are refused), reading stops too
//! for a drain, and the stop's deadline runs from the first request.
//!
//! The rules between requests:
//! - the first request's timeout stands, and so does its kind, with one
//!   exception: a request to close the connections while a stop keeps them
//!   turns that stop into a drain (Ctrl-C asks for this too), by the first
//!   stop's deadline or the new timeout, whichever comes first (the hub
//!   keeps the earlier one: [`crate::server::Sender::stop`]);
//! - nothing turns a drain back into a stop that keeps the connections.
//!
//! The lock orders each request's effect on the engines with the cue: a
//! request either comes before the cue, which then applies it in full, or
//! sees the cue and applies itself. `on_stopping` runs without it, so that
//! the callback may call `stop_server()`.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use crate::server::{Sender, DEFAULT_STOP_TIMEOUT};
use crate::sync::Mutex;

/// What a run's stop request is; see the module docs.
#[derive(Debug)]
pub(super) struct RunState {
    /// A stop was requested and the running `listen()` has not ended: the
    /// dispatcher's cheap check.
    pub(super) stop_requested: AtomicBool,
    stop: Mutex<Stop>,
}

/// The requests so far, as they add up.
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

impl RunState {
    pub(super) fn new() -> Self {
        RunState {
            stop_requested: AtomicBool::new(false),
            stop: Mutex::new(Stop::NONE),
        }
    }

    /// Asks the run to stop within `timeout` (`None`: the timeout that
    /// stands, the default if none does), closing the connections or, unless
    /// `close_connections`, keeping them until the application closes them.
    /// `sender` is the running server's, if one runs: without it the request
    /// waits for the next `listen()`.
    pub(super) fn request_stop(
        &self,
        timeout: Option<Duration>,
        close_connections: bool,
        sender: Option<&Sender>,
    ) {
        let mut stop = self.stop.lock();
        if !self.stop_requested.swap(true, SeqCst) {
            stop.timeout = timeout.unwrap_or(stop.timeout);
        }
        if close_connections && stop.close_timeout.is_none() {
            stop.close_timeout = Some(timeout.unwrap_or(stop.timeout));
        }
        if let Some(sender) = sender {
            stop.apply(sender);
        }
    }

    /// `on_stopping` has run: the stop requested (a drain, with the default
    /// timeout, if none was) reaches the engines in full, and so will the
    /// requests that follow.
    pub(super) fn cue(&self, sender: &Sender) {
        let mut stop = self.stop.lock();
        stop.cued = true;
        if !self.stop_requested.swap(true, SeqCst) {
            stop.close_timeout = Some(stop.timeout);
        }
        stop.apply(sender);
    }

    /// True while a stop keeps the connections (none closes them yet): the
    /// server still serves them as usual.
    pub(super) fn keeps_connections(&self) -> bool {
        self.stop_requested.load(SeqCst) && self.stop.lock().close_timeout.is_none()
    }

    /// Forgets the run's stop request: the next `listen()` starts afresh.
    pub(super) fn reset(&self) {
        let mut stop = self.stop.lock();
        *stop = Stop::NONE;
        self.stop_requested.store(false, SeqCst);
    }
}
