//! A raw-protocol chat client that does what any client must to lose nothing (the chaos
//! tests, and the paced probe across a Redis restart in `cluster_latency.rs`): it keeps the
//! resume token of its last login and the highest position received per stream, acks
//! positions every 200 ms, and after a dropped connection route-logs in on a live node with
//! the resume token, then LOGINs with `resume_from` (what it acked) and the token; a send
//! that was not answered, or answered `UNAVAILABLE`, is sent again with the same client
//! message id (the server answers with the first message id). It sends one message at a
//! time, so its own order is the order of the log; everything it sent and received is
//! recorded for the test to check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cim_proto::{Body, ErrorCode, Frame, FrameCodec, Login, LoginAck, MessageKind, Positions};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use super::Host;
use super::cluster::OwnRedis;

/// The cluster's nodes as clients know them (b's addresses change when it restarts).
#[derive(Debug, Clone)]
pub struct NodeAddr {
    pub id: String,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
}

pub type Directory = Arc<Mutex<Vec<NodeAddr>>>;

pub fn addr_of(host: &Host) -> NodeAddr {
    NodeAddr { id: host.node_id.clone(), http: host.http, tcp: host.tcp }
}

/// One message a client sent (and re-sent until it was acknowledged).
#[derive(Debug, Clone)]
pub struct Sent {
    pub seq: u64,
    /// `None`: a group line.
    pub to: Option<u64>,
    pub text: String,
    /// The message id of the first ACK.
    pub message_id: Option<u64>,
    /// Requests sent for it (1 + re-sends).
    pub attempts: u32,
    /// When the first ACK came, and whether it said `stored` (receiver not reached live).
    pub acked_at: Option<Instant>,
    pub stored: bool,
    /// When it was first sent.
    pub first_sent: Option<Instant>,
}

/// One DELIVERY a client received, duplicates included.
#[derive(Debug, Clone)]
pub struct Got {
    pub message_id: u64,
    pub sender: u64,
    pub kind: MessageKind,
    pub text: String,
    pub replayed: bool,
    /// When it arrived.
    pub at: Instant,
}

/// What a client did and saw, read by the test.
#[derive(Debug, Default)]
pub struct Record {
    pub sends: Vec<Sent>,
    pub got: Vec<Got>,
    /// Whether a send is waiting for its ACK.
    pub pending: bool,
    /// Answers UNAVAILABLE (the send is retried later with the same client id).
    pub unavailable: u64,
    /// Other refusals, kept as evidence.
    pub errors: Vec<String>,
    /// ACKs that named another message id for the same client id.
    pub id_mismatches: Vec<String>,
    /// Each successful login: when, on which node.
    pub logins: Vec<(Instant, String)>,
    /// When each message was first acknowledged.
    pub acked_at: Vec<Instant>,
    /// Connections that ended (dropped, kicked).
    pub drops: Vec<(Instant, String)>,
}

pub type Shared = Arc<Mutex<Record>>;

/// Switches the test flips for every client.
#[derive(Default)]
pub struct Switches {
    /// Start sending (everyone is logged in).
    pub go: AtomicBool,
    /// Stop starting new sends (pending ones are still carried through).
    pub stop: AtomicBool,
}

/// A message waiting for its ACK.
struct Pending {
    index: usize,
    frame_body: Body,
    /// Every request id it went out with (an answer to any of them counts).
    requests: Vec<u64>,
    /// When to (re)send it: `None` while a request is in flight.
    resend_at: Option<Instant>,
    sent_at: Instant,
}

pub const ACK_EVERY: Duration = Duration::from_millis(200);
pub const SEND_EVERY: Duration = Duration::from_millis(25);
/// A request unanswered this long is sent again (same client id).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);
pub const RETRY_AFTER: Duration = Duration::from_millis(100);

pub struct ChaosClient {
    id: u64,
    peers: Vec<u64>,
    directory: Directory,
    switches: Arc<Switches>,
    record: Shared,
    next_request: u64,
    resume_token: String,
    /// Highest position received per stream.
    high: Positions,
    /// What was last acked to the server.
    acked: Positions,
    /// `high` at the previous ack tick: what the next ack may cover.
    high_a_tick_ago: Positions,
    seq: u64,
    pending: Option<Pending>,
    /// How often a new message may start (one at a time): [`SEND_EVERY`] unless set.
    pub send_every: Duration,
    /// Every third message a group line ([`ChaosClient::new`]), or private ones only.
    pub group_lines: bool,
}

pub type Conn = Framed<TcpStream, FrameCodec>;

