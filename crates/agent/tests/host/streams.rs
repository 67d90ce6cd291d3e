//! Flow control: a guest → host stream waits for the host's credit, a host
//! → guest stream returns credit as it is consumed, and a host that
//! overruns its window or returns credit it does not owe is disconnected.

use std::time::Duration;

use cc_protocol::{ExitStatus, Message, Stdio, DATA_CHUNK, STREAM_WINDOW};
use serde_bytes::ByteBuf;

use crate::common::{exec, stream_id, Host};

/// Takes `want` bytes of data on `stream` without returning credit, and
/// checks that no more follows.
fn take_without_credit(host: &mut Host, stream: u32, want: usize) {
    let is_data = |m: &Message| matches!(m, Message::Data { stream: s, .. } if *s == stream);
    let mut got = 0;
    while got < want {
        let Message::Data { bytes, .. } = host.expect("data", is_data) else {
            unreachable!()
        };
        assert!(bytes.len() <= DATA_CHUNK);
        got += bytes.len();
    }
    assert_eq!(got, want);
    assert!(!host.arrives(Duration::from_millis(300), is_data));
}

#[test]
fn output_stops_at_the_window_until_the_host_returns_credit() {
    let mut host = Host::new();
    let out = stream_id();
    let total = 3 * STREAM_WINDOW as usize;
    let mut e = exec(&["head", "-c", &total.to_string(), "/dev/zero"]);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    let first = STREAM_WINDOW as usize;
    take_without_credit(&mut host, out, first);
    // Credit for half the window lets exactly that much more through.
    let second = first / 2;
    host.send(&Message::Credit {
        stream: out,
        bytes: second as u32,
    });
    take_without_credit(&mut host, out, second);
    // The rest of what was taken: more would be credit not owed.
    host.send(&Message::Credit {
        stream: out,
        bytes: first as u32,
    });
    let rest = host.read_stream(out);
    assert_eq!(first + second + rest.len(), total);
    assert!(rest.iter().all(|&b| b == 0));
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

#[test]
fn output_larger_than_a_chunk_arrives_whole_and_in_order() {
    let mut host = Host::new();
    let (status, out, _) = host.run(&["seq", "1", "200000"]);
    assert_eq!(status, ExitStatus::Code(0));
    let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(out, expected.as_bytes());
}

#[test]
fn input_is_credited_back_as_the_process_consumes_it() {
    let mut host = Host::new();
    let (input, out) = (stream_id(), stream_id());
    let mut e = exec(&["wc", "-c"]);
    e.stdin = Some(input);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    let total = 2 * STREAM_WINDOW as usize;
    let mut sent = 0;
    let mut credit = STREAM_WINDOW as usize;
    while sent < total {
        if credit == 0 {
            let Message::Credit { bytes, .. } = host.expect(
                "credit",
                |m| matches!(m, Message::Credit { stream, .. } if *stream == input),
            ) else {
                unreachable!()
            };
            credit += bytes as usize;
        }
        let n = DATA_CHUNK.min(credit).min(total - sent);
        host.send(&Message::Data {
            stream: input,
            bytes: ByteBuf::from(vec![b'a'; n]),
        });
        sent += n;
        credit -= n;
    }
    host.send(&Message::Eof { stream: input });
    let count = host.read_stream(out);
    assert_eq!(
        std::str::from_utf8(&count).unwrap().trim(),
        total.to_string()
    );
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

/// The agent's last words before it closed the channel.
fn goodbye(host: &mut Host) -> String {
    match host.until_closed().last() {
        Some(Message::Goodbye { reason }) => reason.clone(),
        other => panic!("no goodbye, last {other:?}"),
    }
}

#[test]
fn a_host_that_overruns_the_window_is_disconnected() {
    let mut host = Host::new();
    let input = stream_id();
    // A process that never reads its stdin.
    let mut e = exec(&["sleep", "1000"]);
    e.stdin = Some(input);
    host.start(e).unwrap();
    let chunk = ByteBuf::from(vec![0; DATA_CHUNK]);
    // The window, one chunk its stdin pump takes (and credits) before it
    // blocks on the full pipe, and one too many.
    for _ in 0..(STREAM_WINDOW as usize / DATA_CHUNK + 2) {
        host.send(&Message::Data {
            stream: input,
            bytes: chunk.clone(),
        });
    }
    let why = goodbye(&mut host);
    assert!(why.contains("broke flow control"), "{why}");
    assert!(why.contains("more than its window"), "{why}");
}

#[test]
fn a_host_that_returns_credit_it_does_not_owe_is_disconnected() {
    let mut host = Host::new();
    let out = stream_id();
    let mut e = exec(&["sleep", "1000"]);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    // More than a whole window: never owed, whatever its pump took.
    let bytes = STREAM_WINDOW + 1;
    host.send(&Message::Credit { stream: out, bytes });
    let why = goodbye(&mut host);
    assert!(
        why.contains(&format!("returned {bytes} bytes of credit")),
        "{why}"
    );
}
