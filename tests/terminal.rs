//! The `cim` terminal client as a new user drives it: three clients (two TCP, one
//! WebSocket) chatting through a real host, with stdin and stdout piped.

mod common;

use std::time::Duration;

use common::terminal::Cim;
use common::{Host, auth, binary};

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

    // A private message to an offline user is stored, and the terminal says so.
    bob.type_line("3;;are you there?").await;
    assert_eq!(bob.line().await, "(user 3 is offline: stored, delivered when they log in)");

    // Errors are printed, and the client keeps going.
    bob.type_line("1;;").await;
    let line = bob.line().await;
    assert!(line.starts_with("error:"), "{line}");
    assert_eq!(bob.online(2).await, vec!["1 alice", "2 bob"]);

    // EOF on stdin quits too.
    bob.close_stdin();
    assert_eq!(bob.exit_code().await, 0);
    host.wait_online(&[1]).await;
}

/// With authentication on: `--token` and `--token-command` say who the user is (no
/// `--user-id`), a token command keeps a short session alive past its first token, and a
/// refused token is one clear line and a non-zero exit.
#[tokio::test]
async fn terminals_log_in_with_tokens() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let route = host.route();

    let alice_token = auth::token_for(1, "alice");
    let alice = Cim::spawn_args(&["--route", &route, "--token", &alice_token]);
    let (mut alice, _) = Cim::logged_in(alice, 1, "alice").await;

    // Every run of the command mints a fresh 6 s token, as a login service would; the host
    // ends a connection whose token expires, so bob only stays if the client refreshes.
    let secret = host.data_dir.path().join("auth-secret");
    let mint = format!(
        "'{}' token --user-id 2 --name bob --ttl 6s --issuer '{}' --secret-file '{}'",
        binary("cim-host").display(),
        auth::ISSUER,
        secret.display()
    );
    let bob = Cim::spawn_args(&["--route", &route, "--token-command", &mint]);
    let (mut bob, _) = Cim::logged_in(bob, 2, "bob").await;
    alice.type_line("hello bob").await;
    assert_eq!(bob.line().await, "[group] alice(1): hello bob");

    // Past the first token's expiry, still the same connection: nothing else was printed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    bob.type_line("1;;still here").await;
    assert_eq!(alice.line().await, "[private] bob(2): still here");
    assert_eq!(alice.online(2).await, vec!["1 alice", "2 bob"]);

    // A token signed with another key.
    let claims = serde_json::json!({"sub": "3", "iss": auth::ISSUER, "exp": auth::now() + 600});
    let forged =
        auth::sign_with(&claims, jsonwebtoken::Algorithm::HS256, b"not-the-secret-of-this-host-0123456789");
    let mut mallory = Cim::spawn_args(&["--route", &route, "--name", "mallory", "--token", &forged]);
    let line = mallory.line().await;
    assert!(line.starts_with("error: login refused: the token is not valid"), "{line}");
    assert_eq!(mallory.exit_code().await, 3);

    // An expired one.
    let expired = auth::sign(
        &serde_json::json!({"sub": "3", "name": "carol", "iss": auth::ISSUER, "exp": auth::now() - 60}),
    );
    let mut carol = Cim::spawn_args(&["--route", &route, "--token", &expired]);
    let line = carol.line().await;
    assert!(line.starts_with("error: login refused: the token has expired"), "{line}");
    assert_eq!(carol.exit_code().await, 3);

    // A token command that fails.
    let mut dave = Cim::spawn_args(&["--route", &route, "--token-command", "echo no session >&2; exit 7"]);
    let line = dave.line().await;
    assert!(line.contains("the token command failed") && line.contains("no session"), "{line}");
    assert_eq!(dave.exit_code().await, 1);

    host.wait_online(&[1, 2]).await;
}
