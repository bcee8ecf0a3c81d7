//! `cim`: the terminal client. Reads commands and messages from stdin, prints what arrives.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cim_client::history::merge;
use cim_client::input::{COMMANDS, Input, parse_line};
use cim_client::token::{BoxError, TokenFuture, TokenProvider};
use cim_client::{
    Client, ClientConfig, ClientError, ClientEvent, Delivery, ErrorCode, HistoryMessage, HistoryStream,
    MessageHandler, MessageKind, ReconnectPolicy, StaticToken, Transport,
};
use clap::Parser;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Exit status when the user is already online (or was logged in elsewhere).
const EXIT_DUPLICATE_LOGIN: u8 = 2;
/// Exit status when the server refuses the token.
const EXIT_UNAUTHENTICATED: u8 = 3;
/// How many messages `:history` shows without a count.
const DEFAULT_HISTORY: usize = 20;

#[derive(Debug, Parser)]
#[command(
    name = "cim",
    version,
    about = "Terminal client of the cim instant-messaging system",
    long_about = "Terminal client of the cim instant-messaging system.\n\n\
        Logs in through the route API of any cim-host node, connects to the node it picks \
        (TCP, or WebSocket with --ws), then reads stdin line by line and prints every received \
        message on stdout as `[private] NAME(ID): text` or `[group] NAME(ID): text` (messages \
        sent while you were away come first when you log in, printed the same way; each \
        message is printed once). A private message to a user who is offline is stored and \
        delivered when they log in. Errors are printed on stdout as `error: ...`. End of input quits.\n\n\
        When the server verifies user tokens, give one with --token (or CIM_TOKEN), or a \
        command that prints one with --token-command; the token then says who you are, so \
        --user-id and --name may be left out. The client refreshes the token before it \
        expires (running the command again) and gets a new one when it reconnects.",
    after_help = after_help(),
)]
struct Args {
    /// Base URL of the route API of any cim-host node; several, comma-separated, are tried in
    /// order when (re)connecting, so the client survives the loss of one
    #[arg(long, env = "CIM_ROUTE", default_value = "http://127.0.0.1:8080", value_name = "URL[,URL...]")]
    route: String,

    /// Your user id: a positive integer, unique per user (with a token: optional, and if
    /// given it must be the token's user)
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..),
          required_unless_present_any = ["token", "token_command"])]
    user_id: Option<u64>,

    /// Your display name, shown to the people you write to (with a token: optional; the
    /// token's `name` wins)
    #[arg(long, value_name = "NAME", required_unless_present_any = ["token", "token_command"])]
    name: Option<String>,

    /// Your user token (a JWT from your login service); it cannot be refreshed, so the
    /// session ends when it expires unless you use --token-command
    #[arg(
        long,
        env = "CIM_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "token_command"
    )]
    token: Option<String>,

    /// A shell command (run with `sh -c`) that prints a fresh user token on stdout; run at
    /// login, before each refresh and at each reconnect
    #[arg(long, env = "CIM_TOKEN_COMMAND", value_name = "CMD")]
    token_command: Option<String>,

    /// Connect over WebSocket instead of TCP
    #[arg(long)]
    ws: bool,

    /// Send a PING after this many idle seconds (the server may ask for less)
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat: u64,

    /// Seconds to wait for the server to answer a request
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,

    /// Reconnect attempts after a lost connection before giving up (0: do not reconnect);
    /// the default keeps trying for 4 to 7 minutes, past the server's idle timeout
    #[arg(long, value_name = "N", default_value_t = cim_client::config::DEFAULT_RECONNECT_ATTEMPTS)]
    max_reconnects: u32,
}

/// The text after the options in `--help`: the input commands and the exit statuses.
fn after_help() -> String {
    let commands: String = COMMANDS.lines().map(|line| format!("  {line}\n")).collect();
    format!(
        "Input:\n{commands}\n\
         Exit status: 0 on :q or end of input, 2 on a duplicate login, 3 when the token is \
         refused, 1 on other errors.\n\
         Logs go to stderr when RUST_LOG is set (e.g. RUST_LOG=cim_client=debug)."
    )
}

