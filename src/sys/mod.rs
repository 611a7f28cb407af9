//! The platform seam: readiness polling and the few socket calls that differ
//! between systems.
//!
//! The reactor is generic over a [`Selector`], so each backend is a plain
//! module exposing the same names (mio's arrangement), chosen at run time by
//! [`Backend`] so that one build can test both:
//!
//! - [`epoll`] (Linux): every socket is registered once, edge-triggered, for
//!   reading and writing. An event means "something changed"; the reactor reads
//!   or writes until `EAGAIN` or remembers the socket as still ready.
//! - [`portable`] (every platform, the only one off Linux): the `polling` crate,
//!   which is kqueue on macOS and IOCP/AFD on Windows (the technique of wepoll,
//!   rewritten in Rust). None of those offers edge triggering everywhere, so the
//!   backend is one-shot: an event disarms the socket, and the backend re-arms
//!   it with the interest the reactor reports once it has handled the event
//!   ([`Selector::set_interest`], which epoll ignores). On Linux
//!   this backend runs over epoll in one-shot mode, which is how the test suite
//!   exercises the re-arming logic on Linux.
//!
//! Both report readiness through [`Event`] and are woken from other threads
//! through a [`Wake`] handle.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use crate::token::Token;

#[cfg(target_os = "linux")]
pub mod epoll;
/// Off Linux, a stand-in whose selector cannot be made: callers name
/// `sys::epoll::Epoll` on every platform, without a `#[cfg]` of their own.
#[cfg(not(target_os = "linux"))]
#[path = "no_epoll.rs"]
pub mod epoll;
pub mod net;
pub mod portable;
pub mod thread;

/// Which readiness backend a server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Linux epoll, edge-triggered.
    Epoll,
    /// The `polling` crate in one-shot mode (kqueue, IOCP/AFD, or epoll).
    Portable,
}

impl Backend {
    /// The best backend this platform has.
    pub fn platform_default() -> Backend {
        if cfg!(target_os = "linux") {
            Backend::Epoll
        } else {
            Backend::Portable
        }
    }

    /// Parses `"auto"` (the platform's best), `"epoll"` or `"portable"`;
    /// `"epoll"` only where it exists.
    pub fn from_name(name: &str) -> Result<Backend, String> {
        match name {
            "auto" => Ok(Backend::platform_default()),
            "epoll" if cfg!(target_os = "linux") => Ok(Backend::Epoll),
            "epoll" => Err(format!(
                "the epoll backend exists only on Linux, not on {}; use 'auto' or 'portable'",
                std::env::consts::OS
            )),
            "portable" => Ok(Backend::Portable),
            other => Err(format!(
                "unknown backend {other:?}: expected 'auto', 'epoll' or 'portable'"
            )),
        }
    }

    /// The name [`Backend::from_name`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Portable => "portable",
        }
    }

    /// True if the backend's selector has a descriptor another event loop
    /// can watch ([`Selector::pollable`]): epoll's, kqueue's; not IOCP's.
    pub fn has_pollable(self) -> bool {
        match self {
            Backend::Epoll => true,
            Backend::Portable => cfg!(unix),
        }
    }
}

/// What a socket wants to hear about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    /// Report when reading would not block.
    pub readable: bool,
    /// Report when writing would not block.
    pub writable: bool,
    /// Report hangups and errors (a reset). False only for a socket that will
    /// be read soon anyway and must not be reported meanwhile.
    pub hangup: bool,
}

/// One readiness report. Hangups and errors are reported as both readable and
/// writable: the next `recv` or `send` tells what happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The registration the event is about.
    pub token: Token,
    /// Reading would not block.
    pub readable: bool,
    /// Writing would not block.
    pub writable: bool,
    /// A short read does not prove the socket drained: the peer shut down its
    /// side (the EOF waits behind the data), the connection broke, or urgent
    /// data split the stream (TCP stops a read at the urgent mark). Read on
    /// until `EAGAIN` or EOF.
    pub read_fully: bool,
    /// The connection hung up or has an error (a reset, most often). Reported
    /// even for a registration with no interest, where the backend can.
    pub hangup: bool,
}

/// Wakes a thread blocked in [`Selector::select`]; callable from any thread.
pub trait Wake: Send + Sync {
    /// Makes the current or next `select` return.
    fn wake(&self) -> io::Result<()>;
}

/// A readiness poller, owned by the I/O thread.
///
/// The reactor tells the selector what each socket wants after every change
/// ([`Selector::set_interest`]); how a backend honours it is its own affair.
/// Edge-triggered epoll watches everything once and for all and ignores it.
/// The one-shot portable backend re-arms the socket with it, since each event
/// disarms its socket.
pub trait Selector: Send + Sized + 'static {
    /// Creates the poller and its waker.
    fn new() -> io::Result<Self>;

    /// Starts watching `socket`.
    fn register(&self, socket: &Socket, token: Token, interest: Interest) -> io::Result<()>;

    /// Says what `socket` wants now; call it after handling each event and
    /// whenever the socket's wants change.
    fn set_interest(&self, socket: &Socket, token: Token, interest: Interest) -> io::Result<()>;

    /// Stops watching `socket`; call it before the socket is closed.
    fn deregister(&self, socket: &Socket) -> io::Result<()>;

    /// Waits up to `timeout` (`None`: forever) for events and puts them in
    /// `events`, replacing what was there. Returns early when woken; a
    /// signal-interrupted wait returns with no events.
    fn select(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;

    /// A handle other threads use to wake this selector.
    fn waker(&self) -> Arc<dyn Wake>;

    /// A descriptor that reads as ready while this selector has events to
    /// report (its epoll or kqueue descriptor), for a thread that sleeps in
    /// another event loop and watches it there; `None` where there is none
    /// (IOCP).
    fn pollable(&self) -> Option<i64>;
}
