//! `cim-bench`: a load generator for cim and, with the same workload, for its peers
//! (Mosquitto over MQTT, NATS). One user is one connection everywhere; the hot path speaks
//! each protocol directly (cim frames over raw TCP, `rumqttc`, `async-nats`).
//!
//! # Layout
//! - [`peer`]: the targets behind one surface (connect a user, send, close).
//! - [`scenario`]: p2p, group, conns, idle, handler, smoke.
//! - [`payload`]: payloads stamped with their send time; [`stats`]: histograms, `/proc`.
//! - [`report`]: the JSON report and the terminal table; [`markdown`]: `docs/BENCHMARKS.md`
//!   from a directory of JSON reports (`cim-bench report`).
//! - [`progress`]: progress bars (only on a terminal).

mod markdown;
mod payload;
mod peer;
mod progress;
mod report;
mod scenario;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::peer::cim::Tokens;
use crate::peer::{Connector, Delivery, Target};
use crate::report::{Outcome, Report};
use crate::scenario::Env;
use crate::scenario::conns::ConnsArgs;
use crate::scenario::group::GroupArgs;
use crate::scenario::handler::HandlerArgs;
use crate::scenario::idle::IdleArgs;
use crate::scenario::p2p::P2pArgs;
use cim_host::auth::secret::Secret;

/// Load generator for cim and its peers (Mosquitto, NATS).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// System under test: cim://HOST:PORT (the route API; connections go where POST /login
    /// says), mqtt://HOST:PORT, nats://HOST:PORT.
    #[arg(long, global = true, default_value = "cim://127.0.0.1:8080", env = "CIM_BENCH_TARGET")]
    target: Target,
    /// Write the report as JSON to FILE as well (`-`: JSON on stdout, the table on stderr).
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The server's process id: its CPU use (p2p, group) and memory (conns) are reported.
    #[arg(long, global = true, value_name = "PID")]
    server_pid: Option<u32>,
    /// Connections opened at once while setting up.
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// Seconds without any delivery after which a run stops (what is missing counts as lost).
    #[arg(long, global = true, default_value_t = 10)]
    idle_timeout: u64,
    /// cim with authentication on: every simulated user logs in with its own HS256 token,
    /// signed with the secret in FILE (the host's `--auth-hmac-secret-file`). The report's
    /// kind is then `cim-auth`, shown beside plain cim in `cim-bench report`.
    #[arg(long, global = true, value_name = "FILE", env = "CIM_BENCH_TOKEN_SECRET_FILE")]
    token_secret_file: Option<PathBuf>,
    /// The `iss` claim of those tokens (the host's `--auth-issuer`, if it checks one).
    #[arg(long, global = true, value_name = "ISS", requires = "token_secret_file")]
    token_issuer: Option<String>,
    /// Lifetime of those tokens in seconds (a run must end before they expire).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    token_ttl: u64,
    /// Report under this kind instead of the target's (`cim`, `mqtt`, `nats`, `cim-auth`),
    /// e.g. `cim-redis` for a host on the Redis store or `cim-native` for one with
    /// `--builtin-handlers`; `cim-bench report` knows both.
    #[arg(long, global = true, value_name = "KIND")]
    kind: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sender → receiver pairs: throughput and end-to-end latency.
    P2p(P2pCli),
    /// One sender, N recipients: fan-out latency and deliveries/s.
    Group(GroupCli),
    /// N idle logged-in connections: connect rate and server memory per connection.
    Conns(ConnsCli),
    /// No clients at all: the server's own CPU use (needs --server-pid; no connection made).
    Idle(IdleCli),
    /// Per-request overhead of each handler component (in process, no server; use --release).
    Handler(HandlerCli),
    /// Every scenario with tiny numbers; exits 1 if a message is lost or a request fails.
    Smoke(SmokeCli),
    /// Writes the Markdown comparison from a directory of JSON reports.
    Report(ReportCli),
}

#[derive(Debug, Args)]
struct P2pCli {
    /// Sender → receiver pairs (two connections each).
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// Messages per pair.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Total messages/s across all pairs; without it, as fast as the window allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Payload size in bytes (at least 24: send time and sequence number).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per pair sent but not yet received.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Unpaced runs; the median is the max throughput.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Measure the max throughput, then run again paced at 50% of it; report both.
    #[arg(long)]
    half_load: bool,
    /// 0: each target's plain mode (MQTT QoS 0, core NATS). 1: at least once, each target's
    /// durable mode: cim sends with a client_msg_id, counted when ACKed (in the log), receivers
    /// acking positions; MQTT QoS 1 on persistent sessions; NATS JetStream (file stream,
    /// durable consumers). The servers must be set up for it (Mosquitto persistence, `-js`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
}

#[derive(Debug, Args)]
struct GroupCli {
    /// Recipients online (the sender is one more connection).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Group messages sent.
    #[arg(long, default_value_t = 100)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages not yet received by every recipient (1: each message alone, pure fan-out latency).
    #[arg(long, default_value_t = 1)]
    window: usize,
}

#[derive(Debug, Args)]
struct ConnsCli {
    /// Connections to open and log in.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Seconds to hold them before measuring the server's memory and closing.
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
}

#[derive(Debug, Args)]
struct IdleCli {
    /// Seconds to watch the server for (sampled about once a second).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
}

