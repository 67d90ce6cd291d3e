//! The protocol spoken between the host and the guest agent over one
//! virtio-serial port.
//!
//! This crate owns the wire format and the rules both ends follow: the
//! message types ([`Message`]), their framing ([`frame`]), per-stream flow
//! control ([`flow`]) and the multiplexer that routes stream frames,
//! correlates requests and fails everything when the channel dies
//! ([`mux`]). It does no I/O of its own beyond reading and writing frames
//! on a caller's `Read`/`Write`, knows nothing of QEMU, and is used
//! unchanged by the host (`cc`) and the guest (`cc-agent`).
//!
//! # Wire format
//! A frame is a little-endian `u32` payload length followed by the payload,
//! a [postcard](https://docs.rs/postcard) encoding of [`Message`]. Frames
//! larger than [`MAX_FRAME`] are a protocol error: the peer is broken or
//! hostile and the connection is dropped.
//!
//! # Conversation
//! 1. The agent sends [`Message::Hello`] with its [`PROTOCOL_VERSION`]. The
//!    host refuses any other version before sending anything.
//! 2. The host sends [`Request::Setup`]; the agent mounts the root filesystem
//!    and answers [`Response::Ready`].
//! 3. Requests and their responses, stream data and process exits then
//!    interleave freely: many commands and streams share the channel.
//! 4. Before the guest is saved (a branch or a park), the host sends
//!    [`Request::Quiesce`] and then nothing: the agent's answer is its last
//!    frame, so neither direction has a frame in flight while the VM is
//!    saved. The saved guest goes on after [`Request::Unquiesce`]; each
//!    copy restored from the save gets [`Request::Rebirth`] on its new
//!    channel and forgets everything of the old one but its processes.
//!
//! # Streams and back-pressure
//! Byte streams (a process's stdin, stdout, stderr, a forwarded connection)
//! are numbered by whoever opens them;
//! ids below [`GUEST_STREAM_BASE`] are the host's, ids from it up are the
//! guest's. A sender may have at most [`STREAM_WINDOW`] bytes in flight per
//! stream: the receiver returns credit with [`Message::Credit`] as its reader
//! consumes data, so one slow reader never stalls the channel or grows a
//! buffer without bound. Frames for a stream never opened, data past a
//! window and credit not owed are protocol violations: the end that sees
//! one closes the channel.

pub mod flow;
pub mod frame;
mod message;
pub mod mux;

pub use message::*;

/// Version of this protocol. Bumped on any incompatible change; the host
/// refuses an agent that speaks another version.
pub const PROTOCOL_VERSION: u32 = 14;

/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// Largest `Data` payload a sender puts in one frame. Large, because on
/// the guest's emulated CPU every frame has a fixed cost (a header, a
/// wakeup, a file write) that small frames multiply.
pub const DATA_CHUNK: usize = 512 << 10;

/// The fastest one stream moves, with margin: the virtio-serial port under
/// TCG carries 0.5-0.7 GiB/s; KVM is faster but its round trips shorter.
const STREAM_BYTES_PER_SEC: u64 = 1 << 30;

/// The longest credit takes to come back under load, in microseconds: a
/// chunk crosses, the reader takes it and its credit crosses back, each
/// frame queued behind up to a chunk of other traffic (1-3 ms measured
/// under TCG).
const CREDIT_ROUND_TRIP_US: u64 = 4_000;

/// Bytes a sender may have unacknowledged on one stream: bandwidth times
/// round trip, so a stream is never idle waiting for credit, in whole
/// chunks. It also bounds what one stream buffers at its receiver.
pub const STREAM_WINDOW: u32 = (STREAM_BYTES_PER_SEC * CREDIT_ROUND_TRIP_US / 1_000_000)
    .next_multiple_of(DATA_CHUNK as u64) as u32;

/// Most spans the agent keeps between two `Trace` requests; later ones are
/// dropped, so a forgotten recording cannot grow the agent's memory.
pub const TRACE_LIMIT: usize = 1 << 16;

/// First stream id the guest allocates; lower ids belong to the host.
pub const GUEST_STREAM_BASE: u32 = 1 << 31;

/// Name of the virtio-serial port the agent serves on.
pub const AGENT_PORT_NAME: &str = "cc.agent";

/// The guest address of the host's listeners, named `host.internal` in the
/// guest's `/etc/hosts`. A loopback address, so it works without a network
/// device and with egress off: the agent listens on it and forwards over
/// the channel.
pub const HOST_INTERNAL_ADDR: &str = "127.0.0.254";

/// The name guest programs use to reach the host's listeners.
pub const HOST_INTERNAL_NAME: &str = "host.internal";
