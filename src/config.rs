//! How a server is built: [`Config`], its defaults and its validation.
//!
//! A leaf of plain values: the Python layer fills it from `Server(...)`'s
//! arguments, [`crate::server::Running::start`] validates it, and each I/O
//! thread reads the settings it needs from it once, at start.

use std::time::Duration;

use crate::framing::Framing;
use crate::sys::Backend;

/// How a server is built.
#[derive(Clone, Debug)]
pub struct Config {
    /// The readiness backend.
    pub backend: Backend,
    /// Slots in each ring (a power of two).
    pub ring_slots: usize,
    /// Bytes of payload per slot, and the chunk size of copied sends. In raw
    /// mode, a read that fills a slot goes on into a larger pooled buffer.
    pub slot_size: usize,
    /// How input is cut into messages, and sends are framed.
    pub framing: Framing,
    /// The largest message a peer may send (line or declared length); larger
    /// closes the connection with `TooLarge`. Not used in raw mode.
    pub max_message_size: usize,
    /// Connections beyond this many are accepted and closed at once.
    pub max_connections: usize,
    /// Close a connection when no bytes went either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose message (framed modes only) started and did
    /// not finish within this long.
    pub message_timeout: Option<Duration>,
    /// Reading a connection stops while more than this many bytes wait in its
    /// output queue ...
    pub write_buffer_high: usize,
    /// ... and resumes once at most this many do.
    pub write_buffer_low: usize,
    /// I/O threads, each with its own poller and rings; 0 runs the one
    /// engine inline, on the thread that consumes its deliveries.
    pub io_threads: usize,
    /// Called first thing on each I/O thread (instrumentation, tests).
    pub on_io_thread_start: Option<fn()>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::platform_default(),
            ring_slots: 512,
            slot_size: 16 * 1024,
            framing: Framing::Raw,
            max_message_size: 1 << 20,
            max_connections: usize::MAX,
            idle_timeout: None,
            message_timeout: Some(Duration::from_secs(30)),
            write_buffer_high: 1 << 20,
            write_buffer_low: 256 << 10,
            io_threads: 1,
            on_io_thread_start: None,
        }
    }
}

impl Config {
    /// Smallest and largest accepted `slot_size`.
    pub const SLOT_SIZE_RANGE: (usize, usize) = (256, 1 << 20);
    /// Smallest and largest accepted `max_message_size`.
    pub const MAX_MESSAGE_SIZE_RANGE: (usize, usize) = (1, 1 << 30);
    /// Smallest and largest accepted `ring_slots`.
    pub const RING_SLOTS_RANGE: (usize, usize) = (2, 1 << 16);
    /// Smallest and largest accepted `io_threads`.
    pub const IO_THREADS_RANGE: (usize, usize) = (0, 256);
    /// The longest accepted `idle_timeout` and `message_timeout`, a billion
    /// seconds (about 31 years): longer than any use, and far from where a
    /// deadline (the clock plus the timeout) would overflow.
    pub const TIMEOUT_MAX: Duration = Duration::from_secs(1_000_000_000);

    /// Explains what is wrong with the configuration, if anything.
    pub fn validate(&self) -> Result<(), String> {
        let (min, max) = Self::RING_SLOTS_RANGE;
        if !self.ring_slots.is_power_of_two() || !(min..=max).contains(&self.ring_slots) {
            return Err(format!(
                "ring_slots must be a power of two from {min} to {max}, got {}",
                self.ring_slots
            ));
        }
        let (min, max) = Self::SLOT_SIZE_RANGE;
        if !(min..=max).contains(&self.slot_size) {
            return Err(format!(
                "slot_size must be from {min} to {max} bytes, got {}",
                self.slot_size
            ));
        }
        let (min, max) = Self::IO_THREADS_RANGE;
        if !(min..=max).contains(&self.io_threads) {
            return Err(format!(
                "io_threads must be from {min} to {max}, got {}",
                self.io_threads
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be positive".into());
        }
        for (name, timeout) in [
            ("idle_timeout", self.idle_timeout),
            ("message_timeout", self.message_timeout),
        ] {
            if timeout.is_some_and(|t| t.is_zero() || t > Self::TIMEOUT_MAX) {
                return Err(format!(
                    "{name} must be positive and at most {} seconds (or None for no timeout)",
                    Self::TIMEOUT_MAX.as_secs()
                ));
            }
        }
        let (min, max) = Self::MAX_MESSAGE_SIZE_RANGE;
        if !(min..=max).contains(&self.max_message_size) {
            return Err(format!(
                "max_message_size must be from {min} to {max} bytes, got {}",
                self.max_message_size
            ));
        }
        if self.write_buffer_high == 0 || self.write_buffer_low > self.write_buffer_high {
            return Err(format!(
                "write_buffer_low ({}) must not exceed write_buffer_high ({}), which must be positive",
                self.write_buffer_low, self.write_buffer_high
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_positive_and_at_most_the_longest() {
        let with = |idle: Duration| Config {
            idle_timeout: Some(idle),
            ..Config::default()
        };
        assert!(with(Config::TIMEOUT_MAX).validate().is_ok());
        assert!(with(Duration::from_nanos(1)).validate().is_ok());
        for bad in [
            Duration::ZERO,
            Config::TIMEOUT_MAX + Duration::from_nanos(1),
        ] {
            let error = with(bad).validate().unwrap_err();
            assert!(
                error.starts_with("idle_timeout must be positive"),
                "{error}"
            );
        }
        // The longest deadline still fits the clock.
        assert!(std::time::Instant::now()
            .checked_add(Config::TIMEOUT_MAX)
            .is_some());
    }
}
