//! What `GET /metrics` exports, in the OpenMetrics text format (which Prometheus scrapes),
//! with [`prometheus_client`]: counters and a gauge per event the host counts, and
//! histograms of handler calls (per event and component), of sends (read → acknowledged), of
//! live deliveries (accepted → written to the recipient) and of log appends (one store round
//! trip). Every series carries the node's id as `node`.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Something [`Metrics::inc`] can count up by one.
pub trait Inc {
    fn inc_one(&self);
}

impl Inc for Counter {
    fn inc_one(&self) {
        self.inc();
    }
}

impl Inc for Gauge {
    fn inc_one(&self) {
        self.inc();
    }
}

macro_rules! metrics {
    ($($name:ident: $ty:ident, $help:literal;)*) => {
        /// The host's metrics. Cheap to update (relaxed atomics); shared by every part of the
        /// host through the router.
        #[derive(Debug)]
        pub struct Metrics {
            $(pub $name: $ty,)*
            /// Handler calls per event and component.
            pub handlers: HandlerMetrics,
            /// A send, from reading its request to its answer being ready (handler decision, log
            /// write and hand-off to the recipients included).
            pub send_seconds: Histogram,
            /// One append to the message log (a batch of sends): the store round trip.
            pub log_append_seconds: Histogram,
            /// A live delivery, from its message's acceptance (on whichever node) to its frame
            /// being written to the recipient's connection.
            pub delivery_seconds: Histogram,
            /// Frames in a connection's outbound queue each time its writer wakes.
            pub outbound_queue_frames: Histogram,
            registry: OnceLock<Registry>,
        }

        impl Default for Metrics {
            fn default() -> Self {
                Metrics {
                    $($name: Default::default(),)*
                    handlers: HandlerMetrics::default(),
                    send_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
                    log_append_seconds: Histogram::new(exponential_buckets(10e-6, 2.0, 16)),
                    delivery_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
                    outbound_queue_frames: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
                    registry: OnceLock::new(),
                }
            }
        }

        impl Metrics {
            fn registry(&self, node_id: &str) -> &Registry {
                self.registry.get_or_init(|| {
                    let node = [(Cow::Borrowed("node"), Cow::Owned(node_id.to_owned()))];
                    let mut r = Registry::with_prefix_and_labels("cim", node.into_iter());
                    // Counters get their `_total` suffix from the encoder.
                    // (The encoder ends each help text with a full stop itself.)
                    $(r.register(stringify!($name).trim_end_matches("_total"), $help.trim_end_matches('.'), self.$name.clone());)*
                    r.register(
                        "handler_seconds",
                        "Handler component calls: how long each took (instantiation included), per event and component",
                        self.handlers.seconds.clone(),
                    );
                    r.register(
                        "handler_calls",
                        "Handler component calls per event, component and outcome (ok, failed, timeout)",
                        self.handlers.calls.clone(),
                    );
                    r.register(
                        "send_seconds",
                        "Sends (private and group), from reading the request to its answer being ready: handler, log write and hand-off to recipients",
                        self.send_seconds.clone(),
                    );
                    r.register(
                        "delivery_seconds",
                        "Live deliveries, from the message's acceptance by the sender's node to its frame being written to the recipient's connection (across nodes this includes their clock difference; replays are not counted)",
                        self.delivery_seconds.clone(),
                    );
                    r.register(
                        "outbound_queue_frames",
                        "Frames in a connection's outbound queue each time its writer wakes (1: the client keeps up; near --outbound-queue: it is about to be cut off as a slow consumer)",
                        self.outbound_queue_frames.clone(),
                    );
                    r.register(
                        "log_append_seconds",
                        "Appends to the message log (one batch of sends): the store round trip",
                        self.log_append_seconds.clone(),
                    );
                    r
                })
            }
        }
    };
}

