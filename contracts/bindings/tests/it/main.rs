//! The contracts on a real anvil chain, driven through the generated bindings.

mod market;
