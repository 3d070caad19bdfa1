//! A small MLP fixture for the deployment tests and the serve benchmark: a safetensors file with
//! deterministic weights, its `config.json`, and its forward pass written out by hand.

use serde_json::{Value, json};

/// Layer sizes: 4 inputs, 8 hidden (ReLU), 3 outputs.
pub const LAYERS: [usize; 3] = [4, 8, 3];

pub fn weight(layer: usize, k: usize) -> f32 {
    ((k * 7 + layer * 3) % 13) as f32 / 10.0 - 0.6
}

pub fn bias(k: usize) -> f32 {
    k as f32 / 20.0
}

/// `layers.{i}.weight` [out, in] and `layers.{i}.bias` [out], f32.
pub fn safetensors() -> Vec<u8> {
    safetensors_shifted(0.0)
}

/// The same network with `shift` added to every bias: another version of the model.
pub fn safetensors_shifted(shift: f32) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (i, pair) in LAYERS.windows(2).enumerate() {
        let (n_in, n_out) = (pair[0], pair[1]);
        for (name, shape, values) in [
            (
                format!("layers.{i}.weight"),
                vec![n_out, n_in],
                (0..n_in * n_out).map(|k| weight(i, k)).collect::<Vec<_>>(),
            ),
            (format!("layers.{i}.bias"), vec![n_out], (0..n_out).map(|k| bias(k) + shift).collect()),
        ] {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(name, json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
        }
    }
    let header = Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    bytes
}

pub fn config() -> Value {
    json!({"layers": LAYERS, "activation": "relu"})
}

/// The forward pass by hand: ReLU between layers, identity output.
pub fn forward(x: &[f32]) -> Vec<f32> {
    forward_shifted(x, 0.0)
}

/// The forward pass of [`safetensors_shifted`].
pub fn forward_shifted(x: &[f32], shift: f32) -> Vec<f32> {
    let mut v = x.to_vec();
    for (i, pair) in LAYERS.windows(2).enumerate() {
        let (n_in, n_out) = (pair[0], pair[1]);
        v = (0..n_out)
            .map(|o| (0..n_in).map(|j| weight(i, o * n_in + j) * v[j]).sum::<f32>() + bias(o) + shift)
            .collect();
        if i + 2 < LAYERS.len() {
            v.iter_mut().for_each(|x| *x = x.max(0.0));
        }
    }
    v
}

/// Registers the MLP (weights and config.json) through `client` as `name`.
pub async fn register(client: &agora_node::client::NodeClient, name: &str, with_config: bool) -> Value {
    register_shifted(client, name, with_config, 0.0).await
}

/// Registers [`safetensors_shifted`] as the next version of `name`.
pub async fn register_shifted(
    client: &agora_node::client::NodeClient,
    name: &str,
    with_config: bool,
    shift: f32,
) -> Value {
    let mut form = reqwest::multipart::Form::new().text("metadata", json!({"name": name}).to_string()).part(
        "artifact",
        reqwest::multipart::Part::bytes(safetensors_shifted(shift)).file_name("mlp.safetensors"),
    );
    if with_config {
        form = form.part("config", reqwest::multipart::Part::text(config().to_string()));
    }
    let response = client
        .authorize(client.http.post(client.endpoint("/api/v1/models/register")).multipart(form))
        .send()
        .await
        .unwrap();
    agora_node::client::answer(response).await.unwrap()
}
