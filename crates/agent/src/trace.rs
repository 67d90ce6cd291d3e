//! Phase timings for benchmarks (`Request::Trace`): off unless the host
//! asks, and then one clock read and one short lock per span.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cc_protocol::{Span, TRACE_LIMIT};

static ON: AtomicBool = AtomicBool::new(false);
static SPANS: Mutex<Vec<Span>> = Mutex::new(Vec::new());

/// Records that phase `name` began at `since` and ends now.
pub fn record(name: &'static str, since: Instant) {
    if ON.load(Ordering::Relaxed) {
        keep(name, since);
    }
}

/// Records a phase of the guest's setup, whether recording is on or not:
/// it happens once per instance, before any `Trace` could turn it on.
pub fn record_setup(name: &'static str, since: Instant) {
    keep(name, since);
}

fn keep(name: &'static str, since: Instant) {
    let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut spans = crate::lock(&SPANS);
    if spans.len() < TRACE_LIMIT {
        spans.push(Span {
            name: name.to_owned(),
            nanos,
        });
    }
}

/// The spans recorded so far, which are forgotten; recording goes on
/// while `on`.
pub fn take(on: bool) -> Vec<Span> {
    ON.store(on, Ordering::Relaxed);
    std::mem::take(&mut *crate::lock(&SPANS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_kept_only_while_on_and_bounded() {
        take(false);
        record("off", Instant::now());
        assert!(take(true).is_empty());
        for _ in 0..TRACE_LIMIT + 10 {
            record("on", Instant::now());
        }
        let spans = take(false);
        assert_eq!(spans.len(), TRACE_LIMIT);
        assert!(spans.iter().all(|s| s.name == "on"));
        record("off again", Instant::now());
        assert!(take(false).is_empty());
    }
}
