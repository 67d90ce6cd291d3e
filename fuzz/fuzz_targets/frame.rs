//! Arbitrary bytes as the agent channel: reading frames must never panic
//! or allocate past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut buf = Vec::new();
    while let Ok(Some(_)) = cc_protocol::frame::read(&mut input, &mut buf) {}
    assert!(buf.capacity() <= cc_protocol::MAX_FRAME);
});
