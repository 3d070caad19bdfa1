//! Helpers for end-to-end tests: the `agora` binary as a child process (killed on drop), the
//! URL it listens on, and waiting for conditions with a deadline instead of sleeping.

pub mod market;
pub mod mlp;
pub mod proxy;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

/// The `agora` binary of this workspace, built once if it is not there yet.
pub fn agora_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("AGORA_BIN") {
            return PathBuf::from(path);
        }
        // target/debug/deps/<test> → target/debug/agora
        let exe = std::env::current_exe().expect("the test knows its own path");
        let dir = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps");
        let bin = dir.join("agora");
        // The same selection as scripts/test's `cargo build --bin agora` at the root: building
        // agora-node alone unifies dependency features differently and relinks the binary.
        let mut cargo = Command::new(env!("CARGO"));
        // Cargo sets the package's variables (CARGO_PKG_*, CARGO_MANIFEST_DIR, ...) for the
        // test process; build scripts that watch them (ring's) would see them changed and
        // rebuild everything above them.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let package_var =
                ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_"]
                    .iter()
                    .any(|p| key.starts_with(p));
            if package_var || key == "OUT_DIR" || key == "CARGO_TARGET_TMPDIR" {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo
            .args(["build", "--quiet", "--workspace", "--bin", "agora"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the agora binary failed");
        assert!(bin.is_file(), "agora binary not found at {}", bin.display());
        bin
    })
    .clone()
}

/// Runs `agora ARGS` to completion and returns (status, stdout, stderr).
pub fn agora(args: &[&str], envs: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let output = Command::new(agora_bin())
        .args(args)
        // Nodes listen for peers on a free loopback port unless a test says otherwise.
        .env("AGORA_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env_remove("AGORA_CONFIG")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("agora runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// A long-running `agora` process; killed on drop.
pub struct AgoraProcess {
    child: Option<Child>,
    output: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
}

impl AgoraProcess {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(agora_bin())
            .args(args)
            .env("AGORA_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0")
            // a config file of the developer's own must not leak in; a test may give its own
            .env_remove("AGORA_CONFIG")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agora starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        for (stream, tx) in
            [(Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)), (Box::new(stderr), None)]
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                    if let Some(tx) = &tx {
                        let _ = tx.send(line);
                    }
                }
            });
        }
        Self { child: Some(child), output, lines }
    }

    /// Waits for a stdout line containing `needle` and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => {
                    panic!("no line with {needle:?} within {timeout:?}; output so far:\n{}", self.output())
                }
            }
        }
    }

    /// The base URL the node printed (`agora node: listening on http://…`).
    pub fn wait_for_url(&self) -> String {
        let line = self.wait_for_line("listening on http://", Duration::from_secs(60));
        line.rsplit(' ').next().expect("the line ends with the URL").to_owned()
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        let child = self.child.as_ref().expect("the process has not been waited for");
        nix::unistd::Pid::from_raw(child.id() as i32)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status (None: it did not exit and
    /// was killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).ok()?;
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to exit; kills it if it does not.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let pid = self.pid();
        let mut child = self.child.take()?;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = match rx.recv_timeout(timeout) {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                None
            }
        };
        let _ = waiter.join();
        status
    }
}

impl Drop for AgoraProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// GET `url` and return the status and the body parsed as JSON (Null when it is not JSON).
pub async fn get_json(url: &str) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    Some((status, body))
}

/// An `agora node` process for a market, with its own data dir.
pub struct Node {
    pub process: AgoraProcess,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Node {
    /// Starts a node against `rpc_url`; `extra` env entries override the defaults.
    pub fn start(rpc_url: &str, deployment: &str, data_dir: &Path, extra: &[(&str, &str)]) -> Self {
        let data = data_dir.display().to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("AGORA_RPC_URL", rpc_url),
            ("AGORA_DEPLOYMENT", deployment),
            ("AGORA_DATA_DIR", &data),
            ("AGORA_HTTP_ADDR", "127.0.0.1:0"),
            ("AGORA_POLL_MS", "50"),
            ("AGORA_CONFIRMATIONS", "0"),
            ("AGORA_LOG", "info"),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v));
        }
        let process = AgoraProcess::spawn(&["node"], &env);
        let url = process.wait_for_url();
        Self { process, url, data_dir: data_dir.to_path_buf() }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        get_json(&format!("{}{path}", self.url)).await.expect("the node answers")
    }

    pub async fn status(&self) -> serde_json::Value {
        self.get("/api/v1/chain/status").await.1
    }

    /// Waits until the index is at block `number` with hash `hash`.
    pub async fn wait_indexed(&self, number: u64, hash: alloy::primitives::B256) -> serde_json::Value {
        let want_hash = hash.to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            poll.tick().await;
            let status = self.status().await;
            if status["indexed_block"].as_u64() == Some(number)
                && status["indexed_hash"].as_str() == Some(&want_hash)
            {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the index did not reach block {number} {want_hash} within 60 s; last status {status}\nnode output:\n{}",
                    self.process.output()
                );
            }
        }
    }
}

/// `agora index rebuild` from scratch to `to_block`: (block, hash, state_root) as JSON.
pub fn rebuild(rpc_url: &str, deployment: &str, to_block: u64) -> serde_json::Value {
    let to = to_block.to_string();
    let (status, stdout, stderr) = agora(
        &["index", "rebuild", "--rpc-url", rpc_url, "--deployment", deployment, "--to-block", &to],
        &[("AGORA_CONFIRMATIONS", "0")],
    );
    assert!(status.success(), "rebuild failed: {stderr}");
    serde_json::from_str(&stdout).expect("rebuild prints JSON")
}

/// The real all-MiniLM-L6-v2 (weights, config.json, tokenizer.json) that `scripts/setup`
/// fetches; None outside CI when it is missing (CI must have it).
pub fn minilm_dir() -> Option<PathBuf> {
    let base = std::env::var_os("AGORA_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/agora/models")
    });
    let dir = base.join("all-MiniLM-L6-v2");
    let present =
        ["model.safetensors", "config.json", "tokenizer.json"].iter().all(|f| dir.join(f).is_file());
    assert!(
        present || std::env::var_os("CI").is_none(),
        "MiniLM is not at {}: run scripts/setup",
        dir.display()
    );
    if !present {
        eprintln!("*** SKIPPED: MiniLM is not at {}; run scripts/setup to fetch it ***", dir.display());
    }
    present.then_some(dir)
}

/// A small HTTP/1.1 server on loopback: `respond(head, body)` gives each request's status and
/// JSON answer (keep-alive connections, `content-length` bodies). Aborting the task closes its
/// connections too.
pub async fn http_server(
    respond: impl Fn(&str, &[u8]) -> (u16, String) + Send + Sync + 'static,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let respond = std::sync::Arc::new(respond);
    let task = tokio::spawn(async move {
        // Connections belong to the server task: aborting it closes them too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let respond = respond.clone();
            connections.spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let (status, answer) = respond(&head, &buf[end + 4..end + 4 + length]);
                    buf.drain(..end + 4 + length);
                    let reason = if status < 400 { "OK" } else { "Error" };
                    let response = format!(
                        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{address}"), task)
}
