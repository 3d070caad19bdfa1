//! Test models: the real MiniLM-L6 weights, synthetic LLM-shaped tensors, a safetensors writer,
//! and the attacks of the robustness suite.

use std::path::{Path, PathBuf};

use agora_watermark::{FloatKind, MasterKey, ModelFile, ModelKey, format::TensorEntry};
use half::{bf16, f16};

/// A tensor in memory: float tensors as f32 values with the dtype to write them in, others as
/// raw bytes.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

#[derive(Clone)]
pub enum Data {
    Float(FloatKind, Vec<f32>),
    Raw(String, Vec<u8>),
}

#[derive(Clone)]
pub struct Model {
    pub tensors: Vec<Tensor>,
}

impl Model {
    pub fn load(path: &Path) -> Self {
        let file = ModelFile::open(path).unwrap();
        let tensors = file
            .tensors
            .iter()
            .map(|t: &TensorEntry| {
                let bytes = file.bytes(t);
                let data = match t.dtype {
                    safetensors::Dtype::BF16 => Data::Float(FloatKind::Bf16, decode(FloatKind::Bf16, bytes)),
                    safetensors::Dtype::F16 => Data::Float(FloatKind::F16, decode(FloatKind::F16, bytes)),
                    safetensors::Dtype::F32 => Data::Float(FloatKind::F32, decode(FloatKind::F32, bytes)),
                    other => Data::Raw(format!("{other:?}"), bytes.to_vec()),
                };
                Tensor { name: t.name.clone(), shape: t.shape.clone(), data }
            })
            .collect();
        Self { tensors }
    }

    /// Every float tensor stored as `kind` (values rounded to it).
    pub fn cast(mut self, kind: FloatKind) -> Self {
        for t in &mut self.tensors {
            if let Data::Float(k, values) = &mut t.data {
                *k = kind;
                for v in values.iter_mut() {
                    *v = round_to(kind, *v);
                }
            }
        }
        self
    }

    pub fn save(&self, path: &Path) {
        let mut header = serde_json::Map::new();
        let mut body = Vec::new();
        for t in &self.tensors {
            let start = body.len();
            let dtype = match &t.data {
                Data::Float(kind, values) => {
                    for &v in values {
                        match kind {
                            FloatKind::Bf16 => {
                                body.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
                            }
                            FloatKind::F16 => {
                                body.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
                            }
                            FloatKind::F32 => body.extend_from_slice(&v.to_le_bytes()),
                        }
                    }
                    kind.tag().to_owned()
                }
                Data::Raw(dtype, bytes) => {
                    body.extend_from_slice(bytes);
                    dtype.clone()
                }
            };
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [start, body.len()]}),
            );
        }
        let mut header = serde_json::to_vec(&header).unwrap();
        while !header.len().is_multiple_of(8) {
            header.push(b' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        std::fs::write(path, out).unwrap();
    }

    /// Applies `attack` to every eligible tensor's values (rows × cols, row-major).
    pub fn attack(mut self, mut attack: impl FnMut(&str, usize, usize, &mut Vec<f32>)) -> Self {
        for t in &mut self.tensors {
            let eligible = agora_watermark::format::eligible(&t.name, dtype_of(&t.data), &t.shape).is_some();
            if let (true, Data::Float(kind, values)) = (eligible, &mut t.data) {
                attack(&t.name, t.shape[0], t.shape[1], values);
                for v in values.iter_mut() {
                    *v = round_to(*kind, *v);
                }
            }
        }
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }
}

fn dtype_of(data: &Data) -> safetensors::Dtype {
    match data {
        Data::Float(FloatKind::Bf16, _) => safetensors::Dtype::BF16,
        Data::Float(FloatKind::F16, _) => safetensors::Dtype::F16,
        Data::Float(FloatKind::F32, _) => safetensors::Dtype::F32,
        Data::Raw(..) => safetensors::Dtype::U8,
    }
}

pub fn values(tensor: &Tensor) -> &Vec<f32> {
    match &tensor.data {
        Data::Float(_, values) => values,
        Data::Raw(..) => panic!("{} is not a float tensor", tensor.name),
    }
}

pub fn values_mut(tensor: &mut Tensor) -> &mut Vec<f32> {
    match &mut tensor.data {
        Data::Float(_, values) => values,
        Data::Raw(..) => panic!("{} is not a float tensor", tensor.name),
    }
}

fn decode(kind: FloatKind, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / kind.size()];
    agora_watermark::detect::read_values(kind, bytes, 0, &mut out);
    out
}

pub fn round_to(kind: FloatKind, v: f32) -> f32 {
    match kind {
        FloatKind::Bf16 => bf16::from_f32(v).to_f32(),
        FloatKind::F16 => f16::from_f32(v).to_f32(),
        FloatKind::F32 => v,
    }
}

/// The unpacked MiniLM-L6 model directory (fetched by scripts/setup), or `None` with a loud
/// message. Under CI its absence fails the test.
pub fn minilm_dir() -> Option<PathBuf> {
    let base = std::env::var_os("AGORA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/agora/models"));
    let dir = base.join("all-MiniLM-L6-v2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    let message = format!(
        "\n\n*** SKIPPED: the MiniLM-L6 test weights are not at {}; run scripts/setup to fetch them ***\n",
        dir.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("{message}");
    None
}

