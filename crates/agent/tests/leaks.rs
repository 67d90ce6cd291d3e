//! A host-mode connection leaves nothing behind: once `serve` returns, the
//! agent's threads and processes of the connection are gone. Alone in its
//! test binary, so that no other test's threads are counted.

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use cc_agent::{Agent, Ended, Mode};
use cc_protocol::{frame, Exec, Message, Request, Response, Stdio};
use serde_bytes::ByteBuf;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Reads frames until one `want` accepts.
fn until(socket: &UnixStream, mut want: impl FnMut(&Message) -> bool) -> Message {
    let mut buf = Vec::new();
    loop {
        let msg = frame::read(&mut &*socket, &mut buf)
            .unwrap()
            .expect("the agent hung up");
        if want(&msg) {
            return msg;
        }
    }
}

fn request(socket: &UnixStream, id: u64, body: Request) {
    frame::write(&mut &*socket, &Message::Request { id, body }).unwrap();
}

fn answer(socket: &UnixStream, id: u64) -> Result<Response, cc_protocol::RemoteError> {
    match until(
        socket,
        |m| matches!(m, Message::Response { id: i, .. } if *i == id),
    ) {
        Message::Response { body, .. } => body,
        _ => unreachable!(),
    }
}

#[test]
fn a_lost_connection_leaves_no_thread_or_process_behind() {
    let before = threads();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = Agent::new(Mode::Host).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let serving = thread::spawn(move || agent.serve(guest));
    until(&host, |m| matches!(m, Message::Hello { .. }));

    // A process with all three pipes: a feeder, two pumps and a waiter.
    let exec = Exec {
        process: 1,
        argv: ["sh", "-c", "sleep 1000 & echo $!; wait"]
            .iter()
            .map(|a| ByteBuf::from(a.as_bytes()))
            .collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        stdin: Some(1),
        stdout: Stdio::Stream(2),
        stderr: Stdio::Stream(3),
        pty: None,
        root: None,
        rlimits: Vec::new(),
    };
    request(&host, 1, Request::Exec(exec));
    let Ok(Response::Started { pid }) = answer(&host, 1) else {
        panic!("not started")
    };
    let Message::Data { bytes, .. } =
        until(&host, |m| matches!(m, Message::Data { stream: 2, .. }))
    else {
        unreachable!()
    };
    let child: u32 = std::str::from_utf8(&bytes).unwrap().trim().parse().unwrap();
    // An accept loop.
    let listen = Request::Listen {
        listener: 1,
        address: "127.0.0.1".into(),
        port: 0,
    };
    request(&host, 2, listen);
    assert!(matches!(answer(&host, 2), Ok(Response::Bound { .. })));
    // A bridged connection: a pump and a writer.
    let dial = Request::Dial {
        address: "127.0.0.1".into(),
        port: server.local_addr().unwrap().port(),
        to_guest: 4,
        from_guest: 5,
    };
    request(&host, 3, dial);
    assert!(matches!(answer(&host, 3), Ok(Response::Connected { .. })));
    // A request waiting for its stream.
    let path = std::env::temp_dir().join(format!("cc-agent-leaks-{}", std::process::id()));
    let write = Request::WriteFile {
        path: ByteBuf::from(path.as_os_str().as_encoded_bytes()),
        mode: 0o600,
        stream: 6,
    };
    request(&host, 4, write);
    assert!(threads() > before + 6);

    drop(host);
    let ended = serving.join().unwrap();
    assert_eq!(ended, Ended::Lost("the host closed the port".into()));
    let _ = std::fs::remove_file(path);
    // The agent reaped its own child before returning.
    assert!(!exists(pid), "process {pid} outlived the connection");
    // The shell's child was killed with it, and is an orphan for init to
    // reap; the last of the threads may still be on its way out of the
    // kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (threads() > before || exists(child)) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!exists(child), "process {child} outlived the connection");
    assert_eq!(threads(), before);
}

/// Whether `pid` is alive; a zombie waiting for init counts as gone.
fn exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}
