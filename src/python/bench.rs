//! `run_bench`: runs [`crate::bench`] with the GIL released, in slices short
//! enough for Ctrl-C to be seen, calling an optional progress callback
//! between slices, and an optional `marks` callback at the edges of the
//! measured time; returns the report as a dict.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::dispatch::SIGNAL_SLICE;
use crate::bench::message::{Framing, Verify};
use crate::bench::{self, Bench, Config, Mode, Report, Steady};

/// How long an interrupted run is given to wind down before its threads are
/// left to finish on their own (a connect under way ends at its timeout).
const STOP_WAIT: Duration = Duration::from_secs(1);

fn seconds(name: &str, value: f64, may_be_zero: bool) -> PyResult<Duration> {
    if value.is_finite() && (value > 0.0 || (may_be_zero && value == 0.0)) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be a {} number of seconds, got {value}",
            if may_be_zero {
                "non-negative"
            } else {
                "positive"
            }
        )))
    }
}

fn choice<T>(name: &str, value: &str, parse: fn(&str) -> Option<T>, names: &str) -> PyResult<T> {
    parse(value).ok_or_else(|| {
        PyValueError::new_err(format!("{name} must be one of {names}, got {value:?}"))
    })
}

/// Runs a load against `host` (an IP address) and `port`; see
/// `python -m rsepoll.bench --help`. With `warmup_until_steady`, the warm-up
/// goes on after `warmup` until the rate settles (`steady_tolerance`, a
/// fraction), for at most `warmup_max` seconds in all; see
/// [`crate::bench::steady`]. `progress`, if given, is called about
/// every `progress_interval` seconds with a dict (`phase`, `elapsed`,
/// `requests`, `errors`, `p99_us`). `marks`, if given, is called with
/// `"start"` when the measured time starts and `"end"` when it ends (see
/// [`Marks`]). Raises `ValueError` for bad arguments, `OSError` if no
/// connection could be made, and `KeyboardInterrupt` on Ctrl-C. The
/// exception that ends a run early (Ctrl-C, or one raised by `progress` or
/// `marks`) carries the report of what was measured until then as its
/// `report` attribute, if the run had connected and wound down within a
/// second.
#[pyfunction]
#[pyo3(signature = (
    host, port, *, mode="rr", connections=100, size=1024, duration=10.0, warmup=0.0,
    warmup_until_steady=false, warmup_max=10.0, steady_tolerance=0.05,
    threads=0, verify="echo", framing="raw", connect_timeout=10.0, progress=None,
    progress_interval=1.0, marks=None,
))]
#[allow(clippy::too_many_arguments)]
pub(super) fn run_bench<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    mode: &str,
    connections: usize,
    size: usize,
    duration: f64,
    warmup: f64,
    warmup_until_steady: bool,
    warmup_max: f64,
    steady_tolerance: f64,
    threads: usize,
    verify: &str,
    framing: &str,
    connect_timeout: f64,
    progress: Option<Bound<'py, PyAny>>,
    progress_interval: f64,
    marks: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let ip: IpAddr = host
        .parse()
        .map_err(|_| PyValueError::new_err(format!("host must be an IP address, got {host:?}")))?;
    let mut config = Config::new(
        SocketAddr::new(ip, port),
        choice("mode", mode, Mode::parse, "rr, stream, idle")?,
    );
    config.connections = connections;
    config.size = size;
    config.duration = seconds("duration", duration, false)?;
    config.warmup = seconds("warmup", warmup, true)?;
    if warmup_until_steady {
        let mut steady = Steady::new(seconds("warmup_max", warmup_max, true)?);
        steady.tolerance = steady_tolerance;
        config.steady = Some(steady);
    }
    config.threads = threads;
    config.verify = choice("verify", verify, Verify::parse, "echo, reverse, none")?;
    config.framing = choice("framing", framing, Framing::parse, "raw, line, length")?;
    config.connect_timeout = seconds("connect_timeout", connect_timeout, false)?;
    let progress_interval = seconds("progress_interval", progress_interval, false)?;
    config.validate().map_err(PyValueError::new_err)?;

    let run = bench::start(config).map_err(|e| PyOSError::new_err(e.to_string()))?;
    let mut next_progress = Instant::now() + progress_interval;
    let mut marks = marks.map(Marks::new);
    loop {
        let mut slice = SIGNAL_SLICE;
        if let Some(marks) = &mut marks {
            slice = marks.slice(py, &run);
        }
        if py.detach(|| run.wait(slice)) {
            break;
        }
        let mut result = py.check_signals();
        if let (Ok(()), Some(marks)) = (&result, &mut marks) {
            result = marks.call_due(&run, false);
        }
        if let (Ok(()), Some(callback)) = (&result, &progress) {
            let now = Instant::now();
            if now >= next_progress {
                next_progress = now + progress_interval;
                result = progress_dict(py, &run).and_then(|d| callback.call1((d,)).map(drop));
            }
        }
        if let Err(error) = result {
            run.stop();
            if py.detach(|| run.wait(STOP_WAIT)) {
                // What was measured until the stop, for the caller to show.
                let report = py.detach(|| run.join()).ok();
                if let Some(report) = report.and_then(|r| report_dict(py, &r).ok()) {
                    let _ = error.value(py).setattr(intern!(py, "report"), report);
                }
            }
            return Err(error);
        }
    }
    if let Some(marks) = &mut marks {
        marks.call_due(&run, true)?;
    }
    let report = py
        .detach(|| run.join())
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
    report_dict(py, &report)
}

