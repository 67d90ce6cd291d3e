//! Arbitrary guest frames fed to the host's dispatch (unknown streams,
//! credit not owed, lengths at the limit, replies to requests never made):
//! it must never panic, and the host's state must stay within its bounds.
//! The first byte picks whether the channel is a resumed one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cc::fuzz_dispatch(data));
