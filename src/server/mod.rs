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
//! that any thread can send. The mutex is held for a whole message: while
//! its parts are copied into the ring and, when the ring is full, while the
//! sender waits for the I/O thread to free slots (never while waiting for a
//! Python lock). A sender that finds the mutex taken or the ring full can
//! step back (release the GIL) before it blocks. Holding it for a whole
//! message keeps each message's bytes together and gives all senders to one
//! engine (so to one connection) one order, the order in which they took the
//! mutex.
//!
//! [`running`] has the consumer's side, [`sender`] the send side; the
//! threads themselves are started by the reactor ([`crate::reactor`]).

use std::time::Duration;

mod running;
mod sender;
#[cfg(all(test, not(loom)))]
mod tests;

pub use crate::config::Config;
pub use crate::shared::{SendError, DEFAULT_STOP_TIMEOUT};
pub use running::Running;
pub use sender::{Request, Sender, Ticket, WeakSender};

/// How long a server dropped without being stopped gives queued output.
pub const ABANDON_TIMEOUT: Duration = Duration::from_secs(1);
