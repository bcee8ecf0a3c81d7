//! Tests of the Redis message log against a real Redis (unique key prefix per test), and
//! on a Redis Cluster of the test's own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use super::*;
use crate::store::log::tests::{
    acks_only_move_forward, client_ids_deduplicate, positions_grow_and_reads_page, private,
    retention_is_reported,
};
use crate::store::redis::test_cluster::RedisCluster;
use crate::store::redis::test_support::TestRedis;

async fn log_on(t: &TestRedis, retention: Retention) -> Arc<RedisLog> {
    t.store().await.log(retention)
}

fn to(message: LoggedMessage, streams: Vec<LogStream>, client_msg_id: &str) -> Append {
    Append { message, streams, client_msg_id: client_msg_id.into() }
}

fn stored(a: &Appended) -> Vec<u64> {
    match a {
        Appended::Stored(p) => p.iter().map(|p| p.position).collect(),
        other => panic!("not stored: {other:?}"),
    }
}

/// The behaviour every log must have, each on a fresh prefix of the Redis at `url`.
async fn shared_behaviour(url: &str) {
    let small = Retention { max_entries: 4, ..Retention::default() };
    let runs: [(Retention, u8); 4] =
        [(Retention::default(), 0), (Retention::default(), 1), (Retention::default(), 2), (small, 3)];
    for (retention, which) in runs {
        let t = TestRedis::on(url.to_owned());
        let log = log_on(&t, retention).await;
        match which {
            0 => positions_grow_and_reads_page(&*log).await,
            1 => client_ids_deduplicate(&*log).await,
            2 => acks_only_move_forward(&*log).await,
            _ => retention_is_reported(&*log, 4).await,
        }
        t.cleanup().await;
    }
}

#[tokio::test]
async fn the_redis_log_behaves_like_every_log() {
    shared_behaviour(&crate::store::redis::test_support::redis_url()).await;
}

#[test]
fn entry_ids_and_positions_round_trip_in_order() {
    let ids = ["0-1", "0-1048575", "1-0", "1796050545820-0", "1796050545820-7", "17592186044415-1048575"];
    let positions: Vec<u64> = ids.iter().map(|id| position_of(id).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    for (id, p) in ids.iter().zip(&positions) {
        assert_eq!(id_of(*p), *id);
    }
    assert_eq!(position_of("1796050545820-3").unwrap(), (1_796_050_545_820 << 20) | 3);
    for bad in ["1-1048576", "17592186044416-0", "12", "a-1", "1-b", ""] {
        assert!(matches!(position_of(bad), Err(StoreError::Corrupt(_))), "{bad} was accepted");
    }
    let k = RedisKeys::new("cim:").unwrap();
    assert_eq!(k.log_stream(LogStream::Inbox(7)), "cim:log:inbox:{7}");
    assert_eq!(k.log_stream(LogStream::Group), "cim:log:{group}");
    assert_eq!(k.log_dedup(7, "c-1"), "cim:log:dedup:{7}:c-1");
    assert_eq!(k.log_acked(7), "cim:log:acked:{7}");
}

/// The stream's positions are real entry ids, the trim is exact and reported exactly, a
/// client id is remembered for the de-dup window only, and acks past 2^53 compare exactly.
#[tokio::test]
async fn trims_are_exact_and_acks_compare_exactly() {
    let t = TestRedis::new();
    let store = t.store().await;
    let retention = Retention { max_entries: 2, ..Retention::default() };
    let log = store.log(retention);
    let mut positions = Vec::new();
    for i in 1..=3 {
        let r = log.append(vec![to(private(i, 1, 2, "x"), vec![LogStream::Inbox(2)], "")]).await.unwrap();
        positions.push(stored(&r[0])[0]);
    }
    let read = log.read(LogStream::Inbox(2), 0, 10).await.unwrap();
    assert_eq!(read.trimmed_through, positions[0], "exactly the dropped entry");
    assert_eq!(read.last, positions[2]);
    assert_eq!(read.entries.iter().map(|e| e.position).collect::<Vec<_>>(), positions[1..]);
    let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(store.keys().log_stream(LogStream::Inbox(2)))
        .arg("-")
        .arg("+")
        .query_async(&mut store.connection())
        .await
        .unwrap();
    assert_eq!(raw.iter().map(|(id, _)| position_of(id).unwrap()).collect::<Vec<_>>(), positions[1..]);
    // read_back before the oldest kept entry finds nothing, and still reports the trim.
    let back = log.read_back(LogStream::Inbox(2), positions[1], 10).await.unwrap();
    assert!(back.entries.is_empty() && back.trimmed_through == positions[0], "{back:?}");
    assert_eq!(log.read(LogStream::Inbox(2), 0, 0).await.unwrap().last, positions[2]);

    let r = log.append(vec![to(private(9, 5, 6, "x"), vec![LogStream::Inbox(6)], "once")]).await.unwrap();
    assert!(matches!(r[0], Appended::Stored(_)));
    let ttl: i64 = store.connection().pttl(store.keys().log_dedup(5, "once")).await.unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "the client id expires with the window: {ttl}");

    let big = (1u64 << 60) + 1;
    log.ack(4, Positions { inbox: big, group: 0 }).await.unwrap();
    log.ack(4, Positions { inbox: big - 1, group: 9 }).await.unwrap();
    log.ack(4, Positions { inbox: 99, group: 10 }).await.unwrap();
    assert_eq!(log.acked(4).await.unwrap(), Some(Positions { inbox: big, group: 10 }));
    t.cleanup().await;
}

