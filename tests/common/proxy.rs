//! A TCP proxy that delays each direction by a fixed time: puts Redis "a network hop away"
//! (another rack or zone) on loopback. Bytes keep their order and the link keeps its
//! bandwidth; only latency is added. Each direction of a connection is two OS threads (a
//! reader and a writer that sleeps until each chunk is due), because tokio's timer ticks in
//! whole milliseconds and would turn 0.5 ms into 1–2 ms; measure the result with
//! [`DelayProxy::ping_rtt`].

use std::net::SocketAddr;
use std::time::Duration;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running proxy; stops, with every connection through it, when dropped.
pub struct DelayProxy {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`, each
    /// direction `one_way` later. A connection whose upstream refuses is closed at once; a
    /// connection ends when either side closes it (dropping the proxy stops accepting).
    pub async fn start(upstream: SocketAddr, one_way: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(client) = client.into_std() else { continue };
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(upstream) else { return };
                    let _ =
                        (client.set_nonblocking(false), client.set_nodelay(true), server.set_nodelay(true));
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
                    pipe(client, s2, one_way);
                    pipe(server, c2, one_way);
                });
            }
        });
        DelayProxy { addr, task }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The median of 20 `PING` round trips through the proxy.
    pub async fn ping_rtt(&self) -> Duration {
        let client = redis::Client::open(self.url()).expect("proxy url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect through the proxy");
        let mut rtts = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut conn).await.expect("PING through the proxy");
            rtts.push(start.elapsed());
        }
        rtts.sort();
        rtts[rtts.len() / 2]
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` on two threads of its own, each chunk `delay` after it was read;
/// closes `to` for writing once `from` ends.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
