//! Length framing with a 4-byte prefix: every size limit, every chunking, refusals at random.
//! The case and the checks: `rsepoll_fuzz` (fuzz/src/lib.rs).
#![no_main]

use _rsepoll::framing::{Framing, PrefixWidth};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rsepoll_fuzz::check(data, Some(Framing::Length(PrefixWidth::Four))));
