//! The watermark crate against real and synthetic weights: the robustness suite (T0–T14 of the
//! scheme), function fidelity on a real forward pass, and malformed input.

#[cfg(feature = "cuda")]
mod cuda;
mod fidelity;
mod inputs;
mod model;
mod suite;
