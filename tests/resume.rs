//! Delivery guarantees as a person at the `cim` terminal sees them: messages sent while a
//! user was away are stored, replayed once when they come back, in order per conversation,
//! and kept in their history.

mod common;

use common::Host;
use common::terminal::Cim;

const STORED: &str = "(user 2 is offline: stored, delivered when they log in)";

/// A `:history` line without its `HH:MM:SS ` time.
fn untimed(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(_, rest)| rest)
}

#[tokio::test]
async fn a_terminal_that_comes_back_sees_what_it_missed_once() {
    let host = Host::start(&["--store", "memory"]).await.unwrap();
    let route = host.route();
    let (mut alice, _) = Cim::start(&route, 1, "alice", &[]).await;
    let (mut bob, _) = Cim::start(&route, 2, "bob", &[]).await;
    alice.type_line("before").await;
    assert_eq!(bob.line().await, "[group] alice(1): before");

    bob.type_line(":q").await;
    assert_eq!(bob.exit_code().await, 0);
    host.wait_online(&[1]).await;

    // Private messages to bob are stored, and alice's terminal says so.
    for i in 1..=3 {
        alice.type_line(&format!("2;;p{i}")).await;
        assert_eq!(alice.line().await, STORED);
    }
    alice.type_line("g1").await;
    alice.type_line("g2").await;
    // The terminal sends one line at a time: once :olu answers, both group lines were accepted.
    assert_eq!(alice.online(1).await, vec!["1 alice"]);

    // Bob comes back: all five, each once, in order per conversation.
    let (mut bob, _) = Cim::start(&route, 2, "bob", &[]).await;
    let mut lines = Vec::new();
    for _ in 0..5 {
        lines.push(bob.line().await);
    }
    let private: Vec<&str> =
        lines.iter().filter(|l| l.starts_with("[private]")).map(String::as_str).collect();
    let group: Vec<&str> = lines.iter().filter(|l| l.starts_with("[group]")).map(String::as_str).collect();
    assert_eq!(
        private,
        ["[private] alice(1): p1", "[private] alice(1): p2", "[private] alice(1): p3"],
        "{lines:?}"
    );
    assert_eq!(group, ["[group] alice(1): g1", "[group] alice(1): g2"], "{lines:?}");
    // Nothing else came: the next line is the answer to :olu.
    assert_eq!(bob.online(2).await, vec!["1 alice", "2 bob"]);

    // A live message still arrives, once.
    alice.type_line("2;;live").await;
    assert_eq!(bob.line().await, "[private] alice(1): live");

    // Both streams, merged oldest first.
    bob.type_line(":history 10").await;
    assert_eq!(bob.line().await, "── history: 7 messages ──");
    let mut history = Vec::new();
    for _ in 0..7 {
        history.push(bob.line().await);
    }
    let history: Vec<&str> = history.iter().map(|l| untimed(l)).collect();
    let expected = [
        "[group] alice(1): before",
        "[private] alice(1) -> 2: p1",
        "[private] alice(1) -> 2: p2",
        "[private] alice(1) -> 2: p3",
        "[group] alice(1): g1",
        "[group] alice(1): g2",
        "[private] alice(1) -> 2: live",
    ];
    assert_eq!(history, expected);

    // A shorter one: the newest.
    bob.type_line(":history 2").await;
    assert_eq!(bob.line().await, "── history: 2 messages ──");
    assert_eq!(untimed(&bob.line().await), "[group] alice(1): g2");
    assert_eq!(untimed(&bob.line().await), "[private] alice(1) -> 2: live");

    bob.type_line(":q").await;
    assert_eq!(bob.exit_code().await, 0);
}
