//! Helpers shared by the engine tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::TcpStream;
use std::time::{Duration, Instant};

use _rsepoll::message::DeliveryKind;
use _rsepoll::server::{Config, Running};
use _rsepoll::sys::Backend;
use _rsepoll::token::ConnKey;
use socket2::{Domain, Socket, Type};

/// Every backend this platform has.
pub fn backends() -> Vec<Backend> {
    let mut backends = vec![Backend::Portable];
    if cfg!(target_os = "linux") {
        backends.push(Backend::Epoll);
    }
    backends
}

/// A listening socket on a free loopback port.
pub fn listener() -> (Socket, u16) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    let address: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&address.into()).unwrap();
    socket.listen(1024).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

/// Starts a server with `config` on a fresh listener; returns it and its port.
pub fn start(config: &Config) -> (Running, u16) {
    let (socket, port) = listener();
    (Running::start(config, vec![socket]).unwrap(), port)
}

/// A blocking client with a read timeout, so a lost reply fails the test.
pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// The next delivery's kind and connection (released at once); fails after 10 s.
pub fn next_delivery(running: &mut Running) -> (DeliveryKind, ConnKey) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(item) = running.take_with(|d| (d.kind, d.conn)) {
            running.release();
            return item;
        }
        assert!(Instant::now() < deadline, "no delivery within 10 s");
        running.wait(Duration::from_millis(10));
    }
}
