//! OpenTelemetry traces, as a collector sees them: a small OTLP/gRPC receiver (the collector's
//! own protos) takes the daemon's spans; an acquire that carries a caller's `traceparent` shows
//! up in the caller's trace, with its look-ups, its group's round and its store calls below it.

#![cfg(feature = "otel")]

mod common;

use std::sync::{Arc, Mutex};

use common::daemon::{Daemon, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tonic::transport::{Endpoint, Server};
use zae_limiter::proto;
use zae_limiter::proto::rate_limiter_client::RateLimiterClient;

/// What the receiver was sent: each span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            let service = string(&attributes, "service.name").unwrap_or_default();
            for scope in resource.scope_spans {
                got.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a loopback port; returns the endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An acquire committed at once.
fn acquire(entity: &str) -> proto::AcquireRequest {
    proto::AcquireRequest {
        commit: true,
        ..common::acquire_request(entity)
    }
}

/// A receiver, and a daemon exporting to it (`config`, then `telemetry` in `[telemetry]`) with a
/// client over its TCP listener.
async fn traced_daemon(
    config: &str,
    telemetry: &str,
) -> (
    Receiver,
    Daemon,
    RateLimiterClient<tonic::transport::Channel>,
) {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let config =
        format!("{config}[telemetry]\nenabled = true\nendpoint = \"{endpoint}\"\n{telemetry}");
    let tcp = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&config, &["--tcp", &tcp]);
    let channel = Endpoint::from_shared(format!("http://{tcp}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (receiver, daemon, RateLimiterClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_reaches_the_collector_in_the_callers_trace() {
    // Ratio 0: no trace of the daemon's own; a caller's sampled trace is followed all the same.
    let (receiver, mut daemon, mut client) = traced_daemon(
        "",
        "sampling_ratio = 0.0\nservice_name = \"limiter-under-test\"\n",
    )
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(acquire("traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let answer = client.acquire(request).await.unwrap().into_inner();
    assert!(answer.allowed, "{answer:?}");
    // A refused call in another trace: its span says how it ended.
    let failing_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(acquire(""));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{failing_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let refused = client.acquire(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Without a traceparent, ratio 0 records nothing.
    let answer = client.acquire(acquire("untraced")).await.unwrap();
    assert!(answer.into_inner().allowed);
    // Shutting down sends what is still buffered.
    assert!(daemon.terminate().success(), "{}", daemon.log());

    // The exporter waits for each answer, so everything has arrived by the exit.
    let spans = receiver.spans();
    assert!(
        !spans.is_empty(),
        "no spans; the daemon's log:\n{}",
        daemon.log()
    );
    let (failing, spans): (Vec<_>, Vec<_>) = spans
        .into_iter()
        .partition(|(_, s)| hex(&s.trace_id) == failing_trace);
    let [(_, refused)] = &failing[..] else {
        panic!("one span for the refused call: {failing:#?}");
    };
    assert_eq!(refused.name, "zae_limiter.v1.RateLimiter/Acquire");
    assert_eq!(int(&refused.attributes, "rpc.grpc.status_code"), Some(3));
    let status = refused.status.as_ref().expect("a status");
    assert_eq!(status.code, 2, "ERROR: {status:?}");
    assert!(status.message.contains("entity_id"), "{status:?}");
    for (service, span) in &spans {
        assert_eq!(service, "limiter-under-test");
        assert_eq!(
            hex(&span.trace_id),
            trace_id,
            "a span outside the caller's trace: {span:?}"
        );
    }
    let by_name = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .collect()
    };
    let rpc = by_name("zae_limiter.v1.RateLimiter/Acquire");
    assert_eq!(rpc.len(), 1, "{spans:#?}");
    let rpc = rpc[0];
    assert_eq!(hex(&rpc.parent_span_id), caller_span);
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(
        string(&rpc.attributes, "rpc.system").as_deref(),
        Some("grpc")
    );
    assert_eq!(
        string(&rpc.attributes, "rpc.method").as_deref(),
        Some("Acquire")
    );

    // Every other span descends from the RPC's.
    let parent_of = |s: &Span| {
        spans
            .iter()
            .map(|(_, p)| p)
            .find(|p| p.span_id == s.parent_span_id)
    };
    for (_, span) in &spans {
        let mut at = span;
        while at.span_id != rpc.span_id {
            at = parent_of(at)
                .unwrap_or_else(|| panic!("{} is not under the RPC: {spans:#?}", span.name));
        }
    }
    assert_eq!(by_name("look-up cascade parent").len(), 1, "{spans:#?}");
    assert_eq!(by_name("look-up group root").len(), 1, "{spans:#?}");
    // A new bucket: the round reads it, then writes it; each store call is a client span.
    let write_round = by_name("round write");
    assert_eq!(write_round.len(), 1, "{spans:#?}");
    assert_eq!(
        int(&write_round[0].attributes, "round.acquires"),
        Some(1),
        "{:?}",
        write_round[0]
    );
    let writes = by_name("store write");
    assert_eq!(writes.len(), 1, "{spans:#?}");
    let write = writes[0];
    assert_eq!(write.parent_span_id, write_round[0].span_id);
    assert_eq!(write.kind, SpanKind::Client as i32);
    assert_eq!(
        string(&write.attributes, "store.operation").as_deref(),
        Some("write")
    );
    assert_eq!(int(&write.attributes, "store.items"), Some(1));
    assert_eq!(int(&write.attributes, "store.write_units"), Some(1));
    assert_eq!(
        string(&write.attributes, "store.outcome").as_deref(),
        Some("ok")
    );
    assert_eq!(int(&write.attributes, "store.conflicts"), Some(0));
    let loads = by_name("store load");
    assert_eq!(loads.len(), 1, "{spans:#?}");
    assert_eq!(loads[0].parent_span_id, by_name("round load")[0].span_id);
}

#[test]
fn telemetry_settings_that_cannot_be_used_are_refused_naming_the_key() {
    for (section, key) in [
        ("sampling_ratio = 1.5", "telemetry.sampling_ratio"),
        ("endpoint = \"localhost:4317\"", "telemetry.endpoint"),
        ("service_name = \"\"", "telemetry.service_name"),
        ("sample = 1", "sample"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("[telemetry]\nenabled = true\n{section}\n")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{section}: {err}");
        assert!(err.contains(key), "{section}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_call_is_one_trace_and_background_store_calls_start_none() {
    // Every call sampled; frequent probes and usage flushes, whose store calls are no call's.
    let (receiver, mut daemon, mut client) = traced_daemon(
        "[server]\nhealth_probe_ms = 20\n[limiter]\nusage_flush_ms = 50\n",
        "sampling_ratio = 1.0\n",
    )
    .await;
    let answer = client.acquire(acquire("sampled")).await.unwrap();
    assert!(answer.into_inner().allowed);
    // Several flushes and probes later.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(daemon.terminate().success(), "{}", daemon.log());

    let spans = receiver.spans();
    let rpc: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "zae_limiter.v1.RateLimiter/Acquire")
        .collect();
    assert_eq!(rpc.len(), 1, "{spans:#?}");
    assert!(rpc[0].parent_span_id.is_empty(), "a root: {:?}", rpc[0]);
    assert_eq!(string(&rpc[0].attributes, "service.name"), None);
    for (service, span) in &spans {
        assert_eq!(service, "zae-limiter", "the default service name");
        assert_eq!(
            span.trace_id, rpc[0].trace_id,
            "a trace of its own: {span:#?}"
        );
    }
    assert!(
        spans.iter().any(|(_, s)| s.name == "store write"),
        "{spans:#?}"
    );
}
