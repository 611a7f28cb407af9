//! What the I/O threads ask of the platform for themselves.

/// Keeps asynchronous signals (Ctrl-C above all) off the I/O thread, so that
/// the kernel delivers them to a thread that runs Python code.
pub fn block_signals() {
    #[cfg(unix)]
    {
        // SAFETY: `set` is a local sigset_t initialised by sigfillset before use;
        // pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    }
}
