//! Credit-based flow control for one stream, shared by both ends.
//!
//! [`Inbound`] buffers what the peer sent until a reader takes it and tells
//! the caller when to return credit; [`Outbound`] makes writers wait for
//! credit. Neither sends anything itself: the caller owns the channel.

use std::collections::VecDeque;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cc_cancel::CancelToken;

use crate::STREAM_WINDOW;

/// Credit is returned once this many bytes were consumed, so a fast reader
/// costs one `Credit` frame per quarter window rather than one per read.
const CREDIT_BATCH: u32 = STREAM_WINDOW / 4;

/// How an inbound stream ended without end-of-file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The channel to the peer is gone.
    Lost,
    /// The local reader closed the stream.
    Closed,
}

/// The peer sent more than the window allowed: a protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("peer overran the stream window ({buffered} bytes buffered)")]
pub struct Overrun {
    pub buffered: usize,
}

/// The alignment of a [`Buffer`]'s bytes: a page, which satisfies direct
/// I/O on any block device.
pub const BUFFER_ALIGN: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; BUFFER_ALIGN]);

/// Bytes of a stream, starting on a page boundary while none were
/// consumed: a receiver can hand them to `O_DIRECT` writes, which skip
/// copying into the page cache (on an emulated guest CPU, the costliest
/// step of writing a file).
#[derive(Clone, Default)]
pub struct Buffer {
    pages: Vec<Page>,
    /// The bytes in use: `start..end` of the pages.
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("len", &self.len()).finish()
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Buffer {}

impl Buffer {
    /// `len` bytes, contents unspecified (zeros, or what a recycled buffer
    /// held): to be overwritten.
    pub fn with_len(len: usize) -> Self {
        let mut b = Self::default();
        b.set_len(len);
        b
    }

    /// Makes the buffer `len` bytes long from its first page, keeping its
    /// memory when it is large enough.
    fn set_len(&mut self, len: usize) {
        let pages = len.div_ceil(BUFFER_ALIGN);
        if self.pages.len() < pages {
            self.pages.resize(pages, Page([0; BUFFER_ALIGN]));
        }
        self.start = 0;
        self.end = len;
    }

    /// Drops the first `n` bytes.
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }
}

impl Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is a plain byte array (`repr(C)`, no padding:
        // its size is its alignment), so the pages are
        // `pages.len() * BUFFER_ALIGN` initialized bytes in one
        // allocation, borrowed here for as long as `self` is.
        let all = unsafe {
            std::slice::from_raw_parts(
                self.pages.as_ptr().cast::<u8>(),
                self.pages.len() * BUFFER_ALIGN,
            )
        };
        &all[self.start..self.end]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed mutably for as long as `self`
        // is; any byte pattern is a valid `Page`.
        let all = unsafe {
            std::slice::from_raw_parts_mut(
                self.pages.as_mut_ptr().cast::<u8>(),
                self.pages.len() * BUFFER_ALIGN,
            )
        };
        &mut all[self.start..self.end]
    }
}

impl From<&[u8]> for Buffer {
    fn from(bytes: &[u8]) -> Self {
        let mut b = Self::with_len(bytes.len());
        b.copy_from_slice(bytes);
        b
    }
}

impl From<Vec<u8>> for Buffer {
    fn from(bytes: Vec<u8>) -> Self {
        Self::from(bytes.as_slice())
    }
}

#[derive(Debug, Default)]
struct InState {
    chunks: VecDeque<Buffer>,
    buffered: usize,
    unacked: u32,
    eof: bool,
    broken: Option<Broken>,
    /// Buffers a consumer of whole chunks gave back, for the channel
    /// reader to fill again: no allocation (and no zeroing) per frame.
    spares: Vec<Buffer>,
}

/// Spare buffers an [`Inbound`] keeps: enough for the frames of a window
/// in flight while the consumer works on one.
const SPARES: usize = 4;

/// Receive side of a stream: a bounded buffer between the channel reader
/// and a consumer.
#[derive(Debug, Default)]
pub struct Inbound {
    state: Mutex<InState>,
    ready: Condvar,
}

/// Result of [`Inbound::take`].
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The next bytes of the stream, as the peer sent them; empty at end
    /// of file. Give the buffer back with [`Inbound::recycle`].
    pub bytes: Buffer,
    /// Credit the caller should now return to the peer (0: none yet).
    pub credit: u32,
}

/// Result of [`Inbound::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// Bytes copied into the caller's buffer; 0 means end of file.
    pub len: usize,
    /// Credit the caller should now return to the peer (0: none yet).
    pub credit: u32,
}

