//! Opening a TCP or WebSocket connection and seeing it as a sink and a stream of [`Frame`]s.

use std::io;
use std::pin::Pin;

use cim_proto::{CodecError, Frame, FrameCodec, FrameError, decode_message, encode_message};
use futures_util::future::ready;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::config::Transport;
use crate::error::ClientError;
use crate::route::RouteInfo;

/// The sending half of a connection.
pub(crate) type FrameSink = Pin<Box<dyn Sink<Frame, Error = io::Error> + Send>>;

/// The receiving half of a connection. An outer error ends the connection; an inner one
/// is a single frame that could not be decoded, and the stream goes on after it.
pub(crate) type FrameStream = Pin<Box<dyn Stream<Item = io::Result<Result<Frame, FrameError>>> + Send>>;

/// Connects to the node named by `route` over `transport`.
pub(crate) async fn connect(
    transport: Transport,
    route: &RouteInfo,
    max_frame: usize,
) -> Result<(FrameSink, FrameStream), ClientError> {
    match transport {
        Transport::Tcp => {
            let stream = TcpStream::connect(&route.tcp_addr).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot connect to {}: {e}", route.tcp_addr))
            })?;
            stream.set_nodelay(true)?;
            Ok(framed(stream, max_frame))
        }
        Transport::WebSocket => {
            let config =
                WebSocketConfig::default().max_message_size(Some(max_frame)).max_frame_size(Some(max_frame));
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(route.ws_url.as_str(), Some(config), true)
                    .await
                    .map_err(|e| io::Error::other(format!("cannot connect to {}: {e}", route.ws_url)))?;
            Ok(websocket(ws))
        }
    }
}

/// Length-delimited frames on a byte stream (TCP, or an in-memory pipe in tests).
pub(crate) fn framed<T>(io: T, max_frame: usize) -> (FrameSink, FrameStream)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let codec = FrameCodec::new(max_frame);
    let (read, write) = tokio::io::split(io);
    let sink = SinkExt::<Frame>::sink_map_err(FramedWrite::new(write, codec.clone()), codec_error);
    let stream = FramedRead::new(read, codec).map(|item| item.map_err(codec_error));
    (Box::pin(sink), Box::pin(stream))
}

/// One envelope per binary WebSocket message.
pub(crate) fn websocket<S>(ws: WebSocketStream<S>) -> (FrameSink, FrameStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let sink = sink
        .with(|frame: Frame| ready(Ok::<_, tungstenite::Error>(Message::binary(encode_message(frame)))))
        .sink_map_err(ws_error);
    let stream = stream.filter_map(|message| {
        ready(match message {
            Ok(Message::Binary(bytes)) => Some(Ok(decode_message(&bytes))),
            Ok(Message::Text(text)) => {
                tracing::warn!(len = text.len(), "ignoring a text WebSocket message");
                None
            }
            // Control messages are answered by tungstenite itself; a Close ends the stream.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => None,
            Err(e) => Some(Err(ws_error(e))),
        })
    });
    (Box::pin(sink), Box::pin(stream))
}

fn codec_error(e: CodecError) -> io::Error {
    match e {
        CodecError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::ConnectionAborted, "WebSocket closed")
        }
        other => io::Error::other(format!("WebSocket: {other}")),
    }
}
