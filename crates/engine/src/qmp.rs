//! A minimal QMP client: one command at a time; events are kept for
//! [`Qmp::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::Error;

#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    negotiated: bool,
    /// Events read while waiting for replies, oldest first (bounded).
    events: VecDeque<Value>,
}

/// Events kept at most; older ones are dropped.
const MAX_EVENTS: usize = 64;

impl Qmp {
    pub(crate) fn new(stream: UnixStream) -> Result<Qmp, Error> {
        let writer = stream.try_clone().map_err(|e| Error::Qmp(e.to_string()))?;
        Ok(Qmp {
            reader: BufReader::new(stream),
            writer,
            negotiated: false,
            events: VecDeque::new(),
        })
    }

    /// Runs `command` and returns its `return` value. The greeting and
    /// capability negotiation happen on first use, so a VM that is never
    /// controlled pays nothing for QMP at boot.
    pub(crate) fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| Error::Qmp(e.to_string()))?;
        if !self.negotiated {
            let greeting = self.next_message()?;
            if greeting.get("QMP").is_none() {
                return Err(Error::Qmp(format!("unexpected greeting {greeting}")));
            }
            self.negotiated = true;
            self.execute("qmp_capabilities", None, timeout)?;
        }
        let mut request = json!({ "execute": command });
        if let Some(args) = args {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::Qmp(format!("{command}: {e}")))?;
        loop {
            let msg = self.next_message()?;
            if msg.get("event").is_some() {
                self.keep_event(msg);
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(Error::Qmp(format!(
                    "{command}: {}",
                    err["desc"].as_str().unwrap_or("failed")
                )));
            }
        }
    }

    fn keep_event(&mut self, event: Value) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits up to `timeout` for an event named `name` whose `data` passes
    /// `matches`, consuming it and every event before it. Only events that
    /// arrive after the connection was negotiated (after a first
    /// [`execute`](Self::execute)) are seen.
    pub(crate) fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let deadline = Instant::now() + timeout;
        let is_it = |e: &Value| e["event"] == name && matches(&e["data"]);
        loop {
            while let Some(event) = self.events.pop_front() {
                if is_it(&event) {
                    return Ok(event);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Qmp(format!("no {name} event within {timeout:?}")));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| Error::Qmp(e.to_string()))?;
            let msg = self.next_message()?;
            if msg.get("event").is_some() {
                self.keep_event(msg);
            }
        }
    }

    fn next_message(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Error::Qmp("QEMU closed the QMP connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| Error::Qmp(format!("bad reply {line:?}: {e}"))),
            Err(e) => Err(Error::Qmp(e.to_string())),
        }
    }
}
