//! `run_bench`: runs [`crate::bench`] with the GIL released, in slices short
//! enough for Ctrl-C to be seen, calling an optional progress callback
//! between slices; returns the report as a dict.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::dispatch::SIGNAL_SLICE;
use crate::bench::message::{Framing, Verify};
use crate::bench::{self, Bench, Config, Mode, Report};

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
/// `python -m rsepoll.bench --help`. `progress`, if given, is called about
/// every `progress_interval` seconds with a dict (`phase`, `elapsed`,
/// `requests`, `errors`, `p99_us`). Raises `ValueError` for bad arguments,
/// `OSError` if no connection could be made, and `KeyboardInterrupt` on
/// Ctrl-C.
#[pyfunction]
#[pyo3(signature = (
    host, port, *, mode="rr", connections=100, size=1024, duration=10.0, warmup=0.0,
    threads=0, verify="echo", framing="raw", connect_timeout=10.0, progress=None,
    progress_interval=1.0,
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
    threads: usize,
    verify: &str,
    framing: &str,
    connect_timeout: f64,
    progress: Option<Bound<'py, PyAny>>,
    progress_interval: f64,
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
    config.threads = threads;
    config.verify = choice("verify", verify, Verify::parse, "echo, reverse, none")?;
    config.framing = choice("framing", framing, Framing::parse, "raw, line, length")?;
    config.connect_timeout = seconds("connect_timeout", connect_timeout, false)?;
    let progress_interval = seconds("progress_interval", progress_interval, false)?;
    config.validate().map_err(PyValueError::new_err)?;

    let run = bench::start(config).map_err(|e| PyOSError::new_err(e.to_string()))?;
    let mut next_progress = Instant::now() + progress_interval;
    loop {
        if py.detach(|| run.wait(SIGNAL_SLICE)) {
            break;
        }
        let mut result = py.check_signals();
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
                let _ = py.detach(|| run.join());
            }
            return Err(error);
        }
    }
    let report = py
        .detach(|| run.join())
        .map_err(|e| PyOSError::new_err(e.to_string()))?;
    report_dict(py, &report)
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
    d.set_item("warmup_s", c.warmup.as_secs_f64())?;
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
    d.set_item("error_samples", r.error_samples.clone())?;
    Ok(d)
}
