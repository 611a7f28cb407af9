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
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
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

/// Each backend with one I/O thread and inline (`io_threads` 1 and 0).
fn threaded_and_inline() -> impl Iterator<Item = (Backend, usize)> {
    [Backend::Portable, Backend::platform_default()]
        .into_iter()
        .flat_map(|backend| [(backend, 1), (backend, 0)])
}

#[test]
fn a_panic_on_the_io_thread_is_reported_and_closes_everything() {
    // Inline (0), the panic is caught in the turn, on the consumer's thread.
    for (backend, io_threads) in threaded_and_inline() {
        let config = Config {
            backend,
            io_threads,
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
            "{backend:?}, io_threads={io_threads}"
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

/// Inline, a panic while the consumer applies the commands between two
/// callbacks (`Running::apply_commands`) is reported as a turn's is.
#[test]
fn a_panic_applying_commands_between_turns_is_reported() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        let config = Config {
            backend,
            io_threads: 0,
            ..Config::default()
        };
        let (mut running, mut client, _) = start_with_client(&config);
        running.sender().inject_panic(0);
        running.apply_commands();
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
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        running.join();
    }
}

/// An engine whose loop panics, and whose report of it panics too, ends
/// without `Stopped`: the consumer notices (`io_thread_vanished`), and
/// dropping the server returns, inline too, where no thread exits to say so.
#[test]
fn an_engine_that_ends_without_stopped_is_noticed_and_dropped() {
    for io_threads in [1, 0] {
        let config = Config {
            io_threads,
            ..Config::default()
        };
        let (mut running, _client, _) = start_with_client(&config);
        running.engines[0]
            .shared
            .test_fail_panics
            .store(true, Release);
        running.sender().inject_panic(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !running.io_thread_vanished() {
            assert!(
                Instant::now() < deadline,
                "io_threads={io_threads}: not noticed"
            );
            while running.take_with(|_| ()).is_some() {}
            running.release();
            running.wait(Duration::from_millis(10));
        }
        assert!(!running.has_stopped());
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            running.join();
            drop(running);
            let _ = done.send(());
        });
        assert!(
            dropped.recv_timeout(Duration::from_secs(10)).is_ok(),
            "io_threads={io_threads}: dropping the server hung"
        );
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

/// Takes deliveries until `Data` arrives, and answers it with `reply`;
/// returns the key it came from. Fails after 10 s.
fn answer(running: &mut Running, reply: &[u8]) -> ConnKey {
    let deadline = Instant::now() + Duration::from_secs(10);
    let key = loop {
        assert!(Instant::now() < deadline, "no data");
        match running.take_with(|d| (d.kind, d.conn)) {
            Some((DeliveryKind::Data, from)) => break from,
            Some(_) => {}
            None => running.wait(Duration::from_millis(10)),
        }
        running.release();
    };
    running.release();
    running.sender().send(key, reply).unwrap();
    key
}

/// Waits until the accepting engine has closed its listeners.
fn until_accepting_ended(sender: &Sender) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sender.hub().accepting_ended.load(Acquire) {
        assert!(Instant::now() < deadline, "the listeners stayed open");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Issue 14, item 6: a stop that keeps the connections closes the
/// listeners at once, serves the open connections as usual (input in,
/// replies out) on every engine, and ends when the last one is closed, long
/// before its deadline.
#[test]
fn a_stop_that_keeps_the_connections_serves_them_until_they_close() {
    for (backend, io_threads) in [
        (Backend::Portable, 1),
        (Backend::platform_default(), 1),
        (Backend::platform_default(), 2),
    ] {
        let config = Config {
            backend,
            io_threads,
            ..Config::default()
        };
        let (socket, port) = listener();
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let sender = running.sender();
        let mut clients: Vec<TcpStream> = (0..2 * io_threads)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let keys = take_until(&mut running, clients.len(), 0);
        let began = Instant::now();
        running.stop_accepting(Duration::from_secs(60));
        until_accepting_ended(&sender);
        let refused = TcpStream::connect(("127.0.0.1", port));
        assert!(refused.is_err(), "{backend:?}: a new client was accepted");
        for client in &mut clients {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            client.write_all(b"ping").unwrap();
            answer(&mut running, b"pong");
            let mut reply = [0; 4];
            client.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"pong", "{backend:?}");
        }
        assert!(!running.has_stopped());
        for &key in &keys {
            sender.close(key).unwrap();
        }
        let kinds = drain_to_stopped(&mut running);
        let closed = kinds
            .iter()
            .filter(|&&k| k == DeliveryKind::Closed(crate::close_reason::CloseReason::Local))
            .count();
        assert_eq!(closed, keys.len(), "{backend:?}: {kinds:?}");
        assert!(!kinds.contains(&DeliveryKind::Draining), "{backend:?}");
        assert!(began.elapsed() < Duration::from_secs(10), "{backend:?}");
        for client in &mut clients {
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{backend:?}");
        }
        running.join();
        assert_eq!(sender.hub().open.load(Relaxed), 0, "{backend:?}");
    }
}

/// A drain asked for while a stop keeps the connections closes them as a
/// drain does (`Draining`, then `Closed(Shutdown)` once their output is
/// out), by the earlier deadline: here the drain's.
#[test]
fn a_drain_asked_for_during_a_kept_stop_closes_the_connections() {
    for io_threads in [1, 2] {
        let config = Config {
            io_threads,
            ..Config::default()
        };
        let (socket, port) = listener();
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let mut clients: Vec<TcpStream> = (0..2 * io_threads)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let keys = take_until(&mut running, clients.len(), 0);
        running.stop_accepting(Duration::from_secs(60));
        until_accepting_ended(&running.sender());
        running.stop(Duration::from_secs(30));
        let began = Instant::now();
        let kinds = drain_to_stopped(&mut running);
        let draining = kinds
            .iter()
            .filter(|&&k| k == DeliveryKind::Draining)
            .count();
        let closed = kinds
            .iter()
            .filter(|&&k| k == DeliveryKind::Closed(crate::close_reason::CloseReason::Shutdown))
            .count();
        assert_eq!((draining, closed), (io_threads, keys.len()), "{kinds:?}");
        assert!(began.elapsed() < Duration::from_secs(5));
        for client in &mut clients {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
        }
        running.join();
    }
}

/// A stop that stops reading holds the connections open, announcing
/// nothing, until the drain is asked for: what a consumer needs to tell its
/// application of the stop before any connection closes for it.
#[test]
fn a_stop_that_stops_reading_waits_for_the_drain_to_close() {
    for io_threads in [1, 2] {
        let config = Config {
            io_threads,
            ..Config::default()
        };
        let (socket, port) = listener();
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let sender = running.sender();
        let _clients: Vec<TcpStream> = (0..2 * io_threads)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let keys = take_until(&mut running, 2 * io_threads, 0);
        sender.stop_reading(Duration::from_secs(60));
        until_accepting_ended(&sender);
        let quiet_until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < quiet_until {
            if let Some(kind) = running.take_with(|d| d.kind) {
                panic!("{kind:?} before the drain was asked for");
            }
            running.wait(Duration::from_millis(10));
        }
        running.stop(Duration::from_secs(60));
        let kinds = drain_to_stopped(&mut running);
        let closed = kinds
            .iter()
            .filter(|&&k| k == DeliveryKind::Closed(crate::close_reason::CloseReason::Shutdown))
            .count();
        assert_eq!(closed, keys.len(), "{kinds:?}");
        running.join();
    }
}

/// Holds I/O thread `engine` inside a command until [`let_go`].
fn hold(sender: &Sender, engine: usize) {
    sender.inject(engine, CommandKind::Hold);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sender.engines[engine].test_hold.load(Acquire) != 1 {
        assert!(Instant::now() < deadline, "engine {engine} did not hold");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn let_go(sender: &Sender, engine: usize) {
    sender.engines[engine].test_hold.store(0, Release);
}

/// Lets every engine go when dropped: a test that fails while one is held
/// then ends, instead of hanging in [`Running`]'s drop. Declare it after the
/// `Running`, so that it is dropped first.
struct LetGoOnDrop(Sender);

impl Drop for LetGoOnDrop {
    fn drop(&mut self) {
        for engine in 0..self.0.engines.len() {
            let_go(&self.0, engine);
        }
    }
}

/// A connection the accepting engine deals out after a stop that keeps the
/// connections was asked for (it accepts until it sees the stop), and that
/// reaches its engine after that one has begun the stop, is opened and
/// served like the others: not closed unheard of, nor left parked. An
/// engine with nothing open does not end its stop while the accepting one
/// may still deal it connections.
#[test]
fn a_connection_handed_over_during_a_kept_stop_is_served() {
    for backend in [Backend::Portable, Backend::platform_default()] {
        let (socket, port) = listener();
        let config = Config {
            backend,
            io_threads: 2,
            ..Config::default()
        };
        let mut running = Running::start(&config, vec![socket]).unwrap();
        let sender = running.sender();
        let _let_go = LetGoOnDrop(running.sender());
        // The accepting engine is busy in a command: the clients wait in the
        // kernel's queue.
        hold(&sender, 0);
        let _first = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
        running.stop_accepting(Duration::from_secs(60));
        // Time for engine 1, which has nothing open, to see the stop.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !sender.engines[1].finished.load(Acquire),
            "{backend:?}: engine 1 ended while engine 0 could still deal to it"
        );
        // Engine 1 has begun the stop (the turn that applies this command
        // began after the stop's wake-up), and is busy in turn.
        hold(&sender, 1);
        // Engine 0 accepts both in the turn it was held in, dealing the
        // second to engine 1, then sees the stop.
        let_go(&sender, 0);
        until_accepting_ended(&sender);
        assert!(
            sender.engines[1].arrivals.may_have_arrivals(),
            "{backend:?}: nothing handed to engine 1"
        );
        let_go(&sender, 1);
        let keys = take_until(&mut running, 2, 0);
        let key = *keys
            .iter()
            .find(|k| k.engine == 1)
            .expect("opened on engine 1");
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        second.write_all(b"ping").unwrap();
        assert_eq!(answer(&mut running, b"pong"), key, "{backend:?}");
        let mut reply = [0; 4];
        second.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"pong", "{backend:?}");
        for key in keys {
            sender.close(key).unwrap();
        }
        drain_to_stopped(&mut running);
        running.join();
        assert_eq!(sender.hub().open.load(Relaxed), 0, "{backend:?}");
    }
}

/// Storage for blanks that counts how many of its kind were dropped.
struct Counted(Vec<u8>, Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_add(1, Relaxed);
    }
}

/// A blank over `storage`'s vector, which it owns.
fn counted_blank(mut storage: Counted) -> crate::blank::Blank {
    let room = std::ptr::NonNull::new(storage.0.as_mut_ptr()).unwrap();
    let capacity = storage.0.len();
    // SAFETY: the vector's buffer stays where it is when the vector moves
    // into the box, lives as long as the box, and nothing reads or writes it
    // until the test takes the box back (`into_owner`).
    unsafe { crate::blank::Blank::new(room, capacity, Box::new(storage)) }
}

#[test]
fn large_raw_reads_go_into_the_consumers_blanks_and_lose_nothing() {
    // A consumer that lends storage (src/blank.rs) gets large reads in it,
    // and every byte in order, whether a read went into a blank, a spill
    // buffer or a slot. What it leaves in a slot goes back to the stock
    // when the slot is reused: without that, the four blanks, half of each
    // one's uses left behind, would serve eight reads at most.
    let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for (backend, io_threads) in threaded_and_inline() {
        let config = Config {
            backend,
            io_threads,
            ring_slots: 16,
            ..Config::default()
        };
        let (mut running, client, _) = start_with_client(&config);
        let stock = Arc::clone(&running.engines[0].shared.blanks);
        let dropped = Arc::new(AtomicUsize::new(0));
        stock.give_all(
            (0..4).map(|_| counted_blank(Counted(vec![0; 128 << 10], Arc::clone(&dropped)))),
        );
        let writer = {
            let payload = payload.clone();
            let mut client = client.try_clone().unwrap();
            std::thread::spawn(move || client.write_all(&payload).unwrap())
        };
        let mut received = Vec::with_capacity(payload.len());
        let mut in_blanks = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while received.len() < payload.len() {
            assert!(
                Instant::now() < deadline,
                "{backend:?}, {io_threads}: stalled"
            );
            while let Some(()) = running.take_with_mut(|d| {
                assert_eq!(d.kind, DeliveryKind::Data);
                received.extend_from_slice(d.data());
                if d.has_blank() {
                    in_blanks += 1;
                    if in_blanks % 2 == 0 {
                        let blank = d.take_blank().unwrap();
                        assert!(blank.filled() == &received[received.len() - blank.len()..]);
                        assert!(d.data().is_empty(), "the payload went with the blank");
                        let storage = blank.into_owner().downcast::<Counted>().unwrap();
                        stock.give_all([counted_blank(*storage)]);
                    }
                }
            }) {}
            running.release();
            running.wait(Duration::from_millis(10));
        }
        writer.join().unwrap();
        assert!(
            received == payload,
            "{backend:?}, {io_threads}: bytes differ"
        );
        assert!(
            in_blanks > 8,
            "{backend:?}, {io_threads}: {in_blanks} reads into blanks"
        );
        client.shutdown(std::net::Shutdown::Both).unwrap();
        running.stop(Duration::from_secs(5));
        drain_to_stopped(&mut running);
        running.join();
        // Every blank is in the stock or in a slot: none was dropped before,
        // and all four are now.
        assert_eq!(dropped.load(Relaxed), 0, "{backend:?}, {io_threads}");
        drop(stock.take_all());
        drop(running);
        assert_eq!(dropped.load(Relaxed), 4, "{backend:?}, {io_threads}");
    }
}
