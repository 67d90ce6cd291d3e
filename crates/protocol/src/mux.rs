//! The stream multiplexer both ends run: the table of open streams, what a
//! stream frame from the peer does to it, request correlation, and failing
//! everything at once when the channel dies.
//!
//! The host (`cc`) and the agent each own a channel and a thread reading
//! it; [`receive`] reads one frame, applies it if it is a stream frame
//! (`Data`, `Eof`, `Credit`, `Reset`) and hands every other message back.
//! Neither end trusts the other: a frame for a stream never opened, data
//! past a window, or credit that was not owed is a [`Violation`], after
//! which the end that saw it closes the channel. Frames for a stream this
//! end closed meanwhile race with its own teardown and are dropped.
//!
//! Stream ids are allocated by the end that opens the stream, each end in
//! its own half (see [`GUEST_STREAM_BASE`]). An id of the peer's half
//! counts as opened once the peer named it: in a request, or in an
//! `Accepted`.

use std::collections::HashMap;
#[cfg(test)]
use std::io;
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::flow::{Broken, Buffer, Inbound, Outbound};
use crate::frame::{Frame, FrameError, FrameReader};
use crate::{Message, GUEST_STREAM_BASE};

/// Which end of the channel a table belongs to: it decides which half of
/// the stream ids is this end's to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

impl Side {
    /// The first and last id this end allocates.
    fn own_ids(self) -> (u32, u32) {
        match self {
            // 0 is never a stream, so a zeroed id is always an error.
            Side::Host => (1, GUEST_STREAM_BASE - 1),
            Side::Guest => (GUEST_STREAM_BASE, u32::MAX),
        }
    }

    fn owns(self, id: u32) -> bool {
        let (first, last) = self.own_ids();
        (first..=last).contains(&id)
    }
}

/// The sending half of a stream as the table sees it: its credit, and
/// what ending it involves (an end may also have to wake a thread that
/// waits on something other than credit).
pub trait Sending: Send + Sync {
    fn flow(&self) -> &Outbound;

    /// Ends the stream: writers waiting for credit fail.
    fn end(&self, why: Broken) {
        self.flow().break_off(why);
    }
}

impl Sending for Outbound {
    fn flow(&self) -> &Outbound {
        self
    }
}

/// The peer broke the protocol: the channel must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("sent a frame for stream {0}, which was never opened")]
    NeverOpened(u32),
    #[error(
        "broke flow control: sent stream {stream} more than its window ({buffered} bytes buffered)"
    )]
    Overrun { stream: u32, buffered: usize },
    #[error("broke flow control: returned {granted} bytes of credit on stream {stream} with {owed} owed")]
    NotOwed {
        stream: u32,
        granted: u32,
        owed: u32,
    },
}

/// A stream id given to [`Streams::add_inbound`] or
/// [`Streams::add_outbound`] is already open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream {0} is already in use")]
pub struct InUse(pub u32);

/// The open streams of one end of a channel, by id.
#[derive(Debug)]
pub struct Streams<O = Outbound> {
    side: Side,
    inbound: HashMap<u32, Arc<Inbound>>,
    outbound: HashMap<u32, Arc<O>>,
    /// The next own id to hand out.
    next: u32,
    /// Own ids went round once: every own id has been opened.
    wrapped: bool,
    /// The highest id of the peer's half the peer named, 0 for none.
    peer_high: u32,
    /// The channel is gone: streams added now fail at once.
    lost: bool,
}

