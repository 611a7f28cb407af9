//! A TCP load generator: the engine of `python -m rsepoll.bench`.
//!
//! Plain Rust, tested with `cargo test`; `python::bench` is its binding.
//! [`start`] spawns worker threads that share the connections, each driving
//! its share with non-blocking sockets and one level-triggered poller (the
//! `polling` crate, so it runs wherever the server does). Three modes:
//!
//! - [`Mode::Rr`] ([`rr`]): request/response, one request in flight per
//!   connection; every round trip goes into a [`histogram::Histogram`];
//! - [`Mode::Stream`] ([`stream`]): every connection writes continuously
//!   and reads what comes back;
//! - [`Mode::Idle`] ([`idle`]): open the connections, check each with one
//!   round trip, hold them idle, check them again.
//!
//! A run's timeline: connect (at most `connect_timeout`; idle mode also runs
//! its first check there), then `warmup` unmeasured, then the `duration`
//! that is measured, then at most [`GRACE`] for idle mode's second check.
//! Nothing waits longer: a server that does not answer costs a stalled
//! request or an error, never a hang.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use polling::{Events, Poller};

use crate::sync::{Condvar, Mutex};

mod connect;
mod exchange;
pub mod histogram;
mod idle;
pub mod message;
mod rr;
mod stream;

use histogram::Histogram;
use message::{Framing, Verify};

/// How long idle mode's second check may take after the duration.
pub const GRACE: Duration = Duration::from_secs(2);
/// A request unanswered this long when the run ends counts as stalled.
const STALL: Duration = Duration::from_secs(1);
/// How often workers publish their counts (the live progress line's pace).
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// The longest a worker waits for events before it looks at the clock and
/// the stop flag.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Error messages kept for the report (all errors are counted).
const MAX_SAMPLES: usize = 10;

/// What the load looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Request/response: one request in flight per connection.
    Rr,
    /// Every connection writes without waiting and reads what comes back.
    Stream,
    /// Connections held open and idle, checked before and after.
    Idle,
}

impl Mode {
    /// Parses `rr`, `stream` or `idle`.
    pub fn parse(name: &str) -> Option<Mode> {
        match name {
            "rr" => Some(Mode::Rr),
            "stream" => Some(Mode::Stream),
            "idle" => Some(Mode::Idle),
            _ => None,
        }
    }

    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Rr => "rr",
            Mode::Stream => "stream",
            Mode::Idle => "idle",
        }
    }
}

/// A run's parameters.
#[derive(Clone, Debug)]
pub struct Config {
    /// The server.
    pub addr: SocketAddr,
    /// The kind of load.
    pub mode: Mode,
    /// Connections to open.
    pub connections: usize,
    /// Bytes per request, framing included.
    pub size: usize,
    /// The measured time (idle mode: how long the connections are held).
    pub duration: Duration,
    /// Unmeasured load before the measured time (not in idle mode).
    pub warmup: Duration,
    /// Worker threads; 0 picks half the CPUs (at least one), leaving the
    /// rest to a server on the same machine. Never more than `connections`.
    pub threads: usize,
    /// What a reply must be.
    pub verify: Verify,
    /// How requests are framed.
    pub framing: Framing,
    /// The longest connecting may take, for all connections together (idle
    /// mode: their first check included).
    pub connect_timeout: Duration,
}

impl Config {
    /// The defaults of `python -m rsepoll.bench`: 100 connections, 1 KiB
    /// requests, 10 s, echo verification, raw framing.
    pub fn new(addr: SocketAddr, mode: Mode) -> Config {
        Config {
            addr,
            mode,
            connections: 100,
            size: 1024,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            threads: 0,
            verify: Verify::Echo,
            framing: Framing::Raw,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Checks the parameters; the message names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be positive".into());
        }
        message::check_size(self.framing, self.size)?;
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if self.connect_timeout.is_zero() {
            return Err("--connect-timeout must be positive".into());
        }
        if self.mode == Mode::Stream
            && self.verify == Verify::Reverse
            && self.framing == Framing::Raw
        {
            return Err(
                "stream mode with --verify reverse needs --framing line or length \
                        (a raw reverse server reverses each read, and a stream's reads \
                        do not keep request boundaries)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The number of worker threads a run uses.
    pub fn worker_threads(&self) -> usize {
        let threads = if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get() / 2)
        } else {
            self.threads
        };
        threads.clamp(1, self.connections.max(1))
    }
}

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Opening connections (idle mode: and checking them).
    Connecting,
    /// Loading without measuring.
    Warmup,
    /// The measured time.
    Running,
    /// Past the measured time: idle mode's second check, the workers' exit.
    Finishing,
}

impl Phase {
    /// A lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Warmup => "warmup",
            Phase::Running => "running",
            Phase::Finishing => "finishing",
        }
    }
}

