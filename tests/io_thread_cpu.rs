//! The I/O thread must not spin on a connection it has nothing to do for. Its
//! own test binary: one server at a time, so the one `rsepoll-io` thread of
//! the process is the one measured.
#![cfg(not(loom))]

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use _rsepoll::core::{Config, Running};
use _rsepoll::message::{ConnKey, DeliveryKind};
use _rsepoll::sys::Backend;
use socket2::{Domain, Socket, Type};

fn listener() -> (Socket, u16) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let address: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&address.into()).unwrap();
    socket.listen(64).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

/// CPU ticks (user + system) of this process's `rsepoll-io` thread.
fn io_thread_ticks() -> u64 {
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = entry.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim() == "rsepoll-io" {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
                .split_whitespace()
                .collect();
            return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        }
    }
    panic!("no rsepoll-io thread")
}

/// Ticks the I/O thread uses in half a second; a spinning thread uses ~50.
fn ticks_in_half_a_second() -> u64 {
    let before = io_thread_ticks();
    std::thread::sleep(Duration::from_millis(500));
    io_thread_ticks() - before
}

fn next(running: &mut Running) -> (DeliveryKind, ConnKey) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(item) = running.take_with(|d| (d.kind, d.conn)) {
            running.release();
            return item;
        }
        assert!(Instant::now() < deadline, "no delivery");
        running.wait(Duration::from_millis(10));
    }
}

fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
}

fn stop(mut running: Running) {
    running.stop();
    while !running.has_stopped() {
        while running.take_with(|_| ()).is_some() {}
        running.release();
        running.wait(Duration::from_millis(10));
    }
    running.join();
}

#[test]
fn no_spin_on_a_reset_connection_that_wants_nothing() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        // 1. The peer sent EOF, the application has not closed yet, the peer resets.
        let (socket, port) = listener();
        let config = Config {
            backend,
            ..Config::default()
        };
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (kind, key) = next(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        client.write_all(b"hi").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(next(&mut running).0, DeliveryKind::Data);
        assert_eq!(next(&mut running).0, DeliveryKind::Eof);
        reset(client);
        let ticks = ticks_in_half_a_second();
        assert!(
            ticks <= 5,
            "{backend:?}: EOF then reset: {ticks} ticks in 0.5 s"
        );
        running.sender().close(key).unwrap();
        assert_eq!(next(&mut running), (DeliveryKind::Closed, key));
        stop(running);

        // 2. A connection parked on a full delivery ring, and the peer resets.
        let (socket, port) = listener();
        let config = Config {
            backend,
            ring_slots: 2,
            slot_size: 256,
            ..Config::default()
        };
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(next(&mut running).0, DeliveryKind::Opened);
        client.write_all(&[1u8; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        reset(client);
        let ticks = ticks_in_half_a_second();
        assert!(
            ticks <= 5,
            "{backend:?}: full ring then reset: {ticks} ticks in 0.5 s"
        );
        stop(running);
    }
}
