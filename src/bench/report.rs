//! What a run tells: [`Progress`] while it runs, [`Report`] at its end.

use super::config::Config;
use super::histogram::Histogram;

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
    /// The length of the warm-up, in seconds: from the moment every
    /// connection was up to the start of the measured time.
    pub warmup_seconds: f64,
    /// With a steady warm-up: whether the rate settled (false: the warm-up
    /// ran to [`Steady::max`], or the run was stopped first).
    pub steady: Option<bool>,
    /// With a steady warm-up: the requests per second of each of its
    /// windows, in order (stream mode: `size`-byte units received).
    pub warmup_rates: Vec<f64>,
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
    /// what [`Verify`](super::message::Verify) expects, or longer than the
    /// request. When that is every connection, no reply was ever right: the
    /// server does not do what `--verify` assumes (`python -m rsepoll`'s
    /// server reverses lines, and `--verify echo` is the default).
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
