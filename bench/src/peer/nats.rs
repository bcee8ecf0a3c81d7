//! NATS through `async-nats`: one client (connection) per user; a listening user's
//! subscription is read by one task that hands payloads to the hooks.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::Hooks;

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
