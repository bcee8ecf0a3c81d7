//! MQTT 3.1.1 through `rumqttc`, QoS 0: one connection per user, its event loop polled by
//! one task that hands incoming publishes to the hooks.
//!
//! At least once ([`Delivery::AtLeastOnce`]): QoS 1 both ways (publish and subscription) on a
//! persistent session (clean session off, the run's fixed client id); each PUBACK goes to
//! `Hooks::on_acked`, and `rumqttc` acknowledges each incoming publish itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::task::JoinHandle;

use super::{Delivery, Hooks};

/// How long connecting and subscribing may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests queued between the client handle and its event loop.
const REQUEST_QUEUE: usize = 1024;

#[derive(Debug)]
pub struct Conn {
    client: AsyncClient,
    qos: QoS,
    closing: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Conn {
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: String,
        topic: Option<String>,
        hooks: Hooks,
        delivery: Delivery,
    ) -> anyhow::Result<Conn> {
        let qos = match delivery {
            Delivery::AtMostOnce => QoS::AtMostOnce,
            Delivery::AtLeastOnce => QoS::AtLeastOnce,
        };
        let mut opts = MqttOptions::new(client_id.clone(), host, port);
        opts.set_keep_alive(Duration::from_secs(60))
            .set_clean_session(delivery == Delivery::AtMostOnce)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, REQUEST_QUEUE);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(SETUP_TIMEOUT.as_secs());
        events.set_network_options(net);
        tokio::time::timeout(SETUP_TIMEOUT, async {
            wait_for(&mut events, |p| matches!(p, Packet::ConnAck(_))).await?;
            if let Some(topic) = topic {
                client.subscribe(topic.clone(), qos).await?;
                wait_for(&mut events, |p| matches!(p, Packet::SubAck(_)))
                    .await
                    .with_context(|| format!("subscribing to {topic}"))?;
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("MQTT client {client_id}: no CONNACK/SUBACK within {SETUP_TIMEOUT:?}"))?
        .with_context(|| format!("MQTT client {client_id}"))?;
        let closing = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(poll_loop(events, hooks, closing.clone(), client_id));
        Ok(Conn { client, qos, closing, task })
    }

    pub async fn send(&mut self, topic: String, texts: Vec<String>) -> anyhow::Result<()> {
        for text in texts {
            self.client.publish(topic.clone(), self.qos, false, text.into_bytes()).await?;
        }
        Ok(())
    }

    pub async fn close(mut self) {
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect().await;
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_for(events: &mut EventLoop, want: impl Fn(&Packet) -> bool) -> anyhow::Result<()> {
    loop {
        match events.poll().await? {
            Event::Incoming(Packet::ConnAck(ack)) if ack.code != rumqttc::ConnectReturnCode::Success => {
                bail!("connection refused: {:?}", ack.code)
            }
            Event::Incoming(p) if want(&p) => return Ok(()),
            _ => {}
        }
    }
}

async fn poll_loop(mut events: EventLoop, hooks: Hooks, closing: Arc<AtomicBool>, client_id: String) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(f) = &hooks.on_message {
                    f(&p.payload);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => hooks.acked(),
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) if closing.load(Ordering::Relaxed) => return,
            Ok(_) => {}
            Err(e) => {
                if !closing.load(Ordering::Relaxed) {
                    hooks.errors.push(format!("MQTT client {client_id}: {e}"));
                }
                // Polling again would reconnect: a benchmark connection that dropped stays down.
                return;
            }
        }
    }
}
