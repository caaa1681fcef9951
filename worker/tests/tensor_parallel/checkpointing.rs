//! Activation checkpointing under tensor parallelism: the gradients are the plain unsplit
//! model's, and the recomputed blocks repeat their forward all-reduces in the backward pass.

use super::loss::step_collectives;
use super::model::fixture_gradients_match_unsplit;
use super::*;

#[test]
fn checkpointed_split_gradients_match_the_plain_unsplit_ones() {
    let Some(fx) = coca_tiny() else { return };
    fixture_gradients_match_unsplit(&fx, true);
}

#[test]
fn recomputed_blocks_repeat_their_forward_all_reduces_in_the_backward_pass() {
    let Some(fx) = coca_tiny() else { return };
    let [plain_forward, _, plain_backward] = step_collectives(&fx, false);
    let [forward, loss, backward] = step_collectives(&fx, true);
    assert_eq!(forward, plain_forward);
    assert_eq!(loss, [0, 1, 0]);
    // The attention's and the MLP's all-reduce of every recomputed block, once more.
    let (v, t, m) = (
        fx.config.vision_cfg.layers,
        fx.config.text_cfg.layers,
        fx.config.multimodal_cfg.layers,
    );
    let blocks = v + t + 2 * m;
    assert_eq!(backward, [plain_backward[0] + 2 * blocks, 0, 0]);
}