impl ChaosClient {
    /// A client of user `id` that chats with `peers` (private messages round-robin, every
    /// third message a group line) once `switches.go` is set, recording into `record`.
    pub fn new(
        id: u64,
        peers: Vec<u64>,
        directory: Directory,
        switches: Arc<Switches>,
        record: Shared,
    ) -> Self {
        ChaosClient {
            id,
            peers,
            directory,
            switches,
            record,
            next_request: 0,
            resume_token: String::new(),
            high: Positions::default(),
            acked: Positions::default(),
            high_a_tick_ago: Positions::default(),
            seq: 0,
            pending: None,
            send_every: SEND_EVERY,
            group_lines: true,
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    fn name(&self) -> String {
        format!("user{}", self.id)
    }

    fn on_delivery(&mut self, d: cim_proto::Delivery) {
        match d.kind {
            MessageKind::Group => self.high.group = self.high.group.max(d.position),
            _ => self.high.inbox = self.high.inbox.max(d.position),
        }
        self.record.lock().unwrap().got.push(Got {
            message_id: d.message_id,
            sender: d.sender.id,
            kind: d.kind,
            text: d.text,
            replayed: d.replayed,
            at: Instant::now(),
        });
    }

    /// Connects and logs in: first on `first` (directly), afterwards through the route API
    /// of any node that answers, with the resume token. Retries until it is in.
    async fn connect(&mut self, first: Option<&NodeAddr>, last_node: &str) -> (Conn, LoginAck) {
        let mut round = 0usize;
        loop {
            let nodes: Vec<NodeAddr> = match first {
                Some(n) => vec![n.clone()],
                None => {
                    let mut all = self.directory.lock().unwrap().clone();
                    // Start with another node than the one just lost, rotating per round.
                    all.sort_by_key(|n| n.id == last_node);
                    let k = round % all.len();
                    all.rotate_left(k);
                    all
                }
            };
            for node in nodes {
                let mut targets = Vec::new();
                if first.is_none() {
                    let body = serde_json::json!({
                        "user_id": self.id,
                        "user_name": self.name(),
                        "resume_token": self.resume_token,
                    })
                    .to_string();
                    let answer = tokio::time::timeout(
                        Duration::from_secs(1),
                        super::http(node.http, "POST", "/login", Some(&body)),
                    )
                    .await;
                    match answer {
                        Ok(Ok((200, v))) => {
                            if let Some(addr) = v["tcp_addr"].as_str().and_then(|a| a.parse().ok()) {
                                targets.push(addr);
                            }
                        }
                        Ok(Ok((status, v))) => {
                            self.record
                                .lock()
                                .unwrap()
                                .errors
                                .push(format!("POST /login on {}: {status} {v}", node.id));
                            continue;
                        }
                        _ => continue,
                    }
                }
                // The routed node may be the dead one while the registry still lists it.
                if !targets.contains(&node.tcp) {
                    targets.push(node.tcp);
                }
                for addr in targets {
                    if let Some(done) = self.login_at(addr).await {
                        return done;
                    }
                }
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One LOGIN at `addr` with the resume token and the acked positions.
    async fn login_at(&mut self, addr: SocketAddr) -> Option<(Conn, LoginAck)> {
        let stream =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await.ok()?.ok()?;
        let mut conn = Framed::new(stream, FrameCodec::default());
        let req = self.request_id();
        let login = Login {
            user_id: self.id,
            user_name: self.name(),
            resume_from: self.acked,
            resume_token: self.resume_token.clone(),
            ..Login::default()
        };
        conn.send(Frame::new(req, Body::Login(login))).await.ok()?;
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match conn.next().await {
                    Some(Ok(Ok(f))) if f.request_id == req => return Some(f.body),
                    Some(Ok(Ok(Frame { body: Body::Delivery(d), .. }))) => self.on_delivery(d),
                    Some(Ok(_)) => {}
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()?;
        match answer {
            Body::LoginAck(ack) => Some((conn, ack)),
            other => {
                self.record.lock().unwrap().errors.push(format!("LOGIN at {addr}: {other:?}"));
                None
            }
        }
    }

    /// Sends the pending message (again) on `conn`.
    async fn send_pending(&mut self, conn: &mut Conn) -> bool {
        let req = self.request_id();
        let Some(p) = self.pending.as_mut() else { return true };
        p.requests.push(req);
        p.resend_at = None;
        p.sent_at = Instant::now();
        let body = p.frame_body.clone();
        let index = p.index;
        {
            let mut record = self.record.lock().unwrap();
            let sent = &mut record.sends[index];
            sent.attempts += 1;
            sent.first_sent.get_or_insert_with(Instant::now);
        }
        conn.send(Frame::new(req, body)).await.is_ok()
    }

    /// Makes the next message: two private ones round-robin, then a group line.
    fn next_message(&mut self) {
        let seq = self.seq;
        self.seq += 1;
        let (to, body, text);
        let client_msg_id = format!("c{}-{seq}", self.id);
        if self.group_lines && seq % 3 == 2 {
            to = None;
            text = format!("u{} n{seq} group", self.id);
            body = Body::GroupSend { text: text.clone(), client_msg_id };
        } else {
            let peer = self.peers[(seq as usize) % self.peers.len()];
            to = Some(peer);
            text = format!("u{} n{seq} to {peer}", self.id);
            body = Body::PrivateSend { to: peer, text: text.clone(), client_msg_id };
        }
        let mut record = self.record.lock().unwrap();
        record.sends.push(Sent {
            seq,
            to,
            text,
            message_id: None,
            attempts: 0,
            acked_at: None,
            stored: false,
            first_sent: None,
        });
        record.pending = true;
        let index = record.sends.len() - 1;
        self.pending = Some(Pending {
            index,
            frame_body: body,
            requests: Vec::new(),
            resend_at: Some(Instant::now()),
            sent_at: Instant::now(),
        });
    }

    /// Handles a frame; `false` when the connection is over (kicked).
    fn on_frame(&mut self, f: Frame) -> bool {
        let answers_pending = self.pending.as_ref().is_some_and(|p| p.requests.contains(&f.request_id));
        match f.body {
            Body::Delivery(d) => self.on_delivery(d),
            Body::Ack { message_id, stored, .. } if answers_pending => {
                let p = self.pending.take().unwrap();
                let mut record = self.record.lock().unwrap();
                record.pending = false;
                record.acked_at.push(Instant::now());
                let sent = &mut record.sends[p.index];
                match sent.message_id {
                    None => {
                        sent.message_id = Some(message_id);
                        sent.acked_at = Some(Instant::now());
                        sent.stored = stored;
                    }
                    Some(first) if first != message_id => {
                        let text = format!("{:?}: first id {first}, then {message_id}", sent.text);
                        record.id_mismatches.push(text);
                    }
                    Some(_) => {}
                }
            }
            Body::Ack { message_id, .. } => {
                // A late answer to an earlier request of a message already acknowledged:
                // it must name the same id.
                let mut record = self.record.lock().unwrap();
                if f.request_id != 0 && !record.sends.iter().any(|s| s.message_id == Some(message_id)) {
                    record.errors.push(format!("ACK {} names unknown message id {message_id}", f.request_id));
                }
            }
            Body::Error { code, message, .. } if answers_pending => {
                let mut record = self.record.lock().unwrap();
                if code == ErrorCode::Unavailable {
                    record.unavailable += 1;
                } else {
                    record.errors.push(format!("send answered {code:?}: {message}"));
                }
                drop(record);
                if let Some(p) = self.pending.as_mut() {
                    p.resend_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
            Body::Kick { code, reason } => {
                self.record.lock().unwrap().drops.push((Instant::now(), format!("kick {code:?}: {reason}")));
                return false;
            }
            Body::Error { code, message, .. } => {
                self.record.lock().unwrap().errors.push(format!("error {code:?}: {message}"));
            }
            _ => {}
        }
        true
    }

    /// Logs in on `first`, then chats (see the module docs) until the task is aborted.
    pub async fn run(mut self, first: NodeAddr) {
        let mut first = Some(first);
        let mut last_node = String::new();
        loop {
            let (mut conn, ack) = self.connect(first.as_ref(), &last_node).await;
            first = None;
            self.resume_token = ack.resume_token;
            last_node = ack.node_id.clone();
            self.record.lock().unwrap().logins.push((Instant::now(), ack.node_id));
            if let Some(p) = self.pending.as_mut() {
                // Not answered on the old connection: send it again, same client id.
                p.resend_at = Some(Instant::now());
            }
            let mut send_tick = tokio::time::interval(self.send_every);
            let mut ack_tick = tokio::time::interval(ACK_EVERY);
            let why = loop {
                tokio::select! {
                    f = conn.next() => match f {
                        Some(Ok(Ok(f))) => if !self.on_frame(f) { break "kicked" },
                        Some(Ok(Err(e))) => {
                            self.record.lock().unwrap().errors.push(format!("bad frame: {e}"));
                        }
                        _ => break "closed",
                    },
                    _ = send_tick.tick() => {
                        if self.pending.is_none()
                            && self.switches.go.load(Ordering::SeqCst)
                            && !self.switches.stop.load(Ordering::SeqCst)
                        {
                            self.next_message();
                        }
                        let due = self.pending.as_ref().is_some_and(|p| match p.resend_at {
                            Some(at) => Instant::now() >= at,
                            None => p.sent_at.elapsed() >= ANSWER_WITHIN,
                        });
                        if due && !self.send_pending(&mut conn).await {
                            break "send failed";
                        }
                    }
                    _ = ack_tick.tick() => {
                        // What was received a tick ago, as docs/API.md asks: a live delivery
                        // overtaken by a later one of the same stream (their node died
                        // between the two) is then replayed at the next login, not acked past.
                        let due = self.high_a_tick_ago.max(self.acked);
                        self.high_a_tick_ago = self.high;
                        if due != self.acked {
                            let ack = Body::Ack { message_id: 0, stored: false, received: Some(due) };
                            if conn.send(Frame::new(0, ack)).await.is_err() {
                                break "ack failed";
                            }
                            self.acked = due;
                        }
                    }
                }
            };
            self.record.lock().unwrap().drops.push((Instant::now(), why.to_owned()));
        }
    }
}

/// A Redis the chaos can kill and start again: one server, or every server of a Redis
/// Cluster.
#[allow(async_fn_in_trait)]
pub trait Restart {
    async fn stop(&mut self);
    async fn start_again(&mut self);
}

impl Restart for OwnRedis {
    async fn stop(&mut self) {
        OwnRedis::stop(self).await
    }

    async fn start_again(&mut self) {
        OwnRedis::start_again(self).await
    }
}

/// Every primary at once (SIGKILL), and all of them back (each reloads its append-only file
/// when it has one). Blocking calls: the tests run on a multi-threaded runtime.
impl Restart for super::redis_cluster::RedisCluster {
    async fn stop(&mut self) {
        tokio::task::block_in_place(|| super::redis_cluster::RedisCluster::stop(self))
    }

    async fn start_again(&mut self) {
        tokio::task::block_in_place(|| super::redis_cluster::RedisCluster::start_again(self))
    }
}

/// Kills the Redis server while clients chat, until their sends fail with UNAVAILABLE, keeps
/// it down 1.5 s, starts it again and waits for every client to send again. Returns when it
/// was back.
pub async fn restart_the_redis(redis: &mut impl Restart, records: &[Shared]) -> Instant {
    let unavailable_before: u64 = records.iter().map(|r| r.lock().unwrap().unavailable).sum();
    redis.stop().await;
    let redis_stopped = Instant::now();
    let unavailable = until("sends to fail while Redis is down", Duration::from_secs(10), || {
        records.iter().map(|r| r.lock().unwrap().unavailable).sum::<u64>() > unavailable_before + 6
    })
    .await;
    eprintln!("redis down: UNAVAILABLE answers after {unavailable:?}");
    // Keep it down a little longer (chaos, not synchronisation).
    tokio::time::sleep_until((redis_stopped + Duration::from_millis(1500)).into()).await;
    redis.start_again().await;
    let redis_back = Instant::now();
    let before: Vec<usize> = records.iter().map(acked_count).collect();
    let resumed = until("every client to send again after Redis restarted", Duration::from_secs(20), || {
        records.iter().zip(&before).all(|(r, n)| acked_count(r) >= n + 10)
    })
    .await;
    let pending_now: Vec<bool> = records.iter().map(|r| r.lock().unwrap().pending).collect();
    let resumed = resumed.unwrap_or_else(|e| panic!("{e}; pending sends: {pending_now:?}"));
    eprintln!(
        "redis was down {:?}; every client chatting again {resumed:?} after it came back",
        redis_back - redis_stopped
    );
    redis_back
}

/// Waits until every client has had `more` more sends acknowledged than now; panics naming
/// `what` after `within`.
pub async fn more_acked(records: &[Shared], more: usize, what: &str, within: Duration) {
    let before: Vec<usize> = records.iter().map(acked_count).collect();
    until(what, within, || records.iter().zip(&before).all(|(r, n)| acked_count(r) >= n + more))
        .await
        .unwrap();
}

/// Stops new sends and waits until every pending one has been acknowledged.
pub async fn stop_sending(switches: &Switches, records: &[Shared]) {
    switches.stop.store(true, Ordering::SeqCst);
    until("every pending send to be acknowledged", Duration::from_secs(15), || {
        records.iter().all(|r| !r.lock().unwrap().pending)
    })
    .await
    .unwrap();
}

/// Waits until `check` holds, polling; `Err` with `what` at the deadline.
pub async fn until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if check() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn acked_count(r: &Shared) -> usize {
    r.lock().unwrap().acked_at.len()
}