#[derive(Debug, Args)]
struct HandlerCli {
    /// The application manifest whose components are measured.
    #[arg(long, default_value = "spin.toml")]
    manifest: PathBuf,
    /// Calls per handler kind.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Requests per call for the batched measurement of the message kinds.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

#[derive(Debug, Args)]
struct SmokeCli {
    /// Also run the handler scenario with this manifest's components.
    #[arg(long)]
    manifest: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ReportCli {
    /// Directory of JSON reports (`*.json`, from `--json`).
    #[arg(long)]
    dir: PathBuf,
    /// Where to write the Markdown.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
    /// The command that produced the reports, quoted in the document.
    #[arg(long, default_value = "bench/compare.sh")]
    command: String,
    /// A Markdown file appended as the observations section.
    #[arg(long)]
    observations: Option<PathBuf>,
    /// Server versions, e.g. `Mosquitto 2.0.11`; repeatable.
    #[arg(long = "version-of", value_name = "TEXT")]
    versions: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Thousands of connections need thousands of descriptors: the soft limit up to the hard one.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: cannot raise the open files limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = runtime.block_on(run(cli))?;
    // Connections still closing in the background need not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let started_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let tokens = match &cli.token_secret_file {
        Some(path) => Some(Arc::new(Tokens {
            secret: Secret::from_file(path).context("--token-secret-file")?,
            issuer: cli.token_issuer.clone(),
            ttl: Duration::from_secs(cli.token_ttl),
        })),
        None => None,
    };
    // A separate kind, so that reports with authentication on sit beside plain cim's.
    let kind = match (&cli.kind, &cli.target, &tokens) {
        (Some(kind), _, _) => kind.as_str(),
        (None, Target::Cim { .. }, Some(_)) => "cim-auth",
        (None, target, _) => target.kind(),
    };
    let delivery = match &cli.command {
        Command::P2p(a) if a.qos >= 1 => Delivery::AtLeastOnce,
        _ => Delivery::AtMostOnce,
    };
    let env = Env {
        connector: Arc::new(Connector::new(cli.target.clone(), tokens).with_delivery(delivery)),
        server_pid: cli.server_pid,
        concurrency: cli.concurrency,
    };
    let idle_timeout = Duration::from_secs(cli.idle_timeout.max(1));
    // Scenarios about a server; all but `idle` also talk to it.
    let has_server = !matches!(cli.command, Command::Handler(_) | Command::Report(_));
    let networked = has_server && !matches!(cli.command, Command::Idle(_));
    let counters_before = if networked { env.connector.server_counters().await } else { None };
    let outcome = match cli.command {
        Command::P2p(a) => {
            let args = P2pArgs {
                pairs: a.pairs,
                messages: a.messages,
                rate: a.rate,
                size: a.size,
                window: a.window,
                runs: a.runs,
                half_load: a.half_load,
                idle_timeout,
                delivery,
            };
            Outcome::P2p(scenario::p2p::run(&env, &args).await?)
        }
        Command::Group(a) => {
            let args = GroupArgs {
                users: a.users,
                messages: a.messages,
                size: a.size,
                window: a.window,
                idle_timeout,
            };
            Outcome::Group(scenario::group::run(&env, &args).await?)
        }
        Command::Conns(a) => {
            let hold = Duration::try_from_secs_f64(a.hold).context("--hold must be a number of seconds")?;
            Outcome::Conns(scenario::conns::run(&env, &ConnsArgs { n: a.n, hold }).await?)
        }
        Command::Idle(a) => {
            let server_pid = env.server_pid.context("idle needs --server-pid")?;
            let duration = Duration::try_from_secs_f64(a.secs)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--secs must be a number of seconds above zero")?;
            Outcome::Idle(scenario::idle::run(&IdleArgs { server_pid, duration }).await?)
        }
        Command::Handler(a) => {
            let args = HandlerArgs { manifest: a.manifest, calls: a.calls, batch: a.batch };
            Outcome::Handler(scenario::handler::run(&args).await?)
        }
        Command::Smoke(a) => Outcome::Smoke(scenario::smoke::run(&env, a.manifest).await),
        Command::Report(a) => {
            let doc = markdown::render(&a.dir, &a.command, a.observations.as_deref(), &a.versions)?;
            std::fs::write(&a.out, doc).with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!("wrote {}", a.out.display());
            return Ok(0);
        }
    };
    let code = match &outcome {
        Outcome::Smoke(s) if !s.ok() => 1,
        _ => 0,
    };
    let server_counters = match (counters_before, env.connector.server_counters().await) {
        (Some(before), Some(after)) if networked => Some(
            after
                .into_iter()
                .map(|(k, v)| {
                    let d = v - before.get(&k).copied().unwrap_or(0.0);
                    (k, d)
                })
                .collect(),
        ),
        _ => None,
    };
    let report = Report {
        server_counters,
        tool: format!("cim-bench {}", env!("CARGO_PKG_VERSION")),
        target: has_server.then(|| cli.target.to_string()),
        kind: has_server.then(|| kind.to_owned()),
        started_unix,
        outcome,
    };
    let table = report::table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    match cli.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            eprint!("{table}");
            println!("{json}");
        }
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
            print!("{table}");
        }
        None => print!("{table}"),
    }
    Ok(code)
}
