//! Helpers shared by the end-to-end tests: build and start real `cim-host` processes on
//! port 0, and talk to them as clients do (raw protocol frames over TCP or WebSocket, JSON
//! over HTTP). Every wait has a deadline; nothing sleeps to synchronise.
#![allow(dead_code)]

/// A Redis Cluster of the test's own (shared with the host's unit tests).
#[path = "../../host/src/store/redis/test_cluster.rs"]
pub mod redis_cluster;

pub mod auth;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cim_proto::{Body, ErrorCode, Frame, FrameCodec, FrameError, decode_message, encode_message};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::Framed;

/// How long any single expected event may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The workspace's target directory and profile, from where this test binary lives
/// (`target/<profile>/deps/<test>`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_path_buf()
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds every component, fixtures included, once per test process (a no-op when they
/// are up to date). Returns the directory of the `.wasm` files.
pub fn components() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = root().join("components");
    BUILT.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .current_dir(&dir)
            .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
            .status()
            .expect("running cargo build for the components");
        assert!(status.success(), "building the components failed (is the wasm32-wasip2 target installed?)");
    });
    dir.join("target/wasm32-wasip2/release")
}

/// The repository's spin.toml with its paths made absolute and `extra` appended, written
/// into `dir`; returns its path.
pub fn manifest_with(dir: &std::path::Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("spin.toml")).expect("spin.toml");
    let root = root().canonicalize().expect("repository root");
    let text = text
        .replace("source = \"components/", &format!("source = \"{}/components/", root.display()))
        .replace("workdir = \"components\"", &format!("workdir = \"{}/components\"", root.display()));
    let path = dir.join("spin.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).expect("write the manifest");
    path
}

/// Path to a component's built `.wasm` (`word_filter`, `loop_forever`, ...).
pub fn component(file_stem: &str) -> PathBuf {
    components().join(format!("{file_stem}.wasm"))
}

