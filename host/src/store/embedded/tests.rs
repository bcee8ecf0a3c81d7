//! The embedded log against the shared behaviour tests, plus what only a disk has: reopening,
//! concurrent group commits, retention on disk, the directory lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::log::tests::{
    acks_only_move_forward, client_ids_deduplicate, group, positions_grow_and_reads_page, private,
    retention_is_reported,
};
use super::*;
use crate::store::Placed;

fn open_in(dir: &tempfile::TempDir, retention: Retention) -> EmbeddedLog {
    EmbeddedLog::open(dir.path(), retention, LogSync::Os).unwrap()
}

fn fresh(retention: Retention) -> (tempfile::TempDir, EmbeddedLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = open_in(&dir, retention);
    (dir, log)
}

fn to(stream: LogStream, message: LoggedMessage, client_msg_id: &str) -> Append {
    Append { message, streams: vec![stream], client_msg_id: client_msg_id.into() }
}

/// How many entries of `stream` are on disk, hidden or not.
fn on_disk(log: &EmbeddedLog, stream: LogStream) -> usize {
    log.tables.entries.prefix(keys::stream(stream)).count()
}

#[tokio::test]
async fn shared_behaviour() {
    positions_grow_and_reads_page(&fresh(Retention::default()).1).await;
    client_ids_deduplicate(&fresh(Retention::default()).1).await;
    acks_only_move_forward(&fresh(Retention::default()).1).await;
    retention_is_reported(&fresh(Retention { max_entries: 4, ..Retention::default() }).1, 4).await;
}

#[tokio::test]
async fn reopening_keeps_entries_positions_acks_and_client_ids() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_in(&dir, Retention::default());
    for id in 1..=3 {
        log.append(vec![to(LogStream::Inbox(2), private(id, 1, 2, "hi"), &format!("c-{id}"))]).await.unwrap();
    }
    log.ack(2, Positions { inbox: 2, group: 0 }).await.unwrap();
    drop(log);

    let log = open_in(&dir, Retention::default());
    let read = log.read(LogStream::Inbox(2), 0, 10).await.unwrap();
    assert_eq!(
        read.entries.iter().map(|e| (e.position, e.message.id)).collect::<Vec<_>>(),
        [(1, 1), (2, 2), (3, 3)]
    );
    assert_eq!(read.last, 3);
    assert_eq!(log.acked(2).await.unwrap(), Some(Positions { inbox: 2, group: 0 }));
    let again = log.append(vec![to(LogStream::Inbox(2), private(9, 1, 2, "hi"), "c-2")]).await.unwrap();
    assert_eq!(again, [Appended::Duplicate { message_id: 2 }]);
    let next = log.append(vec![to(LogStream::Inbox(2), private(4, 1, 2, "hi"), "c-4")]).await.unwrap();
    assert_eq!(next, [Appended::Stored(vec![Placed::dense(4)])]);
}

