//! Sharing one daemon safely and running it: leases that belong to their caller, admin by grant,
//! socket ownership, health that follows the store, reload on SIGHUP, and error messages that
//! say what to do. Each test starts the real binary; callers of another uid are the CLI run as
//! `nobody` (when the tests run as root) and, everywhere, separate loopback TCP connections.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::acquire_request;
use common::daemon::{Daemon, free_port};
use common::proxy::{Fault, FaultProxy};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use zae_limiter::Limit;
use zae_limiter::client::Acquire;
use zae_limiter::proto;
use zae_limiter::proto::admin_client::AdminClient;
use zae_limiter::proto::rate_limiter_client::RateLimiterClient;

/// The uid and gid of `nobody`, the other user of these tests.
const NOBODY: u32 = 65_534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A folder everyone may enter (the socket lives there, so `nobody` can reach it).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The binary where `nobody` may run it: a hard link (or copy) in a folder everyone may enter.
fn binary_for_everyone(dir: &Path) -> PathBuf {
    let to = dir.join("zae-limiter");
    if !to.exists() && std::fs::hard_link(env!("CARGO_BIN_EXE_zae-limiter"), &to).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_zae-limiter"), &to).unwrap();
    }
    to
}

/// Runs the CLI against `socket`, as `uid` when given.
fn cli(dir: &Path, socket: &Path, uid: Option<u32>, args: &[&str]) -> Output {
    let mut cmd = Command::new(binary_for_everyone(dir));
    cmd.args(args).arg("--socket").arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid).env("HOME", "/");
    }
    cmd.output().expect("run the CLI")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn tcp_channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect over TCP")
}

fn lease(id: &str) -> proto::LeaseRequest {
    proto::LeaseRequest {
        lease_id: id.to_owned(),
        ..Default::default()
    }
}

