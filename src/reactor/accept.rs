//! Accepting: the listeners (on the first engine only), the limits
//! (`max_connections`, running out of descriptors), dealing accepted
//! connections to the engines in turn, and opening a connection here.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::close_reason::CloseReason;
use crate::message::{DeliveryKind, Opened};
use crate::shared::Shared;
use crate::sys::{net, Selector};
use crate::token::{ConnKey, Token};

use super::{Core, READABLE};

/// Connections accepted from one listener per turn.
const ACCEPT_BUDGET: usize = 128;
/// After an accept failure such as EMFILE, how long before trying again. Under
/// edge triggering the listener would otherwise never be reported again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A listening socket and what the loop owes it.
struct Listener {
    socket: Socket,
    /// Connections may be waiting: the last accept stopped before `EAGAIN`.
    pending: bool,
    /// Accepting failed for lack of resources; try again at this time.
    retry_at: Option<Instant>,
}

/// Lets a report through at most once a second.
#[derive(Default)]
struct Throttle {
    /// When a report last went through.
    last: Option<Instant>,
}

impl Throttle {
    /// True if a report may go out `now`, which then counts as the last.
    fn allows(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// What accepting needs (the first engine's listeners; every engine's
/// hand-over list), owned here: the rest of the loop asks through methods.
pub(super) struct Acceptor {
    listeners: Vec<Listener>,
    /// Every engine of the server, this one included: the one with the
    /// listeners hands accepted connections to each in turn.
    engines: Arc<[Arc<Shared>]>,
    /// The engine the next accepted connection goes to.
    next_engine: usize,
    /// Connections handed to this engine, being opened (a buffer kept).
    arrivals: Vec<Socket>,
    /// Connections beyond this many are turned away.
    max_connections: usize,
    /// Turned away since the last report.
    unreported_rejections: u64,
    rejections: Throttle,
    accept_errors: Throttle,
    /// A file descriptor kept in reserve: when accepting fails for lack of
    /// descriptors, closing it lets the loop accept the queued clients and
    /// close them at once, instead of leaving them waiting.
    reserve: Option<net::ReserveFd>,
}

impl Acceptor {
    /// Registers `listeners` with `selector`; the engine with listeners
    /// also keeps a descriptor in reserve.
    pub(super) fn new(
        listeners: Vec<Socket>,
        selector: &impl Selector,
        engines: Arc<[Arc<Shared>]>,
        max_connections: usize,
    ) -> io::Result<Acceptor> {
        let mut registered = Vec::with_capacity(listeners.len());
        for (index, socket) in listeners.into_iter().enumerate() {
            socket.set_nonblocking(true)?;
            selector.register(&socket, Token::listener(index), READABLE)?;
            registered.push(Listener {
                socket,
                // Connections may have queued before registration.
                pending: true,
                retry_at: None,
            });
        }
        let reserve = if registered.is_empty() {
            None
        } else {
            net::ReserveFd::open()
        };
        Ok(Acceptor {
            listeners: registered,
            engines,
            next_engine: 0,
            arrivals: Vec::new(),
            max_connections,
            unreported_rejections: 0,
            rejections: Throttle::default(),
            accept_errors: Throttle::default(),
            reserve,
        })
    }

    /// True if the poller's report for listener `index` is to be acted on:
    /// it is open and not waiting out an accept failure.
    pub(super) fn may_accept(&self, index: usize) -> bool {
        self.listeners
            .get(index)
            .is_some_and(|listener| listener.retry_at.is_none())
    }

    /// True if a listener may have connections waiting that no new report
    /// will announce.
    pub(super) fn has_pending(&self) -> bool {
        self.listeners.iter().any(|listener| listener.pending)
    }

    /// When the next accept failure has been waited out, if one is.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.listeners.iter().filter_map(|l| l.retry_at).min()
    }
}

impl<S: Selector> Core<S> {
    /// Accepts from the listeners that have connections waiting, and from
    /// those whose accept failure has been waited out by `now`.
    pub(super) fn accept_pending(&mut self, now: Instant) {
        for index in 0..self.acceptor.listeners.len() {
            let listener = &mut self.acceptor.listeners[index];
            if listener.retry_at.is_some_and(|at| at <= now) {
                listener.retry_at = None;
                listener.pending = true;
            }
            if self.acceptor.listeners[index].pending {
                self.accept_from(index);
            }
        }
    }

    /// Closes the listeners (and lets the reserve descriptor go): new
    /// connections are refused from here on. The first engine, the one that
    /// accepts, then tells the others that nothing more will be handed over.
    pub(super) fn close_listeners(&mut self) {
        for listener in self.acceptor.listeners.drain(..) {
            let _ = self.selector.deregister(&listener.socket);
        }
        self.acceptor.reserve = None;
        if self.shared.engine == 0 {
            // After the last hand-over, which this thread made.
            self.shared.hub.end_accepting();
        }
    }

    pub(super) fn accept_from(&mut self, index: usize) {
        for _ in 0..ACCEPT_BUDGET {
            // An accepted connection needs a slot for its `Opened`.
            if !self.outbox.has_slot() {
                self.acceptor.listeners[index].pending = true;
                return;
            }
            match net::accept(&self.acceptor.listeners[index].socket) {
                Ok(socket)
                    if self.shared.hub.open.load(Relaxed) >= self.acceptor.max_connections =>
                {
                    drop(socket);
                    self.reject(CloseReason::Limit);
                }
                Ok(socket) => self.hand_out(socket),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.acceptor.listeners[index].pending = false;
                    return self.rearm_listener(index);
                }
                Err(e) if net::is_transient_accept_error(&e) => {}
                Err(e) => {
                    // EMFILE and friends: the clients stay queued in the kernel.
                    // Turn them away now with the reserve descriptor, and retry
                    // later rather than spin.
                    if net::is_out_of_descriptors(&e) {
                        self.turn_away_queued(index);
                    }
                    let listener = &mut self.acceptor.listeners[index];
                    listener.pending = false;
                    listener.retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    self.report_accept_error(e);
                    return;
                }
            }
        }
        self.acceptor.listeners[index].pending = true;
    }

