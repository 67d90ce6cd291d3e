//! The FIFOs containerd hands over for a process's stdio, and the threads
//! copying between them and the guest process.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an exit waits for the output copies to drain before it is
/// reported anyway (a background process may keep stdout open).
const DRAIN: Duration = Duration::from_secs(2);

/// A process's opened FIFOs.
#[derive(Debug, Default)]
pub struct Fifos {
    /// Read end, and a write end of ours so reads do not end before the
    /// client opens its own; dropping ours (CloseIO) lets EOF through.
    pub stdin: Option<File>,
    pub stdin_keep: Option<File>,
    /// Write ends, each with a read end held until the copy ends, so the
    /// opens never block and a reader that comes and goes loses nothing.
    pub stdout: Option<(File, File)>,
    pub stderr: Option<(File, File)>,
}

/// Opens the FIFOs at these paths (an empty path means none).
pub fn open(stdin: &str, stdout: &str, stderr: &str) -> io::Result<Fifos> {
    for p in [stdin, stdout, stderr] {
        if p.contains("://") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("stdio {p:?}: only FIFO paths are supported, not logging URIs"),
            ));
        }
    }
    let mut f = Fifos::default();
    if !stdin.is_empty() {
        let read = open_nonblock_read(stdin)?;
        f.stdin_keep = Some(OpenOptions::new().write(true).open(stdin)?);
        f.stdin = Some(read);
    }
    let out = |p: &str| -> io::Result<Option<(File, File)>> {
        if p.is_empty() {
            return Ok(None);
        }
        let keep = open_nonblock_read(p)?;
        Ok(Some((OpenOptions::new().write(true).open(p)?, keep)))
    };
    f.stdout = out(stdout)?;
    f.stderr = out(stderr)?;
    Ok(f)
}

/// Opens a FIFO's read end without waiting for a writer, then makes it
/// blocking for the copy.
fn open_nonblock_read(path: &str) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Copies `from` into `to` on a thread until `from` ends.
pub fn pump(
    name: &str,
    mut from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    keep: Option<File>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = [0u8; 32 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            drop(to);
            drop(keep);
        })
}

/// Waits for the output copies to end, for at most [`DRAIN`] in all.
pub fn drain(copies: Vec<JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel();
    let n = copies.len();
    for c in copies {
        let tx = tx.clone();
        // Joined on a helper so the wait is bounded; a copy that outlives
        // it ends with the stream.
        let _ = std::thread::Builder::new()
            .name("cc-shim-drain".into())
            .spawn(move || {
                let _ = c.join();
                let _ = tx.send(());
            });
    }
    let deadline = Instant::now() + DRAIN;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            log::warn!("output copy still open after the process exited");
            return;
        }
    }
}
