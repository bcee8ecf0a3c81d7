//! The `cim-host` binary: command-line parsing and signal handling around [`cim_host::Node`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cim_host::auth::{Auth, Secret, Verifier, token};
use cim_host::cluster::{Cluster, Strategy};
use cim_host::config::HttpConfig;
use cim_host::deploy::{Deployments, Shared};
use cim_host::handlers::Backend;
use cim_host::http::admin::Admin;
use cim_host::limits::{Rate, RateConfig, RateLimits};
use cim_host::manifest::Manifest;
use cim_host::node::Services;
use cim_host::runtime::{Runtime, RuntimeConfig};
use cim_host::store::{Quota, Store};
use cim_host::{Config, Node};
use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};
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
        /// The host's admin API: `http://HOST:PORT` or `https://HOST[:PORT]` (the main HTTP
        /// port, or the `--admin-http` listener when the host has one).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        to: String,
        #[command(flatten)]
        token: AdminTokenArgs,
    },
    /// Mint a user token (HS256) for trying cim out with authentication on. Prints only the
    /// token. In production, the operator's own login service issues tokens.
    Token(TokenArgs),
    /// Roll a component on a running host back to its previous version.
    Rollback {
        /// The component's id in the manifest.
        name: String,
        /// The host's admin API: `http://HOST:PORT` or `https://HOST[:PORT]` (the main HTTP
        /// port, or the `--admin-http` listener when the host has one).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        to: String,
        #[command(flatten)]
        token: AdminTokenArgs,
    },
}

