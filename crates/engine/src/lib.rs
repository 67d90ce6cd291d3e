//! The VM engine: everything crumblecracker knows about QEMU.
//!
//! The boundary the core sees is [`Engine`]: an engine-neutral [`GuestSpec`]
//! (root layers, writable layer size, shares, network policy, resources,
//! warm-start wish) in; a [`Machine`] handle, the agent's channel and the
//! [`StartKind`](template::StartKind) out, with the [`GuestLayout`] (disk
//! serials, share tags, network addresses) the core passes to the agent.
//! [`Qemu`] is the one engine here; the core's tests add one that serves
//! the agent in-process.
//!
//! Behind it, this crate owns starting, supervising and ending one guest:
//! choosing the accelerator, finding the kernel and agent, building the
//! initramfs, the writable disk and the QEMU command line, the QMP control
//! connection, the serial console log and the per-instance runtime
//! directory. It never speaks the agent protocol; nothing above it may
//! depend on QEMU.
//!
//! It also owns warm start ([`template`]): saving a booted guest once per
//! configuration and restoring later VMs from it, with a caller-supplied
//! step (the core's `Prepare`) as the only guest conversation it needs,
//! and parking ([`Machine::park`], [`Engine::restore`]): a running guest
//! saved to a directory and started again from it, tied to the QEMU,
//! kernel and initramfs that made it (and to its template, whose memory a
//! warm guest's park only adds its own pages to); a restored guest's
//! writable disk is a reflink or qcow2 overlay of the park's.
//!
//! Ownership: every QEMU process is spawned by its own supervisor thread,
//! which waits for it and is joined when the [`Vm`] is dropped; QEMU gets
//! `PR_SET_PDEATHSIG` so it dies with the host process even on `SIGKILL`.

mod accel;
mod bare;
pub mod cache;
mod clock;
mod cmdline;
pub mod confine;
mod console;
mod engine;
mod error;
pub mod files;
mod hostfacts;
pub mod initramfs;
pub mod migstream;
mod net;
mod park;
pub mod paths;
mod qmp;
mod rundir;
pub mod template;
mod upper;
mod vm;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use bare::{BareSpec, BareVm};
pub use cmdline::{fd_path, qemu_args, Wiring, KERNEL_PARAMS};
pub use confine::{ConfineMode, Confinement};
pub use engine::{
    AgentLink, DeathHandler, Engine, GuestLayout, GuestSpec, Hooks, Machine, Qemu, ShareSpec,
    Started,
};
pub use error::Error;
pub use net::{GuestNetwork, GUEST_NETWORK};
pub use qmp::Event;
pub use rundir::RunDir;
pub use vm::{qemu_version, Disk, MemoryFile, Share, Vm, VmSpec, CONSOLE_LOG_MAX};
