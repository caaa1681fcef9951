//! The model's parameter names and shapes, computed from a config without allocating weights.

use super::coca::CoCa;
use super::config::CocaConfig;
use crate::model::tensor_parallel::TensorParallel;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::sync::{Arc, Mutex};

/// Every parameter of a model built from `config`, by open_clip name, in construction order.
///
/// Built by constructing the model over a backend that records each request and hands back a
/// broadcast zero (no memory), so names and shapes come from the model code itself.
pub fn parameter_shapes(config: &CocaConfig) -> Result<Records> {
    parameter_shapes_for(config, &TensorParallel::single())
}

/// [`parameter_shapes`] of one tensor-parallel member's shards (local shapes). Nothing is run,
/// so `tp` may be [`TensorParallel::layout_only`].
pub fn parameter_shapes_for(config: &CocaConfig, tp: &TensorParallel) -> Result<Records> {
    let recorder = Recorder::default();
    let records = recorder.records.clone();
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu);
    CoCa::new_parallel(config, vb, tp)?;
    let records = records
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
    Ok(records.clone())
}

/// Total number of scalar parameters of a model built from `config`.
pub fn parameter_count(config: &CocaConfig) -> Result<usize> {
    Ok(parameter_shapes(config)?
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum())
}

/// Parameter names and shapes, in the order the model asked for them.
type Records = Vec<(String, Vec<usize>)>;

#[derive(Default)]
struct Recorder {
    records: Arc<Mutex<Records>>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Ok(mut r) = self.records.lock() {
            r.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
