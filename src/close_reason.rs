//! Why a connection closed: the one vocabulary the I/O thread, the
//! counters and the application share (`conn.close_reason` in Python,
//! `closes` in the stats).
//!
//! A leaf: it depends on nothing in the crate, so that the connection state
//! machine, the ring slots and the counters can all name a reason without
//! depending on each other.

use std::fmt;

/// Why a connection closed; the application reads it as `conn.close_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The peer ended the connection: it shut down its side and the
    /// application then closed (by default, `on_eof_received` does).
    Peer,
    /// The peer reset the connection, or a send or receive failed because it
    /// had gone.
    Reset,
    /// The application called `close_connection`.
    Local,
    /// Nothing was sent or received for `idle_timeout`.
    IdleTimeout,
    /// A message was started and not finished within `message_timeout`.
    MessageTimeout,
    /// The peer sent a message larger than `max_message_size`.
    TooLarge,
    /// Turned away at once: the server was at `max_connections`.
    Limit,
    /// The system reported an unexpected error for this socket.
    Error,
    /// The server stopped.
    Shutdown,
}

impl CloseReason {
    /// Every reason, in declaration order (for per-reason counters).
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Peer,
        CloseReason::Reset,
        CloseReason::Local,
        CloseReason::IdleTimeout,
        CloseReason::MessageTimeout,
        CloseReason::TooLarge,
        CloseReason::Limit,
        CloseReason::Error,
        CloseReason::Shutdown,
    ];

    /// The name the Python API uses (`"peer"`, `"idle_timeout"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Peer => "peer",
            CloseReason::Reset => "reset",
            CloseReason::Local => "local",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MessageTimeout => "message_timeout",
            CloseReason::TooLarge => "too_large",
            CloseReason::Limit => "limit",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The reason an I/O error on a connection's socket stands for.
    pub fn of_error(error: &std::io::Error) -> CloseReason {
        use std::io::ErrorKind::*;
        match error.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | TimedOut => {
                CloseReason::Reset
            }
            _ => CloseReason::Error,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
