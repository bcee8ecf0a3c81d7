//! Every scenario with tiny numbers, for CI: seconds, no timing assertions — only that
//! every message arrives, no request fails and every connection logs in.

use std::path::PathBuf;
use std::time::Duration;

use super::Env;
use super::conns::{self, ConnsArgs};
use super::group::{self, GroupArgs};
use super::handler::{self, HandlerArgs};
use super::p2p::{self, P2pArgs};
use crate::report::{SmokeCheck, SmokeReport};

/// Runs the scenarios one after another; a failing one does not stop the others.
/// `manifest`: also run the handler scenario with these components.
pub async fn run(env: &Env, manifest: Option<PathBuf>) -> SmokeReport {
    let idle_timeout = Duration::from_secs(5);
    let mut checks = Vec::new();
    let p2p_args = P2pArgs {
        pairs: 2,
        messages: 100,
        rate: None,
        size: 64,
        window: 8,
        runs: 1,
        half_load: true,
        idle_timeout,
        delivery: env.connector.delivery,
    };
    checks.push(match p2p::run(env, &p2p_args).await {
        Ok(r) => {
            let expected = p2p_args.messages * p2p_args.pairs as u64;
            let lost: u64 = r.phases.iter().map(|p| expected.saturating_sub(p.delivered)).sum();
            let errors: u64 = r.phases.iter().map(|p| p.errors).sum();
            let ok = lost == 0 && errors == 0 && r.phases.len() == 2;
            let detail = format!(
                "{} phases, {} delivered, {lost} missing, {errors} errors {:?}",
                r.phases.len(),
                r.phases.iter().map(|p| p.delivered).sum::<u64>(),
                r.phases.iter().flat_map(|p| p.first_errors.clone()).take(1).collect::<Vec<_>>()
            );
            SmokeCheck { name: "p2p".into(), ok, detail }
        }
        Err(e) => SmokeCheck { name: "p2p".into(), ok: false, detail: format!("{e:#}") },
    });
    let group_args = GroupArgs { users: 5, messages: 10, size: 64, window: 2, idle_timeout };
    checks.push(match group::run(env, &group_args).await {
        Ok(r) => SmokeCheck {
            name: "group".into(),
            ok: r.deliveries == r.expected_deliveries && r.errors == 0 && r.fanout.count == r.messages,
            detail: format!(
                "{}/{} deliveries, {} errors {:?}",
                r.deliveries, r.expected_deliveries, r.errors, r.first_errors
            ),
        },
        Err(e) => SmokeCheck { name: "group".into(), ok: false, detail: format!("{e:#}") },
    });
    let conns_args = ConnsArgs { n: 20, hold: Duration::from_millis(100) };
    checks.push(match conns::run(env, &conns_args).await {
        Ok(r) => SmokeCheck {
            name: "conns".into(),
            ok: r.connected == r.n && r.failed == 0,
            detail: format!("{}/{} connected {:?}", r.connected, r.n, r.first_errors),
        },
        Err(e) => SmokeCheck { name: "conns".into(), ok: false, detail: format!("{e:#}") },
    });
    if let Some(manifest) = manifest {
        let args = HandlerArgs { manifest, calls: 20, batch: 4 };
        checks.push(match handler::run(&args).await {
            Ok(r) => SmokeCheck {
                name: "handler".into(),
                ok: r.kinds.len() == 5 && r.kinds.iter().all(|k| k.single.count == 20),
                detail: format!("{} kinds called 20 times each", r.kinds.len()),
            },
            Err(e) => SmokeCheck { name: "handler".into(), ok: false, detail: format!("{e:#}") },
        });
    }
    SmokeReport { checks }
}
