//! Telling an OOM kill from any other `SIGKILL`. Inside the guest the
//! kernel's OOM killer sends a plain `SIGKILL`; what marks it is the
//! kernel's global count of OOM kills (`oom_kill` in `/proc/vmstat`),
//! which the shim compares, when a process dies by `SIGKILL`, with the
//! count it last accounted for in that VM.

use std::sync::{Mutex, PoisonError};

/// The exit status of a process killed by `SIGKILL`.
pub const KILLED: u32 = 128 + libc::SIGKILL as u32;

/// The guest file with the kernel's event counters.
pub const VMSTAT: &str = "/proc/vmstat";

/// The kernel's count of OOM kills since boot, from `/proc/vmstat`.
pub fn oom_kills(vmstat: &str) -> Option<u64> {
    vmstat.lines().find_map(|l| {
        let (name, value) = l.split_once(' ')?;
        (name == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

/// One VM's OOM kills accounted for so far, shared by the containers in
/// it (a pod's). Starts at zero: the kernel's count starts at the VM's
/// boot, which the shim made for its container or pod (a warm start's
/// template is an idle guest that killed nothing).
#[derive(Debug, Default)]
pub struct OomCount {
    seen: Mutex<u64>,
}

impl OomCount {
    /// Whether a process that exited with `status` was the OOM killer's:
    /// it died by `SIGKILL` and the kernel's count (`read`, asked for only
    /// then) went past the kills already accounted for, which this one
    /// then takes. Concurrent exits each take a kill at most once.
    pub fn claim(&self, status: u32, read: impl FnOnce() -> Option<u64>) -> bool {
        if status != KILLED {
            return false;
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match read() {
            Some(now) if now > *seen => {
                *seen = now;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oom_kill_counter_is_read_from_vmstat() {
        let vmstat = "nr_free_pages 115845\noom_kill 3\nunevictable_pgs_culled 0\n";
        assert_eq!(oom_kills(vmstat), Some(3));
        assert_eq!(oom_kills("oom_kill 0"), Some(0));
        // Not a prefix match, and a kernel without the counter says nothing.
        assert_eq!(oom_kills("oom_kill_extra 4\n"), None);
        assert_eq!(oom_kills("nr_free_pages 1\n"), None);
        assert_eq!(oom_kills("oom_kill x\n"), None);
        assert_eq!(oom_kills(""), None);
    }

    #[test]
    fn only_a_sigkill_with_a_new_oom_kill_is_an_oom() {
        let count = OomCount::default();
        // Other statuses never read the counter.
        assert!(!count.claim(0, || panic!("read for a clean exit")));
        assert!(!count.claim(143, || panic!("read for SIGTERM")));
        // A plain SIGKILL: the counter did not move.
        assert!(!count.claim(KILLED, || Some(0)));
        // An OOM kill, taken once.
        assert!(count.claim(KILLED, || Some(1)));
        assert!(!count.claim(KILLED, || Some(1)));
        // Two kills since: one exit takes both.
        assert!(count.claim(KILLED, || Some(3)));
        assert!(!count.claim(KILLED, || Some(3)));
        // An unreadable counter is no OOM.
        assert!(!count.claim(KILLED, || None));
    }
}