/// Path to a workspace binary, building the binaries once per test process (a no-op
/// when `cargo test` has already built them).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = target_profile_dir();
    BUILT.get_or_init(|| {
        let root = root();
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(&root).args([
            "build",
            "--quiet",
            "--bins",
            "-p",
            "cim-host",
            "-p",
            "cim-client",
            "-p",
            "cim-bench",
        ]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
    });
    dir.join(name)
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `cim-host up` process, killed on drop.
pub struct Host {
    pub child: Child,
    pub node_id: String,
    pub tcp: SocketAddr,
    pub http: SocketAddr,
    /// The admin API's own listener (`--admin-http`), when the host has one.
    pub admin: Option<SocketAddr>,
    /// The host's data directory (pushed components, compile cache).
    pub data_dir: std::sync::Arc<tempfile::TempDir>,
}

/// The admin token the tests' hosts use.
pub const ADMIN_TOKEN: &str = "test-admin-token";

impl Host {
    /// Starts a host on port 0 with the repository's spin.toml, a fresh data directory and
    /// extra arguments, and waits for its ready line.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Host> {
        Host::start_in(std::sync::Arc::new(tempfile::tempdir()?), extra).await
    }

    /// Like [`Host::start`], on an existing data directory (to test restarts).
    pub async fn start_in(
        data_dir: std::sync::Arc<tempfile::TempDir>,
        extra: &[&str],
    ) -> anyhow::Result<Host> {
        Host::start_with_env(data_dir, extra, &[]).await
    }

    /// Like [`Host::start_in`], with environment variables set for the host.
    pub async fn start_with_env(
        data_dir: std::sync::Arc<tempfile::TempDir>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Host> {
        Host::spawn(data_dir, &root().join("spin.toml"), extra, env).await
    }

    /// Like [`Host::start`], with another manifest.
    pub async fn start_with_manifest(manifest: &std::path::Path, extra: &[&str]) -> anyhow::Result<Host> {
        Host::spawn(std::sync::Arc::new(tempfile::tempdir()?), manifest, extra, &[]).await
    }

    async fn spawn(
        data_dir: std::sync::Arc<tempfile::TempDir>,
        manifest: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Host> {
        components();
        let mut cmd = Command::new(binary("cim-host"));
        cmd.args(["up", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--manifest")
            .arg(manifest)
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(extra);
        if !extra.contains(&"--admin-token") {
            cmd.args(["--admin-token", ADMIN_TOKEN]);
        }
        cmd.envs(env.iter().copied());
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning cim-host")?;
        let stdout = child.stdout.take().context("cim-host stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("cim-host did not print its ready line in time")??
            .context("cim-host exited before it was ready")?;
        // cim-host ready node=<id> tcp=<addr> http=<addr>
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
                .with_context(|| format!("no {key} in ready line {line:?}"))
        };
        let host = Host {
            node_id: field("node=")?,
            tcp: field("tcp=")?.parse()?,
            http: field("http=")?.parse()?,
            admin: field("admin=").ok().map(|a| a.parse()).transpose()?,
            child,
            data_dir,
        };
        // Keep draining stdout so the host never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(host)
    }

    pub fn route(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Asks the host to shut down (SIGTERM), as an operator or a container runtime would.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the host is running").to_string();
        let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// One HTTP request; returns the status and the body parsed as JSON (or as a string).
    pub async fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        http(self.http, method, path, body).await.expect("http request")
    }

    /// The ids in `GET /online` (asked with the tests' API key, which a host without one
    /// ignores).
    pub async fn online_ids(&self) -> Vec<u64> {
        let bearer = format!("Bearer {}", auth::API_KEY);
        let (status, _, body) = http_with(self.http, "GET", "/online", &[("authorization", &bearer)], None)
            .await
            .expect("http request");
        assert_eq!(status, 200, "{body}");
        body["users"].as_array().expect("users").iter().map(|u| u["id"].as_u64().expect("id")).collect()
    }

    /// Waits until `GET /online` is exactly `ids` (sorted).
    pub async fn wait_online(&self, ids: &[u64]) {
        wait_for(&format!("online users {ids:?}"), || async {
            (self.online_ids().await == ids).then_some(())
        })
        .await
    }
}

/// A minimal HTTP/1.1 client request.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

// --- HTTP with chosen headers (http_auth.rs and others) ---

/// One HTTP request with exactly `headers` (plus `host`); returns the status, the answer's
/// headers and its body as JSON (or as a string).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<(u16, hyper::HeaderMap, serde_json::Value)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, headers, value))
}

/// A client speaking raw protocol frames, over TCP or WebSocket.
pub enum RawClient {
    Tcp(Framed<TcpStream, FrameCodec>),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

impl RawClient {
    pub async fn tcp(host: &Host) -> RawClient {
        let stream = TcpStream::connect(host.tcp).await.expect("tcp connect");
        RawClient::Tcp(Framed::new(stream, FrameCodec::default()))
    }

    pub async fn ws(host: &Host) -> RawClient {
        let (ws, _) = tokio_tungstenite::connect_async(host.ws_url()).await.expect("ws connect");
        RawClient::Ws(Box::new(ws))
    }

    /// Connects and logs in; panics unless the login is acknowledged.
    pub async fn login_tcp(host: &Host, id: u64, name: &str) -> RawClient {
        let mut c = RawClient::tcp(host).await;
        c.login(id, name).await;
        c
    }

    pub async fn login_ws(host: &Host, id: u64, name: &str) -> RawClient {
        let mut c = RawClient::ws(host).await;
        c.login(id, name).await;
        c
    }

    /// Logs `id` in over TCP with `Login.presence` (PRESENCE frames pushed to it).
    pub async fn login_watching_presence(host: &Host, id: u64, name: &str) -> RawClient {
        let mut c = RawClient::tcp(host).await;
        let login =
            cim_proto::Login { user_id: id, user_name: name.into(), presence: true, ..Default::default() };
        c.send(Frame::new(1, Body::Login(login))).await;
        assert!(matches!(c.frame().await.body, Body::LoginAck(_)), "login ack for {id}");
        c
    }

    /// The next frame, which must be a PRESENCE push listing changes: (online ids, offline ids).
    pub async fn presence(&mut self) -> (Vec<u64>, Vec<u64>) {
        match self.frame().await {
            Frame { request_id: 0, body: Body::Presence { online, offline, resync: false } } => {
                (online.iter().map(|u| u.id).collect(), offline.iter().map(|u| u.id).collect())
            }
            other => panic!("expected a presence frame, got {other:?}"),
        }
    }

    pub async fn login(&mut self, id: u64, name: &str) {
        self.send(Frame::new(1, Body::login(id, name.into(), String::new()))).await;
        match self.recv().await {
            Some(Ok(Frame { request_id: 1, body: Body::LoginAck(_) })) => {}
            other => panic!("expected login ack for {id}, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        match self {
            RawClient::Tcp(f) => f.send(frame).await.expect("send frame"),
            RawClient::Ws(ws) => {
                ws.send(Message::Binary(encode_message(frame).into())).await.expect("send ws frame")
            }
        }
    }

    /// Sends raw bytes as they are (TCP: onto the stream; WebSocket: as one binary message).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match self {
            RawClient::Tcp(f) => {
                use tokio::io::AsyncWriteExt;
                f.get_mut().write_all(bytes).await.expect("write raw bytes")
            }
            RawClient::Ws(ws) => {
                ws.send(Message::Binary(bytes.to_vec().into())).await.expect("send ws bytes")
            }
        }
    }

    /// The next frame (`None` when the server closed the connection), within the deadline.
    pub async fn recv(&mut self) -> Option<Result<Frame, FrameError>> {
        tokio::time::timeout(DEADLINE, self.recv_any()).await.expect("timed out waiting for a frame")
    }

    async fn recv_any(&mut self) -> Option<Result<Frame, FrameError>> {
        match self {
            RawClient::Tcp(f) => match f.next().await {
                Some(Ok(item)) => Some(item),
                Some(Err(_)) | None => None,
            },
            RawClient::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => return Some(decode_message(&b)),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                    Some(Ok(_)) => continue,
                }
            },
        }
    }

    /// The next frame, which must be one.
    pub async fn frame(&mut self) -> Frame {
        match self.recv().await {
            Some(Ok(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Sends a request and returns its answer (skipping pushes such as deliveries).
    pub async fn request(&mut self, id: u64, body: Body) -> Body {
        self.send(Frame::new(id, body)).await;
        loop {
            let f = self.frame().await;
            if f.request_id == id {
                return f.body;
            }
        }
    }

    /// The next delivery's (sender id, text), skipping nothing else.
    pub async fn delivery(&mut self) -> cim_proto::Delivery {
        match self.frame().await.body {
            Body::Delivery(d) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Waits for the server to close the connection, returning the frames it sent first.
    pub async fn closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(item) = self.recv().await {
            if let Ok(f) = item {
                frames.push(f);
            }
        }
        frames
    }

    /// Asserts that nothing arrives within a short quiet period (for "only the receiver
    /// gets it" checks; the positive case is checked first, so this is not a sync sleep).
    pub async fn assert_quiet(&mut self, period: Duration) {
        if let Ok(item) = tokio::time::timeout(period, self.recv_any()).await {
            panic!("expected nothing, got {item:?}");
        }
    }
}

/// Expects an error frame with `code`.
pub fn expect_error(body: Body, code: ErrorCode) -> String {
    match body {
        Body::Error { code: c, message, .. } if c == code => message,
        other => panic!("expected error {code}, got {other:?}"),
    }
}
pub mod chaos_client;
pub mod cluster;
pub mod proxy;
pub mod terminal;
