//! The systems under test, behind one surface: connect a user (optionally listening on
//! its own address or on the group), send it texts, close it. One user is one connection
//! on every target, so the servers see the same workload.
//!
//! - [`cim`]: raw protocol frames over TCP after the route API's `POST /login`.
//! - [`mqtt`]: Mosquitto (or any MQTT 3.1.1 broker) through `rumqttc`, QoS 0; a topic per
//!   receiver, one topic for the group.
//! - [`nats`]: NATS through `async-nats`; a subject per receiver, one subject for the group.
//!
//! [`Delivery::AtLeastOnce`] puts every target in its durable mode: cim sends carry a
//! `client_msg_id` and receivers acknowledge positions; MQTT QoS 1 with persistent sessions;
//! NATS JetStream (one file stream, a durable consumer per receiver). Senders then hear of
//! each message the server has taken on (`Hooks::on_acked`).

pub mod cim;
pub mod mqtt;
pub mod nats;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};

/// The system under test, from `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `cim://host:port`: the route API (HTTP); connections go to the TCP address it returns.
    Cim { route: String },
    /// `mqtt://host:port`.
    Mqtt { host: String, port: u16 },
    /// `nats://host:port`.
    Nats { url: String },
}

impl Target {
    /// `cim`, `mqtt` or `nats`.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Cim { .. } => "cim",
            Target::Mqtt { .. } => "mqtt",
            Target::Nats { .. } => "nats",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cim { route } => write!(f, "cim://{}", route.trim_start_matches("http://")),
            Target::Mqtt { host, port } => write!(f, "mqtt://{host}:{port}"),
            Target::Nats { url } => f.write_str(url),
        }
    }
}

impl FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Target> {
        let (scheme, rest) = s.split_once("://").with_context(|| {
            format!(
                "target `{s}` has no scheme: expected cim://host:port, mqtt://host:port or nats://host:port"
            )
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            bail!("target `{s}`: expected host:port after `{scheme}://`");
        }
        match scheme {
            "cim" | "http" => Ok(Target::Cim { route: format!("http://{rest}") }),
            "mqtt" | "tcp" => {
                let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
                let port = port.parse().with_context(|| format!("target `{s}`: bad port `{port}`"))?;
                Ok(Target::Mqtt { host: host.to_owned(), port })
            }
            "nats" => Ok(Target::Nats { url: format!("nats://{rest}") }),
            other => bail!("target `{s}`: unknown scheme `{other}` (expected cim, mqtt or nats)"),
        }
    }
}

/// What a connected user listens to besides what is addressed to it by the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Nothing (a sender, or an idle connection). On cim a user always gets its deliveries.
    Nothing,
    /// Messages addressed to this user (p2p receivers).
    Own,
    /// Group messages (fan-out receivers).
    Group,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    User(u64),
    Group,
}

/// What a send's acceptance means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Each target's plain mode (cim still answers every send; MQTT QoS 0, core NATS).
    #[default]
    AtMostOnce,
    /// Each target's durable mode (see the module documentation).
    AtLeastOnce,
}

/// Called with each received payload, on the connection's reader task.
pub type OnMessage = Arc<dyn Fn(&[u8]) + Send + Sync>;
/// Called once for each request the server refused (the message will never arrive).
pub type OnFailed = Arc<dyn Fn() + Send + Sync>;
/// Called once for each send the server acknowledged (cim ACK, MQTT PUBACK, JetStream PubAck).
pub type OnAcked = Arc<dyn Fn() + Send + Sync>;

/// Errors seen during a run: counted, the first few kept for the report.
#[derive(Debug, Default)]
pub struct ErrorLog {
    count: AtomicU64,
    first: Mutex<Vec<String>>,
}

/// How many error messages a report keeps.
const KEPT_ERRORS: usize = 5;

