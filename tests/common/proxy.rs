//! A TCP proxy between the daemon and DynamoDB Local that injects faults, switchable while
//! traffic flows. Loopback only; it stops with the test.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards both ways.
    Pass,
    /// Forwards requests at once and DynamoDB's answers after this delay: the writes land, the
    /// daemon hears of them late.
    SlowAnswers(Duration),
    /// Forwards requests, then resets the connection instead of passing the answer on: the
    /// writes land, the daemon never hears of them.
    ResetAnswers,
    /// Accepts and reads, forwards nothing, answers nothing.
    Blackhole,
    /// As if DynamoDB were stopped: every connection, new or open, is reset on its next request.
    Down,
    /// Answers every call of this DynamoDB operation (e.g. "BatchExecuteStatement") with
    /// `AccessDeniedException`, as an IAM policy without its action would; passes the others.
    Refuse(&'static str),
    /// As `ResetAnswers` for the calls of this DynamoDB operation only (e.g.
    /// "TransactWriteItems"): they land, their answers are lost; the others pass.
    LoseAnswersOf(&'static str),
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (an `http://host:port` URL).
    pub async fn start(upstream: &str) -> Self {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .parse()
            .expect("an http://ip:port endpoint");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let shared = fault.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let fault = shared.clone();
                tokio::spawn(async move {
                    if FaultProxy::get(&fault) == Fault::Down {
                        reset(client);
                        return;
                    }
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, fault).await;
                    }
                });
            }
        });
        Self { addr, fault, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn get(fault: &Mutex<Fault>) -> Fault {
        *fault.lock().unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Closes with a TCP reset rather than a clean shutdown. (`SO_LINGER` 0 is deprecated because
/// a non-zero linger blocks on drop; with 0 the close is immediate, a reset, which is the point.)
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay(mut client: TcpStream, mut server: TcpStream, fault: Arc<Mutex<Fault>>) {
    let mut requests = vec![0u8; 64 * 1024];
    let mut answers = vec![0u8; 64 * 1024];
    // Whether the last request forwarded is one whose answer is to be lost.
    let mut losing = false;
    loop {
        tokio::select! {
            read = client.read(&mut requests) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match FaultProxy::get(&fault) {
                    Fault::Blackhole => continue,
                    Fault::Down => {
                        reset(client);
                        return;
                    }
                    Fault::Refuse(operation) if calls(&requests[..n], operation) => {
                        let _ = client.write_all(access_denied().as_bytes()).await;
                        return;
                    }
                    Fault::LoseAnswersOf(operation) if calls(&requests[..n], operation) => {
                        losing = true;
                    }
                    _ => {}
                }
                if server.write_all(&requests[..n]).await.is_err() {
                    break;
                }
            }
            read = server.read(&mut answers) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match FaultProxy::get(&fault) {
                    Fault::LoseAnswersOf(_) if losing => {
                        reset(client);
                        return;
                    }
                    Fault::Pass | Fault::Refuse(_) | Fault::LoseAnswersOf(_) => {}
                    Fault::SlowAnswers(d) => tokio::time::sleep(d).await,
                    Fault::Blackhole => continue,
                    Fault::ResetAnswers | Fault::Down => {
                        reset(client);
                        return;
                    }
                }
                if client.write_all(&answers[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Whether this piece of a request is the head of a call of `operation`.
fn calls(request: &[u8], operation: &str) -> bool {
    let text = String::from_utf8_lossy(request).to_ascii_lowercase();
    let target = format!(
        "x-amz-target: dynamodb_20120810.{}\r\n",
        operation.to_ascii_lowercase()
    );
    text.contains(&target)
}

/// DynamoDB's answer to a call the caller's IAM policy does not allow; the connection closes.
fn access_denied() -> String {
    let body = r#"{"__type":"com.amazon.coral.service#AccessDeniedException","message":"User is not authorized to perform: dynamodb:PartiQLUpdate"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
