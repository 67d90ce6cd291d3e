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
