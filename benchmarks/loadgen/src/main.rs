//! A closed-loop TCP echo load generator, like vmbench's echo client.
//!
//! Each of `--connections` connections sends `--size` bytes, reads exactly
//! `--size` bytes back, checks them, and sends the next message: one message
//! in flight per connection. `--threads` threads share the connections, each
//! driving its share with one poller (non-blocking sockets, level-triggered).
//!
//! Timeline: connect everything, run `--warmup` seconds unmeasured, then count
//! the responses completed during the next `--duration` seconds. stdout gets
//! `measure-start` and `measure-end` lines at the window's edges (so a caller
//! can sample the server's CPU time there) and finally one `result {json}`
//! line. Problems go to stderr as `error: ...` lines and are counted.
//!
//! `--framing` makes each request one well-formed message of exactly `--size`
//! bytes on the wire, so that an echo server that answers each message with
//! `send_message(conn, data)` sends back the very same bytes:
//!
//! - `raw` (the default): the whole request is payload.
//! - `line`: `size - 1` payload bytes, none of them `\n` or `\r` (the
//!   sequence stamps included), then `\n`.
//! - `length`: a 4-byte big-endian length holding `size - 4`, then the
//!   payload.
//!
//! The sequence stamps go in the first and last 8 bytes of the payload.
//!
//! `--mode stream` is another client altogether, shaped like the C stream
//! client of issue 15: every connection is registered for reading and
//! writing, level-triggered; on each writable event it makes one `write` of
//! `--size` bytes (what the socket takes of them), on each readable event
//! one `read` of up to 256 KiB. What a connection writes is one endless
//! pattern (it repeats every [`STREAM_PERIOD`] bytes, a prime, so that no
//! lost, repeated or stale block of a power-of-two size lines up with
//! itself), and every read is compared with it where the echo has got to: a
//! server that changes, reorders, drops or adds bytes in its echo fails the
//! connection (one that stops echoing shows only as a lower rate). Its
//! `result` line gives the bytes written and read during the window
//! (`mb_per_s_out`, `mb_per_s_in`, 10^6 bytes per second).
//!
//! `--rate R` paces stream mode: the connections together write at most `R`
//! MB/s (10^6 bytes per second), each an equal share, from a credit that
//! refills at its share's pace and holds at most [`RATE_BURST_WRITES`]
//! writes' worth (so a connection that fell behind does not catch up in one
//! burst). A connection out of credit stops asking to write until it has
//! some again. Below every server's capacity, this makes the server's CPU
//! per byte comparable at one offered load, without the deep queues and
//! the swings of a saturated run.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use polling::{Event, Events, PollMode, Poller};

/// Every this many responses per connection, compare the whole body. (The
/// sequence number stamped in the first and last 8 bytes of a request's
/// payload, and the framing bytes, are compared on every response.)
const FULL_CHECK_EVERY: u64 = 32;
/// A request still unanswered this long at the end counts as stalled.
const STALL: Duration = Duration::from_secs(1);
/// Print at most this many error lines (all are counted).
const MAX_ERROR_LINES: usize = 10;

static ERROR_LINES: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Raw,
    Line,
    Length,
}

impl Framing {
    /// The payload's range in a request of `size` bytes.
    fn payload(self, size: usize) -> std::ops::Range<usize> {
        match self {
            Framing::Raw => 0..size,
            Framing::Line => 0..size - 1,
            Framing::Length => 4..size,
        }
    }

    /// The sequence stamp for `seq`. In line framing every byte has its high
    /// bit set (7 bits of `seq` each), so no stamp contains `\n` or `\r`.
    fn stamp(self, seq: u64) -> [u8; 8] {
        match self {
            Framing::Line => std::array::from_fn(|i| 0x80 | ((seq >> (7 * i)) & 0x7f) as u8),
            Framing::Raw | Framing::Length => seq.to_le_bytes(),
        }
    }
}

/// The most a stream-mode `read` asks for.
const STREAM_READ: usize = 256 << 10;
/// The period of the byte pattern a stream-mode connection sends: a prime.
const STREAM_PERIOD: usize = 65_521;
/// Under `--rate`, the most credit a connection holds, in writes of `--size`.
const RATE_BURST_WRITES: f64 = 2.0;
/// Under `--rate`, how often a connection out of credit is looked at again.
const RATE_TICK: Duration = Duration::from_millis(1);

