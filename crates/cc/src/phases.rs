//! Where a bulk transfer's time goes on the host: time spent in each phase
//! of the data path, summed over every stream since last taken. Always on:
//! a phase is timed once per frame or read, which costs nothing next to
//! it. `crumble bench files --phases` prints these next to the agent's
//! ([`Instance::agent_trace`](crate::Instance::agent_trace)). Totals in
//! atomics rather than `tracing` spans, because they are kept on the
//! channel's reader thread as well as the caller's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A measured step of the host's data path.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// A writer waiting for the guest to return credit.
    CreditWait,
    /// Writing `Data` frames to the channel socket.
    Send,
    /// The reader thread reading `Data` payloads off the socket.
    Receive,
    /// Callers reading inbound streams: waiting for data, and copying it.
    Read,
}

const NAMES: [&str; 4] = [
    "host: wait for credit",
    "host: write frames (writev)",
    "host: read payloads off the socket",
    "host: callers wait for and copy data",
];

static TOTALS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Adds the time since `since` to `phase`.
pub(crate) fn add(phase: Phase, since: Instant) {
    TOTALS[phase as usize].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// The host's phase totals (of every instance in this process) since the
/// last call, by name.
#[doc(hidden)]
pub fn take_host_phases() -> Vec<(String, Duration)> {
    NAMES
        .iter()
        .zip(&TOTALS)
        .map(|(name, total)| {
            let nanos = total.swap(0, Ordering::Relaxed);
            (name.to_string(), Duration::from_nanos(nanos))
        })
        .collect()
}
