//! Test doubles: a recording handler, a scripted route API, and a fake node (TCP or WebSocket).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cim_proto::{Body, Delivery, Frame, MessageKind, User};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::handler::{ClientEvent, MessageHandler};
use crate::transport::{FrameSink, FrameStream, framed, websocket};

/// How long a test waits for something that should happen quickly.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Records deliveries and events.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    events: Mutex<Vec<ClientEvent>>,
}

impl Recorder {
    pub(crate) fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    pub(crate) fn events(&self) -> Vec<ClientEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits (real time, with a deadline) until `done` holds for the recorded events.
    pub(crate) async fn wait_for_events(&self, done: impl Fn(&[ClientEvent]) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(&self.events()) {
            assert!(tokio::time::Instant::now() < deadline, "events so far: {:?}", self.events());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn wait_for_deliveries(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.deliveries().len() < count {
            assert!(tokio::time::Instant::now() < deadline, "got {:?}", self.deliveries());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl MessageHandler for Recorder {
    fn on_delivery(&self, delivery: &Delivery) {
        self.deliveries.lock().unwrap().push(delivery.clone());
    }

    fn on_event(&self, event: &ClientEvent) {
        self.events.lock().unwrap().push(event.clone());
    }
}

/// A private message from user `from`.
pub(crate) fn delivery(from: u64, text: &str) -> Delivery {
    Delivery {
        message_id: 1000 + from,
        sender: User { id: from, name: format!("user{from}") },
        kind: MessageKind::Private,
        text: text.into(),
        timestamp_ms: 1_700_000_000_000,
        position: 0,
        replayed: false,
    }
}

/// The next well-formed frame on `stream`; panics on anything else.
pub(crate) async fn next_frame(stream: &mut FrameStream) -> Frame {
    match stream.next().await {
        Some(Ok(Ok(frame))) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// A route API that answers each `POST` with the next scripted `(status, body)`, repeating
/// the last one once the script runs out, and records the requests it saw.
#[derive(Debug)]
pub(crate) struct FakeRoute {
    pub(crate) url: String,
    requests: Arc<Mutex<Vec<String>>>,
    script: Arc<Mutex<VecDeque<(u16, String)>>>,
}

impl FakeRoute {
    pub(crate) async fn start(script: Vec<(u16, String)>) -> FakeRoute {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        tokio::spawn({
            let requests = requests.clone();
            let script = script.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let request = read_request(stream).await;
                    let Some((mut stream, text)) = request else { continue };
                    requests.lock().unwrap().push(text);
                    let (status, body) = {
                        let mut script = script.lock().unwrap();
                        if script.len() > 1 { script.pop_front() } else { script.front().cloned() }
                    }
                    .unwrap_or((500, "{}".into()));
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
        FakeRoute { url, requests, script }
    }

    /// Replaces the rest of the script.
    pub(crate) fn answer(&self, script: Vec<(u16, String)>) {
        *self.script.lock().unwrap() = VecDeque::from(script);
    }

    pub(crate) fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1 request (headers and a `content-length` body) as text.
async fn read_request(mut stream: TcpStream) -> Option<(TcpStream, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some((stream, text));
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A node that hands each accepted connection to the test.
#[derive(Debug)]
pub(crate) struct FakeNode {
    pub(crate) tcp_addr: String,
    pub(crate) ws_url: String,
    connections: mpsc::Receiver<(FrameSink, FrameStream)>,
}

impl FakeNode {
    pub(crate) async fn start(websocket_node: bool) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, connections) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = if websocket_node {
                    match tokio_tungstenite::accept_async(stream).await {
                        Ok(ws) => websocket(ws),
                        Err(_) => continue,
                    }
                } else {
                    framed(stream, cim_proto::DEFAULT_MAX_FRAME)
                };
                if tx.send(connection).await.is_err() {
                    return;
                }
            }
        });
        FakeNode { tcp_addr: addr.to_string(), ws_url: format!("ws://{addr}/ws"), connections }
    }

    /// The route API's answer that sends clients here as `node_id`.
    pub(crate) fn route_answer(&self, node_id: &str) -> (u16, String) {
        let body = serde_json::json!({
            "node_id": node_id, "tcp_addr": self.tcp_addr, "ws_url": self.ws_url,
        });
        (200, body.to_string())
    }

    pub(crate) async fn accept(&mut self) -> (FrameSink, FrameStream) {
        tokio::time::timeout(PATIENCE, self.connections.recv()).await.unwrap().unwrap()
    }

    /// Accepts a connection, reads its LOGIN and accepts it as `node_id`.
    pub(crate) async fn accept_login(&mut self, node_id: &str) -> (FrameSink, FrameStream, Frame) {
        self.accept_login_as(node_id, User { id: 0, name: String::new() }, 0).await
    }

    /// Like [`FakeNode::accept_login`], as a node that verifies tokens: binds `user` and
    /// ends the connection at `token_expires_at_ms` (0: never).
    pub(crate) async fn accept_login_as(
        &mut self,
        node_id: &str,
        user: User,
        token_expires_at_ms: u64,
    ) -> (FrameSink, FrameStream, Frame) {
        let (mut sink, mut stream) = self.accept().await;
        let login = next_frame(&mut stream).await;
        assert!(matches!(login.body, Body::Login(_)), "{login:?}");
        let ack = Body::LoginAck(cim_proto::LoginAck {
            node_id: node_id.into(),
            heartbeat_secs: 60,
            user,
            token_expires_at_ms,
            ..Default::default()
        });
        sink.send(Frame::new(login.request_id, ack)).await.unwrap();
        (sink, stream, login)
    }
}
