//! The `cim-host` binary: command-line parsing and signal handling around [`cim_host::Node`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cim_host::admin::Admin;
use cim_host::cluster::{Cluster, Strategy};
use cim_host::deploy::{Deployments, Shared};
use cim_host::handlers::Backend;
use cim_host::manifest::Manifest;
use cim_host::node::Services;
use cim_host::runtime::{Runtime, RuntimeConfig};
use cim_host::store::Store;
use cim_host::{Config, Node};
use clap::{Args, Parser, Subcommand};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// cim-host: a node of the cim instant-messaging system, whose business logic runs in
/// hot-swappable WebAssembly components.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve clients: TCP frames, WebSocket at /ws, the HTTP route API and the admin API.
    Up(Box<UpArgs>),
    /// Build every component of the manifest (runs each `[component.NAME.build] command`).
    Build {
        /// The application manifest.
        #[arg(long, default_value = "spin.toml")]
        manifest: PathBuf,
    },
    /// Upload a new version of a component to a running host; prints the new version.
    Push {
        /// The component's id in the manifest (e.g. group-send).
        name: String,
        /// The component's .wasm file.
        file: PathBuf,
        /// The host's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        to: String,
        /// The host's admin token.
        #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Roll a component on a running host back to its previous version.
    Rollback {
        /// The component's id in the manifest.
        name: String,
        /// The host's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        to: String,
        /// The host's admin token.
        #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Debug, Args)]
struct UpArgs {
    /// The application manifest: which component handles which event.
    #[arg(long, default_value = "spin.toml")]
    manifest: PathBuf,
    /// Build the manifest's components before serving (like `cim-host build`).
    #[arg(long)]
    build: bool,
    /// Address of the TCP listener for clients (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000")]
    tcp: SocketAddr,
    /// Address of the HTTP listener: route API, /ws, /healthz, /metrics, /admin (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Where clients reach the TCP listener (`HOST:PORT`), as the route API hands it out
    /// [default: the bound address]. Needed when binding 0.0.0.0 or behind NAT.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    advertise_tcp: Option<String>,
    /// Where clients and other nodes reach the HTTP listener (`HOST:PORT`); the WebSocket
    /// URL handed out is `ws://<this>/ws` [default: the bound address].
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    advertise_http: Option<String>,
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
    /// Frames queued for one client before it is disconnected as a slow consumer.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    outbound_queue: u64,
    /// Seconds a new connection has to send LOGIN.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    login_timeout: u64,
    /// Where pushed component versions and the compile cache are kept.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Enables the admin API (/admin/...) with this bearer token; without it the admin API answers 404.
    #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Wall-clock budget of one call to a handler on a sender's path (login, private, group,
    /// online), in milliseconds; a guest past it is stopped and the request fails.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    handler_deadline_ms: u64,
    /// Wall-clock budget of one message-callback call, in milliseconds. It runs after
    /// delivery, off the senders' path, so it may wait longer on the store.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    callback_deadline_ms: u64,
    /// Memory cap of one handler instance, in MiB.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    handler_memory_mib: u64,
    /// Use the built-in native handlers instead of the manifest's components (for comparisons).
    #[arg(long)]
    builtin_handlers: bool,
    /// Where routes, presence and handler data live: `memory` (one node) or a Redis shared
    /// by every node of a cluster: `redis://HOST:PORT[/DB]` (a Redis Cluster node is detected)
    /// or `redis-cluster://HOST:PORT,HOST:PORT,...` (a Redis Cluster by several seed nodes).
    #[arg(long, default_value = "memory")]
    store: String,
    /// Prefix of every Redis key and channel, so several clusters can share one Redis.
    #[arg(long, default_value = cim_host::store::redis::DEFAULT_PREFIX)]
    redis_prefix: String,
    /// How `POST /login` picks a node for a user (cluster only).
    #[arg(long, value_enum, default_value_t = Strategy::ConsistentHash)]
    lb: Strategy,
    /// Seconds a node's registry entry lives without a refresh (refreshed every third of it);
    /// a dead node's users are cleaned up after about this long.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    node_ttl: u64,
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
        Command::Up(args) => runtime.block_on(up(*args)),
        Command::Build { manifest } => cim_host::build::build_all(&load_manifest(&manifest)?),
        Command::Push { name, file, to, token } => {
            println!("{}", runtime.block_on(cim_host::push::push(&to, &token, &name, &file))?);
            Ok(())
        }
        Command::Rollback { name, to, token } => {
            println!("{}", runtime.block_on(cim_host::push::rollback(&to, &token, &name))?);
            Ok(())
        }
    }
}

/// `HOST:PORT` with a non-empty host (a name, an IPv4 address or a bracketed IPv6 one) and
/// a port from 1 to 65535.
fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s.rsplit_once(':').ok_or("expected HOST:PORT")?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    if port == 0 {
        return Err("port 0 cannot be advertised".into());
    }
    let bare_v6 = host.contains(':') && !(host.starts_with('[') && host.ends_with(']'));
    if host.is_empty() || bare_v6 || host.contains(['/', ' ']) {
        return Err(format!("bad host {host:?} (an IPv6 address goes in brackets: [::1]:9000)"));
    }
    Ok(s.to_owned())
}

