//! Quiesce, Unquiesce and Rebirth: the agent's part of saving a running
//! guest (a branch or a park) with commands in flight.

use std::time::Duration;

use cc_protocol::{Message, Request, Response, Stdio};

use crate::common::*;

/// A shell counting to `file` and to its stdout, a line every 20 ms.
/// Starts a shell counting into `file`, its output on stream `out`, and
/// waits for its first output; returns its pid.
fn start_counter(host: &mut Host, file: &std::path::Path, out: u32) -> u32 {
    let script = format!(
        "i=0; while :; do i=$((i+1)); echo $i; echo $i > {}.tmp; mv {0}.tmp {0}; sleep 0.02; done",
        file.display()
    );
    let mut e = exec(&["sh", "-c", &script]);
    e.stdout = Stdio::Stream(out);
    let pid = host.start(e).unwrap();
    host.expect("counter output", is_output_of(out));
    pid
}

fn count(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn is_output_of(stream: u32) -> impl Fn(&Message) -> bool {
    move |m| matches!(m, Message::Data { stream: s, .. } | Message::Eof { stream: s } | Message::Reset { stream: s } if *s == stream)
}

#[test]
fn a_quiesced_agent_sends_nothing_until_unquiesced_then_goes_on() {
    let scratch = Scratch::new();
    let file = scratch.join("count");
    let mut host = Host::new();
    let out = stream_id();
    let pid = start_counter(&mut host, &file, out);
    let id = host.begin(Request::Quiesce);
    assert_eq!(host.answer(id), Ok(Response::Done));
    // The answer was the last frame: the counter's output waits.
    host.clear_backlog();
    let before = count(&file);
    assert!(!host.arrives(Duration::from_millis(500), |_| true));
    assert!(count(&file) > before, "the process runs on while quiet");
    assert_eq!(host.request(Request::Unquiesce), Ok(Response::Done));
    host.expect("counter output after the quiet", is_output_of(out));
    assert!(!process_gone(pid));
}

#[test]
fn a_rebirth_drops_the_old_channel_and_keeps_its_processes_running() {
    let scratch = Scratch::new();
    let file = scratch.join("count");
    let mut host = Host::new();
    let (out, input, cat_out) = (stream_id(), stream_id(), stream_id());
    let counter_pid = start_counter(&mut host, &file, out);
    let mut e = exec(&["cat"]);
    e.process = 2;
    e.stdin = Some(input);
    e.stdout = Stdio::Stream(cat_out);
    let cat_pid = host.start(e).unwrap();
    host.expect("counter output", is_output_of(out));
    let id = host.begin(Request::Quiesce);
    assert_eq!(host.answer(id), Ok(Response::Done));
    host.clear_backlog();
    // A restored copy hears of its new channel, twice as a resending host
    // may say it: the second changes nothing.
    for _ in 0..2 {
        assert_eq!(
            host.request(Request::Rebirth { token: 7 }),
            Ok(Response::Done)
        );
    }
    // Nothing of the old channel comes through: not the output the
    // counter had waiting, not an exit.
    let old = |m: &Message| {
        is_output_of(out)(m)
            || is_output_of(cat_out)(m)
            || matches!(m, Message::Exited { .. } | Message::Hello { .. })
    };
    assert!(!host.arrives(Duration::from_millis(500), old));
    // The counter runs on, its output drained; cat's input ended.
    let before = count(&file);
    eventually("the counter goes on", || count(&file) > before + 5);
    assert!(!process_gone(counter_pid));
    eventually("cat sees the end of its input", || process_gone(cat_pid));
    assert!(!host.arrives(Duration::from_millis(200), old));
    // The new channel serves afresh: stream ids and files of its own.
    let (status, stdout, _) = host.run(&["echo", "reborn"]);
    assert_eq!(
        (status, stdout),
        (cc_protocol::ExitStatus::Code(0), b"reborn\n".to_vec())
    );
    // A host-mode agent still ends what it started when its host goes.
    drop(host);
    eventually("the counter ends with its host", || {
        process_gone(counter_pid)
    });
}
