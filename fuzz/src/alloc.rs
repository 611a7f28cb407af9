//! A global allocator that watches the byte buffers (allocations of alignment
//! 1, which is what a `Vec<u8>` asks for) made while a thread has opted in:
//! how many bytes they hold net of those freed, and the largest single one.
//! The pool's free lists and the harness's own bookkeeping are vectors of
//! other alignments, so they do not blur the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Watching;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn watched(layout: Layout) -> bool {
    layout.align() == 1 && ON.try_with(Cell::get).unwrap_or(false)
}

fn allocated(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() + size as isize));
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

fn freed(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - size as isize));
}

// SAFETY: forwards every call to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals without
// destructors, which never allocate.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if watched(layout) {
            allocated(layout.size());
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if watched(layout) {
            allocated(layout.size());
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if watched(layout) {
            freed(layout.size());
            allocated(new_size);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if watched(layout) {
            freed(layout.size());
        }
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Starts watching this thread's byte buffers, from zero.
pub fn start() {
    LIVE.with(|live| live.set(0));
    LARGEST.with(|largest| largest.set(0));
    resume();
}

/// Watches again after [`pause`], keeping the counts.
pub fn resume() {
    ON.with(|on| on.set(true));
}

/// Stops watching (the harness's own buffers are none of the decoder's).
pub fn pause() {
    ON.with(|on| on.set(false));
}

/// Bytes of the buffers allocated while watched, less those freed while
/// watched.
pub fn live() -> isize {
    LIVE.with(Cell::get)
}

/// The largest buffer allocated while watched.
pub fn largest() -> usize {
    LARGEST.with(Cell::get)
}