impl<O: Sending> Streams<O> {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            inbound: HashMap::new(),
            outbound: HashMap::new(),
            next: side.own_ids().0,
            wrapped: false,
            peer_high: 0,
            lost: false,
        }
    }

    /// A new id of this end's half, not in use.
    pub fn allocate(&mut self) -> u32 {
        let (first, last) = self.side.own_ids();
        loop {
            let id = self.next;
            if id == last {
                // Two billion streams on one channel: a long-lived instance
                // can get there, so ids are reused once closed.
                self.next = first;
                self.wrapped = true;
            } else {
                self.next = id + 1;
            }
            if !self.in_use(id) {
                return id;
            }
        }
    }

    pub fn in_use(&self, id: u32) -> bool {
        self.inbound.contains_key(&id) || self.outbound.contains_key(&id)
    }

    /// The peer named stream `id` (of its own half): frames for it are
    /// allowed from now on, even if this end never registers it (a
    /// request that failed, a connection refused).
    pub fn announce(&mut self, id: u32) {
        if !self.side.owns(id) {
            self.peer_high = self.peer_high.max(id);
        }
    }

    /// Whether stream `id` was ever opened, by either end.
    pub fn was_opened(&self, id: u32) -> bool {
        if id == 0 {
            false
        } else if self.side.owns(id) {
            self.wrapped || id < self.next
        } else {
            id <= self.peer_high
        }
    }

    fn check(&mut self, id: u32) -> Result<(), InUse> {
        if self.in_use(id) {
            return Err(InUse(id));
        }
        self.announce(id);
        Ok(())
    }

    /// Registers a stream the peer sends on. On a channel already gone,
    /// `stream` is broken off and not kept.
    pub fn add_inbound(&mut self, id: u32, stream: Arc<Inbound>) -> Result<(), InUse> {
        self.check(id)?;
        if self.lost {
            stream.break_off(Broken::Lost);
        } else {
            self.inbound.insert(id, stream);
        }
        Ok(())
    }

    /// Registers a stream this end sends on; see [`add_inbound`](Self::add_inbound).
    pub fn add_outbound(&mut self, id: u32, stream: Arc<O>) -> Result<(), InUse> {
        self.check(id)?;
        if self.lost {
            stream.end(Broken::Lost);
        } else {
            self.outbound.insert(id, stream);
        }
        Ok(())
    }

    pub fn inbound(&self, id: u32) -> Option<&Arc<Inbound>> {
        self.inbound.get(&id)
    }

    pub fn outbound(&self, id: u32) -> Option<&Arc<O>> {
        self.outbound.get(&id)
    }

    /// Unregisters inbound stream `id` if it is still `stream` (once ids
    /// went round, a late close must not remove a new stream of the same
    /// id). Whether it was registered.
    pub fn remove_inbound(&mut self, id: u32, stream: &Inbound) -> bool {
        remove_same(&mut self.inbound, id, stream)
    }

    /// Like [`remove_inbound`](Self::remove_inbound), for a stream this
    /// end sends on.
    pub fn remove_outbound(&mut self, id: u32, stream: &O) -> bool {
        remove_same(&mut self.outbound, id, stream)
    }

    /// Forgets stream `id` and breaks it off, whichever way it goes: for
    /// a stream the peer never heard of (the request naming it was never
    /// sent), so that closing it later sends the peer nothing.
    pub fn discard(&mut self, id: u32) {
        if let Some(s) = self.inbound.remove(&id) {
            s.break_off(Broken::Closed);
        }
        if let Some(s) = self.outbound.remove(&id) {
            s.end(Broken::Closed);
        }
    }

    /// Open streams: (inbound, outbound).
    pub fn len(&self) -> (usize, usize) {
        (self.inbound.len(), self.outbound.len())
    }

    /// Where the payload of a `Data` frame for `stream` goes: `None` for a
    /// stream closed meanwhile (the payload is dropped).
    pub fn data_target(&self, stream: u32) -> Result<Option<Arc<Inbound>>, Violation> {
        if !self.was_opened(stream) {
            return Err(Violation::NeverOpened(stream));
        }
        Ok(self.inbound.get(&stream).cloned())
    }

    /// Applies a stream frame from the peer; any other message is handed
    /// back for the caller to handle.
    pub fn dispatch(&mut self, msg: Message) -> Result<Option<Message>, Violation> {
        match msg {
            Message::Data { stream, bytes } => {
                if let Some(target) = self.data_target(stream)? {
                    push(&target, stream, bytes.into_vec())?;
                }
            }
            Message::Eof { stream } => {
                if let Some(s) = self.opened(stream)?.inbound.get(&stream) {
                    s.finish();
                }
            }
            Message::Credit { stream, bytes } => {
                if let Some(s) = self.opened(stream)?.outbound.get(&stream) {
                    s.flow().grant_owed(bytes).map_err(|e| Violation::NotOwed {
                        stream,
                        granted: e.granted,
                        owed: e.owed,
                    })?;
                }
            }
            // The peer stops reading a stream this end sends, or aborts one
            // it sends (a read error, a connection reset): either way the
            // stream is over.
            Message::Reset { stream } => {
                self.opened(stream)?;
                if let Some(s) = self.outbound.remove(&stream) {
                    s.end(Broken::Closed);
                }
                if let Some(s) = self.inbound.remove(&stream) {
                    s.break_off(Broken::Closed);
                }
            }
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    fn opened(&self, stream: u32) -> Result<&Self, Violation> {
        if self.was_opened(stream) {
            Ok(self)
        } else {
            Err(Violation::NeverOpened(stream))
        }
    }

    /// The channel is gone: every stream fails with [`Broken::Lost`] and
    /// is forgotten, and so is any stream added later.
    pub fn end(&mut self) {
        self.lost = true;
        for (_, s) in self.inbound.drain() {
            s.break_off(Broken::Lost);
        }
        for (_, s) in self.outbound.drain() {
            s.end(Broken::Lost);
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }
}

/// Removes `id` from `map` if it maps to `stream` itself; whether it did.
fn remove_same<T>(map: &mut HashMap<u32, Arc<T>>, id: u32, stream: &T) -> bool {
    let same = map.get(&id).is_some_and(|s| std::ptr::eq(&**s, stream));
    if same {
        map.remove(&id);
    }
    same
}

/// Queues a payload on its stream; overrunning the window is a violation.
fn push(target: &Inbound, stream: u32, bytes: impl Into<Buffer>) -> Result<(), Violation> {
    target.push(bytes).map_err(|e| Violation::Overrun {
        stream,
        buffered: e.buffered,
    })
}

/// Requests this end sent and the peer has not answered yet, by id; each
/// answer goes to the one waiter of its request.
#[derive(Debug)]
pub struct Calls<T> {
    next: u64,
    waiting: HashMap<u64, mpsc::SyncSender<T>>,
}

impl<T> Default for Calls<T> {
    fn default() -> Self {
        Self {
            next: 1,
            waiting: HashMap::new(),
        }
    }
}

impl<T> Calls<T> {
    /// An id for a request nobody waits on the answer of (a ping whose
    /// arriving is all it has to do).
    pub fn unanswered(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    /// A new request id and where its answer arrives.
    pub fn begin(&mut self) -> (u64, mpsc::Receiver<T>) {
        let id = self.unanswered();
        let (tx, rx) = mpsc::sync_channel(1);
        self.waiting.insert(id, tx);
        (id, rx)
    }

    /// Delivers the answer to request `id`; `false` when nobody waits for
    /// it (the request timed out, or the peer answered twice).
    pub fn answer(&mut self, id: u64, answer: T) -> bool {
        match self.waiting.remove(&id) {
            Some(tx) => tx.try_send(answer).is_ok(),
            None => false,
        }
    }

    /// Stops waiting for request `id`: its answer will be dropped.
    pub fn forget(&mut self, id: u64) {
        self.waiting.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The channel is gone: every waiter sees its answer's sender dropped.
    pub fn end(&mut self) {
        self.waiting.clear();
    }
}

/// What [`receive`] read.
#[derive(Debug)]
pub enum Received {
    /// A stream frame, applied (a payload for a stream closed meanwhile
    /// is dropped).
    Stream,
    /// A `Data` payload, read straight into its stream's buffer: the one
    /// copy out of the channel. Reading it began at `since`.
    Payload { since: Instant },
    /// Any other message, for the caller.
    Message(Message),
}

/// Why [`receive`] failed; either way the channel is done.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Violation(#[from] Violation),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<O> AsMut<Streams<O>> for Streams<O> {
    fn as_mut(&mut self) -> &mut Streams<O> {
        self
    }
}

/// Reads one frame and applies it to the streams in `table` (a
/// [`Streams`], or a larger table holding one) if it is a stream frame.
/// `Ok(None)` is a clean end of the channel between frames. The table is
/// not locked while a payload is read, so other threads open and close
/// streams meanwhile; a payload never blocks on a consumer, since a
/// stream's buffer is bounded by its window.
pub fn receive<R: Read, O: Sending, T: AsMut<Streams<O>>>(
    reader: &mut FrameReader<R>,
    table: &Mutex<T>,
) -> Result<Option<Received>, ReceiveError> {
    match reader.read_frame()? {
        None => Ok(None),
        Some(Frame::Data { stream, len }) => {
            // Left unread, the payload of a closed stream is skipped.
            let Some(target) = lock(table).as_mut().data_target(stream)? else {
                return Ok(Some(Received::Stream));
            };
            let since = Instant::now();
            let mut buf = target.buffer(len);
            reader.payload(&mut buf)?;
            push(&target, stream, buf)?;
            Ok(Some(Received::Payload { since }))
        }
        Some(Frame::Message(msg)) => Ok(Some(match lock(table).as_mut().dispatch(msg)? {
            None => Received::Stream,
            Some(msg) => Received::Message(msg),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Exec, Request, Stdio, DATA_CHUNK, STREAM_WINDOW};
    use serde_bytes::ByteBuf;

    fn data(stream: u32, len: usize) -> Message {
        Message::Data {
            stream,
            bytes: ByteBuf::from(vec![7u8; len]),
        }
    }

    fn stream_frames(stream: u32) -> [Message; 4] {
        [
            data(stream, 3),
            Message::Eof { stream },
            Message::Credit { stream, bytes: 1 },
            Message::Reset { stream },
        ]
    }

    #[test]
    fn each_end_allocates_in_its_own_half() {
        let mut host = Streams::<Outbound>::new(Side::Host);
        let mut guest = Streams::<Outbound>::new(Side::Guest);
        assert_eq!((host.allocate(), host.allocate()), (1, 2));
        assert_eq!(guest.allocate(), GUEST_STREAM_BASE);
        assert!(host.was_opened(2) && !host.was_opened(3) && !host.was_opened(0));
        assert!(!guest.was_opened(1), "the host's ids are its to announce");
        guest.announce(5);
        assert!(guest.was_opened(1) && guest.was_opened(5) && !guest.was_opened(6));
        // The guest naming one of the host's own ids changes nothing.
        host.announce(9);
        assert!(!host.was_opened(9));
    }

    #[test]
    fn ids_go_round_past_open_streams() {
        let mut t = Streams::<Outbound>::new(Side::Guest);
        t.next = u32::MAX;
        t.add_outbound(GUEST_STREAM_BASE, Arc::new(Outbound::new()))
            .unwrap();
        assert_eq!(t.allocate(), u32::MAX);
        assert_eq!(t.allocate(), GUEST_STREAM_BASE + 1, "the open one skipped");
        assert!(
            t.was_opened(GUEST_STREAM_BASE + 1000),
            "all were handed out"
        );
    }

    #[test]
    fn frames_for_streams_never_opened_are_violations() {
        for side in [Side::Host, Side::Guest] {
            let mut t = Streams::<Outbound>::new(side);
            for stream in [0, 1, 77, GUEST_STREAM_BASE, u32::MAX] {
                for msg in stream_frames(stream) {
                    assert_eq!(t.dispatch(msg), Err(Violation::NeverOpened(stream)));
                }
            }
        }
    }

    #[test]
    fn frames_for_closed_or_refused_streams_are_dropped() {
        let mut t = Streams::<Outbound>::new(Side::Host);
        let id = t.allocate();
        let inbound = Arc::new(Inbound::new());
        t.add_inbound(id, inbound.clone()).unwrap();
        assert!(t.remove_inbound(id, &inbound));
        // A guest stream refused before it was registered.
        t.announce(GUEST_STREAM_BASE + 3);
        for stream in [id, GUEST_STREAM_BASE + 1, GUEST_STREAM_BASE + 3] {
            for msg in stream_frames(stream) {
                assert_eq!(t.dispatch(msg), Ok(None));
            }
        }
        assert_eq!(t.len(), (0, 0));
    }

    #[test]
    fn credit_not_owed_and_overruns_are_violations() {
        let mut t = Streams::<Outbound>::new(Side::Host);
        let out = Arc::new(Outbound::new());
        let (one, two) = (t.allocate(), t.allocate());
        t.add_outbound(one, out.clone()).unwrap();
        assert_eq!(out.acquire(10, None).unwrap(), 10);
        let credit = |bytes| Message::Credit { stream: 1, bytes };
        assert_eq!(t.dispatch(credit(10)), Ok(None));
        assert_eq!(
            t.dispatch(credit(1)),
            Err(Violation::NotOwed {
                stream: 1,
                granted: 1,
                owed: 0
            })
        );
        t.add_inbound(two, Arc::new(Inbound::new())).unwrap();
        for _ in 0..STREAM_WINDOW as usize / DATA_CHUNK {
            assert_eq!(t.dispatch(data(2, DATA_CHUNK)), Ok(None));
        }
        let err = t.dispatch(data(2, 1)).unwrap_err();
        assert!(matches!(err, Violation::Overrun { stream: 2, .. }));
        assert!(err.to_string().contains("flow control"), "{err}");
    }

    #[test]
    fn a_reset_ends_both_directions_and_other_messages_come_back() {
        let mut t = Streams::<Outbound>::new(Side::Guest);
        t.announce(4);
        let inbound = Arc::new(Inbound::new());
        let outbound = Arc::new(Outbound::new());
        t.add_inbound(3, inbound.clone()).unwrap();
        t.add_outbound(4, outbound.clone()).unwrap();
        assert_eq!(t.add_inbound(4, Arc::new(Inbound::new())), Err(InUse(4)));
        t.dispatch(Message::Reset { stream: 3 }).unwrap();
        t.dispatch(Message::Reset { stream: 4 }).unwrap();
        assert!(inbound.read(&mut [0; 1], None).is_err());
        assert!(outbound.acquire(1, None).is_err());
        let ping = Message::Request {
            id: 1,
            body: Request::Ping,
        };
        assert_eq!(t.dispatch(ping.clone()), Ok(Some(ping)));
    }

    #[test]
    fn a_discarded_stream_is_broken_and_gone_both_ways() {
        let mut t = Streams::<Outbound>::new(Side::Host);
        let (a, b) = (t.allocate(), t.allocate());
        let inbound = Arc::new(Inbound::new());
        let outbound = Arc::new(Outbound::new());
        t.add_inbound(a, inbound.clone()).unwrap();
        t.add_outbound(b, outbound.clone()).unwrap();
        t.discard(a);
        t.discard(b);
        assert_eq!(t.len(), (0, 0));
        assert!(
            !t.remove_outbound(b, &outbound),
            "a later close finds nothing"
        );
        assert!(inbound.read(&mut [0; 1], None).is_err());
        assert!(outbound.acquire(1, None).is_err());
    }

    #[test]
    fn removal_checks_the_stream_is_still_the_same() {
        let mut t = Streams::<Outbound>::new(Side::Host);
        let old = Arc::new(Inbound::new());
        let new = Arc::new(Inbound::new());
        t.add_inbound(1, new.clone()).unwrap();
        assert!(!t.remove_inbound(1, &old));
        assert!(t.inbound(1).is_some());
        assert!(t.remove_inbound(1, &new));
    }

    #[test]
    fn ending_fails_every_stream_and_every_later_one() {
        let mut t = Streams::<Outbound>::new(Side::Host);
        let inbound = Arc::new(Inbound::new());
        let outbound = Arc::new(Outbound::new());
        t.add_inbound(1, inbound.clone()).unwrap();
        t.add_outbound(2, outbound.clone()).unwrap();
        t.end();
        assert!(t.is_lost() && t.len() == (0, 0));
        let lost = io::ErrorKind::ConnectionAborted;
        assert_eq!(inbound.read(&mut [0; 1], None).unwrap_err().kind(), lost);
        assert_eq!(outbound.acquire(1, None).unwrap_err().kind(), lost);
        let late = Arc::new(Inbound::new());
        t.add_inbound(3, late.clone()).unwrap();
        assert_eq!(late.read(&mut [0; 1], None).unwrap_err().kind(), lost);
    }

    #[test]
    fn answers_reach_their_caller_once() {
        let mut calls = Calls::<u32>::default();
        let (a, rx_a) = calls.begin();
        let (b, rx_b) = calls.begin();
        assert_ne!(a, b);
        assert!(calls.answer(b, 2));
        assert!(!calls.answer(b, 3), "answered twice");
        assert!(!calls.answer(999, 0), "never asked");
        assert_eq!(rx_b.try_recv(), Ok(2));
        assert!(rx_b.try_recv().is_err());
        calls.end();
        assert!(calls.is_empty());
        assert_eq!(rx_a.recv(), Err(mpsc::RecvError));
        assert_ne!(calls.unanswered(), b);
    }

    #[test]
    fn requests_announce_the_streams_they_name() {
        let exec = Request::Exec(Exec {
            process: 1,
            argv: vec![],
            env: vec![],
            cwd: None,
            user: None,
            stdin: Some(4),
            stdout: Stdio::Stream(5),
            stderr: Stdio::Stdout,
            pty: None,
            root: None,
            rlimits: Vec::new(),
        });
        assert_eq!(exec.streams().collect::<Vec<_>>(), [4, 5]);
        let dial = Request::Dial {
            address: String::new(),
            port: 1,
            to_guest: 7,
            from_guest: 8,
        };
        assert_eq!(dial.streams().collect::<Vec<_>>(), [7, 8]);
        assert_eq!(Request::Ping.streams().count(), 0);
    }
}
