//! Length-delimited framing: a protobuf varint length, then that many bytes of one
//! encoded [`pb::Envelope`]. A length above the configured maximum is fatal for the
//! connection (we refuse to buffer it); a well-delimited frame whose content is bad
//! is handed up as an `Err(FrameError)` item so the session can answer and go on.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{Frame, FrameError};
use crate::pb;

/// A failure that ends the connection: the byte stream cannot be re-synchronised.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("frame length prefix is not a valid varint")]
    BadLength,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes [`Frame`]s on a byte stream (TCP).
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(crate::DEFAULT_MAX_FRAME)
    }
}

/// Reads a varint length prefix without consuming it.
/// `Ok(None)`: more bytes needed. `Ok(Some((len, prefix_bytes)))` otherwise.
fn peek_length(buf: &[u8]) -> Result<Option<(u64, usize)>, CodecError> {
    let mut value: u64 = 0;
    for (i, byte) in buf.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // The tenth byte may only contribute one bit.
            if i == 9 && *byte > 1 {
                return Err(CodecError::BadLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 10 { Err(CodecError::BadLength) } else { Ok(None) }
}

/// Decodes one envelope's bytes into a [`Frame`].
pub fn decode_message(bytes: &[u8]) -> Result<Frame, FrameError> {
    let env = pb::Envelope::decode(bytes).map_err(|e| FrameError::Protobuf {
        request_id: EnvelopeHead::decode(bytes).map_or(0, |h| h.request_id),
        reason: e.to_string(),
    })?;
    Frame::try_from(env)
}

/// An envelope's request id alone, read when the whole envelope cannot be (the field is
/// first on the wire as every encoder writes it; a broken payload after it may still fail).
#[derive(Clone, PartialEq, prost::Message)]
struct EnvelopeHead {
    #[prost(uint64, tag = "1")]
    request_id: u64,
}

/// Encodes a [`Frame`] as one envelope (no length prefix): a WebSocket binary message.
pub fn encode_message(frame: Frame) -> Vec<u8> {
    pb::Envelope::from(frame).encode_to_vec()
}

impl Decoder for FrameCodec {
    type Item = Result<Frame, FrameError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        let Some((len, prefix)) = peek_length(src)? else {
            return Ok(None);
        };
        if len > self.max_frame as u64 {
            return Err(CodecError::TooLarge { len, max: self.max_frame });
        }
        let len = len as usize;
        if src.len() < prefix + len {
            src.reserve(prefix + len - src.len());
            return Ok(None);
        }
        src.advance(prefix);
        let body = src.split_to(len);
        Ok(Some(decode_message(&body)))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let env = pb::Envelope::from(frame);
        let len = env.encoded_len();
        if len > self.max_frame {
            return Err(CodecError::TooLarge { len: len as u64, max: self.max_frame });
        }
        dst.reserve(len + prost::length_delimiter_len(len));
        prost::encoding::encode_varint(len as u64, dst);
        env.encode(dst).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

/// One envelope already encoded (without the TCP length prefix): encode a message once and
/// queue the same bytes to many connections; TCP adds the prefix, WebSocket sends it as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub bytes::Bytes);

impl From<Frame> for Encoded {
    fn from(frame: Frame) -> Self {
        Encoded(bytes::Bytes::from(encode_message(frame)))
    }
}

impl Encoder<Encoded> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Encoded, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = item.0.len();
        if len > self.max_frame {
            return Err(CodecError::TooLarge { len: len as u64, max: self.max_frame });
        }
        dst.reserve(len + prost::length_delimiter_len(len));
        prost::encoding::encode_varint(len as u64, dst);
        dst.put_slice(&item.0);
        Ok(())
    }
}

/// Writes `frame` with its length prefix into a fresh buffer (for tests and tools).
pub fn encode_delimited(frame: Frame) -> Vec<u8> {
    let env = pb::Envelope::from(frame);
    let mut out = Vec::with_capacity(env.encoded_len() + 5);
    prost::encoding::encode_varint(env.encoded_len() as u64, &mut out);
    out.put_slice(&env.encode_to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Body, Delivery, ErrorCode, Login, LoginAck, MessageKind, Positions, User};
    use proptest::prelude::*;

    fn decode_all(codec: &mut FrameCodec, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).expect("no fatal error") {
            out.push(item);
        }
        out
    }

    #[test]
    fn round_trip_one_frame() {
        let frame = Frame::new(7, Body::private(42, "hi".into()));
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(frame.clone(), &mut buf).unwrap();
        assert_eq!(decode_all(&mut codec, &buf), vec![Ok(frame)]);
    }

    #[test]
    fn pre_encoded_frames_decode_like_frames() {
        let frame = Frame::new(3, Body::group("once".into()));
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(Encoded::from(frame.clone()), &mut buf).unwrap();
        assert_eq!(buf.as_ref(), encode_delimited(frame.clone()).as_slice());
        assert_eq!(decode_all(&mut codec, &buf), vec![Ok(frame)]);
    }

    #[test]
    fn truncated_frame_waits_for_more_bytes() {
        let bytes = encode_delimited(Frame::new(1, Body::group("hello".into())));
        let mut codec = FrameCodec::default();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "cut at {cut}");
        }
        // Fed byte by byte, the frame appears exactly once, at the end.
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for b in &bytes {
            buf.put_u8(*b);
            if let Some(item) = codec.decode(&mut buf).unwrap() {
                seen.push(item);
            }
        }
        assert_eq!(seen.len(), 1);
        assert!(seen[0].is_ok());
    }

    #[test]
    fn oversized_length_is_fatal_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        prost::encoding::encode_varint(1025, &mut buf);
        match codec.decode(&mut buf) {
            Err(CodecError::TooLarge { len: 1025, max: 1024 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn encoder_refuses_oversized_frame() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        let frame = Frame::new(1, Body::group("x".repeat(100)));
        assert!(matches!(codec.encode(frame, &mut buf), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn bad_varint_is_fatal() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0xffu8; 11][..]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::BadLength)));
    }

    #[test]
    fn garbage_body_is_a_frame_error_and_the_stream_goes_on() {
        let mut bytes = vec![3u8, 0xff, 0xff, 0xff];
        bytes.extend(encode_delimited(Frame::new(2, Body::Ping)));
        let items = decode_all(&mut FrameCodec::default(), &bytes);
        assert_eq!(items.len(), 2);
        assert!(matches!(items[0], Err(FrameError::Protobuf { .. })));
        assert_eq!(items[1], Ok(Frame::new(2, Body::Ping)));
    }

    #[test]
    fn empty_envelope_has_no_payload() {
        let items = decode_all(&mut FrameCodec::default(), &[0u8]);
        assert_eq!(items, vec![Err(FrameError::MissingPayload { request_id: 0, kind: 0 })]);
    }

    #[test]
    fn kind_must_match_payload() {
        let env = pb::Envelope {
            request_id: 1,
            kind: pb::Kind::Login as i32,
            payload: Some(pb::envelope::Payload::Ping(pb::Ping {})),
        };
        let err = decode_message(&env.encode_to_vec()).unwrap_err();
        assert!(matches!(err, FrameError::KindMismatch { payload: "ping", .. }), "{err}");
        assert_eq!(err.request_id(), 1, "the request id was decoded");
    }

    fn arb_user() -> impl Strategy<Value = User> {
        (any::<u64>(), ".{0,20}").prop_map(|(id, name)| User { id, name })
    }

    /// Positions as they survive the wire: all zeros are "absent", so `Some(zeros)` is not
    /// generated for an ack.
    fn arb_positions() -> impl Strategy<Value = Positions> {
        (1..u64::MAX, any::<u64>()).prop_map(|(inbox, group)| Positions { inbox, group })
    }

    fn arb_code() -> impl Strategy<Value = ErrorCode> {
        prop_oneof![
            Just(ErrorCode::BadFrame),
            Just(ErrorCode::DuplicateLogin),
            Just(ErrorCode::UserOffline),
            Just(ErrorCode::HandlerFailed),
            Just(ErrorCode::Unauthenticated),
            Just(ErrorCode::TokenExpired),
            Just(ErrorCode::RateLimited),
            Just(ErrorCode::Replaced),
            Just(ErrorCode::IdleTimeout),
            Just(ErrorCode::TakenOffline),
            Just(ErrorCode::ShuttingDown),
        ]
    }

    fn arb_body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (
                any::<u64>(),
                ".{0,32}",
                "[A-Za-z0-9._-]{0,64}",
                arb_positions(),
                "[A-Za-z0-9]{0,16}",
                any::<bool>()
            )
                .prop_map(|(user_id, user_name, token, resume_from, resume_token, presence)| {
                    Body::Login(Login { user_id, user_name, token, resume_from, resume_token, presence })
                }),
            (".{0,16}", any::<u32>(), arb_user(), any::<u64>(), arb_positions(), any::<(bool, bool)>())
                .prop_map(
                    |(
                        node_id,
                        heartbeat_secs,
                        user,
                        token_expires_at_ms,
                        resume_from,
                        (missed_inbox, missed_group),
                    )| {
                        Body::LoginAck(LoginAck {
                            node_id,
                            heartbeat_secs,
                            user,
                            token_expires_at_ms,
                            resume_from,
                            missed_inbox,
                            missed_group,
                            resume_token: "t".into(),
                        })
                    }
                ),
            "[A-Za-z0-9._-]{0,64}".prop_map(|token| Body::Refresh { token }),
            Just(Body::Ping),
            Just(Body::Pong),
            (any::<u64>(), ".{0,64}", "[a-z0-9-]{0,64}")
                .prop_map(|(to, text, client_msg_id)| Body::PrivateSend { to, text, client_msg_id }),
            (".{0,64}", "[a-z0-9-]{0,64}")
                .prop_map(|(text, client_msg_id)| Body::GroupSend { text, client_msg_id }),
            Just(Body::OnlineRequest),
            proptest::collection::vec(arb_user(), 0..8).prop_map(|users| Body::OnlineResponse { users }),
            (any::<u64>(), arb_user(), any::<bool>(), ".{0,64}", any::<(u64, u64, bool)>()).prop_map(
                |(message_id, sender, private, text, (timestamp_ms, position, replayed))| {
                    Body::Delivery(Delivery {
                        message_id,
                        sender,
                        kind: if private { MessageKind::Private } else { MessageKind::Group },
                        text,
                        timestamp_ms,
                        position,
                        replayed,
                    })
                }
            ),
            (any::<u64>(), any::<bool>(), proptest::option::of(arb_positions()))
                .prop_map(|(message_id, stored, received)| Body::Ack { message_id, stored, received }),
            (arb_code(), ".{0,32}", any::<u64>()).prop_map(|(code, message, retry_after_ms)| Body::Error {
                code,
                message,
                retry_after_ms
            }),
            (arb_code(), ".{0,32}").prop_map(|(code, reason)| Body::Kick { code, reason }),
            (
                proptest::collection::vec(arb_user(), 0..8),
                proptest::collection::vec(arb_user(), 0..8),
                any::<bool>()
            )
                .prop_map(|(online, offline, resync)| Body::Presence { online, offline, resync }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_the_codec(
            frames in proptest::collection::vec((any::<u64>(), arb_body()), 1..8)
        ) {
            let frames: Vec<Frame> =
                frames.into_iter().map(|(id, body)| Frame::new(id, body)).collect();
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            for f in &frames {
                codec.encode(f.clone(), &mut buf).unwrap();
            }
            let decoded: Vec<Frame> =
                decode_all(&mut codec, &buf).into_iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn websocket_messages_round_trip(id in any::<u64>(), body in arb_body()) {
            let frame = Frame::new(id, body);
            prop_assert_eq!(decode_message(&encode_message(frame.clone())), Ok(frame));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut codec = FrameCodec::new(128);
            let mut buf = BytesMut::from(&bytes[..]);
            // Either a fatal error, or a sequence of items until more bytes are needed.
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