/// A look at a run in progress (the counts lag by up to [`PUBLISH_EVERY`]).
#[derive(Clone, Debug)]
pub struct Progress {
    /// Where the run is.
    pub phase: Phase,
    /// Seconds into the measured time (0 before it).
    pub elapsed: f64,
    /// Requests completed in the measured time so far.
    pub requests: u64,
    /// Connections that failed so far.
    pub errors: u64,
    /// The 99th percentile of the round trips so far, in microseconds.
    pub p99_us: f64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The parameters it ran with (`threads` as used).
    pub config: Config,
    /// Connections that were established.
    pub connected: usize,
    /// Connections still open and healthy at the end.
    pub held: usize,
    /// Seconds it took to connect (idle mode: and check) everything.
    pub connect_seconds: f64,
    /// The length of the measured time, in seconds.
    pub seconds: f64,
    /// Requests completed in the measured time (stream mode: `size` bytes
    /// received; idle mode: checks passed).
    pub requests: u64,
    /// Bytes written in the measured time.
    pub bytes_out: u64,
    /// Bytes read in the measured time.
    pub bytes_in: u64,
    /// Connections that failed: could not connect, were closed or reset by
    /// the server, or got a wrong reply.
    pub errors: u64,
    /// Connections whose request was unanswered for over a second at the end.
    pub stalled: u64,
    /// Connections that failed at their first reply because it was wrong: not
    /// what [`Verify`] expects, or longer than the request. When that is every
    /// connection, no reply was ever right: the server does not do what
    /// `--verify` assumes (`python -m rsepoll`'s server reverses lines, and
    /// `--verify echo` is the default).
    pub wrong_first_replies: u64,
    /// The first few errors, described.
    pub error_samples: Vec<String>,
    /// Round trips in nanoseconds (stream mode: from the write of a chunk
    /// to the read of its last byte; idle mode: the checks).
    pub latency: Histogram,
}

impl Report {
    fn per_second(&self, n: u64) -> f64 {
        if self.seconds > 0.0 {
            n as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Requests per second.
    pub fn requests_per_s(&self) -> f64 {
        self.per_second(self.requests)
    }

    /// Megabytes (10^6 bytes) written per second.
    pub fn mb_per_s_out(&self) -> f64 {
        self.per_second(self.bytes_out) / 1e6
    }

    /// Megabytes (10^6 bytes) read per second.
    pub fn mb_per_s_in(&self) -> f64 {
        self.per_second(self.bytes_in) / 1e6
    }

    /// A latency percentile in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.latency.percentile(p) as f64 / 1e3
    }
}

/// The measured time, fixed once every worker has connected.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

/// What the workers share with each other and with the [`Bench`] handle.
struct Shared {
    config: Config,
    threads: usize,
    began: Instant,
    stop: AtomicBool,
    stopped_at: Mutex<Option<Instant>>,
    /// Workers that have connected, and the window once all have.
    gate: Mutex<(usize, Option<Window>)>,
    gate_open: Condvar,
    /// Workers that have finished.
    finished: Mutex<usize>,
    all_finished: Condvar,
    connected: AtomicUsize,
    held: AtomicUsize,
    connect_seconds: Mutex<f64>,
    requests: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    errors: AtomicU64,
    stalled: AtomicU64,
    wrong_first_replies: AtomicU64,
    samples: Mutex<Vec<String>>,
    latency: Mutex<Histogram>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }

    fn window(&self) -> Option<Window> {
        self.gate.lock().1
    }

    /// Arrives at the gate; the last worker to arrive fixes the window.
    /// With `wait`, waits for it (every worker arrives, even one that failed:
    /// see [`Worker`]).
    fn arrive(&self, wait: bool) -> Option<Window> {
        let mut gate = self.gate.lock();
        gate.0 += 1;
        if gate.0 == self.threads {
            let now = Instant::now();
            *self.connect_seconds.lock() = now.duration_since(self.began).as_secs_f64();
            let warmup = match self.config.mode {
                Mode::Idle => Duration::ZERO,
                Mode::Rr | Mode::Stream => self.config.warmup,
            };
            let start = now + warmup;
            gate.1 = Some(Window {
                start,
                end: start + self.config.duration,
            });
            self.gate_open.notify_all();
        }
        while wait && gate.1.is_none() {
            gate = self.gate_open.wait(gate);
        }
        gate.1
    }

    fn sample(&self, message: String) {
        let mut samples = self.samples.lock();
        if samples.len() < MAX_SAMPLES {
            samples.push(message);
        }
    }
}

