//! Pause bookkeeping: whether an instance is paused, and how much paused
//! time has passed, so that time limits count only running time.
//!
//! A limit is a [`Deadline`]: an instant plus the paused total when it was
//! set; each pause since moves it later by its length. Waiters sleep until
//! the instant it names now, then look again: while paused it keeps moving.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    /// When the current pause began, while paused.
    since: Option<Instant>,
    /// The length of every pause that ended.
    ended: Duration,
}

impl State {
    fn total_at(&self, now: Instant) -> Duration {
        self.ended
            + self
                .since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// Whether the guest is paused, and for how long it has been in all.
#[derive(Debug, Default)]
pub(crate) struct PauseClock {
    state: Mutex<State>,
}

impl PauseClock {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.lock().since.is_some()
    }

    /// Starts a pause at `now`; `false` if one is under way.
    pub(crate) fn pause_at(&self, now: Instant) -> bool {
        let mut s = self.lock();
        if s.since.is_some() {
            return false;
        }
        s.since = Some(now);
        true
    }

    /// Ends the pause at `now`; `false` if there was none.
    pub(crate) fn resume_at(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match s.since.take() {
            Some(since) => {
                s.ended += now.saturating_duration_since(since);
                true
            }
            None => false,
        }
    }

    /// All paused time up to `now`, the current pause included.
    pub(crate) fn total_at(&self, now: Instant) -> Duration {
        self.lock().total_at(now)
    }

    /// A deadline `limit` of running time from now.
    pub(crate) fn deadline_in(&self, limit: Duration) -> Deadline {
        self.deadline_at(Instant::now() + limit)
    }

    /// The deadline `at`, counting from now on only running time.
    pub(crate) fn deadline_at(&self, at: Instant) -> Deadline {
        Deadline {
            at,
            paused_then: self.total_at(Instant::now()),
        }
    }
}

/// An instant that every pause after its making moves later.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Instant,
    paused_then: Duration,
}

impl Deadline {
    /// The instant it names at `now`.
    pub(crate) fn at(&self, clock: &PauseClock, now: Instant) -> Instant {
        self.at + clock.total_at(now).saturating_sub(self.paused_then)
    }

    /// The instant it names now.
    pub(crate) fn now(&self, clock: &PauseClock) -> Instant {
        self.at(clock, Instant::now())
    }

    /// Whether it has passed at `now` (never while paused).
    pub(crate) fn passed_at(&self, clock: &PauseClock, now: Instant) -> bool {
        !clock.is_paused() && now >= self.at(clock, now)
    }

    /// Whether it has passed (never while paused).
    pub(crate) fn passed(&self, clock: &PauseClock) -> bool {
        self.passed_at(clock, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn pauses_move_deadlines_by_their_length() {
        let clock = PauseClock::default();
        let t0 = Instant::now();
        let d = Deadline {
            at: t0 + 3 * S,
            paused_then: clock.total_at(t0),
        };
        assert!(clock.pause_at(t0 + S));
        assert!(!clock.pause_at(t0 + S), "a second pause is no new pause");
        // Paused: it never passes, and keeps moving.
        assert!(!d.passed_at(&clock, t0 + 10 * S));
        assert_eq!(d.at(&clock, t0 + 10 * S), t0 + 12 * S);
        assert!(clock.resume_at(t0 + 5 * S));
        assert!(!clock.resume_at(t0 + 6 * S));
        assert_eq!(clock.total_at(t0 + 9 * S), 4 * S);
        assert_eq!(d.at(&clock, t0 + 6 * S), t0 + 7 * S);
        assert!(!d.passed_at(&clock, t0 + 6 * S));
        assert!(d.passed_at(&clock, t0 + 7 * S));
    }

    #[test]
    fn pauses_before_a_deadline_was_set_do_not_move_it() {
        let clock = PauseClock::default();
        let t0 = Instant::now();
        clock.pause_at(t0);
        clock.resume_at(t0 + 2 * S);
        let d = Deadline {
            at: t0 + 3 * S,
            paused_then: clock.total_at(t0 + 2 * S),
        };
        assert_eq!(d.at(&clock, t0 + 2 * S), t0 + 3 * S);
        assert!(d.passed_at(&clock, t0 + 3 * S));
    }
}
