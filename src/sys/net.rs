//! The socket calls the reactor makes, with each platform's way of making them
//! non-blocking, close-on-exec and free of SIGPIPE.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::net::SocketAddr;

use socket2::Socket;

/// Accepts one connection: non-blocking, close-on-exec, no SIGPIPE, no Nagle.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn accept(listener: &Socket) -> io::Result<Socket> {
    use std::os::fd::{AsRawFd, FromRawFd};
    loop {
        // SAFETY: a valid listening fd; null address pointers are allowed, the
        // peer address is read afterwards with `peer_addr`.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `accept4` returned a fresh fd that nothing else owns.
            let socket = unsafe { Socket::from_raw_fd(fd) };
            // Small request/response exchanges must not wait for Nagle; a failure
            // here only costs latency.
            let _ = socket.set_tcp_nodelay(true);
            return Ok(socket);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Accepts one connection: non-blocking, close-on-exec, no SIGPIPE, no Nagle.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn accept(listener: &Socket) -> io::Result<Socket> {
    let socket = loop {
        match listener.accept() {
            Ok((socket, _)) => break socket,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    socket.set_nonblocking(true)?;
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    socket.set_nosigpipe(true)?;
    let _ = socket.set_tcp_nodelay(true);
    Ok(socket)
}

/// `recv` into `buf`, retried on EINTR. Urgent (out-of-band) data is not part
/// of the stream, as on Unix without `SO_OOBINLINE`.
pub fn recv(socket: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match (&*socket).read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            #[cfg(windows)]
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && discard_urgent(socket) => continue,
            other => return other,
        }
    }
}

/// `recv` of at most `max` bytes into the spare capacity of `buf`, which
/// grows by what was read; retried on EINTR. Reading into spare capacity
/// spares zeroing a large buffer before every read.
pub fn recv_spare(socket: &Socket, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let n = recv_uninit(socket, &mut spare[..len])?;
    // SAFETY: `recv_uninit` wrote the first `n` bytes of the spare capacity,
    // so its first `buf.len() + n` bytes are initialised.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `recv` into `buf`, which need not be initialised, retried on EINTR; on
/// `Ok(n)`, the first `n` bytes of `buf` are written (`recv` never reports
/// more than the slice it was given).
pub fn recv_uninit(socket: &Socket, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    loop {
        match socket.recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            #[cfg(windows)]
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && discard_urgent(socket) => continue,
            other => return other,
        }
    }
}

/// Reads and drops a pending urgent byte; true if there was one. Windows keeps
/// an urgent byte apart until it is read with `MSG_OOB`, and meanwhile AFD
/// reports the socket readable at every poll, which would spin a one-shot
/// loop. Unix drops the byte from the stream by itself.
#[cfg(windows)]
fn discard_urgent(socket: &Socket) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket.recv_out_of_band(&mut byte), Ok(n) if n > 0)
}

/// `send` from `buf`, retried on EINTR; never raises SIGPIPE.
pub fn send(socket: &Socket, buf: &[u8]) -> io::Result<usize> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = libc::MSG_NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = 0; // macOS: SO_NOSIGPIPE is set at accept; Windows has no SIGPIPE.
    loop {
        match socket.send_with_flags(buf, flags) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `send` from several buffers in order, with one call (`sendmsg`,
/// `WSASend`); retried on EINTR; never raises SIGPIPE.
pub fn send_vectored(socket: &Socket, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let flags = libc::MSG_NOSIGNAL;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let flags = 0; // As in `send`.
    loop {
        match socket.send_vectored_with_flags(bufs, flags) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The socket's fd (SOCKET handle on Windows), for display.
pub fn raw_handle(socket: &Socket) -> i64 {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        i64::from(socket.as_raw_fd())
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::AsRawSocket;
        socket.as_raw_socket() as i64
    }
}

/// The socket's address as a `SocketAddr`, if it has an IP one.
pub fn local_addr(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok().and_then(|a| a.as_socket())
}

/// The peer's address as a `SocketAddr`, if it has an IP one.
pub fn peer_addr(socket: &Socket) -> Option<SocketAddr> {
    socket.peer_addr().ok().and_then(|a| a.as_socket())
}

/// True if `error` says the process or the system is out of file descriptors.
pub fn is_out_of_descriptors(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        // Windows has no per-process descriptor table to exhaust.
        let _ = error;
        false
    }
}

/// A file descriptor held in reserve, to be closed when the process runs out
/// of them (see the reactor's accept path). Elsewhere than Unix it is never
/// needed, and holds nothing.
#[derive(Debug)]
pub struct ReserveFd {
    #[cfg(unix)]
    _file: std::fs::File,
}

impl ReserveFd {
    /// Opens one (close-on-exec, as Rust opens every file), if it can.
    pub fn open() -> Option<ReserveFd> {
        #[cfg(unix)]
        {
            std::fs::File::open("/dev/null")
                .ok()
                .map(|file| ReserveFd { _file: file })
        }
        #[cfg(not(unix))]
        {
            None
        }
    }
}

/// Accept errors that concern one connection only (it was reset or refused
/// while queued); the next one may well succeed.
pub fn is_transient_accept_error(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR)
        )
    }
    #[cfg(not(unix))]
    {
        // A connection reset before it was accepted can also surface as
        // WSAENOTCONN (seen under Wine).
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
                | io::ErrorKind::Interrupted
        )
    }
}

/// On Unix, lets a restarted server bind its port while connections of the
/// last run linger in `TIME_WAIT` (`SO_REUSEADDR`). Left off on Windows,
/// where the same option would let another process take over a bound port.
pub fn allow_quick_rebind(socket: &Socket) -> io::Result<()> {
    #[cfg(not(windows))]
    socket.set_reuse_address(true)?;
    #[cfg(windows)]
    let _ = socket;
    Ok(())
}

/// A duplicate of the socket whose descriptor (a `SOCKET` handle on
/// Windows) is `fd`; the caller keeps its own. An `fd` that cannot name a
/// socket fails with [`io::ErrorKind::InvalidInput`] and says why.
#[cfg(unix)]
pub fn duplicate(fd: i64) -> io::Result<Socket> {
    use std::os::fd::{BorrowedFd, RawFd};
    let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why);
    let fd = RawFd::try_from(fd).map_err(|_| invalid("invalid file descriptor"))?;
    if fd < 0 {
        return Err(invalid("the socket is closed"));
    }
    // SAFETY: the borrow lives for one `dup` call and nothing is read or written
    // through it. rsepoll.Server.register_listener_socket passes the fileno() of
    // a socket object it holds open during the call; any other caller's bad
    // number makes `dup` fail with EBADF, or yields a duplicate that the
    // caller checks (the Python layer accepts only TCP sockets).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(Socket::from(borrowed.try_clone_to_owned()?))
}

/// A duplicate of the socket whose descriptor (a `SOCKET` handle on
/// Windows) is `fd`; the caller keeps its own. An `fd` that cannot name a
/// socket fails with [`io::ErrorKind::InvalidInput`] and says why.
#[cfg(windows)]
pub fn duplicate(fd: i64) -> io::Result<Socket> {
    use std::os::windows::io::{BorrowedSocket, RawSocket};
    let handle = RawSocket::try_from(fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid socket handle"))?;
    // SAFETY: as on Unix: a live socket held by the caller, only borrowed to
    // duplicate it.
    let borrowed = unsafe { BorrowedSocket::borrow_raw(handle) };
    Ok(Socket::from(borrowed.try_clone_to_owned()?))
}
