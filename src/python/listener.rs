//! `rsepoll.ListenerSocket` and `make_listener_socket`.

use std::net::{SocketAddr, ToSocketAddrs};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use socket2::{Domain, Protocol, Socket, Type};

use crate::sync::Mutex;

/// A bound, listening, non-blocking TCP socket, made by `make_listener_socket`.
///
/// `Server.register_listener_socket` keeps its own duplicate, so this object
/// can be closed (or dropped) once registered.
#[pyclass(frozen, module = "rsepoll", name = "ListenerSocket")]
pub struct ListenerSocket {
    socket: Mutex<Option<Socket>>,
    address: SocketAddr,
}

impl ListenerSocket {
    /// A new handle on the same listening socket (a `dup`, close-on-exec).
    pub(super) fn duplicate(&self) -> PyResult<Socket> {
        let guard = self.socket.lock();
        match guard.as_ref() {
            Some(socket) => Ok(socket.try_clone()?),
            None => Err(PyValueError::new_err("the listener socket is closed")),
        }
    }
}

#[pymethods]
impl ListenerSocket {
    /// The port it listens on (the one the system picked, for port 0).
    #[getter]
    fn port(&self) -> u16 {
        self.address.port()
    }

    /// The `(host, port)` it listens on.
    #[getter]
    fn address(&self) -> (String, u16) {
        (self.address.ip().to_string(), self.address.port())
    }

    /// True after `close()`.
    #[getter]
    fn closed(&self) -> bool {
        self.socket.lock().is_none()
    }

    /// The file descriptor, or -1 once closed.
    fn fileno(&self) -> i64 {
        let guard = self.socket.lock();
        guard.as_ref().map_or(-1, crate::sys::net::raw_handle)
    }

    /// Closes this handle (servers it was registered with keep theirs).
    fn close(&self) {
        self.socket.lock().take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) {
        self.close();
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { " closed" } else { "" };
        format!("<rsepoll.ListenerSocket {}{}>", self.address, state)
    }
}

/// Makes a TCP socket bound to `(host, port)` and listening: non-blocking,
/// close-on-exec, `SO_REUSEADDR` (except on Windows, where it would let another
/// process steal the port). `port=0` picks a free port; see `.port`. An IPv6
/// wildcard host (`"::"`) also accepts IPv4 connections.
#[pyfunction]
#[pyo3(signature = (port, host = "0.0.0.0", backlog = 1024))]
pub fn make_listener_socket(port: i64, host: &str, backlog: i64) -> PyResult<ListenerSocket> {
    let port = u16::try_from(port)
        .map_err(|_| PyValueError::new_err(format!("port must be from 0 to 65535, got {port}")))?;
    let backlog = i32::try_from(backlog)
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| PyValueError::new_err(format!("backlog must be positive, got {backlog}")))?;
    let address = (host, port)
        .to_socket_addrs()
        .map_err(|e| PyOSError::new_err(format!("cannot resolve host {host:?}: {e}")))?
        .next()
        .ok_or_else(|| PyOSError::new_err(format!("host {host:?} has no address")))?;
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    crate::sys::net::allow_quick_rebind(&socket)?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&address.into()).map_err(|e| {
        PyOSError::new_err((
            e.raw_os_error().unwrap_or(0),
            format!("cannot listen on {address}: {}", description(&e)),
        ))
    })?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    let address = crate::sys::net::local_addr(&socket).unwrap_or(address);
    Ok(ListenerSocket {
        socket: Mutex::new(Some(socket)),
        address,
    })
}

/// What the system says of `error`, without the " (os error N)" that Rust
/// appends: an `OSError` shows its number already, as `[Errno N]`.
fn description(error: &std::io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    }
}

/// A duplicate of the listening socket with descriptor (or handle) `fd`,
/// checked to be a TCP socket and made non-blocking.
pub(super) fn duplicate_fd(fd: i64) -> PyResult<Socket> {
    let socket = crate::sys::net::duplicate(fd).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
        _ => PyErr::from(e),
    })?;
    checked_listener(socket)
}

/// Accepts a duplicated socket only if it is an IPv4/IPv6 stream socket, and
/// makes it non-blocking. A duplicate shares the file status flags, so the
/// caller's socket becomes non-blocking too (as with asyncio's `sock=`).
fn checked_listener(socket: Socket) -> PyResult<Socket> {
    // The bound address tells the family on every platform (`Socket::domain`
    // exists only on Linux, Android and Fuchsia). A listener is always bound.
    let is_ip = crate::sys::net::local_addr(&socket).is_some();
    if !is_ip || socket.r#type()? != socket2::Type::STREAM {
        return Err(PyValueError::new_err(
            "not a TCP socket: expected an IPv4 or IPv6 SOCK_STREAM socket",
        ));
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}