struct Config {
    addr: SocketAddr,
    stream: bool,
    connections: usize,
    size: usize,
    framing: Framing,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    /// Stream mode: the most the connections write together, in bytes per
    /// second.
    rate: Option<f64>,
}

/// What one thread measured inside the window.
#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    errors: usize,
    stalled: usize,
    full_checks: u64,
}

struct Conn {
    id: usize,
    stream: TcpStream,
    request: Vec<u8>,
    framing: Framing,
    /// The payload's range in `request` (where the stamps go).
    payload: std::ops::Range<usize>,
    /// Room for the response plus slack, so that extra bytes are noticed.
    response: Vec<u8>,
    written: usize,
    received: usize,
    seq: u64,
    sent_at: Instant,
    wants_write: bool,
    alive: bool,
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("echo-loadgen: {message}");
            eprintln!(
                "usage: echo-loadgen --port P [--host 127.0.0.1] [--mode rr|stream] \
                 [--connections 100] [--size 1024] [--framing raw|line|length] [--threads 1] \
                 [--warmup 1] [--duration 5] [--rate MB/s (stream)]"
            );
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("echo-loadgen: {error}");
            ExitCode::from(1)
        }
    }
}

fn run(config: &Config) -> io::Result<bool> {
    if config.stream {
        return run_stream(config);
    }
    let mut groups: Vec<Vec<Conn>> = (0..config.threads).map(|_| Vec::new()).collect();
    for id in 0..config.connections {
        let stream = connect(config.addr)?;
        groups[id % config.threads].push(Conn::new(id, stream, config.size, config.framing));
    }
    let start = Instant::now() + config.warmup;
    let end = start + config.duration;
    let tallies = std::thread::scope(|scope| {
        let workers: Vec<_> = groups
            .into_iter()
            .map(|conns| scope.spawn(move || drive(conns, start, end)))
            .collect();
        sleep_until(start);
        println!("measure-start");
        sleep_until(end);
        println!("measure-end");
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a worker thread panicked"))
            .collect::<io::Result<Vec<Tally>>>()
    })?;

    let mut latencies: Vec<u64> = Vec::new();
    let (mut errors, mut stalled, mut full_checks) = (0, 0, 0);
    for tally in tallies {
        latencies.extend_from_slice(&tally.latencies_ns);
        errors += tally.errors;
        stalled += tally.stalled;
        full_checks += tally.full_checks;
    }
    latencies.sort_unstable();
    let requests = latencies.len();
    let seconds = config.duration.as_secs_f64();
    let mean_us = if requests == 0 {
        0.0
    } else {
        latencies.iter().map(|&ns| ns as f64).sum::<f64>() / requests as f64 / 1e3
    };
    let pct = |p: f64| -> f64 {
        if requests == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * requests as f64).ceil() as usize;
        latencies[rank.clamp(1, requests) - 1] as f64 / 1e3
    };
    println!(
        "result {{\"requests\": {requests}, \"seconds\": {seconds}, \"size\": {size}, \
         \"framing\": \"{framing}\", \"connections\": {conns}, \"threads\": {threads}, \
         \"mean_us\": {mean_us:.3}, \
         \"p50_us\": {p50:.3}, \"p99_us\": {p99:.3}, \"p999_us\": {p999:.3}, \
         \"max_us\": {max:.3}, \"errors\": {errors}, \"stalled\": {stalled}, \
         \"full_checks\": {full_checks}}}",
        size = config.size,
        framing = match config.framing {
            Framing::Raw => "raw",
            Framing::Line => "line",
            Framing::Length => "length",
        },
        conns = config.connections,
        threads = config.threads,
        p50 = pct(50.0),
        p99 = pct(99.0),
        p999 = pct(99.9),
        max = pct(100.0),
    );
    Ok(errors == 0 && stalled == 0)
}

