//! BERT-style sentence encoders (MiniLM and its kin): texts in, one embedding per text out.
//!
//! A version is an encoder when its `config.json` is a Hugging Face BERT config (`model_type`
//! `"bert"`, or a `Bert…` architecture) and a `tokenizer.json` sits next to the weights. The
//! embedding is what sentence-transformers computes for these models: the last hidden states
//! averaged over the text's tokens (padding excluded), scaled to unit length. Texts that arrive
//! together run as one padded batch with an attention mask, so a text's embedding does not
//! depend on its neighbours.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{ServeError, model_error};

/// Texts per forward pass: a pass holds every layer's attention scores for all of its texts
/// (texts × heads × tokens² floats), so a large call runs in passes of this many.
pub const PASS: usize = 32;

pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Bytes of the weights as loaded (f32), for the cache's bound.
    pub bytes: u64,
}

/// Whether a `config.json` describes a BERT-style encoder.
pub fn is_bert(config: &serde_json::Value) -> bool {
    config["model_type"].as_str() == Some("bert")
        || config["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n.as_str().is_some_and(|n| n.starts_with("Bert"))))
}

impl Encoder {
    /// Builds the encoder from its config, its tokenizer and the tensors of its weights.
    pub fn new(
        config: &[u8],
        tokenizer: &[u8],
        tensors: HashMap<String, Tensor>,
    ) -> Result<Self, ServeError> {
        let config: Config = serde_json::from_slice(config)
            .map_err(|e| ServeError::Model(format!("config.json is not a BERT config: {e}")))?;
        let mut tokenizer = Tokenizer::from_bytes(tokenizer)
            .map_err(|e| ServeError::Model(format!("tokenizer.json cannot be read: {e}")))?;
        // Pad a batch to its longest text (not to a fixed length), with the tokenizer's own pad
        // token; cut texts at the model's longest sequence unless the tokenizer says shorter.
        let padding = match tokenizer.get_padding() {
            Some(p) => PaddingParams { strategy: PaddingStrategy::BatchLongest, ..p.clone() },
            None => PaddingParams { pad_id: config.pad_token_id as u32, ..PaddingParams::default() },
        };
        tokenizer.with_padding(Some(padding));
        if tokenizer.get_truncation().is_none_or(|t| t.max_length > config.max_position_embeddings) {
            let truncation = TruncationParams {
                max_length: config.max_position_embeddings,
                ..TruncationParams::default()
            };
            tokenizer
                .with_truncation(Some(truncation))
                .map_err(|e| ServeError::Model(format!("tokenizer.json: {e}")))?;
        }
        let bytes = tensors.values().map(|t| (t.elem_count() * 4) as u64).sum();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = BertModel::load(vb, &config)
            .map_err(|e| ServeError::Model(format!("the weights do not fit config.json: {e}")))?;
        Ok(Self { model, tokenizer, bytes })
    }

    /// Texts in, unit-length mean-pooled embeddings out, [`PASS`] texts to a forward pass.
    pub fn forward(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ServeError> {
        let mut embeddings = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(PASS) {
            embeddings.extend(self.pass(chunk)?);
        }
        Ok(embeddings)
    }

    /// One forward pass over a non-empty chunk of texts.
    fn pass(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ServeError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ServeError::Invalid(format!("the texts cannot be tokenised: {e}")))?;
        let (rows, length) = (encodings.len(), encodings[0].get_ids().len());
        let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| f(e).iter().copied()).collect()
        };
        let shape = (rows, length);
        let ids = Tensor::from_vec(flat(tokenizers::Encoding::get_ids), shape, &Device::Cpu)
            .map_err(model_error)?;
        let types = Tensor::from_vec(flat(tokenizers::Encoding::get_type_ids), shape, &Device::Cpu)
            .map_err(model_error)?;
        let mask = Tensor::from_vec(flat(tokenizers::Encoding::get_attention_mask), shape, &Device::Cpu)
            .map_err(model_error)?;
        let pooled = (|| {
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&weights)?.sum(1)?;
            let mean = summed.broadcast_div(&weights.sum(1)?)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        })()
        .map_err(model_error)?;
        Ok(pooled)
    }
}
