//! Starts the real `zae-limiter serve` binary on a socket in a temporary folder, as a user would.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use zae_limiter::client::Client;

/// A running daemon; stopped (SIGTERM, then waited for) when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub metrics: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// Starts a daemon with `config` (TOML, without `[server]` socket/metrics, which are set here)
    /// and extra flags; waits until its socket accepts connections.
    pub fn start(config: &str, flags: &[&str]) -> Self {
        Self::start_at(config, None, flags)
    }

    /// As [`Daemon::start`], on the socket `socket` (default: a fresh temporary one).
    pub fn start_at(config: &str, socket: Option<PathBuf>, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = socket.unwrap_or_else(|| dir.path().join("zl.sock"));
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config_path = dir.path().join("zae-limiter.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--socket")
            .arg(&socket)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(flags)
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start zae-limiter serve");
        let mut daemon = Self {
            child,
            socket,
            metrics,
            dir,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited during start-up: {status}\n{}",
                    self.log()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the daemon did not open its socket within 30 s");
    }

    /// What the daemon has logged so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The configuration file the daemon was started with (rewrite it, then [`Daemon::hangup`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("zae-limiter.toml")
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        unsafe_kill(self.child.id(), libc::SIGHUP);
    }

    /// Waits (up to 30 s) until the log contains `text`; panics with the log otherwise.
    pub fn wait_for_log(&self, text: &str) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if self.log().contains(text) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the daemon did not log {text:?} within 30 s; its log:\n{}",
            self.log()
        );
    }

    /// An HTTP GET on the metrics port: status code and body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.metrics).expect("connect to the metrics port");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let code = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (code, body.to_owned())
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .expect("connect to the daemon")
    }

    /// The text of `/metrics`.
    pub fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).expect("connect to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    }

    /// The sum of every sample of `metric` whose labels contain all of `labels`.
    pub fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        metric_in(&self.scrape(), metric, labels)
    }

    /// Kills the daemon outright (SIGKILL: no drain, no flush), as a crash would.
    pub fn kill9(&mut self) {
        unsafe_kill(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe_kill(self.child.id(), libc::SIGTERM);
        self.child.wait().unwrap()
    }
}

pub fn metric_in(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric)
                && matches!(l.as_bytes().get(metric.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn unsafe_kill(pid: u32, signal: i32) {
    // SAFETY: sending a signal to our own child process by pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- the daemon's log ---\n{}", self.log());
        }
        if self.child.try_wait().ok().flatten().is_none() {
            unsafe_kill(self.child.id(), libc::SIGTERM);
            let _ = self.child.wait();
        }
    }
}
