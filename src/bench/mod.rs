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
//! its first check there), then `warmup` unmeasured (with
//! [`Config::steady`], until the rate settles: at least `warmup`, at most
//! [`Steady::max`]; see [`steady`]), then the `duration` that is measured,
//! then at most [`GRACE`] for idle mode's second check. Nothing waits
//! longer: a server that does not answer costs a stalled request or an
//! error, never a hang.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use polling::{Events, Poller};

use crate::sync::{Condvar, Mutex};

mod config;
mod connect;
mod exchange;
pub mod histogram;
mod idle;
pub mod message;
mod report;
mod rr;
pub mod steady;
mod stream;

pub use config::{Config, Mode};
use histogram::Histogram;
pub use report::{Phase, Progress, Report};
pub use steady::Steady;

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

/// Where the workers meet before the load, and the measured time.
#[derive(Default)]
struct Gate {
    /// Workers that have connected (or given up).
    arrived: usize,
    /// When the last of them did: the warm-up starts then.
    opened: Option<Instant>,
    /// The measured time, once fixed: when the gate opens, or with a steady
    /// warm-up once the rate settles.
    window: Option<Window>,
}

/// What the workers share with each other and with the [`Bench`] handle.
struct Shared {
    config: Config,
    threads: usize,
    /// The threads that report to `finished`: the workers, and the steady
    /// warm-up's watcher if there is one.
    parties: usize,
    began: Instant,
    stop: AtomicBool,
    stopped_at: Mutex<Option<Instant>>,
    gate: Mutex<Gate>,
    /// Notified when the gate opens and when the window is fixed.
    gate_open: Condvar,
    /// The window, as in `gate`, for the workers to read without a lock.
    window: OnceLock<Window>,
    /// Each worker's requests completed so far, warm-up included, for the
    /// steady warm-up's watcher (stored at every wait, so never more than
    /// one round of events behind).
    completed: Box<[CachePadded<AtomicU64>]>,
    /// How a steady warm-up ended.
    warmup: Mutex<Option<steady::Outcome>>,
    /// Threads that have finished (of `parties`).
    finished: Mutex<usize>,
    /// Workers that have not finished yet (of `threads`).
    workers_left: AtomicUsize,
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

    /// The measured time, if it is fixed yet.
    fn window(&self) -> Option<Window> {
        self.window.get().copied()
    }

    /// Whether `t` is in the measured time. A worker asks after it took `t`
    /// (`Instant::now()`), so a window fixed to start at or before `t` is
    /// seen: [`Shared::fix_window`] takes its start before it publishes it.
    /// (What completes in the nanoseconds between the two is not counted.)
    fn in_window(&self, t: Instant) -> bool {
        self.window().is_some_and(|w| w.contains(t))
    }

    /// When the workers stop: the end of the window, or `None` while it is
    /// not fixed (they go on, looking again at every wait).
    fn until(&self) -> Option<Instant> {
        self.window().map(|w| w.end)
    }

    /// Fixes the measured time to start at `start`, once; later calls do
    /// nothing.
    fn fix_window(&self, start: Instant) {
        let mut gate = self.gate.lock();
        if gate.window.is_none() {
            let window = Window {
                start,
                end: start + self.config.duration,
            };
            gate.window = Some(window);
            let _ = self.window.set(window);
            self.gate_open.notify_all();
        }
    }

    /// Arrives at the gate; the last worker to arrive opens it, and fixes the
    /// window unless a steady warm-up's watcher will. With `wait`, waits for
    /// the gate to open (every worker arrives, even one that failed: see
    /// [`Worker`]).
    fn arrive(&self, wait: bool) {
        let mut gate = self.gate.lock();
        gate.arrived += 1;
        if gate.arrived == self.threads {
            let now = Instant::now();
            *self.connect_seconds.lock() = now.duration_since(self.began).as_secs_f64();
            gate.opened = Some(now);
            if self.config.steady_warmup().is_none() {
                let warmup = match self.config.mode {
                    Mode::Idle => Duration::ZERO,
                    Mode::Rr | Mode::Stream => self.config.warmup,
                };
                let start = now + warmup;
                let window = Window {
                    start,
                    end: start + self.config.duration,
                };
                gate.window = Some(window);
                let _ = self.window.set(window);
            }
            self.gate_open.notify_all();
        }
        while wait && gate.opened.is_none() {
            gate = self.gate_open.wait(gate);
        }
    }

