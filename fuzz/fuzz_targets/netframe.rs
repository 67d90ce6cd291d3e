//! Arbitrary bytes as a guest's network traffic: one frame for the policy
//! filter, and the same bytes as the length-prefixed stream the proxy
//! reads. Neither may panic or allocate past the frame limit.
#![no_main]

use std::net::Ipv4Addr;

use cc_netpolicy::{Filter, FrameReader, NetworkPolicy, Verdict, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Refusing everything but DNS exercises the reply builders most.
    let policy = NetworkPolicy {
        deny: vec!["0.0.0.0/1".parse().unwrap(), "128.0.0.0/1".parse().unwrap()],
        ..NetworkPolicy::default()
    };
    let host = || Ok(vec![Ipv4Addr::new(192, 168, 1, 7)]);
    let mut filter = Filter::with_host_addrs(policy, host).unwrap();
    if let Verdict::Refuse(reply) = filter.check(data) {
        assert!(reply.len() <= MAX_FRAME);
    }
    let mut input = data;
    let mut reader = FrameReader::new(&mut input);
    while let Ok(Some(frame)) = reader.next_frame() {
        assert!(frame.len() <= MAX_FRAME);
        let _ = filter.check(frame);
    }
});
