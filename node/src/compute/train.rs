//! The built-in executor: real gradient descent on candle for the MLP family the node serves
//! (`serve::MlpConfig`, tensors `layers.{i}.weight` `[out, in]` and `layers.{i}.bias`).
//!
//! Training starts from the base version's weights. The loss follows the model's output: mean
//! squared error for `identity`, cross-entropy over class indices for `softmax`, binary
//! cross-entropy for `sigmoid`. Batches are drawn in an order shuffled per epoch from `seed`,
//! so a run is reproducible. Datasets:
//! - CSV: one row per sample, numbers only (a first row that is not numbers is a header); the
//!   first `inputs` columns are the features, the rest the targets (one class index for
//!   `softmax`, `outputs` values otherwise);
//! - safetensors: `x` `[n, inputs]` and `y` `[n, outputs]` (or `[n]` class indices).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use crate::serve::MlpConfig;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("bad inputs: {0}")]
    Input(String),
    #[error("training failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("stopped: {0}")]
    Stopped(String),
}

fn input(message: impl Into<String>) -> TrainError {
    TrainError::Input(message.into())
}

/// Hyperparameters (JSON in jobs; every field optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    pub epochs: u32,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// `adamw` or `sgd`.
    pub optimizer: String,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 32,
            learning_rate: 0.01,
            optimizer: "adamw".into(),
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

impl Hyperparameters {
    pub fn check(&self) -> Result<(), TrainError> {
        if self.epochs == 0 || self.epochs > 100_000 {
            return Err(input("epochs must be between 1 and 100000"));
        }
        if self.batch_size == 0 {
            return Err(input("batch_size must be at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(input("learning_rate must be a positive number"));
        }
        if !["adamw", "sgd"].contains(&self.optimizer.as_str()) {
            return Err(input(format!("optimizer {:?} is not adamw or sgd", self.optimizer)));
        }
        Ok(())
    }
}

/// Samples as the trainer takes them: features row-major, targets row-major (or class indices).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub rows: usize,
    pub x: Vec<f32>,
    pub y: Targets,
}

#[derive(Clone, Debug)]
pub enum Targets {
    Values(Vec<f32>),
    Classes(Vec<u32>),
}

/// How the output is scored, from `config.json`'s `output`.
fn classes(config: &MlpConfig) -> bool {
    config.output == "softmax"
}

impl Dataset {
    /// Reads a CSV dataset for `config`.
    pub fn from_csv(text: &str, config: &MlpConfig) -> Result<Self, TrainError> {
        let (inputs, outputs) = io(config)?;
        let want = inputs + if classes(config) { 1 } else { outputs };
        let mut x = Vec::new();
        let mut values = Vec::new();
        let mut rows = 0;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parsed: Result<Vec<f32>, _> = line.split(',').map(|f| f.trim().parse::<f32>()).collect();
            let fields = match parsed {
                Ok(f) => f,
                Err(_) if rows == 0 && n == 0 => continue, // a header
                Err(e) => return Err(input(format!("dataset line {}: {e}", n + 1))),
            };
            if fields.len() != want {
                return Err(input(format!(
                    "dataset line {} has {} columns; the model takes {inputs} features and {} target column(s)",
                    n + 1,
                    fields.len(),
                    want - inputs
                )));
            }
            if fields.iter().any(|f| !f.is_finite()) {
                return Err(input(format!("dataset line {}: numbers must be finite", n + 1)));
            }
            x.extend_from_slice(&fields[..inputs]);
            values.extend_from_slice(&fields[inputs..]);
            rows += 1;
        }
        Self::new(rows, x, values, config)
    }

