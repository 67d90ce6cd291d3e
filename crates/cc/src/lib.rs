//! crumblecracker's core API: run container root filesystems in lightweight
//! virtual machines, embedded in your program.
//!
//! This crate owns the user-facing model — [`Instance`], [`Command`],
//! [`Child`] — and how it maps onto the guest agent protocol and the engine.
//! It must not depend on QEMU: everything about the hypervisor goes through
//! the [`engine::Engine`] boundary (QEMU by default, [`Options::engine`]),
//! which hands back a [`engine::Machine`] handle and the agent's channel.
//! The C library and the CLI wrap this crate.
//!
//! ```no_run
//! use cc::{Instance, Options, Source};
//! let inst = Instance::new(&Source::Dir("/path/to/rootfs".into()), Options::default())?;
//! let out = inst.command("echo").arg("hello").output()?;
//! assert_eq!(out.stdout, b"hello\n");
//! inst.close()?;
//! # Ok::<(), cc::Error>(())
//! ```
//!
//! Pause: [`Instance::pause`] stops the guest's CPUs in place and
//! [`Instance::resume`] lets it run on. Meanwhile new requests fail with
//! [`Error::Paused`] and waits keep waiting; paused time counts towards no
//! time limit.
//!
//! Cancellation: a [`CancelToken`] stops a blocking call from any thread
//! at once (the call waits on its real event and the token's wake-up, it
//! never polls), and the call fails with [`Error::Cancelled`] naming the
//! operation (`"wait cancelled"`, code [`ErrorCode::Cancelled`]).
//! [`Instance::wait`] and [`Listener::accept`] take `Option<&CancelToken>`,
//! [`OciClient::pull`] a `&CancelToken`; every other call that can block has
//! a `_cancellable(…, &CancelToken)` twin: [`Instance::new_cancellable`],
//! [`OciClient::load_tar_cancellable`]/[`load_dir_cancellable`](OciClient::load_dir_cancellable),
//! [`Child::wait_cancellable`], [`Cmd::wait_cancellable`],
//! [`Conn::read_cancellable`]/[`read_into_cancellable`](Conn::read_into_cancellable)/[`write_cancellable`](Conn::write_cancellable),
//! [`File::read_some_cancellable`]/[`write_all_bytes_cancellable`](File::write_all_bytes_cancellable),
//! [`Instance::read_file_cancellable`]/[`write_file_cancellable`](Instance::write_file_cancellable).
//! [`CancelToken::child`] links a call's own token to a caller's.
//!
//! Threads: each instance has one reader thread for its agent channel and
//! one liveness thread (the VM's exit, the channel's heartbeat), plus what
//! its engine runs (QEMU's supervisor thread); all end in
//! [`Instance::close`] (or on drop), which also removes the instance's
//! runtime directory. An [`Exposed`] port has an acceptor thread and two
//! copy threads per live connection, joined when it or the instance is
//! closed.

pub mod cache;
mod cancel;
mod channel;
mod cmd_object;
mod conn;
mod error;
mod fs;
mod host;
mod instance;
mod net;
mod oci;
mod park;
mod pause;
mod phases;
mod process;
mod rootfs;
mod snapshot;
pub mod templates;

/// The engine boundary, for running guests on something other than QEMU
/// (a native VMM, or a test double serving the agent in-process).
pub mod engine {
    pub use cc_engine::{
        AgentLink, DeathHandler, Engine, Error, GuestLayout, GuestNetwork, GuestSpec, Hooks,
        Machine, Qemu, ShareSpec, Started,
    };
}

pub use cc_engine::template::StartKind;
pub use cc_engine::{ConfineMode, Confinement};
pub use cc_netpolicy::{NetworkPolicy, PolicyError, Rule, RuleProblem};
pub use cc_protocol::PROTOCOL_VERSION as GUEST_PROTOCOL_VERSION;
#[doc(hidden)]
pub use channel::fuzz_dispatch;
pub use cmd_object::Cmd;
pub use conn::Conn;
pub use error::{Error, ErrorCode, Result};
pub use fs::{
    DirEntry, File, FileInfo, FileReader, Whence, O_APPEND, O_CREATE, O_EXCL, O_RDONLY, O_RDWR,
    O_TRUNC, O_WRONLY,
};
pub use host::{
    host_confinement, host_info, Accelerator, AcceleratorChoice, HostInfo, KernelInfo, QemuInfo,
};
pub use instance::{
    BootTimings, Instance, Mount, Options, Source, DEFAULT_DISK_MB, DEFAULT_MAX_RESULT_BYTES,
};
pub use net::{Exposed, Listener};
pub use oci::*;
pub use park::{Parked, RestoreOptions};
pub use phases::take_host_phases;
pub use process::{
    Child, ChildOutput, ChildStdin, Command, ExitStatus, Output, Signaller, Stdio,
    MAX_TERMINAL_SIZE,
};
pub use snapshot::Snapshot;

/// The README's Rust examples, compiled as doctests so they stay true.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
