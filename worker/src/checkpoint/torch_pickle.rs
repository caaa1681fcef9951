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
mod tests {
    use super::*;
    use crate::checkpoint::pickle::writer::PickleWriter;
    use std::io::Write;

    /// One tensor as the test writes it.
    struct T {
        name: &'static str,
        storage_type: &'static str,
        key: &'static str,
        storage_numel: i64,
        offset: i64,
        size: &'static [i64],
        stride: &'static [i64],
        parameter: bool,
    }

    /// Writes pickles the way `torch.save` (pickle protocol 2) does: `GLOBAL`, `BINUNICODE`,
    /// `BINPUT` after each memoized object and `BINGET` for repeated globals and strings.
    struct TorchPickler {
        w: PickleWriter,
        memo: HashMap<String, u32>,
    }

    impl TorchPickler {
        fn new() -> Self {
            TorchPickler {
                w: PickleWriter::new(2),
                memo: HashMap::new(),
            }
        }

        fn memoized(&mut self, id: String, write: impl FnOnce(&mut PickleWriter)) {
            if let Some(&i) = self.memo.get(&id) {
                self.w.get(i);
            } else {
                write(&mut self.w);
                self.memo.insert(id, self.w.next_memo());
                self.w.put();
            }
        }

        fn global(&mut self, module: &str, name: &str) {
            self.memoized(format!("global {module}.{name}"), |w| {
                w.global(module, name);
            });
        }

        fn str(&mut self, s: &str) {
            self.memoized(format!("str {s}"), |w| {
                w.binunicode(s);
            });
        }

        fn tuple_of_ints(&mut self, v: &[i64]) {
            self.w.int_tuple(v);
            if !v.is_empty() {
                self.w.put();
            }
        }

        fn ordered_dict_start(&mut self) {
            self.global("collections", "OrderedDict");
            self.w.op(b')').op(b'R').put();
        }

        fn tensor(&mut self, t: &T) {
            if t.parameter {
                self.global("torch._utils", "_rebuild_parameter");
            }
            self.global("torch._utils", "_rebuild_tensor_v2");
            self.w.op(b'(');
            // The persistent id tuple.
            self.w.op(b'(');
            self.str("storage");
            self.global("torch", t.storage_type);
            self.str(t.key);
            self.str("cpu");
            self.w.int(t.storage_numel).op(b't').put().op(b'Q');
            self.w.int(t.offset);
            self.tuple_of_ints(t.size);
            self.tuple_of_ints(t.stride);
            self.w.bool(false);
            self.ordered_dict_start();
            self.w.op(b't').put().op(b'R').put();
            if t.parameter {
                self.w.bool(true);
                self.ordered_dict_start();
                self.w.op(0x87).put().op(b'R').put();
            }
        }

        /// An `OrderedDict` state dict with torch's `_metadata` attribute set by `BUILD`.
        fn state_dict(&mut self, tensors: &[T]) {
            self.ordered_dict_start();
            self.w.op(b'(');
            for t in tensors {
                self.str(t.name);
                self.tensor(t);
            }
            self.w.op(b'u');
            self.w.op(b'}').put();
            self.str("_metadata");
            self.ordered_dict_start();
            self.str("");
            self.w.op(b'}').put();
            self.str("version");
            self.w.int(1).op(b's').op(b's').op(b's').op(b'b');
        }
    }

    fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let file = File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    /// The tensors of the main test: storage "0" holds arange(6) as f32, storage "1" three f16,
    /// storage "2" four bf16 and storage "3" one i64.
    const TENSORS: [T; 5] = [
        // a: the whole of storage 0 as [2, 3].
        T {
            name: "module.a",
            storage_type: "FloatStorage",
            key: "0",
            storage_numel: 6,
            offset: 0,
            size: &[2, 3],
            stride: &[3, 1],
            parameter: false,
        },
        // a_t: a.t(), sharing storage 0 (shape [3, 2], strides [1, 3]).
        T {
            name: "module.a_t",
            storage_type: "FloatStorage",
            key: "0",
            storage_numel: 6,
            offset: 0,
            size: &[3, 2],
            stride: &[1, 3],
            parameter: false,
        },
        // h: elements 1.. of storage 1.
        T {
            name: "module.h",
            storage_type: "HalfStorage",
            key: "1",
            storage_numel: 3,
            offset: 1,
            size: &[2],
            stride: &[1],
            parameter: false,
        },
        // b: a bf16 parameter, transposed view of a [2, 2] storage.
        T {
            name: "module.b",
            storage_type: "BFloat16Storage",
            key: "2",
            storage_numel: 4,
            offset: 0,
            size: &[2, 2],
            stride: &[1, 2],
            parameter: true,
        },
        // s: a 0-d i64 tensor.
        T {
            name: "module.s",
            storage_type: "LongStorage",
            key: "3",
            storage_numel: 1,
            offset: 0,
            size: &[],
            stride: &[],
            parameter: false,
        },
    ];

