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

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate() {
        // Deterministic xorshift: mutated valid frames and plain noise.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
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
