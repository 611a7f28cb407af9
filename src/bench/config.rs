//! A run's parameters: [`Mode`] and [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use super::message::{self, Framing, Verify};
use super::steady::Steady;

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
    /// Unmeasured load before the measured time (not in idle mode); with
    /// `steady`, the least warm-up.
    pub warmup: Duration,
    /// Warm up until the rate settles (not in idle mode); `None`: for
    /// exactly `warmup`.
    pub steady: Option<Steady>,
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
            steady: None,
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
        if let Some(steady) = &self.steady {
            steady.validate(self.warmup)?;
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

    /// The steady warm-up, if this run has one (idle mode has no warm-up).
    pub fn steady_warmup(&self) -> Option<&Steady> {
        match self.mode {
            Mode::Idle => None,
            Mode::Rr | Mode::Stream => self.steady.as_ref(),
        }
    }
}
