//! Tensor parallelism against the unsplit model: members of a TP group run as threads of this
//! process over an in-process collective, on the `coca-tiny` fixture weights (degrees 1 and 2:
//! its towers have 2 heads) and on a small seeded config with 4 heads everywhere (degree 4).

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use coca_common::collective::SingleProcess;
use coca_common::collective::{Collective, ReduceOp};
use coca_worker::distributed::loss::{coca_group_loss, ContrastiveSpan};
use coca_worker::distributed::tensor_parallel::{
    check_degree, gather_state_dict, local_parameter_shapes, shard_state_dict, split_of,
    vocab_parallel_cross_entropy, TensorParallel,
};
use coca_worker::model::manifest::parameter_shapes;
use coca_worker::model::ops::cross_entropy_rows;
use coca_worker::model::trainable::{trainable_model, trainable_model_parallel};
use coca_worker::model::{coca_loss, CoCa, CocaConfig, CocaLossConfig, CocaOutput};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// An in-process group: members are threads exchanging buffers through a shared slot.

struct Round {
    generation: u64,
    arrived: usize,
    deposits: Vec<Option<Vec<f32>>>,
    result: Arc<Vec<Vec<f32>>>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    wake: Condvar,
    /// Collectives member 0 has run: all-reduces, all-gathers, others.
    calls: Counts,
}

/// One member of a [`thread_group`].
struct ThreadMember {
    rank: usize,
    shared: Arc<Shared>,
}

/// Counts of collectives: `[all-reduces, all-gathers, others]`.
type Counts = Arc<Mutex<[usize; 3]>>;

/// Gradients by parameter name.
type Grads = HashMap<String, Tensor>;

/// `size` members of one group, to be moved into one thread each.
fn thread_group(size: usize) -> Vec<Arc<dyn Collective>> {
    counted_thread_group(size).0
}

/// [`thread_group`] and the counts of the collectives member 0 runs (`[all-reduces,
/// all-gathers, others]`, barriers not counted; every member runs the same).
fn counted_thread_group(size: usize) -> (Vec<Arc<dyn Collective>>, Counts) {
    let shared = Arc::new(Shared {
        size,
        round: Mutex::new(Round {
            generation: 0,
            arrived: 0,
            deposits: vec![None; size],
            result: Arc::default(),
        }),
        wake: Condvar::new(),
        calls: Arc::default(),
    });
    let calls = shared.calls.clone();
    let members = (0..size)
        .map(|rank| {
            Arc::new(ThreadMember {
                rank,
                shared: shared.clone(),
            }) as Arc<dyn Collective>
        })
        .collect();
    (members, calls)
}

impl ThreadMember {
    fn count(&self, kind: usize) {
        if self.rank == 0 {
            self.shared.calls.lock().unwrap()[kind] += 1;
        }
    }

    /// Every member's buffer, in member order, once every member has handed in its own. A round
    /// cannot complete before every member has read the previous one (it needs all of them).
    fn exchange(&self, data: &[f32]) -> Result<Arc<Vec<Vec<f32>>>> {
        let s = &self.shared;
        let mut round = s.round.lock().unwrap();
        round.deposits[self.rank] = Some(data.to_vec());
        round.arrived += 1;
        if round.arrived == s.size {
            let all = round
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap())
                .collect();
            round.result = Arc::new(all);
            round.arrived = 0;
            round.generation += 1;
            s.wake.notify_all();
            return Ok(round.result.clone());
        }
        let generation = round.generation;
        while round.generation == generation {
            let (next, timeout) = s
                .wake
                .wait_timeout(round, Duration::from_secs(120))
                .unwrap();
            round = next;
            if timeout.timed_out() && round.generation == generation {
                bail!("member {}: the group did not meet within 120 s", self.rank);
            }
        }
        let all = round.result.clone();
        let n = data.len();
        ensure!(
            all.iter().all(|d| d.len() == n),
            "member {}: buffers of different lengths in one collective",
            self.rank
        );
        Ok(all)
    }
}