    fn storages() -> Vec<(&'static str, Vec<u8>)> {
        let halves = [1.0f32, 2.5, -3.0].map(half::f16::from_f32);
        let bf = [1.0f32, 2.0, 3.0, 4.0].map(half::bf16::from_f32);
        vec![
            ("0", f32_bytes((0..6).map(|i| i as f32))),
            ("1", halves.iter().flat_map(|h| h.to_le_bytes()).collect()),
            ("2", bf.iter().flat_map(|h| h.to_le_bytes()).collect()),
            ("3", (-42i64).to_le_bytes().to_vec()),
        ]
    }

    /// `{"epoch": 3, "state_dict": OrderedDict(TENSORS), "optimizer": {"lr": 0.5}}`.
    fn wrapped_checkpoint() -> Vec<u8> {
        let mut p = TorchPickler::new();
        p.w.op(b'}').put().op(b'(');
        p.str("epoch");
        p.w.int(3);
        p.str("state_dict");
        p.state_dict(&TENSORS);
        p.str("optimizer");
        p.w.op(b'}').put();
        p.str("lr");
        p.w.op(b'G').buf.extend_from_slice(&0.5f64.to_be_bytes());
        p.w.op(b's').op(b'u');
        p.w.finish()
    }

    fn write_checkpoint(
        dir: &Path,
        file: &str,
        prefix: &str,
        pkl: &[u8],
        byteorder: &[u8],
    ) -> std::path::PathBuf {
        let path = dir.join(file);
        let storages = storages();
        let mut entries: Vec<(String, &[u8])> = vec![
            (format!("{prefix}/data.pkl"), pkl),
            (format!("{prefix}/byteorder"), byteorder),
        ];
        for (key, data) in &storages {
            entries.push((format!("{prefix}/data/{key}"), data));
        }
        entries.push((format!("{prefix}/version"), b"3\n"));
        let entries: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        write_zip(&path, &entries);
        path
    }