fn load_manifest(path: &Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).with_context(|| format!("loading the manifest {}", path.display()))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = Config {
        heartbeat: Duration::from_secs(args.heartbeat),
        max_frame: args.max_frame,
        max_connections: args.max_connections,
        outbound_queue: usize::try_from(args.outbound_queue).unwrap_or(1024),
        login_timeout: Duration::from_secs(args.login_timeout),
        advertise_tcp: args.advertise_tcp,
        advertise_http: args.advertise_http,
        ..Config::default()
    };
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    let store = match args.store.as_str() {
        "memory" => Store::memory(),
        url if ["redis://", "rediss://", cim_host::store::redis::CLUSTER_SCHEME]
            .iter()
            .any(|s| url.starts_with(s)) =>
        {
            Store::redis(url, &args.redis_prefix).await.with_context(|| {
                format!("connecting to the store {}", cim_host::store::redis::redacted(url))
            })?
        }
        other => {
            anyhow::bail!("--store must be `memory`, a redis:// or a redis-cluster:// URL, got {other:?}")
        }
    };
    let cluster = match &store {
        Store::Redis(redis) => Some(Cluster::new(redis.clone(), args.lb, Duration::from_secs(args.node_ttl))),
        Store::Memory(_) => None,
    };
    let services = if args.builtin_handlers {
        info!("using the built-in handlers; the manifest is not loaded");
        Services { store, cluster, ..Services::builtin() }
    } else {
        let manifest = load_manifest(&args.manifest)?;
        if args.build {
            cim_host::build::build_all(&manifest)?;
        }
        let runtime = Arc::new(Runtime::new(RuntimeConfig {
            deadline: Duration::from_millis(args.handler_deadline_ms),
            callback_deadline: Duration::from_millis(args.callback_deadline_ms),
            memory_cap: usize::try_from(args.handler_memory_mib << 20).unwrap_or(usize::MAX),
            ..RuntimeConfig::with_data_dir(&args.data_dir)
        })?);
        runtime.install_manifest(&manifest).await.with_context(|| {
            format!(
                "installing the components of {} (not built yet? run `cim-host build` or start with `cim-host up --build`)",
                args.manifest.display()
            )
        })?;
        let shared = cluster.as_ref().map(|c| Shared { store: store.clone(), bus: c.bus.clone() });
        let deployments =
            Arc::new(Deployments::new(&args.data_dir, Arc::new(manifest), runtime.clone(), shared));
        deployments.restore().await?;
        let admin = args.admin_token.filter(|t| !t.is_empty()).map(|t| Admin::new(t, deployments.clone()));
        Services {
            store,
            backend: Backend::Components(runtime),
            admin,
            deployments: Some(deployments),
            cluster,
        }
    };
    let node_id = config.node_id.clone();
    let node = Node::bind(config, args.tcp, args.http, services).await.context("starting the node")?;
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
