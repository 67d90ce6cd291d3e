//! The multiplexer over a real socket pair, no VM: two ends built from
//! `cc_protocol::mux` as the host and the agent build theirs (a reader
//! thread running `receive`, frames written under one lock), driven to the
//! edges: many streams at once, a peer that never grants credit, resets
//! mid-transfer, a channel that dies with streams open, hostile frames.

use std::io::{self, IoSlice, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cc_protocol::flow::{Inbound, Outbound};
use cc_protocol::frame::{self, FrameReader};
use cc_protocol::mux::{self, Calls, Received, Side, Streams};
use cc_protocol::{Message, RemoteError, Request, Response, DATA_CHUNK, STREAM_WINDOW};

type Reply = Result<Response, RemoteError>;

/// One end of a channel.
struct End {
    streams: Arc<Mutex<Streams>>,
    calls: Arc<Mutex<Calls<Reply>>>,
    writer: Arc<Mutex<UnixStream>>,
    socket: UnixStream,
    /// Ends with why the channel ended.
    reader: Option<JoinHandle<String>>,
}

fn send_on(writer: &Mutex<UnixStream>, msg: &Message) -> io::Result<()> {
    let bytes = frame::encode(msg).map_err(io::Error::other)?;
    writer.lock().unwrap().write_all(&bytes)
}

impl End {
    fn new(side: Side, socket: UnixStream) -> End {
        let streams = Arc::new(Mutex::new(Streams::new(side)));
        let calls = Arc::new(Mutex::new(Calls::default()));
        let writer = Arc::new(Mutex::new(socket.try_clone().unwrap()));
        let mut reader = FrameReader::new(socket.try_clone().unwrap());
        let hang_up = socket.try_clone().unwrap();
        let reader = {
            let (streams, calls, writer) = (streams.clone(), calls.clone(), writer.clone());
            thread::spawn(move || {
                let why = loop {
                    match mux::receive(&mut reader, &streams) {
                        Ok(Some(Received::Stream | Received::Payload { .. })) => {}
                        // Pings are answered, other requests never are.
                        Ok(Some(Received::Message(Message::Request { id, body }))) => {
                            if body == Request::Ping {
                                let pong = Message::Response {
                                    id,
                                    body: Ok(Response::Pong),
                                };
                                let _ = send_on(&writer, &pong);
                            }
                        }
                        Ok(Some(Received::Message(Message::Response { id, body }))) => {
                            calls.lock().unwrap().answer(id, body);
                        }
                        Ok(Some(Received::Message(other))) => {
                            break format!("unexpected {other:?}")
                        }
                        Ok(None) => break "the peer hung up".to_string(),
                        Err(e) => break e.to_string(),
                    }
                };
                streams.lock().unwrap().end();
                calls.lock().unwrap().end();
                let _ = hang_up.shutdown(std::net::Shutdown::Both);
                why
            })
        };
        End {
            streams,
            calls,
            writer,
            socket,
            reader: Some(reader),
        }
    }

    fn pair() -> (End, End) {
        let (host, guest) = UnixStream::pair().unwrap();
        (End::new(Side::Host, host), End::new(Side::Guest, guest))
    }

    fn send(&self, msg: &Message) -> io::Result<()> {
        send_on(&self.writer, msg)
    }

    /// A new outbound stream of this end's numbering.
    fn open_out(&self) -> (u32, Arc<Outbound>) {
        let mut t = self.streams.lock().unwrap();
        let id = t.allocate();
        let s = Arc::new(Outbound::new());
        t.add_outbound(id, s.clone()).unwrap();
        (id, s)
    }

    /// Registers the peer's stream `id` as inbound, as a request naming it
    /// would.
    fn accept_in(&self, id: u32) -> Arc<Inbound> {
        let s = Arc::new(Inbound::new());
        self.streams
            .lock()
            .unwrap()
            .add_inbound(id, s.clone())
            .unwrap();
        s
    }

    /// Sends all of `data` within credit.
    fn write(
        &self,
        id: u32,
        out: &Outbound,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = out.acquire(rest.len().min(DATA_CHUNK), timeout)?;
            let mut header = [0u8; frame::DATA_HEADER_MAX];
            let len = frame::data_header(id, n, &mut header);
            let mut w = self.writer.lock().unwrap();
            let mut parts = [
                IoSlice::new(&header[frame::DATA_HEADER_MAX - len..]),
                IoSlice::new(&rest[..n]),
            ];
            let mut parts = &mut parts[..];
            while !parts.is_empty() {
                let wrote = w.write_vectored(parts)?;
                IoSlice::advance_slices(&mut parts, wrote);
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    fn finish(&self, id: u32, out: &Outbound) {
        if self.streams.lock().unwrap().remove_outbound(id, out) {
            self.send(&Message::Eof { stream: id }).unwrap();
        }
    }

    /// Reads what is there (up to `buf`) until `deadline`, returning credit.
    fn read(
        &self,
        id: u32,
        input: &Inbound,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let r = input.read(buf, deadline)?;
        if r.credit > 0 {
            self.send(&Message::Credit {
                stream: id,
                bytes: r.credit,
            })?;
        }
        if r.len == 0 {
            self.streams.lock().unwrap().remove_inbound(id, input);
        }
        Ok(r.len)
    }

    fn read_to_end(&self, id: u32, input: &Inbound) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match self.read(id, input, &mut buf, None)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Stops reading `id`: the peer's writer is told to stop.
    fn reset_in(&self, id: u32, input: &Inbound) {
        self.streams.lock().unwrap().remove_inbound(id, input);
        input.break_off(cc_protocol::flow::Broken::Closed);
        self.send(&Message::Reset { stream: id }).unwrap();
    }

    fn ping(&self) -> Reply {
        let (id, rx) = self.calls.lock().unwrap().begin();
        self.send(&Message::Request {
            id,
            body: Request::Ping,
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).expect("no pong")
    }

    /// Why the channel ended, once it did (within `limit`).
    fn ended(&mut self, limit: Duration) -> String {
        let reader = self.reader.take().unwrap();
        let start = Instant::now();
        while !reader.is_finished() {
            assert!(start.elapsed() < limit, "the channel did not end");
            thread::sleep(Duration::from_millis(5));
        }
        reader.join().unwrap()
    }
}

impl Drop for End {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The bytes stream `i` carries: its own pattern, so a byte routed to
/// the wrong stream shows.
fn pattern(i: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i * 7) as u8)
        .collect()
}

#[test]
fn a_thousand_streams_carry_their_own_bytes_at_once() {
    const STREAMS: u32 = 1000;
    const WRITERS: u32 = 4;
    let (host, guest) = End::pair();
    let (host, guest) = (Arc::new(host), Arc::new(guest));
    // Every stream open before any byte moves; every 250th carries two
    // windows, so credit flows while the others do.
    let opened: Vec<(u32, Arc<Outbound>, Arc<Inbound>)> = (0..STREAMS)
        .map(|_| {
            let (id, out) = host.open_out();
            (id, out, guest.accept_in(id))
        })
        .collect();
    assert_eq!(host.streams.lock().unwrap().len(), (0, 1000));
    assert_eq!(guest.streams.lock().unwrap().len(), (1000, 0));
    let size = |id: u32| {
        if id.is_multiple_of(250) {
            2 * STREAM_WINDOW as usize + 123
        } else {
            1 + (id as usize * 7919) % 40_000
        }
    };
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let mine: Vec<_> = opened
            .iter()
            .filter(|(id, ..)| id % WRITERS == w)
            .map(|(id, out, _)| (*id, out.clone(), pattern(*id, size(*id))))
            .collect();
        let host = host.clone();
        // Round robin, a slice of each stream at a time.
        threads.push(thread::spawn(move || {
            let mut at = vec![0usize; mine.len()];
            loop {
                let mut busy = false;
                for (k, (id, out, bytes)) in mine.iter().enumerate() {
                    if at[k] < bytes.len() {
                        let end = (at[k] + (64 << 10)).min(bytes.len());
                        host.write(*id, out, &bytes[at[k]..end], None).unwrap();
                        at[k] = end;
                        busy = true;
                        if end == bytes.len() {
                            host.finish(*id, out);
                        }
                    }
                }
                if !busy {
                    break;
                }
            }
        }));
    }
    // Readers take whatever is there on any of their streams.
    let mut readers = Vec::new();
    for r in 0..WRITERS {
        let mine: Vec<_> = opened
            .iter()
            .filter(|(id, ..)| id % WRITERS == (r + 1) % WRITERS)
            .map(|(id, _, input)| (*id, input.clone()))
            .collect();
        let guest = guest.clone();
        readers.push(thread::spawn(move || {
            let mut got: Vec<Option<Vec<u8>>> = vec![Some(Vec::new()); mine.len()];
            let mut buf = vec![0u8; 128 << 10];
            while got.iter().any(Option::is_some) {
                let mut idle = true;
                for (k, (id, input)) in mine.iter().enumerate() {
                    let Some(so_far) = &mut got[k] else { continue };
                    match guest.read(*id, input, &mut buf, Some(Instant::now())) {
                        Ok(0) => {
                            assert!(*so_far == pattern(*id, size(*id)), "stream {id}");
                            got[k] = None;
                            idle = false;
                        }
                        Ok(n) => {
                            so_far.extend_from_slice(&buf[..n]);
                            idle = false;
                        }
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                        Err(e) => panic!("stream {id}: {e}"),
                    }
                }
                if idle {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }));
    }
    for t in threads.into_iter().chain(readers) {
        t.join().unwrap();
    }
    assert_eq!(host.streams.lock().unwrap().len(), (0, 0));
    assert_eq!(guest.streams.lock().unwrap().len(), (0, 0));
    assert_eq!(host.ping(), Ok(Response::Pong));
}

#[test]
fn a_peer_that_never_grants_credit_stalls_only_its_own_stream() {
    let (host, guest) = End::pair();
    let (stalled, out) = host.open_out();
    let never_read = guest.accept_in(stalled);
    let window = vec![1u8; STREAM_WINDOW as usize];
    host.write(stalled, &out, &window, None).unwrap();
    let e = host
        .write(stalled, &out, b"more", Some(Duration::from_millis(200)))
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    // The channel goes on: another stream moves more than a window.
    let (other, out2) = host.open_out();
    let input = guest.accept_in(other);
    let bytes = pattern(other, 3 * STREAM_WINDOW as usize);
    let sender = {
        let bytes = bytes.clone();
        thread::spawn(move || {
            host.write(other, &out2, &bytes, None).unwrap();
            host.finish(other, &out2);
            host
        })
    };
    assert!(guest.read_to_end(other, &input).unwrap() == bytes);
    let host = sender.join().unwrap();
    // What the stalled stream holds is bounded by its window.
    let mut held = vec![0u8; 2 * STREAM_WINDOW as usize];
    let n = never_read
        .read(&mut held, Some(Instant::now()))
        .unwrap()
        .len;
    assert_eq!(n, STREAM_WINDOW as usize);
    assert_eq!(host.ping(), Ok(Response::Pong));
}

#[test]
fn a_reader_reset_mid_transfer_stops_its_writer_and_drops_what_was_in_flight() {
    let (host, guest) = End::pair();
    let (id, out) = host.open_out();
    let input = guest.accept_in(id);
    let host = Arc::new(host);
    let writer = {
        let host = host.clone();
        let out = out.clone();
        thread::spawn(move || {
            let big = vec![5u8; 64 << 20];
            host.write(id, &out, &big, Some(Duration::from_secs(10)))
        })
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < 1 << 20 {
        got += guest.read(id, &input, &mut buf, None).unwrap();
    }
    guest.reset_in(id, &input);
    let e = writer.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    assert_eq!(
        input.read(&mut buf, None).unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );
    // Frames sent before the reset arrived were dropped, not violations.
    assert_eq!(guest.ping(), Ok(Response::Pong));
    assert_eq!(host.ping(), Ok(Response::Pong));
    assert_eq!(host.streams.lock().unwrap().len(), (0, 0));
}

#[test]
fn a_writer_reset_mid_transfer_is_an_error_for_its_reader_not_an_end_of_file() {
    let (host, guest) = End::pair();
    let (id, out) = guest.open_out();
    let input = host.accept_in(id);
    guest.write(id, &out, &[3u8; 100_000], None).unwrap();
    guest.streams.lock().unwrap().remove_outbound(id, &out);
    guest.send(&Message::Reset { stream: id }).unwrap();
    let e = host.read_to_end(id, &input).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(host.ping(), Ok(Response::Pong));
}

#[test]
fn a_channel_that_dies_fails_every_stream_and_request_at_once() {
    let (host, mut guest) = End::pair();
    let host = Arc::new(host);
    // A writer blocked on credit, a reader blocked on data, a request
    // waiting for its answer.
    let (out_id, out) = host.open_out();
    let _never_read = guest.accept_in(out_id);
    host.write(out_id, &out, &vec![0u8; STREAM_WINDOW as usize], None)
        .unwrap();
    let (in_id, _) = guest.open_out();
    let input = host.accept_in(in_id);
    let (call, answer) = host.calls.lock().unwrap().begin();
    host.send(&Message::Request {
        id: call,
        body: Request::Trace { on: false },
    })
    .unwrap();
    let blocked_writer = {
        let (host, out) = (host.clone(), out.clone());
        thread::spawn(move || host.write(out_id, &out, b"x", None))
    };
    let blocked_reader = {
        let (host, input) = (host.clone(), input.clone());
        thread::spawn(move || host.read(in_id, &input, &mut [0u8; 10], None))
    };
    thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    guest.socket.shutdown(std::net::Shutdown::Both).unwrap();
    let lost = io::ErrorKind::ConnectionAborted;
    assert_eq!(blocked_writer.join().unwrap().unwrap_err().kind(), lost);
    assert_eq!(blocked_reader.join().unwrap().unwrap_err().kind(), lost);
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(2)),
        Err(mpsc::RecvTimeoutError::Disconnected)
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(guest.ended(Duration::from_secs(2)), "the peer hung up");
    // Streams opened afterwards fail at once.
    let (_, late) = host.open_out();
    assert_eq!(late.acquire(1, None).unwrap_err().kind(), lost);
    assert_eq!(host.streams.lock().unwrap().len(), (0, 0));
}

/// A raw peer that sends `frames` and then waits for the end under test to
/// close the channel; returns why it did.
fn refused(side: Side, frames: &[Vec<u8>]) -> String {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut end = End::new(side, ours);
    // The peer opened stream 1 (host side) and named its stream 5.
    let _ = end.open_out();
    end.streams.lock().unwrap().announce(5);
    for f in frames {
        theirs.write_all(f).unwrap();
    }
    end.ended(Duration::from_secs(2))
}

#[test]
fn hostile_frames_close_the_channel_with_the_reason() {
    let enc = |m: &Message| frame::encode(m).unwrap();
    let data = |stream, len| Message::Data {
        stream,
        bytes: serde_bytes::ByteBuf::from(vec![0u8; len]),
    };
    let base = cc_protocol::GUEST_STREAM_BASE;
    for msg in [
        data(base + 9, 1),
        Message::Eof { stream: 2 },
        Message::Credit {
            stream: base + 9,
            bytes: 1,
        },
        Message::Reset { stream: 0 },
    ] {
        let why = refused(Side::Host, &[enc(&msg)]);
        assert!(why.contains("never opened"), "{msg:?}: {why}");
    }
    let why = refused(
        Side::Host,
        &[enc(&Message::Credit {
            stream: 1,
            bytes: 1,
        })],
    );
    assert!(why.contains("credit on stream 1 with 0 owed"), "{why}");
    // More than the window on a stream that exists.
    let mut flood = Vec::new();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut end = End::new(Side::Guest, ours);
    let _kept = end.accept_in(5);
    for _ in 0..=STREAM_WINDOW as usize / DATA_CHUNK {
        flood.extend(enc(&data(5, DATA_CHUNK)));
    }
    theirs.write_all(&flood).unwrap();
    let why = end.ended(Duration::from_secs(2));
    assert!(why.contains("more than its window"), "{why}");
    // A length past the frame limit is refused before it is read.
    let why = refused(Side::Guest, &[u32::MAX.to_le_bytes().to_vec()]);
    assert!(why.contains("exceeds"), "{why}");
}
