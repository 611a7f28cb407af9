//! A global allocator that counts the allocations of the threads that opt
//! in, for tests that check a hot path allocates nothing. A test binary that
//! includes this module (`mod counting_alloc;`) installs it as its global
//! allocator, which is why such tests have binaries of their own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Counts heap allocations made on threads that opted in.
struct CountingAllocator;

thread_local! {
    static COUNTED_THREAD: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count_allocation() {
    if COUNTED_THREAD.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, SeqCst);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; the counting
// touches only an atomic and a const-initialised thread-local without
// destructor, neither of which allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Counts this thread's allocations from now on.
pub fn count_this_thread() {
    COUNTED_THREAD.with(|c| c.set(true));
}

/// Stops counting this thread's allocations.
#[allow(dead_code)] // not every test binary uses it
pub fn stop_counting_this_thread() {
    COUNTED_THREAD.with(|c| c.set(false));
}

/// Allocations counted so far, on every counted thread.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(SeqCst)
}
