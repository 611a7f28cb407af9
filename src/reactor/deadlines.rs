//! Per-connection deadlines: the idle and message timeouts, and the reset of
//! a close that makes no progress. Entries are checked against the
//! connection's real state when they fire (see [`crate::timer`]). Also the
//! lingering connections, whose deadline is constant.
//!
//! [`Deadlines`] owns the timer heap and the timeouts; [`Deadlines::expire`]
//! finds the connections whose deadline passed, and the reactor acts on the
//! list it returns.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::close_reason::CloseReason;
use crate::config::Config;
use crate::conn::{ConnectionTable, Input};
use crate::framing::Framing;
use crate::sys::Selector;
use crate::timer::Timers;
use crate::token::ConnKey;

use super::Core;

/// How long a close this thread started may go without progress before it
/// becomes a reset.
const CLOSE_PROGRESS: Duration = Duration::from_secs(5);

/// The kinds of per-connection deadline. A connection has at most one
/// timer entry of each kind pending (see [`Deadlines`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Deadline {
    /// No bytes either way for `idle_timeout`.
    Idle,
    /// A message started and not finished within `message_timeout`.
    Message,
    /// A close this thread started (a timeout) made no progress for
    /// `CLOSE_PROGRESS`: the peer takes nothing, so the close becomes a reset.
    Drain,
}

impl Deadline {
    /// How many kinds there are: the most entries one connection has pending.
    const KINDS: usize = 3;
}

/// Every per-connection deadline of one loop.
pub(super) struct Deadlines {
    /// Per-connection deadlines, at most one live entry per connection and
    /// kind; whether a deadline really passed is checked when its entry
    /// fires, and the entries of closed connections are compacted away
    /// (see [`Deadlines::compact`]).
    timers: Timers<(ConnKey, Deadline)>,
    /// Connections whose deadline passed, found by the last expiry (kept to
    /// reuse its allocation).
    expired: Vec<(ConnKey, Deadline, CloseReason)>,
    idle_timeout: Option<Duration>,
    /// `None` in raw mode, where there are no messages.
    message_timeout: Option<Duration>,
    /// Lingering connections in deadline order (the linger time is constant);
    /// entries of those that stopped lingering early stay until their
    /// deadline ...
    lingering: VecDeque<(Instant, ConnKey)>,
    /// ... so the connections lingering now are counted apart.
    lingering_now: usize,
}

impl Deadlines {
    /// The deadlines of a loop configured by `config`.
    pub(super) fn new(config: &Config) -> Deadlines {
        Deadlines {
            timers: Timers::with_capacity(1024),
            expired: Vec::with_capacity(64),
            idle_timeout: config.idle_timeout,
            message_timeout: config
                .message_timeout
                .filter(|_| config.framing != Framing::Raw),
            lingering: VecDeque::with_capacity(64),
            lingering_now: 0,
        }
    }

    /// Arms the idle deadline of `key`, opened `now`.
    pub(super) fn opened(&mut self, key: ConnKey, now: Instant) {
        if let Some(idle) = self.idle_timeout {
            self.timers.schedule((key, Deadline::Idle), now + idle);
        }
    }

    /// The message timeout, if messages have one.
    #[inline]
    pub(super) fn message_timeout(&self) -> Option<Duration> {
        self.message_timeout
    }

    /// Schedules `key`'s deadline of kind `deadline` at `at`.
    pub(super) fn schedule(&mut self, key: ConnKey, deadline: Deadline, at: Instant) {
        self.timers.schedule((key, deadline), at);
    }

    /// `key` lingers until `deadline`, later than any lingering before it.
    pub(super) fn linger(&mut self, key: ConnKey, deadline: Instant) {
        self.lingering.push_back((deadline, key));
        self.lingering_now += 1;
    }

    /// A lingering connection has gone (its peer's EOF, its deadline, or a
    /// stop let it go).
    pub(super) fn stopped_lingering(&mut self) {
        self.lingering_now -= 1;
    }

    /// How many connections linger now: closed as far as the application
    /// knows, still in the table.
    pub(super) fn lingering_now(&self) -> usize {
        self.lingering_now
    }

    /// The next lingering connection whose deadline is not after `now`,
    /// with that deadline; it lingers no more.
    pub(super) fn lingered(&mut self, now: Instant) -> Option<(Instant, ConnKey)> {
        let &(deadline, key) = self.lingering.front()?;
        if deadline > now {
            return None;
        }
        self.lingering.pop_front();
        Some((deadline, key))
    }

    /// Forgets the lingering connections (the loop has ended).
    pub(super) fn clear_lingering(&mut self) {
        self.lingering.clear();
        self.lingering_now = 0;
    }

