//! PyTorch checkpoints written by `torch.save` (torch >= 1.6): a zip archive holding
//! `<name>/data.pkl` (a protocol-2 pickle of the saved object), `<name>/data/<key>` (one raw
//! storage per key), `<name>/version` and, since torch 1.10, `<name>/byteorder`.
//!
//! In the pickle each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
//! requires_grad, backward_hooks[, metadata])`, possibly wrapped in `_rebuild_parameter`, where
//! `storage` is the persistent id `('storage', torch.<Type>Storage, key, location, numel)`. Views
//! (an offset, or strides that are not row-major) are copied into C-contiguous tensors.

use super::pickle::{self, Value};
use super::raw::{checked_numel, contiguous_strides, RawDType, RawTensor};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// Keys under which training checkpoints commonly keep the state dict, in the order tried.
const WRAPPER_KEYS: [&str; 3] = ["state_dict", "model", "module"];
/// The prefix `DistributedDataParallel` adds to every parameter name.
const DDP_PREFIX: &str = "module.";

/// Reads every tensor of a `torch.save` checkpoint's state dict, in the pickle's order.
///
/// The saved object must be a dict of tensors (usually a `collections.OrderedDict`), or a dict
/// holding one under `state_dict`, `model` or `module` beside other entries, which are ignored.
/// When every name starts with `module.` (a `DistributedDataParallel` model), that prefix is
/// removed.
pub fn read_torch_checkpoint(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let source = path.display().to_string();
    let mut file = File::open(path).with_context(|| format!("opening {source}"))?;
    let mut magic = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut magic)
        .with_context(|| format!("reading {source}"))?;
    if !(magic.starts_with(b"PK\x03\x04") || magic.starts_with(b"PK\x05\x06")) {
        if magic.first() == Some(&0x80) {
            bail!(
                "{source}: legacy (pre-1.6) torch.save format is not supported; re-save with \
                 torch>=1.6"
            );
        }
        bail!("{source}: not a PyTorch checkpoint (expected a zip archive written by torch.save)");
    }
    file.rewind().with_context(|| format!("reading {source}"))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut archive = Archive {
        zip: zip::ZipArchive::new(BufReader::new(file))
            .map_err(|e| anyhow!("{source}: not a valid zip archive: {e}"))?,
        source: source.clone(),
        file_len,
    };

    let names: Vec<String> = archive
        .zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{source}: unreadable zip directory: {e}"))?;
    let prefix = find_prefix(&names, &source)?;

    let big_endian = match names.iter().any(|n| *n == format!("{prefix}byteorder")) {
        false => false,
        true => {
            let order = archive.read(&format!("{prefix}byteorder"))?;
            match order.trim_ascii() {
                b"little" => false,
                b"big" => true,
                other => bail!(
                    "{source}: unknown byte order {:?} in {prefix}byteorder",
                    String::from_utf8_lossy(other)
                ),
            }
        }
    };

    let pkl_name = format!("{prefix}data.pkl");
    let pkl = archive.read(&pkl_name)?;
    let root = pickle::parse(&pkl, &format!("{source}: {pkl_name}"))?;
    drop(pkl);

    let entries = select_state_dict(root, &source)?;
    let mut specs = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let Value::Str(name) = key else {
            bail!(
                "{source}: a state dict key is a {}, expected str",
                key.describe()
            );
        };
        let spec = parse_tensor(&value)
            .map_err(|e| anyhow!("{source}: state dict entry '{name}' {e:#}"))?;
        specs.push((name, spec));
    }
    if !specs.is_empty() && specs.iter().all(|(n, _)| n.starts_with(DDP_PREFIX)) {
        for (name, _) in &mut specs {
            name.drain(..DDP_PREFIX.len());
        }
    }

    // Load each storage once, and drop it after its last tensor.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for (_, spec) in &specs {
        *uses.entry(spec.key.clone()).or_default() += 1;
    }
    let mut loaded: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (name, spec) in specs {
        let elem = spec.dtype.size_in_bytes();
        let storage_bytes = spec
            .storage_numel
            .checked_mul(elem)
            .with_context(|| format!("{source}: storage of '{name}' is too large"))?;
        let entry = format!("{prefix}data/{}", spec.key);
        if !loaded.contains_key(&spec.key) {
            let bytes = archive.read(&entry)?;
            loaded.insert(spec.key.clone(), bytes);
        }
        // Checked at every use: tensors sharing a storage may claim different types and sizes.
        let available = loaded.get(&spec.key).map_or(0, Vec::len);
        if available < storage_bytes {
            bail!(
                "{source}: storage {entry} holds {available} bytes, but tensor '{name}' says it \
                 has {} elements of {:?} ({storage_bytes} bytes)",
                spec.storage_numel,
                spec.dtype
            );
        }
        let left = uses.get_mut(&spec.key).map(|n| {
            *n -= 1;
            *n
        });
        let mut tensor = if left == Some(0) {
            let mut storage = loaded.remove(&spec.key).unwrap_or_default();
            storage.truncate(storage_bytes);
            materialize(&spec, storage)
        } else {
            let storage = loaded.get(&spec.key).map(Vec::as_slice).unwrap_or_default();
            RawTensor::from_strided(
                spec.dtype,
                &spec.shape,
                &spec.strides,
                spec.offset,
                &storage[..storage_bytes],
            )
        }
        .map_err(|e| anyhow!("{source}: tensor '{name}': {e:#}"))?;
        if big_endian {
            tensor.swap_byte_order();
        }
        out.push((name, tensor));
    }
    Ok(out)
}

