//! QMP, QEMU's control connection: one command at a time, events kept.
//!
//! A reader thread owns the receiving side from QEMU's first instant: it
//! reads the greeting, negotiates capabilities (so events flow at once),
//! hands each command its reply and records events, which callers wait on
//! ([`Qmp::wait_event`]) instead of polling, and which an optional handler
//! sees as they come (the core learns of a guest that shut down or
//! panicked this way). The thread ends when QEMU closes the connection.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Error;

/// Events kept for [`Qmp::wait_event`]; older ones are dropped.
const KEPT_EVENTS: usize = 64;

/// A QMP event: its name and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

/// Called on the reader thread for every event (outside any lock, so it
/// may use the connection itself).
pub(crate) type EventHandler = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Default)]
struct State {
    negotiated: bool,
    /// The reply to the command in flight.
    reply: Option<Value>,
    /// Recent events with their sequence numbers.
    events: VecDeque<(u64, Event)>,
    next_seq: u64,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    handler: Option<EventHandler>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

impl Qmp {
    pub(crate) fn new(stream: UnixStream) -> Result<Qmp, Error> {
        let reader_stream = stream.try_clone().map_err(|e| Error::Qmp(e.to_string()))?;
        let negotiate = stream.try_clone().map_err(|e| Error::Qmp(e.to_string()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("cc-qmp".into())
            .spawn(move || read_loop(BufReader::new(reader_stream), negotiate, &s))
            .map_err(|e| Error::Qmp(format!("spawn QMP reader: {e}")))?;
        Ok(Qmp {
            writer: Mutex::new(stream),
            shared,
            reader: Some(reader),
        })
    }

    /// Runs `command` and returns its `return` value.
    pub(crate) fn execute(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.execute_with_fd(command, args, None, timeout)
    }

    /// Runs `command`, passing `fd` along with it (SCM_RIGHTS), as
    /// `getfd` and `add-fd` need.
    pub(crate) fn execute_with_fd(
        &self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let deadline = Instant::now() + timeout;
        // One command at a time: the writer lock is held until the reply.
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut state = self.shared.lock();
            while !state.negotiated && state.closed.is_none() {
                state = self.wait(state, deadline, command)?;
            }
            if let Some(why) = &state.closed {
                return Err(Error::Qmp(format!("{command}: {why}")));
            }
            state.reply = None;
        }
        let mut request = json!({ "execute": command });
        if let Some(args) = args {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        send(&writer, line.as_bytes(), fd).map_err(|e| Error::Qmp(format!("{command}: {e}")))?;
        let mut state = self.shared.lock();
        loop {
            if let Some(reply) = state.reply.take() {
                return parse_reply(command, reply);
            }
            if let Some(why) = &state.closed {
                return Err(Error::Qmp(format!("{command}: {why}")));
            }
            state = self.wait(state, deadline, command)?;
        }
    }

    fn wait<'a>(
        &'a self,
        state: MutexGuard<'a, State>,
        deadline: Instant,
        what: &str,
    ) -> Result<MutexGuard<'a, State>, Error> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Qmp(format!("{what}: no answer from QEMU in time")));
        }
        Ok(self
            .shared
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(|e| e.into_inner())
            .0)
    }

    /// The sequence number the next event will get: pass it to
    /// [`Qmp::wait_event`] to wait only for events from now on.
    pub(crate) fn event_mark(&self) -> u64 {
        self.shared.lock().next_seq
    }

    /// Waits for an event numbered `since` or later for which `matches`
    /// holds, and returns it.
    pub(crate) fn wait_event(
        &self,
        since: u64,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Event) -> bool,
    ) -> Result<Event, Error> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some((_, e)) = state
                .events
                .iter()
                .find(|(seq, e)| *seq >= since && matches(e))
            {
                return Ok(e.clone());
            }
            if let Some(why) = &state.closed {
                return Err(Error::Qmp(format!("waiting for {what}: {why}")));
            }
            state = self.wait(state, deadline, &format!("waiting for {what}"))?;
        }
    }

    /// Calls `handler` for every event from now on, and at once for the
    /// events already received.
    pub(crate) fn set_handler(&self, handler: EventHandler) {
        let seen: Vec<Event> = {
            let mut state = self.shared.lock();
            state.handler = Some(handler.clone());
            state.events.iter().map(|(_, e)| e.clone()).collect()
        };
        for e in &seen {
            handler(e);
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn parse_reply(command: &str, reply: Value) -> Result<Value, Error> {
    if let Some(ret) = reply.get("return") {
        return Ok(ret.clone());
    }
    Err(Error::Qmp(format!(
        "{command}: {}",
        reply["error"]["desc"].as_str().unwrap_or("failed")
    )))
}

/// Writes `bytes`, with `fd` attached to the first of them.
fn send(stream: &UnixStream, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return (&*stream).write_all(bytes);
    };
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !ancillary.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "descriptor does not fit the control message",
        ));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut ancillary,
        rustix::net::SendFlags::NOSIGNAL,
    )?;
    (&*stream).write_all(&bytes[sent..])
}

