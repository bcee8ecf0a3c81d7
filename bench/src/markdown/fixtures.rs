//! Reports for the section tests.

use crate::report::{GroupReport, P2pPhase, P2pReport};
use crate::stats::{CpuUse, Latency};

/// A latency-floor run: 1 pair, 5000 messages paced at 1000 msgs/s, p99 twice the p50.
pub(super) fn floor(p50_us: f64, server_cores: f64) -> P2pReport {
    P2pReport {
        qos: 0,
        pairs: 1,
        messages_per_pair: 5000,
        size: 64,
        window: 64,
        max_msgs_per_s: None,
        phases: vec![P2pPhase {
            mode: "paced".into(),
            target_rate: Some(1000.0),
            sent: 5000,
            delivered: 5000,
            lost: 0,
            duplicated: 0,
            errors: 0,
            first_errors: vec![],
            elapsed_s: 5.0,
            msgs_per_s: 1000.0,
            latency: Latency { count: 5000, p50_us, p99_us: p50_us * 2.0, ..Latency::default() },
            cpu: CpuUse { server_cores: Some(server_cores), bench_cores: None },
        }],
    }
}

/// A group run of 50 messages that reached everyone, on one server core.
pub(super) fn group(users: usize, window: usize, per_s: f64) -> GroupReport {
    GroupReport {
        users,
        messages: 50,
        size: 64,
        window,
        connect_s: 0.5,
        sent: 50,
        deliveries: 50 * users as u64,
        expected_deliveries: 50 * users as u64,
        errors: 0,
        first_errors: vec![],
        elapsed_s: 1.0,
        deliveries_per_s: per_s,
        fanout: Latency { count: 50, p50_us: 900.0, ..Latency::default() },
        delivery: Latency::default(),
        cpu: CpuUse { server_cores: Some(1.0), bench_cores: None },
    }
}
