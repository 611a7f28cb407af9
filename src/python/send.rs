//! The send path of `send_message`, `close_connection` and the reading
//! switches: a payload taken from any bytes-like object, framed, lent to the
//! I/O thread when it is a large `bytes`, otherwise copied into the command
//! ring, first without waiting and then, if it must wait, with the GIL
//! released.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView, PyString};

use super::connection::PyConnection;
use super::loans::{Loans, LEND_MIN};
use crate::framing::{self, Envelope, Framing};
use crate::server::{Request, SendError, Sender};

/// Queues `data` (bytes-like, or `str` sent as UTF-8) for `conn`; see
/// `ServerCore.send_message`.
pub(super) fn message(
    py: Python<'_>,
    conn: &PyConnection,
    data: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let payload = Payload::extract(data)?;
    if !conn.accepts_sends() {
        return Ok(false);
    }
    let bytes = payload.as_bytes();
    let envelope = match conn.framing {
        Framing::Raw if bytes.is_empty() => return Ok(true),
        Framing::Raw => None,
        // A framed message is never empty on the wire: an empty line, or
        // a zero length.
        framing => Some(
            framing::envelope(framing, bytes.len())
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        ),
    };
    if bytes.len() >= LEND_MIN {
        if let (Ok(object), Some(loans)) = (data.cast_exact::<PyBytes>(), conn.loans()) {
            return Ok(lend(py, conn, envelope.as_ref(), object, &loans));
        }
    }
    Ok(queue(
        py,
        conn,
        match &envelope {
            Some(envelope) => Request::SendFramed(envelope, bytes),
            None => Request::Send(bytes),
        },
    ))
}

/// Queues `request` for `conn`: first without waiting, holding the GIL; if
/// that cannot be done at once (another thread is sending, or the ring is
/// full), again with the GIL released, so that waiting never blocks other
/// Python threads and can never deadlock with a thread that holds the ring's
/// lock. Returns whether it was queued: not once the connection's close was
/// requested (see `Sender::request`), nor once the server has stopped.
pub(super) fn queue(py: Python<'_>, conn: &PyConnection, request: Request<'_>) -> bool {
    // Counted before it is queued: the I/O thread subtracts once it is written.
    let sending = match request {
        Request::Send(bytes) => bytes.len(),
        Request::SendFramed(envelope, payload) => envelope.overhead() + payload.len(),
        _ => 0,
    };
    submit(py, conn, sending, |sender, wait| {
        sender.request(conn.key, request, Some(&conn.closing), wait)
    })
    .is_some()
}

/// Sends the `bytes` object `object` (framed by `envelope`, if any) from its
/// own buffer, without copying it into the command ring; `loans` keeps it
/// alive until the I/O thread is done with it. Otherwise as [`queue`].
fn lend(
    py: Python<'_>,
    conn: &PyConnection,
    envelope: Option<&Envelope>,
    object: &Bound<'_, PyBytes>,
    loans: &Loans,
) -> bool {
    let bytes = object.as_bytes();
    let sending = envelope.map_or(0, Envelope::overhead) + bytes.len();
    let ticket = submit(py, conn, sending, |sender, wait| {
        // SAFETY: `bytes` belongs to an exact `bytes` object, which is
        // immutable; the caller holds it until this returns, and then
        // `loans` does until the I/O thread has returned the ticket, or has
        // been joined (see `Loans`).
        unsafe { sender.lend(conn.key, envelope, bytes, Some(&conn.closing), wait) }
    });
    let Some(ticket) = ticket else {
        return false;
    };
    let sender = conn.sender();
    let has_returned = |ticket| sender.as_ref().is_some_and(|s| s.has_returned(ticket));
    loans.keep(py, ticket, object.clone().unbind(), has_returned);
    if loans.wakes_consumer() {
        if let Some(sender) = &sender {
            sender.ring_consumer();
        }
    }
    true
}

/// Runs `push` for `conn`'s sender, first without waiting and then, if it
/// would block, waiting with the GIL released (see [`queue`]). `sending`
/// bytes are counted as pending meanwhile, and withdrawn if nothing was
/// queued.
fn submit<T: Send>(
    py: Python<'_>,
    conn: &PyConnection,
    sending: usize,
    push: impl Fn(&Sender, bool) -> Result<T, SendError> + Sync,
) -> Option<T> {
    let sender = conn.sender()?;
    conn.opened.pending.add(sending);
    let queued = match push(&sender, false) {
        Ok(done) => Some(done),
        Err(SendError::Stopped | SendError::Closing) => None,
        Err(SendError::WouldBlock) => py.detach(|| push(&sender, true).ok()),
    };
    if queued.is_none() {
        conn.opened.pending.withdraw(sending);
    }
    queued
}

/// The bytes of a `send_message` argument: borrowed from `bytes` and `str`
/// (immutable, so safe to read with the GIL released), copied from other
/// buffers (a `bytearray` may change under us).
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl<'a> Payload<'a> {
    fn extract(data: &'a Bound<'_, PyAny>) -> PyResult<Payload<'a>> {
        if let Ok(bytes) = data.cast::<PyBytes>() {
            return Ok(Payload::Borrowed(bytes.as_bytes()));
        }
        if let Ok(text) = data.cast::<PyString>() {
            return Ok(Payload::Borrowed(text.to_str()?.as_bytes()));
        }
        let type_error = || {
            let name = data
                .get_type()
                .name()
                .map_or_else(|_| "?".to_owned(), |n| n.to_string());
            PyTypeError::new_err(format!(
                "data must be bytes, a bytes-like object or str, not {name}"
            ))
        };
        let view = PyMemoryView::from(data).map_err(|_| type_error())?;
        // Any buffer format (array('i'), ...) is sent as its raw bytes.
        let bytes = view.call_method1(intern!(data.py(), "cast"), ("B",))?;
        let buffer = pyo3::buffer::PyBuffer::<u8>::get(&bytes)?;
        Ok(Payload::Owned(buffer.to_vec(data.py())?))
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Borrowed(bytes) => bytes,
            Payload::Owned(bytes) => bytes,
        }
    }
}
