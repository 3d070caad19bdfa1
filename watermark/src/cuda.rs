//! The CUDA path (feature `cuda`): keystreams, marking of device-resident tensors, and tracing
//! of many licenses at once, on candle's CUDA device.
//!
//! The kernels (`cuda/kernels.cu`) are compiled by NVRTC when first used, for the device's own
//! architecture, with fused multiply-adds and flush-to-zero off: every result is bit-identical
//! to the CPU path's (the same ChaCha8 streams, the same steps, the same integer sums), which
//! the determinism tests check.
//! - [`Mark`] is a candle custom op: `tensor.apply_op1_no_bwd(&mark)` marks a tensor on the CPU
//!   or on a CUDA device with the same bits as [`crate::embed`] gives its file.
//! - [`trace`] is [`crate::trace`] with the features and the per-license sums computed on the
//!   device: each tile of features is read once per 32 licenses, and each license's keystream
//!   is made where it is used, never stored.

use std::{
    fmt::Display,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
    cuda_backend::{
        CudaDType, DeviceId, WrapErr,
        cudarc::{
            driver::{
                CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, sys,
                sys::CUdevice_attribute,
            },
            nvrtc,
        },
    },
};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::{
    LicenseKey, ModelKey, Options, WatermarkError,
    balance::Acceptance,
    detect::{self, Evidence, Pair, Scan, Suspect, Totals},
    format::{FloatKind, ModelFile},
    mark::{TensorKeys, mark_range},
    stream::TensorStream,
};

const SOURCE: &str = include_str!("cuda/kernels.cu");
const MODULE: &str = "agora_watermark";
/// Elements per block of the mark kernel (one 64-element coin block per thread).
const MARK_SPAN: usize = 256 * 64;
/// 512-weight blocks per tile of the count kernel, and licenses per thread block.
const TILE_BLOCKS: usize = 32;
const LICENSES_PER_BLOCK: usize = 32;
/// Words of features per 32 weights.
const FIELDS: usize = 17;
/// The 32-bit ChaCha block counter covers 2^32 blocks of 64 coin bytes.
const MAX_ELEMENTS: usize = 1 << 37;

fn device_error(error: impl Display) -> WatermarkError {
    WatermarkError::Device(error.to_string())
}

fn op_error(message: impl Display) -> candle_core::Error {
    candle_core::Error::Cuda(message.to_string().into())
}

/// CUDA device `ordinal`, or why there is none.
pub fn device(ordinal: usize) -> Result<Device, WatermarkError> {
    let device = Device::new_cuda(ordinal).map_err(device_error)?;
    keep_freed_memory(device.as_cuda_device().map_err(device_error)?);
    Ok(device)
}

/// Keeps memory freed on the device in its pool rather than handing it back at every
/// synchronisation: a marked copy's output is then allocated without mapping its pages again
/// (measured: 2 ms of a 1 GiB copy's 2.8 ms were that).
fn keep_freed_memory(dev: &CudaDevice) {
    let stream = dev.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return;
    }
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a valid device handle with pointers to live locals; a
    // failure leaves the pool's default behaviour, which is only slower.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) == sys::CUresult::CUDA_SUCCESS {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

fn kind_code(kind: FloatKind) -> i32 {
    match kind {
        FloatKind::Bf16 => 0,
        FloatKind::F16 => 1,
        FloatKind::F32 => 2,
    }
}

fn kind_of(dtype: DType) -> candle_core::Result<FloatKind> {
    match dtype {
        DType::BF16 => Ok(FloatKind::Bf16),
        DType::F16 => Ok(FloatKind::F16),
        DType::F32 => Ok(FloatKind::F32),
        other => {
            Err(candle_core::Error::Msg(format!("a watermark marks bf16, f16 or f32 weights, not {other:?}")))
        }
    }
}