    /// Reads a safetensors dataset (`x`, `y`) for `config`.
    pub fn from_safetensors(bytes: &[u8], config: &MlpConfig) -> Result<Self, TrainError> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| input(format!("the dataset is not safetensors: {e}")))?;
        let get = |name: &str| {
            tensors.get(name).ok_or_else(|| input(format!("the dataset has no tensor `{name}`")))
        };
        let (x, y) = (get("x")?, get("y")?);
        let rows = x.dims().first().copied().unwrap_or(0);
        if y.dims().first().copied() != Some(rows) {
            return Err(input(format!("`x` has {rows} rows but `y` has shape {:?}", y.dims())));
        }
        let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::new(rows, x, y, config)
    }

    fn new(rows: usize, x: Vec<f32>, y: Vec<f32>, config: &MlpConfig) -> Result<Self, TrainError> {
        let (inputs, outputs) = io(config)?;
        if rows == 0 {
            return Err(input("the dataset has no rows"));
        }
        if x.len() != rows * inputs {
            return Err(input(format!("the features are not {rows} rows of {inputs} numbers")));
        }
        if x.iter().chain(&y).any(|v| !v.is_finite()) {
            return Err(input("the dataset holds a number that is not finite"));
        }
        let y = if classes(config) {
            if y.len() != rows {
                return Err(input(format!(
                    "a softmax model takes one class index per row; got {} values",
                    y.len()
                )));
            }
            let bad = y.iter().find(|c| c.fract() != 0.0 || **c < 0.0 || **c >= outputs as f32);
            if let Some(c) = bad {
                return Err(input(format!("class {c} is not an index below {outputs}")));
            }
            Targets::Classes(y.iter().map(|c| *c as u32).collect())
        } else {
            if y.len() != rows * outputs {
                return Err(input(format!("the targets are not {rows} rows of {outputs} numbers")));
            }
            Targets::Values(y)
        };
        Ok(Self { rows, x, y })
    }
}

fn io(config: &MlpConfig) -> Result<(usize, usize), TrainError> {
    match (config.layers.first(), config.layers.last()) {
        (Some(i), Some(o)) if config.layers.len() >= 2 && *i > 0 && *o > 0 => Ok((*i, *o)),
        _ => Err(input("config.json: `layers` needs an input and an output size")),
    }
}

/// One optimiser step on a loss.
type Step = Box<dyn FnMut(&Tensor) -> candle_core::Result<()>>;

/// A network being trained: one variable per weight and bias.
pub struct Trainer {
    config: MlpConfig,
    layers: Vec<(Var, Var)>,
}

/// What a run did.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainReport {
    /// Mean loss of each epoch.
    pub losses: Vec<f64>,
    pub samples: u64,
    pub seconds: f64,
}

impl Trainer {
    /// Starts from the tensors of the base version's safetensors file.
    pub fn new(config: MlpConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self, TrainError> {
        io(&config)?;
        if !["relu", "tanh", "gelu", "sigmoid"].contains(&config.activation.as_str()) {
            return Err(input(format!("config.json: unknown activation {:?}", config.activation)));
        }
        let mut layers = Vec::new();
        for (i, pair) in config.layers.windows(2).enumerate() {
            let mut take = |name: String, shape: &[usize]| -> Result<Var, TrainError> {
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| input(format!("the weights have no tensor {name}")))?;
                if t.dims() != shape {
                    return Err(input(format!(
                        "{name} has shape {:?}, config.json says {shape:?}",
                        t.dims()
                    )));
                }
                Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
            };
            let w = take(format!("layers.{i}.weight"), &[pair[1], pair[0]])?;
            let b = take(format!("layers.{i}.bias"), &[pair[1]])?;
            layers.push((w, b));
        }
        Ok(Self { config, layers })
    }