    /// The earliest deadline, lingering or timer.
    pub(super) fn next(&self) -> Option<Instant> {
        let lingering = self.lingering.front().map(|&(deadline, _)| deadline);
        match (lingering, self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The connections of `table` whose idle or message deadline has passed
    /// at `now`, or whose close made no progress, with the reason each is
    /// closed for; entries whose deadline moved later are scheduled again.
    /// `stopping`: a stop drains the connections (see
    /// [`Connection::message_deadline`](crate::conn::Connection::message_deadline)).
    /// Hand the list back with [`Deadlines::recycle`].
    pub(super) fn expire(
        &mut self,
        now: Instant,
        table: &mut ConnectionTable,
        stopping: bool,
    ) -> Vec<(ConnKey, Deadline, CloseReason)> {
        let Deadlines {
            timers,
            expired,
            idle_timeout,
            message_timeout,
            ..
        } = self;
        timers.expire(now, |(key, deadline), _| {
            let conn = table.get_mut(key)?;
            if conn.reported_closed() {
                return None;
            }
            let (due, reason) = match deadline {
                Deadline::Idle => {
                    let idle = (*idle_timeout)?;
                    if conn.input() == Input::Deliver && conn.holds_messages() {
                        // The server, not the peer, is behind: the messages
                        // its decoder holds go to the application first.
                        return Some(now + idle);
                    }
                    (conn.last_activity() + idle, CloseReason::IdleTimeout)
                }
                Deadline::Message => (
                    conn.message_deadline(now, (*message_timeout)?, stopping)?,
                    CloseReason::MessageTimeout,
                ),
                Deadline::Drain => {
                    conn.closing_reason()?;
                    (
                        conn.last_activity() + CLOSE_PROGRESS,
                        CloseReason::IdleTimeout,
                    )
                }
            };
            if due > now {
                return Some(due);
            }
            if deadline == Deadline::Message {
                conn.disarm_message_timer();
            }
            expired.push((key, deadline, reason));
            None
        });
        std::mem::take(&mut self.expired)
    }

    /// Takes back the list [`Deadlines::expire`] returned, emptied, to reuse
    /// its allocation.
    pub(super) fn recycle(&mut self, mut expired: Vec<(ConnKey, Deadline, CloseReason)>) {
        expired.clear();
        self.expired = expired;
    }

    /// `key`'s close must make progress within [`CLOSE_PROGRESS`] of `now`.
    pub(super) fn expect_progress(&mut self, key: ConnKey, now: Instant) {
        self.timers
            .schedule((key, Deadline::Drain), now + CLOSE_PROGRESS);
    }

    /// Drops the entries of connections closed since, once they may
    /// outnumber the live ones of `table`, so that the heap follows the open
    /// connections, not every connection of the last `idle_timeout`. Each
    /// connection has at most one entry per kind pending: `open` schedules
    /// the idle entry, `track_message` the message entry only when none is
    /// armed, the expiry the drain entry once (its connection is closing
    /// from then on), and an entry is scheduled again only when it fires.
    pub(super) fn compact(&mut self, table: &ConnectionTable) {
        self.timers
            .compact(table.len() * Deadline::KINDS, |(key, _)| {
                table.get(key).is_some()
            });
    }

    /// Timer entries pending, live or stale.
    #[cfg(test)]
    pub(super) fn timer_entries(&self) -> usize {
        self.timers.len()
    }
}

impl<S: Selector> Core<S> {
    /// Closes the connections whose idle or message deadline has passed,
    /// resets those whose close made no progress, and schedules again the
    /// entries whose deadline moved later.
    pub(super) fn expire_timers(&mut self) {
        let draining = self.draining();
        let mut expired = self.deadlines.expire(self.now, &mut self.table, draining);
        for (key, deadline, reason) in expired.drain(..) {
            let Some(conn) = self.table.get_mut(key) else {
                continue;
            };
            if deadline == Deadline::Drain || conn.closing_reason().is_some() {
                // Its close cannot finish (the peer takes nothing): reset it.
                self.abort(key, reason);
                continue;
            }
            self.close_or_cut(key, reason);
            if self
                .table
                .get(key)
                .is_some_and(|conn| conn.closing_reason().is_some())
            {
                // Output is still queued: the close must make progress.
                self.deadlines.expect_progress(key, self.now);
            }
        }
        self.deadlines.recycle(expired);
        self.deadlines.compact(&self.table);
        #[cfg(test)]
        self.shared.timer_entries.store(
            self.deadlines.timer_entries(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}
