//! The engine end to end, without Python: real loopback clients against
//! `core::Running`, on both backends. This test thread plays the Python side.
#![cfg(not(loom))]

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use _rsepoll::close_reason::CloseReason;
use _rsepoll::framing::{Framing, PrefixWidth};
use _rsepoll::message::DeliveryKind;
use _rsepoll::server::{Config, Running};
use _rsepoll::token::ConnKey;
use socket2::{Domain, Socket, Type};

mod common;
mod counting_alloc;
use common::{backends, connect, next_delivery, start};
use counting_alloc::count_this_thread;

/// What the echo driver saw.
#[derive(Default)]
struct Tally {
    opened: usize,
    closed: usize,
    bytes: usize,
    /// The I/O threads the connections went to, and their ids.
    engines: std::collections::HashSet<u16>,
    ids: std::collections::HashSet<u64>,
}

/// Echoes every byte back until `done()`, then stops the server and drains
/// it to `Stopped`. Closes a connection on EOF, as the Python layer does.
fn run_echo(running: &mut Running, mut on_idle: impl FnMut(), done: impl Fn() -> bool) -> Tally {
    let sender = running.sender();
    let mut tally = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stopping = false;
    while !running.has_stopped() {
        assert!(Instant::now() < deadline, "echo run timed out");
        let mut idle = true;
        while let Some((kind, conn, data)) =
            running.take_with(|d| (d.kind, d.conn, d.data().to_vec()))
        {
            idle = false;
            match kind {
                DeliveryKind::Opened => {
                    tally.opened += 1;
                    tally.engines.insert(conn.engine);
                    tally.ids.insert(conn.id);
                }
                DeliveryKind::Closed(_) => tally.closed += 1,
                DeliveryKind::Data => {
                    tally.bytes += data.len();
                    if sender.try_send(conn, &data).is_err() {
                        sender.send(conn, &data).unwrap();
                    }
                }
                DeliveryKind::Eof => {
                    let _ = sender.close(conn);
                }
                DeliveryKind::Error | DeliveryKind::TooLarge | DeliveryKind::Failed => {
                    panic!("unexpected {kind:?}")
                }
                DeliveryKind::WritingPaused
                | DeliveryKind::WritingResumed
                | DeliveryKind::Draining
                | DeliveryKind::Stopped => {}
            }
            if running.taken() >= 32 {
                running.release();
            }
        }
        running.release();
        if !stopping && done() {
            stopping = true;
            running.stop(Duration::from_secs(5));
        }
        if idle {
            on_idle();
            running.wait(Duration::from_millis(10));
        }
    }
    tally
}

#[test]
fn echo_is_byte_exact_for_many_clients_on_every_backend() {
    // 0: the inline engine, turned by this thread in `running.wait`.
    for (backend, io_threads) in backends()
        .into_iter()
        .flat_map(|b| [(b, 1), (b, 3), (b, 0)])
    {
        let config = Config {
            backend,
            io_threads,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let finished = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..16)
            .map(|client| {
                let finished = Arc::clone(&finished);
                thread::spawn(move || {
                    let mut stream = connect(port);
                    let payload: Vec<u8> = (0..300_000u32)
                        .map(|i| (i.wrapping_mul(31) ^ client) as u8)
                        .collect();
                    let writer = {
                        let mut stream = stream.try_clone().unwrap();
                        let payload = payload.clone();
                        thread::spawn(move || {
                            for chunk in payload.chunks(7_777) {
                                stream.write_all(chunk).unwrap();
                            }
                            stream.shutdown(Shutdown::Write).unwrap();
                        })
                    };
                    let mut echoed = Vec::new();
                    stream.read_to_end(&mut echoed).unwrap();
                    writer.join().unwrap();
                    assert!(echoed == payload, "client {client}: echo differs");
                    finished.fetch_add(1, SeqCst);
                })
            })
            .collect();
        let tally = run_echo(&mut running, || {}, || finished.load(SeqCst) == 16);
        for client in clients {
            client.join().unwrap();
        }
        running.join();
        assert_eq!(tally.opened, 16, "{backend:?}");
        assert_eq!(tally.closed, 16, "{backend:?}");
        assert_eq!(tally.bytes, 16 * 300_000, "{backend:?}");
        // Dealt in turn: every I/O thread got some; ids unique across them.
        assert_eq!(tally.engines.len(), io_threads.max(1), "{backend:?}");
        assert_eq!(tally.ids.len(), 16, "{backend:?}");
        let stats = running.sender().stats();
        assert_eq!(stats.counters.connections_accepted, 16, "{backend:?}");
        assert_eq!(stats.counters.bytes_received, 16 * 300_000, "{backend:?}");
    }
}

