//! Building a model whose weights are the trainer's variables (in float32, views of its flat
//! parameter buffer, [`super::flat`]), initialised reproducibly.

use super::flat::lay_out_by_name;
use crate::model::coca::CoCa;
use crate::model::config::CocaConfig;
use crate::model::manifest::parameter_shapes_for;
use crate::model::tensor_parallel::{full_shape, shard_tensor, split_of, TensorParallel};
use crate::rng::{hash_str, mix_seed, SplitMix64};
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The model's variables by open_clip name, in construction order, and (float32) the one flat
/// buffer they are views of.
#[derive(Debug, Clone, Default)]
pub struct TrainableWeights {
    vars: Vec<(String, Var)>,
    flat: Option<Tensor>,
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

    /// The 1-D float32 buffer every variable is a view of, laid out by
    /// [`lay_out_by_name`]: the trainer's parameter buffer, updated in place (no second copy
    /// of the weights, none written back after a step). `None` for other dtypes.
    pub fn flat(&self) -> Option<&Tensor> {
        self.flat.as_ref()
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
/// In float32 the variables are views of one flat buffer ([`TrainableWeights::flat`]).
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
    trainable_model_parallel(
        config,
        initial,
        seed,
        dtype,
        device,
        &TensorParallel::single(),
    )
}

/// [`trainable_model`] for member `tp.rank()` of a tensor-parallel group: the variables are
/// this member's shards (standard names, local shapes, see
/// [`crate::model::tensor_parallel`]).
///
/// A weight in `initial` may be given whole (the full shape: this member's shard is cut from
/// it) or already as this member's shard. Every other weight is the slice of exactly the value
/// [`trainable_model`] would initialise (the full tensor is drawn from the `(seed, name)`
/// generator, then sliced), so any degree starts from the same model.
pub fn trainable_model_parallel(
    config: &CocaConfig,
    initial: Option<HashMap<String, Tensor>>,
    seed: u64,
    dtype: DType,
    device: &Device,
    tp: &TensorParallel,
) -> Result<(CoCa, TrainableWeights)> {
    let flat = match dtype {
        DType::F32 => Some(FlatVars::new(config, tp, device)?),
        _ => None,
    };
    let backend = SeededVars {
        initial: Mutex::new(initial.unwrap_or_default()),
        seed,
        rank: tp.rank(),
        size: tp.size(),
        flat,
        created: Arc::default(),
    };
    let created = backend.created.clone();
    let flat = backend.flat.as_ref().map(|f| f.buffer.clone());
    let model = CoCa::new_parallel(
        config,
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        tp,
    )?;
    let vars = created
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable list lock poisoned".into()))?
        .clone();
    Ok((model, TrainableWeights { vars, flat }))
}

/// The flat float32 buffer of a model's variables, laid out before the model asks for them
/// (from its manifest: names and shapes, in [`lay_out_by_name`]'s order).
struct FlatVars {
    buffer: Tensor,
    /// Offset and length of each parameter.
    places: HashMap<String, (usize, usize)>,
}

impl FlatVars {
    fn new(config: &CocaConfig, tp: &TensorParallel, device: &Device) -> Result<Self> {
        let layout = TensorParallel::layout_only(tp.rank(), tp.size());
        let mut shapes = parameter_shapes_for(config, &layout)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let (offsets, total) = lay_out_by_name(&mut shapes, |s| s.iter().product());
        let places = shapes
            .into_iter()
            .zip(offsets)
            .map(|((name, shape), offset)| (name, (offset, shape.iter().product())))
            .collect();
        Ok(Self {
            buffer: Tensor::zeros(total, DType::F32, device)?,
            places,
        })
    }

    /// `value` written into `name`'s place, and a variable viewing it.
    fn var(&self, name: &str, value: &Tensor) -> Result<Var> {
        let Some(&(offset, len)) = self.places.get(name) else {
            candle_core::bail!("{name}: not a parameter of the model's manifest");
        };
        if value.elem_count() != len {
            candle_core::bail!(
                "{name}: {} elements, the manifest lays out {len}",
                value.elem_count()
            );
        }
        self.buffer.slice_set(&value.flatten_all()?, 0, offset)?;
        Var::from_view(&self.buffer.narrow(0, offset, len)?.reshape(value.shape())?)
    }
}

struct SeededVars {
    initial: Mutex<HashMap<String, Tensor>>,
    seed: u64,
    /// This member of a tensor-parallel group of `size` (0 of 1 without one).
    rank: usize,
    size: usize,
    /// Where float32 variables live (`None`: each its own tensor).
    flat: Option<FlatVars>,
    created: Arc<Mutex<Vec<(String, Var)>>>,
}

impl SeededVars {
    /// This member's shard of `name` cut from its full value.
    fn shard(&self, name: &str, full: &Tensor) -> Result<Tensor> {
        shard_tensor(name, full, self.rank, self.size)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
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
        let full = Shape::from(full_shape(split_of(name), s.dims(), self.size));
        let value = match given {
            Some(t) if t.shape() == &s => t,
            Some(t) if t.shape() == &full => self.shard(name, &t)?,
            Some(t) => candle_core::bail!(
                "{name}: the given weight has shape {:?}, the model needs {:?}",
                t.dims(),
                s.dims()
            ),
            None if full == s => seeded_init(&s, h, self.seed, name)?,
            None => self.shard(name, &seeded_init(&full, h, self.seed, name)?)?,
        };
        let value = value.to_dtype(dtype)?.to_device(dev)?;
        let var = match &self.flat {
            Some(flat) => flat.var(name, &value)?,
            None => Var::from_tensor(&value)?,
        };
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
