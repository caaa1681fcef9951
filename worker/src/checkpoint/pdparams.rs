//! PaddlePaddle `.pdparams` files, as written by `paddle.save(state_dict, path)`: a pickle
//! (protocol 4 by default) of a dict from parameter name to numpy array, plus a
//! `StructuredToParameterName@@` entry (parameter name -> internal tensor name) that is skipped.
//!
//! numpy pickles an array as `numpy[._]core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`
//! followed by `BUILD` with the state `(version, shape, dtype, is_fortran, raw_bytes)`; the dtype
//! is `numpy.dtype(type_str, False, True)` with `BUILD` state `(3, byte_order, ...)`. Under
//! protocol 5 contiguous arrays use `numpy[._]core.numeric._frombuffer(buffer, dtype, shape,
//! order)` instead; both are read. bfloat16 weights are stored by paddle as `uint16` arrays and are
//! returned as [`RawDType::U16`].

use super::pickle::{self, Value};
use super::raw::{checked_numel, contiguous_strides, RawDType, RawTensor};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// The bookkeeping entry `paddle.save` adds beside the parameters.
const STRUCTURED_NAMES_KEY: &str = "StructuredToParameterName@@";
/// Present when `paddle.save` split big arrays into slices (pickle protocols 2 and 3 only).
const UNPACK_BIG_PARAM_KEY: &str = "UnpackBigParamInfor@@";

/// Reads every parameter of a `.pdparams` file, in file order.
pub fn read_pdparams(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let source = path.display().to_string();
    let data = std::fs::read(path).with_context(|| format!("reading {source}"))?;
    let root = pickle::parse(&data, &source)?;
    drop(data);
    pdparams_from_value(root, &source)
}