    /// The network's outputs before the output function (logits for softmax and sigmoid).
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut x = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = x.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            if i < last {
                x = match self.config.activation.as_str() {
                    "relu" => x.relu()?,
                    "tanh" => x.tanh()?,
                    "gelu" => x.gelu_erf()?,
                    _ => candle_nn::ops::sigmoid(&x)?,
                };
            }
        }
        Ok(x)
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.output.as_str() {
            "softmax" => candle_nn::loss::cross_entropy(logits, targets),
            "sigmoid" => candle_nn::loss::binary_cross_entropy_with_logit(logits, targets),
            _ => candle_nn::loss::mse(logits, targets),
        }
    }

    /// Trains for `hp.epochs`, calling `progress(epoch, mean loss)` after each; a `false`
    /// answer stops the run.
    pub fn train(
        &mut self,
        data: &Dataset,
        hp: &Hyperparameters,
        mut progress: impl FnMut(u32, f64) -> bool,
    ) -> Result<TrainReport, TrainError> {
        hp.check()?;
        let started = std::time::Instant::now();
        let (inputs, outputs) = io(&self.config)?;
        let vars: Vec<Var> = self.layers.iter().flat_map(|(w, b)| [w.clone(), b.clone()]).collect();
        let mut optimizer: Step = match hp.optimizer.as_str() {
            "sgd" => {
                let mut sgd = candle_nn::SGD::new(vars, hp.learning_rate)?;
                Box::new(move |loss| sgd.backward_step(loss))
            }
            _ => {
                let params =
                    ParamsAdamW { lr: hp.learning_rate, weight_decay: hp.weight_decay, ..Default::default() };
                let mut adamw = candle_nn::AdamW::new(vars, params)?;
                Box::new(move |loss| adamw.backward_step(loss))
            }
        };
        let mut order: Vec<usize> = (0..data.rows).collect();
        let mut rng = hp.seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut losses = Vec::new();
        let mut xb = Vec::with_capacity(hp.batch_size * inputs);
        for epoch in 1..=hp.epochs {
            shuffle(&mut order, &mut rng);
            let (mut total, mut seen) = (0.0f64, 0usize);
            for batch in order.chunks(hp.batch_size) {
                xb.clear();
                for &r in batch {
                    xb.extend_from_slice(&data.x[r * inputs..(r + 1) * inputs]);
                }
                let x = Tensor::from_slice(&xb, (batch.len(), inputs), &Device::Cpu)?;
                let y = match &data.y {
                    Targets::Classes(c) => {
                        let picked: Vec<u32> = batch.iter().map(|&r| c[r]).collect();
                        Tensor::from_vec(picked, batch.len(), &Device::Cpu)?
                    }
                    Targets::Values(v) => {
                        let picked: Vec<f32> = batch
                            .iter()
                            .flat_map(|&r| v[r * outputs..(r + 1) * outputs].iter().copied())
                            .collect();
                        Tensor::from_vec(picked, (batch.len(), outputs), &Device::Cpu)?
                    }
                };
                let loss = self.loss(&self.logits(&x)?, &y)?;
                optimizer(&loss)?;
                total += f64::from(loss.to_scalar::<f32>()?) * batch.len() as f64;
                seen += batch.len();
            }
            let mean = total / seen as f64;
            if !mean.is_finite() {
                return Err(TrainError::Stopped(format!(
                    "the loss diverged in epoch {epoch}; lower the learning rate"
                )));
            }
            losses.push(mean);
            if !progress(epoch, mean) {
                return Err(TrainError::Stopped(format!("cancelled after epoch {epoch}")));
            }
        }
        Ok(TrainReport {
            losses,
            samples: data.rows as u64 * u64::from(hp.epochs),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The trained weights, named as the base version's.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            out.insert(format!("layers.{i}.weight"), w.as_tensor().clone());
            out.insert(format!("layers.{i}.bias"), b.as_tensor().clone());
        }
        out
    }

    /// Writes the trained weights as safetensors.
    pub fn save(&self, path: &std::path::Path) -> Result<(), TrainError> {
        Ok(candle_core::safetensors::save(&self.tensors(), path)?)
    }
}

