//! The protocol spoken between the host and the guest agent over one
//! virtio-serial port.
//!
//! This crate owns the wire format and nothing else: the message types
//! ([`Message`]), their framing ([`frame`]) and the per-stream flow control
//! both ends share ([`flow`]). It does no I/O of its own beyond reading and
//! writing frames on a caller's `Read`/`Write`, knows nothing of QEMU, and is
//! used unchanged by the host (`cc`) and the guest (`cc-agent`).
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
//!
//! # Streams and back-pressure
//! Byte streams (a process's stdin, stdout, stderr, a forwarded connection)
//! are numbered by whoever opens them;
//! ids below [`GUEST_STREAM_BASE`] are the host's, ids from it up are the
//! guest's. A sender may have at most [`STREAM_WINDOW`] bytes in flight per
//! stream: the receiver returns credit with [`Message::Credit`] as its reader
//! consumes data, so one slow reader never stalls the channel or grows a
//! buffer without bound.

pub mod flow;
pub mod frame;
mod message;

pub use message::*;

/// Version of this protocol. Bumped on any incompatible change; the host
/// refuses an agent that speaks another version.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame payload either side accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// Largest `Data` payload a sender puts in one frame. Large, because on
/// the guest's emulated CPU every frame has a fixed cost (a header, a
/// wakeup, a file write) that small frames multiply.
pub const DATA_CHUNK: usize = 512 << 10;

/// Bytes a sender may have unacknowledged on one stream: several chunks,
/// so the sender keeps going while the receiver consumes one.
pub const STREAM_WINDOW: u32 = 4 << 20;

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
