//! Natural batching: requests queue up while a handler call is running, and the next call
//! takes everything queued at that moment (up to a cap). An idle node calls the handler per
//! request with no added wait; a loaded one amortises the per-call cost (a fresh component
//! instance) over many requests.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Event, HandlerError};

type Reply<D> = oneshot::Sender<Result<D, HandlerError>>;

/// A queue in front of one batch handler, served by a fixed number of worker tasks.
#[derive(Debug)]
pub struct Batcher<R, D> {
    event: Event,
    tx: mpsc::Sender<(R, Reply<D>)>,
}

impl<R: Send + 'static, D: Send + 'static> Batcher<R, D> {
    /// Starts `workers` tasks that call `handle` with batches of at most `max_batch`
    /// requests. `handle` must return one decision per request, in order.
    pub fn spawn<F, Fut>(event: Event, workers: usize, max_batch: usize, queue: usize, handle: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<D>, HandlerError>> + Send,
    {
        let (tx, rx) = mpsc::channel::<(R, Reply<D>)>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let handle = Arc::new(handle);
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut items = Vec::with_capacity(max_batch);
                loop {
                    // Only one worker waits on the queue at a time; the others are busy
                    // calling the handler, which is when the next batch accumulates.
                    if rx.lock().await.recv_many(&mut items, max_batch).await == 0 {
                        break;
                    }
                    let (requests, replies): (Vec<R>, Vec<Reply<D>>) = items.drain(..).unzip();
                    let n = requests.len();
                    match handle(requests).await {
                        Ok(decisions) if decisions.len() == n => {
                            for (reply, d) in replies.into_iter().zip(decisions) {
                                let _ = reply.send(Ok(d));
                            }
                        }
                        Ok(decisions) => {
                            let err = HandlerError {
                                event,
                                component: "?".into(),
                                reason: format!("returned {} decisions for {n} requests", decisions.len()),
                            };
                            for reply in replies {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                        Err(err) => {
                            for reply in replies {
                                let _ = reply.send(Err(err.clone()));
                            }
                        }
                    }
                }
            });
        }
        Batcher { event, tx }
    }

    /// Queues one request (waiting only for room in the queue) and returns its future
    /// decision. Requests submitted one after another are decided in that order or in the
    /// same batch.
    pub async fn submit(&self, request: R) -> Result<Pending<D>, HandlerError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((request, reply)).await.map_err(|_| stopped(self.event))?;
        Ok(Pending { event: self.event, answer })
    }

    /// Queues one request and waits for its decision.
    pub async fn decide(&self, request: R) -> Result<D, HandlerError> {
        self.submit(request).await?.await
    }
}

fn stopped(event: Event) -> HandlerError {
    HandlerError { event, component: "?".into(), reason: "the handler queue is shut down".into() }
}

/// A decision on its way.
#[derive(Debug)]
pub struct Pending<D> {
    event: Event,
    answer: oneshot::Receiver<Result<D, HandlerError>>,
}

impl<D> std::future::Future for Pending<D> {
    type Output = Result<D, HandlerError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let event = self.event;
        std::pin::Pin::new(&mut self.answer).poll(cx).map(|r| r.unwrap_or_else(|_| Err(stopped(event))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn queued_requests_share_a_call_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let batcher = Arc::new(Batcher::spawn(Event::Group, 1, 64, 1024, move |batch: Vec<u32>| {
            let c = c.clone();
            let mut gate = gate_rx.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                // Hold the first call until the rest are queued.
                let _ = gate.wait_for(|open| *open).await;
                Ok(batch.into_iter().map(|x| x * 2).collect())
            }
        }));
        let mut tasks = Vec::new();
        for i in 0..10u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { b.decide(i).await }));
            tokio::task::yield_now().await;
        }
        gate_tx.send(true).unwrap();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u32 * 2);
        }
        assert!(calls.load(Ordering::SeqCst) < 10, "requests were not batched");
    }

    #[tokio::test]
    async fn a_wrong_number_of_decisions_fails_the_batch() {
        let batcher =
            Batcher::spawn(Event::Private, 1, 8, 8, |_batch: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        let err = batcher.decide(1).await.unwrap_err();
        assert!(err.reason.contains("0 decisions for 1"), "{err}");
    }
}
