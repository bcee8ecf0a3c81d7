//! The `cim` terminal client as a new user drives it: three clients (two TCP, one
//! WebSocket) chatting through a real host, with stdin and stdout piped.

mod common;

use common::Host;
use common::terminal::Cim;

#[tokio::test]
async fn three_terminals_chat() {
    let host = Host::start(&[]).await.unwrap();
    let (mut alice, _) = Cim::start(&host.route(), 1, "alice", &[]).await;
    let (mut bob, _) = Cim::start(&host.route(), 2, "bob", &[]).await;
    let (mut carol, _) = Cim::start(&host.route(), 3, "carol", &["--ws"]).await;

    // A group line reaches the other two.
    alice.type_line("hello everyone").await;
    assert_eq!(bob.line().await, "[group] alice(1): hello everyone");
    assert_eq!(carol.line().await, "[group] alice(1): hello everyone");

    // ID;;text reaches only that user: alice's next output is her :olu answer.
    bob.type_line("3;;just for carol").await;
    assert_eq!(carol.line().await, "[private] bob(2): just for carol");
    assert_eq!(alice.online(3).await, vec!["1 alice", "2 bob", "3 carol"]);

    // A second login as an online user is refused, and that client exits non-zero.
    let mut dup = Cim::spawn(&host.route(), 2, "bob-again", &[]);
    let line = dup.line().await;
    assert!(line.starts_with("error:") && line.contains("already online"), "{line}");
    assert_ne!(dup.exit_code().await, 0);

    // :q takes carol offline everywhere.
    carol.type_line(":q").await;
    assert_eq!(carol.exit_code().await, 0);
    host.wait_online(&[1, 2]).await;
    assert_eq!(alice.online(2).await, vec!["1 alice", "2 bob"]);

    // Errors are printed, and the client keeps going.
    bob.type_line("3;;are you there?").await;
    let line = bob.line().await;
    assert!(line.starts_with("error:") && line.contains("not online"), "{line}");

    // EOF on stdin quits too.
    bob.close_stdin();
    assert_eq!(bob.exit_code().await, 0);
    host.wait_online(&[1]).await;
}
