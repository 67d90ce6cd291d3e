//! TCP connections between guest programs and the host, carried over the
//! agent channel so they work without a network device: `Dial` connects
//! inside the guest for the host, `Listen` accepts guest connections for
//! the host's listeners.
//!
//! Each connection is a pair of streams bridged to its socket by two
//! threads, one per direction. A stream's end of file is a half close of
//! the socket; a reset aborts both directions. Both threads end when the
//! socket is closed or the connection is lost, and the socket is closed
//! when both have ended.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use cc_protocol::{Message, RemoteError, Response};

use crate::conn::{Conn, Reply};
use crate::error;
use crate::stream::{DrainError, Receiver, Sender};

/// How long a dial waits for the guest service to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn ipv4(address: &str) -> Result<Ipv4Addr, RemoteError> {
    address
        .parse()
        .map_err(|_| error::invalid(format!("{address:?} is not an IPv4 address")))
}

/// Connects to `address:port` in the guest and bridges the connection to
/// the host's streams. Answers once connected (or failed).
pub fn dial(reply: Reply, address: &str, port: u16, sender: Sender, receiver: Receiver) {
    let addr = match ipv4(address) {
        Ok(ip) => SocketAddrV4::new(ip, port),
        Err(e) => return reply.send(Err(e)),
    };
    let socket = match TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return reply.send(Err(error::os(format!("connect to {addr}"), &e))),
    };
    let local = socket
        .local_addr()
        .map_or_else(|_| "0.0.0.0:0".into(), |a| a.to_string());
    let conn = reply.conn().clone();
    reply.send(Ok(Response::Connected { local }));
    bridge(&conn, socket, sender, receiver);
}

/// Binds the listener the host asked for, answers with its port, then
/// accepts until the host stops it or the connection is lost.
pub fn listen(reply: Reply, listener: u64, address: &str, port: u16) {
    let conn = reply.conn().clone();
    let bound = ipv4(address).and_then(|ip| {
        let addr = SocketAddrV4::new(ip, port);
        let socket =
            TcpListener::bind(addr).map_err(|e| error::os(format!("listen on {addr}"), &e))?;
        let port = socket
            .local_addr()
            .map_err(|e| error::os("listener address", &e))?
            .port();
        let stop = socket.try_clone().map_err(|e| error::os("listener", &e))?;
        conn.add_listener(listener, OwnedFd::from(stop))?;
        Ok((socket, port))
    });
    let socket = match bound {
        Ok((socket, port)) => {
            reply.send(Ok(Response::Bound { port }));
            socket
        }
        Err(e) => return reply.send(Err(e)),
    };
    accept_loop(&conn, listener, &socket);
    conn.remove_listener(listener);
}

fn accept_loop(conn: &Arc<Conn>, listener: u64, socket: &TcpListener) {
    loop {
        let (stream, peer) = match socket.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Unlisten shut the socket down, or the connection is gone.
            Err(_) if !conn.has_listener(listener) => return,
            Err(e) => {
                log!("listener {listener}: accept: {}", error::describe(&e));
                // Out of fds, say: back off rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let (to_guest, from_guest) = (conn.new_stream_id(), conn.new_stream_id());
        let streams =
            Sender::open(conn, from_guest).and_then(|s| Ok((s, Receiver::open(conn, to_guest)?)));
        let (sender, receiver) = match streams {
            Ok(pair) => pair,
            Err(e) => {
                log!("listener {listener}: {}", e.message);
                continue;
            }
        };
        let accepted = Message::Accepted {
            listener,
            peer: peer.to_string(),
            to_guest,
            from_guest,
        };
        if conn.send(&accepted).is_err() {
            return;
        }
        let c = conn.clone();
        let started = conn.spawn(format!("accepted-{from_guest}"), move || {
            bridge(&c, stream, sender, receiver);
        });
        if let Err(e) = started {
            log!(
                "listener {listener}: start connection: {}",
                error::describe(&e)
            );
        }
    }
}

/// Copies the socket to the host on `sender` and the host's data to the
/// socket from `receiver`, one direction on a new thread and the other on
/// this one, until both directions ended.
fn bridge(conn: &Conn, socket: TcpStream, sender: Sender, receiver: Receiver) {
    let outgoing = match socket.try_clone() {
        Ok(s) => File::from(OwnedFd::from(s)),
        Err(e) => {
            log!("connection: {}", error::describe(&e));
            sender.reset();
            receiver.reset();
            return;
        }
    };
    let pump = conn.spawn(format!("socket-{}", sender.id()), move || {
        sender.pump(outgoing);
    });
    if let Err(e) = pump {
        // The sender went down with the closure: the host sees a reset.
        log!("connection: start pump: {}", error::describe(&e));
        let _ = socket.shutdown(Shutdown::Both);
        receiver.reset();
        return;
    }
    let mut writer = &socket;
    match receiver.drain(|bytes| writer.write_all(bytes)) {
        Ok(()) => {
            let _ = socket.shutdown(Shutdown::Write);
        }
        // The host aborted the connection, or the guest peer is gone: wake
        // the pump, which ends its stream.
        Err(DrainError::Broken | DrainError::Sink(_)) => {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}
