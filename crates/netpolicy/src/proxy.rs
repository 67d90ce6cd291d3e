//! The filtering proxy between QEMU's stream netdev and the user-mode
//! stack: length-prefixed Ethernet frames (4-byte big-endian length, then
//! the frame) both ways.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::filter::{Filter, Verdict};

/// The largest frame accepted: 64 KiB of IP packet plus the Ethernet
/// header (the stack's MTU is 65520).
pub const MAX_FRAME: usize = 65536 + 14;
/// Buffer size of each direction: a few maximum-size frames per syscall.
const BUF_SIZE: usize = 256 * 1024;

/// Why a frame stream ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("network frame i/o")]
    Io(#[from] io::Error),
    #[error("network frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("network stream closed inside a frame")]
    Truncated,
}

/// Reads length-prefixed frames into one reused buffer of at most
/// [`MAX_FRAME`] bytes.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: BufReader<R>,
    frame: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner: BufReader::with_capacity(BUF_SIZE, inner),
            frame: Vec::new(),
        }
    }

    /// The next frame, or `None` when the stream ends between frames.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, ProxyError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ProxyError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(ProxyError::TooLarge(len));
        }
        self.frame.resize(len, 0);
        self.inner
            .read_exact(&mut self.frame)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ProxyError::Truncated,
                _ => ProxyError::Io(e),
            })?;
        Ok(Some(&self.frame))
    }

    /// Whether more input is already buffered (so a flush can wait).
    fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }
}

type Writer = Arc<Mutex<BufWriter<UnixStream>>>;

/// Writes one frame while holding the writer, so frames from the two
/// threads never interleave.
fn write_frame(writer: &Writer, frame: &[u8], flush: bool) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(&(frame.len() as u32).to_be_bytes())?;
    w.write_all(frame)?;
    if flush {
        w.flush()?;
    }
    Ok(())
}

fn flush(writer: &Writer) -> io::Result<()> {
    writer.lock().unwrap_or_else(|e| e.into_inner()).flush()
}

/// The two sockets, kept to end both directions at once.
#[derive(Debug)]
struct Ends {
    guest: UnixStream,
    stack: UnixStream,
}

impl Ends {
    fn shutdown(&self) {
        // Errors mean the peer is already gone, which is the goal.
        let _ = self.guest.shutdown(Shutdown::Both);
        let _ = self.stack.shutdown(Shutdown::Both);
    }
}

