//! Host ↔ guest TCP over the agent channel: [`Listener`]s guest programs
//! reach at `host.internal`, [`Instance::dial`] into the guest, and
//! [`Exposed`] guest ports published on the host's loopback. None of it
//! needs the guest's network device, so it works with egress off.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cc_cancel::CancelToken;
use cc_protocol::{Request, Response, HOST_INTERNAL_ADDR, HOST_INTERNAL_NAME};

use crate::cancel;
use crate::channel::{AcceptQueue, Accepted, Ended};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::instance::{Inner, Instance, REQUEST_TIMEOUT};
use crate::process::{ChildOutput, ChildStdin};

/// Dialing waits this long for the agent (which itself gives up connecting
/// after 10 s).
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// An IPv4 address and port, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) ip: Ipv4Addr,
    pub(crate) port: u16,
}

fn check_network(network: &str) -> Result<()> {
    match network {
        "tcp" | "tcp4" => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "unknown network kind {other:?}: use \"tcp\" or \"tcp4\""
        ))),
    }
}

fn parse_port(text: &str, address: &str) -> Result<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidArgument(format!(
            "malformed address {address:?}: the port must be a number"
        )));
    }
    text.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "port {text} in {address:?} is out of range (0-65535)"
        ))
    })
}

/// Parses `"host:port"` or `":port"`; `host` is an IPv4 address or one of
/// `names` (mapped to `named`); an empty host is `named` too.
fn parse(network: &str, address: &str, names: &[&str], named: Ipv4Addr) -> Result<Endpoint> {
    check_network(network)?;
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(Error::InvalidArgument(format!(
            "malformed address {address:?}: expected \"host:port\" or \":port\""
        )));
    };
    let port = parse_port(port, address)?;
    let ip = if host.is_empty() || names.contains(&host) {
        named
    } else {
        host.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "malformed address {address:?}: {host:?} is not an IPv4 address{}",
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" or {}", names.join(", "))
                }
            ))
        })?
    };
    Ok(Endpoint { ip, port })
}

fn host_internal() -> Ipv4Addr {
    HOST_INTERNAL_ADDR
        .parse()
        .unwrap_or(Ipv4Addr::new(127, 0, 0, 254))
}

/// Where a listener listens in the guest: `":port"` and
/// `"host.internal:port"` are `host.internal`; an IPv4 host (say
/// `0.0.0.0`) listens there instead.
pub(crate) fn parse_listen(network: &str, address: &str) -> Result<Endpoint> {
    parse(network, address, &[HOST_INTERNAL_NAME], host_internal())
}

/// What a dial connects to in the guest: `":port"` and `"localhost:port"`
/// are the guest's `127.0.0.1`. Port 0 is refused.
pub(crate) fn parse_dial(network: &str, address: &str) -> Result<Endpoint> {
    let end = parse(network, address, &["localhost"], Ipv4Addr::LOCALHOST)?;
    if end.port == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot dial port 0 ({address:?})"
        )));
    }
    Ok(end)
}

fn net_error(op: &str, addr: impl ToString, e: cc_protocol::RemoteError) -> Error {
    let source = match e.errno {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.message),
    };
    Error::Net {
        op: op.into(),
        addr: addr.to_string(),
        source,
    }
}

impl Inner {
    /// Connects to `end` inside the guest.
    pub(crate) fn dial(self: &Arc<Self>, end: Endpoint) -> Result<Conn> {
        self.check_running()?;
        let (to_guest, outbound) = self.channel.open_outbound();
        let (from_guest, inbound) = self.channel.open_inbound();
        let reader = ChildOutput::new(self.clone(), from_guest, inbound);
        let writer = ChildStdin::new(self.clone(), to_guest, outbound);
        let target = format!("{}:{}", end.ip, end.port);
        let reply = self.channel.request(
            Request::Dial {
                address: end.ip.to_string(),
                port: end.port,
                to_guest,
                from_guest,
            },
            DIAL_TIMEOUT,
        )?;
        match reply {
            // Dropping the halves on failure closes the streams.
            Ok(Response::Connected { local }) => Ok(Conn::socket(reader, writer, local, target)),
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected answer to dial: {other:?}"
            ))),
            Err(e) => Err(net_error("connect", target, e)),
        }
    }
}

