//! cc-agent: PID 1 (`/init`) in every instance's VM.
//!
//! The protocol server is the `cc_agent` library; this binary does what
//! only init does (`cc_agent::pid1`), and serves the host for as long as
//! the machine runs. As PID 1 it must never exit: a lost connection is
//! reopened, and a power-off (the host's `Shutdown`, or busybox `poweroff`
//! inside the guest) ends the VM by rebooting it.

use cc_agent::pid1;

fn main() {
    pid1::init();
    let agent = pid1::start();
    loop {
        agent.serve(pid1::open_port());
    }
}
