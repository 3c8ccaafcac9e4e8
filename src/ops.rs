//! The operator's HTTP port (`server.metrics_addr`): `GET /metrics` (Prometheus), `GET /ready`
//! (200 while the store answers, 503 with the cause while it does not) and `GET /live` (200 while
//! the process serves); any other path is 404. Served by hyper's HTTP/1 server: keep-alive,
//! HTTP/1.0, pipelining and header limits (431 above [`MAX_HEADER_BYTES`]) are its.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// The most a request's head may take (request line and headers); past it, 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long a connection may take to send a request's head, and how long an idle keep-alive
/// connection stays open.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

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
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors and the like: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(answer(
                &request, &metrics, &ready,
            )))
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            // A peer that goes away or sends garbage ends only its own connection.
            let _ = connection.await;
        });
    }
}

/// The answer to one request (hyper leaves out the body of a `HEAD` answer).
fn answer<B>(
    request: &Request<B>,
    metrics: &PrometheusHandle,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            crate::metrics::sample_process();
            let mut response = text(StatusCode::OK, metrics.render());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/ready" => match ready.get() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(cause) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {cause}\n"),
            ),
        },
        "/live" => text(StatusCode::OK, "live\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: this port serves /metrics, /ready and /live\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