/// The `marks` callback of `run_bench`, called with `"start"` and then
/// `"end"` as close as the loop can to the edges of the measured time, so
/// that a caller (`python -m rsepoll.bench --marks`, and through it
/// `benchmarks/suite.py`) can sample the server's CPU time over exactly the
/// time the report counts. The loop sleeps until the next edge rather than
/// for a whole slice; a run that ends early gets its marks when it ends.
struct Marks<'py> {
    callback: Bound<'py, PyAny>,
    window: Option<(Instant, Instant)>,
    /// Marks called so far: 0, 1 (start) or 2 (start and end).
    called: usize,
}

impl<'py> Marks<'py> {
    fn new(callback: Bound<'py, PyAny>) -> Self {
        Marks {
            callback,
            window: None,
            called: 0,
        }
    }

    /// How long the loop may wait for the run before the next mark is due.
    /// Until the window is known, waits (up to a slice) for it instead:
    /// it is fixed before the run can end, and the start may be due at once.
    fn slice(&mut self, py: Python<'py>, run: &Bench) -> Duration {
        if self.window.is_none() {
            self.window = py.detach(|| run.window(SIGNAL_SLICE));
            return Duration::ZERO;
        }
        match self.due() {
            Some(due) => SIGNAL_SLICE.min(due.saturating_duration_since(Instant::now())),
            None => SIGNAL_SLICE,
        }
    }

    /// When the next mark is due, if the window is known and a mark is left.
    fn due(&self) -> Option<Instant> {
        let (start, end) = self.window?;
        match self.called {
            0 => Some(start),
            1 => Some(end),
            _ => None,
        }
    }

    /// Calls the marks that are due; with `all` (the run has ended), every
    /// mark not yet called.
    fn call_due(&mut self, run: &Bench, all: bool) -> PyResult<()> {
        if self.window.is_none() {
            self.window = run.window(Duration::ZERO);
        }
        while self.called < 2 {
            let is_due = all || self.due().is_some_and(|due| Instant::now() >= due);
            if !is_due {
                break;
            }
            self.callback.call1((["start", "end"][self.called],))?;
            self.called += 1;
        }
        Ok(())
    }
}

fn progress_dict<'py>(py: Python<'py>, run: &Bench) -> PyResult<Bound<'py, PyDict>> {
    let p = run.progress();
    let d = PyDict::new(py);
    d.set_item("phase", p.phase.name())?;
    d.set_item("elapsed", p.elapsed)?;
    d.set_item("requests", p.requests)?;
    d.set_item("errors", p.errors)?;
    d.set_item("p99_us", p.p99_us)?;
    Ok(d)
}

fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let c = &r.config;
    let d = PyDict::new(py);
    d.set_item("mode", c.mode.name())?;
    d.set_item("host", c.addr.ip().to_string())?;
    d.set_item("port", c.addr.port())?;
    d.set_item("connections", c.connections)?;
    d.set_item("connected", r.connected)?;
    d.set_item("held", r.held)?;
    d.set_item("threads", c.threads)?;
    d.set_item("size", c.size)?;
    d.set_item("framing", c.framing.name())?;
    d.set_item("verify", c.verify.name())?;
    d.set_item("warmup_s", r.warmup_seconds)?;
    d.set_item("warmup_until_steady", c.steady_warmup().is_some())?;
    d.set_item("warmup_steady", r.steady)?;
    d.set_item("warmup_rates", r.warmup_rates.clone())?;
    d.set_item("connect_s", r.connect_seconds)?;
    d.set_item("duration_s", r.seconds)?;
    d.set_item("requests", r.requests)?;
    d.set_item("requests_per_s", r.requests_per_s())?;
    d.set_item("bytes_out", r.bytes_out)?;
    d.set_item("bytes_in", r.bytes_in)?;
    d.set_item("mb_per_s", r.mb_per_s_in())?;
    d.set_item("mb_per_s_out", r.mb_per_s_out())?;
    d.set_item("mb_per_s_in", r.mb_per_s_in())?;
    d.set_item("latency_samples", r.latency.count())?;
    d.set_item("mean_us", r.latency.mean() / 1e3)?;
    d.set_item("min_us", r.latency.min() as f64 / 1e3)?;
    d.set_item("p50_us", r.percentile_us(50.0))?;
    d.set_item("p90_us", r.percentile_us(90.0))?;
    d.set_item("p99_us", r.percentile_us(99.0))?;
    d.set_item("p999_us", r.percentile_us(99.9))?;
    d.set_item("max_us", r.latency.max() as f64 / 1e3)?;
    d.set_item("errors", r.errors)?;
    d.set_item("stalled", r.stalled)?;
    d.set_item("wrong_first_replies", r.wrong_first_replies)?;
    d.set_item("error_samples", r.error_samples.clone())?;
    Ok(d)
}
