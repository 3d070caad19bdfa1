//! Owner watermarks and per-license fingerprints in model weights.
//!
//! The scheme needs no training, so a node can mark a copy per buyer at download time:
//! - every eligible weight (float 2-D matrices of at least 65,536 elements, not norms, biases or
//!   position tables; zeros, subnormals and non-finite values excluded) moves by exactly one
//!   bf16 ULP, up or down as a keyed bit stream says ([`mark`]);
//! - a keyed partition puts each weight in half A, which carries the owner mark (the same in
//!   every copy), or half B, which carries the fingerprint of one license;
//! - detection against the original correlates the residual with the key's directions and
//!   reports statistics with a p-value valid for any weight distribution ([`detect`]);
//!   permuted or rescaled rows are aligned first ([`align`]).
//!
//! Keys come from the node's master key by `blake3::derive_key` with versioned contexts
//! ([`keys`]); each tensor's bits come from a seekable ChaCha8 stream ([`stream`]), so any
//! chunk can be produced on its own, by any thread, with the same result. Files are read
//! memory-mapped and written in one streaming pass whose memory does not grow with the file.

/// Defines `$name` to run `$body` compiled for AVX2, FMA and POPCNT when the CPU has them, and
/// compiled for the baseline otherwise. Both give identical results: the sums are integers or
/// f32/f64 in a fixed order, and Rust never contracts a multiply and an add into an FMA.
macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $body:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2,lzcnt,sse4.1")]
                fn fast($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("popcnt")
                    && std::arch::is_x86_feature_detected!("bmi1")
                    && std::arch::is_x86_feature_detected!("bmi2")
                    && std::arch::is_x86_feature_detected!("lzcnt")
                {
                    // SAFETY: the CPU has every feature `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod align;
mod balance;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod detect;
pub mod format;
mod keys;
pub mod lowrank;
pub mod mark;
pub mod stream;

use std::path::{Path, PathBuf};

pub use detect::{ALPHA, Evidence, Mode, Statistic, Subject, threshold, trace, verify_owner};
pub use format::{FloatKind, MIN_TENSOR_ELEMENTS, ModelFile};
pub use keys::{CoinKey, KeyError, LicenseKey, MasterKey, ModelKey, OwnerKey, PartitionKey, commitment};
pub use mark::{EmbedReport, MIN_ELIGIBLE_WEIGHTS, embed, embed_into, embed_tensor};

#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is not a usable safetensors file: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error(
        "{} has {eligible} eligible weights; a mark needs at least {needed} (float matrices of at \
         least 65,536 elements that are not norms, biases or position tables) to survive quantisation",
        path.display()
    )]
    TooFewWeights { path: PathBuf, eligible: usize, needed: usize },
    #[error("CUDA: {0}")]
    Device(String),
    #[error("could not start {threads} worker threads: {reason}")]
    Threads { threads: usize, reason: String },
}

impl WatermarkError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
}

/// Progress callback: bytes done, bytes in all.
pub type Progress = Box<dyn Fn(u64, u64) + Send + Sync>;

/// Waits until the original's bytes below the given offset are in place; for an original that
/// is still being written (a file given its full length up front, filled in order). An error
/// stops the embedding with it.
pub type SourceReady = Box<dyn Fn(u64) -> std::io::Result<()> + Send + Sync>;

/// How to run: worker threads (0 = rayon's global pool, one thread per core, or the pool the
/// caller already runs in), an optional progress callback, and, for an original still being
/// written, what to wait on before reading its tensors (its header must be in place at start).
#[derive(Default)]
pub struct Options {
    pub threads: usize,
    pub progress: Option<Progress>,
    pub source_ready: Option<SourceReady>,
}

impl Options {
    pub fn threads(threads: usize) -> Self {
        Self { threads, ..Self::default() }
    }

    /// Runs `work` on the requested threads.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, WatermarkError> {
        if self.threads == 0 {
            return Ok(work());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .build()
            .map_err(|e| WatermarkError::Threads { threads: self.threads, reason: e.to_string() })?;
        Ok(pool.install(work))
    }
}
