//! The threads working for one connection, counted, so that a connection
//! served in host mode ends only once none of them is left behind.
//!
//! Threads are reused: one that finished its task waits a while for the
//! next instead of ending, so a command or a file request does not pay for
//! a new thread (a quarter of a millisecond under emulation). At most
//! [`MAX_IDLE`] wait; they end after [`IDLE_TIMEOUT`], or when the
//! connection ends ([`Tasks::wait_idle`]).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Idle threads kept for the next task.
const MAX_IDLE: usize = 4;

/// How long an idle thread waits for a task before it ends.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    /// Tasks handed out and not yet finished.
    live: usize,
    /// Threads, busy or idle.
    threads: usize,
    /// Threads waiting for a task and not yet promised one.
    idle: usize,
    /// Tasks promised to idle threads, not yet taken.
    queue: VecDeque<Job>,
    /// The connection ended: idle threads end, no thread waits again.
    retired: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("live", &self.live)
            .field("threads", &self.threads)
            .field("idle", &self.idle)
            .field("queued", &self.queue.len())
            .field("retired", &self.retired)
            .finish()
    }
}

#[derive(Debug, Default)]
pub struct Tasks {
    state: Mutex<State>,
    /// Signalled when `live` or `threads` reaches zero.
    done: Condvar,
    /// Signalled when a task is queued or the connection ends.
    work: Condvar,
}

/// Held while a task runs; counts it out when dropped, even by a panic.
struct Running<'a>(&'a Tasks);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.live -= 1;
        if state.live == 0 {
            self.0.done.notify_all();
        }
    }
}

/// Held by a thread; counts it out when it ends, even by a panic.
struct Thread(Arc<Tasks>);

impl Drop for Thread {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.threads -= 1;
        if state.threads == 0 {
            self.0.done.notify_all();
        }
    }
}

impl Tasks {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on an idle thread of this connection's, else on a new
    /// thread named `name`. If no thread can start, `f` is dropped unrun.
    pub fn spawn(
        self: &Arc<Self>,
        name: String,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        let mut state = self.lock();
        state.live += 1;
        if state.idle > 0 {
            state.idle -= 1;
            state.queue.push_back(Box::new(f));
            self.work.notify_one();
            return Ok(());
        }
        state.threads += 1;
        drop(state);
        let thread = Thread(self.clone());
        let started = thread::Builder::new().name(name).spawn(move || {
            let tasks = thread.0.clone();
            let mut job: Job = Box::new(f);
            loop {
                let running = Running(&tasks);
                job();
                drop(running);
                match tasks.next_job() {
                    Some(next) => job = next,
                    None => return,
                }
            }
        });
        if started.is_err() {
            // The closure, with `f` and the thread's count, was dropped.
            let mut state = self.lock();
            state.live -= 1;
            if state.live == 0 {
                self.done.notify_all();
            }
        }
        started.map(drop)
    }

    /// Waits, idle, for the next task; `None` when this thread should end.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        if state.retired || state.idle >= MAX_IDLE {
            return None;
        }
        state.idle += 1;
        let deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            // A queued task was promised to one of the idle threads, which
            // took it off `idle`: any waiting thread may take it.
            if let Some(job) = state.queue.pop_front() {
                return Some(job);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.retired || left.is_zero() {
                state.idle -= 1;
                return None;
            }
            state = self
                .work
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many tasks are still running.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Ends the idle threads and waits up to `timeout` for every task and
    /// thread to end; whether they all did. For the end of a connection:
    /// threads that finish a task afterwards end too.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.retired = true;
        self.work.notify_all();
        while state.live > 0 || state.threads > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .done
                .wait_timeout(state, left)
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

    #[test]
    fn finished_threads_take_the_next_task_and_end_with_the_connection() {
        let tasks = Arc::new(Tasks::default());
        let (tx, rx) = mpsc::channel();
        for _ in 0..20 {
            let tx = tx.clone();
            tasks
                .spawn("task".into(), move || {
                    tx.send(thread::current().id()).unwrap();
                })
                .unwrap();
            // Let the thread finish and wait for the next task.
            rx.recv().unwrap();
            while tasks.lock().idle == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(tasks.lock().threads, 1, "one thread ran every task");
        assert!(tasks.wait_idle(Duration::from_secs(10)));
        assert_eq!(tasks.lock().threads, 0, "the idle thread ended");
    }

    #[test]
    fn busy_threads_do_not_hold_up_new_tasks() {
        let tasks = Arc::new(Tasks::default());
        let (go, wait) = mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let (done, finished) = mpsc::channel();
        for _ in 0..3 {
            let (wait, done) = (wait.clone(), done.clone());
            tasks
                .spawn("blocked".into(), move || {
                    let _ = wait.lock().unwrap().recv();
                    done.send(()).unwrap();
                })
                .unwrap();
        }
        let (tx, rx) = mpsc::channel();
        tasks
            .spawn("free".into(), move || tx.send(()).unwrap())
            .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        drop(go);
        for _ in 0..3 {
            finished.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert!(tasks.wait_idle(Duration::from_secs(10)));
    }
}
