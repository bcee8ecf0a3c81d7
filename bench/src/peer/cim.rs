//! cim over raw TCP: `POST /login` on the route API (pooled keep-alive HTTP connections, so
//! thousands of logins do not exhaust ephemeral ports), then a LOGIN frame, then frames
//! written in batches by the caller and read by one task per connection. With [`Tokens`],
//! every user logs in with an HS256 token of its own, minted at login (outside the measured
//! sends), as with a host that verifies tokens.
//!
//! At least once ([`Delivery::AtLeastOnce`]): every send carries a `client_msg_id` (as a
//! client that resends after a lost connection must), the server's ACK of a send (the
//! message is in the log) goes to `Hooks::on_acked`, and a receiver acknowledges the inbox
//! positions it received, batched as the SDK does: after [`ACK_EVERY`] deliveries or every
//! [`ACK_INTERVAL`], whichever comes first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use cim_host::auth::secret::Secret;
use cim_host::auth::token::{MintRequest, mint};
use cim_proto::{Body, Frame, FrameCodec, MessageKind, Positions};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;
use tokio_util::codec::{Encoder, FramedRead};

use super::{Delivery, Dest, Hooks};

/// How long one login (route call, connect, LOGIN → LOGIN_ACK) may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(20);
/// At least once: a receiver acknowledges after this many deliveries…
pub const ACK_EVERY: u64 = 64;
/// …or this long after its last acknowledgement, whichever comes first.
pub const ACK_INTERVAL: Duration = Duration::from_millis(100);

/// User tokens for a host with authentication on: signed with its HS256 secret.
#[derive(Debug)]
pub struct Tokens {
    pub secret: Secret,
    /// The `iss` claim (the host's `--auth-issuer`), if it checks one.
    pub issuer: Option<String>,
    pub ttl: Duration,
}

impl Tokens {
    /// A token for user `id` named `name`.
    fn mint(&self, id: u64, name: &str) -> anyhow::Result<String> {
        let request = MintRequest {
            user_id: id,
            name: Some(name.to_owned()),
            ttl: self.ttl,
            issuer: self.issuer.clone(),
            ..MintRequest::default()
        };
        mint(&self.secret, &request).with_context(|| format!("minting a token for user {id}"))
    }
}

/// The route API client: one keep-alive connection pool for all logins of a run.
#[derive(Debug, Clone)]
pub struct RouteClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    tokens: Option<Arc<Tokens>>,
}

/// Where a user should connect, and the token to log in with (empty without tokens).
pub struct Routed {
    tcp_addr: String,
    token: String,
}

#[derive(Deserialize)]
struct RouteAnswer {
    tcp_addr: String,
}

impl RouteClient {
    pub fn new(base: String, tokens: Option<Arc<Tokens>>) -> RouteClient {
        let http = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build_http();
        RouteClient { base, http, tokens }
    }

