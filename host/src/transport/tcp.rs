//! The TCP listener: length-delimited protobuf frames.

use std::time::Duration;

use cim_proto::{ErrorCode, Frame, FrameCodec};
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{info, warn};

use super::Sessions;
use crate::session;

/// Initial read buffer of a connection; enough for a login frame.
const INITIAL_BUFFER: usize = 256;

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, sessions: Sessions) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = sessions.shutdown.cancelled() => break,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning, the condition clears as
                // connections close.
                warn!(error = %e, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let max_frame = sessions.router.config().max_frame;
        let Some(slot) = sessions.slot() else {
            sessions.tracker.spawn(refuse_full(socket, max_frame));
            continue;
        };
        let s = sessions.clone();
        sessions.tracker.spawn(async move {
            let (read, write) = socket.into_split();
            // Small initial buffers: most connections sit idle, and the buffers grow on demand
            // (the codec's default of 8 KiB each way dominated the cost of an idle connection).
            let stream = FramedRead::with_capacity(read, FrameCodec::new(max_frame), INITIAL_BUFFER);
            let mut sink = FramedWrite::new(write, FrameCodec::new(max_frame));
            *sink.write_buffer_mut() = bytes::BytesMut::new();
            session::run(s.router, stream, sink, peer, s.shutdown).await;
            drop(slot);
        });
    }
    info!("tcp listener stopped");
}

async fn refuse_full(socket: TcpStream, max_frame: usize) {
    let mut sink = FramedWrite::new(socket, FrameCodec::new(max_frame));
    let frame = Frame::error(0, ErrorCode::Unavailable, "the server is at its connection limit");
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
}
