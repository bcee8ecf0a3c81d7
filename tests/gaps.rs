//! Gaps in live delivery: an entry in the log that no node published (its node died
//! between writing it and publishing it) still reaches its recipients, before the next live
//! delivery of its stream, so that a client's cumulative ack never covers a message it did
//! not get. And ordinary chat across nodes never needs the log read for it.

mod common;

use cim_proto::{Body, MessageKind};
use common::cluster::{Cluster, redis_url};
use common::{Host, RawClient};

/// Writes an entry into a log stream as a node would, without publishing it: what a node
/// killed between the two steps leaves behind.
fn write_unpublished(cluster: &Cluster, key: &str, id: u64, sender: u64, to: u64, text: &str) {
    let message = serde_json::json!({
        "id": id,
        "sender_id": sender,
        "sender_name": format!("u{sender}"),
        "group": to == 0,
        "text": text,
        "timestamp_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        "to": to,
    });
    let client = redis::Client::open(cluster.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let key = format!("{}{key}", cluster.prefix.prefix);
    let _: String =
        redis::cmd("XADD").arg(&key).arg("*").arg("m").arg(message.to_string()).query(&mut conn).unwrap();
}

/// `cim_gap_fills_total` on `host`.
async fn gap_fills(host: &Host) -> u64 {
    let (_, text) = host.http("GET", "/metrics", None).await;
    text.as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("cim_gap_fills_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("cim_gap_fills_total in /metrics")
}

/// The next delivery's (text, kind, replayed); positions must grow per stream.
async fn next(c: &mut RawClient, last: &mut [u64; 2]) -> (String, MessageKind, bool) {
    let d = c.delivery().await;
    let slot = &mut last[usize::from(d.kind == MessageKind::Group)];
    assert!(d.position > *slot, "{:?} at {} after {}", d.text, d.position, *slot);
    *slot = d.position;
    (d.text, d.kind, d.replayed)
}

#[tokio::test]
async fn an_unpublished_entry_reaches_its_recipient_before_the_next_live_one() {
    let cluster = Cluster::start(&redis_url(), &["a", "b"], 2, &[]).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let mut ann = RawClient::login_tcp(a, 1, "u1").await;
    let mut bob = RawClient::login_tcp(b, 2, "u2").await;
    let mut last = [0; 2];

    // Ordinary chat both ways, private and group: in order, and no log read for it.
    let mut req = 10;
    for round in 0..5 {
        req += 1;
        assert!(matches!(ann.request(req, Body::private(2, format!("a{round}"))).await, Body::Ack { .. }));
        assert_eq!(next(&mut bob, &mut last).await, (format!("a{round}"), MessageKind::Private, false));
        req += 1;
        assert!(matches!(bob.request(req, Body::private(1, format!("b{round}"))).await, Body::Ack { .. }));
        req += 1;
        assert!(matches!(bob.request(req, Body::group(format!("g{round}"))).await, Body::Ack { .. }));
        req += 1;
        assert!(matches!(ann.request(req, Body::group(format!("h{round}"))).await, Body::Ack { .. }));
        assert_eq!(next(&mut bob, &mut last).await, (format!("h{round}"), MessageKind::Group, false));
    }
    assert_eq!(gap_fills(b).await, 0, "ordinary chat never reads the log for a gap");

    // A private message and a group line written by a node that died before publishing.
    write_unpublished(&cluster, "log:inbox:{2}", 1001, 1, 2, "lost on the bus");
    write_unpublished(&cluster, "log:{group}", 1002, 1, 0, "lost group line");
    req += 1;
    assert!(matches!(ann.request(req, Body::private(2, "after".into())).await, Body::Ack { .. }));
    assert_eq!(next(&mut bob, &mut last).await, ("lost on the bus".into(), MessageKind::Private, false));
    assert_eq!(next(&mut bob, &mut last).await, ("after".into(), MessageKind::Private, false));
    req += 1;
    assert!(matches!(ann.request(req, Body::group("group after".into())).await, Body::Ack { .. }));
    assert_eq!(next(&mut bob, &mut last).await, ("lost group line".into(), MessageKind::Group, false));
    assert_eq!(next(&mut bob, &mut last).await, ("group after".into(), MessageKind::Group, false));
    // The first gap's read found the group line too (both were in the log by then).
    assert_eq!(gap_fills(b).await, 1, "one log read for both gaps");

    // Chat goes on live, in order.
    req += 1;
    assert!(matches!(ann.request(req, Body::private(2, "live again".into())).await, Body::Ack { .. }));
    assert_eq!(next(&mut bob, &mut last).await, ("live again".into(), MessageKind::Private, false));
    bob.assert_quiet(std::time::Duration::from_millis(200)).await;
}