/// Prints one line on stdout and flushes it, so that a reader on a pipe sees it at once.
/// A closed stdout is not worth a panic.
fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What a failed request looks like to the user: the server's own words when it gave some.
fn describe(error: &ClientError) -> String {
    match error {
        ClientError::Server { message, .. } if !message.is_empty() => message.clone(),
        // The server's words already say how long to wait.
        ClientError::RateLimited { message, .. } if !message.is_empty() => message.clone(),
        other => other.to_string(),
    }
}

/// Prints deliveries and connection events; reports the end of the client to `main`.
struct Printer {
    exits: mpsc::UnboundedSender<u8>,
    /// Lines that came before the "logged in" line (messages replayed at login), held until
    /// it is printed; `None` once it is.
    held: std::sync::Mutex<Option<Vec<String>>>,
}

impl Printer {
    fn new(exits: mpsc::UnboundedSender<u8>) -> Self {
        Printer { exits, held: std::sync::Mutex::new(Some(Vec::new())) }
    }

    /// Prints `line`, or holds it until [`Printer::release`].
    fn print(&self, line: String) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_mut() {
            Some(lines) => lines.push(line),
            None => say(line),
        }
    }

    /// Prints the held lines; from now on lines are printed at once.
    fn release(&self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for line in held.take().unwrap_or_default() {
            say(line);
        }
    }
}

impl MessageHandler for Printer {
    fn on_delivery(&self, d: &Delivery) {
        self.print(format!("[{}] {}({}): {}", d.kind.as_str(), d.sender.name, d.sender.id, d.text));
    }

    fn on_missed(&self, kind: MessageKind) {
        self.print(format!(
            "info: some {} messages sent while you were away are no longer kept (:history shows what is)",
            kind.as_str()
        ));
    }

    fn on_event(&self, event: &ClientEvent) {
        match event {
            ClientEvent::Reconnecting { attempt: 1, reason } => {
                say(format_args!("info: connection lost ({reason}); reconnecting"));
            }
            ClientEvent::Reconnecting { attempt, reason } => {
                say(format_args!("info: reconnecting, attempt {attempt} (last one failed: {reason})"));
            }
            ClientEvent::Reconnected { node_id } => {
                say(format_args!("info: reconnected on node {node_id}"));
            }
            ClientEvent::Kicked { code, reason } => {
                say(format_args!("error: disconnected by the server: {reason} ({code})"));
                let status = match code {
                    ErrorCode::DuplicateLogin => EXIT_DUPLICATE_LOGIN,
                    ErrorCode::Unauthenticated => EXIT_UNAUTHENTICATED,
                    _ => 1,
                };
                let _ = self.exits.send(status);
            }
            ClientEvent::Disconnected { reason } => {
                say(format_args!("error: disconnected: {reason}"));
                let _ = self.exits.send(1);
            }
        }
    }
}

/// `:history N`: the newest `limit` messages of both streams, oldest first, after a line
/// that says how many there are.
async fn print_history(client: &Client, limit: usize) -> Result<(), ClientError> {
    let inbox = client.history(HistoryStream::Inbox, limit).await?;
    let group = client.history(HistoryStream::Group, limit).await?;
    let messages = merge(&[inbox, group], limit);
    say(format_args!("── history: {} messages ──", messages.len()));
    for m in &messages {
        say(history_line(m));
    }
    Ok(())
}

/// `HH:MM:SS [private] NAME(ID) -> TO: text` (UTC), or `[group] NAME(ID): text`.
fn history_line(m: &HistoryMessage) -> String {
    let secs = (m.timestamp_ms / 1000) % 86_400;
    let time = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let to = m.to.map(|to| format!(" -> {to}")).unwrap_or_default();
    format!("{time} [{}] {}({}){to}: {}", m.kind, m.from.name, m.from.id, m.text)
}

