//! Load generator: starts the real daemon (release build) and drives it over its Unix socket with C
//! concurrent clients on K entities, then prints decisions/s, latency percentiles, store writes per
//! admitted decision, rejections served from cache, and the daemon's CPU time per decision.
//!
//! ```text
//! cargo bench --bench loadgen -- --clients 64 --entities 1 --seconds 10              # hot entity
//! cargo bench --bench loadgen -- --one-call                                          # acquire+commit in one call
//! cargo bench --bench loadgen -- --clients 64 --entities 10000 --seconds 10          # many entities
//! cargo bench --bench loadgen -- --mode reject --clients 64 --seconds 5              # cached rejections
//! cargo bench --bench loadgen -- --mode health --rate 800                            # paced calls
//! cargo bench --bench loadgen -- --backend dynamodb --endpoint http://127.0.0.1:8000 # DynamoDB Local
//! cargo bench --bench loadgen -- --mode memory --entities 1000000                    # RSS per entity
//! cargo bench --bench loadgen -- --mode memory --entities 20000 --rounds 3 --entity-cache-ms 3000
//!                                                          # memory follows the entities in use
//! cargo bench --bench loadgen -- --set "idle_timeout_ms = 50" ...                    # a daemon setting
//! cargo bench --bench loadgen -- --entities 100 --cascade --one-call                 # 100 children, one parent
//! cargo bench --bench loadgen -- --daemon path/to/older/zae-limiter                  # before/after
//! cargo bench --bench loadgen -- --envoy --clients 64                                # Envoy's ShouldRateLimit
//! cargo bench --bench loadgen -- --traces 0.01 ...                                   # OpenTelemetry on
//! ```
//! `--backend dynamodb` without `--endpoint` uses `ZAE_TEST_DYNAMODB_ENDPOINT` (as set by
//! `scripts/test.sh`).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use zae_limiter::Limit;
use zae_limiter::client::{Acquire, Client, ClientError};
use zae_limiter::store::dynamodb::{DynamoSettings, table};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    /// Every request fits: admitted decisions (acquire + commit).
    Admit,
    /// Capacity 1: after the first, every request is rejected (from the cache).
    Reject,
    /// One acquire for each of `--entities` distinct entities; reports resident memory per entity.
    Memory,
    /// No daemon: conditional `UpdateItem` calls straight from this process, through a client
    /// with the daemon's SDK settings (`--clients` at once, distinct items, `--seconds`); reports
    /// this process's CPU per call, the SDK's floor under a cold decision. DynamoDB only.
    Sdk,
    /// The gRPC health check instead of a decision: the same socket, server and client with no
    /// limiter work, the floor under the other modes' latency and CPU.
    Health,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Backend {
    Memory,
    Dynamodb,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value = "admit")]
    mode: Mode,
    #[arg(long, value_enum, default_value = "memory")]
    backend: Backend,
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// gRPC connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    entities: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Acquire and commit in one call (`Client::consume`) instead of acquire, then commit.
    #[arg(long)]
    one_call: bool,
    /// Make the entities cascading children of one parent with a stored limit of its own: every
    /// decision charges the child and the shared parent in one atomic write.
    #[arg(long)]
    cascade: bool,
    /// The daemon binary to drive (default: this build's), e.g. an older build for a before/after
    /// comparison in the same run.
    #[arg(long)]
    daemon: Option<std::path::PathBuf>,
    /// Daemons sharing the DynamoDB table and namespace, each with `--connections` connections;
    /// the clients spread evenly over them. Their store calls, conflicts and CPU are summed.
    #[arg(long, default_value_t = 1)]
    daemons: usize,
    /// Admit mode: the limit refills this many tokens a second (default: so many that the bucket
    /// is back at its capacity within a millisecond, and every write refills).
    #[arg(long, default_value_t = 100_000_000)]
    refill_per_second: u64,
    /// Admit mode: the limit's capacity in tokens (default: the refill of one second). A bucket
    /// consumed faster than it refills drains, and its writes defer the refill.
    #[arg(long)]
    capacity: Option<u64>,
    /// Admit mode: the limit is soft (debited, never refusing; a drained bucket goes into debt).
    #[arg(long)]
    soft: bool,
    /// The limit is a calendar quota on this five-field cron pattern (UTC) instead of a dripping
    /// one: of `--capacity` tokens (default 10^12) in admit mode, of 1 in reject mode.
    #[arg(long)]
    quota: Option<String>,
    /// The (dripping) limit has a schedule of one entry on this five-field cron pattern (UTC)
    /// that scales it by 1: the same limit, decided through the schedule's machinery.
    #[arg(long)]
    schedule: Option<String>,
    /// Calls per second in all, spread evenly over the clients (default: each client calls
    /// again as soon as it has its answer). Paced calls measure the cost of a call at the rate
    /// another run reached, e.g. the health check at the cold path's rate.
    #[arg(long)]
    rate: Option<f64>,
    /// DynamoDB: the namespace (default: one of this run's own). A run on the namespace of an
    /// earlier one finds its items, e.g. usage snapshots that exist already, as in a steady state.
    #[arg(long)]
    namespace: Option<String>,
    /// The daemon's runtime threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    daemon_threads: usize,
    /// The load generator's own runtime threads (0: one per core; 1: a single-threaded runtime).
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// Decide through Envoy's rate limit service (`ShouldRateLimit`, one descriptor `api_key`
    /// per request, a rule with the same limit) instead of the RateLimiter service.
    #[arg(long)]
    envoy: bool,
    /// Memory mode: rounds of `--entities` new entities each, RSS reported after each.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Memory mode: the daemon's `entity_cache_ms` (unset: the daemon's default); after each
    /// round the load generator also waits until the idle records are forgotten.
    #[arg(long)]
    entity_cache_ms: Option<u64>,
    /// A `[limiter]` setting for the daemon, `key = value` (repeatable), e.g.
    /// `--set "idle_timeout_ms = 100"`.
    #[arg(long = "set")]
    settings: Vec<String>,
    /// A `[dynamodb]` setting for the daemon (repeatable), e.g.
    /// `--store-set "write_calls_in_flight = 0"`.
    #[arg(long = "store-set")]
    store_settings: Vec<String>,
    /// SDK mode: trims to the client's configuration, comma-separated: `nostall` (no stalled
    /// stream protection), `noretry`, `nocache` (no identity cache), `notimeout`.
    #[arg(long, default_value = "")]
    sdk_trims: String,
    /// SDK mode: conditional writes per call; above 1, one `BatchExecuteStatement` of that many
    /// conditional PartiQL updates (at most 25) on distinct items instead of one `UpdateItem`.
    #[arg(long, default_value_t = 1)]
    sdk_batch: usize,
    /// SDK mode with `--sdk-batch`: after each batch, read the items written back in one
    /// strongly consistent `BatchGetItem` (a batch of PartiQL updates returns no new images).
    #[arg(long)]
    sdk_read_back: bool,
    /// Memory mode: how long to wait for the actors to stop (and records to be forgotten).
    #[arg(long, default_value_t = 30)]
    settle_seconds: u64,
    /// Memory mode: after each round is forgotten, wait this long more and report RSS again
    /// (idle connections to the store close after a while).
    #[arg(long, default_value_t = 0)]
    linger_seconds: u64,
    /// Traces on, with this sampling ratio: the daemon exports them (`[telemetry]`) to an OTLP
    /// receiver in this process, which counts the spans.
    #[arg(long)]
    traces: Option<f64>,
    /// `cargo bench` passes --bench; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Daemon {
    child: Child,
    metrics: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The DynamoDB namespace the daemons serve (`--namespace`).
static NAMESPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn start(
    binary: Option<&std::path::Path>,
    endpoint: Option<&str>,
    threads: usize,
    limiter_config: &str,
    extra_config: &str,
) -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("zl.sock");
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = String::from("[limiter]\n");
    config += limiter_config;
    if let Some(endpoint) = endpoint {
        config += &format!(
            "backend = \"dynamodb\"\nnamespaces = [\"{}\"]\n[dynamodb]\ntable = \"zae-limiter-bench\"\nendpoint_url = \"{endpoint}\"\n",
            NAMESPACE.get().expect("set in main")
        );
    }
    config += extra_config;
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let binary = binary.unwrap_or(std::path::Path::new(env!("CARGO_BIN_EXE_zae-limiter")));
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-addr", &metrics.to_string()])
        .args(["--worker-threads", &threads.to_string()])
        .env("RUST_LOG", "warn")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the daemon");
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        Daemon {
            child,
            metrics,
            _dir: dir,
        },
        socket,
    )
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label) && !l.starts_with('#'))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// User + system CPU time of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = Args::parse();
    NAMESPACE
        .set(
            args.namespace
                .clone()
                .unwrap_or_else(|| format!("bench{}", std::process::id())),
        )
        .expect("set once");
    let runtime = match args.client_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    runtime.expect("start the runtime").block_on(run(args));
}

