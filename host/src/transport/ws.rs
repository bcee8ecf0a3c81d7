//! The WebSocket endpoint (`GET /ws` on the HTTP port): one envelope per binary message.

use std::io;

use cim_proto::{CodecError, Encoded, FrameError, decode_message};
use futures_util::{SinkExt, StreamExt, future};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;

use super::Sessions;
use crate::session::{self, Inbound};

/// Why an upgrade request was refused.
#[derive(Debug)]
pub enum UpgradeError {
    NotWebSocket,
    Full,
}

/// Answers the upgrade request and runs the session on the upgraded connection.
pub fn upgrade(
    mut req: Request<Incoming>,
    peer: std::net::SocketAddr,
    sessions: &Sessions,
) -> Result<Response<http_body_util::Full<bytes::Bytes>>, UpgradeError> {
    let is_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return Err(UpgradeError::NotWebSocket);
    };
    let accept = derive_accept_key(key.as_bytes());
    let slot = sessions.slot().ok_or(UpgradeError::Full)?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let s = sessions.clone();
    sessions.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let max = s.router.config().max_frame;
        let config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        let (sink, stream) = ws.split();
        let stream = stream.filter_map(|m| future::ready(inbound(m)));
        let sink = sink
            .sink_map_err(|e| CodecError::Io(io::Error::other(e)))
            .with(|e: Encoded| future::ready(Ok::<_, CodecError>(Message::Binary(e.0))));
        session::run(s.router, stream, Box::pin(sink), peer, s.shutdown).await;
        drop(slot);
    });
    let mut resp = Response::new(http_body_util::Full::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(resp)
}

/// Maps one WebSocket message onto the session's frame stream.
fn inbound(msg: Result<Message, WsError>) -> Option<Inbound> {
    match msg {
        Ok(Message::Binary(bytes)) => Some(Ok(decode_message(&bytes))),
        Ok(Message::Text(_)) => Some(Ok(Err(FrameError::TextMessage))),
        // Control frames are answered by tungstenite itself; Close ends the stream next.
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => None,
        Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
            Some(Err(CodecError::TooLarge { len: size as u64, max: max_size }))
        }
        Err(e) => Some(Err(CodecError::Io(io::Error::other(e)))),
    }
}
