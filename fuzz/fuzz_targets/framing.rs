//! Every framing, raw included, chosen by the input's first byte.
//! The case and the checks: `rsepoll_fuzz` (fuzz/src/lib.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rsepoll_fuzz::check(data, None));