impl Instance {
    /// Listens for guest connections: guest programs connect to
    /// `host.internal` (in the guest's `/etc/hosts`) at the port, and each
    /// connection is returned by [`Listener::accept`]. `network` is `"tcp"`
    /// or `"tcp4"`; `address` is `":port"` or `"host.internal:port"` (an
    /// IPv4 host such as `"0.0.0.0:port"` listens on that guest address
    /// instead). Port 0 picks a free port: see [`Listener::port`].
    ///
    /// Connections travel over the agent channel, so this works with the
    /// network off. Closing the instance closes its listeners.
    pub fn listen(&self, network: &str, address: &str) -> Result<Listener> {
        let end = parse_listen(network, address)?;
        let inner = self.inner();
        inner.check_running()?;
        let (id, queue) = inner.channel.open_listener();
        let reply = inner.channel.request(
            Request::Listen {
                listener: id,
                address: end.ip.to_string(),
                port: end.port,
            },
            REQUEST_TIMEOUT,
        );
        let port = match reply {
            Ok(Ok(Response::Bound { port })) => port,
            failed => {
                inner.channel.close_listener(id);
                return Err(match failed {
                    Err(e) => e,
                    Ok(Err(e)) => net_error("listen", format!("{}:{}", end.ip, end.port), e),
                    Ok(Ok(other)) => {
                        Error::Protocol(format!("unexpected answer to listen: {other:?}"))
                    }
                });
            }
        };
        let host = if end.ip == host_internal() {
            HOST_INTERNAL_NAME.to_string()
        } else {
            end.ip.to_string()
        };
        Ok(Listener {
            inst: inner.clone(),
            id,
            queue,
            addr: format!("{host}:{port}"),
            local_ip: end.ip,
            port,
            closed: AtomicBool::new(false),
        })
    }

    /// Connects to a TCP service inside the guest: `address` is
    /// `"ip:port"` as seen in the guest (`"127.0.0.1:8080"`, or `":8080"`
    /// for the guest's loopback). Fails with a network error when nothing
    /// listens there.
    pub fn dial(&self, network: &str, address: &str) -> Result<Conn> {
        let end = parse_dial(network, address)?;
        self.inner().dial(end)
    }

