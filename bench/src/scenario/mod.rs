//! The scenarios. Each takes a [`Env`] (a connector for the target, the server's pid if
//! known) and its own arguments, and returns a serialisable result (see [`crate::report`]).
//!
//! - [`p2p`]: sender → receiver pairs; max throughput (closed loop, a window of messages
//!   in flight per pair) and latency at a paced rate.
//! - [`group`]: one sender, N receivers; time until the last recipient has each message.
//! - [`conns`]: N idle logged-in connections; connect rate and server memory per connection.
//! - [`idle`]: no clients; the server's own CPU use.
//! - [`handler`]: per-request cost of a fresh component instance, per handler kind.
//! - [`smoke`]: every scenario with tiny numbers, checking nothing is lost (for CI).

pub mod conns;
pub mod group;
pub mod handler;
pub mod idle;
pub mod p2p;
pub mod smoke;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use crate::peer::{Connector, ErrorLog, Hooks, Listen, Peer};
use crate::progress;

/// What every network scenario needs.
#[derive(Debug, Clone)]
pub struct Env {
    pub connector: Arc<Connector>,
    /// The server process, for its memory and CPU use.
    pub server_pid: Option<u32>,
    /// Connections opened at once while setting up.
    pub concurrency: usize,
}

/// Connects the users `ids` (in that order), `concurrency` at a time. Returns one result per
/// id, in order, and how long it took.
pub async fn connect_all(
    env: &Env,
    ids: &[u64],
    listen: Listen,
    hooks: impl Fn(usize) -> Hooks,
    what: &str,
) -> (Vec<anyhow::Result<Peer>>, Duration) {
    let bar = progress::bar(ids.len() as u64, what);
    let start = Instant::now();
    let futures: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let connector = env.connector.clone();
            let hooks = hooks(i);
            let bar = bar.clone();
            async move {
                let r = connector.connect(id, listen, hooks).await;
                bar.inc(1);
                r
            }
        })
        .collect();
    let peers: Vec<_> = futures_util::stream::iter(futures).buffered(env.concurrency.max(1)).collect().await;
    let took = start.elapsed();
    bar.finish_and_clear();
    (peers, took)
}

/// All connected, or the first error (with how many failed).
pub fn all_ok(peers: Vec<anyhow::Result<Peer>>) -> anyhow::Result<Vec<Peer>> {
    let failed = peers.iter().filter(|p| p.is_err()).count();
    let mut ok = Vec::with_capacity(peers.len());
    for p in peers {
        match p {
            Ok(p) => ok.push(p),
            Err(e) => return Err(e.context(format!("{failed} connection(s) failed"))),
        }
    }
    Ok(ok)
}

/// Closes every peer, many at a time.
pub async fn close_all(peers: Vec<Peer>) {
    futures_util::stream::iter(peers.into_iter().map(Peer::close))
        .buffer_unordered(512)
        .collect::<Vec<()>>()
        .await;
}

/// A fresh error log and hooks factory helper.
pub fn errors() -> Arc<ErrorLog> {
    Arc::new(ErrorLog::default())
}
