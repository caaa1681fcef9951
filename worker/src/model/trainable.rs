//! Building a model whose weights are trainable variables, initialised reproducibly.

use super::coca::CoCa;
use super::config::CocaConfig;
use crate::rng::{hash_str, mix_seed, SplitMix64};
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The model's variables by open_clip name, in construction order.
#[derive(Debug, Clone, Default)]
pub struct TrainableWeights {
    vars: Vec<(String, Var)>,
}

impl TrainableWeights {
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Var)> {
        self.vars.iter()
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The current values, detached from the graph.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }
}

/// A model over `candle` variables, so that a backward pass yields a gradient for every weight.
///
/// Weights given in `initial` are used as they are (converted to `dtype`); every other weight is
/// initialised as open_clip initialises it, from a generator keyed by `(seed, name)` alone, so
/// the same seed gives the same model in every process and layout.
pub fn trainable_model(
    config: &CocaConfig,
    initial: Option<HashMap<String, Tensor>>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<(CoCa, TrainableWeights)> {
    let backend = SeededVars {
        initial: Mutex::new(initial.unwrap_or_default()),
        seed,
        created: Arc::default(),
    };
    let created = backend.created.clone();
    let model = CoCa::new(
        config,
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
    )?;
    let vars = created
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable list lock poisoned".into()))?
        .clone();
    Ok((model, TrainableWeights { vars }))
}

struct SeededVars {
    initial: Mutex<HashMap<String, Tensor>>,
    seed: u64,
    created: Arc<Mutex<Vec<(String, Var)>>>,
}

fn seeded_init(shape: &Shape, init: Init, seed: u64, name: &str) -> Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = SplitMix64(mix_seed(&[seed, hash_str(name)]));
    let data: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => {
            let mut v = Vec::with_capacity(n + 1);
            while v.len() < n {
                let (a, b) = rng.normal_pair();
                v.push((mean + stdev * a) as f32);
                v.push((mean + stdev * b) as f32);
            }
            v.truncate(n);
            v
        }
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect(),
        Init::Kaiming { .. } => candle_core::bail!("{name}: Kaiming init is not used by CoCa"),
    };
    Tensor::from_vec(data, shape, &Device::Cpu)
}

impl SimpleBackend for SeededVars {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let given = self
            .initial
            .lock()
            .map_err(|_| candle_core::Error::Msg("initial weights lock poisoned".into()))?
            .remove(name);
        let value = match given {
            Some(t) if t.shape() != &s => candle_core::bail!(
                "{name}: the given weight has shape {:?}, the model needs {:?}",
                t.dims(),
                s.dims()
            ),
            Some(t) => t,
            None => seeded_init(&s, h, self.seed, name)?,
        };
        let var = Var::from_tensor(&value.to_dtype(dtype)?.to_device(dev)?)?;
        let tensor = var.as_tensor().clone();
        self.created
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable list lock poisoned".into()))?
            .push((name.to_string(), var));
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