impl Collective for ThreadMember {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.count(0);
        let all = self.exchange(buf)?;
        for (i, x) in buf.iter_mut().enumerate() {
            // Member order on every member: bit-identical results.
            let mut sum = 0f32;
            for member in all.iter() {
                sum += member[i];
            }
            *x = match op {
                ReduceOp::Sum => sum,
                ReduceOp::Avg => sum / all.len() as f32,
            };
        }
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<()> {
        ensure!(
            output.len() == input.len() * self.size(),
            "all_gather sizes"
        );
        self.count(1);
        let all = self.exchange(input)?;
        for (chunk, member) in output.chunks_mut(input.len().max(1)).zip(all.iter()) {
            chunk.copy_from_slice(member);
        }
        Ok(())
    }

    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = output.len();
        ensure!(input.len() == n * self.size(), "reduce_scatter sizes");
        self.count(2);
        let mut mine = input[self.rank * n..(self.rank + 1) * n].to_vec();
        let all = self.exchange(input)?;
        for (i, x) in mine.iter_mut().enumerate() {
            let mut sum = 0f32;
            for member in all.iter() {
                sum += member[self.rank * n + i];
            }
            *x = match op {
                ReduceOp::Sum => sum,
                ReduceOp::Avg => sum / all.len() as f32,
            };
        }
        output.copy_from_slice(&mine);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.count(2);
        let all = self.exchange(buf)?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(&[]).map(|_| ())
    }
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
    vars: &coca_worker::model::trainable::TrainableWeights,
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

// ---------------------------------------------------------------------------------------------
// (a) forward outputs and losses.

#[test]
fn degree_one_is_the_plain_model_bit_for_bit() {
    let Some(fx) = coca_tiny() else { return };
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let plain = CoCa::new(&fx.config, vb).unwrap();
    let single = TensorParallel::single();
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let split = CoCa::new_parallel(&fx.config, vb, &single).unwrap();
    let a = forward_all(&plain.forward(&fx.images, &fx.text).unwrap(), &single);
    let b = forward_all(&split.forward(&fx.images, &fx.text).unwrap(), &single);
    compare_forward("tp=1", &b, &a, 0.0);
}

#[test]
fn forward_on_fixture_matches_unsplit() {
    let Some(fx) = coca_tiny() else { return };
    let vb = VarBuilder::from_tensors(fx.weights.clone(), DType::F32, &Device::Cpu);
    let plain = CoCa::new(&fx.config, vb).unwrap();
    let reference = forward_all(
        &plain.forward(&fx.images, &fx.text).unwrap(),
        &TensorParallel::single(),
    );
    let size = 2;
    let members = run_members(size, |tp| {
        let shards = shard_state_dict(&fx.weights, &fx.config, tp.rank(), tp.size()).unwrap();
        let vb = VarBuilder::from_tensors(shards, DType::F32, &Device::Cpu);
        let model = CoCa::new_parallel(&fx.config, vb, &tp).unwrap();
        let out = model.forward(&fx.images, &fx.text).unwrap();
        assert_eq!(out.logits.dim(2).unwrap(), 49408 / size);
        forward_all(&out, &tp)
    });
    for (rank, ours) in members.iter().enumerate() {
        compare_forward(&format!("tp=2 member {rank}"), ours, &reference, 1e-5);
    }
    // Every member reports the same losses, bit for bit.
    assert_eq!(members[0].losses, members[1].losses);
}

// (b) gradients of the whole loss.