    /// Out of descriptors: frees the reserve one, accepts and closes the
    /// clients queued on listener `index` (so they hear at once instead of
    /// waiting), then takes the reserve again.
    pub(super) fn turn_away_queued(&mut self, index: usize) {
        if self.acceptor.reserve.take().is_none() {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            match net::accept(&self.acceptor.listeners[index].socket) {
                Ok(socket) => {
                    drop(socket);
                    self.counters.rejected(CloseReason::Limit);
                }
                Err(e) if net::is_transient_accept_error(&e) => {}
                Err(_) => break,
            }
        }
        self.acceptor.reserve = net::ReserveFd::open();
    }

    /// Counts a connection turned away at `max_connections`, and reports
    /// the count at most once a second.
    pub(super) fn reject(&mut self, reason: CloseReason) {
        self.counters.rejected(reason);
        self.acceptor.unreported_rejections += 1;
        if !self.acceptor.rejections.allows(Instant::now()) {
            return;
        }
        let detail = format!(
            "max_connections ({}) reached: turned away {} connection(s)",
            self.acceptor.max_connections, self.acceptor.unreported_rejections
        );
        self.acceptor.unreported_rejections = 0;
        self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
    }

    pub(super) fn rearm_listener(&mut self, index: usize) {
        let listener = &self.acceptor.listeners[index];
        let _ = self
            .selector
            .set_interest(&listener.socket, Token::listener(index), READABLE);
    }

    /// Reports a failed accept, at most once a second.
    pub(super) fn report_accept_error(&mut self, error: io::Error) {
        if !self.acceptor.accept_errors.allows(Instant::now()) {
            return;
        }
        let detail = format!("accepting a connection failed: {error}");
        self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
    }

    /// Gives an accepted connection to the engines in turn: opens it here,
    /// or hands it to another engine. Round-robin keeps the engines' shares
    /// equal whatever the kernel's accept order, on every platform, with a
    /// lock taken per connection, never per message.
    pub(super) fn hand_out(&mut self, socket: Socket) {
        self.shared.hub.open.fetch_add(1, Relaxed);
        let target = self.acceptor.next_engine;
        self.acceptor.next_engine = (target + 1) % self.acceptor.engines.len();
        if target == usize::from(self.shared.engine) {
            self.open(socket);
        } else if let Err(socket) = self.acceptor.engines[target].hand_over(socket) {
            // That engine's loop has ended (it failed, or finished a stop
            // this one has not seen yet): serve it here.
            self.open(socket);
        }
    }

    /// Opens the connections other engines handed to this one; while
    /// draining, closes them instead (the application never heard of them).
    /// A stop that keeps the connections opens them: they were accepted
    /// before it, as those the accepting engine opened itself.
    pub(super) fn open_arrivals(&mut self) {
        let mut arrivals = std::mem::take(&mut self.acceptor.arrivals);
        self.shared.take_arrivals(&mut arrivals);
        for socket in arrivals.drain(..) {
            if self.reading() {
                self.open(socket);
            } else {
                self.shared.hub.open.fetch_sub(1, Relaxed);
                self.counters.rejected(CloseReason::Shutdown);
            }
        }
        self.acceptor.arrivals = arrivals;
    }

    /// Refuses hand-overs from now on, and deals the connections handed to
    /// this engine and not opened yet to the other engines: a failing engine
    /// would only close them, while the others may serve them. A connection
    /// no engine takes (they have all ended) is closed.
    pub(super) fn pass_on_arrivals(&mut self) {
        for socket in self.shared.arrivals.close() {
            let mut socket = Some(socket);
            for engine in self.acceptor.engines.iter() {
                if engine.engine == self.shared.engine {
                    continue;
                }
                let Some(unserved) = socket.take() else {
                    break;
                };
                match engine.hand_over(unserved) {
                    Ok(()) => break,
                    Err(back) => socket = Some(back),
                }
            }
            if socket.is_some() {
                self.shared.hub.open.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Starts serving `socket`, counted in `hub.open` already.
    pub(super) fn open(&mut self, socket: Socket) {
        let fd = net::raw_handle(&socket);
        let peer = net::peer_addr(&socket);
        let local = net::local_addr(&socket);
        let id = self.shared.hub.next_id();
        let decoder = self.settings.decoder();
        let key = self.table.insert(socket, id, decoder, self.now);
        self.deadlines.opened(key, self.now);
        let conn = self.table.get_mut(key).expect("just inserted");
        let opened = Opened {
            fd,
            peer,
            local,
            pending: conn.pending().clone(),
        };
        let token = Token::connection(key.index, key.id);
        if let Err(e) = self.selector.register(conn.socket(), token, READABLE) {
            self.table.remove(key);
            self.shared.hub.open.fetch_sub(1, Relaxed);
            let detail = format!("watching an accepted connection failed: {e}");
            self.emit(DeliveryKind::Error, ConnKey::default(), None, Some(detail));
            return;
        }
        self.emit(DeliveryKind::Opened, key, Some(opened), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_report_through_a_second() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert!(throttle.allows(start));
        assert!(!throttle.allows(start + Duration::from_millis(999)));
        assert!(throttle.allows(start + Duration::from_secs(1)));
        assert!(!throttle.allows(start + Duration::from_millis(1500)));
    }
}
