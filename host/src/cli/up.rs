//! `cim-host up`: its flags and how they become a running node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cim_host::auth::Secret;
use cim_host::cluster::{Cluster, Strategy};
use cim_host::config::{DuplicateLogin, HttpConfig, OfflineMessages};
use cim_host::deploy::{Deployments, Shared};
use cim_host::handlers::Backend;
use cim_host::http::admin::Admin;
use cim_host::limits::{Rate, RateConfig, RateLimits};
use cim_host::manifest::Manifest;
use cim_host::node::Services;
use cim_host::runtime::{PoolShape, Runtime, RuntimeConfig, Shape};
use cim_host::store::embedded::LogSync;
use cim_host::store::{Quota, Retention};
use cim_host::{Config, Node};
use clap::Args;
use tracing::{info, warn};

use crate::{AuthArgs, HandlerArgs, Token, auth, load_manifest, parse_token};

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    #[command(flatten)]
    auth: AuthArgs,
    /// The application manifest: which component handles which event.
    #[arg(long, env = "CIM_MANIFEST", default_value = "spin.toml")]
    manifest: PathBuf,
    /// Build the manifest's components before serving (like `cim-host build`).
    #[arg(long, env = "CIM_BUILD")]
    build: bool,
    /// Address of the TCP listener for clients (port 0 picks a free port).
    #[arg(long, env = "CIM_TCP", default_value = "127.0.0.1:9000")]
    tcp: SocketAddr,
    /// Address of the HTTP listener: route API, /ws, /healthz, /metrics, and /admin unless
    /// --admin-http gives it a listener of its own (port 0 picks a free port).
    #[arg(long, env = "CIM_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Where clients reach the TCP listener (`HOST:PORT`), as the route API hands it out
    /// [default: the bound address]. Needed when binding 0.0.0.0 or behind NAT.
    #[arg(long, env = "CIM_ADVERTISE_TCP", value_name = "HOST:PORT", value_parser = parse_host_port)]
    advertise_tcp: Option<String>,
    /// Where clients and other nodes reach the HTTP listener (`HOST:PORT`); the WebSocket
    /// URL handed out is `ws://<this>/ws` [default: the bound address].
    #[arg(long, env = "CIM_ADVERTISE_HTTP", value_name = "HOST:PORT", value_parser = parse_host_port)]
    advertise_http: Option<String>,
    /// This node's id in routes and the cluster registry [default: node-<pid>].
    #[arg(long, env = "CIM_NODE_ID")]
    node_id: Option<String>,
    /// Heartbeat interval in seconds; a connection silent for three intervals is closed.
    #[arg(long, env = "CIM_HEARTBEAT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat: u64,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "CIM_MAX_FRAME", default_value_t = cim_proto::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Most simultaneous client connections.
    #[arg(long, env = "CIM_MAX_CONNECTIONS", default_value_t = 15_000)]
    max_connections: usize,
    /// Frames queued for one client before it is disconnected as a slow consumer.
    #[arg(long, env = "CIM_OUTBOUND_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    outbound_queue: u64,
    /// Bytes queued for one client before it is disconnected as a slow consumer.
    #[arg(long, env = "CIM_OUTBOUND_QUEUE_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    outbound_queue_bytes: u64,
    /// Seconds a write to a client may make no progress before the connection is closed (a
    /// client that pings but never reads).
    #[arg(long, env = "CIM_WRITE_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    write_timeout: u64,
    /// A rate limit, `ACTION.SCOPE=RATE[:BURST]` per second (burst defaults to twice the
    /// rate; 0 turns it off); repeatable. ACTION: send, online, login; SCOPE: user, ip.
    /// Defaults: send.user=50:200 send.ip=500:2000 online.user=2:10 online.ip=20:100
    /// login.user=2:10 login.ip=20:100.
    #[arg(long = "rate-limit", env = "CIM_RATE_LIMIT", value_delimiter = ',', value_name = "ACTION.SCOPE=RATE[:BURST]", value_parser = parse_rate_limit)]
    rate_limits: Vec<(String, Rate)>,
    /// Turn every rate limit off (benchmarks; a closed test network).
    #[arg(long, env = "CIM_NO_RATE_LIMITS", conflicts_with = "rate_limits")]
    no_rate_limits: bool,
    /// Seconds a new connection has to send LOGIN.
    #[arg(long, env = "CIM_LOGIN_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    login_timeout: u64,
    /// Where pushed component versions and the compile cache are kept.
    #[arg(long, env = "CIM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Enables the admin API (/admin/...) with this bearer token; without a token the admin
    /// API answers 404. Prefer --admin-token-file or CIM_ADMIN_TOKEN (kept out of `ps`).
    #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token)]
    admin_token: Option<Token>,
    /// Enables the admin API with the token in this file (one trailing newline is ignored);
    /// wins over --admin-token.
    #[arg(long, env = "CIM_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serve the admin API on its own listener at this address (e.g. 127.0.0.1:8081) instead
    /// of on the main HTTP port, which then answers 404 under /admin.
    #[arg(long, env = "CIM_ADMIN_HTTP", value_name = "ADDR")]
    admin_http: Option<SocketAddr>,
    /// Most simultaneous HTTP connections per HTTP listener; one more is closed at once
    /// (TCP chat connections are not counted here; see --max-connections).
    #[arg(long, env = "CIM_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    http_max_connections: u64,
    /// Time a client has to send its request headers (`10s`, `500ms`).
    #[arg(long, env = "CIM_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// Time a client has to send its whole request body; a slower one gets 408 and is closed.
    #[arg(long, env = "CIM_HTTP_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    http_body_timeout: Duration,
    /// A browser origin allowed to open /ws (e.g. https://chat.example.com); repeatable.
    /// Default: only the page's own origin (`http(s)://<Host header>`). Clients that send
    /// no Origin (the terminal client, SDKs) are not affected.
    #[arg(long = "allowed-origin", env = "CIM_ALLOWED_ORIGIN", value_delimiter = ',', value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// `GET /metrics` requires the API key (`Authorization: Bearer <key>`) too.
    #[arg(long, env = "CIM_METRICS_REQUIRE_KEY")]
    metrics_require_key: bool,
    #[command(flatten)]
    handlers: HandlerArgs,
    /// The most keys one key-value store may hold; a component's write past it gets
    /// `too-large`. Exact on the memory store; counted by the hosts on Redis
    /// (`<prefix>kv-usage:<store>`), which concurrent writers may overshoot a little.
    #[arg(long, env = "CIM_KV_MAX_KEYS", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    kv_max_keys: u64,
    /// The most one key-value store may hold, in MiB (keys plus values, a list counting its
    /// entries); counted like --kv-max-keys.
    #[arg(long, env = "CIM_KV_MAX_MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    kv_max_mib: u64,
    /// Log lines each handler component may write: `RATE` per second or `RATE:BURST`; `0`
    /// turns the limit off. Lines over it are dropped, and the next line written is preceded
    /// by one saying how many were.
    #[arg(long, env = "CIM_HANDLER_LOG_RATE", default_value = "100:200")]
    handler_log_rate: Rate,
    /// Use the built-in native handlers instead of the manifest's components (for comparisons).
    #[arg(long, env = "CIM_BUILTIN_HANDLERS")]
    builtin_handlers: bool,
    /// Where presence, handler data and the message log live: `embedded` (one node: the log
    /// on disk under --data-dir/log, so a restart loses no message), `memory` (one node,
    /// everything lost on exit: tests and comparisons), or a Redis shared by every node of a
    /// cluster: `redis://HOST:PORT[/DB]` (a Redis Cluster node is detected) or
    /// `redis-cluster://HOST:PORT,HOST:PORT,...` (a Redis Cluster by several seed nodes).
    /// On Redis the log is as durable as Redis is: run it with `appendonly yes`.
    #[arg(long, env = "CIM_STORE", default_value = "embedded")]
    store: String,
    /// When the embedded log's writes reach the disk: `os` (handed to the OS before senders
    /// are answered: survives the host being killed) or `fsync` (also flushed to the disk:
    /// survives a power loss; one fsync per group commit).
    #[arg(long, env = "CIM_LOG_SYNC", value_enum, default_value_t = LogSync::Os)]
    log_sync: LogSync,
    /// Entries the log keeps per inbox and for the group; the oldest go first. A client that
    /// comes back after they went is told it missed messages.
    #[arg(long, env = "CIM_LOG_MAX_ENTRIES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    log_max_entries: u64,
    /// How long the log keeps an entry (e.g. `7d`, `12h`).
    #[arg(long, env = "CIM_LOG_MAX_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
    log_max_age: Duration,
    /// How long a send's client_msg_id is remembered: a resend with it within this window is
    /// answered with the first send's message id and stores nothing.
    #[arg(long, env = "CIM_DEDUP_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    dedup_window: Duration,
    /// A private message to a user who is not connected: `store` it and deliver it at their
    /// next login, or `refuse` it with USER_OFFLINE (CIM's behaviour).
    #[arg(long, env = "CIM_OFFLINE_MESSAGES", value_enum, default_value_t = OfflineMessages::Store)]
    offline_messages: OfflineMessages,
    /// A LOGIN of a user who is already online, without the session's resume token: `refuse`
    /// it (DUPLICATE_LOGIN), or `replace` the old session when the login carries a verified
    /// user token (the old connection is kicked with REPLACED).
    #[arg(long, env = "CIM_DUPLICATE_LOGIN", value_enum, default_value_t = DuplicateLogin::Refuse)]
    duplicate_login: DuplicateLogin,
    /// Prefix of every Redis key and channel, so several clusters can share one Redis.
    #[arg(long, env = "CIM_REDIS_PREFIX", default_value = cim_host::store::redis::DEFAULT_PREFIX)]
    redis_prefix: String,
    /// How `POST /login` picks a node for a user (cluster only).
    #[arg(long, env = "CIM_LB", value_enum, default_value_t = Strategy::ConsistentHash)]
    lb: Strategy,
    /// Seconds a node's registry entry lives without a refresh (refreshed every third of it);
    /// a dead node's users are cleaned up after about this long.
    #[arg(long, env = "CIM_NODE_TTL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    node_ttl: u64,
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

