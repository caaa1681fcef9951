//! Tensor parallelism against the unsplit model: members of a TP group run as threads of this
//! process over loopback rings, on the `coca-tiny` fixture weights (degrees 1 and 2:
//! its towers have 2 heads) and on a small seeded config with 4 heads everywhere (degree 4).

mod checkpointing;
mod layout;
mod loss;
mod model;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use coca_common::collective::memory_kv::MemoryKeyValue;
use coca_common::collective::ring::RingCollective;
use coca_common::collective::{Collective, ReduceOp};
use coca_worker::model::group_loss::{coca_group_loss, ContrastiveSpan};
use coca_worker::model::manifest::parameter_shapes;
use coca_worker::model::ops::cross_entropy_rows;
use coca_worker::model::tensor_parallel::{
    check_degree, gather_state_dict, local_parameter_shapes, shard_state_dict, split_of,
    vocab_parallel_cross_entropy, vocab_parallel_cross_entropy_portable, TensorParallel,
};
use coca_worker::model::{coca_loss, CoCa, CocaConfig, CocaLossConfig, CocaOutput};
use coca_worker::train::trainable::{trainable_model, trainable_model_parallel, TrainableWeights};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Groups: members are threads of this process on loopback rings.

/// Counts of collectives: `[all-reduces, all-gathers, others]`.
type Counts = Arc<Mutex<[usize; 3]>>;

/// Gradients by parameter name.
type Grads = HashMap<String, Tensor>;

/// A group of `size` members on the TCP ring over loopback, one per thread to come.
fn thread_group(size: usize) -> Vec<Arc<dyn Collective>> {
    let kv = MemoryKeyValue::new();
    let members: Vec<usize> = (0..size).collect();
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..size)
            .map(|m| {
                let (kv, members) = (&kv, &members);
                s.spawn(move || {
                    RingCollective::connect(
                        "tp-test",
                        members,
                        m,
                        loopback,
                        kv,
                        b"tensor-parallel-test-token",
                        Duration::from_secs(60),
                    )
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap().unwrap()) as Arc<dyn Collective>)
            .collect()
    })
}

/// A member that counts the collectives it runs (barriers not counted).
struct Counting {
    inner: Arc<dyn Collective>,
    calls: Counts,
}

impl Counting {
    fn count(&self, kind: usize) {
        self.calls.lock().unwrap()[kind] += 1;
    }
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.count(0);
        self.inner.all_reduce(buf, op)
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.count(1);
        self.inner.all_gather(input, output)
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        self.count(2);
        self.inner.reduce_scatter(input, output, op)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.count(2);
        self.inner.broadcast(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}

/// [`thread_group`] and the counts of the collectives member 0 runs (`[all-reduces,
/// all-gathers, others]`; every member runs the same).
fn counted_thread_group(size: usize) -> (Vec<Arc<dyn Collective>>, Counts) {
    let calls = Counts::default();
    let group = thread_group(size)
        .into_iter()
        .enumerate()
        .map(|(rank, inner)| -> Arc<dyn Collective> {
            if rank == 0 {
                Arc::new(Counting {
                    inner,
                    calls: calls.clone(),
                })
            } else {
                inner
            }
        })
        .collect();
    (group, calls)
}

/// Runs `f` on every member of a group of `size`, one thread each; results in member order.
fn run_members<R: Send>(size: usize, f: impl Fn(TensorParallel) -> R + Sync) -> Vec<R> {
    run_group(thread_group(size), f)
}

fn run_group<R: Send>(
    group: Vec<Arc<dyn Collective>>,
    f: impl Fn(TensorParallel) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|member| {
                let f = &f;
                scope.spawn(move || f(TensorParallel::new(member)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("member thread panicked"))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures and comparisons.

/// `../shared/fixtures/<rel>` beside the repository, or `None` (with a message) when absent.
fn fixture(rel: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipping: reference fixture {} is absent", path.display());
        None
    }
}

struct Fixture {
    config: CocaConfig,
    weights: HashMap<String, Tensor>,
    images: Tensor,
    text: Tensor,
}

/// This member's trainable model of the fixture weights, recomputing its blocks' activations
/// in the backward pass when `recompute` (activation checkpointing).
fn fixture_model(fx: &Fixture, tp: &TensorParallel, recompute: bool) -> (CoCa, TrainableWeights) {
    let (mut model, vars) = trainable_model_parallel(
        &fx.config,
        Some(fx.weights.clone()),
        0,
        DType::F32,
        &Device::Cpu,
        tp,
    )
    .unwrap();
    model.set_grad_checkpointing(recompute);
    (model, vars)
}

fn coca_tiny() -> Option<Fixture> {
    let dir = fixture("coca-tiny")?;
    fixture("coca-tiny/io.safetensors")?;
    let config = CocaConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    Some(Fixture {
        config,
        weights,
        images: io["input.image"].clone(),
        text: io["input.text"].clone(),
    })
}

/// A config small enough for degree 4: 4 heads in every attention, MLP width 128, vocabulary 64.
fn four_head_config() -> CocaConfig {
    CocaConfig::from_json(
        r#"{
      "embed_dim": 32,
      "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "head_width": 16,
                     "patch_size": 8, "attentional_pool": true, "attn_pooler_queries": 5,
                     "attn_pooler_heads": 4, "output_tokens": true},
      "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4,
                   "layers": 2, "embed_cls": true, "output_tokens": true},
      "multimodal_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4,
                         "layers": 2, "attn_pooler_heads": 4},
      "custom_text": true
    }"#,
    )
    .unwrap()
}

