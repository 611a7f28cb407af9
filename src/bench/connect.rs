//! Opening a worker's share of the connections.
//!
//! One loopback address gives out about 28,000 ephemeral ports, so to one
//! server port at most that many connections fit. On Linux, where all of
//! 127.0.0.0/8 is the loopback interface, a run of more than
//! [`PER_SOURCE`] connections to a 127.x.x.x server binds them to
//! 127.0.0.1, 127.0.0.2, ... in turn, [`PER_SOURCE`] each. Elsewhere (macOS
//! only has 127.0.0.1) the system picks the source address.

use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{Shared, Tally};

/// Connections per loopback source address when a run needs several.
pub(super) const PER_SOURCE: usize = 16_384;

/// The address connection `id` of `total` binds to before it connects.
pub(super) fn source_for(id: usize, total: usize, server: SocketAddr) -> Option<SocketAddr> {
    if !cfg!(target_os = "linux") || total <= PER_SOURCE {
        return None;
    }
    match server {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let host = 1 + (id / PER_SOURCE) % 254;
            Some(SocketAddr::from(([127, 0, 0, host as u8], 0)))
        }
        _ => None,
    }
}

/// Connects `ids` one after the other, giving up at `deadline`; counts each
/// failure as an error. Returns the connections made, non-blocking and with
/// `TCP_NODELAY`.
pub(super) fn connect_all(
    shared: &Shared,
    ids: impl Iterator<Item = usize>,
    deadline: Instant,
    tally: &mut Tally<'_>,
) -> Vec<(usize, TcpStream)> {
    let config = &shared.config;
    let mut streams = Vec::new();
    for id in ids {
        if shared.stopping() {
            break;
        }
        let source = source_for(id, config.connections, config.addr);
        match connect(config.addr, source, deadline) {
            Ok(stream) => streams.push((id, stream)),
            Err(error) => {
                let from = source.map_or_else(String::new, |s| format!(" from {}", s.ip()));
                tally.fail(format!(
                    "connection {id}: connect to {}{from}: {error}",
                    config.addr
                ));
            }
        }
    }
    streams
}

fn connect(
    server: SocketAddr,
    source: Option<SocketAddr>,
    deadline: Instant,
) -> std::io::Result<TcpStream> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the connect timeout has passed",
        ));
    }
    let socket = Socket::new(
        Domain::for_address(server),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(source) = source {
        bind_address_no_port(&socket);
        socket.bind(&SockAddr::from(source))?;
    }
    socket.connect_timeout(&SockAddr::from(server), left)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Lets the system pick the source port at `connect` rather than at `bind`,
/// so that ports are shared between destinations (Linux 4.2+; best effort).
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the fd is open (owned by `socket`), and the option value is a
    // c_int that lives across the call, whose size is passed along.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &Socket) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_only_when_needed_and_on_loopback() {
        let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(source_for(5, PER_SOURCE, local), None);
        let other: SocketAddr = "10.0.0.1:9".parse().unwrap();
        assert_eq!(source_for(5, 100_000, other), None);
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(source_for(5, 100_000, v6), None);
        if cfg!(target_os = "linux") {
            let ip = |id| source_for(id, 100_000, local).unwrap().ip().to_string();
            assert_eq!(ip(0), "127.0.0.1");
            assert_eq!(ip(PER_SOURCE - 1), "127.0.0.1");
            assert_eq!(ip(PER_SOURCE), "127.0.0.2");
            assert_eq!(ip(99_999), "127.0.0.7");
        } else {
            assert_eq!(source_for(5, 100_000, local), None);
        }
    }
}