impl ErrorLog {
    pub fn push(&self, message: impl Into<String>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock()
            && first.len() < KEPT_ERRORS
        {
            first.push(message.into());
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn first(&self) -> Vec<String> {
        self.first.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

/// What a connection calls back into.
#[derive(Clone)]
pub struct Hooks {
    pub on_message: Option<OnMessage>,
    pub on_failed: Option<OnFailed>,
    pub on_acked: Option<OnAcked>,
    pub errors: Arc<ErrorLog>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks").field("errors", &self.errors).finish_non_exhaustive()
    }
}

impl Hooks {
    pub fn new(errors: Arc<ErrorLog>) -> Hooks {
        Hooks { on_message: None, on_failed: None, on_acked: None, errors }
    }

    pub fn on_message(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Hooks {
        self.on_message = Some(Arc::new(f));
        self
    }

    pub fn on_failed(mut self, f: impl Fn() + Send + Sync + 'static) -> Hooks {
        self.on_failed = Some(Arc::new(f));
        self
    }

    pub fn on_acked(mut self, f: impl Fn() + Send + Sync + 'static) -> Hooks {
        self.on_acked = Some(Arc::new(f));
        self
    }

    fn acked(&self) {
        if let Some(f) = &self.on_acked {
            f();
        }
    }
}

/// Opens connections to one target for one run. Names (user ids, topics, subjects) carry
/// the run id, so runs never see each other's traffic or duplicate logins.
#[derive(Debug)]
pub struct Connector {
    pub target: Target,
    pub run: u64,
    pub delivery: Delivery,
    route: Option<cim::RouteClient>,
    /// NATS at least once: the run's stream, created by the first connection.
    stream: tokio::sync::OnceCell<()>,
}

impl Connector {
    /// With `tokens`, cim users log in with a token each (other targets ignore them).
    pub fn new(target: Target, tokens: Option<Arc<cim::Tokens>>) -> Connector {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| (d.as_millis() % 1_000_000_000) as u64 + 1);
        let route = match &target {
            Target::Cim { route } => Some(cim::RouteClient::new(route.clone(), tokens)),
            _ => None,
        };
        Connector { target, run, delivery: Delivery::AtMostOnce, route, stream: tokio::sync::OnceCell::new() }
    }

    /// Every connection in `delivery`'s mode.
    pub fn with_delivery(mut self, delivery: Delivery) -> Connector {
        self.delivery = delivery;
        self
    }

    /// The server's own counters (cim only: `GET /metrics`); `None` for other targets or
    /// when they cannot be read.
    pub async fn server_counters(&self) -> Option<std::collections::BTreeMap<String, f64>> {
        self.route.as_ref()?.metrics().await.ok()
    }

    /// The id of the `n`th user of this run (never 0, unique across runs started at
    /// different milliseconds).
    pub fn user_id(&self, n: u64) -> u64 {
        self.run * 100_000 + n + 1
    }

    fn mqtt_topic(&self, dest: Dest) -> String {
        match dest {
            Dest::User(id) => format!("cimbench/{}/u/{id}", self.run),
            Dest::Group => format!("cimbench/{}/g", self.run),
        }
    }

    fn nats_subject(&self, dest: Dest) -> String {
        match dest {
            Dest::User(id) => format!("cimbench.{}.u.{id}", self.run),
            Dest::Group => format!("cimbench.{}.g", self.run),
        }
    }

    /// The JetStream stream holding every receiver's subject of this run.
    fn nats_stream(&self) -> (String, String) {
        (format!("CIMBENCH_{}", self.run), format!("cimbench.{}.u.*", self.run))
    }

    /// Connects (and logs in) user `id`; with `listen`, subscribes before returning.
    pub async fn connect(&self, id: u64, listen: Listen, hooks: Hooks) -> anyhow::Result<Peer> {
        let conn = match &self.target {
            Target::Cim { .. } => {
                let route = self.route.as_ref().context("cim target without a route client")?;
                Conn::Cim(cim::Conn::connect(route, id, hooks, self.delivery).await?)
            }
            Target::Mqtt { host, port } => {
                let topic = match listen {
                    Listen::Nothing => None,
                    Listen::Own => Some(self.mqtt_topic(Dest::User(id))),
                    Listen::Group => Some(self.mqtt_topic(Dest::Group)),
                };
                let client_id = format!("cb{}-{id}", self.run);
                Conn::Mqtt(mqtt::Conn::connect(host, *port, client_id, topic, hooks, self.delivery).await?)
            }
            Target::Nats { url } => {
                let subject = match listen {
                    Listen::Nothing => None,
                    Listen::Own => Some(self.nats_subject(Dest::User(id))),
                    Listen::Group => Some(self.nats_subject(Dest::Group)),
                };
                match self.delivery {
                    Delivery::AtMostOnce => Conn::Nats(nats::Conn::connect(url, subject, hooks).await?),
                    Delivery::AtLeastOnce => {
                        let (name, subjects) = self.nats_stream();
                        let stream =
                            nats::JsStream { name: &name, subjects: &subjects, created: &self.stream };
                        Conn::Js(nats::JsConn::connect(url, stream, id, subject, hooks).await?)
                    }
                }
            }
        };
        Ok(Peer { id, conn })
    }

    /// Sends `texts` to `dest` as `peer`, in order, as one write where the target allows.
    pub async fn send(&self, peer: &mut Peer, dest: Dest, texts: Vec<String>) -> anyhow::Result<()> {
        match &mut peer.conn {
            Conn::Cim(c) => c.send(dest, texts).await,
            Conn::Mqtt(c) => c.send(self.mqtt_topic(dest), texts).await,
            Conn::Nats(c) => c.send(self.nats_subject(dest), texts).await,
            Conn::Js(c) => c.send(self.nats_subject(dest), texts).await,
        }
    }
}

/// One connected user.
#[derive(Debug)]
pub struct Peer {
    pub id: u64,
    conn: Conn,
}

#[derive(Debug)]
enum Conn {
    Cim(cim::Conn),
    Mqtt(mqtt::Conn),
    Nats(nats::Conn),
    Js(nats::JsConn),
}

impl Peer {
    /// Closes the connection (politely where the protocol has a way).
    pub async fn close(self) {
        match self.conn {
            Conn::Cim(c) => c.close().await,
            Conn::Mqtt(c) => c.close().await,
            Conn::Nats(c) => c.close().await,
            Conn::Js(c) => c.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "cim://127.0.0.1:8080".parse::<Target>().unwrap(),
            Target::Cim { route: "http://127.0.0.1:8080".into() }
        );
        assert_eq!(
            "mqtt://127.0.0.1:1883".parse::<Target>().unwrap(),
            Target::Mqtt { host: "127.0.0.1".into(), port: 1883 }
        );
        assert_eq!(
            "nats://127.0.0.1:4222/".parse::<Target>().unwrap(),
            Target::Nats { url: "nats://127.0.0.1:4222".into() }
        );
        assert!("127.0.0.1:8080".parse::<Target>().is_err());
        assert!("redis://127.0.0.1:6379".parse::<Target>().is_err());
        assert_eq!("cim://127.0.0.1:8080".parse::<Target>().unwrap().to_string(), "cim://127.0.0.1:8080");
    }
}
