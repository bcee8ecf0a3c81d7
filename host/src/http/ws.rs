//! The WebSocket endpoint (`GET /ws`): one envelope per binary message, fed to
//! [`crate::session::run`] like a TCP connection. Browsers are held to an `Origin` allowlist
//! so a foreign page cannot open a session with its visitor's network position.

use std::io;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use std::pin::Pin;
use std::task::{Context, Poll};

use cim_proto::{Body, CodecError, Encoded, ErrorCode, FrameError, decode_message};
use futures_util::{StreamExt, future};
use hyper::StatusCode;
use hyper::header::{HOST, ORIGIN};
use tracing::debug;

use super::extract::ApiError;
use crate::session::{self, Inbound};
use crate::transport::Sessions;

pub fn router() -> Router<Sessions> {
    Router::new().route("/ws", get(upgrade))
}

async fn upgrade(
    State(s): State<Sessions>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws =
        ws.map_err(|e| ApiError::bad_request(format!("GET /ws expects a WebSocket upgrade request: {e}")))?;
    check_origin(&headers, &s.router.config().http.allowed_origins)?;
    let slot = s.slot().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server is at its connection limit")
    })?;
    // axum spawns the session itself; the tracker token keeps shutdown waiting for it.
    let tracked = s.tracker.token();
    let max = s.router.config().max_frame;
    Ok(ws.max_message_size(max).max_frame_size(max).on_upgrade(move |socket| async move {
        run(socket, s, peer).await;
        drop(slot);
        drop(tracked);
    }))
}

/// Refuses a browser (a request with `Origin`) whose page is not on the allowlist; an empty
/// allowlist means the page's own origin, `http(s)://<Host>`.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(origin) = headers.get(ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    let ok = if allowed.is_empty() {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        !host.is_empty()
            && [format!("http://{host}"), format!("https://{host}")]
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
    } else {
        allowed.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    };
    if ok {
        return Ok(());
    }
    debug!(origin, "websocket from a foreign origin refused");
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        format!("WebSocket connections from {origin:?} are not allowed (see --allowed-origin)"),
    ))
}

async fn run(socket: WebSocket, s: Sessions, peer: SocketAddr) {
    let max = s.router.config().max_frame;
    let (sink, stream) = socket.split();
    let stream = stream.filter_map(move |m| future::ready(inbound(m, max)));
    let sink = WsSink { inner: sink, last: None, close: None };
    session::run(s.router, stream, sink, peer, s.shutdown).await;
}

/// The session's frames as binary WebSocket messages. Closing sends a Close frame whose
/// status says why, from the last frame sent: a KICK or ERROR that ended the session gives
/// [`close_status`]; anything else is a normal closure (1000).
struct WsSink {
    inner: futures_util::stream::SplitSink<WebSocket, Message>,
    /// The last frame sent, kept (a reference count) to name the close status.
    last: Option<bytes::Bytes>,
    /// The Close frame, once made (it is sent once, then the sink closes).
    close: Option<Option<Message>>,
}

impl futures_util::Sink<Encoded> for WsSink {
    type Error = CodecError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Pin::new(&mut self.inner).poll_ready(cx).map_err(ws_error)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Encoded) -> Result<(), CodecError> {
        self.last = Some(item.0.clone());
        Pin::new(&mut self.inner).start_send(Message::Binary(item.0)).map_err(ws_error)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(ws_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        if self.close.is_none() {
            let (code, reason) = close_status(self.last.as_deref());
            self.close = Some(Some(Message::Close(Some(CloseFrame { code, reason: reason.into() }))));
        }
        if let Some(Some(_)) = &self.close {
            std::task::ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(ws_error)?;
            let close = self.close.as_mut().and_then(Option::take).expect("checked above");
            Pin::new(&mut self.inner).start_send(close).map_err(ws_error)?;
        }
        Pin::new(&mut self.inner).poll_close(cx).map_err(ws_error)
    }
}

fn ws_error(e: axum::Error) -> CodecError {
    CodecError::Io(io::Error::other(e))
}

