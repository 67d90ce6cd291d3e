//! The VM engine: everything crumblecracker knows about QEMU.
//!
//! This crate owns starting, supervising and ending one guest: choosing the
//! accelerator, finding the kernel and agent, building the initramfs and the
//! QEMU command line, the QMP control connection, the serial console log and
//! the per-instance runtime directory. It hands the core one connected byte
//! channel to the guest agent and nothing else: it never speaks the agent
//! protocol, and nothing above it may depend on QEMU. A native engine may
//! replace this one behind the same [`Vm`]/[`VmSpec`] boundary.
//!
//! It also owns warm start ([`template`]): saving a booted guest once per
//! configuration and restoring later VMs from it, with a caller-supplied
//! step (the core's `Prepare`) as the only guest conversation it needs.
//!
//! Ownership: every QEMU process is spawned by its own supervisor thread,
//! which waits for it and is joined when the [`Vm`] is dropped; QEMU gets
//! `PR_SET_PDEATHSIG` so it dies with the host process even on `SIGKILL`.

mod accel;
mod bare;
mod cmdline;
pub mod confine;
mod console;
mod error;
pub mod files;
pub mod initramfs;
mod net;
pub mod paths;
mod qmp;
mod rundir;
pub mod template;
mod vm;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use bare::{BareSpec, BareVm};
pub use cmdline::{fd_path, qemu_args, Wiring, KERNEL_PARAMS};
pub use confine::{ConfineMode, Confinement};
pub use error::Error;
pub use net::{GuestNetwork, GUEST_NETWORK};
pub use qmp::Event;
pub use rundir::RunDir;
pub use vm::{qemu_version, Disk, MemoryFile, Share, Vm, VmSpec, CONSOLE_LOG_MAX};
