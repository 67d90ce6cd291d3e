//! Where a bulk transfer's time goes in the agent: time spent in each
//! phase of the data path, summed over every stream until the host takes
//! the totals with `Request::Phases`. Always on: a phase is timed once per
//! frame, which costs little next to moving the frame on an emulated CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A measured step of the agent's data path.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// The reader thread reading `Data` payloads out of the port.
    Receive,
    /// A consumer waiting for the next chunk of a host → guest stream.
    WaitData,
    /// A consumer writing chunks to their destination (a file, a pipe).
    WriteSink,
    /// A pump waiting for the host's credit.
    CreditWait,
    /// A pump reading its source (a file, a pipe).
    ReadSource,
    /// A pump writing `Data` frames to the port.
    Send,
}

const NAMES: [&str; 6] = [
    "guest: read payloads out of the port",
    "guest: wait for data",
    "guest: write to the file",
    "guest: wait for credit",
    "guest: read the file",
    "guest: write frames to the port",
];

static TOTALS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Adds the time since `since` to `phase`.
pub fn add(phase: Phase, since: Instant) {
    TOTALS[phase as usize].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Every phase's total in nanoseconds since the last call, by name.
pub fn take() -> Vec<(String, u64)> {
    NAMES
        .iter()
        .zip(&TOTALS)
        .map(|(name, total)| (name.to_string(), total.swap(0, Ordering::Relaxed)))
        .collect()
}
