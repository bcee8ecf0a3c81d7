//! Sessions over WebSocket: the same protocol, one envelope per binary message.

mod common;

use cim_proto::{Body, ErrorCode, Frame, MessageKind};
use common::{Host, RawClient, expect_error};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_and_tcp_clients_chat() {
    let host = Host::start(&[]).await.unwrap();
    let mut web = RawClient::login_ws(&host, 1, "web").await;
    let mut term = RawClient::login_tcp(&host, 2, "term").await;

    assert!(matches!(web.request(2, Body::private(2, "from the browser".into())).await, Body::Ack { .. }));
    let d = term.delivery().await;
    assert_eq!(
        (d.kind, d.sender.name.as_str(), d.text.as_str()),
        (MessageKind::Private, "web", "from the browser")
    );

    assert!(matches!(term.request(3, Body::group("to the group".into())).await, Body::Ack { .. }));
    assert_eq!(web.delivery().await.text, "to the group");
    assert!(matches!(web.request(4, Body::Ping).await, Body::Pong));
}

#[tokio::test]
async fn text_and_garbage_messages_get_errors_and_the_session_goes_on() {
    let host = Host::start(&[]).await.unwrap();
    let mut web = RawClient::login_ws(&host, 1, "web").await;
    let RawClient::Ws(ws) = &mut web else { unreachable!() };
    ws.send(Message::Text("hello?".into())).await.unwrap();
    let msg = expect_error(web.frame().await.body, ErrorCode::BadFrame);
    assert!(msg.contains("binary"), "{msg}");

    web.send_raw(&[0xff, 0xff, 0xff]).await;
    expect_error(web.frame().await.body, ErrorCode::BadFrame);
    assert!(matches!(web.request(5, Body::Ping).await, Body::Pong));
}

#[tokio::test]
async fn oversized_websocket_message_closes_that_connection_only() {
    let host = Host::start(&["--max-frame", "1024"]).await.unwrap();
    let mut big = RawClient::login_ws(&host, 1, "big").await;
    let mut other = RawClient::login_ws(&host, 2, "other").await;
    big.send_raw(&vec![0u8; 4096]).await;
    let frames = big.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::FrameTooLarge, .. }, .. }]),
        "{frames:?}"
    );
    host.wait_online(&[2]).await;
    assert!(matches!(other.request(2, Body::Ping).await, Body::Pong));
}

#[tokio::test]
async fn duplicate_login_over_websocket_is_refused() {
    let host = Host::start(&[]).await.unwrap();
    let _first = RawClient::login_tcp(&host, 1, "alice").await;
    let mut second = RawClient::ws(&host).await;
    second.send(Frame::new(1, Body::login(1, "alice".into(), String::new()))).await;
    let frames = second.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::DuplicateLogin, .. }, .. }]),
        "{frames:?}"
    );
}
