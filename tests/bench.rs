//! The load generator (`rsepoll::bench`) against small blocking servers:
//! every mode runs clean against an echo server, and a wrong server, a
//! closed port or a server that goes away are counted or reported, within
//! the run's time.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use _rsepoll::bench::message::{Framing, Verify};
use _rsepoll::bench::{self, Config, Mode, Steady};

/// What a test server does with each read.
#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    /// Echoes, flipping the first byte of every read.
    Corrupt,
    /// Echoes once, then closes.
    CloseAfterOne,
    /// Sends each read back reversed (`python -m rsepoll --framing raw`).
    Reverse,
}

/// A thread-per-connection server on a free loopback port; runs until the
/// test process ends.
fn server(behaviour: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    match behaviour {
                        Behaviour::Corrupt => buf[0] ^= 0xff,
                        Behaviour::Reverse => buf[..n].reverse(),
                        Behaviour::Echo | Behaviour::CloseAfterOne => {}
                    }
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    if let Behaviour::CloseAfterOne = behaviour {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(addr: SocketAddr, mode: Mode) -> Config {
    let mut config = Config::new(addr, mode);
    config.connections = 4;
    config.size = 256;
    config.threads = 2;
    config.duration = Duration::from_millis(400);
    config
}

#[test]
fn every_mode_runs_clean_against_an_echo_server() {
    let addr = server(Behaviour::Echo);
    for mode in [Mode::Rr, Mode::Stream, Mode::Idle] {
        for framing in [Framing::Raw, Framing::Line, Framing::Length] {
            let mut config = config(addr, mode);
            config.framing = framing;
            let began = Instant::now();
            let report = bench::run(config).unwrap();
            let took = began.elapsed();
            let label = format!("{mode:?}/{framing:?}");
            assert_eq!(report.errors, 0, "{label}: {:?}", report.error_samples);
            assert_eq!(report.stalled, 0, "{label}: {:?}", report.error_samples);
            assert_eq!((report.connected, report.held), (4, 4), "{label}");
            assert!(report.requests > 0, "{label}");
            assert!(report.latency.count() > 0, "{label}");
            assert!(
                report.percentile_us(50.0) <= report.percentile_us(99.9),
                "{label}"
            );
            assert!(
                (0.35..0.5).contains(&report.seconds),
                "{label}: {}",
                report.seconds
            );
            assert!(took < Duration::from_secs(2), "{label}: took {took:?}");
            if mode == Mode::Rr {
                // One in flight per connection: every reply is a whole request.
                assert_eq!(report.bytes_in, report.requests * 256, "{label}");
                assert_eq!(report.latency.count(), report.requests, "{label}");
            }
            if mode == Mode::Idle {
                assert_eq!(report.requests, 8, "{label}: two checks of 4");
            }
        }
    }
}

#[test]
fn a_wrong_verify_or_a_corrupting_server_counts_errors() {
    let echo = server(Behaviour::Echo);
    let mut reverse = config(echo, Mode::Rr);
    reverse.verify = Verify::Reverse;
    let report = bench::run(reverse).unwrap();
    assert_eq!(report.errors, 4, "{:?}", report.error_samples);
    assert_eq!(report.wrong_first_replies, 4);
    assert_eq!(report.held, 0);
    assert!(
        report.error_samples[0].contains("payload reversed"),
        "{:?}",
        report.error_samples
    );

    let corrupt = server(Behaviour::Corrupt);
    for mode in [Mode::Rr, Mode::Stream, Mode::Idle] {
        let report = bench::run(config(corrupt, mode)).unwrap();
        assert_eq!(report.errors, 4, "{mode:?}: {:?}", report.error_samples);
        // Nothing is checked with --verify none but the length.
        let mut lenient = config(corrupt, mode);
        lenient.verify = Verify::None;
        let report = bench::run(lenient).unwrap();
        assert_eq!(report.errors, 0, "{mode:?}: {:?}", report.error_samples);
    }
}

#[test]
fn a_server_that_does_not_echo_fails_every_first_reply_and_the_run_ends_early() {
    let reverse = server(Behaviour::Reverse);
    for mode in [Mode::Rr, Mode::Stream, Mode::Idle] {
        let mut config = config(reverse, mode);
        config.duration = Duration::from_secs(5);
        let began = Instant::now();
        let report = bench::run(config).unwrap();
        assert!(began.elapsed() < Duration::from_secs(2), "{mode:?}");
        assert_eq!(
            (report.errors, report.wrong_first_replies),
            (4, 4),
            "{mode:?}: {:?}",
            report.error_samples
        );
        // The measured time is what passed, not the duration asked for.
        assert!(report.seconds < 2.0, "{mode:?}: {}", report.seconds);
    }
    // Right first replies, then a close: not a wrong first reply.
    let closes = server(Behaviour::CloseAfterOne);
    let report = bench::run(config(closes, Mode::Rr)).unwrap();
    assert_eq!((report.errors, report.wrong_first_replies), (4, 0));
}

#[test]
fn a_server_that_closes_counts_errors() {
    let addr = server(Behaviour::CloseAfterOne);
    for mode in [Mode::Rr, Mode::Stream] {
        let report = bench::run(config(addr, mode)).unwrap();
        assert_eq!(report.errors, 4, "{mode:?}: {:?}", report.error_samples);
        assert!(report.error_samples.iter().all(|s| s.contains("closed")
            || s.contains("reset")
            || s.contains("write:")
            || s.contains("read:")));
    }
    // Idle: the first check passes, then the close is seen while idle.
    let report = bench::run(config(addr, Mode::Idle)).unwrap();
    assert_eq!(report.errors, 4, "{:?}", report.error_samples);
    assert_eq!(report.requests, 4);
    assert!(report.error_samples[0].contains("while it was idle"));
}

#[test]
fn a_refused_port_fails_fast_with_the_reason() {
    // A port that was just free: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let began = Instant::now();
    let error = bench::run(config(addr, Mode::Rr)).unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(2));
    assert_eq!(error.kind(), ErrorKind::NotConnected);
    let text = error.to_string();
    assert!(text.contains(&format!("connect to {addr}")), "{text}");
}

#[test]
fn a_server_that_never_answers_stalls_without_hanging() {
    // Accepts (the backlog does) but never reads.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let began = Instant::now();
    let mut config = config(addr, Mode::Rr);
    config.duration = Duration::from_millis(1200);
    let report = bench::run(config).unwrap();
    assert!(began.elapsed() < Duration::from_secs(3));
    assert_eq!((report.requests, report.stalled), (0, 4));
    drop(listener);
}

#[test]
fn bad_configs_are_refused() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut c = config(addr, Mode::Rr);
    c.connections = 0;
    assert!(c.validate().unwrap_err().contains("--connections"));
    let mut c = config(addr, Mode::Rr);
    c.framing = Framing::Length;
    c.size = 4;
    assert!(c.validate().unwrap_err().contains("--size"));
    let mut c = config(addr, Mode::Stream);
    c.verify = Verify::Reverse;
    assert!(c.validate().unwrap_err().contains("--framing"));
    assert_eq!(
        bench::start(c).err().map(|e| e.kind()),
        Some(ErrorKind::InvalidInput)
    );
}

