//! The `cim` terminal client driven through pipes, as a person at a terminal would.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{DEADLINE, binary};

/// The `cim` terminal client with piped stdin/stdout.
pub struct Cim {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Cim {
    pub fn spawn(route: &str, id: u64, name: &str, extra: &[&str]) -> Cim {
        let id = id.to_string();
        let mut args = vec!["--route", route, "--user-id", &id, "--name", name];
        args.extend(extra);
        Cim::spawn_args(&args)
    }

    /// `cim` with exactly these arguments (e.g. a token instead of `--user-id`).
    pub fn spawn_args(args: &[&str]) -> Cim {
        let mut child = Command::new(binary("cim"))
            .args(args)
            .env_remove("CIM_TOKEN")
            .env_remove("CIM_TOKEN_COMMAND")
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

    /// Logs in through `route`; returns the client and the node it landed on.
    pub async fn start(route: &str, id: u64, name: &str, extra: &[&str]) -> (Cim, String) {
        Cim::logged_in(Cim::spawn(route, id, name, extra), id, name).await
    }

    /// Waits for `c` to say it logged in as `name(id)`; returns it and its node.
    pub async fn logged_in(mut c: Cim, id: u64, name: &str) -> (Cim, String) {
        let line = c.line().await;
        let node = line
            .strip_prefix(&format!("logged in as {name}({id}) on node "))
            .unwrap_or_else(|| panic!("unexpected first line from cim {id}: {line:?}"))
            .to_owned();
        (c, node)
    }

    /// Closes stdin: end of input, which quits like `:q`.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    pub async fn line(&mut self) -> String {
        tokio::time::timeout(DEADLINE, self.stdout.next_line())
            .await
            .expect("timed out waiting for a line from cim")
            .expect("reading cim's stdout")
            .expect("cim closed its stdout")
    }

    pub async fn type_line(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{text}\n").as_bytes()).await.expect("write to cim");
        stdin.flush().await.expect("flush");
    }

    /// `:olu`, read back as `id name` lines.
    pub async fn online(&mut self, expected: usize) -> Vec<String> {
        self.type_line(":olu").await;
        let mut out = Vec::new();
        for _ in 0..expected {
            out.push(self.line().await);
        }
        out
    }

    pub async fn exit_code(&mut self) -> i32 {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("cim did not exit")
            .expect("wait")
            .code()
            .unwrap_or(-1)
    }
}