/// The zip archive being read, with what error messages and size checks need.
struct Archive {
    zip: zip::ZipArchive<BufReader<File>>,
    source: String,
    file_len: u64,
}

impl Archive {
    /// The whole (decompressed) content of entry `name`.
    fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let source = &self.source;
        let mut entry = self
            .zip
            .by_name(name)
            .map_err(|e| anyhow!("{source}: cannot open {name} in the archive: {e}"))?;
        // The declared size is only a hint: never trust it for more than the file could hold.
        let hint = entry.size().min(self.file_len);
        let mut data = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
        entry
            .read_to_end(&mut data)
            .map_err(|e| anyhow!("{source}: cannot read {name} in the archive: {e}"))?;
        Ok(data)
    }
}

/// The folder inside the archive that holds `data.pkl` (with its trailing `/`): `archive/` for
/// recent torch, the file's stem for older versions.
fn find_prefix(names: &[String], source: &str) -> Result<String> {
    let candidates: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        })
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one[..one.len() - "data.pkl".len()].to_owned()),
        [] if names.iter().any(|n| n.ends_with("constants.pkl")) => bail!(
            "{source}: a TorchScript archive (torch.jit.save) is not supported; save the model's \
             state_dict() with torch.save"
        ),
        [] => bail!("{source}: no data.pkl in the zip archive; not a torch.save checkpoint"),
        _ => bail!("{source}: several data.pkl in the zip archive; not a torch.save checkpoint"),
    }
}

/// Finds the state dict: the top-level dict itself, or the dict stored under one of
/// [`WRAPPER_KEYS`].
fn select_state_dict(root: Value, source: &str) -> Result<Vec<(Value, Value)>> {
    let mut top = root.into_dict().map_err(|other| {
        anyhow!(
            "{source}: the checkpoint holds a {}, expected a dict (a state dict, or a dict holding \
             one under 'state_dict', 'model' or 'module')",
            other.describe()
        )
    })?;
    for wrapper in WRAPPER_KEYS {
        let found = top
            .iter()
            .position(|(k, v)| k.as_str() == Some(wrapper) && v.as_dict().is_some());
        if let Some(i) = found {
            let (_, inner) = top.swap_remove(i);
            return inner
                .into_dict()
                .map_err(|_| anyhow!("{source}: internal error: '{wrapper}' is not a dict"));
        }
    }
    Ok(top)
}

/// Where a tensor's data lives and how to view it.
#[derive(Debug)]
struct TensorSpec {
    /// Storage key: the archive entry `data/<key>`.
    key: String,
    dtype: RawDType,
    /// Elements in the storage.
    storage_numel: usize,
    /// Offset of the first element, in elements.
    offset: usize,
    shape: Vec<usize>,
    /// Strides in elements.
    strides: Vec<usize>,
}

/// Reads a pickled tensor (or parameter). Errors read after "state dict entry 'name' ".
fn parse_tensor(value: &Value) -> Result<TensorSpec> {
    match value {
        // A tensor with Python attributes; the attributes do not matter here.
        Value::Build { obj, .. } => parse_tensor(obj),
        Value::Reduce { callable, args } => {
            let args = args
                .as_seq()
                .context("has call arguments that are not a tuple")?;
            parse_call(callable, args).map_err(|e| anyhow!("{e:#}"))
        }
        other => bail!("is not a tensor (found {})", other.describe()),
    }
}