    /// Publishes the guest's TCP port `guest_port` (on its loopback, or any
    /// address the service listens on) at `127.0.0.1:host_port` on the host;
    /// `host_port` 0 picks a free port: see [`Exposed::host_port`]. Every
    /// host connection becomes a connection to the guest service. Closing
    /// the returned handle (or the instance) unpublishes it and closes its
    /// connections.
    pub fn expose(&self, guest_port: u16, host_port: u16) -> Result<Exposed> {
        if guest_port == 0 {
            return Err(Error::InvalidArgument("cannot expose guest port 0".into()));
        }
        let inner = self.inner();
        inner.check_running()?;
        let mut exposed = inner.exposed();
        exposed.retain(|e| !e.stopped.load(Ordering::SeqCst));
        if let Some(e) = exposed.iter().find(|e| e.guest_port == guest_port) {
            return Err(Error::InvalidArgument(format!(
                "guest port {guest_port} is already exposed at 127.0.0.1:{}",
                e.host_port
            )));
        }
        let socket =
            TcpListener::bind((Ipv4Addr::LOCALHOST, host_port)).map_err(|source| Error::Net {
                op: "listen".into(),
                addr: format!("127.0.0.1:{host_port}"),
                source,
            })?;
        let bound = socket
            .local_addr()
            .map_err(Error::io("listener address", "expose"))?
            .port();
        let shared = Arc::new(ExposeShared {
            guest_port,
            host_port: bound,
            stopped: AtomicBool::new(false),
            acceptor_fd: socket.as_raw_fd(),
            threads: Mutex::default(),
            streams: Mutex::default(),
        });
        let (weak, shared2) = (Arc::downgrade(inner), shared.clone());
        let acceptor = std::thread::Builder::new()
            .name(format!("cc-expose-{bound}"))
            .spawn(move || serve_exposed(&socket, &weak, &shared2))
            .map_err(Error::io("spawn", "expose thread"))?;
        *lock(&shared.threads) = vec![acceptor];
        exposed.push(shared.clone());
        Ok(Exposed { shared })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A listener for guest connections: see [`Instance::listen`]. Dropping it
/// closes it.
#[derive(Debug)]
pub struct Listener {
    inst: Arc<Inner>,
    id: u64,
    queue: Arc<AcceptQueue>,
    addr: String,
    local_ip: Ipv4Addr,
    port: u16,
    closed: AtomicBool,
}

impl Listener {
    /// The address guest programs connect to: `host.internal:PORT` (or
    /// `IP:PORT` for a listener on another guest address).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port it listens on (the one picked, when asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next guest connection. `cancel` stops the wait with
    /// [`Error::Cancelled`](crate::ErrorCode::Cancelled); closing the
    /// listener from another thread ends it with [`Error::AlreadyClosed`];
    /// the instance ending, with [`Error::NotRunning`].
    pub fn accept(&self, cancel: Option<&CancelToken>) -> Result<Conn> {
        cancel::maybe("accept", cancel, || {
            self.accept_until(None)?
                .ok_or_else(|| cancel::cancelled("accept"))
        })
    }

    /// Like [`accept`](Self::accept), but gives up after `timeout`
    /// (`Ok(None)`).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Option<Conn>> {
        self.accept_until(Some(Instant::now() + timeout))
    }

    fn accept_until(&self, deadline: Option<Instant>) -> Result<Option<Conn>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::AlreadyClosed);
        }
        match self.queue.pop(deadline) {
            Ok(Some(accepted)) => Ok(Some(self.conn(accepted))),
            Ok(None) => Ok(None),
            Err(Ended::Closed) => Err(Error::AlreadyClosed),
            Err(Ended::Lost(gone)) => Err(gone.error()),
        }
    }

    fn conn(&self, a: Accepted) -> Conn {
        let Accepted {
            peer,
            to_guest,
            from_guest,
        } = a;
        Conn::socket(
            ChildOutput::new(self.inst.clone(), from_guest.0, from_guest.1),
            ChildStdin::new(self.inst.clone(), to_guest.0, to_guest.1),
            format!("{}:{}", self.local_ip, self.port),
            peer,
        )
    }

    /// Stops listening: guest connections to the port are refused from now
    /// on; connections already accepted stay open. A blocked `accept` ends
    /// with [`Error::AlreadyClosed`]. Closing again does nothing.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inst.channel.close_listener(self.id);
        if self.inst.check_running().is_ok() {
            // The agent no longer knows it if its accept loop failed; the
            // listener is gone either way.
            let _ = self
                .inst
                .channel
                .request(Request::Unlisten { listener: self.id }, REQUEST_TIMEOUT)?;
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// State of one exposed port, shared by its handle, its threads and the
/// instance (which stops it on close).
#[derive(Debug)]
pub(crate) struct ExposeShared {
    guest_port: u16,
    host_port: u16,
    stopped: AtomicBool,
    /// The listening socket, owned by the acceptor thread; shut down to
    /// wake it.
    acceptor_fd: std::os::fd::RawFd,
    /// The acceptor and one thread per live connection direction.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Both ends of every live connection, to end them on stop.
    streams: Mutex<Vec<(TcpStream, Conn)>>,
}

impl ExposeShared {
    /// Stops accepting, ends every connection and joins every thread.
    /// Idempotent; called from the handle and from the instance's close.
    pub(crate) fn stop(&self) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            // SAFETY: shutdown(2) takes no pointers. The acceptor thread
            // closes the socket only after it saw `stopped`, which was set
            // above, and is joined below, so the descriptor is still its
            // listening socket here.
            unsafe { libc::shutdown(self.acceptor_fd, libc::SHUT_RDWR) };
        }
        let threads = {
            // Under the threads lock: a connection being set up either
            // registered before (and is ended here) or sees `stopped`.
            let mut threads = lock(&self.threads);
            for (socket, conn) in lock(&self.streams).drain(..) {
                let _ = socket.shutdown(Shutdown::Both);
                conn.close();
            }
            std::mem::take(&mut *threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Accepts host connections until stopped, bridging each to a new dial
/// into the guest.
fn serve_exposed(socket: &TcpListener, inst: &std::sync::Weak<Inner>, shared: &Arc<ExposeShared>) {
    loop {
        let accepted = socket.accept();
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let (host, _) = match accepted {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(port = shared.host_port, "expose: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(inner) = inst.upgrade() else { return };
        let guest = match inner.dial(Endpoint {
            ip: Ipv4Addr::LOCALHOST,
            port: shared.guest_port,
        }) {
            Ok(c) => c,
            Err(e) => {
                // The host client sees the connection close at once.
                tracing::debug!(port = shared.guest_port, "expose: dial: {e}");
                continue;
            }
        };
        drop(inner);
        if let Err(e) = bridge(shared, host, guest) {
            tracing::warn!(port = shared.host_port, "expose: {e}");
        }
    }
}

/// Starts the two copy threads of one exposed connection.
fn bridge(shared: &Arc<ExposeShared>, host: TcpStream, guest: Conn) -> io::Result<()> {
    let mut threads = lock(&shared.threads);
    if shared.stopped.load(Ordering::SeqCst) {
        guest.close();
        return Ok(());
    }
    // Forget connections that ended, so a long-lived port does not grow.
    let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *threads)
        .into_iter()
        .enumerate()
        .partition(|(i, t)| *i > 0 && t.is_finished());
    *threads = live.into_iter().map(|(_, t)| t).collect();
    for (_, t) in done {
        let _ = t.join();
    }
    {
        let mut streams = lock(&shared.streams);
        streams.retain(|(_, c)| !c.is_closed());
        streams.push((host.try_clone()?, guest.clone()));
    }
    let (host2, guest2) = (host.try_clone()?, guest.clone());
    threads.push(
        std::thread::Builder::new()
            .name("cc-expose-in".into())
            .spawn(move || host_to_guest(host2, &guest2))?,
    );
    threads.push(
        std::thread::Builder::new()
            .name("cc-expose-out".into())
            .spawn(move || guest_to_host(&guest, host))?,
    );
    Ok(())
}

fn host_to_guest(mut host: TcpStream, guest: &Conn) {
    let mut buf = vec![0u8; 128 << 10];
    loop {
        match host.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if guest.write(&buf[..n]).is_err() {
                    let _ = host.shutdown(Shutdown::Read);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    guest.close_write();
}

fn guest_to_host(guest: &Conn, mut host: TcpStream) {
    loop {
        match guest.read(128 << 10) {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                if host.write_all(&data).is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = host.shutdown(Shutdown::Write);
    // Both directions are over once the guest's side ended: the host's
    // reader may still be waiting on a client that never closes.
    guest.close();
    let _ = host.shutdown(Shutdown::Both);
}

/// A guest port published on the host: see [`Instance::expose`]. Dropping
/// it unpublishes the port.
#[derive(Debug)]
pub struct Exposed {
    shared: Arc<ExposeShared>,
}

impl Exposed {
    /// The host port (on `127.0.0.1`) that reaches the guest port.
    pub fn host_port(&self) -> u16 {
        self.shared.host_port
    }

    pub fn guest_port(&self) -> u16 {
        self.shared.guest_port
    }

    /// `127.0.0.1:PORT` on the host.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.shared.host_port))
    }

    /// Unpublishes the port and closes its connections. Closing again does
    /// nothing.
    pub fn close(&self) {
        self.shared.stop();
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    //! Address parsing (pure, no VM).
    use super::*;

    fn err(r: Result<Endpoint>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::InvalidArgument, "{e}");
        e.to_string()
    }

    #[test]
    fn listen_addresses() {
        let hi = host_internal();
        assert_eq!(
            parse_listen("tcp", ":8080").unwrap(),
            Endpoint { ip: hi, port: 8080 }
        );
        assert_eq!(
            parse_listen("tcp4", "host.internal:0").unwrap(),
            Endpoint { ip: hi, port: 0 }
        );
        assert_eq!(
            parse_listen("tcp", "0.0.0.0:65535").unwrap(),
            Endpoint {
                ip: Ipv4Addr::UNSPECIFIED,
                port: 65535
            }
        );
    }

    #[test]
    fn dial_addresses() {
        assert_eq!(
            parse_dial("tcp", "127.0.0.1:80").unwrap(),
            Endpoint {
                ip: Ipv4Addr::LOCALHOST,
                port: 80
            }
        );
        assert_eq!(parse_dial("tcp", ":22").unwrap().port, 22);
        assert_eq!(parse_dial("tcp", "localhost:22").unwrap().port, 22);
        assert!(err(parse_dial("tcp", "127.0.0.1:0")).contains("port 0"));
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(err(parse_listen("udp", ":80")).contains("unknown network kind \"udp\""));
        assert!(err(parse_listen("tcp6", ":80")).contains("unknown network kind"));
        assert!(err(parse_listen("tcp", "8080")).contains("expected \"host:port\""));
        assert!(err(parse_listen("tcp", ":")).contains("must be a number"));
        assert!(err(parse_listen("tcp", ":http")).contains("must be a number"));
        assert!(err(parse_listen("tcp", ":-1")).contains("must be a number"));
        assert!(err(parse_listen("tcp", ":65536")).contains("out of range"));
        assert!(err(parse_listen("tcp", ":99999999999")).contains("out of range"));
        assert!(err(parse_listen("tcp", "example.com:80")).contains("not an IPv4 address"));
        assert!(err(parse_listen("tcp", "[::1]:80")).contains("not an IPv4 address"));
        assert!(err(parse_dial("tcp", "1.2.3:80")).contains("not an IPv4 address"));
    }
}