fn read_loop(mut reader: BufReader<UnixStream>, negotiate: UnixStream, shared: &Shared) {
    let why = loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break "QEMU closed the QMP connection".to_string(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => break format!("bad message {line:?}: {e}"),
        };
        let mut state = shared.lock();
        if msg.get("QMP").is_some() {
            drop(state);
            let hello = b"{\"execute\":\"qmp_capabilities\"}\n";
            if let Err(e) = (&negotiate).write_all(hello) {
                break e.to_string();
            }
            continue;
        }
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let event = Event {
                name: name.to_string(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
            };
            let seq = state.next_seq;
            state.next_seq += 1;
            if state.events.len() == KEPT_EVENTS {
                state.events.pop_front();
            }
            state.events.push_back((seq, event.clone()));
            let handler = state.handler.clone();
            drop(state);
            shared.changed.notify_all();
            if let Some(handler) = handler {
                handler(&event);
            }
            continue;
        } else if !state.negotiated {
            state.negotiated = msg.get("return").is_some();
            if !state.negotiated {
                break format!("capabilities refused: {msg}");
            }
        } else {
            state.reply = Some(msg);
        }
        drop(state);
        shared.changed.notify_all();
    };
    shared.lock().closed = Some(why);
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    //! Against a scripted peer on a socketpair (no QEMU).
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    fn peer() -> (Qmp, BufReader<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let qmp = Qmp::new(a).unwrap();
        let mut w = b.try_clone().unwrap();
        w.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
        let mut r = BufReader::new(b);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("qmp_capabilities"), "{line}");
        w.write_all(b"{\"return\": {}}\n").unwrap();
        (qmp, r, w)
    }

    #[test]
    fn replies_go_to_commands_and_events_are_kept() {
        let (qmp, mut r, mut w) = peer();
        let mark = qmp.event_mark();
        let t = std::thread::spawn(move || {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"), "{line}");
            // An event arrives before the reply.
            w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                .unwrap();
            w.write_all(b"{\"return\": {\"status\": \"paused\"}}\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"error\": {\"desc\": \"no such thing\"}}\n")
                .unwrap();
            (r, w)
        });
        let status = qmp
            .execute("query-status", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(status["status"], "paused");
        let err = qmp
            .execute("bogus", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(err.to_string().contains("bogus: no such thing"), "{err}");
        let stop = qmp
            .wait_event(mark, "STOP", Duration::from_secs(5), |e| e.name == "STOP")
            .unwrap();
        assert_eq!(stop.name, "STOP");
        let peer = t.join().unwrap();
        // Events already seen reach a handler set later; then QEMU leaves.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        qmp.set_handler(Arc::new(move |e| s.lock().unwrap().push(e.name.clone())));
        assert_eq!(*seen.lock().unwrap(), vec!["STOP".to_string()]);
        drop(peer);
        let err = qmp
            .wait_event(qmp.event_mark(), "SHUTDOWN", Duration::from_secs(5), |e| {
                e.name == "SHUTDOWN"
            })
            .unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
        let err = qmp
            .execute("cont", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(err.to_string().contains("closed"), "{err}");
    }

    #[test]
    fn a_silent_peer_times_out_and_descriptors_travel() {
        let (qmp, r, _w) = peer();
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let err = qmp
            .execute_with_fd(
                "getfd",
                Some(json!({"fdname": "x"})),
                Some(file.as_fd()),
                Duration::from_millis(200),
            )
            .unwrap_err();
        assert!(err.to_string().contains("in time"), "{err}");
        // The descriptor arrived with the command.
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
        let mut buf = [0u8; 256];
        let sock = r.into_inner();
        let got = rustix::net::recvmsg(
            &sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut anc,
            rustix::net::RecvFlags::empty(),
        )
        .unwrap();
        assert!(String::from_utf8_lossy(&buf[..got.bytes]).contains("getfd"));
        let fds: Vec<_> = anc
            .drain()
            .filter_map(|m| match m {
                rustix::net::RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(fds.len(), 1);
        let mut text = String::new();
        std::fs::File::from(fds.into_iter().next().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.contains("Pid:"));
    }
}