    /// One more thread (of `parties`) has finished.
    fn finish(&self) {
        *self.finished.lock() += 1;
        self.all_finished.notify_all();
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
    /// The worker's index, in [`Shared::completed`].
    index: usize,
    /// Requests completed since the start, warm-up included (stream mode:
    /// `size`-byte units received), stored in [`Shared::completed`] at
    /// every wait.
    completed: u64,
    requests: u64,
    bytes_out: u64,
    bytes_in: u64,
    latency: Histogram,
    published: Instant,
}

impl<'a> Tally<'a> {
    fn new(shared: &'a Shared, index: usize) -> Self {
        Tally {
            shared,
            index,
            completed: 0,
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
    /// stop was asked for. `until` is `None` while the window is not fixed.
    fn wait(
        &mut self,
        poller: &Poller,
        events: &mut Events,
        until: Option<Instant>,
    ) -> io::Result<bool> {
        let now = Instant::now();
        self.shared.completed[self.index].store(self.completed, Relaxed);
        if now.duration_since(self.published) >= PUBLISH_EVERY {
            self.publish(now);
        }
        if until.is_some_and(|until| now >= until) || self.shared.stopping() {
            return Ok(false);
        }
        events.clear();
        let slice = until.map_or(POLL_SLICE, |until| {
            until.saturating_duration_since(now).min(POLL_SLICE)
        });
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
    /// Waits for every worker to have connected; returns the window if it
    /// is fixed already (it is unless a steady warm-up is to fix it).
    fn arrive(&mut self) -> Option<Window> {
        self.arrived = true;
        self.shared.arrive(true);
        self.shared.window()
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        if !self.arrived {
            self.shared.arrive(false);
        }
        if self.shared.workers_left.fetch_sub(1, Relaxed) == 1 {
            // The run is over, early if every connection failed: the
            // measured time ends here at the latest.
            self.shared
                .stopped_at
                .lock()
                .get_or_insert_with(Instant::now);
        }
        self.shared.finish();
    }
}

/// A running load: watch it with [`Bench::progress`], end it early with
/// [`Bench::stop`], collect it with [`Bench::join`].
pub struct Bench {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<io::Result<()>>>,
    /// The steady warm-up's watcher, if the run has one.
    watcher: Option<JoinHandle<()>>,
}

/// Starts a run in the background. Fails only if `config` is invalid
/// (`InvalidInput`) or a thread cannot be spawned.
pub fn start(config: Config) -> io::Result<Bench> {
    config
        .validate()
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidInput, message))?;
    let threads = config.worker_threads();
    let steady = config.steady_warmup().cloned();
    let shared = Arc::new(Shared {
        config,
        threads,
        parties: threads + usize::from(steady.is_some()),
        began: Instant::now(),
        stop: AtomicBool::new(false),
        stopped_at: Mutex::new(None),
        gate: Mutex::new(Gate::default()),
        gate_open: Condvar::new(),
        window: OnceLock::new(),
        completed: (0..threads)
            .map(|_| CachePadded::new(AtomicU64::new(0)))
            .collect(),
        warmup: Mutex::new(None),
        finished: Mutex::new(0),
        workers_left: AtomicUsize::new(threads),
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
    let watcher = match steady {
        Some(steady) => {
            let theirs = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("rsepoll-bench-warmup".into())
                    .spawn(move || steady::watch(&theirs, &steady))?,
            )
        }
        None => None,
    };
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
                let bench = Bench {
                    shared,
                    workers,
                    watcher,
                };
                bench.stop();
                for _ in index..threads {
                    bench.shared.arrive(false);
                }
                let _ = bench.join();
                return Err(error);
            }
        }
    }
    Ok(Bench {
        shared,
        workers,
        watcher,
    })
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
    let mut tally = Tally::new(shared, index);
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
        let opened = shared.gate.lock().opened.is_some();
        let (phase, elapsed) = match shared.window() {
            None if !opened => (Phase::Connecting, 0.0),
            None => (Phase::Warmup, 0.0),
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
    /// be fixed (`None` until then). It is fixed once every worker has
    /// connected, with its start `warmup` later; with a steady warm-up, not
    /// until the rate settles, with its start then. A caller that samples
    /// something at the window's edges, such as the server's CPU time, learns
    /// them here the moment they are known. The window is always fixed
    /// before the run ends: every worker arrives at the gate, even one that
    /// failed, and the watcher of a steady warm-up fixes it whatever happens.
    pub fn window(&self, timeout: Duration) -> Option<(Instant, Instant)> {
        let gate = self.shared.gate.lock();
        let gate = self
            .shared
            .gate_open
            .wait_timeout_while(gate, timeout, |gate| gate.window.is_none());
        gate.window.map(|w| (w.start, w.end))
    }

    /// Waits up to `timeout` for the run to end; true once it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let parties = self.shared.parties;
        let finished = self.shared.finished.lock();
        let finished = self
            .shared
            .all_finished
            .wait_timeout_while(finished, timeout, |n| *n < parties);
        *finished >= parties
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
        if let Some(watcher) = self.watcher {
            if watcher.join().is_err() {
                failure = Some(io::Error::other("the warm-up watcher panicked"));
            }
        }
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
        let warmup_seconds = match (shared.gate.lock().opened, shared.window()) {
            (Some(opened), Some(w)) => w.start.saturating_duration_since(opened).as_secs_f64(),
            _ => 0.0,
        };
        let outcome = shared.warmup.lock().take();
        let mut config = shared.config.clone();
        config.threads = shared.threads;
        Ok(Report {
            config,
            connected,
            held: shared.held.load(Relaxed),
            connect_seconds: *shared.connect_seconds.lock(),
            seconds,
            warmup_seconds,
            steady: outcome.as_ref().map(|o| o.settled),
            warmup_rates: outcome.map_or_else(Vec::new, |o| o.rates),
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
