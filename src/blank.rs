//! Storage a consumer lends the I/O thread for large raw reads, so that the
//! bytes go straight where the consumer wants them.
//!
//! The Python bindings turn every payload into a `bytes` object. For a read
//! larger than a slot that costs a copy of every byte, from the spill buffer
//! the read went into to the object; at 64 KiB per message, saving it saved
//! a tenth of an inline server's CPU and a third of a threaded one's
//! (`benchmarks/README.md`, "Reading into the `bytes` object, landed"). So
//! the consumer may lend the room of an object
//! it made, as a [`Blank`], through the engine's [`BlankStock`]: a raw read
//! that starts in a spill buffer takes a blank when the stock has one, goes
//! straight into it, and the delivery slot carries it to the consumer, which
//! hands on the object the bytes are already in.
//!
//! This side knows nothing of what the storage is: a blank is a pointer, a
//! size and a boxed owner that keeps the storage alive wherever it is
//! dropped. The contract is [`Blank::new`]'s: while a blank exists, it is the
//! only way to its storage, so the I/O thread may fill it without a lock,
//! and the consumer may read it only once it has taken the owner back. When
//! the storage may be lent again is the consumer's business too.

// Without the Python bindings, only the tests lend blanks.
#![cfg_attr(not(feature = "python"), allow(dead_code))]

use std::any::Any;
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;

use crate::sync::{AtomicBool, AtomicUsize, Mutex};

/// Storage the consumer lends for one raw read: the room of an object it
/// made, which the I/O thread fills from the start and hands back in a
/// delivery, and the object itself (`owner`), which keeps the room alive
/// and which the consumer takes back with [`Blank::into_owner`].
pub(crate) struct Blank {
    room: NonNull<u8>,
    capacity: usize,
    /// Bytes written so far, from the start of the room.
    filled: usize,
    owner: Box<dyn Any + Send>,
}

// SAFETY: a blank is the only way to its room (the contract of
// `Blank::new`), so moving it to another thread moves all access to the
// room with it; its owner is `Send`.
unsafe impl Send for Blank {}

impl Blank {
    /// A blank over the `capacity` bytes at `room`, kept alive by `owner`.
    ///
    /// # Safety
    /// The bytes must stay valid for reads and writes for as long as
    /// `owner` lives, wherever it is dropped, and nothing but this blank may
    /// read or write them until [`Blank::into_owner`] gives `owner` back.
    pub(crate) unsafe fn new(
        room: NonNull<u8>,
        capacity: usize,
        owner: Box<dyn Any + Send>,
    ) -> Blank {
        Blank {
            room,
            capacity,
            filled: 0,
            owner,
        }
    }

    /// Size of the room.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes written so far.
    pub(crate) fn filled(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes of the room were written
        // (`advance`), and only this blank reaches them (`new`).
        unsafe { std::slice::from_raw_parts(self.room.as_ptr(), self.filled) }
    }

    /// Number of bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.filled
    }

    /// The room not written yet.
    pub(crate) fn spare(&mut self) -> &mut [MaybeUninit<u8>] {
        // SAFETY: `filled <= capacity`, the room is valid for writes and only
        // this blank reaches it (`new`), and `&mut self` makes this the only
        // reference through the blank.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.room
                    .as_ptr()
                    .add(self.filled)
                    .cast::<MaybeUninit<u8>>(),
                self.capacity - self.filled,
            )
        }
    }

    /// Counts `n` more bytes as written.
    ///
    /// # Safety
    /// The first `n` bytes of [`Blank::spare`] have been written.
    pub(crate) unsafe fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.capacity - self.filled);
        self.filled += n;
    }

    /// Forgets what was written, so that the room can be filled again.
    pub(crate) fn clear(&mut self) {
        self.filled = 0;
    }

    /// True if the owner is a `T`.
    pub(crate) fn is_owned_by<T: Any>(&self) -> bool {
        self.owner.is::<T>()
    }

    /// The object whose room this is, which may read what was written now.
    pub(crate) fn into_owner(self) -> Box<dyn Any + Send> {
        self.owner
    }
}

impl fmt::Debug for Blank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blank")
            .field("capacity", &self.capacity)
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