async fn run(args: Args) {
    let endpoint = match args.backend {
        Backend::Memory => None,
        Backend::Dynamodb => Some(
            args.endpoint
                .clone()
                .or_else(|| std::env::var("ZAE_TEST_DYNAMODB_ENDPOINT").ok())
                .expect("--backend dynamodb needs --endpoint or ZAE_TEST_DYNAMODB_ENDPOINT"),
        ),
    };
    assert!(
        args.store_settings.is_empty() || endpoint.is_some(),
        "--store-set is for the DynamoDB store: add --backend dynamodb"
    );
    assert!(
        args.rate.is_none_or(|r| r.is_finite() && r >= 1.0),
        "--rate: calls per second, at least 1"
    );
    if let Some(endpoint) = &endpoint {
        let mut s = DynamoSettings::new("zae-limiter-bench");
        s.endpoint_url = Some(endpoint.clone());
        s.credentials = Some(("local".into(), "local".into()));
        table::deploy(&s.client().await, "zae-limiter-bench")
            .await
            .expect("deploy the bench table");
    }
    if args.mode == Mode::Sdk {
        let endpoint = endpoint.expect("--mode sdk needs --backend dynamodb");
        return sdk_floor(&args, &endpoint).await;
    }
    let envoy_rule = format!(
        "\n[[envoy.rules]]\nname = \"bench\"\ndomain = \"bench\"\nentries = [{{ key = \"api_key\" }}]\n\
         entity = \"api_key\"\nresource = \"model\"\nlimits = [\"{}\"]\n",
        match args.mode {
            Mode::Reject => "rpm=1/1h",
            _ => "rps=100000000/1s",
        }
    );
    assert!(
        args.daemons == 1 || endpoint.is_some(),
        "--daemons above 1 share a DynamoDB table: it needs --backend dynamodb"
    );
    let limiter_config = args
        .entity_cache_ms
        .map(|ms| format!("entity_cache_ms = {ms}\n"))
        .unwrap_or_default()
        + &args
            .settings
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>();
    let telemetry = match args.traces {
        Some(ratio) => {
            assert!(
                (0.0..=1.0).contains(&ratio),
                "--traces: a ratio from 0 to 1"
            );
            let endpoint = otlp::start().await;
            format!(
                "\n[telemetry]\nenabled = true\nendpoint = \"{endpoint}\"\nsampling_ratio = {ratio:?}\n"
            )
        }
        None => String::new(),
    };
    let mut daemons = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..args.daemons.max(1) {
        let (daemon, socket) = start(
            args.daemon.as_deref(),
            endpoint.as_deref(),
            args.daemon_threads,
            &limiter_config,
            &format!(
                "{}{}{telemetry}",
                args.store_settings
                    .iter()
                    .map(|s| format!("{s}\n"))
                    .collect::<String>(),
                if args.envoy { &envoy_rule } else { "" }
            ),
        );
        daemons.push(daemon);
        for _ in 0..args.connections.max(1) {
            clients.push(Client::connect(&socket).await.unwrap());
        }
    }
    match args.mode {
        Mode::Memory => memory(&args, &clients, &daemons[0], daemons[0].child.id()).await,
        Mode::Admit | Mode::Reject | Mode::Health => throughput(&args, &clients, &daemons).await,
        Mode::Sdk => unreachable!("no daemon in sdk mode"),
    }
}

