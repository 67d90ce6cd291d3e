//! Arbitrary bytes read as frames by the multiplexer both ends run, on the
//! agent's side of a channel with streams open both ways: it must never
//! panic, and no stream may buffer more than its window.
#![no_main]

use std::sync::{Arc, Mutex};

use cc_protocol::flow::{Inbound, Outbound};
use cc_protocol::frame::FrameReader;
use cc_protocol::mux::{self, Side, Streams};
use cc_protocol::{Request, STREAM_WINDOW};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut streams = Streams::<Outbound>::new(Side::Guest);
    // The host named streams 1-4 in a request: 1 and 2 come to the guest,
    // 3 goes back, 4 was refused; the guest opened one of its own.
    let named = Request::ReadFile {
        path: Default::default(),
        stream: 4,
    };
    for id in named.streams() {
        streams.announce(id);
    }
    let inbound: Vec<Arc<Inbound>> = (1..=2).map(|_| Arc::new(Inbound::new())).collect();
    for (id, s) in (1..).zip(&inbound) {
        streams.add_inbound(id, s.clone()).unwrap();
    }
    streams.add_outbound(3, Arc::new(Outbound::new())).unwrap();
    let own = streams.allocate();
    streams.add_outbound(own, Arc::new(Outbound::new())).unwrap();
    let table = Mutex::new(streams);
    let mut reader = FrameReader::new(data);
    while let Ok(Some(_)) = mux::receive(&mut reader, &table) {}
    for s in &inbound {
        let mut buf = vec![0u8; STREAM_WINDOW as usize + 1];
        let deadline = Some(std::time::Instant::now());
        if let Ok(read) = s.read(&mut buf, deadline) {
            assert!(read.len <= STREAM_WINDOW as usize);
        }
    }
    table.lock().unwrap().end();
});