fn parse_call(callable: &Value, args: &[Value]) -> Result<TensorSpec> {
    let Value::Global { module, name } = callable else {
        bail!("is not a tensor (found a call of {})", callable.describe());
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(args),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            parse_tensor(args.first().context("has a parameter without data")?)
        }
        // `_rebuild_from_type_v2(func, new_type, args, state)`: a tensor subclass.
        ("torch._tensor", "_rebuild_from_type_v2") => match args {
            [func, _, inner, ..] => {
                let inner = inner
                    .as_seq()
                    .context("has a tensor subclass with bad arguments")?;
                parse_call(func, inner)
            }
            _ => bail!("has a tensor subclass with {} arguments, not 4", args.len()),
        },
        (m, n) if m.starts_with("torch") => {
            bail!("is a kind of tensor that is not supported ({m}.{n})")
        }
        (m, n) => bail!("is not a tensor (found a call of {m}.{n})"),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`.
fn rebuild_tensor(args: &[Value]) -> Result<TensorSpec> {
    let [storage, offset, size, stride, ..] = args else {
        bail!(
            "has a tensor with {} arguments, expected at least 4",
            args.len()
        );
    };
    let Value::PersistentId(pid) = storage else {
        bail!(
            "has a tensor whose storage is a {}, not a persistent id",
            storage.describe()
        );
    };
    let (key, dtype, storage_numel) = parse_storage(pid)?;
    let offset = non_negative(offset).context("has a bad storage offset")?;
    let shape = int_tuple(size).context("has a bad size")?;
    let strides = int_tuple(stride).context("has a bad stride")?;
    if shape.len() != strides.len() {
        bail!("has size {shape:?} and stride {strides:?} of different lengths");
    }
    checked_numel(&shape)?;
    Ok(TensorSpec {
        key,
        dtype,
        storage_numel,
        offset,
        shape,
        strides,
    })
}

/// `('storage', torch.<Type>Storage, key, location, numel)`.
fn parse_storage(pid: &Value) -> Result<(String, RawDType, usize)> {
    let items = pid
        .as_seq()
        .context("has a storage id that is not a tuple")?;
    let [kind, storage_type, key, _location, numel, ..] = items else {
        bail!("has a storage id with {} items, expected 5", items.len());
    };
    if kind.as_str() != Some("storage") {
        bail!("has a persistent id that is not a storage");
    }
    let dtype = match storage_type {
        Value::Global { module, name } if module == "torch" => match name.as_str() {
            "DoubleStorage" => RawDType::F64,
            "FloatStorage" => RawDType::F32,
            "HalfStorage" => RawDType::F16,
            "BFloat16Storage" => RawDType::BF16,
            "LongStorage" => RawDType::I64,
            "IntStorage" => RawDType::I32,
            "ShortStorage" => RawDType::I16,
            "ByteStorage" => RawDType::U8,
            "BoolStorage" => RawDType::Bool,
            other => bail!("has a storage of type torch.{other}, which is not supported"),
        },
        other => bail!("has a storage whose type is a {}", other.describe()),
    };
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => bail!("has a storage key that is a {}", other.describe()),
    };
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        bail!("has an invalid storage key {key:?}");
    }
    let numel = non_negative(numel).context("has a bad storage size")?;
    Ok((key, dtype, numel))
}

fn non_negative(v: &Value) -> Result<usize> {
    v.as_int()
        .and_then(|i| usize::try_from(i).ok())
        .with_context(|| format!("expected a non-negative int, found {}", v.describe()))
}

/// A tuple of non-negative ints (also `torch.Size((...))`).
fn int_tuple(v: &Value) -> Result<Vec<usize>> {
    if let Value::Reduce { callable, args } = v {
        if callable.is_global("torch", "Size") {
            if let Some([inner]) = args.as_seq() {
                return int_tuple(inner);
            }
        }
    }
    v.as_seq()
        .with_context(|| format!("expected a tuple, found {}", v.describe()))?
        .iter()
        .map(non_negative)
        .collect()
}

/// Turns the tensor's view of `storage` (which no other tensor needs) into a C-contiguous tensor,
/// reusing the buffer when the view is the whole storage in row-major order.
fn materialize(spec: &TensorSpec, storage: Vec<u8>) -> Result<RawTensor> {
    let numel = checked_numel(&spec.shape)?;
    let whole = spec.offset == 0
        && numel == spec.storage_numel
        && (spec.strides == contiguous_strides(&spec.shape) || numel <= 1);
    if whole {
        return Ok(RawTensor {
            dtype: spec.dtype,
            shape: spec.shape.clone(),
            data: storage,
        });
    }
    RawTensor::from_strided(
        spec.dtype,
        &spec.shape,
        &spec.strides,
        spec.offset,
        &storage,
    )
}

#[cfg(test)]
mod tests;