/// Past the age, entries go on the next append, and the read says how far.
#[tokio::test]
async fn old_entries_are_trimmed_by_age() {
    let t = TestRedis::new();
    let retention = Retention { max_age: Duration::from_millis(200), ..Retention::default() };
    let log = log_on(&t, retention).await;
    let first = stored(
        &log.append(vec![to(private(1, 1, 2, "old"), vec![LogStream::Inbox(2)], "")]).await.unwrap()[0],
    )[0];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 2;
    loop {
        log.append(vec![to(private(i, 1, 2, "new"), vec![LogStream::Inbox(2)], "")]).await.unwrap();
        let read = log.read(LogStream::Inbox(2), 0, 1000).await.unwrap();
        if read.entries.first().is_some_and(|e| e.message.id != 1) {
            assert!(read.trimmed_through >= first, "{read:?}");
            assert!(read.entries.iter().all(|e| e.position > read.trimmed_through));
            break;
        }
        assert!(Instant::now() < deadline, "the 200 ms old entry was never trimmed: {read:?}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.cleanup().await;
}

/// After the log's keys are gone (a Redis wipe, simulated by deleting only this test's
/// keys), new positions are still above every old one, so a saved position hides nothing.
#[tokio::test]
async fn positions_keep_growing_after_a_wipe() {
    let t = TestRedis::new();
    let log = log_on(&t, Retention::default()).await;
    let streams = vec![LogStream::Inbox(2), LogStream::Group];
    let appends = (1..=3).map(|i| to(private(i, 1, 2, "before"), streams.clone(), "")).collect();
    let before: Vec<u64> = log.append(appends).await.unwrap().iter().flat_map(stored).collect();
    let saved = log.read(LogStream::Inbox(2), 0, 10).await.unwrap().last;
    t.cleanup().await;
    assert_eq!(log.read(LogStream::Inbox(2), 0, 10).await.unwrap(), LogRead::default());
    let after = stored(&log.append(vec![to(private(4, 1, 2, "after"), streams, "")]).await.unwrap()[0]);
    assert!(after.iter().all(|p| before.iter().all(|b| p > b)), "{after:?} vs {before:?}");
    let resumed = log.read(LogStream::Inbox(2), saved, 10).await.unwrap();
    assert_eq!(resumed.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), vec![4]);
    t.cleanup().await;
}

/// When the stream's last id already used a millisecond's last sequence number (2^20 - 1),
/// the next entry moves on to the next millisecond instead of a sequence a position cannot
/// hold.
#[tokio::test]
async fn a_full_millisecond_moves_on_to_the_next() {
    let t = TestRedis::new();
    let store = t.store().await;
    let log = store.log(Retention::default());
    let future_ms = crate::message_id::now_ms() + 60_000;
    let key = store.keys().log_stream(LogStream::Inbox(2));
    let full = format!("{future_ms}-{SEQ_MASK}");
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg(&full)
        .arg("m")
        .arg(private(1, 1, 2, "x").encode())
        .query_async(&mut store.connection())
        .await
        .unwrap();
    let r = log.append(vec![to(private(2, 1, 2, "y"), vec![LogStream::Inbox(2)], "")]).await.unwrap();
    let p = stored(&r[0])[0];
    assert_eq!(id_of(p), format!("{}-0", future_ms + 1));
    assert!(p > position_of(&full).unwrap());
    t.cleanup().await;
}

/// A batch of 100 appends, each to two inboxes and with a client id, costs three round trips
/// on one server (claims, one script call per stream, claims marked written), and one
/// without client ids.
#[tokio::test]
async fn a_batch_costs_a_constant_number_of_round_trips() {
    let t = TestRedis::new();
    let store = t.store().await;
    let log = store.log(Retention::default());
    let conn = store.connection();
    let batch = |first: u64, ids: bool| -> Vec<Append> {
        (first..first + 100)
            .map(|i| {
                let (from, rcpt) = (i % 5, 10 + i % 7);
                let cid = if ids { format!("c-{i}") } else { String::new() };
                to(private(i, from, rcpt, "x"), vec![LogStream::Inbox(rcpt), LogStream::Inbox(from)], &cid)
            })
            .collect()
    };
    // Load the scripts first: on a Redis that has not run them yet, the first call of each
    // costs a NOSCRIPT answer and a SCRIPT LOAD.
    let warm = to(private(9_999, 100, 101, "w"), vec![LogStream::Inbox(101), LogStream::Inbox(100)], "w");
    log.append(vec![warm]).await.unwrap();
    let before = conn.requests();
    let results = log.append(batch(0, true)).await.unwrap();
    assert_eq!(conn.requests() - before, 3, "claims + appends + marks");
    assert!(results.iter().all(|r| matches!(r, Appended::Stored(p) if p.len() == 2)));
    let before = conn.requests();
    log.append(batch(100, false)).await.unwrap();
    assert_eq!(conn.requests() - before, 1, "appends only");
    let before = conn.requests();
    log.read(LogStream::Inbox(10), 0, 100).await.unwrap();
    assert_eq!(conn.requests() - before, 1, "a read is one pipeline");
    // Per stream, positions follow the batch order.
    let inbox = log.read(LogStream::Inbox(10), 0, 1000).await.unwrap();
    let ids: Vec<u64> = inbox.entries.iter().map(|e| e.message.id).collect();
    assert_eq!(ids, (0..200).filter(|i| i % 7 == 0).collect::<Vec<u64>>());
    t.cleanup().await;
}

/// A node that died between claiming a client id and writing its entries left a claim
/// without entries: the resend writes the message, under the first send's id, and only then
/// is the id a plain duplicate. The same client id from another sender is another message.
#[tokio::test]
async fn a_resend_after_an_unfinished_claim_writes_the_message() {
    let t = TestRedis::new();
    let store = t.store().await;
    let log = store.log(Retention::default());
    // What the dead node did: the claim, for message 7, and nothing else.
    let key = store.keys().log_dedup(1, "k1");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("7")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut store.connection())
        .await
        .unwrap();
    let streams = vec![LogStream::Inbox(2), LogStream::Inbox(1)];
    let r = log.append(vec![to(private(9, 1, 2, "hi"), streams.clone(), "k1")]).await.unwrap();
    let Appended::Rewritten { message_id: 7, placed } = &r[0] else { panic!("{r:?}") };
    assert_eq!(placed.len(), 2);
    let inbox = log.read(LogStream::Inbox(2), 0, 10).await.unwrap();
    assert_eq!(
        inbox.entries.iter().map(|e| (e.message.id, e.message.text.as_str())).collect::<Vec<_>>(),
        [(7, "hi")]
    );
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut store.connection()).await.unwrap();
    assert!(ttl > 0, "marking the claim written kept its expiry");
    let again = log.append(vec![to(private(10, 1, 2, "hi"), streams.clone(), "k1")]).await.unwrap();
    assert_eq!(again, [Appended::Duplicate { message_id: 7 }]);
    // Two resends in one batch: written once.
    let key = store.keys().log_dedup(1, "k2");
    let _: () = redis::cmd("SET").arg(&key).arg("20").query_async(&mut store.connection()).await.unwrap();
    let fresh = log
        .append(vec![
            to(private(21, 1, 2, "a"), streams.clone(), "k3"),
            to(private(22, 1, 2, "b"), streams.clone(), "k3"),
            to(private(23, 1, 2, "c"), streams.clone(), "k2"),
            to(private(24, 3, 2, "d"), vec![LogStream::Inbox(2)], "k2"),
        ])
        .await
        .unwrap();
    assert!(matches!(fresh[0], Appended::Stored(_)), "{fresh:?}");
    assert_eq!(fresh[1], Appended::Duplicate { message_id: 21 });
    assert!(matches!(fresh[2], Appended::Rewritten { message_id: 20, .. }), "{fresh:?}");
    assert!(matches!(fresh[3], Appended::Stored(_)), "{fresh:?}");
    let ids: Vec<u64> =
        log.read(LogStream::Inbox(2), 0, 10).await.unwrap().entries.iter().map(|e| e.message.id).collect();
    assert_eq!(ids, [7, 21, 20, 24]);
    t.cleanup().await;
}