/// Interprets a parsed `.pdparams` pickle; `source` names it in errors.
fn pdparams_from_value(root: Value, source: &str) -> Result<Vec<(String, RawTensor)>> {
    let entries = root.into_dict().map_err(|other| {
        anyhow!(
            "{source}: not a PaddlePaddle parameter file: the pickle holds a {}, expected a dict \
             of numpy arrays",
            other.describe()
        )
    })?;
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let Value::Str(name) = key else {
            bail!(
                "{source}: not a PaddlePaddle parameter file: a dict key is a {}, expected str",
                key.describe()
            );
        };
        if name == STRUCTURED_NAMES_KEY {
            continue;
        }
        if name == UNPACK_BIG_PARAM_KEY {
            bail!(
                "{source}: arrays split into slices by paddle.save (protocol 2/3) are not \
                 supported; re-save with protocol 4"
            );
        }
        let tensor = ndarray_to_raw(value)
            .with_context(|| format!("{source}: parameter '{name}'"))
            .map_err(|e| anyhow!("{e:#}"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// Whether `v` is `module.name` for one of numpy's module paths (`numpy.core.x` before numpy 2,
/// `numpy._core.x` since).
fn is_numpy_global(v: &Value, submodule: &str, name: &str) -> bool {
    match v {
        Value::Global { module, name: n } => {
            n == name
                && (module.strip_prefix("numpy.core.") == Some(submodule)
                    || module.strip_prefix("numpy._core.") == Some(submodule))
        }
        _ => false,
    }
}

/// Decodes a pickled numpy array into a C-contiguous little-endian tensor.
pub(crate) fn ndarray_to_raw(value: Value) -> Result<RawTensor> {
    let (shape, dtype, fortran, data) = match value {
        Value::Build { obj, state } => {
            match *obj {
                Value::Reduce { callable, args }
                    if is_numpy_global(&callable, "multiarray", "_reconstruct") =>
                {
                    let subtype = args.as_seq().and_then(|a| a.first());
                    if !subtype.is_some_and(|s| s.is_global("numpy", "ndarray")) {
                        bail!(
                            "only plain numpy.ndarray is supported, found {}",
                            subtype.map_or("nothing".into(), Value::describe)
                        );
                    }
                }
                other => bail!("expected a numpy array, found a built {}", other.describe()),
            }
            let Value::Tuple(state) = *state else {
                bail!("numpy array state is not a tuple");
            };
            let [_version, shape, dtype, fortran, data]: [Value; 5] =
                state.try_into().map_err(|s: Vec<Value>| {
                    anyhow!("numpy array state has {} items, not 5", s.len())
                })?;
            let Value::Bool(fortran) = fortran else {
                bail!("numpy array state: is_fortran is a {}", fortran.describe());
            };
            (shape, dtype, fortran, data)
        }
        Value::Reduce { callable, args }
            if is_numpy_global(&callable, "numeric", "_frombuffer") =>
        {
            let Value::Tuple(args) = *args else {
                bail!("numpy _frombuffer arguments are not a tuple");
            };
            let [data, dtype, shape, order]: [Value; 4] =
                args.try_into().map_err(|a: Vec<Value>| {
                    anyhow!("numpy _frombuffer takes 4 arguments, found {}", a.len())
                })?;
            let fortran = match order.as_str() {
                Some("C") => false,
                Some("F") => true,
                _ => bail!("numpy _frombuffer order is not 'C' or 'F'"),
            };
            (shape, dtype, fortran, data)
        }
        other => bail!("expected a numpy array, found {}", other.describe()),
    };

    let shape = shape
        .as_seq()
        .context("numpy array shape is not a tuple")?
        .iter()
        .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .context("numpy array shape holds something other than non-negative ints")?;
    let (dtype, big_endian) = parse_dtype(&dtype)?;
    let Value::Bytes(data) = data else {
        bail!(
            "numpy array data is a {}, expected bytes (object arrays are not supported)",
            data.describe()
        );
    };
    let numel = checked_numel(&shape)?;
    let expected = numel
        .checked_mul(dtype.size_in_bytes())
        .context("numpy array too large")?;
    if data.len() != expected {
        bail!(
            "numpy array of shape {shape:?} and dtype {dtype:?} needs {expected} bytes, found {}",
            data.len()
        );
    }

    let mut tensor = if fortran && shape.len() > 1 {
        // Column-major: the first axis varies fastest.
        let mut strides = contiguous_strides(&shape.iter().rev().copied().collect::<Vec<_>>());
        strides.reverse();
        RawTensor::from_strided(dtype, &shape, &strides, 0, &data)?
    } else {
        RawTensor { dtype, shape, data }
    };
    if big_endian {
        tensor.swap_byte_order();
    }
    Ok(tensor)
}

/// Decodes a pickled `numpy.dtype` into an element type and whether it is big-endian.
fn parse_dtype(value: &Value) -> Result<(RawDType, bool)> {
    let (callable, args, state) = match value {
        Value::Build { obj, state } => match obj.as_ref() {
            Value::Reduce { callable, args } => (callable, args, Some(state)),
            other => bail!("numpy dtype is a built {}", other.describe()),
        },
        Value::Reduce { callable, args } => (callable, args, None),
        other => bail!("numpy dtype is a {}", other.describe()),
    };
    if !callable.is_global("numpy", "dtype") {
        bail!("numpy dtype is a {}", callable.describe());
    }
    let type_str = args
        .as_seq()
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .context("numpy dtype has no type string")?;
    // The byte order lives in the BUILD state (`(3, '<', ...)`); accept it in the string too.
    let (prefix, code) = match type_str.chars().next() {
        Some(c @ ('<' | '>' | '|' | '=')) => (Some(c), &type_str[1..]),
        _ => (None, type_str),
    };
    let order = state
        .and_then(|s| s.as_seq())
        .and_then(|s| s.get(1))
        .and_then(Value::as_str)
        .and_then(|s| s.chars().next())
        .or(prefix);
    let big_endian = match order {
        Some('>') => true,
        Some('<' | '|' | '=') | None => false,
        Some(other) => bail!("numpy dtype has unknown byte order {other:?}"),
    };
    let dtype = match code {
        "f8" => RawDType::F64,
        "f4" => RawDType::F32,
        "f2" => RawDType::F16,
        "i8" => RawDType::I64,
        "i4" => RawDType::I32,
        "i2" => RawDType::I16,
        "u2" => RawDType::U16,
        "u1" => RawDType::U8,
        "b1" => RawDType::Bool,
        other => bail!("numpy dtype '{other}' is not supported"),
    };
    Ok((dtype, big_endian))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::pickle::writer::PickleWriter;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Option<PathBuf> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/coca-tiny")
            .join(name);
        if path.exists() {
            Some(path)
        } else {
            eprintln!("skipping: fixture {} not found", path.display());
            None
        }
    }

    fn test_data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    /// Reads an F32 tensor from a safetensors file with the `safetensors` crate.
    fn safetensors_f32(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
                (name, view.shape().to_vec(), f32s(view.data()))
            })
            .collect()
    }

    fn f32s(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
            .collect()
    }

    /// Maps every open_clip tensor to the paddle tensors it becomes (see the fixtures README) and
    /// checks that they hold the same numbers.
    #[test]
    fn f32_fixture_matches_open_clip_weights() {
        let (Some(pd), Some(st)) = (
            fixture("paddle_model_state.pdparams"),
            fixture("weights.safetensors"),
        ) else {
            return;
        };
        let params = read_pdparams(&pd).unwrap();
        assert_eq!(
            params.len(),
            163,
            "StructuredToParameterName@@ must be skipped"
        );
        assert!(params.iter().all(|(_, t)| t.dtype == RawDType::F32));
        // File order is kept (the file is not sorted: attn_pool's k_proj.weight precedes q_proj's).
        assert_eq!(params[0].0, "logit_scale");
        assert_eq!(params[1].0, "text.cls_emb");
        let lookup = |name: &str| -> (Vec<usize>, Vec<f32>) {
            let (_, t) = params
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name}"));
            (t.shape.clone(), f32s(&t.data))
        };

        let mut used = std::collections::HashSet::new();
        let mut lookup = |name: &str| {
            assert!(used.insert(name.to_owned()), "{name} used twice");
            lookup(name)
        };
        let mut checked = 0;
        for (name, shape, values) in safetensors_f32(&st) {
            let linear = [".out_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"];
            if let Some(prefix) = name.strip_suffix(".in_proj_weight") {
                // Packed [3*d, d_in] becomes q/k/v_proj.weight, each transposed to [d_in, d].
                let d = shape[0] / 3;
                for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let (s, v) = lookup(&format!("{prefix}.{part}.weight"));
                    assert_eq!(s, vec![shape[1], d]);
                    let rows = &values[i * d * shape[1]..(i + 1) * d * shape[1]];
                    assert_eq!(v, transpose(rows, d, shape[1]), "{name} {part}");
                }
            } else if let Some(prefix) = name.strip_suffix(".in_proj_bias") {
                let d = shape[0] / 3;
                for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let (s, v) = lookup(&format!("{prefix}.{part}.bias"));
                    assert_eq!(s, vec![d]);
                    assert_eq!(v, values[i * d..(i + 1) * d], "{name} {part}");
                }
            } else if let Some((prefix, part)) = ["q", "k", "v"].iter().find_map(|p| {
                name.strip_suffix(&format!(".{p}_proj_weight"))
                    .map(|x| (x, p))
            }) {
                // The attentional pooler's separate projections: `q_proj_weight` -> `q_proj.weight`.
                let (s, v) = lookup(&format!("{prefix}.{part}_proj.weight"));
                assert_eq!(s, vec![shape[1], shape[0]]);
                assert_eq!(v, transpose(&values, shape[0], shape[1]), "{name}");
            } else if linear.iter().any(|l| name.ends_with(l)) {
                let (s, v) = lookup(&name);
                assert_eq!(s, vec![shape[1], shape[0]]);
                assert_eq!(v, transpose(&values, shape[0], shape[1]), "{name}");
            } else {
                let (s, v) = lookup(&name);
                if name == "logit_scale" {
                    assert_eq!((shape.as_slice(), s.as_slice()), (&[][..], &[1][..]));
                } else {
                    assert_eq!(s, shape, "{name}");
                }
                assert_eq!(v, values, "{name}");
            }
            checked += 1;
        }
        assert_eq!(checked, 129);
        assert_eq!(
            used.len(),
            params.len(),
            "every paddle tensor corresponds to an open_clip one"
        );
    }

    #[test]
    fn bf16_fixture_matches_f32_within_rounding() {
        let (Some(f32_path), Some(bf16_path)) = (
            fixture("paddle_model_state.pdparams"),
            fixture("paddle_model_state_bf16.pdparams"),
        ) else {
            return;
        };
        let full = read_pdparams(&f32_path).unwrap();
        let half = read_pdparams(&bf16_path).unwrap();
        assert_eq!(full.len(), half.len());
        for ((n32, t32), (n16, t16)) in full.iter().zip(&half) {
            assert_eq!(n32, n16);
            assert_eq!(t16.dtype, RawDType::U16, "{n16}");
            assert_eq!(t32.shape, t16.shape, "{n16}");
            let want = f32s(&t32.data);
            let got = t16
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32());
            for (w, g) in want.iter().zip(got) {
                // bf16 keeps 8 significant bits: relative error at most 2^-8.
                assert!(
                    (w - g).abs() <= w.abs() / 256.0 + 1e-30,
                    "{n16}: {w} vs {g}"
                );
            }
        }
    }

    /// `tests/data/numpy_arrays_p{2,4,5}.pkl`: genuine numpy pickles (see make_fixtures.py) of
    /// a dict holding big-endian, Fortran-order, 0-d, bool, int and float arrays.
    #[test]
    fn genuine_numpy_pickles_decode() {
        for protocol in [2, 4, 5] {
            let path = test_data(&format!("numpy_arrays_p{protocol}.pkl"));
            let params = read_pdparams(&path).unwrap_or_else(|e| panic!("{e:#}"));
            let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, t)| t).unwrap();
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "f32",
                    "f32_big_endian",
                    "f64_fortran",
                    "u16",
                    "i64_scalar",
                    "bool",
                    "f16",
                    "i32_fortran_3d",
                    "u8_empty"
                ],
                "protocol {protocol}"
            );
            // arange(6).reshape(2, 3) in every case, unless stated.
            let f32_want: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
            for name in ["f32", "f32_big_endian"] {
                let t = get(name);
                assert_eq!(
                    (t.dtype, t.shape.as_slice()),
                    (RawDType::F32, &[2, 3][..]),
                    "{name}"
                );
                assert_eq!(t.data, f32_want, "{name} protocol {protocol}");
            }
            let t = get("f64_fortran");
            assert_eq!((t.dtype, t.shape.as_slice()), (RawDType::F64, &[2, 3][..]));
            let f64_want: Vec<u8> = (0..6).flat_map(|i| (i as f64).to_le_bytes()).collect();
            assert_eq!(t.data, f64_want, "protocol {protocol}");
            let t = get("u16");
            assert_eq!((t.dtype, t.shape.as_slice()), (RawDType::U16, &[3][..]));
            assert_eq!(t.data, [1, 0, 2, 0, 0xff, 0xff]);
            let t = get("i64_scalar");
            assert_eq!((t.dtype, t.shape.as_slice()), (RawDType::I64, &[][..]));
            assert_eq!(t.data, (-7i64).to_le_bytes());
            let t = get("bool");
            assert_eq!(
                (t.dtype, t.data.as_slice()),
                (RawDType::Bool, &[1, 0, 1][..])
            );
            let t = get("f16");
            assert_eq!(t.dtype, RawDType::F16);
            assert_eq!(
                t.data,
                [half::f16::from_f32(0.5), half::f16::from_f32(-2.0)]
                    .iter()
                    .flat_map(|h| h.to_le_bytes())
                    .collect::<Vec<u8>>()
            );
            // arange(24).reshape(2, 3, 4) stored in Fortran order.
            let t = get("i32_fortran_3d");
            assert_eq!(
                (t.dtype, t.shape.as_slice()),
                (RawDType::I32, &[2, 3, 4][..])
            );
            let i32_want: Vec<u8> = (0..24i32).flat_map(|i| i.to_le_bytes()).collect();
            assert_eq!(t.data, i32_want, "protocol {protocol}");
            let t = get("u8_empty");
            assert_eq!(
                (t.dtype, t.shape.as_slice(), t.data.len()),
                (RawDType::U8, &[0, 5][..], 0)
            );
        }
    }

    #[test]
    fn not_a_dict_of_arrays_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };

        // A pickle of a list.
        let mut w = PickleWriter::new(4);
        w.op(b']').int(1).op(b'a');
        let err = read_pdparams(&write("list.pdparams", &w.finish()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("list.pdparams") && err.contains("expected a dict"),
            "{err}"
        );

        // A dict holding something other than an array.
        let mut w = PickleWriter::new(4);
        w.op(b'}').str("w").int(3).op(b's');
        let err = read_pdparams(&write("int.pdparams", &w.finish()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'w'") && err.contains("numpy array"), "{err}");

        // Random bytes and an empty file.
        let mut state = 12345u32;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        assert!(read_pdparams(&write("noise.pdparams", &noise)).is_err());
        assert!(read_pdparams(&write("empty.pdparams", &[])).is_err());
        assert!(read_pdparams(&dir.path().join("missing.pdparams")).is_err());
    }

    #[test]
    fn truncated_files_are_errors() {
        let path = test_data("numpy_arrays_p4.pkl");
        let bytes = std::fs::read(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for cut in (0..bytes.len()).step_by(7) {
            let p = dir.path().join("cut.pdparams");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(read_pdparams(&p).is_err(), "cut at {cut}");
        }
        // Flipping any single byte must not panic (it may or may not still parse).
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x5a;
            let p = dir.path().join("flip.pdparams");
            std::fs::write(&p, &b).unwrap();
            let _ = read_pdparams(&p);
        }
        if let Some(real) = fixture("paddle_model_state_bf16.pdparams") {
            let bytes = std::fs::read(real).unwrap();
            let p = dir.path().join("cut_real.pdparams");
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            let err = read_pdparams(&p).unwrap_err().to_string();
            assert!(
                err.contains("truncated") && err.contains("cut_real.pdparams"),
                "{err}"
            );
        }
    }
}