    /// `GET /metrics`: every counter, summed over its labels, by name.
    pub async fn metrics(&self) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let url = format!("{}/metrics", self.base);
        let uri: hyper::Uri = url.parse()?;
        let res = self.http.get(uri).await.with_context(|| format!("GET {url}"))?;
        let bytes = res.into_body().collect().await?.to_bytes();
        let mut out = std::collections::BTreeMap::new();
        for line in String::from_utf8_lossy(&bytes).lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let name = name.split('{').next().unwrap_or(name).to_owned();
            if let Ok(v) = value.trim().parse::<f64>() {
                *out.entry(name).or_insert(0.0) += v;
            }
        }
        Ok(out)
    }

    /// `POST /login` (with a fresh token as `Authorization: Bearer` when tokens are on): the
    /// TCP address user `id` should connect to.
    pub async fn login(&self, id: u64, name: &str) -> anyhow::Result<Routed> {
        let url = format!("{}/login", self.base);
        let token = match &self.tokens {
            Some(tokens) => tokens.mint(id, name)?,
            None => String::new(),
        };
        let body = serde_json::json!({ "user_id": id, "user_name": name }).to_string();
        let mut req = hyper::Request::post(&url).header(hyper::header::CONTENT_TYPE, "application/json");
        if !token.is_empty() {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let res = self.http.request(req).await.with_context(|| format!("POST {url}"))?;
        let status = res.status();
        let bytes =
            res.into_body().collect().await.with_context(|| format!("POST {url}: reading"))?.to_bytes();
        if !status.is_success() {
            bail!("POST {url} for user {id}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        let answer: RouteAnswer = serde_json::from_slice(&bytes)
            .with_context(|| format!("POST {url}: unexpected answer {}", String::from_utf8_lossy(&bytes)))?;
        Ok(Routed { tcp_addr: answer.tcp_addr, token })
    }
}

/// One logged-in cim connection.
#[derive(Debug)]
pub struct Conn {
    /// Shared with the acknowledging task of an at-least-once receiver.
    writer: Arc<Mutex<OwnedWriteHalf>>,
    codec: FrameCodec,
    buf: BytesMut,
    next_request: u64,
    delivery: Delivery,
    closing: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    acker: Option<JoinHandle<()>>,
}

/// What an at-least-once receiver has received and not yet acknowledged.
#[derive(Debug, Default)]
struct Received {
    inbox: AtomicU64,
    since_ack: AtomicU64,
    wake: Notify,
}

impl Conn {
    pub async fn connect(
        route: &RouteClient,
        id: u64,
        hooks: Hooks,
        delivery: Delivery,
    ) -> anyhow::Result<Conn> {
        tokio::time::timeout(LOGIN_TIMEOUT, Self::login(route, id, hooks, delivery))
            .await
            .with_context(|| format!("user {id}: no login within {LOGIN_TIMEOUT:?}"))?
    }

    async fn login(route: &RouteClient, id: u64, hooks: Hooks, delivery: Delivery) -> anyhow::Result<Conn> {
        let name = format!("b{id}");
        let Routed { tcp_addr: addr, token } = route.login(id, &name).await?;
        let stream = TcpStream::connect(&addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, mut writer) = stream.into_split();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(4096);
        codec.encode(Frame::new(1, Body::login(id, name, token)), &mut buf)?;
        writer.write_all_buf(&mut buf).await?;
        let mut frames = FramedRead::new(read, FrameCodec::default());
        match frames.next().await {
            Some(Ok(Ok(Frame { body: Body::LoginAck(_), .. }))) => {}
            Some(Ok(Ok(Frame { body: Body::Error { code, message, .. }, .. }))) => {
                bail!("user {id}: login refused: {code}: {message}")
            }
            other => bail!("user {id}: expected LOGIN_ACK, got {other:?}"),
        }
        let closing = Arc::new(AtomicBool::new(false));
        let writer = Arc::new(Mutex::new(writer));
        let (received, acker) = match delivery {
            Delivery::AtMostOnce => (None, None),
            Delivery::AtLeastOnce => {
                let received = Arc::new(Received::default());
                let acker = tokio::spawn(ack_loop(received.clone(), writer.clone()));
                (Some(received), Some(acker))
            }
        };
        let reader = tokio::spawn(read_loop(frames, hooks, received, closing.clone(), id));
        Ok(Conn { writer, codec, buf, next_request: 2, delivery, closing, reader, acker })
    }

    /// Writes one frame per text, in one `write`.
    pub async fn send(&mut self, dest: Dest, texts: Vec<String>) -> anyhow::Result<()> {
        for text in texts {
            // Unique per connection, and users are unique per run.
            let client_msg_id = match self.delivery {
                Delivery::AtMostOnce => String::new(),
                Delivery::AtLeastOnce => format!("m{}", self.next_request),
            };
            let body = match dest {
                Dest::User(to) => Body::PrivateSend { to, text, client_msg_id },
                Dest::Group => Body::GroupSend { text, client_msg_id },
            };
            self.codec.encode(Frame::new(self.next_request, body), &mut self.buf)?;
            self.next_request += 1;
        }
        self.writer.lock().await.write_all_buf(&mut self.buf).await?;
        Ok(())
    }

    pub async fn close(mut self) {
        self.closing.store(true, Ordering::Relaxed);
        if let Some(acker) = self.acker.take() {
            acker.abort();
        }
        // A half-close: the server sees end-of-stream and ends the session.
        let _ = self.writer.lock().await.shutdown().await;
        // The server closes its side when it sees ours; do not wait long for it.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await.is_err() {
            self.reader.abort();
        }
    }
}

/// Acknowledges what the reader received: after `ACK_EVERY` deliveries or every `ACK_INTERVAL`.
async fn ack_loop(received: Arc<Received>, writer: Arc<Mutex<OwnedWriteHalf>>) {
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut acked = 0;
    loop {
        tokio::select! {
            () = received.wake.notified() => {}
            _ = tick.tick() => {}
        }
        let inbox = received.inbox.load(Ordering::Acquire);
        if inbox <= acked {
            continue;
        }
        received.since_ack.store(0, Ordering::Relaxed);
        let ack = Body::Ack { message_id: 0, stored: false, received: Some(Positions { inbox, group: 0 }) };
        if codec.encode(Frame::push(ack), &mut buf).is_err()
            || writer.lock().await.write_all_buf(&mut buf).await.is_err()
        {
            return;
        }
        acked = inbox;
        tick.reset();
    }
}
impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(acker) = &self.acker {
            acker.abort();
        }
    }
}

async fn read_loop(
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    hooks: Hooks,
    received: Option<Arc<Received>>,
    closing: Arc<AtomicBool>,
    id: u64,
) {
    while let Some(item) = frames.next().await {
        match item {
            Ok(Ok(frame)) => match frame.body {
                Body::Delivery(d) => {
                    if let Some(f) = &hooks.on_message {
                        f(d.text.as_bytes());
                    }
                    if let Some(r) = &received
                        && d.kind == MessageKind::Private
                    {
                        r.inbox.fetch_max(d.position, Ordering::AcqRel);
                        if r.since_ack.fetch_add(1, Ordering::Relaxed) + 1 >= ACK_EVERY {
                            r.wake.notify_one();
                        }
                    }
                }
                // A send accepted (in the log).
                Body::Ack { message_id, received: None, .. } if message_id != 0 => hooks.acked(),
                Body::Error { code, message, .. } => {
                    hooks.errors.push(format!("user {id}: request {}: {code}: {message}", frame.request_id));
                    if let Some(f) = &hooks.on_failed {
                        f();
                    }
                }
                Body::Kick { code, reason } if !closing.load(Ordering::Relaxed) => {
                    hooks.errors.push(format!("user {id}: kicked: {code}: {reason}"));
                }
                // ACKs of our sends, PONGs, a kick while we close: nothing to do.
                _ => {}
            },
            Ok(Err(e)) => hooks.errors.push(format!("user {id}: bad frame from the server: {e}")),
            Err(e) => {
                if !closing.load(Ordering::Relaxed) {
                    hooks.errors.push(format!("user {id}: connection failed: {e}"));
                }
                return;
            }
        }
    }
    if !closing.load(Ordering::Relaxed) {
        hooks.errors.push(format!("user {id}: the server closed the connection"));
    }
}
