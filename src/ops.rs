//! The operator's HTTP port (`server.metrics_addr`): `GET /metrics` (Prometheus), `GET /ready`
//! (200 while the store answers, 503 with the cause while it does not) and `GET /live` (200 while
//! the process serves); any other path is 404. HTTP/1.1, one request per connection: scrapers and
//! probes need no more, and nothing else listens there.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether the store answers, as the health probe last saw it; read by `/ready`.
#[derive(Debug)]
pub struct Readiness {
    /// `None`: ready; `Some(cause)`: not ready, and why.
    not_ready: Mutex<Option<String>>,
}

impl Default for Readiness {
    /// Not ready until the first probe answers.
    fn default() -> Self {
        Self {
            not_ready: Mutex::new(Some("the store has not been probed yet".into())),
        }
    }
}

impl Readiness {
    /// Records a probe's result; returns whether readiness changed.
    pub fn set(&self, result: Result<(), String>) -> bool {
        let mut state = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
        let next = result.err();
        let changed = state.is_some() != next.is_some();
        *state = next;
        changed
    }

    /// `Err(cause)` while not ready.
    pub fn get(&self) -> Result<(), String> {
        match &*self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(cause) => Err(cause.clone()),
        }
    }
}

/// Serves the port until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, ready: Arc<Readiness>) {
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics, &ready))
                .await;
        });
    }
}

/// Reads one request head (at most 8 KiB) and answers it.
async fn answer(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    ready: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > 8 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            crate::metrics::sample_memory();
            ("200 OK", "text/plain; version=0.0.4", metrics.render())
        }
        ("GET" | "HEAD", "/ready") => match ready.get() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(cause) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {cause}\n"),
            ),
        },
        ("GET" | "HEAD", "/live") => ("200 OK", "text/plain", "live\n".to_owned()),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "not found: this port serves /metrics, /ready and /live\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}
