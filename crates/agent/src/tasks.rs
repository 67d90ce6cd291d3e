//! The threads working for one connection, counted, so that a connection
//! served in host mode ends only once none of them is left behind.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Tasks {
    live: Mutex<usize>,
    idle: Condvar,
}

/// Held by a running task; counts it out when dropped, even by a panic.
struct Running(Arc<Tasks>);

impl Drop for Running {
    fn drop(&mut self) {
        let mut live = self.0.lock();
        *live -= 1;
        if *live == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl Tasks {
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `f` on a new thread named `name`. If the thread cannot start,
    /// `f` is dropped unrun.
    pub fn spawn(
        self: &Arc<Self>,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        *self.lock() += 1;
        let running = Running(self.clone());
        thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _running = running;
                f();
            })
            .map(drop)
    }

    /// How many tasks are still running.
    pub fn live(&self) -> usize {
        *self.lock()
    }

    /// Waits up to `timeout` for every task to end; whether they all did.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = self.lock();
        while *live > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            live = self
                .idle
                .wait_timeout(live, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn tasks_are_counted_until_they_end_even_by_panicking() {
        let tasks = Arc::new(Tasks::default());
        assert!(tasks.wait_idle(Duration::ZERO));
        let (go, wait) = mpsc::channel::<()>();
        tasks
            .spawn("blocked".into(), move || {
                let _ = wait.recv();
            })
            .unwrap();
        tasks
            .spawn("panics".into(), || panic!("on purpose"))
            .unwrap();
        assert!(!tasks.wait_idle(Duration::from_millis(50)));
        assert!(tasks.live() >= 1);
        drop(go);
        assert!(tasks.wait_idle(Duration::from_secs(10)));
        assert_eq!(tasks.live(), 0);
    }
}