metrics! {
    connections: Gauge, "Client connections currently open (TCP and WebSocket).";
    connections_total: Counter, "Client connections accepted.";
    connections_refused_total: Counter, "Connections refused because the limit was reached.";
    http_connections_refused_total: Counter, "HTTP connections closed at once because --http-max-connections were open.";
    logins_total: Counter, "Successful logins.";
    login_failures_total: Counter, "Logins refused (bad token, duplicate, rejected, invalid).";
    rate_limited_total: Counter, "Requests refused by a rate limit (sends, online requests, logins).";
    token_expiries_total: Counter, "Connections closed because their token expired without a refresh.";
    frames_in_total: Counter, "Frames received from clients (LOGIN included; undecodable ones are bad_frames_total).";
    frames_out_total: Counter, "Frames written to clients (answers, deliveries, errors; not the last KICK or ERROR of a closing connection).";
    bad_frames_total: Counter, "Frames that could not be decoded.";
    messages_total: Counter, "Messages accepted (private and group).";
    deliveries_total: Counter, "Deliveries queued to recipients.";
    stored_offline_total: Counter, "Private messages stored for a receiver who was not connected (delivered at their next login).";
    duplicate_sends_total: Counter, "Resends with a client_msg_id already used: answered with the first send's id, nothing stored.";
    replayed_total: Counter, "Deliveries replayed from the log at login.";
    gap_fills_total: Counter, "Reads of the log for a session whose live deliveries skipped entries for longer than a moment (one written by a node that died before publishing it, or lost on the bus).";
    acks_total: Counter, "Client acknowledgements (ACK with received positions).";
    takeovers_total: Counter, "Logins that took over a session of the same user (resume token, dead node, or --duplicate-login replace).";
    slow_consumers_total: Counter, "Clients disconnected because their outbound queue was full.";
    write_timeouts_total: Counter, "Connections closed because a write made no progress (the client stopped reading).";
    idle_timeouts_total: Counter, "Connections closed after missing heartbeats.";
    handler_failures_total: Counter, "Handler calls that failed (trap, timeout, memory cap).";
    callbacks_dropped_total: Counter, "Delivered messages whose callback was skipped (its worker stopped).";
    callback_backpressure_total: Counter, "Sends that waited because the message callback's queue was full.";
}

impl Metrics {
    /// Metrics whose handler series are `handlers` (the component runtime's, which records
    /// the calls).
    pub fn new(handlers: HandlerMetrics) -> Self {
        Metrics { handlers, ..Metrics::default() }
    }

    /// Counts `metric` up by one.
    pub fn inc(metric: &impl Inc) {
        metric.inc_one();
    }

    /// Every metric in the OpenMetrics text format ([`CONTENT_TYPE`]), labelled with `node_id`
    /// (the first call's; a node's id does not change).
    pub fn render(&self, node_id: &str) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, self.registry(node_id));
        out
    }
}

/// The labels of a handler call's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    pub event: String,
    pub component: String,
}

/// The labels of a handler call count.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub event: String,
    pub component: String,
    pub outcome: &'static str,
}

/// Handler calls, per event and component. Cloning shares the series.
#[derive(Debug, Clone)]
pub struct HandlerMetrics {
    pub seconds: Family<HandlerLabels, Histogram, fn() -> Histogram>,
    pub calls: Family<CallLabels, Counter>,
}

impl Default for HandlerMetrics {
    fn default() -> Self {
        fn histogram() -> Histogram {
            Histogram::new(exponential_buckets(10e-6, 2.0, 16))
        }
        HandlerMetrics { seconds: Family::new_with_constructor(histogram), calls: Family::default() }
    }
}

impl HandlerMetrics {
    /// Records one call of `component` for `event` that took `took`; `outcome` is `ok`,
    /// `failed` or `timeout`.
    pub fn record(&self, event: &str, component: &str, took: Duration, outcome: &'static str) {
        let labels = HandlerLabels { event: event.to_owned(), component: component.to_owned() };
        self.seconds.get_or_create(&labels).observe(took.as_secs_f64());
        let calls = CallLabels { event: labels.event, component: labels.component, outcome };
        self.calls.get_or_create(&calls).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_with_the_node_label() {
        let m = Metrics::default();
        Metrics::inc(&m.frames_in_total);
        Metrics::inc(&m.connections);
        m.handlers.record("group", "group-send", Duration::from_micros(30), "ok");
        m.send_seconds.observe(0.0002);
        let text = m.render("n1");
        assert!(text.contains("cim_frames_in_total{node=\"n1\"} 1"), "{text}");
        assert!(text.contains("cim_connections{node=\"n1\"} 1"), "{text}");
        assert!(text.contains("# TYPE cim_handler_seconds histogram"), "{text}");
        assert!(
            text.contains("cim_handler_calls_total{node=\"n1\",event=\"group\",component=\"group-send\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("cim_send_seconds_count{node=\"n1\"} 1"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
