//! The I/O thread must not spin on a connection it has nothing to do for. Its
//! own test binary, and its tests take turns ([`one_at_a_time`]): one server
//! at a time, so the one `rsepoll-io` thread of the process is the one
//! measured.
#![cfg(not(loom))]

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use _rsepoll::close_reason::CloseReason;
use _rsepoll::message::DeliveryKind;
use _rsepoll::server::Config;
use socket2::Socket;

mod common;
use common::{backends, connect, next_delivery, start};

/// Serialises the tests of this binary, which the harness runs in parallel.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// CPU time (user + system) of this process's `rsepoll-io` thread.
#[cfg(target_os = "linux")]
fn io_cpu() -> Duration {
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = entry.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim() == "rsepoll-io" {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
                .split_whitespace()
                .collect();
            let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            // SAFETY: sysconf has no preconditions.
            let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
            return Duration::from_millis(ticks * 1000 / per_second);
        }
    }
    panic!("no rsepoll-io thread")
}

/// CPU time (user + system) of the whole process: threads cannot be told apart
/// by name here, and the test thread only sleeps while it is measured.
#[cfg(windows)]
fn io_cpu() -> Duration {
    #[repr(C)]
    #[derive(Default)]
    struct FileTime {
        low: u32,
        high: u32,
    }
    #[link(name = "kernel32")]
    extern "system" {
        fn GetCurrentProcess() -> *mut std::ffi::c_void;
        fn GetProcessTimes(
            process: *mut std::ffi::c_void,
            creation: *mut FileTime,
            exit: *mut FileTime,
            kernel: *mut FileTime,
            user: *mut FileTime,
        ) -> i32;
    }
    let [mut creation, mut exit, mut kernel, mut user] = Default::default();
    // SAFETY: the pseudo-handle of the current process is always valid, and
    // each pointer is to a live, writable FILETIME-layout struct.
    let ok = unsafe {
        GetProcessTimes(
            GetCurrentProcess(),
            &mut creation,
            &mut exit,
            &mut kernel,
            &mut user,
        )
    };
    assert_ne!(
        ok,
        0,
        "GetProcessTimes: {}",
        std::io::Error::last_os_error()
    );
    let hundred_ns = |t: FileTime| (u64::from(t.high) << 32) | u64::from(t.low);
    Duration::from_nanos((hundred_ns(kernel) + hundred_ns(user)) * 100)
}

/// CPU time (user + system) of the whole process, as on Windows.
#[cfg(all(unix, not(target_os = "linux")))]
fn io_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// CPU the I/O thread uses in half a second; a spinning thread uses ~500 ms.
fn cpu_in_half_a_second() -> Duration {
    let before = io_cpu();
    std::thread::sleep(Duration::from_millis(500));
    io_cpu() - before
}

/// The most an idle I/O thread may use in half a second.
const IDLE_CPU: Duration = Duration::from_millis(50);

fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
}

#[test]
fn no_spin_on_a_reset_connection_that_wants_nothing() {
    let _turn = one_at_a_time();
    for backend in backends() {
        // 1. The peer sent EOF, the application has not closed yet, the peer resets.
        let config = Config {
            backend,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (kind, key) = next_delivery(&mut running);
        assert_eq!(kind, DeliveryKind::Opened);
        client.write_all(b"hi").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Data);
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Eof);
        reset(client);
        let cpu = cpu_in_half_a_second();
        assert!(
            cpu <= IDLE_CPU,
            "{backend:?}: EOF then reset: {cpu:?} of CPU in 0.5 s"
        );
        // The reset is noticed without the application sending anything.
        assert_eq!(
            next_delivery(&mut running),
            (DeliveryKind::Closed(CloseReason::Reset), key)
        );
        running.join(); // stops the server, discarding deliveries

        // 2. A connection parked on a full delivery ring, and the peer resets.
        let config = Config {
            backend,
            ring_slots: 2,
            slot_size: 256,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Opened);
        client.write_all(&[1u8; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        reset(client);
        let cpu = cpu_in_half_a_second();
        assert!(
            cpu <= IDLE_CPU,
            "{backend:?}: full ring then reset: {cpu:?} of CPU in 0.5 s"
        );
        running.join(); // stops the server, discarding deliveries
    }
}

/// The bytes of the `Data` deliveries that arrive within 10 s, up to `expected`.
fn receive(running: &mut _rsepoll::server::Running, expected: usize) -> Vec<u8> {
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.len() < expected && Instant::now() < deadline {
        while let Some(data) = running.take_with(|d| match d.kind {
            DeliveryKind::Data => d.data().to_vec(),
            _ => Vec::new(),
        }) {
            received.extend_from_slice(&data);
        }
        running.release();
        running.wait(Duration::from_millis(10));
    }
    received
}

/// Urgent (out-of-band) data: a poller may report it until it is read with
/// `MSG_OOB` (Windows' AFD does), which would spin a one-shot loop. The bytes
/// around it must all arrive, and the I/O thread must go idle afterwards.
#[test]
fn no_spin_on_urgent_data() {
    let _turn = one_at_a_time();
    for backend in backends() {
        let config = Config {
            backend,
            ..Config::default()
        };
        let (mut running, port) = start(&config);
        let client = Socket::from(connect(port));
        assert_eq!(next_delivery(&mut running).0, DeliveryKind::Opened);
        client.send(b"abc").unwrap();
        client.send_out_of_band(b"!").unwrap();
        client.send(b"def").unwrap();
        // The urgent byte is not part of the stream.
        assert_eq!(receive(&mut running, 6), b"abcdef", "{backend:?}");
        let cpu = cpu_in_half_a_second();
        assert!(
            cpu <= IDLE_CPU,
            "{backend:?}: urgent data: {cpu:?} of CPU in 0.5 s"
        );
        // The connection still reads what comes next.
        client.send(b"ghi").unwrap();
        assert_eq!(receive(&mut running, 3), b"ghi", "{backend:?}");
        running.join(); // stops the server, discarding deliveries
    }
}
