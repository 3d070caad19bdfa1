//! A local anvil chain for tests and `scripts/dev`: the pinned binary from
//! `contracts/node_modules`, on a free loopback port, killed when the handle drops.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use alloy::signers::local::PrivateKeySigner;

/// The mnemonic anvil derives its dev accounts from by default.
pub const DEV_MNEMONIC: &str = "test test test test test test test test test test test junk";

/// The private keys of anvil's first ten dev accounts (public knowledge: never use on a real chain).
pub const DEV_KEYS: [&str; 10] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
];

#[derive(Debug, thiserror::Error)]
pub enum AnvilError {
    #[error("anvil binary not found at {0}; run scripts/setup (npm ci in contracts/) or set AGORA_ANVIL")]
    NotFound(PathBuf),
    #[error("cannot start anvil: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("anvil exited before it listened; its output:\n{0}")]
    Exited(String),
    #[error("anvil did not listen within {0:?}")]
    Timeout(Duration),
}

/// Builder for an [`Anvil`] process.
#[derive(Clone, Debug, Default)]
pub struct AnvilBuilder {
    binary: Option<PathBuf>,
    port: u16,
    args: Vec<String>,
}

impl AnvilBuilder {
    /// The binary to run, instead of the pinned one.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// A fixed port; 0 (the default) lets the kernel pick a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// One more argument for anvil, e.g. `--block-time`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts anvil on 127.0.0.1 and waits until it listens.
    pub fn spawn(self) -> Result<Anvil, AnvilError> {
        let binary = match self.binary {
            Some(path) => path,
            None => anvil_binary()?,
        };
        let mut command = Command::new(&binary);
        command
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and only makes one
        // async-signal-safe system call (prctl).
        unsafe {
            command.pre_exec(|| {
                // If the process that started anvil dies without stopping it (SIGKILL), anvil
                // gets SIGTERM (and writes its --state file) instead of living on.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn()?;

        // Read anvil's output on a thread for as long as it runs, so its pipe never fills.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel::<Result<u16, String>>();
        std::thread::spawn(move || {
            let mut waiting = Some(tx);
            let mut seen = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(tx) = waiting.as_ref() else { continue };
                match listening_port(&line) {
                    Some(port) => {
                        let _ = tx.send(Ok(port));
                        waiting = None;
                    }
                    None => {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                }
            }
            if let Some(tx) = waiting {
                let _ = tx.send(Err(seen));
            }
        });

        let timeout = Duration::from_secs(30);
        let port = match rx.recv_timeout(timeout) {
            Ok(Ok(port)) => port,
            Ok(Err(output)) => {
                let _ = child.kill();
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                let _ = child.wait();
                return Err(AnvilError::Exited(format!("{output}{stderr}")));
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(AnvilError::Timeout(timeout));
            }
        };
        Ok(Anvil { child: Some(child), port })
    }
}

fn listening_port(line: &str) -> Option<u16> {
    line.trim().strip_prefix("Listening on ")?.rsplit(':').next()?.parse().ok()
}

/// A running anvil; killed (and reaped) on drop.
#[derive(Debug)]
pub struct Anvil {
    child: Option<Child>,
    port: u16,
}

impl Anvil {
    pub fn builder() -> AnvilBuilder {
        AnvilBuilder::default()
    }

    /// Anvil on a free port with default settings.
    pub fn spawn() -> Result<Self, AnvilError> {
        Self::builder().spawn()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_endpoint(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn chain_id(&self) -> u64 {
        31_337
    }

    /// Dev account `i` (0..10), funded with 10 000 ETH at genesis.
    pub fn signer(&self, i: usize) -> PrivateKeySigner {
        DEV_KEYS[i].parse().expect("anvil's dev keys are valid")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops anvil with SIGTERM, so that a `--state` file is written, waiting up to `grace`
    /// before killing it.
    pub fn terminate(mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = child.wait();
            let _ = tx.send(());
        });
        if rx.recv_timeout(grace).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = waiter.join();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The pinned anvil: `AGORA_ANVIL` if set, else `contracts/node_modules/.bin/anvil` found by
/// walking up from this crate (tests) or from the current directory (binaries).
pub fn anvil_binary() -> Result<PathBuf, AnvilError> {
    if let Some(path) = std::env::var_os("AGORA_ANVIL") {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(AnvilError::NotFound(path)) };
    }
    let relative = Path::new("contracts/node_modules/.bin/anvil");
    let starts = [Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))), std::env::current_dir().ok()];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            let candidate = dir.join(relative);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(AnvilError::NotFound(relative.to_path_buf()))
}