#[test]
fn stop_ends_a_run_early() {
    let addr = server(Behaviour::Echo);
    let mut config = config(addr, Mode::Rr);
    config.duration = Duration::from_secs(30);
    let run = bench::start(config).unwrap();
    assert!(!run.wait(Duration::from_millis(300)));
    let progress = run.progress();
    assert!(progress.requests > 0, "{progress:?}");
    let began = Instant::now();
    run.stop();
    assert!(run.wait(Duration::from_secs(2)));
    let report = run.join().unwrap();
    assert!(began.elapsed() < Duration::from_secs(1));
    assert!(report.seconds < 1.0 && report.requests > 0);
}

#[test]
fn the_window_is_known_before_it_starts_and_is_what_the_report_measures() {
    let addr = server(Behaviour::Echo);
    let mut config = config(addr, Mode::Rr);
    config.warmup = Duration::from_millis(300);
    let began = Instant::now();
    let run = bench::start(config).unwrap();
    let (start, end) = run
        .window(Duration::from_secs(5))
        .expect("fixed once every worker has connected");
    // Four loopback connections take far less than the warmup: a caller
    // learns the start before it comes, so it can be there on time.
    assert!(Instant::now() < start);
    assert!(start >= began + Duration::from_millis(300));
    assert_eq!(end - start, Duration::from_millis(400));
    assert!(run.wait(Duration::from_secs(3)));
    let report = run.join().unwrap();
    assert_eq!(report.seconds, (end - start).as_secs_f64());
}