impl Inbound {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, InState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues bytes the peer sent. Data for a closed stream is dropped (its
    /// credit is irrelevant: the peer was told to stop).
    pub fn push(&self, bytes: impl Into<Buffer>) -> Result<(), Overrun> {
        let bytes = bytes.into();
        let mut s = self.lock();
        if s.broken.is_some() || bytes.is_empty() {
            return Ok(());
        }
        s.buffered += bytes.len();
        if s.buffered > STREAM_WINDOW as usize {
            return Err(Overrun {
                buffered: s.buffered,
            });
        }
        s.chunks.push_back(bytes);
        self.ready.notify_all();
        Ok(())
    }

    /// A buffer of `len` bytes for the channel reader to read a payload
    /// of this stream into and [`push`](Self::push): a recycled one when
    /// there is one. Its contents are garbage to be overwritten.
    pub fn buffer(&self, len: usize) -> Buffer {
        let mut buf = self.lock().spares.pop().unwrap_or_default();
        // A recycled buffer at least this long is only truncated.
        buf.set_len(len);
        buf
    }

    /// Takes back a buffer from [`take`](Self::take) for [`buffer`](Self::buffer).
    pub fn recycle(&self, buf: Buffer) {
        let mut s = self.lock();
        if s.spares.len() < SPARES && !buf.pages.is_empty() && s.broken.is_none() {
            s.spares.push(buf);
        }
    }

    /// The peer sent end of file.
    pub fn finish(&self) {
        self.lock().eof = true;
        self.ready.notify_all();
    }

    /// Ends the stream without end of file; pending and later reads fail.
    /// Buffered data is dropped.
    pub fn break_off(&self, why: Broken) {
        let mut s = self.lock();
        if s.broken.is_none() {
            s.broken = Some(why);
            s.chunks.clear();
            s.buffered = 0;
            s.spares.clear();
        }
        self.ready.notify_all();
    }

    /// Whether end of file was both received and fully read.
    pub fn is_drained(&self) -> bool {
        let s = self.lock();
        s.eof && s.buffered == 0
    }

    /// Wakes the stream's waiters to look at their cancel tokens: hand it
    /// to [`CancelToken::on_cancel`] for a read given that token.
    pub fn wake(&self) {
        // Under the lock: a waiter between its check and its wait
        // cannot miss it.
        let _held = self.lock();
        self.ready.notify_all();
    }

    /// Waits until data, end of file, breakage, `deadline` or `cancel`.
    fn wait<'a>(
        &'a self,
        mut s: MutexGuard<'a, InState>,
        deadline: Option<Instant>,
        cancel: Option<&CancelToken>,
    ) -> io::Result<MutexGuard<'a, InState>> {
        loop {
            if let Some(why) = s.broken {
                return Err(broken_error(why));
            }
            if s.buffered > 0 || s.eof {
                return Ok(s);
            }
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(cancelled_error());
            }
            s = match deadline {
                None => self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    self.ready
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Counts `len` bytes as consumed; the credit to return now, if any.
    fn consumed(s: &mut InState, len: usize) -> u32 {
        s.buffered -= len;
        s.unacked += len as u32;
        if s.unacked >= CREDIT_BATCH || (s.buffered == 0 && !s.eof && s.unacked > 0) {
            std::mem::take(&mut s.unacked)
        } else {
            0
        }
    }

    /// Like [`read`](Self::read), but hands over the next chunk whole as
    /// the peer sent it, without copying it.
    pub fn take(&self, deadline: Option<Instant>) -> io::Result<Chunk> {
        let mut s = self.wait(self.lock(), deadline, None)?;
        let Some(bytes) = s.chunks.pop_front() else {
            return Ok(Chunk {
                bytes: Buffer::default(),
                credit: 0,
            });
        };
        let credit = Self::consumed(&mut s, bytes.len());
        Ok(Chunk { bytes, credit })
    }

    /// Blocks until data, end of file, or `deadline`; copies what is there.
    /// End of file is `len == 0` once all data was read; a timeout is
    /// `ErrorKind::TimedOut`.
    pub fn read(&self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<Read> {
        self.read_cancellable(buf, deadline, None)
    }

    /// [`read`](Self::read) that also ends, with [`is_cancelled`], once
    /// `cancel` is cancelled; register [`wake`](Self::wake) with the token
    /// so that a blocked read sees it at once.
    pub fn read_cancellable(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
        cancel: Option<&CancelToken>,
    ) -> io::Result<Read> {
        let mut s = self.lock();
        if !buf.is_empty() {
            s = self.wait(s, deadline, cancel)?;
        } else if let Some(why) = s.broken {
            return Err(broken_error(why));
        }
        let mut len = 0;
        while len < buf.len() {
            let Some(front) = s.chunks.front_mut() else {
                break;
            };
            let n = front.len().min(buf.len() - len);
            buf[len..len + n].copy_from_slice(&front[..n]);
            len += n;
            front.consume(n);
            if front.is_empty() {
                if let Some(done) = s.chunks.pop_front() {
                    if s.spares.len() < SPARES {
                        s.spares.push(done);
                    }
                }
            }
        }
        let credit = Self::consumed(&mut s, len);
        Ok(Read { len, credit })
    }
}

/// What a wait stopped by its cancel token fails with.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
struct Cancelled;

fn cancelled_error() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, Cancelled)
}

