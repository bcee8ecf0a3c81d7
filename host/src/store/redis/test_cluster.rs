//! A throwaway Redis Cluster for tests: `primaries` `redis-server` processes on free
//! loopback ports, without persistence (or with an append-only file fsynced on every write,
//! [`RedisCluster::start_aof`]), the 16384 slots split evenly between them, killed and their
//! directory removed on drop.
//!
//! Shared by the host's unit tests and the end-to-end tests (included with `#[path]`), so it
//! needs only std and the `redis` crate's blocking client.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the servers get to start and agree on one cluster.
const FORM_DEADLINE: Duration = Duration::from_secs(30);
const SLOTS: u16 = 16384;

/// A running Redis Cluster of one's own.
pub struct RedisCluster {
    /// Client ports, in slot order.
    pub ports: Vec<u16>,
    bus_ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
    /// Each server keeps an append-only file (`appendfsync always`) and reloads it.
    aof: bool,
}

impl RedisCluster {
    /// Starts `primaries` servers (no replicas) and waits until every one of them reports
    /// `cluster_state:ok` and knows all the others. Panics (with the reason) if that fails.
    pub fn start(primaries: usize) -> RedisCluster {
        RedisCluster::start_with(primaries, false)
    }

    /// Like [`RedisCluster::start`], each server with an append-only file fsynced on every
    /// write, so that [`RedisCluster::stop`] and [`RedisCluster::start_again`] keep the data.
    #[allow(dead_code)] // (the end-to-end chaos test's; the unit tests need none)
    pub fn start_aof(primaries: usize) -> RedisCluster {
        RedisCluster::start_with(primaries, true)
    }

    fn start_with(primaries: usize, aof: bool) -> RedisCluster {
        assert!(primaries >= 1, "a cluster needs a primary");
        let dir = std::env::temp_dir().join(format!(
            "cim-redis-cluster-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("create the redis cluster directory");
        let mut cluster =
            RedisCluster { ports: Vec::new(), bus_ports: Vec::new(), children: Vec::new(), dir, aof };
        for _ in 0..primaries {
            cluster.ports.push(free_port());
            cluster.bus_ports.push(free_port());
        }
        cluster.spawn_all();
        cluster.form();
        cluster
    }

    /// Splits the slots between the (running, slotless, unacquainted) servers and introduces
    /// them to each other; waits until every one reports `cluster_state:ok` and knows all
    /// the others.
    fn form(&mut self) {
        let primaries = self.ports.len();
        let mut conns: Vec<redis::Connection> =
            self.ports.iter().map(|&p| wait(&format!("redis-server on {p}"), || connect(p))).collect();
        let n = u16::try_from(primaries).expect("a few primaries");
        for (i, conn) in (0u16..).zip(conns.iter_mut()) {
            let (first, last) = (SLOTS / n * i, if i + 1 == n { SLOTS - 1 } else { SLOTS / n * (i + 1) - 1 });
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .exec(conn)
                .expect("ADDSLOTSRANGE");
            redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(i + 1).exec(conn).expect("SET-CONFIG-EPOCH");
        }
        for (&port, &bus) in self.ports.iter().zip(&self.bus_ports).skip(1) {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(port)
                .arg(bus)
                .exec(&mut conns[0])
                .expect("MEET");
        }
        for (conn, port) in conns.iter_mut().zip(&self.ports) {
            wait(&format!("redis cluster node {port} to see the whole cluster"), || {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(conn).ok()?;
                let ok = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{primaries}\r"))
                    && info.contains(&format!("cluster_size:{primaries}\r"));
                ok.then_some(())
            });
        }
    }

    fn spawn_all(&mut self) {
        for (&port, &bus_port) in self.ports.iter().zip(&self.bus_ports) {
            let mut cmd = Command::new("redis-server");
            if self.aof {
                cmd.args([
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--appenddirname",
                    &format!("aof-{port}"),
                ]);
            } else {
                cmd.args(["--appendonly", "no"]);
            }
            let child = cmd
                .args(["--port", &port.to_string(), "--cluster-port", &bus_port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", ""])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .arg("--dir")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
            self.children.push(child);
        }
    }

    /// Kills every server (SIGKILL: they keep only their cluster configuration, and their
    /// data when started with [`RedisCluster::start_aof`]).
    pub fn stop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts every server again on the same ports (empty, or reloading its append-only
    /// file); they re-form the same cluster from their saved configuration. Waits until every
    /// one reports `cluster_state:ok`.
    pub fn start_again(&mut self) {
        assert!(self.children.is_empty(), "the cluster is running");
        self.spawn_all();
        for &port in &self.ports {
            wait(&format!("restarted redis cluster node {port} to be ok"), || {
                let mut conn = connect(port)?;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).ok()?;
                info.contains("cluster_state:ok").then_some(())
            });
        }
    }

    /// Starts every server again on the same ports as new, unformed nodes: no data, no slots,
    /// none knowing the others (so `CLUSTER SLOTS` answers an empty layout), until
    /// [`RedisCluster::form_again`]. Waits until each answers PING.
    #[allow(dead_code)] // (the unit tests'; the end-to-end tests need none)
    pub fn start_unformed(&mut self) {
        assert!(self.children.is_empty(), "the cluster is running");
        for port in &self.ports {
            let _ = std::fs::remove_file(self.dir.join(format!("nodes-{port}.conf")));
            let _ = std::fs::remove_dir_all(self.dir.join(format!("aof-{port}")));
        }
        self.spawn_all();
        for &port in &self.ports {
            wait(&format!("redis-server on {port}"), || connect(port));
        }
    }

    /// Forms the servers [`RedisCluster::start_unformed`] started into one cluster again (the
    /// same slots on the same ports).
    #[allow(dead_code)]
    pub fn form_again(&mut self) {
        self.form();
    }

    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,...`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// `redis://127.0.0.1:P` of the `i`-th server alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.ports[i])
    }

    /// How many keys the `i`-th server holds.
    pub fn dbsize(&self, i: usize) -> u64 {
        let mut conn = connect(self.ports[i]).expect("connect to a cluster node");
        redis::cmd("DBSIZE").query(&mut conn).expect("DBSIZE")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn connect(port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
    redis::cmd("PING").query::<String>(&mut conn).ok()?;
    Some(conn)
}

/// Polls `f` every 20 ms until it gives a value; panics after [`FORM_DEADLINE`].
fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + FORM_DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {FORM_DEADLINE:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
