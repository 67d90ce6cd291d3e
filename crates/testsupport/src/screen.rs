//! What a terminal shows, read as it comes.

use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The bytes a terminal's output showed so far, read by a thread of its
/// own until the output ends (or fails: a pseudo-terminal's master reads
/// `EIO` once nobody holds the slave).
#[derive(Debug)]
pub struct Screen {
    seen: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Screen {
    pub fn watch(mut output: impl Read + Send + 'static) -> Screen {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = output.read(&mut buf) {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&buf[..n]);
            }
        });
        Screen { seen, reader }
    }

    /// Everything shown so far, as text.
    pub fn text(&self) -> String {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Waits until `what` shows; panics with what did after a generous
    /// bound (against hangs, not a measure of speed).
    pub fn expect(&self, what: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        while !self.text().contains(what) {
            assert!(
                Instant::now() < end,
                "{what:?} never showed; the terminal showed {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the end of the output; everything it showed.
    pub fn finish(self) -> String {
        let Screen { seen, reader } = self;
        let _ = reader.join();
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&seen).into_owned()
    }
}

/// A new pseudo-terminal of `rows` × `cols`: its master (what the
/// terminal shows, what is typed) and its slave (a program's stdio).
pub fn openpty(rows: u16, cols: u16) -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors through live pointers and
    // reads the size; no name buffer or settings are passed.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_what_was_written_and_ends_with_it() {
        let screen = Screen::watch(&b"hello\r\n# "[..]);
        screen.expect("# ");
        assert_eq!(screen.finish(), "hello\r\n# ");
    }
}
