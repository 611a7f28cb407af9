//! The I/O thread must not spin on a connection it has nothing to do for. Its
//! own test binary: one server at a time, so the one `rsepoll-io` thread of
//! the process is the one measured.
#![cfg(not(loom))]

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use _rsepoll::conn::CloseReason;
use _rsepoll::core::Config;
use _rsepoll::message::DeliveryKind;
use _rsepoll::sys::Backend;
use socket2::Socket;

mod common;
use common::{next_delivery, start};

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

fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
}

#[test]
fn no_spin_on_a_reset_connection_that_wants_nothing() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        // 1. The peer sent EOF, the application has not closed yet, the peer resets.
        let config = Config {
            backend,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (kind, key) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        client.write_all(b"hi").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Data);
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Eof);
        reset(client);
        let ticks = ticks_in_half_a_second();
        assert!(
            ticks <= 5,
            "{backend:?}: EOF then reset: {ticks} ticks in 0.5 s"
        );
        // The reset is noticed without the application sending anything.
        assert_eq!(
            next_delivery(&mut running),
            (DeliveryKind::Closed(CloseReason::Reset), key)
        );
        running.join(); // stops the server, discarding deliveries

        // 2. A connection parked on a full delivery ring, and the peer resets.
        let config = Config {
            backend,
            ring_slots: 2,
            slot_size: 256,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Opened);
        client.write_all(&[1u8; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        reset(client);
        let ticks = ticks_in_half_a_second();
        assert!(
            ticks <= 5,
            "{backend:?}: full ring then reset: {ticks} ticks in 0.5 s"
        );
        running.join(); // stops the server, discarding deliveries
    }
}
