//! The guest's serial console. QEMU writes it to a socket and a thread
//! keeps the newest bytes on disk in `console.log` (and the half before in
//! `console.log.1`), so a guest that floods its console costs the host at
//! most the cap in disk, whatever it writes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[derive(Debug)]
pub(crate) struct Console {
    socket: UnixStream,
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Drains `socket` into `dir/console.log`, keeping about `max` bytes.
    pub(crate) fn start(socket: UnixStream, dir: &Path, max: u64) -> std::io::Result<Console> {
        let path = dir.join("console.log");
        let mut log = Log::open(&path, max.max(2))?;
        let reader = socket.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("cc-console".into())
            .spawn(move || log.drain(reader))?;
        Ok(Console {
            socket,
            path,
            thread: Some(thread),
        })
    }

    /// The last `lines` lines the guest printed (lossy UTF-8).
    pub(crate) fn tail(&self, lines: usize) -> String {
        let mut bytes = fs::read(rotated(&self.path)).unwrap_or_default();
        bytes.extend(fs::read(&self.path).unwrap_or_default());
        last_lines(&bytes, lines)
    }
}

/// The last `lines` lines of `bytes` (lossy UTF-8), newline-terminated.
pub(crate) fn last_lines(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that rotates once it holds half the cap.
struct Log {
    path: PathBuf,
    file: File,
    written: u64,
    half: u64,
}

impl Log {
    fn open(path: &Path, max: u64) -> std::io::Result<Log> {
        Ok(Log {
            path: path.to_path_buf(),
            file: create(path)?,
            written: 0,
            half: max / 2,
        })
    }

    fn drain(&mut self, mut from: impl Read) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                // The host program's signal handlers (Python's SIGINT one
                // among them) may land on this thread without SA_RESTART;
                // stopping here would leave QEMU's console undrained.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.write(&buf[..n]).is_err() {
                // Keep draining: QEMU must never block on its console.
                continue;
            }
        }
    }

    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.written >= self.half {
                fs::rename(&self.path, rotated(&self.path))?;
                self.file = create(&self.path)?;
                self.written = 0;
            }
            let room = (self.half - self.written).min(bytes.len() as u64) as usize;
            self.file.write_all(&bytes[..room])?;
            self.written += room as u64;
            bytes = &bytes[room..];
        }
        Ok(())
    }
}

fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_flood_leaves_at_most_the_cap_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("cc-console-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (guest, host) = UnixStream::pair().unwrap();
        let console = Console::start(host, &dir, 64 << 10).unwrap();
        let mut guest = guest;
        for i in 0..10_000 {
            writeln!(guest, "line {i:05} {}", "x".repeat(50)).unwrap();
        }
        drop(guest);
        // The drain ends at the guest's EOF; dropping joins it.
        let tail = {
            let c = console;
            while fs::metadata(dir.join("console.log"))
                .map(|m| m.len())
                .unwrap_or(0)
                == 0
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            let t = c.tail(2);
            drop(c);
            t
        };
        assert!(
            tail.ends_with(&format!("line 09999 {}\n", "x".repeat(50))),
            "{tail}"
        );
        let total: u64 = ["console.log", "console.log.1"]
            .iter()
            .map(|f| fs::metadata(dir.join(f)).unwrap().len())
            .sum();
        assert!(total <= 64 << 10, "{total} bytes kept");
        let mode = fs::metadata(dir.join("console.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Reads that are interrupted once between two chunks, as a signal
    /// landing on the drain thread makes them.
    struct Interrupting(Vec<std::io::Result<&'static [u8]>>);

    impl Read for Interrupting {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.pop() {
                None => Ok(0),
                Some(Err(e)) => Err(e),
                Some(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(bytes);
                    Ok(bytes.len())
                }
            }
        }
    }

    #[test]
    fn an_interrupted_read_does_not_end_the_drain() {
        let dir = std::env::temp_dir().join(format!("cc-console-eintr-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut log = Log::open(&path, 1 << 20).unwrap();
        let interrupted = std::io::Error::from(std::io::ErrorKind::Interrupted);
        log.drain(Interrupting(vec![
            Ok(b"after\n"),
            Err(interrupted),
            Ok(b"before\n"),
        ]));
        assert_eq!(fs::read(&path).unwrap(), b"before\nafter\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
