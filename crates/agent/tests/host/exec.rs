//! `Exec` and `Signal`: exit codes and signals, the three pipes, the
//! environment, working directory, identity, and killing.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use cc_agent::{Agent, Mode};
use cc_protocol::{
    frame, ErrorKind, ExitStatus, Message, Request, Response, Rlimit, Stdio, STREAM_WINDOW,
};
use serde_bytes::ByteBuf;

use crate::common::{bytes, eventually, exec, is_root, process_gone, stream_id, Host, Scratch};

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn a_process_exit_code_reaches_the_host() {
    let mut host = Host::new();
    let (status, _, _) = host.run(&["sh", "-c", "exit 3"]);
    assert_eq!(status, ExitStatus::Code(3));
    let (status, _, _) = host.run(&["true"]);
    assert_eq!(status, ExitStatus::Code(0));
}

#[test]
fn a_process_ended_by_a_signal_reports_the_signal() {
    let mut host = Host::new();
    let (status, _, _) = host.run(&["sh", "-c", "kill -TERM $$"]);
    assert_eq!(status, ExitStatus::Signal(libc::SIGTERM));
}

#[test]
fn the_started_answer_carries_the_process_pid() {
    let mut host = Host::new();
    let out = stream_id();
    let mut e = exec(&["sh", "-c", "echo $$"]);
    e.stdout = Stdio::Stream(out);
    let pid = host.start(e).unwrap();
    assert_eq!(text(&host.read_stream(out)), format!("{pid}\n"));
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

#[test]
fn stdout_and_stderr_arrive_on_their_own_streams() {
    let mut host = Host::new();
    let (status, out, err) = host.run(&["sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(text(&out), "out\n");
    assert_eq!(text(&err), "err\n");
}

#[test]
fn stderr_can_share_the_stdout_stream_in_order() {
    let mut host = Host::new();
    let out = stream_id();
    let mut e = exec(&["sh", "-c", "echo 1; echo 2 >&2; echo 3"]);
    e.stdout = Stdio::Stream(out);
    e.stderr = Stdio::Stdout;
    host.start(e).unwrap();
    assert_eq!(text(&host.read_stream(out)), "1\n2\n3\n");
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

#[test]
fn stdout_cannot_be_redirected_to_itself() {
    let mut host = Host::new();
    let mut e = exec(&["true"]);
    e.stdout = Stdio::Stdout;
    let err = host.start(e).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}

#[test]
fn stdin_is_fed_from_the_host_stream_until_its_end() {
    let mut host = Host::new();
    let (input, out) = (stream_id(), stream_id());
    let mut e = exec(&["cat"]);
    e.stdin = Some(input);
    e.stdout = Stdio::Stream(out);
    // Sent right behind the request, before its answer: the agent opened
    // the stream when it read the request.
    let id = host.begin(Request::Exec(e));
    host.write_stream(input, b"hello, world");
    assert!(matches!(host.answer(id), Ok(Response::Started { .. })));
    assert_eq!(host.read_stream(out), b"hello, world");
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

#[test]
fn a_process_without_stdin_reads_nothing() {
    let mut host = Host::new();
    let (status, out, _) = host.run(&["cat"]);
    assert_eq!((status, out.len()), (ExitStatus::Code(0), 0));
}

#[test]
fn the_environment_has_defaults_and_the_requested_entries() {
    let mut host = Host::new();
    let mut e = exec(&["env"]);
    e.env = vec![bytes("FOO=bar=baz"), bytes("TERM=dumb"), bytes("EMPTY=")];
    let (status, out, _) = host.run_exec(e);
    assert_eq!(status, ExitStatus::Code(0));
    let mut lines: Vec<&str> = text(&out).lines().collect();
    lines.sort_unstable();
    let home = lines.iter().find(|l| l.starts_with("HOME=")).unwrap();
    assert!(home.len() > "HOME=".len());
    lines.retain(|l| !l.starts_with("HOME="));
    assert_eq!(
        lines,
        [
            "EMPTY=",
            "FOO=bar=baz",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "TERM=dumb",
        ]
    );
}

#[test]
fn invalid_environment_entries_are_refused() {
    let mut host = Host::new();
    for entry in ["NOEQUALS", "=value", "A=b\0c"] {
        let mut e = exec(&["true"]);
        e.env = vec![bytes(entry)];
        let err = host.start(e).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument, "{entry:?}");
    }
}

#[test]
fn the_working_directory_is_the_one_asked_for() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let mut e = exec(&["pwd"]);
    e.cwd = Some(scratch.path(""));
    let (_, out, _) = host.run_exec(e);
    let expected = std::fs::canonicalize(&scratch.0).unwrap();
    assert_eq!(text(&out).trim_end(), expected.to_str().unwrap());
}

#[test]
fn a_missing_working_directory_is_an_io_error_not_a_missing_program() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let mut e = exec(&["true"]);
    e.cwd = Some(scratch.path("missing"));
    let err = host.start(e).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(
        err.message.starts_with("working directory"),
        "{}",
        err.message
    );
    assert!(
        err.message.ends_with("No such file or directory"),
        "{}",
        err.message
    );
    std::fs::write(scratch.join("file"), b"").unwrap();
    let mut e = exec(&["true"]);
    e.cwd = Some(scratch.path("file"));
    let err = host.start(e).unwrap_err();
    assert_eq!(err.errno, Some(libc::ENOTDIR));
    let mut e = exec(&["true"]);
    e.cwd = Some(bytes("/a\0b"));
    let err = host.start(e).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
}

#[test]
fn a_program_missing_from_path_is_not_found() {
    let mut host = Host::new();
    let err = host.start(exec(&["cc-agent-no-such-program"])).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert_eq!(
        err.message,
        "executable file not found in $PATH: \"cc-agent-no-such-program\""
    );
    let err = host.start(exec(&["/no/such/program"])).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
}

#[test]
fn a_program_that_is_not_executable_is_permission_denied() {
    let scratch = Scratch::new();
    std::fs::write(scratch.join("script"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(scratch.join("script"), PermissionsExt::from_mode(0o644)).unwrap();
    let mut host = Host::new();
    let mut e = exec(&["script"]);
    e.env = vec![bytes(format!("PATH={}", scratch.0.display()))];
    let err = host.start(e).unwrap_err();
    assert_eq!(err.kind, ErrorKind::PermissionDenied);
    assert_eq!(err.errno, Some(libc::EACCES));
}

#[test]
fn empty_and_nul_arguments_are_refused() {
    let mut host = Host::new();
    let mut e = exec(&[]);
    assert_eq!(host.start(e.clone()).unwrap_err().message, "empty argv");
    e.argv = vec![ByteBuf::new()];
    assert_eq!(
        host.start(e.clone()).unwrap_err().message,
        "empty program name"
    );
    e.argv = vec![bytes("echo"), bytes("a\0b")];
    assert_eq!(
        host.start(e).unwrap_err().message,
        "argument 1 contains a NUL byte"
    );
}

#[test]
fn a_process_id_names_one_process_per_connection() {
    let mut host = Host::new();
    host.start(exec(&["sleep", "1000"])).unwrap();
    let err = host.start(exec(&["true"])).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert_eq!(err.message, "process 1 already exists");
}

#[test]
fn a_stream_id_names_one_stream() {
    let mut host = Host::new();
    let out = stream_id();
    let mut first = exec(&["sleep", "1000"]);
    first.stdout = Stdio::Stream(out);
    host.start(first).unwrap();
    let mut second = exec(&["true"]);
    second.process = 2;
    second.stdin = Some(out);
    let err = host.start(second).unwrap_err();
    assert_eq!(err.message, format!("stream {out} is already in use"));
}

/// Starts a shell (process 1) with a background child, then sends it
/// SIGKILL (`group` as asked); returns the child's pid once the shell died.
fn kill_a_shell_with_a_child(host: &mut Host, group: bool) -> u32 {
    let out = stream_id();
    let mut e = exec(&["sh", "-c", "sleep 1000 & echo $!; wait"]);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    let first = host.expect(
        "the child's pid",
        |m| matches!(m, Message::Data { stream, .. } if *stream == out),
    );
    let Message::Data { bytes, .. } = first else {
        unreachable!()
    };
    let child: u32 = text(&bytes).trim().parse().unwrap();
    let kill = Request::Signal {
        process: 1,
        signal: libc::SIGKILL,
        group,
    };
    assert_eq!(host.request(kill), Ok(Response::Done));
    assert_eq!(host.exited(1), ExitStatus::Signal(libc::SIGKILL));
    child
}

#[test]
fn killing_a_process_kills_its_process_group() {
    let mut host = Host::new();
    let child = kill_a_shell_with_a_child(&mut host, true);
    eventually("the shell's child is gone too", || process_gone(child));
}

#[test]
fn a_signal_without_group_reaches_the_process_alone() {
    let mut host = Host::new();
    let child = kill_a_shell_with_a_child(&mut host, false);
    assert!(!process_gone(child), "the shell's child was signalled too");
    // SAFETY: kill(2) with a pid and a signal number touches no memory.
    unsafe { libc::kill(child as i32, libc::SIGKILL) };
}

#[test]
fn a_signal_is_delivered_to_a_running_process() {
    let mut host = Host::new();
    let out = stream_id();
    let mut e = exec(&[
        "sh",
        "-c",
        "trap 'echo got USR1; exit 7' USR1; echo ready; while :; do sleep 0.01; done",
    ]);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    host.expect(
        "the trap to be set",
        |m| matches!(m, Message::Data { stream, .. } if *stream == out),
    );
    let usr1 = Request::Signal {
        process: 1,
        signal: libc::SIGUSR1,
        group: true,
    };
    assert_eq!(host.request(usr1), Ok(Response::Done));
    assert_eq!(host.exited(1), ExitStatus::Code(7));
    assert_eq!(text(&host.read_stream(out)), "got USR1\n");
}

#[test]
fn signals_for_unknown_processes_and_invalid_signals_are_refused() {
    let mut host = Host::new();
    let err = host
        .request(Request::Signal {
            process: 42,
            signal: libc::SIGTERM,
            group: true,
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoSuchProcess);
    assert_eq!(err.message, "no such process 42");
    host.start(exec(&["sleep", "1000"])).unwrap();
    let err = host
        .request(Request::Signal {
            process: 1,
            signal: 1000,
            group: true,
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert_eq!(err.message, "invalid signal 1000");
}

#[test]
fn an_exited_process_can_no_longer_be_signalled() {
    let mut host = Host::new();
    host.start(exec(&["true"])).unwrap();
    assert_eq!(host.exited(1), ExitStatus::Code(0));
    let err = host
        .request(Request::Signal {
            process: 1,
            signal: libc::SIGTERM,
            group: true,
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoSuchProcess);
}

#[test]
fn processes_start_in_their_own_session_with_umask_022_and_no_signals_blocked() {
    let mut host = Host::new();
    // Read by the process the agent started, not by a shell in between.
    let (_, out, _) = host.run(&["grep", "-E", "^(Umask|SigBlk):", "/proc/self/status"]);
    let fields: Vec<Vec<&str>> = text(&out)
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        fields,
        [vec!["Umask:", "0022"], vec!["SigBlk:", "0000000000000000"]]
    );
    let out = stream_id();
    let mut e = exec(&["cut", "-d", " ", "-f6", "/proc/self/stat"]);
    e.stdout = Stdio::Stream(out);
    let pid = host.start(e).unwrap();
    // The session id is the process's own pid.
    assert_eq!(text(&host.read_stream(out)), format!("{pid}\n"));
}

#[test]
fn without_a_user_a_host_mode_process_runs_as_the_host_program() {
    let mut host = Host::new();
    let (_, out, _) = host.run(&["id", "-u"]);
    let uid = rustix::process::geteuid().as_raw();
    assert_eq!(text(&out).trim(), uid.to_string());
}

#[test]
fn a_process_runs_as_the_user_asked_for() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let mut host = Host::new();
    let mut e = exec(&["sh", "-c", "id -u; id -g; id -G"]);
    e.user = Some("4242:4343".into());
    let (status, out, _) = host.run_exec(e);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(text(&out), "4242\n4343\n4343\n");
}

#[test]
fn an_unknown_user_is_no_such_user() {
    let mut host = Host::new();
    let mut e = exec(&["true"]);
    e.user = Some("cc-agent-no-such-user".into());
    let err = host.start(e).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoSuchUser);
    let mut e = exec(&["true"]);
    e.user = Some(":5".into());
    assert_eq!(host.start(e).unwrap_err().kind, ErrorKind::InvalidArgument);
}

#[test]
fn the_host_resetting_stdout_gives_the_process_a_broken_pipe() {
    let mut host = Host::new();
    let out = stream_id();
    let mut e = exec(&["yes"]);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    host.expect(
        "output",
        |m| matches!(m, Message::Data { stream, .. } if *stream == out),
    );
    host.send(&Message::Reset { stream: out });
    assert_eq!(host.exited(1), ExitStatus::Signal(libc::SIGPIPE));
}

#[test]
fn a_process_that_stops_reading_stdin_makes_the_agent_reset_it() {
    let mut host = Host::new();
    let input = stream_id();
    let mut e = exec(&["true"]);
    e.stdin = Some(input);
    host.start(e).unwrap();
    assert_eq!(host.exited(1), ExitStatus::Code(0));
    // The pipe's reader is gone: a write fails, and the agent tells the
    // host to stop sending. Not necessarily the first write: a process
    // forked meanwhile (for another test) holds a copy of the pipe until
    // it execs.
    let is_reset = |m: &Message| matches!(m, Message::Reset { stream } if *stream == input);
    let mut sent = 0;
    while !host.arrives(Duration::from_millis(20), is_reset) {
        assert!(sent < STREAM_WINDOW as usize, "no reset after {sent} bytes");
        host.send(&Message::Data {
            stream: input,
            bytes: bytes([1; 1000]),
        });
        sent += 1000;
    }
}

#[test]
fn a_host_reset_of_stdin_ends_the_process_input() {
    let mut host = Host::new();
    let (input, out) = (stream_id(), stream_id());
    let mut e = exec(&["wc", "-c"]);
    e.stdin = Some(input);
    e.stdout = Stdio::Stream(out);
    host.start(e).unwrap();
    host.send(&Message::Data {
        stream: input,
        bytes: bytes("abc"),
    });
    host.send(&Message::Reset { stream: input });
    let count = host.read_stream(out);
    assert!(matches!(text(&count).trim(), "0" | "3"), "{}", text(&count));
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}

#[test]
fn processes_still_running_when_the_host_hangs_up_are_killed() {
    let mut host = Host::new();
    let pid = host.start(exec(&["sleep", "1000"])).unwrap();
    let mut second = exec(&["sh", "-c", "sleep 1000"]);
    second.process = 2;
    let second = host.start(second).unwrap();
    host.hang_up();
    assert!(process_gone(pid));
    assert!(process_gone(second));
}

/// The messages in what one `read` of `socket` returns (whole frames: the
/// agent writes each, or each group, in one write).
fn one_read(socket: &mut UnixStream) -> Vec<Message> {
    let mut chunk = vec![0; 1 << 16];
    let n = socket.read(&mut chunk).unwrap();
    let mut bytes = &chunk[..n];
    let mut buf = Vec::new();
    let mut messages = Vec::new();
    while let Some(msg) = frame::read(&mut bytes, &mut buf).unwrap() {
        messages.push(msg);
    }
    messages
}

#[test]
fn a_quick_process_start_and_exit_reach_the_host_in_one_write() {
    let agent = Agent::new(Mode::Host).unwrap();
    let (mut socket, guest) = UnixStream::pair().unwrap();
    let server = {
        let agent = agent.clone();
        thread::spawn(move || agent.serve(guest))
    };
    let mut buf = Vec::new();
    let hello = frame::read(&mut socket, &mut buf).unwrap();
    assert!(matches!(hello, Some(Message::Hello { .. })), "{hello:?}");
    // `true` usually ends well within the agent's wait, but a loaded host
    // may take longer now and then.
    let mut together = 0;
    for process in 1..=20 {
        let mut e = exec(&["true"]);
        e.process = process;
        let request = Message::Request {
            id: process,
            body: Request::Exec(e),
        };
        frame::write(&mut socket, &request).unwrap();
        let mut messages = one_read(&mut socket);
        let started = Message::Response {
            id: process,
            body: Ok(Response::Started { pid: 0 }),
        };
        match &messages[0] {
            Message::Response {
                id,
                body: Ok(Response::Started { .. }),
            } if *id == process => {}
            other => panic!("expected {started:?}, got {other:?}"),
        }
        if messages.len() == 1 {
            messages.extend(frame::read(&mut socket, &mut buf).unwrap());
        } else {
            together += 1;
        }
        let exited = Message::Exited {
            process,
            status: ExitStatus::Code(0),
        };
        assert_eq!(messages[1..], [exited]);
    }
    assert!(together > 0, "never in one write");
    drop(socket);
    server.join().unwrap();
}

#[test]
fn a_process_without_input_that_keeps_running_is_announced_while_it_runs() {
    let mut host = Host::new();
    host.start(exec(&["sleep", "60"])).unwrap();
    assert!(!host.arrives(Duration::from_millis(200), |m| matches!(
        m,
        Message::Exited { .. }
    )));
    let kill = Request::Signal {
        process: 1,
        signal: libc::SIGKILL,
        group: true,
    };
    assert_eq!(host.request(kill), Ok(Response::Done));
    assert_eq!(host.exited(1), ExitStatus::Signal(libc::SIGKILL));
}

#[test]
fn a_process_runs_with_the_resource_limits_asked_for() {
    let mut host = Host::new();
    let mut e = exec(&["sh", "-c", "ulimit -Sn; ulimit -Hn"]);
    e.rlimits = vec![Rlimit {
        resource: libc::RLIMIT_NOFILE,
        soft: 100,
        hard: 200,
    }];
    let (status, out, _) = host.run_exec(e);
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(text(&out), "100\n200\n");
}

#[test]
fn a_resource_limit_the_kernel_refuses_fails_the_start_naming_it() {
    let mut host = Host::new();
    let mut e = exec(&["true"]);
    e.rlimits = vec![Rlimit {
        resource: libc::RLIMIT_NOFILE,
        soft: 300,
        hard: 200,
    }];
    let err = host.start(e).unwrap_err();
    assert_eq!(err.errno, Some(libc::EINVAL), "{}", err.message);
    assert!(err.message.contains("RLIMIT_NOFILE"), "{}", err.message);
    // No process was started, so none ever exits.
    host.start(exec(&["true"])).unwrap();
    assert_eq!(host.exited(1), ExitStatus::Code(0));
}