#[test]
fn the_window_is_fixed_even_when_nothing_connects() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let run = bench::start(config(addr, Mode::Idle)).unwrap();
    assert!(run.window(Duration::from_secs(5)).is_some());
    assert!(run.wait(Duration::from_secs(5)));
    assert!(run.join().is_err());
}

/// A steady warm-up that samples every 50 ms and wants 3 samples within
/// `tolerance`, for at most `max`.
fn steady(max: Duration, tolerance: f64) -> Steady {
    Steady {
        max,
        tolerance,
        window: Duration::from_millis(50),
        windows: 3,
    }
}

#[test]
fn a_steady_warmup_fixes_the_window_once_the_rate_settles() {
    let addr = server(Behaviour::Echo);
    for mode in [Mode::Rr, Mode::Stream] {
        let mut config = config(addr, mode);
        config.warmup = Duration::from_millis(100);
        // Loose enough for a loaded machine: the test is of the mechanism.
        config.steady = Some(steady(Duration::from_secs(3), 1.0));
        let run = bench::start(config).unwrap();
        // Not fixed before three samples, 150 ms after every connection is up.
        assert_eq!(run.window(Duration::ZERO), None, "{mode:?}");
        let (start, end) = run.window(Duration::from_secs(5)).expect("fixed");
        // Learnt the moment it starts (give or take scheduling).
        assert!(
            Instant::now() < start + Duration::from_millis(200),
            "{mode:?}"
        );
        assert_eq!(end - start, Duration::from_millis(400));
        assert!(run.wait(Duration::from_secs(3)), "{mode:?}");
        let report = run.join().unwrap();
        assert_eq!(
            report.errors + report.stalled,
            0,
            "{:?}",
            report.error_samples
        );
        assert_eq!(
            report.steady,
            Some(true),
            "{mode:?}: {:?}",
            report.warmup_rates
        );
        assert!(report.warmup_rates.len() >= 3, "{mode:?}");
        assert!(report.warmup_rates.iter().all(|&r| r > 0.0), "{mode:?}");
        assert!(
            (0.15..3.0).contains(&report.warmup_seconds),
            "{mode:?}: {}",
            report.warmup_seconds
        );
        assert_eq!(report.seconds, 0.4, "{mode:?}");
        assert!(report.requests > 0, "{mode:?}");
    }
}

#[test]
fn a_steady_warmup_that_never_settles_ends_at_its_maximum() {
    // Accepts (the backlog does) but never answers: every rate is zero,
    // which is never steady.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(listener.local_addr().unwrap(), Mode::Rr);
    config.steady = Some(steady(Duration::from_millis(500), 0.05));
    config.duration = Duration::from_millis(200);
    let began = Instant::now();
    let report = bench::run(config).unwrap();
    assert!(began.elapsed() < Duration::from_secs(3));
    assert_eq!(report.steady, Some(false));
    assert!(
        (0.5..1.0).contains(&report.warmup_seconds),
        "{}",
        report.warmup_seconds
    );
    assert!(report.warmup_rates.iter().all(|&r| r == 0.0));
    assert_eq!((report.requests, report.errors), (0, 0));
    drop(listener);
}

#[test]
fn a_run_stopped_during_a_steady_warmup_ends_with_its_window_fixed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(listener.local_addr().unwrap(), Mode::Rr);
    config.steady = Some(steady(Duration::from_secs(30), 0.05));
    let run = bench::start(config).unwrap();
    assert!(!run.wait(Duration::from_millis(300)));
    run.stop();
    assert!(run.wait(Duration::from_secs(2)));
    assert!(run.window(Duration::ZERO).is_some());
    let report = run.join().unwrap();
    assert_eq!((report.steady, report.seconds), (Some(false), 0.0));
}

#[test]
fn a_fixed_warmup_reports_its_length_and_no_steadiness() {
    let addr = server(Behaviour::Echo);
    let mut fixed = config(addr, Mode::Rr);
    fixed.warmup = Duration::from_millis(200);
    let report = bench::run(fixed).unwrap();
    assert_eq!(report.warmup_seconds, 0.2);
    assert_eq!(report.steady, None);
    assert!(report.warmup_rates.is_empty());
    // Idle mode has no warm-up, steady or not.
    let mut idle = config(addr, Mode::Idle);
    idle.warmup = Duration::from_millis(200);
    idle.steady = Some(steady(Duration::from_secs(1), 0.05));
    let report = bench::run(idle).unwrap();
    assert_eq!((report.warmup_seconds, report.steady), (0.0, None));
}
