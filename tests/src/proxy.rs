//! A JSON-RPC proxy on loopback that misbehaves on purpose: HTTP errors, JSON-RPC errors,
//! dropped connections, hung requests, a lagging replica's view of the head, and logs
//! delivered twice. The indexer must end with the same state root as one fed the truth.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the proxy does to requests; rates are probabilities per request.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    pub http_error_rate: f64,
    pub rpc_error_rate: f64,
    pub drop_rate: f64,
    pub hang_rate: f64,
    /// How long a hung request hangs.
    pub hang: Duration,
    /// Pretend the head is this many blocks lower, and that newer blocks do not exist.
    pub lag_blocks: u64,
    /// Answer eth_getLogs with every log twice.
    pub duplicate_logs: bool,
    /// Refuse JSON-RPC batches as some public RPC services do (one error for the whole batch).
    pub refuse_batches: bool,
}

#[derive(Default)]
struct Shared {
    faults: Faults,
    rng: u64,
    requests: u64,
    faulted: u64,
}

impl Shared {
    fn roll(&mut self) -> f64 {
        // xorshift64*: deterministic for a seed
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Action {
    Forward,
    HttpError,
    RpcError,
    Drop,
    Hang(Duration),
    RefuseBatch,
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: String, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared { rng: seed.max(1), ..Shared::default() }));
        let client = reqwest::Client::new();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, upstream.clone(), client.clone(), shared.clone()));
                }
            }
        });
        Self { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, faults: Faults) {
        self.shared.lock().unwrap().faults = faults;
    }

    /// (requests seen, requests faulted)
    pub fn counts(&self) -> (u64, u64) {
        let s = self.shared.lock().unwrap();
        (s.requests, s.faulted)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let total = end + 4 + length;
            while buffer.len() < total {
                let mut chunk = [0u8; 16 * 1024];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = buffer[end + 4..total].to_vec();
            buffer.drain(..total);
            return Some(body);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await
}

async fn serve(mut stream: TcpStream, upstream: String, client: reqwest::Client, shared: Arc<Mutex<Shared>>) {
    let mut buffer = Vec::new();
    while let Some(body) = read_request(&mut stream, &mut buffer).await {
        let (action, faults) = {
            let mut s = shared.lock().unwrap();
            s.requests += 1;
            let f = s.faults.clone();
            let action = if f.refuse_batches && body.first() == Some(&b'[') {
                Action::RefuseBatch
            } else if s.roll() < f.drop_rate {
                Action::Drop
            } else if s.roll() < f.http_error_rate {
                Action::HttpError
            } else if s.roll() < f.rpc_error_rate {
                Action::RpcError
            } else if s.roll() < f.hang_rate {
                Action::Hang(f.hang)
            } else {
                Action::Forward
            };
            if !matches!(action, Action::Forward) {
                s.faulted += 1;
            }
            (action, f)
        };
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let result = match action {
            Action::Drop => return,
            Action::HttpError => {
                respond(&mut stream, "500 Internal Server Error", b"upstream exploded").await
            }
            Action::RpcError => {
                let error = |id: Value| json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32005, "message": "query returned more than 10000 results"}});
                let answer = match request.as_array() {
                    // a batch: every call in it fails
                    Some(calls) => Value::Array(calls.iter().map(|c| error(c["id"].clone())).collect()),
                    None => error(id),
                };
                respond(&mut stream, "200 OK", answer.to_string().as_bytes()).await
            }
            Action::RefuseBatch => {
                let answer = json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "batch requests are not supported"}});
                respond(&mut stream, "200 OK", answer.to_string().as_bytes()).await
            }
            Action::Hang(duration) => {
                tokio::time::sleep(duration).await;
                return;
            }
            Action::Forward => match forward_packet(&client, &upstream, request, &faults).await {
                Some(answer) => respond(&mut stream, "200 OK", answer.to_string().as_bytes()).await,
                None => respond(&mut stream, "502 Bad Gateway", b"no upstream").await,
            },
        };
        if result.is_err() {
            return;
        }
    }
}

async fn call(client: &reqwest::Client, upstream: &str, request: &Value) -> Option<Value> {
    client.post(upstream).json(request).send().await.ok()?.json().await.ok()
}

/// A single call, or a JSON-RPC batch forwarded call by call so that every fault applies to
/// each call in it as it would alone.
async fn forward_packet(
    client: &reqwest::Client,
    upstream: &str,
    request: Value,
    faults: &Faults,
) -> Option<Value> {
    match request {
        Value::Array(calls) => {
            let answers = futures::future::join_all(
                calls.into_iter().map(|call| forward(client, upstream, call, faults)),
            )
            .await;
            answers.into_iter().collect::<Option<Vec<_>>>().map(Value::Array)
        }
        single => forward(client, upstream, single, faults).await,
    }
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    mut request: Value,
    faults: &Faults,
) -> Option<Value> {
    let method = request.get("method").and_then(Value::as_str).unwrap_or_default().to_owned();
    if faults.lag_blocks > 0 && (method == "eth_blockNumber" || method == "eth_getBlockByNumber") {
        let head = call(
            client,
            upstream,
            &json!({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber", "params": []}),
        )
        .await?;
        let head = u64::from_str_radix(head["result"].as_str()?.trim_start_matches("0x"), 16).ok()?;
        let visible = head.saturating_sub(faults.lag_blocks);
        if method == "eth_blockNumber" {
            return Some(json!({"jsonrpc": "2.0", "id": request["id"], "result": format!("0x{visible:x}")}));
        }
        let asked = request["params"][0].as_str().unwrap_or("latest").to_owned();
        match asked.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()) {
            Some(n) if n > visible => {
                return Some(json!({"jsonrpc": "2.0", "id": request["id"], "result": null}));
            }
            Some(_) => {}
            None => request["params"][0] = json!(format!("0x{visible:x}")),
        }
    }
    let mut answer = call(client, upstream, &request).await?;
    if faults.duplicate_logs
        && method == "eth_getLogs"
        && let Some(logs) = answer.get_mut("result").and_then(Value::as_array_mut)
    {
        let copy = logs.clone();
        logs.extend(copy);
    }
    Some(answer)
}