/// Reproducible values roughly uniform in `[-scale, scale)`.
fn pseudo_random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Inputs for [`four_head_config`]: 3 images, captions with trailing padding (id 0).
fn four_head_inputs() -> (Tensor, Tensor) {
    let images = pseudo_random(&[3, 3, 16, 16], 1, 1.5);
    let text: Vec<u32> = vec![
        1, 17, 33, 49, 63, 2, 0, 0, //
        1, 5, 40, 2, 0, 0, 0, 0, //
        1, 60, 31, 16, 15, 32, 48, 2,
    ];
    (
        images,
        Tensor::from_vec(text, (3, 8), &Device::Cpu).unwrap(),
    )
}

/// Largest absolute difference.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    coca_worker::compare::max_abs_diff(a, b).unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    coca_worker::compare::max_abs(a).unwrap()
}

/// `|a − b|` relative to `b`'s largest element (or absolute below 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1.0)
}

/// `|a − b|` relative to `b`'s largest element.
fn rel_to_max(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1e-30)
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// The vocabulary-split logits `[B, L, V/T]` of every member concatenated: the full logits
/// (test only: training never gathers them).
fn gather_logits(local: &Tensor, tp: &TensorParallel) -> Tensor {
    let (b, l, v) = local.dims3().unwrap();
    let data = local.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut all = vec![0f32; data.len() * tp.size()];
    tp.group().all_gather(&data, &mut all).unwrap();
    let all = Tensor::from_vec(all, (tp.size(), b, l, v), &Device::Cpu).unwrap();
    let pieces: Vec<Tensor> = (0..tp.size()).map(|r| all.get(r).unwrap()).collect();
    Tensor::cat(&pieces, 2).unwrap()
}

/// What a member (or the unsplit model) computes, on full shapes.
struct Forward {
    outputs: Vec<(&'static str, Tensor)>,
    losses: [f32; 3],
}

fn forward_all(out: &CocaOutput, tp: &TensorParallel) -> Forward {
    let loss = coca_loss(out, &CocaLossConfig::default()).unwrap();
    Forward {
        outputs: vec![
            ("image_features", out.image_features.clone()),
            ("image_embs", out.image_embs.clone()),
            ("text_features", out.text_features.clone()),
            ("token_embs", out.token_embs.clone()),
            ("logits", gather_logits(&out.logits, tp)),
        ],
        losses: [
            scalar(&loss.contrastive),
            scalar(&loss.caption),
            scalar(&loss.total),
        ],
    }
}

fn compare_forward(what: &str, ours: &Forward, reference: &Forward, tol: f32) {
    for ((name, a), (_, b)) in ours.outputs.iter().zip(&reference.outputs) {
        let d = rel_diff(a, b);
        eprintln!("{what}: {name} max diff {d:e}");
        assert!(d <= tol, "{what}: {name} differs by {d}");
    }
    for (i, name) in ["contrastive", "caption", "total"].iter().enumerate() {
        let (a, b) = (ours.losses[i], reference.losses[i]);
        let d = ((a - b) / b).abs();
        eprintln!("{what}: loss.{name} {a} vs {b} (rel {d:e})");
        assert!(d <= tol, "{what}: loss.{name} {a} vs {b}");
    }
}

/// Every gradient of the full CoCa loss by parameter name, from a trainable model.
fn gradients(
    model: &CoCa,
    vars: &coca_worker::train::trainable::TrainableWeights,
    images: &Tensor,
    text: &Tensor,
) -> (HashMap<String, Tensor>, f32) {
    let out = model.forward(images, text).unwrap();
    let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
    let grads = loss.total.backward().unwrap();
    let by_name = vars
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {name}"))
                .clone();
            (name.clone(), g)
        })
        .collect();
    (by_name, scalar(&loss.total))
}

/// Checks the gathered gradients of a TP run against the unsplit ones and that the replicated
/// parameters' gradients are bit-identical on every member.
fn compare_gradients(
    what: &str,
    members: &[(Grads, Grads)],
    reference: &HashMap<String, Tensor>,
    tol: f32,
) {
    let (gathered, _) = &members[0];
    assert_eq!(gathered.len(), reference.len(), "{what}: parameter count");
    let mut worst = (String::new(), 0f32);
    for (name, want) in reference {
        let got = &gathered[name];
        let d = rel_to_max(got, want);
        if d >= worst.1 {
            worst = (name.clone(), d);
        }
        assert!(
            d <= tol,
            "{what}: gradient of {name} differs by {d} of its largest element"
        );
    }
    eprintln!("{what}: worst gradient {} at {:e}", worst.0, worst.1);
    for (gathered_r, local_r) in &members[1..] {
        for (name, g) in local_r {
            if split_of(name).is_replicated() {
                assert_eq!(
                    max_abs_diff(g, &members[0].1[name]),
                    0.0,
                    "{what}: replicated {name}'s gradient differs between members"
                );
            }
            assert_eq!(max_abs_diff(&gathered_r[name], &gathered[name]), 0.0);
        }
    }
}
