//! Counters exported at `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// Process-wide counters and gauges; all relaxed atomics.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Renders every metric in the Prometheus text exposition format.
            pub fn render(&self, node_id: &str) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP cim_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE cim_{} {}", stringify!($name), $kind);
                    let _ = writeln!(
                        out,
                        "cim_{}{{node=\"{}\"}} {}",
                        stringify!($name),
                        node_id,
                        self.$name.load(Ordering::Relaxed)
                    );
                )*
                out
            }
        }
    };
}

metrics! {
    connections: "gauge", "Client connections currently open (TCP and WebSocket).";
    connections_total: "counter", "Client connections accepted.";
    connections_refused_total: "counter", "Connections refused because the limit was reached.";
    http_connections_refused_total: "counter", "HTTP connections closed at once because --http-max-connections were open.";
    logins_total: "counter", "Successful logins.";
    login_failures_total: "counter", "Logins refused (bad token, duplicate, rejected, invalid).";
    rate_limited_total: "counter", "Requests refused by a rate limit (sends, online requests, logins).";
    token_expiries_total: "counter", "Connections closed because their token expired without a refresh.";
    frames_in_total: "counter", "Frames received from clients.";
    bad_frames_total: "counter", "Frames that could not be decoded.";
    messages_total: "counter", "Messages accepted (private and group).";
    deliveries_total: "counter", "Deliveries queued to recipients.";
    slow_consumers_total: "counter", "Clients disconnected because their outbound queue was full.";
    write_timeouts_total: "counter", "Connections closed because a write made no progress (the client stopped reading).";
    idle_timeouts_total: "counter", "Connections closed after missing heartbeats.";
    handler_failures_total: "counter", "Handler calls that failed (trap, timeout, memory cap).";
    callbacks_dropped_total: "counter", "Delivered messages whose callback was skipped (its worker stopped).";
    callback_backpressure_total: "counter", "Sends that waited because the message callback's queue was full.";
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