/// One worker's counts, published to [`Shared`] every [`PUBLISH_EVERY`].
struct Tally<'a> {
    shared: &'a Shared,
    requests: u64,
    bytes_out: u64,
    bytes_in: u64,
    latency: Histogram,
    published: Instant,
}

impl<'a> Tally<'a> {
    fn new(shared: &'a Shared) -> Self {
        Tally {
            shared,
            requests: 0,
            bytes_out: 0,
            bytes_in: 0,
            latency: Histogram::new(),
            published: Instant::now(),
        }
    }

    /// Counts a failed connection.
    fn fail(&mut self, message: String) {
        self.shared.errors.fetch_add(1, Relaxed);
        self.shared.sample(message);
    }

    /// Counts a connection that failed because its first reply was wrong.
    fn fail_first_reply(&mut self, message: String) {
        self.shared.wrong_first_replies.fetch_add(1, Relaxed);
        self.fail(message);
    }

    /// Counts a connection that stalled.
    fn stall(&mut self, message: String) {
        self.shared.stalled.fetch_add(1, Relaxed);
        self.shared.sample(message);
    }

    /// Publishes if it is time to, then waits for `events` (at most
    /// [`POLL_SLICE`]); false, without waiting, once `until` has come or a
    /// stop was asked for.
    fn wait(&mut self, poller: &Poller, events: &mut Events, until: Instant) -> io::Result<bool> {
        let now = Instant::now();
        if now.duration_since(self.published) >= PUBLISH_EVERY {
            self.publish(now);
        }
        if now >= until || self.shared.stopping() {
            return Ok(false);
        }
        events.clear();
        let slice = until.saturating_duration_since(now).min(POLL_SLICE);
        poller.wait(events, Some(slice))?;
        Ok(true)
    }

    fn publish(&mut self, now: Instant) {
        let shared = self.shared;
        shared.requests.fetch_add(self.requests, Relaxed);
        shared.bytes_out.fetch_add(self.bytes_out, Relaxed);
        shared.bytes_in.fetch_add(self.bytes_in, Relaxed);
        shared.latency.lock().add(&self.latency);
        self.latency.clear();
        (self.requests, self.bytes_out, self.bytes_in) = (0, 0, 0);
        self.published = now;
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.publish(Instant::now());
    }
}

/// A worker's duties to the others: it arrives at the gate exactly once,
/// and says when it has finished, whatever happens to it.
struct Worker<'a> {
    shared: &'a Shared,
    arrived: bool,
}

impl<'a> Worker<'a> {
    /// Waits for every worker to have connected; returns the window.
    fn arrive(&mut self) -> Window {
        self.arrived = true;
        self.shared
            .arrive(true)
            .expect("the last worker to arrive opens the gate")
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if !self.arrived {
            self.shared.arrive(false);
        }
        let mut finished = self.shared.finished.lock();
        *finished += 1;
        if *finished == self.shared.threads {
            // The run is over, early if every connection failed: the
            // measured time ends here at the latest.
            self.shared
                .stopped_at
                .lock()
                .get_or_insert_with(Instant::now);
        }
        drop(finished);
        self.shared.all_finished.notify_all();
    }
}

/// A running load: watch it with [`Bench::progress`], end it early with
/// [`Bench::stop`], collect it with [`Bench::join`].
pub struct Bench {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<io::Result<()>>>,
}

/// Starts a run in the background. Fails only if `config` is invalid
/// (`InvalidInput`) or a thread cannot be spawned.
pub fn start(config: Config) -> io::Result<Bench> {
    config
        .validate()
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidInput, message))?;
    let threads = config.worker_threads();
    let shared = Arc::new(Shared {
        config,
        threads,
        began: Instant::now(),
        stop: AtomicBool::new(false),
        stopped_at: Mutex::new(None),
        gate: Mutex::new((0, None)),
        gate_open: Condvar::new(),
        finished: Mutex::new(0),
        all_finished: Condvar::new(),
        connected: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
        connect_seconds: Mutex::new(0.0),
        requests: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
        bytes_in: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stalled: AtomicU64::new(0),
        wrong_first_replies: AtomicU64::new(0),
        samples: Mutex::new(Vec::new()),
        latency: Mutex::new(Histogram::new()),
    });
    let mut workers = Vec::with_capacity(threads);
    for index in 0..threads {
        let theirs = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("rsepoll-bench-{index}"))
            .spawn(move || work(&theirs, index));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(error) => {
                // Those already started would wait at the gate for this one.
                let bench = Bench { shared, workers };
                bench.stop();
                for _ in index..threads {
                    bench.shared.arrive(false);
                }
                let _ = bench.join();
                return Err(error);
            }
        }
    }
    Ok(Bench { shared, workers })
}

/// Runs `config` to its end.
pub fn run(config: Config) -> io::Result<Report> {
    start(config)?.join()
}

