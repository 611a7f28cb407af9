//! Linux epoll, edge-triggered, with an eventfd to wake it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::{Event, Interest, Selector, Wake};
use crate::token::Token;

/// The epoll `data` of the eventfd; connection and listener tokens never reach
/// it (see [`Token`]).
const WAKE_TOKEN: u64 = u64::MAX;

/// Runs a libc call that returns -1 on error and sets errno.
macro_rules! syscall {
    ($call:expr) => {{
        // SAFETY: each call site passes valid fds and pointers to live memory of
        // the sizes the kernel expects; see the comment at the call site.
        let result = unsafe { $call };
        if result == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }};
}

/// An epoll instance and its events buffer.
pub struct Epoll {
    epoll: OwnedFd,
    waker: Arc<EventFd>,
    buffer: Vec<libc::epoll_event>,
}

impl Epoll {
    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // `event` lives across the call; DEL ignores it.
        syscall!(libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event))?;
        Ok(())
    }
}

/// Every socket is watched for everything, edge-triggered: a write interest
/// costs nothing when the socket stays writable (no edge, no event), and it
/// saves an `epoll_ctl` each time a send has to wait.
fn edge_flags() -> u32 {
    (libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32
}

impl Selector for Epoll {
    fn new() -> io::Result<Self> {
        let fd = syscall!(libc::epoll_create1(libc::EPOLL_CLOEXEC))?;
        // SAFETY: `epoll_create1` returned a fresh fd that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let selector = Epoll {
            epoll,
            waker: Arc::new(EventFd::new()?),
            buffer: Vec::with_capacity(1024),
        };
        selector.ctl(
            libc::EPOLL_CTL_ADD,
            selector.waker.fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            WAKE_TOKEN,
        )?;
        Ok(selector)
    }

    fn register(&self, socket: &Socket, token: Token, _interest: Interest) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            socket.as_raw_fd(),
            edge_flags(),
            token.0,
        )
    }

    /// Every socket stays registered for everything: nothing to change.
    fn set_interest(&self, _socket: &Socket, _token: Token, _interest: Interest) -> io::Result<()> {
        Ok(())
    }

    fn deregister(&self, socket: &Socket) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, socket.as_raw_fd(), 0, 0)
    }

    fn select(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        // Round up, so that a sub-millisecond timeout does not become a busy poll.
        let timeout_ms = match timeout {
            None => -1,
            Some(t) => t
                .as_nanos()
                .div_ceil(1_000_000)
                .min(libc::c_int::MAX as u128) as libc::c_int,
        };
        let capacity = self.buffer.capacity();
        let ready = match syscall!(libc::epoll_wait(
            // The kernel writes at most `capacity` events into the spare capacity.
            self.epoll.as_raw_fd(),
            self.buffer.as_mut_ptr(),
            capacity as libc::c_int,
            timeout_ms
        )) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        // SAFETY: `epoll_wait` initialised the first `ready` entries.
        unsafe { self.buffer.set_len(ready) };
        for raw in &self.buffer {
            // Copy out of the packed struct before use: no references into it.
            let (flags, data) = (raw.events, raw.u64);
            if data == WAKE_TOKEN {
                // Edge-triggered: every write to the eventfd raises a new
                // edge, so its counter need not be read back here (a syscall
                // per wake-up saved); `wake` resets it the day it is full.
                continue;
            }
            let hangup = flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            let read_fully = flags & (libc::EPOLLRDHUP | libc::EPOLLPRI) as u32 != 0;
            events.push(Event {
                token: Token(data),
                readable: hangup || read_fully || flags & libc::EPOLLIN as u32 != 0,
                writable: hangup || flags & libc::EPOLLOUT as u32 != 0,
                read_fully: hangup || read_fully,
                hangup,
            });
        }
        // A full buffer means more events may be waiting: grow for next time
        // (rare; the steady state reuses the buffer).
        if ready == capacity {
            self.buffer.reserve(capacity);
        }
        self.buffer.clear();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn pollable(&self) -> Option<i64> {
        Some(i64::from(self.epoll.as_raw_fd()))
    }
}

/// A non-blocking eventfd: writing makes the epoll instance report it.
struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    fn new() -> io::Result<EventFd> {
        let fd = syscall!(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        // SAFETY: `eventfd` returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Adds one to the counter: the epoll instance reports a new edge.
    fn add_one(&self) -> io::Result<()> {
        let one: u64 = 1;
        // Writes the 8 bytes of `one`.
        syscall!(libc::write(
            self.fd.as_raw_fd(),
            (&one as *const u64).cast(),
            8
        ))?;
        Ok(())
    }

    /// Zeroes the counter. EAGAIN (already zero) is fine.
    fn reset(&self) {
        let mut value: u64 = 0;
        // Reads 8 bytes into `value`.
        let _ = syscall!(libc::read(
            self.fd.as_raw_fd(),
            (&mut value as *mut u64).cast(),
            8
        ));
    }
}

impl Wake for EventFd {
    fn wake(&self) -> io::Result<()> {
        match self.add_one() {
            Ok(()) => Ok(()),
            // The counter would overflow (after some 2^64 wake-ups, since it
            // is never read otherwise): zero it, and add again so that this
            // wake-up still raises an edge.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.reset();
                self.add_one()
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A wait returns early when woken, however many wake-ups came before
    /// (the counter is never read back), and still when the counter is full.
    #[test]
    fn every_wake_ends_a_wait_even_with_a_full_counter() {
        let mut epoll = Epoll::new().unwrap();
        let waker = epoll.waker();
        let mut events = Vec::new();
        let woken_quickly = |epoll: &mut Epoll, events: &mut Vec<Event>| {
            let started = Instant::now();
            epoll.select(events, Some(Duration::from_secs(5))).unwrap();
            started.elapsed() < Duration::from_secs(1)
        };
        for _ in 0..3 {
            waker.wake().unwrap();
            assert!(woken_quickly(&mut epoll, &mut events));
        }
        // Fill the counter to its largest value: the next write would block.
        epoll.waker.reset();
        let full: u64 = u64::MAX - 1;
        // Writes the 8 bytes of `full`.
        syscall!(libc::write(
            epoll.waker.fd.as_raw_fd(),
            (&full as *const u64).cast(),
            8
        ))
        .unwrap();
        assert!(woken_quickly(&mut epoll, &mut events));
        waker.wake().unwrap();
        assert!(woken_quickly(&mut epoll, &mut events));
    }
}