/// After `SCRIPT FLUSH` the append script is loaded again and every stream written once.
/// On servers of the test's own (a two-primary cluster), not to flush the shared Redis's
/// scripts under other tests.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded() {
    let cluster = RedisCluster::start(2);
    let t = TestRedis::on(cluster.url());
    let store = t.store().await;
    let log = store.log(Retention::default());
    log.append(vec![to(private(0, 1, 2, "x"), vec![LogStream::Inbox(2)], "")]).await.unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut store.connection()).await.unwrap();
    let r = log
        .append(vec![to(private(1, 1, 2, "x"), vec![LogStream::Inbox(2), LogStream::Inbox(1)], "k")])
        .await
        .unwrap();
    assert_eq!(stored(&r[0]).len(), 2);
    for user in [1, 2] {
        let ids: Vec<u64> = log
            .read(LogStream::Inbox(user), 0, 10)
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.message.id)
            .collect();
        assert_eq!(ids, if user == 1 { vec![1] } else { vec![0, 1] });
    }
    t.cleanup().await;
}

/// The same behaviour on a three-primary Redis Cluster, with batches that span slots.
#[tokio::test]
async fn the_redis_log_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    shared_behaviour(&cluster.url()).await;
    let t = TestRedis::on(cluster.url());
    let store = t.store().await;
    assert!(store.connection().is_cluster());
    let log = store.log(Retention::default());
    let appends: Vec<Append> = (0..60u64)
        .map(|i| {
            to(
                private(i, 100 + i % 3, 200 + i % 20, "x"),
                vec![LogStream::Inbox(200 + i % 20), LogStream::Inbox(100 + i % 3), LogStream::Group],
                &format!("c{i}"),
            )
        })
        .collect();
    let results = log.append(appends).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, Appended::Stored(p) if p.len() == 3)));
    for i in 0..3 {
        assert!(cluster.dbsize(i) > 0, "primary {i} holds none of the log's keys");
    }
    let group = log.read(LogStream::Group, 0, 100).await.unwrap();
    assert_eq!(group.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), (0..60).collect::<Vec<_>>());
    let again = log.append(vec![to(private(99, 100, 200, "x"), vec![LogStream::Group], "c0")]).await.unwrap();
    assert_eq!(again[0], Appended::Duplicate { message_id: 0 });
    t.cleanup().await;
}
