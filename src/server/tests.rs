//! The failure paths and the hand-over, driven through [`Running`] with real
//! loopback sockets.

use std::sync::atomic::Ordering::{Acquire, Release};
use std::time::Duration;

use socket2::Socket;

use super::*;
use crate::framing::Framing;
use crate::message::{CommandKind, DeliveryKind};
use crate::sys::Backend;
use crate::token::ConnKey;
use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

fn listener() -> (Socket, u16) {
    let socket = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let address: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&address.into()).unwrap();
    socket.listen(16).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    (socket, port)
}

/// A server on a fresh listener with one client connected and accepted:
/// the server, the client (reads time out after 10 s) and its key.
fn start_with_client(config: &Config) -> (Running, TcpStream, ConnKey) {
    let (socket, port) = listener();
    let mut running = Running::start(config, vec![socket]).unwrap();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let key = loop {
        assert!(Instant::now() < deadline, "connection not accepted");
        match running.take_with(|d| (d.kind, d.conn)) {
            Some((DeliveryKind::Opened, key)) => break key,
            _ => running.wait(Duration::from_millis(10)),
        }
    };
    running.release();
    (running, client, key)
}

/// Takes deliveries until `Stopped`, returning their kinds in order.
fn drain_to_stopped(running: &mut Running) -> Vec<DeliveryKind> {
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.has_stopped() {
        assert!(Instant::now() < deadline, "no Stopped delivery");
        while let Some(kind) = running.take_with(|d| d.kind) {
            kinds.push(kind);
        }
        running.release();
        running.wait(Duration::from_millis(10));
    }
    kinds
}

/// Counts the `Opened` deliveries engine 0 makes, up to `expected` or for at
/// most 2 s. Engine 0's deliveries only: taking the other engine's `Failed`
/// would stop the server.
fn opened_on_engine_0(running: &mut Running, expected: usize) -> usize {
    let mut opened = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && opened < expected {
        match running.engines[0].deliveries.take_with(|d| d.kind) {
            Some(DeliveryKind::Opened) => opened += 1,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    running.engines[0].deliveries.release();
    opened
}

#[test]
fn a_panic_on_the_io_thread_is_reported_and_closes_everything() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        let config = Config {
            backend,
            ..Config::default()
        };
        // The connection is accepted before the thread breaks.
        let (mut running, mut client, _) = start_with_client(&config);
        running.sender().inject_panic(0);
        let kinds = drain_to_stopped(&mut running);
        assert_eq!(
            kinds,
            vec![
                DeliveryKind::Failed,
                DeliveryKind::Closed(crate::close_reason::CloseReason::Shutdown),
                DeliveryKind::Stopped
            ],
            "{backend:?}"
        );
        // The client sees the connection end, and senders give up at once.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert_eq!(
            running.sender().send(ConnKey::default(), b"late"),
            Err(SendError::Stopped)
        );
        running.join();
    }
}

