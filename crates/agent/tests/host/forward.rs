//! TCP between the two sides: `Dial` connects where the agent runs,
//! `Listen` accepts there for the host; the bytes travel as stream pairs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use cc_protocol::{ErrorKind, Message, Request, Response, GUEST_STREAM_BASE};

use crate::common::{bytes, eventually, read_all, stream_id, Host};

fn dial(host: &mut Host, port: u16) -> (Result<Response, cc_protocol::RemoteError>, u32, u32) {
    let (to_guest, from_guest) = (stream_id(), stream_id());
    let answer = host.request(Request::Dial {
        address: "127.0.0.1".into(),
        port,
        to_guest,
        from_guest,
    });
    (answer, to_guest, from_guest)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_dialed_connection_carries_bytes_both_ways_and_half_closes() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut host = Host::new();
    let (answer, to_guest, from_guest) = dial(&mut host, server.local_addr().unwrap().port());
    let (mut peer, addr) = server.accept().unwrap();
    assert_eq!(
        answer,
        Ok(Response::Connected {
            local: addr.to_string()
        })
    );
    host.send(&Message::Data {
        stream: to_guest,
        bytes: bytes("ping"),
    });
    let mut buf = [0; 4];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // The host's end of file is a half close: the peer reads to its end
    // and can still answer.
    host.send(&Message::Eof { stream: to_guest });
    assert_eq!(read_all(&mut peer), b"");
    peer.write_all(b"pong").unwrap();
    drop(peer);
    assert_eq!(host.read_stream(from_guest), b"pong");
}

#[test]
fn dialing_a_port_nobody_listens_on_is_refused() {
    let mut host = Host::new();
    let port = free_port();
    let (answer, _, _) = dial(&mut host, port);
    let err = answer.unwrap_err();
    assert_eq!(
        (err.kind, err.errno),
        (ErrorKind::Io, Some(libc::ECONNREFUSED))
    );
    assert_eq!(
        err.message,
        format!("connect to 127.0.0.1:{port}: Connection refused")
    );
}

#[test]
fn dialing_needs_an_ipv4_address() {
    let mut host = Host::new();
    let err = host
        .request(Request::Dial {
            address: "localhost".into(),
            port: 80,
            to_guest: stream_id(),
            from_guest: stream_id(),
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert_eq!(err.message, "\"localhost\" is not an IPv4 address");
}

#[test]
fn a_host_reset_aborts_a_dialed_connection() {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut host = Host::new();
    let (answer, to_guest, from_guest) = dial(&mut host, server.local_addr().unwrap().port());
    assert!(answer.is_ok());
    let (mut peer, _) = server.accept().unwrap();
    host.send(&Message::Reset { stream: to_guest });
    // Both directions are shut: the peer reads its end, and the host's
    // stream from the guest ends too.
    let mut buf = [0; 1];
    assert!(matches!(peer.read(&mut buf), Ok(0) | Err(_)));
    let (data, _) = host.collect(from_guest);
    assert!(data.is_empty());
}

#[test]
fn a_listener_hands_each_connection_to_the_host() {
    let mut host = Host::new();
    let listen = Request::Listen {
        listener: 3,
        address: "127.0.0.1".into(),
        port: 0,
    };
    let Ok(Response::Bound { port }) = host.request(listen) else {
        panic!("not bound")
    };
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accepted = host.expect("the connection", |m| matches!(m, Message::Accepted { .. }));
    let Message::Accepted {
        listener,
        peer,
        to_guest,
        from_guest,
    } = accepted
    else {
        unreachable!()
    };
    assert_eq!(listener, 3);
    assert_eq!(peer, client.local_addr().unwrap().to_string());
    assert!(to_guest >= GUEST_STREAM_BASE && from_guest >= GUEST_STREAM_BASE);
    assert_ne!(to_guest, from_guest);
    client.write_all(b"hi").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(host.read_stream(from_guest), b"hi");
    host.send(&Message::Data {
        stream: to_guest,
        bytes: bytes("yo"),
    });
    host.send(&Message::Eof { stream: to_guest });
    assert_eq!(read_all(&mut client), b"yo");
}

#[test]
fn unlisten_stops_accepting() {
    let mut host = Host::new();
    let listen = Request::Listen {
        listener: 1,
        address: "127.0.0.1".into(),
        port: 0,
    };
    let Ok(Response::Bound { port }) = host.request(listen.clone()) else {
        panic!("not bound")
    };
    let err = host.request(listen).unwrap_err();
    assert_eq!(err.message, "listener 1 already exists");
    assert_eq!(
        host.request(Request::Unlisten { listener: 1 }),
        Ok(Response::Done)
    );
    eventually("the port is closed", || {
        TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    let err = host.request(Request::Unlisten { listener: 1 }).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert_eq!(err.message, "no listener 1");
}

#[test]
fn listening_on_a_port_in_use_fails() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut host = Host::new();
    let err = host
        .request(Request::Listen {
            listener: 1,
            address: "127.0.0.1".into(),
            port,
        })
        .unwrap_err();
    assert_eq!(err.errno, Some(libc::EADDRINUSE));
    assert!(err
        .message
        .starts_with(&format!("listen on 127.0.0.1:{port}: ")));
}

#[test]
fn hanging_up_closes_the_listeners() {
    let mut host = Host::new();
    let listen = Request::Listen {
        listener: 1,
        address: "127.0.0.1".into(),
        port: 0,
    };
    let Ok(Response::Bound { port }) = host.request(listen) else {
        panic!("not bound")
    };
    host.hang_up();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