/// A daemon on a socket everyone may open (mode 0666, in [`open_dir`]) and a loopback TCP port.
fn shared_daemon(config: &str) -> (tempfile::TempDir, u16, Daemon) {
    let dir = open_dir();
    let port = free_port();
    let daemon = Daemon::start_at(
        config,
        Some(dir.path().join("zl.sock")),
        &["--tcp", &format!("127.0.0.1:{port}")],
    );
    (dir, port, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_answers_only_the_caller_that_opened_it() {
    let (dir, port, daemon) = shared_daemon("[server]\nsocket_mode = \"0666\"\n");
    let mut mine = daemon.client().await.raw();
    let id = mine
        .acquire(acquire_request("k"))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    let (seq, secret) = id.split_once('.').expect("a lease id has two parts");
    assert_eq!(secret.len(), 32, "128 random bits: {id}");
    let other = mine
        .acquire(acquire_request("k"))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    assert_ne!(
        other.split_once('.').unwrap().1,
        secret,
        "each lease has its own secret"
    );

    // A forged id (the right sequence number, another secret) is unknown.
    let forged = format!("{seq}.{}", "0".repeat(32));
    let unknown = format!("fffffff.{}", "0".repeat(32));
    let forged_err = mine.commit(lease(&forged)).await.unwrap_err();
    let unknown_err = mine.commit(lease(&unknown)).await.unwrap_err();
    assert_eq!(forged_err.code(), Code::NotFound);
    assert_eq!(
        forged_err.message().replace(&forged, "ID"),
        unknown_err.message().replace(&unknown, "ID"),
        "a forged id reads exactly as an unknown one"
    );

    // Another TCP connection may not use a lease opened on this one.
    let mut a = RateLimiterClient::new(tcp_channel(port).await);
    let mut b = RateLimiterClient::new(tcp_channel(port).await);
    let on_a = a
        .acquire(acquire_request("t"))
        .await
        .unwrap()
        .into_inner()
        .lease_id;
    for err in [
        b.commit(lease(&on_a)).await.unwrap_err(),
        b.rollback(lease(&on_a)).await.unwrap_err(),
        b.adjust(proto::AdjustRequest {
            lease_id: on_a.clone(),
            delta: [("rpm".to_owned(), 5)].into(),
        })
        .await
        .unwrap_err(),
        mine.commit(lease(&on_a)).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            err.message().contains("unknown, closed or expired"),
            "{err:?}"
        );
    }
    a.rollback(lease(&on_a))
        .await
        .expect("its opener closes it");

    // Another uid on the socket (the CLI as nobody) gets NOT_FOUND; the owner still commits.
    if is_root() {
        let out = cli(
            dir.path(),
            &daemon.socket,
            Some(NOBODY),
            &["lease", "commit", &id],
        );
        assert!(!out.status.success(), "{}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains("NotFound") && text(&out.stderr).contains(&id),
            "{}",
            text(&out.stderr)
        );
    } else {
        eprintln!(
            "not root: the other-uid half of this test needs root to run a process as nobody"
        );
    }
    mine.commit(lease(&id)).await.expect("the owner commits");
}

/// Limits of entity `e` as the CLI prints them as JSON, run as `uid`.
fn limits_of(dir: &Path, daemon: &Daemon, uid: Option<u32>) -> Output {
    cli(
        dir,
        &daemon.socket,
        uid,
        &["limits", "get", "--entity", "e", "--output", "json"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_a_grant_and_a_reload_grants_it_without_dropping_requests() {
    let config = "[server]\nsocket_mode = \"0666\"\nlog_level = \"info\"\n";
    let (dir, port, daemon) = shared_daemon(config);
    let set = |tokens: u64| proto::SetLimitsRequest {
        scope: Some(proto::LimitScope {
            entity_id: Some("e".into()),
            resource: None,
        }),
        limits: vec![proto::Limit {
            name: "rpm".into(),
            capacity: tokens,
            refill_amount: tokens,
            refill_period_ms: 60_000,
            soft: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    // The daemon's own uid may change.
    let mut owner = daemon.client().await.admin();
    owner.set_limits(set(10)).await.unwrap();

    // A TCP caller has no uid: without rules it may read, not change.
    let mut tcp = AdminClient::new(tcp_channel(port).await);
    let err = tcp.set_limits(set(99)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("may not set limits") && err.message().contains("admin = true"),
        "{}",
        err.message()
    );
    let err = tcp
        .create_namespace(proto::NamespaceRequest {
            namespace: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let read = tcp
        .get_limits(proto::LimitsRequest {
            scope: set(0).scope,
            ..Default::default()
        })
        .await
        .expect("reading needs no grant")
        .into_inner();
    assert_eq!(
        read.limits[0].capacity, 10,
        "the refused change changed nothing"
    );

    if is_root() {
        let out = cli(
            dir.path(),
            &daemon.socket,
            Some(NOBODY),
            &["limits", "set", "--entity", "e", "--limit", "rpm=1/1m"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains("PermissionDenied")
                && text(&out.stderr).contains(&format!("uid {NOBODY}")),
            "{}",
            text(&out.stderr)
        );
        let out = limits_of(dir.path(), &daemon, Some(NOBODY));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("\"capacity\":10"),
            "{}",
            text(&out.stdout)
        );
    }

    // Reload with a rule that grants changes to everyone, while requests are in flight.
    let client = daemon.client().await;
    let load = tokio::spawn({
        let client = client.clone();
        async move {
            let mut raw = client.raw();
            let started = Instant::now();
            let mut answered = 0;
            while started.elapsed() < Duration::from_millis(1_500) {
                let mut req = acquire_request("busy");
                req.commit = true;
                raw.acquire(req)
                    .await
                    .expect("no request is dropped by a reload");
                answered += 1;
            }
            answered
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        daemon.config_path(),
        format!("{config}[[access]]\nnamespaces = [\"default\"]\nadmin = true\n"),
    )
    .unwrap();
    daemon.hangup();
    daemon.wait_for_log("configuration reloaded");
    assert!(load.await.unwrap() > 0);
    tcp.set_limits(set(20))
        .await
        .expect("the reloaded rule grants changes");
    assert_eq!(
        daemon.metric("zae_limiter_config_reloads_total", &["outcome=\"applied\""]),
        1.0
    );

    // A broken file is refused; the running rules stay, and the daemon keeps serving.
    std::fs::write(daemon.config_path(), "[server\nsocket_mode = ").unwrap();
    daemon.hangup();
    daemon.wait_for_log("reload refused");
    assert!(daemon.log().contains("line 1"), "{}", daemon.log());
    tcp.set_limits(set(30))
        .await
        .expect("the running rules stay");
    assert_eq!(
        daemon.metric("zae_limiter_config_reloads_total", &["outcome=\"refused\""]),
        1.0
    );
    // A setting that needs a restart is named, and keeps its running value.
    std::fs::write(
        daemon.config_path(),
        "[server]\nsocket_mode = \"0600\"\n[limiter]\nmax_batch = 3\n",
    )
    .unwrap();
    daemon.hangup();
    daemon.wait_for_log("server.socket_mode, limiter.max_batch changed");
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666);
}

#[test]
fn the_socket_gets_its_group_and_mode_before_anyone_connects() {
    let gid = if is_root() {
        NOBODY
    } else {
        nix::unistd::getegid().as_raw()
    };
    // The group's name as the system resolves it (the daemon looks it up the same way).
    let name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name);
    let group = name.unwrap_or_else(|| gid.to_string());
    let config = format!("[server]\nsocket_group = \"{group}\"\nsocket_mode = \"0640\"\n");
    let daemon = Daemon::start(&config, &[]);
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.gid(), gid);
    let leftovers: Vec<_> = std::fs::read_dir(daemon.socket.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".zae-limiter"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let out = Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["serve", "--no-metrics", "--socket"])
        .arg(daemon.dir.path().join("other.sock"))
        .arg("--config")
        .arg({
            let p = daemon.dir.path().join("bad-group.toml");
            std::fs::write(&p, "[server]\nsocket_group = \"no-such-group-here\"\n").unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("server.socket_group: no group \"no-such-group-here\""),
        "{}",
        text(&out.stderr)
    );
}

async fn health(channel: Channel, service: &str) -> Result<i32, tonic::Status> {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Polls until the health of `service` is `want` (30 s at most).
async fn await_health(daemon: &Daemon, want: i32) {
    let channel = daemon.client().await.channel();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if health(channel.clone(), "").await.ok() == Some(want)
            && health(channel.clone(), "zae_limiter.v1.RateLimiter")
                .await
                .ok()
                == Some(want)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health never became {want}; log:\n{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready_follow_the_store() {
    common::dynamodb().await; // the test table exists
    let proxy = FaultProxy::start(&common::endpoint()).await;
    let ns = common::unique_namespace();
    let config = format!(
        "[server]\nhealth_probe_ms = 100\n{}attempt_timeout_ms = 500\nmax_attempts = 1\n",
        common::dynamodb_config(&ns, &proxy.endpoint(), "")
    );
    let daemon = Daemon::start(&config, &[]);
    await_health(&daemon, SERVING).await;
    assert_eq!(daemon.http_get("/ready"), (200, "ready\n".to_owned()));
    assert_eq!(daemon.http_get("/live").0, 200);
    assert_eq!(daemon.http_get("/nope").0, 404);
    assert_eq!(daemon.http_get("/metrics/extra").0, 404);
    assert_eq!(daemon.metric("zae_limiter_store_up", &[]), 1.0);

    proxy.set(Fault::Down);
    await_health(&daemon, NOT_SERVING).await;
    let (code, body) = daemon.http_get("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot reach DynamoDB"), "{body}");
    assert_eq!(daemon.metric("zae_limiter_store_up", &[]), 0.0);
    // Several failed probes later, the failure is still logged once, with its cause.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = daemon.log();
    assert_eq!(
        log.matches("store calls are failing").count(),
        1,
        "once per change of state:\n{log}"
    );
    assert!(
        log.contains("WARN") && log.contains("cannot reach DynamoDB"),
        "{log}"
    );

    proxy.set(Fault::Pass);
    await_health(&daemon, SERVING).await;
    assert_eq!(daemon.http_get("/ready").0, 200);
    daemon.wait_for_log("store calls succeed again");
}

#[test]
fn a_missing_table_is_reported_at_start_up() {
    let ns = common::unique_namespace();
    let config = common::dynamodb_config(&ns, &common::endpoint(), "")
        .replace("zae-limiter-tests", "no-such-table-here");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for_log("the store cannot serve");
    assert!(
        daemon
            .log()
            .contains("\"no-such-table-here\" does not exist"),
        "{}",
        daemon.log()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = daemon.client().await.channel();
        assert_eq!(health(channel, "").await.unwrap(), NOT_SERVING);
    });
    assert_eq!(daemon.http_get("/ready").0, 503);

    let out = Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["serve", "--no-metrics", "--require-store", "--config"])
        .arg(daemon.config_path())
        .arg("--socket")
        .arg(daemon.dir.path().join("strict.sock"))
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: the store cannot serve: table \"no-such-table-here\" does not exist"),
        "{err}"
    );
}

#[test]
fn connection_errors_name_the_socket_and_the_os_error() {
    let dir = open_dir();
    let missing = dir.path().join("nosuch.sock");
    let out = cli(dir.path(), &missing, None, &["namespace", "list"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(&missing.display().to_string())
            && err.contains("No such file")
            && err.contains("zae-limiter serve"),
        "{err}"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, "").unwrap();
    let err = text(&cli(dir.path(), &file, None, &["namespace", "list"]).stderr);
    assert!(
        err.contains("plain-file") && err.contains("not a socket"),
        "{err}"
    );

    // A socket file with no daemon behind it.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let err = text(&cli(dir.path(), &stale, None, &["namespace", "list"]).stderr);
    assert!(err.contains("Connection refused"), "{err}");

    if is_root() {
        let daemon = Daemon::start_at("", Some(dir.path().join("private.sock")), &[]);
        let err = text(
            &cli(
                dir.path(),
                &daemon.socket,
                Some(NOBODY),
                &["namespace", "list"],
            )
            .stderr,
        );
        assert!(
            err.contains("private.sock")
                && err.contains("Permission denied")
                && err.contains("socket_group"),
            "{err}"
        );
    }
}

#[test]
fn config_errors_give_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\n\nmetrics_addr = 127.0.0.1:9\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("bad.toml") && err.contains("line 3, column 21, key server.metrics_addr"),
        "{err}"
    );
}

/// The CLI's `status` against `endpoint`, with no AWS credentials anywhere.
fn status_without_credentials(endpoint: &str) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["status", "--table", "t", "--endpoint-url", endpoint])
        .env_clear()
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
        .output()
        .unwrap()
}

/// What the CLI's `status` against `endpoint` (with test credentials) prints on stderr.
fn status_error(endpoint: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
        .args(["status", "--table", "t", "--endpoint-url", endpoint])
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .output()
        .unwrap();
    assert!(!out.status.success());
    text(&out.stderr)
}

#[test]
fn store_errors_are_classified_with_their_cause() {
    let err = text(&status_without_credentials(&common::endpoint()).stderr);
    assert!(err.contains("no usable AWS credentials"), "{err}");
    assert!(!err.contains("temporarily unavailable"), "{err}");

    // An HTTP server that is not DynamoDB.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\nnot found",
            );
        }
    });
    let err = status_error(&format!("http://{addr}"));
    assert!(
        err.contains("HTTP 404") && err.contains("is it a DynamoDB endpoint?"),
        "{err}"
    );

    // Nothing listening.
    let err = status_error(&format!("http://127.0.0.1:{}", free_port()));
    assert!(
        err.contains("cannot reach DynamoDB") && err.contains("Connection refused"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_there_from_the_start_with_build_info_and_store_latency() {
    let daemon = Daemon::start("", &[]);
    let text = daemon.scrape();
    for series in [
        "zae_limiter_build_info{version=\"",
        "zae_limiter_decisions_total{outcome=\"shed\"} 0",
        "zae_limiter_decisions_total{outcome=\"failed_open\"} 0",
        "zae_limiter_compensations_total 0",
        "zae_limiter_conflicts_total 0",
        "zae_limiter_store_calls_total{operation=\"commit\",outcome=\"error\"} 0",
        "zae_limiter_store_up 1",
        "zae_limiter_store_call_duration_seconds_bucket{operation=\"probe\",le=\"0.001\"}",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    // The standard process metrics, under the names Prometheus's own clients give them.
    assert!(
        daemon.metric("process_resident_memory_bytes", &[]) > 1e6,
        "{text}"
    );
    assert!(
        daemon.metric("process_virtual_memory_bytes", &[]) > 1e6,
        "{text}"
    );
    // The socket, the metrics port, the log and the standard streams at least.
    assert!(daemon.metric("process_open_fds", &[]) >= 5.0, "{text}");
    assert!(daemon.metric("process_max_fds", &[]) >= 64.0, "{text}");
    assert!(daemon.metric("process_threads", &[]) >= 1.0, "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = daemon.metric("process_start_time_seconds", &[]);
    assert!(
        started > now - 600.0 && started <= now + 1.0,
        "started {started}, now {now}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    // The CPU it spends shows: it grows while the daemon works.
    let before = daemon.metric("process_cpu_seconds_total", &[]);
    let client = daemon.client().await;
    let limits = [Limit::per_minute("rpm", 1_000_000).unwrap()];
    for _ in 0..2_000 {
        let acquire = Acquire::new("cpu", "r").limits(&limits).consume("rpm", 1);
        client.consume(acquire).await.unwrap();
    }
    assert!(daemon.metric("process_cpu_seconds_total", &[]) > before);
}

/// Raw HTTP on the metrics port: what the text of the answers to `requests`, written at once, is.
fn raw_http(daemon: &Daemon, requests: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(daemon.metrics).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(requests).unwrap();
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_speaks_http_as_scrapers_and_probes_do() {
    let daemon = Daemon::start("", &[]);
    // Keep-alive: three requests on one connection (pipelined), the last one closing it.
    let text = raw_http(
        &daemon,
        b"GET /live HTTP/1.1\r\nHost: a\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert!(text.contains("zae_limiter_build_info"), "{text}");
    assert!(text.ends_with("ready\n"), "{text}");
    // HTTP/1.0, as some probes speak it: answered, then closed.
    let text = raw_http(&daemon, b"GET /live HTTP/1.0\r\n\r\n");
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("live\n"), "{text}");
    // HEAD: the headers without the body.
    let text = raw_http(
        &daemon,
        b"HEAD /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 5\r\n"), "{text}");
    assert!(!text.ends_with("live\n"), "{text}");
    // A head larger than the limit: 431, and the daemon goes on serving.
    let mut huge = b"GET /live HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let text = raw_http(&daemon, &huge);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    // Not HTTP at all, a method it does not serve: the connection's own answer, nothing else.
    let text = raw_http(&daemon, b"\x16\x03\x01garbage\r\n\r\n");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 400 "),
        "{text}"
    );
    let text = raw_http(
        &daemon,
        b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert!(text.contains("allow: GET, HEAD\r\n"), "{text}");
    assert_eq!(daemon.http_get("/live").0, 200);
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zae-limiter"))
            .args(args)
            .output()
            .unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["serve", "acquire", "namespace", "socket", "require-store"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = run(&["man"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH zae-limiter 1"), "{page}");
    assert!(
        page.contains("serve") && page.contains("completions"),
        "{page}"
    );
    // A usage error exits 2, as the README lists.
    assert_eq!(run(&["limits", "set", "rpm=1/1m"]).status.code(), Some(2));
}

/// The health probe is a call of its own only when the daemon makes none: under traffic the
/// store's answers to that traffic are the health (a probe there would only add load; on DynamoDB
/// Local, whose `DescribeTable` counts every item, it held up the writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_is_the_health_probe_while_there_is_any() {
    let daemon = Daemon::start("[server]\nhealth_probe_ms = 300\n", &[]);
    let probes = || {
        daemon.metric(
            "zae_limiter_store_calls_total",
            &["operation=\"probe\"", "outcome=\"ok\""],
        )
    };
    let mut raw = daemon.client().await.raw();
    let before = probes();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let mut req = acquire_request("steady");
        req.commit = true;
        raw.acquire(req).await.unwrap();
        answered += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let under_traffic = probes() - before;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = probes() - before - under_traffic;
    assert!(answered > 10);
    assert!(
        under_traffic <= 2.0,
        "{under_traffic} probes in 3 s of traffic (one every 300 ms when idle)"
    );
    assert!(idle >= 4.0, "{idle} probes in 3 s idle");
}