/// The WebSocket close status for a session whose last frame was `last`: a KICK or ERROR
/// (the reason it was closed) gives `4000 + its ErrorCode number` and the code's name
/// (`4016 idle_timeout`), except `SHUTTING_DOWN` (1001 going away) and `FRAME_TOO_LARGE`
/// (1009 message too big); anything else is 1000 (normal closure).
pub fn close_status(last: Option<&[u8]>) -> (u16, String) {
    let code = last.and_then(|b| decode_message(b).ok()).and_then(|f| match f.body {
        Body::Kick { code, .. } | Body::Error { code, .. } => Some(code),
        _ => None,
    });
    match code {
        None => (close_code::NORMAL, "closed".into()),
        Some(ErrorCode::ShuttingDown) => (close_code::AWAY, ErrorCode::ShuttingDown.as_str().into()),
        Some(ErrorCode::FrameTooLarge) => (close_code::SIZE, ErrorCode::FrameTooLarge.as_str().into()),
        Some(code) => (4000 + u16::try_from(code.number()).unwrap_or(0), code.as_str().into()),
    }
}

/// Maps one WebSocket message onto the session's frame stream.
fn inbound(msg: Result<Message, axum::Error>, max: usize) -> Option<Inbound> {
    match msg {
        Ok(Message::Binary(bytes)) => Some(Ok(decode_message(&bytes))),
        Ok(Message::Text(_)) => Some(Ok(Err(FrameError::TextMessage))),
        // Control frames are answered by tungstenite itself; Close ends the stream next.
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => None,
        Err(e) => Some(Err(too_large(&e, max).unwrap_or_else(|| CodecError::Io(io::Error::other(e))))),
    }
}

/// tungstenite's "Message too long: SIZE > MAX", recognised by its text: axum wraps the
/// error in its own opaque type and its tungstenite version is not ours to name.
fn too_large(e: &axum::Error, max: usize) -> Option<CodecError> {
    let text = e.to_string();
    let rest = text.split("Message too long: ").nth(1)?;
    let len = rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(max as u64 + 1);
    Some(CodecError::TooLarge { len, max })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn close_status_names_the_reason() {
        let kick =
            |code| cim_proto::encode_message(cim_proto::Frame::push(Body::Kick { code, reason: "x".into() }));
        assert_eq!(close_status(None), (1000, "closed".into()));
        assert_eq!(close_status(Some(&kick(ErrorCode::IdleTimeout))), (4016, "idle_timeout".into()));
        assert_eq!(close_status(Some(&kick(ErrorCode::Replaced))), (4015, "replaced".into()));
        assert_eq!(close_status(Some(&kick(ErrorCode::ShuttingDown))), (1001, "shutting_down".into()));
        let error = cim_proto::encode_message(cim_proto::Frame::error(3, ErrorCode::FrameTooLarge, "big"));
        assert_eq!(close_status(Some(&error)), (1009, "frame_too_large".into()));
        let delivery = cim_proto::encode_message(cim_proto::Frame::new(1, Body::Pong));
        assert_eq!(close_status(Some(&delivery)), (1000, "closed".into()));
    }

    #[test]
    fn origin_allowlist() {
        let none: &[String] = &[];
        assert!(check_origin(&headers(None, "chat:8080"), none).is_ok());
        assert!(check_origin(&headers(Some("http://chat:8080"), "chat:8080"), none).is_ok());
        assert!(check_origin(&headers(Some("https://chat:8080"), "chat:8080"), none).is_ok());
        assert!(check_origin(&headers(Some("http://evil.example"), "chat:8080"), none).is_err());
        assert!(check_origin(&headers(Some("null"), "chat:8080"), none).is_err());
        let list = ["https://app.example".to_owned()];
        assert!(check_origin(&headers(Some("https://app.example"), "chat:8080"), &list).is_ok());
        assert!(check_origin(&headers(Some("http://chat:8080"), "chat:8080"), &list).is_err());
    }
}
