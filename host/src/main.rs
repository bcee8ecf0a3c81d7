//! The `cim-host` binary: command-line parsing and signal handling around [`cim_host::Node`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use cim_host::handlers::Handlers;
use cim_host::store::Store;
use cim_host::{Config, Node};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// cim-host: a node of the cim instant-messaging system.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve clients: TCP frames, WebSocket at /ws and the HTTP route API.
    Up(UpArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    /// The application manifest (which component handles which event).
    #[arg(long, default_value = "spin.toml")]
    manifest: PathBuf,
    /// Address of the TCP listener for clients (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000")]
    tcp: SocketAddr,
    /// Address of the HTTP listener: route API, /ws, /healthz, /metrics (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// This node's id in routes and the cluster registry [default: node-<pid>].
    #[arg(long)]
    node_id: Option<String>,
    /// Heartbeat interval in seconds; a connection silent for three intervals is closed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat: u64,
    /// Largest frame accepted, in bytes.
    #[arg(long, default_value_t = cim_proto::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Most simultaneous client connections.
    #[arg(long, default_value_t = 15_000)]
    max_connections: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Up(args) => runtime.block_on(up(args)),
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = Config {
        heartbeat: Duration::from_secs(args.heartbeat),
        max_frame: args.max_frame,
        max_connections: args.max_connections,
        ..Config::default()
    };
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    let _ = args.manifest;
    let node_id = config.node_id.clone();
    let node = Node::bind(config, args.tcp, args.http, Store::memory(), Handlers::builtin())
        .await
        .context("starting the node")?;
    // Exactly one line on stdout: scripts and tests wait for it.
    println!("cim-host ready node={node_id} tcp={} http={}", node.tcp_addr, node.http_addr);
    shutdown_signal().await?;
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
