//! Our own frame types, converted from and to the protobuf envelope exactly once.

use crate::pb;
use crate::pb::envelope::Payload;

/// A user as the protocol names one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
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

/// A place in a user's two streams: the last position received in their inbox (private
/// messages) and in the group stream. 0 means "nothing yet" (or, in a LOGIN, "not known").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Positions {
    pub inbox: u64,
    pub group: u64,
}

impl Positions {
    /// The later of two positions, stream by stream.
    pub fn max(self, other: Positions) -> Positions {
        Positions { inbox: self.inbox.max(other.inbox), group: self.group.max(other.group) }
    }

    /// The position of `kind`'s stream.
    pub fn of(&self, kind: MessageKind) -> u64 {
        match kind {
            MessageKind::Private => self.inbox,
            MessageKind::Group => self.group,
        }
    }

    /// Moves `kind`'s stream forward to `position` (never back).
    pub fn advance(&mut self, kind: MessageKind, position: u64) {
        let p = match kind {
            MessageKind::Private => &mut self.inbox,
            MessageKind::Group => &mut self.group,
        };
        *p = (*p).max(position);
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
    /// Its position in the recipient's inbox (private) or the group stream (group).
    pub position: u64,
    /// Replayed at login rather than delivered live.
    pub replayed: bool,
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
    Replaced,
    IdleTimeout,
    TakenOffline,
    ShuttingDown,
}

impl ErrorCode {
    /// Its number on the wire (`proto/cim.proto`).
    pub fn number(self) -> i32 {
        code_to_pb(self) as i32
    }

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
            ErrorCode::Replaced => "replaced",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::TakenOffline => "taken_offline",
            ErrorCode::ShuttingDown => "shutting_down",
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
    Login(Login),
    LoginAck(LoginAck),
    /// A new token for the open connection.
    Refresh {
        token: String,
    },
    Ping,
    Pong,
    /// `client_msg_id` is empty when the client gave none.
    PrivateSend {
        to: u64,
        text: String,
        client_msg_id: String,
    },
    GroupSend {
        text: String,
        client_msg_id: String,
    },
    OnlineRequest,
    OnlineResponse {
        users: Vec<User>,
    },
    Delivery(Delivery),
    /// Server to client: a request was accepted (`message_id` of a send, `stored` when its
    /// receiver was offline). Client to server: `received` is where it is.
    Ack {
        message_id: u64,
        stored: bool,
        received: Option<Positions>,
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
    /// Server push to sessions that asked for it ([`Login::presence`]): whose presence
    /// changed since the last one. `resync`: too many changes to list; ask for the list.
    Presence {
        online: Vec<User>,
        offline: Vec<User>,
        resync: bool,
    },
}

/// The first frame of a connection. `token` and `resume_token` are empty when the client has
/// none; `resume_from` fields are 0 when it does not know them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    pub user_id: u64,
    pub user_name: String,
    pub token: String,
    pub resume_from: Positions,
    pub resume_token: String,
    /// Push PRESENCE frames to this session.
    pub presence: bool,
}

/// The server's answer to an accepted LOGIN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginAck {
    pub node_id: String,
    pub heartbeat_secs: u32,
    /// The user as the server bound them.
    pub user: User,
    /// 0 when the server verifies no tokens.
    pub token_expires_at_ms: u64,
    /// Replay starts after these positions.
    pub resume_from: Positions,
    /// Messages after `resume_from` fell out of retention and will not be replayed.
    pub missed_inbox: bool,
    pub missed_group: bool,
    /// Presented in the next LOGIN, it takes this session over.
    pub resume_token: String,
}

impl Body {
    /// A LOGIN that resumes from where the server kept this user's acks.
    pub fn login(user_id: u64, user_name: String, token: String) -> Body {
        Body::Login(Login { user_id, user_name, token, ..Login::default() })
    }

    /// A send's acceptance: its message id (delivered, or nothing to say about storage).
    pub fn ack(message_id: u64) -> Body {
        Body::Ack { message_id, stored: false, received: None }
    }

    /// A private send without a client message id.
    pub fn private(to: u64, text: String) -> Body {
        Body::PrivateSend { to, text, client_msg_id: String::new() }
    }

    /// A group send without a client message id.
    pub fn group(text: String) -> Body {
        Body::GroupSend { text, client_msg_id: String::new() }
    }