/// `--mode sdk`: what one conditional `UpdateItem` costs this process through the SDK alone.
async fn sdk_floor(args: &Args, endpoint: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut settings = DynamoSettings::new("zae-limiter-bench");
    settings.endpoint_url = Some(endpoint.to_string());
    settings.credentials = Some(("local".into(), "local".into()));
    let client = settings.client().await;
    let trims = &args.sdk_trims;
    let mut conf = client.config().to_builder();
    for trim in trims.split(',').filter(|t| !t.is_empty()) {
        use aws_sdk_dynamodb::config;
        conf = match trim {
            "nostall" => {
                conf.stalled_stream_protection(config::StalledStreamProtectionConfig::disabled())
            }
            "noretry" => conf.retry_config(config::retry::RetryConfig::disabled()),
            "nocache" => conf.identity_cache(config::IdentityCache::no_cache()),
            "notimeout" => conf.timeout_config(config::timeout::TimeoutConfig::disabled()),
            other => panic!("--sdk-trims: unknown trim {other}"),
        };
    }
    let client = aws_sdk_dynamodb::Client::from_conf(conf.build());
    let calls = Arc::new(AtomicU64::new(0));
    let batch = args.sdk_batch;
    assert!(
        (1..=25).contains(&batch),
        "--sdk-batch: 1 to 25 writes per call"
    );
    let call = |client: aws_sdk_dynamodb::Client, item: String| async move {
        client
            .update_item()
            .table_name("zae-limiter-bench")
            .key("PK", AttributeValue::S(format!("sdk-floor#{item}")))
            .key("SK", AttributeValue::S("#N".into()))
            .update_expression("ADD n :one")
            .condition_expression("attribute_not_exists(v) OR v < :one")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await
            .expect("UpdateItem")
    };
    // The same write in PartiQL: an UPDATE only changes an item that exists, as the daemon's
    // writes of a known bucket do.
    let read_back = args.sdk_read_back;
    let batch_call = move |client: aws_sdk_dynamodb::Client, items: Vec<String>| async move {
        use aws_sdk_dynamodb::types::{
            BatchStatementRequest, KeysAndAttributes, ReturnValuesOnConditionCheckFailure,
        };
        let statements = items
            .iter()
            .map(|item| {
                BatchStatementRequest::builder()
                    .statement(
                        "UPDATE \"zae-limiter-bench\" SET n = n + ? \
                         WHERE PK = ? AND SK = ? AND (v IS MISSING OR v < ?)",
                    )
                    .parameters(AttributeValue::N("1".into()))
                    .parameters(AttributeValue::S(format!("sdk-floor#{item}")))
                    .parameters(AttributeValue::S("#N".into()))
                    .parameters(AttributeValue::N("1".into()))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()
                    .unwrap()
            })
            .collect();
        let out = client
            .batch_execute_statement()
            .set_statements(Some(statements))
            .send()
            .await
            .expect("BatchExecuteStatement");
        for r in out.responses() {
            assert!(r.error().is_none(), "a statement failed: {:?}", r.error());
        }
        if read_back {
            let keys = items.iter().map(|item| {
                std::collections::HashMap::from([
                    (
                        "PK".to_string(),
                        AttributeValue::S(format!("sdk-floor#{item}")),
                    ),
                    ("SK".to_string(), AttributeValue::S("#N".into())),
                ])
            });
            let wanted = KeysAndAttributes::builder()
                .set_keys(Some(keys.collect()))
                .consistent_read(true)
                .build()
                .unwrap();
            let out = client
                .batch_get_item()
                .request_items("zae-limiter-bench", wanted)
                .send()
                .await
                .expect("BatchGetItem");
            let read = out.responses().and_then(|r| r.get("zae-limiter-bench"));
            assert_eq!(
                read.map_or(0, Vec::len),
                items.len(),
                "every item read back"
            );
        }
    };
    // Each client writes its own pool of items (the batched writes need them to exist).
    let pool = 4 * batch;
    // Warm up: connections, credentials, the JIT of DynamoDB Local; the items.
    for i in 0..args.clients {
        for k in 0..pool {
            call(client.clone(), format!("{i}-{k}")).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let me = std::process::id();
    let cpu_before = cpu_time(me);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let (client, calls) = (client.clone(), calls.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until {
                    if batch == 1 {
                        call(client.clone(), format!("{i}-{}", n % pool)).await;
                    } else {
                        let items = (0..batch).map(|k| format!("{i}-{}", (n + k) % pool));
                        batch_call(client.clone(), items.collect()).await;
                    }
                    n += batch;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(me) - cpu_before;
    let calls = calls.load(Ordering::Relaxed);
    let writes = calls * batch as u64;
    println!(
        "mode=sdk clients={} trims=[{trims}] writes/call={batch}: {calls} {} calls, {writes} conditional writes, {:.0} writes/s; this process's CPU: {:.2} s = {:.1} us per call, {:.1} us per write",
        args.clients,
        if batch == 1 {
            "UpdateItem"
        } else {
            "BatchExecuteStatement"
        },
        writes as f64 / elapsed,
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
        cpu.as_secs_f64() * 1e6 / writes.max(1) as f64
    );
}

async fn throughput(args: &Args, clients: &[Client], daemons: &[Daemon]) {
    let quota = |name: &str, amount: u64| {
        let pattern = args.quota.as_deref()?;
        let calendar = zae_limiter::domain::calendar::Calendar::new(pattern, "UTC").unwrap();
        Some(
            Limit::quota(name, amount, calendar)
                .unwrap()
                .with_soft(args.soft),
        )
    };
    let limits = Arc::new(match args.mode {
        Mode::Reject => vec![quota("rpm", 1).unwrap_or_else(|| Limit::per_hour("rpm", 1).unwrap())],
        _ if args.quota.is_some() => {
            vec![quota("rps", args.capacity.unwrap_or(1_000_000_000_000)).unwrap()]
        }
        _ => {
            let limit = Limit::per_second("rps", args.refill_per_second)
                .unwrap()
                .with_soft(args.soft);
            match args.capacity {
                Some(capacity) => vec![limit.with_burst(capacity).unwrap()],
                None => vec![limit],
            }
        }
    });
    let limits = match &args.schedule {
        None => limits,
        Some(pattern) => {
            use zae_limiter::domain::schedule::{Change, Schedule};
            let schedule =
                Schedule::new(&[(pattern.clone(), Change::Scale(1_000))], "UTC").unwrap();
            Arc::new(
                limits
                    .iter()
                    .map(|l| l.clone().with_schedule(schedule.clone()).unwrap())
                    .collect(),
            )
        }
    };
    let pids: Vec<u32> = daemons.iter().map(|d| d.child.id()).collect();
    let cpu_all = || pids.iter().map(|&pid| cpu_time(pid)).sum::<Duration>();
    let scrape_all = || {
        daemons
            .iter()
            .map(|d| scrape(d.metrics))
            .collect::<Vec<_>>()
    };
    let name = limits[0].name().to_string();
    if args.cascade {
        make_children(&clients[0], args.entities, &limits).await;
    }
    // Warm up: create every bucket (and, for the reject mode, drain it).
    for e in 0..args.entities {
        let req = Acquire::new(format!("entity-{e}"), "model")
            .limits(limits.iter())
            .consume(&name, 1);
        if let Ok(lease) = clients[0].acquire(req).await {
            lease.into_id();
        }
    }
    // On stderr, so that a profiler can wait for it: the measured part starts now.
    eprintln!(
        "warm-up done; measuring for {} s (daemon pid {})",
        args.seconds,
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let before = scrape_all();
    let cpu_before = cpu_all();
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let (limits, name) = (limits.clone(), name.clone());
            let (admitted, rejected) = (admitted.clone(), rejected.clone());
            let unavailable = unavailable.clone();
            let entities = args.entities;
            let one_call = args.one_call;
            // Each client's share of `--rate`, its first call offset by its place among them.
            let pace = args.rate.map(|rate| {
                let period = Duration::from_secs_f64(args.clients as f64 / rate);
                (
                    period,
                    started + period.mul_f64(i as f64 / args.clients as f64),
                )
            });
            let mut envoy = args
                .envoy
                .then(|| RateLimitServiceClient::new(client.channel()));
            let mut health =
                (args.mode == Mode::Health).then(|| HealthClient::new(client.channel()));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = i;
                let mut pace = pace;
                while Instant::now() < until {
                    if let Some((period, next)) = pace.as_mut() {
                        tokio::time::sleep_until((*next).into()).await;
                        // Behind schedule: the next call as soon as this one is done, no burst.
                        *next = (*next + *period).max(Instant::now());
                    }
                    let entity = format!("entity-{}", n % entities);
                    n += 7;
                    let req = Acquire::new(entity, "model")
                        .limits(limits.iter())
                        .consume(&name, 1);
                    let t = Instant::now();
                    if let Some(health) = health.as_mut() {
                        let serving = health
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .unwrap()
                            .into_inner()
                            .status;
                        latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        assert_eq!(serving, ServingStatus::Serving as i32);
                        admitted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(envoy) = envoy.as_mut() {
                        let answer = envoy
                            .should_rate_limit(RateLimitRequest {
                                domain: "bench".into(),
                                descriptors: vec![RateLimitDescriptor {
                                    entries: vec![Entry {
                                        key: "api_key".into(),
                                        value: format!("entity-{}", n % entities),
                                    }],
                                    ..RateLimitDescriptor::default()
                                }],
                                hits_addend: 1,
                            })
                            .await;
                        latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        match answer.map(|a| a.into_inner().overall_code) {
                            Ok(1) => admitted.fetch_add(1, Ordering::Relaxed),
                            Ok(_) => rejected.fetch_add(1, Ordering::Relaxed),
                            Err(s) if s.code() == tonic::Code::Unavailable => {
                                unavailable.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => panic!("{e}"),
                        };
                        continue;
                    }
                    let result = if one_call {
                        client.consume(req).await.map(|()| None)
                    } else {
                        client.acquire(req).await.map(Some)
                    };
                    latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    match result {
                        Ok(lease) => {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            if let Some(lease) = lease {
                                lease.commit().await.unwrap();
                            }
                        }
                        Err(ClientError::OverLimit { .. }) => {
                            rejected.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(ClientError::Status(s)) if s.code() == tonic::Code::Unavailable => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_all() - cpu_before;
    let after = scrape_all();
    latencies.sort_unstable();
    let admitted = admitted.load(Ordering::Relaxed);
    let rejected = rejected.load(Ordering::Relaxed);
    let unavailable = unavailable.load(Ordering::Relaxed);
    let delta = |name: &str, label: &str| -> f64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| metric(a, name, label) - metric(b, name, label))
            .sum()
    };
    let units = delta("zae_limiter_store_write_units_total", "");
    let writes = delta("zae_limiter_store_calls_total", "operation=\"write\"");
    let batched = delta("zae_limiter_store_batched_writes_total", "");
    // Decisions' store calls: the health probe's (one per `health_probe_ms`) are not theirs.
    let store_calls = delta("zae_limiter_store_calls_total", "")
        - delta("zae_limiter_store_calls_total", "operation=\"probe\"");
    let commits = delta("zae_limiter_store_calls_total", "operation=\"commit\"");
    let cached = delta("zae_limiter_decisions_total", "outcome=\"rejected_cached\"");
    let conflicts = delta("zae_limiter_conflicts_total", "");
    let decisions = admitted + rejected;
    println!(
        "mode={:?} backend={:?} daemons={} daemon_threads={} clients={} connections={} entities={}{} calls/decision={} limit={}",
        args.mode,
        args.backend,
        daemons.len(),
        args.daemon_threads,
        args.clients,
        args.connections,
        args.entities,
        if args.cascade {
            " (cascading children of one parent)"
        } else {
            ""
        },
        if args.one_call || args.envoy { 1 } else { 2 },
        limits[0].describe()
    );
    if args.envoy {
        println!("through Envoy's rate limit service (ShouldRateLimit)");
    }
    if args.mode == Mode::Health {
        println!("health checks, not decisions: the transport's floor (counted as admitted)");
    }
    println!(
        "decisions/s {:.0} (admitted/s {:.0}, rejected/s {:.0}) over {elapsed:.1} s",
        decisions as f64 / elapsed,
        admitted as f64 / elapsed,
        rejected as f64 / elapsed
    );
    println!(
        "acquire latency us: p50 {} p99 {} p999 {} max {}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0)
    );
    println!(
        "store: {writes:.0} bucket writes, {commits:.0} transactions, {units:.0} write units = {:.4} per admitted decision; {store_calls:.0} calls in all; {batched:.0} single-item writes (bucket writes, usage additions) sent in batches",
        if admitted > 0 {
            units / admitted as f64
        } else {
            0.0
        }
    );
    let by_operation: Vec<String> = zae_limiter::metrics::STORE_OPERATIONS
        .iter()
        .filter(|op| **op != "probe")
        .map(|op| {
            let calls = delta(
                "zae_limiter_store_calls_total",
                &format!("operation=\"{op}\""),
            );
            (op, calls)
        })
        .filter(|(_, calls)| *calls > 0.0)
        .map(|(op, calls)| format!("{op} {calls:.0}"))
        .collect();
    println!("store calls by operation: {}", by_operation.join(", "));
    if let Some(ratio) = args.traces {
        println!(
            "traces: sampling ratio {ratio}, {} spans received so far",
            otlp::SPANS.load(Ordering::Relaxed)
        );
    }
    println!(
        "rejections served from cache: {cached:.0} of {rejected}; conflicts: {conflicts:.0}; \
         UNAVAILABLE answers: {unavailable}"
    );
    println!(
        "daemon CPU{}: {:.2} s = {:.1} us per decision; RSS {:.1} MiB",
        if pids.len() > 1 {
            format!(" (the {} daemons together)", pids.len())
        } else {
            String::new()
        },
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / decisions.max(1) as f64,
        pids.iter().map(|&pid| rss_bytes(pid)).sum::<u64>() as f64 / 1048576.0
    );
}

/// A parent with `limits` stored as its own, and `n` cascading children `entity-{i}`.
async fn make_children(client: &Client, n: usize, limits: &[Limit]) {
    use zae_limiter::proto;
    let mut admin = client.admin();
    let entity = |id: String, parent: Option<&str>| proto::CreateEntityRequest {
        entity: Some(proto::Entity {
            id,
            parent_id: parent.map(Into::into),
            cascade: parent.is_some(),
            ..Default::default()
        }),
        ..Default::default()
    };
    admin
        .create_entity(entity("parent".into(), None))
        .await
        .unwrap();
    admin
        .set_limits(proto::SetLimitsRequest {
            scope: Some(proto::LimitScope {
                entity_id: Some("parent".into()),
                resource: None,
            }),
            limits: limits.iter().map(proto::Limit::from).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..n {
        admin
            .create_entity(entity(format!("entity-{i}"), Some("parent")))
            .await
            .unwrap();
    }
}

async fn memory(args: &Args, clients: &[Client], daemon: &Daemon, pid: u32) {
    let limits = Arc::new(vec![Limit::per_minute("rpm", 100).unwrap()]);
    let base = rss_bytes(pid);
    let mib = |b: u64| b as f64 / 1048576.0;
    let per_entity = |rss: u64| rss.saturating_sub(base) as f64 / args.entities as f64;
    println!(
        "mode=memory backend={:?} daemon RSS at start {:.1} MiB",
        args.backend,
        mib(base)
    );
    for round in 0..args.rounds {
        let next = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let first = (round * args.entities) as u64;
        let tasks: Vec<_> = (0..args.clients)
            .map(|i| {
                let client = clients[i % clients.len()].clone();
                let (limits, next) = (limits.clone(), next.clone());
                let total = args.entities as u64;
                tokio::spawn(async move {
                    loop {
                        let e = next.fetch_add(1, Ordering::Relaxed);
                        if e >= total {
                            break;
                        }
                        let req = Acquire::new(format!("entity-{}", first + e), "model")
                            .limits(limits.iter())
                            .consume("rpm", 1);
                        // A store that falls behind (a cold DynamoDB Local) is waited out.
                        loop {
                            match client.acquire(req.clone()).await {
                                Ok(lease) => {
                                    lease.commit().await.unwrap();
                                    break;
                                }
                                Err(ClientError::Status(s))
                                    if s.code() == tonic::Code::Unavailable =>
                                {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                Err(e) => panic!("acquire: {e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let active = rss_bytes(pid);
        println!(
            "round {}: {} entities in {elapsed:.1} s ({:.0}/s); RSS {:.1} MiB = {:.0} bytes per entity with its actor",
            round + 1,
            args.entities,
            args.entities as f64 / elapsed,
            mib(active),
            per_entity(active)
        );
        let settled = |name: &str| {
            let until = Instant::now() + Duration::from_secs(args.settle_seconds);
            loop {
                let left = metric(&scrape(daemon.metrics), name, "");
                if left == 0.0 || Instant::now() >= until {
                    return left;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let actors = settled("zae_limiter_actors");
        let records = metric(&scrape(daemon.metrics), "zae_limiter_cached_entities", "");
        let idle = rss_bytes(pid);
        println!(
            "  idle: {actors} actors, {records} compact records; RSS {:.1} MiB = {:.0} bytes per cached entity",
            mib(idle),
            per_entity(idle)
        );
        if args.entity_cache_ms.is_some() {
            let records = settled("zae_limiter_cached_entities");
            settled("zae_limiter_usage_pending");
            let forgotten = rss_bytes(pid);
            println!(
                "  forgotten: {records} compact records left; RSS {:.1} MiB ({:+.1} MiB from the start)",
                mib(forgotten),
                mib(forgotten) - mib(base)
            );
        }
        if args.linger_seconds > 0 {
            tokio::time::sleep(Duration::from_secs(args.linger_seconds)).await;
            let later = rss_bytes(pid);
            println!(
                "  {} s later: RSS {:.1} MiB ({:+.1} MiB from the start)",
                args.linger_seconds,
                mib(later),
                mib(later) - mib(base)
            );
        }
    }
}

/// An OTLP/gRPC receiver that counts the spans it is sent (`--traces`).
mod otlp {
    use std::sync::atomic::{AtomicU64, Ordering};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    pub static SPANS: AtomicU64 = AtomicU64::new(0);

    struct Counter;

    #[tonic::async_trait]
    impl TraceService for Counter {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            SPANS.fetch_add(spans as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves on a loopback port; returns the endpoint.
    pub async fn start() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Counter))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}
