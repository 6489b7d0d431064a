//! Helpers for the cross-service tests: the real services from the
//! environment (`TOLLGUARD_KAFKA_BOOTSTRAP`, `TOLLGUARD_REDIS_URL`, set by
//! `deploy/local/services.sh`), the built binaries as child processes on
//! free loopback ports, and polling with deadlines.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Reads a required environment variable set by `deploy/local/services.sh`.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the local services with `bash deploy/local/services.sh start` \
             and `eval \"$(bash deploy/local/services.sh env)\"`, or run `bash deploy/local/test.sh`"
        )
    })
}

/// Kafka bootstrap servers.
pub fn kafka() -> String {
    env("TOLLGUARD_KAFKA_BOOTSTRAP")
}

/// Redis URL.
pub fn redis() -> String {
    env("TOLLGUARD_REDIS_URL")
}

/// A unique suffix for topics, groups and key prefixes.
pub fn unique(prefix: &str) -> String {
    let r: u32 = rand::random();
    format!("{prefix}-{}-{r:08x}", std::process::id())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Directory holding the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a built binary; panics with a hint if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// A child process killed on drop, with its output captured to a file.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Name for messages.
    pub name: String,
    /// Log file (stderr + stdout).
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `bin` with `args` and environment `envs`, logging to `dir`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        bin: &Path,
        args: &[&str],
        envs: &[(String, String)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
            log,
        }
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to `within`; returns the exit status code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, headed by the process's name (for
    /// failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!(
            "--- {} (last {n} of {} lines)\n{tail}",
            self.name,
            lines.len()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits until `http://127.0.0.1:port/readyz` answers 200.
pub async fn wait_ready(p: &Proc, port: u16, timeout: Duration) {
    let what = format!("{} to become ready (log: {})", p.name, p.log.display());
    wait_for(&what, timeout, || async move {
        matches!(http_get(port, "/readyz").await, Some((200, _))).then_some(())
    })
    .await
}

/// A counter from `/metrics` (sum over label sets), 0 if absent.
pub async fn metric(port: u16, name: &str) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics").await else {
        return -1.0;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes a random 32-byte hex key to `dir/key` and returns its path.
pub fn key_file(dir: &Path) -> PathBuf {
    let bytes: [u8; 32] = rand::random();
    let p = dir.join("key");
    std::fs::write(&p, hex::encode(bytes)).expect("key file");
    p
}

/// Records of `topic` not yet committed by consumer group `group`.
pub fn group_lag(group: &str, topic: &str) -> Option<i64> {
    group_lag_at(&kafka(), group, topic)
}

/// [`group_lag`] on the broker at `bootstrap`.
pub fn group_lag_at(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .ok()?;
    let t = Duration::from_secs(5);
    let md = c.fetch_metadata(Some(topic), t).ok()?;
    let parts: Vec<i32> = md
        .topics()
        .first()?
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, t).ok()?;
    let mut lag = 0;
    for p in parts {
        let (lo, hi) = c.fetch_watermarks(topic, p, t).ok()?;
        let off = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => lo,
        };
        lag += hi - off;
    }
    Some(lag)
}

/// The Redis Cluster's seed URLs (`TOLLGUARD_REDIS_CLUSTER_URLS`, comma
/// separated, set by `deploy/local/services.sh start` or `cluster`).
pub fn redis_cluster_urls() -> Vec<String> {
    env("TOLLGUARD_REDIS_CLUSTER_URLS")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The correlator's override that puts its window store on the Redis
/// Cluster (`redis.cluster_nodes`).
pub fn cluster_env() -> Vec<(String, String)> {
    let nodes: Vec<String> = redis_cluster_urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    vec![(
        "TOLLGUARD__REDIS__CLUSTER_NODES".into(),
        format!("[{}]", nodes.join(",")),
    )]
}

/// A private `redis-server` of one test (not the shared one), on `port`
/// with its data in `dir`: `aof` turns on the append-only file with
/// `appendfsync always` (every write on disk before the reply). Killed on
/// drop like any [`Proc`].
pub fn private_redis(dir: &Path, name: &str, port: u16, aof: bool) -> Proc {
    std::fs::create_dir_all(dir).expect("redis dir");
    let port_s = port.to_string();
    let dir_s = dir.display().to_string();
    let mut args = vec![
        "--port",
        &port_s,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        &dir_s,
    ];
    if aof {
        args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        args.extend(["--appendonly", "no"]);
    }
    Proc::spawn(dir, name, Path::new("redis-server"), &args, &[])
}

/// Waits until the Redis on `port` answers `PING`.
pub async fn wait_redis(port: u16, timeout: Duration) {
    wait_for(
        &format!("redis on 127.0.0.1:{port}"),
        timeout,
        || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            s.write_all(b"PING\r\n").await.ok()?;
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            buf[..n].starts_with(b"+PONG").then_some(())
        },
    )
    .await
}

/// `/readyz` status of a service on `port` (None when it does not answer).
pub async fn ready_status(port: u16) -> Option<u16> {
    http_get(port, "/readyz").await.map(|(s, _)| s)
}

/// A fresh KRaft cluster id: 16 random bytes, base64url without padding (as
/// `kafka-storage random-uuid` prints them). Never one that starts with `-`,
/// which `kafka-storage format -t` would take for an option (Kafka's own
/// `Uuid.randomUuid` skips those too); one in 64 random ids does.
pub fn kafka_cluster_id() -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    loop {
        let bytes: [u8; 16] = rand::random();
        let mut out = String::with_capacity(22);
        let (mut bits, mut n) = (0u32, 0);
        for b in bytes {
            bits = (bits << 8) | u32::from(b);
            n += 8;
            while n >= 6 {
                n -= 6;
                out.push(A[((bits >> n) & 63) as usize] as char);
            }
        }
        out.push(A[((bits << (6 - n)) & 63) as usize] as char);
        if !out.starts_with('-') {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kafka_cluster_ids_are_22_base64url_characters_never_starting_with_a_dash() {
        for _ in 0..2_000 {
            let id = super::kafka_cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{id}"
            );
        }
    }
}