#[test]
fn gradients_on_fixture_match_unsplit() {
    let Some(fx) = coca_tiny() else { return };
    let (model, vars) = trainable_model(
        &fx.config,
        Some(fx.weights.clone()),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (reference, loss) = gradients(&model, &vars, &fx.images, &fx.text);
    for size in [1, 2] {
        let members = run_members(size, |tp| {
            let (model, vars) = trainable_model_parallel(
                &fx.config,
                Some(fx.weights.clone()),
                0,
                DType::F32,
                &Device::Cpu,
                &tp,
            )
            .unwrap();
            let (local, member_loss) = gradients(&model, &vars, &fx.images, &fx.text);
            assert!(((member_loss - loss) / loss).abs() < 1e-5);
            let gathered = gather_state_dict(&local, &fx.config, tp.group().as_ref()).unwrap();
            (gathered, local)
        });
        let tol = if size == 1 { 0.0 } else { 1e-5 };
        compare_gradients(&format!("tp={size}"), &members, &reference, tol);
    }
}

/// Degree 4 on a seeded model: the shards of the seeded initialisation are slices of the
/// unsplit one, and forward, loss and gradients match; also the data-parallel loss over a TP
/// model, and generation refusing to run split.
#[test]
fn degree_four_matches_unsplit_on_seeded_weights() {
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let (model, vars) = trainable_model(&config, None, 7, DType::F32, &Device::Cpu).unwrap();
    let full: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
    let reference = forward_all(
        &model.forward(&images, &text).unwrap(),
        &TensorParallel::single(),
    );
    let (reference_grads, _) = gradients(&model, &vars, &images, &text);
    for size in [2, 4] {
        let members = run_members(size, |tp| {
            let (model, vars) =
                trainable_model_parallel(&config, None, 7, DType::F32, &Device::Cpu, &tp).unwrap();
            // The seeded shards are exactly the slices of the unsplit initialisation.
            let local: HashMap<String, Tensor> = vars.tensors().into_iter().collect();
            let want = shard_state_dict(&full, &config, tp.rank(), tp.size()).unwrap();
            assert_eq!(local.len(), want.len());
            for (name, t) in &local {
                assert_eq!(max_abs_diff(t, &want[name]), 0.0, "seeded shard of {name}");
            }
            let out = model.forward(&images, &text).unwrap();
            let fwd = forward_all(&out, &tp);
            // The data-parallel loss (a group of one here) over a TP model's split logits.
            let dp = coca_group_loss(
                &out,
                &CocaLossConfig::default(),
                ContrastiveSpan::default(),
                &(Arc::new(SingleProcess) as Arc<dyn Collective>),
            )
            .unwrap();
            assert!(((dp.values.total as f32 - fwd.losses[2]) / fwd.losses[2]).abs() < 1e-6);
            let (_, image_embs) = model.encode_image(&images).unwrap();
            let refused = model.next_token_logits(&image_embs, &text.narrow(1, 0, 3).unwrap());
            assert!(
                format!("{}", refused.unwrap_err()).contains("without tensor parallelism"),
                "generation must refuse a split model"
            );
            let (local_grads, _) = gradients(&model, &vars, &images, &text);
            let gathered = gather_state_dict(&local_grads, &config, tp.group().as_ref()).unwrap();
            (fwd, (gathered, local_grads))
        });
        let (forwards, grads): (Vec<_>, Vec<_>) = members.into_iter().unzip();
        for (rank, ours) in forwards.iter().enumerate() {
            compare_forward(&format!("tp={size} member {rank}"), ours, &reference, 1e-5);
        }
        compare_gradients(&format!("tp={size}"), &grads, &reference_grads, 1e-5);
    }
}

// (c) shard → gather round trip.

#[test]
fn shard_then_gather_is_exact_and_shards_have_the_models_shapes() {
    let mut cases = vec![(four_head_config(), None, vec![1, 2, 4])];
    if let Some(fx) = coca_tiny() {
        cases.push((fx.config, Some(fx.weights), vec![1, 2]));
    }
    for (config, weights, sizes) in cases {
        let full = match weights {
            Some(w) => w,
            None => trainable_model(&config, None, 3, DType::F32, &Device::Cpu)
                .unwrap()
                .1
                .tensors()
                .into_iter()
                .collect(),
        };
        assert_eq!(full.len(), parameter_shapes(&config).unwrap().len());
        for size in sizes {
            let back = run_members(size, |tp| {
                let shards = shard_state_dict(&full, &config, tp.rank(), tp.size()).unwrap();
                // The model asks for exactly these names and shapes.
                let shapes = local_parameter_shapes(&config, tp.rank(), tp.size()).unwrap();
                assert_eq!(shapes.len(), shards.len());
                for (name, dims) in &shapes {
                    assert_eq!(shards[name].dims(), dims.as_slice(), "{name} at tp={size}");
                }
                gather_state_dict(&shards, &config, tp.group().as_ref()).unwrap()
            });
            for gathered in back {
                assert_eq!(gathered.len(), full.len());
                for (name, t) in &full {
                    assert_eq!(gathered[name].dims(), t.dims(), "{name}");
                    assert_eq!(max_abs_diff(&gathered[name], t), 0.0, "{name} at tp={size}");
                }
            }
        }
    }
}

#[test]
fn packed_qkv_is_split_by_heads() {
    // in_proj_weight rows are [q; k; v]; member r of 2 holds q's, k's and v's r-th halves.
    let config = four_head_config();
    let name = "text.transformer.resblocks.0.attn.in_proj_weight";
    let full = Tensor::arange(0f32, (96 * 32) as f32, &Device::Cpu)
        .unwrap()
        .reshape((96, 32))
        .unwrap();
    let dict = HashMap::from([(name.to_string(), full.clone())]);
    let shard = &shard_state_dict(&dict, &config, 1, 2).unwrap()[name];
    assert_eq!(shard.dims(), [48, 32]);
    for (i, start) in [16usize, 48, 80].into_iter().enumerate() {
        let want = full.narrow(0, start, 16).unwrap();
        assert_eq!(
            max_abs_diff(&shard.narrow(0, i * 16, 16).unwrap(), &want),
            0.0
        );
    }
}

// (d) degrees that do not divide.

#[test]
fn a_degree_that_does_not_divide_is_an_error_naming_the_numbers() {
    let config = four_head_config();
    let err = format!("{:#}", check_degree(&config, 3).unwrap_err());
    eprintln!("{err}");
    for part in [
        "degree 3",
        "image tower's attention heads (vision_cfg.width / head_width) = 4",
        "attentional pooler's heads (vision_cfg.attn_pooler_heads) = 4",
        "text tower's attention heads (text_cfg.heads) = 4",
        "decoder's attention heads (multimodal_cfg.heads) = 4",
        "text tower's vocabulary (text_cfg.vocab_size) = 64",
        "image tower's MLP width (vision_cfg.width × mlp_ratio) = 256",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let mut config = four_head_config();
    config.text_cfg.heads = 2;
    let err = format!("{:#}", check_degree(&config, 4).unwrap_err());
    assert!(
        err.contains("text tower's attention heads (text_cfg.heads) = 2"),
        "{err}"
    );
    assert!(!err.contains("image tower"), "{err}");
    // Before anything is built: the model, the sharding and the seeded shards refuse it.
    let tp = TensorParallel::layout_only(0, 4);
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let err = format!("{}", CoCa::new_parallel(&config, vb, &tp).unwrap_err());
    assert!(err.contains("text_cfg.heads) = 2"), "{err}");
    let err = format!(
        "{:#}",
        shard_state_dict(&HashMap::new(), &config, 0, 4).unwrap_err()
    );
    assert!(err.contains("degree 4"), "{err}");
    assert!(trainable_model_parallel(&config, None, 0, DType::F32, &Device::Cpu, &tp).is_err());
    if let Some(fx) = coca_tiny() {
        // The fixture's towers have 2 heads: degree 4 is refused, naming them.
        let err = format!("{:#}", check_degree(&fx.config, 4).unwrap_err());
        eprintln!("{err}");
        assert!(err.contains("(vision_cfg.width / head_width) = 2"), "{err}");
        assert!(err.contains("(text_cfg.heads) = 2"), "{err}");
        assert!(err.contains("(multimodal_cfg.heads) = 2"), "{err}");
        assert!(!err.contains("attn_pooler_heads"), "{err}");
    }
}

// (e) the vocabulary-parallel cross-entropy.

#[test]
fn parallel_cross_entropy_equals_cross_entropy_rows() {
    let (n, v) = (9, 24);
    let logits = (pseudo_random(&[n, v], 2, 6.0) + 5.0).unwrap();
    // Targets in every member's slice, the first and last ids, and ignored rows (0).
    let targets: Vec<u32> = vec![3, 0, 23, 12, 7, 0, 18, 1, 11];
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    let weights = pseudo_random(&[n], 3, 2.0);
    let full = Var::from_tensor(&logits).unwrap();
    let reference = cross_entropy_rows(full.as_tensor(), &targets, Some(0)).unwrap();
    let reference_grad = reference
        .mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(full.as_tensor())
        .unwrap()
        .clone();
    for size in [1, 2, 3, 4] {
        let members = run_members(size, |tp| {
            let width = v / tp.size();
            let mine = logits.narrow(1, tp.rank() * width, width).unwrap();
            let mine = Var::from_tensor(&mine.contiguous().unwrap()).unwrap();
            let loss =
                vocab_parallel_cross_entropy(mine.as_tensor(), &targets, Some(0), &tp).unwrap();
            let grads = loss
                .mul(&weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (loss, grads.get(mine.as_tensor()).unwrap().clone())
        });
        let grad = Tensor::cat(&members.iter().map(|(_, g)| g).collect::<Vec<_>>(), 1).unwrap();
        let dl = max_abs_diff(&members[0].0, &reference);
        let dg = max_abs_diff(&grad, &reference_grad);
        eprintln!("tp={size}: loss max diff {dl:e}, gradient max diff {dg:e}");
        assert!(
            dl <= 1e-5 * max_abs(&reference),
            "tp={size}: losses differ by {dl}"
        );
        assert!(
            dg <= 1e-5 * max_abs(&reference_grad),
            "tp={size}: gradients differ by {dg}"
        );
        let losses = members[0].0.to_vec1::<f32>().unwrap();
        assert_eq!(losses[1], 0.0);
        assert_eq!(losses[5], 0.0);
        for (loss, grad) in &members {
            assert_eq!(max_abs_diff(loss, &members[0].0), 0.0, "members disagree");
            // Ignored rows get no gradient.
            for row in [1, 5] {
                assert_eq!(max_abs(&grad.get(row).unwrap()), 0.0);
            }
        }
        if size == 1 {
            assert_eq!(dl, 0.0);
            assert_eq!(dg, 0.0);
        }
    }
    // A target outside the vocabulary fails on every member (none is left waiting).
    let bad = Tensor::from_vec(vec![24u32; n], n, &Device::Cpu).unwrap();
    let results = run_members(2, |tp| {
        let mine = logits.narrow(1, tp.rank() * 12, 12).unwrap();
        vocab_parallel_cross_entropy(&mine, &bad, Some(0), &tp).is_err()
    });
    assert_eq!(results, [true, true]);
}

// One all-reduce per attention and per MLP each way, plus the vocabulary-parallel pieces.

#[test]
fn collectives_per_step_are_megatrons() {
    let Some(fx) = coca_tiny() else { return };
    let (group, calls) = counted_thread_group(2);
    let counts = run_group(group, |tp| {
        let (model, vars) = trainable_model_parallel(
            &fx.config,
            Some(fx.weights.clone()),
            0,
            DType::F32,
            &Device::Cpu,
            &tp,
        )
        .unwrap();
        let read = || *calls.lock().unwrap();
        let start = read();
        let out = model.forward(&fx.images, &fx.text).unwrap();
        let forward = read();
        let loss = coca_loss(&out, &CocaLossConfig::default()).unwrap();
        let with_loss = read();
        let grads = loss.total.backward().unwrap();
        let backward = read();
        assert!(grads
            .get(vars.iter().next().unwrap().1.as_tensor())
            .is_some());
        let diff = |a: [usize; 3], b: [usize; 3]| [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
        (
            diff(start, forward),
            diff(forward, with_loss),
            diff(with_loss, backward),
        )
    });
    // Member 0's counts, read on member 0.
    let (forward, loss, backward) = counts[0];
    let (v, t, m) = (
        fx.config.vision_cfg.layers,
        fx.config.text_cfg.layers,
        fx.config.multimodal_cfg.layers,
    );
    eprintln!("forward {forward:?}, loss {loss:?}, backward {backward:?}");
    // Forward: attention + MLP per block (decoder: self and cross blocks), the pooler, the
    // embedding lookup.
    assert_eq!(forward, [2 * (v + t) + 1 + 4 * m + 1, 0, 0]);
    // The cross-entropy: one all-gather of two floats per token.
    assert_eq!(loss, [0, 1, 0]);
    // Backward: the inputs of every column-parallel layer (a cross-attention's queries and its
    // keys/values apart), the pooler's two, and the vocabulary projection's.
    assert_eq!(backward, [2 * (v + t) + 2 + 5 * m + 1, 0, 0]);
}

// The gradient norm for clipping over split gradients.

#[test]
fn global_grad_norm_sums_the_split_parts_over_the_group() {
    use coca_worker::distributed::tensor_parallel::global_grad_norm;
    use coca_worker::train::flat::Segment;
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let flat = |grads: &HashMap<String, Tensor>| -> (Vec<f32>, Vec<Segment>) {
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        let (mut data, mut segments) = (Vec::new(), Vec::new());
        for name in names {
            let g = grads[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            segments.push(Segment {
                name: name.clone(),
                shape: grads[name].dims().to_vec(),
                offset: data.len(),
                len: g.len(),
                lr: 0.0,
                weight_decay: 0.0,
            });
            data.extend(g);
        }
        (data, segments)
    };
    let (model, vars) = trainable_model(&config, None, 5, DType::F32, &Device::Cpu).unwrap();
    let (grads, _) = gradients(&model, &vars, &images, &text);
    let (data, segments) = flat(&grads);
    let want = global_grad_norm(&data, &segments, &TensorParallel::single()).unwrap();
    assert_eq!(
        want,
        coca_worker::train::adamw::global_norm(&data),
        "degree 1 is global_norm"
    );
    let norms = run_members(4, |tp| {
        let (model, vars) =
            trainable_model_parallel(&config, None, 5, DType::F32, &Device::Cpu, &tp).unwrap();
        let (grads, _) = gradients(&model, &vars, &images, &text);
        let (data, segments) = flat(&grads);
        global_grad_norm(&data, &segments, &tp).unwrap()
    });
    eprintln!("norm {want} unsplit, {:?} at tp=4", norms);
    for norm in &norms {
        assert_eq!(*norm, norms[0], "members disagree");
        assert!(((norm - want) / want).abs() < 1e-5, "{norm} vs {want}");
    }
}

// The same over the TCP ring backend (loopback), members as threads.

/// A ring of `size` members on loopback, formed one thread per member.
fn ring_group(size: usize) -> Vec<Arc<dyn Collective>> {
    use coca_common::collective::memory_kv::MemoryKeyValue;
    use coca_common::collective::ring::RingCollective;
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

#[test]
fn over_the_ring_forward_and_gradients_match_unsplit() {
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let (model, vars) = trainable_model(&config, None, 11, DType::F32, &Device::Cpu).unwrap();
    let reference = forward_all(
        &model.forward(&images, &text).unwrap(),
        &TensorParallel::single(),
    );
    let (reference_grads, _) = gradients(&model, &vars, &images, &text);
    let size = 4;
    let members = run_group(ring_group(size), |tp| {
        let (model, vars) =
            trainable_model_parallel(&config, None, 11, DType::F32, &Device::Cpu, &tp).unwrap();
        let fwd = forward_all(&model.forward(&images, &text).unwrap(), &tp);
        let (local, _) = gradients(&model, &vars, &images, &text);
        let gathered = gather_state_dict(&local, &config, tp.group().as_ref()).unwrap();
        (fwd, (gathered, local))
    });
    let (forwards, grads): (Vec<_>, Vec<_>) = members.into_iter().unzip();
    for (rank, ours) in forwards.iter().enumerate() {
        compare_forward(
            &format!("ring tp={size} member {rank}"),
            ours,
            &reference,
            1e-5,
        );
    }
    compare_gradients(&format!("ring tp={size}"), &grads, &reference_grads, 1e-5);
}

/// The released configs' shards: every split parameter's shards partition it, and each member
/// holds the replicated parameters plus `1/T` of the split ones.
#[test]
fn released_configs_split_into_equal_shards() {
    for (name, degrees, refused) in [("coca_ViT-B-32", [2, 4], 8), ("coca_ViT-L-14", [2, 4], 8)] {
        let config = CocaConfig::named(name).unwrap();
        let full = parameter_shapes(&config).unwrap();
        let count = |dims: &[usize]| dims.iter().product::<usize>();
        let total: usize = full.iter().map(|(_, d)| count(d)).sum();
        let replicated: usize = full
            .iter()
            .filter(|(n, _)| split_of(n).is_replicated())
            .map(|(_, d)| count(d))
            .sum();
        for size in degrees {
            let mut split_sum = 0;
            for rank in 0..size {
                let local = local_parameter_shapes(&config, rank, size).unwrap();
                let mine: usize = local.iter().map(|(_, d)| count(d)).sum();
                assert_eq!(mine - replicated, (total - replicated) / size);
                split_sum += mine - replicated;
            }
            assert_eq!(split_sum, total - replicated);
            eprintln!(
                "{name}: {total} parameters, {replicated} replicated; tp={size}: {} per member",
                replicated + (total - replicated) / size
            );
        }
        let err = format!("{:#}", check_degree(&config, refused).unwrap_err());
        eprintln!("{name}: {err}");
    }
}

/// A few trainer steps (AdamW, clipping active, logit-scale clamp) of a TP-split model equal
/// the unsplit trainer's: same losses and pre-clip norms on every member, and the gathered
/// parameters equal the unsplit ones; replicated parameters stay bit-identical across members.
#[test]
fn trainer_steps_under_tensor_parallelism_match_unsplit() {
    use coca_worker::model::trainable::TrainableWeights;
    use coca_worker::train::adamw::AdamWConfig;
    use coca_worker::train::groups::TowerGroups;
    use coca_worker::train::schedule::CosineSchedule;
    use coca_worker::train::trainer::{Trainer, TrainerConfig};
    let config = four_head_config();
    let (images, text) = four_head_inputs();
    let settings = TrainerConfig {
        adamw: AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
        },
        // Far below the gradient norm (≈ 100): every step is clipped.
        max_grad_norm: Some(1.0),
        schedule: CosineSchedule {
            warmup_steps: 1,
            total_steps: 4,
        },
        loss: CocaLossConfig::default(),
        span: ContrastiveSpan::default(),
    };
    let steps = 3;
    let train = |model: CoCa, vars: &TrainableWeights| -> (Vec<(f64, f64)>, Grads) {
        let groups = TowerGroups::uniform(1e-3, 0.1);
        let mut trainer = Trainer::new(model, vars, &groups, settings).unwrap();
        let trajectory = (0..steps)
            .map(|_| {
                let loss = trainer.backward(&images, &text, 1.0).unwrap();
                let report = trainer.update().unwrap();
                assert!(report.applied);
                (loss.total, report.grad_norm)
            })
            .collect();
        (trajectory, vars.tensors().into_iter().collect())
    };
    let (model, vars) = trainable_model(&config, None, 17, DType::F32, &Device::Cpu).unwrap();
    let (want_trajectory, want) = train(model, &vars);
    let members = run_members(2, |tp| {
        let (model, vars) =
            trainable_model_parallel(&config, None, 17, DType::F32, &Device::Cpu, &tp).unwrap();
        let (trajectory, local) = train(model, &vars);
        let gathered = gather_state_dict(&local, &config, tp.group().as_ref()).unwrap();
        (trajectory, (gathered, local))
    });
    for (trajectory, _) in &members {
        assert_eq!(
            trajectory, &members[0].0,
            "members disagree on losses or norms"
        );
        for (step, ((loss, norm), (want_loss, want_norm))) in
            trajectory.iter().zip(&want_trajectory).enumerate()
        {
            eprintln!("step {step}: loss {loss} vs {want_loss}, norm {norm} vs {want_norm}");
            assert!(((loss - want_loss) / want_loss).abs() < 1e-5);
            assert!(((norm - want_norm) / want_norm).abs() < 1e-5);
        }
    }
    let mut worst = 0f32;
    for (name, want) in &want {
        let got = &members[0].1 .0[name];
        // AdamW's first steps are close to sign(g)·lr, so compare as verify's train section
        // does: 1e-4 absolute or relative.
        let d = max_abs_diff(got, want);
        worst = worst.max(d);
        assert!(d <= 1e-4 * max_abs(want).max(1.0), "{name} differs by {d}");
    }
    eprintln!("worst parameter difference after {steps} steps: {worst:e}");
    let (_, local_1) = &members[1].1;
    for (name, t) in &members[0].1 .1 {
        if split_of(name).is_replicated() {
            assert_eq!(max_abs_diff(t, &local_1[name]), 0.0, "{name} drifted apart");
        }
    }
}