    #[test]
    fn reads_wrapped_ddp_checkpoint_with_views() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(
            dir.path(),
            "ckpt.pt",
            "archive",
            &wrapped_checkpoint(),
            b"little",
        );
        let tensors = read_torch_checkpoint(&path).unwrap();
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "a_t", "h", "b", "s"]);
        let t = |i: usize| &tensors[i].1;

        assert_eq!(
            (t(0).dtype, t(0).shape.as_slice()),
            (RawDType::F32, &[2, 3][..])
        );
        assert_eq!(t(0).data, f32_bytes((0..6).map(|i| i as f32)));
        assert_eq!(t(1).shape, [3, 2]);
        assert_eq!(t(1).data, f32_bytes([0., 3., 1., 4., 2., 5.]));
        assert_eq!(
            (t(2).dtype, t(2).shape.as_slice()),
            (RawDType::F16, &[2][..])
        );
        let h: Vec<f32> = t(2)
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(h, [2.5, -3.0]);
        assert_eq!(
            (t(3).dtype, t(3).shape.as_slice()),
            (RawDType::BF16, &[2, 2][..])
        );
        let b: Vec<f32> = t(3)
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(b, [1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (t(4).dtype, t(4).shape.as_slice()),
            (RawDType::I64, &[][..])
        );
        assert_eq!(t(4).data, (-42i64).to_le_bytes());
    }

    #[test]
    fn reads_bare_state_dict_under_any_prefix_and_keeps_partial_module_names() {
        let mut p = TorchPickler::new();
        let tensors = [
            T {
                name: "module.x",
                ..TENSORS[0]
            },
            T {
                name: "y",
                ..TENSORS[1]
            },
        ];
        p.state_dict(&tensors);
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "old.pt", "old", &p.w.finish(), b"little");
        let got = read_torch_checkpoint(&path).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["module.x", "y"]);
    }

    #[test]
    fn big_endian_archives_are_swapped() {
        let mut p = TorchPickler::new();
        p.state_dict(&[T {
            name: "w",
            ..TENSORS[0]
        }]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("be.pt");
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_be_bytes()).collect();
        let pkl = p.w.finish();
        write_zip(
            &path,
            &[
                ("archive/data.pkl", &pkl),
                ("archive/byteorder", b"big"),
                ("archive/data/0", &data),
            ],
        );
        let got = read_torch_checkpoint(&path).unwrap();
        assert_eq!(got[0].1.data, f32_bytes((0..6).map(|i| i as f32)));
    }

    #[test]
    fn non_tensor_in_state_dict_names_the_key() {
        let mut p = TorchPickler::new();
        p.ordered_dict_start();
        p.w.op(b'(');
        p.str("w");
        p.tensor(&TENSORS[0]);
        p.str("step");
        p.w.int(7).op(b'u');
        let dir = tempfile::tempdir().unwrap();
        let path = write_checkpoint(dir.path(), "bad.pt", "archive", &p.w.finish(), b"little");
        let err = read_torch_checkpoint(&path).unwrap_err().to_string();
        assert!(
            err.contains("bad.pt") && err.contains("'step'") && err.contains("not a tensor"),
            "{err}"
        );
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // Top-level list.
        let mut w = PickleWriter::new(2);
        w.op(b']');
        let path = write_checkpoint(d, "list.pt", "archive", &w.finish(), b"little");
        let err = read_torch_checkpoint(&path).unwrap_err().to_string();
        assert!(err.contains("holds a list"), "{err}");

        // Legacy format: starts with the pickled magic number.
        let legacy = d.join("legacy.pt");
        std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
        let err = read_torch_checkpoint(&legacy).unwrap_err().to_string();
        assert!(
            err.contains("legacy (pre-1.6)") && err.contains("torch>=1.6"),
            "{err}"
        );

        // Random bytes, empty file, missing file.
        let noise = d.join("noise.pt");
        std::fs::write(
            &noise,
            (0..2000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(read_torch_checkpoint(&noise).is_err());
        let empty = d.join("empty.pt");
        std::fs::write(&empty, b"").unwrap();
        assert!(read_torch_checkpoint(&empty).is_err());
        assert!(read_torch_checkpoint(&d.join("missing.pt")).is_err());

        // A zip without data.pkl.
        let nopkl = d.join("nopkl.pt");
        write_zip(&nopkl, &[("archive/version", b"3")]);
        let err = read_torch_checkpoint(&nopkl).unwrap_err().to_string();
        assert!(err.contains("no data.pkl"), "{err}");

        // A storage that is missing, or too short for the view.
        let pkl = wrapped_checkpoint();
        let path = d.join("nostorage.pt");
        write_zip(&path, &[("archive/data.pkl", &pkl)]);
        let err = read_torch_checkpoint(&path).unwrap_err().to_string();
        assert!(err.contains("archive/data/0"), "{err}");
        let mut p = TorchPickler::new();
        p.state_dict(&[T {
            name: "w",
            storage_numel: 6,
            offset: 1,
            ..TENSORS[0]
        }]);
        let path = write_checkpoint(d, "oob.pt", "archive", &p.w.finish(), b"little");
        let err = read_torch_checkpoint(&path).unwrap_err().to_string();
        assert!(err.contains("'w'") && err.contains("storage"), "{err}");

        // Two tensors claiming different sizes for one storage.
        let mut p = TorchPickler::new();
        p.state_dict(&[
            T {
                name: "small",
                ..TENSORS[0]
            },
            T {
                name: "big",
                storage_type: "DoubleStorage",
                ..TENSORS[0]
            },
            T {
                name: "last",
                ..TENSORS[0]
            },
        ]);
        let path = write_checkpoint(d, "conflict.pt", "archive", &p.w.finish(), b"little");
        let err = read_torch_checkpoint(&path).unwrap_err().to_string();
        assert!(err.contains("'big'") && err.contains("24 bytes"), "{err}");

        // Every truncation of a valid checkpoint fails cleanly.
        let good = write_checkpoint(d, "good.pt", "archive", &wrapped_checkpoint(), b"little");
        let bytes = std::fs::read(&good).unwrap();
        for cut in (0..bytes.len()).step_by(13) {
            let p = d.join("cut.pt");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(read_torch_checkpoint(&p).is_err(), "cut at {cut}");
        }
        // Corrupting any single byte of the pickle never panics.
        let pkl = wrapped_checkpoint();
        for at in 0..pkl.len() {
            let mut bad = pkl.clone();
            bad[at] ^= 0xa5;
            let p = write_checkpoint(d, "flip.pt", "archive", &bad, b"little");
            let _ = read_torch_checkpoint(&p);
        }
    }
}