    /// The protocol name of this kind, for logs and error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Body::Login(_) => "login",
            Body::LoginAck(_) => "login_ack",
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
            Body::Presence { .. } => "presence",
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
/// The connection can go on: the next frame starts at a known offset. Carries the frame's
/// request id whenever it could be read (0 otherwise), so the answer names the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a valid cim envelope: {reason}")]
    Protobuf { request_id: u64, reason: String },
    #[error("frame has no payload (kind {kind})")]
    MissingPayload { request_id: u64, kind: i32 },
    #[error("frame kind {kind} does not match its payload ({payload})")]
    KindMismatch { request_id: u64, kind: i32, payload: &'static str },
    #[error("frame field {field} is missing")]
    MissingField { request_id: u64, field: &'static str },
    #[error("text WebSocket messages are not accepted: send each envelope as a binary message")]
    TextMessage,
}

impl FrameError {
    /// The request id of the frame, when it could be read; 0 otherwise.
    pub fn request_id(&self) -> u64 {
        match self {
            FrameError::Protobuf { request_id, .. }
            | FrameError::MissingPayload { request_id, .. }
            | FrameError::KindMismatch { request_id, .. }
            | FrameError::MissingField { request_id, .. } => *request_id,
            FrameError::TextMessage => 0,
        }
    }
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
        pb::ErrorCode::Replaced => ErrorCode::Replaced,
        pb::ErrorCode::IdleTimeout => ErrorCode::IdleTimeout,
        pb::ErrorCode::TakenOffline => ErrorCode::TakenOffline,
        pb::ErrorCode::ShuttingDown => ErrorCode::ShuttingDown,
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
        ErrorCode::Replaced => pb::ErrorCode::Replaced,
        ErrorCode::IdleTimeout => pb::ErrorCode::IdleTimeout,
        ErrorCode::TakenOffline => pb::ErrorCode::TakenOffline,
        ErrorCode::ShuttingDown => pb::ErrorCode::ShuttingDown,
    }
}

fn user_from_pb(request_id: u64, user: Option<pb::User>) -> Result<User, FrameError> {
    let user = user.ok_or(FrameError::MissingField { request_id, field: "delivery.sender" })?;
    Ok(User { id: user.id, name: user.name })
}

fn user_to_pb(user: User) -> pb::User {
    pb::User { id: user.id, name: user.name }
}

/// An absent `Positions` is all zeros ("not known").
fn positions_from_pb(p: Option<pb::Positions>) -> Positions {
    p.map(|p| Positions { inbox: p.inbox, group: p.group }).unwrap_or_default()
}

/// All zeros go on the wire as absent.
fn positions_to_pb(p: Positions) -> Option<pb::Positions> {
    (p != Positions::default()).then_some(pb::Positions { inbox: p.inbox, group: p.group })
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
        Payload::Presence(_) => (pb::Kind::Presence, "presence"),
    }
}

impl TryFrom<pb::Envelope> for Frame {
    type Error = FrameError;

