//! The `cim` terminal client as a new user drives it: three clients (two TCP, one
//! WebSocket) chatting through a real host, with stdin and stdout piped.

mod common;

use common::{DEADLINE, Host, binary};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

struct Cim {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Cim {
    fn spawn(host: &Host, id: u64, name: &str, extra: &[&str]) -> Cim {
        let mut child = Command::new(binary("cim"))
            .args(["--route", &host.route(), "--user-id", &id.to_string(), "--name", name])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cim");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Cim { child, stdin, stdout }
    }

    async fn start(host: &Host, id: u64, name: &str, extra: &[&str]) -> Cim {
        let mut c = Cim::spawn(host, id, name, extra);
        let line = c.line().await;
        assert!(line.starts_with(&format!("logged in as {name}({id})")), "{line}");
        c
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.stdout.next_line())
            .await
            .expect("timed out waiting for a line from cim")
            .expect("reading cim's stdout")
            .expect("cim closed its stdout")
    }

    async fn type_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{text}\n").as_bytes()).await.expect("write to cim");
        stdin.flush().await.expect("flush");
    }

    async fn exit_code(&mut self) -> i32 {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("cim did not exit")
            .expect("wait")
            .code()
            .unwrap_or(-1)
    }

    /// `:olu`, read back as `id name` lines.
    async fn online(&mut self, expected: usize) -> Vec<String> {
        self.type_line(":olu").await;
        let mut out = Vec::new();
        for _ in 0..expected {
            out.push(self.line().await);
        }
        out
    }
}

#[tokio::test]
async fn three_terminals_chat() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = Cim::start(&host, 1, "alice", &[]).await;
    let mut bob = Cim::start(&host, 2, "bob", &[]).await;
    let mut carol = Cim::start(&host, 3, "carol", &["--ws"]).await;

    // A group line reaches the other two.
    alice.type_line("hello everyone").await;
    assert_eq!(bob.line().await, "[group] alice(1): hello everyone");
    assert_eq!(carol.line().await, "[group] alice(1): hello everyone");

    // ID;;text reaches only that user: alice's next output is her :olu answer.
    bob.type_line("3;;just for carol").await;
    assert_eq!(carol.line().await, "[private] bob(2): just for carol");
    assert_eq!(alice.online(3).await, vec!["1 alice", "2 bob", "3 carol"]);

    // A second login as an online user is refused, and that client exits non-zero.
    let mut dup = Cim::spawn(&host, 2, "bob-again", &[]);
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
    drop(bob.stdin.take());
    assert_eq!(bob.exit_code().await, 0);
    host.wait_online(&[1]).await;
}