/// Stream mode: see the module docs.
fn run_stream(config: &Config) -> io::Result<bool> {
    let mut groups: Vec<Vec<TcpStream>> = (0..config.threads).map(|_| Vec::new()).collect();
    for id in 0..config.connections {
        groups[id % config.threads].push(connect(config.addr)?);
    }
    let start = Instant::now() + config.warmup;
    let end = start + config.duration;
    let size = config.size;
    let pace = config.rate.map(|rate| rate / config.connections as f64);
    let tallies = std::thread::scope(|scope| {
        let workers: Vec<_> = groups
            .into_iter()
            .map(|streams| scope.spawn(move || drive_stream(streams, size, pace, start, end)))
            .collect();
        sleep_until(start);
        println!("measure-start");
        sleep_until(end);
        println!("measure-end");
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a worker thread panicked"))
            .collect::<io::Result<Vec<(u64, u64, usize)>>>()
    })?;
    let (mut bytes_out, mut bytes_in, mut errors) = (0, 0, 0);
    for (out, inn, errs) in tallies {
        bytes_out += out;
        bytes_in += inn;
        errors += errs;
    }
    let seconds = config.duration.as_secs_f64();
    println!(
        "result {{\"mode\": \"stream\", \"seconds\": {seconds}, \"size\": {size}, \
         \"connections\": {conns}, \"threads\": {threads}, \"bytes_out\": {bytes_out}, \
         \"bytes_in\": {bytes_in}, \"mb_per_s_out\": {out:.3}, \"mb_per_s_in\": {inn:.3}, \
         \"rate_mb_per_s\": {rate}, \"errors\": {errors}, \"stalled\": 0}}",
        conns = config.connections,
        threads = config.threads,
        rate = config
            .rate
            .map_or("null".to_string(), |rate| format!("{:.3}", rate / 1e6)),
        out = bytes_out as f64 / seconds / 1e6,
        inn = bytes_in as f64 / seconds / 1e6,
    );
    Ok(errors == 0)
}

