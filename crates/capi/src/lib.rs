//! crumblecracker's C library: `libcc.so` with the header `include/cc.h`
//! (generated from this crate by cbindgen and checked in).
//!
//! Every export is a thin layer over the core crate (`cc`): arguments are
//! checked and copied, objects live in a handle table ([`handles`]), and
//! the body runs inside a boundary ([`ffi`]) that catches panics, keeps
//! SIGPIPE from killing the caller, and turns every failure into a stable
//! error code plus an optional caller-owned `cc_error`. The ABI rules are
//! written at the top of the header (`cbindgen.toml`).

#![allow(non_camel_case_types)]

// In the order the header lists their functions.
pub mod alloc;
pub mod cancel;
pub mod cmd;
pub mod error;
pub mod fs;
pub mod instance;
pub mod library;
pub mod net;
pub mod oci;
pub mod snapshot;

pub(crate) mod ffi;
pub(crate) mod handles;
pub(crate) mod objects;

#[cfg(test)]
mod tests;
