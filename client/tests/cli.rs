//! The `cim` binary against an in-process fake route API and fake node: stdout lines,
//! stdin commands through a pipe, exit statuses.

// Test helpers outside `#[test]` functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use cim_proto::{Body, Delivery, ErrorCode, Frame, FrameCodec, MessageKind, User};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;
use tokio_util::codec::Framed;

const PATIENCE: Duration = Duration::from_secs(10);

/// Serves every `POST /login` with `(status, body)`; returns the route URL.
async fn fake_route(status: u16, body: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // The request is small and sent at once; reading once is enough for a fake.
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    url
}

type Conn = Framed<TcpStream, FrameCodec>;

struct Cli {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Cli {
    fn start(route: &str, extra: &[&str]) -> Cli {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cim"))
            .args(["--route", route, "--user-id", "1", "--name", "alice"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Cli { child, stdin, stdout }
    }

    async fn line(&mut self) -> String {
        timeout(PATIENCE, self.stdout.next_line()).await.unwrap().unwrap().unwrap()
    }

    async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn exit_code(&mut self) -> i32 {
        timeout(PATIENCE, self.child.wait()).await.unwrap().unwrap().code().unwrap()
    }
}

/// A send with its client_msg_id checked and removed.
fn without_id(body: Body) -> Body {
    match body {
        Body::PrivateSend { to, text, client_msg_id } if !client_msg_id.is_empty() => Body::private(to, text),
        Body::GroupSend { text, client_msg_id } if !client_msg_id.is_empty() => Body::group(text),
        other => panic!("expected a send with a client_msg_id, got {other:?}"),
    }
}

async fn next(conn: &mut Conn) -> Frame {
    timeout(PATIENCE, conn.next()).await.unwrap().unwrap().unwrap().unwrap()
}

/// A fake node; the route answer that points to it.
async fn fake_node() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = serde_json::json!({
        "node_id": "node-1", "tcp_addr": addr.to_string(), "ws_url": format!("ws://{addr}/ws"),
    });
    (listener, answer.to_string())
}

async fn accept_login(listener: &TcpListener) -> Conn {
    let (stream, _) = timeout(PATIENCE, listener.accept()).await.unwrap().unwrap();
    let mut conn = Framed::new(stream, FrameCodec::default());
    let login = next(&mut conn).await;
    assert_eq!(login.body, Body::login(1, "alice".into(), String::new()));
    let ack = Body::LoginAck(cim_proto::LoginAck {
        node_id: "node-1".into(),
        heartbeat_secs: 60,
        user: cim_proto::User { id: 1, name: "alice".into() },
        ..Default::default()
    });
    conn.send(Frame::new(login.request_id, ack)).await.unwrap();
    conn
}

#[tokio::test]
async fn chat_through_a_pipe() {
    let (node, answer) = fake_node().await;
    let route = fake_route(200, answer).await;
    let mut cli = Cli::start(&route, &[]);
    let mut conn = accept_login(&node).await;
    assert_eq!(cli.line().await, "logged in as alice(1) on node node-1");

    cli.type_line("").await;
    cli.type_line("2;;hi bob").await;
    let send = next(&mut conn).await;
    assert_eq!(without_id(send.body), Body::private(2, "hi bob".into()));
    conn.send(Frame::new(send.request_id, Body::ack(10))).await.unwrap();

    // To an offline user: stored, and the terminal says so.
    cli.type_line("3;;see you").await;
    let send = next(&mut conn).await;
    let stored = Body::Ack { message_id: 11, stored: true, received: None };
    conn.send(Frame::new(send.request_id, stored)).await.unwrap();
    assert_eq!(cli.line().await, "(user 3 is offline: stored, delivered when they log in)");

    cli.type_line("9;;anyone?").await;
    let send = next(&mut conn).await;
    let error = Frame::error(send.request_id, ErrorCode::UserOffline, "user 9 is not online");
    conn.send(error).await.unwrap();
    assert_eq!(cli.line().await, "error: user 9 is not online");

    cli.type_line(":olu").await;
    let request = next(&mut conn).await;
    assert_eq!(request.body, Body::OnlineRequest);
    let users = vec![User { id: 1, name: "alice".into() }, User { id: 2, name: "bob".into() }];
    conn.send(Frame::new(request.request_id, Body::OnlineResponse { users })).await.unwrap();
    assert_eq!(cli.line().await, "1 alice");
    assert_eq!(cli.line().await, "2 bob");

    cli.type_line("hello all").await;
    let send = next(&mut conn).await;
    assert_eq!(without_id(send.body), Body::group("hello all".into()));
    conn.send(Frame::new(send.request_id, Body::ack(11))).await.unwrap();

    for (message_id, kind, text) in [(12, MessageKind::Group, "hi alice"), (13, MessageKind::Private, "psst")]
    {
        let delivery = Delivery {
            message_id,
            sender: User { id: 2, name: "bob".into() },
            kind,
            text: text.into(),
            timestamp_ms: 0,
            position: 0,
            replayed: false,
        };
        conn.send(Frame::push(Body::Delivery(delivery))).await.unwrap();
    }
    assert_eq!(cli.line().await, "[group] bob(2): hi alice");
    assert_eq!(cli.line().await, "[private] bob(2): psst");

    cli.type_line(":nope").await;
    assert!(cli.line().await.starts_with("error: unknown command :nope"));

    // End of input quits cleanly and closes the connection.
    drop(cli.stdin.take());
    assert_eq!(cli.exit_code().await, 0);
    assert!(timeout(PATIENCE, conn.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn quit_command_exits_zero() {
    let (node, answer) = fake_node().await;
    let route = fake_route(200, answer).await;
    let mut cli = Cli::start(&route, &[]);
    let _conn = accept_login(&node).await;
    cli.line().await;
    cli.type_line(":q").await;
    assert_eq!(cli.exit_code().await, 0);
}

#[tokio::test]
async fn duplicate_login_exits_with_status_2() {
    let body = r#"{"error":"duplicate_login","message":"user 1 is already online"}"#;
    let route = fake_route(409, body.into()).await;
    let mut cli = Cli::start(&route, &[]);
    let line = cli.line().await;
    assert!(line.starts_with("error: ") && line.contains("already online"), "{line}");
    assert_eq!(cli.exit_code().await, 2);
}

#[tokio::test]
async fn kicked_for_a_duplicate_login_exits_with_status_2() {
    let (node, answer) = fake_node().await;
    let route = fake_route(200, answer).await;
    let mut cli = Cli::start(&route, &[]);
    let mut conn = accept_login(&node).await;
    cli.line().await;
    let kick = Body::Kick { code: ErrorCode::DuplicateLogin, reason: "logged in elsewhere".into() };
    conn.send(Frame::push(kick)).await.unwrap();
    let line = cli.line().await;
    assert!(line.starts_with("error: ") && line.contains("logged in elsewhere"), "{line}");
    assert_eq!(cli.exit_code().await, 2);
}

#[tokio::test]
async fn unreachable_route_exits_with_status_1() {
    // A port that was just free: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut cli = Cli::start(&format!("http://127.0.0.1:{port}"), &["--timeout", "2"]);
    assert!(cli.line().await.starts_with("error: login failed: route API"));
    assert_eq!(cli.exit_code().await, 1);
}
