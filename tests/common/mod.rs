//! Helpers shared by the end-to-end tests: locating the reference fixtures and comparing tensors.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `../shared/fixtures/<rel>` beside the repository, or `None` (with a message) when absent, so
/// that a checkout without the shared folder skips rather than fails.
pub fn fixture(rel: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: reference fixture {} is absent", path.display());
        None
    }
}

/// Every tensor of a safetensors file.
pub fn load(path: &PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute element of a tensor.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(candle_core::DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