/// A kernel of the watermark module, compiled (once per process) for the device's architecture.
fn function(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    let ptx = PTX.get_or_init(|| {
        let (major, minor) = dev.cuda_stream().context().compute_capability().map_err(|e| e.to_string())?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let options = nvrtc::CompileOptions {
            ftz: Some(false),
            prec_div: Some(true),
            prec_sqrt: Some(true),
            fmad: Some(false),
            arch: Some(arch),
            ..Default::default()
        };
        nvrtc::compile_ptx_with_opts(SOURCE, options).map(|ptx| ptx.to_src()).map_err(|e| e.to_string())
    });
    let ptx = ptx.as_ref().map_err(|e| op_error(format!("compiling the watermark kernels: {e}")))?;
    Ok(dev.get_or_load_custom_func(name, MODULE, ptx)?.into_cuda_function())
}

fn multiprocessors(dev: &CudaDevice) -> u32 {
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_or(132, |n| n.max(1) as u32)
}

/// Whether a tensor that starts at element `start` of its allocation (which CUDA aligns to 256
/// bytes) can be read 16 bytes at a time.
fn aligned(kind: FloatKind, start: usize) -> i32 {
    i32::from((start * kind.size()).is_multiple_of(16))
}

fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Words `first / 64 ..` of `stream` made on the device, as [`TensorStream::fill`] makes them
/// (`first` a multiple of 512, `words` a multiple of 8).
pub fn keystream(
    device: &Device,
    stream: &TensorStream,
    first: usize,
    words: usize,
) -> Result<Vec<u64>, WatermarkError> {
    let dev = device.as_cuda_device().map_err(device_error)?;
    if !first.is_multiple_of(512) || !words.is_multiple_of(8) {
        return Err(device_error(
            "a keystream starts at a multiple of 512 elements and spans whole 512-bit blocks",
        ));
    }
    let run = || -> candle_core::Result<Vec<u64>> {
        let blocks = words / 8;
        let key = dev.clone_htod(&stream.key_words())?;
        let out = dev.alloc_zeros::<u32>(16 * blocks)?;
        let func = function(dev, "keystream")?;
        let (first_block, count) = ((first / 512) as u32, blocks as u32);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&key).arg(&first_block).arg(&count).arg(&out);
        // SAFETY: the kernel writes 16 words per block below `count` into `out`, which holds them.
        unsafe { launch.launch(grid(blocks.div_ceil(128), 128)) }.w()?;
        let halves = dev.clone_dtoh(&out)?;
        Ok(halves.chunks_exact(2).map(|w| u64::from(w[0]) | u64::from(w[1]) << 32).collect())
    };
    run().map_err(device_error)
}

/// Counts the codes of a device-resident tensor (as the acceptance table needs them).
pub fn histogram(tensor: &Tensor) -> Result<Vec<u32>, WatermarkError> {
    let kind = kind_of(tensor.dtype()).map_err(device_error)?;
    let (storage, layout) = tensor.storage_and_layout();
    let candle_core::Storage::Cuda(storage) = &*storage else {
        return Err(device_error("the tensor is not on a CUDA device"));
    };
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| device_error("the tensor is not contiguous"))?;
    let counts = match kind {
        FloatKind::Bf16 => device_counts::<bf16>(storage, kind, start, end),
        FloatKind::F16 => device_counts::<f16>(storage, kind, start, end),
        FloatKind::F32 => device_counts::<f32>(storage, kind, start, end),
    };
    counts.and_then(|counts| storage.device.clone_dtoh(&counts)).map_err(device_error)
}

/// The acceptance table (at `2 * code + up`) from a histogram on the device, made there.
fn device_table(
    dev: &CudaDevice,
    kind: FloatKind,
    histogram: &CudaSlice<u32>,
) -> candle_core::Result<CudaSlice<u32>> {
    let codes = Acceptance::codes(kind);
    // SAFETY: the kernel writes every one of the 2 * codes entries.
    let table = unsafe { dev.alloc::<u32>(2 * codes)? };
    let func = function(dev, "acceptance")?;
    let (code, count, pseudo) = (kind_code(kind), codes as u32, crate::balance::PSEUDO_COUNT as u32);
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(histogram).arg(&code).arg(&count).arg(&pseudo).arg(&table);
    // SAFETY: the kernel reads `codes` counts and writes 2 * codes entries, as allocated.
    unsafe { launch.launch(grid((2 * codes).div_ceil(256), 256)) }.w()?;
    Ok(table)
}

