//! Ids on one node: increasing, carrying the node number, and never repeated across 1,000
//! restarts on one data directory, with the clock stepped back and forward.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use super::*;

/// A clock the test moves; starts at the real time.
fn clock() -> (Arc<AtomicU64>, Clock) {
    let t = Arc::new(AtomicU64::new(now_ms()));
    let c = t.clone();
    (t, Arc::new(move || c.load(SeqCst)))
}

#[test]
fn ids_increase_and_carry_the_node() {
    let ids = MessageIds::new("node-a");
    let mut last = 0;
    for _ in 0..10_000 {
        let id = ids.next().unwrap();
        assert!(id > last);
        assert_eq!(id & NODE_MASK, ids.node());
        last = id;
    }
    // Above 2^53: why JSON carries them as strings.
    assert!(last > 1 << 53);
}

#[test]
fn two_nodes_never_collide() {
    let (a, b) = (MessageIds::new("node-a"), MessageIds::new("node-b"));
    assert_ne!(a.node(), b.node());
    let xs: HashSet<u64> = (0..1000).map(|_| a.next().unwrap()).collect();
    assert!((0..1000).all(|_| !xs.contains(&b.next().unwrap())));
    // Numbered nodes differ even when their id hashes collide.
    let (c, d) = (MessageIds::new("same"), MessageIds::new("same"));
    c.switch(1, 0);
    d.switch(2, 0);
    assert_ne!(c.next().unwrap() & NODE_MASK, d.next().unwrap() & NODE_MASK);
}

#[test]
fn a_suspended_reservation_issues_nothing_until_extended() {
    let ids = MessageIds::new("n");
    ids.suspend();
    assert_eq!(ids.next(), None);
    ids.switch(7, 1 << 52);
    ids.extend(ids.ceiling_ahead(100));
    let id = ids.next().unwrap();
    assert_eq!((id & NODE_MASK, id >> NODE_BITS), (7, (1 << 52) + 1), "starts above the mark");
    // The ceiling covers 100 ms of clock and a burst; the counter never passes it.
    let ceiling = ids.ceiling();
    while ids.next().is_some() {}
    assert_eq!(ids.counter(), ceiling);
}

#[test]
fn a_thousand_restarts_on_one_data_directory_never_repeat_an_id() {
    let dir = tempfile::tempdir().unwrap();
    let (time, clock) = clock();
    let start = time.load(SeqCst);
    let mut seen = HashSet::new();
    for run in 0..1000u64 {
        // Every third run starts with the clock stepped back an hour (or back to where it
        // was); the others move it forward a little.
        match run % 3 {
            0 => time.store(start - 3_600_000, SeqCst),
            1 => time.store(start + run, SeqCst),
            _ => {
                time.fetch_add(1, SeqCst);
            }
        }
        let ids = MessageIds::with_clock("node-a", clock.clone());
        ids.persist_in(dir.path()).unwrap();
        for i in 0..(run % 40 + 1) {
            if run % 10 == 0 && i == 5 {
                // Past the whole block: `next` renews the reservation itself.
                time.fetch_add(20_000, SeqCst);
            }
            let id = ids.next().unwrap();
            assert!(seen.insert(id), "run {run}: id {id} was issued before");
        }
        if run % 7 == 0 {
            ids.refill().unwrap();
        }
        // Dropped without a word, as in a crash.
    }
    let ceiling: u64 = fs::read_to_string(dir.path().join(FILE_NAME)).unwrap().trim().parse().unwrap();
    assert!(seen.iter().all(|id| id >> NODE_BITS <= ceiling), "the file covers every id issued");
}

#[test]
fn without_a_data_directory_ids_follow_the_clock_alone() {
    let (time, clock) = clock();
    let first = MessageIds::with_clock("node-a", clock.clone()).next().unwrap();
    time.fetch_sub(3_600_000, SeqCst);
    let after_restart = MessageIds::with_clock("node-a", clock).next().unwrap();
    assert!(after_restart < first, "documented: a restart with the clock stepped back goes back too");
}

#[test]
fn an_unreadable_ceiling_file_is_an_error_not_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), "twelve\n").unwrap();
    let err = MessageIds::new("n").persist_in(dir.path()).unwrap_err();
    assert!(err.to_string().contains("should hold one number"), "{err}");
}
