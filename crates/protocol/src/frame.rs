//! Length-prefixed frames of postcard-encoded [`Message`]s.

use std::io::{self, Read, Write};

use crate::{Message, MAX_FRAME};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel i/o")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("channel closed inside a frame")]
    Truncated,
    #[error("undecodable frame")]
    Decode(#[source] postcard::Error),
    #[error("unencodable message")]
    Encode(#[source] postcard::Error),
}

/// Encodes `msg` as one frame: length prefix plus payload.
pub fn encode(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(FrameError::Encode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Room [`data_header`] needs before a `Data` payload: length prefix,
/// variant, stream id and payload length as varints.
pub const DATA_HEADER_MAX: usize = 4 + 1 + 5 + 5;

/// The bytes that precede `len` payload bytes in the frame of
/// `Message::Data { stream, .. }`, written right-aligned at the end of
/// `out`; returns how many. A sender can read the payload straight into a
/// buffer after [`DATA_HEADER_MAX`] bytes and send the frame without
/// copying it again.
pub fn data_header(stream: u32, len: usize, out: &mut [u8; DATA_HEADER_MAX]) -> usize {
    let mut body = [0u8; DATA_HEADER_MAX - 4];
    // `Data` is variant 3 of `Message`; postcard writes it, then the
    // stream id and the byte string's length, as varints.
    let mut n = 0;
    for value in [3u32, stream, len as u32] {
        n += varint(value, &mut body[n..]);
    }
    let total = 4 + n;
    let start = DATA_HEADER_MAX - total;
    out[start..start + 4].copy_from_slice(&((n + len) as u32).to_le_bytes());
    out[start + 4..].copy_from_slice(&body[..n]);
    total
}

fn varint(mut v: u32, out: &mut [u8]) -> usize {
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// Writes `msg` as one frame.
pub fn write(w: &mut impl Write, msg: &Message) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Decodes one frame payload (without its length prefix).
pub fn decode(payload: &[u8]) -> Result<Message, FrameError> {
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Reads one frame. `Ok(None)` is a clean end of the channel between frames.
pub fn read(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Message>, FrameError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf.resize(len, 0);
    if read_full(r, buf)? != len {
        return Err(FrameError::Truncated);
    }
    decode(buf).map(Some)
}

/// What [`FrameReader::read_frame`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A `Data` frame whose `len` payload bytes are still unread: take them
    /// with [`FrameReader::payload`] (or let the next call skip them).
    Data { stream: u32, len: usize },
    /// Any other message, decoded.
    Message(Message),
}

/// Reads frames with `Data` payloads going straight to the caller's
/// buffer: the payload is never decoded into a message of its own or
/// copied through an intermediate buffer, which on an emulated guest CPU
/// is what a bulk transfer costs most. Small frames and headers come
/// through a small internal buffer, so reading them costs no system call
/// of its own.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// Payload bytes of the last `Data` frame not yet taken.
    unread: usize,
    /// Payload of the last non-`Data` frame (reused).
    scratch: Vec<u8>,
}

/// The internal buffer: room for every header, and the small frames that
/// are most of a conversation, in one read.
const READ_BUFFER: usize = 16 << 10;

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            pos: 0,
            filled: 0,
            unread: 0,
            scratch: Vec::new(),
        }
    }

    /// The payload of the last non-`Data` frame read, decodable or not
    /// (for telling an agent of another version from garbage).
    pub fn last_payload(&self) -> &[u8] {
        &self.scratch
    }

    /// Buffers at least `want` (≤ the buffer) bytes; false if the reader
    /// ended first.
    fn fill(&mut self, want: usize) -> io::Result<bool> {
        if self.filled - self.pos >= want {
            return Ok(true);
        }
        self.buf.copy_within(self.pos..self.filled, 0);
        self.filled -= self.pos;
        self.pos = 0;
        while self.filled < want {
            match self.inner.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Copies buffered bytes, then reads the rest of `out` directly.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), FrameError> {
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if read_full(&mut self.inner, &mut out[n..])? != out.len() - n {
            return Err(FrameError::Truncated);
        }
        Ok(())
    }

    /// Reads the next frame. `Ok(None)` is a clean end between frames. A
    /// `Data` payload left unread by [`payload`](Self::payload) is skipped.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        while self.unread > 0 {
            if self.pos == self.filled && !self.fill(1)? {
                return Err(FrameError::Truncated);
            }
            let n = self.unread.min(self.filled - self.pos);
            self.pos += n;
            self.unread -= n;
        }
        if !self.fill(4)? {
            return match self.filled - self.pos {
                0 => Ok(None),
                _ => Err(FrameError::Truncated),
            };
        }
        let len = u32::from_le_bytes(
            self.buf[self.pos..self.pos + 4]
                .try_into()
                .unwrap_or_default(),
        ) as usize;
        self.pos += 4;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        // A `Data` header is at most 11 bytes; a shorter frame has them all.
        let head = len.min(DATA_HEADER_MAX - 4);
        if !self.fill(head)? {
            return Err(FrameError::Truncated);
        }
        if let Some((stream, payload, used)) =
            parse_data_header(&self.buf[self.pos..self.pos + head])
        {
            if used + payload != len {
                return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
            }
            self.pos += used;
            self.unread = payload;
            return Ok(Some(Frame::Data {
                stream,
                len: payload,
            }));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(len, 0);
        let read = self.read_exact(&mut scratch);
        self.scratch = scratch;
        read?;
        decode(&self.scratch).map(|m| Some(Frame::Message(m)))
    }

    /// Reads the payload of the `Data` frame [`read_frame`](Self::read_frame) just
    /// returned into `out`, whose length must be that frame's `len`.
    pub fn payload(&mut self, out: &mut [u8]) -> Result<(), FrameError> {
        if out.len() != self.unread {
            return Err(FrameError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "payload buffer of the wrong size",
            )));
        }
        self.unread = 0;
        self.read_exact(out)
    }
}

