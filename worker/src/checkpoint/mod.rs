//! Checkpoints: open_clip (`.safetensors`, PyTorch `.bin`/`.pt`) and PaddleMIX (`.pdparams`)
//! weights read into open_clip's names and layouts, checked against the model, and written back
//! as safetensors.

mod paddle_layout;
pub mod pdparams;
pub mod pickle;
pub mod raw;
mod safetensors_io;
pub mod torch_pickle;
mod validate;

pub use paddle_layout::paddle_to_open_clip;
pub use safetensors_io::{read_safetensors, write_safetensors_atomic};
pub use validate::{check_against_model, load_for_model};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use raw::{RawDType, RawTensor};
use std::io::Read;
use std::path::Path;

/// The file formats a checkpoint can come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// safetensors with open_clip's names.
    Safetensors,
    /// `torch.save` of an open_clip state dict (`.bin`, `.pt`, `.pth`).
    Torch,
    /// `paddle.save` of a PaddleMIX state dict (`.pdparams`).
    Paddle,
}

impl CheckpointFormat {
    /// The format of `path`, from its first bytes (extensions lie less often than they are
    /// missing, but a zip or pickle header is unambiguous).
    pub fn detect(path: &Path) -> Result<Self> {
        let mut head = [0u8; 8];
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        let n = file
            .read(&mut head)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        Ok(match (&head[..n], ext) {
            ([b'P', b'K', ..], _) => Self::Torch,
            // A bare pickle (no zip around it) is what paddle.save writes.
            ([0x80, ..], _) => Self::Paddle,
            (_, "safetensors") => Self::Safetensors,
            (h, _) if h.len() == 8 && u64::from_le_bytes(head) < (100 << 20) => Self::Safetensors,
            _ => bail!(
                "{}: not a recognised checkpoint (expected safetensors, a torch.save zip archive \
                 or a paddle.save pickle)",
                path.display()
            ),
        })
    }
}

/// Every tensor of a checkpoint, renamed and reshaped to open_clip's layout, in its stored
/// dtype (PaddleMIX's bfloat16-as-uint16 becomes bfloat16).
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    match CheckpointFormat::detect(path)? {
        CheckpointFormat::Safetensors => read_safetensors(path),
        CheckpointFormat::Torch => {
            let raw = torch_pickle::read_torch_checkpoint(path)?;
            to_tensors(raw, false).with_context(|| format!("checkpoint {}", path.display()))
        }
        CheckpointFormat::Paddle => {
            let raw = pdparams::read_pdparams(path)?;
            let tensors =
                to_tensors(raw, true).with_context(|| format!("checkpoint {}", path.display()))?;
            paddle_to_open_clip(tensors).with_context(|| format!("checkpoint {}", path.display()))
        }
    }
}

/// Converts raw file tensors to candle tensors; `u16_is_bf16` reads uint16 as bfloat16 bits
/// (how paddle stores bfloat16 in numpy).
fn to_tensors(raw: Vec<(String, RawTensor)>, u16_is_bf16: bool) -> Result<Vec<(String, Tensor)>> {
    raw.into_iter()
        .map(|(name, t)| {
            let dtype = match t.dtype {
                RawDType::F32 => DType::F32,
                RawDType::F16 => DType::F16,
                RawDType::BF16 => DType::BF16,
                RawDType::F64 => DType::F64,
                RawDType::U16 if u16_is_bf16 => DType::BF16,
                other => bail!("{name}: weights must be floating point, found {other:?}"),
            };
            let tensor = Tensor::from_raw_buffer(&t.data, dtype, &t.shape, &Device::Cpu)
                .with_context(|| format!("{name}: data does not fit shape {:?}", t.shape))?;
            Ok((name, tensor))
        })
        .collect()
}

/// Converts a checkpoint in any readable format to open_clip-named safetensors.
pub fn convert(input: &Path, output: &Path) -> Result<usize> {
    let ext = output.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "safetensors" {
        bail!(
            "{}: only .safetensors output (open_clip names) is supported",
            output.display()
        );
    }
    let tensors = read_state_dict(input)?;
    write_safetensors_atomic(&tensors, output)?;
    Ok(tensors.len())
}