/// Drives `streams` in stream mode until `end`, each writing at most `pace`
/// bytes per second if given; returns the bytes written and read in
/// `[start, end)`, and the connections that failed.
fn drive_stream(
    mut streams: Vec<TcpStream>,
    size: usize,
    pace: Option<f64>,
    start: Instant,
    end: Instant,
) -> io::Result<(u64, u64, usize)> {
    let poller = Poller::new()?;
    for (key, stream) in streams.iter().enumerate() {
        // SAFETY: a stream must leave the poller before it is closed: failed
        // ones are deleted at once, the others at the end; on an early return
        // the poller (a local) is dropped before `streams` (a parameter).
        unsafe { poller.add_with_mode(stream, Event::all(key), PollMode::Level)? };
    }
    // Byte `i` of a connection's stream is `pattern[i % STREAM_PERIOD]`; the
    // tail repeats the head, so that a write or a read at any offset is one
    // slice of it.
    let pattern: Vec<u8> = (0..STREAM_PERIOD + size.max(STREAM_READ))
        .map(|i| {
            let i = i % STREAM_PERIOD;
            (i * 31 + 1 + (i >> 8)) as u8
        })
        .collect();
    let at = |position: u64| (position % STREAM_PERIOD as u64) as usize;
    let mut buf = vec![0u8; STREAM_READ];
    // Per connection: bytes written, and bytes read back (and checked).
    let mut sent = vec![0u64; streams.len()];
    let mut echoed = vec![0u64; streams.len()];
    let mut alive = vec![true; streams.len()];
    let (mut out, mut inn, mut errors) = (0u64, 0u64, 0usize);
    let mut pacer = pace.map(|pace| Pacer::new(pace, size, streams.len()));
    let mut events = Events::new();
    while alive.iter().any(|&a| a) && Instant::now() < end {
        events.clear();
        let timeout = match &pacer {
            Some(pacer) if pacer.any_waiting() => RATE_TICK,
            _ => Duration::from_millis(50),
        };
        poller.wait(&mut events, Some(timeout))?;
        let now = Instant::now();
        let counted = now >= start && now < end;
        if let Some(pacer) = &mut pacer {
            for key in pacer.refill(now) {
                if alive[key] {
                    poller.modify_with_mode(&streams[key], Event::all(key), PollMode::Level)?;
                }
            }
        }
        for event in events.iter() {
            let key = event.key;
            if !alive[key] {
                continue;
            }
            let stream = &mut streams[key];
            let mut failure = None;
            let may_write = match &mut pacer {
                Some(pacer) if event.writable && !pacer.has_credit(key) => {
                    // Out of credit: reading only, until `refill` says.
                    pacer.wait(key);
                    poller.modify_with_mode(&*stream, Event::readable(key), PollMode::Level)?;
                    false
                }
                _ => event.writable,
            };
            if may_write {
                let from = at(sent[key]);
                match stream.write(&pattern[from..from + size]) {
                    Ok(n) => {
                        sent[key] += n as u64;
                        if let Some(pacer) = &mut pacer {
                            pacer.spend(key, n);
                        }
                        if counted {
                            out += n as u64;
                        }
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => failure = Some(format!("write: {e}")),
                }
            }
            if event.readable && failure.is_none() {
                match stream.read(&mut buf) {
                    Ok(0) => failure = Some("the server closed the connection".into()),
                    Ok(n) => {
                        failure = check_echo(&buf[..n], &pattern, echoed[key], sent[key], at);
                        echoed[key] += n as u64;
                        if counted {
                            inn += n as u64;
                        }
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => failure = Some(format!("read: {e}")),
                }
            }
            if let Some(message) = failure {
                alive[key] = false;
                let _ = poller.delete(&*stream);
                errors += 1;
                report(format!("connection {key}: {message}"));
            }
        }
    }
    for (stream, alive) in streams.iter().zip(&alive) {
        if *alive {
            let _ = poller.delete(stream);
        }
    }
    Ok((out, inn, errors))
}

/// Per-connection write credit for `--rate`: see the module docs.
struct Pacer {
    /// Bytes per second each connection may write.
    pace: f64,
    /// The most credit a connection holds, in bytes.
    burst: f64,
    credit: Vec<f64>,
    /// Connections out of credit, no longer asking to write.
    waiting: Vec<bool>,
    refilled_at: Instant,
}

impl Pacer {
    fn new(pace: f64, size: usize, connections: usize) -> Pacer {
        let burst = RATE_BURST_WRITES * size as f64;
        Pacer {
            pace,
            burst,
            credit: vec![burst; connections],
            waiting: vec![false; connections],
            refilled_at: Instant::now(),
        }
    }

    fn any_waiting(&self) -> bool {
        self.waiting.iter().any(|&w| w)
    }

    fn has_credit(&self, key: usize) -> bool {
        self.credit[key] > 0.0
    }

    fn spend(&mut self, key: usize, bytes: usize) {
        self.credit[key] -= bytes as f64;
    }

    fn wait(&mut self, key: usize) {
        self.waiting[key] = true;
    }

    /// Adds the credit earned since the last refill; returns the waiting
    /// connections that have credit again (no longer waiting).
    fn refill(&mut self, now: Instant) -> Vec<usize> {
        let earned = self.pace * now.duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        let mut resumed = Vec::new();
        for (key, credit) in self.credit.iter_mut().enumerate() {
            *credit = (*credit + earned).min(self.burst);
            if self.waiting[key] && *credit > 0.0 {
                self.waiting[key] = false;
                resumed.push(key);
            }
        }
        resumed
    }
}

/// What is wrong with `got`, read back at byte `echoed` of a connection's
/// stream, of which `sent` bytes were written: `None` if it is the pattern's
/// next bytes.
fn check_echo(
    got: &[u8],
    pattern: &[u8],
    echoed: u64,
    sent: u64,
    at: impl Fn(u64) -> usize,
) -> Option<String> {
    let end = echoed + got.len() as u64;
    if end > sent {
        return Some(format!("{end} bytes echoed, but only {sent} sent"));
    }
    let from = at(echoed);
    let expected = &pattern[from..from + got.len()];
    if got == expected {
        return None;
    }
    let first = got.iter().zip(expected).position(|(a, b)| a != b)?;
    Some(format!(
        "byte {} of the echo is not the byte sent there",
        echoed + first as u64
    ))
}

/// Drives `conns` until `end`; records the responses completed in `[start, end)`.
fn drive(mut conns: Vec<Conn>, start: Instant, end: Instant) -> io::Result<Tally> {
    let poller = Poller::new()?;
    let mut tally = Tally {
        latencies_ns: Vec::with_capacity(1 << 20),
        ..Tally::default()
    };
    for (key, conn) in conns.iter_mut().enumerate() {
        // SAFETY: a stream must leave the poller before it is closed. Each
        // is deleted in `fail` or at the end of this function, and on an
        // early return the poller (a local) is dropped before `conns` (a
        // parameter), which owns the streams.
        unsafe { poller.add_with_mode(&conn.stream, Event::readable(key), PollMode::Level)? };
        conn.send_next(&poller, key, &mut tally);
    }
    let mut events = Events::new();
    let mut alive = conns.iter().filter(|c| c.alive).count();
    while alive > 0 && Instant::now() < end {
        events.clear();
        poller.wait(&mut events, Some(Duration::from_millis(50)))?;
        for event in events.iter() {
            let key = event.key;
            let conn = &mut conns[key];
            if !conn.alive {
                continue;
            }
            if event.writable && conn.wants_write {
                conn.write_some(&poller, key, &mut tally);
            }
            if event.readable && conn.alive {
                conn.read_some(&poller, key, start, end, &mut tally);
            }
            if !conn.alive {
                alive -= 1;
            }
        }
    }
    let now = Instant::now();
    for conn in &conns {
        if conn.alive && now.duration_since(conn.sent_at) >= STALL {
            tally.stalled += 1;
            report(format!(
                "connection {} stalled: request {} unanswered for {:.1?} ({} of {} bytes back)",
                conn.id,
                conn.seq,
                now.duration_since(conn.sent_at),
                conn.received,
                conn.request.len()
            ));
        }
        if conn.alive {
            let _ = poller.delete(&conn.stream);
        }
    }
    Ok(tally)
}

impl Conn {
    fn new(id: usize, stream: TcpStream, size: usize, framing: Framing) -> Conn {
        // A body that differs between connections, so crossed streams show.
        let mut request: Vec<u8> = (0..size).map(|i| (i * 31 + id * 7 + 1) as u8).collect();
        let payload = framing.payload(size);
        match framing {
            Framing::Raw => {}
            Framing::Line => {
                // No line ends inside the payload: `\n` would cut the message
                // short, and a `\r` before the final `\n` would be dropped.
                for b in &mut request[payload.clone()] {
                    if *b == b'\n' || *b == b'\r' {
                        *b ^= 0x20;
                    }
                }
                request[size - 1] = b'\n';
            }
            Framing::Length => {
                let len = u32::try_from(size - 4).expect("checked in parse_args");
                request[..4].copy_from_slice(&len.to_be_bytes());
            }
        }
        Conn {
            id,
            stream,
            request,
            framing,
            payload,
            response: vec![0; size + 4096],
            written: 0,
            received: 0,
            seq: 0,
            sent_at: Instant::now(),
            wants_write: false,
            alive: true,
        }
    }

    /// Stamps the next sequence number into the request and starts sending it.
    fn send_next(&mut self, poller: &Poller, key: usize, tally: &mut Tally) {
        self.seq += 1;
        let stamp = self.framing.stamp(self.seq);
        let (lo, hi) = (self.payload.start, self.payload.end);
        let n = (hi - lo).min(8);
        self.request[lo..lo + n].copy_from_slice(&stamp[..n]);
        self.request[hi - n..hi].copy_from_slice(&stamp[..n]);
        self.written = 0;
        self.received = 0;
        self.sent_at = Instant::now();
        self.write_some(poller, key, tally);
    }

    fn write_some(&mut self, poller: &Poller, key: usize, tally: &mut Tally) {
        while self.written < self.request.len() {
            match self.stream.write(&self.request[self.written..]) {
                Ok(0) => return self.fail(poller, tally, "write returned 0".into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if !self.wants_write {
                        self.wants_write = true;
                        self.set_interest(poller, Event::all(key), tally);
                    }
                    return;
                }
                Err(e) => return self.fail(poller, tally, format!("write: {e}")),
            }
        }
        if self.wants_write {
            self.wants_write = false;
            self.set_interest(poller, Event::readable(key), tally);
        }
    }

    fn read_some(
        &mut self,
        poller: &Poller,
        key: usize,
        start: Instant,
        end: Instant,
        tally: &mut Tally,
    ) {
        let size = self.request.len();
        loop {
            match self.stream.read(&mut self.response[self.received..]) {
                Ok(0) => {
                    let msg = format!(
                        "server closed the connection ({} bytes back)",
                        self.received
                    );
                    return self.fail(poller, tally, msg);
                }
                Ok(n) => self.received += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => return self.fail(poller, tally, format!("read: {e}")),
            }
            if self.received > self.written {
                let msg = format!(
                    "{} bytes back for request {}, which is {size} bytes ({} of them sent)",
                    self.received, self.seq, self.written
                );
                return self.fail(poller, tally, msg);
            }
            if self.received == size {
                break;
            }
        }
        let done = Instant::now();
        let (lo, hi) = (self.payload.start, self.payload.end);
        let n = (hi - lo).min(8);
        // The framing bytes (the length prefix or the `\n`), checked every
        // time; empty in raw framing.
        let frame_match = self.response[..lo] == self.request[..lo]
            && self.response[hi..size] == self.request[hi..];
        if !frame_match {
            return self.fail(
                poller,
                tally,
                format!(
                    "wrong framing bytes in the response to request {}",
                    self.seq
                ),
            );
        }
        let ends_match = self.response[lo..lo + n] == self.request[lo..lo + n]
            && self.response[hi - n..hi] == self.request[hi - n..hi];
        if !ends_match {
            return self.fail(
                poller,
                tally,
                format!(
                    "wrong sequence number in the response to request {}",
                    self.seq
                ),
            );
        }
        if self.seq.is_multiple_of(FULL_CHECK_EVERY) {
            if self.response[..size] != self.request[..] {
                return self.fail(
                    poller,
                    tally,
                    format!("wrong body for request {}", self.seq),
                );
            }
            if done >= start && done < end {
                tally.full_checks += 1;
            }
        }
        if done >= start && done < end {
            tally
                .latencies_ns
                .push(done.duration_since(self.sent_at).as_nanos() as u64);
        }
        if done < end {
            self.send_next(poller, key, tally);
        }
    }

    fn set_interest(&mut self, poller: &Poller, interest: Event, tally: &mut Tally) {
        if let Err(e) = poller.modify_with_mode(&self.stream, interest, PollMode::Level) {
            self.fail(poller, tally, format!("poller: {e}"));
        }
    }

    /// Gives up on this connection (deleting it from the poller, which would
    /// otherwise keep reporting a dead socket as readable).
    fn fail(&mut self, poller: &Poller, tally: &mut Tally, message: String) {
        self.alive = false;
        let _ = poller.delete(&self.stream);
        tally.errors += 1;
        report(format!("connection {}: {message}", self.id));
    }
}

fn report(message: String) {
    if ERROR_LINES.fetch_add(1, Ordering::Relaxed) < MAX_ERROR_LINES {
        eprintln!("error: {message}");
    }
}

/// Connects, retrying for a few seconds while the server starts up.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                return Ok(stream);
            }
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("connect to {addr}: {e}"))),
        }
    }
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}

