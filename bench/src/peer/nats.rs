//! NATS through `async-nats`: one client (connection) per user; a listening user's
//! subscription is read by one task that hands payloads to the hooks.
//!
//! At least once ([`JsConn`]): JetStream. One file-backed stream per run holds every
//! receiver's subject; each receiver pulls from a durable consumer of its own subject with
//! `AckPolicy::All`, acknowledging batched as cim's receivers do (after `ACK_EVERY` messages
//! or every `ACK_INTERVAL`); a sender publishes through JetStream with a `Nats-Msg-Id` (the
//! stream's duplicate window, as cim's `client_msg_id`), and each PubAck goes to
//! `Hooks::on_acked`.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::StorageType;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;

use super::Hooks;
use super::cim::{ACK_EVERY, ACK_INTERVAL};

/// How long connecting and subscribing may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Messages a subscription buffers before the client counts it as a slow consumer.
const SUBSCRIPTION_CAPACITY: usize = 1 << 16;

#[derive(Debug)]
pub struct Conn {
    client: async_nats::Client,
    task: Option<JoinHandle<()>>,
}

impl Conn {
    pub async fn connect(url: &str, subject: Option<String>, hooks: Hooks) -> anyhow::Result<Conn> {
        tokio::time::timeout(SETUP_TIMEOUT, Self::setup(url, subject, hooks))
            .await
            .with_context(|| format!("NATS {url}: no connection within {SETUP_TIMEOUT:?}"))?
    }

    async fn setup(url: &str, subject: Option<String>, hooks: Hooks) -> anyhow::Result<Conn> {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(SETUP_TIMEOUT)
            .connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let task = match subject {
            None => None,
            Some(subject) => {
                let mut sub = client
                    .subscribe(subject.clone())
                    .await
                    .with_context(|| format!("subscribing to {subject}"))?;
                // The SUB is on the wire before anyone publishes to it.
                client.flush().await.with_context(|| format!("flushing the SUB {subject}"))?;
                Some(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if let Some(f) = &hooks.on_message {
                            f(&msg.payload);
                        }
                    }
                }))
            }
        };
        Ok(Conn { client, task })
    }

    pub async fn send(&mut self, subject: String, texts: Vec<String>) -> anyhow::Result<()> {
        for text in texts {
            self.client.publish(subject.clone(), Bytes::from(text.into_bytes())).await?;
        }
        Ok(())
    }

    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Dropping the last handle (the subscriber went with its task) closes the connection.
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The run's JetStream stream: its name, its subjects, and whether it exists yet.
#[derive(Debug)]
pub struct JsStream<'a> {
    pub name: &'a str,
    pub subjects: &'a str,
    pub created: &'a OnceCell<()>,
}

/// One user on JetStream: a sender's publishes, a receiver's durable consumer.
#[derive(Debug)]
pub struct JsConn {
    js: jetstream::Context,
    id: u64,
    next: u64,
    /// PubAck futures, awaited in order by `acker`.
    acks: mpsc::UnboundedSender<PublishAckFuture>,
    acker: JoinHandle<()>,
    task: Option<JoinHandle<()>>,
}

impl JsConn {
    /// User `id`; with `subject`, a receiver of it (durable consumer `r<id>`).
    pub async fn connect(
        url: &str,
        stream: JsStream<'_>,
        id: u64,
        subject: Option<String>,
        hooks: Hooks,
    ) -> anyhow::Result<JsConn> {
        tokio::time::timeout(SETUP_TIMEOUT, Self::setup(url, stream, id, subject, hooks))
            .await
            .with_context(|| format!("NATS {url}: no JetStream set-up within {SETUP_TIMEOUT:?}"))?
    }

    async fn setup(
        url: &str,
        stream: JsStream<'_>,
        id: u64,
        subject: Option<String>,
        hooks: Hooks,
    ) -> anyhow::Result<JsConn> {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .connection_timeout(SETUP_TIMEOUT)
            .connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let js = jetstream::new(client);
        stream
            .created
            .get_or_try_init(|| async {
                let config = jetstream::stream::Config {
                    name: stream.name.to_owned(),
                    subjects: vec![stream.subjects.to_owned()],
                    storage: StorageType::File,
                    ..Default::default()
                };
                js.get_or_create_stream(config).await.map(|_| ())
            })
            .await
            .with_context(|| {
                format!("creating the JetStream stream {} (is the server run with -js?)", stream.name)
            })?;
        let task = match subject {
            None => None,
            Some(subject) => {
                let config = pull::Config {
                    durable_name: Some(format!("r{id}")),
                    filter_subject: subject.clone(),
                    ack_policy: AckPolicy::All,
                    ..Default::default()
                };
                let consumer = js
                    .create_consumer_on_stream(config, stream.name)
                    .await
                    .with_context(|| format!("creating a durable consumer of {subject}"))?;
                let messages = consumer.messages().await.with_context(|| format!("pulling {subject}"))?;
                Some(tokio::spawn(receive_loop(messages, hooks.clone(), id)))
            }
        };
        let (acks, pending) = mpsc::unbounded_channel();
        let acker = tokio::spawn(ack_loop(pending, hooks, id));
        Ok(JsConn { js, id, next: 0, acks, acker, task })
    }

    /// Publishes each text through JetStream; their PubAcks are awaited in the background.
    pub async fn send(&mut self, subject: String, texts: Vec<String>) -> anyhow::Result<()> {
        for text in texts {
            self.next += 1;
            let publish = PublishMessage::build()
                .payload(Bytes::from(text.into_bytes()))
                .message_id(format!("{}-{}", self.id, self.next));
            let ack = self.js.send_publish(subject.clone(), publish).await?;
            self.acks.send(ack).context("the PubAck task ended")?;
        }
        Ok(())
    }

    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.acker.abort();
    }
}

impl Drop for JsConn {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        self.acker.abort();
    }
}

async fn ack_loop(mut pending: mpsc::UnboundedReceiver<PublishAckFuture>, hooks: Hooks, id: u64) {
    while let Some(ack) = pending.recv().await {
        match ack.await {
            Ok(_) => hooks.acked(),
            Err(e) => {
                hooks.errors.push(format!("NATS user {id}: publish not acknowledged: {e}"));
                if let Some(f) = &hooks.on_failed {
                    f();
                }
            }
        }
    }
}

/// Hands each message to the hooks; acknowledges (all up to the latest) after `ACK_EVERY`
/// messages or `ACK_INTERVAL` after the last acknowledgement.
async fn receive_loop(mut messages: pull::Stream, hooks: Hooks, id: u64) {
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unacked: Option<jetstream::Message> = None;
    let mut since_ack = 0;
    loop {
        let due = tokio::select! {
            next = messages.next() => match next {
                Some(Ok(msg)) => {
                    if let Some(f) = &hooks.on_message {
                        f(&msg.payload);
                    }
                    unacked = Some(msg);
                    since_ack += 1;
                    since_ack >= ACK_EVERY
                }
                Some(Err(e)) => {
                    hooks.errors.push(format!("NATS user {id}: pulling: {e}"));
                    false
                }
                None => return,
            },
            _ = tick.tick() => true,
        };
        if due && let Some(msg) = unacked.take() {
            if let Err(e) = msg.ack().await {
                hooks.errors.push(format!("NATS user {id}: acknowledging: {e}"));
            }
            since_ack = 0;
            tick.reset();
        }
    }
}