/// Where `push`/`rollback` find the admin token.
#[derive(Debug, Args)]
struct AdminTokenArgs {
    /// The host's admin token (better: CIM_ADMIN_TOKEN or --token-file, which stay out of
    /// the process list).
    #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token)]
    token: Option<Token>,
    /// A file holding the host's admin token (one trailing newline is ignored); wins over
    /// --token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl AdminTokenArgs {
    fn secret(&self) -> anyhow::Result<Secret> {
        match (&self.token, &self.token_file) {
            (_, Some(file)) => Secret::from_file(file).context("--token-file"),
            (Some(Token(Some(t))), None) => Ok(t.clone()),
            _ => anyhow::bail!("no admin token: set CIM_ADMIN_TOKEN or pass --token-file FILE"),
        }
    }
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The user the token is for (its `sub`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    user_id: u64,
    /// The display name (the `name` claim).
    #[arg(long)]
    name: Option<String>,
    /// How long the token is valid: `90s`, `30m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The HS256 secret, the same file the host was started with (raw bytes; one trailing
    /// newline is ignored).
    #[arg(long, env = "CIM_AUTH_HMAC_SECRET_FILE")]
    secret_file: PathBuf,
    /// The `iss` claim (needed when the host checks --auth-issuer).
    #[arg(long)]
    issuer: Option<String>,
    /// The `aud` claim (needed when the host checks --auth-audience).
    #[arg(long)]
    audience: Option<String>,
    /// Extra claims as one JSON object, e.g. '{"role":"admin"}', for login handlers that
    /// authorize on them.
    #[arg(long, value_parser = parse_claims)]
    claims: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How the host authenticates users and services.
#[derive(Debug, Args)]
struct AuthArgs {
    /// Verify user tokens signed with HS256 with the secret in this file (raw bytes; one
    /// trailing newline is ignored). LOGIN and `POST /login` then need a token whose `sub`
    /// is the user id.
    #[arg(long, env = "CIM_AUTH_HMAC_SECRET_FILE", value_name = "FILE", conflicts_with = "auth_public_key")]
    auth_hmac_secret_file: Option<PathBuf>,
    /// Verify user tokens signed with RS256/ES256/EdDSA (or another algorithm of the key's
    /// family) with this public key: a PEM file, or a JWKS (JSON) whose keys are picked by `kid`.
    #[arg(long, env = "CIM_AUTH_PUBLIC_KEY", value_name = "FILE")]
    auth_public_key: Option<PathBuf>,
    /// Refuse tokens whose `iss` is not this.
    #[arg(long, value_name = "ISS")]
    auth_issuer: Option<String>,
    /// Refuse tokens whose `aud` does not include this.
    #[arg(long, value_name = "AUD")]
    auth_audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=300))]
    auth_leeway_secs: u64,
    /// The key backend services send (`Authorization: Bearer <key>`) to the service endpoints
    /// (`/send/*`, `/offline`, `/online`, anyone's `/history`, and `/metrics` with
    /// --metrics-require-key): a file with the raw key. With user tokens but no key, those
    /// endpoints are closed.
    #[arg(long, env = "CIM_API_KEY_FILE", value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve without authentication on non-loopback addresses anyway. Anyone who can reach
    /// the ports can then log in as anyone: for isolated test networks only.
    #[arg(long)]
    insecure_no_auth: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    auth: AuthArgs,
    /// The application manifest: which component handles which event.
    #[arg(long, default_value = "spin.toml")]
    manifest: PathBuf,
    /// Build the manifest's components before serving (like `cim-host build`).
    #[arg(long)]
    build: bool,
    /// Address of the TCP listener for clients (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000")]
    tcp: SocketAddr,
    /// Address of the HTTP listener: route API, /ws, /healthz, /metrics, and /admin unless
    /// --admin-http gives it a listener of its own (port 0 picks a free port).
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
    /// Bytes queued for one client before it is disconnected as a slow consumer.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    outbound_queue_bytes: u64,
    /// Seconds a write to a client may make no progress before the connection is closed (a
    /// client that pings but never reads).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    write_timeout: u64,
    /// A rate limit, `ACTION.SCOPE=RATE[:BURST]` per second (burst defaults to twice the
    /// rate; 0 turns it off); repeatable. ACTION: send, online, login; SCOPE: user, ip.
    /// Defaults: send.user=50:200 send.ip=500:2000 online.user=2:10 online.ip=20:100
    /// login.user=2:10 login.ip=20:100.
    #[arg(long = "rate-limit", value_name = "ACTION.SCOPE=RATE[:BURST]", value_parser = parse_rate_limit)]
    rate_limits: Vec<(String, Rate)>,
    /// Turn every rate limit off (benchmarks; a closed test network).
    #[arg(long, conflicts_with = "rate_limits")]
    no_rate_limits: bool,
    /// Seconds a new connection has to send LOGIN.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    login_timeout: u64,
    /// Where pushed component versions and the compile cache are kept.
    #[arg(long, default_value = "data")]
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
    #[arg(long, value_name = "ADDR")]
    admin_http: Option<SocketAddr>,
    /// Most simultaneous HTTP connections per HTTP listener; one more is closed at once
    /// (TCP chat connections are not counted here; see --max-connections).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    http_max_connections: u64,
    /// Time a client has to send its request headers (`10s`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// Time a client has to send its whole request body; a slower one gets 408 and is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    http_body_timeout: Duration,
    /// A browser origin allowed to open /ws (e.g. https://chat.example.com); repeatable.
    /// Default: only the page's own origin (`http(s)://<Host header>`). Clients that send
    /// no Origin (the terminal client, SDKs) are not affected.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// `GET /metrics` requires the API key (`Authorization: Bearer <key>`) too.
    #[arg(long)]
    metrics_require_key: bool,
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
    /// The most keys one key-value store may hold; a component's write past it gets
    /// `too-large`. Exact on the memory store; counted by the hosts on Redis
    /// (`<prefix>kv-usage:<store>`), which concurrent writers may overshoot a little.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    kv_max_keys: u64,
    /// The most one key-value store may hold, in MiB (keys plus values, a list counting its
    /// entries); counted like --kv-max-keys.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    kv_max_mib: u64,
    /// Log lines each handler component may write: `RATE` per second or `RATE:BURST`; `0`
    /// turns the limit off. Lines over it are dropped, and the next line written is preceded
    /// by one saying how many were.
    #[arg(long, default_value = "100:200")]
    handler_log_rate: Rate,
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
            let token = token.secret()?;
            println!("{}", runtime.block_on(cim_host::push::push(&to, &token, &name, &file))?);
            Ok(())
        }
        Command::Token(args) => {
            println!("{}", mint(&args)?);
            Ok(())
        }
        Command::Rollback { name, to, token } => {
            let token = token.secret()?;
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

fn parse_claims(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err("expected a JSON object, e.g. '{\"role\":\"admin\"}'".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn mint(args: &TokenArgs) -> anyhow::Result<String> {
    let secret = Secret::from_file(&args.secret_file)?;
    let req = token::MintRequest {
        user_id: args.user_id,
        name: args.name.clone(),
        ttl: args.ttl,
        issuer: args.issuer.clone(),
        audience: args.audience.clone(),
        extra: args.claims.clone().unwrap_or_default(),
    };
    token::mint(&secret, &req).context("signing the token")
}

/// The node's authentication from the flags. Without user tokens, every listener must be
/// on loopback unless `--insecure-no-auth` says otherwise.
fn auth(args: &AuthArgs, listeners: &[(&str, SocketAddr)]) -> anyhow::Result<Auth> {
    let expect = token::Expectations {
        issuer: args.auth_issuer.clone(),
        audience: args.auth_audience.clone(),
        leeway: Duration::from_secs(args.auth_leeway_secs),
    };
    let users = match (&args.auth_hmac_secret_file, &args.auth_public_key) {
        (Some(file), _) => {
            let secret = Secret::from_file(file).context("--auth-hmac-secret-file")?;
            if secret.expose().len() < 32 {
                warn!("the HMAC secret is {} bytes; use at least 32 random bytes", secret.expose().len());
            }
            Some(Verifier::hmac(&secret, expect)?)
        }
        (None, Some(file)) => Some(Verifier::public_key_file(file, expect).context("--auth-public-key")?),
        (None, None) => None,
    };
    let api_key = match &args.api_key_file {
        Some(file) => Some(Arc::new(Secret::from_file(file).context("--api-key-file")?)),
        None => None,
    };
    match &users {
        Some(v) => info!(keys = v.describe(), "user tokens required"),
        None => {
            let exposed: Vec<String> = listeners
                .iter()
                .filter(|(_, a)| !a.ip().is_loopback())
                .map(|(name, a)| format!("{name} {a}"))
                .collect();
            if !exposed.is_empty() && !args.insecure_no_auth {
                anyhow::bail!(
                    "refusing to serve without authentication on {}: anyone reaching it could log in as \
                     anyone. Pass --auth-hmac-secret-file FILE or --auth-public-key FILE (and \
                     --api-key-file FILE for the service endpoints), bind to 127.0.0.1, or pass \
                     --insecure-no-auth to insist",
                    exposed.join(", ")
                );
            }
            warn!(
                "authentication is OFF (no --auth-hmac-secret-file or --auth-public-key): any client \
                 can log in as any user; fine on loopback for development only"
            );
        }
    }
    if users.is_some() && api_key.is_none() {
        info!(
            "no --api-key-file: the service endpoints (/send/*, /offline, /online, others' /history) are closed"
        );
    }
    Ok(Auth { users: users.map(Arc::new), api_key })
}

/// A token given on the command line or in the environment, held as a [`Secret`] from the
/// start so that no `Debug` of the arguments shows it; empty: none.
#[derive(Debug, Clone)]
struct Token(Option<Secret>);

fn parse_token(s: &str) -> Result<Token, String> {
    Ok(Token(Secret::new(s.as_bytes(), "token").ok()))
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

fn load_manifest(path: &Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).with_context(|| format!("loading the manifest {}", path.display()))
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
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
            kv_quota: Quota { max_keys: args.kv_max_keys, max_bytes: args.kv_max_mib << 20 },
            log_rate: args.handler_log_rate,
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
        let admin = admin_token(args.admin_token.as_ref(), args.admin_token_file.as_deref())?
            .map(|t| Admin::new(t, deployments.clone()));
        Services {
            store,
            backend: Backend::Components(runtime),
            admin,
            deployments: Some(deployments),
            cluster,
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
