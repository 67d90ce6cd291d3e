//! The connection: greeting, requests out of order or malformed, the end
//! of the channel, set-up, the warm-start handshake and power-off.

use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use cc_agent::{Agent, Ended, Mode};
use cc_protocol::{
    ErrorKind, Lower, Message, Mount, NetConfig, Prepare, Request, Response, RootSpec, Setup,
    UnixTime, PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;

use crate::common::{exec, process_gone, stream_id, Host, Scratch};

fn setup() -> Setup {
    Setup {
        hostname: "box".into(),
        root: None,
        clock: UnixTime { secs: 1, nanos: 0 },
        entropy: ByteBuf::from(vec![7; 32]),
        nameservers: vec!["10.0.2.3".into()],
        hosts: vec![("127.0.0.254".into(), "host.internal".into())],
        mounts: Vec::new(),
        network: None,
    }
}

fn root_spec() -> RootSpec {
    RootSpec {
        lowers: vec![Lower {
            serial: "cc-lower0".into(),
            fstype: "erofs".into(),
        }],
        upper_serial: "cc-upper".into(),
    }
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn the_agent_greets_first_with_the_protocol_version() {
    let host = Host::new();
    let Message::Hello { version, agent } = &host.hello else {
        unreachable!()
    };
    assert_eq!(*version, PROTOCOL_VERSION);
    assert!(agent.starts_with("cc-agent "), "{agent}");
}

#[test]
fn pings_are_answered_with_pongs() {
    let mut host = Host::new();
    for _ in 0..3 {
        assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
    }
}

#[test]
fn hanging_up_ends_the_serve_loop() {
    let host = Host::new();
    assert_eq!(
        host.hang_up(),
        Ended::Lost("the host closed the port".into())
    );
}

#[test]
fn an_undecodable_frame_ends_the_connection_with_the_reason() {
    let mut host = Host::new();
    // A frame of four bytes holding no message variant.
    host.send_raw(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert!(host.until_closed().is_empty());
    let Ended::Lost(why) = host.hang_up() else {
        panic!("not lost")
    };
    assert!(why.starts_with("undecodable frame"), "{why}");
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_read() {
    let mut host = Host::new();
    host.send_raw(&(5u32 << 20).to_le_bytes());
    host.until_closed();
    assert_eq!(
        host.hang_up(),
        Ended::Lost("frame of 5242880 bytes exceeds the 4194304-byte limit".into())
    );
}

#[test]
fn a_channel_closed_inside_a_frame_is_a_truncated_frame() {
    let host = Host::new();
    host.send_raw(&[10, 0, 0, 0, 1, 2]);
    assert_eq!(
        host.hang_up(),
        Ended::Lost("channel closed inside a frame".into())
    );
}

#[test]
fn messages_only_a_guest_sends_are_ignored() {
    let mut host = Host::new();
    host.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        agent: "impostor".into(),
    });
    host.send(&Message::Exited {
        process: 9,
        status: cc_protocol::ExitStatus::Code(0),
    });
    host.send(&Message::Goodbye {
        reason: "no".into(),
    });
    assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
}

/// Sends `msg` on a fresh connection and returns the agent's goodbye,
/// which must come before it closes the channel.
fn refused(prepare: impl FnOnce(&mut Host), msg: Message) -> String {
    let mut host = Host::new();
    prepare(&mut host);
    host.send(&msg);
    let before_close = host.until_closed();
    match before_close.last() {
        Some(Message::Goodbye { reason }) => reason.clone(),
        other => panic!("{msg:?}: no goodbye, last {other:?}"),
    }
}

#[test]
fn stream_messages_for_streams_never_opened_close_the_channel() {
    for msg in [
        Message::Data {
            stream: 77,
            bytes: ByteBuf::from(vec![1]),
        },
        Message::Eof { stream: 77 },
        Message::Credit {
            stream: 1 << 31,
            bytes: 10,
        },
        Message::Reset { stream: 0 },
    ] {
        let why = refused(|_| {}, msg);
        assert!(
            why.starts_with("closing the channel: the host sent a frame for stream"),
            "{why}"
        );
        assert!(why.ends_with("which was never opened"), "{why}");
    }
}

#[test]
fn stream_messages_for_streams_closed_or_refused_are_dropped() {
    let mut host = Host::new();
    // A finished command's stdout, and a stdin a failed request named.
    let out = stream_id();
    let mut e = exec(&["true"]);
    e.stdout = cc_protocol::Stdio::Stream(out);
    host.run_exec(e);
    let named = stream_id();
    let mut bad = exec(&["/no/such/program"]);
    bad.stdin = Some(named);
    assert!(host.start(bad).is_err());
    for stream in [out, named] {
        host.send(&Message::Data {
            stream,
            bytes: ByteBuf::from(vec![1]),
        });
        host.send(&Message::Eof { stream });
        host.send(&Message::Credit { stream, bytes: 10 });
        host.send(&Message::Reset { stream });
    }
    assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
}

#[test]
fn setup_without_root_mounts_or_network_is_ready_in_host_mode() {
    let mut host = Host::new();
    let answer = host.request(Request::Setup(Box::new(setup())));
    assert_eq!(
        answer,
        Ok(Response::Ready {
            kernel: kernel_release()
        })
    );
}

#[test]
fn setup_leaves_the_host_machine_alone() {
    let mut host = Host::new();
    let before = rustix::system::uname().nodename().to_owned();
    let mut s = setup();
    s.hostname = "not-this-host".into();
    assert!(host.request(Request::Setup(Box::new(s))).is_ok());
    assert_eq!(rustix::system::uname().nodename(), before.as_c_str());
}

#[test]
fn setup_is_checked_in_host_mode_too() {
    let mut host = Host::new();
    let mut s = setup();
    s.hostname = "two\nlines".into();
    let e = host.request(Request::Setup(Box::new(s))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert_eq!(e.message, "invalid hostname \"two\\nlines\"");
}

#[test]
fn host_directory_mounts_and_networks_need_a_guest() {
    let mut host = Host::new();
    let mut s = setup();
    s.mounts.push(Mount {
        tag: "ccm0".into(),
        guest_path: "/data".into(),
        read_only: true,
    });
    let e = host.request(Request::Setup(Box::new(s))).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("host mode"), "{}", e.message);
    let mut s = setup();
    s.network = Some(NetConfig {
        interface: "eth0".into(),
        address: "10.0.2.15".into(),
        prefix_len: 24,
        gateway: "10.0.2.2".into(),
        mtu: 65520,
    });
    let e = host.request(Request::Setup(Box::new(s))).unwrap_err();
    assert!(e.message.contains("network"), "{}", e.message);
}

#[test]
fn a_template_is_prepared_and_resumed_on_a_new_channel() {
    let agent = Agent::new(Mode::Host).unwrap();
    let mut before = Host::connect(agent.clone());
    assert_eq!(
        before.request(Request::Prepare(Box::new(Prepare {
            root: root_spec(),
            nameservers: vec!["10.0.2.3".into()],
            network: None,
        }))),
        Ok(Response::Done)
    );
    // Bad input is refused as a Setup's would be.
    let e = before
        .request(Request::Prepare(Box::new(Prepare {
            root: root_spec(),
            nameservers: vec!["1.2.3.4\nnameserver 6.6.6.6".into()],
            network: None,
        })))
        .unwrap_err();
    assert!(e.message.contains("invalid nameserver"), "{}", e.message);
    before.start(exec(&["true"])).unwrap();
    assert_eq!(before.exited(1), cc_protocol::ExitStatus::Code(0));
    // The save: the host's end goes away while the guest is quiet.
    assert_eq!(
        before.hang_up(),
        Ended::Lost("the host closed the port".into())
    );
    // The restore: the same agent on a new channel greets again and
    // answers the host's pings; Setup then finds the root in place.
    let mut after = Host::connect(agent);
    assert!(matches!(after.hello, Message::Hello { .. }));
    assert_eq!(after.request(Request::Ping), Ok(Response::Pong));
    let mut s = setup();
    s.root = Some(root_spec());
    assert!(matches!(
        after.request(Request::Setup(Box::new(s))),
        Ok(Response::Ready { .. })
    ));
    // Process ids are per connection: 1 is free again.
    after.start(exec(&["true"])).unwrap();
    assert_eq!(after.exited(1), cc_protocol::ExitStatus::Code(0));
}

#[test]
fn a_new_channel_replaces_the_one_being_served() {
    let agent = Agent::new(Mode::Host).unwrap();
    let (old_host, old_guest) = UnixStream::pair().unwrap();
    let old = {
        let agent = agent.clone();
        thread::spawn(move || agent.serve(old_guest))
    };
    let mut hello = Vec::new();
    assert!(matches!(
        cc_protocol::frame::read(&mut &old_host, &mut hello),
        Ok(Some(Message::Hello { .. }))
    ));
    let mut new = Host::connect(agent);
    assert_eq!(new.request(Request::Ping), Ok(Response::Pong));
    assert!(matches!(old.join().unwrap(), Ended::Lost(_)));
    // The old channel was hung up.
    assert!(matches!(
        cc_protocol::frame::read(&mut &old_host, &mut hello),
        Ok(None)
    ));
}

#[test]
fn shutdown_answers_says_goodbye_and_ends_the_agent() {
    let mut host = Host::new();
    let agent = host.agent.clone();
    let pid = host.start(exec(&["sleep", "1000"])).unwrap();
    let id = host.begin(Request::Shutdown);
    assert_eq!(host.answer(id), Ok(Response::Done));
    let goodbye = host.expect("the goodbye", |m| matches!(m, Message::Goodbye { .. }));
    let reason = "the host asked to shut down".to_string();
    assert_eq!(
        goodbye,
        Message::Goodbye {
            reason: reason.clone()
        }
    );
    // Silent after the goodbye: the killed process is never reported.
    assert!(host.until_closed().is_empty());
    assert_eq!(host.hang_up(), Ended::PoweredOff(reason.clone()));
    assert!(process_gone(pid));
    // Powered off for good: a new channel is not served.
    let (_host, guest) = UnixStream::pair().unwrap();
    assert_eq!(agent.serve(guest), Ended::PoweredOff(reason));
}

#[test]
fn a_power_off_from_the_host_program_says_goodbye() {
    let mut host = Host::new();
    assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
    host.agent.power_off("test over");
    let goodbye = host.expect("the goodbye", |m| matches!(m, Message::Goodbye { .. }));
    assert_eq!(
        goodbye,
        Message::Goodbye {
            reason: "test over".into()
        }
    );
    assert_eq!(host.hang_up(), Ended::PoweredOff("test over".into()));
}

#[test]
fn the_convenience_serve_runs_one_connection() {
    let (host, guest) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || cc_agent::serve(guest, Mode::Host));
    let mut buf = Vec::new();
    assert!(matches!(
        cc_protocol::frame::read(&mut &host, &mut buf),
        Ok(Some(Message::Hello { .. }))
    ));
    drop(host);
    let ended = server.join().unwrap().unwrap();
    assert_eq!(ended, Ended::Lost("the host closed the port".into()));
}

#[test]
fn the_upper_directory_is_set_once_and_only_in_host_mode() {
    let scratch = crate::common::Scratch::new();
    let agent = Agent::new(Mode::Host).unwrap();
    assert_eq!(agent.mode(), Mode::Host);
    agent.set_upper(&scratch.0).unwrap();
    let e = agent.set_upper(&scratch.0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    let e = Agent::new(Mode::Host)
        .unwrap()
        .set_upper(&scratch.join("missing"))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn a_ping_is_answered_while_a_slow_request_runs() {
    let scratch = crate::common::Scratch::new();
    let mut host = Host::new();
    let stream = crate::common::stream_id();
    // A file write answers only once the host ends its stream.
    let slow = host.begin(Request::WriteFile {
        path: scratch.path("f"),
        mode: 0o600,
        stream,
    });
    assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
    assert!(!host.arrives(Duration::from_millis(100), |m| {
        matches!(m, Message::Response { id, .. } if *id == slow)
    }));
    host.send(&Message::Eof { stream });
    assert_eq!(host.answer(slow), Ok(Response::Done));
}

#[test]
fn a_port_read_and_written_as_a_plain_file_is_served_the_same() {
    // As the guest's virtio port is: no socket calls, no hanging up.
    let (host, guest) = UnixStream::pair().unwrap();
    let port = std::fs::File::from(std::os::fd::OwnedFd::from(guest));
    let agent = Agent::new(Mode::Host).unwrap();
    let server = {
        let agent = agent.clone();
        thread::spawn(move || agent.serve(port))
    };
    let mut host = Host::over(agent, host, server);
    assert_eq!(host.request(Request::Ping), Ok(Response::Pong));
    let (status, out, _) = host.run(&["echo", "plain"]);
    assert_eq!(
        (status, out),
        (cc_protocol::ExitStatus::Code(0), b"plain\n".to_vec())
    );
    assert_eq!(
        host.hang_up(),
        Ended::Lost("the host closed the port".into())
    );
}

/// A process with nothing attached has its `Started` held back a moment
/// in case it exits at once (its exit then goes in the same write). A
/// power-off in that moment, as a guest's `kill -TERM 1` causes, must
/// still let the answer out before the goodbye: else the host's `start`
/// fails with "not running" for a command that ran.
#[test]
fn a_power_off_lets_a_held_back_started_out_before_the_goodbye() {
    let mut host = Host::new();
    let scratch = Scratch::new();
    let ran = scratch.join("ran");
    let script = format!(": > {}; exec sleep 1000", ran.display());
    let id = host.begin(Request::Exec(exec(&["sh", "-c", &script])));
    while !ran.exists() {
        thread::yield_now();
    }
    host.agent.power_off("test over");
    let said = host.until_closed();
    let answered = said
        .iter()
        .position(|m| matches!(m, Message::Response { id: i, body: Ok(Response::Started { .. }) } if *i == id));
    let goodbye = said
        .iter()
        .position(|m| matches!(m, Message::Goodbye { .. }));
    assert!(
        matches!((answered, goodbye), (Some(a), Some(g)) if a < g),
        "Started must come before the goodbye: {said:?}"
    );
}
