//! An engine run inline (`io_threads=0`): the consumer's own thread turns
//! the loop, so a message read there reaches its callback, and the reply
//! its socket, without changing threads or waiting for a wake-up. (Another
//! thread turns it now and then: a sender that found the command ring full,
//! a stop; what such a turn reads waits in the ring for the consumer.)
//!
//! The loop is the same as an I/O thread's, turn for turn; what differs is
//! who turns it and when it may sleep. The consumer turns it whenever it
//! has nothing to take ([`InlineLoop::turn`], through the engine's
//! [`Shared`]), and the turn sleeps in the selector only when nothing
//! waits for the consumer either (`Reactor::wait`). A sender that finds
//! the command ring full turns it too, without waiting (see
//! [`Shared::push`]): that sender may be the consumer itself, inside a
//! callback. The `Mutex` in `Shared` lets one turn run at a time.
//!
//! Between two callbacks the consumer may also apply the commands queued
//! so far, without a turn: no reading, no waiting
//! ([`InlineLoop::apply_commands`]). The dispatcher does so after each
//! delivery's callback while it holds lent replies, so that a reply is
//! written, and its `bytes` object let go, before the next callback makes
//! another (see `python/loans.rs`). A panic there is reported as a turn's
//! is.
//!
//! An I/O thread catches a panic of its loop and reports it as a delivery
//! (`thread.rs`); so does each turn here, since unwinding into the
//! consumer would cross into Python. Once the loop has finished, later
//! turns hand over what the ring could not take yet, then only drop the
//! commands that still come, as a finished I/O thread does.

use std::sync::Arc;
use std::time::Duration;

use super::{Progress, Reactor};
use crate::shared::{InlineLoop, Shared};
use crate::sys::Selector;

/// A reactor turned by its consumer's thread; see the module docs.
pub(crate) struct Inline<S: Selector> {
    reactor: Reactor<S>,
    stage: Stage,
    /// Marks the engine finished however the loop ends, as an I/O thread's
    /// exit does.
    exit: super::thread::ExitGuard,
}

/// How far the loop has gone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Serving,
    /// `Stopped` is queued; the last deliveries are being handed over.
    HandingOver,
    /// Everything is handed over (or the loop could not even report its
    /// failure): commands that still come are dropped.
    Over,
}

impl<S: Selector> Inline<S> {
    /// `reactor`, to be turned by its consumer; `shared` is its engine's.
    pub(crate) fn new(mut reactor: Reactor<S>, shared: Arc<Shared>) -> Inline<S> {
        reactor.inline = true;
        Inline {
            reactor,
            stage: Stage::Serving,
            exit: super::thread::ExitGuard::new(shared),
        }
    }

    fn serve(&mut self, limit: Option<Duration>, consumer_busy: &dyn Fn() -> bool) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.reactor.turn(limit, consumer_busy)
        }));
        let detail = match outcome {
            Ok(Ok(Progress::Serving)) => return,
            Ok(Ok(Progress::Finished)) => {
                self.stage = Stage::HandingOver;
                return self.hand_over();
            }
            Ok(Err(error)) => format!("the I/O loop failed: {error}"),
            Err(panic) => format!(
                "the I/O loop panicked: {}",
                super::thread::panic_message(&*panic)
            ),
        };
        self.fail(detail);
    }

    /// Reports `detail` as the loop's failure (`Failed`, then the
    /// connections closed and `Stopped`, handed over by the turns that
    /// follow), as an I/O thread's loop does when it fails.
    fn fail(&mut self, detail: String) {
        let reported = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.reactor.fail(detail);
        }));
        match reported {
            Ok(()) => {
                self.stage = Stage::HandingOver;
                self.hand_over();
            }
            // The consumer notices through `Running::io_thread_vanished`.
            Err(_) => {
                self.stage = Stage::Over;
                self.exit.mark();
            }
        }
    }

    fn hand_over(&mut self) {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.reactor.hand_over_last()
        }));
        if done.unwrap_or(true) {
            self.stage = Stage::Over;
        }
    }
}

impl<S: Selector> InlineLoop for Inline<S> {
    fn turn(&mut self, limit: Option<Duration>, consumer_busy: &dyn Fn() -> bool) {
        match self.stage {
            Stage::Serving => self.serve(limit, consumer_busy),
            Stage::HandingOver => self.hand_over(),
            Stage::Over => {
                // Nothing more will be delivered; what senders still push
                // goes, as a finished I/O thread's does.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.reactor.discard_commands();
                }));
            }
        }
    }

    fn is_over(&self) -> bool {
        self.stage == Stage::Over
    }

    fn apply_commands(&mut self) {
        // Handing over or over, the next turn deals with what comes.
        if self.stage != Stage::Serving {
            return;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.reactor.apply_commands();
        }));
        // The command that panicked has been taken: report it now, as a
        // turn would have.
        if let Err(panic) = outcome {
            self.fail(format!(
                "the I/O loop panicked: {}",
                super::thread::panic_message(&*panic)
            ));
        }
    }

    fn begin_outside_sleep(&mut self) -> Option<Option<Duration>> {
        match self.stage {
            Stage::Serving => self.reactor.begin_outside_sleep(),
            // Handing over: the consumer takes the last deliveries first.
            Stage::HandingOver | Stage::Over => None,
        }
    }

    fn end_outside_sleep(&mut self) {
        self.reactor.end_outside_sleep();
    }

    fn pollable(&self) -> Option<i64> {
        self.reactor.pollable()
    }
}