#[tokio::test]
async fn positions_survive_trimming_everything_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention { max_entries: 2, ..Retention::default() };
    let log = open_in(&dir, retention);
    for id in 1..=10 {
        log.append(vec![to(LogStream::Group, group(id, 1, None), "")]).await.unwrap();
    }
    drop(log);
    let log = open_in(&dir, retention);
    let read = log.read(LogStream::Group, 0, 10).await.unwrap();
    assert_eq!((read.trimmed_through, read.last, read.entries.len()), (8, 10, 2), "{read:?}");
    let next = log.append(vec![to(LogStream::Group, group(11, 1, None), "")]).await.unwrap();
    assert_eq!(next, [Appended::Stored(vec![Placed::dense(11)])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_distinct_increasing_positions() {
    let (_dir, log) = fresh(Retention::default());
    let log = Arc::new(log);
    let (tasks, each) = (50u64, 20u64);
    let mut handles = Vec::new();
    for task in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for n in 0..each {
                let id = task * 1000 + n;
                let append = Append {
                    message: private(id, task, 7, "x"),
                    streams: vec![LogStream::Inbox(7), LogStream::Inbox(1000 + task)],
                    client_msg_id: String::new(),
                };
                let Appended::Stored(p) = log.append(vec![append]).await.unwrap().remove(0) else {
                    panic!("not stored")
                };
                mine.push((id, p[0].position, p[1].position));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        let mine = handle.await.unwrap();
        // One caller's appends keep their order, in the shared stream and in its own.
        assert!(mine.windows(2).all(|w| w[0].1 < w[1].1 && w[1].2 == w[0].2 + 1), "{mine:?}");
        all.extend(mine);
    }
    let mut shared: Vec<u64> = all.iter().map(|a| a.1).collect();
    shared.sort_unstable();
    assert_eq!(shared, (1..=tasks * each).collect::<Vec<_>>());
    let read = log.read(LogStream::Inbox(7), 0, 10_000).await.unwrap();
    assert_eq!(read.entries.len() as u64, tasks * each);
    let positions: std::collections::HashMap<u64, u64> = all.iter().map(|a| (a.0, a.1)).collect();
    assert!(read.entries.iter().all(|e| positions[&e.message.id] == e.position));
}

#[tokio::test]
async fn retention_by_age_hides_then_deletes() {
    let retention = Retention { max_age: Duration::from_millis(200), ..Retention::default() };
    let (_dir, log) = fresh(retention);
    for id in 1..=3 {
        log.append(vec![to(LogStream::Inbox(5), private(id, 1, 5, "old"), "")]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    log.append(vec![to(LogStream::Inbox(5), private(4, 1, 5, "new"), "")]).await.unwrap();
    let read = log.read(LogStream::Inbox(5), 0, 10).await.unwrap();
    assert_eq!(read.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), [4]);
    assert_eq!((read.trimmed_through, read.last), (3, 4));
    let back = log.read_back(LogStream::Inbox(5), 0, 10).await.unwrap();
    assert_eq!(back.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), [4]);
    assert_eq!(back.trimmed_through, 3);
    // The writer's sweep (every 100 ms here) deletes them from the disk.
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_disk(&log, LogStream::Inbox(5)) > 1 {
        assert!(Instant::now() < deadline, "old entries still on disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A log written by an earlier version (a row per entry in an `expiry` index) is upgraded
/// when opened: the old index is gone and its entries still age out.
#[tokio::test]
async fn an_old_per_entry_age_index_is_upgraded() {
    let retention = Retention { max_age: Duration::from_millis(200), ..Retention::default() };
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open_in(&dir, Retention::default());
        for id in 1..=3 {
            log.append(vec![to(LogStream::Inbox(5), private(id, 1, 5, "old"), "")]).await.unwrap();
        }
        // Rewrite the age index as the earlier version had it: timestamp ‖ entry key.
        let tables = log.tables.clone();
        let old = tables.db.keyspace("expiry", KeyspaceCreateOptions::default).unwrap();
        for position in 1..=3 {
            let mut key = keys::time(now_ms() - 1).to_vec();
            key.extend_from_slice(&keys::entry(LogStream::Inbox(5), position));
            old.insert(key, Vec::new()).unwrap();
        }
        tables.age.clear().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = open_in(&dir, retention);
    assert!(!log.tables.db.keyspace_exists("expiry"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_disk(&log, LogStream::Inbox(5)) > 0 {
        assert!(Instant::now() < deadline, "entries of the old index still on disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = log.read(LogStream::Inbox(5), 0, 10).await.unwrap();
    assert_eq!((read.entries.len(), read.trimmed_through, read.last), (0, 3, 3));
}

#[tokio::test]
async fn retention_by_count_deletes_in_steps() {
    let (_dir, log) = fresh(Retention { max_entries: 20, ..Retention::default() });
    for id in 1..=100 {
        log.append(vec![to(LogStream::Group, group(id, 1, None), "")]).await.unwrap();
        // At most 1% over, plus the one the writer answered before trimming.
        assert!(on_disk(&log, LogStream::Group) <= 23);
    }
    let read = log.read(LogStream::Group, 0, 100).await.unwrap();
    assert_eq!((read.entries.len(), read.trimmed_through, read.last), (20, 80, 100));
}

#[tokio::test]
async fn client_ids_are_forgotten_after_the_window() {
    let (_dir, log) = fresh(Retention { dedup_window: Duration::from_millis(100), ..Retention::default() });
    let first = log.append(vec![to(LogStream::Group, group(1, 1, None), "c")]).await.unwrap();
    assert_eq!(first, [Appended::Stored(vec![Placed::dense(1)])]);
    // Within one call too.
    let twice = log
        .append(vec![
            to(LogStream::Group, group(2, 2, None), "d"),
            to(LogStream::Group, group(3, 2, None), "d"),
        ])
        .await
        .unwrap();
    assert_eq!(twice, [Appended::Stored(vec![Placed::dense(2)]), Appended::Duplicate { message_id: 2 }]);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let later = log.append(vec![to(LogStream::Group, group(4, 1, None), "c")]).await.unwrap();
    assert_eq!(later, [Appended::Stored(vec![Placed::dense(3)])]);
}

/// Client ids past the window leave the disk when compaction rewrites them.
#[tokio::test]
async fn compaction_drops_client_ids_past_the_window() {
    let (_dir, log) = fresh(Retention { dedup_window: Duration::from_millis(100), ..Retention::default() });
    log.append(vec![to(LogStream::Group, group(1, 1, None), "old")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    log.append(vec![to(LogStream::Group, group(2, 1, None), "new")]).await.unwrap();
    let ids = &log.tables.client_ids;
    assert_eq!(ids.iter().count(), 2);
    ids.rotate_memtable_and_wait().unwrap();
    ids.major_compact().unwrap();
    let left: Vec<Vec<u8>> = ids.iter().map(|kv| kv.key().unwrap().to_vec()).collect();
    assert_eq!(left, [keys::client_id(1, "new")]);
}

#[tokio::test]
async fn a_directory_in_use_is_refused_clearly() {
    let (dir, _log) = fresh(Retention::default());
    let err = EmbeddedLog::open(dir.path(), Retention::default(), LogSync::Os).unwrap_err();
    let expected = format!("the message log in {} is in use by another cim-host", dir.path().display());
    assert!(err.to_string().contains(&expected), "{err}");
}

/// Append latency through the trait: `cargo test -p cim-host --release --lib
/// store::embedded::tests::append_latency -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn append_latency() {
    for sync in [LogSync::Os, LogSync::Fsync] {
        for concurrency in [1usize, 64] {
            let dir = tempfile::tempdir().unwrap();
            let log = Arc::new(EmbeddedLog::open(dir.path(), Retention::default(), sync).unwrap());
            let per_task =
                if sync == LogSync::Fsync { 4000 / concurrency.min(8) } else { 20_000 / concurrency };
            let started = Instant::now();
            let mut handles = Vec::new();
            for task in 0..concurrency as u64 {
                let log = log.clone();
                handles.push(tokio::spawn(async move {
                    let mut took = Vec::with_capacity(per_task);
                    for n in 0..per_task as u64 {
                        let append = to(LogStream::Inbox(task), private(n, 1, task, &"x".repeat(100)), "");
                        let t = Instant::now();
                        log.append(vec![append]).await.unwrap();
                        took.push(t.elapsed());
                    }
                    took
                }));
            }
            let mut took = Vec::new();
            for h in handles {
                took.extend(h.await.unwrap());
            }
            let elapsed = started.elapsed();
            took.sort_unstable();
            let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
            println!(
                "{sync:?} concurrency {concurrency}: {} appends, {:.0}/s, p50 {:?}, p99 {:?}",
                took.len(),
                took.len() as f64 / elapsed.as_secs_f64(),
                at(0.50),
                at(0.99)
            );
        }
    }
}