/// The bf16 acceptance table packed with each code's step: one word per code.
fn device_pack_bf16(dev: &CudaDevice, table: &CudaSlice<u32>) -> candle_core::Result<CudaSlice<u32>> {
    const CODES: usize = 1 << 16;
    // SAFETY: the kernel writes every one of the 65,536 words.
    let packed = unsafe { dev.alloc::<u32>(CODES)? };
    let func = function(dev, "pack_bf16")?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(table).arg(&packed);
    // SAFETY: the kernel reads the 2 × 65,536 entries of a bf16 table and writes 65,536 words.
    unsafe { launch.launch(grid(CODES / 256, 256)) }.w()?;
    Ok(packed)
}

/// The code histogram of a device tensor, left on the device.
fn device_counts<T: CudaDType + DeviceRepr>(
    storage: &CudaStorage,
    kind: FloatKind,
    start: usize,
    end: usize,
) -> candle_core::Result<CudaSlice<u32>> {
    let dev = &storage.device;
    let src = storage.as_cuda_slice::<T>()?.slice(start..end);
    let counts = dev.alloc_zeros::<u32>(Acceptance::codes(kind))?;
    let func = function(dev, "histogram")?;
    let (code, n, aligned) = (kind_code(kind), (end - start) as u64, aligned(kind, start));
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&src).arg(&code).arg(&n).arg(&aligned).arg(&counts);
    // eight elements per thread and step; six blocks of 32 KiB of counters fit a multiprocessor
    let blocks = (end - start).div_ceil(8 * 256).min(6 * multiprocessors(dev) as usize);
    // SAFETY: the kernel reads n elements of `src` and counts into `counts`, which has a slot per code.
    unsafe { launch.launch(grid(blocks, 256)) }.w()?;
    Ok(counts)
}

/// Marks one tensor as [`crate::embed`] marks the tensor of that name and shape in a file: a
/// candle op, run on the CPU or on a CUDA device with the same result. After it ran,
/// [`Mark::changed`] holds the weights it changed in half A and half B.
///
/// The acceptance table comes from the original tensor's code histogram; a server marking many
/// licenses of one resident tensor counts it once ([`histogram`]) and passes it with
/// [`Mark::with_histogram`], so each copy costs one pass.
pub struct Mark {
    kind: FloatKind,
    keys: TensorKeys,
    acceptance: Option<Acceptance>,
    /// The kernel's table from `acceptance`, on the device it was made for.
    device_table: Mutex<Option<(DeviceId, Arc<CudaSlice<u32>>)>>,
    /// The last run's counts of changed weights: on the host, or on the device until read.
    changed: Mutex<Changed>,
}

enum Changed {
    Host((u64, u64)),
    Device(CudaDevice, CudaSlice<u64>),
}

/// A mark's four keys as the kernel takes them, by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct MarkKeys([u32; 32]);

// SAFETY: a plain array of u32, the kernel's `struct MarkKeys` exactly.
unsafe impl DeviceRepr for MarkKeys {}