/// A deterministic generator (xorshift64*), for weights, noise and key ids.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Student-t with `nu` degrees of freedom (heavy-tailed, like trained LLM weights).
    pub fn student_t(&mut self, nu: u32) -> f64 {
        let z = self.gaussian();
        let chi: f64 = (0..nu).map(|_| self.gaussian().powi(2)).sum();
        z / (chi / f64::from(nu)).sqrt()
    }
}

/// An LLM-shaped model: `layers` blocks of attention and FFN matrices with Student-t weights of
/// standard deviation 0.02, stored as bf16, plus a norm vector that is never marked.
pub fn synthetic(hidden: usize, layers: usize, seed: u64) -> Model {
    let mut rng = Rng::new(seed);
    let nu = 5;
    let scale = 0.02 / (f64::from(nu) / f64::from(nu - 2)).sqrt();
    let mut tensors = Vec::new();
    for layer in 0..layers {
        for (name, rows, cols) in [
            ("attn.q_proj.weight", hidden, hidden),
            ("attn.o_proj.weight", hidden, hidden),
            ("mlp.up_proj.weight", 4 * hidden, hidden),
            ("mlp.down_proj.weight", hidden, 4 * hidden),
        ] {
            let values = (0..rows * cols)
                .map(|_| round_to(FloatKind::Bf16, (rng.student_t(nu) * scale) as f32))
                .collect();
            tensors.push(Tensor {
                name: format!("model.layers.{layer}.{name}"),
                shape: vec![rows, cols],
                data: Data::Float(FloatKind::Bf16, values),
            });
        }
        tensors.push(Tensor {
            name: format!("model.layers.{layer}.input_layernorm.weight"),
            shape: vec![hidden],
            data: Data::Float(FloatKind::Bf16, vec![1.0; hidden]),
        });
    }
    Model { tensors }
}

pub fn model_key(original: &Path, master: u8) -> ModelKey {
    let hash = blake3::hash(&std::fs::read(original).unwrap());
    MasterKey::from_bytes([master; 32]).model_key(hash.as_bytes())
}

pub fn std_dev(values: &[f32]) -> f32 {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    (values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n).sqrt() as f32
}

// ---- attacks -------------------------------------------------------------------------------

/// Symmetric int quantisation with one scale per group of `group` consecutive values.
pub fn quantise_int(values: &mut [f32], bits: u32, group: usize) {
    let levels = ((1 << (bits - 1)) - 1) as f32;
    for chunk in values.chunks_mut(group) {
        let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            continue;
        }
        let scale = max / levels;
        for v in chunk.iter_mut() {
            *v = (*v / scale).round().clamp(-levels, levels) * scale;
        }
    }
}

/// fp8 E4M3 with one scale per tensor (max maps to 448).
pub fn quantise_fp8(values: &mut [f32]) {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 448.0;
    for v in values.iter_mut() {
        let x = *v / scale;
        let exponent = x.abs().log2().floor().max(-6.0);
        let step = 2f32.powf(exponent - 3.0);
        *v = ((x / step).round() * step).clamp(-448.0, 448.0) * scale;
    }
}

/// candle's GGUF quantisation round trip (Q8_0, Q4_0: blocks of 32).
pub fn quantise_gguf(
    values: &mut Vec<f32>,
    rows: usize,
    cols: usize,
    dtype: candle_core::quantized::GgmlDType,
) {
    let device = candle_core::Device::Cpu;
    let tensor = candle_core::Tensor::from_vec(std::mem::take(values), (rows, cols), &device).unwrap();
    let quantised = candle_core::quantized::QTensor::quantize(&tensor, dtype).unwrap();
    *values = quantised.dequantize(&device).unwrap().flatten_all().unwrap().to_vec1().unwrap();
}

pub fn add_noise(values: &mut [f32], sigma: f32, rng: &mut Rng) {
    for v in values.iter_mut() {
        *v += sigma * rng.gaussian() as f32;
    }
}

/// A rank-`rank` update `U·Vᵀ` scaled to `ratio · ‖W‖`.
pub fn low_rank_update(values: &mut [f32], rows: usize, cols: usize, rank: usize, ratio: f32, rng: &mut Rng) {
    let u: Vec<f32> = (0..rows * rank).map(|_| rng.gaussian() as f32).collect();
    let v: Vec<f32> = (0..cols * rank).map(|_| rng.gaussian() as f32).collect();
    let mut delta = vec![0f32; rows * cols];
    for i in 0..rows {
        for k in 0..rank {
            let a = u[i * rank + k];
            for j in 0..cols {
                delta[i * cols + j] += a * v[j * rank + k];
            }
        }
    }
    let norm = |m: &[f32]| m.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let factor = (f64::from(ratio) * norm(values) / norm(&delta)) as f32;
    for (w, d) in values.iter_mut().zip(&delta) {
        *w += factor * d;
    }
}

pub fn prune_magnitude(values: &mut [f32], share: f64) {
    let mut magnitudes: Vec<f32> = values.iter().map(|v| v.abs()).collect();
    let k = ((values.len() as f64 * share) as usize).min(values.len() - 1);
    let (_, cut, _) = magnitudes.select_nth_unstable_by(k, f32::total_cmp);
    let cut = *cut;
    values.iter_mut().filter(|v| v.abs() < cut).for_each(|v| *v = 0.0);
}

/// A random permutation of 0..n.
pub fn shuffle(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}

pub fn prune_random(values: &mut [f32], share: f64, rng: &mut Rng) {
    values.iter_mut().filter(|_| rng.uniform() < share).for_each(|v| *v = 0.0);
}