/// One worker: connects its share of the connections and loads them.
fn work(shared: &Shared, index: usize) -> io::Result<()> {
    let mut worker = Worker {
        shared,
        arrived: false,
    };
    let config = &shared.config;
    let mut tally = Tally::new(shared);
    let deadline = shared.began + config.connect_timeout;
    let ids = (index..config.connections).step_by(shared.threads);
    // Before the connections, which may take every descriptor left.
    let poller = Poller::new()?;
    let streams = connect::connect_all(shared, ids, deadline, &mut tally);
    shared.connected.fetch_add(streams.len(), Relaxed);
    let (w, t) = (&mut worker, &mut tally);
    match config.mode {
        Mode::Rr => rr::run(shared, w, t, poller, streams),
        Mode::Stream => stream::run(shared, w, t, poller, streams, index),
        Mode::Idle => idle::run(shared, w, t, poller, streams, deadline),
    }
}

impl Bench {
    /// Where the run is, with the counts published so far.
    pub fn progress(&self) -> Progress {
        let shared = &self.shared;
        let now = Instant::now();
        let (phase, elapsed) = match shared.window() {
            None => (Phase::Connecting, 0.0),
            Some(w) if now < w.start => (Phase::Warmup, 0.0),
            Some(w) if now < w.end => (Phase::Running, (now - w.start).as_secs_f64()),
            Some(w) => (Phase::Finishing, (w.end - w.start).as_secs_f64()),
        };
        Progress {
            phase,
            elapsed,
            requests: shared.requests.load(Relaxed),
            errors: shared.errors.load(Relaxed) + shared.stalled.load(Relaxed),
            p99_us: shared.latency.lock().percentile(99.0) as f64 / 1e3,
        }
    }

    /// The measured time as (start, end), waiting up to `timeout` for it to
    /// be fixed (it is once every worker has connected; `None` until then).
    /// A caller that samples something at the window's edges, such as the
    /// server's CPU time, learns them here the moment they are known. The
    /// window is always fixed before the run ends: every worker arrives at
    /// the gate, even one that failed.
    pub fn window(&self, timeout: Duration) -> Option<(Instant, Instant)> {
        let gate = self.shared.gate.lock();
        let gate = self
            .shared
            .gate_open
            .wait_timeout_while(gate, timeout, |gate| gate.1.is_none());
        gate.1.map(|w| (w.start, w.end))
    }

    /// Waits up to `timeout` for the run to end; true once it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let finished = self.shared.finished.lock();
        let finished = self
            .shared
            .all_finished
            .wait_timeout_while(finished, timeout, |n| *n < self.workers.len());
        *finished >= self.workers.len()
    }

    /// Asks the workers to stop now (they notice within ~50 ms, or when the
    /// connection attempt under way ends); the report covers the time until
    /// now. (A run whose workers all end early, every connection failed,
    /// covers the time until they ended.)
    pub fn stop(&self) {
        self.shared
            .stopped_at
            .lock()
            .get_or_insert_with(Instant::now);
        self.shared.stop.store(true, Relaxed);
    }

    /// Waits for the workers and gathers what they measured. Fails if a
    /// worker failed, or if no connection could be established (the error
    /// says why the first one failed).
    pub fn join(self) -> io::Result<Report> {
        let mut failure = None;
        for worker in self.workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => failure = failure.or(Some(error)),
                Err(_) => failure = failure.or(Some(io::Error::other("a bench worker panicked"))),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        let shared = &self.shared;
        let connected = shared.connected.load(Relaxed);
        let samples = std::mem::take(&mut *shared.samples.lock());
        if connected == 0 {
            let why = samples.first().map_or("stopped before connecting", |s| s);
            let message = format!("no connection could be made: {why}");
            return Err(io::Error::new(io::ErrorKind::NotConnected, message));
        }
        let seconds = match shared.window() {
            Some(w) => {
                let end = shared.stopped_at.lock().map_or(w.end, |t| t.min(w.end));
                end.saturating_duration_since(w.start).as_secs_f64()
            }
            None => 0.0,
        };
        let mut config = shared.config.clone();
        config.threads = shared.threads;
        Ok(Report {
            config,
            connected,
            held: shared.held.load(Relaxed),
            connect_seconds: *shared.connect_seconds.lock(),
            seconds,
            requests: shared.requests.load(Relaxed),
            bytes_out: shared.bytes_out.load(Relaxed),
            bytes_in: shared.bytes_in.load(Relaxed),
            errors: shared.errors.load(Relaxed),
            stalled: shared.stalled.load(Relaxed),
            wrong_first_replies: shared.wrong_first_replies.load(Relaxed),
            error_samples: samples,
            latency: std::mem::take(&mut *shared.latency.lock()),
        })
    }
}