/// Runs `sh -c CMD` for every token; its stdout, trimmed, is the token.
struct TokenCommand(String);

impl TokenProvider for TokenCommand {
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let output = tokio::process::Command::new("sh")
                .args(["-c", &self.0])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| format!("running the token command: {e}"))?;
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let stderr = stderr.trim();
                let detail = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
                return Err(format!("the token command failed ({}){detail}", output.status).into());
            }
            let token = String::from_utf8(output.stdout)
                .map_err(|_| BoxError::from("the token command printed something that is not UTF-8"))?;
            Ok(token.trim().to_owned())
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say(format_args!("error: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    let status = runtime.block_on(run(args));
    // A read from a terminal may still be blocked in a worker thread: do not wait for it.
    runtime.shutdown_background();
    ExitCode::from(status)
}

async fn run(args: Args) -> u8 {
    let mut config = ClientConfig::new(args.route, args.user_id.unwrap_or(0), args.name.unwrap_or_default());
    config.token = match (args.token, args.token_command) {
        (Some(token), _) => Some(Arc::new(StaticToken(token))),
        (None, Some(command)) => Some(Arc::new(TokenCommand(command))),
        (None, None) => None,
    };
    config.transport = if args.ws { Transport::WebSocket } else { Transport::Tcp };
    config.heartbeat = Duration::from_secs(args.heartbeat);
    config.request_timeout = Duration::from_secs(args.timeout);
    config.reconnect = ReconnectPolicy { max_attempts: Some(args.max_reconnects), ..config.reconnect };

    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let printer = Arc::new(Printer::new(exits_tx));
    let client = match Client::login(config, printer.clone()).await {
        Ok(client) => client,
        Err(e @ ClientError::DuplicateLogin(_)) => {
            say(format_args!("error: {e}"));
            return EXIT_DUPLICATE_LOGIN;
        }
        Err(ClientError::Unauthenticated(reason)) => {
            say(format_args!("error: login refused: the token is not valid: {reason}"));
            return EXIT_UNAUTHENTICATED;
        }
        Err(ClientError::TokenExpired(reason)) => {
            say(format_args!("error: login refused: the token has expired: {reason}"));
            return EXIT_UNAUTHENTICATED;
        }
        Err(e) => {
            say(format_args!("error: login failed: {e}"));
            return 1;
        }
    };
    let me = client.user();
    say(format_args!("logged in as {}({}) on node {}", me.name, me.id, client.node_id()));
    printer.release();

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let status = loop {
        let line = tokio::select! {
            status = exits.recv() => break status.unwrap_or(1),
            line = lines.next_line() => line,
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => break 0,
            Err(e) => {
                say(format_args!("error: reading stdin: {e}"));
                break 1;
            }
        };
        match parse_line(&line) {
            Input::Empty => {}
            Input::Quit => break 0,
            Input::Help => say(COMMANDS),
            Input::Unknown(command) => {
                say(format_args!("error: unknown command {command} (:all lists the commands)"));
            }
            Input::OnlineUsers => match client.online_users().await {
                Ok(users) => {
                    for user in users {
                        say(format_args!("{} {}", user.id, user.name));
                    }
                }
                Err(e) => say(format_args!("error: {}", describe(&e))),
            },
            Input::Private { to, text } => match client.send_private(to, text).await {
                Ok(sent) if sent.stored => {
                    say(format_args!("(user {to} is offline: stored, delivered when they log in)"));
                }
                Ok(_) => {}
                Err(e) => say(format_args!("error: {}", describe(&e))),
            },
            Input::History(limit) => {
                if let Err(e) = print_history(&client, limit.unwrap_or(DEFAULT_HISTORY)).await {
                    say(format_args!("error: {}", describe(&e)));
                }
            }
            Input::Group(text) => {
                if let Err(e) = client.send_group(text).await {
                    say(format_args!("error: {}", describe(&e)));
                }
            }
        }
    };
    client.close().await;
    status
}