/// Fisher–Yates with splitmix64: the same seed gives the same order on every machine.
fn shuffle(order: &mut [usize], state: &mut u64) {
    for i in (1..order.len()).rev() {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        order.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Weights `weight(layer, k)` and zero biases for `config`.
    fn tensors(config: &MlpConfig, weight: impl Fn(usize, usize) -> f32) -> HashMap<String, Tensor> {
        let mut tensors = HashMap::new();
        for (i, pair) in config.layers.windows(2).enumerate() {
            let w: Vec<f32> = (0..pair[0] * pair[1]).map(|k| weight(i, k)).collect();
            let w = Tensor::from_vec(w, (pair[1], pair[0]), &Device::Cpu).unwrap();
            tensors.insert(format!("layers.{i}.weight"), w);
            tensors.insert(
                format!("layers.{i}.bias"),
                Tensor::zeros(pair[1], DType::F32, &Device::Cpu).unwrap(),
            );
        }
        tensors
    }

    /// A regression MLP 2 → 8 → 1 with small deterministic weights.
    pub fn regression() -> (MlpConfig, HashMap<String, Tensor>) {
        let config =
            MlpConfig { layers: vec![2, 8, 1], activation: "tanh".into(), output: "identity".into() };
        let tensors = tensors(&config, |i, k| ((k * 7 + i * 3) % 11) as f32 / 20.0 - 0.25);
        (config, tensors)
    }

    /// y = 0.5·a − 0.3·b + 0.1, as CSV with a header.
    pub fn csv(rows: usize) -> String {
        let mut text = String::from("a,b,y\n");
        for r in 0..rows {
            let a = (r % 17) as f32 / 17.0 - 0.5;
            let b = (r % 13) as f32 / 13.0 - 0.5;
            text.push_str(&format!("{a},{b},{}\n", 0.5 * a - 0.3 * b + 0.1));
        }
        text
    }

    #[test]
    fn the_loss_decreases_and_runs_are_reproducible() {
        let (config, tensors) = regression();
        let data = Dataset::from_csv(&csv(256), &config).unwrap();
        assert_eq!(data.rows, 256);
        let hp = Hyperparameters { epochs: 30, ..Default::default() };
        let mut trainer = Trainer::new(config.clone(), tensors.clone()).unwrap();
        let mut seen = Vec::new();
        let report = trainer
            .train(&data, &hp, |e, l| {
                seen.push((e, l));
                true
            })
            .unwrap();
        assert_eq!(seen.len(), 30);
        assert!(report.losses[29] < report.losses[0] / 10.0, "{:?}", report.losses);
        let again = Trainer::new(config, tensors).unwrap().train(&data, &hp, |_, _| true).unwrap();
        assert_eq!(report.losses, again.losses);
    }

    #[test]
    fn classification_with_cross_entropy() {
        let config = MlpConfig { layers: vec![2, 8, 2], activation: "relu".into(), output: "softmax".into() };
        let tensors = tensors(&config, |i, k| ((k * 5 + i) % 7) as f32 / 10.0 - 0.3);
        let text: String = (0..200)
            .map(|r| {
                let a = (r % 20) as f32 / 10.0 - 1.0;
                format!("{a},{},{}\n", -a, u8::from(a > 0.0))
            })
            .collect();
        let data = Dataset::from_csv(&text, &config).unwrap();
        let report = Trainer::new(config, tensors)
            .unwrap()
            .train(&data, &Hyperparameters::default(), |_, _| true)
            .unwrap();
        assert!(report.losses.last().unwrap() < &(report.losses[0] * 0.5), "{:?}", report.losses);
    }

    #[test]
    fn bad_inputs_are_named() {
        let (config, tensors) = regression();
        let err = Dataset::from_csv("1,2\n", &config).unwrap_err();
        assert!(err.to_string().contains("columns"), "{err}");
        let err = Dataset::from_csv("a,b,y\n1,x,3\n", &config).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(Dataset::from_csv("", &config).is_err());
        let mut missing = tensors.clone();
        missing.remove("layers.1.bias");
        assert!(Trainer::new(config.clone(), missing).is_err());
        let data = Dataset::from_csv(&csv(8), &config).unwrap();
        let hp = Hyperparameters { optimizer: "lbfgs".into(), ..Default::default() };
        assert!(
            Trainer::new(config.clone(), tensors.clone()).unwrap().train(&data, &hp, |_, _| true).is_err()
        );
        let stopped =
            Trainer::new(config, tensors).unwrap().train(&data, &Hyperparameters::default(), |e, _| e < 2);
        assert!(matches!(stopped, Err(TrainError::Stopped(_))));
    }
}
