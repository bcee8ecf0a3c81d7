//! Our own frame types, converted from and to the protobuf envelope exactly once.

use crate::pb;
use crate::pb::envelope::Payload;

/// A user as the protocol names one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    pub id: u64,
    pub name: String,
}

/// Whether a delivered message was sent to one user or to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Private,
    Group,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Private => "private",
            MessageKind::Group => "group",
        }
    }
}

/// A message on its way to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Server-assigned; every recipient of one send sees the same id.
    pub message_id: u64,
    pub sender: User,
    pub kind: MessageKind,
    pub text: String,
    /// Unix time in milliseconds at which the server accepted the message.
    pub timestamp_ms: u64,
}

/// Why a request failed; mirrors `cim.v1.ErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Unspecified,
    BadFrame,
    FrameTooLarge,
    NotLoggedIn,
    DuplicateLogin,
    Rejected,
    UserOffline,
    Invalid,
    HandlerFailed,
    Unavailable,
    Unexpected,
    SlowConsumer,
    Unauthenticated,
    TokenExpired,
    RateLimited,
}

impl ErrorCode {
    /// A short stable name, used in logs, the HTTP API and the terminal client.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "unspecified",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::DuplicateLogin => "duplicate_login",
            ErrorCode::Rejected => "rejected",
            ErrorCode::UserOffline => "user_offline",
            ErrorCode::Invalid => "invalid",
            ErrorCode::HandlerFailed => "handler_failed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `token` is empty when the client has none.
    Login {
        user_id: u64,
        user_name: String,
        token: String,
    },
    /// `user` is the user as the server bound them; `token_expires_at_ms` is 0 when the
    /// server verifies no tokens.
    LoginAck {
        node_id: String,
        heartbeat_secs: u32,
        user: User,
        token_expires_at_ms: u64,
    },
    /// A new token for the open connection.
    Refresh {
        token: String,
    },
    Ping,
    Pong,
    PrivateSend {
        to: u64,
        text: String,
    },
    GroupSend {
        text: String,
    },
    OnlineRequest,
    OnlineResponse {
        users: Vec<User>,
    },
    Delivery(Delivery),
    Ack {
        message_id: u64,
    },
    /// `retry_after_ms` is set for [`ErrorCode::RateLimited`], 0 otherwise.
    Error {
        code: ErrorCode,
        message: String,
        retry_after_ms: u64,
    },
    Kick {
        code: ErrorCode,
        reason: String,
    },
}

impl Body {
    /// The protocol name of this kind, for logs and error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Body::Login { .. } => "login",
            Body::LoginAck { .. } => "login_ack",
            Body::Refresh { .. } => "refresh",
            Body::Ping => "ping",
            Body::Pong => "pong",
            Body::PrivateSend { .. } => "private_send",
            Body::GroupSend { .. } => "group_send",
            Body::OnlineRequest => "online_request",
            Body::OnlineResponse { .. } => "online_response",
            Body::Delivery(_) => "delivery",
            Body::Ack { .. } => "ack",
            Body::Error { .. } => "error",
            Body::Kick { .. } => "kick",
        }
    }
}

/// One protocol frame: a request id and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the client for requests and echoed in the answer; 0 for server pushes.
    pub request_id: u64,
    pub body: Body,
}

impl Frame {
    pub fn new(request_id: u64, body: Body) -> Self {
        Frame { request_id, body }
    }

    /// A server push (request id 0).
    pub fn push(body: Body) -> Self {
        Frame { request_id: 0, body }
    }

    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Frame { request_id, body: Body::Error { code, message: message.into(), retry_after_ms: 0 } }
    }

    /// A [`ErrorCode::RateLimited`] answer: try again after `retry_after_ms`.
    pub fn rate_limited(request_id: u64, retry_after_ms: u64, message: impl Into<String>) -> Self {
        let body = Body::Error { code: ErrorCode::RateLimited, message: message.into(), retry_after_ms };
        Frame { request_id, body }
    }
}

