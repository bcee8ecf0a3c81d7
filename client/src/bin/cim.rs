//! `cim`: the terminal client. Reads commands and messages from stdin, prints what arrives.

use std::fmt::Display;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cim_client::input::{COMMANDS, Input, parse_line};
use cim_client::{
    Client, ClientConfig, ClientError, ClientEvent, Delivery, ErrorCode, MessageHandler, ReconnectPolicy,
    Transport,
};
use clap::Parser;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Exit status when the user is already online (or was logged in elsewhere).
const EXIT_DUPLICATE_LOGIN: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "cim",
    version,
    about = "Terminal client of the cim instant-messaging system",
    long_about = "Terminal client of the cim instant-messaging system.\n\n\
        Logs in through the route API of any cim-host node, connects to the node it picks \
        (TCP, or WebSocket with --ws), then reads stdin line by line and prints every received \
        message on stdout as `[private] NAME(ID): text` or `[group] NAME(ID): text`. \
        Errors are printed on stdout as `error: ...`. End of input quits.",
    after_help = after_help(),
)]
struct Args {
    /// Base URL of the route API of any cim-host node; several, comma-separated, are tried in
    /// order when (re)connecting, so the client survives the loss of one
    #[arg(long, env = "CIM_ROUTE", default_value = "http://127.0.0.1:8080", value_name = "URL[,URL...]")]
    route: String,

    /// Your user id: a positive integer, unique per user
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    user_id: u64,

    /// Your display name, shown to the people you write to
    #[arg(long, value_name = "NAME")]
    name: String,

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

    /// Reconnect attempts after a lost connection before giving up (0: do not reconnect)
    #[arg(long, value_name = "N", default_value_t = 20)]
    max_reconnects: u32,
}

/// The text after the options in `--help`: the input commands and the exit statuses.
fn after_help() -> String {
    let commands: String = COMMANDS.lines().map(|line| format!("  {line}\n")).collect();
    format!(
        "Input:\n{commands}\n\
         Exit status: 0 on :q or end of input, 2 on a duplicate login, 1 on other errors.\n\
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
        other => other.to_string(),
    }
}

/// Prints deliveries and connection events; reports the end of the client to `main`.
struct Printer {
    exits: mpsc::UnboundedSender<u8>,
}

impl MessageHandler for Printer {
    fn on_delivery(&self, d: &Delivery) {
        say(format_args!("[{}] {}({}): {}", d.kind.as_str(), d.sender.name, d.sender.id, d.text));
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
                let status = if *code == ErrorCode::DuplicateLogin { EXIT_DUPLICATE_LOGIN } else { 1 };
                let _ = self.exits.send(status);
            }
            ClientEvent::Disconnected { reason } => {
                say(format_args!("error: disconnected: {reason}"));
                let _ = self.exits.send(1);
            }
        }
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
    let mut config = ClientConfig::new(args.route, args.user_id, args.name.clone());
    config.transport = if args.ws { Transport::WebSocket } else { Transport::Tcp };
    config.heartbeat = Duration::from_secs(args.heartbeat);
    config.request_timeout = Duration::from_secs(args.timeout);
    config.reconnect = ReconnectPolicy { max_attempts: Some(args.max_reconnects), ..config.reconnect };

    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let client = match Client::login(config, Arc::new(Printer { exits: exits_tx })).await {
        Ok(client) => client,
        Err(e @ ClientError::DuplicateLogin(_)) => {
            say(format_args!("error: {e}"));
            return EXIT_DUPLICATE_LOGIN;
        }
        Err(e) => {
            say(format_args!("error: login failed: {e}"));
            return 1;
        }
    };
    say(format_args!("logged in as {}({}) on node {}", args.name, args.user_id, client.node_id()));

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
            Input::Private { to, text } => {
                if let Err(e) = client.send_private(to, text).await {
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
