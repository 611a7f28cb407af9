//! Per-connection deadlines: the idle and message timeouts, and the reset of
//! a close that makes no progress. Entries are checked against the
//! connection's real state when they fire (see [`crate::timer`]).

use std::time::Duration;

use crate::close_reason::CloseReason;
use crate::sys::Selector;

use super::Io;

/// How long a close this thread started may go without progress before it
/// becomes a reset.
const CLOSE_PROGRESS: Duration = Duration::from_secs(5);

/// The kinds of per-connection deadline. A connection has at most one
/// timer entry of each kind pending (see `Io::timers`).
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

impl<S: Selector> Io<S> {
    /// Closes the connections whose idle or message deadline has passed,
    /// resets those whose close made no progress, and schedules again the
    /// entries whose deadline moved later.
    pub(super) fn expire_timers(&mut self) {
        let Io {
            timers,
            table,
            expired,
            idle_timeout,
            message_timeout,
            now,
            stopping,
            ..
        } = self;
        let now = *now;
        let stopping = stopping.is_some();
        timers.expire(now, |(key, deadline), _| {
            let conn = table.get_mut(key)?;
            if conn.reported_closed() {
                return None;
            }
            let (due, reason) = match deadline {
                Deadline::Idle => (
                    conn.last_activity() + (*idle_timeout)?,
                    CloseReason::IdleTimeout,
                ),
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
        let mut expired = std::mem::take(&mut self.expired);
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
                self.timers
                    .schedule((key, Deadline::Drain), self.now + CLOSE_PROGRESS);
            }
        }
        self.expired = expired;
        // The entries of connections closed since the last turn are stale:
        // drop them once they may outnumber the live ones, so that the heap
        // follows the open connections, not every connection of the last
        // `idle_timeout`. Each connection has at most one entry per kind
        // pending: `open` schedules the idle entry, `track_message` the
        // message entry only when none is armed, the expiry above the drain
        // entry once (its connection is closing from then on), and an entry
        // is scheduled again only when it fires.
        let table = &self.table;
        self.timers
            .compact(table.len() * Deadline::KINDS, |(key, _)| {
                table.get(key).is_some()
            });
        #[cfg(test)]
        self.shared
            .timer_entries
            .store(self.timers.len(), std::sync::atomic::Ordering::Relaxed);
    }
}