fn parse_rate_limit(s: &str) -> Result<(String, Rate), String> {
    let (key, rate) = s.split_once('=').ok_or("expected ACTION.SCOPE=RATE[:BURST], e.g. send.user=50:200")?;
    let valid = ["send.user", "send.ip", "online.user", "online.ip", "login.user", "login.ip"];
    if !valid.contains(&key) {
        return Err(format!("unknown limit {key:?}; one of {}", valid.join(", ")));
    }
    Ok((key.to_owned(), rate.parse()?))
}

fn rate_config(args: &UpArgs) -> RateConfig {
    if args.no_rate_limits {
        return RateConfig::OFF;
    }
    let mut config = RateConfig::default();
    for (key, rate) in &args.rate_limits {
        let (action, scope) = key.split_once('.').unwrap_or_default();
        let rates = match action {
            "send" => &mut config.send,
            "online" => &mut config.online,
            _ => &mut config.login,
        };
        match scope {
            "user" => rates.per_user = *rate,
            _ => rates.per_ip = *rate,
        }
    }
    config
}

/// The admin token from `--admin-token`/CIM_ADMIN_TOKEN or `--admin-token-file`; `None`
/// (admin API off) when neither is given or the token is empty.
fn admin_token(token: Option<&Token>, file: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    match (token, file) {
        (_, Some(file)) => Ok(Some(Secret::from_file(file).context("--admin-token-file")?)),
        (Some(Token(t)), None) => Ok(t.clone()),
        (None, None) => Ok(None),
    }
}