/// The blanks of one engine, waiting for reads: the engine's loop takes
/// them, the consumer stocks them and gets back the ones it did not keep.
#[derive(Debug, Default)]
pub(crate) struct BlankStock {
    blanks: Mutex<Vec<Blank>>,
    /// The engine's slot size: a read that fits a slot goes there, so a
    /// blank must be larger to be of use.
    slot_size: usize,
    /// How many blanks `blanks` holds, as of its last change: a read finds
    /// an empty stock without the lock (every read, where the consumer
    /// lends none).
    count: AtomicUsize,
    /// A read looked for a blank since the consumer last asked: a consumer
    /// stocks blanks only once one was wanted, so that a server whose input
    /// never spills makes none.
    wanted: AtomicBool,
}

impl BlankStock {
    /// An empty stock for an engine whose slots hold `slot_size` bytes.
    pub(crate) fn new(slot_size: usize) -> BlankStock {
        BlankStock {
            slot_size,
            ..BlankStock::default()
        }
    }

    /// True if blanks of `capacity` bytes are of use: larger than a slot.
    pub(crate) fn takes(&self, capacity: usize) -> bool {
        capacity > self.slot_size
    }

    /// A blank, if the stock has one; if not, the stock notes that one was
    /// wanted.
    pub(crate) fn take(&self) -> Option<Blank> {
        // A stale count costs a read a blank, or a look under the lock:
        // the lock decides.
        let blank = if self.count.load(Relaxed) == 0 {
            None
        } else {
            let mut stock = self.blanks.lock();
            let blank = stock.pop();
            self.count.store(stock.len(), Relaxed);
            blank
        };
        if blank.is_none() {
            self.wanted.store(true, Relaxed);
        }
        blank
    }

    /// Puts `blanks` back, emptied.
    pub(crate) fn give_all(&self, blanks: impl IntoIterator<Item = Blank>) {
        let mut stock = self.blanks.lock();
        for mut blank in blanks {
            blank.clear();
            stock.push(blank);
        }
        self.count.store(stock.len(), Relaxed);
    }

    /// How many blanks the stock holds now.
    pub(crate) fn len(&self) -> usize {
        self.blanks.lock().len()
    }

    /// True if a read found the stock empty since the last call.
    pub(crate) fn was_wanted(&self) -> bool {
        self.wanted.swap(false, Relaxed)
    }

    /// Takes every blank out of the stock (the consumer's end).
    pub(crate) fn take_all(&self) -> Vec<Blank> {
        let mut stock = self.blanks.lock();
        self.count.store(0, Relaxed);
        std::mem::take(&mut *stock)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A blank over a vector of its own, which is its owner.
    fn blank(capacity: usize) -> Blank {
        let mut storage = vec![0u8; capacity];
        let room = NonNull::new(storage.as_mut_ptr()).unwrap();
        // SAFETY: the vector's buffer stays where it is when the vector moves
        // into the box, and nothing else touches it.
        unsafe { Blank::new(room, capacity, Box::new(storage)) }
    }

    /// Writes `bytes` into `blank`'s spare room.
    fn write(blank: &mut Blank, bytes: &[u8]) {
        for (slot, &byte) in blank.spare().iter_mut().zip(bytes) {
            slot.write(byte);
        }
        // SAFETY: the first `bytes.len()` bytes of the spare room were just
        // written (the test's writes fit).
        unsafe { blank.advance(bytes.len()) };
    }

    #[test]
    fn a_blank_is_filled_from_the_start_and_its_owner_sees_the_bytes() {
        let mut blank = blank(8);
        assert_eq!(
            (blank.capacity(), blank.len(), blank.spare().len()),
            (8, 0, 8)
        );
        write(&mut blank, b"abc");
        write(&mut blank, b"de");
        assert_eq!(blank.filled(), b"abcde");
        assert_eq!(blank.spare().len(), 3);
        assert!(blank.is_owned_by::<Vec<u8>>());
        assert!(!blank.is_owned_by::<String>());
        let storage = blank.into_owner().downcast::<Vec<u8>>().unwrap();
        assert_eq!(&storage[..], b"abcde\0\0\0");
    }

    #[test]
    fn the_stock_notes_a_read_that_found_it_empty_and_empties_what_comes_back() {
        let stock = BlankStock::default();
        assert!(!stock.was_wanted());
        assert!(stock.take().is_none());
        assert!(stock.was_wanted());
        // Asked once, answered once.
        assert!(!stock.was_wanted());
        let mut used = blank(4);
        write(&mut used, b"xy");
        stock.give_all([used, blank(4)]);
        assert_eq!(stock.len(), 2);
        let taken = stock.take().unwrap();
        assert_eq!(taken.len(), 0, "given back emptied");
        assert!(!stock.was_wanted(), "a take that found one is no want");
        assert_eq!(stock.take_all().len(), 1);
        assert_eq!(stock.len(), 0);
    }
}