/// Whether `e` is a wait stopped by its cancel token.
pub fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

fn broken_error(why: Broken) -> io::Error {
    match why {
        Broken::Lost => io::Error::new(io::ErrorKind::ConnectionAborted, "the instance is gone"),
        Broken::Closed => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
    }
}

/// The peer returned credit for more bytes than were in flight: a
/// protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("peer returned {granted} bytes of credit with {owed} owed")]
pub struct NotOwed {
    pub granted: u32,
    pub owed: u32,
}

#[derive(Debug)]
struct OutState {
    credit: u32,
    broken: Option<Broken>,
}

/// Send side of a stream: writers take credit before sending.
#[derive(Debug)]
pub struct Outbound {
    state: Mutex<OutState>,
    granted: Condvar,
}

impl Default for Outbound {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbound {
    /// A stream with a full window of credit.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(OutState {
                credit: STREAM_WINDOW,
                broken: None,
            }),
            granted: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer returned credit.
    pub fn grant(&self, bytes: u32) {
        let mut s = self.lock();
        s.credit = s.credit.saturating_add(bytes).min(STREAM_WINDOW);
        self.granted.notify_all();
    }

    /// The peer returned credit; more than it was owed is an error.
    pub fn grant_owed(&self, bytes: u32) -> Result<(), NotOwed> {
        let mut s = self.lock();
        let owed = STREAM_WINDOW - s.credit;
        if bytes > owed {
            return Err(NotOwed {
                granted: bytes,
                owed,
            });
        }
        s.credit += bytes;
        self.granted.notify_all();
        Ok(())
    }

    /// The stream can take no more data; waiting and later writers fail.
    pub fn break_off(&self, why: Broken) {
        let mut s = self.lock();
        s.broken.get_or_insert(why);
        self.granted.notify_all();
    }

    /// Wakes the stream's writers to look at their cancel tokens: hand it
    /// to [`CancelToken::on_cancel`] for a write given that token.
    pub fn wake(&self) {
        let _held = self.lock();
        self.granted.notify_all();
    }

    /// Blocks until some credit is available, then takes up to `want` bytes
    /// of it. A `timeout` bounds the wait (`ErrorKind::TimedOut`).
    pub fn acquire(&self, want: usize, timeout: Option<Duration>) -> io::Result<usize> {
        self.acquire_cancellable(want, timeout, None)
    }

    /// [`acquire`](Self::acquire) that also ends, with [`is_cancelled`],
    /// once `cancel` is cancelled; register [`wake`](Self::wake) with the
    /// token so that a blocked writer sees it at once.
    pub fn acquire_cancellable(
        &self,
        want: usize,
        timeout: Option<Duration>,
        cancel: Option<&CancelToken>,
    ) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        loop {
            if let Some(why) = s.broken {
                return Err(broken_error(why));
            }
            if s.credit > 0 || want == 0 {
                break;
            }
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(cancelled_error());
            }
            s = match deadline {
                None => self.granted.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    self.granted
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        let n = want.min(s.credit as usize);
        s.credit -= n as u32;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn reads_in_order_across_chunks_then_eof() {
        let s = Inbound::new();
        s.push(b"hello ".to_vec()).unwrap();
        s.push(b"world".to_vec()).unwrap();
        s.finish();
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            let r = s.read(&mut buf, None).unwrap();
            if r.len == 0 {
                break;
            }
            out.extend_from_slice(&buf[..r.len]);
        }
        assert_eq!(out, b"hello world");
        assert!(s.is_drained());
    }

    #[test]
    fn credit_is_returned_in_batches_and_when_drained() {
        let s = Inbound::new();
        s.push(vec![0; CREDIT_BATCH as usize + 10]).unwrap();
        let mut buf = vec![0u8; CREDIT_BATCH as usize];
        assert_eq!(
            s.read(&mut buf, None).unwrap(),
            Read {
                len: CREDIT_BATCH as usize,
                credit: CREDIT_BATCH
            }
        );
        assert_eq!(
            s.read(&mut buf[..4], None).unwrap(),
            Read { len: 4, credit: 0 }
        );
        assert_eq!(s.read(&mut buf, None).unwrap(), Read { len: 6, credit: 10 });
    }

    #[test]
    fn chunks_are_taken_whole_and_their_buffers_come_back() {
        let s = Inbound::new();
        s.push(b"hello ".to_vec()).unwrap();
        s.push(b"world".to_vec()).unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(s.read(&mut buf, None).unwrap().len, 2);
        let first = s.take(None).unwrap();
        assert_eq!(&*first.bytes, b"llo ");
        let second = s.take(None).unwrap();
        assert_eq!((&*second.bytes, second.credit), (&b"world"[..], 11));
        let memory = second.bytes.as_ptr();
        s.recycle(second.bytes);
        let again = s.buffer(3);
        assert_eq!(again.len(), 3);
        assert_eq!(again.as_ptr(), memory, "the recycled buffer");
        s.finish();
        assert!(s.take(None).unwrap().bytes.is_empty());
        assert!(s.is_drained());
        s.break_off(Broken::Closed);
        assert_eq!(s.take(None).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn buffers_start_on_a_page_until_consumed() {
        for len in [0, 1, 4095, 4097, 512 << 10] {
            let b = Buffer::with_len(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
        }
        let mut b = Buffer::from(&b"abcdef"[..]);
        b.consume(2);
        assert_eq!(&*b, b"cdef");
        b[0] = b'C';
        assert_eq!(b, Buffer::from(b"Cdef".to_vec()));
        b.consume(10);
        assert!(b.is_empty());
        // Shrunk, it keeps its memory; grown, it gets more.
        b.set_len(2 * BUFFER_ALIGN + 1);
        assert_eq!(b.pages.len(), 3);
        b.set_len(5);
        assert_eq!((b.pages.len(), b.len()), (3, 5));
    }

    #[test]
    fn credit_not_owed_is_refused() {
        let o = Outbound::new();
        assert!(o.grant_owed(1).is_err());
        assert_eq!(o.acquire(100, None).unwrap(), 100);
        assert!(o.grant_owed(101).is_err());
        o.grant_owed(100).unwrap();
        assert_eq!(o.acquire(usize::MAX, None).unwrap(), STREAM_WINDOW as usize);
    }

    #[test]
    fn overrunning_the_window_is_an_error() {
        let s = Inbound::new();
        s.push(vec![0; STREAM_WINDOW as usize]).unwrap();
        assert!(s.push(vec![0]).is_err());
    }

    #[test]
    fn read_times_out_and_break_wakes_readers() {
        let s = Arc::new(Inbound::new());
        let e = s
            .read(
                &mut [0u8; 1],
                Some(Instant::now() + Duration::from_millis(10)),
            )
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let s2 = s.clone();
        let t = thread::spawn(move || s2.read(&mut [0u8; 1], None).unwrap_err().kind());
        thread::sleep(Duration::from_millis(20));
        s.break_off(Broken::Lost);
        assert_eq!(t.join().unwrap(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn writers_wait_for_credit() {
        let o = Arc::new(Outbound::new());
        assert_eq!(o.acquire(usize::MAX, None).unwrap(), STREAM_WINDOW as usize);
        let e = o.acquire(1, Some(Duration::from_millis(10))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let o2 = o.clone();
        let t = thread::spawn(move || o2.acquire(100, None).unwrap());
        thread::sleep(Duration::from_millis(20));
        o.grant(40);
        assert_eq!(t.join().unwrap(), 40);
        o.break_off(Broken::Closed);
        assert_eq!(
            o.acquire(1, None).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn a_cancelled_token_wakes_blocked_readers_and_writers() {
        let token = CancelToken::new();
        let i = Arc::new(Inbound::new());
        let o = Arc::new(Outbound::new());
        o.acquire(usize::MAX, None).unwrap();
        let (wi, wo) = (i.clone(), o.clone());
        let _wake_in = token.on_cancel(move || wi.wake());
        let _wake_out = token.on_cancel(move || wo.wake());
        let (ti, to, tr, tw) = (token.clone(), token.clone(), i.clone(), o.clone());
        let reader = thread::spawn(move || {
            tr.read_cancellable(&mut [0u8; 8], None, Some(&ti))
                .unwrap_err()
        });
        let writer = thread::spawn(move || tw.acquire_cancellable(1, None, Some(&to)).unwrap_err());
        thread::sleep(Duration::from_millis(20));
        token.cancel();
        assert!(is_cancelled(&reader.join().unwrap()));
        assert!(is_cancelled(&writer.join().unwrap()));
        // Data that is there is still read; only a wait is cancelled.
        i.push(&b"abc"[..]).unwrap();
        let r = i
            .read_cancellable(&mut [0u8; 8], None, Some(&token))
            .unwrap();
        assert_eq!(r.len, 3);
        let e = o.acquire(1, Some(Duration::from_millis(1))).unwrap_err();
        assert!(!is_cancelled(&e));
    }
}
