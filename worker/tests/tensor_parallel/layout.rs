//! How parameters are split: shard/gather round trips, packed q/k/v, degrees that do not divide,
//! the released configs.

use super::*;

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
