//! A layer handed from its download to the root image builder while it
//! downloads, so network, digest, decompression and image building overlap
//! instead of running one after another.
//!
//! The download side sends each chunk as it writes it to the store, and
//! [`Chunk::Verified`] only once the whole blob matched its digest and was
//! published. The reading side sees the end of the layer only after that
//! message: a download that fails, is cancelled or does not match its
//! digest ends the stream in an error instead, so the builder never
//! finishes (let alone publishes) an image from unverified bytes.

use std::io::{self, BufRead, Read};

use tokio::sync::mpsc;

/// Chunks in flight between the download and the builder: enough to ride
/// out the builder pausing on a large file without holding much memory.
pub(crate) const DEPTH: usize = 256;

/// What the download side sends.
#[derive(Debug)]
pub(crate) enum Chunk<B> {
    Data(B),
    /// The blob is complete, matched its digest and is in the store.
    Verified,
}

/// The reading end: a blocking [`BufRead`] over the chunks, for a thread
/// outside the pull's runtime.
#[derive(Debug)]
pub(crate) struct LayerStream<B> {
    rx: mpsc::Receiver<Chunk<B>>,
    chunk: Option<B>,
    pos: usize,
    verified: bool,
}

/// A connected sender and stream.
pub(crate) fn channel<B>() -> (mpsc::Sender<Chunk<B>>, LayerStream<B>) {
    let (tx, rx) = mpsc::channel(DEPTH);
    let stream = LayerStream {
        rx,
        chunk: None,
        pos: 0,
        verified: false,
    };
    (tx, stream)
}

impl<B: AsRef<[u8]>> LayerStream<B> {
    /// Reads what is left up to the end of the verified blob: the builder
    /// may stop reading before the compressed stream's end (trailing
    /// bytes), but must not publish before the digest checked out.
    pub(crate) fn wait_verified(&mut self) -> io::Result<()> {
        while !self.fill_buf()?.is_empty() {
            let n = self.fill_buf()?.len();
            self.consume(n);
        }
        Ok(())
    }
}

impl<B: AsRef<[u8]>> BufRead for LayerStream<B> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while !self.verified
            && self
                .chunk
                .as_ref()
                .is_none_or(|c| self.pos >= c.as_ref().len())
        {
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => {
                    self.chunk = Some(b);
                    self.pos = 0;
                }
                Some(Chunk::Verified) => {
                    self.chunk = None;
                    self.verified = true;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the layer's download stopped before it was verified",
                    ))
                }
            }
        }
        Ok(match &self.chunk {
            Some(c) => &c.as_ref()[self.pos..],
            None => &[],
        })
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

impl<B: AsRef<[u8]>> Read for LayerStream<B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let have = self.fill_buf()?;
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Bytes a [`ReadAhead`] hands over at a time.
const AHEAD_CHUNK: usize = 256 << 10;
/// Chunks a [`ReadAhead`] may have ready before its reader takes them.
const AHEAD_DEPTH: usize = 4;

/// Reads `inner` on a thread of its own, a few chunks ahead of whoever
/// reads this: decompressing a layer takes a core by itself, so the tar
/// parsing, hashing and image writing that consume it go on another. The
/// thread stops at the end of `inner`, at its first error (handed on as
/// this reader's error), or once this reader is dropped.
pub(crate) struct ReadAhead {
    full: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    empty: std::sync::mpsc::SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ReadAhead {
    pub(crate) fn spawn<'scope, R: Read + Send + 'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        mut inner: R,
    ) -> ReadAhead {
        let (full_tx, full) = std::sync::mpsc::sync_channel(AHEAD_DEPTH);
        let (empty, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(AHEAD_DEPTH + 1);
        // Named, so profiles tell it from the thread that reads from it;
        // failing to start it is the panic `Scope::spawn` would raise.
        let thread = std::thread::Builder::new().name("cc-image-inflate".into());
        let started = thread.spawn_scoped(scope, move || loop {
            let mut buf = empty_rx.try_recv().unwrap_or_default();
            buf.resize(AHEAD_CHUNK, 0);
            let mut len = 0;
            // Whole chunks, so the reader takes few of them.
            let result = loop {
                match inner.read(&mut buf[len..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        len += n;
                        if len == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(len);
            let last = len == 0 || result.is_err();
            let sent = match result {
                Ok(()) => full_tx.send(Ok(buf)),
                Err(e) if len == 0 => full_tx.send(Err(e)),
                // The bytes before the error first, then the error.
                Err(e) => full_tx.send(Ok(buf)).and_then(|()| full_tx.send(Err(e))),
            };
            if last || sent.is_err() {
                return;
            }
        });
        started.expect("failed to spawn thread");
        ReadAhead {
            full,
            empty,
            chunk: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() && !self.done {
            match self.full.recv() {
                Ok(Ok(next)) => {
                    self.done = next.is_empty();
                    let used = std::mem::replace(&mut self.chunk, next);
                    // Back to the thread for reuse, if it wants it.
                    let _ = self.empty.try_send(used);
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("the decompressing thread stopped")),
            }
        }
        let have = &self.chunk[self.pos..];
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_only_once_verified() {
        let (tx, mut stream) = channel::<Vec<u8>>();
        tx.blocking_send(Chunk::Data(b"ab".to_vec())).unwrap();
        tx.blocking_send(Chunk::Data(Vec::new())).unwrap();
        tx.blocking_send(Chunk::Data(b"c".to_vec())).unwrap();
        tx.blocking_send(Chunk::Verified).unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
        stream.wait_verified().unwrap();
    }

    #[test]
    fn a_stopped_download_is_an_error_not_an_end() {
        let (tx, mut stream) = channel::<Vec<u8>>();
        tx.blocking_send(Chunk::Data(b"ab".to_vec())).unwrap();
        drop(tx);
        let mut out = Vec::new();
        let err = stream.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(out, b"ab");
        assert!(stream.wait_verified().is_err());
    }

    #[test]
    fn read_ahead_passes_bytes_then_the_error() {
        let data: Vec<u8> = (0..(AHEAD_CHUNK * 3 + 7)).map(|i| i as u8).collect();
        std::thread::scope(|s| {
            let mut out = Vec::new();
            ReadAhead::spawn(s, &data[..])
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data);

            let failing = (&data[..10]).chain(FailingRead);
            let mut out = Vec::new();
            let err = ReadAhead::spawn(s, failing)
                .read_to_end(&mut out)
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(out, data[..10]);

            // Dropped early, the thread stops rather than reading it all.
            let mut r = ReadAhead::spawn(s, io::repeat(1));
            r.read_exact(&mut [0; 10]).unwrap();
        });
    }

    struct FailingRead;

    impl Read for FailingRead {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt"))
        }
    }
}