/// A connection the accepting engine deals to an engine whose
/// loop has ended (here it failed, and the consumer has not taken
/// `Failed` yet, as while a long callback runs) must not be parked where
/// nobody serves or closes it: it is served by a live engine instead.
#[test]
fn a_connection_dealt_to_a_finished_engine_is_served_by_a_live_one() {
    use std::sync::atomic::Ordering::Relaxed;
    let (socket, port) = listener();
    let config = Config {
        io_threads: 2,
        ..Config::default()
    };
    let mut running = Running::start(&config, vec![socket]).unwrap();
    let sender = running.sender();
    sender.inject_panic(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sender.engines[1].finished.load(Acquire) {
        assert!(Instant::now() < deadline, "engine 1 did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Dealt in turn: the first to engine 0, the second to engine 1.
    let _served = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut stranded = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let opened_on_0 = opened_on_engine_0(&mut running, 2);
    stranded
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let outcome = stranded.read(&mut byte);
    let open = sender.hub().open.load(Relaxed);
    // Set by every hand-over, cleared only by the engine taking them.
    let parked = sender.engines[1].arrivals.may_have_arrivals();
    running.join();
    assert!(
        !parked && opened_on_0 == 2 && open == 2,
        "a socket parked in engine 1: {parked}; opened by engine 0: {opened_on_0} (2 expected); \
         hub.open = {open}; the second client's read: {outcome:?}"
    );
    // Once engine 1 is gone for good, nothing is counted for it.
    drop(running);
    assert_eq!(sender.hub().open.load(Relaxed), 0);
}

/// Takes deliveries until `opened` more `Opened` and `closed` more
/// `Closed` were seen; returns the keys opened.
fn take_until(running: &mut Running, opened: usize, closed: usize) -> Vec<ConnKey> {
    let (mut keys, mut closes) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys.len() < opened || closes < closed {
        assert!(
            Instant::now() < deadline,
            "{} of {opened} opened, {closes} of {closed} closed",
            keys.len()
        );
        match running.take_with(|d| (d.kind, d.conn)) {
            Some((DeliveryKind::Opened, key)) => keys.push(key),
            Some((DeliveryKind::Closed(_), _)) => closes += 1,
            Some(_) => {}
            None => running.wait(Duration::from_millis(10)),
        }
        running.release();
    }
    keys
}

/// Issue 13, item 5: with a long idle timeout, every connection leaves an
/// entry in the timer heap when it closes. The heap must follow the
/// connections that are open, not every connection there ever was.
#[test]
fn the_timer_heap_is_bounded_by_open_connections_under_churn() {
    const CHURN: usize = 2000;
    const AT_ONCE: usize = 10;
    for (backend, io_threads) in [
        (Backend::Portable, 1),
        (Backend::platform_default(), 1),
        (Backend::platform_default(), 2),
    ] {
        let config = Config {
            backend,
            io_threads,
            idle_timeout: Some(Duration::from_secs(3600)),
            ..Config::default()
        };
        let (socket, port) = listener();
        let mut running = Running::start(&config, vec![socket]).unwrap();
        for _ in 0..CHURN / AT_ONCE {
            let clients: Vec<TcpStream> = (0..AT_ONCE)
                .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
                .collect();
            take_until(&mut running, AT_ONCE, 0);
            for client in clients {
                // A reset: the server closes it at once.
                socket2::SockRef::from(&client)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            take_until(&mut running, 0, AT_ONCE);
        }
        // One connection more: each engine's count is as of a turn in
        // which the closes above had all happened.
        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        take_until(&mut running, 1, 0);
        let sender = running.sender();
        let entries: usize = sender
            .engines
            .iter()
            .map(|e| e.timer_entries.load(Relaxed))
            .sum();
        running.stop(Duration::from_secs(1));
        drain_to_stopped(&mut running);
        running.join();
        // Per engine: at most twice the live entries (one per open
        // connection here) plus the slack the heap allows itself.
        let bound = io_threads * (2 * 3 + crate::timer::COMPACT_SLACK);
        assert!(
            entries <= bound,
            "{backend:?}, io_threads={io_threads}: {entries} timer entries \
             after {CHURN} connections came and went (1 open; at most {bound} expected)"
        );
    }
}

/// Issue 13, item 7: connections dealt to an engine that fails before it
/// has opened them (parked in its hand-over list while it is busy) are
/// served by a live engine, not closed by the failing one.
#[test]
fn connections_parked_in_an_engine_that_fails_are_served_by_a_live_one() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        let (socket, port) = listener();
        let config = Config {
            backend,
            io_threads: 2,
            ..Config::default()
        };
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let sender = running.sender();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Engine 1 is busy in a command, with a panic queued behind it.
        sender.inject(1, CommandKind::Hold);
        while sender.engines[1].test_hold.load(Acquire) != 1 {
            assert!(Instant::now() < deadline, "engine 1 did not hold");
            std::thread::sleep(Duration::from_millis(1));
        }
        sender.inject_panic(1);
        // Dealt in turn: the first to engine 0, the second to engine 1,
        // where it waits in the hand-over list.
        let _served = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut parked = TcpStream::connect(("127.0.0.1", port)).unwrap();
        while !sender.engines[1].arrivals.may_have_arrivals() {
            assert!(Instant::now() < deadline, "nothing handed to engine 1");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Engine 1 goes on to the panic, and fails.
        sender.engines[1].test_hold.store(0, Release);
        while !sender.engines[1].finished.load(Acquire) {
            assert!(Instant::now() < deadline, "engine 1 did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        let opened_on_0 = opened_on_engine_0(&mut running, 2);
        parked
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let outcome = parked.read(&mut [0u8; 1]);
        let open = sender.hub().open.load(Relaxed);
        running.join();
        assert!(
            opened_on_0 == 2 && open == 2,
            "{backend:?}: opened by engine 0: {opened_on_0} (2 expected); hub.open = \
             {open}; the parked client's read: {outcome:?} (a timeout expected)"
        );
        assert!(outcome.is_err(), "{backend:?}: {outcome:?}");
    }
}

#[test]
fn lent_bytes_go_out_whole_with_their_envelope_and_come_back() {
    use crate::framing::{envelope, PrefixWidth};
    // Larger than the socket takes at once: the rest is copied into the
    // connection's queue, and the loan returns before it is all written.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for backend in [Backend::Portable, Backend::platform_default()] {
        for framing in [
            Framing::Raw,
            Framing::Line,
            Framing::Length(PrefixWidth::Four),
        ] {
            let config = Config {
                backend,
                ..Config::default()
            };
            let (mut running, mut client, key) = start_with_client(&config);
            let payload = if framing == Framing::Line {
                &payload[..payload.len() / 2]
                    .iter()
                    .map(|b| b | 0x80)
                    .collect::<Vec<u8>>()
            } else {
                &payload
            };
            let envelope = envelope(framing, payload.len()).unwrap();
            let framed = (framing != Framing::Raw).then_some(&envelope);
            let sender = running.sender();
            // SAFETY: `payload` outlives the server, which is joined below.
            let ticket = unsafe { sender.lend(key, framed, payload, None, true) }.unwrap();
            let mut wire = vec![0; envelope.overhead() + payload.len()];
            client.read_exact(&mut wire).unwrap();
            let expected = [envelope.header(), payload, envelope.trailer()].concat();
            assert!(wire == expected, "{backend:?} {framing:?}: bytes differ");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sender.has_returned(ticket) {
                assert!(Instant::now() < deadline, "the loan never came back");
                std::thread::sleep(Duration::from_millis(1));
            }
            running.stop(Duration::from_secs(1));
            drain_to_stopped(&mut running);
            running.join();
        }
    }
}