/// A frame that was delimited correctly but whose content is not a valid envelope.
/// The connection can go on: the next frame starts at a known offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a valid cim envelope: {0}")]
    Protobuf(String),
    #[error("frame has no payload (kind {0})")]
    MissingPayload(i32),
    #[error("frame kind {kind} does not match its payload ({payload})")]
    KindMismatch { kind: i32, payload: &'static str },
    #[error("frame field {field} is missing")]
    MissingField { field: &'static str },
    #[error("text WebSocket messages are not accepted: send each envelope as a binary message")]
    TextMessage,
}

fn code_from_pb(code: i32) -> ErrorCode {
    match pb::ErrorCode::try_from(code).unwrap_or(pb::ErrorCode::Unspecified) {
        pb::ErrorCode::Unspecified => ErrorCode::Unspecified,
        pb::ErrorCode::BadFrame => ErrorCode::BadFrame,
        pb::ErrorCode::FrameTooLarge => ErrorCode::FrameTooLarge,
        pb::ErrorCode::NotLoggedIn => ErrorCode::NotLoggedIn,
        pb::ErrorCode::DuplicateLogin => ErrorCode::DuplicateLogin,
        pb::ErrorCode::Rejected => ErrorCode::Rejected,
        pb::ErrorCode::UserOffline => ErrorCode::UserOffline,
        pb::ErrorCode::Invalid => ErrorCode::Invalid,
        pb::ErrorCode::HandlerFailed => ErrorCode::HandlerFailed,
        pb::ErrorCode::Unavailable => ErrorCode::Unavailable,
        pb::ErrorCode::Unexpected => ErrorCode::Unexpected,
        pb::ErrorCode::SlowConsumer => ErrorCode::SlowConsumer,
        pb::ErrorCode::Unauthenticated => ErrorCode::Unauthenticated,
        pb::ErrorCode::TokenExpired => ErrorCode::TokenExpired,
        pb::ErrorCode::RateLimited => ErrorCode::RateLimited,
    }
}

fn code_to_pb(code: ErrorCode) -> pb::ErrorCode {
    match code {
        ErrorCode::Unspecified => pb::ErrorCode::Unspecified,
        ErrorCode::BadFrame => pb::ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge => pb::ErrorCode::FrameTooLarge,
        ErrorCode::NotLoggedIn => pb::ErrorCode::NotLoggedIn,
        ErrorCode::DuplicateLogin => pb::ErrorCode::DuplicateLogin,
        ErrorCode::Rejected => pb::ErrorCode::Rejected,
        ErrorCode::UserOffline => pb::ErrorCode::UserOffline,
        ErrorCode::Invalid => pb::ErrorCode::Invalid,
        ErrorCode::HandlerFailed => pb::ErrorCode::HandlerFailed,
        ErrorCode::Unavailable => pb::ErrorCode::Unavailable,
        ErrorCode::Unexpected => pb::ErrorCode::Unexpected,
        ErrorCode::SlowConsumer => pb::ErrorCode::SlowConsumer,
        ErrorCode::Unauthenticated => pb::ErrorCode::Unauthenticated,
        ErrorCode::TokenExpired => pb::ErrorCode::TokenExpired,
        ErrorCode::RateLimited => pb::ErrorCode::RateLimited,
    }
}

fn user_from_pb(user: Option<pb::User>) -> Result<User, FrameError> {
    let user = user.ok_or(FrameError::MissingField { field: "delivery.sender" })?;
    Ok(User { id: user.id, name: user.name })
}

fn user_to_pb(user: User) -> pb::User {
    pb::User { id: user.id, name: user.name }
}

fn payload_kind(payload: &Payload) -> (pb::Kind, &'static str) {
    match payload {
        Payload::Login(_) => (pb::Kind::Login, "login"),
        Payload::LoginAck(_) => (pb::Kind::LoginAck, "login_ack"),
        Payload::Ping(_) => (pb::Kind::Ping, "ping"),
        Payload::Pong(_) => (pb::Kind::Pong, "pong"),
        Payload::PrivateSend(_) => (pb::Kind::PrivateSend, "private_send"),
        Payload::GroupSend(_) => (pb::Kind::GroupSend, "group_send"),
        Payload::OnlineRequest(_) => (pb::Kind::OnlineRequest, "online_request"),
        Payload::OnlineResponse(_) => (pb::Kind::OnlineResponse, "online_response"),
        Payload::Delivery(_) => (pb::Kind::Delivery, "delivery"),
        Payload::Ack(_) => (pb::Kind::Ack, "ack"),
        Payload::Error(_) => (pb::Kind::Error, "error"),
        Payload::Kick(_) => (pb::Kind::Kick, "kick"),
        Payload::Refresh(_) => (pb::Kind::Refresh, "refresh"),
    }
}

impl TryFrom<pb::Envelope> for Frame {
    type Error = FrameError;

    fn try_from(env: pb::Envelope) -> Result<Self, FrameError> {
        let payload = env.payload.ok_or(FrameError::MissingPayload(env.kind))?;
        let (kind, name) = payload_kind(&payload);
        // Kind 0 (unspecified) is accepted: the payload alone is unambiguous.
        if env.kind != 0 && env.kind != kind as i32 {
            return Err(FrameError::KindMismatch { kind: env.kind, payload: name });
        }
        let body = match payload {
            Payload::Login(p) => Body::Login { user_id: p.user_id, user_name: p.user_name, token: p.token },
            Payload::LoginAck(p) => Body::LoginAck {
                node_id: p.node_id,
                heartbeat_secs: p.heartbeat_secs,
                user: p
                    .user
                    .map(|u| User { id: u.id, name: u.name })
                    .unwrap_or(User { id: 0, name: String::new() }),
                token_expires_at_ms: p.token_expires_at_ms,
            },
            Payload::Refresh(p) => Body::Refresh { token: p.token },
            Payload::Ping(_) => Body::Ping,
            Payload::Pong(_) => Body::Pong,
            Payload::PrivateSend(p) => Body::PrivateSend { to: p.to_user_id, text: p.text },
            Payload::GroupSend(p) => Body::GroupSend { text: p.text },
            Payload::OnlineRequest(_) => Body::OnlineRequest,
            Payload::OnlineResponse(p) => Body::OnlineResponse {
                users: p.users.into_iter().map(|u| User { id: u.id, name: u.name }).collect(),
            },
            Payload::Delivery(p) => {
                let kind = match pb::MessageKind::try_from(p.kind) {
                    Ok(pb::MessageKind::Private) => MessageKind::Private,
                    Ok(pb::MessageKind::Group) => MessageKind::Group,
                    _ => return Err(FrameError::MissingField { field: "delivery.kind" }),
                };
                Body::Delivery(Delivery {
                    message_id: p.message_id,
                    sender: user_from_pb(p.sender)?,
                    kind,
                    text: p.text,
                    timestamp_ms: p.timestamp_ms,
                })
            }
            Payload::Ack(p) => Body::Ack { message_id: p.message_id },
            Payload::Error(p) => Body::Error {
                code: code_from_pb(p.code),
                message: p.message,
                retry_after_ms: p.retry_after_ms,
            },
            Payload::Kick(p) => Body::Kick { code: code_from_pb(p.code), reason: p.reason },
        };
        Ok(Frame { request_id: env.request_id, body })
    }
}

impl From<Frame> for pb::Envelope {
    fn from(frame: Frame) -> Self {
        let payload = match frame.body {
            Body::Login { user_id, user_name, token } => {
                Payload::Login(pb::Login { user_id, user_name, token })
            }
            Body::LoginAck { node_id, heartbeat_secs, user, token_expires_at_ms } => {
                Payload::LoginAck(pb::LoginAck {
                    node_id,
                    heartbeat_secs,
                    user: Some(user_to_pb(user)),
                    token_expires_at_ms,
                })
            }
            Body::Refresh { token } => Payload::Refresh(pb::Refresh { token }),
            Body::Ping => Payload::Ping(pb::Ping {}),
            Body::Pong => Payload::Pong(pb::Pong {}),
            Body::PrivateSend { to, text } => Payload::PrivateSend(pb::PrivateSend { to_user_id: to, text }),
            Body::GroupSend { text } => Payload::GroupSend(pb::GroupSend { text }),
            Body::OnlineRequest => Payload::OnlineRequest(pb::OnlineRequest {}),
            Body::OnlineResponse { users } => Payload::OnlineResponse(pb::OnlineResponse {
                users: users.into_iter().map(user_to_pb).collect(),
            }),
            Body::Delivery(d) => Payload::Delivery(pb::Delivery {
                message_id: d.message_id,
                sender: Some(user_to_pb(d.sender)),
                kind: match d.kind {
                    MessageKind::Private => pb::MessageKind::Private,
                    MessageKind::Group => pb::MessageKind::Group,
                } as i32,
                text: d.text,
                timestamp_ms: d.timestamp_ms,
            }),
            Body::Ack { message_id } => Payload::Ack(pb::Ack { message_id }),
            Body::Error { code, message, retry_after_ms } => {
                Payload::Error(pb::Error { code: code_to_pb(code) as i32, message, retry_after_ms })
            }
            Body::Kick { code, reason } => Payload::Kick(pb::Kick { reason, code: code_to_pb(code) as i32 }),
        };
        let (kind, _) = payload_kind(&payload);
        pb::Envelope { request_id: frame.request_id, kind: kind as i32, payload: Some(payload) }
    }
}