/// A running proxy. [`Proxy::close`] or dropping it shuts both sockets
/// down and joins its threads; it also ends by itself when either side
/// closes or sends a malformed stream.
#[derive(Debug)]
pub struct Proxy {
    ends: Arc<Ends>,
    threads: Vec<JoinHandle<()>>,
    /// While false, frames are dropped both ways: the guest is offline.
    enabled: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts copying between `guest` (QEMU's end) and `stack` (the
    /// user-mode stack's end), filtering what the guest sends.
    pub fn start(guest: UnixStream, stack: UnixStream, filter: Filter) -> io::Result<Proxy> {
        Proxy::start_lazy(guest, stack, filter, || Ok(()))
    }

    /// As [`start`](Self::start), but calls `connect` (on the proxy's own
    /// thread) just before the first frame the filter lets through reaches
    /// `stack`: a guest that never sends one costs no user-mode stack. What
    /// the stack sends meanwhile waits in its socket. If `connect` fails,
    /// the proxy ends.
    pub fn start_lazy(
        guest: UnixStream,
        stack: UnixStream,
        mut filter: Filter,
        connect: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<Proxy> {
        let ends = Arc::new(Ends {
            guest: guest.try_clone()?,
            stack: stack.try_clone()?,
        });
        let to_guest: Writer = Arc::new(Mutex::new(BufWriter::with_capacity(
            BUF_SIZE,
            guest.try_clone()?,
        )));
        let to_stack: Writer = Arc::new(Mutex::new(BufWriter::with_capacity(
            BUF_SIZE,
            stack.try_clone()?,
        )));
        let mut threads = Vec::new();
        let enabled = Arc::new(AtomicBool::new(true));
        let (e, replies, on) = (ends.clone(), to_guest.clone(), enabled.clone());
        let spawned = thread::Builder::new()
            .name("cc-net-egress".into())
            .spawn(move || {
                let mut reader = FrameReader::new(guest);
                let mut connect = Some(connect);
                let result = pump(&mut reader, &to_stack, |frame| match filter.check(frame) {
                    _ if !on.load(Ordering::Relaxed) => Ok(false),
                    Verdict::Pass => {
                        if let Some(connect) = connect.take() {
                            connect().inspect_err(|e| {
                                tracing::warn!(error = %e, "network: the user-mode stack did not start")
                            })?;
                        }
                        Ok(true)
                    }
                    Verdict::Drop => Ok(false),
                    Verdict::Refuse(reply) => write_frame(&replies, &reply, true).map(|()| false),
                });
                finish("guest", result, &e);
            });
        threads.push(spawn_or_end(spawned, &ends)?);
        let (e, on) = (ends.clone(), enabled.clone());
        let spawned = thread::Builder::new()
            .name("cc-net-ingress".into())
            .spawn(move || {
                let mut reader = FrameReader::new(stack);
                let result = pump(&mut reader, &to_guest, |_| Ok(on.load(Ordering::Relaxed)));
                finish("stack", result, &e);
            });
        match spawn_or_end(spawned, &ends) {
            Ok(t) => threads.push(t),
            Err(err) => {
                // Ending the sockets ends the first thread too.
                for t in threads {
                    let _ = t.join();
                }
                return Err(err);
            }
        }
        Ok(Proxy {
            ends,
            threads,
            enabled,
        })
    }

    /// Lets frames through (`true`, the start) or drops every frame both
    /// ways (`false`): the guest keeps its interface but nothing leaves or
    /// arrives. Connections survive a short interruption by retransmitting.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether frames pass, as last set.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether both directions have ended.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Shuts both sockets down and waits for the threads.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.ends.shutdown();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("network proxy thread panicked");
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_or_end(spawned: io::Result<JoinHandle<()>>, ends: &Ends) -> io::Result<JoinHandle<()>> {
    spawned.inspect_err(|_| ends.shutdown())
}

/// Copies frames from `reader` to `out` while `keep` says so; flushes
/// whenever no more input is buffered. Returns at the end of the input.
fn pump<R: Read>(
    reader: &mut FrameReader<R>,
    out: &Writer,
    mut keep: impl FnMut(&[u8]) -> io::Result<bool>,
) -> Result<(), ProxyError> {
    while let Some(frame) = reader.next_frame()? {
        if keep(frame)? {
            write_frame(out, frame, false)?;
        }
        if !reader.has_buffered() {
            flush(out)?;
        }
    }
    Ok(())
}

fn finish(from: &str, result: Result<(), ProxyError>, ends: &Ends) {
    match result {
        Ok(()) => tracing::debug!(from, "network proxy: side closed"),
        Err(e @ (ProxyError::TooLarge(_) | ProxyError::Truncated)) => {
            tracing::error!(from, error = %e, "network proxy closed")
        }
        Err(e) => tracing::debug!(from, error = %e, "network proxy ended"),
    }
    ends.shutdown();
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::packet::tests::{check_reply, syn, udp};
    use crate::NetworkPolicy;

    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
    const WAIT: Duration = Duration::from_secs(5);

    /// A proxy and the test's ends: the "QEMU" and the "stack".
    fn start() -> (Proxy, UnixStream, UnixStream) {
        let (guest, qemu) = UnixStream::pair().unwrap();
        let (stack, stack_peer) = UnixStream::pair().unwrap();
        for s in [&qemu, &stack_peer] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        let filter = Filter::with_host_addrs(NetworkPolicy::default(), || Ok(vec![])).unwrap();
        (
            Proxy::start(guest, stack, filter).unwrap(),
            qemu,
            stack_peer,
        )
    }

    fn send(mut s: &UnixStream, frame: &[u8]) {
        s.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
        s.write_all(frame).unwrap();
    }

    fn recv(s: &UnixStream) -> Vec<u8> {
        let mut r = FrameReader::new(s);
        r.next_frame().unwrap().expect("a frame").to_vec()
    }

    /// Whether the peer of `s` closed: reads until EOF, within the wait.
    fn closed(mut s: &UnixStream) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Waits for both threads to end by themselves.
    fn wait_finished(proxy: &Proxy) {
        let t0 = Instant::now();
        while !proxy.is_finished() {
            assert!(t0.elapsed() < WAIT, "threads did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn frames_pass_both_ways() {
        let (proxy, qemu, stack_peer) = start();
        let out = syn(OUTSIDE, 443);
        send(&qemu, &out);
        assert_eq!(recv(&stack_peer), out);
        // Full-size frames, and several back to back.
        let big: Vec<u8> = (0..MAX_FRAME).map(|i| i as u8).collect();
        for _ in 0..3 {
            send(&stack_peer, &big);
        }
        send(&stack_peer, b"small");
        let mut r = FrameReader::new(&qemu);
        for _ in 0..3 {
            assert_eq!(r.next_frame().unwrap().unwrap(), &big[..]);
        }
        assert_eq!(r.next_frame().unwrap().unwrap(), b"small");
        proxy.close();
    }

    #[test]
    fn switched_off_nothing_passes_either_way_until_switched_on() {
        let (proxy, qemu, stack_peer) = start();
        proxy.set_enabled(false);
        send(&qemu, &syn(OUTSIDE, 443));
        send(&stack_peer, b"inbound while off");
        // Nothing arrives on either side within a moment.
        for s in [&qemu, &stack_peer] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 64];
            assert!((&*s).read(&mut buf).is_err(), "a frame passed while off");
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        proxy.set_enabled(true);
        let out = syn(OUTSIDE, 80);
        send(&qemu, &out);
        assert_eq!(recv(&stack_peer), out);
        send(&stack_peer, b"inbound");
        assert_eq!(recv(&qemu), b"inbound");
        proxy.close();
    }

    #[test]
    fn a_lazy_stack_is_connected_once_by_the_first_frame_let_through() {
        let (guest, qemu) = UnixStream::pair().unwrap();
        let (stack, stack_peer) = UnixStream::pair().unwrap();
        for s in [&qemu, &stack_peer] {
            s.set_read_timeout(Some(WAIT)).unwrap();
        }
        let filter = Filter::with_host_addrs(NetworkPolicy::default(), || Ok(vec![])).unwrap();
        let (called, calls) = std::sync::mpsc::channel();
        let proxy = Proxy::start_lazy(guest, stack, filter, move || {
            called.send(()).unwrap();
            Ok(())
        })
        .unwrap();
        // Neither a refused frame, nor what the stack sends, nor a frame
        // sent while switched off, starts it.
        let refused = syn(Ipv4Addr::new(10, 0, 2, 2), 5077);
        send(&qemu, &refused);
        recv(&qemu);
        send(&stack_peer, b"inbound");
        assert_eq!(recv(&qemu), b"inbound");
        proxy.set_enabled(false);
        send(&qemu, &syn(OUTSIDE, 443));
        std::thread::sleep(Duration::from_millis(200));
        assert!(calls.try_recv().is_err(), "connected before a frame passed");
        proxy.set_enabled(true);
        for port in [80, 81] {
            let out = syn(OUTSIDE, port);
            send(&qemu, &out);
            assert_eq!(recv(&stack_peer), out);
        }
        assert_eq!(calls.try_iter().count(), 1);
        proxy.close();
    }

    #[test]
    fn a_lazy_stack_that_fails_to_start_ends_the_proxy() {
        let (guest, qemu) = UnixStream::pair().unwrap();
        let (stack, stack_peer) = UnixStream::pair().unwrap();
        qemu.set_read_timeout(Some(WAIT)).unwrap();
        let filter = Filter::with_host_addrs(NetworkPolicy::default(), || Ok(vec![])).unwrap();
        let proxy =
            Proxy::start_lazy(guest, stack, filter, || Err(io::Error::other("no stack"))).unwrap();
        send(&qemu, &syn(OUTSIDE, 443));
        assert!(closed(&qemu));
        wait_finished(&proxy);
        drop(stack_peer);
    }

    #[test]
    fn a_refused_syn_gets_a_reset_and_goes_no_further() {
        let (proxy, qemu, stack_peer) = start();
        let refused = syn(Ipv4Addr::new(10, 0, 2, 2), 5077);
        send(&qemu, &refused);
        let reply = recv(&qemu);
        let tcp = check_reply(&refused, &reply, 6);
        assert_eq!(tcp[13], 0x14, "RST|ACK");
        // The stack sees the next allowed frame, not the refused one.
        let allowed = udp(OUTSIDE, 123, b"ntp");
        send(&qemu, &allowed);
        assert_eq!(recv(&stack_peer), allowed);
        proxy.close();
    }

    #[test]
    fn an_oversize_length_closes_the_proxy() {
        for from_guest in [true, false] {
            let (proxy, qemu, stack_peer) = start();
            let sender = if from_guest { &qemu } else { &stack_peer };
            let mut s = sender;
            s.write_all(&((MAX_FRAME + 1) as u32).to_be_bytes())
                .unwrap();
            assert!(closed(&qemu), "QEMU's side closed");
            assert!(closed(&stack_peer), "the stack's side closed");
            wait_finished(&proxy);
        }
    }

    #[test]
    fn either_side_closing_ends_it() {
        let (proxy, qemu, stack_peer) = start();
        drop(stack_peer);
        assert!(closed(&qemu));
        wait_finished(&proxy);
    }

    #[test]
    fn close_shuts_down_and_joins_while_peers_stay_open() {
        let (proxy, qemu, stack_peer) = start();
        let t0 = Instant::now();
        proxy.close();
        assert!(t0.elapsed() < WAIT);
        assert!(closed(&qemu));
        assert!(closed(&stack_peer));
        // Dropping joins too.
        let (proxy, qemu, _stack_peer) = start();
        drop(proxy);
        assert!(closed(&qemu));
    }

    #[test]
    fn frame_reader_bounds_and_truncation() {
        let mut input: &[u8] = &[0, 0, 0, 3, b'a', b'b', b'c', 0, 0];
        let mut r = FrameReader::new(&mut input);
        assert_eq!(r.next_frame().unwrap(), Some(&b"abc"[..]));
        assert!(matches!(r.next_frame(), Err(ProxyError::Truncated)));
        let mut input: &[u8] = &[0, 0, 0, 3, b'a'];
        assert!(matches!(
            FrameReader::new(&mut input).next_frame(),
            Err(ProxyError::Truncated)
        ));
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let mut r = FrameReader::new(&mut input);
        assert!(matches!(r.next_frame(), Err(ProxyError::TooLarge(_))));
        assert_eq!(r.frame.capacity(), 0, "nothing allocated for it");
        let mut input: &[u8] = &[];
        assert_eq!(FrameReader::new(&mut input).next_frame().unwrap(), None);
    }
}
