//! # cim-proto
//!
//! The wire protocol shared by `cim-host` and the client SDK.
//!
//! # Layout
//! - [`pb`]: the prost types generated from `proto/cim.proto`. They stop at the edge:
//!   nothing outside this crate should need them.
//! - [`frame`]: our own [`Frame`] / [`Body`] types and the conversions to and from
//!   [`pb::Envelope`] (decoding checks that kind and payload agree).
//! - [`codec`]: the length-delimited (varint prefix) codec with a hard maximum frame size,
//!   used on TCP; WebSocket carries one encoded envelope per binary message
//!   ([`encode_message`] / [`decode_message`]).

pub mod codec;
pub mod frame;

/// Types generated from `cim.proto`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/cim.v1.rs"));
}

pub use codec::{CodecError, Encoded, FrameCodec, decode_message, encode_message};
pub use frame::{
    Body, Delivery, ErrorCode, Frame, FrameError, Login, LoginAck, MessageKind, Positions, User,
};

/// Default hard limit on one encoded frame (64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
