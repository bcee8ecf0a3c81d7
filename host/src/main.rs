//! The `cim-host` binary: command-line parsing and signal handling around [`cim_host::Node`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cim_host::auth::{Auth, Secret, Verifier, token};
use cim_host::handlers::Event;
use cim_host::manifest::Manifest;
use cim_host::runtime::RuntimeConfig;
use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: a profile of the at-least-once p2p run put ~21% of the
/// host's CPU in glibc's allocator (`_int_malloc`, `malloc_consolidate`, `unlink_chunk`, …),
/// spread over the log writer, the sessions and the guests' threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "cli/new.rs"]
mod new;
#[path = "cli/up.rs"]
mod up;
use up::{UpArgs, pool_sizing};

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
    /// Write the WIT contract this host checks components against (the `cim:im` package)
    /// into a directory, for building handlers outside this repository.
    Wit {
        /// Where to write the `.wit` files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write a ready-to-build handler project for EVENT in Rust, Python or JavaScript (the
    /// handler, its build files, the WIT contract, a README with build, check and push).
    New(new::NewArgs),
    /// Tell whether a push of FILE for EVENT would be accepted, without a running host: the
    /// same checks (world, imports, pools, memory cap) with the same flags, and the memory
    /// headroom. Exits non-zero with the reason and its fix when it would be refused.
    Check {
        /// The component's .wasm file.
        file: PathBuf,
        /// The event it would handle: login, private, group, online or callback.
        #[arg(long, value_parser = parse_event)]
        event: Event,
        /// The manifest whose limits and capabilities apply (those of the component mapped
        /// to EVENT) and whose components size the pools; ignored if the file does not exist.
        #[arg(long, default_value = "spin.toml")]
        manifest: PathBuf,
        #[command(flatten)]
        handlers: HandlerArgs,
    },
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
    #[arg(long, env = "CIM_AUTH_ISSUER", value_name = "ISS")]
    auth_issuer: Option<String>,
    /// Refuse tokens whose `aud` does not include this.
    #[arg(long, env = "CIM_AUTH_AUDIENCE", value_name = "AUD")]
    auth_audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    #[arg(long, env = "CIM_AUTH_LEEWAY_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=300))]
    auth_leeway_secs: u64,
    /// The key backend services send (`Authorization: Bearer <key>`) to the service endpoints
    /// (`/send/*`, `/offline`, `/online`, anyone's `/history`, and `/metrics` with
    /// --metrics-require-key): a file with the raw key. With user tokens but no key, those
    /// endpoints are closed.
    #[arg(long, env = "CIM_API_KEY_FILE", value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve without authentication on non-loopback addresses anyway. Anyone who can reach
    /// the ports can then log in as anyone: for isolated test networks only.
    #[arg(long, env = "CIM_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

/// The limits handler components run under (`up` and `check`).
#[derive(Debug, Args)]
struct HandlerArgs {
    /// Wall-clock budget of one call to a handler on a sender's path (login, private, group,
    /// online), in milliseconds; a guest past it is stopped and the request fails.
    #[arg(long, env = "CIM_HANDLER_DEADLINE_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    handler_deadline_ms: u64,
    /// Wall-clock budget of one message-callback call, in milliseconds. It runs after
    /// delivery, off the senders' path, so it may wait longer on the store.
    #[arg(long, env = "CIM_CALLBACK_DEADLINE_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    callback_deadline_ms: u64,
    /// Memory cap of one handler instance (each of its linear memories), in MiB; a
    /// component's `memory_mib` in `[component.NAME.limits]` overrides it.
    #[arg(long, env = "CIM_HANDLER_MEMORY_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    handler_memory_mib: u64,
    /// The most handler instances alive at once (the pool's size), and the default of each
    /// component's `max_instances`; a call past either fails at once.
    #[arg(long, env = "CIM_HANDLER_MAX_INSTANCES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    handler_max_instances: u32,
    /// Core instances the pools hold per handler instance [default: what the largest
    /// component in the manifest needs, at least 16]. A pushed component that needs more is
    /// refused.
    #[arg(long, env = "CIM_POOL_CORE_INSTANCES", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pool_core_instances: Option<u32>,
    /// Linear memories the pools hold per handler instance [default: from the manifest, at
    /// least 2].
    #[arg(long, env = "CIM_POOL_MEMORIES", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pool_memories: Option<u32>,
    /// Tables the pools hold per handler instance [default: from the manifest, at least 4].
    #[arg(long, env = "CIM_POOL_TABLES", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pool_tables: Option<u32>,
}

impl HandlerArgs {
    /// The runtime configuration these flags and the manifest's components give.
    fn config(&self, manifest: Option<&Manifest>, data_dir: Option<&Path>) -> RuntimeConfig {
        let memory_cap = usize::try_from(self.handler_memory_mib << 20).unwrap_or(usize::MAX);
        let (pool, largest_memory_cap) = pool_sizing(
            manifest,
            [self.pool_core_instances, self.pool_memories, self.pool_tables],
            memory_cap,
        );
        let base = data_dir.map_or_else(RuntimeConfig::default, RuntimeConfig::with_data_dir);
        RuntimeConfig {
            deadline: Duration::from_millis(self.handler_deadline_ms),
            callback_deadline: Duration::from_millis(self.callback_deadline_ms),
            memory_cap,
            largest_memory_cap,
            pool,
            max_instances: self.handler_max_instances,
            ..base
        }
    }
}

/// Errors end as one paragraph on stderr (`error: what: why: cause`), never as a Debug dump
/// with a backtrace: a refused push is an answer to the operator, not a crash.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Up(args) => runtime.block_on(up::up(*args)),
        Command::Build { manifest } => cim_host::build::build_all(&load_manifest(&manifest)?),
        Command::Push { name, file, to, token } => {
            let token = token.secret()?;
            println!("{}", runtime.block_on(cim_host::push::push(&to, &token, &name, &file))?);
            Ok(())
        }
        Command::Wit { out } => {
            let written =
                cim_host::wit::export(&out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} files of {} to {}",
                written.len(),
                cim_host::runtime::WIT_PACKAGE,
                out.display()
            );
            Ok(())
        }
        Command::New(args) => new::new(args),
        Command::Check { file, event, manifest, handlers } => {
            let manifest = if manifest.exists() { Some(load_manifest(&manifest)?) } else { None };
            let config = handlers.config(manifest.as_ref(), None);
            println!(
                "{}",
                runtime.block_on(cim_host::check::check(&file, event, manifest.as_ref(), config))?
            );
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

fn parse_event(s: &str) -> Result<Event, String> {
    Event::ALL
        .into_iter()
        .find(|e| e.as_str() == s)
        .ok_or_else(|| "expected one of login, private, group, online, callback".to_owned())
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

fn load_manifest(path: &Path) -> anyhow::Result<Manifest> {
    Manifest::load(path).with_context(|| format!("loading the manifest {}", path.display()))
}
