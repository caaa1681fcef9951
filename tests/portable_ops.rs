//! The fixture checks on the portable ops: every op of this process runs its composition of
//! candle primitives (what the GPU runs) instead of its fused CPU kernel, and generation decodes
//! on the tensor key/value cache. Equal fixtures here prove the device path's math on the CPU.
//!
//! The switch is process-global, so these tests live in a binary of their own, and each test
//! throws it before anything else (tests run in any order, on several threads).

mod common;

use coca_worker::eval::generate::{DecodePrecision, Decoding};
use coca_worker::model::ops::{force_portable, fused_dispatches};

/// Forces the portable ops for this process and returns nothing: every test calls it first.
fn portable() {
    force_portable();
}

/// No op of this process has run a fused kernel.
fn assert_no_fused_kernel_ran() {
    assert_eq!(fused_dispatches(), 0, "a fused CPU kernel ran");
}

#[test]
fn forward_matches_open_clip_on_portable_ops() {
    portable();
    common::model_checks::assert_forward_matches();
    assert_no_fused_kernel_ran();
}

#[test]
fn every_gradient_matches_open_clip_on_portable_ops() {
    portable();
    common::model_checks::assert_gradients_match();
    assert_no_fused_kernel_ran();
}

#[test]
fn captions_match_open_clip_on_the_tensor_cache() {
    portable();
    let Some((model, images, extras)) = common::model_checks::caption_fixture() else {
        return;
    };
    let decoding = Decoding::new(&model, DecodePrecision::F32).unwrap();
    assert!(
        matches!(decoding, Decoding::Tensors(_)),
        "forced portable ops decode on the tensor cache"
    );
    common::model_checks::assert_captions_match(&model, &images, &extras);
    assert_no_fused_kernel_ran();
}
