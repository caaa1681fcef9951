//! Building a model whose weights are trainable variables.

use super::coca::CoCa;
use super::config::CocaConfig;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;

/// A model over `candle` variables, so that a backward pass yields a gradient for every weight,
/// addressed by its open_clip name through the returned `VarMap`.
///
/// Weights given in `initial` are used as they are (converted to `dtype`); every other weight is
/// initialised as open_clip initialises it.
pub fn trainable_model(
    config: &CocaConfig,
    initial: Option<HashMap<String, Tensor>>,
    dtype: DType,
    device: &Device,
) -> Result<(CoCa, VarMap)> {
    let varmap = VarMap::new();
    if let Some(initial) = initial {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        for (name, tensor) in initial {
            let var = Var::from_tensor(&tensor.to_dtype(dtype)?.to_device(device)?)?;
            data.insert(name, var);
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    let model = CoCa::new(config, vb)?;
    Ok((model, varmap))
}