impl Mark {
    pub fn new(
        model: &ModelKey,
        license: Option<&LicenseKey>,
        name: &str,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Self, WatermarkError> {
        let kind = kind_of(dtype).map_err(device_error)?;
        Ok(Self {
            kind,
            keys: TensorKeys::named(model, license, name, kind, shape),
            acceptance: None,
            device_table: Mutex::new(None),
            changed: Mutex::new(Changed::Host((0, 0))),
        })
    }

    /// Uses the code histogram of the tensor this mark will be applied to (see [`histogram`]);
    /// applying it to another tensor gives a mark that is not the file's.
    pub fn with_histogram(mut self, histogram: &[u32]) -> Result<Self, WatermarkError> {
        if histogram.len() != Acceptance::codes(self.kind) {
            return Err(device_error(format!(
                "a {:?} histogram has {} codes, not {}",
                self.kind,
                Acceptance::codes(self.kind),
                histogram.len()
            )));
        }
        self.acceptance = Some(Acceptance::from_histogram(self.kind, histogram));
        self.device_table = Mutex::new(None);
        Ok(self)
    }

    /// Weights changed by the last run, in half A and half B (after a device run, read from
    /// the device, which waits for it).
    pub fn changed(&self) -> Result<(u64, u64), WatermarkError> {
        let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        let counts = match &*changed {
            Changed::Host(counts) => *counts,
            Changed::Device(dev, counts) => {
                let counts = dev.clone_dtoh(counts).map_err(device_error)?;
                (counts[0], counts[1])
            }
        };
        *changed = Changed::Host(counts);
        Ok(counts)
    }

    fn record(&self, changed: Changed) {
        *self.changed.lock().unwrap_or_else(|e| e.into_inner()) = changed;
    }

    /// The table as the mark kernel reads it: for bf16, one word per code with all the step
    /// needs (kernels.cu, pack_bf16).
    fn for_kernel(&self, dev: &CudaDevice, table: CudaSlice<u32>) -> candle_core::Result<CudaSlice<u32>> {
        match self.kind {
            FloatKind::Bf16 => device_pack_bf16(dev, &table),
            FloatKind::F16 | FloatKind::F32 => Ok(table),
        }
    }

    fn mark_on_device<T: CudaDType + DeviceRepr>(
        &self,
        storage: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaSlice<T>> {
        let dev = &storage.device;
        let n = end - start;
        if n > MAX_ELEMENTS {
            return Err(op_error(format!("a tensor of {n} elements is beyond the keystream's 2^37")));
        }
        let table = match &self.acceptance {
            // a known histogram: the table is the same on every run, made once per device
            Some(acceptance) => {
                let mut cached = self.device_table.lock().unwrap_or_else(|e| e.into_inner());
                match &*cached {
                    Some((id, table)) if *id == dev.id() => table.clone(),
                    _ => {
                        let table = Arc::new(self.for_kernel(dev, dev.clone_htod(acceptance.table())?)?);
                        *cached = Some((dev.id(), table.clone()));
                        table
                    }
                }
            }
            None => Arc::new(self.for_kernel(
                dev,
                device_table(dev, self.kind, &device_counts::<T>(storage, self.kind, start, end)?)?,
            )?),
        };
        let license = self.keys.license.as_ref().map_or([0; 8], TensorStream::key_words);
        let mut keys = MarkKeys([0; 32]);
        let streams = [
            self.keys.partition.key_words(),
            self.keys.owner.key_words(),
            license,
            self.keys.coin.key_words(),
        ];
        for (slot, key) in keys.0.chunks_exact_mut(8).zip(streams) {
            slot.copy_from_slice(&key);
        }
        let changed = dev.alloc_zeros::<u64>(2)?;
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: every element is written by the kernel below before the slice is read.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = function(dev, "mark")?;
        let (code, count, with_license) =
            (kind_code(self.kind), n as u64, i32::from(self.keys.license.is_some()));
        let aligned = aligned(self.kind, start);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&src)
            .arg(&out)
            .arg(&code)
            .arg(&count)
            .arg(&aligned)
            .arg(&keys)
            .arg(&with_license)
            .arg(table.as_ref())
            .arg(&changed);
        // SAFETY: the kernel reads and writes elements below n of `src` and `out`, reads 32 key
        // words and the table at codes of its kind (all inside it), and adds into the two counters.
        unsafe { launch.launch(grid(n.div_ceil(MARK_SPAN), 256)) }.w()?;
        self.record(Changed::Device(dev.clone(), changed));
        Ok(out)
    }
}

impl CustomOp1 for Mark {
    fn name(&self) -> &'static str {
        "agora-watermark-mark"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("mark needs a contiguous tensor".into()))?;
        let src: Vec<u8> = match (storage, self.kind) {
            (CpuStorage::BF16(v), FloatKind::Bf16) => {
                v[start..end].iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
            }
            (CpuStorage::F16(v), FloatKind::F16) => {
                v[start..end].iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
            }
            (CpuStorage::F32(v), FloatKind::F32) => {
                v[start..end].iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "the tensor's dtype is not the one the mark was made for".into(),
                ));
            }
        };
        let mut out = vec![0u8; src.len()];
        let counted;
        let acceptance = match &self.acceptance {
            Some(acceptance) => acceptance,
            None => {
                counted = Acceptance::of(self.kind, &src);
                &counted
            }
        };
        self.record(Changed::Host(mark_range(self.kind, &self.keys, acceptance, 0, &src, &mut out)));
        let two = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        let storage = match self.kind {
            FloatKind::Bf16 => {
                CpuStorage::BF16(out.chunks_exact(2).map(|b| bf16::from_bits(two(b))).collect())
            }
            FloatKind::F16 => CpuStorage::F16(out.chunks_exact(2).map(|b| f16::from_bits(two(b))).collect()),
            FloatKind::F32 => CpuStorage::F32(
                out.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            ),
        };
        Ok((storage, layout.shape().clone()))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| op_error("mark needs a contiguous tensor"))?;
        let dev = storage.device.clone();
        let storage = match self.kind {
            FloatKind::Bf16 => {
                CudaStorage::wrap_cuda_slice(self.mark_on_device::<bf16>(storage, start, end)?, dev)
            }
            FloatKind::F16 => {
                CudaStorage::wrap_cuda_slice(self.mark_on_device::<f16>(storage, start, end)?, dev)
            }
            FloatKind::F32 => {
                CudaStorage::wrap_cuda_slice(self.mark_on_device::<f32>(storage, start, end)?, dev)
            }
        };
        Ok((storage, layout.shape().clone()))
    }
}

