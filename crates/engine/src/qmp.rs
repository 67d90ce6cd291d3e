//! A minimal QMP client: one command at a time, events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::Error;

#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    negotiated: bool,
}

impl Qmp {
    pub(crate) fn new(stream: UnixStream) -> Result<Qmp, Error> {
        let writer = stream.try_clone().map_err(|e| Error::Qmp(e.to_string()))?;
        Ok(Qmp {
            reader: BufReader::new(stream),
            writer,
            negotiated: false,
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
