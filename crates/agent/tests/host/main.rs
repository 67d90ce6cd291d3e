//! The agent library in host mode, driven over a socket pair with
//! `cc_protocol` frames as the host core drives it: no VM, no root (tests
//! that need root say so and are skipped without it).

mod common;
mod connection;
mod exec;
mod files;
mod forward;
mod quiesce;
mod snapshot;
mod streams;