#[test]
fn bursts_larger_than_a_slot_and_small_messages_in_turn_echo_byte_exact() {
    // After a read that went past its slot, the next read goes straight
    // into a spill buffer; one that brings a small message moves it back
    // into the slot. Each burst and each small message is echoed before
    // the next is sent, so every round crosses both ways.
    const ROUNDS: usize = 40;
    const BURST: usize = 100_000;
    const SMALL: usize = 100;
    for (backend, io_threads) in backends().into_iter().flat_map(|b| [(b, 1), (b, 0)]) {
        let config = Config {
            backend,
            io_threads,
            ..Config::default()
        };
        assert!(BURST > config.slot_size && SMALL < config.slot_size);
        let (mut running, port) = start(&config);
        let finished = Arc::new(AtomicBool::new(false));
        let client = {
            let finished = Arc::clone(&finished);
            thread::spawn(move || {
                let mut stream = connect(port);
                let mut offset = 0;
                for round in 0..ROUNDS {
                    for len in [BURST, SMALL] {
                        let sent: Vec<u8> =
                            (offset..offset + len).map(|i| (i % 251) as u8).collect();
                        stream.write_all(&sent).unwrap();
                        let mut echoed = vec![0; len];
                        stream.read_exact(&mut echoed).unwrap();
                        assert!(echoed == sent, "round {round}: the {len}-byte echo differs");
                        offset += len;
                    }
                }
                stream.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "{} bytes more than were sent", rest.len());
                finished.store(true, SeqCst);
            })
        };
        let tally = run_echo(&mut running, || {}, || finished.load(SeqCst));
        client.join().unwrap();
        running.join();
        assert_eq!(
            tally.bytes,
            ROUNDS * (BURST + SMALL),
            "{backend:?}, {io_threads}"
        );
    }
}

