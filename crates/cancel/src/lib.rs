//! Cancel tokens that wake waiters at once.
//!
//! A [`CancelToken`] is set once and stays set. Code that blocks on
//! something else (a condition variable, a socket, a future) does not poll
//! it: it registers a wake-up with [`CancelToken::on_cancel`], which runs
//! the moment the token is cancelled (or at once if it already is), and
//! keeps the returned [`Registration`] for as long as it waits; dropping
//! the registration removes the wake-up.
//!
//! [`CancelToken::child`] makes a token that is cancelled with its parent
//! but can also be cancelled alone; dropping the child unlinks it.
//!
//! ```
//! use std::sync::{Arc, Condvar, Mutex};
//! use cc_cancel::CancelToken;
//!
//! let token = CancelToken::new();
//! let state = Arc::new((Mutex::new(false), Condvar::new()));
//! let wake = state.clone();
//! // Taking the lock before notifying means a waiter between its check
//! // and its wait cannot miss the wake-up.
//! let _registration = token.on_cancel(move || {
//!     let _held = wake.0.lock().unwrap();
//!     wake.1.notify_all();
//! });
//! let t = token.clone();
//! std::thread::spawn(move || t.cancel());
//! let (lock, ready) = &*state;
//! let mut done = lock.lock().unwrap();
//! while !*done && !token.is_cancelled() {
//!     done = ready.wait(done).unwrap();
//! }
//! assert!(token.is_cancelled());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Wakers {
    next: u64,
    callbacks: BTreeMap<u64, Callback>,
}

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    wakers: Mutex<Wakers>,
    /// This token's wake-up in its parent's list; dropping the last clone
    /// of a child drops it, which unlinks the child.
    parent: Mutex<Option<Registration>>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Wakers> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cancel(&self) {
        let callbacks = {
            let mut w = self.lock();
            // Set under the lock: a registration either sees the flag or
            // is in the list taken here, never neither.
            if self.cancelled.swap(true, Ordering::SeqCst) {
                return;
            }
            std::mem::take(&mut w.callbacks)
        };
        // Outside the lock: a callback may cancel, register or drop
        // registrations of this token.
        for (_, callback) in callbacks {
            callback();
        }
        // A cancelled token needs its parent no more.
        drop(self.parent.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// A cancellation flag shared by its clones: [`cancel`](Self::cancel) from
/// any thread (or from inside a callback) stops every call that was given
/// the token. It cannot be reset.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels the token and its children, running every registered
    /// wake-up once, on this thread. Cancelling again does nothing.
    pub fn cancel(&self) {
        self.inner.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// A new token cancelled when this one is (at once if it already is);
    /// cancelling the child leaves this one alone. Dropping every clone of
    /// the child unlinks it from this token.
    pub fn child(&self) -> CancelToken {
        let child = CancelToken::new();
        let weak = Arc::downgrade(&child.inner);
        let link = self.on_cancel(move || {
            if let Some(child) = weak.upgrade() {
                child.cancel();
            }
        });
        *child.inner.parent.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        child
    }

    /// Runs `wake` once when the token is cancelled, on the cancelling
    /// thread; at once, on this thread, if it already is. The wake-up is
    /// removed when the returned [`Registration`] is dropped. `wake` should
    /// only wake a waiter (notify a condition variable, shut down a socket,
    /// write to a pipe): it must not block.
    pub fn on_cancel(&self, wake: impl FnOnce() + Send + 'static) -> Registration {
        let mut w = self.inner.lock();
        if self.is_cancelled() {
            drop(w);
            wake();
            return Registration { slot: None };
        }
        let id = w.next;
        w.next += 1;
        w.callbacks.insert(id, Box::new(wake));
        Registration {
            slot: Some((self.inner.clone(), id)),
        }
    }

    /// Wake-ups registered and not yet run or removed.
    pub fn registrations(&self) -> usize {
        self.inner.lock().callbacks.len()
    }
}

/// A wake-up registered with [`CancelToken::on_cancel`]; dropping it
/// removes the wake-up if it has not run.
#[must_use = "dropping the registration removes the wake-up at once"]
pub struct Registration {
    slot: Option<(Arc<Inner>, u64)>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("armed", &self.slot.is_some())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((inner, id)) = self.slot.take() {
            // Removed outside the lock: a callback's drop may register.
            let removed = inner.lock().callbacks.remove(&id);
            drop(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{mpsc, Condvar};
    use std::thread;
    use std::time::{Duration, Instant};

    /// Blocks on a condition variable until `token` is cancelled, woken
    /// only by the registration (no timeout).
    fn wait_for(token: &CancelToken) {
        let state = Arc::new((Mutex::new(()), Condvar::new()));
        let wake = state.clone();
        let _registration = token.on_cancel(move || {
            let _held = wake.0.lock().unwrap();
            wake.1.notify_all();
        });
        let mut held = state.0.lock().unwrap();
        while !token.is_cancelled() {
            held = state.1.wait(held).unwrap();
        }
    }

    #[test]
    fn cancel_wakes_a_blocked_waiter_promptly() {
        let token = CancelToken::new();
        let (tx, rx) = mpsc::channel();
        let waiter = token.clone();
        thread::spawn(move || {
            wait_for(&waiter);
            tx.send(Instant::now()).unwrap();
        });
        thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "woke before the cancel");
        let cancelled = Instant::now();
        token.cancel();
        let woke = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("the waiter never woke");
        assert!(woke >= cancelled);
        assert_eq!(token.registrations(), 0);
    }

    #[test]
    fn many_waiters_all_wake() {
        let token = CancelToken::new();
        let (tx, rx) = mpsc::channel();
        for _ in 0..32 {
            let (waiter, tx) = (token.clone(), tx.clone());
            thread::spawn(move || {
                wait_for(&waiter);
                tx.send(()).unwrap();
            });
        }
        token.cancel();
        for _ in 0..32 {
            rx.recv_timeout(Duration::from_secs(2))
                .expect("a waiter never woke");
        }
    }

    #[test]
    fn registering_after_cancel_runs_at_once() {
        let token = CancelToken::new();
        token.cancel();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let registration = token.on_cancel(move || r.store(true, Ordering::SeqCst));
        assert!(ran.load(Ordering::SeqCst));
        drop(registration);
        assert_eq!(token.registrations(), 0);
    }

    #[test]
    fn wake_ups_run_once_and_dropped_ones_never() {
        let token = CancelToken::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (a, b) = (runs.clone(), runs.clone());
        let kept = token.on_cancel(move || {
            a.fetch_add(1, Ordering::SeqCst);
        });
        let dropped = token.on_cancel(move || {
            b.fetch_add(100, Ordering::SeqCst);
        });
        assert_eq!(token.registrations(), 2);
        drop(dropped);
        assert_eq!(token.registrations(), 1);
        token.cancel();
        token.cancel();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        drop(kept);
        assert_eq!(token.registrations(), 0);
    }

    #[test]
    fn registrations_do_not_leak() {
        let token = CancelToken::new();
        for _ in 0..1000 {
            let _r = token.on_cancel(|| {});
        }
        assert_eq!(token.registrations(), 0);
    }

    #[test]
    fn a_parent_cancels_its_children_not_the_other_way() {
        let parent = CancelToken::new();
        let a = parent.child();
        let b = parent.child();
        let grandchild = a.child();
        b.cancel();
        assert!(b.is_cancelled());
        assert!(!parent.is_cancelled() && !a.is_cancelled());
        parent.cancel();
        assert!(a.is_cancelled() && grandchild.is_cancelled());
    }

    #[test]
    fn a_child_of_a_cancelled_token_is_born_cancelled() {
        let parent = CancelToken::new();
        parent.cancel();
        assert!(parent.child().is_cancelled());
    }

    #[test]
    fn dropping_a_child_unlinks_it() {
        let parent = CancelToken::new();
        let child = parent.child();
        let clone = child.clone();
        assert_eq!(parent.registrations(), 1);
        drop(child);
        assert_eq!(parent.registrations(), 1, "a clone still lives");
        drop(clone);
        assert_eq!(parent.registrations(), 0);
        // A cancelled child lets go of its parent too.
        let child = parent.child();
        child.cancel();
        assert_eq!(parent.registrations(), 0);
        drop(child);
    }

    #[test]
    fn a_waiter_on_a_child_wakes_when_the_parent_is_cancelled() {
        let parent = CancelToken::new();
        let child = parent.child();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            wait_for(&child);
            tx.send(()).unwrap();
        });
        thread::sleep(Duration::from_millis(20));
        parent.cancel();
        rx.recv_timeout(Duration::from_secs(2))
            .expect("the child's waiter never woke");
    }

    #[test]
    fn callbacks_may_use_the_token_reentrantly() {
        let token = CancelToken::new();
        let t = token.clone();
        let _r = token.on_cancel(move || {
            t.cancel();
            let _again = t.on_cancel(|| {});
        });
        token.cancel();
        assert!(token.is_cancelled());
        assert_eq!(token.registrations(), 0);
    }
}
