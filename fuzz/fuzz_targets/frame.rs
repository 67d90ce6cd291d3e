//! Arbitrary bytes as the agent channel: reading frames must never panic
//! or allocate past the frame limit, through `frame::read` or through the
//! `FrameReader` both ends use (its `Data` payloads read into buffers of
//! the length the frame claims, as a stream's would be).
#![no_main]

use cc_protocol::frame::{Frame, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut buf = Vec::new();
    while let Ok(Some(_)) = cc_protocol::frame::read(&mut input, &mut buf) {}
    assert!(buf.capacity() <= cc_protocol::MAX_FRAME);

    let mut reader = FrameReader::new(data);
    let mut payload = Vec::new();
    loop {
        match reader.read_frame() {
            Ok(Some(Frame::Data { len, .. })) => {
                assert!(len <= cc_protocol::MAX_FRAME);
                payload.resize(len, 0);
                if reader.payload(&mut payload).is_err() {
                    break;
                }
            }
            Ok(Some(Frame::Message(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert!(reader.last_payload().len() <= cc_protocol::MAX_FRAME);
});
