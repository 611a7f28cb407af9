//! Warming up until the rate settles (`--warmup-until-steady`).
//!
//! A fixed warm-up measures a server in whatever state it is in a fixed time
//! after its first connection, and some servers take a while to reach the
//! state they serve in for the rest of their lives (`benchmarks/README.md`
//! has an asyncio example). With a [`Steady`] warm-up a watcher thread
//! samples every worker's completed requests each [`Steady::window`] from
//! the moment every connection is up, and starts the measured time at the
//! first sample, at least [`Config::warmup`](super::Config::warmup) in, at
//! which the last [`Steady::windows`] rates are within
//! [`Steady::tolerance`] of their mean; or at [`Steady::max`] if they never
//! are. The report says which, with the rates it saw.
//!
//! A rate that is steady is not proof of a steady state: a slow phase can
//! be steady too, for as long as it lasts.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{Shared, POLL_SLICE};

/// When a warm-up counts as settled.
#[derive(Clone, Debug, PartialEq)]
pub struct Steady {
    /// The longest warm-up, from the moment every connection is up: the
    /// measured time starts then whether the rate has settled or not.
    pub max: Duration,
    /// How far apart the last [`Steady::windows`] rates may be: (highest −
    /// lowest) / mean, e.g. 0.05.
    pub tolerance: f64,
    /// The length of one sample of the rate.
    pub window: Duration,
    /// How many successive samples must agree.
    pub windows: usize,
}

impl Steady {
    /// Four windows of 0.25 s within 5% of their mean, for at most `max`.
    pub fn new(max: Duration) -> Steady {
        Steady {
            max,
            tolerance: 0.05,
            window: Duration::from_millis(250),
            windows: 4,
        }
    }

    /// Checks the parameters against the least warm-up.
    pub fn validate(&self, warmup: Duration) -> Result<(), String> {
        if self.max < warmup {
            return Err(format!(
                "--warmup-max ({:?}) must be at least --warmup ({warmup:?})",
                self.max
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(format!(
                "--steady-tolerance must be a non-negative percentage, got {}",
                self.tolerance * 100.0
            ));
        }
        if self.window.is_zero() || self.windows == 0 {
            return Err("the steady window and the number of windows must be positive".into());
        }
        Ok(())
    }

    /// Whether the last [`Steady::windows`] of `rates` agree: their spread
    /// (highest − lowest) is at most [`Steady::tolerance`] × their mean, and
    /// the mean is not zero.
    pub fn settled(&self, rates: &[f64]) -> bool {
        if self.windows == 0 || rates.len() < self.windows {
            return false;
        }
        let last = &rates[rates.len() - self.windows..];
        let lowest = last.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = last.iter().copied().fold(0.0, f64::max);
        let mean = last.iter().sum::<f64>() / last.len() as f64;
        mean > 0.0 && highest - lowest <= self.tolerance * mean
    }
}

/// How the warm-up ended (steady mode only).
#[derive(Clone, Debug, Default)]
pub(super) struct Outcome {
    /// True if the rate settled, false if the warm-up ran to its end (or the
    /// run was stopped, or every worker ended, first).
    pub(super) settled: bool,
    /// Requests per second in each window of the warm-up, in order.
    pub(super) rates: Vec<f64>,
}

/// The watcher thread's body: waits for every worker to have connected,
/// samples the rate until it settles or the warm-up reaches its end, and
/// fixes the measured window. Whatever happens, the window is fixed when it
/// returns (see [`Done`]), so that the workers, which run until its end,
/// always have one.
pub(super) fn watch(shared: &Shared, steady: &Steady) {
    let _done = Done(shared);
    let Some(opened) = shared.wait_opened() else {
        return;
    };
    let least = opened + shared.config.warmup;
    let most = opened + steady.max;
    let mut outcome = Outcome::default();
    let (mut then, mut count) = (opened, shared.completed());
    let mut next = opened + steady.window;
    loop {
        if !shared.sleep_until(next.min(most)) {
            break;
        }
        let now = Instant::now();
        let total = shared.completed();
        let seconds = now.duration_since(then).as_secs_f64();
        if seconds > 0.0 {
            outcome.rates.push((total - count) as f64 / seconds);
        }
        (then, count) = (now, total);
        outcome.settled = now >= least && steady.settled(&outcome.rates);
        if outcome.settled || now >= most {
            break;
        }
        next += steady.window;
    }
    *shared.warmup.lock() = Some(outcome);
    shared.fix_window(Instant::now());
}

/// Marks the watcher finished, fixing the window first if it is not yet
/// (the run was stopped, every worker ended, or the watcher panicked).
struct Done<'a>(&'a Shared);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        if shared.window().is_none() {
            shared.warmup.lock().get_or_insert_with(Outcome::default);
            shared.fix_window(Instant::now());
        }
        shared.finish();
    }
}

impl Shared {
    /// The requests every worker has completed so far (warm-up included).
    fn completed(&self) -> u64 {
        self.completed.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Waits until every worker has arrived at the gate; `None` if the run
    /// was stopped first.
    fn wait_opened(&self) -> Option<Instant> {
        let mut gate = self.gate.lock();
        loop {
            if let Some(opened) = gate.opened {
                return Some(opened);
            }
            if self.stopping() {
                return None;
            }
            gate = self.gate_open.wait_timeout(gate, POLL_SLICE);
        }
    }

    /// Sleeps until `when`; false, as soon as it sees it, if the run was
    /// stopped or every worker has finished meanwhile.
    fn sleep_until(&self, when: Instant) -> bool {
        loop {
            if self.stopping() || *self.finished.lock() >= self.threads {
                return false;
            }
            let now = Instant::now();
            if now >= when {
                return true;
            }
            std::thread::sleep(when.duration_since(now).min(POLL_SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_needs_enough_windows_within_the_tolerance_of_their_mean() {
        let steady = Steady::new(Duration::from_secs(10));
        assert!(!steady.settled(&[]));
        assert!(!steady.settled(&[100.0, 100.0, 100.0]));
        assert!(steady.settled(&[100.0, 100.0, 100.0, 100.0]));
        // A slow start, then four windows within 5% of their mean (100).
        assert!(steady.settled(&[30.0, 60.0, 98.0, 102.0, 97.5, 102.5]));
        // 6% apart is not.
        assert!(!steady.settled(&[30.0, 60.0, 97.0, 103.0, 100.0, 100.0]));
        // Only the last windows count.
        assert!(!steady.settled(&[100.0, 100.0, 100.0, 100.0, 50.0]));
        // Nothing at all is not steady.
        assert!(!steady.settled(&[0.0, 0.0, 0.0, 0.0]));
        let strict = Steady {
            tolerance: 0.0,
            ..steady.clone()
        };
        assert!(strict.settled(&[7.0, 7.0, 7.0, 7.0]));
        assert!(!strict.settled(&[7.0, 7.0, 7.0, 7.5]));
    }

    #[test]
    fn bad_parameters_are_named() {
        let steady = Steady::new(Duration::from_secs(1));
        assert!(steady.validate(Duration::from_secs(1)).is_ok());
        let err = steady.validate(Duration::from_secs(2)).unwrap_err();
        assert!(err.contains("--warmup-max"), "{err}");
        let negative = Steady {
            tolerance: -0.01,
            ..steady.clone()
        };
        let err = negative.validate(Duration::ZERO).unwrap_err();
        assert!(err.contains("--steady-tolerance"), "{err}");
        let empty = Steady {
            windows: 0,
            ..steady
        };
        assert!(empty.validate(Duration::ZERO).is_err());
    }
}