/// [`crate::trace`] on a CUDA device: the same evidence, from the same integer sums.
pub fn trace(
    device: &Device,
    suspect: &Path,
    original: &Path,
    model: &ModelKey,
    license_ids: &[u128],
    options: &Options,
) -> Result<Vec<Evidence>, WatermarkError> {
    let dev = device.as_cuda_device().map_err(device_error)?;
    detect::trace_with(suspect, original, model, license_ids, options, |original, pairs, keys| {
        scan(dev, original, pairs, model, keys).map_err(device_error)
    })
}

fn scan(
    dev: &CudaDevice,
    original: &ModelFile,
    pairs: &[Pair<'_>],
    model: &ModelKey,
    keys: &[[u8; 32]],
) -> candle_core::Result<Scan> {
    let present: Vec<(&Pair<'_>, &Suspect<'_>)> =
        pairs.iter().filter_map(|p| p.suspect.as_ref().map(|s| (p, s))).collect();
    // features: per tensor, whole 512-weight blocks of 16 records
    let mut record_base = Vec::with_capacity(present.len());
    let mut records_total = 0usize;
    for (pair, _) in &present {
        record_base.push(records_total);
        records_total += pair.original.elements().div_ceil(512) * 16;
    }
    if records_total >= 1 << 32 {
        return Err(op_error("more weights than one trace on the device handles (2^37)"));
    }
    let mut records = dev.alloc_zeros::<u32>((records_total * FIELDS).max(1))?;
    let totals = dev.alloc_zeros::<u64>(9)?;
    let partition = model.partition();
    let sms = multiprocessors(dev) as usize;
    let features = function(dev, "features")?;
    for ((pair, suspect), &base) in present.iter().zip(&record_base) {
        let n = pair.original.elements();
        let original_bytes = dev.clone_htod(original.bytes(pair.original))?;
        let (suspect_bytes, suspect_kind) = match suspect {
            Suspect::Raw { kind, bytes } => (dev.clone_htod(*bytes)?, *kind),
            Suspect::Aligned(values) => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (dev.clone_htod(&bytes)?, FloatKind::F32)
            }
        };
        let key = TensorStream::new(partition.expose(), &pair.original.name, pair.kind, &pair.original.shape);
        let key = dev.clone_htod(&key.key_words())?;
        let mut view = records.slice_mut(base * FIELDS..);
        // the fingerprints are in half B
        let (original_kind, suspect_kind, count, half_a) =
            (kind_code(pair.kind), kind_code(suspect_kind), n as u64, 0i32);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&features);
        launch
            .arg(&original_bytes)
            .arg(&original_kind)
            .arg(&suspect_bytes)
            .arg(&suspect_kind)
            .arg(&count)
            .arg(&half_a)
            .arg(&key)
            .arg(&mut view)
            .arg(&totals);
        // SAFETY: the kernel reads n elements of both tensors (each uploaded whole) and writes the
        // records of ceil(n / 512) blocks from `base` on, which the allocation holds.
        unsafe { launch.launch(grid(n.div_ceil(512).min(8 * sms), 512)) }.w()?;
    }
    // tiles of up to 32 blocks, never across tensors
    let mut tiles: Vec<u32> = Vec::new();
    for (t, ((pair, _), &base)) in present.iter().zip(&record_base).enumerate() {
        let blocks = pair.original.elements().div_ceil(512);
        for first in (0..blocks).step_by(TILE_BLOCKS) {
            tiles.extend([
                t as u32,
                first as u32,
                (blocks - first).min(TILE_BLOCKS) as u32,
                (base + first * 16) as u32,
            ]);
        }
    }
    let tile_count = tiles.len() / 4;
    let tiles = dev.clone_htod(&tiles)?;
    // one ChaCha key per (license, tensor)
    let license_keys: Vec<u32> = keys
        .par_iter()
        .flat_map_iter(|key| {
            present.iter().flat_map(move |(p, _)| {
                TensorStream::new(key, &p.original.name, p.kind, &p.original.shape).key_words()
            })
        })
        .collect();
    let tensors = present.len().max(1);
    let license_keys = dev.clone_htod(&license_keys)?;
    let mut counts = dev.alloc_zeros::<u64>(4 * keys.len())?;
    let count = function(dev, "count")?;
    // at most 65,535 blocks in y: licenses in batches
    let batch = LICENSES_PER_BLOCK * 65_535;
    for first in (0..keys.len()).step_by(batch) {
        let licenses = (keys.len() - first).min(batch);
        let rows = licenses.div_ceil(LICENSES_PER_BLOCK);
        let columns = tile_count.min((8 * sms).div_ceil(rows)).max(1);
        let key_view = license_keys.slice(first * tensors * 8..);
        let mut count_view = counts.slice_mut(4 * first..);
        let (tile_count, tensor_count, license_count) = (tile_count as u32, tensors as u32, licenses as u32);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&count);
        launch
            .arg(&records)
            .arg(&tiles)
            .arg(&tile_count)
            .arg(&key_view)
            .arg(&tensor_count)
            .arg(&license_count)
            .arg(&mut count_view);
        let config = LaunchConfig {
            grid_dim: (columns as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads the records of each tile (inside the allocation), 8 key words
        // per (license, tensor) of this batch, and adds into 4 counters per license of it.
        unsafe { launch.launch(config) }.w()?;
    }
    let sums = dev.clone_dtoh(&totals)?;
    let matches = dev.clone_dtoh(&counts)?.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    let totals = Totals {
        n: sums[0],
        erased: sums[1],
        corr_abs: sums[2],
        corr_sq: sums[3],
        kept_n: sums[0] - sums[1],
        kept_abs: sums[5],
        kept_sq: sums[6],
        ulp: sums[7],
        sign: sums[8],
    };
    Ok(Scan { totals, matches })
}
