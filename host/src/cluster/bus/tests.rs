//! The bus against a real Redis (unique key prefix per test).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cim_proto::{Delivery, MessageKind, User};
use redis::AsyncCommands;

use super::message::unbatch;
use super::*;
use crate::store::redis::test_support::TestRedis;

/// Bus tests find their own pub/sub connection by listing the server's; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn deliver() -> ClusterMessage {
    ClusterMessage::Deliver {
        recipients: vec![2, 3],
        delivery: BusDelivery {
            message_id: 99,
            sender_id: 1,
            sender_name: "ann".into(),
            kind: MessageKind::Group,
            text: "hi \u{1f44b}".into(),
            timestamp_ms: 1_700_000_000_000,
            position: 7,
            prev: 5,
            accepted_us: 1_700_000_000_000_123,
        },
    }
}

/// Publishes `msg` until a subscriber hears it, then returns what `sub` received.
async fn round_trip(bus: &Bus, node: &str, sub: &mut Subscription, msg: &ClusterMessage) -> ClusterMessage {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.publish(node, msg).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "nobody subscribed to the inbox of {node} within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("message within 5 s").unwrap()
}

/// Subscribes `node` and finds the server-side id of the new pub/sub connection: the one
/// that appeared meanwhile. Retries if another client connected at the same moment.
async fn subscribe_identified(bus: &Bus, node: &str) -> (Subscription, u64) {
    for _ in 0..5 {
        let before = pubsub_client_ids(bus).await;
        let sub = bus.subscribe(node).await.unwrap();
        let new: Vec<u64> = pubsub_client_ids(bus).await.difference(&before).copied().collect();
        if let [ours] = new[..] {
            return (sub, ours);
        }
    }
    panic!("could not single out our pub/sub connection: other clients keep subscribing");
}

async fn pubsub_client_ids(bus: &Bus) -> BTreeSet<u64> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut bus.conn.clone())
        .await
        .unwrap();
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).and_then(|id| id.parse().ok()))
        .collect()
}

#[test]
fn wire_format() {
    let json = serde_json::to_value(deliver()).unwrap();
    assert_eq!(json["type"], "deliver");
    assert_eq!(json["delivery"]["kind"], "group");
    let kick: ClusterMessage =
        serde_json::from_str(r#"{"type":"kick","user_id":5,"reason":"duplicate login"}"#).unwrap();
    assert_eq!(
        kick,
        ClusterMessage::Kick { user_id: 5, reason: "duplicate login".into(), conn_id: None, replaced: false }
    );
    let d = Delivery {
        message_id: 1,
        sender: User { id: 2, name: "b".into() },
        kind: MessageKind::Private,
        text: "t".into(),
        timestamp_ms: 3,
        position: 4,
        replayed: false,
    };
    assert_eq!(Delivery::from(BusDelivery::new(&d, 3, 0)), d);
    let batch: ClusterMessage = serde_json::from_str(
        r#"{"type":"batch","messages":[{"type":"kick","user_id":1,"reason":"a"},{"type":"batch","messages":[{"type":"kick","user_id":2,"reason":"b"}]}]}"#,
    )
    .unwrap();
    let mut flat = Vec::new();
    unbatch(batch, &mut flat);
    let ids: Vec<u64> = flat
        .iter()
        .map(|m| match m {
            ClusterMessage::Kick { user_id, .. } => *user_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test]
async fn publish_reaches_the_node_inbox_and_broadcast_reaches_everyone() {
    let _serial = SERIAL.lock().await;
    let t = TestRedis::new();
    let bus = Bus::new(&t.store().await);
    let mut a = bus.subscribe("a").await.unwrap();
    let mut b = bus.subscribe("b").await.unwrap();
    assert_eq!(round_trip(&bus, "a", &mut a, &deliver()).await, deliver());

    let changed = ClusterMessage::ComponentChanged { name: "group".into(), sha256: "ab".repeat(32) };
    assert_eq!(bus.broadcast(&changed).await.unwrap(), 2);
    for sub in [&mut a, &mut b] {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap();
        assert_eq!(got, Some(changed.clone()));
    }
    assert_eq!(bus.publish("nobody", &deliver()).await.unwrap(), 0);

    // Garbage on the channel is skipped, not fatal.
    let _: usize = bus.conn.clone().publish(bus.keys.inbox("b"), "not json").await.unwrap();
    let kick = ClusterMessage::Kick { user_id: 7, reason: "x".into(), conn_id: None, replaced: false };
    assert_eq!(round_trip(&bus, "b", &mut b, &kick).await, kick);
    assert_eq!(a.resubscriptions() + b.resubscriptions(), 0);
    t.cleanup().await;
}

#[tokio::test]
async fn messages_queued_for_a_node_arrive_in_order_batched_under_load() {
    let _serial = SERIAL.lock().await;
    let t = TestRedis::new();
    let bus = Bus::new(&t.store().await);
    let mut sub = bus.subscribe("n").await.unwrap();
    let first = ClusterMessage::Kick { user_id: 0, reason: "first".into(), conn_id: None, replaced: false };
    assert_eq!(round_trip(&bus, "n", &mut sub, &first).await, first);
    let answers: Vec<_> = (1..=500u64)
        .map(|i| {
            bus.enqueue(
                "n",
                ClusterMessage::Kick { user_id: i, reason: String::new(), conn_id: None, replaced: false },
            )
        })
        .collect();
    for answer in answers {
        assert_eq!(answer.await.unwrap(), 1);
    }
    for i in 1..=500u64 {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap() {
            Some(ClusterMessage::Kick { user_id, .. }) => assert_eq!(user_id, i, "out of order"),
            other => panic!("unexpected {other:?}"),
        }
    }
    t.cleanup().await;
}

#[tokio::test]
async fn keepalive_pings_keep_the_subscription() {
    let _serial = SERIAL.lock().await;
    let t = TestRedis::new();
    let bus = Bus::new(&t.store().await).with_keepalive(Duration::from_millis(50));
    let (mut sub, ours) = subscribe_identified(&bus, "n").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("ID")
            .arg(ours)
            .query_async(&mut bus.conn.clone())
            .await
            .unwrap();
        if list.contains("cmd=ping") {
            break;
        }
        assert!(Instant::now() < deadline, "no keepalive PING within 5 s: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());
    assert_eq!(sub.resubscriptions(), 0);
    t.cleanup().await;
}

#[tokio::test]
async fn a_killed_pubsub_connection_is_resubscribed() {
    let _serial = SERIAL.lock().await;
    let t = TestRedis::new();
    let bus = Bus::new(&t.store().await);
    let (mut sub, ours) = subscribe_identified(&bus, "n").await;
    assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());

    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(ours)
        .query_async(&mut bus.conn.clone())
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let kick =
        ClusterMessage::Kick { user_id: 1, reason: "after reconnect".into(), conn_id: None, replaced: false };
    assert_eq!(round_trip(&bus, "n", &mut sub, &kick).await, kick);
    assert_eq!(sub.resubscriptions(), 1);
    assert!(!pubsub_client_ids(&bus).await.contains(&ours));
    t.cleanup().await;
}

#[tokio::test]
async fn dropping_the_subscription_unsubscribes() {
    let _serial = SERIAL.lock().await;
    let t = TestRedis::new();
    let bus = Bus::new(&t.store().await);
    let mut sub = bus.subscribe("n").await.unwrap();
    assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.publish("n", &deliver()).await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "still subscribed 5 s after the drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.cleanup().await;
}
