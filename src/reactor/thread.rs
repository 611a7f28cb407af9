//! An I/O thread's life: started with its signals blocked, it runs the loop;
//! a panic or an I/O error is reported and the loop shut down anyway; however
//! it ends, it is marked finished so that nobody waits for it again.

use std::io;
use std::sync::atomic::Ordering::Release;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Reactor;
use crate::shared::Shared;
use crate::sys::Selector;

impl<S: Selector> Reactor<S> {
    /// Runs this loop on a new thread called `name`, after `on_start` (a
    /// test hook). `shared` is its engine's: marked finished when the
    /// thread ends, however it ends.
    pub(crate) fn spawn(
        mut self,
        name: String,
        shared: Arc<Shared>,
        on_start: Option<fn()>,
    ) -> io::Result<JoinHandle<()>> {
        let exit_guard = ExitGuard(shared);
        std::thread::Builder::new().name(name).spawn(move || {
            let _exit_guard = exit_guard;
            crate::sys::thread::block_signals();
            run_io_thread(&mut self, on_start);
        })
    }
}

/// Marks an engine finished however its loop ends (its thread's, or an
/// inline loop's), so that no sender or consumer waits for it again.
pub(super) struct ExitGuard(Arc<Shared>);

impl ExitGuard {
    /// The guard of the engine `shared`.
    pub(super) fn new(shared: Arc<Shared>) -> ExitGuard {
        ExitGuard(shared)
    }

    /// Marks the engine finished now; dropping the guard does it again
    /// (every step is idempotent).
    pub(super) fn mark(&self) {
        self.0.finished.store(true, Release);
        self.0.close_arrivals();
        self.0.hub.deliveries.ring();
        self.0.command_space.ring();
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.mark();
    }
}

/// The I/O thread's body: run the loop; on a panic or an I/O error, report it
/// and shut down anyway. Reports travel as deliveries: this thread never logs,
/// because logging reaches Python's `logging` and would need the GIL.
fn run_io_thread<S: Selector>(reactor: &mut Reactor<S>, on_start: Option<fn()>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(hook) = on_start {
            hook();
        }
        reactor.run()
    }));
    let detail = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(error)) => format!("the I/O loop failed: {error}"),
        Err(panic) => format!("the I/O thread panicked: {}", panic_message(&*panic)),
    };
    // If shutting down panics too, the thread ends without `Stopped`; the
    // consumer notices through `Running::io_thread_vanished`.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reactor.fail(detail)));
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}
