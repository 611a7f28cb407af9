//! `rsepoll.Connection` (`PyConnection` here, so that the name does not
//! collide with the I/O thread's [`crate::conn::Connection`]): what callbacks
//! receive for each client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{OnceLock, Weak};

use pyo3::prelude::*;

use super::loans::Loans;
use crate::close_reason::CloseReason;
use crate::framing::Framing;
use crate::message::Opened;
use crate::server::{Sender, WeakSender};
use crate::token::ConnKey;

/// One client connection.
///
/// The same object stands for the connection from `on_connection_opened` to
/// `on_connection_closed`; it is hashable and can carry the application's own
/// attributes. After the connection closes, sending to it does nothing and
/// returns False: a later connection that gets the same fd number is a
/// different object with a different `id`.
#[pyclass(frozen, dict, weakref, module = "rsepoll", name = "Connection")]
pub struct PyConnection {
    pub(super) key: ConnKey,
    pub(super) server_id: u64,
    pub(super) opened: Opened,
    /// Cleared when `on_connection_closed` is about to run.
    pub(super) open: AtomicBool,
    /// Set, under the command ring's lock, once a close was queued: no more
    /// sends are accepted (see `Sender::request`).
    pub(super) closing: AtomicBool,
    /// How its messages are cut and framed.
    pub(super) framing: Framing,
    /// Why it closed; set just before `on_connection_closed`.
    pub(super) close_reason: OnceLock<CloseReason>,
    sender: WeakSender,
    /// Where large `bytes` payloads wait while the I/O thread writes them.
    loans: Weak<Loans>,
}

impl PyConnection {
    /// The handle of a connection that has just opened.
    pub(super) fn new(
        key: ConnKey,
        server_id: u64,
        opened: Opened,
        framing: Framing,
        sender: WeakSender,
        loans: Weak<Loans>,
    ) -> Self {
        PyConnection {
            key,
            server_id,
            opened,
            framing,
            open: AtomicBool::new(true),
            closing: AtomicBool::new(false),
            close_reason: OnceLock::new(),
            sender,
            loans,
        }
    }

    /// The running server's command handle, unless the server has ended.
    pub(super) fn sender(&self) -> Option<Sender> {
        self.sender.upgrade()
    }

    /// The running server's keeper of lent payloads, unless it has ended.
    pub(super) fn loans(&self) -> Option<std::sync::Arc<Loans>> {
        self.loans.upgrade()
    }

    /// True while sends to this connection are still accepted.
    pub(super) fn accepts_sends(&self) -> bool {
        self.open.load(Relaxed) && !self.closing.load(Relaxed)
    }
}

fn address_tuple(address: Option<SocketAddr>) -> Option<(String, u16)> {
    address.map(|a| (a.ip().to_string(), a.port()))
}

#[pymethods]
impl PyConnection {
    /// Unique for the server's life (fd numbers are not).
    #[getter]
    fn id(&self) -> u64 {
        self.key.id
    }

    /// The socket's file descriptor (SOCKET handle on Windows), for display and
    /// logging. Do not read, write or close it: the I/O thread owns it.
    #[getter]
    fn fd(&self) -> i64 {
        self.opened.fd
    }

    /// The peer's `(host, port)`; None if the client had reset the connection
    /// before the server accepted it, so that the system no longer knew the
    /// peer (the connection then closes at once, with `close_reason ==
    /// "reset"`).
    #[getter]
    fn remote_address(&self) -> Option<(String, u16)> {
        address_tuple(self.opened.peer)
    }

    /// The local `(host, port)` the connection arrived on; None only if the
    /// system would not tell.
    #[getter]
    fn local_address(&self) -> Option<(String, u16)> {
        address_tuple(self.opened.local)
    }

    /// False once the connection has closed.
    #[getter]
    fn is_open(&self) -> bool {
        self.open.load(Relaxed)
    }

    /// Bytes that `send_message` accepted for this connection and the socket
    /// has not taken yet (0 once it has closed).
    #[getter]
    fn pending_bytes(&self) -> usize {
        if self.open.load(Relaxed) {
            self.opened.pending.get()
        } else {
            0
        }
    }

    /// Why the connection closed, once it has: `"peer"`, `"reset"`,
    /// `"local"`, `"idle_timeout"`, `"message_timeout"`, `"too_large"`,
    /// `"limit"`, `"error"` or `"shutdown"`. None while it is open.
    #[getter]
    fn close_reason(&self) -> Option<&'static str> {
        self.close_reason.get().map(|reason| reason.name())
    }

    fn __repr__(&self) -> String {
        let remote = match self.opened.peer {
            Some(peer) => peer.to_string(),
            None => "?".into(),
        };
        let state = if self.open.load(Relaxed) {
            "open"
        } else {
            "closed"
        };
        format!(
            "<rsepoll.Connection id={} fd={} remote={} {}>",
            self.key.id, self.opened.fd, remote, state
        )
    }
}