#[test]
fn a_full_delivery_ring_stalls_reading_without_losing_bytes() {
    for (backend, io_threads) in backends().into_iter().flat_map(|b| [(b, 1), (b, 0)]) {
        // Two slots of 256 bytes: the I/O thread stalls on nearly every read
        // (inline, the loop hands over to the consumer just as often), and
        // the echo fills the command ring as often.
        let config = Config {
            backend,
            ring_slots: 2,
            slot_size: 256,
            io_threads,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let done = Arc::new(AtomicBool::new(false));
        let client = {
            let done = Arc::clone(&done);
            thread::spawn(move || {
                let mut stream = connect(port);
                let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
                let writer = {
                    let mut stream = stream.try_clone().unwrap();
                    let payload = payload.clone();
                    thread::spawn(move || {
                        stream.write_all(&payload).unwrap();
                        stream.shutdown(Shutdown::Write).unwrap();
                    })
                };
                let mut echoed = Vec::new();
                stream.read_to_end(&mut echoed).unwrap();
                writer.join().unwrap();
                assert!(echoed == payload, "echo differs");
                done.store(true, SeqCst);
            })
        };
        // A slow consumer: the ring is full most of the time.
        let tally = run_echo(
            &mut running,
            || thread::sleep(Duration::from_micros(200)),
            || done.load(SeqCst),
        );
        client.join().unwrap();
        running.join();
        assert_eq!(
            tally.bytes, 1_000_000,
            "{backend:?}, io_threads={io_threads}"
        );
    }
}

#[test]
fn a_stale_key_never_reaches_the_next_tenant_of_a_slot() {
    for backend in backends() {
        let config = Config {
            backend,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let sender = running.sender();
        let first = connect(port);
        let (kind, old) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        drop(first);
        assert_eq!(next_delivery(&mut running), (DeliveryKind::Eof, old));
        sender.close(old).unwrap();
        assert_eq!(
            next_delivery(&mut running),
            (DeliveryKind::Closed(CloseReason::Peer), old)
        );
        // The old connection may linger a moment; wait until its slot is free.
        thread::sleep(Duration::from_millis(50));
        let mut second = connect(port);
        let (kind, new) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        assert_eq!(new.index, old.index, "the slot is reused");
        assert_ne!(new.id, old.id);
        sender.send(old, b"for the old tenant").unwrap();
        sender.send(new, b"for the new one").unwrap();
        let mut buf = [0u8; 64];
        let n = second.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"for the new one");
        running.join(); // stops the server, discarding deliveries
    }
}

/// The wire form of one request in `framing`, and the payload the echo
/// server sends back (it echoes decoded payloads, unframed).
fn framed_request(framing: Framing, payload: &[u8]) -> Vec<u8> {
    match framing {
        Framing::Raw => payload.to_vec(),
        Framing::Line => [payload, b"\n"].concat(),
        Framing::Length(_) => [&(payload.len() as u32).to_be_bytes()[..], payload].concat(),
    }
}

#[test]
fn the_io_thread_allocates_nothing_per_message_in_steady_state() {
    let cases = [
        (Framing::Raw, 1024, 1),
        (Framing::Line, 1024, 1),
        (Framing::Length(PrefixWidth::Four), 1024, 1),
        // Larger than a slot: assembled in pooled buffers that come back.
        (Framing::Length(PrefixWidth::Four), 40_000, 1),
        // Raw reads that fill a slot go on into a pooled buffer; the reply
        // spans several command slots, gathered into one write.
        (Framing::Raw, 40_000, 1),
        // Every I/O thread is counted.
        (Framing::Raw, 1024, 2),
    ];
    for backend in backends() {
        for (framing, size, io_threads) in cases {
            let config = Config {
                backend,
                framing,
                io_threads,
                on_io_thread_start: Some(count_this_thread),
                ..Config::default()
            };
            allocations_in_steady_state(&config, size);
        }
    }
}

fn allocations_in_steady_state(config: &Config, size: usize) {
    let (mut running, port) = start(config);
    const CLIENTS: usize = 8;
    const WARM_UP: usize = 200;
    const MEASURED: usize = 2_000;
    let warmed = Arc::new(AtomicUsize::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicUsize::new(0));
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let request = framed_request(config.framing, &payload);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (warmed, measuring, finished) =
                (warmed.clone(), measuring.clone(), finished.clone());
            let (request, payload) = (request.clone(), payload.clone());
            thread::spawn(move || {
                let mut stream = connect(port);
                let mut reply = vec![0u8; payload.len()];
                let mut round_trip = |stream: &mut TcpStream| {
                    stream.write_all(&request).unwrap();
                    stream.read_exact(&mut reply).unwrap();
                    assert_eq!(reply, payload);
                };
                for _ in 0..WARM_UP {
                    round_trip(&mut stream);
                }
                warmed.fetch_add(1, SeqCst);
                while !measuring.load(SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                }
                for _ in 0..MEASURED {
                    round_trip(&mut stream);
                }
                finished.fetch_add(1, SeqCst);
                // Stay connected until the server stops: closing is not
                // steady state.
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
        })
        .collect();
    let baseline = Cell::new(None);
    let at_end = Cell::new(None);
    run_echo(
        &mut running,
        || {
            if baseline.get().is_none() && warmed.load(SeqCst) == CLIENTS {
                baseline.set(Some(counting_alloc::allocations()));
                measuring.store(true, SeqCst);
            }
            if at_end.get().is_none() && finished.load(SeqCst) == CLIENTS {
                at_end.set(Some(counting_alloc::allocations()));
            }
        },
        || at_end.get().is_some(),
    );
    for client in clients {
        client.join().unwrap();
    }
    running.join();
    let (baseline, at_end) = (baseline.get().unwrap(), at_end.get().unwrap());
    assert!(baseline > 0, "the counter saw the I/O thread's setup");
    assert_eq!(
        at_end - baseline,
        0,
        "{:?} {:?}, {size}-byte messages: the I/O thread allocated during {} round trips",
        config.backend,
        config.framing,
        CLIENTS * MEASURED
    );
}

#[test]
fn sends_from_many_threads_keep_each_message_whole_and_in_order() {
    // Inline (0), this thread turns the loop while another reads: sends
    // from the other threads wake it, or, finding the ring full, apply
    // the commands themselves.
    for io_threads in [1, 0] {
        let config = Config {
            io_threads,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let client = connect(port);
        let (kind, conn) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        // Each thread sends numbered messages larger than a slot, so each
        // spans several ring slots.
        const THREADS: u8 = 4;
        const MESSAGES: u32 = 50;
        const SIZE: usize = 40_000;
        let senders: Vec<_> = (0..THREADS)
            .map(|thread_id| {
                let sender = running.sender();
                thread::spawn(move || {
                    for seq in 0..MESSAGES {
                        let mut message = vec![thread_id; SIZE];
                        message[1..5].copy_from_slice(&seq.to_be_bytes());
                        sender.send(conn, &message).unwrap();
                    }
                })
            })
            .collect();
        let reader = thread::spawn(move || {
            let mut client = client;
            let mut next_seq: HashMap<u8, u32> = HashMap::new();
            let mut message = vec![0u8; SIZE];
            for _ in 0..THREADS as u32 * MESSAGES {
                client.read_exact(&mut message).unwrap();
                let thread_id = message[0];
                let seq = u32::from_be_bytes(message[1..5].try_into().unwrap());
                assert!(
                    message[5..].iter().all(|&b| b == thread_id),
                    "bytes of two messages interleaved"
                );
                let expected = next_seq.entry(thread_id).or_insert(0);
                assert_eq!(seq, *expected, "thread {thread_id} out of order");
                *expected += 1;
            }
            client
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "io_threads={io_threads}: not all sent"
            );
            while running.take_with(|_| ()).is_some() {}
            running.release();
            running.wait(Duration::from_millis(10));
        }
        let mut client = reader.join().unwrap();
        for sender in senders {
            sender.join().unwrap();
        }
        drop(running); // stops and joins the I/O thread
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

/// TCP stops a read at the urgent mark, so a short read does not mean the
/// socket is drained; the bytes behind the mark must still arrive.
#[test]
fn urgent_data_does_not_strand_the_bytes_behind_it() {
    for backend in backends() {
        for fill_ring_first in [false, true] {
            let config = Config {
                backend,
                ring_slots: 2,
                slot_size: 256,
                ..Config::default()
            };
            let (mut running, port) = start(&config);
            let client = Socket::from(connect(port));
            let mut expected = 0;
            if fill_ring_first {
                // The ring fills, so the next segments queue up in the kernel
                // and are read together.
                client.send(&[b'x'; 600]).unwrap();
                expected += 600;
                thread::sleep(Duration::from_millis(100));
            }
            client.send(b"abc").unwrap();
            client.send_out_of_band(b"!").unwrap();
            client.send(b"def").unwrap();
            expected += 6; // the urgent byte is not delivered in line
            let mut received = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while received < expected && Instant::now() < deadline {
                while let Some(n) = running.take_with(|d| match d.kind {
                    DeliveryKind::Data => d.len,
                    _ => 0,
                }) {
                    received += n;
                }
                running.release();
                running.wait(Duration::from_millis(10));
            }
            assert_eq!(
                received, expected,
                "{backend:?}, ring filled first: {fill_ring_first}"
            );
        }
    }
}

#[test]
fn a_busy_io_thread_does_not_starve_another_ones_connections() {
    for backend in backends() {
        let config = Config {
            backend,
            framing: Framing::Line,
            io_threads: 2,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        // Connections are dealt in turn: the first to one I/O thread, the
        // second to the other.
        let mut busy = connect(port);
        let (kind, busy_key) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        let mut quiet = connect(port);
        let (kind, quiet_key) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        assert_ne!(busy_key.engine, quiet_key.engine, "{backend:?}");
        // One line from the busy connection first, so that the consumer is
        // on the busy thread's ring when the test begins.
        busy.write_all(b"first\n").unwrap();
        assert_eq!(next_delivery(&mut running).1, busy_key);
        // The busy connection fills its thread's ring up to its share (64 of
        // 512 slots) with one-line messages; the quiet one sends one line.
        busy.write_all(&b"busy\n".repeat(500)).unwrap();
        thread::sleep(Duration::from_millis(200));
        quiet.write_all(b"quiet\n").unwrap();
        thread::sleep(Duration::from_millis(200));
        // Taken in turn, at most 32 in a row from one thread while the other
        // has some: the quiet line comes within the first 33, not after the
        // busy thread's 64.
        let mut position = None;
        for taken in 1..=64 {
            let (_, conn) = next_delivery(&mut running);
            if conn == quiet_key {
                position = Some(taken);
                break;
            }
        }
        let position = position.expect("the quiet connection's line was delivered");
        assert!(
            position <= 33,
            "{backend:?}: the quiet line came {position}th"
        );
        running.stop(Duration::from_secs(1));
        drop(busy);
        drop(quiet);
        running.join();
    }
}

/// A client whose receive window is pinned small, so that a large reply
/// waits in the server's queue rather than in the kernels' buffers.
fn connect_small_window(port: u16) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    socket.connect(&address.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Bytes sent per `send` to a client that does not read.
const CHUNK: usize = 64 << 10;

/// The bytes of the test stream from `offset` on: byte `i` is `i % 251`.
fn stream(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// Sends the stream from `offset` on to `conn`, whose client does not read,
/// until `WritingPaused` is delivered for it (nothing else may come first),
/// then a chunk more. Returns the offset after the last byte sent.
fn send_until_paused(running: &mut Running, conn: ConnKey, mut offset: usize) -> usize {
    let sender = running.sender();
    let start = offset;
    loop {
        assert!(offset - start < 64 << 20, "no pause after 64 MiB unread");
        sender.send(conn, &stream(offset, CHUNK)).unwrap();
        offset += CHUNK;
        if let Some(delivery) = running.take_with(|d| (d.kind, d.conn)) {
            running.release();
            assert_eq!(delivery, (DeliveryKind::WritingPaused, conn));
            break;
        }
    }
    // Still above the mark: no second pause.
    sender.send(conn, &stream(offset, CHUNK)).unwrap();
    offset + CHUNK
}

#[test]
fn writing_pauses_above_high_resumes_at_low_and_never_after_closed() {
    for backend in backends() {
        let config = Config {
            backend,
            write_buffer_high: 64 << 10,
            write_buffer_low: 16 << 10,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let mut client = connect_small_window(port);
        let (kind, conn) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        let mut offset = 0;
        for round in 0..2 {
            let end = send_until_paused(&mut running, conn, offset);
            let mut received = vec![0; end - offset];
            client.read_exact(&mut received).unwrap();
            assert!(
                received == stream(offset, end - offset),
                "{backend:?} {round}"
            );
            offset = end;
            let resumed = next_delivery(&mut running);
            assert_eq!(
                resumed,
                (DeliveryKind::WritingResumed, conn),
                "{backend:?} {round}"
            );
        }
        // Paused once more, then the client resets: `Closed`, and no resume
        // after it, although the queue is dropped.
        send_until_paused(&mut running, conn, offset);
        let client = Socket::from(client);
        client.set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let (kind, key) = next_delivery(&mut running);
        assert_eq!(key, conn);
        assert!(
            matches!(kind, DeliveryKind::Closed(_)),
            "{backend:?}: {kind:?}"
        );
        thread::sleep(Duration::from_millis(100));
        assert_eq!(running.take_with(|d| (d.kind, d.conn)), None, "{backend:?}");
        running.join();
    }
}

#[test]
fn flow_deliveries_that_find_the_ring_full_wait_in_order() {
    // Far more than the kernel buffers of a loopback connection hold for a
    // client that does not read: half of it leaves the queue above the high
    // mark, so that both crossings happen.
    const BURST: usize = 16 << 20;
    let burst = stream(0, BURST);
    for backend in backends() {
        // Two delivery slots, which two other connections' `Opened` fill:
        // the crossings find the ring full and wait in the backlog.
        let config = Config {
            backend,
            ring_slots: 2,
            write_buffer_high: 64 << 10,
            write_buffer_low: 0,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let sender = running.sender();
        let mut client = connect_small_window(port);
        let (kind, conn) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        let _others = [connect(port), connect(port)];
        thread::sleep(Duration::from_millis(100));
        let halfway = Arc::new(AtomicBool::new(false));
        let writer = thread::spawn({
            let (burst, halfway) = (burst.clone(), Arc::clone(&halfway));
            move || {
                for (sent, chunk) in burst.chunks(CHUNK).enumerate() {
                    sender.send(conn, chunk).unwrap();
                    if (sent + 1) * CHUNK == BURST / 2 {
                        halfway.store(true, SeqCst);
                    }
                }
            }
        });
        // The client reads nothing until half the burst is sent, so that
        // writing pauses whatever the timing: a client that keeps up with
        // the writer can take a whole burst without the queue ever rising
        // above the mark.
        while !halfway.load(SeqCst) && !writer.is_finished() {
            thread::sleep(Duration::from_millis(1));
        }
        let mut received = vec![0; BURST];
        client.read_exact(&mut received).unwrap();
        writer.join().unwrap();
        assert!(received == burst, "{backend:?}: bytes differ");
        // The queue is empty: every crossing was emitted, none was lost.
        // (How many more pause/resume cycles there were depends on how the
        // client's reads and the writer's sends interleave.)
        let mut deliveries = Vec::new();
        while deliveries.len() < 4 {
            deliveries.push(next_delivery(&mut running));
        }
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(200) {
            match running.take_with(|d| (d.kind, d.conn)) {
                Some(item) => {
                    running.release();
                    deliveries.push(item);
                    quiet_since = Instant::now();
                }
                None => running.wait(Duration::from_millis(10)),
            }
        }
        let opened = deliveries
            .iter()
            .filter(|(kind, key)| *kind == DeliveryKind::Opened && *key != conn)
            .count();
        let flow: Vec<_> = deliveries
            .iter()
            .filter(|(_, key)| *key == conn)
            .map(|(kind, _)| *kind)
            .collect();
        assert_eq!(opened, 2, "{backend:?}: {deliveries:?}");
        assert!(
            !flow.is_empty()
                && flow.chunks(2).all(|pair| pair
                    == [DeliveryKind::WritingPaused, DeliveryKind::WritingResumed]),
            "{backend:?}: {flow:?}"
        );
        running.join();
    }
}
