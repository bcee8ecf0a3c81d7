//! Idle connections: open and log in `n` users, hold them, measure the server's resident
//! memory before, while held and after closing, then close them.

use std::time::Duration;

use super::{Env, close_all, connect_all, errors};
use crate::peer::{Hooks, Listen};
use crate::report::ConnsReport;
use crate::stats::rss_kib;

#[derive(Debug, Clone)]
pub struct ConnsArgs {
    pub n: usize,
    /// How long to hold the connections before measuring and closing.
    pub hold: Duration,
}

pub async fn run(env: &Env, args: &ConnsArgs) -> anyhow::Result<ConnsReport> {
    let c = &env.connector;
    let rss = || env.server_pid.and_then(rss_kib);
    let rss_before = rss();
    let errors = errors();
    let ids: Vec<u64> = (0..args.n as u64).map(|i| c.user_id(i)).collect();
    let (peers, took) =
        connect_all(env, &ids, Listen::Nothing, |_| Hooks::new(errors.clone()), "connections").await;
    let mut ok = Vec::with_capacity(peers.len());
    let mut failed = 0;
    for p in peers {
        match p {
            Ok(p) => ok.push(p),
            Err(e) => {
                failed += 1;
                errors.push(format!("{e:#}"));
            }
        }
    }
    tokio::time::sleep(args.hold).await;
    let rss_held = rss();
    let connected = ok.len();
    close_all(ok).await;
    // Give the server a moment to tear the sessions down.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss();
    let bytes_per_conn = match (rss_before, rss_held) {
        (Some(b), Some(h)) if connected > 0 => Some((h as f64 - b as f64) * 1024.0 / connected as f64),
        _ => None,
    };
    Ok(ConnsReport {
        n: args.n,
        connected,
        failed,
        concurrency: env.concurrency,
        elapsed_s: took.as_secs_f64(),
        conns_per_s: connected as f64 / took.as_secs_f64().max(1e-9),
        server_pid: env.server_pid,
        rss_before_kib: rss_before,
        rss_held_kib: rss_held,
        rss_after_close_kib: rss_after,
        bytes_per_conn,
        first_errors: errors.first(),
    })
}
