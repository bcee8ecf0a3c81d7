//! The embedded store's message log on disk: what was acknowledged as stored survives the
//! host being killed.

mod common;

use cim_proto::Body;
use common::{Host, RawClient};

#[tokio::test]
async fn offline_messages_survive_a_killed_host() {
    let mut host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let texts = ["one", "two", "three"];
    let mut ids = Vec::new();
    for (n, text) in (10..).zip(texts) {
        match alice.request(n, Body::private(2, text.into())).await {
            Body::Ack { message_id, stored: true, .. } => ids.push(message_id),
            other => panic!("expected a stored ack for {text:?}, got {other:?}"),
        }
    }

    // SIGKILL: no shutdown, no flush; only what the log committed is left.
    host.child.kill().await.unwrap();
    drop(alice);
    let data_dir = host.data_dir.clone();
    drop(host);

    let host = Host::start_in(data_dir, &[]).await.unwrap();
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    let mut last = 0;
    for (text, id) in texts.into_iter().zip(ids) {
        let d = bob.delivery().await;
        assert_eq!((d.message_id, d.text.as_str(), d.sender.id), (id, text, 1), "{d:?}");
        assert!(d.replayed, "{d:?}");
        assert!(d.position > last, "{d:?} after position {last}");
        last = d.position;
    }
}
