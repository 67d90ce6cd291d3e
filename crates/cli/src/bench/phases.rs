//! `--phases`: where a benchmark's time goes. The host's phases are the
//! core library's `tracing` spans, timed by a subscriber layer that lives
//! only while a benchmark runs; the guest's come from the agent
//! ([`cc::Instance::agent_trace`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::{ms, Samples, Table};

/// Durations per phase name, in the order each was first recorded (a
/// span when it closed: an inner one before the one around it).
#[derive(Debug, Default, Clone)]
pub(super) struct Phases {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Debug, Default)]
struct Recorded {
    order: Vec<String>,
    samples: HashMap<String, Samples>,
}

impl Phases {
    pub(super) fn add(&self, name: &str, d: Duration) {
        let mut r = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !r.samples.contains_key(name) {
            r.order.push(name.to_owned());
        }
        r.samples.entry(name.to_owned()).or_default().0.push(d);
    }

    /// Runs `f` with the core library's spans on this thread timed.
    pub(super) fn record_host<T>(&self, f: impl FnOnce() -> T) -> T {
        let subscriber = tracing_subscriber::registry().with(Timer {
            phases: self.clone(),
        });
        tracing::subscriber::with_default(subscriber, f)
    }

    /// Prints each phase's median and count, in milliseconds.
    pub(super) fn print(&self, title: &str) {
        let r = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let table = Table::new(52, 9, 3);
        println!();
        table.header(title, "ms");
        for name in &r.order {
            let samples = &r.samples[name];
            table.row(
                &format!("{name} (×{})", samples.0.len()),
                &[ms(samples.median())],
            );
        }
    }
}

/// When a span was created, kept in the span's extensions.
struct Began(Instant);

struct Timer {
    phases: Phases,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Timer {
    fn on_new_span(&self, _: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Began(Instant::now()));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            if let Some(Began(t)) = span.extensions().get::<Began>() {
                self.phases.add(span.name(), t.elapsed());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_closed_while_recording_become_phases_in_closing_order() {
        let phases = Phases::default();
        phases.record_host(|| {
            for _ in 0..3 {
                let _a = tracing::debug_span!("first").entered();
                let _b = tracing::debug_span!("second").entered();
            }
        });
        // Outside the recording: not counted.
        drop(tracing::debug_span!("first").entered());
        let r = phases.inner.lock().unwrap();
        assert_eq!(r.order, ["second", "first"], "inner spans close first");
        assert_eq!(r.samples["first"].0.len(), 3);
        assert_eq!(r.samples["second"].0.len(), 3);
    }
}