/// Parses the start of a frame payload as the header of a `Data` message:
/// stream id, payload length, and how many bytes the header took. `None`
/// for any other message (or a malformed header, which then fails to
/// decode as a message).
fn parse_data_header(bytes: &[u8]) -> Option<(u32, usize, usize)> {
    // `Data` is variant 3 of `Message` (see `data_header`).
    let (&variant, rest) = bytes.split_first()?;
    if variant != 3 {
        return None;
    }
    let (stream, a) = parse_varint(rest)?;
    let (len, b) = parse_varint(&rest[a..])?;
    Some((stream, len as usize, 1 + a + b))
}

/// A postcard varint `u32`: at most five bytes, no bits past 32.
fn parse_varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        if i == 4 && byte > 0x0f {
            return None;
        }
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Fills `buf` unless the reader ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The version in a `Hello` payload, decoded leniently so that an agent of
/// any version can be told apart from garbage.
pub fn hello_version(payload: &[u8]) -> Option<u32> {
    // Variant 0 (`Hello`) is the byte 0; `version` follows as a varint.
    let (&variant, rest) = payload.split_first()?;
    if variant != 0 {
        return None;
    }
    let (version, _) = postcard::take_from_bytes::<u32>(rest).ok()?;
    Some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use serde_bytes::ByteBuf;

    fn sample() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                agent: "cc-agent 0.1".into(),
            },
            Message::Request {
                id: 7,
                body: Request::Exec(Exec {
                    process: 3,
                    argv: vec![
                        ByteBuf::from(b"echo".to_vec()),
                        ByteBuf::from(vec![0xff, b'x']),
                    ],
                    env: vec![ByteBuf::from(b"A=b".to_vec())],
                    cwd: Some(ByteBuf::from(b"/tmp".to_vec())),
                    user: Some("1000:1000".into()),
                    stdin: Some(1),
                    stdout: Stdio::Stream(2),
                    stderr: Stdio::Stdout,
                    pty: None,
                    root: None,
                    rlimits: vec![Rlimit {
                        resource: 7,
                        soft: 100,
                        hard: u64::MAX,
                    }],
                }),
            },
            Message::Response {
                id: 7,
                body: Err(RemoteError {
                    kind: ErrorKind::NotFound,
                    message: "nope".into(),
                    errno: Some(2),
                }),
            },
            Message::Data {
                stream: 2,
                bytes: ByteBuf::from(vec![1u8; 100_000]),
            },
            Message::Eof { stream: 2 },
            Message::Credit {
                stream: 2,
                bytes: 4096,
            },
            Message::Exited {
                process: 3,
                status: ExitStatus::Signal(9),
            },
            Message::Goodbye {
                reason: "SIGTERM (reboot) from pid 12".into(),
            },
        ]
    }

    #[test]
    fn round_trip_through_a_stream() {
        let mut wire = Vec::new();
        for m in sample() {
            write(&mut wire, &m).unwrap();
        }
        let mut r = &wire[..];
        let mut buf = Vec::new();
        for m in sample() {
            assert_eq!(read(&mut r, &mut buf).unwrap(), Some(m));
        }
        assert_eq!(read(&mut r, &mut buf).unwrap(), None);
    }

    #[test]
    fn truncated_frames_are_errors() {
        let wire = encode(&sample()[1]).unwrap();
        for cut in [1, 3, 4, 5, wire.len() - 1] {
            let mut r = &wire[..cut];
            assert!(
                matches!(read(&mut r, &mut Vec::new()), Err(FrameError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let wire = u32::MAX.to_le_bytes();
        let mut buf = Vec::new();
        assert!(matches!(
            read(&mut &wire[..], &mut buf),
            Err(FrameError::TooLarge(_))
        ));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let mut wire = 3u32.to_le_bytes().to_vec();
        wire.extend([0xff, 0xff, 0xff]);
        assert!(matches!(
            read(&mut &wire[..], &mut Vec::new()),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn data_header_matches_the_encoder() {
        for (stream, len) in [
            (0u32, 0usize),
            (1, 1),
            (300, 127),
            (1 << 31, 128),
            (u32::MAX, DATA_CHUNK),
        ] {
            let payload = vec![7u8; len];
            let expected = encode(&Message::Data {
                stream,
                bytes: ByteBuf::from(payload.clone()),
            })
            .unwrap();
            let mut header = [0u8; DATA_HEADER_MAX];
            let n = data_header(stream, len, &mut header);
            let mut frame = header[DATA_HEADER_MAX - n..].to_vec();
            frame.extend_from_slice(&payload);
            assert_eq!(frame, expected, "stream {stream}, {len} bytes");
        }
    }

    /// A deterministic xorshift generator from `seed`.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate() {
        // Mutated valid frames and plain noise.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<Vec<u8>> = sample().iter().map(|m| encode(m).unwrap()).collect();
        for i in 0..5_000 {
            let mut wire = valid[i % valid.len()].clone();
            for _ in 0..(next() % 4 + 1) {
                let at = next() as usize % wire.len();
                wire[at] = next() as u8;
            }
            if i % 3 == 0 {
                wire.truncate(next() as usize % wire.len());
            }
            let mut r = &wire[..];
            let mut buf = Vec::new();
            while let Ok(Some(_)) = read(&mut r, &mut buf) {}
            assert!(buf.capacity() <= MAX_FRAME);
        }
    }

    /// A frame reader over `wire` that yields at most `step` bytes a read,
    /// as a virtio port yields one page at a time.
    fn reader(wire: &[u8], step: usize) -> FrameReader<impl Read + '_> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        FrameReader::new(Trickle(wire, step))
    }

    #[test]
    fn frame_reader_hands_data_payloads_to_the_caller() {
        let mut wire = Vec::new();
        for m in sample() {
            write(&mut wire, &m).unwrap();
        }
        for step in [1, 7, 4096, usize::MAX] {
            let mut r = reader(&wire, step);
            for m in sample() {
                match (r.read_frame().unwrap().unwrap(), m) {
                    (Frame::Data { stream, len }, Message::Data { stream: s, bytes }) => {
                        assert_eq!((stream, len), (s, bytes.len()));
                        let mut out = vec![0u8; len];
                        r.payload(&mut out).unwrap();
                        assert_eq!(out, bytes.into_vec());
                    }
                    (Frame::Message(got), want) => assert_eq!(got, want),
                    (got, want) => panic!("{got:?} for {want:?}"),
                }
            }
            assert_eq!(r.read_frame().unwrap(), None, "step {step}");
        }
    }

    #[test]
    fn frame_reader_skips_payloads_left_unread_and_checks_their_size() {
        let mut wire = encode(&sample()[3]).unwrap();
        wire.extend(encode(&sample()[4]).unwrap());
        let mut r = reader(&wire, 1000);
        assert!(matches!(
            r.read_frame().unwrap(),
            Some(Frame::Data { len: 100_000, .. })
        ));
        assert!(r.payload(&mut [0u8; 3]).is_err());
        assert_eq!(
            r.read_frame().unwrap(),
            Some(Frame::Message(Message::Eof { stream: 2 }))
        );
        assert_eq!(r.read_frame().unwrap(), None);
    }

    #[test]
    fn frame_reader_refuses_bad_lengths_before_allocating() {
        let wire = u32::MAX.to_le_bytes();
        let mut r = reader(&wire, 100);
        assert!(matches!(r.read_frame(), Err(FrameError::TooLarge(_))));
        // A `Data` header claiming more (or less) payload than its frame.
        for claimed in [11u8, 9] {
            let wire = [13, 0, 0, 0, 3, 1, claimed, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            assert!(matches!(
                reader(&wire, 100).read_frame(),
                Err(FrameError::Decode(_))
            ));
        }
        // Varints past 32 bits.
        let wire = [8, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 0x7f, 0, 0];
        assert!(matches!(
            reader(&wire, 100).read_frame(),
            Err(FrameError::Decode(_))
        ));
        for cut in [1, 4, 6, 20] {
            let wire = encode(&sample()[3]).unwrap();
            let mut r = reader(&wire[..cut], 3);
            let result = match r.read_frame() {
                Ok(Some(Frame::Data { len, .. })) => r.payload(&mut vec![0; len]).map(|()| None),
                other => other,
            };
            assert!(matches!(result, Err(FrameError::Truncated)), "cut at {cut}");
        }
    }

    #[test]
    fn frame_reader_survives_arbitrary_bytes() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let valid: Vec<Vec<u8>> = sample().iter().map(|m| encode(m).unwrap()).collect();
        for i in 0..5_000 {
            let mut wire = valid[i % valid.len()].clone();
            wire.extend(&valid[(i + 3) % valid.len()]);
            for _ in 0..(next() % 4 + 1) {
                let at = next() as usize % wire.len();
                wire[at] = next() as u8;
            }
            let mut r = reader(&wire, (next() % 5000 + 1) as usize);
            loop {
                match r.read_frame() {
                    Ok(Some(Frame::Data { len, .. })) => {
                        assert!(len <= MAX_FRAME);
                        if i % 2 == 0 && r.payload(&mut vec![0; len]).is_err() {
                            break;
                        }
                    }
                    Ok(Some(Frame::Message(_))) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            assert!(r.last_payload().len() <= MAX_FRAME);
        }
    }

    #[test]
    fn hello_version_survives_unknown_layouts() {
        let wire = encode(&sample()[0]).unwrap();
        assert_eq!(hello_version(&wire[4..]), Some(PROTOCOL_VERSION));
        // A future agent's Hello with more fields still reports its version.
        assert_eq!(hello_version(&[0, 0x96, 0x01, 9, 9, 9]), Some(150));
        assert_eq!(hello_version(&encode(&sample()[4]).unwrap()[4..]), None);
        assert_eq!(hello_version(&[]), None);
    }
}
