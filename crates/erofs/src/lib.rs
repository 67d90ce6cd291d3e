//! Builds erofs images (the read-only root filesystem format the guest
//! kernel mounts) from an in-memory [`Tree`], as an unprivileged process:
//! ownership, modes, device nodes and xattrs come from the tree, never from
//! the host filesystem. [`Reader`] reads such an image back as a tree, so
//! its files can be copied into another image or an archive.
//!
//! This crate owns the erofs on-disk format and nothing else: it knows
//! nothing of OCI, tar, layers or host directories (the image store builds
//! the tree), and does no I/O beyond the writer or reader it is given.
//!
//! # Layout
//!
//! Blocks are 4096 bytes; the format is what Linux 6.1 reads, with no
//! optional features (no compression, tail packing, shared xattrs or
//! superblock checksum):
//!
//! - block 0: the superblock at byte 1024, zeros elsewhere;
//! - from block 1: regular file contents, in [`Builder::add_data`] order,
//!   each starting at a fresh block (uncompressed, `FLAT_PLAIN`);
//! - then, written by [`Builder::finish`]: each directory's entries (sorted
//!   bytewise across all its blocks, `.` and `..` included) and each symlink
//!   target, again from fresh blocks;
//! - last, the meta area: one 64-byte extended inode per reachable node with
//!   its xattrs inline, in breadth-first order with the root first (its nid
//!   must fit the superblock's 16 bits). Nid 0 is left unused because the
//!   kernel reports the nid as the inode number. No inode with its xattrs
//!   crosses a block boundary unless it is larger than a block, in which
//!   case it starts one.

mod format;
mod reader;
mod tree;
mod writer;

pub use reader::{ReadError, Reader};
pub use tree::{check_name, DataRef, Kind, Metadata, Node, NodeId, Tree, TreeError};
pub use writer::{Builder, Error, Summary};