/// The pools' shape per instance: the flags where given, otherwise the largest of what the
/// manifest's components need (those already built) and the default; and the largest memory
/// cap any component is given.
pub(crate) fn pool_sizing(
    manifest: Option<&Manifest>,
    flags: [Option<u32>; 3],
    memory_cap: usize,
) -> (PoolShape, usize) {
    let mut needed = PoolShape::default();
    let mut largest_cap = memory_cap;
    for spec in manifest.iter().flat_map(|m| m.components.values()) {
        if let Some(mib) = spec.limits.memory_mib {
            largest_cap = largest_cap.max(usize::try_from(mib << 20).unwrap_or(usize::MAX));
        }
        // A component not built yet is reported by the install that follows.
        let Ok(wasm) = std::fs::read(&spec.source) else { continue };
        if let Ok(shape) = Shape::of(&wasm) {
            needed = needed.max(shape.pool());
        }
    }
    let [core_instances, memories, tables] = flags;
    let pool = PoolShape {
        core_instances: core_instances.unwrap_or(needed.core_instances),
        memories: memories.unwrap_or(needed.memories),
        tables: tables.unwrap_or(needed.tables),
    };
    (pool, largest_cap)
}

pub(crate) async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut listeners = vec![("tcp", args.tcp), ("http", args.http)];
    listeners.extend(args.admin_http.map(|a| ("admin", a)));
    let auth = auth(&args.auth, &listeners)?;
    let rates = rate_config(&args);
    info!(sends = ?rates.send, online = ?rates.online, logins = ?rates.login, "rate limits");
    let mut config = Config {
        auth,
        rate_limits: Arc::new(RateLimits::new(rates)),
        outbound_queue_bytes: usize::try_from(args.outbound_queue_bytes).unwrap_or(1 << 20),
        write_timeout: Duration::from_secs(args.write_timeout),
        heartbeat: Duration::from_secs(args.heartbeat),
        max_frame: args.max_frame,
        max_connections: args.max_connections,
        outbound_queue: usize::try_from(args.outbound_queue).unwrap_or(1024),
        login_timeout: Duration::from_secs(args.login_timeout),
        advertise_tcp: args.advertise_tcp,
        advertise_http: args.advertise_http,
        http: HttpConfig {
            max_connections: usize::try_from(args.http_max_connections).unwrap_or(1024),
            header_timeout: args.http_header_timeout,
            body_timeout: args.http_body_timeout,
            allowed_origins: args.allowed_origins,
            metrics_require_key: args.metrics_require_key,
        },
        offline_messages: args.offline_messages == OfflineMessages::Store,
        duplicate_login: args.duplicate_login,
        ..Config::default()
    };
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    let retention = Retention {
        max_entries: args.log_max_entries,
        max_age: args.log_max_age,
        dedup_window: args.dedup_window,
    };
    let store =
        cim_host::store::open(&args.store, &args.data_dir, &args.redis_prefix, retention, args.log_sync)
            .await?;
    let cluster = store
        .as_redis()
        .map(|redis| Cluster::new(redis.clone(), args.lb, Duration::from_secs(args.node_ttl)));
    let services = if args.builtin_handlers {
        info!("using the built-in handlers; the manifest is not loaded");
        Services { store, cluster, ids_dir: Some(args.data_dir.clone()), ..Services::builtin() }
    } else {
        let manifest = load_manifest(&args.manifest)?;
        if args.build {
            cim_host::build::build_all(&manifest)?;
        }
        let handlers = args.handlers.config(Some(&manifest), Some(&args.data_dir));
        info!(
            core_instances = handlers.pool.core_instances,
            memories = handlers.pool.memories,
            tables = handlers.pool.tables,
            instances = handlers.max_instances,
            memory_slot_mib = handlers.memory_slot() >> 20,
            "handler pools sized per instance"
        );
        let runtime = Arc::new(Runtime::new(RuntimeConfig {
            kv_quota: Quota { max_keys: args.kv_max_keys, max_bytes: args.kv_max_mib << 20 },
            log_rate: args.handler_log_rate,
            ..handlers
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
        let admin = admin_token(args.admin_token.as_ref(), args.admin_token_file.as_deref())?
            .map(|t| Admin::new(t, deployments.clone()));
        Services {
            store,
            backend: Backend::Components(runtime),
            admin,
            deployments: Some(deployments),
            cluster,
            ids_dir: Some(args.data_dir.clone()),
        }
    };
    let node_id = config.node_id.clone();
    if args.admin_http.is_some() && services.admin.is_none() {
        warn!("--admin-http is set but no admin token is: the admin listener answers 404");
    }
    let node = Node::bind(config, args.tcp, args.http, args.admin_http, services)
        .await
        .context("starting the node")?;
    // Exactly one line on stdout: scripts and tests wait for it.
    let admin = node.admin_addr.map(|a| format!(" admin={a}")).unwrap_or_default();
    println!("cim-host ready node={node_id} tcp={} http={}{admin}", node.tcp_addr, node.http_addr);
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
