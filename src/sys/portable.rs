//! The fallback backend: the `polling` crate in one-shot mode.
//!
//! `polling` uses kqueue on macOS and the BSDs, IOCP with the AFD poll driver on
//! Windows (what wepoll does, in Rust) and epoll elsewhere. Its portable
//! denominator is one-shot interest, so every event disarms its socket, and
//! [`Selector::set_interest`], which the reactor calls once it has handled the
//! event, re-arms it with what the socket wants now.

use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::{Event, Interest, Selector, Wake};
use crate::token::Token;

// Tokens are 64-bit; `polling` keys are `usize`.
const _: () = assert!(usize::BITS >= 64, "the portable backend needs 64-bit keys");

/// A `polling::Poller` and its events buffer.
pub struct Portable {
    poller: Arc<polling::Poller>,
    events: polling::Events,
}

/// Hangups are watched where asked (on epoll, IOCP/AFD and poll; kqueue has
/// no such filter), so that a connection that reads no more still hears of a
/// reset.
fn to_polling(token: Token, interest: Interest) -> polling::Event {
    let mut event = polling::Event::new(token.0 as usize, interest.readable, interest.writable);
    event.set_interrupt(interest.hangup);
    event
}

impl Selector for Portable {
    fn new() -> io::Result<Self> {
        Ok(Portable {
            poller: Arc::new(polling::Poller::new()?),
            events: polling::Events::with_capacity(NonZeroUsize::new(1024).expect("nonzero")),
        })
    }

    fn register(&self, socket: &Socket, token: Token, interest: Interest) -> io::Result<()> {
        // SAFETY: the reactor deregisters every socket before it drops (closes)
        // it, which is the contract `Poller::add` asks for.
        unsafe { self.poller.add(socket, to_polling(token, interest)) }
    }

    /// Re-arms the one-shot registration. A socket that wants nothing at
    /// all, not even hangups, stays disarmed: whatever next wants it re-arms it.
    fn set_interest(&self, socket: &Socket, token: Token, interest: Interest) -> io::Result<()> {
        if !interest.readable && !interest.writable && !interest.hangup {
            return Ok(());
        }
        self.poller.modify(socket, to_polling(token, interest))
    }

    fn deregister(&self, socket: &Socket) -> io::Result<()> {
        self.poller.delete(socket)
    }

    fn select(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        events.clear();
        self.events.clear();
        match self.poller.wait(&mut self.events, timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in self.events.iter() {
            let failed = event.is_err().unwrap_or(false) || event.is_interrupt();
            // Urgent data splits the stream at its mark (a short read), and on
            // Windows its byte is dropped only once in-band reading would block
            // (`net::recv`): read on to EAGAIN. A peer's shutdown is not
            // reported portably; one-shot re-arming re-checks readiness, so
            // whatever a short read left behind is reported again.
            let urgent = event.is_priority();
            events.push(Event {
                token: Token(event.key as u64),
                readable: event.readable || failed || urgent,
                writable: event.writable || failed,
                read_fully: failed || urgent,
                hangup: failed,
            });
        }
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(PollerWaker(Arc::clone(&self.poller)))
    }

    #[cfg(unix)]
    fn pollable(&self) -> Option<i64> {
        use std::os::fd::AsRawFd;
        Some(i64::from(self.poller.as_raw_fd()))
    }

    /// An I/O completion port is not a descriptor a loop can watch.
    #[cfg(not(unix))]
    fn pollable(&self) -> Option<i64> {
        None
    }
}

struct PollerWaker(Arc<polling::Poller>);

impl Wake for PollerWaker {
    fn wake(&self) -> io::Result<()> {
        self.0.notify()
    }
}
