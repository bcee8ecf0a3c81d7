//! Handler overhead: the components of a manifest loaded into the host's own runtime
//! (`cim_host::runtime`), each kind called `calls` times in a row: a fresh instance, the
//! call, the drop — as the host does per request (the hop to the `cim-wasm` threads
//! included). Message kinds are also called with batches of `batch` requests, to show the
//! per-message cost once natural batching kicks in. No network, no server.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use cim_host::handlers::{Context, Delivered, Event, LoginRequest, Message, PrivateRequest};
use cim_host::manifest::Manifest;
use cim_host::runtime::{Runtime, RuntimeConfig};
use cim_host::store::{OnlineEntry, Store};
use cim_proto::{MessageKind, User};

use crate::progress;
use crate::report::{HandlerKind, HandlerReport};
use crate::stats::{Latency, histogram};

#[derive(Debug, Clone)]
pub struct HandlerArgs {
    pub manifest: PathBuf,
    pub calls: usize,
    pub batch: usize,
}

/// Calls made before measuring, so pools and caches are warm.
const WARMUP: usize = 200;
/// Users online while measuring (what the online handler filters).
const ONLINE: u64 = 10;

fn user(id: u64) -> User {
    User { id, name: format!("user{id}") }
}

fn message(id: u64) -> Message {
    Message {
        id,
        sender: user(1),
        kind: MessageKind::Private,
        text: "hello, this is a benchmark message of moderate length".into(),
        timestamp_ms: 1_767_225_600_000,
        accepted_us: 1_767_225_600_000_000,
    }
}

pub async fn run(args: &HandlerArgs) -> anyhow::Result<HandlerReport> {
    if cfg!(debug_assertions) {
        eprintln!("warning: cim-bench is a debug build; handler numbers are only meaningful with --release");
    }
    let manifest = Manifest::load(&args.manifest)
        .with_context(|| format!("loading the manifest {}", args.manifest.display()))?;
    let runtime = Runtime::new(RuntimeConfig::default()).context("starting the component runtime")?;
    runtime.install_manifest(&manifest).await.context("installing the manifest's components")?;
    let store = Store::memory();
    for id in 1..=ONLINE {
        store
            .claim(OnlineEntry {
                user: user(id),
                node_id: "bench".into(),
                conn_id: id,
                resume: String::new(),
            })
            .await?;
    }
    let ctx = Context::new(store);
    let batch = args.batch.max(1);
    let mut kinds = Vec::new();
    for event in Event::ALL {
        let component = runtime.current(event).map(|l| l.name.to_string()).unwrap_or_default();
        let bar = progress::bar((WARMUP + args.calls) as u64, event.as_str());
        let mut single = histogram();
        for i in 0..WARMUP + args.calls {
            let t = Instant::now();
            call(&runtime, &ctx, event, 1, i as u64).await?;
            if i >= WARMUP {
                single.saturating_record(t.elapsed().as_nanos() as u64);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let batched = if matches!(event, Event::Private | Event::Group | Event::Callback) && batch > 1 {
            let mut h = histogram();
            let rounds = (args.calls / batch).max(WARMUP / 4);
            for i in 0..WARMUP / 4 + rounds {
                let t = Instant::now();
                call(&runtime, &ctx, event, batch, i as u64).await?;
                if i >= WARMUP / 4 {
                    h.saturating_record(t.elapsed().as_nanos() as u64);
                }
            }
            Some(Latency::of(&h))
        } else {
            None
        };
        kinds.push(HandlerKind {
            event: event.to_string(),
            component,
            single: Latency::of(&single),
            batched,
        });
    }
    Ok(HandlerReport { manifest: args.manifest.display().to_string(), calls: args.calls, batch, kinds })
}

/// One handler call with `n` requests (login and online take one).
async fn call(rt: &Runtime, ctx: &Context, event: Event, n: usize, i: u64) -> anyhow::Result<()> {
    let msgs = || (0..n as u64).map(move |j| message(i * 1000 + j));
    match event {
        Event::Login => {
            rt.login(ctx, LoginRequest { user: user(100 + i % 1000), node_id: "bench".into(), claims: None })
                .await?;
        }
        Event::Private => {
            rt.private(ctx, msgs().map(|message| PrivateRequest { message, to: 2 }).collect()).await?;
        }
        Event::Group => {
            rt.group(
                ctx,
                msgs()
                    .map(|mut m| {
                        m.kind = MessageKind::Group;
                        m
                    })
                    .collect(),
            )
            .await?;
        }
        Event::Online => {
            rt.online(ctx, user(1), (1..=ONLINE).map(user).collect()).await?;
        }
        Event::Callback => {
            rt.callback(ctx, msgs().map(|message| Delivered { message, recipients: vec![2] }).collect())
                .await?;
        }
    }
    Ok(())
}