    fn try_from(env: pb::Envelope) -> Result<Self, FrameError> {
        let request_id = env.request_id;
        let payload = env.payload.ok_or(FrameError::MissingPayload { request_id, kind: env.kind })?;
        let (kind, name) = payload_kind(&payload);
        // Kind 0 (unspecified) is accepted: the payload alone is unambiguous.
        if env.kind != 0 && env.kind != kind as i32 {
            return Err(FrameError::KindMismatch { request_id, kind: env.kind, payload: name });
        }
        let body = match payload {
            Payload::Login(p) => Body::Login(Login {
                user_id: p.user_id,
                user_name: p.user_name,
                token: p.token,
                resume_from: positions_from_pb(p.resume_from),
                resume_token: p.resume_token,
                presence: p.presence,
            }),
            Payload::LoginAck(p) => Body::LoginAck(LoginAck {
                node_id: p.node_id,
                heartbeat_secs: p.heartbeat_secs,
                user: p
                    .user
                    .map(|u| User { id: u.id, name: u.name })
                    .unwrap_or(User { id: 0, name: String::new() }),
                token_expires_at_ms: p.token_expires_at_ms,
                resume_from: positions_from_pb(p.resume_from),
                missed_inbox: p.missed_inbox,
                missed_group: p.missed_group,
                resume_token: p.resume_token,
            }),
            Payload::Refresh(p) => Body::Refresh { token: p.token },
            Payload::Ping(_) => Body::Ping,
            Payload::Pong(_) => Body::Pong,
            Payload::PrivateSend(p) => {
                Body::PrivateSend { to: p.to_user_id, text: p.text, client_msg_id: p.client_msg_id }
            }
            Payload::GroupSend(p) => Body::GroupSend { text: p.text, client_msg_id: p.client_msg_id },
            Payload::OnlineRequest(_) => Body::OnlineRequest,
            Payload::OnlineResponse(p) => Body::OnlineResponse {
                users: p.users.into_iter().map(|u| User { id: u.id, name: u.name }).collect(),
            },
            Payload::Delivery(p) => {
                let kind = match pb::MessageKind::try_from(p.kind) {
                    Ok(pb::MessageKind::Private) => MessageKind::Private,
                    Ok(pb::MessageKind::Group) => MessageKind::Group,
                    _ => return Err(FrameError::MissingField { request_id, field: "delivery.kind" }),
                };
                Body::Delivery(Delivery {
                    message_id: p.message_id,
                    sender: user_from_pb(request_id, p.sender)?,
                    kind,
                    text: p.text,
                    timestamp_ms: p.timestamp_ms,
                    position: p.position,
                    replayed: p.replayed,
                })
            }
            Payload::Ack(p) => Body::Ack {
                message_id: p.message_id,
                stored: p.stored,
                received: p.received.map(|r| Positions { inbox: r.inbox, group: r.group }),
            },
            Payload::Error(p) => Body::Error {
                code: code_from_pb(p.code),
                message: p.message,
                retry_after_ms: p.retry_after_ms,
            },
            Payload::Kick(p) => Body::Kick { code: code_from_pb(p.code), reason: p.reason },
            Payload::Presence(p) => Body::Presence {
                online: p.online.into_iter().map(|u| User { id: u.id, name: u.name }).collect(),
                offline: p.offline.into_iter().map(|u| User { id: u.id, name: u.name }).collect(),
                resync: p.resync,
            },
        };
        Ok(Frame { request_id: env.request_id, body })
    }
}

impl From<Frame> for pb::Envelope {
    fn from(frame: Frame) -> Self {
        let payload = match frame.body {
            Body::Login(l) => Payload::Login(pb::Login {
                user_id: l.user_id,
                user_name: l.user_name,
                token: l.token,
                resume_from: positions_to_pb(l.resume_from),
                resume_token: l.resume_token,
                presence: l.presence,
            }),
            Body::LoginAck(a) => Payload::LoginAck(pb::LoginAck {
                node_id: a.node_id,
                heartbeat_secs: a.heartbeat_secs,
                user: Some(user_to_pb(a.user)),
                token_expires_at_ms: a.token_expires_at_ms,
                resume_from: positions_to_pb(a.resume_from),
                missed_inbox: a.missed_inbox,
                missed_group: a.missed_group,
                resume_token: a.resume_token,
            }),
            Body::Refresh { token } => Payload::Refresh(pb::Refresh { token }),
            Body::Ping => Payload::Ping(pb::Ping {}),
            Body::Pong => Payload::Pong(pb::Pong {}),
            Body::PrivateSend { to, text, client_msg_id } => {
                Payload::PrivateSend(pb::PrivateSend { to_user_id: to, text, client_msg_id })
            }
            Body::GroupSend { text, client_msg_id } => {
                Payload::GroupSend(pb::GroupSend { text, client_msg_id })
            }
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
                position: d.position,
                replayed: d.replayed,
            }),
            Body::Ack { message_id, stored, received } => Payload::Ack(pb::Ack {
                message_id,
                stored,
                received: received.map(|r| pb::Positions { inbox: r.inbox, group: r.group }),
            }),
            Body::Error { code, message, retry_after_ms } => {
                Payload::Error(pb::Error { code: code_to_pb(code) as i32, message, retry_after_ms })
            }
            Body::Kick { code, reason } => Payload::Kick(pb::Kick { reason, code: code_to_pb(code) as i32 }),
            Body::Presence { online, offline, resync } => Payload::Presence(pb::Presence {
                online: online.into_iter().map(user_to_pb).collect(),
                offline: offline.into_iter().map(user_to_pb).collect(),
                resync,
            }),
        };
        let (kind, _) = payload_kind(&payload);
        pb::Envelope { request_id: frame.request_id, kind: kind as i32, payload: Some(payload) }
    }
}
