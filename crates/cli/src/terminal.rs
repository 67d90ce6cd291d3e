//! The host terminal of `crumble run -t`: its window size and raw mode.

use std::io;

/// The size a terminal that does not know its own (0 × 0) is taken to have.
const FALLBACK: (u16, u16) = (24, 80);

/// The (rows, columns) of the terminal on `fd`; `None` if `fd` is no
/// terminal.
pub(crate) fn window_size(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data, filled by the ioctl.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which is
    // to a live local.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } != 0 {
        return None;
    }
    Some(known_size(size.ws_row, size.ws_col))
}

fn known_size(rows: u16, cols: u16) -> (u16, u16) {
    if rows == 0 || cols == 0 {
        return FALLBACK;
    }
    (
        rows.min(cc::MAX_TERMINAL_SIZE),
        cols.min(cc::MAX_TERMINAL_SIZE),
    )
}

/// The terminal on a descriptor in raw mode (no echo, no line editing, no
/// signals from keys, no output processing) until this is dropped, which
/// puts back the settings it found.
#[derive(Debug)]
pub(crate) struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    pub(crate) fn enter(fd: i32) -> io::Result<RawMode> {
        // SAFETY: termios is plain data, filled by tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through a live pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one termios through a live pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads one termios through a live pointer.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_absurd_sizes_are_usable() {
        assert_eq!(known_size(0, 0), FALLBACK);
        assert_eq!(known_size(50, 0), FALLBACK);
        assert_eq!(known_size(50, 132), (50, 132));
        assert_eq!(known_size(u16::MAX, 10), (cc::MAX_TERMINAL_SIZE, 10));
    }

    #[test]
    fn a_pipe_is_no_terminal() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert_eq!(window_size(fds[0]), None);
        assert!(RawMode::enter(fds[0]).is_err());
        for fd in fds {
            // SAFETY: both descriptors are ours and closed once.
            unsafe { libc::close(fd) };
        }
    }
}
