//! The services under test as child processes: spawning, readiness,
//! `/metrics`, RSS from `/proc`, and stopping them (SIGTERM, then SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A spawned service.
#[derive(Debug)]
pub struct Service {
    /// Name for the report (`ingester-kpn`, `correlator`).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// HTTP port of `/readyz` and `/metrics`.
    pub http: u16,
    /// Log file (stdout + stderr).
    pub log: PathBuf,
}

/// Every child process of the run, so that they are stopped whatever
/// happens to the run (error, Ctrl-C).
#[derive(Debug, Clone, Default)]
pub struct Children(Arc<Mutex<Vec<(String, Child)>>>);

impl Children {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Child)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `bin` with `env`, logging to `dir/<name>.log`.
    pub fn spawn(
        &self,
        dir: &Path,
        name: &str,
        bin: &Path,
        env: &[(String, String)],
        http: u16,
    ) -> anyhow::Result<Service> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .env("RUST_LOG", "warn")
            .env("TOLLGUARD_LOG_FORMAT", "json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", bin.display()))?;
        let pid = child.id();
        self.lock().push((name.to_string(), child));
        Ok(Service {
            name: name.to_string(),
            pid,
            http,
            log,
        })
    }

    /// Names of children that have exited, with their status.
    pub fn exited(&self) -> Vec<String> {
        self.lock()
            .iter_mut()
            .filter_map(|(n, c)| match c.try_wait() {
                Ok(Some(st)) => Some(format!("{n} ({st})")),
                _ => None,
            })
            .collect()
    }

    /// SIGTERM to every child, then SIGKILL to those still running after
    /// `grace`; waits for all of them.
    pub fn stop_all(&self, grace: Duration) {
        let mut children = self.lock();
        for (_, c) in children.iter_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        for (name, c) in children.iter_mut() {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(c.try_wait(), Ok(None)) {
                eprintln!("loadgen: {name} did not stop within {grace:?}; killing it");
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        children.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // The last handle: nothing may outlive the load generator.
        if Arc::strong_count(&self.0) == 1 {
            for (_, c) in self.lock().iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain HTTP/1.0 GET on 127.0.0.1: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// Waits until the service's `/readyz` answers 200.
pub async fn wait_ready(s: &Service, children: &Children, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(http_get(s.http, "/readyz").await, Some((200, _))) {
            return Ok(());
        }
        let dead = children.exited();
        if !dead.is_empty() {
            bail!(
                "{} exited during start-up (see {}): {}",
                dead.join(", "),
                s.log.display(),
                tail(&s.log, 5)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready after {timeout:?} (see {}): {}",
                s.name,
                s.log.display(),
                tail(&s.log, 5)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A counter or gauge from `/metrics` (sum over its label sets).
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let (200, body) = http_get(port, "/metrics").await? else {
        return None;
    };
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Resident set size of a process in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) of a process in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The first process whose command line contains `needle`.
pub fn find_process(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        (pid != me && String::from_utf8_lossy(&cmd).contains(needle)).then_some(pid)
    })
}