fn parse_args() -> Result<Config, String> {
    let mut host = "127.0.0.1".to_string();
    let mut port: Option<u16> = None;
    let mut config = Config {
        addr: "127.0.0.1:1".parse().unwrap(),
        stream: false,
        connections: 100,
        size: 1024,
        framing: Framing::Raw,
        threads: 1,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(5),
        rate: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("bad value for {flag}: {value:?}");
        let seconds = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("bad value for {flag}: {v:?}"))
        };
        match flag.as_str() {
            "--host" => host = value.clone(),
            "--port" => port = Some(value.parse().map_err(bad)?),
            "--mode" => {
                config.stream = match value.as_str() {
                    "rr" => false,
                    "stream" => true,
                    _ => return Err(format!("bad value for {flag}: {value:?} (rr|stream)")),
                }
            }
            "--connections" => config.connections = value.parse().map_err(bad)?,
            "--size" => config.size = value.parse().map_err(bad)?,
            "--framing" => {
                config.framing = match value.as_str() {
                    "raw" => Framing::Raw,
                    "line" => Framing::Line,
                    "length" => Framing::Length,
                    _ => return Err(format!("bad value for {flag}: {value:?} (raw|line|length)")),
                }
            }
            "--threads" => config.threads = value.parse().map_err(bad)?,
            "--warmup" => config.warmup = seconds(&value)?,
            "--duration" => config.duration = seconds(&value)?,
            "--rate" => {
                let rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| format!("bad value for {flag}: {value:?} (MB/s, above 0)"))?;
                config.rate = Some(rate * 1e6);
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    if config.connections == 0 || config.size == 0 || config.threads == 0 {
        return Err("--connections, --size and --threads must be positive".into());
    }
    // At least one payload byte, so that every request carries a stamp.
    match config.framing {
        Framing::Line if config.size < 2 => return Err("--framing line needs --size >= 2".into()),
        Framing::Length if config.size < 5 => {
            return Err("--framing length needs --size >= 5".into())
        }
        Framing::Length if config.size - 4 > u32::MAX as usize => {
            return Err("--framing length needs --size - 4 to fit in 4 bytes".into())
        }
        _ => {}
    }
    if config.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    if config.rate.is_some() && !config.stream {
        return Err("--rate paces --mode stream only".into());
    }
    config.threads = config.threads.min(config.connections);
    config.addr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("bad address {host}:{port}: {e}"))?;
    Ok(config)
}
