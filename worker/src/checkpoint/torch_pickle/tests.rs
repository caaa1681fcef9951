//! Tests of `torch_pickle`.

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
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
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
